"""`slm-llm` subcommands of evaluation: eval, compare, report, ifeval, lm-eval-tasks."""
from __future__ import annotations

import json


def register(sub, add_config_args) -> None:
    """Add this package's subparsers to ``sub``; each sets ``fn`` to a function(args) -> exit code."""
    p = sub.add_parser("eval", help="fill the continual-learning matrix row of a run's last finished stage")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--all-rows", action="store_true", help="every finished stage's row with cells missing "
                   "(an slm run's rows routed by each stage's router): BWT for a run trained without "
                   "eval.during_training, or after refit-router")
    _add_view_arg(p)
    p.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.max_samples=20")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("compare", help="train/evaluate slm, oracle, seq_lora, multitask and base; write one table")
    add_config_args(p)
    p.add_argument("--methods", default="slm,oracle,seq_lora,multitask,base",
                   help="comma-separated subset of slm,oracle,seq_lora,multitask,base,olora")
    p.add_argument("--out", default=None, help="table path (.json; a .md is written beside it); "
                                                "default <run_dir>-compare.json")
    p.add_argument("--seeds", default=None, help="comma-separated seeds: every method once per seed "
                   "(<run_dir>-s<seed>-<method>), then <run_dir>-seeds.{json,md,png} with 95%% intervals")
    p.add_argument("--lr-grid", default=None, help="comma-separated learning rates: each training method's rate "
                   "is first picked on the dev split (<run_dir>-lr<rate>-<method>, <run_dir>-lr.{json,md}); with --seeds, "
                   "by the mean dev AP over those seeds (<run_dir>-lr<rate>-s<seed>-<method>)")
    p.add_argument("--final-row", action="store_true", help="evaluate each run after its last task only: AP "
                   "without BWT, all a choice on dev (data.eval_split=dev) needs")
    _add_view_arg(p)
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("report", help="eval/report.md and plots of a run (and a compare table)")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--compare", default=None, help="a compare table JSON to plot beside the run")
    _add_view_arg(p, "the view the report leads with (default: the matrix's first, the run's headline)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("ifeval", help="IFEval (541 prompts, lm-eval's checkers): base, routed slm, each task forced")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on IFEval's 1280-token budget (CPU: e.g. 256); "
                        "default eval.ifeval_max_new_tokens, 0 = none")
    p.add_argument("--limit", type=int, default=0, help="first N prompts only (0 = all 541)")
    p.add_argument("--batch-size", type=int, default=None, help="generation batch; default eval.batch_size")
    p.add_argument("--data-root", default=None, help="holds ifeval/ and nltk_data/; default data.data_root, "
                                                     "$SLM_DATA, ../shared/data")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    p.set_defaults(fn=cmd_ifeval)

    p = sub.add_parser("lm-eval-tasks", help="lm-evaluation-harness task YAMLs for a suite's test records, "
                                             "scored as we score them, and the lm_eval commands per adapter")
    p.add_argument("--run", required=True, help="run folder (its eval settings, template and adapters)")
    p.add_argument("--suite", required=True, help="suite name (eval/suites/) or YAML path")
    p.add_argument("--query-view", default="fixed", choices=("fixed", "paraphrase", "input-only"),
                   help="how each test record is worded (slm_llm/data/views.py)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks (default all)")
    p.add_argument("--data-root", default=None, help="default data.data_root, $SLM_DATA, ../shared/data")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run's config, e.g. eval.max_samples=0")
    p.set_defaults(fn=cmd_lm_eval_tasks)


def _add_view_arg(p, help_: str | None = None) -> None:
    p.add_argument("--query-view", default=None, help=help_ or "comma-separated query views to score, headline first: "
                   "paraphrase (held-out phrasings), input-only, fixed (the dataset's instruction); "
                   "default eval.views")


def _view_overrides(args) -> list[str]:
    return [f"eval.views={args.query_view}"] if args.query_view else []


def cmd_eval(args) -> int:
    from slm_llm.eval.continual import evaluate_run
    from slm_llm.eval.matrix import metrics_of

    m = evaluate_run(args.run, [*args.overrides, *_view_overrides(args)], all_rows=args.all_rows)
    print(json.dumps(metrics_of(m), indent=1))
    return 0


def cmd_compare(args) -> int:
    from slm_llm.config import load_config
    from slm_llm.eval.compare import parse_methods
    from slm_llm.recipes.compare import compare

    cfg = load_config(args.config, [*args.overrides, *_view_overrides(args)])
    methods, lrs = parse_methods(args.methods), None
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else None
    if args.lr_grid:
        from slm_llm.recipes.compare import select_lrs

        selection = select_lrs(cfg, methods, _floats(args.lr_grid, "--lr-grid"), seeds)
        print(open(selection["paths"]["markdown"]).read())
        lrs = selection["chosen"]
    if seeds:
        from slm_llm.recipes.compare import compare_seeds

        table = compare_seeds(cfg, methods, seeds, lrs, args.final_row)
        print(open(table["paths"]["markdown"]).read())
        print(f"table: {table['paths']['json']}  {table['paths']['markdown']}  {table['paths']['plot']}")
        return 0
    table = compare(cfg, methods, args.out, lrs, args.final_row)
    print(open(table["paths"]["markdown"]).read())
    print(f"table: {table['paths']['json']}  {table['paths']['markdown']}")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    from slm_llm.config import ConfigError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"{flag} needs at least one learning rate, all > 0; got {text!r}")
    return values


def cmd_report(args) -> int:
    from slm_llm.eval.report import write_report

    path = write_report(args.run, args.compare, args.query_view)
    print(f"report: {path}")
    return 0


def cmd_ifeval(args) -> int:
    from slm_llm.eval.ifeval import SCORES, run_ifeval

    result = run_ifeval(args.run, args.overrides, args.max_new_tokens, args.limit, args.data_root, args.batch_size)
    width = max(len(m) for m in result["modes"])
    print(f"{'mode':<{width}}  " + "  ".join(f"{k:>18}" for k in SCORES))
    for mode, r in result["modes"].items():
        print(f"{mode:<{width}}  " + "  ".join(f"{r[k]:>18.1f}" for k in SCORES))
    print(f"results: {result['path']}")
    return 0


def cmd_lm_eval_tasks(args) -> int:
    from slm_llm.eval.lm_eval_tasks import write_lm_eval_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    out = write_lm_eval_tasks(args.run, args.suite, args.query_view, tasks, args.overrides, args.data_root)
    print((out / "README.md").read_text())
    print(f"lm-eval tasks: {out}")
    return 0
