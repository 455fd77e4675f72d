"""Out-of-distribution test of a routed query: a per-task Gaussian over its training queries.

``dtkr.ood_rule`` (the task's own distribution):

    keys       the query's best plain score against the routed task's keys is below the
               ``ood_percentile``-th percentile of the task's own training queries' scores
    gaussian   the query's squared Mahalanobis distance to the routed task's training queries
               is above the ``(100 - ood_percentile)``-th percentile of their distances

The Gaussian lives in the space of per-group unit-normalised embeddings (where the keys
live). Its covariance is shrunk towards a scaled identity, Σ_s = (1 - a) Σ + a tr(Σ)/D I
(a = ``ood_shrinkage``), and kept as its top ``ood_rank`` eigenpairs plus one value for the
rest of the spectrum (their mean), so a task stores D * (rank + 1) + rank + 2 numbers, not
D x D. A distance measured on the points the Gaussian was fitted on is biased low (with a
few hundred queries in hundreds of dimensions, badly), so the threshold comes from
*out-of-fold* distances: each fifth of the training records is measured under the Gaussian
fitted on the other four fifths. Several wordings of one record (``dtkr.renderings``) stay in
one fold, or its twin in the other folds would pull its distance down.

Random folds keep every wording of the task (its train phrasings, its bare inputs) in each
fold's fit, so they measure how far a *new record* in a *known wording* lies. A user's own
phrasing is a new wording, and for a task of short inputs the wording moves the embedding
most: a new phrasing of such a task can land past that threshold for its wording alone.
So the threshold is raised, where it must be, to admit ``ood_wording_coverage`` of the
training queries measured under a Gaussian fitted *without their wording* (folds of
wordings). Tasks whose inputs dominate their embeddings do not move. Everything is fitted
once, when the task is added, from that task's queries only, and never changes: an old
task's OOD decisions cannot drift.

A task's training queries are mostly phrased (a train phrasing around the input), so its
Gaussian is centred on phrased queries, and a bare input ("input-only": a user pastes the text
alone) lands at its edge. So each task also gets a **bare-input Gaussian**
(``dtkr.ood_bare_percentile``), fitted the same way on its records' contents alone (the training
sample's and the calibration records'), and a query either Gaussian admits is in distribution.

Neither rule alone rejects ordinary chat ("What's the capital of Australia?"): a short
generic request sits as close to a task of short inputs (news sentences, court sentences)
as that task's own queries do. So each task also gets a **background test**
(``dtkr.ood_background``): a linear classifier (logistic regression, same space) between the
task's training queries and a fixed set of generic assistant requests shipped with slm_llm
(``background_requests.txt``, or your own file). A query the classifier places on the
background's side of every training query of the task (their out-of-fold scores) is OOD.
The background set is the same for every task and never grows, so the test, too, is fitted
once per task, and no old task's data is needed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slm_llm.data import read_requests
from slm_llm.dtkr.whiten import group_unit

FOLDS = 5
MIN_QUERIES = 2 * FOLDS  # two per fold, at least
BACKGROUND_C = 1000.0  # inverse L2 strength of the background classifier (chosen on dev, bench/RESULTS.md)
BUILTIN_BACKGROUND = Path(__file__).with_name("background_requests.txt")


@dataclass
class TaskGaussian:
    mean: np.ndarray  # [D]
    vectors: np.ndarray  # [D, k] top eigenvectors of the shrunk covariance
    values: np.ndarray  # [k] their eigenvalues
    rest: float  # the eigenvalue given to every other direction
    threshold: float  # squared distances above it are out of distribution
    oof: np.ndarray | None = None  # the training queries' out-of-fold distances (calibration; not saved)
    wording_floor: float = 0.0  # the least threshold the leave-wording-out distances asked for (not saved)

    def distance(self, emb: np.ndarray, groups: int) -> np.ndarray:
        """Squared Mahalanobis distances [N] of raw embeddings [N, D]."""
        c = group_unit(emb, groups) - self.mean
        proj = c @ self.vectors  # [N, k]
        inside = (proj**2 / self.values).sum(1)
        outside = np.maximum((c**2).sum(1) - (proj**2).sum(1), 0.0) / self.rest
        return inside + outside

    def flags(self, emb: np.ndarray, groups: int) -> np.ndarray:
        """[N] bools: farther out than the threshold (out of distribution)."""
        return self.distance(emb, groups) > self.threshold

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.vectors": self.vectors, f"{prefix}.values": self.values,
                f"{prefix}.scalars": np.array([self.rest, self.threshold])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], prefix: str) -> TaskGaussian:
        rest, threshold = (float(v) for v in state[f"{prefix}.scalars"])
        return cls(state[f"{prefix}.mean"], state[f"{prefix}.vectors"], state[f"{prefix}.values"], rest, threshold)


def fit_gaussian(u: np.ndarray, shrinkage: float, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, top-k eigenvectors, their eigenvalues, rest value) of the shrunk covariance of ``u`` [N, D]."""
    n, dim = u.shape
    mean = u.mean(0)
    centred = u - mean
    cov = centred.T @ centred / max(n - 1, 1)
    vals, vecs = np.linalg.eigh(cov)  # ascending
    scale = max(float(np.trace(cov)) / dim, 1e-12)
    vals = (1 - shrinkage) * np.maximum(vals, 0.0) + shrinkage * scale
    k = min(rank, dim - 1)
    top, rest = vals[::-1][:k], vals[::-1][k:]
    return mean, vecs[:, ::-1][:, :k].copy(), top, float(rest.mean()) if len(rest) else float(scale)


