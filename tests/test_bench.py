"""The benchmark scripts run (in their --quick mode), so they never rot. Timings are not checked here."""

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
