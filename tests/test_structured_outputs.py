"""Structured outputs on the engine: every constrained output matches its constraint.

Real JSON schemas at temperature 0.8 over many seeds must parse and validate (``jsonschema``);
regex and choice outputs must match; greedy outputs must equal vLLM's rule (the argmax of the
logits masked by the grammar) computed with transformers and xgrammar on their own; n > 1 and a
batch mixing constrained and free rows keep to it. Bad constraints are refused before they are
queued. The engine's other paths, the async engine and the mask: test_structured_outputs_paths.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr
from transformers import LogitsProcessor, LogitsProcessorList

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from pagedserve.model.loader import LoadedModel
from tests.conftest import assert_all_blocks_free

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
            "role": {"enum": ["admin", "editor", "viewer"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    "order": {
        "$defs": {
            "item": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                    "price": {"type": "number", "minimum": 0, "maximum": 1000},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1000, "maximum": 9999},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"},
                      "minItems": 1, "maxItems": 3},
            "paid": {"type": "boolean"},
        },
        "required": ["id", "items", "paid"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "location": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180},
                },
                "required": ["city", "lat", "lon"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                     "maxItems": 4},
            "status": {"type": ["string", "null"], "enum": ["open", "closed", None]},
        },
        "required": ["title", "location", "status"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array",
        "items": {"type": "object",
                  "properties": {"x": {"type": "integer", "exclusiveMinimum": 0,
                                       "maximum": 50},
                                 "ok": {"type": "boolean"}},
                  "required": ["x", "ok"], "additionalProperties": False},
        "minItems": 2, "maxItems": 4,
    },
}
SEEDS = 6
MAX_TOKENS = 384


@pytest.fixture(scope="module")
def llm(smollm: LoadedModel) -> LLM:
    return LLM(loaded=smollm, kv_cache_bytes=128 << 20)


def chat(llm: LLM, text: str) -> str:
    return str(llm.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True))


def constrained(seed: int | None = None, temperature: float = 0.8, max_tokens: int = MAX_TOKENS,
                **constraint: Any) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**constraint))


# ---- what the outputs are -------------------------------------------------------------------

def test_json_schemas_at_temperature_always_validate(llm: LLM) -> None:
    prompts, params, schemas = [], [], []
    for name, schema in SCHEMAS.items():
        for seed in range(SEEDS):
            prompts.append(chat(llm, f"Write a JSON {name} record."))
            params.append(constrained(seed, json=schema))
            schemas.append(schema)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output, schema in zip(outputs, schemas):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
    assert_all_blocks_free(llm)


def test_regex_choice_and_json_object_always_match(llm: LLM) -> None:
    regex = r"(\+1 )?\(\d{3}\) \d{3}-\d{4}"
    choices = ["Positive", "Negative", "Neutral"]
    prompts = [chat(llm, "Give a phone number."), chat(llm, "Is 'I love it' positive?"),
               chat(llm, "Describe a cat as JSON.")]
    params = []
    for seed in range(SEEDS):
        # Any JSON object may run long at this temperature: fewer seeds of it.
        params += [constrained(seed, regex=regex), constrained(seed, choice=choices),
                   constrained(seed % 3, json_object=True)]
    outputs = llm.generate(prompts * SEEDS, params, use_tqdm=False)
    for i, output in enumerate(outputs):
        text = output.outputs[0].text
        assert output.outputs[0].finish_reason == "stop", text
        if i % 3 == 0:
            assert re.fullmatch(regex, text), text
        elif i % 3 == 1:
            assert text in choices
        else:
            assert isinstance(json.loads(text), dict)


class _MaskedByXgrammar(LogitsProcessor):
    """vLLM's rule, independently: each step's scores masked by a fresh xgrammar matcher."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, prompt_len: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_len:
            assert self.matcher.accept_token(int(input_ids[0, -1]))
        self.matcher.fill_next_token_bitmask(self.bitmask)
        scores = scores.clone()
        xgr.apply_token_bitmask_inplace(scores, self.bitmask)
        return scores


def test_greedy_equals_the_masked_argmax_of_transformers(llm: LLM, smollm: LoadedModel,
                                                         hf_smollm: torch.nn.Module) -> None:
    vocab = llm.engine.vocab_size
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(smollm.tokenizer,
                                                                      vocab_size=vocab))
    cases = [
        ("Write a JSON person record.", {"json": SCHEMAS["person"]},
         compiler.compile_json_schema(json.dumps(SCHEMAS["person"]))),
        ("Give a date.", {"regex": r"\d{4}-\d{2}-\d{2}"},
         compiler.compile_regex(r"\d{4}-\d{2}-\d{2}")),
        ("Is the sky green?", {"choice": ["yes", "no", "maybe"]},
         compiler.compile_grammar('root ::= "yes" | "no" | "maybe"')),
    ]
    for text, constraint, compiled in cases:
        ids = llm.tokenizer.encode(chat(llm, text))
        with torch.inference_mode():
            out = hf_smollm.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=96, do_sample=False,
                pad_token_id=hf_smollm.generation_config.eos_token_id,
                logits_processor=LogitsProcessorList([_MaskedByXgrammar(compiled, vocab,
                                                                        len(ids))]))
        expected = out[0, len(ids):].tolist()
        got = llm.generate(prompt_token_ids=[ids], sampling_params=constrained(
            temperature=0.0, max_tokens=96, **constraint), use_tqdm=False)[0].outputs[0]
        assert got.token_ids == expected, (got.text, llm.tokenizer.decode(expected))


