//! Helpers for the transport and offload tests: probing, starting ringfs and the example file
//! systems, scraping `/metrics`.
#![allow(dead_code)]

pub mod load;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `target/<profile>` of the running test binary.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps").to_path_buf()
}

/// The ringfs binary under test (built on first use, with the examples; see `tests::ringfs_bin`).
pub fn ringfs_bin() -> PathBuf {
    tests::ringfs_bin()
}

/// An example binary of uring-transport (built with the server on first use).
pub fn example_bin(name: &str) -> PathBuf {
    ringfs_bin();
    target_dir().join("examples").join(name)
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Probes root + /dev/fuse + the binaries; prints why a test skips, or panics under CI=true.
pub fn require(test: &str, needs_uring: bool, examples: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("not root".to_string());
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_err() {
        missing.push("/dev/fuse cannot be opened".to_string());
    }
    if missing.is_empty() && !ringfs_bin().exists() {
        missing.push(format!("{} missing (cargo build -p server)", ringfs_bin().display()));
    }
    for e in examples {
        if !example_bin(e).exists() {
            missing.push(format!("{} missing (cargo build -p ringfs-transport --examples)", example_bin(e).display()));
        }
    }
    if needs_uring && !uring_enabled() {
        missing.push("FUSE over io_uring is off (/sys/module/fuse/parameters/enable_uring)".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if in_ci() {
        panic!("{test}: required capability missing under CI: {why}");
    }
    eprintln!("SKIP {test}: {why}");
    false
}

/// Whether the kernel's FUSE io_uring switch is on.
pub fn uring_enabled() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y")
}

fn mounted_at(mp: &Path) -> Option<String> {
    tests::mounted_fstype(mp)
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// A running FUSE server (ringfs or an example) with its mount; unmounted on drop.
pub struct Server {
    pub mountpoint: PathBuf,
    pub source: PathBuf,
    child: Option<Child>,
    pid: u32,
    stderr: mpsc::Receiver<String>,
    log: Vec<String>,
    _dirs: Vec<tempfile::TempDir>,
}

fn spawn(mut cmd: Command, mountpoint: PathBuf, source: PathBuf, fstype: &str, dirs: Vec<tempfile::TempDir>) -> Server {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped()).stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn server");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let pid = child.id();
    let mut s = Server { mountpoint, source, child: Some(child), pid, stderr: rx, log: Vec::new(), _dirs: dirs };
    let ok = wait_until(Duration::from_secs(30), || {
        s.drain();
        mounted_at(&s.mountpoint).is_some_and(|t| t == fstype)
    });
    if !ok {
        let status = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        s.drain();
        panic!("{} did not mount ({status:?}); stderr:\n{}", s.mountpoint.display(), s.log.join("\n"));
    }
    s
}

impl Server {
    /// Starts ringfs over a fresh backing directory with `-o opts`.
    pub fn ringfs(opts: &str) -> Server {
        let src = tempfile::tempdir_in("/tmp").expect("tempdir");
        let source = src.path().to_path_buf();
        Self::ringfs_on(&source, opts, vec![src])
    }

    /// Starts ringfs over `source` with `-o opts`.
    pub fn ringfs_on(source: &Path, opts: &str, mut dirs: Vec<tempfile::TempDir>) -> Server {
        let mnt = tempfile::tempdir_in("/tmp").expect("tempdir");
        let mountpoint = mnt.path().to_path_buf();
        dirs.push(mnt);
        let mut cmd = Command::new(ringfs_bin());
        cmd.arg("mount").arg(source).arg(&mountpoint);
        if !opts.contains("export_state_dir") {
            // The mount's file-handle state goes with its temporary directories.
            let state = tempfile::tempdir_in("/tmp").expect("tempdir");
            cmd.arg("-o").arg(format!("export_state_dir={}", state.path().display()));
            dirs.push(state);
        }
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts);
        }
        cmd.env("RUST_LOG", "info");
        spawn(cmd, mountpoint, source.to_path_buf(), "fuse.ringfs", dirs)
    }

    /// Starts the `slow` example file system (`transport`: dev-fuse | uring | auto).
    pub fn slow(transport: &str, delay_ms: u64) -> Server {
        let mnt = tempfile::tempdir_in("/tmp").expect("tempdir");
        let mountpoint = mnt.path().to_path_buf();
        let mut cmd = Command::new(example_bin("slow"));
        cmd.arg(&mountpoint).arg(transport).env("DELAY_MS", delay_ms.to_string());
        spawn(cmd, mountpoint.clone(), mountpoint, "fuse.slow", vec![mnt])
    }

    /// Starts the `offthread` example file system (answers from other threads; see its docs).
    pub fn offthread(transport: &str) -> Server {
        let mnt = tempfile::tempdir_in("/tmp").expect("tempdir");
        let mountpoint = mnt.path().to_path_buf();
        let mut cmd = Command::new(example_bin("offthread"));
        cmd.arg(&mountpoint).arg(transport).env("RUST_LOG", "info");
        spawn(cmd, mountpoint.clone(), mountpoint, "fuse.offthread", vec![mnt])
    }

    /// Starts the `memfs` example file system (in memory, served from a storage thread).
    pub fn memfs(transport: &str) -> Server {
        let mnt = tempfile::tempdir_in("/tmp").expect("tempdir");
        let mountpoint = mnt.path().to_path_buf();
        let mut cmd = Command::new(example_bin("memfs"));
        cmd.arg(&mountpoint).arg(transport).env("RUST_LOG", "info");
        spawn(cmd, mountpoint.clone(), mountpoint, "fuse.memfs", vec![mnt])
    }

    /// Waits up to `timeout` for the server process to exit; its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the server process still runs.
    pub fn server_alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The fuse control directory of this mount's connection.
    pub fn fusectl(&self) -> PathBuf {
        let dev = self.dev();
        let kdev = (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev));
        PathBuf::from(format!("/sys/fs/fuse/connections/{kdev}"))
    }

    fn drain(&mut self) {
        while let Ok(l) = self.stderr.try_recv() {
            self.log.push(l);
        }
    }

    /// The server's stderr so far.
    pub fn log(&mut self) -> String {
        self.drain();
        self.log.join("\n")
    }

    /// How many lines of the server's stderr so far contain `text`.
    pub fn log_count(&mut self, text: &str) -> usize {
        self.drain();
        self.log.iter().filter(|l| l.contains(text)).count()
    }

    /// Waits (up to 30 s) until more than `before` lines of the server's stderr contain `text`:
    /// for the `slow` example, `"slow: lookup delayed"` or `"slow: read delayed"` says that a
    /// delayed request has reached it. Panics naming `what` if none comes.
    pub fn wait_log_count(&mut self, text: &str, before: usize, what: &str) {
        if !wait_until(Duration::from_secs(30), || self.log_count(text) > before) {
            let log = self.log();
            panic!("{what} never reached {} (no new {text:?} line):\n{log}", self.mountpoint.display());
        }
    }

    /// The metrics address the server logged.
    pub fn metrics_addr(&mut self) -> String {
        let mut addr = None;
        wait_until(Duration::from_secs(30), || {
            self.drain();
            addr = self.log.iter().find_map(|l| {
                l.split("listening on http://").nth(1).map(|r| r.trim_end_matches("/metrics").to_string())
            });
            addr.is_some()
        });
        addr.unwrap_or_else(|| panic!("no metrics address in the log:\n{}", self.log()))
    }

    /// Scrapes `/metrics`.
    pub fn scrape(&mut self) -> String {
        let addr = self.metrics_addr();
        let mut s = TcpStream::connect(&addr).expect("connect to metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("send");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read metrics");
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
    }

    /// The mount's device number.
    pub fn dev(&self) -> u64 {
        std::fs::metadata(&self.mountpoint).expect("stat mount").dev()
    }

    /// SIGTERM, then wait for the unmount.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if mounted_at(&self.mountpoint).is_some() {
            let p = std::ffi::CString::new(self.mountpoint.to_str().unwrap_or("")).unwrap_or_default();
            // SAFETY: valid C string.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of a metric sample `name{labels}` (exact label text), or 0 when absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// All samples of metric `name` as (labels, value).
