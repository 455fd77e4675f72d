"""The CUDA paths, on a CUDA device (skipped without one): JARe in fp32 and bf16, continuous
batching, the base-model encoder, FAISS on the GPU, and real DeepSpeed ZeRO-2/3 (and ZeRO-3
with offload) under the `deepspeed` launcher, which must pick NCCL.

    pytest -m gpu tests/test_gpu.py                      # on a CUDA machine (bench/gpu_check.sh)
    SLM_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py  # the same tests on the CPU: a dry run
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slm_llm.config import ModelConfig
from slm_llm.serve.decode import DecodeBatch
from test_jare import all7_model, merged_copy
from test_serve_decode import STOP, Tok, alone, requests

DEVICE = os.environ.get("SLM_TEST_DEVICE", "cuda")
REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="no CUDA device (SLM_TEST_DEVICE=cpu runs these on the CPU)")]
ROWS = [([0, 1], [0.7, 0.3]), ([2, 5], [0.5, 0.5]), None, ([4, 4], [0.6, 0.4])]  # tasks mixed, a base row, a repeat


def routed_logits(model, dtype):
    s = torch.tensor([r[0] if r else [0, 0] for r in ROWS], device=DEVICE)
    w = torch.tensor([r[1] if r else [0.0, 0.0] for r in ROWS], device=DEVICE, dtype=dtype)
    ids = torch.randint(0, 128, (len(ROWS), 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ids, model(ids.to(DEVICE), slot_ids=s, slot_weights=w).float().cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_jare_on_the_device_equals_each_rows_merged_model(dtype):
    """All seven projections, packed: fp32 within 1e-4 of the dense formula on the CPU; bf16 within 5%
    (relative norm; the same rows with the wrong slots, or none, are ~100% off)."""
    model = all7_model()
    refs = [merged_copy(model, *(r or (None, None))) for r in ROWS]  # fp32, on the CPU
    ids, out = routed_logits(model.to(DEVICE, dtype), dtype)
    assert model.model.model.layers[0].self_attn.q_proj.pack.weight.device.type == DEVICE
    for b, ref in enumerate(refs):
        want = ref(input_ids=ids[b:b + 1]).logits[0]
        if dtype == torch.float32:
            torch.testing.assert_close(out[b], want, atol=1e-4, rtol=1e-4)
        else:
            assert ((out[b] - want).norm() / want.norm()).item() < 0.05


def test_continuous_batching_on_the_device_equals_each_row_alone():
    """Rows join and leave a running decode batch on the device; each equals its own generate()."""
    model = all7_model().to(DEVICE)
    batch = DecodeBatch(model, Tok(), [STOP], max_rows=4, max_len=64)
    rows = requests(10)
    pending = list(rows)
    while pending or batch.rows:
        k = min(2, 4 - len(batch.rows), len(pending))
        if k:
            batch.admit(pending[:k])
            del pending[:k]
        batch.step(chunk_rows=2)
    assert batch.cache.layers[0].keys is None  # idle: the device memory is released
    for row in rows:
        assert row.tokens == alone(model, row)


def test_base_model_encoder_on_the_device_matches_the_cpu():
    from slm_llm.dtkr.llm_encoder import HiddenStateEncoder

    texts = ["Is this headline good news for investors?", "Does this ruling overturn precedent?", "hi"]
    encoder = HiddenStateEncoder(ModelConfig(name="tiny-llama"), layer=2)
    on_device = encoder.encode(texts)
    assert next(encoder._model.parameters()).device.type == DEVICE  # placed as RunPipeline places the model
    encoder._model.cpu()
    on_cpu = encoder.encode(texts)
    cos = (on_device * on_cpu).sum(1) / np.linalg.norm(on_device, axis=1) / np.linalg.norm(on_cpu, axis=1)
    assert cos.min() > 0.9999


def test_faiss_gpu_index_matches_the_cpu_index_or_refuses_clearly():
    if DEVICE != "cuda":
        pytest.skip("a GPU FAISS index needs a CUDA device")
    import faiss

    from slm_llm.dtkr.index import DtkrIndexError, SlotIndex

    keys = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
    queries = np.random.default_rng(1).normal(size=(5, 48)).astype(np.float32)
    if not hasattr(faiss, "StandardGpuResources"):
        with pytest.raises(DtkrIndexError, match="faiss-gpu"):
            SlotIndex(48, 4, kind="flat", device="cuda")
        return
    indexes = [SlotIndex(48, 4, kind="flat", device=d) for d in ("cpu", "cuda")]
    results = []
    for index in indexes:
        index.add(keys)
        results.append(index.search(queries, 8))
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)


@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_launcher_trains_two_tasks_on_the_device(tmp_path, stage):
    """`deepspeed launch/train.py` in bf16: NCCL on a GPU, both tasks' loss falls, increments finite."""
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": DEVICE, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    port = str(29500 + os.getpid() % 400)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", port,
           "launch/train.py", "--config", "configs/tiny.yaml", f"run_dir={run}", f"train.deepspeed=ds_configs/{stage}.json",
           "train.precision=bf16", "dtkr.encoder=base", "dtkr.encoder_layer=1", "dtkr.groups=4",
           "data.max_train_samples=64", f"eval.during_training={str(stage == 'zero2').lower()}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "done"
    for n, task in enumerate(m["order"]):
        env_of_task = m["tasks"][task]["trained_on"]
        assert env_of_task["precision"] == "bf16" and env_of_task["world_size"] == 1
        assert env_of_task["backend"] == ("nccl" if DEVICE == "cuda" else "gloo")
        assert (env_of_task["device"] == "cpu") == (DEVICE == "cpu")
        tdir = run / "tasks" / f"{n}-{task}"
        loss = [json.loads(line)["loss"] for line in (tdir / "train_log.jsonl").read_text().splitlines()]
        assert np.mean(loss[-4:]) < np.mean(loss[:4]), loss
        tensors = load_file(tdir / "increments.safetensors")
        assert all(torch.isfinite(t.float()).all() for t in tensors.values())
        assert max(t.abs().max().item() for k, t in tensors.items() if k.endswith(".B")) > 0  # B left its zero init
    if stage == "zero2":  # the stage-wise evaluation ran on the device too
        assert json.loads((run / "eval" / "matrix.json").read_text()) and "eval stage 1" in out.stdout + out.stderr
