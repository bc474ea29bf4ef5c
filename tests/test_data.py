import json

import pytest
from conftest import EOS_ID

from comi_hf import UsageError
from comi_hf.data import COMIDataCollator, load_comi_jsonl, tokenize_example, truncate_context, word_level_tokenizer


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_loads_the_official_format(tmp_path):
    path = _write(
        tmp_path / "data.jsonl",
        [
            {"input": "doc one", "prompt": "q1", "answer": "a1"},
            "",
            {"input": "doc two", "prompt": "q2", "answer": ["a2", "b2"], "id": 7},
            {"input": "doc three", "prompt": "q3", "answer": "a3", "id": "x-3"},
        ],
    )
    dataset = load_comi_jsonl(path)
    assert dataset.column_names == ["id", "context", "question", "answers"]
    assert list(dataset["answers"]) == [["a1"], ["a2", "b2"], ["a3"]]
    assert list(dataset["id"]) == ["0", "7", "x-3"]  # the line index without an id; mixed types become strings


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ({"prompt": "q", "answer": "a"}, "line 2: missing field `input`"),
        ({"input": "d", "answer": "a"}, "line 2: missing field `prompt`"),
        ({"input": "d", "prompt": "q"}, "line 2: missing field `answer`"),
        ({"input": 3, "prompt": "q", "answer": "a"}, "line 2: field `input` must be a string, got int"),
        ({"input": " ", "prompt": "q", "answer": "a"}, "line 2: field `input` is empty"),
        ({"input": "d", "prompt": "q", "answer": []}, "line 2: field `answer` must be a string or a non-empty list"),
        ({"input": "d", "prompt": "q", "answer": ["a", 3]}, "line 2: field `answer` must hold strings only"),
        ({"input": "d", "prompt": "q", "answer": 5}, "line 2: field `answer` must be a string or a non-empty list"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [{"input": "d", "prompt": "q", "answer": "a"}, line])
    with pytest.raises(ValueError, match=message) as error:
        load_comi_jsonl(path)
    assert "bad.jsonl" in str(error.value)


def test_encodings(tmp_path):
    good = {"input": "café du nord", "prompt": "q", "answer": "a"}
    text = json.dumps(good, ensure_ascii=False) + "\n" + json.dumps(good, ensure_ascii=False) + "\n"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert list(load_comi_jsonl(tmp_path / "bom.jsonl")["context"]) == ["café du nord"] * 2
    (tmp_path / "latin1.jsonl").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl, line 1: not UTF-8 text \(byte 14 cannot be decoded\)"):
        load_comi_jsonl(tmp_path / "latin1.jsonl")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UsageError, match="No such data file"):
        load_comi_jsonl(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        load_comi_jsonl(tmp_path / "empty.jsonl")


def test_tokenisation_follows_the_official_code(tokenizer):
    example = {"context": "the code of red river is 4821 .", "question": "what is it ?", "answers": ["4821", "x"]}
    features = tokenize_example(example, tokenizer)
    assert features["input_ids"] == tokenizer(example["context"], add_special_tokens=False).input_ids
    assert features["query_ids"] == tokenizer(example["question"], add_special_tokens=False).input_ids
    assert features["labels"] == tokenizer("4821", add_special_tokens=False).input_ids + [EOS_ID]


def test_word_level_tokenizer_lower_cases_and_splits_punctuation_off():
    tokenizer = word_level_tokenizer(["what", "is", "x", "?", ".", "4", "2"])
    expected = tokenizer("what is x ?", add_special_tokens=False).input_ids
    for text in ("What is X?", "WHAT  IS\tX ?", "what is x？"):  # the last one's "？" is full-width
        assert tokenizer(text, add_special_tokens=False).input_ids == expected, text
    ids = tokenizer("x is 4 2.", add_special_tokens=False).input_ids  # digits stay one token each
    assert tokenizer.convert_ids_to_tokens(ids) == ["x", "is", "4", "2", "."]
    assert tokenizer.decode(tokenizer("is 4 2 x", add_special_tokens=False).input_ids) == "is 4 2 x"
    assert tokenizer.convert_ids_to_tokens(tokenizer("x?!", add_special_tokens=False).input_ids) == ["x", "?", "<unk>"]


@pytest.mark.parametrize("word", ["Paris", "hill?", "full-width", "Ｈill"])
def test_word_level_tokenizer_refuses_words_no_text_could_reach(word):
    with pytest.raises(ValueError, match="after normalisation"):
        word_level_tokenizer(["a", word])


def test_middle_truncation_policy():
    assert truncate_context(list(range(10)), 4) == [0, 1, 8, 9]
    assert truncate_context(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert truncate_context(list(range(3)), 5) == [0, 1, 2]
    assert truncate_context(list(range(3)), None) == [0, 1, 2]


def test_collator_pads_and_masks():
    batch = COMIDataCollator()(
        [
            {"input_ids": [5, 6, 7], "query_ids": [8], "labels": [9, 1]},
            {"input_ids": [5], "query_ids": [8, 9], "labels": [1]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["query_ids"].tolist() == [[8, 0], [8, 9]]
    assert batch["query_attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert batch["labels"].tolist() == [[9, 1], [1, -100]]
