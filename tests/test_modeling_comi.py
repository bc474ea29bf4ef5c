import pytest
import torch
from conftest import EOS_ID, FAMILIES, VOCAB_SIZE, backbone_config, random_batch, sample, tiny_comi
from mig_reference import reference_mig_compress
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from comi_hf import COMIForConditionalGeneration


def _answers(batch_size=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, 300, (batch_size, 5), generator=generator)
    for i in range(batch_size):
        labels[i, 5 - i % 3 :] = -100
    return labels


# --------------------------------------------------------------------------- structure
def test_sub_models_have_the_configured_shapes():
    model = tiny_comi(encoder_layers=2, num_mem_fusion_layers=1)
    assert len(model.encoder.layers) == 2
    assert len(model.lsa.layers) == 1
    assert model.lsa.embed_tokens is None
    assert len(model.decoder.model.layers) == 4
    # No LM head outside the decoder: nothing computes vocabulary logits for context tokens.
    heads = [name for name, module in model.named_modules() if name.endswith("lm_head")]
    assert heads == ["decoder.lm_head"]


def test_linear_alignment_when_lsa_is_disabled_starts_as_identity():
    model = tiny_comi(num_mem_fusion_layers=0)
    assert isinstance(model.lsa, torch.nn.Linear)
    torch.testing.assert_close(model.lsa.weight, torch.eye(32))
    assert model.lsa.bias.abs().sum() == 0
    batch = random_batch()
    output = model(*batch, labels=_answers())
    assert torch.isfinite(output.loss)


def test_memory_matches_a_hand_built_pipeline():
    """Encoder → mean query → MIG (loop reference of docs/method.md) → LSA, one sample, one segment."""
    model = tiny_comi(segment_size=1000).double()
    input_ids, _, query_ids, _ = sample(random_batch(), 0)
    with torch.no_grad():
        hidden = model.encoder(input_ids=torch.cat([input_ids, query_ids], 1)).last_hidden_state[0]
        context, query = hidden[: input_ids.shape[1]], hidden[input_ids.shape[1] :]
        memory = reference_mig_compress(context, query.mean(0), model.config.merge_size)
        expected = model.lsa(inputs_embeds=memory[None]).last_hidden_state[0]
        got, got_mask = model.compress(input_ids, None, query_ids)
    assert got_mask.all()
    torch.testing.assert_close(got[0], expected, atol=1e-10, rtol=0)


def test_segments_are_compressed_separately_and_concatenated():
    model = tiny_comi(segment_size=16).double()
    input_ids, _, query_ids, _ = sample(random_batch(context_len=40), 0)
    with torch.no_grad():
        memory, _ = model.compress(input_ids, None, query_ids)
        pieces = [model.compress(input_ids[:, s : s + 16], None, query_ids)[0] for s in range(0, 40, 16)]
    # Segments of 16, 16 and 8 tokens at merge size 4: 4 + 4 + 2 memory vectors.
    assert memory.shape[1] == 10
    torch.testing.assert_close(memory, torch.cat(pieces, 1))


def test_encoder_passes_carry_no_padding_for_one_context():
    # Segments of 16, 16 and 8 tokens, each with the query: the short last segment is encoded at
    # its own length, without padding (an unmasked, fast attention pass).
    model = tiny_comi(segment_size=16)
    input_ids, _, query_ids, _ = sample(random_batch(context_len=40), 0)
    masks = []
    hook = model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model.compress(input_ids, None, query_ids)
            model.encode_context(input_ids)
    finally:
        hook.remove()
    query_len = query_ids.shape[1]
    assert [tuple(mask.shape) for mask in masks] == [
        (1, 16 + query_len),
        (1, 16 + query_len),
        (1, 8 + query_len),
        (1, 16),  # encode_context: the segments alone
        (1, 16),
        (1, 8),
    ]
    assert all(bool(mask.all()) for mask in masks)


