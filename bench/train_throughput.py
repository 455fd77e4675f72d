"""Training throughput: our JARe step (DeepSpeed engine) against a plain HF-PEFT LoRA loop.

Same model, samples and trainable-parameter count (JARe: P slots of rank r on o_proj;
LoRA: rank P*r on o_proj). JARe runs twice: on the baseline's batches, and on the
length-grouped micro-batches the slm_llm loop makes of the same global batches.
Prints tokens/s for each, the speed-up, and each one's MFU:
the FLOPs the step needs (4 x body params per token, 4 x head params per loss token,
6 x trainable params per token) over the measured fp32 matmul peak of this machine.

    .venv/bin/python bench/train_throughput.py [--model smollm2-135m-instruct] [--steps 6]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from slm_llm.config import load_config
from slm_llm.data import Collator, load_suite, load_task_split, tokenize_example
from slm_llm.jare import JareModel
from slm_llm.models import load_base_model, load_tokenizer
from slm_llm.train.distributed import init_distributed
from slm_llm.train.engine import build_engine, load_ds_config
from slm_llm.train.loop import global_micro_batches


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def batches(cfg, tokenizer, n_batches: int, mb: int, grouped: bool):
    """The same samples in the same global batches of 4 micro-batches; ``grouped`` sorts each
    global batch by length before cutting it, as the slm_llm loop does."""
    suite = load_suite("instruct6")
    records = []
    for task in ("finance_phrasebank", "medical_medmcqa", "science_arc_easy", "code_codealpaca"):
        records += load_task_split(suite, task, "train", None, n_batches * mb, 0)
    examples = [tokenize_example(r, tokenizer, cfg.data.template, cfg.data.max_length, "middle") for r in records]
    train = load_config(None, [f"train.micro_batch_size={mb}", "train.grad_accum=4"]).train
    lengths = [len(e["input_ids"]) for e in examples] if grouped else None
    micro = global_micro_batches(len(examples), train, world=1, rank=0, epoch=0, lengths=lengths)[:n_batches]
    collate = Collator(tokenizer.pad_token_id)
    return [collate([examples[i] for i in ids]) for ids in micro]


def needed_flops(model, trainable: int, batch) -> float:
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    untied_head = 0 if head is emb else head.numel()
    body = sum(p.numel() for p in model.parameters()) - emb.numel() - untied_head - trainable  # embedding: a lookup
    head = head.numel()
    tokens = int(batch["attention_mask"].sum())
    loss_tokens = int((batch["labels"][:, 1:] != -100).sum())
    return 4 * body * tokens + 4 * head * loss_tokens + 6 * trainable * tokens


def run_jare(cfg, data, warmup: int):
    base, _ = load_base_model(cfg.model)
    model = JareModel(base, cfg.jare)
    torch.manual_seed(0)
    model.add_task("bench")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = build_engine(model, cfg.train, load_ds_config(cfg.train.deepspeed, cfg.train, 1), len(data))
    P, K = cfg.jare.slots_per_task, cfg.jare.top_k
    return _timed(data, warmup, trainable, base, lambda b: _jare_step(engine, b, P, K))


def _jare_step(engine, b, P, K):
    n = b["input_ids"].shape[0]
    slots = torch.arange(K).repeat(n, 1) % P
    loss = engine(**b, slot_ids=slots, slot_weights=torch.full((n, K), 1.0 / K))
    engine.backward(loss)
    engine.step()


def run_peft(cfg, data, warmup: int):
    from peft import LoraConfig, get_peft_model

    base, _ = load_base_model(cfg.model)
    r = cfg.jare.rank * cfg.jare.slots_per_task
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=cfg.jare.targets))
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)

    def step(b):
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(data, warmup, trainable, base, step)


def _timed(data, warmup, trainable, base, step):
    for b in data[:warmup]:
        step(b)
    tokens, flops = 0, 0.0
    t = time.perf_counter()
    for b in data[warmup:]:
        step(b)
        tokens += int(b["attention_mask"].sum())
        flops += needed_flops(base, trainable, b)
    dt = time.perf_counter() - t
    return {"tok_s": tokens / dt, "flop_s": flops / dt, "trainable": trainable, "seconds": dt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    init_distributed()
    cfg = load_config(None, [f"model.name={args.model}", f"data.max_length={args.max_length}",
                             f"train.micro_batch_size={args.micro_batch}", "train.deepspeed=ds_configs/zero2.json"])
    tokenizer = load_tokenizer(cfg.model)
    n = args.warmup + args.steps
    plain = batches(cfg, tokenizer, n, args.micro_batch, grouped=False)
    grouped = batches(cfg, tokenizer, n, args.micro_batch, grouped=True)
    peak = matmul_peak()
    peft = run_peft(cfg, plain, args.warmup)
    ours_plain = run_jare(cfg, plain, args.warmup)
    ours = run_jare(cfg, grouped, args.warmup)
    peak = max(peak, matmul_peak())
    print(f"model {args.model}, micro-batch {args.micro_batch} x <= {args.max_length} tokens, {args.steps} timed steps, "
          f"threads {torch.get_num_threads()}")
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'step':<24}{'trainable':>12}{'tok/s':>10}{'GFLOP/s':>10}{'MFU':>8}")
    for name, r in (("HF-PEFT LoRA (torch)", peft), ("JARe, same batches", ours_plain),
                    ("JARe, length-grouped", ours)):
        print(f"{name:<24}{r['trainable']:>12,}{r['tok_s']:>10.1f}{r['flop_s'] / 1e9:>10.1f}{r['flop_s'] / peak:>8.1%}")
    print(f"speed-up over HF-PEFT (tok/s ratio): same batches {ours_plain['tok_s'] / peft['tok_s']:.2f}x, "
          f"length-grouped {ours['tok_s'] / peft['tok_s']:.2f}x;  MFU ours: {ours['flop_s'] / peak:.1%}")


if __name__ == "__main__":
    main()
