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
root=$(mktemp -d)
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT

install -D -m 0755 "$bin" "$root/usr/sbin/ringfs"
strip --strip-debug "$root/usr/sbin/ringfs" 2>/dev/null || true
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
install -d "$root/usr/share/ringfs"
cp -r dashboards/grafana dashboards/prometheus "$root/usr/share/ringfs/"
find "$root/usr/share/ringfs" -type f -exec chmod 0644 {} +
install -d -m 0755 "$root/etc/ringfs"

size=$(du -sk "$root" | cut -f1)
install -d "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<CONTROL
Package: ringfs
Version: $version
Architecture: $arch
Maintainer: ringfs maintainers <ringfs@example.invalid>
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

mkdir -p "$out"
deb="$out/ringfs_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