# --------------------------------------------------------------------------- training forward
def test_loss_and_gradients_reach_every_trained_part():
    model = tiny_comi(learnable_merge_weights=True).train()
    output = model(*random_batch(), labels=_answers())
    output.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for prefix in ("encoder.layers.0.", "encoder.embed_tokens", "lsa.layers.0.", "decoder.model.layers.3."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    assert grads["compressor.alpha_merge"].abs() > 0
    assert grads["compressor.beta_merge"].abs() > 0


def test_loss_is_the_answer_cross_entropy_only():
    model = tiny_comi()
    input_ids, _, query_ids, _ = sample(random_batch(), 1)
    labels = torch.tensor([[7, 8, 9, EOS_ID]])
    output = model(input_ids, None, query_ids, None, labels=labels)
    memory_len = output.memory.shape[1]
    start = memory_len + query_ids.shape[1]
    logits = output.logits[0, start - 1 : start + 3]
    expected = torch.nn.functional.cross_entropy(logits, labels[0])
    torch.testing.assert_close(output.loss, expected)


def test_forward_and_generate_from_precompressed_memory():
    model = tiny_comi(merge_sizes=[2, 8])
    model.train()  # a merge size would be drawn per call: the memory's own must be the one used
    input_ids, attention_mask, query_ids, query_mask = random_batch()
    labels = _answers()
    memory, memory_mask, details = model.compress(
        input_ids, attention_mask, query_ids, query_mask, merge_size=2, return_details=True
    )
    assert details.token_memory.shape == input_ids.shape
    direct = model(input_ids, attention_mask, query_ids, query_mask, labels=labels, merge_size=2)
    reused = model(query_ids=query_ids, query_attention_mask=query_mask, labels=labels, memory=(memory, memory_mask))
    torch.testing.assert_close(reused.loss, direct.loss)
    reused.loss.backward()  # the gradient reaches the encoder through the given memory
    assert model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        memory = model.compress(input_ids, attention_mask, query_ids, query_mask)
    torch.testing.assert_close(
        model.generate(query_ids=query_ids, query_attention_mask=query_mask, memory=memory, max_new_tokens=4),
        model.generate(input_ids, attention_mask, query_ids, query_mask, max_new_tokens=4),
    )


def test_forward_and_generate_reject_memory_with_contexts_or_of_the_wrong_shape():
    model = tiny_comi()
    input_ids, _, query_ids, _ = random_batch()
    memory, memory_mask = model.compress(input_ids, None, query_ids)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids, query_ids=query_ids, memory=(memory, memory_mask))
    with pytest.raises(ValueError, match="not both"):
        model(query_ids=query_ids, memory=(memory, memory_mask), merge_size=2)
    with pytest.raises(ValueError, match=r"\(3, memory_len, hidden\)"):
        model(query_ids=query_ids, memory=(memory[:2], memory_mask[:2]))
    with pytest.raises(ValueError, match="pair `compress` gives"):
        model(query_ids=query_ids, memory=memory)
    with pytest.raises(ValueError, match="COMI needs a context"):
        model(query_ids=query_ids)
    with pytest.raises(ValueError, match="not both"):
        model.generate(input_ids, query_ids=query_ids, memory=(memory, memory_mask))
    with pytest.raises(ValueError, match="pair `compress` gives"):
        model.generate(query_ids=query_ids, memory=(memory, memory_mask[:, :1]))


@pytest.mark.parametrize("padding_side", ["right", "left", "mixed"])
def test_forward_batch_equals_each_sample_alone(padding_side):
    model = tiny_comi(segment_size=24)
    batch = random_batch(padding_side=padding_side)
    labels = _answers()
    with torch.no_grad():
        output = model(*batch, labels=labels)
        for i in range(3):
            alone = model(*sample(batch, i), labels=labels[i : i + 1, labels[i] != -100])
            real = output.decoder_attention_mask[i].bool()
            torch.testing.assert_close(output.logits[i][real], alone.logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                output.memory[i][output.memory_attention_mask[i]], alone.memory[0], atol=1e-5, rtol=1e-5
            )


