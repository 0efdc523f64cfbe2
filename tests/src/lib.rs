//! Shared helpers for the integration tests (mounting ringfs, probing capabilities).
//!
//! The integration tests in `tests/tests/` mount real FUSE file systems with the `ringfs`
//! binary and exercise them through the kernel. This crate gives them:
//!
//! - [`ringfs_bin`]: the binary under test (`RINGFS_BIN`, or the workspace's own build, brought
//!   up to date once per test process);
//! - [`require_root_fuse`]: the capability probe every FUSE test starts with (a skip locally, a
//!   failure under `CI=true`);
//! - [`Mount`]: one running `ringfs mount` on fresh temporary directories, cleaned up on drop
//!   whatever happens (no test leaves a FUSE mount behind);
//! - small helpers: [`wait_until`], [`mount_dev`], [`mounted_fstype`], [`run_as`],
//!   [`as_user`], [`cstr`], [`errno`].

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The file-system type ringfs mounts show in `/proc/self/mountinfo`.
pub const FSTYPE: &str = "fuse.ringfs";

/// How long [`Mount::start`] waits for the mount to appear.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Mount::terminate`] waits for the server to exit after SIGTERM.
pub const TERM_TIMEOUT: Duration = Duration::from_secs(10);

/// The unprivileged user the permission tests switch to (`nobody`).
pub const NOBODY_UID: u32 = 65534;
/// The group of [`NOBODY_UID`] (`nogroup`).
pub const NOBODY_GID: u32 = 65534;

/// True when running under CI (`CI=true`): missing capabilities are failures, not skips.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Reports that `test` cannot run because of `reason`: prints `SKIP <test>: <reason>` and
/// returns false, or panics under CI (see [`in_ci`]), where a skip would hide a broken machine.
pub fn skip(test: &str, reason: &str) -> bool {
    if in_ci() {
        panic!("{test}: {reason} (CI=true: a missing capability is a failure, not a skip)");
    }
    eprintln!("SKIP {test}: {reason}");
    false
}

/// Probes what a FUSE test needs: running as root and an openable `/dev/fuse`.
///
/// Returns true when the test can go on. Otherwise prints `SKIP <test>: <reason>` and returns
/// false, so that a test starts with `if !require_root_fuse("name") { return; }`; under
/// `CI=true` a missing capability panics instead (see [`skip`]).
pub fn require_root_fuse(test: &str) -> bool {
    // SAFETY: geteuid cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(test, "needs root (mount(2) of a FUSE file system)");
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        return skip(test, &format!("cannot open /dev/fuse: {e}"));
    }
    true
}

/// Like [`require_root_fuse`], and also needs `setpriv` (util-linux) to switch users.
pub fn require_root_fuse_setpriv(test: &str) -> bool {
    if !require_root_fuse(test) {
        return false;
    }
    match Command::new("setpriv").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => true,
        _ => skip(test, "setpriv (util-linux) is not installed"),
    }
}

/// Like [`require_root_fuse_setpriv`], and also needs what a mount by user `uid`/`gid` needs:
/// `fusermount3` (Debian's fuse3 package) and `/dev/fuse` open to that user (Debian's udev
/// rule makes it mode 0666; a container without udev may leave it 0600).
pub fn require_user_fuse(test: &str, uid: u32, gid: u32) -> bool {
    if !require_root_fuse_setpriv(test) {
        return false;
    }
    match Command::new("fusermount3").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => {}
        _ => return skip(test, "fusermount3 (the fuse3 package) is not installed"),
    }
    let dev = cstr("/dev/fuse");
    let code = as_user(uid, gid, || {
        // SAFETY: open/close on a NUL-terminated path prepared before the fork.
        let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return 1;
        }
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        0
    });
    if code != 0 {
        return skip(
            test,
            &format!("uid {uid} cannot open /dev/fuse (mode 0600? `chmod 0666 /dev/fuse`, as Debian's udev rule does)"),
        );
    }
    true
}

