"""Batched sampling: penalties, temperature, top-k / top-p / min-p, seeded draws, logprobs.

Every transformation is a tensor op over the whole batch ``[rows, vocab]``; work a batch does not
need (penalties, filters, logprobs) is skipped when no row asks for it. Draws use the exponential
race (``argmax(p / q)`` with ``q ~ Exp(1)``), which samples exactly from ``p``; rows with a seed
draw their noise from their own generator, so their results do not depend on the batch around
them.

On a GPU the step waits for the device once: the per-row settings reach it without blocking
(:func:`pagedserve.kernels.dispatch.to_device`), which work to skip is decided from the requests'
settings rather than from device values, and the sampled tokens come back with their logprobs in one
copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.kernels.dispatch import to_device
from pagedserve.kernels.sampling import argmax_logsumexp
from pagedserve.outputs import TokenLogprobs
from pagedserve.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence."""

    params: SamplingParams
    token_ids: list[int]  # prompt then output so far
    num_prompt_tokens: int
    generator: torch.Generator | None
    eos_token_id: int | None

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # each sampled token's logprob under the model's raw distribution
    top_logprobs: list[TokenLogprobs | None]


def _padded(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Token lists as a ``[rows, max_len]`` tensor padded with ``vocab`` (an out-of-range id)."""
    width = max((len(r) for r in rows), default=0) or 1
    return to_device([r + [vocab] * (width - len(r)) for r in rows], torch.long, device)


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    ids = _padded(rows, vocab, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (over prompt and output, as in transformers), presence and frequency (output)."""
    vocab, device = logits.shape[1], logits.device
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        rep = to_device([r.params.repetition_penalty for r in rows], torch.float32,
                        device)[:, None]
        seen = _token_counts([r.token_ids for r in rows], vocab,
                             device) > 0
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    if any(r.params.presence_penalty or r.params.frequency_penalty for r in rows):
        presence = to_device([r.params.presence_penalty for r in rows], torch.float32,
                             device)[:, None]
        frequency = to_device([r.params.frequency_penalty for r in rows], torch.float32,
                              device)[:, None]
        counts = _token_counts([r.output_token_ids for r in rows], vocab, device)
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def filter_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """Zeroes tokens outside each row's top-k, top-p nucleus and min-p floor; not renormalized.

    Applied in that order, as transformers' and vLLM's samplers do: the nucleus is taken of the
    distribution renormalized over the top k. ``top_k`` of 0, ``top_p`` of 1 and ``min_p`` of 0
    disable their filter for a row. The most likely token always survives.
    """
    vocab = probs.shape[1]
    sorted_probs, order = probs.sort(dim=1, descending=True)
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = ranks >= k
    # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it does.
    kept = sorted_probs.masked_fill(drop, 0.0)
    mass_before = (kept.cumsum(dim=1) - kept) / kept.sum(dim=1, keepdim=True)
    drop |= mass_before >= top_p[:, None]
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


class Sampler:
    """Picks one next token per row of logits."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        raw = logits
        # Each row's log-normalizer: the sampled tokens' logprobs need only it, and the full
        # log_softmax (a second [rows, vocab] tensor) only rows that ask for top logprobs.
        # The greedy picks come from the same pass while no penalty or mask changes the scores.
        raw_tokens, log_norm = argmax_logsumexp(raw)
        device = logits.device
        if any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty
               or r.params.frequency_penalty for r in rows):
            logits = apply_penalties(logits, rows)
        logits = self._mask_early_stops(logits, rows)

        greedy = [r.params.is_greedy for r in rows]
        tokens = raw_tokens if logits is raw else logits.argmax(dim=-1)
        if not all(greedy):
            temperature = to_device([1.0 if g else r.params.temperature
                                     for g, r in zip(greedy, rows)], torch.float32, device)
            probs = torch.softmax(logits / temperature[:, None], dim=-1)
            if any(r.params.top_k or r.params.top_p < 1.0 or r.params.min_p for r in rows):
                probs = filter_probs(
                    probs,
                    to_device([r.params.top_k for r in rows], torch.long, device),
                    to_device([r.params.top_p for r in rows], torch.float32, device),
                    to_device([r.params.min_p for r in rows], torch.float32, device))
            drawn = (probs / self._noise(probs, rows, greedy)).argmax(dim=-1)
            tokens = torch.where(to_device(greedy, torch.bool, device), tokens, drawn)

        sampled_logprobs = raw.gather(1, tokens[:, None])[:, 0] - log_norm
        # One copy to the host (float64 holds every token id exactly).
        host = torch.stack((tokens.double(), sampled_logprobs.double())).cpu()
        token_list = [int(t) for t in host[0].tolist()]
        lp_list = host[1].tolist()
        top: list[TokenLogprobs | None] = [None] * len(rows)
        wanted = [r.params.logprobs for r in rows]
        if any(w is not None for w in wanted):
            k = max(w or 0 for w in wanted)
            top_values, top_ids = ((raw - log_norm[:, None]).topk(k, dim=-1) if k
                                   else (None, None))
            for i, w in enumerate(wanted):
                if w is None:
                    continue
                entry: TokenLogprobs = {}
                if w and top_ids is not None and top_values is not None:
                    entry = dict(zip(top_ids[i, :w].tolist(), top_values[i, :w].tolist()))
                entry.setdefault(token_list[i], lp_list[i])
                top[i] = entry
        return SamplerOutput(token_list, lp_list, top)

    @staticmethod
    def _noise(probs: torch.Tensor, rows: list[SamplingRow], greedy: list[bool]
               ) -> torch.Tensor:
        """Exp(1) noise for every row that samples: a seeded row's from its own generator,
        the others' in one draw; greedy rows (whose draw is not used) get ones. Drawing a
        vocabulary's worth of noise is the sampler's largest cost, so no row is drawn twice."""
        free = [i for i, r in enumerate(rows) if not greedy[i] and r.generator is None]
        if len(free) == len(rows):
            return torch.empty_like(probs).exponential_()
        noise = torch.ones_like(probs)
        if free:
            noise[free] = torch.empty(len(free), probs.shape[1],
                                      device=probs.device).exponential_()
        for i, r in enumerate(rows):
            if r.generator is not None and not greedy[i]:
                noise[i].exponential_(generator=r.generator)
        return noise

    @staticmethod
    def _mask_early_stops(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Forbids EOS and stop tokens to rows that have not reached ``min_tokens`` yet."""
        masked = [(i, r) for i, r in enumerate(rows)
                  if r.num_output_tokens < r.params.min_tokens]
        if not masked:
            return logits
        logits = logits.clone()
        for i, r in masked:
            stops = list(r.params.stop_token_ids)
            if r.eos_token_id is not None and not r.params.ignore_eos:
                stops.append(r.eos_token_id)
            if stops:
                logits[i, stops] = float("-inf")
        return logits
