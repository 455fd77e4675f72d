"""Refit a finished slm run's router with other OOD settings, without retraining anything.

Each finished task's saved keys (``tasks/<n>-<task>/keys.safetensors``) are added again, in
training order, with the task's training queries re-derived exactly as training drew them
(same records, phrasings and renderings), so the task choice, slots and weights are what the
run routed before; only the OOD tests are refitted with the new ``dtkr.ood_*`` settings
(e.g. ``dtkr.ood_background=builtin`` for a run made before the background test existed).
``dtkr.calibration_records`` refits the whitening too (the task choice may move), never the keys:
a routed task's slots and weights are still the ones its increments were trained with. A run.yaml
from before an option existed refits without it (``BEFORE_OPTION``) unless the option is passed.
With no overrides it rebuilds the same router, in today's format (a router saved by an older
slm_llm, which ``Router.load`` refuses, is rebuilt this way). The new router replaces ``router/``
only once it is complete, and ``run.yaml`` records the settings, so a resumed run adds its next
tasks the same way. The routed cells of every row of ``eval/matrix.json`` are cleared, so
``slm-llm eval --all-rows`` scores them again, each row with its stage's new router (answers
already generated are reused): BWT never compares scores of two routers.

    slm-llm refit-router --run runs/X dtkr.ood_background=builtin
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from slm_llm.config import ConfigError, load_config
from slm_llm.data import load_suite
from slm_llm.dtkr import Router, load_keys
from slm_llm.dtkr.router import check_encoder_id, read_slots
from slm_llm.dtkr.encoder import build_encoder
from slm_llm.dtkr.evaluate import task_queries
from slm_llm.dtkr.ood import background_embeddings
from slm_llm.eval.matrix import clear_routed_row, load_matrix, metrics_of, save_matrix
from slm_llm.run import RunDir, RunError
from slm_llm.train.continual import add_router_task
from slm_llm.utils.io import write_json, write_text

REFIT_KEYS = ("ood_rule", "ood_percentile", "ood_shrinkage", "ood_rank", "ood_wording_coverage", "ood_wording_cap",
             "ood_background", "calibration_records", "ood_bare_percentile")
# what a run.yaml from before an option was added meant by leaving it out: its router was fitted without it
BEFORE_OPTION = {"calibration_records": 0, "ood_bare_percentile": 100.0}


def refit_router(run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Refit ``run_dir``'s router with ``dtkr.ood_*`` overrides. Returns ``tasks``: per task the OOD
    settings before and after (``threshold``: the Gaussian's or the keys'; ``background`` and
    ``bare_gaussian``: has the test), and ``cleared_rows``: the matrix rows whose routed cells
    await ``slm-llm eval --all-rows``."""
    run = RunDir(run_dir)
    manifest = run.manifest()
    if manifest["method"] != "slm":
        raise RunError(f"{run.root}: a {manifest['method']} run has no router to refit")
    passed = [item.split("=", 1)[0].strip() for item in overrides or []]
    for key in passed:
        if key not in {f"dtkr.{k}" for k in REFIT_KEYS}:
            raise ConfigError(f"refit-router changes the router's statistics only "
                              f"({', '.join(f'dtkr.{k}' for k in REFIT_KEYS)}); {key!r} would invalidate the "
                              "trained keys or increments")
    retired = run.root / "router.old"
    if retired.is_dir() and not run.router_dir.exists():  # an earlier refit stopped between its two renames
        retired.rename(run.router_dir)
    cfg = load_config(run.root / "run.yaml", overrides)
    saved = run.config_dict().get("dtkr") or {}
    for key, value in BEFORE_OPTION.items():
        if key not in saved and f"dtkr.{key}" not in passed:
            setattr(cfg.dtkr, key, value)
    encoder = build_encoder(cfg)
    old = read_slots(run.router_dir)  # of any format: a refit also updates an old router
    check_encoder_id(old.get("encoder_id", ""), encoder.id)
    suite = load_suite(cfg.data.suite)
    background = background_embeddings(cfg.dtkr.ood_background, encoder)
    router = Router(encoder.dim, cfg.dtkr, cfg.jare, encoder_id=encoder.id)
    staging = run.root / "router.refit"
    shutil.rmtree(staging, ignore_errors=True)
    calibration = {}  # the manifest's per-task count, as training records it
    for task in run.done_tasks():
        queries = task_queries(cfg, suite, task, cfg.dtkr.renderings)
        calibration[task] = {"calibration_records": queries.n_calibration}
        keys, _ = load_keys(run.task_dir(task) / "keys.safetensors")
        add_router_task(router, task, keys, encoder.encode(queries.texts), cfg, background, queries, encoder)
    router.save(staging)
    if [(t["name"], t["first_slot"], t["n_slots"]) for t in router.tasks] != \
            [(t["name"], t["first_slot"], t["n_slots"]) for t in old["tasks"]]:
        raise RunError(f"{run.router_dir}: the refitted router's tasks or slots differ from the saved one")
    cleared = _clear_routed_rows(run)  # first: a crash after this leaves cells to redo, never stale ones
    shutil.rmtree(retired, ignore_errors=True)
    run.router_dir.rename(retired)
    staging.rename(run.router_dir)
    shutil.rmtree(retired)
    write_text(run.root / "run.yaml", cfg.to_yaml())
    run.update_tasks(calibration)
    return {"tasks": {t_new["name"]: {"before": {"threshold": t_old["threshold"],
                                                 "background": bool(t_old.get("background")),
                                                 "bare_gaussian": bool(t_old.get("bare_gaussian"))},
                                      "after": {"threshold": t_new["threshold"], "background": t_new["background"],
                                                "bare_gaussian": t_new["bare_gaussian"]}}
                      for t_old, t_new in zip(old["tasks"], router.tasks)},
            "cleared_rows": cleared}


def _clear_routed_rows(run: RunDir) -> list[int]:
    """Clear the routed cells of every row of the matrix (see the module docstring); the rows
    that had any."""
    path = run.eval_dir / "matrix.json"
    m = load_matrix(path)
    if m is None:
        return []
    cleared = [t for t in range(len(m["stages"])) if clear_routed_row(m, t)]
    if cleared:
        save_matrix(path, m)
        write_json(run.eval_dir / "metrics.json", metrics_of(m))
    return cleared
