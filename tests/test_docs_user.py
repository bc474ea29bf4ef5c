"""docs/default_model.md and docs/performance.md are user documents: their numbers are the stored
measurements, their commands parse with the scripts' own arguments, and run history lives in the
research logs they link to, not in them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DOC = REPO / "docs" / "default_model.md"
PERFORMANCE_DOC = REPO / "docs" / "performance.md"
LOGS = {DEFAULT_MODEL_DOC: "research/default_model/LOG.md", PERFORMANCE_DOC: "research/performance/LOG.md"}
# A commit hash: 7 to 40 hex digits with at least one letter and one digit.
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def bash_commands(doc: Path) -> list[str]:
    """The commands of the document's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


@pytest.mark.parametrize("doc", list(LOGS), ids=lambda doc: doc.name)
def test_the_doc_is_a_manual_and_links_its_log(doc):
    text = doc.read_text()
    assert "/tmp/" not in text
    assert not COMMIT.findall(text)
    assert f"(../{LOGS[doc]})" in text and (REPO / LOGS[doc]).is_file()


def test_default_model_scores_are_the_stored_results():
    results = json.loads((REPO / "src" / "comi_hf" / "default_model" / "results.json").read_text())["test"]
    rows = dict(re.findall(r"^\| ([0-9,]+ \([0-9,]+ documents\)) \| (.*) \|$", DEFAULT_MODEL_DOC.read_text(), re.M))
    lengths = sorted({r["words"] for r in results})
    assert len(rows) == len(lengths) >= 2
    for words in lengths:
        stored = sorted((r for r in results if r["words"] == words), key=lambda r: r["merge_size"])
        assert [r["merge_size"] for r in stored] == [4, 8, 16, 32]
        (documents,) = {r["num_samples"] for r in stored}
        cells = rows[f"{words:,} ({documents:,} documents)"].replace("*", "").split(" | ")
        assert cells == [f"{r['exact_match']:.3f}" for r in stored]


def test_end_to_end_speed_ups_are_the_stored_results():
    rows = json.loads((REPO / "docs" / "bench" / "end_to_end.json").read_text())["rows"]
    table = re.findall(
        r"^\| ([0-9,]+) \| COMI (\d+)x \|(?: [^|]+ \|){4} \**([0-9.]+x)\** \|", PERFORMANCE_DOC.read_text(), re.M
    )
    stored = {
        (f"{r['context_tokens']:,}", str(r["merge_size"])): f"{r['speedup']:.2f}x" for r in rows if "merge_size" in r
    }
    assert len(table) == len(stored) == 12
    assert {(tokens, merge): speedup for tokens, merge, speedup in table} == stored


PARSE_ONLY = """
import runpy, sys
import transformers
parse = transformers.HfArgumentParser.parse_args_into_dataclasses
def parse_then_stop(self, *args, **kwargs):
    parsed = parse(self, *args, **kwargs)
    if kwargs.get("return_remaining_strings") and parsed[-1]:
        sys.exit(f"unrecognized arguments: {parsed[-1]}")
    sys.exit(0)
transformers.HfArgumentParser.parse_args_into_dataclasses = parse_then_stop
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rpartition("/")[0])
runpy.run_path(sys.argv[0], run_name="__main__")
sys.exit("the script never parsed its arguments")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [command for doc in LOGS for command in bash_commands(doc) if command.startswith(("python ", "bash "))],
)
def test_documented_command_parses(command):
    """Each documented script exists, and each Python script takes the documented options (parsed
    by its own HfArgumentParser, then stopped before it runs)."""
    program, script, *options = command.split(" ")
    assert (REPO / script).is_file(), script
    if program == "python":
        done = subprocess.run(
            [sys.executable, "-c", PARSE_ONLY, script, *options], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
