"""The model card written beside trained models."""

from huggingface_hub import ModelCard

from comi_hf.model_card import write_model_card

SUMMARY = {"steps": 10, "learning_rate": 1e-3}


def test_local_base_model_is_named_by_its_directory_not_its_path(tmp_path):
    backbone = tmp_path / "some" / "tiny-backbone"
    backbone.mkdir(parents=True)
    path = write_model_card(
        tmp_path,
        base_model=str(backbone),
        merge_size=8,
        merge_sizes=[4, 8],
        training_data=["train.jsonl"],
        training_summary=SUMMARY,
        trained_with="research/default_model/finetune_comi.py",
    )
    card = ModelCard.load(path)
    assert card.data.base_model is None  # a local directory is no Hub id
    assert "- Base model: `tiny-backbone` (a local directory)" in card.text
    assert str(tmp_path) not in card.text
    assert "trained with comi_hf's `research/default_model/finetune_comi.py`" in card.text
    assert "- learning rate: 0.001" in card.text


def test_hub_base_model_goes_into_the_metadata(tmp_path):
    path = write_model_card(
        tmp_path,
        base_model="Qwen/Qwen3-4B",
        merge_size=16,
        merge_sizes=None,
        training_data=["train.jsonl"],
        training_summary=SUMMARY,
        evaluation={"exact_match": 0.5, "f1": 0.75, "num_samples": 4, "merge_size": 16, "compression_ratio": 15.9},
        evaluation_data="validation.jsonl",
    )
    card = ModelCard.load(path)
    assert card.data.base_model == "Qwen/Qwen3-4B"
    assert "- Base model: `Qwen/Qwen3-4B`" in card.text
    assert "trained with comi_hf's `examples/train.py`" in card.text
    assert "| 0.5000 | 0.7500 |" in card.text
