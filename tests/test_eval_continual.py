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

    def route_records(self, records, mode="slm"):
        from slm_llm.pipeline import Routed

        if mode == "base":
            return [Routed(None, None)] * len(records)
        if self.router is None:  # a baseline's one shared adapter
            shared = RouteDecision([0], [1.0], "lora", 1.0, False, [1.0])
            return [Routed(shared, shared)] * len(records)
        out = []
        for j, r in enumerate(records):
            task = r.task if mode == "oracle" or len(self.tasks) == 1 or j % 4 else \
                next(t for t in self.tasks if t != r.task)
            task = task if task in self.tasks else self.tasks[0]
            d = RouteDecision(slots=[self.tasks.index(task)], weights=[1.0], task=task, score=1.0, ood=False,
                              scores=[1.0])
            out.append(Routed(d, d))
        return out

    def prompts(self, records):
        self.gold.update({f"{r.id}|{r.instruction}": r for r in records})
        return [f"{r.id}|{r.instruction}" for r in records]

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
                                            "eval.max_samples=8", "eval.views=paraphrase,fixed", *cfg_overrides])
    run = RunDir(cfg.run_dir)
    stages = ["multitask"] if method == "multitask" else TASKS
    run.init(cfg, "m", "e", stages, suite_tasks=TASKS)
    return cfg, run, stages


def finish(run, stage):
    run.task_dir(stage).mkdir(parents=True, exist_ok=True)
    run.mark_task_done(stage, {})


def test_slm_rows_oracle_base_fwt_and_routing(tmp_path, data_root, monkeypatch):
    from slm_llm.eval.matrix import view_matrix

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    cfg, run, _ = make_run(tmp_path, "slm", ["eval.fwt=true"])
    finish(run, TASKS[0])
    m = evaluate_stage(ScriptedPipe(TASKS[:1], TASKS[:1]), cfg, run, 0)
    assert list(m["views"]) == ["paraphrase", "fixed"]
    for view in m["views"]:
        flat = view_matrix(m, view)
        assert flat["R"]["slm"] == [[100.0, 0.0]]  # FWT cell: law routed to finance's slots -> wrong
        assert flat["R"]["oracle"] == [[100.0, None]]  # no oracle for an unseen task
        assert flat["base"] == [0.0, 0.0]
        assert flat["routing_accuracy"] == [100.0, None]
    finish(run, TASKS[1])
    pipe = ScriptedPipe(TASKS, TASKS)
    m = evaluate_stage(pipe, cfg, run, 1)
    flat = view_matrix(m, "paraphrase")
    # every 4th record of each task (2 of 8) is routed to the other task
    assert flat["R"]["slm"][1] == [75.0, 75.0] and flat["R"]["oracle"][1] == [100.0, 100.0]
    assert flat["routing_accuracy"][1] == 75.0
    assert flat["routing_confusion"][1]["law_overruling"] == {"finance_phrasebank": 2, "law_overruling": 6}
    assert view_matrix(m, "paraphrase", "lenient")["R"]["slm"][1] == [75.0, 75.0]
    # Per view, only answers never generated before: finance's stage-0 answers are cached (its slots are
    # frozen), so just its 2 rows now misrouted to law; law's 8 on its own slots (its 2 misrouted rows got
    # finance's slots, cached from the stage-0 FWT cell)
    assert pipe.calls == 2 * (2 + 8)
    metrics = json.loads((run.eval_dir / "metrics.json").read_text())["paraphrase"]["strict"]
    assert metrics["slm"]["bwt"] == pytest.approx(-25.0) and metrics["slm"]["fwt"] == pytest.approx(0.0)
    assert metrics["oracle"]["bwt"] == 0.0 and metrics["oracle"]["ap"] == 100.0
    lines = (run.eval_dir / "predictions" / "paraphrase" / "stage1-law_overruling.jsonl").read_text().splitlines()
    assert sorted({json.loads(x)["mode"] for x in lines}) == ["oracle", "slm"] and len(lines) == 16
    queries = {json.loads(x)["query"] for x in lines}
    assert not any("Does the following sentence from a U.S. judicial opinion" in q for q in queries)  # not fixed
    # resume: nothing is missing, nothing is recomputed
    assert missing_cells(m, cfg, 1) == []
    again = ScriptedPipe(TASKS, TASKS)
    assert evaluate_stage(again, cfg, run, 1) == m and again.calls == 0
    # a view asked for later is filled without touching the others
    cfg.eval.views = ["paraphrase", "fixed", "input-only"]
    late = ScriptedPipe(TASKS, TASKS)
    m = evaluate_stage(late, cfg, run, 1)
    assert view_matrix(m, "input-only")["R"]["slm"] == [None, [75.0, 75.0]]
    assert late.calls == 2 * (8 + 2 + 8)  # per task: its own slots, 2 misrouted, and the base
    # cells scored on 8 samples are never mixed with cells scored on 6
    from slm_llm.run import RunError

    cfg.eval.max_samples = 6
    with pytest.raises(RunError, match="max_samples"):
        evaluate_stage(again, cfg, run, 1)


