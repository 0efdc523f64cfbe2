#!/bin/busybox sh
# /init of the kernel matrix's initramfs (scripts/kernel-matrix.sh copies it there). Loads the
# modules the guest needs, mounts the host's root read-only over virtio-9p with the guest's own
# /proc, /sys, /dev, tracefs and tmpfs directories on top, runs the smoke suite in it and powers
# off. The kernel command line carries kmx_bin= (ringfs), kmx_smoke= (kernel-smoke.sh) and
# kmx_args= (its arguments, comma-separated), and optionally kmx_tests= (an integration-test
# binary and its arguments, comma-separated), run after the suite against the same ringfs.
/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "KMX: $*"; }
finish() {
    say "$1"
    sync
    poweroff -f
    sleep 5
}
mkdir -p /proc /sys /dev /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say "init on $(uname -r)"
for w in $(cat /proc/cmdline); do
    case "$w" in
        kmx_bin=*) bin=${w#kmx_bin=} ;;
        kmx_smoke=*) smoke=${w#kmx_smoke=} ;;
        kmx_args=*) args=$(echo "${w#kmx_args=}" | tr , ' ') ;;
        kmx_tests=*) tests=$(echo "${w#kmx_tests=}" | tr , ' ') ;;
    esac
done
[ -f /modules/builtin ] && say "built in: $(tr '\n' ' ' </modules/builtin)"
while read -r m; do
    insmod "/modules/$m" || say "insmod $m failed"
done </modules/order
say "modules loaded: $(tr '\n' ' ' </modules/order)"
# The virtio-9p device may show up a moment after its driver loads (up to 30 s: a slow or
# emulated guest).
i=0
until mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /root 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || finish "cannot mount the host's root (9p hostroot)"
    sleep 0.1
done
r=/root
mount -t proc proc $r/proc
mount -t sysfs sysfs $r/sys
mount -t devtmpfs devtmpfs $r/dev
mkdir -p $r/dev/pts $r/dev/shm 2>/dev/null
mount -t devpts devpts $r/dev/pts 2>/dev/null
mount -t tmpfs tmpfs $r/dev/shm
# The checkout (and the binary) may live under a directory covered below (a clone in /tmp):
# held aside now by a bind mount and put back at the same path once the cover is in place.
keep=""
for p in "${smoke%/scripts/*}" "${bin%/*}"; do
    case "$p" in
        /tmp/* | /run/* | /var/tmp/* | /var/lib/ringfs/*) ;;
        *) continue ;;
    esac
    n=$(echo "$keep" | wc -w)
    mkdir -p "/keep/$n" && mount -o bind "$r$p" "/keep/$n" && keep="$keep $p"
done
# A scratch disk (the integration tests' /tmp) when the matrix gave one; tmpfs otherwise.
if [ -b /dev/vda ] && mount -t ext4 /dev/vda $r/tmp; then
    chmod 1777 $r/tmp
    say "/tmp is the ext4 scratch disk"
fi
for d in /tmp /run /var/tmp /var/lib/ringfs; do
    [ "$d" = /tmp ] && grep -q " $r/tmp ext4 " /proc/mounts && continue
    [ -d "$r$d" ] && mount -t tmpfs -o mode=1777 tmpfs "$r$d"
done
n=0
for p in $keep; do
    mkdir -p "$r$p" && mount -o bind "/keep/$n" "$r$p" || say "cannot put $p back"
    n=$((n + 1))
done
mount -t tracefs tracefs $r/sys/kernel/tracing 2>/dev/null || say "no tracefs"
mount -t bpf bpf $r/sys/fs/bpf 2>/dev/null
mount -t fusectl fusectl $r/sys/fs/fuse/connections 2>/dev/null || say "no fusectl"
ip link set lo up
say "host root mounted; running $smoke $bin $args"
env="/usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root"
chroot $r $env /bin/bash "$smoke" "$bin" $args
rc=$?
say "smoke suite exited $rc"
if [ -n "${tests:-}" ]; then
    say "integration tests: $tests"
    # Not under CI=true: what this kernel lacks (io_uring, a tracepoint) is a reported skip here.
    # Without eBPF accounting (the smoke suite checks it): every mount's start and end switches
    # the fuse tracepoints on and off, and under QEMU's TCG that code patching raced with another
    # mount's server ending a request once (6.12: "Oops: int3" in fuse_request_end, the int3 of
    # a half-patched tracepoint site): a guest kernel panic, not something these tests check.
    chroot $r $env RINGFS_BIN="$bin" RINGFS_NO_BUILD=1 RINGFS_EXTRA_OPTS=ebpf.enable=false $tests
    say "integration tests exited $?"
fi
finish "done"
