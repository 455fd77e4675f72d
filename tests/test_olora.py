"""O-LoRA (train.method=olora) on the tiny model: the loss terms by hand, orthogonality under real
DeepSpeed (ZeRO-2 and ZeRO-3), frozen old tasks, no-task-id inference and the summed PEFT export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slm_llm.config import ConfigError, load_config, shared_adapter_config
from slm_llm.jare import JareModel
from slm_llm.models import load_base_model
from slm_llm.train.olora import OLoraObjective, l2_loss, orthogonality_loss

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TASKS = ["finance_phrasebank", "law_overruling"]
BIG = 50.0  # train.olora_lambda for "a large lambda"


def slm_llm(*args, procs=1, timeout=600):
    if procs == 1:
        cmd = [str(VENV_BIN / "slm-llm"), *args]
    else:
        port = str(29500 + (os.getpid() + 211) % 400)
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(procs), "--master_port", port, "launch/train.py",
               *args[1:]]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def overlap(run: Path) -> float:
    """Σ_layers |A_1 A_0^T| between the two tasks' trained LoRAs."""
    a0, a1 = (load_file(str(run / "tasks" / f"{n}-{t}" / "increments.safetensors")) for n, t in enumerate(TASKS))
    return sum(orthogonality_loss(a1[k][0], a0[k][0]).item() for k in a0 if k.endswith(".A"))


def losses(run: Path, n: int) -> list[float]:
    log = run / "tasks" / f"{n}-{TASKS[n]}" / "train_log.jsonl"
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def test_loss_terms_match_hand_computed_values():
    A_new = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])  # [R=2, in=3]
    A_old = torch.tensor([[1.0, -1.0, 0.0], [-3.0, 0.0, 1.0], [0.0, 0.5, 0.5]])  # [S=3, in=3]
    # A_new A_old^T = [[1, -1, 1], [-1, 0, 0.5]] -> |.| summed = 4.5
    assert orthogonality_loss(A_new, A_old).item() == pytest.approx(4.5)
    assert orthogonality_loss(A_new, torch.zeros(0, 3)).item() == 0.0  # the first task has nothing to avoid
    B_new = torch.tensor([[3.0, 4.0]])  # ‖A‖ = sqrt(6), ‖B‖ = 5: norms, not squares (O-LoRA's torch.norm)
    assert l2_loss(A_new, B_new).item() == pytest.approx(6 ** 0.5 + 5.0)


def test_objective_adds_both_terms_over_every_layer_and_old_task():
    """The engine's loss = LM loss + λ1 Σ_layers |A_new [A_0; A_1]^T| + λ2 Σ_layers (‖A_new‖ + ‖B_new‖)."""
    cfg = load_config(REPO / "configs/tiny.yaml", ["train.olora_lambda=0.7", "train.olora_l2=0.3"])
    base, _ = load_base_model(cfg.model)
    model = JareModel(base, shared_adapter_config(cfg.jare))
    torch.manual_seed(0)
    for name in ("t0", "t1", "new"):
        model.add_task(name)
        with torch.no_grad():
            for p in model.task_parameters(name):
                p.normal_(0, 0.1)
    objective = OLoraObjective(model, cfg.train)
    ids = torch.randint(0, 1000, (2, 10))
    mask, slots, weights = torch.ones_like(ids), torch.tensor([[0, 1, 2]] * 2), torch.ones(2, 3)
    want = 0.0
    for layer in model.jare_layers():
        A, B = (f[0].detach() for f in layer.task_factors(2))
        old = torch.cat([layer.task_factors(k)[0][0].detach() for k in (0, 1)])
        want += 0.7 * (A @ old.T).abs().sum().item() + 0.3 * (A.norm() + B.norm()).item()
    got = objective(ids, mask, ids, slots, weights) - model(ids, mask, ids, slots, weights)
    assert got.item() == pytest.approx(want, rel=1e-5)
    objective(ids, mask, ids, slots, weights).backward()
    assert all(p.grad is None for t in ("t0", "t1") for p in model.task_parameters(t))


def test_olora_settings_are_validated_and_frozen_in_a_run(tmp_path):
    from slm_llm.run import RunDir, RunError

    for key in ("train.olora_lambda", "train.olora_l2"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}=-0.1"])
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run_dir={tmp_path / 'r'}", "train.method=olora"])
    assert (cfg.train.olora_lambda, cfg.train.olora_l2) == (0.5, 0.0)  # O-LoRA's lamda_1, lamda_2 defaults
    RunDir(cfg.run_dir).init(cfg, "m", "e", TASKS)
    for key in ("train.olora_lambda", "train.olora_l2"):
        changed = load_config(REPO / "configs/tiny.yaml", [f"run_dir={tmp_path / 'r'}", "train.method=olora",
                                                           f"{key}=2.0"])
        with pytest.raises(RunError, match=key.replace(".", r"\.") + " was"):
            RunDir(cfg.run_dir).init(changed, "m", "e", TASKS)


