"""Serving benchmark: decode speed of exact JARe, router overhead, and the hf server under streaming load.

    python bench/serve.py                                  # everything, SmolLM2-135M fp32 on CPU
    python bench/serve.py --decode-only --targets all      # increments on all seven projections
    python bench/serve.py --http-only --clients 1,16,64 --duration 60
    python bench/serve.py --decode-only --device cuda model.dtype=bfloat16   # on a GPU (bench/gpu_check.sh)

1. Decode tokens/s, KV-cached greedy generation, a batch whose rows all use different
   slots (4 tasks x P=4 random nonzero slots of rank 8 on --targets, default o_proj, K=2):
     base    the model with no JARe layers                     (goal: JARe >= 0.9x)
     jare    JareModel, per-row low-rank slots (never a dense ΔW)
     dense   the seed's path re-implemented: per row, F.linear(x, W + Σ_k w_k B_k A_k)
             every step                                         (goal: JARe >= 3x)
2. Router overhead: encoder + DTKR routing of the batch's queries as a share of the
   batch's generation time (goal <= 5%).
3. HTTP: ``slm-llm serve --backend hf`` in its own process over a synthetic run folder (the
   same random slots, a router whose keys sit around 4 task queries), and N closed-loop
   streaming clients in this process. Each client sends /v1/completions with stream=true,
   max_tokens drawn from 8..256 and ignore_eos (so it gets them all), temperature 0. For
   each N in --clients, ``slm`` and ``base`` are measured in turn on the same server (after
   --warmup s, for --duration s each): throughput, time to first token and total latency
   (p50/p99), errors. The server is the code on PYTHONPATH, so the same command measures
   another checkout (e.g. the old micro-batcher, with --eos).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slm_llm.config import load_config  # noqa: E402
from slm_llm.jare import JareModel  # noqa: E402
from slm_llm.models import load_base_model, model_id  # noqa: E402

N_TASKS = 4
ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
MAX_TOKENS = (8, 16, 32, 64, 128, 256)
MIN_REQUESTS = 8  # HTTP: requests started in a window, at least (a single client is slow)
QUERIES = ["What is the sentiment of this financial news: profits rose 12% in the third quarter.",
           "Does this sentence overrule a previous case? The court expressly overrules Smith v. Jones.",
           "Summarise the following paragraph about climate policy in one sentence.",
           "Translate to French: the meeting is postponed until next Monday."]


def jare_model(cfg):
    base, tok = load_base_model(cfg.model)
    model = JareModel(base, cfg.jare)
    torch.manual_seed(0)
    for t in range(N_TASKS):
        model.add_task(f"task{t}")
        with torch.no_grad():
            for p in model.task_parameters(f"task{t}"):
                p.normal_(0, 0.02)
    model.freeze_all()
    return model.eval(), tok


def dense_forward(self, x):
    """The seed's dense-ΔW path: each row materialises W + scale Σ_k w_k B_k A_k, every step."""
    if self.routing is None:
        return self.base(x)
    A_all = torch.cat([getattr(self, f"A_{i}") for i in range(len(self.task_names))])
    B_all = torch.cat([getattr(self, f"B_{i}") for i in range(len(self.task_names))])
    rows = []
    for b in range(x.shape[0]):
        s, w = self.routing.slot_ids[b], self.routing.slot_weights[b].to(self.base.weight.dtype)
        delta = torch.einsum("k,kor,kri->oi", self.scale * w, B_all[s], A_all[s])  # [out, in]
        rows.append(F.linear(x[b], self.base.weight + delta, self.base.bias))
    return torch.stack(rows)


def routing(batch: int, P: int, K: int):
    """Row b uses two slots of task b % N_TASKS: every row differs from its neighbours."""
    ids = torch.tensor([[(b % N_TASKS) * P + k for k in range(K)] for b in range(batch)])
    return ids, torch.full((batch, K), 1.0 / K)


def decode_tps(model, tok, batch: int, new_tokens: int, slot_ids=None, slot_weights=None, clock=time.perf_counter):
    device = next(model.parameters()).device
    prompts = [QUERIES[b % len(QUERIES)] for b in range(batch)]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = clock()
    with torch.no_grad():
        if slot_ids is None:
            model.generate(**enc, **kw)
        else:
            model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], slot_ids=slot_ids.to(device),
                           slot_weights=slot_weights.to(device), **kw)
    sync()
    return batch * new_tokens / (clock() - t0)


