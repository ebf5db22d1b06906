"""Static checks of the Kubernetes manifests in k8s/ and of the image they run; no cluster needed.

RayCluster and RayJob documents are validated against the openAPIV3Schema of the KubeRay
CRDs copied into k8s/crds/. The API server prunes unknown fields of a custom resource instead
of rejecting them, and `kubectl apply` reports them as errors (strict field validation); plain
JSON Schema would let a misspelled field through, so the schema is tightened here to reject
properties it does not declare. CEL rules (x-kubernetes-validations) are not evaluated.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_FILES = {"RayCluster": K8S / "crds" / "ray.io_rayclusters.yaml", "RayJob": K8S / "crds" / "ray.io_rayjobs.yaml"}
NAMESPACE = "timematch"
#: Every Ray process must start with these (a head and a worker in different auth modes cannot join).
RAY_NODE_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
GPU = "nvidia.com/gpu"

Document = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Loading


def manifest_paths() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def load_manifests() -> tuple[tuple[Path, Document], ...]:
    """Every document of every manifest under k8s/ (the CRD copies and the kustomization aside)."""
    documents = []
    for path in manifest_paths():
        with path.open() as stream:
            for document in yaml.safe_load_all(stream):
                if document is not None:
                    documents.append((path, document))
    return tuple(documents)


def documents_of_kind(kind: str) -> list[Document]:
    return [document for _, document in load_manifests() if document.get("kind") == kind]


def the_document(kind: str, name: str | None = None) -> Document:
    found = [d for d in documents_of_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}{f' named {name!r}' if name else ''} under k8s/, found {len(found)}"
    return found[0]


@functools.cache
def crd_schema(kind: str, version: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML
    with CRD_FILES[kind].open() as stream:
        crd = yaml.load(stream, Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            assert entry["served"], f"{kind} {version} is not served by this CRD"
            return entry["schema"]["openAPIV3Schema"]
    served = [entry["name"] for entry in crd["spec"]["versions"]]
    raise AssertionError(f"{CRD_FILES[kind].name} has no version {version!r}; it serves {served}")


#: Keywords whose values are schemas (the others, such as enum, default and required, hold data).
SUBSCHEMA_KEYWORDS = ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not")


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` in which objects with declared properties admit no others."""
    tightened: dict[str, Any] = dict(schema)
    if "properties" in schema:
        tightened["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            tightened["additionalProperties"] = False
    for keyword in SUBSCHEMA_KEYWORDS:
        value = schema.get(keyword)
        if isinstance(value, dict):
            tightened[keyword] = strict(value)
        elif isinstance(value, list):
            tightened[keyword] = [strict(sub) for sub in value]
    return tightened


@functools.cache
def crd_validator(kind: str, version: str) -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 schema objects are a JSON Schema draft-4 dialect; jsonschema ignores the
    # x-kubernetes-* and OpenAPI-only keywords.
    return jsonschema.Draft4Validator(strict(crd_schema(kind, version)))


def crd_errors(document: Document) -> list[str]:
    group, _, version = document["apiVersion"].partition("/")
    assert group == "ray.io", document["apiVersion"]
    validator = crd_validator(document["kind"], version)
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ]


# --------------------------------------------------------------------------------------------
# Walking Ray documents


def cluster_spec(document: Document) -> Document:
    return document["spec"] if document["kind"] == "RayCluster" else document["spec"]["rayClusterSpec"]


def ray_documents() -> list[Document]:
    return documents_of_kind("RayCluster") + documents_of_kind("RayJob")


def ray_pod_templates(document: Document) -> Iterator[tuple[str, Document]]:
    """(where, pod template) of every pod KubeRay makes from ``document``."""
    spec = cluster_spec(document)
    name = document["metadata"]["name"]
    yield f"{name}: head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{name}: worker group {group['groupName']}", group["template"]
    if document["kind"] == "RayJob" and "submitterPodTemplate" in document["spec"]:
        yield f"{name}: job submitter", document["spec"]["submitterPodTemplate"]


def ray_containers(document: Document) -> Iterator[tuple[str, Document]]:
    """(where, container) of every Ray container: the first of each pod, as KubeRay assumes."""
    for where, template in ray_pod_templates(document):
        yield where, template["spec"]["containers"][0]


