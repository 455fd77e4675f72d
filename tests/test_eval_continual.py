"""The matrix filler with a scripted pipeline: rows, modes, base, FWT cells, resume, routing."""
import json

import pytest

from slm_llm.config import load_config
from slm_llm.dtkr import RouteDecision
from slm_llm.eval.continual import evaluate_stage, missing_cells
from slm_llm.run import RunDir

TASKS = ["finance_phrasebank", "law_overruling"]


class ScriptedPipe:
    """Answers a record right iff it is routed to its own task (or the shared adapter) and the
    model still "knows" that task;
    routes every 4th record of a known task to the other task when two are loaded."""

    def __init__(self, tasks, knows, router=True):
        self.tasks, self.knows, self.calls = list(tasks), set(knows), 0
        self.router = self if router else None
        self.encoder = self
        self.gold = {}

    # the pipeline's API
    def queries(self, records):
        return records

    def encode(self, records):
        return records

    def route(self, records, mode="slm", restrict_task=None):
        if mode == "base":
            return [None] * len(records)
        if self.router is None:  # a baseline's one shared adapter
            return [RouteDecision([0], [1.0], "lora", 1.0, False, [1.0])] * len(records)
        out = []
        for j, r in enumerate(records):
            task = r.task if mode == "oracle" or len(self.tasks) == 1 or j % 4 else \
                next(t for t in self.tasks if t != r.task)
            task = task if task in self.tasks else self.tasks[0]
            out.append(RouteDecision(slots=[self.tasks.index(task)], weights=[1.0], task=task, score=1.0,
                                     ood=False, scores=[1.0]))
        return out

    def prompts(self, records):
        self.gold.update({r.id: r for r in records})
        return [r.id for r in records]

    def generate(self, prompts, decisions, max_new_tokens, batch_size=None):
        from slm_llm.pipeline import Generation

        self.calls += len(prompts)
        out = []
        for p, d in zip(prompts, decisions):
            r = self.gold[p]
            right = d is not None and d.task in (r.task, "lora") and r.task in self.knows
            out.append(Generation(r.answer if right else "zzz", d, 1))
        return out


def make_run(tmp_path, method, cfg_overrides=()):
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / method}", f"train.method={method}",
                                            "eval.max_samples=8", *cfg_overrides])
    run = RunDir(cfg.run_dir)
    stages = ["multitask"] if method == "multitask" else TASKS
    run.init(cfg, "m", "e", stages, suite_tasks=TASKS)
    return cfg, run, stages


def finish(run, stage):
    run.task_dir(stage).mkdir(parents=True, exist_ok=True)
    run.mark_task_done(stage, {})


def test_slm_rows_oracle_base_fwt_and_routing(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    cfg, run, _ = make_run(tmp_path, "slm", ["eval.fwt=true"])
    finish(run, TASKS[0])
    m = evaluate_stage(ScriptedPipe(TASKS[:1], TASKS[:1]), cfg, run, 0)
    assert m["R"]["slm"] == [[100.0, 0.0]]  # FWT cell: law routed to finance's slots -> wrong
    assert m["R"]["oracle"] == [[100.0, None]]  # no oracle for an unseen task
    assert m["base"] == [0.0, 0.0]
    assert m["routing_accuracy"] == [100.0, None]
    finish(run, TASKS[1])
    pipe = ScriptedPipe(TASKS, TASKS)
    m = evaluate_stage(pipe, cfg, run, 1)
    # every 4th record of each task (2 of 8) is routed to the other task
    assert m["R"]["slm"][1] == [75.0, 75.0] and m["R"]["oracle"][1] == [100.0, 100.0]
    assert m["routing_accuracy"][1] == 75.0
    assert m["routing_confusion"][1]["law_overruling"] == {"finance_phrasebank": 2, "law_overruling": 6}
    # slm and oracle agree on 6 of 8 rows per task: 2 x (8 + 2) generations, base not redone
    assert pipe.calls == 2 * (8 + 2)
    metrics = json.loads((run.eval_dir / "metrics.json").read_text())
    assert metrics["slm"]["bwt"] == pytest.approx(-25.0) and metrics["slm"]["fwt"] == pytest.approx(0.0)
    assert metrics["oracle"]["bwt"] == 0.0 and metrics["oracle"]["ap"] == 100.0
    lines = (run.eval_dir / "predictions" / "stage1-law_overruling.jsonl").read_text().splitlines()
    assert sorted({json.loads(x)["mode"] for x in lines}) == ["oracle", "slm"] and len(lines) == 16
    # resume: nothing is missing, nothing is recomputed
    assert missing_cells(m, cfg, 1) == []
    again = ScriptedPipe(TASKS, TASKS)
    assert evaluate_stage(again, cfg, run, 1) == m and again.calls == 0
    # cells scored on 8 samples are never mixed with cells scored on 6
    from slm_llm.run import RunError

    cfg.eval.max_samples = 6
    with pytest.raises(RunError, match="max_samples"):
        evaluate_stage(again, cfg, run, 1)


def test_seq_lora_forgets_and_multitask_has_one_row(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    cfg, run, _ = make_run(tmp_path, "seq_lora")
    for t, task in enumerate(TASKS):
        finish(run, task)
        m = evaluate_stage(ScriptedPipe(TASKS, [task], router=False), cfg, run, t)
    assert m["R"] == {"seq_lora": [[100.0, None], [0.0, 100.0]]}
    assert m["base"] == [None, None]  # zero-shot only for slm runs (or with eval.fwt)
    metrics = json.loads((run.eval_dir / "metrics.json").read_text())["seq_lora"]
    assert metrics == {"ap": 50.0, "bwt": -100.0, "forgetting": 100.0, "fwt": None}

    cfg, run, stages = make_run(tmp_path, "multitask")
    finish(run, stages[0])
    m = evaluate_stage(ScriptedPipe(TASKS, TASKS, router=False), cfg, run, 0)
    assert m["R"] == {"multitask": [[100.0, 100.0]]}


def test_a_row_needs_exactly_its_stages(tmp_path, data_root, monkeypatch):
    from slm_llm.run import RunError

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    cfg, run, _ = make_run(tmp_path, "seq_lora")
    finish(run, TASKS[0])
    finish(run, TASKS[1])
    with pytest.raises(RunError, match="row 0"):
        evaluate_stage(ScriptedPipe(TASKS, TASKS, router=False), cfg, run, 0)
