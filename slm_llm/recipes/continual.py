"""Continual training as the CLI and `deepspeed launch/train.py` run it: set up the process, train
every stage, and fill the CL-matrix row after each one (``eval.during_training``)."""
from __future__ import annotations

import logging

from slm_llm.config import Config
from slm_llm.eval.continual import evaluate_after_task
from slm_llm.run import RunDir
from slm_llm.train.continual import run_continual
from slm_llm.train.distributed import init_distributed
from slm_llm.train.loop import install_stop_handlers


def setup_process() -> tuple[int, int]:
    """Process group (DeepSpeed, any launcher), SIGTERM/SIGUSR1 checkpoint-and-stop, logging; (rank, world)."""
    rank, world, _ = init_distributed()
    install_stop_handlers()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    return rank, world


def train(cfg: Config) -> RunDir:
    setup_process()
    return train_stages(cfg)


def train_stages(cfg: Config) -> RunDir:
    """Every stage of ``cfg``'s run (in a set-up process), each row scored after its stage when
    ``eval.during_training``."""
    return run_continual(cfg, evaluate_after_task if cfg.eval.during_training else None)
