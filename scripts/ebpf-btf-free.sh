#!/bin/sh
# Proves the eBPF object does not depend on the build machine's kernel: builds bpf-programs (the
# object and its test binary) in a private mount namespace where /sys/kernel/btf is an empty
# tmpfs, then, back on the host, runs its load test (loads that object, attaches every program
# but one, and counts stat calls) and compares the object with the normal build's, byte for
# byte. Needs root (unshare -m, BPF). Usage: scripts/ebpf-btf-free.sh [target-dir]
set -eu
cd "$(dirname "$0")/.."
target=${1:-target/btf-free}
main_obj=$(ls -t target/release/build/ringfs-bpf-*/out/ringfs.bpf.o 2>/dev/null | head -n1 || true)

echo "== building with /sys/kernel/btf hidden (CARGO_TARGET_DIR=$target)"
unshare -m sh -euc '
	mount -t tmpfs none /sys/kernel/btf
	if [ -n "$(ls -A /sys/kernel/btf)" ]; then echo "/sys/kernel/btf still visible" >&2; exit 1; fi
	CARGO_TARGET_DIR="$1" cargo test --release -p ringfs-bpf --no-run 2>&1
' sh "$target" | tee "$target.build.log" | grep -E "^(warning|error)|eBPF programs not built" && {
	echo "FAIL: the build warned (stub object?), see $target.build.log" >&2
	exit 1
}
obj=$(ls -t "$target"/release/build/ringfs-bpf-*/out/ringfs.bpf.o | head -n1)
[ -s "$obj" ] || { echo "FAIL: $obj is empty (stub)" >&2; exit 1; }
echo "== object: $obj ($(stat -c %s "$obj") bytes)"

echo "== loading it on this kernel"
if ! CARGO_TARGET_DIR="$target" cargo test --release -p ringfs-bpf -- --test-threads=1 >"$target.test.log" 2>&1; then
	tail -n 30 "$target.test.log" >&2
	echo "FAIL: the object built without BTF did not load or count, see $target.test.log" >&2
	exit 1
fi
grep -E "^test |test result" "$target.test.log"
if [ -n "$main_obj" ]; then
	if cmp -s "$obj" "$main_obj"; then
		echo "== identical to the normal build's object ($main_obj)"
	else
		echo "FAIL: differs from the normal build's object ($main_obj)" >&2
		exit 1
	fi
fi
echo "OK"
