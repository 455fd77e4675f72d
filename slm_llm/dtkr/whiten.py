"""Whitening of the DTKR score space with the pooled within-task covariance.

Plain cosines over MiniLM embeddings are dominated by a few directions that vary a
lot inside every task (topic, length, style) and say little about which task a
query belongs to. Whitening with the pooled within-task covariance Σ (the covariance
of a query around its own task's mean, averaged over tasks) divides those directions
out, as linear discriminant analysis does; the router then takes the usual mean
group cosine of the whitened query and whitened keys, so the FAISS inner-product
trick is unchanged.

Everything lives in the space u(x) of per-group unit-normalised embeddings (each of
the G groups of x scaled to norm 1); key centroids are means in that same space, so
the affine map T(u) = (u - m) W, W = Σ_s^{-1/2}, sends a centroid of queries to the
centroid of their images. Σ_s = (1 - a) Σ + a tr(Σ)/D I is shrunk towards a scaled
identity (a = ``shrinkage``).

Continual use: each task contributes, when it is added, only sufficient statistics
of its own training queries: their count, their sum and their scatter around their
own mean. No query is stored. The scatter is kept per task as a factor F_t (D x r,
F_t F_t^T = the scatter, r = min(N_t, D): a few MB per task at D = 4096 with a few
hundred queries), so the map as it stood after any stage can be rebuilt exactly
(``from_state(..., n_tasks=n)``), which scoring an earlier row of the continual-learning
matrix needs. T changes when a task is added, so the router re-maps every stored key
(raw keys are kept) and rebuilds the index.
"""
from __future__ import annotations

import numpy as np

from slm_llm.dtkr.index import check_groups


def group_unit(x: np.ndarray, groups: int) -> np.ndarray:
    """[N, D] -> [N, D] float64 with each of the G groups scaled to unit norm."""
    x = np.asarray(x, dtype=np.float64)
    n, dim = x.shape
    sub = check_groups(dim, groups)
    g = x.reshape(n, groups, sub)
    g = g / np.maximum(np.linalg.norm(g, axis=2, keepdims=True), 1e-12)
    return g.reshape(n, dim)


class Whitener:
    """Per-task statistics, their pooled within-task covariance and the whitening map T."""

    def __init__(self, dim: int, groups: int, shrinkage: float = 0.05):
        self.dim, self.groups, self.shrinkage = dim, groups, shrinkage
        self.counts: list[int] = []  # per task: its training queries
        self.sums: list[np.ndarray] = []  # per task: Σ u, [D]
        self.factors: list[np.ndarray] = []  # per task: F [D, r], F F^T = Σ_i (u_i - μ_t)(u_i - μ_t)^T
        self.scatter = np.zeros((dim, dim))  # Σ_t F_t F_t^T
        self._mean = np.zeros(dim)
        self._W = np.eye(dim)

    def add_task(self, emb: np.ndarray) -> None:
        """Fold in one task's training query embeddings [N, D] (then they can be discarded)."""
        u = group_unit(emb, self.groups)
        self._add(len(u), u.sum(0), scatter_factor(u - u.mean(0)))
        self._refresh()

    def _add(self, count: int, total: np.ndarray, factor: np.ndarray) -> None:
        self.counts.append(count)
        self.sums.append(total)
        self.factors.append(factor)
        self.scatter += factor @ factor.T

    def _refresh(self) -> None:
        count, n_tasks = sum(self.counts), len(self.counts)
        self._mean = sum(self.sums) / max(count, 1) if self.sums else np.zeros(self.dim)
        dof = count - n_tasks
        if dof <= 0:
            self._W = np.eye(self.dim)
            return
        cov = self.scatter / dof
        a = self.shrinkage
        cov = (1 - a) * cov + a * np.trace(cov) / self.dim * np.eye(self.dim)
        vals, vecs = np.linalg.eigh(cov)
        self._W = (vecs * np.maximum(vals, 1e-12) ** -0.5) @ vecs.T

    def transform_queries(self, x: np.ndarray) -> np.ndarray:
        """Raw query embeddings [N, D] -> whitened [N, D] float32: (u(x) - m) W."""
        return ((group_unit(x, self.groups) - self._mean) @ self._W).astype(np.float32)

    def transform_keys(self, keys: np.ndarray) -> np.ndarray:
        """Keys [R, D], already in u-space (centroids of u(x), not re-normalised) -> (k - m) W."""
        return ((np.asarray(keys, dtype=np.float64) - self._mean) @ self._W).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for pos, (count, total, factor) in enumerate(zip(self.counts, self.sums, self.factors)):
            out |= {f"task{pos}/count": np.array([count], dtype=np.int64), f"task{pos}/sum": total,
                    f"task{pos}/factor": factor}
        return out

    @classmethod
    def from_state(cls, dim: int, groups: int, shrinkage: float, state: dict[str, np.ndarray],
                   n_tasks: int | None = None) -> Whitener:
        """The whitener saved as ``state``; with ``n_tasks``, as it stood after its first n tasks."""
        self = cls(dim, groups, shrinkage)
        saved = sum(key.endswith("/count") for key in state)
        for pos in range(saved if n_tasks is None else min(n_tasks, saved)):
            self._add(int(state[f"task{pos}/count"][0]), np.asarray(state[f"task{pos}/sum"], dtype=np.float64),
                      np.asarray(state[f"task{pos}/factor"], dtype=np.float64))
        self._refresh()
        return self


def scatter_factor(centred: np.ndarray) -> np.ndarray:
    """[N, D] centred rows -> F [D, r] with F F^T = centred^T centred, r = min(N, D): the
    scatter's square root, which holds no individual query (any rotation of F gives the same)."""
    n, dim = centred.shape
    if n >= dim:
        vals, vecs = np.linalg.eigh(centred.T @ centred)
        return vecs * np.sqrt(np.maximum(vals, 0.0))
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    return vt.T * sv
