"""LoRA adapters as PEFT's ``save_pretrained`` writes them, read for serving.

An adapter is a directory of ``adapter_config.json`` and ``adapter_model.safetensors``, whose
tensors are named after the base model's modules:
``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` (Falcon:
``base_model.model.transformer.h.N.self_attention.query_key_value.lora_A.weight``), ``lora_A``
``[r, in]`` and ``lora_B`` ``[out, r]``; PEFT's layer adds ``scaling * B @ A @ x``.

Like the model's own files, an adapter is untrusted input, and it is easy to get subtly wrong:
one trained for another base model, or a PEFT variant whose forward is not ``B @ A`` (DoRA,
trained biases, copies of whole modules). So everything is checked before a tensor is read,
and an adapter that would not give PEFT's own outputs on this base model is refused with a
:class:`LoRAError` naming the adapter (never the server's path to it) and the field, rather
than served approximately.

Supported: plain LoRA on the attention and MLP projections, ``use_rslora``, and
``rank_pattern``/``alpha_pattern`` (per-module rank and alpha) whose keys are module names.
PEFT reads those keys as regular expressions; only ones without quantifiers, groups or classes
are taken (see :func:`_compile_patterns`), since a crafted expression could backtrack for
hours in the loading thread.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig

from pagedserve.model.file_checks import ModelFileError
from pagedserve.model.file_checks.json_object import parse_object
from pagedserve.model.file_checks.safetensors_header import FLOAT_DTYPES, tensor_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Far above any real adapter's config (a few KiB, or tens with a full-name rank_pattern).
MAX_CONFIG_BYTES = 1 << 20
# rank_pattern/alpha_pattern keys: more than one per module of a 128-layer model, each no
# longer than a module's full name; bounds the matching work (keys x modules).
MAX_PATTERNS = 4096
MAX_PATTERN_CHARS = 256

Shape = tuple[int, ...]
Features = dict[str, tuple[int, int]]  # module -> (in_features, out_features)


class LoRAError(ValueError):
    """An adapter that cannot be served: missing, malformed, of a kind the engine does not
    apply, or not made for the base model. The message names the adapter and the field."""


@dataclass(frozen=True)
class LoRAAdapter:
    """A loaded adapter. ``weights[(layer, module)]`` is ``(A [r, in], B [out, r])``, fp32 on
    the CPU, with PEFT's scaling already folded into ``B``, so the delta is ``B @ A``. ``rank``
    is the largest ``r`` of its modules (they differ with a ``rank_pattern``)."""

    name: str
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def _llama_features(config: PretrainedConfig) -> Features:
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(config.intermediate_size)
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def _falcon_features(config: PretrainedConfig) -> Features:
    """As transformers' ``FalconAttention`` and ``FalconMLP`` size their linears."""
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = hidden // heads
    if config.new_decoder_architecture:
        kv_heads = int(config.num_kv_heads)
    else:
        kv_heads = 1 if config.multi_query else heads
    ffn = int(getattr(config, "ffn_hidden_size", None) or 4 * hidden)
    return {"query_key_value": (hidden, (heads + 2 * kv_heads) * head_dim),
            "dense": (hidden, hidden), "dense_h_to_4h": (hidden, ffn),
            "dense_4h_to_h": (ffn, hidden)}


@dataclass(frozen=True)
class _Layout:
    """Where a family keeps its adaptable modules: the layer list's path in the base model,
    each module's parent within a layer, and the modules' widths from the config."""

    layers: str
    parents: dict[str, str]
    features: Callable[[PretrainedConfig], Features]

    def module_path(self, layer: int, module: str) -> str:
        """The module's name in the base model, as PEFT matches its patterns against."""
        return f"{self.layers}.{layer}.{self.parents[module]}.{module}"


_LLAMA = _Layout("model.layers", {"q_proj": "self_attn", "k_proj": "self_attn",
                                  "v_proj": "self_attn", "o_proj": "self_attn",
                                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"},
                 _llama_features)
_FALCON = _Layout("transformer.h", {"query_key_value": "self_attention",
                                    "dense": "self_attention", "dense_h_to_4h": "mlp",
                                    "dense_4h_to_h": "mlp"},
                  _falcon_features)
_LAYOUTS = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
            "falcon": _FALCON}

