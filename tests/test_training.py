import re

import pytest
import torch
from conftest import random_batch, tiny_comi

from comi_hf.training import finalize_trained_model, lora_target_pattern, prepare_for_training

ATTENTION = re.compile(r"^base_model\.model\.decoder\.model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.lora_[AB]\.")


def _answers():
    return torch.tensor([[7, 8, 0], [9, 0, -100], [5, 6, 0]])


def test_official_recipe_trains_encoder_lsa_and_decoder_attention_lora_only():
    model = tiny_comi()
    peft_model = prepare_for_training(model, lora_r=4, lora_alpha=8)
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    lora = [name for name in trainable if "lora_" in name]
    assert lora and all(ATTENTION.match(name) for name in lora)
    # 4 decoder layers x 4 projections x (A, B)
    assert len(lora) == 4 * 4 * 2
    others = [name for name in trainable if "lora_" not in name]
    assert others and all(re.match(r"^base_model\.model\.(encoder|lsa)\.modules_to_save\.", n) for n in others)
    frozen_decoder = [n for n, p in peft_model.named_parameters() if ".decoder." in n and "lora_" not in n]
    assert frozen_decoder and not any(dict(peft_model.named_parameters())[n].requires_grad for n in frozen_decoder)
    output = peft_model(*random_batch(), labels=_answers())
    output.loss.backward()
    assert all(param.grad is not None for name, param in peft_model.named_parameters() if name in lora[:2])


def test_part_modes():
    model = prepare_for_training(tiny_comi(), encoder="freeze", lsa="full", decoder="freeze")
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.lsa.parameters())
    assert not any(p.requires_grad for p in model.decoder.parameters())
    lora_everywhere = prepare_for_training(tiny_comi(), encoder="lora", lsa="lora", decoder="lora", lora_r=2)
    parts = {name.split(".")[2] for name, _ in lora_everywhere.named_parameters() if "lora_" in name}
    assert parts == {"encoder", "lsa", "decoder"}
    with pytest.raises(ValueError, match="`decoder` must be one of"):
        prepare_for_training(tiny_comi(), decoder="half")
    with pytest.raises(ValueError, match="No modules were targeted"):
        prepare_for_training(tiny_comi(), lora_target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match="needs LSA layers"):
        prepare_for_training(tiny_comi(num_mem_fusion_layers=0), lsa="lora")


def test_learnable_weights_train_with_lora():
    peft_model = prepare_for_training(tiny_comi(learnable_merge_weights=True), lora_r=2)
    assert any("compressor" in n and p.requires_grad for n, p in peft_model.named_parameters())


def test_merging_gives_w_plus_scaled_b_a():
    model = tiny_comi()
    original = model.decoder.model.layers[1].self_attn.v_proj.weight.detach().clone()
    peft_model = prepare_for_training(model, lora_r=4, lora_alpha=12)
    layer = peft_model.base_model.model.decoder.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    lora_a, lora_b = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    merged = finalize_trained_model(peft_model)
    expected = original + (12 / 4) * lora_b @ lora_a
    torch.testing.assert_close(merged.decoder.model.layers[1].self_attn.v_proj.weight, expected)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_lora_target_pattern():
    pattern = re.compile(lora_target_pattern(["decoder"], ["q_proj", "o_proj"]))
    assert pattern.fullmatch("decoder.model.layers.3.self_attn.q_proj")
    assert not pattern.fullmatch("encoder.layers.3.self_attn.q_proj")
    assert not pattern.fullmatch("decoder.model.layers.3.self_attn.k_proj")
