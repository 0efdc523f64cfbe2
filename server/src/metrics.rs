//! The `/metrics` endpoint: Prometheus text exposition of the server's counters.
//!
//! **Architecture Invariant:** metrics only observe. Counters are relaxed atomics owned by the
//! parts that count (dispatcher, transport, file system); this module reads them at scrape time
//! and never takes a lock a request path holds.
//!
//! Histograms use fixed buckets kept as atomics by the dispatcher rather than an exporter that
//! stores every sample until the next scrape: recording stays O(1) in memory at any rate.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ringfs_protocol::abi::opcode;
use ringfs_protocol::stats::{DispatchStats, LATENCY_BOUNDS_NS};
use ringfs_transport::notify::NotifyStats;
use ringfs_transport::SessionStats;

use crate::fs::passthrough::{Fallback, PassthroughStats};
use crate::fs::PassthroughFs;

pub mod http;

/// Everything the endpoint reads.
pub struct Sources {
    /// Kernel-side accounting, when the eBPF programs are attached.
    pub ebpf: Option<std::sync::Mutex<ringfs_bpf::Accounting>>,
    /// Dispatcher counters.
    pub dispatch: Arc<DispatchStats>,
    /// Transport counters.
    pub session: Arc<SessionStats>,
    /// Kernel channel counters.
    pub notify: Arc<NotifyStats>,
    /// Passthrough decisions.
    pub passthrough: Arc<PassthroughStats>,
    /// Whether passthrough was negotiated.
    pub passthrough_enabled: bool,
    /// The file system (inode and handle counts).
    pub fs: Arc<PassthroughFs>,
    /// Mount point, for the info metric.
    pub mountpoint: String,
    /// Server start.
    pub started: Instant,
}

/// errno names for labels (a bounded set; anything else is `E<n>`).
fn errno_name(e: usize) -> String {
    let name = match e as i32 {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESTALE => "ESTALE",
        libc::EINTR => "EINTR",
        libc::ETXTBSY => "ETXTBSY",
        libc::EDQUOT => "EDQUOT",
        0 => "other",
        _ => return format!("E{e}"),
    };
    name.to_string()
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn process_stats(out: &mut String) {
    // /proc/self/stat: utime (14) and stime (15) in clock ticks, rss (24) in pages.
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let tick = rustix::param::clock_ticks_per_second().max(1) as f64;
            let page = rustix::param::page_size().max(1) as f64;
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            header(out, "process_cpu_seconds_total", "counter", "User and system CPU time of the server.");
            let _ = writeln!(out, "process_cpu_seconds_total {}", (num(11) + num(12)) / tick);
            header(out, "process_resident_memory_bytes", "gauge", "Resident memory of the server.");
            let _ = writeln!(out, "process_resident_memory_bytes {}", num(21) * page);
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        header(out, "process_open_fds", "gauge", "Open file descriptors of the server.");
        let _ = writeln!(out, "process_open_fds {}", dir.count());
    }
    // RLIM_INFINITY (None) as its raw value, as before.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    header(out, "process_max_fds", "gauge", "RLIMIT_NOFILE of the server.");
    let _ = writeln!(out, "process_max_fds {}", lim.current.unwrap_or(u64::MAX));
}

