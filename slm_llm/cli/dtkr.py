"""`slm-llm` subcommands of routing: route, route-check, refit-router, router-eval."""
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

    p = sub.add_parser("route-check", help="route a run's test records in phrasings you write (and off-domain "
                                           "requests) through its router: served, top-1, OOD per phrasing")
    p.add_argument("--run", required=True, help="run folder (its router/ and run.yaml are used)")
    p.add_argument("--phrasings", required=True,
                   help="YAML: phrasings: {task: [phrasing, ...]}, optional off_domain: [request, ...]")
    p.add_argument("--max-test", type=int, default=100, help="evaluation records per task (default 100)")
    p.add_argument("--data-root", default=None, help="default: the run's data.data_root, $SLM_DATA, ../shared/data")
    p.add_argument("--out", default=None, help="folder for route_check.json and route_check.md")
    p.set_defaults(fn=cmd_route_check)

    p = sub.add_parser("refit-router", help="refit a finished slm run's router with other dtkr.ood_* settings "
                                            "(keys, slots and increments unchanged)")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("overrides", nargs="*", help="dtkr.ood_* overrides, e.g. dtkr.ood_background=builtin")
    p.set_defaults(fn=cmd_refit_router)

    p = sub.add_parser("router-eval",
                       help="continual routing quality of DTKR on a suite, per query view, at batch size 1")
    add_config_args(p)
    p.add_argument("--suite", default=None, help="instruct6 | cl9 | a suite YAML (default: data.suite)")
    p.add_argument("--query-view", default=None,
                   help="comma-separated views: paraphrase, input-only, fixed (default: eval.views)")
    p.add_argument("--data-root", default=None, help="default: data.data_root, $SLM_DATA, ../shared/data")
    p.add_argument("--max-train", type=int, default=None,
                   help="training queries per task (default: the --config's data.max_train_samples, else 400)")
    p.add_argument("--max-test", type=int, default=None,
                   help="evaluation queries per task and view (default: the --config's eval.max_samples, else 300)")
    p.add_argument("--eval-split", choices=("test", "dev"), default=None,
                   help="dev: each task's dev pool and dev phrasings (choosing settings without test); "
                        "default data.eval_split")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (data sample, phrasings, key init)")
    p.add_argument("--off-domain", default="", help="comma-separated off-domain sets: ifeval, suite names, or files of "
                                                        "your own requests (.txt one per line, .jsonl with 'prompt')")
    p.add_argument("--ood-sweep", default="", help="comma-separated ood_percentile values to re-score")
    p.add_argument("--out", default=None, help="folder for router_eval_seeds.json and per-seed confusions")
    p.set_defaults(fn=cmd_router_eval)


def cmd_route(args) -> int:
    from pathlib import Path

    from slm_llm.config import load_config
    from slm_llm.dtkr.encoder import build_encoder
    from slm_llm.dtkr.router import format_decision, open_router
    from slm_llm.run import RunDir

    cfg = load_config(Path(args.run) / "run.yaml")
    encoder = build_encoder(cfg, cache=False)
    router = open_router(RunDir(args.run), cfg, encoder)
    for text, d in zip(args.queries, router.route_texts(args.queries, encoder, k=args.k)):
        print(json.dumps({"query": text, **d.to_dict()}) if args.json else format_decision(d, text))
    return 0


def cmd_route_check(args) -> int:
    from pathlib import Path

    from slm_llm.config import load_config
    from slm_llm.data import load_suite
    from slm_llm.dtkr.encoder import build_encoder
    from slm_llm.dtkr.phrasing_check import format_check, load_check_file, route_check
    from slm_llm.dtkr.router import open_router
    from slm_llm.run import RunDir
    from slm_llm.utils.io import write_json, write_text

    run = RunDir(args.run)
    cfg = load_config(run.root / "run.yaml")
    if args.data_root:
        cfg.data.data_root = args.data_root
    tasks = run.done_tasks()
    spec = load_check_file(args.phrasings, tasks)
    encoder = build_encoder(cfg, cache=False)
    router = open_router(run, cfg, encoder)
    trained = {t: p.get("train", []) for t, p in (run.manifest().get("phrasings") or {}).items()}
    result = route_check(router, encoder, cfg, load_suite(cfg.data.suite), spec, args.max_test, trained)
    text = format_check(result)
    print(text, end="")
    if args.out:
        write_json(Path(args.out) / "route_check.json", result)
        write_text(Path(args.out) / "route_check.md", text)
        print(f"written: {args.out}/route_check.{{json,md}}")
    return 0


