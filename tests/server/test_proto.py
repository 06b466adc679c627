"""The API contract: committed stubs are exactly what `make proto` makes, and every part of the .proto is documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

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
