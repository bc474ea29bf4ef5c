"""Start and stop a vLLM server in its own environment, for tests, benchmarks and local runs.

vLLM pins its own torch and transformers, so it usually lives in another virtual environment than
comi_hf; this starts `python -m vllm.entrypoints.openai.api_server` with that environment's
Python, on loopback, and waits until it answers.

    with VLLMServer(python="/path/to/vllm-venv/bin/python", model="decoder-dir") as server:
        client = COMIServingClient.from_pretrained("comi-model", vllm_url=server.url)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["DEFAULT_VLLM_VENV", "VLLMServer", "find_vllm_python", "free_port"]

# Where `.ci/run` makes vLLM's environment (COMI_VLLM_VENV overrides it).
DEFAULT_VLLM_VENV = Path.home() / ".cache" / "comi_hf" / "venvs" / "vllm"


def find_vllm_python() -> str | None:
    """The Python of vLLM's environment ($COMI_VLLM_VENV, else the default place), if it exists."""
    venv = Path(os.environ.get("COMI_VLLM_VENV", DEFAULT_VLLM_VENV))
    python = venv / "bin" / "python"
    return str(python) if python.is_file() else None


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
        self.process: subprocess.Popen | None = None

    def start(self) -> VLLMServer:
        output = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 (kept for the process)
        # Its own process group: stopping it stops vLLM's engine and worker processes too.
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                where = f"; its output is in {self.log}" if self.log else ""
                raise RuntimeError(f"the vLLM server exited with status {self.process.returncode} at startup{where}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the vLLM server did not answer within {self.startup_timeout:.0f} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