def test_merge_size_override_and_sampling_in_training():
    model = tiny_comi(merge_sizes=[2, 8])
    input_ids, _, query_ids, _ = sample(random_batch(), 0)
    with torch.no_grad():
        assert model.compress(input_ids, None, query_ids, merge_size=2)[0].shape[1] == 25
        assert model.compress(input_ids, None, query_ids)[0].shape[1] == 13  # eval: config.merge_size 4
        model.train()
        seen = {model(input_ids, None, query_ids, None).memory.shape[1] for _ in range(20)}
    assert seen == {25, 7}


def test_context_shorter_than_merge_size_gives_one_memory_vector():
    model = tiny_comi(merge_size=16)
    memory, mask = model.compress(torch.tensor([[5, 6, 7]]), None, torch.tensor([[8, 9]]))
    assert memory.shape[1] == 1 and mask.all()


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("padding_side", ["right", "left", "mixed"])
def test_greedy_batch_equals_each_sample_alone(padding_side):
    model = tiny_comi(segment_size=24).double()
    batch = random_batch(padding_side=padding_side)
    # The official settings (repetition penalty 1.3) plus no EOS so every sample runs 12 steps.
    batched = model.generate(*batch, max_new_tokens=12, eos_token_id=None)
    for i in range(3):
        alone = model.generate(*sample(batch, i), max_new_tokens=12, eos_token_id=None)
        assert batched[i].tolist() == alone[0].tolist()


def test_repetition_penalty_covers_the_first_tokens_of_padded_samples():
    model = tiny_comi().double()
    batch = random_batch(padding_side="left")
    # A huge penalty forbids repeating any generated token, in every sample.
    output = model.generate(*batch, max_new_tokens=10, eos_token_id=None, repetition_penalty=1e6)
    for row in output.tolist():
        assert len(set(row)) == len(row)


def test_generation_defaults_are_the_official_evaluation():
    config = tiny_comi().generation_config
    assert config.do_sample is False
    assert config.max_new_tokens == 20
    assert config.repetition_penalty == 1.3
    assert config.eos_token_id == EOS_ID


