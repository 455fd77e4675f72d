"""Fill the continual-learning matrix of a run: one row per finished training stage.

After stage t the driver calls :func:`evaluate_after_task`. It scores, on each task's
test split (``eval.max_samples`` records, seeded), every task seen so far (plus the
next one with ``eval.fwt``), in each mode the run's method has:

    slm run        "slm" (DTKR routing) and "oracle" (the true task's slots), plus the
                   routed task of every query (routing accuracy, confusion), plus
                   "base" (zero-shot, no increments) once per task
    seq_lora run   the shared adapter as it stands after stage t
    multitask run  one row after its single stage, over every suite task

A cell already in ``eval/matrix.json`` is not recomputed, so a resumed run (or a rerun
of ``slm-llm eval``) only fills what is missing. The matrix is rewritten atomically
after every task; predictions go to ``eval/predictions/stage<t>-<task>.jsonl``
(``base-<task>.jsonl`` for zero-shot), one line per (mode, record).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from slm_llm.config import Config, load_config
from slm_llm.data import Record, TaskSpec, load_suite, load_task_split
from slm_llm.eval.matrix import get_cell, load_matrix, metrics_of, new_matrix, save_matrix, set_cell
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


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """Fill the row of the run's last finished stage (``slm-llm eval``); returns the matrix."""
    from slm_llm.pipeline import RunPipeline

    run = RunDir(run_dir)
    cfg = load_config(run.root / "run.yaml", overrides)
    t = len(run.done_tasks()) - 1
    m = load_matrix(run.eval_dir / "matrix.json")
    if m is not None:
        check_settings(m, cfg, run.eval_dir / "matrix.json")
        if not missing_cells(m, cfg, t):
            return m
    pipe = RunPipeline.load(run.root, overrides)
    return evaluate_stage(pipe, cfg, run, t)


def missing_cells(m: dict, cfg: Config, t: int) -> list[tuple[str, str]]:
    """(mode, task) cells of row ``t`` not yet in the matrix (oracle FWT cells never exist)."""
    method, tasks = m["method"], m["tasks"]
    modes = ["slm", "oracle"] if method == "slm" else [method]
    out = []
    for task in row_tasks(method, tasks, t, cfg.eval.fwt):
        i = tasks.index(task)
        out += [(md, task) for md in modes if get_cell(m, md, t, i) is None and not (md == "oracle" and i > t)]
        if (method == "slm" or cfg.eval.fwt) and m["base"][i] is None:
            out.append(("base", task))
    return out


def eval_settings(cfg: Config) -> dict:
    """What makes cells comparable: a matrix never mixes cells scored under other settings."""
    e = cfg.eval
    return {"max_samples": e.max_samples, "max_new_tokens": e.max_new_tokens,
            "max_new_tokens_open": e.max_new_tokens_open, "seed": cfg.data.seed}


def check_settings(m: dict, cfg: Config, path: Path) -> None:
    have = m.setdefault("settings", eval_settings(cfg))
    if have != eval_settings(cfg):
        raise RunError(f"{path}: cells were scored with {have}, not {eval_settings(cfg)}; "
                       "use the same eval.* settings, or move eval/ aside to start a new matrix")


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
    if done != stages[: t + 1]:
        raise RunError(f"{run.manifest_path}: row {t} needs exactly stages {stages[: t + 1]} finished, "
                       f"found {done}; a later stage's model cannot stand in for stage {t}")
    suite = load_suite(cfg.data.suite)
    path = run.eval_dir / "matrix.json"
    m = load_matrix(path) or new_matrix(method, tasks, stages)
    check_settings(m, cfg, path)
    modes = ["slm", "oracle"] if method == "slm" else [method]
    seen = set(tasks[: t + 1]) if method != "multitask" else set(tasks)
    for task in row_tasks(method, tasks, t, cfg.eval.fwt):
        i = tasks.index(task)
        todo = [md for md in modes if get_cell(m, md, t, i) is None and not (md == "oracle" and task not in pipe.tasks)]
        want_base = (method == "slm" or cfg.eval.fwt) and m["base"][i] is None
        if not todo and not want_base:
            continue
        records = load_task_split(suite, task, "test", cfg.data.data_root or None, cfg.eval.max_samples, cfg.data.seed)
        if want_base:
            todo.append("base")
        results, preds, routed = _run_modes(pipe, cfg, suite.tasks[task], records, todo, desc=f"eval [{t + 1}] {task}")
        for md, scores in results.items():
            value = 100.0 * sum(scores) / len(scores)
            if md == "base":
                m["base"][i] = round(value, 4)
            else:
                set_cell(m, md, t, i, value)
        m["samples"][task] = len(records)
        if routed is not None and task in seen:
            conf = m["routing_confusion"][t] or {}
            conf[task] = {r: routed.count(r) for r in dict.fromkeys(routed)}
            m["routing_confusion"][t] = conf
            m["routing_accuracy"][t] = _row_accuracy(conf)
        save_matrix(path, m)
        write_json(run.eval_dir / "metrics.json", metrics_of(m))
        _write_predictions(run, t, task, preds)
        log.info(f"eval stage {t} {task}: "
                 + ", ".join(f"{md} {100 * sum(s) / len(s):.1f}" for md, s in results.items()))
    return m


