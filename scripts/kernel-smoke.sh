#!/usr/bin/env bash
# The kernel-matrix smoke suite: mounts ringfs with its defaults on the running kernel and checks
# what a user sees. scripts/kernel-matrix.sh runs it inside each Debian kernel it boots and on the
# host; it can also be run by hand (as root).
#
#   [SMOKE_OPTS=key=value,...] kernel-smoke.sh RINGFS_BINARY [--transport io_uring|dev-fuse] [--passthrough on|off]
#                   [--ebpf attached|absent]
#
# The expectations are optional: without one, whatever the kernel gives is reported but not
# checked. Backing directory and mount point live on a private tmpfs. Prints one `SMOKE: ok NAME`
# or `SMOKE: FAIL NAME: why` per check, `SMOKE-INFO: key=value` facts for the matrix table, and
# closes with `SMOKE: N passed, M failed`. Exits 0 only when nothing failed.
set -u

die() { echo "SMOKE: FAIL setup: $*"; echo "SMOKE: 0 passed, 1 failed"; exit 1; }
[ "$#" -ge 1 ] || die "usage: $0 RINGFS_BINARY [--transport T] [--passthrough on|off] [--ebpf attached|absent]"
ringfs=$1
shift
want_transport="" want_passthrough="" want_ebpf=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --transport) want_transport=$2 ;;
        --passthrough) want_passthrough=$2 ;;
        --ebpf) want_ebpf=$2 ;;
        *) die "unknown argument $1" ;;
    esac
    shift 2
done
[ "$(id -u)" -eq 0 ] || die "run as root (mounts)"
[ -x "$ringfs" ] || die "$ringfs is not an executable"

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "SMOKE: ok $1"; }
fail() { failed=$((failed + 1)); echo "SMOKE: FAIL $1: $2"; }
# check NAME COMMAND...: passes when COMMAND succeeds.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then ok "$name"; else fail "$name" "$(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi
}
info() { echo "SMOKE-INFO: $1=$2"; }
# wait_for SECONDS COMMAND...: polls COMMAND until it succeeds or the deadline passes.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

kernel=$(uname -r)
info kernel "$kernel"
if [ -d /sys/module/fuse ] && [ ! -e /sys/module/fuse/initstate ]; then fusekind=built-in; else fusekind=module; fi
info fuse "$fusekind"

work=$(mktemp -d /tmp/ringfs-smoke.XXXXXX) || die "mktemp"
mount -t tmpfs -o size=256m,mode=0755 ringfs-smoke "$work" || die "cannot mount a tmpfs on $work"
back=$work/back mnt=$work/mnt log=$work/ringfs.log
mkdir "$back" "$mnt"
pid=""
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" 2>/dev/null; fi
    grep -q " $mnt fuse" /proc/mounts && umount -l "$mnt"
    umount -l "$work" 2>/dev/null
    rmdir "$work" 2>/dev/null
}
trap cleanup EXIT

# /metrics on its default address (127.0.0.1:9464) when that port is free, as in the guests;
# otherwise (a busy host) on a free loopback port.
port_free() { ! grep -qi ":$(printf '%04X' "$1") " /proc/net/tcp /proc/net/tcp6 2>/dev/null; }
port=9464 opts=()
if ! port_free "$port"; then
    port=""
    for p in $(shuf -i 20000-60000 -n 20); do
        if port_free "$p"; then port=$p; break; fi
    done
    [ -n "$port" ] || die "no free loopback port"
    opts=(-o "metrics_addr=127.0.0.1:$port")
fi
info metrics_port "$port"
ip link set lo up 2>/dev/null

# Mount with the defaults (foreground; its log is what a user reads).
# SMOKE_OPTS: more -o options, for trying the suite by hand (the matrix passes none).
RUST_LOG=info "$ringfs" mount "$back" "$mnt" "${opts[@]}" ${SMOKE_OPTS:+-o "$SMOKE_OPTS"} >"$log" 2>&1 &
pid=$!
mounted() { grep -q " $mnt fuse.ringfs " /proc/mounts; }
if wait_for 60 mounted; then
    ok mount
else
    fail mount "not mounted after 60 s"
    sed 's/^/SMOKE-LOG: /' "$log"
    echo "SMOKE: $passed passed, $failed failed"
    exit 1
fi

