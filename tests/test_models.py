"""Base models: tiny build, local folders, clear errors, checkpointing, 4-bit, and the GGUF conversion."""
import threading

import pytest
import torch

from slm_llm.config import ModelConfig
from slm_llm.models import ModelError, convert_gguf, load_base_model, load_tokenizer, model_id, packaged_gguf

TINY = ModelConfig(name="tiny-llama")


def _tiny_lm_loss(model, tokenizer, text="The capital of France is Paris."):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    return model(input_ids=ids, labels=ids).loss


def test_tiny_llama_shape_seed_and_cached_tokenizer(smol_tokenizer):
    from slm_llm.models.loader import _load_tokenizer_cached

    hits = _load_tokenizer_cached.cache_info().hits
    model, tok = load_base_model(TINY)
    assert _load_tokenizer_cached.cache_info().hits == hits + 1  # read once by the fixture, copied since
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == len(tok) == 49152
    assert all(not p.requires_grad for p in model.parameters())
    same, _ = load_base_model(TINY)
    other, _ = load_base_model(ModelConfig(name="tiny-llama", tiny_seed=1))
    w = model.model.layers[0].self_attn.o_proj.weight
    assert torch.equal(w, same.model.layers[0].self_attn.o_proj.weight)
    assert not torch.equal(w, other.model.layers[0].self_attn.o_proj.weight)
    assert torch.isfinite(_tiny_lm_loss(model, tok))


def test_model_ids():
    assert model_id(TINY) == "tiny-llama-h64-l2-a4-kv2-i128-s0"
    assert model_id(ModelConfig(name="tiny-llama", tiny_seed=3)).endswith("-s3")
    assert model_id(ModelConfig()) == "smollm2-135m-instruct"
    assert model_id(ModelConfig(name="org/some-model")) == "org/some-model"


def test_tokenizer_has_pad_and_right_padding(smol_tokenizer):
    tok = load_tokenizer(TINY)
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    tok.padding_side = "left"  # callers get their own copy
    assert load_tokenizer(TINY).padding_side == "right"


def test_local_folder_round_trip_and_dtype(tmp_path, smol_tokenizer):
    model, tok = load_base_model(TINY)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name=str(tmp_path / "m"))
    loaded, _ = load_base_model(cfg)
    assert model_id(cfg) == str((tmp_path / "m").resolve())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(model(ids).logits, loaded(ids).logits)
    half, _ = load_base_model(ModelConfig(name=str(tmp_path / "m"), dtype="bfloat16"))
    assert next(half.parameters()).dtype == torch.bfloat16


def test_folder_without_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no config\.json"):
        load_base_model(ModelConfig(name=str(tmp_path / "empty")))


def test_unknown_name_offline_says_what_was_tried():
    with pytest.raises(ModelError) as err:
        load_base_model(ModelConfig(name="no-such-model-xyz"))
    msg = str(err.value)
    assert "smollm2-135m-instruct" in msg and "tiny-llama" in msg
    assert "no-such-model-xyz does not exist" in msg and "HF_HUB_OFFLINE" in msg


def test_gradient_checkpointing_trains_an_added_parameter(smol_tokenizer):
    model, tok = load_base_model(ModelConfig(name="tiny-llama", gradient_checkpointing=True))
    assert model.is_gradient_checkpointing
    model.train()
    delta = _attach_low_rank(model)
    _tiny_lm_loss(model, tok).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta)
    assert all(p.grad is None for p in model.parameters())


def _attach_low_rank(model, rank=4):
    """A LoRA-like trainable increment on layer 0's o_proj, through a forward hook."""
    lin = model.model.layers[0].self_attn.o_proj
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(lin.in_features, rank, generator=gen) * 0.1)
    b = torch.nn.Parameter(torch.randn(rank, lin.out_features, generator=gen) * 0.1)
    lin.register_forward_hook(lambda mod, inp, out: out + (inp[0].float() @ a @ b).to(out.dtype))
    return a, b


def test_load_in_4bit_forward_and_backward(tmp_path, smol_tokenizer):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    model, tok = load_base_model(TINY)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    q, _ = load_base_model(ModelConfig(name=str(tmp_path / "m"), load_in_4bit=True))
    assert isinstance(q.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
    assert q.model.layers[0].self_attn.o_proj.weight.quant_state.quant_type == "nf4"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():  # an eval pass first, as between continual tasks
        cos = torch.nn.functional.cosine_similarity(model(ids).logits.flatten(), q(ids).logits.flatten(), dim=0)
    assert 0.95 < cos < 1.0  # close to the fp32 source, but quantised
    # Reference: an fp32 model holding exactly the dequantised 4-bit weights.
    ref, _ = load_base_model(ModelConfig(name=str(tmp_path / "m")))
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            ref.get_submodule(name).weight.data.copy_(dequantize_4bit(mod.weight.data, mod.weight.quant_state))
    delta, ref_delta = _attach_low_rank(q), _attach_low_rank(ref)
    loss, ref_loss = _tiny_lm_loss(q, tok), _tiny_lm_loss(ref, tok)
    assert torch.isfinite(loss) and torch.allclose(loss, ref_loss, atol=1e-5)
    loss.backward()
    ref_loss.backward()
    for p, r in zip(delta, ref_delta):  # gradients flow through the 4-bit layers, exactly
        assert p.grad.abs().sum() > 0 and torch.allclose(p.grad, r.grad, rtol=1e-3, atol=1e-6)
    tiny_q, _ = load_base_model(ModelConfig(name="tiny-llama", load_in_4bit=True))
    assert isinstance(tiny_q.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)


@pytest.mark.slow
def test_gguf_conversion_matches_the_gguf_greedy_tokens(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    gguf = packaged_gguf("smollm2-135m-instruct")
    out = convert_gguf(gguf, tmp_path / "smol")  # a fresh conversion, not the cached one
    try:
        files = {p.name for p in out.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "slm_convert.json"} <= files
        model, tok = load_base_model(ModelConfig(name=str(out)))
        assert "quantization_config" not in model.config.to_dict()
        assert sum(p.numel() for p in model.parameters()) == 134_515_008
        cached, _ = load_base_model(ModelConfig())  # the default name loads the cached conversion
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), cached.state_dict().values()))
        del cached
        reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        for prompt in ["The capital of France is", "def square(x):", "Water boils at a temperature of"]:
            ids = tok(prompt, return_tensors="pt")
            kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
            ours, ref = model.generate(**ids, **kw), reference.generate(**ids, **kw)
            assert ours.shape[1] == ids["input_ids"].shape[1] + 12 or ours[0, -1] == tok.eos_token_id
            assert ours.tolist() == ref.tolist(), prompt
    finally:
        shutil.rmtree(out, ignore_errors=True)  # 0.5 GB


@pytest.mark.slow
def test_concurrent_conversions_convert_once_and_leave_no_temp(tmp_path):
    out = tmp_path / "tok"
    results, errors = [], []

    def run():
        try:
            results.append(convert_gguf(packaged_gguf("smollm2-135m-instruct"), out, tokenizer_only=True))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [out, out]
    assert (out / "tokenizer.json").is_file() and (out / "slm_convert.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tok.lock", "tok"]