def env_of(container: Document) -> dict[str, str | None]:
    return {entry["name"]: entry.get("value") for entry in container.get("env", [])}


def entrypoint_args(rayjob: Document) -> dict[str, str]:
    """The ``--option value`` pairs of the RayJob's ``python launch.py`` command (flags map to "")."""
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:2] == ["python", "launch.py"], f"RayJob entrypoint should run launch.py: {words}"
    options: dict[str, str] = {}
    rest = words[2:]
    while rest:
        option = rest.pop(0)
        assert option.startswith("--"), f"unexpected word {option!r} in the entrypoint"
        options[option] = rest.pop(0) if rest and not rest[0].startswith("--") else ""
    return options


def option_value(args: list[str], option: str) -> str:
    assert option in args, f"{option} missing from {args}"
    return args[args.index(option) + 1]


# --------------------------------------------------------------------------------------------
# Every manifest


def test_manifests_parse_and_live_in_the_namespace():
    assert {p.name for p in manifest_paths()} >= {"raycluster.yaml", "rayjob.yaml", "mlflow.yaml", "storage.yaml"}
    for path, document in load_manifests():
        where = f"{path.name}: {document.get('kind')} {document.get('metadata', {}).get('name')}"
        assert {"apiVersion", "kind", "metadata"} <= document.keys(), where
        assert document["metadata"].get("name"), where
        assert document["metadata"].get("namespace") == NAMESPACE, f"{where}: namespace should be {NAMESPACE}"
    names = [(d["kind"], d["metadata"]["name"]) for _, d in load_manifests()]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_kustomization_lists_everything_but_the_rayjob():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    for resource in listed:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists {resource}, which does not exist"
    # A RayJob runs as soon as it exists, so it is submitted by hand once the data is in place.
    expected = {p.name for p in manifest_paths()} - {"rayjob.yaml"}
    assert set(listed) == expected


def test_claimed_volumes_exist():
    claims = {d["metadata"]["name"] for d in documents_of_kind("PersistentVolumeClaim")}
    templates = [t for d in ray_documents() for _, t in ray_pod_templates(d)]
    templates += [d["spec"]["template"] for d in documents_of_kind("Deployment")]
    for template in templates:
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume


# --------------------------------------------------------------------------------------------
# KubeRay documents against the CRD schema


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_ray_documents_match_the_kuberay_crd(kind):
    documents = documents_of_kind(kind)
    assert documents, f"no {kind} under k8s/"
    for document in documents:
        errors = crd_errors(document)
        assert not errors, f"{kind} {document['metadata']['name']} does not match the CRD:\n" + "\n".join(errors)


_DELETE = object()


def _set(path: str, value: Any) -> Callable[[Document], None]:
    """A mutation that sets (or, given ``_DELETE``, removes) the dotted ``path`` of a document."""

    def mutate(document: Document) -> None:
        *parents, last = path.split(".")
        node: Any = document
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


