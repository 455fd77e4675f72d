"""Methods side by side in one harness: SLM, its oracle and zero-shot modes, and the baselines.

    slm        JARe + DTKR, routed per query          run <run_dir>-slm
    oracle     the slm run with the true task's slots (the routing upper bound)
    base       the slm run with no increments (zero-shot)
    seq_lora   one LoRA trained through the tasks     run <run_dir>-seq_lora
    multitask  one LoRA trained on all tasks at once  run <run_dir>-multitask
    olora      O-LoRA: a LoRA per task, orthogonal    run <run_dir>-olora

Each training method's run is trained (or resumed) in process by the continual driver,
which fills its matrix after every stage; a run that is already complete is only
evaluated where its matrix lacks a cell. With several seeds, each seed is such a
comparison (``<run_dir>-s<seed>``), and the seeds' table carries intervals. With a learning-rate
grid, each training method's rate is first picked on the dev split (:func:`select_lrs`).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from slm_llm.config import Config
from slm_llm.eval.compare import TRAINED_BY, build_table, lr_markdown, method_config, table_markdown
from slm_llm.eval.continual import evaluate_run
from slm_llm.eval.seeds import plot_seeds, seed_config, seeds_markdown, seeds_table
from slm_llm.eval.stats import mean_sd
from slm_llm.recipes.continual import setup_process, train_stages
from slm_llm.utils.io import write_json, write_text

log = logging.getLogger("slm_llm.recipes")


def compare(cfg: Config, methods: list[str], out: str | Path | None = None,
            lrs: dict[str, float] | None = None, final_row_only: bool = False) -> dict[str, Any]:
    """Train/evaluate what ``methods`` need (each training method at ``lrs[method]`` when given,
    else ``train.lr``), then write and return the comparison table. With ``final_row_only`` (AP is
    all choosing on dev needs) each run is evaluated after its last task only: no BWT."""
    setup_process()
    for train_method in dict.fromkeys(TRAINED_BY[m] for m in methods):
        mcfg = method_config(cfg, train_method, every_row=not final_row_only)
        if lrs:
            mcfg.train.lr = lrs[train_method]
        log.info(f"compare: {train_method} -> {mcfg.run_dir}")
        run = train_stages(mcfg)
        # fills what is missing: every row of an slm run (each stage's router), the last of a baseline
        evaluate_run(run.root, _eval_overrides(cfg), all_rows=train_method == "slm" and not final_row_only)
    table = build_table(cfg, methods)
    out = Path(out) if out else Path(f"{cfg.run_dir}-compare.json")
    write_json(out, table)
    write_text(out.with_suffix(".md"), table_markdown(table))
    table["paths"] = {"json": str(out), "markdown": str(out.with_suffix(".md"))}
    return table


def compare_seeds(cfg: Config, methods: list[str], seeds: list[int],
                  lrs: dict[str, float] | None = None, final_row_only: bool = False) -> dict[str, Any]:
    """Run (or resume) the comparison once per seed, then write and return the interval table
    ``<run_dir>-seeds.{json,md,png}``."""
    tables = {}
    for s in seeds:
        log.info(f"compare: seed {s}")
        tables[s] = compare(seed_config(cfg, s), methods, lrs=lrs, final_row_only=final_row_only)
    table = seeds_table(cfg, methods, seeds, tables)
    out = Path(f"{cfg.run_dir}-seeds.json")
    write_json(out, table)
    write_text(out.with_suffix(".md"), seeds_markdown(table))
    plot_seeds(table, out.with_suffix(".png"))
    table["paths"] = {"json": str(out), "markdown": str(out.with_suffix(".md")), "plot": str(out.with_suffix(".png"))}
    return table


def select_lrs(cfg: Config, methods: list[str], grid: list[float], seeds: list[int] | None = None) -> dict[str, Any]:
    """Each training method's learning rate, picked from ``grid`` on the dev split: one comparison
    per rate at ``<run_dir>-lr<rate>`` with ``data.eval_split=dev`` (each task's dev pool, never
    its test split; the final row only), scored by the method's own AP in the headline view,
    strict. With ``seeds``, each rate runs once per seed (``<run_dir>-lr<rate>-s<seed>``: each seed
    its own dev records, phrasings and initialisation) and the mean AP over the seeds decides. A tie
    goes to the smaller rate. Writes and returns ``<run_dir>-lr.{json,md}``: ``{"chosen": {method: lr},
    "dev_ap": {method: {lr: mean AP}}, "dev_ap_seeds": {method: {lr: [AP per seed]}}, "seeds", "view"}``."""
    train_methods = list(dict.fromkeys(TRAINED_BY[m] for m in methods))
    view, grid = cfg.eval.views[0], sorted(grid)
    per_seed: dict[str, dict[str, list[float]]] = {m: {f"{lr:g}": [] for lr in grid} for m in train_methods}
    for lr in grid:
        c = copy.deepcopy(cfg)
        c.train.lr, c.data.eval_split, c.run_dir = lr, "dev", f"{cfg.run_dir}-lr{lr:g}"
        for dev in [seed_config(c, s) for s in seeds] if seeds else [c]:
            log.info(f"compare: learning rate {lr:g} on dev -> {dev.run_dir}-<method>")
            cells = compare(dev, train_methods, final_row_only=True)["cells"][view]["strict"]
            for m in train_methods:
                per_seed[m][f"{lr:g}"].append(cells[m]["ap"])
    dev_ap = {m: {lr: mean_sd(aps)["mean"] for lr, aps in by_lr.items()} for m, by_lr in per_seed.items()}
    chosen = {m: float(max(aps, key=lambda k: (aps[k], -float(k)))) for m, aps in dev_ap.items()}
    result = {"view": view, "grid": grid, "seeds": list(seeds) if seeds else [cfg.train.seed], "chosen": chosen,
              "dev_ap": dev_ap, "dev_ap_seeds": per_seed}
    out = Path(f"{cfg.run_dir}-lr.json")
    write_json(out, result)
    write_text(out.with_suffix(".md"), lr_markdown(result))
    result["paths"] = {"json": str(out), "markdown": str(out.with_suffix(".md"))}
    return result


def _eval_overrides(cfg: Config) -> list[str]:
    e = cfg.eval
    return [f"eval.max_samples={e.max_samples}", f"eval.max_new_tokens={e.max_new_tokens}",
            f"eval.max_new_tokens_open={e.max_new_tokens_open}", f"eval.batch_size={e.batch_size}",
            f"eval.fwt={str(e.fwt).lower()}", f"eval.views={','.join(e.views)}"]
