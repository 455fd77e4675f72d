"""Task suites: which tasks exist, where their data lives, how they are scored, in which orders.

A suite is a YAML file (see docs/data.md)::

    name: my_suite                 # optional; defaults to the file stem
    description: free text         # optional
    data_root: .                   # optional; relative to this file. Task paths resolve
                                   # against it instead of the global data root.
    tasks:
      <task>:
        format: alpaca | cl_benchmark | hf
        path: <path>               # relative to the data root (or absolute); a folder
                                   # holding <split>.jsonl/.json, a file pattern with
                                   # "{split}", or (hf) a dataset folder / hub id
        metric: exact_match | rouge_l
        answer_type: free text     # what the answer looks like, for humans and reports
        labels: [..] | null        # closed answer set, checked on read
        instruction: "..."         # required for cl_benchmark; default for hf/alpaca rows without one
        field_map: {our_field: column}   # hf only
        drop_empty_output: false   # alpaca/hf: drop (and log) records with an empty output
        skip_labels: [..]          # cl_benchmark: labels marking unlabelled records, dropped (and logged)
        content: input | request   # what a user brings: the input (default), or the whole
                                   # request when the instruction differs per record (code)
        phrasings: ["...", ...]    # how users ask for this task in their own words (>= 2);
                                   # "{input}" marks where the content goes (default: after
                                   # a blank line). Split into train / held-out (data/views.py).
                                   # Without it, the records' own instructions are used, if
                                   # they differ per record (a constant one is refused)
    orders:
      default: [<task>, ...]       # optional; defaults to the tasks in file order
      <name>: [<task>, ...]

The suite's task name is authoritative: records read for a task get ``task`` set to it.
"""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slm_llm.config import yaml_error

from .readers import read_alpaca, read_cl_benchmark, read_hf_dataset
from .schema import DataError, Record
from .views import CONTENT_KINDS, PLACEHOLDER

REPO_ROOT = Path(__file__).resolve().parents[2]
SUITES_DIR = REPO_ROOT / "eval" / "suites"
FORMATS = ("alpaca", "cl_benchmark", "hf")
METRICS = ("exact_match", "rouge_l")
_SUITE_KEYS = ("name", "description", "data_root", "tasks", "orders")
_TASK_KEYS = ("format", "path", "metric", "labels", "answer_type", "instruction", "field_map",
              "drop_empty_output", "skip_labels", "content", "phrasings")


@dataclass
class TaskSpec:
    name: str
    format: str
    path: str
    metric: str
    labels: list[str] | None
    answer_type: str
    instruction: str
    field_map: dict[str, str] | None = None
    drop_empty_output: bool = False
    skip_labels: list[str] | None = None
    content: str = "input"  # input | request (see slm_llm.data.views)
    phrasings: list[str] | None = None


@dataclass
class Suite:
    name: str
    tasks: dict[str, TaskSpec]
    orders: dict[str, list[str]]
    source: Path
    data_root: Path | None = None  # set when the YAML names its own data_root
    description: str = ""

    def order_tasks(self, order: str = "default", tasks: list[str] | None = None) -> list[str]:
        """The task sequence to run: ``tasks`` when given (validated), else the named order."""
        if tasks:
            unknown = [t for t in tasks if t not in self.tasks]
            if unknown:
                raise DataError(f"{self.source}: unknown task(s) {unknown} (tasks: {list(self.tasks)})")
            return list(tasks)
        if order not in self.orders:
            raise DataError(f"{self.source}: unknown order '{order}' (orders: {list(self.orders)})")
        return list(self.orders[order])


