import copy
import json

import pytest
import torch
from conftest import tiny_comi
from transformers import pipeline

from comi_hf import PIPELINE_TASK, COMIQuestionAnsweringPipeline

CONTEXT = (
    " ".join(
        f"the code of {color} {place} is {number} ."
        for color, place, number in [
            ("red", "river", "4 8 2 1"),
            ("blue", "lake", "1 2 3 4"),
            ("green", "hill", "9 9 0 1"),
            ("old", "mill", "5 5 6 7"),
        ]
    )
    * 3
)
QUESTIONS = [
    "what is the code of red river ?",
    "what is the code of blue lake ?",
    "which city is north ?",
    "what is the code of old mill ?",
]


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return pipeline(PIPELINE_TASK, model=tiny_comi(segment_size=48), tokenizer=tokenizer)


def test_task_is_registered_on_import(pipe):
    assert isinstance(pipe, COMIQuestionAnsweringPipeline)


def test_single_question(pipe, tokenizer):
    result = pipe(context=CONTEXT, question=QUESTIONS[0], max_new_tokens=6)
    assert set(result) == {"answer", "context_tokens", "memory_tokens", "compression_ratio"}
    context_tokens = len(tokenizer(CONTEXT, add_special_tokens=False).input_ids)
    assert result["context_tokens"] == context_tokens
    assert result["compression_ratio"] == pytest.approx(context_tokens / result["memory_tokens"])
    expected = pipe.model.generate(context=CONTEXT, query=QUESTIONS[0], tokenizer=tokenizer, max_new_tokens=6)
    assert result["answer"] == tokenizer.decode(expected[0], skip_special_tokens=True).strip()


def test_several_questions_equal_separate_calls_token_for_token(pipe):
    together = pipe(context=CONTEXT, questions=QUESTIONS, max_new_tokens=8)
    assert len(together["answers"]) == len(QUESTIONS)
    for position, question in enumerate(QUESTIONS):
        alone = pipe(context=CONTEXT, question=question, max_new_tokens=8)
        assert together["answers"][position] == alone["answer"]
        assert together["memory_tokens"][position] == alone["memory_tokens"]


def test_several_questions_encode_the_context_once(pipe):
    calls = []
    hook = pipe.model.encoder.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs), with_kwargs=True
    )
    try:
        pipe(context=CONTEXT, questions=QUESTIONS * 2, max_new_tokens=2)
    finally:
        hook.remove()
    # The context's segments are encoded once (one segment per pass, as the official code does);
    # then one pass runs the 8 queries, each reading every segment's cache.
    segments = -(-len(pipe.tokenizer(CONTEXT).input_ids) // 48)
    assert segments > 1
    context_passes = [call for call in calls if call.get("cache") is None]
    query_passes = [call for call in calls if call.get("cache") is not None]
    assert sum(call["input_ids"].shape[0] for call in context_passes) == segments
    assert all(call["input_ids"].shape[1] <= 48 for call in context_passes)
    assert len(query_passes) == 1
    assert query_passes[0]["input_ids"].shape[0] == 8 * segments
    assert query_passes[0]["input_ids"].shape[1] == max(len(pipe.tokenizer(q).input_ids) for q in QUESTIONS)


def test_batches_keep_input_order(pipe):
    inputs = [{"context": CONTEXT[: 40 + 25 * i], "question": QUESTIONS[i % 4]} for i in range(6)]
    batched = pipe(inputs, batch_size=4, max_new_tokens=5)
    assert isinstance(batched, list) and len(batched) == 6
    for item, result in zip(inputs, batched, strict=True):
        assert result == pipe(item, max_new_tokens=5)


def test_several_sequences_per_input_stay_with_their_input(pipe):
    inputs = [{"context": CONTEXT[: 60 + 40 * i], "question": QUESTIONS[i]} for i in range(3)]
    options = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 4}
    alone = [pipe(item, **options) for item in inputs]
    for result in alone:
        assert isinstance(result, list) and len(result) == 2
        assert all(set(entry) == {"answer", "context_tokens", "memory_tokens", "compression_ratio"} for entry in result)
    assert pipe(inputs, batch_size=3, **options) == alone
    several = pipe(context=CONTEXT, questions=QUESTIONS[:3], **options)
    assert [len(answers) for answers in several["answers"]] == [2, 2, 2]
    for question, answers in zip(QUESTIONS[:3], several["answers"], strict=True):
        assert answers == [entry["answer"] for entry in pipe(context=CONTEXT, question=question, **options)]


