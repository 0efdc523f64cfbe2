#!/bin/sh
# Pause per live upgrade (`ringfs upgrade`) under load: runs the upgrade load tests with
# RINGFS_UPGRADES upgrades each (default 30) and prints, per configuration, p50/p99/max of the
# server's pause (drain start to the new server serving) and of the longest stall any client
# operation saw across one upgrade. A measurement, not a test: numbers depend on the machine's
# load. Needs root and /dev/fuse (as the tests).
#
#   scripts/upgrade-pause.sh            # classic channel, passthrough on and off
#   RINGFS_UPGRADES=100 scripts/upgrade-pause.sh
set -eu
cd "$(dirname "$0")/.."
n="${RINGFS_UPGRADES:-30}"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
RINGFS_UPGRADES="$n" cargo test --release -p tests --test upgrade -- upgrade_dev_fuse --test-threads=1 --nocapture >"$out" 2>&1 || {
    grep -E "panicked|failures" "$out" >&2 || true
    echo "the upgrade tests failed; output in full:" >&2
    cat "$out" >&2
    exit 1
}
pct() { # pct FILE P -> the P-th percentile (nearest rank) of the numbers in FILE
    sort -n "$1" | awk -v p="$2" '{ v[NR] = $1 } END { i = int((p / 100) * NR + 0.999); if (i < 1) i = 1; print v[i] }'
}
for cfg in "transport=dev-fuse passthrough=true" "transport=dev-fuse passthrough=false"; do
    grep "UPGRADE $cfg " "$out" | sed 's/.*pause_us=\([0-9]*\).*/\1/' >"$out.p"
    grep "UPGRADE $cfg " "$out" | sed 's/.*max_stall_us=\([0-9]*\).*/\1/' >"$out.s"
    grep "UPGRADE $cfg " "$out" | sed 's/.*baseline_us=\([0-9]*\).*/\1/' >"$out.b"
    count=$(wc -l <"$out.p")
    printf '%s (%s upgrades)\n' "$cfg" "$count"
    printf '  server pause     p50 %6.1f ms  p99 %6.1f ms  max %6.1f ms\n' \
        "$(echo "$(pct "$out.p" 50) / 1000" | bc -l)" "$(echo "$(pct "$out.p" 99) / 1000" | bc -l)" "$(echo "$(pct "$out.p" 100) / 1000" | bc -l)"
    printf '  longest stall    p50 %6.1f ms  p99 %6.1f ms  max %6.1f ms\n' \
        "$(echo "$(pct "$out.s" 50) / 1000" | bc -l)" "$(echo "$(pct "$out.s" 99) / 1000" | bc -l)" "$(echo "$(pct "$out.s" 100) / 1000" | bc -l)"
    printf '  without upgrade  p50 %6.1f ms  p99 %6.1f ms  max %6.1f ms  (longest op in a stretch of equal length)\n' \
        "$(echo "$(pct "$out.b" 50) / 1000" | bc -l)" "$(echo "$(pct "$out.b" 99) / 1000" | bc -l)" "$(echo "$(pct "$out.b" 100) / 1000" | bc -l)"
    rm -f "$out.p" "$out.s" "$out.b"
done
