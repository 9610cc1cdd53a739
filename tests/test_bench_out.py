"""Where ``pagedserve bench`` writes its result by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.bench.throughput import default_out


@pytest.mark.parametrize("marker", [".git", "pyproject.toml"])
def test_checkout_writes_under_bench_results(tmp_path: Path, marker: str) -> None:
    (tmp_path / marker).touch()
    assert default_out(tmp_path / "bench") == tmp_path / "bench" / "results" / "throughput.json"


def test_installed_writes_to_the_current_directory(tmp_path: Path) -> None:
    site_packages = tmp_path / "lib" / "python3.11" / "site-packages"
    assert default_out(site_packages / "pagedserve" / "bench") == Path("throughput.json")