def test_standard_generation_arguments():
    model = tiny_comi()
    batch = random_batch()

    greedy = model.generate(*batch, max_new_tokens=4, eos_token_id=None)
    assert greedy.shape == (3, 4)  # only new tokens

    torch.manual_seed(0)
    sampled = model.generate(*batch, do_sample=True, top_k=5, temperature=2.0, max_new_tokens=4)
    torch.manual_seed(0)
    assert torch.equal(sampled, model.generate(*batch, do_sample=True, top_k=5, temperature=2.0, max_new_tokens=4))

    beams = model.generate(*batch, num_beams=3, num_return_sequences=2, max_new_tokens=4, eos_token_id=None)
    assert beams.shape == (6, 4)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    streamed = model.generate(*sample(batch, 0), streamer=streamer, max_new_tokens=3, eos_token_id=None)
    # The streamer first receives the (empty: embeddings) prompt, then each new token.
    assert streamer.chunks[0] == [[]] and streamer.chunks[-1] == "end"
    assert [chunk[0] for chunk in streamer.chunks[1:-1]] == streamed[0].tolist()

    class StopAfterTwo(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 2, dtype=torch.bool)

    stopped = model.generate(*batch, stopping_criteria=StoppingCriteriaList([StopAfterTwo()]), eos_token_id=None)
    assert stopped.shape[1] == 2

    result = model.generate(*batch, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    assert result.sequences.shape[1] <= 3 and len(result.scores) == result.sequences.shape[1]


def test_generate_from_text(tokenizer):
    model = tiny_comi()
    contexts = ["the code of red river is 4821 . the code of blue lake is 1234 .", "old mill is north ."]
    queries = ["what is the code of red river ?", "which city ?"]
    from_text = model.generate(context=contexts, query=queries, tokenizer=tokenizer, max_new_tokens=5)
    context_batch = tokenizer(contexts, add_special_tokens=False, padding=True, return_tensors="pt")
    query_batch = tokenizer(queries, add_special_tokens=False, padding=True, return_tensors="pt")
    from_ids = model.generate(
        context_batch.input_ids,
        context_batch.attention_mask,
        query_batch.input_ids,
        query_batch.attention_mask,
        max_new_tokens=5,
    )
    assert torch.equal(from_text, from_ids)
    single = model.generate(context=contexts[0], query=queries[0], tokenizer=tokenizer, max_new_tokens=5)
    assert single.shape[0] == 1


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_get_clear_errors(tokenizer):
    model = tiny_comi()
    ids = torch.tensor([[5, 6, 7, 8]])
    query = torch.tensor([[9, 10]])
    with pytest.raises(ValueError, match="Empty context"):
        model.generate(ids, torch.zeros_like(ids), query, None)
    with pytest.raises(ValueError, match="Empty query"):
        model.generate(ids, None, query, torch.zeros_like(query))
    with pytest.raises(ValueError, match="2 contexts but `query_ids` holds 1"):
        model.generate(ids.repeat(2, 1), None, query, None)
    with pytest.raises(ValueError, match="needs `tokenizer=`"):
        model.generate(context="some text", query="a question")
    with pytest.raises(ValueError, match="`context` is empty"):
        model.generate(context=" ", query="a question", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="2 contexts but `query_ids` holds 1 queries"):
        model.generate(context=["a", "b"], query=["c"], tokenizer=tokenizer)
    with pytest.raises(TypeError, match="`query` must be a string"):
        model.generate(context="a", query=3, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="`input_ids` must be a"):
        model.generate(ids.float(), None, query, None)
    with pytest.raises(ValueError, match="`attention_mask` must have the shape"):
        model(ids, torch.ones(1, 3), query, None)
    with pytest.raises(ValueError, match="COMI needs a context"):
        model(ids)
    with pytest.raises(ValueError, match="merge_size"):
        model.generate(ids, None, query, None, merge_size=0)
    with pytest.raises(ValueError, match="either text"):
        model.generate(ids, None, query, None, context="x", query="y", tokenizer=tokenizer)


# --------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("family", FAMILIES)
def test_from_backbone_copies_the_backbone(tmp_path, family):
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(backbone_config(family)).eval()
    backbone.save_pretrained(tmp_path)
    model = COMIForConditionalGeneration.from_backbone(
        tmp_path, encoder_layers=3, num_mem_fusion_layers=2, merge_size=4
    ).eval()
    assert model.config.text_config.model_type == family
    source = backbone.state_dict()
    for name, tensor in model.decoder.state_dict().items():
        torch.testing.assert_close(tensor, source[name], rtol=0, atol=0)
    for name, tensor in model.encoder.state_dict().items():
        torch.testing.assert_close(tensor, source[f"model.{name}"], rtol=0, atol=0)
    for name, tensor in model.lsa.state_dict().items():
        torch.testing.assert_close(tensor, source[f"model.{name}"], rtol=0, atol=0)
    assert len(model.encoder.layers) == 3 and len(model.lsa.layers) == 2
    # The decoder is the backbone: same logits on the same tokens.
    ids = torch.randint(2, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(ids).logits, backbone(ids).logits)
    # And the model answers, batch equal to single.
    batch = random_batch()
    batched = model.generate(*batch, max_new_tokens=5, eos_token_id=None)
    for i in range(3):
        assert batched[i].tolist() == model.generate(*sample(batch, i), max_new_tokens=5, eos_token_id=None)[0].tolist()
    # It saves in its own layout and loads back whole.
    model.save_pretrained(tmp_path / "comi")
    loaded, info = COMIForConditionalGeneration.from_pretrained(tmp_path / "comi", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.eval().generate(*batch, max_new_tokens=5, eos_token_id=None), batched)


def test_from_backbone_refuses_a_checkpoint_that_does_not_match(tmp_path):
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(backbone_config("qwen2"))
    backbone.save_pretrained(tmp_path)
    # Claim a wider model than the weights hold.
    config = backbone.config
    config.hidden_size = 64
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a backbone matching its own config"):
        COMIForConditionalGeneration.from_backbone(tmp_path, encoder_layers=2)


def test_from_backbone_refuses_a_comi_directory(tmp_path):
    tiny_comi().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already a COMI model"):
        COMIForConditionalGeneration.from_backbone(tmp_path)


def test_from_backbone_with_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(backbone_config("qwen2", tie_word_embeddings=True))
    backbone.save_pretrained(tmp_path)
    model = COMIForConditionalGeneration.from_backbone(tmp_path, encoder_layers=2)
    assert model.decoder.lm_head.weight.data_ptr() == model.decoder.model.embed_tokens.weight.data_ptr()
    # The encoder has its own table (trained apart from the frozen decoder).
    assert model.encoder.embed_tokens.weight.data_ptr() != model.decoder.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.encoder.embed_tokens.weight, model.decoder.model.embed_tokens.weight)


