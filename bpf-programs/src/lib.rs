//! eBPF offload accounting for one ringfs mount.
//!
//! Upstream FUSE has no eBPF hook inside its request path, so ringfs *observes*: C programs
//! (`src/bpf/ringfs.bpf.c`, built by `build.rs` with clang against the kernel's BTF) attach to
//! the FUSE tracepoints (requests that reached the server: fallbacks, with their kernel-side
//! round-trip time) and, optionally, to the syscall tracepoints (demand: system calls that
//! landed on the mount). Everything is filtered in the kernel by the mount's device number, so
//! two mounts never mix. Counters are per-CPU; [`Accounting::snapshot`] sums them.
//!
//! Loading needs CAP_BPF/CAP_PERFMON (root), BTF and the tracepoints; any failure is a
//! [`BpfError`] that says why, and callers run without accounting.

use std::fmt;
use std::path::Path;

use aya::maps::PerCpuArray;
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader, Pod};

/// Per-opcode slots in the fallback table.
pub const OPCODES: usize = 64;
/// Latency buckets: bucket `b` counts round trips under 2^b µs (the last: everything else).
pub const NBUCKETS: usize = 24;
/// Demand classes.
pub const NCLASSES: usize = 9;

/// Upper bounds of the latency buckets in seconds (the last bucket is +Inf).
pub fn latency_bounds_seconds() -> [f64; NBUCKETS - 1] {
    std::array::from_fn(|b| (1u64 << b) as f64 * 1e-6)
}

/// What the kernel could answer by itself, by class of system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemandClass {
    /// Name resolution of a path-based call.
    Lookup,
    /// stat/fstat/statx.
    Getattr,
    /// open/openat/openat2/creat.
    Open,
    /// read family.
    Read,
    /// write family.
    Write,
    /// getdents64.
    Readdir,
    /// readlink/readlinkat.
    Readlink,
    /// getxattr/lgetxattr/fgetxattr.
    Getxattr,
    /// access/faccessat/faccessat2.
    Access,
}

impl DemandClass {
    /// All classes, in table order.
    pub const ALL: [DemandClass; NCLASSES] = [
        DemandClass::Lookup,
        DemandClass::Getattr,
        DemandClass::Open,
        DemandClass::Read,
        DemandClass::Write,
        DemandClass::Readdir,
        DemandClass::Readlink,
        DemandClass::Getxattr,
        DemandClass::Access,
    ];

    /// Label value (the FUSE operation the kernel would otherwise send).
    pub fn as_str(self) -> &'static str {
        match self {
            DemandClass::Lookup => "lookup",
            DemandClass::Getattr => "getattr",
            DemandClass::Open => "open",
            DemandClass::Read => "read",
            DemandClass::Write => "write",
            DemandClass::Readdir => "readdir",
            DemandClass::Readlink => "readlink",
            DemandClass::Getxattr => "getxattr",
            DemandClass::Access => "access",
        }
    }

    /// The FUSE opcodes whose requests are this class's fallbacks.
    pub fn opcodes(self) -> &'static [u32] {
        match self {
            DemandClass::Lookup => &[1],
            DemandClass::Getattr => &[3, 52],
            DemandClass::Open => &[14, 35],
            DemandClass::Read => &[15],
            DemandClass::Write => &[16],
            DemandClass::Readdir => &[28, 44],
            DemandClass::Readlink => &[5],
            DemandClass::Getxattr => &[22],
            DemandClass::Access => &[34],
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

/// Mirror of `struct ringfs_demand` (ringfs.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RawDemand {
    calls: [u64; NCLASSES],
    read_bytes: u64,
    write_bytes: u64,
    passthrough_read_bytes: u64,
    passthrough_write_bytes: u64,
}

// SAFETY: plain integers, no padding; any bit pattern is valid.
unsafe impl Pod for RawDemand {}

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

