"""The embedded backend: exact per-query JARe through RunPipeline, with micro-batching.

Concurrent requests wait in an asyncio queue; the batcher takes the first, keeps
collecting for ``serve.batch_wait_ms`` (or until ``serve.max_batch_size``), then runs
ONE routing call and ONE KV-cached ``generate`` for the whole batch in a worker
thread. Each row keeps its own top-K slots and weights for every decode step, so a
batch that mixes tasks costs one forward per step, not one per task.

Rows stop on their own: a per-row stopping criterion ends a row at its own
``max_tokens`` (or its stop token) while the others go on. Requests with different
sampling settings (greedy vs temperature/top_p) go in separate ``generate`` calls.
Streaming rows receive their tokens from a batched streamer as they are decoded.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from slm_llm.dtkr.encoder import build_encoder
from slm_llm.jare.export import check_adapter
from slm_llm.pipeline import RunPipeline
from slm_llm.serve.backend import GenRequest, GenResult, Route, ServeError, StreamDelta, cut_at_stop
from slm_llm.serve.routing import BASE, SLM, QueryRouter

log = logging.getLogger("slm_llm.serve")


@dataclass
class _Job:
    req: GenRequest
    future: asyncio.Future | None = None  # non-streaming result
    tokens: asyncio.Queue | None = None  # streaming: ("route", report), ("token", id), ("end", None), ("error", e)
    route: Route | None = None
    loop: asyncio.AbstractEventLoop = field(default=None, repr=False)


class HFBackend:
    name = "hf"

    def __init__(self, pipeline: RunPipeline, max_batch_size: int = 16, batch_wait_ms: float = 5.0):
        self.pipe = pipeline
        cfg = pipeline.cfg
        # Served queries must not land in the on-disk embedding cache (privacy, growth, threads).
        pipeline.encoder = build_encoder(cfg, cache=False)
        self.router = QueryRouter(pipeline.encoder, pipeline.router, cfg.serve.ood_fallback)
        self.tokenizer = pipeline.tokenizer
        self.stop_ids = pipeline.stop_ids
        self.base_model = pipeline.run.manifest()["base_model"]
        positions = getattr(pipeline.model.model.config, "max_position_embeddings", None) or cfg.serve.max_model_len
        self.max_model_len = min(cfg.serve.max_model_len, positions)
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait_ms / 1000
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._model_lock = threading.Lock()  # generate vs hot-add
        self.batch_sizes: list[int] = []  # observed batch sizes (tests, metrics)

    @classmethod
    def load(cls, run_dir: str, overrides: list[str] | None = None) -> HFBackend:
        pipe = RunPipeline.load(run_dir, overrides)
        return cls(pipe, pipe.cfg.serve.max_batch_size, pipe.cfg.serve.batch_wait_ms)

    # ---- models and routing -------------------------------------------------------------
    def tasks(self) -> list[str]:
        return self.router.tasks

    def models(self) -> list[str]:
        return [SLM, BASE, *self.tasks()]

    def route(self, queries: list[str], model: str) -> list[Route]:
        return self.router.route(queries, model)

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._batcher())

    async def close(self) -> None:
        if self._worker:
            self._worker.cancel()

    # ---- generation -----------------------------------------------------------------------
    async def generate(self, req: GenRequest) -> GenResult:
        self.router.check_model(req.model)
        loop = asyncio.get_running_loop()
        job = _Job(req, future=loop.create_future(), loop=loop)
        await self._queue.put(job)
        return await job.future

    async def stream(self, req: GenRequest) -> AsyncIterator[StreamDelta]:
        self.router.check_model(req.model)
        job = _Job(req, tokens=asyncio.Queue(), loop=asyncio.get_running_loop())
        await self._queue.put(job)
        ids: list[int] = []
        sent = ""
        first = True
        while True:
            kind, value = await job.tokens.get()
            if kind == "error":
                raise value
            if kind == "route":
                route = value
                continue
            finish = None
            if kind == "token":
                if value in self.stop_ids:
                    finish = "stop"
                else:
                    ids.append(value)
                    if len(ids) >= req.max_tokens:
                        finish = "length"
            else:  # "end" without a stop token or limit: generation was cut by the batch
                finish = "length"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = cut_at_stop(text, req.stop)
            if stopped:
                finish = "stop"
            if text.endswith("\ufffd") and finish is None:  # half a multi-byte character
                continue
            delta = text[len(sent):]
            sent = text
            if delta or finish or first:
                yield StreamDelta(delta, finish, route if first else None, len(ids))
                first = False
            if finish:
                return

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            deadline = loop.time() + self.batch_wait
            while len(jobs) < self.max_batch_size:
                if not self._queue.empty():
                    jobs.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                await asyncio.to_thread(self._run_batch, jobs)
            except Exception as e:  # noqa: BLE001 (every waiting request must hear about it)
                log.exception("batch failed")
                for job in jobs:
                    _fail(job, e)

    def _run_batch(self, jobs: list[_Job]) -> None:
        """Route every job (one encoder call per mode), then one generate per sampling setting."""
        self.batch_sizes.append(len(jobs))
        by_model: dict[str, list[_Job]] = {}
        for job in jobs:
            by_model.setdefault(job.req.model, []).append(job)
        for model, group in by_model.items():
            try:
                for job, route in zip(group, self.route([j.req.query for j in group], model)):
                    job.route = route
                    if job.tokens is not None:
                        _send(job, ("route", route.report))
            except Exception as e:  # noqa: BLE001
                for job in group:
                    _fail(job, e)
                jobs = [j for j in jobs if j not in group]
        by_sampling: dict[tuple, list[_Job]] = {}
        for job in jobs:
            r = job.req
            key = (False, 1.0, 1.0) if r.temperature == 0 else (True, r.temperature, r.top_p)
            by_sampling.setdefault(key, []).append(job)
        for (sample, temperature, top_p), group in by_sampling.items():
            kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {}
            self._generate(group, kwargs)

    def _generate(self, jobs: list[_Job], sampling: dict) -> None:
        prompts = [j.req.prompt for j in jobs]  # RunPipeline tokenises them to exactly ``prompt_ids``
        limits = torch.tensor([j.req.max_tokens for j in jobs])
        width = max(len(j.req.prompt_ids) for j in jobs)
        streamer = _BatchStreamer(jobs) if any(j.tokens is not None for j in jobs) else None
        with self._model_lock:
            gens = self.pipe.generate(
                prompts, [j.route.decision for j in jobs], int(limits.max()), batch_size=len(jobs),
                stopping_criteria=StoppingCriteriaList([_RowLimits(width, limits)]), streamer=streamer, **sampling)
        for job, gen in zip(jobs, gens):
            if job.tokens is not None:
                continue
            ids = gen.token_ids[: job.req.max_tokens]
            finish = "stop" if len(gen.token_ids) < job.req.max_tokens else "length"
            text, stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), job.req.stop)
            result = GenResult(text, ids, "stop" if stopped else finish, job.route.report)
            job.loop.call_soon_threadsafe(_resolve, job.future, result)

    # ---- hot-add --------------------------------------------------------------------------
    def reload(self) -> list[str]:
        """Load tasks the training run finished since start; returns the names added."""
        added = []
        with self._model_lock:
            for task in self.pipe.run.done_tasks():
                if task not in self.pipe.tasks:
                    self.pipe.add_task(task)
                    added.append(task)
            self.router.router = self.pipe.router
        return added

    def load_adapter(self, name: str, path: str) -> None:
        check_adapter(path, self.base_model)  # a mismatched base is refused first, with its own message
        raise ServeError("the hf backend serves the run's own JARe slots (POST /v1/admin/reload picks up new "
                         "tasks); loading an external PEFT adapter needs --backend vllm", status=400,
                         param="lora_path", code="unsupported_by_backend")


class _RowLimits(StoppingCriteria):
    """Row b is done once it has ``limits[b]`` new tokens; the batch goes on for the others."""

    def __init__(self, prompt_width: int, limits: torch.Tensor):
        self.prompt_width, self.limits = prompt_width, limits

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.limits.to(input_ids.device)


class _BatchStreamer:
    """transformers streamer for a batch: hands row b's new token to job b's queue."""

    def __init__(self, jobs: list[_Job]):
        self.jobs = jobs

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # the prompt
            return
        for job, token in zip(self.jobs, value.tolist()):
            if job.tokens is not None:
                _send(job, ("token", token))

    def end(self) -> None:
        for job in self.jobs:
            if job.tokens is not None:
                _send(job, ("end", None))


def _send(job: _Job, item) -> None:
    job.loop.call_soon_threadsafe(job.tokens.put_nowait, item)


def _resolve(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


def _fail(job: _Job, e: Exception) -> None:
    if job.future is not None:
        job.loop.call_soon_threadsafe(lambda: job.future.done() or job.future.set_exception(e))
    else:
        _send(job, ("error", e))
