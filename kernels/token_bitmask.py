"""Masks logits with a packed token bitmask (xgrammar's and llguidance's layout): bit ``t % 32``
of word ``t // 32`` of a row allows token ``t``; a cleared bit sets the token's logit to
``-inf``.

``apply_token_bitmask`` is the torch reference; ``mask_rows_`` masks chosen rows in place, with
xgrammar's CPU kernel for CPU logits (it reads the words without unpacking them into a
``[rows, vocab]`` tensor) and the reference elsewhere.
"""

from __future__ import annotations

import torch


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` ``[rows, vocab]`` masked by ``bitmask`` ``[rows, words]`` (``int32``): a
    new tensor."""
    vocab = logits.shape[1]
    bitmask = bitmask.to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    return logits.masked_fill(~allowed, float("-inf"))


def mask_rows_(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Masks rows ``rows`` of ``logits`` in place by the same rows of ``bitmask`` (one row per
    logits row, on the CPU); the other rows are left as they are."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 \
            and logits.is_contiguous():
        import xgrammar  # the engine's grammar library; imported where a grammar is in use

        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1],
                                             indices=rows, backend="cpu")
        return
    index = torch.tensor(rows, device=logits.device)
    logits[index] = apply_token_bitmask(logits[index], bitmask[rows])
