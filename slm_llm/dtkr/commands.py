"""`slm-llm` subcommands of this package: route, router-eval."""
from __future__ import annotations

import json


def register(sub, add_config_args) -> None:
    """Add this package's subparsers to ``sub``; each sets ``fn`` to a function(args) -> exit code."""
    p = sub.add_parser("route", help="route queries with a run's DTKR router: top-K slots, task, score, OOD")
    p.add_argument("--run", required=True, help="run folder (its router/ is used)")
    p.add_argument("queries", nargs="+", help="raw query texts (instruction and input, no template)")
    p.add_argument("--k", type=int, default=None, help="slots per query (default: the router's K)")
    p.add_argument("--json", action="store_true", help="one JSON decision per line")
    p.set_defaults(fn=cmd_route)

    p = sub.add_parser("router-eval", help="continual routing accuracy of DTKR on a suite, at batch size 1")
    add_config_args(p)
    p.add_argument("--suite", default=None, help="instruct6 | cl9 | a suite YAML (default: data.suite)")
    p.add_argument("--query-mode", choices=("full", "input-only"), default=None, help="default: dtkr.query_mode")
    p.add_argument("--data-root", default=None, help="default: data.data_root, $SLM_DATA, ../shared/data")
    p.add_argument("--max-train", type=int, default=400, help="training queries per task (keys)")
    p.add_argument("--max-test", type=int, default=300, help="evaluation queries per task")
    p.add_argument("--eval-split", choices=("test", "dev"), default="test",
                   help="dev: hold out part of train (for choosing settings without test)")
    p.add_argument("--out", default=None, help="folder for router_eval.json, confusion.txt, confusion.png")
    p.set_defaults(fn=cmd_router_eval)


def cmd_route(args) -> int:
    from pathlib import Path

    from slm_llm.config import load_config
    from slm_llm.dtkr.encoder import build_encoder
    from slm_llm.dtkr.router import Router, format_decision

    encoder = build_encoder(load_config(Path(args.run) / "run.yaml"), cache=False)
    router = Router.load(Path(args.run) / "router", encoder_id=encoder.id)
    for text, d in zip(args.queries, router.route_texts(args.queries, encoder, k=args.k)):
        print(json.dumps({"query": text, **d.to_dict()}) if args.json else format_decision(d, text))
    return 0


def cmd_router_eval(args) -> int:
    import numpy as np

    from slm_llm.config import load_config
    from slm_llm.dtkr.encoder import build_encoder
    from slm_llm.dtkr.evaluate import format_confusion, router_eval

    cfg = load_config(args.config, args.overrides)
    r = router_eval(args.suite or cfg.data.suite, args.data_root or cfg.data.data_root or None, cfg.dtkr,
                    args.query_mode, args.max_train, args.max_test, slots_per_task=cfg.jare.slots_per_task,
                    top_k=cfg.jare.top_k, order=cfg.data.order, tasks=cfg.data.tasks or None,
                    eval_split=args.eval_split, encoder=build_encoder(cfg), out_dir=args.out, progress=True)
    print(format_confusion(np.array(r["confusion"]), r["tasks"]))
    pairs = ", ".join(f"{p['true']}->{p['routed']} {p['count']}" for p in r["confused_pairs"][:3])
    print(f"{r['suite']} {r['query_mode']} ({r['eval_split']}): accuracy {r['overall']:.2%} "
          f"(mean over tasks {r['mean_task']:.2%}); OOD flagged {r['ood_rate']:.1%}; "
          f"p50 {r['latency_ms']['p50']:.3f} ms/query; most confused: {pairs or 'none'}")
    if args.out:
        print(f"written: {args.out}/router_eval.json, confusion.txt, confusion.png")
    return 0
