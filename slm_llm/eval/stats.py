"""Intervals over seeds and test samples: mean ± sd, a 95% bootstrap interval, paired differences.

A method's result in one seed is a set of per-sample scores per task (the final row of its
CL matrix, read from ``eval/predictions``). Its AP in that seed is the mean over tasks of
the mean over samples. The interval is a two-level (hierarchical) bootstrap: each
replicate draws seeds with replacement, then, within each drawn seed, each task's test
samples with replacement, and takes the mean AP of the drawn seeds. A paired difference
(A - B) draws the same seeds and the same sample indices for both methods, which is valid
because every method of a seed is scored on the same test records.

    per_seed[seed][task] = np.array of per-sample scores in [0, 1] (x100 = points)
"""
from __future__ import annotations

import numpy as np

Scores = dict[str, dict[str, np.ndarray]]  # seed -> task -> per-sample scores
REPLICATES = 2000


def ap(per_task: dict[str, np.ndarray]) -> float:
    """Average performance in points: the mean over tasks of each task's mean score."""
    return 100.0 * float(np.mean([np.mean(v) for v in per_task.values()]))


def summarise(per_seed: Scores, replicates: int = REPLICATES, seed: int = 0) -> dict[str, float]:
    """``{mean, sd, lo, hi, n_seeds}`` of AP: mean and sd over seeds, lo/hi the 95% bootstrap interval."""
    aps = [ap(t) for t in per_seed.values()]
    lo, hi = _interval(lambda idx: _boot_ap(per_seed, idx), per_seed, replicates, seed)
    return {"mean": float(np.mean(aps)), "sd": float(np.std(aps, ddof=1)) if len(aps) > 1 else 0.0,
            "lo": lo, "hi": hi, "n_seeds": len(aps)}


def paired_difference(a: Scores, b: Scores, replicates: int = REPLICATES, seed: int = 0) -> dict[str, float]:
    """AP(a) - AP(b) with the same seeds and samples resampled for both: ``{mean, sd, lo, hi, n_seeds}``.
    The difference is a result only when the interval excludes 0."""
    if set(a) != set(b):
        raise ValueError(f"paired difference needs the same seeds, got {sorted(a)} and {sorted(b)}")
    for s in a:
        if set(a[s]) != set(b[s]) or any(len(a[s][t]) != len(b[s][t]) for t in a[s]):
            raise ValueError(f"seed {s}: the two methods were not scored on the same tasks and samples")
    diffs = [ap(a[s]) - ap(b[s]) for s in a]
    lo, hi = _interval(lambda idx: _boot_ap(a, idx) - _boot_ap(b, idx), a, replicates, seed)
    return {"mean": float(np.mean(diffs)), "sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0,
            "lo": lo, "hi": hi, "n_seeds": len(diffs)}


def mean_sd(values: list[float | None]) -> dict[str, float] | None:
    """Mean and sample sd (0 for one value) of the values that are not None; None if none is."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def format_mean_sd(v: dict[str, float] | None) -> str:
    """``mean ± sd`` to one decimal, or ``–``."""
    return "–" if v is None else f"{v['mean']:.1f} ± {v['sd']:.1f}"


def _interval(stat, per_seed: Scores, replicates: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    seeds = list(per_seed)
    values = []
    for _ in range(replicates):
        drawn = [seeds[i] for i in rng.integers(0, len(seeds), len(seeds))]
        idx = [(s, {t: rng.integers(0, len(v), len(v)) for t, v in per_seed[s].items()}) for s in drawn]
        values.append(stat(idx))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _boot_ap(per_seed: Scores, idx: list[tuple[str, dict[str, np.ndarray]]]) -> float:
    return float(np.mean([ap({t: per_seed[s][t][i] for t, i in draws.items()}) for s, draws in idx]))
