#!/bin/sh
# Live upgrade between this checkout's build and the build of another commit (issue 20: "an
# upgrade between two different builds"). Exports REV's tree (git archive: the repository is
# not touched), builds its `ringfs` into target/cross-rev (a target directory of its own, kept
# between runs: the first build compiles every dependency), and runs the cross-build upgrade
# test with that binary as the other build: the mount starts on REV's build and is handed back
# and forth between it and this checkout's, clients running, on the classic channel with
# passthrough on and off. Needs root and /dev/fuse (as the tests).
#
#   scripts/upgrade-across-builds.sh main~5
#   scripts/upgrade-across-builds.sh v0.1.0
#
# Both builds must read each other's state version (docs/reliability.md, "Upgrades between
# builds"); a REV whose STATE_VERSION is older than this checkout's can only be upgraded from,
# which `upgrade_between_two_builds` does not do (it also goes back), so the script refuses it.
set -eu
rev="${1:?usage: scripts/upgrade-across-builds.sh REV}"
cd "$(dirname "$0")/.."
root="$(pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git archive --format=tar "$rev" | tar -x -C "$work"
version() { sed -n 's/^pub const STATE_VERSION: u32 = \([0-9]*\);/\1/p' "$1/server/src/upgrade.rs"; }
ours="$(version "$root")"
theirs="$(version "$work")"
if [ "$ours" != "$theirs" ]; then
    echo "$rev writes state version ${theirs:-?}, this checkout $ours: not an upgrade both ways" >&2
    exit 1
fi
CARGO_TARGET_DIR="$root/target/cross-rev" cargo build --release --quiet -p server --bin ringfs \
    --manifest-path "$work/Cargo.toml"
cp "$root/target/cross-rev/release/ringfs" "$work/ringfs-other"
echo "other build: $rev ($(git rev-parse --short "$rev")), state version $theirs"
RINGFS_OTHER_BIN="$work/ringfs-other" cargo test --release -p tests --test upgrade -- \
    upgrade_between_two_builds --test-threads=1 --nocapture
