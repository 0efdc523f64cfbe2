//! eBPF offload accounting for one ringfs mount.
//!
//! Upstream FUSE has no eBPF hook inside its request path, so ringfs *observes*: C programs
//! (`src/bpf/ringfs.bpf.c`, built by `build.rs` with clang, CO-RE against the checked-in type
//! header `src/bpf/ringfs_types.h`, and relocated here against the running kernel's BTF:
//! vmlinux plus the fuse module's split BTF when FUSE is a module) attach to
//! the FUSE tracepoints (requests that reached the server: fallbacks, with their kernel-side
//! round-trip time, charged to the [`Class`] of the call that caused them) and, optionally
//! ("demand tracing"), to the syscall, user page fault and io_uring completion tracepoints
//! (demand: calls that landed on the mount, by class, and their bytes). Everything is filtered in the kernel by the mount's device number, so
//! two mounts never mix. Counters are per-CPU; [`Accounting::snapshot`] sums them.
//!
//! Each program is loaded and attached on its own ([`PROGRAMS`]): a kernel without one of the
//! tracepoints (Debian's 6.1 has no fuse tracepoints) or whose types make one program fail
//! verification loses that piece only; [`Accounting::programs`] names every piece and why it is
//! missing. Loading needs CAP_BPF/CAP_PERFMON (root) and the kernel's BTF; when nothing can be
//! attached the result is a [`BpfError`] that says why, and callers run without accounting.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::fmt;
use std::path::Path;

use aya::maps::PerCpuArray;
use aya::programs::{BtfTracePoint, RawTracePoint};
use aya::{Btf, Ebpf, EbpfLoader, Endianness, Pod};
use aya_obj::btf::BtfKind;

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
    /// Whether requests to the server are seen (`fuse_send` attached): without it, fallback
    /// counters and `calls_with_fallback` stay 0 whatever happens.
    pub requests_traced: bool,
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

/// One program of the object: what it counts and where it attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    /// The program's name in the object (the `program` metric label).
    pub name: &'static str,
    /// The BTF tracepoint (`tp_btf/<tracepoint>`) it attaches to.
    pub tracepoint: &'static str,
    /// The same program as `raw_tp/<tracepoint>` (its name in the object), tried when the
    /// `tp_btf` form cannot attach (a tracepoint of the fuse module) or when
    /// [`AccountingOptions::attach`] asks for it.
    pub raw_tp: Option<&'static str>,
    /// Only with demand tracing.
    pub demand: bool,
    /// What is lost without it.
    pub counts: &'static str,
}

/// Every program, in attach order.
pub const PROGRAMS: [Program; 9] = [
    Program {
        name: "fuse_send",
        tracepoint: "fuse_request_send",
        raw_tp: Some("fuse_send_raw"),
        demand: false,
        counts: "requests that reached the server (fallbacks) and their causes",
    },
    Program {
        name: "fuse_end",
        tracepoint: "fuse_request_end",
        raw_tp: Some("fuse_end_raw"),
        demand: false,
        counts: "request round trips, errors and server read bytes",
    },
    Program {
        name: "sys_enter",
        tracepoint: "sys_enter",
        raw_tp: None,
        demand: true,
        counts: "system calls on the mount",
    },
    Program {
        name: "sys_exit",
        tracepoint: "sys_exit",
        raw_tp: None,
        demand: true,
        counts: "system calls on the mount",
    },
    Program {
        name: "page_fault_user",
        tracepoint: "page_fault_user",
        raw_tp: None,
        demand: true,
        counts: "page faults on passthrough mappings; new faults",
    },
    Program {
        name: "filemap_map_pages",
        tracepoint: "mm_filemap_map_pages",
        raw_tp: None,
        demand: true,
        counts: "page faults on mappings of the mount (fault-around)",
    },
    Program {
        name: "filemap_fault",
        tracepoint: "mm_filemap_fault",
        raw_tp: None,
        demand: true,
        counts: "page faults on mappings of the mount",
    },
    Program {
        name: "uring_submit",
        tracepoint: "io_uring_submit_req",
        raw_tp: None,
        demand: true,
        counts: "io_uring requests issued inline that fell back",
    },
    Program {
        name: "uring_complete",
        tracepoint: "io_uring_complete",
        raw_tp: None,
        demand: true,
        counts: "io_uring reads and writes of the mount",
    },
];

