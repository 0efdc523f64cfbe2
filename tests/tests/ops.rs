//! File-system operations through a real ringfs mount, checked against the backing directory.
//!
//! Every test mounts its own fresh backing directory (so the tests can run in parallel), does
//! something through the mount with the plain syscalls an application would use, and checks the
//! result both through the mount and directly in the backing directory.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tests::{as_user, cstr, pattern, run_as, setup, sys, try_sys, Mount, NOBODY_GID, NOBODY_UID};

macro_rules! mount {
    ($name:expr) => {
        mount!($name, &[])
    };
    ($name:expr, $opts:expr) => {
        match setup($name, $opts) {
            Some(m) => m,
            None => return,
        }
    };
}

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn write_file(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

fn read_file(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn err_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().expect("an OS error"),
    }
}

/// The process umask, read without changing it.
fn umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).expect("Umask in /proc/self/status");
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
}

fn statx(p: &Path, mask: u32) -> libc::statx {
    let c = cstr(p);
    // SAFETY: all-zero is a valid statx buffer.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and buffer.
    sys(unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), libc::AT_SYMLINK_NOFOLLOW, mask, &mut stx) }, "statx");
    stx
}

fn utimens(p: &Path, atime: libc::timespec, mtime: libc::timespec) -> Result<i32, i32> {
    let c = cstr(p);
    let ts = [atime, mtime];
    // SAFETY: valid path and two timespecs.
    try_sys(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) })
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec { tv_sec: sec, tv_nsec: nsec }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn lookup_and_stat_match_backing() {
    let m = mount!("ops::lookup_and_stat_match_backing");
    write_file(&m.backing("file"), b"hello world");
    fs::create_dir(m.backing("dir")).unwrap();
    write_file(&m.backing("dir/inner"), b"x");
    std::os::unix::fs::symlink("file", m.backing("link")).unwrap();
    fs::set_permissions(m.backing("file"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.backing("file"), Some(1234), Some(5678)).unwrap();

    for name in ["file", "dir", "dir/inner", "link"] {
        let b = lstat(&m.backing(name));
        let v = lstat(&m.path(name));
        assert_eq!(v.mode(), b.mode(), "{name}: mode");
        assert_eq!(v.uid(), b.uid(), "{name}: uid");
        assert_eq!(v.gid(), b.gid(), "{name}: gid");
        assert_eq!(v.nlink(), b.nlink(), "{name}: nlink");
        assert_eq!(v.mtime(), b.mtime(), "{name}: mtime");
        assert_eq!(v.mtime_nsec(), b.mtime_nsec(), "{name}: mtime_nsec");
        assert_eq!(v.ctime(), b.ctime(), "{name}: ctime");
        if !b.is_dir() {
            assert_eq!(v.size(), b.size(), "{name}: size");
        }
        assert_eq!(v.dev(), m.dev(), "{name}: st_dev is the mount's");
        // The same name gives the same inode number on a second lookup.
        assert_eq!(lstat(&m.path(name)).ino(), v.ino(), "{name}: stable inode number");
    }
    assert_eq!(read_file(&m.path("link")), b"hello world");
    assert_eq!(err_of(fs::metadata(m.path("missing"))), libc::ENOENT);
    assert_eq!(err_of(fs::metadata(m.path("file/x"))), libc::ENOTDIR);
    // Names the backing directory gains later are found too.
    write_file(&m.backing("later"), b"12345");
    assert_eq!(lstat(&m.path("later")).size(), 5);
}

#[test]
fn statx_reports_btime() {
    let m = mount!("ops::statx_reports_btime");
    write_file(&m.backing("f"), b"data");
    let mask = libc::STATX_BASIC_STATS | libc::STATX_BTIME;
    let b = statx(&m.backing("f"), mask);
    let v = statx(&m.path("f"), mask);
    assert_eq!(v.stx_mask & libc::STATX_BASIC_STATS, libc::STATX_BASIC_STATS, "basic stats through the mount");
    assert_eq!(v.stx_size, b.stx_size);
    assert_eq!(v.stx_mode, b.stx_mode);
    assert_eq!(v.stx_mtime.tv_sec, b.stx_mtime.tv_sec);
    assert_eq!(v.stx_mtime.tv_nsec, b.stx_mtime.tv_nsec);
    if b.stx_mask & libc::STATX_BTIME != 0 && kernel_at_least(6, 6) {
        assert!(
            v.stx_mask & libc::STATX_BTIME != 0,
            "the backing file system reports a birth time but the mount does not (stx_mask {:#x})",
            v.stx_mask
        );
        assert_eq!((v.stx_btime.tv_sec, v.stx_btime.tv_nsec), (b.stx_btime.tv_sec, b.stx_btime.tv_nsec));
    } else {
        // FUSE_STATX (protocol 7.39) came with Linux 6.6: before it a FUSE mount has no birth
        // time to give, and must not make one up.
        assert_eq!(v.stx_mask & libc::STATX_BTIME, 0, "a birth time the kernel cannot have asked for");
    }
}

/// True when the running kernel's version is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

#[test]
fn chmod_chown_truncate() {
    let m = mount!("ops::chmod_chown_truncate");
    write_file(&m.backing("f"), &pattern(5000, 1));
    let before = lstat(&m.backing("f"));

    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o4751)).unwrap();
    assert_eq!(lstat(&m.backing("f")).mode() & 0o7777, 0o4751);
    assert_eq!(lstat(&m.path("f")).mode() & 0o7777, 0o4751);

    std::os::unix::fs::chown(m.path("f"), Some(1234), Some(5678)).unwrap();
    let b = lstat(&m.backing("f"));
    assert_eq!((b.uid(), b.gid()), (1234, 5678));
    let v = lstat(&m.path("f"));
    assert_eq!((v.uid(), v.gid()), (1234, 5678));
    // chown of a set-uid regular file clears set-uid (root too: no CAP_FSETID exemption on chown).
    assert_eq!(b.mode() & 0o4000, 0, "chown must clear S_ISUID (mode {:o})", b.mode());
    assert_eq!(v.mode() & 0o4000, 0);
    assert!(
        (b.ctime(), b.ctime_nsec()) >= (before.ctime(), before.ctime_nsec()),
        "ctime must not go backwards after chmod/chown"
    );

    OpenOptions::new().write(true).open(m.path("f")).unwrap().set_len(10).unwrap();
    assert_eq!(lstat(&m.backing("f")).len(), 10);
    assert_eq!(read_file(&m.backing("f")), pattern(5000, 1)[..10]);
    // truncate(2) by path, growing.
    let c = cstr(m.path("f"));
    // SAFETY: valid path.
    sys(unsafe { libc::truncate(c.as_ptr(), 100_000) }, "truncate");
    assert_eq!(lstat(&m.backing("f")).len(), 100_000);
    assert_eq!(lstat(&m.path("f")).len(), 100_000);
    let data = read_file(&m.path("f"));
    assert!(data[10..].iter().all(|&b| b == 0), "grown part reads as zeros");
}

/// (ctime sec, nsec) of `p`, without following a symlink.
fn ctime_of(p: &Path) -> (i64, i64) {
    let md = lstat(p);
    (md.ctime(), md.ctime_nsec())
}

/// Waits until the kernel's coarse clock (what file timestamps come from) is past `t`, so that
/// a change made now gets a later timestamp.
fn wait_clock_past(t: (i64, i64)) {
    let past = tests::wait_until(Duration::from_secs(2), || {
        let mut now = ts(0, 0);
        // SAFETY: valid out pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) };
        (now.tv_sec, now.tv_nsec) > t
    });
    assert!(past, "the clock did not pass {t:?}");
}

#[test]
fn chown_to_same_owner_updates_ctime_like_ext4() {
    let m = mount!("ops::chown_to_same_owner_updates_ctime_like_ext4");
    // chown(f, -1, -1), fchown(fd, -1, -1) and the same on a directory, natively in the backing
    // (ext4) directory and through the mount: ext4 updates ctime, so must the mount.
    write_file(&m.backing("native"), b"n");
    write_file(&m.backing("f"), b"f");
    fs::create_dir(m.backing("native-dir")).unwrap();
    fs::create_dir(m.backing("d")).unwrap();
    let chown_keep = |p: &Path| {
        let c = cstr(p);
        // SAFETY: valid path; -1 keeps owner and group.
        sys(unsafe { libc::chown(c.as_ptr(), u32::MAX, u32::MAX) }, "chown(-1, -1)");
    };
    let fchown_keep = |p: &Path| {
        let f = File::open(p).unwrap();
        // SAFETY: open descriptor; -1 keeps owner and group.
        sys(unsafe { libc::fchown(f.as_raw_fd(), u32::MAX, u32::MAX) }, "fchown(-1, -1)");
    };
    for (what, op) in [("chown", &chown_keep as &dyn Fn(&Path)), ("fchown", &fchown_keep)] {
        for (native, through) in [(m.backing("native"), m.path("f")), (m.backing("native-dir"), m.path("d"))] {
            let before = ctime_of(&native);
            wait_clock_past(before);
            op(&native);
            let native_changed = ctime_of(&native) > before;

            let before = ctime_of(&through);
            assert_eq!(before, ctime_of(&m.backing(through.file_name().unwrap())));
            wait_clock_past(before);
            op(&through);
            let after = ctime_of(&through);
            let backing = ctime_of(&m.backing(through.file_name().unwrap()));
            assert_eq!(
                after > before,
                native_changed,
                "{what}(-1, -1) on {}: ctime {before:?} -> {after:?} through the mount; ext4 {} it",
                through.display(),
                if native_changed { "updates" } else { "keeps" }
            );
            assert_eq!(after, backing, "{what}: the mount shows the backing file's ctime");
        }
    }
}

#[test]
fn utimensat_explicit_now_omit() {
    let m = mount!("ops::utimensat_explicit_now_omit");
    write_file(&m.backing("f"), b"t");
    utimens(&m.path("f"), ts(1_000_000_000, 123_456_789), ts(1_100_000_000, 987_654_321)).unwrap();
    for p in [m.backing("f"), m.path("f")] {
        let md = lstat(&p);
        assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789), "{}", p.display());
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_100_000_000, 987_654_321), "{}", p.display());
    }
    let t0 = now_secs();
    utimens(&m.path("f"), ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_NOW)).unwrap();
    let t1 = now_secs();
    for p in [m.backing("f"), m.path("f")] {
        let md = lstat(&p);
        assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789), "UTIME_OMIT kept atime");
        assert!(md.mtime() >= t0 && md.mtime() <= t1, "UTIME_NOW set mtime to now: {} not in {t0}..={t1}", md.mtime());
    }
    utimens(&m.path("f"), ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_OMIT)).unwrap();
    let md = lstat(&m.backing("f"));
    assert!(md.atime() >= t0, "UTIME_NOW set atime");
    // Timestamps before the epoch and far in the future survive the round trip.
    utimens(&m.path("f"), ts(-1000, 5), ts(4_000_000_000, 6)).unwrap();
    let md = lstat(&m.backing("f"));
    assert_eq!((md.atime(), md.atime_nsec(), md.mtime(), md.mtime_nsec()), (-1000, 5, 4_000_000_000, 6));
}

