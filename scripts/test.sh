#!/usr/bin/env bash
# Run the test suite in the project's virtualenv, creating it on first use.
# Extra arguments go to pytest (e.g. -m "not slow" for the fast subset).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false VLLM_CPU_KVCACHE_SPACE=1
exec "$root/${SLM_VENV:-.venv}/bin/python" -m pytest "$@"
