"""The continual-learning matrix R and the metrics derived from it.

``R[t][i]`` is the score (points, 0-100) on task i's test split after training stage t;
``None`` where task i was not evaluated after stage t. Rows are stages, columns the
suite's tasks in training order. With T stages (last row T-1, 0-based here):

    AP          = mean_i R[T-1][i]                                   (over evaluated tasks)
    BWT         = mean_{i<T-1} ( R[T-1][i] - R[i][i] )               (Lopez-Paz & Ranzato 2017)
    forgetting  = mean_{i<T-1} ( max_{i<=t<T-1} R[t][i] - R[T-1][i] )  (Chaudhry et al. 2018)
    FWT         = mean_{i>=1} ( R[i-1][i] - base[i] )                (needs eval.fwt and base)

A metric that the matrix cannot give (one row, no FWT cells) is None.

``eval/matrix.json`` (one per run) holds one such matrix per query view and scoring::

    {"format": 2, "method": "slm", "tasks": [...], "stages": [...], "settings": {...},
     "samples": {task: n},
     "views": {"paraphrase": {                               # one entry per query view
         "strict":  {"R": {"slm": [[...], ...], "oracle": [[...], ...]},   # one matrix per mode
                     "base": [...]},                          # zero-shot, per task (or nulls)
         "lenient": {"R": {...}, "base": [...]},              # the lenient label match
         "routing_accuracy": [...],                           # per row: served by own task (slm runs)
         "routing_confusion": [{true: {routed: n}}, ...]},    # per row; "<ood>" = flagged OOD
       ...}}

:func:`view_matrix` gives one view and scoring in the flat shape the metric functions take.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from slm_llm.errors import SlmError
from slm_llm.utils.io import write_json

Row = list[float | None]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


class MatrixError(SlmError, ValueError):
    """A matrix lacks a cell a metric needs: the metric is refused, never averaged over fewer cells."""


def cl_metrics(R: list[Row], base: Row | None = None) -> dict[str, float | int | None]:
    """AP, BWT, forgetting and FWT of a matrix (see the module docstring), with ``n_bwt`` (and
    ``n_fwt``): how many tasks each averages. The last row is the last one that exists (a run
    stopped early); every earlier row and diagonal cell BWT needs must exist (MatrixError)."""
    rows = [r for r in R if r is not None and any(v is not None for v in r)]
    if not rows:
        return {"ap": None, "bwt": None, "forgetting": None, "fwt": None, "n_bwt": 0, "n_fwt": 0}
    last = len(R) - 1
    while R[last] is None or all(v is None for v in R[last]):
        last -= 1
    final = R[last]
    ap = _mean([v for v in final if v is not None])
    bwt, forget, fwt = [], [], []
    for i in range(min(last, len(final))):
        if R[i] is None or R[i][i] is None or final[i] is None:
            where = f"row {i}" if R[i] is None else f"R[{i}][{i}]" if R[i][i] is None else f"R[{last}][{i}]"
            raise MatrixError(f"{where} is missing: BWT and forgetting need task {i}'s score after stage {i} and "
                              f"after stage {last}; evaluate the missing rows (slm-llm eval --all-rows) before "
                              "reading them")
        bwt.append(final[i] - R[i][i])
        seen = [R[t][i] for t in range(i, last) if R[t] is not None and R[t][i] is not None]
        forget.append(max(seen) - final[i])
    if base is not None:
        for i in range(1, min(len(R), len(base))):
            prev = R[i - 1]
            if prev is not None and i < len(prev) and prev[i] is not None and base[i] is not None:
                fwt.append(prev[i] - base[i])
    return {"ap": ap, "bwt": _mean(bwt), "forgetting": _mean(forget), "fwt": _mean(fwt), "n_bwt": len(bwt),
            "n_fwt": len(fwt)}


SCORINGS = ("strict", "lenient")
FORMAT = 2


def new_matrix(method: str, tasks: list[str], stages: list[str], views: list[str]) -> dict[str, Any]:
    return {"format": FORMAT, "method": method, "tasks": list(tasks), "stages": list(stages), "samples": {},
            "views": {v: new_view(len(tasks), len(stages)) for v in views}}


def new_view(n_tasks: int, n_stages: int) -> dict[str, Any]:
    return {**{s: {"R": {}, "base": [None] * n_tasks} for s in SCORINGS},
            "routing_accuracy": [None] * n_stages, "routing_confusion": [None] * n_stages}


def view_matrix(m: dict[str, Any], view: str, scoring: str = "strict") -> dict[str, Any]:
    """One view and scoring of ``m`` as a flat matrix ``{method, tasks, stages, samples, R, base,
    routing_accuracy, routing_confusion}``; its R and base are ``m``'s own (set_cell writes through)."""
    if view not in m["views"]:
        raise MatrixError(f"the matrix has no view {view!r} (views: {', '.join(m['views'])}); evaluate it with "
                          f"--query-view {view}")
    v = m["views"][view]
    return {"method": m["method"], "tasks": m["tasks"], "stages": m["stages"], "samples": m["samples"],
            "R": v[scoring]["R"], "base": v[scoring]["base"], "routing_accuracy": v["routing_accuracy"],
            "routing_confusion": v["routing_confusion"]}


