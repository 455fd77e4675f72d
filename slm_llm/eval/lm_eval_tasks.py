"""Hand a suite's test records to lm-evaluation-harness, scored exactly as slm_llm scores them.

``slm-llm lm-eval-tasks --run RUN --suite NAME [--query-view VIEW]`` writes one lm-eval task
per suite task into ``<run>/eval/lm_eval/<suite>-<view>/``::

    _slm_template_yaml, utils.py   copied from eval/lm_eval/: the shared task settings, and
                                   process_results -> slm_llm.eval.metrics.score
    specs.json                     the suite's task specs (what ``score`` needs)
    <task>.jsonl                   the run's test records (``eval.max_samples``, seeded by
                                   ``data.seed``: the matrix's records) in the query view
    <task>.yaml                    task ``slm_<suite>_<task>_<view>``, tag ``slm_<suite>_<view>``
    README.md                      the ``lm_eval`` command for the base model and every adapter

Each record's ``query`` is the user turn exactly as the view builds it, for runs on the
chat template (``lm_eval --apply_chat_template`` renders it as slm_llm does); ``prompt`` is the
whole prompt as the run's template renders it, which the task reads instead for the
``alpaca`` and ``llama2`` templates. Generation is greedy, stops at the end of the turn, with
the run's token budget (``eval.max_new_tokens``, or ``eval.max_new_tokens_open`` for open
answers). An exported adapter is one task's fixed mix of slots (``slm-llm export``), the
vLLM serving path, not per-query routing.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import yaml

from slm_llm.config import Config, load_config
from slm_llm.data import DataError, end_of_turn_text, load_suite, load_task_split, render_prompt
from slm_llm.data.suites import REPO_ROOT
from slm_llm.data.templates import user_message
from slm_llm.data.views import VIEWS, records_in_view
from slm_llm.eval.metrics import answer_labels
from slm_llm.models import load_tokenizer
from slm_llm.run import RunDir
from slm_llm.utils.io import atomic_dir

TEMPLATES_DIR = REPO_ROOT / "eval" / "lm_eval"
SHARED_FILES = ("_slm_template_yaml", "utils.py")


def task_name(*parts: str) -> str:
    """An lm-eval task or tag name (letters, digits, underscores): ``slm_<part>_<part>...``."""
    return re.sub(r"\W", "_", "_".join(("slm", *parts)))


def max_new_tokens(cfg: Config, spec) -> int:
    """The matrix's budget: closed answer sets get ``eval.max_new_tokens``, open answers more."""
    return cfg.eval.max_new_tokens if answer_labels(spec) else cfg.eval.max_new_tokens_open


