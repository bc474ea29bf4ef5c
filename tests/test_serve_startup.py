"""`comi-serve` refuses what cannot work at start-up, in one line and exit status 2, before it
loads a model: a port out of range, a host or port it cannot listen on, a vLLM URL that is not
one, a model directory that does not exist. No vLLM server is needed: none of these gets that far.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import warnings

import pytest
from conftest import tiny_comi
from server_processes import free_port

import comi_hf_cli
from comi_hf.serving.admission import DEFAULT_ROUND_QUESTIONS, DEFAULT_SLICE_QUESTIONS
from comi_hf.serving.decoder import DEFAULT_MAX_IN_FLIGHT

VLLM = "http://127.0.0.1:9"  # never contacted: every case fails before


@pytest.fixture
def comi_serve(monkeypatch, capsys):
    """`comi-serve ARGS` in this process: its exit status and what it wrote to stderr."""
    # run_command reports warnings as one line each by replacing warnings.showwarning; put it back.
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        status = comi_hf_cli.comi_serve(list(args))
        return status, capsys.readouterr().err

    return run


@pytest.fixture
def busy_port():
    """A loopback port something else is listening on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line: no traceback, no uvicorn log
    return lines[0]


@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_a_port_out_of_range(comi_serve, port):
    status, err = comi_serve("--model", "/nonexistent", "--vllm-url", VLLM, "--port", port)
    assert (status, err) == (2, f"comi-serve: error: --port must be from 1 to 65535, got {port}\n")


def test_a_negative_token_budget_for_seeded_sampling(comi_serve):
    status, err = comi_serve("--model", "/nonexistent", "--vllm-url", VLLM, "--vllm-max-num-batched-tokens", "-1")
    assert (status, err) == (2, "comi-serve: error: --vllm-max-num-batched-tokens must be at least 0, got -1\n")


def test_a_host_that_does_not_resolve_is_refused_before_the_model_loads(comi_serve):
    # /nonexistent: had the model been loaded first, the error would name it instead.
    status, err = comi_serve("--model", "/nonexistent", "--vllm-url", VLLM, "--host", "no.such.host.invalid")
    assert status == 2
    assert _one_line(err).startswith("comi-serve: error: cannot listen on no.such.host.invalid:8080: unknown host")


def test_a_port_in_use_is_refused_before_the_model_loads(comi_serve, busy_port):
    status, err = comi_serve("--model", "/nonexistent", "--vllm-url", VLLM, "--port", str(busy_port))
    assert (status, err) == (2, f"comi-serve: error: cannot listen on 127.0.0.1:{busy_port}: the port is in use\n")


@pytest.mark.parametrize(
    "url,message",
    [
        ("not a url", "--vllm-url 'not a url' is not an http(s) URL with a host"),
        ("127.0.0.1:8000", "is not an http(s) URL with a host, e.g. http://127.0.0.1:8000"),
        ("http://exa mple:8000", "is not an http(s) URL with a host"),
        ("http://127.0.0.1:99999", "--vllm-url 'http://127.0.0.1:99999': Port out of range"),
        ("http://[::1", "--vllm-url 'http://[::1': Invalid IPv6 URL"),  # a traceback before
    ],
)
def test_a_vllm_url_that_is_not_one_is_refused_before_the_model_loads(comi_serve, url, message):
    status, err = comi_serve("--model", "/nonexistent", "--vllm-url", url, "--port", str(free_port()))
    assert status == 2
    line = _one_line(err)
    assert line.startswith("comi-serve: error: ") and message in line


def test_a_model_directory_that_does_not_exist_frees_the_port(comi_serve):
    port = free_port()
    status, err = comi_serve("--model", "/nonexistent", "--vllm-url", VLLM, "--port", str(port))
    assert (status, err) == (2, "comi-serve: error: no such model directory: /nonexistent\n")
    with socket.socket() as again:  # the socket bound before loading was closed
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize("option", ["--slice-questions", "--round-questions", "--vllm-max-in-flight"])
def test_compression_slices_and_rounds_of_at_least_one_question(comi_serve, option):
    status, err = comi_serve("--model", "/nonexistent", "--vllm-url", VLLM, option, "0")
    assert (status, err) == (2, f"comi-serve: error: {option} must be at least 1, got 0\n")


def test_compression_and_decoder_queue_settings_reach_the_service(comi_serve, monkeypatch):
    from comi_hf.serving import server

    class Built(Exception):
        pass

    def create_app(client, **options):
        raise Built(options)

    loaded = []
    monkeypatch.setattr(
        server.COMIServingClient, "from_pretrained", classmethod(lambda cls, *_, **options: loaded.append(options))
    )
    monkeypatch.setattr(server, "create_app", create_app)
    with pytest.raises(Built) as built:
        comi_serve("--model", "m", "--vllm-url", VLLM, "--port", str(free_port()), "--slice-questions", "3")
    # The parser repeats the defaults (parsing imports nothing): they must be the serving code's.
    assert (built.value.args[0]["slice_questions"], built.value.args[0]["round_questions"]) == (
        3,
        DEFAULT_ROUND_QUESTIONS,
    )
    with pytest.raises(Built) as built:
        comi_serve("--model", "m", "--vllm-url", VLLM, "--port", str(free_port()))
    assert built.value.args[0]["slice_questions"] == DEFAULT_SLICE_QUESTIONS
    assert [(options["vllm_max_in_flight"], options["vllm_priority"]) for options in loaded] == [
        (DEFAULT_MAX_IN_FLIGHT, False)
    ] * 2
    with pytest.raises(Built):
        port = str(free_port())
        comi_serve("--model", "m", "--vllm-url", VLLM, "--port", port, "--vllm-priority", "--vllm-max-in-flight", "7")
    assert (loaded[-1]["vllm_max_in_flight"], loaded[-1]["vllm_priority"]) == (7, True)


@pytest.mark.slow
def test_the_console_script_says_one_line_and_exits_2(busy_port, tmp_path, tokenizer):
    """As one runs it, with a model that loads: uvicorn's own report of a port in use was several
    lines and exit status 3, after the model had loaded."""
    tiny_comi().save_pretrained(tmp_path / "comi")
    tokenizer.save_pretrained(tmp_path / "comi")
    command = [shutil.which("comi-serve"), "--model", str(tmp_path / "comi"), "--vllm-url", VLLM]
    command += ["--port", str(busy_port)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr) == f"comi-serve: error: cannot listen on 127.0.0.1:{busy_port}: the port is in use"
    assert done.stdout == ""
