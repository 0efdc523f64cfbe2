#!/usr/bin/env bash
# Installs the Debian package (scripts/package.sh) on a clean Debian system and uses it there:
# a fresh bookworm chroot made by debootstrap from Debian's packages, `apt-get install
# ./ringfs_*.deb` inside (which brings fuse3), then checks what the package promises: the
# binary where mount(8) finds it, the man page, completions, the systemd unit, the example
# config, and a real `mount -t fuse.ringfs` through mount.fuse3 that serves a file and unmounts.
# Before that, `lintian` (on the host) checks the package: any error fails the test; warnings and
# the pedantic/experimental tags are printed.
#
# Needs root, debootstrap and Debian's package archive. The pristine chroot is cached as a
# tarball in /var/cache/ringfs/ (each run unpacks a fresh copy); RINGFS_CHROOT_CACHE=0 skips
# the cache. Prints `package-test: N passed, M failed` last; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "package-test: run as root (chroot, mounts)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "package-test: debootstrap is missing (scripts/setup.sh installs it)" >&2; exit 1; }
command -v lintian >/dev/null || { echo "package-test: lintian is missing (scripts/setup.sh installs it)" >&2; exit 1; }

deb=$(scripts/package.sh | tail -n 1)
# Lintian first: a package Debian's checker rejects fails here, whatever the chroot says.
echo "package-test: lintian $(basename "$deb")" >&2
if lintian --fail-on error --pedantic --display-experimental --display-info "$deb" >&2; then
    lintian_ok=1
else
    lintian_ok=0
fi
suite=bookworm
mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
mirror=${mirror:-http://deb.debian.org/debian}
cache=/var/cache/ringfs/chroot-$suite-minbase.tar
work=$(mktemp -d /var/tmp/ringfs-package-test.XXXXXX)
root="$work/root"
mkdir -p "$root"

cleanup() {
    # Whatever is still mounted below the chroot (the FUSE mount too), innermost first.
    if [ -d "$root" ]; then
        awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r m; do umount -l "$m" 2>/dev/null || true; done
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if [ "${RINGFS_CHROOT_CACHE:-1}" = 1 ] && [ -s "$cache" ]; then
    tar -xf "$cache" -C "$root"
else
    echo "package-test: debootstrap $suite (minbase) from $mirror" >&2
    debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        { tail -n 20 "$work/debootstrap.log" >&2; echo "package-test: debootstrap failed" >&2; exit 1; }
    if [ "${RINGFS_CHROOT_CACHE:-1}" = 1 ]; then
        mkdir -p "$(dirname "$cache")"
        tar -cf "$cache.tmp" -C "$root" . && mv "$cache.tmp" "$cache"
    fi
fi

mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --make-rslave "$root/sys"
mount --rbind /dev "$root/dev"
mount --make-rslave "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
cp "$deb" "$root/tmp/"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

echo "package-test: installing $(basename "$deb") with apt-get" >&2
in_root apt-get update -qq >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; exit 1; }
DEBIAN_FRONTEND=noninteractive in_root apt-get install -qq -y --no-install-recommends "/tmp/$(basename "$deb")" \
    >>"$work/apt.log" 2>&1 || { tail -n 30 "$work/apt.log" >&2; echo "package-test: install failed" >&2; exit 1; }

passed=0
failed=0
check() {
    local what=$1
    shift
    if "$@" >"$work/check.log" 2>&1; then
        passed=$((passed + 1))
        echo "ok: $what"
    else
        failed=$((failed + 1))
        echo "FAILED: $what"
        sed 's/^/    /' "$work/check.log"
    fi
}

check "lintian: no errors" test "$lintian_ok" = 1
check "ringfs is on mount(8)'s PATH" in_root sh -c 'command -v ringfs | grep -qx /usr/sbin/ringfs'
check "ringfs --version runs" in_root ringfs --version
check "man page ringfs(8)" in_root sh -c 'zcat /usr/share/man/man8/ringfs.8.gz | grep -q "^.TH ringfs 8"'
check "bash completion" in_root test -s /usr/share/bash-completion/completions/ringfs
check "zsh completion" in_root test -s /usr/share/zsh/vendor-completions/_ringfs
check "fish completion" in_root test -s /usr/share/fish/vendor_completions.d/ringfs.fish
check "systemd unit ringfs@.service" in_root grep -qx "Type=notify" /lib/systemd/system/ringfs@.service
check "example config validates" in_root ringfs check-config /usr/share/doc/ringfs/examples/ringfs.example.toml
check "dashboards and rules" in_root test -s /usr/share/ringfs/grafana/ringfs.json -a -s /usr/share/ringfs/prometheus/ringfs-alerts.yml
check "mount.fuse3 came with the package's dependencies" in_root test -x /sbin/mount.fuse3

in_root mkdir -p /srv/data /mnt/data
echo "served by the package" > "$root/srv/data/hello"
check "mount -t fuse.ringfs through mount.fuse3" in_root mount -t fuse.ringfs /srv/data /mnt/data -o metrics_addr=
check "the mount serves a file" in_root sh -c 'test "$(cat /mnt/data/hello)" = "served by the package"'
check "a write lands in the backing directory" in_root sh -c 'echo new > /mnt/data/new && test "$(cat /srv/data/new)" = new'
# The server mount.fuse3 started: the ringfs process whose root is the chroot.
server_pids() {
    for p in $(pgrep -x ringfs); do
        [ "$(readlink "/proc/$p/root" 2>/dev/null)" = "$root" ] && echo "$p"
    done
    return 0
}
check "the server runs inside the chroot" test -n "$(server_pids)"
check "umount" in_root umount /mnt/data
server_gone() {
    # Up to 30 s: the server exits once the kernel has let go of the connection.
    for _ in $(seq 300); do
        [ -z "$(server_pids)" ] && return 0
        sleep 0.1
    done
    return 1
}
check "the server exits after umount" server_gone

echo "package-test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