def _row_accuracy(conf: dict[str, dict[str, int]]) -> float:
    routed = [r for true, c in conf.items() for r, n in c.items() for _ in range(n)]
    true = [true for true, c in conf.items() for _, n in c.items() for _ in range(n)]
    return round(100.0 * routing_accuracy(routed, true), 4)


def max_new_tokens(cfg: Config, spec: TaskSpec) -> int:
    """Closed answer sets need a few tokens; open answers (GSM8K reasoning, code) more."""
    return cfg.eval.max_new_tokens if answer_labels(spec) else cfg.eval.max_new_tokens_open


def _run_modes(pipe, cfg: Config, spec: TaskSpec, records: list[Record], modes: list[str], desc: str
               ) -> tuple[dict[str, list[float]], dict[str, list[dict]], list[str] | None]:
    """Per-sample scores and prediction rows of ``records`` in each mode, and the routed task
    of each record (slm runs). Rows whose decision (slots and weights) is the same in
    two modes are generated once: slm and oracle agree whenever routing is right."""
    decisions = {md: pipe.route(records, md) for md in modes}
    routed = None
    if "slm" in modes and pipe.router is not None:
        raw = pipe.router.route(pipe.encoder.encode(pipe.queries(records)))
        routed = [OOD if (d.ood and cfg.serve.ood_fallback) else d.task for d in raw]
    texts = generate_modes(pipe, pipe.prompts(records), decisions, max_new_tokens(cfg, spec), cfg.eval.batch_size, desc)
    results: dict[str, list[float]] = {}
    preds: dict[str, list[dict]] = {}
    for md in modes:
        rows = []
        for j, (r, d) in enumerate(zip(records, decisions[md])):
            text = texts[md][j]
            rows.append({"mode": md, "id": r.id, "prediction": text, "extracted": extract(spec, text),
                         "gold": r.answer or r.output, "score": score(spec, text, r),
                         "routed_task": None if d is None else d.task,
                         "slots": None if d is None else list(d.slots),
                         "weights": None if d is None else [round(w, 4) for w in d.weights]})
            if routed is not None and md == "slm":
                rows[-1]["routed_task"] = routed[j]
        results[md] = [row["score"] for row in rows]
        preds[md] = rows
    return results, preds, routed


def generate_modes(pipe, prompts: list[str], decisions: dict[str, list], max_new: int, batch_size: int,
                   desc: str = "generate") -> dict[str, list[str]]:
    """``{mode: [text per prompt]}``. A (prompt, slots, weights) triple shared by several modes
    is generated once (slm and oracle agree whenever routing is right; OOD rows are base rows);
    prompts of similar length are batched together."""
    jobs: dict[tuple, tuple[int, object]] = {}  # decision signature -> (prompt index, decision)
    for rows in decisions.values():
        for j, d in enumerate(rows):
            jobs.setdefault(_signature(j, d), (j, d))
    keys = sorted(jobs, key=lambda k: len(prompts[jobs[k][0]]))
    texts: dict[tuple, str] = {}
    with tqdm(total=len(keys), desc=desc, unit="gen", dynamic_ncols=True, leave=False) as bar:
        for s in range(0, len(keys), batch_size):
            chunk = keys[s : s + batch_size]
            gens = pipe.generate([prompts[jobs[k][0]] for k in chunk], [jobs[k][1] for k in chunk], max_new, batch_size)
            texts.update({k: g.text for k, g in zip(chunk, gens)})
            bar.update(len(chunk))
    return {md: [texts[_signature(j, d)] for j, d in enumerate(rows)] for md, rows in decisions.items()}


def _signature(j: int, d) -> tuple:
    if d is None:
        return (j, None)
    return (j, tuple(d.slots), tuple(round(w, 6) for w in d.weights))


def _write_predictions(run: RunDir, t: int, task: str, preds: dict[str, list[dict]]) -> None:
    folder = run.eval_dir / "predictions"
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
