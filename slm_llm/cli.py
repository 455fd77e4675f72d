"""The `slm-llm` command. Each subcommand is a thin shell over a library function."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

STOPPED = 3  # exit code after a signal-triggered checkpoint (launch/slurm/train.sbatch requeues on it)
COMMAND_MODULES = ("slm_llm.dtkr.commands", "slm_llm.serve.commands", "slm_llm.eval.commands")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (configs/*.yaml); defaults apply when omitted")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-3")


def _load(args):
    from slm_llm.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from slm_llm.train.continual import run_continual

    cfg = _load(args)
    run = run_continual(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {run.root}")
    return 0


def cmd_quickstart(args) -> int:
    """Train SLM and the sequential-LoRA baseline on a few domains, evaluate, export, report."""
    import logging
    import time

    from slm_llm.config import load_config
    from slm_llm.eval.compare import compare, run_dir_of
    from slm_llm.eval.report import write_report
    from slm_llm.jare.export import export_run

    t0 = time.time()
    cfg = load_config(args.config or _repo_file("configs/quickstart.yaml"), args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"quickstart: {cfg.model.name} on {', '.join(cfg.data.tasks)} "
          f"({cfg.data.max_train_samples} train / {cfg.eval.max_samples} test samples per task)")
    table = compare(cfg, ["slm", "oracle", "seq_lora", "base"])  # trains slm and seq_lora, fills their matrices
    slm_run = run_dir_of(cfg, "slm")
    reports = [write_report(slm_run, table["paths"]["json"]),
               write_report(run_dir_of(cfg, "seq_lora"), table["paths"]["json"])]
    exported = export_run(slm_run, overwrite=False)  # one PEFT LoRA per task, for vLLM / lm-eval
    adapters = ", ".join(str(p) for p in exported.values())
    print("\n" + open(table["paths"]["markdown"]).read())
    print(f"quickstart finished in {(time.time() - t0) / 60:.1f} min")
    print(f"  slm run:        {slm_run.resolve()}")
    print(f"  seq_lora run:   {run_dir_of(cfg, 'seq_lora').resolve()}")
    print(f"  table:          {table['paths']['markdown']}  ({table['paths']['json']})")
    print(f"  reports:        {'  '.join(str(r) for r in reports)}")
    print(f"  PEFT adapters:  {adapters}")
    print(f"next: slm-llm ifeval --run {slm_run}   |   slm-llm serve --run {slm_run}")
    return 0


def cmd_convert_model(args) -> int:
    from slm_llm.models import load_base_model

    cfg = _load(args)
    model, _ = load_base_model(cfg.model)
    print(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters ready")
    return 0


def _repo_file(rel: str) -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent / rel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm-llm", description="Continual LLM fine-tuning with JARe + DTKR (SLM).")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:  # each package registers its own subcommands
        importlib.import_module(module).register(sub, _add_config_args)
    for name, fn, help_ in [
        ("train", cmd_train, "continual training over a suite (one process; use `deepspeed launch/train.py` for more)"),
        ("quickstart", cmd_quickstart, "the embedded default job: SmolLM2-135M on CPU, offline"),
        ("prepare-model", cmd_convert_model, "convert/load the base model once (e.g. the packaged GGUF)"),
    ]:
        p = sub.add_parser(name, help=help_)
        _add_config_args(p)
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    from slm_llm.config import ConfigError
    from slm_llm.data.schema import DataError
    from slm_llm.run import RunError

    from slm_llm.train.loop import StopRequested

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except StopRequested as e:
        print(f"slm-llm {args.command}: {e}", file=sys.stderr)
        return STOPPED
    except (ConfigError, DataError, RunError, FileNotFoundError) as e:
        print(f"slm-llm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
