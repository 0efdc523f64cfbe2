//! The load the live-upgrade and crash-failover tests run on a mount while its server changes:
//! clients that hold files open and write, read back and fsync them, a metadata loop, and a
//! watch that the mount is never absent; plus the metrics scrape of the server's log address.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::Mount;

/// Whether process `pid` runs (a zombie counts as gone).
pub fn pid_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// What the clients saw.
#[derive(Default)]
pub struct Report {
    pub failures: Mutex<Vec<String>>,
    pub ops: Vec<AtomicU64>,
    /// Longest operation (µs) per client since the last reset.
    pub max_us: Vec<AtomicU64>,
}

impl Report {
    pub fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
    pub fn done(&self, client: usize, start: Instant) {
        self.ops[client].fetch_add(1, Ordering::Relaxed);
        self.max_us[client].fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub const BLOCK: usize = 4096;
pub const BLOCKS: u64 = 64;

pub fn block(file: usize, blk: u64, gen: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    let mut x = ((file as u64 + 1) * 0x9e37_79b9_7f4a_7c15) ^ blk.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ gen;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

/// A client that holds one file open for the whole test: writes a block, reads it back, fsyncs
/// every 8th write; keeps a model of the file's contents (generation per block).
pub fn file_client(id: usize, path: PathBuf, stop: Arc<AtomicBool>, rep: Arc<Report>) -> Vec<u64> {
    let mut gens = vec![0u64; BLOCKS as usize];
    // SAFETY: plain open(2) with a valid C string.
    let fd = unsafe { libc::open(c(&path).as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        rep.fail(format!("client {id}: open {}: errno {}", path.display(), errno()));
        return gens;
    }
    let mut n = 0u64;
    let mut buf = vec![0u8; BLOCK];
    while !stop.load(Ordering::Relaxed) {
        let blk = (n * 7 + id as u64) % BLOCKS;
        let gen = n + 1;
        let data = block(id, blk, gen);
        let t = Instant::now();
        // SAFETY: valid buffer and descriptor.
        let w = unsafe { libc::pwrite(fd, data.as_ptr().cast(), BLOCK, (blk * BLOCK as u64) as i64) };
        if w != BLOCK as isize {
            rep.fail(format!("client {id}: pwrite = {w}, errno {}", errno()));
            break;
        }
        gens[blk as usize] = gen;
        // SAFETY: as above.
        let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), BLOCK, (blk * BLOCK as u64) as i64) };
        if r != BLOCK as isize || buf != data {
            rep.fail(format!("client {id}: pread = {r} (errno {}) or data differs at block {blk}", errno()));
            break;
        }
        // SAFETY: valid descriptor.
        if n % 8 == 7 && unsafe { libc::fsync(fd) } != 0 {
            rep.fail(format!("client {id}: fsync errno {}", errno()));
            break;
        }
        rep.done(id, t);
        n += 1;
    }
    // SAFETY: our descriptor.
    if unsafe { libc::close(fd) } != 0 {
        rep.fail(format!("client {id}: close errno {}", errno()));
    }
    gens
}

/// Names change all the time: create + write + fsync + close, stat, rename, list, unlink, mkdir,
/// rmdir; plus open/read/close of a file that stays.
pub fn meta_client(id: usize, dir: PathBuf, stop: Arc<AtomicBool>, rep: Arc<Report>) {
    let mut n = 0u64;
    let keep = dir.join("keep");
    if let Err(e) = std::fs::write(&keep, b"kept") {
        rep.fail(format!("meta: write keep: {e}"));
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let a = dir.join(format!("a{n}"));
        let b = dir.join(format!("b{n}"));
        let sub = dir.join(format!("d{n}"));
        let step = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&a)?;
            f.write_all(&n.to_le_bytes())?;
            f.sync_all()?;
            drop(f);
            std::fs::metadata(&a)?;
            std::fs::rename(&a, &b)?;
            if std::fs::read(&b)? != n.to_le_bytes() {
                return Err(std::io::Error::other("renamed file's contents differ"));
            }
            let listed = std::fs::read_dir(&dir)?.count();
            if listed < 2 {
                return Err(std::io::Error::other(format!("listing shows {listed} entries")));
            }
            std::fs::create_dir(&sub)?;
            std::fs::remove_dir(&sub)?;
            std::fs::remove_file(&b)?;
            if std::fs::read(&keep)? != b"kept" {
                return Err(std::io::Error::other("kept file differs"));
            }
            Ok(())
        })();
        if let Err(e) = step {
            rep.fail(format!("meta client, round {n}: {e}"));
            break;
        }
        rep.done(id, t);
        n += 1;
    }
}

