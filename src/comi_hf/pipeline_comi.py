"""`pipeline("comi-qa")`: answer questions about long documents with a COMI model.

This file is also shipped as remote code beside saved models, so it imports nothing from the
`comi_hf` package. Importing it registers the task.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .errors_comi import InvalidInputError
from .processing_comi import (
    answer_records,
    check_merge_size,
    decode_answers,
    gather_inputs,
    pad_token_lists,
    prepare_inputs,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_MODEL",
    "PIPELINE_TASK",
    "COMIQuestionAnsweringPipeline",
    "custom_pipelines_entry",
]

PIPELINE_TASK = "comi-qa"


class COMIQuestionAnsweringPipeline(Pipeline):
    """Answer questions about a context with a COMI model (compressed context + decoder).

    Calls:

    * `pipe(context=..., question=...)` -> `{"answer", "context_tokens", "memory_tokens", "compression_ratio"}`
    * `pipe(context=..., questions=[...])` -> `{"answers": [...], ...}`: the context is encoded
      once and only the queries, the compression and the decoding run per question.
    * `pipe([{"context": ..., "question": ...}, ...], batch_size=8)` -> a list of results, in order.

    Contexts and questions are texts or lists of token ids, checked as everywhere in comi_hf
    (`processing_comi.prepare_inputs`); a problem is an `InvalidInputError` naming the field.

    Options: `merge_size` (the compression ratio for this call), `return_compression=True`
    (per memory vector, the span of context tokens it fused and their weights),
    `show_progress=True` (a bar while a long context's segments are encoded, with `questions`),
    and any generation argument (`max_new_tokens`, `do_sample`, `num_beams`, ...).

    With `num_return_sequences=k > 1`, every answer comes as k, best first, in the shape of
    transformers' text-generation pipeline: a question gives a list of k result dicts, and
    `questions=[...]` gives `"answers"` as one list of k strings per question.
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __call__(self, inputs: Any = None, *, context=None, question=None, questions=None, **kwargs):
        inputs = gather_inputs(inputs, context, question, questions)
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise InvalidInputError("Got an empty list of inputs; give at least one {'context': ..., 'question': ...}.")
        if isinstance(inputs, (list, tuple)) and (kwargs.get("batch_size") or self._batch_size or 1) > 1:
            if any(isinstance(item, dict) and "questions" in item for item in inputs):
                raise InvalidInputError(
                    "Items with several `questions` already run as one batch; call them one at a time "
                    "(or give one `question` per item to batch them)."
                )
        return super().__call__(inputs, **kwargs)

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        """transformers' iterator, with a collator that pads with id 0 under the masks.

        The default collator pads with the tokenizer's pad token and refuses tokenizers that
        have none (Llama, Mistral); COMI masks padding everywhere, so no pad token is needed.
        """
        if batch_size == 1:
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=_pad_right)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _sanitize_parameters(
        self,
        merge_size: int | None = None,
        return_compression: bool | None = None,
        show_progress: bool | None = None,
        generate_kwargs: dict | None = None,
        **kwargs,
    ):
        forward_params: dict[str, Any] = {"generate_kwargs": {**(generate_kwargs or {}), **kwargs}}
        if show_progress is not None:
            forward_params["show_progress"] = bool(show_progress)
        postprocess_params: dict[str, Any] = {}
        if merge_size is not None:
            forward_params["merge_size"] = check_merge_size(merge_size)
        if return_compression is not None:
            forward_params["return_compression"] = bool(return_compression)
            postprocess_params["return_compression"] = bool(return_compression)
        return {}, forward_params, postprocess_params

    def preprocess(self, inputs: dict) -> dict:
        (prepared,) = prepare_inputs(inputs, self.tokenizer, self.model.get_input_embeddings().num_embeddings)
        input_ids, attention_mask = pad_token_lists([prepared.context_ids])
        query_ids, query_attention_mask = pad_token_lists(prepared.question_ids)
        model_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "query_ids": query_ids,
            "query_attention_mask": query_attention_mask,
        }
        if prepared.several:
            model_inputs["several_questions"] = True
        return model_inputs

    def _forward(
        self,
        model_inputs: dict,
        merge_size: int | None = None,
        return_compression: bool = False,
        show_progress: bool = False,
        generate_kwargs: dict | None = None,
    ) -> dict:
        several = model_inputs.pop("several_questions", False)
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        query_ids, query_mask = model_inputs["query_ids"], model_inputs["query_attention_mask"]
        if several:
            # One context, many questions: its encoder pass is shared by all of them.
            contexts = {"context_encoding": self.model.encode_context(input_ids, attention_mask, show_progress)}
        else:
            contexts = {"input_ids": input_ids, "attention_mask": attention_mask}
        memory, memory_mask, *details = self.model.compress(
            query_ids=query_ids,
            query_attention_mask=query_mask,
            merge_size=merge_size,
            return_details=return_compression,
            **contexts,
        )
        generated = self.model.generate(
            query_ids=query_ids,
            query_attention_mask=query_mask,
            memory=(memory, memory_mask),
            tokenizer=self.tokenizer,  # for `stop_strings`
            **(generate_kwargs or {}),
        )
        if not isinstance(generated, torch.Tensor):
            generated = generated.sequences
        # `num_return_sequences` answers per query, query-major: (queries, k, new tokens), so that
        # unbatching hands each input its own k answers.
        num_queries = query_ids.shape[0]
        outputs = {
            "generated": generated.view(num_queries, generated.shape[0] // num_queries, generated.shape[1]),
            "memory_tokens": memory_mask.sum(1),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
        if several:
            outputs["several_questions"] = True
        if return_compression:
            outputs["token_memory"] = details[0].token_memory
            outputs["token_weight"] = details[0].token_weight
        return outputs

    def postprocess(self, model_outputs: dict, return_compression: bool = False) -> dict | list[dict]:
        generated = model_outputs["generated"]  # (queries, k, new tokens)
        num_queries, per_query = generated.shape[:2]
        texts = decode_answers(self.tokenizer, generated.flatten(0, 1))
        answers = [texts[row * per_query : (row + 1) * per_query] for row in range(num_queries)]
        context_ids = model_outputs["input_ids"][0][model_outputs["attention_mask"][0].bool()].tolist()
        context_tokens = len(context_ids)
        memory_tokens = [int(count) for count in model_outputs["memory_tokens"]]
        compressions = None
        if return_compression:
            token_texts = _token_texts(self.tokenizer, context_ids)
            compressions = [
                _compression_record(
                    token_texts,
                    model_outputs["token_memory"][row][:context_tokens].tolist(),
                    model_outputs["token_weight"][row][:context_tokens].tolist(),
                    count,
                )
                for row, count in enumerate(memory_tokens)
            ]
        several = model_outputs.get("several_questions", False)
        return answer_records(answers, context_tokens, memory_tokens, several, compressions)


def _pad_right(items: list[dict]) -> dict:
    """Batch preprocessed inputs: each `(1, len)` tensor right-padded with 0 to the longest."""
    batch = {}
    for key in items[0]:
        width = max(item[key].shape[1] for item in items)
        batch[key] = torch.cat([torch.nn.functional.pad(item[key], (0, width - item[key].shape[1])) for item in items])
    return batch


def _token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's text as it reads in the decoded context, with its leading space if any.

    Decoding tokens one by one loses the spaces tokenizers put between words; the text a token
    adds after its predecessor keeps them.
    """
    texts = []
    for position, token in enumerate(token_ids):
        alone = tokenizer.decode([token])
        if position:
            previous = tokenizer.decode([token_ids[position - 1]])
            pair = tokenizer.decode([token_ids[position - 1], token])
            if pair.startswith(previous):
                alone = pair[len(previous) :]
        texts.append(alone)
    return texts


def _compression_record(tokens: list[str], token_memory: list[int], token_weight: list[float], count: int) -> dict:
    """Per memory vector: the span `[start, end)` of context tokens it fused and their weights.

    Each memory vector fuses a run of consecutive tokens, in order, so one pass finds the runs.
    """
    starts = [
        position
        for position in range(len(token_memory))
        if position == 0 or token_memory[position] != token_memory[position - 1]
    ]
    ends = starts[1:] + [len(token_memory)]
    groups = [
        {"start": start, "end": end, "weights": token_weight[start:end]}
        for start, end in zip(starts, ends, strict=True)
    ]
    if len(groups) != count or [token_memory[start] for start in starts] != list(range(count)):
        raise RuntimeError("The compression details do not describe consecutive runs of tokens.")
    return {"tokens": tokens, "groups": groups}


def custom_pipelines_entry(pipeline_class: type = COMIQuestionAnsweringPipeline) -> dict:
    """The `custom_pipelines` entry of a saved model's config, as `Pipeline.save_pretrained` writes it."""
    module = pipeline_class.__module__.rsplit(".", 1)[-1]
    return {
        PIPELINE_TASK: {
            "impl": f"{module}.{pipeline_class.__name__}",
            "pt": ["AutoModelForCausalLM"],
            "tf": [],
            "type": "text",
        }
    }


# What the package ships (absent where this file runs as remote code): the tiny trained model,
# which `pipeline("comi-qa")` and `comi-qa` load when no model is named, and the plain causal LM it
# was built from (its card says how it was pretrained; bench/peers.py runs COMI's peers on it).
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
DEFAULT_BACKBONE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_backbone")

if PIPELINE_TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK,
        pipeline_class=COMIQuestionAnsweringPipeline,
        pt_model=AutoModelForCausalLM,
        # `pipeline("comi-qa")` without a model then loads the shipped one (a local path: no download).
        default={"model": (DEFAULT_MODEL, None)} if os.path.isdir(DEFAULT_MODEL) else None,
        type="text",
    )
