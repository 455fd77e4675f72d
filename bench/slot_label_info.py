"""How much a training sample's slot pair says about its answer: I(slot pair; label) in bits.

For each slm run folder given (one task, a closed label set), its training queries are routed
within their own task by the run's saved router (as training routed them), and the mutual
information between the chosen slot set and the sample's label is printed beside the label's
entropy and the number of distinct slot sets used. A router whose within-task assignment is blind
to the answer (I close to 0) gives every slot the same mix of answers to learn.

    python bench/slot_label_info.py runs/law-base20-s0-slm runs/law-mini-s0-slm ...
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slm_llm.config import load_config  # noqa: E402
from slm_llm.data import load_suite, query_text, run_records, training_records  # noqa: E402
from slm_llm.dtkr.encoder import build_encoder  # noqa: E402
from slm_llm.dtkr.router import open_router  # noqa: E402
from slm_llm.run import RunDir  # noqa: E402


def entropy(values: list) -> float:
    n = len(values)
    return -sum(c / n * math.log2(c / n) for c in Counter(values).values())


def mutual_information(xs: list, ys: list) -> float:
    return entropy(xs) + entropy(ys) - entropy(list(zip(xs, ys)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="slm run folders, each trained on one task")
    for root in map(Path, p.parse_args().runs):
        cfg = load_config(root / "run.yaml")
        suite, (task,) = load_suite(cfg.data.suite), RunDir(root).manifest()["order"]
        records = training_records(run_records(suite, task, "train", cfg.data), suite.tasks[task], cfg.data)
        encoder = build_encoder(cfg)
        router = open_router(RunDir(root), cfg, encoder)
        decisions = router.route(encoder.encode([query_text(r) for r in records]), restrict_task=task)
        slot_sets = [tuple(sorted(d.slots)) for d in decisions]
        labels = [r.output.strip().lower() for r in records]
        print(f"{root.name}: I(slot set; label) = {mutual_information(slot_sets, labels):.3f} bits, "
              f"H(label) = {entropy(labels):.3f}, {len(set(slot_sets))} slot sets used")


if __name__ == "__main__":
    main()
