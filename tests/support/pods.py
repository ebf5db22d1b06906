"""A pod's containers run with podman as the kubelet would run them (tests/test_image.py).

No kube-apiserver or kubelet can run here, so what they do for a container is done by hand,
from the rendered pod template and nothing copied into the test:

- the pod's and the container's ``securityContext`` become podman options: ``--user
  runAsUser:runAsGroup`` (refused where ``runAsNonRoot`` meets uid 0, as the kubelet does),
  ``--group-add fsGroup``, ``--security-opt no-new-privileges``, ``--cap-drop``/``--cap-add``,
  ``--read-only`` without podman's own tmpfs mounts; seccomp ``RuntimeDefault`` is podman's
  default profile;
- ``resources.limits`` become ``--cpus`` and ``--memory``;
- volumes: a ``persistentVolumeClaim`` is a host folder (``subPath`` a folder in it), group-owned
  by the pod's ``fsGroup`` with the set-gid bit as the kubelet leaves it, unless the claim is
  marked as storage that ignores fsGroup; an ``emptyDir`` is a tmpfs of its ``sizeLimit``
  if its medium is Memory, else a fresh host folder (mode 0777, the fsGroup's; its sizeLimit is
  not enforced, as the kubelet evicts rather than refuses); a ``configMap`` is its files,
  read-only;
- ``env``: values, ``secretKeyRef`` (a missing Secret or key refuses to start the container,
  CreateContainerConfigError, unless the reference is ``optional``), ``configMapKeyRef``,
  ``fieldRef`` and ``envFrom`` configMaps; ``$(NAME)`` in command and args expanded;
- ``command`` replaces the image's entrypoint and ``args`` its command;
- the pods share one podman network, each Service reachable by its name (network aliases);
- probes (``exec`` and ``httpGet``) run inside the container.

NetworkPolicies, scheduling and restarts are not emulated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.manifests import K8S, NAMESPACE

Document = dict[str, Any]

CONTAINERS_CONF = K8S / "local" / "containers.conf"
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env(),
                          **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def quantity_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match, value
    return int(float(match.group(1)) * _UNITS.get(match.group(2), 1))


def quantity_cpus(value: str) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(NAME)`` expansion in command and args; ``$$`` escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def dns_names(service: str) -> tuple[str, ...]:
    """The names a Service answers to inside the cluster: short, namespaced, fully qualified."""
    return service, f"{service}.{NAMESPACE}", f"{service}.{NAMESPACE}.svc.cluster.local"


class ContainerConfigError(RuntimeError):
    """What the kubelet reports as CreateContainerConfigError: the container is not started."""


@dataclass
class Cluster:
    """The namespace's Secrets, ConfigMaps and claims, and the network its pods share."""

    root: Path
    network: str
    secrets: dict[str, dict[str, str]]
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    #: claim name -> host folder
    claims: dict[str, Path] = field(default_factory=dict)
    #: claims on storage that ignores fsGroup (the folder keeps its owner and mode)
    ignores_fs_group: set[str] = field(default_factory=set)
    #: image named by a manifest -> the image run instead (a stand-in where no registry is reachable)
    images: dict[str, str] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)

    # -- objects ---------------------------------------------------------------------------

    def claim(self, name: str) -> Path:
        if name not in self.claims:
            self.claims[name] = self.root / "volumes" / name
            self.claims[name].mkdir(parents=True, exist_ok=True)
        return self.claims[name]

    def _env_value(self, source: Document, pod: dict[str, str], where: str) -> str | None:
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "secretKeyRef" if "secretKeyRef" in source else "configMapKeyRef"
            ref = source[kind]
            store = self.secrets if kind == "secretKeyRef" else self.configmaps
            found = store.get(ref["name"], {}).get(ref["key"])
            if found is None and not ref.get("optional", False):
                what = "secret" if kind == "secretKeyRef" else "configmap"
                missing = f'{what} "{ref["name"]}" not found' if ref["name"] not in store else \
                    f'couldn\'t find key {ref["key"]} in {what} {NAMESPACE}/{ref["name"]}'
                raise ContainerConfigError(f"{where}: CreateContainerConfigError: {missing}")
            return found
        if "fieldRef" in source:
            return pod[source["fieldRef"]["fieldPath"]]
        raise AssertionError(f"{where}: unsupported env source {source}")

    def environment(self, container: Document, pod: dict[str, str], where: str) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.configmaps[source["configMapRef"]["name"]])
            else:
                raise AssertionError(f"{where}: unsupported envFrom {source}")
        for entry in container.get("env", []):
            value = expand(entry["value"], env) if "value" in entry else \
                self._env_value(entry["valueFrom"], pod, where)
            if value is not None:
                env[entry["name"]] = value
        return env

    # -- running ---------------------------------------------------------------------------

    def options(self, name: str, template: Document, container: Document, aliases: tuple[str, ...] = (),
                pod: dict[str, str] | None = None) -> tuple[list[str], list[str], dict[str, str]]:
        """(podman run options, the entrypoint and arguments after the image, the environment)."""
        spec = template["spec"]
        security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
        where = f"{name}/{container['name']}"
        pod = {"metadata.name": name, "metadata.namespace": NAMESPACE, **(pod or {})}
        env = self.environment(container, pod, where)
        options = ["--name", name, "--hostname", name[:63], "--network", self.network]
        for alias in aliases:
            options += ["--network-alias", alias]
        user, group = security.get("runAsUser"), security.get("runAsGroup")
        if security.get("runAsNonRoot") and user in (None, 0):
            raise ContainerConfigError(f"{where}: container has runAsNonRoot and image will run as root")
        if user is not None:
            options += ["--user", f"{user}:{group if group is not None else user}"]
        if spec.get("securityContext", {}).get("fsGroup") is not None:
            options += ["--group-add", str(spec["securityContext"]["fsGroup"])]
        if security.get("allowPrivilegeEscalation") is False:
            options += ["--security-opt", "no-new-privileges"]
        for cap in security.get("capabilities", {}).get("drop", []):
            options += ["--cap-drop", cap]
        for cap in security.get("capabilities", {}).get("add", []):
            options += ["--cap-add", cap]
        if security.get("readOnlyRootFilesystem"):
            options += ["--read-only", "--read-only-tmpfs=false"]
        assert security.get("seccompProfile", {"type": "RuntimeDefault"})["type"] == "RuntimeDefault", where
        limits = container.get("resources", {}).get("limits", {})
        if "cpu" in limits:
            options += ["--cpus", f"{quantity_cpus(limits['cpu']):g}"]
        if "memory" in limits:
            options += ["--memory", str(quantity_bytes(limits["memory"]))]
        options += self._mounts(name, spec, container)
        for key, value in env.items():
            options += ["--env", f"{key}={value}"]
        entry = [expand(part, env) for part in container.get("command", [])]
        args = [expand(part, env) for part in container.get("args", [])]
        if entry:
            options += ["--entrypoint", json.dumps(entry[:1])]
            tail = entry[1:] + args
        else:
            tail = args
        return options, tail, env

    def _mounts(self, name: str, spec: Document, container: Document) -> list[str]:
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        fs_group = spec.get("securityContext", {}).get("fsGroup")
        options: list[str] = []
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            path, read_only = mount["mountPath"], mount.get("readOnly", False)
            if volume.get("emptyDir", {}).get("medium") == "Memory":
                size = volume["emptyDir"].get("sizeLimit")
                options += ["--mount", f"type=tmpfs,destination={path},tmpfs-mode=1777"
                            + (f",tmpfs-size={quantity_bytes(size)}" if size else "")]
                continue
            if "emptyDir" in volume:
                # a fresh folder, mode 0777 (the kubelet's), group-owned by fsGroup; podman's
                # tmpfs would keep the mode of a folder the image has at that path
                source = self.root / "emptydirs" / name / mount["name"]
                source.mkdir(parents=True, exist_ok=True)
                if fs_group is not None:
                    os.chown(source, -1, fs_group)
                source.chmod(0o2777 if fs_group is not None else 0o777)
                options += ["--volume", f"{source}:{path}:rw"]
                continue
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                source = self.claim(claim)
                if mount.get("subPath"):
                    source = source / mount["subPath"]
                    source.mkdir(exist_ok=True)
                if fs_group is not None and claim not in self.ignores_fs_group:
                    for folder in {self.claim(claim), source}:
                        os.chown(folder, -1, fs_group)
                        folder.chmod(0o2775)
            elif "configMap" in volume:
                source = self.root / "configmaps" / name / mount["name"]
                source.mkdir(parents=True, exist_ok=True)
                for key, text in self.configmaps[volume["configMap"]["name"]].items():
                    (source / key).write_text(text)
                read_only = True
            else:
                raise AssertionError(f"{name}: unsupported volume {volume}")
            options += ["--volume", f"{source}:{path}:{'ro' if read_only else 'rw'}"]
        return options

    def image(self, container: Document) -> str:
        return self.images.get(container["image"], container["image"])

    def start(self, name: str, template: Document, container: Document, aliases: tuple[str, ...] = (),
              pod: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> list[str]:
        """Starts the container in the background; its podman options are returned. ``extra``:
        options no manifest gives (a published port, as ``kubectl port-forward`` would give)."""
        options, tail, _ = self.options(name, template, container, aliases, pod)
        options += list(extra)
        podman("rm", "-f", name, check=False)
        podman("run", "--detach", *options, self.image(container), *tail)
        self.started.append(name)
        return options

    def run(self, name: str, template: Document, container: Document, timeout: float = 900,
            pod: dict[str, str] | None = None) -> tuple[int, str, list[str]]:
        """Runs the container to its end (an init container, a Job's pod): (exit code, log, its
        podman options)."""
        options = self.start(name, template, container, pod=pod)
        done = podman("wait", name, check=False, timeout=timeout)
        code = int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else -1
        return code, self.log(name), options

    def log(self, name: str) -> str:
        done = podman("logs", name, check=False)
        return done.stdout + done.stderr

    def running(self, name: str) -> bool:
        done = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
        return done.stdout.strip() == "true"

    def inspect(self, name: str) -> Document:
        return json.loads(podman("inspect", name).stdout)[0]

    def memory_folder(self, name: str) -> Path | None:
        """The container's cgroup v1 memory folder, or None (cgroup v2, or the container ended)."""
        path = podman("inspect", "--format", "{{.State.CgroupPath}}", name, check=False).stdout.strip()
        folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
        return folder if path and (folder / "memory.stat").is_file() else None

    def probe(self, name: str, container: Document, probe: Document) -> subprocess.CompletedProcess:
        """Runs a probe inside the container, as the kubelet runs it (httpGet from inside, since
        the kubelet's request reaches the pod's own address)."""
        if "exec" in probe:
            return podman("exec", name, *probe["exec"]["command"], check=False, timeout=60)
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = get["port"]
            if not str(port).isdigit():
                port = next(p["containerPort"] for p in container.get("ports", []) if p["name"] == port)
            url = f"http://127.0.0.1:{port}{get.get('path', '/')}"
            code = ("import sys, urllib.request\n"
                    f"answer = urllib.request.urlopen({url!r}, timeout={probe.get('timeoutSeconds', 1) + 4})\n"
                    "sys.exit(0 if 200 <= answer.status < 400 else 1)")
            return podman("exec", name, "python", "-c", code, check=False, timeout=60)
        raise AssertionError(f"{name}: unsupported probe {probe}")

    def wait_probe(self, name: str, container: Document, probe: Document, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = self.probe(name, container, probe)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline or not self.running(name):
                raise TimeoutError(f"{name}: probe {probe} failed: {done.stdout[-500:]}{done.stderr[-500:]}\n"
                                   f"log:\n{self.log(name)[-3000:]}")
            time.sleep(1)

    def remove(self, name: str) -> None:
        podman("rm", "-f", "-t", "5", name, check=False)
        if name in self.started:
            self.started.remove(name)

    def close(self) -> None:
        for name in reversed(list(self.started)):
            self.remove(name)
        podman("network", "rm", "-f", self.network, check=False)
        for folder in ("configmaps", "emptydirs"):
            shutil.rmtree(self.root / folder, ignore_errors=True)


class WorkingSetWatch:
    """The peak working set of containers while they run: usage less inactive page cache, what
    the kubelet counts against a limit and Ray's memory monitor reads; sampled every 0.5 s."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self.peaks, self.folders = cluster, {}, {}
        #: the cgroup's own peak, page cache included (max_usage_in_bytes)
        self.usage_peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, name: str) -> None:
        folder = self.cluster.memory_folder(name)
        if folder is not None:
            self.folders[name] = folder

    def _sample(self, name: str, folder: Path) -> None:
        try:
            usage = int((folder / "memory.usage_in_bytes").read_text())
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            return  # the container has ended
        working = usage - int(stat.get("total_inactive_file", 0))
        self.peaks[name] = max(self.peaks.get(name, 0), working)
        try:
            self.usage_peaks[name] = int((folder / "memory.max_usage_in_bytes").read_text())
        except (OSError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for name, folder in list(self.folders.items()):
                self._sample(name, folder)

    def forget(self, name: str) -> int | None:
        """The container's peak so far, no longer sampled."""
        folder = self.folders.pop(name, None)
        if folder is not None:
            self._sample(name, folder)
        return self.peaks.get(name)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
