"""A trained run loaded for inference: base model + every task's increments, router, encoder.

Shared by the serving backends and the evaluation harness, so both answer a query
the same way: encode the raw query, route it (per query), and generate with that
query's own slots and weights in a batched, KV-cached ``generate``.

Routing modes (:func:`route_queries`, shared by serving and evaluation):
    "slm"      DTKR: the routed task's top-K slots; OOD rows fall back to the base
    "oracle"   the true task's own top-K slots (needs the true task of each query)
    "base"     no increments (weights 0)
    <task>     force that task's top-K slots

A seq_lora or multitask run holds one shared adapter (a one-slot JARe task); every
mode but "base" uses it. An olora run holds one such LoRA per finished task; every mode but
"base" uses all of them at weight 1 (O-LoRA needs no task id).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from slm_llm.config import SHARED_ADAPTER as SHARED
from slm_llm.config import Config, load_config, shared_adapter_config
from slm_llm.data import Record, query_text, render_prompt
from slm_llm.data.templates import stop_token_ids
from slm_llm.dtkr import RouteDecision, Router, open_router, routing_tensors
from slm_llm.dtkr.encoder import Encoder, build_encoder
from slm_llm.jare import JareModel
from slm_llm.models import load_base_model, model_id
from slm_llm.run import RunDir, RunError


MODES = ("slm", "oracle", "base")  # plus any task name


@dataclass
class Routed:
    """One query's routing in one mode: ``decision`` drives generation (None = the base model);
    ``raw`` is the router's own decision (for reports: the task, score and OOD flag even
    when the base model answers; None for mode "base")."""

    decision: RouteDecision | None
    raw: RouteDecision | None


def route_queries(router: Router, encoder: Encoder, queries: list[str], mode: str, ood_fallback: bool,
                  true_tasks: list[str] | None = None) -> list[Routed]:
    """Route raw query texts in ``mode``; the one routing-mode function of serving and evaluation."""
    if mode == "base":
        return [Routed(None, None) for _ in queries]
    if mode not in ("slm", "oracle") and mode not in router.task_names:
        raise RunError(f"unknown model/adapter {mode!r}; known: slm, base, oracle, {', '.join(router.task_names)}")
    emb = encoder.encode(list(queries))  # [B, D]
    if mode == "slm":
        return [Routed(None if (d.ood and ood_fallback) else d, d) for d in router.route(emb)]
    if mode == "oracle":
        if true_tasks is None or len(true_tasks) != len(queries):
            raise RunError("mode 'oracle' needs the true task of every query")
        out = [None] * len(queries)
        for task in dict.fromkeys(true_tasks):
            rows = [i for i, t in enumerate(true_tasks) if t == task]
            for i, d in zip(rows, router.route(emb[rows], restrict_task=task)):
                out[i] = Routed(d, d)
        return out
    return [Routed(d, d) for d in router.route(emb, restrict_task=mode)]


@dataclass
class Generation:
    text: str
    route: RouteDecision | None  # None: answered by the base model
    new_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the new tokens, up to (not including) the stop token


class RunPipeline:
    def __init__(self, cfg: Config, run: RunDir, model: JareModel, tokenizer, router: Router | None, encoder: Encoder):
        self.cfg, self.run, self.model, self.tokenizer = cfg, run, model, tokenizer
        self.router, self.encoder = router, encoder  # router is None for the shared-adapter baselines
        self.stop_ids = stop_token_ids(tokenizer)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    @classmethod
    def load(cls, run_dir: str | Path, overrides: list[str] | None = None) -> RunPipeline:
        """Load ``run_dir`` as it stands (every finished stage); refuses another base model."""
        run = RunDir(run_dir)
        manifest = run.manifest()
        cfg = load_config(run.root / "run.yaml", overrides)
        run.check_base(model_id(cfg.model))
        done = run.done_tasks()
        if not done:
            raise RunError(f"{run.root}: no finished task to serve (manifest status {manifest['status']!r})")
        needed = done if manifest["method"] in ("slm", "olora") else done[-1:]
        missing = [run.task_dir(t) / "increments.safetensors" for t in needed]
        missing = [p for p in missing if not p.exists()]
        if missing:
            raise RunError(f"{missing[0]}: missing ({len(missing)} of the {len(needed)} finished tasks' increments), "
                           "though manifest.json marks those tasks done; copy the run's tasks/ back whole, or "
                           "retrain them in a new run")
        base, tokenizer = load_base_model(cfg.model)
        encoder = build_encoder(cfg)
        if manifest["method"] == "olora":  # every finished task's LoRA, summed (slm_llm/train/olora.py)
            model = JareModel(base, shared_adapter_config(cfg.jare))
            for task in done:
                model.load_task(task, run.task_dir(task) / "increments.safetensors")
            return cls(cfg, run, model.eval(), tokenizer, None, encoder)
        if manifest["method"] != "slm":
            model = JareModel(base, shared_adapter_config(cfg.jare))
            model.load_task(SHARED, run.task_dir(done[-1]) / "increments.safetensors")
            return cls(cfg, run, model.eval(), tokenizer, None, encoder)
        model = JareModel(base, cfg.jare)
        for task in done:
            model.load_task(task, run.task_dir(task) / "increments.safetensors")
        router = open_router(run, cfg, encoder)
        if router.task_names != done:
            raise RunError(f"{run.router_dir}: router tasks {router.task_names} != finished tasks {done}")
        return cls(cfg, run, model.eval(), tokenizer, router, encoder)

    @property
    def method(self) -> str:
        return "slm" if self.router is not None else self.run.manifest()["method"]

    @property
    def tasks(self) -> list[str]:
        return list(self.model.tasks)

    def add_task(self, task: str) -> None:
        """Hot-add a task that a training run finished after this pipeline was loaded."""
        if self.router is None:
            raise RunError(f"{self.run.root}: a {self.method} run has one shared adapter; nothing to hot-add")
        if task in self.model.tasks:
            raise RunError(f"task {task!r} is already loaded")
        if task not in self.run.done_tasks():
            raise RunError(f"{self.run.manifest_path}: task {task!r} is not finished")
        self.model.load_task(task, self.run.task_dir(task) / "increments.safetensors")
        self.router = open_router(self.run, self.cfg, self.encoder)

    def use_stage(self, t: int) -> None:
        """Route as the run did after its stage ``t`` (0-based): the router of its first t + 1 tasks.
        An slm run's increments are frozen once trained, so later tasks' slots, never routed to,
        change nothing; a shared-adapter baseline keeps only its last stage."""
        if self.router is None:
            done = self.run.done_tasks()
            if t != len(done) - 1:
                raise RunError(f"{self.run.root}: a {self.method} run keeps only its shared adapter after its last "
                               f"stage ({len(done) - 1}), not after stage {t}; its earlier rows are scored during "
                               "training (eval.during_training=true)")
            return
        if self.router.task_names != self.run.done_tasks()[: t + 1]:  # the loaded router may already be it
            self.router = open_router(self.run, self.cfg, self.encoder, n_tasks=t + 1)

    # ---- routing ---------------------------------------------------------------------
    def queries(self, records: list[Record]) -> list[str]:
        return [query_text(r) for r in records]

    def route_records(self, records: list[Record], mode: str = "slm") -> list[Routed]:
        """One :class:`Routed` per record; a baseline run's shared adapter serves every mode but base."""
        if self.router is None:
            if mode == "base":
                return [Routed(None, None) for _ in records]
            n = len(self.model.tasks)  # one shared adapter, or (olora) every task's LoRA: all at weight 1
            shared = RouteDecision(slots=list(range(n)), weights=[1.0] * n, score=1.0, ood=False, scores=[1.0] * n,
                                   task="olora" if self.method == "olora" else SHARED)
            return [Routed(shared, shared) for _ in records]
        return route_queries(self.router, self.encoder, self.queries(records), mode, self.cfg.serve.ood_fallback,
                             [r.task for r in records])

    def route(self, records: list[Record], mode: str = "slm") -> list[RouteDecision | None]:
        """One decision per record (None = base model)."""
        return [r.decision for r in self.route_records(records, mode)]

    # ---- generation ------------------------------------------------------------------
    def prompts(self, records: list[Record]) -> list[str]:
        return [render_prompt(r, self.cfg.data.template, self.tokenizer) for r in records]

    @torch.no_grad()
    def generate(self, prompts: list[str], decisions: list[RouteDecision | None], max_new_tokens: int,
                 batch_size: int | None = None, **generate_kwargs) -> list[Generation]:
        """Greedy generation, batched; each row uses its own slots for every decode step.

        ``generate_kwargs`` go to ``transformers`` ``generate`` (e.g. ``do_sample``,
        ``temperature``, ``streamer``, ``stopping_criteria``; the server uses them).
        """
        out: list[Generation] = []
        bs = batch_size or self.cfg.eval.batch_size
        for start in range(0, len(prompts), bs):
            out += self._generate_batch(prompts[start : start + bs], decisions[start : start + bs], max_new_tokens,
                                        **generate_kwargs)
        return out

    def _generate_batch(self, prompts, decisions, max_new_tokens, **generate_kwargs) -> list[Generation]:
        tok = self.tokenizer
        rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        slot_ids, slot_weights = (t.to(self.device) for t in routing_tensors(decisions))
        gen = self.model.generate(ids, attention_mask=mask, slot_ids=slot_ids, slot_weights=slot_weights,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=self.stop_ids,
                                  **{"do_sample": False, **generate_kwargs})
        new = gen[:, width:].cpu()
        results = []
        for row, d in zip(new, decisions):
            n = len(row)
            for i, t in enumerate(row.tolist()):
                if t in self.stop_ids:
                    n = i
                    break
            results.append(Generation(tok.decode(row[:n], skip_special_tokens=True).strip(), d, n, row[:n].tolist()))
        return results
