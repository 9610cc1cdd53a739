"""Shared fixtures: the embedded model, its transformers reference, tiny random Llama models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which is chosen when triton is
# first imported: before transformers, which imports it (through torch._dynamo).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pagedserve import LLM
from pagedserve.model.dtypes import AUTO_ENV
from pagedserve.model.loader import LoadedModel, load_model
from tests.prompts import TINY_VOCAB
from tests.server.conftest import DEFAULT_REPOSITORY, ServerHandle, start_server

# The tests compare with transformers in fp32: "auto" must not pick bf16 on CPUs that have it
# (servers the tests start inherit this).
os.environ.setdefault(AUTO_ENV, "float32")


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, read once per session."""
    return load_model()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerHandle]:
    """``python -m pagedserve serve`` of the default repository (the embedded model as
    ``smollm2``), one per test session: the modules that only send it requests share it."""
    handle = start_server(DEFAULT_REPOSITORY)
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def hf_smollm(smollm: LoadedModel) -> torch.nn.Module:
    """transformers' own implementation of the same weights: the reference."""
    model = AutoModelForCausalLM.from_pretrained(smollm.path, dtype=torch.float32)
    return model.eval()


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` for one prompt: the generated ids (EOS included)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(
            1, len(prompt_ids), dtype=torch.long), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def assert_all_blocks_free(llm: LLM) -> None:
    """Every finished or aborted request has returned its KV blocks."""
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert all(c == 0 for c in bm.ref_counts)


TinyFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory,
               smollm: LoadedModel) -> Iterator[TinyFactory]:
    """Builds (once per shape) a random-weight Llama saved as a Hugging Face directory, with
    SmolLM2's tokenizer; its vocabulary is the tokenizer's first ``vocab_size`` ids."""
    made: dict[tuple, Path] = {}

    def make(num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 64,
             num_layers: int = 2, intermediate: int = 384, seed: int = 0,
             vocab_size: int = TINY_VOCAB) -> Path:
        key = (num_heads, num_kv_heads, head_dim, num_layers, intermediate, seed, vocab_size)
        if key not in made:
            torch.manual_seed(seed)
            config = LlamaConfig(
                vocab_size=vocab_size, hidden_size=num_heads * head_dim,
                intermediate_size=intermediate, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                head_dim=head_dim, max_position_embeddings=2048,
                # Wider weights than the default 0.02 give peaked logits, so greedy picks are
                # decided by the model, not by rounding.
                initializer_range=0.15, bos_token_id=smollm.tokenizer.bos_token_id,
                eos_token_id=smollm.tokenizer.eos_token_id,
                pad_token_id=smollm.tokenizer.eos_token_id)
            path = tmp_path_factory.mktemp("tiny-llama")
            LlamaForCausalLM(config).save_pretrained(path)
            smollm.tokenizer.save_pretrained(path)
            made[key] = path
        return made[key]

    yield make
