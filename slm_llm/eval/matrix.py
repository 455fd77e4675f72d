"""The continual-learning matrix R and the metrics derived from it.

``R[t][i]`` is the score (points, 0-100) on task i's test split after training stage t;
``None`` where task i was not evaluated after stage t. Rows are stages, columns the
suite's tasks in training order. With T stages (last row T-1, 0-based here):

    AP          = mean_i R[T-1][i]                                   (over evaluated tasks)
    BWT         = mean_{i<T-1} ( R[T-1][i] - R[i][i] )               (Lopez-Paz & Ranzato 2017)
    forgetting  = mean_{i<T-1} ( max_{i<=t<T-1} R[t][i] - R[T-1][i] )  (Chaudhry et al. 2018)
    FWT         = mean_{i>=1} ( R[i-1][i] - base[i] )                (needs eval.fwt and base)

A metric that the matrix cannot give (one row, no FWT cells) is None.

``eval/matrix.json`` (one per run)::

    {"method": "slm", "tasks": [...], "stages": [...],
     "R": {"slm": [[...], ...], "oracle": [[...], ...]},   # one matrix per mode
     "base": [...],                                        # zero-shot, per task (or nulls)
     "routing_accuracy": [...],                            # per row, slm runs only
     "routing_confusion": [{true: {routed: n}}, ...],      # per row
     "samples": {task: n}}
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from slm_llm.utils.io import write_json

Row = list[float | None]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def cl_metrics(R: list[Row], base: Row | None = None) -> dict[str, float | None]:
    """AP, BWT, forgetting and FWT of a matrix (see the module docstring)."""
    rows = [r for r in R if r is not None and any(v is not None for v in r)]
    if not rows:
        return {"ap": None, "bwt": None, "forgetting": None, "fwt": None}
    last = len(R) - 1
    while R[last] is None or all(v is None for v in R[last]):
        last -= 1
    final = R[last]
    ap = _mean([v for v in final if v is not None])
    bwt, forget, fwt = [], [], []
    for i in range(min(last, len(final))):
        if final[i] is None or i >= len(R) or R[i] is None or R[i][i] is None:
            continue
        bwt.append(final[i] - R[i][i])
        seen = [R[t][i] for t in range(i, last) if R[t] is not None and R[t][i] is not None]
        forget.append(max(seen) - final[i])
    if base is not None:
        for i in range(1, min(len(R), len(base))):
            prev = R[i - 1]
            if prev is not None and i < len(prev) and prev[i] is not None and base[i] is not None:
                fwt.append(prev[i] - base[i])
    return {"ap": ap, "bwt": _mean(bwt), "forgetting": _mean(forget), "fwt": _mean(fwt)}


def new_matrix(method: str, tasks: list[str], stages: list[str]) -> dict[str, Any]:
    return {"method": method, "tasks": list(tasks), "stages": list(stages), "R": {}, "base": [None] * len(tasks),
            "routing_accuracy": [None] * len(stages), "routing_confusion": [None] * len(stages), "samples": {}}


def load_matrix(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


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


def final_row(m: dict[str, Any], mode: str) -> Row | None:
    rows = [r for r in m["R"].get(mode, []) if r is not None]
    return rows[-1] if rows else None


def metrics_of(m: dict[str, Any]) -> dict[str, Any]:
    """``{mode: {ap, bwt, forgetting, fwt}}`` plus the final routing accuracy: eval/metrics.json."""
    out: dict[str, Any] = {mode: cl_metrics(rows, m.get("base")) for mode, rows in m["R"].items()}
    base = [v for v in m.get("base", []) if v is not None]
    if base:
        out["base"] = {"ap": sum(base) / len(base), "bwt": None, "forgetting": None, "fwt": None}
    acc = [a for a in m.get("routing_accuracy", []) if a is not None]
    out["routing_accuracy"] = acc[-1] if acc else None
    return out


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)