/// Whether one program is attached, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStatus {
    /// The program.
    pub program: Program,
    /// `None` when attached, else the reason it is not (one line; both forms' reasons when
    /// the program has a `raw_tp` form).
    pub missing: Option<String>,
    /// How it is attached: [`Attach::TpBtf`] or [`Attach::RawTp`] (`None` when missing).
    pub via: Option<Attach>,
    /// Attached as `raw_tp` because the `tp_btf` form could not be: why (one line).
    pub tp_btf_refused: Option<String>,
}

/// How a program is attached to its tracepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Attach {
    /// `tp_btf`: typed arguments, found in the kernel's BTF (the default).
    #[default]
    TpBtf,
    /// `raw_tp`: attached by tracepoint name, arguments read by probe reads (CO-RE offsets).
    /// Reaches tracepoints of modules, which this loader cannot attach `tp_btf` programs to.
    RawTp,
}

impl Attach {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Attach::TpBtf => "tp_btf",
            Attach::RawTp => "raw_tp",
        }
    }
}

/// A counter that depends on a kernel type rather than on a program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureStatus {
    /// Label value (`ringfs_ebpf_feature_available{feature="..."}`).
    pub feature: &'static str,
    /// `None` when available, else why not.
    pub missing: Option<String>,
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
    /// Tests only: attach program `.0` to tracepoint `.1` instead of its own (a name the
    /// kernel lacks simulates a kernel without that tracepoint). Empty in production.
    pub tracepoint_overrides: Vec<(String, String)>,
    /// How the programs that have a `raw_tp` form attach: [`Attach::TpBtf`] tries `tp_btf`
    /// first and falls back to `raw_tp`; [`Attach::RawTp`] uses `raw_tp` directly (tests of
    /// the fallback, kernels whose `tp_btf` misbehaves). The others are always `tp_btf`.
    pub attach: Attach,
}

/// Loaded and attached programs; dropping it detaches them.
pub struct Accounting {
    ebpf: Ebpf,
    demand_tracing: bool,
    programs: Vec<ProgramStatus>,
    features: Vec<FeatureStatus>,
}

/// The kernel's BTF for CO-RE relocation: vmlinux, with the fuse module's split BTF appended
/// when FUSE is a module (`/sys/kernel/btf/fuse`), so `struct fuse_file` and friends resolve.
/// Split BTF numbers its types after the base's and offsets its strings past the base's string
/// section, so the two concatenate into one valid BTF blob. Returns the BTF and, when the fuse
/// module's BTF could not be merged, why.
pub fn kernel_btf() -> Result<(Btf, Option<String>), BpfError> {
    let base = std::fs::read("/sys/kernel/btf/vmlinux").map_err(|e| err("reading /sys/kernel/btf/vmlinux", e))?;
    let module = "/sys/kernel/btf/fuse";
    let merged = match std::fs::read(module) {
        Ok(split) => merge_split_btf(&base, &split).map_err(|e| format!("{module}: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(String::new()),
        Err(e) => Err(format!("reading {module}: {e}")),
    };
    match merged {
        Ok(blob) => {
            let btf = Btf::parse(&blob, Endianness::default()).map_err(|e| err("parsing vmlinux + fuse BTF", e))?;
            Ok((btf, None))
        }
        Err(why) => {
            let btf = Btf::parse(&base, Endianness::default()).map_err(|e| err("parsing vmlinux BTF", e))?;
            Ok((btf, (!why.is_empty()).then_some(why)))
        }
    }
}

/// `struct btf_header` fields: (hdr_len, type_off, type_len, str_off, str_len).
fn btf_header(b: &[u8]) -> Result<(usize, usize, usize, usize, usize), String> {
    let u32_at = |o: usize| -> Result<usize, String> {
        b.get(o..o + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]) as usize).ok_or("truncated BTF".into())
    };
    if b.len() < 24 || u16::from_ne_bytes([b[0], b[1]]) != 0xeb9f {
        return Err("not BTF (bad magic)".into());
    }
    let (hdr, toff, tlen, soff, slen) = (u32_at(4)?, u32_at(8)?, u32_at(12)?, u32_at(16)?, u32_at(20)?);
    if hdr + toff + tlen > b.len() || hdr + soff + slen > b.len() {
        return Err("truncated BTF".into());
    }
    Ok((hdr, toff, tlen, soff, slen))
}

