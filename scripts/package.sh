#!/usr/bin/env bash
# Builds the Debian package of ringfs: target/debian/ringfs_VERSION_ARCH.deb.
#
#   /usr/sbin/ringfs                                 the server (mount(8) and mount.fuse3 find it)
#   /usr/share/man/man8/ringfs.8.gz                  generated from the command line (ringfs man)
#   /usr/share/bash-completion/completions/ringfs    and zsh, fish: generated (ringfs completions)
#   /lib/systemd/system/ringfs@.service              one mount per /etc/ringfs/NAME.toml
#   /usr/share/doc/ringfs/examples/ringfs.example.toml   every key with its default
#   /usr/share/ringfs/{grafana,prometheus}/          the dashboard, scrape config, alert and recording rules
#   /etc/ringfs/                                     where instance configs go (none installed)
#   /usr/share/doc/ringfs/{copyright,changelog.gz}   machine-readable copyright (with the licenses of
#                                                    the crates linked in), a Debian changelog
#
# The binary is stripped as Debian policy asks; its debug information is kept next to the package
# (OUTPUT_DIR/ringfs_VERSION_ARCH.debug, for addr2line/gdb). Built with dpkg-deb rather than
# cargo-deb: the generated files (man page, completions, copyright) need a script anyway, and
# this one needs nothing beyond dpkg. `lintian` checks the result (scripts/package-test.sh
# fails on any error; the overrides below say why each one is there).
# SOURCE_DATE_EPOCH (default: the last commit's time) dates the changelog and the file times.
#
# Needs cargo and dpkg-deb (Debian's dpkg). Usage: scripts/package.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/debian}"
command -v dpkg-deb >/dev/null || { echo "package: dpkg-deb is missing (Debian's dpkg)" >&2; exit 1; }

cargo build --release -p server --bin ringfs
bin=target/release/ringfs
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
root=$(mktemp -d)
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT
mkdir -p "$out"
debug="$out/ringfs_${version}_${arch}.debug"

install -D -m 0755 "$bin" "$root/usr/sbin/ringfs"
# What dh_strip does: debug information aside, then symbols and notes out of the shipped binary.
objcopy --only-keep-debug "$bin" "$debug"
chmod 0644 "$debug"
strip --remove-section=.comment --remove-section=.note --strip-unneeded "$root/usr/sbin/ringfs"
install -d "$root/usr/share/man/man8"
"$bin" man | gzip -9n > "$root/usr/share/man/man8/ringfs.8.gz"
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d"
"$bin" completions bash > "$root/usr/share/bash-completion/completions/ringfs"
"$bin" completions zsh > "$root/usr/share/zsh/vendor-completions/_ringfs"
"$bin" completions fish > "$root/usr/share/fish/vendor_completions.d/ringfs.fish"
install -D -m 0644 packaging/systemd/ringfs@.service "$root/lib/systemd/system/ringfs@.service"
install -D -m 0644 config/ringfs.example.toml "$root/usr/share/doc/ringfs/examples/ringfs.example.toml"
install -D -m 0644 README.md "$root/usr/share/doc/ringfs/README.md"

# A native package's changelog (Debian format, lintian reads it): this version, dated by the commit.
maintainer="ringfs maintainers <ringfs@example.invalid>"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
    echo "ringfs ($version) unstable; urgency=medium"
    echo
    echo "  * Built from commit $commit; see README.md for what this version does."
    echo
    echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n > "$root/usr/share/doc/ringfs/changelog.gz"

# copyright (DEP-5): ringfs itself, and the crates statically linked into the binary with their
# licenses (cargo tree over the normal dependencies: what ends up in the binary).
crates=$(cargo tree -p server -e normal,no-proc-macro --prefix none --format '{p}|{l}' |
    sed 's/ (\*)$//' | grep -v '(/' | sort -u | awk -F'|' '{ printf " %s: %s\n", $1, $2 }')
[ -n "$crates" ] || { echo "package: cargo tree listed no dependencies" >&2; exit 1; }
cat > "$root/usr/share/doc/ringfs/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ringfs
Upstream-Contact: $maintainer
Source: https://example.invalid/ringfs

Files: *
Copyright: 2026 the ringfs authors
License: Apache-2.0
Comment: /usr/sbin/ringfs also contains these Rust crates from crates.io, linked in
 statically, each under the license (SPDX expression) its Cargo.toml declares; their
 license texts come with the crates' sources (https://crates.io).
 .
$(echo "$crates" | sed 's/^ *$/ ./')

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not
 use this file except in compliance with the License. You may obtain a copy of
 the License at http://www.apache.org/licenses/LICENSE-2.0
 .
 Unless required by applicable law or agreed to in writing, software
 distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
 WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
 License for the specific language governing permissions and limitations under
 the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0 can be
 found in "/usr/share/common-licenses/Apache-2.0".
COPYRIGHT

# Lintian overrides, each with its reason.
install -d "$root/usr/share/lintian/overrides"
cat > "$root/usr/share/lintian/overrides/ringfs" <<'OVERRIDES'
# Rust code does not call glibc's string and memory functions through their fortified
# (_chk) forms; there is nothing for _FORTIFY_SOURCE to replace.
ringfs: hardening-no-fortify-functions [usr/sbin/ringfs]
OVERRIDES
install -d "$root/usr/share/ringfs"
cp -r dashboards/grafana dashboards/prometheus "$root/usr/share/ringfs/"
find "$root/usr/share/ringfs" -type f -exec chmod 0644 {} +
install -d -m 0755 "$root/etc/ringfs"
# Reproducible file times: nothing newer than the commit.
find "$root" -newermt "@$SOURCE_DATE_EPOCH" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +

size=$(du -sk "$root" | cut -f1)
install -d "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<CONTROL
Package: ringfs
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: fuse3, libc6 (>= 2.36), libgcc-s1
Section: admin
Priority: optional
Description: FUSE passthrough file system with the speed of a kernel one
 ringfs serves a backing directory through FUSE over io_uring (or /dev/fuse),
 passes reads and writes through to the backing files in the kernel, and keeps
 metadata in the kernel's caches, kept coherent with the backing directory.
 Mount with mount -t fuse.ringfs, an fstab line, or the ringfs@NAME systemd
 service (a TOML configuration per mount in /etc/ringfs/NAME.toml).
CONTROL
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || true
fi
POSTINST
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || true
fi
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) \
    > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

deb="$out/ringfs_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
