"""Fine-tune COMI with `Trainer` and PEFT (the official recipe by default).

    python examples/train.py --model_name_or_path Qwen/Qwen3-4B-Instruct-2507 \
        --train_file train.jsonl --validation_file dev.jsonl --output_dir comi-qwen3-4b \
        --merge_sizes 16 32 --bf16 --gradient_checkpointing --learning_rate 1e-5 --warmup_steps 0.1

`--model_name_or_path` is a plain decoder-only backbone (COMI is built from it with
`from_backbone`) or an existing COMI checkpoint. Data is JSONL in the official format. The
output directory holds a COMI model (LoRA merged unless `--keep_adapter`), its tokenizer and a
model card; it loads with `AutoModel.from_pretrained(dir, trust_remote_code=True)` and with
`pipeline(model=dir, trust_remote_code=True)`. Run it under `accelerate launch` to scale out.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, Trainer, TrainerState, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from comi_hf import COMIConfig, COMIForConditionalGeneration
from comi_hf.data import COMIDataCollator, load_comi_jsonl, tokenize_example
from comi_hf.evaluation import answer_dataset, summarize, write_metrics
from comi_hf.loading import parse_script_arguments
from comi_hf.model_card import write_model_card
from comi_hf.training import (
    DEFAULT_LORA_TARGETS,
    finalize_trained_model,
    prepare_for_training,
    weights_without_gradient,
)

logger = logging.getLogger("comi_hf.train")

Mode = Literal["full", "lora", "freeze"]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A decoder-only backbone or a COMI checkpoint."})
    encoder_layers: int | None = field(default=None, metadata={"help": "Backbone layers in the encoder (8)."})
    num_mem_fusion_layers: int | None = field(default=None, metadata={"help": "LSA layers (1; 0 = Linear)."})
    merge_size: int | None = field(default=None, metadata={"help": "Default merge size (16)."})
    merge_sizes: list[int] | None = field(default=None, metadata={"help": "Merge sizes sampled per batch."})
    segment_size: int | None = field(default=None, metadata={"help": "Segment length for long contexts."})
    coarse_grained: bool | None = field(default=None, metadata={"help": "Coarse stage on/off."})
    fine_grained: bool | None = field(default=None, metadata={"help": "Fine stage on/off."})
    coarse_redundancy: bool | None = field(default=None, metadata={"help": "Coarse redundancy on/off."})
    fine_redundancy: bool | None = field(default=None, metadata={"help": "Fine redundancy on/off."})
    alpha_select: float | None = field(default=None)
    beta_select: float | None = field(default=None)
    alpha_merge: float | None = field(default=None)
    beta_merge: float | None = field(default=None)
    learnable_merge_weights: bool | None = field(default=None, metadata={"help": "Learn alpha/beta_merge."})
    train_encoder: Mode = field(default="full", metadata={"help": "full, lora or freeze."})
    train_lsa: Mode = field(default="full", metadata={"help": "full, lora or freeze."})
    train_decoder: Mode = field(default="lora", metadata={"help": "full, lora or freeze."})
    lora_r: int = field(default=128)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    keep_adapter: bool = field(
        default=False, metadata={"help": "Also save the unmerged LoRA adapter (peft format) in output_dir/adapter."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, flash_attention_2."})
    model_card_notes: str | None = field(default=None, metadata={"help": "Extra text for the model card."})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "Training JSONL (input, prompt, answer)."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation JSONL: loss and EM/F1."})
    max_context_tokens: int | None = field(
        default=None, metadata={"help": "Keep at most this many context tokens (first and last halves)."}
    )


@dataclass
class COMITrainingArguments(TrainingArguments):
    # The collator needs every column it built. (`report_to` already defaults to "none".)
    remove_unused_columns: bool = field(default=False)

    def __post_init__(self):
        super().__post_init__()
        # Pinned memory only speeds up copies to an accelerator; without one torch warns that
        # it does nothing.
        if self.use_cpu or not torch.accelerator.is_available():
            self.dataloader_pin_memory = False


# The model arguments that are COMIConfig fields (the dataclass above names them as the config does).
COMI_FIELDS = tuple(name for name in ModelArguments.__dataclass_fields__ if name in COMIConfig.__dataclass_fields__)
# Fields that change the architecture: an existing COMI checkpoint keeps its own.
ARCHITECTURE_FIELDS = ("encoder_layers", "num_mem_fusion_layers", "learnable_merge_weights")


def load_model(model_args: ModelArguments, dtype: torch.dtype | None) -> tuple[COMIForConditionalGeneration, str]:
    """The COMI model to train and the name of its backbone."""
    overrides = {name: getattr(model_args, name) for name in COMI_FIELDS if getattr(model_args, name) is not None}
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    if config.model_type != COMIConfig.model_type:
        model = COMIForConditionalGeneration.from_backbone(
            model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation, **overrides
        )
        return model, model_args.model_name_or_path
    changed = [name for name in ARCHITECTURE_FIELDS if name in overrides and overrides[name] != getattr(config, name)]
    if changed:
        raise SystemExit(f"error: {model_args.model_name_or_path} is a COMI checkpoint; it keeps its own {changed}.")
    model = COMIForConditionalGeneration.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation
    )
    for name, value in overrides.items():
        setattr(model.config, name, value)
    model.config.validate()
    base = getattr(model.config.text_config, "_name_or_path", "") or model_args.model_name_or_path
    return model, base


def reload_saved_model(directory: Path, model_args: ModelArguments, dtype: torch.dtype | None):
    """The trained model as `Trainer.save_model` wrote it after sharded training (ZeRO-3, FSDP), in this process.

    With LoRA that is a peft adapter (the LoRA weights and the fully trained parts as
    `modules_to_save`): it goes back onto the COMI model built from the backbone as before training.
    """
    # The ZeRO-3 config stays registered with transformers after training: without unregistering it,
    # `from_pretrained` would partition the rebuilt model again (and `generate` would sync processes).
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        model, _ = load_model(model_args, dtype)
        return PeftModel.from_pretrained(model, directory)
    if (directory / "config.json").is_file():
        return COMIForConditionalGeneration.from_pretrained(directory, dtype=dtype)
    fail(
        f"sharded training saved no full model in {directory}: keep `zero3_save_16bit_model: true` "
        "(DeepSpeed) or `fsdp_state_dict_type: FULL_STATE_DICT` (FSDP) in the accelerate config"
    )


def fail(message: str) -> None:
    """End the run with one line naming the problem (every process prints it)."""
    print(f"train.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or `True` for the latest in `output_dir`
    (as transformers' own example scripts read it)."""
    if resume_from_checkpoint is None or resume_from_checkpoint.lower() == "false":
        return None
    if resume_from_checkpoint.lower() == "true":
        latest = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if latest is None:
            fail(f"--resume_from_checkpoint True: no checkpoint-* folder in {output_dir}")
        return latest
    if not Path(resume_from_checkpoint).is_dir():
        fail(f"--resume_from_checkpoint: no such checkpoint folder {resume_from_checkpoint}")
    return resume_from_checkpoint