# Config fields whose being set means the adapter is not ``scaling * B @ A`` added to the base
# model's own modules, with what they are.
_UNSUPPORTED = {
    "use_dora": "DoRA (a magnitude vector per module)",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "fully trained copies of modules",
    "trainable_token_indices": "trained rows of the embedding",
    "target_parameters": "adapters of parameters rather than modules",
    "layer_replication": "replicated base layers",
    "alora_invocation_tokens": "Activated LoRA (applied only after its invocation tokens)",
    "use_qalora": "QA-LoRA (pooled inputs)",
    "use_bdlora": "block-diagonal LoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA (a learned diagonal between A and B)",
    "megatron_config": "Megatron-parallel layers",
}
# Initializations that change the base weights too: unless converted to plain LoRA when saved
# (which writes init_lora_weights true), the adapter is a delta on weights this base model
# does not have.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")
# A pattern key as a module name: dotted words (a dot escaped or not), an optional leading ^.
_PATTERN_KEY = re.compile(r"\^?(?:[A-Za-z0-9_]|\\?\.)+")
_EMBEDDING = re.compile(r"lora_embedding_|embed_tokens|word_embeddings|lm_head")


def module_features(config: PretrainedConfig) -> Features:
    """Each adaptable module of ``config``'s family: ``(in_features, out_features)``."""
    layout = _LAYOUTS.get(config.model_type)
    if layout is None:
        raise LoRAError(f"model type {config.model_type!r} has no LoRA support; supported: "
                        f"{', '.join(_LAYOUTS)}")
    return layout.features(config)


def _short(value: Any) -> str:
    """A config value as its JSON spells it, cut short: it may be anything."""
    return json.dumps(value)[:80]


def _is_set(value: Any) -> bool:
    return value is not None and value is not False and value not in ([], {}, "")


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: Any) -> TypeGuard[int | float]:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class _Settings:
    """What of ``adapter_config.json`` decides the weights: each module's rank and scaling."""

    r: int
    alpha: float
    rslora: bool
    rank_pattern: list[tuple[re.Pattern[str], int]]
    alpha_pattern: list[tuple[re.Pattern[str], float]]

    def rank(self, module_path: str) -> int:
        # PEFT takes the first key that matches, in the config's order.
        return next((r for p, r in self.rank_pattern if p.match(module_path)), self.r)

    def scaling(self, module_path: str, rank: int) -> float:
        alpha = next((a for p, a in self.alpha_pattern if p.match(module_path)), self.alpha)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


def _files(path: Path, name: str) -> tuple[Path, Path]:
    if not path.is_dir():
        raise LoRAError(f"adapter {name!r}: its directory does not exist")
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise LoRAError(f"adapter {name!r}: its directory has no {CONFIG_FILE}")
    if not weights_file.is_file():
        pickled = " (adapter_model.bin, a pickle, is not read)" if (
            path / "adapter_model.bin").exists() else ""
        raise LoRAError(f"adapter {name!r}: its directory has no {WEIGHTS_FILE}{pickled}")
    return config_file, weights_file


