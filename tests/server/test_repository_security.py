"""Hostile model names and load overrides: nothing outside the repository is read or served.

The class of CVE-2023-31036 (path traversal through Triton's model load API) and CVE-2025-23316
(the model name in model control APIs). Every repository here sits next to a *decoy*: a valid
model folder outside the repository, with a seed (unit tests) or a backend name (the server
test) that would show if it were ever reached. Names are plain: only the repository folder's own
entries exist, and everything else gets Triton 2.51's answer for an unknown model, verbatim
whatever exists on disk (what Triton 2.51 answers for these names, checked against it):

* RepositoryModelLoad: ``INTERNAL "failed to load '<m>', failed to poll from model repository"``
* RepositoryModelUnload: OK (nothing to unload)
* ModelConfig / ModelMetadata: ``NOT_FOUND "Request for unknown model: '<m>' is not found"``
* ModelReady: ``ready: false``; ModelStatistics: ``INVALID_ARGUMENT "requested model '<m>' is
  not available"``

Quoted names are bounded (64 characters) and escaped (control and format characters).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import queue
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pagedserve import LLM
from pagedserve.config import EngineConfig
from pagedserve.model.loader import LoadedModel
from pagedserve.model.runner import kv_cache_limit_bytes
from pagedserve.repository import ModelRepository, RepositoryError
from pagedserve.repository.engine_args import engine_config
from pagedserve.repository.errors import MAX_MESSAGE_CHARS, bounded, hide_paths
from pagedserve.repository.model_config import load_config
from pagedserve.repository.names import MAX_NAME_BYTES, SHOWN_CHARS, model_names, shown
from tests.server.conftest import (
    DEFAULT_REPOSITORY,
    ServerHandle,
    is_final,
    llm_inputs,
    start_server,
    text_of,
)
from tests.server.test_repository import _model, _StubEngine

DECOY_SEED = 4242
TERABYTE = 2**40

# Names that must all be "unknown model". ``{decoy}`` / ``{repo}`` stand for absolute paths.
HOSTILE_NAMES = [
    "..", ".", "../decoy", "../repo/tiny", "tiny/../../decoy", "tiny/..", "/proc/self",
    "/proc/self/cwd", "/proc/self/root/etc", "/etc", "/", "{decoy}", "{repo}/tiny", "{repo}",
    "", "tiny/", "./tiny", "tiny/1", "tiny//", "tiny\\", "..\\decoy", "C:\\decoy",
    "tiny\x00", "\x00", "..\x00", "%2e%2e", "%2e%2e%2fdecoy", "..%2fdecoy", "tiny%2f", "~",
    "\u2024\u2024",  # ONE DOT LEADER twice: looks like ".."
    "\uff0e\uff0e",  # FULLWIDTH FULL STOP twice (NFKC: "..")
    "\uff54\uff49\uff4e\uff59",  # fullwidth "tiny" (NFKC: "tiny")
    "t\u0456ny",  # Cyrillic i
    "TINY", "tiny ", " tiny", "tiny\u200b", "tiny\n", "\u202etiny",
    ".hidden", "escape", "notadir", "missing", "x" * (MAX_NAME_BYTES + 1),
    "\x1b[31mred\x1b[0m",
]


def _name(template: str, layout: Layout) -> str:
    return template.replace("{decoy}", str(layout.decoy)).replace("{repo}", str(layout.repo))


@dataclass
class _Recorder:
    """An engine factory that records every config it was asked to build."""

    configs: list[EngineConfig] = field(default_factory=list)

    def __call__(self, config: EngineConfig, observers: Any = ()) -> tuple[Any, Any]:
        self.configs.append(config)
        return _StubEngine(config), None

    @property
    def seeds(self) -> list[int]:
        return [c.seed for c in self.configs]


@dataclass
class Layout:
    tmp: Path
    repo: Path
    decoy: Path  # a valid model folder outside the repository (seed DECOY_SEED)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    repo = tmp_path / "repo"
    _model(repo, "tiny", [1], model_json={"seed": 1})
    _model(repo, ".hidden", [1], model_json={"seed": 2})
    decoy = _model(tmp_path, "decoy", [1], model_json={"seed": DECOY_SEED})
    (repo / "escape").symlink_to(decoy, target_is_directory=True)
    (repo / "notadir").write_text("not a model")
    return Layout(tmp_path, repo, decoy)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _load_error(repo: ModelRepository, name: str, override: str | None = None
                ) -> RepositoryError:
    with pytest.raises(RepositoryError) as e:
        _run(repo.load(name, override))
    return e.value


def _override(**parameters: str) -> str:
    return json.dumps({"backend": "vllm",
                       "parameters": {k: {"string_value": v} for k, v in parameters.items()}})


# ---- quoting -------------------------------------------------------------------------------


def test_shown_names_are_bounded_and_escaped() -> None:
    assert shown("smollm2") == "smollm2" and shown("modèle") == "modèle"
    assert shown("a\nb\x00c\x1b") == "a\\nb\\x00c\\x1b"
    assert shown("\u202etiny\u200b") == "\\u202etiny\\u200b"
    assert shown("back\\slash") == "back\\\\slash"
    huge = shown("x" * 2**20)
    assert huge == "x" * SHOWN_CHARS + "..."
    assert all(c.isprintable() for c in shown("".join(map(chr, range(0x300)))))


# ---- names ---------------------------------------------------------------------------------


def test_only_the_repository_entries_are_models(layout: Layout) -> None:
    # Hidden folders, files and a symlink out of the repository are not models.
    assert model_names(layout.repo) == ["tiny"]
    (layout.repo / "alias").symlink_to(layout.repo / "tiny", target_is_directory=True)
    assert model_names(layout.repo) == ["alias", "tiny"]  # a link inside the repository is fine


@pytest.mark.parametrize("template", HOSTILE_NAMES)
def test_hostile_name_is_an_unknown_model_everywhere(layout: Layout, template: str) -> None:
    name = _name(template, layout)
    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    error = _load_error(repo, name)
    assert (error.code, error.message) == (
        grpc.StatusCode.INTERNAL,
        f"failed to load '{shown(name)}', failed to poll from model repository")
    _run(repo.unload(name))  # Triton: nothing to unload is success
    with pytest.raises(RepositoryError) as lookup:
        repo.get(name)
    assert (lookup.value.code, lookup.value.message) == (
        grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{shown(name)}' is not found")
    assert recorder.configs == []
    assert repo.index() == [("tiny", "", "", "")]  # no state was made for the name


def test_a_megabyte_name_is_quoted_short(layout: Layout) -> None:
    repo = ModelRepository(layout.repo, "explicit", engine_factory=_Recorder())
    error = _load_error(repo, "n" * 2**20)
    assert len(error.message) < 200


def test_answers_do_not_depend_on_the_disk(layout: Layout) -> None:
    """A traversal to something that exists and to something that does not read alike."""
    repo = ModelRepository(layout.repo, "explicit", engine_factory=_Recorder())
    pairs = [("../decoy", "../nodecoy"), (str(layout.decoy), str(layout.tmp / "nodecoy")),
             ("/proc/self", "/proc/nothing"), ("escape", "nothing"), (".hidden", ".nothing")]
    for there, absent in pairs:
        a, b = _load_error(repo, there), _load_error(repo, absent)
        assert a.code == b.code
        assert a.message.replace(shown(there), "<m>") == b.message.replace(shown(absent), "<m>")


def test_hostile_loads_read_nothing_outside_the_repository(
        layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file opened and folder listed while loading hostile names is the repository's."""
    seen: list[str] = []
    real_open, real_listdir, real_scandir = io.open, os.listdir, os.scandir

    def recording_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | bytes | os.PathLike):
            seen.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    def recording_listdir(path: Any = ".") -> list[Any]:
        seen.append(os.fsdecode(path))
        return real_listdir(path)

    def recording_scandir(path: Any = ".") -> Any:
        seen.append(os.fsdecode(path))
        return real_scandir(path)

    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    names = [_name(t, layout) for t in HOSTILE_NAMES]
    monkeypatch.setattr(io, "open", recording_open)
    monkeypatch.setattr("builtins.open", recording_open)
    monkeypatch.setattr(os, "listdir", recording_listdir)
    monkeypatch.setattr(os, "scandir", recording_scandir)
    for name in names:
        with pytest.raises(RepositoryError):
            _run(repo.load(name))
    _run(repo.load("tiny"))  # the real one still loads, reading its own files
    monkeypatch.undo()
    root = layout.repo.resolve()
    assert str(layout.repo / "tiny" / "config.pbtxt") in seen  # the recording works
    outside = [p for p in seen if not Path(p).resolve().is_relative_to(root)]
    assert outside == []
    assert recorder.seeds == [1]


