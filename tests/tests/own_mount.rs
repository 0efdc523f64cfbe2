//! The server never waits on its own mount. A request the server would answer by a system call
//! on its own mount would make it wait for itself: in io_uring mode the kernel routes the inner
//! request to the queue of the caller's CPU, the very thread that is blocked, and the process
//! then hangs in the kernel for good (not even SIGKILL ends it). Every way in is refused: at
//! start-up a mount point inside the backing directory (or the reverse), at run time a backing
//! name that leads into the mount (a bind mount of the mount into its backing directory)
//! answers ELOOP, and symlinks are never followed by the server.
//!
//! Each access runs in a child process under `timeout`, so a regression fails the test instead
//! of hanging it, and every test ends with a SIGTERM that must stop the server in time (a
//! server thread stuck on its own mount could not exit).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use tests::{force_unmount, mounted_fstype, require_root_fuse, Mount};

/// Runs `script` with `sh -c` under a 10 s `timeout`; returns (exit code, stdout + stderr).
/// 124 means the script hung.
fn sh(script: &str) -> (i32, String) {
    let out = Command::new("timeout").args(["10", "sh", "-c", script]).output().expect("run timeout sh -c");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn uring_enabled() -> bool {
    fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y")
}

#[test]
fn mount_point_inside_the_backing_directory_is_refused() {
    if !require_root_fuse("own_mount::mount_point_inside_the_backing_directory_is_refused") {
        return;
    }
    let work = tempfile::tempdir_in("/tmp").unwrap();
    let src = work.path().join("src");
    let sub = src.join("a/sub");
    fs::create_dir_all(&sub).unwrap();
    let (status, out) = match Mount::try_start_at(&src, &sub, &[]) {
        Ok(m) => panic!("mounted {} inside its own backing directory; log:\n{}", m.mountpoint.display(), m.log()),
        Err(e) => e,
    };
    assert!(!status.success(), "exit status {status}");
    assert!(out.contains("is inside the backing directory"), "the error names the cause: {out}");
    assert!(mounted_fstype(&sub).is_none(), "nothing mounted on {}", sub.display());

    // The same through a symlinked mount point: the check compares canonical paths.
    let link = work.path().join("link");
    symlink(&sub, &link).unwrap();
    let (_, out) = match Mount::try_start_at(&src, &link, &[]) {
        Ok(m) => panic!("mounted through a symlink into its own backing directory; log:\n{}", m.log()),
        Err(e) => e,
    };
    assert!(out.contains("is inside the backing directory"), "{out}");
}

#[test]
fn backing_directory_inside_the_mount_point_is_refused() {
    if !require_root_fuse("own_mount::backing_directory_inside_the_mount_point_is_refused") {
        return;
    }
    let work = tempfile::tempdir_in("/tmp").unwrap();
    let mnt = work.path().join("mnt");
    let src = mnt.join("src");
    fs::create_dir_all(&src).unwrap();
    let (status, out) = match Mount::try_start_at(&src, &mnt, &[]) {
        Ok(m) => panic!("mounted over its own backing directory; log:\n{}", m.log()),
        Err(e) => e,
    };
    assert!(!status.success(), "exit status {status}");
    assert!(out.contains("is inside the mount point"), "the error names the cause: {out}");
    assert!(mounted_fstype(&mnt).is_none());
}

/// Bind-mounts the mount into its own backing directory as `loop`, then touches that name
/// through the mount in every way that makes the server resolve it: each answers ELOOP at
/// once, the rest of the mount keeps working, and the server stops on SIGTERM.
fn bind_mount_into_source_answers_eloop(opts: &[&str]) {
    let mut m = Mount::start(opts);
    fs::write(m.backing("file"), b"still served").unwrap();
    fs::create_dir(m.backing("loop")).unwrap();
    let bind = m.backing("loop");
    let (rc, out) = sh(&format!("mount --bind '{}' '{}'", m.mountpoint.display(), bind.display()));
    assert_eq!(rc, 0, "mount --bind: {out}");
    // Unmount the bind mount however the test ends (it pins the FUSE mount).
    struct Unbind<'a>(&'a Path);
    impl Drop for Unbind<'_> {
        fn drop(&mut self) {
            force_unmount(self.0);
        }
    }
    let _unbind = Unbind(&bind);

    let p = m.path("loop");
    let p = p.display();
    for (what, script) in [
        ("stat", format!("stat '{p}'")),
        ("ls of the name", format!("ls '{p}/'")),
        ("open for reading", format!("cat '{p}/file'")),
        ("create through it", format!("echo x > '{p}/new'")),
        ("create on it", format!("echo x > '{p}'")),
        ("mkdir on it", format!("mkdir '{p}'")),
    ] {
        let (rc, out) = sh(&script);
        assert_ne!(rc, 124, "{what} ({script}) hung: the server waited on its own mount; log:\n{}", m.log());
        assert_ne!(rc, 0, "{what} ({script}) reached the mount through itself: {out}");
        assert!(
            out.contains("Too many levels of symbolic links") || out.contains("File exists"),
            "{what} ({script}): expected ELOOP (or EEXIST for mkdir), got: {out}"
        );
    }
    // Listings that look every entry up (READDIRPLUS, find) list the name and move on.
    let (rc, out) = sh(&format!("ls -l '{}'; find '{}' >/dev/null", m.mountpoint.display(), m.mountpoint.display()));
    assert_ne!(rc, 124, "ls -l / find hung; log:\n{}", m.log());
    assert!(out.contains("file"), "the listing still shows the other entries: {out}");
    assert_eq!(fs::read(m.path("file")).unwrap(), b"still served", "the rest of the mount is served");
    assert!(m.log().contains("leads into this mount itself"), "the refusal is logged:\n{}", m.log());

    drop(_unbind);
    let status = m.terminate();
    assert!(status.success(), "exit status {status}; log:\n{}", m.log());
}

