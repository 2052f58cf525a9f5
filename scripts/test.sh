#!/usr/bin/env bash
# The project's single test command (also what CI runs via .ci/run):
#
#   bash scripts/test.sh
#
# 1. installs missing external test tools (scripts/install-test-deps.sh),
# 2. builds the whole workspace (the e2e tests run target/debug/evsd),
# 3. checks formatting and clippy (warnings are errors),
# 4. runs every unit, property and end-to-end test, then the end-to-end
#    tests a second time with evsd's thread-pool I/O engine.
#
# Needs root for the e2e tests that use loop devices and mount (fuse_mount).
# Environment: CARGO_TARGET_DIR is honoured; TEST_THREADS (default 2) sets
# the number of tests run at once inside each test binary.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "installing test dependencies"
bash scripts/install-test-deps.sh

# The e2e harness must test the binaries built here, with the suite's own settings: drop
# overrides that would point it elsewhere (EVSD_BIN, EVSCTL_BIN), at a peer server
# (EVSD_E2E_PEER) or another S3 test server (EVSD_S3S_FS), shorten the load test
# (EVSD_LOAD_SECS) or quiet the daemons' logs that tests read (RUST_LOG).
unset EVSD_BIN EVSCTL_BIN EVSD_E2E_PEER EVSD_S3S_FS EVSD_LOAD_SECS RUST_LOG

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      step "installing rust component $comp"
      rustup component add "$comp"
    else
      echo "test.sh: cargo ${comp/rustfmt/fmt} is not available and rustup is missing" >&2
      exit 1
    fi
  fi
done

step "cargo build --workspace"
cargo build --workspace

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace"
log="$(mktemp -t evsd-test.XXXXXX)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee "$log"

# The e2e suite once more with the thread-pool I/O engine (the first pass used
# evsd's default, io_uring where the kernel allows it). tests/tests/qemu.rs
# also pins each engine explicitly in both passes.
step "cargo test -p evsd-e2e with --io-engine threads"
EVSD_E2E_IO_ENGINE=threads cargo test -p evsd-e2e --no-fail-fast -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee -a "$log"

step "all checks passed"
# One closing line for the whole run, summed over every test binary of both passes.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
