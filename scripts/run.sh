#!/usr/bin/env bash
# Sets up a fresh Debian machine (scripts/setup.sh), builds ringfs, and mounts a directory with
# the default configuration in the foreground. Ctrl-C unmounts.
#
#   scripts/run.sh [SOURCE [MOUNTPOINT]] [ringfs options...]
#
# SOURCE defaults to /var/tmp/ringfs-demo/data, MOUNTPOINT to /mnt/ringfs; both are created.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-/var/tmp/ringfs-demo/data}
mnt=${2:-/mnt/ringfs}
shift $(( $# > 2 ? 2 : $# ))
scripts/setup.sh
cargo build --release -p server --bin ringfs
# Also where mount(8) looks, so that `mount -t fuse.ringfs` and fstab lines work.
install -m 0755 target/release/ringfs /usr/local/sbin/ringfs
mkdir -p "$src" "$mnt"
echo "ringfs: mounting $src on $mnt (Ctrl-C to unmount)"
exec target/release/ringfs mount "$src" "$mnt" "$@"
