#!/bin/bash
# One GPU-machine session (see benchmarks/README.md): build llama.cpp with CUDA for sm_90 from the
# sources llama-cpp-python vendors (with llama-bench, llama-batched-bench, llama-quantize from the
# same tree), then run the issue-7 measurements. Everything lands in $RES and is packed after every
# step into $OUT/results.tgz (the device tool returns at most 8 files), with the console in $OUT/log.
#   The build step runs $GPU_BUILD_SCRIPT (default .gpu/build.sh, in the git-ignored .gpu/ carried
#   to the machine): it must build libllama/libggml with CUDA plus the three tools from the vendored
#   sources (.gpu/llama-src-<version>.tgz), install the pure-Python llama_cpp package and the
#   wheels it needs (gguf, diskcache, nvidia-ml-py) against that library, and write
#   /tmp/llama-env.sh (PYTHONPATH, LLAMA_CPP_LIB_PATH, PATH to the tools); it may skip a build
#   that is already there. Also prepared here first: the Tekken vocab donor .gpu/tekken-vocab.gguf
#   and .gpu/extra/*.whl (tiktoken, regex) — see benchmarks/README.md.
# Usage there:  OUT=$OUT [QUANTS="Q4_K_M Q8_0"] bash benchmarks/gpu_run.sh STEP...
#   bandwidth   device-to-device copy bandwidth (torch, its own process)
#   quants      per quant in $QUANTS: the build pipeline makes it from a Magistral-shaped BF16 GGUF,
#               then ours vs llama-bench (compare_llama.py), planner vs measured memory at 8k and
#               40k (plan_vs_gpu.py --models); the file is deleted afterwards unless KEEP=1
#   parallel    ours vs llama-batched-bench at 1/2/4/8 streams (compare_batched.py) on Q4_K_M
#   sampling    our bench with top-k on the host instead of the device (Q4_K_M), for the difference
#   plan        the profile scenarios of plan_vs_gpu.py (simulated smaller cards)
#   direct      write the $QUANTS files straight in their final layout (no pipeline; seconds)
#   compare     ours vs llama-bench (compare_llama.py) on each $QUANTS file already made (by direct or
#               quants); no pipeline build, no plan_vs_gpu
#   engine      the engine against a bare llama-cpp-python loop; diag: the CUDA import-order check
#   at_rate     issue 13: speculate_at_rate.py, end to end at set acceptance rates (SPEC_RATES), all modes
#   speculate   issue 13 on the Q4_K_M file direct made: verify cost c(k) k=0..16 at depth 512 and 4096,
#               our tg with speculate ngram vs off vs llama-bench tg128, llama-bench tg128 of a 0.5B
#               draft-shaped Tekken GGUF (its cost per guess), projections at the acceptance of the CPU
#               run's SmolLM2 outputs (benchmarks/results/issue13/speculate_cpu_smollm2.json) and at a
#               published rate (speculate.py); SPEC_BACKEND_SAMPLING=auto measures with the device top-k
#               (off by default: before e57caae the engine's context refused several logits rows with it)
# Locally (CPU, a small shape, no build): SHAPE=small NO_BUILD=1 NGL=0 PATH=.llama-tools/bin:$PATH ...
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; RES=${RES:-/tmp/res}; M=${MODELS:-/tmp/shaped}
mkdir -p "$OUT" "$RES" "$M"
QUANTS=${QUANTS:-Q4_K_M Q8_0 Q6_K Q5_K_M}
REPS=${REPS:-2}; ROUNDS=${ROUNDS:-2}; NGL=${NGL:-99}; SHAPE=${SHAPE:-full}
exec > >(tee -a "$OUT/log") 2>&1
pack() { tar czf "$OUT/results.tgz.partial" -C "$RES" . && mv "$OUT/results.tgz.partial" "$OUT/results.tgz"; }
stamp() { echo "== $(date +%T) $*"; }
if [ -z "${NO_BUILD:-}" ]; then
  stamp build
  (time bash "${GPU_BUILD_SCRIPT:-.gpu/build.sh}") > "$RES/build.log" 2>&1 || { tail -30 "$RES/build.log"; pack; exit 1; }
  source /tmp/llama-env.sh
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-extra .gpu/extra/*.whl
  export PYTHONPATH=/tmp/site-extra:$PYTHONPATH
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv,noheader | tee "$RES/gpu.txt"
elif [ -f /tmp/llama-env.sh ]; then  # a chained call on the warm machine: the earlier call's build
  source /tmp/llama-env.sh
  export PYTHONPATH=/tmp/site-extra:$PYTHONPATH
fi
# which code was measured (the device's copy may have no .git: pass GIT_COMMIT from the caller)
echo "${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" > "$RES/commit.txt"
BF16=$M/Magistral-shaped-BF16.gguf
shaped_bf16() {  # Magistral Small 1.1's exact shapes, real Tekken vocab, zero weights in a sparse file
  [ -f "$BF16" ] && return
  python3 - "$BF16" "$SHAPE" <<'PY'
import dataclasses, sys
from edge_magistral.catalog import MAGISTRAL_SMALL_1_1, tensor_specs
from edge_magistral.shaped_gguf import write_shaped_gguf
arch = MAGISTRAL_SMALL_1_1
if sys.argv[2] == "small":  # a local dry run of this script: Magistral's layout, tiny sizes
    arch = dataclasses.replace(arch, n_layers=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)
write_shaped_gguf(sys.argv[1], arch, tensor_specs(arch, "BF16"), "BF16", vocab_from=".gpu/tekken-vocab.gguf")
PY
}
quant_file() { echo "$M/q/magistral-shaped-$1.gguf"; }
build_quant() {  # the project's own build pipeline: BF16 GGUF → quant, sha256 manifest
  local f; f=$(quant_file "$1")
  [ -f "$f" ] && return
  shaped_bf16
  local t0=$SECONDS
  timeout 600 python3 -m edge_magistral build "$BF16" --out "$M/q" --quants "$1" --name magistral-shaped --threads "$(nproc)" \
    > "$RES/build_$1.log" 2>&1 || { tail -20 "$RES/build_$1.log"; return 1; }
  echo "build_pipeline $1 $((SECONDS - t0)) s $(stat -c %s "$f") bytes" | tee -a "$RES/timings.txt"
  cp "$M/q/manifest.json" "$RES/manifest_$1.json"
}
draft_file() {  # the body of a 0.5B draft with Tekken's vocabulary (Qwen2-0.5B's shape), zero weights
  local d=$M/q/draft-shaped-Q8_0.gguf
  mkdir -p "$M/q"; [ -f "$d" ] || python3 - "$d" <<'PY'
import dataclasses, sys
from edge_magistral.catalog import MAGISTRAL_SMALL_1_1, tensor_specs
from edge_magistral.shaped_gguf import write_shaped_gguf
arch = dataclasses.replace(MAGISTRAL_SMALL_1_1, n_layers=24, n_embd=896, n_head=14, n_head_kv=2, head_dim=64, n_ff=4864)
write_shaped_gguf(sys.argv[1], arch, tensor_specs(arch, "Q8_0"), "Q8_0", vocab_from=".gpu/tekken-vocab.gguf")
PY
  echo "$d"
}
for step in "$@"; do stamp "$step"; case $step in
  bandwidth)
    timeout 120 python3 benchmarks/bandwidth.py --out "$RES/bandwidth.json" ;;
  quants)
    for q in $QUANTS; do
      stamp "quant $q"
      build_quant "$q" || continue
      f=$(quant_file "$q")
      timeout 400 python3 benchmarks/compare_llama.py --model "$f" --llama-bench "$(command -v llama-bench)" \
        --n-gpu-layers "$NGL" --reps "$REPS" --rounds "$ROUNDS" --out "$RES/compare_llama_$q.json"; pack
      if [ "$NGL" -gt 0 ]; then
        timeout 300 python3 benchmarks/plan_vs_gpu.py --models "$f" --ctxs 8192,40960 --out "$RES"; pack
      fi
      [ -n "${KEEP:-}" ] || [ "$q" = Q4_K_M ] || rm -f "$f"
    done ;;
  direct)  # the quants in $QUANTS written straight in their final layout (seconds, not minutes)
    for q in $QUANTS; do
      mkdir -p "$M/q"; [ -f "$(quant_file "$q")" ] || python3 - "$(quant_file "$q")" "$q" <<'PY'
import sys
from edge_magistral.catalog import MAGISTRAL_SMALL_1_1, tensor_specs
from edge_magistral.shaped_gguf import write_shaped_gguf
write_shaped_gguf(sys.argv[1], MAGISTRAL_SMALL_1_1, tensor_specs(MAGISTRAL_SMALL_1_1, sys.argv[2]), sys.argv[2],
                  vocab_from=".gpu/tekken-vocab.gguf")
PY
    done ;;
  compare)  # ours vs llama-bench only, on the files direct (or quants) made
    for q in $QUANTS; do
      f=$(quant_file "$q"); [ -f "$f" ] || { echo "no $f: run direct first"; continue; }
      timeout 400 python3 benchmarks/compare_llama.py --model "$f" --llama-bench "$(command -v llama-bench)" \
        --n-gpu-layers "$NGL" --reps "$REPS" --rounds "$ROUNDS" --out "$RES/compare_llama_$q.json"; pack
    done ;;
  parallel)  # BATCHED_SAMPLING=off also runs ours with top-k on the host
    build_quant Q4_K_M || exit 1
    for how in auto ${BATCHED_SAMPLING:-}; do
      timeout 300 python3 benchmarks/compare_batched.py --model "$(quant_file Q4_K_M)" \
        --llama-batched-bench "$(command -v llama-batched-bench)" --n-gpu-layers "$NGL" --rounds "$ROUNDS" \
        --backend-sampling $how --out "$RES/compare_batched_Q4_K_M${how/auto/}.json"; pack
    done ;;
  sampling)
    build_quant Q4_K_M || exit 1
    for how in off on; do
      timeout 200 python3 -m edge_magistral bench --model "$(quant_file Q4_K_M)" --n-gpu-layers "$NGL" --reps "$REPS" \
        --ttft 1024 --backend-sampling $how --json > "$RES/bench_sampling_$how.json"
      python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('top-k on device' if r['backend_sampling'] else 'top-k on host', r['tg_tokens_per_s']['mean'], 'tg t/s')" "$RES/bench_sampling_$how.json"
    done ;;
  plan)
    timeout 300 python3 benchmarks/plan_vs_gpu.py --out "$RES" --vocab-from .gpu/tekken-vocab.gguf ;;
  engine)  # the engine against a bare llama-cpp-python generate loop (results/engine_overhead_h200*.json)
    build_quant Q4_K_M || exit 1
    timeout 240 python3 -X faulthandler benchmarks/engine_overhead.py --model "$(quant_file Q4_K_M)" \
      --n-gpu-layers "$NGL" --lengths 128,2048 --repeats 1 --out "$RES/engine_overhead_gpu.json" ;;
  at_rate)  # issue 13: end to end at set acceptance rates (benchmarks/speculate_at_rate.py), after direct
    f=$(quant_file Q4_K_M); [ -f "$f" ] || { echo "no $f: run direct first"; continue; }
    timeout "${SPEC_TIMEOUT:-330}" python3 benchmarks/speculate_at_rate.py --model "$f" --draft "$(draft_file)" \
      --n-gpu-layers "$NGL" --llama-bench "$(command -v llama-bench)" --rates "${SPEC_RATES:-0.6,0.7,0.8}" \
      --max-tokens "${SPEC_TOKENS:-160}" --rounds "$ROUNDS" --out "$RES/speculate_at_rate_Q4_K_M.json"; pack ;;
  speculate)  # issue 13 (benchmarks/speculate.py); zero weights: only the costs mean anything
    f=$(quant_file Q4_K_M); [ -f "$f" ] || { echo "no $f: run direct first"; continue; }
    d=$(draft_file)
    acc=benchmarks/results/issue13/speculate_cpu_smollm2.json
    timeout "${SPEC_TIMEOUT:-330}" python3 benchmarks/speculate.py --model "$f" --llama-bench "$(command -v llama-bench)" \
      --draft-bench "$d" --n-gpu-layers "$NGL" --backend-sampling "${SPEC_BACKEND_SAMPLING:-off}" --zero-weights --temps "${SPEC_TEMPS:-0.7}" --max-tokens "${SPEC_TOKENS:-192}" \
      --reps "${SPEC_REPS:-5}" --rounds "$ROUNDS" $([ -f $acc ] && echo --acceptance $acc) \
      --out "$RES/speculate_Q4_K_M.json" ;;
  diag)  # which part of a Python-side load fails on CUDA (the numpy-before-llama_cpp segfault)
    build_quant Q4_K_M || exit 1
    for how in numpyfirst engine; do
      echo "== $how"; EDGE_MAGISTRAL_LLAMA_VERBOSE=1 timeout 120 python3 -X faulthandler benchmarks/gpu_diag.py $how \
        "$(quant_file Q4_K_M)" 2>&1 | tail -25
    done | tee "$RES/diag.log" ;;
  *) echo "unknown step $step" ;;
esac; pack; done
stamp done
