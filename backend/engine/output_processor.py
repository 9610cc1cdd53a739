"""From sampled tokens to what callers see: stop conditions, text, and request outputs.

Per request and per sequence, with no batch state: the core calls it for each request a step
advanced. Ending a sequence returns its blocks through the ``finish`` callback the core hands
in (the scheduler's), so this module never reaches into the scheduler itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pagedserve.engine.sequence import Request, Sequence
from pagedserve.outputs import CompletionOutput, RequestOutput, TokenLogprobs


class OutputProcessor:
    """Stop checks, detokenization and output building for one model's requests."""

    def __init__(self, tokenizer: Any, eos_token_id: int | None, max_model_len: int,
                 finish: Callable[[Sequence], None]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        self._finish = finish

    def check_stop(self, seq: Sequence, token: int) -> None:
        """Renders the sequence's new token and ends the sequence if a stop condition holds."""
        params = seq.params
        if token == self.eos_token_id and not params.ignore_eos:
            self._end(seq, "stop", None, render=False)
            return
        if token in params.stop_token_ids:
            self._end(seq, "stop", token, render=params.include_stop_str_in_output)
            return
        delta = seq.detokenizer.append(token)
        if params.stop and delta and seq.num_output_tokens >= params.min_tokens:
            text = seq.detokenizer.text
            longest = max(len(s) for s in params.stop)
            start = max(0, len(text) - len(delta) - longest + 1)
            hits = [(i, s) for s in params.stop if (i := text.find(s, start)) >= 0]
            if hits:
                index, stop = min(hits)
                cut = index + (len(stop) if params.include_stop_str_in_output else 0)
                seq.detokenizer.text = text[:cut]
                self._end(seq, "stop", stop, render=False)
                return
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            self._end(seq, "length", None, render=False)

    def end_with_grammar(self, seq: Sequence) -> None:
        """Ends a sequence whose constraint has ended: nothing may follow its output."""
        self._end(seq, "stop", None, render=False)

    def _end(self, seq: Sequence, reason: str, stop_reason: str | int | None,
                render: bool) -> None:
        if render:
            seq.detokenizer.append(seq.token_ids[-1])
        if not isinstance(stop_reason, str):  # a stop string already cut the text to size
            seq.detokenizer.flush()
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self._finish(seq)

    def output(self, request: Request, new_tokens: dict[Sequence, list[int]]) -> RequestOutput:
        """The request's state after a step: texts so far and what this step added (a
        sequence may gain several tokens in a step, by speculative decoding)."""
        completions, delta_texts, delta_ids = [], [], []
        for seq in request.seqs:
            text = seq.detokenizer.text
            visible = len(text)
            if not seq.is_finished and seq.params.stop:
                # Hold back a possible stop string's beginning until it is decided.
                held = max(len(s) for s in seq.params.stop) - 1
                visible = max(seq.text_sent, len(text) - held)
            delta_texts.append(text[seq.text_sent: visible])
            seq.text_sent = visible
            delta_ids.append(list(new_tokens.get(seq, ())))
            completions.append(CompletionOutput(
                index=seq.index, text=text[:visible], token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             completions, request.is_finished, delta_texts, delta_ids,
                             num_cached_tokens=request.num_cached_tokens,
                             prompt_logprobs=_prompt_logprobs(request))

    def beam_output(self, request: Request) -> RequestOutput:
        """A finished beam search's best ``n`` beams, rendered whole."""
        search = request.beam_search
        assert search is not None
        skip = request.params.skip_special_tokens
        completions = [
            CompletionOutput(index=i, text=str(self.tokenizer.decode(b.output_token_ids,
                                                                     skip_special_tokens=skip)),
                             token_ids=b.output_token_ids,
                             cumulative_logprob=b.cumulative_logprob,
                             finish_reason=b.finish_reason, score=b.score)
            for i, b in enumerate(search.best(request.params.n))]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             completions, True, [c.text for c in completions],
                             [c.token_ids for c in completions],
                             num_cached_tokens=request.num_cached_tokens)


def _prompt_logprobs(request: Request) -> list[TokenLogprobs | None] | None:
    """The request's prompt logprobs once all are known (the list changes no more then, so
    every output may hold it)."""
    if request.params.prompt_logprobs is None or request.computes_prompt_logprobs:
        return None
    return request.prompt_logprobs
