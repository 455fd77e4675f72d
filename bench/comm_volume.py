"""Communication volume per optimizer step under ZeRO-1/2/3: JARe against full fine-tuning.

Runs each (stage, trainable set) on 1 and 2 CPU processes with DeepSpeed's comms
logger on, turns the logged collectives into bytes each rank sends (ring algorithms),
and prints them beside the model of docs/scaling.md (N ranks, b bytes per element):
    ZeRO-1/2: 3 (N-1)/N b T         gradient all-reduce (2) + all-gather of updated partitions (1)
    ZeRO-3:   (N-1)/N b (g A + T)   all-gather of every partitioned parameter, frozen ones
                                    included, g times a step (1 when they stay live from forward
                                    to backward, 2 when they are released), + gradient reduce-scatter
with T trainable and A all parameters.

    .venv/bin/python bench/comm_volume.py            # drives every child run (~5 min)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPE = ["model.name=tiny-llama", "model.tiny_hidden_size=256", "model.tiny_layers=4", "model.tiny_heads=4",
         "model.tiny_kv_heads=2", "model.tiny_intermediate_size=512", "jare.rank=8", "jare.slots_per_task=4"]


def child(stage: int, full: bool) -> None:
    import torch
    import deepspeed
    import deepspeed.comm as dist

    from slm_llm.config import load_config
    from slm_llm.jare import JareModel
    from slm_llm.models import load_base_model
    from slm_llm.train.distributed import init_distributed
    from slm_llm.train.engine import build_engine, load_ds_config

    rank, world, _ = init_distributed()
    cfg = load_config(None, SHAPE + ["train.micro_batch_size=2"])
    base, _ = load_base_model(cfg.model)
    model = JareModel(base, cfg.jare)
    torch.manual_seed(0)
    model.add_task("t")
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    ds = load_ds_config(REPO / f"ds_configs/zero{stage}.json", cfg.train, world)
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    engine = build_engine(model, cfg.train, ds, total_steps=10)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(rank))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                 slot_ids=torch.tensor([[0, 1], [2, 3]]), slot_weights=torch.full((2, 2), 0.5))

    def step():
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()

    step()  # warm-up: excludes the one-off broadcasts of initialisation
    dist.comms_logger.reset_data()
    steps = 3
    for _ in range(steps):
        step()
    per_op = {op: sum(wire_bytes(op, size, world) * rec[0] for size, rec in sizes.items()) / steps
              for op, sizes in dist.comms_logger.get_raw_data().items()}
    if rank == 0:
        print("RESULT " + json.dumps({"stage": stage, "full": full, "world": world, "trainable": trainable,
                                       "total": total, "bytes_per_step": sum(per_op.values()), "ops": per_op}))
    del deepspeed


def wire_bytes(op: str, logged: float, n: int) -> float:
    """Bytes one rank sends for a collective whose logged message size is ``logged``.

    The logger records all_reduce and reduce_scatter by their whole tensor, and
    all_gather_into_tensor by the rank's input partition.
    """
    if n == 1:
        return 0.0
    if op.startswith("all_reduce"):
        return 2 * (n - 1) / n * logged
    if op.startswith("all_gather"):
        return (n - 1) * logged
    if op.startswith("reduce_scatter"):
        return (n - 1) / n * logged
    return logged  # broadcast and the rest: tiny here


def predicted(stage: int, n: int, trainable: int, total: int, gathers: int = 1, b: int = 4) -> float:
    if stage < 3:
        return 3 * (n - 1) / n * b * trainable
    return (n - 1) / n * b * (gathers * total + trainable)


def main() -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    for stage in (1, 2, 3):
        for full in (False, True):
            for world in (1, 2):
                args = [__file__, "--child", str(stage), str(int(full))]
                launcher = [sys.executable] if world == 1 else [str(Path(sys.executable).parent / "deepspeed"),
                                                                "--num_gpus", "2", "--master_port", "29733"]
                out = subprocess.run(launcher + args, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(out.stdout[-2000:] + out.stderr[-4000:])
                rows.append(json.loads(line[7:]))
    print(f"{'stage':<6}{'trainable set':<16}{'world':>6}{'trainable':>12}{'all params':>12}"
          f"{'measured MB/rank':>18}{'model MB/rank':>15}{'ratio':>7}")
    for r in rows:
        pred = predicted(r["stage"], r["world"], r["trainable"], r["total"])
        meas = r["bytes_per_step"]
        ratio = f"{meas / pred:.2f}" if pred else ("-" if not meas else "inf")
        print(f"{r['stage']:<6}{'full FT' if r['full'] else 'JARe':<16}{r['world']:>6}{r['trainable']:>12,}"
              f"{r['total']:>12,}{meas / 1e6:>18.3f}{pred / 1e6:>15.3f}{ratio:>7}")
    for r in rows:
        if r["world"] == 2:
            print(f"zero{r['stage']} {'full' if r['full'] else 'jare'} ops: " +
                  ", ".join(f"{k}={v / 1e6:.3f}MB" for k, v in sorted(r["ops"].items())))


if __name__ == "__main__":
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        child(int(sys.argv[i + 1]), bool(int(sys.argv[i + 2])))
    else:
        main()
