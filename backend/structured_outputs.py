"""What a constrained request's output must match: vLLM's ``StructuredOutputsParams``.

Plain data, checked at construction: exactly one constraint (a JSON schema, a regex, a list of
choices, a grammar, or any JSON object), each bounded in size so that a hostile request cannot
make the compiler's work unbounded. The engine compiles it (``pagedserve.engine.structured_output``)
into a matcher that masks each step's logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

# A constraint's text (schema, regex, grammar, all choices together) is compiled against the
# whole vocabulary: bounded so that one request cannot occupy the compiler for long.
MAX_CONSTRAINT_CHARS = 65536
MAX_CHOICES = 1024
_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """One constraint on a request's output, named as in vLLM.

    - ``json``: a JSON schema (a dict, or its JSON text) the output must validate against;
    - ``regex``: a regular expression the whole output must match;
    - ``choice``: the output is exactly one of these strings;
    - ``grammar``: an EBNF grammar (GBNF, as xgrammar reads it; a Lark grammar is tried
      where EBNF does not parse) whose ``root`` rule the output must derive;
    - ``json_object``: any JSON object.

    ``disable_any_whitespace`` makes JSON outputs compact (no free whitespace between tokens);
    ``disable_fallback`` keeps a JSON schema or grammar that xgrammar refuses from falling back to
    llguidance. Invalid values raise ``ValueError`` naming the field. ``source`` is the
    request field the constraint came from (``guided_decoding``, OpenAI's ``response_format``,
    ...): refusals, here and when it is compiled, name it.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False
    source: str = field(default="structured_outputs", compare=False, repr=False)

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{self.source}: You can only use one kind of structured outputs "
                             f"constraint but multiple are specified: {', '.join(given)}")
        if not given:
            raise ValueError(f"{self.source}: You must use one kind of structured outputs "
                             f"constraint but none are specified (one of {', '.join(_KINDS)})")
        for name in ("disable_any_whitespace", "disable_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{self.source}.{name} must be a boolean")
        kind = given[0]
        value = getattr(self, kind)
        label = self.label
        if kind == "json":
            self.json = _schema_text(value, label)
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{label} must be a non-empty string")
            _check_size(label, len(value))
        elif kind == "choice":
            if (not isinstance(value, list) or not value
                    or not all(isinstance(c, str) and c for c in value)):
                raise ValueError(f"{label} must be a non-empty list of non-empty strings")
            if len(value) > MAX_CHOICES:
                raise ValueError(f"{label} holds {len(value)} strings, more than "
                                 f"{MAX_CHOICES}")
            _check_size(label, sum(len(c) for c in value))
        elif value is not True:
            raise ValueError(f"{label} must be true")

    @property
    def label(self) -> str:
        """How refusals name the constraint: ``structured_outputs.json``, or the field it came
        from where that field is the constraint itself (``response_format``, ``guided_json``)."""
        if self.source in ("structured_outputs", "guided_decoding"):
            return f"{self.source}.{self.kind}"
        return self.source

    @property
    def kind(self) -> str:
        """Which constraint it is: ``json``, ``regex``, ``choice``, ``grammar`` or
        ``json_object``."""
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @property
    def key(self) -> tuple[Any, ...]:
        """Equal for constraints that compile to the same grammar (the compile cache's key)."""
        value = getattr(self, self.kind)
        return (self.kind, tuple(value) if isinstance(value, list) else value,
                self.disable_any_whitespace, self.disable_fallback)

    @classmethod
    def from_value(cls, value: Any, field_name: str = "structured_outputs"
                   ) -> StructuredOutputsParams:
        """From a dict, its JSON text (as Triton's vLLM backend receives it), or an instance;
        unknown keys raise ``ValueError`` naming them."""
        if isinstance(value, cls):
            return value
        value = _json_object(value, field_name, "a JSON object")
        known = {f.name for f in fields(cls) if f.name != "source"}
        unknown = sorted(str(k)[:60] for k in value if k not in known)
        if unknown:
            raise ValueError(f"{field_name}: unknown field(s) {', '.join(unknown[:8])}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**value, source=field_name)


def _check_size(label: str, size: int) -> None:
    if size > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"{label} is {size} characters long, more than "
                         f"{MAX_CONSTRAINT_CHARS}")


def _json_object(value: Any, label: str, what: str) -> dict[str, Any]:
    """``value``, or the JSON text it is, as a dict; ``ValueError`` naming ``label``."""
    if isinstance(value, str):
        _check_size(label, len(value))
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{label} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{label} must be {what}, got {type(value).__name__}")
    return value


def _schema_text(value: Any, label: str) -> str:
    """The schema as JSON text, checked to be a JSON object (its key order kept: it is the
    order the output's properties take)."""
    value = _json_object(value, label, "a JSON schema object")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{label} cannot be written as JSON: {e}") from None
    _check_size(label, len(text))
    return text
