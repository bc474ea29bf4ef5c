"""COMI: query-aware context compression with marginal information gain, as a transformers model.

context ids ─┐
             ├─► encoder (first K backbone layers + final norm) ─► hidden states
query ids ───┘                                                      │
                              mean of the query's hidden states ─► MIG compressor
                                                                    │ memory vectors
                                                 LSA (backbone layers + norm, or Linear)
                                                                    │
decoder (the full backbone) reads [memory ; query embeddings ; answer embeddings]

[`COMICompressionModel`] is the compression half (encoder, MIG compressor, LSA: contexts and
queries in, memory vectors out). [`COMIForConditionalGeneration`] adds the decoder;
[`COMIPromptEncoder`] adds only the decoder's token embeddings, to build the decoder's input
where another process (a vLLM server) holds the decoder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin
from transformers.generation.logits_process import LogitsProcessorList
from transformers.modeling_outputs import ModelOutput

from .backbone_comi import copy_backbone_into_encoder_and_lsa, load_backbone
from .compressor_comi import MIG_OPTIONS, COMICompressionModel, COMIPreTrainedModel, loading_problems
from .configuration_comi import COMIConfig
from .errors_comi import InvalidInputError, describe_value
from .generation_comi import (
    check_servable,
    official_generation_config,
    resolve_generation_settings,
    serving_generation_config,
    warn_past_positions,
)
from .packing import COMICompressionDetails, COMIContextEncoding, decoder_inputs
from .processing_comi import check_vocabulary, pad_token_lists, token_ids_of

__all__ = [
    "MIG_OPTIONS",
    "COMICompressionDetails",
    "COMICompressionModel",
    "COMIContextEncoding",
    "COMIForConditionalGeneration",
    "COMIOutput",
    "COMIPreTrainedModel",
    "COMIPromptEncoder",
    "loading_problems",
    "official_generation_config",
]


@dataclass
class COMIOutput(ModelOutput):
    """Output of [`COMIForConditionalGeneration.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): cross-entropy on the answer tokens.
        logits (`torch.FloatTensor` of shape `(batch, decoder_len, vocab)`): decoder logits over
            the packed sequence `[memory ; query ; answer]`, right-padded (see `decoder_attention_mask`).
        decoder_attention_mask (`torch.LongTensor` of shape `(batch, decoder_len)`): 1 on real positions.
        memory (`torch.FloatTensor` of shape `(batch, memory_len, hidden)`): the aligned memory vectors.
        memory_attention_mask (`torch.BoolTensor` of shape `(batch, memory_len)`): `True` on real memory vectors.
        cache, hidden_states, attentions: the decoder's, as in any causal LM output.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    decoder_attention_mask: torch.LongTensor | None = None
    memory: torch.FloatTensor | None = None
    memory_attention_mask: torch.BoolTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class COMIForConditionalGeneration(COMICompressionModel, GenerationMixin):
    """COMI: encoder → MIG compressor → LSA → decoder.

    Build one from a decoder-only backbone with [`~COMIForConditionalGeneration.from_backbone`],
    load a COMI checkpoint with `from_pretrained`, and answer with [`~COMIForConditionalGeneration.generate`].
    """

    _keys_to_ignore_on_load_unexpected = None

    def _add_decoder_side(self, config: COMIConfig) -> None:
        self.decoder = AutoModelForCausalLM.from_config(config.text_config)
        # `labels` hold the answer alone, and every answer token is predicted (the first from the
        # query's last position): not a causal-LM loss over the labels' own sequence. This tells
        # `Trainer` to count every label, not `labels[..., 1:]`, when it normalises the loss.
        self.loss_type = None
        self.generation_config = official_generation_config(config)

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.decoder.set_output_embeddings(new_embeddings)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs) -> nn.Embedding:
        """Resize the decoder's and the encoder's token embeddings together."""
        self.encoder.resize_token_embeddings(new_num_tokens, *args, **kwargs)
        return super().resize_token_embeddings(new_num_tokens, *args, **kwargs)

    @classmethod
    def from_backbone(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        **config_overrides,
    ) -> COMIForConditionalGeneration:
        """Build a COMI model from a decoder-only checkpoint (Hub id or local directory).

        The decoder is the checkpoint itself; the encoder is a copy of its first
        `encoder_layers` layers plus its embeddings and final norm; the LSA block is a copy of
        its first `num_mem_fusion_layers` layers plus its final norm (comi_hf's docs/method.md).

        Args:
            pretrained_model_name_or_path: the backbone (Qwen2, Qwen3, Llama, Mistral, ...).
            dtype, device_map, attn_implementation: as in `from_pretrained`.
            revision, token, cache_dir, local_files_only, trust_remote_code: Hub options.
            **config_overrides: [`COMIConfig`] fields, e.g. `encoder_layers=8, merge_size=16`.
        """
        hub = {
            "revision": revision,
            "token": token,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
            "trust_remote_code": trust_remote_code,
        }
        loading = {"dtype": dtype, "device_map": device_map, "attn_implementation": attn_implementation}
        model = load_backbone(cls, pretrained_model_name_or_path, hub, loading, config_overrides)
        model.copy_backbone_into_encoder_and_lsa()
        model.generation_config = official_generation_config(model.config)
        return model

    def copy_backbone_into_encoder_and_lsa(self) -> None:
        """(Re)initialise the encoder and the LSA block from the decoder's weights."""
        copy_backbone_into_encoder_and_lsa(self)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        merge_size: int | None = None,
        use_cache: bool = False,
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> COMIOutput:
        """Compress the contexts and run the decoder on `[memory ; query ; answer]`.

        Args:
            input_ids, attention_mask: `(batch, context_len)` contexts (see [`compress`]).
            query_ids, query_attention_mask: `(batch, query_len)` queries.
            labels: `(batch, answer_len)` answer token ids (end them with EOS), -100 on padding.
                The decoder reads them (teacher forcing) and the loss is the cross-entropy on
                them alone; memory and query positions are never scored.
            merge_size: overrides the configured merge size (otherwise, in training mode, one of
                `config.merge_sizes` is drawn per batch when set).
            memory: `(memory, memory_attention_mask)` from [`compress`], instead of `input_ids`:
                compression already done (e.g. with `return_details=True`, whose token → memory
                map a training loss may need) is not done again. Gradients flow into it as usual.
            **kwargs: passed to the decoder (e.g. `num_items_in_batch`, `logits_to_keep`).

        Each sample is packed without gaps and right-padded, so a batch gives every sample the
        result it gets alone.
        """
        memory, memory_mask, query_mask = _memory_and_query(
            self, input_ids, attention_mask, query_ids, query_attention_mask, merge_size, memory
        )
        if labels is not None:
            _check_labels(labels, query_ids.shape[0], self.get_input_embeddings().num_embeddings)
        inputs_embeds, decoder_mask, decoder_labels = decoder_inputs(
            self.get_input_embeddings(), memory, memory_mask, query_ids, query_mask, labels
        )
        warn_past_positions(self, inputs_embeds.shape[1])
        outputs = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=decoder_mask.long(),
            labels=decoder_labels,
            use_cache=use_cache,
            **kwargs,
        )
        return COMIOutput(
            loss=outputs.loss,
            logits=outputs.logits,
            decoder_attention_mask=decoder_mask.long(),
            memory=memory,
            memory_attention_mask=memory_mask,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        *,
        context: str | list[str] | None = None,
        query: str | list[str] | None = None,
        tokenizer=None,
        merge_size: int | None = None,
        context_encoding: COMIContextEncoding | None = None,
        context_index: torch.LongTensor | None = None,
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ):
        """Answer queries about contexts; returns only the new tokens.

        Give either token ids (`input_ids`/`attention_mask` for the contexts,
        `query_ids`/`query_attention_mask` for the queries) or text (`context=`, `query=`, a
        string or a list of strings each, and `tokenizer=`; text is tokenised without special
        tokens, as in the official code). Instead of the contexts, `context_encoding=` (from
        [`encode_context`], with `context_index=` as in [`compress`]) reuses an encoded context
        for many queries, and `memory=(memory, memory_attention_mask)` (from [`compress`])
        skips compression altogether.

        Every argument of `transformers`' `generate` is accepted (`max_new_tokens`,
        `do_sample`, `num_beams`, `streamer`, `stopping_criteria`, `return_dict_in_generate`,
        ...) on top of `self.generation_config`, whose defaults are the official evaluation's
        (greedy, 20 new tokens, repetition penalty 1.3).

        Returns:
            `(batch, new_tokens)` token ids, or a `GenerateOutput` whose `sequences` hold only the
            new tokens when `return_dict_in_generate=True`.
        """
        if context is not None or query is not None:
            if input_ids is not None or query_ids is not None:
                raise InvalidInputError("Pass either text (`context=`, `query=`) or token ids, not both.")
            input_ids, attention_mask, query_ids, query_attention_mask = _tokenize_text(
                context, query, tokenizer, self.get_input_embeddings().num_embeddings
            )
        memory, memory_mask, query_mask = _memory_and_query(
            self,
            input_ids,
            attention_mask,
            query_ids,
            query_attention_mask,
            merge_size,
            memory,
            context_encoding,
            context_index,
        )
        inputs_embeds, decoder_mask, _ = decoder_inputs(
            self.get_input_embeddings(), memory, memory_mask, query_ids, query_mask, left_pad=True
        )
        generation_config, processors, generate_kwargs, new_tokens = resolve_generation_settings(
            self.generation_config, generation_config, logits_processor, kwargs, inputs_embeds.shape[1], tokenizer
        )
        warn_past_positions(self, inputs_embeds.shape[1], new_tokens)
        # The decoder fills unset generation values from its own generation config: make it ours.
        self.decoder.generation_config = self.generation_config
        if tokenizer is not None:
            generate_kwargs["tokenizer"] = tokenizer  # what `stop_strings` are matched with
        return self.decoder.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=decoder_mask.long(),
            generation_config=generation_config,
            logits_processor=processors,
            **generate_kwargs,
        )

    def export_decoder(self, save_directory: str | os.PathLike, tokenizer=None) -> None:
        """Save the decoder alone as a causal-LM directory that vLLM serves unchanged.

        Writes the decoder's config and weights (safetensors), a generation config with this
        model's EOS and length settings, and `tokenizer` if given. vLLM then decodes COMI's
        `[memory ; query]` inputs sent as prompt embeddings (see `COMIPromptEncoder`). The
        repetition penalty is left out of that generation config: vLLM's own penalty also counts
        placeholder prompt ids for prompt embeddings, and `comi_hf`'s clients send the penalty to
        comi_hf's vLLM logits processor instead.
        """
        check_servable(self.decoder)
        self.decoder.save_pretrained(save_directory)
        serving_generation_config(self.generation_config).save_pretrained(save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Save weights (safetensors), config, generation config and the remote code, pipeline included.

        The config records learnt MIG weights as their current values. The directory then loads
        with `AutoModel`/`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and
        with `pipeline(model=directory, trust_remote_code=True)` (task `comi-qa` inferred) where
        `comi_hf` is not installed.
        """
        for name, param in self.compressor.named_parameters(recurse=False):
            setattr(self.config, name, float(param.detach()))
        # `register_for_auto_class` records one Auto class; both should load this model.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        module = type(self).__module__.rsplit(".", 1)[-1]
        auto_map.setdefault("AutoModel", f"{module}.{type(self).__name__}")
        self.config.auto_map = auto_map
        # Imported here: the pipeline sits above the model (and is saved beside it as remote code).
        from .pipeline_comi import custom_pipelines_entry

        self.config.custom_pipelines = custom_pipelines_entry()
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            vars(self.config).pop("custom_pipelines", None)


class COMIPromptEncoder(COMICompressionModel):
    """COMI without the decoder's layers: builds the decoder's input for a decoder served elsewhere.

    It holds the encoder, the MIG compressor, the LSA and the decoder's token embedding table,
    read from a saved COMI directory (`from_pretrained`); the decoder's layers and LM head are
    never loaded. [`prompt_embeds`] gives each query's `[memory ; query]` embeddings, exactly the
    rows `COMIForConditionalGeneration.generate` feeds its decoder.
    """

    def _add_decoder_side(self, config: COMIConfig) -> None:
        # The decoder's embedding table at the path it has in the whole model (e.g.
        # `decoder.model.embed_tokens`), so that a COMI checkpoint loads as it is; the decoder's
        # other weights in it are left unread.
        with torch.device("meta"):
            decoder = AutoModelForCausalLM.from_config(config.get_text_config())
        table = decoder.get_input_embeddings()
        path = next(name for name, module in decoder.named_modules() if module is table)
        self.decoder = _modules_holding(path, nn.Embedding(table.num_embeddings, table.embedding_dim))
        self._keys_to_ignore_on_load_unexpected = [rf"^decoder\.(?!{re.escape(path)}\.)"]
        self._embedding_path = f"decoder.{path}"

    def get_input_embeddings(self) -> nn.Module:
        return self.get_submodule(self._embedding_path)

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The decoder's token embedding table."""
        return self.get_input_embeddings()

    @torch.no_grad()
    def prompt_embeds(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        merge_size: int | None = None,
        *,
        context_encoding: COMIContextEncoding | None = None,
        context_index: torch.LongTensor | None = None,
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
        mig_options: dict | None = None,
    ) -> list[torch.Tensor]:
        """Each query's decoder input `[memory ; query]`, `(memory_len + query_len, hidden)`, unpadded.

        Takes the inputs of `COMIForConditionalGeneration.generate` as token ids, and
        [`compress`]'s `mig_options`.
        """
        memory, memory_mask, query_mask = _memory_and_query(
            self,
            input_ids,
            attention_mask,
            query_ids,
            query_attention_mask,
            merge_size,
            memory,
            context_encoding,
            context_index,
            mig_options,
        )
        embeds, mask, _ = decoder_inputs(self.embed_tokens, memory, memory_mask, query_ids, query_mask)
        return [row[row_mask] for row, row_mask in zip(embeds, mask, strict=True)]


# ---------------------------------------------------------------------- helpers
def _modules_holding(path: str, leaf: nn.Module) -> nn.Module:
    """Empty modules nested along the dotted `path`, with `leaf` at its end."""
    *parents, name = path.split(".")
    root = node = nn.Module()
    for part in parents:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(name, leaf)
    return root


def _memory_and_query(
    model: COMICompressionModel,
    input_ids,
    attention_mask,
    query_ids,
    query_attention_mask,
    merge_size,
    memory=None,
    context_encoding=None,
    context_index=None,
    mig_options=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory (compressed here, or given) and the query's real-token mask: the checks and the
    compression that `forward`, `generate` and `prompt_embeds` share."""
    has_context = input_ids is not None or context_encoding is not None
    if query_ids is None or (memory is None and not has_context):
        raise InvalidInputError(
            "COMI needs a context (`input_ids`, `context_encoding` or `memory`) and a query (`query_ids`)."
        )
    if memory is None:
        memory, memory_mask = model.compress(
            input_ids,
            attention_mask,
            query_ids,
            query_attention_mask,
            merge_size,
            context_encoding=context_encoding,
            context_index=context_index,
            mig_options=mig_options,
        )
    elif has_context or merge_size is not None or mig_options is not None:
        raise InvalidInputError(
            "Give the contexts as `input_ids` or `context_encoding` (and `merge_size`, `mig_options`) or as compressed "
            "`memory`, not both."
        )
    else:
        memory, memory_mask = _check_memory(memory, query_ids.shape[0])
    query_mask = model._real_tokens(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
    return memory, memory_mask, query_mask


def _check_labels(labels: object, num_queries: int, vocab_size: int) -> None:
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dim() != 2
        or labels.dtype not in (torch.long, torch.int)
        or labels.shape[0] != num_queries
    ):
        raise InvalidInputError(
            f"`labels` must be a ({num_queries}, answer_len) tensor of token ids (-100 on padding), "
            f"got {describe_value(labels)}."
        )
    check_vocabulary(labels[labels != -100], "labels", vocab_size)


def _check_memory(memory: object, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(memory, memory_attention_mask)` pair of `compress`, checked."""
    vectors, mask = memory if isinstance(memory, (tuple, list)) and len(memory) == 2 else (memory, None)
    if (
        not isinstance(vectors, torch.Tensor)
        or not isinstance(mask, torch.Tensor)
        or vectors.dim() != 3
        or vectors.shape[0] != num_queries
        or mask.shape != vectors.shape[:2]
    ):
        raise InvalidInputError(
            f"`memory` must be the `(memory, memory_attention_mask)` pair `compress` gives, "
            f"`({num_queries}, memory_len, hidden)` and `({num_queries}, memory_len)` for {num_queries} queries; "
            f"got {describe_value(memory)}."
        )
    return vectors, mask.bool()


def _tokenize_text(context, query, tokenizer, vocab_size: int):
    """Token ids and masks of context and query texts (either may be `None`: then `None`s), checked
    at the one input edge (`processing_comi.token_ids_of`)."""
    if tokenizer is None:
        raise InvalidInputError("Text input (`context=`, `query=`) needs `tokenizer=`.", field="tokenizer")
    encoded = []
    for name, text in (("context", context), ("query", query)):
        if text is None:
            encoded.append((None, None))
            continue
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(item, str) for item in texts):
            raise InvalidInputError(
                f"`{name}` must be a string or a non-empty list of strings, got {describe_value(text)}.", field=name
            )
        fields = [name] if isinstance(text, str) else [f"{name}[{position}]" for position in range(len(texts))]
        ids = [token_ids_of(item, field, tokenizer, vocab_size) for item, field in zip(texts, fields, strict=True)]
        encoded.append(pad_token_lists(ids))
    (context_ids, context_mask), (query_ids, query_mask) = encoded
    return context_ids, context_mask, query_ids, query_mask


COMIForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
