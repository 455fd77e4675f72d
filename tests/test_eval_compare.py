"""End to end on the tiny model: `slm-llm compare` (every method), `eval` resume, `report`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slm_llm.eval.compare import headline
from slm_llm.eval.matrix import cl_metrics

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
METHODS = ["slm", "oracle", "seq_lora", "multitask", "base"]
SAMPLES = 4


def slm_llm(*args, timeout=300):
    out = subprocess.run([str(VENV_BIN / "slm-llm"), *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_compare_all_methods_then_report(tmp_path, data_root):
    prefix = tmp_path / "cmp"
    slm_llm("compare", "--config", "configs/tiny.yaml", "--methods", ",".join(METHODS), f"run_dir={prefix}",
            "data.max_train_samples=10", f"eval.max_samples={SAMPLES}", "eval.max_new_tokens=2")
    table = json.loads(Path(f"{prefix}-compare.json").read_text())
    assert table["views"] == ["paraphrase", "input-only", "fixed"]  # the headline view first
    cells = headline(table)
    assert list(cells) == METHODS
    md = Path(f"{prefix}-compare.md").read_text()
    assert md.startswith("Headline: the **paraphrase** view, strict scoring.")
    assert md.count("\n| slm |") == 1 + 3  # the AP-per-view summary, then one table per view
    tasks = table["tasks"]
    assert tasks == ["finance_phrasebank", "law_overruling"]
    for view in table["views"]:
        for scoring in ("strict", "lenient"):
            for method, row in table["cells"][view][scoring].items():
                assert all(0.0 <= row["scores"][t] <= 100.0 for t in tasks), (view, method)
                assert 0.0 <= row["ap"] <= 100.0
        for method in METHODS:  # strict never scores above lenient
            strict, lenient = (table["cells"][view][s][method]["ap"] for s in ("strict", "lenient"))
            assert strict <= lenient + 1e-9

    m = json.loads((Path(f"{prefix}-slm") / "eval" / "matrix.json").read_text())
    slm = m["views"]["paraphrase"]["strict"]
    assert [len([v for v in r if v is not None]) for r in slm["R"]["slm"]] == [1, 2]  # lower triangle
    assert [len([v for v in r if v is not None]) for r in slm["R"]["oracle"]] == [1, 2]
    assert all(v is not None for v in slm["base"]) and m["samples"] == {t: SAMPLES for t in tasks}
    routing = m["views"]["paraphrase"]["routing_accuracy"]
    assert all(0.0 <= a <= 100.0 for a in routing)
    assert cells["slm"]["routing_accuracy"] == routing[-1]
    assert cells["base"]["scores"] == dict(zip(tasks, slm["base"]))
    for view in table["views"]:  # what routing costs: the parts add up to slm − oracle, own-task routes cost 0
        cost, strict = table["routing_cost"][view], table["cells"][view]["strict"]
        assert cost["gap"] == pytest.approx(strict["slm"]["ap"] - strict["oracle"]["ap"], abs=1e-6)
        assert cost["parts"]["own"] == 0.0  # one slot rule: a right route gets the oracle's slots and weights
        assert sum(cost["shares"].values()) == pytest.approx(100.0)
    assert "Where slm loses to the oracle" in md

    seq_m = json.loads((Path(f"{prefix}-seq_lora") / "eval" / "matrix.json").read_text())
    seq = seq_m["views"]["paraphrase"]["strict"]["R"]["seq_lora"]
    assert len(seq) == 2 and seq[0][1] is None
    assert cells["seq_lora"]["bwt"] == pytest.approx(seq[1][0] - seq[0][0])
    assert cells["seq_lora"]["bwt"] == pytest.approx(cl_metrics(seq)["bwt"])
    multi_m = json.loads((Path(f"{prefix}-multitask") / "eval" / "matrix.json").read_text())
    multi = multi_m["views"]["paraphrase"]["strict"]["R"]["multitask"]
    assert len(multi) == 1 and None not in multi[0] and cells["multitask"]["bwt"] is None
    steps = {m: [t["steps"] for t in json.loads((Path(f"{prefix}-{m}") / "manifest.json").read_text())["tasks"].values()]
             for m in ("seq_lora", "multitask")}
    assert sum(steps["multitask"]) == sum(steps["seq_lora"]) > 0  # the upper bound trains as long as the others

    preds = Path(f"{prefix}-slm") / "eval" / "predictions" / "paraphrase" / "stage1-law_overruling.jsonl"
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert sorted(r["mode"] for r in rows) == ["oracle"] * SAMPLES + ["slm"] * SAMPLES
    manifest = json.loads((Path(f"{prefix}-slm") / "manifest.json").read_text())
    heldout = manifest["phrasings"]["law_overruling"]["heldout"]
    def worded_as(query, phrasing):
        return all(part.strip() in query for part in phrasing.split("{input}") if part.strip())

    assert all(any(worded_as(r["query"], h) for h in heldout) for r in rows)  # held-out wording only

    # every cell is there: `eval` recomputes nothing and leaves the matrix as it was
    matrix = Path(f"{prefix}-slm") / "eval" / "matrix.json"
    before = matrix.stat().st_mtime_ns
    slm_llm("eval", "--run", f"{prefix}-slm", f"eval.max_samples={SAMPLES}", "eval.max_new_tokens=2")
    assert matrix.stat().st_mtime_ns == before

    slm_llm("report", "--run", f"{prefix}-slm")  # finds <prefix>-compare.json beside the run
    out = Path(f"{prefix}-slm") / "eval"
    report = (out / "report.md").read_text()
    assert report.index("## The `paraphrase` view") < report.index("## The `input-only` view")
    for png in ("heatmap_slm.png", "heatmap_oracle.png", "heatmap_slm_input-only.png", "routing_confusion.png",
                "routing_confusion_fixed.png", "methods.png", "loss.png"):
        assert f"({png})" in report
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        assert matplotlib.image.imread(out / png).ndim == 3
    assert "| seq_lora |" in report


@pytest.mark.slow
def test_compare_over_seeds_writes_intervals_and_paired_differences(tmp_path, data_root):
    prefix = tmp_path / "sd"
    slm_llm("compare", "--config", "configs/tiny.yaml", "--methods", "slm,seq_lora,base", "--seeds", "0,1",
            "--query-view", "paraphrase,input-only", f"run_dir={prefix}", "data.max_train_samples=10",
            f"eval.max_samples={SAMPLES}", "eval.max_new_tokens=2", timeout=900)
    table = json.loads(Path(f"{prefix}-seeds.json").read_text())
    assert table["seeds"] == [0, 1] and table["views"] == ["paraphrase", "input-only"]
    for seed in (0, 1):  # every method once per seed, each seed its own runs
        cfg = __import__("yaml").safe_load(Path(f"{prefix}-s{seed}-slm/run.yaml").read_text())
        assert cfg["data"]["seed"] == cfg["train"]["seed"] == cfg["dtkr"]["seed"] == seed
    cell = table["cells"]["paraphrase"]["strict"]
    per_seed = [json.loads(Path(f"{prefix}-s{s}-compare.json").read_text())["cells"]["paraphrase"]["strict"]
                for s in (0, 1)]
    for m in ("slm", "seq_lora", "base"):
        aps = [t[m]["ap"] for t in per_seed]
        assert cell[m]["ap"]["mean"] == pytest.approx(np.mean(aps))
        assert cell[m]["ap"]["lo"] <= cell[m]["ap"]["mean"] <= cell[m]["ap"]["hi"]
    diff = cell["slm_minus"]["seq_lora"]
    assert diff["mean"] == pytest.approx(cell["slm"]["ap"]["mean"] - cell["seq_lora"]["ap"]["mean"])
    md = Path(f"{prefix}-seeds.md").read_text()
    assert "| slm − seq_lora |" in md and "### input-only, lenient" in md
    assert Path(f"{prefix}-seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_final_row_scores_each_seed_after_its_last_task_only(tmp_path, data_root):
    """`compare --final-row` (choosing on dev): each run's last row is scored, the earlier rows are
    not, so the seeds' table has AP and no BWT."""
    prefix = tmp_path / "fr"
    slm_llm("compare", "--config", "configs/tiny.yaml", "--methods", "slm,base", "--seeds", "0", "--final-row",
            "--query-view", "paraphrase", f"run_dir={prefix}", "data.eval_split=dev", "data.max_train_samples=10",
            "eval.max_samples=2", "eval.max_new_tokens=2", timeout=900)
    rows = json.loads(Path(f"{prefix}-s0-slm/eval/matrix.json").read_text())["views"]["paraphrase"]["strict"]["R"]
    assert rows["slm"][0] is None and rows["slm"][-1] is not None
    cell = json.loads(Path(f"{prefix}-seeds.json").read_text())["cells"]["paraphrase"]["strict"]["slm"]
    assert cell["ap"]["mean"] is not None and cell["bwt"] is None


