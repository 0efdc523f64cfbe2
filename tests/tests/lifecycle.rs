//! The server's life: clean shutdown on SIGTERM/SIGINT, the watchdog after SIGKILL, start-up
//! errors, and what the mount looks like in /proc/self/mountinfo.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tests::{mount_at, require_root_fuse, run_ringfs, wait_until, Mount, FSTYPE};

/// `stat(path)` works (no ENOTCONN from a dead FUSE connection).
fn stat_ok(p: &Path) -> Result<fs::Metadata, std::io::Error> {
    fs::metadata(p)
}

#[test]
fn sigterm_exits_zero_and_unmounts() {
    if !require_root_fuse("lifecycle::sigterm_exits_zero_and_unmounts") {
        return;
    }
    let mut m = Mount::start(&[]);
    fs::write(m.path("kept"), b"data").unwrap();
    let under = fs::metadata(m.scratch()).unwrap().dev();
    let status = m.terminate();
    assert!(status.success(), "SIGTERM: exit status {status}; log:\n{}", m.log());
    assert!(!m.is_mounted(), "still mounted after the server exited");
    let md = stat_ok(&m.mountpoint).expect("stat of the mount point after shutdown");
    assert_eq!(md.dev(), under, "the mount point is the plain directory again");
    assert_eq!(fs::read_dir(&m.mountpoint).unwrap().count(), 0);
    assert_eq!(fs::read(m.backing("kept")).unwrap(), b"data", "data survives in the backing dir");
}

#[test]
fn sigint_exits_zero_and_unmounts() {
    if !require_root_fuse("lifecycle::sigint_exits_zero_and_unmounts") {
        return;
    }
    let mut m = Mount::start(&[]);
    m.signal(libc::SIGINT);
    let status = m.wait_exit(Duration::from_secs(10)).expect("ringfs exits within 10 s of SIGINT");
    assert!(status.success(), "SIGINT: exit status {status}; log:\n{}", m.log());
    assert!(!m.is_mounted());
}

#[test]
fn sigterm_while_busy_detaches_then_exits_when_released() {
    if !require_root_fuse("lifecycle::sigterm_while_busy_detaches_then_exits_when_released") {
        return;
    }
    let mut m = Mount::start(&[]);
    fs::write(m.path("open"), b"held open").unwrap();
    let mut f = fs::File::open(m.path("open")).unwrap();
    m.signal(libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(3), || !m.is_mounted()), "a busy mount is detached promptly on SIGTERM");
    // The last user may still finish its work on the detached mount.
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "held open");
    assert!(m.server_running(), "the server waits for the detached mount's last user");
    drop(f);
    let status = m.wait_exit(Duration::from_secs(5)).expect("ringfs exits once the last user is gone");
    assert!(status.success(), "exit status {status}; log:\n{}", m.log());
}

#[test]
fn sigkill_watchdog_unmounts_and_remount_works() {
    if !require_root_fuse("lifecycle::sigkill_watchdog_unmounts_and_remount_works") {
        return;
    }
    let mut m = Mount::start(&[]);
    fs::write(m.backing("file"), b"after restart").unwrap();
    assert_eq!(fs::read(m.path("file")).unwrap(), b"after restart");
    let killed = Instant::now();
    m.kill9();
    assert!(
        wait_until(Duration::from_secs(2), || !m.is_mounted()),
        "the watchdog did not unmount within 2 s of SIGKILL; log:\n{}",
        m.log()
    );
    let took = killed.elapsed();
    let md = stat_ok(&m.mountpoint).unwrap_or_else(|e| panic!("stat(mount point) after SIGKILL: {e}"));
    assert!(md.is_dir());
    eprintln!("watchdog unmounted {took:?} after SIGKILL");
    // No watchdog (or other ringfs process) lingers holding the mount point.
    let again = Mount::start_at(&m.source, &m.mountpoint, &[]);
    assert_eq!(fs::read(again.path("file")).unwrap(), b"after restart", "a new mount on the same point works at once");
    drop(again);
}

#[test]
fn sigkill_with_open_files_does_not_hang_users() {
    if !require_root_fuse("lifecycle::sigkill_with_open_files_does_not_hang_users") {
        return;
    }
    let mut m = Mount::start(&[]);
    fs::write(m.path("f"), b"x").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    let f = fs::File::open(m.path("f")).unwrap();
    let d = fs::File::open(m.path("d")).unwrap();
    m.kill9();
    assert!(wait_until(Duration::from_secs(2), || !m.is_mounted()), "watchdog unmount with open files");
    stat_ok(&m.mountpoint).expect("stat(mount point)");
    // Users of the dead mount get an answer (data or an error), never a hang.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut f = f;
        let mut buf = Vec::new();
        let r = f.read_to_end(&mut buf).map(|_| buf);
        let _ = tx.send(r.map_err(|e| e.raw_os_error()));
        drop(d);
    });
    let r = rx.recv_timeout(Duration::from_secs(5)).expect("a read on the killed mount hangs");
    eprintln!("read after SIGKILL: {r:?}");
}

