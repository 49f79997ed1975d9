#!/usr/bin/env bash
# Issue #15's last GPU lines, in three device calls of ~9 minutes, in priority order (CALL=1 and 2
# ran in session 11; CALL=1 is the one to re-run after a streaming change); each part is skipped
# when its share of the call is spent (it reports so):
#
#   CALL=1  the tiny streamed denoisers on CUDA (`streaming --include-ignored`: bf16, GGUF and
#           fp8 blocks streamed bit-identical to resident, with each upload freed at its block's
#           release); SDXL 1024² at 3 GB and resident, beside diffusers (low_memory_loads_apart.sh,
#           SD 3.5 left out); then the link's copy rate by piece size and the registering rate
#           (pin_rate.py; PIN_CASES picks others).
#   CALL=2  SD 3.5 Large at 8 GB, loads apart: the fp8-scaled file (low_memory_quantised.sh:
#           the bf16 folder of random weights written, the file exported from it), then bf16,
#           then diffusers' group offload with streams on the same card, for both.
#   CALL=3  the Q8_0 GGUF as now exported (F16/F32 dense tensors, the file diffusers reads): one
#           MMDiT evaluation's error against bf16, and under 8 GB with the ≤ 8-row MMVQ rule and
#           the deferred frees; then bf16 at 4 GB (T5 streamed on the GPU) beside diffusers again.
#           CALL=2 and 3 share the bf16 folder on a warm machine (CALL=3 writes it when absent).
#
# Expects .carry/{sdgen-bench,streaming}.xz (CUDA builds), .carry/peer_diffusers.py and .whl/.
# A call's logs come back as $OUT/remaining<CALL>.tgz beside the summaries printed here.
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/cuda_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; END=${END:-560}; LOGS=/tmp/remaining; rm -rf "$LOGS"; mkdir -p "$LOGS"
at() { echo "  (at $SECONDS s)"; }
quantised() {  # FORMAT PARTS SECONDS: low_memory_quantised.sh's PARTS of FORMAT under 8 GB
  OUT=$LOGS DEADLINE_S=$3 FORMATS=$1 BUDGETS=8GB PARTS=$2 KERNEL_ERROR=0 \
    bash tools/gpu/low_memory_quantised.sh 2>&1 | tail -8; at
}
case ${CALL:-1} in
  1)
    unpack streaming
    (cd crates/sdgen && SDGEN_TESTDATA=$PWD/../../testdata timeout 120 /tmp/streaming --include-ignored \
      --test-threads=1) > "$LOGS/streaming.log" 2>&1
    grep -E "^test |test result|panicked" "$LOGS/streaming.log"; at
    OUT=$LOGS SD35_BUDGETS="" END=$((END - SECONDS - 40)) bash tools/gpu/low_memory_loads_apart.sh 2>&1 | tail -25
    [ $((END - SECONDS)) -gt 30 ] && PIN_CASES=${PIN_CASES:-copy,register} timeout $((END - SECONDS - 5)) \
      python3 tools/gpu/pin_rate.py 4 | tee "$LOGS/pin_rate.jsonl"
    ;;
  2)
    quantised fp8-scaled "export bench" $((END - 240))
    OUT=$LOGS SD35_BUDGETS=8GB SDXL_BUDGETS="" END=$((END - SECONDS)) bash tools/gpu/low_memory_loads_apart.sh 2>&1 | tail -10
    ;;
  3)
    rm -f /tmp/sd35-large-quantised/sd3.5_large-Q8_0.gguf  # an older export is not reused
    quantised q8_0 "export error bench" $((END - 250 - SECONDS))
    OUT=$LOGS SD35_BUDGETS=4GB SDXL_BUDGETS="" END=$((END - SECONDS)) bash tools/gpu/low_memory_loads_apart.sh 2>&1 | tail -10
    ;;
esac
tar czf "$OUT/remaining${CALL:-1}.tgz" -C "$LOGS" --exclude='*.png' --exclude='*.safetensors' .
echo "done (at $SECONDS s)"