def test_duplicate_spellings_load_one_engine(layout: Layout) -> None:
    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    _run(repo.load("tiny"))
    for alias in ("./tiny", "tiny/", "tiny/.", "../repo/tiny", str(layout.repo / "tiny")):
        assert _load_error(repo, alias).code == grpc.StatusCode.INTERNAL
    assert len(recorder.configs) == 1
    assert [row[0] for row in repo.index()] == ["tiny"]


def test_symlinked_model_folder_out_of_the_repository_is_refused(layout: Layout) -> None:
    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    escaped = _load_error(repo, "escape")
    missing = _load_error(repo, "missing")
    assert escaped.code == missing.code
    assert escaped.message == missing.message.replace("missing", "escape")
    # Poll mode does not pick it up either.
    polled = ModelRepository(layout.repo, "poll", engine_factory=recorder)
    _run(polled.start())
    assert [row[0] for row in polled.index()] == ["tiny"]
    assert DECOY_SEED not in recorder.seeds


def test_version_folder_out_of_the_model_is_refused(layout: Layout) -> None:
    folder = _model(layout.repo, "vlink", [1], model_json={"seed": 3})
    (folder / "2").symlink_to(layout.decoy / "1", target_is_directory=True)
    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    error = _load_error(repo, "vlink")
    assert (error.code, error.message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "version folder '2' of model 'vlink' resolves outside the model's folder")
    assert recorder.configs == []
    assert repo.index()[-1] == ("vlink", "", "UNAVAILABLE", error.message)


