"""The embedded default job (`slm-llm quickstart`): SmolLM2-135M-Instruct on CPU, offline.

Trains SLM and the sequential-LoRA baseline on three instruct6 domains, fills both CL matrices
in every query view, compares them with the oracle and zero-shot modes, exports each task as
a PEFT adapter and writes the reports.
"""
from __future__ import annotations

import time
from pathlib import Path

from slm_llm.config import Config
from slm_llm.eval.compare import run_dir_of
from slm_llm.eval.report import write_report
from slm_llm.jare.export import export_run
from slm_llm.recipes.compare import compare

METHODS = ["slm", "oracle", "seq_lora", "base"]


def quickstart(cfg: Config) -> list[str]:
    """Run the job; returns the lines it prints at the end (table, timings, where everything is)."""
    t0 = time.time()
    table = compare(cfg, METHODS)  # trains slm and seq_lora, fills their matrices
    slm_run, seq_run = run_dir_of(cfg, "slm"), run_dir_of(cfg, "seq_lora")
    reports = [write_report(slm_run, table["paths"]["json"]), write_report(seq_run, table["paths"]["json"])]
    exported = export_run(slm_run, overwrite=False)  # one PEFT LoRA per task, for vLLM / lm-eval
    return ["", Path(table["paths"]["markdown"]).read_text(),
            f"quickstart finished in {(time.time() - t0) / 60:.1f} min",
            f"  slm run:        {slm_run.resolve()}",
            f"  seq_lora run:   {seq_run.resolve()}",
            f"  table:          {table['paths']['markdown']}  ({table['paths']['json']})",
            f"  reports:        {'  '.join(str(r) for r in reports)}",
            f"  PEFT adapters:  {', '.join(str(p) for p in exported.values())}",
            f"next: slm-llm serve --run {slm_run}   |   slm-llm ifeval --run {slm_run} --limit 50 --max-new-tokens 256"]
