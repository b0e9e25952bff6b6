#!/bin/bash
# outer.sh: a simulated outer container, laid out the way the outer image's
# Dockerfile lays it out, without a container engine (none runs on this machine).
#
#   outer.sh --name NAME --root DIR [--netns PATH] [--layout OCI_LAYOUT_DIR]
#            [--ums PATH_TO_UMS_BINARY] [--peer-keys KEY_SET_DIR]
#            [--cgroup-procs FILE]... [--state-size SIZE] [--clock-offset SECS]
#            -- ARGS_FOR_UMS_INIT...
#
# It builds a root filesystem under DIR and runs `ums init ARGS...` in it as
# PID 1 of new mount, pid, uts and ipc namespaces, in the network namespace PATH
# (or a fresh one with only loopback). Inside:
#   /usr /bin /sbin /lib* /etc   the host's, read-only (symlinks kept as symlinks)
#   /proc                        fresh, for the new pid namespace
#   /sys                         fresh sysfs (new netns), host cgroups rbound rw
#   /dev                         the host's, rbound
#   /run /tmp /var/lib/ums       tmpfs (ums's state, images dirs, bundles;
#                                --state-size limits /var/lib/ums, as a small disk)
#   $UMS_LAYOUT_DIR              the workload's OCI image layout, read-only
#   $UMS_INSTALL_DIR/ums         the ums binary, read-only; first on PATH
#   /etc/ums/peer                the peer key set (--peer-keys), read-only, as a
#                                Kubernetes Secret would be mounted; /etc is then
#                                the host's under a read-only overlay (the host's
#                                /etc is never written)
# --clock-offset SECS: the outer container gets a time namespace of its own
# whose CLOCK_MONOTONIC and CLOCK_BOOTTIME run SECS ahead of the host's, as
# on a host booted that much earlier (two real hosts never agree on them).
# --cgroup-procs FILE (repeatable): the outer container joins that cgroup
# (writes its pid to FILE) before anything else, as an orchestrator puts a
# container in a cgroup of its own; the caller made the cgroup and removes it.
# The environment is cleared except PATH, HOME, HOSTNAME and UMS_*/RUST_*
# variables. UMS_OUTER_EXEC=PROGRAM replaces `ums init` with `PROGRAM ARGS...`
# (used to test this script itself).
#
# The process that runs this script becomes `unshare`, whose only child is PID 1
# (killed with SIGKILL if unshare dies). A signal meant for ums goes to that
# child; the kernel delivers to a pid namespace's init only the signals it has a
# handler for. Just before the final exec the script prints
# `ums-outer: exec ...` on stderr: from then on the root is in place.
# Mounts live only in the private mount namespace; DIR itself keeps the empty
# mount points and symlinks, and the caller removes it.
set -euo pipefail

UMS_LAYOUT_DIR=/var/lib/ums-image
UMS_INSTALL_DIR=/opt/ums
OUTER_PATH=$UMS_INSTALL_DIR:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "ums-outer: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
	echo "usage: $0 --name NAME --root DIR [--netns PATH] [--layout DIR] [--ums PATH] [--peer-keys DIR] -- ARGS..." >&2
	exit 2
}

name= root= netns= layout= ums= peer_keys= state_size= clock_offset=
cgroup_procs=()
UMS_PEER_KEYS_DIR=/etc/ums/peer
args=()

parse_args() {
	while (($#)); do
		case $1 in
		--name) name=${2:?}; shift 2 ;;
		--root) root=${2:?}; shift 2 ;;
		--netns) netns=${2:?}; shift 2 ;;
		--layout) layout=${2:?}; shift 2 ;;
		--ums) ums=${2:?}; shift 2 ;;
		--peer-keys) peer_keys=${2:?}; shift 2 ;;
		--cgroup-procs) cgroup_procs+=("${2:?}"); shift 2 ;;
		--state-size) state_size=${2:?}; shift 2 ;;
		--clock-offset) clock_offset=${2:?}; shift 2 ;;
		--) shift; args=("$@"); return ;;
		*) usage ;;
		esac
	done
}

# Host side: check the inputs, then become unshare (pid kept through the execs).
outer_stage() {
	[[ -n $name && -n $root ]] || usage
	((EUID == 0)) || die "must run as root"
	if [[ -z ${UMS_OUTER_EXEC:-} ]]; then
		[[ -n $ums ]] || die "--ums PATH is required"
		[[ -x $ums ]] || die "ums binary $ums not found (build ums first: cargo build -p ums)"
		ums=$(realpath "$ums")
	fi
	if [[ -n $layout ]]; then
		[[ -f $layout/index.json ]] || die "$layout is not an OCI image layout (no index.json)"
		layout=$(realpath "$layout")
	fi
	if [[ -n $peer_keys ]]; then
		[[ -d $peer_keys ]] || die "peer key set $peer_keys is not a directory"
		peer_keys=$(realpath "$peer_keys")
	fi
	if [[ -n $netns ]]; then
		[[ -e $netns ]] || die "network namespace $netns does not exist"
	fi
	mkdir -p "$root"
	root=$(realpath "$root")
	local f
	for f in "${cgroup_procs[@]}"; do
		echo $$ >"$f" || die "cannot join the cgroup of $f"
	done

	local self enter=() ns=(unshare --mount --pid --uts --ipc --fork
		--propagation private --kill-child=SIGKILL)
	self=$(realpath "${BASH_SOURCE[0]}")
	if [[ -n $netns ]]; then
		enter=(nsenter "--net=$netns" --)
	else
		ns+=(--net)
	fi
	[[ -z $clock_offset ]] || ns+=(--time --monotonic "$clock_offset" --boottime "$clock_offset")
	local inner=(--name "$name" --root "$root")
	[[ -z $layout ]] || inner+=(--layout "$layout")
	[[ -z $ums ]] || inner+=(--ums "$ums")
	[[ -z $peer_keys ]] || inner+=(--peer-keys "$peer_keys")
	[[ -z $state_size ]] || inner+=(--state-size "$state_size")
	export UMS_OUTER_STAGE=inner
	exec "${enter[@]}" "${ns[@]}" -- /bin/bash "$self" "${inner[@]}" -- "${args[@]}"
}

