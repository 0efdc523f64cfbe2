#!/usr/bin/env bash
# The kernel matrix: runs scripts/kernel-smoke.sh (mount with defaults, file operations, transport,
# passthrough, eBPF, metrics, clean unmount) on Debian's stock kernels and on the host's kernel.
#
# For each Debian kernel (6.1 from bookworm, 6.12 as bookworm ships it from its security archive)
# the script downloads the stock linux-image package with `apt-get download`, extracts vmlinuz and
# the modules, builds a tiny busybox initramfs that loads the modules the guest needs (fuse, 9p,
# virtio: whichever that kernel has as modules), mounts the host's root file system read-only over
# virtio-9p, gives it its own /proc, /sys, /dev, tracefs and tmpfs directories, and runs the smoke
# suite in it with the host's freshly built target/release/ringfs. QEMU boots each kernel with a
# hard timeout; the result is read from the serial console. The host's kernel is the last row,
# run directly (no QEMU).
#
# Usage (as root): scripts/kernel-matrix.sh [6.1] [6.12] [host]      (default: all three)
# Environment:
#   RINGFS_KMX_CACHE    downloads and extracted kernels (default /var/cache/ringfs-kernels)
#   RINGFS_KMX_TIMEOUT  seconds per boot (default 180, 600 with RINGFS_KMX_TESTS)
#   RINGFS_KMX_ACCEL    QEMU accelerator, tcg (default) or kvm
#   RINGFS_KMX_TABLE    write the result table (Markdown) to this file too
#   RINGFS_BIN          the ringfs binary (default: cargo build --release, target/release/ringfs)
#   RINGFS_KMX_TESTS    "TARGET [FILTER]": also run that integration-test target of the tests
#                       crate in each guest, on an ext4 scratch disk as /tmp (scripts/test.sh
#                       runs `ops`: about 2 minutes per kernel under TCG)
#   RINGFS_KMX_CMDLINE  guest kernel parameters (default `quiet`; empty shows the whole boot)
# Network: only Debian's archive, through apt, and only for a kernel package not cached yet.
# Prints the table (README.md's "What works on which kernel"), a `KMX:` line per kernel and per
# integration-test run, then `kernel-matrix: N passed, M failed` (runs); exits 0 only when all passed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

