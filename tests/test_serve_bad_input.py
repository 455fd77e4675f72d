"""Malformed and hostile requests against a real server on loopback: every reply is an
OpenAI-shaped error with the right status, code and param, and the server keeps serving."""
import json

import httpx
import pytest

pytestmark = pytest.mark.slow
KEY, ADMIN = "test-key", "admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ["serve.max_request_bytes=20000", "serve.max_tokens_limit=64", "serve.max_model_len=256",
          "serve.max_inputs=8", "serve.batch_wait_ms=0"]


@pytest.fixture(scope="module")
def server(served_run):
    from slm_llm.serve.app import build_app
    from slm_llm.serve.server import ServerThread, load_backend

    backend, cfg = load_backend(served_run, "hf", [f"serve.api_key={KEY}", f"serve.admin_key={ADMIN}", *LIMITS])
    with ServerThread(build_app(backend, cfg.serve)) as url, httpx.Client(base_url=url, timeout=300) as client:
        yield client


def cmpl(**kw):
    return {"model": "slm", "prompt": "Is this an overruling?", "max_tokens": 2, "temperature": 0, **kw}


def chat(messages, **kw):
    return {"model": "slm", "messages": messages, "max_tokens": 2, "temperature": 0, **kw}


def user(content):
    return [{"role": "user", "content": content}]


