#!/usr/bin/env bash
# Installs what ums needs at run time and what its tests need:
#   - runc, crun, iptables, iproute2 from Debian bookworm;
#   - CRIU 4.2.1 built from its pinned upstream source tarball (bookworm's 3.17
#     fails on kernels >= 6.x here, 4.1.1 cannot dump TCP sockets on >= 6.16);
#   - with --test: what the end-to-end tests use (busybox-static, a static C
#     toolchain for the test workloads, redis-tools for Debian's redis server
#     as a real workload, containerd 1.6 with ctr for the containerd shim's
#     tests, which start their own containerd: tests/tests/containerd_shim.rs).
# Idempotent: when a working CRIU >= 4.2 and the runtimes are present it only
# checks them. Used by the README, .ci/run and the Dockerfile alike.
set -euo pipefail

CRIU_VERSION=4.2.1
CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
CRIU_URL="http://deb.debian.org/debian/pool/main/c/criu/criu_${CRIU_VERSION}.orig.tar.xz"
PREFIX=${UMS_PREFIX:-/usr/local}
WITH_TEST=0
for a in "$@"; do
  case "$a" in
    --test) WITH_TEST=1 ;;
    *) echo "install-deps: unknown argument $a" >&2; exit 2 ;;
  esac
done

log() { echo "install-deps: $*" >&2; }

RUNTIME_PKGS=(runc crun iptables iproute2 ca-certificates curl xz-utils)
CRIU_BUILD_PKGS=(build-essential pkg-config libprotobuf-c-dev protobuf-c-compiler
  protobuf-compiler libprotobuf-dev python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev
  libgnutls28-dev libnftables-dev libaio-dev uuid-dev)
TEST_PKGS=(busybox-static gcc libc6-dev util-linux procps psmisc zstd gzip redis-tools containerd)

missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

apt_install() {
  local need
  need=$(missing_pkgs "$@")
  [ -z "$need" ] && return 0
  log "installing Debian packages: $need"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends $need >/dev/null; then
    apt-get update -qq
    apt-get install -y --no-install-recommends $need >/dev/null
  fi
}

criu_ok() {
  command -v criu >/dev/null 2>&1 || return 1
  local v
  v=$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$v" ] || return 1
  # >= 4.2
  local major minor
  major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
  [ "$major" -gt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -ge 2 ]; }
}

build_criu() {
  apt_install "${CRIU_BUILD_PKGS[@]}"
  local work
  work=$(mktemp -d /tmp/ums-criu-build.XXXXXX)
  trap 'rm -rf "$work"' RETURN
  log "downloading CRIU ${CRIU_VERSION}"
  curl -fsSL --retry 3 -o "$work/criu.tar.xz" "$CRIU_URL"
  echo "${CRIU_SHA256}  $work/criu.tar.xz" | sha256sum -c --quiet - \
    || { log "CRIU tarball sha256 mismatch"; exit 1; }
  tar -C "$work" -xf "$work/criu.tar.xz"
  local src
  src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'criu*' -print -quit)
  log "building CRIU ${CRIU_VERSION} in $src"
  make -C "$src" -j"$(nproc)" criu >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; log "CRIU build failed"; exit 1; }
  install -D -m 0755 "$src/criu/criu" "$PREFIX/sbin/criu"
  hash -r
}

apt_install "${RUNTIME_PKGS[@]}"
[ "$WITH_TEST" = 1 ] && apt_install "${TEST_PKGS[@]}"

# Real servers the tests run as nested workloads (tests/tests/real_servers.rs),
# as Debian's packages: downloaded, never installed (installing would start
# them as services on this host). The tests unpack them into their images.
TEST_DEBS=(nginx memcached libevent-2.1-7)
TEST_DEBS_DIR=/var/cache/ums-test-debs
fetch_test_debs() {
  mkdir -p "$TEST_DEBS_DIR"
  local p need=()
  for p in "${TEST_DEBS[@]}"; do
    compgen -G "$TEST_DEBS_DIR/${p}_*.deb" >/dev/null || need+=("$p")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  log "downloading (not installing) Debian packages for the tests: ${need[*]}"
  if ! (cd "$TEST_DEBS_DIR" && apt-get download -qq -o APT::Sandbox::User=root "${need[@]}" >/dev/null); then
    apt-get update -qq
    (cd "$TEST_DEBS_DIR" && apt-get download -qq -o APT::Sandbox::User=root "${need[@]}" >/dev/null)
  fi
}
[ "$WITH_TEST" = 1 ] && fetch_test_debs
if criu_ok; then
  log "criu $(criu --version | awk '/^Version:/ {print $2}') already present"
else
  build_criu
  criu_ok || { log "criu at $PREFIX/sbin/criu does not report >= 4.2"; exit 1; }
fi
# The kernel must let CRIU do its job; say so now rather than in a failed dump.
if ! criu check >/dev/null 2>&1; then
  log "warning: 'criu check' reports problems:"; criu check 2>&1 | tail -5 >&2 || true
fi
log "ready: runc $(runc --version | awk 'NR==1{print $3}'), crun $(crun --version | awk 'NR==1{print $3}'), criu $(criu --version | awk '/^Version:/ {print $2}')"