log() { echo "kernel-matrix: $*" >&2; }
die() { echo "kernel-matrix: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (mounts, apt-get download)"
for tool in qemu-system-x86_64 apt-get apt-cache dpkg-deb depmod modprobe xz gzip timeout curl setfattr; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (scripts/setup.sh installs it)"
done
# A static busybox (Debian's busybox-static) runs the initramfs before the host's root is mounted.
busybox=${RINGFS_KMX_BUSYBOX:-/bin/busybox}
{ [ -x "$busybox" ] && ! ldd "$busybox" >/dev/null 2>&1; } ||
    die "$busybox is not a static busybox (Debian package busybox-static)"

cache=${RINGFS_KMX_CACHE:-/var/cache/ringfs-kernels}
accel=${RINGFS_KMX_ACCEL:-tcg}
# TCG emulates every feature of -cpu max; KVM passes the host's CPU through. (On this project's
# machines KVM cannot boot these kernels: QEMU fails to set MSR 0x10a, or KVM reports an
# emulation failure; TCG boots each in about 15 s.)
cpu=max
[ "$accel" = tcg ] || cpu=host
kernels=("$@")
[ "${#kernels[@]}" -gt 0 ] || kernels=(6.1 6.12 host)
mkdir -p "$cache/debs"

if [ -n "${RINGFS_BIN:-}" ]; then
    bin=$(realpath "$RINGFS_BIN")
else
    log "building ringfs (release)"
    cargo build --release --quiet -p server --bin ringfs
    bin=$repo/target/release/ringfs
fi
[ -x "$bin" ] || die "$bin is not an executable"
smoke=$repo/scripts/kernel-smoke.sh
# RINGFS_KMX_TESTS="TARGET [ARGS...]": an integration-test target of the tests crate (e.g. `ops`)
# run inside each guest after the smoke suite, with ARGS (a name filter) and --test-threads=2.
tests=""
if [ -n "${RINGFS_KMX_TESTS:-}" ]; then
    read -r -a words <<<"$RINGFS_KMX_TESTS"
    exe=$(cargo test --release -p tests --test "${words[0]}" --no-run 2>&1 |
        sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -n 1)
    [ -n "$exe" ] && [ -x "$repo/$exe" ] || die "cannot build the integration tests ${words[0]}"
    tests=$(IFS=,; echo "$repo/$exe,--test-threads=2,${words[*]:1}")
    tests=${tests%,}
fi
# A boot with the smoke suite takes 30-90 s under TCG; the ops tests add about 3 minutes.
timeout_s=${RINGFS_KMX_TIMEOUT:-$([ -n "$tests" ] && echo 600 || echo 180)}

# What each kernel must show (kernel-smoke.sh arguments). 6.1: FUSE 7.38, no passthrough, no fuse
# tracepoints (eBPF may be absent, but then with a reason). 6.12: passthrough (7.41), no FUSE
# over io_uring (6.14+).
expect_61=(--transport dev-fuse --passthrough off)
expect_612=(--transport dev-fuse --passthrough on --ebpf attached)

# --- kernel packages ---------------------------------------------------------------------------
# apt with a private configuration (bookworm, its security archive and backports) for when the
# host's own sources do not know the package: nothing of the host's apt setup is changed.
private_apt() {
    local d=$cache/apt
    mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/etc/preferences.d"
    cat >"$d/etc/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
EOF
    : >"$d/status"
    apt_opts=(-o "Dir::Etc::SourceList=$d/etc/sources.list" -o "Dir::Etc::SourceParts=$d/etc/none"
        -o "Dir::Etc::Preferences=$d/etc/none" -o "Dir::Etc::PreferencesParts=$d/etc/preferences.d"
        -o "Dir::State::Lists=$d/lists" -o "Dir::State::status=$d/status" -o "Dir::Cache=$d")
    if [ -z "$(find "$d/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -n 1)" ]; then
        log "updating the private apt lists in $d"
        apt-get "${apt_opts[@]}" update -qq >/dev/null || die "apt-get update (private lists) failed"
    fi
}
apt_opts=()
# newest PATTERN: the newest linux-image package whose name matches the extended regex PATTERN.
newest() {
    apt-cache "${apt_opts[@]}" search --names-only "$1" 2>/dev/null | awk '{ print $1 }' | grep -E "$1" | sort -V | tail -n 1
}
# fetch PATTERN: prints the directory holding the extracted package (boot/, lib/modules/).
fetch_kernel() {
    local pattern=$1 pkg deb dir ver
    pkg=$(newest "$pattern")
    if [ -z "$pkg" ]; then
        private_apt
        pkg=$(newest "$pattern")
    fi
    if [ -z "$pkg" ]; then
        # Offline: the newest package cached before.
        deb=$(find "$cache/debs" -name '*.deb' | sed 's|.*/||' | grep -E "^${pattern#^}" | sort -V | tail -n 1 || true)
        [ -n "$deb" ] || die "no Debian package matches $pattern (and none is cached)"
        pkg=${deb%%_*}
    fi
    deb=$(find "$cache/debs" -name "${pkg}_*.deb" | sort -V | tail -n 1)
    if [ -z "$deb" ]; then
        log "downloading $pkg"
        (cd "$cache/debs" && apt-get "${apt_opts[@]}" download -qq "$pkg" 2>&1 | grep -v "unsandboxed" >&2 || true)
        deb=$(find "$cache/debs" -name "${pkg}_*.deb" | sort -V | tail -n 1)
        if [ -z "$deb" ] && [ "${#apt_opts[@]}" -eq 0 ]; then
            # The host's lists may be old (a version the archive no longer has): fresh private ones.
            private_apt
            pkg=$(newest "$pattern")
            log "downloading $pkg (private apt lists)"
            (cd "$cache/debs" && apt-get "${apt_opts[@]}" download -qq "$pkg" 2>&1 | grep -v "unsandboxed" >&2 || true)
            deb=$(find "$cache/debs" -name "${pkg}_*.deb" | sort -V | tail -n 1)
        fi
        [ -n "$deb" ] || die "apt-get download $pkg failed"
    fi
    dir=$cache/$(basename "$deb" .deb)
    if [ ! -e "$dir/.extracted" ]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir"
        ver=$(ls "$dir/lib/modules")
        depmod -b "$dir" "$ver"
        touch "$dir/.extracted"
    fi
    echo "$dir"
}

# --- initramfs ---------------------------------------------------------------------------------
# build_initrd DIR: busybox, /init and the modules the guest needs, as DIR/initrd.gz.
build_initrd() {
    local dir=$1 ver stage m line path name
    ver=$(ls "$dir/lib/modules")
    stage=$(mktemp -d)
    mkdir -p "$stage/bin" "$stage/modules"
    cp "$busybox" "$stage/bin/busybox"
    : >"$stage/modules/order"
    # Module or built in: modprobe says `builtin NAME` or lists the insmod order with dependencies.
    # virtio_blk, ext4 and crc32c: the ext4 scratch disk the integration tests use as /tmp.
    for m in fuse 9pnet_virtio 9p virtio_pci virtio_blk crc32c_generic ext4; do
        while read -r line; do
            case "$line" in
                builtin*) echo "${line#builtin }" >>"$stage/modules/builtin" ;;
                insmod*)
                    path=${line#insmod }
                    path=${path%% *}
                    name=$(basename "$path")
                    name=${name%.xz}
                    name=${name%.zst}
                    grep -qx "$name" "$stage/modules/order" && continue
                    case "$path" in
                        *.xz) xz -dc "$path" >"$stage/modules/$name" ;;
                        *.zst) zstd -qdc "$path" >"$stage/modules/$name" ;;
                        *) cp "$path" "$stage/modules/$name" ;;
                    esac
                    echo "$name" >>"$stage/modules/order"
                    ;;
            esac
        done < <(modprobe -d "$dir" -S "$ver" --show-depends "$m" 2>/dev/null || echo "missing $m")
    done
    cp "$repo/scripts/kernel-matrix-init.sh" "$stage/init"
    chmod 0755 "$stage/init"
    (cd "$stage" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) >"$dir/initrd.gz"
    rm -rf "$stage"
}

