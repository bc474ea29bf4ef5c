"""`comi-qa` end to end, in subprocesses, as a user runs it."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import tiny_comi
from transformers import pipeline

from comi_hf import PIPELINE_TASK

pytestmark = pytest.mark.slow

DOCUMENT = "the code of red river is 4 8 2 1 . the code of blue lake is 1 2 3 4 . old mill is north ."
QUESTIONS = ["what is the code of red river ?", "what is the code of blue lake ?", "which city ?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("model")
    tiny_comi().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _run(args, cwd, stdin=None, program="comi-qa", **env):
    command = shutil.which(program)
    assert command, "the console script is installed by `pip install -e .`"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([command, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300, env=env)


def _one_error_line(done, message):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("comi-qa: error: "), done.stderr  # one line, no traceback
    assert message in lines[0]


def test_one_question_prints_the_pipeline_answer(model_dir, tmp_path, tokenizer):
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    done = _run(["--model", str(model_dir), "--context-file", "doc.txt", "--question", QUESTIONS[0]], tmp_path)
    assert done.returncode == 0, done.stderr
    pipe = pipeline(PIPELINE_TASK, model=tiny_comi(), tokenizer=tokenizer)
    assert done.stdout == pipe(context=DOCUMENT, question=QUESTIONS[0])["answer"] + "\n"


def test_questions_file_from_stdin_with_json_and_explanation(model_dir, tmp_path, tokenizer):
    (tmp_path / "questions.txt").write_text("\n".join(QUESTIONS) + "\n\n")
    args = ["--model", str(model_dir), "--context-file", "-", "--questions-file", "questions.txt", "--json"]
    args += ["--explain", "page.html", "--merge-size", "2", "--max-new-tokens", "5", "--batch-size", "2"]
    done = _run(args, tmp_path, stdin=DOCUMENT)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["question"] for line in lines] == QUESTIONS
    pipe = pipeline(PIPELINE_TASK, model=tiny_comi(), tokenizer=tokenizer)
    for line, question in zip(lines, QUESTIONS, strict=True):
        alone = pipe(context=DOCUMENT, question=question, merge_size=2, max_new_tokens=5)
        assert line["answer"] == alone["answer"]
        assert line["memory_tokens"] == alone["memory_tokens"]
        assert line["context_tokens"] == alone["context_tokens"]
    page = (tmp_path / "page.html").read_text()
    assert page.count('class="tok"') == len(QUESTIONS) * lines[0]["context_tokens"]
    assert "Answering" in done.stderr  # the progress bar goes to stderr


@pytest.mark.parametrize(
    "args,stdin,message",
    [
        (["--context-file", "missing.txt", "--question", "q ?"], None, "no such context file: missing.txt"),
        (["--context-file", "-", "--question", "q ?"], "   \n", "`context` is empty"),
        (["--context-file", "-", "--question", "q ?"], "\u200b\u200b\n", "`context` is empty"),
        (["--context-file", "doc.txt", "--question", "  "], None, "`question` is empty"),
        (["--context-file", "doc.txt", "--questions-file", "none.txt"], None, "no such questions file"),
        (["--context-file", "doc.txt", "--questions-file", "blank.txt"], None, "no questions in blank.txt"),
        (["--context-file", "doc.txt", "--question", "q", "--merge-size", "0"], None, "--merge-size must be"),
        (["--context-file", "doc.txt", "--question", "q", "--merge-size", str(10**30)], None, "--merge-size must be"),
        (["--context-file", "doc.txt", "--question", "q", "--device", "meta"], None, "device 'meta' holds no data"),
        (["--context-file", "doc.txt", "--question", "q", "--batch-size", "0"], None, "--batch-size must be"),
        (["--context-file", "binary.txt", "--question", "q"], None, "the context file binary.txt is not UTF-8 text"),
        (["--context-file", ".", "--question", "q"], None, "the context file . is a directory, not a file"),
    ],
)
def test_bad_input_is_one_line_and_status_2(model_dir, tmp_path, args, stdin, message):
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    done = _run(["--model", str(model_dir), *args], tmp_path, stdin=stdin)
    assert done.stdout == ""
    _one_error_line(done, message)


def test_a_byte_order_mark_does_not_change_the_answer(model_dir, tmp_path, tokenizer):
    (tmp_path / "doc.txt").write_text(DOCUMENT, encoding="utf-8")
    (tmp_path / "bom.txt").write_text(DOCUMENT, encoding="utf-8-sig")
    (tmp_path / "questions.txt").write_text("\n".join(QUESTIONS), encoding="utf-8-sig")
    assert (tmp_path / "bom.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    plain = _run(
        ["--model", str(model_dir), "--context-file", "doc.txt", "--questions-file", "questions.txt"], tmp_path
    )
    marked = _run(
        ["--model", str(model_dir), "--context-file", "bom.txt", "--questions-file", "questions.txt"], tmp_path
    )
    piped = _run(
        ["--model", str(model_dir), "--context-file", "-", "--questions-file", "questions.txt"],
        tmp_path,
        stdin="\ufeff" + DOCUMENT,
    )
    assert plain.returncode == marked.returncode == piped.returncode == 0, marked.stderr
    pipe = pipeline(PIPELINE_TASK, model=tiny_comi(), tokenizer=tokenizer)
    alone = [pipe(context=DOCUMENT, question=question)["answer"] + "\n" for question in QUESTIONS]
    assert plain.stdout == marked.stdout == piped.stdout == "".join(alone)


def test_closed_stdin_and_unwritable_stdout(model_dir, tmp_path):
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    command = [shutil.which("comi-qa"), "--model", str(model_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    closed = subprocess.run(
        [*command, "--context-file", "-", "--question", "q ?"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        preexec_fn=lambda: os.close(0),
    )
    _one_error_line(closed, "stdin is closed")
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            done = subprocess.run(
                [*command, "--context-file", "doc.txt", "--question", "q ?"],
                cwd=tmp_path,
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                timeout=300,
            )
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert (
            done.stderr.strip().splitlines()[-1]
            == "comi-qa: error: cannot write the answers to stdout: No space left on device"
        )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks(model_dir, tmp_path):
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    done = _run(
        ["--model", str(model_dir), "--context-file", "doc.txt", "--question", "q ?", "--device", "cuda"], tmp_path
    )
    _one_error_line(done, "device 'cuda' is not available here (Torch not compiled with CUDA enabled)")
    done = _run(
        ["--model", str(model_dir), "--context-file", "doc.txt", "--question", "q ?", "--device", "gpu7"], tmp_path
    )
    _one_error_line(done, "unknown device 'gpu7'")
    done = _run(
        ["--model", str(model_dir), "--context-file", "doc.txt", "--question", "q ?", "--device", "mps"], tmp_path
    )
    _one_error_line(done, "device 'mps' is not available here")
    assert len(done.stderr) < 300, done.stderr


def test_broken_model_directories(model_dir, tmp_path):
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    truncated = tmp_path / "truncated"
    shutil.copytree(model_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle is never read")
    for directory, message in ((truncated, "cannot load a COMI model from"), (pickled, "model.safetensors")):
        done = _run(["--model", str(directory), "--context-file", "doc.txt", "--question", "q ?"], tmp_path)
        _one_error_line(done, message)


def test_a_hub_id_fails_at_once_when_the_hub_cannot_be_answered(tmp_path):
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    args = ["--model", "someone/not-cached", "--context-file", "doc.txt", "--question", "q ?"]
    offline = _run(args, tmp_path)
    _one_error_line(
        offline,
        "someone/not-cached is not a local directory, and is not in the local Hub cache (HF_HUB_OFFLINE is set)",
    )
    # A Hub that refuses connections (a closed loopback port): no minute of retries.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    unreachable = _run(args, tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 30
    _one_error_line(unreachable, "the Hub cannot be reached")


@pytest.mark.parametrize("program", ["comi-qa", "comi-convert", "comi-synth"])
def test_help_and_argument_errors_answer_without_loading_torch(program, tmp_path):
    for args, status in ((["--help"], 0), (["--no-such-option"], 2)):
        started = time.monotonic()
        done = _run(args, tmp_path, program=program)
        assert done.returncode == status
        assert time.monotonic() - started < 1.0, f"{program} {args[0]} took {time.monotonic() - started:.2f} s"
    assert done.stdout.startswith("usage:") or "usage:" in done.stderr
    # The parsers import nothing heavy (the timing above is the user's view; this is the cause).
    parser = program.replace("comi-", "") + "_parser"
    script = f"import sys, comi_hf_cli; comi_hf_cli.{parser}(); print('torch' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert loaded.stdout.strip() == "False"


def test_a_directory_that_is_not_comi_is_refused(tmp_path):
    from conftest import backbone_config
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(backbone_config("qwen2")).save_pretrained(tmp_path / "plain")
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    for model, message in (
        (str(tmp_path / "plain"), "is a qwen2 model, not a COMI model"),
        (str(tmp_path / "nowhere"), "no such model directory"),
        ("./nowhere", "no such model directory: ./nowhere"),
    ):
        done = _run(["--model", model, "--context-file", "doc.txt", "--question", "q ?"], tmp_path)
        _one_error_line(done, message)


def test_closed_stdout_is_one_line(model_dir, tmp_path):
    """`comi-qa ... >&-`: Python starts with sys.stdout = None."""
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    done = subprocess.run(
        [shutil.which("comi-qa"), "--model", str(model_dir), "--context-file", "doc.txt", "--question", "q ?"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
        preexec_fn=lambda: os.close(1),
    )
    _one_error_line(done, "stdout is closed")


def test_a_context_too_long_for_the_decoder_is_refused_before_encoding(model_dir, tmp_path):
    """The tiny decoder has 4096 positions: 20,000 tokens at merge size 4 need about 5,000."""
    (tmp_path / "long.txt").write_text(" ".join(DOCUMENT.split() * 800))
    started = time.monotonic()
    done = _run(["--model", str(model_dir), "--context-file", "long.txt", "--question", "q ?"], tmp_path)
    _one_error_line(done, "more than its max_position_embeddings of 4096")
    assert "Encoding" not in done.stderr and time.monotonic() - started < 60
    assert re.search(r"the context has \d+ tokens \(\d+ segment\(s\) of up to 64\)", done.stderr)


def test_long_encodings_show_progress(model_dir, tmp_path):
    (tmp_path / "doc.txt").write_text(" ".join(DOCUMENT.split() * 12))  # several 64-token segments
    done = _run(["--model", str(model_dir), "--context-file", "doc.txt", "--question", "q ?"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Encoding" in done.stderr and "segment" in done.stderr
    assert "Loading weights" not in done.stderr  # loading a model is not the user's wait


def test_unknown_words_are_said_on_stderr(tmp_path):
    """The shipped model's word-level tokenizer knows 64 words: ordinary English is mostly `<unk>`."""
    (tmp_path / "doc.txt").write_text("The committee approved the budget after a long debate about schools.")
    done = _run(["--context-file", "doc.txt", "--question", "what is the code of red river ?"], tmp_path)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if line.startswith("comi-qa: warning: ")]
    assert len(warning) == 1 and "tokens of `context` are unknown to the tokenizer" in warning[0], done.stderr


def test_damaged_model_directories_are_one_line(model_dir, tmp_path):
    """Flipped bytes in a weight tensor (here: a float32 NaN), no tokenizer, no config."""
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    flipped = tmp_path / "flipped"
    shutil.copytree(model_dir, flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # the last float32 of the last tensor becomes NaN
    (flipped / "model.safetensors").write_bytes(bytes(data))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    no_config = tmp_path / "no_config"
    shutil.copytree(model_dir, no_config)
    (no_config / "config.json").unlink()
    for directory, message in (
        (flipped, "hold 1 NaN or infinite value(s)"),
        (no_tokenizer, "cannot load the tokenizer of"),
        (no_config, "has no config.json: it is not a model directory"),
    ):
        done = _run(["--model", str(directory), "--context-file", "doc.txt", "--question", "q ?"], tmp_path)
        _one_error_line(done, message)
