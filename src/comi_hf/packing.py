"""How COMI lays out contexts, queries and memories in tensors.

Contexts are cut into segments (one encoder row each), queries are matched to the rows of
their context, the per-row memories are gathered back per query, and the decoder's input
`[memory ; query ; answer]` is packed per sample without gaps. Every function here is pure
tensor bookkeeping: no parameters, no model calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors_comi import InvalidInputError
from .mig import MIGDetails

__all__ = [
    "COMICompressionDetails",
    "COMIContextEncoding",
    "concatenate_rows",
    "decoder_inputs",
    "details_per_query",
    "left_justify",
    "pack",
    "resolve_context_index",
    "rows_for_queries",
    "rows_to_samples",
    "segment_contexts",
]


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

    def nbytes(self) -> int:
        """Bytes its tensors hold."""
        tensors = [self.input_ids, self.context_mask, self.sample, self.segment_start, self.context_lengths]
        if self.hidden_states is not None:
            tensors.append(self.hidden_states)
        for keys, values in self.key_values or []:
            tensors += [keys, values]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


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


def left_justify(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front, keeping their order; returns ids and lengths."""
    lengths = mask.sum(dim=1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return torch.gather(ids, 1, order), lengths


def segment_contexts(input_ids: torch.Tensor, context_mask: torch.Tensor, segment_size: int) -> COMIContextEncoding:
    """One row per (context, segment of `segment_size` tokens), right-padded."""
    device = input_ids.device
    context, context_len = left_justify(input_ids, context_mask)
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


def resolve_context_index(
    context_index: torch.Tensor | None, num_contexts: int, num_queries: int, device: torch.device
) -> torch.Tensor:
    if context_index is None:
        if num_contexts == num_queries:
            return torch.arange(num_queries, device=device)
        if num_contexts == 1:
            return torch.zeros(num_queries, dtype=torch.long, device=device)
        raise InvalidInputError(
            f"Got {num_contexts} contexts but `query_ids` holds {num_queries} queries; pass `context_index` "
            "to say which context each query is about."
        )
    context_index = torch.as_tensor(context_index, device=device)
    if context_index.shape != (num_queries,) or context_index.dtype not in (torch.long, torch.int):
        raise InvalidInputError(f"`context_index` must hold one context index per query ({num_queries}).")
    if num_queries and (context_index.min() < 0 or context_index.max() >= num_contexts):
        raise InvalidInputError(f"`context_index` must point at one of the {num_contexts} contexts.")
    return context_index.long()


def rows_for_queries(
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


def concatenate_rows(
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


def details_per_query(
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


def rows_to_samples(
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


def pack(
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


def decoder_inputs(
    embed_tokens: nn.Module,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    left_pad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The decoder's input: `[memory ; query ; answer]` embeddings per sample, packed without gaps.

    The one place this input is built: `forward` (right-padded, with `labels`), `generate`
    (left-padded) and the serving path (each sample's real rows) all call it, so that a served
    answer reads exactly what `generate` reads.

    Args:
        embed_tokens: the decoder's input embedding table.
        memory: `(batch, memory_len, hidden)` aligned memory vectors; `memory_mask` `(batch, memory_len)`.
        query_ids: `(batch, query_len)` query token ids; `query_mask` `(batch, query_len)` bool.
        labels: `(batch, answer_len)` answer ids (-100 on padding): appended after the query,
            and returned aligned with the packed sequence (-100 on memory, query and padding).
        left_pad: pad on the left (for generation) instead of the right.

    Returns:
        `inputs_embeds` `(batch, len, hidden)` in the table's dtype, `attention_mask` `(batch, len)`
        bool, and the aligned labels (or `None`).
    """
    dtype = embed_tokens.weight.dtype
    parts = [(memory.to(dtype), memory_mask), (embed_tokens(query_ids.masked_fill(~query_mask, 0)), query_mask)]
    label_parts = [
        (torch.full(memory_mask.shape, -100, device=memory.device), memory_mask),
        (torch.full(query_ids.shape, -100, device=memory.device), query_mask),
    ]
    if labels is not None:
        answer_mask = labels != -100
        parts.append((embed_tokens(labels.masked_fill(~answer_mask, 0)), answer_mask))
        label_parts.append((labels, answer_mask))
    inputs_embeds, attention_mask = pack(parts, left_pad=left_pad)
    aligned_labels = pack(label_parts, left_pad=left_pad, fill=-100)[0] if labels is not None else None
    return inputs_embeds, attention_mask, aligned_labels