# --- file operations -------------------------------------------------------------------------
check create-write-read bash -c "echo hello >'$mnt/a' && [ \"\$(cat '$mnt/a')\" = hello ] && [ \"\$(cat '$back/a')\" = hello ]"
check large-write bash -c "head -c 4194304 /dev/urandom >'$work/big' && cp '$work/big' '$mnt/big' && cmp '$work/big' '$mnt/big' && cmp '$work/big' '$back/big'"
check append bash -c "echo more >>'$mnt/a' && [ \"\$(wc -l <'$mnt/a')\" = 2 ]"
check truncate bash -c "truncate -s 3 '$mnt/a' && [ \"\$(stat -c %s '$mnt/a')\" = 3 ] && [ \"\$(stat -c %s '$back/a')\" = 3 ]"
check rename bash -c "mv '$mnt/a' '$mnt/b' && [ ! -e '$mnt/a' ] && [ -f '$back/b' ] && [ \"\$(cat '$mnt/b')\" = hel ]"
check mkdir bash -c "mkdir -p '$mnt/d/e' && [ -d '$back/d/e' ]"
check readdir bash -c "touch '$mnt/d/f1' '$mnt/d/f2' && [ \"\$(ls '$mnt/d' | tr '\n' ' ')\" = 'e f1 f2 ' ]"
check symlink bash -c "ln -s b '$mnt/l' && [ \"\$(readlink '$mnt/l')\" = b ] && [ \"\$(cat '$mnt/l')\" = hel ]"
check hardlink bash -c "ln '$mnt/b' '$mnt/h' && [ \"\$(stat -c %h '$mnt/b')\" = 2 ]"
check chmod bash -c "chmod 0640 '$mnt/b' && [ \"\$(stat -c %a '$mnt/b')\" = 640 ] && [ \"\$(stat -c %a '$back/b')\" = 640 ]"
check chown bash -c "chown 65534:65534 '$mnt/b' && [ \"\$(stat -c %u:%g '$back/b')\" = 65534:65534 ]"
check unlink bash -c "rm '$mnt/h' '$mnt/l' && [ ! -e '$back/h' ] && [ ! -L '$back/l' ] && [ \"\$(stat -c %h '$mnt/b')\" = 1 ]"
check rmdir bash -c "rm -r '$mnt/d' && [ ! -e '$back/d' ]"
# trusted.* xattrs exist on tmpfs on every kernel; user.* only since 6.6: the mount must do what
# the backing file system does.
check xattr-trusted bash -c "setfattr -n trusted.k -v v1 '$mnt/b' && [ \"\$(getfattr --only-values -n trusted.k '$mnt/b')\" = v1 ] && setfattr -x trusted.k '$mnt/b' && ! getfattr -n trusted.k '$mnt/b' 2>/dev/null"
touch "$back/native"
if native=$(setfattr -n user.k -v v2 "$back/native" 2>&1); then
    check xattr-user bash -c "setfattr -n user.k -v v2 '$mnt/b' && [ \"\$(getfattr --only-values -n user.k '$mnt/b')\" = v2 ]"
else
    check xattr-user-like-backing bash -c "! setfattr -n user.k -v v2 '$mnt/b' 2>'$work/err' && grep -qF '${native##*: }' '$work/err'"
fi
check statfs stat -f "$mnt"
# A file made behind the mount's back, read through it: with passthrough the kernel reads the
# backing file itself (no FUSE READ reaches the server); without it the server serves READs.
head -c 1048576 /dev/urandom >"$back/behind"
check read-behind cmp "$back/behind" "$mnt/behind"

# --- what the kernel negotiated -------------------------------------------------------------
metrics() { curl -sf --max-time 10 "http://127.0.0.1:$port/metrics"; }
metric() { metrics | awk -v n="$1" '$1 == n { print $2 }'; }
if m=$(metrics); then ok metrics; else fail metrics "no answer on 127.0.0.1:$port/metrics"; fi
# Listening (state 0A) on the metrics port only at 127.0.0.1 (0100007F): loopback by default.
listeners=$(awk -v p=":$(printf '%04X' "$port")" '$4 == "0A" && toupper($2) ~ p"$" { print $2 }' /proc/net/tcp /proc/net/tcp6)
if [ "$listeners" = "0100007F:$(printf '%04X' "$port")" ]; then
    ok metrics-loopback-only
else
    fail metrics-loopback-only "listening sockets: ${listeners:-none}"
