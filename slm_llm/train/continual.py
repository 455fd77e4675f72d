"""The continual driver: for each task in order, keys -> increments -> router -> artifacts -> eval.

Reads top to bottom like a recipe. A task already marked done in the manifest is
skipped, and a task cut short resumes from its last DeepSpeed checkpoint, so
rerunning the same command after a crash or a SLURM requeue finishes the job.
Rank 0 writes every artifact; the other ranks wait at barriers.

``train.method`` picks what is trained per stage:
    slm        each task gets its own P slots, routed by its own DTKR keys
    seq_lora   one shared adapter (rank P*r) trained on each task in turn: forgets
    multitask  that adapter trained once on every task's data: the upper bound
    olora      O-LoRA: a new LoRA per task, orthogonal to the frozen old ones, all summed (train/olora.py)
"""
from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from slm_llm.config import SHARED_ADAPTER as SHARED
from slm_llm.config import Config, shared_adapter_config
from slm_llm.data import (Collator, DataError, Suite, load_suite, own_wordings, own_wordings_record, query_text,
                          run_records, task_split, tokenize_example)
from slm_llm.dtkr import Router, init_keys, load_keys, open_router, routing_tensors, save_keys, score_matrix, train_keys
from slm_llm.dtkr.encoder import Encoder, build_encoder, check_slot_span
from slm_llm.dtkr.evaluate import TaskQueries, task_queries
from slm_llm.dtkr.ood import background_embeddings, needs_bare
from slm_llm.jare import JareModel
from slm_llm.models import load_base_model, load_tokenizer, model_id
from slm_llm.run import RunDir
from slm_llm.train.distributed import barrier, rank_and_world, training_environment
from slm_llm.train.engine import build_engine, load_ds_config, zero_stage
from slm_llm.train.loop import total_steps, train_task
from slm_llm.train.olora import OLoraObjective, olora_model

log = logging.getLogger("slm_llm.train")
MULTITASK = "multitask"


@dataclass
class TaskRouting:
    """Training-time routing of one stage's samples."""

    slot_ids: np.ndarray  # [N, K] global slot ids
    weights: np.ndarray  # [N, K], rows sum to 1
    mean_weights: np.ndarray  # [P] mean weight of each of the stage's slots (for export)


def phrasing_record(cfg: Config, suite: Suite, task: str) -> dict:
    """What the manifest keeps of how a task is worded: its pool's split, or, for a task without
    a pool, that its records' own instructions are used (refused when they are one constant)."""
    spec = suite.tasks[task]
    if own_wordings(spec):
        try:
            evaluated = run_records(suite, task, "eval", cfg.data)
        except DataError:  # no evaluation split (e.g. a single file): nothing to count
            evaluated = None
        return own_wordings_record(spec, run_records(suite, task, "train", cfg.data), evaluated)
    return task_split(spec, cfg.data).record()


def add_router_task(router: Router, task: str, keys: torch.Tensor, fit: np.ndarray, cfg: Config,
                    background_emb: np.ndarray | None, queries: TaskQueries, encoder: Encoder) -> None:
    """Add ``task`` with its trained ``keys`` to ``router``, its OOD tests fitted on ``fit``, the
    embeddings of ``queries.texts`` (``background_emb``: the ``dtkr.ood_background`` requests',
    or None: no background test), and on ``queries.bare`` when a test uses them."""
    bare = encoder.encode(queries.bare) if needs_bare(cfg.dtkr, background_emb) else None
    router.add_task(task, keys, score_matrix(fit, keys).max(1), train_emb=fit,
                    train_records=queries.record_of, background_emb=background_emb,
                    bare_emb=bare, train_wordings=np.asarray(queries.wordings))


