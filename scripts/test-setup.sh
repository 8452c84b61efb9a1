#!/usr/bin/env bash
# Tests scripts/setup.sh's Debian package resolution: `setup.sh --simulate` (apt-get update, then
# `apt-get install --simulate` of exactly the packages and QEMU pins a real run would install),
# run inside clean Debian 12 (bookworm) chroots made with debootstrap, in these situations:
#   fresh      a plain fresh bookworm (minbase: no compiler, QEMU, Python, or sudo);
#   backport   a newer qemu-utils from bookworm-backports installed, which Breaks bookworm's
#              qemu-system-common (a plain `apt-get install qemu-system-x86` fails with "held
#              broken packages"), without bookworm-backports in the apt sources (this machine's
#              case) and with it: setup.sh moves qemu-utils down to bookworm's QEMU. Then held
#              (apt-mark hold): setup.sh must refuse and say what to do, as apt cannot follow a
#              held backport by version alone (it takes the dependencies, seabios and
#              qemu-system-data, from bookworm). When the mirror serves no bookworm-backports, a
#              stand-in qemu-utils package (version 1:99.0~wrenn.test, with the backport's
#              Breaks) is installed instead and only the cases without the source run;
#              WRENN_SETUP_TEST_FAKE_BACKPORT=1 forces the stand-in.
#   older      an older qemu-utils than bookworm's candidate (another version apt offers, e.g.
#              bookworm-security's): moved up; then held there: QEMU goes to the held version.
#              Skipped, saying so, when apt offers only one version.
# A case passes when setup.sh --simulate succeeds (or, where expected, fails with the expected
# message), apt's plan installs qemu-system-x86 and leaves it, qemu-system-common, qemu-utils
# and qemu-block-extra at one version, the expected one, removes nothing, and the run leaves
# dpkg's state as it found it.
# The chroots use the host's Debian mirror (read from its apt sources, one-line or deb822, by
# `apt-get indextargets`; WRENN_SETUP_TEST_MIRROR and WRENN_SETUP_TEST_SECURITY_MIRROR override)
# and are cached in $CACHE_DIR/setup-chroots (about 800 MB): on 2 busy cores the first run took
# 1.5 to 2.5 minutes (debootstrap most of it), later ones about 35 s (apt's resolver, mostly;
# the three chroots' cases run in parallel). Nothing is mounted in them (apt needs no /proc for
# this); a mount a killed debootstrap leaves behind is undone on exit. Run as root.
set -eEuo pipefail
trap 'printf "test-setup: FAILED: unexpected error (exit %s) at line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."

CACHE_DIR="${WRENN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}"
CHROOTS="$CACHE_DIR/setup-chroots"
LOGS="$CHROOTS/logs"
SUITE=bookworm
RECIPE=1 # bump when the base chroot's recipe changes: every cached chroot is made again
FAKE_VERSION="1:99.0~wrenn.test"
QEMU_PACKAGES=(qemu-system-x86 qemu-system-common qemu-utils qemu-block-extra)