#[test]
fn symlink_and_readlink() {
    let m = mount!("ops::symlink_and_readlink");
    let long_target = "d/".repeat(500) + "end";
    std::os::unix::fs::symlink("target/name", m.path("s1")).unwrap();
    std::os::unix::fs::symlink(&long_target, m.path("s2")).unwrap();
    assert_eq!(fs::read_link(m.backing("s1")).unwrap(), Path::new("target/name"));
    assert_eq!(fs::read_link(m.backing("s2")).unwrap(), Path::new(&long_target));
    assert_eq!(fs::read_link(m.path("s2")).unwrap(), Path::new(&long_target));
    assert!(lstat(&m.path("s1")).file_type().is_symlink());
    assert_eq!(lstat(&m.path("s1")).len(), "target/name".len() as u64);
    std::os::unix::fs::symlink("/abs/olute", m.backing("s3")).unwrap();
    assert_eq!(fs::read_link(m.path("s3")).unwrap(), Path::new("/abs/olute"));
    assert_eq!(err_of(std::os::unix::fs::symlink("x", m.path("s1"))), libc::EEXIST);
    write_file(&m.backing("plain"), b"");
    assert_eq!(err_of(fs::read_link(m.path("plain"))), libc::EINVAL);
    // A dangling link through the mount.
    assert_eq!(err_of(fs::metadata(m.path("s1"))), libc::ENOENT);
}

#[test]
fn mknod_fifo_and_char_device() {
    let m = mount!("ops::mknod_fifo_and_char_device");
    let fifo = cstr(m.path("fifo"));
    // SAFETY: valid path.
    sys(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, "mkfifo");
    let b = lstat(&m.backing("fifo"));
    assert!(b.file_type().is_fifo(), "backing fifo");
    assert_eq!(b.mode() & 0o7777, 0o640 & !umask());
    assert!(lstat(&m.path("fifo")).file_type().is_fifo());

    let dev = libc::makedev(1, 3);
    let chr = cstr(m.path("null"));
    // SAFETY: valid path.
    sys(unsafe { libc::mknod(chr.as_ptr(), libc::S_IFCHR | 0o666, dev) }, "mknod S_IFCHR");
    let b = lstat(&m.backing("null"));
    assert!(b.file_type().is_char_device());
    assert_eq!(b.rdev(), dev);
    let v = lstat(&m.path("null"));
    assert!(v.file_type().is_char_device());
    assert_eq!(v.rdev(), dev);

    // A unix socket node.
    let sock = cstr(m.path("sock"));
    // SAFETY: valid path.
    sys(unsafe { libc::mknod(sock.as_ptr(), libc::S_IFSOCK | 0o600, 0) }, "mknod S_IFSOCK");
    assert!(lstat(&m.backing("sock")).file_type().is_socket());
    assert_eq!(err_of(OpenOptions::new().read(true).open(m.path("sock"))), libc::ENXIO);
}

#[test]
fn mkdir_rmdir() {
    let m = mount!("ops::mkdir_rmdir");
    fs::create_dir(m.path("d")).unwrap();
    let b = lstat(&m.backing("d"));
    assert!(b.is_dir());
    assert_eq!(b.mode() & 0o7777, 0o777 & !umask());
    fs::DirBuilder::new().mode(0o700).create(m.path("d/sub")).unwrap();
    assert_eq!(lstat(&m.backing("d/sub")).mode() & 0o7777, 0o700 & !umask());
    assert_eq!(lstat(&m.path("d")).nlink(), 3, "a directory with one subdirectory has 3 links");
    assert_eq!(err_of(fs::create_dir(m.path("d"))), libc::EEXIST);
    assert_eq!(err_of(fs::remove_dir(m.path("d"))), libc::ENOTEMPTY);
    write_file(&m.path("f"), b"");
    assert_eq!(err_of(fs::remove_dir(m.path("f"))), libc::ENOTDIR);
    fs::remove_dir(m.path("d/sub")).unwrap();
    assert!(!m.backing("d/sub").exists());
    fs::remove_dir(m.path("d")).unwrap();
    assert!(!m.backing("d").exists());
    assert_eq!(err_of(fs::metadata(m.path("d"))), libc::ENOENT);
    assert_eq!(err_of(fs::remove_dir(m.path("d"))), libc::ENOENT);
}

#[test]
fn unlink_files() {
    let m = mount!("ops::unlink_files");
    write_file(&m.path("f"), b"still here");
    let mut f = File::open(m.path("f")).unwrap();
    fs::remove_file(m.path("f")).unwrap();
    assert!(!m.backing("f").exists(), "unlinked in the backing directory");
    assert_eq!(err_of(fs::metadata(m.path("f"))), libc::ENOENT);
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here", "an open file stays readable after unlink");
    fs::create_dir(m.path("d")).unwrap();
    assert_eq!(err_of(fs::remove_file(m.path("d"))), libc::EISDIR);
    assert_eq!(err_of(fs::remove_file(m.path("nope"))), libc::ENOENT);
    // Unlinking a name created in the backing directory behind the mount's back.
    write_file(&m.backing("g"), b"");
    fs::remove_file(m.path("g")).unwrap();
    assert!(!m.backing("g").exists());
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> Result<i32, i32> {
    let (a, b) = (cstr(from), cstr(to));
    // SAFETY: valid paths.
    try_sys(unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) })
}

