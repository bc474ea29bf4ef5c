"""Fine-tune COMI from the pretrained tiny backbone: the second step of the default model.

    python research/default_model/finetune_comi.py --backbone WORK/backbone --output_dir WORK/comi

COMI is built with `from_backbone` (encoder = the backbone's first 2 layers, LSA = 1 layer, full
decoder) and trained with `Trainer` on `comi_hf.synthetic` documents: the answer's cross-entropy
(docs/method.md), with a merge size drawn per batch from `--merge_sizes`, everything trained fully.

One addition, for training only: the decoder's last-layer head 0 is supervised to attend from
each answer slot to the memory vector that holds the matching digit of the target code (known
from the generator's positions and the compression's own token → memory map). The backbone was
pretrained on token embeddings and the memory vectors are encoder states: without this loss
nothing tells the decoder where to look (research/default_model/LOG.md has the runs). The saved
model is a plain COMI model; evaluation is greedy exact match.

`--stop_at EM` ends the last stage once validation exact match reaches EM at every merge size
(or at `--stop_merge_sizes`; checked every `--eval_every` steps), so a round lasts as long as
the run needs.

Data-parallel under `torchrun --nproc_per_node N` (or `accelerate launch`): each process takes
1/N of every batch and of every validation, so the steps and the data seen are those of one
process. The model is too small for two threads to share its operations well, so on a CPU N
processes of one thread each train faster than one process of N threads.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from comi_hf import COMIForConditionalGeneration
from comi_hf.compressor_comi import COMIMIGCompressor
from comi_hf.configuration_comi import draw_merge_size
from comi_hf.data import COMIDataCollator, tokenize_example
from comi_hf.evaluation import answer_dataset, summarize
from comi_hf.loading import parse_script_arguments
from comi_hf.model_card import write_model_card
from comi_hf.synthetic import SPLIT_SEEDS, FactSpan, make_document
from comi_hf.training import weights_without_gradient

logger = logging.getLogger("comi_hf.default_model")
NOTES = Path(__file__).resolve().parent / "model_card_notes.md"


class SyntheticDocuments(torch.utils.data.Dataset):
    """Training documents of the generator, tokenised when read, plus where the target code starts
    in the context (words = tokens).

    Item `i` is the split's document `first_index + i`, of `words[(first_index + i) % len(words)]`
    words, so a stage can mix lengths. Made when read rather than up front: under data
    parallelism each process reads only its share, and training starts at once instead of after
    every document of the stage is built (the recipe's round: 112,000 documents, 44 s here).
    The same documents in the same order as building them up front: the weights come out
    byte-identical."""

    def __init__(self, tokenizer, split: str, num_docs: int, words: list[int], first_index: int = 0):
        self.tokenizer = tokenizer
        self.seed = SPLIT_SEEDS[split]
        self.first_index = first_index
        self.num_docs = num_docs
        self.words = words

    def __len__(self) -> int:
        return self.num_docs

    def __getitem__(self, position: int) -> dict:
        if not 0 <= position < self.num_docs:
            raise IndexError(f"document {position} of {self.num_docs}")
        index = self.first_index + position
        document = make_document(self.seed + index, self.words[index % len(self.words)])
        example = {"context": document.context, "question": document.question, "answers": [document.answer]}
        target = next(fact for fact in document.facts if fact.is_target)
        return {**tokenize_example(example, self.tokenizer), "target_code_start": target.code_start}


class TargetCollator(COMIDataCollator):
    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__([{k: v for k, v in f.items() if k != "target_code_start"} for f in features])
        batch["target_code_start"] = torch.tensor([feature["target_code_start"] for feature in features])
        return batch


class HeadLogAttention:
    """Records the log attention probabilities of head 0 of a Llama attention layer, in the graph.

    Recomputed from the layer's own inputs rather than read from `output_attentions`: the trained
    head is so sharp that the probabilities of the positions it must learn to look at underflow
    to 0 in float32, and a loss on them would have no gradient; log-softmax of the scores does.
    It also lets the model run sdpa attention (1.2x faster steps here than eager, which alone
    returns probabilities).
    """

    def __init__(self, attention_layer):
        self.layer = attention_layer
        self.log_probabilities = None
        attention_layer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        mask = kwargs.get("attention_mask")
        shape = (*hidden_states.shape[:-1], -1, module.head_dim)
        query = module.q_proj(hidden_states).view(shape).transpose(1, 2)[:, :1]
        key = module.k_proj(hidden_states).view(shape).transpose(1, 2)[:, :1]
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        scores = ((query @ key.transpose(2, 3)) * module.scaling).float()
        if mask is None:  # sdpa without padding: causal attention is implied
            length = scores.shape[-1]
            mask = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril()
        mask = mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:  # sdpa's mask, True where attention is allowed
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:  # eager attention's additive mask, (batch, 1, length, length)
            scores = scores + mask
        self.log_probabilities = scores.log_softmax(-1)[:, 0]


class LossWithMemoryAttention(nn.Module):
    """The training forward: the answer's loss plus the supervision of the decoder's last-layer head 0.

    `Trainer` trains it as any model that returns its loss; the COMI model inside stays a plain
    COMI model, saved on its own. The context is compressed once per step, with the token →
    memory map that the auxiliary loss needs (`forward(memory=...)` takes the result).
    """

    def __init__(self, model: COMIForConditionalGeneration, merge_sizes: list[int], aux_weight: float):
        super().__init__()
        self.model = model
        self.merge_sizes = merge_sizes
        self.aux_weight = aux_weight
        self.retrieval_head = HeadLogAttention(model.decoder.model.layers[-1].self_attn)

    def forward(self, input_ids, attention_mask, query_ids, query_attention_mask, labels, target_code_start):
        # One merge size for the batch, from this stage's sizes (the model's own are the saved model's).
        merge_size = draw_merge_size(self.merge_sizes)
        # Compressed once, with the token → memory map the auxiliary loss needs.
        memory, memory_mask, details = self.model.compress(
            input_ids, attention_mask, query_ids, query_attention_mask, merge_size, return_details=True
        )
        loss = self.model(
            query_ids=query_ids, query_attention_mask=query_attention_mask, labels=labels, memory=(memory, memory_mask)
        ).loss
        if self.aux_weight > 0:
            rows = torch.arange(target_code_start.shape[0], device=target_code_start.device)
            # Decoder rows are [memory ; query ; answer] packed without gaps: the last query token
            # predicts digit 0, answer digit k predicts digit k + 1.
            last_query = memory_mask.sum(1) + query_attention_mask.sum(1) - 1
            log_attention = self.retrieval_head.log_probabilities  # (batch, length, length)
            nll = []
            for digit in range(FactSpan.code_words):
                target = details.token_memory[rows, target_code_start + digit]
                nll.append(-log_attention[rows, last_query + digit, target])
            loss = loss + self.aux_weight * torch.stack(nll).mean()
        return {"loss": loss}


def validation_dataset(words: int, num_docs: int) -> Dataset:
    """The first `num_docs` documents of the validation split, of `words` words."""
    documents = (make_document(SPLIT_SEEDS["validation"] + i, words) for i in range(num_docs))
    return Dataset.from_list(
        [
            {"id": i, "context": d.context, "question": d.question, "answers": [d.answer]}
            for i, d in enumerate(documents)
        ]
    )


def validate(model, tokenizer, validation: Dataset, merge_sizes: list[int]) -> list[dict]:
    """Greedy exact match on `validation` at each merge size (the model is left in eval mode).

    Each process answers a share of the documents and every process gets the scores of all, so
    that decisions taken on them (the early stop) are the same in every process."""
    model.eval()
    state = PartialState()
    scores = []
    for size in sorted(set(merge_sizes)):
        with state.split_between_processes(list(range(len(validation)))) as share:
            records = answer_dataset(
                model, tokenizer, validation.select(share), batch_size=64, merge_size=size, progress=False
            )
        if state.num_processes > 1:
            records = gather_object(records)
        scores.append(summarize(records, size))
    return scores


class StopAtExactMatch(TrainerCallback):
    """Validates every `every` steps and ends training once every merge size reaches `target`.

    A round of the recipe then lasts as long as this run needs: runs of one schedule differ by
    thousands of steps in when they reach the target (LOG.md), so a fixed length either wastes
    steps or stops short.
    """

    def __init__(
        self,
        model,
        tokenizer,
        validation: Dataset,
        merge_sizes: list[int],
        every: int,
        target: float,
        stop_merge_sizes: list[int] | None = None,
    ):
        self.model, self.tokenizer, self.validation = model, tokenizer, validation
        self.merge_sizes, self.every, self.target = merge_sizes, every, target
        # Every merge size is validated (and reported); only these decide the stop.
        self.stop_merge_sizes = sorted(set(stop_merge_sizes or merge_sizes))
        self.history: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        scores = validate(self.model, self.tokenizer, self.validation, self.merge_sizes)
        self.model.train()
        self.history.append(
            {"step": state.global_step, **{f"merge_{s['merge_size']}": s["exact_match"] for s in scores}}
        )
        logger.info("step %d, validation exact match: %s", state.global_step, self.history[-1])
        if min(s["exact_match"] for s in scores if s["merge_size"] in self.stop_merge_sizes) >= self.target:
            control.should_training_stop = True


def _stop_summary(stop: StopAtExactMatch) -> str:
    checks = "; ".join(
        "step {}: {}".format(
            entry["step"], ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in entry.items() if k != "step")
        )
        for entry in stop.history
    )
    sizes = (
        "every merge size"
        if stop.stop_merge_sizes == sorted(set(stop.merge_sizes))
        else "merge " + " and ".join(map(str, stop.stop_merge_sizes))
    )
    return f"{checks or 'no check'} (training stops at {stop.target} at {sizes})"


def leave_data_parallel_run() -> None:
    """Ends a process of a data-parallel run once its work is done, without interpreter finalisation.

    Even after `destroy_process_group`, a process that finalises while gloo's worker threads are
    alive now and then aborts (SIGABRT, "terminate called without an active exception"; the
    race is pytorch/pytorch#179291's). Here that struck one process of two in 3 of about 40
    two-process runs, under load, after every file was written, and failed the run: the process
    flushes what it logged and leaves."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class StageLengths(list):
    """'256' or '256,1024' on the command line: the document lengths of one curriculum stage."""

    def __init__(self, text: str):
        super().__init__(int(words) for words in text.split(","))


@dataclass
class FinetuningArguments:
    backbone: str = field(metadata={"help": "The pretrained backbone, or a COMI model to train on."})
    output_dir: str = field(metadata={"help": "Where the COMI model, its tokenizer and card go."})
    merge_sizes: list[int] = field(default_factory=lambda: [4, 8, 16], metadata={"help": "Merge sizes after stage 1."})
    merge_size: int = field(default=8, metadata={"help": "The saved model's default merge size."})
    segment_size: int | None = field(
        default=None,
        metadata={
            "help": "Encode and compress contexts in segments of this many tokens (saved in the model's config); "
            "when not given, the backbone's own (a COMI model's) or the config default."
        },
    )
    curriculum: list[StageLengths] = field(
        default_factory=lambda: [[32], [64], [128], [256]],
        metadata={"help": "Document lengths in words, one per stage; '256,1024' mixes lengths in a stage."},
    )
    stage_steps: list[int] = field(default_factory=lambda: [800, 300, 300, 600], metadata={"help": "Steps per length."})
    first_stage_merge_sizes: list[int] = field(
        default_factory=lambda: [1, 2, 4], metadata={"help": "Merge sizes of the first stage."}
    )
    eval_docs: int = field(default=200, metadata={"help": "Validation documents per length of --eval_words."})
    eval_words: list[int] = field(default_factory=lambda: [256], metadata={"help": "Validation document lengths."})
    # Weight 1 lets the attention term drown the answer's loss (measured: answer loss at chance).
    aux_weight: float = field(default=0.1, metadata={"help": "Weight of the auxiliary attention loss."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate of each stage (cosine schedule)."})
    context_tokens_per_batch: int = field(default=2048, metadata={"help": "Batch size = this / document length."})
    learnable_merge_weights: bool = field(
        default=False,
        metadata={"help": "Train the fine stage's alpha/beta, starting from --alpha_merge / --beta_merge."},
    )
    alpha_merge: float | None = field(default=None, metadata={"help": "Fine-stage relevance weight to start from."})
    beta_merge: float | None = field(default=None, metadata={"help": "Fine-stage redundancy weight to start from."})
    stop_at: float | None = field(
        default=None,
        metadata={
            "help": "End the last stage early once validation exact match (first --eval_words) reaches this at every "
            "merge size; checked every --eval_every steps."
        },
    )
    eval_every: int | None = field(
        default=None, metadata={"help": "Steps between the checks of --stop_at (when not given: 500)."}
    )
    stop_merge_sizes: list[int] | None = field(
        default=None,
        metadata={
            "help": "The merge sizes --stop_at waits for (when not given: all of --merge_sizes; the others are still "
            "validated)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed (stage s trains with seed + s)."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(FinetuningArguments, description=__doc__.split("\n\n")[0])
    (args,) = parse_script_arguments(parser, argv)
    if args.stop_at is None and args.eval_every is not None:
        parser.error("--eval_every sets how often --stop_at is checked; give --stop_at too")
    if args.stop_at is not None and not 0 <= args.stop_at <= 1:
        parser.error(f"--stop_at is an exact match between 0 and 1, got {args.stop_at}")
    if args.eval_every is not None and args.eval_every < 1:
        parser.error(f"--eval_every must be a positive number of steps, got {args.eval_every}")
    if args.stop_merge_sizes is not None:
        if args.stop_at is None:
            parser.error("--stop_merge_sizes says which merge sizes --stop_at waits for; give --stop_at too")
        if not set(args.stop_merge_sizes) <= set(args.merge_sizes):
            parser.error(f"--stop_merge_sizes {args.stop_merge_sizes} must be among --merge_sizes {args.merge_sizes}")
    # The process group of `torchrun` / `accelerate launch`, if any (gloo: the recipe trains on
    # the CPU, `use_cpu` below); without a launcher, a single process.
    state = PartialState(cpu=True)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if state.is_main_process else logging.WARNING,
    )
    # Every stage's batch must split evenly over the processes: checked before any training.
    for words in args.curriculum:
        batch_size = max(1, args.context_tokens_per_batch // max(words))
        if batch_size % state.num_processes:
            raise ValueError(
                f"a batch of {batch_size} documents ({args.context_tokens_per_batch} context tokens of "
                f"{max(words)}-word documents) does not split over {state.num_processes} processes; change "
                "--context_tokens_per_batch or the number of processes"
            )
    # The same seeds in every process: they draw the same merge size for each step.
    set_seed(args.seed)
    random.seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    if AutoConfig.from_pretrained(args.backbone).model_type == "comi":
        # Go on training a COMI model of an earlier run (its own merge size and architecture).
        model = COMIForConditionalGeneration.from_pretrained(args.backbone, attn_implementation="sdpa")
    else:
        model = COMIForConditionalGeneration.from_backbone(
            args.backbone,
            encoder_layers=2,
            num_mem_fusion_layers=1,
            merge_size=args.merge_size,
            merge_sizes=args.merge_sizes,
            attn_implementation="sdpa",
        )
    fine_stage = {"alpha_merge": args.alpha_merge, "beta_merge": args.beta_merge}
    fine_stage = {name: value for name, value in fine_stage.items() if value is not None}
    if model.config.learnable_merge_weights:
        if fine_stage:
            raise ValueError(f"{args.backbone} already learns its fine-stage weights; do not set {sorted(fine_stage)}.")
    elif args.learnable_merge_weights or fine_stage:
        # The compressor's only state is these weights: rebuild it from the edited config.
        for name, value in fine_stage.items():
            setattr(model.config, name, value)
        model.config.learnable_merge_weights = args.learnable_merge_weights
        model.compressor = COMIMIGCompressor(model.config)
    if args.segment_size is not None:
        model.config.segment_size = args.segment_size
    config = model.config
    every_parameter_used = not weights_without_gradient(config)
    # Greedy as in the official evaluation, but without its repetition penalty (1.3): half of the
    # codes repeat a digit, and a penalty on repeats would fight the right answer.
    model.generation_config.repetition_penalty = 1.0
    validations = {words: validation_dataset(words, args.eval_docs) for words in args.eval_words}
    # A length curriculum, as for the backbone: on short documents (few memory vectors, merge
    # sizes from 1) the decoder learns to read encoder states at all; longer ones come after.
    steps, losses, stop = 0, [], None
    # One module for every stage (its hook on the decoder would otherwise run once per stage).
    training_model = LossWithMemoryAttention(model, args.first_stage_merge_sizes, args.aux_weight)
    for stage, (words, stage_steps) in enumerate(zip(args.curriculum, args.stage_steps, strict=True)):
        training_model.merge_sizes = args.first_stage_merge_sizes if stage == 0 else args.merge_sizes
        batch_size = max(1, args.context_tokens_per_batch // max(words))
        callbacks = []
        if args.stop_at is not None and stage == len(args.curriculum) - 1:
            validation = validations[args.eval_words[0]]
            stop = StopAtExactMatch(
                model,
                tokenizer,
                validation,
                args.merge_sizes,
                args.eval_every or 500,
                args.stop_at,
                args.stop_merge_sizes,
            )
            callbacks.append(stop)
        train = SyntheticDocuments(tokenizer, "train", stage_steps * batch_size, words, first_index=stage * 10**7)
        trainer = Trainer(
            model=training_model,
            args=TrainingArguments(
                output_dir=args.output_dir,
                per_device_train_batch_size=batch_size // state.num_processes,
                learning_rate=args.learning_rate,
                lr_scheduler_type="cosine",
                warmup_steps=0.05,
                max_steps=stage_steps,
                logging_steps=25,
                save_strategy="no",
                remove_unused_columns=False,
                use_cpu=True,
                # With the recipe's configs every parameter gets a gradient at every step, and
                # DDP can skip its search for unused ones; learnt coarse-stage weights, or
                # fine-stage weights of a model without the fine stage (or its redundancy
                # term), get none.
                ddp_find_unused_parameters=not every_parameter_used,
                seed=args.seed + stage,
            ),
            train_dataset=train,
            data_collator=TargetCollator(),
            callbacks=callbacks,
        )
        result = trainer.train()
        steps += result.global_step
        losses.append(f"{result.training_loss:.4f}")
        logger.info(
            "stage %d: %s-word documents, merge sizes %s, loss %.4f",
            stage,
            words,
            training_model.merge_sizes,
            result.training_loss,
        )

    # The last stage's DDP wrapper keeps the process group alive, which must end before this
    # process exits (below): drop the trainer now that training is over.
    del trainer
    gc.collect()
    model.eval()
    model.set_attn_implementation("sdpa")
    output_dir = Path(args.output_dir)
    if state.is_main_process:  # saved before the validation, which could fail
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    evaluations = []
    for words, validation in validations.items():
        evaluations += validate(model, tokenizer, validation, args.merge_sizes)
        for evaluation in evaluations[-len(set(args.merge_sizes)) :]:
            logger.info("validation on %d-word documents: %s", words, evaluation)
    # The last collective was the validation's gather: every process leaves the process group now
    # (one that exits with it alive can abort or hang in gloo's teardown), and the first one writes
    # the card.
    state.destroy_process_group()
    if not state.is_main_process:
        leave_data_parallel_run()
    # The card shows the highest merge size on the first validation length.
    card_evaluation = evaluations[len(set(args.merge_sizes)) - 1]
    write_model_card(
        output_dir,
        base_model=args.backbone,
        merge_size=model.config.merge_size,
        merge_sizes=args.merge_sizes,
        training_data=[
            "comi-synth train split, documents of {} words (a curriculum)".format(
                " → ".join("+".join(map(str, words)) for words in args.curriculum)
            )
        ],
        training_summary={
            "steps": f"{steps} ({args.stage_steps} per length)",
            "processes": state.num_processes,
            "final training loss per stage": ", ".join(losses),
            "learning rate": args.learning_rate,
            "context tokens per batch": args.context_tokens_per_batch,
            "parts trained": "encoder, LSA and decoder, all fully",
            "auxiliary loss weight": args.aux_weight,
            **({"validation exact match during the last stage": _stop_summary(stop)} if stop else {}),
            "fine-stage weights (alpha, beta)": "{:.3f}, {:.3f}{}".format(
                float(model.compressor.settings()["alpha_merge"]),
                float(model.compressor.settings()["beta_merge"]),
                " (learnt)" if model.config.learnable_merge_weights else "",
            ),
        },
        evaluation=card_evaluation,
        evaluation_data=f"comi-synth validation split, {args.eval_docs} documents of {args.eval_words[0]} words",
        notes=NOTES.read_text(),
        trained_with="research/default_model/finetune_comi.py",
    )
    if state.num_processes > 1:
        leave_data_parallel_run()


if __name__ == "__main__":
    main()