@pytest.mark.slow
def test_learning_rates_are_picked_on_dev_then_used_on_test(tmp_path, data_root):
    """`compare --lr-grid`: one dev run per (method, rate) with data.eval_split=dev; each method's
    test run trains at the rate with the best dev AP (ties to the smaller rate), recorded."""
    import yaml

    prefix = tmp_path / "lr"
    slm_llm("compare", "--config", "configs/tiny.yaml", "--methods", "slm,seq_lora,base", "--lr-grid", "1e-2,1e-4",
            "--query-view", "paraphrase", f"run_dir={prefix}", "data.max_train_samples=10", "eval.max_samples=2",
            "eval.max_new_tokens=2", timeout=900)
    sel = json.loads(Path(f"{prefix}-lr.json").read_text())
    assert sel["grid"] == [1e-4, 1e-2] and set(sel["chosen"]) == {"slm", "seq_lora"}  # base is slm's mode
    for method, aps in sel["dev_ap"].items():
        best = max(aps.values())
        assert sel["chosen"][method] == min(float(lr) for lr, ap in aps.items() if ap == best)
        for lr in ("0.0001", "0.01"):
            dev = yaml.safe_load(Path(f"{prefix}-lr{lr}-{method}/run.yaml").read_text())
            assert dev["data"]["eval_split"] == "dev" and dev["train"]["lr"] == float(lr)
            rows = json.loads(Path(f"{prefix}-lr{lr}-{method}/eval/matrix.json").read_text())
            scored = rows["views"]["paraphrase"]["strict"]["R"][method]  # a dev run scores its final row only
            assert scored[0] is None and scored[-1] is not None
        test = yaml.safe_load(Path(f"{prefix}-{method}/run.yaml").read_text())
        assert test["data"]["eval_split"] == "test" and test["train"]["lr"] == sel["chosen"][method]
    assert "| chosen |" in Path(f"{prefix}-lr.md").read_text()
    assert "each task's dev sample" in Path(f"{prefix}-lr0.01-compare.md").read_text()
    assert "each task's test sample" in Path(f"{prefix}-compare.md").read_text()
    assert json.loads(Path(f"{prefix}-compare.json").read_text())["runs"]["seq_lora"] == f"{prefix}-seq_lora"
    test_rows = json.loads(Path(f"{prefix}-slm/eval/matrix.json").read_text())["views"]["paraphrase"]["strict"]["R"]
    assert all(row is not None for row in test_rows["slm"])  # the test run keeps every row (BWT)


