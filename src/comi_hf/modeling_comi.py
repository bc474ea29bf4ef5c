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

import contextlib
import copy
import logging
import os
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, GenerationConfig, GenerationMixin
from transformers import initialization as init
from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging as hf_logging

from .configuration_comi import COMIConfig, check_merge_size, draw_merge_size
from .mig import NonFiniteInputError, mig_compress
from .packing import (
    COMICompressionDetails,
    COMIContextEncoding,
    concatenate_rows,
    decoder_inputs,
    details_per_query,
    left_justify,
    resolve_context_index,
    rows_for_queries,
    rows_to_samples,
    segment_contexts,
)
from .pipeline_comi import custom_pipelines_entry, encode_texts

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

logger = hf_logging.get_logger(__name__)

# Where a plain decoder-only checkpoint's weights go inside COMI (they fill the decoder;
# the encoder and the LSA block are then copied from it).
_BACKBONE_KEY_MAPPING = {r"^model\.": "decoder.model.", r"^lm_head\.": "decoder.lm_head."}
# Parts of COMI that a plain backbone checkpoint cannot contain.
_NOT_IN_BACKBONE = re.compile(r"^(encoder|lsa|compressor)\.")
# The per-call options of the MIG compressor: `mig_compress`'s switches and weights.
MIG_OPTIONS = (
    "coarse",
    "fine",
    "coarse_redundancy",
    "fine_redundancy",
    "alpha_select",
    "beta_select",
    "alpha_merge",
    "beta_merge",
)


def official_generation_config(config: COMIConfig) -> GenerationConfig:
    """Generation settings of the official COMI evaluation: greedy, 20 new tokens, repetition penalty 1.3."""
    text_config = config.get_text_config()
    eos_token_id = getattr(text_config, "eos_token_id", None)
    pad_token_id = getattr(text_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=20,
        repetition_penalty=1.3,
        bos_token_id=getattr(text_config, "bos_token_id", None),
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


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


class COMIMIGCompressor(nn.Module):
    """The MIG stage: calls [`mig_compress`] with the config's switches and weights, read at each call.

    `alpha_merge` / `beta_merge` are parameters when `config.learnable_merge_weights` is set (their
    config values are then the starting values, and `save_pretrained` writes the learnt ones back).
    Any setting can be overridden for one call (see `MIG_OPTIONS`).
    """

    def __init__(self, config: COMIConfig):
        super().__init__()
        self.config = config
        if config.learnable_merge_weights:
            self.alpha_merge = nn.Parameter(torch.tensor(float(config.alpha_merge)))
            self.beta_merge = nn.Parameter(torch.tensor(float(config.beta_merge)))

    def settings(self) -> dict:
        """The switches and weights in force: the config's, learnt weights where there are some."""
        config = self.config
        return {
            "coarse": config.coarse_grained,
            "fine": config.fine_grained,
            "coarse_redundancy": config.coarse_redundancy,
            "fine_redundancy": config.fine_redundancy,
            "alpha_select": config.alpha_select,
            "beta_select": config.beta_select,
            "alpha_merge": getattr(self, "alpha_merge", config.alpha_merge),
            "beta_merge": getattr(self, "beta_merge", config.beta_merge),
        }

    def forward(self, hidden_states, query, attention_mask, merge_size: int, return_details=False, **options):
        """`(rows, n, hidden)` states, `(rows, hidden)` queries -> `(rows, M, hidden)` memory and its mask."""
        unknown = sorted(set(options) - set(MIG_OPTIONS))
        if unknown:
            raise ValueError(f"Unknown MIG option(s) {unknown}; the options are {list(MIG_OPTIONS)}.")
        settings = {**self.settings(), **options}
        return mig_compress(hidden_states, query, merge_size, attention_mask, **settings, return_details=return_details)


class COMIPreTrainedModel(PreTrainedModel):
    config_class = COMIConfig
    config: COMIConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]
    # alpha/beta are scalars that training moves by small steps: keep them out of bf16/fp16.
    _keep_in_fp32_modules_strict = ["compressor"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, COMIMIGCompressor):
            for name, param in module.named_parameters(recurse=False):
                init.constant_(param, float(getattr(self.config, name)))
        elif module is getattr(self, "lsa", None) and isinstance(module, nn.Linear):
            # Without LSA layers the official model feeds the memory to the decoder unchanged:
            # start the alignment map from the identity.
            init.eye_(module.weight)
            init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, output_loading_info: bool = False, **kwargs):
        """Load a COMI checkpoint; weights missing from it, or left over, are an error, not a warning.

        Takes every argument of `PreTrainedModel.from_pretrained` (`dtype`, `device_map`,
        `attn_implementation`, Hub options, ...). To start from a plain decoder-only
        checkpoint, use [`~COMIForConditionalGeneration.from_backbone`].
        """
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        # A saved directory names its pipeline for `pipeline(model=directory)`; in memory the task
        # is registered by importing this code, and a `custom_pipelines` entry on the live config
        # would make `pipeline("comi-qa", model=model)` demand `trust_remote_code`.
        vars(model.config).pop("custom_pipelines", None)
        if getattr(getattr(model, "generation_config", None), "_from_model_config", False):
            # No generation_config.json (e.g. a converted checkpoint): the official settings.
            model.generation_config = official_generation_config(model.config)
        problems = loading_problems(
            loading_info.get("missing_keys", ()),
            loading_info.get("unexpected_keys", ()),
            [str(entry) for entry in loading_info.get("mismatched_keys", ())],
        )
        if problems:
            hint = ""
            if any(key.startswith("model.") for key in loading_info.get("unexpected_keys", ())):
                hint = " It looks like a plain decoder-only checkpoint: build COMI from it with `from_backbone`."
            raise ValueError(f"{pretrained_model_name_or_path} is not a matching COMI checkpoint: {problems}.{hint}")
        return (model, loading_info) if output_loading_info else model


