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
own mean (a D x D matrix). No query is stored. T changes when a task is added, so
the router re-maps every stored key (raw keys are kept) and rebuilds the index.
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
    """Pooled within-task statistics and the whitening map T built from them."""

    def __init__(self, dim: int, groups: int, shrinkage: float = 0.05):
        self.dim, self.groups, self.shrinkage = dim, groups, shrinkage
        self.count = 0  # queries seen, over all tasks
        self.n_tasks = 0
        self.total = np.zeros(dim)  # Σ u
        self.scatter = np.zeros((dim, dim))  # Σ_tasks Σ_i (u_i - μ_t)(u_i - μ_t)^T
        self._mean = np.zeros(dim)
        self._W = np.eye(dim)

    def add_task(self, emb: np.ndarray) -> None:
        """Fold in one task's training query embeddings [N, D] (then they can be discarded)."""
        u = group_unit(emb, self.groups)
        centred = u - u.mean(0)
        self.count += len(u)
        self.n_tasks += 1
        self.total += u.sum(0)
        self.scatter += centred.T @ centred
        self._refresh()

    def _refresh(self) -> None:
        self._mean = self.total / max(self.count, 1)
        dof = self.count - self.n_tasks
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
        return {"count": np.array([self.count, self.n_tasks], dtype=np.int64), "total": self.total,
                "scatter": self.scatter}

    @classmethod
    def from_state(cls, dim: int, groups: int, shrinkage: float, state: dict[str, np.ndarray]) -> Whitener:
        self = cls(dim, groups, shrinkage)
        self.count, self.n_tasks = (int(v) for v in state["count"])
        self.total = np.asarray(state["total"], dtype=np.float64)
        self.scatter = np.asarray(state["scatter"], dtype=np.float64)
        self._refresh()
        return self
