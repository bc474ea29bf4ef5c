"""The README's examples run as written, offline, each block on its own from a fresh checkout.

Its ```python and ```sh blocks run one by one, each in an empty directory that holds only the
checkout's `examples/` and `src/` (what a fresh clone has), so that none leans on another. A
block under `<!-- not run ... -->` (the Hub example) is skipped; ```bash blocks hold the install
and test commands, which CI runs itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- not run[^>]*-->\n)?```(python|sh)\n(.*?)```", flags=re.S)
BLOCKS = [(kind, code) for skipped, kind, code in BLOCK.findall(README.read_text()) if not skipped]
# What the README says a block prints: "prints `...`" right after it, or a `# {...}` line under a print.
PRINTS = re.compile(r"```(?:python|sh)\n(.*?)```\n\nprints `([^`]+)`", flags=re.S)
STATED = {code: [output] for code, output in PRINTS.findall(README.read_text())}
for _, code in BLOCKS:
    STATED.setdefault(code, []).extend(re.findall(r"^print\(.*\)\n# ([\[{].*)$", code, flags=re.M))


def test_the_readme_is_a_short_manual():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert "../shared" not in text and "/tmp/" not in text
    assert any(kind == "python" for kind, _ in BLOCKS) and any(kind == "sh" for kind, _ in BLOCKS)
    assert BLOCK.findall(text)[0][0] == "" and any(skipped for skipped, _, _ in BLOCK.findall(text))


def test_the_stated_outputs_are_found():
    assert sum(len(outputs) for outputs in STATED.values()) >= 2  # the comi-qa line and the pipeline's dict


def test_ci_runs_the_readme_install_and_test_commands():
    """A new user's fresh machine and CI's run the same commands: the README's ```bash blocks (the
    install lines, the side environments, the full test command), each a line of .ci/run, in order."""
    readme = README.read_text()
    commands = [
        line.split("  #")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    assert commands[:2] == ["pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
                            'pip install -e ".[test]"']  # fmt: skip
    assert commands[-1] == "python -m pytest tests -q -n 2 --dist loadfile"
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    positions = [ci.index(command) for command in commands]  # ValueError: a README command CI does not run
    assert positions == sorted(positions)
    assert "# everything, as CI runs it" in readme


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(BLOCKS)])
def test_readme_block_runs_alone(index, tmp_path):
    kind, code = BLOCKS[index]
    for name in ("examples", "src"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    if kind == "python":
        (tmp_path / "block.py").write_text(code)
        command = [sys.executable, str(tmp_path / "block.py")]
    else:
        command = ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{kind} block {index} failed:\n{code}\n{done.stderr[-3000:]}"
    for output in STATED.get(code, []):
        assert output in done.stdout, f"the README says block {index} prints {output!r}; it printed {done.stdout!r}"
    # Everything a block writes goes under scratch/, which .gitignore covers.
    written = {path.name for path in tmp_path.iterdir()} - {"examples", "src", "block.py", "modules"}
    assert written <= {"scratch"}, written
