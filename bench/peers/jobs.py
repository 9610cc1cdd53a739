"""What a peer runner reads and writes: a JSON job in, a JSON result out (standard library only).

A stream result has, per prompt, the generated token ids and when each arrived, in seconds after
the request was handed to the engine; a batch result the outputs and the wall time of each run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path
from typing import Any


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("job", type=Path, help="the job, JSON")
    parser.add_argument("out", type=Path, help="where to write the result, JSON")
    return parser.parse_args(argv)


def read_job(path: Path, fields: dict[str, type]) -> dict[str, Any]:
    """The job at ``path``, with each of ``fields`` present and of its type."""
    job = json.loads(path.read_text())
    if not isinstance(job, dict):
        raise ValueError(f"{path}: a job is a JSON object, got {type(job).__name__}")
    for name, kind in fields.items():
        if name not in job:
            raise ValueError(f"{path}: job field {name!r} is missing")
        value = job[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{path}: job field {name!r} must be {kind.__name__}, "
                             f"got {value!r}")
    if "prompts" in fields and not all(
            isinstance(p, list) and p and all(isinstance(t, int) for t in p)
            for p in job["prompts"]):
        raise ValueError(f"{path}: job field 'prompts' must be a list of non-empty lists of "
                         "token ids")
    return job


def package_versions(*packages: str) -> dict[str, str | None]:
    """The installed versions of ``packages`` in the running interpreter (None: absent)."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def stream_record(token_ids: list[int], token_times_s: list[float]) -> dict[str, Any]:
    """One prompt's stream: its tokens and their arrival times (seconds from submission)."""
    if len(token_ids) != len(token_times_s):
        raise ValueError(f"{len(token_ids)} tokens but {len(token_times_s)} arrival times")
    return {"token_ids": token_ids, "token_times_s": token_times_s}


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result) + "\n")
