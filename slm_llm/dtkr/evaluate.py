"""Routing quality of DTKR on a task suite, in the continual protocol, on what users type.

Tasks arrive in suite order. Task t's keys, OOD threshold and whitening statistics see
only task t's training queries, worded as training words them (``data.phrasing``: train
phrasings of the task's pool, or its input alone for ``data.input_only_share`` of them).
After the last task, every evaluation query is routed alone (batch size 1) in each query
view (``paraphrase``: held-out phrasings; ``input-only``; ``fixed``) and compared with its
true task. Off-domain texts (IFEval prompts, another suite's queries) measure how much
the OOD flag rejects what no task covers.

    served      routed to its own task and not flagged OOD: it gets its task's increments
    top-1       routed to its own task, flagged or not
    ood_rate    share of in-domain queries flagged OOD (answered by the base model)

``data.eval_split=dev`` chooses settings without touching test: evaluation records come
from each task's dev pool (held out of the train split, never trained on), and the
paraphrase view uses *dev* phrasings, split off the train phrasings
(``slm_llm.data.views.dev_split``); the held-out phrasings stay unseen. The training
queries are ``data.max_train_samples`` per task, as in a training run. Several seeds (data
sample, phrasing draws, key init) give mean and sd.

    slm-llm router-eval --suite cl9 --views paraphrase,input-only --seeds 0,1,2 --off-domain ifeval,instruct6
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slm_llm.config import Config
from slm_llm.data import (REQUEST_FILES, DataError, Record, Suite, bare_records, load_suite, load_task_split,
                          query_text, read_requests, records_in_view, rendered_record, resolve_data_root, router_records,
                          router_wordings, run_records, train_and_calibration, view_records)
from slm_llm.dtkr.encoder import Encoder
from slm_llm.dtkr.keys import init_keys, score_matrix, train_keys
from slm_llm.dtkr.ood import background_embeddings, needs_bare
from slm_llm.dtkr.router import Router
from slm_llm.utils.io import atomic_path, write_json, write_text

OOD = "<ood>"


@dataclass
class TaskQueries:
    """What the router is fitted on for one task, from one read of its training records: the
    training sample's queries (``n_sample`` of them: ``renderings`` wordings of each record), then
    one query per calibration record (``dtkr.calibration_records``)."""
    records: list[Record]  # slm_llm.data.router_records of the sample (its own wordings first), then calibration
    wordings: list[int]  # slm_llm.data.router_wordings: the wording of each of ``records``
    bare: list[str]  # each record's content alone (sample, then calibration): the background test, the bare Gaussian
    n_sample: int  # the first n_sample queries word the training sample: the keys are fitted on them
    renderings: int = 1

    @property
    def texts(self) -> list[str]:
        return [query_text(r) for r in self.records]

    @property
    def sample(self) -> list[Record]:
        """The training sample's queries (the first ``n_sample``)."""
        return self.records[: self.n_sample]

    @property
    def n_calibration(self) -> int:
        """Calibration records (one query each, after the sample's ``n_sample``)."""
        return len(self.records) - self.n_sample

    @property
    def record_of(self) -> np.ndarray:
        """The record (position in ``bare``) each query words: calibration folds keep a record's
        wordings together."""
        n = self.n_sample // self.renderings
        return np.asarray(rendered_record(self.n_sample, self.renderings) + list(range(n, len(self.bare))))


def task_queries(cfg: Config, suite: Suite, task: str, renderings: int = 1, calibration: bool = True) -> TaskQueries:
    """One task's router queries as a run with ``cfg`` trains them: its training records
    (``slm_llm.data.run_records``) worded as users word them (``data.phrasing``), then
    ``renderings - 1`` further wordings of each, then (``calibration``) one wording of each of its
    ``dtkr.calibration_records``; held-out phrasings never reach this point."""
    data, spec = cfg.data, suite.tasks[task]
    records, extra = train_and_calibration(suite, task, data, cfg.dtkr.calibration_records if calibration else 0)
    sample = router_records(records, spec, data, renderings)
    return TaskQueries(sample + router_records(extra, spec, data),
                       router_wordings(records, spec, data, renderings)
                       + router_wordings(records + extra, spec, data)[len(records):],
                       [query_text(r) for r in bare_records(records + extra, spec)], len(sample), renderings)


