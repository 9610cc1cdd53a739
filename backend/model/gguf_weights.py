"""A GGUF file's tensors read as they are stored, for ``quantization="gguf"``.

Q4_1 and Q8_0 tensors come out as their blocks, byte for byte: the block-quantized kernels
(:mod:`pagedserve.kernels.block_quant`) multiply them as llama.cpp does. Q4_0 blocks
(``w = d * (q - 8)``) are rewritten as Q4_1 blocks with the same scale and codes and the offset
``m = -8 d`` (exact in fp16), so one kernel serves both. Blocks sit in the state dict as
:func:`pagedserve.model.projections.blocks_entries` lays them out.

F32 and F16 tensors stay as stored. Other types (k-quants, Q5, ...) have no kernel here: they
are dequantized by ``gguf``'s reference code, with a log line naming them, rather than refused,
so that any GGUF that loads without a quantization loads with ``"gguf"`` too, its other
tensors quantized as the file has them.

Tensors are named as ``transformers`` names them (the keys of the model's converted directory)
and reordered as its GGUF reader reorders them: llama.cpp interleaves the rows of Llama's q and
k projections for its rotary kernel; whole rows move, so the rows of blocks are put back the
same way. The data are read through a memory map of the file. Parsing a GGUF's header with
``gguf.GGUFReader`` takes seconds (the tokenizer's strings), so the tensors' types, shapes and
offsets are kept in a small JSON index next to the converted directory's files.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig

from pagedserve.model.projections import blocks_entries

log = logging.getLogger(__name__)

INDEX_NAME = "gguf-tensors.json"
_Q = gguf.GGMLQuantizationType
_FLOAT: dict[gguf.GGMLQuantizationType, type[np.floating]] = {_Q.F32: np.float32,
                                                              _Q.F16: np.float16}


def tensor_index(gguf_file: Path, index_file: Path) -> dict:
    """The file's architecture and, per tensor, its type, shape (rows first) and place."""
    if index_file.is_file():
        return json.loads(index_file.read_text(encoding="utf-8"))
    reader = gguf.GGUFReader(gguf_file)
    index = {"architecture": str(reader.fields["general.architecture"].contents()),
             "tensors": {t.name: {"type": t.tensor_type.name,
                                  "shape": [int(n) for n in reversed(t.shape)],
                                  "offset": int(t.data_offset), "bytes": int(t.n_bytes)}
                         for t in reader.tensors}}
    fd, staging = tempfile.mkstemp(dir=index_file.parent, prefix=".index-")
    with os.fdopen(fd, "w") as f:
        json.dump(index, f)
    os.replace(staging, index_file)
    return index


def _unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """transformers' undoing of llama.cpp's q/k row order, on any per-row data."""
    return (rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def _q4_0_as_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks ``[..., 18]`` (fp16 d, codes) as Q4_1 blocks ``[..., 20]`` (fp16 d, fp16 m,
    the same codes) of the same weights: ``d * (q - 8) = d * q + m`` with ``m = -8 d``."""
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)
    m = (d * np.float16(-8)).view(np.uint8)  # a power of two: exact
    return np.concatenate([blocks[..., :2], m, blocks[..., 2:]], axis=-1)


def decode_tensor(name: str, kind: str, raw: np.ndarray, shape: list[int]
                  ) -> dict[str, torch.Tensor]:
    """``name``'s entries in the state dict from its raw bytes ``[rows, bytes per row]`` of
    GGML type ``kind`` (``"Q4_1"``, ...) and its ``shape`` (rows first)."""
    qtype = gguf.GGMLQuantizationType[kind]
    if qtype in _FLOAT:
        return {name: torch.from_numpy(raw.view(_FLOAT[qtype]).reshape(shape).copy())}
    rows = raw.shape[0]
    if qtype == _Q.Q4_0:
        blocks = _q4_0_as_q4_1(raw.reshape(rows, -1, 18)).reshape(rows, -1)
        return blocks_entries(name, "q4_1", torch.from_numpy(np.ascontiguousarray(blocks)))
    if qtype in (_Q.Q4_1, _Q.Q8_0):
        kind_name = "q4_1" if qtype == _Q.Q4_1 else "q8_0"
        return blocks_entries(name, kind_name, torch.from_numpy(np.array(raw, copy=True)))
    try:
        values = gguf.quants.dequantize(raw, qtype)
    except NotImplementedError as exc:
        raise ValueError(f"GGUF tensor {name} is of type {kind}, which gguf cannot read: "
                         f"{exc}") from exc
    return {name: torch.from_numpy(np.ascontiguousarray(values).reshape(shape))}


def read_gguf_weights(gguf_file: Path, names: list[str], config: PretrainedConfig,
                      index_file: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``gguf_file`` that ``names`` (``transformers``' names) stand for, as the
    module's docstring lays them out; ``index_file`` caches the file's tensor index."""
    index = tensor_index(gguf_file, index_file)
    arch = index["architecture"]
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise ValueError(f"{gguf_file.name}: gguf knows no architecture {arch!r}")
    name_map = gguf.get_tensor_name_map(by_name[arch], config.num_hidden_layers)
    data = np.memmap(gguf_file, dtype=np.uint8, mode="r")
    weights: dict[str, torch.Tensor] = {}
    dequantized: Counter[str] = Counter()
    for name in names:
        base, _, suffix = name.rpartition(".")
        gguf_base = name_map.get_name(base)
        entry = index["tensors"].get(f"{gguf_base}.{suffix}")
        if gguf_base is None or entry is None:
            raise ValueError(f"{gguf_file.name} has no tensor for {name}")
        shape = entry["shape"]
        raw = data[entry["offset"]: entry["offset"] + entry["bytes"]].reshape(
            shape[0] if len(shape) > 1 else 1, -1)
        if arch == "llama" and gguf_base.endswith((".attn_q", ".attn_k")):
            heads = (config.num_attention_heads if gguf_base.endswith(".attn_q")
                     else config.num_key_value_heads)
            raw = _unpermute_rows(raw, heads)
        if entry["type"] not in ("F32", "F16", "Q4_0", "Q4_1", "Q8_0"):
            dequantized[entry["type"]] += 1
        weights.update(decode_tensor(name, entry["type"], raw, shape))
    for kind, count in sorted(dequantized.items()):
        log.warning("%s: %d %s tensors dequantized to the model's dtype (no kernel takes "
                    "their blocks)", gguf_file.name, count, kind)
    return weights
