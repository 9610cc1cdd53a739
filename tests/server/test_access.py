"""Triton's restricted protocols / APIs, and the server's limits.

Two servers: ``locked`` restricts every protocol group (under several keys) and HTTP health;
``limited`` restricts only model-repository and shared-memory, and runs with the default
message cap, a cap of 2 concurrent RPCs and a 1 s HTTP idle timeout.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pagedserve.protocol import grpc_service_pb2 as pb
from pagedserve.protocol import health_pb2 as hpb
from pagedserve.server.access import (
    GROUPS,
    GRPC_HEADER_PREFIX,
    GRPC_METHOD_GROUPS,
    parse_restrictions,
)
from tests.server.conftest import (
    DEFAULT_REPOSITORY,
    MODEL,
    ROOT,
    ServerHandle,
    free_port,
    is_final,
    llm_inputs,
    tensor,
)
from tests.server.test_tls import launch, stream_error, stream_text

slow = pytest.mark.slow  # every test that needs a server process (model load: ~10 s)

# group → (key, value) on the locked server; several groups share a key, as Triton allows.
# A value may hold ':' and '=': only the first of each splits the flag.
KEYS = {"health": ("health-key", "h-secret"), "metadata": ("meta-key", "m-secret"),
        "inference": ("infer-key", "i-secret"), "shared-memory": ("admin-key", "a-secret"),
        "model-config": ("admin-key", "a-secret"), "model-repository": ("repo-key", "r-secret"),
        "statistics": ("ops-key", "o:se=cret"), "trace": ("ops-key", "o:se=cret"),
        "logging": ("ops-key", "o:se=cret")}
HTTP_KEY = ("http-key", "h-http")

# One call per group through tritonclient, taking the request headers.
Call = Callable[[grpcclient.InferenceServerClient, dict[str, str] | None], Any]
CALLS: dict[str, Call] = {
    "health": lambda c, h: c.is_server_live(headers=h),
    "metadata": lambda c, h: c.get_server_metadata(headers=h),
    "inference": lambda c, h: stream_text(c, headers=h),
    "shared-memory": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "model-config": lambda c, h: c.get_model_config(MODEL, headers=h),
    "model-repository": lambda c, h: c.get_model_repository_index(headers=h),
    "statistics": lambda c, h: c.get_inference_statistics(MODEL, headers=h),
    "trace": lambda c, h: c.get_trace_settings(headers=h),
    "logging": lambda c, h: c.get_log_settings(headers=h),
}


def _header(group: str, value: str | None = None) -> dict[str, str]:
    key, right = KEYS[group]
    return {GRPC_HEADER_PREFIX + key: right if value is None else value}


def _refusal(group: str) -> str:
    return f"This protocol is restricted, expecting header '{GRPC_HEADER_PREFIX}{KEYS[group][0]}'"


@pytest.fixture(scope="module")
def locked() -> Iterator[ServerHandle]:
    by_key: dict[tuple[str, str], list[str]] = {}
    for group, key in KEYS.items():
        by_key.setdefault(key, []).append(group)
    args = [f"--grpc-restricted-protocol={','.join(groups)}:{key}={value}"
            for (key, value), groups in by_key.items()]
    handle = launch(DEFAULT_REPOSITORY, *args,
                    f"--http-restricted-api=health:{HTTP_KEY[0]}={HTTP_KEY[1]}")
    yield handle
    assert handle.stop() == 0


@pytest.fixture(scope="module")
def limited() -> Iterator[ServerHandle]:
    handle = launch(DEFAULT_REPOSITORY,
                    "--grpc-restricted-protocol=model-repository,shared-memory:admin-key=secret",
                    "--http-restricted-api=model-repository:admin-key=secret",
                    "--grpc-max-concurrent-rpcs", "2", "--http-idle-timeout", "1")
    yield handle
    assert handle.stop() == 0


@pytest.fixture
def locked_client(locked: ServerHandle) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(locked.grpc_url)
    yield client
    client.close()


def _http_get(server: ServerHandle, path: str, headers: dict[str, str] | None = None
              ) -> tuple[int, str]:
    request = urllib.request.Request(server.http_url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _refused(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value


# ---- gRPC: every group ---------------------------------------------------------------------


@slow
@pytest.mark.parametrize("group", GROUPS)
def test_restricted_group_needs_its_header(
        group: str, locked_client: grpcclient.InferenceServerClient) -> None:
    call = CALLS[group]
    other = next(g for g in GROUPS if KEYS[g][0] != KEYS[group][0])
    for headers in (None, _header(group, "wrong"), _header(other)):
        if group == "inference":
            error = stream_error(locked_client, headers)
        else:
            error = _refused(lambda h=headers: call(locked_client, h))
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert error.message() == _refusal(group)
    assert call(locked_client, _header(group))


@slow
def test_every_rpc_is_refused_without_its_groups_header(locked: ServerHandle) -> None:
    """Each RPC of the services, raw, refused before its request is even parsed."""
    with grpc.insecure_channel(locked.grpc_url) as channel:
        for method, group in GRPC_METHOD_GROUPS.items():
            if method.endswith("/ModelStreamInfer"):
                call = channel.stream_stream(method)
                def invoke(h: Any, call: Any = call) -> Any:
                    return list(call(iter([]), metadata=h, timeout=30))
            else:
                call = channel.unary_unary(method)
                def invoke(h: Any, call: Any = call) -> Any:
                    return call(b"", metadata=h, timeout=30)
            with pytest.raises(grpc.RpcError) as e:
                invoke(None)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, method
            assert e.value.details() == _refusal(group), method
            # With the header the RPC reaches the service (which may still refuse an empty
            # request for its own reasons, never for access).
            try:
                invoke(tuple(_header(group).items()))
            except grpc.RpcError as passed:
                assert passed.details() != _refusal(group), method


@slow
def test_unary_model_infer_is_inference(locked_client: grpcclient.InferenceServerClient
                                        ) -> None:
    inputs = llm_inputs("Hi", 1, stream=False)
    error = _refused(lambda: locked_client.infer(MODEL, inputs))
    assert (error.status(), error.message()) == ("StatusCode.UNAVAILABLE", _refusal("inference"))
    # Let through, it meets the service's own answer for a decoupled model.
    error = _refused(lambda: locked_client.infer(MODEL, inputs, headers=_header("inference")))
    assert error.status() == "StatusCode.UNIMPLEMENTED"


@slow
def test_grpc_health_service_is_health(locked: ServerHandle) -> None:
    with grpc.insecure_channel(locked.grpc_url) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=hpb.HealthCheckRequest.SerializeToString,
                                    response_deserializer=hpb.HealthCheckResponse.FromString)
        with pytest.raises(grpc.RpcError) as e:
            check(hpb.HealthCheckRequest(), timeout=30)
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAVAILABLE,
                                                       _refusal("health"))
        response = check(hpb.HealthCheckRequest(), metadata=tuple(_header("health").items()),
                         timeout=30)
        assert response.status == hpb.HealthCheckResponse.SERVING


# ---- HTTP ----------------------------------------------------------------------------------


@slow
def test_http_restricted_api_guards_health(locked: ServerHandle) -> None:
    # Triton's body: compact JSON.
    refusal = json.dumps({"error": f"This API is restricted, expecting header '{HTTP_KEY[0]}'"},
                         separators=(",", ":"))
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert _http_get(locked, path) == (403, refusal)
        assert _http_get(locked, path, {HTTP_KEY[0]: "wrong"}) == (403, refusal)
        # The gRPC form of the header is not the HTTP one.
        assert _http_get(locked, path, {GRPC_HEADER_PREFIX + HTTP_KEY[0]: HTTP_KEY[1]}
                         )[0] == 403
        assert _http_get(locked, path, {HTTP_KEY[0]: HTTP_KEY[1]}) == (200, "")
    assert _http_get(locked, "/metrics")[0] == 200  # Triton's metrics belong to no group


# ---- unrestricted groups and limits --------------------------------------------------------


@slow
def test_unrestricted_groups_stay_open(limited: ServerHandle) -> None:
    client = grpcclient.InferenceServerClient(limited.grpc_url)
    try:
        for group in ("health", "metadata", "inference", "model-config", "statistics",
                      "trace", "logging"):
            assert CALLS[group](client, None), group
        for group in ("model-repository", "shared-memory"):
            error = _refused(lambda g=group: CALLS[g](client, None))
            assert error.message() == ("This protocol is restricted, expecting header "
                                       f"'{GRPC_HEADER_PREFIX}admin-key'")
            assert CALLS[group](client, {GRPC_HEADER_PREFIX + "admin-key": "secret"})
    finally:
        client.close()
    assert _http_get(limited, "/v2/health/ready") == (200, "")  # HTTP health not restricted


@slow
def test_http_restricted_api_guards_every_route_of_its_group(limited: ServerHandle) -> None:
    """model-repository is restricted on HTTP: its routes need the header, others do not."""
    refusal = json.dumps({"error": "This API is restricted, expecting header 'admin-key'"},
                         separators=(",", ":"))

    def post(path: str, headers: dict[str, str]) -> tuple[int, str]:
        request = urllib.request.Request(limited.http_url + path, data=b"{}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    for path in ("/v2/repository/index", f"/v2/repository/models/{MODEL}/unload"):
        assert post(path, {}) == (403, refusal)
    status, body = post("/v2/repository/index", {"admin-key": "secret"})
    assert status == 200 and json.loads(body)[0]["name"] == MODEL
    assert _http_get(limited, f"/v2/models/{MODEL}/config")[0] == 200  # model-config: open


@slow
def test_message_cap_refuses_100mb_and_admits_10mb(limited: ServerHandle) -> None:
    client = grpcclient.InferenceServerClient(limited.grpc_url)
    try:
        # 10 MB passes the default 64 MiB cap and reaches the service (an unknown model here,
        # so the engine does no work).
        error = _refused(lambda: client.infer(
            "no_such_model", [tensor("text_input", b"x" * 10_000_000, "BYTES")]))
        assert error.status() != "StatusCode.RESOURCE_EXHAUSTED"
        assert "no_such_model" in error.message()
        error = _refused(lambda: client.infer(
            MODEL, [tensor("text_input", b"x" * 100_000_000, "BYTES")], client_timeout=120))
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "larger than max" in error.message()
        assert client.is_server_live()
        assert stream_text(client)
    finally:
        client.close()


def _open_stream(client: grpcclient.InferenceServerClient
                 ) -> queue.Queue[tuple[Any, InferenceServerException | None]]:
    results: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    with contextlib.suppress(InferenceServerException):  # a refused stream reports below
        client.async_stream_infer(MODEL, llm_inputs("Hello", 1), request_id="hold")
    return results


@slow
def test_concurrent_rpc_cap(limited: ServerHandle) -> None:
    clients = [grpcclient.InferenceServerClient(limited.grpc_url) for _ in range(4)]
    try:
        for client in clients[:2]:
            results = _open_stream(client)
            # A response proves the stream is running on the server; it stays open.
            while True:
                result, error = results.get(timeout=120)
                assert error is None, error
                if is_final(result):
                    break
        refused = _open_stream(clients[2])
        result, error = refused.get(timeout=120)
        assert error is not None and error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "Concurrent RPC limit exceeded" in error.message()
        error = _refused(lambda: clients[3].is_server_live())  # unary calls count too
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        for client in clients[:3]:
            client.stop_stream()
        # The server frees a slot when the RPC's task ends, just after the client sees the
        # stream close: poll (bounded) for it.
        deadline = time.monotonic() + 30
        while True:
            try:
                assert stream_text(clients[3])
                break
            except InferenceServerException as e:
                if e.status() != "StatusCode.RESOURCE_EXHAUSTED" or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert clients[3].is_server_live() and clients[0].is_server_live()
    finally:
        for client in clients:
            client.close()


@slow
def test_http_idle_connection_is_closed(limited: ServerHandle) -> None:
    for opening in (b"", b"GET /v2/health/live HTTP/1.1\r\n"):  # nothing, or half a request
        with socket.create_connection(("127.0.0.1", limited.http_port), timeout=60) as sock:
            sock.sendall(opening)
            started = time.monotonic()
            assert sock.recv(1024) == b""  # closed without an answer
            assert time.monotonic() - started < 30
    assert _http_get(limited, "/v2/health/live") == (200, "")


# ---- flag parsing (no server) --------------------------------------------------------------


def _parse_error(*specs: str, kind: str = "protocol") -> str:
    option = "grpc-restricted-protocol" if kind == "protocol" else "http-restricted-api"
    prefix = GRPC_HEADER_PREFIX if kind == "protocol" else ""
    with pytest.raises(ValueError) as e:
        parse_restrictions(specs, option, prefix, kind)
    return str(e.value)


def test_malformed_restriction_flags_are_refused_with_tritons_wording() -> None:
    for spec in ("health", "health:key", ":key=value", "health:=value", "health:key="):
        assert _parse_error(spec) == ("--grpc-restricted-protocol option format is "
                                      f"'<config name>:<setting>=<value>'. Got {spec}")
    assert _parse_error("health,bogus:k=v").startswith("unknown restricted protocol 'bogus'")
    assert _parse_error("inference:k=v", "metadata,inference:k2=v2") == \
        "restricted protocol 'inference' can not be specified in multiple config groups"
    assert _parse_error("health,health:k=v") == \
        "restricted protocol 'health' can not be specified in multiple config groups"
    assert _parse_error("trace:k=v", "trace:k=v", kind="api") == \
        "restricted api 'trace' can not be specified in multiple config groups"
    assert _parse_error("metrics:k=v", kind="api").startswith("unknown restricted api 'metrics'")
    assert "restricted key 'a b'" in _parse_error("health:a b=v")
    assert "restricted key 'key-bin'" in _parse_error("health:key-bin=v")  # binary gRPC header
    assert "printable ASCII" in _parse_error("health:key= v")


def test_restriction_flags_parse_as_tritons() -> None:
    parsed = parse_restrictions(["health,metadata:Admin-Key=a:b=c", "inference:k=v"],
                                "grpc-restricted-protocol", GRPC_HEADER_PREFIX, "protocol")
    assert set(parsed) == {"health", "metadata", "inference"}
    assert parsed["health"] == parsed["metadata"]
    assert parsed["health"].header == "triton-grpc-protocol-admin-key"  # lower case, as sent
    assert parsed["health"].value == "a:b=c"
    assert parsed["health"].allows("a:b=c") and not parsed["health"].allows("a:b")
    assert not parsed["health"].allows(None)
    http = parse_restrictions(["health:key-bin=v"], "http-restricted-api", "", "api")
    assert http["health"].header == "key-bin"


def test_every_rpc_has_its_tritons_group() -> None:
    services = [pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                hpb.DESCRIPTOR.services_by_name["Health"]]
    methods = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    assert set(GRPC_METHOD_GROUPS) == methods
    assert set(GRPC_METHOD_GROUPS.values()) == set(GROUPS)


def test_a_malformed_flag_stops_the_server() -> None:
    command = [sys.executable, "-m", "pagedserve", "serve", "--host", "127.0.0.1",
               "--grpc-port", str(free_port()), "--http-port", "0", "--metrics-port", "0",
               "--grpc-restricted-protocol=health", "--grpc-restricted-protocol=nope:k=v"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert ("error: --grpc-restricted-protocol option format is "
            "'<config name>:<setting>=<value>'. Got health") in done.stderr
