//! Containment and permission checks through a real ringfs mount.
//!
//! Layout used by the containment tests: the backing directory is `A/backing` with a secret
//! file `A/secret` next to it (outside the backing tree); the mount point is `B/mnt`, a different
//! directory, with a decoy `B/secret`. Symlinks are resolved by the kernel in the caller's mount
//! namespace, so `mnt/x -> ../secret` legitimately reaches `B/secret` (the decoy); what must
//! never happen is that anything read through the mount yields `A/secret`, the file beside the
//! backing directory.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::{as_user, cstr, errno_of, require_root_fuse, Mount, NOBODY_GID, NOBODY_UID};

const SECRET: &[u8] = b"BACKING-SIDE-SECRET";
const DECOY: &[u8] = b"mount-side decoy";

/// Builds `A/backing` + `A/secret`, mounts it on `B/mnt` and writes the decoy `B/secret`.
fn contained_mount(opts: &[&str]) -> (tempfile::TempDir, Mount) {
    let a = tempfile::Builder::new().prefix("ringfs-sec-").tempdir_in("/tmp").unwrap();
    let backing = a.path().join("backing");
    fs::create_dir(&backing).unwrap();
    fs::set_permissions(a.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(a.path().join("secret"), SECRET).unwrap();
    let m = Mount::start_with(&backing, opts);
    fs::write(m.scratch().join("secret"), DECOY).unwrap();
    assert_ne!(m.mountpoint.parent(), backing.parent(), "the layout needs distinct parents");
    (a, m)
}

fn read_or_errno(p: &Path) -> Result<Vec<u8>, i32> {
    fs::read(p).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

#[test]
fn relative_symlinks_do_not_reach_beside_the_backing_dir() {
    if !require_root_fuse("security::relative_symlinks_do_not_reach_beside_the_backing_dir") {
        return;
    }
    let (_a, m) = contained_mount(&[]);
    fs::create_dir_all(m.backing("sub/deeper")).unwrap();
    // Links planted in the backing directory.
    std::os::unix::fs::symlink("../secret", m.backing("esc1")).unwrap();
    std::os::unix::fs::symlink("../../secret", m.backing("sub/esc2")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../secret", m.backing("sub/deeper/esc3")).unwrap();
    std::os::unix::fs::symlink("..", m.backing("up")).unwrap();
    // Links created through the mount.
    std::os::unix::fs::symlink("../secret", m.path("esc4")).unwrap();
    std::os::unix::fs::symlink("../../secret", m.path("sub/esc5")).unwrap();
    assert_eq!(fs::read_link(m.backing("sub/esc5")).unwrap(), Path::new("../../secret"), "targets are stored verbatim");

    for link in ["esc1", "sub/esc2", "esc4", "sub/esc5", "up/secret"] {
        let got = read_or_errno(&m.path(link));
        assert_eq!(got, Ok(DECOY.to_vec()), "{link}: resolves beside the mount point, never beside the backing dir");
    }
    // Deep `..` chains end at / (the kernel clamps at the root): /secret does not exist.
    assert_ne!(read_or_errno(&m.path("sub/deeper/esc3")), Ok(SECRET.to_vec()));
    // `..` of the mount root is the mount point's parent.
    let parent = fs::metadata(m.path("..")).unwrap();
    let b = fs::metadata(m.scratch()).unwrap();
    assert_eq!((parent.dev(), parent.ino()), (b.dev(), b.ino()), "mnt/.. is the mount point's parent");
    assert_eq!(read_or_errno(&m.path("../secret")), Ok(DECOY.to_vec()));
    assert_eq!(read_or_errno(&m.path("sub/../../secret")), Ok(DECOY.to_vec()));
    // Listing every file reachable under the mount (without following links) never shows the secret.
    let mut stack = vec![m.mountpoint.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                assert_ne!(fs::read(e.path()).unwrap(), SECRET, "{} holds the secret", e.path().display());
            }
        }
    }
}

/// One thread flips the backing tree between shapes (`a/b` <-> `b`, and `a` a directory <-> a
/// symlink to `..`) while readers open paths through the mount: a server that resolved names by
/// path walks from the backing root (instead of one component at a time from the parent's
/// handle, refusing symlinks) would at some point read `A/b/name` or `A/secret` through the
/// mount.
#[test]
fn rename_race_never_reaches_outside() {
    if !require_root_fuse("security::rename_race_never_reaches_outside") {
        return;
    }
    let (a, m) = contained_mount(&[]);
    // Outside the backing dir: A/b/name holds the secret, so that `backing/a -> ..` makes
    // backing/a/b/name point at it for anyone who follows symlinks in the backing tree.
    fs::create_dir(a.path().join("b")).unwrap();
    fs::write(a.path().join("b/name"), SECRET).unwrap();
    fs::create_dir_all(m.backing("a/b")).unwrap();
    fs::write(m.backing("a/b/name"), b"inside").unwrap();
    fs::write(m.backing("a/b/x"), b"inside").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicUsize::new(0));
    let flipper = {
        let (stop, flips) = (stop.clone(), flips.clone());
        let backing = m.source.clone();
        std::thread::spawn(move || {
            let p = |s: &str| backing.join(s);
            while !stop.load(Ordering::Relaxed) {
                // a/b -> b and back.
                let _ = fs::rename(p("a/b"), p("b"));
                let _ = fs::rename(p("b"), p("a/b"));
                // a: directory -> symlink to the backing dir's parent -> directory.
                if fs::rename(p("a"), p("a.real")).is_ok() {
                    let _ = std::os::unix::fs::symlink("..", p("a"));
                    let _ = fs::remove_file(p("a"));
                    let _ = fs::rename(p("a.real"), p("a"));
                }
                flips.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let paths = ["a/b/name", "b/name", "a/b/../../../secret", "a/b/../../secret", "b/../../secret", "a/b/x/../name"];
    // Path opens by the readers, and those that read a file.
    let (attempted, read) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let stop = stop.clone();
            let (attempted, read) = (attempted.clone(), read.clone());
            let mnt = m.mountpoint.clone();
            std::thread::spawn(move || {
                let (mut attempts, mut reads) = (0usize, 0usize);
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let rel = paths[n % paths.len()];
                    n += 1;
                    attempts += 1;
                    attempted.fetch_add(1, Ordering::Relaxed);
                    if let Ok(data) = fs::read(mnt.join(rel)) {
                        assert_ne!(data, SECRET, "read the secret beside the backing dir through mnt/{rel}");
                        reads += 1;
                        read.fetch_add(1, Ordering::Relaxed);
                    }
                    // Directory-fd relative opens, too.
                    if let Ok(d) = fs::File::open(mnt.join("a/b")) {
                        use std::os::fd::AsRawFd;
                        let c = cstr("../../secret");
                        // SAFETY: valid dir fd and path.
                        let fd = unsafe { libc::openat(d.as_raw_fd(), c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                        if fd >= 0 {
                            // SAFETY: fd is ours.
                            let mut f: fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
                            let mut data = Vec::new();
                            let _ = std::io::Read::read_to_end(&mut f, &mut data);
                            assert_ne!(data, SECRET, "openat(mnt/a/b, ../../secret) read the secret");
                        }
                    }
                }
                (attempts, reads)
            })
        })
        .collect();
    // Three seconds of racing, and on a slow machine until the race has provably run (the
    // counts asserted below), for at most a minute.
    let start = Instant::now();
    tests::wait_until(Duration::from_secs(60), || {
        start.elapsed() >= Duration::from_secs(3)
            && flips.load(Ordering::Relaxed) > 100
            && attempted.load(Ordering::Relaxed) > 100
            && read.load(Ordering::Relaxed) > 0
    });
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    let (attempts, reads) =
        readers.into_iter().map(|r| r.join().unwrap()).fold((0, 0), |(a, r), (a2, r2)| (a + a2, r + r2));
    let flips = flips.load(Ordering::Relaxed);
    eprintln!("rename race: {flips} flips, {attempts} path opens, {reads} of them read a file");
    assert!(flips > 100, "the flipper ran ({flips} flips)");
    assert!(attempts > 100, "the readers ran ({attempts} attempts)");
    assert!(reads > 0, "some paths resolved while the tree was flipping ({reads} reads)");
    // The mount still works afterwards.
    let _ = fs::rename(m.backing("b"), m.backing("a/b"));
    assert!(tests::wait_until(Duration::from_secs(5), || fs::read(m.path("a/b/name")).is_ok_and(|d| d == b"inside")));
}

#[test]
fn default_permissions_protect_root_files_from_others() {
    if !require_root_fuse("security::default_permissions_protect_root_files_from_others") {
        return;
    }
    let m = Mount::start(&["allow_other", "default_permissions"]);
    fs::write(m.path("private"), b"root only").unwrap();
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.path("public"), b"everyone").unwrap();
    fs::set_permissions(m.path("public"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(m.path("closed")).unwrap();
    fs::set_permissions(m.path("closed"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.path("closed/inner"), b"x").unwrap();
    fs::set_permissions(m.path("closed/inner"), fs::Permissions::from_mode(0o644)).unwrap();
    let (private, public, inner, root) =
        (cstr(m.path("private")), cstr(m.path("public")), cstr(m.path("closed/inner")), cstr(&m.mountpoint));
    let open = |p: &std::ffi::CString, flags: i32| {
        let ptr = p.as_ptr();
        move || {
            // SAFETY: open/close on a prepared path in the forked child.
            unsafe {
                let fd = libc::open(ptr, flags);
                if fd < 0 {
                    return *libc::__errno_location();
                }
                libc::close(fd);
                0
            }
        }
    };
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, open(&public, libc::O_RDONLY)), 0, "allow_other lets nobody in");
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, open(&root, libc::O_RDONLY)), 0, "nobody lists the mount root");
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, open(&private, libc::O_RDONLY)), libc::EACCES, "0600 root file");
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, open(&public, libc::O_WRONLY)), libc::EACCES, "0644 root file, write");
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, open(&inner, libc::O_RDONLY)), libc::EACCES, "search permission");
    // Creating in the root-owned 0755 mount root is refused, and nothing appears in the backing dir.
    let newfile = cstr(m.path("intruder"));
    let create = open(&newfile, libc::O_WRONLY | libc::O_CREAT);
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, create), libc::EACCES);
    assert!(!m.backing("intruder").exists());
    // chmod of a file one does not own.
    let chmod = || {
        // SAFETY: chmod on a prepared path in the forked child.
        unsafe {
            if libc::chmod(public.as_ptr(), 0o666) == 0 {
                0
            } else {
                *libc::__errno_location()
            }
        }
    };
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, chmod), libc::EPERM);
    assert_eq!(fs::metadata(m.backing("public")).unwrap().mode() & 0o777, 0o644);
}

