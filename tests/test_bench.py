"""The benchmark scripts run (in their --quick mode), so they never rot. Timings are not checked here."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(path.name for path in BENCH.glob("*.py") if path.name != "common.py"))
def test_benchmark_quick_mode(script, tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--json", str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())


def test_compressor_exponent_of_a_one_length_series_is_none(monkeypatch):
    # On a busy machine a quick series can stop after its first length; that is no slope, not a crash.
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its neighbour `common`
    spec = importlib.util.spec_from_file_location("bench_compressor", BENCH / "compressor.py")
    compressor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compressor)
    assert compressor.fitted_exponent([1024], [0.5]) is None
    assert compressor.fitted_exponent([1024, 4096], [1.0, 16.0]) == pytest.approx(2.0)
    assert compressor.describe_exponent(None) == "n/a (one length)"
