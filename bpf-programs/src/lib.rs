//! eBPF offload accounting for one ringfs mount.
//!
//! Upstream FUSE has no eBPF hook inside its request path, so ringfs *observes*: C programs
//! (`src/bpf/ringfs.bpf.c`, built by `build.rs` with clang against the kernel's BTF) attach to
//! the FUSE tracepoints (requests that reached the server: fallbacks, with their kernel-side
//! round-trip time, charged to the [`Class`] of the call that caused them) and, optionally
//! ("demand tracing"), to the syscall, user page fault and io_uring completion tracepoints
//! (demand: calls that landed on the mount, by class, and their bytes). Everything is filtered in the kernel by the mount's device number, so
//! two mounts never mix. Counters are per-CPU; [`Accounting::snapshot`] sums them.
//!
//! Loading needs CAP_BPF/CAP_PERFMON (root), BTF and the tracepoints; any failure is a
//! [`BpfError`] that says why, and callers run without accounting.

use std::fmt;
use std::path::Path;

use aya::maps::PerCpuArray;
use aya::programs::BtfTracePoint;
use aya::{Btf, Ebpf, EbpfLoader, Pod};

/// Per-opcode slots in the fallback table.
pub const OPCODES: usize = 64;
/// Latency buckets: bucket `b` counts round trips under 2^b µs (the last: everything else).
pub const NBUCKETS: usize = 24;
/// Cause classes (`enum ringfs_class` in ringfs.h).
pub const NCLASSES: usize = 23;

/// Upper bounds of the latency buckets in seconds (the last bucket is +Inf).
pub fn latency_bounds_seconds() -> [f64; NBUCKETS - 1] {
    std::array::from_fn(|b| (1u64 << b) as f64 * 1e-6)
}

/// The cause a call or a request is charged to: the class of the system call (or page fault,
/// or io_uring operation) the task was executing on the mount. docs/observability.md lists the
/// system calls of each class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// No user call behind the request: kernel threads (readahead, writeback), requests the
    /// server's own answers flushed from the kernel's background queue, FORGET, RELEASE,
    /// INTERRUPT, INIT, DESTROY. Never has demand.
    Background,
    /// Demand tracing is off, so the calling task's call is unknown. Never has demand.
    Untraced,
    /// A user task sent it, but not inside a call classified on the mount (execve, a path
    /// that enters the mount through a symlink elsewhere, ...). Never has demand.
    Unclassified,
    /// stat, lstat, fstat, newfstatat, statx.
    Stat,
    /// open, openat, openat2 without O_CREAT/O_TMPFILE.
    Open,
    /// creat, open* with O_CREAT or O_TMPFILE, mknod, mknodat.
    Create,
    /// mkdir, mkdirat.
    Mkdir,
    /// unlink, unlinkat, rmdir.
    Unlink,
    /// rename, renameat, renameat2.
    Rename,
    /// link, linkat, symlink, symlinkat.
    Link,
    /// chmod, chown, truncate, utime(s), utimensat and their f/l/at variants.
    Setattr,
    /// read, pread64, readv, preadv, preadv2.
    Read,
    /// write, pwrite64, writev, pwritev, pwritev2.
    Write,
    /// getdents, getdents64.
    Readdir,
    /// readlink, readlinkat.
    Readlink,
    /// get/set/list/remove xattr (path, l, f and at variants).
    Xattr,
    /// access, faccessat, faccessat2.
    Access,
    /// fsync, fdatasync, sync_file_range.
    Fsync,
    /// close.
    Close,
    /// statfs, fstatfs, fallocate, lseek, flock, fcntl, ioctl, chdir, fchdir.
    Other,
    /// User page faults on mappings of the mount's files.
    Mmap,
    /// sendfile, splice, copy_file_range.
    Splice,
    /// io_uring reads and writes of the mount's files.
    IoUring,
}

