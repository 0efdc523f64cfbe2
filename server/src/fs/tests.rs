//! Unit tests: a `PassthroughFs` over a temporary directory, driven without FUSE.

use super::*;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::pin::pin;
use std::task::{Context as TaskCx, Poll, Waker};

use ringfs_protocol::abi::{FuseDirent, FuseDirentplus, FuseEntryOut};
use ringfs_protocol::reply::{dirent_size, direntplus_size};
use ringfs_protocol::Timespec;

/// Drives a future that never actually waits.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = TaskCx::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

const ROOT: Context = Context::new(0, 0, 0);

const NOBODY: Context = Context::new(65534, 65534, 0);

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn setup_with(f: impl FnOnce(&mut FsConfig)) -> (tempfile::TempDir, PassthroughFs) {
    let dir = tempfile::Builder::new().prefix("ringfs-fs-test").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = FsConfig { source: dir.path().to_path_buf(), ..FsConfig::default() };
    f(&mut cfg);
    let fs = PassthroughFs::new(cfg).unwrap();
    (dir, fs)
}

fn setup() -> (tempfile::TempDir, PassthroughFs) {
    setup_with(|_| {})
}

fn lookup(fs: &PassthroughFs, parent: NodeId, name: &str) -> Result<Entry> {
    block_on(fs.lookup(&ROOT, parent, &c(name)))
}

fn node(fs: &PassthroughFs, parent: NodeId, name: &str) -> NodeId {
    let e = lookup(fs, parent, name).unwrap();
    assert_ne!(e.nodeid.0, 0, "{name} not found");
    e.nodeid
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Decodes a readdir reply: (ino, off, type, name).
fn parse_dirents(buf: &[u8]) -> Vec<(u64, u64, u32, Vec<u8>)> {
    let h = size_of::<FuseDirent>();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + h <= buf.len() {
        let r = &buf[pos..];
        let ino = u64::from_ne_bytes(r[0..8].try_into().unwrap());
        let off = u64::from_ne_bytes(r[8..16].try_into().unwrap());
        let namelen = u32::from_ne_bytes(r[16..20].try_into().unwrap()) as usize;
        let kind = u32::from_ne_bytes(r[20..24].try_into().unwrap());
        out.push((ino, off, kind, r[h..h + namelen].to_vec()));
        pos += dirent_size(namelen);
    }
    out
}

/// Decodes a readdirplus reply: (nodeid, off, name).
fn parse_direntplus(buf: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let e = size_of::<FuseEntryOut>();
    let h = size_of::<FuseDirentplus>();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + h <= buf.len() {
        let r = &buf[pos..];
        let nodeid = u64::from_ne_bytes(r[0..8].try_into().unwrap());
        let off = u64::from_ne_bytes(r[e + 8..e + 16].try_into().unwrap());
        let namelen = u32::from_ne_bytes(r[e + 16..e + 20].try_into().unwrap()) as usize;
        out.push((nodeid, off, r[h..h + namelen].to_vec()));
        pos += direntplus_size(namelen);
    }
    out
}

fn readdir_all(fs: &PassthroughFs, dir: NodeId, bufsize: usize) -> Vec<(u64, Vec<u8>)> {
    let o = block_on(fs.opendir(&ROOT, dir, 0)).unwrap();
    let mut all = Vec::new();
    let mut off = 0;
    loop {
        let mut buf = vec![0u8; bufsize];
        let mut db = DirBuffer::new(&mut buf);
        block_on(fs.readdir(&ROOT, dir, o.fh, off, &mut db)).unwrap();
        let n = db.len();
        if n == 0 {
            break;
        }
        for (_, next, _, name) in parse_dirents(&buf[..n]) {
            all.push((off, name));
            off = next;
        }
    }
    block_on(fs.releasedir(&ROOT, dir, o.fh)).unwrap();
    all
}

#[test]
fn new_rejects_bad_source() {
    assert!(PassthroughFs::new(FsConfig::default()).is_err());
    let err =
        PassthroughFs::new(FsConfig { source: "/nonexistent/ringfs".into(), ..FsConfig::default() }).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/ringfs"), "{err}");
    let f = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    assert!(PassthroughFs::new(FsConfig { source: f.path().into(), ..FsConfig::default() }).is_err());
}

#[test]
fn lookup_forget_counts() {
    let (dir, fs) = setup();
    std::fs::write(dir.path().join("a"), b"x").unwrap();
    std::fs::write(dir.path().join("b"), b"y").unwrap();
    assert_eq!(fs.inode_count(), 1);
    let a1 = lookup(&fs, NodeId::ROOT, "a").unwrap();
    let a2 = lookup(&fs, NodeId::ROOT, "a").unwrap();
    assert_eq!(a1.nodeid, a2.nodeid);
    assert!(a1.nodeid.0 >= 2);
    assert_eq!(a1.attr.size, 1);
    assert_eq!(fs.inodes.lookups(a1.nodeid.0), 2);
    let b = lookup(&fs, NodeId::ROOT, "b").unwrap();
    assert_ne!(a1.nodeid, b.nodeid);
    assert_eq!(fs.inode_count(), 3);
    fs.forget(a1.nodeid, 1);
    assert_eq!(fs.inode_count(), 3);
    fs.forget(a1.nodeid, 1);
    assert_eq!(fs.inode_count(), 2);
    fs.forget(b.nodeid, 1);
    assert_eq!(fs.inode_count(), 1);
    // The root is never forgotten.
    fs.forget(NodeId::ROOT, 100);
    assert_eq!(fs.inode_count(), 1);
    // A forgotten inode found again keeps its node id (file handles name it); a new inode
    // never gets an id another inode had.
    let a3 = lookup(&fs, NodeId::ROOT, "a").unwrap();
    assert_eq!((a3.nodeid, a3.generation), (a1.nodeid, a1.generation));
    std::fs::write(dir.path().join("c"), b"z").unwrap();
    assert!(node(&fs, NodeId::ROOT, "c").0 > b.nodeid.0);

    // Negative entries and bad names.
    let neg = lookup(&fs, NodeId::ROOT, "missing").unwrap();
    assert_eq!(neg.nodeid.0, 0);
    assert_eq!(lookup(&fs, NodeId::ROOT, ".").unwrap_err(), Errno::ENOENT);
    assert_eq!(lookup(&fs, NodeId::ROOT, "..").unwrap_err(), Errno::ENOENT);
    assert_eq!(lookup(&fs, NodeId::ROOT, "a/b").unwrap_err(), Errno::EINVAL);
    assert_eq!(lookup(&fs, NodeId::ROOT, "").unwrap_err(), Errno::EINVAL);
    assert_eq!(lookup(&fs, a3.nodeid, "x").unwrap_err(), Errno::ENOTDIR);

    let (_d2, fs2) = setup_with(|c| c.negative_timeout = Duration::ZERO);
    assert_eq!(lookup(&fs2, NodeId::ROOT, "missing").unwrap_err(), Errno::ENOENT);
}

#[test]
fn create_write_read_getattr_setattr() {
    let (dir, fs) = setup();
    let (e, o) =
        block_on(fs.create(&ROOT, NodeId::ROOT, &c("f"), libc::S_IFREG | 0o640, 0o022, libc::O_RDWR as u32)).unwrap();
    assert_eq!(e.attr.mode, libc::S_IFREG | 0o640);
    assert_eq!(fs.open_handle_count(), 1);
    let f = e.nodeid;
    let wf = WriteFlags::default();
    assert_eq!(block_on(fs.write(&ROOT, f, o.fh, 0, b"hello", wf)).unwrap(), 5);
    let mut buf = [0u8; 16];
    let n = block_on(fs.read(&ROOT, f, o.fh, 1, &mut buf)).unwrap();
    assert_eq!(&buf[..n], b"ello");
    let a = block_on(fs.getattr(&ROOT, f, Some(o.fh))).unwrap();
    assert_eq!(a.attr.size, 5);
    let a = block_on(fs.getattr(&ROOT, f, None)).unwrap();
    assert_eq!(a.attr.size, 5);
    assert_eq!(a.timeout, Duration::from_secs(1));
    block_on(fs.flush(&ROOT, f, o.fh, 0)).unwrap();
    block_on(fs.fsync(&ROOT, f, o.fh, true)).unwrap();
    block_on(fs.release(&ROOT, f, o.fh, 0)).unwrap();
    assert_eq!(fs.open_handle_count(), 0);

    // O_EXCL on an existing name.
    let r = block_on(fs.create(
        &ROOT,
        NodeId::ROOT,
        &c("f"),
        libc::S_IFREG | 0o644,
        0,
        (libc::O_RDWR | libc::O_EXCL) as u32,
    ));
    assert_eq!(r.unwrap_err(), Errno::EEXIST);

    // O_APPEND writes append whatever the offset.
    let o = block_on(fs.open(&ROOT, f, (libc::O_WRONLY | libc::O_APPEND) as u32)).unwrap();
    block_on(fs.write(&ROOT, f, o.fh, 0, b"!", wf)).unwrap();
    block_on(fs.release(&ROOT, f, o.fh, 0)).unwrap();
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"hello!");

    // setattr: size, mode, owner, times.
    let sa = SetAttr::default()
        .with_size(2)
        .with_mode(libc::S_IFREG | 0o600)
        .with_uid(1234)
        .with_gid(4321)
        .with_atime(SetTime::At(Timespec::new(1000, 5)))
        .with_mtime(SetTime::At(Timespec::new(2000, 7)));
    let a = block_on(fs.setattr(&ROOT, f, &sa)).unwrap();
    assert_eq!(a.attr.size, 2);
    assert_eq!(a.attr.mode & 0o7777, 0o600);
    assert_eq!((a.attr.uid, a.attr.gid), (1234, 4321));
    assert_eq!(a.attr.atime, Timespec::new(1000, 5));
    assert_eq!(a.attr.mtime, Timespec::new(2000, 7));
    let sa = SetAttr::default().with_mtime(SetTime::Now);
    let a = block_on(fs.setattr(&ROOT, f, &sa)).unwrap();
    assert!(a.attr.mtime.sec > 2000);
    assert_eq!(a.attr.atime, Timespec::new(1000, 5));
    // Owner -1 = unchanged.
    let a = block_on(fs.setattr(&ROOT, f, &SetAttr::default().with_gid(77))).unwrap();
    assert_eq!((a.attr.uid, a.attr.gid), (1234, 77));
    // Truncate through an open handle.
    let o = block_on(fs.open(&ROOT, f, libc::O_RDWR as u32)).unwrap();
    let a = block_on(fs.setattr(&ROOT, f, &SetAttr::default().with_size(0).with_fh(o.fh))).unwrap();
    assert_eq!(a.attr.size, 0);
    block_on(fs.release(&ROOT, f, o.fh, 0)).unwrap();

    // statx and statfs.
    let (sx, t) = block_on(fs.statx(&ROOT, f, None, 0, libc::STATX_BASIC_STATS)).unwrap();
    assert_eq!(t, Duration::from_secs(1));
    assert_eq!(sx.attr.uid, 1234);
    assert_eq!(sx.attr.size, 0);
    assert!(sx.mask & libc::STATX_INO != 0);
    let sf = block_on(fs.statfs(&ROOT, f)).unwrap();
    assert!(sf.blocks > 0 && sf.namelen >= 255);
}

