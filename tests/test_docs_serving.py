"""docs/serving.md's commands run as written on this machine: vLLM and comi-serve with a tiny model.

Its ```sh and ```python blocks run in order, in a directory holding the checkout's `examples/`,
`src/` and `.ci/`; the two that start a server (vLLM, then comi-serve) run in the background until
they answer, and are stopped at the end. Needs vLLM's environment (CI makes it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from comi_hf.serving.launch import find_vllm_python

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "serving.md"
SERVERS = {"api_server": "http://127.0.0.1:8000/health", "comi-serve": "http://127.0.0.1:8080/health"}


def _wait(url: str, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server for {url} exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def test_serving_doc_runs_as_written(tmp_path):
    if find_vllm_python() is None and os.environ.get("COMI_REQUIRE_VLLM") != "1":
        pytest.skip("vLLM's environment is missing: `bash .ci/vllm_venv.sh` makes it")
    for name in ("examples", "src", ".ci"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    blocks = re.findall(r"```(sh|python)\n(.*?)```", DOC.read_text(), flags=re.S)
    servers, outputs = [], []
    try:
        for kind, code in blocks:
            server = next((url for marker, url in SERVERS.items() if marker in code), None)
            if server is not None:
                log = (tmp_path / f"server-{len(servers)}.log").open("w")
                process = subprocess.Popen(
                    ["bash", "-c", code], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
                servers.append(process)
                _wait(server, process)
                continue
            command = ["bash", "-euo", "pipefail", "-c", code] if kind == "sh" else [sys.executable, "-c", code]
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{kind} block failed:\n{code}\n{done.stderr[-3000:]}"
            outputs.append(done.stdout)
    finally:
        for process in reversed(servers):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
    answered = next(output for output in outputs if '"answer"' in output)
    assert '"context_tokens"' in answered and '"memory_tokens"' in answered and '"compression_ratio"' in answered
    assert "'answers'" in outputs[-1]  # the Python client's answers
