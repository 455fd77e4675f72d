"""The comparison over several seeds as a table with intervals (``slm_llm.eval.stats``);
``slm_llm.recipes.compare.compare_seeds`` runs the seeds.

Seed s runs the whole comparison with ``data.seed = train.seed = dtkr.seed = s`` (training
sample, test sample, phrasing draws, slot init, key init) in ``<run_dir>-s<s>-<method>``; the
phrasing pools' split (``data.phrasing_seed``) stays fixed, so "held-out" means the same
phrasings in every seed. Each seed's runs resume like any run, so a benchmark stopped with the
session continues where it was. The table, ``<run_dir>-seeds.{json,md,png}``, holds per view and
scoring: AP as mean ± sd over seeds with a 95% bootstrap interval over seeds and test samples,
BWT and routing as mean ± sd, and paired differences of slm against every other method.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from slm_llm.config import Config
from slm_llm.eval.compare import run_dir_of
from slm_llm.eval.matrix import SCORINGS
from slm_llm.eval.routing_cost import PARTS, costliest_first, final_predictions, format_pairs, routing_cost
from slm_llm.eval.stats import format_mean_sd as _ms, mean_sd, paired_difference, summarise
from slm_llm.utils.io import atomic_path


def seed_config(cfg: Config, seed: int) -> Config:
    c = copy.deepcopy(cfg)
    c.data.seed = c.train.seed = c.dtkr.seed = seed
    c.run_dir = f"{cfg.run_dir}-s{seed}"
    return c


def final_scores(run_dir: Path, mode: str, view: str, scoring: str) -> dict[str, np.ndarray]:
    """Per-sample scores of ``mode`` after the run's last stage, ``{task: [score]}`` sorted by record id."""
    key = "score" if scoring == "strict" else "lenient"
    return {task: np.array([r[key] for r in rows], dtype=float)
            for task, rows in final_predictions(run_dir, view, mode).items()}


def seeds_table(cfg: Config, methods: list[str], seeds: list[int], tables: dict[int, dict]) -> dict[str, Any]:
    views = list(cfg.eval.views)
    out: dict[str, Any] = {"seeds": seeds, "views": views, "methods": methods, "tasks": tables[seeds[0]]["tasks"],
                           "cells": {}}
    for view in views:
        out["cells"][view] = {}
        for scoring in SCORINGS:
            scores = {m: {str(s): final_scores(run_dir_of(seed_config(cfg, s), m), m, view, scoring) for s in seeds}
                      for m in methods}
            cell: dict[str, Any] = {}
            for m in methods:
                per_seed = [tables[s]["cells"][view][scoring][m] for s in seeds]
                cell[m] = {"ap": summarise(scores[m]),
                           "bwt": mean_sd([r["bwt"] for r in per_seed]),
                           "routing": mean_sd([r["routing_accuracy"] for r in per_seed]),
                           "tasks": {t: mean_sd([r["scores"][t] for r in per_seed]) for t in out["tasks"]}}
            if "slm" in methods:
                cell["slm_minus"] = {m: paired_difference(scores["slm"], scores[m]) for m in methods if m != "slm"}
            out["cells"][view][scoring] = cell
    if {"slm", "oracle"} <= set(methods):
        out["routing_cost"] = {view: seeds_routing_cost([routing_cost(run_dir_of(seed_config(cfg, s), "slm"), view)
                                                         for s in seeds]) for view in views}
    return out


def seeds_routing_cost(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`slm_llm.eval.routing_cost.routing_cost` over seeds: each part and share as mean ± sd;
    each (true, routed) pair's queries summed and its points averaged over the seeds."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for c in per_seed:
        for p in c["pairs"]:
            pair = pairs.setdefault((p["true"], p["routed"]), {"true": p["true"], "routed": p["routed"], "n": 0,
                                                               "points": 0.0})
            pair["n"] += p["n"]
            pair["points"] += p["points"] / len(per_seed)
    return {"gap": mean_sd([c["gap"] for c in per_seed]),
            "parts": {p: mean_sd([c["parts"][p] for c in per_seed]) for p in PARTS},
            "shares": {p: mean_sd([c["shares"][p] for c in per_seed]) for p in PARTS},
            "pairs": costliest_first(pairs.values())}


def _ci(v: dict[str, float]) -> str:
    return f"[{v['lo']:.1f}, {v['hi']:.1f}]"


def seeds_markdown(table: dict[str, Any]) -> str:
    views, methods, tasks = table["views"], table["methods"], table["tasks"]
    lines = [f"Seeds {', '.join(map(str, table['seeds']))}. Headline: the **{views[0]}** view, strict scoring. "
             "AP: mean ± sd over seeds, [95% bootstrap interval over seeds and test samples]. A difference is a "
             "result only when its interval excludes 0.", ""]
    for view in views:
        for scoring in SCORINGS:
            cell = table["cells"][view][scoring]
            lines += [f"### {view}, {scoring}", "",
                      "| method | AP | 95% interval | BWT | routing | " + " | ".join(tasks) + " |",
                      "|" + "---|" * (5 + len(tasks))]
            for m in methods:
                c = cell[m]
                lines.append(f"| {m} | {_ms(c['ap'])} | {_ci(c['ap'])} | {_ms(c['bwt'])} | {_ms(c['routing'])} | "
                             + " | ".join(_ms(c["tasks"][t]) for t in tasks) + " |")
            if "slm_minus" in cell:
                lines += ["", "| paired difference | mean ± sd | 95% interval | excludes 0 |", "|---|---|---|---|"]
                for m, d in cell["slm_minus"].items():
                    lines.append(f"| slm − {m} | {_ms(d)} | {_ci(d)} | {'yes' if d['lo'] > 0 or d['hi'] < 0 else 'no'} |")
            lines.append("")
    if "routing_cost" in table:
        lines += ["### Where slm loses to the oracle", "",
                  "Strict, AP points, mean ± sd over seeds; the parts sum to slm − oracle. Each test query of the "
                  "final row by where slm sent it (share of queries in brackets); pairs: queries over all seeds, "
                  "points per seed.", "",
                  "| view | slm − oracle | own task | flagged OOD (base answers) | another task | costliest pairs |",
                  "|---|---|---|---|---|---|"]
        for view, c in table["routing_cost"].items():
            parts = [f"{_ms(c['parts'][p])} ({c['shares'][p]['mean']:.1f}%)" for p in PARTS]
            pairs = format_pairs(c["pairs"], 4) or "–"
            lines.append(f"| {view} | {_ms(c['gap'])} | " + " | ".join(parts) + f" | {pairs} |")
        lines.append("")
    return "\n".join(lines)


def plot_seeds(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views, methods = table["views"], table["methods"]
    fig, ax = plt.subplots(figsize=(2 + 1.5 * len(views) * len(methods) / 3, 4))
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        cells = [table["cells"][v]["strict"][m]["ap"] for v in views]
        x = np.arange(len(views)) + (k - (len(methods) - 1) / 2) * width
        means = [c["mean"] for c in cells]
        err = [[c["mean"] - c["lo"] for c in cells], [c["hi"] - c["mean"] for c in cells]]
        ax.bar(x, means, width, yerr=err, capsize=3, label=m)
    ax.set_xticks(range(len(views)), views)
    ax.set_ylabel("AP, strict (points)")
    ax.set_ylim(0, 100)
    ax.set_title(f"AP by query view, mean over seeds {table['seeds']} with 95% interval")
    ax.legend(fontsize=8, ncol=min(6, len(methods)))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