@pytest.fixture(scope="module")
def lambda_runs(tmp_path_factory, data_root):
    """Two-task olora runs (no evaluation) with train.olora_lambda 0 and BIG; the first task is the same."""
    root = tmp_path_factory.mktemp("olora")
    runs = {}
    for lam in (0.0, BIG):
        runs[lam] = root / f"lam{lam:g}"
        slm_llm("train", "--config", "configs/tiny.yaml", f"run_dir={runs[lam]}", "train.method=olora",
                f"train.olora_lambda={lam}", "eval.during_training=false")
    return runs


@pytest.mark.slow
def test_large_lambda_makes_the_new_lora_orthogonal_to_the_old(lambda_runs):
    first = [load_file(str(r / "tasks" / f"0-{TASKS[0]}" / "increments.safetensors")) for r in lambda_runs.values()]
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])  # λ only acts once there is an old task
    free, constrained = overlap(lambda_runs[0.0]), overlap(lambda_runs[BIG])
    assert constrained < 0.25 * free, (free, constrained)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_old_task_is_bit_identical_after_a_new_task_trains(lambda_runs, stage, monkeypatch):
    """Through the DeepSpeed engine (ZeRO-3 partitions the frozen old LoRA too), with the old LoRA
    applied in every forward and pulled on by a large orthogonality term."""
    import deepspeed

    from slm_llm.run import RunDir
    from slm_llm.train.distributed import init_distributed
    from slm_llm.train.engine import build_engine, load_ds_config
    from slm_llm.train.olora import olora_model
    from slm_llm.utils.env import free_port

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    init_distributed()
    run = RunDir(lambda_runs[BIG])
    cfg = load_config(run.root / "run.yaml", [f"train.deepspeed={REPO / 'ds_configs' / stage}.json"])
    model = olora_model(cfg, run, TASKS[:1], "probe", seed=7)
    engine = build_engine(OLoraObjective(model, cfg.train), cfg.train,
                          load_ds_config(cfg.train.deepspeed, cfg.train, 1), total_steps=4)
    ids = torch.randint(0, 1000, (2, 12))
    first = None
    for _ in range(4):
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                      slot_ids=torch.tensor([[0, 1]] * 2), slot_weights=torch.ones(2, 2))
        first = first if first is not None else loss.item()
        engine.backward(loss)
        engine.step()
    assert loss.item() < first
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == "zero3"):
        now, probe = model.task_state_dict(TASKS[0]), model.task_state_dict("probe")
    saved = load_file(str(run.task_dir(TASKS[0]) / "increments.safetensors"))
    assert set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)
    assert all(p.abs().max() > 0 for k, p in probe.items() if k.endswith(".B"))  # the new LoRA did train


