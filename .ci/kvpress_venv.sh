#!/usr/bin/env bash
# kvpress's own environment, outside git: kvpress 0.5.5 pins transformers<5.3, which comi_hf's
# environment (transformers>=5.24) cannot share. Made once, then reused. bench/peers.py runs its
# kvpress side there, as a subprocess.
#
#     bash .ci/kvpress_venv.sh     # COMI_KVPRESS_VENV=... chooses the place (default ~/.cache/comi_hf/venvs/kvpress)
#
# Safe to run while other runs of it, tests or benchmarks use the environment: see venv_lib.sh.
set -euo pipefail
source "$(dirname "$(readlink -f "$0")")/venv_lib.sh"
VENV=${COMI_KVPRESS_VENV:-$HOME/.cache/comi_hf/venvs/kvpress}
# Ready: the pinned versions, and kvpress imports.
ready() {
    "$1/bin/python" - >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
if (version("kvpress"), version("transformers"), version("torch").split("+")[0]) != ("0.5.5", "5.2.0", "2.13.0"):
    sys.exit(1)
import kvpress  # noqa: F401
PY
}
venv_lock "$VENV"
if ! ready "$VENV"; then
    echo "making kvpress's environment in $VENV (about 1.5 minutes)"
    BUILD=$VENV.build-$$
    trap 'rm -rf "$BUILD" "$BUILD.old"' EXIT
    vpip() { "$BUILD/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
    python -m venv --prompt "$(basename "$VENV")" "$BUILD"
    # torch first, and pinned again beside kvpress, so that the resolver never swaps it for another build.
    vpip torch==2.13.0
    vpip kvpress==0.5.5 transformers==5.2.0 torch==2.13.0
    ready "$BUILD" || { echo "kvpress does not import in the new environment ($BUILD)" >&2; exit 1; }
    # Checked again: a failed first check may have been a passing one (a process killed for memory).
    if ready "$VENV"; then
        echo "keeping the environment in $VENV: it imports"
    else
        venv_place "$BUILD" "$VENV"
    fi
fi
"$VENV/bin/python" -c "import kvpress, transformers; print('kvpress 0.5.5, transformers', transformers.__version__, 'in $VENV')"
