"""COMI: query-aware context compression with marginal information gain, as a transformers model.

context ids ─┐
             ├─► encoder (first K backbone layers + final norm) ─► hidden states
query ids ───┘                                                      │
                              mean of the query's hidden states ─► MIG compression
                                                                    │ memory vectors
                                                 LSA (backbone layers + norm, or Linear)
                                                                    │
decoder (the full backbone) reads [memory ; query embeddings ; answer embeddings]
"""

from __future__ import annotations

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

from .configuration_comi import COMIConfig
from .mig import MIGDetails, NonFiniteInputError, mig_compress
from .pipeline_comi import custom_pipelines_entry, encode_texts

__all__ = [
    "COMICompressionDetails",
    "COMIContextEncoding",
    "COMIForConditionalGeneration",
    "COMIOutput",
    "COMIPreTrainedModel",
    "official_generation_config",
]

logger = hf_logging.get_logger(__name__)

# Where a plain decoder-only checkpoint's weights go inside COMI (they fill the decoder;
# the encoder and the LSA block are then copied from it).
_BACKBONE_KEY_MAPPING = {r"^model\.": "decoder.model.", r"^lm_head\.": "decoder.lm_head."}
# Parts of COMI that a plain backbone checkpoint cannot contain.
_NOT_IN_BACKBONE = re.compile(r"^(encoder|lsa|compressor)\.")


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
    """Holds the MIG switches and the alpha/beta weights and calls [`mig_compress`].

    The weights are parameters when the config makes them learnable, plain floats otherwise.
    """

    def __init__(self, config: COMIConfig):
        super().__init__()
        for stage, learnable in (
            ("select", config.learnable_select_weights),
            ("merge", config.learnable_merge_weights),
        ):
            if learnable:
                for weight in ("alpha", "beta"):
                    name = f"{weight}_{stage}"
                    setattr(self, name, nn.Parameter(torch.tensor(float(getattr(config, name)))))
        self.read_config(config)

    def read_config(self, config: COMIConfig) -> None:
        """Take the stage switches and the fixed (not learnable) weights from `config`."""
        self.coarse = config.coarse_grained
        self.fine = config.fine_grained
        self.coarse_redundancy = config.coarse_redundancy
        self.fine_redundancy = config.fine_redundancy
        for name in ("alpha_select", "beta_select", "alpha_merge", "beta_merge"):
            if not isinstance(getattr(self, name, None), nn.Parameter):
                setattr(self, name, float(getattr(config, name)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        attention_mask: torch.Tensor,
        merge_size: int,
        return_details: bool = False,
    ):
        """`(rows, n, hidden)` states, `(rows, hidden)` queries -> `(rows, M, hidden)` memory and its mask."""
        return mig_compress(
            hidden_states,
            query,
            merge_size,
            attention_mask,
            coarse=self.coarse,
            fine=self.fine,
            coarse_redundancy=self.coarse_redundancy,
            fine_redundancy=self.fine_redundancy,
            alpha_select=self.alpha_select,
            beta_select=self.beta_select,
            alpha_merge=self.alpha_merge,
            beta_merge=self.beta_merge,
            return_details=return_details,
        )


class COMIPreTrainedModel(PreTrainedModel):
    config_class = COMIConfig
    config: COMIConfig
    base_model_prefix = "comi"
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


class COMIForConditionalGeneration(COMIPreTrainedModel, GenerationMixin):
    """COMI: encoder → MIG compressor → LSA → decoder.

    Build one from a decoder-only backbone with [`~COMIForConditionalGeneration.from_backbone`],
    load a COMI checkpoint with `from_pretrained`, and answer with [`~COMIForConditionalGeneration.generate`].
    """

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
        self.decoder = AutoModelForCausalLM.from_config(config.text_config)
        # `labels` hold the answer alone, and every answer token is predicted (the first from the
        # query's last position): not a causal-LM loss over the labels' own sequence. This tells
        # `Trainer` to count every label, not `labels[..., 1:]`, when it normalises the loss.
        self.loss_type = None
        self.post_init()
        self.generation_config = official_generation_config(config)

    # ------------------------------------------------------------------ embeddings
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

    # ------------------------------------------------------------------ building
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
        hub_kwargs = {
            "revision": revision,
            "token": token,
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
            "trust_remote_code": trust_remote_code,
        }
        backbone_config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
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
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path,
                config=config,
                key_mapping=_BACKBONE_KEY_MAPPING,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                dtype=dtype,
                device_map=device_map,
                attn_implementation=attn_implementation,
                **hub_kwargs,
            )
        finally:
            report_logger.removeFilter(_drop_loading_report)
        _check_backbone_loading(pretrained_model_name_or_path, loading_info)
        # transformers remembers the key mapping used to load and reverts it on save; this model
        # must save in its own layout (decoder.*, encoder.*), like one built from scratch.
        vars(model).pop("_weight_conversions", None)
        # The alpha/beta weights are new, and transformers applies `_keep_in_fp32_modules_strict`
        # only to weights found in the checkpoint.
        model.compressor.float()
        model.copy_backbone_into_encoder_and_lsa()
        model.generation_config = official_generation_config(model.config)
        return model

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
        if getattr(model.generation_config, "_from_model_config", False):
            # No generation_config.json (e.g. a converted checkpoint): the official settings.
            model.generation_config = official_generation_config(model.config)
        problems = _loading_problems(loading_info)
        if problems:
            hint = ""
            if any(key.startswith("model.") for key in loading_info.get("unexpected_keys", ())):
                hint = " It looks like a plain decoder-only checkpoint: build COMI from it with `from_backbone`."
            raise ValueError(f"{pretrained_model_name_or_path} is not a matching COMI checkpoint: {problems}.{hint}")
        return (model, loading_info) if output_loading_info else model

    @torch.no_grad()
    def copy_backbone_into_encoder_and_lsa(self) -> None:
        """(Re)initialise the encoder and the LSA block from the decoder's weights (SPEC §1)."""
        backbone = self.decoder.get_decoder()
        source = dict(backbone.state_dict())
        targets = [self.encoder] + ([self.lsa] if self.config.num_mem_fusion_layers > 0 else [])
        for target in targets:
            for name, tensor in target.state_dict().items():
                if name not in source:
                    raise KeyError(f"The backbone has no `{name}` to initialise the {type(target).__name__} from.")
                if source[name].is_meta or tensor.is_meta:
                    raise RuntimeError(
                        "Cannot copy the backbone into the encoder while weights are offloaded (meta device); "
                        "load without CPU/disk offload, save, then use `from_pretrained`."
                    )
                tensor.copy_(source[name].to(device=tensor.device, dtype=tensor.dtype))

    # ------------------------------------------------------------------ compression
    def encode_context(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> COMIContextEncoding:
        """Run the encoder over contexts once, to compress them against any number of queries.

        The encoder is causal and the query comes after the context, so the context's hidden
        states and key/value cache do not depend on the query: [`compress`] and [`generate`]
        with `context_encoding=` then run the encoder over the query tokens only.

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

        Returns:
            `memory` `(queries, memory_len, hidden)` in the decoder's dtype (LSA applied), each
            query's vectors first, and `memory_attention_mask` `(queries, memory_len)` bool
            (then the details, if asked for).
        """
        merge_size = self._resolve_merge_size(merge_size)
        if query_ids is None:
            raise ValueError("COMI compresses a context against a query: `query_ids` is missing.")
        query_mask = self._real_tokens(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
        _require_non_empty(query_mask, "query")
        if context_encoding is None:
            if input_ids is None:
                raise ValueError("Give the contexts as `input_ids` or as a `context_encoding`.")
            contexts = self._context_rows(input_ids, attention_mask)
        elif input_ids is not None:
            raise ValueError("Give the contexts as `input_ids` or as a `context_encoding`, not both.")
        else:
            contexts = context_encoding
        num_queries = query_ids.shape[0]
        context_index = _context_index(context_index, contexts.batch_size, num_queries, query_ids.device)
        query, query_len = _left_justify(query_ids.to(contexts.input_ids.device), query_mask)

        # One encoder row per (query, segment of its context).
        row_index, row_query = _rows_for_queries(contexts.sample, context_index, contexts.batch_size)
        segment_ids = contexts.input_ids[row_index]
        segment_mask = contexts.context_mask[row_index]
        row_query_ids, row_query_len = query[row_query], query_len[row_query]
        if contexts.key_values is not None:
            context_hidden = contexts.hidden_states[row_index]
            query_hidden, query_rows_mask = self._encode_queries_after(
                contexts.key_values, row_index, segment_mask, row_query_ids, row_query_len
            )
        else:
            ids, mask, segment_mask, query_rows_mask = _concatenate_rows(
                segment_ids, segment_mask, row_query_ids, row_query_len
            )
            context_hidden = query_hidden = self._encode_rows(ids, mask, rows_per_pass=num_queries)[0]

        # Mean of the query's hidden states, accumulated in float32 at least.
        query_weights = query_rows_mask.to(torch.promote_types(query_hidden.dtype, torch.float32))
        query_vector = torch.einsum("rt,rtd->rd", query_weights, query_hidden.to(query_weights.dtype))
        query_vector = query_vector / query_weights.sum(1, keepdim=True)
        try:
            memory, memory_mask, *details = self.compressor(
                context_hidden, query_vector, segment_mask, merge_size, return_details=return_details
            )
        except NonFiniteInputError as error:
            queries = sorted({int(row_query[row]) for row in error.rows})
            raise NonFiniteInputError(
                f"The encoder's hidden states hold NaN or inf for query(s) {queries} (encoder in "
                f"{context_hidden.dtype}; in half precision it can overflow: try float32 or bfloat16).",
                queries,
            ) from error
        memory = self._align(memory, memory_mask)
        sample_memory, sample_mask = _rows_to_samples(memory, memory_mask, row_query, num_queries)
        sample_memory = sample_memory.to(self.get_input_embeddings().weight.dtype)
        if not return_details:
            return sample_memory, sample_mask
        return (
            sample_memory,
            sample_mask,
            _details_per_query(details[0], memory_mask, segment_mask, contexts, row_index, row_query, context_index),
        )

    def _context_rows(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> COMIContextEncoding:
        context_mask = self._real_tokens(input_ids, attention_mask, "input_ids", "attention_mask")
        _require_non_empty(context_mask, "context")
        return _segment_contexts(input_ids, context_mask, self.config.segment_size)

    def _real_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None, ids_name: str, mask_name: str) -> torch.Tensor:
        vocab_size = self.get_input_embeddings().num_embeddings
        return _real_token_mask(ids, mask, ids_name, mask_name, vocab_size)

    def _encode_rows(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows_per_pass: int, use_cache: bool = False
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Encoder over right-padded rows, at most `rows_per_pass` at a time.

        Like the official code, which encodes one segment of every context per pass, this keeps
        the encoder's working memory at one segment per sample however long the contexts are.
        Rows go longest first and each pass is cut to its longest row, so little padding is
        encoded; on the CPU a pass holds rows of one length only, because attention with a
        padding mask is about 3x slower there than without one and batching rows gains nothing.
        Rows are right-padded and the encoder is causal, so a row's result does not depend on
        its pass. Returns the last hidden states `(rows, len, hidden)` and, with `use_cache`, the
        key/value cache of every layer, `(rows, kv_heads, len, head_dim)` each.
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
            if end - start == num_rows and length == width and bool((order[1:] > order[:-1]).all()):
                # One pass over every row in its own order, no padding column: nothing to place.
                key_values = [(layer.keys, layer.values) for layer in output.cache.layers] if use_cache else None
                return output.last_hidden_state, key_values
            if hidden is None:
                hidden = output.last_hidden_state.new_zeros(num_rows, width, output.last_hidden_state.shape[-1])
            hidden[rows, :length] = output.last_hidden_state
            if use_cache:
                if key_values is None:
                    key_values = [
                        (
                            layer.keys.new_zeros(num_rows, *layer.keys.shape[1:2], width, *layer.keys.shape[3:]),
                            layer.values.new_zeros(num_rows, *layer.values.shape[1:2], width, *layer.values.shape[3:]),
                        )
                        for layer in output.cache.layers
                    ]
                for (keys, values), layer in zip(key_values, output.cache.layers, strict=True):
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
        if merge_size is None:
            if self.training and self.config.merge_sizes:
                choice = torch.randint(len(self.config.merge_sizes), ()).item()
                return self.config.merge_sizes[choice]
            return self.config.merge_size
        if isinstance(merge_size, bool) or not isinstance(merge_size, int) or merge_size < 1:
            raise ValueError(f"`merge_size` must be an integer >= 1, got {merge_size!r}.")
        return merge_size

    # ------------------------------------------------------------------ forward
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
        if (input_ids is None and memory is None) or query_ids is None:
            raise ValueError("COMI needs both a context (`input_ids` or `memory`) and a query (`query_ids`).")
        if memory is None:
            memory, memory_mask = self.compress(input_ids, attention_mask, query_ids, query_attention_mask, merge_size)
        elif input_ids is not None or merge_size is not None:
            raise ValueError("Give the contexts as `input_ids` (and `merge_size`) or as compressed `memory`, not both.")
        else:
            memory, memory_mask = _check_memory(memory, query_ids.shape[0])
        embed = self.get_input_embeddings()
        query_mask = self._real_tokens(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
        parts = [(memory, memory_mask), (embed(query_ids.masked_fill(~query_mask, 0)), query_mask)]
        label_parts = [
            (torch.full(memory_mask.shape, -100, device=memory.device), memory_mask),
            (torch.full(query_ids.shape, -100, device=memory.device), query_mask),
        ]
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
            answer_mask = labels != -100
            _check_vocabulary(labels[answer_mask], "labels", embed.num_embeddings)
            parts.append((embed(labels.masked_fill(~answer_mask, 0)), answer_mask))
            label_parts.append((labels, answer_mask))
        inputs_embeds, decoder_mask = _pack(parts, left_pad=False)
        decoder_labels = _pack(label_parts, left_pad=False, fill=-100)[0] if labels is not None else None
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

    # ------------------------------------------------------------------ generation
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
        has_context = input_ids is not None or context_encoding is not None or memory is not None
        if query_ids is None or not has_context:
            raise ValueError(
                "`generate` needs a context and a query: token ids (`input_ids`, `query_ids`) or text "
                "(`context=`, `query=`, `tokenizer=`)."
            )
        if memory is None:
            memory, memory_mask = self.compress(
                input_ids,
                attention_mask,
                query_ids,
                query_attention_mask,
                merge_size,
                context_encoding=context_encoding,
                context_index=context_index,
            )
        elif input_ids is not None or context_encoding is not None or merge_size is not None:
            raise ValueError(
                "Give the contexts as `input_ids` or `context_encoding` (and `merge_size`) or as compressed "
                "`memory`, not both."
            )
        else:
            memory, memory_mask = _check_memory(memory, query_ids.shape[0])
        query_mask = self._real_tokens(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
        query_embeds = self.get_input_embeddings()(query_ids.masked_fill(~query_mask, 0))
        inputs_embeds, decoder_mask = _pack([(memory, memory_mask), (query_embeds, query_mask)], left_pad=True)

        # Resolve the settings as `generate` does (call arguments > the given config > the
        # model's), so that the repetition penalty in force is known here.
        generation_config = copy.deepcopy(
            generation_config if generation_config is not None else self.generation_config
        )
        generation_config.update(**self.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
        generate_kwargs = generation_config.update(**kwargs)
        new_tokens = generation_config.max_new_tokens
        if new_tokens is None:
            new_tokens = max(generation_config.max_length - inputs_embeds.shape[1], 0)
        self._warn_past_positions(inputs_embeds.shape[1], new_tokens)
        processors = LogitsProcessorList(logits_processor or [])
        penalty = generation_config.repetition_penalty
        # `generate` skips each sample's left-padding length of the token history when it
        # applies this penalty; with an embeddings prompt that history holds only new tokens,
        # so padded samples would escape it. Apply it here, over all of them, and keep the
        # decoder from adding its own.
        generation_config.repetition_penalty = 1.0
        if penalty is not None and penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty))
        # The decoder fills unset generation values from its own generation config: make it ours.
        self.decoder.generation_config = self.generation_config
        return self.decoder.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=decoder_mask.long(),
            generation_config=generation_config,
            logits_processor=processors,
            **generate_kwargs,
        )

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

        The directory then loads with `AutoModel`/`AutoModelForCausalLM.from_pretrained(...,
        trust_remote_code=True)` and with `pipeline(model=directory, trust_remote_code=True)`
        (task `comi-qa` inferred) where `comi_hf` is not installed.
        """
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


# ---------------------------------------------------------------------- helpers
def _drop_loading_report(record: logging.LogRecord) -> bool:
    return record.funcName != "log_state_dict_report"


def _loading_problems(loading_info: dict, expected_missing: re.Pattern | None = None) -> str:
    """What a `from_pretrained` loading report says went wrong, or an empty string."""
    missing = sorted(
        key for key in loading_info.get("missing_keys", ()) if not (expected_missing and expected_missing.match(key))
    )
    unexpected = sorted(loading_info.get("unexpected_keys", ()))
    mismatched = [str(entry) for entry in loading_info.get("mismatched_keys", ())]
    problems = []
    for what, keys in (("missing weights", missing), ("unexpected weights", unexpected), ("wrong shapes", mismatched)):
        if keys:
            more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
            problems.append(f"{what}: {', '.join(keys[:10])}{more}")
    return "; ".join(problems)


def _check_backbone_loading(path: str | os.PathLike, loading_info: dict) -> None:
    problems = _loading_problems(loading_info, expected_missing=_NOT_IN_BACKBONE)
    if problems:
        raise ValueError(f"{path} does not match its own config as a decoder-only backbone: {problems}")


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
    """The `(memory, memory_attention_mask)` pair of [`COMIForConditionalGeneration.compress`], checked."""
    if not isinstance(memory, (tuple, list)) or len(memory) != 2:
        raise ValueError(
            f"`memory` must be the `(memory, memory_attention_mask)` pair `compress` gives, got {_describe(memory)}."
        )
    vectors, mask = memory
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
            f"got {_describe(vectors)} and {_describe(mask)}."
        )
    return vectors, mask.bool()


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
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


@dataclass
class COMIContextEncoding:
    """Contexts cut into segments (one row each) and, once encoded, their encoder outputs.

    Made by [`COMIForConditionalGeneration.encode_context`]; pass it as `context_encoding=` to
    `compress` or `generate` to ask any number of questions about the same contexts.
    """

    input_ids: torch.Tensor  # (rows, segment_len) segment token ids, right-padded
    context_mask: torch.Tensor  # (rows, segment_len) bool, real tokens
    sample: torch.Tensor  # (rows,) context of each row, non-decreasing
    segment_start: torch.Tensor  # (rows,) position of the segment's first token in its context
    context_lengths: torch.Tensor  # (batch,) real tokens per context
    hidden_states: torch.Tensor | None = None  # (rows, segment_len, hidden) encoder output
    key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # encoder cache, per layer

    @property
    def batch_size(self) -> int:
        return self.context_lengths.shape[0]


@dataclass
class COMICompressionDetails:
    """Where each context token went, per query: the material of explanations.

    Attributes:
        token_memory: `(queries, context_len)` index of the memory vector each context token
            (real tokens in order, left-justified) was fused into; -1 past the context's end.
        token_weight: `(queries, context_len)` the token's fusion weight inside its group.
        context_lengths: `(queries,)` real context tokens.
        memory_lengths: `(queries,)` memory vectors.
    """

    token_memory: torch.Tensor
    token_weight: torch.Tensor
    context_lengths: torch.Tensor
    memory_lengths: torch.Tensor


def _left_justify(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front, keeping their order; returns ids and lengths."""
    lengths = mask.sum(dim=1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return torch.gather(ids, 1, order), lengths


def _segment_contexts(input_ids: torch.Tensor, context_mask: torch.Tensor, segment_size: int) -> COMIContextEncoding:
    """One row per (context, segment of `segment_size` tokens), right-padded."""
    device = input_ids.device
    context, context_len = _left_justify(input_ids, context_mask)
    segments_per_sample = (context_len + segment_size - 1) // segment_size
    sample = torch.repeat_interleave(torch.arange(input_ids.shape[0], device=device), segments_per_sample)
    first_row = segments_per_sample.cumsum(0) - segments_per_sample
    segment_start = (torch.arange(sample.numel(), device=device) - first_row[sample]) * segment_size
    segment_len = (context_len[sample] - segment_start).clamp_max(segment_size)
    position = torch.arange(int(segment_len.max()), device=device)[None, :]
    in_segment = position < segment_len[:, None]
    index = (segment_start[:, None] + position).clamp_max(context.shape[1] - 1)
    return COMIContextEncoding(
        input_ids=context[sample[:, None], index].masked_fill(~in_segment, 0),
        context_mask=in_segment,
        sample=sample,
        segment_start=segment_start,
        context_lengths=context_len,
    )


def _context_index(
    context_index: torch.Tensor | None, num_contexts: int, num_queries: int, device: torch.device
) -> torch.Tensor:
    if context_index is None:
        if num_contexts == num_queries:
            return torch.arange(num_queries, device=device)
        if num_contexts == 1:
            return torch.zeros(num_queries, dtype=torch.long, device=device)
        raise ValueError(
            f"Got {num_contexts} contexts but `query_ids` holds {num_queries} queries; pass `context_index` "
            "to say which context each query is about."
        )
    context_index = torch.as_tensor(context_index, device=device)
    if context_index.shape != (num_queries,) or context_index.dtype not in (torch.long, torch.int):
        raise ValueError(f"`context_index` must hold one context index per query ({num_queries}).")
    if num_queries and (context_index.min() < 0 or context_index.max() >= num_contexts):
        raise ValueError(f"`context_index` must point at one of the {num_contexts} contexts.")
    return context_index.long()


def _rows_for_queries(
    row_sample: torch.Tensor, context_index: torch.Tensor, num_contexts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The context rows each query needs, in (query, segment) order: row indices and their query."""
    rows_per_context = torch.bincount(row_sample, minlength=num_contexts)
    first_row = rows_per_context.cumsum(0) - rows_per_context
    rows_per_query = rows_per_context[context_index]
    row_query = torch.repeat_interleave(torch.arange(context_index.numel(), device=row_sample.device), rows_per_query)
    first_of_query = rows_per_query.cumsum(0) - rows_per_query
    offset = torch.arange(row_query.numel(), device=row_sample.device) - first_of_query[row_query]
    return first_row[context_index[row_query]] + offset, row_query


def _concatenate_rows(
    segment_ids: torch.Tensor, segment_mask: torch.Tensor, query_ids: torch.Tensor, query_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[segment ; query]` rows, right-padded: ids, real-token mask, segment mask, query mask."""
    segment_len = segment_mask.sum(1)
    row_len = segment_len + query_len
    position = torch.arange(int(row_len.max()), device=segment_ids.device)[None, :]
    in_segment = position < segment_len[:, None]
    in_row = position < row_len[:, None]
    segment_index = position.clamp_max(segment_ids.shape[1] - 1).expand(segment_ids.shape[0], -1)
    query_index = (position - segment_len[:, None]).clamp(0, query_ids.shape[1] - 1)
    ids = torch.where(in_segment, segment_ids.gather(1, segment_index), query_ids.gather(1, query_index))
    return ids.masked_fill(~in_row, 0), in_row, in_segment, in_row & ~in_segment


def _details_per_query(
    row_details: MIGDetails,
    memory_mask: torch.Tensor,
    segment_mask: torch.Tensor,
    contexts: COMIContextEncoding,
    row_index: torch.Tensor,
    row_query: torch.Tensor,
    context_index: torch.Tensor,
) -> COMICompressionDetails:
    """Map the per-row compression details back onto each query's whole context."""
    num_queries = context_index.numel()
    context_lengths = contexts.context_lengths[context_index]
    memory_per_row = memory_mask.sum(1)
    memory_before_row = memory_per_row.cumsum(0) - memory_per_row
    memory_lengths = torch.zeros(num_queries, dtype=torch.long, device=row_query.device).index_add(
        0, row_query, memory_per_row
    )
    memory_before_query = memory_lengths.cumsum(0) - memory_lengths
    row_offset = memory_before_row - memory_before_query[row_query]
    row, position = segment_mask.nonzero(as_tuple=True)
    column = contexts.segment_start[row_index][row] + position
    width = int(context_lengths.max())
    token_memory = torch.full((num_queries, width), -1, dtype=torch.long, device=row.device)
    token_memory[row_query[row], column] = row_details.token_memory[row, position] + row_offset[row]
    token_weight = torch.zeros((num_queries, width), dtype=row_details.token_weight.dtype, device=row.device)
    token_weight[row_query[row], column] = row_details.token_weight[row, position]
    return COMICompressionDetails(token_memory, token_weight, context_lengths, memory_lengths)


def _rows_to_samples(
    values: torch.Tensor, mask: torch.Tensor, row_sample: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the real entries of each sample's rows, in row order: `(batch, total, ...)`, right-padded."""
    row, column = mask.nonzero(as_tuple=True)
    sample = row_sample[row]
    counts = torch.bincount(sample, minlength=batch_size)
    rank = torch.arange(sample.numel(), device=sample.device) - (counts.cumsum(0) - counts)[sample]
    out = values.new_zeros((batch_size, int(counts.max())) + tuple(values.shape[2:]))
    out = out.index_put((sample, rank), values[row, column])
    out_mask = torch.arange(out.shape[1], device=out.device)[None, :] < counts[:, None]
    return out, out_mask


def _pack(
    parts: list[tuple[torch.Tensor, torch.Tensor]], left_pad: bool, fill: float = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each sample's real entries of every part, without gaps.

    `parts` are `(values (batch, len_k, ...), mask (batch, len_k))`; the result is
    `(batch, total, ...)` padded with `fill` on the left (`left_pad`) or the right, and its mask.
    """
    lengths = [mask.sum(dim=1) for _, mask in parts]
    total = torch.stack(lengths).sum(0)
    width = int(total.max())
    first_values = parts[0][0]
    out = torch.full(
        (first_values.shape[0], width) + tuple(first_values.shape[2:]),
        fill,
        dtype=first_values.dtype,
        device=first_values.device,
    )
    offset = width - total if left_pad else torch.zeros_like(total)
    for (values, mask), length in zip(parts, lengths, strict=True):
        rank = mask.long().cumsum(dim=1) - 1
        sample, position = mask.nonzero(as_tuple=True)
        out = out.index_put((sample, offset[sample] + rank[sample, position]), values[sample, position].to(out.dtype))
        offset = offset + length
    start = (width - total) if left_pad else torch.zeros_like(total)
    column = torch.arange(width, device=out.device)[None, :]
    out_mask = (column >= start[:, None]) & (column < (start + total)[:, None])
    return out, out_mask


COMIForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