impl Class {
    /// All classes, in table order.
    pub const ALL: [Class; NCLASSES] = [
        Class::Background,
        Class::Untraced,
        Class::Unclassified,
        Class::Stat,
        Class::Open,
        Class::Create,
        Class::Mkdir,
        Class::Unlink,
        Class::Rename,
        Class::Link,
        Class::Setattr,
        Class::Read,
        Class::Write,
        Class::Readdir,
        Class::Readlink,
        Class::Xattr,
        Class::Access,
        Class::Fsync,
        Class::Close,
        Class::Other,
        Class::Mmap,
        Class::Splice,
        Class::IoUring,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Background => "background",
            Class::Untraced => "untraced",
            Class::Unclassified => "unclassified",
            Class::Stat => "stat",
            Class::Open => "open",
            Class::Create => "create",
            Class::Mkdir => "mkdir",
            Class::Unlink => "unlink",
            Class::Rename => "rename",
            Class::Link => "link",
            Class::Setattr => "setattr",
            Class::Read => "read",
            Class::Write => "write",
            Class::Readdir => "readdir",
            Class::Readlink => "readlink",
            Class::Xattr => "xattr",
            Class::Access => "access",
            Class::Fsync => "fsync",
            Class::Close => "close",
            Class::Other => "other",
            Class::Mmap => "mmap",
            Class::Splice => "splice",
            Class::IoUring => "io_uring",
        }
    }

    /// Whether calls of this class are counted (demand); false for the classes that only
    /// collect requests without a known call.
    pub fn has_demand(self) -> bool {
        !matches!(self, Class::Background | Class::Untraced | Class::Unclassified)
    }

    fn index(self) -> usize {
        Class::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// Direction of data bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Read from a file on the mount.
    Read = 0,
    /// Written to a file on the mount.
    Write = 1,
}

/// Which way data bytes went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// Returned by the calls on the mount (all of it, however it was served).
    Mount = 0,
    /// Of `Mount`, on files the kernel passes through to their backing file.
    Passthrough = 1,
    /// Data of READ replies and WRITE requests the server handled (page cache fills and
    /// write-backs included, so it can exceed `Mount`).
    Server = 2,
}

impl Direction {
    /// Both, in table order.
    pub const ALL: [Direction; 2] = [Direction::Read, Direction::Write];
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
        }
    }
}

impl DataPath {
    /// All, in table order.
    pub const ALL: [DataPath; 3] = [DataPath::Mount, DataPath::Passthrough, DataPath::Server];
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Mount => "mount",
            DataPath::Passthrough => "passthrough",
            DataPath::Server => "server",
        }
    }
}

/// Mirror of `struct ringfs_op` (ringfs.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RawOp {
    count: u64,
    errors: u64,
    latency_sum_ns: u64,
    buckets: [u64; NBUCKETS],
}

// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl Pod for RawOp {}

/// Mirror of `struct ringfs_class_stats` (ringfs.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RawClass {
    calls: u64,
    calls_with_fallback: u64,
    bytes: [[u64; 3]; 2],
    requests: [u64; OPCODES],
}

// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl Pod for RawClass {}

/// Kernel-side counters of one opcode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// Requests the kernel sent to the server.
    pub count: u64,
    /// Of those, answered with an error.
    pub errors: u64,
    /// Sum of send→end times.
    pub latency_sum_ns: u64,
    /// Round-trip histogram (see [`latency_bounds_seconds`]).
    pub buckets: [u64; NBUCKETS],
}

/// Counters of one [`Class`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassCounts {
    /// Calls that reached the mount, failed or not (0 for classes without demand).
    pub calls: u64,
    /// Of those, calls that caused at least one request to the server.
    pub calls_with_fallback: u64,
    /// Requests charged to the class, by opcode (index = opcode).
    pub requests: Vec<u64>,
    /// Data bytes, `[Direction][DataPath]`.
    pub bytes: [[u64; 3]; 2],
}

impl Default for ClassCounts {
    fn default() -> Self {
        ClassCounts { calls: 0, calls_with_fallback: 0, requests: vec![0; OPCODES], bytes: [[0; 3]; 2] }
    }
}

impl ClassCounts {
    /// All requests charged to the class.
    pub fn fallbacks(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Bytes in `dir` along `path`.
    pub fn bytes(&self, dir: Direction, path: DataPath) -> u64 {
        self.bytes[dir as usize][path as usize]
    }
}

/// A summed reading of all counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Per FUSE opcode (index = opcode).
    pub fallbacks: Vec<OpCounts>,
    /// Per [`Class`] (same order as [`Class::ALL`]).
    pub classes: Vec<ClassCounts>,
    /// Whether demand tracing is attached.
    pub demand_tracing: bool,
}

