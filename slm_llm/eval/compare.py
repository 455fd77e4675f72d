"""The comparison table of methods side by side (``slm_llm.recipes.compare`` runs them).

    slm        JARe + DTKR, routed per query          run <run_dir>-slm
    oracle     the slm run with the true task's slots (the routing upper bound)
    base       the slm run with no increments (zero-shot)
    seq_lora   one LoRA trained through the tasks     run <run_dir>-seq_lora
    multitask  one LoRA trained on all tasks at once  run <run_dir>-multitask
    olora      a LoRA per task, orthogonal (O-LoRA)   run <run_dir>-olora (all summed: no task id)

The table (``<run_dir>-compare.{json,md}``) holds each method's final per-task scores, AP,
BWT, forgetting, FWT and routing accuracy, per query view and scoring, from the runs' CL matrices;
with slm and oracle, what routing costs (``slm_llm.eval.routing_cost``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from slm_llm.config import Config, ConfigError
from slm_llm.eval.matrix import SCORINGS, final_row, load_matrix, metrics_or_reason, view_matrix
from slm_llm.eval.routing_cost import routing_cost, routing_cost_markdown
from slm_llm.eval.stats import format_mean_sd, mean_sd
from slm_llm.run import RunDir, RunError

COMPARE_METHODS = ("slm", "oracle", "seq_lora", "multitask", "base", "olora")  # trained methods + inference modes
TRAINED_BY = {"slm": "slm", "oracle": "slm", "base": "slm", "seq_lora": "seq_lora", "multitask": "multitask",
              "olora": "olora"}


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: {unknown or text!r} not in {', '.join(COMPARE_METHODS)}")
    return methods


def run_dir_of(cfg: Config, method: str) -> Path:
    return Path(f"{cfg.run_dir}-{TRAINED_BY[method]}")


def method_config(cfg: Config, method: str, every_row: bool = True) -> Config:
    """The config of one training method's run: same everything, its own method and folder,
    evaluated after every task (``every_row``: the matrix for BWT) or after the last one only."""
    c = copy.deepcopy(cfg)
    c.train.method = method
    c.run_dir = str(run_dir_of(cfg, method))
    c.eval.during_training = every_row
    return c


def build_table(cfg: Config, methods: list[str]) -> dict[str, Any]:
    """The table from the runs' matrices: ``{"tasks", "views", "eval_split", "cells": {view: {scoring: {method:
    {scores, ap, bwt, forgetting, fwt, routing_accuracy}}}}, "runs"}``; the first view is the headline."""
    views = list(cfg.eval.views)
    table: dict[str, Any] = {"tasks": None, "views": views, "eval_split": cfg.data.eval_split,
                             "cells": {v: {s: {} for s in SCORINGS} for v in views}, "runs": {}}
    for method in methods:
        run = RunDir(run_dir_of(cfg, method))
        m = load_matrix(run.eval_dir / "matrix.json")
        if m is None:
            raise RunError(f"{run.eval_dir / 'matrix.json'}: no matrix for {method}; train/evaluate it first")
        table["tasks"] = table["tasks"] or m["tasks"]
        if m["tasks"] != table["tasks"]:
            raise ConfigError(f"{run.root}: tasks {m['tasks']} differ from {table['tasks']}; compare needs one suite")
        for view in views:
            for scoring in SCORINGS:
                table["cells"][view][scoring][method] = method_cells(view_matrix(m, view, scoring), method)
        table["runs"][method] = str(run.root)
    if {"slm", "oracle"} <= set(methods):
        table["routing_cost"] = {v: routing_cost(run_dir_of(cfg, "slm"), v) for v in views}
    return table


def method_cells(flat: dict[str, Any], method: str) -> dict[str, Any]:
    """One method's final per-task scores and CL metrics from one view of its run's matrix."""
    if method == "base":
        row, metrics = flat["base"], {"ap": _mean(flat["base"]), "bwt": None, "forgetting": None, "fwt": None,
                                      "n_bwt": 0, "n_fwt": 0}
    else:
        # a run scored on its final row only (choosing on dev) has AP and no BWT, with the reason
        row, metrics = final_row(flat, method), metrics_or_reason(flat["R"].get(method, []), flat.get("base"))
    acc = [a for a in flat.get("routing_accuracy", []) if a is not None]
    return {"scores": dict(zip(flat["tasks"], row or [None] * len(flat["tasks"]))), **metrics,
            "routing_accuracy": (acc[-1] if acc else None) if method == "slm" else None}


def headline(table: dict[str, Any], scoring: str = "strict") -> dict[str, Any]:
    """``{method: cells}`` of the headline (first) view."""
    return table["cells"][table["views"][0]][scoring]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def table_markdown(table: dict[str, Any]) -> str:
    """AP per query view side by side (strict; lenient beside it), then each view's per-task table."""
    tasks, views = table["tasks"], table["views"]
    methods = list(headline(table))
    cols = ["method", *(f"AP {v}" for v in views), *(f"AP {v} (lenient)" for v in views),
            f"BWT ({views[0]})", *(f"routing {v}" for v in views)]
    lines = [f"Headline: the **{views[0]}** view, strict scoring. AP per query view (points, 0-100); routing is the "
             "share of queries served by their own task's increments (right task, not flagged OOD).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for method in methods:
        strict = [table["cells"][v]["strict"][method] for v in views]
        lenient = [table["cells"][v]["lenient"][method] for v in views]
        cells = [method, *(_fmt(c["ap"]) for c in strict), *(_fmt(c["ap"]) for c in lenient), _fmt(strict[0]["bwt"]),
                 *(_fmt(c["routing_accuracy"]) for c in strict)]
        lines.append("| " + " | ".join(cells) + " |")
    for view in views:
        cols = ["method", *tasks, "AP", "BWT", "forgetting", "FWT", "routing"]
        lines += ["", f"**{view}** view, strict: final scores on each task's {table.get('eval_split', 'test')} sample "
                  "after the last stage.", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for method, r in table["cells"][view]["strict"].items():
            cells = [method, *(_fmt(r["scores"][t]) for t in tasks), _fmt(r["ap"]), _fmt(r["bwt"]),
                     _fmt(r["forgetting"]), _fmt(r["fwt"]), _fmt(r["routing_accuracy"])]
            lines.append("| " + " | ".join(cells) + " |")
    if "routing_cost" in table:
        lines += ["", routing_cost_markdown(table["routing_cost"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def lr_markdown(result: dict[str, Any]) -> str:
    """The learning-rate grid of :func:`slm_llm.recipes.compare.select_lrs` as a markdown table: each
    rate's dev AP (mean ± sd with several seeds)."""
    grid, seeds = result["grid"], result["seeds"]
    over = f"mean ± sd over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "one seed"
    lines = [f"Learning rate per method, picked on the dev split ({result['view']} view, strict AP, {over}); the "
             "test runs use the chosen rate.", "", "| method | " + " | ".join(f"lr {lr:g}" for lr in grid)
             + " | chosen |", "|---|" + "---|" * (len(grid) + 1)]
    for m, aps in result["dev_ap"].items():
        per_seed = result["dev_ap_seeds"][m]
        cells = [format_mean_sd(mean_sd(per_seed[f"{lr:g}"])) if len(seeds) > 1 else f"{aps[f'{lr:g}']:.1f}"
                 for lr in grid]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {result['chosen'][m]:g} |")
    return "\n".join(lines) + "\n"
