"""The HTTP API over the hf backend (exact per-query JARe), against real servers on loopback."""
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import make_partial_run

pytestmark = pytest.mark.slow
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def chat(client, model, text, max_tokens=6, **kw):
    r = client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}],
                                                  "max_tokens": max_tokens, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def assert_same_route(a, b):
    """The same routing decision. A query encoded inside a padded batch and alone differs in the
    encoder's last float bits, so scores and weights are compared to 1e-5, the rest exactly."""
    if a is None or b is None:
        assert a is b
        return
    assert {k: v for k, v in a.items() if k not in ("score", "weights")} == \
        {k: v for k, v in b.items() if k not in ("score", "weights")}
    assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)


@pytest.fixture(scope="module")
def hf_server(served_run):
    from slm_llm.serve.app import build_app
    from slm_llm.serve.server import ServerThread, load_backend

    backend, cfg = load_backend(served_run, "hf", [f"serve.api_key={KEY}", "serve.batch_wait_ms=300",
                                                   "serve.max_request_bytes=20000", "serve.max_tokens_limit=64",
                                                   "serve.max_model_len=256"])
    with ServerThread(build_app(backend, cfg.serve)) as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=300) as client:
            yield client, backend


def test_health_models_and_route(hf_server, task_queries):
    client, _ = hf_server
    assert client.get("/health").json()["tasks"] == ["finance_phrasebank", "law_overruling"]
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["slm", "base", "finance_phrasebank", "law_overruling"]
    fin, law = task_queries["finance_phrasebank"][0], task_queries["law_overruling"][0]
    routes = client.post("/v1/route", json={"input": [fin, law]}).json()["data"]
    assert [r["task"] for r in routes] == ["finance_phrasebank", "law_overruling"]
    assert all(not r["ood"] and len(r["slots"]) == 2 and abs(sum(r["weights"]) - 1) < 1e-4 for r in routes)
    # an off-domain request (an IFEval-style task; neither finance sentiment nor legal overruling)
    ood = client.post("/v1/route", json={"input": "Write a poem about the sea in 4 lines."}).json()["data"][0]
    assert ood["ood"] and ood["fallback"] == "base"
    # everyday chat, which the Gaussian test alone lets through to a task (the background test)
    chat = ["What's the capital of Australia?", "Give me a recipe for banana bread.", "Tell me a joke about penguins."]
    assert [(r["ood"], r["fallback"]) for r in client.post("/v1/route", json={"input": chat}).json()["data"]] == \
        [(True, "base")] * 3
    assert client.post("/v1/route", json={"input": fin, "model": "base"}).json()["data"] == [None]


def test_mixed_task_batch_rows_equal_each_row_served_alone(hf_server, task_queries):
    client, backend = hf_server
    jobs = [(m, q) for q in task_queries["finance_phrasebank"][:2] + task_queries["law_overruling"][:2]
            for m in ("slm", "finance_phrasebank", "law_overruling", "base")]
    backend.rows_per_step.clear()
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: chat(client, *j), jobs))
    assert max(backend.rows_per_step) > 1, backend.rows_per_step  # they really shared decode steps
    alone = [chat(client, *j) for j in jobs]
    for (model, _), a, b in zip(jobs, together, alone):
        assert a["choices"][0]["message"] == b["choices"][0]["message"], model
        assert a["usage"] == b["usage"]
        assert_same_route(a["slm_route"], b["slm_route"])
    slm_rows = [r for (m, _), r in zip(jobs, together) if m == "slm"]
    assert [r["slm_route"]["task"] for r in slm_rows] == ["finance_phrasebank"] * 2 + ["law_overruling"] * 2
    assert all(r["slm_route"] is None for (m, _), r in zip(jobs, together) if m == "base")
    texts = {m: [r["choices"][0]["message"]["content"] for (mm, _), r in zip(jobs, together) if mm == m]
             for m in ("finance_phrasebank", "law_overruling", "base")}
    assert len({tuple(t) for t in texts.values()}) > 1  # the increments change what is generated


def test_exact_per_query_jare_matches_pipeline(hf_server, task_queries):
    """A served row equals RunPipeline.generate with that query's own routing (the exact path)."""
    client, backend = hf_server
    q = task_queries["law_overruling"][1]
    served = chat(client, "slm", q, max_tokens=5)
    pipe = backend.pipe
    prompt = pipe.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                add_generation_prompt=True)
    route = backend.route([q], "slm")[0]
    gen = pipe.generate([prompt], [route.decision], 5)[0]
    assert served["choices"][0]["message"]["content"] == pipe.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    assert served["usage"]["completion_tokens"] == len(gen.token_ids)


