"""Router: per-query task and slot selection over every task's DTKR keys.

The router holds a SlotIndex over all tasks' keys plus a slot table. Each task owns
P consecutive global slot ids (task i: i*P .. i*P+P-1 when every task has P slots;
the table is stored anyway), the same numbering JareModel uses. With
``keys_per_slot`` = m > 1 a task brings P*m keys and key j belongs to its slot j // m;
a slot's score is the best score of its keys.

One slot rule, the same in training and at inference, for each query q:
  1. pick the task: the task of the best key in the index (plain mean group cosine
     s(q, key) = (1/G) Σ_g cos(q_g, key_g); with ``whiten=True``, the best key after the
     whitening map T of ``slm_llm.dtkr.whiten``);
  2. score that task's own slots plainly (a slot's score: the best of its keys) and keep
     its top K, with weights w_k = max(s_k, ε) / Σ_j max(s_j, ε) (``slot_weights="similarity"``,
     the paper's) or w_k = 1/K (``"uniform"``: a mix a plain LoRA adapter can hold exactly, so
     the vLLM backend serves what exact JARe computes);
  3. the query is out of distribution (OOD) when the task's OOD test flags it (below).
Training knows the task and runs steps 2-3 only (``restrict_task``), so a query routed to
the right task gets exactly the mix of slots its task was trained with, never half a slot
of another task. Plain scores depend only on frozen keys and the frozen encoder, while T
changes with every new task; so a query routed to an old task gets the slots and weights
it got when that task was trained: the old task's behaviour cannot drift.

OOD calibration (``slm_llm.dtkr.ood``), once, when the task is added, from its own
training queries: with ``ood_rule="keys"`` the threshold is the ``ood_percentile``-th
percentile of their plain best scores against the task's keys; with ``"gaussian"`` a
Gaussian of the task's queries flags the ``ood_percentile`` % farthest (measured out of
fold). Either way about ood_percentile % of in-task queries would be flagged. A query the
Gaussian flags is still admitted by the task's Gaussian of its records' bare inputs
(``ood_bare_percentile``, when added with ``bare_emb``). With ``ood_background`` (the default)
a task's background test (generic chat requests vs its queries) flags it too.

Stages: a task, once added, never changes (keys, OOD tests); only the whitening map moves
with each new task, and the whitening keeps its statistics per task. So
``Router.load(..., n_tasks=n)`` rebuilds the router exactly as it stood after its first n
tasks: what scoring an earlier row of the continual-learning matrix needs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import load_file, save_file

from slm_llm.dtkr.index import SlotIndex, check_groups, group_normalise, slot_span_start
from slm_llm.dtkr.keys import load_keys, save_keys, score_matrix
from slm_llm.config import DtkrConfig, JareConfig
from slm_llm.dtkr.ood import MIN_QUERIES, BackgroundTest, TaskGaussian, calibrate, fit_background_test
from slm_llm.dtkr.whiten import Whitener
from slm_llm.errors import SlmError
from slm_llm.run import RunDir
from slm_llm.utils.io import atomic_path, write_json

WEIGHT_EPS = 1e-4  # scores are clamped to this before w = s / Σ s, so weights stay valid
FORMAT = 3  # slots.json (3: the whitening saved per task)


class RouterError(SlmError, ValueError):
    """The router cannot answer: empty, unknown task, wrong shapes or a mismatched encoder."""


@dataclass
class RouteDecision:
    slots: list[int]  # global slot ids, best first (K of them)
    weights: list[float]  # over the chosen slots, summing to 1 (slot_weights: s_k / Σ s_j, or 1/K)
    task: str  # task of the best slot: the adapter a single-adapter backend serves
    score: float  # best slot's raw mean group cosine
    ood: bool  # the routed task's OOD test flags the query (slm_llm.dtkr.ood)
    scores: list[float]  # raw scores of ``slots``

    def to_dict(self) -> dict:
        return asdict(self)


class Router:
    """Built from a validated DtkrConfig (``cfg``: groups, keys per slot, whitening, OOD rule, index)
    and JareConfig (``jare``: K and the slot weights); ``dim`` is the encoder's."""

    def __init__(self, dim: int, cfg: DtkrConfig, jare: JareConfig, encoder_id: str = "", device: str | None = None):
        check_groups(dim, cfg.groups)
        self.dim, self.cfg, self.encoder_id = dim, cfg, encoder_id
        self.groups, self.keys_per_slot = cfg.groups, cfg.keys_per_slot
        self.top_k, self.slot_weights = jare.top_k, jare.slot_weights
        self.ood_rule = cfg.ood_rule
        self.device = device or cfg.index_device
        self.whitener = Whitener(dim, cfg.groups, cfg.whiten_shrinkage) if cfg.whiten else None
        self._gaussians: list[TaskGaussian | None] = []  # per task, with ood_rule "gaussian"
        self._bare_gaussians: list[TaskGaussian | None] = []  # per task, of its bare inputs (ood_bare_percentile)
        self._backgrounds: list[BackgroundTest | None] = []  # per task, when added with background_emb
        self.index = self._new_index()
        self.tasks: list[dict] = []  # name, first_slot, n_slots, first_row, n_rows, threshold
        self._pos: dict[str, int] = {}  # task name -> position in self.tasks
        self._keys: list[torch.Tensor] = []  # per task, [R_t, G, D/G]
        self._plain_keys: list[np.ndarray] = []  # per task, group_normalise(keys) [R_t, D], for the OOD score
        self._row_slot_list: list[int] = []  # index row -> global slot id
        self._slot_task_list: list[int] = []  # global slot id -> task position
        self._invalidate_table()

    def _new_index(self) -> SlotIndex:
        return SlotIndex(self.dim, self.groups, self.cfg.index, self.cfg.hnsw_threshold, device=self.device)

    # ---- building ----------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    @property
    def n_slots(self) -> int:
        return len(self._slot_task_list)

    def task_slots(self, task: str) -> range:
        t = self.tasks[self._task_pos(task)]
        return range(t["first_slot"], t["first_slot"] + t["n_slots"])

    def gaussian(self, task: str) -> TaskGaussian | None:
        """The task's OOD Gaussian (ood_rule "gaussian"), else None."""
        return self._gaussians[self._task_pos(task)]

    def bare_gaussian(self, task: str) -> TaskGaussian | None:
        """The task's Gaussian of its records' bare inputs (``dtkr.ood_bare_percentile`` < 100), else None."""
        return self._bare_gaussians[self._task_pos(task)]

    def background(self, task: str) -> BackgroundTest | None:
        """The task's background test (added with ``background_emb``), else None."""
        return self._backgrounds[self._task_pos(task)]

    def task_keys(self, task: str) -> torch.Tensor:
        return self._keys[self._task_pos(task)]

    def all_keys(self) -> torch.Tensor | None:
        """Every task's keys concatenated, [rows, G, D/G] (the frozen keys of old tasks)."""
        return torch.cat(self._keys) if self._keys else None

    def add_task(
        self, task: str, keys: torch.Tensor, train_scores: np.ndarray | None = None,
        train_emb: np.ndarray | None = None, train_records: np.ndarray | None = None,
        background_emb: np.ndarray | None = None, bare_emb: np.ndarray | None = None,
        train_wordings: np.ndarray | None = None,
    ) -> range:
        """Add a task's keys [P*keys_per_slot, G, D/G]; return its global slot ids.

        ``train_scores``: the plain best score of each of the task's training queries
        against its own keys (``keys.score_matrix(emb, keys).max(1)``); they set the
        task's OOD threshold (the ``ood_percentile`` percentile). Without them the task
        never flags OOD. ``train_emb`` [N, D], the task's training query embeddings,
        gives both: the scores are computed from it when not passed, and with
        ``whiten=True`` it is required, to fold the task's statistics into the
        whitening (the embeddings themselves are not kept). ``train_records`` [N] names the
        training record each row words (``dtkr.renderings`` > 1: rows of one record share a
        calibration fold of the Gaussian OOD test); default: one record per row.
        ``background_emb`` [M, D], generic requests embedded by the same encoder
        (``ood.background_embeddings``), adds the task's background test (needs ``train_emb``).
        ``bare_emb`` [n_records, D], each training record's content alone: the background test
        is fitted on them too (each in its record's fold), so a bare input is judged against the
        task's bare inputs, not only the few training sent bare; with ``ood_rule="gaussian"`` and
        ``dtkr.ood_bare_percentile`` < 100 they get a Gaussian of their own, and a query either
        Gaussian admits is in distribution. ``train_wordings`` [N] names
        each row's wording (``slm_llm.data.router_wordings``): the Gaussian's threshold then also
        admits ``dtkr.ood_wording_coverage`` of the rows measured without their wording (but no more
        than ``dtkr.ood_wording_cap`` % of ``background_emb``).
        """
        if task in self._pos:
            raise RouterError(f"task {task!r} is already in the router")
        keys = torch.as_tensor(keys).detach().cpu().float()
        sub = self.dim // self.groups
        if keys.dim() != 3 or keys.shape[1:] != (self.groups, sub):
            raise RouterError(f"keys for {task!r} must be [R, {self.groups}, {sub}], got {tuple(keys.shape)}")
        rows = keys.shape[0]
        if rows % self.keys_per_slot:
            raise RouterError(f"{task!r} has {rows} keys, not a multiple of keys_per_slot={self.keys_per_slot}")
        if (self.whitener is not None or self.ood_rule == "gaussian" or background_emb is not None) \
                and train_emb is None:
            raise RouterError(f"whiten=True, ood_rule='gaussian' or a background test: add_task({task!r}) needs "
                              "train_emb, the task's training embeddings")
        if train_emb is not None:
            train_emb = np.asarray(train_emb, dtype=np.float32)
            if train_emb.ndim != 2 or train_emb.shape[1] != self.dim:
                raise RouterError(f"train_emb must be [N, {self.dim}], got {tuple(train_emb.shape)}")
            if train_scores is None:
                train_scores = score_matrix(train_emb, keys).max(1)
        if background_emb is not None:
            background_emb = np.asarray(background_emb, dtype=np.float32)
            if background_emb.ndim != 2 or background_emb.shape[1] != self.dim:
                raise RouterError(f"background_emb must be [M, {self.dim}], got {tuple(background_emb.shape)}")
        if bare_emb is not None:
            if train_emb is None:
                raise RouterError(f"add_task({task!r}): bare_emb needs train_emb, the task's training embeddings")
            n_records = len(train_emb) if train_records is None else len(np.unique(train_records))
            bare_emb = np.asarray(bare_emb, dtype=np.float32)
            if bare_emb.shape != (n_records, self.dim):
                raise RouterError(f"bare_emb must be [{n_records}, {self.dim}] (one row per training record), "
                                  f"got {tuple(bare_emb.shape)}")
        n_slots = rows // self.keys_per_slot
        entry = {"name": task, "first_slot": self.n_slots, "n_slots": n_slots, "first_row": self.index.ntotal,
                 "n_rows": rows, "threshold": None}
        if train_scores is not None and len(train_scores):
            scores = np.asarray(train_scores, dtype=np.float64)
            entry["threshold"] = float(np.percentile(scores, self.cfg.ood_percentile))
        gaussian = None
        if self.ood_rule == "gaussian":
            c = self.cfg
            n_records = len(train_emb) if train_records is None else len(np.unique(train_records))
            if n_records < MIN_QUERIES:
                raise RouterError(f"dtkr.ood_rule=gaussian needs at least {MIN_QUERIES} training queries per task to "
                                  f"calibrate its threshold out of fold; {task!r} has {n_records}. Train on more "
                                  "samples (data.max_train_samples) or set dtkr.ood_rule=keys")
            if train_wordings is not None and len(train_wordings) != len(train_emb):
                raise RouterError(f"train_wordings must have one entry per row of train_emb ({len(train_emb)}), "
                                  f"got {len(train_wordings)}")
            gaussian = calibrate(train_emb, self.groups, c.ood_shrinkage, c.ood_rank, c.ood_percentile,
                                 records=train_records, wordings=train_wordings,
                                 wording_coverage=c.ood_wording_coverage, background=background_emb,
                                 wording_cap=c.ood_wording_cap)
            entry["threshold"] = gaussian.threshold
        bare_gaussian = None
        if gaussian is not None and bare_emb is not None and self.cfg.ood_bare_percentile < 100:
            c = self.cfg
            bare_gaussian = calibrate(bare_emb, self.groups, c.ood_shrinkage, c.ood_rank, c.ood_bare_percentile)
        entry["bare_gaussian"] = bare_gaussian is not None
        background = None
        if background_emb is not None:
            fit, records = train_emb, np.arange(len(train_emb)) if train_records is None else np.asarray(train_records)
            if bare_emb is not None:
                fit, records = np.concatenate([fit, bare_emb]), np.r_[records, np.arange(len(bare_emb))]
            background = fit_background_test(fit, background_emb, self.groups, records=records)
        entry["background"] = background is not None
        self._gaussians.append(gaussian)
        self._bare_gaussians.append(bare_gaussian)
        self._backgrounds.append(background)
        self._pos[task] = len(self.tasks)
        self.tasks.append(entry)
        self._keys.append(keys)
        self._plain_keys.append(group_normalise(keys.reshape(rows, -1).numpy(), self.groups))
        if self.whitener is None:
            self.index.add(keys.reshape(rows, -1).numpy())
        else:  # the map changed: re-map every key and rebuild the index (rows keep their ids)
            self.whitener.add_task(train_emb)
            self._reindex()
        self._row_slot_list.extend(entry["first_slot"] + j // self.keys_per_slot for j in range(rows))
        self._slot_task_list.extend([len(self.tasks) - 1] * n_slots)
        self._invalidate_table()
        return self.task_slots(task)

    def _reindex(self) -> None:
        """A new index over every task's keys, (whitened when ``whiten``) in row order."""
        keys = self.all_keys().reshape(-1, self.dim).numpy()
        self.index = self._new_index()
        self.index.add(keys if self.whitener is None else self.whitener.transform_keys(keys))

    def _invalidate_table(self) -> None:
        self._arrays = None  # rebuilt from the lists and the task table on the next route

    @property
    def _row_slot(self) -> np.ndarray:
        return self._table()[0]

    @property
    def _slot_task(self) -> np.ndarray:
        return self._table()[1]

    @property
    def _threshold(self) -> np.ndarray:
        return self._table()[2]

    def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row -> slot, slot -> task position, task position -> OOD threshold) as arrays."""
        if self._arrays is None:
            self._arrays = (np.asarray(self._row_slot_list, dtype=np.int64),
                            np.asarray(self._slot_task_list, dtype=np.int64),
                            np.array([-np.inf if t["threshold"] is None else t["threshold"] for t in self.tasks]))
        return self._arrays

    def _task_pos(self, task: str) -> int:
        if task not in self._pos:
            raise RouterError(f"unknown task {task!r}; the router has {self.task_names}")
        return self._pos[task]

    # ---- routing -----------------------------------------------------------------
    def route(self, embeddings, k: int | None = None, restrict_task: str | None = None) -> list[RouteDecision]:
        """Route each row of ``embeddings`` [B, D] on its own; return B decisions.

        restrict_task: training (and the oracle): the task is given, steps 2-3 only.
        """
        if not self.tasks:
            raise RouterError("the router is empty: add a task (or build the run's router) before routing")
        emb = embeddings.detach().cpu().numpy() if torch.is_tensor(embeddings) else np.asarray(embeddings)
        emb = np.atleast_2d(emb).astype(np.float32, copy=False)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise RouterError(f"embeddings must be [B, {self.dim}], got shape {tuple(emb.shape)}")
        k = self.top_k if k is None else int(k)
        if k <= 0:
            raise RouterError(f"k must be > 0, got {k}")
        if restrict_task is not None:
            return self._route_within(emb, np.full(len(emb), self._task_pos(restrict_task)), k)
        return self._route_within(emb, self.pick_tasks(emb), k)

    def pick_tasks(self, emb: np.ndarray) -> np.ndarray:
        """Step 1: the task position of each row's best key ([B] ints)."""
        queries = self.whitener.transform_queries(emb) if self.whitener is not None else emb
        _, ids = self.index.search(queries, 1)
        return self._slot_task[self._row_slot[ids[:, 0]]]

    def _route_within(self, emb: np.ndarray, task_pos: np.ndarray, k: int) -> list[RouteDecision]:
        """Row b among the slots of task ``task_pos[b]`` only, by exact plain mean group cosines
        (over the last ``dtkr.slot_groups`` groups when set; the OOD score over all groups)."""
        plain_q = group_normalise(emb, self.groups)
        cols = slice(slot_span_start(self.dim, self.groups, self.cfg.slot_groups), None)
        out = []
        for b, (q, pos) in enumerate(zip(plain_q, task_pos)):
            keys = self._plain_keys[pos]
            scores = keys[:, cols] @ q[cols]  # [R_t]
            order = np.argsort(-scores, kind="stable")
            d = self._decide(scores[order], self.tasks[pos]["first_row"] + order, k)
            if self.cfg.slot_groups:  # the OOD score, as its threshold was set: every group
                d.score = float((keys @ q).max())
                d.ood = d.score < self._threshold[pos]
            gaussian, bare = self._gaussians[pos], self._bare_gaussians[pos]
            if gaussian is not None:
                d.ood = bool(gaussian.flags(emb[b : b + 1], self.groups)[0])
            if d.ood and bare is not None:  # the task's bare inputs' Gaussian may still admit it
                d.ood = bool(bare.flags(emb[b : b + 1], self.groups)[0])
            background = self._backgrounds[pos]
            if background is not None and not d.ood:
                d.ood = bool(background.flags(emb[b : b + 1], self.groups)[0])
            out.append(d)
        return out

    def _decide(self, row_scores: np.ndarray, row_ids: np.ndarray, k: int) -> RouteDecision:
        keep = row_ids >= 0  # HNSW pads with -1 when it finds fewer rows than asked
        row_scores, row_ids = row_scores[keep], row_ids[keep]
        slots = self._row_slot[row_ids]
        # Rows arrive best first, so a slot's first occurrence carries its best key's score.
        slots, first = np.unique(slots, return_index=True)
        raw = row_scores[first]
        top = np.argsort(-raw, kind="stable")[:k]
        slots, raw = slots[top], raw[top]
        if self.slot_weights == "uniform":
            weights = np.full(len(raw), 1.0 / len(raw))
        else:
            clamped = np.maximum(raw, WEIGHT_EPS)
            weights = clamped / clamped.sum()
        best = int(self._slot_task[slots[0]])
        return RouteDecision(
            slots=[int(s) for s in slots], weights=[float(w) for w in weights], task=self.tasks[best]["name"],
            score=float(raw[0]), ood=bool(raw[0] < self._threshold[best]), scores=[float(s) for s in raw],
        )

    def route_texts(self, texts: list[str], encoder, **kwargs) -> list[RouteDecision]:
        """Encode ``texts`` with ``encoder`` (which must be the router's encoder) and route them."""
        self.check_encoder(encoder.id)
        return self.route(encoder.encode(list(texts)), **kwargs)

    def check_encoder(self, encoder_id: str) -> None:
        check_encoder_id(self.encoder_id, encoder_id)

    # ---- persistence -------------------------------------------------------------
    def save(self, router_dir: str | Path) -> None:
        """Write index/, keys.safetensors and slots.json (last, so a complete slots.json means a complete router)."""
        router_dir = Path(router_dir)
        router_dir.mkdir(parents=True, exist_ok=True)
        self.index.save(router_dir / "index")
        all_keys = self.all_keys()
        if all_keys is not None:
            save_keys(router_dir / "keys.safetensors", all_keys, {"encoder_id": self.encoder_id})
        if self.whitener is not None:
            _save_arrays(router_dir / "whitening.safetensors", self.whitener.state())
        if self.ood_rule == "gaussian" and self.tasks:
            _save_arrays(router_dir / "ood.safetensors",
                         {k: v for pos, g in enumerate(self._gaussians) for k, v in g.state(f"task{pos}").items()})
        if any(g is not None for g in self._bare_gaussians):
            _save_arrays(router_dir / "ood_bare.safetensors",
                         {k: v for pos, g in enumerate(self._bare_gaussians) if g is not None
                          for k, v in g.state(f"task{pos}").items()})
        if any(b is not None for b in self._backgrounds):
            _save_arrays(router_dir / "background.safetensors",
                         {f"task{pos}": b.state() for pos, b in enumerate(self._backgrounds) if b is not None})
        sizes = {t["n_slots"] for t in self.tasks}
        slots = []
        for pos, t in enumerate(self.tasks):
            for j in range(t["n_slots"]):
                first = t["first_row"] + j * self.keys_per_slot
                slots.append({"slot": t["first_slot"] + j, "task": t["name"], "pos": j,
                              "key_rows": list(range(first, first + self.keys_per_slot))})
        write_json(router_dir / "slots.json", {
            "format": FORMAT, "encoder_id": self.encoder_id, "dim": self.dim,
            "slots_per_task": sizes.pop() if len(sizes) == 1 else None,
            "dtkr": asdict(self.cfg), "jare": {"top_k": self.top_k, "slot_weights": self.slot_weights},
            "tasks": self.tasks, "slots": slots,
        })

    @classmethod
    def load(cls, router_dir: str | Path, encoder_id: str | None = None, device: str | None = None,
             n_tasks: int | None = None) -> Router:
        """Load a saved router; with ``encoder_id``, refuse one built with another encoder. With
        ``n_tasks``, the router as it stood after its first ``n_tasks`` tasks (see Stages above)."""
        router_dir = Path(router_dir)
        meta = read_slots(router_dir)
        if meta.get("format") != FORMAT:
            raise RouterError(f"{router_dir / 'slots.json'}: router format {meta.get('format')} is not {FORMAT} "
                              "(made by an older slm_llm); `slm-llm refit-router --run <run>` rebuilds it")
        jare = JareConfig(top_k=meta["jare"]["top_k"], slot_weights=meta["jare"]["slot_weights"],
                          slots_per_task=max(meta["jare"]["top_k"], meta["slots_per_task"] or 1))
        self = cls(meta["dim"], DtkrConfig(**meta["dtkr"]), jare, encoder_id=meta["encoder_id"], device=device)
        if encoder_id is not None:
            self.check_encoder(encoder_id)
        if not meta["tasks"]:
            return self
        self.index = SlotIndex.load(router_dir / "index", device=device)
        keys, _ = load_keys(router_dir / "keys.safetensors")
        self.tasks = meta["tasks"]
        self._keys = [keys[t["first_row"] : t["first_row"] + t["n_rows"]] for t in self.tasks]
        self._plain_keys = [group_normalise(k.reshape(len(k), -1).numpy(), self.groups) for k in self._keys]
        if self.ood_rule == "gaussian":
            ood = {k: v.numpy() for k, v in load_file(str(router_dir / "ood.safetensors")).items()}
            self._gaussians = [TaskGaussian.from_state(ood, f"task{pos}") for pos in range(len(self.tasks))]
        else:
            self._gaussians = [None] * len(self.tasks)
        self._bare_gaussians = [None] * len(self.tasks)
        if any(t.get("bare_gaussian") for t in self.tasks):
            bare = {k: v.numpy() for k, v in load_file(str(router_dir / "ood_bare.safetensors")).items()}
            self._bare_gaussians = [TaskGaussian.from_state(bare, f"task{pos}") if t.get("bare_gaussian") else None
                                    for pos, t in enumerate(self.tasks)]
        self._backgrounds = [None] * len(self.tasks)
        if any(t.get("background") for t in self.tasks):
            state = load_file(str(router_dir / "background.safetensors"))
            self._backgrounds = [BackgroundTest.from_state(state[f"task{pos}"].numpy()) if t.get("background")
                                 else None for pos, t in enumerate(self.tasks)]
        if self.whitener is not None:
            state = load_file(str(router_dir / "whitening.safetensors"))
            self.whitener = Whitener.from_state(self.dim, self.groups, self.cfg.whiten_shrinkage,
                                                {k: v.numpy() for k, v in state.items()}, n_tasks)
        self._row_slot_list = [0] * self.index.ntotal
        self._slot_task_list = [0] * len(meta["slots"])
        self._pos = pos = {t["name"]: i for i, t in enumerate(self.tasks)}
        for s in meta["slots"]:
            for r in s["key_rows"]:
                self._row_slot_list[r] = s["slot"]
            self._slot_task_list[s["slot"]] = pos[s["task"]]
        self._invalidate_table()
        if n_tasks is not None and n_tasks != len(self.tasks):
            self._keep_first(n_tasks, router_dir)
        return self

    def _keep_first(self, n: int, router_dir: Path) -> None:
        """Drop every task after the first ``n`` (the whitening was loaded as of stage ``n``)."""
        if not 1 <= n <= len(self.tasks):
            raise RouterError(f"{router_dir}: no stage with {n} tasks; the router has {len(self.tasks)}")
        rows = self.tasks[n - 1]["first_row"] + self.tasks[n - 1]["n_rows"]
        slots = self.tasks[n - 1]["first_slot"] + self.tasks[n - 1]["n_slots"]
        for name in self.task_names[n:]:
            del self._pos[name]
        del self.tasks[n:], self._keys[n:], self._plain_keys[n:], self._gaussians[n:], self._backgrounds[n:]
        del self._bare_gaussians[n:]
        del self._row_slot_list[rows:], self._slot_task_list[slots:]
        self._reindex()
        self._invalidate_table()


