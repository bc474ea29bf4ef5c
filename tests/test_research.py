"""research/: the default model's recipe (train_default_model.sh and its steps) and the ablation,
end to end in subprocesses, in their quick modes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ENV, run_command
from safetensors.torch import load_file
from test_examples import _load_example
from transformers import AutoTokenizer

from comi_hf import DEFAULT_MODEL
from comi_hf.data import tokenize_example
from comi_hf.synthetic import SPLIT_SEEDS, FactSpan, SyntheticDocument, make_document

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RESEARCH = REPO / "research"


def test_default_model_recipe_quick_mode(tmp_path):
    """Every step of research/train_default_model.sh (data, pretraining, fine-tuning, evaluation, shipping)."""
    output = tmp_path / "shipped"
    command = ["bash", str(RESEARCH / "train_default_model.sh"), str(tmp_path / "work"), str(output)]
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
    assert config["segment_size"] == 48  # the last stage's segments, what the model needs at inference
    assert "documents of 64+128 words" in card and "(learnt)" in card
    assert "steps: 2 ([4] per length)" in card and "stops at 0.0 at merge 4 and 8)" in card
    backbone = tmp_path / "default_backbone"  # beside the shipped model: the backbone of step 2, a plain LM
    assert json.loads((backbone / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((backbone / "pretraining_log.json").read_text())["curve"] == log["curve"]
    assert "pretrain_backbone.py" in (backbone / "README.md").read_text()
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
    command = ["bash", str(RESEARCH / "train_default_model.sh"), str(tmp_path / "work")]
    done = subprocess.run(command, env=dict(ENV, PROCESSES=processes), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"PROCESSES must be a positive number of processes, got '{processes}'" in done.stderr
    assert not (tmp_path / "work").exists()


def test_ablation_quick_mode(tmp_path):
    run_command([sys.executable, str(RESEARCH / "ablation.py"), "--quick", "--output_dir", str(tmp_path)], tmp_path)
    result = json.loads((tmp_path / "ablation.json").read_text())
    variants = {entry["variant"] for entry in result["entries"]}
    assert {"full MIG", "no fine stage (mean)", "truncation", "uncompressed"} <= variants
    # 8 variants x 1 length x 2 seeds x 2 merge sizes, each scored on 8 documents.
    assert len(result["entries"]) == 32 and all(entry["num_docs"] == 8 for entry in result["entries"])
    ratios = {(e["variant"], e["merge_size"]): e["compression_ratio"] for e in result["entries"] if e["seed"] == 0}
    # Every token its own vector: exactly 1x, whatever the coarse stage would have done.
    assert ratios[("uncompressed", 8)] == 1.0 and 6 < ratios[("full MIG", 8)] < 10
    # The same budget: ceil(n / m) vectors per document, which the coarse stage may only undercut.
    ablation = _load_example("ablation", RESEARCH / "ablation.py")
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
    ablation = _load_example("ablation", RESEARCH / "ablation.py")
    # Two facts: the target's code at tokens 3-6, a distractor's at tokens 13-16.
    document = SyntheticDocument("", "", "", 2, [FactSpan(0, 3, True), FactSpan(10, 13, False)])
    apart = torch.arange(20) // 5  # memory vectors 0-3, five tokens each: codes in 0-1 and 2-3
    assert not ablation._target_code_fused(document, apart)
    together = torch.arange(20) // 10  # tokens 3-6 and 13-16 in vectors 0 and 1: still apart
    assert not ablation._target_code_fused(document, together)
    shared = torch.tensor([0] * 6 + [1] * 14)  # token 6 (the target's last digit) shares vector 1
    assert ablation._target_code_fused(document, shared)


FINETUNE_COMI = RESEARCH / "default_model" / "finetune_comi.py"


def _data_parallel(processes: int) -> list[str]:
    """The command prefix that runs a script in `processes` processes (gloo), as
    research/train_default_model.sh does."""
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
    run_command(command, tmp_path, env={"OMP_NUM_THREADS": "1"} if processes > 1 else {})
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