#[test]
fn without_allow_other_others_get_eacces() {
    if !require_root_fuse("security::without_allow_other_others_get_eacces") {
        return;
    }
    let m = Mount::start(&[]);
    fs::write(m.path("f"), b"x").unwrap();
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o644)).unwrap();
    let (root, f) = (cstr(&m.mountpoint), cstr(m.path("f")));
    let stat = |p: &std::ffi::CString| {
        let ptr = p.as_ptr();
        move || {
            // SAFETY: stat on a prepared path into a stack buffer, in the forked child.
            unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::stat(ptr, &mut st) == 0 {
                    0
                } else {
                    *libc::__errno_location()
                }
            }
        }
    };
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, stat(&root)), libc::EACCES, "stat of the mount root");
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, stat(&f)), libc::EACCES, "stat of a 0644 file");
    assert_eq!(as_user(0, 0, stat(&f)), 0, "root (the mounter) gets in");
}

/// Runs `setfacl ARGS` (package acl) and asserts that it worked.
fn setfacl(args: &[&str], path: &Path) {
    let out = std::process::Command::new("setfacl").args(args).arg(path).output().expect("run setfacl (package acl)");
    assert!(out.status.success(), "setfacl {args:?} {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
}

/// `getfacl -c` of `path` (comments off, effective rights omitted).
fn getfacl(path: &Path) -> String {
    let out = std::process::Command::new("getfacl")
        .args(["-c", "-E", "-p"])
        .arg(path)
        .output()
        .expect("run getfacl (package acl)");
    assert!(out.status.success(), "getfacl {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn posix_acls_grant_deny_and_inherit_as_on_the_backing_file_system() {
    if !require_root_fuse("security::posix_acls_grant_deny_and_inherit_as_on_the_backing_file_system") {
        return;
    }
    let m = Mount::start(&["allow_other"]);
    // An ACL entry that denies what the mode bits would allow (other::r--).
    fs::write(m.backing("denied"), b"not for nobody").unwrap();
    fs::set_permissions(m.backing("denied"), fs::Permissions::from_mode(0o644)).unwrap();
    setfacl(&["-m", &format!("u:{NOBODY_UID}:---")], &m.backing("denied"));
    // An ACL entry that grants what the mode bits would refuse (0600 root file).
    fs::write(m.backing("granted"), b"for nobody").unwrap();
    fs::set_permissions(m.backing("granted"), fs::Permissions::from_mode(0o600)).unwrap();
    setfacl(&["-m", &format!("u:{NOBODY_UID}:r")], &m.backing("granted"));
    // A root directory that nobody may write only through its ACL, with a default ACL.
    fs::create_dir(m.backing("shared")).unwrap();
    fs::set_permissions(m.backing("shared"), fs::Permissions::from_mode(0o755)).unwrap();
    setfacl(&["-m", &format!("u:{NOBODY_UID}:rwx"), "-d", "-m", &format!("u:{NOBODY_UID}:rwx")], &m.backing("shared"));
    let (denied, granted) = (cstr(m.path("denied")), cstr(m.path("granted")));
    let created = cstr(m.path("shared/by-nobody"));
    let open = |p: &std::ffi::CString, flags: i32| {
        let ptr = p.as_ptr();
        move || {
            // SAFETY: open/close on a prepared path in the forked child.
            unsafe {
                let fd = libc::open(ptr, flags, 0o666);
                if fd < 0 {
                    return *libc::__errno_location();
                }
                libc::close(fd);
                0
            }
        }
    };
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, open(&denied, libc::O_RDONLY)), libc::EACCES, "ACL entry ---");
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, open(&granted, libc::O_RDONLY)), 0, "ACL entry r--");
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, open(&granted, libc::O_WRONLY)), libc::EACCES, "ACL entry r--, write");
    assert_eq!(
        as_user(NOBODY_UID, NOBODY_GID, open(&created, libc::O_WRONLY | libc::O_CREAT)),
        0,
        "create in a directory whose ACL lets nobody write"
    );
    assert_eq!(fs::metadata(m.backing("shared/by-nobody")).unwrap().uid(), NOBODY_UID);
    // Inheritance: a default ACL replaces the creator's umask, here and natively alike.
    let mkdir_file_with_umask = |dir: &Path| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("umask 077 && : > \"$1/f\" && mkdir \"$1/d\"")
            .args(["sh", dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    fs::create_dir(m.backing("native")).unwrap();
    setfacl(&["-m", &format!("u:{NOBODY_UID}:rwx"), "-d", "-m", &format!("u:{NOBODY_UID}:rwx")], &m.backing("native"));
    mkdir_file_with_umask(&m.backing("native"));
    mkdir_file_with_umask(&m.path("shared"));
    for name in ["f", "d"] {
        let native = getfacl(&m.backing(format!("native/{name}")));
        assert!(native.contains("mask::rw"), "native {name} inherits the default ACL: {native}");
        assert_eq!(getfacl(&m.backing(format!("shared/{name}"))), native, "{name} created through the mount");
        assert_eq!(getfacl(&m.path(format!("shared/{name}"))), native, "{name} seen through the mount");
    }
    // Without a default ACL the umask applies as usual.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 027 && : > \"$1/plain\" && mkdir \"$1/plain-d\"")
        .args(["sh", m.mountpoint.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(fs::metadata(m.backing("plain")).unwrap().mode() & 0o777, 0o640);
    assert_eq!(fs::metadata(m.backing("plain-d")).unwrap().mode() & 0o777, 0o750);
    // An ACL changed through the mount takes effect at once.
    setfacl(&["-m", &format!("u:{NOBODY_UID}:r")], &m.path("denied"));
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, open(&denied, libc::O_RDONLY)), 0, "ACL set through the mount");
    setfacl(&["-b"], &m.path("granted"));
    assert_eq!(as_user(NOBODY_UID, NOBODY_GID, open(&granted, libc::O_RDONLY)), libc::EACCES, "ACL removed");
    // And one changed on the backing directory reaches the kernel's ACL cache (the watch's
    // inode invalidation drops it).
    setfacl(&["-m", &format!("u:{NOBODY_UID}:---")], &m.backing("denied"));
    assert!(
        tests::wait_until(Duration::from_secs(10), || as_user(NOBODY_UID, NOBODY_GID, open(&denied, libc::O_RDONLY))
            == libc::EACCES),
        "an ACL set on the backing file is enforced through the mount"
    );
}

/// A 4 KiB block aligned for O_DIRECT, written by the forked writers below.
#[repr(align(4096))]
struct Block([u8; 4096]);
static BLOCK: Block = Block([b'w'; 4096]);

/// Writes and fallocate by anyone without CAP_FSETID clear set-uid, and set-gid where group
/// execution makes it one or the writer is outside the group, the file's owner included,
/// buffered and O_DIRECT, also when the file is already open through passthrough (whose writes
/// run with the server's credentials); the mount shows the cleared mode right after. Root's
/// writes keep the bits. (xfstests generic/355, 683-685.)
#[test]
fn writes_clear_set_id_bits_like_the_backing_file_system() {
    if !require_root_fuse("security::writes_clear_set_id_bits_like_the_backing_file_system") {
        return;
    }
    let m = Mount::start(&["allow_other"]);
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o755)).unwrap();
    // `extra` open flags; `FALLOC` (not an open flag) means fallocate instead of pwrite.
    const FALLOC: i32 = 1 << 30;
    // Open only (with O_TRUNC: the truncating open clears the bits).
    const OPEN_ONLY: i32 = 1 << 29;
    let write_as = |uid: u32, p: &Path, extra: i32| {
        let path = cstr(p);
        let write = move || {
            // SAFETY: open/pwrite/fallocate/close in the forked child, from a static buffer.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | (extra & !FALLOC & !OPEN_ONLY));
                if fd < 0 {
                    return *libc::__errno_location();
                }
                let ok = if extra & OPEN_ONLY != 0 {
                    true
                } else if extra & FALLOC != 0 {
                    libc::fallocate(fd, 0, 0, 8192) == 0
                } else {
                    libc::pwrite(fd, BLOCK.0.as_ptr().cast(), BLOCK.0.len(), 0) == 4096
                };
                let e = *libc::__errno_location();
                libc::close(fd);
                if ok {
                    0
                } else {
                    e.max(1)
                }
            }
        };
        if uid == 0 {
            write()
        } else {
            as_user(uid, NOBODY_GID, write)
        }
    };
    // (name, owner, group, mode before, writer, open flags or FALLOC, hold a root passthrough
    // open, mode after). Set-gid without group execute goes only for a writer outside the group.
    let cases = [
        ("owner-buffered", NOBODY_UID, NOBODY_GID, 0o6754, NOBODY_UID, 0, false, 0o0754),
        ("owner-direct", NOBODY_UID, NOBODY_GID, 0o6754, NOBODY_UID, libc::O_DIRECT, false, 0o0754),
        ("owner-suid-only", NOBODY_UID, NOBODY_GID, 0o4644, NOBODY_UID, 0, false, 0o0644),
        ("in-group-sgid-without-gx", 0, NOBODY_GID, 0o6666, NOBODY_UID, 0, false, 0o2666),
        ("outside-group-sgid-without-gx", 0, 0, 0o6666, NOBODY_UID, 0, false, 0o0666),
        ("other-held-open", 0, NOBODY_GID, 0o6676, NOBODY_UID, 0, true, 0o0676),
        ("fallocate", 0, 0, 0o6676, NOBODY_UID, FALLOC, false, 0o0676),
        ("truncating-open", 0, 0, 0o6676, NOBODY_UID, OPEN_ONLY | libc::O_TRUNC, false, 0o0676),
        ("root-keeps", 0, 0, 0o6755, 0, 0, false, 0o6755),
    ];
    for (name, owner, group, before, writer, extra, hold, after) in cases {
        let p = m.path(name);
        fs::write(&p, b"set-id test").unwrap();
        std::os::unix::fs::chown(&p, Some(owner), Some(group)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(before)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, before, "{name}: mode before");
        let held = hold.then(|| fs::File::open(&p).unwrap());
        assert_eq!(write_as(writer, &p, extra), 0, "{name}: the write failed");
        drop(held);
        let seen = fs::metadata(&p).unwrap().mode() & 0o7777;
        let backing = fs::metadata(m.backing(name)).unwrap().mode() & 0o7777;
        assert_eq!((seen, backing), (after, after), "{name}: mode {before:o} after the write (mount, backing)");
    }
}

