"""DeepSpeed engine construction from a ds_configs JSON with "auto" values filled from our config."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from slm_llm.config import ConfigError, TrainConfig


def load_ds_config(path: str | Path, train: TrainConfig, world_size: int) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill every "auto" from ``train``; unknown autos are an error."""
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed: {path} does not exist (see ds_configs/)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    fills = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "bf16.enabled": train.precision == "bf16",
        "optimizer.params.lr": train.lr,
        "optimizer.params.weight_decay": train.weight_decay,
    }
    for dotted, value in fills.items():
        node, *_ = _lookup(ds, dotted)
        if node is not None and node[dotted.rsplit(".", 1)[-1]] == "auto":
            node[dotted.rsplit(".", 1)[-1]] = value
    leftover = [k for k, v in _flatten(ds).items() if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: no value for 'auto' key(s) {leftover}")
    return ds


def _lookup(d: dict, dotted: str):
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.get(p)
        if not isinstance(d, dict):
            return None, leaf
    return (d, leaf) if leaf in d else (None, leaf)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    warmup = int(round(total_steps * warmup_ratio))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_engine(model: torch.nn.Module, train: TrainConfig, ds: dict[str, Any], total_steps: int):
    """One engine per task: only the parameters that require grad reach the optimizer."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the model has no open task")
    schedule = lr_lambda(total_steps, train.warmup_ratio, train.min_lr_ratio)
    optimizer = None
    if "optimizer" not in ds:
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds,
    )
    return engine
