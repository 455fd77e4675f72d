"""Serving benchmark: decode speed of exact JARe, router overhead, HTTP throughput under 16 clients.

    python bench/serve.py                       # SmolLM2-135M (the packaged GGUF, converted once), fp32, CPU
    python bench/serve.py --batch 8 --new-tokens 32 --requests-per-client 4
    python bench/serve.py --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --decode-only

1. Decode tokens/s, KV-cached greedy generation, a batch whose rows all use different
   slots (4 tasks x P=4 random nonzero slots of rank 8 on --targets, default o_proj, K=2):
     base    the model with no JARe layers                     (goal: JARe >= 0.9x)
     jare    JareModel, per-row low-rank slots (never a dense ΔW)
     dense   the seed's path re-implemented: per row, F.linear(x, W + Σ_k w_k B_k A_k)
             every step                                         (goal: JARe >= 3x)
2. Router overhead: encoder + DTKR routing of the batch's queries as a share of the
   batch's generation time (goal <= 5%).
3. HTTP: the hf backend behind the real app on loopback, 16 concurrent clients; mixed
   (rows cycle over 4 tasks) vs single-task throughput and p50/p99 latency (goal >= 0.8x).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
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
        s, w = self.routing.slot_ids[b], self.routing.slot_weights[b]
        delta = torch.einsum("k,kor,kri->oi", self.scale * w, B_all[s], A_all[s])  # [out, in]
        rows.append(F.linear(x[b], self.base.weight + delta, self.base.bias))
    return torch.stack(rows)


def routing(batch: int, P: int, K: int):
    """Row b uses two slots of task b % N_TASKS: every row differs from its neighbours."""
    ids = torch.tensor([[(b % N_TASKS) * P + k for k in range(K)] for b in range(batch)])
    return ids, torch.full((batch, K), 1.0 / K)


def decode_tps(model, tok, batch: int, new_tokens: int, slot_ids=None, slot_weights=None, reps: int = 2) -> float:
    prompts = [QUERIES[b % len(QUERIES)] for b in range(batch)]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            if slot_ids is None:
                model.generate(**enc, **kw)
            else:
                model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], slot_ids=slot_ids,
                               slot_weights=slot_weights, **kw)
        best = max(best, batch * new_tokens / (time.perf_counter() - t0))
    return best


def synthetic_run(cfg, root: Path, model, tok):
    """A RunPipeline over the random-slot model with a router of random keys (no training)."""
    from slm_llm.dtkr import Router
    from slm_llm.dtkr.encoder import Encoder
    from slm_llm.pipeline import RunPipeline
    from slm_llm.run import RunDir

    encoder = Encoder(cfg.dtkr.encoder, cache=False)
    emb = encoder.encode(QUERIES)  # [4, D]: task t's keys sit around query t
    router = Router.from_config(encoder.dim, cfg.dtkr, cfg.jare.top_k, encoder_id=encoder.id)
    rng = np.random.default_rng(0)
    P, G = cfg.jare.slots_per_task, cfg.dtkr.groups
    for t in range(N_TASKS):
        keys = emb[t][None] + 0.05 * rng.normal(size=(P, encoder.dim)).astype(np.float32)
        router.add_task(f"task{t}", torch.from_numpy(keys.reshape(P, G, -1)))
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"base_model": model_id(cfg.model), "method": "slm",
                                                    "order": model.tasks, "status": "done", "tasks": {}}))
    return RunPipeline(cfg, RunDir(root), model, tok, router, encoder)


def router_share(pipe, batch: int, new_tokens: int) -> tuple[float, float, float]:
    from slm_llm.data import Record

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


def http_bench(pipe, cfg, clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    from slm_llm.serve.app import build_app
    from slm_llm.serve.hf_backend import HFBackend
    from slm_llm.serve.server import ServerThread

    backend = HFBackend(pipe, max_batch_size=clients, batch_wait_ms=cfg.serve.batch_wait_ms)
    out = {}
    with ServerThread(build_app(backend, cfg.serve)) as url, httpx.Client(base_url=url, timeout=600) as c:
        def one(i: int, mixed: bool) -> tuple[float, int]:
            model = f"task{i % N_TASKS}" if mixed else "task0"
            t0 = time.perf_counter()
            r = c.post("/v1/completions", json={"model": model, "prompt": QUERIES[i % len(QUERIES)] + f" #{i}",
                                                "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

        one(0, False)  # warm-up
        for mixed in (False, True):
            def client(k: int):
                return [one(k * per_client + j, mixed) for j in range(per_client)]

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = [x for xs in pool.map(client, range(clients)) for x in xs]
            wall = time.perf_counter() - t0
            lat = sorted(x[0] for x in results)
            out["mixed" if mixed else "single"] = {
                "tok_s": sum(x[1] for x in results) / wall, "req_s": len(results) / wall,
                "p50_s": statistics.median(lat), "p99_s": float(np.percentile(lat, 99)),
                "mean_batch": statistics.mean(backend.batch_sizes[-20:])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--http-max-tokens", type=int, default=16)
    ap.add_argument("--targets", default="o_proj", help="comma-separated JARe target modules")
    ap.add_argument("--decode-only", action="store_true", help="skip the router and HTTP sections")
    a = ap.parse_args()
    cfg = load_config(None, [f"model.name={a.model}", "jare.rank=8", "jare.slots_per_task=4", "jare.top_k=2",
                             f"jare.targets=[{a.targets}]"])
    print(f"# bench/serve.py  model={a.model} fp32 threads={torch.get_num_threads()} batch={a.batch} "
          f"new_tokens={a.new_tokens} targets={','.join(cfg.jare.targets)}")
    plain, tok = load_base_model(cfg.model)
    model, tok = jare_model(cfg)
    ids, w = routing(a.batch, cfg.jare.slots_per_task, cfg.jare.top_k)
    base_tps = jare_tps = 0.0
    for _ in range(3):  # interleaved, best of 3: a busy machine slows whichever runs during the load
        base_tps = max(base_tps, decode_tps(plain.eval(), tok, a.batch, a.new_tokens, reps=1))
        jare_tps = max(jare_tps, decode_tps(model, tok, a.batch, a.new_tokens, ids, w, reps=1))
    del plain
    for layer in model.jare_layers():
        layer.forward = types.MethodType(dense_forward, layer)
    dense_tps = decode_tps(model, tok, a.batch, a.new_tokens, ids, w, reps=1)
    for layer in model.jare_layers():
        del layer.forward  # back to the class's exact low-rank forward
    print("\n## decode tokens/s (KV cache, greedy, every row its own slots)")
    print(f"base (no increments)   {base_tps:8.1f}")
    print(f"exact JARe             {jare_tps:8.1f}   = {jare_tps / base_tps:.2f}x base   (goal >= 0.9x)")
    print(f"seed dense-ΔW path     {dense_tps:8.1f}   JARe = {jare_tps / dense_tps:.1f}x dense (goal >= 3x)")
    if a.decode_only:
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        pipe = synthetic_run(cfg, Path(tmp) / "run", model, tok)
        t_route, t_gen, share = router_share(pipe, a.batch, a.new_tokens)
        print("\n## router overhead (encoder + DTKR for the batch's queries)")
        print(f"route {t_route * 1e3:.1f} ms, generate {t_gen * 1e3:.0f} ms -> {share * 100:.2f}% (goal <= 5%)")
        h = http_bench(pipe, cfg, a.clients, a.requests_per_client, a.http_max_tokens)
    print(f"\n## HTTP, hf backend, {a.clients} concurrent clients x {a.requests_per_client} requests, "
          f"max_tokens={a.http_max_tokens}")
    for k in ("single", "mixed"):
        r = h[k]
        print(f"{k:7s} {r['tok_s']:7.1f} tok/s  {r['req_s']:.2f} req/s  p50 {r['p50_s']:.2f} s  p99 {r['p99_s']:.2f} s"
              f"  mean batch {r['mean_batch']:.1f}")
    print(f"mixed / single throughput = {h['mixed']['tok_s'] / h['single']['tok_s']:.2f}x (goal >= 0.8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
