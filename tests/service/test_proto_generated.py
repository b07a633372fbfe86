"""The committed stubs are exactly what scripts/gen_proto.sh makes of proto/,
and the .proto keeps the API conventions (comments, enum prefixes)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "pagedgen" / "v1" / "generate.proto"
COMMITTED = ROOT / "clients" / "pagedgen_client" / "_proto"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _serialized_descriptor(pb2_source: str) -> bytes:
    match = re.search(r"AddSerializedFile\((b'.*?')\)\n", pb2_source)
    assert match, "no serialized descriptor in generate_pb2.py"
    return ast.literal_eval(match.group(1))


@pytest.mark.timeout(120)
def test_committed_stubs_match_a_fresh_generation(tmp_path):
    pytest.importorskip("grpc_tools")
    out = tmp_path / "_proto"
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(out)], check=True,
                   env={**os.environ, "PYTHON": sys.executable}, capture_output=True)
    fresh, committed = _files(out), _files(COMMITTED)
    assert sorted(fresh) == sorted(committed), "run scripts/gen_proto.sh: the generated file set changed"
    pb2 = "pagedgen/v1/generate_pb2.py"
    # The wire API itself: independent of the grpcio-tools version.
    assert _serialized_descriptor(fresh[pb2].decode()) == _serialized_descriptor(committed[pb2].decode()), \
        "proto/ changed: run scripts/gen_proto.sh (and commit its output)"
    committed_tools = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'",
                                committed["pagedgen/v1/generate_pb2_grpc.py"].decode()).group(1)
    if importlib.metadata.version("grpcio-tools") != committed_tools:
        pytest.skip(f"byte equality needs grpcio-tools=={committed_tools} (the stubs' generator); "
                    f"this is {importlib.metadata.version('grpcio-tools')}")
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}: run scripts/gen_proto.sh (and commit its output)"


def _descriptor_with_comments(tmp_path: Path):
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "generate.pb"
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", "--include_source_info",
                      f"--descriptor_set_out={out}", "pagedgen/v1/generate.proto"])
    assert rc == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


@pytest.mark.timeout(60)
def test_every_rpc_message_field_and_enum_value_has_a_comment(tmp_path):
    pytest.importorskip("grpc_tools")
    fd = _descriptor_with_comments(tmp_path)
    commented = {tuple(loc.path) for loc in fd.source_code_info.location if loc.leading_comments.strip()}
    missing = []
    # Field numbers of FileDescriptorProto / DescriptorProto / ... (descriptor.proto).
    for i, msg in enumerate(fd.message_type):
        if (4, i) not in commented:
            missing.append(msg.name)
        missing += [f"{msg.name}.{f.name}" for j, f in enumerate(msg.field) if (4, i, 2, j) not in commented]
    for i, enum in enumerate(fd.enum_type):
        missing += [v.name for j, v in enumerate(enum.value) if (5, i, 2, j) not in commented]
    for i, svc in enumerate(fd.service):
        missing += [f"{svc.name}.{m.name}" for j, m in enumerate(svc.method) if (6, i, 2, j) not in commented]
    assert not missing, f"add a comment to: {missing}"


def test_enums_are_prefixed_and_start_with_unspecified():
    from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb

    assert pb.DESCRIPTOR.package == "pagedgen.v1"
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name).lstrip("_") + "_"
        assert enum.values[0].number == 0 and enum.values[0].name == prefix + "UNSPECIFIED"
        assert all(v.name.startswith(prefix) for v in enum.values), enum.name


def test_unset_sampling_fields_are_distinguishable_from_zero():
    from pagedgen_client._proto.pagedgen.v1 import generate_pb2 as pb

    fields = pb.SamplingParams.DESCRIPTOR.fields
    scalar = [f for f in fields if not f.is_repeated]
    assert all(f.has_presence for f in scalar), [f.name for f in scalar if not f.has_presence]
    assert pb.GenerateRequest.DESCRIPTOR.fields_by_name["cache_salt"].has_presence