C, CH, R = "/v1/completions", "/v1/chat/completions", "/v1/route"
BAD = 400
# (case, method, path, body: dict (JSON) | bytes (raw) | None, headers, status, code, param)
CASES = [
    # not JSON, or not an object
    ("malformed JSON", "POST", C, b'{"model": "slm", "prompt": ', {}, BAD, "invalid_json", None),
    ("empty body", "POST", C, b"", {}, BAD, "invalid_json", None),
    ("JSON array", "POST", C, b"[1, 2]", {}, BAD, "invalid_json", None),
    ("JSON string", "POST", C, b'"hello"', {}, BAD, "invalid_json", None),
    ("JSON null", "POST", C, b"null", {}, BAD, "invalid_json", None),
    ("NaN literal", "POST", C, b'{"model": "slm", "prompt": "x", "temperature": NaN}', {}, BAD, "invalid_json", None),
    ("nested 9000 deep", "POST", C, b"[" * 9000 + b"]" * 9000, {}, BAD, "invalid_json", None),
    ("5000-digit integer", "POST", C, b'{"model": "slm", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", {},
     BAD, "invalid_json", None),
    ("body not UTF-8", "POST", C, b'{"model": "slm", "prompt": "\xff\xfe caf\xe9"}', {}, BAD, "invalid_json", None),
    ("body not UTF-8 (chat)", "POST", CH, b'{"model": "slm", "messages": "\xc3\x28"}', {}, BAD, "invalid_json", None),
    # lone UTF-16 surrogates, escaped in otherwise valid JSON
    ("surrogate in prompt", "POST", C, b'{"model": "slm", "prompt": "abc \\ud800 def", "max_tokens": 2}', {},
     BAD, "invalid_parameter", "prompt"),
    ("surrogate in chat content", "POST", CH, b'{"model": "slm", "messages": [{"role": "user", "content": "\\udfff"}]}',
     {}, BAD, "invalid_parameter", "messages[0].content"),
    ("surrogate in stop", "POST", C, b'{"model": "slm", "prompt": "x", "stop": "\\ud83d"}', {}, BAD,
     "invalid_parameter", "stop"),
    ("surrogate in route input", "POST", R, b'{"input": ["ok", "\\ud800"]}', {}, BAD, "invalid_parameter", "input[1]"),
    # wrong types
    ("max_tokens a string", "POST", C, cmpl(max_tokens="ten"), {}, BAD, "invalid_parameter", "max_tokens"),
    ("max_tokens a float", "POST", C, cmpl(max_tokens=2.5), {}, BAD, "invalid_parameter", "max_tokens"),
    ("temperature a string", "POST", C, cmpl(temperature="hot"), {}, BAD, "invalid_parameter", "temperature"),
    ("prompt a number", "POST", C, cmpl(prompt=5), {}, BAD, "invalid_parameter", "prompt"),
    ("prompt token ids", "POST", C, cmpl(prompt=[1, 2, 3]), {}, BAD, "invalid_parameter", "prompt[0]"),
    ("messages a string", "POST", CH, chat("hi"), {}, BAD, "invalid_parameter", "messages"),
    ("stream a string", "POST", C, cmpl(stream="yes"), {}, BAD, "invalid_parameter", "stream"),
    ("stop items not strings", "POST", C, cmpl(stop=[1, 2]), {}, BAD, "invalid_parameter", "stop[0]"),
    ("seed a string", "POST", C, cmpl(seed="42"), {}, BAD, "invalid_parameter", "seed"),
    ("route input a number", "POST", R, {"input": 3}, {}, BAD, "invalid_parameter", "input"),
    # out of range, unsupported
    ("max_tokens 0", "POST", C, cmpl(max_tokens=0), {}, BAD, "invalid_parameter", "max_tokens"),
    ("temperature 3", "POST", C, cmpl(temperature=3), {}, BAD, "invalid_parameter", "temperature"),
    ("top_p 0", "POST", C, cmpl(top_p=0), {}, BAD, "invalid_parameter", "top_p"),
    ("n 2", "POST", C, cmpl(n=2), {}, BAD, "invalid_parameter", "n"),
    ("logprobs", "POST", C, cmpl(logprobs=5), {}, BAD, "invalid_parameter", "logprobs"),
    ("presence_penalty", "POST", CH, chat(user("hi"), presence_penalty=0.5), {}, BAD, "invalid_parameter",
     "presence_penalty"),
    ("echo", "POST", C, cmpl(echo=True), {}, BAD, "invalid_parameter", "echo"),
    # unknown and missing fields
    ("unknown parameter", "POST", C, cmpl(max_tokenz=2), {}, BAD, "invalid_parameter", "max_tokenz"),
    ("unknown message field", "POST", CH, chat([{"role": "user", "content": "hi", "tool_calls": []}]), {}, BAD,
     "invalid_parameter", "messages[0].tool_calls"),
    ("no model", "POST", C, {"prompt": "x"}, {}, BAD, "invalid_parameter", "model"),
    ("no prompt", "POST", C, {"model": "slm"}, {}, BAD, "invalid_parameter", "prompt"),
    ("no messages", "POST", CH, {"model": "slm"}, {}, BAD, "invalid_parameter", "messages"),
    ("message without content", "POST", CH, chat([{"role": "user"}]), {}, BAD, "invalid_parameter",
     "messages[0].content"),
    ("tool role", "POST", CH, chat([{"role": "tool", "content": "x"}]), {}, BAD, "invalid_parameter", "messages[0].role"),
    ("route without input", "POST", R, {"model": "slm"}, {}, BAD, "invalid_parameter", "input"),
    # sizes and limits
    ("body over max_request_bytes", "POST", C, cmpl(prompt="x" * 30000), {}, 413, "request_too_large", None),
    ("chunked body over the limit", "POST", C, "chunked", {}, 413, "request_too_large", None),
    ("prompt over the context", "POST", C, cmpl(prompt="word " * 300), {}, BAD, "context_length_exceeded", "prompt"),
    ("prompt + max_tokens over the context", "POST", C, cmpl(prompt="word " * 200, max_tokens=60), {}, BAD,
     "context_length_exceeded", "max_tokens"),
    ("max_tokens over the limit", "POST", C, cmpl(max_tokens=65), {}, BAD, "max_tokens_exceeded", "max_tokens"),
    ("5 stop sequences", "POST", C, cmpl(stop=list("abcde")), {}, BAD, "invalid_parameter", "stop"),
    ("1000 stop sequences", "POST", C, cmpl(stop=["s"] * 1000), {}, BAD, "invalid_parameter", "stop"),
    ("route over max_inputs", "POST", R, {"input": ["q"] * 200}, {}, BAD, "too_many_inputs", "input"),
    ("route with 10,000 inputs", "POST", R, {"input": ["q"] * 10_000}, {}, 413, "request_too_large", None),
    ("prompts over max_inputs", "POST", C, cmpl(prompt=["p"] * 9), {}, BAD, "too_many_inputs", "prompt"),
    ("empty route list", "POST", R, {"input": []}, {}, BAD, "invalid_parameter", "input"),
    ("empty prompt", "POST", C, cmpl(prompt=""), {}, BAD, "invalid_parameter", "prompt"),
    ("empty prompt list", "POST", C, cmpl(prompt=[]), {}, BAD, "invalid_parameter", "prompt"),
    ("stream with two prompts", "POST", C, cmpl(prompt=["a", "b"], stream=True), {}, BAD, "invalid_parameter", "prompt"),
    # models
    ("unknown model", "POST", C, cmpl(model="gpt-4"), {}, 404, "model_not_found", "model"),
    ("unknown model, chat, streaming", "POST", CH, chat(user("hi"), model="nope", stream=True), {}, 404,
     "model_not_found", "model"),
    ("unknown model, route", "POST", R, {"input": "x", "model": "nope"}, {}, 404, "model_not_found", "model"),
    # chat messages and content parts
    ("empty messages", "POST", CH, chat([]), {}, BAD, "invalid_parameter", "messages"),
    ("no user message", "POST", CH, chat([{"role": "system", "content": "be brief"}]), {}, BAD, "invalid_parameter",
     "messages"),
    ("image content part", "POST", CH, chat(user([{"type": "text", "text": "what is this?"},
                                                  {"type": "image_url", "image_url": {"url": "http://x/y.png"}}])),
     {}, BAD, "unsupported_content_type", "messages[0].content[1].type"),
    ("audio content part", "POST", CH, chat(user([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])),
     {}, BAD, "unsupported_content_type", "messages[0].content[0].type"),
    ("text part without text", "POST", CH, chat(user([{"type": "text"}])), {}, BAD, "invalid_parameter",
     "messages[0].content[0]"),
    ("content part without type", "POST", CH, chat(user([{"text": "hi"}])), {}, BAD, "invalid_parameter",
     "messages[0].content[0].type"),
    # methods and URLs
    ("GET on a POST route", "GET", C, None, {}, 405, "method_not_allowed", None),
    ("PUT on chat", "PUT", CH, chat(user("hi")), {}, 405, "method_not_allowed", None),
    ("DELETE /health", "DELETE", "/health", None, {}, 405, "method_not_allowed", None),
    ("POST /v1/models", "POST", "/v1/models", {}, {}, 405, "method_not_allowed", None),
    ("unknown route", "GET", "/v1/nope", None, {}, 404, "unknown_url", None),
    ("unknown API version", "POST", "/v2/completions", cmpl(), {}, 404, "unknown_url", None),
    ("root", "GET", "/", None, {}, 404, "unknown_url", None),
    ("docs are off", "GET", "/docs", None, {}, 404, "unknown_url", None),
    # credentials
    ("no API key", "POST", C, cmpl(), {"Authorization": ""}, 401, "invalid_api_key", None),
    ("wrong API key", "GET", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, "invalid_api_key", None),
    ("admin with the API key", "POST", "/v1/admin/reload", None, {}, 401, "invalid_api_key", None),
    ("admin adapter that does not exist", "POST", "/v1/admin/load_adapter", {"lora_name": "x", "lora_path": "/nonexistent"},
     {"Authorization": f"Bearer {ADMIN}"}, BAD, "adapter_mismatch", "lora_path"),
]
OK = [  # accepted: what OpenAI clients send that looks unusual
    ("text content parts", CH, chat(user([{"type": "text", "text": "Is this"}, {"type": "text", "text": "an overruling?"}]))),
    ("developer role", CH, chat([{"role": "developer", "content": "Answer briefly."}, *user("hi")])),
    ("form content type, JSON body", C, cmpl()),
    ("NUL and emoji in the prompt", C, cmpl(prompt="a\u0000b \U0001F600")),
    ("max_tokens null", C, cmpl(max_tokens=None, prompt="x")),
    ("4 stop sequences", C, cmpl(stop=["a", "b", "c", "d"])),
    ("route at max_inputs", R, {"input": ["q"] * 8}),
    ("admin with the admin key", "/v1/admin/reload", None),
]


