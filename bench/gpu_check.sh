#!/usr/bin/env bash
# The CUDA paths in one run, for a session lent a GPU (about 8 minutes on one H200). Nothing
# else depends on it, and CI never runs it (CI has no GPU).
#
#     bash bench/gpu_check.sh [OUTPUT_DIR]     # default: $OUT where the device tool sets it, else gpu-check
#
# 1. the test suite's GPU-only tests (flash-attn when installed, half precision, device_map);
# 2. bench/end_to_end.py in bfloat16 on CUDA (COMI against the full context, 2K-32K tokens);
# 3. where vLLM's CUDA build imports here: the serving tests against it and bench/serving.py --quick.
# A part whose package is missing says so and is skipped; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTPUT=${1:-${OUT:-gpu-check}}
mkdir -p "$OUTPUT"
PYTHON=${PYTHON:-python3}
status=0
step() { echo "== $1"; shift; "$@" 2>&1 | tee -a "$OUTPUT/gpu_check.log"; local code=${PIPESTATUS[0]}; [ "$code" = 0 ] || status=$code; }

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 2
# Carried wheels (no registry is reachable from a lent machine), then this checkout, without
# touching the machine's torch.
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
step "GPU tests" timeout 240 "$PYTHON" -m pytest -q tests/test_modeling_comi.py -k "flash or half or device_map or attn_implementation"
step "end to end, bfloat16" timeout 240 "$PYTHON" bench/end_to_end.py --device cuda --dtype bfloat16 \
    --context_tokens 2048 8192 32768 --merge_sizes 8 32 --json "$OUTPUT/end_to_end_cuda.json"
if "$PYTHON" -c "import vllm" >/dev/null 2>&1; then
    export COMI_VLLM_VENV=$("$PYTHON" -c "import sys, pathlib; print(pathlib.Path(sys.executable).parents[1])")
    step "serving tests on vLLM (CUDA)" timeout 300 "$PYTHON" -m pytest -q tests/test_serving_vllm.py
    step "serving benchmark, quick" timeout 300 "$PYTHON" bench/serving.py --quick --device cuda --json "$OUTPUT/serving_quick.json"
else
    echo "== vLLM is not installed here: the serving checks are skipped" | tee -a "$OUTPUT/gpu_check.log"
fi
exit $status
