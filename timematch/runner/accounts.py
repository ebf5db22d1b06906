"""Create (or update) the MLflow user that launches log as, on a server running MLflow's
basic-auth app: ``python -m timematch.runner.accounts --tracking-uri URL``.

The user is the one the runner logs as, from ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``; the admin from ``MLFLOW_AUTH_ADMIN_USERNAME`` (default
``admin``) / ``MLFLOW_AUTH_ADMIN_PASSWORD``, the variables the server bootstraps its admin
from. Both come from Secrets in k8s/ (the ``mlflow-runner-user`` Job runs this) and from the
environment locally. Idempotent: an existing user gets the password anew. Waits up to
``--wait`` seconds for the server to answer.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request

from timematch.errors import ConfigError


def _call(base: str, method: str, path: str, admin: tuple[str, str], body: dict) -> tuple[int, str]:
    token = base64.b64encode(f"{admin[0]}:{admin[1]}".encode()).decode()
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), method=method,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _wait(base: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5):
                return
        except (urllib.error.URLError, OSError) as err:
            if time.monotonic() > deadline:
                raise ConfigError(f"--tracking-uri {base}: no answer within {seconds:g} s ({err})") from None
            time.sleep(2)


def ensure_user(uri: str, user: str, password: str, admin: tuple[str, str], wait_s: float = 0) -> str:
    """Create ``user`` with ``password`` on the server at ``uri`` (or set its password); returns what was done."""
    base = uri.rstrip("/")
    _wait(base, wait_s)
    status, text = _call(base, "POST", "/api/2.0/mlflow/users/create", admin, {"username": user, "password": password})
    if status == 200:
        return "created"
    if status in (401, 403):
        raise ConfigError(f"{base}: the admin {admin[0]!r} was refused (HTTP {status}); check MLFLOW_AUTH_ADMIN_PASSWORD")
    if "exist" not in text.lower():
        raise ConfigError(f"{base}: creating user {user!r} failed (HTTP {status}: {text.strip()[:300]})")
    status, text = _call(base, "PATCH", "/api/2.0/mlflow/users/update-password", admin,
                         {"username": user, "password": password})
    if status != 200:
        raise ConfigError(f"{base}: updating the password of {user!r} failed (HTTP {status}: {text.strip()[:300]})")
    return "password updated"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timematch.runner.accounts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="the MLflow server (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for the server to answer (default: 0)")
    args = parser.parse_args(argv)
    env = os.environ
    try:
        missing = [name for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD")
                   if not env.get(name)]
        if missing or not args.tracking_uri:
            raise ConfigError("set " + ", ".join(missing or ["--tracking-uri or MLFLOW_TRACKING_URI"]))
        user = env["MLFLOW_TRACKING_USERNAME"]
        admin = (env.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin", env["MLFLOW_AUTH_ADMIN_PASSWORD"])
        done = ensure_user(args.tracking_uri, user, env["MLFLOW_TRACKING_PASSWORD"], admin, args.wait)
    except ConfigError as err:
        print(f"accounts: error: {err}", file=sys.stderr)
        return 2
    print(f"MLflow user {user!r} at {args.tracking_uri}: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
