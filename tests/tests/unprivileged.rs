//! A mount by a user without root: `ringfs mount` through fusermount3, with what needs
//! privilege switched off and named in one log line; SIGTERM unmounts (fusermount3 -u), and
//! after SIGKILL the watchdog detaches the mount through fusermount3.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::{require_user_fuse, run_as, wait_until, Mount};

/// The test user's uid and gid: pjdfstest's `pjdtest` (created by scripts/setup.sh, uid 4242
/// when free).
fn test_user() -> (u32, u32) {
    static USER: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *USER.get_or_init(lookup_user)
}

fn uid() -> u32 {
    test_user().0
}

fn gid() -> u32 {
    test_user().1
}

fn lookup_user() -> (u32, u32) {
    let pw = std::process::Command::new("id").args(["-u", "pjdtest"]).output().expect("run id");
    let gr = std::process::Command::new("id").args(["-g", "pjdtest"]).output().expect("run id");
    assert!(pw.status.success() && gr.status.success(), "no user pjdtest: run scripts/setup.sh");
    let num = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).trim().parse::<u32>().expect("a number");
    (num(&pw), num(&gr))
}

/// A backing directory and a mount point owned by the test user, in a root-owned 0755
/// directory removed at the end.
struct UserDirs {
    dir: tempfile::TempDir,
}

impl UserDirs {
    fn new() -> UserDirs {
        let dir = tempfile::Builder::new().prefix("ringfs-user-").tempdir_in("/tmp").expect("temporary directory");
        fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for d in ["backing", "mnt"] {
            let p = dir.path().join(d);
            fs::create_dir(&p).unwrap();
            std::os::unix::fs::chown(&p, Some(uid()), Some(gid())).unwrap();
        }
        UserDirs { dir }
    }

    fn source(&self) -> PathBuf {
        self.dir.path().join("backing")
    }

