"""Static checks of the Kubernetes manifests in k8s/ and of the image they run; no cluster needed.

Each overlay (k8s/overlays/*) is rendered with ``kubectl kustomize``, exactly what
``kubectl apply -k`` would send, and every rendered object is checked: core kinds against the
Kubernetes API schemas of the ``kubernetes-validate`` package (strict: unknown fields are
errors), RayJob against the openAPIV3Schema of the KubeRay CRDs copied into k8s/crds/. The
API server prunes unknown fields of a custom resource instead of rejecting them, and
``kubectl apply`` reports them as errors (strict field validation); plain JSON Schema would let
a misspelled field through, so the CRD schema is tightened here to reject properties it does
not declare. CEL rules (x-kubernetes-validations) are not evaluated.

Then the invariants a user relies on: versions agree, GPUs are requested as they are limited,
no credential is in the repository, every container is limited and meets the "restricted"
Pod Security Standard, the Tune state and caches are on shared volumes, NetworkPolicies fence
MLflow and PostgreSQL.
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

from tests.support.manifests import K8S, NAMESPACE, REPO, SECRETS_SCRIPT, of_kind, rendered, script_secrets, the

OVERLAYS = ("gpu", "cpu-small")
CRD_FILES = {"RayCluster": K8S / "crds" / "ray.io_rayclusters.yaml", "RayJob": K8S / "crds" / "ray.io_rayjobs.yaml"}
KUBERNETES_VERSION = "1.37.0"  # the newest schemas kubernetes-validate 1.37 ships
GPU = "nvidia.com/gpu"
#: Images of the project (built from the Dockerfile), as the overlays name them.
PROJECT_IMAGE = re.compile(r"(^|/)timematch:")

Document = dict[str, Any]

def rayjob(overlay: str) -> Document:
    return the(overlay, "RayJob")


def cluster_spec(document: Document) -> Document:
    return document["spec"]["rayClusterSpec"]


def pod_templates(overlay: str) -> Iterator[tuple[str, Document]]:
    """(where, pod template) of every pod the overlay makes: workloads and KubeRay's pods."""
    for document in rendered(overlay):
        name = f"{document['kind']} {document['metadata']['name']}"
        if document["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield name, document["spec"]["template"]
        elif document["kind"] == "RayJob":
            spec = cluster_spec(document)
            yield f"{name}: head", spec["headGroupSpec"]["template"]
            for group in spec["workerGroupSpecs"]:
                yield f"{name}: worker group {group['groupName']}", group["template"]
            yield f"{name}: job submitter", document["spec"]["submitterPodTemplate"]


def containers(overlay: str) -> Iterator[tuple[str, Document, Document]]:
    """(where, container, its pod template) of every container, init containers and KubeRay's
    autoscaler sidecar (which runs in the head pod) included."""
    for where, template in pod_templates(overlay):
        for kind in ("initContainers", "containers"):
            for container in template["spec"].get(kind, []):
                yield f"{where}: {container['name']}", container, template
    for document in of_kind(overlay, "RayJob"):
        spec = cluster_spec(document)
        if spec.get("enableInTreeAutoscaling"):
            yield (f"RayJob {document['metadata']['name']}: autoscaler", spec["autoscalerOptions"],
                   spec["headGroupSpec"]["template"])


def ray_node_templates(overlay: str) -> list[tuple[str, Document]]:
    return [(where, t) for where, t in pod_templates(overlay) if ": head" in where or ": worker group" in where]


def env_of(container: Document) -> dict[str, Any]:
    return {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in container.get("env", [])}


def entrypoint_args(document: Document) -> dict[str, str]:
    """The ``--option value`` pairs of the RayJob's ``python launch.py`` command (flags map to "")."""
    words = shlex.split(document["spec"]["entrypoint"])
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


def mount_of(path: str, container: Document) -> Document:
    """The mount holding ``path`` (the deepest mount point above it)."""
    holding = [m for m in container.get("volumeMounts", []) if path == m["mountPath"]
               or path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert holding, f"{path} is on no volume of container {container['name']}"
    return max(holding, key=lambda m: len(m["mountPath"]))


def volume(template: Document, name: str) -> Document:
    return next(v for v in template["spec"]["volumes"] if v["name"] == name)


# --------------------------------------------------------------------------------------------
# Schemas


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


def core_errors(document: Document) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    return []


# --------------------------------------------------------------------------------------------
# Every overlay renders and validates

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_the_namespace(overlay):
    kinds = {d["kind"] for d in rendered(overlay)}
    assert {"Namespace", "Deployment", "Service", "PersistentVolumeClaim", "Job", "NetworkPolicy", "RayJob",
            "ConfigMap"} <= kinds
    for document in rendered(overlay):
        where = f"{document['kind']} {document['metadata']['name']}"
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") == NAMESPACE, where
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "timematch", where
    names = [(d["kind"], d["metadata"]["name"]) for d in rendered(overlay)]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_match_the_kubernetes_schemas(overlay):
    errors = [f"{d['kind']} {d['metadata']['name']}: {e}" for d in rendered(overlay)
              if not d["apiVersion"].startswith("ray.io/") for e in core_errors(d)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_matches_the_kuberay_crd(overlay):
    errors = crd_errors(rayjob(overlay))
    assert not errors, f"{overlay}: the RayJob does not match the CRD:\n" + "\n".join(errors)


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


CLUSTER = "spec.rayClusterSpec"
BROKEN = {
    "replicas as a string": _set(f"{CLUSTER}.workerGroupSpecs.0.replicas", "two"),
    "rayStartParams value not a string": _set(f"{CLUSTER}.headGroupSpec.rayStartParams.num-cpus", 0),
    "worker group without groupName": _set(f"{CLUSTER}.workerGroupSpecs.0.groupName", _DELETE),
    "malformed memory quantity": _set(f"{CLUSTER}.workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory",
                                      "32 GB"),
    "misspelled field": _set(f"{CLUSTER}.rayVerison", "2.60.0"),
    "unknown auth mode": _set(f"{CLUSTER}.authOptions.mode", "password"),
    "entrypoint as a list": _set("spec.entrypoint", ["python", "launch.py"]),
    "shutdown flag as a string": _set("spec.shutdownAfterJobFinishes", "yes"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_crd_validation_rejects_a_broken_copy(case):
    broken = copy.deepcopy(rayjob("gpu"))
    BROKEN[case](broken)
    assert crd_errors(broken), f"validation accepted a RayJob with {case}"


def test_core_validation_rejects_a_broken_copy():
    deployment = copy.deepcopy(the("gpu", "Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "2 GB"
    deployment["spec"]["replicaz"] = 1
    assert core_errors(deployment)


def test_crd_validation_catches_wrong_types_without_the_strict_tightening():
    """The CRD schema itself (not only the added strictness) must reject a wrong type."""
    broken = copy.deepcopy(rayjob("gpu"))
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    validator = jsonschema.Draft4Validator(crd_schema("RayJob", "v1"))
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        validator.validate(broken)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_claimed_volumes_and_referenced_config_exist(overlay):
    claims = {d["metadata"]["name"] for d in of_kind(overlay, "PersistentVolumeClaim")}
    config_maps = {d["metadata"]["name"] for d in of_kind(overlay, "ConfigMap")}
    for where, template in pod_templates(overlay):
        for entry in template["spec"].get("volumes", []):
            assert set(entry) - {"name"} <= {"persistentVolumeClaim", "emptyDir", "configMap", "secret"}, (
                f"{where}: volume {entry['name']} is of a kind the restricted standard or this project does not use")
            if "persistentVolumeClaim" in entry:
                assert entry["persistentVolumeClaim"]["claimName"] in claims, f"{where}: {entry}"
            if "configMap" in entry:
                assert entry["configMap"]["name"] in config_maps, f"{where}: {entry}"


# --------------------------------------------------------------------------------------------
# Versions and images


def dockerfile_ray() -> str:
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "Dockerfile should pin Ray with ARG RAY_VERSION=<version>"
    return match.group(1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_version_is_one_version_everywhere(overlay):
    """rayVersion, the Dockerfile's Ray, the image tags, the project's pin and the installed Ray."""
    version = dockerfile_ray()
    assert cluster_spec(rayjob(overlay))["rayVersion"] == version
    for where, container, _ in containers(overlay):
        image = container.get("image")
        if image and PROJECT_IMAGE.search(image):
            tag = image.rpartition(":")[2]
            # KubeRay's convention: the tag is the Ray version, optionally with a variant suffix.
            assert tag == version or tag.startswith(version + "-"), f"{where}: {image} does not carry Ray {version}"
    pins = re.findall(r'"ray\[tune\]([^"]*)"', (REPO / "pyproject.toml").read_text())
    assert pins == [f"=={version}"], f"pyproject pins ray[tune]{pins}; the cluster runs Ray {version}"
    import ray

    assert ray.__version__ == version, "the installed Ray differs from the cluster's"


def test_gpu_overlay_pulls_every_project_image_on_each_start():
    """A reused tag must not run a stale image: the project's images are pulled on every start,
    from the registry set once with kustomize ``images:``."""
    seen = 0
    for where, container, _ in containers("gpu"):
        image = container.get("image")
        if image is None:  # the autoscaler runs the head's image
            continue
        if PROJECT_IMAGE.search(image):
            seen += 1
            assert image.startswith("registry.example.com/timematch:"), f"{where}: {image} bypasses images:"
            assert container["imagePullPolicy"] == "Always", f"{where}: imagePullPolicy {container['imagePullPolicy']}"
        else:
            assert re.search(r":\d+\.\d+", image), f"{where}: third-party image {image} should pin a minor version"
    assert seen >= 6
    workers = cluster_spec(rayjob("gpu"))["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["image"].endswith("-gpu"), "GPU workers run the CUDA build of the image"


def test_cpu_small_runs_the_locally_loaded_image():
    for where, container, _ in containers("cpu-small"):
        image = container.get("image")
        if image and PROJECT_IMAGE.search(image):
            # No registry on a laptop cluster: `kind load` replaces the image under this tag.
            assert image == f"timematch:{dockerfile_ray()}-local", where
            assert container["imagePullPolicy"] == "IfNotPresent", where


# --------------------------------------------------------------------------------------------
# GPUs, sizes, the entrypoints


def test_gpu_workers_request_and_limit_gpus_and_the_head_has_none():
    spec = cluster_spec(rayjob("gpu"))
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert GPU not in head.get("requests", {}) and GPU not in head.get("limits", {})
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head runs the driver, no trials"
    (group,) = spec["workerGroupSpecs"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    requested, limited = resources["requests"].get(GPU), resources["limits"].get(GPU)
    assert requested and limited and int(requested) == int(limited) >= 1, f"{GPU} must be requested as limited"
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"], "autoscaling needs room between min and max"
    assert spec["enableInTreeAutoscaling"] is True
    tolerations = group["template"]["spec"]["tolerations"]
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in tolerations
    for _, container, _ in containers("cpu-small"):
        for part in ("requests", "limits"):
            assert GPU not in container["resources"].get(part, {})


def test_gpu_overlay_runs_the_paper_benchmark():
    job = rayjob("gpu")
    args = entrypoint_args(job)
    assert args["--scenario"] == "all" and args["--method"] == "timematch" and args["--profile"] == "paper"
    assert float(args["--gpus-per-trial"]) == 0.25
    spec = cluster_spec(job)
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    # 4 trials per GPU need CPUs for 4 trials.
    assert float(worker["resources"]["limits"]["cpu"]) >= 1 / float(args["--gpus-per-trial"])
    for where, template in ray_node_templates("gpu"):
        container = template["spec"]["containers"][0]
        assert env_of(container)["TIMEMATCH_DATA"] == args["--data-root"] == "/data", where


def test_cpu_small_is_a_smoke_run_on_the_embedded_data():
    job = rayjob("cpu-small")
    args = entrypoint_args(job)
    assert args["--profile"] == "smoke"
    assert "--data-root" not in args, "the embedded synthetic data, generated into the cache"
    assert not of_kind("cpu-small", "PersistentVolumeClaim") or all(
        d["metadata"]["name"] != "timematch-data" for d in of_kind("cpu-small", "PersistentVolumeClaim"))
    total_cpu = 0.0
    for _, container, _ in containers("cpu-small"):
        cpu = container["resources"]["requests"]["cpu"]
        total_cpu += float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    replicas = cluster_spec(job)["workerGroupSpecs"][0]["replicas"]
    assert replicas >= 2, "a smoke run over more than one worker"
    assert total_cpu <= 8, f"cpu-small requests {total_cpu} CPUs (counting one worker); a laptop has fewer"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_ends_and_cleans_up(overlay):
    spec = rayjob(overlay)["spec"]
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"


# --------------------------------------------------------------------------------------------
# Shared volumes: results, caches, the dataset


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_results_and_cache_are_on_the_shared_volume_on_every_ray_node(overlay):
    job = rayjob(overlay)
    args = entrypoint_args(job)
    claims = {d["metadata"]["name"]: d for d in of_kind(overlay, "PersistentVolumeClaim")}
    for where, template in ray_node_templates(overlay):
        container = template["spec"]["containers"][0]
        env = env_of(container)
        # Set on the node, so a launch without --results-dir still writes to the volume.
        assert env["TIMEMATCH_RESULTS"] == args["--results-dir"], where
        for variable in ("TIMEMATCH_RESULTS", "TIMEMATCH_CACHE"):
            mount = mount_of(env[variable], container)
            assert not mount.get("readOnly"), f"{where}: {variable} is read-only"
            claim = volume(template, mount["name"]).get("persistentVolumeClaim", {}).get("claimName")
            assert claim == "timematch-cache", f"{where}: {variable}={env[variable]} is not on timematch-cache"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, (
            f"{where}: a writable root filesystem lets a path land on one node's disk")
    cache = claims["timematch-cache"]
    assert cache["spec"].get("storageClassName"), f"{overlay}: set the storage class of timematch-cache"
    if overlay == "gpu":  # several nodes: every one of them mounts the cache
        assert cache["spec"]["accessModes"] == ["ReadWriteMany"]
        assert claims["timematch-data"]["spec"]["accessModes"] == ["ReadWriteMany"]
        assert claims["timematch-data"]["spec"]["storageClassName"] == cache["spec"]["storageClassName"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dataset_is_read_only_wherever_it_is_read(overlay):
    writers = []
    for where, template in pod_templates(overlay):
        data = [v["name"] for v in template["spec"].get("volumes", [])
                if v.get("persistentVolumeClaim", {}).get("claimName") == "timematch-data"]
        for name in data:
            if where == "Job timematch-dataset":
                writers.append(where)
                continue
            assert volume(template, name)["persistentVolumeClaim"].get("readOnly") is True, where
            for kind in ("initContainers", "containers"):
                for container in template["spec"].get(kind, []):
                    for mount in container.get("volumeMounts", []):
                        if mount["name"] == name:
                            assert mount.get("readOnly") is True, f"{where}: {container['name']} mounts data writable"
    assert writers == (["Job timematch-dataset"] if overlay == "gpu" else [])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_head_waits_for_mlflow_and_the_runners_login_first(overlay):
    """The driver checks the server and its login before anything runs: with one `kubectl apply
    -k` the head must not start it before the mlflow-runner-user Job has made the user."""
    head = cluster_spec(rayjob(overlay))["headGroupSpec"]["template"]["spec"]
    first = head["initContainers"][0]
    assert first["command"][:3] == ["python", "-m", "timematch.runner.accounts"] and "--wait-for-login" in first["command"]
    login = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    assert [env_of(first)[k] for k in login] == [env_of(head["containers"][0])[k] for k in login], \
        "the login it waits for is the one the driver uses"


def test_the_head_waits_for_the_dataset_job():
    loader = the("gpu", "Job", "timematch-dataset")
    script = "\n".join(loader["spec"]["template"]["spec"]["containers"][0]["command"])
    marker = re.search(r"marker=(\S+)", script).group(1)
    head = cluster_spec(rayjob("gpu"))["headGroupSpec"]["template"]["spec"]
    wait = {c["name"]: c for c in head["initContainers"]}["wait-for-dataset"]
    assert marker in " ".join(wait["command"])
    assert "wget -c" in script, "a retried pod continues the download"
    assert loader["spec"]["backoffLimit"] > 0 and loader["spec"]["activeDeadlineSeconds"] > 0
    assert cluster_spec(rayjob("gpu"))["workerGroupSpecs"][0]["replicas"] == 0, "no GPU idles while data loads"


# --------------------------------------------------------------------------------------------
# Pod security, limits


def _pod_and_container(template: Document, container: Document, key: str) -> Any:
    """A security setting, the container's overriding the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else template["spec"].get("securityContext", {}).get(key)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_meets_the_restricted_pod_security_standard(overlay):
    namespace = the(overlay, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    checked = 0
    for where, container, template in containers(overlay):
        own = container.get("securityContext", {})
        assert own.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert own.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
        assert not own.get("capabilities", {}).get("add"), f"{where}: adds capabilities"
        assert own.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
        assert not own.get("privileged"), where
        assert _pod_and_container(template, container, "runAsNonRoot") is True, f"{where}: runAsNonRoot"
        user = _pod_and_container(template, container, "runAsUser")
        assert isinstance(user, int) and user > 0, f"{where}: runAsUser {user!r} (a numeric non-root user)"
        seccomp = _pod_and_container(template, container, "seccompProfile") or {}
        assert seccomp.get("type") == "RuntimeDefault", f"{where}: seccomp {seccomp}"
        for mount in container.get("volumeMounts", []):
            assert any(v["name"] == mount["name"] for v in template["spec"]["volumes"]), f"{where}: {mount}"
        checked += 1
    assert checked >= 8  # postgres, mlflow (+ its wait), runner Job, head, autoscaler, worker, submitter
    for where, template in pod_templates(overlay):
        spec = template["spec"]
        assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC")), where
        assert spec.get("automountServiceAccountToken") is False, f"{where}: no pod here talks to the API server"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay):
    for where, container, _ in containers(overlay):
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= resources.get(part, {}).keys(), f"{where}: {part} need cpu and memory"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgres_runs_as_its_own_user(overlay):
    template = the(overlay, "Deployment", "mlflow-postgres")["spec"]["template"]
    security = template["spec"]["securityContext"]
    assert security["runAsUser"] == security["fsGroup"] == 999  # the official image's postgres user
    mounts = {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
    assert {"/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"} <= mounts  # where it writes


# --------------------------------------------------------------------------------------------
# Credentials and authentication


def secret_refs(overlay: str) -> Iterator[tuple[str, str, str]]:
    for where, container, _ in containers(overlay):
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                yield where, ref["name"], ref["key"]
        for source in container.get("envFrom", []):
            assert "secretRef" not in source, f"{where}: name the keys it needs"


def test_no_credential_is_in_the_repository():
    for path in sorted(K8S.rglob("*")):
        if path.is_file() and "crds" not in path.parts:
            text = path.read_text()
            assert not re.search(r"^kind:\s*Secret\b", text, re.MULTILINE), f"{path}: a Secret with values"
            assert "stringData" not in text and "change-me" not in text, path
    for overlay in OVERLAYS:
        assert not of_kind(overlay, "Secret"), f"{overlay} renders a Secret"
        for where, container, _ in containers(overlay):
            for entry in container.get("env", []):
                if re.search(r"PASSWORD|TOKEN|SECRET", entry["name"]):
                    assert "valueFrom" in entry and "value" not in entry, f"{where}: {entry['name']} inline"
            for word in container.get("args", []) + container.get("command", []):
                assert not re.search(r"://[^/$@]+:[^/$@]+@", word), f"{where}: a password in {word}"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "RAY_AUTH_MODE=disabled" not in dockerfile


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_used_is_one_the_script_makes(overlay):
    made = script_secrets()
    assert set(made) == {"timematch-postgres", "timematch-mlflow-admin", "timematch-mlflow-runner",
                         "timematch-ray-token"}
    used = set()
    for where, name, key in secret_refs(overlay):
        assert key in made.get(name, set()), f"{where}: Secret {name} key {key} is not made by create-secrets.sh"
        used.add(name)
    auth = cluster_spec(rayjob(overlay))["authOptions"]
    assert auth["mode"] == "token" and "auth_token" in made[auth["secretName"]]  # KubeRay reads auth_token
    used.add(auth["secretName"])
    assert used == set(made)
    subprocess.run(["bash", "-n", str(SECRETS_SCRIPT)], check=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_and_mlflow_require_logins(overlay):
    for where, container, _ in containers(overlay):
        assert env_of(container).get("RAY_AUTH_MODE") in (None, "token"), f"{where}: Ray auth must stay on"
    submitter = rayjob(overlay)["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert env_of(submitter)["RAY_AUTH_MODE"] == "token"
    for where, template in ray_node_templates(overlay):
        env = env_of(template["spec"]["containers"][0])
        assert env["MLFLOW_TRACKING_USERNAME"]["secretKeyRef"]["name"] == "timematch-mlflow-runner", where
        assert env["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"]["name"] == "timematch-mlflow-runner", where
    server = the(overlay, "Deployment", "mlflow")["spec"]["template"]["spec"]
    container = server["containers"][0]
    assert option_value(container["args"], "--app-name") == "basic-auth"
    env = env_of(container)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["secretKeyRef"]["name"] == "timematch-mlflow-admin"
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in env
    config = mount_of(env["MLFLOW_AUTH_CONFIG_PATH"], container)
    ini = the(overlay, "ConfigMap", volume({"spec": server}, config["name"])["configMap"]["name"])
    text = ini["data"][Path(env["MLFLOW_AUTH_CONFIG_PATH"]).name]
    assert "admin_password" not in text and "authenticate_request_basic_auth" in text
    assert re.search(r"^auth_cache_ttl_seconds = [1-9]\d*$", text, re.M), "a login hashed per request: a minute per trial"
    auth_db = re.search(r"database_uri = sqlite:///(\S+)", text).group(1)
    mount = mount_of(auth_db, container)
    assert "persistentVolumeClaim" in volume({"spec": server}, mount["name"]), "users must survive a restart"
    runner = the(overlay, "Job", "mlflow-runner-user")["spec"]["template"]["spec"]["containers"][0]
    assert runner["command"][:3] == ["python", "-m", "timematch.runner.accounts"]


def test_the_image_has_what_the_pods_run():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", dockerfile, re.MULTILINE)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert re.search(r'"torch==\$\{TORCH_VERSION\}"', dockerfile), "torch must be installed pinned"
    assert "ray[default," in dockerfile, "KubeRay probes and RayJob submission need ray[default]"
    assert re.search(r"install .*\bwget\b", dockerfile), "the dataset Job runs wget -c"
    assert re.search(r'pip install .*"\.\[server\]"', dockerfile), "MLflow's basic-auth app and psycopg2"
    assert re.search(r"^USER 1000:1000$", dockerfile, re.MULTILINE), "a numeric user, for runAsNonRoot"
    assert "TIMEMATCH_RESULTS=/cache/results" in dockerfile


# --------------------------------------------------------------------------------------------
# Network policies


def selects(selector: Document, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector form not modelled here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def allowed_sources(overlay: str, target: str, port: int) -> set[str]:
    """The pods (by where) that may open ``port`` on the pods of ``target`` (a where)."""
    templates = dict(pod_templates(overlay))
    labels = templates[target]["metadata"]["labels"]
    policies = [p for p in of_kind(overlay, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)
                and "Ingress" in p["spec"]["policyTypes"]]
    assert policies, f"no NetworkPolicy covers {target}: it accepts anything"
    sources = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer:
                    continue  # other namespaces: checked separately
                sources |= {where for where, t in templates.items() if selects(peer["podSelector"],
                                                                                t["metadata"]["labels"])}
    return sources


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_fence_mlflow_postgres_and_ray(overlay):
    job = f"RayJob {rayjob(overlay)['metadata']['name']}"
    ray_pods = {f"{job}: head", f"{job}: worker group {cluster_spec(rayjob(overlay))['workerGroupSpecs'][0]['groupName']}"}
    assert allowed_sources(overlay, "Deployment mlflow", 5000) == ray_pods | {f"{job}: job submitter",
                                                                             "Job mlflow-runner-user"}
    assert allowed_sources(overlay, "Deployment mlflow-postgres", 5432) == {"Deployment mlflow"}
    for target in ray_pods:
        assert allowed_sources(overlay, target, 6379) == ray_pods | {f"{job}: job submitter"}
    deny = [p for p in of_kind(overlay, "NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert deny and not deny[0]["spec"].get("ingress"), "a default deny for what no policy names"
    # From other namespaces: only the KubeRay operator, only to the dashboard (job submission).
    for policy in of_kind(overlay, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            if any("namespaceSelector" in peer for peer in rule.get("from", [])):
                assert [p["port"] for p in rule["ports"]] == [8265], policy["metadata"]["name"]
                for peer in rule["from"]:
                    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}


# --------------------------------------------------------------------------------------------
# The tracking server


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tracking_uri_reaches_the_mlflow_service(overlay):
    tracking_uri = entrypoint_args(rayjob(overlay))["--tracking-uri"]
    for where, template in ray_node_templates(overlay):
        assert env_of(template["spec"]["containers"][0])["MLFLOW_TRACKING_URI"] == tracking_uri, where
    url = urlparse(tracking_uri)
    service = the(overlay, "Service", url.hostname.split(".")[0])
    port = next((p for p in service["spec"]["ports"] if p["port"] == url.port), None)
    assert port, f"Service {service['metadata']['name']} has no port {url.port} ({tracking_uri})"
    deployment = the(overlay, "Deployment", "mlflow")
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items(), "Service mlflow does not select the mlflow pods"
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
    template = the("gpu", "Deployment", "mlflow")["spec"]["template"]
    container = template["spec"]["containers"][0]
    args, env = container["args"], env_of(container)
    assert option_value(args, "--workers") == "1"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "--serve-artifacts" in args
    destination = option_value(args, "--artifacts-destination")
    assert "persistentVolumeClaim" in volume(template, mount_of(destination, container)["name"])
    backend = urlparse(option_value(args, "--backend-store-uri"))
    assert backend.scheme == "postgresql+psycopg2"  # SQLAlchemy 2.1 maps bare postgresql:// to psycopg 3
    assert backend.password == "$(POSTGRES_PASSWORD)" and "POSTGRES_PASSWORD" in env
    postgres = the("gpu", "Service", backend.hostname)
    assert backend.port in {p["port"] for p in postgres["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_select_their_own_pods(overlay):
    for deployment in of_kind(overlay, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), deployment["metadata"]["name"]


# --------------------------------------------------------------------------------------------
# The local tracking server


def test_mlflow_folder_is_not_a_package():
    # An mlflow/__init__.py would shadow the MLflow library for code run from the repository root.
    assert not (REPO / "mlflow" / "__init__.py").exists()


def test_mlflow_server_script_is_valid_bash():
    script = REPO / "mlflow" / "server.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--workers 1" in text and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in text
    assert "--app-name basic-auth" in text
