#!/usr/bin/env bash
# wrenn's main job: builds envd (static, for the guest image) and the wrenn binary, then runs
# `wrenn up`: the base image and template are built if missing (cached in ~/.cache/wrenn and
# /var/lib/wrenn), a host agent and the control plane start, and the E2B API (:3000), the
# sandbox proxy (:3001) and both over HTTPS under wrenn.localhost (:443, a local certificate
# authority) serve. It prints the E2B_* settings for the SDK. Extra arguments go to
# `wrenn up` (e.g. --demo, --no-internet). Run as root: VMs, network namespaces, images.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "up: run as root (it starts VMs and creates network namespaces)" >&2
  exit 1
fi
bash scripts/setup.sh
bash scripts/build-envd.sh
cargo build --release --locked -p wrenn
WRENN_ENVD_BIN="$(pwd)/target/x86_64-unknown-linux-gnu/release/envd"
export WRENN_ENVD_BIN
exec target/release/wrenn up "$@"
