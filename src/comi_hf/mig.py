"""Marginal-information-gain (MIG) compression of hidden states: a pure tensor function.

COMI compresses the encoder's hidden states of a context into memory vectors in two stages
driven by the marginal information gain of a unit ``x`` with respect to a query vector ``q``
and a set ``S`` of other units::

    G(x) = alpha * cos(x, q) - beta * max_{y in S, y != x} cos(x, y)

* coarse stage: groups of ``merge_size`` consecutive tokens are scored by their most
  query-relevant token and the context's tokens are re-distributed among the groups with
  shares ``softmax(-score)`` (a high-MIG group gets fewer tokens, so it is compressed less);
* fine stage: each group's tokens are fused into one memory vector with weights
  ``softmax(G)`` taken inside the group.

Everything works on the flat list of the batch's real tokens, so samples of different
lengths are handled together and padding never enters a similarity. Memory stays linear in
the number of tokens: the only quadratic quantity, the "max cosine to another unit of the
same group", is computed tile by tile over a bounded working set instead of materialising a
``(groups x longest group x hidden)`` tensor (after reallocation one group can hold most of a
context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors_comi import InvalidInputError, NonFiniteError, describe_value
from .processing_comi import check_merge_size

__all__ = ["MIGDetails", "mig_compress"]


@dataclass
class MIGDetails:
    """What the compression did to each token, for explanations (all aligned with the input).

    Attributes:
        token_memory: ``(batch, n)`` long, index of the memory vector a token was fused into
            (-1 on padding).
        token_weight: ``(batch, n)`` float, the token's fusion weight inside its group (0 on padding).
    """

    token_memory: torch.Tensor
    token_weight: torch.Tensor


# `torch.nn.functional.normalize`'s default: the official implementation normalises with it.
_NORM_EPS = 1e-12
# Lower bound of the scratch budget, in elements (4 MiB of float32): inputs of a few thousand
# tokens are then not cut into chunks so small that each operation's fixed overhead dominates
# (docs/performance.md measures it). The price: an input smaller than this floor may use about
# 4 MiB of scratch, more than its own size.
_MIN_WORK_ELEMENTS = 1 << 20


def mig_compress(
    hidden_states: torch.Tensor,
    query: torch.Tensor,
    merge_size: int,
    attention_mask: torch.Tensor | None = None,
    *,
    coarse: bool = True,
    fine: bool = True,
    coarse_redundancy: bool = True,
    fine_redundancy: bool = True,
    alpha_select: float | torch.Tensor = 1.0,
    beta_select: float | torch.Tensor = 1.0,
    alpha_merge: float | torch.Tensor = 1.0,
    beta_merge: float | torch.Tensor = 1.0,
    return_details: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, MIGDetails]:
    """Compress each row of ``hidden_states`` into about ``n / merge_size`` memory vectors.

    Args:
        hidden_states: ``(batch, n, hidden)`` float tensor, the context's hidden states.
        query: ``(batch, hidden)`` query vector of each row (COMI uses the mean of the query's
            hidden states).
        merge_size: tokens per memory vector before reallocation (the compression ratio).
        attention_mask: ``(batch, n)``, non-zero for real tokens. Real tokens keep their order;
            padding may sit anywhere (left, right). ``None`` means every token is real.
        coarse: run the coarse stage (group reallocation). Without it the row is cut into
            ``max(1, round(n / merge_size))`` near-equal groups, the first ``n mod groups`` one
            token longer.
        fine: fuse each group with MIG weights; without it a group's memory is its mean.
        coarse_redundancy: subtract the redundancy term in the coarse score.
        fine_redundancy: subtract the redundancy term in the fine weights.
        alpha_select, beta_select: relevance / redundancy weights of the coarse stage.
        alpha_merge, beta_merge: relevance / redundancy weights of the fine stage. Floats or
            0-d tensors; gradients flow into tensors through the fine weights. (The coarse
            stage only decides integer group sizes, so it passes no gradient.)
        return_details: also return a [`MIGDetails`] (which memory vector each token went into,
            with which weight).

    Returns:
        ``memory``: ``(batch, M, hidden)`` in ``hidden_states.dtype``, each row's memory
        vectors first, zeros after them; ``memory_mask``: ``(batch, M)`` bool, ``True`` for real
        memory vectors. A row with ``n`` real tokens gets at most ``ceil(n / merge_size)``
        vectors; a row without real tokens gets none.

    Similarities are computed in ``float32`` or wider (``float64`` input stays ``float64``).
    """
    _check_inputs(hidden_states, query, merge_size, attention_mask)
    batch_size, seq_len, hidden_size = hidden_states.shape
    device = hidden_states.device
    compute_dtype = torch.promote_types(hidden_states.dtype, torch.float32)

    if attention_mask is None:
        token_mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    else:
        token_mask = attention_mask.to(device=device) != 0
    lengths = token_mask.sum(dim=1)
    # Flat list of real tokens, row-major: a row's tokens are consecutive and in order.
    token_index = token_mask.reshape(-1).nonzero().squeeze(1)
    num_tokens = token_index.numel()
    if num_tokens == 0:
        return _no_memory(hidden_states, return_details)
    token_row = token_index // seq_len
    flat_states = hidden_states.reshape(batch_size * seq_len, hidden_size)
    # Without padding the real tokens are the flat rows themselves: read them as views, not copies.
    unit_index = None if num_tokens == flat_states.shape[0] else token_index
    work_elements = max(num_tokens * hidden_size // 8, _MIN_WORK_ELEMENTS)

    query_unit = query.to(compute_dtype)
    query_unit = query_unit / torch.linalg.vector_norm(query_unit, dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    inv_norm, relevance = _norms_and_relevance(flat_states, unit_index, token_row, query_unit, work_elements)
    # A NaN or inf in a token's state or its row's query makes its relevance NaN: one reduction
    # checks everything (later stages would otherwise fail on indices or return NaN memory).
    if not bool(torch.isfinite(relevance).all()):
        raise _non_finite_error(hidden_states, query, token_row, relevance)

    if coarse:
        group_sizes = _reallocated_group_sizes(
            flat_states,
            unit_index,
            token_row,
            lengths,
            inv_norm,
            relevance,
            merge_size,
            coarse_redundancy,
            alpha_select,
            beta_select,
            work_elements,
        )
    else:
        group_sizes = _uniform_group_sizes(lengths, merge_size)

    # Drop empty groups; the rest are laid out as consecutive runs of each row's tokens. Since
    # every row's sizes sum to its length, the runs line up with the flat token list.
    group_row, group_slot = group_sizes.nonzero(as_tuple=True)
    sizes = group_sizes[group_row, group_slot]
    num_groups = sizes.numel()
    group_end = sizes.cumsum(0)
    group_start = group_end - sizes
    token_group = torch.repeat_interleave(torch.arange(num_groups, device=device), sizes, output_size=num_tokens)

    if not fine:
        weights = (1.0 / sizes.to(compute_dtype))[token_group]
    elif fine_redundancy:
        segment_start, segment_end = group_start[token_group], group_end[token_group]
        redundancy = _max_cosine_to_others(flat_states, unit_index, inv_norm, segment_start, segment_end, work_elements)
        weights = _segment_softmax(alpha_merge * relevance - beta_merge * redundancy, token_group, num_groups)
    else:
        weights = _segment_softmax(alpha_merge * relevance, token_group, num_groups)

    fused = _weighted_segment_sum(flat_states, unit_index, weights, token_group, num_groups, work_elements)
    return _memory_rows(hidden_states, fused, group_row, token_index, token_group, weights, return_details)


def _no_memory(hidden_states: torch.Tensor, return_details: bool):
    """`mig_compress`'s result for a batch without a real token: no memory vector in any row."""
    batch_size, seq_len, hidden_size = hidden_states.shape
    device = hidden_states.device
    memory = hidden_states.new_zeros(batch_size, 0, hidden_size)
    memory_mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
    if not return_details:
        return memory, memory_mask
    details = MIGDetails(
        token_memory=torch.full((batch_size, seq_len), -1, dtype=torch.long, device=device),
        token_weight=torch.zeros(batch_size, seq_len, device=device),
    )
    return memory, memory_mask, details


