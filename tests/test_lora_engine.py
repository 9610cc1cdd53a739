"""Multi-LoRA serving in the engine, against ``transformers`` + ``peft`` on tiny random-weight
models of every family: greedy outputs token-identical with each adapter (fp32); a batch mixing
the base model and four adapters gives each request what it gets alone; the prefix cache never
serves one adapter's blocks to another; ``max_loras`` holds in every step; and bad adapters are
refused clearly."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.model.loader import LoadedModel, load_model
from pagedserve.model.lora.adapter import LoRAError
from pagedserve.model.runner import kv_block_bytes
from tests.conftest import assert_all_blocks_free, hf_greedy
from tests.prompts import random_prompts
from tests.test_model_families import FAMILIES, Tiny, tiny_model  # noqa: F401 (fixture)

MAX_NEW = 6
RANK = 8
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FALCON_MODULES = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def _modules(family: str) -> list[str]:
    return FALCON_MODULES if family.startswith("falcon") else LLAMA_MODULES


def make_adapter(tiny: Tiny, family: str, target: Path, seed: int, rank: int = RANK,
                 **options: Any) -> Path:
    """A PEFT adapter of every supported module with non-zero ``lora_B``, saved to ``target``."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=_modules(family),
                        init_lora_weights=False, **options)
    model = get_peft_model(base, config)
    with torch.no_grad():  # peft's non-zero init is small: make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(4.0)
    model.save_pretrained(str(target))
    return target


@dataclass
class Adapted:
    tiny: Tiny
    paths: list[Path]  # adapters 1..4

    def request(self, i: int) -> LoRARequest:
        return LoRARequest(f"adapter{i}", i, str(self.paths[i - 1]))

    def reference(self, i: int | None, prompt: list[int]) -> list[int]:
        if i is None:
            return hf_greedy(self.tiny.hf, prompt, MAX_NEW)
        base = AutoModelForCausalLM.from_pretrained(self.tiny.path, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(self.paths[i - 1])).eval()
        return hf_greedy(model, prompt, MAX_NEW)


    def reference_beams(self, i: int, prompt: list[int], width: int) -> list[int]:
        """transformers' best beam with adapter ``i``."""
        base = AutoModelForCausalLM.from_pretrained(self.tiny.path, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(self.paths[i - 1])).eval()
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]),
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 num_beams=width, do_sample=False, max_new_tokens=MAX_NEW,
                                 min_new_tokens=MAX_NEW,
                                 pad_token_id=model.generation_config.eos_token_id)
        return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def adapted(tiny_model: Callable[[str], Tiny],  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Adapted]]:
    made: dict[str, Adapted] = {}

    def make(family: str) -> Adapted:
        if family not in made:
            tiny = tiny_model(family)
            folder = tmp_path_factory.mktemp(f"adapters-{family}")
            made[family] = Adapted(tiny, [make_adapter(tiny, family, folder / f"a{i}", seed=i)
                                          for i in range(1, 5)])
        return made[family]

    yield make


def _llm(loaded: LoadedModel, **settings: Any) -> LLM:
    defaults = {"dtype": "float32", "kv_cache_bytes": 2**22, "enable_lora": True,
                "max_lora_rank": RANK, "max_loras": 4}
    return LLM(loaded=loaded, **{**defaults, **settings})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_with_an_adapter_matches_peft(family: str, adapted: Callable[[str], Adapted]
                                             ) -> None:
    model = adapted(family)
    prompts = random_prompts(len(family), 2, 30)
    llm = _llm(model.tiny.loaded)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False,
                           lora_request=model.request(1))
    expected = [model.reference(1, p) for p in prompts]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert expected != [model.reference(None, p) for p in prompts], "the adapter changes nothing"
    assert_all_blocks_free(llm)


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(
        adapted: Callable[[str], Adapted]) -> None:
    model = adapted("llama")
    prompts = random_prompts(7, 10, 40)
    loras: list[int | None] = [None, 1, 2, 3, 4, 1, 2, None, 3, 4]
    llm = _llm(model.tiny.loaded)
    together = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False,
                            lora_request=[None if i is None else model.request(i)
                                          for i in loras])
    for prompt, lora, output in zip(prompts, loras, together, strict=True):
        assert output.outputs[0].token_ids == model.reference(lora, prompt), lora
    assert_all_blocks_free(llm)