/// An owner outside a file's group who sets its access ACL loses set-gid, as natively, while an
/// owner in the group keeps it; for files and directories (xfstests generic/375).
#[test]
fn setting_an_acl_outside_the_group_clears_set_gid() {
    if !require_root_fuse("security::setting_an_acl_outside_the_group_clears_set_gid") {
        return;
    }
    let m = Mount::start(&["allow_other"]);
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o755)).unwrap();
    let (owner, group, other_group) = (NOBODY_UID, NOBODY_GID, NOBODY_GID - 1);
    for dir in [false, true] {
        for (caller_gid, keeps) in [(group, true), (other_group, false)] {
            let name = format!("{}-{caller_gid}", if dir { "dir" } else { "file" });
            let p = m.path(&name);
            if dir {
                fs::create_dir(&p).unwrap();
            } else {
                fs::write(&p, b"").unwrap();
            }
            std::os::unix::fs::chown(&p, Some(owner), Some(group)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o2755)).unwrap();
            let out = std::process::Command::new("setpriv")
                .args([&format!("--reuid={owner}"), &format!("--regid={caller_gid}"), "--clear-groups"])
                .args(["setfacl", "-m", "u::rwx,g::rwx,o::rwx"])
                .arg(&p)
                .output()
                .expect("run setpriv setfacl");
            assert!(out.status.success(), "{name}: setfacl: {}", String::from_utf8_lossy(&out.stderr));
            let want = if keeps { 0o2777 } else { 0o0777 };
            let seen = fs::metadata(&p).unwrap().mode() & 0o7777;
            let backing = fs::metadata(m.backing(&name)).unwrap().mode() & 0o7777;
            assert_eq!((seen, backing), (want, want), "{name}: caller gid {caller_gid} (mount, backing)");
        }
    }
}

