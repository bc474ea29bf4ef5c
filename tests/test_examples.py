"""examples/train.py and examples/evaluate.py end to end, in subprocesses, on the shipped data."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from comi_hf import DEFAULT_MODEL
from comi_hf.data import tokenize_example
from comi_hf.metrics import normalize_answer
from comi_hf.synthetic import SPLIT_SEEDS, FactSpan, SyntheticDocument, make_document

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TRAIN, VALIDATION = EXAMPLES / "data" / "train.jsonl", EXAMPLES / "data" / "validation.jsonl"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _load_example(name, path=None):
    """An example script as a module (it is no package's: loaded from its file)."""
    spec = importlib.util.spec_from_file_location(name, path or EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(command, cwd, timeout=600, env=None):
    done = subprocess.run(command, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    directory = tmp_path_factory.mktemp("backbone")
    _run([sys.executable, str(EXAMPLES / "make_tiny_backbone.py"), str(directory)], directory)
    return directory


def _train_args(backbone, output_dir, *extra):
    return [
        str(EXAMPLES / "train.py"),
        "--model_name_or_path", str(backbone),
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


def test_training_lowers_the_loss_and_saves_a_loadable_model(backbone, tmp_path):
    output = tmp_path / "comi"
    args = ["--max_steps", "32", "--learning_rate", "1e-2", "--logging_steps", "8", "--save_steps", "32"]
    args += ["--validation_file", str(VALIDATION), "--keep_adapter"]
    _run([sys.executable, *_train_args(backbone, output, *args)], tmp_path)
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
    _run([sys.executable, "-c", check], tmp_path)


def _card_loss(directory):
    return next(line for line in (directory / "README.md").read_text().splitlines() if "mean training loss" in line)


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(backbone, tmp_path):
    args = ["--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2"]
    whole = _run([sys.executable, *_train_args(backbone, tmp_path / "whole", *args)], tmp_path)
    assert "pin_memory" not in whole.stderr  # no accelerator here: pinning is off, and torch does not warn
    weights = (tmp_path / "whole" / "model.safetensors").read_bytes()
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed / "checkpoint-2")
    # `True` resumes from the latest checkpoint, as in transformers' own scripts.
    done = _run(
        [
            sys.executable,
            *_train_args(backbone, resumed, *args),
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
    _run([sys.executable, *_train_args(backbone, resumed, *args), "--resume_from_checkpoint", "True"], tmp_path)
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


def test_two_processes_under_accelerate(backbone, tmp_path):
    accelerate = shutil.which("accelerate")
    assert accelerate
    output = tmp_path / "comi"
    # torchrun-style launch of 2 processes; `--use_cpu` makes them data-parallel over gloo.
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    train = _train_args(backbone, output, "--max_steps", "3", "--save_strategy", "no", "--use_cpu")
    done = _run([*launch, *train], tmp_path)
    assert "find_unused_parameters" not in done.stderr  # every trained parameter gets a gradient
    assert "- processes: 2" in (output / "README.md").read_text()
    assert "- effective batch size: 16" in (output / "README.md").read_text()
    check = f"from transformers import AutoModel; AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True)"
    _run([sys.executable, "-c", check], tmp_path)
    # Evaluation sharded over the 2 processes gives the single-process results, in input order.
    evaluate = [str(EXAMPLES / "evaluate.py"), "--model_name_or_path", str(output), "--test_file", str(VALIDATION)]
    evaluate += ["--max_new_tokens", "4", "--per_device_eval_batch_size", "3"]
    _run([*launch, *evaluate, "--output_dir", str(tmp_path / "sharded")], tmp_path)
    _run([sys.executable, *evaluate, "--output_dir", str(tmp_path / "single")], tmp_path)
    sharded = (tmp_path / "sharded" / "eval_results.jsonl").read_text().splitlines()
    assert len(sharded) == 16
    assert sharded == (tmp_path / "single" / "eval_results.jsonl").read_text().splitlines()


def test_evaluate_scores_known_answers_exactly(backbone, tmp_path):
    model = tmp_path / "comi"
    _run([sys.executable, *_train_args(backbone, model, "--max_steps", "1", "--save_strategy", "no")], tmp_path)
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
    _run(
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
    done = _run(
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


def test_default_model_recipe_quick_mode(tmp_path):
    """Every step of examples/train_default_model.sh (data, pretraining, fine-tuning, evaluation, shipping)."""
    output = tmp_path / "shipped"
    command = ["bash", str(EXAMPLES / "train_default_model.sh"), str(tmp_path / "work"), str(output)]
    done = subprocess.run(command, cwd=tmp_path, env=dict(ENV, QUICK="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "done in" in done.stdout
    log = json.loads((tmp_path / "work" / "backbone" / "pretraining_log.json").read_text())
    assert [entry["step"] for entry in log["curve"]] == [2, 4]
    results = json.loads((output / "results.json").read_text())
    assert [(entry["words"], entry["merge_size"], entry["num_samples"]) for entry in results["test"]] == [(256, 8, 8)]
    for name in ("model.safetensors", "tokenizer.json", "config.json", "modeling_comi.py", "pipeline_comi.py"):
        assert (output / name).is_file(), name
    card = (output / "README.md").read_text()
    assert "auxiliary" in card.lower() and "Held-out results" in card
    # The curriculum's own arguments reached it: the fine-stage weights are learnt from alpha 2
    # on, and the round (two document lengths in one stage) kept learning them until its stop
    # rule (exact match 0 is reached at the first check, step 2 of 4).
    config = json.loads((output / "config.json").read_text())
    # The config records the learnt value (the weights hold the same), which started from 2.
    weights = load_file(output / "model.safetensors")
    assert config["learnable_merge_weights"] and config["alpha_merge"] == weights["compressor.alpha_merge"].item()
    assert config["alpha_merge"] != 2.0 and abs(config["alpha_merge"] - 2.0) < 0.5
    assert "documents of 64+128 words" in card and "(learnt)" in card
    assert "steps: 2 ([4] per length)" in card and "stops at 0.0 at merge 4 and 8)" in card
    load = f"from comi_hf import COMIForConditionalGeneration as M; M.from_pretrained({str(output)!r})"
    loaded = subprocess.run(
        [sys.executable, "-c", load],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]


@pytest.mark.parametrize("processes", ["0", "two"])
def test_default_model_recipe_refuses_a_bad_process_count(tmp_path, processes):
    command = ["bash", str(EXAMPLES / "train_default_model.sh"), str(tmp_path / "work")]
    done = subprocess.run(command, env=dict(ENV, PROCESSES=processes), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"PROCESSES must be a positive number of processes, got '{processes}'" in done.stderr
    assert not (tmp_path / "work").exists()


def test_ablation_quick_mode(tmp_path):
    _run([sys.executable, str(EXAMPLES / "ablation.py"), "--quick", "--output_dir", str(tmp_path)], tmp_path)
    result = json.loads((tmp_path / "ablation.json").read_text())
    variants = {entry["variant"] for entry in result["entries"]}
    assert {"full MIG", "no fine stage (mean)", "truncation", "uncompressed"} <= variants
    # 8 variants x 1 length x 2 seeds x 2 merge sizes, each scored on 8 documents.
    assert len(result["entries"]) == 32 and all(entry["num_docs"] == 8 for entry in result["entries"])
    ratios = {(e["variant"], e["merge_size"]): e["compression_ratio"] for e in result["entries"] if e["seed"] == 0}
    # Every token its own vector: exactly 1x, whatever the coarse stage would have done.
    assert ratios[("uncompressed", 8)] == 1.0 and 6 < ratios[("full MIG", 8)] < 10
    # The same budget: ceil(n / m) vectors per document, which the coarse stage may only undercut.
    ablation = _load_example("ablation")
    for seed in (0, 1):
        docs = ablation.documents(64, seed, 8)
        for merge in (4, 8):
            budget = sum(ablation.memory_budget(len(doc.context.split()), merge) for doc in docs) / len(docs)
            vectors = {
                e["variant"]: e["memory_vectors"]
                for e in result["entries"]
                if e["seed"] == seed and e["merge_size"] == merge
            }
            assert vectors["truncation"] == vectors["no coarse stage"] == pytest.approx(budget, abs=1e-3)
            assert all(vectors[variant] <= budget + 1e-3 for variant in vectors if variant != "uncompressed")
    for entry in result["entries"]:
        if entry["variant"] in ("truncation", "uncompressed"):
            assert "fused" not in entry
        else:
            assert 0 <= entry["fused_correct"] <= entry["fused"] <= entry["num_docs"]
    assert "| full MIG |" in (tmp_path / "ablation.md").read_text()
    assert "Target code fused with another code" in (tmp_path / "ablation.md").read_text()
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_ablation_detects_a_target_code_fused_with_another_code():
    ablation = _load_example("ablation")
    # Two facts: the target's code at tokens 3-6, a distractor's at tokens 13-16.
    document = SyntheticDocument("", "", "", 2, [FactSpan(0, 3, True), FactSpan(10, 13, False)])
    apart = torch.arange(20) // 5  # memory vectors 0-3, five tokens each: codes in 0-1 and 2-3
    assert not ablation._target_code_fused(document, apart)
    together = torch.arange(20) // 10  # tokens 3-6 and 13-16 in vectors 0 and 1: still apart
    assert not ablation._target_code_fused(document, together)
    shared = torch.tensor([0] * 6 + [1] * 14)  # token 6 (the target's last digit) shares vector 1
    assert ablation._target_code_fused(document, shared)


FINETUNE_COMI = EXAMPLES / "default_model" / "finetune_comi.py"


def _data_parallel(processes: int) -> list[str]:
    """The command prefix that runs a script in `processes` processes (gloo), as
    examples/train_default_model.sh does."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


@pytest.mark.parametrize(
    ("merge_sizes", "stop_merge_sizes", "processes", "steps", "checks", "rule"),
    [
        (["4", "8"], [], 1, 2, 1, "every merge size"),
        (["8", "32"], [], 1, 4, 2, "every merge size"),
        (["4", "8", "32"], ["--stop_merge_sizes", "4", "8"], 1, 2, 1, "merge 4 and 8"),
        # Each process validates half of the documents; both must see all the scores to stop together.
        (["4", "8", "32"], ["--stop_merge_sizes", "4", "8"], 2, 2, 1, "merge 4 and 8"),
    ],
)
def test_finetune_comi_stops_once_validation_reaches_the_target(
    tmp_path, merge_sizes, stop_merge_sizes, processes, steps, checks, rule
):
    """--stop_at ends the last stage at the first check where every merge size (or those of
    --stop_merge_sizes) reaches it.

    From the shipped model at a learning rate too small to change it, on these 10 validation
    documents: 0.75 is reached at merge 4 and 8 at the first check (1.0 and 1.0), never at
    merge 32 (0.7)."""
    launch = [sys.executable] if processes == 1 else _data_parallel(processes)
    command = [
        *launch, str(FINETUNE_COMI), "--backbone", DEFAULT_MODEL, "--output_dir", str(tmp_path / "model"),
        "--curriculum", "256", "--stage_steps", "4", "--merge_sizes", *merge_sizes, "--learning_rate", "1e-9",
        "--eval_docs", "10", "--eval_every", "2", "--stop_at", "0.75", *stop_merge_sizes,
    ]  # fmt: skip
    _run(command, tmp_path, env={"OMP_NUM_THREADS": "1"} if processes > 1 else {})
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"steps: {steps} ([4] per length)" in card and f"processes: {processes}" in card
    summary = next(line for line in card.splitlines() if "validation exact match during the last stage" in line)
    # Every merge size is validated at each check, whichever decide the stop.
    assert summary.count("step ") == checks
    assert summary.count("merge 32") == (checks if "32" in merge_sizes else 0)
    assert f"stops at 0.75 at {rule})" in summary
    # The scores of the docstring, whether one process validated or each a share.
    scores = {"4": "1.000", "8": "1.000", "32": "0.700"}
    first_check = ", ".join(f"merge {size} {scores[size]}" for size in merge_sizes)
    assert f"step 2: {first_check}" in summary


def test_finetune_comi_refuses_a_batch_that_does_not_split_over_the_processes(tmp_path):
    command = [
        *_data_parallel(2), str(FINETUNE_COMI), "--backbone", DEFAULT_MODEL, "--output_dir", str(tmp_path),
        "--curriculum", "32", "256", "--stage_steps", "2", "2", "--context_tokens_per_batch", "768",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "a batch of 3 documents (768 context tokens of 256-word documents) does not split over 2" in done.stderr
    assert "stage 0" not in done.stderr  # refused before the first stage (24 documents) trains


def test_finetune_comi_builds_each_training_document_when_read():
    """Item i of a stage is the train split's document first_index + i, lengths taking turns by
    that index, tokenised as `tokenize_example` does, with its target code's start."""
    finetune_comi = _load_example("finetune_comi", FINETUNE_COMI)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    lengths = [32, 64, 128]
    documents = finetune_comi.SyntheticDocuments(tokenizer, "train", 4, lengths, first_index=10**7)
    assert len(documents) == 4
    for position in range(4):
        index = 10**7 + position  # 10**7 % 3 == 1: the turn follows the index, not the position
        document = make_document(SPLIT_SEEDS["train"] + index, lengths[index % 3])
        example = {"context": document.context, "question": document.question, "answers": [document.answer]}
        target = next(fact for fact in document.facts if fact.is_target)
        assert documents[position] == {**tokenize_example(example, tokenizer), "target_code_start": target.code_start}
    with pytest.raises(IndexError, match="document 4 of 4"):
        documents[4]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--eval_every", "100"], "give --stop_at too"),
        (["--stop_at", "1.5"], "between 0 and 1, got 1.5"),
        (["--stop_at", "0.9", "--eval_every", "0"], "positive number of steps, got 0"),
        (["--stop_merge_sizes", "4"], "give --stop_at too"),
        (["--stop_at", "0.9", "--stop_merge_sizes", "32"], "must be among --merge_sizes [4, 8, 16]"),
    ],
)
def test_finetune_comi_refuses_a_stop_rule_it_cannot_apply(tmp_path, arguments, message):
    command = [
        sys.executable,
        str(FINETUNE_COMI),
        "--backbone",
        DEFAULT_MODEL,
        "--output_dir",
        str(tmp_path),
        *arguments,
    ]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr
