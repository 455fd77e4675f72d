"""SlotIndex: a FAISS inner-product index whose score is the mean group cosine.

A key (or query) of dimension D is split into G groups of D/G. Storing
``concat_g(normalise(key_g)) / sqrt(G)`` and querying with the same transform of
the query makes the inner product

    <q', k'> = Σ_g <q_g/|q_g|, k_g/|k_g|> / G = (1/G) Σ_g cos(q_g, k_g)

exactly the DTKR score, so any inner-product index (flat or HNSW) ranks slots by it.

Row ids are positions: rows are only ever appended, so the i-th added vector has
id i and no IndexIDMap is needed. A copy of the transformed vectors is kept in
memory (40k slots x 384 floats = 61 MB at most in practice), which serves exact
scoring of a subset (training-time routing) and the one-off migration from flat
to HNSW when ``kind="auto"`` crosses ``hnsw_threshold``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from slm_llm.config import ConfigError
from slm_llm.errors import SlmError
from slm_llm.utils.io import atomic_path, write_json



class DtkrIndexError(SlmError, RuntimeError):
    """The index was asked for something it cannot do (bad shape, no GPU, empty)."""


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a hard dependency of the cpu/gpu extras
        raise DtkrIndexError("faiss is not installed: pip install 'slm_llm[cpu]' (faiss-cpu) or '[gpu]'") from e
    return faiss


def check_groups(dim: int, groups: int) -> int:
    """Return D/G, or fail with the numbers when the encoder's D is not divisible by G."""
    if dim % groups:
        divisors = [g for g in range(1, min(dim, 64) + 1) if dim % g == 0]
        raise ConfigError(
            f"embedding dim {dim} is not divisible by dtkr.groups={groups}; "
            f"choose one of {divisors} (D % G must be 0)"
        )
    return dim // groups


def slot_span_start(dim: int, groups: int, slot_groups: int) -> int:
    """The first dim of the last ``slot_groups`` groups, which rank a task's slots (0: all groups)."""
    return dim - dim // groups * slot_groups if slot_groups else 0