pub fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, v) = l.rsplit_once(' ')?;
            let (n, labels) = match key.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}').to_string()),
                None => (key, String::new()),
            };
            (n == name).then(|| (labels, v.parse().unwrap_or(0.0)))
        })
        .collect()
}

/// Runs `f` on a thread pinned to `cpu`.
pub fn on_cpu<T: Send + 'static>(cpu: usize, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        // SAFETY: plain cpu_set_t manipulation and sched_setaffinity on this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        }
        f()
    })
}

/// How long the calling thread and the threads of process `pid` whose names start with one of
/// `names` have waited for a CPU so far (schedstat's run delay), or None where the kernel keeps
/// no schedstats. Timing bounds subtract what this grew by over a measurement: on a loaded
/// machine the scheduler's delays are not the server's.
pub fn cpu_wait(pid: u32, names: &[&str]) -> Option<Duration> {
    let delay = |p: &Path| -> Option<u64> { std::fs::read_to_string(p).ok()?.split_whitespace().nth(1)?.parse().ok() };
    let mut ns = delay(Path::new("/proc/thread-self/schedstat"))?;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if names.iter().any(|n| comm.starts_with(n)) {
            ns += delay(&t.path().join("schedstat")).unwrap_or(0);
        }
    }
    Some(Duration::from_nanos(ns))
}

/// How often the kernel's caches were dropped on this machine so far (`drop_slab` in
/// /proc/vmstat: every `echo 2|3 > /proc/sys/vm/drop_caches`, by any process). A test that
/// needs the kernel to keep what it cached checks that this did not move meanwhile.
pub fn cache_drops() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("drop_slab ").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

/// Online CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