def resolve_data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Find the data root: ``explicit``, else ``$SLM_DATA``, else ``<repo>/../shared/data``.

    The first of these that is *set* decides (a wrong explicit path is an
    error, not silently skipped); the error lists every place considered.
    """
    env = os.environ.get("SLM_DATA", "")
    default = (REPO_ROOT.parent / "shared" / "data").resolve()
    candidates = [("explicit data root (--data-root / data.data_root)", str(explicit) if explicit else ""),
                  ("$SLM_DATA", env), ("default beside the checkout", str(default))]
    label, value = next((lab, val) for lab, val in candidates if val)  # the default is always set
    chosen = Path(value).expanduser()
    if chosen.is_dir():
        return chosen.resolve()
    looked = "; ".join(f"{lab}: {val or 'not set'}" for lab, val in candidates)
    raise DataError(f"data root not found: {label} is {value}, which is not a folder (a source that is "
                    f"set is used, never skipped). Looked at, in order: {looked}. Pass --data-root, "
                    f"set SLM_DATA, or put the data at {default}")


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """Load and validate a suite: a name from ``eval/suites/`` or a path to a YAML file."""
    text_name = str(name_or_path)
    path = Path(text_name).expanduser()
    if not (text_name.endswith((".yaml", ".yml")) or os.sep in text_name or path.exists()):
        path = SUITES_DIR / f"{text_name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
            raise DataError(f"unknown suite '{text_name}' (known: {known}; or pass a path to a suite YAML)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read suite: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise DataError(yaml_error(path, e)) from None
    return _build_suite(raw, path)


def load_task_split(
    suite: Suite | str,
    task: str,
    split: str,
    data_root: str | os.PathLike | None = None,
    max_samples: int = 0,
    seed: int = 0,
) -> list[Record]:
    """Read one task's split as the suite describes it.

    ``max_samples > 0`` keeps a seeded random subset of that size (the same for
    the same seed), in file order.
    """
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    if task not in suite.tasks:
        raise DataError(f"{suite.source}: unknown task '{task}' (tasks: {list(suite.tasks)})")
    spec = suite.tasks[task]
    if spec.format == "hf":
        records = read_hf_dataset(_hf_location(suite, spec, split, data_root), task, split,
                                  spec.field_map, spec.instruction or None, spec.labels, spec.drop_empty_output)
    elif spec.format == "cl_benchmark":
        records = read_cl_benchmark(_local(suite, spec, data_root), split, task, spec.instruction, spec.labels,
                                    spec.skip_labels or ())
    else:
        records = read_alpaca(_alpaca_file(suite, spec, split, data_root), task, spec.labels,
                              spec.instruction or None, spec.drop_empty_output)
    records = [r if r.task == task else dataclasses.replace(r, task=task) for r in records]
    return _subsample(records, max_samples, seed)


def run_records(suite: Suite, task: str, part: str, data, max_eval: int = 0, calibration: int = 0) -> list[Record]:
    """The raw records a run uses for ``task`` (``data`` is a DataConfig).

    Each task's train split first gives up a *dev pool*: ``data.dev_samples`` records drawn
    with ``data.seed``, never trained on, in every run, so a run that chooses settings on dev
    trains exactly like the run that reports on test.

    part "train": the training sample, ``data.max_train_samples`` of the rest (0 = all).
    part "calibration": ``calibration`` more records of the rest, never the training sample's
    (fewer when the split has no more): the router's statistics see them, the increments do not.
    part "eval": ``max_eval`` records (0 = all) of the test split, or of the dev pool when
    ``data.eval_split`` is "dev".
    """
    if part in ("train", "calibration"):
        sample, extra = train_and_calibration(suite, task, data, calibration if part == "calibration" else 0)
        return sample if part == "train" else extra
    if part != "eval":
        raise ValueError(f"part {part!r} is not one of train, calibration, eval")
    root = data.data_root or None
    if data.eval_split == "dev":
        train, dev_ids = _train_and_dev_ids(suite, task, data)
        return _subsample([r for i, r in enumerate(train) if i in dev_ids], max_eval, data.seed)
    return load_task_split(suite, task, "test", root, max_eval, data.seed)


def train_and_calibration(suite: Suite, task: str, data, calibration: int) -> tuple[list[Record], list[Record]]:
    """``run_records``' parts "train" and "calibration" from one read of the train split."""
    train, dev_ids = _train_and_dev_ids(suite, task, data)
    rest = [r for i, r in enumerate(train) if i not in dev_ids]
    sample = _sample_ids(len(rest), data.max_train_samples, data.seed)
    unused = sorted(set(range(len(rest))) - set(sample)) if calibration else []
    return [rest[i] for i in sample], [rest[unused[i]] for i in _sample_ids(len(unused), calibration, data.seed)]