say() { printf 'test-setup: %s\n' "$*"; }
die() {
  printf 'test-setup: FAILED: %s\n' "$*" >&2
  exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

if [ "$(id -u)" -ne 0 ]; then die "run as root (debootstrap and chroot)"; fi
for tool in debootstrap chroot flock dpkg-deb; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (scripts/setup.sh installs debootstrap)"
done

# Runs a command in chroot $1 with a clean environment.
in_root() {
  local root="$1"
  shift
  chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

# Unmounts whatever is mounted under $1 (deepest first), then removes it.
remove_tree() {
  local dir="$1" target
  [ -e "$dir" ] || return 0
  awk -v d="$dir/" 'substr($2, 1, length(d)) == d { print $2 }' /proc/mounts | sort -r |
    while read -r target; do umount -l "$target" || true; done
  rm -rf --one-file-system "$dir"
}

# The first apt source of the host whose suite matches $1 (one-line and deb822 files alike).
host_repo() {
  # shellcheck disable=SC2016 # apt's own $(FIELD) placeholders
  apt-get indextargets --no-release-info --format '$(TARGET_OF) $(RELEASE) $(REPO_URI)' 2>/dev/null |
    awk -v re="$1" '$1 == "deb" && $2 ~ re { print $3; exit }'
}
mirror="${WRENN_SETUP_TEST_MIRROR:-$(host_repo '^(bookworm|trixie|bullseye|forky|sid|stable|oldstable|testing|unstable)(-updates)?$')}"
if [ -z "$mirror" ]; then
  mirror=http://deb.debian.org/debian/
  say "the host's apt sources name no Debian archive: using $mirror"
fi
security="${WRENN_SETUP_TEST_SECURITY_MIRROR-$(host_repo '-security$')}"
# The host's proxy and Release-date settings, so the chroots reach the mirror as the host does.
host_apt_conf() {
  local key value
  for key in Acquire::http::Proxy Acquire::https::Proxy Acquire::Check-Valid-Until Acquire::Check-Date; do
    value=""
    eval "$(apt-config shell value "$key")"
    if [ -n "$value" ]; then printf '%s "%s";\n' "$key" "$value"; fi
  done
}
apt_conf="$(host_apt_conf)"
if [ -z "${http_proxy:-}" ]; then
  value=""
  eval "$(apt-config shell value Acquire::http::Proxy)"
  if [ -n "$value" ] && [ "$value" != DIRECT ]; then export http_proxy="$value"; fi
fi
fake_backport="${WRENN_SETUP_TEST_FAKE_BACKPORT:-0}"
key="recipe=$RECIPE suite=$SUITE mirror=$mirror security=$security conf=$(printf '%s' "$apt_conf" | sha256sum | cut -c1-16)"

mkdir -p "$LOGS"
exec 9>"$CHROOTS/.lock"
if ! flock -n 9; then
  say "waiting for another run of test-setup.sh to finish"
  flock 9
fi
pids=() # the running cases, by chroot
# Stops process $1 and its descendants.
kill_tree() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do kill_tree "$child"; done
  kill "$1" 2>/dev/null || true
}
cleanup() {
  local dir pid
  for pid in "${pids[@]}"; do kill_tree "$pid"; done
  for dir in "$CHROOTS"/*.tmp "$CHROOTS"/*/opt/wrenn-test; do remove_tree "$dir"; done
  rm -f "$CHROOTS/stand-in.deb"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cleanup

# apt's sources and settings in chroot $1: the host's Debian mirror, bookworm-backports when $2
# is "with-backports".
configure() {
  local root="$1" backports="${2:-}"
  rm -f "$root/etc/apt/sources.list"
  {
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\n' "$mirror" "$SUITE" "$SUITE"
    printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    if [ -n "$security" ]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' "$security" "$SUITE"
      printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    fi
  } >"$root/etc/apt/sources.list.d/debian.sources"
  if [ "$backports" = with-backports ]; then
    printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: %s\n' \
      "$mirror" "$SUITE" /usr/share/keyrings/debian-archive-keyring.gpg \
      >"$root/etc/apt/sources.list.d/backports.sources"
  else
    rm -f "$root/etc/apt/sources.list.d/backports.sources"
  fi
  printf 'Acquire::Languages "none";\n%s\n' "$apt_conf" >"$root/etc/apt/apt.conf.d/90wrenn-test"
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
}

# Sets up chroot $1: its sources ($2: with-backports or not), qemu-utils held or not ($3: hold
# or unhold), and with $4 = update, apt's lists refreshed (fails when apt-get update does).
prepare() {
  local root="$1" backports="$2" hold="$3" out
  configure "$root" "$backports"
  if in_root "$root" dpkg-query -W qemu-utils >/dev/null 2>&1; then
    in_root "$root" apt-mark "$hold" qemu-utils >/dev/null
  fi
  [ "${4:-}" = update ] || return 0
  if ! out="$(in_root "$root" apt-get update -qq 2>&1)" || grep -q '^E:' <<<"$out"; then
    printf '%s\n' "$out" >"$LOGS/apt-get-update.log"
    return 1
  fi
}
candidate() { in_root "$1" apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }'; }
# shellcheck disable=SC2016 # dpkg-query's own ${field} placeholders
installed() {
  { in_root "$1" dpkg-query -W -f='${Status}|${Version}' "$2" 2>/dev/null || true; } |
    awk -F'|' '$1 ~ / installed$/ { print $2 }'
}
# Whether apt's sources in chroot $1 offer package $2 at version $3 (not `apt-cache show`: it
# also answers for a version that only dpkg's status has).
offered() {
  in_root "$1" apt-cache madison "$2" |
    awk -F'|' -v v="$3" '{ gsub(/ /, "", $2) } $2 == v { found = 1 } END { exit !found }'
}
vcmp() { dpkg --compare-versions "$1" "$2" "$3"; }

start_all="$(now)"
say "mirror $mirror${security:+, security $security}; chroots in $CHROOTS"

# The base chroot: debootstrap's minbase bookworm, apt configured, lists fetched.
if [ -d "$CHROOTS/base" ] && [ "$(cat "$CHROOTS/base.key" 2>/dev/null)" = "$key" ]; then
  say "base: cached"
else
  for dir in base backport older; do remove_tree "$CHROOTS/$dir"; done
  rm -f "$CHROOTS"/*.key "$CHROOTS"/*.kind
  started="$(now)"
  say "base: debootstrap --variant=minbase $SUITE (about a minute; log: $LOGS/debootstrap.log)"
  include=()
  case "$mirror" in https:*) include=(--include=ca-certificates) ;; esac
  if ! debootstrap --variant=minbase "${include[@]}" "$SUITE" "$CHROOTS/base.tmp" "$mirror" \
    >"$LOGS/debootstrap.log" 2>&1; then
    tail -n 20 "$LOGS/debootstrap.log" >&2
    die "base: debootstrap of $SUITE from $mirror failed (log: $LOGS/debootstrap.log)"
  fi
  # dpkg without fsync, and no service started by a package in a chroot.
  echo force-unsafe-io >"$CHROOTS/base.tmp/etc/dpkg/dpkg.cfg.d/wrenn-test"
  printf '#!/bin/sh\nexit 101\n' >"$CHROOTS/base.tmp/usr/sbin/policy-rc.d"
  chmod +x "$CHROOTS/base.tmp/usr/sbin/policy-rc.d"
  prepare "$CHROOTS/base.tmp" no-backports unhold update ||
    die "base: apt-get update failed in the chroot (log: $LOGS/apt-get-update.log)"
  in_root "$CHROOTS/base.tmp" apt-get clean
  mv "$CHROOTS/base.tmp" "$CHROOTS/base"
  echo "$key" >"$CHROOTS/base.key"
  say "base: made in $(since "$started") ($(du -sh "$CHROOTS/base" | cut -f1))"
fi
base="$CHROOTS/base"
if in_root "$base" sh -c 'command -v sudo' >/dev/null; then die "base: the chroot has sudo: it must not"; fi

# A chroot copied from the base, to install a QEMU package in.
copy_base() {
  remove_tree "$CHROOTS/$1.tmp"
  cp -a --reflink=auto "$base" "$CHROOTS/$1.tmp"
}
# Moves a finished chroot in place of the cached one.
keep() {
  remove_tree "$CHROOTS/$1"
  mv "$CHROOTS/$1.tmp" "$CHROOTS/$1"
}

# The backport chroot: qemu-utils from bookworm-backports, or the stand-in when the mirror has
# no backport of it or WRENN_SETUP_TEST_FAKE_BACKPORT=1 (backport.kind: real, stand-in, forced).
backport_valid() {
  local root="$CHROOTS/backport" kind version
  kind="$(cat "$CHROOTS/backport.kind" 2>/dev/null)" || return 1
  [ -d "$root" ] || return 1
  if [ "$fake_backport" = 1 ]; then [ "$kind" = forced ] || return 1; else [ "$kind" != forced ] || return 1; fi
  if [ "$kind" = real ]; then prepare "$root" with-backports unhold update || return 1; else prepare "$root" no-backports unhold update || return 1; fi
  version="$(installed "$root" qemu-utils)"
  [ -n "$version" ] && vcmp "$version" gt "$(candidate "$root")" || return 1
  if [ "$kind" = real ]; then offered "$root" qemu-system-x86 "$version" || return 1; fi
}
make_backport() {
  local tmp="$CHROOTS/backport.tmp" version="" arch
  copy_base backport
  if [ "$fake_backport" != 1 ] && prepare "$tmp" with-backports unhold update; then
    version="$(in_root "$tmp" apt-cache madison qemu-utils | awk -F' [|] ' '$3 ~ / '"$SUITE"'-backports\// { print $2; exit }')"
    if [ -n "$version" ] && ! vcmp "$version" gt "$(candidate "$tmp")"; then version=""; fi
  fi
  if [ -n "$version" ]; then
    say "backport: installing qemu-utils $version from $SUITE-backports"
    in_root "$tmp" apt-get install -y -qq --no-install-recommends "qemu-utils=$version" \
      >"$LOGS/backport-install.log" 2>&1 ||
      die "backport: installing qemu-utils from $SUITE-backports failed (log: $LOGS/backport-install.log)"
    echo real >"$CHROOTS/backport.kind"
  else
    if [ "$fake_backport" = 1 ]; then
      say "backport: WRENN_SETUP_TEST_FAKE_BACKPORT=1: a stand-in qemu-utils $FAKE_VERSION instead of the backport"
    else
      say "backport: $mirror serves no $SUITE-backports with a newer qemu-utils: a stand-in qemu-utils" \
        "$FAKE_VERSION (an empty package with the backport's Breaks: qemu-system-common (<< 1:8.0+dfsg-5~)) instead"
    fi
    prepare "$tmp" no-backports unhold update || die "backport: apt-get update failed (log: $LOGS/apt-get-update.log)"
    arch="$(in_root "$tmp" dpkg --print-architecture)"
    local pkg="$CHROOTS/stand-in"
    rm -rf "$pkg"
    mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin"
    cat >"$pkg/DEBIAN/control" <<EOF
Package: qemu-utils
Source: qemu
Version: $FAKE_VERSION
Architecture: $arch
Maintainer: wrenn tests <tests@wrenn.invalid>
Breaks: qemu-system-common (<< 1:8.0+dfsg-5~)
Replaces: qemu-system-common (<< 1:8.0+dfsg-5~)
Description: stand-in for a backported qemu-utils (wrenn's scripts/test-setup.sh)
EOF
    printf '#!/bin/sh\necho "qemu-img stand-in"\n' >"$pkg/usr/bin/qemu-img"
    chmod 755 "$pkg/usr/bin/qemu-img"
    dpkg-deb --root-owner-group --build "$pkg" "$CHROOTS/stand-in.deb" >/dev/null
    rm -rf "$pkg"
    cp "$CHROOTS/stand-in.deb" "$tmp/tmp/stand-in.deb"
    in_root "$tmp" dpkg -i /tmp/stand-in.deb >"$LOGS/backport-install.log" 2>&1 ||
      die "backport: installing the stand-in qemu-utils failed (log: $LOGS/backport-install.log)"
    rm -f "$tmp/tmp/stand-in.deb"
    if [ "$fake_backport" = 1 ]; then echo forced >"$CHROOTS/backport.kind"; else echo stand-in >"$CHROOTS/backport.kind"; fi
  fi
  in_root "$tmp" apt-get clean
  keep backport
}

# The older chroot: qemu-utils at the highest version apt offers below qemu-system-x86's
# candidate, with qemu-system-x86 and qemu-system-common offered at it too (older.kind: that
# version, or "none").
older_valid() {
  local root="$CHROOTS/older" version
  version="$(cat "$CHROOTS/older.kind" 2>/dev/null)" || return 1
  if [ "$version" = none ]; then
    prepare "$base" no-backports unhold update || return 1
    [ "$(cat "$CHROOTS/older.candidate" 2>/dev/null)" = "$(candidate "$base")" ]
    return
  fi
  [ -d "$root" ] && prepare "$root" no-backports unhold update || return 1
  [ "$(installed "$root" qemu-utils)" = "$version" ] && vcmp "$version" lt "$(candidate "$root")" &&
    offered "$root" qemu-system-x86 "$version" && offered "$root" qemu-system-common "$version"
}
make_older() {
  local tmp="$CHROOTS/older.tmp" best="" version want
  prepare "$base" no-backports unhold update || die "older: apt-get update failed (log: $LOGS/apt-get-update.log)"
  want="$(candidate "$base")"
  for version in $(in_root "$base" apt-cache madison qemu-utils | awk -F' [|] ' '{ print $2 }'); do
    if vcmp "$version" lt "$want" && offered "$base" qemu-system-x86 "$version" &&
      offered "$base" qemu-system-common "$version" && { [ -z "$best" ] || vcmp "$version" gt "$best"; }; then
      best="$version"
    fi
  done
  remove_tree "$CHROOTS/older"
  echo "$want" >"$CHROOTS/older.candidate"
  if [ -z "$best" ]; then
    echo none >"$CHROOTS/older.kind"
    return
  fi
  copy_base older
  say "older: installing qemu-utils $best (below the candidate $want)"
  in_root "$tmp" apt-get install -y -qq --no-install-recommends "qemu-utils=$best" \
    >"$LOGS/older-install.log" 2>&1 || die "older: installing qemu-utils $best failed (log: $LOGS/older-install.log)"
  in_root "$tmp" apt-get clean
  keep older
  echo "$best" >"$CHROOTS/older.kind"
}

# run_case NAME LABEL ROOT SOURCES HOLD EXPECT: sets up chroot ROOT's sources (with-backports or
# no-backports) and qemu-utils' hold (hold or unhold), then runs setup.sh --simulate in it, which
# refreshes apt's lists itself. EXPECT: "candidate", QEMU's packages must end at the version apt
# offers qemu-system-x86 at; "installed", at the installed qemu-utils' version; "fail:TEXT",
# setup.sh must refuse, saying TEXT.
run_case() {
  local name="$1" label="$2" root="$3" sources="$4" hold="$5" expect="$6" started rc=0 before after
  local log="$LOGS/$name.log" problems=() package version plan summary=""
  started="$(now)"
  prepare "$root" "$sources" "$hold"
  case "$expect" in installed) expect="$(installed "$root" qemu-utils)" ;; esac
  mkdir -p "$root/opt/wrenn-test/scripts"
  cp scripts/setup.sh "$root/opt/wrenn-test/scripts/setup.sh"
  before="$(sha256sum <"$root/var/lib/dpkg/status")"
  in_root "$root" bash /opt/wrenn-test/scripts/setup.sh --simulate >"$log" 2>&1 || rc=$?
  after="$(sha256sum <"$root/var/lib/dpkg/status")"
  remove_tree "$root/opt/wrenn-test"
  case "$expect" in candidate) expect="$(candidate "$root")" ;; esac
  if [ "$before" != "$after" ]; then problems+=("setup.sh --simulate changed dpkg's state"); fi
  if [ "${expect#fail:}" != "$expect" ]; then
    if [ "$rc" -eq 0 ]; then
      problems+=("setup.sh --simulate succeeded, but it must refuse")
    elif ! grep -qF -- "${expect#fail:}" "$log"; then
      problems+=("setup.sh --simulate failed (exit $rc) without saying \"${expect#fail:}\"")
    else
      summary="refused as expected: $(grep -F -- "${expect#fail:}" "$log" | head -n 1)"
    fi
  elif [ "$rc" -ne 0 ]; then
    problems+=("setup.sh --simulate failed (exit $rc)")
  else
    # apt's plan: "Inst PACKAGE [OLD] (NEW ...)" and "Remv PACKAGE [OLD]" lines.
    plan="$(awk '$1 == "Inst" { new = ($3 ~ /^\[/) ? $4 : $3; old = ($3 ~ /^\[/) ? $3 : "";
      gsub(/[][()]/, "", new); gsub(/[][]/, "", old); print $2, new, old }' "$log")"
    if grep -q '^Remv ' "$log"; then
      problems+=("apt's plan removes packages: $(awk '$1 == "Remv" { printf "%s ", $2 }' "$log")")
    fi
    if ! awk '$1 == "qemu-system-x86"' <<<"$plan" | grep -q .; then
      problems+=("apt's plan does not install qemu-system-x86")
    fi
    for package in "${QEMU_PACKAGES[@]}"; do
      version="$(awk -v p="$package" '$1 == p { print $2 }' <<<"$plan")"
      [ -n "$version" ] || version="$(installed "$root" "$package")"
      [ -n "$version" ] || continue
      if [ "$version" != "$expect" ]; then
        problems+=("$package would be at $version, not $expect")
      fi
    done
    summary="$(grep -c '^Inst ' "$log") packages to install, QEMU at $expect"
    version="$(awk '$1 == "qemu-utils" && $3 != "" { print $3 " -> " $2 }' <<<"$plan")"
    if [ -n "$version" ]; then summary="$summary (qemu-utils $version)"; fi
  fi
  if [ ${#problems[@]} -eq 0 ]; then
    say "ok   $label: $summary ($(since "$started"))"
  else
    echo "$label" >>"$LOGS/failed"
    say "FAIL $label:"
    for package in "${problems[@]}"; do say "       $package"; done
    say "       setup.sh's output (log: $log), apt's Inst/Conf lines left out:"
    grep -v -E '^(Inst|Conf) ' "$log" | tail -n 30 | sed 's/^/         | /'
  fi
}

# The cached chroots are checked (or made) one at a time, as they are copied from the base;
# then each chroot's cases run, the chroots in parallel.
if backport_valid; then say "backport: cached ($(cat "$CHROOTS/backport.kind"))"; else
  started="$(now)"
  make_backport
  say "backport: made in $(since "$started")"
fi
if older_valid; then say "older: cached"; else
  started="$(now)"
  make_older
  say "older: made in $(since "$started")"
fi

# (a) A fresh bookworm.
cases_fresh() {
  run_case fresh "fresh $SUITE" "$base" no-backports unhold candidate
}

# (b) A newer qemu-utils (bookworm-backports' or the stand-in) already installed.
cases_backport() {
  local root="$CHROOTS/backport" version what
  version="$(installed "$root" qemu-utils)"
  what="stand-in qemu-utils $version"
  if [ "$(cat "$CHROOTS/backport.kind")" = real ]; then what="qemu-utils $version from $SUITE-backports"; fi
  run_case backport "$what, no backports in the sources" "$root" no-backports unhold candidate
  run_case backport-held "$what held, no backports in the sources" "$root" no-backports hold \
    "fail:apt offers no qemu-system-x86 at version $version: apt-mark unhold qemu-utils"
  if [ "$(cat "$CHROOTS/backport.kind")" != real ]; then
    prepare "$root" no-backports unhold
    return
  fi
  run_case backport-sourced "$what, backports in the sources" "$root" with-backports unhold candidate
  # apt takes a pinned package's dependencies from the default release, so QEMU cannot follow a
  # held backport by its version alone: setup.sh says how to install it from there instead.
  run_case backport-held-sourced "$what held, backports in the sources" "$root" with-backports hold \
    "fail:install it yourself (apt-get install -t $SUITE-backports qemu-system-x86), or apt-mark unhold qemu-utils"
  prepare "$root" with-backports unhold # as backport_valid sets it: no lists to fetch again
}

# (c) An older qemu-utils installed, then held there.
cases_older() {
  local root="$CHROOTS/older" version
  version="$(cat "$CHROOTS/older.kind")"
  if [ "$version" = none ]; then
    say "skip older: apt offers qemu-utils at no version below $(cat "$CHROOTS/older.candidate")" \
      "that it also offers qemu-system-x86 and qemu-system-common at"
    return
  fi
  run_case older "qemu-utils $version (older than the candidate)" "$root" no-backports unhold candidate
  run_case older-held "qemu-utils $version held" "$root" no-backports hold installed
  prepare "$root" no-backports unhold
}

rm -f "$LOGS/failed"
say "running the cases: fresh, backport and older in parallel"
for chroot in fresh backport older; do
  "cases_$chroot" >"$LOGS/cases-$chroot.out" 2>&1 &
  pids+=($!)
done
broken=()
for chroot in fresh backport older; do
  if ! wait "${pids[0]}"; then broken+=("$chroot"); fi
  pids=("${pids[@]:1}")
  cat "$LOGS/cases-$chroot.out"
done
if [ ${#broken[@]} -gt 0 ]; then
  die "the cases of ${broken[*]} stopped on an error (see above)"
fi
if [ -s "$LOGS/failed" ]; then
  die "setup.sh cannot resolve its packages in: $(paste -sd';' "$LOGS/failed" | sed 's/;/; /g')"
fi
say "all cases passed in $(since "$start_all")"
