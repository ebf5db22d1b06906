"""What the KubeRay operator (v1.7.0) adds to a RayJob's pods, for running them with podman.

Read from ray-project/kuberay at tag v1.7.0 (commit 59d663a), ``ray-operator/controllers/ray/``:

- ``common/pod.go`` ``BuildPod``: a Ray container whose command does not say ``ray start`` gets
  ``/bin/bash -c --`` and ``ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start ...``;
  ``setMissingRayStartParams`` adds ``--block``, ``--dashboard-agent-listen-port=52365``,
  ``--metrics-export-port=8080``, the head's ``--dashboard-host=0.0.0.0`` and the workers'
  ``--address=<head service FQDN>:6379``; ``generateRayStartCommand`` adds ``--num-cpus`` (the
  CPU limit, rounded up) and ``--memory`` (the memory limit) unless rayStartParams set them.
- ``setContainerEnvVars``: RAY_CLUSTER_NAME, RAY_CLUSTER_NAMESPACE, RAY_CLOUD_INSTANCE_ID,
  RAY_NODE_TYPE_NAME, KUBERAY_GEN_RAY_START_CMD, RAY_PORT, RAY_ADDRESS,
  RAY_USAGE_STATS_KUBERAY_IN_USE, RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE; FQ_RAY_IP and RAY_IP on
  workers; ``SetContainerTokenAuthEnvVars``: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the
  ``authOptions`` Secret's key ``auth_token``, into every Ray container and the submitter.
- ``initLivenessAndReadinessProbe``: for rayVersion 2.53 and later, httpGet ``/api/healthz`` on
  the dashboard agent's port (52365) as liveness and readiness probe of head and workers.
- the worker's init container ``wait-gcs-ready`` loops on ``ray health-check``.
- ``common/job.go`` ``BuildJobSubmitCommand`` (K8sJobMode): ``/bin/bash -ce --`` with: wait for
  the dashboard's ``/api/gcs_healthz``; ``ray job submit --no-wait --submission-id`` unless
  ``ray job status`` knows the id; ``ray job logs --follow``. The entrypoint is appended as is.
"""

from __future__ import annotations

import copy
import math
import secrets
from typing import Any

from tests.support.pods import dns_names, quantity_bytes, quantity_cpus

Document = dict[str, Any]

AGENT_PORT = 52365
GCS_PORT = 6379
DASHBOARD_PORT = 8265


def cluster_name(rayjob: Document) -> str:
    return f"{rayjob['metadata']['name']}-{secrets.token_hex(3)[:5]}"


def head_service(cluster: str) -> tuple[str, ...]:
    """The head Service's names: short, namespaced and fully qualified (the one workers use)."""
    return dns_names(f"{cluster}-head-svc")


def ray_start(params: dict[str, str], limits: dict[str, str], head_fqdn: str | None) -> str:
    params = dict(params)
    if head_fqdn is None:
        params.setdefault("dashboard-host", "0.0.0.0")
    else:
        params.setdefault("address", f"{head_fqdn}:{GCS_PORT}")
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(AGENT_PORT))
    if "cpu" in limits:
        params.setdefault("num-cpus", str(math.ceil(quantity_cpus(limits["cpu"]))))
    if "memory" in limits:
        params.setdefault("memory", str(quantity_bytes(limits["memory"])))
    flags = "".join(f" --{k} " if v == "true" else f" --{k}={v} " for k, v in sorted(params.items()) if v != "false")
    return ("ray start --head " if head_fqdn is None else "ray start ") + flags


def _token_env(rayjob: Document) -> list[Document]:
    auth = rayjob["spec"]["rayClusterSpec"].get("authOptions", {})
    if auth.get("mode") != "token":
        return []
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": auth["secretName"], "key": "auth_token"}}}]


def _add_env(container: Document, entries: list[Document]) -> None:
    present = {e["name"] for e in container.get("env", [])}
    container.setdefault("env", []).extend(e for e in entries if e["name"] not in present)