#[test]
fn rename_and_renameat2() {
    let m = mount!("ops::rename_and_renameat2");
    write_file(&m.path("a"), b"A");
    write_file(&m.path("b"), b"B");
    fs::create_dir(m.path("d")).unwrap();
    fs::create_dir(m.path("e")).unwrap();

    fs::rename(m.path("a"), m.path("d/a2")).unwrap();
    assert!(!m.backing("a").exists());
    assert_eq!(read_file(&m.backing("d/a2")), b"A");
    assert_eq!(read_file(&m.path("d/a2")), b"A");

    // Plain rename replaces.
    write_file(&m.path("c"), b"C");
    fs::rename(m.path("c"), m.path("b")).unwrap();
    assert_eq!(read_file(&m.backing("b")), b"C");
    assert!(!m.backing("c").exists());

    // RENAME_NOREPLACE.
    assert_eq!(renameat2(&m.path("d/a2"), &m.path("b"), libc::RENAME_NOREPLACE), Err(libc::EEXIST));
    assert_eq!(read_file(&m.backing("b")), b"C");
    renameat2(&m.path("d/a2"), &m.path("fresh"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(read_file(&m.backing("fresh")), b"A");

    // RENAME_EXCHANGE of two files, then of a file and a directory.
    renameat2(&m.path("fresh"), &m.path("b"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(read_file(&m.backing("fresh")), b"C");
    assert_eq!(read_file(&m.backing("b")), b"A");
    assert_eq!(read_file(&m.path("fresh")), b"C");
    assert_eq!(read_file(&m.path("b")), b"A");
    write_file(&m.path("e/inside"), b"in e");
    renameat2(&m.path("b"), &m.path("e"), libc::RENAME_EXCHANGE).unwrap();
    assert!(lstat(&m.backing("b")).is_dir());
    assert_eq!(read_file(&m.backing("b/inside")), b"in e");
    assert_eq!(read_file(&m.path("b/inside")), b"in e");
    assert_eq!(read_file(&m.path("e")), b"A");
    assert_eq!(renameat2(&m.path("nope"), &m.path("e"), libc::RENAME_EXCHANGE), Err(libc::ENOENT));

    // Directory rename across directories; the old path is gone, the subtree moved.
    fs::rename(m.path("b"), m.path("d/moved")).unwrap();
    assert_eq!(read_file(&m.backing("d/moved/inside")), b"in e");
    assert_eq!(read_file(&m.path("d/moved/inside")), b"in e");
    assert_eq!(err_of(fs::metadata(m.path("b/inside"))), libc::ENOENT);
    // Errors.
    fs::create_dir(m.path("full")).unwrap();
    write_file(&m.path("full/x"), b"");
    assert_eq!(err_of(fs::rename(m.path("d"), m.path("full"))), libc::ENOTEMPTY);
    assert_eq!(err_of(fs::rename(m.path("d"), m.path("d/moved/below"))), libc::EINVAL);
    assert_eq!(err_of(fs::rename(m.path("e"), m.path("d"))), libc::EISDIR);
}

#[test]
fn hard_links() {
    let m = mount!("ops::hard_links");
    write_file(&m.path("one"), b"shared");
    fs::hard_link(m.path("one"), m.path("two")).unwrap();
    assert_eq!(lstat(&m.backing("one")).ino(), lstat(&m.backing("two")).ino());
    assert_eq!(lstat(&m.backing("one")).nlink(), 2);
    let (a, b) = (lstat(&m.path("one")), lstat(&m.path("two")));
    assert_eq!(a.ino(), b.ino(), "both names are one inode through the mount");
    assert_eq!(a.nlink(), 2);
    OpenOptions::new().append(true).open(m.path("two")).unwrap().write_all(b"+more").unwrap();
    assert_eq!(read_file(&m.path("one")), b"shared+more");
    fs::remove_file(m.path("one")).unwrap();
    assert_eq!(lstat(&m.path("two")).nlink(), 1);
    assert_eq!(err_of(fs::hard_link(m.path("two"), m.path("two"))), libc::EEXIST);
    fs::create_dir(m.path("d")).unwrap();
    assert_eq!(err_of(fs::hard_link(m.path("d"), m.path("d2"))), libc::EPERM);
}

/// A program that is running is text-busy: opening it to truncate fails with ETXTBSY and
/// leaves it whole. `open(O_RDONLY|O_TRUNC)` is the case the kernel does not refuse before
/// asking the server (no write access is taken for O_RDONLY), so a server that truncated inside
/// OPEN (FUSE_ATOMIC_O_TRUNC) emptied the binary before the kernel's ETXTBSY check, and the
/// running program died at its next page fault (pjdfstest's `open::etxtbsy`, intermittently).
fn running_executable_is_not_truncated(opts: &[&str]) {
    let m = mount!("ops::running_executable_is_not_truncated", opts);
    let sleep = fs::read("/bin/sleep").expect("read /bin/sleep");
    for round in 0..3 {
        let exe = m.path(format!("sleep{round}"));
        // Written through the mount and executed right away, as pjdfstest does.
        std::io::copy(&mut File::open("/bin/sleep").unwrap(), &mut File::create(&exe).unwrap()).unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        // Another test thread's fork may briefly hold a copy of our (close-on-exec) write
        // descriptor until its exec: the classic ETXTBSY race of threaded programs. Retry it.
        let mut tries = 0;
        let mut child = loop {
            match Command::new(&exe).arg("30").spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r.expect("run the copied sleep"),
            }
        };
        for (what, flags) in [
            ("O_WRONLY", libc::O_WRONLY),
            ("O_RDWR", libc::O_RDWR),
            ("O_RDONLY|O_TRUNC", libc::O_RDONLY | libc::O_TRUNC),
            ("O_WRONLY|O_TRUNC", libc::O_WRONLY | libc::O_TRUNC),
        ] {
            // SAFETY: plain open of a NUL-terminated path; closed below if it succeeds.
            let fd = unsafe { libc::open(cstr(&exe).as_ptr(), flags | libc::O_CLOEXEC) };
            let e = tests::errno();
            if fd >= 0 {
                // SAFETY: the descriptor we just opened.
                unsafe { libc::close(fd) };
            }
            assert_eq!((fd, e), (-1, libc::ETXTBSY), "{what} of a running executable");
        }
        assert_eq!(lstat(&m.backing(format!("sleep{round}"))).len(), sleep.len() as u64, "the backing file is whole");
        assert_eq!(lstat(&exe).len(), sleep.len() as u64);
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.try_wait().unwrap().is_none(), "the program is still running (round {round})");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(fs::read(&exe).unwrap(), sleep, "content intact after the program ended");
    }
    // Once nothing runs it, a truncating open works as usual.
    let exe = m.path("sleep0");
    OpenOptions::new().read(true).custom_flags(libc::O_TRUNC).open(&exe).unwrap();
    assert_eq!(lstat(&m.backing("sleep0")).len(), 0, "O_RDONLY|O_TRUNC truncates a file nobody runs");
    assert_eq!(lstat(&exe).len(), 0);
}

#[test]
fn running_executable_is_not_truncated_passthrough() {
    running_executable_is_not_truncated(&[]);
}

#[test]
fn running_executable_is_not_truncated_served() {
    running_executable_is_not_truncated(&["passthrough=false"]);
}

#[test]
fn open_create_excl_trunc_append() {
    let m = mount!("ops::open_create_excl_trunc_append");
    let f = OpenOptions::new().write(true).create_new(true).mode(0o640).open(m.path("new")).unwrap();
    drop(f);
    let b = lstat(&m.backing("new"));
    assert!(b.is_file());
    assert_eq!(b.mode() & 0o777, 0o640 & !umask());
    assert_eq!(err_of(OpenOptions::new().write(true).create_new(true).open(m.path("new"))), libc::EEXIST);

    write_file(&m.backing("full"), &pattern(10_000, 2));
    OpenOptions::new().write(true).truncate(true).open(m.path("full")).unwrap();
    assert_eq!(lstat(&m.backing("full")).len(), 0, "O_TRUNC empties the backing file");
    assert_eq!(lstat(&m.path("full")).len(), 0);

    write_file(&m.path("log"), b"first\n");
    let mut f = OpenOptions::new().append(true).open(m.path("log")).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"second\n").unwrap();
    // pwrite on O_APPEND also appends on Linux.
    f.write_at(b"third\n", 0).unwrap();
    drop(f);
    assert_eq!(read_file(&m.backing("log")), b"first\nsecond\nthird\n");

    // O_CREAT without O_EXCL opens an existing file without truncating it.
    OpenOptions::new().write(true).create(true).truncate(false).open(m.path("log")).unwrap();
    assert_eq!(lstat(&m.backing("log")).len(), 19);
    assert_eq!(err_of(File::open(m.path("missing"))), libc::ENOENT);
    // Opening a directory for writing.
    fs::create_dir(m.path("d")).unwrap();
    assert_eq!(err_of(OpenOptions::new().write(true).open(m.path("d"))), libc::EISDIR);
}

/// A heap buffer with the given alignment (for O_DIRECT).
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize, align: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, align).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr owns layout.size() initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[test]
fn o_direct_aligned_io() {
    let m = mount!("ops::o_direct_aligned_io");
    let len = 64 * 1024;
    let data = pattern(len, 3);
    let mut buf = Aligned::new(len, 4096);
    buf.as_mut().copy_from_slice(&data);
    let f = OpenOptions::new().read(true).write(true).create(true).custom_flags(libc::O_DIRECT).open(m.path("d"));
    let f = f.unwrap();
    f.write_all_at(buf.as_mut(), 4096).unwrap();
    f.sync_all().unwrap();
    let back = read_file(&m.backing("d"));
    assert_eq!(back.len(), 4096 + len);
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..], &data[..]);
    let mut rbuf = Aligned::new(len, 4096);
    let n = f.read_at(rbuf.as_mut(), 4096).unwrap();
    assert_eq!(n, len);
    assert_eq!(rbuf.as_mut(), &data[..]);
}

#[test]
fn o_tmpfile_then_linkat() {
    let m = mount!("ops::o_tmpfile_then_linkat");
    fs::create_dir(m.path("d")).unwrap();
    let dir = cstr(m.path("d"));
    // SAFETY: valid path.
    let fd = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600) };
    assert!(fd >= 0, "open(O_TMPFILE) through the mount: {}", std::io::Error::last_os_error());
    // SAFETY: fd is ours.
    let f: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    f.write_all_at(b"anonymous", 0).unwrap();
    // (fsync: with -o writeback_cache the data may still be only in the page cache.)
    f.sync_all().unwrap();
    assert_eq!(fs::read_dir(m.backing("d")).unwrap().count(), 0, "an O_TMPFILE file has no name");
    assert_eq!(fs::read_dir(m.path("d")).unwrap().count(), 0);
    let name = cstr(m.path("d/named"));
    let empty = CString::new("").unwrap();
    // SAFETY: valid fd and paths.
    sys(
        unsafe { libc::linkat(f.as_raw_fd(), empty.as_ptr(), libc::AT_FDCWD, name.as_ptr(), libc::AT_EMPTY_PATH) },
        "linkat(AT_EMPTY_PATH)",
    );
    assert_eq!(read_file(&m.backing("d/named")), b"anonymous");
    assert_eq!(read_file(&m.path("d/named")), b"anonymous");
    assert_eq!(lstat(&m.backing("d/named")).mode() & 0o777, 0o600 & !umask());

    // The /proc/self/fd way (no CAP_DAC_READ_SEARCH needed).
    // SAFETY: valid path.
    let fd2 = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC, 0o644) };
    assert!(fd2 >= 0, "second open(O_TMPFILE): {}", std::io::Error::last_os_error());
    // SAFETY: fd2 is ours.
    let f2: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd2) };
    f2.write_all_at(b"via proc", 0).unwrap();
    f2.sync_all().unwrap();
    let proc = cstr(format!("/proc/self/fd/{fd2}"));
    let name2 = cstr(m.path("d/named2"));
    // SAFETY: valid paths.
    sys(
        unsafe { libc::linkat(libc::AT_FDCWD, proc.as_ptr(), libc::AT_FDCWD, name2.as_ptr(), libc::AT_SYMLINK_FOLLOW) },
        "linkat(/proc/self/fd)",
    );
    assert_eq!(read_file(&m.backing("d/named2")), b"via proc");
}

#[test]
fn read_write_pread_pwrite() {
    let m = mount!("ops::read_write_pread_pwrite");
    // Small writes.
    write_file(&m.path("one"), b"1");
    assert_eq!(read_file(&m.backing("one")), b"1");
    write_file(&m.path("hundred"), &pattern(100, 4));
    assert_eq!(read_file(&m.backing("hundred")), pattern(100, 4));
    // Large: 8 MiB plus an odd tail, written in one call and in uneven chunks.
    let big = pattern(8 * 1024 * 1024 + 123, 5);
    write_file(&m.path("big"), &big);
    assert!(read_file(&m.backing("big")) == big, "8 MiB written through the mount differs in the backing file");
    assert!(read_file(&m.path("big")) == big, "8 MiB read back through the mount differs");
    let mut f = File::create(m.path("chunks")).unwrap();
    for chunk in big.chunks(77_777) {
        f.write_all(chunk).unwrap();
    }
    drop(f);
    assert!(read_file(&m.backing("chunks")) == big);
    // Data written in the backing directory is read through the mount.
    let other = pattern(3 * 1024 * 1024 + 5, 6);
    write_file(&m.backing("from_backing"), &other);
    assert!(read_file(&m.path("from_backing")) == other);

    // pwrite/pread at unaligned offsets and beyond EOF (leaving a hole).
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path("p")).unwrap();
    f.write_all_at(b"abcdef", 0).unwrap();
    f.write_all_at(b"XY", 3).unwrap();
    f.write_all_at(b"tail", 1_000_003).unwrap();
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"abcXYf");
    f.sync_all().unwrap();
    let back = read_file(&m.backing("p"));
    assert_eq!(back.len(), 1_000_007);
    assert_eq!(&back[..6], b"abcXYf");
    assert!(back[6..1_000_003].iter().all(|&b| b == 0));
    assert_eq!(&back[1_000_003..], b"tail");
    let mut big_buf = vec![0u8; 100];
    assert_eq!(f.read_at(&mut big_buf, 1_000_005).unwrap(), 2, "short read at the end");
    assert_eq!(f.read_at(&mut big_buf, 1_000_007).unwrap(), 0, "read at EOF returns 0");
    assert_eq!(f.read_at(&mut big_buf, 5_000_000).unwrap(), 0, "read past EOF returns 0");
    // A size change made in the backing directory shows through the mount (with the writeback
    // cache the kernel keeps its own size for a cached file).
    if !tests::writeback_cache_forced() {
        OpenOptions::new().write(true).open(m.backing("p")).unwrap().set_len(3).unwrap();
        assert!(tests::wait_until(Duration::from_secs(5), || lstat(&m.path("p")).len() == 3));
    }
}

#[test]
fn fsync_and_fdatasync() {
    let m = mount!("ops::fsync_and_fdatasync");
    let mut f = File::create(m.path("f")).unwrap();
    f.write_all(&pattern(100_000, 7)).unwrap();
    // SAFETY: valid fd.
    sys(unsafe { libc::fsync(f.as_raw_fd()) }, "fsync");
    // SAFETY: valid fd.
    sys(unsafe { libc::fdatasync(f.as_raw_fd()) }, "fdatasync");
    assert_eq!(read_file(&m.backing("f")), pattern(100_000, 7));
    fs::create_dir(m.path("d")).unwrap();
    let d = File::open(m.path("d")).unwrap();
    // SAFETY: valid fd.
    sys(unsafe { libc::fsync(d.as_raw_fd()) }, "fsync(directory)");
    // SAFETY: valid fd.
    sys(unsafe { libc::syncfs(f.as_raw_fd()) }, "syncfs");
}

