"""DTKR keys: initialise and train a task's keys on its (cached) query embeddings.

A task's keys are a tensor [R, G, D/G]: R keys (R = P slots x keys_per_slot), each
split into G groups. The score of a query against a key is the mean over groups of
the cosine between the query's group vector and the key's group vector.

Training pulls keys towards the task's queries. For each query and group, the key
scores are masked at random (probability ``mask_prob``; a masked entry cannot be
selected) and the top-n (n = ``top_n``) remaining cosines are pulled up:

    loss = - mean_{q, g} mean_{top-n unmasked r} cos(q_g, key_{r,g})
           + centrifugal * mean_{r, g} max_m cos(key_{r,g}, frozen_{m,g})

The masking spreads queries over several keys instead of letting one key win all.
The optional centrifugal term pushes the new keys away from the frozen keys of old
tasks (the only trace of old tasks DTKR may use), so that the new task's keys do not
capture old tasks' queries.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from slm_llm.config import DtkrConfig
from slm_llm.dtkr.index import check_groups, group_normalise
from slm_llm.utils.io import atomic_path

INIT_METHODS = ("random_subsets", "kmeans")


def _grouped(emb, groups: int) -> torch.Tensor:
    """[N, D] -> [N, G, D/G] float32 tensor, each group unit-normalised."""
    emb = torch.as_tensor(np.asarray(emb, dtype=np.float32) if not torch.is_tensor(emb) else emb).float()
    if emb.dim() != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(emb.shape)}")
    sub = check_groups(emb.shape[1], groups)
    return F.normalize(emb.reshape(emb.shape[0], groups, sub), dim=-1)


def init_keys(emb, P: int, G: int, method: str = "random_subsets", seed: int = 0) -> torch.Tensor:
    """Initial keys [P, G, D/G] from a task's query embeddings [N, D].

    random_subsets: the centroids of P disjoint random subsets of the (group-normalised)
    queries. kmeans: the P k-means centres of the group-normalised queries. With fewer
    queries than keys, queries are reused so that every key still gets a centroid.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"key init {method!r} is not one of {', '.join(INIT_METHODS)}")
    if P <= 0:
        raise ValueError(f"number of keys must be > 0, got {P}")
    q = _grouped(emb, G)  # [N, G, d]
    n = q.shape[0]
    if n == 0:
        raise ValueError("cannot initialise keys from 0 query embeddings")
    rng = np.random.default_rng(seed)
    if method == "kmeans" and n >= P:
        from sklearn.cluster import KMeans

        flat = q.reshape(n, -1).numpy()
        km = KMeans(n_clusters=P, n_init=4, random_state=seed).fit(flat)
        return torch.from_numpy(km.cluster_centers_.astype(np.float32)).reshape(P, G, -1)
    order = rng.permutation(n)
    if n < P:
        order = np.concatenate([order, rng.integers(0, n, P - n)])
    parts = np.array_split(order, P)
    return torch.stack([q[torch.as_tensor(p)].mean(0) for p in parts])  # [P, G, d]


def pull_loss(
    q: torch.Tensor, keys: torch.Tensor, top_n: int, mask_prob: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The masked top-n pull loss for grouped queries q [B, G, d] and keys [R, G, d] (a scalar)."""
    cos = torch.einsum("bgd,rgd->brg", q, F.normalize(keys, dim=-1))  # [B, R, G]
    if mask_prob > 0:
        mask = torch.rand(cos.shape, generator=generator) < mask_prob
        cos = cos.masked_fill(mask, float("-inf"))
    n = min(top_n, keys.shape[0])
    top = cos.topk(n, dim=1).values  # [B, n, G]
    valid = torch.isfinite(top)
    total = torch.where(valid, top, torch.zeros_like(top)).sum()
    return -total / valid.sum().clamp_min(1)


def centrifugal_loss(keys: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """Mean over new keys and groups of the highest cosine to any frozen key, [R,G,d] x [M,G,d]."""
    cos = torch.einsum("rgd,mgd->rmg", F.normalize(keys, dim=-1), F.normalize(frozen, dim=-1))
    return cos.max(dim=1).values.mean()


def train_keys(
    emb,
    keys: torch.Tensor,
    cfg: DtkrConfig,
    frozen_keys: torch.Tensor | None = None,
    history: list[float] | None = None,
) -> torch.Tensor:
    """Train a task's keys [R, G, d] on its query embeddings [N, D]; return the new keys (a copy).

    AdamW on the loss in the module docstring for ``cfg.epochs`` passes over the
    embeddings in shuffled batches of ``cfg.batch_size``. ``frozen_keys`` [M, G, d]
    are old tasks' keys, used only when ``cfg.centrifugal > 0``. If ``history`` is
    given, the mean loss of each epoch is appended to it.
    """
    G = keys.shape[1]
    q = _grouped(emb, G)  # [N, G, d]
    if q.shape[2] != keys.shape[2]:
        raise ValueError(f"keys have group size {keys.shape[2]}, embeddings give {q.shape[2]}")
    gen = torch.Generator().manual_seed(cfg.seed)
    param = torch.nn.Parameter(keys.detach().clone().float())
    opt = torch.optim.AdamW([param], lr=cfg.lr, weight_decay=0.0)
    frozen = None
    if frozen_keys is not None and cfg.centrifugal > 0 and len(frozen_keys):
        frozen = frozen_keys.detach().float()
    n = q.shape[0]
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        losses = []
        for start in range(0, n, cfg.batch_size):
            batch = q[perm[start : start + cfg.batch_size]]
            loss = pull_loss(batch, param, cfg.top_n, cfg.mask_prob, gen)
            if frozen is not None:
                loss = loss + cfg.centrifugal * centrifugal_loss(param, frozen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        if history is not None:
            history.append(float(np.mean(losses)))
    return param.detach().clone()


def score_matrix(emb, keys) -> np.ndarray:
    """Mean group cosines [N, R] of query embeddings [N, D] against keys [R, G, d]."""
    keys = keys.detach().cpu().numpy() if torch.is_tensor(keys) else np.asarray(keys, dtype=np.float32)
    R, G, _ = keys.shape
    emb = emb.detach().cpu().numpy() if torch.is_tensor(emb) else emb
    return group_normalise(emb, G) @ group_normalise(keys.reshape(R, -1), G).T


def save_keys(path: str | Path, keys: torch.Tensor, meta: dict[str, Any] | None = None) -> None:
    """Write ``keys`` [R, G, d] and a JSON-able ``meta`` dict to a safetensors file, atomically."""
    with atomic_path(path) as tmp:
        save_file({"keys": keys.detach().cpu().float().contiguous()}, str(tmp),
                  metadata={"meta": json.dumps(meta or {}, sort_keys=True)})


def load_keys(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read keys [R, G, d] and their meta dict from ``save_keys``'s file."""
    with safe_open(str(path), framework="pt") as f:
        keys = f.get_tensor("keys")
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    return keys, meta
