"""Dense projections ``x @ weight.T + bias``: the one call the model makes for every matmul.

On CPU in fp32 the projections go to oneDNN's inner-product primitive (through the op that
``torch.compile`` itself emits for CPU linears) instead of ``F.linear``'s MKL GEMM. On this
project's CPUs it runs the model's shapes 10-35% faster, most of all the small-batch shapes of
decode steps and the vocabulary projection (measured in ``docs/benchmarks.md``). The results
differ from MKL's only in summation order (fp32 rounding). Everything else uses ``F.linear``,
except quantized weights, which go to the block kernels (:mod:`pagedserve.kernels.quant_linear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.kernels.quant_linear import Weight, quant_linear

_ONEDNN = torch.backends.mkldnn.is_available()


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32)


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` ``[..., in]`` and ``weight`` ``[out, in]`` (plain or
    quantized)."""
    if not isinstance(weight, torch.Tensor):
        return quant_linear(x, weight, bias)
    if _onednn_applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def silu_gated(x: torch.Tensor, gate: Weight, up: Weight,
               gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """``silu(x @ gate.T + gate_bias) * (x @ up.T + up_bias)``, the SwiGLU MLP's input half.

    With oneDNN the activation and the product run as post-ops of the two projections, so the
    ``[tokens, intermediate]`` activations are written once instead of four times.
    """
    if isinstance(gate, torch.Tensor) and isinstance(up, torch.Tensor):
        if _onednn_applies(x, gate):
            g = torch.ops.mkldnn._linear_pointwise(x, gate, gate_bias, "swish", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(x, g, up, up_bias, "mul")
        return F.silu(F.linear(x, gate, gate_bias)) * F.linear(x, up, up_bias)
    return F.silu(linear(x, gate, gate_bias)) * linear(x, up, up_bias)