def _memory_rows(
    hidden_states: torch.Tensor,
    fused: torch.Tensor,
    group_row: torch.Tensor,
    token_index: torch.Tensor,
    token_group: torch.Tensor,
    weights: torch.Tensor,
    return_details: bool,
):
    """The fused groups `(groups, hidden)` placed as each row's memory vectors, in order, zeros after
    them: `mig_compress`'s `(memory, memory_mask[, details])`."""
    batch_size, seq_len, hidden_size = hidden_states.shape
    device = hidden_states.device
    num_groups = fused.shape[0]
    # Position of each group among its row's memory vectors.
    groups_per_row = torch.bincount(group_row, minlength=batch_size)
    first_group_of_row = groups_per_row.cumsum(0) - groups_per_row
    memory_position = torch.arange(num_groups, device=device) - first_group_of_row[group_row]
    max_memory = int(groups_per_row.max())
    memory = hidden_states.new_zeros(batch_size, max_memory, hidden_size)
    memory = memory.index_put((group_row, memory_position), fused.to(hidden_states.dtype))
    memory_mask = torch.arange(max_memory, device=device)[None, :] < groups_per_row[:, None]
    if not return_details:
        return memory, memory_mask
    token_memory = torch.full((batch_size * seq_len,), -1, dtype=torch.long, device=device)
    token_memory[token_index] = memory_position[token_group]
    token_weight = torch.zeros(batch_size * seq_len, dtype=weights.dtype, device=device)
    token_weight[token_index] = weights.detach()
    details = MIGDetails(token_memory.view(batch_size, seq_len), token_weight.view(batch_size, seq_len))
    return memory, memory_mask, details