ro_bind() {
	mount --bind "$1" "$2"
	mount -o remount,bind,ro "$2"
}

# Inside the new namespaces, as PID 1: build the root, pivot into it, exec.
inner_stage() {
	(($$ == 1)) || die "inner stage runs as PID 1, not $$"
	trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR
	mount --make-rprivate /
	mount --bind "$root" "$root" # pivot_root needs the new root to be a mount point

	local d
	for d in usr bin sbin lib lib32 lib64 libx32; do
		if [[ -L /$d ]]; then
			ln -sfn "$(readlink "/$d")" "$root/$d"
		elif [[ -d /$d ]]; then
			mkdir -p "$root/$d"
			ro_bind "/$d" "$root/$d"
		fi
	done
	mkdir -p "$root"/{etc,proc,sys,dev,run,tmp,root,var/lib/ums,opt} \
		"$root$UMS_LAYOUT_DIR" "$root$UMS_INSTALL_DIR"
	[[ -e $root/var/run ]] || ln -s /run "$root/var/run"
	if [[ -n $peer_keys ]]; then
		# The key set goes where a Secret would be mounted, under /etc, which
		# is the host's: an overlay with a throwaway upper, then read-only.
		mkdir -p "$root/.etc-overlay"
		mount -t tmpfs -o mode=0700 ums-etc "$root/.etc-overlay"
		mkdir -p "$root/.etc-overlay/upper" "$root/.etc-overlay/work"
		mount -t overlay ums-etc -o "lowerdir=/etc,upperdir=$root/.etc-overlay/upper,workdir=$root/.etc-overlay/work" "$root/etc"
		mkdir -p "$root$UMS_PEER_KEYS_DIR"
		ro_bind "$peer_keys" "$root$UMS_PEER_KEYS_DIR"
		mount -o remount,ro "$root/etc"
	else
		ro_bind /etc "$root/etc"
	fi
	mount -t tmpfs -o mode=0755 ums-run "$root/run"
	mount -t tmpfs -o mode=1777 ums-tmp "$root/tmp"
	mount -t tmpfs -o "mode=0700${state_size:+,size=$state_size}" ums-state "$root/var/lib/ums"
	mount -t proc proc "$root/proc"
	if mount -t sysfs sysfs "$root/sys" 2>/dev/null; then
		mount --rbind /sys/fs/cgroup "$root/sys/fs/cgroup"
	else
		mount --rbind /sys "$root/sys"
	fi
	mount --rbind /dev "$root/dev"
	if [[ -n $ums ]]; then
		touch "$root$UMS_INSTALL_DIR/ums"
		ro_bind "$ums" "$root$UMS_INSTALL_DIR/ums"
	fi
	[[ -z $layout ]] || ro_bind "$layout" "$root$UMS_LAYOUT_DIR"

	echo "$name" >/proc/sys/kernel/hostname
	ip link set lo up

	cd "$root"
	mkdir -p .oldroot
	pivot_root . .oldroot
	cd /
	export PATH=$OUTER_PATH
	hash -r
	umount -l /.oldroot
	rmdir /.oldroot
	if [[ -d /.etc-overlay ]]; then
		umount -l /.etc-overlay # the overlay keeps its own reference
		rmdir /.etc-overlay
	fi

	local prog=("$UMS_INSTALL_DIR/ums" init) keep=(PATH="$OUTER_PATH" HOME=/root HOSTNAME="$name") v
	[[ -z ${UMS_OUTER_EXEC:-} ]] || prog=("$UMS_OUTER_EXEC")
	for v in $(compgen -e); do
		case $v in
		UMS_OUTER_STAGE | UMS_OUTER_EXEC) ;;
		UMS_* | RUST_LOG | RUST_BACKTRACE) keep+=("$v=${!v}") ;;
		esac
	done
	log "exec ${prog[*]} (${#args[@]} more arguments)"
	exec env -i "${keep[@]}" "${prog[@]}" "${args[@]}"
}

main() {
	parse_args "$@"
	if [[ ${UMS_OUTER_STAGE:-} == inner ]]; then
		inner_stage
	else
		outer_stage
	fi
}

main "$@"
exit
