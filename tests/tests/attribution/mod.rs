//! The attribution scenario: a scripted mix of system calls with a known effect on a real mount,
//! each phase checked against the kernel-side counters ringfs exports (by cause class). Shared
//! by `ebpf.rs` (which asserts every phase) and `dashboards.rs` (which runs it under a real
//! Prometheus and compares the recording rules with the counters).
//!
//! The mount must run with demand tracing on and `passthrough_exclude=*.srv` (files named
//! `*.srv` are served by the server, the rest passes through), over a source prepared by
//! [`prepare_source`] *before* mounting (so no invalidation from the watch races the phases).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Mount options the scenario needs (add `metrics_addr=...`).
pub const OPTIONS: &str = "ebpf.demand_tracing=true,passthrough_exclude=*.srv";

const MIB: usize = 1024 * 1024;
/// Repetitions of the cheap metadata calls.
pub const N: u64 = 1000;
/// Files created (and then renamed, then unlinked: `K` of them).
pub const M: u64 = 50;
/// Renames and unlinks.
pub const K: u64 = 20;
/// Chunk of the read(2), io_uring and write phases.
const CHUNK: usize = 64 * 1024;

/// The kernel-side counters of one scrape, by class.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// `ringfs_kernel_demand_calls_total` by class.
    pub demand: BTreeMap<String, f64>,
    /// `ringfs_kernel_calls_with_fallback_total` by class.
    pub with_fallback: BTreeMap<String, f64>,
    /// `ringfs_kernel_fallback_requests_total` by (class, op).
    pub requests: BTreeMap<(String, String), f64>,
    /// `ringfs_kernel_io_bytes_total` by (class, direction, path).
    pub bytes: BTreeMap<(String, String, String), f64>,
}

fn labels(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim_matches('"').to_string()))
        .collect()
}

impl Counters {
    /// Parses the kernel-side families from `/metrics` text.
    pub fn parse(text: &str) -> Counters {
        let mut c = Counters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else { continue };
            let Ok(v) = value.parse::<f64>() else { continue };
            let Some((name, rest)) = key.split_once('{') else { continue };
            let l = labels(rest.trim_end_matches('}'));
            let get = |k: &str| l.get(k).cloned().unwrap_or_default();
            match name {
                "ringfs_kernel_demand_calls_total" => {
                    c.demand.insert(get("class"), v);
                }
                "ringfs_kernel_calls_with_fallback_total" => {
                    c.with_fallback.insert(get("class"), v);
                }
                "ringfs_kernel_fallback_requests_total" => {
                    c.requests.insert((get("class"), get("op")), v);
                }
                "ringfs_kernel_io_bytes_total" => {
                    c.bytes.insert((get("class"), get("direction"), get("path")), v);
                }
                _ => {}
            }
        }
        c
    }

    /// Calls of `class`.
    pub fn calls(&self, class: &str) -> u64 {
        self.demand.get(class).copied().unwrap_or(0.0) as u64
    }

    /// Calls of `class` that caused a request.
    pub fn fell_back(&self, class: &str) -> u64 {
        self.with_fallback.get(class).copied().unwrap_or(0.0) as u64
    }

    /// Requests of `op` charged to `class`.
    pub fn req(&self, class: &str, op: &str) -> u64 {
        self.requests.get(&(class.to_string(), op.to_string())).copied().unwrap_or(0.0) as u64
    }

    /// All requests charged to `class`.
    pub fn reqs(&self, class: &str) -> u64 {
        self.requests.iter().filter(|((c, _), _)| c == class).map(|(_, v)| *v as u64).sum()
    }

    /// Bytes of `class` in `dir` along `path`.
    pub fn bytes(&self, class: &str, dir: &str, path: &str) -> u64 {
        self.bytes.get(&(class.to_string(), dir.to_string(), path.to_string())).copied().unwrap_or(0.0) as u64
    }

    /// `self - before`, counter by counter.
    pub fn minus(&self, before: &Counters) -> Counters {
        fn sub<K: Ord + Clone>(a: &BTreeMap<K, f64>, b: &BTreeMap<K, f64>) -> BTreeMap<K, f64> {
            a.iter().map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0.0))).collect()
        }
        Counters {
            demand: sub(&self.demand, &before.demand),
            with_fallback: sub(&self.with_fallback, &before.with_fallback),
            requests: sub(&self.requests, &before.requests),
            bytes: sub(&self.bytes, &before.bytes),
        }
    }

    /// Non-zero counters, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (c, v) in self.demand.iter().filter(|(_, v)| **v != 0.0) {
            out.push_str(&format!("  {c}: calls {v}, with fallback {}\n", self.fell_back(c)));
        }
        for ((c, op), v) in self.requests.iter().filter(|(_, v)| **v != 0.0) {
            out.push_str(&format!("  {c}/{op}: {v} requests\n"));
        }
        for ((c, d, p), v) in self.bytes.iter().filter(|(_, v)| **v != 0.0) {
            out.push_str(&format!("  {c} {d} {p}: {v} bytes\n"));
        }
        out
    }
}

