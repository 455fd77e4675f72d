"""Continuous batching for the hf backend: a decode batch whose rows come and go between steps.

Each :meth:`DecodeBatch.step` decodes one token for every running row, in forwards of
a bounded number of rows. New requests join between two forwards: :meth:`DecodeBatch.admit`
prefills them together (left-padded, a ``DynamicCache``), samples their first token and
copies their keys and values into the batch's :class:`RowCache`; they decode from the next
step. A row is done at its stop token, a stop string or ``max_tokens`` and leaves at the
end of the step (a row whose client went away, before the next one); the last row moves
into its place.

Per-row JARe routing stays exact: the routing of the current row order is set on the
model right before every forward (prefill: the newcomers; decode: every running row),
so row b of the KV cache, of the input and of the routing are always the same request.

Why not transformers' ``ContinuousBatchingManager``: it packs all rows into one varlen
sequence, where JARe's per-row slots would need a per-token routing it does not expose,
and its sdpa path on CPU attends over every row's keys with a [tokens, all keys] mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from slm_llm.dtkr import RouteDecision, routing_tensors
from slm_llm.jare import JareModel

ATTENTION = "slm_sdpa_gqa"


def sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa, but grouped KV heads are read in place (``enable_gqa``) even under a
    mask: transformers' own sdpa copies them for every query head whenever a mask is given,
    which at 64 rows cost 5x the attention itself."""
    causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, sdpa_gqa)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