def test_n_samples_each_keep_to_the_constraint(llm: LLM) -> None:
    schema = SCHEMAS["person"]
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=MAX_TOKENS,
                            structured_outputs=StructuredOutputsParams(json=schema))
    output = llm.generate(chat(llm, "A JSON person, please."), params, use_tqdm=False)[0]
    texts = [c.text for c in output.outputs]
    assert len(set(texts)) > 1
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


def test_free_rows_beside_constrained_ones_are_untouched(llm: LLM) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=24)
    prompts = [chat(llm, f"Tell me about the number {i}.") for i in range(4)]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    mixed = llm.generate(prompts + [chat(llm, "JSON please.")] * 4,
                         [free] * 4 + [constrained(s, json=SCHEMAS["person"]) for s in range(4)],
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone
    for o in mixed[4:]:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMAS["person"])


def test_ignore_eos_still_ends_where_the_grammar_ends(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(choice=["red", "blue"]))
    completion = llm.generate(chat(llm, "Pick a colour."), params,
                              use_tqdm=False)[0].outputs[0]
    assert completion.text in ("red", "blue")
    assert completion.finish_reason == "stop"


# ---- refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(json={"type": "object"}, regex="a+"), "only use one kind"),
    (dict(), "must use one kind"),
    (dict(choice=[]), "structured_outputs.choice"),
    (dict(choice="yes"), "structured_outputs.choice"),
    (dict(regex=""), "structured_outputs.regex"),
    (dict(json="{not json"), "structured_outputs.json is not valid JSON"),
    (dict(json=[1, 2]), "structured_outputs.json must be a JSON schema object"),
    (dict(json_object=False), "structured_outputs.json_object"),
    (dict(grammar="x" * 70000), "structured_outputs.grammar is 70000 characters"),
])
def test_bad_params_are_refused_naming_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_params_refuse_what_cannot_combine() -> None:
    so = StructuredOutputsParams(choice=["a"])
    with pytest.raises(ValueError, match="not supported with beam search"):
        SamplingParams(beam_width=2, structured_outputs=so)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=so)
    with pytest.raises(ValueError, match=r"unknown field.*colour"):
        SamplingParams.from_dict({"structured_outputs": {"choice": ["a"], "colour": 1}})
    # vLLM's backend sends the constraint as JSON text; a dict works too.
    for value in ('{"choice": ["a", "b"]}', {"choice": ["a", "b"]}):
        params = SamplingParams.from_dict({"structured_outputs": value})
        assert params.structured_outputs == StructuredOutputsParams(choice=["a", "b"])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(json={"type": "object", "properties": {"a": {"type": "frobnicate"}}}),
     "structured_outputs.json: .*frobnicate"),
    (dict(regex="[a-"), "structured_outputs.regex: .*[Uu]nclosed"),
    (dict(grammar='root ::= "a" missing'), "structured_outputs.grammar: .*missing"),
    (dict(json={"enum": []}), "structured_outputs.json: .*enum"),
    (dict(json={"type": "integer", "minimum": 5, "maximum": 3}), "structured_outputs.json"),
    (dict(json={"type": "array", "uniqueItems": True}),
     "xgrammar does not enforce uniqueItems .*llguidance"),
    (dict(json={"allOf": [{"type": "object"}, {"required": ["a"]}]}, disable_fallback=True),
     "xgrammar does not enforce allOf"),
])
def test_bad_constraints_are_refused_before_queueing(llm: LLM, kwargs: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate("Hi", constrained(**kwargs), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests
    # The engine serves on.
    assert llm.generate("Hi", constrained(choice=["x"]), use_tqdm=False)[0].outputs[0].text == "x"


def test_llguidance_takes_what_xgrammar_does_not_enforce(llm: LLM) -> None:
    schema = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer",
                                                                  "minimum": 0,
                                                                  "maximum": 9}},
                         "additionalProperties": False},
                        {"required": ["a"]}]}
    compiled = llm.engine.structured.compile(StructuredOutputsParams(json=schema))
    assert compiled.backend == "guidance"
    outputs = llm.generate([chat(llm, "JSON with a.")] * 4,
                           [constrained(s, json=schema) for s in range(4)], use_tqdm=False)
    for o in outputs:
        jsonschema.validate(json.loads(o.outputs[0].text), schema)
    lark = 'start: "yes" | "no"'  # a Lark grammar: xgrammar's EBNF parser refuses it
    assert llm.engine.structured.compile(StructuredOutputsParams(grammar=lark)).backend \
        == "guidance"
    text = llm.generate("Yes or no?", constrained(grammar=lark),
                        use_tqdm=False)[0].outputs[0].text
    assert text in ("yes", "no")
