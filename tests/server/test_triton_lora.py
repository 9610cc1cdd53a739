"""Real Triton hosting our engine honours the repository's LoRA files as our server does:
``enable_lora`` in ``model.json``, ``multi_lora.json`` in the version folder, and the
``lora_name`` sampling parameter, with the vLLM backend's answer for an unknown name."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
from tritonclient.utils import InferenceServerException

from pagedserve.python_backend.host import Ports, TritonHost
from tests.server.conftest import DEFAULT_REPOSITORY, MODEL, free_port, llm_inputs
from tests.server.test_lora_server import (  # noqa: F401 (the fixture)
    LORA,
    MAX_TOKENS,
    PROMPT,
    Setup,
    setup,
    stream_one,
)

pytestmark = pytest.mark.slow  # a tritonserver process hosting our engine


class _Url:
    """What ``stream_one`` reads of a server: its gRPC address."""

    def __init__(self, grpc_url: str) -> None:
        self.grpc_url = grpc_url


@pytest.fixture(scope="module")
def triton(setup: Setup, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
           ) -> Iterator[_Url]:
    root = tmp_path_factory.mktemp("triton-lora")
    version = root / "tiny" / "1"
    version.mkdir(parents=True)
    shutil.copyfile(DEFAULT_REPOSITORY / MODEL / "config.pbtxt", root / "tiny" / "config.pbtxt")
    for name in ("alpha", "beta"):
        shutil.copytree(setup.adapters[name], version / "adapters" / name)
    (version / "model.json").write_text(json.dumps({**LORA, "model": str(setup.weights)}))
    (version / "multi_lora.json").write_text(json.dumps({"alpha": "adapters/alpha",
                                                         "beta": "adapters/beta"}))
    host = TritonHost(root, Ports(grpc=free_port(), metrics=free_port()),
                      ["--model-control-mode=explicit", "--load-model=tiny"])
    host.start()
    yield _Url(host.grpc_url)
    host.stop()


def test_each_adapter_through_real_triton_equals_the_offline_engine(
        triton: _Url, setup: Setup) -> None:  # noqa: F811
    texts = {}
    for adapter in ("alpha", "beta", None):
        params = {} if adapter is None else {"lora_name": adapter}
        texts[adapter] = stream_one(triton, "tiny", llm_inputs(PROMPT, MAX_TOKENS,
                                                               params=params))
        assert texts[adapter] == setup.expected(adapter), adapter
    assert texts["alpha"] != texts[None] and texts["beta"] != texts[None]


def test_an_unknown_adapter_gets_the_vllm_backends_answer(triton: _Url) -> None:
    with pytest.raises(InferenceServerException,
                       match=r"LoRA nope is not supported, we currently support "
                             r"\['alpha', 'beta'\]"):
        stream_one(triton, "tiny", llm_inputs(PROMPT, MAX_TOKENS,
                                              params={"lora_name": "nope"}))
    assert stream_one(triton, "tiny", llm_inputs(PROMPT, MAX_TOKENS)) is not None
