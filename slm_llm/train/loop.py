"""Train one task's increments with a DeepSpeed engine; checkpoint and resume mid-task.

The data order is a function of (seed, epoch) only and is cut into global batches
before it is split across ranks, so 1 process with grad_accum=2 and 2 processes
with grad_accum=1 see the same samples in every optimizer step, and a resumed run
sees exactly the samples the killed one would have.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from slm_llm.config import TrainConfig
from slm_llm.errors import SlmError
from slm_llm.train.distributed import all_mean


class StopRequested(SlmError):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint (SLURM preemption)."""


_stop = {"signal": None}


def install_stop_handlers() -> None:
    """SIGTERM/SIGUSR1 ask the loop to checkpoint at the next step and stop."""
    def handler(signum, _frame):
        _stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def global_micro_batches(n: int, cfg: TrainConfig, world: int, rank: int, epoch: int,
                         lengths: list[int] | None = None) -> list[list[int]]:
    """This rank's micro-batches for one epoch, in step order (grad_accum of them per step).

    With ``lengths``, each global batch is sorted by length before it is cut, so its
    micro-batches hold samples of similar length and carry little padding; which samples
    form a step is unchanged.
    """
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    gb = cfg.micro_batch_size * cfg.grad_accum * world
    steps = math.ceil(n / gb)
    perm += perm[: steps * gb - n]  # the last global batch wraps around to stay full
    out = []
    for s in range(steps):
        batch = perm[s * gb : (s + 1) * gb]
        if lengths is not None:
            batch = sorted(batch, key=lambda i: lengths[i])
        for a in range(cfg.grad_accum):
            start = (a * world + rank) * cfg.micro_batch_size
            out.append(batch[start : start + cfg.micro_batch_size])
    return out


def total_steps(n: int, cfg: TrainConfig, world: int, stages_covered: int = 1) -> int:
    """Optimizer steps of one stage over ``n`` samples. ``train.max_steps`` is per task, so a
    stage that covers several tasks at once (multitask: all of them) gets it that many times:
    every method then takes the same total number of steps."""
    if cfg.max_steps:
        return cfg.max_steps * stages_covered
    per_epoch = math.ceil(n / (cfg.micro_batch_size * cfg.grad_accum * world))
    return max(1, int(math.ceil(per_epoch * cfg.epochs)))


@dataclass
class TaskResult:
    steps: int
    losses: list[float] = field(default_factory=list)


def train_task(
    engine,
    examples: list[dict],
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    cfg: TrainConfig,
    ckpt_dir: Path,
    log_path: Path,
    rank: int,
    world: int,
    steps: int,
    desc: str = "train",
) -> TaskResult:
    per_epoch = math.ceil(len(examples) / (cfg.micro_batch_size * cfg.grad_accum * world))
    step = _resume(engine, ckpt_dir)
    if rank == 0:
        _truncate_log(log_path, step)
    result = TaskResult(steps=steps)
    bar = tqdm(total=steps, initial=step, desc=desc, disable=rank != 0, dynamic_ncols=True)
    t0, window_tokens, window_t = time.time(), 0, time.time()
    lengths = [len(e["input_ids"]) for e in examples]
    while step < steps:
        epoch, in_epoch = divmod(step, per_epoch)
        micro = global_micro_batches(len(examples), cfg, world, rank, epoch, lengths)
        step_loss, step_tokens = 0.0, 0
        for ids in micro[in_epoch * cfg.grad_accum : (in_epoch + 1) * cfg.grad_accum]:
            batch = {k: v.to(engine.device) for k, v in collate([examples[i] for i in ids]).items()}
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / cfg.grad_accum
            step_tokens += int(batch["attention_mask"].sum().item())
        step += 1
        # One all-reduce per step: the loss, the tokens, and whether any rank got a stop signal,
        # so that every rank checkpoints at the same step (a signal reaches ranks at different times).
        loss_mean, tokens_mean, stop_any = all_mean(step_loss, step_tokens, _stop["signal"] is not None)
        tokens = int(round(tokens_mean * world))
        stop = stop_any > 0
        result.losses.append(loss_mean)
        window_tokens += tokens
        if rank == 0:
            now = time.time()
            rate = window_tokens / max(now - window_t, 1e-9)
            bar.set_postfix(loss=f"{loss_mean:.4f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if step % cfg.log_every == 0 or step == steps:
                record = {"step": step, "epoch": epoch, "loss": loss_mean, "lr": engine.get_lr()[0],
                          "tokens": tokens, "tok_per_s": rate, "elapsed_s": now - t0}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                window_tokens, window_t = 0, now
        if step < steps and (stop or (cfg.ckpt_every and step % cfg.ckpt_every == 0)):
            _save(engine, ckpt_dir, step)
        if stop and step < steps:
            bar.close()
            got = f"signal {_stop['signal']}" if _stop["signal"] else "a signal to another rank"
            raise StopRequested(f"stopped by {got} at step {step}/{steps}; checkpoint saved")
    bar.close()
    return result


def _save(engine, ckpt_dir: Path, step: int) -> None:
    state = {
        "step": step,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state=state, exclude_frozen_parameters=True)
    if engine.global_rank == 0:  # keep only the newest resume point
        for old in ckpt_dir.glob("step*"):
            if old.name != f"step{step}":
                shutil.rmtree(old, ignore_errors=True)


def _resume(engine, ckpt_dir: Path) -> int:
    if not (ckpt_dir / "latest").exists():
        return 0
    _, state = engine.load_checkpoint(str(ckpt_dir), load_module_strict=False)
    if state is None:
        return 0
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["step"])


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so the log reads as one uninterrupted run."""
    if not log_path.exists():
        return
    lines = [l for l in log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    log_path.write_text("".join(l + "\n" for l in lines))
