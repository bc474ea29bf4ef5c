"""A Hub model card (README.md with metadata) for a trained COMI model."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

__all__ = ["write_model_card"]


def write_model_card(
    output_dir: str | Path,
    *,
    base_model: str,
    merge_size: int,
    merge_sizes: list[int] | None,
    training_data: list[str],
    training_summary: dict,
    evaluation: dict | None = None,
    evaluation_data: str | None = None,
    notes: str | None = None,
    trained_with: str = "examples/train.py",
) -> Path:
    """Write `output_dir/README.md` so that `push_to_hub` publishes a usable, described repo."""
    # A local directory is no Hub id: leave the metadata field out rather than point nowhere,
    # and name only the directory (its absolute path means nothing on the Hub).
    local = Path(base_model).exists()
    card_data = ModelCardData(
        base_model=None if local else base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["comi", "context-compression", "long-context", "question-answering", "custom_code"],
    )
    lines = [
        f"# {Path(output_dir).name}",
        "",
        "A COMI model (coarse-to-fine context compression with marginal information gain, ICLR 2026) "
        f"trained with comi_hf's `{trained_with}`. The encoder reads the context, "
        "MIG compression keeps about one memory vector per merge-size tokens, and the decoder answers "
        "from the memory and the question.",
        "",
        f"- Base model: `{Path(base_model).name}` (a local directory)" if local else f"- Base model: `{base_model}`",
        f"- Merge size (compression ratio) by default: {merge_size}"
        + (f"; trained with merge sizes sampled from {merge_sizes}" if merge_sizes else ""),
        f"- Training data: {', '.join(f'`{name}`' for name in training_data)}",
    ]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in training_summary.items()]
    if evaluation is not None:
        lines += [
            "",
            "## Evaluation",
            "",
            f"On `{evaluation_data}` ({evaluation['num_samples']} examples, merge size {evaluation['merge_size']}, "
            f"average compression {evaluation['compression_ratio']:.1f}x), SQuAD-normalised:",
            "",
            "| exact match | F1 |",
            "| --- | --- |",
            f"| {evaluation['exact_match']:.4f} | {evaluation['f1']:.4f} |",
        ]
    if notes:
        lines += ["", "## Notes", "", notes]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'qa = pipeline(model="path/or/hub-id", trust_remote_code=True)  # task comi-qa',
        'print(qa(context=open("document.txt").read(), question="..."))',
        "```",
        "",
    ]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path
