//! `--requests`: how many FUSE requests each workload's system calls cost, by opcode, for
//! ringfs and for peer servers alike, with the server's CPU time per request.
//!
//! Requests are counted in the kernel, from the `fuse:fuse_request_send` tracepoint filtered on
//! the mount's connection (its device number), in a tracefs instance of the harness's own (so
//! nothing else tracing the machine is disturbed, and any FUSE server can be measured the same
//! way). The tracepoint fires for every request that reaches the server, except FORGET and
//! BATCH_FORGET, which the kernel queues apart (they need no reply). System calls are counted by
//! running the workload once under `strace -f -c -e trace=%file,%desc` (the first repetition;
//! strace slows the workload but not what it asks). Server CPU is the sum over the server's
//! threads of `/proc/PID/task/TID/schedstat` (time on CPU, ns) across the timed command, taken
//! from the repetitions without strace (a busy-polling server polls longer between the slower
//! requests of a traced workload).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

const TRACEFS: &str = "/sys/kernel/tracing";

/// FUSE opcode names, as the tracepoint prints them (without the `FUSE_` prefix).
pub(crate) fn opcode_name(op: u32) -> String {
    let name = match op {
        1 => "LOOKUP",
        2 => "FORGET",
        3 => "GETATTR",
        4 => "SETATTR",
        5 => "READLINK",
        6 => "SYMLINK",
        8 => "MKNOD",
        9 => "MKDIR",
        10 => "UNLINK",
        11 => "RMDIR",
        12 => "RENAME",
        13 => "LINK",
        14 => "OPEN",
        15 => "READ",
        16 => "WRITE",
        17 => "STATFS",
        18 => "RELEASE",
        20 => "FSYNC",
        21 => "SETXATTR",
        22 => "GETXATTR",
        23 => "LISTXATTR",
        24 => "REMOVEXATTR",
        25 => "FLUSH",
        26 => "INIT",
        27 => "OPENDIR",
        28 => "READDIR",
        29 => "RELEASEDIR",
        30 => "FSYNCDIR",
        31 => "GETLK",
        32 => "SETLK",
        33 => "SETLKW",
        34 => "ACCESS",
        35 => "CREATE",
        36 => "INTERRUPT",
        37 => "BMAP",
        38 => "DESTROY",
        39 => "IOCTL",
        40 => "POLL",
        42 => "BATCH_FORGET",
        43 => "FALLOCATE",
        44 => "READDIRPLUS",
        45 => "RENAME2",
        46 => "LSEEK",
        47 => "COPY_FILE_RANGE",
        50 => "SYNCFS",
        51 => "TMPFILE",
        52 => "STATX",
        _ => return format!("OP{op}"),
    };
    name.to_owned()
}

/// The kernel's `dev_t` (major << 20 | minor) of the file system holding `path`, as the FUSE
/// tracepoints print a connection.
pub(crate) fn connection_of(path: &Path) -> Result<u64> {
    let dev = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.dev();
    Ok((u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev)))
}

/// Whether requests can be counted here (tracefs with the FUSE tracepoints, writable).
pub(crate) fn probe() -> Result<()> {
    let ev = Path::new(TRACEFS).join("events/fuse/fuse_request_send");
    if !ev.is_dir() {
        bail!("{} missing: tracefs not mounted or no FUSE tracepoints", ev.display());
    }
    Ok(())
}

/// Counts the requests of one connection until [`Counter::finish`].
pub(crate) struct Counter {
    instance: PathBuf,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<Result<BTreeMap<u32, u64>>>>,
}

static INSTANCES: AtomicU32 = AtomicU32::new(0);

