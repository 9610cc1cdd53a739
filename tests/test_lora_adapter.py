"""LoRA adapters as PEFT writes them: every family's modules read back to PEFT's own deltas
(plain, rsLoRA, per-module rank and alpha patterns), every refusal with its message, and the
CPU cache of loaded adapters (LRU order, capacity, one load per id under concurrency)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from pagedserve.model.lora import adapter as adapter_module
from pagedserve.model.lora.adapter import LoRAAdapter, LoRAError, load_adapter
from pagedserve.model.lora.cache import AdapterCache

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FALCON_MODULES = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]

# name: (config class, shape). 2 layers, hidden 64 (72 for three heads of 24), vocab 512.
FAMILIES: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "mistral": (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-mqa-odd": (Qwen2Config, dict(hidden_size=72, num_attention_heads=3,
                                        num_key_value_heads=1)),
    "qwen3-wide-heads": (Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=32)),
    "falcon-mqa": (FalconConfig, dict(num_attention_heads=4, multi_query=True)),
    "falcon-mha": (FalconConfig, dict(num_attention_heads=4, multi_query=False)),
    "falcon-new-arch-gqa": (FalconConfig, dict(num_attention_heads=4, num_kv_heads=2,
                                               new_decoder_architecture=True,
                                               ffn_hidden_size=96)),
}


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    config_class, shape = FAMILIES[family]
    shape = {"hidden_size": 64, "vocab_size": 512, "num_hidden_layers": 2,
             "intermediate_size": 96, **shape, **overrides}
    if config_class is FalconConfig:
        del shape["intermediate_size"]
    return config_class(**shape)


def lora_variants(family: str) -> dict[str, dict[str, Any]]:
    """PEFT settings to save adapters with: scaling alpha/r, alpha/sqrt(r), and per-module
    ranks and alphas by PEFT's pattern forms (bare name, escaped full path, ^-anchored)."""
    falcon = family.startswith("falcon")
    first, last = ("query_key_value", "dense_4h_to_h") if falcon else ("q_proj", "down_proj")
    layers = r"transformer\.h" if falcon else r"model\.layers"
    second_path = ("transformer.h.0.self_attention.dense" if falcon
                   else "model.layers.0.self_attn.k_proj")
    patterns = dict(rank_pattern={first: 4, rf"{layers}\.1\.mlp\.{last}": 2},
                    alpha_pattern={f"^{second_path}": 3, last: 5})
    return {"plain": {}, "rslora": dict(use_rslora=True), "patterns": patterns,
            "rslora-patterns": dict(use_rslora=True, **patterns)}


def save_peft_adapter(config: PretrainedConfig, dest: Path, seed: int = 0,
                      **lora: Any) -> dict[tuple[int, str], torch.Tensor]:
    """A random adapter of every supported module of ``config``'s family, as PEFT saves it in
    ``dest``; returns PEFT's own delta weight ``[out, in]`` of each (layer, module)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    modules = FALCON_MODULES if config.model_type == "falcon" else LLAMA_MODULES
    settings = dict(r=8, lora_alpha=16, target_modules=modules, init_lora_weights=False)
    peft_model = get_peft_model(model, LoraConfig(**{**settings, **lora}))
    peft_model.save_pretrained(str(dest))
    deltas = {}
    for path, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            match = re.search(r"\.(\d+)\.\w+\.(\w+)$", path)
            assert match is not None, path
            delta = module.get_delta_weight("default")  # type: ignore[attr-defined]
            deltas[(int(match[1]), match[2])] = delta.detach()
    return deltas


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns", "rslora-patterns"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_gives_peft_deltas(family: str, variant: str, tmp_path: Path) -> None:
    config = tiny_config(family)
    lora = lora_variants(family)[variant]
    deltas = save_peft_adapter(config, tmp_path, **lora)
    adapter = load_adapter(tmp_path, "tiny", config, max_rank=8)
    assert adapter.name == "tiny"
    assert set(adapter.weights) == set(deltas)
    ranks = set()
    for key, delta in deltas.items():
        a, b = adapter.weights[key]
        assert a.dtype == b.dtype == torch.float32 and a.device.type == b.device.type == "cpu"
        assert a.shape[0] == b.shape[1]
        ranks.add(a.shape[0])
        torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-6, msg=str(key))
    assert adapter.rank == max(ranks) == 8
    if "patterns" in variant:
        assert ranks == {2, 4, 8}


def test_task_type_and_all_linear_targets_read_alike(tmp_path: Path) -> None:
    config = tiny_config("llama")
    deltas = save_peft_adapter(config, tmp_path, task_type="CAUSAL_LM",
                               target_modules="all-linear")
    adapter = load_adapter(tmp_path, "tiny", config, max_rank=16)
    assert {module for _, module in adapter.weights} == set(LLAMA_MODULES)
    for key, (a, b) in adapter.weights.items():
        torch.testing.assert_close(b @ a, deltas[key], rtol=1e-5, atol=1e-6)


def test_half_precision_tensors_come_out_fp32(good: Path, tmp_path: Path) -> None:
    path = edited(good, tmp_path, tensors=lambda t: t.update(
        {k: v.bfloat16() for k, v in t.items()}))
    stored = load_file(path / "adapter_model.safetensors")
    adapter = load_adapter(path, "tiny", tiny_config("llama"), max_rank=8)
    a, b = adapter.weights[(1, "up_proj")]
    assert a.dtype == b.dtype == torch.float32
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_{}.weight"
    torch.testing.assert_close(a, stored[key.format("A")].float())
    torch.testing.assert_close(b, stored[key.format("B")].float() * 2.0)  # 16 / 8


# ---- refusals ---------------------------------------------------------------------------------

Q = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
DOWN = "base_model.model.model.layers.{}.mlp.down_proj.lora_{}.weight"
MODULES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good llama adapter (r 8, alpha 16, every module), which refusals' cases edit."""
    path = tmp_path_factory.mktemp("good-adapter")
    save_peft_adapter(tiny_config("llama"), path)
    return path


