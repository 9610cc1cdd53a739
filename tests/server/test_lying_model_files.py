"""A model whose files lie fails its load with the lie named, in bounded memory, while the
server streams from another model throughout.

The lying files are the reported one (the embedded GGUF with ``llama.block_count`` patched
from 30 to 100000, which grew a load past 12 GB) and a Hugging Face directory whose
``config.json`` claims 100000 layers.
"""

from __future__ import annotations

import json
import queue
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pagedserve.model.loader import default_model_path
from tests.conftest import TinyFactory
from tests.server.conftest import (
    DEFAULT_REPOSITORY,
    MODEL,
    ServerHandle,
    is_final,
    llm_inputs,
    start_server,
)

pytestmark = pytest.mark.slow

# Peak resident memory the refused loads may add to the server (VmHWM, KiB).
MEMORY_BOUND_KIB = 512 * 1024
STREAM_TOKENS = 48


def _block_count_field(path: Path) -> tuple[int, int]:
    """Where ``llama.block_count``'s value is, and its width, by gguf's own reader."""
    reader = gguf.GGUFReader(path)
    part = reader.fields["llama.block_count"].parts[-1]
    base = reader.data.__array_interface__["data"][0]
    return part.__array_interface__["data"][0] - base, part.nbytes


def _lying_gguf(target: Path) -> None:
    shutil.copyfile(default_model_path(), target)
    offset, width = _block_count_field(target)
    with open(target, "r+b") as f:
        f.seek(offset)
        f.write((100000).to_bytes(width, "little"))


def _add_model(repo: Path, name: str, model: str) -> Path:
    """A model folder like the default one whose ``model.json`` points at ``model``."""
    version = repo / name / "1"
    version.mkdir(parents=True)
    shutil.copyfile(DEFAULT_REPOSITORY / MODEL / "config.pbtxt", repo / name / "config.pbtxt")
    settings = json.loads((DEFAULT_REPOSITORY / MODEL / "1" / "model.json").read_text())
    (version / "model.json").write_text(json.dumps({**settings, "model": model}))
    return version


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: TinyFactory
           ) -> Iterator[ServerHandle]:
    repo = tmp_path_factory.mktemp("lying-repository")
    shutil.copytree(DEFAULT_REPOSITORY / MODEL, repo / MODEL)
    _lying_gguf(_add_model(repo, "lying_gguf", "lying.gguf") / "lying.gguf")
    directory = _add_model(repo, "lying_config", "weights") / "weights"
    shutil.copytree(tiny_llama(num_heads=2, num_kv_heads=1, head_dim=32, intermediate=64),
                    directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100000}))
    handle = start_server(repo, "--model-control-mode", "explicit", "--load-model", MODEL)
    yield handle
    handle.stop()


def _peak_kib(server: ServerHandle) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:")))


@pytest.mark.parametrize(("model", "lie"), [
    ("lying_gguf", "lying.gguf: llama.block_count is 100000, but the file has tensors for 30 "
                   "blocks"),
    ("lying_config", "config.json gives 100000 layers, but the weights have tensors for 2"),
])
def test_the_lie_is_named_while_another_model_streams(server: ServerHandle, model: str,
                                                      lie: str) -> None:
    results: queue.Queue[Any] = queue.Queue()
    streaming = grpcclient.InferenceServerClient(server.grpc_url)
    streaming.start_stream(callback=lambda result, error: results.put(error or result))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        streaming.async_stream_infer(MODEL, llm_inputs(
            "Count to twenty:", STREAM_TOKENS, params={"ignore_eos": True},
            return_num_output_tokens=True))
        first = results.get(timeout=120)
        assert not isinstance(first, Exception), first
        peak = _peak_kib(server)
        with pytest.raises(InferenceServerException) as refused:
            client.load_model(model)
        assert lie in refused.value.message(), refused.value.message()
        assert "lying-repository" not in refused.value.message()  # no server path
        assert _peak_kib(server) - peak < MEMORY_BOUND_KIB
        assert not client.is_model_ready(model)
        # The stream went on to its last token.
        received, result = [first], first
        while not is_final(result):
            result = results.get(timeout=300)
            assert not isinstance(result, Exception), result
            received.append(result)
        assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in received) == STREAM_TOKENS
        assert client.is_model_ready(MODEL)
    finally:
        streaming.stop_stream()
        streaming.close()
        client.close()
