"""The README's examples run as written, offline: its ```python and ```sh blocks, in order.

(```bash blocks hold the install, test and benchmark commands, which CI runs itself.)
"""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run_in_order(tmp_path):
    blocks = re.findall(r"```(python|sh)\n(.*?)```", README.read_text(), flags=re.S)
    assert any(kind == "python" for kind, _ in blocks) and any(kind == "sh" for kind, _ in blocks)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    # The commands are written for the repository's root: give them its examples, write elsewhere.
    (tmp_path / "examples").symlink_to(README.parent / "examples")
    python_so_far, pending = [], False

    def run(command, what):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{what} failed:\n{done.stderr[-3000:]}"

    def run_python():
        # Later Python blocks continue the earlier ones (same names in scope): run them together.
        script = tmp_path / "readme.py"
        script.write_text("\n\n".join(python_so_far))
        run([sys.executable, str(script)], "the Python blocks")

    for kind, code in blocks:
        if kind == "python":
            python_so_far.append(code)
            pending = True
            continue
        if pending:
            run_python()
            pending = False
        run(["bash", "-euo", "pipefail", "-c", code], f"sh block:\n{code}")
    if pending:
        run_python()
    for produced in (
        "page.html",
        "explanation.html",
        "comi-finetuned/model.safetensors",
        "eval-output/eval_metrics.json",
    ):
        assert (tmp_path / produced).exists(), produced
