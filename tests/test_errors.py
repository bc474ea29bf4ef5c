"""One error family and one input edge: every bad input gets one `COMIError` naming the problem.

Mirrors `errors_comi.py` and `processing_comi.py`, and checks that `generate`, the pipeline and
model loading use them (the CLI's side is in test_cli.py, the server's in test_serving*.py).
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import PACKAGE, build_tokenizer, random_batch, tiny_comi
from safetensors.torch import load_file, save_file
from transformers import pipeline

import comi_hf
from comi_hf import (
    COMIError,
    ContextTooLongError,
    DecoderRefusedError,
    DecoderUnavailableError,
    InvalidInputError,
    ModelLoadError,
    NonFiniteError,
    UnsupportedSettingError,
)
from comi_hf.data import word_level_tokenizer
from comi_hf.loading import load_comi
from comi_hf.processing_comi import (
    MAX_MERGE_SIZE,
    UnknownTokensWarning,
    check_decoder_positions,
    check_merge_size,
    decoder_positions,
    prepare_inputs,
    real_token_mask,
)

VOCAB = 320


def test_the_family_carries_status_code_and_field():
    assert issubclass(COMIError, ValueError)
    assert issubclass(InvalidInputError, TypeError)  # a wrong type raised TypeError before
    statuses = {
        InvalidInputError: 400,
        UnsupportedSettingError: 400,
        ContextTooLongError: 413,
        ModelLoadError: 500,
        NonFiniteError: 500,
        DecoderRefusedError: 400,
        DecoderUnavailableError: 503,
        comi_hf.UnauthorizedError: 401,
        comi_hf.ModelNotFoundError: 404,
    }
    for cls, status in statuses.items():
        error = cls("what is wrong", field="merge_size")
        assert isinstance(error, COMIError) and error.status == status and error.field == "merge_size"
        assert str(error) == "what is wrong"
    assert len({cls.code for cls in statuses}) == len(statuses)


def test_the_package_raises_only_its_own_family():
    """Every `raise` of a built-in exception class in the package is an internal invariant (named
    here), never a user's input: those go through the family."""
    allowed = {("pipeline_comi.py", "RuntimeError")}
    builtin = {"ValueError", "TypeError", "RuntimeError", "KeyError", "FileNotFoundError", "OSError"}
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if "default_model" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                if node.exc.func.id in builtin and not _inside_validator(tree, node):
                    found.add((path.name, node.exc.func.id))
    assert found <= allowed, sorted(found - allowed)


def _inside_validator(tree: ast.Module, raise_node: ast.Raise) -> bool:
    """A raise inside a `huggingface_hub` field validator (it must raise ValueError, which the hub wraps)."""
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef) and any(
            isinstance(decorator, ast.Name) and decorator.id == "as_validated_field"
            for decorator in function.decorator_list
        ):
            if any(node is raise_node for node in ast.walk(function)):
                return True
    return False


# --------------------------------------------------------------------------- the input edge
@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"context": "\u200b\u200c\ufeff ", "question": "q ?"}, "`context` is empty"),
        ({"context": "text", "question": "a \ud800 b"}, r"`question` is not valid Unicode text.*U\+D800"),
        ({"context": [True, False], "question": "q ?"}, "`context` must be a string or a list of token ids"),
        ({"context": [1, 2.0], "question": "q ?"}, "`context` must be a string or a list of token ids"),
        ({"context": [1, 999], "question": "q ?"}, r"`context` holds token ids outside .* vocabulary of 320"),
        ({"context": [], "question": "q ?"}, "`context` has no tokens"),
        ({"context": "text", "question": "q", "answer": "x"}, r"unknown key\(s\) \['answer'\]"),
        ({"question": "q"}, "`context` is missing"),
        ({"context": "text", "questions": "q"}, "`questions` must be a non-empty list"),
        ({"context": "text", "questions": ["q", None]}, r"`questions\[1\]` must be a string"),
        ([], "empty list of inputs"),
        (["text"], "input 0: an input must be a dict"),
    ],
)
def test_the_edge_refuses_bad_inputs_naming_the_field(tokenizer, inputs, message):
    with pytest.raises(InvalidInputError, match=message):
        prepare_inputs(inputs, tokenizer, VOCAB)


def test_the_edge_accepts_text_and_ids_alike(tokenizer):
    ids = tokenizer("the code of red river", add_special_tokens=False)["input_ids"]
    (from_text,) = prepare_inputs({"context": "the code of red river", "questions": ["q ?", ids]}, tokenizer, VOCAB)
    (from_ids,) = prepare_inputs({"context": ids, "question": "q ?"}, tokenizer, VOCAB)
    assert from_text.context_ids == from_ids.context_ids == ids
    assert from_text.several and not from_ids.several and from_text.question_ids[1] == ids
    with pytest.raises(ContextTooLongError, match=f"has {len(ids)} tokens, more than the limit of 2") as caught:
        prepare_inputs({"context": ids, "question": "q"}, tokenizer, VOCAB, max_context_tokens=2)
    assert caught.value.status == 413 and caught.value.field == "context"


