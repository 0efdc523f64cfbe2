#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs every check and test: formatting, clippy,
# unit tests, integration tests on real FUSE mounts (both transports), pjdfstest against native,
# the kernel matrix (Debian 6.1 and 6.12 under QEMU, and this kernel), the eBPF programs on Debian's
# arm64 kernel (QEMU), the Debian package installed into a fresh Debian chroot.
# Needs root (mounts). Under CI=true a missing capability (FUSE, io_uring, BPF) fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# mount(8) finds mount helpers' programs on a fixed PATH: install ringfs there so that
# `mount -t fuse.ringfs` and fstab lines work (the lifecycle tests mount that way too).
cargo build --release -p server --bin ringfs
install -m 0755 target/release/ringfs /usr/local/sbin/ringfs
cargo test --workspace --release -- --test-threads=2
# The integration suites again on the classic channel (the run above uses io_uring where the
# kernel offers it; pjdfstest and the transport tests already cover both).
RINGFS_EXTRA_OPTS=transport=dev-fuse cargo test --release -p tests --test ops --test security --test lifecycle -- --test-threads=2
# And with metadata calls through the rings' io-wq workers (creations as io_uring personalities)
# instead of inline on the queue threads.
RINGFS_EXTRA_OPTS=inline_metadata=false cargo test --release -p tests --test ops --test security -- --test-threads=2
# The kernel matrix: the smoke suite and the ops integration tests on Debian's stock 6.1 and 6.12
# kernels (under QEMU, about 3 minutes each), the smoke suite on this kernel.
RINGFS_KMX_TESTS=ops scripts/kernel-matrix.sh
# The eBPF programs built for aarch64 and run on Debian's stock arm64 kernel under QEMU (about a
# minute once built): system calls counted in their classes with arm64's numbers and registers.
scripts/arm64.sh
# The Debian package: built, installed with apt into a fresh Debian chroot (debootstrap), and
# used there through mount -t fuse.ringfs.
scripts/package-test.sh
