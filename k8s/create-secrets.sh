#!/usr/bin/env bash
# Creates the project's Secrets in namespace timematch (the namespace too, if missing), with
# fresh random values, never written to disk or to the repository:
#   timematch-postgres       password                     PostgreSQL (the MLflow store)
#   timematch-mlflow-admin   password, flask-secret-key   MLflow's admin; the UI's form key
#   timematch-mlflow-runner  username, password           the user every launch logs as
#   timematch-ray-token      auth_token                   Ray's token authentication
# An existing Secret is kept (so running this twice changes nothing); --rotate NAME replaces
# one. Prints the admin's and runner's logins at the end, for the MLflow UI.
#
#   bash k8s/create-secrets.sh [--namespace NS] [--rotate timematch-mlflow-runner] [--runner-user NAME]
set -euo pipefail

namespace=timematch
runner_user=runner
rotate=()
die() { echo "create-secrets.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --namespace) namespace="${2:?--namespace needs a value}"; shift 2 ;;
        --rotate) rotate+=("${2:?--rotate needs a Secret name}"); shift 2 ;;
        --runner-user) runner_user="${2:?--runner-user needs a value}"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
command -v kubectl >/dev/null || die "kubectl not found; install it and point it at your cluster"
kubectl get namespace "$namespace" >/dev/null 2>&1 || kubectl create namespace "$namespace"

# Hex: safe inside the PostgreSQL connection URL and in HTTP basic auth.
random() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

secret() {  # secret NAME KEY=VALUE...
    local name="$1"; shift
    local exists=false
    kubectl -n "$namespace" get secret "$name" >/dev/null 2>&1 && exists=true
    if [[ "$exists" == true && ! " ${rotate[*]:-} " == *" $name "* ]]; then
        echo "secret/$name exists, kept (--rotate $name replaces it)"
        return
    fi
    local args=()
    for pair in "$@"; do args+=("--from-literal=$pair"); done
    kubectl -n "$namespace" create secret generic "$name" "${args[@]}" --dry-run=client -o yaml \
        | kubectl -n "$namespace" apply -f - >/dev/null
    echo "secret/$name $([[ "$exists" == true ]] && echo rotated || echo created)"
}

secret timematch-postgres "password=$(random 24)"
secret timematch-mlflow-admin "password=$(random 16)" "flask-secret-key=$(random 32)"
secret timematch-mlflow-runner "username=$runner_user" "password=$(random 16)"
secret timematch-ray-token "auth_token=$(random 32)"

show() { kubectl -n "$namespace" get secret "$1" -o "jsonpath={.data.$2}" | base64 -d; }
echo
echo "MLflow UI logins (kubectl -n $namespace port-forward svc/mlflow 5000:5000):"
echo "  admin:  admin / $(show timematch-mlflow-admin password)"
echo "  runner: $(show timematch-mlflow-runner username) / $(show timematch-mlflow-runner password)"
echo "Rotating timematch-postgres or the admin after the first start also needs the password changed in PostgreSQL or MLflow."
