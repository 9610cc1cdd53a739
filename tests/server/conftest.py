"""The server under test, run as a subprocess on free loopback ports.

``start_server(repo_dir, *extra_args)`` is the reusable helper (the parity tests start real
Triton the same way); the session-scoped ``server`` fixture (``tests/conftest.py``, shared by
every module that needs the default repository unchanged) serves ``DEFAULT_REPOSITORY``: the
repo's own ``model_repository/`` with its reference model ``smollm2`` alone (most tests talk to
one model, and every server they start loads all it finds; ``CHECKOUT_REPOSITORY``, with the
fast ``smollm2-gguf`` beside it, has tests of its own). Tests talk to it only through the
official ``tritonclient``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import triton_to_np_dtype

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT_REPOSITORY = ROOT / "model_repository"  # what `serve` serves when given no repository
MODEL = "smollm2"
FAST_MODEL = "smollm2-gguf"


def _reference_repository() -> Path:
    """A copy of the checkout's repository holding ``smollm2`` alone, named by its content
    (so a changed file makes a new copy) and made atomically (test workers start at once)."""
    files = sorted(p for p in (CHECKOUT_REPOSITORY / MODEL).rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(CHECKOUT_REPOSITORY)).encode() + b"\0"
                      + path.read_bytes())
    target = Path(tempfile.gettempdir()) / f"pagedserve-test-repository-{digest.hexdigest()[:16]}"
    if not target.exists():
        scratch = Path(tempfile.mkdtemp(prefix="pagedserve-test-repository-"))
        shutil.copytree(CHECKOUT_REPOSITORY / MODEL, scratch / MODEL)
        try:
            scratch.rename(target)
        except OSError:  # another worker made it first
            shutil.rmtree(scratch, ignore_errors=True)
    return target


DEFAULT_REPOSITORY = _reference_repository()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerHandle:
    """A running ``python -m pagedserve serve``; ``stop()`` sends SIGTERM and returns the status."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples by ``name{labels}``."""
        _, text = self.http_get("/metrics")
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
        return samples

    def stop(self, timeout: float = 60) -> int:
        if not self._stopped:
            self._stopped = True
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def add_default_model(root: Path, name: str, settings: dict[str, Any],
                      decoupled: bool = True, config: str | None = None) -> Path:
    """A model folder ``root/name`` serving the embedded model as ``model_repository/`` does:
    its ``config.pbtxt`` (unary when not ``decoupled``; ``config`` replaces it whole) and
    ``1/model.json`` of ``settings``. Returns the folder."""
    folder = root / name
    (folder / "1").mkdir(parents=True)
    if config is None:
        config = (DEFAULT_REPOSITORY / MODEL / "config.pbtxt").read_text()
        assert "decoupled: true" in config
        if not decoupled:
            config = config.replace("decoupled: true", "decoupled: false")
    (folder / "config.pbtxt").write_text(config)
    (folder / "1" / "model.json").write_text(json.dumps(settings))
    return folder


def start_server(repo_dir: str | Path, *extra_args: str, timeout: float = 180,
                 env: dict[str, str] | None = None, probe: bool = True,
                 code: str | None = None) -> ServerHandle:
    """Starts the server on free loopback ports and waits until it is live; ``env`` adds
    variables to its environment. Without ``probe`` it is ready once its log shows the gRPC
    port started: a plaintext, header-less liveness probe is refused by a TLS port or a
    restricted health group, by design. ``code`` runs instead of ``-m pagedserve`` (with the
    command line in ``sys.argv[1:]``): a server with a fault injected."""
    grpc_port, http_port = free_port(), free_port()
    log_path = Path(tempfile.mkstemp(prefix="pagedserve-", suffix=".log")[1])
    program = ["-m", "pagedserve"] if code is None else ["-c", code]
    command = [sys.executable, *program, "serve", "--model-repository", str(repo_dir),
               "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
               "--http-port", str(http_port), "--metrics-port", str(http_port), *extra_args]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    handle = ServerHandle(process, grpc_port, http_port, log_path)
    client = grpcclient.InferenceServerClient(handle.grpc_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{handle.log()}")
        try:
            started = "Started GRPCInferenceService" in handle.log()
            if started and (not probe or client.is_server_live()):
                client.close()
                return handle
        except Exception:
            pass
        time.sleep(0.2)
    handle.stop()
    raise RuntimeError(f"server did not start in {timeout} s:\n{handle.log()}")


@pytest.fixture
def client(server: ServerHandle) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


# ---- request building ----------------------------------------------------------------------


def tensor(name: str, value: Any, datatype: str) -> grpcclient.InferInput:
    values = value if isinstance(value, list) else [value]
    array = np.array(values, dtype=triton_to_np_dtype(datatype))
    if datatype == "BYTES":
        array = np.array([v if isinstance(v, bytes) else str(v).encode() for v in array],
                         dtype=np.object_)
    item = grpcclient.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def llm_inputs(prompt: str | bytes | None, max_tokens: int = 8, stream: bool = True,
               params: dict[str, Any] | None = None, **flags: Any) -> list[Any]:
    """Inputs of a vLLM-backend request: greedy ``max_tokens`` unless ``params`` says else."""
    inputs = []
    if prompt is not None:
        inputs.append(tensor("text_input", prompt, "BYTES"))
    inputs.append(tensor("stream", stream, "BOOL"))
    sampling = {"temperature": 0, "max_tokens": max_tokens, **(params or {})}
    inputs.append(tensor("sampling_parameters", json.dumps(sampling), "BYTES"))
    for name, value in flags.items():
        inputs.append(tensor(name, value, "BOOL"))
    return inputs


def is_final(result: Any) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)


def text_of(result: Any) -> str:
    out = result.as_numpy("text_output")
    return "" if out is None else "".join(x.decode() for x in out.reshape(-1))
