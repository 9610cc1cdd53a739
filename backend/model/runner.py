"""Turns a scheduled batch into tensors, runs the model and returns the wanted rows' logits."""

from __future__ import annotations

import os

import torch

from pagedserve.config import EngineConfig
from pagedserve.kernels.attention import NULL_BLOCK, AttentionMetadata
from pagedserve.kernels.dispatch import to_device
from pagedserve.model.base import CausalLM, KVCache
from pagedserve.model.batch import ModelInput, ModelOutput, PromptLogprobs
from pagedserve.model.lora.residency import AdapterResidency

# Prompt rows whose scores are made at once for prompt logprobs (a vocabulary's worth each).
PROMPT_LOGITS_ROWS = 256


def kv_block_bytes(model: CausalLM, block_size: int,
                   cache_dtype: torch.dtype | None = None) -> int:
    """Bytes one block takes across all layers, keys and values, in ``cache_dtype`` (the
    model's dtype when None)."""
    per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim
    return per_token * block_size * (cache_dtype or model.dtype).itemsize


def available_memory_bytes(device: str) -> int:
    """Memory free for the KV cache on ``device`` right now."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_limit_bytes(device: str) -> int:
    """The most a KV cache may take on ``device``: free memory on a GPU; on a CPU the kernel's
    ``MemAvailable`` (free plus reclaimable page cache: what can be had without swapping)."""
    if device.startswith("cuda"):
        return available_memory_bytes(device)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return available_memory_bytes(device)  # no /proc (macOS): free pages only


def check_kv_cache_bytes(requested: int, device: str, setting: str = "kv_cache_bytes") -> None:
    """Refuses a KV cache larger than ``device`` can hold, before anything is allocated.

    ``torch.empty`` reserves pages lazily, so an oversized cache would not fail here but later,
    mid-request, as an out-of-memory kill of the whole process. ``setting`` names the knob
    in the message (callers may know it by another name, e.g. vLLM's).
    """
    available = kv_cache_limit_bytes(device)
    if requested > available:
        raise ValueError(f"{setting}={requested} ({requested / 2**30:.1f} GiB) exceeds the "
                         f"memory available for the KV cache on {device}: {available} bytes "
                         f"({available / 2**30:.1f} GiB)")


def activation_bytes(model: CausalLM, config: EngineConfig) -> int:
    """A bound on what one step's activations take beside weights and cache: the widest
    per-token tensors of a layer for a full token budget, and the fp32 logits of a full batch
    (each sequence's row, and its drafts' with speculative decoding) with the sampler's copies
    of them."""
    hf = model.config
    q_size = hf.num_attention_heads * model.head_dim
    kv_size = model.num_kv_heads * model.head_dim
    mlp = getattr(hf, "intermediate_size", None) or hf.ffn_hidden_size  # Falcon's name
    per_token = 4 * hf.hidden_size + 2 * (q_size + 2 * kv_size) + 3 * mlp
    element = torch.empty(0, dtype=model.dtype).element_size()
    spec = config.speculative_config
    rows_per_seq = 1 + (spec.num_speculative_tokens if spec is not None else 0)
    rows = min(config.max_num_seqs * rows_per_seq, config.max_num_batched_tokens)
    logits = 6 * rows * hf.vocab_size * 4
    return config.max_num_batched_tokens * per_token * element + logits


def gpu_kv_budget_bytes(model: CausalLM, config: EngineConfig) -> int:
    """KV bytes under ``gpu_memory_utilization``: that share of the GPU's total memory, less
    what is in use already (these weights, the CUDA context, other processes) and the
    activations of a full step."""
    free, total = torch.cuda.mem_get_info(torch.device(config.device))
    budget = int(total * config.gpu_memory_utilization) - (total - free) \
        - activation_bytes(model, config)
    if budget < kv_block_bytes(model, config.block_size, config.kv_cache_torch_dtype):
        raise ValueError(f"gpu_memory_utilization={config.gpu_memory_utilization} of "
                         f"{total / 2**30:.1f} GiB leaves no room for a KV cache: "
                         f"{(total - free) / 2**30:.1f} GiB are in use (weights included)")
    return budget


def num_kv_blocks(model: CausalLM, config: EngineConfig) -> int:
    """Blocks that fit the configured KV budget (a budget beyond the device's memory is
    refused with ``ValueError``)."""
    budget = config.kv_cache_bytes
    if budget is not None:
        check_kv_cache_bytes(budget, config.device)
    elif config.device.startswith("cuda"):
        budget = gpu_kv_budget_bytes(model, config)
    else:  # a fraction of what is free cannot exceed it
        budget = int(available_memory_bytes(config.device) * config.kv_cache_memory_fraction)
    return budget // kv_block_bytes(model, config.block_size, config.kv_cache_torch_dtype)


class ModelRunner:
    """Owns the model and its paged KV cache (of ``cache_dtype``, the model's dtype when None);
    executes one scheduled batch per call."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int,
                 attention_backend: str = "auto",
                 adapters: AdapterResidency | None = None,
                 cache_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.adapters = adapters  # LoRA: the adapters' slots (None: enable_lora is off)
        self.block_size = block_size
        self.attention_backend = attention_backend
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # torch.empty leaves pages untouched until used; only the null block must read as zero.
        self.caches: list[KVCache] = []
        for _ in range(model.num_layers):
            k = torch.empty(shape, dtype=cache_dtype or model.dtype, device=model.device)
            v = torch.empty(shape, dtype=cache_dtype or model.dtype, device=model.device)
            k[NULL_BLOCK].zero_()
            v[NULL_BLOCK].zero_()
            self.caches.append((k, v))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copies K/V of whole blocks, src → dst, in every layer (copy-on-write)."""
        if not copies:
            return
        device = torch.device(self.model.device)
        src = to_device([c[0] for c in copies], torch.long, device)
        dst = to_device([c[1] for c in copies], torch.long, device)
        for k, v in self.caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def execute(self, step: ModelInput) -> ModelOutput:
        """Runs the step (after its block copies) and returns the logits of the rows its chunks
        want (``SeqChunk.num_logits``)."""
        self.copy_blocks(step.block_copies)
        device = torch.device(self.model.device)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_ids: list[int] = []
        num_decodes = 0
        for chunk in step.chunks:
            n = len(chunk.token_ids)
            end = chunk.start + n
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, end))
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(chunk.block_table)
            if n == 1 and num_decodes == len(query_lens) - 1:
                num_decodes += 1
            if chunk.num_logits:
                sample_rows.extend(range(len(input_ids) - chunk.num_logits, len(input_ids)))
                sample_ids.extend([chunk.seq_id] * chunk.num_logits)
        width = max(len(t) for t in tables)
        # Host lists reach the device without waiting for its queued work (one sync a step,
        # the sampler's).
        block_tables = to_device([t + [NULL_BLOCK] * (width - len(t)) for t in tables],
                                 torch.long, device)
        pos = to_device(positions, torch.long, device)
        rows_of_tokens = torch.repeat_interleave(
            torch.arange(len(query_lens), device=device),
            to_device(query_lens, torch.long, device), output_size=len(positions))
        slot_mapping = block_tables[rows_of_tokens, pos // bs] * bs + pos % bs
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=block_tables, query_lens=query_lens, seq_lens=seq_lens,
            num_decodes=num_decodes, block_size=bs, backend=self.attention_backend)
        lora = (None if self.adapters is None
                else self.adapters.batch(step, device, self.attention_backend))
        hidden = self.model.forward(to_device(input_ids, torch.long, device), pos, self.caches,
                                    meta, lora=lora)
        rows = to_device(sample_rows, torch.long, device)
        prompt: dict[int, PromptLogprobs] = {}
        offset = 0
        for chunk in step.chunks:
            if chunk.prompt_targets and chunk.prompt_logprobs is not None:
                first = offset + chunk.prompt_first_row
                prompt[chunk.seq_id] = self._prompt_logprobs(
                    hidden[first: first + len(chunk.prompt_targets)], chunk.prompt_targets,
                    chunk.prompt_logprobs)
            offset += len(chunk.token_ids)
        return ModelOutput(sample_ids, self.model.logits(hidden.index_select(0, rows)),
                           prompt_logprobs=prompt)

    def _prompt_logprobs(self, hidden: torch.Tensor, targets: list[int], top: int
                         ) -> PromptLogprobs:
        """Each row's next prompt token's logprob and the ``top`` most likely tokens, under the
        model's raw distribution; the logits made a slice of rows at a time, so a long prompt
        never holds a whole vocabulary's scores for all its tokens at once."""
        chosen: list[float] = []
        best: list[list[tuple[int, float]]] = []
        for start in range(0, len(targets), PROMPT_LOGITS_ROWS):
            part = targets[start: start + PROMPT_LOGITS_ROWS]
            logprobs = torch.log_softmax(self.model.logits(hidden[start: start + len(part)]),
                                         dim=-1)
            ids = to_device(part, torch.long, logprobs.device)
            chosen.extend(logprobs.gather(1, ids[:, None])[:, 0].tolist())
            if top:
                values, indices = logprobs.topk(top, dim=-1)
                best.extend([list(zip(i, v)) for i, v in zip(indices.tolist(),
                                                             values.tolist())])
            else:
                best.extend([] for _ in part)
        return PromptLogprobs(chosen, best)