@pytest.mark.slow
def test_inference_applies_every_task_lora_at_weight_one(lambda_runs):
    """No task id: every query gets W + Σ_t B_t A_t (the dense formula), whatever its task."""
    from slm_llm.data import load_suite, load_task_split
    from slm_llm.dtkr import routing_tensors
    from slm_llm.pipeline import RunPipeline

    pipe = RunPipeline.load(lambda_runs[BIG])
    assert pipe.method == "olora" and pipe.tasks == TASKS
    suite = load_suite(pipe.cfg.data.suite)
    records = [r for t in TASKS for r in load_task_split(suite, t, "test", None, 2, 0)]
    decisions = pipe.route(records, "olora")
    assert all(d.slots == [0, 1] and d.weights == [1.0, 1.0] and d.task == "olora" for d in decisions)
    assert pipe.route(records, "base") == [None] * len(records)
    ids = torch.randint(0, 1000, (2, 12))
    slot_ids, slot_weights = routing_tensors(decisions[:2])
    with torch.no_grad():
        got = pipe.model(ids, torch.ones_like(ids), slot_ids=slot_ids, slot_weights=slot_weights)
        dense, _ = load_base_model(pipe.cfg.model)
        for n, task in enumerate(TASKS):
            inc = load_file(str(lambda_runs[BIG] / "tasks" / f"{n}-{task}" / "increments.safetensors"))
            for name in pipe.model.layer_names:
                dense.get_submodule(name).weight += inc[f"{name}.B"][0] @ inc[f"{name}.A"][0]
        want = dense(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        only_last = pipe.model(ids, torch.ones_like(ids), slot_ids=torch.tensor([[1]] * 2),
                               slot_weights=torch.ones(2, 1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - only_last).abs().max() > 1e-4  # the old task's LoRA does contribute


@pytest.mark.slow
def test_zero3_two_ranks_match_one_rank_with_the_orthogonality_term(tmp_path, data_root):
    """The regularised loss curve (both stages) does not depend on ZeRO stage or world size."""
    common = ["--config", "configs/tiny.yaml", "train.method=olora", "eval.during_training=false",
              "train.micro_batch_size=2", "train.ckpt_every=0"]
    slm_llm("train", *common, f"run_dir={tmp_path / 'one'}", "train.grad_accum=2")
    slm_llm("train", *common, f"run_dir={tmp_path / 'two'}", "train.grad_accum=1",
            "train.deepspeed=ds_configs/zero3.json", procs=2)
    for n in range(2):
        a, b = losses(tmp_path / "one", n), losses(tmp_path / "two", n)
        assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) < 2e-4, (n, a, b)
    assert overlap(tmp_path / "two") == pytest.approx(overlap(tmp_path / "one"), rel=1e-4)


@pytest.mark.slow
def test_compare_fills_the_olora_matrix_and_its_exported_adapter_matches_the_pipeline(tmp_path, data_root):
    from peft import PeftModel

    from slm_llm.dtkr import routing_tensors
    from slm_llm.jare.export import check_adapter
    from slm_llm.pipeline import RunPipeline

    prefix = tmp_path / "cmp"
    slm_llm("compare", "--config", "configs/tiny.yaml", "--methods", "olora,seq_lora", f"run_dir={prefix}",
            "data.max_train_samples=8", "eval.max_samples=4", "eval.max_new_tokens=2", "eval.views=paraphrase,fixed")
    run = Path(f"{prefix}-olora")
    m = json.loads((run / "eval" / "matrix.json").read_text())
    assert m["method"] == "olora" and m["tasks"] == TASKS
    for view in ("paraphrase", "fixed"):
        R = m["views"][view]["strict"]["R"]
        assert list(R) == ["olora"]
        assert [[v is not None for v in row] for row in R["olora"]] == [[True, False], [True, True]]  # a row per stage
    table = json.loads(Path(f"{prefix}-compare.json").read_text())
    cells = table["cells"]["paraphrase"]["strict"]
    assert list(cells) == ["olora", "seq_lora"] and table["runs"]["olora"] == str(run)
    R = m["views"]["paraphrase"]["strict"]["R"]["olora"]
    assert cells["olora"]["bwt"] == pytest.approx(R[1][0] - R[0][0])
    rows = [json.loads(x) for x in (run / "eval" / "predictions" / "paraphrase" / f"stage1-{TASKS[1]}.jsonl")
            .read_text().splitlines()]
    assert {r["mode"] for r in rows} == {"olora"} and all(r["slots"] == [0, 1] for r in rows)

    out = slm_llm("export", "--run", str(run))
    adapter = run / "tasks" / f"1-{TASKS[1]}" / "adapter"
    assert out.stdout.strip() == f"{TASKS[1]}: {adapter}"  # one adapter, in the last stage's folder
    assert not (run / "tasks" / f"0-{TASKS[0]}" / "adapter").exists()
    cfg = load_config(run / "run.yaml")
    conf = json.loads((adapter / "adapter_config.json").read_text())
    rank = len(TASKS) * cfg.jare.slots_per_task * cfg.jare.rank  # T*P*r
    assert conf["r"] == conf["lora_alpha"] == rank and conf["modules_to_save"] is None
    meta = check_adapter(adapter, json.loads((run / "manifest.json").read_text())["base_model"])
    assert meta["task"] == "olora" and meta["tasks"] == TASKS

    pipe = RunPipeline.load(run)
    ids = torch.randint(0, 49152, (2, 12))
    mask = torch.ones_like(ids)
    slot_ids, slot_weights = routing_tensors(pipe.route(_two_records(pipe), "olora"))
    with torch.no_grad():
        ours = pipe.model(ids, mask, slot_ids=slot_ids, slot_weights=slot_weights)
        base, _ = load_base_model(cfg.model)
        theirs = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids, attention_mask=mask).logits
        bare = pipe.model(ids, mask)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (ours - bare).abs().max() > 1e-3  # the adapter does something


def _two_records(pipe):
    from slm_llm.data import load_suite, load_task_split

    suite = load_suite(pipe.cfg.data.suite)
    return [load_task_split(suite, t, "test", None, 1, 0)[0] for t in TASKS]