/// Watches that the mount is never absent (read from mountinfo, which makes no FUSE request).
pub fn mount_watch(mp: PathBuf, stop: Arc<AtomicBool>, rep: Arc<Report>) {
    while !stop.load(Ordering::Relaxed) {
        if tests::mounted_fstype(&mp).is_none() {
            rep.fail("the mount was absent".into());
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn metrics_addr(m: &Mount) -> Option<String> {
    let log = m.log();
    log.lines().find_map(|l| l.split("listening on http://").nth(1).map(|r| r.trim_end_matches("/metrics").to_string()))
}

pub fn scrape(addr: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read metrics");
    text
}

pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// fio runs back to back in `dir` while a server changes under them: 4 KiB buffered random
/// writes and 128 KiB O_DIRECT writes in turn, two jobs each, every block verified
/// (`--verify=crc32c --verify_fatal=1`). A run that fails, or reports an error, stops the loop
/// and is kept for [`FioLoop::finish`].
pub struct FioLoop {
    stop: Arc<AtomicBool>,
    runs: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl FioLoop {
    /// Starts the loop; `name` is fio's job name (its files are `name.N.0`).
    pub fn start(dir: PathBuf, name: &str) -> FioLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(AtomicU64::new(0));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s, r, f, name) = (stop.clone(), runs.clone(), failures.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let (rw, bs, direct) = if n % 2 == 0 { ("randwrite", "4k", 0) } else { ("write", "128k", 1) };
                let out = std::process::Command::new("fio")
                    .arg(format!("--name={name}"))
                    .arg(format!("--directory={}", dir.display()))
                    .arg(format!("--rw={rw}"))
                    .arg(format!("--bs={bs}"))
                    .arg(format!("--direct={direct}"))
                    .args(["--size=8M", "--numjobs=2", "--ioengine=psync", "--verify=crc32c", "--do_verify=1"])
                    .args(["--verify_fatal=1", "--verify_state_save=0", "--group_reporting=1"])
                    .args(["--output-format=terse", "--terse-version=3"])
                    .output();
                let failure = match out {
                    Ok(o) => {
                        let text = String::from_utf8_lossy(&o.stdout).to_string();
                        let line = text.lines().find(|l| l.starts_with("3;")).unwrap_or("");
                        let error = line.split(';').nth(4).unwrap_or("?");
                        (!o.status.success() || error != "0").then(|| {
                            format!(
                                "fio {rw} {bs} direct={direct}: {} error={error}\n{text}{}",
                                o.status,
                                String::from_utf8_lossy(&o.stderr)
                            )
                        })
                    }
                    Err(e) => Some(format!("fio: {e}")),
                };
                if let Some(failure) = failure {
                    f.lock().unwrap().push(failure);
                    return;
                }
                n += 1;
                r.store(n, Ordering::Relaxed);
            }
        });
        FioLoop { stop, runs, failures, thread }
    }

    /// Waits (at most 120 s) until a run has ended since the call, or one has failed; panics when
    /// fio made no progress at all.
    pub fn wait_for_a_run(&self) {
        let seen = self.runs.load(Ordering::Relaxed);
        assert!(
            tests::wait_until(Duration::from_secs(120), || self.runs.load(Ordering::Relaxed) > seen
                || !self.failures.lock().unwrap().is_empty()),
            "fio made no progress"
        );
    }

    /// Lets one more run end, stops the loop and returns the runs that ended and the failures.
    pub fn finish(self) -> (u64, Vec<String>) {
        let seen = self.runs.load(Ordering::Relaxed);
        tests::wait_until(Duration::from_secs(120), || {
            self.runs.load(Ordering::Relaxed) > seen || !self.failures.lock().unwrap().is_empty()
        });
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("fio thread");
        let failures = self.failures.lock().unwrap().clone();
        (self.runs.load(Ordering::Relaxed), failures)
    }
}

/// The clients of a load run on a mount: `files` clients holding `f0`, `f1`, ... open
/// ([`file_client`]), the metadata loop in `meta/` ([`meta_client`], client number `files`) and
/// the mount watch, all reporting to `rep` until `stop` is set ([`Clients::finish`]).
pub struct Clients {
    pub rep: Arc<Report>,
    pub stop: Arc<AtomicBool>,
    writers: Vec<std::thread::JoinHandle<Vec<u64>>>,
    meta: std::thread::JoinHandle<()>,
    watch: std::thread::JoinHandle<()>,
}

impl Clients {
    /// Starts them on `m` (creates `meta/`).
    pub fn start(m: &Mount, files: usize) -> Clients {
        std::fs::create_dir(m.path("meta")).expect("mkdir meta");
        let rep = Arc::new(Report {
            failures: Mutex::new(Vec::new()),
            ops: (0..files + 1).map(|_| AtomicU64::new(0)).collect(),
            max_us: (0..files + 1).map(|_| AtomicU64::new(0)).collect(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let writers = (0..files)
            .map(|i| {
                let (p, s, r) = (m.path(format!("f{i}")), stop.clone(), rep.clone());
                std::thread::spawn(move || file_client(i, p, s, r))
            })
            .collect();
        let meta = {
            let (d, s, r) = (m.path("meta"), stop.clone(), rep.clone());
            std::thread::spawn(move || meta_client(files, d, s, r))
        };
        let watch = {
            let (mp, s, r) = (m.mountpoint.clone(), stop.clone(), rep.clone());
            std::thread::spawn(move || mount_watch(mp, s, r))
        };
        Clients { rep, stop, writers, meta, watch }
    }

    /// Stops the clients and checks what they saw: no failure, and every block a file client
    /// wrote is there, through the mount and in the backing file.
    pub fn finish(self, m: &Mount) {
        self.stop.store(true, Ordering::Relaxed);
        let models: Vec<Vec<u64>> = self.writers.into_iter().map(|w| w.join().expect("client")).collect();
        self.meta.join().expect("meta client");
        self.watch.join().expect("mount watch");
        let failures = self.rep.failures.lock().unwrap().clone();
        assert!(failures.is_empty(), "client failures: {failures:?}\nserver log:\n{}", m.log());
        for (i, gens) in models.iter().enumerate() {
            for via in [m.path(format!("f{i}")), m.backing(format!("f{i}"))] {
                let data = std::fs::read(&via).expect("read back");
                for (blk, &gen) in gens.iter().enumerate().filter(|(_, &g)| g != 0) {
                    let at = blk * BLOCK;
                    assert_eq!(&data[at..at + BLOCK], &block(i, blk as u64, gen)[..], "{}: block {blk}", via.display());
                }
            }
        }
    }
}
