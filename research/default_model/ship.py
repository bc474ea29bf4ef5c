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

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser
from transformers.dynamic_module_utils import get_relative_import_files

from comi_hf.loading import parse_script_arguments

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "comi_hf"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# The remote code a saved model carries: the model file and what it imports, as transformers finds them.
CODE_FILES = tuple(
    sorted({"modeling_comi.py"} | {Path(path).name for path in get_relative_import_files(PACKAGE / "modeling_comi.py")})
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


def results_table(evaluations: list[dict]) -> list[str]:
    """Exact match per document length (rows) and merge size (columns), with the compression and
    the number of documents of each cell."""
    merges = sorted({entry["merge_size"] for entry in evaluations})
    cells = {(entry["words"], entry["merge_size"]): entry for entry in evaluations}
    lines = [
        "| document words | " + " | ".join(f"merge {merge}" for merge in merges) + " | documents |",
        "| --- | " + " | ".join("---" for _ in merges) + " | --- |",
    ]
    for words in sorted({entry["words"] for entry in evaluations}):
        row = [cells.get((words, merge)) for merge in merges]
        counts = sorted({entry["num_samples"] for entry in row if entry})
        lines.append(
            f"| {words:,} | "
            + " | ".join(
                f"{entry['exact_match']:.3f} ({entry['compression_ratio']:.1f}x)" if entry else "" for entry in row
            )
            + f" | {', '.join(f'{count:,}' for count in counts)} |"
        )
    return lines


def results_markdown(results: dict) -> str:
    lines = [
        "## Held-out results",
        "",
        "Exact match on the test split of `comi-synth` (documents never seen in training; greedy "
        "decoding with this directory's generation config), and the average compression:",
        "",
        *results_table(results["test"]),
    ]
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
            "A plain `LlamaForCausalLM` (4 layers, hidden 64, 4 heads of 16, rotary base 10^6, a 64-word word-level "
            "tokenizer without BOS that lower-cases the text and splits punctuation off words) pretrained from random "
            "weights by `research/default_model/pretrain_backbone.py`, step 2 of "
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


@dataclass
class ShipArguments:
    model_dir: Path = field(metadata={"help": "The trained COMI model (WORK/comi)."})
    work_dir: Path = field(metadata={"help": "The recipe's work directory (WORK: eval/, backbone/)."})
    output_dir: Path = field(metadata={"help": "Where the model goes (replaced where it exists)."})
    backbone_output_dir: Path | None = field(
        default=None, metadata={"help": "Also ship WORK/backbone here, with its card."}
    )
    wall_minutes: int | None = field(default=None, metadata={"help": "The recipe's wall time (minutes), for the card."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(ShipArguments, description=__doc__.split("\n\n")[0])
    (args,) = parse_script_arguments(parser, argv)

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
