# ums: the two commands of the README's quick start, and a few more.
#
#   make demo    install the dependencies, build, and live-migrate a workload
#                between two outer containers on this machine (with timings)
#   make test    install the dependencies (with the test extras), build, and run
#                every test: unit tests and end-to-end tests (root, namespaces)
#   make install-shim  build containerd-shim-ums-v1 (runtime io.containerd.ums.v1)
#                in release and install it into $(PREFIX)/bin (docs/containerd.md)
#   make bench   the benchmarks (extra arguments: make bench ARGS="...")
#   make bench-compare  ums (stop-copy, pre-copy, post-copy, auto) beside
#                stop-then-copy, CRIU's page server and podman: 0..1024 MiB,
#                1/4/8 processes and 512 MiB of compressible memory, 1 Gbit/s
#                and unlimited, 5 runs each; writes docs/bench/compare.md and
#                compare.png (about 40 min, not yet timed; needs make
#                image-deps for podman)
#   make chaos   a bounded soak (not part of make test): 200 migrations A<->B
#                with seeded random faults (cut, corrupt byte, partitions,
#                killed destination, failing restore, full disk), the
#                invariants checked after each, and a summary table
#                (CHAOS_ARGS="--count N --seed S --time-limit SECS --mib N")
#   make test-image  the outer image with real engines (a slower suite, about
#                5 min, that .ci/run runs after make test): builds the outer image
#                from the Dockerfile with podman on a debootstrap'ed bookworm,
#                live-migrates a workload podman -> containerd -> podman and
#                Docker -> podman -> Docker, validates deploy/kubernetes/, and
#                checks deploy/prometheus/ and deploy/grafana/ with promtool
#                (docs/outer-image.md, docs/metrics.md)
#
# Everything runs as root on a Debian 12 machine; image/install-deps.sh is
# idempotent, so running a target again only checks what is installed.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
# The e2e tests are root- and namespace-heavy; two at a time is safe here.
TEST_THREADS ?= 2
# Arguments for the demo (--mib N, --rate 1gbit|none, --verbose) and the benchmarks.
ARGS ?=
# Where cargo puts its output (honours CARGO_TARGET_DIR like cargo does).
TARGET_DIR ?= $(abspath $(or $(CARGO_TARGET_DIR),target))

.PHONY: all deps test-deps build install-shim demo test chaos bench bench-compare clean test-image image-deps

all: build

deps:
	bash image/install-deps.sh

test-deps:
	bash image/install-deps.sh --test

build:
	$(CARGO) build -p ums -p containerd-shim-ums

# The containerd shim (runtime io.containerd.ums.v1) on containerd's PATH
# (docs/containerd.md); PREFIX=/usr/local by default.
PREFIX ?= /usr/local
install-shim:
	$(CARGO) build --release -p containerd-shim-ums
	install -D -m 0755 $(TARGET_DIR)/release/containerd-shim-ums-v1 $(DESTDIR)$(PREFIX)/bin/containerd-shim-ums-v1

# ums in release (it moves the bytes); the demo driver in the dev profile,
# because the release profile aborts on panic, and the driver must unwind to
# remove the namespaces and outer containers it made.
demo: test-deps
	$(CARGO) build --release -p ums
	$(CARGO) build -p ums-bench --bin ums-demo
	UMS_BIN=$(TARGET_DIR)/release/ums $(TARGET_DIR)/debug/ums-demo $(ARGS)

# The end-to-end tests use target/debug/ums (or $$UMS_BIN). The benchmarks
# (crate ums-bench) are not built here.
test: test-deps
	$(CARGO) build -p ums -p containerd-shim-ums
	$(CARGO) test -p ums -p ums-e2e -- --test-threads $(TEST_THREADS)

CHAOS_ARGS ?= --count 200 --seed 2027 --time-limit 3600
chaos: test-deps
	$(CARGO) build -p ums
	$(CARGO) build -p ums-e2e --bin ums-chaos
	$(TARGET_DIR)/debug/ums-chaos $(CHAOS_ARGS)

# podman, buildah, skopeo, containerd, debootstrap (Debian) and the manifests'
# schema validator (PyPI, in a venv under the target dir).
image-deps:
	bash image/install-image-deps.sh

# ums in release, as the image ships it; the tests' own containerd, podman
# storage and temp dirs are removed at the end (docs/outer-image.md).
test-image: test-deps image-deps
	$(CARGO) build --release -p ums
	UMS_BIN=$(TARGET_DIR)/release/ums $(CARGO) test -p ums-e2e --features image-tests --test outer_image --test deploy_files -- --test-threads 1

bench: test-deps
	$(CARGO) build --release -p ums
	UMS_BIN=$(TARGET_DIR)/release/ums $(CARGO) run --release -p ums-bench --bin ums-bench -- $(ARGS)

COMPARE_ARGS ?= --runs 5 --sizes 0,64,128,256,512,1024 --procs 1,4,8 --rates 1gbit,none
bench-compare: test-deps image-deps
	$(CARGO) build --release -p ums
	UMS_BIN=$(TARGET_DIR)/release/ums $(CARGO) run --release -p ums-bench --bin ums-bench -- \
		--only compare $(COMPARE_ARGS) --out docs/bench $(ARGS)

clean:
	$(CARGO) clean