def check_encoder_id(built_with: str, used_with: str) -> None:
    """Refuse an encoder other than the one a router was built with (none recorded: any)."""
    if built_with and used_with != built_with:
        raise RouterError(
            f"encoder mismatch: the router was built with encoder {built_with!r} "
            f"but is being used with {used_with!r}; keys from one encoder are meaningless to another"
        )


def read_slots(router_dir: Path) -> dict:
    """A saved router's ``slots.json`` (tasks, slots, settings), of any format."""
    try:
        return json.loads((router_dir / "slots.json").read_text())
    except FileNotFoundError:
        raise RouterError(f"no router at {router_dir} (slots.json is missing)") from None
    except json.JSONDecodeError as e:
        raise RouterError(f"{router_dir / 'slots.json'}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, str(tmp))


def open_router(run: RunDir, cfg, encoder, create: bool = False, n_tasks: int | None = None) -> Router:
    """The router of a run folder (``cfg`` its Config, ``encoder`` the run's encoder): loaded from
    ``<run>/router`` (with ``n_tasks``: as it stood after that many tasks) and refused if built with
    another encoder, or, with ``create`` and none saved yet, a new empty one. The run's manifest
    must be readable (a RunError names it otherwise)."""
    run.manifest()
    if (run.router_dir / "slots.json").exists():
        return Router.load(run.router_dir, encoder_id=encoder.id, device=cfg.dtkr.index_device, n_tasks=n_tasks)
    if create:
        return Router(encoder.dim, cfg.dtkr, cfg.jare, encoder_id=encoder.id)
    raise RouterError(f"{run.root} has no router yet ({run.router_dir / 'slots.json'} is missing): "
                      "no slm task has finished training")


def routing_tensors(decisions: list[RouteDecision | None], k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decisions -> (slot_ids LongTensor [B, K], weights FloatTensor [B, K]) for JareModel.

    A decision with fewer than K slots is padded with its best slot at weight 0; a None
    decision (answered by the base model) gets weight 0 everywhere, i.e. no increment.
    """
    if not decisions:
        raise RouterError("no decisions to convert")
    k = k or max([len(d.slots) for d in decisions if d is not None] or [1])
    ids = torch.zeros(len(decisions), k, dtype=torch.long)
    weights = torch.zeros(len(decisions), k, dtype=torch.float32)
    for b, d in enumerate(decisions):
        if d is None:
            continue
        n = min(k, len(d.slots))
        ids[b, :n] = torch.tensor(d.slots[:n])
        ids[b, n:] = d.slots[0]
        weights[b, :n] = torch.tensor(d.weights[:n])
    return ids, weights


def format_decision(decision: RouteDecision, text: str | None = None) -> str:
    """One human-readable line per decision, for ``slm-llm route``."""
    slots = ", ".join(f"{s}:{w:.3f}" for s, w in zip(decision.slots, decision.weights))
    flag = "  OOD (base model fallback)" if decision.ood else ""
    head = "" if text is None else f"{text if len(text) <= 60 else text[:59] + '…'!r} -> "
    return f"{head}task={decision.task} score={decision.score:.4f} slots[w]=[{slots}]{flag}"