/// File contents: a position-dependent pattern.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Creates the files the scenario reads, in the backing directory, before mounting.
pub fn prepare_source(source: &Path) {
    std::fs::write(source.join("exists"), b"x").expect("write exists");
    for name in ["data.pt", "data.srv", "sf.pt", "sf.srv", "io.pt", "io.srv"] {
        std::fs::write(source.join(name), pattern(MIB)).expect("write data file");
    }
    for name in ["mm.pt", "mm.srv"] {
        std::fs::write(source.join(name), pattern(MIB / 4)).expect("write mmap file");
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("path without NUL")
}

fn open(p: &Path, flags: i32) -> OwnedFd {
    let c = cpath(p);
    // SAFETY: valid C string; the fd is owned by the returned value.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    assert!(fd >= 0, "open {}: {}", p.display(), std::io::Error::last_os_error());
    // SAFETY: fd was just returned by open and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// read(2) in `CHUNK` pieces until EOF; (calls, bytes).
fn read_all(p: &Path) -> (u64, usize) {
    let f = open(p, libc::O_RDONLY);
    let mut buf = vec![0u8; CHUNK];
    let (mut calls, mut total) = (0, 0);
    loop {
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        calls += 1;
        assert!(n >= 0, "read {}: {}", p.display(), std::io::Error::last_os_error());
        if n == 0 {
            return (calls, total);
        }
        total += n as usize;
    }
}

/// Maps `p` and touches every page; the sum of the first byte of every page.
fn mmap_touch(p: &Path) -> u64 {
    let f = open(p, libc::O_RDONLY);
    let len = std::fs::metadata(p).expect("stat mmap file").len() as usize;
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped below.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) };
    assert_ne!(addr, libc::MAP_FAILED, "mmap {}: {}", p.display(), std::io::Error::last_os_error());
    let mut sum = 0u64;
    for off in (0..len).step_by(4096) {
        // SAFETY: inside the mapping.
        sum += unsafe { std::ptr::read_volatile((addr as *const u8).add(off)) } as u64;
    }
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(addr, len) };
    sum
}

/// sendfile(2) of the whole file to /dev/null; (calls, bytes).
fn sendfile_all(p: &Path) -> (u64, usize) {
    let f = open(p, libc::O_RDONLY);
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null").expect("open /dev/null");
    let len = std::fs::metadata(p).expect("stat").len() as usize;
    let (mut calls, mut total) = (0, 0);
    while total < len {
        // SAFETY: valid fds; NULL offset uses the file position.
        let n = unsafe { libc::sendfile(null.as_raw_fd(), f.as_raw_fd(), std::ptr::null_mut(), len - total) };
        calls += 1;
        assert!(n > 0, "sendfile {}: {n} {}", p.display(), std::io::Error::last_os_error());
        total += n as usize;
    }
    (calls, total)
}