/// `target/<profile>` directory of the running test binary (tests run from
/// `target/<profile>/deps/`).
fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().map(Path::to_path_buf)
    } else {
        Some(deps.to_path_buf())
    }
}

/// Builds the `ringfs` binary of this workspace with the test binary's profile, so that the tests
/// never run a stale binary (`cargo test` builds the test crates, not other packages' binaries).
fn build_ringfs(profile_dir: &Path) {
    let Some(target_dir) = profile_dir.parent() else { return };
    let profile = profile_dir.file_name().and_then(OsStr::to_str).unwrap_or("debug");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    // The server binary, and the example file systems some tests mount (`slow`, `hello`).
    for targets in [&["-p", "server", "--bin", "ringfs"][..], &["-p", "ringfs-transport", "--examples"][..]] {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet"]).args(targets).current_dir(workspace).env("CARGO_TARGET_DIR", target_dir);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("warning: `cargo build {targets:?}` failed ({s}); using the existing binaries"),
            Err(e) => eprintln!("warning: cannot run cargo to build {targets:?} ({e}); using the existing binaries"),
        }
    }
}

/// The `ringfs` binary under test.
///
/// `RINGFS_BIN` if set (used as is). Otherwise `<target dir>/<profile>/ringfs` next to the test
/// binary's `deps/` directory; the first call in a test process runs
/// `cargo build -p server --bin ringfs` with the same profile and target directory so that the
/// binary is current (cargo does not build another package's binaries for `cargo test`). Set
/// `RINGFS_NO_BUILD=1` to skip that build. Panics if the binary does not exist.
pub fn ringfs_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("RINGFS_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "RINGFS_BIN={} does not exist", p.display());
            return p;
        }
        let dir = profile_dir().expect("cannot locate the test binary's target directory");
        if std::env::var_os("RINGFS_NO_BUILD").is_none() {
            build_ringfs(&dir);
        }
        let bin = dir.join("ringfs");
        assert!(bin.is_file(), "{} is missing: build it with `cargo build -p server --bin ringfs`", bin.display());
        bin
    })
    .clone()
}

/// A `Command` for the `ringfs` binary with the given arguments (stdin closed).
pub fn ringfs_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(ringfs_bin());
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// What a finished `ringfs` command printed.
#[derive(Debug)]
pub struct RunOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `ringfs ARGS...` to completion with `timeout`, capturing its output (through files, so a
/// chatty child never blocks on a full pipe). If it is still running at the deadline (e.g. it
/// mounted when it should have failed), it gets SIGTERM, then SIGKILL, and this panics.
pub fn run_ringfs<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> RunOutput {
    let dir = work_dir();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = ringfs_command(args)
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn ringfs");
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    match status {
        Some(status) => RunOutput { status, stdout: read(&out_path), stderr: read(&err_path) },
        None => {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            if !wait_until(TERM_TIMEOUT, || matches!(child.try_wait(), Ok(Some(_)))) {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!(
                "ringfs {:?} still running after {timeout:?}; stderr:\n{}",
                args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>(),
                read(&err_path)
            );
        }
    }
}

/// Polls `cond` every few milliseconds until it returns true or `timeout` elapses; returns
/// whether it became true. The only kind of waiting the tests use (no bare sleeps).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// `st_dev` of `path` (following symlinks).
pub fn mount_dev(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).dev()
}

/// Decodes the octal escapes (`\040` etc.) of a `/proc/self/mountinfo` field.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// One line of `/proc/self/mountinfo`, the fields the tests use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount point (escapes decoded).
    pub mountpoint: PathBuf,
    /// File-system type, e.g. `fuse.ringfs`.
    pub fstype: String,
    /// Mount source (the fsname).
    pub source: String,
    /// Per-mount options (`rw,nosuid,...`).
    pub mount_options: String,
    /// Super-block options (`rw,user_id=0,...,allow_other`).
    pub super_options: String,
}