def decode_section(cfg, a) -> JareModel:
    plain, tok = load_base_model(cfg.model)
    plain.to(a.device)
    model, tok = jare_model(cfg)
    model.to(a.device)
    ids, w = routing(a.batch, cfg.jare.slots_per_task, cfg.jare.top_k)
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    decode_tps(plain.eval(), tok, a.batch, 2)  # untimed warm-up of both: first calls pay for allocator and
    decode_tps(model, tok, a.batch, 2, ids, w)  # kernel set-up (on a GPU, more than a whole timed run)
    base_tps = jare_tps = 0.0
    for _ in range(a.reps):  # interleaved, best of --reps: a busy machine slows whichever runs during the load
        base_tps = max(base_tps, decode_tps(plain.eval(), tok, a.batch, a.new_tokens, clock=clock))
        jare_tps = max(jare_tps, decode_tps(model, tok, a.batch, a.new_tokens, ids, w, clock=clock))
    del plain
    print(f"\n## decode tokens/s (KV cache, greedy, every row its own slots; {a.clock} clock)")
    print(f"base (no increments)   {base_tps:8.1f}")
    print(f"exact JARe             {jare_tps:8.1f}   = {jare_tps / base_tps:.2f}x base   (goal >= 0.9x)")
    if a.no_dense:
        return model
    for layer in model.jare_layers():
        layer.forward = types.MethodType(dense_forward, layer)
    dense_tps = decode_tps(model, tok, a.batch, a.new_tokens, ids, w, clock=clock)
    for layer in model.jare_layers():
        del layer.forward  # back to the class's exact low-rank forward
    print(f"seed dense-ΔW path     {dense_tps:8.1f}   JARe = {jare_tps / dense_tps:.1f}x dense (goal >= 3x)")
    return model


def write_run(cfg, root: Path, model: JareModel) -> Path:
    """A run folder any ``slm-llm serve`` can load: ``model``'s tasks as finished increments and
    a router whose task t keys sit around QUERIES[t] (no training), calibrated on 16 variants of it."""
    from slm_llm.dtkr import Router
    from slm_llm.dtkr.encoder import build_encoder
    from slm_llm.run import RunDir

    encoder = build_encoder(cfg, cache=False)
    emb = encoder.encode(QUERIES)  # [4, D]: task t's keys sit around query t
    router = Router(encoder.dim, cfg.dtkr, cfg.jare, encoder_id=encoder.id)
    rng = np.random.default_rng(0)
    P, G = cfg.jare.slots_per_task, cfg.dtkr.groups
    run = RunDir(root)
    run.init(cfg, model_id(cfg.model), encoder.id, list(model.tasks))
    for t, task in enumerate(model.tasks):
        keys = emb[t][None] + 0.05 * rng.normal(size=(P, encoder.dim)).astype(np.float32)
        train_emb = encoder.encode([QUERIES[t] + f" (request {i})" for i in range(16)])
        router.add_task(task, torch.from_numpy(keys.reshape(P, G, -1)), train_emb=train_emb)
        run.task_dir(task).mkdir(parents=True, exist_ok=True)
        model.save_task(task, run.task_dir(task) / "increments.safetensors")
        run.mark_task_done(task, {})
    router.save(run.router_dir)
    return root


def router_share(root: Path, batch: int, new_tokens: int) -> tuple[float, float, float]:
    from slm_llm.data import Record
    from slm_llm.pipeline import RunPipeline

    pipe = RunPipeline.load(root)
    texts = [QUERIES[b % len(QUERIES)] + f" (request {b})" for b in range(batch)]
    records = [Record(instruction=t, input="", output="", task="") for t in texts]
    pipe.route(records[:1])  # load the encoder
    t0 = time.perf_counter()
    decisions = pipe.route(records)
    t_route = time.perf_counter() - t0
    prompts = pipe.prompts(records)
    t0 = time.perf_counter()
    pipe.generate(prompts, decisions, new_tokens, batch_size=batch, min_new_tokens=new_tokens)
    t_gen = time.perf_counter() - t0
    return t_route, t_gen, t_route / (t_route + t_gen)


# ---- HTTP load ---------------------------------------------------------------------------------
def start_server(root: Path, max_rows: int, log_path: Path, threads: int | None, overrides: list[str]):
    """``slm-llm serve`` over ``root`` in its own process (the code on PYTHONPATH); returns (process, url)."""
    import httpx

    from slm_llm.utils.env import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "slm_llm.cli", "serve", "--run", str(root), "--backend", "hf", "--port", str(port),
           f"serve.max_batch_size={max_rows}", "serve.max_tokens_limit=256", *overrides]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise TimeoutError("the server did not start in 900 s")


