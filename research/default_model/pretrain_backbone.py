"""Pretrain the tiny word-level backbone LM of comi_hf's default model on the synthetic corpus.

    python research/default_model/pretrain_backbone.py --output_dir backbone --max_minutes 15

Plain causal-LM training on `context question answer </s>` texts from `comi_hf.synthetic`
(the paper's first step: a backbone that already reads), with two additions that make a 4-layer,
d = 64 model learn the lookup at all (without them it stays at the "guess a code of the
document" level for thousands of steps):

* a larger weight initialisation (std 0.1 instead of 0.02);
* two training-only auxiliary attention losses built from positions the generator knows: one
  layer-0 head attends from each code digit to its own entity's two words, and from the
  question's "?" and the answer digits to the question's entity (binding); one last-layer head
  attends from each answer slot to the matching digit of the target code (retrieval);
* the answer tokens' mean loss added to the LM loss (a few tokens in hundreds, their signal
  would otherwise shrink as documents grow). They shape attention during training only; the saved model is a plain
  `LlamaForCausalLM`, and evaluation is plain greedy exact match on held-out documents.

A length curriculum (32 → 64 → 128 → 256 words by default) moves to the next length when
held-out exact match reaches `--advance_at`. Writes the model, its tokenizer and
`pretraining_log.json` (the learning curve) to `--output_dir`.

A custom loop rather than `Trainer`: the batches are generated on the fly at the current
curriculum length and the losses need the generator's positions, neither of which fits
`Trainer`'s fixed dataset without more code than this loop.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM

from comi_hf.data import word_level_tokenizer
from comi_hf.loading import parse_script_arguments
from comi_hf.synthetic import QUESTION, SPLIT_SEEDS, FactSpan, SyntheticDocument, make_document, vocabulary

LOSS_NAMES = ("lm_loss", "answer_loss", "binding_loss", "retrieval_loss")


def build_model(vocab_size: int, max_positions: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        # With head_dim 16 and the usual base 10,000, only two of the eight rotary pairs turn
        # slowly enough over the ~530 memory positions of a 2,048-word document at merge 4 to
        # match an entity by content wherever its fact stands; base 10^6 leaves four.
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        initializer_range=0.1,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        # The auxiliary losses read attention probabilities, which only eager attention returns.
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def encode(tokenizer, document: SyntheticDocument) -> tuple[list[int], list[int]]:
    """Prompt ids (context + question) and answer ids + EOS."""
    context = tokenizer(document.context, add_special_tokens=False)["input_ids"]
    question = tokenizer(document.question, add_special_tokens=False)["input_ids"]
    answer = tokenizer(document.answer, add_special_tokens=False)["input_ids"]
    return context + question, answer + [tokenizer.eos_token_id]


def make_batch(tokenizer, documents: list[SyntheticDocument]) -> dict[str, torch.Tensor]:
    """Right-padded LM batch plus the positions the auxiliary losses supervise.

    `binding` rows are (sample, code digit position, entity first word position);
    `retrieval` rows are (sample, answer slot position, target code digit position).
    """
    sequences, binding, retrieval = [], [], []
    for row, document in enumerate(documents):
        prompt, answer = encode(tokenizer, document)
        sequences.append(prompt + answer)
        for fact in document.facts:
            for digit in range(fact.code_words):
                binding.append((row, fact.code_start + digit, fact.entity_start))
            if fact.is_target:
                # The last prompt token predicts digit 0, answer digit k predicts digit k + 1.
                for digit in range(fact.code_words):
                    retrieval.append((row, len(prompt) - 1 + digit, fact.code_start + digit))
        # The answer is the code of the question's entity: its slot ("?") and digits bind to it too.
        template = QUESTION.split()  # "{entity}" stands for FactSpan.entity_words words
        question_start = len(prompt) - (len(template) + FactSpan.entity_words - 1)
        question_entity = question_start + template.index("{entity}")
        for slot in range(len(answer)):
            binding.append((row, len(prompt) - 1 + slot, question_entity))
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, -100),
        "binding": torch.tensor(binding),
        "retrieval": torch.tensor(retrieval),
    }


def attention_nll(attention: torch.Tensor, rows: torch.Tensor, queries: torch.Tensor, keys: list[torch.Tensor]):
    """Mean over `keys` of -log the probability head 0 puts on that key position, for each query.

    Each key counts on its own (not their total mass), so the optimum spreads attention evenly:
    a binding head must carry both words of an entity, not only the noun that similar entities share.
    """
    probabilities = attention[rows, 0, queries]  # (targets, key length)
    nll = [-torch.log(probabilities.gather(1, key[:, None]).squeeze(1).clamp_min(1e-6)) for key in keys]
    return torch.stack(nll).mean()


def training_loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor], aux_weight: float, answer_weight: float):
    """The LM loss (+ `answer_weight` x the mean loss of the answer tokens) + the auxiliary losses.

    Returns the total and, detached for logging, the LM loss, the answer loss, the binding loss
    and the retrieval loss.
    """
    output = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        output_attentions=aux_weight > 0,
    )
    # Answer tokens are a few in hundreds: without their own term the lookup's signal shrinks
    # as documents grow. Logit at slot s predicts the token at s + 1.
    rows, slots, _ = batch["retrieval"].unbind(1)
    answer_logits = output.logits[rows, slots]
    answer = F.cross_entropy(answer_logits.float(), batch["input_ids"][rows, slots + 1])
    total = output.loss + answer_weight * answer
    if aux_weight == 0:
        zero = torch.zeros(())
        return total, output.loss.detach(), answer.detach(), zero, zero
    rows, codes, entities = batch["binding"].unbind(1)
    binding = attention_nll(output.attentions[0], rows, codes, [entities, entities + 1])
    rows, slots, digits = batch["retrieval"].unbind(1)
    retrieval = attention_nll(output.attentions[-1], rows, slots, [digits])
    total = total + aux_weight * (binding + retrieval)
    return total, output.loss.detach(), answer.detach(), binding.detach(), retrieval.detach()


@torch.no_grad()
def exact_match(model, tokenizer, documents: list[SyntheticDocument], batch_size: int = 64) -> float:
    """Greedy held-out exact match (left-padded prompts, 5 new tokens: 4 digits and EOS)."""
    model.eval()
    correct = 0
    for start in range(0, len(documents), batch_size):
        chunk = documents[start : start + batch_size]
        prompts = [encode(tokenizer, document)[0] for document in chunk]
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )[:, width:]
        for document, tokens in zip(chunk, generated, strict=True):
            correct += tokenizer.decode(tokens, skip_special_tokens=True).strip() == document.answer
    model.train()
    return correct / len(documents)


@dataclass
class PretrainingArguments:
    output_dir: str = field(metadata={"help": "Where the model, its tokenizer and pretraining_log.json go."})
    curriculum: list[int] = field(default_factory=lambda: [32, 64, 128, 256], metadata={"help": "Document lengths."})
    advance_at: float = field(default=0.9, metadata={"help": "Held-out EM that moves to the next length."})
    stop_at: float = field(default=0.98, metadata={"help": "Held-out EM at the last length that stops."})
    tokens_per_batch: int = field(default=4096, metadata={"help": "Batch size = this / (document length + 16)."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW's learning rate."})
    aux_weight: float = field(default=1.0, metadata={"help": "Weight of the auxiliary attention losses."})
    answer_weight: float = field(default=1.0, metadata={"help": "Weight of the answer tokens' own loss."})
    eval_every: int = field(default=100, metadata={"help": "Steps between held-out evaluations."})
    eval_docs: int = field(default=128, metadata={"help": "Held-out documents per evaluation."})
    max_steps: int = field(default=20000, metadata={"help": "Stop (and save) after this many steps."})
    max_minutes: float = field(default=20.0, metadata={"help": "Stop (and save) after this wall time."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (none: torch's choice)."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights and of the training documents."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(PretrainingArguments, description=__doc__.split("\n\n")[0])
    (args,) = parse_script_arguments(parser, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tokenizer = word_level_tokenizer(vocabulary())  # one token per word of the generator
    model = build_model(len(tokenizer), max_positions=max(4096, 2 * max(args.curriculum)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    warmup = 100
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    model.train()

    stage, next_seed, log = 0, SPLIT_SEEDS["train"] + args.seed * 10_000_000, []
    held_out = {}
    started = time.monotonic()
    sums = torch.zeros(4)
    for step in range(1, args.max_steps + 1):
        words = args.curriculum[stage]
        batch_docs = max(1, args.tokens_per_batch // (words + 16))
        documents = [make_document(next_seed + i, words) for i in range(batch_docs)]
        next_seed += batch_docs
        loss, *parts = training_loss(model, make_batch(tokenizer, documents), args.aux_weight, args.answer_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        sums += torch.stack(parts)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"the loss is {loss.item()} at step {step}")

        minutes = (time.monotonic() - started) / 60
        if step % args.eval_every == 0 or minutes >= args.max_minutes:
            if words not in held_out:
                held_out[words] = [make_document(SPLIT_SEEDS["validation"] + i, words) for i in range(args.eval_docs)]
            em = exact_match(model, tokenizer, held_out[words])
            count = step % args.eval_every or args.eval_every
            entry = {
                "step": step,
                "minutes": round(minutes, 2),
                "words": words,
                **{name: round(value / count, 4) for name, value in zip(LOSS_NAMES, sums.tolist(), strict=True)},
                "held_out_em": em,
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
            sums = torch.zeros(4)
            last_stage = stage == len(args.curriculum) - 1
            if last_stage and em >= args.stop_at:
                break
            if not last_stage and em >= args.advance_at:
                stage += 1
            if minutes >= args.max_minutes:
                break

    output_dir = Path(args.output_dir)
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "pretraining_log.json").write_text(json.dumps({"arguments": vars(args), "curve": log}, indent=2))
    print(f"saved the backbone to {output_dir} after {log[-1]['minutes']} min: {log[-1]}")


if __name__ == "__main__":
    main()
