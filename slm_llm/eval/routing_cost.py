"""What routing costs: a run's slm − oracle gap after its last task, split by where slm sent each query.

The oracle mode answers every test query with its true task's slots; slm answers it as the
router decides. Each query of the final row falls in one part:

    own      routed to its own task and served: the oracle's slots and weights (one slot rule),
             so the part is 0 unless something is wrong
    ood      flagged out of distribution: the base model answered
    other    routed to another task: that task's increments answered

A part's cost is in AP points, (1/T) Σ_t (1/n_t) Σ_{i of t in the part} (slm_i − oracle_i), so the
parts sum to AP(slm) − AP(oracle). ``pairs`` splits ``ood`` and ``other`` by (true task, routed
task): e.g. whether MNLI queries sent to CB (the same labels) lose answers, or only the served rate.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slm_llm.run import RunDir, RunError

OOD = "<ood>"
PARTS = ("own", "ood", "other")


def final_predictions(run_dir: str | Path, view: str, mode: str) -> dict[str, list[dict]]:
    """``{task: prediction rows of mode}`` after the run's last stage (``base``: the zero-shot file),
    each task's rows sorted by record id."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    tasks, t = manifest["suite_tasks"], len(manifest["order"]) - 1
    folder = run.eval_dir / "predictions" / view
    out = {}
    for task in tasks:
        path = folder / (f"base-{task}.jsonl" if mode == "base" else f"stage{t}-{task}.jsonl")
        if not path.exists():
            raise RunError(f"{path}: missing; evaluate the run's last row (slm-llm eval --run {run.root})")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[task] = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["id"])
        if not out[task]:
            raise RunError(f"{path}: no predictions of mode {mode!r}")
    return out


def routing_cost(run_dir: str | Path, view: str, scoring: str = "strict") -> dict[str, Any]:
    """``{"parts": {own, ood, other: AP points}, "shares": {own, ood, other: % of queries},
    "pairs": [{true, routed, n, points}], "gap": AP(slm) − AP(oracle)}`` of one view; ``pairs`` holds
    every (true, routed) pair off the diagonal, the costliest first."""
    key = "score" if scoring == "strict" else "lenient"
    slm, oracle = final_predictions(run_dir, view, "slm"), final_predictions(run_dir, view, "oracle")
    parts, counts, pairs = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0), {}
    for task, rows in slm.items():
        truth = {r["id"]: r[key] for r in oracle[task]}
        if set(truth) != {r["id"] for r in rows}:
            raise RunError(f"{run_dir}: {view} view, {task}: slm and oracle were not scored on the same records")
        for r in rows:
            routed = r["routed_task"]
            part = "own" if routed == task else "ood" if routed == OOD else "other"
            delta = 100.0 * (r[key] - truth[r["id"]]) / len(rows) / len(slm)
            parts[part] += delta
            counts[part] += 1
            if part != "own":
                pair = pairs.setdefault((task, routed), {"true": task, "routed": routed, "n": 0, "points": 0.0})
                pair["n"] += 1
                pair["points"] += delta
    total = sum(counts.values())
    return {"parts": parts, "shares": {p: 100.0 * n / total for p, n in counts.items()},
            "pairs": costliest_first(pairs.values()), "gap": sum(parts.values())}


def costliest_first(pairs) -> list[dict[str, Any]]:
    """(true, routed) pairs by the points they cost, the largest loss first (a gain last)."""
    return sorted(pairs, key=lambda p: (p["points"], -p["n"]))


def format_pairs(pairs: list[dict[str, Any]], top: int) -> str:
    """``true -> routed n (points)`` of the first ``top`` pairs."""
    return ", ".join(f"{p['true']} -> {p['routed']} {p['n']} ({p['points']:+.2f})" for p in pairs[:top])


def routing_cost_markdown(costs: dict[str, dict[str, Any]], top: int = 5) -> str:
    """One row per view (``costs``: ``{view: routing_cost(...)}``), then each view's costliest pairs."""
    lines = ["Where slm loses to the oracle (strict, AP points; the parts sum to slm − oracle): each test query "
             "by where slm sent it, with its share of queries.", "",
             "| view | slm − oracle | own task | flagged OOD (base answers) | another task |", "|---|---|---|---|---|"]
    for view, c in costs.items():
        cells = [f"{c['parts'][p]:+.2f} ({c['shares'][p]:.1f}%)" for p in PARTS]
        lines.append(f"| {view} | {c['gap']:+.2f} | " + " | ".join(cells) + " |")
    for view, c in costs.items():
        if c["pairs"]:
            lines.append(f"\n{view}, costliest: {format_pairs(c['pairs'], top)}")
    return "\n".join(lines) + "\n"
