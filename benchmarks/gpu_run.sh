#!/bin/bash
# One GPU-machine session (see benchmarks/README.md): build llama.cpp with CUDA from the sources
# llama-cpp-python vendors, then run the GPU measurements, writing everything under $OUT.
#   prepared here first: bash ../shared/gpu/prepare.sh nvidia-ml-py; the Tekken vocab donor
#   .gpu/tekken-vocab.gguf and .gpu/extra/*.whl (tiktoken, regex) — see benchmarks/README.md.
# Usage on the GPU machine: bash benchmarks/gpu_run.sh [plan] [engine] [bench]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${*:-plan engine bench}
(time bash .gpu/build.sh) > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
source /tmp/llama-env.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/site-extra .gpu/extra/*.whl
export PYTHONPATH=/tmp/site-extra:$PYTHONPATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
M=/tmp/shaped; mkdir -p $M
shaped() {  # a Magistral-shaped GGUF of quant $1 (real header and Tekken vocab, zero weights, sparse)
  python3 - "$1" <<'PY'
import sys
from edge_magistral.catalog import MAGISTRAL_SMALL_1_1, tensor_specs
from edge_magistral.shaped_gguf import write_shaped_gguf
q = sys.argv[1]
write_shaped_gguf(f"/tmp/shaped/{q}.gguf", MAGISTRAL_SMALL_1_1, tensor_specs(MAGISTRAL_SMALL_1_1, q), q,
                  vocab_from=".gpu/tekken-vocab.gguf")
PY
}
for step in $STEPS; do case $step in
  diag)  # which part of a Python-side load fails on CUDA: bare Llama, with our log callback, the engine
    [ -f $M/Q4_K_M.gguf ] || shaped Q4_K_M
    for how in numpyfirst engine; do
      echo "== $how"; EDGE_MAGISTRAL_LLAMA_VERBOSE=1 timeout 120 python3 -X faulthandler benchmarks/gpu_diag.py $how $M/Q4_K_M.gguf 2>&1 | tail -25
    done 2>&1 | tee "$OUT/diag.log" ;;
  plan)
    timeout 300 python3 benchmarks/plan_vs_gpu.py --out "$OUT" --vocab-from .gpu/tekken-vocab.gguf 2>&1 | tee "$OUT/plan.log" ;;
  engine)
    shaped Q4_K_M
    timeout 240 python3 -X faulthandler benchmarks/engine_overhead.py --model $M/Q4_K_M.gguf --n-gpu-layers 99 \
      --lengths 128,2048 --repeats 1 --out "$OUT/engine_overhead_gpu.json" 2>&1 | tee "$OUT/engine.log" ;;
  bench)
    [ -f $M/Q4_K_M.gguf ] || shaped Q4_K_M
    timeout 120 llama-bench -m $M/Q4_K_M.gguf -p 512 -n 128 -fa 1 -o json > "$OUT/llama_bench_q4km.json" 2> "$OUT/llama_bench.err"
    cat "$OUT/llama_bench_q4km.json" ;;
  parallel)  # issue 7: aggregate generation at 1/2/4/8 streams, ours vs llama-batched-bench
    [ -f $M/Q4_K_M.gguf ] || shaped Q4_K_M
    timeout 60 llama-batched-bench -m $M/Q4_K_M.gguf -c 8192 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,2,4,8 \
      -fa 1 -ngl 99 2>&1 | tail -12 | tee "$OUT/batched_bench.txt"
    timeout 120 python3 benchmarks/parallel_decode.py --model $M/Q4_K_M.gguf --n-gpu-layers 99 \
      --out "$OUT/parallel_decode_gpu.json" 2>&1 | tee "$OUT/parallel.log" ;;
esac; done
