"""`comi-qa` end to end, in subprocesses, as a user runs it."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import tiny_comi
from transformers import pipeline

from comi_hf import PIPELINE_TASK

DOCUMENT = "the code of red river is 4 8 2 1 . the code of blue lake is 1 2 3 4 . old mill is north ."
QUESTIONS = ["what is the code of red river ?", "what is the code of blue lake ?", "which city ?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("model")
    tiny_comi().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _run(args, cwd, stdin=None):
    command = shutil.which("comi-qa")
    assert command, "the console script is installed by `pip install -e .`"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([command, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=300, env=env)


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
        (["--context-file", "-", "--question", "q ?"], "   \n", "the context is empty"),
        (["--context-file", "doc.txt", "--question", "  "], None, "the question is empty"),
        (["--context-file", "doc.txt", "--questions-file", "none.txt"], None, "no such questions file"),
        (["--context-file", "doc.txt", "--questions-file", "blank.txt"], None, "no questions in blank.txt"),
        (["--context-file", "doc.txt", "--question", "q", "--merge-size", "0"], None, "--merge-size must be"),
    ],
)
def test_bad_input_is_one_line_and_status_2(model_dir, tmp_path, args, stdin, message):
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    (tmp_path / "blank.txt").write_text("\n \n")
    done = _run(["--model", str(model_dir), *args], tmp_path, stdin=stdin)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("comi-qa: error: ")  # one line, no traceback
    assert message in lines[0]


def test_a_directory_that_is_not_comi_is_refused(tmp_path):
    from conftest import backbone_config
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(backbone_config("qwen2")).save_pretrained(tmp_path / "plain")
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    for model in (str(tmp_path / "plain"), str(tmp_path / "nowhere")):
        done = _run(["--model", model, "--context-file", "doc.txt", "--question", "q ?"], tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "comi-qa: error:" in done.stderr


def test_module_entry_point(model_dir, tmp_path):
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "comi_hf.cli",
            "--model",
            str(model_dir),
            "--context-file",
            "doc.txt",
            "--question",
            "q ?",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
