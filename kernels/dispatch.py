"""Which implementation runs the kernels: the choice and the lazy import of the Triton ones.

``"auto"`` picks by device: Triton kernels on CUDA tensors; on CPUs the C kernels where they
are built and take the dtype, torch ops otherwise (the default path, unchanged). ``"torch"``
forces the torch references, ``"cpu"`` the C kernels (an error where they are not built) and
``"triton"`` the Triton kernels, which on a CPU run in Triton's interpreter, so that their whole
path through the engine can be checked on a machine without a GPU.

``triton`` is only needed for the Triton path: its modules are imported on first use. The
interpreter is chosen when a kernel is decorated, triton's own library functions included, so
``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported; :func:`triton_module`
sets it when it is first to import triton, and refuses clearly when triton was already imported
for GPUs (``transformers`` imports it through ``torch._dynamo``: processes that run the Triton
kernels on a CPU set the variable when they start).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Any

import torch

from pagedserve.kernels import cpu

BACKENDS = ("auto", "torch", "cpu", "triton")
ENV_VAR = "PAGEDSERVE_ATTENTION_BACKEND"
_TRITON_MODULES = ("triton_attention", "triton_cache", "triton_lora", "triton_norm")


def resolve(name: str, device: torch.device) -> str:
    """The concrete path (``"torch"``, ``"cpu"`` or ``"triton"``) for tensors on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpu" if device.type == "cpu" and cpu.available() else "torch"
    if name == "cpu" and (device.type != "cpu" or not cpu.available()):
        raise RuntimeError("attention backend 'cpu' needs the C kernels and CPU tensors: "
                           f"tensors are on {device}, kernels built: {cpu.available()}")
    return name


def triton_module(name: str, device: torch.device) -> ModuleType:
    """``pagedserve.kernels.<name>`` (one of the Triton modules) ready for tensors on ``device``.

    On a CPU the kernels must run interpreted: ``TRITON_INTERPRET`` is set to 1 unless the
    environment says otherwise, and a module already compiled for GPUs is refused.
    """
    if name not in _TRITON_MODULES:
        raise ValueError(f"no Triton kernel module {name!r}")
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    module = importlib.import_module(f"pagedserve.kernels.{name}")
    if device.type != "cuda" and not interpreted(module):
        raise RuntimeError(
            f"Triton kernels on {device} run in Triton's interpreter, which needs "
            "TRITON_INTERPRET=1 in the environment before triton is first imported; triton was "
            f"imported with TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}. Start the "
            "process with TRITON_INTERPRET=1 (or run the Triton kernels on CUDA tensors)")
    return module


def interpreted(module: ModuleType) -> bool:
    """Whether ``module``'s Triton kernels, and triton's library functions they call, were
    decorated for the interpreter."""
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    functions = [v for k, v in vars(module).items() if k.endswith("_kernel")]
    functions.append(triton.language.standard.cdiv)
    return all(isinstance(f, InterpretedFunction) for f in functions)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """The context a Triton launch on ``t`` runs in: Triton launches on the thread's current
    CUDA device, not the tensors', so a tensor on ``cuda:1`` needs that device made current."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def to_device(values: list[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device`` without waiting for the device's queued work
    (a blocking copy would synchronise with the stream)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if device.type == "cuda":  # from pageable memory the "non-blocking" copy may still wait
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