def load_matrix(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MatrixError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if m.get("format") != FORMAT:
        raise MatrixError(f"{path}: matrix format {m.get('format', 1)} predates query views (format {FORMAT}); "
                         "move this eval/ folder aside and evaluate again")
    return m


def save_matrix(path: str | Path, m: dict[str, Any]) -> None:
    write_json(path, m)


def get_cell(m: dict[str, Any], mode: str, t: int, i: int) -> float | None:
    rows = m["R"].get(mode)
    if rows is None or t >= len(rows) or rows[t] is None:
        return None
    return rows[t][i]


def set_cell(m: dict[str, Any], mode: str, t: int, i: int, value: float) -> None:
    rows = m["R"].setdefault(mode, [])
    while len(rows) <= t:
        rows.append(None)
    if rows[t] is None:
        rows[t] = [None] * len(m["tasks"])
    rows[t][i] = _clean(value)


def clear_routed_row(m: dict[str, Any], t: int) -> bool:
    """Forget row ``t``'s routed cells (mode "slm", routing accuracy and confusion) in every view and
    scoring, so the next evaluation scores them with the run's router as it is now; the oracle and
    base cells do not depend on the router and stay. True if there was anything to forget."""
    found = False
    for v in m["views"].values():
        for rows in [v[scoring]["R"].get("slm", []) for scoring in SCORINGS] + \
                    [v["routing_accuracy"], v["routing_confusion"]]:
            if t < len(rows) and rows[t] is not None:
                rows[t], found = None, True
    return found


def final_row(m: dict[str, Any], mode: str) -> Row | None:
    rows = [r for r in m["R"].get(mode, []) if r is not None]
    return rows[-1] if rows else None


def metrics_of(m: dict[str, Any]) -> dict[str, Any]:
    """``{view: {scoring: {mode: {ap, bwt, forgetting, fwt}}, "routing_accuracy"}}``: eval/metrics.json."""
    out: dict[str, Any] = {}
    for view in m["views"]:
        entry: dict[str, Any] = {}
        for scoring in SCORINGS:
            flat = view_matrix(m, view, scoring)
            entry[scoring] = {mode: metrics_or_reason(rows, flat["base"]) for mode, rows in flat["R"].items()}
            base = [v for v in flat["base"] if v is not None]
            if base:
                entry[scoring]["base"] = {"ap": sum(base) / len(base), "bwt": None, "forgetting": None, "fwt": None,
                                          "n_bwt": 0, "n_fwt": 0}
        acc = [a for a in m["views"][view]["routing_accuracy"] if a is not None]
        entry["routing_accuracy"] = acc[-1] if acc else None
        out[view] = entry
    return out


def metrics_or_reason(R: list[Row], base: Row) -> dict[str, Any]:
    """cl_metrics, or (a row still missing, e.g. a view added after earlier stages) its AP and the
    reason BWT is not given."""
    try:
        return cl_metrics(R, base)
    except MatrixError as e:
        final = next((r for r in reversed(R) if r is not None), [])
        return {"ap": _mean([v for v in final if v is not None]), "bwt": None, "forgetting": None, "fwt": None,
                "n_bwt": 0, "n_fwt": 0, "error": str(e)}


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)
