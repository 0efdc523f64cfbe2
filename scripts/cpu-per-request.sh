#!/bin/sh
# Server CPU per request on a fresh mount: (utime + stime of the server process, from
# /proc/<pid>/stat, and the sum of its threads' run time from /proc/<pid>/task/*/schedstat)
# divided by the requests the server counted (/metrics), for one storm:
#   lookup  N cold stats of distinct files (one LOOKUP each; backing cache warm)
#   create  N open(O_CREAT)+close of new files (LOOKUP, CREATE, GETATTR of the parent, RELEASE)
#   storm8  8 processes, each in its own directory: create, stat, unlink N/8 files
# Optionally records a perf profile of the server during the storm (PERF=1), or counts its
# system calls by type with perf's tracepoints (SYSCALLS=1: exact counts, stable under load,
# unlike CPU time; printed per request).
#
# usage: scripts/cpu-per-request.sh BIN WORKLOAD [N] [-o opts]
#   env: PERF=1 (perf record -g into $OUT/perf-WORKLOAD.data), OUT=dir (default /tmp),
#        SYSCALLS=1 (perf stat of syscalls:sys_enter_* on the server, into $OUT/syscalls-WORKLOAD.txt),
#        TMPFS=1: the backing directory is a fresh tmpfs (takes the backing file system's own
#        cost, e.g. ext4's inode allocator on a churned disk, out of the server's numbers)
set -eu
BIN=$(realpath "$1"); WL=$2; N=${3:-20000}; OPTS=${4:-}
OUT=${OUT:-/tmp}
PORT=$((20000 + $$ % 20000))
DIR=$(mktemp -d /tmp/cpureq.XXXXXX)
SRC=$DIR/src MNT=$DIR/mnt
mkdir -p "$SRC" "$MNT"
[ "${TMPFS:-0}" = 1 ] && mount -t tmpfs -o size=1g tmpfs "$SRC"
cleanup() {
    umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
    [ -n "${SPID:-}" ] && wait "$SPID" 2>/dev/null || true
    [ "${TMPFS:-0}" = 1 ] && umount "$SRC"
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

case $WL in
lookup) python3 - "$SRC" "$N" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d + "/l", exist_ok=True)
for i in range(n):
    os.close(os.open(f"{d}/l/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
EOF
;;
create) mkdir -p "$SRC/c" ;;
storm8) for j in 0 1 2 3 4 5 6 7; do mkdir -p "$SRC/s$j"; done ;;
*) echo "unknown workload $WL" >&2; exit 1 ;;
esac
# Warm the backing side.
find "$SRC" -type f -exec true {} + >/dev/null 2>&1 || true
ls -laR "$SRC" >/dev/null

o="metrics.addr=127.0.0.1:$PORT,log.level=warn"
[ -n "$OPTS" ] && o="$o,$OPTS"
"$BIN" mount "$SRC" "$MNT" -f -o "$o" &
SPID=$!
i=0
while ! grep -q " $MNT fuse" /proc/mounts; do
    i=$((i + 1)); [ $i -gt 200 ] && { echo "mount did not appear" >&2; exit 1; }
    sleep 0.05
done

# Start counting once start-up is over: the metrics endpoint answers only after the eBPF
# accounting is loaded (~80 ms of CPU after the mount appears), which is no request's cost.
i=0
while ! curl -sf -o /dev/null "http://127.0.0.1:$PORT/metrics"; do
    i=$((i + 1)); [ $i -gt 200 ] && { echo "metrics endpoint did not answer" >&2; exit 1; }
    sleep 0.05
done