/// Names read with opendir/readdir (including "." and ".."), and the telldir position after
/// each entry.
fn readdir_all(dir: *mut libc::DIR) -> Vec<(String, libc::c_long)> {
    let mut out = Vec::new();
    loop {
        // SAFETY: dir is an open stream.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) }.to_string_lossy().into_owned();
        // SAFETY: dir is an open stream.
        let pos = unsafe { libc::telldir(dir) };
        out.push((name, pos));
    }
    out
}

#[test]
fn readdir_1000_entries_and_seekdir() {
    let m = mount!("ops::readdir_1000_entries_and_seekdir");
    fs::create_dir(m.backing("d")).unwrap();
    for i in 0..900 {
        write_file(&m.backing(format!("d/backing-{i:04}-{}", "x".repeat(i % 60))), b"");
    }
    for i in 0..100 {
        write_file(&m.path(format!("d/mount-{i}")), b"");
    }
    let mut expected: Vec<String> =
        fs::read_dir(m.backing("d")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    expected.sort();
    assert_eq!(expected.len(), 1000);

    let c = cstr(m.path("d"));
    // SAFETY: valid path.
    let dir = unsafe { libc::opendir(c.as_ptr()) };
    assert!(!dir.is_null(), "opendir: {}", std::io::Error::last_os_error());
    let all = readdir_all(dir);
    let mut names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    let len_with_dups = names.len();
    names.dedup();
    assert_eq!(len_with_dups, names.len(), "readdir returned duplicate names");
    assert!(names.contains(&".".to_string()) && names.contains(&"..".to_string()), "'.' and '..' listed");
    names.retain(|n| n != "." && n != "..");
    assert_eq!(names, expected, "names through the mount equal the backing directory's");

    // seekdir back to the middle and read the rest again: the same sequence.
    let mid = all.len() / 2;
    let (_, pos) = all[mid - 1];
    // SAFETY: dir is open; pos came from telldir on it.
    unsafe { libc::seekdir(dir, pos) };
    let again = readdir_all(dir);
    let rest: Vec<&String> = all[mid..].iter().map(|(n, _)| n).collect();
    let again_names: Vec<&String> = again.iter().map(|(n, _)| n).collect();
    assert_eq!(again_names, rest, "seekdir(telldir) resumes at the same entry");
    // rewinddir gives the whole list again.
    // SAFETY: dir is open.
    unsafe { libc::rewinddir(dir) };
    assert_eq!(readdir_all(dir).len(), all.len());
    // SAFETY: dir is open.
    unsafe { libc::closedir(dir) };

    // Removing entries while listing never yields names twice.
    let mut seen = std::collections::HashSet::new();
    for (i, e) in fs::read_dir(m.path("d")).unwrap().enumerate() {
        let name = e.unwrap().file_name();
        assert!(seen.insert(name.clone()), "duplicate {name:?} while unlinking");
        if i % 2 == 0 {
            let _ = fs::remove_file(m.path("d").join(&name));
        }
    }
}

#[test]
fn statfs_matches_backing() {
    let m = mount!("ops::statfs_matches_backing");
    let get = |p: &Path| {
        let c = cstr(p);
        // SAFETY: zeroed statvfs is valid.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and buffer.
        sys(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, "statvfs");
        s
    };
    let b = get(&m.source);
    let v = get(&m.mountpoint);
    assert_eq!(v.f_blocks * v.f_frsize, b.f_blocks * b.f_frsize, "total size");
    assert_eq!(v.f_files, b.f_files, "total inodes");
    assert_eq!(v.f_namemax, b.f_namemax, "name length limit");
    let free_v = (v.f_bavail * v.f_frsize) as i128;
    let free_b = (b.f_bavail * b.f_frsize) as i128;
    assert!((free_v - free_b).abs() < 256 << 20, "free space differs by more than 256 MiB: {free_v} vs {free_b}");
    // statfs(2) f_type is FUSE's.
    let c = cstr(&m.mountpoint);
    // SAFETY: zeroed statfs is valid.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and buffer.
    sys(unsafe { libc::statfs(c.as_ptr(), &mut s) }, "statfs");
    assert_eq!(s.f_type, 0x6573_5546, "FUSE_SUPER_MAGIC");
}

fn getxattr(p: &Path, name: &str, size: usize) -> Result<Vec<u8>, i32> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; size];
    // SAFETY: valid path, name and buffer.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size) };
    let r = try_sys(r)?;
    buf.truncate(r as usize);
    Ok(buf)
}

fn xattr_size(p: &Path, name: &str) -> Result<usize, i32> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: a size probe with a null buffer.
    try_sys(unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) }).map(|r| r as usize)
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<i32, i32> {
    let (c, n) = (cstr(p), CString::new(name).unwrap());
    // SAFETY: valid path, name and value.
    try_sys(unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) })
}

fn listxattr(p: &Path) -> Vec<String> {
    let c = cstr(p);
    // SAFETY: size probe.
    let size = sys(unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) }, "listxattr size") as usize;
    let mut buf = vec![0u8; size];
    // SAFETY: valid buffer of `size` bytes.
    let n = sys(unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), size) }, "listxattr") as usize;
    assert_eq!(n, size, "listxattr length equals its size probe");
    buf[..n].split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

#[test]
fn xattrs() {
    let m = mount!("ops::xattrs");
    write_file(&m.path("f"), b"");
    fs::create_dir(m.path("d")).unwrap();
    for name in ["f", "d"] {
        let (p, b) = (m.path(name), m.backing(name));
        let value = pattern(300, 8);
        setxattr(&p, "user.test", &value, 0).unwrap();
        assert_eq!(getxattr(&b, "user.test", 1000), Ok(value.clone()), "{name}: value in the backing file");
        assert_eq!(xattr_size(&p, "user.test"), Ok(300), "{name}: size probe");
        assert_eq!(getxattr(&p, "user.test", 1000), Ok(value.clone()));
        assert_eq!(getxattr(&p, "user.test", 10), Err(libc::ERANGE), "{name}: buffer too small");
        assert_eq!(getxattr(&p, "user.missing", 100), Err(libc::ENODATA));
        assert_eq!(xattr_size(&p, "user.missing"), Err(libc::ENODATA));
        setxattr(&p, "user.empty", b"", 0).unwrap();
        assert_eq!(getxattr(&p, "user.empty", 10), Ok(vec![]));
        let mut list = listxattr(&p);
        list.retain(|n| n.starts_with("user."));
        list.sort();
        assert_eq!(list, ["user.empty", "user.test"], "{name}: listxattr");
        assert_eq!(setxattr(&p, "user.test", b"v", libc::XATTR_CREATE), Err(libc::EEXIST));
        assert_eq!(setxattr(&p, "user.new", b"v", libc::XATTR_REPLACE), Err(libc::ENODATA));
        setxattr(&p, "user.test", b"replaced", libc::XATTR_REPLACE).unwrap();
        assert_eq!(getxattr(&b, "user.test", 100), Ok(b"replaced".to_vec()));
        setxattr(&p, "user.created", b"c", libc::XATTR_CREATE).unwrap();
        let c = cstr(&p);
        let n = CString::new("user.test").unwrap();
        // SAFETY: valid path and name.
        sys(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }, "removexattr");
        assert_eq!(getxattr(&b, "user.test", 100), Err(libc::ENODATA), "{name}: removed in the backing file");
        assert_eq!(getxattr(&p, "user.test", 100), Err(libc::ENODATA));
        // SAFETY: valid path and name.
        assert_eq!(try_sys(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }), Err(libc::ENODATA));
        // trusted.* (root only) round-trips too.
        setxattr(&p, "trusted.t", b"root", 0).unwrap();
        assert_eq!(getxattr(&b, "trusted.t", 100), Ok(b"root".to_vec()));
    }
    // An xattr set in the backing directory is visible through the mount.
    setxattr(&m.backing("f"), "user.behind", b"b", 0).unwrap();
    assert!(tests::wait_until(Duration::from_secs(5), || getxattr(&m.path("f"), "user.behind", 10).is_ok()));
    // The largest value the backing file system takes (ext4 without ea_inode: about one
    // block; 64 KiB is the VFS limit) round-trips through the mount, and a too-large one fails
    // with the backing file system's errno.
    write_file(&m.backing("probe"), b"");
    let mut size = 65_536;
    while let Err(e) = setxattr(&m.backing("probe"), "user.large", &pattern(size, 9), 0) {
        assert!(size > 1024, "the backing file system refuses a {size}-byte xattr: errno {e}");
        size /= 2;
    }
    let large = pattern(size, 9);
    setxattr(&m.path("f"), "user.large", &large, 0).unwrap();
    assert_eq!(getxattr(&m.path("f"), "user.large", 65536), Ok(large.clone()));
    assert_eq!(getxattr(&m.backing("f"), "user.large", 65536), Ok(large));
    if size < 65_536 {
        let native = setxattr(&m.backing("probe"), "user.huge", &pattern(65_536, 9), 0);
        let through = setxattr(&m.path("f"), "user.huge", &pattern(65_536, 9), 0);
        assert_eq!(through, native, "a too-large value fails as in the backing file system");
    }
}

fn access(p: &Path, mode: i32) -> Result<i32, i32> {
    let c = cstr(p);
    // SAFETY: valid path.
    try_sys(unsafe { libc::access(c.as_ptr(), mode) })
}

