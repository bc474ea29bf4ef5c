"""How much faster is asking several questions about one context at once than one by one?

`pipe(context=..., questions=[q1, ..., q8])` encodes the context once (the encoder is causal
and the query follows the context, so the context's hidden states and key/value cache are
shared) and runs only the query tokens, the compression and the decoding per question. This
script times it against 8 separate `pipe(context=..., question=q)` calls on the same context,
in one run (warm-up, then the median of several repeats), and checks both give the same answers.

    python bench/ask_many.py            # 4K-token context, 8 questions
    python bench/ask_many.py --quick    # a few seconds, for the test suite
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import median_seconds
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, pipeline

from comi_hf import COMIConfig, COMIForConditionalGeneration


def build(vocab_words: list[str], args) -> tuple:
    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *vocab_words])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    # Shaped like Qwen3-4B in depth and vocabulary, tiny in width, so it runs on a CPU.
    backbone = Qwen3Config(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden_size // 4,
        max_position_embeddings=max(8192, args.context_tokens * 2),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    config = COMIConfig(text_config=backbone, encoder_layers=args.encoder_layers, merge_size=args.merge_size)
    model = COMIForConditionalGeneration(config).eval()
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--context-tokens", type=int, default=4096)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--merge-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--encoder-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=151936)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.context_tokens, args.layers, args.encoder_layers, args.vocab_size = 512, 4, 2, 1000
        args.max_new_tokens, args.repeats = 4, 1

    words = [f"w{i}" for i in range(500)]
    model, tokenizer = build(words, args)
    generator = torch.Generator().manual_seed(0)
    context = " ".join(words[i] for i in torch.randint(len(words), (args.context_tokens,), generator=generator))
    questions = [
        " ".join(words[i] for i in torch.randint(len(words), (12,), generator=generator)) for _ in range(args.questions)
    ]
    pipe = pipeline("comi-qa", model=model, tokenizer=tokenizer)
    options = {"max_new_tokens": args.max_new_tokens, "eos_token_id": None}

    together = pipe(context=context, questions=questions, **options)
    separate = [pipe(context=context, question=question, **options) for question in questions]
    same = together["answers"] == [result["answer"] for result in separate]

    with torch.inference_mode():
        time_together = median_seconds(lambda: pipe(context=context, questions=questions, **options), args.repeats)
        time_separate = median_seconds(
            lambda: [pipe(context=context, question=question, **options) for question in questions], args.repeats
        )
    results = {
        "context_tokens": together["context_tokens"],
        "questions": args.questions,
        "merge_size": args.merge_size,
        "backbone": f"Qwen3-shaped, {args.layers} layers (encoder {args.encoder_layers}), hidden {args.hidden_size}, "
        f"vocabulary {args.vocab_size}",
        "threads": torch.get_num_threads(),
        "seconds_questions_together": time_together,
        "seconds_separate_calls": time_separate,
        "speedup": time_separate / time_together,
        "same_answers": same,
    }
    print(f"{results['context_tokens']}-token context, {args.questions} questions, merge size {args.merge_size}")
    print(f"backbone: {results['backbone']}; {results['threads']} threads")
    print(f"questions=[...] in one call : {time_together:8.3f} s (median of {args.repeats})")
    print(f"{args.questions} separate calls          : {time_separate:8.3f} s")
    print(f"speedup                     : {results['speedup']:8.2f}x   same answers: {same}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    if not same:
        raise SystemExit("questions=[...] and separate calls gave different answers")


if __name__ == "__main__":
    main()
