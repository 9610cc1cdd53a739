"""A GGUF file's header, walked without believing it, and held against its architecture.

The walk reads the file through a memory map and never allocates by a count the file states:
every count and length is first compared with the bytes that remain (each item takes at least
one byte), so a lie ends the walk at the first field that cannot be true. Then the tensors must
lie inside the data section, aligned, each one where the previous one ends (as llama.cpp's and
gguf-py's writers place them), and the metadata must describe them: the block count is the
number of blocks that have tensors, the embedding and vocabulary sizes are the token
embedding's dimensions (the tokens no more than its rows), every block's tensors have block 0's
shapes.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from pagedserve.model.file_checks import MAX_POSITIONS, ModelFileError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 63  # GGML_MAX_NAME less its terminator
_MAX_ARRAY_DEPTH = 2
MAX_TENSORS = 1 << 20
MAX_METADATA = 1 << 16
MAX_WALKED_ITEMS = 1 << 22  # strings of an array (vocabularies and merges have under a million)
_STRING, _ARRAY = 8, 9
# Value type -> struct format of one scalar.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_INTEGERS = (0, 1, 2, 3, 4, 5, 10, 11)
# A tensor's info takes at least: name length, dims count, one dim, type, offset.
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8
# A key-value pair takes at least: key length, value type, a one-byte value.
_MIN_KV = 8 + 4 + 1
_Q = gguf.GGMLQuantizationType
_INTEGER_TENSORS = (_Q.I8, _Q.I16, _Q.I32, _Q.I64)
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class ArrayInfo:
    """An array value as the walk keeps it: its element type and count, not its items."""

    item_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGML order: the row length first
    type_name: str
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_start: int = 0


class _Walk:
    """A cursor over the file's bytes that refuses to read past their end."""

    def __init__(self, data: memoryview, name: str) -> None:
        self.data = data
        self.name = name
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.name}: {what} (at byte {self.pos})")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if size > self.left:
            raise self.fail(f"the file ends inside {what}")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def count(self, what: str, min_item_bytes: int) -> int:
        """A stated count, refused unless that many items of the smallest size could follow."""
        value = int(self.scalar("Q", what))
        if value * min_item_bytes > self.left:
            raise self.fail(f"{what} is {value}, more than the {self.left} bytes left can hold")
        return value

    def string(self, what: str, keep: bool = True) -> str:
        length = self.count(f"the length of {what}", 1)
        start = self.pos
        self.pos += length
        if not keep:
            return ""
        try:
            return bytes(self.data[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8") from exc

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what, keep=depth == 0)
        if kind != _ARRAY:
            raise self.fail(f"{what} has unknown value type {kind}")
        if depth >= _MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays deeper than {_MAX_ARRAY_DEPTH}")
        item_type = int(self.scalar("I", f"the item type of {what}"))
        if item_type in _SCALARS:
            size = struct.calcsize("<" + _SCALARS[item_type])
            count = self.count(f"the length of {what}", size)
            self.pos += count * size
            return ArrayInfo(item_type, count)
        if item_type not in (_STRING, _ARRAY):
            raise self.fail(f"{what} has items of unknown value type {item_type}")
        count = self.count(f"the length of {what}", 8 if item_type == _STRING else 12)
        if count > MAX_WALKED_ITEMS:  # each is walked in Python: bounded in time too
            raise self.fail(f"{what} has {count} items, more than {MAX_WALKED_ITEMS}")
        for i in range(count):
            self.value(item_type, f"item {i} of {what}", depth + 1)
        return ArrayInfo(item_type, count)


def read_header(path: Path) -> GGUFHeader:
    """``path``'s metadata (arrays as their type and length) and tensor infos, each stated size
    checked against the file; :class:`ModelFileError` on the first that cannot be true."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 4 + 4 + 8 + 8:
            raise ModelFileError(f"{path.name}: {size} bytes is too short for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _walk(_Walk(view, path.name), size)
            finally:
                view.release()


def _walk(walk: _Walk, size: int) -> GGUFHeader:
    if bytes(walk.data[:4]) != _MAGIC:
        raise walk.fail("not a GGUF file (no GGUF magic)")
    walk.pos = 4
    version = int(walk.scalar("I", "the version"))
    if version not in _VERSIONS:
        raise walk.fail(f"GGUF version {version} is not one of {_VERSIONS}")
    header = GGUFHeader(version)
    tensor_count = walk.count("the tensor count", _MIN_TENSOR_INFO)
    kv_count = walk.count("the metadata count", _MIN_KV)
    # Bounded by the file's size alone, a crafted file's millions of tiny entries would each
    # cost a Python object: no model has anywhere near these many.
    if tensor_count > MAX_TENSORS or kv_count > MAX_METADATA:
        raise walk.fail(f"{tensor_count} tensors and {kv_count} metadata entries: at most "
                        f"{MAX_TENSORS} and {MAX_METADATA}")
    for i in range(kv_count):
        key = walk.string(f"metadata key {i}")
        if key in header.metadata:
            raise walk.fail(f"metadata key {key!r} appears twice")
        kind = int(walk.scalar("I", f"the value type of {key!r}"))
        header.metadata[key] = walk.value(kind, f"metadata {key!r}")
    for i in range(tensor_count):
        info = _tensor_info(walk, i)
        if info.name in header.tensors:
            raise walk.fail(f"tensor {info.name!r} appears twice")
        header.tensors[info.name] = info
    alignment = header.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise walk.fail(f"general.alignment {alignment!r} is not a power of two")
    header.data_start = -(-walk.pos // alignment) * alignment
    _check_placement(header, size, alignment, walk.name)
    return header


def _tensor_info(walk: _Walk, i: int) -> TensorInfo:
    name = walk.string(f"the name of tensor {i}")
    if not name or len(name) > _MAX_NAME:
        raise walk.fail(f"tensor {i}'s name {name[:80]!r} is empty or over {_MAX_NAME} "
                        f"characters")
    n_dims = int(walk.scalar("I", f"the dimension count of {name}"))
    if not 1 <= n_dims <= _MAX_DIMS:
        raise walk.fail(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS})")
    dims = tuple(int(walk.scalar("Q", f"a dimension of {name}")) for _ in range(n_dims))
    type_id = int(walk.scalar("I", f"the type of {name}"))
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise walk.fail(f"tensor {name} has unknown type {type_id}") from None
    if qtype in _INTEGER_TENSORS:
        # No model's weights are stored so; an integer type of a float's width would pass
        # for it.
        raise walk.fail(f"tensor {name} has integer type {qtype.name}")
    offset = int(walk.scalar("Q", f"the offset of {name}"))
    if any(d <= 0 for d in dims):
        raise walk.fail(f"tensor {name} has dimensions {list(dims)}: each must be positive")
    if dims[0] % block:
        raise walk.fail(f"tensor {name}'s rows of {dims[0]} are not whole blocks of {block} "
                        f"({qtype.name})")
    elements = 1
    for d in dims:
        elements *= d
    return TensorInfo(name, dims, qtype.name, offset, elements // block * type_size)


def _check_placement(header: GGUFHeader, size: int, alignment: int, name: str) -> None:
    data_size = size - header.data_start
    if data_size < 0:
        raise ModelFileError(f"{name}: the header runs past the end of the file")
    end = 0
    for info in sorted(header.tensors.values(), key=lambda t: t.offset):
        if info.offset != -(-end // alignment) * alignment:
            raise ModelFileError(
                f"{name}: tensor {info.name} starts at data byte {info.offset}, not where the "
                f"tensor before it ends (data byte {end}, aligned to {alignment})")
        end = info.offset + info.nbytes
        if end > data_size:
            raise ModelFileError(
                f"{name}: tensor {info.name} ({info.nbytes} bytes at data byte {info.offset}) "
                f"runs past the end of the file ({data_size} bytes of data)")
    if data_size > -(-end // alignment) * alignment:
        raise ModelFileError(f"{name}: {data_size - end} bytes follow the last tensor's data")


def check_gguf(path: Path) -> GGUFHeader:
    """:func:`read_header`, then the metadata held against the tensors it describes."""
    header = read_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(f"{path.name}: general.architecture is missing or not a string")

    def number(key: str, required: bool = True) -> int | None:
        value = meta.get(f"{arch}.{key}")
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelFileError(f"{path.name}: {arch}.{key} is {value!r}, not a positive "
                                 f"integer")
        return value

    block_count = number("block_count")
    blocks: dict[int, dict[str, TensorInfo]] = {}
    for info in header.tensors.values():
        if match := _BLOCK.fullmatch(info.name):
            blocks.setdefault(int(match[1]), {})[match[2]] = info
    if sorted(blocks) != list(range(len(blocks))) or len(blocks) != block_count:
        raise ModelFileError(f"{path.name}: {arch}.block_count is {block_count}, but the file "
                             f"has tensors for {len(blocks)} blocks")
    for index, tensors in blocks.items():
        if {k: v.dims for k, v in tensors.items()} != {k: v.dims for k, v in blocks[0].items()}:
            raise ModelFileError(f"{path.name}: block {index}'s tensors differ from block 0's "
                                 f"in names or shapes")
    embedding = header.tensors.get("token_embd.weight")
    if embedding is None or len(embedding.dims) != 2:
        raise ModelFileError(f"{path.name}: no two-dimensional token_embd.weight")
    width, vocab = embedding.dims
    if number("embedding_length") != width:
        raise ModelFileError(f"{path.name}: {arch}.embedding_length is "
                             f"{meta[arch + '.embedding_length']}, but token_embd.weight has "
                             f"rows of {width}")
    stated_vocab = meta.get(f"{arch}.vocab_size")
    if stated_vocab is not None and stated_vocab != vocab:
        raise ModelFileError(f"{path.name}: {arch}.vocab_size is {stated_vocab}, but "
                             f"token_embd.weight has {vocab} rows")
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, ArrayInfo) and tokens.count > vocab:
        # Fewer tokens than rows is a padded vocabulary; more would index past the rows.
        raise ModelFileError(f"{path.name}: tokenizer.ggml.tokens has {tokens.count} tokens, "
                             f"but token_embd.weight has {vocab} rows")
    for tensor, dims in {"output_norm.weight": (width,), "output.weight": (width, vocab)}.items():
        stated = header.tensors.get(tensor)
        if stated is not None and stated.dims != dims:
            raise ModelFileError(f"{path.name}: {tensor} has dimensions {list(stated.dims)}, "
                                 f"not {list(dims)}")
    _check_attention(path.name, arch, number, width, blocks[0])
    context = number("context_length", required=False)
    if context is not None and context > MAX_POSITIONS:
        raise ModelFileError(f"{path.name}: {arch}.context_length {context} is over "
                             f"{MAX_POSITIONS}")
    return header


def _check_attention(name: str, arch: str, number: Any, width: int,
                     block: dict[str, TensorInfo]) -> None:
    heads = number("attention.head_count")
    kv_heads = number("attention.head_count_kv", required=False) or heads
    if heads % kv_heads:
        raise ModelFileError(f"{name}: {arch}.attention.head_count_kv {kv_heads} does not "
                             f"divide {arch}.attention.head_count {heads}")
    head_dim = number("attention.key_length", required=False)
    if head_dim is None:
        if width % heads:
            raise ModelFileError(f"{name}: {arch}.attention.head_count {heads} does not divide "
                                 f"{arch}.embedding_length {width}")
        head_dim = width // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    expected = {"attn_q.weight": (width, q), "attn_k.weight": (width, kv),
                "attn_v.weight": (width, kv), "attn_output.weight": (q, width),
                "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
                "attn_norm.weight": (width,), "ffn_norm.weight": (width,),
                "attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}
    ffn = number("feed_forward_length", required=False)
    if ffn is not None:
        expected |= {"ffn_up.weight": (width, ffn), "ffn_gate.weight": (width, ffn),
                     "ffn_down.weight": (ffn, width)}
    for tensor, dims in expected.items():
        info = block.get(tensor)
        if info is not None and info.dims != dims:
            raise ModelFileError(f"{name}: blk.0.{tensor} has dimensions {list(info.dims)}, "
                                 f"where the metadata gives {list(dims)}")
