//! Reliability and safety under load, faults and bad input (see `docs/reliability.md`).
//!
//! - soak: fio writers with crc32c verification, metadata storms and verifying readers at once,
//!   on both transports with passthrough on and off, while `/metrics` is sampled for the
//!   server's RSS and fd count;
//! - crash and restart: SIGKILL during fsync'ed writes (watchdog unmount, fsync'ed bytes on the
//!   backing side, remount at once), SIGTERM under load (clean exit, nothing closed is lost);
//! - a hung backing file system (ringfs stacked on the `slow` example) never hangs unrelated
//!   operations, `/metrics` or the mount, and its stuck request shows in
//!   `ringfs_oldest_request_age_seconds`;
//! - limits: 200k inodes (FORGETs shrink the table, fds stay bounded), ENOSPC from the backing
//!   file system, thousands of open files and running out of descriptors;
//! - bad input: invalid option combinations (the parser and dispatcher are fuzzed by
//!   `protocol/tests/parser_props.rs`);
//! - security: the metrics endpoint's default bind address, permissions for other users on an
//!   `allow_other` mount, renames through the mount racing `..` walks and creates.
//!
//! The tests of this file run one at a time (a lock), so that load from one does not skew the
//! timings another asserts. `RINGFS_SOAK_SECS` sets the soak per configuration (default 15 s);
//! `RINGFS_INODE_FILES` the size of the inode test (default 200000).

mod support;

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tests::{cstr, pattern, run_as, wait_until, Mount, NOBODY_GID, NOBODY_UID};

const MIB: f64 = 1024.0 * 1024.0;

/// The server's fd count must stay below this whatever the workload (RLIMIT_NOFILE is 20000).
const FD_BOUND: f64 = 5000.0;

/// Allowed RSS growth of the server over one soak run.
const RSS_GROWTH_BOUND: f64 = 200.0 * MIB;

static SERIAL: Mutex<()> = Mutex::new(());

/// One test of this file at a time.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn soak_secs() -> f64 {
    std::env::var("RINGFS_SOAK_SECS").ok().and_then(|v| v.parse().ok()).filter(|s: &f64| *s > 0.0).unwrap_or(15.0)
}

fn need_uring(test: &str) -> bool {
    support::uring_enabled()
        || tests::skip(test, "FUSE over io_uring is off (echo 1 > /sys/module/fuse/parameters/enable_uring)")
}

fn need_tool(test: &str, tool: &str) -> bool {
    let ok = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    ok.is_ok_and(|s| s.success()) || tests::skip(test, &format!("`{tool}` is not installed"))
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::ENOSPC => "ENOSPC",
        libc::EIO => "EIO",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::ENOTCONN => "ENOTCONN",
        libc::EACCES => "EACCES",
        libc::ENOSYS => "ENOSYS",
        libc::EDQUOT => "EDQUOT",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// The `/metrics` address the server logged (waits up to 30 s for the line).
fn metrics_addr(m: &Mount) -> String {
    let mut addr = None;
    wait_until(Duration::from_secs(30), || {
        addr = m.log().lines().find_map(|l| {
            l.split("listening on http://").nth(1).map(|r| r.trim().trim_end_matches("/metrics").to_string())
        });
        addr.is_some()
    });
    addr.unwrap_or_else(|| panic!("no metrics address in the server log:\n{}", m.log()))
}

/// One scrape of `/metrics`, with timeouts (an endpoint that hangs is an error, not a hang).
fn scrape(addr: &str) -> std::io::Result<String> {
    let sa = addr.parse().map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!("bad /metrics answer: {}", text.lines().next().unwrap_or("")))),
    }
}

fn metric(text: &str, sample: &str) -> f64 {
    support::metric(text, sample)
}

/// What the sampler saw of the server.
#[derive(Clone, Debug, Default)]
struct Samples {
    n: usize,
    failures: Vec<String>,
    rss_first: f64,
    rss_peak: f64,
    rss_last: f64,
    fds_first: f64,
    fds_peak: f64,
    fds_last: f64,
    inodes_peak: f64,
    handles_peak: f64,
    /// The longest a scrape took.
    slowest: Duration,
}

impl Samples {
    fn add(&mut self, text: &str) {
        let rss = metric(text, "process_resident_memory_bytes");
        let fds = metric(text, "process_open_fds");
        if self.n == 0 {
            self.rss_first = rss;
            self.fds_first = fds;
        }
        self.n += 1;
        self.rss_peak = self.rss_peak.max(rss);
        self.fds_peak = self.fds_peak.max(fds);
        self.rss_last = rss;
        self.fds_last = fds;
        self.inodes_peak = self.inodes_peak.max(metric(text, "ringfs_inodes"));
        self.handles_peak = self.handles_peak.max(metric(text, "ringfs_open_handles"));
    }

    fn summary(&self) -> String {
        format!(
            "RSS {:.1} -> peak {:.1} -> {:.1} MiB, fds {} -> peak {} -> {}, inodes peak {}, open handles peak {}, \
             {} scrapes (slowest {:?})",
            self.rss_first / MIB,
            self.rss_peak / MIB,
            self.rss_last / MIB,
            self.fds_first,
            self.fds_peak,
            self.fds_last,
            self.inodes_peak,
            self.handles_peak,
            self.n,
            self.slowest
        )
    }

    /// The server's memory and fds stayed bounded, and `/metrics` kept answering.
    fn assert_bounded(&self, what: &str) {
        assert!(self.n >= 2, "{what}: too few metrics samples ({})", self.n);
        assert!(self.failures.is_empty(), "{what}: /metrics failed during the run: {:?}", self.failures);
        assert!(self.fds_peak > 0.0, "{what}: process_open_fds missing from /metrics");
        assert!(self.fds_peak < FD_BOUND, "{what}: server fds peaked at {} (bound {FD_BOUND})", self.fds_peak);
        let growth = self.rss_peak - self.rss_first;
        assert!(
            growth < RSS_GROWTH_BOUND,
            "{what}: server RSS grew by {:.1} MiB (bound {:.0} MiB)",
            growth / MIB,
            RSS_GROWTH_BOUND / MIB
        );
    }
}

/// Scrapes `/metrics` every `every` on a thread until [`Sampler::finish`].
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Samples>,
}

