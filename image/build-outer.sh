#!/usr/bin/env bash
# build-outer.sh: build the outer image from the Dockerfile with podman (or
# buildah), on a machine where nothing can be pulled.
#
#   image/build-outer.sh [--tag NAME] [--workload OCI_LAYOUT_DIR]
#                        [--base IMAGE | --base-tar FILE] [--ums PATH | --cargo]
#                        [--engine podman|buildah|docker] [--save FILE]
#
#   --tag NAME          the image's name (default localhost/ums-outer:latest)
#   --workload DIR      the workload's OCI image layout, baked in at
#                       /var/lib/ums-image (image/wrap-workload.sh makes one from
#                       a registry, a docker-archive or an OCI tarball). Without
#                       it the image is the standby image (UMS_STANDBY=true).
#   --base IMAGE        the runtime base (a local bookworm image). Default: a
#                       Debian bookworm made with `debootstrap --variant=minbase`
#                       and imported as localhost/ums-bookworm:base, unless an
#                       image of that name exists already.
#   --base-tar FILE     keep the debootstrap'ed root as a tarball in FILE and
#                       import it from there next time (saves ~35 s)
#   --ums PATH          the ums binary to copy in (built on a bookworm host).
#                       Default: `cargo build --release -p ums` here, then
#                       target/release/ums (--build-arg UMS_BUILD=prebuilt).
#   --cargo             compile ums in the Dockerfile's build-cargo stage
#                       instead (needs RUST_IMAGE, rust:1-bookworm, pullable)
#   --engine E          podman (default when installed), buildah, or docker
#                       (Docker Engine with BuildKit; the docker client's
#                       DOCKER_HOST names the engine; docker 20.10 or later)
#   --save FILE         also write the image to FILE as a docker-archive
#                       (`ctr images import FILE`, `docker load -i FILE`)
#
# Engine storage is the engine's default; set CONTAINERS_STORAGE_CONF to use
# another one (the tests do). Needs root, and podman or buildah, debootstrap
# (image/install-image-deps.sh installs them). The packages inside the image
# come from deb.debian.org (UMS_DEBIAN_MIRROR) through the Dockerfile's RUN
# step, which uses the host's network. Prints the image's size and the build
# time at the end.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
log() { echo "build-outer: $*" >&2; }
die() { log "error: $*"; exit 1; }

tag=localhost/ums-outer:latest
workload=
base=
base_tar=
ums=
cargo_stage=0
engine=
save=
mirror=${UMS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_NAME=localhost/ums-bookworm:base

while (($#)); do
	case $1 in
	--tag) tag=${2:?}; shift 2 ;;
	--workload) workload=${2:?}; shift 2 ;;
	--base) base=${2:?}; shift 2 ;;
	--base-tar) base_tar=${2:?}; shift 2 ;;
	--ums) ums=${2:?}; shift 2 ;;
	--cargo) cargo_stage=1; shift ;;
	--engine) engine=${2:?}; shift 2 ;;
	--save) save=${2:?}; shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
done

((EUID == 0)) || die "must run as root"
if [[ -z $engine ]]; then
	if command -v podman >/dev/null; then engine=podman; else engine=buildah; fi
fi
command -v "$engine" >/dev/null || die "$engine not found: run image/install-image-deps.sh"
# This machine's facts (docs/outer-image.md): crun refuses hybrid cgroups, the
# hard RLIMIT_NOFILE cannot be raised without CAP_SYS_RESOURCE, no systemd.
runtime=$(command -v runc || true)
[[ -n $runtime ]] || die "runc not found: run image/install-deps.sh"
ulimits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=32768:32768)
case $engine in
podman) eng=(podman --cgroup-manager cgroupfs --events-backend file) ;;
buildah) eng=(buildah) ;;
docker) eng=(docker) ;;
*) die "--engine must be podman, buildah or docker" ;;
esac
if [[ -n $workload ]]; then
	[[ -f $workload/index.json && -f $workload/oci-layout ]] \
		|| die "$workload is not an OCI image layout (no index.json or oci-layout)"
fi

t0=$(date +%s.%N)
work=$(mktemp -d /tmp/ums-build-outer.XXXXXX)
trap 'rm -rf "$work"' EXIT

image_exists() {
	[[ $engine != docker ]] && "${eng[@]}" image exists "$1" 2>/dev/null && return 0
	"${eng[@]}" inspect --type image "$1" >/dev/null 2>&1
}

