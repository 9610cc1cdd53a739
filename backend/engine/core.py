"""EngineCore.step(): schedule, execute, sample, update sequences, emit outputs.

Single-threaded by design: the offline ``LLM`` calls it directly, the async engine runs it on one
dedicated thread. Requests are validated and tokenized by ``make_request`` before they enter, so
a bad request never leaves half its state in the engine.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from backend.config import EngineConfig
from backend.engine.beam_search import BeamSearch
from backend.engine.block_manager import BlockManager
from backend.engine.detokenizer import IncrementalDetokenizer
from backend.engine.scheduler import Scheduler
from backend.engine.sequence import Request, Sequence
from backend.model.llama import LlamaModel
from backend.model.loader import LoadedModel, load_model
from backend.model.runner import ModelRunner, num_kv_blocks
from backend.model.sampler import Sampler, SamplingRow
from backend.outputs import CompletionOutput, RequestOutput
from backend.sampling_params import SamplingParams


@dataclass
class EngineStats:
    """Counters of the engine's lifetime, read by tests, benchmarks and metrics."""

    num_blocks_total: int
    num_blocks_used: int
    num_preemptions: int
    num_prefilled_tokens: int
    num_decoded_tokens: int
    num_steps: int
    num_running: int  # requests
    num_waiting: int
    num_blocks_shared: int  # blocks referenced by more than one sequence
    num_blocks_cached: int  # blocks findable in the prefix cache (in use or free)
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_cow_copies: int
    num_evictions: int


