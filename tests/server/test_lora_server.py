"""Multi-LoRA through the real server, against the offline engine.

A repository of a tiny random-weight Llama (fed text: SmolLM2's tokenizer and vocabulary) with
``enable_lora`` and a ``multi_lora.json`` of two PEFT adapters, a second model without LoRA, and
a third adapter attached with ``--lora-modules``. Each adapter's greedy text through gRPC (the
``lora_name`` sampling parameter), Triton's generate extension (a request parameter) and the
OpenAI API (``model``) equals ``LLM.generate(..., lora_request=...)`` and differs from the base
model's; unknown names get the vLLM backend's and vLLM's answers; runtime loads and unloads work
with ``--allow-runtime-lora-updating`` and are not found without it; bad ``multi_lora.json``
files fail their loads with messages that name the problem; and the server serves on after
every refusal.
"""

from __future__ import annotations

import json
import queue
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import tritonclient.grpc as grpcclient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from tritonclient.utils import InferenceServerException

from pagedserve import LLM, LoRARequest, SamplingParams
from tests.conftest import TinyFactory
from tests.prompts import TOKENIZER_VOCAB
from tests.server.conftest import ServerHandle, is_final, llm_inputs, start_server, text_of

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
MAX_TOKENS = 8
RANK = 8
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {"dtype": "float32", "kv_cache_memory_bytes": 8 * 2**20, "max_model_len": 256}
LORA = {**SETTINGS, "enable_lora": True, "max_loras": 2, "max_lora_rank": RANK}


def make_adapter(weights: Path, target: Path, seed: int) -> Path:
    """A PEFT adapter of every projection with non-zero ``lora_B``, saved to ``target``."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=MODULES,
                                            init_lora_weights=False))
    with torch.no_grad():  # peft's non-zero init is small: make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(4.0)
    model.save_pretrained(str(target))
    return target


def add_model(root: Path, name: str, model_json: dict[str, Any],
              multi_lora: dict[str, str] | list[str] | None = None) -> Path:
    version = root / name / "1"
    version.mkdir(parents=True)
    (root / name / "config.pbtxt").write_text('backend: "vllm"')
    (version / "model.json").write_text(json.dumps(model_json))
    if multi_lora is not None:
        (version / "multi_lora.json").write_text(json.dumps(multi_lora))
    return version


@dataclass
class Setup:
    weights: Path
    adapters: dict[str, Path]  # alpha, beta (multi_lora.json), gamma (runtime), delta (flag)
    offline: LLM

    def expected(self, adapter: str | None) -> str:
        lora = None
        if adapter is not None:
            lora = LoRARequest(adapter, 1 + sorted(self.adapters).index(adapter),
                               str(self.adapters[adapter]))
        out = self.offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                                    use_tqdm=False, lora_request=lora)
        return out[0].outputs[0].text


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_llama: TinyFactory) -> Setup:
    weights = tiny_llama(num_heads=2, num_kv_heads=1, head_dim=32, intermediate=64,
                         vocab_size=TOKENIZER_VOCAB)
    root = tmp_path_factory.mktemp("lora-repository")
    folder = root / "tiny" / "adapters"
    adapters = {name: make_adapter(weights, folder / name, seed)
                for seed, name in enumerate(("alpha", "beta", "gamma"), start=1)}
    adapters["delta"] = make_adapter(weights, tmp_path_factory.mktemp("operator") / "delta", 4)
    offline = LLM(model=str(weights), dtype="float32", kv_cache_bytes=8 * 2**20,
                  max_model_len=256, enable_lora=True, max_loras=2, max_lora_rank=RANK)
    return Setup(weights, adapters, offline)


@pytest.fixture(scope="module")
def repository(setup: Setup) -> Path:
    root = setup.adapters["alpha"].parents[2]
    add_model(root, "tiny", {**LORA, "model": str(setup.weights)},
              {"alpha": "../adapters/alpha", "beta": str(setup.adapters["beta"])})
    add_model(root, "plain", {**SETTINGS, "model": str(setup.weights)})
    return root


@pytest.fixture(scope="module")
def server(repository: Path, setup: Setup) -> Iterator[ServerHandle]:
    handle = start_server(repository, "--lora-modules", f"delta={setup.adapters['delta']}",
                          "--allow-runtime-lora-updating")
    yield handle
    assert handle.stop() == 0


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def stream_one(server: ServerHandle, model: str, inputs: list[Any],
               parameters: dict[str, Any] | None = None) -> str:
    """The whole text of one streamed request; raises the stream's error."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
    grpc_client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        grpc_client.async_stream_infer(model, inputs, parameters=parameters)
        text = ""
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise error
            text += text_of(result)
            if is_final(result):
                return text
    finally:
        grpc_client.stop_stream()
        grpc_client.close()


