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
    num_running: int
    num_waiting: int


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
        self.block_manager = BlockManager(num_blocks, self.config.block_size)
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
        return Request(request_id, prompt, prompt_token_ids, params, next(self._arrivals),
                       self.max_model_len)

    def add_request(self, request: Request) -> None:
        """Queues a request made by ``make_request``."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = request.params
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.config.device)
                generator.manual_seed(params.seed + index)
            seq = Sequence(
                seq_id=next(self._seq_ids), request=request, index=index,
                token_ids=list(request.prompt_token_ids),
                num_prompt_tokens=len(request.prompt_token_ids),
                detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                   params.skip_special_tokens),
                generator=generator)
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request.request_id] = request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends a request now, returning its blocks; ``None`` if it is not (or no longer) here."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
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
        if batch.is_empty:
            return []
        self._steps += 1
        step_logits = self.runner.execute(batch)
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        seqs = step_logits.seqs
        if not seqs:
            return []
        rows = [SamplingRow(s.params, s.token_ids, s.num_prompt_tokens, s.generator,
                            self.eos_token_id) for s in seqs]
        sampled = self.sampler(step_logits.logits, rows)
        deltas: dict[Request, dict[Sequence, int]] = {}
        for seq, token, logprob, top in zip(seqs, sampled.token_ids, sampled.logprobs,
                                            sampled.top_logprobs):
            seq.token_ids.append(token)
            seq.cumulative_logprob += logprob
            if top is not None:
                seq.logprobs.append(top)
            self._check_stop(seq, token)
            deltas.setdefault(seq.request, {})[seq] = token
        outputs = []
        for request, new_tokens in deltas.items():
            if request.is_finished:
                self.requests.pop(request.request_id, None)
            outputs.append(self._output(request, new_tokens))
        return outputs

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
        return EngineStats(
            num_blocks_total=self.block_manager.num_usable_blocks,
            num_blocks_used=self.block_manager.num_used_blocks,
            num_preemptions=s.num_preemptions, num_prefilled_tokens=s.num_prefilled_tokens,
            num_decoded_tokens=s.num_decoded_tokens, num_steps=self._steps,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting))