def group_normalise(x: np.ndarray, groups: int) -> np.ndarray:
    """[N, D] (or [N, G, D/G]) -> [N, D] float32: each group unit-normalised, all divided by sqrt(G)."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    dim = x.shape[1] if x.ndim == 2 else x.shape[1] * x.shape[2]
    sub = check_groups(dim, groups)
    x = x.reshape(n, groups, sub)  # [N, G, D/G]
    norms = np.linalg.norm(x, axis=2, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(x.reshape(n, dim) / math.sqrt(groups), dtype=np.float32)


class SlotIndex:
    """Inner-product index over group-normalised keys; ``search`` returns mean group cosines.

    kind: "flat" (exact IndexFlatIP), "hnsw" (IndexHNSWFlat, inner product), or "auto"
    (flat until more than ``hnsw_threshold`` rows, then migrated once to HNSW).
    device: "cpu" or "cuda" (a faiss GPU build is required for "cuda"; only the flat
    index is moved to the GPU, HNSW stays on the CPU because faiss has no GPU HNSW).
    """

    def __init__(
        self,
        dim: int,
        groups: int,
        kind: str = "auto",
        hnsw_threshold: int = 20000,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        device: str = "cpu",
    ):
        check_groups(dim, groups)
        self.dim, self.groups, self.kind = dim, groups, kind
        self.hnsw_threshold, self.hnsw_m = hnsw_threshold, hnsw_m
        self.ef_construction, self.ef_search = ef_construction, ef_search
        self.device = device
        self._gpu_res = None
        if device == "cuda":
            self._gpu_res = _gpu_resources()
        self._buf = np.zeros((0, dim), dtype=np.float32)  # transformed rows; the first _n are used
        self._n = 0
        self._index = self._new_index("hnsw" if kind == "hnsw" else "flat")

    # ---- building ----------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def _vectors(self) -> np.ndarray:
        return self._buf[: self._n]

    @property
    def current_kind(self) -> str:
        """The structure in use now: "flat" or "hnsw" (``kind`` may be "auto")."""
        return self._current

    def _new_index(self, which: str):
        faiss = _faiss()
        self._current = which
        if which == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
            return index
        index = faiss.IndexFlatIP(self.dim)
        if self._gpu_res is not None:
            index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
        return index

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Append raw keys [N, D] or [N, G, D/G]; return their row ids [N] (consecutive)."""
        vecs = group_normalise(_as_numpy(keys), self.groups)
        if vecs.shape[1] != self.dim:
            raise DtkrIndexError(f"keys have dim {vecs.shape[1]}, the index has dim {self.dim}")
        start = self.ntotal
        if start + len(vecs) > len(self._buf):  # grow by doubling: adding many tasks stays linear
            buf = np.zeros((max(2 * len(self._buf), start + len(vecs), 64), self.dim), dtype=np.float32)
            buf[:start] = self._buf[:start]
            self._buf = buf
        self._buf[start : start + len(vecs)] = vecs
        self._n = start + len(vecs)
        if self.kind == "auto" and self._current == "flat" and self.ntotal > self.hnsw_threshold:
            # Migrate once: rebuild as HNSW from the kept copy of every row.
            self._index = self._new_index("hnsw")
            self._index.add(self._vectors)
        else:
            self._index.add(vecs)
        return np.arange(start, self.ntotal, dtype=np.int64)

    # ---- querying ----------------------------------------------------------------
    def prepare_queries(self, queries: np.ndarray) -> np.ndarray:
        q = group_normalise(_as_numpy(queries), self.groups)
        if q.shape[1] != self.dim:
            raise DtkrIndexError(f"queries have dim {q.shape[1]}, the index has dim {self.dim}")
        return q

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw queries [B, D] -> (scores [B, k'] mean group cosines, row ids [B, k']), k' = min(k, N)."""
        if self.ntotal == 0:
            raise DtkrIndexError("the index is empty")
        q = self.prepare_queries(queries)
        k = min(int(k), self.ntotal)
        scores, ids = self._index.search(q, k)
        return scores, ids

    # ---- persistence -------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``index.faiss`` and ``index.json`` into ``directory``, each atomically."""
        faiss = _faiss()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = self._index
        if self._gpu_res is not None and self._current == "flat":
            index = faiss.index_gpu_to_cpu(index)
        with atomic_path(directory / "index.faiss") as tmp:
            faiss.write_index(index, str(tmp))
        write_json(directory / "index.json", {
            "dim": self.dim, "groups": self.groups, "kind": self.kind, "current": self._current,
            "hnsw_threshold": self.hnsw_threshold, "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction, "ef_search": self.ef_search, "ntotal": self.ntotal,
        })

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> SlotIndex:
        faiss = _faiss()
        directory = Path(directory)
        try:
            meta = json.loads((directory / "index.json").read_text())
        except FileNotFoundError:
            raise DtkrIndexError(f"no index.json in {directory}") from None
        self = cls(meta["dim"], meta["groups"], meta["kind"], meta["hnsw_threshold"], meta["hnsw_m"],
                   meta["ef_construction"], meta["ef_search"], device)
        index = faiss.read_index(str(directory / "index.faiss"))
        if index.ntotal != meta["ntotal"] or index.d != meta["dim"]:
            raise DtkrIndexError(f"{directory}/index.faiss does not match index.json (rows or dim differ)")
        self._buf = np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)
        self._n = len(self._buf)
        self._current = meta["current"]
        if self._current == "hnsw":
            index.hnsw.efSearch = self.ef_search
        elif self._gpu_res is not None:
            index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
        self._index = index
        return self


def _gpu_resources():
    faiss = _faiss()
    has_gpu_build = hasattr(faiss, "StandardGpuResources")
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not has_gpu_build or n == 0:
        why = "this faiss build has no GPU support (faiss-cpu)" if not has_gpu_build else "no GPU is visible"
        raise DtkrIndexError(
            f"a GPU FAISS index was requested but {why}; install faiss-gpu-cu12 on a CUDA machine "
            "or use the CPU index (device='cpu')"
        )
    return faiss.StandardGpuResources()


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)