impl Sampler {
    fn start(addr: String, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = Samples::default();
            loop {
                let t = Instant::now();
                match scrape(&addr) {
                    Ok(text) => samples.add(&text),
                    Err(e) => samples.failures.push(e.to_string()),
                }
                samples.slowest = samples.slowest.max(t.elapsed());
                if s.load(Ordering::Relaxed) {
                    return samples;
                }
                let next = t + every;
                while Instant::now() < next && !s.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("metrics sampler")
    }
}

/// No panic and no error-level line in the server's log.
fn assert_clean_log(m: &Mount, what: &str) {
    let log = m.log();
    let bad: Vec<&str> = log.lines().filter(|l| l.contains("panicked") || l.contains(" ERROR ")).collect();
    assert!(bad.is_empty(), "{what}: the server logged errors:\n{}", bad.join("\n"));
}

/// The server's own EIO answers (an EIO that the backing file system did not cause is a bug).
fn eio_count(text: &str) -> f64 {
    metric(text, "ringfs_errors_total{errno=\"EIO\"}")
}

fn mount_opts(transport: &str, passthrough: bool) -> Vec<String> {
    vec![format!("transport={transport}"), format!("passthrough={passthrough}"), "metrics_addr=127.0.0.1:0".into()]
}

fn start(opts: &[String]) -> Mount {
    let o: Vec<&str> = opts.iter().map(String::as_str).collect();
    Mount::start(&o)
}

/// The transport the server says it uses is the one asked for.
fn assert_transport(m: &Mount, transport: &str) {
    let want = if transport == "uring" { "transport: FUSE over io_uring" } else { "transport: classic /dev/fuse" };
    // The line comes with INIT, just after the mount appears.
    assert!(
        wait_until(Duration::from_secs(30), || m.log().contains(want)),
        "asked for transport={transport}; server log:\n{}",
        m.log()
    );
}

// ---------------------------------------------------------------------------------------------
// Soak

/// What the soak's fio loop did.
#[derive(Default)]
struct FioStats {
    runs: u64,
    written: u64,
    verified: u64,
}

/// Runs fio (4 jobs, crc32c verification of everything written) over and over until
/// `deadline`, varying the pattern: 4 KiB random buffered writes, 128 KiB sequential O_DIRECT
/// writes, 64 KiB random buffered writes.
fn fio_loop(dir: PathBuf, deadline: Instant) -> Result<FioStats, String> {
    fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let mut st = FioStats::default();
    const JOBS: u64 = 4;
    const SIZE_MIB: u64 = 16;
    while Instant::now() < deadline || st.runs == 0 {
        let (rw, bs, direct) = match st.runs % 3 {
            0 => ("randwrite", "4k", 0),
            1 => ("write", "128k", 1),
            _ => ("randwrite", "64k", 0),
        };
        let mut child = Command::new("fio")
            .arg("--name=soak")
            .arg(format!("--directory={}", dir.display()))
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={bs}"))
            .arg(format!("--direct={direct}"))
            .arg(format!("--size={SIZE_MIB}M"))
            .arg(format!("--numjobs={JOBS}"))
            .args(["--ioengine=psync", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"])
            .args(["--group_reporting=1", "--output-format=terse", "--terse-version=3"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn fio: {e}"))?;
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| format!("wait fio: {e}"))? {
                break s;
            }
            if t.elapsed() > Duration::from_secs(180) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("fio run {} ({rw} {bs}) did not finish in 180 s", st.runs));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        let mut err = String::new();
        child.stdout.take().map(|mut o| o.read_to_string(&mut out));
        child.stderr.take().map(|mut e| e.read_to_string(&mut err));
        let fields: Vec<&str> = out.lines().find(|l| l.starts_with("3;")).unwrap_or("").split(';').collect();
        let error = fields.get(4).copied().unwrap_or("?");
        let read_kib: u64 = fields.get(5).and_then(|v| v.parse().ok()).unwrap_or(0);
        if !status.success() || error != "0" {
            return Err(format!(
                "fio run {} ({rw} {bs} direct={direct}) failed: {status}, error={error}\n{out}\n{err}",
                st.runs
            ));
        }
        let written = (JOBS * SIZE_MIB) << 20;
        if read_kib << 10 < written {
            return Err(format!(
                "fio run {}: verified {read_kib} KiB of {} KiB written\n{out}",
                st.runs,
                written >> 10
            ));
        }
        st.runs += 1;
        st.written += written;
        st.verified += read_kib << 10;
    }
    Ok(st)
}

/// Create/write, rename, read back, replace, hard link, mkdir/rename/rmdir, list, unlink,
/// in a directory of its own, until `deadline`. Returns the number of operations.
fn metadata_storm(dir: PathBuf, seed: u64, deadline: Instant) -> Result<u64, String> {
    let ctx = |what: &str, p: &Path, e: std::io::Error| format!("storm {seed}: {what} {}: {e}", p.display());
    fs::create_dir(&dir).map_err(|e| ctx("mkdir", &dir, e))?;
    let mut ops = 0u64;
    let mut live = std::collections::VecDeque::new();
    let mut n = 0u64;
    let current = dir.join("current");
    while Instant::now() < deadline {
        let data = format!("storm {seed} record {n} {}", "x".repeat((n % 300) as usize)).into_bytes();
        let a = dir.join(format!("new{n}"));
        let b = dir.join(format!("file{n}"));
        fs::write(&a, &data).map_err(|e| ctx("create", &a, e))?;
        fs::rename(&a, &b).map_err(|e| ctx("rename", &a, e))?;
        if a.symlink_metadata().is_ok() {
            return Err(format!("storm {seed}: {} still exists after its rename", a.display()));
        }
        let got = fs::read(&b).map_err(|e| ctx("read", &b, e))?;
        if got != data {
            return Err(format!("storm {seed}: {} holds {} bytes, expected {}", b.display(), got.len(), data.len()));
        }
        ops += 5;
        // Atomic replace of a file that readers may hold.
        let tmp = dir.join(format!("tmp{n}"));
        fs::write(&tmp, &data).map_err(|e| ctx("create", &tmp, e))?;
        fs::rename(&tmp, &current).map_err(|e| ctx("replace", &current, e))?;
        let got = fs::read(&current).map_err(|e| ctx("read", &current, e))?;
        if got != data {
            return Err(format!("storm {seed}: replaced file has stale content"));
        }
        ops += 3;
        if n % 4 == 0 {
            let h = dir.join(format!("link{n}"));
            fs::hard_link(&b, &h).map_err(|e| ctx("link", &h, e))?;
            let nlink = fs::metadata(&b).map_err(|e| ctx("stat", &b, e))?.nlink();
            if nlink != 2 {
                return Err(format!("storm {seed}: nlink {nlink} after link"));
            }
            fs::remove_file(&h).map_err(|e| ctx("unlink", &h, e))?;
            ops += 3;
        }
        if n % 8 == 0 {
            let d = dir.join(format!("dir{n}"));
            let d2 = dir.join(format!("moved{n}"));
            fs::create_dir(&d).map_err(|e| ctx("mkdir", &d, e))?;
            fs::write(d.join("inner"), b"inner").map_err(|e| ctx("create", &d, e))?;
            fs::rename(&d, &d2).map_err(|e| ctx("rename dir", &d, e))?;
            fs::remove_file(d2.join("inner")).map_err(|e| ctx("unlink", &d2, e))?;
            fs::remove_dir(&d2).map_err(|e| ctx("rmdir", &d2, e))?;
            ops += 5;
        }
        live.push_back(b);
        if live.len() > 64 {
            let old = live.pop_front().expect("non-empty");
            fs::remove_file(&old).map_err(|e| ctx("unlink", &old, e))?;
            ops += 1;
        }
        if n % 32 == 0 {
            let count = fs::read_dir(&dir).map_err(|e| ctx("readdir", &dir, e))?.count();
            // live files + "current" (+ a racing nothing: the directory is ours alone).
            if count != live.len() + 1 {
                return Err(format!("storm {seed}: readdir saw {count} entries, expected {}", live.len() + 1));
            }
            ops += 1;
        }
        n += 1;
    }
    for p in live {
        fs::remove_file(&p).map_err(|e| ctx("unlink", &p, e))?;
    }
    Ok(ops)
}

/// Reads random 64 KiB ranges of files with known contents until `deadline`; returns bytes read.
fn verifying_reader(files: Arc<Vec<(PathBuf, Vec<u8>)>>, seed: u64, deadline: Instant) -> Result<u64, String> {
    let mut x = seed | 1;
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    while Instant::now() < deadline {
        for (path, want) in files.iter() {
            let f = fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x as usize % want.len()) & !4095;
                let n = std::os::unix::fs::FileExt::read_at(&f, &mut buf, off as u64)
                    .map_err(|e| format!("read {} at {off}: {e}", path.display()))?;
                let end = (off + buf.len()).min(want.len());
                if n != end - off || buf[..n] != want[off..end] {
                    return Err(format!("{}: wrong data at offset {off} ({n} bytes read)", path.display()));
                }
                total += n as u64;
            }
        }
    }
    Ok(total)
}

fn soak(test: &str, transport: &str, passthrough: bool) {
    let _serial = serial();
    if !tests::require_root_fuse(test) || (transport == "uring" && !need_uring(test)) || !need_tool(test, "fio") {
        return;
    }
    let secs = soak_secs();
    let mut m = start(&mount_opts(transport, passthrough));
    assert_transport(&m, transport);
    let addr = metrics_addr(&m);
    let files: Vec<(PathBuf, Vec<u8>)> = (0..4u64)
        .map(|i| {
            let p = m.path(format!("readonly{i}"));
            let data = pattern(4 << 20, 1000 + i);
            fs::write(&p, &data).expect("write a reader file");
            (p, data)
        })
        .collect();
    let files = Arc::new(files);
    let sampler = Sampler::start(addr.clone(), Duration::from_millis(250));
    let began = Instant::now();
    let deadline = began + Duration::from_secs_f64(secs);
    let fio = {
        let dir = m.path("fio");
        std::thread::spawn(move || fio_loop(dir, deadline))
    };
    let storms: Vec<_> = (0..2u64)
        .map(|i| {
            let dir = m.path(format!("storm{i}"));
            std::thread::spawn(move || metadata_storm(dir, i, deadline))
        })
        .collect();
    let readers: Vec<_> = (0..2u64)
        .map(|i| {
            let files = files.clone();
            std::thread::spawn(move || verifying_reader(files, 77 + i, deadline))
        })
        .collect();
    let fio = fio.join().expect("fio thread");
    let storms: Vec<_> = storms.into_iter().map(|h| h.join().expect("storm thread")).collect();
    let readers: Vec<_> = readers.into_iter().map(|h| h.join().expect("reader thread")).collect();
    let ran = began.elapsed();
    let samples = sampler.finish();
    let text = scrape(&addr).expect("/metrics after the soak");
    let fio = fio.unwrap_or_else(|e| panic!("{test}: {e}"));
    let storm_ops: u64 = storms.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{test}: {e}"))).sum();
    let read: u64 = readers.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{test}: {e}"))).sum();
    eprintln!(
        "SOAK {test}: {:.1} s, fio {} runs ({:.0} MiB written, {:.0} MiB verified), {} metadata ops, \
         {:.0} MiB read and compared; server {}",
        ran.as_secs_f64(),
        fio.runs,
        fio.written as f64 / MIB,
        fio.verified as f64 / MIB,
        storm_ops,
        read as f64 / MIB,
        samples.summary()
    );
    assert!(fio.runs >= 1 && storm_ops > 0 && read > 0, "{test}: some part of the load did not run");
    samples.assert_bounded(test);
    assert_eq!(eio_count(&text), 0.0, "{test}: the server answered EIO");
    assert_eq!(metric(&text, "ringfs_malformed_requests_total"), 0.0, "{test}: malformed requests");
    assert_clean_log(&m, test);
    // Everything the storms and readers left is still right after the load.
    for (p, want) in files.iter() {
        assert!(fs::read(p).expect("read back") == *want, "{}: content changed", p.display());
    }
    let status = m.terminate();
    assert!(status.success(), "{test}: exit status {status} after the soak; log:\n{}", m.log());
}

#[test]
fn soak_uring_passthrough() {
    soak("reliability::soak_uring_passthrough", "uring", true);
}

#[test]
fn soak_uring_server_io() {
    soak("reliability::soak_uring_server_io", "uring", false);
}

#[test]
fn soak_dev_fuse_passthrough() {
    soak("reliability::soak_dev_fuse_passthrough", "dev-fuse", true);
}

#[test]
fn soak_dev_fuse_server_io() {
    soak("reliability::soak_dev_fuse_server_io", "dev-fuse", false);
}

// ---------------------------------------------------------------------------------------------
// Crash and restart

const RECORD: usize = 16 << 10;
const STREAM: usize = 32 << 20;

/// Appends 16 KiB records of a known stream to `path`, fsyncing every 4 records and publishing
/// the fsync'ed length, until `stop` or the first error. Returns (bytes written, first error).
fn fsync_writer(path: PathBuf, seed: u64, stop: Arc<AtomicBool>, synced: Arc<AtomicU64>) -> (u64, Option<String>) {
    let stream = pattern(STREAM, seed);
    let mut f = match fs::File::create(&path) {
        Ok(f) => f,
        Err(e) => return (0, Some(format!("create: {e}"))),
    };
    let mut off = 0usize;
    while !stop.load(Ordering::Relaxed) && off + RECORD <= STREAM {
        if let Err(e) = f.write_all(&stream[off..off + RECORD]) {
            return (off as u64, Some(format!("write at {off}: {e}")));
        }
        off += RECORD;
        if (off / RECORD) % 4 == 0 {
            if let Err(e) = f.sync_all() {
                return (off as u64, Some(format!("fsync at {off}: {e}")));
            }
            synced.store(off as u64, Ordering::SeqCst);
        }
    }
    (off as u64, None)
}

/// Fresh backing directory and mount point that outlive any one server.
fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::Builder::new().prefix("ringfs-rel-").tempdir_in("/tmp").expect("tempdir");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let (src, mnt) = (t.path().join("backing"), t.path().join("mnt"));
    fs::create_dir(&src).expect("mkdir backing");
    fs::create_dir(&mnt).expect("mkdir mnt");
    (t, src, mnt)
}

