"""A deliberately plain, loop-based implementation of docs/method.md's MIG (both stages), used to
check `mig_compress`."""

from __future__ import annotations

import math

import torch


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).T


def _max_cos_to_others(units: torch.Tensor) -> torch.Tensor:
    if units.shape[0] <= 1:
        return torch.zeros(units.shape[0], dtype=units.dtype)
    sims = _cos(units, units)
    sims.fill_diagonal_(-math.inf)
    return sims.max(dim=1).values


def reference_group_sizes(
    context: torch.Tensor,
    query: torch.Tensor,
    merge_size: int,
    *,
    coarse: bool,
    coarse_redundancy: bool,
    alpha_select: float,
    beta_select: float,
) -> list[int]:
    n = context.shape[0]
    if not coarse:
        groups = max(1, round(n / merge_size))
        return [n // groups + (1 if g < n % groups else 0) for g in range(groups)]
    groups = math.ceil(n / merge_size)
    if groups <= 1:
        return [n]
    relevance = _cos(context, query[None, :])[:, 0]
    representatives = []
    group_relevance = []
    for g in range(groups):
        members = list(range(g * merge_size, min((g + 1) * merge_size, n)))
        best = max(members, key=lambda i: (relevance[i].item(), -i))
        representatives.append(best)
        group_relevance.append(relevance[best].item())
    if coarse_redundancy:
        redundancy = _max_cos_to_others(context[representatives]).tolist()
    else:
        redundancy = [0.0] * groups
    scores = [alpha_select * r - beta_select * d for r, d in zip(group_relevance, redundancy, strict=True)]
    top = max(-s for s in scores)
    exps = [math.exp(-s - top) for s in scores]
    shares = [e / sum(exps) for e in exps]
    quotas = [n * p for p in shares]
    sizes = [math.floor(q) for q in quotas]
    remaining = n - sum(sizes)
    by_fraction = sorted(range(groups), key=lambda g: (-(quotas[g] - sizes[g]), g))
    for g in by_fraction[:remaining]:
        sizes[g] += 1
    return sizes


def reference_mig_compress(
    context: torch.Tensor,
    query: torch.Tensor,
    merge_size: int,
    *,
    coarse: bool = True,
    fine: bool = True,
    coarse_redundancy: bool = True,
    fine_redundancy: bool = True,
    alpha_select: float = 1.0,
    beta_select: float = 1.0,
    alpha_merge: float = 1.0,
    beta_merge: float = 1.0,
) -> torch.Tensor:
    """One sample: ``context`` (n, d) real tokens only, ``query`` (d,). Returns (M, d)."""
    sizes = reference_group_sizes(
        context,
        query,
        merge_size,
        coarse=coarse,
        coarse_redundancy=coarse_redundancy,
        alpha_select=alpha_select,
        beta_select=beta_select,
    )
    memories = []
    start = 0
    for size in sizes:
        if size == 0:
            continue
        group = context[start : start + size]
        start += size
        if fine:
            relevance = _cos(group, query[None, :])[:, 0]
            redundancy = _max_cos_to_others(group) if fine_redundancy else torch.zeros_like(relevance)
            weights = torch.softmax(alpha_merge * relevance - beta_merge * redundancy, dim=0)
            memories.append((weights[:, None] * group).sum(0))
        else:
            memories.append(group.mean(0))
    return torch.stack(memories)[: max(1, math.ceil(context.shape[0] / merge_size))]