def test_streaming_equals_non_streaming(hf_server, task_queries):
    client, _ = hf_server
    q = task_queries["finance_phrasebank"][2]
    full = client.post("/v1/completions", json={"model": "slm", "prompt": q, "max_tokens": 7, "temperature": 0}).json()
    chunks = []
    with client.stream("POST", "/v1/completions", json={"model": "slm", "prompt": q, "max_tokens": 7, "temperature": 0,
                                                         "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    *chunks, usage = [json.loads(line[6:]) for line in lines[:-1]]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[0]["slm_route"] == full["slm_route"] and chunks[0]["object"] == "text_completion"


def test_openai_client_completions_chat_and_streaming(hf_server, task_queries):
    import openai

    client, _ = hf_server
    oa = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key=KEY)
    q = task_queries["law_overruling"][0]
    assert {m.id for m in oa.models.list()} >= {"slm", "base", "law_overruling"}
    c = oa.completions.create(model="slm", prompt=q, max_tokens=4, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length") and c.model_extra["slm_route"]["task"] == "law_overruling"
    ch = oa.chat.completions.create(model="law_overruling", messages=[{"role": "user", "content": q}],
                                    max_tokens=4, temperature=0)
    assert ch.choices[0].message.role == "assistant" and ch.usage.completion_tokens >= 1
    stream = oa.chat.completions.create(model="law_overruling", messages=[{"role": "user", "content": q}],
                                        max_tokens=4, temperature=0, stream=True)
    text = "".join(ev.choices[0].delta.content or "" for ev in stream)
    assert text == ch.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="nope", prompt=q, max_tokens=2)


@pytest.mark.parametrize("body,status,param,code", [
    ({"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"model": "slm", "prompt": "word " * 300, "max_tokens": 2}, 400, "prompt", "context_length_exceeded"),
    ({"model": "slm", "prompt": "word " * 200, "max_tokens": 60}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": "slm", "prompt": "x", "max_tokens": 65}, 400, "max_tokens", "max_tokens_exceeded"),
    ({"model": "slm", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_parameter"),
    ({"model": "slm", "prompt": "x", "temperature": 3}, 400, "temperature", "invalid_parameter"),
    ({"model": "slm", "prompt": "x", "n": 2}, 400, "n", "invalid_parameter"),
    ({"model": "slm", "prompt": "x", "max_tokenz": 2}, 400, "max_tokenz", "invalid_parameter"),
    ({"model": "slm"}, 400, "prompt", "invalid_parameter"),
    ({"model": "slm", "prompt": "x" * 30000}, 413, None, "request_too_large"),
])
def test_validation_errors_are_openai_shaped_4xx(hf_server, body, status, param, code):
    client, _ = hf_server
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code


def test_bad_json_chat_without_user_and_auth(hf_server):
    client, _ = hf_server
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/chat/completions", json={"model": "slm", "messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    bare = httpx.Client(base_url=client.base_url, timeout=30)
    assert bare.get("/health").status_code == 200  # liveness needs no key
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = bare.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_adapter_for_another_base_model_is_refused(hf_server, served_run, tmp_path):
    client, _ = hf_server
    foreign = tmp_path / "foreign"
    shutil.copytree(served_run / "tasks" / "0-finance_phrasebank" / "adapter", foreign)
    meta = json.loads((foreign / "slm_adapter.json").read_text())
    (foreign / "slm_adapter.json").write_text(json.dumps({**meta, "base_model": "smollm2-135m-instruct"}))
    r = client.post("/v1/admin/load_adapter", json={"lora_name": "x", "lora_path": str(foreign)})
    assert r.status_code == 400
    assert "exported for base model 'smollm2-135m-instruct'" in r.json()["error"]["message"]


def test_hot_add_a_task_finished_after_start(served_run, task_queries, tmp_path, hf_server):
    from slm_llm.serve.app import build_app
    from slm_llm.serve.server import ServerThread, load_backend

    finish = make_partial_run(served_run, tmp_path / "run")
    backend, cfg = load_backend(tmp_path / "run", "hf")
    q = task_queries["law_overruling"][0]
    with ServerThread(build_app(backend, cfg.serve)) as url, httpx.Client(base_url=url, timeout=300) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["slm", "base", "finance_phrasebank"]
        assert c.post("/v1/chat/completions", json={"model": "law_overruling", "messages": [
            {"role": "user", "content": q}]}).status_code == 404
        assert c.post("/v1/admin/reload").json()["added"] == []
        finish()  # the training run finishes law_overruling while the server runs
        r = c.post("/v1/admin/reload").json()
        assert r["added"] == ["law_overruling"] and r["tasks"] == ["finance_phrasebank", "law_overruling"]
        hot = chat(c, "law_overruling", q)
        routed = chat(c, "slm", q)
    full_client, _ = hf_server
    assert hot["choices"][0]["message"] == chat(full_client, "law_overruling", q)["choices"][0]["message"]
    assert routed["slm_route"]["task"] == "law_overruling"


def test_a_client_that_disconnects_mid_stream_leaves_the_batch(hf_server, task_queries):
    """Decode steps are paused after the first token while the client goes away: the row must
    leave at the next step, long before its max_tokens."""
    import threading
    import time

    client, backend = hf_server
    gate, step = threading.Event(), backend.batch.step
    backend.batch.step = lambda *a, **kw: gate.wait() and step(*a, **kw)
    body = {"model": "slm", "prompt": task_queries["law_overruling"][0], "max_tokens": 64, "temperature": 0,
            "stream": True}
    try:
        with client.stream("POST", "/v1/completions", json=body) as r:
            next(line for line in r.iter_lines() if line)  # the first token, from the prefill
            (row,) = backend.batch.rows
        deadline = time.monotonic() + 30  # the response is closed: the server closes the stream
        while not row.job.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert row.job.cancelled
    finally:
        backend.batch.step = step
        gate.set()
    while backend.batch.rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not backend.batch.rows and len(row.tokens) < 3
