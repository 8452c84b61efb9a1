#!/usr/bin/env bash
# Starts the OCI registries the template-build tests pull from (idempotent), and pushes the
# test images into them. Run as root. Debian's `docker-registry` (the CNCF distribution
# registry), two instances with their storage in /var/lib/wrenn/test-registry:
#   - open:    127.0.0.1:${WRENN_REGISTRY_PORT:-55000}, no login;
#   - private: 127.0.0.1:$((port + 1)), basic login (htpasswd) as wrenn-ci / the password
#              printed below.
# The test image, made here with umoci from a busybox tree with bash (no Docker), in two
# layers: the second removes a file of the first and replaces a directory's contents (umoci
# writes whiteouts for both), and adds /app; its config sets ENV, WORKDIR /app and USER app. It is
# pushed with skopeo as wrenn-test/busybox:v1 to the open registry and wrenn-test/private:v1
# to the private one. The image is cached in $CACHE_DIR/test-image and made again when this
# script changes.
# Prints, one per line: the open registry, the private registry, the login (user:password).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE_DIR="${WRENN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}"
PORT="${WRENN_REGISTRY_PORT:-55000}"
PRIVATE_PORT=$((PORT + 1))
DATA=/var/lib/wrenn/test-registry
USER_NAME=wrenn-ci
PASSWORD=wrenn-ci-registry-password

missing=()
for tool in docker-registry:docker-registry skopeo:skopeo umoci:umoci htpasswd:apache2-utils \
  busybox:busybox-static; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "registry: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The package's own service (on :5000) is not the tests': it is left as the machine has it.

# Starts one registry instance named $1 on port $2 (with a login when $3 is "login").
start_registry() {
  local name="$1" port="$2" login="${3:-}"
  local dir="$DATA/$name"
  mkdir -p "$dir/storage"
  if curl -fsS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/" 2>/dev/null | grep -q 200 ||
    { [ "$login" = login ] && curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/" 2>/dev/null | grep -q 401; }; then
    return 0
  fi
  {
    echo "version: 0.1"
    echo "log: {level: warn}"
    echo "storage:"
    echo "  filesystem: {rootdirectory: $dir/storage}"
    echo "  delete: {enabled: true}"
    echo "http:"
    echo "  addr: 127.0.0.1:$port"
    echo "  secret: wrenn-test-registry-$name"
    if [ "$login" = login ]; then
      htpasswd -Bbn "$USER_NAME" "$PASSWORD" >"$dir/htpasswd"
      echo "auth:"
      echo "  htpasswd: {realm: wrenn-test, path: $dir/htpasswd}"
    fi
  } >"$dir/config.yml"
  setsid docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
  for _ in $(seq 100); do
    if curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/" 2>/dev/null | grep -qE '200|401'; then
      return 0
    fi
    sleep 0.1
  done
  echo "registry: $name did not start on 127.0.0.1:$port; its log:" >&2
  cat "$dir/registry.log" >&2
  exit 1
}
start_registry open "$PORT"
start_registry private "$PRIVATE_PORT" login

# The test image, made once per version of this script.
key="$(sha256sum "$0" | cut -c1-16)"
IMAGE_DIR="$CACHE_DIR/test-image"
LAYOUT="$IMAGE_DIR/oci-$key"
if [ ! -f "$LAYOUT/index.json" ]; then
  rm -rf "$IMAGE_DIR"
  mkdir -p "$IMAGE_DIR"
  work="$(mktemp -d "$IMAGE_DIR/work.XXXXXX")"
  umoci init --layout "$work/oci" >/dev/null
  umoci new --image "$work/oci:v1"
  umoci unpack --image "$work/oci:v1" "$work/bundle" >/dev/null
  root="$work/bundle/rootfs"
  # Layer 1: busybox and its applets, bash with its libraries, accounts, and what layer 2
  # removes.
  mkdir -p "$root"/{bin,etc,tmp,opt/lower,usr/share/wrenn-test,home/app}
  chmod 1777 "$root/tmp"
  cp "$(command -v busybox)" "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  rm -f "$root/bin/bash"
  cp /bin/bash "$root/bin/bash"
  for library in $(ldd /bin/bash | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$library")"
    cp -L "$library" "$root$library"
  done
  printf 'root:x:0:0:root:/root:/bin/bash\napp:x:2000:2000::/home/app:/bin/bash\n' >"$root/etc/passwd"
  printf 'root:x:0:\napp:x:2000:\n' >"$root/etc/group"
  chown 2000:2000 "$root/home/app"
  echo "from layer one" >"$root/etc/layer-one-gone"
  echo "from layer one" >"$root/opt/lower/hidden"
  echo "kept from layer one" >"$root/usr/share/wrenn-test/hello"
  umoci repack --refresh-bundle --image "$work/oci:v1" "$work/bundle" >/dev/null
  # Layer 2: whiteouts, a directory's contents replaced, and /app.
  rm "$root/etc/layer-one-gone"
  rm -rf "$root/opt/lower"
  mkdir -p "$root/opt/lower" "$root/app"
  echo "from layer two" >"$root/opt/lower/new"
  echo "from layer two" >"$root/app/marker"
  chown -R 2000:2000 "$root/app"
  umoci repack --image "$work/oci:v1" "$work/bundle" >/dev/null
  umoci config --image "$work/oci:v1" \
    --config.env "PATH=/usr/local/bin:/usr/bin:/bin" --config.env "WRENN_IMAGE_ENV=from-image" \
    --config.workingdir /app --config.user app
  umoci gc --layout "$work/oci"
  mv "$work/oci" "$LAYOUT"
  rm -rf "$work"
fi
skopeo copy -q --dest-tls-verify=false "oci:$LAYOUT:v1" \
  "docker://127.0.0.1:$PORT/wrenn-test/busybox:v1" >&2
skopeo copy -q --dest-tls-verify=false --dest-creds "$USER_NAME:$PASSWORD" "oci:$LAYOUT:v1" \
  "docker://127.0.0.1:$PRIVATE_PORT/wrenn-test/private:v1" >&2
echo "127.0.0.1:$PORT"
echo "127.0.0.1:$PRIVATE_PORT"
echo "$USER_NAME:$PASSWORD"
