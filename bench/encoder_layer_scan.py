"""Which base-model block to route with: dev routing and OOD rates per layer, one encoding pass.

The base model's mean-pooled residual stream after blocks 4..24 is computed once for every dev
query (train queries, the paraphrase and input-only views of the dev pool, another suite and the
IFEval prompts as off-domain sets) and cached in ``<out>/layers-<suite>.npz``. For each layer a
whitened k-means router is built continually and each task's Gaussian OOD test is calibrated out
of fold (``slm_llm.dtkr.ood``); the table gives, per layer and OOD percentile, the share of dev
queries served by their own task and the share of off-domain queries flagged.

    python bench/encoder_layer_scan.py --suite instruct6 --tasks math_gsm8k,finance_phrasebank,\
medical_medmcqa,law_overruling,science_arc_easy --out runs/layer_scan
    python bench/encoder_layer_scan.py --suite cl9 --max-train 120 --max-test 50 --out runs/layer_scan
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
        texts[f"train/{t}"] = train
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


def scan(z: dict[str, np.ndarray], groups: int, shrinkage: float, rank: int) -> list[str]:
    lines = ["| layer | OOD percentile | paraphrase served | paraphrase top-1 | input-only served | input-only top-1 | "
             "off-domain flagged |", "|---|---|---|---|---|---|---|"]
    router_cfg = load_config(None, ["dtkr.whiten=true", "dtkr.key_init=kmeans", "dtkr.epochs=0"])
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--tasks", default="")
    p.add_argument("--max-train", type=int, default=150)
    p.add_argument("--max-test", type=int, default=60)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    over = ["data.eval_split=dev", f"data.max_train_samples={a.max_train}", f"data.suite={a.suite}"]
    if a.tasks:
        over.append(f"data.tasks=[{a.tasks}]")
    cfg = load_config(None, over)
    tasks = load_suite(a.suite).order_tasks(cfg.data.order, cfg.data.tasks or None)
    torch.set_num_threads(2)
    z = embed(cfg, a.suite, tasks, a.max_test, Path(a.out) / f"layers-{a.suite}.npz")
    lines = scan(z, cfg.dtkr.groups, cfg.dtkr.ood_shrinkage, cfg.dtkr.ood_rank)
    (Path(a.out) / f"layers-{a.suite}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