impl Counter {
    /// Starts counting requests sent to connection `conn` (see [`connection_of`]).
    pub(crate) fn start(conn: u64) -> Result<Counter> {
        let name = format!("ringfs-bench-{}-{}", std::process::id(), INSTANCES.fetch_add(1, Ordering::Relaxed));
        let instance = Path::new(TRACEFS).join("instances").join(name);
        fs::create_dir(&instance).with_context(|| format!("creating tracefs instance {}", instance.display()))?;
        let mut counter = Counter { instance, stop: Arc::new(AtomicBool::new(false)), reader: None };
        let ev = counter.instance.join("events/fuse/fuse_request_send");
        fs::write(counter.instance.join("buffer_size_kb"), "8192").context("buffer_size_kb")?;
        fs::write(ev.join("filter"), format!("connection == {conn}")).context("tracepoint filter")?;
        let mut pipe = fs::File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(counter.instance.join("trace_pipe"))
            .context("trace_pipe")?;
        fs::write(ev.join("enable"), "1").context("enabling fuse_request_send")?;
        let stop = counter.stop.clone();
        counter.reader = Some(std::thread::spawn(move || -> Result<BTreeMap<u32, u64>> {
            let mut counts = BTreeMap::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut carry: Vec<u8> = Vec::new();
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => std::thread::sleep(Duration::from_millis(2)),
                    Ok(n) => {
                        carry.extend_from_slice(&buf[..n]);
                        let end = carry.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                        for line in carry[..end].split(|&b| b == b'\n') {
                            if let Some(op) = parse_opcode(line) {
                                *counts.entry(op).or_insert(0) += 1;
                            }
                        }
                        carry.drain(..end);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if stop.load(Ordering::SeqCst) {
                            return Ok(counts);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("reading trace_pipe"),
                }
            }
        }));
        Ok(counter)
    }

    /// Stops counting: the requests by opcode, and how many events the trace buffer lost.
    pub(crate) fn finish(mut self) -> Result<(BTreeMap<u32, u64>, u64)> {
        fs::write(self.instance.join("events/fuse/fuse_request_send/enable"), "0")?;
        self.stop.store(true, Ordering::SeqCst);
        let counts = match self.reader.take() {
            Some(h) => h.join().map_err(|_| anyhow::anyhow!("trace reader panicked"))??,
            None => BTreeMap::new(),
        };
        let mut lost = 0;
        if let Ok(cpus) = fs::read_dir(self.instance.join("per_cpu")) {
            for cpu in cpus.flatten() {
                let stats = fs::read_to_string(cpu.path().join("stats")).unwrap_or_default();
                for line in stats.lines() {
                    if let Some(v) = line.strip_prefix("overrun:").or_else(|| line.strip_prefix("dropped events:")) {
                        lost += v.trim().parse::<u64>().unwrap_or(0);
                    }
                }
            }
        }
        Ok((counts, lost))
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        let _ = fs::write(self.instance.join("events/fuse/fuse_request_send/enable"), "0");
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        let _ = fs::remove_dir(&self.instance);
    }
}

/// The opcode of one `fuse_request_send` line ("... opcode 1 (FUSE_LOOKUP) len 45").
fn parse_opcode(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let rest = &line[line.find(" opcode ")? + 8..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Time on CPU (ns) of every thread of process `pid` so far.
pub(crate) fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// System calls counted by `strace -c -o file`: the total and the calls by name.
pub(crate) fn parse_strace_summary(text: &str) -> (u64, BTreeMap<String, u64>) {
    let mut total = 0;
    let mut by_name = BTreeMap::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors], syscall
        if t.len() < 5 || t[0].parse::<f64>().is_err() {
            continue;
        }
        let Ok(calls) = t[3].parse::<u64>() else { continue };
        let name = t[t.len() - 1];
        if name == "total" {
            total = calls;
        } else {
            by_name.insert(name.to_owned(), calls);
        }
    }
    if total == 0 {
        total = by_name.values().sum();
    }
    (total, by_name)
}

/// One measurement of one workload through one target.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    /// Requests by opcode.
    pub requests: BTreeMap<u32, u64>,
    /// Events the trace buffer lost (0 for a complete count).
    pub lost: u64,
    /// Server CPU over the timed command, ns (None: unknown server process).
    pub cpu_ns: Option<u64>,
    /// File and descriptor system calls of the workload, when counted (strace).
    pub syscalls: Option<(u64, BTreeMap<String, u64>)>,
    /// Wall time of the timed command, s.
    pub seconds: f64,
}

