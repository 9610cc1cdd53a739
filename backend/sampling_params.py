"""Per-request sampling parameters, validated at construction."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field, fields
from typing import Any

from pagedserve.structured_outputs import StructuredOutputsParams

_GREEDY_EPS = 1e-5
# Integer fields must fit the int64 tensors the sampler builds from them.
_INT64_MAX = 2**63 - 1
_FLOAT_MAX = 1.7976931348623157e308
# Stop conditions are checked at every token: bounded so one request cannot slow every step.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# Rejected values are quoted in errors; a hostile value must not come back whole.
def _quoter() -> reprlib.Repr:
    quote = reprlib.Repr()  # keyword arguments only from Python 3.12
    quote.maxlevel, quote.maxstring, quote.maxother, quote.maxlong = 3, 60, 60, 40
    return quote


_QUOTE = _quoter()


@dataclass
class SamplingParams:
    """How to pick each next token of a request, and when to stop.

    Field names and meanings follow vLLM's ``SamplingParams``. ``temperature=0`` is greedy
    decoding. ``logprobs=N`` returns the N most likely tokens of the model's raw distribution
    at every position (plus the sampled one); ``prompt_logprobs=N`` the same for every prompt
    token but the first, each with the prompt's own token (such a request computes its whole
    prompt, its prefix cache hits forgone). Invalid values raise ``ValueError`` naming the field.

    ``beam_width > 1`` switches to beam search, with the semantics of ``transformers``'
    ``generate(num_beams=beam_width, do_sample=False, length_penalty=..., early_stopping=...)``:
    beams are ranked by the cumulative log-probability of the model's raw distribution (sampling
    knobs do not apply: ``temperature`` and ``seed`` are ignored), a finished beam scores
    ``cumulative_logprob / generated_length ** length_penalty``, and the best ``n`` finished beams
    are returned. ``early_stopping`` is ``True``, ``False`` or ``"never"``, as in ``transformers``.

    ``structured_outputs`` (a ``StructuredOutputsParams``, or its dict) constrains the output to
    a JSON schema, regex, choice or grammar: each step the tokens it cannot continue with are
    masked before sampling (so ``logprobs`` are those of the masked distribution, as in vLLM),
    and the output ends when the grammar does.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            try:
                setattr(self, name, list(getattr(self, name)))
            except TypeError:
                raise ValueError(f"SamplingParams.{name} must be a list, "
                                 f"got {_QUOTE.repr(getattr(self, name))}") from None
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            value = _QUOTE.repr(getattr(self, name))
            raise ValueError(f"SamplingParams.{name} {why}, got {value}")

        def check_int(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, "must be an integer")
            if not -_INT64_MAX <= value <= _INT64_MAX:
                fail(name, "must fit a 64-bit integer")

        def check_number(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(name, "must be a number")
            # Integers beyond float range would overflow the sampler's float tensors.
            if value != value or not -_FLOAT_MAX <= value <= _FLOAT_MAX:
                fail(name, "must be finite")

        for name in ("n", "top_k", "min_tokens", "beam_width"):
            check_int(name)
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            check_int(name, optional=True)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "length_penalty"):
            check_number(name)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be a boolean")
        if self.n < 1:
            fail("n", "must be at least 1")
        if self.temperature < 0:
            fail("temperature", "must be non-negative")
        if self.top_k < 0:
            fail("top_k", "must be 0 (disabled) or positive")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be positive")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            fail("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and self.logprobs < 0:
            fail("logprobs", "must be non-negative")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            fail("prompt_logprobs", "must be non-negative")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            fail("seed", "must be in [0, 2**63)")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            fail("stop", f"must hold at most {MAX_STOP_STRINGS} strings")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            fail("stop", f"must hold strings of at most {MAX_STOP_STRING_CHARS} characters")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _INT64_MAX
                   for t in self.stop_token_ids):
            fail("stop_token_ids", "must be a list of non-negative 64-bit integers")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            fail("stop_token_ids", f"must hold at most {MAX_STOP_TOKEN_IDS} token ids")
        if self.beam_width < 1:
            fail("beam_width", "must be at least 1")
        if self.early_stopping not in (True, False, "never"):
            fail("early_stopping", 'must be true, false or "never"')
        if self.structured_outputs is not None and self.min_tokens:
            # The grammar decides where a constrained output ends; forbidding the end token
            # before min_tokens could leave no token allowed.
            fail("min_tokens", "is not supported with structured_outputs")
        if self.use_beam_search:
            self._validate_beam_search(fail)
        elif self.n > 1 and self.is_greedy:
            # n identical greedy copies are almost surely a mistake; vLLM rejects them too.
            fail("n", "must be 1 for greedy sampling (temperature=0)")

    def _validate_beam_search(self, fail: Any) -> None:
        if self.n > self.beam_width:
            fail("n", f"must not exceed beam_width ({self.beam_width}) in beam search")
        # Beam search ranks raw log-probabilities; knobs that reshape or sample them do not apply.
        unsupported = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                       "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": None,
                       "prompt_logprobs": None}
        for name, default in unsupported.items():
            if getattr(self, name) != default:
                fail(name, "is not supported with beam search (beam_width > 1)")
        if self.stop:
            fail("stop", "is not supported with beam search (beam_width > 1)")
        if self.structured_outputs is not None:
            raise ValueError("SamplingParams.structured_outputs is not supported with beam "
                             "search (beam_width > 1)")

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def num_seqs(self) -> int:
        """Sequences the request runs at once: its beams, or its ``n`` samples."""
        return self.beam_width if self.use_beam_search else self.n

    @property
    def is_greedy(self) -> bool:
        """True when the request always takes the most likely token."""
        return self.temperature < _GREEDY_EPS

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Builds params from a JSON-like dict; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            names = ", ".join(str(name)[:60] for name in unknown[:8])
            more = ", ..." if len(unknown) > 8 else ""
            raise ValueError(f"unknown sampling parameter(s): {names}{more}")
        return cls(**values)
