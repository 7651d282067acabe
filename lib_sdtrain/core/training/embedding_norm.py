"""Core: the norms of embedding vectors against their text encoder's token embeddings.

A trained vector whose norm grows far beyond the norms of the encoder's own token embeddings
dominates every prompt it is in (an "overcooked" embedding). `typical_norm` is what a host's
`token_embedding_norms` reports per encoder: the median L2 norm of the rows of its token-embedding
table. `limit_norms` is the `norm_limit` option: after each optimizer step, every trained vector
(row) longer than limit × typical is scaled back onto that length; shorter ones are left bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


@torch.no_grad()
def row_norms(table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The L2 norm of each row, in float32 on the CPU (chunked: a half-precision table on the GPU
    is never copied whole)."""
    return torch.cat([rows.detach().float().norm(dim=1).cpu() for rows in table.split(chunk)])


def typical_norm(table: torch.Tensor) -> float:
    """The median L2 norm of a token-embedding table's rows (the lower middle one for an even count,
    as torch.median: the norm of an actual token)."""
    return float(row_norms(table).median())


@torch.no_grad()
def limit_norms(vectors: Mapping[str, torch.Tensor], bounds: Mapping[str, float]) -> None:
    """Scale, in place, each row of `vectors[key]` whose norm exceeds `bounds[key]` onto that norm."""
    for key, bound in bounds.items():
        v = vectors[key]
        norms = v.norm(dim=-1, keepdim=True)
        over = norms > bound
        if bool(over.any()):
            v.copy_(torch.where(over, v * (bound / norms), v))


def norm_summary(vectors: Mapping[str, torch.Tensor], keys: list[str], typical: Mapping[str, float] | None,
                 step: int) -> str:
    """One log line: the largest vector norm per trained encoder (and its ratio to the typical norm)."""
    parts = []
    for key in keys:
        top = float(vectors[key].detach().float().norm(dim=-1).max())
        if typical and typical.get(key):
            parts.append(f"{key} {top:.4g} ({top / typical[key]:.2f}× the typical {typical[key]:.4g})")
        else:
            parts.append(f"{key} {top:.4g}")
    return f"largest vector norm at step {step}: " + ", ".join(parts)
