"""docs/serving.md's commands run as written on this machine: vLLM and comi-serve with a tiny model.

Its ```sh and ```python blocks run in order, in a directory holding the checkout's `examples/`,
`src/` and `.ci/`; the two that start a server (vLLM, then comi-serve) run in the background until
they answer, and are stopped at the end, whatever happens. The doc's ports (8000 for vLLM, 8080
for comi-serve) become free ones: a user's own servers may hold those. Needs vLLM's environment
(CI makes it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from server_processes import ServerProcess, find_vllm_python, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "serving.md"
# What marks the block that starts each server, and the port the doc gives it.
SERVERS = {"api_server": 8000, "comi-serve": 8080}


def _wait(url: str, process: ServerProcess, seconds: float = 600) -> None:
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
    ports = {port: free_port() for port in SERVERS.values()}
    blocks = re.findall(r"```(sh|python)\n(.*?)```", DOC.read_text(), flags=re.S)
    servers, outputs = [], []
    try:
        for kind, code in blocks:
            for port, free in ports.items():
                code = re.sub(rf"\b{port}\b", str(free), code)
            server = next((ports[port] for marker, port in SERVERS.items() if marker in code and kind == "sh"), None)
            if server is not None:
                assert f"--port {server}" in code, f"the doc no longer starts this server on its port:\n{code}"
                with (tmp_path / f"server-{len(servers)}.log").open("w") as log:
                    servers.append(
                        ServerProcess(["bash", "-c", code], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
                    )
                _wait(f"http://127.0.0.1:{server}/health", servers[-1])
                continue
            command = ["bash", "-euo", "pipefail", "-c", code] if kind == "sh" else [sys.executable, "-c", code]
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{kind} block failed:\n{code}\n{done.stderr[-3000:]}"
            outputs.append(done.stdout)
    finally:
        for process in reversed(servers):
            process.stop()
    answered = next(output for output in outputs if '"answer"' in output)
    # The doc states the figures its curl prints (the answer itself is the tiny model's noise).
    stated = json.loads(re.search(r"which prints `(\{.*?\})`", DOC.read_text()).group(1).replace("...", "null"))
    got = json.loads(answered)
    assert {key: got[key] for key in stated if key != "answer"} == {k: v for k, v in stated.items() if k != "answer"}
    assert "'answers'" in outputs[-1]  # the Python client's answers
