"""Model files are untrusted: a GGUF, safetensors or config.json that lies about any size is
refused with a clear error before anything is allocated or converted.

The fuzzing tests mutate one field at a time (counts, lengths, dims, types, offsets, the
metadata's sizes) of the embedded GGUF, of a tiny one written here and of a tiny Hugging Face
directory, and require a :class:`ModelFileError` for each, with the process's peak memory
staying within a fixed bound of where it started.
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pagedserve.model.file_checks import MAX_POSITIONS, ModelFileError
from pagedserve.model.file_checks.gguf_header import check_gguf
from pagedserve.model.loader import default_model_path, load_model
from tests.conftest import TinyFactory
from tests.gguf_files import write_gguf

# Peak resident memory a refused file may add to the process (KiB, as ru_maxrss counts).
MEMORY_BOUND_KIB = 256 * 1024
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@dataclass(frozen=True)
class Field:
    """A number stored in the file: where, how wide, what it is."""

    offset: int
    width: int  # bytes
    what: str


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---- GGUF ---------------------------------------------------------------------------------

_SIZES = ("block_count", "embedding_length", "vocab_size", "feed_forward_length",
          "attention.head_count", "attention.head_count_kv")
_T = gguf.GGMLQuantizationType


def _gguf_fields(path: Path) -> list[Field]:
    """The file's counts, lengths, dims, types and offsets, and the metadata's sizes, found by
    gguf's own reader (not the walk under test)."""
    reader = gguf.GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]

    def at(part: np.ndarray, what: str) -> Field:
        return Field(part.__array_interface__["data"][0] - base, part.nbytes, what)

    fields = [Field(8, 8, "tensor count"), Field(16, 8, "metadata count")]
    arch = reader.fields["general.architecture"].contents()
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        fields += [at(f.parts[0], f"length of key {key}"), at(f.parts[2], f"type of {key}")]
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            fields += [at(f.parts[3], f"item type of {key}"), at(f.parts[4], f"length of {key}")]
            if f.types[-1] == gguf.GGUFValueType.STRING:
                count = len(f.data)
                fields += [at(f.parts[5 + 2 * i], f"length of {key}[{i}]")
                           for i in sorted({0, 1, count - 1} & set(range(count)))]
        elif key in {f"{arch}.{size}" for size in _SIZES}:
            fields.append(at(f.parts[-1], f"value of {key}"))
    for tensor in reader.tensors:
        parts = tensor.field.parts
        fields += [at(parts[0], f"name length of {tensor.name}"),
                   at(parts[2], f"dimension count of {tensor.name}"),
                   at(parts[4], f"tensor type of {tensor.name}"),
                   at(parts[5], f"offset of {tensor.name}")]
        fields += [Field(at(parts[3], "").offset + 8 * i, 8, f"dimension {i} of {tensor.name}")
                   for i in range(len(parts[3]))]
    return fields


def _other_value(original: int, width: int) -> st.SearchStrategy[int]:
    """Another value of a ``width``-byte field: near the original, or an extreme."""
    mask = (1 << (8 * width)) - 1
    near = st.integers(-64, 64).filter(bool).map(lambda d: (original + d) & mask)
    extreme = st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63, mask]).map(lambda v: v & mask)
    return st.one_of(near, extreme).filter(lambda v: v != original)


# Value types of one width (GGUF's numbering): a value retyped among them keeps every size.
_WIDTHS = {0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8}


def _same_bytes_read_otherwise(field: Field, old: int, new: int) -> bool:
    """A retyping that no size shows: a tensor F16 <-> BF16, or a metadata value among the
    value types of its width (a uint32 read as an int32)."""
    if field.what.startswith("tensor type of "):
        return {old, new} <= {_T.F16.value, _T.BF16.value}
    if field.what.startswith(("type of ", "item type of ")):
        return old in _WIDTHS and _WIDTHS.get(new) == _WIDTHS[old]
    return False