/// io_uring READs of `CHUNK` each, one at a time, over the whole file; (reads, bytes).
fn uring_read_all(p: &Path) -> (u64, usize) {
    let f = open(p, libc::O_RDONLY);
    let len = std::fs::metadata(p).expect("stat").len() as usize;
    let mut ring = io_uring::IoUring::new(8).expect("io_uring (needs CONFIG_IO_URING)");
    let mut buf = vec![0u8; CHUNK];
    let (mut reads, mut total) = (0, 0);
    while total < len {
        let sqe = io_uring::opcode::Read::new(io_uring::types::Fd(f.as_raw_fd()), buf.as_mut_ptr(), CHUNK as u32)
            .offset(total as u64)
            .build();
        // SAFETY: the buffer outlives the operation (we wait for its completion below).
        unsafe { ring.submission().push(&sqe).expect("queue read") };
        ring.submit_and_wait(1).expect("io_uring_enter");
        let cqe = ring.completion().next().expect("a completion");
        reads += 1;
        assert!(cqe.result() > 0, "io_uring read of {}: {}", p.display(), cqe.result());
        total += cqe.result() as usize;
    }
    (reads, total)
}

/// `n` write(2)s of 4 KiB to a new file; bytes.
fn write_chunks(p: &Path, n: u64) -> usize {
    let f = open(p, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC);
    let data = pattern(4096);
    for _ in 0..n {
        // SAFETY: valid fd and buffer.
        let w = unsafe { libc::write(f.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(w, 4096, "write {}: {}", p.display(), std::io::Error::last_os_error());
    }
    (n as usize) * 4096
}

fn stat_n(p: &Path, n: u64, expect_ok: bool) {
    let c = cpath(p);
    for _ in 0..n {
        // SAFETY: valid C string and stat buffer.
        let r = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::stat(c.as_ptr(), &mut st)
        };
        assert_eq!(r == 0, expect_ok, "stat {}: {}", p.display(), std::io::Error::last_os_error());
    }
}

/// One phase's result: what it did and the counters' change.
pub struct Phase {
    /// What the phase did.
    pub name: &'static str,
    /// Counter changes over the phase.
    pub delta: Counters,
    /// Problems found (empty when the phase matches its expectations).
    pub problems: Vec<String>,
}

/// Runs the scenario on `mnt`, scraping before and after each phase with `scrape`; checks
/// each phase's expected effect. Returns the phases (their problems are for the caller to
/// assert, so the Prometheus test can report them with its own context).
pub fn run(mnt: &Path, mut scrape: impl FnMut() -> Counters) -> Vec<Phase> {
    let mut phases = Vec::new();
    // Warm-up (not checked): the kernel learns the names and attributes of the files.
    stat_n(&mnt.join("exists"), 1, true);
    let mut last = scrape();
    let mut phase = |name: &'static str, f: &mut dyn FnMut() -> Vec<Expect>, phases: &mut Vec<Phase>| {
        let expects = f();
        let now = scrape();
        let delta = now.minus(&last);
        last = now;
        let problems = expects.iter().filter_map(|e| e.check(&delta)).collect();
        phases.push(Phase { name, delta, problems });
    };

    phase(
        "stat of an existing name (cached)",
        &mut || {
            stat_n(&mnt.join("exists"), N, true);
            vec![Expect::calls("stat", N), Expect::fell_back("stat", 0, 0), Expect::reqs("stat", 0, 0)]
        },
        &mut phases,
    );
    phase(
        "stat of an absent name (ENOENT; one LOOKUP, then the negative entry)",
        &mut || {
            stat_n(&mnt.join("absent"), N, false);
            vec![Expect::calls("stat", N), Expect::fell_back("stat", 1, 1), Expect::req("stat", "lookup", 1, 1)]
        },
        &mut phases,
    );
    phase(
        "open of the absent name (ENOENT from the negative entry)",
        &mut || {
            let c = cpath(&mnt.join("absent"));
            for _ in 0..N {
                // SAFETY: valid C string; the open fails.
                let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY) };
                assert!(fd < 0, "absent name opened");
            }
            vec![Expect::calls("open", N), Expect::fell_back("open", 0, 0)]
        },
        &mut phases,
    );
    phase(
        "create (open O_CREAT|O_EXCL, close)",
        &mut || {
            for i in 0..M {
                drop(open(&mnt.join(format!("new-{i}")), libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL));
            }
            vec![
                Expect::calls("create", M),
                Expect::fell_back("create", M, M),
                Expect::req("create", "create", M, M),
                // The kernel may revalidate the parent (GETATTR for the permission check) or
                // look the name up first: at most one of each per create.
                Expect::reqs("create", M, 3 * M),
                Expect::calls("close", M),
                Expect::fell_back("close", 0, 0),
            ]
        },
        &mut phases,
    );
    phase(
        "rename",
        &mut || {
            for i in 0..K {
                std::fs::rename(mnt.join(format!("new-{i}")), mnt.join(format!("ren-{i}"))).expect("rename");
            }
            vec![Expect::calls("rename", K), Expect::fell_back("rename", K, K), Expect::req("rename", "rename", K, K)]
        },
        &mut phases,
    );
    phase(
        "unlink",
        &mut || {
            for i in 0..K {
                std::fs::remove_file(mnt.join(format!("ren-{i}"))).expect("unlink");
            }
            vec![Expect::calls("unlink", K), Expect::fell_back("unlink", K, K), Expect::req("unlink", "unlink", K, K)]
        },
        &mut phases,
    );
    phase(
        "chmod through /proc/self/fd of an O_PATH fd (glibc's fchmodat(AT_SYMLINK_NOFOLLOW), tar)",
        &mut || {
            let f = open(&mnt.join("exists"), libc::O_PATH);
            let via = cpath(Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())));
            for _ in 0..K {
                // SAFETY: valid C string.
                let r = unsafe { libc::chmod(via.as_ptr(), 0o644) };
                assert_eq!(r, 0, "chmod via /proc/self/fd: {}", std::io::Error::last_os_error());
            }
            drop(f);
            vec![
                Expect::calls("setattr", K),
                Expect::fell_back("setattr", K, K),
                Expect::req("setattr", "setattr", K, K),
                Expect::reqs("unclassified", 0, 0),
            ]
        },
        &mut phases,
    );
    phase(
        "read(2) of 1 MiB, passthrough",
        &mut || {
            let (calls, bytes) = read_all(&mnt.join("data.pt"));
            vec![
                Expect::calls("read", calls),
                Expect::fell_back("read", 0, 0),
                Expect::bytes("read", "read", "mount", bytes as u64),
                Expect::bytes("read", "read", "passthrough", bytes as u64),
                Expect::bytes("read", "read", "server", 0),
                Expect::calls("open", 1),
                Expect::fell_back("open", 1, 1),
                Expect::req("open", "open", 1, 1),
            ]
        },
        &mut phases,
    );
    phase(
        "read(2) of 1 MiB, served by the server (cold page cache)",
        &mut || {
            let (calls, bytes) = read_all(&mnt.join("data.srv"));
            vec![
                Expect::calls("read", calls),
                // Readahead: the first call reads ahead, later ones find the data cached or
                // start the next window; never more calls than there are.
                Expect::fell_back("read", 1, calls),
                Expect::bytes("read", "read", "mount", bytes as u64),
                Expect::bytes("read", "read", "passthrough", 0),
                Expect::server_read_bytes("read", bytes as u64),
            ]
        },
        &mut phases,
    );
    phase(
        "mmap of 256 KiB, every page touched, passthrough",
        &mut || {
            mmap_touch(&mnt.join("mm.pt"));
            vec![Expect::calls_between("mmap", 1, 64), Expect::fell_back("mmap", 0, 0), Expect::reqs("mmap", 0, 0)]
        },
        &mut phases,
    );
    phase(
        "mmap of 256 KiB, every page touched, served by the server (cold)",
        &mut || {
            mmap_touch(&mnt.join("mm.srv"));
            vec![
                Expect::calls_between("mmap", 1, 64),
                Expect::fell_back_between_calls("mmap", 1),
                Expect::server_read_bytes("mmap", (MIB / 4) as u64),
            ]
        },
        &mut phases,
    );
    phase(
        "sendfile of 1 MiB, passthrough",
        &mut || {
            let (calls, bytes) = sendfile_all(&mnt.join("sf.pt"));
            vec![
                Expect::calls("splice", calls),
                Expect::fell_back("splice", 0, 0),
                Expect::bytes("splice", "read", "mount", bytes as u64),
                Expect::bytes("splice", "read", "passthrough", bytes as u64),
            ]
        },
        &mut phases,
    );
    phase(
        "sendfile of 1 MiB, served by the server (cold)",
        &mut || {
            let (calls, bytes) = sendfile_all(&mnt.join("sf.srv"));
            vec![
                Expect::calls("splice", calls),
                Expect::fell_back("splice", 1, calls),
                Expect::bytes("splice", "read", "mount", bytes as u64),
                Expect::server_read_bytes("splice", bytes as u64),
            ]
        },
        &mut phases,
    );
    phase(
        "io_uring reads of 1 MiB, passthrough",
        &mut || {
            let (reads, bytes) = uring_read_all(&mnt.join("io.pt"));
            vec![
                Expect::calls("io_uring", reads),
                // A read that would block makes io_uring arm a poll on the file: the first one
                // on the mount asks the server (FUSE_POLL); its ENOSYS answer ends that.
                Expect::fell_back("io_uring", 0, 1),
                Expect::req("io_uring", "poll", 0, 1),
                Expect::reqs("io_uring", 0, 1),
                Expect::bytes("io_uring", "read", "mount", bytes as u64),
                Expect::bytes("io_uring", "read", "passthrough", bytes as u64),
            ]
        },
        &mut phases,
    );
    phase(
        "io_uring reads of 1 MiB, served by the server (cold)",
        &mut || {
            let (reads, bytes) = uring_read_all(&mnt.join("io.srv"));
            vec![
                Expect::calls("io_uring", reads),
                Expect::fell_back("io_uring", 1, reads),
                Expect::bytes("io_uring", "read", "mount", bytes as u64),
                Expect::server_read_bytes("io_uring", bytes as u64),
            ]
        },
        &mut phases,
    );
    phase(
        "64 write(2)s of 4 KiB, passthrough",
        &mut || {
            let bytes = write_chunks(&mnt.join("w.pt"), 64) as u64;
            vec![
                Expect::calls("write", 64),
                // The first write to an inode may ask for security.capability (GETXATTR).
                Expect::fell_back("write", 0, 1),
                Expect::bytes("write", "write", "mount", bytes),
                Expect::bytes("write", "write", "passthrough", bytes),
                Expect::bytes("write", "write", "server", 0),
            ]
        },
        &mut phases,
    );
    phase(
        "64 write(2)s of 4 KiB, served by the server",
        &mut || {
            let bytes = write_chunks(&mnt.join("w.srv"), 64) as u64;
            vec![
                Expect::calls("write", 64),
                Expect::fell_back("write", 64, 64),
                Expect::req("write", "write", 64, 64),
                Expect::bytes("write", "write", "mount", bytes),
                Expect::bytes("write", "write", "passthrough", 0),
                Expect::bytes("write", "write", "server", bytes),
            ]
        },
        &mut phases,
    );
    // Every class's counters are consistent: calls with a fallback never exceed calls.
    let end = scrape();
    let mut problems = Vec::new();
    for (class, calls) in &end.demand {
        let fell = end.fell_back(class) as f64;
        if fell > *calls {
            problems.push(format!("{class}: {fell} calls with a fallback > {calls} calls"));
        }
    }
    phases.push(Phase { name: "totals", delta: end, problems });
    phases
}

