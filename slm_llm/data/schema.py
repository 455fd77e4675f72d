"""The one record type every reader produces, and the validation that builds it.

A record is Alpaca-shaped: ``instruction`` (what to do), ``input`` (the
material, may be empty), ``output`` (the target response), ``task`` (the task
it belongs to), ``answer`` (the short gold answer a metric compares against;
"" means the metric uses ``output``) and ``id``.

Every validation error is a :class:`DataError` whose message starts with
*where*: ``train.jsonl:17`` (JSONL, 1-based line) or ``train.json[3]`` (JSON
list, 0-based record index), followed by the field, e.g.
``train.jsonl:17: field 'output' is empty``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from slm_llm.errors import SlmError


class DataError(SlmError, ValueError):
    """A data file, record or suite is invalid; the message names file, line/index and field."""


@dataclass
class Record:
    instruction: str
    input: str
    output: str
    task: str
    answer: str = ""
    id: str = ""


REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input", "task", "answer", "id")


def record_from_dict(
    obj: Any,
    where: str,
    task: str | None = None,
    instruction: str | None = None,
    labels: Iterable[str] | None = None,
) -> Record:
    """Validate one raw mapping and build a Record.

    ``instruction``/``output`` must be non-empty strings; ``input``, ``answer``
    and ``id`` are optional strings (missing or null -> ""); ``task`` comes from
    the record, else the ``task`` argument, else it is an error. ``instruction``
    (the argument) is the default when the record has none. When ``labels`` is
    given, the record's answer (``answer``, or ``output`` if there is none) must
    be one of them. Extra keys are ignored.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    values: dict[str, str] = {}
    for name in REQUIRED_FIELDS + OPTIONAL_FIELDS:
        value = obj.get(name)
        if value is None:
            values[name] = ""
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__} {value!r:.60}")
        values[name] = value
    if not values["instruction"] and instruction:
        values["instruction"] = instruction
    for name in REQUIRED_FIELDS:
        if name not in obj and not values[name]:
            raise DataError(f"{where}: field '{name}' is missing")
        if not values[name].strip():
            raise DataError(f"{where}: field '{name}' is empty")
    if not values["task"]:
        if not task:
            raise DataError(f"{where}: field 'task' is missing and no task name was given to the reader")
        values["task"] = task
    if labels is not None:
        allowed = list(labels)
        field = "answer" if values["answer"] else "output"
        if values[field] not in allowed:
            raise DataError(f"{where}: field '{field}': {values[field]!r:.60} is not one of the labels {allowed}")
    return Record(**values)