fn kill9_case(test: &str, transport: &str, passthrough: bool) {
    let _serial = serial();
    if !tests::require_root_fuse(test) || (transport == "uring" && !need_uring(test)) {
        return;
    }
    let (t, src, mnt) = dirs();
    let opts = mount_opts(transport, passthrough);
    let o: Vec<&str> = opts.iter().map(String::as_str).collect();
    let mut m = Mount::start_at(&src, &mnt, &o);
    assert_transport(&m, transport);
    let parent_dev = fs::metadata(t.path()).expect("stat").dev();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|i| {
            let (stop, synced) = (stop.clone(), Arc::new(AtomicU64::new(0)));
            let path = m.path(format!("log{i}"));
            let s = synced.clone();
            (synced, std::thread::spawn(move || fsync_writer(path, 500 + i, stop, s)))
        })
        .collect();
    // Let them write and fsync for a while.
    assert!(
        wait_until(Duration::from_secs(30), || writers
            .iter()
            .all(|(s, _)| s.load(Ordering::SeqCst) >= 4 * RECORD as u64)),
        "{test}: the writers made no fsync'ed progress"
    );
    // And some more: the kill lands in the middle of fsync'ed writing, not at its start.
    let progress: Vec<u64> = writers.iter().map(|(s, _)| s.load(Ordering::SeqCst)).collect();
    assert!(
        wait_until(Duration::from_secs(30), || writers
            .iter()
            .zip(&progress)
            .all(|((s, _), p)| s.load(Ordering::SeqCst) >= p + 8 * RECORD as u64)),
        "{test}: the writers stopped making fsync'ed progress"
    );
    let synced_at_kill: Vec<u64> = writers.iter().map(|(s, _)| s.load(Ordering::SeqCst)).collect();
    let killed = Instant::now();
    m.kill9();
    // The fsync'ed length can only grow after this point (fsyncs completed before the kill).
    let mut enotconn = 0;
    let unmounted = wait_until(Duration::from_secs(2), || match fs::metadata(&mnt) {
        Ok(md) => md.dev() == parent_dev && !m.is_mounted(),
        Err(e) => {
            enotconn += (errno_of(&e) == libc::ENOTCONN) as u32;
            false
        }
    });
    let unmount_took = killed.elapsed();
    stop.store(true, Ordering::Relaxed);
    let results: Vec<(u64, u64, Option<String>)> = writers
        .into_iter()
        .map(|(synced, h)| {
            let (written, err) = h.join().expect("writer");
            (synced.load(Ordering::SeqCst), written, err)
        })
        .collect();
    assert!(
        unmounted,
        "{test}: the mount point is not usable 2 s after SIGKILL ({} ENOTCONN stats); log:\n{}",
        enotconn,
        m.log()
    );
    drop(m);
    // Every fsync'ed byte is in the backing file, and nothing but the stream is there.
    for (i, (synced, written, err)) in results.iter().enumerate() {
        let data = fs::read(src.join(format!("log{i}"))).expect("read backing file");
        let want = pattern(STREAM, 500 + i as u64);
        assert!(synced_at_kill[i] <= *synced);
        assert!(
            data.len() as u64 >= *synced,
            "{test}: log{i}: {} bytes in the backing file, {synced} were fsync'ed",
            data.len()
        );
        assert!(data[..] == want[..data.len()], "{test}: log{i}: backing file differs from what was written");
        eprintln!(
            "{test}: log{i}: {synced} bytes fsync'ed, {written} written, {} on the backing side; writer ended with {:?}",
            data.len(),
            err
        );
    }
    // A new server on the same mount point works at once.
    let t = Instant::now();
    let again = Mount::start_at(&src, &mnt, &o);
    let remount_took = t.elapsed();
    for i in 0..3 {
        let through = fs::read(again.path(format!("log{i}"))).expect("read through the new mount");
        assert!(through == fs::read(src.join(format!("log{i}"))).expect("backing"), "{test}: log{i} differs");
    }
    fs::write(again.path("after"), b"after restart").expect("write through the new mount");
    eprintln!(
        "CRASH {test}: watchdog unmount {:?} after SIGKILL ({enotconn} ENOTCONN stats before), remount took {:?}",
        unmount_took, remount_took
    );
    drop(again);
}

