"""The embedded backend: exact per-query JARe through RunPipeline, with continuous batching.

One decode thread drives a :class:`~slm_llm.serve.decode.DecodeBatch`. Before each decode
step, and between its forwards (a step runs at most ``serve.step_chunk_rows`` rows per
forward), it takes the waiting requests (up to ``serve.max_batch_size`` running rows and
``serve.max_prefill_tokens`` prompt tokens per admission), routes them (one encoder call
per ``model``), prefills them together and adds them to the running batch; their first
token is sent right after that prefill. A row leaves as soon as it is done, so a request
waits for at most one forward (plus the routing and prefills ahead of it), never for other
requests' ``max_tokens``. Each row keeps its own top-K slots and weights, and its own
sampling settings, in every step.

Routing runs in the decode thread, not beside it: the encoder (the base model's first
blocks by default) and the decode forwards would otherwise split the same cores, and a
burst of arrivals waited for both (64 clients on 2 cores: routing a burst of 8 took 0.85 s
beside the decode forwards, at most 0.25 s in the decode thread; bench/RESULTS.md).

The decode thread holds the model lock while it admits or steps; hot-add takes the same
lock between two steps.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from slm_llm.config import ServeConfig
from slm_llm.dtkr.encoder import build_encoder
from slm_llm.jare.export import check_adapter
from slm_llm.pipeline import RunPipeline
from slm_llm.serve.backend import GenRequest, GenResult, Route, ServeError, StreamDelta, cut_at_stop
from slm_llm.serve.decode import DecodeBatch, Event, Row
from slm_llm.serve.routing import BASE, SLM, QueryRouter

log = logging.getLogger("slm_llm.serve")


@dataclass
class _Job:
    req: GenRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None  # non-streaming result
    tokens: asyncio.Queue | None = None  # streaming: ("route", report), ("token", id), ("end", finish), ("error", e)
    route: Route | None = None
    row: Row | None = field(default=None, repr=False)
    cancelled: bool = False


class HFBackend:
    name = "hf"

    def __init__(self, pipeline: RunPipeline, cfg: ServeConfig | None = None):
        self.pipe = pipeline
        self.cfg = cfg = cfg or pipeline.cfg.serve
        # Served queries must not land in the on-disk embedding cache (privacy, growth, threads).
        pipeline.encoder = build_encoder(pipeline.cfg, cache=False)
        self.router = QueryRouter(pipeline.encoder, pipeline.router, cfg.ood_fallback)
        self.tokenizer = pipeline.tokenizer
        self.stop_ids = pipeline.stop_ids
        self.base_model = pipeline.run.manifest()["base_model"]
        positions = getattr(pipeline.model.model.config, "max_position_embeddings", None) or cfg.max_model_len
        self.max_model_len = min(cfg.max_model_len, positions)
        self.batch = DecodeBatch(pipeline.model, self.tokenizer, self.stop_ids, cfg.max_batch_size, self.max_model_len)
        self._pending: collections.deque[_Job] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._model_lock = threading.Lock()  # decode steps vs hot-add
        self.rows_per_step: collections.deque[int] = collections.deque(maxlen=4096)  # tests, metrics

    @classmethod
    def load(cls, run_dir: str, overrides: list[str] | None = None) -> HFBackend:
        return cls(RunPipeline.load(run_dir, overrides))

    # ---- models and routing -------------------------------------------------------------
    def tasks(self) -> list[str]:
        return self.router.tasks

    def models(self) -> list[str]:
        return [SLM, BASE, *self.tasks()]

    def route(self, queries: list[str], model: str) -> list[Route]:
        return self.router.route(queries, model)

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="slm-decode", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 60)

    # ---- generation -----------------------------------------------------------------------
    async def generate(self, req: GenRequest) -> GenResult:
        self.router.check_model(req.model)
        loop = asyncio.get_running_loop()
        job = _Job(req, loop, future=loop.create_future())
        self._submit(job)
        try:
            return await job.future
        finally:
            job.cancelled = True  # done, or the caller went away: the row leaves at the next step

    async def stream(self, req: GenRequest) -> AsyncIterator[StreamDelta]:
        self.router.check_model(req.model)
        job = _Job(req, asyncio.get_running_loop(), tokens=asyncio.Queue())
        self._submit(job)
        ids: list[int] = []
        sent, first, route = "", True, None
        try:
            while True:
                kind, value = await job.tokens.get()
                if kind == "error":
                    raise value
                if kind == "route":
                    route = value
                    continue
                finish = None
                if kind == "token":
                    ids.append(value)
                else:
                    finish = value
                text, stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), req.stop)
                if stopped:
                    finish = "stop"
                if text.endswith("\ufffd") and finish is None:  # half a multi-byte character
                    continue
                delta, sent = text[len(sent):], text
                if delta or finish or first:
                    yield StreamDelta(delta, finish, route if first else None, len(ids))
                    first = False
                if finish:
                    return
        finally:
            job.cancelled = True  # a client that disconnects frees its row at the next step

    def _submit(self, job: _Job) -> None:
        if self._closing or self._thread is None:
            raise ServeError("the server is shutting down", status=503, code="server_unavailable",
                             type_="server_error")
        with self._wake:
            self._pending.append(job)
            self._wake.notify()

    # ---- the decode thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._pending and not self.batch.rows:
                    self._wake.wait()
                if self._closing:
                    break
                idle = not self.batch.rows
            if idle and self.cfg.batch_wait_ms > 0:  # the first request of a burst waits for the others
                time.sleep(self.cfg.batch_wait_ms / 1000)
            try:
                with self._model_lock:
                    jobs = self._take()
                    if jobs:
                        self._admit(jobs)
                    if self.batch.rows:
                        self.rows_per_step.append(len(self.batch.rows))
                        self.batch.step(self.cfg.step_chunk_rows, after_chunk=self._after_chunk)
            except Exception as e:  # noqa: BLE001 (every running request must hear about it; _admit told its own)
                log.exception("decode step failed")
                for row in self.batch.rows:
                    _fail(row.job, e)
                self.batch.clear()
        for job in [*self._pending, *(r.job for r in self.batch.rows)]:
            _fail(job, ServeError("the server is shutting down", status=503, code="server_unavailable",
                                  type_="server_error"))

    def _after_chunk(self, events: list[Event]) -> None:
        """Between two forwards of a step: send the tokens, and prefill whoever arrived meanwhile."""
        self._dispatch(events)
        jobs = self._take()
        if jobs:
            self._admit(jobs)

    def _take(self) -> list[_Job]:
        """Waiting jobs that fit: free rows, and the prompt-token budget of one prefill (at least one job)."""
        jobs, tokens = [], 0
        with self._wake:
            while self._pending and len(self.batch.rows) + len(jobs) < self.cfg.max_batch_size:
                job = self._pending[0]
                if job.cancelled:
                    self._pending.popleft()
                    continue
                width = max(tokens, len(job.req.prompt_ids)) * (len(jobs) + 1)  # the padded prefill
                if jobs and width > self.cfg.max_prefill_tokens:
                    break
                jobs.append(self._pending.popleft())
                tokens = max(tokens, len(job.req.prompt_ids))
        return jobs

    def _admit(self, jobs: list[_Job]) -> None:
        """Route the new jobs (one encoder call per model) and prefill them into the batch."""
        jobs = self._route_jobs(jobs)
        if not jobs:
            return
        try:
            rows = []
            for job in jobs:
                r = job.req
                job.row = Row(r.prompt_ids, job.route.decision, r.max_tokens, r.temperature, r.top_p, r.stop,
                              r.ignore_eos, job=job)
                rows.append(job.row)
            events = self.batch.admit(rows)
        except Exception as e:  # noqa: BLE001 (these jobs are in no row yet: tell them here)
            for job in jobs:
                _fail(job, e)
            raise
        self._dispatch(events)

    def _route_jobs(self, jobs: list[_Job]) -> list[_Job]:
        """Route ``jobs``; returns those routed (a group whose routing fails hears about it and drops out)."""
        by_model: dict[str, list[_Job]] = {}
        for job in jobs:
            by_model.setdefault(job.req.model, []).append(job)
        routed = []
        for model, group in by_model.items():
            try:
                routes = self.route([j.req.query for j in group], model)
            except Exception as e:  # noqa: BLE001 (only this group fails)
                for job in group:
                    _fail(job, e)
                continue
            for job, route in zip(group, routes):
                job.route = route
                if job.tokens is not None:
                    _send(job, ("route", route.report))
            routed += group
        return routed

    def _dispatch(self, events: list[Event]) -> None:
        for e in events:
            job = e.row.job
            if job.cancelled:
                e.row.cancelled = True
                continue
            if job.tokens is not None:
                if e.token is not None:
                    _send(job, ("token", e.token))
                if e.finish:
                    _send(job, ("end", e.finish))
            elif e.finish:
                ids = e.row.tokens
                text, stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), job.req.stop)
                result = GenResult(text, ids, "stop" if stopped else e.finish, job.route.report)
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
