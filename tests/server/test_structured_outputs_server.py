"""Structured outputs end to end, through a real server and the official clients.

A server of its own serves the embedded model twice: ``smollm2`` decoupled (as the default
repository does: gRPC streams, Triton's generate route) and ``unary`` (not decoupled: a refusal
is the call's gRPC status, where a stream only carries its message). Each door's way of asking
for a constraint is exercised:

* Triton's vLLM backend: ``sampling_parameters`` holding ``structured_outputs`` as a JSON string
  (``StructuredOutputsParams(**json.loads(v))``, as that backend reads it), or the older
  ``guided_decoding``, or the same keys as request parameters when there is no
  ``sampling_parameters`` input; choice, JSON schema (validated with ``jsonschema``) and regex
  (``re.fullmatch``) outputs keep to their constraints and end with ``finish_reason`` "stop";
* bad constraints are ``INVALID_ARGUMENT`` with a message naming what is wrong, and the server
  serves on;
* Triton's generate route, with the constraint among its ``parameters``;
* the OpenAI API (``openai`` client): ``response_format`` (json_schema, json_object), vLLM's
  ``structured_outputs`` field and its older ``guided_*`` fields, streamed and with ``n`` > 1;
  refusals are 400s naming the field.
"""

from __future__ import annotations

import json
import queue
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.server.conftest import (
    MODEL,
    ServerHandle,
    add_default_model,
    is_final,
    llm_inputs,
    start_server,
    text_of,
)

pytestmark = pytest.mark.slow
UNARY = "unary"
SENTIMENT = ("Review: 'This movie was wonderful, I loved every minute.' Is the sentiment of "
             "this review Positive or Negative? Answer:")
CHOICES = ["Positive", "Negative"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_PROMPT = "Write a JSON record of a person with a name and an age:"
PERSON_CHAT = [{"role": "user",
                "content": "Give me a JSON record of a person with a name and an age."}]
DATE = r"\d{4}-\d{2}-\d{2}"
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    root = tmp_path_factory.mktemp("structured-repo")
    for name, decoupled in ((MODEL, True), (UNARY, False)):
        add_default_model(root, name, {"model": "default", "max_model_len": 1024,
                                       "kv_cache_memory_bytes": 64 * 2**20}, decoupled)
    handle = start_server(root)
    yield handle
    assert handle.stop() == 0


@pytest.fixture(scope="module")
def oai(api: ServerHandle) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{api.http_url}/v1", api_key="unused",
                       max_retries=0) as c:
        yield c


# ---- helpers ---------------------------------------------------------------------------------


