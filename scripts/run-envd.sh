#!/usr/bin/env bash
# wrenn's main job today: builds envd (static, as it ships in guest images) and runs it here,
# serving E2B's envd protocol on port ${ENVD_PORT:-49983}. Point the e2b SDK at it with
#   E2B_DEBUG=true E2B_SANDBOX_URL=http://127.0.0.1:49983
# Run as root: envd runs processes as the users its callers name. Calls that name no user run as
# `user` (home /home/user) when that account exists, else as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "run-envd: warning: not root, so envd can only run processes as $(id -un)" >&2
fi
bash scripts/build-envd.sh
exec target/x86_64-unknown-linux-gnu/release/envd --port "${ENVD_PORT:-49983}" "$@"