# --- one guest ---------------------------------------------------------------------------------
results=()
table=()
# row LABEL CONSOLE_LOG_OR_OUTPUT STATUS [INTEGRATION_TESTS]
row() {
    local label=$1 out=$2 status=$3 integration=${4:-} get
    get() { sed -n "s/^SMOKE-INFO: $1=//p" "$out" | tr -d '\r"' | head -n 1; }
    table+=("| $label | $(get kernel) | $(get fuse) | $(get protocol) | $(get transport) | $(get passthrough) | $(get ebpf) | $status |${integration:+ $integration |}")
}
boot() {
    local label=$1 pattern=$2
    shift 2
    local dir vmlinuz console start summary rc attempt
    dir=$(fetch_kernel "$pattern")
    vmlinuz=$(find "$dir/boot" -name 'vmlinuz-*' | head -n 1)
    build_initrd "$dir"
    console=$cache/console-$label.log
    # The integration tests make their backing directories in /tmp: give them an ext4 disk there
    # (what a Debian machine has), not the tmpfs the smoke suite uses.
    local disk=()
    if [ -n "$tests" ]; then
        truncate -s 0 "$cache/scratch.img"
        truncate -s 2G "$cache/scratch.img"
        mkfs.ext4 -q -F "$cache/scratch.img"
        disk=(-drive "file=$cache/scratch.img,if=virtio,format=raw,cache=unsafe")
    fi
    for attempt in 1 2; do
        log "$label: booting $(basename "$vmlinuz") under QEMU ($accel, timeout ${timeout_s}s)"
        start=$SECONDS
        set +e
        timeout -k 10 "$timeout_s" qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -smp 2 -m 1536 \
            -nodefaults -no-reboot -display none -serial stdio -monitor none \
            -kernel "$vmlinuz" -initrd "$dir/initrd.gz" \
            -append "console=ttyS0 panic=-1 ${RINGFS_KMX_CMDLINE-quiet} kmx_bin=$bin kmx_smoke=$smoke kmx_args=$(
                IFS=,
                echo "$*"
            )${tests:+ kmx_tests=$tests}" \
            -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap "${disk[@]}" \
            </dev/null 2>&1 | sed -u 's/\r$//' | tee "$console" | sed -u "s/^/  [$label] /" >&2
        rc=${PIPESTATUS[0]}
        set -e
        # QEMU 7.2's TCG itself crashes now and then (SIGSEGV/SIGABRT before the guest prints anything):
        # that is the emulator, not the kernel or ringfs, so boot once more. Anything else counts.
        if { [ "$rc" -eq 139 ] || [ "$rc" -eq 134 ]; } && ! grep -q '^SMOKE: ' "$console" && [ "$attempt" -eq 1 ]; then
            log "$label: QEMU died with signal $((rc - 128)) before the smoke suite ran; booting again"
            continue
        fi
        break
    done
    rm -f "$cache/scratch.img"
    summary=$(grep -E '^SMOKE: [0-9]+ passed, [0-9]+ failed' "$console" | tail -n 1 || true)
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        summary="${summary:-no result} (timed out after ${timeout_s}s)"
        results+=("$label: 0 passed, 1 failed")
    elif [ -z "$summary" ]; then
        summary="no result (QEMU exited $rc)"
        results+=("$label: 0 passed, 1 failed")
    else
        results+=("$label: ${summary#SMOKE: }")
    fi
    local t="" short=""
    if [ -n "$tests" ]; then
        t=$(grep -E '^test result: ' "$console" | tail -n 1 || true)
        results+=("$label integration tests: ${t:-no result}")
        log "$label: integration tests: ${t:-no result}"
        short=$(echo "${t:-no result}" | sed -E 's/^test result: [A-Za-z]+\. ([0-9]+ passed); ([0-9]+ failed).*/\1, \2/')
    fi
    log "$label: ${summary#SMOKE: } in $((SECONDS - start)) s"
    row "Debian $label" "$console" "${summary#SMOKE: }" "$short"
}

