"""Dynamic padding of tokenised examples into a right-padded batch of tensors."""
from __future__ import annotations

from typing import Any

import torch

from .tokenize import IGNORE_INDEX

_SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask")


class Collator:
    """Pads ``input_ids`` (with ``pad_token_id``), ``labels`` (with -100) and
    ``attention_mask`` (1 on real tokens, 0 on padding) on the right to the
    longest example, rounded up to ``pad_to_multiple_of``.

    Other keys: numbers, or lists of numbers of the same length in every
    example (e.g. ``slot_ids``, ``slot_weights``), are stacked into a tensor
    (float if any value is a float, else int64); anything else (strings,
    ragged lists) is passed through as a list.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("Collator needs a pad_token_id (load_tokenizer sets pad = eos when missing)")
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be > 0, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids = [_as_list(f["input_ids"]) for f in features]
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, Any] = {
            "input_ids": _pad(ids, length, self.pad_token_id),
            "attention_mask": _pad([_as_list(f.get("attention_mask", [1] * len(x))) for f, x in zip(features, ids)],
                                   length, 0),
        }
        if "labels" in features[0]:
            batch["labels"] = _pad([_as_list(f["labels"]) for f in features], length, IGNORE_INDEX)
        for key in features[0]:
            if key not in _SEQUENCE_KEYS:
                batch[key] = _stack([f[key] for f in features])
        return batch


def _as_list(x: Any) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _stack(values: list[Any]) -> Any:
    values = [v.tolist() if isinstance(v, torch.Tensor) else v for v in values]
    try:
        out = torch.tensor(values)  # fails on strings and ragged lists
    except (TypeError, ValueError, RuntimeError):
        return values
    return out.float() if out.is_floating_point() else out
