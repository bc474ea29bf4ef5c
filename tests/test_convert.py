"""`comi-convert` on a state dict laid out like the official training code's (docs/method.md)."""

import contextlib
import io
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from conftest import backbone_config, random_batch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from comi_hf import COMIConfig, COMIForConditionalGeneration
from comi_hf.convert import convert_official_state_dict
from comi_hf_cli import comi_convert
from comi_hf_cli import comi_convert as main

LORA_R, LORA_ALPHA = 4, 8
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def official_state_dict(model: COMIForConditionalGeneration, lsa: bool = True, old_prefix: bool = False):
    """What the official `COMI.state_dict()` holds for the same weights, with random LoRA on top."""
    generator = torch.Generator().manual_seed(1)
    encoder = "icae" if old_prefix else "encoder"
    state, lora_deltas = {}, {}
    for key, value in model.encoder.state_dict().items():
        state[f"{encoder}.model.{key}"] = value.clone()
    state[f"{encoder}.lm_head.weight"] = torch.randn(model.config.text_config.vocab_size, 32, generator=generator)
    if lsa:
        for key, value in model.lsa.state_dict().items():
            state[f"memory_fusion_layer.model.{key}"] = value.clone()
        state["memory_fusion_layer.model.embed_tokens.weight"] = torch.randn(320, 32, generator=generator)
        state["memory_fusion_layer.lm_head.weight"] = torch.randn(320, 32, generator=generator)
    for key, value in model.decoder.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module.split(".")[-1] in PROJECTIONS:
            state[f"decoder.base_model.model.{module}.base_layer.{leaf}"] = value.clone()
            if leaf == "weight":
                lora_a = torch.randn(LORA_R, value.shape[1], generator=generator)
                lora_b = torch.randn(value.shape[0], LORA_R, generator=generator)
                state[f"decoder.base_model.model.{module}.lora_A.default.weight"] = lora_a
                state[f"decoder.base_model.model.{module}.lora_B.default.weight"] = lora_b
                lora_deltas[f"decoder.{key}"] = (LORA_ALPHA / LORA_R) * lora_b @ lora_a
        else:
            state[f"decoder.base_model.model.{key}"] = value.clone()
    state["semantic_alignment_layer.weight"] = torch.randn(32, 32, generator=generator)
    state["semantic_alignment_layer.bias"] = torch.randn(32, generator=generator)
    for name, value in (("alpha_select", 1.5), ("beta_select", 0.5), ("alpha_merge", 2.0), ("beta_merge", 1.0)):
        state[name] = torch.tensor(value)
    return state, lora_deltas


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(backbone_config("qwen2")).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _with_extra_encoder_layer(state: dict) -> dict:
    """The state with the encoder's last layer copied one layer deeper."""
    last = max(int(key.split(".")[3]) for key in state if key.startswith("encoder.model.layers."))
    prefix = f"encoder.model.layers.{last}."
    extra = {
        f"encoder.model.layers.{last + 1}." + key[len(prefix) :]: v.clone()
        for key, v in state.items()
        if key.startswith(prefix)
    }
    return {**state, **extra}


def _reference(backbone_dir, **config):
    torch.manual_seed(3)
    settings = {"encoder_layers": 3, "num_mem_fusion_layers": 1, **config}
    return COMIForConditionalGeneration(COMIConfig(text_config=backbone_config("qwen2"), **settings)).eval()