def post(server: ServerHandle, path: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(server.http_url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def grpc_text(server: ServerHandle, adapter: str | None, model: str = "tiny") -> str:
    params = {} if adapter is None else {"lora_name": adapter}
    return stream_one(server, model, llm_inputs(PROMPT, MAX_TOKENS, params=params))


def test_each_adapter_through_grpc_equals_the_offline_engine(server: ServerHandle,
                                                             setup: Setup) -> None:
    base = setup.expected(None)
    assert grpc_text(server, None) == base
    for adapter in ("alpha", "beta", "delta"):
        want = setup.expected(adapter)
        assert want != base, f"adapter {adapter} changes nothing"
        assert grpc_text(server, adapter) == want, adapter


def test_lora_name_as_a_request_parameter(server: ServerHandle, setup: Setup) -> None:
    # Without a sampling_parameters input, the request parameters are read (vLLM backend).
    inputs = [i for i in llm_inputs(PROMPT) if i.name() != "sampling_parameters"]
    text = stream_one(server, "tiny", inputs, {"lora_name": "beta", "temperature": 0,
                                               "max_tokens": MAX_TOKENS})
    assert text == setup.expected("beta")
    status, body = post(server, "/v2/models/tiny/generate", {
        "text_input": PROMPT, "exclude_input_in_output": True,
        "parameters": {"lora_name": "alpha", "temperature": 0, "max_tokens": MAX_TOKENS}})
    assert status == 200 and json.loads(body)["text_output"] == setup.expected("alpha")


def test_unknown_adapters_get_the_vllm_backends_answers(server: ServerHandle,
                                                        setup: Setup) -> None:
    supported = "['alpha', 'beta', 'delta']"
    with pytest.raises(InferenceServerException) as refused:
        grpc_text(server, "nope")
    assert refused.value.message() == \
        f"LoRA nope is not supported, we currently support {supported}"
    with pytest.raises(InferenceServerException) as refused:
        grpc_text(server, "alpha", model="plain")
    assert refused.value.message() == "LoRA feature is not enabled."
    status, body = post(server, "/v2/models/tiny/generate", {
        "text_input": PROMPT, "parameters": {"lora_name": "nope"}})
    assert (status, json.loads(body)) == (400, {
        "error": f"LoRA nope is not supported, we currently support {supported}"})
    status, body = post(server, "/v2/models/plain/generate", {
        "text_input": PROMPT, "parameters": {"lora_name": "alpha"}})
    assert (status, json.loads(body)) == (400, {"error": "LoRA feature is not enabled."})
    assert grpc_text(server, "alpha") == setup.expected("alpha")  # serving on


def test_openai_model_selects_the_adapter(client: openai.OpenAI, setup: Setup) -> None:
    for adapter in ("alpha", "delta"):
        got = client.completions.create(model=adapter, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                        temperature=0)
        assert got.choices[0].text == setup.expected(adapter) and got.model == adapter
    chunks = list(client.completions.create(model="beta", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == setup.expected("beta")
    assert {c.model for c in chunks} == {"beta"}
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                     temperature=0)
    assert base.choices[0].text == setup.expected(None) and base.model == "tiny"


def test_models_lists_each_adapter_with_its_parent(client: openai.OpenAI) -> None:
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"plain", "tiny", "alpha", "beta", "delta"}
    for adapter in ("alpha", "beta", "delta"):
        extra = cards[adapter].model_extra or {}
        assert extra["parent"] == "tiny" and extra["root"] == adapter
    assert (cards["tiny"].model_extra or {})["parent"] is None


def test_an_unknown_model_is_vllms_not_found(client: openai.OpenAI, server: ServerHandle,
                                             setup: Setup) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert refused.value.body == {"message": "The model `nope` does not exist.",
                                  "type": "NotFoundError", "param": "model", "code": 404}
    assert grpc_text(server, "beta") == setup.expected("beta")


def test_runtime_load_and_unload(server: ServerHandle, client: openai.OpenAI,
                                 setup: Setup) -> None:
    gamma = "tiny/adapters/gamma"  # relative paths start at the repository
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": gamma}) \
        == (200, "Success: LoRA adapter 'gamma' added successfully.")
    got = client.completions.create(model="gamma", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                    temperature=0)
    assert got.choices[0].text == setup.expected("gamma") != setup.expected(None)
    assert grpc_text(server, "gamma") == setup.expected("gamma")
    refusals = [
        ({"lora_name": "gamma", "lora_path": gamma}, 400, "InvalidUserInput",
         "The lora adapter 'gamma' has already been loaded. If you want to load the adapter in "
         "place, set 'load_inplace' to True."),
        ({"lora_name": "x"}, 400, "InvalidUserInput",
         "Both 'lora_name' and 'lora_path' must be provided."),
        ({"lora_name": "x", "lora_path": "tiny/adapters/none"}, 404, "NotFoundError",
         "Loading lora x failed: No adapter found for tiny/adapters/none"),
        ({"lora_name": "x", "lora_path": str(setup.adapters["delta"])}, 400, "InvalidUserInput",
         "'lora_path' must name a folder inside the model repository (relative paths start at "
         "the repository)"),
        ({"lora_name": "plain", "lora_path": gamma}, 400, "InvalidUserInput",
         "The lora adapter 'plain' is named like a model of the repository."),
        ({"lora_name": "x", "lora_path": "tiny"}, 400, "BadRequestError", None),  # no adapter
    ]
    for body, status, kind, message in refusals:
        code, text = post(server, "/v1/load_lora_adapter", body)
        error = json.loads(text)["error"]
        assert (code, error["type"], error["code"]) == (status, kind, status), (body, error)
        assert message is None or error["message"] == message, error
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": gamma,
                                                  "load_inplace": True})[0] == 200
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"}) == \
        (200, "Success: LoRA adapter 'gamma' removed successfully.")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt=PROMPT, max_tokens=2)
    code, text = post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"})
    assert (code, json.loads(text)["error"]["message"]) == \
        (404, "The lora adapter 'gamma' cannot be found.")
    code, text = post(server, "/v1/unload_lora_adapter", {})
    assert (code, json.loads(text)["error"]["message"]) == \
        (400, "'lora_name' needs to be provided to unload a LoRA adapter.")
    assert "gamma" not in {card.id for card in client.models.list().data}
    assert grpc_text(server, "alpha") == setup.expected("alpha")  # serving on


