"""Our protos: generated code is current, and the wire matches the tritonclient's descriptors."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "backend" / "protocol"


def _ours() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Our file descriptors (they live in a private pool, so tritonclient's can coexist)."""
    from pagedserve.protocol import grpc_service_pb2, model_config_pb2

    out = {}
    for module in (grpc_service_pb2, model_config_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        out[proto.name] = proto
    return out


def _fields(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, tuple]:
    """Every (message.field) → (number, type, label, type name), every service method."""
    found: dict[str, tuple] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        for f in message.field:
            found[f"{prefix}{message.name}.{f.name}"] = (f.number, f.type, f.label,
                                                        f.type_name)
        for nested in message.nested_type:
            walk(f"{prefix}{message.name}.", nested)
        for enum in message.enum_type:
            for v in enum.value:
                found[f"{prefix}{message.name}.{enum.name}.{v.name}"] = (v.number,)

    for message in proto.message_type:
        walk("", message)
    for enum in proto.enum_type:
        for v in enum.value:
            found[f"{enum.name}.{v.name}"] = (v.number,)
    for service in proto.service:
        for m in service.method:
            found[f"{service.name}/{m.name}"] = (m.input_type, m.output_type,
                                                 m.client_streaming, m.server_streaming)
    return found


def _committed_generator_version() -> str:
    found = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$",
                      (GENERATED / "grpc_service_pb2_grpc.py").read_text(), flags=re.M)
    assert found is not None
    return found.group(1)


def test_the_lock_pins_the_generator_of_the_committed_files() -> None:
    """The generated code records its grpcio-tools version; the dev lock installs that one, so
    regeneration on any machine set up from the lock gives the same bytes."""
    locked = re.findall(r"^grpcio-tools==(\S+)$", (ROOT / "requirements-dev.txt").read_text(),
                        flags=re.M)
    assert locked == [_committed_generator_version()]
    assert importlib.metadata.version("grpcio-tools") == locked[0], (
        "grpcio-tools differs from the lock: `make setup-dev` installs the locked one")


def test_regeneration_gives_the_committed_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True)
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in GENERATED.iterdir() if p.is_file())
    assert generated == committed
    for name in generated:
        assert (tmp_path / name).read_text() == (GENERATED / name).read_text(), name


def test_wire_matches_tritonclient() -> None:
    from tritonclient.grpc import model_config_pb2, service_pb2

    dumped = _ours()
    for module in (service_pb2, model_config_pb2):
        theirs = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(theirs)
        ours = dumped[theirs.name]
        assert ours.package == theirs.package == "inference"
        mine, reference = _fields(ours), _fields(theirs)
        # Every name and number tritonclient knows is ours too (we add newer fields only).
        missing = {k: v for k, v in reference.items() if mine.get(k) != v}
        assert not missing, missing
    assert list(_fields(ours)) != []


def test_service_methods_in_triton_order() -> None:
    ours = _ours()["grpc_service.proto"]
    methods = [m.name for m in ours.service[0].method]
    assert ours.service[0].name == "GRPCInferenceService"
    assert methods[:9] == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                           "ModelMetadata", "ModelInfer", "ModelStreamInfer", "ModelConfig",
                           "ModelStatistics"]
    assert methods[-2:] == ["TraceSetting", "LogSettings"]
    assert len(methods) == 20