class _Patched:
    """A copy of a GGUF file whose fields the test sets and restores in place."""

    def __init__(self, source: Path, copy: Path) -> None:
        shutil.copyfile(source, copy)
        self.path = copy
        self.fields = _gguf_fields(copy)

    def read(self, field: Field) -> int:
        with open(self.path, "rb") as f:
            f.seek(field.offset)
            return int.from_bytes(f.read(field.width), "little")

    def write(self, field: Field, value: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(field.offset)
            f.write(value.to_bytes(field.width, "little"))


def _fuzz_gguf(patched: _Patched, data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(patched.fields), label="field")
    original = patched.read(field)
    value = data.draw(_other_value(original, field.width), label="value")
    assume(not _same_bytes_read_otherwise(field, original, value))
    patched.write(field, value)
    peak = _peak_kib()
    try:
        with pytest.raises(ModelFileError) as refused:
            check_gguf(patched.path)
    finally:
        patched.write(field, original)
    assert str(refused.value).startswith(patched.path.name), refused.value
    assert _peak_kib() - peak < MEMORY_BOUND_KIB


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> _Patched:
    folder = tmp_path_factory.mktemp("embedded-gguf")
    return _Patched(Path(default_model_path()), folder / "model.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_llama: TinyFactory, tmp_path_factory: pytest.TempPathFactory) -> _Patched:
    folder = tmp_path_factory.mktemp("tiny-gguf")
    source = write_gguf(tiny_llama(num_heads=2, num_kv_heads=1, head_dim=32, intermediate=64),
                        folder / "source.gguf",
                        lambda name: _T.Q8_0 if name.endswith("ffn_up.weight") else _T.F32)
    return _Patched(source, folder / "model.gguf")


def test_the_real_files_pass(embedded: _Patched, tiny: _Patched) -> None:
    for patched in (embedded, tiny):
        header = check_gguf(patched.path)
        assert header.metadata["general.architecture"] == "llama" and header.tensors


@FUZZ
@given(data=st.data())
def test_every_lie_of_the_embedded_gguf_is_refused(embedded: _Patched,
                                                   data: st.DataObject) -> None:
    _fuzz_gguf(embedded, data)


@FUZZ
@given(data=st.data())
def test_every_lie_of_a_tiny_gguf_is_refused(tiny: _Patched, data: st.DataObject) -> None:
    _fuzz_gguf(tiny, data)


def _metadata_field(patched: _Patched, key: str) -> Field:
    return next(f for f in patched.fields if f.what == f"value of {key}")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(folder))
    return folder


def test_a_huge_block_count_is_refused_before_conversion(embedded: _Patched,
                                                         cache: Path) -> None:
    """The reported case: ``llama.block_count`` 30 -> 100000 grew a load past 12 GB."""
    field = _metadata_field(embedded, "llama.block_count")
    peak = _peak_kib()
    embedded.write(field, 100000)
    try:
        with pytest.raises(ModelFileError, match=r"llama\.block_count is 100000, but the file "
                                                 r"has tensors for 30 blocks"):
            load_model(str(embedded.path))
        with pytest.raises(ModelFileError, match="block_count"):
            load_model(str(embedded.path), quantization="gguf")
    finally:
        embedded.write(field, 30)
    assert _peak_kib() - peak < MEMORY_BOUND_KIB
    assert not list((cache / "gguf").glob("model-*")), "nothing was converted"


@pytest.mark.parametrize(("cut", "expected"), [
    (3, "too short for a GGUF header"),
    (1000, "ends inside|more than the .* bytes left"),
    (-1, "runs past the end of the file"),
])
def test_a_truncated_gguf_is_refused(tiny: _Patched, tmp_path: Path, cut: int,
                                     expected: str) -> None:
    data = tiny.path.read_bytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:cut])
    with pytest.raises(ModelFileError, match=expected):
        check_gguf(short)


def test_bytes_after_the_last_tensor_are_refused(tiny: _Patched, tmp_path: Path) -> None:
    longer = tmp_path / "longer.gguf"
    longer.write_bytes(tiny.path.read_bytes() + b"\0" * 4096)
    with pytest.raises(ModelFileError, match="4096 bytes follow the last tensor"):
        check_gguf(longer)


# ---- Hugging Face directories ---------------------------------------------------------------