def load_data(data_args: DataArguments) -> tuple:
    """The raw train and validation sets, validated before any model is loaded."""
    if data_args.max_context_tokens is not None and data_args.max_context_tokens < 1:
        fail(f"--max_context_tokens must be at least 1, got {data_args.max_context_tokens}")
    try:
        train_raw = load_comi_jsonl(data_args.train_file)
        eval_raw = load_comi_jsonl(data_args.validation_file) if data_args.validation_file else None
    except (OSError, ValueError) as error:
        fail(str(error))
    return train_raw, eval_raw


def tokenized(dataset, tokenizer, max_context_tokens: int | None, name: str):
    return dataset.map(
        tokenize_example,
        fn_kwargs={"tokenizer": tokenizer, "max_context_tokens": max_context_tokens},
        remove_columns=dataset.column_names,
        desc=f"Tokenising {name}",
    )


def train(trainer: Trainer, checkpoint: str | None, max_steps: int) -> TrainOutput:
    """`trainer.train`, except from a checkpoint that already holds every step: its weights are
    loaded and nothing runs (transformers would run one step past `max_steps`)."""
    if checkpoint is not None and max_steps > 0:
        state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
        if state.global_step >= max_steps:
            logger.info("%s already ran all %d steps: loading it, nothing left to train", checkpoint, max_steps)
            trainer._load_from_checkpoint(checkpoint)
            trainer.state = state
            return TrainOutput(state.global_step, float("nan"), {})
    return trainer.train(resume_from_checkpoint=checkpoint)