#[test]
fn crash_kill9_during_fsync_writes_uring_passthrough() {
    kill9_case("reliability::crash_kill9_during_fsync_writes_uring_passthrough", "uring", true);
}

#[test]
fn crash_kill9_during_fsync_writes_dev_fuse_server_io() {
    kill9_case("reliability::crash_kill9_during_fsync_writes_dev_fuse_server_io", "dev-fuse", false);
}

/// openat(dirfd, name, O_CREAT|O_WRONLY|O_TRUNC), write, close (checking close's result).
fn write_at(dir: i32, name: &str, data: &[u8]) -> Result<(), String> {
    let c = CString::new(name).expect("name");
    // SAFETY: valid dir fd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(dir, c.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC, 0o644)
    };
    if fd < 0 {
        return Err(format!("create {name}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own; ManuallyDrop so that close is ours to check.
    let mut f = std::mem::ManuallyDrop::new(unsafe { fs::File::from_raw_fd(fd) });
    let w = f.write_all(data).map_err(|e| format!("write {name}: {e}"));
    // SAFETY: closing the descriptor we own, once.
    let c = unsafe { libc::close(fd) };
    w?;
    if c != 0 {
        return Err(format!("close {name}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[test]
fn sigterm_under_load_exits_cleanly_and_keeps_closed_files() {
    let test = "reliability::sigterm_under_load_exits_cleanly_and_keeps_closed_files";
    let _serial = serial();
    if !tests::require_root_fuse(test) {
        return;
    }
    let mut m = Mount::start(&["passthrough=false"]);
    // Work through a descriptor of the mount root: after the lazy unmount that SIGTERM does on
    // a busy mount, paths no longer lead into the mount, but this keeps working on it.
    let root = fs::File::open(&m.mountpoint).expect("open mount root");
    let rootfd = root.as_raw_fd();
    let stop = Arc::new(AtomicBool::new(false));
    let signalled = Arc::new(AtomicBool::new(false));
    // Files written and closed after the signal, by all workers; workers that ended early.
    let closed_after = Arc::new(AtomicU64::new(0));
    let ended = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..3u64)
        .map(|t| {
            let (stop, signalled) = (stop.clone(), signalled.clone());
            let (closed_after, ended) = (closed_after.clone(), ended.clone());
            std::thread::spawn(move || {
                let _ended = EndCount(ended);
                let mut closed = Vec::new();
                let mut after_signal = 0;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("w{t}-{n}");
                    let data = pattern(32 << 10, t * 1_000_000 + n);
                    if let Err(e) = write_at(rootfd, &name, &data) {
                        return (closed, after_signal, Some(e));
                    }
                    if signalled.load(Ordering::Relaxed) {
                        after_signal += 1;
                        closed_after.fetch_add(1, Ordering::Relaxed);
                    }
                    closed.push((name, t * 1_000_000 + n));
                    n += 1;
                }
                (closed, after_signal, None)
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(30), || fs::read_dir(&m.source).is_ok_and(|d| d.count() > 30)));
    let t = Instant::now();
    m.signal(libc::SIGTERM);
    signalled.store(true, Ordering::Relaxed);
    // Requests keep coming for a while after the signal (30 more files, or until every worker
    // failed); they must all be served.
    wait_until(Duration::from_secs(30), || {
        closed_after.load(Ordering::Relaxed) >= 30 || ended.load(Ordering::Relaxed) == 3
    });
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = workers.into_iter().map(|h| h.join().expect("worker")).collect();
    assert!(
        wait_until(Duration::from_secs(10), || !m.is_mounted()),
        "{test}: the mount point still shows the mount 10 s after SIGTERM"
    );
    drop(root);
    let status = m.wait_exit(Duration::from_secs(15));
    let exit_took = t.elapsed();
    let status = status.unwrap_or_else(|| panic!("{test}: no exit within 15 s of SIGTERM; log:\n{}", m.log()));
    assert!(status.success(), "{test}: exit status {status}; log:\n{}", m.log());
    let mut files = 0;
    let mut after = 0;
    for (closed, after_signal, err) in results {
        assert!(err.is_none(), "{test}: a request failed around the shutdown: {err:?}");
        after += after_signal;
        for (name, seed) in closed {
            let data = fs::read(m.backing(&name)).unwrap_or_else(|e| panic!("{test}: {name} lost: {e}"));
            assert!(data == pattern(32 << 10, seed), "{test}: {name} has the wrong content");
            files += 1;
        }
    }
    assert_clean_log(&m, test);
    eprintln!(
        "SIGTERM {test}: {files} files written and closed ({after} after the signal) all intact; \
         exit {exit_took:?} after SIGTERM (under load until {after} files were closed after it)"
    );
}

/// Counts a worker thread's end (however it ends) when dropped.
struct EndCount(Arc<AtomicU64>);

impl Drop for EndCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// A hung or slow backing file system

/// `statvfs(path)`: Ok or the errno, and how long it took.
fn statvfs(path: &Path) -> (Result<(), i32>, Duration) {
    let c = cstr(path);
    let t = Instant::now();
    // SAFETY: valid path and an out-parameter on the stack.
    let r = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        libc::statvfs(c.as_ptr(), &mut st)
    };
    (if r == 0 { Ok(()) } else { Err(tests::errno()) }, t.elapsed())
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

/// Waits up to `timeout` for a child to exit; kills it if it does not.
fn wait_child(c: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let mut st = None;
    wait_until(timeout, || {
        st = c.try_wait().ok().flatten();
        st.is_some()
    });
    if st.is_none() {
        let _ = c.kill();
        let _ = c.wait();
    }
    st
}

fn hung_backing_case(test: &str, transport: &str) {
    let _serial = serial();
    let _ = tests::ringfs_bin(); // brings the binary up to date before support::require checks it
    if !support::require(test, transport == "uring", &["slow"]) {
        return;
    }
    // Long against the 2 s allowed to unrelated operations, so that a loaded machine cannot blur
    // "answered while the read hangs" with "answered after it".
    const DELAY: Duration = Duration::from_millis(6000);
    let mut slow = support::Server::slow("dev-fuse", DELAY.as_millis() as u64);
    let m = Mount::start_with(
        &slow.mountpoint,
        &["passthrough=false", "metrics_addr=127.0.0.1:0", &format!("transport={transport}")],
    );
    assert_transport(&m, transport);
    let addr = metrics_addr(&m);
    assert_eq!(fs::read(m.path("fast")).expect("read fast"), b"0123456789abcdef");

    // A reader stuck on the slow file.
    let started = Instant::now();
    let mut reader = Command::new("cat").arg(m.path("slow")).stdout(Stdio::null()).spawn().expect("spawn cat");
    let mut age = 0.0;
    assert!(
        wait_until(Duration::from_secs(5), || {
            age = scrape(&addr).map(|t| metric(&t, "ringfs_oldest_request_age_seconds")).unwrap_or(0.0);
            age > 0.3
        }),
        "{test}: the stuck read does not show in ringfs_oldest_request_age_seconds"
    );
    // Unrelated operations answer promptly.
    let (fs_ringfs, statfs_took) = statvfs(&m.mountpoint);
    let (fs_slow, _) = statvfs(&slow.mountpoint);
    assert_eq!(fs_ringfs, fs_slow, "{test}: statfs through ringfs differs from the backing file system's own");
    let (fast, fast_took) = timed(|| fs::read(m.path("fast")));
    assert_eq!(fast.expect("read fast while slow is stuck"), b"0123456789abcdef");
    let (missing, missing_took) = timed(|| fs::metadata(m.path("no-such-name")));
    assert_eq!(missing.map_err(|e| errno_of(&e)).err(), Some(libc::ENOENT));
    let (text, scrape_took) = timed(|| scrape(&addr).expect("/metrics while a request is stuck"));
    let age1 = metric(&text, "ringfs_oldest_request_age_seconds");
    let since = started.elapsed().as_secs_f64();
    for (what, took) in
        [("statfs", statfs_took), ("read of fast", fast_took), ("lookup", missing_took), ("/metrics", scrape_took)]
    {
        assert!(took < Duration::from_secs(2), "{test}: {what} took {took:?} while a backing read hung");
    }
    assert!(metric(&text, "ringfs_requests_in_flight") >= 1.0, "{test}: no request in flight:\n{text}");
    assert!(age1 > 0.3 && age1 <= since + 0.1, "{test}: oldest request age {age1} s, reader started {since:.2} s ago");

    // SIGTERM to the reader: it goes away without waiting for the backing file system.
    let t = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(reader.id() as i32, libc::SIGTERM) };
    let st = wait_child(&mut reader, DELAY * 2);
    let reader_exit = t.elapsed();
    assert!(st.is_some(), "{test}: the reader did not exit after SIGTERM");

    // An interrupted lookup stuck in the backing file system: INTERRUPT travels through ringfs
    // (cancelling its backing call) into the slow file system, so the caller is not kept for
    // the whole delay.
    let lookups = slow.log_count("slow: lookup delayed");
    let mut stat = Command::new("stat")
        .arg(m.path("slowlookup"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stat");
    // Signalled once the lookup is held in the backing file system (before that there is
    // nothing to interrupt).
    slow.wait_log_count("slow: lookup delayed", lookups, "the lookup of slowlookup");
    let t = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(stat.id() as i32, libc::SIGTERM) };
    let st = wait_child(&mut stat, DELAY * 2);
    let lookup_exit = t.elapsed();
    assert!(st.is_some_and(|s| !s.success()), "{test}: interrupted stat: {st:?}");
    assert!(
        lookup_exit < DELAY - Duration::from_millis(1000),
        "{test}: an interrupted lookup waited {lookup_exit:?} (the backing delay is {DELAY:?})"
    );

    // The mount is not wedged: requests drain, and the same slow file reads fully again.
    let ((), quick) = timed(|| {
        assert_eq!(fs::read(m.path("fast")).expect("read fast"), b"0123456789abcdef");
    });
    // A wedged mount would keep it for the backing delay (6 s).
    assert!(quick < Duration::from_secs(2), "{test}: read of fast took {quick:?} after the interrupts");
    let mut last = String::new();
    assert!(
        wait_until(DELAY + Duration::from_secs(3), || {
            last = scrape(&addr).unwrap_or_default();
            metric(&last, "ringfs_oldest_request_age_seconds") == 0.0
                && metric(&last, "ringfs_requests_in_flight") == 0.0
        }),
        "{test}: requests still in flight long after the readers went away:\n{last}"
    );
    let (again, again_took) = timed(|| fs::read(m.path("slow")));
    assert_eq!(again.expect("read slow again"), b"0123456789abcdef");
    assert!(again_took < DELAY + Duration::from_secs(2), "{test}: read of slow took {again_took:?}");
    assert_clean_log(&m, test);
    eprintln!(
        "HUNG {test}: while a read hung for {DELAY:?}: statfs {statfs_took:?} ({}), fast read {fast_took:?}, \
         lookup {missing_took:?}, /metrics {scrape_took:?} (oldest age {age1:.2} s); reader exited {reader_exit:?} \
         after SIGTERM; interrupted lookup {lookup_exit:?}; next slow read {again_took:?}",
        match fs_ringfs {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("{} like the backing fs", errno_name(e)),
        }
    );
    drop(m);
    drop(slow);
}

#[test]
fn hung_backing_fs_does_not_hang_the_mount_uring() {
    hung_backing_case("reliability::hung_backing_fs_does_not_hang_the_mount_uring", "uring");
}

#[test]
fn hung_backing_fs_does_not_hang_the_mount_dev_fuse() {
    hung_backing_case("reliability::hung_backing_fs_does_not_hang_the_mount_dev_fuse", "dev-fuse");
}

// ---------------------------------------------------------------------------------------------
// Limits

fn inode_files() -> usize {
    std::env::var("RINGFS_INODE_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000)
}

/// Creates `n` empty files natively under `root` in directories of 1000 (mknod, two threads).
fn create_tree(root: &Path, n: usize) -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = (0..n.div_ceil(1000)).map(|d| root.join(format!("d{d}"))).collect();
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let dirs = dirs.clone();
            std::thread::spawn(move || {
                for (d, dir) in dirs.iter().enumerate().filter(|(d, _)| d % 2 == t) {
                    fs::create_dir(dir).expect("mkdir");
                    for i in 0..1000.min(n - d * 1000) {
                        let c = cstr(dir.join(format!("f{i}")));
                        // SAFETY: valid path.
                        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFREG | 0o644, 0) };
                        assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("create tree");
    }
    dirs
}

#[test]
fn inode_table_shrinks_on_forget_and_fds_stay_bounded() {
    let test = "reliability::inode_table_shrinks_on_forget_and_fds_stay_bounded";
    let _serial = serial();
    if !tests::require_root_fuse(test) {
        return;
    }
    if fs::OpenOptions::new().write(true).open("/proc/sys/vm/drop_caches").is_err() {
        tests::skip(test, "cannot write /proc/sys/vm/drop_caches");
        return;
    }
    let n = inode_files();
    let (_t, src, mnt) = dirs();
    let (dirs, create_took) = timed(|| create_tree(&src, n));
    let m = Mount::start_at(&src, &mnt, &["metrics_addr=127.0.0.1:0"]);
    let addr = metrics_addr(&m);
    let sampler = Sampler::start(addr.clone(), Duration::from_millis(200));
    let (seen, walk_took) = timed(|| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let dirs: Vec<PathBuf> = dirs
                    .iter()
                    .enumerate()
                    .filter(|(d, _)| d % 2 == t)
                    .map(|(_, d)| mnt.join(d.strip_prefix(&src).expect("under src")))
                    .collect();
                std::thread::spawn(move || {
                    let mut seen = 0usize;
                    for d in dirs {
                        for e in fs::read_dir(&d).expect("readdir through the mount") {
                            let p = e.expect("dirent").path();
                            let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
                            assert!(md.is_file());
                            seen += 1;
                        }
                    }
                    seen
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("walker")).sum::<usize>()
    });
    assert_eq!(seen, n, "{test}: the walk through the mount saw {seen} of {n} files");
    let before = scrape(&addr).expect("/metrics after the walk");
    let inodes_after_walk = metric(&before, "ringfs_inodes");
    // Dentries and inodes of the mount go; the kernel sends FORGETs for every one.
    let t = Instant::now();
    fs::write("/proc/sys/vm/drop_caches", "2").expect("drop_caches");
    let floor = 16.0 + n as f64 / 1000.0;
    let mut inodes_now = f64::MAX;
    let shrank = wait_until(Duration::from_secs(20), || {
        inodes_now = scrape(&addr).map(|t| metric(&t, "ringfs_inodes")).unwrap_or(f64::MAX);
        inodes_now <= floor
    });
    let forget_took = t.elapsed();
    // The tree still resolves afterwards (by file handle, without pinned fds).
    for d in dirs.iter().step_by(20) {
        let p = mnt.join(d.strip_prefix(&src).expect("under src")).join("f7");
        fs::metadata(&p).unwrap_or_else(|e| panic!("stat {} after the caches were dropped: {e}", p.display()));
    }
    let samples = sampler.finish();
    eprintln!(
        "INODES {test}: {n} files created natively in {create_took:?}, stat'ed through the mount in {walk_took:?}; \
         ringfs_inodes {inodes_after_walk} after the walk, {inodes_now} {forget_took:?} after drop_caches; server {}",
        samples.summary()
    );
    assert!(samples.failures.is_empty(), "{test}: /metrics failed: {:?}", samples.failures);
    assert!(
        samples.inodes_peak >= (n / 10) as f64,
        "{test}: the inode table peaked at {} for {n} files: the walk did not reach the server?",
        samples.inodes_peak
    );
    assert!(samples.fds_peak > 0.0 && samples.fds_peak < FD_BOUND, "{test}: server fds peaked at {}", samples.fds_peak);
    assert!(shrank, "{test}: ringfs_inodes still {inodes_now} 20 s after drop_caches (expected <= {floor})");
    // The forgotten inodes stay reachable for file handles, up to fuse.export_handles.
    let retired = scrape(&addr).map(|t| metric(&t, "ringfs_inodes_retired")).unwrap_or(0.0);
    let expected = (inodes_after_walk - inodes_now).min(65536.0) * 0.9;
    assert!(
        retired >= expected && retired <= 65536.0,
        "{test}: ringfs_inodes_retired {retired}, expected {expected} to 65536 after {} inodes were forgotten",
        inodes_after_walk - inodes_now
    );
    assert_clean_log(&m, test);
    drop(m);
}

/// A tmpfs mounted for one test, detached on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, opts: &str) -> std::io::Result<Tmpfs> {
        let (src, target, ty, data) = (cstr("tmpfs"), cstr(dir), cstr("tmpfs"), cstr(opts));
        // SAFETY: valid NUL-terminated strings.
        let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), ty.as_ptr(), 0, data.as_ptr().cast()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let c = cstr(&self.0);
        // SAFETY: valid path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Free blocks and inodes of the file system holding `p`.
fn statvfs_text(p: &Path) -> String {
    let c = cstr(p);
    // SAFETY: valid path and an out-parameter on the stack.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return format!("statvfs: {}", std::io::Error::last_os_error());
        }
        format!("{} blocks free, {} inodes free", st.f_bfree, st.f_ffree)
    }
}

/// The descriptors of `pid` that point at deleted files.
fn deleted_fds(pid: u32) -> String {
    let v: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| t.ends_with(" (deleted)"))
        .collect();
    format!("{} {v:?}", v.len())
}

/// Writes 64 KiB chunks to `path` until a write fails; returns (bytes written, errno).
fn fill(path: &Path) -> (u64, i32) {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let chunk = vec![0x5a; 64 << 10];
    let mut total = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => return (total, 0),
            Ok(k) => total += k as u64,
            Err(e) => return (total, errno_of(&e)),
        }
        assert!(total < 64 << 20, "wrote 64 MiB into a 2 MiB file system");
    }
}

#[test]
fn enospc_from_the_backing_fs_reaches_the_caller() {
    let test = "reliability::enospc_from_the_backing_fs_reaches_the_caller";
    let _serial = serial();
    if !tests::require_root_fuse(test) {
        return;
    }
    for passthrough in [true, false] {
        let (_t, src, _) = dirs();
        let tmpfs = match Tmpfs::mount(&src, "size=2m,nr_inodes=64,mode=0755") {
            Ok(t) => t,
            Err(e) => {
                tests::skip(test, &format!("cannot mount a tmpfs: {e}"));
                return;
            }
        };
        let mut m = Mount::start_with(&src, &["metrics_addr=127.0.0.1:0", &format!("passthrough={passthrough}")]);
        let addr = metrics_addr(&m);
        let what = format!("{test} (passthrough={passthrough})");
        // Data: writes past 2 MiB fail with ENOSPC.
        let (written, e) = fill(&m.path("fill"));
        assert_eq!(
            e,
            libc::ENOSPC,
            "{what}: filling the file system ended with {} after {written} bytes",
            errno_name(e)
        );
        assert!(written <= 2 << 20, "{what}: {written} bytes fit in a 2 MiB tmpfs");
        // A second writer on the full file system, through O_APPEND, gets ENOSPC too.
        let mut g = fs::OpenOptions::new().append(true).create(true).open(m.path("more")).expect("open more");
        let e = g.write_all(&[1u8; 8192]).expect_err("write on a full file system");
        assert_eq!(errno_of(&e), libc::ENOSPC, "{what}: second writer got {e}");
        let r = g.sync_all();
        assert!(r.as_ref().is_ok() || r.as_ref().is_err_and(|e| errno_of(e) == libc::ENOSPC), "{what}: fsync: {r:?}");
        drop(g);
        // Inodes: creates past nr_inodes fail with ENOSPC.
        let mut created = 0;
        let e = loop {
            match fs::File::create(m.path(format!("empty{created}"))) {
                Ok(_) => created += 1,
                Err(e) => break e,
            }
            assert!(created < 1000, "{what}: 1000 files in a 64-inode tmpfs");
        };
        assert_eq!(errno_of(&e), libc::ENOSPC, "{what}: create #{created} failed with {e}");
        let e = fs::create_dir(m.path("dir")).expect_err("mkdir with no inodes left");
        assert_eq!(errno_of(&e), libc::ENOSPC, "{what}: mkdir: {e}");
        // The server is fine and the space comes back.
        assert!(m.server_running(), "{what}: the server died");
        for i in 0..created {
            fs::remove_file(m.path(format!("empty{i}"))).expect("unlink");
        }
        fs::remove_file(m.path("fill")).expect("unlink fill");
        fs::remove_file(m.path("more")).expect("unlink more");
        // Unlinked files give their space back once the kernel's (asynchronous) RELEASEs of
        // them are served.
        let t = Instant::now();
        let mut last = None;
        let freed = wait_until(Duration::from_secs(30), || {
            last = fs::write(m.path("small"), b"space again").err();
            last.is_none()
        });
        let freed_after = t.elapsed();
        assert!(
            freed,
            "{what}: still {last:?} 30 s after every file was unlinked; backing: {}; server fds on deleted files: {}",
            statvfs_text(&src),
            deleted_fds(m.pid())
        );
        assert_eq!(fs::read(src.join("small")).expect("backing"), b"space again");
        let text = scrape(&addr).expect("/metrics");
        assert_eq!(eio_count(&text), 0.0, "{what}: EIO answers");
        assert!(metric(&text, "ringfs_errors_total{errno=\"ENOSPC\"}") >= 1.0, "{what}: no ENOSPC counted");
        eprintln!(
            "ENOSPC {what}: {written} bytes then ENOSPC; {created} creates then ENOSPC; space back {freed_after:?} \
             after the unlinks; server fine"
        );
        let status = m.terminate();
        assert!(status.success(), "{what}: exit {status}");
        drop(m);
        drop(tmpfs);
    }
}

#[test]
fn thousands_of_open_files_work_and_running_out_is_emfile() {
    let test = "reliability::thousands_of_open_files_work_and_running_out_is_emfile";
    let _serial = serial();
    if !tests::require_root_fuse(test) {
        return;
    }
    const OPEN: usize = 5000;
    for passthrough in [true, false] {
        let what = format!("{test} (passthrough={passthrough})");
        let mut m = Mount::start(&["metrics_addr=127.0.0.1:0", &format!("passthrough={passthrough}")]);
        let addr = metrics_addr(&m);
        let base = scrape(&addr).expect("/metrics");
        let t = Instant::now();
        let files: Vec<fs::File> = (0..OPEN)
            .map(|i| {
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(m.path(format!("open{i}")))
                    .unwrap_or_else(|e| panic!("{what}: open #{i}: {e}"))
            })
            .collect();
        for (i, f) in files.iter().enumerate() {
            std::os::unix::fs::FileExt::write_all_at(f, format!("file {i}").as_bytes(), 0).expect("write");
        }
        let mut buf = [0u8; 32];
        for (i, f) in files.iter().enumerate() {
            let k = std::os::unix::fs::FileExt::read_at(f, &mut buf, 0).expect("read");
            assert_eq!(&buf[..k], format!("file {i}").as_bytes(), "{what}: open{i}");
        }
        let during = scrape(&addr).expect("/metrics with 5000 files open");
        assert_eq!(metric(&during, "ringfs_open_handles"), OPEN as f64, "{what}: open handles");
        let fds_during = metric(&during, "process_open_fds");
        drop(files);
        let mut after = String::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                after = scrape(&addr).unwrap_or_default();
                metric(&after, "ringfs_open_handles") == 0.0 && metric(&after, "ringfs_backing_files") == 0.0
            }),
            "{what}: handles not released after close:\n{after}"
        );
        let fds_after = metric(&after, "process_open_fds");
        assert!(fds_after < FD_BOUND, "{what}: {fds_after} server fds after every file was closed");
        eprintln!(
            "OPEN {what}: {OPEN} files opened, written, read, closed in {:?}; server fds {} -> {fds_during} -> {fds_after}",
            t.elapsed(),
            metric(&base, "process_open_fds")
        );

        // Running out: open (and keep) files until something says no. The server holds
        // descriptors for open files, so its limit can come first; either way the caller must
        // see EMFILE or ENFILE, never EIO, and everything must work once they are closed.
        let mut held = Vec::new();
        let mut limit_err = None;
        for i in 0..19_000 {
            match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(m.path(format!("open{}", i % OPEN)))
            {
                Ok(f) => held.push(f),
                Err(e) => {
                    limit_err = Some(e);
                    break;
                }
            }
        }
        let opened = held.len();
        drop(held);
        if let Some(e) = &limit_err {
            assert!(
                matches!(errno_of(e), libc::EMFILE | libc::ENFILE),
                "{what}: running out of descriptors after {opened} opens gave {e}"
            );
        }
        assert!(
            wait_until(Duration::from_secs(10), || {
                after = scrape(&addr).unwrap_or_default();
                metric(&after, "ringfs_open_handles") == 0.0
            }),
            "{what}: handles not released after the exhaustion:\n{after}"
        );
        fs::write(m.path("after"), b"fine").expect("write after running out");
        assert_eq!(fs::read(m.path("after")).expect("read"), b"fine");
        assert!(m.server_running(), "{what}: the server died");
        assert_eq!(eio_count(&after), 0.0, "{what}: EIO answers");
        eprintln!(
            "OPEN {what}: exhaustion: {opened} more files opened, then {}",
            limit_err.as_ref().map_or("no error (19000 is the test's own cap)".to_string(), |e| e.to_string())
        );
        let status = m.terminate();
        assert!(status.success(), "{what}: exit {status}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[test]
fn invalid_option_combinations_are_rejected_with_the_reason() {
    let test = "reliability::invalid_option_combinations_are_rejected_with_the_reason";
    let _serial = serial();
    if !tests::require_root_fuse(test) {
        return;
    }
    let (_t, src, mnt) = dirs();
    let (s, p) = (src.to_str().expect("utf-8"), mnt.to_str().expect("utf-8"));
    let cases: &[(&[&str], &[&str])] = &[
        (&["mount", s, p, "-o", "passthrough=true,writeback_cache=true"], &["passthrough", "writeback_cache"]),
        (&["mount", s, p, "-o", "writeback_cache"], &["passthrough", "writeback_cache"]),
        (
            &["mount", s, p, "-o", "max_background=8,congestion_threshold=16"],
            &["congestion_threshold", "max_background"],
        ),
        (&["mount", s, s], &["mountpoint", "differ"]),
        (&["mount", s, p, "-o", "queue_depth=0"], &["queue_depth"]),
        (&["mount", s, p, "-o", "transport=carrier-pigeon"], &["transport"]),
        (&["mount", s, p, "-o", "entry_timeout=-1"], &["entry_timeout"]),
        (&["mount", s, p, "-o", "metrics_addr=not-an-address"], &["metrics"]),
    ];
    for (args, words) in cases {
        let out = tests::run_ringfs(args, Duration::from_secs(10));
        assert!(!out.status.success(), "{test}: {args:?} was accepted");
        for w in *words {
            assert!(out.stderr.contains(w), "{test}: {args:?}: the error does not name {w:?}:\n{}", out.stderr);
        }
        assert!(!out.stderr.contains("panicked"), "{test}: {args:?} panicked:\n{}", out.stderr);
        assert!(tests::mounted_fstype(&mnt).is_none(), "{test}: {args:?} left a mount");
        assert!(tests::mounted_fstype(&src).is_none(), "{test}: {args:?} left a mount");
    }
}

// ---------------------------------------------------------------------------------------------
// Security

/// Socket inodes of `pid`'s descriptors.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut set = HashSet::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        if let Ok(t) = fs::read_link(e.path()) {
            let t = t.to_string_lossy().into_owned();
            if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                set.insert(ino.parse().unwrap_or(0));
            }
        }
    }
    set
}

