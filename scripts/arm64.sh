#!/usr/bin/env bash
# ringfs on arm64: cross-builds ringfs and ringfs-bpf's unit tests for aarch64 (so the eBPF
# object is compiled with __TARGET_ARCH_arm64 and the arm64 system call table), boots Debian's
# stock arm64 kernel (bookworm's linux-image-arm64) under QEMU (TCG) with an initramfs holding
# only those two static binaries, the kernel's fuse.ko and a tiny init (scripts/arm64-init.rs),
# and there
# - runs the tests that load the eBPF programs: demand_tracing_counts_calls_by_class (system
#   calls counted in their classes: the syscall numbers and pt_regs access are arm64's) and
#   split_btf_merges_after_the_base;
# - mounts a tmpfs directory with `ringfs mount`, reads a file through the mount, writes one
#   through it, and checks that SIGTERM unmounts and the server exits 0.
#
# Needs (as root): rustup's aarch64-unknown-linux-gnu target, Debian's gcc-aarch64-linux-gnu,
# libc6-dev-arm64-cross, qemu-system-arm, cpio, clang and libbpf-dev. The kernel package is
# fetched with apt-get under a private, arm64-only configuration (the host's apt state and
# architectures are not touched) and cached in RINGFS_ARM64_CACHE (default
# /var/cache/ringfs-arm64). RINGFS_ARM64_TIMEOUT: seconds for the boot and run (default 900).
# Prints the guest's output and `arm64: passed` or `arm64: FAILED`; exits non-zero
# on failure. Not part of scripts/test.sh: it takes several minutes under TCG.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
die() { echo "arm64: error: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (apt-get, device nodes in the initramfs)"
for tool in qemu-system-aarch64 aarch64-linux-gnu-gcc cpio rustc cargo apt-get dpkg-deb timeout; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool is missing (apt-get install qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross cpio)"
done
rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu ||
    die "no aarch64 Rust target (rustup target add aarch64-unknown-linux-gnu)"

cache=${RINGFS_ARM64_CACHE:-/var/cache/ringfs-arm64}
mkdir -p "$cache/lists/partial" "$cache/apt/archives/partial" "$cache/debs"
touch "$cache/status"
apt_arm64=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o APT::Sandbox::User=root -o "Dir::State::Lists=$cache/lists"
    -o "Dir::Cache=$cache/apt" -o "Dir::State::status=$cache/status")
image=$(ls "$cache"/kernel/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)
if [ -z "$image" ]; then
    echo "arm64: fetching Debian's arm64 kernel" >&2
    apt-get "${apt_arm64[@]}" update -qq || die "apt-get update (arm64 lists) failed"
    pkg=$(apt-cache "${apt_arm64[@]}" depends linux-image-arm64 | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-arm64\)$/\1/p' | head -n 1)
    [ -n "$pkg" ] || die "cannot resolve linux-image-arm64"
    (cd "$cache/debs" && apt-get "${apt_arm64[@]}" download "$pkg:arm64") || die "apt-get download $pkg failed"
    rm -rf "$cache/kernel"
    dpkg-deb -x "$cache"/debs/"$pkg"_*_arm64.deb "$cache/kernel"
    image=$(ls "$cache"/kernel/boot/vmlinuz-* | head -n 1)
fi
echo "arm64: kernel $(basename "$image")" >&2

# The test binary, static (the initramfs has no libc), and the init.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
tests=$(cargo test --release --target aarch64-unknown-linux-gnu -p ringfs-bpf --lib --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -n "$tests" ] && [ -x "$tests" ] || die "building ringfs-bpf's tests for aarch64 failed (run the cargo command above)"
cargo build --release --target aarch64-unknown-linux-gnu -p server --bin ringfs ||
    die "building ringfs for aarch64 failed"
server=target/aarch64-unknown-linux-gnu/release/ringfs
fuse_ko=$(find "$cache/kernel/lib/modules" -name fuse.ko | head -n 1)
[ -n "$fuse_ko" ] || die "no fuse.ko in the kernel package"

work=$(mktemp -d /var/tmp/ringfs-arm64.XXXXXX)
trap 'rm -rf "$work"' EXIT
rustc --edition 2021 -O --target aarch64-unknown-linux-gnu -C linker=aarch64-linux-gnu-gcc \
    -C target-feature=+crt-static scripts/arm64-init.rs -o "$work/init"
mkdir -p "$work/root/dev" "$work/root/proc" "$work/root/sys" "$work/root/tmp"
mknod -m 600 "$work/root/dev/console" c 5 1
cp "$work/init" "$work/root/init"
cp "$tests" "$work/root/ringfs-bpf-tests"
cp "$server" "$work/root/ringfs"
cp "$fuse_ko" "$work/root/fuse.ko"
(cd "$work/root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.gz"

filters=(--test-threads=1 --nocapture demand_tracing_counts_calls_by_class split_btf_merges_after_the_base)
echo "arm64: booting under QEMU (TCG; a few minutes)" >&2
timeout "${RINGFS_ARM64_TIMEOUT:-900}" qemu-system-aarch64 -M virt -cpu max,pauth-impdef=on -smp 2 -m 1024 \
    -nographic -no-reboot -kernel "$image" -initrd "$work/initrd.gz" \
    -append "console=ttyAMA0 panic=-1 quiet -- ${filters[*]}" </dev/null | tee "$work/console.log" | tr -d '\r' || true
if grep -q "^ARM64-RC=0" <(tr -d '\r' < "$work/console.log"); then
    echo "arm64: passed"
else
    echo "arm64: FAILED (no ARM64-RC=0 on the console)"
    exit 1
fi