/// Renders all metrics in the Prometheus text format (version 0.0.4).
pub fn render(s: &Sources) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

    header(&mut out, "ringfs_build_info", "gauge", "Build information; always 1.");
    let _ = writeln!(
        out,
        "ringfs_build_info{{version=\"{}\",build=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        crate::BUILD_ID.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
    );
    header(&mut out, "ringfs_transport_info", "gauge", "The request transport in use; always 1.");
    let t = if s.session.uring { "io_uring" } else { "dev_fuse" };
    let _ = writeln!(out, "ringfs_transport_info{{transport=\"{t}\"}} 1");
    header(&mut out, "ringfs_passthrough_enabled", "gauge", "1 when FUSE passthrough was negotiated.");
    let _ = writeln!(out, "ringfs_passthrough_enabled {}", s.passthrough_enabled as u8);
    header(&mut out, "ringfs_uptime_seconds", "gauge", "Seconds since the server started.");
    let _ = writeln!(out, "ringfs_uptime_seconds {:.3}", s.started.elapsed().as_secs_f64());

    let ops: Vec<u32> = (0..opcode::COUNT as u32).filter(|&op| s.dispatch.requests(op) > 0).collect();
    header(&mut out, "ringfs_requests_total", "counter", "Requests served by the server, by operation.");
    for &op in &ops {
        let _ = writeln!(out, "ringfs_requests_total{{op=\"{}\"}} {}", opcode::name(op), s.dispatch.requests(op));
    }
    header(&mut out, "ringfs_request_errors_total", "counter", "Requests answered with an error, by operation.");
    for &op in &ops {
        let _ = writeln!(
            out,
            "ringfs_request_errors_total{{op=\"{}\"}} {}",
            opcode::name(op),
            ld(&s.dispatch.op(op).errors)
        );
    }
    header(&mut out, "ringfs_errors_total", "counter", "Error replies by errno.");
    for (e, v) in s.dispatch.errnos().into_iter().enumerate() {
        if v > 0 {
            let _ = writeln!(out, "ringfs_errors_total{{errno=\"{}\"}} {v}", errno_name(e));
        }
    }
    header(
        &mut out,
        "ringfs_request_duration_seconds",
        "histogram",
        "Time from request parsed to reply ready in the server, by operation.",
    );
    for &op in &ops {
        let c = s.dispatch.op(op);
        let name = opcode::name(op);
        let mut cum = 0u64;
        for (i, bound) in LATENCY_BOUNDS_NS.iter().enumerate() {
            cum += ld(&c.buckets[i]);
            let le = *bound as f64 / 1e9;
            let _ = writeln!(out, "ringfs_request_duration_seconds_bucket{{op=\"{name}\",le=\"{le}\"}} {cum}");
        }
        cum += ld(&c.buckets[LATENCY_BOUNDS_NS.len()]);
        let _ = writeln!(out, "ringfs_request_duration_seconds_bucket{{op=\"{name}\",le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            out,
            "ringfs_request_duration_seconds_sum{{op=\"{name}\"}} {}",
            ld(&c.latency_sum_ns) as f64 / 1e9
        );
        let _ = writeln!(out, "ringfs_request_duration_seconds_count{{op=\"{name}\"}} {cum}");
    }
    header(&mut out, "ringfs_requests_in_flight", "gauge", "Requests being served right now.");
    let _ = writeln!(out, "ringfs_requests_in_flight {}", s.dispatch.in_flight());
    header(
        &mut out,
        "ringfs_oldest_request_age_seconds",
        "gauge",
        "Age of the oldest request being served (0 when idle).",
    );
    let _ =
        writeln!(out, "ringfs_oldest_request_age_seconds {:.6}", s.dispatch.inflight_starts.oldest_age().as_secs_f64());
    header(&mut out, "ringfs_malformed_requests_total", "counter", "Requests that could not be parsed.");
    let _ = writeln!(out, "ringfs_malformed_requests_total {}", ld(&s.dispatch.malformed) + ld(&s.session.malformed));
    header(
        &mut out,
        "ringfs_faults_total",
        "counter",
        "File-system panics (answered EIO) and failed queues (each aborted the connection).",
    );
    let _ = writeln!(
        out,
        "ringfs_faults_total{{kind=\"fs_panic\"}} {}\nringfs_faults_total{{kind=\"queue_failure\"}} {}",
        ld(&s.session.panics),
        ld(&s.session.failed_queues)
    );
    header(
        &mut out,
        "ringfs_upgrades_total",
        "counter",
        "Live upgrades of this mount's server, by result (carried from server to server).",
    );
    {
        use crate::upgrade::{UPGRADES_FAILED, UPGRADES_OK, UPGRADES_REFUSED};
        let _ = writeln!(
            out,
            "ringfs_upgrades_total{{result=\"ok\"}} {}\nringfs_upgrades_total{{result=\"refused\"}} {}\nringfs_upgrades_total{{result=\"failed\"}} {}",
            ld(&UPGRADES_OK),
            ld(&UPGRADES_REFUSED),
            ld(&UPGRADES_FAILED)
        );
    }
    header(
        &mut out,
        "ringfs_upgrade_last_pause_seconds",
        "gauge",
        "Time from the start of the last upgrade's drain to the new server serving (0: none yet).",
    );
    let _ = writeln!(out, "ringfs_upgrade_last_pause_seconds {}", ld(&crate::upgrade::LAST_PAUSE_US) as f64 / 1e6);
    {
        use crate::failover::{FAILOVERS, LAST_PAUSE_US, LOST_HANDLES, MODE, RESENT_BEFORE};
        header(
            &mut out,
            "ringfs_failover_mode",
            "gauge",
            "Crash failover in effect (1 for the mode in effect: on, off, or unavailable when asked for).",
        );
        let mode = ld(&MODE);
        for (i, name) in ["off", "on", "unavailable"].iter().enumerate() {
            let _ = writeln!(out, "ringfs_failover_mode{{mode=\"{name}\"}} {}", u64::from(mode == i as u64));
        }
        header(
            &mut out,
            "ringfs_failovers_total",
            "counter",
            "Crash failovers of this mount: servers started by the watchdog after the previous one died.",
        );
        let _ = writeln!(out, "ringfs_failovers_total {}", ld(&FAILOVERS));
        header(
            &mut out,
            "ringfs_failover_resent_requests_total",
            "counter",
            "Requests the kernel resent after a failover (taken by a server that died before answering).",
        );
        let _ = writeln!(out, "ringfs_failover_resent_requests_total {}", ld(&RESENT_BEFORE) + ld(&s.dispatch.resent));
        header(
            &mut out,
            "ringfs_failover_resent_done_total",
            "counter",
            "Resent requests found already done by the dead server (a name created or removed): answered as done.",
        );
        let _ = writeln!(out, "ringfs_failover_resent_done_total {}", ld(&s.dispatch.resent_done));
        header(
            &mut out,
            "ringfs_failover_last_pause_seconds",
            "gauge",
            "Time from the watchdog finding the last server dead to its successor serving (0: no failover yet).",
        );
        let _ = writeln!(out, "ringfs_failover_last_pause_seconds {}", ld(&LAST_PAUSE_US) as f64 / 1e6);
        header(
            &mut out,
            "ringfs_failover_lost_handles_total",
            "counter",
            "Open handles a failover could not open again (their file was gone): each answers EIO until closed.",
        );
        let _ = writeln!(out, "ringfs_failover_lost_handles_total {}", ld(&LOST_HANDLES));
        header(&mut out, "ringfs_failover_journal_bytes", "gauge", "Size of the crash-failover journal (0: off).");
        let _ = writeln!(out, "ringfs_failover_journal_bytes {}", s.fs.journal_bytes());
    }
    header(&mut out, "ringfs_server_read_bytes_total", "counter", "Bytes read by the server for READ requests.");
    let _ = writeln!(out, "ringfs_server_read_bytes_total {}", ld(&s.dispatch.op(opcode::READ).bytes_out));
    header(&mut out, "ringfs_server_write_bytes_total", "counter", "Bytes written by the server for WRITE requests.");
    let _ = writeln!(out, "ringfs_server_write_bytes_total {}", ld(&s.dispatch.op(opcode::WRITE).bytes_in));

    header(
        &mut out,
        "ringfs_devfuse_requests_total",
        "counter",
        "Requests read from /dev/fuse (the classic channel), by operation.",
    );
    for op in 0..opcode::COUNT as u32 {
        let v = s.session.count(op);
        if v > 0 {
            let _ = writeln!(out, "ringfs_devfuse_requests_total{{op=\"{}\"}} {v}", opcode::name(op));
        }
    }
    if !s.session.queues.is_empty() {
        header(&mut out, "ringfs_queue_requests_total", "counter", "Requests served per io_uring queue.");
        for (i, q) in s.session.queues.iter().enumerate() {
            let _ = writeln!(out, "ringfs_queue_requests_total{{queue=\"{i}\"}} {}", ld(&q.requests));
        }
        header(&mut out, "ringfs_queue_submits_total", "counter", "io_uring_enter calls per io_uring queue.");
        for (i, q) in s.session.queues.iter().enumerate() {
            let _ = writeln!(out, "ringfs_queue_submits_total{{queue=\"{i}\"}} {}", ld(&q.submits));
        }
        header(
            &mut out,
            "ringfs_queue_busy_poll_hits_total",
            "counter",
            "Times an io_uring queue found its next request while busy-polling (transport.busy_poll_us), \
             i.e. without sleeping.",
        );
        for (i, q) in s.session.queues.iter().enumerate() {
            let _ = writeln!(out, "ringfs_queue_busy_poll_hits_total{{queue=\"{i}\"}} {}", ld(&q.polled));
        }
    }

    header(&mut out, "ringfs_inodes", "gauge", "Inodes the kernel holds references to.");
    let _ = writeln!(out, "ringfs_inodes {}", s.fs.inode_count());
    header(
        &mut out,
        "ringfs_inodes_retired",
        "gauge",
        "Inodes the kernel forgot, kept resolvable for file handles (at most fuse.export_handles).",
    );
    let _ = writeln!(out, "ringfs_inodes_retired {}", s.fs.retired_inode_count());
    header(&mut out, "ringfs_open_handles", "gauge", "Open files and directories.");
    let _ = writeln!(out, "ringfs_open_handles {}", s.fs.open_handle_count());
    header(&mut out, "ringfs_passthrough_opens_total", "counter", "Opens of regular files served by passthrough.");
    let _ = writeln!(out, "ringfs_passthrough_opens_total {}", ld(&s.passthrough.enabled));
    header(
        &mut out,
        "ringfs_passthrough_fallbacks_total",
        "counter",
        "Opens of regular files served by the server instead of passthrough, by reason.",
    );
    for (i, f) in Fallback::ALL.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringfs_passthrough_fallbacks_total{{reason=\"{}\"}} {}",
            f.as_str(),
            ld(&s.passthrough.fallback[i])
        );
    }
    header(&mut out, "ringfs_backing_files", "gauge", "Passthrough backing files registered with the kernel.");
    let _ = writeln!(out, "ringfs_backing_files {}", ld(&s.notify.backing_open));
    header(
        &mut out,
        "ringfs_invalidations_total",
        "counter",
        "Cache invalidations sent to the kernel (refused ones too).",
    );
    let _ = writeln!(out, "ringfs_invalidations_total {}", ld(&s.notify.sent));
    header(&mut out, "ringfs_invalidation_failures_total", "counter", "Cache invalidations the kernel refused.");
    let _ = writeln!(out, "ringfs_invalidation_failures_total {}", ld(&s.notify.failed));
    let (inline, slow) = ringfs_transport::io::inline_stats();
    header(
        &mut out,
        "ringfs_inline_metadata_calls_total",
        "counter",
        "Backing metadata calls (stat, open, unlink, rename) run inline on queue threads instead of io-wq.",
    );
    let _ = writeln!(out, "ringfs_inline_metadata_calls_total {inline}");
    header(
        &mut out,
        "ringfs_inline_metadata_slow_total",
        "counter",
        "Inline metadata calls slower than 2 ms; two within 64 calls (or one over 50 ms) send the queue to io-wq for 50 ms to 1 s.",
    );
    let _ = writeln!(out, "ringfs_inline_metadata_slow_total {slow}");
    kernel_stats(&mut out, s);
    process_stats(&mut out);
    out
}

