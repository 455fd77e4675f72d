"""Pick one of a dev grid's variants (bench/gpu_check.sh HEADLINE_VARIANTS, data.eval_split=dev):

    python bench/dev_pick.py runs/cl9 "w1:;w2:data.wordings=2;e2:train.epochs=2" [--view paraphrase]

reads ``<prefix>-<name>-s<seed>-compare.json`` of every variant and seed, prints each variant's slm
AP per view (strict, mean ± sd over seeds) and its paired difference to the first variant, and
last the chosen variant's overrides. The rule: the best mean AP in ``--view``; a variant replaces
the first (the committed config) only if it beats it on every seed, otherwise the first stays.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def seed_aps(prefix: str, name: str) -> dict[int, dict[str, float]]:
    """{seed: {view: strict slm AP}} of one variant's dev runs."""
    out = {}
    for path in sorted(Path(prefix).parent.glob(f"{Path(prefix).name}{'-' + name if name else ''}-s*-compare.json")):
        seed = path.name.rsplit("-s", 1)[1].split("-")[0]
        if not seed.isdigit():
            continue
        cells = json.loads(path.read_text())["cells"]
        out[int(seed)] = {v: cells[v]["strict"]["slm"]["ap"] for v in cells}
    return out


def fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix")
    p.add_argument("variants", help="name:overrides;name:overrides (the first is the committed config)")
    p.add_argument("--view", default="paraphrase")
    args = p.parse_args()
    variants = [v.split(":", 1) for v in args.variants.split(";")]
    aps = {name: seed_aps(args.prefix, name) for name, _ in variants}
    first = variants[0][0]
    seeds = sorted(set.intersection(*(set(a) for a in aps.values())))
    if not seeds:
        raise SystemExit(f"no seed has finished every variant under {args.prefix}")
    views = list(aps[first][seeds[0]])
    print(f"dev AP, strict, seeds {seeds}; paired difference to {first or 'the first'} in {args.view}")
    print("| variant | overrides | " + " | ".join(views) + f" | − {first} ({args.view}) | wins |")
    print("|---|---|" + "---|" * (len(views) + 2))
    best, best_ap = first, statistics.mean(aps[first][s][args.view] for s in seeds)
    for name, overrides in variants:
        diff = [aps[name][s][args.view] - aps[first][s][args.view] for s in seeds]
        wins = sum(d > 0 for d in diff)
        cells = [fmt([aps[name][s][v] for s in seeds]) for v in views]
        print(f"| {name} | {overrides or '(committed)'} | " + " | ".join(cells) + f" | {fmt(diff)} | {wins}/{len(seeds)} |")
        mean = statistics.mean(aps[name][s][args.view] for s in seeds)
        if name != first and wins == len(seeds) and mean > best_ap:
            best, best_ap = name, mean
    print(f"chosen: {best}")
    print(dict(variants)[best])


if __name__ == "__main__":
    main()
