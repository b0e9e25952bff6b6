# ums: the two commands of the README's quick start, and a few more.
#
#   make demo    install the dependencies, build, and live-migrate a workload
#                between two outer containers on this machine (with timings)
#   make test    install the dependencies (with the test extras), build, and run
#                every test: unit tests and end-to-end tests (root, namespaces)
#   make bench   the benchmarks (extra arguments: make bench ARGS="...")
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

.PHONY: all deps test-deps build demo test bench clean

all: build

deps:
	bash image/install-deps.sh

test-deps:
	bash image/install-deps.sh --test

build:
	$(CARGO) build -p ums

# ums in release (it moves the bytes); the demo driver in the dev profile,
# because the release profile aborts on panic, and the driver must unwind to
# remove the namespaces and outer containers it made.
demo: test-deps
	$(CARGO) build --release -p ums
	$(CARGO) build -p ums-e2e --bin ums-demo
	UMS_BIN=$(TARGET_DIR)/release/ums $(TARGET_DIR)/debug/ums-demo $(ARGS)

# The end-to-end tests use target/debug/ums (or $$UMS_BIN).
test: test-deps
	$(CARGO) build -p ums
	$(CARGO) test --workspace -- --test-threads $(TEST_THREADS)

bench: test-deps
	$(CARGO) build --release -p ums
	UMS_BIN=$(TARGET_DIR)/release/ums $(CARGO) run --release -p ums-e2e --bin ums-bench -- $(ARGS)

clean:
	$(CARGO) clean