class _RowLayer(CacheLayerMixin):
    """One layer's keys and values, [rows, kv_heads, columns, head_dim], written in place:
    row b holds its tokens left-aligned in columns ``[0, lengths[b])``."""

    is_sliding = False

    def __init__(self, cache: RowCache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("RowCache layers are allocated by RowCache.admit")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        c = self.cache  # decode: one new token per row of the chunk, written at the row's own length
        self.keys[c.row_ids, :, c.columns] = key_states[:, :, 0]
        self.values[c.row_ids, :, c.columns] = value_states[:, :, 0]
        a, b = c.chunk
        return self.keys[a:b, :, : c.width], self.values[a:b, :, : c.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.width, 0

    def get_seq_length(self) -> int:
        return self.cache.width - 1

    def get_max_length(self) -> int:
        return -1


class RowCache(Cache):
    """The KV cache of a running batch, preallocated and updated in place (a ``DynamicCache``
    copies itself on every step). Rows join (:meth:`admit`) and leave (:meth:`remove`) between
    forwards; a decode forward over rows ``[a, b)`` attends over columns ``[0, width)`` with
    :meth:`step_inputs`' mask. The buffers grow by doubling and are freed when the batch empties."""

    def __init__(self, num_layers: int, max_rows: int, max_len: int):
        super().__init__(layers=[_RowLayer(self) for _ in range(num_layers)])
        self.max_rows, self.max_len = max_rows, max_len
        self.lengths: list[int] = []  # cached tokens per running row
        self.chunk = (0, 0)  # the rows of the forward in progress
        self.row_ids = self.columns = None  # its write positions
        self.width = 0  # columns it attends over

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def admit(self, prefill: DynamicCache, lengths: list[int]) -> None:
        """Append rows from a left-padded prefill cache; row j's last ``lengths[j]`` columns are its tokens."""
        k0 = prefill.layers[0].keys
        self._fit(self.rows + len(lengths), max(lengths) + 1, k0)
        width = k0.shape[2]
        for layer, src in zip(self.layers, prefill.layers):
            for j, n in enumerate(lengths):
                layer.keys[self.rows + j, :, :n] = src.keys[j, :, width - n:]
                layer.values[self.rows + j, :, :n] = src.values[j, :, width - n:]
        self.lengths += lengths

    def remove(self, leaving: set[int]) -> list[int]:
        """Drop rows; each hole takes the last staying row. Returns the new order (old row indices)."""
        order = list(range(self.rows))
        for b in sorted(leaving, reverse=True):
            last = order.pop()
            if last != b:
                order[b] = last
        for new, old in enumerate(order):
            if new != old:
                n = self.lengths[old]
                for layer in self.layers:
                    layer.keys[new, :, :n] = layer.keys[old, :, :n]
                    layer.values[new, :, :n] = layer.values[old, :, :n]
        self.lengths = [self.lengths[b] for b in order]
        if not self.lengths:
            for layer in self.layers:  # idle: give the memory back
                layer.keys = layer.values = None
        return order

    def step_inputs(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids [b-a, 1], attention mask [b-a, 1, 1, width]) for a decode forward over rows [a, b)."""
        lengths = self.lengths[a:b]
        self._fit(self.rows, max(lengths) + 1, self.layers[0].keys)
        device = self.layers[0].keys.device
        cached = torch.tensor(lengths, device=device)
        self.chunk, self.width = (a, b), max(lengths) + 1
        self.row_ids, self.columns = torch.arange(a, b, device=device), cached
        mask = torch.arange(self.width, device=device)[None, :] <= cached[:, None]
        return cached[:, None], mask[:, None, None, :]

    def advance(self, a: int, b: int) -> None:
        self.lengths[a:b] = [n + 1 for n in self.lengths[a:b]]

    def _fit(self, rows: int, columns: int, like: torch.Tensor) -> None:
        """Grow the buffers (doubling, up to max_rows x max_len) to hold ``rows`` x ``columns``."""
        old = self.layers[0].keys
        if old is not None and rows <= old.shape[0] and columns <= old.shape[2]:
            return
        R = min(self.max_rows, max(rows, 2 * old.shape[0] if old is not None else 8))
        C = min(self.max_len + 1, max(columns, 2 * old.shape[2] if old is not None else 256))
        for layer in self.layers:
            shape = (R, like.shape[1], C, like.shape[3])
            # zeros, not empty: masked columns still meet the values (0 * NaN garbage would be NaN)
            keys, values = (torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(2))
            if layer.keys is not None:
                n, c = self.rows, layer.keys.shape[2]
                keys[:n, :, :c] = layer.keys[:n]
                values[:n, :, :c] = layer.values[:n]
            layer.keys, layer.values = keys, values


@dataclass
class Row:
    """One request in the batch; ``job`` is the caller's handle, returned in events."""

    prompt_ids: list[int]
    decision: RouteDecision | None  # None: the base model
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # the stop tokens are ordinary tokens: the row runs to max_tokens or a stop string
    job: Any = None
    cancelled: bool = False  # set by the caller when nobody waits for the row any more
    tokens: list[int] = field(default_factory=list)  # generated (the stop token that ended the row is not)


@dataclass
class Event:
    row: Row
    token: int | None  # a new token of the row (None: only the end)
    finish: str | None = None  # "stop" | "length" once the row is done


class DecodeBatch:
    """The running rows over one model; not thread-safe (one decode thread drives it)."""

    def __init__(self, model: JareModel, tokenizer, stop_ids: list[int], max_rows: int, max_len: int):
        config = model.model.config
        if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
            raise ValueError(f"{type(model.model).__name__}: the hf backend's decode batch supports full attention only")
        model.model.set_attn_implementation(ATTENTION)
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, set(stop_ids)
        self.max_rows = max_rows
        self.rows: list[Row] = []
        self.cache = RowCache(config.num_hidden_layers, max_rows, max_len)
        self._leaving: set[int] = set()  # rows done or abandoned, removed at the end of the step
        self._stepping = False
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def admit(self, rows: list[Row]) -> list[Event]:
        """Prefill ``rows`` together and sample their first tokens; they decode from the next step.
        May be called between the chunks of a step (the new rows are not part of it)."""
        if len(self.rows) + len(rows) > self.max_rows:
            raise ValueError(f"{len(self.rows)} rows run and {len(rows)} more would exceed {self.max_rows}")
        device = self.model.model.device
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=device)
        prefill = DynamicCache(config=self.model.model.config)
        self._route(rows)
        logits = self.model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                  past_key_values=prefill, use_cache=True, logits_to_keep=1).logits[:, -1]
        self.cache.admit(prefill, [len(r.prompt_ids) for r in rows])
        self.rows += rows
        events = self._advance(len(self.rows) - len(rows), len(self.rows), logits)
        if not self._stepping:
            self._settle()
        return events

    @torch.no_grad()
    def step(self, chunk_rows: int | None = None, after_chunk: Callable[[list[Event]], None] | None = None) -> list[Event]:
        """One token for every running row, in forwards of at most ``chunk_rows`` rows; ``after_chunk``
        gets each forward's events (and may :meth:`admit` requests that arrived meanwhile). Rows whose
        client left are dropped first; rows that finish leave at the end of the step."""
        self._leaving |= {b for b, r in enumerate(self.rows) if r.cancelled}
        self._settle()
        n, events = len(self.rows), []
        size = chunk_rows or n
        self._stepping = True
        try:
            for a in range(0, n, size):
                chunk = self._step_rows(a, min(a + size, n))
                events += chunk
                if after_chunk is not None:
                    after_chunk(chunk)
        finally:
            self._stepping = False
            self._settle()
        return events

    def clear(self) -> None:
        """Drop every row (after a failed step, when their state is unknown)."""
        self.rows, self._leaving, self._stepping = [], set(), False
        self.cache = RowCache(len(self.cache.layers), self.cache.max_rows, self.cache.max_len)
        self.model.set_routing(None, None)

    def _step_rows(self, a: int, b: int) -> list[Event]:
        device = self.model.model.device
        positions, mask = self.cache.step_inputs(a, b)
        self._route(self.rows[a:b])
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows[a:b]], device=device)
        logits = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.cache.advance(a, b)
        return self._advance(a, b, logits)

    def _route(self, rows: list[Row]) -> None:
        slot_ids, weights = routing_tensors([r.decision for r in rows])
        device = self.model.model.device
        self.model.set_routing(slot_ids.to(device), weights.to(device))

    def _advance(self, a: int, b: int, logits: torch.Tensor) -> list[Event]:
        """Sample one token for rows [a, b) and record it; the rows that are done will leave."""
        rows = self.rows[a:b]
        events = []
        for i, (row, token) in enumerate(zip(rows, _sample(logits.float(), rows).tolist())):
            kept = token not in self.stop_ids or row.ignore_eos
            finish = self._finish(row, token) if kept else "stop"
            events.append(Event(row, token if kept else None, finish))
            if finish or row.cancelled:
                self._leaving.add(a + i)
        return events

    def _finish(self, row: Row, token: int) -> str | None:
        row.tokens.append(token)
        if row.stop and any(s and s in self.tokenizer.decode(row.tokens, skip_special_tokens=True) for s in row.stop):
            return "stop"
        return "length" if len(row.tokens) >= row.max_tokens else None

    def _settle(self) -> None:
        """Remove the rows marked as leaving (never inside a step: row indices must hold until its end)."""
        if not self._leaving:
            return
        order = self.cache.remove(self._leaving)
        self.rows, self._leaving = [self.rows[b] for b in order], set()
        if not self.rows:
            self.model.set_routing(None, None)  # idle: the packs drop the slots they held


def _sample(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """[B] next tokens: argmax for temperature 0, else temperature + top-p (nucleus) sampling per row."""
    out = logits.argmax(-1)
    hot = [b for b, r in enumerate(rows) if r.temperature > 0]
    if hot:
        temps = torch.tensor([rows[b].temperature for b in hot], device=logits.device)
        top_p = torch.tensor([rows[b].top_p for b in hot], device=logits.device)
        probs = torch.softmax(logits[hot] / temps[:, None], dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_p, 1)[:, 0]
        out[hot] = order.gather(1, choice[:, None])[:, 0]
    return out
