# The outer image: `ums init` as PID 1, runc and crun for the nested container,
# CRIU 4.2.1 (built from its pinned source by image/install-deps.sh), and
# optionally the workload's OCI image layout at /var/lib/ums-image.
#
# No registry is needed at run time. Put the workload image into an OCI image
# layout next to this file and name it at build time:
#
#   skopeo copy docker://docker.io/library/redis:7 oci:workload-layout:latest
#   docker build --build-arg WORKLOAD_LAYOUT=workload-layout -t ums-outer .
#
# Without WORKLOAD_LAYOUT the image has an empty /var/lib/ums-image. Mount a
# layout there at run time, or run it with --standby to receive a workload
# from a peer (the peer sends the image's blobs during pre-migration).
#
# Without WORKLOAD_LAYOUT, --build-arg UMS_STANDBY=true makes it the standby
# image (`ums init` then waits for a workload without being told --standby).
#
# A local base image can replace the default ones:
#   docker build --build-arg BASE_IMAGE=my/bookworm --build-arg RUST_IMAGE=my/rust ...
#
# Where no Rust image can be pulled, compile ums on a bookworm host and copy the
# binary in (the build-cargo stage is then skipped, as BuildKit and buildah skip
# stages the target does not use):
#   cargo build --release -p ums && cp target/release/ums prebuilt-ums
#   docker build --build-arg UMS_BUILD=prebuilt --build-arg UMS_PREBUILT=prebuilt-ums ...
# image/build-outer.sh does all of this with podman or buildah, on a base made
# with debootstrap, and image/wrap-workload.sh wraps a workload image (from a
# registry, a docker-archive or an OCI tarball) into the outer image.
#
# Run it privileged (nested runc and CRIU need all capabilities, no seccomp or
# AppArmor, /sys and the cgroups read-write, an empty readonlyPaths), with
# tmpfs on /run and the peer port reachable from the other outer container:
#   podman run --privileged --tmpfs /run -p 7411:7411 ums-outer
#   podman run --privileged --tmpfs /run -p 7411:7411 ums-outer --standby
# See README.md ("The outer image") and docs/design.md.

ARG BASE_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm
# How ums gets in: "cargo" compiles it in the build-cargo stage, "prebuilt"
# copies UMS_PREBUILT (a path in the build context) in the build-prebuilt stage.
ARG UMS_BUILD=cargo

# ---- build-cargo: ums, release
FROM ${RUST_IMAGE} AS build-cargo
WORKDIR /src
# The whole workspace: cargo resolves both members even to build one.
COPY Cargo.toml Cargo.lock ./
COPY shim/ shim/
COPY tests/ tests/
RUN cargo build --release --locked -p ums \
 && install -D -m 0755 target/release/ums /out/ums \
 && strip --strip-debug /out/ums

# ---- build-prebuilt: ums compiled elsewhere (glibc of bookworm or older)
FROM ${BASE_IMAGE} AS build-prebuilt
ARG UMS_PREBUILT=prebuilt/ums
COPY ${UMS_PREBUILT} /out/ums

# ---- build: the one of the two stages above that UMS_BUILD names
FROM build-${UMS_BUILD} AS build

# ---- runtime: the outer image
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive

# Run-time packages and CRIU, then drop CRIU's build dependencies: every
# package installed here is marked automatic, then only the run-time packages
# and the libraries the binaries in /usr/local link against are marked manual
# again, and apt removes the rest.
COPY image/install-deps.sh /usr/local/lib/ums/install-deps.sh
RUN set -eux; \
    savedAptMark="$(apt-mark showmanual)"; \
    apt-get update; \
    bash /usr/local/lib/ums/install-deps.sh; \
    apt-mark auto '.*' > /dev/null; \
    apt-mark manual $savedAptMark runc crun iptables iproute2 ca-certificates > /dev/null; \
    find /usr/local -type f -executable -exec ldd '{}' ';' 2>/dev/null \
      | awk '/=>/ { so = $(NF-1); if (index(so, "/usr/local/") == 1) next; gsub("^/(usr/)?", "", so); printf "*%s\n", so }' \
      | sort -u \
      | xargs -r dpkg-query --search \
      | cut -d: -f1 \
      | sort -u \
      | xargs -r apt-mark manual > /dev/null; \
    apt-get purge -y --auto-remove -o APT::AutoRemove::RecommendsImportant=false \
      -o APT::AutoRemove::SuggestsImportant=false; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*; \
    criu --version; \
    runc --version; \
    command -v iptables-restore ip

# Files laid into the outer root (see rootfs/README.md), ums, then the
# workload last, so that images of different workloads share every other layer.
COPY rootfs/ /
COPY --from=build /out/ums /usr/local/bin/ums
RUN ums --version
# Declared here, not above: a build argument invalidates the cached RUN steps
# after its declaration, and the package layer must be shared.
ARG WORKLOAD_LAYOUT=rootfs/var/lib/ums-image
ARG UMS_STANDBY=
COPY ${WORKLOAD_LAYOUT}/ /var/lib/ums-image/
# Empty (false) unless the build made the standby image.
ENV UMS_STANDBY=${UMS_STANDBY}

# The peer port (ums init --peer-listen, UMS_PEER_LISTEN).
EXPOSE 7411
STOPSIGNAL SIGTERM
ENTRYPOINT ["ums", "init"]
