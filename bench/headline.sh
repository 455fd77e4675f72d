#!/usr/bin/env bash
# The headline CPU benchmarks (bench/RESULTS.md), in the order they are needed; every step resumes
# from its run folders, so rerunning this script after an interruption continues where it stopped.
#   nohup bench/headline.sh > runs/headline.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
slm() { PYTHONPATH="$PWD" "${SLM_PYTHON:-.venv/bin/python}" -m slm_llm.cli "$@"; }
step() { echo "== $(date -u +%FT%TZ) $*"; }
step "instruct5 seed 0: slm, oracle, base";  slm compare --config eval/instruct5.yaml --methods slm,oracle,base --seeds 0
step "cl9 seed 0: slm, oracle, base";        slm compare --config eval/cl9.yaml --methods slm,oracle,base --seeds 0
step "cl9 seeds 0-2: every method";          slm compare --config eval/cl9.yaml --methods slm,oracle,seq_lora,olora,multitask,base --seeds 0,1,2 --lr-grid 5e-4,1.5e-3,5e-3
step "instruct6 seeds 0-2: every method";    slm compare --config eval/instruct6.yaml --methods slm,oracle,seq_lora,olora,multitask,base --seeds 0,1,2 --lr-grid 5e-4,1.5e-3,5e-3
step "cl9 O-LoRA orders 1 and 3";            for o in order1 order3; do slm compare --config eval/cl9.yaml data.order=$o run_dir=runs/cl9_$o --methods slm,oracle,seq_lora,olora,multitask,base --seeds 0,1,2 --lr-grid 5e-4,1.5e-3,5e-3; done
step "done"