def test_seq_lora_forgets_and_multitask_has_one_row(tmp_path, data_root, monkeypatch):
    from slm_llm.eval.matrix import view_matrix

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    cfg, run, _ = make_run(tmp_path, "seq_lora")
    for t, task in enumerate(TASKS):
        finish(run, task)
        pipe = ScriptedPipe(TASKS, [task], router=False)
        m = evaluate_stage(pipe, cfg, run, t)
    assert pipe.calls == 2 * 2 * 8  # the shared adapter changed: no cached answer from stage 0 is reused
    flat = view_matrix(m, "paraphrase")
    assert flat["R"] == {"seq_lora": [[100.0, None], [0.0, 100.0]]}
    assert flat["base"] == [None, None]  # zero-shot only for slm runs (or with eval.fwt)
    metrics = json.loads((run.eval_dir / "metrics.json").read_text())["paraphrase"]["strict"]["seq_lora"]
    assert metrics == {"ap": 50.0, "bwt": -100.0, "forgetting": 100.0, "fwt": None, "n_bwt": 1, "n_fwt": 0}

    cfg, run, stages = make_run(tmp_path, "multitask")
    finish(run, stages[0])
    m = evaluate_stage(ScriptedPipe(TASKS, TASKS, router=False), cfg, run, 0)
    assert view_matrix(m, "fixed")["R"] == {"multitask": [[100.0, 100.0]]}


def test_extending_a_run_evaluates_the_new_tasks(tmp_path, data_root, monkeypatch):
    """A run continued on a new task widens its matrix and scores the new task (it is not left out)."""
    from slm_llm.eval.matrix import view_matrix

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'ext'}", "eval.max_samples=4", "eval.views=fixed"])
    run = RunDir(cfg.run_dir)
    run.init(cfg, "m", "e", TASKS[:1], suite_tasks=TASKS[:1])
    finish(run, TASKS[0])
    evaluate_stage(ScriptedPipe(TASKS[:1], TASKS[:1]), cfg, run, 0)
    cfg.data.tasks = list(TASKS)
    run.init(cfg, "m", "e", TASKS, suite_tasks=TASKS)
    assert run.manifest()["suite_tasks"] == TASKS
    finish(run, TASKS[1])
    m = evaluate_stage(ScriptedPipe(TASKS, TASKS), cfg, run, 1)
    flat = view_matrix(m, "fixed")
    assert m["tasks"] == TASKS and flat["R"]["slm"][0] == [100.0, None]
    assert flat["R"]["oracle"][1] == [100.0, 100.0] and flat["base"][1] == 0.0


def test_resume_with_changed_settings_is_refused_naming_the_key(tmp_path):
    from slm_llm.run import RunError

    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'r'}"])
    run = RunDir(cfg.run_dir)
    run.init(cfg, "m", "e", TASKS)
    for key, value in [("train.method", "seq_lora"), ("dtkr.whiten", True), ("data.template", "alpaca"),
                       ("data.input_only_share", 0.5)]:
        changed = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'r'}", f"{key}={value}"])
        with pytest.raises(RunError, match=key.replace(".", r"\.") + " was"):
            run.init(changed, "m", "e", TASKS)
    # settings that do not shape the artifacts may change
    ok = load_config("configs/tiny.yaml", [f"run_dir={tmp_path / 'r'}", "train.ckpt_every=7", "eval.max_samples=3",
                                           "dtkr.encode_batch_size=8"])
    run.init(ok, "m", "e", TASKS)


def test_a_row_needs_exactly_its_stages(tmp_path, data_root, monkeypatch):
    from slm_llm.run import RunError

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parent.parent)
    cfg, run, _ = make_run(tmp_path, "seq_lora")
    finish(run, TASKS[0])
    finish(run, TASKS[1])
    with pytest.raises(RunError, match="row 0"):
        evaluate_stage(ScriptedPipe(TASKS, TASKS, router=False), cfg, run, 0)