def _check_inputs(
    hidden_states: torch.Tensor,
    query: torch.Tensor,
    merge_size: int,
    attention_mask: torch.Tensor | None,
) -> None:
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        raise InvalidInputError(
            f"`hidden_states` must be a (batch, n, hidden) tensor, got {describe_value(hidden_states)}."
        )
    if not hidden_states.is_floating_point():
        raise InvalidInputError(f"`hidden_states` must be a floating-point tensor, got {hidden_states.dtype}.")
    batch_size, seq_len, hidden_size = hidden_states.shape
    if not isinstance(query, torch.Tensor) or query.shape != (batch_size, hidden_size):
        raise InvalidInputError(
            f"`query` must be a ({batch_size}, {hidden_size}) tensor to match `hidden_states`, "
            f"got {describe_value(query)}."
        )
    if not query.is_floating_point():
        raise InvalidInputError(f"`query` must be a floating-point tensor, got {query.dtype}.")
    check_merge_size(merge_size)
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (batch_size, seq_len)
    ):
        raise InvalidInputError(
            f"`attention_mask` must be a ({batch_size}, {seq_len}) tensor to match `hidden_states`, "
            f"got {describe_value(attention_mask)}."
        )


def _non_finite_error(
    hidden_states: torch.Tensor, query: torch.Tensor, token_row: torch.Tensor, relevance: torch.Tensor
) -> NonFiniteError:
    rows = token_row[~torch.isfinite(relevance)].unique().tolist()
    bad_query = (~torch.isfinite(query).all(dim=-1)).nonzero().flatten().tolist()
    where = [f"`query` in row(s) {[row for row in rows if row in bad_query]}"] if set(rows) & set(bad_query) else []
    if set(rows) - set(bad_query):
        where.append(f"`hidden_states` at real tokens of row(s) {[row for row in rows if row not in bad_query]}")
    return NonFiniteError(
        f"NaN or inf in {' and '.join(where)} ({hidden_states.dtype}); a half-precision encoder that overflows "
        "gives such states.",
        rows,
    )