/// Checks a start-up failure: non-zero exit, exactly one line on stderr that names `names`,
/// and nothing mounted at `mountpoint`.
fn assert_startup_error(args: &[&std::ffi::OsStr], names: &Path, mountpoint: &Path) {
    let out = run_ringfs(args, Duration::from_secs(10));
    assert!(!out.status.success(), "ringfs {args:?} succeeded; stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got:\n{}", out.stderr);
    assert!(lines[0].contains(&*names.to_string_lossy()), "the message names {}: {:?}", names.display(), lines[0]);
    assert!(mount_at(mountpoint).is_none(), "something is mounted at {}", mountpoint.display());
    // (Other tests mount concurrently: look only at this test's directory.)
    let dir = mountpoint.parent().unwrap();
    let ours: Vec<_> = tests::mountinfo().into_iter().filter(|m| m.mountpoint.starts_with(dir)).collect();
    assert!(ours.is_empty(), "mounts under {}: {ours:?}", dir.display());
}

#[test]
fn startup_errors_are_one_line_and_mount_nothing() {
    if !require_root_fuse("lifecycle::startup_errors_are_one_line_and_mount_nothing") {
        return;
    }
    let dir = tempfile::Builder::new().prefix("ringfs-err-").tempdir_in("/tmp").unwrap();
    let src = dir.path().join("src");
    let mnt = dir.path().join("mnt");
    let file = dir.path().join("file");
    let missing = dir.path().join("missing");
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(&file, b"not a directory").unwrap();
    let m = |a: &Path, b: &Path| -> Vec<std::ffi::OsString> {
        vec!["mount".into(), a.into(), b.into(), "-o".into(), "metrics_addr=".into()]
    };
    let run = |args: Vec<std::ffi::OsString>, names: &Path, mountpoint: &Path| {
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        assert_startup_error(&refs, names, mountpoint);
    };
    run(m(&missing, &mnt), &missing, &mnt);
    run(m(&src, &missing), &missing, &missing);
    run(m(&file, &mnt), &file, &mnt);
    run(m(&src, &file), &file, &file);
    assert!(!missing.exists(), "ringfs must not create a missing mount point");
}

/// A user who may not mount there (nobody, on root's directory) is refused by fusermount3, with
/// the reason in the last line, and nothing is mounted. (A user's own mount:
/// tests/tests/unprivileged.rs.)
#[test]
fn user_without_access_to_the_mount_point_is_refused() {
    let test = "lifecycle::user_without_access_to_the_mount_point_is_refused";
    if !tests::require_root_fuse_setpriv(test) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("ringfs-nr-").tempdir_in("/tmp").unwrap();
    fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fs::create_dir(dir.path().join("src")).unwrap();
    fs::create_dir(dir.path().join("mnt")).unwrap();
    let script = format!(
        "exec '{}' mount '{}/src' '{}/mnt' -o metrics_addr=",
        tests::ringfs_bin().display(),
        dir.path().display(),
        dir.path().display()
    );
    let out = tests::run_as(tests::NOBODY_UID, tests::NOBODY_GID, &script);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(126) || out.status.code() == Some(127) {
        tests::skip(test, &format!("nobody cannot execute the binary: {stderr}"));
        return;
    }
    assert!(!out.status.success(), "ringfs ran as nobody on root's mount point and succeeded");
    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default();
    assert!(last.contains("fusermount3") && last.contains("failed"), "the error names fusermount3: {stderr}");
    assert!(mount_at(&dir.path().join("mnt")).is_none());
}

#[test]
fn mountinfo_shows_fstype_and_fsname() {
    if !require_root_fuse("lifecycle::mountinfo_shows_fstype_and_fsname") {
        return;
    }
    let m = Mount::start(&[]);
    let info = mount_at(&m.mountpoint).expect("mounted");
    assert_eq!(info.fstype, FSTYPE);
    assert_eq!(Path::new(&info.source), m.source, "the default fsname is the backing directory");
    assert!(info.super_options.contains("default_permissions"), "default_permissions is the default: {info:?}");
    assert!(!info.super_options.contains("allow_other"), "allow_other is off by default: {info:?}");
    drop(m);
    let m = Mount::start(&["fsname=my-data", "allow_other"]);
    let info = mount_at(&m.mountpoint).expect("mounted");
    assert_eq!(info.source, "my-data");
    assert!(info.super_options.contains("allow_other"), "{info:?}");
    // /proc/mounts agrees.
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(&*m.mountpoint.to_string_lossy()))
        .expect("the mount in /proc/mounts");
    assert_eq!(line.split(' ').nth(2), Some(FSTYPE), "{line}");
}

