"""Copy a trained default model into the package (or any directory), with its results in the card.

    python research/default_model/ship.py --model_dir WORK/comi --work_dir WORK --output_dir DIR \
        [--backbone_output_dir BACKBONE_DIR]

Copies the weights, configs and tokenizer of `--model_dir`, gathers the held-out results that
`train_default_model.sh` wrote under `WORK/eval` and the backbone's learning curve into
`results.json`, and appends them to the model card. Inside the package the remote-code files
are relative symlinks to the package's own modules (one copy of the code; a wheel stores them as
files), elsewhere plain copies: either way the directory is a complete Hub repository. With
`--backbone_output_dir`, the backbone COMI was built from (`WORK/backbone`) goes there too, a
plain causal LM with its tokenizer, pretraining log and card.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "comi_hf"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
CODE_FILES = (
    "compressor_comi.py",
    "configuration_comi.py",
    "modeling_comi.py",
    "mig.py",
    "packing.py",
    "pipeline_comi.py",
)
BACKBONE_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def gather_results(work_dir: Path, wall_minutes: int | None) -> dict:
    evaluations = []
    for path in sorted((work_dir / "eval").glob("words-*-merge-*/eval_metrics.json")):
        words = int(path.parent.name.split("-")[1])
        metrics = json.loads(path.read_text())
        evaluations.append({"words": words, **metrics})
    evaluations.sort(key=lambda entry: (entry["words"], entry["merge_size"]))
    curve = json.loads((work_dir / "backbone" / "pretraining_log.json").read_text())["curve"]
    return {"wall_minutes": wall_minutes, "test": evaluations, "backbone_curve": curve}


def results_markdown(results: dict) -> str:
    lines = [
        "## Held-out results",
        "",
        "Exact match on the test split of `comi-synth` (documents never seen in training; greedy "
        "decoding with this directory's generation config):",
        "",
        "| document words | merge size | compression | exact match | documents |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in results["test"]:
        lines.append(
            f"| {entry['words']} | {entry['merge_size']} | {entry['compression_ratio']:.1f}x | "
            f"{entry['exact_match']:.3f} | {entry['num_samples']} |"
        )
    last = results["backbone_curve"][-1]
    lines += [
        "",
        f"The backbone's pretraining stopped after {last['step']} steps ({last['minutes']} min) at held-out exact "
        f"match {last['held_out_em']:.3f} on {last['words']}-word documents (the full curve is in `results.json`).",
    ]
    if results["wall_minutes"] is not None:
        lines.append(f"The whole run (`research/train_default_model.sh`) took {results['wall_minutes']} min.")
    return "\n".join(lines) + "\n"


def backbone_card(log: dict) -> str:
    """The model card of the pretrained backbone: what it is and how it was trained."""
    arguments, last = log["arguments"], log["curve"][-1]
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: text-generation",
            "tags:",
            "- comi",
            "- synthetic",
            "---",
            "",
            "# The backbone of comi_hf's default model",
            "",
            "A plain `LlamaForCausalLM` (4 layers, hidden 64, 4 heads of 16, a 64-word word-level tokenizer without "
            "BOS) pretrained from random weights by `research/default_model/pretrain_backbone.py`, step 2 of "
            "`research/train_default_model.sh`, on `context question answer </s>` texts of `comi-synth`'s train "
            "split; comi_hf's default COMI model was built from it (`from_backbone`, encoder 2 layers, LSA 1) and "
            "fine-tuned. Peers that compress the KV cache run on it (`bench/peers.py`): it reads whole documents, "
            "as COMI's decoder started out.",
            "",
            f"- curriculum: documents of {', '.join(map(str, arguments['curriculum']))} words; "
            f"{arguments['tokens_per_batch']} tokens a batch; learning rate {arguments['learning_rate']}; "
            f"seed {arguments['seed']}",
            f"- stopped after {last['step']} steps ({last['minutes']} min here) at held-out exact match "
            f"{last['held_out_em']:.3f} on {last['words']}-word validation documents (greedy, full context; "
            f"the whole curve is in `pretraining_log.json`)",
            "",
        ]
    )


def ship_backbone(backbone_dir: Path, output: Path) -> None:
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    for name in BACKBONE_FILES:
        shutil.copyfile(backbone_dir / name, output / name)
    log = json.loads((backbone_dir / "pretraining_log.json").read_text())
    (output / "pretraining_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (output / "README.md").write_text(backbone_card(log))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, type=Path)
    parser.add_argument("--work_dir", required=True, type=Path)
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--backbone_output_dir", type=Path, help="Also ship WORK/backbone here, with its card.")
    parser.add_argument("--wall_minutes", type=int, default=None)
    args = parser.parse_args(argv)

    output = args.output_dir.resolve()
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copyfile(args.model_dir / name, output / name)
    for name in CODE_FILES:
        if output.parent == PACKAGE:
            (output / name).symlink_to(Path("..") / name)
        else:
            shutil.copyfile(args.model_dir / name, output / name)

    results = gather_results(args.work_dir, args.wall_minutes)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    card = (args.model_dir / "README.md").read_text()
    (output / "README.md").write_text(card.rstrip("\n") + "\n\n" + results_markdown(results))
    print(f"shipped {args.model_dir} to {output}")
    if args.backbone_output_dir is not None:
        ship_backbone(args.work_dir / "backbone", args.backbone_output_dir.resolve())
        print(f"shipped {args.work_dir / 'backbone'} to {args.backbone_output_dir}")


if __name__ == "__main__":
    main()
