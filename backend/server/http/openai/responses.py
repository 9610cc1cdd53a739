"""The OpenAI response bodies and stream chunks, as vLLM's server writes them.

Plain functions from the engine's outputs to JSON-ready dicts: completions and chat, whole and
streamed, their logprobs (completions: ``tokens``/``token_logprobs``/``top_logprobs``/
``text_offset``; chat: ``content`` entries with ``bytes``) and ``usage``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pagedserve.outputs import TokenLogprobs

# vLLM floors logprobs here, so JSON never carries -inf.
_FLOOR = -9999.0
Decode = Callable[[int], str]


def _lp(value: float) -> float:
    return max(value, _FLOOR)


def _ranked(position: TokenLogprobs) -> list[tuple[int, float]]:
    return sorted(position.items(), key=lambda kv: -kv[1])


def completion_logprobs(token_ids: Sequence[int],
                        positions: Sequence[TokenLogprobs | None], top: int, decode: Decode,
                        offset: int = 0) -> dict[str, Any]:
    """Completions' logprobs of ``token_ids``; ``positions[i]`` holds the candidates of token
    ``i`` (``None`` for a prompt's first token). ``top_logprobs`` holds the chosen token and the
    ``top`` most likely ones; ``text_offset`` counts from ``offset``."""
    tokens: list[str] = []
    offsets: list[int] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    for token, position in zip(token_ids, positions):
        text = decode(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if position is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_lp(position[token]))
        entries = {text: _lp(position[token])}
        for candidate, value in _ranked(position)[:top]:
            entries.setdefault(decode(candidate), _lp(value))
        top_logprobs.append(entries)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top_logprobs}


def chat_logprobs(token_ids: Sequence[int], positions: Sequence[TokenLogprobs], top: int,
                  decode: Decode) -> dict[str, Any]:
    """Chat's logprobs: each token with its logprob, UTF-8 bytes and the ``top`` most likely
    tokens of its position."""

    def entry(token: int, value: float) -> dict[str, Any]:
        text = decode(token)
        return {"token": text, "logprob": _lp(value), "bytes": list(text.encode("utf-8"))}

    content = []
    for token, position in zip(token_ids, positions):
        item = entry(token, position[token])
        item["top_logprobs"] = [entry(t, v) for t, v in _ranked(position)[:top]]
        content.append(item)
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None
          ) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                           "total_tokens": prompt_tokens + completion_tokens,
                           "completion_tokens": completion_tokens}
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def completion_choice(index: int, text: str, logprobs: dict[str, Any] | None,
                      finish_reason: str | None, stop_reason: str | int | None
                      ) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_choice(index: int, message: dict[str, Any], logprobs: dict[str, Any] | None,
                finish_reason: str | None, stop_reason: str | int | None) -> dict[str, Any]:
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason, "stop_reason": stop_reason}


def chat_delta(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None,
               finish_reason: str | None, stop_reason: str | int | None = None
               ) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs,
                              "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return choice


def envelope(request_id: str, kind: str, created: int, model: str,
             choices: list[dict[str, Any]], usage_info: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    body: dict[str, Any] = {"id": request_id, "object": kind, "created": created,
                            "model": model, "choices": choices}
    if usage_info is not None:
        body["usage"] = usage_info
    return body