impl Sample {
    /// Requests in all.
    pub fn total(&self) -> u64 {
        self.requests.values().sum()
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// The summary of one (workload, target): medians over the repetitions.
pub(crate) struct Summary {
    /// Requests by opcode name (median).
    pub by_op: BTreeMap<String, f64>,
    /// Requests in all (median).
    pub total: f64,
    /// System calls (from the traced repetition).
    pub syscalls: Option<u64>,
    /// Server CPU per request, µs (median of the untraced repetitions, else all).
    pub cpu_us_per_req: Option<f64>,
    /// Wall time, s (median of the untraced repetitions, else all).
    pub seconds: Option<f64>,
    /// Some repetition lost trace events.
    pub lost: u64,
}

/// Summarises the samples of one (workload, target).
pub(crate) fn summarise(samples: &[Sample]) -> Summary {
    let mut ops: BTreeMap<u32, ()> = BTreeMap::new();
    for s in samples {
        for op in s.requests.keys() {
            ops.insert(*op, ());
        }
    }
    let by_op = ops
        .keys()
        .map(|op| {
            let v = samples.iter().map(|s| *s.requests.get(op).unwrap_or(&0) as f64).collect();
            (opcode_name(*op), median(v).unwrap_or(0.0))
        })
        .collect();
    let untraced: Vec<&Sample> = samples.iter().filter(|s| s.syscalls.is_none()).collect();
    let timed: Vec<&Sample> = if untraced.is_empty() { samples.iter().collect() } else { untraced };
    Summary {
        by_op,
        total: median(samples.iter().map(|s| s.total() as f64).collect()).unwrap_or(0.0),
        syscalls: samples.iter().find_map(|s| s.syscalls.as_ref().map(|(t, _)| *t)),
        cpu_us_per_req: median(
            timed
                .iter()
                .filter(|s| s.total() > 0)
                .filter_map(|s| s.cpu_ns.map(|c| c as f64 / 1000.0 / s.total() as f64))
                .collect(),
        ),
        seconds: median(timed.iter().map(|s| s.seconds).collect()),
        lost: samples.iter().map(|s| s.lost).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_trace_lines() {
        let l = b"  find-123 [001] ..... 10.5: fuse_request_send: connection 51 req 4 opcode 1 (FUSE_LOOKUP) len 45";
        assert_eq!(parse_opcode(l), Some(1));
        assert_eq!(parse_opcode(b"# tracer: nop"), None);
        assert_eq!(opcode_name(44), "READDIRPLUS");
        assert_eq!(opcode_name(99), "OP99");
    }

    #[test]
    fn parses_strace_summaries() {
        let text = "% time     seconds  usecs/call     calls    errors syscall\n\
                    ------ ----------- ----------- --------- --------- ----------------\n \
                    60.00    0.000600           6       100        10 newfstatat\n \
                    40.00    0.000400           4        50           getdents64\n\
                    ------ ----------- ----------- --------- --------- ----------------\n\
                    100.00    0.001000           6       150        10 total\n";
        let (total, by) = parse_strace_summary(text);
        assert_eq!(total, 150);
        assert_eq!(by["newfstatat"], 100);
        assert_eq!(by["getdents64"], 50);
    }

    #[test]
    fn summarises_medians() {
        let s = |n: u64, cpu: u64| Sample {
            requests: [(1, n)].into_iter().collect(),
            cpu_ns: Some(cpu),
            seconds: 1.0,
            ..Sample::default()
        };
        let sum = summarise(&[s(10, 10_000), s(30, 90_000), s(20, 40_000)]);
        assert_eq!(sum.total, 20.0);
        assert_eq!(sum.by_op["LOOKUP"], 20.0);
        assert_eq!(sum.cpu_us_per_req, Some(2.0));
    }
}
