"""`slm-llm` subcommands of serving: export, serve."""
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


def cmd_export(args) -> int:
    from slm_llm.jare.export import export_run

    for task, path in export_run(args.run, args.task).items():
        print(f"{task}: {path}")
    return 0


def cmd_serve(args) -> int:
    from slm_llm.serve.server import serve

    serve(args.run, args.backend, args.host, args.port, args.overrides)
    return 0