def stream(api: ServerHandle, inputs: list[Any], parameters: dict[str, Any] | None = None,
           model: str = MODEL) -> tuple[str, str | None]:
    """One streamed request on the decoupled model: its whole text and last finish reason;
    raises the stream's error."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(api.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, parameters=parameters)
        text, reason = "", None
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise error
            text += text_of(result)
            finish = result.as_numpy("finish_reason")
            if finish is not None:
                reason = finish.reshape(-1)[0].decode()
            if is_final(result):
                return text, reason
    finally:
        client.stop_stream()
        client.close()


def constrained(prompt: str, key: str, constraint: Any, max_tokens: int = MAX_TOKENS,
                stream: bool = True) -> list[Any]:
    """vLLM-backend inputs whose sampling parameters hold ``key``: ``constraint`` as JSON
    text (the backend's form), with ``finish_reason`` asked for."""
    value = constraint if isinstance(constraint, str) else json.dumps(constraint)
    return llm_inputs(prompt, max_tokens, stream=stream, params={key: value},
                      return_finish_reason=True)


def unary(api: ServerHandle, inputs: list[Any],
          parameters: dict[str, Any] | None = None) -> str:
    with grpcclient.InferenceServerClient(api.grpc_url) as client:
        result = client.infer(UNARY, inputs, parameters=parameters)
    return text_of(result)


def serves_on(api: ServerHandle) -> None:
    """A following plain request on each model is answered."""
    assert stream(api, llm_inputs(SENTIMENT, 2))[0]
    assert unary(api, llm_inputs(SENTIMENT, 2, stream=False, exclude_input_in_output=True))


def post(api: ServerHandle, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(api.http_url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def person(text: str) -> dict[str, Any]:
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    return value  # type: ignore[no-any-return]


# ---- Triton's vLLM backend through gRPC ------------------------------------------------------


def test_structured_outputs_choice_as_the_vllm_backend_sends_it(api: ServerHandle) -> None:
    # The vLLM backend's clients send every value as a string: cast as the backend does.
    inputs = llm_inputs(SENTIMENT, params={
        "temperature": "0", "max_tokens": "16",
        "structured_outputs": json.dumps({"choice": CHOICES})}, return_finish_reason=True)
    text, reason = stream(api, inputs)
    assert text in CHOICES and reason == "stop"
    free, _ = stream(api, llm_inputs(SENTIMENT, 16))
    assert free not in CHOICES  # the model alone says more: the constraint did it


def test_guided_decoding_is_the_same_constraint(api: ServerHandle) -> None:
    text, reason = stream(api, constrained(SENTIMENT, "guided_decoding", {"choice": CHOICES},
                                           16))
    assert text in CHOICES and reason == "stop"
    assert text == stream(api, constrained(SENTIMENT, "structured_outputs",
                                           {"choice": CHOICES}, 16))[0]


def test_json_schema_and_regex_through_grpc(api: ServerHandle) -> None:
    text, reason = stream(api, constrained(PERSON_PROMPT, "structured_outputs",
                                           {"json": PERSON}))
    assert reason == "stop"
    person(text)
    # The schema may be given as JSON text too; guided_decoding reads the same fields.
    text, reason = stream(api, constrained(PERSON_PROMPT, "guided_decoding",
                                           {"json": json.dumps(PERSON)}))
    assert reason == "stop"
    person(text)
    text, reason = stream(api, constrained("The date of the first moon landing was",
                                           "structured_outputs", {"regex": DATE}, 64))
    assert re.fullmatch(DATE, text) and reason == "stop", text


def test_constraint_as_a_request_parameter(api: ServerHandle) -> None:
    # Without a sampling_parameters input, the request parameters are read (vLLM backend).
    inputs = [i for i in llm_inputs(SENTIMENT, return_finish_reason=True)
              if i.name() != "sampling_parameters"]
    for key in ("structured_outputs", "guided_decoding"):
        text, reason = stream(api, inputs, {"temperature": 0, "max_tokens": 16,
                                            key: json.dumps({"choice": CHOICES})})
        assert text in CHOICES and reason == "stop", key
    plain = [i for i in llm_inputs(PERSON_PROMPT, stream=False, exclude_input_in_output=True)
             if i.name() != "sampling_parameters"]
    person(unary(api, plain, {"temperature": 0, "max_tokens": MAX_TOKENS,
                              "structured_outputs": json.dumps({"json": PERSON})}))


BAD_CONSTRAINTS = [
    pytest.param("structured_outputs", {"json": {"type": "frobnicate"}},
                 ["structured_outputs.json", "frobnicate"], id="bad-schema"),
    pytest.param("structured_outputs", {"regex": "[a-"},
                 ["structured_outputs.regex", "nclosed"], id="bad-regex"),
    pytest.param("structured_outputs", {"json": {"enum": []}},
                 ["structured_outputs.json", "enum"], id="unsatisfiable-schema"),
    pytest.param("structured_outputs", {"regex": "a+", "choice": ["a"]},
                 ["structured outputs", "regex, choice"], id="two-constraints"),
    pytest.param("structured_outputs", {},
                 ["structured outputs", "none"], id="no-constraint"),
    pytest.param("structured_outputs", "{not json",
                 ["structured_outputs is not valid JSON"], id="not-json"),
    pytest.param("structured_outputs", json.dumps(["a"]),
                 ["structured_outputs must be a JSON object"], id="not-an-object"),
    pytest.param("structured_outputs", {"chioce": ["a"]},
                 ["structured_outputs", "unknown field(s) chioce"], id="unknown-field"),
    pytest.param("guided_decoding", "{not json",
                 ["guided_decoding is not valid JSON"], id="guided-not-json"),
    pytest.param("guided_decoding", {"chioce": ["a"]},
                 ["guided_decoding", "unknown field(s) chioce"], id="guided-unknown-field"),
    # The client sent guided_decoding: the refusal names it, as the two above do.
    pytest.param("guided_decoding", {"regex": "[a-"},
                 ["guided_decoding", "regex", "nclosed"], id="guided-bad-regex"),
]


@pytest.mark.parametrize(("key", "constraint", "named"), BAD_CONSTRAINTS)
def test_bad_constraints_are_invalid_argument(api: ServerHandle, key: str, constraint: Any,
                                              named: list[str]) -> None:
    inputs = constrained(SENTIMENT, key, constraint, 16, stream=False)
    with pytest.raises(InferenceServerException) as refused:
        unary(api, inputs)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", refused.value
    for part in named:
        assert part in refused.value.message(), refused.value.message()
    serves_on(api)


def test_both_keys_at_once_are_refused(api: ServerHandle) -> None:
    value = json.dumps({"choice": CHOICES})
    inputs = llm_inputs(SENTIMENT, 16, stream=False,
                        params={"structured_outputs": value, "guided_decoding": value})
    with pytest.raises(InferenceServerException) as refused:
        unary(api, inputs)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "structured_outputs" in refused.value.message()
    assert "guided_decoding" in refused.value.message()
    serves_on(api)


def test_a_stream_carries_the_refusal_and_serves_on(api: ServerHandle) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(api.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(MODEL, constrained(SENTIMENT, "structured_outputs",
                                                     {"json": {"enum": []}}, 16))
        result, error = results.get(timeout=120)
        assert result is None and error is not None
        assert "structured_outputs.json" in error.message(), error.message()
        # The same stream answers the next request.
        client.async_stream_infer(MODEL, constrained(SENTIMENT, "structured_outputs",
                                                     {"choice": CHOICES}, 16))
        text = ""
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            text += text_of(result)
            if is_final(result):
                break
        assert text in CHOICES
    finally:
        client.stop_stream()
        client.close()


# ---- Triton's generate route -----------------------------------------------------------------


def test_generate_route_with_structured_outputs(api: ServerHandle) -> None:
    path = f"/v2/models/{MODEL}/generate"
    status, body = post(api, path, {
        "text_input": SENTIMENT, "exclude_input_in_output": True,
        "parameters": {"temperature": 0, "max_tokens": 16,
                       "structured_outputs": json.dumps({"choice": CHOICES})}})
    assert status == 200 and body["text_output"] in CHOICES, body
    # Or inside the sampling_parameters input, as over gRPC.
    status, body = post(api, path, {
        "text_input": PERSON_PROMPT, "exclude_input_in_output": True,
        "sampling_parameters": json.dumps({
            "temperature": 0, "max_tokens": MAX_TOKENS,
            "guided_decoding": json.dumps({"json": PERSON})})})
    assert status == 200, body
    person(body["text_output"])
    status, body = post(api, path, {
        "text_input": SENTIMENT, "parameters": {
            "max_tokens": 16, "structured_outputs": json.dumps({"regex": "[a-"})}})
    assert status == 400 and "structured_outputs.regex" in body["error"], body
    status, body = post(api, path, {"text_input": SENTIMENT, "exclude_input_in_output": True,
                                    "parameters": {"temperature": 0, "max_tokens": 2}})
    assert status == 200 and body["text_output"], body


# ---- the OpenAI API --------------------------------------------------------------------------


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                   "strict": True}}


def test_chat_response_format_json_schema_and_json_object(oai: openai.OpenAI) -> None:
    got = oai.chat.completions.create(model=MODEL, messages=PERSON_CHAT, max_tokens=MAX_TOKENS,
                                      temperature=0, response_format=_schema_format(PERSON))
    (choice,) = got.choices
    assert choice.finish_reason == "stop"
    person(choice.message.content or "")
    got = oai.chat.completions.create(model=MODEL, messages=PERSON_CHAT, max_tokens=MAX_TOKENS,
                                      temperature=0, response_format={"type": "json_object"})
    (choice,) = got.choices
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content or ""), dict)
    # "text" is no constraint: the free answer is no JSON object.
    got = oai.chat.completions.create(model=MODEL, messages=PERSON_CHAT, max_tokens=24,
                                      temperature=0, response_format={"type": "text"})
    text = got.choices[0].message.content or ""
    assert not text.lstrip().startswith("{"), text


