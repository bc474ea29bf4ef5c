"""The kvpress side of bench/peers.py: KV-cache presses and plain decoding on a backbone.

Runs with the Python of kvpress's own environment (kvpress 0.5.5 pins transformers < 5.3;
`.ci/kvpress_venv.sh`), as a subprocess of bench/peers.py, which hands it a job file and reads
back a results file (both JSON). It imports kvpress, transformers and torch, never comi_hf.

    python bench/kvpress/worker.py JOB.json RESULTS.json

The job: `backbone` (a causal-LM directory), `documents` (`context_ids`, `question_ids`: token
ids, tokenised without special tokens as COMI's official code does; `context`, `question`: their
text), `runs` (each `{"label", "press": name or null, "press_kwargs", "mode": "context" | "with
question", "keep": [tokens per document], "truncate": null | "first" | "last"}`),
`max_new_tokens`, `device`, `dtype`, `threads` and `check_pipeline` (documents on which
kvpress's own `pipeline(...)(context, question=...)` must give the same answers). A run keeps
`keep[i]` KV entries per layer and head of document i: a press at the compression ratio that
leaves exactly that many (`compute_n_kept` floors), a truncation by cutting the context to that
many tokens.

Decoding is the pipeline's: the context is prefilled under the press (`with press(model)`), the
question follows uncompressed, and `KVPressTextGenerationPipeline.generate_answer` decodes greedily
(no repetition penalty; kvpress has none). "with question" is kvpress's own evaluation's
`compress_questions` (context + question compressed together); the pipeline cannot run it (an
empty question makes a 0-token forward), so the first answer token comes from the prefill and
the pipeline's greedy loop continues. Timings per document: time to the first answer token
(prefill and question) and decoding per further token.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kvpress  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# kvpress's pipeline prepends `tokenizer.bos_token` to the context when the tokenizer has no chat
# template, which fails on a tokenizer without BOS (None + str). A template that renders the
# message unchanged gives the ids of the no-template branch without a BOS (checked by
# `check_pipeline`): the pipeline's own answers then match this worker's on the same token ids.
PASSTHROUGH_TEMPLATE = "{{ messages[0]['content'] }}\n"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_press(name: str | None, kwargs: dict, kept: int, total: int):
    """The press keeping exactly `kept` of `total` entries (kvpress keeps int(total * (1 - ratio)))."""
    if name is None:
        return None
    ratio = 1.0 - (kept + 0.5) / total
    return getattr(kvpress, name)(compression_ratio=max(ratio, 0.0), **kwargs)


def kept_entries(model, cache) -> float:
    return sum(cache.get_seq_length(layer) for layer in range(len(model.model.layers))) / len(model.model.layers)


def greedy(pipe, first, cache, position: int, max_new_tokens: int) -> list[int]:
    """The loop of kvpress's `generate_answer` after its first token (argmax; it stops once it has
    produced EOS, and a first token is never checked), so that both modes decode alike."""
    model = pipe.model
    stop = model.generation_config.eos_token_id
    stop = stop if isinstance(stop, list) else [stop]
    generated = [first]
    for step in range(max_new_tokens - 1):
        position_ids = torch.tensor([[position + step]], device=model.device)
        logits = model(input_ids=generated[-1].view(1, 1), past_key_values=cache, position_ids=position_ids).logits
        generated.append(logits[0, -1].argmax())
        if generated[-1].item() in stop:
            break
    return [int(token) for token in generated]


class TokenTimes:
    """Times the decoding of `generate_answer`: when the model's forward returns, step by step."""

    def __init__(self, model):
        self.times, self._hook = [], model.register_forward_hook(lambda *_: self.times.append(time.perf_counter()))

    def remove(self):
        self._hook.remove()


