"""Process-group set-up that works the same under `deepspeed`, `torchrun`, `srun` and a plain `python`.

On CPU the backend is gloo and each rank gets ``cores / local ranks`` threads
(2 ranks x 2 threads on 2 cores made steps up to 40x slower here). DeepSpeed
JIT-builds C++ ops on first use; a build killed half-way leaves a ``lock`` file
that makes every later run wait forever, so stale locks are removed first.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from slm_llm.utils.env import free_port

STALE_LOCK_SECONDS = 600  # the slowest op build here takes ~90 s


def on_gpu() -> bool:
    return torch.cuda.is_available()


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; return (rank, world_size, local_rank)."""
    import deepspeed

    env = os.environ
    if "SLURM_PROCID" in env and "RANK" not in env:  # srun without our sbatch wrapper
        env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_NTASKS"]
    if "RANK" not in env:  # a plain single process
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if not on_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")
        if "OMP_NUM_THREADS" not in env:
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if local_rank == 0:
            remove_stale_build_locks()
    else:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", verbose=False)
    return rank, world, local_rank


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group an entry point set up (:func:`init_distributed`)."""
    if not torch.distributed.is_initialized():
        raise RuntimeError("no process group: the entry point (slm_llm.recipes) calls init_distributed() first")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def remove_stale_build_locks() -> list[Path]:
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    removed = []
    for lock in root.glob("**/lock"):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
            removed.append(lock)
    return removed


def training_environment(precision: str) -> dict[str, object]:
    """Where a task was trained, for the run manifest: device, process-group backend, world size,
    precision (inside the process group an entry point set up, :func:`init_distributed`)."""
    _, world = rank_and_world()
    device = torch.cuda.get_device_name(torch.cuda.current_device()) if on_gpu() else "cpu"
    return {"device": device, "backend": str(torch.distributed.get_backend()), "world_size": world,
            "precision": precision, "torch": torch.__version__}


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_mean(*values: float) -> list[float]:
    """Mean of each value over all ranks, in one all-reduce (on the GPU under NCCL)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [float(v) for v in values]
    device = f"cuda:{torch.cuda.current_device()}" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return (t / torch.distributed.get_world_size()).tolist()
