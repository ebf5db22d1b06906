"""The image of Dockerfile, built here, running the pods of k8s/overlays/cpu-small as containers.

``k8s/build-local.sh --postgres`` builds the image (and the PostgreSQL stand-in: no registry is
reachable). The overlay is rendered with ``kubectl kustomize``; each pod's containers run with
podman as the kubelet would run them (tests/support/pods.py: user, no privilege escalation,
dropped capabilities, read-only root filesystem, emptyDir as fresh folders or tmpfs, claims as
host folders with the fsGroup, limits, Secrets as environment), checked again from inside), and the RayJob's pods as the KubeRay operator would
make them (tests/support/kuberay.py): PostgreSQL, the MLflow server with logins, the runner-user
Job, a Ray head and one worker, and the K8sJobMode submitter that runs the RayJob's entrypoint.
Every probe of the manifests runs inside its container. Then the smoke launch's runs, models and
report are read back, and four kinds of bad input end a job with the project's one-line error.

Slow (an image build, about 3.5 min the first time on this machine, seconds with its layers
cached; then the containers, about 6.5 min). Skips where podman, root or kubectl is missing; .ci/run installs
podman, runc and debootstrap.
"""

from __future__ import annotations

import base64
import configparser
import copy
import functools
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support import kuberay
from tests.support.cluster_harness import free_port
from tests.support.manifests import REPO, kubectl_problem, named, script_secrets, the
from tests.support.pods import Cluster, ContainerConfigError, WorkingSetWatch, dns_names, podman

pytestmark = pytest.mark.slow

OVERLAY = "cpu-small"
POSTGRES_STANDIN = "localhost/timematch-postgres:15-standin"
Document = dict[str, Any]


@functools.cache
def problem() -> str | None:
    if shutil.which("podman") is None:
        return "podman not found: the image cannot be built here (apt-get install -y podman runc debootstrap; .ci/run does)"
    if os.geteuid() != 0:
        return "not root: k8s/build-local.sh makes the base image with debootstrap, which needs root"
    return kubectl_problem()


def objects(kind: str) -> dict[str, Document]:
    return named(OVERLAY, kind)


def service_names(template: Document) -> tuple[str, ...]:
    """The names of every Service that selects the pod, as the pod's network aliases."""
    labels = template["metadata"].get("labels", {})
    names: list[str] = []
    for name, service in objects("Service").items():
        selector = service["spec"].get("selector", {})
        if selector and selector.items() <= labels.items():
            names += dns_names(name)
    return tuple(names)


