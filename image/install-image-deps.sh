#!/usr/bin/env bash
# Installs what building and running the outer image with real container
# engines needs, from Debian bookworm: podman (with conmon), buildah, skopeo,
# containerd (with ctr and the runc v2 shim), Docker Engine (docker.io:
# dockerd, the docker client), debootstrap, and promtool (package prometheus,
# which checks deploy/prometheus/); and, in a Python
# venv under the cargo target dir, kubernetes-validate (PyPI), the schema
# validator the tests check deploy/kubernetes/ with. Used by
# `make test-image` (tests/tests/outer_image.rs) and by anyone running
# image/build-outer.sh or image/wrap-workload.sh. Idempotent.
#
# Installing containerd, dockerd or prometheus does not start them here
# (policy-rc.d below, and no systemd on the test machines); where a
# package's service does start, this script leaves it alone: the tests run
# their own containerd and dockerd with their own sockets and dirs, and
# never start prometheus (only its promtool is used).
set -euo pipefail

PKGS=(podman buildah skopeo containerd docker.io prometheus debootstrap conmon python3-venv)
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target == /* ]] || target=$repo/$target
VENV=$target/ums-tools/kubernetes-validate
log() { echo "install-image-deps: $*" >&2; }

need=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
  log "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d keeps a package's service from being started by its postinst.
  cleanup_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; cleanup_policy=1
  fi
  trap '[ "$cleanup_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  if ! apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; then
    apt-get update -qq
    apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
  fi
fi
if ! "$VENV/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  log "installing $KUBERNETES_VALIDATE into $VENV"
  rm -rf "$VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE"
fi
log "ready: $(podman --version), $(buildah --version | cut -d' ' -f1-3), $(skopeo --version), containerd $(containerd --version | awk '{print $3}'), dockerd $(dockerd --version | awk '{print $3}' | tr -d ,), $(promtool --version 2>&1 | head -1 | awk '{print "promtool", $3}'), debootstrap $(dpkg-query -W -f='${Version}' debootstrap), kubernetes-validate $("$VENV/bin/kubernetes-validate" --version)"
