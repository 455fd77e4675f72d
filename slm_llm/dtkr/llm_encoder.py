"""DTKR's ``base`` encoder: the frozen base LLM itself, mean-pooled at a chosen layer.

The query's tokens go through the first ``layer`` decoder blocks of the base model
(the blocks after it are dropped from this copy), and the residual stream after
block ``layer`` is averaged over the real (non-pad) tokens. Early layers carry the
domain and form of a query rather than its answer: on instruct6 and cl9 they route
better than all-MiniLM-L6-v2 at the same cost per query, though end to end they trained
worse increments (docs/routing.md, bench/RESULTS.md).

The object quacks like a sentence-transformers model (``encode``,
``get_embedding_dimension``), so :class:`slm_llm.dtkr.encoder.Encoder` caches its
embeddings like any other encoder's.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from slm_llm.config import ConfigError, ModelConfig


class HiddenStateEncoder:
    """Mean of the hidden states after decoder block ``layer`` (1-based) of the frozen base model."""

    def __init__(self, model_cfg: ModelConfig, layer: int, max_length: int = 256):
        from slm_llm.models import model_id

        if layer < 1:
            raise ConfigError(f"dtkr.encoder_layer must be >= 1, got {layer}")
        self.model_cfg = copy.deepcopy(model_cfg)
        self.model_cfg.gradient_checkpointing = False
        self.layer = layer
        self.max_length = max_length
        self.id = f"base:{model_id(model_cfg)}@layer{layer}"
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        from slm_llm.models import load_base_model

        model, tok = load_base_model(self.model_cfg)
        decoder = model.get_decoder()
        n = len(decoder.layers)
        if self.layer > n:
            raise ConfigError(f"dtkr.encoder_layer={self.layer}, but model {self.model_cfg.name!r} has {n} "
                             f"decoder layers")
        decoder.layers = decoder.layers[: self.layer]  # this copy is the encoder's own
        decoder.config.num_hidden_layers = self.layer
        decoder.norm = torch.nn.Identity()  # the raw residual stream after block `layer`
        if torch.cuda.is_available() and not self.model_cfg.load_in_4bit:  # as RunPipeline places the model
            decoder.to("cuda")
        self._model, self._tokenizer = decoder.eval(), tok

    def get_embedding_dimension(self) -> int:
        if self._model is None:
            self._load()
        return int(self._model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, show_progress_bar: bool = False,
               **_: Any) -> np.ndarray:
        """[N] texts -> [N, hidden] float32; texts are batched by length to keep padding small."""
        from tqdm.auto import tqdm

        if self._model is None:
            self._load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.get_embedding_dimension()), dtype=np.float32)
        device = next(self._model.parameters()).device
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="encode", disable=not show_progress_bar):
            idx = order[start : start + batch_size]
            batch = self._tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                    truncation=True, max_length=self.max_length).to(device)
            hidden = self._model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            out[idx] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy()
        return out
