#!/usr/bin/env bash
# Starts the PostgreSQL server the store tests use (idempotent): Debian's `postgresql`, a
# cluster of its own in /var/lib/wrenn/test-postgres, owned by the `postgres` user, listening on
# 127.0.0.1:${WRENN_PG_PORT:-54329} with trust auth (loopback only), and a fresh database
# `wrenn_test` (dropped and created again on every run).
# Prints the DATABASE_URL for it. Run as root.
# `postgres.sh restart` restarts the server (fast: open connections are cut) and `postgres.sh
# stop` stops it: the store's reconnect test runs a cluster of its own (WRENN_PG_DIR,
# WRENN_PG_PORT) and restarts it under load.
set -euo pipefail
ACTION="${1:-start}"

PORT="${WRENN_PG_PORT:-54329}"
DATA="${WRENN_PG_DIR:-/var/lib/wrenn/test-postgres}"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "postgres: installing Debian's postgresql" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
mkdir -p "$DATA"
chown postgres:postgres "$DATA"
run() { (cd / && runuser -u postgres -- "$@"); }
case "$ACTION" in
start) ;;
restart | stop)
  run "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -m fast "$ACTION" >/dev/null
  exit 0
  ;;
*)
  echo "postgres: unknown action $ACTION (start, restart or stop)" >&2
  exit 2
  ;;
esac
if [ ! -f "$DATA/PG_VERSION" ]; then
  run "$BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
fi
if ! run "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  run "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w \
    -o "-p $PORT -c listen_addresses=127.0.0.1 -k $DATA -c fsync=off" start >/dev/null
fi
# A fresh test database every run: nothing of an earlier run is seen.
run "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -qc "DROP DATABASE IF EXISTS wrenn_test WITH (FORCE)" >/dev/null
run "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -qc "CREATE DATABASE wrenn_test" >/dev/null
echo "postgres://postgres@127.0.0.1:$PORT/wrenn_test"
