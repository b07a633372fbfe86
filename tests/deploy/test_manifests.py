"""deploy/kubernetes/: valid against Kubernetes' schemas (offline, strict), and what a platform team asks.

Every document is validated with ``kubernetes-validate`` (schemas shipped in
the package, so no network) against the oldest release with native sidecar
containers and the newest the validator knows, rejecting unknown fields. Then
each pagedgen container is held to the deployment rules: gRPC health probes,
sized requests and limits, a termination grace longer than ``--grace-period``,
a locked-down security context, a writable /tmp on a read-only root, and the
API key from a Secret.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the test extra installs kubernetes-validate")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())   # native sidecars are in 1.29 on
# RSS of the image's processes measured by `make image-test` (--kv-cache-memory 512MiB): idle and
# under 16 streams both ~1.5 GiB. Memory limits must leave at least 25% above it.
MEASURED_RSS_MIB = 1515
GIB = 2**30


def _documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def _pagedgen_containers(doc: dict) -> list[dict]:
    spec = _pod_spec(doc)
    return [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "pagedgen"]


def _workloads() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in _documents() if doc["kind"] in ("Pod", "Deployment")]


def _quantity(text: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units[unit]


def _flag(container: dict, name: str) -> str | None:
    for arg in container.get("args", []):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


def test_there_are_a_sidecar_a_deployment_with_a_headless_service_and_a_gpu_variant():
    kinds = {(name, doc["kind"]) for name, doc in _documents()}
    assert kinds == {("sidecar-pod.yaml", "Pod"), ("deployment.yaml", "Deployment"),
                     ("deployment.yaml", "Service"), ("deployment-gpu.yaml", "Deployment")}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_document_is_valid_and_strict_offline(version, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("the validator tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for name, doc in _documents():
        kubernetes_validate.validate(doc, version, strict=True)      # raises on any error


def test_the_validator_rejects_a_wrong_manifest():
    name, doc = next((n, d) for n, d in _workloads() if d["kind"] == "Deployment")
    wrong = yaml.safe_load(yaml.safe_dump(doc))
    wrong["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}       # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, VERSIONS[-1], strict=True)
    wrong = yaml.safe_load(yaml.safe_dump(doc))
    wrong["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name, doc", _workloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_probes_ask_the_grpc_health_service(name, doc):
    for container in _pagedgen_containers(doc):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
        # Liveness must not kill a draining server: its failure window outlasts --grace-period.
        live = container["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > float(_flag(container, "--grace-period"))


@pytest.mark.parametrize("name, doc", _workloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_grace_resources_and_security(name, doc):
    spec = _pod_spec(doc)
    pod_security = spec.get("securityContext", {})
    containers = spec.get("initContainers", []) + spec["containers"]
    for container in _pagedgen_containers(doc):
        assert spec["terminationGracePeriodSeconds"] > float(_flag(container, "--grace-period"))
        resources = container["resources"]
        for what in ("cpu", "memory"):
            assert what in resources["requests"], (name, what)
        assert "memory" in resources["limits"]
        assert _quantity(resources["limits"]["memory"]) >= 1.25 * MEASURED_RSS_MIB * 2**20
        assert _quantity(resources["requests"]["memory"]) <= _quantity(resources["limits"]["memory"])
        if _flag(container, "--num-threads"):                   # threads match the CPUs asked for
            assert _quantity(resources["requests"]["cpu"]) >= float(_flag(container, "--num-threads"))
    for container in containers:                                # the application's too
        security = container["securityContext"]
        assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True
        assert security.get("runAsUser", pod_security.get("runAsUser", 0)) != 0
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"


@pytest.mark.parametrize("name, doc", _workloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_tmp_is_an_empty_dir_and_the_api_key_comes_from_a_secret(name, doc):
    spec = _pod_spec(doc)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in _pagedgen_containers(doc):
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        env = {e["name"]: e for e in container["env"]}
        assert "PAGEDGEN_API_KEY" not in env                    # never a literal key
        key_file = Path(env["PAGEDGEN_API_KEY_FILE"]["value"])
        mount = mounts[str(key_file.parent)]
        assert mount["readOnly"] is True and "secret" in volumes[mount["name"]]
        items = volumes[mount["name"]]["secret"]["items"]
        assert key_file.name in {item["path"] for item in items}
    for container in spec["containers"]:
        for env in container.get("env", []):
            if env["name"].endswith("API_KEY"):
                assert "secretKeyRef" in env["valueFrom"], (name, env["name"])


def test_the_sidecar_shares_the_socket_directory_with_the_application():
    doc = next(d for n, d in _documents() if n == "sidecar-pod.yaml")
    spec = doc["spec"]
    (pagedgen,) = _pagedgen_containers(doc)
    assert pagedgen["restartPolicy"] == "Always"                # a native sidecar: up before the app
    socket_path = Path(_flag(pagedgen, "--uds"))
    (app,) = spec["containers"]
    for container in (pagedgen, app):
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(socket_path.parent))
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert "emptyDir" in volume
    target = next(e["value"] for e in app["env"] if e["name"] == "PAGEDGEN_TARGET")
    assert target == f"unix:{socket_path}"
    # The socket is mode 0660 owned by pagedgen's group: the fsGroup puts the application in it.
    assert spec["securityContext"]["fsGroup"] == pagedgen["securityContext"]["runAsGroup"]


def test_the_headless_service_selects_the_replicas():
    docs = _documents()
    service = next(d for n, d in docs if d["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None"
    port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    for name, doc in docs:
        if doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
            assert service["spec"]["selector"].items() <= labels.items(), name
            (container,) = _pagedgen_containers(doc)
            assert port["targetPort"] in {p["name"] for p in container["ports"]}
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for _, d in docs
                 if d["kind"] == "Deployment"]
    assert len(set(selectors)) == len(selectors)                # no two Deployments claim the same pods


def test_the_gpu_variant_asks_for_a_gpu_and_runs_the_cuda_image():
    doc = next(d for n, d in _documents() if n == "deployment-gpu.yaml")
    (container,) = _pagedgen_containers(doc)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":cuda")