class COMICompressionModel(COMIPreTrainedModel):
    """COMI's compression half: encoder → MIG compressor → LSA; contexts and queries in, memory out.

    Subclasses add the decoder side in `_add_decoder_side` (the whole decoder, or only its
    token embeddings); loaded alone, this class reads a COMI checkpoint's encoder, compressor and
    LSA and leaves the decoder's weights unread.
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: COMIConfig):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder_config())
        self.compressor = COMIMIGCompressor(config)
        if config.num_mem_fusion_layers > 0:
            self.lsa = AutoModel.from_config(config.lsa_config())
            # The LSA block reads memory vectors, never token ids (and so has no tensor-parallel
            # rule for an embedding table either).
            self.lsa.embed_tokens = None
            if self.lsa._tp_plan:
                self.lsa._tp_plan.pop("embed_tokens", None)
        else:
            hidden_size = config.text_config.hidden_size
            self.lsa = nn.Linear(hidden_size, hidden_size)
        self._add_decoder_side(config)
        self.post_init()

    def _add_decoder_side(self, config: COMIConfig) -> None:
        """Nothing here; the classes that answer or build prompts add their part of the decoder."""

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def encode_context(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> COMIContextEncoding:
        """Run the encoder over contexts once, to compress them against any number of queries.

        The encoder is causal and the query comes after the context, so the context's hidden
        states and key/value cache do not depend on the query: [`compress`] and `generate` with
        `context_encoding=` then run the encoder over the query tokens only.

        Args:
            input_ids: `(batch, context_len)` context token ids, padded on either side.
            attention_mask: `(batch, context_len)`, 1 for real tokens (`None`: all real).
        """
        rows = self._context_rows(input_ids, attention_mask)
        if not self._encoder_caches_whole_context():
            return rows
        rows.hidden_states, rows.key_values = self._encode_rows(
            rows.input_ids, rows.context_mask, rows_per_pass=rows.batch_size, use_cache=True
        )
        return rows

    def compress(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        merge_size: int | None = None,
        *,
        context_encoding: COMIContextEncoding | None = None,
        context_index: torch.LongTensor | None = None,
        return_details: bool = False,
        mig_options: dict | None = None,
    ):
        """Encode and compress contexts into aligned memory vectors, one set per query.

        Args:
            input_ids: `(batch, context_len)` context token ids, padded on either side.
            attention_mask: `(batch, context_len)`, 1 for real context tokens (`None`: all real).
            query_ids: `(queries, query_len)` query token ids, padded on either side.
            query_attention_mask: `(queries, query_len)`, 1 for real query tokens (`None`: all real).
            merge_size: overrides `config.merge_size` for this call.
            context_encoding: contexts already encoded by [`encode_context`] (instead of `input_ids`).
            context_index: `(queries,)` which context each query is about. Defaults to one query
                per context, or every query about the only context.
            return_details: also return a [`COMICompressionDetails`] (which memory vector each
                context token went into, with which weight).
            mig_options: MIG settings for this call only, e.g. `{"coarse_redundancy": False}`
                (names in `MIG_OPTIONS`; the config's settings otherwise).

        Returns:
            `memory` `(queries, memory_len, hidden)` (LSA applied), each query's vectors first, and
            `memory_attention_mask` `(queries, memory_len)` bool (then the details, if asked for).
        """
        merge_size = self._resolve_merge_size(merge_size)
        if query_ids is None:
            raise ValueError("COMI compresses a context against a query: `query_ids` is missing.")
        query_mask = self._real_tokens(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
        _require_non_empty(query_mask, "query")
        if (context_encoding is None) == (input_ids is None):
            raise ValueError("Give the contexts as `input_ids` or as a `context_encoding` (one of them).")
        contexts = context_encoding or self._context_rows(input_ids, attention_mask)
        num_queries = query_ids.shape[0]
        context_index = resolve_context_index(context_index, contexts.batch_size, num_queries, query_ids.device)
        query, query_len = left_justify(query_ids.to(contexts.input_ids.device), query_mask)

        # One encoder row per (query, segment of its context).
        row_index, row_query = rows_for_queries(contexts.sample, context_index, contexts.batch_size)
        segment_mask = contexts.context_mask[row_index]
        row_query_ids, row_query_len = query[row_query], query_len[row_query]
        if contexts.key_values is not None:
            context_hidden = contexts.hidden_states[row_index]
            query_hidden, query_rows_mask = self._encode_queries_after(
                contexts.key_values, row_index, segment_mask, row_query_ids, row_query_len
            )
        else:
            ids, mask, segment_mask, query_rows_mask = concatenate_rows(
                contexts.input_ids[row_index], segment_mask, row_query_ids, row_query_len
            )
            context_hidden = query_hidden = self._encode_rows(ids, mask, rows_per_pass=num_queries)[0]

        # Mean of the query's hidden states, accumulated in float32 at least.
        query_weights = query_rows_mask.to(torch.promote_types(query_hidden.dtype, torch.float32))
        query_vector = torch.einsum("rt,rtd->rd", query_weights, query_hidden.to(query_weights.dtype))
        query_vector = query_vector / query_weights.sum(1, keepdim=True)
        memory, memory_mask, *details = self._mig(
            context_hidden, query_vector, segment_mask, merge_size, return_details, row_query, mig_options or {}
        )
        memory = self._align(memory, memory_mask)
        sample_memory, sample_mask = rows_to_samples(memory, memory_mask, row_query, num_queries)
        if not return_details:
            return sample_memory, sample_mask
        details = details_per_query(
            details[0], memory_mask, segment_mask, contexts, row_index, row_query, context_index
        )
        return sample_memory, sample_mask, details

    def _mig(self, hidden, query_vector, segment_mask, merge_size, return_details, row_query, options):
        try:
            return self.compressor(
                hidden, query_vector, segment_mask, merge_size, return_details=return_details, **options
            )
        except NonFiniteInputError as error:
            queries = sorted({int(row_query[row]) for row in error.rows})
            raise NonFiniteInputError(
                f"The encoder's hidden states hold NaN or inf for query(s) {queries} (encoder in "
                f"{hidden.dtype}; in half precision it can overflow: try float32 or bfloat16).",
                queries,
            ) from error

    def _context_rows(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> COMIContextEncoding:
        context_mask = self._real_tokens(input_ids, attention_mask, "input_ids", "attention_mask")
        _require_non_empty(context_mask, "context")
        return segment_contexts(input_ids, context_mask, self.config.segment_size)

    def _real_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None, ids_name: str, mask_name: str):
        return _real_token_mask(ids, mask, ids_name, mask_name, self.get_input_embeddings().num_embeddings)

    def _encode_rows(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows_per_pass: int, use_cache: bool = False
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Encoder over right-padded rows, at most `rows_per_pass` at a time.

        Like the official code, which encodes one segment of every context per pass, this keeps
        the encoder's working memory at one segment per sample however long the contexts are.
        Rows go longest first and each pass is cut to its longest row, so little padding is
        encoded; on the CPU a pass holds rows of one length only, because attention with a
        padding mask costs more there than batching rows gains (docs/performance.md). Rows are
        right-padded and the encoder is causal, so a row's result does not depend on its pass.
        Returns the last hidden states `(rows, len, hidden)` and, with `use_cache`, the key/value
        cache of every layer, `(rows, kv_heads, len, head_dim)` each.
        """
        num_rows, width = input_ids.shape
        lengths = attention_mask.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        sorted_lengths = lengths[order].tolist()
        # Where the encoder runs (inputs may sit elsewhere when accelerate dispatches the model).
        same_length_only = self.encoder.get_input_embeddings().weight.device.type == "cpu"
        hidden, key_values, start = None, None, 0
        while start < num_rows:
            end = start + 1
            while (
                end < num_rows
                and end - start < rows_per_pass
                and (not same_length_only or sorted_lengths[end] == sorted_lengths[start])
            ):
                end += 1
            rows, length = order[start:end], sorted_lengths[start]
            output = self.encoder(
                input_ids=input_ids[rows, :length],
                attention_mask=attention_mask[rows, :length].long(),
                use_cache=use_cache,
            )
            layers = output.cache.layers if use_cache else []
            if end - start == num_rows and length == width and bool((order[1:] > order[:-1]).all()):
                # One pass over every row in its own order, no padding column: nothing to place.
                return output.last_hidden_state, [(layer.keys, layer.values) for layer in layers] if use_cache else None
            if hidden is None:
                hidden = output.last_hidden_state.new_zeros(num_rows, width, output.last_hidden_state.shape[-1])
                key_values = [_placed_like(layer, num_rows, width) for layer in layers] if use_cache else None
            hidden[rows, :length] = output.last_hidden_state
            for (keys, values), layer in zip(key_values or [], layers, strict=True):
                keys[rows, :, :length] = layer.keys
                values[rows, :, :length] = layer.values
            start = end
        return hidden, key_values

    def _encoder_caches_whole_context(self) -> bool:
        # Sliding-window layers keep only the last tokens of a (right-padded) row in their
        # cache, so for such encoders the context is encoded again with each query.
        return not any(layer.is_sliding for layer in DynamicCache(config=self.encoder.config).layers)

    def _encode_queries_after(
        self,
        key_values: list[tuple[torch.Tensor, torch.Tensor]],
        row_index: torch.Tensor,
        segment_mask: torch.Tensor,
        query_ids: torch.Tensor,
        query_len: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder pass over the query tokens only, attending to each row's cached context."""
        cache = DynamicCache(ddp_cache_data=[(keys[row_index], values[row_index]) for keys, values in key_values])
        position = torch.arange(query_ids.shape[1], device=query_ids.device)
        query_mask = position[None, :] < query_len[:, None]
        output = self.encoder(
            input_ids=query_ids.masked_fill(~query_mask, 0),
            attention_mask=torch.cat([segment_mask, query_mask], dim=1).long(),
            position_ids=segment_mask.sum(1, keepdim=True) + position[None, :],
            cache=cache,
            use_cache=True,
        )
        return output.last_hidden_state, query_mask

    def _align(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """LSA over each segment's memory vectors (right-padded, so positions start at 0)."""
        if isinstance(self.lsa, nn.Linear):
            return self.lsa(memory)
        return self.lsa(inputs_embeds=memory, attention_mask=memory_mask.long(), use_cache=False).last_hidden_state

    def _resolve_merge_size(self, merge_size: int | None) -> int:
        if merge_size is not None:
            return check_merge_size(merge_size)
        if self.training and self.config.merge_sizes:
            return draw_merge_size(self.config.merge_sizes)
        return self.config.merge_size


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
        its first `num_mem_fusion_layers` layers plus its final norm (SPEC §1).

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
        backbone_config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        if getattr(backbone_config, "model_type", None) == COMIConfig.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} is already a COMI model: load it with "
                "`COMIForConditionalGeneration.from_pretrained`."
            )
        config = COMIConfig(text_config=backbone_config, **config_overrides)
        # A backbone checkpoint lacks the encoder and LSA weights by nature, which transformers
        # would report as missing at length; drop that report and check the loading here instead.
        report_logger = hf_logging.get_logger("transformers.modeling_utils")
        report_logger.addFilter(_drop_loading_report)
        try:
            # transformers' own loading, not COMI's (which refuses the missing encoder and LSA).
            model, loading_info = super(COMIPreTrainedModel, cls).from_pretrained(
                pretrained_model_name_or_path,
                config=config,
                key_mapping=_BACKBONE_KEY_MAPPING,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                dtype=dtype,
                device_map=device_map,
                attn_implementation=attn_implementation,
                **hub,
            )
        finally:
            report_logger.removeFilter(_drop_loading_report)
        problems = loading_problems(
            [key for key in loading_info.get("missing_keys", ()) if not _NOT_IN_BACKBONE.match(key)],
            loading_info.get("unexpected_keys", ()),
            [str(entry) for entry in loading_info.get("mismatched_keys", ())],
        )
        if problems:
            raise ValueError(f"{pretrained_model_name_or_path} does not match its own config as a backbone: {problems}")
        # transformers remembers the key mapping used to load and reverts it on save; this model
        # must save in its own layout (decoder.*, encoder.*), like one built from scratch.
        vars(model).pop("_weight_conversions", None)
        # The alpha/beta weights are new, and transformers applies `_keep_in_fp32_modules_strict`
        # only to weights found in the checkpoint.
        model.compressor.float()
        model.copy_backbone_into_encoder_and_lsa()
        model.generation_config = official_generation_config(model.config)
        return model

    @torch.no_grad()
    def copy_backbone_into_encoder_and_lsa(self) -> None:
        """(Re)initialise the encoder and the LSA block from the decoder's weights (SPEC §1)."""
        source = dict(self.decoder.get_decoder().state_dict(keep_vars=True))
        targets = [self.encoder] + ([self.lsa] if self.config.num_mem_fusion_layers > 0 else [])
        for target in targets:
            for name, tensor in target.state_dict(keep_vars=True).items():
                if name not in source:
                    raise KeyError(f"The backbone has no `{name}` to initialise the {type(target).__name__} from.")
                # Under DeepSpeed ZeRO-3 (`zero.Init`, which `from_pretrained` enters whenever a ZeRO-3
                # config is active) each process holds an empty shard: gather the pair, copy, and let
                # rank 0's copy be re-partitioned. Gathered one pair at a time, never the whole model.
                with _gathered([source[name], tensor]):
                    if source[name].is_meta or tensor.is_meta:
                        raise RuntimeError(
                            "Cannot copy the backbone into the encoder while weights are offloaded (meta device); "
                            "load without CPU/disk offload, save, then use `from_pretrained`."
                        )
                    tensor.data.copy_(source[name].data.to(device=tensor.device, dtype=tensor.dtype))

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
        memory, memory_mask, query_mask = self._memory_and_query(
            input_ids, attention_mask, query_ids, query_attention_mask, merge_size, memory
        )
        if labels is not None:
            if (
                not isinstance(labels, torch.Tensor)
                or labels.dim() != 2
                or labels.dtype not in (torch.long, torch.int)
                or labels.shape[0] != query_ids.shape[0]
            ):
                raise ValueError(
                    f"`labels` must be a ({query_ids.shape[0]}, answer_len) tensor of token ids (-100 on padding), "
                    f"got {_describe(labels)}."
                )
            _check_vocabulary(labels[labels != -100], "labels", self.get_input_embeddings().num_embeddings)
        inputs_embeds, decoder_mask, decoder_labels = decoder_inputs(
            self.get_input_embeddings(), memory, memory_mask, query_ids, query_mask, labels
        )
        self._warn_past_positions(inputs_embeds.shape[1])
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

    def _memory_and_query(
        self, input_ids, attention_mask, query_ids, query_attention_mask, merge_size, memory, **compress_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The memory (compressed here, or given) and the query's real-token mask."""
        has_context = input_ids is not None or compress_kwargs.get("context_encoding") is not None
        if query_ids is None or (memory is None and not has_context):
            raise ValueError(
                "COMI needs a context (`input_ids`, `context_encoding` or `memory`) and a query (`query_ids`)."
            )
        if memory is None:
            memory, memory_mask = self.compress(
                input_ids, attention_mask, query_ids, query_attention_mask, merge_size, **compress_kwargs
            )
        elif has_context or merge_size is not None:
            raise ValueError(
                "Give the contexts as `input_ids` or `context_encoding` (and `merge_size`) or as compressed "
                "`memory`, not both."
            )
        else:
            memory, memory_mask = _check_memory(memory, query_ids.shape[0])
        query_mask = self._real_tokens(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
        return memory, memory_mask, query_mask

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
                raise ValueError("Pass either text (`context=`, `query=`) or token ids, not both.")
            input_ids, attention_mask, query_ids, query_attention_mask = _tokenize_text(context, query, tokenizer)
        memory, memory_mask, query_mask = self._memory_and_query(
            input_ids,
            attention_mask,
            query_ids,
            query_attention_mask,
            merge_size,
            memory,
            **({"context_encoding": context_encoding} if context_encoding is not None else {}),
            **({"context_index": context_index} if context_index is not None else {}),
        )
        inputs_embeds, decoder_mask, _ = decoder_inputs(
            self.get_input_embeddings(), memory, memory_mask, query_ids, query_mask, left_pad=True
        )
        generation_config, processors, generate_kwargs = self._generation_settings(
            generation_config, logits_processor, kwargs, inputs_embeds.shape[1]
        )
        # The decoder fills unset generation values from its own generation config: make it ours.
        self.decoder.generation_config = self.generation_config
        return self.decoder.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=decoder_mask.long(),
            generation_config=generation_config,
            logits_processor=processors,
            **generate_kwargs,
        )

    def _generation_settings(self, generation_config, logits_processor, kwargs: dict, prompt_len: int):
        """Resolve the settings as `generate` does (call arguments > the given config > the
        model's), so that the repetition penalty in force is known here."""
        generation_config = copy.deepcopy(
            generation_config if generation_config is not None else self.generation_config
        )
        generation_config.update(**self.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
        generate_kwargs = generation_config.update(**kwargs)
        new_tokens = generation_config.max_new_tokens
        if new_tokens is None:
            new_tokens = max(generation_config.max_length - prompt_len, 0)
        self._warn_past_positions(prompt_len, new_tokens)
        processors = LogitsProcessorList(logits_processor or [])
        penalty = generation_config.repetition_penalty
        # `generate` skips each sample's left-padding length of the token history when it
        # applies this penalty; with an embeddings prompt that history holds only new tokens,
        # so padded samples would escape it. Apply it here, over all of them, and keep the
        # decoder from adding its own.
        generation_config.repetition_penalty = 1.0
        if penalty is not None and penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty))
        return generation_config, processors, generate_kwargs

    def export_decoder(self, save_directory: str | os.PathLike, tokenizer=None) -> None:
        """Save the decoder alone as a causal-LM directory that vLLM serves unchanged.

        Writes the decoder's config and weights (safetensors), a generation config with this
        model's EOS and length settings, and `tokenizer` if given. vLLM then decodes COMI's
        `[memory ; query]` inputs sent as prompt embeddings (see `COMIPromptEncoder`). The
        repetition penalty is left out of that generation config: vLLM's own penalty also counts
        placeholder prompt ids for prompt embeddings, and `comi_hf`'s clients send the penalty to
        comi_hf's vLLM logits processor instead.
        """
        lora = [name for name, _ in self.decoder.named_parameters() if "lora_" in name]
        if lora:
            raise ValueError(f"The decoder still holds LoRA adapters ({lora[0]}, ...): merge them first.")
        dtype = self.decoder.get_input_embeddings().weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"vLLM serves float32, float16 or bfloat16 weights, not {dtype}: convert the model first.")
        text_config = self.decoder.config
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        if head_dim < 32:
            logger.warning(
                "The decoder's head_dim is %d: vLLM's CPU attention backend refuses head dims below 32 "
                "(GPU backends may serve it).",
                head_dim,
            )
        self.decoder.save_pretrained(save_directory)
        settings = self.generation_config
        GenerationConfig(
            do_sample=bool(settings.do_sample),
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=settings.eos_token_id,
            pad_token_id=settings.pad_token_id,
            bos_token_id=settings.bos_token_id,
        ).save_pretrained(save_directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)

    def _warn_past_positions(self, decoder_len: int, new_tokens: int = 0) -> None:
        """Warn (once per model) when the decoder reads more positions than it was trained for."""
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        if limit is None or decoder_len + new_tokens <= limit or getattr(self, "_warned_past_positions", False):
            return
        self._warned_past_positions = True
        logger.warning(
            "The decoder reads %d positions (memory vectors and query%s), more than its max_position_embeddings "
            "(%d): its answers past that length are unreliable. Compress more (a larger merge_size) or truncate "
            "the context.",
            decoder_len + new_tokens,
            f", and up to {new_tokens} new tokens" if new_tokens else "",
            limit,
        )

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
        text_config = config.get_text_config()
        self.embed_tokens = nn.Embedding(text_config.vocab_size, text_config.hidden_size)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.get("config")
        if not isinstance(config, COMIConfig):
            config = COMIConfig.from_pretrained(pretrained_model_name_or_path, **_hub_subset(kwargs))
        with torch.device("meta"):
            decoder = AutoModelForCausalLM.from_config(config.get_text_config())
        table = next(name for name, module in decoder.named_modules() if module is decoder.get_input_embeddings())
        key_mapping = {rf"^decoder\.{re.escape(table)}\.": "embed_tokens.", **kwargs.pop("key_mapping", {})}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, key_mapping=key_mapping, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # The settings answers are generated with (elsewhere): the saved ones, else the official ones.
        try:
            model.generation_config = GenerationConfig.from_pretrained(
                pretrained_model_name_or_path, **_hub_subset(kwargs)
            )
        except OSError:
            model.generation_config = official_generation_config(model.config)
        return loaded

    @torch.no_grad()
    def prompt_embeds(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_ids: torch.LongTensor | None = None,
        query_attention_mask: torch.Tensor | None = None,
        merge_size: int | None = None,
        **compress_kwargs,
    ) -> list[torch.Tensor]:
        """Each query's decoder input `[memory ; query]`, `(memory_len + query_len, hidden)`, unpadded.

        Takes [`compress`]'s arguments (`context_encoding=`, `context_index=`, ...).
        """
        memory, memory_mask = self.compress(
            input_ids, attention_mask, query_ids, query_attention_mask, merge_size, **compress_kwargs
        )
        query_mask = self._real_tokens(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
        embeds, mask, _ = decoder_inputs(self.embed_tokens, memory, memory_mask, query_ids, query_mask)
        return [row[row_mask] for row, row_mask in zip(embeds, mask, strict=True)]


# ---------------------------------------------------------------------- helpers
_HUB_OPTIONS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "force_download")


