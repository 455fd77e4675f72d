"""Which base-model block to route with: dev routing and OOD rates per layer, one encoding pass.

The base model's mean-pooled residual stream after blocks 4..24 is computed once for every dev
query (train queries, the paraphrase and input-only views of the dev pool, another suite and the
IFEval prompts as off-domain sets) and cached in ``<out>/layers-<suite>.npz``. For each layer a
whitened k-means router is built continually and each task's Gaussian OOD test is calibrated out
of fold (``slm_llm.dtkr.ood``); the table gives, per layer and OOD percentile, the share of dev
queries served by their own task and the share of off-domain queries flagged.

``--combine 4+20,16+20+24`` writes ``combined-<suite>.md`` instead: the queries are routed at
``--route-layer`` (alone, the first rows) and the OOD test averages several layers. Each layer's
squared Mahalanobis distance is divided by the median of the task's out-of-fold training
distances at that layer, and the mean of their logs is thresholded at the percentile of the same
mean over the training queries (out of fold: every layer's folds hold the same records).

    python bench/encoder_layer_scan.py --suite instruct6 --tasks math_gsm8k,finance_phrasebank,\
medical_medmcqa,law_overruling,science_arc_easy --out runs/layer_scan
    python bench/encoder_layer_scan.py --suite cl9 --max-train 120 --max-test 50 --out runs/layer_scan
    python bench/encoder_layer_scan.py --suite cl9 --max-train 120 --max-test 50 --seed 1 \
--combine 4+20,16+20+24 --out runs/layer_scan/s1
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from slm_llm.config import load_config  # noqa: E402
from slm_llm.data import load_suite  # noqa: E402
from slm_llm.dtkr.evaluate import build_router_continual, off_domain_queries, suite_queries  # noqa: E402
from slm_llm.dtkr.ood import calibrate  # noqa: E402
from slm_llm.models import load_base_model  # noqa: E402

LAYERS = [4, 8, 12, 16, 20, 24]
PERCENTILES = [1.0, 2.0, 3.0]
VIEWS = ["paraphrase", "input-only"]


def embed(cfg, suite_name: str, tasks: list[str], max_test: int, path: Path) -> dict[str, np.ndarray]:
    """``{"L<layer>/<set>/<name>": [N, D]}`` for every layer, from one forward pass per batch."""
    if path.exists():
        return dict(np.load(path))
    suite = load_suite(suite_name)
    texts = {}
    for t in tasks:
        train, views = suite_queries(cfg, suite, t, VIEWS, max_test)
        texts[f"train/{t}"] = train.texts[: train.n_sample]  # the training sample (the historical tables)
        texts.update({f"{v}/{t}": q for v, q in views.items()})
    other = "cl9" if suite_name == "instruct6" else "instruct6"
    off = off_domain_queries(other, cfg, 30)
    random.Random(0).shuffle(off)
    texts[f"off/{other}"], texts["off/ifeval"] = off[:270], off_domain_queries("ifeval", cfg, 60)
    model, tok = load_base_model(cfg.model)
    decoder = model.get_decoder().eval()
    out = {}
    with torch.no_grad():
        for key, ts in texts.items():
            order = sorted(range(len(ts)), key=lambda i: len(ts[i]))
            res = {L: np.zeros((len(ts), model.config.hidden_size), np.float32) for L in LAYERS}
            for s in range(0, len(order), 32):
                idx = order[s:s + 32]
                b = tok([ts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=256)
                hidden = decoder(**b, output_hidden_states=True, use_cache=False).hidden_states
                mask = b["attention_mask"][..., None].float()
                for L in LAYERS:
                    res[L][idx] = ((hidden[L] * mask).sum(1) / mask.sum(1)).numpy()
            out.update({f"L{L}/{key}": res[L] for L in LAYERS})
            print(f"encoded {key}: {len(ts)}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


ROUTER = ["dtkr.whiten=true", "dtkr.key_init=kmeans", "dtkr.epochs=0"]
HEADER = ["| layer | OOD percentile | paraphrase served | paraphrase top-1 | input-only served | input-only top-1 | "
          "off-domain flagged |", "|---|---|---|---|---|---|---|"]


def scan(z: dict[str, np.ndarray], groups: int, shrinkage: float, rank: int) -> list[str]:
    lines = list(HEADER)
    router_cfg = load_config(None, ROUTER)
    for L in LAYERS:
        tasks = [k.split("/")[2] for k in z if k.startswith(f"L{L}/train/")]
        train = {t: z[f"L{L}/train/{t}"] for t in tasks}
        router = build_router_continual(train, router_cfg)
        tests = {t: calibrate(train[t], groups, shrinkage, rank, 1.0) for t in tasks}
        decisions = {k: router.route(z[k]) for k in z if k.startswith(f"L{L}/") and "/train/" not in k}
        for p in PERCENTILES:
            thr = {t: np.percentile(tests[t].oof, 100 - p) for t in tasks}

            def inside(key: str) -> list[bool]:
                e = z[key]
                return [tests[d.task].distance(e[i:i + 1], groups)[0] <= thr[d.task]
                        for i, d in enumerate(decisions[key])]

            cells = []
            for v in VIEWS:
                served, top = [], []
                for t in tasks:
                    key = f"L{L}/{v}/{t}"
                    top += [d.task == t for d in decisions[key]]
                    served += [d.task == t and ok for d, ok in zip(decisions[key], inside(key))]
                cells += [f"{100 * np.mean(served):.1f}", f"{100 * np.mean(top):.1f}"]
            offs = sorted(k for k in decisions if f"L{L}/off/" in k)
            flagged = ", ".join(f"{k.split('/')[-1]} {100 * (1 - np.mean(inside(k))):.1f}" for k in offs)
            lines.append(f"| {L} | {p} | {' | '.join(cells)} | {flagged} |")
            print(lines[-1], flush=True)
    return lines


def combined(z: dict[str, np.ndarray], layer_sets: list[list[int]], route_layer: int, groups: int,
             shrinkage: float, rank: int) -> list[str]:
    """Rows for OOD tests that average several layers' normalised log distances (module doc)."""
    lines = list(HEADER)
    tasks = [k.split("/")[2] for k in z if k.startswith(f"L{route_layer}/train/")]
    router = build_router_continual({t: z[f"L{route_layer}/train/{t}"] for t in tasks}, load_config(None, ROUTER))
    sets = sorted({k.split("/", 1)[1] for k in z if k.startswith(f"L{route_layer}/") and "/train/" not in k})
    routed = {k: [d.task for d in router.route(z[f"L{route_layer}/{k}"])] for k in sets}
    oof, dist = {}, {}  # per layer: {task: log normalised out-of-fold distances}, {set: log normalised distances}
    for L in sorted({L for s in layer_sets for L in s}):
        tests = {t: calibrate(z[f"L{L}/train/{t}"], groups, shrinkage, rank, 1.0) for t in tasks}
        median = {t: np.median(tests[t].oof) for t in tasks}
        oof[L] = {t: np.log(tests[t].oof / median[t]) for t in tasks}
        dist[L] = {k: np.log([tests[t].distance(z[f"L{L}/{k}"][i:i + 1], groups)[0] / median[t]
                              for i, t in enumerate(routed[k])]) for k in sets}
    for layers in layer_sets:
        train = {t: np.mean([oof[L][t] for L in layers], 0) for t in tasks}
        score = {k: np.mean([dist[L][k] for L in layers], 0) for k in sets}
        for p in PERCENTILES:
            thr = {t: np.percentile(train[t], 100 - p) for t in tasks}
            flagged = {k: np.array([s > thr[t] for s, t in zip(score[k], routed[k])]) for k in sets}
            cells = []
            for v in VIEWS:
                top = np.concatenate([np.array(routed[f"{v}/{t}"]) == t for t in tasks])
                served = np.concatenate([(np.array(routed[f"{v}/{t}"]) == t) & ~flagged[f"{v}/{t}"] for t in tasks])
                cells += [f"{100 * served.mean():.1f}", f"{100 * top.mean():.1f}"]
            offs = ", ".join(f"{k.split('/')[-1]} {100 * flagged[k].mean():.1f}" for k in sets if k.startswith("off/"))
            lines.append(f"| {'+'.join(map(str, layers))} (routed at {route_layer}) | {p} | {' | '.join(cells)} | "
                         f"{offs} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--tasks", default="")
    p.add_argument("--max-train", type=int, default=150)
    p.add_argument("--max-test", type=int, default=60)
    p.add_argument("--seed", type=int, default=0, help="data.seed and dtkr.seed (dev pool, sample, key init)")
    p.add_argument("--combine", default="", help="layer sets for a joint OOD test, e.g. 4+20,16+20+24")
    p.add_argument("--route-layer", type=int, default=20, help="the layer that routes in --combine rows")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    over = ["data.eval_split=dev", f"data.max_train_samples={a.max_train}", f"data.suite={a.suite}",
            f"data.seed={a.seed}", f"dtkr.seed={a.seed}"]
    if a.tasks:
        over.append(f"data.tasks=[{a.tasks}]")
    cfg = load_config(None, over)
    tasks = load_suite(a.suite).order_tasks(cfg.data.order, cfg.data.tasks or None)
    torch.set_num_threads(2)
    z = embed(cfg, a.suite, tasks, a.max_test, Path(a.out) / f"layers-{a.suite}.npz")
    if a.combine:  # the route layer alone first, as the baseline
        sets = [[a.route_layer]] + [[int(x) for x in c.split("+")] for c in a.combine.split(",")]
        lines = combined(z, sets, a.route_layer, cfg.dtkr.groups, cfg.dtkr.ood_shrinkage, cfg.dtkr.ood_rank)
        name = f"combined-{a.suite}.md"
    else:
        lines, name = scan(z, cfg.dtkr.groups, cfg.dtkr.ood_shrinkage, cfg.dtkr.ood_rank), f"layers-{a.suite}.md"
    (Path(a.out) / name).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
