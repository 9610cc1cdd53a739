"""Beam search bookkeeping for one request: which beams live on, which finish, when to stop.

The rules are those of ``transformers``' ``generate(num_beams=k, do_sample=False)`` (v4.50+),
float32 arithmetic included, so results match it: every step takes the ``2k`` best
continuations over all beams by cumulative log-probability; the best ``k`` that do not end
(end-of-sequence token or length limit) live on; ending ones among the first ``k`` enter the
finished set scored ``cumulative / generated_length ** length_penalty``, which keeps its ``k``
best; the search stops when ``early_stopping`` says so or when no live beam can still beat the
worst finished one (the heuristic of ``transformers``).

This module knows nothing of blocks or sequences: the engine hands it each step's log-probs of
the live beams, in order, and applies the returned decisions (forks, drops, appended tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NEG = -1.0e9  # transformers' "impossible" score, kept so float32 rounding matches


@dataclass
class Continuation:
    """A live beam of the next step: ``parent`` (index among this step's beams) plus ``token``."""

    parent: int
    token: int


@dataclass
class FinishedBeam:
    output_token_ids: list[int]
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(output_token_ids) ** length_penalty
    finish_reason: str  # "stop" (an end token) or "length"


class BeamSearch:
    """The state of one request's beam search across steps."""

    def __init__(self, width: int, length_penalty: float, early_stopping: bool | str,
                 end_token_ids: set[int], min_new_tokens: int, max_new_tokens: int) -> None:
        self.width = width
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.end_token_ids = sorted(end_token_ids)
        self.min_new_tokens = min_new_tokens
        self.max_new_tokens = max_new_tokens
        # transformers keeps (1 + number of end tokens) * k candidates, at least 2k.
        self.num_candidates = max(2, 1 + len(self.end_token_ids)) * width
        self.running_scores = torch.zeros(1)
        self._finished_scores = torch.full((width,), _NEG)
        self._finished: list[FinishedBeam | None] = [None] * width
        self._improvement_possible = True
        self.done = False

    def step(self, log_probs: torch.Tensor, outputs: list[list[int]]) -> list[Continuation]:
        """Advances the search by one token.

        ``log_probs`` is ``[beams, vocab]`` (log-softmax of the live beams' logits, on any
        device), ``outputs`` the beams' generated tokens so far (all of one length). Returns the
        next step's live beams, best first; afterwards ``done`` tells whether the search is over.
        """
        generated = len(outputs[0])
        # The search's state lives on the host: its decisions become Python lists each step,
        # so one copy of the scores there costs no more synchronisation than those reads.
        log_probs = log_probs.float().cpu()
        if generated < self.min_new_tokens and self.end_token_ids:
            log_probs = log_probs.clone()
            log_probs[:, self.end_token_ids] = float("-inf")
        vocab = log_probs.shape[1]
        total = (log_probs + self.running_scores[:, None]).reshape(-1)
        top_scores, top_index = torch.topk(total, min(self.num_candidates, total.numel()))
        parents = (top_index // vocab).tolist()
        tokens = (top_index % vocab).tolist()
        at_length = generated + 1 >= self.max_new_tokens
        end_tokens = set(self.end_token_ids)
        ends = torch.tensor([at_length or t in end_tokens for t in tokens])

        live_scores = top_scores + ends.float() * _NEG
        live = torch.topk(live_scores, self.width).indices.tolist()
        self.running_scores = live_scores[live]

        self._add_finished(top_scores, ends, parents, tokens, outputs, generated + 1)

        if self._improvement_possible:
            if self.early_stopping == "never" and self.length_penalty > 0.0:
                best_length = self.max_new_tokens
            else:
                best_length = generated + 1
            best_running = self.running_scores[:1] / (best_length ** self.length_penalty)
            all_finished = all(f is not None for f in self._finished)
            worst_finished = self._finished_scores.min() if all_finished else torch.tensor(_NEG)
            self._improvement_possible = bool((best_running > worst_finished).any())
        all_finished = all(f is not None for f in self._finished)
        self.done = (not self._improvement_possible
                     or (all_finished and self.early_stopping is True)
                     or bool(ends.all()))
        return [Continuation(parents[i], tokens[i]) for i in live]

    def _add_finished(self, top_scores: torch.Tensor, ends: torch.Tensor, parents: list[int],
                      tokens: list[int], outputs: list[list[int]], length: int) -> None:
        just_finished = ends.clone()
        just_finished[self.width:] = False
        scores = top_scores / (length ** self.length_penalty)
        all_finished = all(f is not None for f in self._finished)
        if all_finished and self.early_stopping is True:
            scores = scores + _NEG
        if not self._improvement_possible:
            scores = scores + _NEG
        scores = scores + (~just_finished).float() * _NEG
        merged = torch.cat((self._finished_scores, scores))
        keep = torch.topk(merged, self.width).indices.tolist()
        finished: list[FinishedBeam | None] = []
        for i in keep:
            if i < self.width:
                finished.append(self._finished[i])
            elif just_finished[i - self.width]:
                j = i - self.width
                token = tokens[j]
                finished.append(FinishedBeam(
                    output_token_ids=[*outputs[parents[j]], token],
                    cumulative_logprob=float(top_scores[j]), score=float(scores[j]),
                    finish_reason="stop" if token in self.end_token_ids else "length"))
            else:
                finished.append(None)
        self._finished_scores = merged[keep]
        self._finished = finished

    def best(self, n: int) -> list[FinishedBeam]:
        """The ``n`` best finished beams, best first."""
        return [f for f in self._finished if f is not None][:n]