def test_max_loras_holds_in_every_step(adapted: Callable[[str], Adapted],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model = adapted("llama")
    llm = _llm(model.tiny.loaded, max_loras=2)
    adapters = llm.engine.executor.runner.adapters
    seen: list[int] = []
    batch = adapters.batch
    monkeypatch.setattr(adapters, "batch", lambda step, *args: seen.append(len(step.loras))
                        or batch(step, *args))
    prompts = random_prompts(8, 8, 30)
    loras = [1, 2, 3, 4, 4, 3, 2, 1]
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False,
                           lora_request=[model.request(i) for i in loras])
    assert max(seen) == 2 and len(seen) > 1
    for prompt, lora, output in zip(prompts, loras, outputs, strict=True):
        assert output.outputs[0].token_ids == model.reference(lora, prompt)


def test_the_prefix_cache_never_serves_another_adapters_blocks(
        adapted: Callable[[str], Adapted]) -> None:
    model = adapted("llama")
    prompt = random_prompts(9, 1, 64)[0]
    llm = _llm(model.tiny.loaded, block_size=16)
    first = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_tqdm=False,
                         lora_request=model.request(1))[0]
    again = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_tqdm=False,
                         lora_request=model.request(1))[0]
    assert again.num_cached_tokens >= 48, "the same adapter reuses its prefix"
    for other in (2, None):
        output = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY,
                              use_tqdm=False,
                              lora_request=None if other is None else model.request(other))[0]
        assert output.num_cached_tokens == 0, other
        assert output.outputs[0].token_ids == model.reference(other, prompt), other
    assert first.outputs[0].token_ids == again.outputs[0].token_ids


def test_n_beam_preemption_chunked_prefill_and_speculation_take_adapters(
        adapted: Callable[[str], Adapted]) -> None:
    model = adapted("llama")
    prompts = random_prompts(11, 3, 40)
    expected = [model.reference(2, p) for p in prompts]
    # Chunks of 16 tokens into a cache of 14 blocks of 4, which holds the longest sequence
    # but not the batch (preemption), with n-gram speculation: the greedy tokens do not change.
    block_bytes = kv_block_bytes(_llm(model.tiny.loaded).engine.model, 4)
    llm = _llm(model.tiny.loaded, block_size=4, kv_cache_bytes=14 * block_bytes,
               max_num_batched_tokens=16,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False,
                           lora_request=model.request(2))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.stats().num_preemptions > 0
    # n = 3 seeded samples: the same under preemption as in a roomy engine.
    sampling = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=MAX_NEW)
    short = [p[:10] for p in prompts]  # three sequences of each fit the small cache
    sampled = [llm_.generate(prompt_token_ids=short, sampling_params=sampling,
                             use_tqdm=False, lora_request=model.request(2))
               for llm_ in (llm, _llm(model.tiny.loaded))]
    assert [[c.token_ids for c in o.outputs] for o in sampled[0]] == \
        [[c.token_ids for c in o.outputs] for o in sampled[1]]
    beams = llm.generate(prompt_token_ids=short[:1],
                         sampling_params=SamplingParams(beam_width=2, max_tokens=MAX_NEW,
                                                        ignore_eos=True),
                         use_tqdm=False, lora_request=model.request(2))[0]
    assert beams.outputs[0].token_ids == model.reference_beams(2, short[0], 2)
    assert_all_blocks_free(llm)


def test_bad_adapters_are_refused_and_the_engine_serves_on(
        adapted: Callable[[str], Adapted], tmp_path: Path) -> None:
    model = adapted("llama")
    llm = _llm(model.tiny.loaded)
    big = make_adapter(model.tiny, "llama", tmp_path / "big", seed=5, rank=16)
    with pytest.raises(LoRAError, match="max_lora_rank"):
        llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("big", 9, str(big)))
    with pytest.raises(LoRAError):
        llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("missing", 10, str(tmp_path / "nowhere")))
    dora = tmp_path / "dora"
    dora.mkdir()
    for item in model.paths[0].iterdir():
        (dora / item.name).write_bytes(item.read_bytes())
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoRAError, match="use_dora"):
        llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY, use_tqdm=False,
                     lora_request=LoRARequest("dora", 11, str(dora)))
    prompt = random_prompts(12, 1, 20)[0]
    output = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY, use_tqdm=False,
                          lora_request=model.request(3))[0]
    assert output.outputs[0].token_ids == model.reference(3, prompt)
    assert_all_blocks_free(llm)