def ray_node(rayjob: Document, cluster: str, group: str | None) -> tuple[Document, Document, dict[str, str]]:
    """(pod template, Ray container, the pod's fields) of the head (group None) or a worker group."""
    spec = rayjob["spec"]["rayClusterSpec"]
    group_spec = spec["headGroupSpec"] if group is None else \
        next(g for g in spec["workerGroupSpecs"] if g["groupName"] == group)
    template = copy.deepcopy(group_spec["template"])
    container = template["spec"]["containers"][0]
    fqdn = head_service(cluster)[2]
    start = ray_start({k: str(v) for k, v in group_spec.get("rayStartParams", {}).items()},
                      container.get("resources", {}).get("limits", {}), None if group is None else fqdn)
    if "ray start" not in " ".join(container.get("command", []) + container.get("args", [])):
        container["command"] = ["/bin/bash", "-c", "--"]
        container["args"] = [f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start}"]
    node_type = "headgroup" if group is None else group
    pod = {"metadata.labels['ray.io/cluster']": cluster, "metadata.labels['ray.io/group']": node_type}
    injected = [
        {"name": "RAY_CLUSTER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}}},
        {"name": "RAY_CLUSTER_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "RAY_CLOUD_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RAY_NODE_TYPE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/group']"}}},
        {"name": "KUBERAY_GEN_RAY_START_CMD", "value": start},
        {"name": "RAY_PORT", "value": str(GCS_PORT)},
        {"name": "RAY_ADDRESS", "value": f"127.0.0.1:{GCS_PORT}" if group is None else f"{fqdn}:{GCS_PORT}"},
        {"name": "RAY_USAGE_STATS_KUBERAY_IN_USE", "value": "1"},
        {"name": "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "value": "1"},
    ]
    if group is not None:
        injected += [{"name": "FQ_RAY_IP", "value": fqdn}, {"name": "RAY_IP", "value": head_service(cluster)[0]}]
    _add_env(container, injected + _token_env(rayjob))
    health = {"httpGet": {"path": "/api/healthz", "port": AGENT_PORT}, "timeoutSeconds": 5 if group is None else 2}
    container.setdefault("livenessProbe", dict(health))
    container.setdefault("readinessProbe", dict(health))
    if group is not None:
        init = {"name": "wait-gcs-ready", "image": container["image"], "command": ["/bin/bash", "-c", "--"],
                "args": [f"until ray health-check --address {fqdn}:{GCS_PORT} > /dev/null 2>&1; do "
                         f"echo 'waiting for the GCS at {fqdn}:{GCS_PORT}'; sleep 5; done"],
                "env": copy.deepcopy(container["env"]),
                "securityContext": copy.deepcopy(container.get("securityContext", {})),
                "resources": {"limits": {"cpu": "200m", "memory": "256Mi"}}}
        template["spec"]["initContainers"] = [init] + template["spec"].get("initContainers", [])
    return template, container, pod


def submitter(rayjob: Document, cluster: str, submission_id: str) -> tuple[Document, Document]:
    """(pod template, container) of the K8sJobMode submitter Job's pod."""
    template = copy.deepcopy(rayjob["spec"]["submitterPodTemplate"])
    container = template["spec"]["containers"][0]
    dashboard = f"{head_service(cluster)[2]}:{DASHBOARD_PORT}"
    address = f"http://{dashboard}"
    if not container.get("command"):
        container["command"] = ["/bin/bash", "-ce", "--"]
        healthy = (f"import urllib.request; r=urllib.request.urlopen('{address}/api/gcs_healthz', timeout=10); "
                   "exit(0 if b'success' in r.read() else 1)")
        container["args"] = [
            f'until python -c "{healthy}" >/dev/null 2>&1 ; do echo "Waiting for Ray Dashboard GCS to become '
            f'healthy at {address} ..." ; sleep 2 ; done ; '
            f"if ! ray job status --address {address} {submission_id} >/dev/null 2>&1 ; then "
            f"ray job submit --address {address} --no-wait --submission-id {submission_id} -- "
            f"{rayjob['spec']['entrypoint'].strip()} ; fi ; "
            f"ray job logs --address {address} --follow {submission_id}"]
    _add_env(container, [{"name": "PYTHONUNBUFFERED", "value": "1"},
                         {"name": "RAY_DASHBOARD_ADDRESS", "value": dashboard},
                         {"name": "RAY_JOB_SUBMISSION_ID", "value": submission_id}] + _token_env(rayjob))
    return template, container
