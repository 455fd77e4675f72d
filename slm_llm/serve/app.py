"""The OpenAI-compatible HTTP API over a backend (FastAPI).

    GET  /health                  liveness + backend, tasks
    GET  /v1/models               slm, base and every task
    POST /v1/completions          OpenAI completions (``stream`` -> SSE)
    POST /v1/chat/completions     OpenAI chat (messages rendered with the chat template)
    POST /v1/route                the routing decision only
    POST /v1/admin/reload         hot-add tasks a training run finished since start
    POST /v1/admin/load_adapter   {"lora_name", "lora_path"}: an exported adapter (vllm)

Every completion carries ``slm_route`` {task, score, slots, weights, ood} (null for
``model="base"``; with ``"fallback": "base"`` when an OOD query was answered by the
base model). Errors are OpenAI-shaped: ``{"error": {message, type, param, code}}``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from slm_llm.config import ServeConfig
from slm_llm.jare.export import AdapterError
from slm_llm.run import RunError
from slm_llm.serve.backend import Backend, GenRequest, ServeError

log = logging.getLogger("slm_llm.serve")


# ---- request bodies ------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is a 400, not silently ignored


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    logprobs: None = None
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: Literal[False] = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class RouteRequest(_Body):
    model: str = "slm"
    input: str | list[str] = Field(min_length=1)


class LoadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


# ---- the app -------------------------------------------------------------------------------
def build_app(backend: Backend, cfg: ServeConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        poller = asyncio.create_task(_poll_reload(backend, cfg.reload_poll_s)) if cfg.reload_poll_s > 0 else None
        try:
            yield
        finally:
            if poller:
                poller.cancel()
            await backend.close()

    app = FastAPI(title="slm_llm", lifespan=lifespan)
    app.state.backend = backend
    reload_lock = asyncio.Lock()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1") and cfg.api_key:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                return _error(ServeError("Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                         status=401, code="invalid_api_key"))
        if request.method == "POST":
            size = request.headers.get("content-length")
            too_big = ServeError(f"request body is larger than serve.max_request_bytes={cfg.max_request_bytes}",
                                 status=413, code="request_too_large")
            if size is not None and size.isdigit() and int(size) > cfg.max_request_bytes:
                return _error(too_big)
            if len(await request.body()) > cfg.max_request_bytes:  # chunked bodies carry no length
                return _error(too_big)
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, e: ServeError):
        return _error(e)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception):
        log.exception("request failed")
        return _error(ServeError(f"{type(e).__name__}: {e}", status=500, type_="server_error"))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}"
                        for err in e.errors())
        return _error(ServeError(msg or "invalid request", param=".".join(loc) or None, code="invalid_parameter"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend.name, "base_model": backend.base_model, "tasks": backend.tasks()}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "slm_llm"}
                                           for m in backend.models()]}

    @app.post("/v1/route")
    async def route(body: RouteRequest):
        texts = [body.input] if isinstance(body.input, str) else body.input
        routes = await asyncio.to_thread(backend.route, texts, body.model)
        return {"object": "list", "model": body.model, "data": [r.report for r in routes]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream and len(prompts) != 1:
            raise ServeError("stream=true takes a single prompt", param="prompt")
        reqs = [_gen_request(backend, cfg, body, p, p, body.max_tokens or 16) for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _sse(backend, reqs[0], rid, created, body.model, chat=False)
        results = await asyncio.gather(*(backend.generate(r) for r in reqs))
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason,
                    "slm_route": r.route} for i, r in enumerate(results)]
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, "usage": _usage(reqs, results), "slm_route": results[0].route}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        msgs = [m.model_dump(exclude_none=True) for m in body.messages]
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if not users:
            raise ServeError("messages must contain a user message", param="messages")
        try:
            prompt = backend.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 (a template that rejects this conversation)
            raise ServeError(f"cannot render messages with the chat template: {e}", param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        req = _gen_request(backend, cfg, body, prompt, users[-1], limit, default_tokens=True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _sse(backend, req, rid, created, body.model, chat=True)
        r = await backend.generate(req)
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                             "logprobs": None, "finish_reason": r.finish_reason}],
                "usage": _usage([req], [r]), "slm_route": r.route}

    @app.post("/v1/admin/reload")
    async def reload():
        async with reload_lock:
            try:
                added = await asyncio.to_thread(backend.reload)
            except (RunError, AdapterError) as e:
                raise ServeError(str(e), status=409, code="reload_failed") from None
        return {"added": added, "tasks": backend.tasks()}

    @app.post("/v1/admin/load_adapter")
    async def load_adapter(body: LoadAdapterRequest):
        async with reload_lock:
            try:
                await asyncio.to_thread(backend.load_adapter, body.lora_name, body.lora_path)
            except (RunError, AdapterError) as e:
                raise ServeError(str(e), param="lora_path", code="adapter_mismatch") from None
        return {"loaded": body.lora_name, "models": backend.models()}

    return app


def _gen_request(backend: Backend, cfg: ServeConfig, body: _Sampling, prompt: str, query: str,
                 max_tokens: int | None, default_tokens: bool = False) -> GenRequest:
    if body.model not in backend.models():
        raise ServeError(f"The model `{body.model}` does not exist. Known: {', '.join(backend.models())}",
                         status=404, param="model", code="model_not_found")
    ids = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    room = backend.max_model_len - len(ids)
    if room < 1:
        raise ServeError(f"This model's maximum context length is {backend.max_model_len} tokens; the prompt has "
                         f"{len(ids)} tokens.", param="prompt", code="context_length_exceeded")
    if max_tokens is None and default_tokens:  # chat without a limit: as much as fits, up to the server's cap
        max_tokens = min(room, cfg.max_tokens_limit)
    if max_tokens > cfg.max_tokens_limit:
        raise ServeError(f"max_tokens={max_tokens} is above this server's limit of {cfg.max_tokens_limit} "
                         f"(serve.max_tokens_limit)", param="max_tokens", code="max_tokens_exceeded")
    if max_tokens > room:
        raise ServeError(f"This model's maximum context length is {backend.max_model_len} tokens; the prompt has "
                         f"{len(ids)} tokens and max_tokens is {max_tokens}.", param="max_tokens",
                         code="context_length_exceeded")
    return GenRequest(prompt, ids, query, body.model, max_tokens, body.temperature, body.top_p, body.stops())


def _usage(reqs: list[GenRequest], results) -> dict:
    p = sum(len(r.prompt_ids) for r in reqs)
    c = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(backend: Backend, req: GenRequest, rid: str, created: int, model: str, chat: bool) -> StreamingResponse:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str, finish: str | None, route, first: bool) -> str:
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice],
                "slm_route": route}
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        route, first = None, True
        try:
            async for d in backend.stream(req):
                if first:
                    route = d.route
                yield chunk(d.text, d.finish_reason, route, first)
                first = False
        except ServeError as e:
            yield f"data: {json.dumps(_error_body(e))}\n\n"
        except Exception as e:  # noqa: BLE001 (the status line is already sent)
            log.exception("stream failed")
            yield f"data: {json.dumps(_error_body(ServeError(str(e), 500, type_='server_error')))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _error_body(e: ServeError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def _error(e: ServeError) -> JSONResponse:
    return JSONResponse(_error_body(e), status_code=e.status)


async def _poll_reload(backend: Backend, every_s: float) -> None:
    """The optional file watch: hot-add newly finished tasks every ``every_s`` seconds."""
    while True:
        await asyncio.sleep(every_s)
        try:
            added = await asyncio.to_thread(backend.reload)
            if added:
                log.info(f"hot-added {added}")
        except Exception:  # noqa: BLE001 (a half-written manifest: try again next time)
            log.exception("reload poll failed")
