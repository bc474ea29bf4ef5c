"""examples/train.py and examples/evaluate.py end to end, in subprocesses, on the shipped data."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ENV, EXAMPLES, run_command

from comi_hf.metrics import normalize_answer

pytestmark = pytest.mark.slow

TRAIN, VALIDATION = EXAMPLES / "data" / "train.jsonl", EXAMPLES / "data" / "validation.jsonl"


def _load_example(name, path=None):
    """An example script as a module (it is no package's: loaded from its file). Registered in
    `sys.modules` first, as an import does: `dataclasses` looks the module up there to resolve the
    string annotations of the script's argument dataclasses."""
    module_name = f"comi_script_{name}"  # never a real package's name (`evaluate` is one)
    spec = importlib.util.spec_from_file_location(module_name, path or EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _train_args(tiny_backbone, output_dir, *extra):
    return [
        str(EXAMPLES / "train.py"),
        "--model_name_or_path", str(tiny_backbone),
        "--train_file", str(TRAIN),
        "--output_dir", str(output_dir),
        "--encoder_layers", "2",
        "--merge_size", "4",
        "--merge_sizes", "2", "4",
        "--per_device_train_batch_size", "8",
        "--lora_r", "8",
        "--lora_alpha", "16",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def test_training_lowers_the_loss_and_saves_a_loadable_model(tiny_backbone, tmp_path):
    output = tmp_path / "comi"
    args = ["--max_steps", "32", "--learning_rate", "1e-2", "--logging_steps", "8", "--save_steps", "32"]
    args += ["--validation_file", str(VALIDATION), "--keep_adapter"]
    run_command([sys.executable, *_train_args(tiny_backbone, output, *args)], tmp_path)
    state = json.loads((output / "checkpoint-32" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # The final directory: merged model, tokenizer, code, pipeline, model card, metrics; adapter kept apart.
    for name in ("model.safetensors", "tokenizer.json", "modeling_comi.py", "pipeline_comi.py", "README.md"):
        assert (output / name).exists(), name
    assert (output / "adapter" / "adapter_model.safetensors").exists()
    metrics = json.loads((output / "eval_metrics.json").read_text())
    assert metrics["num_samples"] == 16 and 0 <= metrics["exact_match"] <= 1
    card = (output / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "comi" in card
    assert "| exact match | F1 |" in card and "Merge size" in card
    check = (
        "from transformers import AutoModel, pipeline\n"
        f"model = AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True)\n"
        "assert not any('lora' in name for name, _ in model.named_parameters())\n"
        f"qa = pipeline(model={str(output)!r}, trust_remote_code=True)\n"
        "print(qa(context='the code of red river is 1 2 3 4 .', question='what is the code of red river ?'))\n"
    )
    run_command([sys.executable, "-c", check], tmp_path)


def _card_loss(directory):
    return next(line for line in (directory / "README.md").read_text().splitlines() if "mean training loss" in line)


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tiny_backbone, tmp_path):
    args = ["--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2"]
    whole = run_command([sys.executable, *_train_args(tiny_backbone, tmp_path / "whole", *args)], tmp_path)
    assert "pin_memory" not in whole.stderr  # no accelerator here: pinning is off, and torch does not warn
    weights = (tmp_path / "whole" / "model.safetensors").read_bytes()
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed / "checkpoint-2")
    # `True` resumes from the latest checkpoint, as in transformers' own scripts.
    done = run_command(
        [
            sys.executable,
            *_train_args(tiny_backbone, resumed, *args),
            "--resume_from_checkpoint",
            "True",
            "--log_level",
            "info",
        ],
        tmp_path,
    )
    assert "Resuming training from checkpoint with epoch 0 and global step 2" in done.stderr + done.stdout
    assert (resumed / "model.safetensors").read_bytes() == weights
    assert _card_loss(resumed) == _card_loss(tmp_path / "whole")  # the mean over all 6 steps, not the last 4
    # Resuming from the last checkpoint (a run killed before its final save) trains nothing more.
    (resumed / "model.safetensors").unlink()
    run_command(
        [sys.executable, *_train_args(tiny_backbone, resumed, *args), "--resume_from_checkpoint", "True"], tmp_path
    )
    assert sorted(path.name for path in resumed.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert (resumed / "model.safetensors").read_bytes() == weights
    assert _card_loss(resumed) == _card_loss(tmp_path / "whole")


@pytest.mark.parametrize(
    "script,arguments,message",
    [
        ("train.py", ["--resume_from_checkpoint", "True"], "no checkpoint-* folder in"),
        ("train.py", ["--train_file", "LATIN1"], "line 1: not UTF-8 text"),
        ("train.py", ["--validation_file", "MISSING"], "No such data file"),
        ("evaluate.py", ["--merge_size", "0"], "--merge_size must be at least 1, got 0"),
        ("evaluate.py", ["--test_file", "LATIN1"], "line 1: not UTF-8 text"),
        ("evaluate.py", ["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be at least 1"),
    ],
)
def test_bad_arguments_and_data_end_in_one_line_before_any_model_loads(tmp_path, script, arguments, message):
    (tmp_path / "latin1.jsonl").write_bytes('{"input": "café", "prompt": "q", "answer": "a"}\n'.encode("latin-1"))
    replace = {"LATIN1": str(tmp_path / "latin1.jsonl"), "MISSING": str(tmp_path / "none.jsonl")}
    arguments = [replace.get(argument, argument) for argument in arguments]
    if script == "train.py":
        base = ["--model_name_or_path", "no-model-needed", "--train_file", str(TRAIN), "--output_dir", str(tmp_path)]
    else:
        base = [
            "--model_name_or_path",
            "no-model-needed",
            "--test_file",
            str(VALIDATION),
            "--output_dir",
            str(tmp_path),
        ]
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *base, *arguments],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and errors[0].startswith(f"{script}: error: ") and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_two_processes_under_accelerate(tiny_backbone, tmp_path):
    accelerate = shutil.which("accelerate")
    assert accelerate
    output = tmp_path / "comi"
    # torchrun-style launch of 2 processes; `--use_cpu` makes them data-parallel over gloo.
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    train = _train_args(tiny_backbone, output, "--max_steps", "3", "--save_strategy", "no", "--use_cpu")
    done = run_command([*launch, *train], tmp_path)
    assert "find_unused_parameters" not in done.stderr  # every trained parameter gets a gradient
    assert "- processes: 2" in (output / "README.md").read_text()
    assert "- effective batch size: 16" in (output / "README.md").read_text()
    check = f"from transformers import AutoModel; AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True)"
    run_command([sys.executable, "-c", check], tmp_path)
    # Evaluation sharded over the 2 processes gives the single-process results, in input order.
    evaluate = [str(EXAMPLES / "evaluate.py"), "--model_name_or_path", str(output), "--test_file", str(VALIDATION)]
    evaluate += ["--max_new_tokens", "4", "--per_device_eval_batch_size", "3"]
    run_command([*launch, *evaluate, "--output_dir", str(tmp_path / "sharded")], tmp_path)
    run_command([sys.executable, *evaluate, "--output_dir", str(tmp_path / "single")], tmp_path)
    sharded = (tmp_path / "sharded" / "eval_results.jsonl").read_text().splitlines()
    assert len(sharded) == 16
    assert sharded == (tmp_path / "single" / "eval_results.jsonl").read_text().splitlines()


def test_evaluate_scores_known_answers_exactly(tiny_backbone, tmp_path):
    model = tmp_path / "comi"
    run_command(
        [sys.executable, *_train_args(tiny_backbone, model, "--max_steps", "1", "--save_strategy", "no")], tmp_path
    )
    # A random model may answer with punctuation or stop at once; forbid both so that every
    # answer is 3 words and the partial-credit case below always exists.
    vocabulary = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    config = json.loads((model / "generation_config.json").read_text())
    config["suppress_tokens"] = [index for token, index in vocabulary.items() if not normalize_answer(token)]
    config["eos_token_id"] = None
    (model / "generation_config.json").write_text(json.dumps(config))
    rows = [json.loads(line) for line in VALIDATION.read_text().splitlines()[:6]]
    # First learn what the model answers, then write references that make the scores known.
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_command(
        [sys.executable, str(EXAMPLES / "evaluate.py"), "--model_name_or_path", str(model), "--test_file", str(probe),
         "--output_dir", str(tmp_path / "probe"), "--max_new_tokens", "3", "--merge_size", "2"],
        tmp_path,
    )  # fmt: skip
    predictions = [json.loads(line)["prediction"] for line in (tmp_path / "probe" / "eval_results.jsonl").open()]
    expected_em, expected_f1 = [], []
    for position, row in enumerate(rows):
        words = normalize_answer(predictions[position]).split()
        if position % 3 == 0:
            row["answer"] = ["zzz", predictions[position]]  # the prediction itself is a reference
            expected_em.append(1.0)
            expected_f1.append(1.0 if words else 0.0)
        elif position % 3 == 1 and words:
            row["answer"] = " ".join(words[:1] + ["qqq"])  # one shared token: P 1/len, R 1/2
            precision, recall = 1 / len(words), 1 / 2
            expected_em.append(0.0)
            expected_f1.append(2 * precision * recall / (precision + recall))
        else:
            row["answer"] = "qqq"  # nothing shared
            expected_em.append(0.0)
            expected_f1.append(0.0)
    assert any(0 < f1 < 1 for f1 in expected_f1), f"no partial-credit case in {predictions}"
    known = tmp_path / "known.jsonl"
    known.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = run_command(
        [sys.executable, str(EXAMPLES / "evaluate.py"), "--model_name_or_path", str(model), "--test_file", str(known),
         "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "3", "--per_device_eval_batch_size", "4",
         "--merge_size", "2"],
        tmp_path,
    )  # fmt: skip
    metrics_text = (tmp_path / "eval" / "eval_metrics.json").read_text()
    assert metrics_text.endswith("}\n")
    metrics = json.loads(metrics_text)
    assert metrics["num_samples"] == 6 and metrics["merge_size"] == 2
    assert metrics["compression_ratio"] == round(metrics["compression_ratio"], 4)
    results = [json.loads(line) for line in (tmp_path / "eval" / "eval_results.jsonl").open()]
    assert metrics["exact_match"] == pytest.approx(sum(expected_em) / 6)
    assert metrics["f1"] == pytest.approx(sum(expected_f1) / 6)
    assert [result["exact_match"] for result in results] == expected_em
    assert 1.5 < metrics["compression_ratio"] <= 2
    assert [result["question"] for result in results] == [row["prompt"] for row in rows]
    assert set(results[0]) >= {"id", "context", "question", "prediction", "references"}
    assert json.loads(done.stdout.strip().splitlines()[-1]) == metrics


def test_quickstart_tour_runs_and_answers_right(tmp_path):
    seen = _load_example("quickstart").tour(tmp_path / "tour")
    assert seen["one"]["answer"] == "9 9 3 7" and seen["several"]["answers"] == ["9 9 3 7", "3 1 5 4"]
    assert [result["answer"] for result in seen["batch"]] == ["9 9 3 7", "3 1 5 4"]
    assert seen["generate"] == ["9 9 3 7"] and seen["encoded_once"] == ["9 9 3 7", "3 1 5 4"]
    assert seen["memory_shape"] == (1, 17, 64) and 0 < seen["loss"] < 0.5 and seen["reloaded_equal"]
    assert seen["from_backbone_shape"][0] == 2
    assert "<html" in (tmp_path / "tour" / "explanation.html").read_text().lower()
