"""IncrementalDetokenizer with the real SmolLM2 (byte-level BPE) tokenizer.

The contract: feeding a sequence's ids one at a time yields deltas whose concatenation, plus the
final ``flush()``, is exactly what decoding all the ids at once gives, and ``text`` tracks that.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.model.loader import load_model

REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "The quick brown fox jumps over the lazy dog. 1234567890 + - * / = ?",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tdef bar(self):\n\t\tpass\n",
    "    leading spaces\n  \n\t\ttabs   and   runs   of    spaces   \n",
    "if (x) {\r\n  y();\r\n}\r\n",
    "中文文本测试：今天天气很好，我们去公园散步吧。",
    "日本語のテキスト、ひらがなとカタカナ。東京へ行きましょう！",
    "Русский текст: съешь же ещё этих мягких французских булок.",
    "Emoji 😀🎉🚀 and more 🤖 at the end 🔥",
    "Family 👨\u200d👩\u200d👧\u200d👦, flag 🏳️\u200d🌈, skin tone 👍🏽 and a keycap 1️⃣.",
    "Accents: café, naïve, façade, Ångström, São Paulo, Dvořák, Łódź, ß.",
    "Combining: e\u0301 a\u0308 n\u0303 (decomposed accents)",
    "Chat<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>",
    "<|endoftext|>starts with a special token",
    "Rare CJK: 𠀋𡈽𪚥 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ",
    "Mixed: hello 世界 мир 🌍 κόσμος עולם العالم",
    "",
    " ",
    "\n\n\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_model().tokenizer


def _stream(tokenizer, ids: list[int], prompt_ids: list[int] | None = None,
            skip_special_tokens: bool = True) -> tuple[list[str], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids or [], skip_special_tokens)
    deltas = []
    for token in ids:
        delta = detok.append(token)
        assert isinstance(delta, str)
        deltas.append(delta)
        assert detok.text == "".join(deltas)
    final = detok.flush()
    return deltas, final, detok


@pytest.mark.parametrize("text", TEXTS)
def test_concatenated_deltas_equal_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    deltas, final, detok = _stream(tokenizer, ids)
    assert "".join(deltas) + final == expected
    assert detok.text == expected
    # Valid UTF-8 text never shows a half-decoded character to the caller.
    assert not any(REPLACEMENT in d for d in [*deltas, final])


@pytest.mark.parametrize("text", TEXTS)
def test_without_skipping_special_tokens(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    expected = tokenizer.decode(ids, skip_special_tokens=False)
    deltas, final, detok = _stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(deltas) + final == expected
    assert detok.text == expected


def test_special_tokens_are_skipped(tokenizer):
    text = "Hi<|im_end|>there"
    ids = tokenizer.encode(text, add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in ids
    deltas, final, detok = _stream(tokenizer, ids)
    assert deltas[ids.index(im_end)] == ""
    assert final == ""
    assert detok.text == "Hithere"
    _, _, kept = _stream(tokenizer, ids, skip_special_tokens=False)
    assert kept.text == text


@pytest.mark.parametrize("char", ["𠀋", "😀", "👨\u200d👩\u200d👧\u200d👦", "鿿"])
def test_multibyte_character_split_across_tokens(tokenizer, char):
    ids = tokenizer.encode("a" + char + "b", add_special_tokens=False)
    # Precondition: the character really is split over several byte tokens.
    assert any(REPLACEMENT in tokenizer.decode([t]) for t in ids)
    deltas, final, detok = _stream(tokenizer, ids)
    assert "" in deltas, "the incomplete character must be held back"
    assert not any(REPLACEMENT in d for d in deltas)
    assert final == ""
    assert detok.text == "a" + char + "b"
    # Each code point comes out whole, in one delta (a ZWJ emoji is several code points).
    assert all(any(cp in d for d in deltas) for cp in char)


def test_held_back_bytes_are_released_by_flush(tokenizer):
    ids = tokenizer.encode("x😀", add_special_tokens=False)
    truncated = ids[:-1]  # the emoji's last byte is missing
    deltas, final, detok = _stream(tokenizer, truncated)
    assert "".join(deltas) == "x"
    assert final.startswith(REPLACEMENT)
    assert detok.text == tokenizer.decode(truncated, skip_special_tokens=True)


def test_flush_is_idempotent(tokenizer):
    ids = tokenizer.encode("hello 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    for token in ids:
        detok.append(token)
    detok.flush()
    assert detok.flush() == ""
    assert detok.text == "hello 😀"


@pytest.mark.parametrize(("prompt", "output"), [
    ("Write a greeting:", " Hello there, my friend!"),
    ("User: 你好", "，今天怎么样？"),
    ("def f(x):\n", "    return x * 2\n"),
    ("Emoji:", " 🚀 launch 👨\u200d👩\u200d👧"),
    ("<|im_start|>assistant\n", "Sure, here it is."),
])
def test_with_prompt_context(tokenizer, prompt, output):
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    output_ids = tokenizer.encode(output, add_special_tokens=False)
    # Tokenizing separately must round-trip, so the expected output is well defined.
    expected = tokenizer.decode(output_ids, skip_special_tokens=True)
    assert expected == output
    deltas, final, detok = _stream(tokenizer, output_ids, prompt_ids=prompt_ids)
    assert "".join(deltas) + final == expected
    assert detok.text == expected
    assert prompt not in detok.text


def test_long_prompt_only_uses_its_tail(tokenizer):
    prompt_ids = tokenizer.encode("word " * 200, add_special_tokens=False)
    output_ids = tokenizer.encode(" and the end.", add_special_tokens=False)
    _, _, detok = _stream(tokenizer, output_ids, prompt_ids=prompt_ids)
    assert detok.text == " and the end."


_SPECIAL_IDS = set(range(17))  # <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...
_VOCAB = 49152


@st.composite
def _token_ids(draw) -> list[int]:
    return draw(st.lists(
        st.integers(min_value=0, max_value=_VOCAB - 1).filter(lambda t: t not in _SPECIAL_IDS),
        max_size=40))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=_token_ids(), with_specials=st.booleans())
def test_random_token_sequences(tokenizer, ids, with_specials):
    # Random byte tokens often form invalid UTF-8. The property still holds exactly: the
    # decoder replaces invalid bytes with U+FFFD in the same way whether it sees the whole
    # sequence or a window that starts right after a complete character (UTF-8 resynchronizes
    # there), and a window is only advanced past text that does not end in U+FFFD.
    if with_specials:
        ids = [*ids[: len(ids) // 2], 2, *ids[len(ids) // 2:], 0]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    deltas, final, detok = _stream(tokenizer, ids)
    assert "".join(deltas) + final == expected
    assert detok.text == expected


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map: the token spelling of each of the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@pytest.fixture(scope="module")
def byte_tokens(tokenizer) -> dict[int, int]:
    """Byte value -> id of its single-byte token, for every byte the vocabulary has one for.

    Bytes that never occur in valid UTF-8 (0xC0, 0xC1, 0xF5-0xFF, ...) may lack a token.
    """
    vocab = tokenizer.get_vocab()
    found = {b: vocab[c] for b, c in enumerate(_byte_level_alphabet()) if c in vocab}
    assert len(found) > 200
    assert all(b in found for b in (0x41, 0x80, 0xBF, 0xE4, 0xF0))
    assert tokenizer.decode([found[ord("A")]]) == "A"
    assert tokenizer.decode([found[0xE4], found[0xB8], found[0xAD]]) == "中"
    return found


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_single_byte_tokens(tokenizer, byte_tokens, data):
    # Dense in partial and invalid UTF-8 sequences: stresses the hold-back logic. Here the
    # expected text is also known independently of the tokenizer.
    raw = data.draw(st.lists(st.sampled_from(sorted(byte_tokens)), max_size=30))
    ids = [byte_tokens[b] for b in raw]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected == bytes(raw).decode("utf-8", errors="replace")
    deltas, final, detok = _stream(tokenizer, ids)
    assert "".join(deltas) + final == expected
    assert detok.text == expected
