#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs every check and test: formatting, clippy,
# unit tests, integration tests on real FUSE mounts (both transports), pjdfstest against native.
# Needs root (mounts). Under CI=true a missing capability (FUSE, io_uring, BPF) fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --release -- --test-threads=2
