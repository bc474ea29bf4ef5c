"""Start and stop servers for tests, benchmarks and local runs: vLLM in its own environment, and
any command that must not outlive the process that started it.

vLLM pins its own torch and transformers, so it usually lives in another virtual environment than
comi_hf; `VLLMServer` starts `python -m vllm.entrypoints.openai.api_server` with that
environment's Python, on loopback, and waits until it answers.

    with VLLMServer(python="/path/to/vllm-venv/bin/python", model="decoder-dir") as server:
        client = COMIServingClient.from_pretrained("comi-model", vllm_url=server.url)

Every server goes through `ServerProcess`: its own process group, which a stop ends whole (vLLM's
engine and worker processes included), and which dies with the process that started it even when
that one is SIGKILLed (a test run stopped by a timeout), so that no server is left holding a port.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_VLLM_VENV", "ServerProcess", "VLLMServer", "find_vllm_python", "free_port", "venv_python"]

# Where `.ci/run` makes vLLM's environment (COMI_VLLM_VENV overrides it).
DEFAULT_VLLM_VENV = Path.home() / ".cache" / "comi_hf" / "venvs" / "vllm"
# What vLLM's environment must import to serve COMI: vLLM, and comi_hf's logits processor.
VLLM_IMPORTS = "import vllm, comi_hf_vllm"
_LIFELINE = Path(__file__).with_name("lifeline.py")


def venv_python(venv: str | os.PathLike, check: str) -> str | None:
    """The Python of the virtual environment `venv` if the code `check` (e.g. `"import vllm"`) runs
    there, else None.

    A `bin/python` alone says nothing: an environment still being built, or whose build stopped
    half-way, has one too.
    """
    python = Path(venv) / "bin" / "python"
    try:
        done = subprocess.run(
            [str(python), "-c", check],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return str(python) if done.returncode == 0 else None


def find_vllm_python() -> str | None:
    """The Python of vLLM's environment ($COMI_VLLM_VENV, else the default place), if vLLM and
    comi_hf's logits processor import there (about 10 s on a CPU machine)."""
    return venv_python(os.environ.get("COMI_VLLM_VENV", DEFAULT_VLLM_VENV), VLLM_IMPORTS)


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess(subprocess.Popen):
    """`command` as a child process leading a process group of its own, which dies with this process.

    Whatever the command starts (vLLM's engine and worker processes) is in its group. `stop()`,
    `kill()` and leaving a `with` block end the whole group, and `terminate()` and
    `send_signal()` signal it. If this process dies without stopping it, however it dies (SIGKILL
    included), a watchdog in the group ends the group within seconds (`lifeline.py`: a pipe whose
    only writer is this process reaches end of file when it dies). `pid` and `returncode` are the
    command's own.

    Args:
        command: the program and its arguments.
        options: `subprocess.Popen`'s (`env`, `cwd`, `stdout`, ...; not `shell`).
    """

    def __init__(self, command: Sequence[str | os.PathLike], **options: Any) -> None:
        command = [os.fspath(part) for part in command]
        if os.sep not in command[0]:
            env = options.get("env")
            path = (os.environ if env is None else env).get("PATH")
            if shutil.which(command[0], path=path) is None:
                raise FileNotFoundError(errno.ENOENT, "no such command", command[0])
        read_end, self._lifeline = os.pipe()  # both ends close on exec: only the launcher gets one
        try:
            super().__init__(
                [sys.executable, "-I", str(_LIFELINE), str(read_end), *command],
                start_new_session=True,
                pass_fds=(read_end,),
                **options,
            )
        except BaseException:
            os.close(self._lifeline)
            self._lifeline = None
            raise
        finally:
            os.close(read_end)
        self.args = command

    def send_signal(self, sig: int) -> None:
        """`sig` to the whole group, until `stop()`."""
        if self._lifeline is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the whole group, and the command reaped."""
        self.stop(timeout=0)

    def stop(self, timeout: float = 60.0) -> None:
        """Ends the group: SIGTERM, SIGKILL after `timeout` seconds, and SIGKILL to whatever
        outlived the command (the watchdog, processes the command did not stop); then reaps the
        command. Again, it does nothing."""
        if self._lifeline is None:
            return
        try:
            if self.returncode is None:
                self.send_signal(signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    self.wait(timeout)
            # The group's id cannot have gone to another process, even with the command reaped: the
            # watchdog, which ignores SIGTERM, is in the group until this.
            self.send_signal(signal.SIGKILL)
            self.wait()
        finally:
            os.close(self._lifeline)
            self._lifeline = None

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            super().__exit__(*exc)


class VLLMServer:
    """A vLLM OpenAI-compatible server with prompt embeddings on, as a child process.

    Args:
        python: the interpreter of vLLM's environment.
        model: the directory to serve (a decoder exported by `comi-export-decoder`).
        port: its port (default: a free one); it listens on 127.0.0.1 only.
        max_model_len: the longest prompt plus answer it accepts.
        dtype: the weights' dtype on the server.
        extra_args: more `api_server` arguments (e.g. `["--no-enable-prefix-caching"]`).
        env: more environment variables. On a CPU build, `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache)
            defaults to 1 and `--gpu-memory-utilization` to 0.15, the share of RAM it may reserve.
        log: file for the server's output (default: discarded).
        startup_timeout: seconds to wait for it to answer.
    """

    def __init__(
        self,
        python: str,
        model: str | os.PathLike,
        *,
        port: int | None = None,
        max_model_len: int = 4096,
        dtype: str = "float32",
        extra_args: list[str] | None = None,
        env: dict | None = None,
        log: str | os.PathLike | None = None,
        startup_timeout: float = 600.0,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--enable-prompt-embeds", "--dtype", dtype,
            "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(max_model_len),
            "--enforce-eager", "--gpu-memory-utilization", "0.15", *(extra_args or []),
        ]  # fmt: skip
        self.env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, **(env or {})}
        self.log = log
        self.startup_timeout = startup_timeout
        self.process: ServerProcess | None = None

    def start(self) -> VLLMServer:
        with ExitStack() as files:  # the server keeps its own copy of the log's descriptor
            output = files.enter_context(open(self.log, "w")) if self.log else subprocess.DEVNULL
            self.process = ServerProcess(self.command, env=self.env, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    where = f"; its output is in {self.log}" if self.log else ""
                    raise RuntimeError(
                        f"the vLLM server exited with status {self.process.returncode} at startup{where}"
                    )
                if self.healthy():
                    return self
                time.sleep(0.5)
            raise TimeoutError(f"the vLLM server did not answer within {self.startup_timeout:.0f} s")
        except BaseException:
            self.stop()  # what it started before failing, too
            raise

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=60)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
