"""The sampler's reductions over each row of logits: the greedy token (``argmax``, the first
among equals) and the log-normalizer (``logsumexp``) that every sampled token's logprob needs.

The torch reference runs everywhere; fp32 rows on a CPU go to one C kernel
(:func:`pagedserve.kernels.cpu.argmax_logsumexp`) when it is built: torch's ops make several
passes and parallel regions for what is one vocabulary-wide row at a decode step.
"""

from __future__ import annotations

import torch

from pagedserve.kernels import cpu


def argmax_logsumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x.argmax(-1), torch.logsumexp(x, -1))`` for ``x`` ``[rows, vocab]``."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and x.stride(1) == 1 and x.shape[1] > 0 and cpu.available()):
        return cpu.argmax_logsumexp(x)
    return x.argmax(dim=-1), torch.logsumexp(x, dim=-1)
