#!/usr/bin/env bash
# Quantised weights streamed on CUDA, in one device call (issue #15): the tiny models' streamed
# quantised denoisers against resident (`streaming --include-ignored`: GGUF Q8_0/Q4_0 and
# `--weights fp8`, bit for bit), the quantised linears' two paths at SD 3.5's shapes (`gpu_ops`:
# error and time of candle's MMQ kernels and of the dequantised GEMM), then
# low_memory_quantised.sh's export, error (both paths), peer and bench parts: SD 3.5 Large 1024²
# with the Q8_0 GGUF and the fp8-scaled file under each budget, loads timed apart.
# Expects .carry/{streaming,gpu_ops,sdgen-bench}.xz (CUDA builds) and .whl/; END (560 s) bounds it.
# Logs go to /tmp/q and come back as one archive ($OUT/quantised.tgz) beside the summary.
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/cuda_env.sh
FINAL_OUT=${OUT:-/tmp/out}; END=${END:-560}
unpack streaming gpu_ops
(cd crates/sdgen && SDGEN_TESTDATA=$PWD/../../testdata timeout 150 /tmp/streaming --include-ignored --test-threads=1) \
  > "$FINAL_OUT/streaming.log" 2>&1
grep -E "^test |test result|panicked" "$FINAL_OUT/streaming.log"
(cd crates/sdgen-models && timeout 90 /tmp/gpu_ops quantised_linears --nocapture) > "$FINAL_OUT/gpu_ops.log" 2>&1
grep -E "kernel|test result|panicked" "$FINAL_OUT/gpu_ops.log"
echo "tiny checks done (at $SECONDS s)"
mkdir -p /tmp/q
OUT=/tmp/q DEADLINE_S=$((END - SECONDS)) FORMATS=${FORMATS:-"q8_0 fp8-scaled"} BUDGETS=${BUDGETS:-"4GB 8GB"} \
  PARTS=${PARTS:-"export error peer bench"} bash tools/gpu/low_memory_quantised.sh
cp /tmp/q/quantised_summary.json "$FINAL_OUT/" 2>/dev/null
tar czf "$FINAL_OUT/quantised.tgz" -C /tmp/q --exclude='*.png' --exclude='*.safetensors' .
echo "done (at $SECONDS s)"