# --------------------------------------------------------------------------- save / load
def test_save_and_load_round_trip(tmp_path):
    model = tiny_comi(learnable_merge_weights=True, num_mem_fusion_layers=2)
    with torch.no_grad():
        model.compressor.alpha_merge.fill_(1.5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded, info = COMIForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.compressor.alpha_merge.item() == 1.5
    for (name, tensor), (other_name, other) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == other_name and torch.equal(tensor, other), name
    batch = random_batch()
    assert torch.equal(model.generate(*batch), loaded.eval().generate(*batch))
    assert loaded.generation_config.repetition_penalty == 1.3


def test_tied_backbone_round_trip(tmp_path):
    model = tiny_comi(backbone={"tie_word_embeddings": True})
    model.save_pretrained(tmp_path)
    loaded, info = COMIForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.decoder.lm_head.weight.data_ptr() == loaded.decoder.model.embed_tokens.weight.data_ptr()


def test_auto_classes_load_with_the_package_imported(tmp_path):
    from transformers import AutoConfig, AutoModel

    from comi_hf import COMIConfig

    tiny_comi().save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), COMIConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), COMIForConditionalGeneration)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), COMIForConditionalGeneration)


# --------------------------------------------------------------------------- attention / dtype / devices
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_reaches_every_sub_model(tmp_path, implementation):
    tiny_comi().save_pretrained(tmp_path)
    model = COMIForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation)
    for part in (model, model.encoder, model.lsa, model.decoder):
        assert part.config._attn_implementation == implementation
    other = "sdpa" if implementation == "eager" else "eager"
    model.set_attn_implementation(other)
    for part in (model.encoder, model.lsa, model.decoder):
        assert part.config._attn_implementation == other


def test_eager_and_sdpa_agree(tmp_path):
    tiny_comi().save_pretrained(tmp_path)
    batch = random_batch(padding_side="mixed")
    labels = _answers()
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = COMIForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        with torch.no_grad():
            outputs[implementation] = model(*batch, labels=labels)
    torch.testing.assert_close(outputs["eager"].logits, outputs["sdpa"].logits, atol=1e-4, rtol=1e-4)


def test_flash_attention_2_when_available(tmp_path):
    pytest.importorskip("flash_attn", reason="flash-attn is an optional extra")
    if not torch.cuda.is_available():
        pytest.skip("flash-attn needs a CUDA GPU")
    tiny_comi().save_pretrained(tmp_path)
    model = COMIForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="flash_attention_2", dtype=torch.bfloat16, device_map="cuda"
    )
    for part in (model.encoder, model.lsa, model.decoder):
        assert part.config._attn_implementation == "flash_attention_2"
    batch = [t.cuda() for t in random_batch()]
    assert model.generate(*batch, max_new_tokens=3).shape[0] == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(tmp_path, dtype):
    tiny_comi(learnable_merge_weights=True).save_pretrained(tmp_path)
    model = COMIForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    assert model.encoder.embed_tokens.weight.dtype == dtype
    assert model.decoder.lm_head.weight.dtype == dtype
    assert model.compressor.alpha_merge.dtype == torch.float32
    memory, _ = model.compress(*random_batch()[:3])
    assert memory.dtype == dtype
    assert model.generate(*random_batch(), max_new_tokens=2).shape == (3, 2)


