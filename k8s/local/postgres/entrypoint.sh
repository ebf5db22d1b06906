#!/usr/bin/env bash
# The official postgres image's first start, in short: an empty $PGDATA is initialised with
# $POSTGRES_USER as superuser (password $POSTGRES_PASSWORD, scram-sha-256 over TCP) and
# database $POSTGRES_DB; then postgres runs in the foreground, listening on every address.
set -euo pipefail
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set (the Secret timematch-postgres)}"
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"
export PGDATA="${PGDATA:-/var/lib/postgresql/data}"
if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    mkdir -p "$PGDATA" && chmod 700 "$PGDATA"
    initdb --username="$user" --pwfile=<(echo "$POSTGRES_PASSWORD") --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    pg_ctl -w -o "-c listen_addresses='' -k /var/run/postgresql" start >/dev/null
    [[ "$db" == postgres ]] || createdb -h /var/run/postgresql -U "$user" "$db"
    pg_ctl -w stop >/dev/null
    echo "initialised $PGDATA: user $user, database $db"
fi
exec "$@" -c listen_addresses='*' -k /var/run/postgresql
