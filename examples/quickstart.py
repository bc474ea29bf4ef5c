"""A tour of comi_hf's Python API on the shipped default model, offline, in about ten seconds.

    python examples/quickstart.py [--output_dir scratch/quickstart]

1. answer with the pipeline (one question, several about one document, a batch);
2. `generate` with standard generation arguments, and a context encoded once for many questions;
3. `compress`: the memory vectors, and which vector each context token went into;
4. a training-style call (`labels` -> the answer's cross-entropy);
5. save, and load back with `AutoModel` and remote code, as from the Hub;
6. build an (untrained) COMI model from a plain decoder-only backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, HfArgumentParser, pipeline

from comi_hf import DEFAULT_BACKBONE, DEFAULT_MODEL, COMIForConditionalGeneration
from comi_hf.explain import render_compression_html
from comi_hf.loading import parse_script_arguments

DOCUMENT = Path(__file__).resolve().parent / "data" / "example_document.txt"
QUESTIONS = ["what is the code of long hill ?", "what is the code of new hill ?"]


def tour(output_dir: Path) -> dict:
    """Run every step; returns what each printed, for the test."""
    document = DOCUMENT.read_text()
    seen = {}

    # 1. The pipeline ("comi-qa", registered by importing comi_hf; a saved directory names it too).
    qa = pipeline("comi-qa", model=DEFAULT_MODEL, trust_remote_code=True)
    seen["one"] = qa(context=document, question=QUESTIONS[0])
    seen["several"] = qa(context=document, questions=QUESTIONS)  # the document encoded once
    seen["batch"] = qa([{"context": document, "question": q} for q in QUESTIONS], batch_size=2, merge_size=4)
    explained = qa(context=document, question=QUESTIONS[0], return_compression=True)
    page = render_compression_html(explained["compression"], questions=QUESTIONS[0], answers=explained["answer"])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "explanation.html").write_text(page)
    print("pipeline:", seen["one"], seen["several"], seen["batch"], sep="\n  ")

    # 2. generate: the official settings (greedy, 20 tokens, repetition penalty 1.3) unless overridden.
    model = COMIForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    answer_ids = model.generate(context=document, query=QUESTIONS[0], tokenizer=tokenizer, max_new_tokens=8)
    seen["generate"] = tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    context_ids = tokenizer(document, add_special_tokens=False, return_tensors="pt").input_ids
    questions = tokenizer(QUESTIONS, add_special_tokens=False, padding=True, return_tensors="pt")
    encoding = model.encode_context(context_ids)  # the encoder's pass over the document, once
    answers = model.generate(
        query_ids=questions.input_ids, query_attention_mask=questions.attention_mask, context_encoding=encoding
    )
    seen["encoded_once"] = tokenizer.batch_decode(answers, skip_special_tokens=True)
    print("generate:", seen["generate"], "with the context encoded once:", seen["encoded_once"])

    # 3. compress: memory (LSA applied) and, with return_details, the token -> memory-vector map.
    query_ids = tokenizer(QUESTIONS[0], add_special_tokens=False, return_tensors="pt").input_ids
    memory, _, details = model.compress(context_ids, None, query_ids, None, merge_size=16, return_details=True)
    seen["memory_shape"] = tuple(memory.shape)
    print(f"compress: {context_ids.shape[1]} tokens -> memory {tuple(memory.shape)};")
    print("  memory vector of the first 8 tokens:", details.token_memory[0, :8].tolist())

    # 4. A training-style call: labels are the answer's ids ending with EOS (-100 on padding).
    labels = torch.tensor([tokenizer("9 9 3 7", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]])
    with torch.no_grad():
        seen["loss"] = model(context_ids, None, query_ids, None, labels=labels).loss.item()
    print(f"loss of the right answer: {seen['loss']:.4f}")

    # 5. Saved directories carry their code: they load where comi_hf is not installed.
    model.save_pretrained(output_dir / "comi")
    tokenizer.save_pretrained(output_dir / "comi")
    loaded = AutoModel.from_pretrained(output_dir / "comi", trust_remote_code=True)
    again = loaded.generate(context=document, query=QUESTIONS[0], tokenizer=tokenizer, max_new_tokens=8)
    seen["reloaded_equal"] = torch.equal(again, answer_ids)
    print("reloaded with remote code, same answer:", seen["reloaded_equal"])

    # 6. From any decoder-only backbone: encoder = its first layers, decoder = all of it. The
    # compressor is untrained until fine-tuned (examples/train.py), so its answers are noise.
    backbone_tokenizer = AutoTokenizer.from_pretrained(DEFAULT_BACKBONE)
    fresh = COMIForConditionalGeneration.from_backbone(DEFAULT_BACKBONE, encoder_layers=2, merge_size=8)
    sampled = fresh.generate(
        context=[document, document],
        query=QUESTIONS,
        tokenizer=backbone_tokenizer,
        do_sample=True,
        top_p=0.9,
        max_new_tokens=5,
        merge_size=4,
    )
    seen["from_backbone_shape"] = tuple(sampled.shape)
    print("from_backbone, sampled:", backbone_tokenizer.batch_decode(sampled, skip_special_tokens=True))
    return seen


@dataclass
class QuickstartArguments:
    output_dir: Path = field(
        default=Path("scratch/quickstart"),
        metadata={"help": "Where the tour writes its files (an explanation page, the saved model)."},
    )


def main() -> None:
    parser = HfArgumentParser(QuickstartArguments, description=__doc__.split("\n\n")[0])
    (args,) = parse_script_arguments(parser)
    tour(args.output_dir)


if __name__ == "__main__":
    main()
