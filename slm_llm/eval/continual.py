"""Fill the continual-learning matrix of a run: one row per finished training stage.

After stage t the driver calls :func:`evaluate_after_task`. It scores, on each task's
test split (``eval.max_samples`` records, seeded), every task seen so far (plus the
next one with ``eval.fwt``), in every query view of ``eval.views`` (the records as a user
would send them: held-out phrasings, the input alone, or the dataset's instruction; see
``slm_llm.data.views``), strictly and leniently (``slm_llm.eval.metrics``), in each mode
the run's method has:

    slm run        "slm" (DTKR routing) and "oracle" (the true task's slots), plus the
                   routed task of every query (routing accuracy, confusion), plus
                   "base" (zero-shot, no increments) once per task
    seq_lora run   the shared adapter as it stands after stage t
    olora run      the sum of every task's LoRA as it stands after stage t (mode "olora")
    multitask run  one row after its single stage, over every suite task

A cell already in ``eval/matrix.json`` is not recomputed, so a resumed run (or a rerun
of ``slm-llm eval``) only fills what is missing. Nor is a generation that cannot change:
``eval/generations.jsonl`` caches each (prompt, slots, weights, budget) answer, and an
slm run's slots are frozen once trained, so a later row regenerates only the queries
whose routing moved (for a baseline's shared adapter the key also names the stage).
``slm-llm eval`` fills the row of the last finished stage; ``--all-rows`` every finished
stage's row, so a run trained with ``eval.during_training=false`` (or whose router was
refitted) still gets BWT and forgetting: an slm run's row t is routed by the router as it
stood after stage t (``Router.load(n_tasks=t + 1)``) over the run's frozen increments.
The matrix is rewritten atomically after every task; predictions go to
``eval/predictions/<view>/stage<t>-<task>.jsonl`` (``base-<task>.jsonl`` for zero-shot),
one line per (mode, record).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from slm_llm.config import Config, load_config
from slm_llm.data import Record, TaskSpec, load_suite, records_in_view, run_records
from slm_llm.eval.matrix import (SCORINGS, get_cell, load_matrix, metrics_of, new_matrix, new_view, save_matrix,
                                 set_cell, view_matrix)
from slm_llm.eval.metrics import OOD, answer_labels, extract, routing_accuracy, score
from slm_llm.run import RunDir, RunError
from slm_llm.utils.io import write_json, write_text

log = logging.getLogger("slm_llm.eval")


def evaluate_after_task(cfg: Config, run: RunDir, t: int) -> dict:
    """The driver's hook: load the run as it stands after stage ``t`` and fill row t."""
    from slm_llm.pipeline import RunPipeline

    pipe = RunPipeline.load(run.root)
    try:
        return evaluate_stage(pipe, cfg, run, t)
    finally:
        del pipe


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None, all_rows: bool = False) -> dict:
    """Fill the row of the run's last finished stage (``slm-llm eval``), or with ``all_rows`` every
    finished stage's row that has cells missing (an slm run: each row routed by the router of its
    stage); returns the matrix."""
    from slm_llm.pipeline import RunPipeline

    run = RunDir(run_dir)
    cfg = load_config(run.root / "run.yaml", overrides)
    last = len(run.done_tasks()) - 1
    m = load_matrix(run.eval_dir / "matrix.json")
    if m is not None:
        check_settings(m, cfg, run.eval_dir / "matrix.json")
    rows = [t for t in (range(last + 1) if all_rows else [last]) if m is None or missing_cells(m, cfg, t)]
    if not rows:
        return m
    pipe = RunPipeline.load(run.root, overrides)
    for t in rows:
        pipe.use_stage(t)
        m = evaluate_stage(pipe, cfg, run, t)
    return m


def modes_of(method: str) -> list[str]:
    return ["slm", "oracle"] if method == "slm" else [method]


def missing_cells(m: dict, cfg: Config, t: int) -> list[tuple[str, str, str]]:
    """(view, mode, task) cells of row ``t`` not yet in the matrix (oracle FWT cells never exist)."""
    method, tasks = m["method"], m["tasks"]
    out = []
    for view in cfg.eval.views:
        flat = view_matrix(m, view)
        for task in row_tasks(method, tasks, t, cfg.eval.fwt):
            i = tasks.index(task)
            out += [(view, md, task) for md in modes_of(method)
                    if get_cell(flat, md, t, i) is None and not (md == "oracle" and i > t)]
            if (method == "slm" or cfg.eval.fwt) and flat["base"][i] is None:
                out.append((view, "base", task))
    return out


def eval_settings(cfg: Config) -> dict:
    """What makes cells comparable: a matrix never mixes cells scored under other settings."""
    e, d = cfg.eval, cfg.data
    return {"max_samples": e.max_samples, "max_new_tokens": e.max_new_tokens,
            "max_new_tokens_open": e.max_new_tokens_open, "seed": d.seed, "phrasing_seed": d.phrasing_seed,
            "heldout_share": d.heldout_share, "eval_split": d.eval_split, "dev_samples": d.dev_samples}