@pytest.mark.parametrize("old_prefix", [False, True])
def test_conversion_merges_lora_exactly_and_answers_like_the_merged_weights(backbone_dir, tmp_path, old_prefix):
    reference = _reference(backbone_dir)
    state, deltas = official_state_dict(reference, old_prefix=old_prefix)
    checkpoint = tmp_path / "model.safetensors"
    save_file(state, checkpoint)
    output = tmp_path / "converted"
    args = [str(checkpoint), "--backbone", str(backbone_dir), "--output-dir", str(output)]
    assert main([*args, "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA), "--merge-size", "4"]) == 0

    converted = COMIForConditionalGeneration.from_pretrained(output).eval()
    assert converted.config.encoder_layers == 3 and converted.config.num_mem_fusion_layers == 1
    assert converted.config.merge_size == 4
    assert (converted.config.alpha_select, converted.config.beta_select) == (1.5, 0.5)
    assert (converted.config.alpha_merge, converted.config.beta_merge) == (2.0, 1.0)
    expected = reference.state_dict()
    for key, value in converted.state_dict().items():
        target = expected[key] + deltas[key] if key in deltas else expected[key]
        torch.testing.assert_close(value, target, rtol=0, atol=1e-6, msg=key)
    assert len(deltas) == 4 * 4
    # Greedy answers equal those of the same weights merged by hand, under the official settings.
    for key, delta in deltas.items():
        reference.state_dict()[key].add_(delta)
    reference.config.alpha_select, reference.config.beta_select = 1.5, 0.5
    reference.config.alpha_merge, reference.config.beta_merge = 2.0, 1.0
    batch = random_batch()
    assert torch.equal(converted.generate(*batch, merge_size=4), reference.generate(*batch, merge_size=4))
    assert converted.generation_config.repetition_penalty == 1.3 and converted.generation_config.max_new_tokens == 20
    assert (output / "tokenizer.json").exists()


def test_every_key_is_used_or_explained():
    reference = _reference(None)
    state, _ = official_state_dict(reference)
    converted, scalars, depths, dropped = convert_official_state_dict(state, LORA_R, LORA_ALPHA)
    dropped_keys = {key for key, _ in dropped}
    assert dropped_keys == {
        "encoder.lm_head.weight",
        "memory_fusion_layer.lm_head.weight",
        "memory_fusion_layer.model.embed_tokens.weight",
        "semantic_alignment_layer.weight",
        "semantic_alignment_layer.bias",
    }
    assert all(reason for _, reason in dropped)
    assert set(scalars) == {"alpha_select", "beta_select", "alpha_merge", "beta_merge"}
    assert depths == {"encoder_layers": 3, "num_mem_fusion_layers": 1}
    assert set(converted) == set(reference.state_dict())


def test_checkpoint_without_lsa_layers():
    reference = _reference(None, num_mem_fusion_layers=0)
    state, _ = official_state_dict(reference, lsa=False)
    converted, _, depths, dropped = convert_official_state_dict(state, LORA_R, LORA_ALPHA)
    assert depths["num_mem_fusion_layers"] == 0
    assert any("identity" in reason for key, reason in dropped if key.startswith("semantic_alignment_layer"))


def test_checkpoint_without_lsa_layers_converts_end_to_end(backbone_dir, tmp_path):
    reference = _reference(backbone_dir, num_mem_fusion_layers=0)
    state, deltas = official_state_dict(reference, lsa=False)
    save_file(state, tmp_path / "model.safetensors")
    output = tmp_path / "converted"
    args = [str(tmp_path / "model.safetensors"), "--backbone", str(backbone_dir), "--output-dir", str(output)]
    assert main([*args, "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA), "--merge-size", "4"]) == 0
    converted = COMIForConditionalGeneration.from_pretrained(output).eval()
    assert converted.config.num_mem_fusion_layers == 0
    hidden_size = reference.config.text_config.hidden_size
    # The official code passes the memory through unchanged at LSA depth 0: the map is the identity.
    assert torch.equal(converted.lsa.weight, torch.eye(hidden_size)) and not converted.lsa.bias.any()
    for key, delta in deltas.items():
        reference.state_dict()[key].add_(delta)
    for name in ("alpha_select", "beta_select", "alpha_merge", "beta_merge"):
        setattr(reference.config, name, getattr(converted.config, name))
    batch = random_batch()
    assert torch.equal(converted.generate(*batch, merge_size=4), reference.generate(*batch, merge_size=4))


def _run_cli(args, tmp_path, in_process=False):
    """`comi-convert ARGS`: its exit status and messages. In a subprocess, as a user runs it, or (each
    subprocess spends seconds importing torch) the console script's function in this process."""
    if not in_process:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        command = ["comi-convert", *args]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = comi_convert(args)
        except SystemExit as exit:
            code = exit.code
    return SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def test_mismatches_are_refused_with_the_offending_keys(backbone_dir, tmp_path):
    reference = _reference(backbone_dir)
    state, _ = official_state_dict(reference)
    base = [
        "--backbone",
        str(backbone_dir),
        "--output-dir",
        str(tmp_path / "out"),
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
    ]

    extra = dict(state, **{"mystery.weight": torch.zeros(1)})
    save_file(extra, tmp_path / "extra.safetensors")
    done = _run_cli([str(tmp_path / "extra.safetensors"), *base], tmp_path)
    assert done.returncode == 2 and "mystery.weight" in done.stderr and "Traceback" not in done.stderr

    wider = dict(state)
    wider["encoder.model.norm.weight"] = torch.ones(64)
    save_file(wider, tmp_path / "wider.safetensors")
    done = _run_cli([str(tmp_path / "wider.safetensors"), *base], tmp_path, in_process=True)
    assert done.returncode == 2 and "wrong shapes: encoder.norm.weight (64,) vs (32,)" in done.stderr

    save_file(state, tmp_path / "model.safetensors")
    done = _run_cli(
        [str(tmp_path / "model.safetensors"), *base[:-4], "--lora-r", "8", "--lora-alpha", "8"], tmp_path, True
    )
    assert done.returncode == 2 and "rank 4, but --lora-r is 8" in done.stderr

    for name, value in (("alpha_select", float("nan")), ("beta_merge", float("inf"))):
        save_file(dict(state, **{name: torch.tensor(value)}), tmp_path / "nonfinite.safetensors")
        done = _run_cli([str(tmp_path / "nonfinite.safetensors"), *base], tmp_path, in_process=True)
        assert done.returncode == 2 and f"`{name}` holds 1 NaN or infinite value(s)" in done.stderr

    deeper = _reference(None, encoder_layers=4)
    deeper_state, _ = official_state_dict(deeper)
    save_file(_with_extra_encoder_layer(deeper_state), tmp_path / "deep.safetensors")
    done = _run_cli([str(tmp_path / "deep.safetensors"), *base], tmp_path, in_process=True)
    assert done.returncode == 2 and "encoder has 5 layers, more than the 4" in done.stderr

    save_file(state, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    done = _run_cli([str(tmp_path / "truncated.safetensors"), *base], tmp_path, in_process=True)
    assert done.returncode == 2 and "truncated, or not a safetensors file" in done.stderr

    for done in (
        _run_cli([str(tmp_path / "model.safetensors"), *base[:-2], "--lora-alpha", "nan"], tmp_path),
        _run_cli([str(tmp_path / "model.safetensors"), *base[:-4], "--lora-r", "0", "--lora-alpha", "8"], tmp_path),
    ):
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("comi-convert: error: --lora-")

    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    done = _run_cli([str(tmp_path / "pytorch_model.bin"), *base], tmp_path, in_process=True)
    assert done.returncode == 2 and "only safetensors" in done.stderr

    # A scaling that is infinite in float32 would write non-finite weights (1e308 / 4 overflows it).
    for alpha in ("inf", "1e308", "2e39"):
        done = _run_cli([str(tmp_path / "model.safetensors"), *base[:-2], "--lora-alpha", alpha], tmp_path, True)
        assert done.returncode == 2 and "--lora-alpha must be a number > 0 whose scaling" in done.stderr, done.stderr
    # A scaling that fits float32 can still overflow the merged weights: those are checked too.
    done = _run_cli([str(tmp_path / "model.safetensors"), *base[:-2], "--lora-alpha", "1e39"], tmp_path, True)
    assert done.returncode == 2 and "the merged weights: `decoder." in done.stderr, done.stderr
    infinite = dict(state)
    name = next(key for key in state if key.startswith("encoder.model.layers.0."))
    infinite[name] = state[name].clone()
    infinite[name].view(-1)[3] = float("inf")
    save_file(infinite, tmp_path / "inf.safetensors")
    done = _run_cli([str(tmp_path / "inf.safetensors"), *base], tmp_path, in_process=True)
    assert done.returncode == 2 and f"`{name}` holds 1 NaN or infinite value(s)" in done.stderr
    (tmp_path / "a_file").write_text("")
    out_is_file = [str(tmp_path / "model.safetensors"), *base]
    out_is_file[out_is_file.index("--output-dir") + 1] = str(tmp_path / "a_file")
    done = _run_cli(out_is_file, tmp_path, in_process=True)
    assert done.returncode == 2 and "exists and is not a directory" in done.stderr
    no_backbone = [str(tmp_path / "model.safetensors"), *base]
    no_backbone[no_backbone.index("--backbone") + 1] = "/nonexistent/bb"
    done = _run_cli(no_backbone, tmp_path, in_process=True)
    assert done.returncode == 2 and "no such backbone directory: /nonexistent/bb" in done.stderr
