"""How tests/test_image.py turns the rendered pods into podman options (tests/support/pods.py,
tests/support/kuberay.py), checked without podman: what the kubelet and the KubeRay operator
would do with cpu-small's pods is what the options say. Needs kubectl (it renders the overlay)."""

from __future__ import annotations

import pytest

from tests.support import kuberay
from tests.support.manifests import named, script_secrets, the
from tests.support.pods import Cluster, ContainerConfigError, expand, quantity_bytes, quantity_cpus

OVERLAY = "cpu-small"


def objects(kind: str) -> dict:
    return named(OVERLAY, kind)


def the_rayjob() -> dict:
    return the(OVERLAY, "RayJob")


@pytest.fixture
def cluster(tmp_path) -> Cluster:
    """The Secrets k8s/create-secrets.sh makes, each value named after its Secret and key."""
    secrets = {name: {key: f"{name}.{key}" for key in keys} for name, keys in script_secrets().items()}
    return Cluster(root=tmp_path, network="net", secrets=secrets,
                   configmaps={name: dict(c["data"]) for name, c in objects("ConfigMap").items()})


def option(options: list[str], name: str) -> list[str]:
    return [options[i + 1] for i, o in enumerate(options) if o == name]


def test_quantities_and_expansion():
    assert quantity_bytes("3Gi") == 3 * 2**30 and quantity_bytes("512Mi") == 2**29 and quantity_bytes("1G") == 10**9
    assert quantity_cpus("250m") == 0.25 and quantity_cpus("2") == 2.0
    assert expand("a $(X) $$(X) $(MISSING)", {"X": "1"}) == "a 1 $(X) $(MISSING)"


def test_the_mlflow_server_gets_its_pods_security_limits_mounts_and_secrets(cluster):
    template = objects("Deployment")["mlflow"]["spec"]["template"]
    container = template["spec"]["containers"][0]
    options, tail, env = cluster.options("mlflow", template, container, ("mlflow",))
    assert option(options, "--user") == ["1000:1000"] and option(options, "--group-add") == ["1000"]
    assert option(options, "--security-opt") == ["no-new-privileges"] and option(options, "--cap-drop") == ["ALL"]
    assert "--read-only" in options and "--read-only-tmpfs=false" in options
    assert option(options, "--memory") == [str(quantity_bytes(container["resources"]["limits"]["memory"]))]
    assert option(options, "--network-alias") == ["mlflow"]
    volumes = option(options, "--volume")
    assert any(v.endswith(":/etc/mlflow:ro") for v in volumes), volumes  # the ConfigMap, read-only
    assert any(v.endswith("mlflow-artifacts/artifacts:/mlflow/artifacts:rw") for v in volumes), volumes  # subPath
    store = tail[tail.index("--backend-store-uri") + 1]
    assert ":timematch-postgres.password@" in store and "$(" not in store  # $(POSTGRES_PASSWORD) expanded, as the kubelet does
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "timematch-mlflow-admin.password"
    assert option(options, "--entrypoint") == ['["mlflow"]'] and tail[0] == "server"


def test_a_claim_is_group_owned_by_the_fs_group_unless_its_storage_ignores_it(cluster):
    template, head, pod = kuberay.ray_node(the_rayjob(), "c", None)
    cluster.options("c-head", template, head, pod=pod)
    cache = cluster.claims["timematch-cache"]
    assert cache.stat().st_gid == 1000 and cache.stat().st_mode & 0o2070 == 0o2070
    cluster.claims["timematch-cache"] = cluster.root / "plain"
    cluster.claims["timematch-cache"].mkdir()
    cluster.ignores_fs_group.add("timematch-cache")
    before = cluster.claims["timematch-cache"].stat()
    cluster.options("c-head", template, head, pod=pod)
    after = cluster.claims["timematch-cache"].stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)


def test_kuberay_starts_the_head_and_worker_as_the_operator_does(cluster):
    rayjob = the_rayjob()
    template, head, pod = kuberay.ray_node(rayjob, "timematch-smoke-abcde", None)
    options, tail, env = cluster.options("h", template, head, pod=pod)
    limits = head["resources"]["limits"]
    assert tail[:2] == ["-c", "--"] and tail[2].startswith("ulimit -n ${RAY_START_ULIMIT_OPEN_FILES:-65536}; ray start --head ")
    assert "--num-cpus=0 " in tail[2]  # rayStartParams win over the CPU limit
    assert f"--memory={quantity_bytes(limits['memory'])} " in tail[2] and " --block " in tail[2]
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "timematch-ray-token.auth_token"
    assert env["RAY_ADDRESS"] == "127.0.0.1:6379" and env["RAY_NODE_TYPE_NAME"] == "headgroup"
    assert head["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert template["spec"]["initContainers"][0]["name"] == "wait-for-mlflow"  # the manifest's own, kept

    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    template, worker, pod = kuberay.ray_node(rayjob, "timematch-smoke-abcde", group)
    _, tail, env = cluster.options("w", template, worker, pod=pod)
    fqdn = "timematch-smoke-abcde-head-svc.timematch.svc.cluster.local"
    assert f"--address={fqdn}:6379 " in tail[2] and "--num-cpus=1 " in tail[2]
    assert env["FQ_RAY_IP"] == fqdn and env["RAY_NODE_TYPE_NAME"] == group
    assert template["spec"]["initContainers"][0]["name"] == "wait-gcs-ready"

    template, submitter = kuberay.submitter(rayjob, "timematch-smoke-abcde", "timematch-smoke-xyz12")
    _, tail, env = cluster.options("s", template, submitter)
    assert f"ray job submit --address http://{fqdn}:8265 --no-wait --submission-id timematch-smoke-xyz12 -- " \
           f"{rayjob['spec']['entrypoint']}" in tail[2]
    assert env["RAY_JOB_SUBMISSION_ID"] == "timematch-smoke-xyz12" and env["RAY_AUTH_TOKEN"] == "timematch-ray-token.auth_token"


def test_secrets_refuse_the_container_unless_optional(cluster):
    template, head, pod = kuberay.ray_node(the_rayjob(), "c", None)
    del cluster.secrets["timematch-mlflow-runner"]
    _, _, env = cluster.options("c-head", template, head, pod=pod)  # the login's references are optional
    assert "MLFLOW_TRACKING_USERNAME" not in env and "MLFLOW_TRACKING_PASSWORD" not in env
    del cluster.secrets["timematch-ray-token"]
    with pytest.raises(ContainerConfigError, match='secret "timematch-ray-token" not found'):
        cluster.options("c-head", template, head, pod=pod)


def test_run_as_non_root_refuses_root(cluster):
    template = objects("Deployment")["mlflow"]["spec"]["template"]
    container = dict(template["spec"]["containers"][0], securityContext={"runAsUser": 0})
    with pytest.raises(ContainerConfigError, match="runAsNonRoot"):
        cluster.options("mlflow", template, container)