fi
m=${m:-}
proto=$(sed -n 's/.*FUSE \([0-9]*\.[0-9]*\) negotiated.*/\1/p' "$log" | head -n 1)
info protocol "${proto:-?}"
transport=$(echo "$m" | sed -n 's/^ringfs_transport_info{transport="\([^"]*\)"} 1$/\1/p')
case "$transport" in uring | io_uring) transport=io_uring ;; dev_fuse) transport=dev-fuse ;; esac
info transport "${transport:-?}"
grep -q "transport: " "$log" && info transport_log "\"$(sed -n 's/.*transport: //p' "$log" | head -n 1)\""
if [ -n "$want_transport" ]; then
    if [ "$transport" = "$want_transport" ]; then ok "transport-$want_transport"; else fail "transport-$want_transport" "got ${transport:-nothing}"; fi
fi
pt=$(echo "$m" | awk '$1 == "ringfs_passthrough_enabled" { print $2 }')
[ "$pt" = 1 ] && passthrough=on || passthrough=off
info passthrough "$passthrough"
# Only operations that were served are listed: a missing READ line means none.
reads=$(echo "$m" | awk '$1 == "ringfs_requests_total{op=\"read\"}" { r = $2 } END { print r + 0 }')
pt_opens=$(echo "$m" | awk '$1 == "ringfs_passthrough_opens_total" { print $2 }')
if [ -n "$want_passthrough" ]; then
    if [ "$passthrough" = "$want_passthrough" ]; then ok "passthrough-$want_passthrough"; else fail "passthrough-$want_passthrough" "got $passthrough"; fi
    if [ "$want_passthrough" = on ]; then
        # (lookup > 0 proves the counters are there: a renamed metric must not pass this.)
        lookups=$(echo "$m" | awk '$1 == "ringfs_requests_total{op=\"lookup\"}" { r = $2 } END { print r + 0 }')
        if [ "$reads" = 0 ] && [ "$lookups" -gt 0 ] && [ "${pt_opens:-0}" -gt 0 ]; then ok passthrough-reads-bypass-server; else fail passthrough-reads-bypass-server "READ requests ${reads:-?}, passthrough opens ${pt_opens:-?}"; fi
    else
        if [ "${reads:-0}" -gt 0 ]; then ok reads-served-by-server; else fail reads-served-by-server "READ requests ${reads:-?}"; fi
    fi
fi
ebpf_metric=$(echo "$m" | awk '$1 == "ringfs_ebpf_enabled" { print $2 }')
if grep -q "eBPF accounting attached" "$log"; then
    ebpf=attached
    info ebpf attached
else
    ebpf=absent
    reason=$(sed -n 's/.*eBPF accounting unavailable, serving without it: //p' "$log" | head -n 1)
    info ebpf "\"absent: ${reason:-no reason logged}\""
    if [ -n "$reason" ]; then ok ebpf-reason-logged; else fail ebpf-reason-logged "neither attached nor a reason in the log"; fi
fi
if { [ "$ebpf" = attached ] && [ "$ebpf_metric" = 1 ]; } || { [ "$ebpf" = absent ] && [ "$ebpf_metric" = 0 ]; }; then
    ok ebpf-metric-agrees
else
    fail ebpf-metric-agrees "log says $ebpf, ringfs_ebpf_enabled ${ebpf_metric:-missing}"
fi
if [ -n "$want_ebpf" ]; then
    if [ "$ebpf" = "$want_ebpf" ]; then ok "ebpf-$want_ebpf"; else fail "ebpf-$want_ebpf" "got $ebpf"; fi
fi
if [ "$ebpf" = attached ]; then
    # The kernel side counted the requests this suite sent (fuse_request_send).
    kernel_reqs=$(echo "$m" | awk '$1 ~ /^ringfs_kernel_fallbacks_total/ { s += $2 } END { print s + 0 }')
    if [ "$kernel_reqs" -gt 0 ]; then ok ebpf-counts; else fail ebpf-counts "ringfs_kernel_fallbacks_total sums to 0"; fi
fi

# --- clean unmount ----------------------------------------------------------------------------
kill -TERM "$pid"
wait "$pid"
rc=$?
pid=""
if [ "$rc" -eq 0 ]; then ok sigterm-exit-0; else fail sigterm-exit-0 "server exited $rc"; fi
if wait_for 30 bash -c "! grep -q ' $mnt fuse' /proc/mounts"; then ok unmounted; else fail unmounted "$mnt still mounted"; fi
check backing-intact bash -c "[ \"\$(cat '$back/b')\" = hel ] && cmp '$work/big' '$back/big'"

if [ "$failed" -gt 0 ]; then sed 's/^/SMOKE-LOG: /' "$log"; fi
echo "SMOKE: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
