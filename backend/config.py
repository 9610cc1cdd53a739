"""Engine settings: one dataclass, validated once, passed down to every stage."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from pagedserve.kernels.dispatch import BACKENDS, ENV_VAR
from pagedserve.kernels.quant_linear import QUANTIZATIONS
from pagedserve.model.dtypes import DTYPES, auto_dtype
from pagedserve.model.projections import GGUF

# Upper bounds far beyond any real deployment: past them a size is a typo or an attack (a
# load override), and tables and budgets would be sized from it.
MAX_BLOCK_SIZE = 1024
MAX_NUM_SEQS = 2**16
MAX_NUM_TOKENS = 2**24  # max_num_batched_tokens, max_model_len
MAX_TENSOR_PARALLEL = 1024  # ranks (processes), nnodes
MAX_SPECULATIVE_TOKENS = 128  # num_speculative_tokens, prompt_lookup_max
MAX_LORA_SETTING = 1024  # max_loras, max_lora_rank, max_cpu_loras
_SIZES = {"block_size": MAX_BLOCK_SIZE, "max_num_batched_tokens": MAX_NUM_TOKENS,
          "max_num_seqs": MAX_NUM_SEQS, "max_model_len": MAX_NUM_TOKENS, "kv_cache_bytes": None,
          "tensor_parallel_size": MAX_TENSOR_PARALLEL, "nnodes": MAX_TENSOR_PARALLEL}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding by prompt lookup, vLLM's ``ngram`` method (no draft model).

    A greedy request's next ``num_speculative_tokens`` tokens are guessed from its own context:
    the tokens that followed the most recent earlier occurrence of its last n tokens, n from
    ``prompt_lookup_max`` down to ``prompt_lookup_min``; one step checks them all. Field names
    and defaults are vLLM's: with neither bound given both are 5, with one the other takes its
    value.
    """

    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative_config.method must be 'ngram', got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if value is None and name != "num_speculative_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"speculative_config.{name} must be an integer, got {value!r}")
            if not 1 <= value <= MAX_SPECULATIVE_TOKENS:
                raise ValueError(f"speculative_config.{name} must be in [1, "
                                 f"{MAX_SPECULATIVE_TOKENS}], got {value}")
        lookup_max, lookup_min = self.prompt_lookup_max, self.prompt_lookup_min
        if lookup_max is None and lookup_min is None:
            lookup_max = lookup_min = 5
        object.__setattr__(self, "prompt_lookup_max",
                           lookup_min if lookup_max is None else lookup_max)
        object.__setattr__(self, "prompt_lookup_min",
                           lookup_max if lookup_min is None else lookup_min)
        if self.min_n > self.max_n:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.min_n}) must be at "
                             f"most prompt_lookup_max ({self.max_n})")

    @property
    def max_n(self) -> int:
        assert self.prompt_lookup_max is not None  # set by __post_init__
        return self.prompt_lookup_max

    @property
    def min_n(self) -> int:
        assert self.prompt_lookup_min is not None
        return self.prompt_lookup_min

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SpeculativeConfig:
        """The settings as vLLM's ``speculative_config`` dict spells them; unknown keys (vLLM's
        draft-model settings among them) are refused, naming the key."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ValueError(f"speculative_config.{key} is not supported (known: "
                                 f"{', '.join(sorted(known))})")
        for key in ("method", "num_speculative_tokens"):
            if key not in values:
                raise ValueError(f"speculative_config.{key} is required")
        return cls(**values)


@dataclass
class EngineConfig:
    """Knobs of the scheduler, the KV cache and the model runner.

    The KV cache is sized by ``kv_cache_bytes`` when given; else on a CPU by
    ``kv_cache_memory_fraction`` of the memory free after the weights are loaded, and on a GPU
    by ``gpu_memory_utilization`` (vLLM's setting): the fraction of the device's total memory
    that weights, activations and cache together may take. With
    ``enable_prefix_caching`` full blocks of finished and running requests are reused by later
    requests with the same prefix.
    """

    model: str | None = None
    # "auto": the faster dtype on this device, by measurement (pagedserve.model.dtypes).
    dtype: str = "auto"
    # The KV cache's dtype (vLLM's setting): "auto" is the model's dtype; a model computing in
    # float32 may keep its keys and values in "float16" or "bfloat16" instead: half the memory
    # a token takes and half the bytes decode attention reads. Keys and values are rounded to
    # it when written, and every attention reads them as stored.
    kv_cache_dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.3
    gpu_memory_utilization: float = 0.9
    # Which kernels run (pagedserve.kernels.dispatch): "auto" (Triton on CUDA; C kernels, else
    # torch, on CPUs), "torch", "cpu" or "triton" (interpreted on CPUs: slow, for checking that
    # path).
    attention_backend: str = field(default_factory=lambda: os.environ.get(ENV_VAR, "auto"))
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    seed: int = 0
    # Largest ``SamplingParams.logprobs`` a request may ask for (vLLM's name and default): each
    # position's top-N is sorted, sent and rendered, so it is bounded like any amplifier.
    max_logprobs: int = 20
    # Requests waiting beyond a full batch (``max_num_seqs``); more are refused at once
    # (RESOURCE_EXHAUSTED through the server) instead of queueing without bound.
    max_queue_size: int = 1024
    # Ranks the model is split over, one worker process each (1: in this process). With
    # ``nnodes`` > 1 this node runs the first tensor_parallel_size / nnodes of them and the
    # others join from ``python -m pagedserve worker`` on the other nodes (docs/tensor-parallel.md).
    tensor_parallel_size: int = 1
    nnodes: int = 1
    # Weight-only quantization of every projection and the output projection (vLLM's name):
    # None (the model's dtype), "int8" (Q8_0 blocks), "int4" (Q4_1 blocks), one scale per 32
    # inputs, or "gguf" (a .gguf model's own Q4_0/Q4_1/Q8_0 tensors), on CPUs
    # (pagedserve.kernels.quant_linear).
    quantization: str | None = None
    # Speculative decoding of greedy requests; also accepted as vLLM's dict, e.g.
    # ``{"method": "ngram", "num_speculative_tokens": 4}``. None: one token per step.
    speculative_config: SpeculativeConfig | None = None
    # LoRA adapters (vLLM's settings): requests naming an adapter share the batch with the base
    # model's. At most ``max_loras`` distinct adapters run in one step (each in its own slot of
    # the model's adapter weights), of rank at most ``max_lora_rank``; ``max_cpu_loras`` are
    # kept loaded (least recently used out; default ``max_loras``).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        self._check_size_types_and_bounds()
        self._check_speculative_config()
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, "
                             f"got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        for name in ("kv_cache_memory_fraction", "gpu_memory_utilization"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be positive, "
                             f"got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be non-negative, got {self.max_logprobs}")
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be non-negative, got {self.max_queue_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        for name in ("tensor_parallel_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be a "
                             f"multiple of nnodes={self.nnodes} (the same ranks on every node)")
        self._check_quantization()
        self._check_device()
        self._check_kv_cache_dtype()
        self._check_lora()

    def _check_kv_cache_dtype(self) -> None:
        """``auto``, the model's dtype, or a 16-bit one under a float32 model: the pairs the
        attention kernels take (fp8, which vLLM also offers, has no kernels here)."""
        value = self.kv_cache_dtype
        if value == "auto":
            return
        if value not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(DTYPES)}, "
                             f"got {value!r}")
        model = self.resolved_dtype
        if value != model and model != "float32":
            raise ValueError(f"kv_cache_dtype={value!r} needs a float32 model (dtype), got "
                             f"{model!r}: a {model} model keeps its cache in {model}")

    def _check_lora(self) -> None:
        if not isinstance(self.enable_lora, bool):
            raise ValueError(f"enable_lora must be a bool, got {self.enable_lora!r}")
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if value is None and name == "max_cpu_loras":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or \
                    not 1 <= value <= MAX_LORA_SETTING:
                raise ValueError(f"{name} must be an integer in [1, {MAX_LORA_SETTING}], "
                                 f"got {value!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least "
                             f"max_loras ({self.max_loras})")
        if self.enable_lora and self.tensor_parallel_size > 1:
            raise ValueError("enable_lora runs on one rank: tensor_parallel_size must be 1")

    @property
    def lora_cache_size(self) -> int:
        """Adapters kept loaded: ``max_cpu_loras``, or ``max_loras`` when not set."""
        return self.max_cpu_loras or self.max_loras

    def _check_speculative_config(self) -> None:
        spec: object = self.speculative_config
        if isinstance(spec, Mapping):
            self.speculative_config = SpeculativeConfig.from_dict(spec)
        elif spec is not None and not isinstance(spec, SpeculativeConfig):
            raise ValueError(f"speculative_config must be a dict or SpeculativeConfig, "
                             f"got {spec!r}")

    def _check_quantization(self) -> None:
        """One of ``QUANTIZATIONS`` or ``"gguf"``, on the CPU: checked before the device, so
        that a CUDA device is refused for quantization whether or not this machine has one."""
        if self.quantization is None:
            return
        if self.quantization not in (*QUANTIZATIONS, GGUF):
            raise ValueError(f"quantization must be None or one of "
                             f"{', '.join(repr(q) for q in (*QUANTIZATIONS, GGUF))}, "
                             f"got {self.quantization!r}")
        if self.quantization == GGUF and self.tensor_parallel_size > 1:
            # The ranks slice plain tensors; slicing the file's blocks is not done.
            raise ValueError(f"quantization='gguf' runs on one rank: tensor_parallel_size must "
                             f"be 1, got {self.tensor_parallel_size}")
        if self.device != "cpu":  # the block kernels are C for CPUs
            raise ValueError(f"quantization={self.quantization!r} runs on the CPU only, "
                             f"got device {self.device!r}")

    def _check_device(self) -> None:
        """``cpu``, ``cuda`` or ``cuda:N``, and a CUDA device only where one exists: refused
        here, before any weights load, rather than by the first tensor sent there."""
        kind, _, index = self.device.partition(":") if isinstance(self.device, str) else ("",) * 3
        if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (
                index and not index.isdigit()):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if kind == "cuda":
            count = torch.cuda.device_count()
            if int(index or 0) >= count:
                raise ValueError(f"device {self.device!r} is not available: this machine has "
                                 f"{count} CUDA device(s)")
            local = self.tensor_parallel_size // self.nnodes
            if local > 1 and index:  # rank r runs on cuda:r: a chosen index would be ignored
                raise ValueError(f"device {self.device!r}: with tensor_parallel_size="
                                 f"{self.tensor_parallel_size} the ranks take cuda:0 to "
                                 f"cuda:{local - 1}; name the device 'cuda'")
            if local > count:
                raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} over "
                                 f"nnodes={self.nnodes} needs {local} CUDA devices on this "
                                 f"machine, it has {count}")

    def _check_size_types_and_bounds(self) -> None:
        """Sizes are integers (not bools, not floats) under their upper bounds; the lower bounds
        are checked with the other settings. ``kv_cache_bytes`` is bounded by the device's
        memory where the cache is sized (``pagedserve.model.runner.num_kv_blocks``)."""
        for name, bound in _SIZES.items():
            value = getattr(self, name)
            if value is None and name in ("kv_cache_bytes", "max_model_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if bound is not None and value > bound:
                raise ValueError(f"{name} must be at most {bound}, got {value}")
        for name in ("kv_cache_memory_fraction", "gpu_memory_utilization"):
            fraction = getattr(self, name)
            if isinstance(fraction, bool) or not isinstance(fraction, int | float):
                raise ValueError(f"{name} must be a number, got {fraction!r}")

    @property
    def kv_cache_bytes_per_device(self) -> int | None:
        """What one device must hold of ``kv_cache_bytes``, the engine's total over its ranks:
        a rank's share on a GPU; on a CPU the share of this machine's ranks, which share its
        memory."""
        if self.kv_cache_bytes is None:
            return None
        per = self.tensor_parallel_size if self.device.startswith("cuda") else self.nnodes
        return self.kv_cache_bytes // per

    @property
    def resolved_dtype(self) -> str:
        """``dtype``, with ``auto`` replaced by the choice for this device: fp32 for the block
        quantizations, whose kernels and fused decode layers take fp32 activations (bf16 ones
        would leave the fused layers and convert at every product)."""
        if self.dtype != "auto":
            return self.dtype
        if self.quantization is not None:  # CPU only (_check_quantization)
            return "float32"
        return auto_dtype(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.resolved_dtype]

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        """The KV cache's dtype: ``kv_cache_dtype``, or the model's under ``auto``."""
        return DTYPES[self.resolved_dtype if self.kv_cache_dtype == "auto"
                      else self.kv_cache_dtype]
