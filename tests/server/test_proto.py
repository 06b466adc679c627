"""The API contract: committed stubs are exactly what `make proto` makes, and every part of the .proto is documented."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROTO = "nmtserve/v1/translator.proto"
STUBS = ("translator_pb2.py", "translator_pb2.pyi", "translator_pb2_grpc.py")


def _protoc(*outputs: str) -> None:
    """grpc_tools.protoc with the Makefile's include path, run from the repository root like `make proto`."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", *outputs, f"proto/{PROTO}"], cwd=ROOT, check=True, timeout=60)


def test_committed_stubs_match_the_proto(tmp_path):
    _protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    for name in STUBS:
        committed = ROOT / "proto/nmtserve/v1" / name
        assert committed.read_bytes() == (tmp_path / "nmtserve/v1" / name).read_bytes(), f"{name} is stale: run 'make proto'"


def test_every_rpc_message_and_field_is_documented(tmp_path):
    _protoc(f"--descriptor_set_out={tmp_path / 'set.pb'}", "--include_source_info")
    descriptors = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.pb").read_bytes())
    (file,) = descriptors.file
    assert file.package == "nmtserve.v1"
    commented = {tuple(location.path) for location in file.source_code_info.location if location.leading_comments.strip()}
    undocumented = []
    # Paths in FileDescriptorProto: message_type = 4, its field = 2, its oneof_decl = 8; service = 6, its method = 2.
    for m, message in enumerate(file.message_type):
        undocumented += [message.name] if (4, m) not in commented else []
        undocumented += [f"{message.name}.{f.name}" for i, f in enumerate(message.field) if (4, m, 2, i) not in commented]
        undocumented += [f"{message.name}.{o.name}" for i, o in enumerate(message.oneof_decl)
                         if (4, m, 8, i) not in commented and not o.name.startswith("_")]  # "_x": synthetic, of `optional x`
    for s, service in enumerate(file.service):
        undocumented += [service.name] if (6, s) not in commented else []
        undocumented += [f"{service.name}.{r.name}" for i, r in enumerate(service.method) if (6, s, 2, i) not in commented]
    assert not undocumented


@pytest.mark.parametrize("module", ["nmtserve.v1.translator_pb2", "nmtserve.v1.translator_pb2_grpc"])
def test_stubs_import_from_the_one_package(module):
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=60)


@pytest.mark.parametrize("extra", ["serve", "client"])
def test_the_extras_install_a_grpc_and_protobuf_the_stubs_import_with(extra):
    """The stubs raise at import under an older gRPC or protobuf than generated them; pip must not install one."""
    stubs = ROOT / "proto/nmtserve/v1"
    made_by = {
        "grpcio": re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", (stubs / "translator_pb2_grpc.py").read_text())[1],
        "protobuf": re.search(r"# Protobuf Python Version: ([\d.]+)", (stubs / "translator_pb2.py").read_text())[1],
    }
    requirements = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]]
    floors = {r.name: min((Version(s.version) for s in r.specifier if s.operator in (">=", "==")), default=None) for r in requirements}
    for package, version in made_by.items():
        assert floors.get(package) is not None and floors[package] >= Version(version), (
            f"the {extra} extra admits {package} {floors.get(package)}, the stubs need {version}")
    assert all(floors[name] >= Version(made_by["grpcio"]) for name in floors if name.startswith("grpcio-")), floors
