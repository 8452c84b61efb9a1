#!/usr/bin/env bash
# Installs what wrenn's tests need on a Debian machine, idempotently:
#   - Debian packages (compiler, Python venv support, mount/useradd tools, and for guest images
#     and VMs: QEMU, qemu-img, debootstrap, e2fsprogs, kmod, cpio, iptables);
#   - the test user `user` (home /home/user), which the SDK tests run commands as;
#   - a Python venv with the pinned `e2b` SDK and pytest (tests/sdk/requirements.txt), kept in
#     the cache directory outside the repo and rebuilt only when the requirements change.
# Must run as root (packages, users, and envd switching users in the tests).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_DIR="${WRENN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}"
VENV="$CACHE_DIR/sdk-venv"

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (it installs packages and creates the test user)" >&2
  exit 1
fi

need_packages=()
for tool in gcc:gcc mount:mount useradd:passwd ps:procps git:git ip:iproute2 \
  qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils debootstrap:debootstrap \
  mkfs.ext4:e2fsprogs debugfs:e2fsprogs depmod:kmod cpio:cpio iptables:iptables; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_packages+=("${tool##*:}")
done
# QEMU's binary packages must come from one version. A machine may already carry a qemu-utils
# from elsewhere (a backport, newer or older than what its apt sources offer for
# qemu-system-x86); installing qemu-system-x86 beside it then fails with "held broken packages".
# So every QEMU package is pinned to the version apt would install qemu-system-x86 at, and a
# stray qemu-utils is moved to it (up or down).
qemu_pins=()
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  apt-get update -qq
  qemu_version="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')"
  if [ -z "$qemu_version" ] || [ "$qemu_version" = "(none)" ]; then
    echo "setup: apt offers no qemu-system-x86 package: check this machine's apt sources" >&2
    exit 1
  fi
  qemu_pins=("qemu-system-x86=$qemu_version" "qemu-utils=$qemu_version")
  for package in qemu-system-common qemu-block-extra; do
    if dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed'; then
      qemu_pins+=("$package=$qemu_version")
    fi
  done
  filtered=()
  for package in "${need_packages[@]}"; do
    case "$package" in qemu-system-x86 | qemu-utils) ;; *) filtered+=("$package") ;; esac
  done
  need_packages=("${filtered[@]}" "${qemu_pins[@]}")
fi
if ! command -v python3 >/dev/null 2>&1; then need_packages+=(python3 python3-venv); fi
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  need_packages+=(python3-venv)
fi
if [ ${#need_packages[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_packages[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    --allow-downgrades "${need_packages[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install the Rust toolchain named in rust-toolchain.toml (rustup)" >&2
  exit 1
fi

if ! id user >/dev/null 2>&1; then
  echo "setup: creating the test user 'user'"
  useradd --create-home --home-dir /home/user --shell /bin/bash user
fi

mkdir -p "$CACHE_DIR"
stamp="$VENV/.requirements.sha256"
want="$(sha256sum tests/sdk/requirements.txt | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating the SDK test venv in $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
  echo "$want" > "$stamp"
fi
echo "setup: ready (venv: $VENV)"