#[test]
fn bind_mount_of_the_mount_into_its_backing_directory_answers_eloop() {
    if !require_root_fuse("own_mount::bind_mount_of_the_mount_into_its_backing_directory_answers_eloop") {
        return;
    }
    // Both channels, and lookups both inline and through the rings' io-wq workers.
    let mut configs: Vec<&[&str]> = vec![&["transport=dev-fuse"], &["transport=dev-fuse", "inline_metadata=false"]];
    if uring_enabled() {
        configs.push(&["transport=uring"]);
        configs.push(&["transport=uring", "inline_metadata=false"]);
    } else {
        println!("FUSE over io_uring is off (enable_uring): only the /dev/fuse channel is tested");
        assert!(!tests::in_ci(), "CI=true needs FUSE over io_uring (scripts/setup.sh switches it on)");
    }
    for opts in configs {
        bind_mount_into_source_answers_eloop(opts);
    }
}

#[test]
fn symlink_from_the_backing_directory_to_the_mount_is_not_followed_by_the_server() {
    if !require_root_fuse("own_mount::symlink_from_the_backing_directory_to_the_mount_is_not_followed_by_the_server") {
        return;
    }
    let mut m = Mount::start(&[]);
    fs::write(m.backing("file"), b"data").unwrap();
    symlink(&m.mountpoint, m.backing("to-mount")).unwrap();
    let l = m.path("to-mount");
    // The server hands the link itself to the kernel; the caller's kernel follows it.
    assert_eq!(fs::read_link(&l).unwrap(), m.mountpoint);
    let (rc, out) =
        sh(&format!("ls -l '{}'; cat '{}/file'; find -L '{}' -maxdepth 2", l.display(), l.display(), l.display()));
    assert_ne!(rc, 124, "hung; log:\n{}", m.log());
    assert!(out.contains("data"), "{out}");
    let status = m.terminate();
    assert!(status.success(), "exit status {status}; log:\n{}", m.log());
}