@torch.inference_mode()
def answer(pipe, run: dict, document: dict, kept: int, max_new_tokens: int, device: str) -> dict:
    model = pipe.model
    context = document["context_ids"]
    if run.get("truncate") == "first":
        context = context[:kept]
    elif run.get("truncate") == "last":
        context = context[len(context) - kept :]
    context_ids = torch.tensor([context], device=device)
    question_ids = torch.tensor([document["question_ids"]], device=device)
    cache = DynamicCache()
    with_question = run.get("mode") == "with question"
    prefilled = torch.cat([context_ids, question_ids], dim=1) if with_question else context_ids
    press = make_press(run.get("press"), run.get("press_kwargs", {}), kept, prefilled.shape[1])
    sync(device)
    start = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        logits = model(input_ids=prefilled, past_key_values=cache, logits_to_keep=1).logits
    kept_kv = kept_entries(model, cache)
    if with_question:
        first = logits[0, -1].argmax()
        sync(device)
        first_token = time.perf_counter()
        tokens = greedy(pipe, first, cache, prefilled.shape[1], max_new_tokens)
        text = pipe.tokenizer.decode(tokens, skip_special_tokens=True)  # as generate_answer decodes
        steps = len(tokens) - 1
    else:
        clock = TokenTimes(model)
        try:
            text = pipe.generate_answer(
                question_ids=question_ids,
                cache=cache,
                context_length=context_ids.shape[1],
                max_new_tokens=max_new_tokens,
            )
        finally:
            clock.remove()
        # One forward per answer token, the first one over the question. (The text is the answer:
        # encoding it again would not give its tokens back, e.g. "7." is one unknown word.)
        first_token, steps = clock.times[0], len(clock.times) - 1
    sync(device)
    end = time.perf_counter()
    return {
        "answer": text.strip(),
        "first_token_seconds": first_token - start,
        "decode_seconds_per_token": (end - first_token) / max(steps, 1),
        "kept_kv": kept_kv,
    }


def main(job_path: str, results_path: str) -> None:
    job = json.loads(open(job_path).read())
    device, max_new_tokens = job.get("device", "cpu"), int(job.get("max_new_tokens", 20))
    torch.set_num_threads(int(job.get("threads", 1)))
    tokenizer = AutoTokenizer.from_pretrained(job["backbone"])
    if tokenizer.chat_template is None and getattr(tokenizer, "bos_token", None) is None:
        tokenizer.chat_template = PASSTHROUGH_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(job["backbone"], dtype=DTYPES[job.get("dtype", "float32")])
    model.to(device).eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=device)
    documents, results = job["documents"], []
    for run in job["runs"]:
        record = {"label": run["label"], "answers": [], "first_token_seconds": [], "decode_seconds_per_token": []}
        record["kept_kv"], record["error"] = [], None
        try:
            answer(pipe, run, documents[0], run["keep"][0], max_new_tokens, device)  # warm-up, untimed
            for document, kept in zip(documents, run["keep"], strict=True):
                outcome = answer(pipe, run, document, kept, max_new_tokens, device)
                for key in ("answer", "first_token_seconds", "decode_seconds_per_token", "kept_kv"):
                    record["answers" if key == "answer" else key].append(outcome[key])
            checks = job.get("check_pipeline", 0) if run.get("mode") == "context" and not run.get("truncate") else 0
            if checks:
                same = counted = 0
                for position, document in enumerate(documents[:checks]):
                    # The pipeline tokenises text: a document counts where its text gives the worker's ids.
                    tensors = pipe.preprocess(document["context"], [document["question"]], "", int(1e9))
                    if (
                        tensors["context_ids"][0].tolist() != document["context_ids"]
                        or tensors["questions_ids"][0][0].tolist() != document["question_ids"]
                    ):
                        continue
                    total = len(document["context_ids"])
                    press = make_press(run.get("press"), run.get("press_kwargs", {}), run["keep"][position], total)
                    reply = pipe(
                        document["context"], question=document["question"], press=press, max_new_tokens=max_new_tokens
                    )
                    counted += 1
                    same += reply["answer"].strip() == record["answers"][position]
                record["pipeline_check"] = f"{same}/{counted}"
        except Exception as error:  # the run says why, the others go on
            record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        results.append(record)
        print(
            f"{run['label']:<40} {'error: ' + record['error'] if record['error'] else 'done'}",
            file=sys.stderr,
            flush=True,
        )
    meta = {"kvpress": _version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__}
    meta["threads"] = torch.get_num_threads()
    open(results_path, "w").write(json.dumps({"meta": meta, "results": results}, indent=1))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/kvpress/worker.py JOB.json RESULTS.json")
    main(sys.argv[1], sys.argv[2])
