#!/usr/bin/env bash
# Installs what wrenn's tests need on a Debian machine, idempotently:
#   - Debian packages (compiler, Python venv support, mount/useradd tools, and for guest images
#     and VMs: QEMU, qemu-img, debootstrap, e2fsprogs, kmod, cpio, iptables);
#   - the test user `user` (home /home/user), which the SDK tests run commands as;
#   - a Python venv with the pinned `e2b` SDK and pytest (tests/sdk/requirements.txt), kept in
#     the cache directory outside the repo and rebuilt only when the requirements change.
# Must run as root (packages, users, and envd switching users in the tests); it needs no sudo.
#
#   scripts/setup.sh              set up this machine
#   scripts/setup.sh --simulate   resolve the Debian packages only: refresh apt's lists, then
#                                 print the packages it would install and apt's plan for them
#                                 (`apt-get install --simulate` with the real install's options).
#                                 Nothing else changes: no package, user, venv, or toolchain check.
#                                 Exit status 0 when apt can install them. scripts/test-setup.sh
#                                 runs it in clean Debian 12 chroots.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_DIR="${WRENN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}"
VENV="$CACHE_DIR/sdk-venv"

simulate=0
case "$*" in
  "") ;;
  --simulate) simulate=1 ;;
  *)
    echo "usage: scripts/setup.sh [--simulate]" >&2
    exit 2
    ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (it installs packages and creates the test user)" >&2
  exit 1
fi

# The Debian packages to install: one for each tool this machine lacks.
need_packages=()
for tool in gcc:gcc mount:mount useradd:passwd ps:procps git:git ip:iproute2 \
  qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils debootstrap:debootstrap \
  mkfs.ext4:e2fsprogs debugfs:e2fsprogs depmod:kmod cpio:cpio iptables:iptables \
  systemd-analyze:systemd; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_packages+=("${tool##*:}")
done
if ! command -v python3 >/dev/null 2>&1; then need_packages+=(python3 python3-venv); fi
# *.localhost names (wrenn up's HTTPS domain, wrenn.localhost) resolve to the loopback through
# nss-myhostname; its package adds it to /etc/nsswitch.conf.
if ! dpkg-query -W -f='${Status}' libnss-myhostname 2>/dev/null | grep -q 'install ok installed'; then
  need_packages+=(libnss-myhostname)
fi
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  need_packages+=(python3-venv)
fi

# QEMU's binary packages must come from one version: qemu-utils 8.0 and later, for one, Breaks
# the qemu-system-common of 7.2. A machine may already carry a qemu-utils from elsewhere (a
# backport, newer or older than the qemu-system-x86 its apt sources offer); installing
# qemu-system-x86 beside it then fails with "held broken packages". So when qemu-system-x86 is
# to be installed, qemu-system-x86, qemu-system-common, qemu-utils and an installed
# qemu-block-extra are all pinned to one version, and a stray one is moved to it (up or down):
# the version of the QEMU package the administrator holds (apt-mark hold), if one is held, else
# the version apt would install qemu-system-x86 at. Needs apt's lists up to date.
held_by=""
held_version=""
# Whether apt's sources offer package $1 at version $2 (`apt-cache show` also answers for a
# version only dpkg knows: an installed one no source has any more).
offered() {
  apt-cache madison "$1" | awk -F'|' -v v="$2" '{ gsub(/ /, "", $2) } $2 == v { found = 1 } END { exit !found }'
}
pin_qemu_packages() {
  local package status version hint qemu_version pins filtered
  for package in qemu-utils qemu-system-common qemu-block-extra; do
    status="$(dpkg-query -W -f='${Status}|${Version}' "$package" 2>/dev/null || true)"
    case "$status" in
      "hold ok installed|"*)
        version="${status#*|}"
        if [ -n "$held_version" ] && [ "$version" != "$held_version" ]; then
          echo "setup: $held_by is held at $held_version and $package at $version: QEMU's" \
            "packages must share one version (apt-mark unhold one of them)" >&2
          exit 1
        fi
        held_version="$version"
        held_by="$package"
        ;;
    esac
  done
  if [ -n "$held_version" ]; then
    qemu_version="$held_version"
    hint="apt-mark unhold $held_by, or add the apt source it came from"
    echo "setup: $held_by is held at $qemu_version: QEMU's packages are pinned to that version"
  else
    qemu_version="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')"
    hint="check this machine's apt sources"
    if [ -z "$qemu_version" ] || [ "$qemu_version" = "(none)" ]; then
      echo "setup: apt offers no qemu-system-x86 package: $hint" >&2
      exit 1
    fi
  fi
  pins=(qemu-system-x86 qemu-system-common qemu-utils)
  if dpkg-query -W -f='${Status}' qemu-block-extra 2>/dev/null | grep -q 'ok installed'; then
    pins+=(qemu-block-extra)
  fi
  filtered=()
  for package in "${need_packages[@]}"; do
    case "$package" in qemu-system-x86 | qemu-utils) ;; *) filtered+=("$package") ;; esac
  done
  for package in "${pins[@]}"; do
    if ! offered "$package" "$qemu_version"; then
      echo "setup: apt offers no $package at version $qemu_version: $hint" >&2
      exit 1
    fi
    filtered+=("$package=$qemu_version")
  done
  need_packages=("${filtered[@]}")
}