def _train_and_dev_ids(suite: Suite, task: str, data) -> tuple[list[Record], set[int]]:
    """The task's train split and the positions of its dev pool (``data.dev_samples``, seeded)."""
    train = load_task_split(suite, task, "train", data.data_root or None)
    n_dev = min(data.dev_samples, len(train) // 2)
    return train, set(random.Random(f"dev:{data.seed}:{task}").sample(range(len(train)), n_dev))


def _sample_ids(n: int, k: int, seed: int) -> list[int]:
    """A seeded subset of ``k`` of ``range(n)``, in order (all of them when ``k`` is 0 or >= n)."""
    if 0 < k < n:
        return sorted(random.Random(seed).sample(range(n), k))
    return list(range(n))


def _subsample(records: list[Record], n: int, seed: int) -> list[Record]:
    return [records[i] for i in _sample_ids(len(records), n, seed)]


def _local(suite: Suite, spec: TaskSpec, data_root: str | os.PathLike | None) -> Path:
    p = Path(spec.path).expanduser()
    if p.is_absolute():
        return p
    return (suite.data_root or resolve_data_root(data_root)) / p


def _alpaca_file(suite: Suite, spec: TaskSpec, split: str, data_root: str | os.PathLike | None) -> Path:
    p = _local(suite, spec, data_root)
    if "{split}" in spec.path:
        return Path(str(p).replace("{split}", split))
    if not p.exists():
        raise DataError(f"{suite.source}: tasks.{spec.name}.path: {p} does not exist")
    if p.is_dir():
        for ext in (".jsonl", ".json"):
            if (p / f"{split}{ext}").exists():
                return p / f"{split}{ext}"
        raise DataError(f"{p}: task '{spec.name}' has no {split}.jsonl or {split}.json")
    if split != "train":
        raise DataError(f"{suite.source}: tasks.{spec.name}.path is a single file, so there is no "
                        f"'{split}' split; use a folder or a '{{split}}' pattern")
    return p


def _hf_location(suite: Suite, spec: TaskSpec, split: str, data_root: str | os.PathLike | None) -> str:
    """A local path when one exists (``{split}`` filled in), else the path as a hub id."""
    raw = spec.path.replace("{split}", split)
    if Path(raw).expanduser().is_absolute():
        return raw
    try:
        candidate = (suite.data_root or resolve_data_root(data_root)) / raw
    except DataError:
        return raw
    return str(candidate) if candidate.exists() else raw


def _build_suite(raw: Any, path: Path) -> Suite:
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a suite must be a mapping with 'tasks' (and 'orders')")
    _check_keys(raw, _SUITE_KEYS, path, "")
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, dict) or not tasks_raw:
        raise DataError(f"{path}: tasks: must be a non-empty mapping of task name -> spec")
    tasks = {str(name): _build_task(str(name), spec, path) for name, spec in tasks_raw.items()}
    orders_raw = raw.get("orders") or {}
    if not isinstance(orders_raw, dict):
        raise DataError(f"{path}: orders: must be a mapping of order name -> list of tasks")
    orders: dict[str, list[str]] = {}
    for oname, seq in orders_raw.items():
        key = f"orders.{oname}"
        if not isinstance(seq, list) or not seq or not all(isinstance(t, str) for t in seq):
            raise DataError(f"{path}: {key}: must be a non-empty list of task names")
        unknown = [t for t in seq if t not in tasks]
        if unknown:
            raise DataError(f"{path}: {key}: unknown task(s) {unknown} (tasks: {list(tasks)})")
        if len(set(seq)) != len(seq):
            raise DataError(f"{path}: {key}: lists a task more than once")
        orders[str(oname)] = list(seq)
    orders.setdefault("default", list(tasks))
    root = raw.get("data_root")
    if root is not None and not isinstance(root, str):
        raise DataError(f"{path}: data_root: must be a string path")
    return Suite(
        name=str(raw.get("name") or path.stem),
        tasks=tasks,
        orders=orders,
        source=path,
        data_root=(path.parent / Path(root).expanduser()).resolve() if root else None,
        description=str(raw.get("description") or ""),
    )