/// The kernel-side families (eBPF): what reached the server versus what the kernel answered.
fn kernel_stats(out: &mut String, s: &Sources) {
    use ringfs_bpf::Class;
    let snap = s.ebpf.as_ref().and_then(|m| m.lock().ok().and_then(|a| a.snapshot().ok()));
    header(out, "ringfs_ebpf_enabled", "gauge", "1 when the eBPF accounting programs are attached.");
    let _ = writeln!(out, "ringfs_ebpf_enabled {}", snap.is_some() as u8);
    if let Some(a) = s.ebpf.as_ref().and_then(|m| m.lock().ok()) {
        header(
            out,
            "ringfs_ebpf_program_attached",
            "gauge",
            "1 when the eBPF program is attached, 0 when this kernel cannot take it (the log says why), by program, \
             tracepoint and how it is attached (via: tp_btf, raw_tp, or none).",
        );
        for p in a.programs() {
            let _ = writeln!(
                out,
                "ringfs_ebpf_program_attached{{program=\"{}\",tracepoint=\"{}\",via=\"{}\"}} {}",
                p.program.name,
                p.program.tracepoint,
                p.via.map_or("none", |v| v.as_str()),
                p.missing.is_none() as u8
            );
        }
        header(
            out,
            "ringfs_ebpf_feature_available",
            "gauge",
            "1 when a counter that needs a kernel type is available (passthrough_bytes: the passthrough share of \
             io bytes needs struct fuse_file with passthrough), 0 when not (the log says why).",
        );
        for f in a.features() {
            let _ = writeln!(
                out,
                "ringfs_ebpf_feature_available{{feature=\"{}\"}} {}",
                f.feature,
                f.missing.is_none() as u8
            );
        }
    }
    let Some(snap) = snap else { return };
    let ops: Vec<u32> = (0..opcode::COUNT as u32).filter(|&op| snap.fallback(op) > 0).collect();
    header(
        out,
        "ringfs_kernel_fallbacks_total",
        "counter",
        "Requests the kernel sent to the server (not answered from its caches or by passthrough), by operation.",
    );
    for &op in &ops {
        let _ = writeln!(out, "ringfs_kernel_fallbacks_total{{op=\"{}\"}} {}", opcode::name(op), snap.fallback(op));
    }
    header(
        out,
        "ringfs_kernel_fallback_errors_total",
        "counter",
        "Requests sent to the server that ended with an error, by operation.",
    );
    for &op in &ops {
        let _ = writeln!(
            out,
            "ringfs_kernel_fallback_errors_total{{op=\"{}\"}} {}",
            opcode::name(op),
            snap.fallbacks[op as usize].errors
        );
    }
    header(
        out,
        "ringfs_kernel_request_duration_seconds",
        "histogram",
        "Kernel-side round trip of requests sent to the server (send to end), by operation.",
    );
    let bounds = ringfs_bpf::latency_bounds_seconds();
    for &op in &ops {
        let c = &snap.fallbacks[op as usize];
        let name = opcode::name(op);
        let mut cum = 0u64;
        for (i, le) in bounds.iter().enumerate() {
            cum += c.buckets[i];
            let _ = writeln!(out, "ringfs_kernel_request_duration_seconds_bucket{{op=\"{name}\",le=\"{le}\"}} {cum}");
        }
        cum += c.buckets[bounds.len()];
        let _ = writeln!(out, "ringfs_kernel_request_duration_seconds_bucket{{op=\"{name}\",le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            out,
            "ringfs_kernel_request_duration_seconds_sum{{op=\"{name}\"}} {}",
            c.latency_sum_ns as f64 / 1e9
        );
        let _ = writeln!(out, "ringfs_kernel_request_duration_seconds_count{{op=\"{name}\"}} {cum}");
    }
    let (read, write) = (ringfs_bpf::Direction::Read, ringfs_bpf::Direction::Write);
    let (mount, pt) = (ringfs_bpf::DataPath::Mount, ringfs_bpf::DataPath::Passthrough);
    header(
        out,
        "ringfs_kernel_fallback_requests_total",
        "counter",
        "Requests the kernel sent to the server, by the class of the call that caused them and operation \
         (class background: no user call behind them).",
    );
    for c in Class::ALL {
        let counts = snap.class(c);
        for &op in &ops {
            let v = counts.requests[op as usize];
            if v > 0 {
                let _ = writeln!(
                    out,
                    "ringfs_kernel_fallback_requests_total{{class=\"{}\",op=\"{}\"}} {v}",
                    c.as_str(),
                    opcode::name(op)
                );
            }
        }
    }
    if !snap.demand_tracing {
        return;
    }
    let demand: Vec<Class> = Class::ALL.into_iter().filter(|c| c.has_demand()).collect();
    header(
        out,
        "ringfs_kernel_demand_calls_total",
        "counter",
        "Calls that reached the mount, failed or not, by class (system calls, user page faults, io_uring \
         reads/writes).",
    );
    for &c in &demand {
        let _ = writeln!(out, "ringfs_kernel_demand_calls_total{{class=\"{}\"}} {}", c.as_str(), snap.class(c).calls);
    }
    // Without the request tracepoints (kernels before the fuse tracepoints) no call is ever
    // seen to fall back: zeros would read as a 100 % hit rate, so the family is left out.
    if snap.requests_traced {
        header(
            out,
            "ringfs_kernel_calls_with_fallback_total",
            "counter",
            "Calls that caused at least one request to the server, by class. \
             Hit rate = 1 - rate(this) / rate(ringfs_kernel_demand_calls_total).",
        );
        for &c in &demand {
            let _ = writeln!(
                out,
                "ringfs_kernel_calls_with_fallback_total{{class=\"{}\"}} {}",
                c.as_str(),
                snap.class(c).calls_with_fallback
            );
        }
    }
    header(
        out,
        "ringfs_kernel_io_bytes_total",
        "counter",
        "Data bytes by class, direction and path: mount (returned by the calls), passthrough (of those, on \
         passthrough files), server (data of READ replies and WRITE requests the server handled).",
    );
    // Classes that move data always; the others only once they have some (server bytes of
    // background readahead or write-back, for instance).
    for c in Class::ALL {
        let counts = snap.class(c);
        let always = matches!(c, Class::Read | Class::Write | Class::Mmap | Class::Splice | Class::IoUring);
        for d in ringfs_bpf::Direction::ALL {
            for p in ringfs_bpf::DataPath::ALL {
                let v = counts.bytes(d, p);
                if v > 0 || always {
                    let _ = writeln!(
                        out,
                        "ringfs_kernel_io_bytes_total{{class=\"{}\",direction=\"{}\",path=\"{}\"}} {v}",
                        c.as_str(),
                        d.as_str(),
                        p.as_str()
                    );
                }
            }
        }
    }
    header(
        out,
        "ringfs_kernel_read_bytes_total",
        "counter",
        "Bytes read from the mount's files, all classes (sum of ringfs_kernel_io_bytes_total{direction=\"read\",path=\"mount\"}).",
    );
    let _ = writeln!(out, "ringfs_kernel_read_bytes_total {}", snap.total_bytes(read, mount));
    header(
        out,
        "ringfs_kernel_write_bytes_total",
        "counter",
        "Bytes written to the mount's files, all classes (sum of ringfs_kernel_io_bytes_total{direction=\"write\",path=\"mount\"}).",
    );
    let _ = writeln!(out, "ringfs_kernel_write_bytes_total {}", snap.total_bytes(write, mount));
    header(
        out,
        "ringfs_passthrough_read_bytes_total",
        "counter",
        "Bytes read from files the kernel passes through to their backing file, all classes.",
    );
    let _ = writeln!(out, "ringfs_passthrough_read_bytes_total {}", snap.total_bytes(read, pt));
    header(
        out,
        "ringfs_passthrough_write_bytes_total",
        "counter",
        "Bytes written to files the kernel passes through to their backing file, all classes.",
    );
    let _ = writeln!(out, "ringfs_passthrough_write_bytes_total {}", snap.total_bytes(write, pt));
}

/// Binds the endpoint and serves it from a thread (see [`http`]). A failed bind is logged, not
/// fatal: the mount matters more than its metrics.
pub fn start(addr: SocketAddr, sources: Sources) -> Option<SocketAddr> {
    http::start(addr, sources, None)
}

/// Like [`start`], on the listener a previous server of this mount handed over (live upgrade).
pub fn start_on(addr: SocketAddr, sources: Sources, listener: std::os::fd::OwnedFd) -> Option<SocketAddr> {
    http::start(addr, sources, Some(std::net::TcpListener::from(listener)))
}

/// A duplicate of the metrics listener, to hand to the next server (live upgrade).
pub fn listener_fd() -> Option<std::os::fd::OwnedFd> {
    http::LISTENER.get().and_then(|l| l.try_clone().ok())
}
