"""The scripts of examples/, research/ and bench/ parse their arguments one way: `HfArgumentParser`
over dataclasses, through `comi_hf.loading.parse_script_arguments`."""

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from comi_hf.loading import parse_script_arguments

REPO = Path(__file__).resolve().parents[1]
# Not scripts a person runs: bench/peers.py starts the worker in kvpress's own environment (no
# comi_hf there) with the paths of a request and a result file; server_processes.py starts the
# lifeline with a pipe's descriptor and the command it runs.
NOT_RUN_BY_PEOPLE = (REPO / "bench" / "kvpress" / "worker.py", REPO / "bench" / "lifeline.py")
SCRIPTS = sorted(
    path
    for folder in ("examples", "research", "bench")
    for path in (REPO / folder).rglob("*.py")
    if 'if __name__ == "__main__":' in path.read_text() and path not in NOT_RUN_BY_PEOPLE
)


def test_the_scripts_are_found():
    names = {path.name for path in SCRIPTS}
    assert {"train.py", "evaluate.py", "make_tiny_backbone.py", "ablation.py", "finetune_comi.py", "peers.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: str(path.relative_to(REPO)))
def test_script_parses_with_hf_argument_parser(script):
    source = script.read_text()
    assert "argparse.ArgumentParser(" not in source
    assert "parse_script_arguments(" in source or "parse_arguments(" in source  # bench/common.py's, which calls it


@dataclass
class _Options:
    size: int = field(default=1, metadata={"help": "A size."})
    names: list[str] = field(default_factory=lambda: ["a"], metadata={"help": "Names."})


def test_parse_script_arguments_gives_the_dataclasses():
    (options,) = parse_script_arguments(HfArgumentParser(_Options), ["--size", "3", "--names", "x", "y"])
    assert options == _Options(size=3, names=["x", "y"])


def test_parse_script_arguments_reports_an_unknown_option_as_argparse_does(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_script_arguments(HfArgumentParser(_Options), ["--size", "3", "--sise", "4"])
    assert exit_info.value.code == 2
    assert "error: unrecognized arguments: --sise 4" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: str(path.relative_to(REPO)))
def test_script_help_runs(script):
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=script.parent,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "--" in done.stdout
