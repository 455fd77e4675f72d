"""Routing accuracy of DTKR on a task suite, in the continual protocol.

Tasks arrive in suite order. Task t's keys are trained on task t's training queries
only (optionally pushed away from the frozen keys of tasks < t); no old data is kept.
After the last task, every evaluation query is routed alone (batch size 1) and the
routed task is compared with the true one.

    slm-llm router-eval --suite cl9 --query-mode input-only [dtkr.key=value ...]
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from slm_llm.config import DtkrConfig
from slm_llm.dtkr.encoder import Encoder
from slm_llm.dtkr.keys import init_keys, train_keys
from slm_llm.dtkr.router import Router
from slm_llm.utils.io import atomic_path, write_json, write_text


def load_queries(
    suite, task: str, query_mode: str, data_root=None, max_train: int = 400, max_test: int = 300,
    eval_split: str = "test", dev_fraction: float = 0.25, seed: int = 0,
) -> tuple[list[str], list[str]]:
    """(train query texts, evaluation query texts) of one task.

    eval_split="test": up to ``max_train`` training and ``max_test`` test queries.
    eval_split="dev": for choosing settings without touching test; the training split
    (up to max_train + max_test records) is shuffled and ``dev_fraction`` of it (at
    most max_test) is held out for evaluation, the rest (at most max_train) trains.
    """
    from slm_llm.data.suites import load_task_split
    from slm_llm.data.templates import query_text

    if eval_split == "test":
        train = load_task_split(suite, task, "train", data_root, max_samples=max_train, seed=seed)
        test = load_task_split(suite, task, "test", data_root, max_samples=max_test, seed=seed)
    elif eval_split == "dev":
        records = load_task_split(suite, task, "train", data_root, max_samples=max_train + max_test, seed=seed)
        records = list(records)
        random.Random(seed).shuffle(records)
        n_dev = min(max_test, max(1, int(round(len(records) * dev_fraction))))
        test, train = records[:n_dev], records[n_dev:][:max_train]
    else:
        raise ValueError(f"eval_split {eval_split!r} is not one of test, dev")
    return [query_text(r, query_mode) for r in train], [query_text(r, query_mode) for r in test]


def build_router_continual(
    train_emb: dict[str, np.ndarray], cfg: DtkrConfig, slots_per_task: int, top_k: int, encoder_id: str,
) -> Router:
    """Add tasks in the order of ``train_emb``: init keys, train them (centrifugal against
    the router's frozen keys), calibrate on the task's own training queries, add.
    Task t's embeddings are used only while task t is added."""
    dim = next(iter(train_emb.values())).shape[1]
    router = Router.from_config(dim, cfg, top_k, encoder_id, device=cfg.index_device)
    n_keys = slots_per_task * cfg.keys_per_slot
    for task, emb in train_emb.items():
        keys = init_keys(emb, n_keys, cfg.groups, cfg.key_init, cfg.seed)
        keys = train_keys(emb, keys, cfg, frozen_keys=router.all_keys())
        router.add_task(task, keys, train_emb=emb)
    return router


def router_eval(
    suite: Any,
    data_root: str | Path | None = None,
    cfg: DtkrConfig | None = None,
    query_mode: str | None = None,
    max_train: int = 400,
    max_test: int = 300,
    *,
    slots_per_task: int = 4,
    top_k: int = 2,
    order: str = "default",
    tasks: list[str] | None = None,
    eval_split: str = "test",
    dev_fraction: float = 0.25,
    data_seed: int = 0,
    encoder: Encoder | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Continual routing accuracy at batch size 1; returns (and, with ``out_dir``, writes) the report.

    suite: a suite name ("instruct6", "cl9"), a suite YAML path, or a Suite.
    query_mode: "full" | "input-only" (default: cfg.query_mode).
    Result keys: per_task {task: accuracy}, overall (micro accuracy), mean_task (macro),
    confusion (rows: true task, columns: routed task, counts), tasks, ood_rate (share of
    in-distribution queries flagged OOD), latency_ms (p50/p99 per routed query, encoder
    excluded), settings. Files: router_eval.json, confusion.txt, confusion.png.
    """
    from slm_llm.data.suites import Suite, load_suite

    cfg = cfg or DtkrConfig()
    cfg.validate()
    query_mode = query_mode or cfg.query_mode
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    names = suite.order_tasks(order, tasks)
    encoder = encoder or Encoder(cfg.encoder, batch_size=cfg.encode_batch_size)

    train_emb, eval_emb = {}, {}
    for task in names:
        train_q, eval_q = load_queries(suite, task, query_mode, data_root, max_train, max_test, eval_split,
                                       dev_fraction, data_seed)
        train_emb[task] = encoder.encode(train_q, progress=progress)
        eval_emb[task] = encoder.encode(eval_q, progress=progress)

    t0 = time.perf_counter()
    router = build_router_continual(train_emb, cfg, slots_per_task, top_k, encoder.id)
    build_s = time.perf_counter() - t0

    index = {t: i for i, t in enumerate(names)}
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    latencies, n_ood = [], 0
    for task in names:
        for row in eval_emb[task]:
            t1 = time.perf_counter()
            decision = router.route(row[None, :])[0]  # batch size 1: each query on its own
            latencies.append(time.perf_counter() - t1)
            confusion[index[task], index[decision.task]] += 1
            n_ood += decision.ood
    per_task = {t: float(confusion[i, i] / max(1, confusion[i].sum())) for t, i in index.items()}
    report = {
        "suite": suite.name, "query_mode": query_mode, "eval_split": eval_split, "tasks": names,
        "per_task": per_task,
        "overall": float(np.trace(confusion) / max(1, confusion.sum())),
        "mean_task": float(np.mean(list(per_task.values()))),
        "confusion": confusion.tolist(),
        "confused_pairs": confused_pairs(confusion, names),
        "ood_rate": float(n_ood / max(1, confusion.sum())),
        "latency_ms": {"p50": float(np.percentile(latencies, 50) * 1e3),
                       "p99": float(np.percentile(latencies, 99) * 1e3)},
        "build_s": build_s,
        "n_train": {t: len(e) for t, e in train_emb.items()}, "n_eval": {t: len(e) for t, e in eval_emb.items()},
        "settings": {"encoder": encoder.id, "slots_per_task": slots_per_task, "top_k": top_k,
                     "max_train": max_train, "max_test": max_test, "dtkr": vars(cfg).copy()},
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "router_eval.json", report)
        write_text(out_dir / "confusion.txt", format_confusion(confusion, names))
        plot_confusion(confusion, names, out_dir / "confusion.png",
                       f"{suite.name} {query_mode}: routing accuracy {report['overall']:.1%}")
    return report


def confused_pairs(confusion: np.ndarray, names: list[str], top: int = 5) -> list[dict[str, Any]]:
    """The largest off-diagonal cells: (true task, routed task, count, share of the true task)."""
    off = [(int(confusion[i, j]), i, j) for i in range(len(names)) for j in range(len(names))
           if i != j and confusion[i, j]]
    off.sort(reverse=True)
    return [{"true": names[i], "routed": names[j], "count": c, "share": c / max(1, int(confusion[i].sum()))}
            for c, i, j in off[:top]]


def format_confusion(confusion: np.ndarray, names: list[str]) -> str:
    """Text table: rows are true tasks, columns routed tasks, last column accuracy."""
    width = min(12, max(6, max(len(n) for n in names)))
    short = [n[:width] for n in names]
    lines = ["true \\ routed".ljust(width) + " " + " ".join(s.rjust(width) for s in short) + "   acc"]
    for i, name in enumerate(short):
        row = " ".join(str(int(c)).rjust(width) for c in confusion[i])
        acc = confusion[i, i] / max(1, confusion[i].sum())
        lines.append(name.ljust(width) + " " + row + f"  {acc:6.1%}")
    return "\n".join(lines) + "\n"


def plot_confusion(confusion: np.ndarray, names: list[str], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(names), 0.8 + 0.6 * len(names)))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("routed task")
    ax.set_ylabel("true task")
    ax.set_title(title, fontsize=9)
    for i in range(len(names)):
        for j in range(len(names)):
            if confusion[i, j]:
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
