"""Servers started for tests and benchmarks die with the process that started them, however it
dies; and an environment is ready when its imports work, not when it has a `bin/python`.

No vLLM here: the servers are `python -m http.server`, and a stand-in for vLLM's `api_server`
that, like vLLM, starts an engine process of its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import server_processes as launch
from server_processes import ServerProcess, find_vllm_python, free_port, venv_python

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads process groups from /proc")

# The child that starts a server and is then SIGKILLed loads server_processes.py by its path: importing
# comi_hf would import torch and transformers, seconds of a shared machine for nothing.
CHILD = """
import importlib.util, subprocess, sys, time
spec = importlib.util.spec_from_file_location("comi_launch", sys.argv[1])
launch = importlib.util.module_from_spec(spec)
sys.modules["comi_launch"] = launch
spec.loader.exec_module(launch)
port, kind = int(sys.argv[2]), sys.argv[3]
if kind == "vllm":
    fake_vllm = {"PYTHONPATH": sys.argv[4]}
    server = launch.VLLMServer(sys.executable, "no-model", port=port, env=fake_vllm, startup_timeout=60)
    pid = server.start().process.pid
else:
    # bash starts a process of its own, then becomes the server: a group of two, as vLLM's is.
    command = ["bash", "-c", f"sleep 600 & exec {sys.executable} -m http.server --bind 127.0.0.1 {port}"]
    pid = launch.ServerProcess(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
print(pid, flush=True)
time.sleep(600)
"""

# Stands in for `python -m vllm.entrypoints.openai.api_server`: an engine process, then /health.
FAKE_API_SERVER = """
import argparse, subprocess, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int)
port = parser.parse_known_args()[0].port
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _group(pgid: int) -> list[int]:
    """The processes of process group `pgid`, zombies left out (they hold no port and no memory)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _within(seconds: float, condition) -> float | None:
    """Seconds until `condition()` holds, or None if it does not within `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if condition():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def _kill_group(pgid: int) -> None:
    for pid in _group(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("kind", ["http.server", "vllm"])
def test_a_server_dies_with_the_process_that_started_it_even_when_that_is_sigkilled(kind, tmp_path):
    fake = tmp_path / "fake"
    (fake / "vllm" / "entrypoints" / "openai").mkdir(parents=True)
    (fake / "vllm" / "entrypoints" / "openai" / "api_server.py").write_text(FAKE_API_SERVER)
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD, launch.__file__, str(port), kind, str(fake)], stdout=subprocess.PIPE, text=True
    )
    group = None
    try:
        group = int(parent.stdout.readline())
        assert _within(60, lambda: _listening(port)) is not None
        assert len(_group(group)) >= 2  # the server and the process it started
        parent.kill()
        parent.wait()
        took = _within(15, lambda: not _listening(port) and not _group(group))
        assert took is not None, f"still running 15 s after their parent was killed: {_group(group)}"
        print(f"{kind}: port closed and group {group} gone {took:.2f} s after its parent's SIGKILL")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        if group is not None:
            _kill_group(group)  # this test's own mess, if the mechanism failed


def test_stop_ends_the_whole_group_and_the_command_status_comes_through():
    port = free_port()
    command = ["bash", "-c", f"sleep 600 & exec {sys.executable} -m http.server --bind 127.0.0.1 {port}"]
    with ServerProcess(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as server:
        try:
            assert _within(60, lambda: _listening(port)) is not None
            assert len(_group(server.pid)) == 3  # the server, its sleep, the watchdog
        finally:
            server.stop(timeout=10)
        assert server.returncode == -signal.SIGTERM  # the server's own status: its pid is the command's
        assert not _listening(port)
        assert _within(5, lambda: not _group(server.pid)) is not None  # SIGKILLed, going
        server.stop()  # again: nothing left to do

    # One that ignores SIGTERM gets SIGKILL when the time is up.
    with ServerProcess(["bash", "-c", "trap '' TERM; echo ready; exec sleep 600"], stdout=subprocess.PIPE) as server:
        assert server.stdout.readline() == b"ready\n"  # past the trap
        server.stop(timeout=1)
        assert server.returncode == -signal.SIGKILL

    # A command that exits by itself: its status, and stop() still takes what it left behind.
    server = ServerProcess(["bash", "-c", "sleep 600 & exit 3"])
    try:
        assert server.wait(timeout=30) == 3
        assert _group(server.pid)  # the sleep and the watchdog
    finally:
        server.stop()
    assert _within(5, lambda: not _group(server.pid)) is not None


def test_the_watchdog_holds_none_of_the_command_s_output():
    # A caller reading the command's output to its end gets it when the command exits.
    server = ServerProcess([sys.executable, "-c", "print('done')"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.communicate(timeout=30)[0] == "done\n"
    finally:
        server.stop()


def test_a_missing_command_fails_at_once():
    with pytest.raises(FileNotFoundError):
        ServerProcess(["no-such-command-comi"])


def test_vllm_server_goes_through_server_process(monkeypatch):
    started = []
    monkeypatch.setattr(launch, "ServerProcess", lambda command, **options: started.append(command) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        launch.VLLMServer("/venv/bin/python", "decoder").start()
    assert started[0][:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]


def test_an_environment_is_ready_when_its_imports_work_not_when_it_has_a_python(tmp_path, monkeypatch):
    half_built = tmp_path / "half-built"  # what a build has made before it installs anything
    (half_built / "bin").mkdir(parents=True)
    (half_built / "bin" / "python").symlink_to(sys.executable)
    empty = tmp_path / "empty"
    (empty / "bin").mkdir(parents=True)
    (empty / "bin" / "python").write_text("")
    (empty / "bin" / "python").chmod(0o755)
    assert venv_python(half_built, "import json") == str(half_built / "bin" / "python")
    assert venv_python(half_built, "import no_such_module_comi") is None
    assert venv_python(empty, "import json") is None
    assert venv_python(tmp_path / "missing", "import json") is None
    for venv in (half_built, empty):
        monkeypatch.setenv("COMI_VLLM_VENV", str(venv))
        assert find_vllm_python() is None