def test_batching_needs_no_pad_token(tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    pipe = pipeline(PIPELINE_TASK, model=tiny_comi(), tokenizer=no_pad)
    inputs = [{"context": CONTEXT[: 50 + 30 * i], "question": QUESTIONS[i]} for i in range(3)]
    assert pipe(inputs, batch_size=3, max_new_tokens=4) == [pipe(item, max_new_tokens=4) for item in inputs]


def test_merge_size_per_call(pipe):
    fine = pipe(context=CONTEXT, question=QUESTIONS[0], merge_size=2, max_new_tokens=2)
    coarse = pipe(context=CONTEXT, question=QUESTIONS[0], merge_size=16, max_new_tokens=2)
    assert fine["memory_tokens"] > 3 * coarse["memory_tokens"]


def test_generation_arguments_pass_through(pipe):
    one_token = pipe(context=CONTEXT, question=QUESTIONS[0], max_new_tokens=1, repetition_penalty=1.0)["answer"]
    expected = pipe.model.generate(
        context=CONTEXT, query=QUESTIONS[0], tokenizer=pipe.tokenizer, max_new_tokens=1, repetition_penalty=1.0
    )
    assert expected.shape == (1, 1)
    assert one_token == pipe.tokenizer.decode(expected[0], skip_special_tokens=True).strip()
    torch.manual_seed(0)
    first = pipe(context=CONTEXT, question=QUESTIONS[0], do_sample=True, top_k=50, max_new_tokens=6)
    torch.manual_seed(0)
    assert first == pipe(context=CONTEXT, question=QUESTIONS[0], do_sample=True, top_k=50, max_new_tokens=6)
    beams = pipe(context=CONTEXT, question=QUESTIONS[0], num_beams=3, max_new_tokens=4)
    assert isinstance(beams["answer"], str)


def test_return_compression_describes_every_token(pipe):
    result = pipe(context=CONTEXT, question=QUESTIONS[0], return_compression=True, max_new_tokens=2)
    compression = result["compression"]
    assert len(compression["tokens"]) == result["context_tokens"]
    groups = compression["groups"]
    assert len(groups) == result["memory_tokens"]
    assert groups[0]["start"] == 0 and groups[-1]["end"] == result["context_tokens"]
    for previous, group in zip(groups, groups[1:], strict=False):
        assert previous["end"] == group["start"]
    for group in groups:
        assert len(group["weights"]) == group["end"] - group["start"]
        assert sum(group["weights"]) == pytest.approx(1.0, abs=1e-5)
    several = pipe(context=CONTEXT, questions=QUESTIONS[:2], return_compression=True, max_new_tokens=2)
    # The same groups; weights equal up to float32 rounding (cached vs one-pass encoder).
    reused = several["compressions"][0]
    assert reused["tokens"] == compression["tokens"]
    assert [(g["start"], g["end"]) for g in reused["groups"]] == [(g["start"], g["end"]) for g in groups]
    for ours, theirs in zip(reused["groups"], groups, strict=True):
        assert ours["weights"] == pytest.approx(theirs["weights"], abs=1e-5)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda p: p(context="", question="q ?"), ValueError, "`context` is empty"),
        (lambda p: p(context="some text", question="  "), ValueError, "`question` is empty"),
        (lambda p: p(context="some text"), ValueError, "exactly one of `question`"),
        (lambda p: p(context="some text", question="a", questions=["b"]), ValueError, "exactly one of"),
        (lambda p: p(context=3, question="a"), TypeError, "`context` must be a string"),
        (lambda p: p(context="text", questions=[]), TypeError, "non-empty list"),
        (lambda p: p(context="text", questions=["a", 2]), TypeError, r"`questions\[1\]` must be a string"),
        (lambda p: p(question="a"), ValueError, "Give a `context`"),
        (lambda p: p(context="text", question="a", merge_size=0), ValueError, "merge_size"),
        (lambda p: p([{"context": "t", "questions": ["a"]}], batch_size=2), ValueError, "one at a time"),
        (lambda p: p([]), ValueError, "empty list of inputs"),
    ],
)
def test_bad_input_is_named(pipe, call, error, message):
    with pytest.raises(error, match=message):
        call(pipe)


def test_saved_model_directory_infers_the_task(tmp_path, tokenizer):
    model = tiny_comi()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "pipeline_comi.py").exists()
    assert "custom_pipelines" not in model.config.to_dict()
    assert "comi-qa" in json.loads((tmp_path / "config.json").read_text())["custom_pipelines"]
    # With comi_hf imported, its registered pipeline serves the task (no remote code); the task is
    # inferred from the directory where comi_hf is not installed (test_remote_code.py).
    registered = pipeline(PIPELINE_TASK, model=str(tmp_path))
    named = pipeline(PIPELINE_TASK, model=str(tmp_path), trust_remote_code=True)
    in_memory = pipeline(PIPELINE_TASK, model=model, tokenizer=tokenizer)
    results = [p(context=CONTEXT, question=QUESTIONS[1], max_new_tokens=5) for p in (registered, named, in_memory)]
    assert results[0] == results[1] == results[2]
