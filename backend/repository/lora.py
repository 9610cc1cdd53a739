"""The LoRA adapters a model version serves, and how a request names one.

A LoRA-enabled version (``enable_lora`` in its engine settings) owns an ``AdapterTable``: adapter
name -> ``LoRARequest``. It starts from ``<version>/multi_lora.json``, the Triton vLLM backend's
file (``{"<adapter name>": "<path>"}``; names in file order get ``lora_int_id`` 1, 2, ...), plus
the adapters ``--lora-modules`` attached to the model; the OpenAI door's runtime loads add to it
and its unloads take from it. Every door reads the same table: Triton's (``lora_name`` in
``sampling_parameters`` or the request parameters) and the OpenAI API's (``model``).

``multi_lora.json`` is checked at load, before any weights: a JSON object of at most
``MAX_ADAPTERS`` names to paths, ``MAX_FILE_BYTES`` at most, each path an existing folder inside
the model repository (relative paths start at the version folder; symlinks are resolved, so one
pointing out of the repository counts as outside). The adapters themselves are read lazily by
the engine, on first use. Messages name the file, the model and the adapter, never a server
path. Adapter names are 1 to ``MAX_NAME_CHARS`` printable characters without commas (the
``vllm:lora_requests_info`` labels join them with commas) and never a model's name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from pagedserve.config import EngineConfig
from pagedserve.lora_request import LoRARequest
from pagedserve.model.file_checks.json_object import parse_object
from pagedserve.repository.errors import RepositoryError
from pagedserve.repository.names import model_names, shown
from pagedserve.repository.paths import is_within

MULTI_LORA_FILE = "multi_lora.json"
MAX_FILE_BYTES = 1 << 20
MAX_ADAPTERS = 1024
MAX_NAME_CHARS = 256
# The Triton vLLM backend's answers (src/model.py, ``_verify_loras``), verbatim.
LORA_NOT_ENABLED = "LoRA feature is not enabled."
# How much of the supported list an answer quotes (a status message must fit gRPC's metadata).
_MAX_LIST_CHARS = 2048


class AdapterPathError(RepositoryError):
    """An adapter path refused: outside the repository, or (``missing``) no folder there."""

    def __init__(self, message: str, missing: bool) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)
        self.missing = missing


class UnknownLoRA(ValueError):
    """A request names an adapter its model version does not serve; the message is the vLLM
    backend's."""


def not_supported(name: object, supported: list[str]) -> str:
    """The vLLM backend's refusal of an adapter it does not serve, its list as Python prints it."""
    listed = str(supported)
    if len(listed) > _MAX_LIST_CHARS:
        listed = listed[:_MAX_LIST_CHARS] + f"... ({len(supported)} adapters)"
    return f"LoRA {shown(str(name))} is not supported, we currently support {listed}"


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an adapter, or None when it can."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > MAX_NAME_CHARS:
        return f"must be at most {MAX_NAME_CHARS} characters long"
    if "," in name or not name.isprintable():
        return "must hold printable characters only, no commas"
    return None


class AdapterTable:
    """The adapters of one model version, by name, in the order they were added.

    Ids are never reused within a table (an adapter loaded again under its name gets a new
    one), so an engine never takes one adapter's cached weights or prefix-cache blocks for
    another's. Changed on the event loop only.
    """

    def __init__(self, model: str, entries: Iterable[tuple[str, str]] = ()) -> None:
        self.model = model
        self._adapters: dict[str, LoRARequest] = {}
        self._next_id = 1
        for name, path in entries:
            self.add(name, path)

    def names(self) -> list[str]:
        return list(self._adapters)

    def get(self, name: str) -> LoRARequest | None:
        return self._adapters.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def new(self, name: str, path: str) -> LoRARequest:
        """Adapter ``name``, read from ``path``, under an id of its own; not added yet."""
        request = LoRARequest(name, self._next_id, path)
        self._next_id += 1
        return request

    def put(self, request: LoRARequest) -> None:
        """Adds ``request`` (made by ``new``), replacing an adapter of the same name."""
        self._adapters.pop(request.lora_name, None)  # a replacement goes to the end
        self._adapters[request.lora_name] = request

    def add(self, name: str, path: str) -> LoRARequest:
        """Adds (or replaces) adapter ``name``, read from ``path``, under a new id."""
        request = self.new(name, path)
        self.put(request)
        return request

    def remove(self, name: str) -> LoRARequest | None:
        return self._adapters.pop(name, None)


def lora_request_for(table: AdapterTable | None, name: Any) -> LoRARequest | None:
    """The adapter a request's ``lora_name`` selects (None: the base model); ``UnknownLoRA``
    with the vLLM backend's message when LoRA is off or the version does not serve it."""
    if name is None:
        return None
    if table is None:
        raise UnknownLoRA(LORA_NOT_ENABLED)
    found = table.get(name) if isinstance(name, str) else None
    if found is None:
        raise UnknownLoRA(not_supported(name, table.names()))
    return found


