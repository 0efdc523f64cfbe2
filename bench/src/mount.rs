//! Targets (native, ringfs variants, peers) and the guard that always unmounts what the harness
//! mounted: SIGTERM to the server, wait, `umount -l` if the mount is still there, SIGKILL if the
//! server is still alive.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::proc;

/// Name of the marker file that proves a peer mount serves the benchmark's source directory.
pub(crate) const MARKER: &str = ".ringfs-bench-marker";

/// One place the benchmarks run against.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// Unique name in tables and files ("native" for the backing directory itself).
    pub name: String,
    /// How to reach it.
    pub kind: TargetKind,
}

/// How a target is reached.
#[derive(Clone, Debug)]
pub(crate) enum TargetKind {
    /// The backing directory itself.
    Native,
    /// ringfs mounted by the harness with these `-o` option strings.
    Ringfs(Vec<String>),
    /// A command the harness starts (foreground FUSE server; `{src}` and `{mnt}` substituted).
    PeerCmd(String),
    /// A mount the user started, serving the source directory.
    PeerMounted(PathBuf),
}

impl TargetKind {
    /// A short description for reports.
    pub fn describe(&self) -> String {
        match self {
            TargetKind::Native => "backing directory, no FUSE".into(),
            TargetKind::Ringfs(opts) => format!("ringfs -o {}", opts.join(" -o ")),
            TargetKind::PeerCmd(cmd) => format!("peer command: {cmd}"),
            TargetKind::PeerMounted(p) => format!("peer mount at {}", p.display()),
        }
    }
}

/// What mounting needs to know.
pub(crate) struct MountEnv {
    /// The backing directory.
    pub src: PathBuf,
    /// Directory holding one mount point per target.
    pub mnt_base: PathBuf,
    /// Directory for server logs.
    pub log_dir: PathBuf,
    /// The ringfs binary.
    pub ringfs_bin: PathBuf,
    /// Pass `--enable-uring` to ringfs.
    pub enable_uring: bool,
}

/// A target made reachable for one measurement; dropping it unmounts what the harness mounted.
pub(crate) struct Active {
    /// Path that plays the role of the source directory for this target.
    pub root: PathBuf,
    _guard: Option<MountGuard>,
}

impl Active {
    /// The process id of the FUSE server the harness started for this target (None for native
    /// and for mounts it did not start).
    pub fn server_pid(&self) -> Option<u32> {
        self._guard.as_ref().and_then(|g| g.child.as_ref()).map(Child::id)
    }
}

impl Target {
    /// Mounts the target if the harness owns it, and returns where to run.
    pub fn activate(&self, env: &MountEnv) -> Result<Active> {
        match &self.kind {
            TargetKind::Native => Ok(Active { root: env.src.clone(), _guard: None }),
            TargetKind::PeerMounted(mnt) => {
                check_marker(&env.src, mnt)?;
                Ok(Active { root: mnt.clone(), _guard: None })
            }
            TargetKind::Ringfs(opts) => {
                let mnt = env.mnt_base.join(&self.name);
                let mut cmd = Command::new(&env.ringfs_bin);
                cmd.arg("mount").arg(&env.src).arg(&mnt);
                for o in opts.iter().filter(|o| !o.is_empty()) {
                    cmd.arg("-o").arg(o);
                }
                if env.enable_uring {
                    cmd.arg("--enable-uring");
                }
                let guard = MountGuard::start(&self.name, cmd, &mnt, &env.log_dir, false)?;
                check_marker(&env.src, &mnt)?;
                Ok(Active { root: mnt, _guard: Some(guard) })
            }
            TargetKind::PeerCmd(template) => {
                let mnt = env.mnt_base.join(&self.name);
                let line = template
                    .replace("{src}", &env.src.display().to_string())
                    .replace("{mnt}", &mnt.display().to_string());
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c").arg(format!("exec {line}"));
                let guard = MountGuard::start(&self.name, cmd, &mnt, &env.log_dir, true)?;
                check_marker(&env.src, &mnt)?;
                Ok(Active { root: mnt, _guard: Some(guard) })
            }
        }
    }
}

