#!/usr/bin/env bash
# Every benchmark in its full mode, writing its table to stdout and its JSON and PNG plot to
# OUTPUT_DIR (default docs/bench, what README's Performance section shows).
#
#     bash bench/run_all.sh [OUTPUT_DIR] [--device cuda --dtype bfloat16]
#
# About 35 minutes on a 2-core CPU; the extra arguments go to end_to_end.py (the others run on
# the CPU in float32).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUTPUT=${1:-$HERE/../docs/bench}
shift || true
mkdir -p "$OUTPUT"
for NAME in end_to_end ask_many batching compressor; do
    echo "== $NAME"
    EXTRA=()
    [ "$NAME" = end_to_end ] && EXTRA=("$@")
    python "$HERE/$NAME.py" --json "$OUTPUT/$NAME.json" --plot "$OUTPUT/$NAME.png" "${EXTRA[@]}" | tee "$OUTPUT/$NAME.txt"
done
