"""Real services on this machine for the cluster tests and benchmarks/cluster.py: a PostgreSQL
server, the project's MLflow server (``mlflow/server.sh``, basic auth on), and a Ray cluster of
several nodes started with ``ray start``.

Every process starts in its own session (process group), so :meth:`Services.stop` stops exactly
what was started (never ``ray stop``, which stops every Ray of the machine), and
:meth:`Services.kill` can take one node down hard.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: Ray's object store per node: trials exchange only small configs and results.
OBJECT_STORE_BYTES = 150 * 1024**2
ADMIN = ("admin", "admin-" + secrets.token_hex(8))
RUNNER = ("runner", "runner-" + secrets.token_hex(8))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, what: str, timeout: float, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:g} s\n{log}")


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    env.update(extra)
    return env


@dataclass
class Services:
    """Processes started for a test, each in its own process group, logged under ``root``."""

    root: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    cleanup: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A SIGTERM (a CI timeout, `kill`) would end pytest without its teardown and leave the
        # servers running; as KeyboardInterrupt, the fixtures stop what they started.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env or base_env(),
                                   cwd=REPO, start_new_session=True)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.is_file() else ""

    def alive(self, name: str) -> bool:
        return self.processes[name].poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group of ``name`` (SIGKILL: a node lost without a word)."""
        process = self.processes[name]
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 30) -> None:
        """Stop everything, the last started first; SIGKILL what is still there after ``timeout``."""
        for name in reversed(list(self.processes)):
            self.kill(name, signal.SIGTERM)
            try:
                self.processes[name].wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            self.kill(name, signal.SIGKILL)  # the rest of the group (Ray's raylet, workers, ...)
            try:
                self.processes[name].wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# -- PostgreSQL ---------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server binaries (``initdb``, ``postgres``), or None."""
    candidates = [shutil.which("pg_ctl"), shutil.which("initdb")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    for candidate in filter(None, candidates):
        directory = Path(os.path.realpath(candidate)).parent
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    return None


def start_postgres(services: Services, database: str = "mlflow") -> str:
    """A fresh PostgreSQL on a free port; returns the SQLAlchemy URL of an empty database."""
    bin_dir = postgres_bin()
    assert bin_dir is not None, "no PostgreSQL server binaries"
    # initdb refuses to run as root: as root, the cluster belongs to the postgres user, in a
    # folder that user can reach (pytest's own temporary folders are private to root).
    as_user: list[str] = []
    home = Path(tempfile.mkdtemp(prefix="timematch-pg-"))
    services.cleanup.append(home)
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(home, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = home / "data"
    subprocess.run(as_user + [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "mlflow",
                              "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    port = free_port()
    services.start("postgres", as_user + [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                                          "-k", str(home), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])

    def ready() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(ready, "PostgreSQL", 30, services.log("postgres"))
    createdb = bin_dir / "createdb"
    for _ in range(20):  # the port opens a moment before connections are accepted
        done = subprocess.run(as_user + [str(createdb), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", database],
                              capture_output=True, text=True)
        if done.returncode == 0:
            break
        time.sleep(0.5)
    else:
        raise RuntimeError(f"createdb failed: {done.stderr}")
    return f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/{database}"


# -- MLflow ---------------------------------------------------------------------------------


def start_mlflow(services: Services, store: str, auth_db: str | None = None, port: int | None = None) -> str:
    """``mlflow/server.sh --auth`` on ``store`` (artifacts served by the server); creates the
    runner user; returns the server's URL. Started again on the same ``port`` and store, it is
    the same server back (a restart)."""
    port = port or free_port()
    artifacts = services.root / "mlflow" / "artifacts"
    artifacts.parent.mkdir(parents=True, exist_ok=True)
    argv = ["bash", str(REPO / "mlflow" / "server.sh"), "--store", store, "--artifacts", str(artifacts),
            "--port", str(port), "--auth"]
    if auth_db:
        argv += ["--auth-db", auth_db]
    services.start("mlflow", argv, base_env(MLFLOW_BIN=str(BIN / "mlflow"), MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1]))
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(ready, "the MLflow server", 120, services.log("mlflow"))
    subprocess.run([sys.executable, "-m", "timematch.runner.accounts", "--tracking-uri", url], check=True,
                   env=base_env(MLFLOW_TRACKING_USERNAME=RUNNER[0], MLFLOW_TRACKING_PASSWORD=RUNNER[1],
                                MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1]), capture_output=True)
    return url


def runner_env(**extra: str) -> dict[str, str]:
    """The environment of a launch that logs as the runner user."""
    return base_env(MLFLOW_TRACKING_USERNAME=RUNNER[0], MLFLOW_TRACKING_PASSWORD=RUNNER[1], **extra)


# -- Ray --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayCluster:
    address: str
    env: dict[str, str]  # what a driver needs to join (the auth token)
    nodes: tuple[str, ...]  # service names: "ray-head", "ray-worker-1", ...


def start_ray(services: Services, cpus_per_node: tuple[int, ...]) -> RayCluster:
    """A head (``cpus_per_node[0]`` CPUs) and one worker node per further entry, with Ray's token
    authentication on, as on the k8s/ clusters."""
    token = secrets.token_hex(32)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--object-store-memory", str(OBJECT_STORE_BYTES), "--node-ip-address", "127.0.0.1", "--block",
              "--disable-usage-stats"]
    def joined() -> int:
        try:
            status = subprocess.run([str(BIN / "ray"), "status", "--address", address], capture_output=True,
                                    text=True, env=base_env(**env), timeout=30)
        except subprocess.TimeoutExpired:
            return 0
        if status.returncode != 0:
            return 0
        return len(re.findall(r"^\s+1 node_[0-9a-f]{16,}\s*$", status.stdout, flags=re.MULTILINE))

    # One node at a time, each joined before the next starts: on a 2-core machine, raylets
    # starting together (beside an MLflow server) can miss the GCS's registration deadline;
    # a node whose `ray start` gave up is started again.
    names = []
    for index, cpus in enumerate(cpus_per_node):
        name = "ray-head" if index == 0 else f"ray-worker-{index}"
        where = ["--head", "--port", str(port), "--include-dashboard=false"] if index == 0 else ["--address", address]
        resources = f'{{"node_{index}": 1}}'
        argv = [str(BIN / "ray"), "start", *where, "--num-cpus", str(cpus), "--num-gpus", "0",
                "--resources", resources, *common]
        names.append(name)
        for attempt in range(3):
            services.start(name, argv, base_env(**env))
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and services.alive(name) and joined() < index + 1:
                time.sleep(1)
            if joined() >= index + 1:
                break
            services.kill(name)
            services.processes[name].wait(10)
        else:
            raise TimeoutError(f"Ray node {name} did not join after 3 attempts\n{services.log(name)}")
    return RayCluster(address, env, tuple(names))
