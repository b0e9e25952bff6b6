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
# A local base image can replace the default ones:
#   docker build --build-arg BASE_IMAGE=my/bookworm --build-arg RUST_IMAGE=my/rust ...
#
# Run it privileged (nested runc and CRIU need all capabilities, no seccomp or
# AppArmor, /sys and the cgroups read-write, an empty readonlyPaths), with
# tmpfs on /run and the peer port reachable from the other outer container:
#   podman run --privileged --tmpfs /run -p 7411:7411 ums-outer
#   podman run --privileged --tmpfs /run -p 7411:7411 ums-outer --standby
# See README.md ("The outer image") and docs/design.md.

ARG BASE_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-bookworm

# ---- build: ums, release
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The whole workspace: cargo resolves both members even to build one.
COPY Cargo.toml Cargo.lock ./
COPY shim/ shim/
COPY tests/ tests/
RUN cargo build --release --locked -p ums \
 && install -D -m 0755 target/release/ums /out/ums

# ---- runtime: the outer image
FROM ${BASE_IMAGE}
ARG WORKLOAD_LAYOUT=rootfs/var/lib/ums-image
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
    apt-get purge -y --auto-remove -o APT::AutoRemove::RecommendsImportant=false; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*; \
    criu --version; \
    runc --version; \
    command -v iptables-restore ip

# Files laid into the outer root (see rootfs/README.md), then the workload.
COPY rootfs/ /
COPY ${WORKLOAD_LAYOUT}/ /var/lib/ums-image/
COPY --from=build /out/ums /usr/local/bin/ums

# The peer port (ums init --peer-listen, UMS_PEER_LISTEN).
EXPOSE 7411
STOPSIGNAL SIGTERM
ENTRYPOINT ["ums", "init"]