/// Every mount in this process's mount namespace.
pub fn mountinfo() -> Vec<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountInfo {
                mountpoint: PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(l.get(4)?))),
                mount_options: (*l.get(5)?).to_owned(),
                fstype: (*r.first()?).to_owned(),
                source: (*r.get(1)?).to_owned(),
                super_options: (*r.get(2)?).to_owned(),
            })
        })
        .collect()
}

/// The type of the topmost file system mounted exactly at `path`, if any.
pub fn mounted_fstype(path: &Path) -> Option<String> {
    mountinfo().into_iter().rev().find(|m| m.mountpoint == path).map(|m| m.fstype)
}

/// The mountinfo line of the topmost mount exactly at `path`, if any.
pub fn mount_at(path: &Path) -> Option<MountInfo> {
    mountinfo().into_iter().rev().find(|m| m.mountpoint == path)
}

/// Detaches whatever is mounted at `path` (`umount2(MNT_DETACH)`); errors are ignored.
pub fn force_unmount(path: &Path) {
    let c = cstr(path);
    // SAFETY: c is a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// A NUL-terminated copy of `path` for libc calls.
pub fn cstr(path: impl AsRef<Path>) -> CString {
    CString::new(path.as_ref().as_os_str().as_bytes()).expect("path with an interior NUL")
}

/// The calling thread's `errno`.
pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A running `ringfs mount SOURCE MOUNTPOINT` and the temporary directories it uses.
///
/// [`Mount::start`] returns once the kernel shows the mount; dropping the value stops the
/// server (SIGTERM, then SIGKILL) and detaches the mount point if it is still mounted, then
/// removes the temporary directories.
///
/// The server gets SIGTERM if the thread that started it exits (`PR_SET_PDEATHSIG`), so a
/// `Mount` should live in the test function that started it.
pub struct Mount {
    /// The backing directory.
    pub source: PathBuf,
    /// Where the file system is mounted.
    pub mountpoint: PathBuf,
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
    /// Holds the server log (and the backing directory and mount point when they are ours).
    work: tempfile::TempDir,
}

impl Mount {
    /// Mounts a fresh, empty temporary backing directory on a fresh temporary mount point with the
    /// given `-o` options (each element one `key=value` or `key`; may be empty).
    ///
    /// Metrics are off (`metrics_addr=`) unless `opts` set `metrics_addr`, so that parallel mounts
    /// do not compete for the default port. `RINGFS_EXTRA_OPTS` (a comma-separated `-o` list), if
    /// set, is appended last (so it wins): run the whole suite on another configuration with e.g.
    /// `RINGFS_EXTRA_OPTS=transport=dev-fuse,passthrough=false cargo test -p tests`.
    pub fn start(opts: &[&str]) -> Mount {
        Self::start_program(&ringfs_bin(), opts)
    }

    /// Like [`Mount::start`], served by the binary `program` instead of [`ringfs_bin`] (another
    /// build of the server, for the cross-build upgrade test).
    pub fn start_program(program: &Path, opts: &[&str]) -> Mount {
        let work = work_dir();
        let source = work.path().join("backing");
        std::fs::create_dir(&source).expect("create backing dir");
        std::fs::set_permissions(&source, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let mountpoint = work.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("create mount point");
        Self::spawn_program(work, source, mountpoint, program, opts)
    }

    /// Mounts the existing directory `source` on a fresh temporary mount point.
    pub fn start_with(source: &Path, opts: &[&str]) -> Mount {
        let work = work_dir();
        let mountpoint = work.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("create mount point");
        Self::spawn(work, source.to_path_buf(), mountpoint, opts)
    }

    /// Mounts the existing directory `source` on the existing directory `mountpoint`.
    pub fn start_at(source: &Path, mountpoint: &Path, opts: &[&str]) -> Mount {
        Self::spawn(work_dir(), source.to_path_buf(), mountpoint.to_path_buf(), opts)
    }

    /// Like [`Mount::start_at`], but returns the server's exit status and output instead of
    /// panicking when the server exits before the mount appears (for start-up error tests). A
    /// timeout still panics.
    pub fn try_start_at(source: &Path, mountpoint: &Path, opts: &[&str]) -> Result<Mount, (ExitStatus, String)> {
        Self::try_spawn(
            work_dir(),
            source.to_path_buf(),
            mountpoint.to_path_buf(),
            &mount_args(source, mountpoint, opts),
        )
    }

    /// Runs `ringfs ARGS...` (any command line that mounts in the foreground, e.g.
    /// `mount --config FILE`) and waits for a mount at `mountpoint`; `source` is recorded for
    /// [`Mount::backing`]. Nothing is added to `args`.
    pub fn start_args(source: &Path, mountpoint: &Path, args: &[&OsStr]) -> Result<Mount, (ExitStatus, String)> {
        let args: Vec<_> = args.iter().map(|a| a.to_os_string()).collect();
        Self::try_spawn(work_dir(), source.to_path_buf(), mountpoint.to_path_buf(), &args)
    }

    /// Mounts `source` on `mountpoint` (both owned by the user) with a server run as user
    /// `uid`/`gid` (no supplementary groups, no capabilities) through `setpriv`; like
    /// [`Mount::try_start_at`] otherwise.
    pub fn try_start_as(
        uid: u32,
        gid: u32,
        source: &Path,
        mountpoint: &Path,
        opts: &[&str],
    ) -> Result<Mount, (ExitStatus, String)> {
        let mut args: Vec<std::ffi::OsString> = vec![
            format!("--reuid={uid}").into(),
            format!("--regid={gid}").into(),
            "--clear-groups".into(),
            // The uid change clears the parent-death signal set before the exec: set it again.
            "--pdeathsig=TERM".into(),
            "--".into(),
            ringfs_bin().into(),
        ];
        args.extend(mount_args(source, mountpoint, opts));
        args.push("-f".into());
        Self::try_spawn_program(work_dir(), source.to_path_buf(), mountpoint.to_path_buf(), Path::new("setpriv"), &args)
    }

    fn spawn(work: tempfile::TempDir, source: PathBuf, mountpoint: PathBuf, opts: &[&str]) -> Mount {
        Self::spawn_program(work, source, mountpoint, &ringfs_bin(), opts)
    }

    fn spawn_program(
        work: tempfile::TempDir,
        source: PathBuf,
        mountpoint: PathBuf,
        program: &Path,
        opts: &[&str],
    ) -> Mount {
        let mut args = mount_args(&source, &mountpoint, opts);
        // File-handle state of this mount stays in its work directory (removed with it) rather
        // than piling up in /var/lib/ringfs for mounts that never come back.
        if !opts.iter().any(|o| o.contains("export_state_dir")) {
            args.extend(["-o".into(), format!("export_state_dir={}", work.path().join("handles").display()).into()]);
        }
        match Self::try_spawn_program(work, source, mountpoint, program, &args) {
            Ok(m) => m,
            Err((status, stderr)) => panic!("ringfs mount exited before mounting ({status}); its output:\n{stderr}"),
        }
    }

    fn try_spawn(
        work: tempfile::TempDir,
        source: PathBuf,
        mountpoint: PathBuf,
        args: &[std::ffi::OsString],
    ) -> Result<Mount, (ExitStatus, String)> {
        Self::try_spawn_program(work, source, mountpoint, &ringfs_bin(), args)
    }

    fn try_spawn_program(
        work: tempfile::TempDir,
        source: PathBuf,
        mountpoint: PathBuf,
        program: &Path,
        args: &[std::ffi::OsString],
    ) -> Result<Mount, (ExitStatus, String)> {
        let mountpoint = std::fs::canonicalize(&mountpoint).unwrap_or(mountpoint);
        let log = work.path().join("ringfs.log");
        let log_file = File::create(&log).expect("create server log");
        let log_err = log_file.try_clone().expect("dup server log");
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd.stdin(Stdio::null()).stdout(log_file).stderr(log_err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let pid = child.id();
        let mut m = Mount { source, mountpoint, child: Some(child), pid, log, work };
        let start = Instant::now();
        loop {
            if m.is_mounted() {
                return Ok(m);
            }
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                m.child = None;
                return Err((status, m.log()));
            }
            if start.elapsed() > MOUNT_TIMEOUT {
                let log = m.log();
                drop(m);
                panic!("ringfs did not mount within {MOUNT_TIMEOUT:?}; its output:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the server wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// A temporary directory next to (outside) the mount, removed with the `Mount`.
    pub fn scratch(&self) -> &Path {
        self.work.path()
    }

    /// `mountpoint/rel`.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// `source/rel`: the same file seen in the backing directory.
    pub fn backing(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.source.join(rel)
    }

    /// True while a `fuse.ringfs` file system is mounted on the mount point.
    pub fn is_mounted(&self) -> bool {
        mounted_fstype(&self.mountpoint).is_some_and(|t| t == FSTYPE)
    }

    /// The mount's device number (`st_dev` of the mount root).
    pub fn dev(&self) -> u64 {
        mount_dev(&self.mountpoint)
    }

    /// True while the server process has not exited (it is reaped if it has).
    pub fn server_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server with SIGKILL and reaps it. The mount itself is left to the watchdog.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to [`TERM_TIMEOUT`] for the server to exit; returns its exit
    /// status. Panics (after killing it) if it does not exit in time or was already reaped.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("the server was already stopped");
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            match c.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if start.elapsed() < TERM_TIMEOUT => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = c.kill();
                    let status = c.wait().expect("wait for ringfs");
                    panic!(
                        "ringfs did not exit within {TERM_TIMEOUT:?} of SIGTERM (killed: {status}); its output:\n{}",
                        self.log()
                    );
                }
            }
        }
    }

    /// Sends `signal` to the server without waiting.
    pub fn signal(&self, signal: i32) {
        if self.child.is_some() {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        }
    }

    /// Waits up to `timeout` for the server to exit; returns its status, or None if it is still
    /// running (or was already reaped).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let mut status = None;
        wait_until(timeout, || {
            status = c.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let exited = wait_until(TERM_TIMEOUT, || matches!(c.try_wait(), Ok(Some(_))));
            if !exited {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Whatever the server did, no mount survives the test: the watchdog has a moment to do
        // its job (a test may be checking it), then we detach ourselves.
        if !wait_until(Duration::from_secs(2), || !self.is_mounted()) {
            force_unmount(&self.mountpoint);
        }
        // Never let TempDir's removal walk into a (stacked) mount.
        for _ in 0..8 {
            if !self.is_mounted() {
                break;
            }
            force_unmount(&self.mountpoint);
        }
    }
}

/// `mount SOURCE MOUNTPOINT [-o metrics_addr=] -o OPT...`
fn mount_args(source: &Path, mountpoint: &Path, opts: &[&str]) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["mount".into(), source.into(), mountpoint.into()];
    if !opts.iter().any(|o| o.starts_with("metrics_addr") || o.starts_with("metrics.addr")) {
        args.extend(["-o".into(), "metrics_addr=".into()]);
    }
    for o in opts {
        args.extend(["-o".into(), (*o).into()]);
    }
    if let Some(extra) = std::env::var_os("RINGFS_EXTRA_OPTS").filter(|e| !e.is_empty()) {
        args.extend(["-o".into(), extra]);
    }
    args
}

/// True when `RINGFS_EXTRA_OPTS` turns on `writeback_cache` for every mount: the kernel then owns
/// cached file sizes and holds dirty data until flush/fsync, so a few checks of immediate
/// coherence with the backing directory do not apply.
pub fn writeback_cache_forced() -> bool {
    std::env::var("RINGFS_EXTRA_OPTS").is_ok_and(|e| {
        e.split(',')
            .any(|o| matches!(o.trim(), "writeback_cache" | "writeback_cache=true" | "fuse.writeback_cache=true"))
    })
}

/// [`require_root_fuse`], then [`Mount::start`]: `None` (test skipped) when FUSE is unusable.
pub fn setup(test: &str, opts: &[&str]) -> Option<Mount> {
    require_root_fuse(test).then(|| Mount::start(opts))
}

/// A return value of a libc call that signals failure by being negative.
pub trait SysRet: Copy {
    /// True for a failure (-1).
    fn failed(self) -> bool;
}
impl SysRet for i32 {
    fn failed(self) -> bool {
        self < 0
    }
}
impl SysRet for i64 {
    fn failed(self) -> bool {
        self < 0
    }
}
impl SysRet for isize {
    fn failed(self) -> bool {
        self < 0
    }
}

/// Panics with `what` and `errno` if the libc call's return value `r` signals failure; returns
/// `r` otherwise: `sys(unsafe { libc::fsync(fd) }, "fsync")`.
#[track_caller]
pub fn sys<T: SysRet>(r: T, what: impl std::fmt::Display) -> T {
    if r.failed() {
        panic!("{what}: {}", io::Error::last_os_error());
    }
    r
}

/// Runs a libc call that returns -1 on error; returns `Ok(value)` or `Err(errno)`.
pub fn try_sys<T: SysRet>(r: T) -> Result<T, i32> {
    if r.failed() {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// Deterministic pseudo-random bytes (xorshift), for data round trips.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A fresh `/tmp/ringfs-test-XXXXXX`, mode 0755 whatever the umask (other users must be able
/// to reach mount points inside it).
fn work_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("ringfs-test-")
        .tempdir_in("/tmp")
        .expect("create a temporary directory in /tmp");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod 0755");
    dir
}

/// Runs `sh -c script` as `uid`/`gid` with no supplementary groups (through `setpriv`) and
/// returns its output. `HOME=/` so that shells do not look into root's home.
pub fn run_as(uid: u32, gid: u32, script: &str) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(["sh", "-c", script])
        .env("HOME", "/")
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv (util-linux)")
}

/// Runs `f` in a forked child process whose real, effective and saved uid and gid are `uid` and
/// `gid` (no supplementary groups); returns the child's exit code, which is `f`'s return value
/// (use 0 for success and an errno value for a failure).
///
/// The child of a fork in a multi-threaded process may only do async-signal-safe work: `f` must
/// make raw libc calls on data prepared before the call (e.g. [`cstr`] paths), and not allocate,
/// lock, print or panic. A panic in `f` exits the child with code 255.
pub fn as_user(uid: u32, gid: u32, f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: fork has no preconditions; the child only calls async-signal-safe functions (raw
    // syscalls, `f` under the documented contract, and _exit).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: raw syscalls (not glibc's setxid broadcast wrappers) on the single thread
        // of the child, then _exit.
        unsafe {
            let ok = libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) == 0
                && libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
                && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0;
            if !ok {
                libc::_exit(254);
            }
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(255);
            libc::_exit(code);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", io::Error::last_os_error());
    let st = ExitStatus::from_raw(status);
    match st.code() {
        Some(254) => panic!("as_user({uid}, {gid}): switching credentials failed"),
        Some(255) => panic!("as_user({uid}, {gid}): the closure panicked"),
        Some(c) => c,
        None => panic!("as_user({uid}, {gid}): child died: {st}"),
    }
}

/// Turns the return value of a libc call that returns -1 on error into 0 (success) or the
/// `errno` value: `errno_of(unsafe { libc::mkdir(p.as_ptr(), 0o755) } as _)`. Allocation-free,
/// so usable in [`as_user`] closures.
pub fn errno_of(r: libc::c_long) -> i32 {
    if r < 0 {
        errno()
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), b"/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/tmp/x\"), b"/tmp/x\\");
        assert_eq!(unescape_mountinfo("/plain"), b"/plain");
    }

    #[test]
    fn mountinfo_has_root() {
        assert!(mountinfo().iter().any(|m| m.mountpoint == Path::new("/")));
    }

    #[test]
    fn wait_until_times_out_and_succeeds() {
        assert!(!wait_until(Duration::from_millis(20), || false));
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(1), || {
            n += 1;
            n > 3
        }));
    }
}