    fn mountpoint(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

fn start(test: &str, dirs: &UserDirs) -> Mount {
    match Mount::try_start_as(uid(), gid(), &dirs.source(), &dirs.mountpoint(), &[]) {
        Ok(m) => m,
        Err((status, log)) => panic!("{test}: the user's ringfs exited before mounting ({status}):\n{log}"),
    }
}

fn sh_as_user(script: &str) -> String {
    let out = run_as(uid(), gid(), script);
    assert!(
        out.status.success(),
        "as uid {}: `{script}` failed ({}):\n{}{}",
        uid(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn q(p: &Path) -> String {
    format!("'{}'", p.display())
}

#[test]
fn user_mount_serves_and_unmounts_on_sigterm() {
    let test = "unprivileged::user_mount_serves_and_unmounts_on_sigterm";
    if !require_user_fuse(test, uid(), gid()) {
        return;
    }
    let dirs = UserDirs::new();
    let mut m = start(test, &dirs);
    let under = fs::metadata(dirs.dir.path()).unwrap().dev();

    // The mount is the user's (fusermount3 records user_id; it adds nosuid,nodev).
    let mnt = q(&m.mountpoint);
    let listing = sh_as_user(&format!(
        "cd {mnt} && echo hello > a && cat a && mv a b && mkdir d && echo x > d/f && ls && ls d && \
         cat b && rm b && rm d/f && rmdir d && ls -a"
    ));
    assert_eq!(listing, "hello\nb\nd\nf\nhello\n.\n..\n", "what the user saw through the mount");
    assert_eq!(fs::read_dir(m.backing("")).unwrap().count(), 0, "the backing directory is empty again");
    // Made by the user: files created through the mount belong to them.
    sh_as_user(&format!("echo kept > {mnt}/kept"));
    let md = fs::metadata(m.backing("kept")).unwrap();
    assert_eq!((md.uid(), md.gid()), (uid(), gid()), "owner of a file the user created");

    let log = m.log();
    let line = log
        .lines()
        .find(|l| l.contains("running without root"))
        .unwrap_or_else(|| panic!("no log line about what was switched off; log:\n{log}"));
    for what in ["fusermount3", "passthrough", "eBPF", "open_tree", "open_by_handle_at", "RLIMIT_NOFILE"] {
        assert!(line.contains(what), "the log line does not name {what}: {line}");
    }
    assert_eq!(log.matches("running without root").count(), 1, "one line, once; log:\n{log}");

    // SIGTERM: exit 0 and the mount gone. The grace before an abort is 10 s (a copy of the mount
    // in another namespace keeps the connection up until then).
    m.signal(libc::SIGTERM);
    let status = m.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("no exit after SIGTERM:\n{}", m.log()));
    assert!(status.success(), "SIGTERM: exit status {status}; log:\n{}", m.log());
    assert!(!m.is_mounted(), "still mounted after the user's server exited; log:\n{}", m.log());
    assert_eq!(fs::metadata(&m.mountpoint).unwrap().dev(), under, "the mount point is the plain directory again");
    assert_eq!(fs::read(m.backing("kept")).unwrap(), b"kept\n");
}

#[test]
fn user_mount_sigkill_watchdog_unmounts() {
    let test = "unprivileged::user_mount_sigkill_watchdog_unmounts";
    if !require_user_fuse(test, uid(), gid()) {
        return;
    }
    let dirs = UserDirs::new();
    let mut m = start(test, &dirs);
    sh_as_user(&format!("echo data > {}/f", q(&m.mountpoint)));
    m.kill9();
    assert!(
        wait_until(Duration::from_secs(10), || !m.is_mounted()),
        "the watchdog did not detach the user's mount after SIGKILL; log:\n{}",
        m.log()
    );
    // It logs once fusermount3 has returned, just after the mount left the table.
    assert!(
        wait_until(Duration::from_secs(5), || m.log().contains("watchdog: server died; detached")),
        "the watchdog says what it did; log:\n{}",
        m.log()
    );
    assert!(fs::metadata(&m.mountpoint).unwrap().is_dir(), "the mount point answers (no dead mount)");
    // The same user mounts there again at once.
    let again = start(test, &dirs);
    assert_eq!(sh_as_user(&format!("cat {}/f", q(&again.mountpoint))), "data\n");
    drop(again);
}

/// `strictatime` and `nodiratime` need root (fusermount3 refuses them for users, and the private
/// bind mount that applies them to the backing directory needs CAP_SYS_ADMIN): a user's
/// `ringfs mount` with either fails before mounting, saying so and what access times do instead.
#[test]
fn user_mount_refuses_strictatime_and_nodiratime_before_mounting() {
    let test = "unprivileged::user_mount_refuses_strictatime_and_nodiratime_before_mounting";
    if !require_user_fuse(test, uid(), gid()) {
        return;
    }
    let dirs = UserDirs::new();
    for (opt, says) in [
        ("strictatime", "strictatime needs root"),
        ("nodiratime", "nodiratime needs root"),
        ("strictatime,nodiratime", "strictatime and nodiratime need root"),
    ] {
        let (status, log) = match Mount::try_start_as(uid(), gid(), &dirs.source(), &dirs.mountpoint(), &[opt]) {
            Ok(m) => panic!("-o {opt}: a user's mount came up; log:\n{}", m.log()),
            Err(e) => e,
        };
        assert!(!status.success(), "-o {opt}: exit status {status}");
        for what in
            [says, "fusermount3", "CAP_SYS_ADMIN", "follow the backing directory's mount", "noatime works without root"]
        {
            assert!(log.contains(what), "-o {opt}: the error does not say `{what}`:\n{log}");
        }
        // Refused before anything was mounted (and no dead mount left behind).
        assert!(tests::mount_at(&dirs.mountpoint()).is_none(), "-o {opt}: something is mounted");
        assert!(!log.contains("fusermount3:"), "-o {opt}: fusermount3 was run:\n{log}");
    }
}

/// `noatime` works for a user: fusermount3 takes it, and the server opens the user's backing
/// files with O_NOATIME, so reading through the mount leaves their access times alone (a read on
/// the backing directory itself, with its relatime, does update them: the check can fail).
#[test]
fn user_mount_noatime_keeps_access_times() {
    let test = "unprivileged::user_mount_noatime_keeps_access_times";
    if !require_user_fuse(test, uid(), gid()) {
        return;
    }
    let dirs = UserDirs::new();
    // Access times two days old: relatime would update them on the next read.
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 86400);
    for name in ["through", "native"] {
        let p = dirs.source().join(name);
        fs::write(&p, b"atime\n").unwrap();
        std::os::unix::fs::chown(&p, Some(uid()), Some(gid())).unwrap();
        fs::File::options().write(true).open(&p).unwrap().set_times(fs::FileTimes::new().set_accessed(old)).unwrap();
    }
    let atime = |name: &str| fs::metadata(dirs.source().join(name)).unwrap().atime();
    let before = atime("through");
    let m = match Mount::try_start_as(uid(), gid(), &dirs.source(), &dirs.mountpoint(), &["noatime"]) {
        Ok(m) => m,
        Err((status, log)) => panic!("{test}: -o noatime as a user ({status}):\n{log}"),
    };
    let info = tests::mount_at(&m.mountpoint).expect("mounted");
    assert!(info.mount_options.split(',').any(|o| o == "noatime"), "{info:?}");
    assert_eq!(sh_as_user(&format!("cat {}", q(&m.mountpoint.join("through")))), "atime\n");
    sh_as_user(&format!("cat {} >/dev/null", q(&dirs.source().join("native"))));
    assert!(atime("native") > before, "a native read did not update the access time: the check proves nothing");
    assert_eq!(atime("through"), before, "a read through the noatime mount changed the backing access time");
    drop(m);
}

/// A user's mount cannot be remounted (the kernel refuses MS_REMOUNT to users and fusermount3
/// has no remount): the helper form mount(8) runs (`ringfs MNT MNT -o remount,ro`) fails at once
/// with an error that says so and what to do instead, and the mount is left as it was.
#[test]
fn user_remount_fails_clearly_and_leaves_the_mount() {
    let test = "unprivileged::user_remount_fails_clearly_and_leaves_the_mount";
    if !require_user_fuse(test, uid(), gid()) {
        return;
    }
    let dirs = UserDirs::new();
    let m = start(test, &dirs);
    let mnt = q(&m.mountpoint);
    let bin = tests::ringfs_bin();
    for opts in ["remount,ro", "ro,nosuid,nodev,remount,user_id=4242", "remount,strictatime"] {
        let out = run_as(uid(), gid(), &format!("{} {mnt} {mnt} -o {opts}", q(&bin)));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "-o {opts}: a user's remount succeeded: {stderr}");
        for what in ["only root (CAP_SYS_ADMIN) can remount", "fusermount3 -u", "mount again"] {
            assert!(stderr.contains(what), "-o {opts}: the error does not say `{what}`: {stderr}");
        }
        let info = tests::mount_at(&m.mountpoint).expect("still mounted");
        assert!(info.mount_options.split(',').any(|o| o == "rw"), "-o {opts}: flags changed: {info:?}");
        assert!(!info.mount_options.contains("strictatime"), "-o {opts}: flags changed: {info:?}");
    }
    // Still served, and writable.
    assert_eq!(sh_as_user(&format!("echo still > {mnt}/w && cat {mnt}/w")), "still\n");
    drop(m);
}
