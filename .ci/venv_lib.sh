# Sourced by .ci/vllm_venv.sh and .ci/kvpress_venv.sh. Their environments live outside git and
# are shared: by concurrent runs of these scripts (from several checkouts), by tests, and by
# servers running from them. So:
#
# * one build at a time: `venv_lock` holds a lock beside the environment until the script exits;
#   a run that waited finds the environment the other one made, and keeps it;
# * a build happens in a sibling directory, and `venv_place` renames it into place once it passes
#   its import check: the environment's path holds a whole environment or none, never a
#   half-installed one that a test would take for ready;
# * an environment that passes its check is never removed; one that fails it (checked under the
#   lock, so no build of ours is under way in it, and nothing can be serving from it) is renamed
#   aside, then deleted.
#
# Renaming a virtual environment keeps `bin/python -m ...` working (Python finds pyvenv.cfg beside
# its bin/, wherever that is); what names the build directory (pip's console scripts, the activate
# scripts, pyvenv.cfg's `command`) is rewritten to the final path first.

# venv_lock VENV; then build in "$VENV.build-$$". Only a lock holder builds, so another build
# directory found then is what a killed build left (vLLM's is 2 GB): it goes.
venv_lock() {
    mkdir -p "$(dirname "$1")"
    exec 9>"$1.lock"
    if ! flock -n 9; then
        echo "waiting for another build of $1"
        flock 9
    fi
    rm -rf "$1".build-*
}

# venv_place BUILD VENV
venv_place() {
    local build=$1 venv=$2
    { grep -rlIZ -F -- "$build" "$build/bin" "$build/pyvenv.cfg" || true; } | xargs -0 -r sed -i "s|$build|$venv|g"
    if [ -e "$venv" ]; then
        mv -T "$venv" "$build.old"
    fi
    mv -T "$build" "$venv"
    rm -rf "$build.old"
}
