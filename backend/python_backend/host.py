"""Real ``tritonserver`` from the ``nvidia-pytriton`` wheel, hosting a repository with our backend.

The wheel (installed with ``--no-deps``: its declared ``tritonclient~=2.50`` would replace our
client) ships Triton 2.51's server binary, its Python backend and per-version stubs; all run on
a CPU. This module lays out a backend folder: Triton's ``python`` backend with the stub for this
interpreter beside ``libtriton_python.so`` (where Triton looks for it), and the Python-based
backend ``pagedserve`` (a ``model.py`` importing ``pagedserve.python_backend.model``). It starts
the server on loopback with that folder as ``--backend-directory`` and waits until it is ready::

    python -m pagedserve.python_backend.host --model-repository model_repository   # or
    pagedserve triton --model-repository model_repository

The stub embeds libpython and imports packages as the ``python3`` first on ``PATH`` sees them,
so this interpreter's ``bin`` leads ``PATH``, its own ``lib`` (``libpython3.x.so``) leads
``LD_LIBRARY_PATH`` before the wheel's bundled libraries: the stub finds ``pagedserve`` where
this interpreter does (installed, or a checkout installed editable by ``make setup``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from pagedserve.repository.default import default_repository

BACKEND_NAME = "pagedserve"
SHIM = ('"""pagedserve\'s engine as a Triton Python-based backend '
        '(written by pagedserve.python_backend.host)."""\n\n'
        "from pagedserve.python_backend.model import TritonPythonModel  # noqa: F401\n")


def wheel_dirs() -> tuple[Path, Path]:
    """The wheel's ``pytriton/tritonserver`` folder and its bundled ``nvidia_pytriton.libs``."""
    site = Path(sysconfig.get_paths()["purelib"])
    server = site / "pytriton" / "tritonserver"
    if not (server / "bin" / "tritonserver").exists():
        raise RuntimeError(f"no tritonserver under {server}: pip install --no-deps "
                           "nvidia-pytriton==0.7.0 (make setup-dev does)")
    return server, site / "nvidia_pytriton.libs"


def tritonserver_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment under which the Python-backend stub imports this interpreter's packages,
    ``pagedserve`` among them (see the module docstring)."""
    _, libs = wheel_dirs()
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    lib_path = [str(sysconfig.get_config_var("LIBDIR")), str(libs)]
    if env.get("LD_LIBRARY_PATH"):
        lib_path.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_path)
    return env


def make_backend_directory(dest: Path) -> Path:
    """Writes ``dest/python`` (Triton's Python backend and this interpreter's stub) and
    ``dest/pagedserve/model.py``; returns ``dest``, the ``--backend-directory``."""
    server, _ = wheel_dirs()
    python = dest / "python"
    shutil.copytree(server / "backends" / "python", python,
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    stub = (server / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
            / "triton_python_backend_stub")
    if not stub.exists():
        raise RuntimeError(f"the wheel has no Python-backend stub for this interpreter ({stub})")
    shutil.copy2(stub, python)
    (dest / BACKEND_NAME).mkdir(parents=True, exist_ok=True)
    (dest / BACKEND_NAME / "model.py").write_text(SHIM)
    return dest


@dataclass
class Ports:
    grpc: int
    http: int = 0  # 0: HTTP off
    metrics: int = 0  # 0: metrics off


class TritonHost:
    """``tritonserver`` serving ``repository`` on loopback, with our backend available."""

    def __init__(self, repository: Path, ports: Ports, extra_args: Sequence[str] = (),
                 log_path: Path | None = None) -> None:
        self.repository = repository
        self.ports = ports
        self.extra_args = list(extra_args)
        self._workdir = Path(tempfile.mkdtemp(prefix="pagedserve-triton-"))
        self.log_path = log_path or self._workdir / "tritonserver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def command(self) -> list[str]:
        server, _ = wheel_dirs()
        backends = make_backend_directory(self._workdir / "backends")
        http = (["--allow-http=true", "--http-address=127.0.0.1",
                 f"--http-port={self.ports.http}"] if self.ports.http else ["--allow-http=false"])
        metrics = (["--allow-metrics=true", "--metrics-address=127.0.0.1",
                    f"--metrics-port={self.ports.metrics}"] if self.ports.metrics
                   else ["--allow-metrics=false"])
        return [str(server / "bin" / "tritonserver"), f"--model-repository={self.repository}",
                f"--backend-directory={backends}", "--grpc-address=127.0.0.1",
                f"--grpc-port={self.ports.grpc}", *http, *metrics,
                "--allow-gpu-metrics=false", "--exit-timeout-secs=10", *self.extra_args]

    def start(self, timeout: float = 300.0) -> None:
        """Starts the server and waits until it is ready (every model it loads is READY)."""
        command = self.command()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         env=tritonserver_env())
        try:
            wait_ready(self.grpc_url, timeout, self.proc)
        except RuntimeError as e:
            output = self.log()  # before stop() removes the folder that holds it
            self.stop()
            raise RuntimeError(f"{e}\n{output}") from None

    def log(self) -> str:
        """The server's output so far (the last 8000 characters)."""
        return self.log_path.read_text(errors="replace")[-8000:]

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 30 s; removes the private folder. Returns the status."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._workdir, ignore_errors=True)
        return None if self.proc is None else self.proc.returncode


def wait_ready(url: str, timeout: float = 120.0,
               proc: subprocess.Popen[bytes] | None = None) -> None:
    """Waits until the gRPC server at ``url`` (Triton or ours) reports ready: all models loaded.
    Fails early if ``proc`` exits."""
    import tritonclient.grpc as grpcclient  # a client, only needed by whoever waits

    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode})")
            try:
                if client.is_server_ready():
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
    finally:
        client.close()
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", type=Path,
                        help="default: the checkout's model_repository/, or the installed copy")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000, help="0 disables")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 disables")
    parser.add_argument("tritonserver_args", nargs="*",
                        help="more tritonserver flags, after --")


def exit_status(returncode: int | None) -> int:
    """A child's status as a shell reports it: 128 + N for one killed by signal N."""
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode


def run(args: argparse.Namespace) -> int:
    """Serves in the foreground until SIGTERM or SIGINT; the exit status is Triton's."""
    host = TritonHost((args.model_repository or default_repository()).resolve(),
                      Ports(args.grpc_port, args.http_port, args.metrics_port),
                      args.tritonserver_args)
    try:
        host.start()
    except RuntimeError as e:  # no wheel, or Triton died or hung starting: its log says why
        host.stop()
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"tritonserver ready: grpc {host.grpc_url}, log {host.log_path}", flush=True)

    def forward(signum: int, _frame: FrameType | None) -> None:
        assert host.proc is not None
        host.proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    assert host.proc is not None
    host.proc.wait()
    return exit_status(host.stop())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedserve.python_backend.host",
                                     description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as e:  # no repository given and none found
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