#[test]
fn access_checks() {
    let m = mount!("ops::access_checks", &["allow_other"]);
    write_file(&m.path("secret"), b"s");
    fs::set_permissions(m.path("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    write_file(&m.path("public"), b"p");
    fs::set_permissions(m.path("public"), fs::Permissions::from_mode(0o644)).unwrap();
    write_file(&m.path("exec"), b"#!/bin/sh\n");
    fs::set_permissions(m.path("exec"), fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(access(&m.path("secret"), libc::F_OK), Ok(0));
    assert_eq!(access(&m.path("missing"), libc::F_OK), Err(libc::ENOENT));
    assert_eq!(access(&m.path("secret"), libc::R_OK | libc::W_OK), Ok(0), "root reads and writes anything");
    assert_eq!(access(&m.path("public"), libc::X_OK), Err(libc::EACCES), "root needs an x bit to execute");
    assert_eq!(access(&m.path("exec"), libc::X_OK), Ok(0));

    let (secret, public, exec) = (cstr(m.path("secret")), cstr(m.path("public")), cstr(m.path("exec")));
    // SAFETY (all three): access(2) on prepared paths, in the forked child.
    let r = as_user(NOBODY_UID, NOBODY_GID, || {
        tests::errno_of(unsafe { libc::access(secret.as_ptr(), libc::R_OK) }.into())
    });
    assert_eq!(r, libc::EACCES, "nobody cannot read a 0600 root file");
    let r = as_user(NOBODY_UID, NOBODY_GID, || {
        tests::errno_of(unsafe { libc::access(public.as_ptr(), libc::R_OK) }.into())
    });
    assert_eq!(r, 0, "nobody can read a 0644 file");
    let r = as_user(NOBODY_UID, NOBODY_GID, || {
        tests::errno_of(unsafe { libc::access(public.as_ptr(), libc::W_OK) }.into())
    });
    assert_eq!(r, libc::EACCES, "nobody cannot write a 0644 root file");
    let r =
        as_user(NOBODY_UID, NOBODY_GID, || tests::errno_of(unsafe { libc::access(exec.as_ptr(), libc::X_OK) }.into()));
    assert_eq!(r, 0, "nobody can execute a 0755 file");
    // A read-only mount answers W_OK with EROFS.
    drop(m);
    let m = mount!("ops::access_checks(ro)", &["ro"]);
    assert_eq!(access(&m.mountpoint, libc::W_OK), Err(libc::EROFS));
}

fn blocks(p: &Path) -> u64 {
    lstat(p).blocks()
}

#[test]
fn fallocate_and_punch_hole() {
    let m = mount!("ops::fallocate_and_punch_hole");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path("f")).unwrap();
    let mib = 1024 * 1024;
    // SAFETY: valid fd.
    sys(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, mib) }, "fallocate");
    assert_eq!(lstat(&m.backing("f")).len(), mib as u64);
    assert!(blocks(&m.backing("f")) >= 2048, "1 MiB allocated in the backing file");
    // KEEP_SIZE allocates beyond EOF without changing the size.
    // SAFETY: valid fd.
    sys(unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, mib, mib) }, "fallocate KEEP_SIZE");
    assert_eq!(lstat(&m.backing("f")).len(), mib as u64);
    assert!(blocks(&m.backing("f")) >= 4096);
    f.write_all_at(&pattern(mib as usize, 10), 0).unwrap();
    f.sync_all().unwrap();
    let before = blocks(&m.backing("f"));
    // SAFETY: valid fd.
    sys(
        unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                256 * 1024,
                512 * 1024,
            )
        },
        "fallocate PUNCH_HOLE",
    );
    let after = blocks(&m.backing("f"));
    assert!(after + 1024 <= before, "punching 512 KiB frees blocks in the backing file: {before} -> {after}");
    assert_eq!(lstat(&m.path("f")).len(), mib as u64, "size unchanged");
    let data = read_file(&m.path("f"));
    let orig = pattern(mib as usize, 10);
    assert!(data[256 * 1024..768 * 1024].iter().all(|&b| b == 0), "the hole reads as zeros through the mount");
    assert_eq!(&data[..256 * 1024], &orig[..256 * 1024]);
    assert_eq!(&data[768 * 1024..], &orig[768 * 1024..]);
    // posix_fallocate (glibc) grows the file.
    // SAFETY: valid fd.
    assert_eq!(unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, 3 * mib) }, 0);
    assert_eq!(lstat(&m.backing("f")).len(), 3 * mib as u64);
}

#[test]
fn lseek_data_and_hole() {
    let m = mount!("ops::lseek_data_and_hole");
    let mib = 1024 * 1024;
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.backing("sparse")).unwrap();
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(&[2u8; 4096], mib).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let f = File::open(m.path("sparse")).unwrap();
    let seek = |off: i64, whence: i32| {
        // SAFETY: valid fd.
        try_sys(unsafe { libc::lseek(f.as_raw_fd(), off, whence) })
    };
    assert_eq!(seek(0, libc::SEEK_DATA), Ok(0));
    assert_eq!(seek(0, libc::SEEK_HOLE), Ok(4096), "SEEK_HOLE finds the hole after the first block");
    assert_eq!(seek(4096, libc::SEEK_DATA), Ok(mib as i64), "SEEK_DATA skips the hole");
    assert_eq!(seek(mib as i64, libc::SEEK_HOLE), Ok(mib as i64 + 4096), "the implicit hole at EOF");
    assert_eq!(seek(mib as i64 + 4096, libc::SEEK_DATA), Err(libc::ENXIO), "no data at EOF");
    assert_eq!(seek(0, libc::SEEK_END), Ok(mib as i64 + 4096));
}

#[test]
fn copy_file_range_within_mount() {
    let m = mount!("ops::copy_file_range_within_mount");
    let data = pattern(3 * 1024 * 1024 + 17, 11);
    write_file(&m.path("src"), &data);
    let src = File::open(m.path("src")).unwrap();
    let dst = OpenOptions::new().write(true).create(true).truncate(true).open(m.path("dst")).unwrap();
    let (mut off_in, mut off_out): (i64, i64) = (100, 5000);
    let mut left = data.len() - 100;
    while left > 0 {
        // SAFETY: valid fds and offsets.
        let n = unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, left, 0) };
        let n = sys(n, "copy_file_range") as usize;
        assert!(n > 0, "copy_file_range made no progress");
        left -= n;
    }
    drop(dst);
    let back = read_file(&m.backing("dst"));
    assert_eq!(back.len(), 5000 + data.len() - 100);
    assert!(back[..5000].iter().all(|&b| b == 0));
    assert!(back[5000..] == data[100..], "copied range differs in the backing file");
    assert!(read_file(&m.path("dst")) == back);
}

fn posix_lock(fd: i32, cmd: i32, typ: i32) -> Result<i32, i32> {
    // SAFETY: zeroed flock is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = 0;
    fl.l_len = 100;
    // SAFETY: valid fd and flock.
    try_sys(unsafe { libc::fcntl(fd, cmd, &mut fl) })
}

#[test]
fn posix_locks_and_flock_between_processes() {
    let m = mount!("ops::posix_locks_and_flock_between_processes");
    write_file(&m.path("lock"), &[0u8; 200]);
    let f = OpenOptions::new().read(true).write(true).open(m.path("lock")).unwrap();
    posix_lock(f.as_raw_fd(), libc::F_SETLK, libc::F_WRLCK).unwrap();
    let path = cstr(m.path("lock"));
    let child = || {
        // SAFETY: raw syscalls on a prepared path in the forked child.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDWR);
            if fd < 0 {
                return 200;
            }
            let mut fl: libc::flock = std::mem::zeroed();
            fl.l_type = libc::F_WRLCK as i16;
            fl.l_whence = libc::SEEK_SET as i16;
            fl.l_len = 10;
            if libc::fcntl(fd, libc::F_SETLK, &mut fl) == 0 {
                return 0;
            }
            let e = *libc::__errno_location();
            // F_GETLK reports the conflicting lock.
            let mut q: libc::flock = std::mem::zeroed();
            q.l_type = libc::F_WRLCK as i16;
            q.l_whence = libc::SEEK_SET as i16;
            q.l_len = 10;
            if libc::fcntl(fd, libc::F_GETLK, &mut q) != 0 || q.l_type != libc::F_WRLCK as i16 {
                return 201;
            }
            // A lock on a range the parent does not hold succeeds.
            fl.l_start = 150;
            if libc::fcntl(fd, libc::F_SETLK, &mut fl) != 0 {
                return 202;
            }
            e
        }
    };
    let r = as_user(0, 0, child);
    assert!(
        r == libc::EAGAIN || r == libc::EACCES,
        "second process's F_SETLK on a locked range: expected EAGAIN, got {r}"
    );
    // After the parent unlocks, the child gets the lock.
    posix_lock(f.as_raw_fd(), libc::F_SETLK, libc::F_UNLCK).unwrap();
    assert_eq!(as_user(0, 0, child), 0, "lock free after F_UNLCK");

    // flock(2): exclusive in this process, LOCK_NB conflict in another open file description.
    // SAFETY: valid fd.
    sys(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, "flock");
    let flock_child = || {
        // SAFETY: raw syscalls on a prepared path in the forked child.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
            if fd < 0 {
                return 200;
            }
            if libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0 {
                return 0;
            }
            *libc::__errno_location()
        }
    };
    assert_eq!(as_user(0, 0, flock_child), libc::EWOULDBLOCK, "flock LOCK_EX|LOCK_NB conflict");
    // SAFETY: valid fd.
    sys(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) }, "flock unlock");
    assert_eq!(as_user(0, 0, flock_child), 0, "flock free after LOCK_UN");
}

#[test]
fn mmap_shared_read_write() {
    let m = mount!("ops::mmap_shared_read_write");
    let len = 64 * 1024;
    write_file(&m.path("map"), &vec![0u8; len]);
    let f = OpenOptions::new().read(true).write(true).open(m.path("map")).unwrap();
    // SAFETY: mapping a file we hold open, of its size.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0)
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    let data = pattern(len, 12);
    // SAFETY: p maps len writable bytes.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>(), len) };
    // SAFETY: p/len is our mapping.
    sys(unsafe { libc::msync(p, len, libc::MS_SYNC) }, "msync");
    assert!(read_file(&m.backing("map")) == data, "MAP_SHARED writes reach the backing file after msync");
    // SAFETY: p/len is our mapping.
    unsafe { libc::munmap(p, len) };

    // Read-only private mapping of a file written in the backing directory.
    let other = pattern(10_000, 13);
    write_file(&m.backing("ro"), &other);
    let f = File::open(m.path("ro")).unwrap();
    // SAFETY: mapping a file we hold open.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), 10_000, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap read-only: {}", std::io::Error::last_os_error());
    // SAFETY: p maps 10000 readable bytes.
    let seen = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 10_000) }.to_vec();
    // SAFETY: our mapping.
    unsafe { libc::munmap(p, 10_000) };
    assert!(seen == other);
}