def test_from_backbone_dtype_and_device_map(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(backbone_config("llama")).save_pretrained(tmp_path)
    model = COMIForConditionalGeneration.from_backbone(
        tmp_path, dtype=torch.bfloat16, device_map="auto", encoder_layers=2, attn_implementation="eager"
    )
    assert model.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.encoder.config._attn_implementation == "eager"
    assert not any(p.is_meta for p in model.parameters())
    torch.testing.assert_close(
        model.encoder.layers[1].mlp.up_proj.weight, model.decoder.model.layers[1].mlp.up_proj.weight
    )
    assert model.generate(*random_batch(), max_new_tokens=2).shape == (3, 2)


def test_device_map_auto_loading(tmp_path):
    tiny_comi().save_pretrained(tmp_path)
    model = COMIForConditionalGeneration.from_pretrained(tmp_path, device_map="auto")
    assert not any(p.is_meta for p in model.parameters())
    reference = COMIForConditionalGeneration.from_pretrained(tmp_path)
    batch = random_batch()
    assert torch.equal(model.generate(*batch, max_new_tokens=4), reference.generate(*batch, max_new_tokens=4))


def test_loading_a_checkpoint_with_missing_weights_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_comi().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lsa.norm.weight"]
    weights["encoder.extra.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights: lsa\.norm\.weight; unexpected weights: encoder\.extra"):
        COMIForConditionalGeneration.from_pretrained(tmp_path)


def test_loading_plain_backbone_weights_as_comi_points_to_from_backbone(tmp_path):
    from safetensors.torch import save_file

    tiny_comi().save_pretrained(tmp_path)
    backbone = AutoModelForCausalLM.from_config(backbone_config("qwen2"))
    save_file(backbone.state_dict(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="from_backbone"):
        COMIForConditionalGeneration.from_pretrained(tmp_path)


def test_loading_a_plain_backbone_directory_as_comi_is_refused(tmp_path):
    AutoModelForCausalLM.from_config(backbone_config("qwen2")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`qwen2` config, not a COMI one"):
        COMIForConditionalGeneration.from_pretrained(tmp_path)


def test_padding_ids_outside_the_vocabulary_are_never_looked_up():
    model = tiny_comi()
    batch = random_batch()
    input_ids, attention_mask, query_ids, query_mask = batch
    odd = (
        input_ids.masked_fill(attention_mask == 0, -1),
        attention_mask,
        query_ids.masked_fill(query_mask == 0, -1),
        query_mask,
    )
    assert torch.equal(model.generate(*odd, max_new_tokens=3), model.generate(*batch, max_new_tokens=3))
    torch.testing.assert_close(model(*odd, labels=_answers()).loss, model(*batch, labels=_answers()).loss)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_comi().train()
    batch, labels = random_batch(), _answers()
    model(*batch, labels=labels, merge_size=4).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # transformers 5.x renamed it; the old name still works there with a deprecation warning.
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert model.encoder.gradient_checkpointing and model.decoder.model.gradient_checkpointing
    model(*batch, labels=labels, merge_size=4).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


def test_resize_token_embeddings_resizes_encoder_and_decoder():
    model = tiny_comi()
    model.resize_token_embeddings(352)
    assert model.encoder.embed_tokens.weight.shape[0] == 352
    assert model.decoder.model.embed_tokens.weight.shape[0] == 352
    assert model.decoder.lm_head.weight.shape[0] == 352
    assert model.config.text_config.vocab_size == 352


def test_a_given_generation_config_keeps_the_penalty_fix():
    from transformers import GenerationConfig

    model = tiny_comi().double()
    batch = random_batch(padding_side="left")
    for options in ({"generation_config": GenerationConfig(max_new_tokens=10)}, {"repetition_penalty": None}):
        batched = model.generate(*batch, eos_token_id=None, **{"max_new_tokens": 10, **options})
        for i in range(3):
            alone = model.generate(*sample(batch, i), eos_token_id=None, **{"max_new_tokens": 10, **options})
            assert batched[i].tolist() == alone[0].tolist(), options


def test_checkpoint_without_generation_config_gets_the_official_settings(tmp_path):
    tiny_comi().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    loaded = COMIForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.generation_config.repetition_penalty == 1.3
    assert loaded.generation_config.max_new_tokens == 20
    assert loaded.generation_config.do_sample is False


def test_from_backbone_in_bfloat16_keeps_learnable_weights_in_float32(tmp_path):
    AutoModelForCausalLM.from_config(backbone_config("qwen2")).save_pretrained(tmp_path)
    model = COMIForConditionalGeneration.from_backbone(
        tmp_path, dtype=torch.bfloat16, encoder_layers=2, learnable_merge_weights=True, alpha_merge=1.25
    )
    assert model.compressor.alpha_merge.dtype == torch.float32
    assert model.compressor.alpha_merge.item() == 1.25
    assert model.encoder.embed_tokens.weight.dtype == torch.bfloat16


def test_text_input_with_a_tokenizer_that_has_no_pad_token(tokenizer):
    import copy

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    model = tiny_comi()
    contexts = ["the code of red river is 4821 .", "old mill is north of the lake ."]
    queries = ["what is the code ?", "which ?"]
    assert torch.equal(
        model.generate(context=contexts, query=queries, tokenizer=no_pad, max_new_tokens=4),
        model.generate(context=contexts, query=queries, tokenizer=tokenizer, max_new_tokens=4),
    )


def test_empty_batches_and_malformed_labels_are_named():
    model = tiny_comi()
    ids, query = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
    with pytest.raises(ValueError, match="is an empty batch"):
        model.generate(ids[:0], None, query[:0], None)
    for labels in (torch.tensor([4, 5]), torch.tensor([[4.0, 5.0]]), [[4, 5]], torch.tensor([[4], [5]])):
        with pytest.raises(ValueError, match="`labels` must be a"):
            model(ids, None, query, None, labels=labels)


def test_token_ids_outside_the_vocabulary_are_named():
    model = tiny_comi()
    ids, query = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10]])
    vocab = model.config.text_config.vocab_size
    for call, name in (
        (lambda: model.generate(ids.clone().fill_(vocab), None, query, None), "input_ids"),
        (lambda: model.generate(ids, None, torch.tensor([[9, -3]]), None), "query_ids"),
        (lambda: model(ids, None, query, None, labels=torch.tensor([[4, vocab + 7]])), "labels"),
    ):
        with pytest.raises(ValueError, match=f"`{name}` holds token ids outside the model's vocabulary of {vocab}"):
            call()