/// One expectation on a phase's counter changes.
#[derive(Clone, Debug)]
pub enum Expect {
    /// Calls of a class, in [lo, hi].
    Calls(&'static str, u64, u64),
    /// Calls with a fallback, in [lo, hi].
    FellBack(&'static str, u64, u64),
    /// At least `lo` calls with a fallback, at most the phase's calls.
    FellBackAtMostCalls(&'static str, u64),
    /// Requests of (class, op), in [lo, hi].
    Req(&'static str, &'static str, u64, u64),
    /// All requests of a class, in [lo, hi].
    Reqs(&'static str, u64, u64),
    /// Bytes of (class, direction, path), exactly.
    Bytes(&'static str, &'static str, &'static str, u64),
    /// READ data the server returned for a class plus `background` (readahead the kernel
    /// queued and sent later), exactly.
    ServerRead(&'static str, u64),
}

impl Expect {
    fn calls(c: &'static str, n: u64) -> Expect {
        Expect::Calls(c, n, n)
    }
    fn calls_between(c: &'static str, lo: u64, hi: u64) -> Expect {
        Expect::Calls(c, lo, hi)
    }
    fn fell_back(c: &'static str, lo: u64, hi: u64) -> Expect {
        Expect::FellBack(c, lo, hi)
    }
    fn fell_back_between_calls(c: &'static str, lo: u64) -> Expect {
        Expect::FellBackAtMostCalls(c, lo)
    }
    fn req(c: &'static str, op: &'static str, lo: u64, hi: u64) -> Expect {
        Expect::Req(c, op, lo, hi)
    }
    fn reqs(c: &'static str, lo: u64, hi: u64) -> Expect {
        Expect::Reqs(c, lo, hi)
    }
    fn bytes(c: &'static str, d: &'static str, p: &'static str, n: u64) -> Expect {
        Expect::Bytes(c, d, p, n)
    }
    fn server_read_bytes(c: &'static str, n: u64) -> Expect {
        Expect::ServerRead(c, n)
    }

    /// None when `d` meets the expectation, else what is wrong.
    pub fn check(&self, d: &Counters) -> Option<String> {
        let within = |what: String, v: u64, lo: u64, hi: u64| {
            (v < lo || v > hi).then(|| format!("{what} = {v}, expected {}", range(lo, hi)))
        };
        match *self {
            Expect::Calls(c, lo, hi) => within(format!("{c} calls"), d.calls(c), lo, hi),
            Expect::FellBack(c, lo, hi) => within(format!("{c} calls with a fallback"), d.fell_back(c), lo, hi),
            Expect::FellBackAtMostCalls(c, lo) => {
                within(format!("{c} calls with a fallback"), d.fell_back(c), lo, d.calls(c).max(lo))
            }
            Expect::Req(c, op, lo, hi) => {
                // RENAME and RENAME2 are one operation for the caller.
                let v = if op == "rename" { d.req(c, "rename") + d.req(c, "rename2") } else { d.req(c, op) };
                within(format!("{c}/{op} requests"), v, lo, hi)
            }
            Expect::Reqs(c, lo, hi) => within(format!("{c} requests"), d.reqs(c), lo, hi),
            Expect::Bytes(c, dir, p, n) => within(format!("{c} {dir} bytes via {p}"), d.bytes(c, dir, p), n, n),
            Expect::ServerRead(c, n) => {
                let v = d.bytes(c, "read", "server") + d.bytes("background", "read", "server");
                within(format!("{c} (+ background) read bytes via server"), v, n, n)
            }
        }
    }
}

fn range(lo: u64, hi: u64) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}..={hi}")
    }
}
