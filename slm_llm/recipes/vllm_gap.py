"""How far served vLLM is from exact JARe: the same test queries through both, scored alike.

The exact (hf) side is the run's own final-row ``slm`` predictions, as ``slm-llm eval`` wrote
them under ``<run>/eval/predictions/<view>/``. The vLLM side sends the same prompts through
:func:`slm_llm.serve.vllm_offline.generate_offline`: each query routed by the run's router,
then answered by the adapter the vllm backend would pick (its slot set's, or its task's; one
``LoRARequest`` per prompt) or by the base model when flagged OOD. Both are
scored by ``eval.metrics.score``; the table is ``<run>/eval/vllm_gap.{json,md}``.

Call it from a ``__main__`` process (the ``slm-llm vllm-gap`` command): vLLM spawns its engine.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slm_llm.config import load_config
from slm_llm.data import load_suite, query_text, records_in_view, render_prompt, run_records
from slm_llm.eval.continual import max_new_tokens
from slm_llm.eval.metrics import score
from slm_llm.jare.export import slot_sets_served
from slm_llm.models import load_tokenizer
from slm_llm.run import RunDir, RunError
from slm_llm.serve.vllm_offline import generate_offline
from slm_llm.utils.io import write_json, write_text


def vllm_gap(run_dir: str | Path, overrides: list[str] | None = None, limit: int | None = None) -> dict[str, Any]:
    """Per view and task: exact JARe and vLLM strict scores (points), their gap, and the share
    of queries answered with the same text; AP of both per view. Written beside the matrix.
    ``limit``: only the first ``limit`` evaluated queries per task and view (vLLM on a small CPU
    serves a few seconds per query)."""
    if limit is not None and limit < 1:
        raise RunError(f"vllm-gap --limit must be at least 1, got {limit}")
    run = RunDir(run_dir)
    cfg = load_config(run.root / "run.yaml", overrides)
    manifest = run.manifest()
    order = manifest["order"]
    if run.done_tasks() != order:
        raise RunError(f"{run.manifest_path}: vllm-gap compares the finished run; done {run.done_tasks()} "
                       f"of {order}")
    last = len(order) - 1
    suite = load_suite(cfg.data.suite)
    tokenizer = load_tokenizer(cfg.model)
    rows, cells = [], []  # one vLLM request per (view, task, record); cells: (view, task, record, exact row)
    for view in cfg.eval.views:
        for task in order:
            spec = suite.tasks[task]
            exact = _exact_predictions(run, view, last, task)
            records = records_in_view(run_records(suite, task, "eval", cfg.data, cfg.eval.max_samples), spec, view,
                                      cfg.data)[:limit]
            for r in records:
                if r.id not in exact:
                    raise RunError(f"{run.eval_dir}/predictions/{view}/stage{last}-{task}.jsonl has no prediction "
                                   f"for record {r.id!r}: re-run `slm-llm eval --run {run.root}` with these eval "
                                   "settings")
                rows.append({"prompt": render_prompt(r, cfg.data.template, tokenizer), "query": query_text(r),
                             "max_tokens": max_new_tokens(cfg, spec)})
                cells.append((view, task, r, exact[r.id]))
    served = generate_offline(run.root, rows, overrides=overrides)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for (view, task, r, exact), out in zip(cells, served):
        spec = suite.tasks[task]
        text = out["text"].strip()
        c = table.setdefault(view, {}).setdefault(task, {"n": 0, "exact": 0.0, "vllm": 0.0, "same_text": 0.0})
        c["n"] += 1
        c["exact"] += exact["score"]
        c["vllm"] += score(spec, text, r)
        c["same_text"] += float(text == exact["prediction"])
    result: dict[str, Any] = {"run": str(run.root), "views": {}, "settings": {
        "slots_per_task": cfg.jare.slots_per_task, "top_k": cfg.jare.top_k, "slot_weights": cfg.jare.slot_weights,
        "max_samples": cfg.eval.max_samples, "limit": limit, "vllm_adapters": "slot sets" if slot_sets_served(cfg) else "tasks"}}
    for view, tasks in table.items():
        per_task = {task: {"n": c["n"], "exact": 100 * c["exact"] / c["n"], "vllm": 100 * c["vllm"] / c["n"],
                           "gap": 100 * (c["vllm"] - c["exact"]) / c["n"], "same_text": 100 * c["same_text"] / c["n"]}
                    for task, c in tasks.items()}
        ap = {k: sum(v[k] for v in per_task.values()) / len(per_task) for k in ("exact", "vllm")}
        result["views"][view] = {"per_task": per_task, "ap_exact": ap["exact"], "ap_vllm": ap["vllm"],
                                 "ap_gap": ap["vllm"] - ap["exact"]}
    write_json(run.eval_dir / "vllm_gap.json", result)
    write_text(run.eval_dir / "vllm_gap.md", gap_markdown(result))
    return result


def _exact_predictions(run: RunDir, view: str, stage: int, task: str) -> dict[str, dict]:
    path = run.eval_dir / "predictions" / view / f"stage{stage}-{task}.jsonl"
    if not path.is_file():
        raise RunError(f"{path} is missing: run `slm-llm eval --run {run.root}` (view {view}) first")
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["id"]: row for row in rows if row["mode"] == "slm"}


def gap_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    served = "each query's slot-set adapter" if s["vllm_adapters"] == "slot sets" else "the routed task's adapter"
    scope = "" if s.get("limit") is None else f", the first {s['limit']} queries per task and view"
    lines = [f"vLLM ({served}) against exact JARe (top-{s['top_k']} of "
             f"{s['slots_per_task']} slots per query, {s['slot_weights']} weights), strict scores in points, "
             f"final row{scope}.", "",
             "| view | task | n | exact JARe | vLLM | gap | same text % |", "|---|---|---|---|---|---|---|"]
    for view, v in result["views"].items():
        for task, c in v["per_task"].items():
            lines.append(f"| {view} | {task} | {c['n']} | {c['exact']:.1f} | {c['vllm']:.1f} | {c['gap']:+.1f} "
                         f"| {c['same_text']:.0f} |")
        lines.append(f"| {view} | **AP** | | **{v['ap_exact']:.1f}** | **{v['ap_vllm']:.1f}** | "
                     f"**{v['ap_gap']:+.1f}** | |")
    return "\n".join(lines) + "\n"
