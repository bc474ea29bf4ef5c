"""research/error_catalogue.py in its quick mode: every quick case gets one clear error or a right answer.

The full catalogue (with a real comi-serve and vLLM) and its counts are in docs/errors/catalogue.md.
"""

import json
import sys

import pytest
from conftest import REPO, run_command

pytestmark = pytest.mark.slow


def test_quick_catalogue_cases_are_clear_or_answered(tmp_path):
    command = [sys.executable, str(REPO / "research" / "error_catalogue.py"), "--quick", "--no-server"]
    done = run_command([*command, "--output", str(tmp_path)], tmp_path, timeout=600)
    result = json.loads((tmp_path / "catalogue.json").read_text())
    cases = result["cases"]
    assert len(cases) >= 20 and {case["surface"] for case in cases} == {"cli", "python"}
    assert {case["id"].split(".")[0] for case in cases} >= {"qa", "convert", "synth", "export", "serve", "generate"}
    wrong = [case for case in cases if case["outcome"] not in ("clear", "answered")]
    assert not wrong, json.dumps(wrong, indent=1, ensure_ascii=False)
    # Both kinds are there: bad inputs refused, and valid inputs answered.
    assert {case["outcome"] for case in cases} == {"clear", "answered"}
    assert (tmp_path / "catalogue.md").read_text().startswith("# Error catalogue")
    assert "| **all** |" in done.stdout
