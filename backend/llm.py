"""The offline API: ``LLM(...).generate(prompts, SamplingParams(...))``, as in vLLM."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.trace import TracerProvider

from pagedserve.config import EngineConfig
from pagedserve.engine.core import EngineCore, EngineStats
from pagedserve.engine.stats import EngineObserver
from pagedserve.engine.tracing import EngineTracer, TraceSettings
from pagedserve.lora_request import LoRARequest
from pagedserve.model.loader import LoadedModel
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

ChatMessages = list[dict[str, str]]


class LLM:
    """Generates completions for batches of prompts with continuous batching.

    ``LLM()`` serves the embedded SmolLM2-135M-Instruct; ``LLM(model=path)`` takes a local Hugging
    Face directory or a GGUF file. Other keyword arguments are ``EngineConfig`` fields
    (``block_size``, ``kv_cache_bytes``, ``max_num_batched_tokens``, ``max_num_seqs``,
    ``tensor_parallel_size``, ...); ``speculative_config`` takes vLLM's dict, e.g.
    ``{"method": "ngram", "num_speculative_tokens": 4}``.
    With an OpenTelemetry ``tracer_provider`` (or an SDK provider set globally) every step and
    request is traced; ``shutdown()`` flushes the spans.
    """

    def __init__(self, model: str | None = None, *, loaded: LoadedModel | None = None,
                 tracer_provider: TracerProvider | None = None, **engine_args: Any) -> None:
        # Traced when a provider is given, or set globally (an SDK one, not the no-op default).
        if tracer_provider is None and isinstance(trace.get_tracer_provider(),
                                                  SdkTracerProvider):
            tracer_provider = trace.get_tracer_provider()
        observers: list[EngineObserver] = []
        if tracer_provider is not None:
            observers.append(EngineTracer(tracer_provider,
                                          TraceSettings(level="TIMESTAMPS", rate=1),
                                          model or "default", "1"))
        self.engine = EngineCore(EngineConfig(model=model, **engine_args), loaded, observers)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 prompt_token_ids: Seq[list[int]] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in the order of the prompts.

        ``lora_request``: one adapter for every prompt, or one per prompt (None: the base
        model); the engine needs ``enable_lora=True``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("pass either prompts or prompt_token_ids, not both")
            items: list[tuple[str | None, list[int] | None]] = [(None, list(t))
                                                                for t in prompt_token_ids]
        else:
            items = [(p, None) for p in (prompts or [])]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(f"sampling_params has {len(params_list)} entries for "
                                 f"{len(items)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(items)
        else:
            loras = list(lora_request)
            if len(loras) != len(items):
                raise ValueError(f"lora_request has {len(loras)} entries for {len(items)} "
                                 f"prompts")
        # Validate everything first so a bad prompt leaves nothing queued.
        requests = [self.engine.make_request(str(next(self._ids)), prompt, params, ids,
                                             lora_request=lora)
                    for (prompt, ids), params, lora in zip(items, params_list, loras)]
        for lora in {r.lora_request for r in requests if r.lora_request is not None}:
            self.engine.load_lora(lora)
        added: list[str] = []
        try:
            for request in requests:
                self.engine.add_request(request)
                added.append(request.request_id)
        except BaseException:
            for request_id in added:  # all or nothing
                self.engine.abort(request_id)
            raise
        return self._run([r.request_id for r in requests], use_tqdm)

    def chat(self, messages: ChatMessages | list[ChatMessages],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates replies to conversations rendered with the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False,
                                                      add_generation_prompt=True)
                   for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(request_ids) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc="Generating", unit="req")
        try:
            while self.engine.has_unfinished_requests:
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
        return [finished[r] for r in request_ids]

    def shutdown(self) -> None:
        """Flushes the engine's observers (buffered trace spans) and stops its tensor-parallel
        worker processes, if any; the engine serves no more after it."""
        self.engine.shutdown()

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix, so the next prompts are computed in full (``False``,
        and nothing changes, while requests are running)."""
        return self.engine.reset_prefix_cache()

    def stats(self) -> EngineStats:
        """The engine's counters: KV blocks, preemptions, prefilled and decoded tokens."""
        return self.engine.stats()