def test_many_unknown_tokens_are_said():
    tok = word_level_tokenizer(["the", "code", "of", "red", "river", "?"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_inputs({"context": "the code of red river", "question": "the code ?"}, tok, 100)
    with pytest.warns(UnknownTokensWarning, match=r"3 of the 4 tokens of `question` are unknown"):
        prepare_inputs({"context": "the code of red river", "question": "Where were zebras ?"}, tok, 100)


@pytest.mark.parametrize("value", [0, -1, MAX_MERGE_SIZE + 1, 10**30, 2**63, 2.0, True, "4", None])
def test_merge_size_is_a_bounded_integer(value):
    with pytest.raises(InvalidInputError, match="`merge_size` must be an integer from 1 to 2147483647"):
        check_merge_size(value)


def test_masks_hold_zeros_and_ones_only():
    ids = torch.tensor([[5, 6, 7]])
    for mask in (torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[1, 2, 0]])):
        with pytest.raises(InvalidInputError, match="must hold 0 .* and 1 .* only"):
            real_token_mask(ids, mask, "input_ids", "attention_mask", VOCAB)
    assert real_token_mask(ids, torch.tensor([[True, True, False]]), "input_ids", "attention_mask", VOCAB).sum() == 2
    with pytest.raises(InvalidInputError, match="tensor of token ids"):
        real_token_mask(torch.tensor([[True, False]]), None, "input_ids", "attention_mask", VOCAB)


def test_decoder_positions_are_known_before_any_encoding():
    config = tiny_comi(segment_size=64, merge_size=4).config  # max_position_embeddings 4096
    assert decoder_positions(config, 130, 6, 4, 20) == 16 + 16 + 1 + 6 + 20  # segments of 64, 64 and 2 tokens
    check_decoder_positions(config, 10_000, 6, 4, 20)
    with pytest.raises(ContextTooLongError, match=r"20000 tokens \(313 segment\(s\) of up to 64\).*5026 positions"):
        check_decoder_positions(config, 20_000, 6, 4, 20)
    with pytest.raises(InvalidInputError, match="ask for fewer new tokens") as caught:
        check_decoder_positions(config, 10, 6, 4, 10**9)
    assert caught.value.field == "max_new_tokens"


# --------------------------------------------------------------------------- generate and the pipeline
@pytest.mark.parametrize(
    "settings,field",
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"do_sample": True, "top_p": 2.0}, "top_p"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"do_sample": True, "top_k": 10**20}, "top_k"),
        ({"min_new_tokens": 5, "max_new_tokens": 3}, "min_new_tokens"),
        ({"stop_strings": [""]}, "stop_strings"),
        ({"merge_size": 10**30}, "merge_size"),
        ({"merge_size": 2**63}, "merge_size"),
    ],
)
def test_generate_refuses_settings_out_of_range(tokenizer, settings, field):
    model = tiny_comi()
    with pytest.raises(InvalidInputError) as caught:
        model.generate(context="the code of red river", query="what ?", tokenizer=tokenizer, **settings)
    assert caught.value.field == field


def test_generate_refuses_masks_and_ids_that_are_not_tokens(tokenizer):
    model = tiny_comi()
    input_ids, attention_mask, query_ids, query_mask = random_batch()
    with pytest.raises(InvalidInputError, match="`attention_mask` must hold 0"):
        model.generate(input_ids, attention_mask * 0.5, query_ids, query_mask)
    with pytest.raises(InvalidInputError, match="`query_attention_mask` must hold 0"):
        model.generate(input_ids, attention_mask, query_ids, query_mask * 2)
    with pytest.raises(InvalidInputError, match="`input_ids` must be a .* tensor of token ids"):
        model.generate(input_ids.bool(), None, query_ids, query_mask)
    with pytest.raises(InvalidInputError, match="`context` is empty"):
        model.generate(context="\u200b", query="what ?", tokenizer=tokenizer)