def task_routing(router: Router, task: str, emb: np.ndarray) -> TaskRouting:
    """Top-K among ``task``'s own slots, scored exactly as inference scores them."""
    decisions = router.route(emb, restrict_task=task)
    ids, weights = (t.numpy() for t in routing_tensors(decisions))
    slots = router.task_slots(task)
    dense = np.zeros((len(emb), len(slots)))
    np.add.at(dense, (np.arange(len(emb))[:, None], ids - slots.start), weights)
    return TaskRouting(ids, weights, dense.mean(0))


def shared_routing(n: int) -> TaskRouting:
    """The baselines: every sample uses the one shared slot with weight 1."""
    return TaskRouting(np.zeros((n, 1), dtype=np.int64), np.ones((n, 1), dtype=np.float32), np.ones(1))


def all_tasks_routing(n: int, tasks: int) -> TaskRouting:
    """O-LoRA: every sample uses every task's one slot (the new one and the frozen old ones) at weight 1."""
    return TaskRouting(np.tile(np.arange(tasks), (n, 1)), np.ones((n, tasks), dtype=np.float32), np.ones(1))


def run_continual(cfg: Config, after_task: Callable[[Config, RunDir, int], object] | None = None) -> RunDir:
    """Train every stage of ``cfg`` not yet done in its run folder. ``after_task(cfg, run, t)`` runs on
    rank 0 after stage t is saved (the recipes fill the CL-matrix row there). The process group,
    signal handlers and logging are the entry point's (``slm_llm.recipes.continual.setup_process``)."""
    rank, world = rank_and_world()
    method = cfg.train.method
    suite = load_suite(cfg.data.suite)
    tasks = suite.order_tasks(cfg.data.order, cfg.data.tasks or None)
    stages = [MULTITASK] if method == "multitask" else tasks
    encoder = build_encoder(cfg)
    if method == "slm":
        check_slot_span(cfg.dtkr, encoder)  # before the run folder exists
    run = RunDir(cfg.run_dir)
    if rank == 0:
        phrasings = {t: phrasing_record(cfg, suite, t) for t in tasks} if cfg.data.phrasing == "pool" else None
        run.init(cfg, model_id(cfg.model), encoder.id, stages, suite_tasks=tasks, phrasings=phrasings)
    barrier()
    ds = load_ds_config(cfg.train.deepspeed, cfg.train, world)
    tokenizer = load_tokenizer(cfg.model)
    collate = Collator(tokenizer.pad_token_id)

    renderings = cfg.dtkr.renderings if method == "slm" else 1

    for t, stage in enumerate(stages):
        tag = f"[{t + 1}/{len(stages)}] {stage}"
        if stage in run.done_tasks():
            log.info(f"{tag}: done, skipped")
            continue
        tdir = run.task_dir(stage)
        tdir.mkdir(parents=True, exist_ok=True)
        router_q = None if stage == MULTITASK else task_queries(cfg, suite, stage, renderings)
        # each training record in data.wordings wordings, drawn as the router's queries are (their prefix)
        wordings = cfg.data.wordings
        if router_q is not None and wordings <= renderings:
            records = router_q.sample[: router_q.n_sample // renderings * wordings]
        else:
            records = [r for task in (tasks if router_q is None else [stage])
                       for r in task_queries(cfg, suite, task, wordings, calibration=False).records]

        if method == "slm":
            # 1. DTKR keys on this task's queries only (old tasks' keys are frozen; no old data).
            fit = encoder.encode(router_q.texts)  # [R*N + calibration, D]
            sample = fit[: router_q.n_sample]
            emb = sample[: len(records)] if len(records) <= len(sample) else \
                encoder.encode([query_text(r) for r in records])
            router = open_router(run, cfg, encoder, create=True)
            if rank == 0 and not (tdir / "keys.safetensors").exists():
                keys = init_keys(sample, cfg.jare.slots_per_task * cfg.dtkr.keys_per_slot, cfg.dtkr.groups,
                                 cfg.dtkr.key_init, cfg.dtkr.seed + t)
                keys = train_keys(sample, keys, cfg.dtkr, frozen_keys=router.all_keys())
                save_keys(tdir / "keys.safetensors", keys, {"task": stage, "encoder": encoder.id})
            barrier()
            keys, _ = load_keys(tdir / "keys.safetensors")
            if stage not in router.task_names:  # (it is, if a crash fell between router save and manifest)
                background = background_embeddings(cfg.dtkr.ood_background, encoder)
                add_router_task(router, stage, keys, fit, cfg, background, router_q, encoder)  # saved with the task
            routing = task_routing(router, stage, emb)
            # 2. Increments: base + old tasks (frozen) + this task's new slots (trainable).
            model, name = _jare_model(cfg, run, stages[:t]), stage
            torch.manual_seed(cfg.train.seed + t)  # the same slot init on every rank and world size
            model.add_task(name)
        elif method == "olora":
            routing = all_tasks_routing(len(records), t + 1)
            model, name = olora_model(cfg, run, stages[:t], stage, cfg.train.seed + t), stage
        else:
            routing = shared_routing(len(records))
            model, name = _shared_model(cfg, run, stages[t - 1] if t else None, cfg.train.seed), SHARED

        examples = [
            {**tokenize_example(r, tokenizer, cfg.data.template, cfg.data.max_length, cfg.data.truncation),
             "slot_ids": routing.slot_ids[i].tolist(), "slot_weights": routing.weights[i].tolist()}
            for i, r in enumerate(records)
        ]
        steps = total_steps(list(Counter(r.task for r in records).values()), cfg.train, world)
        engine = build_engine(OLoraObjective(model, cfg.train) if method == "olora" else model, cfg.train, ds, steps)
        result = train_task(engine, examples, collate, cfg.train, tdir / "ckpt", tdir / "train_log.jsonl",
                            rank, world, steps, desc=tag)
        _save_increments(model, name, tdir / "increments.safetensors", ds, rank)

        # 3. Router, manifest and the CL-matrix row (rank 0), then everyone moves on.
        if rank == 0:
            shutil.rmtree(tdir / "ckpt", ignore_errors=True)  # the increments are the artifact now
            if method == "slm":
                router.save(run.router_dir)
            run.mark_task_done(stage, {
                "train_samples": len(records),
                "steps": steps,
                "final_loss": result.losses[-1] if result.losses else None,
                "mean_weights": routing.mean_weights.round(6).tolist(),
                **({"calibration_records": router_q.n_calibration} if method == "slm" else {}),
                "trained_on": training_environment(cfg.train.precision),
            })
            log.info(f"{tag}: trained, loss {result.losses[-1] if result.losses else float('nan'):.4f}")
            if after_task is not None:
                after_task(cfg, run, t)
        del engine, model
        barrier()
    return run


def _jare_model(cfg: Config, run: RunDir, done: list[str]) -> JareModel:
    base, _ = load_base_model(cfg.model)
    model = JareModel(base, cfg.jare)
    for task in done:
        model.load_task(task, run.task_dir(task) / "increments.safetensors")
    return model


def _shared_model(cfg: Config, run: RunDir, previous: str | None, seed: int) -> JareModel:
    """The baselines' adapter, continuing from the previous stage's snapshot (trainable)."""
    base, _ = load_base_model(cfg.model)
    model = JareModel(base, shared_adapter_config(cfg.jare))
    torch.manual_seed(seed)
    model.add_task(SHARED)
    if previous is not None:
        from safetensors.torch import load_file

        model.load_task_state(SHARED, load_file(str(run.task_dir(previous) / "increments.safetensors")))
    return model


def _save_increments(model: JareModel, task: str, path: Path, ds: dict, rank: int) -> None:
    params = model.task_parameters(task)
    if zero_stage(ds) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            if rank == 0:
                model.save_task(task, path)
    elif rank == 0:
        model.save_task(task, path)
    barrier()
