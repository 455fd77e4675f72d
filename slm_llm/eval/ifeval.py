"""IFEval (Zhou et al. 2023) on a run: 541 prompts with verifiable instructions, lm-eval's checkers.

Each prompt carries one to three of 25 instruction types a program can check (word and
sentence counts, keywords, JSON, bullets, case, start/end phrases, ...). The question is
not whether the answer is right but whether the format instruction is followed, so it
shows whether the task increments (trained on short, fixed-format answers) damage general
instruction following. The benchmark is defined in ``eval/ifeval.yaml``; the prompts come
from the data root, the checkers from ``lm_eval.tasks.ifeval`` (``lm-eval[ifeval]``).

Four scores per mode, as lm-eval reports them (in %):

    prompt-level strict / loose       prompts whose every instruction passes
    instruction-level strict / loose  instructions that pass
    (loose also accepts the response without its first or last line, or without '*')

Modes: ``base`` (no increments); for an slm run ``slm`` (served routing: a prompt the
router flags out of distribution falls back to the base; the share flagged is reported)
and ``slm_forced:<task>`` for every task (that task's increments forced on every prompt,
the increments' own effect); for a baseline run, its shared adapter.

Prompts are rendered with the model's chat template and answered greedily, up to the
benchmark's 1280 new tokens unless capped (``--max-new-tokens`` or
``eval.ifeval_max_new_tokens``). Two prompts (keys 1122, 1129) make lm-eval's letter
checker draw a random letter, and langdetect samples too: Python's ``random`` is seeded
with the prompt's key before each check, and langdetect with 0, so a score depends only
on the prompt and the response (not on ``--limit`` or on the order of checks).

Results: ``eval/ifeval.json`` and ``eval/ifeval.md``; every response, with its
per-instruction verdicts, in ``eval/predictions/ifeval.jsonl``. Generations are also appended
to ``eval/ifeval-generations.jsonl`` batch by batch, so a killed run (541 prompts per mode
take hours on a CPU) resumes, and a larger ``--limit`` reuses what a smaller one generated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from slm_llm.config import ConfigError, load_config
from slm_llm.data import DataError, Record, render_prompt, resolve_data_root
from slm_llm.data.suites import REPO_ROOT
from slm_llm.eval.metrics import OOD
from slm_llm.pipeline import Generation, RunPipeline
from slm_llm.run import RunDir
from slm_llm.utils.io import sha256_file, write_json, write_text

BENCHMARK = REPO_ROOT / "eval" / "ifeval.yaml"
_FIELDS = {"data": str, "sha256": str, "nltk_data": str, "max_new_tokens": int}
JOURNAL = "ifeval-generations.jsonl"  # in the run's eval/: generations so far, for resuming
SCORES = ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose")


@dataclass(frozen=True)
class IFEvalSpec:
    data: str  # prompts JSONL, relative to the data root
    sha256: str
    nltk_data: str  # folder holding tokenizers/punkt_tab, relative to the data root
    max_new_tokens: int  # the benchmark's generation budget
    source: Path


def load_spec(path: str | Path = BENCHMARK) -> IFEvalSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise DataError(f"{path}: cannot read the IFEval definition: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: must be a mapping with {', '.join(_FIELDS)}")
    for key in raw:
        if key not in _FIELDS:
            raise DataError(f"{path}: unknown key '{key}' (known: {', '.join(_FIELDS)})")
    for key, kind in _FIELDS.items():
        if not isinstance(raw.get(key), kind) or not raw[key]:
            raise DataError(f"{path}: {key}: required, a non-empty {kind.__name__}")
    if raw["max_new_tokens"] < 1:
        raise DataError(f"{path}: max_new_tokens: must be positive")
    return IFEvalSpec(**raw, source=path)


def load_prompts(spec: IFEvalSpec, data_root: Path) -> list[dict[str, Any]]:
    """The prompts file, checked against the definition's sha256: rows with ``key``,
    ``prompt``, ``instruction_id_list`` and ``kwargs``."""
    path = data_root / spec.data
    if not path.is_file():
        raise DataError(f"IFEval prompts not found: {path} ({spec.source}: data: {spec.data}, under the "
                        f"data root {data_root})")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise DataError(f"{path}: sha256 {digest} is not the one {spec.source} expects ({spec.sha256})")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            row = json.loads(line)
            missing = [k for k in ("key", "prompt", "instruction_id_list", "kwargs") if k not in row]
            if missing or len(row["kwargs"]) != len(row["instruction_id_list"]):
                raise DataError(f"{path}:{n}: needs key, prompt, instruction_id_list and one kwargs per instruction")
            rows.append(row)
    return rows


def use_nltk_data(folder: Path) -> None:
    """Point nltk at ``folder``. lm-eval's checkers download ``punkt_tab`` at import when nltk
    cannot find it; refusing here first means nothing is ever downloaded."""
    if not (folder / "tokenizers" / "punkt_tab" / "english").is_dir():
        raise DataError(f"nltk's punkt_tab tables are missing: {folder}/tokenizers/punkt_tab/english is not a "
                        f"folder ({BENCHMARK}: nltk_data). IFEval's sentence counts need them; copy nltk's "
                        f"punkt_tab package there (they are never downloaded at run time)")
    os.environ["NLTK_DATA"] = str(folder)
    import nltk

    if str(folder) not in nltk.data.path:
        nltk.data.path.insert(0, str(folder))
    nltk.data.find("tokenizers/punkt_tab/english/")


def checkers(nltk_folder: Path):
    """lm-eval's IFEval module (``test_instruction_following_strict`` / ``_loose``), imported
    only once nltk has its tables; langdetect made deterministic."""
    use_nltk_data(nltk_folder)
    import langdetect
    from lm_eval.tasks.ifeval import utils

    langdetect.DetectorFactory.seed = 0
    return utils


def check_response(ifeval, row: dict[str, Any], response: str) -> tuple[list[bool], list[bool]]:
    """Strict and loose verdicts, one per instruction, with ``random`` seeded by the prompt's key."""
    inp = ifeval.InputExample(key=row["key"], instruction_id_list=row["instruction_id_list"], prompt=row["prompt"],
                              kwargs=row["kwargs"])
    state = random.getstate()
    try:
        random.seed(row["key"])
        strict = ifeval.test_instruction_following_strict(inp, response).follow_instruction_list
        random.seed(row["key"])
        loose = ifeval.test_instruction_following_loose(inp, response).follow_instruction_list
    finally:
        random.setstate(state)
    return strict, loose