@pytest.mark.slow
def test_with_seeds_the_learning_rate_is_picked_on_the_mean_dev_ap_over_them(tmp_path, data_root):
    """`compare --lr-grid --seeds`: one dev run per (rate, seed), each with that seed's data and
    phrasings; the rate with the best mean dev AP trains every seed's test run."""
    import yaml

    prefix = tmp_path / "lrs"
    slm_llm("compare", "--config", "configs/tiny.yaml", "--methods", "slm", "--lr-grid", "1e-2,1e-4", "--seeds", "0,1",
            "--query-view", "paraphrase", f"run_dir={prefix}", "data.max_train_samples=10", "eval.max_samples=3",
            "eval.max_new_tokens=2", timeout=900)
    sel = json.loads(Path(f"{prefix}-lr.json").read_text())
    assert sel["seeds"] == [0, 1]
    for lr in ("0.0001", "0.01"):
        aps = []
        for seed in (0, 1):
            dev = yaml.safe_load(Path(f"{prefix}-lr{lr}-s{seed}-slm/run.yaml").read_text())
            assert dev["data"]["eval_split"] == "dev" and dev["train"]["lr"] == float(lr)
            assert dev["data"]["seed"] == dev["train"]["seed"] == dev["dtkr"]["seed"] == seed
            table = json.loads(Path(f"{prefix}-lr{lr}-s{seed}-compare.json").read_text())
            aps.append(table["cells"]["paraphrase"]["strict"]["slm"]["ap"])
        assert sel["dev_ap_seeds"]["slm"][lr] == aps
        assert sel["dev_ap"]["slm"][lr] == pytest.approx(sum(aps) / 2)
    best = max(sel["dev_ap"]["slm"].values())
    assert sel["chosen"]["slm"] == min(float(lr) for lr, ap in sel["dev_ap"]["slm"].items() if ap == best)
    for seed in (0, 1):
        test = yaml.safe_load(Path(f"{prefix}-s{seed}-slm/run.yaml").read_text())
        assert test["data"]["eval_split"] == "test" and test["train"]["lr"] == sel["chosen"]["slm"]
    assert "mean ± sd over seeds 0, 1" in Path(f"{prefix}-lr.md").read_text()


def test_a_bad_learning_rate_grid_is_one_clear_line():
    out = subprocess.run([str(VENV_BIN / "slm-llm"), "compare", "--config", "configs/tiny.yaml", "--lr-grid", "1e-3,x"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--lr-grid takes comma-separated numbers" in out.stderr
    assert "Traceback" not in out.stderr
