#!/usr/bin/env bash
# Start an MLflow tracking server (UI + REST API).
#
# Usage: bash mlflow/server.sh [--store STORE] [--artifacts DIR] [--host HOST] [--port PORT] [--auth]
#                              [-- EXTRA MLFLOW SERVER ARGS]
#   --store      the backend store: a SQLite file path, sqlite:///..., or postgresql+psycopg2://...
#                (default: <repo>/mlflow/mlflow.db, where launches log by default)
#   --artifacts  where the server keeps artifacts (default: artifacts/ beside a SQLite store, else
#                <repo>/mlflow/artifacts); the folder above it holds the server's own files
#   --host, --port  default 127.0.0.1 and 5000; then open http://HOST:PORT
#   --auth       MLflow's basic-auth app: every request needs a user name and password. The admin
#                is created on the first start from $MLFLOW_AUTH_ADMIN_USERNAME (default admin) and
#                $MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more); users live in
#                basic_auth.db above the artifacts (--auth-db URI to change); the UI's form-signing
#                key is $MLFLOW_FLASK_SERVER_SECRET_KEY, else one kept in .mlflow_flask_secret there.
#                A login is checked once per $MLFLOW_AUTH_CACHE_TTL_S seconds (default 60).
#                Add the user launches log as with `python -m timematch.runner.accounts`; clients
#                pass MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
#   Ctrl-C (or SIGTERM) stops it.
#
# The mlflow executable is $MLFLOW_BIN if set, else <repo>/.venv/bin/mlflow, else `mlflow` on PATH.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(dirname "$here")"

die() { echo "mlflow/server.sh: $*" >&2; exit 2; }

host="127.0.0.1"
port="5000"
store="$here/mlflow.db"
artifacts=""
auth=false
auth_db=""
extra_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) host="${2:?--host needs a value, e.g. --host 0.0.0.0}"; shift 2 ;;
        --host=*) host="${1#--host=}"; shift ;;
        --port) port="${2:?--port needs a value, e.g. --port 5001}"; shift 2 ;;
        --port=*) port="${1#--port=}"; shift ;;
        --store) store="${2:?--store needs a value, e.g. --store results/mlflow.db}"; shift 2 ;;
        --store=*) store="${1#--store=}"; shift ;;
        --artifacts) artifacts="${2:?--artifacts needs a directory}"; shift 2 ;;
        --artifacts=*) artifacts="${1#--artifacts=}"; shift ;;
        --auth) auth=true; shift ;;
        --auth-db) auth_db="${2:?--auth-db needs a URI, e.g. sqlite:////srv/mlflow/basic_auth.db}"; shift 2 ;;
        --auth-db=*) auth_db="${1#--auth-db=}"; shift ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra_args+=("$@"); break ;;
        *) die "unknown option $1 (see --help; pass mlflow server options after --)" ;;
    esac
done
[[ "$port" =~ ^[0-9]+$ ]] || die "--port $port: not a port number"
[[ "${MLFLOW_AUTH_CACHE_TTL_S:-60}" =~ ^[0-9]+$ ]] \
    || die "MLFLOW_AUTH_CACHE_TTL_S=$MLFLOW_AUTH_CACHE_TTL_S: not a number of seconds (default 60; 0 checks every request)"

# The store: a path becomes sqlite:////abs/path; its directory holds the artifacts and auth users.
case "$store" in
    sqlite:///*) store_uri="$store"; store_file="${store#sqlite:///}" ;;
    *://*) store_uri="$store"; store_file="" ;;
    *) store_file="$(cd "$(dirname "$store")" 2>/dev/null && pwd)/$(basename "$store")" \
           || die "--store $store: no directory $(dirname "$store")"
       store_uri="sqlite:///$store_file" ;;
esac
if [[ -n "$store_file" ]]; then
    store_dir="$(dirname "$store_file")"
    [[ -d "$store_dir" ]] || die "--store $store: no directory $store_dir"
else
    store_dir="$here"
fi
artifacts="${artifacts:-$store_dir/artifacts}"
# The server's own files (auth config, users, form-signing key) go beside the artifacts.
state_dir="$(dirname "$artifacts")"

if [[ -n "${MLFLOW_BIN:-}" ]]; then
    mlflow_bin="$MLFLOW_BIN"
elif [[ -x "$repo_root/.venv/bin/mlflow" ]]; then
    mlflow_bin="$repo_root/.venv/bin/mlflow"
elif command -v mlflow >/dev/null 2>&1; then
    mlflow_bin="$(command -v mlflow)"
else
    die "no mlflow executable found (looked at \$MLFLOW_BIN, $repo_root/.venv/bin/mlflow and PATH); install" \
        "the project first (see README.md) or set MLFLOW_BIN=/path/to/mlflow"
fi

mkdir -p "$artifacts"

# One worker and no job-execution workers: starts in seconds with about 0.5 GB instead of
# half a minute and several GB (measured with MLflow 3.17), plenty for one team's UI.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
export MLFLOW_DISABLE_TELEMETRY=true

auth_args=()
login="no login"
if [[ "$auth" == true ]]; then
    auth_db="${auth_db:-sqlite:///$state_dir/basic_auth.db}"
    # The admin password is read from the environment, never written to the file.
    # auth_cache_ttl_seconds: a login is checked once a minute, not on every request. MLflow's
    # default (0) hashes the password on each call, about 0.5 s on a 2-core machine, which made
    # finishing a trial (about 100 requests: model, metrics, artifacts) take a minute instead of
    # seconds (measured, MLflow 3.17). A password changed or a user removed through the API takes
    # effect at once (MLflow drops that user's cached check; this server runs one worker); one
    # changed in the users' database by hand, after $MLFLOW_AUTH_CACHE_TTL_S s (default 60; 0: off).
    ini="$state_dir/basic_auth.ini"
    cat > "$ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $auth_db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_S:-60}
EOF
    export MLFLOW_AUTH_CONFIG_PATH="$ini"
    # The key that signs the UI's login forms (CSRF): $MLFLOW_FLASK_SERVER_SECRET_KEY, else one
    # generated once and kept beside the store, readable by this user only.
    if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
        key_file="$state_dir/.mlflow_flask_secret"
        [[ -s "$key_file" ]] || (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$key_file")
        MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$key_file")"
        export MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    auth_args=(--app-name basic-auth)
    login="basic auth (users in $auth_db)"
fi

shown_store="$store_uri"
[[ "$store_uri" == *"@"* ]] && shown_store="${store_uri%%://*}://***@${store_uri#*@}"  # no password on screen
echo "MLflow tracking server: store $shown_store, artifacts $artifacts, $login; UI at http://$host:$port" >&2
exec "$mlflow_bin" server \
    --backend-store-uri "$store_uri" \
    --serve-artifacts \
    --artifacts-destination "$artifacts" \
    --default-artifact-root "mlflow-artifacts:/" \
    --host "$host" \
    --port "$port" \
    --workers 1 \
    "${auth_args[@]}" \
    "${extra_args[@]}"