#[test]
fn files_created_by_a_user_belong_to_the_user() {
    if !tests::require_root_fuse_setpriv("ops::files_created_by_a_user_belong_to_the_user") {
        return;
    }
    let m = Mount::start(&["allow_other"]);
    fs::create_dir(m.path("pub")).unwrap();
    fs::set_permissions(m.path("pub"), fs::Permissions::from_mode(0o777)).unwrap();
    let dir = m.path("pub");
    let script =
        format!("set -e; cd '{}'; echo data > file; mkdir dir; ln -s file link; mkfifo fifo; echo ok", dir.display());
    let out = run_as(NOBODY_UID, NOBODY_GID, &script);
    assert!(out.status.success(), "as nobody: {}", String::from_utf8_lossy(&out.stderr));
    for name in ["file", "dir", "link", "fifo"] {
        let b = lstat(&m.backing(format!("pub/{name}")));
        assert_eq!((b.uid(), b.gid()), (NOBODY_UID, NOBODY_GID), "{name} in the backing dir is owned by nobody");
        let v = lstat(&m.path(format!("pub/{name}")));
        assert_eq!((v.uid(), v.gid()), (NOBODY_UID, NOBODY_GID), "{name} through the mount is owned by nobody");
    }
    // Supplementary groups count for group-owned directories, and are not leaked between users.
    fs::create_dir(m.path("grp")).unwrap();
    std::os::unix::fs::chown(m.path("grp"), Some(0), Some(4321)).unwrap();
    fs::set_permissions(m.path("grp"), fs::Permissions::from_mode(0o770)).unwrap();
    let grp = m.path("grp");
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY_UID}"),
            &format!("--regid={NOBODY_GID}"),
            "--groups=4321",
            "sh",
            "-c",
            &format!("echo x > '{}/f'", grp.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a member of group 4321 writes in a 0770 group dir: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = lstat(&m.backing("grp/f"));
    assert_eq!((b.uid(), b.gid()), (NOBODY_UID, NOBODY_GID));
    let out = run_as(NOBODY_UID, NOBODY_GID, &format!("echo x > '{}/g'", grp.display()));
    assert!(!out.status.success(), "without the group, the 0770 directory is closed");
    assert!(!m.backing("grp/g").exists());
}

#[test]
fn setgid_directory_inheritance() {
    let m = mount!("ops::setgid_directory_inheritance");
    fs::create_dir(m.backing("sg")).unwrap();
    std::os::unix::fs::chown(m.backing("sg"), Some(0), Some(4321)).unwrap();
    fs::set_permissions(m.backing("sg"), fs::Permissions::from_mode(0o2775)).unwrap();
    write_file(&m.path("sg/file"), b"");
    fs::create_dir(m.path("sg/sub")).unwrap();
    let f = lstat(&m.backing("sg/file"));
    assert_eq!(f.gid(), 4321, "a file created in a set-gid directory gets the directory's group");
    let d = lstat(&m.backing("sg/sub"));
    assert_eq!(d.gid(), 4321, "so does a subdirectory");
    assert_ne!(d.mode() & 0o2000, 0, "and the subdirectory inherits S_ISGID");
    assert_eq!(lstat(&m.path("sg/sub")).gid(), 4321);
    assert_eq!(lstat(&m.path("sg/file")).gid(), 4321);
}