host() {
    local out=$cache/console-host.log start want=() t
    t=/sys/module/fuse/parameters/enable_uring
    if [ -e "$t" ] && [ "$(cat "$t")" = Y ]; then want+=(--transport io_uring); else want+=(--transport dev-fuse); fi
    log "host: running the smoke suite on $(uname -r) (${want[*]})"
    start=$SECONDS
    set +e
    "$smoke" "$bin" "${want[@]}" --passthrough on --ebpf attached 2>&1 | tee "$out" | sed -u "s/^/  [host] /" >&2
    set -e
    summary=$(grep -E '^SMOKE: [0-9]+ passed, [0-9]+ failed' "$out" | tail -n 1 || true)
    [ -n "$summary" ] || summary="SMOKE: 0 passed, 1 failed"
    results+=("host: ${summary#SMOKE: }")
    log "host: ${summary#SMOKE: } in $((SECONDS - start)) s"
    row "host" "$out" "${summary#SMOKE: }" "$([ -n "$tests" ] && echo "(scripts/test.sh runs them)")"
}

for k in "${kernels[@]}"; do
    case "$k" in
        6.1) boot 6.1 '^linux-image-6\.1\.0-[0-9]+-amd64$' "${expect_61[@]}" ;;
        6.12) boot 6.12 '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' "${expect_612[@]}" ;;
        host) host ;;
        *) die "unknown kernel $k (6.1, 6.12 or host)" ;;
    esac
done

{
    if [ -n "$tests" ]; then
        echo "| kernel | uname -r | FUSE | protocol | transport | passthrough | eBPF accounting | smoke suite | ${RINGFS_KMX_TESTS%% *} tests |"
        echo "|---|---|---|---|---|---|---|---|---|"
    else
        echo "| kernel | uname -r | FUSE | protocol | transport | passthrough | eBPF accounting | smoke suite |"
        echo "|---|---|---|---|---|---|---|---|"
    fi
    printf '%s\n' "${table[@]}"
} >"$cache/table.md"
[ -z "${RINGFS_KMX_TABLE:-}" ] || cp "$cache/table.md" "$RINGFS_KMX_TABLE"
cat "$cache/table.md"
status=0 kernels_passed=0 kernels_failed=0
for r in "${results[@]}"; do
    echo "KMX: $r"
    case "$r" in
        *" 0 failed" | *"test result: ok."*) kernels_passed=$((kernels_passed + 1)) ;;
        *) status=1 kernels_failed=$((kernels_failed + 1)) ;;
    esac
done
echo "kernel-matrix: $kernels_passed passed, $kernels_failed failed"
exit "$status"