# ---- the base: a minimal bookworm, made here (nothing can be pulled)
if [[ -z $base ]]; then
	base=$BASE_NAME
	if image_exists "$base"; then
		log "base $base exists"
	else
		tarball=$base_tar
		if [[ -z $tarball || ! -s $tarball ]]; then
			command -v debootstrap >/dev/null || die "debootstrap not found: run image/install-image-deps.sh"
			log "debootstrap --variant=minbase bookworm ($mirror)"
			root=$work/base
			debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
				|| { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
			cat >"$root/etc/apt/sources.list" <<-EOF
				deb $mirror bookworm main
				deb $mirror bookworm-updates main
				deb ${mirror%/debian}/debian-security bookworm-security main
			EOF
			rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
				"$root"/var/log/* "$root"/tmp/* "$root/debootstrap"
			tarball=${base_tar:-$work/base.tar}
			mkdir -p "$(dirname "$tarball")"
			tar -C "$root" --numeric-owner -cf "$tarball.part" .
			mv "$tarball.part" "$tarball"
			rm -rf "$root"
		fi
		log "importing $tarball as $base"
		"${eng[@]}" import --change 'CMD ["/bin/bash"]' "$tarball" "$base" >/dev/null \
			2>"$work/import.log" || {
			# buildah has no import: make a container from scratch and add the tarball.
			[[ $engine == buildah ]] || { cat "$work/import.log" >&2; die "import failed"; }
			c=$(buildah from scratch)
			buildah add "$c" "$tarball" / >/dev/null
			buildah config --cmd /bin/bash "$c"
			buildah commit --rm "$c" "$base" >/dev/null
		}
	fi
fi

# ---- the build context: the sources the Dockerfile copies, ums, the workload
ctx=$work/context
mkdir -p "$ctx"
cp -a "$repo/Dockerfile" "$repo/.dockerignore" "$repo/Cargo.toml" "$repo/Cargo.lock" "$ctx/"
for d in shim tests image rootfs; do
	tar -C "$repo" --exclude=target -cf - "$d" | tar -C "$ctx" -xf -
done
args=(--build-arg "BASE_IMAGE=$base")
pull=(--pull=never)
if ((cargo_stage)); then
	pull=()
	args+=(--build-arg UMS_BUILD=cargo)
	[[ -z ${RUST_IMAGE:-} ]] || args+=(--build-arg "RUST_IMAGE=$RUST_IMAGE")
else
	if [[ -z $ums ]]; then
		log "cargo build --release -p ums"
		(cd "$repo" && cargo build --release --locked -p ums) >&2
		target=${CARGO_TARGET_DIR:-$repo/target}
		[[ $target == /* ]] || target=$repo/$target
		ums=$target/release/ums
	fi
	[[ -x $ums ]] || die "ums binary $ums not found"
	install -D -m 0755 "$ums" "$ctx/prebuilt/ums"
	# The release profile keeps line tables (debug = 1) for the benchmarks'
	# profiles; the image does not need them (31 MiB -> about 8).
	if command -v strip >/dev/null; then strip --strip-debug "$ctx/prebuilt/ums"; fi
	args+=(--build-arg UMS_BUILD=prebuilt --build-arg UMS_PREBUILT=prebuilt/ums)
fi
if [[ -n $workload ]]; then
	mkdir -p "$ctx/workload"
	cp -a "$workload/." "$ctx/workload/"
	args+=(--build-arg WORKLOAD_LAYOUT=workload)
else
	args+=(--build-arg UMS_STANDBY=true)
fi

log "$engine build -t $tag (base $base)"
if [[ $engine == docker ]]; then
	# BuildKit: it skips the stage the build does not use (the classic
	# builder would pull rust:1-bookworm for build-cargo). BuildKit takes no
	# --ulimit or --runtime: the engine's own (dockerd --default-ulimit) apply.
	[[ ${#pull[@]} -eq 0 ]] || pull=(--pull=false)
	DOCKER_BUILDKIT=1 "${eng[@]}" build --network host --progress plain \
		"${pull[@]}" "${args[@]}" -f "$ctx/Dockerfile" -t "$tag" "$ctx" >&2
else
	build=(build)
	[[ $engine == buildah ]] && build=(build --isolation oci)
	"${eng[@]}" "${build[@]}" --layers --network host --runtime "$runtime" "${ulimits[@]}" \
		"${pull[@]}" "${args[@]}" -f "$ctx/Dockerfile" -t "$tag" "$ctx" >&2
fi

if [[ -n $save ]]; then
	log "saving $tag to $save (docker-archive)"
	rm -f "$save"
	case $engine in
	podman) "${eng[@]}" save --format docker-archive -o "$save" "$tag" >&2 ;;
	docker) "${eng[@]}" save -o "$save" "$tag" >&2 ;;
	buildah) buildah push "$tag" "docker-archive:$save:$tag" >&2 ;;
	esac
fi

t1=$(date +%s.%N)
size=$("${eng[@]}" image inspect --format '{{.Size}}' "$tag" 2>/dev/null || echo 0)
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
mib=$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1048576 }')
log "built $tag: $mib MiB in $secs s"
echo "image=$tag size_bytes=$size build_seconds=$secs"