if [ ${#need_packages[@]} -eq 0 ]; then
  echo "setup: every Debian package needed is installed"
  if [ "$simulate" = 1 ]; then exit 0; fi
else
  if ! apt-get update -qq; then
    echo "setup: apt-get update failed: check this machine's apt sources and network" >&2
    exit 1
  fi
  if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then pin_qemu_packages; fi
  apt_install=(apt-get install -y -qq --no-install-recommends --allow-downgrades)
  simulated=""
  if [ "$simulate" = 1 ]; then
    echo "setup: simulating the install of Debian packages: ${need_packages[*]}"
    apt_install+=(--simulate)
    simulated=" (simulated)"
  else
    echo "setup: installing Debian packages: ${need_packages[*]}"
  fi
  if ! DEBIAN_FRONTEND=noninteractive "${apt_install[@]}" "${need_packages[@]}"; then
    echo "setup: apt cannot install these packages$simulated" >&2
    if [ -n "$held_by" ]; then
      # apt takes the dependencies of a pinned package from its default release: QEMU from a
      # backport, say, also needs that backport's seabios and qemu-system-data.
      suite="$(apt-cache madison qemu-system-x86 |
        awk -F'|' -v v="$held_version" '{ gsub(/ /, "", $2) } $2 == v { split($3, w, " "); sub(/\/.*/, "", w[2]); print w[2]; exit }')"
      echo "setup: QEMU must be at $held_version, where $held_by is held, and apt cannot" \
        "install it so: install it yourself (apt-get install -t $suite qemu-system-x86)," \
        "or apt-mark unhold $held_by" >&2
    fi
    exit 1
  fi
  if [ "$simulate" = 1 ]; then
    echo "setup: simulated: apt can install them (nothing was installed)"
    exit 0
  fi
fi

if ! getent hosts api.wrenn.localhost >/dev/null 2>&1; then
  echo "setup: warning: api.wrenn.localhost does not resolve: add 'myhostname' to the hosts line" \
    "of /etc/nsswitch.conf for wrenn up's HTTPS domain (or run wrenn up with --domain/--no-https)" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found: install the Rust toolchain named in rust-toolchain.toml (rustup)" >&2
  exit 1
fi

# cargo-nextest runs the Rust tests: each test in its own process (the descriptor-counting test
# of envd's ports.rs needs that), test binaries in parallel. Installed from crates.io at a pinned
# version when this machine has none (about 5 minutes of compiling, once).
NEXTEST_VERSION=0.9.143
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest $NEXTEST_VERSION (cargo install --locked)"
  cargo install --locked --quiet "cargo-nextest@$NEXTEST_VERSION"
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