#[test]
fn non_owner_write_clears_setuid() {
    if !tests::require_root_fuse_setpriv("ops::non_owner_write_clears_setuid") {
        return;
    }
    let m = Mount::start(&["allow_other"]);
    for (name, mode, expect) in [("suid", 0o4777, 0o777), ("sgid", 0o2777, 0o777), ("both", 0o6777, 0o777)] {
        write_file(&m.backing(name), b"original");
        fs::set_permissions(m.backing(name), fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(lstat(&m.path(name)).mode() & 0o7777, mode);
        let p = m.path(name);
        let out = run_as(NOBODY_UID, NOBODY_GID, &format!("printf more >> '{}'", p.display()));
        assert!(out.status.success(), "nobody appends to a 0{mode:o} file: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(read_file(&m.backing(name)), b"originalmore");
        assert_eq!(
            lstat(&m.backing(name)).mode() & 0o7777,
            expect,
            "{name}: a write by a non-owner clears set-uid/set-gid in the backing file"
        );
        assert_eq!(lstat(&m.path(name)).mode() & 0o7777, expect, "{name}: and through the mount");
    }
    // A write by root (CAP_FSETID) keeps the bits.
    write_file(&m.backing("root"), b"x");
    fs::set_permissions(m.backing("root"), fs::Permissions::from_mode(0o4755)).unwrap();
    OpenOptions::new().append(true).open(m.path("root")).unwrap().write_all(b"y").unwrap();
    assert_eq!(lstat(&m.backing("root")).mode() & 0o7777, 0o4755, "root's write keeps S_ISUID");
    // Truncation by a non-owner clears them too.
    write_file(&m.backing("trunc"), b"0123456789");
    fs::set_permissions(m.backing("trunc"), fs::Permissions::from_mode(0o4777)).unwrap();
    let out = run_as(NOBODY_UID, NOBODY_GID, &format!(": > '{}'", m.path("trunc").display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lstat(&m.backing("trunc")).len(), 0);
    assert_eq!(lstat(&m.backing("trunc")).mode() & 0o7777, 0o777, "O_TRUNC by a non-owner clears S_ISUID");
}

/// A `security.capability` value (VFS_CAP_REVISION_2, effective, CAP_NET_RAW permitted).
fn file_caps() -> Vec<u8> {
    let mut v = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

#[test]
fn write_and_chown_remove_file_capabilities() {
    let m = mount!("ops::write_and_chown_remove_file_capabilities");
    // As on a local file system, any write (root's too) and any chown drop security.capability:
    // with FUSE_HANDLE_KILLPRIV_V2 that is the server's job.
    // (A write through a shared mapping keeps them on ext4 too: not checked.)
    for (name, how) in [("append", 0), ("pwrite", 1), ("truncate", 2), ("chown", 3)] {
        write_file(&m.backing(name), &[7u8; 8192]);
        setxattr(&m.backing(name), "security.capability", &file_caps(), 0).unwrap();
        assert_eq!(getxattr(&m.path(name), "security.capability", 100), Ok(file_caps()), "{name}: visible");
        match how {
            0 => OpenOptions::new().append(true).open(m.path(name)).unwrap().write_all(b"more").unwrap(),
            1 => OpenOptions::new().write(true).open(m.path(name)).unwrap().write_all_at(b"x", 100).unwrap(),
            2 => OpenOptions::new().write(true).open(m.path(name)).unwrap().set_len(10).unwrap(),
            _ => std::os::unix::fs::chown(m.path(name), Some(1234), None).unwrap(),
        }
        assert_eq!(
            getxattr(&m.backing(name), "security.capability", 100),
            Err(libc::ENODATA),
            "{name}: security.capability must be removed from the backing file"
        );
        assert_eq!(
            getxattr(&m.path(name), "security.capability", 100),
            Err(libc::ENODATA),
            "{name}: and through the mount"
        );
    }
}

#[test]
fn unusual_names() {
    let m = mount!("ops::unusual_names");
    use std::os::unix::ffi::OsStrExt;
    let names: Vec<Vec<u8>> = vec![
        b"with space".to_vec(),
        b"new\nline".to_vec(),
        b"tab\there".to_vec(),
        b"-dash".to_vec(),
        b"..dots".to_vec(),
        b"...".to_vec(),
        "unicode-\u{e9}\u{1f600}".as_bytes().to_vec(),
        vec![b'n', 0xff, 0xfe, b'x'],
        vec![b'a'; 255],
        b"back\\slash".to_vec(),
        b"*?[glob]".to_vec(),
    ];
    for n in &names {
        let p = m.path(std::ffi::OsStr::from_bytes(n));
        write_file(&p, n);
        assert_eq!(read_file(&m.backing(std::ffi::OsStr::from_bytes(n))), *n, "{:?}", String::from_utf8_lossy(n));
    }
    let mut listed: Vec<Vec<u8>> =
        fs::read_dir(&m.mountpoint).unwrap().map(|e| e.unwrap().file_name().as_bytes().to_vec()).collect();
    listed.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(listed, expected);
    // 256 bytes is too long.
    let long = m.path("b".repeat(256));
    assert_eq!(err_of(fs::write(&long, b"")), libc::ENAMETOOLONG);
    assert_eq!(err_of(fs::metadata(&long)), libc::ENAMETOOLONG);
}

#[test]
fn many_inodes_beyond_the_fd_limit() {
    let m = mount!("ops::many_inodes_beyond_the_fd_limit");
    // More inodes than RLIMIT_NOFILE (20000 here): a server that pins one fd per known inode
    // runs out of descriptors.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out pointer.
    sys(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, "getrlimit");
    let n = (lim.rlim_cur as usize).clamp(1024, 40_000) + 2000;
    let t0 = std::time::Instant::now();
    for d in 0..(n / 1000) {
        fs::create_dir(m.backing(format!("d{d}"))).unwrap();
        for i in 0..1000 {
            File::create(m.backing(format!("d{d}/f{i}"))).unwrap();
        }
    }
    let t1 = t0.elapsed();
    let mut seen = 0;
    for d in 0..(n / 1000) {
        for e in fs::read_dir(m.path(format!("d{d}"))).unwrap() {
            let e = e.unwrap();
            // A LOOKUP (or READDIRPLUS entry) per file, and an open of each: every inode stays known.
            fs::metadata(e.path())
                .unwrap_or_else(|err| panic!("stat {} after {seen} files: {err}", e.path().display()));
            seen += 1;
        }
    }
    assert_eq!(seen, n / 1000 * 1000);
    eprintln!("many inodes: {seen} files created in {t1:?}, all stat'ed through the mount after {:?}", t0.elapsed());
    // Opening files all over the tree still works, and the server is still alive.
    for d in 0..(n / 1000) {
        write_file(&m.path(format!("d{d}/f999")), b"late");
    }
    assert_eq!(read_file(&m.backing("d0/f999")), b"late");
    assert!(m.is_mounted());
}

#[test]
fn many_directories_held_open() {
    let m = mount!("ops::many_directories_held_open");
    // A client holding thousands of directories open (stress-ng's chdir stressor, a file
    // manager, a build): each costs the server an open directory and a pinned O_PATH
    // descriptor, so a server left at the inherited open-file limit answers EMFILE where the
    // backing file system would not.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out pointer.
    sys(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, "getrlimit");
    let inherited = lim.rlim_cur as usize;
    let mine = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: valid pointer; only this test process's soft limit moves (the server is running).
    sys(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &mine) }, "setrlimit");
    // Nearly as many as the server may open: together with its cached inode descriptors (4096
    // by default) far more than it may, unless open handles push cached descriptors out.
    let n = (inherited - (inherited / 4).min(1500)).min(lim.rlim_max as usize - 200);
    assert!(n + 4096 > inherited, "cannot hold enough directories open to test (hard limit {})", lim.rlim_max);
    for i in 0..n {
        fs::create_dir(m.backing(format!("d{i}"))).unwrap();
    }
    let open: Vec<File> = (0..n)
        .map(|i| File::open(m.path(format!("d{i}"))).unwrap_or_else(|e| panic!("open directory {i} of {n}: {e}")))
        .collect();
    fs::create_dir(m.path("one-more")).expect("mkdir with thousands of directories open");
    write_file(&m.path("one-more/f"), b"x");
    assert_eq!(read_file(&m.backing("one-more/f")), b"x");
    drop(open);
    // SAFETY: valid pointer; back to what the other tests inherit.
    sys(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, "setrlimit");
    assert!(m.is_mounted());
}

#[test]
fn concurrent_writers_and_readers() {
    let m = mount!("ops::concurrent_writers_and_readers");
    let chunk = 256 * 1024;
    let threads = 4;
    let f = std::sync::Arc::new(
        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path("shared")).unwrap(),
    );
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                let data = pattern(chunk, 100 + t as u64);
                for round in 0..8 {
                    let off = ((round * threads + t) * chunk) as u64;
                    f.write_all_at(&data, off).unwrap();
                    let mut back = vec![0u8; chunk];
                    f.read_exact_at(&mut back, off).unwrap();
                    assert!(back == data, "thread {t} round {round}: read back differs");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    f.sync_all().unwrap();
    let back = read_file(&m.backing("shared"));
    assert_eq!(back.len(), 8 * threads * chunk);
    for (i, c) in back.chunks(chunk).enumerate() {
        assert!(c == pattern(chunk, 100 + (i % threads) as u64), "chunk {i} differs in the backing file");
    }
    // Many threads creating and removing in one directory.
    fs::create_dir(m.path("busy")).unwrap();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dir = m.path("busy");
            std::thread::spawn(move || {
                for i in 0..300 {
                    let p = dir.join(format!("t{t}-{i}"));
                    fs::write(&p, b"x").unwrap();
                    if i % 3 == 0 {
                        fs::remove_file(&p).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(fs::read_dir(m.backing("busy")).unwrap().count(), threads * 200);
    assert_eq!(fs::read_dir(m.path("busy")).unwrap().count(), threads * 200);
}

#[test]
fn ownership_and_time_rules_for_other_users() {
    let m = mount!("ops::ownership_and_time_rules_for_other_users", &["allow_other"]);
    write_file(&m.path("rootfile"), b"r");
    fs::set_permissions(m.path("rootfile"), fs::Permissions::from_mode(0o666)).unwrap();
    fs::create_dir(m.path("pub")).unwrap();
    fs::set_permissions(m.path("pub"), fs::Permissions::from_mode(0o1777)).unwrap();
    write_file(&m.path("pub/rootowned"), b"");
    fs::set_permissions(m.path("pub/rootowned"), fs::Permissions::from_mode(0o666)).unwrap();
    let (rootfile, sticky) = (cstr(m.path("rootfile")), cstr(m.path("pub/rootowned")));
    let now = [ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_NOW)];
    let explicit = [ts(1000, 0), ts(1000, 0)];
    let r = |f: &dyn Fn() -> libc::c_int| as_user(NOBODY_UID, NOBODY_GID, || tests::errno_of(f().into()));
    // SAFETY (closures below): syscalls on prepared paths/arrays in the forked child.
    assert_eq!(
        r(&|| unsafe { libc::chown(rootfile.as_ptr(), NOBODY_UID, NOBODY_GID) }),
        libc::EPERM,
        "chown by non-owner"
    );
    assert_eq!(r(&|| unsafe { libc::chmod(rootfile.as_ptr(), 0o777) }), libc::EPERM, "chmod by non-owner");
    assert_eq!(
        r(&|| unsafe { libc::utimensat(libc::AT_FDCWD, rootfile.as_ptr(), now.as_ptr(), 0) }),
        0,
        "UTIME_NOW by a non-owner with write permission"
    );
    assert_eq!(
        r(&|| unsafe { libc::utimensat(libc::AT_FDCWD, rootfile.as_ptr(), explicit.as_ptr(), 0) }),
        libc::EPERM,
        "explicit times by a non-owner"
    );
    assert_ne!(lstat(&m.backing("rootfile")).mtime(), 1000);
    assert_eq!(r(&|| unsafe { libc::unlink(sticky.as_ptr()) }), libc::EPERM, "sticky directory protects others' files");
    assert!(m.backing("pub/rootowned").exists());
    let (b, v) = (lstat(&m.backing("rootfile")), lstat(&m.path("rootfile")));
    assert_eq!((b.uid(), b.mode() & 0o7777), (0, 0o666));
    assert_eq!((v.uid(), v.mode() & 0o7777), (0, 0o666));
}

/// `noatime`: reads (served by the server or passed through by the kernel) and directory
/// listings leave the backing access times alone, where the backing mount (relatime) would have
/// updated them.
fn noatime_case(name: &str, opts: &[&str]) {
    let Some(m) = setup(name, opts) else {
        return;
    };
    assert!(tests::mount_at(&m.mountpoint).is_some_and(|i| i.mount_options.split(',').any(|o| o == "noatime")));
    fs::write(m.backing("f"), b"read me").unwrap();
    fs::create_dir(m.backing("d")).unwrap();
    fs::write(m.backing("d/x"), b"").unwrap();
    // Access times before the modification times: relatime updates them on the next read.
    let old = |p: &Path| {
        let c = cstr(p);
        let times =
            [libc::timespec { tv_sec: 1_000_000, tv_nsec: 0 }, libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }];
        // SAFETY: a NUL-terminated path and two timespecs.
        sys(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }, "utimensat");
    };
    for p in [m.backing("f"), m.backing("d")] {
        old(&p);
    }
    assert_eq!(fs::read(m.path("f")).unwrap(), b"read me");
    let f = File::open(m.path("f")).unwrap();
    let mut buf = [0u8; 4];
    f.read_exact_at(&mut buf, 1).unwrap();
    drop(f);
    assert_eq!(fs::read_dir(m.path("d")).unwrap().count(), 1);
    assert_eq!(fs::metadata(m.backing("f")).unwrap().atime(), 1_000_000, "a read through the mount touched atime");
    assert_eq!(fs::metadata(m.path("f")).unwrap().atime(), 1_000_000, "the mount shows the backing atime");
    assert_eq!(fs::metadata(m.backing("d")).unwrap().atime(), 1_000_000, "a listing through the mount touched atime");
    // The backing mount itself would have: the same read natively updates it.
    fs::read(m.backing("f")).unwrap();
    assert_ne!(fs::metadata(m.backing("f")).unwrap().atime(), 1_000_000, "the backing mount does not update atime");
}

#[test]
fn noatime_leaves_backing_access_times_alone() {
    noatime_case("ops::noatime_leaves_backing_access_times_alone", &["noatime", "passthrough=false"]);
}

/// The kernel opens the backing file of a passthrough open on the server's (private, noatime)
/// mount of the backing directory, so its reads leave access times alone too (xfstests
/// generic/120).
#[test]
fn noatime_holds_for_passthrough_reads() {
    noatime_case("ops::noatime_holds_for_passthrough_reads", &["noatime"]);
}

/// `strictatime`: a read updates the access time where the backing mount's relatime would not
/// (the access time is already newer than the modification and change times), for reads the
/// server serves and reads passed through (xfstests generic/003).
fn strictatime_case(name: &str, opts: &[&str]) {
    let Some(m) = setup(name, opts) else {
        return;
    };
    fs::write(m.backing("f"), b"read me").unwrap();
    // Natively: the first read sets atime (it was not newer than mtime), the second does not.
    let atime = |p: &Path| {
        let md = fs::metadata(p).unwrap();
        md.atime() as i128 * 1_000_000_000 + md.atime_nsec() as i128
    };
    let ctime = |p: &Path| {
        let md = fs::metadata(p).unwrap();
        md.ctime() as i128 * 1_000_000_000 + md.ctime_nsec() as i128
    };
    // relatime updates atime while it is not newer than ctime: with coarse timestamps (kernels
    // before 6.13) a read in the same clock tick as the write leaves them equal. Read until the
    // read lands in a later tick.
    assert!(
        tests::wait_until(Duration::from_secs(2), || {
            fs::read(m.backing("f")).unwrap();
            atime(&m.backing("f")) > ctime(&m.backing("f"))
        }),
        "a read never set atime past ctime"
    );
    let t0 = atime(&m.backing("f"));
    // A later read gets a later timestamp if it sets one at all.
    wait_clock_past(((t0 / 1_000_000_000) as i64, (t0 % 1_000_000_000) as i64));
    fs::read(m.backing("f")).unwrap();
    assert_eq!(atime(&m.backing("f")), t0, "the backing mount is relatime");
    assert_eq!(fs::read(m.path("f")).unwrap(), b"read me");
    let t1 = atime(&m.backing("f"));
    assert!(t1 > t0, "a read through a strictatime mount updates atime ({t0} -> {t1})");
    assert!(tests::wait_until(Duration::from_secs(10), || atime(&m.path("f")) == t1), "the mount shows it");
}

#[test]
fn strictatime_updates_access_times_on_every_read_served() {
    strictatime_case(
        "ops::strictatime_updates_access_times_on_every_read_served",
        &["strictatime", "passthrough=false"],
    );
}

#[test]
fn strictatime_updates_access_times_on_every_read_passthrough() {
    strictatime_case("ops::strictatime_updates_access_times_on_every_read_passthrough", &["strictatime"]);
}

const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_APPEND_FL: i32 = 0x20;
const FS_IMMUTABLE_FL: i32 = 0x10;
const FS_NODUMP_FL: i32 = 0x40;
const FS_JOURNAL_DATA_FL: i32 = 0x4000;
const FS_XFLAG_IMMUTABLE: u32 = 0x8;

/// FS_IOC_GETFLAGS on `path` (opened read-only, as lsattr does): flags or -errno.
fn get_flags(path: &Path) -> Result<i32, i32> {
    let c = cstr(path);
    // SAFETY: open/ioctl/close on a NUL-terminated path and a local int.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(tests::errno());
        }
        let mut f: libc::c_int = 0;
        let r = libc::ioctl(fd, FS_IOC_GETFLAGS, &mut f);
        let e = tests::errno();
        libc::close(fd);
        if r < 0 {
            Err(e)
        } else {
            Ok(f)
        }
    }
}

/// FS_IOC_SETFLAGS on `path`: 0 or the errno. Allocation-free (usable in `as_user`).
fn set_flags(path: &std::ffi::CStr, flags: i32) -> i32 {
    // SAFETY: open/ioctl/close on a NUL-terminated path and a local int.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC);
        if fd < 0 {
            return tests::errno();
        }
        let r = libc::ioctl(fd, FS_IOC_SETFLAGS, &flags);
        let e = tests::errno();
        libc::close(fd);
        if r < 0 {
            e
        } else {
            0
        }
    }
}

