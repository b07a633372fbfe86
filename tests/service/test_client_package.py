"""The client library stands alone: no torch, no server packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_PACKAGES = {"torch", "numpy", "transformers", "engine", "scheduler", "backends", "service", "bench"}


@pytest.mark.timeout(60)
def test_importing_the_client_pulls_in_no_torch_nor_server_code(tmp_path):
    code = ("import json, sys\n"
            "import pagedgen_client, pagedgen_client.aio, pagedgen_client.client\n"
            "from pagedgen_client._proto.pagedgen.v1 import generate_pb2_grpc\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "clients")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    top_level = set(json.loads(out))
    assert "pagedgen_client" in top_level
    assert not top_level & SERVER_PACKAGES, top_level & SERVER_PACKAGES


def test_client_distribution_depends_only_on_grpcio_and_protobuf():
    meta = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "pagedgen-client"
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in meta["dependencies"]}
    assert names == {"grpcio", "protobuf"}


def test_client_sources_never_import_server_packages():
    for path in (ROOT / "clients" / "pagedgen_client").rglob("*.py"):
        text = path.read_text()
        for pkg in SERVER_PACKAGES:
            assert f"import {pkg}" not in text and f"from {pkg} " not in text and f"from {pkg}." not in text, path
