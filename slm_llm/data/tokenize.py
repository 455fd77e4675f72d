"""Tokenise one record for causal-LM training, with the loss on the response only.

The prompt (``render_prompt``) and the response (``render_response``) are
tokenised separately, without special tokens, and concatenated, so the
prompt/response boundary is exact: ``labels`` is -100 on every prompt token and
equals ``input_ids`` on every response token.

Truncation policy, when prompt + response exceed ``max_length``:

1. The response is never dropped. It keeps all its tokens unless it alone
   exceeds ``max_length - min(len(prompt), MIN_PROMPT_TOKENS)``; then its *tail*
   is cut (losing the end-of-turn token) so at least that many prompt tokens stay.
2. The prompt is cut to the room left:
   - ``middle`` (default): keep its head (BOS, system text, the start of the
     instruction) and its tail (the end of the input and the template's
     generation cue, e.g. ``<|im_start|>assistant\\n``), dropping the middle;
     the head gets half the room (rounded down), the tail the rest.
   - ``left``: keep only its last tokens (the cue and the end of the input).
"""
from __future__ import annotations

from typing import Any

from .schema import Record
from .templates import render_prompt, render_response

IGNORE_INDEX = -100
MIN_PROMPT_TOKENS = 8
TRUNCATIONS = ("middle", "left")


def tokenize_example(
    record: Record,
    tokenizer: Any,
    template: str,
    max_length: int,
    truncation: str = "middle",
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` (equal lengths, at most ``max_length``) for one record."""
    _check(max_length, truncation)
    prompt = _ids(tokenizer, render_prompt(record, template, tokenizer))
    response = _ids(tokenizer, render_response(record, tokenizer, template))
    if len(prompt) + len(response) > max_length:
        response = response[: max_length - min(len(prompt), MIN_PROMPT_TOKENS)]
        prompt = cut_prompt(prompt, max_length - len(response), truncation)
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def tokenize_prompt(
    record: Record,
    tokenizer: Any,
    template: str,
    max_length: int,
    truncation: str = "middle",
    reserve: int = 0,
) -> list[int]:
    """Prompt ids for generation, cut by the same policy to ``max_length - reserve``
    (``reserve``: room kept for the new tokens)."""
    _check(max_length, truncation)
    prompt = _ids(tokenizer, render_prompt(record, template, tokenizer))
    return cut_prompt(prompt, max(max_length - reserve, 1), truncation)


def cut_prompt(ids: list[int], room: int, truncation: str = "middle") -> list[int]:
    """``ids`` cut to at most ``room`` tokens: head + tail (``middle``) or the tail (``left``)."""
    if len(ids) <= room:
        return ids
    if truncation == "left":
        return ids[len(ids) - room:]
    head = room // 2
    return ids[:head] + ids[len(ids) - (room - head):]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check(max_length: int, truncation: str) -> None:
    if truncation not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncation!r} (known: {', '.join(TRUNCATIONS)})")
    if max_length <= MIN_PROMPT_TOKENS:
        raise ValueError(f"max_length must be > {MIN_PROMPT_TOKENS}, got {max_length}")