class EngineCore:
    """Owns scheduler, block manager, model runner and sampler; advances all requests a step."""

    def __init__(self, config: EngineConfig | None = None,
                 loaded: LoadedModel | None = None) -> None:
        self.config = config or EngineConfig()
        loaded = loaded or load_model(self.config.model)
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.path
        self.model = LlamaModel(loaded.config, loaded.weights, self.config.torch_dtype,
                                self.config.device)
        num_blocks = num_kv_blocks(self.model, self.config)
        self.block_manager = BlockManager(num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.max_model_len = min(self.config.max_model_len or self.model.max_positions,
                                 self.model.max_positions,
                                 self.block_manager.num_usable_blocks * self.config.block_size)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.runner = ModelRunner(self.model, num_blocks, self.config.block_size)
        self.sampler = Sampler()
        self.eos_token_id: int | None = self.tokenizer.eos_token_id
        self.vocab_size = int(self.model.lm_head.shape[0])
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self._steps = 0
        # Beam-search logits kept until every live beam of the request has its row.
        self._beam_logits: dict[Request, dict[Sequence, torch.Tensor]] = {}

    # ---- admission -------------------------------------------------------------------------

    def make_request(self, request_id: str, prompt: str | None,
                     params: SamplingParams | None = None,
                     prompt_token_ids: list[int] | None = None) -> Request:
        """Validates and tokenizes a request without touching engine state.

        Raises ``ValueError`` naming the offending field.
        """
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("prompt: either a prompt or prompt_token_ids is required")
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        bad = [t for t in prompt_token_ids
               if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: token id {bad[0]!r} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens long; the maximum "
                             f"context length is {self.max_model_len} (prompt plus at least "
                             "one generated token)")
        if (not self.config.enable_chunked_prefill
                and len(prompt_token_ids) > self.config.max_num_batched_tokens):
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens long, more than "
                             f"max_num_batched_tokens ({self.config.max_num_batched_tokens}) "
                             "with chunked prefill disabled")
        if params.num_seqs > self.config.max_num_seqs:
            field = "beam_width" if params.use_beam_search else "n"
            raise ValueError(f"SamplingParams.{field} is {params.num_seqs}, more than "
                             f"max_num_seqs ({self.config.max_num_seqs})")
        if params.num_seqs > 1:
            # All of a request's sequences must fit the cache together, or it could never run.
            longest = min(len(prompt_token_ids) + (params.max_tokens or self.max_model_len),
                          self.max_model_len)
            needed = params.num_seqs * -(-longest // self.config.block_size)
            if needed > self.block_manager.num_usable_blocks:
                raise ValueError(
                    f"max_tokens: {params.num_seqs} sequences of up to {longest} tokens need up "
                    f"to {needed} KV blocks, more than the cache's "
                    f"{self.block_manager.num_usable_blocks}; lower max_tokens")
        return Request(request_id, prompt, prompt_token_ids, params, next(self._arrivals),
                       self.max_model_len)

    def add_request(self, request: Request) -> None:
        """Queues a request made by ``make_request``; it starts as one sequence."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = request.params
        if params.use_beam_search:
            end_tokens = set(params.stop_token_ids)
            if self.eos_token_id is not None and not params.ignore_eos:
                end_tokens.add(self.eos_token_id)
            max_new = self.max_model_len - len(request.prompt_token_ids)
            if params.max_tokens is not None:
                max_new = min(max_new, params.max_tokens)
            request.beam_search = BeamSearch(params.beam_width, params.length_penalty,
                                             params.early_stopping, end_tokens,
                                             params.min_tokens, max_new)
        seq = self._new_sequence(request, 0, list(request.prompt_token_ids))
        request.seqs.append(seq)
        self.scheduler.add(request)
        self.requests[request.request_id] = request

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        params = request.params
        generator = None
        if params.seed is not None and not params.use_beam_search:
            generator = torch.Generator(device=self.config.device)
            generator.manual_seed(params.seed + index)
        return Sequence(
            seq_id=next(self._seq_ids), request=request, index=index, token_ids=token_ids,
            num_prompt_tokens=len(request.prompt_token_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                               params.skip_special_tokens),
            generator=generator)

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        child = self._new_sequence(parent.request, index, list(parent.token_ids))
        child.cumulative_logprob = parent.cumulative_logprob
        self.scheduler.fork(parent, child)
        parent.request.seqs.append(child)
        return child

    def reset_prefix_cache(self) -> bool:
        """Empties the prefix cache (benchmarks, changed weights); ``False`` while requests
        hold blocks."""
        return self.block_manager.reset_prefix_cache()

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends a request now, returning its blocks; ``None`` if it is not (or no longer) here."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._beam_logits.pop(request, None)
        for seq in request.live_seqs:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)
        return self._output(request, {})

    # ---- the step --------------------------------------------------------------------------

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns an output for every request that advanced."""
        batch = self.scheduler.schedule()
        for seq in batch.preempted:  # recomputed later, logits included
            self._beam_logits.get(seq.request, {}).pop(seq, None)
        if batch.is_empty:
            return []
        self._steps += 1
        step_logits = self.runner.execute(batch)
        self.scheduler.commit(batch)
        seqs: list[Sequence] = []
        rows: list[int] = []
        for row, seq in enumerate(step_logits.seqs):
            request = seq.request
            if request.beam_search is not None:
                self._beam_logits.setdefault(request, {})[seq] = step_logits.logits[row]
                continue
            group = [seq]
            if request.params.n > 1 and not request.forked:
                # The prompt is computed once; its samples share its blocks from here on.
                request.forked = True
                group += [self._fork(seq, i) for i in range(1, request.params.n)]
            seqs += group
            rows += [row] * len(group)
        deltas: dict[Request, dict[Sequence, int]] = {}
        if seqs:
            # Index only when rows repeat (forks) or are skipped (beams): it copies the logits.
            logits = step_logits.logits
            if rows != list(range(logits.shape[0])):
                logits = logits[rows]
            sampled = self.sampler(logits, [
                SamplingRow(s.params, s.token_ids, s.num_prompt_tokens, s.generator,
                            self.eos_token_id) for s in seqs])
            for seq, token, logprob, top in zip(seqs, sampled.token_ids, sampled.logprobs,
                                                sampled.top_logprobs):
                seq.token_ids.append(token)
                seq.cumulative_logprob += logprob
                if top is not None:
                    seq.logprobs.append(top)
                self._check_stop(seq, token)
                deltas.setdefault(seq.request, {})[seq] = token
        outputs = []
        for request in [r for r, got in self._beam_logits.items()
                        if len(got) == len(r.live_seqs)]:
            self._beam_step(request)
            if request.is_finished:
                outputs.append(self._beam_output(request))
        for request, new_tokens in deltas.items():
            if request.is_finished:
                self.requests.pop(request.request_id, None)
            outputs.append(self._output(request, new_tokens))
        return outputs

    def _beam_step(self, request: Request) -> None:
        """Advances a beam search whose live beams all have their next logits."""
        search = request.beam_search
        assert search is not None
        got = self._beam_logits.pop(request)
        beams = request.live_seqs
        log_probs = torch.log_softmax(torch.stack([got[b] for b in beams]).float(), dim=-1)
        continuations = search.step(log_probs, [b.output_token_ids for b in beams])
        if search.done:
            for beam in request.live_seqs:
                self.scheduler.finish(beam)
            request.seqs.clear()
            self.requests.pop(request.request_id, None)
            return
        # Children of a beam share its blocks; a beam without children is dropped at once.
        taken: set[Sequence] = set()
        next_beams: list[tuple[Sequence, int]] = []
        for c in continuations:
            parent = beams[c.parent]
            if parent in taken:
                next_beams.append((self._fork(parent, len(request.seqs)), c.token))
            else:
                taken.add(parent)
                next_beams.append((parent, c.token))
        for beam in beams:
            if beam not in taken:
                self.scheduler.finish(beam)
        for (beam, token), score in zip(next_beams, search.running_scores.tolist()):
            beam.token_ids.append(token)
            beam.cumulative_logprob = score
        request.seqs = [beam for beam, _ in next_beams]

    def _beam_output(self, request: Request) -> RequestOutput:
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
                             [c.token_ids for c in completions])

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if token == self.eos_token_id and not params.ignore_eos:
            self._finish(seq, "stop", None, render=False)
            return
        if token in params.stop_token_ids:
            self._finish(seq, "stop", token, render=params.include_stop_str_in_output)
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
                self._finish(seq, "stop", stop, render=False)
                return
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None, render=False)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None,
                render: bool) -> None:
        if render:
            seq.detokenizer.append(seq.token_ids[-1])
        if not isinstance(stop_reason, str):  # a stop string already cut the text to size
            seq.detokenizer.flush()
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq)

    def _output(self, request: Request, new_tokens: dict[Sequence, int]) -> RequestOutput:
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
            delta_ids.append([new_tokens[seq]] if seq in new_tokens else [])
            completions.append(CompletionOutput(
                index=seq.index, text=text[:visible], token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             completions, request.is_finished, delta_texts, delta_ids)

    def stats(self) -> EngineStats:
        s = self.scheduler.stats
        bm = self.block_manager
        return EngineStats(
            num_blocks_total=self.block_manager.num_usable_blocks,
            num_blocks_used=self.block_manager.num_used_blocks,
            num_preemptions=s.num_preemptions, num_prefilled_tokens=s.num_prefilled_tokens,
            num_decoded_tokens=s.num_decoded_tokens, num_steps=self._steps,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_blocks_shared=bm.num_shared_blocks, num_blocks_cached=bm.num_cached_blocks,
            prefix_cache_queried_tokens=bm.stats.prefix_queried_tokens,
            prefix_cache_hit_tokens=bm.stats.prefix_hit_tokens,
            num_cow_copies=bm.stats.cow_copies, num_evictions=bm.stats.evictions)