def test_metrics_show_lora_requests_info(server: ServerHandle) -> None:
    grpc_text(server, "alpha")
    _, page = server.http_get("/metrics")
    lines = [line for line in page.splitlines()
             if line.startswith("vllm:lora_requests_info{")]
    assert len(lines) == 1, lines  # one series per LoRA-enabled engine: its latest state
    assert 'model_name="tiny"' in lines[0] and 'max_lora="2"' in lines[0]
    assert 'running_lora_adapters=""' in lines[0] and 'waiting_lora_adapters=""' in lines[0]
    assert float(lines[0].rsplit(" ", 1)[1]) > 1e9  # the time of its update, as vLLM's


def test_bad_repositories_fail_clearly(repository: Path, setup: Setup,
                                       tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(repository / "tiny", root / "tiny")
    (root / "tiny" / "1" / "multi_lora.json").unlink()
    add_model(root, "escape", {**LORA, "model": str(setup.weights)},
              {"a": "../../../outside"})
    (tmp_path / "outside").mkdir()
    add_model(root, "notobject", {**LORA, "model": str(setup.weights)}, ["a"])
    add_model(root, "nolora", {**SETTINGS, "model": str(setup.weights)}, {"a": "."})
    handle = start_server(root, "--model-control-mode", "explicit", "--load-model", "tiny")
    grpc_client = grpcclient.InferenceServerClient(handle.grpc_url)
    try:
        for model, message in [
                ("escape", "1/multi_lora.json of model 'escape': adapter 'a' must name a folder "
                           "inside the model repository (relative paths start at the version "
                           "folder)"),
                ("notobject", "1/multi_lora.json of model 'notobject' is not a JSON object"),
                ("nolora", "1/multi_lora.json of model 'nolora' lists LoRA adapters, but LoRA is "
                           "not enabled: set \"enable_lora\": true in model.json (or the config "
                           "parameter enable_lora)")]:
            with pytest.raises(InferenceServerException) as refused:
                grpc_client.load_model(model)
            assert message in refused.value.message(), refused.value.message()
            assert str(tmp_path) not in refused.value.message()
        # Without --allow-runtime-lora-updating the routes are not found, as vLLM's.
        code, text = post(handle, "/v1/load_lora_adapter",
                          {"lora_name": "a", "lora_path": "tiny/adapters/alpha"})
        assert (code, json.loads(text)["error"]["message"]) == (404, "Not Found")
        assert grpc_text(handle, None) == setup.expected(None)  # serving on
        with pytest.raises(InferenceServerException, match="LoRA nope is not supported, we "
                                                           r"currently support \[\]"):
            grpc_text(handle, "nope")
    finally:
        grpc_client.close()
        assert handle.stop() == 0


def test_lora_modules_refuse_an_ambiguous_model(repository: Path, setup: Setup,
                                                tmp_path: Path) -> None:
    root = tmp_path / "two"
    for name in ("one", "two"):
        add_model(root, name, {**LORA, "model": str(setup.weights)})
    with pytest.raises(RuntimeError) as failed:
        start_server(root, "--lora-modules", f"delta={setup.adapters['delta']}")
    assert "exited with 2" in str(failed.value)
    assert ("error: --lora-modules: adapter 'delta': models one, two have LoRA enabled; name "
            "the model of each adapter") in str(failed.value)
