"""The Llama architecture in plain torch over a flattened token batch and a paged KV cache.

The families that are Llama with small additions share it: Mistral (a sliding window in every
layer), Qwen2 (q/k/v biases, sliding windows on some layers where configured) and Qwen3
(per-head RMSNorm of q and k before the rotation). Each addition is read from the weights or the
config, so one layer class serves them all.

Weights are read from a ``transformers`` state dict. The math follows ``transformers``'
``LlamaForCausalLM`` operation by operation (fp32 RMSNorm, rotary tables computed the same way)
so that greedy decoding matches it token for token; the q|k|v projections are fused into one
matmul, and the MLP's activation and product run inside its projections where the GEMM library
allows (``pagedserve.kernels.linear``).

Under tensor parallelism (a :class:`~pagedserve.model.parallel.ParallelGroup` of more than one
rank) the weights are sliced at load and the layers run unchanged on the smaller shards: this
rank's q, k and v heads, its share of the MLP width and of the vocabulary; the attention output
and down projections sum their partial products over the group.

With a ``quantization`` (``"int8"``, ``"int4"``) every projection and the output projection are
quantized into blocks as the model is built (after slicing, under tensor parallelism) and run on
the block kernels (:mod:`pagedserve.kernels.quant_linear`); the embeddings and norms keep the
model's dtype. With ``"gguf"`` the projections that a GGUF file holds quantized run on those kernels
with the file's own codes (:mod:`pagedserve.model.projections`). A decode step of a model whose
projections are all blocks runs its layers in one C call (:mod:`pagedserve.model.fused_decode`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from pagedserve.kernels import block_quant
from pagedserve.kernels.attention import AttentionMetadata, paged_attention
from pagedserve.kernels.block_quant import BlockWeight
from pagedserve.kernels.linear import linear, silu_gated
from pagedserve.kernels.norm import add_rms_norm
from pagedserve.kernels.quant_linear import Weight
from pagedserve.kernels.rotary import rotary_write_kv
from pagedserve.model.base import (
    KVCache,
    common_window,
    layer_windows,
    lm_head_name,
    run_layers,
)
from pagedserve.model.fused_decode import FusedDecode
from pagedserve.model.lora.slots import LoRABatch, LoRAGroup
from pagedserve.model.parallel import (
    ParallelGroup,
    all_gather_last_dim,
    check_tensor_parallel,
    row_parallel_linear,
    shard,
    vocab_parallel_embedding,
    vocab_shard,
)
from pagedserve.model.projections import block_projection, cast_weights, dense, projection

__all__ = ["KVCache", "LlamaLayer", "LlamaModel", "rotary_tables", "shard_weights"]

# The dimension along which each kind of weight is split: output rows for the column-parallel
# projections (whole heads, since rows are head-major), input columns for the row-parallel ones.
# Row-parallel biases, norms and Qwen3's per-head norms are replicated.
_SHARD_DIM = {"q_proj.weight": 0, "q_proj.bias": 0, "k_proj.weight": 0, "k_proj.bias": 0,
              "v_proj.weight": 0, "v_proj.bias": 0, "o_proj.weight": 1,
              "gate_proj.weight": 0, "gate_proj.bias": 0, "up_proj.weight": 0,
              "up_proj.bias": 0, "down_proj.weight": 1}
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def shard_weights(weights: dict[str, torch.Tensor], pg: ParallelGroup
                  ) -> dict[str, torch.Tensor]:
    """This rank's slices of a Llama-family state dict (copies: the full tensors can go)."""
    def local(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in _VOCAB:
            return vocab_shard(t, pg)
        dim = _SHARD_DIM.get(".".join(name.split(".")[-2:]))
        return t if dim is None else shard(t, dim, pg)

    return {name: local(name, t) for name, t in weights.items()}


def rotary_tables(config: PretrainedConfig, head_dim: int, max_positions: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[max_positions, head_dim]``, indexed by position."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _lora_groups(config: PretrainedConfig, head_dim: int) -> dict[str, LoRAGroup]:
    """The projections as adapters see them (PEFT's module names), as the layers fuse them."""
    hidden, inner = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"qkv": LoRAGroup(("q_proj", "k_proj", "v_proj"), hidden, (q, kv, kv)),
            "o": LoRAGroup(("o_proj",), q, (hidden,)),
            "gate_up": LoRAGroup(("gate_proj", "up_proj"), hidden, (inner, inner)),
            "down": LoRAGroup(("down_proj",), inner, (hidden,))}


class LlamaLayer:
    """One decoder layer: attention and SwiGLU MLP, each behind an RMSNorm with a residual."""

    def __init__(self, weights: dict[str, torch.Tensor], prefix: str, config: PretrainedConfig,
                 head_dim: int, sliding_window: int | None = None,
                 parallel: ParallelGroup | None = None, quantization: str | None = None,
                 index: int = 0) -> None:
        def w(name: str) -> torch.Tensor:
            return weights[f"{prefix}.{name}"]

        def proj(*names: str) -> Weight:
            return projection(weights, [f"{prefix}.{n}.weight" for n in names], quantization,
                              dtype)

        def maybe(name: str) -> torch.Tensor | None:
            return weights.get(f"{prefix}.{name}")

        dtype = w("input_layernorm.weight").dtype  # the model's: norms are plain tensors
        self.index = index  # its place in the model: which of an adapter's weights are its
        ranks = 1 if parallel is None else parallel.world_size
        self.parallel = parallel
        self.num_heads = config.num_attention_heads // ranks
        self.num_kv_heads = config.num_key_value_heads // ranks
        self.head_dim = head_dim
        self.eps = config.rms_norm_eps
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.q_norm = maybe("self_attn.q_norm.weight")  # Qwen3
        self.k_norm = maybe("self_attn.k_norm.weight")
        self.input_norm = w("input_layernorm.weight")
        self.post_attention_norm = w("post_attention_layernorm.weight")
        self.qkv = proj("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        biases = [maybe(f"self_attn.{p}_proj.bias") for p in "qkv"]
        self.qkv_bias = (torch.cat(biases)  # type: ignore[arg-type]
                         if all(b is not None for b in biases) else None)
        self.o_proj = proj("self_attn.o_proj")
        self.o_bias = maybe("self_attn.o_proj.bias")
        # Block-quantized gate and up rows run as one product, gate's first (as the fused
        # decode layers of pagedserve.model.fused_decode run them).
        gate_up = block_projection(
            weights, [f"{prefix}.mlp.{p}_proj.weight" for p in ("gate", "up")], quantization,
            dtype)
        self.mlp_in: BlockWeight | tuple[Weight, Weight] = (
            gate_up if gate_up is not None else (proj("mlp.gate_proj"), proj("mlp.up_proj")))
        self.gate_bias = maybe("mlp.gate_proj.bias")
        self.up_bias = maybe("mlp.up_proj.bias")
        self.down = proj("mlp.down_proj")
        self.down_bias = maybe("mlp.down_proj.bias")

    def __call__(self, h: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor,
                 sin: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                 lora: LoRABatch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the previous layer's output ``delta`` to the residual stream ``h`` (in place,
        fused with the norm that reads it) and runs the layer: returns ``h`` and this layer's
        output, which the next layer (or the final norm) adds. ``lora`` adds each token's
        adapter deltas to every projection."""
        tokens = h.shape[0]
        x = add_rms_norm(h, delta, self.input_norm, self.eps, meta.backend)
        qkv = linear(x, self.qkv, self.qkv_bias)
        if lora is not None:
            lora.add(self.index, "qkv", qkv, x)
        q, k, v = rotary_write_kv(qkv, cos, sin, cache[0], cache[1], meta.slot_mapping,
                                  self.num_heads, self.num_kv_heads, meta.backend,
                                  q_norm=self.q_norm, k_norm=self.k_norm, norm_eps=self.eps)
        attn = paged_attention(q, k, v, cache[0], cache[1], meta, self.scale,
                               sliding_window=self.sliding_window)
        attn = attn.reshape(tokens, self.num_heads * self.head_dim)
        out = row_parallel_linear(attn, self.o_proj, self.o_bias, self.parallel)
        if lora is not None:
            lora.add(self.index, "o", out, attn)
        x = add_rms_norm(h, out, self.post_attention_norm, self.eps, meta.backend)
        if lora is not None:
            act = self._gated_with_lora(x, lora)
        elif isinstance(self.mlp_in, BlockWeight):
            act = block_quant.silu_gated(x, self.mlp_in, self.gate_bias, self.up_bias)
        else:
            act = silu_gated(x, *self.mlp_in, self.gate_bias, self.up_bias)
        down = row_parallel_linear(act, self.down, self.down_bias, self.parallel)
        if lora is not None:
            lora.add(self.index, "down", down, act)
        return h, down

    def _gated_with_lora(self, x: torch.Tensor, lora: LoRABatch) -> torch.Tensor:
        """The MLP's gate and up projections with the adapters' deltas added before the
        activation (which the fused paths apply inside the projections)."""
        if isinstance(self.mlp_in, BlockWeight):
            gate_up = linear(x, self.mlp_in)
            width = gate_up.shape[-1] // 2
            if self.gate_bias is not None:
                gate_up[:, :width] += self.gate_bias
            if self.up_bias is not None:
                gate_up[:, width:] += self.up_bias
        else:
            gate, up = self.mlp_in
            gate_up = torch.cat([linear(x, gate, self.gate_bias), linear(x, up, self.up_bias)],
                                dim=-1)
        lora.add(self.index, "gate_up", gate_up, x)
        width = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :width]) * gate_up[:, width:]


class LlamaModel:
    """A causal LM over flattened tokens: ``forward`` gives hidden states, ``logits`` the scores.

    With a ``parallel`` group of more than one rank it holds this rank's shards only, and
    ``num_kv_heads`` is this rank's share (its part of the paged KV cache); ``logits`` still
    gives every rank the whole vocabulary. With a ``quantization`` the projections hold their
    quantized weights only.
    """

    def __init__(self, config: PretrainedConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: str = "cpu",
                 parallel: ParallelGroup | None = None, quantization: str | None = None
                 ) -> None:
        self.parallel = parallel if parallel is not None and parallel.world_size > 1 else None
        if self.parallel is not None:
            check_tensor_parallel(config, self.parallel.world_size)
        embed = "model.embed_tokens.weight"
        lm_head = lm_head_name(config, weights, embed)
        self.vocab_size = int(weights[lm_head].shape[0])
        if self.parallel is not None:
            weights = shard_weights(weights, self.parallel)
        weights = cast_weights(weights, device, dtype)
        self.config = config
        self.num_layers = config.num_hidden_layers
        ranks = 1 if self.parallel is None else self.parallel.world_size
        self.num_kv_heads = config.num_key_value_heads // ranks
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        self.dtype = dtype
        self.device = device
        self.embed = dense(weights, embed, dtype)  # looked up, not multiplied
        windows = layer_windows(config)
        self.sliding_window = common_window(windows)
        self.layers = [LlamaLayer(weights, f"model.layers.{i}", config, self.head_dim, windows[i],
                                  self.parallel, quantization, i)
                       for i in range(self.num_layers)]
        self.lora_groups = _lora_groups(config, self.head_dim)
        self.norm = weights["model.norm.weight"]
        self.eps = config.rms_norm_eps
        self.lm_head = projection(weights, [lm_head], quantization, dtype)
        self.fused_decode = (FusedDecode.of(self.layers, config.hidden_size)
                             if device == "cpu" and dtype == torch.float32 else None)
        self.max_positions = config.max_position_embeddings
        cos, sin = rotary_tables(config, self.head_dim, self.max_positions, dtype)
        self.cos, self.sin = cos.to(device), sin.to(device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[KVCache],
                meta: AttentionMetadata, hidden_states: list[torch.Tensor] | None = None,
                lora: LoRABatch | None = None) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` after the final norm; with a
        ``hidden_states`` list, the embeddings and each layer's output are appended to it;
        with ``lora``, each token's adapter adds its deltas."""
        # A copy either way: the layers add into it in place.
        h = (self.embed[input_ids] if self.parallel is None
             else vocab_parallel_embedding(input_ids, self.embed, self.parallel))
        cos, sin = self.cos[positions], self.sin[positions]
        delta: torch.Tensor | None
        if hidden_states is None and lora is None and self.fused_decode is not None and \
                self.fused_decode.applies(h, meta):
            h, delta = self.fused_decode(h, cos, sin, caches, meta)
        else:
            h, delta = run_layers(self.layers, h, cos, sin, caches, meta, hidden_states, lora)
        return add_rms_norm(h, delta, self.norm, self.eps, meta.backend)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary scores in fp32 for the given hidden states (the whole vocabulary, on every
        rank)."""
        if self.parallel is None:
            return linear(hidden, self.lm_head).float()
        scores = all_gather_last_dim(linear(hidden, self.lm_head), self.parallel)
        return scores[..., : self.vocab_size].float().contiguous()