@pytest.mark.parametrize(("link", "target", "message"), [
    ("config.pbtxt", "config.pbtxt",
     "config.pbtxt of model 'flink' resolves outside the model's folder"),
    ("1/model.json", "1/model.json",
     "1/model.json of model 'flink' resolves outside the model's folder"),
])
def test_files_out_of_the_model_are_refused(layout: Layout, link: str, target: str,
                                            message: str) -> None:
    folder = _model(layout.repo, "flink", [1])
    (folder / link).unlink()
    (folder / link).symlink_to(layout.decoy / target)
    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    error = _load_error(repo, "flink")
    assert (error.code, error.message) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert recorder.configs == []


def test_file_errors_name_files_relative_to_the_model(layout: Layout) -> None:
    _model(layout.repo, "badconfig", [1], config="not a config {")
    folder = _model(layout.repo, "badjson", [1])
    (folder / "1" / "model.json").write_text("{nope")
    repo = ModelRepository(layout.repo, "explicit", engine_factory=_Recorder())
    config_error = _load_error(repo, "badconfig")
    json_error = _load_error(repo, "badjson")
    assert config_error.message.startswith("failed to parse config.pbtxt: ")
    assert json_error.message.startswith("failed to parse 1/model.json: ")
    assert str(layout.tmp) not in config_error.message + json_error.message


