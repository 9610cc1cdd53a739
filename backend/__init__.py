"""An LLM serving backend: paged KV cache, continuous batching, Triton-compatible gRPC."""

from pagedserve.config import EngineConfig
from pagedserve.llm import LLM
from pagedserve.lora_request import LoRARequest
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured_outputs import StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "LoRARequest", "RequestOutput",
           "SamplingParams", "StructuredOutputsParams"]
