"""The trained default model shipped in the package: it loads offline and really answers."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ENV, REMOTE_CODE_FILES, REPO
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, pipeline

from comi_hf import DEFAULT_BACKBONE, DEFAULT_MODEL, COMIForConditionalGeneration
from comi_hf.data import word_level_tokenizer
from comi_hf.evaluation import answer_dataset, summarize
from comi_hf.synthetic import SPLIT_SEEDS, make_document, vocabulary

EXAMPLE = REPO / "examples" / "data" / "example_document.txt"
# The README's example: this test-split document (never seen in training).
EXAMPLE_INDEX = 0
# How people type the README's question (its own spelling is "what is the code of long hill ?").
NATURAL_PHRASINGS = (
    "what is the code of long hill?",
    "What is the code of long hill ?",
    "WHAT IS THE CODE OF LONG HILL?",
)


@pytest.fixture(scope="module")
def model():
    return COMIForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def test_shipped_directory_is_a_complete_small_hub_repo():
    directory = Path(DEFAULT_MODEL)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (directory / name).is_file(), name
    for name in REMOTE_CODE_FILES:
        # One copy of the code: links to the package's modules.
        assert (directory / name).resolve() == (directory.parent / name).resolve(), name
    assert (directory / "model.safetensors").stat().st_size < 5_000_000
    card = (directory / "README.md").read_text()
    assert "auxiliary" in card.lower() and "| exact match |" in card


def test_example_document_is_the_held_out_test_document():
    document = make_document(SPLIT_SEEDS["test"] + EXAMPLE_INDEX, 256)
    assert EXAMPLE.read_text().strip() == document.context


@pytest.mark.slow
def test_readme_main_command_answers_the_example_without_a_model_argument(tmp_path):
    document = make_document(SPLIT_SEEDS["test"] + EXAMPLE_INDEX, 256)
    done = subprocess.run(
        ["comi-qa", "--context-file", str(EXAMPLE), "--question", document.question],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == document.answer
    readme = (REPO / "README.md").read_text()
    assert f'comi-qa --context-file examples/data/example_document.txt --question "{document.question}"' in readme


def test_shipped_tokenizers_are_the_recipes():
    # The recipe's tokenizer (pretrain_backbone.py), so that rerunning it reproduces the shipped files.
    expected = json.loads(word_level_tokenizer(vocabulary()).backend_tokenizer.to_str())
    for directory in (DEFAULT_MODEL, DEFAULT_BACKBONE):
        assert json.loads((Path(directory) / "tokenizer.json").read_text()) == expected, directory


def test_normalisation_leaves_the_trained_ids_of_synthetic_text_unchanged(tokenizer):
    # The weights were trained on whitespace-split ids: lower-casing and splitting punctuation off
    # must not move a single id of the generator's own text.
    whitespace_only = Tokenizer(models.WordLevel(tokenizer.get_vocab(), unk_token=tokenizer.unk_token))
    whitespace_only.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for split, first in SPLIT_SEEDS.items():
        for index in range(100):
            document = make_document(first + index, (32, 256, 1024)[index % 3])
            for text in (document.context, document.question, document.answer):
                expected = whitespace_only.encode(text, add_special_tokens=False).ids
                assert tokenizer(text, add_special_tokens=False).input_ids == expected, (split, index, text)
                assert tokenizer.unk_token_id not in expected


def test_natural_phrasings_read_as_the_generators_question(tokenizer):
    document = make_document(SPLIT_SEEDS["test"] + EXAMPLE_INDEX, 256)
    expected = tokenizer(document.question, add_special_tokens=False).input_ids
    for phrasing in NATURAL_PHRASINGS:
        assert tokenizer(phrasing, add_special_tokens=False).input_ids == expected, phrasing
    assert tokenizer.decode(expected) == "what is the code of long hill?"


def test_natural_phrasings_get_the_readme_answer():
    document = make_document(SPLIT_SEEDS["test"] + EXAMPLE_INDEX, 256)
    qa = pipeline("comi-qa")
    answers = qa(context=document.context, questions=[document.question, *NATURAL_PHRASINGS])["answers"]
    assert answers == [document.answer] * (1 + len(NATURAL_PHRASINGS))


def test_pipeline_without_a_model_uses_the_default_model():
    document = make_document(SPLIT_SEEDS["test"] + EXAMPLE_INDEX, 256)
    qa = pipeline("comi-qa")
    assert qa.model.name_or_path == DEFAULT_MODEL
    assert qa(context=document.context, question=document.question)["answer"] == document.answer


def test_held_out_exact_match_at_merge_4_and_8(model, tokenizer):
    # 100 test documents not in the README example's neighbourhood of seeds.
    docs = [make_document(SPLIT_SEEDS["test"] + 50_000 + index, 256) for index in range(100)]
    rows = [{"id": i, "context": d.context, "question": d.question, "answers": [d.answer]} for i, d in enumerate(docs)]
    dataset = Dataset.from_list(rows)
    results = json.loads((Path(DEFAULT_MODEL) / "results.json").read_text())
    for merge_size in (4, 8):
        records = answer_dataset(model, tokenizer, dataset, batch_size=50, merge_size=merge_size, progress=False)
        measured = summarize(records, merge_size)["exact_match"]
        reported = next(e for e in results["test"] if e["words"] == 256 and e["merge_size"] == merge_size)
        # The shipped card's figure (1,000 documents) holds on another 100, within sampling noise.
        assert measured >= reported["exact_match"] - 0.1, (merge_size, measured, reported["exact_match"])
        assert measured > 0.3  # "pick any code of the document" scores 0.09


@pytest.mark.slow
def test_remote_code_loads_the_shipped_directory_without_the_package(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["comi_hf"] = None  # the package cannot be imported
        from transformers import AutoModel
        model = AutoModel.from_pretrained({DEFAULT_MODEL!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        print(type(model).__name__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # (DeepSpeed, when installed, writes a notice to stdout as accelerate imports it.)
    assert done.stdout.strip().splitlines()[-1] == "COMIForConditionalGeneration"


def test_generation_config_is_greedy_without_repetition_penalty(model):
    # Half of the codes repeat a digit: the official penalty (1.3) would fight right answers.
    assert model.generation_config.repetition_penalty == 1.0
    assert not model.generation_config.do_sample