def _hub_subset(kwargs: dict) -> dict:
    return {name: kwargs[name] for name in _HUB_OPTIONS if name in kwargs}


def _drop_loading_report(record: logging.LogRecord) -> bool:
    return record.funcName != "log_state_dict_report"


def loading_problems(missing, unexpected, mismatched) -> str:
    """What went wrong loading weights, in one line (at most 10 keys of each kind), or ``""``."""
    problems = []
    for what, keys in (("missing weights", missing), ("unexpected weights", unexpected), ("wrong shapes", mismatched)):
        keys = sorted(keys)
        if keys:
            more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
            problems.append(f"{what}: {', '.join(keys[:10])}{more}")
    return "; ".join(problems)


def _gathered(tensors: list[torch.Tensor]):
    """DeepSpeed ZeRO-3's `GatheredParameters` over `tensors` where any is a partitioned parameter
    (changes made on rank 0 are kept), else a no-op context."""
    partitioned = [tensor for tensor in tensors if hasattr(tensor, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def _placed_like(layer, num_rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros for every row's keys and values of a cache layer, `width` positions long."""
    keys, values = layer.keys, layer.values
    return (
        keys.new_zeros(num_rows, keys.shape[1], width, *keys.shape[3:]),
        values.new_zeros(num_rows, values.shape[1], width, *values.shape[3:]),
    )


def _real_token_mask(
    ids: torch.Tensor, mask: torch.Tensor | None, ids_name: str, mask_name: str, vocab_size: int
) -> torch.Tensor:
    """The `(batch, len)` bool mask of real tokens, with `ids` checked: a batch of token ids
    below `vocab_size` wherever the mask is set (padding may hold any id)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"`{ids_name}` must be a (batch, length) tensor of token ids, got {_describe(ids)}.")
    if ids.shape[0] == 0:
        raise ValueError(f"`{ids_name}` is an empty batch.")
    if mask is None:
        real = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ValueError(
            f"`{mask_name}` must have the shape of `{ids_name}` {tuple(ids.shape)}, got {_describe(mask)}."
        )
    else:
        real = mask.to(ids.device) != 0
    _check_vocabulary(ids[real], ids_name, vocab_size)
    return real


def _check_vocabulary(ids: torch.Tensor, name: str, vocab_size: int) -> None:
    outside = (ids < 0) | (ids >= vocab_size)
    if bool(outside.any()):
        examples = ids[outside].unique()[:5].tolist()
        raise ValueError(
            f"`{name}` holds token ids outside the model's vocabulary of {vocab_size} (e.g. {examples}); "
            "were they made with another tokenizer?"
        )


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
        raise ValueError(
            f"`memory` must be the `(memory, memory_attention_mask)` pair `compress` gives, "
            f"`({num_queries}, memory_len, hidden)` and `({num_queries}, memory_len)` for {num_queries} queries; "
            f"got {_describe(memory)}."
        )
    return vectors, mask.bool()


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {', '.join(_describe(item) for item in value)}"
    return f"a {type(value).__name__}"


def _require_non_empty(mask: torch.Tensor, what: str) -> None:
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"Empty {what} (no real tokens) for sample(s) {empty}; COMI needs at least one {what} token.")


def _tokenize_text(context, query, tokenizer):
    """Token ids and masks of context and query texts (either may be `None`: then `None`s)."""
    if tokenizer is None:
        raise ValueError("Text input (`context=`, `query=`) needs `tokenizer=`.")
    encoded = []
    for name, text in (("context", context), ("query", query)):
        if text is None:
            encoded.append((None, None))
            continue
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(item, str) for item in texts):
            raise TypeError(f"`{name}` must be a string or a non-empty list of strings, got {text!r:.80}.")
        empty = [i for i, item in enumerate(texts) if not item.strip()]
        if empty:
            raise ValueError(f"Empty {name} text at position(s) {empty}.")
        encoded.append(encode_texts(tokenizer, texts))
    (context_ids, context_mask), (query_ids, query_mask) = encoded
    return context_ids, context_mask, query_ids, query_mask


COMIForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