def aggregate(verdicts: list[tuple[list[bool], list[bool]]]) -> dict[str, float]:
    """lm-eval's four IFEval numbers, in %."""
    out = {}
    for level, i in (("strict", 0), ("loose", 1)):
        rows = [v[i] for v in verdicts]
        flat = [ok for r in rows for ok in r]
        out[f"prompt_{level}"] = 100.0 * sum(all(r) for r in rows) / len(rows)
        out[f"instruction_{level}"] = 100.0 * sum(flat) / len(flat)
    return out


def run_ifeval(run_dir: str | Path, overrides: list[str] | None = None, max_new_tokens: int | None = None,
               limit: int = 0, data_root: str | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Answer the IFEval prompts in every mode of the run, check them, write the report.

    ``max_new_tokens`` caps the benchmark's budget (default ``eval.ifeval_max_new_tokens``, 0 = no
    cap); ``limit`` keeps the first N prompts (0 = all 541).
    """
    if limit < 0 or (max_new_tokens or 0) < 0 or (batch_size is not None and batch_size < 1):
        raise ConfigError(f"ifeval: --limit ({limit}) and --max-new-tokens ({max_new_tokens}) must be >= 0, "
                          f"--batch-size ({batch_size}) >= 1")
    spec = load_spec()
    run = RunDir(run_dir)
    cfg = load_config(run.root / "run.yaml", overrides)
    root = resolve_data_root(data_root or cfg.data.data_root or None)
    rows = load_prompts(spec, root)  # data problems show before the model loads
    rows = rows[:limit] if limit else rows
    ifeval = checkers(root / spec.nltk_data)
    pipe = RunPipeline.load(run_dir, overrides)
    cap = pipe.cfg.eval.ifeval_max_new_tokens if max_new_tokens is None else max_new_tokens
    n_new = min(cap, spec.max_new_tokens) if cap else spec.max_new_tokens

    records = [Record(instruction=r["prompt"], input="", output="-", task="ifeval", id=str(r["key"])) for r in rows]
    decisions = {"base": pipe.route(records, "base")}
    routing: dict[str, Any] = {}
    if pipe.router is not None:
        decisions["slm"] = pipe.route(records, "slm")
        raw = pipe.router.route(pipe.encoder.encode(pipe.queries(records)))
        routed = [OOD if d.ood else d.task for d in raw]
        routing = {"ood_share": 100.0 * routed.count(OOD) / len(routed),
                   "routed": {t: routed.count(t) for t in sorted(set(routed))}}
        for task in pipe.tasks:
            decisions[f"slm_forced:{task}"] = pipe.route(records, task)
    else:
        decisions[pipe.method] = pipe.route(records, pipe.method)

    prompts = [render_prompt(r, "chat", pipe.tokenizer) for r in records]
    journal = Journal(run.eval_dir / JOURNAL, fingerprint(pipe, spec, n_new))
    t0 = time.time()
    gens = generate_modes(pipe, [r.id for r in records], prompts, decisions, n_new,
                          batch_size or pipe.cfg.eval.batch_size, journal)
    seconds = time.time() - t0
    result: dict[str, Any] = {
        "benchmark": str(spec.source), "data": str(root / spec.data), "sha256": spec.sha256,
        "prompts": len(rows), "instructions": sum(len(r["instruction_id_list"]) for r in rows),
        "max_new_tokens": n_new, "budget": spec.max_new_tokens, "template": "chat", "lm_eval": version("lm_eval"),
        "generations": len({_signature(r.id, d) for ds in decisions.values() for r, d in zip(records, ds)}),
        "generation_seconds": round(seconds, 1), "modes": {}}
    lines = []
    for md, outs in gens.items():
        verdicts = [check_response(ifeval, row, g.text) for row, g in zip(rows, outs)]
        result["modes"][md] = {**aggregate(verdicts),
                               "at_cap": 100.0 * sum(g.new_tokens >= n_new for g in outs) / len(outs)}
        if md == "slm":
            result["modes"][md].update(routing)
        lines += [json.dumps({"mode": md, "key": row["key"], "response": g.text, "new_tokens": g.new_tokens,
                              "routed_task": None if d is None else d.task, "strict": s, "loose": lo})
                  for row, g, d, (s, lo) in zip(rows, outs, decisions[md], verdicts)]
    write_text(run.eval_dir / "predictions" / "ifeval.jsonl", "\n".join(lines) + "\n")
    path = run.eval_dir / "ifeval.json"
    write_json(path, result)
    write_text(run.eval_dir / "ifeval.md", ifeval_markdown(result))
    result["path"] = str(path)
    return result


def generate_modes(pipe, ids: list[str], prompts: list[str], decisions: dict[str, list], max_new: int,
                   batch_size: int, journal: Journal | None = None) -> dict[str, list[Generation]]:
    """``{mode: [Generation per prompt]}``. A (prompt, slots, weights) triple shared by several
    modes is generated once (an OOD slm row is a base row); prompts are sorted by token length
    so a batch pads little. Generations already in ``journal`` are reused, and each batch is
    added to it as soon as it is done."""
    jobs: dict[tuple, tuple[int, Any]] = {}  # (id, slots, weights) -> (prompt index, decision)
    for rows in decisions.values():
        for j, d in enumerate(rows):
            jobs.setdefault(_signature(ids[j], d), (j, d))
    done = journal.load() if journal else {}
    todo = [k for k in jobs if k not in done]
    lengths = {k: len(pipe.tokenizer(prompts[jobs[k][0]], add_special_tokens=False)["input_ids"]) for k in todo}
    todo.sort(key=lambda k: (lengths[k], jobs[k][0]))
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="ifeval", unit="gen", dynamic_ncols=True) as bar:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s: s + batch_size]
            gens = pipe.generate([prompts[jobs[k][0]] for k in chunk], [jobs[k][1] for k in chunk], max_new, batch_size)
            done.update(zip(chunk, gens))
            if journal:
                journal.add(zip(chunk, gens))
            bar.update(len(chunk))
    return {md: [dataclasses.replace(done[_signature(ids[j], d)], route=d) for j, d in enumerate(rows)]
            for md, rows in decisions.items()}


def _signature(prompt_id: str, d) -> tuple:
    return (prompt_id, None, None) if d is None else (prompt_id, tuple(d.slots), tuple(round(w, 6) for w in d.weights))


@dataclass
class Journal:
    """Generations of an unfinished ``slm-llm ifeval``, one JSON line each, so a killed run
    resumes where it stopped. A line counts only under the same ``fingerprint`` (base model,
    increments, model/jare config, prompts file, token limit); a line cut by a kill is skipped."""
    path: Path
    fingerprint: str

    def load(self) -> dict[tuple, Generation]:
        kept, out = [], {}
        for line in self.path.read_text().splitlines() if self.path.is_file() else []:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("fingerprint") == self.fingerprint:
                kept.append(line)
                sig = (e["id"], None, None) if e["slots"] is None else (e["id"], tuple(e["slots"]), tuple(e["weights"]))
                out[sig] = Generation(e["text"], None, e["new_tokens"])
        write_text(self.path, "".join(x + "\n" for x in kept))  # drop stale and torn lines
        return out

    def add(self, items) -> None:
        with self.path.open("a") as f:
            for (pid, slots, weights), g in items:
                f.write(json.dumps({"fingerprint": self.fingerprint, "id": pid, "slots": slots, "weights": weights,
                                    "text": g.text, "new_tokens": g.new_tokens}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def fingerprint(pipe, spec: IFEvalSpec, max_new_tokens: int) -> str:
    """What a journal line's generation depends on, besides its prompt and slots."""
    m = pipe.run.manifest()
    increments = {t: sha for t in pipe.tasks for path, sha in m["tasks"][t]["artifacts"].items()
                  if path.endswith("increments.safetensors")}
    blob = json.dumps({"base": m["base_model"], "config": pipe.cfg.hash(), "increments": increments,
                       "data": spec.sha256, "max_new_tokens": max_new_tokens, "template": "chat"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ifeval_markdown(result: dict[str, Any]) -> str:
    cap = (f"max {result['max_new_tokens']} new tokens" if result["max_new_tokens"] == result["budget"]
           else f"max {result['max_new_tokens']} new tokens, capped from IFEval's {result['budget']}")
    lines = [f"IFEval: {result['prompts']} prompts, {result['instructions']} instructions ({cap}; chat template, "
             f"greedy; lm-eval {result['lm_eval']} checkers; {result['generations']} generations in "
             f"{result['generation_seconds']:.0f} s). Scores in %.", "",
             "| mode | prompt strict | instruction strict | prompt loose | instruction loose | at cap |",
             "|---|---|---|---|---|---|"]
    for md, r in result["modes"].items():
        lines.append(f"| {md} | " + " | ".join(f"{r[k]:.1f}" for k in (*SCORES, "at_cap")) + " |")
    if "slm" in result["modes"]:
        r = result["modes"]["slm"]
        routed = ", ".join(f"{t} {n}" for t, n in r["routed"].items())
        lines += ["", f"slm: the router flags {r['ood_share']:.1f}% of the prompts out of distribution (answered by "
                      f"the base model when serve.ood_fallback is on); routed: {routed}. `slm_forced:<task>` forces "
                      f"that task's increments on every prompt. `at cap`: % of responses cut at the token limit."]
    return "\n".join(lines) + "\n"
