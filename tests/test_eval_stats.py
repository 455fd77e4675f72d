"""Intervals over seeds and samples against hand-computed cases."""
import numpy as np
import pytest

from slm_llm.eval.stats import ap, paired_difference, summarise


def test_ap_is_the_mean_over_tasks_of_task_means():
    assert ap({"a": np.array([1, 0, 1, 1]), "b": np.array([0, 0])}) == pytest.approx(100 * (0.75 + 0) / 2)


def test_one_seed_two_samples_interval_is_the_whole_range():
    # Resampling [0, 1] twice gives a mean of 0 (p=1/4), 0.5 (1/2) or 1 (1/4): the 2.5th percentile
    # is 0 and the 97.5th is 100 points.
    s = summarise({"0": {"t": np.array([0.0, 1.0])}})
    assert s["mean"] == 50.0 and s["sd"] == 0.0 and s["lo"] == 0.0 and s["hi"] == 100.0 and s["n_seeds"] == 1


def test_mean_and_sd_over_seeds_and_a_normal_approximation():
    s = summarise({"0": {"t": np.array([0.4] * 10)}, "1": {"t": np.array([0.6] * 10)}})
    assert s["mean"] == pytest.approx(50.0) and s["sd"] == pytest.approx(np.std([40, 60], ddof=1))
    assert 40.0 <= s["lo"] <= s["hi"] <= 60.0  # only the seed draw varies: [40, 60]
    rng = np.random.default_rng(0)
    big = {"0": {"t": (rng.random(400) < 0.5).astype(float)}}
    s = summarise(big)
    half = 1.96 * np.sqrt(0.25 / 400) * 100  # ~4.9 points
    assert s["hi"] - s["lo"] == pytest.approx(2 * half, rel=0.15)


def test_paired_difference_resamples_both_methods_together():
    rng = np.random.default_rng(1)
    b = {str(s): {"t": (rng.random(50) < 0.5).astype(float)} for s in range(3)}
    same = paired_difference(b, b)
    assert same["mean"] == same["lo"] == same["hi"] == 0.0  # paired: identical draws cancel exactly
    a = {s: {"t": np.ones_like(v["t"])} for s, v in b.items()}
    d = paired_difference(a, b)
    assert d["mean"] == pytest.approx(np.mean([100 - ap(v) for v in b.values()])) and d["lo"] > 0
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference(a, {"0": b["0"]})
    with pytest.raises(ValueError, match="same tasks and samples"):
        paired_difference({"0": {"t": np.ones(3)}}, {"0": {"t": np.ones(4)}})