fn check_marker(src: &Path, mnt: &Path) -> Result<()> {
    let want = fs::read_to_string(src.join(MARKER)).context("reading the marker in the source directory")?;
    let got = fs::read_to_string(mnt.join(MARKER))
        .with_context(|| format!("{} does not show the source directory (no marker)", mnt.display()))?;
    if want != got {
        bail!("{} serves another directory than {} (marker differs)", mnt.display(), src.display());
    }
    Ok(())
}

/// A FUSE server the harness started. Dropping it stops the server and makes sure nothing stays
/// mounted.
pub(crate) struct MountGuard {
    name: String,
    mountpoint: PathBuf,
    child: Option<Child>,
    signal_group: bool,
}

impl MountGuard {
    /// Starts `cmd` (a foreground FUSE server) in its own process group with stdout/stderr to
    /// `log_dir/<name>.log`, and waits until `mountpoint` is a FUSE mount that answers.
    fn start(name: &str, mut cmd: Command, mountpoint: &Path, log_dir: &Path, signal_group: bool) -> Result<Self> {
        fs::create_dir_all(mountpoint).with_context(|| format!("creating {}", mountpoint.display()))?;
        if is_mountpoint(mountpoint) {
            eprintln!("warning: {} is still mounted from an earlier run: detaching it", mountpoint.display());
            lazy_unmount(mountpoint);
        }
        fs::create_dir_all(log_dir)?;
        let log_path = log_dir.join(format!("{name}.log"));
        let log = File::options().create(true).append(true).open(&log_path)?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let mut guard =
            MountGuard { name: name.to_owned(), mountpoint: mountpoint.to_owned(), child: Some(child), signal_group };
        guard.wait_mounted(Duration::from_secs(20), &log_path)?;
        Ok(guard)
    }

    fn wait_mounted(&mut self, timeout: Duration, log_path: &Path) -> Result<()> {
        let start = Instant::now();
        loop {
            proc::check_interrupted()?;
            if is_mountpoint(&self.mountpoint) && fs::metadata(&self.mountpoint).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = fs::read_to_string(log_path).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    bail!(
                        "{} exited ({status}) before mounting {}: {}",
                        self.name,
                        self.mountpoint.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    );
                }
            }
            if start.elapsed() > timeout {
                bail!("{} did not mount {} within {:?}", self.name, self.mountpoint.display(), timeout);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                proc::signal(child.id(), libc::SIGTERM, self.signal_group);
                if !proc::wait_exit(&mut child, Duration::from_secs(15)) {
                    eprintln!("warning: {} did not exit on SIGTERM; detaching and killing it", self.name);
                    lazy_unmount(&self.mountpoint);
                    proc::signal(child.id(), libc::SIGKILL, self.signal_group);
                    let _ = child.wait();
                }
            }
        }
        // Give a watchdog or the kernel a moment, then make sure nothing is left mounted.
        let start = Instant::now();
        while is_mountpoint(&self.mountpoint) && start.elapsed() < Duration::from_secs(2) {
            thread::sleep(Duration::from_millis(20));
        }
        if is_mountpoint(&self.mountpoint) {
            eprintln!("warning: {} still mounted after its server stopped: umount -l", self.mountpoint.display());
            lazy_unmount(&self.mountpoint);
        }
    }
}

/// Detaches whatever is mounted at `path` (best effort).
pub(crate) fn lazy_unmount(path: &Path) {
    let _ = Command::new("umount").arg("-l").arg(path).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Whether `path` is a mount point in this mount namespace (from /proc/self/mountinfo).
pub(crate) fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.to_string_lossy();
    info.lines().filter_map(|l| l.split(' ').nth(4)).any(|mp| unescape(mp) == want)
}

/// The file-system type of the mount that holds `path` (longest mount-point prefix).
pub(crate) fn fs_type_of(path: &Path) -> String {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return "unknown".into() };
    let want = path.to_string_lossy().into_owned();
    let mut best = (0, "unknown".to_owned());
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        let (Some(mp), Some(fstype)) = (fields.get(4), fields.get(sep + 1)) else { continue };
        let mp = unescape(mp);
        let under = want == mp || mp == "/" || want.starts_with(&format!("{mp}/"));
        if under && mp.len() >= best.0 {
            best = (mp.len(), (*fstype).to_owned());
        }
    }
    best.1
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_octal() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn root_is_a_mountpoint() {
        assert!(is_mountpoint(Path::new("/")));
    }
}
