"""COMI's compression half: encoder → MIG compressor → LSA, contexts and queries in, memory out.

context ids ─┐
             ├─► encoder (first K backbone layers + final norm) ─► hidden states
query ids ───┘                                                      │
                              mean of the query's hidden states ─► MIG compressor (mig.py)
                                                                    │ memory vectors
                                                 LSA (backbone layers + norm, or Linear)

[`COMICompressionModel`] holds these parts and their orchestration; the classes of
`modeling_comi.py` add the decoder (or only its token embeddings) on top.
"""

from __future__ import annotations

import math
import os
import re
import sys

import torch
from torch import nn
from transformers import AutoModel, DynamicCache
from transformers import initialization as init
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging as hf_logging
from transformers.utils.logging import tqdm

from .configuration_comi import COMIConfig, draw_merge_size
from .errors_comi import InvalidInputError, ModelLoadError, NonFiniteError
from .generation_comi import saved_generation_config
from .mig import mig_compress
from .packing import (
    COMIContextEncoding,
    concatenate_rows,
    details_per_query,
    left_justify,
    resolve_context_index,
    rows_for_queries,
    rows_to_samples,
    segment_contexts,
)
from .processing_comi import check_merge_size, real_token_mask

__all__ = [
    "MIG_OPTIONS",
    "COMICompressionModel",
    "COMIMIGCompressor",
    "COMIPreTrainedModel",
    "check_finite_weights",
    "loading_problems",
    "loading_report",
]

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


# The parts of COMI that a plain decoder-only (backbone) checkpoint cannot contain.
NOT_IN_BACKBONE = re.compile(r"^(encoder|lsa|compressor)\.")


def check_mig_options(options: object) -> dict:
    """Per-call MIG settings, checked: a dict of `MIG_OPTIONS`, the switches booleans, the weights
    finite numbers (or 0-d tensors, as learnt weights are)."""
    if not isinstance(options, dict):
        raise InvalidInputError(f"`mig_options` must be a dict, got {type(options).__name__}.", field="mig_options")
    unknown = sorted(set(options) - set(MIG_OPTIONS))
    if unknown:
        raise InvalidInputError(
            f"Unknown MIG option(s) {unknown}; the options are {list(MIG_OPTIONS)}.", field="mig_options"
        )
    for name, value in options.items():
        if name in MIG_OPTIONS[:4]:
            if not isinstance(value, bool):
                raise InvalidInputError(f"MIG option `{name}` must be True or False, got {value!r:.40}.", field=name)
            continue
        number = float(value) if isinstance(value, torch.Tensor) and value.dim() == 0 else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise InvalidInputError(f"MIG weight `{name}` must be a finite number, got {value!r:.40}.", field=name)
    return options


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
        settings = {**self.settings(), **check_mig_options(options)}
        return mig_compress(hidden_states, query, merge_size, attention_mask, **settings, return_details=return_details)