def test_an_adapter_without_enable_lora_is_refused(adapted: Callable[[str], Adapted]) -> None:
    model = adapted("llama")
    llm = LLM(loaded=model.tiny.loaded, dtype="float32", kv_cache_bytes=2**22)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=GREEDY, use_tqdm=False,
                     lora_request=model.request(1))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_base_weights_take_adapters(quantization: str,
                                              adapted: Callable[[str], Adapted]) -> None:
    """The adapter's delta is added to the quantized projections' outputs: an adapter changes
    the quantized model's tokens as it changes the plain one's, and the base requests of the
    same batch are the quantized model's own."""
    model = adapted("llama")
    prompts = random_prompts(13, 2, 30)
    plain = LLM(loaded=load_model(str(model.tiny.path)), dtype="float32",
                kv_cache_bytes=2**22, quantization=quantization)
    base = [o.outputs[0].token_ids for o in plain.generate(
        prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)]
    llm = LLM(loaded=load_model(str(model.tiny.path)), dtype="float32", kv_cache_bytes=2**22,
              quantization=quantization, enable_lora=True, max_lora_rank=RANK)
    mixed = llm.generate(prompt_token_ids=prompts * 2, sampling_params=GREEDY, use_tqdm=False,
                         lora_request=[None, None, model.request(1), model.request(1)])
    assert [o.outputs[0].token_ids for o in mixed[:2]] == base
    assert [o.outputs[0].token_ids for o in mixed[2:]] != base


def test_an_adapter_on_the_embedded_model_matches_peft(smollm: LoadedModel,
                                                       tmp_path: Path) -> None:
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(smollm.path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK,
                                            target_modules=LLAMA_MODULES,
                                            init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "adapter"))
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smollm.path, dtype=torch.float32),
        str(tmp_path / "adapter")).eval()
    prompts = [smollm.tokenizer.encode(p) for p in ("The capital of France is",
                                                    "def fibonacci(n):")]
    llm = _llm(smollm)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False,
                           lora_request=LoRARequest("embedded", 1, str(tmp_path / "adapter")))
    expected = [hf_greedy(reference, p, MAX_NEW) for p in prompts]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    plain = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] != expected, "the adapter changes nothing"


def test_the_triton_path_applies_adapters(adapted: Callable[[str], Adapted]) -> None:
    """The Triton kernels (interpreted on a CPU) through the engine: a base row and an
    adapter's row of one batch, as transformers + peft give them."""
    model = adapted("llama")
    prompts = random_prompts(15, 2, 8)
    llm = _llm(model.tiny.loaded, attention_backend="triton")
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False,
                           lora_request=[None, model.request(4)])
    assert [o.outputs[0].token_ids for o in outputs] == \
        [model.reference(None, prompts[0]), model.reference(4, prompts[1])]


def test_a_passed_over_adapter_is_not_starved(adapted: Callable[[str], Adapted]) -> None:
    """max_loras 1, adapter 1 running and a steady stream of adapter-1 requests behind a
    request for adapter 2: adapter 2's request runs once those already running end, ahead of
    the later adapter-1 requests."""
    model = adapted("llama")
    llm = _llm(model.tiny.loaded, max_loras=1)
    core = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = random_prompts(16, 6, 12)

    def add(name: str, prompt: list[int], lora: int) -> None:
        core.add_request(core.make_request(name, None, params, prompt,
                                           lora_request=model.request(lora)))

    add("first", prompts[0], 1)
    add("other", prompts[1], 2)
    finished: list[str] = []
    for i, prompt in enumerate(prompts[2:]):
        add(f"later{i}", prompt, 1)  # a new request of the running adapter every step
        finished += [o.request_id for o in core.step() if o.finished]
    while core.has_unfinished_requests:
        finished += [o.request_id for o in core.step() if o.finished]
    assert finished.index("other") < min(finished.index(f"later{i}") for i in range(4))


def test_one_id_names_one_adapter_at_a_time(adapted: Callable[[str], Adapted]) -> None:
    model = adapted("llama")
    llm = _llm(model.tiny.loaded)
    prompts = random_prompts(17, 2, 10)
    clash = LoRARequest("impostor", 1, str(model.paths[1]))  # adapter 2's folder, id 1
    with pytest.raises(ValueError, match="id 1 names adapter 'adapter1' in requests still "
                                         "running"):
        llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False,
                     lora_request=[model.request(1), clash])
    assert not llm.engine.has_unfinished_requests  # nothing of the call stays queued
    assert_all_blocks_free(llm)