def check_settings(m: dict, cfg: Config, path: Path) -> None:
    have = m.setdefault("settings", eval_settings(cfg))
    if have != eval_settings(cfg):
        raise RunError(f"{path}: cells were scored with {have}, not {eval_settings(cfg)}; "
                       "use the same eval.* settings, or move eval/ aside to start a new matrix")
    for view in cfg.eval.views:  # a view asked for later gets its own, empty, matrix
        m["views"].setdefault(view, new_view(len(m["tasks"]), len(m["stages"])))


def row_tasks(method: str, tasks: list[str], t: int, fwt: bool) -> list[str]:
    """The tasks evaluated after stage ``t``: all of them for multitask, else those seen so
    far plus (with ``fwt``) the next one."""
    if method == "multitask":
        return list(tasks)
    return list(tasks[: t + 2 if fwt else t + 1])


def evaluate_stage(pipe, cfg: Config, run: RunDir, t: int) -> dict:
    manifest = run.manifest()
    method, tasks, stages = manifest["method"], manifest["suite_tasks"], manifest["order"]
    done = run.done_tasks()
    if done != stages[: t + 1] and not (method == "slm" and done[: t + 1] == stages[: t + 1]
                                         and pipe.router.task_names == stages[: t + 1]):
        raise RunError(f"{run.manifest_path}: row {t} needs exactly stages {stages[: t + 1]} finished, "
                       f"found {done}; a later stage's model cannot stand in for stage {t}, except an slm "
                       f"run's routed by the router of stage {t} (slm-llm eval --all-rows)")
    suite = load_suite(cfg.data.suite)
    path = run.eval_dir / "matrix.json"
    m = load_matrix(path) or new_matrix(method, tasks, stages, cfg.eval.views)
    if m["tasks"] != tasks:  # the run was extended with new tasks: widen every row
        m = _widen(m, tasks, stages)
    check_settings(m, cfg, path)
    cache = GenerationCache(run.eval_dir / "generations.jsonl", "" if method == "slm" else f"stage{t}")
    seen = set(tasks[: t + 1]) if method != "multitask" else set(tasks)
    todo_cells = missing_cells(m, cfg, t)
    for task in row_tasks(method, tasks, t, cfg.eval.fwt):
        i = tasks.index(task)
        views = [v for v in cfg.eval.views if any(c[0] == v and c[2] == task for c in todo_cells)]
        if not views:
            continue
        spec = suite.tasks[task]
        sample = run_records(suite, task, "eval", cfg.data, cfg.eval.max_samples)
        for view in views:
            todo = [md for v, md, tk in todo_cells if v == view and tk == task]
            records = records_in_view(sample, spec, view, cfg.data)
            results, preds, routed = _run_modes(pipe, cfg, spec, records, todo, cache,
                                                desc=f"eval [{t + 1}] {task} ({view})")
            for scoring in SCORINGS:
                flat = view_matrix(m, view, scoring)
                for md, scores in results[scoring].items():
                    value = 100.0 * sum(scores) / len(scores)
                    if md == "base":
                        flat["base"][i] = round(value, 4)
                    else:
                        set_cell(flat, md, t, i, value)
            if routed is not None and task in seen:
                v = m["views"][view]
                conf = v["routing_confusion"][t] or {}
                conf[task] = {r: routed.count(r) for r in dict.fromkeys(routed)}
                v["routing_confusion"][t] = conf
                v["routing_accuracy"][t] = _row_accuracy(conf)
            _write_predictions(run, view, t, task, preds)
            log.info(f"eval stage {t} {task} ({view}): "
                     + ", ".join(f"{md} {100 * sum(s) / len(s):.1f}" for md, s in results["strict"].items()))
        m["samples"][task] = len(sample)
        save_matrix(path, m)
        write_json(run.eval_dir / "metrics.json", metrics_of(m))
    return m


def _widen(m: dict, tasks: list[str], stages: list[str]) -> dict:
    """The matrix of a run extended with new tasks: the same cells, more columns and rows."""
    old = list(m["tasks"])
    if tasks[: len(old)] != old:
        raise RunError(f"matrix tasks {old} are not a prefix of the run's tasks {tasks}")
    grow = len(tasks) - len(old)
    for v in m["views"].values():
        for scoring in SCORINGS:
            v[scoring]["base"] += [None] * grow
            for rows in v[scoring]["R"].values():
                for r in rows:
                    if r is not None:
                        r += [None] * grow
        v["routing_accuracy"] += [None] * (len(stages) - len(v["routing_accuracy"]))
        v["routing_confusion"] += [None] * (len(stages) - len(v["routing_confusion"]))
    m["tasks"], m["stages"] = list(tasks), list(stages)
    return m


def _row_accuracy(conf: dict[str, dict[str, int]]) -> float:
    routed = [r for true, c in conf.items() for r, n in c.items() for _ in range(n)]
    true = [true for true, c in conf.items() for _, n in c.items() for _ in range(n)]
    return round(100.0 * routing_accuracy(routed, true), 4)


