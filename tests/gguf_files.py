"""Writes a Hugging Face model directory as a GGUF file the way llama.cpp's converter does
(its tensor names and metadata keys; fp32 tensors, or quantized by ``gguf``'s reference code),
so transformers' GGUF reader reads it back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from safetensors.torch import load_file
from transformers import AutoConfig

# Metadata of the architectures written here: GGUF key suffix -> config attribute.
_METADATA = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
}


def _llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores Llama's q/k rows interleaved for its rotary kernel; transformers' GGUF
    reader undoes it."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 printable stand-ins of the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


# The GGML type of each tensor, by its GGUF name (``blk.0.attn_q.weight``).
TensorTypes = Callable[[str], gguf.GGMLQuantizationType]


def write_gguf(model_dir: Path, target: Path,
               types: TensorTypes = lambda name: gguf.GGMLQuantizationType.F32) -> Path:
    """``model_dir`` (llama or qwen2) as the GGUF file ``target``, each tensor of the type
    ``types`` names (F32 by default).

    Its tokenizer is a byte-level BPE of the 256 bytes, one merge and an end-of-text token:
    the tests feed token ids, and transformers parses a full vocabulary from GGUF for tens of
    seconds."""
    config = AutoConfig.from_pretrained(model_dir)
    arch = config.model_type
    writer = gguf.GGUFWriter(str(target), arch)
    writer.add_name(f"tiny-{arch}")
    for key, attr in _METADATA.items():
        writer.add_uint32(f"{arch}.{key}", int(getattr(config, attr)))
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", config.rope_parameters["rope_theta"])
    if arch == "llama":
        writer.add_uint32(f"{arch}.rope.dimension_count", config.head_dim)
    writer.add_uint32(f"{arch}.vocab_size", config.vocab_size)
    tokens = [*_byte_tokens(), "ĠĠ", "<|endoftext|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL])
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    names = gguf.get_tensor_name_map(
        {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], config.num_hidden_layers)
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        array = tensor.float().numpy()
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if ".attn_q." in gguf_name \
                else config.num_key_value_heads
            array = _llama_permute(array, heads)
        kind = types(gguf_name)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, array)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