def test_a_garbage_config_gets_a_short_parse_error(layout: Layout) -> None:
    """15 KB of garbage on one line: the error quotes an excerpt, short enough for gRPC's
    metadata, not the file."""
    _model(layout.repo, "garbage", [1], config="name: " + "\u00e9&" * 7500)
    error = _load_error(ModelRepository(layout.repo, "explicit", engine_factory=_Recorder()),
                        "garbage")
    assert error.message.startswith("failed to parse config.pbtxt: ")
    assert len(error.message) <= MAX_MESSAGE_CHARS
    assert len(str(error)) > MAX_MESSAGE_CHARS  # the whole text stays for the server's log


def test_loader_messages_name_no_server_path() -> None:
    text = "model '/home/op/models/x.gguf' is neither a Hugging Face directory nor a .gguf file"
    assert hide_paths(text) == \
        "model '<path>' is neither a Hugging Face directory nor a .gguf file"
    assert hide_paths("version 1/2 of 'm'") == "version 1/2 of 'm'"
    assert bounded("x" * 5000).endswith("(4016 characters more)")


def test_an_absolute_model_path_that_fails_is_not_echoed(layout: Layout) -> None:
    """The operator's absolute path in model.json, which the loader's error names."""
    missing = layout.tmp / "nowhere" / "model.gguf"
    _model(layout.repo, "lost", [1], model_json={"model": str(missing)})
    repo = ModelRepository(layout.repo, "explicit")  # the real engine factory: its loader fails
    error = _load_error(repo, "lost")
    assert error.message.startswith("failed to load 'lost' version 1: ")
    assert str(layout.tmp) not in error.message and "<path>" in error.message


# ---- model paths ---------------------------------------------------------------------------


def test_model_paths_on_disk(layout: Layout) -> None:
    """Relative paths start at the version folder and stay in the model's folder; an absolute
    path in model.json is the operator's own choice."""
    folder = _model(layout.repo, "m", [1])
    version = folder / "1"
    (version / "escape").symlink_to(layout.decoy, target_is_directory=True)
    config = load_config(folder)

    def model_of(value: str) -> str | None:
        (version / "model.json").write_text(json.dumps({"model": value}))
        return engine_config(config, version).model

    assert model_of("default") is None
    assert model_of("weights") == str((version / "weights").resolve())
    assert model_of("../shared") == str((folder / "shared").resolve())
    assert model_of(str(layout.decoy)) == str(layout.decoy)  # the operator owns model.json
    for value in ("../../decoy", "../..", "escape", "escape/1", "weights/../../../decoy"):
        with pytest.raises(RepositoryError) as e:
            model_of(value)
        assert (e.value.code, e.value.message) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "engine setting 'model' of model 'm' must name a path inside the model's folder "
            "(relative paths start at the version folder)")


@pytest.mark.parametrize("template", [
    "{decoy}", "{decoy}/1", "{repo}/../decoy", "/proc/self/root{decoy}", "/etc", "/",
    "../../decoy", "../../../decoy/1", "../../escape"])
