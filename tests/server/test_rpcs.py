"""Every RPC of the service through the official sync ``tritonclient.grpc`` client."""

from __future__ import annotations

import base64

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.server.conftest import MODEL, ServerHandle, llm_inputs

pytestmark = pytest.mark.slow


def test_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "7")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert "statistics" in meta.extensions and "model_repository" in meta.extensions
    model = client.get_model_metadata(MODEL)
    assert model.name == MODEL and model.versions == ["1"] and model.platform == "pagedserve"
    inputs = {t.name: (t.datatype, list(t.shape)) for t in model.inputs}
    assert inputs["text_input"] == ("BYTES", [1])
    assert inputs["stream"] == ("BOOL", [1])
    assert inputs["input_ids"] == ("INT64", [-1])
    outputs = {t.name: (t.datatype, list(t.shape)) for t in model.outputs}
    assert outputs["text_output"] == ("BYTES", [-1])
    assert outputs["num_input_tokens"] == ("UINT32", [1])


def test_model_config(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["name"] == MODEL
    assert config["backend"] == "pagedserve"
    assert config["model_transaction_policy"]["decoupled"] is True
    assert {i["name"] for i in config["input"]} >= {"text_input", "sampling_parameters"}


@pytest.mark.parametrize("call", ["get_model_metadata", "get_model_config"])
def test_unknown_model_is_not_found(client: grpcclient.InferenceServerClient, call: str) -> None:
    with pytest.raises(InferenceServerException) as e:
        getattr(client, call)("no_such_model")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'no_such_model' is not found" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        getattr(client, call)(MODEL, "9")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_unary_infer_on_decoupled_model_is_unimplemented(
        client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, llm_inputs("Hi", stream=False))
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    assert e.value.message() == ("ModelInfer RPC doesn't support models with decoupled "
                                 "transaction policy")


def test_statistics_count_requests(client: grpcclient.InferenceServerClient,
                                   server: ServerHandle) -> None:
    def stats() -> dict:
        return client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]

    before = stats()
    results = []
    client.start_stream(callback=lambda result, error: results.append((result, error)))
    client.async_stream_infer(MODEL, llm_inputs("One two three", max_tokens=3),
                              request_id="s1")
    client.stop_stream()  # waits for the request to finish
    assert all(error is None for _, error in results)
    after = stats()
    assert after["name"] == MODEL and after["version"] == "1"
    count = lambda s, k: int(s["inference_stats"][k].get("count", 0))  # noqa: E731
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert count(after, phase) == count(before, phase) + 1, phase
    assert int(after["inference_stats"]["queue"]["ns"]) > 0
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 1
    assert int(after["last_inference"]) > 0
    all_models = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [m["name"] for m in all_models] == [MODEL]
    samples = server.metrics()
    assert samples[f'nv_inference_request_success{{model="{MODEL}",version="1"}}'] >= 1


def test_repository_rpcs_in_none_mode(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": MODEL, "version": "1", "state": "READY"}]
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as e:
            call(MODEL)
        assert e.value.status() == "StatusCode.UNAVAILABLE"
        assert "not allowed" in e.value.message()


def test_shared_memory_rpcs(client: grpcclient.InferenceServerClient) -> None:
    assert not client.get_system_shared_memory_status(as_json=True)
    assert not client.get_cuda_shared_memory_status(as_json=True)
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory()
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory("r", "/key", 64)
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as e:
        client.register_cuda_shared_memory("r", base64.b64encode(b"handle"), 0, 64)
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"


def test_trace_settings(client: grpcclient.InferenceServerClient) -> None:
    settings = client.get_trace_settings(as_json=True)["settings"]
    assert settings["trace_level"]["value"] == ["OFF"]
    updated = client.update_trace_settings(settings={"trace_rate": "50"}, as_json=True)
    assert updated["settings"]["trace_rate"]["value"] == ["50"]
    model = client.update_trace_settings(MODEL, {"trace_level": ["TIMESTAMPS"]}, as_json=True)
    assert model["settings"]["trace_level"]["value"] == ["TIMESTAMPS"]
    assert client.get_trace_settings(as_json=True)["settings"]["trace_level"]["value"] == ["OFF"]
    with pytest.raises(InferenceServerException):
        client.update_trace_settings(settings={"no_such_setting": "1"})


def test_log_settings(client: grpcclient.InferenceServerClient) -> None:
    settings = client.get_log_settings().settings
    assert settings["log_info"].bool_param is True
    assert settings["log_format"].string_param == "default"
    updated = client.update_log_settings({"log_verbose_level": 1}).settings
    assert updated["log_verbose_level"].uint32_param == 1
    client.update_log_settings({"log_verbose_level": 0})
    # Triton ignores unknown keys.
    assert "no_such_setting" not in client.update_log_settings({"no_such_setting": True}).settings


def test_grpc_health_and_reflection(server: ServerHandle) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from pagedserve.protocol import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest()).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service=MODEL)).status == serving
        assert (health.Check(health_pb2.HealthCheckRequest(service="nope")).status
                == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]))))
        names = {s.name for s in reply.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_http_health_and_metrics(server: ServerHandle) -> None:
    assert server.http_get("/v2/health/live")[0] == 200
    assert server.http_get("/v2/health/ready")[0] == 200
    assert server.http_get("/nope")[0] == 404
    samples = server.metrics()
    key = f'{{model="{MODEL}",version="1"}}'
    assert samples["pagedserve_kv_blocks_total" + key] > 0
    for name in ("pagedserve_kv_blocks_used", "pagedserve_requests_running",
                 "pagedserve_requests_waiting", "pagedserve_preemptions_total",
                 "pagedserve_generation_tokens_total", "nv_inference_count"):
        assert name + key in samples


def test_request_parameters_carry_sampling_parameters(
        client: grpcclient.InferenceServerClient) -> None:
    """Without a sampling_parameters tensor, request parameters are the sampling parameters."""
    results = []
    client.start_stream(callback=lambda result, error: results.append((result, error)))
    inputs = [i for i in llm_inputs("Count: one, two,") if i.name() != "sampling_parameters"]
    client.async_stream_infer(MODEL, inputs, request_id="p1",
                              parameters={"max_tokens": 3, "temperature": "0"})
    client.stop_stream()
    assert all(e is None for _, e in results), results
    tokens = sum(1 for r, _ in results if r.as_numpy("text_output") is not None)
    assert 1 <= tokens <= 3