/// Listening TCP sockets from /proc/net/tcp{,6}: (local address in hex, inode).
fn listeners() -> Vec<(String, u64)> {
    let mut v = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for l in fs::read_to_string(f).unwrap_or_default().lines().skip(1) {
            let c: Vec<&str> = l.split_whitespace().collect();
            if c.len() > 9 && c[3] == "0A" {
                v.push((c[1].to_string(), c[9].parse().unwrap_or(0)));
            }
        }
    }
    v
}

#[test]
fn metrics_endpoint_binds_to_loopback_by_default() {
    let test = "reliability::metrics_endpoint_binds_to_loopback_by_default";
    let _serial = serial();
    if !tests::require_root_fuse(test) {
        return;
    }
    let (_t, src, mnt) = dirs();
    // Default options: no metrics_addr at all.
    let args = [std::ffi::OsStr::new("mount"), src.as_os_str(), mnt.as_os_str()];
    let m =
        Mount::start_args(&src, &mnt, &args).unwrap_or_else(|(s, log)| panic!("{test}: mount failed ({s}):\n{log}"));
    let mut log = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            log = m.log();
            log.contains("metrics: listening on") || log.contains("metrics endpoint disabled")
        }),
        "{test}: the server said nothing about its metrics endpoint:\n{log}"
    );
    let ours = socket_inodes(m.pid());
    let mine: Vec<(String, u64)> = listeners().into_iter().filter(|(_, ino)| ours.contains(ino)).collect();
    // 127.0.0.1:9464 as /proc/net/tcp writes it.
    const LOOPBACK_9464: &str = "0100007F:24F8";
    if log.contains("metrics: listening on") {
        assert!(log.contains("listening on http://127.0.0.1:9464/metrics"), "{test}: default address:\n{log}");
        assert_eq!(
            mine.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
            vec![LOOPBACK_9464],
            "{test}: the server's listening sockets"
        );
        let text = scrape("127.0.0.1:9464").expect("scrape the default endpoint");
        assert!(text.contains("ringfs_requests_total") || text.contains("ringfs_uptime_seconds"));
        eprintln!("METRICS {test}: listening on 127.0.0.1:9464 only ({} listening sockets)", mine.len());
    } else {
        // Port 9464 is taken (another ringfs, a real exporter): the message still shows the
        // default is loopback, and the server opened no other listener instead.
        let line = log.lines().find(|l| l.contains("metrics endpoint disabled")).unwrap_or("");
        assert!(line.contains("127.0.0.1:9464"), "{test}: default address in {line:?}");
        assert!(mine.is_empty(), "{test}: the server listens on {mine:?} although the endpoint is disabled");
        let holder: Vec<_> = listeners().into_iter().filter(|(a, _)| a.ends_with(":24F8")).collect();
        eprintln!("METRICS {test}: 9464 is taken ({holder:?}); the server logged {line:?} and listens nowhere");
    }
    assert!(!mine.iter().any(|(a, _)| a.starts_with("00000000:")), "{test}: listening on 0.0.0.0");
    drop(m);
}