def test_client_model_path_outside_the_repository_is_refused(layout: Layout,
                                                             template: str) -> None:
    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    error = _load_error(repo, "tiny", _override(model=_name(template, layout)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'model' of the 'config' override" in error.message
    assert "/" not in error.message.split("override", 1)[1]  # no path echoed back
    assert str(layout.tmp) not in error.message
    assert recorder.configs == []


def test_client_model_path_is_refused_even_where_model_json_overrides_it(
        layout: Layout) -> None:
    _model(layout.repo, "pinned", [1], model_json={"model": "default"})
    repo = ModelRepository(layout.repo, "explicit", engine_factory=_Recorder())
    error = _load_error(repo, "pinned", _override(model=str(layout.decoy)))
    assert error.message == ("parameter 'model' of the 'config' override must name a path "
                             "inside the model repository")


def test_client_model_path_inside_the_repository_is_used(layout: Layout) -> None:
    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    inside = layout.repo / "tiny" / "1"
    _run(repo.load("tiny", _override(model=str(inside))))
    _run(repo.load("tiny", _override(model="weights")))
    assert [c.model for c in recorder.configs] == [str(inside.resolve()),
                                                   str((inside / "weights").resolve())]


def test_load_failure_does_not_reveal_where_the_repository_is(layout: Layout) -> None:
    def failing(config: EngineConfig, observers: Any = ()) -> tuple[Any, Any]:
        raise FileNotFoundError(f"model directory {config.model} has no config.json")

    repo = ModelRepository(layout.repo, "explicit", engine_factory=failing)
    error = _load_error(repo, "tiny", _override(model="weights"))
    assert str(layout.tmp) not in error.message
    assert error.message == ("failed to load 'tiny' version 1: model directory "
                             "<model repository>/tiny/1/weights has no config.json")


# ---- engine settings -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["kv_cache_bytes", "kv_cache_memory_bytes"])
def test_kv_cache_beyond_memory_is_refused_before_loading(layout: Layout, key: str) -> None:
    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    _run(repo.load("tiny"))
    serving = repo.get("tiny")
    error = _load_error(repo, "tiny", _override(**{key: str(TERABYTE)}))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message.startswith(f"invalid engine settings for model 'tiny': "
                                    f"{key}={TERABYTE} (1024.0 GiB) exceeds the memory "
                                    "available for the KV cache on cpu: ")
    assert len(recorder.configs) == 1  # the factory (weights, cache) never ran for it
    assert repo.get("tiny") is serving and not serving.engine.stopped  # the old one serves


def test_kv_cache_beyond_memory_on_disk_is_refused(layout: Layout) -> None:
    _model(layout.repo, "huge", [1], model_json={"kv_cache_memory_bytes": TERABYTE})
    recorder = _Recorder()
    error = _load_error(ModelRepository(layout.repo, "explicit", engine_factory=recorder),
                        "huge")
    assert "kv_cache_memory_bytes=1099511627776" in error.message
    assert recorder.configs == []


def test_versions_kv_caches_must_fit_together(layout: Layout) -> None:
    each = kv_cache_limit_bytes("cpu") * 6 // 10
    _model(layout.repo, "pair", [1, 2], model_json={"kv_cache_bytes": each})
    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    error = _load_error(repo, "pair", json.dumps({"backend": "vllm",
                                                  "version_policy": {"all": {}}}))
    assert "kv_cache_bytes of its 2 versions together" in error.message
    assert recorder.configs == []


@pytest.mark.parametrize(("key", "value", "message"), [
    ("max_num_seqs", "1000000000", "max_num_seqs must be at most 65536, got 1000000000"),
    ("max_num_seqs", "-1", "max_num_seqs must be positive, got -1"),
    ("max_num_seqs", "1.5", "engine setting 'max_num_seqs' must be of type int, got '1.5'"),
    ("max_num_batched_tokens", str(2**40), "max_num_batched_tokens must be at most 16777216"),
    ("max_num_batched_tokens", "0", "max_num_batched_tokens must be positive"),
    ("max_model_len", "-5", "max_model_len must be positive, got -5"),
    ("max_model_len", "99999999999", "max_model_len must be at most 16777216"),
    ("block_size", "4096", "block_size must be at most 1024, got 4096"),
    ("block_size", "0", "block_size must be a positive power of two"),
    ("block_size", "9" * 5000, "engine setting 'block_size' must be of type int"),
    ("kv_cache_bytes", "-1", "kv_cache_bytes must be positive, got -1"),
    ("kv_cache_bytes", "1e12", "engine setting 'kv_cache_bytes' must be of type int"),
    ("gpu_memory_utilization", "nan", "gpu_memory_utilization must be in (0, 1], got nan"),
    ("gpu_memory_utilization", "2", "gpu_memory_utilization must be in (0, 1], got 2.0"),
    ("tensor_parallel_size", "two", "'tensor_parallel_size' must be of type int"),
    ("dtype", "int8\n" * 100, "engine setting 'dtype' must be one of"),
])
def test_absurd_override_settings_are_refused(layout: Layout, key: str, value: str,
                                              message: str) -> None:
    recorder = _Recorder()
    repo = ModelRepository(layout.repo, "explicit", engine_factory=recorder)
    error = _load_error(repo, "tiny", _override(**{key: value}))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.message
    assert len(error.message) < 300
    assert recorder.configs == []


@pytest.mark.parametrize(("values", "message"), [
    ({"max_num_seqs": 1.5}, "engine setting 'max_num_seqs' must be of type int, got 1.5"),
    ({"max_num_seqs": True}, "engine setting 'max_num_seqs' must be of type int, got True"),
    ({"block_size": [16]}, "engine setting 'block_size' must be of type int, got [16]"),
    ({"kv_cache_memory_bytes": 1e12}, "'kv_cache_memory_bytes' must be of type int"),
    ({"enable_prefix_caching": 1}, "'enable_prefix_caching' must be of type bool, got 1"),
    ({"model": 7}, "engine setting 'model' must be of type str, got 7"),
])
def test_mistyped_model_json_settings_are_refused(layout: Layout, values: dict[str, Any],
                                                  message: str) -> None:
    folder = _model(layout.repo, "typed", [1], model_json=values)
    with pytest.raises(RepositoryError) as e:
        engine_config(load_config(folder), folder / "1")
    assert message in e.value.message


def test_offline_engine_refuses_a_kv_cache_beyond_memory(smollm: LoadedModel) -> None:
    with pytest.raises(ValueError, match=f"kv_cache_bytes={TERABYTE} .* exceeds the memory "
                                         "available for the KV cache on cpu"):
        LLM(loaded=smollm, kv_cache_bytes=TERABYTE)
    for bad in ({"max_num_seqs": 1.5}, {"block_size": 2048}, {"max_model_len": 2**30},
                {"kv_cache_bytes": 2.5e9}, {"kv_cache_memory_fraction": "0.5"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)


# ---- through the server --------------------------------------------------------------------

SERVER_MODEL_JSON = {"model": "default", "max_model_len": 256}
# The cache size sits in the config, so that a load override (which replaces the config) can
# change it: model.json would win over the override's parameters.
SERVER_KV_PARAMETER = ('parameters { key: "kv_cache_memory_bytes" '
                       'value { string_value: "16777216" } }\n')
DECOY_BACKEND = "decoy_backend_reached"


@pytest.fixture(scope="module")
def hostile_repo(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    tmp = tmp_path_factory.mktemp("hostile")
    repo = tmp / "repo"
    tiny = repo / "tiny"
    (tiny / "1").mkdir(parents=True)
    (tiny / "config.pbtxt").write_text((DEFAULT_REPOSITORY / "smollm2" / "config.pbtxt")
                                       .read_text() + SERVER_KV_PARAMETER)
    (tiny / "1" / "model.json").write_text(json.dumps(SERVER_MODEL_JSON))
    # Would fail loudly, naming its backend, if anything ever loaded it.
    decoy = _model(tmp, "decoy", [1], config=f'backend: "{DECOY_BACKEND}"',
                   model_json=SERVER_MODEL_JSON)
    (repo / "escape").symlink_to(decoy, target_is_directory=True)
    (repo / "notadir").write_text("not a model")
    return Layout(tmp, repo, decoy)


@pytest.fixture(scope="module")
def explicit(hostile_repo: Layout) -> Iterator[ServerHandle]:
    handle = start_server(hostile_repo.repo, "--model-control-mode", "explicit",
                          "--load-model", "tiny")
    yield handle
    handle.stop()


@pytest.fixture
def client(explicit: ServerHandle) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(explicit.grpc_url)
    yield c
    c.close()


def _error(call: Any, *args: Any, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as e:
        call(*args, **kwargs)
    return str(e.value.status()), e.value.message()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.parametrize("template", [*HOSTILE_NAMES, "n" * 2**20])
def test_server_answers_hostile_names_as_unknown(client: grpcclient.InferenceServerClient,
                                                 hostile_repo: Layout, template: str) -> None:
    name = _name(template, hostile_repo)
    quoted = shown(name)
    assert _error(client.load_model, name) == (
        "StatusCode.INTERNAL", f"failed to load '{quoted}', failed to poll from model repository")
    client.unload_model(name)  # Triton: OK, nothing to unload
    unknown = ("StatusCode.NOT_FOUND", f"Request for unknown model: '{quoted}' is not found")
    assert _error(client.get_model_config, name) == unknown
    assert _error(client.get_model_metadata, name) == unknown
    assert client.is_model_ready(name) is False
    if name:  # the empty name asks for every model's statistics
        assert _error(client.get_inference_statistics, name) == (
            "StatusCode.INVALID_ARGUMENT", f"requested model '{quoted}' is not available")


@pytest.mark.slow
def test_server_loaded_nothing_but_the_repository(client: grpcclient.InferenceServerClient,
                                                  explicit: ServerHandle) -> None:
    for alias in ("./tiny", "tiny/", "escape"):
        assert _error(client.load_model, alias)[0] == "StatusCode.INTERNAL"
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": "tiny", "version": "1", "state": "READY"}]
    assert DECOY_BACKEND not in explicit.log()


@pytest.mark.slow
def test_server_refuses_client_model_paths_outside(client: grpcclient.InferenceServerClient,
                                                   hostile_repo: Layout) -> None:
    for value in (str(hostile_repo.decoy), "/proc/self/root/etc", "../../decoy"):
        code, message = _error(client.load_model, "tiny", config=_override(model=value))
        assert code == "StatusCode.INVALID_ARGUMENT"
        assert "parameter 'model' of the 'config' override" in message
        assert str(hostile_repo.tmp) not in message and "/etc" not in message


@pytest.mark.slow
def test_server_refuses_a_terabyte_kv_cache_and_keeps_serving(
        client: grpcclient.InferenceServerClient, explicit: ServerHandle) -> None:
    before = _rss_bytes(explicit.process.pid)
    code, message = _error(client.load_model, "tiny",
                           config=_override(kv_cache_memory_bytes=str(TERABYTE)))
    after = _rss_bytes(explicit.process.pid)
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert message.startswith("load failed for model 'tiny': invalid engine settings for model "
                              f"'tiny': kv_cache_memory_bytes={TERABYTE} (1024.0 GiB) exceeds "
                              "the memory available for the KV cache on cpu: ")
    assert after - before < 64 * 2**20  # refused before weights or cache were touched
    assert client.is_model_ready("tiny")
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("tiny", llm_inputs("Hello", 2, stream=False), request_id="r")
    result, error = got.get(timeout=120)
    client.stop_stream()
    assert error is None and is_final(result) and text_of(result)


@pytest.mark.slow
def test_server_answers_a_garbage_config_with_its_parse_error(
        client: grpcclient.InferenceServerClient, hostile_repo: Layout) -> None:
    """Its error fits gRPC's metadata: INVALID_ARGUMENT naming the parse failure, not
    RESOURCE_EXHAUSTED for an error too long to send."""
    folder = _model(hostile_repo.repo, "garbage", [1], config="name: " + "\u00e9&" * 7500,
                    model_json=SERVER_MODEL_JSON)
    try:
        status, message = _error(client.load_model, "garbage")
        assert status == "StatusCode.INVALID_ARGUMENT"
        prefix = "load failed for model 'garbage': "  # the service's, as Triton words it
        assert message.startswith(prefix + "failed to parse config.pbtxt")
        assert len(message) <= len(prefix) + MAX_MESSAGE_CHARS
        assert client.is_server_live() and client.is_model_ready("tiny")
    finally:
        shutil.rmtree(folder)