def group_folds(groups_of_rows: np.ndarray, seed: int) -> list[np.ndarray]:
    """Up to FOLDS calibration folds as row masks: the distinct values of ``groups_of_rows`` [N]
    (a training record, or a wording) are shuffled by ``seed`` and dealt out, a value's rows
    staying in one fold."""
    ids = np.unique(groups_of_rows)
    shuffled = ids[np.random.default_rng(seed).permutation(len(ids))]
    return [np.isin(groups_of_rows, fold) for fold in np.array_split(shuffled, min(FOLDS, len(ids)))]


def out_of_fold(emb: np.ndarray, u: np.ndarray, groups: int, shrinkage: float, rank: int,
                folds: list[np.ndarray]) -> np.ndarray:
    """Each row's squared distance [N] under the Gaussian fitted on the rows outside its fold."""
    out = np.zeros(len(u))
    for fold in folds:
        out[fold] = TaskGaussian(*fit_gaussian(u[~fold], shrinkage, rank), threshold=np.inf).distance(emb[fold], groups)
    return out


def calibrate(emb: np.ndarray, groups: int, shrinkage: float, rank: int, percentile: float,
              seed: int = 0, records: np.ndarray | None = None, wordings: np.ndarray | None = None,
              wording_coverage: float = 0.0, background: np.ndarray | None = None,
              wording_cap: float = 100.0) -> TaskGaussian:
    """The task's Gaussian from its training query embeddings [N, D], thresholded out of fold;
    ``records`` [N] names the training record each row words (default: a record per row).
    With ``wordings`` [N] (each row's wording: a phrasing, the input alone, ...) and
    ``wording_coverage`` > 0, the threshold is raised, if need be, to admit that share of the
    rows measured under a Gaussian fitted without their wording; with ``background`` [M, D]
    (generic requests), never so far that it admits more than ``wording_cap`` % of them."""
    u = group_unit(emb, groups)
    records = np.arange(len(u)) if records is None else np.asarray(records)
    n_records = len(np.unique(records))
    if n_records < MIN_QUERIES:
        raise ValueError(f"the gaussian OOD rule needs at least {MIN_QUERIES} training records, got {n_records}")
    oof = out_of_fold(emb, u, groups, shrinkage, rank, group_folds(records, seed))
    gaussian = TaskGaussian(*fit_gaussian(u, shrinkage, rank), threshold=float(np.percentile(oof, 100 - percentile)),
                            oof=oof)
    if wordings is not None and wording_coverage > 0 and len(np.unique(wordings)) > 1:
        unseen = out_of_fold(emb, u, groups, shrinkage, rank, group_folds(np.asarray(wordings), seed))
        floor = float(np.percentile(unseen, 100 * wording_coverage))
        if background is not None and len(background):
            floor = min(floor, float(np.percentile(gaussian.distance(background, groups), wording_cap)))
        gaussian.wording_floor = floor
        gaussian.threshold = max(gaussian.threshold, floor)
    return gaussian


@dataclass
class BackgroundTest:
    """A task's queries against generic requests: ``w . u + bias`` over the per-group unit-normalised
    embedding ``u``; a query scoring below ``threshold`` (the lowest out-of-fold score of the task's
    own training queries) looks more like the background than any of them: OOD."""

    weight: np.ndarray  # [D]
    bias: float
    threshold: float

    def score(self, emb: np.ndarray, groups: int) -> np.ndarray:
        return group_unit(emb, groups) @ self.weight + self.bias

    def flags(self, emb: np.ndarray, groups: int) -> np.ndarray:
        return self.score(emb, groups) < self.threshold

    def state(self) -> np.ndarray:
        return np.concatenate([self.weight, [self.bias, self.threshold]])

    @classmethod
    def from_state(cls, v: np.ndarray) -> BackgroundTest:
        return cls(v[:-2], float(v[-2]), float(v[-1]))


def fit_background_test(emb: np.ndarray, background: np.ndarray, groups: int, seed: int = 0,
                        records: np.ndarray | None = None) -> BackgroundTest:
    """The task's background test from its training query embeddings [N, D] and the background
    requests' [M, D]; the threshold from out-of-fold scores (``records`` as in :func:`calibrate`)."""
    u, bg = group_unit(emb, groups), group_unit(background, groups)
    records = np.arange(len(u)) if records is None else np.asarray(records)
    oof = np.zeros(len(u))
    for fold in group_folds(records, seed):
        oof[fold] = _classifier(u[~fold], bg).decision_function(u[fold])
    clf = _classifier(u, bg)
    return BackgroundTest(clf.coef_[0].astype(np.float32), float(clf.intercept_[0]), float(oof.min()))


def _classifier(task: np.ndarray, background: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([task, background])
    y = np.r_[np.ones(len(task)), np.zeros(len(background))]
    with warnings.catch_warnings():  # nearly separable sets stop at max_iter with a usable boundary
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=BACKGROUND_C, class_weight="balanced", max_iter=2000).fit(x, y)


def background_embeddings(setting: str, encoder) -> np.ndarray | None:
    """``encoder``'s embeddings [M, D] of the ``dtkr.ood_background`` requests: "builtin" (shipped
    with slm_llm), a file (.txt one per line, .jsonl with ``prompt``/``query``), or "none" (None)."""
    if setting == "none":
        return None
    return encoder.encode(read_requests(BUILTIN_BACKGROUND if setting == "builtin" else setting))


def needs_bare(cfg, background: np.ndarray | None) -> bool:
    """Whether a task's OOD tests use its records' bare inputs: the background test (``background``,
    the requests' embeddings, or None) or the bare-input Gaussian (``cfg``: a DtkrConfig)."""
    return background is not None or (cfg.ood_rule == "gaussian" and cfg.ood_bare_percentile < 100)