/// A summed reading of all counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Per FUSE opcode (index = opcode).
    pub fallbacks: Vec<OpCounts>,
    /// System calls on the mount, per [`DemandClass`] (same order as [`DemandClass::ALL`]).
    pub demand: [u64; NCLASSES],
    /// Bytes returned by read-family calls on the mount.
    pub read_bytes: u64,
    /// Bytes returned by write-family calls on the mount.
    pub write_bytes: u64,
    /// Of `read_bytes`, on files the kernel passes through to their backing file.
    pub passthrough_read_bytes: u64,
    /// Of `write_bytes`, on passthrough files.
    pub passthrough_write_bytes: u64,
    /// Whether demand tracing is attached.
    pub demand_tracing: bool,
}

impl Snapshot {
    /// Requests of opcode `op` that reached the server.
    pub fn fallback(&self, op: u32) -> u64 {
        self.fallbacks.get(op as usize).map_or(0, |c| c.count)
    }

    /// Requests that reached the server for `class`.
    pub fn class_fallbacks(&self, class: DemandClass) -> u64 {
        class.opcodes().iter().map(|&op| self.fallback(op)).sum()
    }

    /// System calls of `class` on the mount.
    pub fn class_demand(&self, class: DemandClass) -> u64 {
        self.demand[DemandClass::ALL.iter().position(|c| *c == class).unwrap_or(0)]
    }

    /// 1 − fallbacks / demand for `class` (None without demand).
    pub fn hit_ratio(&self, class: DemandClass) -> Option<f64> {
        let d = self.class_demand(class);
        if d == 0 {
            return None;
        }
        Some((1.0 - self.class_fallbacks(class) as f64 / d as f64).clamp(0.0, 1.0))
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
        let mut ebpf = EbpfLoader::new()
            .override_global("target_kdev", &kdev, true)
            .override_global("target_udev", &opts.dev, true)
            .override_global("target_major", &major, true)
            .override_global("target_minor", &minor, true)
            .override_global("mountpoint", &path, true)
            .override_global("mountpoint_len", &mp_len, true)
            // `calls` is task-local storage, which aya creates but has no typed wrapper for.
            .allow_unsupported_maps()
            .load(OBJECT)
            .map_err(|e| err("loading the eBPF object", e))?;
        for (prog, event) in [("fuse_send", "fuse_request_send"), ("fuse_end", "fuse_request_end")] {
            let p: &mut TracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| BpfError(format!("program {prog} missing from the object")))?
                .try_into()
                .map_err(|e| err(prog, e))?;
            p.load().map_err(|e| err(&format!("loading {prog}"), e))?;
            p.attach("fuse", event).map_err(|e| err(&format!("attaching to fuse:{event}"), e))?;
        }
        if opts.demand_tracing {
            let btf = Btf::from_sys_fs().map_err(|e| err("reading the kernel's BTF", e))?;
            for prog in ["sys_enter", "sys_exit"] {
                let p: &mut BtfTracePoint = ebpf
                    .program_mut(prog)
                    .ok_or_else(|| BpfError(format!("program {prog} missing from the object")))?
                    .try_into()
                    .map_err(|e| err(prog, e))?;
                p.load(prog, &btf).map_err(|e| err(&format!("loading {prog}"), e))?;
                p.attach().map_err(|e| err(&format!("attaching to tp_btf/{prog}"), e))?;
            }
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
        let map = self.ebpf.map("demand").ok_or_else(|| BpfError("map demand missing".into()))?;
        let dem: PerCpuArray<_, RawDemand> = PerCpuArray::try_from(map).map_err(|e| err("map demand", e))?;
        let mut snap = Snapshot { fallbacks, demand_tracing: self.demand_tracing, ..Snapshot::default() };
        for v in dem.get(&0, 0).map_err(|e| err("reading demand", e))?.iter() {
            for (d, n) in snap.demand.iter_mut().zip(v.calls.iter()) {
                *d += n;
            }
            snap.read_bytes += v.read_bytes;
            snap.write_bytes += v.write_bytes;
            snap.passthrough_read_bytes += v.passthrough_read_bytes;
            snap.passthrough_write_bytes += v.passthrough_write_bytes;
        }
        Ok(snap)
    }
}

/// True when `path` exists (used by callers to explain a missing tracepoint).
pub fn tracepoint_present() -> bool {
    Path::new("/sys/kernel/tracing/events/fuse/fuse_request_send").exists()
        || Path::new("/sys/kernel/debug/tracing/events/fuse/fuse_request_send").exists()
}