def test_completions_with_response_format_and_compact_json(oai: openai.OpenAI) -> None:
    got = oai.completions.create(model=MODEL, prompt=PERSON_PROMPT, max_tokens=MAX_TOKENS,
                                 temperature=0,
                                 extra_body={"response_format": _schema_format(PERSON)})
    assert got.choices[0].finish_reason == "stop"
    person(got.choices[0].text)
    got = oai.chat.completions.create(
        model=MODEL, messages=PERSON_CHAT, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}})
    text = got.choices[0].message.content or ""
    value = person(text)
    # No free whitespace: xgrammar's fixed separators (", " and ": "), as in vLLM.
    assert text == json.dumps(value, ensure_ascii=False), text


def test_structured_outputs_and_guided_fields(oai: openai.OpenAI) -> None:
    got = oai.completions.create(model=MODEL, prompt="My phone number is", max_tokens=64,
                                 temperature=0, extra_body={"structured_outputs": {
                                     "regex": PHONE}})
    assert re.fullmatch(PHONE, got.choices[0].text), got.choices[0].text
    assert got.choices[0].finish_reason == "stop"
    got = oai.completions.create(model=MODEL, prompt=SENTIMENT, max_tokens=16, temperature=0,
                                 extra_body={"structured_outputs": {"choice": CHOICES}})
    assert got.choices[0].text in CHOICES and got.choices[0].finish_reason == "stop"
    chat = [{"role": "user", "content": "Is 'I love it' positive or negative?"}]
    got = oai.chat.completions.create(model=MODEL, messages=chat, max_tokens=16,
                                      temperature=0,
                                      extra_body={"guided_choice": ["positive", "negative"]})
    assert got.choices[0].message.content in ("positive", "negative")
    got = oai.completions.create(model=MODEL, prompt="Is the sky blue? Answer yes or no:",
                                 max_tokens=16, temperature=0,
                                 extra_body={"guided_grammar": 'root ::= "yes" | "no"'})
    assert got.choices[0].text in ("yes", "no")


