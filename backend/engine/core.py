"""EngineCore.step(): schedule, execute, sample, update sequences, emit outputs.

Single-threaded by design: the offline ``LLM`` calls it directly, the async engine runs it on one
dedicated thread. Requests are validated and tokenized by ``make_request`` before they enter, so
a bad request never leaves half its state in the engine.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from backend.config import EngineConfig
from backend.engine.beam_search import BeamSearch
from backend.engine.block_manager import BlockManager
from backend.engine.detokenizer import IncrementalDetokenizer
from backend.engine.input_processor import AdmissionLimits, InputProcessor, max_prompt_chars
from backend.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from backend.engine.sequence import Request, Sequence
from backend.model.llama import LlamaModel
from backend.model.loader import LoadedModel, load_model
from backend.model.runner import ModelRunner, StepLogits, num_kv_blocks
from backend.model.sampler import Sampler, SamplerOutput, SamplingRow
from backend.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from backend.sampling_params import SamplingParams

log = logging.getLogger(__name__)


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
        self.limits = AdmissionLimits(
            vocab_size=self.vocab_size, max_model_len=self.max_model_len,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            enable_chunked_prefill=self.config.enable_chunked_prefill,
            num_usable_blocks=self.block_manager.num_usable_blocks,
            block_size=self.config.block_size,
            max_logprobs=min(self.config.max_logprobs, self.vocab_size),
            max_prompt_chars=max_prompt_chars(self.tokenizer, self.max_model_len))
        self.input_processor = InputProcessor(self.tokenizer, self.limits)
        self.requests: dict[str, Request] = {}
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
        return self.input_processor.make_request(request_id, prompt, params, prompt_token_ids)

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
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._release(request)
        return self._output(request, {})

    def _release(self, request: Request) -> None:
        """Takes a request out of the engine: its live sequences end as aborted, blocks return."""
        self.requests.pop(request.request_id, None)
        self._beam_logits.pop(request, None)
        for seq in request.live_seqs:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def _fail(self, request: Request, error: BaseException) -> RequestOutput:
        """Ends a request whose own step work raised; the rest of the batch carries on."""
        log.error("request %s failed in step %d", request.request_id, self._steps,
                  exc_info=error)
        self._release(request)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, [],
                             True, error=f"{type(error).__name__}: {error}")

    # ---- the step --------------------------------------------------------------------------

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns an output for every request that advanced or failed.

        Work that belongs to one request (its rows of the forward pass, its sampling, its beam
        step, stop checks and detokenization) is isolated: if it raises, that request alone
        ends, with ``error`` set on its output, and the others go on.
        """
        batch = self.scheduler.schedule()
        for seq in batch.preempted:  # recomputed later, logits included
            self._beam_logits.get(seq.request, {}).pop(seq, None)
        if batch.is_empty:
            return []
        self._steps += 1
        step_logits, failed = self._execute(batch)
        if failed:  # their K/V may be half written: never commit it to the prefix cache
            batch.scheduled = [s for s in batch.scheduled if s.seq.request not in failed]
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
        results: dict[Request, list[tuple[Sequence, int, float, TokenLogprobs | None]]] = {}
        if seqs:
            # Index only when rows repeat (forks) or are skipped (beams): it copies the logits.
            logits = step_logits.logits
            if rows != list(range(logits.shape[0])):
                logits = logits[rows]
            sampled, sample_failed = self._sample(logits, seqs)
            failed.update(sample_failed)
            for seq, token, logprob, top in zip(seqs, sampled.token_ids, sampled.logprobs,
                                                sampled.top_logprobs):
                if seq.request not in failed:
                    results.setdefault(seq.request, []).append((seq, token, logprob, top))
        outputs = [self._fail(request, error) for request, error in failed.items()]
        for request in [r for r, got in self._beam_logits.items()
                        if len(got) == len(r.live_seqs)]:
            try:
                self._beam_step(request)
                if request.is_finished:
                    outputs.append(self._beam_output(request))
            except Exception as e:
                outputs.append(self._fail(request, e))
        for request, sequences in results.items():
            try:
                outputs.append(self._advance(request, sequences))
            except Exception as e:
                outputs.append(self._fail(request, e))
        return outputs

    def _execute(self, batch: SchedulerOutput) -> tuple[StepLogits, dict[Request, Exception]]:
        """Runs the batch; if it raises, runs each request's part alone to find the culprits.

        Rerunning is safe: a step writes only its own tokens' slots, so a second pass writes
        the same values, and the block copies are made again before any part runs.
        """
        try:
            return self.runner.execute(batch), {}
        except Exception:
            log.exception("step %d failed; running its requests one at a time", self._steps)
        self.runner.copy_blocks(batch.block_copies)
        parts: dict[Request, list[ScheduledSeq]] = {}
        for item in batch.scheduled:
            parts.setdefault(item.seq.request, []).append(item)
        done: list[StepLogits] = []
        failed: dict[Request, Exception] = {}
        for request, items in parts.items():
            try:
                done.append(self.runner.execute(SchedulerOutput(scheduled=items)))
            except Exception as e:
                failed[request] = e
        if not done:
            return StepLogits([], torch.empty(0, self.vocab_size)), failed
        return StepLogits([s for d in done for s in d.seqs],
                          torch.cat([d.logits for d in done])), failed

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]
                ) -> tuple[SamplerOutput, dict[Request, Exception]]:
        """Samples every row; if the batch raises, samples each request's rows alone.

        A seeded row keeps its sequence unless the failure came after its draw had advanced
        its generator.
        """
        rows = [SamplingRow(s.params, s.token_ids, s.num_prompt_tokens, s.generator,
                            self.eos_token_id) for s in seqs]
        try:
            return self.sampler(logits, rows), {}
        except Exception:
            log.exception("sampling in step %d failed; sampling its requests one at a time",
                          self._steps)
        merged = SamplerOutput([0] * len(rows), [0.0] * len(rows), [None] * len(rows))
        indices: dict[Request, list[int]] = {}
        for i, seq in enumerate(seqs):
            indices.setdefault(seq.request, []).append(i)
        failed: dict[Request, Exception] = {}
        for request, index in indices.items():
            try:
                part = self.sampler(logits[index], [rows[i] for i in index])
            except Exception as e:
                failed[request] = e
                continue
            for j, i in enumerate(index):
                merged.token_ids[i] = part.token_ids[j]
                merged.logprobs[i] = part.logprobs[j]
                merged.top_logprobs[i] = part.top_logprobs[j]
        return merged, failed

    def _advance(self, request: Request,
                 sequences: list[tuple[Sequence, int, float, TokenLogprobs | None]]
                 ) -> RequestOutput:
        """Appends each sequence's new token, checks its stop conditions, makes the output."""
        for seq, token, logprob, top in sequences:
            seq.token_ids.append(token)
            seq.cumulative_logprob += logprob
            if top is not None:
                seq.logprobs.append(top)
            self._check_stop(seq, token)
        if request.is_finished:
            self.requests.pop(request.request_id, None)
        return self._output(request, {seq: token for seq, token, _, _ in sequences})

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