def edited(good: Path, tmp_path: Path,
           config: Callable[[dict[str, Any]], Any] | None = None,
           tensors: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> Path:
    """A copy of ``good`` with its config and/or tensors edited in place by the callables."""
    dest = tmp_path / "adapter"
    shutil.copytree(good, dest)
    if config is not None:
        data = json.loads((dest / "adapter_config.json").read_text())
        config(data)
        (dest / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        weights = load_file(dest / "adapter_model.safetensors")
        tensors(weights)
        save_file(weights, dest / "adapter_model.safetensors")
    return dest


def refused(path: Path, monkeypatch: pytest.MonkeyPatch, config: PretrainedConfig | None = None,
            max_rank: int = 8) -> str:
    """load_adapter's refusal of ``path``: it names the adapter, not the path, and comes
    before any tensor is read."""

    def no_reads(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a tensor was read from an adapter that is refused")

    monkeypatch.setattr(adapter_module, "safe_open", no_reads)
    with pytest.raises(LoRAError) as refusal:
        load_adapter(path, "bad-one", config or tiny_config("llama"), max_rank)
    message = str(refusal.value)
    assert "'bad-one'" in message
    assert str(path.parent) not in message
    return message


def _setter(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.update(fields)


CONFIG_REFUSALS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "not-lora": (_setter(peft_type="IA3"),
                 'adapter \'bad-one\': adapter_config.json peft_type is "IA3", not "LORA"'),
    "dora": (_setter(use_dora=True),
             "adapter 'bad-one': adapter_config.json use_dora is true, which asks for DoRA "
             "(a magnitude vector per module): not supported"),
    "bias": (_setter(bias="lora_only"),
             "adapter 'bad-one': adapter_config.json bias is \"lora_only\", not \"none\": "
             "trained biases of the base modules are not supported"),
    "modules-to-save": (_setter(modules_to_save=["lm_head"]),
                        "adapter 'bad-one': adapter_config.json modules_to_save is "
                        "[\"lm_head\"], which asks for fully trained copies of modules: not "
                        "supported"),
    "lora-bias": (_setter(lora_bias=True),
                  "adapter 'bad-one': adapter_config.json lora_bias is true, which asks for a "
                  "bias on lora_B: not supported"),
    "trainable-tokens": (_setter(trainable_token_indices=[1, 2]),
                         "adapter 'bad-one': adapter_config.json trainable_token_indices is "
                         "[1, 2], which asks for trained rows of the embedding: not supported"),
    "alora": (_setter(alora_invocation_tokens=[5]),
              "adapter 'bad-one': adapter_config.json alora_invocation_tokens is [5], "
              "which asks for Activated LoRA (applied only after its invocation tokens): not "
              "supported"),
    "layer-replication": (_setter(layer_replication=[[0, 2], [1, 2]]),
                          "adapter 'bad-one': adapter_config.json layer_replication is "
                          "[[0, 2], [1, 2]], which asks for replicated base layers: not supported"),
    "pissa": (_setter(init_lora_weights="pissa_niter_4"),
              "adapter 'bad-one': adapter_config.json init_lora_weights is \"pissa_niter_4\": "
              "the adapter is a delta on base weights its initialization changed; convert it "
              "to plain LoRA (peft's save_pretrained with "
              "path_initial_model_for_weight_conversion)"),
    "unknown-target": (_setter(target_modules=["q_proj", "lm_head"]),
                       "adapter 'bad-one': adapter_config.json target_modules names 'lm_head', "
                       f"not one of the base model's modules {MODULES}"),
    "embedding-target": (_setter(target_modules=["model.embed_tokens"]),
                         "adapter 'bad-one': adapter_config.json target_modules names "
                         f"'model.embed_tokens', not one of the base model's modules {MODULES}"),
    "r-not-int": (_setter(r="8"),
                  "adapter 'bad-one': adapter_config.json r is \"8\", not a positive integer"),
    "alpha-not-number": (_setter(lora_alpha=None),
                         "adapter 'bad-one': adapter_config.json lora_alpha is null, not a "
                         "number"),
    "regex-pattern": (_setter(rank_pattern={"(q|k)_proj": 4}),
                      "adapter 'bad-one': adapter_config.json rank_pattern key '(q|k)_proj' is "
                      "not a module name (letters, digits, '_' and '.', after an optional '^'); "
                      "other regular expressions are not supported"),
    "pattern-rank": (_setter(rank_pattern={"q_proj": 0}),
                     "adapter 'bad-one': adapter_config.json rank_pattern gives 'q_proj' 0, not "
                     "a positive integer"),
    "rank-not-the-tensors": (
        _setter(r=4),
        f"adapter 'bad-one': adapter_model.safetensors tensor '{DOWN.format(0, 'A')}' has "
        "shape [8, 96], where the base model's down_proj (96 in, 64 out) and rank 4 give "
        "[4, 96]"),
}


@pytest.mark.parametrize("case", list(CONFIG_REFUSALS))
def test_config_refusals(case: str, good: Path, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    edit, message = CONFIG_REFUSALS[case]
    assert refused(edited(good, tmp_path, config=edit), monkeypatch) == message


def _rename(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.update({new: t.pop(old)})


def _add(key: str, tensor: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.update({key: tensor})


EMBEDDING_A = "base_model.model.model.embed_tokens.lora_embedding_A"
LM_HEAD_A = "base_model.model.lm_head.lora_A.weight"
MAGNITUDE = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"


TENSOR_REFUSALS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], Any], str]] = {
    "no-tensors": (lambda t: t.clear(),
                   "adapter 'bad-one': adapter_model.safetensors holds no tensors"),
    "a-without-b": (lambda t: t.pop(Q.format(0, "B")),
                    f"adapter 'bad-one': adapter_model.safetensors has '{Q.format(0, 'A')}' "
                    "but not its lora_B"),
    "b-without-a": (lambda t: t.pop(Q.format(1, "A")),
                    f"adapter 'bad-one': adapter_model.safetensors has '{Q.format(1, 'B')}' "
                    "but not its lora_A"),
    "layer-out-of-range": (lambda t: [_rename(Q.format(1, x), Q.format(2, x))(t) for x in "AB"],
                           f"adapter 'bad-one': adapter_model.safetensors tensor "
                           f"'{Q.format(2, 'A')}' is for layer 2, but the base model has 2 "
                           "layers"),
    "shape": (lambda t: t.update({Q.format(1, "A"): torch.zeros(8, 32)}),
              f"adapter 'bad-one': adapter_model.safetensors tensor '{Q.format(1, 'A')}' has "
              "shape [8, 32], where the base model's q_proj (64 in, 64 out) and rank 8 give "
              "[8, 64]"),
    "integer": (lambda t: t.update({Q.format(0, "A"): torch.zeros(8, 64, dtype=torch.int32)}),
                f"adapter 'bad-one': adapter_model.safetensors tensor '{Q.format(0, 'A')}' has "
                "dtype I32, not a floating-point one"),
    "embedding": (_add(EMBEDDING_A, torch.zeros(8, 512)),
                  "adapter 'bad-one': adapter_model.safetensors tensor "
                  "'base_model.model.model.embed_tokens.lora_embedding_A' adapts the embedding "
                  "or the lm_head, which is not supported"),
    "lm-head": (_add(LM_HEAD_A, torch.zeros(8, 64)),
                "adapter 'bad-one': adapter_model.safetensors tensor "
                "'base_model.model.lm_head.lora_A.weight' adapts the embedding or the lm_head, "
                "which is not supported"),
    "dora-magnitude": (_add(MAGNITUDE, torch.zeros(64)),
                       "adapter 'bad-one': adapter_model.safetensors tensor "
                       "'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector' "
                       f"is not the lora_A or lora_B weight of a supported module ({MODULES})"),
    "misplaced-module": (lambda t: [_rename(Q.format(0, x),
                                            Q.format(0, x).replace("self_attn", "mlp"))(t)
                                    for x in "AB"],
                         "adapter 'bad-one': adapter_model.safetensors tensor "
                         "'base_model.model.model.layers.0.mlp.q_proj.lora_A.weight' is not the "
                         f"lora_A or lora_B weight of a supported module ({MODULES})"),
    "unknown-module": (lambda t: [_rename(Q.format(0, x),
                                          Q.format(0, x).replace("q_proj", "rotary"))(t)
                                  for x in "AB"],
                       "adapter 'bad-one': adapter_model.safetensors tensor "
                       "'base_model.model.model.layers.0.self_attn.rotary.lora_A.weight' is not "
                       f"the lora_A or lora_B weight of a supported module ({MODULES})"),
}


@pytest.mark.parametrize("case", list(TENSOR_REFUSALS))
def test_tensor_refusals(case: str, good: Path, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    edit, message = TENSOR_REFUSALS[case]
    assert refused(edited(good, tmp_path, tensors=edit), monkeypatch) == message


def test_rank_above_max_lora_rank(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert refused(good, monkeypatch, max_rank=4) == (
        "LoRA rank 8 of adapter 'bad-one' is greater than max_lora_rank 4")


def test_adapter_of_another_base_model(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tiny_config("llama", intermediate_size=128)
    assert refused(good, monkeypatch, config=other) == (
        f"adapter 'bad-one': adapter_model.safetensors tensor '{DOWN.format(0, 'A')}' has "
        "shape [8, 96], where the base model's down_proj (128 in, 64 out) and rank 8 give "
        "[8, 128]")


def test_unsupported_base_model(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpt2 = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512)
    assert refused(good, monkeypatch, config=gpt2) == (
        "adapter 'bad-one': the base model's type 'gpt2' has no LoRA support; supported: "
        "llama, mistral, qwen2, qwen3, falcon")


def test_falcon_tensors_refused_for_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    save_peft_adapter(tiny_config("falcon-mqa"), tmp_path / "adapter")
    message = refused(tmp_path / "adapter", monkeypatch)
    assert message.startswith("adapter 'bad-one': adapter_config.json target_modules names ")


def test_missing_files(good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert refused(tmp_path / "nowhere", monkeypatch) == (
        "adapter 'bad-one': its directory does not exist")
    path = edited(good, tmp_path)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    assert refused(path, monkeypatch) == (
        "adapter 'bad-one': its directory has no adapter_model.safetensors "
        "(adapter_model.bin, a pickle, is not read)")
    (path / "adapter_config.json").unlink()
    assert refused(path, monkeypatch) == (
        "adapter 'bad-one': its directory has no adapter_config.json")


@pytest.mark.parametrize(("text", "message"), [
    (b"[1, 2]", "adapter 'bad-one': adapter_config.json is not a JSON object"),
    (b'{"r": 8', "adapter 'bad-one': adapter_config.json is not valid JSON: "),
    (b'{"r": 8, "r": 4}', "adapter 'bad-one': adapter_config.json is not valid JSON: key 'r' "
                          "appears twice"),
    (b"{}" + b" " * (1 << 20), "adapter 'bad-one': adapter_config.json is over 1048576 bytes"),
])
def test_config_file_refusals(text: bytes, message: str, good: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = edited(good, tmp_path)
    (path / "adapter_config.json").write_bytes(text)
    assert refused(path, monkeypatch).startswith(message)


def test_safetensors_header_is_checked_first(good: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = edited(good, tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[:-4])  # the last tensor cut short
    message = refused(path, monkeypatch)
    assert message.startswith("adapter 'bad-one': adapter_model.safetensors: tensor ")
    assert "data_offsets" in message


# ---- the cache --------------------------------------------------------------------------------


class CountingLoader:
    """A loader that counts its loads per (name, path) and can hold them until released."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.loads: list[tuple[str, str]] = []
        self.hold = hold
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, name: str, path: str) -> LoRAAdapter:
        with self._lock:
            self.loads.append((name, path))
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        return LoRAAdapter(name, 1, {})


def test_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    loader = CountingLoader()
    cache = AdapterCache(max_cpu_loras=2, loader=loader)
    one = cache.get(1, "one", "/a/1")
    cache.get(2, "two", "/a/2")
    assert cache.get(1, "one", "/a/1") is one  # held: no load, and now the most recent
    assert len(loader.loads) == 2 and cache.ids() == [2, 1]
    cache.get(3, "three", "/a/3")  # over capacity: 2, the least recently used, goes
    assert cache.ids() == [1, 3] and len(cache) == 2
    assert cache.get(1, "one", "/a/1") is one
    cache.get(2, "two", "/a/2")  # loaded again; 3 goes
    assert cache.ids() == [1, 2]
    assert loader.loads == [("one", "/a/1"), ("two", "/a/2"), ("three", "/a/3"), ("two", "/a/2")]
    cache.discard(1)
    assert cache.ids() == [2]


def test_cache_reloads_an_id_that_names_another_adapter() -> None:
    loader = CountingLoader()
    cache = AdapterCache(max_cpu_loras=4, loader=loader)
    first = cache.get(7, "x", "/a/old")
    assert cache.get(7, "x", "/a/old") is first
    replaced = cache.get(7, "x", "/a/new")
    assert replaced is not first and cache.get(7, "x", "/a/new") is replaced
    assert loader.loads == [("x", "/a/old"), ("x", "/a/new")]
    assert cache.ids() == [7]


def test_cache_loads_one_id_once_for_concurrent_callers() -> None:
    release = threading.Event()
    loader = CountingLoader(hold=release)
    cache = AdapterCache(max_cpu_loras=2, loader=loader)
    with ThreadPoolExecutor(8) as pool:
        results = [pool.submit(cache.get, 5, "five", "/a/5") for _ in range(8)]
        assert loader.entered.wait(10)
        release.set()
        adapters = [r.result(timeout=10) for r in results]
    assert loader.loads == [("five", "/a/5")]
    assert all(a is adapters[0] for a in adapters)


def test_cache_loads_different_ids_side_by_side() -> None:
    """Each load waits until the other has started: they finish only if the cache lets both
    run at once (its lock not held while loading)."""
    both = threading.Barrier(2, timeout=10)

    def loader(name: str, path: str) -> LoRAAdapter:
        both.wait()
        return LoRAAdapter(name, 1, {})

    cache = AdapterCache(max_cpu_loras=2, loader=loader)
    with ThreadPoolExecutor(2) as pool:
        results = [pool.submit(cache.get, i, f"n{i}", f"/a/{i}") for i in (1, 2)]
        assert [r.result(timeout=20).name for r in results] == ["n1", "n2"]
    assert sorted(cache.ids()) == [1, 2]


def test_cache_remembers_a_refusal_until_the_files_change(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    config = folder / "adapter_config.json"
    config.write_text("{}")
    attempts: list[str] = []

    def loader(name: str, path: str) -> LoRAAdapter:
        attempts.append(path)
        if len(attempts) == 1:
            raise LoRAError(f"adapter {name!r}: broken")
        return LoRAAdapter(name, 1, {})

    cache = AdapterCache(max_cpu_loras=2, loader=loader)
    for _ in range(3):  # read once: the refusal is remembered
        with pytest.raises(LoRAError, match="broken"):
            cache.get(1, "one", str(folder))
    assert attempts == [str(folder)] and cache.ids() == []
    config.write_text('{"r": 8}')  # the adapter is fixed: read again
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    assert cache.get(1, "one", str(folder)).name == "one"
    assert attempts == [str(folder)] * 2 and cache.ids() == [1]


def test_cache_keeps_no_failed_load_of_another_kind() -> None:
    """An error that is not a refusal of the adapter (a bug, an interruption) is not kept."""
    attempts: list[str] = []

    def loader(name: str, path: str) -> LoRAAdapter:
        attempts.append(path)
        if len(attempts) == 1:
            raise RuntimeError("interrupted")
        return LoRAAdapter(name, 1, {})

    cache = AdapterCache(max_cpu_loras=2, loader=loader)
    with pytest.raises(RuntimeError, match="interrupted"):
        cache.get(1, "one", "/a/1")
    assert cache.get(1, "one", "/a/1").name == "one"  # tried again
    assert attempts == ["/a/1", "/a/1"] and cache.ids() == [1]


def test_cache_over_load_adapter(good: Path) -> None:
    config = tiny_config("llama")
    cache = AdapterCache(
        max_cpu_loras=1, loader=lambda name, path: load_adapter(Path(path), name, config, 8))
    adapter = cache.get(1, "good", str(good))
    assert adapter.rank == 8 and len(adapter.weights) == 2 * len(LLAMA_MODULES)
    assert cache.get(1, "good", str(good)) is adapter
