#!/usr/bin/env bash
# Builds envd as a static binary (glibc's crt-static), the form that goes into guest images.
# The flag is passed only for this explicit --target build, so build scripts and proc macros
# (built for the host) are unaffected. Output: target/x86_64-unknown-linux-gnu/release/envd
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p wrenn-envd --bin envd --target x86_64-unknown-linux-gnu "$@"
echo "built $(pwd)/target/x86_64-unknown-linux-gnu/release/envd"
