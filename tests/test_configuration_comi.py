import pytest
from conftest import FAMILIES, backbone_config
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from comi_hf import COMIConfig


def test_defaults_follow_the_official_code():
    config = COMIConfig()
    assert config.model_type == "comi"
    assert config.text_config.model_type == "qwen2"
    assert (config.encoder_layers, config.num_mem_fusion_layers, config.merge_size) == (8, 1, 16)
    assert config.segment_size == 10000
    assert config.merge_sizes is None
    assert config.coarse_grained and config.fine_grained and config.coarse_redundancy and config.fine_redundancy
    assert (config.alpha_select, config.beta_select, config.alpha_merge, config.beta_merge) == (1.0, 1.0, 1.0, 1.0)
    assert not config.learnable_merge_weights
    assert config.get_text_config() is config.text_config


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_configs(family):
    config = COMIConfig(text_config=backbone_config(family), encoder_layers=3, num_mem_fusion_layers=2)
    encoder, lsa = config.encoder_config(), config.lsa_config()
    assert encoder.num_hidden_layers == 3 and lsa.num_hidden_layers == 2
    assert config.text_config.num_hidden_layers == 4
    for truncated, layers in ((encoder, 3), (lsa, 2)):
        if getattr(truncated, "layer_types", None) is not None:
            assert len(truncated.layer_types) == layers
        assert truncated.model_type == family


def test_dict_round_trip_keeps_the_backbone(tmp_path):
    config = COMIConfig(text_config=backbone_config("qwen3"), encoder_layers=2, merge_sizes=[4, 8], merge_size=8)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, COMIConfig)
    assert loaded.text_config.model_type == "qwen3"
    assert loaded.merge_sizes == [4, 8] and loaded.merge_size == 8
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}


def test_backbone_config_as_a_dict():
    config = COMIConfig(text_config=backbone_config("llama").to_dict(), encoder_layers=2)
    assert config.text_config.model_type == "llama"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"merge_size": 0}, "merge_size"),
        ({"merge_size": "4"}, "merge_size"),
        ({"merge_size": 2.5}, "merge_size"),
        ({"encoder_layers": 5}, "encoder_layers"),
        ({"encoder_layers": 0}, "encoder_layers"),
        ({"encoder_layers": True}, "encoder_layers"),
        ({"num_mem_fusion_layers": -1}, "num_mem_fusion_layers"),
        ({"segment_size": 0}, "segment_size"),
        ({"merge_sizes": []}, "merge_sizes"),
        ({"merge_sizes": [4, 0]}, "merge_sizes"),
        ({"alpha_select": float("nan")}, "alpha_select"),
        ({"beta_merge": float("inf")}, "beta_merge"),
        ({"alpha_merge": -float("inf")}, "alpha_merge"),
    ],
)
def test_invalid_values_are_refused_by_name(overrides, message):
    settings = {"text_config": backbone_config("qwen2"), "encoder_layers": 2, **overrides}
    with pytest.raises(StrictDataclassError, match=message):
        COMIConfig(**settings)


def test_non_finite_mig_weights_are_refused_on_assignment_too():
    config = COMIConfig(text_config=backbone_config("qwen2"), encoder_layers=2)
    with pytest.raises(StrictDataclassError, match="(?s)beta_select.*finite number"):
        config.beta_select = float("nan")


def test_learnable_coarse_weights_are_refused_with_the_reason():
    # The coarse stage only decides integer group sizes: its weights would never get a gradient.
    with pytest.raises(ValueError, match="never receive a gradient"):
        COMIConfig(text_config=backbone_config("qwen2"), encoder_layers=2, learnable_select_weights=True)
    # Configs saved with the old flag off still load, and do not keep it.
    config = COMIConfig(text_config=backbone_config("qwen2"), encoder_layers=2, learnable_select_weights=False)
    assert "learnable_select_weights" not in config.to_dict()


def test_tie_word_embeddings_follows_the_backbone():
    tied = COMIConfig(text_config=backbone_config("qwen2", tie_word_embeddings=True), encoder_layers=2)
    assert tied.tie_word_embeddings is True
    assert COMIConfig(text_config=backbone_config("qwen2"), encoder_layers=2).tie_word_embeddings is False
    with pytest.raises(ValueError, match="follows the backbone's"):
        COMIConfig(text_config=backbone_config("qwen2"), encoder_layers=2, tie_word_embeddings=True)
