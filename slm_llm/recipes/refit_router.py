"""Refit a finished slm run's router with other OOD settings, without retraining anything.

Each finished task's saved keys (``tasks/<n>-<task>/keys.safetensors``) are added again, in
training order, with the task's training queries re-derived exactly as training drew them
(same records, phrasings and renderings), so the task choice, slots and weights are what the
run routed before; only the OOD tests are refitted with the new ``dtkr.ood_*`` settings
(e.g. ``dtkr.ood_background=builtin`` for a run made before the background test existed).
The new router replaces ``router/`` only once it is complete, and ``run.yaml`` records the
settings, so a resumed run adds its next tasks the same way.

    slm-llm refit-router --run runs/X dtkr.ood_background=builtin
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from slm_llm.config import ConfigError, load_config
from slm_llm.data import load_suite, query_text
from slm_llm.dtkr import Router, load_keys, open_router
from slm_llm.dtkr.encoder import build_encoder
from slm_llm.dtkr.ood import background_embeddings
from slm_llm.run import RunDir, RunError
from slm_llm.train.continual import add_router_task, training_queries
from slm_llm.utils.io import write_text

OOD_KEYS = ("ood_rule", "ood_percentile", "ood_shrinkage", "ood_rank", "ood_background")


def refit_router(run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Refit ``run_dir``'s router with ``dtkr.ood_*`` overrides; returns per task the OOD settings
    before and after (``threshold``: the Gaussian's or the keys'; ``background``: has the test)."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    if manifest["method"] != "slm":
        raise RunError(f"{run.root}: a {manifest['method']} run has no router to refit")
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if key not in {f"dtkr.{k}" for k in OOD_KEYS}:
            raise ConfigError(f"refit-router changes OOD settings only ({', '.join(f'dtkr.{k}' for k in OOD_KEYS)}); "
                              f"{key!r} would invalidate the trained keys or increments")
    cfg = load_config(run.root / "run.yaml", overrides)
    encoder = build_encoder(cfg)
    old = open_router(run, cfg, encoder)
    suite = load_suite(cfg.data.suite)
    background = background_embeddings(cfg.dtkr.ood_background, encoder)
    router = Router(encoder.dim, cfg.dtkr, cfg.jare, encoder_id=encoder.id)
    for task in run.done_tasks():
        fit = encoder.encode([query_text(r) for r in training_queries(cfg, suite, task, cfg.dtkr.renderings)])
        keys, _ = load_keys(run.task_dir(task) / "keys.safetensors")
        add_router_task(router, task, keys, fit, cfg, background)
    if [(t["name"], t["first_slot"], t["n_slots"]) for t in router.tasks] != \
            [(t["name"], t["first_slot"], t["n_slots"]) for t in old.tasks]:
        raise RunError(f"{run.router_dir}: the refitted router's tasks or slots differ from the saved one")
    staging = run.root / "router.refit"
    shutil.rmtree(staging, ignore_errors=True)
    router.save(staging)
    retired = run.root / "router.old"
    shutil.rmtree(retired, ignore_errors=True)
    run.router_dir.rename(retired)
    staging.rename(run.router_dir)
    shutil.rmtree(retired)
    write_text(run.root / "run.yaml", cfg.to_yaml())
    return {t_new["name"]: {"before": {"threshold": t_old["threshold"], "background": bool(t_old.get("background"))},
                            "after": {"threshold": t_new["threshold"], "background": t_new["background"]}}
            for t_old, t_new in zip(old.tasks, router.tasks)}
