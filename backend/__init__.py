"""An LLM serving backend: paged KV cache, continuous batching, Triton-compatible gRPC."""

from backend.config import EngineConfig
from backend.llm import LLM
from backend.outputs import CompletionOutput, RequestOutput
from backend.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "RequestOutput", "SamplingParams"]