def send(client, method, path, body, headers):
    headers = {**AUTH, **headers}
    if headers.get("Authorization") == "":
        del headers["Authorization"]
    if body == "chunked":  # no Content-Length: the limit is enforced while reading
        return client.request(method, path, content=iter([b'{"prompt": "' + b"x" * 4096] * 8), headers=headers)
    if isinstance(body, (bytes, type(None))):
        return client.request(method, path, content=body, headers={"content-type": "application/json", **headers})
    return client.request(method, path, json=body, headers=headers)


def assert_openai_error(r, status, code, param):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error"
    assert (err["code"], err["param"]) == (code, param), err


@pytest.mark.parametrize("case,method,path,body,headers,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, case, method, path, body, headers,
                                                                       status, code, param):
    r = send(server, method, path, body, headers)
    assert_openai_error(r, status, code, param)
    if status == 405:
        assert r.headers["allow"]
    assert server.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("case,path,body", OK, ids=[c[0] for c in OK])
def test_unusual_but_valid_requests_are_served(server, case, path, body):
    headers = {"Authorization": f"Bearer {ADMIN}"} if path.startswith("/v1/admin") else {}
    if case.startswith("form"):
        headers["content-type"] = "application/x-www-form-urlencoded"
        r = send(server, "POST", path, json.dumps(body).encode(), headers)
    else:
        r = send(server, "POST", path, body, headers)
    assert r.status_code == 200, r.text
    if path == CH:
        assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_text_parts_are_the_same_request_as_plain_content(server):
    parts = server.post(CH, json=chat(user([{"type": "text", "text": "Is this"}, {"type": "text", "text": "ok?"}])),
                        headers=AUTH).json()
    plain = server.post(CH, json=chat(user("Is this\nok?")), headers=AUTH).json()
    assert parts["choices"] == plain["choices"] and parts["usage"] == plain["usage"]


def test_a_client_that_leaves_mid_stream_does_not_disturb_the_others(server):
    with server.stream("POST", C, json=cmpl(max_tokens=60, stream=True), headers=AUTH) as r:
        first = next(line for line in r.iter_lines() if line)
        assert first.startswith("data: ")
    for _ in range(3):
        assert server.post(C, json=cmpl(), headers=AUTH).status_code == 200
    assert server.get("/health").json()["status"] == "ok"


def test_admin_is_off_without_credentials_on_a_non_loopback_host(served_run):
    from slm_llm.serve.app import build_app
    from slm_llm.serve.server import ServerThread, load_backend

    backend, cfg = load_backend(served_run, "hf", ["serve.host=0.0.0.0", *LIMITS])
    with ServerThread(build_app(backend, cfg.serve), host=cfg.serve.host) as url, \
            httpx.Client(base_url=url, timeout=300) as client:
        for path, body in (("/v1/admin/reload", None), ("/v1/admin/load_adapter", {"lora_name": "a", "lora_path": "/x"})):
            assert_openai_error(client.post(path, json=body), 403, "admin_disabled", None)
        assert client.get("/v1/models").status_code == 200  # inference stays open, as configured
        assert client.get("/health").json()["status"] == "ok"