/// Where mount(8) finds `ringfs` for `mount -t fuse.ringfs` (it runs mount.fuse3 with this
/// fixed PATH, not the caller's).
const HELPER_PATH: &[&str] = &["/usr/local/sbin", "/usr/local/bin", "/sbin", "/bin", "/usr/sbin", "/usr/bin"];

#[test]
fn mount_t_fuse_ringfs_goes_through_mount_fuse3() {
    let test = "lifecycle::mount_t_fuse_ringfs_goes_through_mount_fuse3";
    if !require_root_fuse(test) {
        return;
    }
    let Some(installed) = HELPER_PATH.iter().map(|d| Path::new(d).join("ringfs")).find(|p| p.exists()) else {
        tests::skip(test, "no ringfs on mount(8)'s PATH (scripts/test.sh installs /usr/local/sbin/ringfs)");
        return;
    };
    if fs::read(&installed).ok() != fs::read(tests::ringfs_bin()).ok() {
        eprintln!("note: {} differs from the ringfs under test", installed.display());
    }
    let src = tempfile::tempdir_in("/tmp").unwrap();
    let mnt = tempfile::tempdir_in("/tmp").unwrap();
    fs::write(src.path().join("hello"), b"from the backing directory").unwrap();
    // As an fstab line `SRC MNT fuse.ringfs allow_other,... 0 0` would mount it: mount(8) runs
    // mount.fuse3, which runs `ringfs SRC MNT -o OPTIONS`; that backgrounds once mounted.
    // Its output is read to end-of-file, as `$(mount ...)` would: the backgrounded server (and
    // its watchdog) must not keep those pipes open.
    let mut child = std::process::Command::new("mount")
        .args(["-t", "fuse.ringfs"])
        .arg(src.path())
        .arg(mnt.path())
        .args(["-o", "allow_other,nosuid,metrics_addr="])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run mount(8)");
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        let _ = stdout.read_to_string(&mut o);
        let _ = stderr.read_to_string(&mut e);
        let _ = tx.send(e);
    });
    let status = child.wait().expect("wait for mount(8)");
    let err = rx.recv_timeout(Duration::from_secs(10));
    if err.is_err() {
        let _ = std::process::Command::new("umount").arg("-l").arg(mnt.path()).status();
        panic!("mount(8) exited but its output pipes stayed open: the background server holds them");
    }
    assert!(status.success(), "mount -t fuse.ringfs: {}", err.unwrap_or_default());
    let info = mount_at(mnt.path()).expect("mounted as soon as mount(8) returns");
    assert_eq!(info.fstype, FSTYPE);
    assert!(info.super_options.contains("allow_other"), "{info:?}");
    assert_eq!(fs::read(mnt.path().join("hello")).unwrap(), b"from the backing directory");
    fs::write(mnt.path().join("back"), b"through the mount").unwrap();
    assert_eq!(fs::read(src.path().join("back")).unwrap(), b"through the mount");
    // `mount -o remount,ro` runs the helper again with `remount` in the options: the mount turns
    // read-only in place (the same server keeps serving), and back.
    let remount = |opts: &str| {
        let out = std::process::Command::new("mount").args(["-o", opts]).arg(mnt.path()).output().expect("mount(8)");
        assert!(out.status.success(), "mount -o {opts}: {}", String::from_utf8_lossy(&out.stderr));
    };
    remount("remount,ro");
    let info = mount_at(mnt.path()).expect("still mounted after remount,ro");
    let ro = |opts: &str| opts.split(',').any(|o| o == "ro");
    assert!(ro(&info.mount_options) || ro(&info.super_options), "{info:?}");
    let e = fs::write(mnt.path().join("denied"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "write on a read-only remount: {e}");
    assert_eq!(fs::read(mnt.path().join("back")).unwrap(), b"through the mount");
    remount("remount,rw");
    fs::write(mnt.path().join("again"), b"writable again").unwrap();
    assert_eq!(fs::read(src.path().join("again")).unwrap(), b"writable again");
    let out = std::process::Command::new("umount").arg(mnt.path()).output().expect("run umount(8)");
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_until(Duration::from_secs(5), || mount_at(mnt.path()).is_none()));
}