impl Snapshot {
    /// Requests of opcode `op` that reached the server.
    pub fn fallback(&self, op: u32) -> u64 {
        self.fallbacks.get(op as usize).map_or(0, |c| c.count)
    }

    /// The counters of `class`.
    pub fn class(&self, class: Class) -> &ClassCounts {
        &self.classes[class.index()]
    }

    /// Bytes in `dir` along `path`, all classes.
    pub fn total_bytes(&self, dir: Direction, path: DataPath) -> u64 {
        self.classes.iter().map(|c| c.bytes(dir, path)).sum()
    }
}

/// Why accounting is unavailable.
#[derive(Debug)]
pub struct BpfError(String);

impl fmt::Display for BpfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BpfError {}

fn err(what: &str, e: impl fmt::Display) -> BpfError {
    let mut text = format!("{what}: {e}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        text.push_str(" (needs root: CAP_BPF and CAP_PERFMON)");
    }
    BpfError(text)
}

/// What to account for.
#[derive(Clone, Debug)]
pub struct AccountingOptions {
    /// The mount's `st_dev` as stat(2) reports it.
    pub dev: u64,
    /// The mount point (absolute), for path-based calls.
    pub mountpoint: std::path::PathBuf,
    /// Attach the syscall tracepoints (costs every process on the machine a little).
    pub demand_tracing: bool,
}

/// Loaded and attached programs; dropping it detaches them.
pub struct Accounting {
    ebpf: Ebpf,
    demand_tracing: bool,
}

const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ringfs.bpf.o"));
const UNAVAILABLE: &str = env!("RINGFS_BPF_UNAVAILABLE");

impl Accounting {
    /// Loads the programs for the mount described by `opts` and attaches them.
    pub fn load(opts: &AccountingOptions) -> Result<Accounting, BpfError> {
        if !UNAVAILABLE.is_empty() || OBJECT.is_empty() {
            return Err(BpfError(format!("ringfs was built without its eBPF programs: {UNAVAILABLE}")));
        }
        let major = libc::major(opts.dev);
        let minor = libc::minor(opts.dev);
        let kdev: u32 = (major << 20) | minor;
        let mut path = [0u8; 256];
        let mp = opts.mountpoint.as_os_str().as_encoded_bytes();
        if mp.len() >= path.len() {
            return Err(BpfError(format!("mount point path longer than {} bytes", path.len() - 1)));
        }
        path[..mp.len()].copy_from_slice(mp);
        let mp_len = mp.len() as u32;
        let tgid = std::process::id();
        let demand = opts.demand_tracing as u32;
        let mut ebpf = EbpfLoader::new()
            .override_global("target_kdev", &kdev, true)
            .override_global("server_tgid", &tgid, true)
            .override_global("demand_tracing", &demand, true)
            .override_global("mountpoint", &path, true)
            .override_global("mountpoint_len", &mp_len, true)
            // `calls` is task-local storage, which aya creates but has no typed wrapper for.
            .allow_unsupported_maps()
            .load(OBJECT)
            .map_err(|e| err("loading the eBPF object", e))?;
        let btf = Btf::from_sys_fs().map_err(|e| err("reading the kernel's BTF", e))?;
        let mut progs = vec![("fuse_send", "fuse_request_send"), ("fuse_end", "fuse_request_end")];
        if opts.demand_tracing {
            progs.extend([
                ("sys_enter", "sys_enter"),
                ("sys_exit", "sys_exit"),
                ("page_fault_user", "page_fault_user"),
                ("filemap_map_pages", "mm_filemap_map_pages"),
                ("filemap_fault", "mm_filemap_fault"),
                ("uring_submit", "io_uring_submit_req"),
                ("uring_complete", "io_uring_complete"),
            ]);
        }
        for (prog, event) in progs {
            let p: &mut BtfTracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| BpfError(format!("program {prog} missing from the object")))?
                .try_into()
                .map_err(|e| err(prog, e))?;
            p.load(event, &btf).map_err(|e| err(&format!("loading {prog}"), e))?;
            p.attach().map_err(|e| err(&format!("attaching to tp_btf/{event}"), e))?;
        }
        Ok(Accounting { ebpf, demand_tracing: opts.demand_tracing })
    }

    /// Sums every counter over all CPUs.
    pub fn snapshot(&self) -> Result<Snapshot, BpfError> {
        let map = self.ebpf.map("fallbacks").ok_or_else(|| BpfError("map fallbacks missing".into()))?;
        let ops: PerCpuArray<_, RawOp> = PerCpuArray::try_from(map).map_err(|e| err("map fallbacks", e))?;
        let mut fallbacks = vec![OpCounts::default(); OPCODES];
        for (i, slot) in fallbacks.iter_mut().enumerate() {
            let values = ops.get(&(i as u32), 0).map_err(|e| err("reading fallbacks", e))?;
            for v in values.iter() {
                slot.count += v.count;
                slot.errors += v.errors;
                slot.latency_sum_ns += v.latency_sum_ns;
                for (b, n) in slot.buckets.iter_mut().zip(v.buckets.iter()) {
                    *b += n;
                }
            }
        }
        let map = self.ebpf.map("classes").ok_or_else(|| BpfError("map classes missing".into()))?;
        let cls: PerCpuArray<_, RawClass> = PerCpuArray::try_from(map).map_err(|e| err("map classes", e))?;
        let mut classes = vec![ClassCounts::default(); NCLASSES];
        for (i, slot) in classes.iter_mut().enumerate() {
            for v in cls.get(&(i as u32), 0).map_err(|e| err("reading classes", e))?.iter() {
                slot.calls += v.calls;
                slot.calls_with_fallback += v.calls_with_fallback;
                for (d, row) in slot.bytes.iter_mut().zip(v.bytes.iter()) {
                    for (b, n) in d.iter_mut().zip(row.iter()) {
                        *b += n;
                    }
                }
                for (r, n) in slot.requests.iter_mut().zip(v.requests.iter()) {
                    *r += n;
                }
            }
        }
        Ok(Snapshot { fallbacks, classes, demand_tracing: self.demand_tracing })
    }
}

