import json
import os
import subprocess

import pytest

from comi_hf.data import load_comi_jsonl
from comi_hf.synthetic import SPLIT_SEEDS, make_document, make_split, vocabulary


def test_deterministic_and_disjoint_splits():
    assert make_split("train", 5) == make_split("train", 5)
    train = {document.context for document in make_split("train", 50)}
    test = {document.context for document in make_split("test", 50)}
    assert not train & test
    assert len(set(SPLIT_SEEDS.values())) == 3


@pytest.mark.parametrize("words", [64, 256, 1024, 4096])
def test_length_and_the_answer_appears_once(words):
    for seed in range(20):
        document = make_document(seed, words)
        length = len(document.context.split())
        assert words <= length < words + 12
        assert document.context.count(document.answer) == 1
        entity = document.question.removeprefix("what is the code of ").removesuffix(" ?")
        sentences = [s for s in document.context.split(" . ") if entity in s]
        # The target entity is named once; near-duplicates name similar entities.
        assert sum(f" {entity} " in f" {s} " for s in sentences) == 1
        assert document.codes_in_document >= 2


def test_distractors_are_near_duplicates():
    document = make_document(7, 256)
    adjective, noun = document.question.split()[-3:-1]
    assert f" {noun} " in document.context.replace(f"{adjective} {noun}", "")  # same noun, other adjective


def test_every_word_is_in_the_vocabulary():
    words = set(vocabulary())
    for document in make_split("validation", 30, words=128):
        assert set(document.context.split()) <= words
        assert set(document.question.split()) <= words
        assert set(document.answer.split()) <= words


def test_command_writes_the_official_format(tmp_path):
    output = tmp_path / "test.jsonl"
    done = subprocess.run(
        ["comi-synth", "--split", "test", "--num-docs", "12", "--words", "128", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "chance level" in done.stderr and "picking any code" in done.stderr
    dataset = load_comi_jsonl(output)
    assert len(dataset) == 12
    first = json.loads(output.read_text().splitlines()[0])
    assert first["answer"][1] == first["answer"][0].replace(" ", "")
    bad = subprocess.run(
        ["comi-synth", "--split", "test", "--num-docs", "0", "--output", str(output)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "error" in bad.stderr
    # An unbounded document is refused at once, before anything is made.
    huge = subprocess.run(
        ["comi-synth", "--split", "test", "--num-docs", "1", "--words", "1000000000", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert huge.returncode == 2 and huge.stderr.startswith("comi-synth: error: --words must be from 16 to 1000000")
    # `--output -` with stdout closed (`>&-`): one line, no traceback.
    closed = subprocess.run(
        ["comi-synth", "--split", "test", "--num-docs", "2", "--output", "-"],
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.close(1),
    )
    assert (
        closed.returncode == 2
        and closed.stderr == "comi-synth: error: stdout is closed: there is nowhere to write the results\n"
    )


def test_documents_are_written_as_they_are_made(tmp_path):
    """The command's output is the split, line for line, whether written to a file or stdout."""
    from comi_hf_cli import comi_synth

    comi_synth(["--split", "validation", "--num-docs", "3", "--words", "64", "--output", str(tmp_path / "v.jsonl")])
    expected = [json.dumps(document.record()) for document in make_split("validation", 3, 64)]
    assert (tmp_path / "v.jsonl").read_text().splitlines() == expected


@pytest.mark.parametrize("words", [32, 256, 1024])
def test_fact_spans_point_at_each_fact_entity_and_code(words):
    for seed in range(40):
        document = make_document(seed, words)
        tokens = document.context.split()
        assert sum(fact.is_target for fact in document.facts) == 1
        assert len(document.facts) >= document.codes_in_document
        for fact in document.facts:
            entity = " ".join(tokens[fact.entity_start : fact.entity_start + fact.entity_words])
            code = " ".join(tokens[fact.code_start : fact.code_start + fact.code_words])
            sentences = (f"the code of {entity} is {code} .", f"{entity} has the code {code} .")
            assert any(sentence in document.context for sentence in sentences), (entity, code)
            if fact.is_target:
                assert code == document.answer and document.question == f"what is the code of {entity} ?"
