"""SamplingParams validation: every bad value raises ValueError naming its field."""

from __future__ import annotations

import math
import re

import pytest

from pagedserve.sampling_params import SamplingParams

BAD_VALUES = [
    # n
    ("n", 0), ("n", -1), ("n", 1.5), ("n", "2"), ("n", True), ("n", None),
    # temperature
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "1"), ("temperature", None), ("temperature", True),
    # top_k
    ("top_k", -1), ("top_k", 2.0), ("top_k", False), ("top_k", None),
    # top_p
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.0001), ("top_p", math.nan), ("top_p", "0.9"),
    ("top_p", True),
    # min_p
    ("min_p", -0.01), ("min_p", 1.01), ("min_p", -math.inf), ("min_p", None),
    # repetition_penalty
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("repetition_penalty", False),
    # presence_penalty / frequency_penalty
    ("presence_penalty", -2.01), ("presence_penalty", 2.01), ("presence_penalty", math.nan),
    ("frequency_penalty", -2.01), ("frequency_penalty", 2.5), ("frequency_penalty", "0"),
    # seed
    ("seed", -1), ("seed", 2**63), ("seed", 1.0), ("seed", True), ("seed", "42"),
    # max_tokens
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 10.0), ("max_tokens", True),
    # min_tokens
    ("min_tokens", -1), ("min_tokens", 1.0), ("min_tokens", True), ("min_tokens", None),
    # logprobs
    ("logprobs", -1), ("logprobs", 1.0), ("logprobs", True),
    # stop
    ("stop", ""), ("stop", [""]), ("stop", ["ok", ""]), ("stop", ["ok", 3]), ("stop", [None]),
    ("stop", 5), ("stop", None),
    # stop_token_ids
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", [True]),
    ("stop_token_ids", ["2"]), ("stop_token_ids", None), ("stop_token_ids", 7),
    # booleans
    ("include_stop_str_in_output", 1), ("include_stop_str_in_output", None),
    ("ignore_eos", "yes"), ("ignore_eos", 0), ("skip_special_tokens", 1.0),
]


def _names_field(message: str, field: str) -> bool:
    return re.search(rf"\b{re.escape(field)}\b", message) is not None


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_raises_naming_field(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert _names_field(str(info.value), field), str(info.value)


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_from_dict_rejects_the_same_values(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams.from_dict({field: value})
    assert _names_field(str(info.value), field), str(info.value)


def test_min_tokens_must_not_exceed_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens.*max_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    params = SamplingParams(min_tokens=4, max_tokens=4)
    assert params.min_tokens == params.max_tokens == 4
    # No max_tokens: any min_tokens goes.
    assert SamplingParams(min_tokens=1000, max_tokens=None).min_tokens == 1000


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-6])
def test_greedy_rejects_n_above_one(temperature):
    with pytest.raises(ValueError, match=r"\bn\b.*greedy"):
        SamplingParams(n=2, temperature=temperature)
    assert SamplingParams(n=1, temperature=temperature).is_greedy


def test_sampling_allows_n_above_one():
    params = SamplingParams(n=4, temperature=0.7)
    assert params.n == 4
    assert not params.is_greedy


GOOD_VALUES = [
    ("n", 1), ("n", 3),
    ("temperature", 0), ("temperature", 0.0), ("temperature", 2), ("temperature", 100.0),
    ("top_k", 0), ("top_k", 1), ("top_k", 50),
    ("top_p", 1), ("top_p", 1.0), ("top_p", 1e-9), ("top_p", 0.5),
    ("min_p", 0), ("min_p", 0.0), ("min_p", 1.0), ("min_p", 0.05),
    ("repetition_penalty", 1e-3), ("repetition_penalty", 1), ("repetition_penalty", 10.0),
    ("presence_penalty", -2), ("presence_penalty", 2.0), ("presence_penalty", 0.5),
    ("frequency_penalty", -2.0), ("frequency_penalty", 2), ("frequency_penalty", 0),
    ("seed", None), ("seed", 0), ("seed", 2**63 - 1),
    ("max_tokens", None), ("max_tokens", 1), ("max_tokens", 4096),
    ("min_tokens", 0), ("min_tokens", 16),
    ("logprobs", None), ("logprobs", 0), ("logprobs", 20),
    ("stop", []), ("stop", ["\n", "END"]), ("stop", ("a", "b")),
    ("stop_token_ids", []), ("stop_token_ids", [0, 2, 49151]), ("stop_token_ids", (5,)),
    ("include_stop_str_in_output", True), ("ignore_eos", True), ("skip_special_tokens", False),
]


