"""`slm-llm` subcommands of serving: export, serve, vllm-gap."""
from __future__ import annotations


def register(sub, add_config_args) -> None:
    """Add this package's subparsers to ``sub``; each sets ``fn`` to a function(args) -> exit code."""
    p = sub.add_parser("export", help="export each finished task as a PEFT LoRA adapter (tasks/<n>-<task>/adapter)")
    p.add_argument("--run", required=True, help="run folder (runs/<name>)")
    p.add_argument("--task", action="append", help="only this task (repeatable); default: every finished task")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over a run (hf: exact JARe; vllm: adapters)")
    p.add_argument("--run", required=True, help="run folder (runs/<name>)")
    p.add_argument("--backend", choices=("hf", "vllm"), help="default: serve.backend of the run config")
    p.add_argument("--host", help="default: serve.host")
    p.add_argument("--port", type=int, help="default: serve.port")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. serve.api_key=secret")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("vllm-gap", help="score an evaluated slm run's test queries through vLLM (exported adapters) "
                                        "against its exact JARe predictions; <run>/eval/vllm_gap.{json,md}")
    p.add_argument("--run", required=True, help="a finished slm run evaluated by `slm-llm eval` (its final row)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N evaluated queries per task and view (vLLM on a small CPU is slow)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. serve.vllm_device=cuda")
    p.set_defaults(fn=cmd_vllm_gap)


def cmd_vllm_gap(args) -> int:
    from slm_llm.recipes.vllm_gap import vllm_gap

    result = vllm_gap(args.run, args.overrides, args.limit)
    for view, v in result["views"].items():
        print(f"{view}: AP exact JARe {v['ap_exact']:.1f}, vLLM {v['ap_vllm']:.1f} (gap {v['ap_gap']:+.1f})")
    print(f"table: {args.run}/eval/vllm_gap.md")
    return 0


def cmd_export(args) -> int:
    from slm_llm.jare.export import export_run

    for task, path in export_run(args.run, args.task).items():
        print(f"{task}: {path}")
    return 0


def cmd_serve(args) -> int:
    from slm_llm.serve.server import serve

    serve(args.run, args.backend, args.host, args.port, args.overrides)
    return 0
