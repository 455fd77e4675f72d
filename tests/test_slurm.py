"""launch/slurm/train.sbatch on a real one-node SLURM cluster (slurmctld + slurmd + munged on localhost)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
VENV_BIN = Path(sys.executable).parent
LOSS_TOL = 2e-4
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("slurmctld") is None:
        if os.geteuid() != 0:
            pytest.skip("SLURM is not installed and installing it needs root (tests/slurm/cluster.sh install)")
        subprocess.run([str(CLUSTER), "install"], check=True, timeout=900)
    state = tmp_path_factory.mktemp("slurm")
    out = subprocess.run([str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "HF_HUB_OFFLINE": "1",
           "SLM_PYTHON": sys.executable, "TOKENIZERS_PARALLELISM": "false"}
    yield env
    subprocess.run([str(CLUSTER), "stop", str(state)], timeout=60)


def sbatch(env, out_file, *args, wait=True):
    cmd = ["sbatch", "--parsable", f"--output={out_file}", *(["--wait"] if wait else []),
           "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
           str(REPO / "launch/slurm/train.sbatch"), "--config", "configs/tiny.yaml", *args]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return res, res.stdout.strip().split(";")[0]


def job_field(env, job, field):
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((tok.split("=", 1)[1] for tok in out.split() if tok.startswith(field + "=")), None)


def diagnose(env, job, out_file):
    """The job's output, its scontrol record and the daemons' logs: what a failed assertion needs."""
    logs = Path(env["SLURM_CONF"]).parent / "log"
    show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    tails = [f"--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-25:]) for f in sorted(logs.glob("slurm*.log"))]
    return "\n".join([Path(out_file).read_text()[-3000:], show, *tails])


def losses(run, task_dir):
    rows = [json.loads(l) for l in (run / "tasks" / task_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def single_process(run, *args):
    cmd = [str(VENV_BIN / "slm-llm"), "train", "--config", "configs/tiny.yaml", f"run_dir={run}",
           "train.grad_accum=2", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_rank_job_completes_the_run_and_matches_one_process(slurm, tmp_path):
    run = tmp_path / "run"
    res, job = sbatch(slurm, tmp_path / "job.out", f"run_dir={run}")
    log = (tmp_path / "job.out").read_text()
    assert res.returncode == 0, res.stderr + log[-3000:]
    assert job_field(slurm, job, "JobState") == "COMPLETED"
    assert "2 ranks on 1 node(s)" in log
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done"
    for n, task in enumerate(manifest["order"]):
        for f in ("increments.safetensors", "keys.safetensors", "train_log.jsonl"):
            assert (run / "tasks" / f"{n}-{task}" / f).is_file()
    assert (run / "router" / "slots.json").is_file()
    single_process(tmp_path / "one")
    for n, task in enumerate(manifest["order"]):
        _, a = losses(run, f"{n}-{task}")
        _, b = losses(tmp_path / "one", f"{n}-{task}")
        assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < LOSS_TOL
    serve_job_answers(slurm, run, tmp_path, manifest["order"])


def serve_job_answers(env, run, tmp_path, tasks):
    """launch/slurm/serve.sbatch publishes an endpoint that serves the run's tasks."""
    import httpx

    res = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path / 'serve.out'}", "--cpus-per-task=1",
                          str(REPO / "launch/slurm/serve.sbatch"), str(run), "--backend", "hf"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    try:
        deadline = time.time() + 300
        endpoint = run / "serve_endpoint.txt"
        while time.time() < deadline and not endpoint.exists():
            time.sleep(0.5)
        port = endpoint.read_text().strip().rsplit(":", 1)[1].split("/")[0]
        url = f"http://127.0.0.1:{port}"
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        models = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
        assert set(tasks) | {"slm", "base"} <= models, models
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)


def test_signal_checkpoints_requeues_and_resumes(slurm, tmp_path):
    run = tmp_path / "run"
    args = [f"run_dir={run}", "data.tasks=[finance_phrasebank]", "data.max_train_samples=64",
            "train.max_steps=60", "train.ckpt_every=0"]
    res, job = sbatch(slurm, tmp_path / "job.out", *args, wait=False)
    assert res.returncode == 0, res.stderr
    log_file = run / "tasks" / "0-finance_phrasebank" / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log_file.exists() and len(log_file.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    while time.time() < deadline and job_field(slurm, job, "Restarts") == "0":
        time.sleep(1)
    assert job_field(slurm, job, "Restarts") == "1", diagnose(slurm, job, tmp_path / "job.out")
    # SLURM holds a requeued job back for cred_expire + 1 s (tests/slurm/cluster.sh sets 10 s):
    # starting it sooner fails it with "Job credential revoked".
    while time.time() < deadline and job_field(slurm, job, "JobState") != "COMPLETED":
        time.sleep(1)
    out = (tmp_path / "job.out").read_text()
    assert job_field(slurm, job, "JobState") == "COMPLETED", diagnose(slurm, job, tmp_path / "job.out")
    assert "checkpoint saved" in out and "requeueing job" in out and "(restart 1)" in out
    steps, got = losses(run, "0-finance_phrasebank")
    assert steps == list(range(1, 61))  # one uninterrupted log across the restart
    single_process(tmp_path / "one", *args[1:])
    _, ref = losses(tmp_path / "one", "0-finance_phrasebank")
    assert max(abs(x - y) for x, y in zip(got, ref)) < LOSS_TOL