def runner_secret() -> str:
    """The Secret the Ray head's MLflow login comes from."""
    head = the(OVERLAY, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    env = {e["name"]: e for e in head["spec"]["containers"][0]["env"]}
    return env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["name"]


def fresh_secrets() -> dict[str, dict[str, str]]:
    """What k8s/create-secrets.sh makes: every Secret and key it names, random hex values."""
    made = {name: {key: secrets.token_hex(16) for key in keys} for name, keys in script_secrets().items()}
    made[runner_secret()]["username"] = "runner"  # create-secrets.sh's default --runner-user
    return made


@dataclass
class Deployment:
    cluster: Cluster
    rayjob: Document
    build_seconds: float
    build_line: str
    mlflow_url: str
    #: container name -> its podman options (what the closing note lists)
    options: dict[str, list[str]]
    #: running container -> what :func:`secured` checked inside it
    security: dict[str, str] = field(default_factory=dict)
    #: Ray container -> its peak working set in bytes (against its limit)
    peaks: dict[str, int | None] = field(default_factory=dict)
    memory: WorkingSetWatch | None = None

    def admin(self) -> tuple[str, str]:
        """The admin's login, where the MLflow server's pod reads it from."""
        server = objects("Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"][0]
        ref = {e["name"]: e for e in server["env"]}["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]
        ini = configparser.ConfigParser()
        ini.read_string(next(c for c in self.cluster.configmaps.values() if "basic_auth.ini" in c)["basic_auth.ini"])
        return ini.get("mlflow", "admin_username"), self.cluster.secrets[ref["name"]][ref["key"]]

    def api(self, path: str, payload: Document | None = None) -> Document:
        """MLflow's REST API as the admin, through the published port (kubectl port-forward)."""
        token = base64.b64encode(":".join(self.admin()).encode()).decode()
        request = urllib.request.Request(f"{self.mlflow_url}/api/2.0/mlflow/{path}",
                                         data=json.dumps(payload).encode() if payload is not None else None,
                                         headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)

    def state(self) -> tuple[int, int, int]:
        """(experiments, runs, logged models) on the server."""
        experiments = self.api("experiments/search", {"max_results": 1000}).get("experiments", [])
        ids = [e["experiment_id"] for e in experiments]
        runs = self.api("runs/search", {"experiment_ids": ids, "max_results": 1000}).get("runs", []) if ids else []
        models = self.api("logged-models/search", {"experiment_ids": ids, "max_results": 100}).get("models", []) \
            if ids else []
        return len(experiments), len(runs), len(models)


def start_pod(cluster: Cluster, name: str, template: Document, aliases: tuple[str, ...] = (),
              pod: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """Runs the pod's init containers to their end, then starts its (first) container."""
    for init in template["spec"].get("initContainers", []):
        code, log, _ = cluster.run(f"{name}-{init['name']}", template, init, timeout=300, pod=pod)
        assert code == 0, f"{name}: init container {init['name']} ended with {code}:\n{log[-3000:]}"
        cluster.remove(f"{name}-{init['name']}")
    container = template["spec"]["containers"][0]
    return cluster.start(name, template, container, aliases, pod, extra)


def secured(cluster: Cluster, name: str, template: Document, container: Document, volumes_writable: bool = True) -> str:
    """Checks, inside the running container, what its pod's security settings ask: the user, no
    capabilities, no privilege escalation, a read-only root with its writable mounts (unless a
    case makes one unwritable on purpose); a summary."""
    security = {**template["spec"].get("securityContext", {}), **container.get("securityContext", {})}
    seen = cluster.inspect(name)
    assert seen["Config"]["User"] == f"{security['runAsUser']}:{security['runAsGroup']}", name
    assert seen["HostConfig"]["ReadonlyRootfs"] is security.get("readOnlyRootFilesystem", False), name
    assert ("no-new-privileges" in seen["HostConfig"]["SecurityOpt"]) is \
        (security.get("allowPrivilegeEscalation") is False), name
    status = podman("exec", name, "cat", "/proc/self/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == str(security["runAsUser"]), (name, fields["Uid"])
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0, (name, fields["CapEff"])
    assert fields["NoNewPrivs"].strip() == "1", name
    if security.get("readOnlyRootFilesystem"):
        written = podman("exec", name, "touch", "/probe-root", check=False)
        assert written.returncode != 0 and "Read-only file system" in written.stderr, (name, written.stderr)
    writable = [m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")]
    for path in writable if volumes_writable else ():
        probe = f"{path.rstrip('/')}/.probe-{secrets.token_hex(4)}"
        done = podman("exec", name, "sh", "-c", f"touch {probe} && rm {probe}", check=False)
        assert done.returncode == 0, f"{name}: cannot write its volume {path}: {done.stderr}"
    return (f"uid {security['runAsUser']}, gid {security['runAsGroup']}, no capabilities, no new privileges, "
            f"{'read-only root, ' if security.get('readOnlyRootFilesystem') else ''}writable: {', '.join(writable)}")


def probes_pass(cluster: Cluster, name: str, container: Document, timeout: float = 300) -> None:
    """The startup probe, then readiness and liveness, each run inside the container."""
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            cluster.wait_probe(name, container, container[kind], timeout)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    if problem():
        pytest.skip(problem())
    started = time.monotonic()
    built = subprocess.run(["bash", str(REPO / "k8s" / "build-local.sh"), "--postgres"], capture_output=True,
                           text=True, timeout=3600, cwd=REPO)
    assert built.returncode == 0, built.stderr[-5000:]
    build_seconds = time.monotonic() - started
    build_line = built.stdout.strip().splitlines()[-1]

    root = tmp_path_factory.mktemp("pods")
    network = f"timematch-{secrets.token_hex(4)}"
    podman("network", "create", network)
    deployments, jobs = objects("Deployment"), objects("Job")
    postgres = deployments["mlflow-postgres"]["spec"]["template"]
    cluster = Cluster(root=root, network=network, secrets=fresh_secrets(),
                      configmaps={name: dict(c["data"]) for name, c in objects("ConfigMap").items()},
                      images={postgres["spec"]["containers"][0]["image"]: POSTGRES_STANDIN})
    options: dict[str, list[str]] = {}
    try:
        security = {}
        options["postgres"] = start_pod(cluster, "mlflow-postgres", postgres, service_names(postgres))
        probes_pass(cluster, "mlflow-postgres", postgres["spec"]["containers"][0])
        security["mlflow-postgres"] = secured(cluster, "mlflow-postgres", postgres, postgres["spec"]["containers"][0])

        mlflow = deployments["mlflow"]["spec"]["template"]
        port = free_port()
        options["mlflow"] = start_pod(cluster, "mlflow", mlflow, service_names(mlflow),
                                      extra=("--publish", f"127.0.0.1:{port}:5000"))
        probes_pass(cluster, "mlflow", mlflow["spec"]["containers"][0])
        security["mlflow"] = secured(cluster, "mlflow", mlflow, mlflow["spec"]["containers"][0])

        job = jobs["mlflow-runner-user"]["spec"]["template"]
        code, log, options["mlflow-runner-user"] = cluster.run("mlflow-runner-user", job,
                                                               job["spec"]["containers"][0], timeout=300)
        assert code == 0, f"the runner-user Job ended with {code}:\n{log[-3000:]}"
        cluster.remove("mlflow-runner-user")

        memory = WorkingSetWatch(cluster)
        yield Deployment(cluster, the(OVERLAY, "RayJob"), build_seconds, build_line,
                         f"http://127.0.0.1:{port}", options, security, memory=memory)
        memory.close()
    finally:
        cluster.close()


@dataclass
class JobRun:
    submission_id: str
    code: int
    log: str
    status: str


def run_rayjob(deployment: Deployment, rayjob: Document, workers: int = 1, head_fault=None) -> JobRun:
    """A RayJob as KubeRay runs it: a fresh RayCluster (head, workers), then the submitter."""
    cluster = deployment.cluster
    name = kuberay.cluster_name(rayjob)
    head_template, head, pod = kuberay.ray_node(rayjob, name, None)
    if head_fault:
        head_fault(head_template, head)
    head_name = f"{name}-head"
    deployment.options[head_name] = start_pod(cluster, head_name, head_template,
                                              kuberay.head_service(name) + (f"{rayjob['metadata']['name']}-head-svc",),
                                              {**pod, "metadata.name": head_name})
    try:
        probes_pass(cluster, head_name, head)
        deployment.security[head_name] = secured(cluster, head_name, head_template, head,
                                                 volumes_writable=not cluster.ignores_fs_group)
        deployment.memory.watch(head_name)
        group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
        for index in range(workers):
            template, worker, pod = kuberay.ray_node(rayjob, name, group)
            worker_name = f"{name}-{group}-worker-{index}"
            deployment.options[worker_name] = start_pod(cluster, worker_name, template,
                                                        pod={**pod, "metadata.name": worker_name})
            probes_pass(cluster, worker_name, worker)
            deployment.security[worker_name] = secured(cluster, worker_name, template, worker)
            deployment.memory.watch(worker_name)
        submission = f"{rayjob['metadata']['name']}-{secrets.token_hex(3)[:5]}"
        template, container = kuberay.submitter(rayjob, name, submission)
        code, log, deployment.options[f"{name}-submitter"] = cluster.run(f"{name}-submitter", template, container,
                                                                          timeout=1800)
        status = podman("exec", head_name, "python", "-c",
                        "import sys; from ray.job_submission import JobSubmissionClient as C; "
                        "print(C('http://127.0.0.1:8265').get_job_status(sys.argv[1]).value)", submission,
                        check=False)
        return JobRun(submission, code, log, status.stdout.strip() or status.stderr[-2000:])
    finally:
        for container in [c for c in cluster.started if c.startswith(name)]:
            deployment.peaks[container] = deployment.memory.forget(container)
            cluster.remove(container)


# --------------------------------------------------------------------------------------------


def test_the_servers_run_with_their_pods_security_settings(deployment):
    """PostgreSQL and MLflow were checked inside (secured) once their probes passed; the Ray
    nodes are checked the same way in every RayJob below."""
    assert set(deployment.security) == {"mlflow-postgres", "mlflow"}
    assert "uid 999" in deployment.security["mlflow-postgres"] and "uid 1000" in deployment.security["mlflow"]


def test_a_missing_secret_that_is_not_optional_keeps_the_pod_from_starting(deployment):
    """As the kubelet: a Ray node without the Ray token's Secret is CreateContainerConfigError
    (a pod event, not a job log), which is why only the MLflow login's references are optional."""
    cluster = deployment.cluster
    token = deployment.rayjob["spec"]["rayClusterSpec"]["authOptions"]["secretName"]
    template, head, pod = kuberay.ray_node(deployment.rayjob, "no-token", None)
    saved = cluster.secrets.pop(token)
    try:
        with pytest.raises(ContainerConfigError, match=f'secret "{token}" not found'):
            cluster.options("no-token-head", template, head, pod=pod)
    finally:
        cluster.secrets[token] = saved
    cluster.options("no-token-head", template, head, pod=pod)  # with it, the options are made


def test_the_rayjob_runs_its_smoke_launch_and_leaves_runs_models_and_report(deployment):
    before = deployment.state()
    run = run_rayjob(deployment, deployment.rayjob)
    assert run.status == "SUCCEEDED", (run.log[-6000:] + f"\nmlflow running: {deployment.cluster.running('mlflow')}\n"
                                       + deployment.cluster.log("mlflow")[-3000:])
    assert run.code == 0, run.log[-6000:]
    print("\n--- the job's log ---\n" + run.log)
    experiments, runs, models = deployment.state()
    assert experiments > before[0] and runs > before[1] and models > before[2], (before, deployment.state())
    report = deployment.cluster.claims["timematch-cache"] / "results" / "smoke" / "report.md"
    assert report.is_file(), sorted(p.name for p in report.parent.parent.iterdir())
    for method in ("timematch", "fixmatch"):
        assert method in report.read_text().lower()
    assert {n for n in deployment.security if n.endswith(("-head", "-worker-0"))}, deployment.security
    show(deployment)


def show(deployment: Deployment) -> None:
    """What the closing note reports: the build, each container's options (secrets hidden), the
    Ray containers' peak memory."""
    print(f"\nbuild: {deployment.build_line} ({deployment.build_seconds:.0f} s in the test)")
    hidden = tuple(f"{k}=" for k in ("MLFLOW_TRACKING_PASSWORD", "POSTGRES_PASSWORD", "RAY_AUTH_TOKEN",
                                      "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"))
    for name, options in deployment.options.items():
        print(f"{name}: {' '.join('<secret>' if o.startswith(hidden) else o for o in options)}")
    for name, checked in deployment.security.items():
        print(f"checked inside {name}: {checked}")
    for name, peak in deployment.peaks.items():
        if peak:  # none for a container that ended before it was watched
            usage = deployment.memory.usage_peaks.get(name, 0)
            print(f"peak working set {name}: {peak / 2**30:.2f} GiB (with page cache {usage / 2**30:.2f} GiB)")


def one_error_line(log: str) -> str:
    """The launcher's one line, however often Ray's job log repeats it; no traceback."""
    lines = {line.strip() for line in log.splitlines() if line.strip().startswith("launch.py: error: ")}
    assert len(lines) == 1, log[-6000:]
    assert "Traceback" not in log, log[-6000:]
    return lines.pop()


def without_runner_secret(deployment: Deployment, rayjob: Document):
    deployment.cluster.secrets.pop(runner_secret())
    return rayjob, None, "requires a login"


def wrong_runner_password(deployment: Deployment, rayjob: Document):
    deployment.cluster.secrets[runner_secret()]["password"] = "wrong-" + secrets.token_hex(8)
    return rayjob, None, "rejected user 'runner'"


def unwritable_cache(deployment: Deployment, rayjob: Document):
    """A cache claim on storage that ignores fsGroup: root's folder, mode 0755."""
    folder = deployment.cluster.root / "volumes" / "root-owned-cache"
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, 0, 0)
    folder.chmod(0o755)
    deployment.cluster.claims["timematch-cache"] = folder
    deployment.cluster.ignores_fs_group.add("timematch-cache")
    return rayjob, None, "/cache/results: /cache is not a writable directory"


def data_volume_without_dataset(deployment: Deployment, rayjob: Document):
    """The gpu overlay's data volume, as it mounts it on the head, empty; --data-root at it."""
    gpu_head = the("gpu", "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    mount = next(m for m in gpu_head["spec"]["containers"][0]["volumeMounts"] if m["name"] == "data")
    volume = next(v for v in gpu_head["spec"]["volumes"] if v["name"] == "data")
    rayjob = copy.deepcopy(rayjob)
    rayjob["spec"]["entrypoint"] += f" --data-root {mount['mountPath']}"

    def mount_data(template: Document, container: Document) -> None:
        template["spec"]["volumes"].append(volume)
        container["volumeMounts"].append(mount)

    return rayjob, mount_data, f"data root {mount['mountPath']}: missing tile(s)"


@pytest.mark.parametrize("case", [without_runner_secret, wrong_runner_password, unwritable_cache,
                                  data_volume_without_dataset], ids=lambda case: case.__name__)
def test_bad_input_ends_the_job_with_one_line_and_nothing_in_mlflow(deployment, case):
    cluster = deployment.cluster
    saved = copy.deepcopy(cluster.secrets), dict(cluster.claims), set(cluster.ignores_fs_group)
    before = deployment.state()
    try:
        rayjob, head_fault, expected = case(deployment, deployment.rayjob)
        run = run_rayjob(deployment, rayjob, workers=0, head_fault=head_fault)
    finally:
        cluster.secrets, cluster.claims, cluster.ignores_fs_group = saved
    assert run.status == "FAILED", run.log[-6000:]
    line = one_error_line(run.log)
    assert expected in line, line
    print(f"\n{case.__name__}: {line}")
    assert deployment.state() == before