def test_stop_strings_reach_the_decoder_or_are_refused_by_name(tokenizer):
    model = tiny_comi()
    options = {"context": "the code of red river is 4 8", "query": "what is the code ?", "max_new_tokens": 8}
    options.update(tokenizer=tokenizer, repetition_penalty=1.0)
    full = model.generate(**options)[0].tolist()
    texts = [tokenizer.decode([token]) for token in full]
    stop = next(text for text in texts[1:-1] if text.strip() and text.isascii())  # text inside the answer
    stopped = model.generate(**options, stop_strings=[stop])[0].tolist()
    assert stopped == full[: texts.index(stop) + 1]
    pipe = pipeline("comi-qa", model=model, tokenizer=tokenizer)
    answer = pipe(context=options["context"], question=options["query"], max_new_tokens=8, repetition_penalty=1.0)
    with_stop = pipe(
        context=options["context"], question=options["query"], max_new_tokens=8, repetition_penalty=1.0,
        stop_strings=[stop],
    )  # fmt: skip
    assert answer["answer"].startswith(with_stop["answer"]) and len(with_stop["answer"]) < len(answer["answer"])
    word_level = word_level_tokenizer(["the", "code", "of", "red", "river", "is", "4", "8", "what", "?"])
    with pytest.raises(UnsupportedSettingError, match="`stop_strings` cannot be matched with this tokenizer"):
        model.generate(**dict(options, tokenizer=word_level), stop_strings=["4"])


def test_non_finite_logits_stop_generation_instead_of_answering_token_0(tokenizer):
    model = tiny_comi()
    with torch.no_grad():
        model.decoder.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="decoder's scores are NaN or infinite for sequence"):
        model.generate(context="the code of red river", query="what ?", tokenizer=tokenizer)


@pytest.mark.parametrize(
    "name,value",
    [
        ("decoder.model.layers.0.mlp.up_proj.weight", float("nan")),
        ("lsa.layers.0.self_attn.q_proj.weight", float("inf")),
        ("compressor.alpha_merge", float("nan")),
    ],
)
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, tokenizer, name, value):
    model = tiny_comi(learnable_merge_weights=True, num_mem_fusion_layers=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = value
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"the weights `{name}` hold 1 NaN or infinite value"):
        comi_hf.COMIForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=rf"`{name}` hold 1 NaN"):
        load_comi(tmp_path)


def test_loading_problems_are_named(tmp_path, tokenizer):
    directory = tmp_path / "model"
    tiny_comi().save_pretrained(directory)
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer of .*tokenizer.json"):
        load_comi(directory)
    tokenizer.save_pretrained(directory)
    config = (directory / "config.json").read_text()
    (directory / "config.json").write_text(config.replace('"merge_size": 4', '"merge_size": "four"'))
    with pytest.raises(ModelLoadError, match="merge_size.*Value must be an integer >= 1, got 'four'"):
        load_comi(directory)
    (directory / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="has no config.json: it is not a model directory"):
        load_comi(directory)
    for missing in ("/nonexistent/model", "./nowhere", "a/b/c"):
        with pytest.raises(comi_hf.UsageError, match=f"no such model directory: {missing}"):
            load_comi(missing)


def test_the_registered_task_loads_saved_directories_without_remote_code(tmp_path, tokenizer):
    model = tiny_comi()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    question = {"context": "the code of red river", "question": "what ?", "max_new_tokens": 3}
    expected = pipeline("comi-qa", model=model, tokenizer=tokenizer)(**question)
    assert pipeline("comi-qa", model=str(tmp_path))(**question) == expected
    shipped = pipeline("comi-qa", model=comi_hf.DEFAULT_MODEL)
    document = (Path(__file__).parents[1] / "examples" / "data" / "example_document.txt").read_text()
    assert shipped(context=document, question="what is the code of long hill ?")["answer"] == "9 9 3 7"


def test_word_level_tokenizer_is_the_edge_of_a_text_with_unknown_words():
    tok = build_tokenizer()  # byte-level: no unknown token, never a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_inputs({"context": "Zebras ate purple umbrellas", "question": "Where?"}, tok, VOCAB)


def test_the_errors_doc_runs_as_written():
    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    block = doc.split("```python\n")[1].split("```")[0]
    said = doc.split("prints ``")[1].split("``")[0]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block, "docs/errors.md", "exec"), {})
    assert output.getvalue() == said + "\n"


@pytest.mark.parametrize(
    "options,message",
    [
        (5, "`mig_options` must be a dict"),
        ({"coarse": "false"}, "`coarse` must be True or False"),
        ({"alpha_merge": math.nan}, "`alpha_merge` must be a finite number"),
        ({"alpha_select": "high"}, "`alpha_select` must be a finite number"),
        ({"gamma": 1.0}, r"Unknown MIG option\(s\) \['gamma'\]"),
    ],
)
def test_mig_options_are_checked(options, message):
    with pytest.raises(InvalidInputError, match=message):
        tiny_comi().compress(*random_batch(), mig_options=options)


def test_the_command_line_bounds_merge_size_as_the_edge_does():
    """comi_hf_cli repeats MAX_MERGE_SIZE so that parsing imports nothing: the two must agree."""
    from comi_hf_cli import COMMANDS

    for command in ("comi-qa", "comi-convert"):
        assert COMMANDS[command].ranges["merge_size"] == (1, MAX_MERGE_SIZE)