/// One BTF blob holding `base`'s types and strings followed by `split`'s.
fn merge_split_btf(base: &[u8], split: &[u8]) -> Result<Vec<u8>, String> {
    let (bh, bto, btl, bso, bsl) = btf_header(base)?;
    let (sh, sto, stl, sso, ssl) = btf_header(split)?;
    let types = [&base[bh + bto..bh + bto + btl], &split[sh + sto..sh + sto + stl]].concat();
    let strings = [&base[bh + bso..bh + bso + bsl], &split[sh + sso..sh + sso + ssl]].concat();
    let mut out = Vec::with_capacity(24 + types.len() + strings.len());
    out.extend_from_slice(&base[..4]); // magic, version, flags
    for v in [24, 0, types.len(), types.len(), strings.len()] {
        out.extend_from_slice(&(v as u32).to_ne_bytes());
    }
    out.extend_from_slice(&types);
    out.extend_from_slice(&strings);
    Ok(out)
}

/// A program's load or attach error in one line: the verifier's own verdict (its last line)
/// instead of its whole log.
fn one_line(e: &aya::programs::ProgramError) -> String {
    if let aya::programs::ProgramError::LoadError { io_error, verifier_log } = e {
        let log = verifier_log.to_string();
        // The verdict is the last line before the statistics the verifier appends.
        let stats = ["processed ", "verification time", "stack depth", "max_states_per_insn"];
        let last =
            log.lines().rev().find(|l| !l.trim().is_empty() && !stats.iter().any(|s| l.starts_with(s))).unwrap_or("");
        // The loader's poison for a relocation with no match in the kernel's BTF (0xbad2310).
        let hint = if last.contains("unknown#195896080") {
            " (a kernel type or member it reads has no match in this kernel's BTF)"
        } else {
            ""
        };
        return format!("rejected by the verifier ({io_error}): {}{hint}", last.trim());
    }
    e.to_string().replace('\n', " ")
}

const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ringfs.bpf.o"));
const UNAVAILABLE: &str = env!("RINGFS_BPF_UNAVAILABLE");

/// Loads and attaches one `raw_tp` program to `tracepoint` (by name: the kernel finds
/// tracepoints of modules too); the error is one line naming the cause.
fn attach_raw(ebpf: &mut Ebpf, name: &str, tracepoint: &str) -> Result<(), String> {
    let p: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or("missing from the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    p.load().map_err(|e| format!("loading for raw_tp/{tracepoint}: {}", one_line(&e)))?;
    p.attach(tracepoint).map_err(|e| match &e {
        aya::programs::ProgramError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
            format!("the kernel has no tracepoint {tracepoint} (raw_tp: {} found none)", s.call)
        }
        aya::programs::ProgramError::SyscallError(s) => {
            format!("attaching to raw_tp/{tracepoint}: {}: {}", s.call, s.io_error)
        }
        _ => format!("attaching to raw_tp/{tracepoint}: {}", one_line(&e)),
    })?;
    Ok(())
}

/// Attaches `program` (to `tracepoint`, normally its own): `tp_btf`, or its `raw_tp` form when
/// that cannot be or `how` says so. Returns how, and why `tp_btf` was not used; the error
/// names every form tried.
fn attach_program(
    ebpf: &mut Ebpf,
    program: &Program,
    tracepoint: &str,
    btf: &Btf,
    fuse_module: bool,
    how: Attach,
) -> Result<(Attach, Option<String>), String> {
    let tp_btf_refused = if how == Attach::TpBtf || program.raw_tp.is_none() {
        match attach(ebpf, program.name, tracepoint, btf, fuse_module) {
            Ok(()) => return Ok((Attach::TpBtf, None)),
            Err(why) => why,
        }
    } else {
        "raw_tp asked for (ebpf.fuse_attach)".to_string()
    };
    let Some(raw) = program.raw_tp else { return Err(tp_btf_refused) };
    match attach_raw(ebpf, raw, tracepoint) {
        Ok(()) => Ok((Attach::RawTp, Some(tp_btf_refused))),
        Err(raw_why) if raw_why.starts_with("the kernel has no tracepoint") => Err(raw_why),
        Err(raw_why) => Err(format!("tp_btf: {tp_btf_refused}; raw_tp: {raw_why}")),
    }
}