def suite_queries(cfg: Config, suite: Suite, task: str, views: list[str], max_test: int
                  ) -> tuple[TaskQueries, dict[str, list[str]]]:
    """(the router's training queries, {view: evaluation query texts}) of one task, as a run
    with ``cfg`` trains and evaluates (``data.eval_split`` "dev" evaluates on the dev pool and
    dev phrasings)."""
    spec = suite.tasks[task]
    sample = run_records(suite, task, "eval", cfg.data, max_test)
    evals = {v: [query_text(r) for r in records_in_view(sample, spec, v, cfg.data)] for v in views}
    return task_queries(cfg, suite, task, cfg.dtkr.renderings), evals


def off_domain_queries(name: str, cfg: Config, max_test: int) -> list[str]:
    """Texts no task of the evaluated suite covers: ``ifeval`` (the official IFEval prompts),
    another suite's queries (its records in its own phrasings, half of them input-only), or a
    file of your own requests (:func:`read_requests`)."""
    if Path(name).suffix in REQUEST_FILES:
        return read_requests(name)
    root = resolve_data_root(cfg.data.data_root or None)
    if name == "ifeval":
        path = root / "ifeval" / "input_data.jsonl"
        try:
            return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise DataError(f"{path}: cannot read the IFEval prompts ({e.strerror})") from None
    suite = load_suite(name)
    split = "test" if cfg.data.eval_split == "test" else "train"
    out = []
    for task, spec in suite.tasks.items():
        records = load_task_split(suite, task, split, str(root), max_samples=max_test, seed=cfg.data.seed)
        half = len(records) // 2
        pool = spec.phrasings or ()
        out += [query_text(r) for r in view_records(records[:half], "paraphrase" if pool else "fixed", pool,
                                                     spec.content, cfg.data.seed)]
        out += [query_text(r) for r in view_records(records[half:], "input-only", (), spec.content, cfg.data.seed)]
    return out


def build_router_continual(train_emb: dict[str, np.ndarray], cfg: Config,
                           background_emb: np.ndarray | None = None,
                           bare_emb: dict[str, np.ndarray] | None = None,
                           queries: dict[str, TaskQueries] | None = None) -> Router:
    """Add tasks in the order of ``train_emb``: init keys, train them (centrifugal against
    the router's frozen keys), calibrate on the task's own router queries, add. Task t's
    embeddings are used only while task t is added. ``background_emb``: the
    ``dtkr.ood_background`` requests' embeddings (each task's background test), or None;
    ``bare_emb``: per task, its records' content alone (:attr:`TaskQueries.bare`);
    ``queries``: per task, what ``train_emb`` embeds (:class:`TaskQueries`: which rows word the
    training sample, their records and wordings); without it every row is a training query
    (``dtkr.renderings`` wordings of each record, in :func:`slm_llm.data.router_records`' order)."""
    d = cfg.dtkr
    dim = next(iter(train_emb.values())).shape[1]
    router = Router(dim, d, cfg.jare)
    n_keys = cfg.jare.slots_per_task * d.keys_per_slot
    for t, (task, emb) in enumerate(train_emb.items()):
        q = None if queries is None else queries[task]
        sample = emb if q is None else emb[: q.n_sample]
        keys = init_keys(sample, n_keys, d.groups, d.key_init, d.seed + t)
        keys = train_keys(sample, keys, d, frozen_keys=router.all_keys())
        router.add_task(task, keys, train_emb=emb,
                        train_records=rendered_record(len(emb), d.renderings) if q is None else q.record_of,
                        background_emb=background_emb, bare_emb=None if bare_emb is None else bare_emb[task],
                        train_wordings=None if q is None else np.asarray(q.wordings))
    return router


