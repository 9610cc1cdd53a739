"""A Hugging Face model directory's ``config.json`` and safetensors headers, held against each
other before the model is built.

The model is built from the config: a ``num_hidden_layers`` or a ``max_position_embeddings``
that lies allocates by the lie. So the config's sizes must be positive integers that the
weights bear out: as many layers as the files have layers, the embedding's shape
``[vocab_size, hidden_size]``, the first layer's projections as wide as the config says; the
context under :data:`MAX_POSITIONS`. An index's weight map may name only files in the
directory itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pagedserve.model.file_checks import MAX_POSITIONS, ModelFileError
from pagedserve.model.file_checks.json_object import parse_object
from pagedserve.model.file_checks.safetensors_header import FLOAT_DTYPES, tensor_shapes

MAX_CONFIG_BYTES = 4 << 20
INDEX_FILE = "model.safetensors.index.json"
# The config's sizes, under each name the supported families' configs use for them.
_LAYERS = ("num_hidden_layers", "n_layer")
_SIZES = (*_LAYERS, "hidden_size", "intermediate_size", "num_attention_heads", "n_head",
          "num_key_value_heads", "num_kv_heads", "n_head_kv", "head_dim", "vocab_size",
          "max_position_embeddings")
_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_EMBEDDINGS = ("embed_tokens.weight", "word_embeddings.weight")


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` as a JSON object, bounded in size, each size in it a positive integer."""
    path = model_dir / "config.json"
    with open(path, "rb") as f:
        text = f.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
        raise ModelFileError(f"config.json is over {MAX_CONFIG_BYTES} bytes")
    config = parse_object(text, "config.json")
    for key in _SIZES:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise ModelFileError(f"config.json: {key} is {str(value)[:40]}, not a positive "
                                 f"integer")
    positions = config.get("max_position_embeddings")
    if positions is not None and positions > MAX_POSITIONS:
        raise ModelFileError(f"config.json: max_position_embeddings {positions} is over "
                             f"{MAX_POSITIONS}")
    return config


def weight_files(model_dir: Path) -> list[str]:
    """The safetensors files of ``model_dir``: its index's, else every one there."""
    index = model_dir / INDEX_FILE
    if not index.is_file():
        return [p.name for p in sorted(model_dir.glob("*.safetensors"))]
    with open(index, "rb") as f:
        text = f.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{INDEX_FILE} is over {MAX_CONFIG_BYTES} bytes")
    weight_map = parse_object(text, INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise ModelFileError(f"{INDEX_FILE} has no weight_map of tensor names to files")
    files = sorted(set(weight_map.values()))
    for name in files:
        if Path(name).name != name or not (model_dir / name).is_file():
            raise ModelFileError(f"{INDEX_FILE} names {name[:80]!r}, not a file of the "
                                 f"directory")
    return files


def check_weights(model_dir: Path, config: dict[str, Any]) -> list[str]:
    """The directory's weight files, once their headers agree with ``config``
    (:func:`read_config`'s)."""
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir.name}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        for tensor, (dtype, shape) in tensor_shapes(model_dir / name).items():
            if dtype not in FLOAT_DTYPES:
                # The supported families' weights are floating point (pagedserve quantizes
                # them itself); an integer dtype of the same width would pass for one.
                raise ModelFileError(f"{name}: tensor {tensor[:80]!r} has dtype {dtype}, not "
                                     f"a floating-point one")
            shapes[tensor] = shape
    layers = {int(m[1]) for tensor in shapes if (m := _LAYER.search(tensor))}
    stated = next((config[k] for k in _LAYERS if k in config), None)
    if stated is not None and (stated != len(layers) or layers != set(range(stated))):
        raise ModelFileError(f"config.json gives {stated} layers, but the weights have "
                             f"tensors for {len(layers)}")
    embedding = next((shape for tensor, shape in shapes.items()
                      if tensor.endswith(_EMBEDDINGS)), None)
    expected = (config.get("vocab_size"), config.get("hidden_size"))
    if embedding is not None and None not in expected and embedding != expected:
        raise ModelFileError(f"config.json gives vocab_size {expected[0]} and hidden_size "
                             f"{expected[1]}, but the token embedding's shape is "
                             f"{list(embedding)}")
    _check_projections(config, shapes)
    return files


def _check_projections(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Layer 0's projections against the config's widths, where the family names them as
    Llama does (the others' fused projections are checked when their model is built)."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if hidden is None or heads is None:
        return
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    expected = {"self_attn.q_proj.weight": (heads * head_dim, hidden),
                "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                "self_attn.v_proj.weight": (kv_heads * head_dim, hidden)}
    if (intermediate := config.get("intermediate_size")) is not None:
        expected["mlp.up_proj.weight"] = (intermediate, hidden)
    for tensor, shape in shapes.items():
        match = _LAYER.search(tensor)
        if match is None or match[1] != "0":
            continue
        want = expected.get(tensor[match.end():])
        if want is not None and shape != want:
            raise ModelFileError(f"{tensor} has shape {list(shape)}, where config.json's sizes "
                                 f"give {list(want)}")
