//! Round trips the protocol lets the mount avoid, counted by the server's own per-operation
//! counters on real workloads, with the semantics they must keep.

mod support;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{metric, require, wait_until, Server};
use tests::{as_user, errno, NOBODY_GID, NOBODY_UID};

fn requests(text: &str, op: &str) -> f64 {
    metric(text, &format!("ringfs_requests_total{{op=\"{op}\"}}"))
}

/// Files in the listed directory.
const N: usize = 300;
/// The SELinux label one backing file carries (ext4 stores it without an active SELinux).
const LABEL: &[u8] = b"system_u:object_r:ringfs_test_t:s0";

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path")
}

/// `lgetxattr(path, name)`: the value, or the errno.
fn lgetxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let name = CString::new(name).expect("name");
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated strings and a writable buffer of the given length.
    let n = unsafe { libc::lgetxattr(c(path).as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `lsetxattr(path, name, value)`: 0 or the errno.
fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> i32 {
    let name = CString::new(name).expect("name");
    // SAFETY: NUL-terminated strings and a readable buffer of the given length.
    let r = unsafe { libc::lsetxattr(c(path).as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

/// The names `llistxattr(path)` reports.
fn llistxattr(path: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: a NUL-terminated path and a writable buffer of the given length.
    let n = unsafe { libc::llistxattr(c(path).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr {}: {}", path.display(), std::io::Error::last_os_error());
    buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// A backing directory `d` of [`N`] files, `d/f0` with an SELinux label.
fn backing_tree() -> tempfile::TempDir {
    let src = tempfile::tempdir_in("/tmp").expect("tempdir");
    // The mount's root shows this mode: let other users in.
    std::fs::set_permissions(src.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let d = src.path().join("d");
    std::fs::create_dir(&d).expect("mkdir");
    for i in 0..N {
        std::fs::write(d.join(format!("f{i}")), b"x").expect("create");
    }
    assert_eq!(lsetxattr(&d.join("f0"), "security.selinux", LABEL), 0, "label a backing file (root on ext4)");
    src
}

/// GETXATTR requests sent by one `ls -l` of the mount's `d`.
fn ls_l_getxattrs(m: &mut Server) -> f64 {
    let before = m.scrape();
    let out = run(Command::new("ls").arg("-l").arg(m.mountpoint.join("d")));
    assert_eq!(out.lines().filter(|l| l.starts_with('-')).count(), N, "ls -l listed:\n{out}");
    requests(&m.scrape(), "getxattr") - requests(&before, "getxattr")
}

/// `ls -l` asks `security.selinux` (lgetxattr) and `system.posix_acl_access` (getxattr) of
/// every name. The kernel caches the ACL (FUSE_POSIX_ACL) but no negative xattr answer, so by
/// default a cold `ls -l` costs two GETXATTRs per name and a warm one still one. With
/// `lsm_labels=false` the mount has no labels: the first EOPNOTSUPP makes `ls` stop asking for
/// the whole device, leaving one GETXATTR per name cold (the ACL, cached after) and none warm.
/// Labels stay on the backing files; ACLs set through the mount are enforced and visible, and a
/// backing-side ACL change still shows through.
#[test]
fn ls_l_without_lsm_labels_asks_each_name_once_and_acls_still_hold() {
    if !require("ls_l_without_lsm_labels_asks_each_name_once_and_acls_still_hold", false, &[]) {
        return;
    }
    let n = N as f64;

    // Default: labels shown.
    let src = backing_tree();
    let source = src.path().to_path_buf();
    let mut m = Server::ringfs_on(&source, "metrics_addr=127.0.0.1:0", vec![src]);
    let cold = ls_l_getxattrs(&mut m);
    let warm = ls_l_getxattrs(&mut m);
    assert!(
        cold >= 2.0 * n && warm >= n,
        "default mount: ls -l sent {cold} GETXATTRs cold and {warm} warm for {N} names; expected >= 2 and >= 1 \
         per name (coreutils built with SELinux support asks security.selinux of every name)"
    );
    assert_eq!(lgetxattr(&m.mountpoint.join("d/f0"), "security.selinux").as_deref(), Ok(LABEL));
    drop(m);

    // lsm_labels=false.
    let src = backing_tree();
    let source = src.path().to_path_buf();
    let mut m = Server::ringfs_on(&source, "metrics_addr=127.0.0.1:0,allow_other,lsm_labels=false", vec![src]);
    let cold = ls_l_getxattrs(&mut m);
    let warm = ls_l_getxattrs(&mut m);
    assert!(cold <= n + 5.0, "ls -l sent {cold} GETXATTRs cold for {N} names with lsm_labels=false");
    assert!(warm <= 5.0, "ls -l sent {warm} GETXATTRs warm for {N} names with lsm_labels=false");

    // No labels through the mount; the backing file keeps its own.
    let f0 = m.mountpoint.join("d/f0");
    assert_eq!(lgetxattr(&f0, "security.selinux"), Err(libc::EOPNOTSUPP));
    assert_eq!(lsetxattr(&m.mountpoint.join("d/f1"), "security.selinux", LABEL), libc::EOPNOTSUPP);
    assert_eq!(lgetxattr(&m.mountpoint.join("d/f1"), "security.SMACK64"), Err(libc::EOPNOTSUPP));
    assert_eq!(lgetxattr(&source.join("d/f0"), "security.selinux").as_deref(), Ok(LABEL));
    assert_eq!(lgetxattr(&source.join("d/f1"), "security.selinux"), Err(libc::ENODATA));
    // Other names are untouched: user.* both ways, and listings keep them.
    assert_eq!(lsetxattr(&f0, "user.k", b"v"), 0);
    assert_eq!(lgetxattr(&source.join("d/f0"), "user.k").as_deref(), Ok(&b"v"[..]));
    let names = llistxattr(&f0);
    assert!(
        names.contains(&"user.k".to_owned()) && !names.iter().any(|s| s.starts_with("security.selinux")),
        "{names:?}"
    );
    assert!(llistxattr(&source.join("d/f0")).contains(&"security.selinux".to_owned()));

    // An ACL set through the mount is enforced and visible.
    let f2 = m.mountpoint.join("d/f2");
    std::fs::write(&f2, b"secret").expect("write");
    let read_as_nobody = |p: &Path| {
        let p = c(p);
        as_user(NOBODY_UID, NOBODY_GID, move || {
            // SAFETY: open/close of a NUL-terminated path in the forked child.
            let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY) };
            if fd < 0 {
                return errno();
            }
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            0
        })
    };
    // Mode 0644 lets nobody read; a named-user entry of --- takes it away.
    assert_eq!(read_as_nobody(&f2), 0, "nobody reads a 0644 file");
    run(Command::new("setfacl").args(["-m", &format!("u:{NOBODY_UID}:---")]).arg(&f2));
    assert_eq!(read_as_nobody(&f2), libc::EACCES, "the ACL set through the mount is not enforced");
    let acl = run(Command::new("getfacl").args(["-c", "-n"]).arg(&f2));
    assert!(acl.contains(&format!("user:{NOBODY_UID}:---")), "getfacl through the mount:\n{acl}");
    let backing_acl = run(Command::new("getfacl").args(["-c", "-n"]).arg(source.join("d/f2")));
    assert!(backing_acl.contains(&format!("user:{NOBODY_UID}:---")), "backing ACL:\n{backing_acl}");

    // A backing-side change shows through: removing the ACL natively gives nobody read back.
    run(Command::new("setfacl").arg("-b").arg(source.join("d/f2")));
    let shown = wait_until(Duration::from_secs(5), || read_as_nobody(&f2) == 0);
    assert!(shown, "the backing-side ACL removal did not show through the mount");
    let acl = run(Command::new("getfacl").args(["-c", "-n"]).arg(&f2));
    assert!(!acl.contains(&format!("user:{NOBODY_UID}")), "getfacl through the mount after the backing change:\n{acl}");
}

/// Names in `dir` as listed by readdir (sorted, without `.` and `..`).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A backing tree `t` of 20 directories of 30 files and `big` and `big2` of 1500 files (many listing
/// chunks), `t/private` mode 0700.
fn dir_tree() -> tempfile::TempDir {
    let src = tempfile::tempdir_in("/tmp").expect("tempdir");
    std::fs::set_permissions(src.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    for d in 0..20 {
        let dir = src.path().join(format!("t/d{d}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for i in 0..30 {
            std::fs::write(dir.join(format!("f{i}")), b"").expect("create");
        }
    }
    for b in ["big", "big2"] {
        let dir = src.path().join(b);
        std::fs::create_dir(&dir).expect("mkdir");
        for i in 0..1500 {
            std::fs::write(dir.join(format!("a-fairly-long-file-name-{i:05}")), b"").expect("create");
        }
    }
    let private = src.path().join("t/private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
    src
}

/// OPENDIR and RELEASEDIR requests sent by a `find` of the mount's `t`.
fn find_opendirs(m: &mut Server) -> (f64, f64) {
    let before = m.scrape();
    let out = run(Command::new("find").arg(m.mountpoint.join("t")));
    assert_eq!(out.lines().count(), 1 + 21 + 20 * 30, "find listed:\n{out}");
    // RELEASEDIR is sent in the background after close: wait for all of them.
    let opened = requests(&m.scrape(), "opendir") - requests(&before, "opendir");
    let mut after = m.scrape();
    wait_until(Duration::from_secs(5), || {
        after = m.scrape();
        requests(&after, "releasedir") - requests(&before, "releasedir") >= opened
    });
    (opened, requests(&after, "releasedir") - requests(&before, "releasedir"))
}

/// Directories open without OPENDIR/RELEASEDIR by default (zero-message opendir, with the watch
/// and default_permissions): `find` over 21 directories sends one OPENDIR (answered ENOSYS, after
/// which the kernel sends none) instead of 21 OPENDIRs and 21 RELEASEDIRs. Listings stay exact
/// (also of directories read in many chunks, two at a time), the kernel still checks who may
/// list a directory, fsync and file-attribute ioctls on directory descriptors still work, and a
/// backing-side change still shows through.
#[test]
fn directories_open_without_round_trips_and_listings_stay_exact() {
    if !require("directories_open_without_round_trips_and_listings_stay_exact", false, &[]) {
        return;
    }
    // With the requests (the old behaviour), for comparison.
    let src = dir_tree();
    let source = src.path().to_path_buf();
    let mut m = Server::ringfs_on(&source, "metrics_addr=127.0.0.1:0,opendir_requests", vec![src]);
    let (opened, released) = find_opendirs(&mut m);
    assert!(opened >= 21.0 && released >= 21.0, "opendir_requests: {opened} OPENDIRs, {released} RELEASEDIRs");
    drop(m);

    let src = dir_tree();
    let source = src.path().to_path_buf();
    let mut m = Server::ringfs_on(&source, "metrics_addr=127.0.0.1:0,allow_other", vec![src]);
    let (opened, released) = find_opendirs(&mut m);
    assert!(opened <= 1.0 && released == 0.0, "default: {opened} OPENDIRs, {released} RELEASEDIRs for 21 directories");
    let (opened, released) = find_opendirs(&mut m);
    assert!(opened == 0.0 && released == 0.0, "second find: {opened} OPENDIRs, {released} RELEASEDIRs");

    // Two large directories listed in alternation (each many READDIRPLUS chunks with fh 0).
    let (a, b) = (m.mountpoint.join("big"), m.mountpoint.join("big2"));
    let mut ia = std::fs::read_dir(&a).expect("read_dir");
    let mut ib = std::fs::read_dir(&b).expect("read_dir");
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    loop {
        let x = ia.next().map(|e| e.expect("entry").file_name());
        let y = ib.next().map(|e| e.expect("entry").file_name());
        if x.is_none() && y.is_none() {
            break;
        }
        la.extend(x);
        lb.extend(y);
    }
    la.sort();
    lb.sort();
    let want: Vec<std::ffi::OsString> = names(&source.join("big")).into_iter().map(Into::into).collect();
    assert_eq!(la.len(), 1500);
    assert_eq!(la, want, "big listed through the mount");
    assert_eq!(lb, want, "big2 listed through the mount");

    // The kernel checks who may list a directory: nobody may not list a 0700 one.
    let private = c(&m.mountpoint.join("t/private"));
    let listed = as_user(NOBODY_UID, NOBODY_GID, move || {
        // SAFETY: open/close of a NUL-terminated path in the forked child.
        let fd = unsafe { libc::open(private.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
        if fd < 0 {
            return errno();
        }
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        0
    });
    assert_eq!(listed, libc::EACCES, "nobody opened a 0700 directory for listing");

    // fsync and file-attribute ioctls of a directory descriptor (fh 0 at the server).
    let d = std::fs::File::open(m.mountpoint.join("t/d1")).expect("open dir");
    d.sync_all().expect("fsync of a directory");
    run(Command::new("chattr").arg("+A").arg(m.mountpoint.join("t/d1")));
    let flags = run(Command::new("lsattr").arg("-d").arg(source.join("t/d1")));
    assert!(flags.split_whitespace().next().is_some_and(|f| f.contains('A')), "lsattr of the backing dir: {flags}");
    drop(d);

    // A backing-side change shows in the next listing.
    let d2 = m.mountpoint.join("t/d2");
    assert_eq!(names(&d2).len(), 30);
    std::fs::write(source.join("t/d2/new"), b"").expect("create natively");
    std::fs::remove_file(source.join("t/d2/f0")).expect("remove natively");
    let shown = wait_until(Duration::from_secs(5), || {
        let n = names(&d2);
        n.contains(&"new".to_owned()) && !n.contains(&"f0".to_owned())
    });
    assert!(shown, "backing-side changes not in the listing: {:?}", names(&d2));
    assert_eq!(names(&d2), names(&source.join("t/d2")));
}