def _build_task(name: str, spec: Any, path: Path) -> TaskSpec:
    key = f"tasks.{name}"
    if not isinstance(spec, dict):
        raise DataError(f"{path}: {key}: must be a mapping")
    _check_keys(spec, _TASK_KEYS, path, key + ".")
    for required in ("format", "path", "metric"):
        if not isinstance(spec.get(required), str) or not spec[required]:
            raise DataError(f"{path}: {key}.{required}: required (a non-empty string)")
    if spec["format"] not in FORMATS:
        raise DataError(f"{path}: {key}.format: {spec['format']!r} is not one of {', '.join(FORMATS)}")
    if spec["metric"] not in METRICS:
        raise DataError(f"{path}: {key}.metric: {spec['metric']!r} is not one of {', '.join(METRICS)}")
    labels = spec.get("labels")
    if labels is not None and (not isinstance(labels, list) or not labels
                               or not all(isinstance(x, str) for x in labels)):
        raise DataError(f"{path}: {key}.labels: must be null or a non-empty list of strings")
    instruction = spec.get("instruction") or ""
    if not isinstance(instruction, str):
        raise DataError(f"{path}: {key}.instruction: must be a string")
    if spec["format"] == "cl_benchmark" and not instruction.strip():
        raise DataError(f"{path}: {key}.instruction: required for format cl_benchmark")
    field_map = spec.get("field_map")
    if field_map is not None:
        if spec["format"] != "hf":
            raise DataError(f"{path}: {key}.field_map: only valid for format hf")
        if not isinstance(field_map, dict) or not all(isinstance(v, str) for v in field_map.values()):
            raise DataError(f"{path}: {key}.field_map: must map our field names to column names")
    answer_type = spec.get("answer_type") or ""
    if not isinstance(answer_type, str):
        raise DataError(f"{path}: {key}.answer_type: must be a string")
    drop_empty = spec.get("drop_empty_output", False)
    if not isinstance(drop_empty, bool):
        raise DataError(f"{path}: {key}.drop_empty_output: must be true or false")
    if drop_empty and spec["format"] == "cl_benchmark":
        raise DataError(f"{path}: {key}.drop_empty_output: only valid for formats alpaca and hf")
    skip_labels = spec.get("skip_labels")
    if skip_labels is not None:
        if spec["format"] != "cl_benchmark":
            raise DataError(f"{path}: {key}.skip_labels: only valid for format cl_benchmark")
        if not isinstance(skip_labels, list) or not all(isinstance(x, str) for x in skip_labels):
            raise DataError(f"{path}: {key}.skip_labels: must be a list of strings")
    content = spec.get("content", "input")
    if content not in CONTENT_KINDS:
        raise DataError(f"{path}: {key}.content: {content!r} is not one of {', '.join(CONTENT_KINDS)}")
    phrasings = spec.get("phrasings")
    if phrasings is not None:
        if not isinstance(phrasings, list) or len(phrasings) < 2:
            raise DataError(f"{path}: {key}.phrasings: must be a list of at least 2 strings")
        for i, text in enumerate(phrasings):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}: {key}.phrasings[{i}]: must be a non-empty string")
            if text.count(PLACEHOLDER) > 1:
                raise DataError(f"{path}: {key}.phrasings[{i}]: holds {PLACEHOLDER} more than once")
        if len(set(phrasings)) != len(phrasings):
            raise DataError(f"{path}: {key}.phrasings: lists the same phrasing twice")
    return TaskSpec(name=name, format=spec["format"], path=spec["path"], metric=spec["metric"],
                    labels=list(labels) if labels else None, answer_type=answer_type,
                    instruction=instruction, field_map=dict(field_map) if field_map else None,
                    drop_empty_output=drop_empty, skip_labels=list(skip_labels) if skip_labels else None,
                    content=content, phrasings=list(phrasings) if phrasings else None)


def _check_keys(raw: dict, allowed: tuple[str, ...], path: Path, prefix: str) -> None:
    for k in raw:
        if k not in allowed:
            raise DataError(f"{path}: unknown key '{prefix}{k}' (known: {', '.join(allowed)})")