BROKEN = {
    "replicas as a string": ("RayCluster", _set("spec.workerGroupSpecs.0.replicas", "two")),
    "rayStartParams value not a string": ("RayCluster", _set("spec.headGroupSpec.rayStartParams.num-cpus", 0)),
    "worker group without groupName": ("RayCluster", _set("spec.workerGroupSpecs.0.groupName", _DELETE)),
    "malformed memory quantity": (
        "RayCluster",
        _set("spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory", "32 GB"),
    ),
    "misspelled field": ("RayCluster", _set("spec.rayVerison", "2.60.0")),
    "entrypoint as a list": ("RayJob", _set("spec.entrypoint", ["python", "launch.py"])),
    "shutdown flag as a string": ("RayJob", _set("spec.shutdownAfterJobFinishes", "yes")),
    "nested cluster replicas as a string": ("RayJob", _set("spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", "4")),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_crd_validation_rejects_a_broken_copy(case):
    kind, mutate = BROKEN[case]
    broken = copy.deepcopy(documents_of_kind(kind)[0])
    mutate(broken)
    assert crd_errors(broken), f"validation accepted a {kind} with {case}"


def test_crd_validation_catches_wrong_types_without_the_strict_tightening():
    """The CRD schema itself (not only the added strictness) must reject a wrong type."""
    broken = copy.deepcopy(documents_of_kind("RayCluster")[0])
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    validator = jsonschema.Draft4Validator(crd_schema("RayCluster", "v1"))
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        validator.validate(broken)


# --------------------------------------------------------------------------------------------
# Ray versions, images, GPUs, environment


def test_ray_version_matches_image_tags_and_dockerfile():
    dockerfile = (REPO / "Dockerfile").read_text()
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert match, "Dockerfile should pin Ray with ARG RAY_VERSION=<version>"
    for document in ray_documents():
        ray_version = cluster_spec(document)["rayVersion"]
        assert ray_version == match.group(1), f"{document['metadata']['name']}: rayVersion vs Dockerfile RAY_VERSION"
        for where, container in ray_containers(document):
            tag = container["image"].rpartition(":")[2]
            # KubeRay's convention: the tag is the Ray version, optionally with a variant suffix.
            assert tag == ray_version or tag.startswith(ray_version + "-"), (
                f"{where}: image {container['image']} does not carry rayVersion {ray_version}"
            )


def test_project_pins_exactly_the_clusters_ray():
    pyproject = (REPO / "pyproject.toml").read_text()
    pins = re.findall(r'"ray\[tune\]([^"]*)"', pyproject)
    dockerfile = re.search(r"^ARG RAY_VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert pins == [f"=={dockerfile}"], f"pyproject pins ray[tune]{pins}; the cluster runs Ray {dockerfile}"
    import ray

    assert ray.__version__ == dockerfile, "the installed Ray differs from the cluster's"


def test_gpu_workers_request_and_limit_gpus_and_the_head_has_none():
    for document in ray_documents():
        spec = cluster_spec(document)
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert GPU not in head.get("requests", {}) and GPU not in head.get("limits", {})
        gpu_groups = [g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"]]
        assert gpu_groups, f"{document['metadata']['name']}: no GPU worker group"
        for group in gpu_groups:
            resources = group["template"]["spec"]["containers"][0]["resources"]
            requested, limited = resources.get("requests", {}).get(GPU), resources.get("limits", {}).get(GPU)
            assert requested and limited and int(requested) == int(limited) >= 1, (
                f"{group['groupName']}: {GPU} must be in requests and limits, equal"
            )
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
            assert group["maxReplicas"] > group["minReplicas"], "autoscaling needs room between min and max"
        assert spec.get("enableInTreeAutoscaling") is True


def test_every_ray_container_has_the_node_environment():
    for document in ray_documents():
        containers = list(ray_containers(document))
        autoscaler = cluster_spec(document).get("autoscalerOptions", {})
        if cluster_spec(document).get("enableInTreeAutoscaling"):
            containers.append((f"{document['metadata']['name']}: autoscaler", autoscaler))
        for where, container in containers:
            env = env_of(container)
            for name, value in RAY_NODE_ENV.items():
                assert env.get(name) == value, f"{where}: {name} should be {value!r}, is {env.get(name)!r}"


def test_ray_nodes_mount_the_dataset_read_only_and_the_cache():
    for document in ray_documents():
        spec = cluster_spec(document)
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for template in templates:
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            container = template["spec"]["containers"][0]
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            env = env_of(container)
            data, cache = mounts[env["TIMEMATCH_DATA"]], mounts[env["TIMEMATCH_CACHE"]]
            assert data.get("readOnly") is True
            assert volumes[data["name"]]["persistentVolumeClaim"] == {"claimName": "timematch-data", "readOnly": True}
            assert not cache.get("readOnly")
            assert volumes[cache["name"]]["persistentVolumeClaim"]["claimName"] == "timematch-cache"


def test_rayjob_cluster_is_the_standalone_cluster():
    """k8s/rayjob.yaml carries a copy of k8s/raycluster.yaml's spec; keep them in step."""
    assert the_document("RayJob")["spec"]["rayClusterSpec"] == the_document("RayCluster")["spec"]


# --------------------------------------------------------------------------------------------
# The RayJob and the tracking server


def test_rayjob_runs_the_paper_benchmark_inside_the_cluster():
    rayjob = the_document("RayJob")
    args = entrypoint_args(rayjob)
    assert args["--address"] == "auto"
    assert args["--scenario"] == "all" and args["--method"] == "timematch" and args["--profile"] == "paper"
    assert float(args["--gpus-per-trial"]) == 0.25
    head = cluster_spec(rayjob)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert args["--data-root"] == env_of(head)["TIMEMATCH_DATA"] == "/data"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["ttlSecondsAfterFinished"] > 0


def test_tracking_uri_reaches_the_mlflow_service():
    tracking_uri = entrypoint_args(the_document("RayJob"))["--tracking-uri"]
    for document in ray_documents():
        for where, container in ray_containers(document):
            if "MLFLOW_TRACKING_URI" in env_of(container):
                assert env_of(container)["MLFLOW_TRACKING_URI"] == tracking_uri, where
    url = urlparse(tracking_uri)
    service_name = url.hostname.split(".")[0]
    service = the_document("Service", service_name)
    port = next((p for p in service["spec"]["ports"] if p["port"] == url.port), None)
    assert port, f"Service {service_name} has no port {url.port} ({tracking_uri})"

    deployment = the_document("Deployment", "mlflow")
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "Service mlflow does not select the mlflow pods"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = template["spec"]["containers"][0]
    container_ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    target = port["targetPort"]
    target_port = container_ports[target] if isinstance(target, str) else target
    args = container["args"]
    assert int(option_value(args, "--port")) == target_port
    assert option_value(args, "--host") == "0.0.0.0"
    # MLflow answers 403 to Host headers outside --allowed-hosts.
    allowed = option_value(args, "--allowed-hosts").split(",")
    for host in (url.netloc, "localhost:5000"):
        assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), f"--allowed-hosts rejects {host}"


def test_mlflow_server_uses_postgres_and_serves_artifacts_from_a_volume():
    template = the_document("Deployment", "mlflow")["spec"]["template"]
    container = template["spec"]["containers"][0]
    args, env = container["args"], env_of(container)
    assert option_value(args, "--workers") == "1"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert "--serve-artifacts" in args
    destination = option_value(args, "--artifacts-destination")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert destination in mounts, f"--artifacts-destination {destination} is not a mounted volume"

    backend = urlparse(option_value(args, "--backend-store-uri").replace("$(", "").replace(")", ""))
    assert backend.scheme == "postgresql+psycopg2"  # SQLAlchemy 2.1 maps bare postgresql:// to psycopg 3
    postgres = the_document("Service", backend.hostname)
    assert backend.port in {p["port"] for p in postgres["spec"]["ports"]}
    secret = the_document("Secret", "mlflow-postgres")
    for entry in container["env"]:
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], entry
    postgres_container = the_document("Deployment", "mlflow-postgres")["spec"]["template"]["spec"]["containers"][0]
    assert postgres_container["envFrom"] == [{"secretRef": {"name": "mlflow-postgres"}}]

    dockerfile = (REPO / "Dockerfile").read_text()
    assert "psycopg2-binary" in dockerfile, "the MLflow server runs the project image: it needs psycopg2-binary"
    assert container["image"].rpartition(":")[0] == "timematch"


def test_deployments_select_their_own_pods():
    for deployment in documents_of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), deployment["metadata"]["name"]


# --------------------------------------------------------------------------------------------
# The image and the local tracking store


def test_dockerfile_installs_what_kuberay_needs():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", dockerfile, re.MULTILINE)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert re.search(r'"torch==\$\{TORCH_VERSION\}"', dockerfile), "torch must be installed pinned"
    assert re.search(r"ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu", dockerfile)
    assert "ray[default," in dockerfile, "KubeRay probes and RayJob submission need ray[default]"
    assert re.search(r"install .*\bwget\b", dockerfile), "KubeRay's probes run wget"
    assert "pip install ." in dockerfile


def test_mlflow_folder_is_not_a_package():
    # An mlflow/__init__.py would shadow the MLflow library for code run from the repository root.
    assert not (REPO / "mlflow" / "__init__.py").exists()


def test_mlflow_server_script_is_valid_bash():
    script = REPO / "mlflow" / "server.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "sqlite:///$store_dir/mlflow.db" in text and "--workers 1" in text
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in text