reqs() { curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^ringfs_requests_total\{/ {s += $2} END {print s + 0}'; }
opreqs() { curl -s "http://127.0.0.1:$PORT/metrics" | awk -v op="$1" 'index($0, "ringfs_requests_total{op=\"" op "\"}") == 1 {print $2}'; }
ticks() { awk '{print $14 + $15}' "/proc/$SPID/stat"; }
uticks() { awk '{print $14}' "/proc/$SPID/stat"; }
runns() { cat /proc/"$SPID"/task/*/schedstat | awk '{s += $1} END {printf "%d\n", s}'; }

qsum() { curl -s "http://127.0.0.1:$PORT/metrics" | awk -v m="$1" 'index($0, m "{") == 1 {s += $2} END {print s + 0}'; }
r0=$(reqs); t0=$(ticks); u0=$(uticks); n0=$(runns)
e0=$(qsum ringfs_queue_submits_total); h0=$(qsum ringfs_queue_busy_poll_hits_total)
[ "${PERF:-0}" = 1 ] && { perf record -q -F 2999 -g -p "$SPID" -o "$OUT/perf-$WL.data" 2>/dev/null & PPID_=$!; sleep 0.3; }
[ "${SYSCALLS:-0}" = 1 ] && { perf stat -x, -e 'syscalls:sys_enter_*' -p "$SPID" -o "$OUT/syscalls-$WL.raw" 2>/dev/null & SCPID=$!; sleep 0.5; }
w0=$(date +%s%N)
case $WL in
lookup) python3 -c '
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n): os.stat(f"{d}/l/f{i}")' "$MNT" "$N" ;;
create) python3 -c '
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n): os.close(os.open(f"{d}/c/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))' "$MNT" "$N" ;;
storm8) for j in 0 1 2 3 4 5 6 7; do python3 -c '
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n): os.close(os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
for i in range(n): os.stat(f"{d}/f{i}")
for i in range(n): os.unlink(f"{d}/f{i}")' "$MNT/s$j" $((N / 8)) & pids="${pids:-} $!"; done
    for p in $pids; do wait "$p"; done ;;
esac
w1=$(date +%s%N)
[ "${PERF:-0}" = 1 ] && { kill -INT "$PPID_"; wait "$PPID_" 2>/dev/null || true; }
if [ "${SYSCALLS:-0}" = 1 ]; then
    # Stopped after the busy-poll window, so the polling's own calls are counted too.
    sleep 0.3; kill -INT "$SCPID"; wait "$SCPID" 2>/dev/null || true
fi
# Let the busy-poll window close before reading the CPU counters.
sleep 0.3
r1=$(reqs); t1=$(ticks); u1=$(uticks); n1=$(runns)
e1=$(qsum ringfs_queue_submits_total); h1=$(qsum ringfs_queue_busy_poll_hits_total)
hz=$(getconf CLK_TCK)
lk=$(opreqs lookup); cr=$(opreqs create)
m=$(curl -s "http://127.0.0.1:$PORT/metrics")
inl=$(echo "$m" | awk '/^ringfs_inline_metadata_calls_total / {print $2}')
slow=$(echo "$m" | awk '/^ringfs_inline_metadata_slow_total / {print $2}')
awk -v wl="$WL" -v n="$N" -v r=$((r1 - r0)) -v t=$((t1 - t0)) -v ns=$((n1 - n0)) -v u=$((u1 - u0)) -v hz="$hz" -v w=$((w1 - w0)) \
    -v lk="${lk:-0}" -v cr="${cr:-0}" -v opts="$OPTS" -v inl="${inl:-0}" -v slow="${slow:-0}" 'BEGIN {
    printf "%s n=%d opts=[%s] requests=%d (LOOKUP %d, CREATE %d) wall=%.3fs  cpu(stat)=%.1fus/req (user %.1f)  cpu(schedstat)=%.1fus/req  wall/req=%.1fus  inline=%d slow=%d\n",
        wl, n, opts, r, lk, cr, w / 1e9, t * 1e6 / hz / r, u * 1e6 / hz / r, ns / 1e3 / r, w / 1e3 / r, inl, slow }'
awk -v r=$((r1 - r0)) -v e=$((e1 - e0)) -v h=$((h1 - h0)) 'BEGIN {
    printf "queue rounds (ring waits) per request %.3f, busy-poll hits per request %.3f\n", e / r, h / r }'
if [ "${SYSCALLS:-0}" = 1 ]; then
    # perf -x, lines: count,unit,event,...; per request, largest first.
    awk -F, -v r=$((r1 - r0)) '$3 ~ /sys_enter_/ && $1 + 0 > 0 { sub("syscalls:sys_enter_", "", $3); t += $1; printf "%.3f %s\n", $1 / r, $3 }
        END { printf "%.3f TOTAL\n", t / r }' "$OUT/syscalls-$WL.raw" | sort -rn > "$OUT/syscalls-$WL.txt"
    echo "system calls per request ($OUT/syscalls-$WL.txt):" $(awk '$1 >= 0.01 {printf "%s=%s ", $2, $1}' "$OUT/syscalls-$WL.txt")
fi
