"""Ray: the environment, connecting (local or an existing cluster), and per-trial resources."""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from timematch.errors import ConfigError
from timematch.runner.gpu_share import auto_share

#: Set before Ray or MLflow start anything (see stack notes): no telemetry, token auth off
#: everywhere (a head and a worker in different modes cannot join), no config-table output.
ENVIRONMENT = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # the report reads the launch's plan back from MLflow: no progress bar on the terminal
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    # Save Tune's experiment state every second (default: every 10 s or more), so that a
    # killed launch loses at most the last second of trial bookkeeping on --resume.
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
}
#: Object store of a local Ray instance: trials exchange only small configs and results.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
CONNECT_TIMEOUT_S = 3.0


def set_environment() -> None:
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def quiet_logs(verbose: bool) -> None:
    """Keep the terminal to the runner's own progress lines; errors reach it through them."""
    if verbose:
        return
    import mlflow  # noqa: F401 - sets its logger's level on import: quiet it afterwards
    import optuna

    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def check_address(address: str | None) -> None:
    """Fail fast when ``--address`` cannot be reached (Ray itself retries for a minute)."""
    if address is None or address == "auto":
        return  # local, or Ray finds the cluster of this node (an error at once when there is none)
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if parsed.scheme not in ("ray", "gcs") or not parsed.hostname or not parsed.port:
        raise ConfigError(
            f"--address {address!r}: use 'auto' (inside a cluster), 'ray://HOST:PORT' (Ray client, "
            "usually port 10001) or 'HOST:PORT' (the head's GCS, usually port 6379)"
        )
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(
            f"--address {address!r}: cannot reach {parsed.hostname}:{parsed.port} ({err.strerror or err}); "
            "is the Ray head running and the port open?"
        ) from None


@dataclass(frozen=True)
class Cluster:
    """What the connected Ray cluster offers."""

    address: str
    cpus: float
    gpus: float
    nodes: int
    max_node_cpus: float
    started_here: bool
    gpu_type: str | None = None  # the GPU model (Ray's accelerator type, or this machine's)


def connect(address: str | None, verbose: bool = False) -> Cluster:
    """Start a local Ray instance (``address`` None) or join a cluster; reuse one already joined."""
    set_environment()
    quiet_logs(verbose)
    import ray

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                                  "logging_level": logging.INFO if verbose else logging.WARNING}
        if address is None:
            # "local": a new instance even when another one runs on this machine (plain
            # ray.init() would join that one).
            kwargs.update(address="local", object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        else:
            check_address(address)
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as err:
            where = f"--address {address!r}" if address else "starting a local Ray instance"
            raise ConfigError(f"{where}: {type(err).__name__}: {err}") from None
        started = address is None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    resources = ray.cluster_resources()
    types = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    return Cluster(
        address=address or "local",
        cpus=float(resources.get("CPU", 0)),
        gpus=float(resources.get("GPU", 0)),
        nodes=len(nodes),
        max_node_cpus=max((float(n["Resources"].get("CPU", 0)) for n in nodes), default=0.0),
        started_here=started,
        gpu_type=types[0] if types else _local_gpu(),
    )


def _local_gpu() -> str | None:
    """This machine's GPU model, if it has one (a local cluster's GPUs are this machine's)."""
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no GPU model known: auto says so
        return None


def disconnect(cluster: Cluster) -> None:
    import ray

    if cluster.started_here and ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class TrialResources:
    cpus: float
    gpus: float
    max_concurrent_per_group: int
    slots: int  # trials the cluster runs at once
    gpus_reason: str = ""  # how --gpus-per-trial auto chose

    def as_ray(self) -> dict[str, float]:
        return {"cpu": self.cpus, "gpu": self.gpus}

    def describe_gpus(self) -> str:
        return f"{self.gpus:g}" + (f" ({self.gpus_reason})" if self.gpus_reason else "")


def trial_resources(
    cluster: Cluster, cpus: float | str | None, gpus: float | str | None, max_concurrent: int | str | None
) -> TrialResources:
    """Per-trial resources: the flags, else the profile, else ``auto``.

    auto: no GPU on a CPU cluster, else the share at which the measured aggregate throughput
    of the cluster's GPU model stops rising (:mod:`timematch.runner.gpu_share`); one CPU per
    trial on a CPU cluster, else the node's CPUs shared among its GPU trials. Raises when a
    trial could never be placed.
    """
    gpus_reason = ""
    if gpus in (None, "auto"):
        if cluster.gpus > 0:
            share = auto_share(cluster.gpu_type)
            gpus, gpus_reason = share.gpus, share.reason
        else:
            gpus = 0.0
    gpus = float(gpus)
    if gpus > 1 and not gpus.is_integer():
        raise ConfigError(f"--gpus-per-trial {gpus}: above 1 it must be a whole number (Ray's rule)")
    if gpus > 0 and cluster.gpus == 0:
        raise ConfigError(f"--gpus-per-trial {gpus}: the cluster has no GPU; use --gpus-per-trial 0")
    if gpus > cluster.gpus:
        raise ConfigError(f"--gpus-per-trial {gpus}: the cluster has only {cluster.gpus:g} GPU(s)")
    if cpus in (None, "auto"):
        if gpus > 0:
            trials_per_gpu_node = max(1, math.floor(cluster.gpus / gpus / max(cluster.nodes, 1)))
            cpus = max(1, min(4, math.floor(cluster.max_node_cpus / trials_per_gpu_node)))
        else:
            cpus = 1
    cpus = float(cpus)
    if cpus <= 0 and gpus <= 0:
        raise ConfigError("a trial needs some CPU or GPU: --cpus-per-trial must be > 0")
    if cpus > cluster.max_node_cpus:
        raise ConfigError(
            f"--cpus-per-trial {cpus:g}: no node has that many CPUs (largest: {cluster.max_node_cpus:g})"
        )
    slots = math.floor(cluster.cpus / cpus) if cpus > 0 else 10**6
    if gpus > 0:
        slots = min(slots, math.floor(cluster.gpus / gpus))
    slots = max(1, slots)
    if max_concurrent in (None, "auto"):
        max_concurrent = slots
    max_concurrent = max(1, min(int(max_concurrent), slots))
    return TrialResources(cpus=cpus, gpus=gpus, max_concurrent_per_group=max_concurrent, slots=slots,
                          gpus_reason=gpus_reason)


def local_cluster() -> Cluster:
    """This machine as a cluster, for ``--dry-run`` without connecting."""
    cpus = float(os.cpu_count() or 1)
    gpus = 0.0
    try:
        gpus = float(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - a dry run only estimates
        pass
    return Cluster(address="local", cpus=cpus, gpus=gpus, nodes=1, max_node_cpus=cpus, started_here=False,
                   gpu_type=_local_gpu() if gpus else None)