/// The libfuse convention xfstests (`FSTYP=fuse`) and fstab lines use: `mount -t fuse.ringfs TAG
/// MNT -o source=DIR`: the tag names the mount in /proc/mounts, and `subtype=` (empty) mounts as
/// plain type `fuse`.
#[test]
fn mount_tag_with_source_option_and_plain_fuse_type() {
    let test = "lifecycle::mount_tag_with_source_option_and_plain_fuse_type";
    if !require_root_fuse(test) {
        return;
    }
    if !HELPER_PATH.iter().any(|d| Path::new(d).join("ringfs").exists()) {
        tests::skip(test, "no ringfs on mount(8)'s PATH (scripts/test.sh installs /usr/local/sbin/ringfs)");
        return;
    }
    let src = tempfile::tempdir_in("/tmp").unwrap();
    let mnt = tempfile::tempdir_in("/tmp").unwrap();
    fs::write(src.path().join("tagged"), b"behind a tag").unwrap();
    let opts = format!("source={},subtype=,metrics_addr=", src.path().display());
    let out = std::process::Command::new("mount")
        .args(["-t", "fuse.ringfs", "ringfs-tag"])
        .arg(mnt.path())
        .args(["-o", &opts])
        .output()
        .expect("run mount(8)");
    assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "a successful mount prints nothing: {out:?}");
    let info = mount_at(mnt.path()).expect("mounted");
    assert_eq!((info.source.as_str(), info.fstype.as_str()), ("ringfs-tag", "fuse"), "{info:?}");
    assert_eq!(fs::read(mnt.path().join("tagged")).unwrap(), b"behind a tag");
    let out = std::process::Command::new("umount").arg(mnt.path()).output().expect("run umount(8)");
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_until(Duration::from_secs(5), || mount_at(mnt.path()).is_none()));
}

/// A process in a copy of our mount namespace (it holds a copy of every mount); killed on drop.
struct NamespaceHolder(std::process::Child);

impl Drop for NamespaceHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sigterm_with_a_second_mount_namespace_exits_within_the_grace_period() {
    let test = "lifecycle::sigterm_with_a_second_mount_namespace_exits_within_the_grace_period";
    if !require_root_fuse(test) {
        return;
    }
    let mut m = Mount::start(&[]);
    fs::write(m.path("f"), b"x").unwrap();
    let mp = m.mountpoint.to_string_lossy().into_owned();
    // The copy of the namespace also holds every other FUSE mount present right now (tests that
    // run alongside): it lets those go at once, so that only this test's server is kept waiting.
    let script = r#"awk -v mp="$1" '$3 ~ /^fuse/ && $2 != mp { print $2 }' /proc/self/mounts |
        while read -r m; do umount -l "$m"; done; exec sleep 600"#;
    let holder = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script, "sh", &mp])
        .spawn()
        .map(NamespaceHolder);
    let holder = match holder {
        Ok(h) => h,
        Err(e) if !tests::in_ci() => {
            eprintln!("SKIP {test}: cannot run unshare: {e}");
            return;
        }
        Err(e) => panic!("{test}: cannot run unshare under CI: {e}"),
    };
    let pid = holder.0.id();
    let ours = fs::read_link("/proc/self/ns/mnt").unwrap();
    let only_ours = |t: &str| {
        t.lines()
            .filter(|l| l.split(' ').nth(2).is_some_and(|f| f.starts_with("fuse")))
            .all(|l| l.split(' ').nth(1) == Some(&*mp))
            && t.lines().any(|l| l.split(' ').nth(1) == Some(&*mp))
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|ns| ns != ours)
                && fs::read_to_string(format!("/proc/{pid}/mounts")).is_ok_and(|t| only_ours(&t))
        }),
        "the second namespace never held the mount (alone among FUSE mounts)"
    );
    let start = Instant::now();
    m.signal(libc::SIGTERM);
    let status = m.wait_exit(Duration::from_secs(14)).unwrap_or_else(|| {
        panic!("ringfs still runs 14 s after SIGTERM with the mount held elsewhere; log:\n{}", m.log())
    });
    let took = start.elapsed();
    assert!(status.success(), "exit status {status}; log:\n{}", m.log());
    assert!(took < Duration::from_secs(13), "exit took {took:?} (grace 10 s)");
    assert!(!m.is_mounted(), "still mounted in our namespace");
    let log = m.log();
    assert!(log.contains("another mount namespace"), "the abort was not logged:\n{log}");
    drop(holder);
}
