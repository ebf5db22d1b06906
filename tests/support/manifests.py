"""The Kubernetes manifests of k8s/ as ``kubectl apply -k`` would send them (tests/test_k8s_manifests.py
checks them, tests/test_image.py runs their pods)."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
NAMESPACE = "timematch"
#: The Secrets k8s/create-secrets.sh makes, with their keys.
SECRETS_SCRIPT = K8S / "create-secrets.sh"

Document = dict[str, Any]

kubectl = shutil.which("kubectl")


@functools.cache
def kubectl_problem() -> str | None:
    """Why the overlays cannot be rendered here, or None."""
    if kubectl is None:
        return "kubectl not found: the overlays cannot be rendered (install kubectl 1.27+; .ci/run does)"
    done = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    version = yaml.safe_load(done.stdout or "{}").get("kustomizeVersion", "")
    if not re.match(r"v?[5-9]\.", version):
        return f"kubectl's kustomize is {version or 'unknown'}; the overlays need kustomize v5 (kubectl 1.27+)"
    return None


# --------------------------------------------------------------------------------------------
# Rendering


@functools.cache
def rendered(overlay: str) -> tuple[Document, ...]:
    """What ``kubectl apply -k k8s/overlays/<overlay>`` would create."""
    if kubectl_problem():
        pytest.skip(kubectl_problem())
    done = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def of_kind(overlay: str, kind: str) -> list[Document]:
    return [d for d in rendered(overlay) if d["kind"] == kind]


def named(overlay: str, kind: str) -> dict[str, Document]:
    """The overlay's objects of a kind, by name."""
    return {d["metadata"]["name"]: d for d in of_kind(overlay, kind)}


def the(overlay: str, kind: str, name: str | None = None) -> Document:
    found = [d for d in of_kind(overlay, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind}{f' named {name!r}' if name else ''}, found {len(found)}"
    return found[0]


def script_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the ``secret NAME KEY=... KEY=...`` lines of create-secrets.sh."""
    found: dict[str, set[str]] = {}
    for line in SECRETS_SCRIPT.read_text().splitlines():
        match = re.match(r"^secret (\S+) (.+)$", line)
        if match:
            found[match.group(1)] = set(re.findall(r'"?(\S+?)=', match.group(2)))
    return found