def router_eval(
    cfg: Config,
    *,
    suite: str | Suite | None = None,
    views: list[str] | None = None,
    max_test: int = 300,
    off_domain: list[str] = (),
    ood_percentiles: list[float] = (),
    encoder: Encoder | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Continual routing quality at batch size 1 for one seed (``cfg.data.seed``/``cfg.dtkr.seed``).

    Returns (and, with ``out_dir``, writes router_eval.json and a confusion.txt/.png per
    view) ``{"views": {view: {served, top1, ood_rate, per_task, confusion, confused_pairs}},
    "off_domain": {name: flagged share}, "ood_sweep": {percentile: {...}}, ...}``.
    ``ood_percentiles`` re-scores the same decisions under other ``dtkr.ood_percentile``
    values (the task and slots do not depend on it).
    """
    from slm_llm.dtkr.encoder import build_encoder

    suite = suite if isinstance(suite, Suite) else load_suite(suite or cfg.data.suite)
    views = list(views or cfg.eval.views)
    names = suite.order_tasks(cfg.data.order, cfg.data.tasks or None)
    encoder = encoder or build_encoder(cfg)

    train_emb, eval_emb, train_q = {}, {}, {}
    for task in names:
        train_q[task], evals = suite_queries(cfg, suite, task, views, max_test)
        train_emb[task] = encoder.encode(train_q[task].texts, progress=progress)
        eval_emb[task] = {v: encoder.encode(q, progress=progress) for v, q in evals.items()}
    off_emb = {n: encoder.encode(off_domain_queries(n, cfg, max_test), progress=progress)
               for n in off_domain}

    background = background_embeddings(cfg.dtkr.ood_background, encoder)
    bare = {t: encoder.encode(train_q[t].bare, progress=progress) for t in names} \
        if needs_bare(cfg.dtkr, background) else None
    t0 = time.perf_counter()
    router = build_router_continual(train_emb, cfg, background, bare, train_q)
    build_s = time.perf_counter() - t0
    train_best = {t: score_matrix(e, router.task_keys(t)).max(1) for t, e in train_emb.items()}

    index = {t: i for i, t in enumerate(names)}
    report: dict[str, Any] = {"suite": suite.name, "eval_split": cfg.data.eval_split, "tasks": names, "views": {},
                              "off_domain": {}, "ood_sweep": {}, "build_s": build_s}
    decided: dict[str, list[tuple[str, float, str]]] = {}  # view -> (true task, OOD statistic, routed task)
    latencies = []
    for view in views:
        confusion = np.zeros((len(names), len(names) + 1), dtype=np.int64)  # last column: OOD
        rows = []
        for task in names:
            for row in eval_emb[task][view]:
                t1 = time.perf_counter()
                d = router.route(row[None, :])[0]  # batch size 1: each query on its own
                latencies.append(time.perf_counter() - t1)
                rows.append((task, _ood_statistic(router, row[None, :], d), d.task))
                confusion[index[task], len(names) if d.ood else index[d.task]] += 1
        decided[view] = rows
        report["views"][view] = view_summary(confusion, names, rows)
    off_decided = {}
    for name, emb in off_emb.items():
        ds = router.route(emb)
        report["off_domain"][name] = float(np.mean([d.ood for d in ds])) if ds else None
        off_decided[name] = [(_ood_statistic(router, emb[i : i + 1], d), d.task) for i, d in enumerate(ds)]
    for p in ood_percentiles:  # the same decisions, other thresholds: larger statistic = farther out
        if router.ood_rule == "gaussian":
            thr = {t: max(float(np.percentile(g.oof, 100 - p)), g.wording_floor)
                   for t, g in ((t, router.gaussian(t)) for t in names)}
        else:
            thr = {t: -float(np.percentile(s, p)) for t, s in train_best.items()}
        sweep = {view: float(np.mean([routed == true and stat <= thr[routed] for true, stat, routed in rows]))
                 for view, rows in decided.items()}
        for name, rows in off_decided.items():
            sweep[f"off:{name}"] = float(np.mean([stat > thr[routed] for stat, routed in rows])) if rows else None
        report["ood_sweep"][str(p)] = sweep
    report["latency_ms"] = {"p50": float(np.percentile(latencies, 50) * 1e3),
                            "p99": float(np.percentile(latencies, 99) * 1e3)}
    report["n_train"] = {t: q.n_sample for t, q in train_q.items()}
    report["n_calibration"] = {t: q.n_calibration for t, q in train_q.items()}
    report["n_eval"] = {t: {v: len(e) for v, e in ev.items()} for t, ev in eval_emb.items()}
    report["n_off_domain"] = {n: len(e) for n, e in off_emb.items()}
    report["settings"] = {"encoder": encoder.id, "max_test": max_test,
                          "slots_per_task": cfg.jare.slots_per_task, "top_k": cfg.jare.top_k,
                          "data": vars(cfg.data).copy(), "dtkr": vars(cfg.dtkr).copy()}
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "router_eval.json", report)
        for view, r in report["views"].items():
            conf = np.array(r["confusion"])
            write_text(out_dir / f"confusion-{view}.txt", format_confusion(conf, names))
            plot_confusion(conf, names, out_dir / f"confusion-{view}.png",
                           f"{suite.name} {view}: served by own task {r['served']:.1%}")
    return report


def _ood_statistic(router: Router, emb: np.ndarray, d) -> float:
    """How far out the query is for its routed task, larger = farther (the rule's own measure);
    +inf when the task's background test flags it (a sweep of the rule's threshold cannot serve it),
    -inf when its bare-input Gaussian admits it (the sweep moves the first Gaussian's threshold only)."""
    background = router.background(d.task)
    if background is not None and background.flags(emb, router.groups)[0]:
        return float("inf")
    bare = router.bare_gaussian(d.task)
    if bare is not None and not bare.flags(emb, router.groups)[0]:
        return float("-inf")
    if router.ood_rule == "gaussian":
        return float(router.gaussian(d.task).distance(emb, router.groups)[0])
    return -d.score


def view_summary(confusion: np.ndarray, names: list[str], rows: list[tuple[str, float, str]]) -> dict[str, Any]:
    total = max(1, int(confusion.sum()))
    served = {t: float(confusion[i, i] / max(1, confusion[i].sum())) for i, t in enumerate(names)}
    return {"served": float(np.trace(confusion[:, : len(names)]) / total),
            "top1": float(np.mean([routed == true for true, _, routed in rows])) if rows else float("nan"),
            "ood_rate": float(confusion[:, -1].sum() / total),
            "per_task": served, "confusion": confusion.tolist(), "confused_pairs": confused_pairs(confusion, names)}


def router_eval_seeds(cfg: Config, seeds: list[int], **kwargs) -> dict[str, Any]:
    """:func:`router_eval` once per seed (data sample, phrasing draws and key init all move);
    ``summary`` holds mean and sd of every rate over the seeds."""
    out_dir = kwargs.pop("out_dir", None)
    encoder = kwargs.pop("encoder", None)
    runs = {}
    for s in seeds:
        c = copy.deepcopy(cfg)
        c.data.seed, c.dtkr.seed = s, s
        runs[str(s)] = router_eval(c, encoder=encoder, out_dir=Path(out_dir) / f"seed{s}" if out_dir else None,
                                   **kwargs)
    first = next(iter(runs.values()))
    rates: dict[str, list[float]] = {}
    for r in runs.values():
        for view, v in r["views"].items():
            for key in ("served", "top1", "ood_rate"):
                rates.setdefault(f"{view}.{key}", []).append(v[key])
        for name, flagged in r["off_domain"].items():
            rates.setdefault(f"off_domain.{name}", []).append(flagged)
        for p, sweep in r["ood_sweep"].items():
            for key, value in sweep.items():
                rates.setdefault(f"sweep.{p}.{key}", []).append(value)
    summary = {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
               for k, v in rates.items() if None not in v}
    result = {"suite": first["suite"], "eval_split": first["eval_split"], "seeds": list(seeds), "summary": summary,
              "settings": first["settings"], "runs": runs}
    if out_dir is not None:
        write_json(Path(out_dir) / "router_eval_seeds.json", result)
    return result


def confused_pairs(confusion: np.ndarray, names: list[str], top: int = 5) -> list[dict[str, Any]]:
    """The largest off-diagonal cells: (true task, routed task or OOD, count, share of the true task)."""
    cols = [*names, OOD][: confusion.shape[1]]
    off = [(int(confusion[i, j]), i, j) for i in range(len(names)) for j in range(len(cols))
           if i != j and confusion[i, j]]
    off.sort(reverse=True)
    return [{"true": names[i], "routed": cols[j], "count": c, "share": c / max(1, int(confusion[i].sum()))}
            for c, i, j in off[:top]]


def format_confusion(confusion: np.ndarray, names: list[str]) -> str:
    """Text table: rows are true tasks, columns routed tasks (then OOD), last column served share."""
    cols = [*names, OOD][: confusion.shape[1]]
    width = min(12, max(6, max(len(n) for n in cols)))
    lines = ["true \\ routed".ljust(width) + " " + " ".join(c[:width].rjust(width) for c in cols) + "  served"]
    for i, name in enumerate(names):
        row = " ".join(str(int(c)).rjust(width) for c in confusion[i])
        acc = confusion[i, i] / max(1, confusion[i].sum())
        lines.append(name[:width].ljust(width) + " " + row + f"  {acc:6.1%}")
    return "\n".join(lines) + "\n"


def plot_confusion(confusion: np.ndarray, names: list[str], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [*names, OOD][: confusion.shape[1]]
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 0.8 + 0.6 * len(names)))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("routed task")
    ax.set_ylabel("true task")
    ax.set_title(title, fontsize=9)
    for i in range(len(names)):
        for j in range(len(cols)):
            if confusion[i, j]:
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