def max_new_tokens(cfg: Config, spec: TaskSpec) -> int:
    """Closed answer sets need a few tokens; open answers (GSM8K reasoning, code) more."""
    return cfg.eval.max_new_tokens if answer_labels(spec) else cfg.eval.max_new_tokens_open


def _run_modes(pipe, cfg: Config, spec: TaskSpec, records: list[Record], modes: list[str], cache: GenerationCache,
               desc: str) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[dict]], list[str] | None]:
    """Per-sample scores (``{scoring: {mode: [score]}}``) and prediction rows of ``records`` in
    each mode, and the routed task of each record (slm runs; ``<ood>`` when the base answers)."""
    routings = {md: pipe.route_records(records, md) for md in modes}
    slm = routings.get("slm") if pipe.router is not None else None
    routed = None if slm is None else [OOD if r.decision is None else r.decision.task for r in slm]
    decisions = {md: [r.decision for r in rows] for md, rows in routings.items()}
    texts = generate_modes(pipe, pipe.prompts(records), decisions, max_new_tokens(cfg, spec), cfg.eval.batch_size,
                           cache, desc)
    results: dict[str, dict[str, list[float]]] = {s: {} for s in SCORINGS}
    preds: dict[str, list[dict]] = {}
    for md in modes:
        rows = []
        for j, (r, routing) in enumerate(zip(records, routings[md])):
            text, d = texts[md][j], routing.raw
            rows.append({"mode": md, "id": r.id, "query": r.instruction, "prediction": text,
                         "extracted": extract(spec, text), "gold": r.answer or r.output,
                         "score": score(spec, text, r), "lenient": score(spec, text, r, strict=False),
                         "routed_task": routed[j] if routed is not None and md == "slm" else (d and d.task),
                         "slots": None if routing.decision is None else list(routing.decision.slots),
                         "weights": None if routing.decision is None else [round(w, 4) for w in routing.decision.weights]})
        results["strict"][md] = [row["score"] for row in rows]
        results["lenient"][md] = [row["lenient"] for row in rows]
        preds[md] = rows
    return results, preds, routed


class GenerationCache:
    """Answers already generated for a run: ``(prompt, slots, weights, budget, adapter state) -> text``.

    One JSON line per answer, appended as soon as it exists, so an evaluation killed half-way
    keeps what it made. ``state`` names what else the answer depends on ("" for an slm run,
    whose slots never change once trained; the stage for a baseline's shared adapter)."""

    def __init__(self, path: Path, state: str = ""):
        self.path, self.state = Path(path), state
        self.texts: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                self.texts[row["key"]] = row["text"]

    def key(self, prompt: str, decision, max_new: int) -> str:
        sig = None if decision is None else [list(decision.slots), [round(w, 6) for w in decision.weights], self.state]
        return hashlib.sha256(json.dumps([prompt, sig, max_new]).encode()).hexdigest()

    def add(self, items: dict[str, str]) -> None:
        self.texts.update(items)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps({"key": k, "text": v}) + "\n" for k, v in items.items()))


def generate_modes(pipe, prompts: list[str], decisions: dict[str, list], max_new: int, batch_size: int,
                   cache: GenerationCache | None = None, desc: str = "generate") -> dict[str, list[str]]:
    """``{mode: [text per prompt]}``. A (prompt, slots, weights) triple shared by several modes
    is generated once (slm and oracle agree whenever routing is right; OOD rows are base rows),
    and never again when ``cache`` has it; prompts of similar length are batched together."""
    cache = cache or GenerationCache(Path(os.devnull))
    jobs: dict[str, tuple[int, object]] = {}  # cache key -> (prompt index, decision)
    for rows in decisions.values():
        for j, d in enumerate(rows):
            jobs.setdefault(cache.key(prompts[j], d, max_new), (j, d))
    keys = sorted((k for k in jobs if k not in cache.texts), key=lambda k: len(prompts[jobs[k][0]]))
    with tqdm(total=len(keys), desc=desc, unit="gen", dynamic_ncols=True, leave=False) as bar:
        for s in range(0, len(keys), batch_size):
            chunk = keys[s : s + batch_size]
            gens = pipe.generate([prompts[jobs[k][0]] for k in chunk], [jobs[k][1] for k in chunk], max_new, batch_size)
            cache.add({k: g.text for k, g in zip(chunk, gens)})
            bar.update(len(chunk))
    return {md: [cache.texts[cache.key(prompts[j], d, max_new)] for j, d in enumerate(rows)]
            for md, rows in decisions.items()}


def _write_predictions(run: RunDir, view: str, t: int, task: str, preds: dict[str, list[dict]]) -> None:
    folder = run.eval_dir / "predictions" / view
    for name, modes in ((f"stage{t}-{task}.jsonl", [md for md in preds if md != "base"]),
                        (f"base-{task}.jsonl", [md for md in preds if md == "base"])):
        if not modes:
            continue
        path = folder / name
        keep = []
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["mode"] not in modes]
        lines = keep + [json.dumps(row) for md in modes for row in preds[md]]
        write_text(path, "\n".join(lines) + "\n")
