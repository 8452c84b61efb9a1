#!/usr/bin/env bash
# Builds a Firecracker-compatible guest kernel: an uncompressed vmlinux from Debian's
# `linux-source-6.1`, configured by `make x86_64_defconfig` plus microvm.config (virtio-mmio
# command-line devices, virtio net/block/vsock, ext4, cgroups v2, all built in).
# Long: tens of minutes on 2 cores. Run it explicitly, as root (it installs Debian packages):
#   sudo images/firecracker-kernel/build.sh [OUTPUT_DIR]        (default /var/lib/wrenn/kernels)
# or `wrenn image firecracker-kernel`, which runs this same recipe.
# Output: OUTPUT_DIR/vmlinux-<version>-wrenn and the config it was built with, written atomically.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-/var/lib/wrenn/kernels}"
fragment="${WRENN_KERNEL_FRAGMENT:-$here/microvm.config}"
jobs="$(nproc)"

if [ "$(id -u)" -ne 0 ]; then
  echo "firecracker kernel: run as root (it installs Debian packages)" >&2
  exit 1
fi
echo "==> firecracker kernel: installing build dependencies"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils cpio kmod rsync >/dev/null

tarball="$(ls /usr/src/linux-source-6.1*.tar.xz | head -n1)"
work="$(mktemp -d /var/tmp/wrenn-kernel.XXXXXX)"
trap 'rm -rf "$work"' EXIT
echo "==> firecracker kernel: unpacking $tarball"
tar -xf "$tarball" -C "$work"
src="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)"
cd "$src"

echo "==> firecracker kernel: configuring (x86_64_defconfig + $(basename "$fragment"))"
make -s x86_64_defconfig
scripts/kconfig/merge_config.sh -m -O . .config "$fragment" >/dev/null
make -s olddefconfig
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=y) ;; *) continue ;; esac
  if ! grep -qx "$line" .config; then echo "  not set after olddefconfig: $line" >&2; missing=1; fi
done < "$fragment"
[ "$missing" -eq 0 ] || { echo "firecracker kernel: the configuration lost required options" >&2; exit 1; }

version="$(make -s kernelversion)"
echo "==> firecracker kernel: building vmlinux $version with $jobs jobs (tens of minutes)"
start=$(date +%s)
make -j"$jobs" vmlinux 2>&1 | while IFS= read -r line; do
  case "$line" in *" LD "*|*error*|*Error*) echo "  $line" ;; esac
done
[ -f vmlinux ] || { echo "firecracker kernel: the build produced no vmlinux" >&2; exit 1; }
echo "==> firecracker kernel: built in $(( $(date +%s) - start )) s"

mkdir -p "$out"
name="vmlinux-$version-wrenn"
cp vmlinux "$out/.$name.tmp"
cp .config "$out/.$name.config.tmp"
mv "$out/.$name.config.tmp" "$out/$name.config"
mv "$out/.$name.tmp" "$out/$name"
# `vmlinux` names the newest: what `wrenn agent serve --vmm firecracker` boots from an image dir.
ln -sfn "$name" "$out/.vmlinux.tmp" && mv -T "$out/.vmlinux.tmp" "$out/vmlinux"
echo "==> firecracker kernel: $out/$name ($(du -h "$out/$name" | cut -f1))"
