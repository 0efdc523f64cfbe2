#!/usr/bin/env bash
# Prepares a Debian 12 machine (as root) for building, running and testing ringfs. Idempotent:
# a second run changes nothing and takes about a second.
#
# - Debian packages (apt-get update + install, only when one is missing), QEMU, a static busybox
#   and kmod for the kernel matrix (scripts/kernel-matrix.sh)
# - pjdfstest 0.2.2 (cargo install, only when missing or another version)
# - the test users: nobody/nogroup (Debian base) and pjdtest (uid/gid 4242 when free)
# - the fuse module, /dev/fuse mode 0666 (as udev sets it: users mount through fusermount3), the
#   fuse control file system at /sys/fs/fuse/connections, tracefs
# - FUSE over io_uring switched on (/sys/module/fuse/parameters/enable_uring = 1) when the kernel
#   has the parameter: the tests exercise both transports. This is global to the machine.
#
# Quiet on success; every failure is printed and stops the script.
set -euo pipefail

log() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (installs packages, creates users, loads modules)"

packages=(fuse3 libfuse3-dev pkg-config clang llvm libbpf-dev bpftool fio prometheus attr acl util-linux stress-ng
    curl qemu-system-x86 busybox-static kmod debootstrap lintian
    qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross cpio)
# curl, qemu-system-x86, busybox, kmod: scripts/kernel-matrix.sh; debootstrap, lintian: scripts/package-test.sh;
# qemu-system-arm, the aarch64 cross compiler and libc, cpio: scripts/arm64.sh

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || die "apt-get update failed"
    # Some packages (prometheus) start a service; that is harmless here.
    apt-get install -qq -y --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi

# pjdfstest (the Rust rewrite) for the POSIX conformance test.
if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
pjd="${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest"
if ! { [ -x "$pjd" ] && "$pjd" --version 2>/dev/null | grep -qx "pjdfstest 0.2.2"; }; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (install the Rust toolchain first)"
    log "installing pjdfstest 0.2.2"
    cargo install --quiet pjdfstest --version 0.2.2 --locked || die "cargo install pjdfstest failed"
fi

# The aarch64 Rust target (standard library) for scripts/arm64.sh.
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
    log "adding the aarch64-unknown-linux-gnu Rust target"
    rustup target add aarch64-unknown-linux-gnu >/dev/null || die "rustup target add aarch64-unknown-linux-gnu failed"
fi

# Users for the permission tests and pjdfstest's [dummy_auth] (tests/pjdfstest/pjdfstest.toml).
getent passwd nobody >/dev/null || die "user nobody is missing (Debian's base-passwd provides it)"
getent group nogroup >/dev/null || die "group nogroup is missing (Debian's base-passwd provides it)"
if ! getent group pjdtest >/dev/null; then
    if getent group 4242 >/dev/null; then groupadd pjdtest; else groupadd -g 4242 pjdtest; fi
fi
if ! getent passwd pjdtest >/dev/null; then
    uid_opt=(-u 4242)
    if getent passwd 4242 >/dev/null; then uid_opt=(); fi
    useradd "${uid_opt[@]}" -g pjdtest -M -d / -s /usr/sbin/nologin -c "ringfs/pjdfstest dummy user" pjdtest
fi
[ "$(id -gn pjdtest)" = pjdtest ] || die "user pjdtest exists but its primary group is not pjdtest"

# FUSE.
if [ ! -e /sys/module/fuse ]; then
    modprobe fuse || die "modprobe fuse failed"
fi
[ -c /dev/fuse ] || die "/dev/fuse is missing after loading the fuse module"
# Users mount through fusermount3, which opens /dev/fuse as the user: Debian's udev rule makes it
# 0666; a machine or container without udev leaves it 0600 (tests/tests/unprivileged.rs).
[ "$(stat -c %a /dev/fuse)" = 666 ] || chmod 0666 /dev/fuse || die "cannot chmod 0666 /dev/fuse"
if ! grep -q " /sys/fs/fuse/connections fusectl " /proc/mounts; then
    mount -t fusectl none /sys/fs/fuse/connections || die "cannot mount fusectl on /sys/fs/fuse/connections"
fi
# eBPF accounting attaches to tracepoints, found through tracefs.
if [ ! -d /sys/kernel/tracing/events ] && ! grep -q " /sys/kernel/tracing tracefs " /proc/mounts; then
    mount -t tracefs nodev /sys/kernel/tracing || die "cannot mount tracefs on /sys/kernel/tracing"
fi
uring=/sys/module/fuse/parameters/enable_uring
if [ -e "$uring" ]; then
    if [ "$(cat "$uring")" != "Y" ]; then
        echo 1 > "$uring" || die "cannot write 1 to $uring"
        log "FUSE over io_uring switched on ($uring = 1; global to this machine until reboot)"
    fi
else
    log "note: $uring does not exist (kernel without FUSE over io_uring): only /dev/fuse is tested"
fi
