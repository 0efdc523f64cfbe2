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
