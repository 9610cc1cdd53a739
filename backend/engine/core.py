"""EngineCore.step(): schedule, execute, sample, update sequences, emit outputs.

Single-threaded by design: the offline ``LLM`` calls it directly, the async engine runs it on one
dedicated thread. Requests are validated and tokenized by ``make_request`` before they enter, so
a bad request never leaves half its state in the engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace

import torch

from pagedserve.config import EngineConfig
from pagedserve.engine.beam_search import BeamSearch
from pagedserve.engine.block_manager import BlockManager, BlockTable
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.input_processor import AdmissionLimits, InputProcessor, max_prompt_chars
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.engine.sequence import Request, Sequence
from pagedserve.engine.stats import EngineObserver, FinishedRequest, RequestInfo, StepStats
from pagedserve.engine.structured_output import (
    CompiledConstraint,
    StructuredOutputCompiler,
    grammar_bitmask,
)
from pagedserve.kernels.token_bitmask import mask_rows_
from pagedserve.lora_request import LoRARequest
from pagedserve.model.base import CausalLM
from pagedserve.model.batch import ModelInput, ModelOutput, PromptLogprobs, SeqChunk
from pagedserve.model.executor import ExecutorDied, InProcessExecutor, start_executor
from pagedserve.model.loader import LoadedModel
from pagedserve.model.sampler import Sampler, SamplerOutput, SamplingRow
from pagedserve.outputs import RequestOutput, TokenLogprobs
from pagedserve.sampling_params import SamplingParams

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
    tensor_parallel_comm_ns: int  # time the steps spent in tensor-parallel communication
    # Speculative decoding: draft tokens checked, and of those the ones the model agreed with.
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0


@dataclass(frozen=True)
class ModelSummary:
    """What the engine serves, for start-up reports: family, dtype and KV capacity."""

    family: str
    dtype: str
    kv_blocks: int  # usable blocks of the paged cache
    kv_tokens: int  # tokens they hold (blocks x block size)


@dataclass
class _StepTiming:
    """Phase boundaries and the latencies a step completed, gathered as it runs."""

    sampled_ns: int
    start_ns: int = 0
    scheduled_ns: int = 0
    forwarded_ns: int = 0
    end_ns: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    generated: int = 0  # tokens appended to sequences
    drafted: int = 0  # draft tokens checked
    accepted: int = 0  # of those, the ones the model agreed with


class EngineCore:
    """Owns scheduler, block manager, executor (the model) and sampler; advances all requests
    a step."""

    def __init__(self, config: EngineConfig | None = None,
                 loaded: LoadedModel | None = None,
                 observers: Seq[EngineObserver] = ()) -> None:
        self.config = config or EngineConfig()
        self.executor, loaded = start_executor(self.config, loaded)
        try:
            self._setup(loaded, observers)
        except BaseException:
            self.executor.shutdown()  # its workers, if any, must not outlive a failed start
            raise

    def _setup(self, loaded: LoadedModel, observers: Seq[EngineObserver]) -> None:
        facts = self.executor.facts
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.path
        self.model_family = facts.family
        self.dtype = self.config.resolved_dtype
        self.block_manager = BlockManager(facts.num_kv_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.max_model_len = min(self.config.max_model_len or facts.max_positions,
                                 facts.max_positions,
                                 self.block_manager.num_usable_blocks * self.config.block_size)
        self.scheduler = Scheduler(self.config, self.block_manager, facts.sliding_window)
        self.sampler = Sampler()
        self.eos_token_id: int | None = self.tokenizer.eos_token_id
        self.vocab_size = facts.vocab_size
        self.limits = AdmissionLimits(
            vocab_size=self.vocab_size, max_model_len=self.max_model_len,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            enable_chunked_prefill=self.config.enable_chunked_prefill,
            num_usable_blocks=self.block_manager.num_usable_blocks,
            block_size=self.config.block_size,
            max_logprobs=min(self.config.max_logprobs, self.vocab_size),
            max_prompt_chars=max_prompt_chars(self.tokenizer, self.max_model_len),
            enable_lora=self.config.enable_lora)
        self.input_processor = InputProcessor(self.tokenizer, self.limits)
        self.structured = StructuredOutputCompiler(self.tokenizer, self.vocab_size)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_id,
                                                self.max_model_len, self.scheduler.finish)
        self.requests: dict[str, Request] = {}
        # Tracing and metrics; with none, the step records nothing for them.
        self._observers = list(observers)
        if self.config.enable_lora:
            # Observers that report adapters (vLLM's vllm:lora_requests_info) learn max_loras.
            for observer in self._observers:
                serve_lora = getattr(observer, "serve_lora", None)
                if serve_lora is not None:
                    serve_lora(self.config.max_loras)
        self._last_totals = (0, 0, 0, 0)  # block-manager counters at the last step report
        self._seq_ids = itertools.count()
        self._steps = 0
        self._comm_ns = 0  # tensor-parallel communication, all steps together
        self._drafted = 0  # speculative decoding, all steps together
        self._accepted = 0
        # Beam-search logits kept until every live beam of the request has its row.
        self._beam_logits: dict[Request, dict[Sequence, torch.Tensor]] = {}

    # ---- admission -------------------------------------------------------------------------

    def make_request(self, request_id: str, prompt: str | None,
                     params: SamplingParams | None = None,
                     prompt_token_ids: list[int] | None = None,
                     trace_headers: Mapping[str, str] | None = None,
                     lora_request: LoRARequest | None = None,
                     constraint: CompiledConstraint | None = None) -> Request:
        """Validates and tokenizes a request without touching engine state; compiles its
        ``structured_outputs`` here unless ``constraint`` is that, compiled already
        (``structured.submit``, off the caller's thread).

        Raises ``ValueError`` naming the offending field.
        """
        if params is not None and params.structured_outputs is not None and constraint is None:
            constraint = self.structured.compile(params.structured_outputs)
        return self.input_processor.make_request(request_id, prompt, params, prompt_token_ids,
                                                 trace_headers=trace_headers,
                                                 lora_request=lora_request,
                                                 constraint=constraint)

    def load_lora(self, lora_request: LoRARequest) -> None:
        """Reads and checks the adapter so that the steps find it loaded (``LoRAError``, a
        ``ValueError``, naming what is wrong): called off the step thread, before the request
        that names it is queued."""
        self.executor.load_lora(lora_request)

    def unload_lora(self, lora_id: int) -> None:
        """Forgets adapter ``lora_id``'s loaded weights (it was removed from service); any
        thread."""
        self.executor.unload_lora(lora_id)

    def summary(self) -> ModelSummary:
        blocks = self.block_manager.num_usable_blocks
        return ModelSummary(self.model_family, self.dtype, blocks,
                            blocks * self.config.block_size)

    def make_device_current(self) -> None:
        """Makes the model's GPU the calling thread's current CUDA device: a new thread starts
        on device 0, and work that names no device (synchronisation, memory queries) runs on
        the current one."""
        device = self.executor.device
        if device.type == "cuda":
            torch.cuda.set_device(device)

    @property
    def model(self) -> CausalLM:
        """The model, where it runs in this process (``tensor_parallel_size`` 1): for tests
        and tools that look inside it."""
        if not isinstance(self.executor, InProcessExecutor):
            raise AttributeError("the model runs in tensor-parallel worker processes")
        return self.executor.model

    def failure(self) -> str | None:
        """Why the engine can take no more steps (a tensor-parallel worker died), or None."""
        return self.executor.failure()

    def check_executor(self) -> None:
        """``ExecutorDied`` if a tensor-parallel worker is gone (the others are stopped then):
        for the engine's thread while it has no step to run."""
        self.executor.check()

    def shutdown(self) -> None:
        """Flushes the observers (buffered spans) and stops the executor's workers; the engine
        takes no more steps after it."""
        try:
            for observer in self._observers:
                observer.shutdown()
        finally:
            self.structured.shutdown()
            self.executor.shutdown()

    def add_request(self, request: Request) -> None:
        """Queues a request made by ``make_request``; it starts as one sequence."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        lora = request.lora_request
        if lora is not None:
            # A step's adapters are told apart by id: one id, one adapter at a time.
            clash = next((r.lora_request for r in self.requests.values()
                          if r.lora_request is not None
                          and r.lora_request.lora_int_id == lora.lora_int_id
                          and r.lora_request != lora), None)
            if clash is not None:
                raise ValueError(f"lora_request: id {lora.lora_int_id} names adapter "
                                 f"{clash.lora_name!r} in requests still running; adapter "
                                 f"{lora.lora_name!r} needs another id")
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
        if self._observers:
            params = request.params
            info = RequestInfo(request.request_id, request.arrival_ns,
                               len(request.prompt_token_ids), params.max_tokens,
                               params.temperature, params.top_p, params.n,
                               request.trace_headers,
                               None if request.lora_request is None
                               else request.lora_request.lora_name)
            for observer in self._observers:
                observer.on_request_added(info)

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
            generator=generator, block_table=BlockTable(root=request.prefix_root),
            grammar=None if request.constraint is None else request.constraint.new_matcher())

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        child = self._new_sequence(parent.request, index, list(parent.token_ids))
        if child.grammar is not None:
            for token in parent.output_token_ids:
                child.grammar.accept(token)
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
        output = self.output_processor.output(request, {})
        self._report_finished(request, output, time.time_ns())
        return output

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

    def _report_finished(self, request: Request, output: RequestOutput, now_ns: int) -> None:
        if not self._observers:
            return
        record = FinishedRequest(
            request_id=request.request_id, arrival_ns=request.arrival_ns,
            first_scheduled_ns=request.first_scheduled_ns,
            first_token_ns=request.first_token_ns, finished_ns=now_ns,
            preemption_ns=tuple(request.preemption_ns),
            num_prompt_tokens=len(request.prompt_token_ids),
            num_generation_tokens=sum(len(c.token_ids) for c in output.outputs),
            finish_reasons=(("error",) if output.error is not None else
                            tuple(c.finish_reason or "abort" for c in output.outputs)),
            error=output.error, num_cached_tokens=request.num_cached_tokens)
        for observer in self._observers:
            observer.on_request_finished(record)

    # ---- the step --------------------------------------------------------------------------

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns an output for every request that advanced or failed.

        Schedule (which tokens run, as plain data for the runner), execute, then
        ``update_from_output`` (sampling and all bookkeeping). Work that belongs to one request
        (its rows of the forward pass, its sampling, its beam step, stop checks and
        detokenization) is isolated: if it raises, that request alone ends, with ``error`` set
        on its output, and the others go on.
        """
        start_ns = time.time_ns()
        batch = self.scheduler.schedule()
        for seq in batch.preempted:  # recomputed later, logits included
            self._beam_logits.get(seq.request, {}).pop(seq, None)
        if batch.is_empty:
            return []
        self._steps += 1
        scheduled_ns = time.time_ns()
        queues = (len(self.scheduler.running), len(self.scheduler.waiting))
        served = {item.seq.request.request_id: item.seq.request for item in batch.scheduled}
        if self._observers:
            self._mark_scheduled(batch, scheduled_ns)
        model_output, failed = self._execute(batch)
        forwarded_ns = time.time_ns()
        if failed:  # their K/V may be half written: never commit it to the prefix cache
            batch.scheduled = [s for s in batch.scheduled if s.seq.request not in failed]
        self.scheduler.commit(batch)
        outputs, timing = self.update_from_output(batch, model_output, failed)
        if self._observers:
            end_ns = time.time_ns()
            self._report_step(batch, queues, tuple(served), replace(
                timing, start_ns=start_ns, scheduled_ns=scheduled_ns, forwarded_ns=forwarded_ns,
                end_ns=end_ns))
            # After the step's record, whose span links to these requests' spans; they end
            # with the step, when their outputs go out.
            for output in outputs:
                if output.finished and output.request_id in served:
                    self._report_finished(served[output.request_id], output, end_ns)
        return outputs

    def update_from_output(self, batch: SchedulerOutput, model_output: ModelOutput,
                           failed: dict[Request, Exception]
                           ) -> tuple[list[RequestOutput], _StepTiming]:
        """Samples the step's logits and applies the result: forks of ``n > 1`` requests whose
        prompt completed, beam steps, draft checks, new tokens, stop checks, finished requests,
        outputs.

        ``failed`` holds the requests whose forward pass failed; sampling adds its own. Returns
        the outputs and the latencies this step completed.
        """
        seqs_by_id = {item.seq.seq_id: item.seq for item in batch.scheduled}
        drafts = {item.seq: item.draft_token_ids for item in batch.scheduled
                  if item.draft_token_ids}
        for seq_id, found in model_output.prompt_logprobs.items():
            self._add_prompt_logprobs(seqs_by_id[seq_id].request, found)
        seqs: list[Sequence] = []
        rows: list[int] = []
        histories: list[list[int]] = []  # the tokens each sampled row follows
        checked: dict[Sequence, int] = {}  # index of a drafted sequence's latest row
        for row, seq_id in enumerate(model_output.seq_ids):
            seq = seqs_by_id[seq_id]
            request = seq.request
            if request.beam_search is not None:
                self._beam_logits.setdefault(request, {})[seq] = model_output.logits[row]
                continue
            if seq in drafts:
                # Row j of a checked chunk follows the sequence's tokens and its first j
                # drafts: sampled as if those were accepted, it is what the plain path would
                # pick there (penalties, min_tokens and logprobs included).
                j = checked[seq] = checked.get(seq, -1) + 1
                seqs.append(seq)
                rows.append(row)
                histories.append(seq.token_ids + drafts[seq][:j])
                continue
            group = [seq]
            if request.params.n > 1 and not request.forked:
                # The prompt is computed once; its samples share its blocks from here on.
                request.forked = True
                group += [self._fork(seq, i) for i in range(1, request.params.n)]
            seqs += group
            rows += [row] * len(group)
            histories += [seq.token_ids] * len(group)
        results: dict[Request, list[tuple[Sequence, int, float, TokenLogprobs | None]]] = {}
        if seqs:
            # Index only when rows repeat (forks) or are skipped (beams): it copies the logits.
            logits = model_output.logits
            if rows != list(range(logits.shape[0])):
                logits = logits[rows]
            sampled, sample_failed = self._sample(logits, seqs, histories)
            failed.update(sample_failed)
            for seq, token, logprob, top in zip(seqs, sampled.token_ids, sampled.logprobs,
                                                sampled.top_logprobs):
                if seq.request not in failed:
                    results.setdefault(seq.request, []).append((seq, token, logprob, top))
        sampled_ns = time.time_ns()
        timing = _StepTiming(sampled_ns=sampled_ns)
        outputs: list[RequestOutput] = []
        for request, error in failed.items():
            outputs.append(self._fail(request, error))
            timing.failed.append(request.request_id)
        for request in [r for r, got in self._beam_logits.items()
                        if len(got) == len(r.live_seqs)]:
            try:
                beams = len(request.live_seqs)
                self._beam_step(request)
                timing.generated += beams
                self._mark_token(request, timing)
                if request.is_finished:
                    outputs.append(self.output_processor.beam_output(request))
            except Exception as e:
                outputs.append(self._fail(request, e))
        for request, sequences in results.items():
            try:
                outputs.append(self._advance(request, sequences, drafts, timing))
                self._mark_token(request, timing)
            except Exception as e:
                outputs.append(self._fail(request, e))
        self._drafted += timing.drafted
        self._accepted += timing.accepted
        return outputs, timing

    def _mark_scheduled(self, batch: SchedulerOutput, now_ns: int) -> None:
        for seq in batch.preempted:
            request = seq.request
            if not request.preemption_ns or request.preemption_ns[-1] != now_ns:
                request.preemption_ns.append(now_ns)
        for item in batch.scheduled:
            request = item.seq.request
            if request.first_scheduled_ns is None:
                request.first_scheduled_ns = now_ns

    @staticmethod
    def _add_prompt_logprobs(request: Request, found: PromptLogprobs) -> None:
        """Appends a chunk's prompt logprobs: each position's own token and the most likely
        ones (the first position, which nothing predicts, has none)."""
        got = request.prompt_logprobs
        if not got:
            got.append(None)
        for logprob, top in zip(found.token_logprobs, found.top):
            position: TokenLogprobs = dict(top)
            position[request.prompt_token_ids[len(got)]] = logprob
            got.append(position)

    def _mark_token(self, request: Request, timing: _StepTiming) -> None:
        """Records the request's first token, or the gap since its last one."""
        if not self._observers:
            return
        now = timing.sampled_ns
        if request.first_token_ns is None:
            request.first_token_ns = now
            timing.ttft.append((now - request.arrival_ns) / 1e9)
        elif request.last_token_ns is not None:
            timing.itl.append((now - request.last_token_ns) / 1e9)
        request.last_token_ns = now

    def _report_step(self, batch: SchedulerOutput, queues: tuple[int, int],
                     served: tuple[str, ...], timing: _StepTiming) -> None:
        """Hands the step's record to the observers; ``queues`` are the running and waiting
        requests as scheduled, ``served`` the ids of the requests it ran."""
        bm = self.block_manager
        totals = (bm.stats.prefix_queried_tokens, bm.stats.prefix_hit_tokens,
                  bm.stats.cow_copies, bm.stats.evictions)
        deltas = [now - before for now, before in zip(totals, self._last_totals)]
        self._last_totals = totals
        preempted = dict.fromkeys(seq.request.request_id for seq in batch.preempted)
        stats = StepStats(
            step=self._steps, start_ns=timing.start_ns, scheduled_ns=timing.scheduled_ns,
            forwarded_ns=timing.forwarded_ns, sampled_ns=timing.sampled_ns,
            end_ns=timing.end_ns, num_running=queues[0], num_waiting=queues[1],
            num_preempted=len(preempted),
            num_prefill_tokens=batch.num_prefill_tokens,
            num_decode_tokens=batch.num_decode_tokens,
            num_scheduled_seqs=len(batch.model_input.chunks),
            num_generated_tokens=timing.generated,
            num_draft_tokens=timing.drafted, num_accepted_tokens=timing.accepted,
            num_blocks_used=bm.num_used_blocks, num_blocks_free=bm.num_free_blocks,
            num_blocks_cached=bm.num_cached_blocks, num_blocks_total=bm.num_usable_blocks,
            prefix_cache_queried_tokens=deltas[0], prefix_cache_hit_tokens=deltas[1],
            num_cow_copies=deltas[2], num_evictions=deltas[3],
            request_ids=served, preempted_request_ids=tuple(preempted),
            time_to_first_token_s=tuple(timing.ttft), inter_token_latency_s=tuple(timing.itl),
            failed_request_ids=tuple(timing.failed))
        for observer in self._observers:
            observer.on_step(stats)

    def _execute(self, batch: SchedulerOutput) -> tuple[ModelOutput, dict[Request, Exception]]:
        """Runs the batch; if it raises, runs each request's part alone to find the culprits.

        Rerunning is safe: a step writes only its own tokens' slots, so a second pass writes
        the same values, and the block copies are made again before any part runs.
        """
        step = batch.model_input
        try:
            output = self.executor.execute(step)
            self._comm_ns += output.comm_ns
            return output, {}
        except ExecutorDied:  # no step can run again: the engine's failure, not a request's
            raise
        except Exception:
            log.exception("step %d failed; running its requests one at a time", self._steps)
        request_of = {item.seq.seq_id: item.seq.request for item in batch.scheduled}
        parts: dict[Request, list[SeqChunk]] = {}
        for chunk in step.chunks:
            parts.setdefault(request_of[chunk.seq_id], []).append(chunk)
        done: list[ModelOutput] = []
        failed: dict[Request, Exception] = {}
        copies = step.block_copies  # made again, before any part runs
        for request, chunks in parts.items():
            try:
                # Its own adapters only: one that cannot be read fails its requests alone.
                loras = {c.lora_id: step.loras[c.lora_id] for c in chunks if c.lora_id}
                done.append(self.executor.execute(ModelInput(chunks, copies, loras)))
                copies = []  # made: the later parts read them
            except ExecutorDied:
                raise
            except Exception as e:
                failed[request] = e
        if not done:
            return ModelOutput([], torch.empty(0, self.vocab_size)), failed
        return ModelOutput([i for d in done for i in d.seq_ids],
                           torch.cat([d.logits for d in done]),
                           prompt_logprobs={k: v for d in done
                                            for k, v in d.prompt_logprobs.items()}), failed

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], histories: list[list[int]]
                ) -> tuple[SamplerOutput, dict[Request, Exception]]:
        """Samples every row (row ``i`` of ``seqs[i]``, following ``histories[i]``); if the
        batch raises, samples each request's rows alone.

        A seeded row keeps its sequence unless the failure came after its draw had advanced
        its generator.
        """
        rows = [SamplingRow(s.params, history, s.num_prompt_tokens, s.generator,
                            self.eos_token_id) for s, history in zip(seqs, histories)]
        try:
            return self.sampler(self._constrain(logits, seqs, histories), rows), {}
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
                part = self.sampler(self._constrain(logits[index], [seqs[i] for i in index],
                                                   [histories[i] for i in index]),
                                    [rows[i] for i in index])
            except Exception as e:
                failed[request] = e
                continue
            for j, i in enumerate(index):
                merged.token_ids[i] = part.token_ids[j]
                merged.logprobs[i] = part.logprobs[j]
                merged.top_logprobs[i] = part.top_logprobs[j]
        return merged, failed

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence],
                   histories: list[list[int]]) -> torch.Tensor:
        """Masks the rows of constrained sequences to the tokens their grammars allow next
        (in place); the other rows are left as they are."""
        matchers = [s.grammar for s in seqs]
        if not any(matchers):  # the common step: nothing to do
            return logits
        ahead = [history[len(s.token_ids):] for s, history in zip(seqs, histories)]
        bitmask = grammar_bitmask(matchers, ahead, self.vocab_size)
        rows = [i for i, m in enumerate(matchers) if m is not None]
        with torch.inference_mode():  # the model's logits are inference tensors
            mask_rows_(logits, bitmask, rows)
        return logits

    def _advance(self, request: Request,
                 sampled: list[tuple[Sequence, int, float, TokenLogprobs | None]],
                 drafts: dict[Sequence, list[int]], timing: _StepTiming) -> RequestOutput:
        """Appends each sequence's new tokens, checking its stop conditions at each one, and
        makes the output.

        A sequence with drafts has a pick per checked row: the drafts the picks agree with are
        accepted, and the pick after them (at the first disagreement, or after the last draft)
        is the step's own token.
        """
        picks: dict[Sequence, list[tuple[int, float, TokenLogprobs | None]]] = {}
        for seq, token, logprob, top in sampled:
            picks.setdefault(seq, []).append((token, logprob, top))
        new_tokens: dict[Sequence, list[int]] = {}
        for seq, rows in picks.items():
            proposed = drafts.get(seq, [])
            accepted = 0
            while accepted < len(proposed) and rows[accepted][0] == proposed[accepted]:
                accepted += 1
            appended = new_tokens.setdefault(seq, [])
            for token, logprob, top in rows[:accepted + 1]:
                if seq.grammar is not None and not seq.grammar.accept(token):
                    raise RuntimeError(f"token {token} was sampled against the request's "
                                       "structured_outputs constraint")
                seq.token_ids.append(token)
                appended.append(token)
                seq.cumulative_logprob += logprob
                if top is not None:
                    seq.logprobs.append(top)
                self.output_processor.check_stop(seq, token)
                if (not seq.is_finished and seq.grammar is not None
                        and seq.grammar.is_terminated()):
                    self.output_processor.end_with_grammar(seq)
                if seq.is_finished:  # the rest of the run is not the request's
                    break
            timing.generated += len(appended)
            if proposed:
                timing.drafted += len(proposed)
                timing.accepted += accepted
                if not seq.is_finished:
                    self.scheduler.accept(seq, accepted)
        if request.is_finished:
            self.requests.pop(request.request_id, None)
        return self.output_processor.output(request, new_tokens)

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
            num_cow_copies=bm.stats.cow_copies, num_evictions=bm.stats.evictions,
            tensor_parallel_comm_ns=self._comm_ns,
            spec_decode_num_draft_tokens=self._drafted,
            spec_decode_num_accepted_tokens=self._accepted)