@dataclass(repr=False)
class _Directory:
    """A tiny model directory whose safetensors header and config.json the test rewrites."""

    path: Path
    header: dict[str, Any]
    data: bytes
    config: dict[str, Any]

    @classmethod
    def copy_of(cls, source: Path, target: Path) -> _Directory:
        shutil.copytree(source, target)
        raw = (target / "model.safetensors").read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        return cls(target, json.loads(raw[8:8 + length]), raw[8 + length:],
                   json.loads((target / "config.json").read_text()))

    def write(self, header: dict[str, Any], config: dict[str, Any],
              length_delta: int = 0) -> None:
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (self.path / "model.safetensors").write_bytes(
            struct.pack("<Q", len(text) + length_delta) + text + self.data)
        (self.path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def directory(tiny_llama: TinyFactory, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[_Directory]:
    source = tiny_llama(num_heads=2, num_kv_heads=1, head_dim=32, intermediate=64)
    made = _Directory.copy_of(source, tmp_path_factory.mktemp("tiny-hf") / "model")
    yield made
    made.write(made.header, made.config)


_CONFIG_SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size")


@st.composite
def _directory_lie(draw: st.DrawFn, directory: _Directory
                   ) -> tuple[dict[str, Any], dict[str, Any], int]:
    header = json.loads(json.dumps(directory.header))
    config = dict(directory.config)
    length_delta = 0
    kind = draw(st.sampled_from(["shape", "offset", "dtype", "length", "config", "context"]))
    names = sorted(k for k in header if k != "__metadata__")
    entry = header[draw(st.sampled_from(names))]
    delta = draw(st.integers(-64, 64).filter(bool))
    if kind == "shape":
        dim = draw(st.integers(0, len(entry["shape"]) - 1))
        assume(entry["shape"][dim] + delta >= 0)
        entry["shape"][dim] += delta
    elif kind == "offset":
        entry["data_offsets"][draw(st.integers(0, 1))] += delta
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "I32", "U8", "F64", "Q4", ""]))
        assume(entry["dtype"] != directory.header[names[0]]["dtype"])
    elif kind == "length":
        length_delta = delta
    elif kind == "config":
        key = draw(st.sampled_from(_CONFIG_SIZES))
        config[key] = draw(st.one_of(
            st.just(config[key] + delta).filter(lambda v: v > 0),
            st.sampled_from([0, -1, 10**12, "64", 1.5, True])))
    else:
        config["max_position_embeddings"] = draw(st.integers(MAX_POSITIONS + 1, 2**62))
    return header, config, length_delta


@FUZZ
@given(data=st.data())
def test_every_lie_of_a_model_directory_is_refused(directory: _Directory,
                                                   data: st.DataObject) -> None:
    header, config, length_delta = data.draw(_directory_lie(directory), label="lie")
    directory.write(header, config, length_delta)
    peak = _peak_kib()
    try:
        with pytest.raises(ModelFileError):
            load_model(str(directory.path))
    finally:
        directory.write(directory.header, directory.config)
    assert _peak_kib() - peak < MEMORY_BOUND_KIB


def test_the_tiny_directory_loads(directory: _Directory) -> None:
    loaded = load_model(str(directory.path))
    assert loaded.config.num_hidden_layers == directory.config["num_hidden_layers"]


@pytest.mark.parametrize(("content", "expected"), [
    ('{"num_hidden_layers": 2, "num_hidden_layers": 100000}', "appears twice"),
    ("[1, 2]", "not a JSON object"),
    ("{", "not valid JSON"),
])
def test_a_config_that_lies_is_named(directory: _Directory, content: str,
                                     expected: str) -> None:
    try:
        (directory.path / "config.json").write_text(content)
        with pytest.raises(ModelFileError, match=expected):
            load_model(str(directory.path), weights=False)
    finally:
        directory.write(directory.header, directory.config)


def test_a_config_claiming_more_layers_is_refused(directory: _Directory) -> None:
    directory.write(directory.header, {**directory.config, "num_hidden_layers": 100000})
    try:
        with pytest.raises(ModelFileError, match=r"config\.json gives 100000 layers, but the "
                                                 r"weights have tensors for 2"):
            load_model(str(directory.path))
    finally:
        directory.write(directory.header, directory.config)


def test_an_index_naming_a_file_outside_is_refused(directory: _Directory, tmp_path: Path) -> None:
    target = tmp_path / "model"
    shutil.copytree(directory.path, target)
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(target / "model.safetensors", outside)
    (target / "model.safetensors").unlink()
    weight_map = {name: "../outside.safetensors" for name in directory.header
                  if name != "__metadata__"}
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelFileError, match="not a file of the directory"):
        load_model(str(target))
