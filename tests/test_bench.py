"""The benchmark scripts run (in their --quick mode), so they never rot. Timings are not checked here."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_processes import find_vllm_python, venv_python

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"
KVPRESS_VENV = Path(os.environ.get("COMI_KVPRESS_VENV", Path.home() / ".cache/comi_hf/venvs/kvpress"))


# What the benchmarks share (not benchmarks themselves), and peers.py, tested on its own below.
NOT_BENCHMARKS = ("common.py", "lifeline.py", "memory_meter.py", "server_processes.py", "peers.py")


@pytest.mark.parametrize("script", sorted(path.name for path in BENCH.glob("*.py") if path.name not in NOT_BENCHMARKS))
def test_benchmark_quick_mode(script, tmp_path):
    if script == "serving.py" and find_vllm_python() is None and os.environ.get("COMI_REQUIRE_VLLM") != "1":
        pytest.skip("vLLM's environment is missing: `bash .ci/vllm_venv.sh` makes it")
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--json", str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())


def _load(name: str, monkeypatch):
    """bench/`name`.py as a module, registered as `bench_<name>` for this test only."""
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their neighbour `common`
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, f"bench_{name}", module)  # as an import does (for its dataclasses)
    spec.loader.exec_module(module)
    return module


def test_compressor_exponent_of_a_one_length_series_is_none(monkeypatch):
    # On a busy machine a quick series can stop after its first length; that is no slope, not a crash.
    compressor = _load("compressor", monkeypatch)
    assert compressor.fitted_exponent([1024], [0.5]) is None
    assert compressor.fitted_exponent([1024, 4096], [1.0, 16.0]) == pytest.approx(2.0)
    assert compressor.describe_exponent(None) == "n/a (one length)"


def test_peers_quick_mode_compares_every_method_at_one_budget(tmp_path):
    """bench/peers.py --quick: COMI, kvpress's presses (kvpress's own environment), truncation and the
    full context on the same documents, each keeping ceil(n / m) of n tokens per layer."""
    if venv_python(KVPRESS_VENV, "import kvpress") is None and os.environ.get("COMI_REQUIRE_KVPRESS") != "1":
        pytest.skip("kvpress's environment is missing: `bash .ci/kvpress_venv.sh` makes it")
    done = subprocess.run(
        [sys.executable, str(BENCH / "peers.py"), "--quick", "--json", str(tmp_path / "peers.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    entries = json.loads((tmp_path / "peers.json").read_text())["entries"]
    assert not [entry for entry in entries if entry.get("error")]
    labels = {entry["label"] for entry in entries}
    for merge in (4, 8):
        assert {
            f"COMI, merge {merge}",
            f"truncation (first), merge {merge}",
            f"truncation (last), merge {merge}",
        } <= labels
        assert {
            f"{press} ({mode}), merge {merge}" for press in ("Knorm", "SnapKV") for mode in ("context", "with question")
        } <= labels
    full = next(entry for entry in entries if entry["label"] == "full context")
    assert full["kept_per_layer"] == pytest.approx(full["context_tokens"])
    for entry in entries:
        if "merge_size" not in entry:
            continue
        assert 0 <= entry["exact_match"] <= 1 and entry["first_token_ms"] > 0 and entry["decode_ms_per_token"] >= 0
        # ceil(n / m) for every press and truncation (averaged over documents); COMI may keep fewer.
        budget = full["context_tokens"] / entry["merge_size"]
        assert budget <= entry["kept_per_layer"] <= budget + 1 or entry["label"].startswith("COMI")
        assert entry["kept_per_layer"] <= budget + 1
        if entry.get("answers_equal_kvpress_pipeline"):
            same, counted = map(int, entry["answers_equal_kvpress_pipeline"].split("/"))
            assert counted > 0 and same == counted  # the worker decodes as kvpress's own pipeline()


def test_kvpress_environment_being_built_is_not_taken_for_a_ready_one(tmp_path, monkeypatch):
    # What .ci/kvpress_venv.sh has made before kvpress is installed: a Python, without kvpress.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.setenv("COMI_KVPRESS_VENV", str(tmp_path))
    assert _load("peers", monkeypatch).find_kvpress_python() is None