#[test]
fn mkdir_readdir_stable_cookies() {
    let (dir, fs) = setup();
    let d = block_on(fs.mkdir(&ROOT, NodeId::ROOT, &c("d"), libc::S_IFDIR | 0o755, 0)).unwrap().nodeid;
    for i in 0..60 {
        std::fs::write(dir.path().join(format!("d/file-with-a-longish-name-{i}")), b"").unwrap();
    }
    // A small buffer forces many calls.
    let first = readdir_all(&fs, d, 200);
    let names: HashSet<Vec<u8>> = first.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(first.len(), 62);
    assert_eq!(names.len(), 62);
    assert!(names.contains(b".".as_slice()) && names.contains(b"..".as_slice()));
    // Same listing with a different buffer size: same cookies.
    let second = readdir_all(&fs, d, 4096);
    assert_eq!(first, second);
    // Resuming from an arbitrary cookie on a fresh handle continues at the same place.
    let o = block_on(fs.opendir(&ROOT, d, 0)).unwrap();
    let (cookie, ref name) = first[31];
    let mut buf = vec![0u8; 4096];
    let mut db = DirBuffer::new(&mut buf);
    block_on(fs.readdir(&ROOT, d, o.fh, cookie, &mut db)).unwrap();
    let n = db.len();
    let got = parse_dirents(&buf[..n]);
    assert_eq!(&got[0].3, name);
    assert_eq!(got.len(), 62 - 31);
    // Rewind to 0 on the same handle.
    let mut buf = vec![0u8; 4096];
    let mut db = DirBuffer::new(&mut buf);
    block_on(fs.readdir(&ROOT, d, o.fh, 0, &mut db)).unwrap();
    let n = db.len();
    assert_eq!(parse_dirents(&buf[..n]).len(), 62);
    block_on(fs.releasedir(&ROOT, d, o.fh)).unwrap();
    assert_eq!(fs.open_handle_count(), 0);
    // rmdir of a non-empty directory.
    assert_eq!(block_on(fs.rmdir(&ROOT, NodeId::ROOT, &c("d"))).unwrap_err().0, libc::ENOTEMPTY);
}

#[test]
fn readdirplus_lookup_counts() {
    let (dir, fs) = setup();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    for i in 0..20 {
        std::fs::write(dir.path().join(format!("d/f{i:02}")), b"").unwrap();
    }
    let d = node(&fs, NodeId::ROOT, "d");
    let o = block_on(fs.opendir(&ROOT, d, 0)).unwrap();
    let mut off = 0;
    let mut seen: HashMap<Vec<u8>, u64> = HashMap::new();
    loop {
        // Room for about three entries per call.
        let mut buf = vec![0u8; 3 * direntplus_size(3) + 8];
        let mut db = DirPlusBuffer::new(&mut buf);
        block_on(fs.readdirplus(&ROOT, d, o.fh, off, &mut db)).unwrap();
        let n = db.len();
        if n == 0 {
            break;
        }
        for (nodeid, next, name) in parse_direntplus(&buf[..n]) {
            if name == b"." || name == b".." {
                assert_eq!(nodeid, 0);
            } else {
                assert_ne!(nodeid, 0);
            }
            assert!(seen.insert(name, nodeid).is_none());
            off = next;
        }
    }
    assert_eq!(seen.len(), 22);
    // d + 20 files + root; each file referenced exactly once.
    assert_eq!(fs.inode_count(), 22);
    for (name, id) in &seen {
        if *id != 0 {
            assert_eq!(fs.inodes.lookups(*id), 1, "{name:?}");
        }
    }
    // Forgetting them all brings the table back.
    for id in seen.values().filter(|id| **id != 0) {
        fs.forget(NodeId(*id), 1);
    }
    assert_eq!(fs.inode_count(), 2);
    block_on(fs.releasedir(&ROOT, d, o.fh)).unwrap();
}

#[test]
fn rename_flags() {
    let (dir, fs) = setup();
    let p = dir.path();
    std::fs::write(p.join("a"), b"A").unwrap();
    std::fs::write(p.join("b"), b"B").unwrap();
    let r = NodeId::ROOT;
    let noreplace = libc::RENAME_NOREPLACE;
    assert_eq!(block_on(fs.rename(&ROOT, r, &c("a"), r, &c("b"), noreplace)).unwrap_err(), Errno::EEXIST);
    block_on(fs.rename(&ROOT, r, &c("a"), r, &c("b"), libc::RENAME_EXCHANGE)).unwrap();
    assert_eq!(std::fs::read(p.join("a")).unwrap(), b"B");
    assert_eq!(std::fs::read(p.join("b")).unwrap(), b"A");
    std::fs::create_dir(p.join("sub")).unwrap();
    let sub = node(&fs, r, "sub");
    block_on(fs.rename(&ROOT, r, &c("a"), sub, &c("c"), noreplace)).unwrap();
    assert_eq!(std::fs::read(p.join("sub/c")).unwrap(), b"B");
    block_on(fs.rename(&ROOT, r, &c("b"), r, &c("w"), libc::RENAME_WHITEOUT)).unwrap();
    let md = std::fs::symlink_metadata(p.join("b")).unwrap();
    assert_eq!(md.mode() & libc::S_IFMT, libc::S_IFCHR);
    assert_eq!(md.rdev(), 0);
    assert_eq!(block_on(fs.rename(&ROOT, r, &c(".."), r, &c("x"), 0)).unwrap_err(), Errno::EINVAL);
    // unlink.
    block_on(fs.unlink(&ROOT, r, &c("w"))).unwrap();
    assert!(!p.join("w").exists());
}

