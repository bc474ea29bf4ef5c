#!/usr/bin/env bash
# kvpress's own environment, outside git: kvpress 0.5.5 pins transformers<5.3, which comi_hf's
# environment (transformers>=5.24) cannot share. Made once, then reused. bench/peers.py runs its
# kvpress side there, as a subprocess.
#
#     bash .ci/kvpress_venv.sh     # COMI_KVPRESS_VENV=... chooses the place (default ~/.cache/comi_hf/venvs/kvpress)
set -euo pipefail
VENV=${COMI_KVPRESS_VENV:-$HOME/.cache/comi_hf/venvs/kvpress}
vpip() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
if ! "$VENV/bin/python" - 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(0 if (version("kvpress"), version("transformers"), version("torch").split("+")[0]) == ("0.5.5", "5.2.0", "2.13.0") else 1)
PY
then
    echo "making kvpress's environment in $VENV (about 1.5 minutes)"
    rm -rf "$VENV"
    python -m venv "$VENV"
    # torch first, and pinned again beside kvpress, so that the resolver never swaps it for another build.
    vpip torch==2.13.0
    vpip kvpress==0.5.5 transformers==5.2.0 torch==2.13.0
fi
"$VENV/bin/python" -c "import kvpress, transformers; print('kvpress 0.5.5, transformers', transformers.__version__, 'in $VENV')"
