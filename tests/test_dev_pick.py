"""bench/dev_pick.py: a dev grid's variant is chosen by a rule fixed before the grid runs."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_grid(tmp_path, aps: dict[str, list[float]]) -> str:
    prefix = tmp_path / "cl9"
    for name, per_seed in aps.items():
        for seed, ap in enumerate(per_seed):
            cells = {v: {"strict": {"slm": {"ap": ap + (v == "fixed")}}} for v in ("paraphrase", "fixed")}
            Path(f"{prefix}-{name}-s{seed}-compare.json").write_text(json.dumps({"cells": cells}))
    return str(prefix)


def pick(prefix: str, variants: str) -> list[str]:
    out = subprocess.run([sys.executable, str(REPO / "bench/dev_pick.py"), prefix, variants],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return out


def test_a_variant_replaces_the_committed_config_only_if_it_wins_on_every_seed(tmp_path):
    variants = "w1:;w2:data.wordings=2;e2:train.epochs=2"
    # e2 has the best mean but loses seed 2; w2 wins every seed
    prefix = write_grid(tmp_path, {"w1": [50, 50, 50], "w2": [52, 51, 51], "e2": [60, 60, 49]})
    out = pick(prefix, variants)
    assert out[-2:] == ["chosen: w2", "data.wordings=2"]
    row = next(line for line in out if line.startswith("| e2 |"))
    assert row.endswith("| 2/3 |") and "| 56.3 ± 6.4 |" in row  # the paraphrase mean, and wins on 2 of 3 seeds
    # nothing wins every seed: the committed config stays
    (tmp_path / "b").mkdir()
    prefix = write_grid(tmp_path / "b", {"w1": [50, 50, 50], "w2": [52, 49, 51], "e2": [60, 60, 49]})
    assert pick(prefix, variants)[-2:] == ["chosen: w1", ""]
