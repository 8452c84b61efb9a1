#!/usr/bin/env bash
# Starts the S3-compatible server the template-store tests use (idempotent): moto's standalone
# server (`moto[server]`, pinned in tests/sdk/requirements.txt, which scripts/setup.sh installs in
# the venv $CACHE_DIR/sdk-venv), on 127.0.0.1:${WRENN_S3_PORT:-55002} only, its log in
# /var/lib/wrenn/test-s3/moto-$PORT.log. It keeps the objects in memory: a restart empties it.
# It takes any credentials and region (the tests sign as wrenn-test / wrenn-test-secret in
# us-east-1) and unsigned requests too: the bucket `wrenn-test-templates` is made here with a
# plain PUT.
# Prints, one per line: the endpoint URL, the bucket.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE_DIR="${WRENN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}"
PORT="${WRENN_S3_PORT:-55002}"
DATA=/var/lib/wrenn/test-s3
BUCKET=wrenn-test-templates
ENDPOINT="http://127.0.0.1:$PORT"
MOTO="$CACHE_DIR/sdk-venv/bin/moto_server"
LOG="$DATA/moto-$PORT.log"
mkdir -p "$DATA"

# Whether an S3 server answers on the port: moto lists its buckets on GET /.
answers() {
  curl -sS --max-time 2 "$ENDPOINT/" 2>/dev/null | grep -q ListAllMyBucketsResult
}

if ! answers; then
  if [ ! -x "$MOTO" ]; then
    echo "s3: $MOTO is missing: run scripts/setup.sh (it installs tests/sdk/requirements.txt)" >&2
    exit 1
  fi
  setsid "$MOTO" -H 127.0.0.1 -p "$PORT" >"$LOG" 2>&1 </dev/null &
  pid=$!
  for _ in $(seq 300); do
    if answers || ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  if ! answers; then
    echo "s3: moto_server did not start on 127.0.0.1:$PORT; the end of its log ($LOG):" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
fi

# The bucket: moto answers 200 to a PUT of one it has already (S3 itself, 409
# BucketAlreadyOwnedByYou outside us-east-1): both are fine.
reply="$(curl -sS -w '\n%{http_code}' -X PUT "$ENDPOINT/$BUCKET")"
case "${reply##*$'\n'}" in
200 | 409) ;;
*)
  echo "s3: creating the bucket $BUCKET failed (HTTP ${reply##*$'\n'}):" >&2
  echo "${reply%$'\n'*}" >&2
  exit 1
  ;;
esac
echo "$ENDPOINT"
echo "$BUCKET"