def write_lm_eval_tasks(run_dir: str | Path, suite_name: str, view: str = "fixed", tasks: list[str] | None = None,
                        overrides: list[str] | None = None, data_root: str | None = None) -> Path:
    """Write the task folder (atomically, replacing an older one) and return it.

    ``tasks`` defaults to every task of the suite; the run's config (with ``overrides``) picks
    the records, the template and the token budgets. An slm run's missing adapters are
    exported first, so the README's commands can evaluate every task.
    """
    from slm_llm.jare.export import export_run

    if view not in VIEWS:
        raise DataError(f"unknown query view {view!r} (known: {', '.join(VIEWS)})")
    run = RunDir(run_dir)
    cfg = load_config(run.root / "run.yaml", overrides)
    suite = load_suite(suite_name)
    names = suite.order_tasks(tasks=tasks) if tasks else list(suite.tasks)
    tokenizer = load_tokenizer(cfg.model)
    chat = cfg.data.template == "chat"
    stops = sorted({end_of_turn_text(tokenizer) if chat else "", tokenizer.eos_token or ""} - {""})
    tag = task_name(suite.name, view)
    out = run.eval_dir / "lm_eval" / f"{suite.name}-{view}"
    with atomic_dir(out) as tmp:
        for name in SHARED_FILES:
            shutil.copy(TEMPLATES_DIR / name, tmp / name)
        specs = {}
        for name in names:
            spec = suite.tasks[name]
            specs[name] = dataclasses.asdict(spec)
            records = load_task_split(suite, name, "test", data_root or cfg.data.data_root or None,
                                      cfg.eval.max_samples, cfg.data.seed)
            records = records_in_view(records, spec, view, cfg.data)
            rows = [{**dataclasses.asdict(r), "query": user_message(r),
                     "prompt": render_prompt(r, cfg.data.template, tokenizer)} for r in records]
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            task_yaml = {
                "include": "_slm_template_yaml",
                "task": task_name(suite.name, name, view),
                "tag": tag,
                "dataset_kwargs": {"data_files": {"test": str((out / f"{name}.jsonl").resolve())}},
                "doc_to_text": "query" if chat else "prompt",
                "generation_kwargs": {"until": stops, "do_sample": False, "max_gen_toks": max_new_tokens(cfg, spec)},
                "metric_list": [{"metric": spec.metric, "aggregation": "mean", "higher_is_better": True}],
            }
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(task_yaml, sort_keys=False, allow_unicode=True))
        (tmp / "specs.json").write_text(json.dumps(specs, indent=1) + "\n")
        if run.manifest()["method"] == "slm":
            export_run(run.root, overwrite=False)
        (tmp / "README.md").write_text(_readme(run, cfg, suite.name, view, names, tag, out))
    return out


def adapter_commands(run: RunDir, cfg: Config, include_path: Path, tasks: dict[str, str], tag: str
                     ) -> list[tuple[str, str]]:
    """``(what, command)`` for the base model and every exported adapter of the run, each
    adapter on its own task when the folder has it, else on the whole tag."""
    from slm_llm.jare.export import adapter_is_current, base_model_folder

    chat = " --apply_chat_template" if cfg.data.template == "chat" else ""
    base = f"pretrained={base_model_folder(cfg, run)},dtype={cfg.model.dtype}"
    results = include_path.parent / "results" / include_path.name  # outside the folder a rerun replaces
    common = f"--include_path {include_path} --batch_size 8 --log_samples --output_path {results}{chat}"
    out = [("base model", f"lm_eval --model hf --model_args {base} --tasks {tag} {common}")]
    for task in run.done_tasks():
        adapter = run.task_dir(task) / "adapter"
        if adapter_is_current(run, task):
            out.append((f"adapter {task}", f"lm_eval --model hf --model_args {base},peft={adapter.resolve()} "
                                           f"--tasks {tasks.get(task, tag)} {common}"))
    return out


def _readme(run: RunDir, cfg: Config, suite: str, view: str, names: list[str], tag: str, out: Path) -> str:
    tasks = {n: task_name(suite, n, view) for n in names}
    lines = [f"# lm-eval tasks: suite {suite}, query view {view}", "",
             f"Written by `slm-llm lm-eval-tasks --run {run.root} --suite {suite} --query-view {view}`: "
             f"{cfg.eval.max_samples or 'all'} test records per task (seed {cfg.data.seed}), template "
             f"{cfg.data.template}, greedy. The per-sample score is slm_llm's own (`utils.py` calls "
             f"`slm_llm.eval.metrics.score`), so run lm_eval from the slm_llm venv.", "",
             "| task | lm-eval task |", "|---|---|", *(f"| {n} | `{t}` |" for n, t in tasks.items()), "",
             f"Tag `{tag}` runs them all. Add `--device cpu` on a machine without a GPU.", ""]
    commands = adapter_commands(run, cfg, out, tasks, tag)
    for what, cmd in commands:
        lines += [f"{what}:", "", "```bash", cmd, "```", ""]
    if len(commands) == 1:
        lines += [f"No exported adapter is current: run `slm-llm export --run {run.root}`, then this command again.",
                  ""]
    return "\n".join(lines)
