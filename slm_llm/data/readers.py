"""Readers: Alpaca JSON/JSONL, the CL-benchmark folders, and anything `datasets` loads.

Each reader returns a full ``list[Record]`` or raises :class:`DataError`; it
never returns part of a file. Locations in messages: ``file:line`` (JSONL,
1-based), ``file[index]`` (JSON list and dataset rows, 0-based).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from ..utils.env import hub_offline
from .schema import DataError, Record, record_from_dict

log = logging.getLogger(__name__)


def read_alpaca(
    path: str | os.PathLike,
    task: str | None = None,
    labels: Iterable[str] | None = None,
    instruction: str | None = None,
    drop_empty_output: bool = False,
) -> list[Record]:
    """Read Alpaca records from ``.json`` (a list of objects) or ``.jsonl`` (one object a line).

    Required: ``instruction`` and ``output`` (non-empty strings). Optional:
    ``input``, ``answer``, ``id`` and ``task`` (falls back to ``task``).
    ``labels``, when given, constrains each record's answer (see ``record_from_dict``);
    ``instruction`` is the default for records without one. Blank JSONL lines are skipped.
    ``drop_empty_output`` drops (with a logged warning naming each location) records
    whose ``output`` is an empty string, for sources known to contain a few; any
    other invalid record is still an error.
    """
    path = Path(path)
    text = _read_text(path)
    records: list[Record] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not (drop_empty_output and _empty_output(obj, where)):
                records.append(record_from_dict(obj, where, task, instruction, labels))
    elif path.suffix == ".json":
        for i, obj in enumerate(_load_json_list(path, text)):
            where = f"{path}[{i}]"
            if not (drop_empty_output and _empty_output(obj, where)):
                records.append(record_from_dict(obj, where, task, instruction, labels))
    else:
        raise DataError(f"{path}: unsupported extension {path.suffix!r} for Alpaca data (use .json or .jsonl)")
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


def read_cl_benchmark(
    task_dir: str | os.PathLike,
    split: str,
    task_name: str,
    instruction: str,
    labels: list[str] | None = None,
    skip_labels: Iterable[str] = (),
) -> list[Record]:
    """Read ``<task_dir>/<split>.json`` (a list of ``{"sentence", "label"}``).

    ``instruction`` is the task prompt written by the suite (it should list the
    answer options). ``labels`` defaults to ``<task_dir>/labels.json``; a label
    outside it is an error, except those in ``skip_labels`` (markers of
    unlabelled records, e.g. MNLI's "-"), whose records are dropped with one
    logged warning. Records get ``input`` = sentence and ``output`` =
    ``answer`` = label, and ``id`` = ``<task_name>-<split>-<index>`` (the
    index in the file, so ids stay stable when records are skipped).
    """
    task_dir = Path(task_dir)
    if not instruction or not instruction.strip():
        raise DataError(f"{task_dir}: task '{task_name}' needs an instruction for CL-benchmark data")
    if labels is None:
        labels_path = task_dir / "labels.json"
        labels = _load_json_list(labels_path, _read_text(labels_path))
        for i, label in enumerate(labels):
            if not isinstance(label, str):
                raise DataError(f"{labels_path}[{i}]: label must be a string, got {type(label).__name__}")
    allowed, skip = set(labels), set(skip_labels)
    path = task_dir / f"{split}.json"
    records, skipped = [], []
    for i, obj in enumerate(_load_json_list(path, _read_text(path))):
        where = f"{path}[{i}]"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for name in ("sentence", "label"):
            if name not in obj:
                raise DataError(f"{where}: field '{name}' is missing")
            if not isinstance(obj[name], str):
                raise DataError(f"{where}: field '{name}' must be a string, got {type(obj[name]).__name__}")
        if not obj["sentence"].strip():
            raise DataError(f"{where}: field 'sentence' is empty")
        if obj["label"] in skip:
            skipped.append(i)
            continue
        if obj["label"] not in allowed:
            raise DataError(f"{where}: field 'label': unknown label {obj['label']!r} (labels: {list(labels)})")
        records.append(Record(instruction=instruction, input=obj["sentence"], output=obj["label"],
                              task=task_name, answer=obj["label"], id=f"{task_name}-{split}-{i}"))
    if skipped:
        log.warning("%s: dropped %d records labelled %s (indices %s%s)", path, len(skipped), sorted(skip),
                    skipped[:5], ", ..." if len(skipped) > 5 else "")
    if not records:
        raise DataError(f"{path}: no records (empty list)")
    return records


_FIELDS = ("instruction", "input", "output", "task", "answer", "id")
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def read_hf_dataset(
    path: str | os.PathLike,
    task: str,
    split: str = "train",
    field_map: dict[str, str] | None = None,
    instruction: str | None = None,
    labels: Iterable[str] | None = None,
    drop_empty_output: bool = False,
) -> list[Record]:
    """Read a local file/folder (or, online, a hub dataset id) through `datasets`.

    ``path`` is a data file (.json/.jsonl/.csv/.parquet/.arrow: the whole file
    is read, ``split`` is not used), a ``save_to_disk`` folder (``split`` picks
    from a DatasetDict), a folder of data files named by split, or a hub id.
    ``field_map`` maps our field to the source column, e.g.
    ``{"input": "question", "output": "answer"}``; unmapped fields are read
    from the column of the same name. Rows are validated as in ``read_alpaca``
    (``instruction``, ``labels`` and ``drop_empty_output`` mean the same there).
    """
    rows = _load_hf_rows(str(path), split)
    field_map = dict(field_map or {})
    unknown = set(field_map) - set(_FIELDS)
    if unknown:
        raise DataError(f"{path}: field_map names unknown fields {sorted(unknown)}")
    records = []
    for i, row in enumerate(rows):
        where = f"{path}[{i}]"
        for name, column in field_map.items():
            if column not in row:
                raise DataError(f"{where}: column '{column}' (field_map['{name}']) is missing; columns: {sorted(row)}")
        obj = {name: row[field_map.get(name, name)] for name in _FIELDS if field_map.get(name, name) in row}
        if isinstance(obj.get("id"), int) and not isinstance(obj["id"], bool):
            obj["id"] = str(obj["id"])  # integer ids are common in datasets; keep them as text
        if not (drop_empty_output and _empty_output(obj, where)):
            records.append(record_from_dict(obj, where, task, instruction, labels))
    if not records:
        raise DataError(f"{path}: no records (split '{split}' is empty)")
    return records


def _load_hf_rows(path: str, split: str) -> list[dict[str, Any]]:
    import datasets  # slow import: only when this reader is used

    p = Path(path)
    try:
        if p.is_file():
            builder = _HF_BUILDERS.get("".join(p.suffixes[-1:]))
            if builder is None:
                raise DataError(f"{p}: unsupported extension {p.suffix!r} (use one of {sorted(_HF_BUILDERS)})")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        elif p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{p}: split '{split}' not found (splits: {sorted(ds)})")
                ds = ds[split]
        elif p.is_dir():
            ds = datasets.load_dataset(str(p), split=split)
        elif hub_offline():
            raise DataError(f"{p}: not a local file or folder, and HF_HUB_OFFLINE is set so the hub was not tried")
        else:
            ds = datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (ValueError, FileNotFoundError, ArrowInvalid, ...)
        raise DataError(f"{p}: cannot load with datasets (split '{split}'): {type(e).__name__}: {e}") from e
    return list(ds)


def _empty_output(obj: Any, where: str) -> bool:
    """True (and a warning) when ``obj`` is a mapping whose ``output`` is a blank string."""
    if isinstance(obj, dict) and isinstance(obj.get("output"), str) and not obj["output"].strip():
        log.warning("%s: dropped: field 'output' is empty", where)
        return True
    return False




def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None


def _load_json_list(path: Path, text: str) -> list[Any]:
    if not text.strip():
        raise DataError(f"{path}: no records (empty file)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: top level must be a JSON list of records, got {type(data).__name__}")
    return data


def read_requests(path: str | Path) -> list[str]:
    """Requests, one per line: a ``.txt`` file (blank lines and ``#`` comments skipped) or a
    ``.jsonl`` file whose objects carry ``prompt`` (IFEval's field) or ``query``."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the requests file ({e.strerror})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip() or (path.suffix == ".txt" and line.lstrip().startswith("#")):
            continue
        if path.suffix == ".txt":
            out.append(line.strip())
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        text = obj.get("prompt", obj.get("query")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{i}: expected an object with a non-empty string 'prompt' or 'query'")
        out.append(text)
    if not out:
        raise DataError(f"{path}: no requests")
    return out
