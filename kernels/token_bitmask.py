"""Masks logits with a packed token bitmask (xgrammar's and llguidance's layout)."""

from __future__ import annotations

import torch


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[rows, vocab]`` with every token whose bit is clear set to ``-inf``: bit
    ``t % 32`` of ``bitmask[row, t // 32]`` (``int32``) allows token ``t``. A new tensor."""
    vocab = logits.shape[1]
    bitmask = bitmask.to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    return logits.masked_fill(~allowed, float("-inf"))
