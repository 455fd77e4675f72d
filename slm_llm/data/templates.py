"""Prompt templates: the text a model sees before its response, and the response it learns.

``render_prompt`` ends exactly where the response starts (the generation cue),
so ``render_prompt + render_response`` is the full training text and
``render_prompt`` alone is what generation is fed. Templates:

- ``alpaca``: the Stanford Alpaca prompts (with and without an input).
- ``llama2``: ``[INST] <<SYS>> ... <</SYS>> ... [/INST]`` (Llama-2 chat), one turn.
- ``chat``: the tokenizer's own chat template (ChatML for SmolLM2) with one user
  message ``instruction + "\\n\\n" + input`` and the generation prompt.

The prompt text carries the BOS token itself when the tokenizer would add one
(templates are tokenised with ``add_special_tokens=False``). The response ends
with the token that stops generation: the chat template's end-of-turn token for
``chat``, the tokenizer's EOS otherwise.
"""
from __future__ import annotations

from typing import Any

from .schema import Record

TEMPLATES = ("alpaca", "llama2", "chat")

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
LLAMA2_SYSTEM = "You are a helpful assistant. Follow the instruction and answer concisely."
_SENTINEL = "\u2063SLM_RESPONSE\u2063"  # invisible separator: never in real data


def user_message(record: Record) -> str:
    """The single user turn of the chat-style templates: instruction, blank line, input."""
    return f"{record.instruction}\n\n{record.input}" if record.input else record.instruction


def render_prompt(record: Record, template: str, tokenizer: Any) -> str:
    """The prompt text, up to (and including) the cue after which the response starts."""
    if template == "alpaca":
        fmt = ALPACA_PROMPT_INPUT if record.input else ALPACA_PROMPT_NO_INPUT
        return _bos_text(tokenizer) + fmt.format(instruction=record.instruction, input=record.input)
    if template == "llama2":
        return f"{_bos_text(tokenizer)}[INST] <<SYS>>\n{LLAMA2_SYSTEM}\n<</SYS>>\n\n{user_message(record)} [/INST]"
    if template == "chat":
        _require_chat_template(tokenizer)
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message(record)}],
                                             tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r} (known: {', '.join(TEMPLATES)})")


def render_response(record: Record, tokenizer: Any, template: str) -> str:
    """The target text: ``output`` followed by the token that ends the turn."""
    if template == "llama2":
        return f" {record.output} {tokenizer.eos_token or ''}"
    if template == "chat":
        return record.output + end_of_turn_text(tokenizer)
    if template == "alpaca":
        return record.output + (tokenizer.eos_token or "")
    raise ValueError(f"unknown template {template!r} (known: {', '.join(TEMPLATES)})")


def end_of_turn_text(tokenizer: Any) -> str:
    """What the chat template writes right after an assistant message (e.g. ``<|im_end|>``).

    Found by rendering a conversation with a sentinel answer; trailing
    whitespace (the newline before the next turn) is not part of it. Falls back
    to the EOS token when the template does not show it.
    """
    _require_chat_template(tokenizer)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    tail = full[full.index(_SENTINEL) + len(_SENTINEL):].rstrip() if _SENTINEL in full else ""
    return tail or (tokenizer.eos_token or "")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The token ids that end an answer: EOS and the chat template's end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    if getattr(tokenizer, "chat_template", None):
        eot = tokenizer(end_of_turn_text(tokenizer), add_special_tokens=False)["input_ids"]
        if len(eot) == 1:
            ids.add(eot[0])
    return sorted(i for i in ids if i is not None)


def query_text(record: Record) -> str:
    """The raw text the DTKR encoder embeds: the user turn as typed (never the templated prompt).

    Users phrase requests their own way; a record in a query view (``slm_llm.data.views``)
    already carries that whole turn, so routing sees what serving sees.
    """
    return user_message(record)


def _bos_text(tokenizer: Any) -> str:
    """The BOS token text when the tokenizer adds one by default (Llama), else ""."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or not tokenizer.bos_token:
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == bos_id else ""


def _require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"template 'chat' needs a tokenizer with a chat template; "
                         f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '')!r} has none "
                         f"(use template alpaca or llama2)")
