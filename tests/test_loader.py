"""The GGUF conversion cache finds a conversion by its file's whole content, computes that digest
once per file, and never serves a conversion that no longer matches its source."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pagedserve.model import conversion_cache
from pagedserve.model.conversion_cache import MANIFEST, content_digest
from pagedserve.model.loader import default_model_path, resolve_model_dir
from tests.conftest import TinyFactory
from tests.gguf_files import write_gguf


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("PAGEDSERVE_CACHE", str(folder))
    return folder


def test_a_copy_elsewhere_has_the_same_digest(tmp_path: Path) -> None:
    original = Path(default_model_path())
    copy = tmp_path / "elsewhere" / original.name
    copy.parent.mkdir()
    shutil.copyfile(original, copy)  # a new path and new time stamps
    assert content_digest(copy, tmp_path / "a") == content_digest(original, tmp_path / "b")


def test_the_digest_is_read_once_per_file_state(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "file.gguf"
    source.write_bytes(b"x" * 1000)
    reads = []
    real = conversion_cache._sha256
    monkeypatch.setattr(conversion_cache, "_sha256", lambda p: reads.append(p) or real(p))
    first = content_digest(source, tmp_path / "cache")
    assert content_digest(source, tmp_path / "cache") == first and len(reads) == 1
    source.write_bytes(b"y" * 1000)  # same size, new bytes and time: read again
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert content_digest(source, tmp_path / "cache") != first and len(reads) == 2


def _tiny_gguf(tiny_llama: TinyFactory, path: Path) -> Path:
    return write_gguf(tiny_llama(num_heads=2, num_kv_heads=1, head_dim=32, intermediate=64),
                      path)


@pytest.mark.slow  # converts twice
def test_same_name_and_size_with_other_bytes_is_converted_again(
        tiny_llama: TinyFactory, tmp_path: Path, cache: Path) -> None:
    source = _tiny_gguf(tiny_llama, tmp_path / "model.gguf")
    first = Path(resolve_model_dir(str(source)))
    data = bytearray(source.read_bytes())
    middle = len(data) // 2 + 37  # inside a tensor, away from the header and the end
    data[middle] ^= 0x40
    source.write_bytes(data)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    second = Path(resolve_model_dir(str(source)))
    assert second != first and second.is_dir() and first.is_dir()
    a = load_file(first / "model.safetensors")
    b = load_file(second / "model.safetensors")
    assert any(not a[k].equal(b[k]) for k in a)


@pytest.mark.slow  # converts three times
def test_an_edited_cache_entry_is_converted_again(tiny_llama: TinyFactory, tmp_path: Path,
                                                  cache: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    source = _tiny_gguf(tiny_llama, tmp_path / "model.gguf")
    folder = Path(resolve_model_dir(str(source)))
    assert (folder / MANIFEST).is_file()
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    edited = bytearray(original)
    edited[-5] ^= 0x01
    weights.write_bytes(edited)
    with caplog.at_level(logging.WARNING, logger="pagedserve.model.loader"):
        again = Path(resolve_model_dir(str(source)))
    assert again == folder and weights.read_bytes() == original
    assert "does not match it any more" in caplog.text
    (folder / "tokenizer.json").unlink()  # a lost file too
    assert Path(resolve_model_dir(str(source))) == folder
    assert (folder / "tokenizer.json").is_file()