/// Loads and attaches one program; the error is one line naming the cause.
fn attach(ebpf: &mut Ebpf, name: &str, tracepoint: &str, btf: &Btf, fuse_module: bool) -> Result<(), String> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or("missing from the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    let typedef = format!("btf_trace_{tracepoint}");
    if btf.id_by_type_name_kind(&typedef, BtfKind::Typedef).is_err() {
        return Err(format!("the kernel has no tracepoint {tracepoint} (no {typedef} in its BTF)"));
    }
    if fuse_module && tracepoint.starts_with("fuse_") {
        // Its BTF id is the module's: a tp_btf program needs the module's BTF object as well,
        // which aya 0.14 cannot pass.
        return Err(format!(
            "{tracepoint} is a tracepoint of the fuse module, and ringfs's loader attaches to vmlinux tracepoints only"
        ));
    }
    p.load(tracepoint, btf).map_err(|e| format!("loading for tp_btf/{tracepoint}: {}", one_line(&e)))?;
    p.attach().map_err(|e| format!("attaching to tp_btf/{tracepoint}: {}", one_line(&e)))?;
    Ok(())
}

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
        let (btf, module_note) = kernel_btf()?;
        let fuse_module = Path::new("/sys/kernel/btf/fuse").exists();
        let mut features = Vec::new();
        let fuse_file = btf.id_by_type_name_kind("fuse_file", BtfKind::Struct).is_ok();
        let passthrough = btf.id_by_type_name_kind("fuse_backing", BtfKind::Struct).is_ok();
        features.push(FeatureStatus {
            feature: "passthrough_bytes",
            missing: match (fuse_file, passthrough, &module_note) {
                (true, true, _) => None,
                (_, _, Some(why)) => Some(format!("the fuse module's BTF could not be read: {why}")),
                (false, _, None) => Some("struct fuse_file is in no BTF this kernel exposes".into()),
                (true, false, None) => Some("this kernel has no FUSE passthrough (before 6.9)".into()),
            },
        });
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("target_kdev", &kdev, true)
            .override_global("server_tgid", &tgid, true)
            .override_global("demand_tracing", &demand, true)
            .override_global("mountpoint", &path, true)
            .override_global("mountpoint_len", &mp_len, true)
            // `calls` is task-local storage, which aya creates but has no typed wrapper for.
            .allow_unsupported_maps()
            .load(OBJECT)
            .map_err(|e| err("loading the eBPF object", e))?;
        let mut programs = Vec::new();
        for program in PROGRAMS.iter().filter(|p| opts.demand_tracing || !p.demand) {
            let tracepoint = opts
                .tracepoint_overrides
                .iter()
                .find(|(p, _)| p == program.name)
                .map_or(program.tracepoint, |(_, t)| t.as_str());
            let status = match attach_program(&mut ebpf, program, tracepoint, &btf, fuse_module, opts.attach) {
                Ok((via, tp_btf_refused)) => {
                    ProgramStatus { program: *program, missing: None, via: Some(via), tp_btf_refused }
                }
                Err(why) => ProgramStatus { program: *program, missing: Some(why), via: None, tp_btf_refused: None },
            };
            programs.push(status);
        }
        if programs.iter().all(|p| p.missing.is_some()) {
            let why: Vec<String> = programs
                .iter()
                .map(|p| format!("{}: {}", p.program.name, p.missing.as_deref().unwrap_or("")))
                .collect();
            return Err(BpfError(format!("no eBPF program could be attached ({})", why.join("; "))));
        }
        // Demand is counted only when both ends of a system call are seen.
        let attached = |name: &str| programs.iter().any(|p| p.program.name == name && p.missing.is_none());
        let demand_tracing = opts.demand_tracing && attached("sys_enter") && attached("sys_exit");
        Ok(Accounting { ebpf, demand_tracing, programs, features })
    }

    /// Every program this load tried, attached or with the reason it is not.
    pub fn programs(&self) -> &[ProgramStatus] {
        &self.programs
    }

    /// Counters that depend on kernel types, available or with the reason they are not.
    pub fn features(&self) -> &[FeatureStatus] {
        &self.features
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
        let requests_traced = self.programs.iter().any(|p| p.program.name == "fuse_send" && p.missing.is_none());
        Ok(Snapshot { fallbacks, classes, demand_tracing: self.demand_tracing, requests_traced })
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

    /// `(name, number)` of each `#define NR_<name> <number>` in the `arch` branch of
    /// ringfs_syscalls.h.
    fn table(arch: &str) -> Vec<(String, i64)> {
        let header = include_str!("bpf/ringfs_syscalls.h");
        let start = header.find(&format!("defined(__TARGET_ARCH_{arch})")).expect("arch branch");
        let body = &header[start..];
        let body = &body[..body[1..].find("#e").expect("branch end")];
        body.lines()
            .filter_map(|l| l.strip_prefix("#define NR_"))
            .map(|l| {
                let (name, rest) = l.split_once(' ').expect("value");
                let v = rest.split("/*").next().unwrap_or("").trim().trim_matches(|c| c == '(' || c == ')');
                (name.to_string(), v.parse().expect("number"))
            })
            .collect()
    }

    /// `__NR_*` (and `__NR3264_*`) numbers of a UAPI unistd header.
    fn uapi(path: &str) -> std::collections::HashMap<String, i64> {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e} (Debian's linux-libc-dev)"));
        let mut map = std::collections::HashMap::new();
        for l in text.lines() {
            let Some(rest) = l.strip_prefix("#define __NR") else { continue };
            let rest = rest.strip_prefix("3264").unwrap_or(rest);
            let Some((name, v)) = rest.strip_prefix('_').and_then(|r| r.split_once(char::is_whitespace)) else {
                continue;
            };
            if let Ok(n) = v.trim().parse() {
                let name = if name == "fstatat" { "newfstatat" } else { name };
                map.insert(name.to_string(), n);
            }
        }
        map
    }

    /// Both tables list the same calls, and their numbers are the kernel's (as far as the
    /// installed UAPI headers know them: calls newer than the headers are checked by hand).
    #[test]
    fn syscall_tables_match_the_uapi_headers() {
        let (x86, arm) = (table("x86"), table("arm64"));
        let names = |t: &[(String, i64)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&x86), names(&arm));
        assert!(x86.len() > 80, "{}", x86.len());
        let x86_uapi = uapi("/usr/include/x86_64-linux-gnu/asm/unistd_64.h");
        let generic = uapi("/usr/include/asm-generic/unistd.h");
        let mut checked = 0;
        for (name, nr) in &x86 {
            if let Some(k) = x86_uapi.get(name) {
                assert_eq!(nr, k, "x86_64 {name}");
                checked += 1;
            }
        }
        assert!(checked > 80, "{checked}");
        let mut absent: Vec<i64> = Vec::new();
        for (name, nr) in &arm {
            match generic.get(name) {
                Some(k) => assert_eq!(nr, k, "arm64 {name}"),
                None if *nr < 0 => absent.push(*nr),
                None => assert!(*nr >= 450, "arm64 {name} = {nr} is not in the generic table"),
            }
        }
        // The legacy path calls arm64 lacks: distinct numbers no system call has.
        let n = absent.len();
        absent.sort();
        absent.dedup();
        assert_eq!(absent.len(), n);
        assert_eq!(n, 20);
    }

    /// The programs also compile for arm64 (pt_regs and the generic syscall table): the same
    /// clang invocation as build.rs with `-D__TARGET_ARCH_arm64`. (Loading them needs an arm64
    /// kernel, which this test cannot have.)
    #[test]
    fn programs_compile_for_arm64() {
        if !UNAVAILABLE.is_empty() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "eBPF programs not built: {UNAVAILABLE}");
            eprintln!("skipped: {UNAVAILABLE}");
            return;
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bpf");
        let out = std::env::temp_dir().join(format!("ringfs-arm64-{}.bpf.o", std::process::id()));
        let mut cmd = std::process::Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang".into()));
        cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-Wno-unused-function", "-D__TARGET_ARCH_arm64"])
            .arg("-I")
            .arg(&dir);
        if let Some(asm) = std::fs::read_dir("/usr/include")
            .expect("/usr/include")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("asm/types.h").exists())
        {
            cmd.arg("-idirafter").arg(asm);
        }
        let status = cmd.arg("-c").arg(dir.join("ringfs.bpf.c")).arg("-o").arg(&out).status();
        let status = status.expect("clang (Debian's clang) must be installed to build ringfs's eBPF programs");
        let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_file(&out);
        assert!(status.success() && size > 0, "clang failed for arm64: {status}");
    }

    /// Root with BPF and BTF, or a printed reason to skip (a failure with CI=true).
    fn can_load() -> bool {
        // SAFETY: geteuid has no preconditions.
        let why = if unsafe { libc::geteuid() } != 0 {
            "not root"
        } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            "no /sys/kernel/btf/vmlinux"
        } else if !UNAVAILABLE.is_empty() {
            UNAVAILABLE
        } else {
            return true;
        };
        assert!(std::env::var("CI").as_deref() != Ok("true"), "eBPF test cannot run: {why}");
        eprintln!("skipped: {why}");
        false
    }

    /// On this kernel (which has every tracepoint) every program attaches, demand tracing on.
    #[test]
    fn every_program_attaches_on_this_kernel() {
        if !can_load() {
            return;
        }
        let opts = AccountingOptions {
            dev: libc::makedev(0, 9999),
            mountpoint: "/nonexistent".into(),
            demand_tracing: true,
            tracepoint_overrides: Vec::new(),
            attach: Attach::TpBtf,
        };
        let acc = Accounting::load(&opts).expect("load");
        let missing: Vec<String> = acc
            .programs()
            .iter()
            .filter_map(|p| Some(format!("{}: {}", p.program.name, p.missing.as_deref()?)))
            .collect();
        assert!(missing.is_empty(), "{missing:#?}");
        assert_eq!(acc.programs().len(), PROGRAMS.len());
        let snap = acc.snapshot().expect("snapshot");
        assert!(snap.demand_tracing && snap.requests_traced);
    }

    /// Asked for raw_tp, the fuse programs attach that way (the fallback a kernel with FUSE as
    /// a module gets) and say why not tp_btf; the rest stay tp_btf.
    #[test]
    fn fuse_programs_attach_as_raw_tp_when_asked() {
        if !can_load() {
            return;
        }
        let opts = AccountingOptions {
            dev: libc::makedev(0, 9999),
            mountpoint: "/nonexistent".into(),
            demand_tracing: true,
            tracepoint_overrides: Vec::new(),
            attach: Attach::RawTp,
        };
        let acc = Accounting::load(&opts).expect("load");
        for p in acc.programs() {
            assert_eq!(p.missing, None, "{}", p.program.name);
            let want = if p.program.raw_tp.is_some() { Attach::RawTp } else { Attach::TpBtf };
            assert_eq!(p.via, Some(want), "{}", p.program.name);
            assert_eq!(p.tp_btf_refused.is_some(), want == Attach::RawTp, "{}", p.program.name);
        }
        assert_eq!(acc.programs().iter().filter(|p| p.via == Some(Attach::RawTp)).count(), 2);
        assert!(acc.snapshot().expect("snapshot").requests_traced);
    }

    /// A program whose tracepoint the kernel lacks (simulated by a name no kernel has) is the
    /// only piece missing, the reason names the tracepoint, and demand tracing still counts:
    /// what a kernel without the fuse tracepoints (Debian's 6.1) gets.
    #[test]
    fn a_missing_tracepoint_disables_only_its_program() {
        if !can_load() {
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("ringfs-bpf-partial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("f");
        std::fs::write(&file, b"x").expect("file");
        let opts = AccountingOptions {
            dev: std::fs::metadata(&dir).expect("stat").dev(),
            mountpoint: dir.clone(),
            demand_tracing: true,
            tracepoint_overrides: vec![("fuse_send".into(), "ringfs_no_such_tracepoint".into())],
            attach: Attach::TpBtf,
        };
        let acc = Accounting::load(&opts).expect("load");
        let missing: Vec<(&str, &str)> =
            acc.programs().iter().filter_map(|p| Some((p.program.name, p.missing.as_deref()?))).collect();
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert_eq!(missing[0].0, "fuse_send");
        assert!(missing[0].1.contains("no tracepoint ringfs_no_such_tracepoint"), "reason: {}", missing[0].1);
        assert_eq!(acc.programs().len(), PROGRAMS.len());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            std::fs::metadata(&file).expect("stat");
            let snap = acc.snapshot().expect("snapshot");
            assert!(snap.demand_tracing);
            assert!(!snap.requests_traced);
            if snap.class(Class::Stat).calls > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no stat counted in 20 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(acc);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// With demand tracing, the calls a program makes on a directory are counted in their
    /// classes: the system call table and the pt_regs access of this architecture are right
    /// (scripts/arm64.sh runs this test on Debian's arm64 kernel under QEMU). Prints what
    /// attached.
    #[test]
    fn demand_tracing_counts_calls_by_class() {
        if !can_load() {
            return;
        }
        use std::io::{Read, Write};
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("ringfs-bpf-classes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("f");
        std::fs::write(&file, b"0123456789").expect("file");
        let opts = AccountingOptions {
            dev: std::fs::metadata(&dir).expect("stat").dev(),
            mountpoint: dir.clone(),
            demand_tracing: true,
            tracepoint_overrides: Vec::new(),
            attach: Attach::TpBtf,
        };
        let acc = Accounting::load(&opts).expect("load");
        for p in acc.programs() {
            eprintln!(
                "{} ({}): {}",
                p.program.name,
                p.program.tracepoint,
                p.missing.as_deref().unwrap_or(p.via.map_or("?", |v| v.as_str()))
            );
        }
        assert!(acc.snapshot().expect("snapshot").demand_tracing, "sys_enter/sys_exit not both attached");
        let n = 30u64;
        let want = [
            Class::Stat,
            Class::Open,
            Class::Create,
            Class::Read,
            Class::Write,
            Class::Mkdir,
            Class::Unlink,
            Class::Rename,
            Class::Close,
        ];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            for i in 0..n {
                std::fs::metadata(&file).expect("stat");
                let mut buf = Vec::new();
                std::fs::File::open(&file).expect("open").read_to_end(&mut buf).expect("read");
                let new = dir.join(format!("n{i}"));
                std::fs::File::create(&new).expect("create").write_all(b"x").expect("write");
                std::fs::rename(&new, dir.join("r")).expect("rename");
                std::fs::remove_file(dir.join("r")).expect("unlink");
                std::fs::create_dir(dir.join("d")).expect("mkdir");
                std::fs::remove_dir(dir.join("d")).expect("rmdir");
            }
            let snap = acc.snapshot().expect("snapshot");
            let short: Vec<String> = want
                .iter()
                .filter(|c| snap.class(**c).calls < n)
                .map(|c| format!("{}: {}", c.as_str(), snap.class(*c).calls))
                .collect();
            if short.is_empty() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "calls not counted in their class (of {n}): {short:?}");
        }
        drop(acc);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// The merged vmlinux + split BTF keeps the base's types and adds the module's, with the
    /// module's names (offsets past the base's strings) intact. The split BTF is made here (one
    /// empty struct), as the kernel lays a module's out, since this kernel may have no module
    /// with BTF.
    #[test]
    fn split_btf_merges_after_the_base() {
        let Ok(base) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "no /sys/kernel/btf/vmlinux");
            eprintln!("skipped: no /sys/kernel/btf/vmlinux");
            return;
        };
        let (_, _, _, _, base_strings) = btf_header(&base).expect("header");
        let strings = b"\0ringfs_module_only\0";
        let mut types = Vec::new();
        for v in [base_strings as u32 + 1, 4 << 24, 0] {
            // name_off (past the base's strings), info (BTF_KIND_STRUCT, no members), size
            types.extend_from_slice(&v.to_ne_bytes());
        }
        let mut split = base[..4].to_vec();
        for v in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            split.extend_from_slice(&v.to_ne_bytes());
        }
        split.extend_from_slice(&types);
        split.extend_from_slice(strings);
        let merged = merge_split_btf(&base, &split).expect("merge");
        let btf = Btf::parse(&merged, Endianness::default()).expect("parse merged");
        let task = btf.id_by_type_name_kind("task_struct", BtfKind::Struct).expect("base type");
        let base_btf = Btf::parse(&base, Endianness::default()).expect("parse base");
        assert_eq!(base_btf.id_by_type_name_kind("task_struct", BtfKind::Struct).expect("base"), task);
        let module = btf.id_by_type_name_kind("ringfs_module_only", BtfKind::Struct).expect("module type");
        assert!(module > task);
        assert!(base_btf.id_by_type_name_kind("ringfs_module_only", BtfKind::Struct).is_err());
    }

    #[test]
    fn raw_layouts_match_the_c_structs() {
        // struct ringfs_class_stats: calls, calls_with_fallback, bytes[2][3], requests[64].
        assert_eq!(size_of::<RawClass>(), 8 * (2 + 6 + OPCODES));
        assert_eq!(size_of::<RawOp>(), 8 * (3 + NBUCKETS));
    }
}
