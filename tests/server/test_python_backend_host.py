"""``pagedserve triton``'s exit statuses, without starting Triton."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from pagedserve.python_backend import host


def test_exit_status_of_a_signalled_triton() -> None:
    assert host.exit_status(-signal.SIGTERM) == 128 + signal.SIGTERM
    assert host.exit_status(3) == 3
    assert host.exit_status(None) == 0


def test_start_up_failure_is_an_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def fail(self: host.TritonHost, timeout: float = 0.0) -> None:
        raise RuntimeError("tritonserver exited (1)")

    monkeypatch.setattr(host.TritonHost, "start", fail)
    assert host.main(["--model-repository", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: tritonserver exited (1)\n"


def test_no_repository_is_an_error_line(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def missing() -> Path:
        raise ValueError("no model repository found")

    monkeypatch.setattr(host, "default_repository", missing)
    assert host.main([]) == 2
    assert "error: no model repository found" in capsys.readouterr().err