def _read_config(config_file: Path, name: str) -> dict[str, Any]:
    try:
        with open(config_file, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise LoRAError(f"adapter {name!r}: cannot read {CONFIG_FILE}: {exc.strerror}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise LoRAError(f"adapter {name!r}: {CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes")
    try:
        return parse_object(text, CONFIG_FILE)
    except ModelFileError as exc:
        raise LoRAError(f"adapter {name!r}: {exc}") from None


def _settings(config: dict[str, Any], layout: _Layout, name: str) -> _Settings:
    """The config's ranks and scalings, once nothing in it asks for more than plain LoRA."""
    where = f"adapter {name!r}: {CONFIG_FILE}"
    if config.get("peft_type") != "LORA":
        raise LoRAError(f"{where} peft_type is {_short(config.get('peft_type'))}, not \"LORA\"")
    for field, what in _UNSUPPORTED.items():
        if _is_set(config.get(field)):
            raise LoRAError(f"{where} {field} is {_short(config[field])}, which asks for "
                            f"{what}: not supported")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{where} bias is {_short(config['bias'])}, not \"none\": trained "
                        f"biases of the base modules are not supported")
    init = config.get("init_lora_weights")
    if str(init).lower().startswith(_BASE_CHANGING_INITS):
        raise LoRAError(f"{where} init_lora_weights is {_short(init)}: the adapter is a delta "
                        f"on base weights its initialization changed; convert it to plain "
                        f"LoRA (peft's save_pretrained with "
                        f"path_initial_model_for_weight_conversion)")
    _check_targets(config.get("target_modules"), layout, where)
    # fan_in_fan_out is not read: every supported module is an nn.Linear, for which PEFT
    # turns it off itself (the tensors' shapes would show a transposed layout anyway).
    r, alpha, rslora = config.get("r"), config.get("lora_alpha", 8), config.get("use_rslora")
    if not _is_count(r):
        raise LoRAError(f"{where} r is {_short(r)}, not a positive integer")
    if not _is_number(alpha):
        raise LoRAError(f"{where} lora_alpha is {_short(alpha)}, not a number")
    if not isinstance(rslora, bool | None):
        raise LoRAError(f"{where} use_rslora is {_short(rslora)}, not true or false")
    return _Settings(r, float(alpha), bool(rslora),
                     _compile_patterns(config, "rank_pattern", _is_count, where),
                     _compile_patterns(config, "alpha_pattern", _is_number, where))


def _check_targets(targets: Any, layout: _Layout, where: str) -> None:
    """A list of targets must name the family's modules (PEFT matches an entry as the module
    name or a dotted suffix of its path); a string is a regular expression (or
    ``"all-linear"``), which the tensors' own names are checked in place of."""
    if targets is None or isinstance(targets, str):
        return
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise LoRAError(f"{where} target_modules is {_short(targets)}, not a list of module "
                        f"names")
    for target in targets:
        if target.rsplit(".", 1)[-1] not in layout.parents:
            raise LoRAError(f"{where} target_modules names {target[:80]!r}, not one of the "
                            f"base model's modules {', '.join(layout.parents)}")


def _compile_patterns(config: dict[str, Any], field: str, valid: Callable[[Any], bool],
                      where: str) -> list[tuple[re.Pattern[str], Any]]:
    """``field``'s keys as PEFT matches them (``(.*\\.)?(key)$`` against the module's path),
    with their values. Keys are limited to module names: their matching then takes time
    linear in the key, where an arbitrary expression could backtrack without bound."""
    raw = config.get(field)
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise LoRAError(f"{where} {field} is {_short(raw)}, not an object")
    if len(raw) > MAX_PATTERNS:
        raise LoRAError(f"{where} {field} has {len(raw)} keys, more than {MAX_PATTERNS}")
    patterns = []
    for key, value in raw.items():
        if len(key) > MAX_PATTERN_CHARS or not _PATTERN_KEY.fullmatch(key):
            raise LoRAError(f"{where} {field} key {key[:80]!r} is not a module name (letters, "
                            f"digits, '_' and '.', after an optional '^'); other regular "
                            f"expressions are not supported")
        if not valid(value):
            raise LoRAError(f"{where} {field} gives {key[:80]!r} {_short(value)}, not a "
                            f"{'positive integer' if field == 'rank_pattern' else 'number'}")
        patterns.append((re.compile(rf"(.*\.)?({key})$"), value))
    return patterns


def _stated_tensors(weights_file: Path, name: str) -> dict[str, tuple[str, Shape]]:
    try:
        stated = tensor_shapes(weights_file)
    except ModelFileError as exc:
        raise LoRAError(f"adapter {name!r}: {exc}") from None
    except OSError as exc:
        raise LoRAError(f"adapter {name!r}: cannot read {WEIGHTS_FILE}: {exc.strerror}") from None
    if not stated:
        raise LoRAError(f"adapter {name!r}: {WEIGHTS_FILE} holds no tensors")
    return stated


def _pair_tensors(stated: dict[str, tuple[str, Shape]], layout: _Layout, num_layers: int,
                  name: str) -> dict[tuple[int, str], tuple[str, str]]:
    """Each adapted (layer, module) with the names of its lora_A and lora_B; every tensor of
    the file must be one of these."""
    key_form = re.compile(rf"base_model\.model\.{re.escape(layout.layers)}\.(0|[1-9][0-9]{{0,8}})"
                          rf"\.(\w+)\.(\w+)\.lora_([AB])\.weight")
    halves: dict[tuple[int, str], dict[str, str]] = {}
    for key, (dtype, _) in stated.items():
        where = f"adapter {name!r}: {WEIGHTS_FILE} tensor {key[:120]!r}"
        match = key_form.fullmatch(key)
        if match is None or layout.parents.get(match[3]) != match[2]:
            if _EMBEDDING.search(key):
                raise LoRAError(f"{where} adapts the embedding or the lm_head, which is not "
                                f"supported")
            raise LoRAError(f"{where} is not the lora_A or lora_B weight of a supported "
                            f"module ({', '.join(layout.parents)})")
        layer = int(match[1])
        if layer >= num_layers:
            raise LoRAError(f"{where} is for layer {layer}, but the base model has "
                            f"{num_layers} layers")
        if dtype not in FLOAT_DTYPES:
            raise LoRAError(f"{where} has dtype {dtype}, not a floating-point one")
        halves.setdefault((layer, match[3]), {})[match[4]] = key
    pairs = {}
    for module, found in sorted(halves.items()):
        if len(found) != 2:
            (only,) = found.values()
            missing = "lora_B" if "A" in found else "lora_A"
            raise LoRAError(f"adapter {name!r}: {WEIGHTS_FILE} has {only[:120]!r} but not its "
                            f"{missing}")
        pairs[module] = (found["A"], found["B"])
    return pairs


def _check_shape(stated: dict[str, tuple[str, Shape]], key: str, want: Shape, module: str,
                 features: tuple[int, int], rank: int, name: str) -> None:
    shape = stated[key][1]
    if shape != want:
        raise LoRAError(f"adapter {name!r}: {WEIGHTS_FILE} tensor {key[:120]!r} has shape "
                        f"{list(shape)}, where the base model's {module} ({features[0]} in, "
                        f"{features[1]} out) and rank {rank} give {list(want)}")


def _read_tensors(weights_file: Path, plan: dict[tuple[int, str], tuple[str, str, float]],
                  stated: dict[str, tuple[str, Shape]], name: str
                  ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    weights = {}
    try:
        with safe_open(str(weights_file), framework="pt", device="cpu") as f:
            for module, (key_a, key_b, scaling) in plan.items():
                a = f.get_tensor(key_a).to(torch.float32, copy=True)
                b = f.get_tensor(key_b).to(torch.float32) * scaling
                if a.shape != stated[key_a][1] or b.shape != stated[key_b][1]:
                    raise LoRAError(f"adapter {name!r}: {WEIGHTS_FILE} changed while it was "
                                    f"read")
                weights[module] = (a.contiguous(), b.contiguous())
    except OSError as exc:
        raise LoRAError(f"adapter {name!r}: cannot read {WEIGHTS_FILE}: {exc.strerror}") from None
    except SafetensorError as exc:
        message = str(exc).replace(str(weights_file), WEIGHTS_FILE)[:200]
        raise LoRAError(f"adapter {name!r}: cannot read {WEIGHTS_FILE}: {message}") from None
    return weights


def load_adapter(path: Path, name: str, config: PretrainedConfig,
                 max_rank: int) -> LoRAAdapter:
    """The adapter in the PEFT directory ``path``, for the base model ``config`` describes,
    called ``name`` in messages; :class:`LoRAError` if it cannot be served as PEFT would
    apply it, or has a rank above ``max_rank``. Every check runs on the config and the
    safetensors header: no tensor is read from an adapter that is then refused."""
    try:
        return _load(path, name, config, max_rank)
    except OSError as e:  # unreadable, removed meanwhile: said without the path
        raise LoRAError(f"adapter {name!r}: its files cannot be read "
                        f"({e.strerror or type(e).__name__})") from None


def _load(path: Path, name: str, config: PretrainedConfig, max_rank: int) -> LoRAAdapter:
    layout = _LAYOUTS.get(config.model_type)
    if layout is None:
        raise LoRAError(f"adapter {name!r}: the base model's type {config.model_type!r} has no "
                        f"LoRA support; supported: {', '.join(_LAYOUTS)}")
    config_file, weights_file = _files(Path(path), name)
    settings = _settings(_read_config(config_file, name), layout, name)
    stated = _stated_tensors(weights_file, name)
    features = layout.features(config)
    plan: dict[tuple[int, str], tuple[str, str, float]] = {}
    rank = 0
    pairs = _pair_tensors(stated, layout, int(config.num_hidden_layers), name)
    for (layer, module), (key_a, key_b) in pairs.items():
        module_path = layout.module_path(layer, module)
        r = settings.rank(module_path)
        if r > max_rank:
            raise LoRAError(f"LoRA rank {r} of adapter {name!r} is greater than max_lora_rank "
                            f"{max_rank}")
        in_features, out_features = features[module]
        _check_shape(stated, key_a, (r, in_features), module, features[module], r, name)
        _check_shape(stated, key_b, (out_features, r), module, features[module], r, name)
        plan[(layer, module)] = (key_a, key_b, settings.scaling(module_path, r))
        rank = max(rank, r)
    return LoRAAdapter(name, rank, _read_tensors(weights_file, plan, stated, name))