/// True when `path` exists (used by callers to explain a missing tracepoint).
pub fn tracepoint_present() -> bool {
    Path::new("/sys/kernel/tracing/events/fuse/fuse_request_send").exists()
        || Path::new("/sys/kernel/debug/tracing/events/fuse/fuse_request_send").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Class::ALL` follows `enum ringfs_class` of ringfs.h, value by value.
    #[test]
    fn classes_match_the_c_enum() {
        let header = include_str!("bpf/ringfs.h");
        let body = header.split("enum ringfs_class {").nth(1).and_then(|b| b.split("};").next()).expect("enum");
        let mut c_classes = Vec::new();
        for line in body.lines() {
            let line = line.trim();
            let Some((name, rest)) = line.strip_prefix("RINGFS_").and_then(|l| l.split_once('=')) else {
                continue;
            };
            let value: usize = rest.split(',').next().unwrap_or("").trim().parse().expect("enum value");
            c_classes.push((name.trim().to_ascii_lowercase(), value));
        }
        let (last, count) = c_classes.pop().expect("RINGFS_CLASSES");
        assert_eq!((last.as_str(), count), ("classes", NCLASSES));
        assert_eq!(c_classes.len(), NCLASSES);
        for (i, (class, (name, value))) in Class::ALL.iter().zip(&c_classes).enumerate() {
            assert_eq!(*value, i, "{name}");
            assert_eq!(class.as_str(), name.as_str(), "class {i}");
        }
    }

    #[test]
    fn only_caused_classes_have_demand() {
        let without: Vec<&str> = Class::ALL.iter().filter(|c| !c.has_demand()).map(|c| c.as_str()).collect();
        assert_eq!(without, ["background", "untraced", "unclassified"]);
    }

    #[test]
    fn raw_layouts_match_the_c_structs() {
        // struct ringfs_class_stats: calls, calls_with_fallback, bytes[2][3], requests[64].
        assert_eq!(size_of::<RawClass>(), 8 * (2 + 6 + OPCODES));
        assert_eq!(size_of::<RawOp>(), 8 * (3 + NBUCKETS));
    }
}