#[test]
fn other_users_cannot_read_what_permissions_deny() {
    let test = "reliability::other_users_cannot_read_what_permissions_deny";
    let _serial = serial();
    if !tests::require_root_fuse_setpriv(test) {
        return;
    }
    // With default_permissions the kernel checks. Without it, other users are refused at
    // start-up (the kernel would skip checks the server cannot make), and without allow_other
    // other users cannot reach the mount at all.
    {
        let work = tempfile::tempdir_in("/tmp").expect("tempdir");
        let (src, mnt) = (work.path().join("src"), work.path().join("mnt"));
        fs::create_dir(&src).expect("mkdir");
        fs::create_dir(&mnt).expect("mkdir");
        match Mount::try_start_at(&src, &mnt, &["allow_other", "default_permissions=false"]) {
            Ok(m) => panic!("{test}: allow_other with default_permissions=false was served; log:\n{}", m.log()),
            Err((status, out)) => {
                assert!(!status.success());
                assert!(out.contains("cannot be false together with allow_other"), "{test}: {out}");
            }
        }
        let m = Mount::start(&["default_permissions=false"]);
        fs::write(m.backing("public"), b"everyone").expect("write");
        fs::set_permissions(m.backing("public"), fs::Permissions::from_mode(0o644)).expect("chmod");
        let out = run_as(NOBODY_UID, NOBODY_GID, &format!("cat '{}'", m.path("public").display()));
        assert!(!out.status.success() && out.stdout.is_empty(), "{test}: nobody reached a mount without allow_other");
    }
    {
        let dp = true;
        let what = format!("{test} (default_permissions={dp})");
        let m = Mount::start(&["allow_other", &format!("default_permissions={dp}")]);
        fs::write(m.backing("private"), b"root only").expect("write");
        fs::set_permissions(m.backing("private"), fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::write(m.backing("public"), b"everyone").expect("write");
        fs::set_permissions(m.backing("public"), fs::Permissions::from_mode(0o644)).expect("chmod");
        let cat = |p: PathBuf| run_as(NOBODY_UID, NOBODY_GID, &format!("cat '{}'", p.display()));
        let out = cat(m.path("private"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && out.stdout.is_empty(), "{what}: nobody read a 0600 root file");
        assert!(err.contains("Permission denied"), "{what}: cat of a 0600 root file: {err}");
        let out = cat(m.path("public"));
        assert!(out.status.success(), "{what}: cat of a 0644 file: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, b"everyone");
        // Writing a 0644 root file and creating in the 0755 root directory are refused too.
        let out = run_as(NOBODY_UID, NOBODY_GID, &format!("echo x >> '{}'", m.path("public").display()));
        assert!(!out.status.success(), "{what}: nobody appended to a 0644 root file");
        let out = run_as(NOBODY_UID, NOBODY_GID, &format!("echo x > '{}'", m.path("intruder").display()));
        assert!(!out.status.success(), "{what}: nobody created a file in a 0755 root directory");
        assert!(!m.backing("intruder").exists());
        assert_eq!(fs::read(m.backing("public")).expect("backing"), b"everyone");
    }
}

/// Renames done *through the mount* (the kernel's FUSE_RENAME) race `..` walks, dirfd-relative
/// opens and creates: nothing is ever read from, or created in, the directory that holds the
/// backing directory. (tests/tests/security.rs races renames done on the backing side.)
#[test]
fn renames_through_the_mount_never_escape_the_backing_dir() {
    let test = "reliability::renames_through_the_mount_never_escape_the_backing_dir";
    let _serial = serial();
    if !tests::require_root_fuse(test) {
        return;
    }
    const SECRET: &[u8] = b"outside the backing directory";
    let (t, src, _) = dirs();
    let outside = t.path();
    fs::write(outside.join("secret"), SECRET).expect("secret");
    fs::create_dir(outside.join("b")).expect("outside b");
    fs::write(outside.join("b/name"), SECRET).expect("outside b/name");
    let before: HashSet<PathBuf> = walk(outside, &src);
    let m = Mount::start_with(&src, &[]);
    fs::create_dir_all(m.path("a/b")).expect("mkdir a/b");
    fs::write(m.path("a/b/name"), b"inside").expect("write");
    let stop = Arc::new(AtomicBool::new(false));
    let flipped = Arc::new(AtomicU64::new(0));
    let flipper = {
        let (stop, mnt, flipped) = (stop.clone(), m.mountpoint.clone(), flipped.clone());
        std::thread::spawn(move || {
            let p = |s: &str| mnt.join(s);
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = fs::rename(p("a/b"), p("b"));
                let _ = fs::rename(p("b"), p("a/b"));
                if fs::rename(p("a"), p("a.real")).is_ok() {
                    let _ = std::os::unix::fs::symlink("..", p("a"));
                    let _ = fs::remove_file(p("a"));
                    let _ = fs::rename(p("a.real"), p("a"));
                }
                flips += 1;
                flipped.store(flips, Ordering::Relaxed);
            }
            flips
        })
    };
    let workers: Vec<_> = (0..2u64)
        .map(|w| {
            let (stop, mnt) = (stop.clone(), m.mountpoint.clone());
            std::thread::spawn(move || {
                let rels =
                    ["a/b/name", "b/name", "a/b/../../secret", "b/../../secret", "a/../../secret", "a/b/../../b/name"];
                let (mut reads, mut creates, mut n) = (0u64, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let rel = rels[(n as usize + w as usize) % rels.len()];
                    if let Ok(d) = fs::read(mnt.join(rel)) {
                        assert_ne!(d, SECRET, "read the outside secret through mnt/{rel}");
                        reads += 1;
                    }
                    // Creates through racing paths land inside the mount or nowhere.
                    let name = format!("c{w}-{n}");
                    for dir in ["a/b", "b", "a/b/.."] {
                        if fs::write(mnt.join(dir).join(&name), b"c").is_ok() {
                            creates += 1;
                        }
                    }
                    if let Ok(d) = fs::File::open(mnt.join("a/b")) {
                        let c = cstr("../../secret");
                        // SAFETY: valid dir fd and path.
                        let fd = unsafe { libc::openat(d.as_raw_fd(), c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                        if fd >= 0 {
                            // SAFETY: a descriptor we own.
                            let mut f = unsafe { fs::File::from_raw_fd(fd) };
                            let mut data = Vec::new();
                            let _ = f.read_to_end(&mut data);
                            assert_ne!(data, SECRET, "openat(mnt/a/b, ../../secret) read the outside secret");
                        }
                    }
                    n += 1;
                }
                (reads, creates)
            })
        })
        .collect();
    // Three seconds of racing, and on a slow machine until the flipper got round 100 times.
    let race_start = Instant::now();
    wait_until(Duration::from_secs(60), || {
        race_start.elapsed() >= Duration::from_secs(3) && flipped.load(Ordering::Relaxed) > 100
    });
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().expect("flipper");
    let (reads, creates) =
        workers.into_iter().map(|h| h.join().expect("worker")).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let after = walk(outside, &src);
    let new: Vec<_> = after.difference(&before).collect();
    // The mount point's own tree (mnt/...) is the caller's namespace; everything else beside
    // the backing directory must be untouched.
    let escaped: Vec<_> =
        new.iter().filter(|p| !p.starts_with(&m.mountpoint) && !p.starts_with(outside.join("mnt"))).collect();
    assert!(escaped.is_empty(), "{test}: files appeared beside the backing directory: {escaped:?}");
    assert_eq!(fs::read(outside.join("secret")).expect("secret"), SECRET);
    assert!(
        flips > 100 && reads > 0 && creates > 0,
        "{test}: the race did not run ({flips} flips, {reads} reads, {creates} creates)"
    );
    eprintln!(
        "RACE {test}: {flips} rename rounds through the mount, {reads} reads, {creates} creates, nothing outside"
    );
    drop(m);
}

/// Every path under `root`, not descending into `skip` or into mounts.
fn walk(root: &Path, skip: &Path) -> HashSet<PathBuf> {
    let mut set = HashSet::new();
    let dev = fs::symlink_metadata(root).map(|m| m.dev()).unwrap_or(0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p == skip {
                continue;
            }
            let Ok(md) = fs::symlink_metadata(&p) else { continue };
            if md.is_dir() && md.dev() == dev {
                stack.push(p.clone());
            }
            set.insert(p);
        }
    }
    set
}