class COMIPreTrainedModel(PreTrainedModel):
    config_class = COMIConfig
    config: COMIConfig
    # A plain decoder-only checkpoint (`model.*`, `lm_head.*`) loads into COMI's decoder:
    # transformers adds this prefix to keys that only exist under it (`from_backbone`).
    base_model_prefix = "decoder"
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
            # start the LSA map from the identity.
            init.eye_(module.weight)
            init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, output_loading_info: bool = False, **kwargs):
        """Load a COMI checkpoint; weights missing from it, left over, or not finite are an error.

        Takes every argument of `PreTrainedModel.from_pretrained` (`dtype`, `device_map`,
        `attn_implementation`, Hub options, ...). The generation settings are the saved ones, or
        the official evaluation's where none were saved (a converted checkpoint). To start from a
        plain decoder-only checkpoint, use [`~COMIForConditionalGeneration.from_backbone`].
        """
        model, loading_info = cls.load_checked(pretrained_model_name_or_path, *args, **kwargs)
        model.generation_config = saved_generation_config(pretrained_model_name_or_path, kwargs, model.config)
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def load_checked(
        cls,
        pretrained_model_name_or_path,
        *args,
        expected_missing: re.Pattern | None = None,
        what: str = "a matching COMI checkpoint",
        **kwargs,
    ):
        """transformers' `from_pretrained`, then COMI's loading policy; returns the model and its loading info.

        Every weight of the model must come from the checkpoint (but those matching
        `expected_missing`: a backbone checkpoint has no encoder), every checkpoint weight must be
        used and match its shape, and every weight must be finite; otherwise a `ModelLoadError`
        says the source is not `what` and names the weights. `from_pretrained` and `from_backbone`
        load through here.
        """
        local = os.path.isdir(str(pretrained_model_name_or_path))
        if (
            local
            and kwargs.get("config") is None
            and not os.path.isfile(os.path.join(pretrained_model_name_or_path, "config.json"))
        ):
            # transformers would build the config's defaults (a 7B backbone) and then fail on the weights.
            raise ModelLoadError(f"{pretrained_model_name_or_path} has no config.json: it is not a model directory")
        # transformers would print its report of missing and unexpected weights at length; COMI's
        # policy below turns them into one error (or, for a backbone's missing encoder, none).
        report_logger = hf_logging.get_logger("transformers.modeling_utils")
        report_logger.addFilter(_drop_loading_report)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        finally:
            report_logger.removeFilter(_drop_loading_report)
        problems = loading_report(loading_info, expected_missing)
        if problems:
            hint = ""
            missing = loading_info.get("missing_keys", ())
            if missing and all(NOT_IN_BACKBONE.match(key) for key in missing):
                hint = " It looks like a plain decoder-only checkpoint: build COMI from it with `from_backbone`."
            raise ModelLoadError(f"{pretrained_model_name_or_path} is not {what}: {problems}.{hint}")
        check_finite_weights(model, pretrained_model_name_or_path)
        return model, loading_info


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
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, show_progress: bool = False
    ) -> COMIContextEncoding:
        """Run the encoder over contexts once, to compress them against any number of queries.

        The encoder is causal and the query comes after the context, so the context's hidden
        states and key/value cache do not depend on the query: [`compress`] and `generate` with
        `context_encoding=` then run the encoder over the query tokens only.

        Args:
            input_ids: `(batch, context_len)` context token ids, padded on either side.
            attention_mask: `(batch, context_len)`, 1 for real tokens (`None`: all real).
            show_progress: show a progress bar (on stderr) over the segments of long contexts.
        """
        rows = self._context_rows(input_ids, attention_mask)
        if not self._encoder_caches_whole_context():
            return rows
        rows.hidden_states, rows.key_values = self._encode_rows(
            rows.input_ids,
            rows.context_mask,
            rows_per_pass=rows.batch_size,
            use_cache=True,
            show_progress=show_progress,
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
            raise InvalidInputError(
                "COMI compresses a context against a query: `query_ids` is missing.", field="query_ids"
            )
        query_mask = self._real_tokens(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
        _require_non_empty(query_mask, "query")
        if (context_encoding is None) == (input_ids is None):
            raise InvalidInputError(
                "Give the contexts as `input_ids` or as a `context_encoding` (one of them).", field="input_ids"
            )
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
            context_hidden,
            query_vector,
            segment_mask,
            merge_size,
            return_details,
            row_query,
            check_mig_options({} if mig_options is None else mig_options),
        )
        memory = self._apply_lsa(memory, memory_mask)
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
        except NonFiniteError as error:
            queries = sorted({int(row_query[row]) for row in error.rows})
            raise NonFiniteError(
                f"The encoder's hidden states hold NaN or inf for query(s) {queries} (encoder in "
                f"{hidden.dtype}; in half precision it can overflow: try float32 or bfloat16).",
                queries,
            ) from error

    def _context_rows(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None) -> COMIContextEncoding:
        context_mask = self._real_tokens(input_ids, attention_mask, "input_ids", "attention_mask")
        _require_non_empty(context_mask, "context")
        return segment_contexts(input_ids, context_mask, self.config.segment_size)

    def _real_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None, ids_name: str, mask_name: str):
        return real_token_mask(ids, mask, ids_name, mask_name, self.get_input_embeddings().num_embeddings)

    def _encode_rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows_per_pass: int,
        use_cache: bool = False,
        show_progress: bool = False,
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
        bar = tqdm(
            total=num_rows, desc="Encoding", unit="segment", file=sys.stderr, disable=not show_progress or num_rows < 2
        )
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
            bar.update(end - start)
            if end - start == num_rows and length == width and bool((order[1:] > order[:-1]).all()):
                bar.close()
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
        bar.close()
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

    def _apply_lsa(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
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


# ---------------------------------------------------------------------- helpers
def loading_problems(missing, unexpected, mismatched) -> str:
    """What went wrong loading weights, in one line (at most 10 keys of each kind), or ``""``."""
    problems = []
    for what, keys in (("missing weights", missing), ("unexpected weights", unexpected), ("wrong shapes", mismatched)):
        keys = sorted(keys)
        if keys:
            more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
            problems.append(f"{what}: {', '.join(keys[:10])}{more}")
    return "; ".join(problems)


def loading_report(loading_info: dict, expected_missing=None) -> str:
    """[`loading_problems`] of a `from_pretrained` loading report (missing keys that match
    `expected_missing`, a compiled pattern, are not problems)."""
    missing = [
        key for key in loading_info.get("missing_keys", ()) if not (expected_missing and expected_missing.match(key))
    ]
    mismatched = [str(entry) for entry in loading_info.get("mismatched_keys", ())]
    return loading_problems(missing, loading_info.get("unexpected_keys", ()), mismatched)


def _drop_loading_report(record) -> bool:
    return record.funcName != "log_state_dict_report"


def check_finite_weights(model: nn.Module, source: object) -> None:
    """Refuse a model whose parameters or buffers hold NaN or inf, naming the first such tensor: a
    decoder with them answers nothing but token 0, and a damaged weights file gives them."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelLoadError(
                f"{source}: the weights `{name}` hold {bad} NaN or infinite value(s) of {tensor.numel()}; "
                "the weights file is damaged or came from a run that diverged"
            )


def _placed_like(layer, num_rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros for every row's keys and values of a cache layer, `width` positions long."""
    keys, values = layer.keys, layer.values
    return (
        keys.new_zeros(num_rows, keys.shape[1], width, *keys.shape[3:]),
        values.new_zeros(num_rows, values.shape[1], width, *values.shape[3:]),
    )


def _require_non_empty(mask: torch.Tensor, what: str) -> None:
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidInputError(
            f"Empty {what} (no real tokens) for sample(s) {empty}; COMI needs at least one {what} token.", field=what
        )