def cmd_refit_router(args) -> int:
    from slm_llm.recipes.refit_router import refit_router

    result = refit_router(args.run, args.overrides)
    for task, r in result["tasks"].items():
        before, after = r["before"], r["after"]
        tests = (("background", "background test"), ("bare_gaussian", "bare-input Gaussian"))
        print(f"{task}: threshold {before['threshold']:.4g} -> {after['threshold']:.4g}, "
              + ", ".join(f"{name} {'yes' if before[k] else 'no'} -> {'yes' if after[k] else 'no'}" for k, name in tests))
    print(f"refitted: {args.run}/router (run.yaml records the settings)")
    if result["cleared_rows"]:
        rows = ", ".join(str(t) for t in result["cleared_rows"])
        print(f"eval/matrix.json: the slm cells and routing of rows {rows} were scored with the old router and are "
              f"cleared; `slm-llm eval --run {args.run} --all-rows` scores them again (cached answers are reused)")
    return 0


def router_eval_sizes(args, cfg) -> tuple[int, int]:
    """(training queries, evaluation queries) per task: the flags, else the --config's
    data.max_train_samples and eval.max_samples, else 400 and 300."""
    train, test = (cfg.data.max_train_samples, cfg.eval.max_samples) if args.config else (400, 300)
    return (train if args.max_train is None else args.max_train), (test if args.max_test is None else args.max_test)


def cmd_router_eval(args) -> int:
    from slm_llm.config import load_config
    from slm_llm.dtkr.encoder import build_encoder
    from slm_llm.dtkr.evaluate import router_eval_seeds

    cfg = load_config(args.config, args.overrides)
    if args.data_root:
        cfg.data.data_root = args.data_root
    cfg.data.max_train_samples, max_test = router_eval_sizes(args, cfg)
    cfg.data.eval_split = args.eval_split or cfg.data.eval_split
    views = _csv(args.query_view) or cfg.eval.views
    r = router_eval_seeds(cfg, [int(s) for s in _csv(args.seeds)], suite=args.suite, views=views,
                          max_test=max_test,
                          off_domain=_csv(args.off_domain), ood_percentiles=[float(p) for p in _csv(args.ood_sweep)],
                          encoder=build_encoder(cfg), out_dir=args.out, progress=True)
    s = r["summary"]
    print(f"{r['suite']} ({r['eval_split']}, seeds {','.join(map(str, r['seeds']))}), mean ± sd:")
    for view in views:
        print(f"  {view:>10}: served by own task {_pct(s, view + '.served')}  top-1 {_pct(s, view + '.top1')}  "
              f"OOD {_pct(s, view + '.ood_rate')}")
    for name in _csv(args.off_domain):
        print(f"  off-domain {name}: flagged OOD {_pct(s, 'off_domain.' + name)}")
    for p in _csv(args.ood_sweep):
        cells = "  ".join(f"{k} {_pct(s, f'sweep.{float(p)}.{k}')}" for k in [*views, *(f"off:{n}" for n in
                                                                                     _csv(args.off_domain))])
        print(f"  ood_percentile {p}: {cells}")
    if args.out:
        print(f"written: {args.out}/router_eval_seeds.json")
    return 0


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _pct(summary: dict, key: str) -> str:
    v = summary.get(key)
    return "n/a" if v is None else f"{100 * v['mean']:.1f} ± {100 * v['sd']:.1f}"