def test_streamed_chat_with_a_schema(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=PERSON_CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        response_format=_schema_format(PERSON)))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # streamed, not one piece
    person("".join(deltas))
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "stop"


def test_n_samples_each_validate(oai: openai.OpenAI) -> None:
    got = oai.chat.completions.create(model=MODEL, messages=PERSON_CHAT, max_tokens=MAX_TOKENS,
                                      temperature=0.8, seed=5, n=2,
                                      response_format=_schema_format(PERSON))
    assert [c.index for c in got.choices] == [0, 1]
    for choice in got.choices:
        assert choice.finish_reason == "stop"
        person(choice.message.content or "")


@pytest.mark.parametrize(("response_format", "extra", "param", "message"), [
    pytest.param({"type": "structural_tag", "structures": [], "triggers": []}, {},
                 "response_format", "structural_tag", id="structural-tag"),
    pytest.param({"type": "nope"}, {}, "response_format", "nope", id="unknown-type"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "p"}}, {},
                 "response_format", "schema is required", id="no-schema"),
    pytest.param({"type": "json_object"}, {"structured_outputs": {"choice": ["a"]}},
                 "structured_outputs", "only one of response_format, structured_outputs",
                 id="two-sources"),
    pytest.param(None, {"guided_regex": "a+", "guided_choice": ["a"]},
                 "guided_choice", "only one of guided_regex, guided_choice",
                 id="two-guided-fields"),
    pytest.param(None, {"structured_outputs": {"chioce": ["a"]}},
                 "structured_outputs", "unknown field(s) chioce", id="unknown-field"),
])
def test_openai_refusals_name_the_field(oai: openai.OpenAI, response_format: Any,
                                        extra: dict[str, Any], param: str,
                                        message: str) -> None:
    if response_format is not None:
        extra = {**extra, "response_format": response_format}
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model=MODEL, messages=PERSON_CHAT, max_tokens=16,
                                    extra_body=extra)
    assert bad.value.status_code == 400
    error = bad.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert message in error["message"], error


@pytest.mark.parametrize(("extra", "field", "reason"), [
    pytest.param({"response_format": _schema_format({"type": "frobnicate"})},
                 "response_format", "frobnicate", id="response-format-bad-schema"),
    pytest.param({"response_format": _schema_format({"enum": []})},
                 "response_format", "enum", id="response-format-unsatisfiable"),
    pytest.param({"structured_outputs": {"regex": "[a-"}},
                 "structured_outputs", "nclosed", id="structured-outputs-bad-regex"),
    pytest.param({"guided_json": {"enum": []}}, "guided_json", "enum",
                 id="guided-json-unsatisfiable"),
])
def test_constraints_the_compiler_refuses_are_400_naming_the_field(
        oai: openai.OpenAI, extra: dict[str, Any], field: str, reason: str) -> None:
    # Refused when compiled, after the request was read: still a 400 that names the field the
    # client sent (in param, as the door's own refusals of these fields do, or in the message),
    # and the compiler's reason.
    for stream_ in (False, True):
        with pytest.raises(openai.BadRequestError) as bad:
            oai.completions.create(model=MODEL, prompt=PERSON_PROMPT, max_tokens=16,
                                   stream=stream_, extra_body=extra)
        error = bad.value.body
        assert isinstance(error, dict) and reason in error["message"], error
        assert error["param"] == field or field in error["message"], error
    # Serving on.
    got = oai.completions.create(model=MODEL, prompt=SENTIMENT, max_tokens=16, temperature=0,
                                 extra_body={"guided_choice": CHOICES})
    assert got.choices[0].text in CHOICES


def test_beam_search_with_a_constraint_is_refused(oai: openai.OpenAI) -> None:
    for extra in ({"structured_outputs": {"choice": CHOICES}},
                  {"response_format": {"type": "json_object"}}):
        with pytest.raises(openai.BadRequestError) as bad:
            oai.completions.create(model=MODEL, prompt=SENTIMENT, max_tokens=16, n=2,
                                   extra_body={"use_beam_search": True, **extra})
        assert bad.value.status_code == 400
        message = str(bad.value)
        assert "beam search" in message and "structured_outputs" in message, message
    # Beam search alone still runs.
    got = oai.completions.create(model=MODEL, prompt=SENTIMENT, max_tokens=4, n=2,
                                 extra_body={"use_beam_search": True})
    assert len(got.choices) == 2
