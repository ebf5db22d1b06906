"""Create (or update) the MLflow user that launches log as, on a server running MLflow's
basic-auth app: ``python -m timematch.runner.accounts --tracking-uri URL``.

The user is the one the runner logs as, from ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``; the admin from ``MLFLOW_AUTH_ADMIN_USERNAME`` (default
``admin``) / ``MLFLOW_AUTH_ADMIN_PASSWORD``, the variables the server bootstraps its admin
from. Both come from Secrets in k8s/ (the ``mlflow-runner-user`` Job runs this) and from the
environment locally. Idempotent: an existing user gets the password anew. Waits up to
``--wait`` seconds for the server to answer.

``--wait-for-login S`` (the Ray head's init container in k8s/) creates nothing: it waits for the
server (``--wait``), then up to S seconds for the runner's own login to be accepted, since the
``mlflow-runner-user`` Job may create the user after the head starts; it exits 0 either way,
saying what it saw, so that a launch with a wrong or missing login ends with the launcher's
own one-line error in the job's log.
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
from timematch.runner.tracking import LOGIN_CHECK_PATH


def _call(base: str, method: str, path: str, admin: tuple[str, str], body: dict | None) -> tuple[int, str]:
    token = base64.b64encode(f"{admin[0]}:{admin[1]}".encode()).decode()
    request = urllib.request.Request(
        base + path, data=None if body is None else json.dumps(body).encode(), method=method,
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


def wait_for_login(uri: str, login: tuple[str, str] | None, wait_s: float, login_s: float) -> str:
    """Wait for the server, then up to ``login_s`` for ``login`` to be accepted; what was seen."""
    base = uri.rstrip("/")
    _wait(base, wait_s)
    if login is None:
        return "the server answers; no login is given (the launch will say so)"
    deadline = time.monotonic() + login_s
    while True:
        status, _ = _call(base, "GET", LOGIN_CHECK_PATH, login, None)
        if status != 401:  # the launcher's own check (tracking.check_tracking) then passes the login
            return f"the server accepts user {login[0]!r}"
        if time.monotonic() > deadline:
            return f"the server still refuses user {login[0]!r} after {login_s:g} s (the launch will say so)"
        print(f"waiting for the MLflow server at {base} to accept user {login[0]!r} (the mlflow-runner-user Job "
              "creates it)", flush=True)
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timematch.runner.accounts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="the MLflow server (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for the server to answer (default: 0)")
    parser.add_argument("--wait-for-login", type=float, metavar="S",
                        help="create nothing: wait for the server, then up to S seconds for the login of "
                             "MLFLOW_TRACKING_USERNAME/PASSWORD to be accepted; exit 0 either way")
    args = parser.parse_args(argv)
    env = os.environ
    try:
        if args.wait_for_login is not None:
            if not args.tracking_uri:
                raise ConfigError("set --tracking-uri or MLFLOW_TRACKING_URI")
            login = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) \
                if env.get("MLFLOW_TRACKING_USERNAME") and env.get("MLFLOW_TRACKING_PASSWORD") else None
            print(f"accounts: {args.tracking_uri}: " + wait_for_login(args.tracking_uri, login, args.wait,
                                                                         args.wait_for_login))
            return 0
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