def mean_logged_loss(log_history: list[dict]) -> float | None:
    """The training loss averaged over every step of the run, resumed runs included.

    `Trainer.train` reports the mean over the steps of its own call only; the log history comes
    back with a resumed checkpoint, and each entry averages the steps since the previous one.
    """
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return total / steps if steps else None


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, COMITrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(sys.argv[1])
    else:
        model_args, data_args, training_args = parse_script_arguments(parser, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        # Without an accelerator (and without --use_cpu) accelerate finds no backend and each process
        # would train alone (and all write output_dir); DeepSpeed stops later on a batch size mismatch.
        fail(
            f"launched {launched} processes but training would use 1: no GPU was found; add --use_cpu to train on CPUs"
        )
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    train_raw, eval_raw = load_data(data_args)
    set_seed(training_args.seed)

    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    model, base_model = load_model(model_args, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    train_dataset = tokenized(train_raw, tokenizer, data_args.max_context_tokens, Path(data_args.train_file).name)
    eval_dataset = None
    if eval_raw is not None:
        eval_dataset = tokenized(
            eval_raw, tokenizer, data_args.max_context_tokens, Path(data_args.validation_file).name
        )
    if training_args.ddp_find_unused_parameters is None:
        # Every trained parameter gets a gradient at every step, unless the MIG switches leave a
        # learnable weight unused: only then does DDP need to look for unused parameters.
        training_args.ddp_find_unused_parameters = bool(weights_without_gradient(model.config))

    trainable = prepare_for_training(
        model,
        encoder=model_args.train_encoder,
        lsa=model_args.train_lsa,
        decoder=model_args.train_decoder,
        lora_r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        lora_target_modules=model_args.lora_target_modules,
    )
    # `ds_numel`: under DeepSpeed ZeRO-3 each process holds an empty shard of a frozen weight.
    counts = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in trainable.parameters()]
    logger.info("trainable parameters: %d of %d", sum(n for n, grad in counts if grad), sum(n for n, _ in counts))
    trainer = Trainer(
        model=trainable,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=COMIDataCollator(),
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        # accelerate/state.py turns FSDP on only for GPU-like devices, never for MULTI_CPU.
        logger.warning("the accelerate config asks for FSDP, which accelerate does not run on CPUs: training with DDP")
    result = train(trainer, checkpoint, training_args.max_steps)
    log_history = trainer.state.log_history
    trainer.accelerator.wait_for_everyone()
    deepspeed_plugin = trainer.accelerator.state.deepspeed_plugin
    sharded = trainer.is_fsdp_enabled or (deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3)
    output_dir = Path(training_args.output_dir)
    if sharded:
        # Sharded parameters: `save_model` gathers them (every process takes part) and the main
        # process writes them, the adapter alone with LoRA; the main process reloads them below.
        trainer.save_model(str(output_dir / "adapter"))
    is_main_process = trainer.is_world_process_zero()
    # Unwrapped only where it is saved: under FSDP the wrapped modules hold the process group.
    trained = None if sharded or not is_main_process else trainer.accelerator.unwrap_model(trainer.model)
    state = trainer.accelerator.state
    # The collectives are over: every process leaves the process group now. One that exits with
    # the group alive can abort or hang in its teardown (gloo's threads still release the last
    # collective's tensors), and the trainer's DDP wrapper keeps the group alive: drop it first.
    del trainer
    gc.collect()
    state.destroy_process_group()
    if not is_main_process:
        return
    if sharded:
        # The whole model in this one process now (CPU memory), to merge the LoRA.
        trained = reload_saved_model(output_dir / "adapter", model_args, dtype)
        if not model_args.keep_adapter:
            shutil.rmtree(output_dir / "adapter")
    elif model_args.keep_adapter and hasattr(trained, "peft_config"):
        trained.save_pretrained(output_dir / "adapter")
    final = finalize_trained_model(trained).eval()
    final.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)

    evaluation = None
    if eval_raw is not None:
        records = answer_dataset(
            final,
            tokenizer,
            eval_raw,
            batch_size=training_args.per_device_eval_batch_size,
            max_context_tokens=data_args.max_context_tokens,
        )
        evaluation = summarize(records, final.config.merge_size)
        write_metrics(output_dir / "eval_metrics.json", evaluation)
        logger.info("validation: %s", evaluation)
    summary = {
        "processes": training_args.world_size,
        "effective batch size": training_args.per_device_train_batch_size
        * training_args.world_size
        * training_args.gradient_accumulation_steps,
        "steps": result.global_step,
        "mean training loss": _format_loss(mean_logged_loss(log_history)),
        "learning rate": training_args.learning_rate,
        "parts trained": f"encoder {model_args.train_encoder}, LSA {model_args.train_lsa}, "
        f"decoder {model_args.train_decoder}"
        + (f" (LoRA r {model_args.lora_r}, alpha {model_args.lora_alpha} on {model_args.lora_target_modules})"),
    }
    write_model_card(
        output_dir,
        base_model=base_model,
        merge_size=final.config.merge_size,
        merge_sizes=final.config.merge_sizes,
        training_data=[Path(data_args.train_file).name],
        training_summary=summary,
        evaluation=evaluation,
        evaluation_data=Path(data_args.validation_file).name if data_args.validation_file else None,
        notes=model_args.model_card_notes,
    )
    logger.info("saved the COMI model to %s", output_dir)


def _format_loss(loss: float | None) -> str:
    return "not logged" if loss is None else f"{loss:.4f}"


if __name__ == "__main__":
    main()
