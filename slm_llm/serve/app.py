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
base model). Every error, including unknown URLs, wrong methods and bodies that are not
JSON, is OpenAI-shaped: ``{"error": {message, type, param, code}}``. Bodies are parsed
here (strict UTF-8 JSON, strict types, no unknown fields), not by FastAPI.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from slm_llm.config import ServeConfig
from slm_llm.jare.export import AdapterError
from slm_llm.run import RunError
from slm_llm.serve.backend import Backend, GenRequest, ServeError

log = logging.getLogger("slm_llm.serve")
MAX_STOP = 4  # OpenAI's limit on stop sequences


# ---- request bodies ------------------------------------------------------------------------
def _unicode(s: str) -> str:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); no tokenizer can encode one."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate (U+{ord(s[e.start]):04X}), which is not valid Unicode") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # a misspelt parameter is a 400, not silently ignored


class StreamOptions(_Body):
    include_usage: bool = False  # one last chunk, with empty choices, carries the usage


class _Sampling(_Body):
    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    user: Text | None = None
    logprobs: None = None
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model predicts (benchmarks)

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences (got {len(stop)})")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: Annotated[Text, Field(min_length=1)] | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1)]
    echo: Literal[False] = False


class ContentPart(BaseModel):
    """One part of a chat message's content; only ``{"type": "text", "text": ...}`` is served."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Text
    text: Text | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]
    name: Text | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class RouteRequest(_Body):
    model: Text = "slm"
    input: Text | Annotated[list[Text], Field(min_length=1)]


class LoadAdapterRequest(_Body):
    lora_name: Annotated[Text, Field(min_length=1)]
    lora_path: Annotated[Text, Field(min_length=1)]


# ---- the app -------------------------------------------------------------------------------
def build_app(backend: Backend, cfg: ServeConfig) -> FastAPI:
    """The API over ``backend``; ``cfg.host`` is the address the server binds (admin access depends on it)."""
    admin_key = cfg.admin_key or cfg.api_key
    admin_open = not admin_key and _loopback(cfg.host)
    if not admin_key and not admin_open:
        log.warning(f"/v1/admin/* is off: the server listens on {cfg.host} and neither serve.admin_key nor "
                    "serve.api_key is set")

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

    app = FastAPI(title="slm_llm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    reload_lock = asyncio.Lock()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/admin/"):
            if not admin_key and not admin_open:
                return _error(ServeError(f"admin endpoints are off: this server listens on {cfg.host} (not loopback) "
                                         "and has neither serve.admin_key nor serve.api_key", status=403,
                                         code="admin_disabled"))
            if admin_key and not _bearer(request, admin_key):
                return _error(ServeError("Incorrect or missing admin key: send 'Authorization: Bearer <key>'.",
                                         status=401, code="invalid_api_key"))
        elif path.startswith("/v1") and cfg.api_key and not _bearer(request, cfg.api_key):
            return _error(ServeError("Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                     status=401, code="invalid_api_key"))
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_request_bytes:
            return _error(_too_large(cfg))
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, e: ServeError):
        return _error(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException):  # routing: unknown URL, wrong method
        if e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            err = ServeError(f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})",
                             status=405, code="method_not_allowed")
            return _error(err, headers=e.headers)
        if e.status_code == 404:
            return _error(ServeError(f"Unknown request URL: {request.method} {request.url.path}", status=404,
                                     code="unknown_url"))
        return _error(ServeError(str(e.detail), status=e.status_code))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception):
        log.exception("request failed")
        return _error(ServeError(f"{type(e).__name__}: {e}", status=500, type_="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend.name, "base_model": backend.base_model, "tasks": backend.tasks()}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "slm_llm"}
                                           for m in backend.models()]}

    @app.post("/v1/route")
    async def route(request: Request):
        body = await _parse(request, RouteRequest, cfg)
        texts = [body.input] if isinstance(body.input, str) else body.input
        _cap(texts, cfg, "input")
        _check_model(backend, body.model)
        routes = await asyncio.to_thread(backend.route, texts, body.model)
        return {"object": "list", "model": body.model, "data": [r.report for r in routes]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest, cfg)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        _cap(prompts, cfg, "prompt")
        if body.stream and len(prompts) != 1:
            raise ServeError("stream=true takes a single prompt", param="prompt", code="invalid_parameter")
        _check_model(backend, body.model)
        reqs = [await asyncio.to_thread(_gen_request, backend, cfg, body, p, p, body.max_tokens or 16)
                for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _sse(backend, reqs[0], rid, created, body, chat=False)
        results = await asyncio.gather(*(backend.generate(r) for r in reqs))
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason,
                    "slm_route": r.route} for i, r in enumerate(results)]
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, "usage": _usage(reqs, results), "slm_route": results[0].route}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _parse(request, ChatRequest, cfg)
        _check_model(backend, body.model)
        msgs = _messages(body.messages)
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if not users:
            raise ServeError("messages must contain a user message", param="messages", code="invalid_parameter")
        prompt = await asyncio.to_thread(_render, backend, msgs)
        limit = body.max_completion_tokens or body.max_tokens
        req = await asyncio.to_thread(_gen_request, backend, cfg, body, prompt, users[-1], limit, True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _sse(backend, req, rid, created, body, chat=True)
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
    async def load_adapter(request: Request):
        body = await _parse(request, LoadAdapterRequest, cfg)
        async with reload_lock:
            try:
                await asyncio.to_thread(backend.load_adapter, body.lora_name, body.lora_path)
            except (RunError, AdapterError, OSError, ValueError) as e:  # a mismatched, missing or unreadable adapter
                raise ServeError(str(e), param="lora_path", code="adapter_mismatch") from None
        return {"loaded": body.lora_name, "models": backend.models()}

    return app


# ---- parsing and validation ----------------------------------------------------------------
async def _parse(request: Request, model: type[BaseModel], cfg: ServeConfig):
    """The body as ``model``: at most serve.max_request_bytes (chunked bodies too), UTF-8, JSON, an object."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cfg.max_request_bytes:
            raise _too_large(cfg)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ServeError("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise ServeError(f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    except RecursionError:
        raise ServeError("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers over Python's digit limit
        raise ServeError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ServeError(f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # The most specific error first: the deepest, then not a union branch's plain type mismatch.
        first = min(e.errors(), key=lambda err: (-len(err["loc"]), err["type"].endswith("_type")))
        param = _param(first["loc"])
        msg = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
        raise ServeError(f"{param or 'body'}: {msg}", param=param, code="invalid_parameter") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict|list\[.*\]|literal\[.*\]|function-.*|[A-Z]\w*)$")


def _param(loc) -> str | None:
    """A pydantic error location as OpenAI names parameters: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.match(part):  # union branch tags are not parameter names
            out += f".{part}" if out else part
    return out or None


def _cap(items: list, cfg: ServeConfig, param: str) -> None:
    if len(items) > cfg.max_inputs:
        raise ServeError(f"{len(items)} items in `{param}`; this server takes at most {cfg.max_inputs} per request "
                         f"(serve.max_inputs)", param=param, code="too_many_inputs")


def _check_model(backend: Backend, model: str) -> None:
    if model not in backend.models():
        raise ServeError(f"The model `{model}` does not exist. Known: {', '.join(backend.models())}",
                         status=404, param="model", code="model_not_found")


def _messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template takes them: text parts joined by newlines (as vLLM does),
    ``developer`` as ``system``; any other kind of part is refused."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if not isinstance(content, str):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text":
                    raise ServeError(f"messages[{i}].content[{j}]: content parts of type '{part.type}' are not "
                                     "supported; this model reads text only (send {\"type\": \"text\", \"text\": ...})",
                                     param=f"messages[{i}].content[{j}].type", code="unsupported_content_type")
                if part.text is None or part.model_extra:
                    raise ServeError(f"messages[{i}].content[{j}]: a text part is {{\"type\": \"text\", \"text\": <string>}}",
                                     param=f"messages[{i}].content[{j}]", code="invalid_parameter")
                texts.append(part.text)
            content = "\n".join(texts)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _render(backend: Backend, msgs: list[dict]) -> str:
    try:
        return backend.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 (a template that rejects this conversation)
        raise ServeError(f"cannot render messages with the chat template: {e}", status=422, param="messages",
                         code="unprocessable_messages") from None


def _gen_request(backend: Backend, cfg: ServeConfig, body: _Sampling, prompt: str, query: str,
                 max_tokens: int | None, default_tokens: bool = False) -> GenRequest:
    ids = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ServeError("the prompt has no tokens", param="prompt", code="invalid_parameter")
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
    return GenRequest(prompt, ids, query, body.model, max_tokens, body.temperature, body.top_p, body.stops(),
                      body.ignore_eos)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _bearer(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    return secrets.compare_digest(given.encode(), f"Bearer {key}".encode())


def _too_large(cfg: ServeConfig) -> ServeError:
    return ServeError(f"request body is larger than serve.max_request_bytes={cfg.max_request_bytes}",
                      status=413, code="request_too_large")


# ---- responses -----------------------------------------------------------------------------
def _usage(reqs: list[GenRequest], results) -> dict:
    p = sum(len(r.prompt_ids) for r in reqs)
    c = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(backend: Backend, req: GenRequest, rid: str, created: int, body: _Sampling, chat: bool) -> StreamingResponse:
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": rid, "object": kind, "created": created, "model": body.model}

    def chunk(text: str, finish: str | None, route, first: bool) -> str:
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [choice], 'slm_route': route})}\n\n"

    async def events():
        route, first, tokens = None, True, 0
        try:
            async for d in backend.stream(req):
                if first:
                    route = d.route
                tokens = d.completion_tokens
                yield chunk(d.text, d.finish_reason, route, first)
                first = False
            if body.stream_options is not None and body.stream_options.include_usage:
                usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": tokens,
                         "total_tokens": len(req.prompt_ids) + tokens}
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        except ServeError as e:
            yield f"data: {json.dumps(_error_body(e))}\n\n"
        except Exception as e:  # noqa: BLE001 (the status line is already sent)
            log.exception("stream failed")
            yield f"data: {json.dumps(_error_body(ServeError(str(e), 500, type_='server_error')))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _error_body(e: ServeError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def _error(e: ServeError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_error_body(e), status_code=e.status, headers=headers)


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