/// chown clears set-uid and set-gid as it does natively: set-uid always (even for root),
/// set-gid only where group execution makes it one or the caller is neither in the file's group
/// nor root (xfstests generic/193). Compared with the same steps on the backing file system.
#[test]
fn chown_clears_set_id_bits_like_the_backing_file_system() {
    if !require_root_fuse("security::chown_clears_set_id_bits_like_the_backing_file_system") {
        return;
    }
    let m = Mount::start(&["allow_other"]);
    fs::set_permissions(&m.mountpoint, fs::Permissions::from_mode(0o755)).unwrap();
    let native = m.backing("native");
    fs::create_dir(&native).unwrap();
    // (name, mode, new owner, new group, as the file's owner instead of root)
    let cases = [
        ("root-no-exec", 0o6644, NOBODY_UID, NOBODY_GID, false),
        ("root-user-exec", 0o6744, NOBODY_UID, NOBODY_GID, false),
        ("root-group-exec", 0o6654, NOBODY_UID, NOBODY_GID, false),
        ("root-all-exec", 0o6755, NOBODY_UID, NOBODY_GID, false),
        ("root-group-only", 0o2644, u32::MAX, NOBODY_GID, false),
        ("owner-own-group-no-exec", 0o6644, u32::MAX, NOBODY_GID, true),
        ("owner-own-group-exec", 0o6654, u32::MAX, NOBODY_GID, true),
    ];
    for (name, mode, uid, gid, as_owner) in cases {
        let mut seen = Vec::new();
        for p in [m.path(name), native.join(name)] {
            fs::write(&p, b"x").unwrap();
            std::os::unix::fs::chown(&p, Some(if as_owner { NOBODY_UID } else { 0 }), Some(NOBODY_GID)).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let c = cstr(&p);
            let r = if as_owner {
                as_user(NOBODY_UID, NOBODY_GID, || {
                    // SAFETY: chown of a NUL-terminated path in the forked child.
                    errno_of(unsafe { libc::chown(c.as_ptr(), uid, gid) } as _)
                })
            } else {
                // SAFETY: chown of a NUL-terminated path.
                errno_of(unsafe { libc::chown(c.as_ptr(), uid, gid) } as _)
            };
            assert_eq!(r, 0, "{name}: chown of {}", p.display());
            seen.push(fs::metadata(&p).unwrap().mode() & 0o7777);
        }
        let through_backing = fs::metadata(m.backing(name)).unwrap().mode() & 0o7777;
        assert_eq!(
            (seen[0], through_backing),
            (seen[1], seen[1]),
            "{name}: mode {mode:o} after chown (mount, its backing file) vs native"
        );
    }
}
