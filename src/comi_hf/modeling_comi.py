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
import os
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig, GenerationMixin
from transformers import initialization as init
from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging as hf_logging

from .configuration_comi import COMIConfig
from .mig import mig_compress

__all__ = ["COMIForConditionalGeneration", "COMIOutput", "COMIPreTrainedModel", "official_generation_config"]

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
        past_key_values, hidden_states, attentions: the decoder's, as in any causal LM output.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    decoder_attention_mask: torch.LongTensor | None = None
    memory: torch.FloatTensor | None = None
    memory_attention_mask: torch.BoolTensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class COMIMIGCompressor(nn.Module):
    """Holds the MIG switches and the alpha/beta weights and calls [`mig_compress`].

    The weights are parameters when the config makes them learnable, plain floats otherwise.
    """

    def __init__(self, config: COMIConfig):
        super().__init__()
        self.coarse = config.coarse_grained
        self.fine = config.fine_grained
        self.coarse_redundancy = config.coarse_redundancy
        self.fine_redundancy = config.fine_redundancy
        for stage, learnable in (("select", config.learnable_select_weights), ("merge", config.learnable_merge_weights)):
            for weight in ("alpha", "beta"):
                name = f"{weight}_{stage}"
                value = float(getattr(config, name))
                setattr(self, name, nn.Parameter(torch.tensor(value)) if learnable else value)

    def forward(
        self,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        attention_mask: torch.Tensor,
        merge_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
    _skip_keys_device_placement = ["past_key_values"]
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
            # The LSA block reads memory vectors, never token ids.
            self.lsa.embed_tokens = None
        else:
            hidden_size = config.text_config.hidden_size
            self.lsa = nn.Linear(hidden_size, hidden_size)
        self.decoder = AutoModelForCausalLM.from_config(config.text_config)
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
        # would report as missing at length; quiet its report and check the loading here instead.
        report_logger = hf_logging.get_logger("transformers.modeling_utils")
        level = report_logger.level
        report_logger.setLevel(hf_logging.ERROR)
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
            report_logger.setLevel(level)
        _check_backbone_loading(pretrained_model_name_or_path, loading_info)
        # transformers remembers the key mapping used to load and reverts it on save; this model
        # must save in its own layout (decoder.*, encoder.*), like one built from scratch.
        vars(model).pop("_weight_conversions", None)
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
    def compress(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        query_ids: torch.LongTensor,
        query_attention_mask: torch.Tensor | None = None,
        merge_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and compress contexts into aligned memory vectors.

        Args:
            input_ids: `(batch, context_len)` context token ids, padded on either side.
            attention_mask: `(batch, context_len)`, 1 for real context tokens (`None`: all real).
            query_ids: `(batch, query_len)` query token ids, padded on either side.
            query_attention_mask: `(batch, query_len)`, 1 for real query tokens (`None`: all real).
            merge_size: overrides `config.merge_size` for this call.

        Returns:
            `memory` `(batch, memory_len, hidden)` in the decoder's dtype (LSA applied), each
            sample's vectors first, and `memory_attention_mask` `(batch, memory_len)` bool.
        """
        merge_size = self._resolve_merge_size(merge_size)
        context_mask = _real_token_mask(input_ids, attention_mask, "input_ids", "attention_mask")
        query_mask = _real_token_mask(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
        if input_ids.shape[0] != query_ids.shape[0]:
            raise ValueError(
                f"`input_ids` holds {input_ids.shape[0]} contexts but `query_ids` holds {query_ids.shape[0]} queries."
            )
        _require_non_empty(context_mask, "context")
        _require_non_empty(query_mask, "query")

        rows = _segment_rows(input_ids, context_mask, query_ids, query_mask, self.config.segment_size)
        hidden = self.encoder(
            input_ids=rows.input_ids, attention_mask=rows.attention_mask.long(), use_cache=False
        ).last_hidden_state
        # Mean of the query's hidden states, accumulated in float32 at least.
        query_weights = rows.query_mask.to(torch.promote_types(hidden.dtype, torch.float32))
        query_vector = torch.einsum("rt,rtd->rd", query_weights, hidden.to(query_weights.dtype))
        query_vector = query_vector / query_weights.sum(1, keepdim=True)
        memory, memory_mask = self.compressor(hidden, query_vector, rows.context_mask, merge_size)
        memory = self._align(memory, memory_mask)
        memory, memory_mask = _rows_to_samples(memory, memory_mask, rows.sample, input_ids.shape[0])
        return memory.to(self.get_input_embeddings().weight.dtype), memory_mask

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
            **kwargs: passed to the decoder (e.g. `num_items_in_batch`, `logits_to_keep`).

        Each sample is packed without gaps and right-padded, so a batch gives every sample the
        result it gets alone.
        """
        if input_ids is None or query_ids is None:
            raise ValueError("COMI needs both a context (`input_ids`) and a query (`query_ids`).")
        memory, memory_mask = self.compress(input_ids, attention_mask, query_ids, query_attention_mask, merge_size)
        embed = self.get_input_embeddings()
        query_mask = _real_token_mask(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
        parts = [(memory, memory_mask), (embed(query_ids.masked_fill(~query_mask, 0)), query_mask)]
        label_parts = [
            (torch.full(memory_mask.shape, -100, device=memory.device), memory_mask),
            (torch.full(query_ids.shape, -100, device=memory.device), query_mask),
        ]
        if labels is not None:
            if labels.shape[0] != input_ids.shape[0]:
                raise ValueError(f"`labels` holds {labels.shape[0]} answers for {input_ids.shape[0]} contexts.")
            answer_mask = labels != -100
            parts.append((embed(labels.masked_fill(~answer_mask, 0)), answer_mask))
            label_parts.append((labels, answer_mask))
        inputs_embeds, decoder_mask = _pack(parts, left_pad=False)
        decoder_labels = _pack(label_parts, left_pad=False, fill=-100)[0] if labels is not None else None

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
            past_key_values=outputs.past_key_values,
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
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ):
        """Answer queries about contexts; returns only the new tokens.

        Give either token ids (`input_ids`/`attention_mask` for the contexts,
        `query_ids`/`query_attention_mask` for the queries) or text (`context=`, `query=`, a
        string or a list of strings each, and `tokenizer=`; text is tokenised without special
        tokens, as in the official code).

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
        elif input_ids is None or query_ids is None:
            raise ValueError(
                "`generate` needs a context and a query: token ids (`input_ids`, `query_ids`) or text "
                "(`context=`, `query=`, `tokenizer=`)."
            )
        memory, memory_mask = self.compress(input_ids, attention_mask, query_ids, query_attention_mask, merge_size)
        query_mask = _real_token_mask(query_ids, query_attention_mask, "query_ids", "query_attention_mask")
        query_embeds = self.get_input_embeddings()(query_ids.masked_fill(~query_mask, 0))
        inputs_embeds, decoder_mask = _pack([(memory, memory_mask), (query_embeds, query_mask)], left_pad=True)

        generation_config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        generate_kwargs = generation_config.update(**kwargs)
        processors = LogitsProcessorList(logits_processor or [])
        penalty = generation_config.repetition_penalty
        if penalty is not None and penalty != 1.0:
            # `generate` skips each sample's left-padding length of the token history when it
            # applies this penalty; with an embeddings prompt that history holds only new
            # tokens, so padded samples would escape the penalty. Apply it over all of them.
            generation_config.repetition_penalty = 1.0
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

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        # `register_for_auto_class` records one Auto class; both should load this model.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        module = type(self).__module__.rsplit(".", 1)[-1]
        auto_map.setdefault("AutoModel", f"{module}.{type(self).__name__}")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


# ---------------------------------------------------------------------- helpers
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
    ids: torch.Tensor, mask: torch.Tensor | None, ids_name: str, mask_name: str
) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"`{ids_name}` must be a (batch, length) tensor of token ids, got {_describe(ids)}.")
    if mask is None:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        raise ValueError(f"`{mask_name}` must have the shape of `{ids_name}` {tuple(ids.shape)}, got {_describe(mask)}.")
    return mask.to(ids.device) != 0


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _require_non_empty(mask: torch.Tensor, what: str) -> None:
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"Empty {what} (no real tokens) for sample(s) {empty}; COMI needs at least one {what} token.")


def _tokenize_text(context, query, tokenizer):
    if tokenizer is None:
        raise ValueError("Text input (`context=`, `query=`) needs `tokenizer=`.")
    contexts = [context] if isinstance(context, str) else context
    queries = [query] if isinstance(query, str) else query
    for name, texts in (("context", contexts), ("query", queries)):
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(text, str) for text in texts):
            raise TypeError(f"`{name}` must be a string or a non-empty list of strings, got {texts!r:.80}.")
        empty = [i for i, text in enumerate(texts) if not text.strip()]
        if empty:
            raise ValueError(f"Empty {name} text at position(s) {empty}.")
    if len(contexts) != len(queries):
        raise ValueError(f"Got {len(contexts)} contexts but {len(queries)} queries.")
    encode = {"add_special_tokens": False, "padding": True, "return_tensors": "pt"}
    context_batch = tokenizer(list(contexts), **encode)
    query_batch = tokenizer(list(queries), **encode)
    return (
        context_batch["input_ids"],
        context_batch["attention_mask"],
        query_batch["input_ids"],
        query_batch["attention_mask"],
    )


@dataclass
class _SegmentRows:
    """The encoder's batch: one row per (sample, segment), each `[segment tokens ; query tokens]`."""

    input_ids: torch.Tensor  # (rows, row_len), right-padded
    attention_mask: torch.Tensor  # (rows, row_len) bool, real tokens
    context_mask: torch.Tensor  # (rows, row_len) bool, the segment's tokens
    query_mask: torch.Tensor  # (rows, row_len) bool, the query's tokens
    sample: torch.Tensor  # (rows,) sample of each row, non-decreasing


def _left_justify(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front, keeping their order; returns ids and lengths."""
    lengths = mask.sum(dim=1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return torch.gather(ids, 1, order), lengths


def _segment_rows(
    input_ids: torch.Tensor,
    context_mask: torch.Tensor,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    segment_size: int,
) -> _SegmentRows:
    device = input_ids.device
    context, context_len = _left_justify(input_ids, context_mask)
    query, query_len = _left_justify(query_ids.to(device), query_mask.to(device))
    segments_per_sample = (context_len + segment_size - 1) // segment_size
    sample = torch.repeat_interleave(torch.arange(input_ids.shape[0], device=device), segments_per_sample)
    first_row = segments_per_sample.cumsum(0) - segments_per_sample
    segment_index = torch.arange(sample.numel(), device=device) - first_row[sample]
    segment_start = segment_index * segment_size
    segment_len = (context_len[sample] - segment_start).clamp_max(segment_size)
    row_len = segment_len + query_len[sample]
    position = torch.arange(int(row_len.max()), device=device)[None, :]
    in_segment = position < segment_len[:, None]
    in_row = position < row_len[:, None]
    context_index = (segment_start[:, None] + position).clamp_max(context.shape[1] - 1)
    query_index = (position - segment_len[:, None]).clamp(0, query.shape[1] - 1)
    ids = torch.where(in_segment, context[sample[:, None], context_index], query[sample[:, None], query_index])
    return _SegmentRows(
        input_ids=ids.masked_fill(~in_row, 0),
        attention_mask=in_row,
        context_mask=in_segment,
        query_mask=in_row & ~in_segment,
        sample=sample,
    )


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
    for (values, mask), length in zip(parts, lengths):
        rank = mask.long().cumsum(dim=1) - 1
        sample, position = mask.nonzero(as_tuple=True)
        out = out.index_put((sample, offset[sample] + rank[sample, position]), values[sample, position].to(out.dtype))
        offset = offset + length
    start = (width - total) if left_pad else torch.zeros_like(total)
    column = torch.arange(width, device=out.device)[None, :]
    out_mask = (column >= start[:, None]) & (column < (start + total)[:, None])
    return out, out_mask


COMIForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
