"""Base models: the packaged SmolLM2 (GGUF converted once), a tiny random Llama, local folders, hub ids."""
from .gguf import cache_root, convert_gguf, ensure_converted, ensure_tokenizer, packaged_gguf
from .loader import ModelError, build_tiny_llama, load_base_model, load_tokenizer, model_id

__all__ = [
    "ModelError", "build_tiny_llama", "cache_root", "convert_gguf", "ensure_converted", "ensure_tokenizer",
    "load_base_model", "load_tokenizer", "model_id", "packaged_gguf",
]
