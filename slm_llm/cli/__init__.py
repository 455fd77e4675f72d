"""The `slm-llm` command. Each subcommand is a thin shell over a recipe or a library function.

Errors: an :class:`slm_llm.errors.SlmError` (bad config, data, run folder, model, adapter, ...)
prints as one line and exits 2; a checkpoint-and-stop signal exits 3 (SLURM requeues on it);
anything else is a bug: one line saying so, and the traceback in a log file (exit 1).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

STOPPED = 3  # exit code after a signal-triggered checkpoint (launch/slurm/train.sbatch requeues on it)
USER_ERROR = 2
INTERNAL_ERROR = 1
COMMAND_MODULES = ("slm_llm.cli.dtkr", "slm_llm.cli.serve", "slm_llm.cli.eval")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (configs/*.yaml, eval/*.yaml); defaults apply when omitted")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-3")


def load_args_config(args):
    from slm_llm.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from slm_llm.recipes.continual import train

    run = train(load_args_config(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {run.root}")
    return 0


def cmd_quickstart(args) -> int:
    """Train SLM and the sequential-LoRA baseline on a few domains, evaluate, export, report."""
    from slm_llm.config import load_config
    from slm_llm.recipes.quickstart import quickstart

    cfg = load_config(args.config or _repo_file("configs/quickstart.yaml"), args.overrides)
    print(f"quickstart: {cfg.model.name} on {', '.join(cfg.data.tasks)} "
          f"({cfg.data.max_train_samples} train / {cfg.eval.max_samples} test samples per task, "
          f"query views {', '.join(cfg.eval.views)})")
    print("\n".join(quickstart(cfg)))
    return 0


def cmd_prepare_model(args) -> int:
    from slm_llm.models import load_base_model

    cfg = load_args_config(args)
    model, _ = load_base_model(cfg.model)
    print(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters ready")
    return 0


def _repo_file(rel: str) -> str:
    return str(Path(__file__).resolve().parents[2] / rel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm-llm", description="Continual LLM fine-tuning with JARe + DTKR (SLM).")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:  # each group registers its own subcommands
        importlib.import_module(module).register(sub, add_config_args)
    for name, fn, help_ in [
        ("train", cmd_train, "continual training over a suite (one process; use `deepspeed launch/train.py` for more)"),
        ("quickstart", cmd_quickstart, "the embedded default job: SmolLM2-135M on CPU, offline"),
        ("prepare-model", cmd_prepare_model, "convert/load the base model once (e.g. the packaged GGUF)"),
    ]:
        p = sub.add_parser(name, help=help_)
        add_config_args(p)
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    from slm_llm.errors import SlmError
    from slm_llm.train.loop import StopRequested

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except StopRequested as e:
        print(f"slm-llm {args.command}: {e}", file=sys.stderr)
        return STOPPED
    except SlmError as e:
        print(f"slm-llm {args.command}: error: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"slm-llm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (a bug: keep the traceback, show one line)
        log = _write_traceback(args.command)
        print(f"slm-llm {args.command}: internal error ({type(e).__name__}: {str(e)[:300]}). This is a bug; "
              f"please report it with the traceback in {log}", file=sys.stderr)
        return INTERNAL_ERROR


def _write_traceback(command: str) -> Path:
    root = Path(os.environ.get("SLM_CACHE") or Path.home() / ".cache" / "slm_llm") / "logs"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{command}.log"
    path.write_text(f"slm-llm {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    return path


if __name__ == "__main__":
    sys.exit(main())
