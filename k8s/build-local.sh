#!/usr/bin/env bash
# Builds the image of Dockerfile with podman on a machine that cannot reach an image registry:
# the base is Debian 12's Python 3.11, made from Debian packages with debootstrap, and pip
# installs from a wheelhouse of the project's pinned wheels (torch's CPU build), fetched once
# with this machine's pip settings. Layers, the base and the wheelhouse are kept between runs,
# so a rebuild after a code change takes seconds. Needs root (debootstrap), podman, runc and
# debootstrap: apt-get install -y podman runc debootstrap.
#
#   bash k8s/build-local.sh                  # -> timematch:<ray version>-local (k8s/overlays/cpu-small's image)
#   bash k8s/build-local.sh --postgres       # also the PostgreSQL stand-in tests/test_image.py runs
#   bash k8s/build-local.sh --tag NAME --no-cache
#
# With Docker Hub the Dockerfile needs none of this: docker build -t timematch:2.60.0 .
# Environment: DEBIAN_MIRROR (default: the mirror of this machine's apt sources),
# TIMEMATCH_IMAGE_CACHE (default ~/.cache/timematch-image: the wheelhouse).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "build-local.sh: $*" >&2; exit 2; }
say() { echo "build-local.sh: $*" >&2; }

ray_version=$(sed -n 's/^ARG RAY_VERSION=//p' Dockerfile)
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
tag="timematch:${ray_version}-local"
cache_flag=()
postgres=false
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
        --no-cache) cache_flag=(--no-cache); shift ;;
        --postgres) postgres=true; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

command -v podman >/dev/null || die "podman not found; install it: apt-get install -y podman runc debootstrap"
# runc, cgroupfs, no default ulimits: what podman needs here (k8s/local/containers.conf says why)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/k8s/local/containers.conf}"
python=$(command -v python3.11 || command -v python3) || die "python3.11 not found: it fetches the wheelhouse"
cache="${TIMEMATCH_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/timematch-image}"
base=localhost/timematch-python:3.11-bookworm
started=$(date +%s)

# 1. The base: Debian 12's python3.11 in a virtual environment on PATH, so that `python` and
# `pip install` work as in python:3.11-slim (Debian's own Python refuses pip, PEP 668).
if ! podman image exists "$base"; then
    command -v debootstrap >/dev/null || die "debootstrap not found; install it: apt-get install -y debootstrap"
    [[ $(id -u) -eq 0 ]] || die "making the base image needs root (debootstrap); run as root once, or build with Docker Hub's python:3.11-slim"
    mirror="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    say "making $base from Debian 12 packages ($mirror) ..."
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null \
        || die "debootstrap from $mirror failed; set DEBIAN_MIRROR to a Debian mirror this machine reaches"
    chroot "$rootfs" python3 -m venv /opt/python
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import -q \
        --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python"]' - "$base" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

# 2. The wheelhouse: torch's CPU build and every pinned dependency (the project's, the [server]
# extra, Ray's extras the Dockerfile adds, the build backend), for CPython 3.11 on x86-64.
wheels="$cache/wheels"
mkdir -p "$wheels"
mapfile -t requirements < <("$python" - <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
project = p["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["server"] + p["build-system"]["requires"]))
PY
)
requirements+=("ray[default,tune,client]==$ray_version")
# Fetched again only when the requirements change (the stamp holds what was fetched).
wanted=$(printf '%s\n' "torch==$torch_version" "${requirements[@]}")
if [[ "$(cat "$wheels/.requirements" 2>/dev/null)" != "$wanted" ]]; then
    say "wheelhouse $wheels: torch==$torch_version and ${#requirements[@]} requirements ..."
    rm -f "$wheels/.requirements"
    "$python" -m pip download --quiet --disable-pip-version-check --dest "$wheels" --only-binary=:all: \
        --python-version 3.11 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform linux_x86_64 "torch==$torch_version" "${requirements[@]}" 2> >(grep -v "is ignored" >&2) \
        || die "could not fetch the wheels into $wheels (pip's index settings: pip config list)"
    echo "$wanted" > "$wheels/.requirements"
fi

# 3. The image, from the Dockerfile unchanged but for its base and pip's source.
say "building $tag ..."
podman build --layers "${cache_flag[@]}" --network host --tag "$tag" \
    --build-arg "PYTHON_IMAGE=$base" \
    --build-arg "PIP_INSTALL_OPTIONS=--no-index --find-links /wheels" \
    --volume "$wheels:/wheels:ro" \
    --file Dockerfile . >&2 || die "podman build failed (above)"

if [[ "$postgres" == true ]]; then
    say "building the PostgreSQL stand-in (k8s/local/postgres) ..."
    podman build --layers "${cache_flag[@]}" --network host --tag localhost/timematch-postgres:15-standin \
        --build-arg "BASE=$base" k8s/local/postgres >&2 || die "podman build of k8s/local/postgres failed (above)"
fi

size=$(podman image inspect --format '{{.Size}}' "$tag")
echo "built $tag: $(( size / 1000000 )) MB in $(( $(date +%s) - started )) s"