/// chattr/lsattr through the mount: inode flags are the backing file's, they take effect
/// (immutable, append-only), and who may change them is what the backing file system allows.
#[test]
fn inode_flags_chattr_and_lsattr() {
    let m = mount!("ops::inode_flags_chattr_and_lsattr", &["allow_other"]);
    write_file(&m.path("f"), b"data\n");
    fs::create_dir(m.path("d")).unwrap();
    let (f, d) = (cstr(m.path("f")), cstr(m.path("d")));
    let base = get_flags(&m.path("f")).expect("FS_IOC_GETFLAGS through the mount");
    assert_eq!(base, get_flags(&m.backing("f")).unwrap(), "lsattr shows the backing file's flags");

    // Set through the mount, seen on the backing file, and the other way round.
    assert_eq!(set_flags(&f, base | FS_NODUMP_FL), 0);
    assert_eq!(get_flags(&m.backing("f")).unwrap() & FS_NODUMP_FL, FS_NODUMP_FL);
    assert_eq!(get_flags(&m.path("f")).unwrap() & FS_NODUMP_FL, FS_NODUMP_FL);
    let dbase = get_flags(&m.path("d")).expect("FS_IOC_GETFLAGS on a directory");
    assert_eq!(set_flags(&d, dbase | FS_NODUMP_FL), 0);
    assert_eq!(get_flags(&m.backing("d")).unwrap() & FS_NODUMP_FL, FS_NODUMP_FL);

    // Immutable: no write, no rename, no unlink, until it is cleared.
    assert_eq!(set_flags(&f, base | FS_IMMUTABLE_FL), 0);
    assert_eq!(get_flags(&m.backing("f")).unwrap() & FS_IMMUTABLE_FL, FS_IMMUTABLE_FL);
    let c = cstr(m.path("f"));
    // SAFETY: FS_IOC_FSGETXATTR fills a 28-byte struct fsxattr; the buffer is 32 bytes.
    let xflags = unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        assert!(fd >= 0);
        let mut buf = [0u32; 8];
        let r = libc::ioctl(fd, FS_IOC_FSGETXATTR, buf.as_mut_ptr());
        libc::close(fd);
        assert_eq!(r, 0, "FS_IOC_FSGETXATTR: {}", std::io::Error::last_os_error());
        buf[0]
    };
    assert_eq!(xflags & FS_XFLAG_IMMUTABLE, FS_XFLAG_IMMUTABLE, "fsxattr shows immutable");
    assert_eq!(err_of(OpenOptions::new().append(true).open(m.path("f"))), libc::EPERM);
    assert_eq!(err_of(fs::remove_file(m.path("f"))), libc::EPERM);
    assert_eq!(err_of(fs::rename(m.path("f"), m.path("g"))), libc::EPERM);
    assert_eq!(read_file(&m.path("f")), b"data\n", "still readable");
    assert_eq!(set_flags(&f, base), 0);
    OpenOptions::new().append(true).open(m.path("f")).unwrap().write_all(b"more\n").unwrap();

    // Append-only: appends only.
    assert_eq!(set_flags(&f, base | FS_APPEND_FL), 0);
    assert_eq!(err_of(OpenOptions::new().write(true).open(m.path("f"))), libc::EPERM);
    OpenOptions::new().append(true).open(m.path("f")).unwrap().write_all(b"log\n").unwrap();
    assert_eq!(set_flags(&f, base), 0);
    assert_eq!(read_file(&m.backing("f")), b"data\nmore\nlog\n");

    // Who may: not another user; the owner, but not immutable/append-only (CAP_LINUX_IMMUTABLE)
    // nor data journalling on ext4 (CAP_SYS_RESOURCE).
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, || set_flags(&f, base | FS_NODUMP_FL)), libc::EPERM);
    std::os::unix::fs::chown(m.backing("f"), Some(NOBODY_UID), Some(NOBODY_GID)).unwrap();
    // The kernel's cached owner is refreshed by a stat after the attribute timeout at worst;
    // the watch makes it immediate, so wait for it.
    assert!(tests::wait_until(Duration::from_secs(10), || lstat(&m.path("f")).uid() == NOBODY_UID));
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, || set_flags(&f, base | FS_NODUMP_FL)), 0);
    assert_eq!(get_flags(&m.backing("f")).unwrap() & FS_NODUMP_FL, FS_NODUMP_FL);
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, || set_flags(&f, base | FS_IMMUTABLE_FL)), libc::EPERM);
    let ext4 = {
        // SAFETY: statfs into a zeroed struct.
        let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
        let c = cstr(m.backing(""));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut sfs) }, 0);
        sfs.f_type == 0xEF53
    };
    if ext4 {
        assert_eq!(as_user(NOBODY_UID, NOBODY_GID, || set_flags(&f, base | FS_JOURNAL_DATA_FL)), libc::EPERM);
        assert_eq!(get_flags(&m.backing("f")).unwrap() & FS_JOURNAL_DATA_FL, 0);
    }
    assert_eq!(get_flags(&m.backing("f")).unwrap() & FS_IMMUTABLE_FL, 0);
}

/// A file handle from name_to_handle_at(2): `struct file_handle` with room for MAX_HANDLE_SZ.
#[repr(C, align(8))]
struct FileHandle([u8; 8 + 128]);

fn name_to_handle(path: &Path, flags: i32) -> Result<FileHandle, i32> {
    let mut h = FileHandle([0; 136]);
    h.0[..4].copy_from_slice(&128u32.to_ne_bytes());
    let mut mount_id: libc::c_int = 0;
    let c = cstr(path);
    // SAFETY: valid path, a file_handle with handle_bytes = 128 and 128 bytes of room, and an
    // out-pointer for the mount id.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            h.0.as_mut_ptr(),
            &mut mount_id as *mut libc::c_int,
            flags,
        )
    };
    try_sys(r).map(|_| h)
}

fn open_by_handle(mount: &File, h: &FileHandle, flags: i32) -> Result<File, i32> {
    // SAFETY: a handle filled in by name_to_handle_at; the kernel only reads it.
    let fd = try_sys(unsafe { libc::syscall(libc::SYS_open_by_handle_at, mount.as_raw_fd(), h.0.as_ptr(), flags) })?;
    // SAFETY: a new descriptor we own.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// Drops the kernel's unused dentries and inodes: the mount gets FORGETs for every inode no
/// one holds.
fn forget_everything() {
    fs::write("/proc/sys/vm/drop_caches", "2").expect("drop_caches");
}

#[test]
fn file_handles_outlive_the_kernel_cache() {
    let state = tempfile::tempdir().unwrap();
    let state_opt = format!("export_state_dir={}", state.path().display());
    let m = mount!("ops::file_handles_outlive_the_kernel_cache", &[state_opt.as_str()]);
    fs::create_dir_all(m.path("d/sub")).unwrap();
    write_file(&m.path("d/sub/f"), b"by handle");
    write_file(&m.path("gone"), b"");
    write_file(&m.path("moved"), b"moved behind the mount");
    let root = File::open(m.path("")).unwrap();
    let f = name_to_handle(&m.path("d/sub/f"), 0).expect("name_to_handle_at on a file");
    let sub = name_to_handle(&m.path("d/sub"), 0).expect("name_to_handle_at on a directory");
    let gone = name_to_handle(&m.path("gone"), 0).unwrap();
    let moved = name_to_handle(&m.path("moved"), 0).unwrap();
    let ino = lstat(&m.path("d/sub/f")).ino();
    let sub_ino = lstat(&m.path("d/sub")).ino();
    // While the kernel still caches the inode.
    let mut s = String::new();
    open_by_handle(&root, &f, libc::O_RDONLY).unwrap().read_to_string(&mut s).unwrap();
    assert_eq!(s, "by handle");
    fs::remove_file(m.path("gone")).unwrap();
    fs::rename(m.backing("moved"), m.backing("d/moved-here")).unwrap();
    // After the kernel forgot every inode: the server resolves the node ids again.
    forget_everything();
    let mut file = open_by_handle(&root, &f, libc::O_RDWR).expect("open_by_handle_at after the kernel forgot the file");
    assert_eq!(file.metadata().unwrap().ino(), ino);
    s.clear();
    file.read_to_string(&mut s).unwrap();
    assert_eq!(s, "by handle");
    file.write_all(b", written").unwrap();
    drop(file);
    assert_eq!(read_file(&m.backing("d/sub/f")), b"by handle, written");
    forget_everything();
    let dir = open_by_handle(&root, &sub, libc::O_RDONLY | libc::O_DIRECTORY).expect("directory by handle");
    assert_eq!(dir.metadata().unwrap().ino(), sub_ino);
    let names: Vec<String> = fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["f"]);
    // The directory came back connected: its path is the one inside the mount.
    let path = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).unwrap();
    assert_eq!(path, m.path("d/sub"));
    s.clear();
    open_by_handle(&root, &moved, libc::O_RDONLY).expect("renamed behind the mount").read_to_string(&mut s).unwrap();
    assert_eq!(s, "moved behind the mount");
    assert_eq!(open_by_handle(&root, &gone, libc::O_RDONLY).err(), Some(libc::ESTALE));
    drop((root, dir));
    // Unmounted and mounted again: the next server takes over the node ids.
    let mut m = m;
    assert!(m.terminate().success());
    assert_eq!(fs::read_dir(state.path()).unwrap().count(), 1, "one state file for the mount");
    let m = tests::Mount::start_at(&m.source, &m.mountpoint, &[state_opt.as_str()]);
    assert_eq!(fs::read_dir(state.path()).unwrap().count(), 0, "the next server took the state");
    let root = File::open(m.path("")).unwrap();
    s.clear();
    open_by_handle(&root, &f, libc::O_RDONLY)
        .expect("open_by_handle_at after a remount")
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "by handle, written");
    let dir = open_by_handle(&root, &sub, libc::O_RDONLY | libc::O_DIRECTORY).expect("directory after a remount");
    assert_eq!(fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).unwrap(), m.path("d/sub"));
    assert_eq!(open_by_handle(&root, &gone, libc::O_RDONLY).err(), Some(libc::ESTALE));
    drop((root, dir));
    // Handles of the mount are refused where export is switched off.
    drop(m);
    let m = mount!("ops::file_handles_outlive_the_kernel_cache", &["export_handles=0"]);
    write_file(&m.path("f"), b"");
    match name_to_handle(&m.path("f"), 0) {
        Err(e) => assert_eq!(e, libc::EOPNOTSUPP),
        // Older kernels (Debian's 6.1 in scripts/kernel-matrix.sh; not 6.12) encode handles
        // without FUSE_EXPORT_SUPPORT too: they must then not open once the inode is forgotten.
        Ok(h) => {
            let root = File::open(m.path("")).unwrap();
            forget_everything();
            assert_eq!(open_by_handle(&root, &h, libc::O_RDONLY).err(), Some(libc::ESTALE));
        }
    }
}