def _refuse(message: str) -> RepositoryError:
    return RepositoryError(grpc.StatusCode.INVALID_ARGUMENT, message)


def read_multi_lora(version_dir: Path, root: Path, model: str) -> list[tuple[str, str]] | None:
    """``(name, folder)`` of each adapter ``<version>/multi_lora.json`` lists, in file order,
    each folder resolved; None when the version has no such file. ``root`` is the repository.

    Raises ``RepositoryError`` (INVALID_ARGUMENT) naming the file, the model and the adapter.
    """
    where = f"{version_dir.name}/{MULTI_LORA_FILE} of model '{model}'"
    try:
        return _read_multi_lora(version_dir, root, model, where)
    except OSError as e:  # unreadable, removed meanwhile: said without the path
        raise _refuse(f"{where} cannot be read ({e.strerror or type(e).__name__})") from None


def _read_multi_lora(version_dir: Path, root: Path, model: str, where: str
                     ) -> list[tuple[str, str]] | None:
    path = version_dir / MULTI_LORA_FILE
    if not path.exists() and not path.is_symlink():
        return None
    if not is_within(path, version_dir.parent):
        raise _refuse(f"{where} resolves outside the model's folder")
    if not path.is_file():
        raise _refuse(f"{where} is not a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _refuse(f"{where} is {size} bytes long; at most {MAX_FILE_BYTES} are read")
    try:
        values = parse_object(path.read_bytes(), where)
    except ValueError as e:  # ModelFileError: not JSON, not an object, a key stated twice
        raise _refuse(str(e)) from None
    if len(values) > MAX_ADAPTERS:
        raise _refuse(f"{where} lists {len(values)} adapters; at most {MAX_ADAPTERS} are served")
    models = set(model_names(root))
    adapters: list[tuple[str, str]] = []
    for name, value in values.items():
        problem = name_problem(name)
        if problem is not None:
            raise _refuse(f"{where}: adapter name '{shown(name)}' {problem}")
        if name in models:
            raise _refuse(f"{where}: adapter '{shown(name)}' is named like a model of the "
                          "repository")
        if not isinstance(value, str) or not value:
            raise _refuse(f"{where}: the path of adapter '{shown(name)}' must be a non-empty "
                          f"string, got {shown(repr(value))}")
        adapters.append((name, confined_folder(value, version_dir, root,
                                               f"{where}: adapter '{shown(name)}'")))
    return adapters


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def confined_folder(value: str, base: Path, root: Path, what: str) -> str:
    """``value`` (relative: from ``base``) resolved, refused unless it is an existing folder
    inside ``root``, symlinks resolved; messages name ``what``, never the path."""
    try:
        given = Path(value)
        full = given if given.is_absolute() else base / given
    except (TypeError, ValueError):  # NUL bytes
        raise AdapterPathError(f"{what} names no valid path", missing=True) from None
    if not is_within(full, root):
        start = "the version folder" if base != root else "the repository"
        raise AdapterPathError(f"{what} must name a folder inside the model repository "
                               f"(relative paths start at {start})", missing=False)
    try:
        if not full.is_dir():
            raise AdapterPathError(f"{what} names no folder (an adapter is a folder of "
                                   "adapter_config.json and adapter_model.safetensors)",
                                   missing=True)
        # The folder's files are read later: a symlink among them must not lead out either.
        for file in ADAPTER_FILES:
            inside = full / file
            if (inside.exists() or inside.is_symlink()) and not is_within(inside, root):
                raise AdapterPathError(f"{what}: its {file} resolves outside the model "
                                       "repository", missing=False)
        return str(full.resolve())
    except OSError as e:
        raise AdapterPathError(f"{what} cannot be read ({e.strerror or type(e).__name__})",
                               missing=True) from None


def adapter_table(engine: EngineConfig, version_dir: Path, root: Path, model: str,
                  extra: Iterable[tuple[str, str]] = ()) -> AdapterTable | None:
    """The adapter table of a version with engine settings ``engine`` (None when LoRA is off):
    its ``multi_lora.json``, then ``extra`` (``--lora-modules``). A ``multi_lora.json`` without
    ``enable_lora`` fails the load."""
    entries = read_multi_lora(version_dir, root, model)
    if not engine.enable_lora:
        if entries is not None:
            raise _refuse(f"{version_dir.name}/{MULTI_LORA_FILE} of model '{model}' lists LoRA "
                          "adapters, but LoRA is not enabled: set \"enable_lora\": true in "
                          "model.json (or the config parameter enable_lora)")
        return None
    table = AdapterTable(model, entries or ())
    for name, path in extra:
        if name not in table:  # multi_lora.json's own entry wins
            table.add(name, path)
    return table
