#!/usr/bin/env bash
# wrap-workload.sh: put an unchanged workload image into the outer image.
#
#   image/wrap-workload.sh SOURCE [--tag NAME] [--layout-only DIR] [BUILD-OUTER OPTIONS...]
#   image/wrap-workload.sh --standby [--tag NAME] [BUILD-OUTER OPTIONS...]
#
# SOURCE is the workload image, in any form skopeo reads:
#   docker://REGISTRY/REPO:TAG    from a registry (when one is reachable)
#   REGISTRY/REPO:TAG             the same (docker:// is assumed)
#   docker-archive:FILE[:REF]     a `docker save` tarball
#   oci-archive:FILE[:REF]        an OCI image layout in a tarball
#   oci:DIR[:REF]                 an OCI image layout directory
#   containers-storage:REF        an image in podman/buildah's local storage
#   FILE                          a tarball: docker-archive when it holds
#                                 manifest.json, oci-archive when index.json
#   DIR                           an OCI image layout directory (index.json)
# skopeo copies it, layers and config byte for byte (no rebuild, no change to
# the image), into an OCI image layout, and image/build-outer.sh bakes that
# layout into the outer image at /var/lib/ums-image. `--standby` builds the
# outer image with no workload (the standby image, which receives the
# workload's blobs from the source during a migration).
#
#   --tag NAME          the outer image's name (default localhost/ums-outer:latest)
#   --layout-only DIR   only write the OCI image layout to DIR (to mount it at
#                       /var/lib/ums-image instead of baking it in); no build
# Other options go to image/build-outer.sh (--base, --base-tar, --ums, --cargo,
# --engine, --save; see its --help).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "wrap-workload: $*" >&2; }
die() { log "error: $*"; exit 1; }

source=
standby=0
layout_only=
build_args=()
while (($#)); do
	case $1 in
	--standby) standby=1; shift ;;
	--layout-only) layout_only=${2:?}; shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	--tag | --base | --base-tar | --ums | --engine | --save) build_args+=("$1" "${2:?}"); shift 2 ;;
	--cargo) build_args+=("$1"); shift ;;
	-*) die "unknown option $1 (see --help)" ;;
	*) [[ -z $source ]] || die "one SOURCE only ($source, $1)"; source=$1; shift ;;
	esac
done

if ((standby)); then
	[[ -z $source ]] || die "--standby takes no SOURCE"
	[[ -z $layout_only ]] || die "--standby has no layout to write"
	exec bash "$here/build-outer.sh" "${build_args[@]}"
fi
[[ -n $source ]] || die "no SOURCE (or --standby); see --help"

# The skopeo source reference.
case $source in
docker://* | docker-archive:* | oci-archive:* | oci:* | containers-storage:* | dir:*) ref=$source ;;
*)
	if [[ -d $source ]]; then
		[[ -f $source/index.json ]] || die "$source is a directory but not an OCI image layout (no index.json)"
		ref=oci:$(realpath "$source")
	elif [[ -f $source ]]; then
		members=$(tar -tf "$source" 2>/dev/null | sed 's|^\./||') || die "$source is not a tarball"
		if grep -qx 'manifest.json' <<<"$members"; then
			ref=docker-archive:$(realpath "$source")
		elif grep -qx 'index.json' <<<"$members"; then
			ref=oci-archive:$(realpath "$source")
		else
			die "$source holds neither manifest.json (docker-archive) nor index.json (OCI layout)"
		fi
	else
		ref=docker://$source
	fi
	;;
esac
command -v skopeo >/dev/null || die "skopeo not found: run image/install-image-deps.sh"

work=$(mktemp -d /tmp/ums-wrap-workload.XXXXXX)
trap 'rm -rf "$work"' EXIT
policy=()
[[ -e /etc/containers/policy.json ]] || policy=(--insecure-policy)
log "skopeo copy $ref -> OCI image layout"
skopeo "${policy[@]}" copy --quiet "$ref" "oci:$work/layout:latest" >&2

if [[ -n $layout_only ]]; then
	mkdir -p "$layout_only"
	cp -a "$work/layout/." "$layout_only/"
	log "wrote the OCI image layout of $source to $layout_only"
	exit 0
fi
bash "$here/build-outer.sh" --workload "$work/layout" "${build_args[@]}"