def test_non_finite_encoder_states_name_the_query(monkeypatch):
    model = tiny_comi()
    batch = random_batch()  # three contexts of one segment each: encoder row i is sample i
    encode_rows = model._encode_rows

    def overflowing(*args, **kwargs):
        # The second context's hidden states overflow, as a half-precision encoder's can.
        hidden, key_values = encode_rows(*args, **kwargs)
        hidden[1, 2] = float("inf")
        return hidden, key_values

    monkeypatch.setattr(model, "_encode_rows", overflowing)
    with pytest.raises(ValueError, match=r"hold NaN or inf for query\(s\) \[1\]"):
        model.generate(*batch, max_new_tokens=2)


def test_more_positions_than_the_decoder_has_are_warned_once(caplog):
    model = tiny_comi(backbone={"max_position_embeddings": 40})
    ids = torch.randint(2, VOCAB_SIZE, (1, 120))
    query = torch.randint(2, VOCAB_SIZE, (1, 5))
    with caplog.at_level("WARNING"):
        model.generate(ids, None, query, None, max_new_tokens=3, merge_size=4)  # 30 memory + 5 query + 3 new
    assert not caplog.records
    with caplog.at_level("WARNING"):
        model.generate(ids, None, query, None, max_new_tokens=6, merge_size=4)
        model.generate(ids, None, query, None, max_new_tokens=6, merge_size=4)
    warned = [record.getMessage() for record in caplog.records if "max_position_embeddings" in record.getMessage()]
    assert warned == [
        "The decoder reads 41 positions (memory vectors and query, and up to 6 new tokens), more than its "
        "max_position_embeddings (40): its answers past that length are unreliable. Compress more (a larger "
        "merge_size) or truncate the context."
    ]
