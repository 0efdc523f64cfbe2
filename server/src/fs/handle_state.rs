//! File handles across server restarts: at the end of a session the server writes the node ids
//! and backing file handles of the inodes it knows to a root-only state file; the next server
//! of the same mount (same backing directory and mount point) reads it, deletes it, and
//! resolves those node ids again, so handles given out before (`name_to_handle_at`, NFS
//! clients) survive an unmount and mount. A crash leaves no file: handles are then stale.
//!
//! Format (little-endian): `RINGFSH1`, root st_dev, root st_ino, two key words, next node id,
//! entry count (all u64), then per entry: node id (u64), handle length (u32), handle bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::inode::HandleState;

const MAGIC: &[u8; 8] = b"RINGFSH1";

/// Largest entry count and handle size accepted (MAX_HANDLE_SZ plus the header).
const MAX_ENTRIES: u64 = 1 << 24;
const MAX_HANDLE: u32 = 128 + 8;

/// Where the state of the mount of `source` on `mountpoint` lives, below `dir`.
pub fn path_for(dir: &Path, source: &Path, mountpoint: &Path) -> PathBuf {
    // SipHash-2-4 with fixed keys: a stable file name (the same as earlier versions'), not a secret.
    let mut h = siphasher::sip::SipHasher24::new_with_keys(0x7269_6e67_6673, 0x6861_6e64_6c65);
    use std::hash::Hasher;
    h.write(source.as_os_str().as_encoded_bytes());
    h.write_u8(0);
    h.write(mountpoint.as_os_str().as_encoded_bytes());
    dir.join(format!("{:016x}.state", h.finish()))
}

/// Reads and deletes the state file at `path`. `Ok(None)` when there is none. A file that is
/// not a regular file owned by this user and writable by it alone is refused.
pub(crate) fn take(path: &Path) -> io::Result<Option<HandleState>> {
    let mut f = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let _ = fs::remove_file(path);
    let md = f.metadata()?;
    let euid = rustix::process::geteuid().as_raw();
    if !md.is_file() || md.uid() != euid || md.mode() & 0o022 != 0 {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "not a private regular file"));
    }
    let mut buf = Vec::new();
    Read::by_ref(&mut f).take(MAX_ENTRIES * 64).read_to_end(&mut buf)?;
    decode(&buf).map(Some).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed state file"))
}

/// State files of mounts not mounted again for this long are deleted (by the next save).
const KEEP: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Writes `state` to `path` (replacing it atomically), creating its directory (0700), and
/// deletes state files there older than a week.
pub(crate) fn save(path: &Path, state: &HandleState) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no directory"))?;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    prune(dir);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    let written = f.write_all(&encode(state)).and_then(|()| f.sync_all()).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Deletes `*.state` files in `dir` not modified for [`KEEP`].
fn prune(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old =
            e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok()).is_some_and(|a| a > KEEP);
        if old && e.path().extension().is_some_and(|x| x == "state") {
            let _ = fs::remove_file(e.path());
        }
    }
}

pub(crate) fn encode(s: &HandleState) -> Vec<u8> {
    let mut out = Vec::with_capacity(56 + s.nodes.len() * 24);
    out.extend_from_slice(MAGIC);
    for w in [s.root_key.0, s.root_key.1, s.gen_key[0], s.gen_key[1], s.next_id, s.nodes.len() as u64] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    for (id, h) in &s.nodes {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        out.extend_from_slice(h);
    }
    out
}

pub(crate) fn decode(mut b: &[u8]) -> Option<HandleState> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }
    fn u64_(b: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(b, 8)?.try_into().ok()?))
    }
    if take(&mut b, 8)? != MAGIC {
        return None;
    }
    let root_key = (u64_(&mut b)?, u64_(&mut b)?);
    let gen_key = [u64_(&mut b)?, u64_(&mut b)?];
    let next_id = u64_(&mut b)?;
    let count = u64_(&mut b)?;
    if count > MAX_ENTRIES {
        return None;
    }
    let mut nodes = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let id = u64_(&mut b)?;
        let len = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
        if !(8..=MAX_HANDLE).contains(&len) {
            return None;
        }
        nodes.push((id, take(&mut b, len as usize)?.to_vec()));
    }
    b.is_empty().then_some(HandleState { root_key, gen_key, next_id, nodes })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// File names and generations must not change across versions (a state file left by an
    /// older server, file handles an NFS client still holds): the keyed hash is SipHash-2-4, as
    /// std's deprecated `SipHasher` that earlier versions used.
    #[test]
    #[allow(deprecated)]
    fn keyed_hash_is_the_one_earlier_versions_used() {
        use std::hash::Hasher;
        for (k0, k1, v) in [(0x7269_6e67_6673u64, 0x6861_6e64_6c65u64, 2u64), (1, 2, 3), (u64::MAX, 7, 1 << 40)] {
            let mut old = std::hash::SipHasher::new_with_keys(k0, k1);
            let mut new = siphasher::sip::SipHasher24::new_with_keys(k0, k1);
            old.write_u64(v);
            new.write_u64(v);
            old.write(b"/srv/data");
            new.write(b"/srv/data");
            assert_eq!(old.finish(), new.finish());
        }
    }

    fn state() -> HandleState {
        HandleState {
            root_key: (2049, 2),
            gen_key: [1, 2],
            next_id: 9,
            nodes: vec![(5, vec![8, 0, 0, 0, 1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]), (7, vec![0; 12])],
        }
    }

    #[test]
    fn round_trip_and_malformed_files() {
        let s = state();
        let b = encode(&s);
        assert_eq!(decode(&b), Some(s));
        for n in 0..b.len() {
            assert_eq!(decode(&b[..n]), None, "truncated at {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(decode(&long), None);
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), None);
    }

    #[test]
    fn saved_then_taken_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(&dir.path().join("h"), Path::new("/srv/a"), Path::new("/mnt/a"));
        assert_ne!(path, path_for(&dir.path().join("h"), Path::new("/srv/a"), Path::new("/mnt/b")));
        assert!(take(&path).unwrap().is_none());
        save(&path, &state()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777, 0o700);
        assert_eq!(take(&path).unwrap(), Some(state()));
        assert!(take(&path).unwrap().is_none(), "taken once");
        // Writable by others: refused (and removed).
        save(&path, &state()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(take(&path).is_err());
        assert!(!path.exists());
        // A symlink is not followed.
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
        assert!(take(&path).is_err());
    }
}
