"""Does a trained run's router hold on how *your* users ask? Route its test records in phrasings
you write, and requests no task should take, through the run's own router.

The check file (YAML)::

    phrasings:                 # per task of the run: how users ask; "{input}" marks the content
      finance_phrasebank:      # (default: the content follows after a blank line)
        - "Just saw this in the news feed: {input} Good or bad for shareholders?"
      law_overruling: ["Is precedent being overturned here? {input}"]
    off_domain:                # optional: requests no task covers (should be flagged OOD)
      - "Write a haiku about autumn."

Each listed task's evaluation records (the run's test split, or its dev pool under
``data.eval_split=dev``) are worded in every one of its phrasings and routed one by one, as
the server routes them. Reported per phrasing and task: *served* (routed to its own task and
not flagged OOD), *top-1* (its own task, flagged or not) and the OOD rate; for
``off_domain``, the share flagged. A phrasing the run trained on is marked: it measures
nothing new.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slm_llm.config import Config, yaml_error
from slm_llm.data import DataError, Suite, query_text, run_records
from slm_llm.data.views import as_request, content, phrase
from slm_llm.dtkr.encoder import Encoder
from slm_llm.dtkr.router import Router

_KEYS = ("phrasings", "off_domain")


@dataclass
class CheckSpec:
    phrasings: dict[str, list[str]]  # task -> phrasings
    off_domain: list[str]


def load_check_file(path: str | Path, tasks: list[str]) -> CheckSpec:
    """Read and validate a check file against the run's ``tasks``; errors name the file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise DataError(f"{path}: cannot read the check file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise DataError(yaml_error(path, e)) from None
    if not isinstance(raw, dict) or not raw.get("phrasings"):
        raise DataError(f"{path}: expected a mapping with a non-empty 'phrasings' (task -> list of phrasings)")
    unknown = set(raw) - set(_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {list(_KEYS)}")
    if not isinstance(raw["phrasings"], dict):
        raise DataError(f"{path}: 'phrasings' must map task names to lists of phrasings")
    phrasings = {}
    for task, items in raw["phrasings"].items():
        if task not in tasks:
            raise DataError(f"{path}: phrasings.{task}: the run has no task {task!r} (tasks: {', '.join(tasks)})")
        phrasings[task] = _strings(items, path, f"phrasings.{task}")
    off = _strings(raw["off_domain"], path, "off_domain") if raw.get("off_domain") is not None else []
    return CheckSpec(phrasings, off)


def _strings(items: Any, path: Path, key: str) -> list[str]:
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: {key} must be a non-empty list of strings")
    for i, s in enumerate(items):
        if not isinstance(s, str) or not s.strip():
            raise DataError(f"{path}: {key}[{i}] must be a non-empty string, got {s!r}")
    return items


def route_check(router: Router, encoder: Encoder, cfg: Config, suite: Suite, spec: CheckSpec, max_test: int,
                trained: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Route every listed task's evaluation records in each of its phrasings, and the off-domain
    requests; ``trained`` (task -> the run's train phrasings) marks phrasings it trained on."""
    trained = trained or {}
    rows, tally = [], {"n": 0, "served": 0, "top1": 0}
    per_task = {}
    for task, phrasings in spec.phrasings.items():
        records = run_records(suite, task, "eval", cfg.data, max_test)
        if not records:
            raise DataError(f"task {task!r}: no {cfg.data.eval_split} records to word")
        kind = suite.tasks[task].content
        t = {"n": 0, "served": 0, "top1": 0}
        for p in phrasings:
            texts = [query_text(as_request(r, phrase(p, content(r, kind)))) for r in records]
            decisions = router.route_texts(texts, encoder)
            top1 = sum(d.task == task for d in decisions)
            served = sum(d.task == task and not d.ood for d in decisions)
            wrong: dict[str, int] = {}
            for d in decisions:
                if d.task != task:
                    wrong[d.task] = wrong.get(d.task, 0) + 1
            rows.append({"task": task, "phrasing": p, "n": len(texts), "served": served / len(texts),
                         "top1": top1 / len(texts), "ood": sum(d.ood for d in decisions) / len(texts),
                         "routed_elsewhere": wrong, "trained_on": p in trained.get(task, ())})
            for acc in (t, tally):
                acc["n"] += len(texts)
                acc["served"] += served
                acc["top1"] += top1
        per_task[task] = {"served": t["served"] / t["n"], "top1": t["top1"] / t["n"], "n": t["n"]}
    out = {"phrasings": rows, "per_task": per_task,
           "served": tally["served"] / tally["n"], "top1": tally["top1"] / tally["n"], "n": tally["n"],
           "eval_split": cfg.data.eval_split}
    if spec.off_domain:
        flagged = [d.ood for d in router.route_texts(spec.off_domain, encoder)]
        out["off_domain"] = {"n": len(flagged), "flagged": sum(flagged) / len(flagged)}
    return out


def format_check(result: dict[str, Any]) -> str:
    """The check as markdown: per phrasing, per task, overall, off-domain."""
    lines = ["| task | phrasing | n | served | top-1 | OOD | routed elsewhere |", "|---|---|---|---|---|---|---|"]
    for r in result["phrasings"]:
        text = r["phrasing"].replace("\n", "\\n").replace("|", "\\|")
        text = (text[:70] + "…" if len(text) > 71 else text) + (" *(trained on)*" if r["trained_on"] else "")
        elsewhere = ", ".join(f"{k} {v}" for k, v in sorted(r["routed_elsewhere"].items())) or "–"
        lines.append(f"| {r['task']} | {text} | {r['n']} | {100 * r['served']:.1f} | {100 * r['top1']:.1f} | "
                     f"{100 * r['ood']:.1f} | {elsewhere} |")
    lines += ["", "| task | queries | served | top-1 |", "|---|---|---|---|"]
    for task, t in result["per_task"].items():
        lines.append(f"| {task} | {t['n']} | {100 * t['served']:.1f} | {100 * t['top1']:.1f} |")
    lines.append(f"| **all** | {result['n']} | **{100 * result['served']:.1f}** | {100 * result['top1']:.1f} |")
    if "off_domain" in result:
        o = result["off_domain"]
        lines += ["", f"Off-domain requests flagged OOD: **{100 * o['flagged']:.1f}%** of {o['n']}."]
    return "\n".join(lines) + "\n"