@pytest.mark.parametrize(("field", "value"), GOOD_VALUES)
def test_good_value_accepted(field, value):
    kwargs = {field: value}
    if field == "n" and value > 1:
        kwargs["temperature"] = 1.0
    params = SamplingParams(**kwargs)
    got = getattr(params, field)
    if field in ("stop", "stop_token_ids"):
        assert isinstance(got, list)
        assert got == list(value)
    else:
        assert got == value
        assert type(got) is type(value)


def test_defaults():
    params = SamplingParams()
    assert params.n == 1
    assert params.temperature == 1.0
    assert not params.is_greedy
    assert params.max_tokens == 16
    assert params.stop == []
    assert params.stop_token_ids == []
    assert params.skip_special_tokens is True
    assert params.logprobs is None


def test_stop_string_becomes_list():
    params = SamplingParams(stop="###")
    assert params.stop == ["###"]
    assert isinstance(params.stop, list)
    assert SamplingParams.from_dict({"stop": "\n\n"}).stop == ["\n\n"]


def test_stop_lists_are_copied():
    stop = ["a"]
    ids = [3]
    params = SamplingParams(stop=stop, stop_token_ids=ids)
    stop.append("b")
    ids.append(4)
    assert params.stop == ["a"]
    assert params.stop_token_ids == [3]


def test_defaults_are_not_shared():
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    a.stop_token_ids.append(1)
    assert b.stop == []
    assert b.stop_token_ids == []


def test_from_dict_builds_params():
    params = SamplingParams.from_dict({"temperature": 0.5, "top_k": 40, "max_tokens": 7,
                                       "stop": ["x"], "seed": 3, "n": 2})
    assert params == SamplingParams(temperature=0.5, top_k=40, max_tokens=7, stop=["x"],
                                    seed=3, n=2)
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_from_dict_rejects_unknown_keys_naming_them():
    with pytest.raises(ValueError) as info:
        SamplingParams.from_dict({"temperature": 0.5, "use_beam_search": True, "best_of": 2})
    message = str(info.value)
    assert "use_beam_search" in message
    assert "best_of" in message
    assert "temperature" not in message


def test_from_dict_unknown_key_checked_before_values():
    with pytest.raises(ValueError, match="bogus"):
        SamplingParams.from_dict({"bogus": 1, "temperature": -1})


@pytest.mark.parametrize("field", ["n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs"])
@pytest.mark.parametrize("value", [True, False])
def test_bools_rejected_for_int_fields(field, value):
    with pytest.raises(ValueError, match=rf"{field}.*integer"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty",
                                   "presence_penalty", "frequency_penalty"])
def test_bools_rejected_for_number_fields(field):
    with pytest.raises(ValueError, match=rf"{field}.*number"):
        SamplingParams(**{field: True})


def test_error_message_shows_bad_value():
    with pytest.raises(ValueError, match=r"top_p.*1\.5"):
        SamplingParams(top_p=1.5)


def test_beam_search_params():
    params = SamplingParams.from_dict({"beam_width": 4, "n": 2, "length_penalty": 0.5,
                                       "early_stopping": "never", "max_tokens": 8})
    assert params.use_beam_search and params.num_seqs == 4
    assert SamplingParams(n=3, temperature=1.0).num_seqs == 3
    # Beam search is deterministic: greedy temperature and n > 1 go together there.
    assert SamplingParams(beam_width=2, n=2, temperature=0).num_seqs == 2


@pytest.mark.parametrize(("values", "field"), [
    ({"beam_width": 0}, "beam_width"),
    ({"beam_width": 2.5}, "beam_width"),
    ({"beam_width": 2, "n": 3}, "n"),
    ({"beam_width": 2, "top_p": 0.5}, "top_p"),
    ({"beam_width": 2, "top_k": 5}, "top_k"),
    ({"beam_width": 2, "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"beam_width": 2, "logprobs": 1}, "logprobs"),
    ({"beam_width": 2, "stop": ["x"]}, "stop"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"length_penalty": float("nan")}, "length_penalty"),
])
def test_bad_beam_search_params_name_the_field(values, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams.from_dict(values)