async def load_phase(url: str, model: str, clients: int, warmup: float, duration: float, seed: int,
                     ignore_eos: bool) -> dict:
    """``clients`` closed-loop streaming clients: ``warmup`` s, then a window of ``duration`` s (longer,
    up to 3x, until MIN_REQUESTS requests started in it), then up to ``duration`` s more for the
    requests in flight, which are then dropped. Throughput counts the tokens that arrived in the
    window; time to first token covers the requests started in it; latency those that also finished."""
    import httpx

    t0 = time.perf_counter() + warmup
    t1 = t0 + duration
    records = []  # dict(start, first, end, chunks=[times], tokens, done, error)

    def open_window() -> bool:
        nonlocal t1
        now = time.perf_counter()
        if now >= t1 and sum(r["start"] >= t0 for r in records) < MIN_REQUESTS and now < t0 + 3 * duration:
            t1 = now + 1.0  # a slow single client: keep the window open for more requests
        return now < t1

    async def one(http: httpx.AsyncClient, body: dict, rec: dict) -> None:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    rec["done"] = rec["error"] is None
                    rec["tokens"] = rec["tokens"] or len(rec["chunks"])  # a server without include_usage
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        rec["error"] = event["error"]["message"]
                    elif event.get("usage"):
                        rec["tokens"] = event["usage"]["completion_tokens"]
                    else:
                        rec["chunks"].append(time.perf_counter())

    async def client_loop(k: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + k)
        i = 0
        while open_window():
            body = {"model": model, "prompt": QUERIES[(k + i) % len(QUERIES)] + f" (client {k}, request {i})",
                    "max_tokens": rng.choice(MAX_TOKENS), "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            if ignore_eos:
                body["ignore_eos"] = True
            rec = {"start": time.perf_counter(), "chunks": [], "tokens": 0, "done": False, "error": None}
            records.append(rec)
            try:
                await one(http, body, rec)
            except httpx.HTTPError as e:
                rec["error"] = repr(e)
            rec["end"] = time.perf_counter()
            i += 1

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        tasks = [asyncio.create_task(client_loop(k, http)) for k in range(clients)]
        while any(not t.done() for t in tasks) and time.perf_counter() < t1 + duration:
            await asyncio.wait(tasks, timeout=1.0)
        for t in tasks:  # still in flight: the clients leave, the server drops their rows
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def arrived(rec):  # [(time, tokens)] per chunk; a finished request spreads its tokens over its chunks
        n = len(rec["chunks"])
        per = rec["tokens"] / n if rec["done"] and n else 1.0
        return [(t, per) for t in rec["chunks"]]

    window = [r for r in records if t0 <= r["start"] < t1]
    ttft = [r["chunks"][0] - r["start"] for r in window if r["chunks"]]
    latency = [r["end"] - r["start"] for r in window if r["done"]]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    errors = [r["error"] for r in records if r["error"]]
    return {"requests": len(window), "errors": len(errors), "first_error": errors[0] if errors else None,
            "tok_s": sum(n for r in records for t, n in arrived(r) if t0 <= t < t1) / (t1 - t0),
            "req_s": sum(r["done"] and t0 <= r["end"] < t1 for r in records) / (t1 - t0),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "lat_p50": pct(latency, 50),
            "lat_p99": pct(latency, 99), "mean_tokens": statistics.mean([r["tokens"] for r in window if r["done"]] or [0])}


def http_section(root: Path, a) -> None:
    levels = [int(c) for c in a.clients.split(",")]
    log_path = root.parent / "server.log"
    proc, url = start_server(root, max(levels), log_path, a.server_threads, a.serve)
    print(f"\n## HTTP: slm-llm serve --backend hf (own process, serve.max_batch_size={max(levels)} "
          f"{' '.join(a.serve)}), streaming "
          f"clients, max_tokens from {MAX_TOKENS}{'' if a.eos else ' (ignore_eos)'}, warm-up {a.warmup:.0f} s + "
          f"{a.duration:.0f} s per phase; load average {os.getloadavg()[0]:.1f}")
    print("clients model   tok/s   req/s  TTFT p50  TTFT p99  latency p50  latency p99  tokens/req  errors"
          "  (latency: finished requests)")
    results = {}
    try:
        for n in levels:
            for model in a.models.split(","):
                r = asyncio.run(load_phase(url, model, n, a.warmup, a.duration, seed=n, ignore_eos=not a.eos))
                results[n, model] = r
                print(f"{n:7d} {model:5s} {r['tok_s']:7.1f} {r['req_s']:7.2f} {r['ttft_p50']:8.3f}s {r['ttft_p99']:8.3f}s "
                      f"{r['lat_p50']:10.2f}s {r['lat_p99']:11.2f}s {r['mean_tokens']:10.1f} {r['errors']:7d}"
                      + (f"  first error: {r['first_error']}" if r["errors"] else ""), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    print("\n## ratios")
    single = results.get((1, "slm"))
    for n in levels:
        s, b = results.get((n, "slm")), results.get((n, "base"))
        if s is None:
            continue
        line = f"{n:3d} clients:" + (f" slm/base throughput {s['tok_s'] / b['tok_s']:.2f}x (goal >= 0.8x);" if b else "")
        if single and n > 1:
            line += (f" slm TTFT p50 = {s['ttft_p50'] / single['ttft_p50']:.2f}x the 1-client TTFT (goal <= 3x),"
                     f" p99/p50 = {s['ttft_p99'] / s['ttft_p50']:.2f} (goal <= 2)")
        print(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.tiny_hidden_size=256 (with --model tiny-llama)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="decode: interleaved base/JARe repetitions, best kept")
    ap.add_argument("--threads", type=int, help="decode: torch threads (default: torch's, one per core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="decode: wall time, or this thread's CPU time (with --threads 1: a busy machine's other "
                         "processes do not count)")
    ap.add_argument("--no-dense", action="store_true", help="decode: skip the dense-ΔW reference (slow at large batches)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="decode: where the models run (cuda: pass model.dtype=bfloat16 for the GPU's own precision)")
    ap.add_argument("--targets", default="o_proj", help=f"comma-separated JARe target modules, or all ({ALL_TARGETS})")
    ap.add_argument("--clients", default="1,16,64", help="HTTP: concurrent streaming clients, one level after another")
    ap.add_argument("--models", default="slm,base", help="HTTP: the models measured at each level, in turn")
    ap.add_argument("--duration", type=float, default=30, help="HTTP: measured seconds per (clients, model) phase")
    ap.add_argument("--warmup", type=float, default=10, help="HTTP: seconds before each phase's window")
    ap.add_argument("--run", help="HTTP: serve this synthetic run folder (written here if missing)")
    ap.add_argument("--server-threads", type=int, help="HTTP: torch threads of the server (default: one per core)")
    ap.add_argument("--serve", action="append", default=[], metavar="KEY=VALUE",
                    help="HTTP: a serve.* override for the server, e.g. serve.step_chunk_rows=16 (repeatable)")
    ap.add_argument("--eos", action="store_true", help="HTTP: let the stop token end a request early (servers "
                    "without vLLM's ignore_eos, e.g. the old micro-batcher); default: every request runs to max_tokens")
    part = ap.add_mutually_exclusive_group()
    part.add_argument("--decode-only", action="store_true", help="only the decode section")
    part.add_argument("--http-only", action="store_true", help="only the HTTP section")
    a = ap.parse_args()
    targets = ALL_TARGETS if a.targets == "all" else a.targets
    if a.device == "cuda" and not (a.decode_only and torch.cuda.is_available()):
        ap.error("--device cuda needs --decode-only and a CUDA device visible to torch")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(None, [f"model.name={a.model}", "jare.rank=8", "jare.slots_per_task=4", "jare.top_k=2",
                             f"jare.targets=[{targets}]", *a.overrides])
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu threads={torch.get_num_threads()}"
    print(f"# bench/serve.py  model={model_id(cfg.model)} {cfg.model.dtype} {where} batch={a.batch} "
          f"new_tokens={a.new_tokens} targets={','.join(cfg.jare.targets)}")
    model = decode_section(cfg, a) if not a.http_only else jare_model(cfg)[0]
    if a.decode_only:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.run or Path(tmp) / "run")
        if not (root / "manifest.json").exists():
            write_run(cfg, root, model)
        del model
        if not a.http_only:
            t_route, t_gen, share = router_share(root, a.batch, a.new_tokens)
            print("\n## router overhead (encoder + DTKR for the batch's queries)")
            print(f"route {t_route * 1e3:.1f} ms, generate {t_gen * 1e3:.0f} ms -> {share * 100:.2f}% (goal <= 5%)")
        http_section(root, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