#[test]
fn symlinks_never_followed() {
    let (dir, fs) = setup();
    let p = dir.path();
    std::os::unix::fs::symlink("/etc", p.join("esc")).unwrap();
    std::os::unix::fs::symlink("../../../../../../", p.join("up")).unwrap();
    let esc = lookup(&fs, NodeId::ROOT, "esc").unwrap();
    assert_eq!(esc.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(lookup(&fs, esc.nodeid, "passwd").is_err());
    let up = node(&fs, NodeId::ROOT, "up");
    assert!(lookup(&fs, up, "etc").is_err());
    assert_eq!(block_on(fs.readlink(&ROOT, esc.nodeid)).unwrap(), b"/etc");
    assert_eq!(block_on(fs.opendir(&ROOT, esc.nodeid, 0)).unwrap_err(), Errno::ENOTDIR);
    // Creating through a symlink name does not follow it either.
    let r = block_on(fs.create(&ROOT, NodeId::ROOT, &c("esc"), libc::S_IFREG | 0o644, 0, libc::O_RDWR as u32));
    assert!(r.is_err());
    // Names with slashes are refused.
    assert_eq!(block_on(fs.mkdir(&ROOT, NodeId::ROOT, &c("esc/x"), 0o755, 0)).unwrap_err(), Errno::EINVAL);
    // A symlink made through the file system keeps its raw target.
    let s = block_on(fs.symlink(&ROOT, NodeId::ROOT, &c("s"), &c("../../etc/shadow"))).unwrap();
    assert_eq!(block_on(fs.readlink(&ROOT, s.nodeid)).unwrap(), b"../../etc/shadow");
    // chmod on a symlink is not possible; chown and times are.
    let sa = SetAttr::default().with_mode(0o700);
    assert_eq!(block_on(fs.setattr(&ROOT, s.nodeid, &sa)).unwrap_err(), Errno::EOPNOTSUPP);
    let sa = SetAttr::default().with_uid(5).with_mtime(SetTime::At(Timespec::new(99, 0)));
    let a = block_on(fs.setattr(&ROOT, s.nodeid, &sa)).unwrap();
    assert_eq!((a.attr.uid, a.attr.mtime.sec), (5, 99));
    assert_eq!(std::fs::metadata("/etc/shadow").map(|m| m.uid()).unwrap_or(0), 0);
}

#[test]
fn creation_as_caller() {
    let (dir, fs) = setup();
    let p = dir.path();
    std::fs::create_dir(p.join("pub")).unwrap();
    std::fs::set_permissions(p.join("pub"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let pubd = node(&fs, NodeId::ROOT, "pub");
    let (e, o) = block_on(fs.create(&NOBODY, pubd, &c("f"), libc::S_IFREG | 0o604, 0, libc::O_WRONLY as u32)).unwrap();
    block_on(fs.release(&NOBODY, e.nodeid, o.fh, 0)).unwrap();
    let md = std::fs::metadata(p.join("pub/f")).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (65534, 65534, 0o604));
    let d = block_on(fs.mkdir(&NOBODY, pubd, &c("d"), libc::S_IFDIR | 0o750, 0)).unwrap();
    assert_eq!((d.attr.uid, d.attr.gid, d.attr.mode & 0o7777), (65534, 65534, 0o750));
    let s = block_on(fs.symlink(&NOBODY, pubd, &c("s"), &c("target"))).unwrap();
    assert_eq!((s.attr.uid, s.attr.gid), (65534, 65534));
    let n = block_on(fs.mknod(&NOBODY, pubd, &c("fifo"), libc::S_IFIFO | 0o640, 0, 0)).unwrap();
    assert_eq!((n.attr.uid, n.attr.mode), (65534, libc::S_IFIFO | 0o640));
    let (t, o) = block_on(fs.tmpfile(&NOBODY, pubd, libc::S_IFREG | 0o600, 0, libc::O_RDWR as u32)).unwrap();
    assert_eq!(t.attr.uid, 65534);
    block_on(fs.release(&NOBODY, t.nodeid, o.fh, 0)).unwrap();
    // The thread is root again afterwards.
    let r = block_on(fs.mkdir(&ROOT, pubd, &c("rootdir"), libc::S_IFDIR | 0o755, 0)).unwrap();
    assert_eq!((r.attr.uid, r.attr.gid), (0, 0));
    // Device nodes by root.
    let dev =
        block_on(fs.mknod(&ROOT, pubd, &c("null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3) as u32, 0)).unwrap();
    assert_eq!(dev.attr.rdev, libc::makedev(1, 3) as u32);
    // No permission in a root-owned 0755 directory.
    std::fs::create_dir(p.join("priv")).unwrap();
    std::fs::set_permissions(p.join("priv"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let privd = node(&fs, NodeId::ROOT, "priv");
    assert_eq!(block_on(fs.mkdir(&NOBODY, privd, &c("x"), libc::S_IFDIR | 0o755, 0)).unwrap_err(), Errno::EACCES);
    // Set-gid directory inheritance.
    std::fs::create_dir(p.join("sg")).unwrap();
    std::os::unix::fs::chown(p.join("sg"), None, Some(4242)).unwrap();
    std::fs::set_permissions(p.join("sg"), std::fs::Permissions::from_mode(0o2777)).unwrap();
    let sg = node(&fs, NodeId::ROOT, "sg");
    let sd = block_on(fs.mkdir(&NOBODY, sg, &c("sub"), libc::S_IFDIR | 0o755, 0)).unwrap();
    assert_eq!((sd.attr.uid, sd.attr.gid), (65534, 4242));
    assert!(sd.attr.mode & libc::S_ISGID != 0);
}

#[test]
fn creation_with_supplementary_group() {
    let (dir, fs) = setup();
    let p = dir.path();
    std::fs::create_dir(p.join("grp")).unwrap();
    std::os::unix::fs::chown(p.join("grp"), Some(0), Some(31337)).unwrap();
    std::fs::set_permissions(p.join("grp"), std::fs::Permissions::from_mode(0o770)).unwrap();
    let grp = node(&fs, NodeId::ROOT, "grp");
    // A process that has 31337 as a supplementary group.
    let mut child = std::process::Command::new("setpriv").args(["--groups", "31337", "sleep", "30"]).spawn().unwrap();
    let mut found = false;
    for _ in 0..200 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
        if status.is_ok_and(|s| creds::parse_groups(&s).contains(&31337)) {
            found = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(found);
    let ctx = Context::new(65534, 65534, child.id());
    let r = block_on(fs.mkdir(&ctx, grp, &c("x"), libc::S_IFDIR | 0o700, 0));
    child.kill().ok();
    child.wait().ok();
    let e = r.unwrap();
    assert_eq!((e.attr.uid, e.attr.gid), (65534, 65534));
    // Groups are reset: the same caller without the pid fails.
    assert_eq!(block_on(fs.mkdir(&NOBODY, grp, &c("y"), libc::S_IFDIR | 0o700, 0)).unwrap_err(), Errno::EACCES);
}

#[test]
fn without_default_permissions() {
    let (dir, fs) = setup_with(|c| c.default_permissions = false);
    let p = dir.path();
    std::fs::create_dir(p.join("closed")).unwrap();
    std::fs::set_permissions(p.join("closed"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(p.join("closed/f"), b"").unwrap();
    std::fs::write(p.join("secret"), b"s").unwrap();
    std::fs::set_permissions(p.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(p.join("public"), b"p").unwrap();
    std::fs::set_permissions(p.join("public"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let closed = node(&fs, NodeId::ROOT, "closed");
    assert_eq!(block_on(fs.lookup(&NOBODY, closed, &c("f"))).unwrap_err(), Errno::EACCES);
    let secret = node(&fs, NodeId::ROOT, "secret");
    let public = node(&fs, NodeId::ROOT, "public");
    assert_eq!(block_on(fs.open(&NOBODY, secret, libc::O_RDONLY as u32)).unwrap_err(), Errno::EACCES);
    let o = block_on(fs.open(&NOBODY, public, libc::O_RDONLY as u32)).unwrap();
    block_on(fs.release(&NOBODY, public, o.fh, 0)).unwrap();
    assert_eq!(block_on(fs.open(&NOBODY, public, libc::O_WRONLY as u32)).unwrap_err(), Errno::EACCES);
    block_on(fs.access(&NOBODY, public, libc::R_OK as u32)).unwrap();
    assert_eq!(block_on(fs.access(&NOBODY, public, libc::W_OK as u32)).unwrap_err(), Errno::EACCES);
    block_on(fs.access(&ROOT, secret, libc::W_OK as u32)).unwrap();
    let sa = SetAttr::default().with_mode(0o777);
    assert_eq!(block_on(fs.setattr(&NOBODY, public, &sa)).unwrap_err(), Errno::EPERM);
    assert_eq!(block_on(fs.unlink(&NOBODY, NodeId::ROOT, &c("public"))).unwrap_err(), Errno::EACCES);
    assert_eq!(block_on(fs.opendir(&NOBODY, closed, 0)).unwrap_err(), Errno::EACCES);
}

#[test]
fn xattrs_on_file_and_symlink() {
    let (dir, fs) = setup();
    std::fs::write(dir.path().join("f"), b"").unwrap();
    std::os::unix::fs::symlink("nowhere", dir.path().join("l")).unwrap();
    let f = node(&fs, NodeId::ROOT, "f");
    let l = node(&fs, NodeId::ROOT, "l");
    block_on(fs.setxattr(&ROOT, f, &c("user.a"), b"value", 0)).unwrap();
    assert_eq!(
        block_on(fs.setxattr(&ROOT, f, &c("user.a"), b"v", libc::XATTR_CREATE as u32)).unwrap_err(),
        Errno::EEXIST
    );
    assert_eq!(block_on(fs.getxattr(&ROOT, f, &c("user.a"), 0)).unwrap(), XattrReply::Size(5));
    assert_eq!(block_on(fs.getxattr(&ROOT, f, &c("user.a"), 64)).unwrap(), XattrReply::Data(b"value".to_vec()));
    assert_eq!(block_on(fs.getxattr(&ROOT, f, &c("user.a"), 2)).unwrap_err(), Errno::ERANGE);
    let XattrReply::Data(list) = block_on(fs.listxattr(&ROOT, f, 256)).unwrap() else {
        panic!("no data");
    };
    assert!(list.split(|&b| b == 0).any(|n| n == b"user.a"));
    assert_eq!(block_on(fs.listxattr(&ROOT, f, 0)).unwrap(), XattrReply::Size(list.len() as u32));
    assert_eq!(block_on(fs.listxattr(&ROOT, f, 1)).unwrap_err(), Errno::ERANGE);
    block_on(fs.removexattr(&ROOT, f, &c("user.a"))).unwrap();
    assert_eq!(block_on(fs.getxattr(&ROOT, f, &c("user.a"), 64)).unwrap_err(), Errno::ENODATA);
    // Symlinks: user.* is refused by ext4, trusted.* works for root, on the link itself.
    assert_eq!(block_on(fs.setxattr(&ROOT, l, &c("user.a"), b"v", 0)).unwrap_err(), Errno::EPERM);
    block_on(fs.setxattr(&ROOT, l, &c("trusted.t"), b"tv", 0)).unwrap();
    assert_eq!(block_on(fs.getxattr(&ROOT, l, &c("trusted.t"), 16)).unwrap(), XattrReply::Data(b"tv".to_vec()));
    let XattrReply::Data(list) = block_on(fs.listxattr(&ROOT, l, 256)).unwrap() else {
        panic!("no data");
    };
    assert!(list.split(|&b| b == 0).any(|n| n == b"trusted.t"));
    // Unprivileged callers do not see trusted.* names.
    assert_eq!(block_on(fs.listxattr(&NOBODY, l, 0)).unwrap(), XattrReply::Size(0));
    block_on(fs.removexattr(&ROOT, l, &c("trusted.t"))).unwrap();
}

#[test]
fn fd_count_bounded() {
    let (dir, fs) = setup_with(|c| c.max_cached_fds = 1000);
    let d = dir.path().join("many");
    std::fs::create_dir(&d).unwrap();
    const N: usize = 30_000;
    for i in 0..N {
        std::fs::File::create(d.join(format!("{i}"))).unwrap();
    }
    let many = node(&fs, NodeId::ROOT, "many");
    let before = open_fds();
    let mut ids = Vec::with_capacity(N);
    for i in 0..N {
        ids.push(node(&fs, many, &i.to_string()));
    }
    let after = open_fds();
    assert!(after < before + 1000 + 200, "fds grew from {before} to {after}");
    assert!(fs.inodes.cached_fds() <= 1000);
    assert_eq!(fs.inode_count(), N + 2);
    // Evicted inodes reopen by handle.
    for (i, id) in ids.iter().enumerate().take(50) {
        let a = block_on(fs.getattr(&ROOT, *id, None)).unwrap();
        let md = std::fs::metadata(d.join(i.to_string())).unwrap();
        assert_eq!(a.attr.ino, md.ino());
    }
    for id in &ids {
        fs.forget(*id, 1);
    }
    assert_eq!(fs.inode_count(), 2);
    assert!(open_fds() < before + 200);
}

/// A cold LOOKUP computes no file handle; whatever needs one gets it: the watch (resolving a
/// handle it has not seen by opening it), eviction (the node reopens by handle), retirement
/// (the inode found again after its forget keeps its node id) and the export of the table.
#[test]
fn file_handles_are_computed_when_needed() {
    let (dir, fs) = setup_with(|c| c.max_cached_fds = 4);
    let p = dir.path();
    for i in 0..3 {
        std::fs::write(p.join(format!("h{i}")), b"").unwrap();
    }
    let lazy_before = fs.inodes.lazy_handles();
    let ids: Vec<NodeId> = (0..3).map(|i| node(&fs, NodeId::ROOT, &format!("h{i}"))).collect();
    assert_eq!(fs.inodes.lazy_handles(), lazy_before + 3, "a cold LOOKUP computed a file handle");

    // The watch's view: the backing file's own handle names the node (resolved once, then kept).
    let f0 = std::fs::File::open(p.join("h0")).unwrap();
    let h0 = sys::name_to_handle(std::os::fd::AsRawFd::as_raw_fd(&f0)).unwrap();
    assert_eq!(fs.inodes.node_by_handle(&h0), Some(ids[0].0));
    assert_eq!(fs.inodes.lazy_handles(), lazy_before + 2);
    assert_eq!(fs.inodes.node_by_handle(&h0), Some(ids[0].0));
    // A handle of a file the kernel does not know names no node.
    std::fs::write(p.join("unknown"), b"").unwrap();
    let fu = std::fs::File::open(p.join("unknown")).unwrap();
    assert_eq!(fs.inodes.node_by_handle(&sys::name_to_handle(std::os::fd::AsRawFd::as_raw_fd(&fu)).unwrap()), None);

    // Eviction: more nodes than the cache holds; the first ones reopen by handle.
    for i in 0..20 {
        std::fs::write(p.join(format!("e{i}")), b"").unwrap();
        node(&fs, NodeId::ROOT, &format!("e{i}"));
    }
    assert!(fs.inodes.cached_fds() <= 4);
    for (i, id) in ids.iter().enumerate() {
        let a = block_on(fs.getattr(&ROOT, *id, None)).unwrap();
        assert_eq!(a.attr.ino, std::fs::metadata(p.join(format!("h{i}"))).unwrap().ino());
    }

    // Retirement: forgotten, then found again under the same node id.
    std::fs::write(p.join("r"), b"").unwrap();
    let r = node(&fs, NodeId::ROOT, "r");
    fs.forget(r, 1);
    assert_eq!(node(&fs, NodeId::ROOT, "r"), r);

    // Export: every live node has its handle (lazy ones computed now).
    std::fs::write(p.join("x"), b"").unwrap();
    let x = node(&fs, NodeId::ROOT, "x");
    assert!(fs.inodes.lazy_handles() > 0);
    let state = fs.inodes.export();
    assert_eq!(fs.inodes.lazy_handles(), 0);
    assert!(state.nodes.iter().any(|(id, h)| *id == ids[0].0 && h[..] == h0[..]));
    assert!(state.nodes.iter().any(|(id, _)| *id == r.0));
    assert!(state.nodes.iter().any(|(id, _)| *id == x.0));
}

#[test]
fn open_unlinked_and_tmpfile_stay_pinned() {
    let (dir, fs) = setup_with(|c| c.max_cached_fds = 2);
    let p = dir.path();
    for i in 0..10 {
        std::fs::write(p.join(format!("o{i}")), b"").unwrap();
    }
    let (e, o) =
        block_on(fs.create(&ROOT, NodeId::ROOT, &c("victim"), libc::S_IFREG | 0o644, 0, libc::O_RDWR as u32)).unwrap();
    block_on(fs.unlink(&ROOT, NodeId::ROOT, &c("victim"))).unwrap();
    for i in 0..10 {
        node(&fs, NodeId::ROOT, &format!("o{i}"));
    }
    let a = block_on(fs.getattr(&ROOT, e.nodeid, None)).unwrap();
    assert_eq!(a.attr.nlink, 0);
    block_on(fs.release(&ROOT, e.nodeid, o.fh, 0)).unwrap();
    fs.forget(e.nodeid, 1);

    // O_TMPFILE, then linked into the tree.
    let (t, o) = block_on(fs.tmpfile(&ROOT, NodeId::ROOT, libc::S_IFREG | 0o640, 0, libc::O_RDWR as u32)).unwrap();
    block_on(fs.write(&ROOT, t.nodeid, o.fh, 0, b"tmp", WriteFlags::default())).unwrap();
    for i in 0..10 {
        node(&fs, NodeId::ROOT, &format!("o{i}"));
    }
    let a = block_on(fs.getattr(&ROOT, t.nodeid, None)).unwrap();
    assert_eq!((a.attr.nlink, a.attr.size), (0, 3));
    let l = block_on(fs.link(&ROOT, t.nodeid, NodeId::ROOT, &c("named"))).unwrap();
    assert_eq!(l.nodeid, t.nodeid);
    assert_eq!(l.attr.nlink, 1);
    assert_eq!(std::fs::read(p.join("named")).unwrap(), b"tmp");
    block_on(fs.release(&ROOT, t.nodeid, o.fh, 0)).unwrap();
    // Hard link of a regular file.
    let o0 = node(&fs, NodeId::ROOT, "o0");
    let l = block_on(fs.link(&ROOT, o0, NodeId::ROOT, &c("o0-link"))).unwrap();
    assert_eq!((l.nodeid, l.attr.nlink), (o0, 2));
}

#[test]
fn forgotten_nodes_resolve_by_id_for_file_handles() {
    let (dir, fs) = setup();
    let p = dir.path();
    std::fs::create_dir_all(p.join("d/e")).unwrap();
    std::fs::write(p.join("f"), b"data").unwrap();
    std::fs::write(p.join("g"), b"").unwrap();
    let f = lookup(&fs, NodeId::ROOT, "f").unwrap();
    let g = lookup(&fs, NodeId::ROOT, "g").unwrap();
    let d = lookup(&fs, NodeId::ROOT, "d").unwrap();
    let e = lookup(&fs, d.nodeid, "e").unwrap();
    assert!(f.generation <= u32::MAX as u64 && f.generation != g.generation);
    assert_eq!(block_on(fs.lookup_node(&ROOT, NodeId::ROOT)).unwrap().generation, 0);
    // Known: one more reference.
    let again = block_on(fs.lookup_node(&ROOT, f.nodeid)).unwrap();
    assert_eq!((again.nodeid, again.generation, again.attr.size), (f.nodeid, f.generation, 4));
    assert_eq!(fs.inodes.lookups(f.nodeid.0), 2);
    fs.forget(f.nodeid, 2);
    for n in [&g, &e, &d] {
        fs.forget(n.nodeid, 1);
    }
    assert_eq!((fs.inode_count(), fs.inodes.retired_len()), (1, 4));
    // Forgotten: reopened from the backing file handle under the same id and generation.
    let back = block_on(fs.lookup_node(&ROOT, f.nodeid)).unwrap();
    assert_eq!((back.nodeid, back.generation, back.attr.size), (f.nodeid, f.generation, 4));
    assert_eq!(fs.inodes.lookups(f.nodeid.0), 1);
    assert_eq!(node(&fs, NodeId::ROOT, "f"), f.nodeid);
    // Gone from the backing directory: stale.
    std::fs::remove_file(p.join("g")).unwrap();
    assert_eq!(block_on(fs.lookup_node(&ROOT, g.nodeid)).unwrap_err(), Errno::ESTALE);
    assert_eq!(block_on(fs.lookup_node(&ROOT, NodeId(1 << 40))).unwrap_err(), Errno::ESTALE);
    // Directories reconnect through their parents, up to the root.
    let e2 = block_on(fs.lookup_node(&ROOT, e.nodeid)).unwrap();
    assert_eq!(e2.nodeid, e.nodeid);
    let up = block_on(fs.lookup_parent(&ROOT, e.nodeid)).unwrap();
    assert_eq!(up.nodeid, d.nodeid);
    assert_eq!(block_on(fs.lookup_parent(&ROOT, d.nodeid)).unwrap().nodeid, NodeId::ROOT);
    assert_eq!(block_on(fs.lookup_parent(&ROOT, f.nodeid)).unwrap_err(), Errno::ENOTDIR);
    // A directory moved out of the backing tree behind the mount's back: its parent is not
    // handed out.
    let outside = tempfile::Builder::new().prefix("ringfs-fs-outside").tempdir_in("/tmp").unwrap();
    std::fs::rename(p.join("d"), outside.path().join("d")).unwrap();
    assert_eq!(block_on(fs.lookup_parent(&ROOT, e.nodeid)).unwrap_err(), Errno::ENOENT);

    // Bounded: the oldest forgotten inodes go first; with 0, nothing is kept.
    let (dir, fs) = setup_with(|c| c.export_handles = 2);
    let ids: Vec<NodeId> = (0..3)
        .map(|i| {
            std::fs::write(dir.path().join(format!("x{i}")), b"").unwrap();
            node(&fs, NodeId::ROOT, &format!("x{i}"))
        })
        .collect();
    for id in &ids {
        fs.forget(*id, 1);
    }
    assert_eq!(fs.inodes.retired_len(), 2);
    assert_eq!(block_on(fs.lookup_node(&ROOT, ids[0])).unwrap_err(), Errno::ESTALE);
    assert_eq!(block_on(fs.lookup_node(&ROOT, ids[2])).unwrap().nodeid, ids[2]);
    let (dir, fs) = setup_with(|c| c.export_handles = 0);
    std::fs::write(dir.path().join("y"), b"").unwrap();
    let y = node(&fs, NodeId::ROOT, "y");
    fs.forget(y, 1);
    assert_eq!(fs.inodes.retired_len(), 0);
    assert!(node(&fs, NodeId::ROOT, "y").0 > y.0);
    let mut conn = conn_info();
    fs.init(&mut conn).unwrap();
    assert!(!conn.export_support);
}

fn conn_info() -> ConnInfo {
    let mut c = ConnInfo::default();
    c.proto_minor = 45;
    c.readdirplus = true;
    c.export_support = true;
    c.default_permissions = true;
    c.max_write = 1 << 20;
    c.max_read = 1 << 20;
    c
}

#[test]
fn node_ids_carry_over_to_the_next_server() {
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("handles/x.state");
    let (dir, fs) = setup_with(|c| c.handle_state = Some(path.clone()));
    let p = dir.path().to_path_buf();
    let cfg = fs.cfg.clone();
    std::fs::create_dir(p.join("d")).unwrap();
    std::fs::write(p.join("d/f"), b"kept").unwrap();
    std::fs::write(p.join("old"), b"").unwrap();
    let mut conn = conn_info();
    fs.init(&mut conn).unwrap();
    assert!(conn.export_support);
    let d = lookup(&fs, NodeId::ROOT, "d").unwrap();
    let f = lookup(&fs, d.nodeid, "f").unwrap();
    let old = lookup(&fs, NodeId::ROOT, "old").unwrap();
    fs.forget(old.nodeid, 1);
    fs.destroy();
    fs.destroy();
    drop(fs);
    assert!(path.exists());
    // The next server resolves the same ids with the same generations, and never gives them to
    // new inodes.
    let fs = PassthroughFs::new(cfg.clone()).unwrap();
    assert!(!path.exists(), "the state is taken once");
    for e in [&d, &f, &old] {
        let again = block_on(fs.lookup_node(&ROOT, e.nodeid)).unwrap();
        assert_eq!((again.nodeid, again.generation, again.attr.ino), (e.nodeid, e.generation, e.attr.ino));
    }
    assert_eq!(node(&fs, d.nodeid, "f"), f.nodeid);
    std::fs::write(p.join("new"), b"").unwrap();
    assert!(node(&fs, NodeId::ROOT, "new").0 > old.nodeid.0);
    // Without the file (a crash), or for another directory: stale, nothing else.
    drop(fs);
    let fs = PassthroughFs::new(cfg.clone()).unwrap();
    assert_eq!(block_on(fs.lookup_node(&ROOT, f.nodeid)).unwrap_err(), Errno::ESTALE);
    let other = tempfile::Builder::new().prefix("ringfs-fs-test").tempdir_in("/tmp").unwrap();
    let mut conn = conn_info();
    fs.init(&mut conn).unwrap();
    fs.destroy();
    let fs = PassthroughFs::new(FsConfig { source: other.path().to_path_buf(), ..cfg }).unwrap();
    assert!(!path.exists());
    assert_eq!(block_on(fs.lookup_node(&ROOT, d.nodeid)).unwrap_err(), Errno::ESTALE);
}

#[test]
fn reused_inode_number_gets_new_node() {
    let (dir, fs) = setup_with(|c| c.max_cached_fds = 1);
    let p = dir.path();
    std::fs::write(p.join("x"), b"").unwrap();
    std::fs::write(p.join("y"), b"").unwrap();
    let x = lookup(&fs, NodeId::ROOT, "x").unwrap();
    // Evict x's descriptor, then replace the file behind the kernel's back.
    node(&fs, NodeId::ROOT, "y");
    std::fs::remove_file(p.join("x")).unwrap();
    let mut reused = false;
    for i in 0..50 {
        let name = format!("n{i}");
        std::fs::write(p.join(&name), b"").unwrap();
        let md = std::fs::metadata(p.join(&name)).unwrap();
        let e = lookup(&fs, NodeId::ROOT, &name).unwrap();
        assert_ne!(e.nodeid, x.nodeid);
        if md.ino() == x.attr.ino {
            reused = true;
            break;
        }
    }
    eprintln!("inode number reused: {reused}");
    // The old node is stale now.
    assert_eq!(block_on(fs.getattr(&ROOT, x.nodeid, None)).unwrap_err(), Errno::ESTALE);
    fs.forget(x.nodeid, 1);
}

#[test]
fn suid_cleared_on_unprivileged_truncate_and_kill_flag() {
    let (dir, fs) = setup();
    let p = dir.path();
    std::fs::write(p.join("s"), b"data").unwrap();
    std::os::unix::fs::chown(p.join("s"), Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(p.join("s"), std::fs::Permissions::from_mode(0o6755)).unwrap();
    let s = node(&fs, NodeId::ROOT, "s");
    // Truncate by root keeps the bits.
    let sa = SetAttr::default().with_size(3);
    let a = block_on(fs.setattr(&ROOT, s, &sa)).unwrap();
    assert_eq!(a.attr.mode & 0o7777, 0o6755);
    // By the (unprivileged) owner they go.
    let a = block_on(fs.setattr(&NOBODY, s, &sa)).unwrap();
    assert_eq!(a.attr.mode & 0o7777, 0o755);
    // S_ISGID without group-exec stays (mandatory-locking marker).
    std::fs::set_permissions(p.join("s"), std::fs::Permissions::from_mode(0o6744)).unwrap();
    let a = block_on(fs.setattr(&NOBODY, s, &sa)).unwrap();
    assert_eq!(a.attr.mode & 0o7777, 0o2744);
    // WriteFlags::kill_suidgid.
    std::fs::set_permissions(p.join("s"), std::fs::Permissions::from_mode(0o6755)).unwrap();
    let o = block_on(fs.open(&ROOT, s, libc::O_RDWR as u32)).unwrap();
    let mut wf = WriteFlags::default();
    wf.kill_suidgid = true;
    block_on(fs.write(&ROOT, s, o.fh, 0, b"x", wf)).unwrap();
    let a = block_on(fs.getattr(&ROOT, s, Some(o.fh))).unwrap();
    assert_eq!(a.attr.mode & 0o7777, 0o755);
    block_on(fs.release(&ROOT, s, o.fh, 0)).unwrap();
    // SetAttr::kill_suidgid.
    std::fs::set_permissions(p.join("s"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    let sa = SetAttr::default().with_uid(65534).with_kill_suidgid(true);
    let a = block_on(fs.setattr(&ROOT, s, &sa)).unwrap();
    assert_eq!(a.attr.mode & 0o7777, 0o755);
}

#[test]
fn fallocate_lseek_copy_range() {
    let (dir, fs) = setup();
    let (e, o) =
        block_on(fs.create(&ROOT, NodeId::ROOT, &c("f"), libc::S_IFREG | 0o644, 0, libc::O_RDWR as u32)).unwrap();
    let f = e.nodeid;
    let data = vec![7u8; 1 << 20];
    block_on(fs.write(&ROOT, f, o.fh, 0, &data, WriteFlags::default())).unwrap();
    block_on(fs.fallocate(
        &ROOT,
        f,
        o.fh,
        0,
        512 * 1024,
        (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
    ))
    .unwrap();
    let a = block_on(fs.getattr(&ROOT, f, None)).unwrap();
    assert_eq!(a.attr.size, 1 << 20);
    let d = block_on(fs.lseek(&ROOT, f, o.fh, 0, libc::SEEK_DATA as u32)).unwrap();
    assert_eq!(d, 512 * 1024);
    let h = block_on(fs.lseek(&ROOT, f, o.fh, 0, libc::SEEK_HOLE as u32)).unwrap();
    assert_eq!(h, 0);
    let (e2, o2) =
        block_on(fs.create(&ROOT, NodeId::ROOT, &c("g"), libc::S_IFREG | 0o644, 0, libc::O_RDWR as u32)).unwrap();
    let n = block_on(fs.copy_file_range(&ROOT, f, o.fh, 512 * 1024, e2.nodeid, o2.fh, 10, 4096, 0)).unwrap();
    assert_eq!(n, 4096);
    let g = std::fs::read(dir.path().join("g")).unwrap();
    assert_eq!(g.len(), 10 + 4096);
    assert!(g[10..].iter().all(|&b| b == 7));
    block_on(fs.release(&ROOT, f, o.fh, 0)).unwrap();
    block_on(fs.release(&ROOT, e2.nodeid, o2.fh, 0)).unwrap();
    assert_eq!(fs.open_handle_count(), 0);
}

#[test]
fn parse_groups_line() {
    let s = "Name:\tx\nGroups:\t4 24 27 \nNgid:\t0\n";
    assert_eq!(creds::parse_groups(s), vec![4, 24, 27]);
    assert!(creds::parse_groups("Groups:\t\n").is_empty());
    let _ = Path::new("/");
}

#[test]
fn futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let (_d, fs) = setup();
    let name = c("x");
    let mut buf = vec![0u8; 4096];
    let mut out = DirPlusBuffer::new(&mut buf);
    is_send(&fs.lookup(&ROOT, NodeId::ROOT, &name));
    is_send(&fs.create(&ROOT, NodeId::ROOT, &name, 0o644, 0, 0));
    is_send(&fs.setattr(&ROOT, NodeId::ROOT, &SetAttr::default()));
    is_send(&fs.listxattr(&ROOT, NodeId::ROOT, 0));
    is_send(&fs.getxattr(&ROOT, NodeId::ROOT, &name, 0));
    is_send(&fs.readdirplus(&ROOT, NodeId::ROOT, FileHandle(1), 0, &mut out));
    is_send(&fs.fsyncdir(&ROOT, NodeId::ROOT, FileHandle(1), false));
}

#[test]
fn enomem_from_open_by_handle_is_retried_until_it_says_estale() {
    let mut calls = 0;
    let r: Result<()> = sys::retry_enomem(|| {
        calls += 1;
        Err(if calls <= 3 { Errno::ENOMEM } else { Errno::ESTALE })
    });
    assert_eq!((r, calls), (Err(Errno::ESTALE), 4));
    // A real allocation failure is returned after a bounded number of tries.
    let mut calls = 0;
    let start = std::time::Instant::now();
    let r: Result<()> = sys::retry_enomem(|| {
        calls += 1;
        Err(Errno::ENOMEM)
    });
    assert_eq!((r, calls), (Err(Errno::ENOMEM), 9));
    assert!(start.elapsed() < std::time::Duration::from_millis(500));
}

/// The root cause of a flake (ENOMEM where ESTALE was expected): a stale handle whose inode
/// number a concurrent creation reuses made open_by_handle_at answer ENOMEM. With creators
/// running, every stale handle must still read as ESTALE.
#[test]
fn stale_handles_stay_estale_while_inode_numbers_are_reused() {
    let dir = tempfile::Builder::new().prefix("ringfs-fs-reuse").tempdir_in("/tmp").unwrap();
    let root = std::fs::File::open(dir.path()).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let creators: Vec<_> = (0..2)
        .map(|t| {
            let (d, stop) = (dir.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let p = d.join(format!("c{t}-{}", n % 32));
                    let _ = std::fs::File::create(&p);
                    let _ = std::fs::remove_file(&p);
                    n += 1;
                }
            })
        })
        .collect();
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for _ in 0..3000 {
        let p = dir.path().join("g");
        let f = std::fs::File::create(&p).unwrap();
        let handle = sys::name_to_handle(std::os::fd::AsRawFd::as_raw_fd(&f)).unwrap();
        drop(f);
        std::fs::remove_file(&p).unwrap();
        let r = sys::open_by_handle(std::os::fd::AsRawFd::as_raw_fd(&root), &handle, libc::O_PATH | libc::O_CLOEXEC);
        *outcomes.entry(format!("{:?}", r.map(drop))).or_default() += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in creators {
        c.join().unwrap();
    }
    assert_eq!(outcomes.len(), 1, "stale handles answered {outcomes:?}");
    assert!(outcomes.contains_key(&format!("{:?}", Err::<(), _>(Errno::ESTALE))), "{outcomes:?}");
}

/// Counts the heap allocations of each thread (this test binary's allocator).
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub(super) struct Counting;

    thread_local! {
        static ALLOCS: Cell<u64> = const { Cell::new(0) };
    }

    fn count() {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    }

    // SAFETY: forwards to the system allocator; only counts.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count();
            // SAFETY: same contract as ours.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count();
            // SAFETY: same contract as ours.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count();
            // SAFETY: same contract as ours.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as ours.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    /// Allocations made by this thread so far.
    pub(super) fn allocations() -> u64 {
        ALLOCS.with(|c| c.get())
    }
}

#[global_allocator]
static COUNTING: counting::Counting = counting::Counting;

/// Allocations per call of `f` on this thread, over `n` calls after `n` warm-up calls.
fn allocs_per_call(n: usize, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..n {
        f(i);
    }
    let before = counting::allocations();
    for i in n..2 * n {
        f(i);
    }
    (counting::allocations() - before) as f64 / n as f64
}

/// The request path of the common metadata operations allocates nothing in steady state
/// (lookup of a known name, forget, getattr, readdir, readdirplus of known names, unlink),
/// and open/release and create only what the new open or node itself needs. Measured on this
/// thread with a counting allocator, calling the file system as the dispatcher does.
#[test]
fn metadata_ops_do_not_allocate_per_request() {
    let (dir, fs) = setup();
    let n = 200;
    std::fs::create_dir(dir.path().join("d")).unwrap();
    for i in 0..2 * n {
        std::fs::write(dir.path().join(format!("d/f{i}")), b"x").unwrap();
    }
    let names: Vec<CString> = (0..2 * n).map(|i| c(&format!("f{i}"))).collect();
    let d = node(&fs, NodeId::ROOT, "d");
    let ids: Vec<NodeId> = names.iter().map(|nm| block_on(fs.lookup(&ROOT, d, nm)).unwrap().nodeid).collect();

    let lookup = allocs_per_call(n, |i| {
        let e = block_on(fs.lookup(&ROOT, d, &names[i])).unwrap();
        fs.forget(e.nodeid, 1);
    });
    let getattr = allocs_per_call(n, |i| {
        block_on(fs.getattr(&ROOT, ids[i], None)).unwrap();
    });
    let opened = block_on(fs.opendir(&ROOT, d, libc::O_RDONLY as u32)).unwrap();
    let mut out = vec![0u8; 4096];
    let readdir = allocs_per_call(n, |i| {
        let mut buf = DirBuffer::new(&mut out);
        // From the start (a seek) and from where the last call stopped.
        let off = if i % 2 == 0 { 0 } else { 3 };
        block_on(fs.readdir(&ROOT, d, opened.fh, off, &mut buf)).unwrap();
        assert!(!buf.is_empty());
    });
    let mut taken = Vec::with_capacity(4096);
    let readdirplus = allocs_per_call(n / 4, |_| {
        let mut buf = DirPlusBuffer::new(&mut out);
        block_on(fs.readdirplus(&ROOT, d, opened.fh, 0, &mut buf)).unwrap();
        let len = buf.len();
        assert!(len > 0);
        // Give back the references the entries took (the kernel would FORGET them).
        taken.clear();
        let mut at = 0;
        let (e, h) = (size_of::<FuseEntryOut>(), size_of::<FuseDirentplus>());
        while at + h <= len {
            let r = &out[at..];
            let nodeid = u64::from_ne_bytes(r[0..8].try_into().unwrap());
            if nodeid != 0 {
                taken.push(nodeid);
            }
            at += direntplus_size(u32::from_ne_bytes(r[e + 16..e + 20].try_into().unwrap()) as usize);
        }
        for id in &taken {
            fs.forget(NodeId(*id), 1);
        }
    });
    block_on(fs.releasedir(&ROOT, d, opened.fh)).unwrap();
    let open_release = allocs_per_call(n, |i| {
        let o = block_on(fs.open(&ROOT, ids[i], libc::O_RDONLY as u32)).unwrap();
        block_on(fs.release(&ROOT, ids[i], o.fh, 0)).unwrap();
    });
    let new_names: Vec<CString> = (0..2 * n).map(|i| c(&format!("new{i}"))).collect();
    let create = allocs_per_call(n, |i| {
        let (e, o) = block_on(fs.create(&ROOT, d, &new_names[i], 0o644, 0, libc::O_WRONLY as u32)).unwrap();
        block_on(fs.release(&ROOT, e.nodeid, o.fh, 0)).unwrap();
        fs.forget(e.nodeid, 1);
    });
    let unlink = allocs_per_call(n, |i| {
        block_on(fs.unlink(&ROOT, d, &new_names[i])).unwrap();
    });
    let report = format!(
        "allocations per call: lookup+forget {lookup}, getattr {getattr}, readdir {readdir}, \
         readdirplus {readdirplus}, open+release {open_release}, create+release+forget {create}, unlink {unlink}"
    );
    eprintln!("{report}");
    assert_eq!(lookup, 0.0, "{report}");
    assert_eq!(getattr, 0.0, "{report}");
    assert_eq!(readdir, 0.0, "{report}");
    assert_eq!(unlink, 0.0, "{report}");
    // A readdirplus reply is one request for many entries; its lookups hit known nodes.
    assert_eq!(readdirplus, 0.0, "{report}");
    // An open needs its handle (and the descriptor's shared owner); the first open of a node
    // a cold LOOKUP made also computes its file handle (one allocation, once per node: each
    // call here opens another node; and the handle map's growth now and then).
    assert!(open_release < 3.1, "{report}");
    // A new node: its file handle (one allocation, shared by the table's two keys); the open's
    // two; the created file is the node's descriptor (no O_PATH one of its own, so no shared
    // owner of one); now and then a map's growth.
    assert!(create < 3.5, "{report}");
}

/// A request as the kernel sends it: header, then `body`.
fn request_bytes(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    use zerocopy::IntoBytes;
    let len = (size_of::<ringfs_protocol::abi::FuseInHeader>() + body.len()) as u32;
    let h = ringfs_protocol::abi::FuseInHeader { len, opcode, unique, nodeid, ..Default::default() };
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// The whole request path above the transport, parsing, the dispatcher (its statistics
/// included), the file system and the reply's encoding, allocates nothing for a LOOKUP of a
/// known name, a GETATTR or a FORGET, and for a CREATE + RELEASE + FORGET only what the new
/// node and its open need. Requests are built as the kernel sends them and answered into one
/// reply buffer, on this thread, with a counting allocator.
#[test]
fn requests_through_the_dispatcher_do_not_allocate() {
    use ringfs_protocol::abi::{opcode, FuseCreateIn, FuseForgetIn, FuseGetattrIn, FuseReleaseIn};
    use ringfs_protocol::dispatch::{Dispatcher, Outcome};
    use zerocopy::IntoBytes;

    let (dir, fs) = setup();
    let n = 200;
    std::fs::create_dir(dir.path().join("d")).unwrap();
    for i in 0..2 * n {
        std::fs::write(dir.path().join(format!("d/f{i}")), b"x").unwrap();
    }
    let d = node(&fs, NodeId::ROOT, "d");
    let disp = Dispatcher::new(std::sync::Arc::new(fs));
    let mut out = vec![0u8; 64 * 1024];
    let serve = |req: &[u8], out: &mut [u8]| {
        let req = ringfs_protocol::request::parse(req).unwrap();
        block_on(disp.dispatch(&req, out))
    };
    let name_body = |name: &str| format!("{name}\0").into_bytes();
    let lookups: Vec<Vec<u8>> =
        (0..2 * n).map(|i| request_bytes(opcode::LOOKUP, 10, d.0, &name_body(&format!("f{i}")))).collect();
    // The kernel's own reference on every name, so that the measured LOOKUPs hit known nodes.
    let mut ids = Vec::new();
    for req in &lookups {
        assert_eq!(serve(req, &mut out), Outcome::Reply { error: 0, len: size_of::<FuseEntryOut>() });
        ids.push(u64::from_ne_bytes(out[0..8].try_into().unwrap()));
    }
    let forget_one = FuseForgetIn { nlookup: 1 };
    let forgets: Vec<Vec<u8>> =
        ids.iter().map(|&id| request_bytes(opcode::FORGET, 11, id, forget_one.as_bytes())).collect();
    let cached_lookup = allocs_per_call(n, |i| {
        assert_eq!(serve(&lookups[i], &mut out), Outcome::Reply { error: 0, len: size_of::<FuseEntryOut>() });
        assert_eq!(serve(&forgets[i], &mut out), Outcome::NoReply);
    });
    // LOOKUPs of names the kernel does not know: a new node each.
    for i in 0..2 * n {
        std::fs::write(dir.path().join(format!("d/c{i}")), b"x").unwrap();
    }
    let colds: Vec<Vec<u8>> =
        (0..2 * n).map(|i| request_bytes(opcode::LOOKUP, 16, d.0, &name_body(&format!("c{i}")))).collect();
    let mut cold_ids = Vec::with_capacity(2 * n);
    let cold_lookup = allocs_per_call(n, |i| {
        assert_eq!(serve(&colds[i], &mut out), Outcome::Reply { error: 0, len: size_of::<FuseEntryOut>() });
        cold_ids.push(u64::from_ne_bytes(out[0..8].try_into().unwrap()));
    });
    let getattr_in = FuseGetattrIn::default();
    let getattrs: Vec<Vec<u8>> =
        ids.iter().map(|&id| request_bytes(opcode::GETATTR, 12, id, getattr_in.as_bytes())).collect();
    let getattr = allocs_per_call(n, |i| {
        assert!(matches!(serve(&getattrs[i], &mut out), Outcome::Reply { error: 0, len } if len > 0));
    });
    let creates: Vec<Vec<u8>> = (0..2 * n)
        .map(|i| {
            let arg =
                FuseCreateIn { flags: libc::O_WRONLY as u32, mode: libc::S_IFREG | 0o644, umask: 0, open_flags: 0 };
            let mut body = arg.as_bytes().to_vec();
            body.extend_from_slice(&name_body(&format!("new{i}")));
            request_bytes(opcode::CREATE, 13, d.0, &body)
        })
        .collect();
    let mut made = Vec::with_capacity(2 * n);
    let create = allocs_per_call(n, |i| {
        let r = serve(&creates[i], &mut out);
        assert!(matches!(r, Outcome::Reply { error: 0, .. }), "{r:?}");
        let e = size_of::<FuseEntryOut>();
        made.push((
            u64::from_ne_bytes(out[0..8].try_into().unwrap()),
            u64::from_ne_bytes(out[e..e + 8].try_into().unwrap()),
        ));
    });
    let releases: Vec<Vec<u8>> = made
        .iter()
        .map(|&(id, fh)| request_bytes(opcode::RELEASE, 14, id, FuseReleaseIn { fh, ..Default::default() }.as_bytes()))
        .collect();
    let release = allocs_per_call(n, |i| {
        assert_eq!(serve(&releases[i], &mut out), Outcome::Reply { error: 0, len: 0 });
    });
    let last_forgets: Vec<Vec<u8>> =
        made.iter().map(|&(id, _)| request_bytes(opcode::FORGET, 15, id, forget_one.as_bytes())).collect();
    let last_forget = allocs_per_call(n, |i| {
        assert_eq!(serve(&last_forgets[i], &mut out), Outcome::NoReply);
    });
    let report = format!(
        "allocations per request through the dispatcher: cached lookup+forget {cached_lookup}, cold lookup \
         {cold_lookup}, getattr {getattr}, create {create}, release {release}, last forget {last_forget}"
    );
    eprintln!("{report}");
    assert_eq!(cached_lookup, 0.0, "{report}");
    assert_eq!(getattr, 0.0, "{report}");
    assert_eq!(release, 0.0, "{report}");
    // The new node's file handle; the open's handle and its descriptor's shared owner; now and
    // then a handle-table shard's growth (this test holds all its opens before releasing).
    assert!(create < 4.0, "{report}");
    assert!(last_forget <= 1.0, "{report}");
    // The new node's shared descriptor owner (its file handle waits until it is needed); now
    // and then a map's growth.
    assert!(cold_lookup < 1.5, "{report}");
    let _ = cold_ids;
}

#[test]
fn stack_paths() {
    assert_eq!(&*sys::fd_name(0), c"0");
    assert_eq!(&*sys::fd_name(1234567), c"1234567");
    assert_eq!(&*sys::proc_path(42), c"/proc/self/fd/42");
    assert_eq!(&*sys::proc_path(i32::MAX), c"/proc/self/fd/2147483647");
}

/// FORGET (the /dev/fuse reader) races with LOOKUPs of the same inode (the queues): lookup
/// counts are atomics under the table's shared lock, so none is lost, the node keeps its id
/// while referenced, and it goes at its last FORGET.
#[test]
fn concurrent_lookup_and_forget_keep_counts() {
    let (dir, fs) = setup();
    std::fs::write(dir.path().join("a"), b"x").unwrap();
    let fs = std::sync::Arc::new(fs);
    let k = 20_000u64;
    let id = node(&fs, NodeId::ROOT, "a");
    for _ in 1..k {
        assert_eq!(node(&fs, NodeId::ROOT, "a"), id);
    }
    let before = fs.inode_count();
    let looker = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            for _ in 0..k {
                assert_eq!(node(&fs, NodeId::ROOT, "a"), id);
            }
        })
    };
    let forgetter = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            for _ in 0..k {
                fs.forget(id, 1);
            }
        })
    };
    looker.join().unwrap();
    forgetter.join().unwrap();
    assert_eq!(fs.inodes.lookups(id.0), k);
    assert_eq!(fs.inode_count(), before);
    fs.forget(id, k);
    assert_eq!(fs.inodes.lookups(id.0), 0);
    assert_eq!(fs.inode_count(), before - 1);
}

/// Keys of one shard (same residue modulo the shard count) still spread over a map's buckets.
#[test]
fn fast_hasher_spreads_shard_keys() {
    use std::hash::BuildHasher;
    let h = IdHash::default();
    let buckets: HashSet<u64> = (0..1024u64).map(|k| h.hash_one(5 + 64 * k) & 2047).collect();
    assert!(buckets.len() > 600, "{} distinct buckets of 2048", buckets.len());
    let keys: HashSet<u64> = (0..1024u64).map(|k| h.hash_one((2049u64, k)) & 2047).collect();
    assert!(keys.len() > 600, "{} distinct buckets of 2048", keys.len());
}

#[test]
fn directory_xattr_by_descriptor_matches_the_proc_path() {
    // `get_dir` (getxattrat(fd, ".") where the kernel has it) must answer exactly as getxattr
    // on /proc/self/fd/N: values, size probes, ERANGE, ENODATA, on an O_PATH descriptor.
    let dir = tempfile::Builder::new().prefix("ringfs-xattr-dir").tempdir_in("/tmp").unwrap();
    let d = CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
    sys::xattr::set(&d, &c("user.k"), b"value", 0).unwrap();
    let fd = sys::openat(rustix::fs::CWD, &d, libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC, 0).unwrap();
    let fd = fd.as_raw_fd();
    let by_path = |name: &CStr, buf: &mut [u8]| sys::xattr::get(&sys::proc_path(fd), name, buf);
    for name in [c("user.k"), c("user.missing"), c("system.posix_acl_default")] {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        assert_eq!(sys::xattr::get_dir(fd, &name, &mut []), by_path(&name, &mut []));
        assert_eq!(sys::xattr::get_dir(fd, &name, &mut a), by_path(&name, &mut b));
        assert_eq!(a, b);
        assert_eq!(sys::xattr::get_dir(fd, &name, &mut a[..2]), by_path(&name, &mut b[..2]));
    }
    assert_eq!(sys::xattr::get_dir(fd, &c("user.k"), &mut [0u8; 16]), Ok(5));
    assert_eq!(sys::xattr::get_dir(fd, &c("user.k"), &mut [0u8; 2]), Err(Errno::ERANGE));
    assert_eq!(sys::xattr::get_dir(fd, &c("user.missing"), &mut []), Err(Errno::ENODATA));
}

/// Zero-message opendir: OPENDIR answers ENOSYS, and listings with fh 0 read through parked
/// streams: each chunk continues where the last one stopped (no entry lost or repeated, also
/// with two listings interleaved and one restarted from an earlier cookie), the final empty
/// chunk closes the stream, and the parked descriptors stay bounded.
#[test]
fn zero_message_opendir_lists_through_parked_streams() {
    let (dir, fs) = setup_with(|c| c.zero_message_opendir = true);
    let mut conn = conn_info();
    conn.no_opendir_support = true;
    fs.init(&mut conn).unwrap();
    for d in ["a", "b"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
        for i in 0..40 {
            std::fs::write(dir.path().join(format!("{d}/f{i:02}")), b"").unwrap();
        }
    }
    let (a, b) = (node(&fs, NodeId::ROOT, "a"), node(&fs, NodeId::ROOT, "b"));
    assert_eq!(block_on(fs.opendir(&ROOT, a, 0)).unwrap_err(), Errno::ENOSYS);
    // One chunk of about three entries of `node` from `off`: (entries, next cookie).
    let chunk = |node: NodeId, off: u64| {
        let mut buf = vec![0u8; 3 * direntplus_size(3) + 8];
        let mut db = DirPlusBuffer::new(&mut buf);
        block_on(fs.readdirplus(&ROOT, node, FileHandle(0), off, &mut db)).unwrap();
        let n = db.len();
        let v = parse_direntplus(&buf[..n]);
        let next = v.last().map_or(off, |e| e.1);
        (v.into_iter().map(|e| e.2).collect::<Vec<_>>(), next)
    };
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    let (mut oa, mut ob) = (0, 0);
    let mut restart = None;
    loop {
        let (ea, na) = chunk(a, oa);
        let (eb, nb) = chunk(b, ob);
        if la.len() > 20 && restart.is_none() {
            restart = Some((oa, ea.clone()));
        }
        if ea.is_empty() && eb.is_empty() {
            break;
        }
        la.extend(ea);
        lb.extend(eb);
        (oa, ob) = (na, nb);
    }
    for l in [&mut la, &mut lb] {
        l.sort();
        let want: Vec<Vec<u8>> = [b".".to_vec(), b"..".to_vec()]
            .into_iter()
            .chain((0..40).map(|i| format!("f{i:02}").into_bytes()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(*l, want);
    }
    // Both listings ended: their streams are closed.
    assert_eq!(fs.parked.len(), 0);
    // Restarting from an earlier cookie (no parked stream there) reads the same entries.
    let (off, want) = restart.unwrap();
    assert_eq!(chunk(a, off).0, want);
    // Many listings left unfinished: the parked streams stay bounded.
    for _ in 0..100 {
        chunk(a, 0);
    }
    // One node: one shard.
    assert!(fs.parked.len() <= 8, "{} parked streams", fs.parked.len());
}