def _token_chunks(num_tokens: int, hidden_size: int, work_elements: int):
    step = max(1, work_elements // (2 * hidden_size))
    for start in range(0, num_tokens, step):
        yield start, min(start + step, num_tokens)


def _norms_and_relevance(
    flat_states: torch.Tensor,
    token_index: torch.Tensor | None,
    token_row: torch.Tensor,
    query_unit: torch.Tensor,
    work_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse norms ``(N,)`` of the real tokens and their cosine to their row's query ``(N,)``
    (``token_index=None``: every row of ``flat_states`` is a real token)."""
    inv_norms, relevances = [], []
    for start, end in _token_chunks(token_row.numel(), flat_states.shape[1], work_elements):
        states = _raw_vectors(flat_states, token_index, slice(start, end), query_unit.dtype)
        inv_norm = 1.0 / torch.linalg.vector_norm(states, dim=-1).clamp_min(_NORM_EPS)
        inv_norms.append(inv_norm)
        # One query broadcasts; several are gathered per token.
        queries = query_unit if query_unit.shape[0] == 1 else query_unit[token_row[start:end]]
        relevances.append(torch.linalg.vecdot(states, queries) * inv_norm)
    return torch.cat(inv_norms), torch.cat(relevances)


def _reallocated_group_sizes(
    flat_states: torch.Tensor,
    token_index: torch.Tensor | None,
    token_row: torch.Tensor,
    lengths: torch.Tensor,
    inv_norm: torch.Tensor,
    relevance: torch.Tensor,
    merge_size: int,
    redundancy: bool,
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
    work_elements: int,
) -> torch.Tensor:
    """Coarse stage: ``(batch, max groups)`` new group sizes, each row summing to its length."""
    device = relevance.device
    num_tokens = relevance.numel()
    batch_size = lengths.numel()
    groups_per_row = (lengths + merge_size - 1) // merge_size
    first_group_of_row = groups_per_row.cumsum(0) - groups_per_row
    num_groups = int(groups_per_row.sum())
    first_token_of_row = lengths.cumsum(0) - lengths
    token_rank = torch.arange(num_tokens, device=device) - first_token_of_row[token_row]
    token_group = first_group_of_row[token_row] + token_rank // merge_size

    # Representative: the group's most query-relevant token (the first one on ties).
    relevance = relevance.detach()
    group_relevance = torch.full((num_groups,), -math.inf, dtype=relevance.dtype, device=device)
    group_relevance = group_relevance.scatter_reduce(0, token_group, relevance, "amax")
    is_best = relevance == group_relevance[token_group]
    candidates = torch.where(is_best, torch.arange(num_tokens, device=device), num_tokens)
    representative = torch.full((num_groups,), num_tokens, device=device).scatter_reduce(
        0, token_group, candidates, "amin"
    )

    score = alpha * group_relevance
    if redundancy:
        group_row = torch.repeat_interleave(torch.arange(batch_size, device=device), groups_per_row)
        row_start = first_group_of_row[group_row]
        row_redundancy = _max_cosine_to_others(
            flat_states,
            representative if token_index is None else token_index[representative],
            inv_norm[representative],
            row_start,
            row_start + groups_per_row[group_row],
            work_elements,
        )
        score = score - beta * row_redundancy
    score = score.detach()

    # Shares softmax(-score) per row, on a (batch, max groups) grid padded with -inf logits.
    max_groups = int(groups_per_row.max())
    slot = torch.arange(max_groups, device=device)
    real_slot = slot[None, :] < groups_per_row[:, None]
    logits = torch.full((batch_size, max_groups), -math.inf, dtype=score.dtype, device=device)
    logits[real_slot] = -score
    shares = torch.softmax(logits, dim=1)
    quotas = lengths[:, None].to(shares.dtype) * shares
    sizes = torch.floor(quotas).long()
    # Largest remainder: the tokens still unassigned go one each to the largest fractional parts.
    fractions = torch.where(real_slot, quotas - sizes.to(quotas.dtype), -1.0)
    order = torch.sort(fractions, dim=1, descending=True, stable=True).indices
    missing = lengths - sizes.sum(dim=1)
    bonus = (slot[None, :] < missing[:, None]).long()
    sizes = sizes.scatter_add(1, order, bonus)

    # A row of at most one group keeps all its tokens in one group.
    single = groups_per_row <= 1
    sizes[single] = 0
    sizes[single, 0] = lengths[single]
    return sizes


def _uniform_group_sizes(lengths: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Coarse stage off: ``max(1, round(n / m))`` near-equal groups (round half to even)."""
    groups_per_row = torch.round(lengths.double() / merge_size).long().clamp_min(1)
    max_groups = int(groups_per_row.max())
    slot = torch.arange(max_groups, device=lengths.device)
    base = lengths // groups_per_row
    extra = lengths % groups_per_row
    sizes = base[:, None] + (slot[None, :] < extra[:, None]).long()
    return torch.where(slot[None, :] < groups_per_row[:, None], sizes, 0)


def _segment_softmax(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of ``values`` taken separately inside each segment id."""
    peak = torch.full((num_segments,), -math.inf, dtype=values.dtype, device=values.device)
    peak = peak.scatter_reduce(0, segment, values.detach(), "amax")
    exp = torch.exp(values - peak[segment])
    total = torch.zeros(num_segments, dtype=values.dtype, device=values.device).index_add(0, segment, exp)
    return exp / total[segment]


def _weighted_segment_sum(
    flat_states: torch.Tensor,
    token_index: torch.Tensor | None,
    weights: torch.Tensor,
    token_group: torch.Tensor,
    num_groups: int,
    work_elements: int,
) -> torch.Tensor:
    """``(groups, hidden)``: sum of ``weight * state`` over each group's tokens, chunk by chunk."""
    hidden_size = flat_states.shape[1]
    fused = torch.zeros(num_groups, hidden_size, dtype=weights.dtype, device=weights.device)
    for start, end in _token_chunks(weights.numel(), hidden_size, work_elements):
        states = _raw_vectors(flat_states, token_index, slice(start, end), weights.dtype)
        fused = fused.index_add(0, token_group[start:end], states * weights[start:end, None])
    return fused


def _max_cosine_to_others(
    source: torch.Tensor,
    unit_index: torch.Tensor | None,
    inv_norm: torch.Tensor,
    segment_start: torch.Tensor,
    segment_end: torch.Tensor,
    work_elements: int,
) -> torch.Tensor:
    """For every unit, the largest cosine to another unit of its segment (0 if it is alone).

    Unit ``u`` is the vector ``source[unit_index[u]]`` (``source[u]`` when ``unit_index`` is
    ``None``) with inverse norm ``inv_norm[u]``; the
    units of a segment are consecutive: ``segment_start[u] <= u < segment_end[u]``.

    The search for each unit's most similar partner runs without autograd, tile by tile; the
    cosine to that partner is then recomputed with autograd in O(units x hidden). The gradient
    of a maximum is the gradient at its argmax, so this is exact, and the memory autograd keeps
    stays linear even when one segment holds most of the units.
    """
    with torch.no_grad():
        partner = _most_similar_partner(
            source, unit_index, inv_norm.detach(), segment_start, segment_end, work_elements
        )
    has_partner = partner >= 0
    partner = torch.where(has_partner, partner, torch.arange(partner.numel(), device=partner.device))
    hidden_size = source.shape[1]
    cosines = []
    for start, end in _token_chunks(partner.numel(), hidden_size, work_elements):
        others = partner[start:end]
        dots = torch.linalg.vecdot(
            _raw_vectors(source, unit_index, slice(start, end), inv_norm.dtype),
            _raw_vectors(source, unit_index, others, inv_norm.dtype),
        )
        cosines.append(dots * inv_norm[start:end] * inv_norm[others])
    return torch.where(has_partner, torch.cat(cosines), 0.0)


def _most_similar_partner(
    source: torch.Tensor,
    unit_index: torch.Tensor | None,
    inv_norm: torch.Tensor,
    segment_start: torch.Tensor,
    segment_end: torch.Tensor,
    work_elements: int,
) -> torch.Tensor:
    """``(units,)`` index of each unit's most similar other unit of its segment (the first on
    ties), -1 for a unit alone in its segment.

    Units are cut into blocks of ``tile`` units; only the (query block, key block) tiles that
    share a segment are computed, a bounded number of tiles at a time, so the work is about the
    sum of squared segment sizes and the scratch memory stays within ``work_elements``.
    """
    device = inv_norm.device
    num_units = inv_norm.numel()
    hidden_size = source.shape[1]
    # Tile edge: about the size of the segment an average unit sits in (a power of two).
    typical_segment = int((segment_end - segment_start).double().mean().ceil())
    tile = min(128, max(8, 1 << (typical_segment - 1).bit_length()))
    num_blocks = (num_units + tile - 1) // tile

    block_first = torch.arange(num_blocks, device=device) * tile
    block_last = (block_first + tile - 1).clamp_max(num_units - 1)
    key_block_first = segment_start[block_first] // tile
    key_block_last = (segment_end[block_last] - 1) // tile
    tiles_per_block = key_block_last - key_block_first + 1
    tile_query = torch.repeat_interleave(torch.arange(num_blocks, device=device), tiles_per_block)
    tile_offset = (
        torch.arange(tile_query.numel(), device=device) - (tiles_per_block.cumsum(0) - tiles_per_block)[tile_query]
    )
    tile_key = key_block_first[tile_query] + tile_offset

    best = torch.full((num_units,), -math.inf, dtype=inv_norm.dtype, device=device)
    partner = torch.full((num_units,), -1, dtype=torch.long, device=device)
    within_tile = torch.arange(tile, device=device)
    tiles_per_chunk = max(1, work_elements // (2 * tile * hidden_size + 4 * tile * tile))
    for start in range(0, tile_query.numel(), tiles_per_chunk):
        query_units = tile_query[start : start + tiles_per_chunk, None] * tile + within_tile
        key_units = tile_key[start : start + tiles_per_chunk, None] * tile + within_tile
        query_valid = query_units < num_units
        key_valid = key_units < num_units
        query_units = query_units.clamp_max(num_units - 1)
        key_units = key_units.clamp_max(num_units - 1)
        # Dot products of the raw vectors, scaled afterwards: (tile x tile) multiplications
        # instead of normalising two (tile x hidden) blocks.
        dots = torch.bmm(
            _raw_vectors(source, unit_index, query_units, inv_norm.dtype),
            _raw_vectors(source, unit_index, key_units, inv_norm.dtype).transpose(1, 2),
        )
        cosine = dots * inv_norm[query_units][:, :, None] * inv_norm[key_units][:, None, :]
        allowed = (
            (segment_start[query_units][:, :, None] == segment_start[key_units][:, None, :])
            & (query_units[:, :, None] != key_units[:, None, :])
            & key_valid[:, None, :]
        )
        tile_best, tile_arg = cosine.masked_fill(~allowed, -math.inf).max(dim=-1)
        tile_partner = key_units.gather(1, tile_arg)
        # A query block's tiles are consecutive, so the units of this chunk form one range:
        # reduce over the chunk's tiles there, then merge with what earlier chunks found.
        units, values, partners = query_units[query_valid], tile_best[query_valid], tile_partner[query_valid]
        first = int(units.min())
        local = units - first
        span = int(local.max()) + 1
        chunk_best = torch.full((span,), -math.inf, dtype=values.dtype, device=device)
        chunk_best = chunk_best.scatter_reduce(0, local, values, "amax")
        on_top = (values == chunk_best[local]) & torch.isfinite(values)
        chunk_partner = torch.full((span,), num_units, dtype=torch.long, device=device)
        chunk_partner = chunk_partner.scatter_reduce(0, local[on_top], partners[on_top], "amin")
        previous_best, previous_partner = best[first : first + span], partner[first : first + span]
        better = (chunk_best > previous_best) | (
            (chunk_best == previous_best) & torch.isfinite(chunk_best) & (chunk_partner < previous_partner)
        )
        best[first : first + span] = torch.where(better, chunk_best, previous_best)
        partner[first : first + span] = torch.where(better, chunk_partner, previous_partner)
    return partner


def _raw_vectors(
    source: torch.Tensor, unit_index: torch.Tensor | None, units: torch.Tensor | slice, dtype: torch.dtype
) -> torch.Tensor:
    """The vectors of ``units`` (an index tensor of any shape, or a slice), in ``dtype``.

    ``unit_index=None`` means unit ``u`` is ``source[u]``: a slice is then a view, not a copy.
    """
    rows = units if unit_index is None else unit_index[units]
    return source[rows].to(dtype)
