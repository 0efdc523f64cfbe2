//! The life of one mount: checks, watchdog, mount, INIT, serving, signals, unmount.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfs_config::Config;
use ringfs_protocol::init::InitParams;
use ringfs_transport::mount::{self, MountOptions};
use ringfs_transport::watchdog::Watchdog;
use ringfs_transport::{Session, SessionConfig, TransportMode};

use crate::fs::{FsConfig, PassthroughFs};

/// How long a SIGTERM/SIGINT shutdown waits for a lazily detached mount's last users before
/// aborting the connection.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A start-up or serving failure, as one line for the user.
pub type RunError = String;

fn canonical_dir(what: &str, p: &Path) -> Result<PathBuf, RunError> {
    let c = std::fs::canonicalize(p).map_err(|e| format!("{what} {}: {e}", p.display()))?;
    let meta = std::fs::metadata(&c).map_err(|e| format!("{what} {}: {e}", p.display()))?;
    if !meta.is_dir() {
        return Err(format!("{what} {}: not a directory", p.display()));
    }
    Ok(c)
}

/// The canonical path of a mount point whose FUSE mount nobody serves (a failover): its
/// parent canonicalized, its own name kept (the first server checked it).
fn mount_point_unserved(p: &Path) -> Result<PathBuf, RunError> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| format!("current directory: {e}"))?.join(p)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(canonical_dir("mount point's directory", parent)?.join(name)),
        _ => Ok(abs),
    }
}

/// Number of worker threads for `configured` (0 = one per online CPU).
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Blocks the shutdown signals in the calling thread (and so in every thread it starts later),
/// so that only the signal thread receives them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Forks into the background: the parent waits until the child reports the mount ready (or
/// failed) and exits with that status. Returns the pipe on which the child reports.
fn daemonize() -> Result<std::fs::File, RunError> {
    let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {}", std::io::Error::from(e)))?;
    // SAFETY: single-threaded at this point.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        drop(wr);
        let mut status = [0u8; 1];
        let ok = matches!(std::fs::File::from(rd).read(&mut status), Ok(1) if status[0] == b'O');
        std::process::exit(if ok { 0 } else { 1 });
    }
    drop(rd);
    // Detaching from the controlling terminal in the child (cannot fail: a fresh child is no
    // process group leader).
    let _ = rustix::process::setsid();
    Ok(std::fs::File::from(wr))
}

/// The open-file limit the server asks for: every open directory or file of every client, plus
/// the cached inode descriptors, is a descriptor here (virtiofsd asks for the same million).
const WANTED_FILES: u64 = 1 << 20;

/// Raises RLIMIT_NOFILE as far as the kernel allows (`fs.nr_open`, at most [`WANTED_FILES`]).
///
/// The inherited soft limit is often 1024: clients that hold a few thousand files or
/// directories open (each one a descriptor here) would see EMFILE from mkdir or open, although
/// the same workload succeeds on the backing file system.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    // RLIM_INFINITY (None) as its raw value, u64::MAX, as before.
    let lim = getrlimit(Resource::Nofile);
    let (cur, max) = (lim.current.unwrap_or(u64::MAX), lim.maximum.unwrap_or(u64::MAX));
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(WANTED_FILES);
    let want = WANTED_FILES.min(nr_open).max(cur);
    if want <= cur {
        return;
    }
    let before = cur;
    // Raising the hard limit needs CAP_SYS_RESOURCE, else fall back to the hard limit we
    // already have.
    if setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: Some(want.max(max)) }).is_ok() {
        log::debug!("open-file limit raised from {before} to {want}");
        return;
    }
    if max > before && setrlimit(Resource::Nofile, Rlimit { current: Some(max), maximum: Some(max) }).is_ok() {
        log::debug!("open-file limit raised from {before} to the hard limit {max}");
    } else {
        // Cached descriptors make room for open handles (the inode table's budget), so this
        // only limits how many files clients can hold open at once.
        log::info!("open-file limit stays at {before} (no CAP_SYS_RESOURCE to raise it)");
    }
}

/// Refuses a mount whose backing directory and mount point overlap (both canonical paths). A
/// mount point inside the backing directory would make the server serve its own mount: any
/// request that reaches that name would have the server wait on itself, an unkillable hang.
/// A backing directory inside the mount point would be hidden by the mount it backs.
fn check_not_nested(source: &Path, mountpoint: &Path) -> Result<(), RunError> {
    if source == mountpoint {
        return Err(format!("backing directory and mount point are the same directory: {}", source.display()));
    }
    if mountpoint.starts_with(source) {
        return Err(format!(
            "mount point {} is inside the backing directory {}: the server would serve its own mount \
             and hang waiting on itself; choose a mount point outside the backing directory",
            mountpoint.display(),
            source.display()
        ));
    }
    if source.starts_with(mountpoint) {
        return Err(format!(
            "backing directory {} is inside the mount point {}: the mount would hide it; \
             choose a mount point that does not contain the backing directory",
            source.display(),
            mountpoint.display()
        ));
    }
    Ok(())
}

/// Mounts `cfg` and serves it until unmounted or signalled.
pub fn run_mount(cfg: Config, background: bool) -> Result<(), RunError> {
    let source = canonical_dir("backing directory", &cfg.source)?;
    let mountpoint = if std::env::var_os(ringfs_transport::watchdog::FAILOVER_ENV).is_some() {
        // A failover: the mount is there and nobody serves it yet. Looking at the mount point
        // itself would wait for an answer only this process can give.
        mount_point_unserved(&cfg.mountpoint)?
    } else {
        canonical_dir("mount point", &cfg.mountpoint)?
    };
    check_not_nested(&source, &mountpoint)?;
    // Without CAP_SYS_ADMIN (not root): mount through fusermount3, and switch off what needs
    // privilege (named in one log line once the file system is open).
    let privileged = mount::can_mount();
    if !privileged {
        user_atime_check(&cfg, &source)?;
    }
    let mut cfg = cfg;
    if !privileged {
        cfg.offload.passthrough = false;
        cfg.ebpf.enable = false;
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing: load the fuse module (modprobe fuse)".into());
    }
    raise_fd_limit();
    // Started by the running server of this mount for a live upgrade: take its connection over
    // instead of mounting (in the foreground: the old server's caller is long gone).
    let takeover = crate::upgrade::Takeover::from_env();
    let hello = match &takeover {
        Some(t) => Some(t.hello()?),
        None => None,
    };
    // Started by the watchdog after the previous server died (crash failover): take the
    // connection over from the descriptors it held.
    let mut handover = crate::failover::Handover::from_env().transpose()?;
    let background = background && takeover.is_none() && handover.is_none();
    let mut ready_pipe = if background { Some(daemonize()?) } else { None };
    let mut watchdog = match handover.as_mut().and_then(|h| h.watchdog.take()) {
        Some(w) => w,
        None => Watchdog::spawn(&mountpoint, background).map_err(|e| format!("starting the watchdog: {e}"))?,
    };
    let sigset = block_signals();

    let mut cache = cfg.cache.clone();
    let watch = if cache.coherence != ringfs_config::CoherenceMode::Ttl {
        let fan = if cache.coherence == ringfs_config::CoherenceMode::Watch && !privileged {
            Err(io::Error::other("FAN_MARK_FILESYSTEM needs CAP_SYS_ADMIN"))
        } else if cache.coherence == ringfs_config::CoherenceMode::Watch {
            crate::fs::watch::Watch::new(&source)
        } else {
            Err(io::Error::other("cache.coherence = \"inotify\""))
        };
        let w = fan.or_else(|fan_err| {
            crate::fs::watch::Watch::inotify(&source).inspect(|_| {
                if cache.coherence == ringfs_config::CoherenceMode::Watch && privileged {
                    log::info!("fanotify unavailable ({fan_err}); watching the backing directories with inotify");
                }
            })
        });
        match w {
            Ok(w) => Some(w),
            Err(e) => {
                // Without invalidations, long timeouts would show stale names: shorten them.
                let short = Duration::from_secs(1);
                cache.entry_timeout = cache.entry_timeout.min(short);
                cache.attr_timeout = cache.attr_timeout.min(short);
                cache.negative_timeout = cache.negative_timeout.min(short);
                log::warn!("cache.coherence = \"watch\" unavailable ({e}); using timeouts of at most 1 s");
                None
            }
        }
    } else {
        None
    };

    let fs = PassthroughFs::new(FsConfig {
        source: source.clone(),
        entry_timeout: cache.entry_timeout,
        attr_timeout: cache.attr_timeout,
        negative_timeout: cache.negative_timeout,
        default_permissions: cfg.default_permissions,
        lsm_labels: cfg.lsm_labels,
        passthrough: cfg.offload.passthrough,
        passthrough_exclude: cfg.offload.exclude_patterns(),
        // With the watch, external changes invalidate the page cache explicitly, and
        // auto_inval_data catches size/mtime changes: cached data may outlive an open.
        keep_cache: watch.is_some(),
        // The kernel keeps listings of directories opened without OPENDIR: only with the watch.
        zero_message_opendir: !cfg.cache.opendir_requests && watch.is_some(),
        noatime: cfg.mount_flags.noatime,
        strictatime: cfg.mount_flags.strictatime,
        nodiratime: cfg.mount_flags.nodiratime,
        export_handles: cfg.fuse.export_handles as usize,
        handle_state: (!cfg.fuse.export_state_dir.is_empty())
            .then(|| crate::fs::handle_state::path_for(Path::new(&cfg.fuse.export_state_dir), &source, &mountpoint)),
        private_mounts: privileged,
        ..FsConfig::default()
    })
    .map_err(|e| format!("backing directory {}: {e}", source.display()))?;
    if !privileged {
        log::info!("{}", unprivileged_note(fs.reopens_by_handle(), watch.is_some()));
    }
    let fs = Arc::new(fs);
    let started = Instant::now();
    if cfg.transport.inline_metadata {
        match inline_metadata_safe(&source) {
            Ok(()) => ringfs_transport::io::set_inline_metadata(true),
            Err(why) => log::info!("metadata calls go through io_uring worker threads: {why}"),
        }
    }

    let mut init = InitParams::default();
    init.max_write = cfg.fuse.max_write;
    init.max_readahead = cfg.fuse.max_readahead;
    init.max_background = cfg.fuse.max_background;
    init.congestion_threshold = cfg.fuse.effective_congestion_threshold();
    init.writeback_cache = cfg.fuse.writeback_cache;
    init.passthrough = cfg.offload.passthrough && !cfg.fuse.writeback_cache;
    init.over_io_uring = false;
    init.default_permissions = cfg.default_permissions;
    init.readdirplus_auto = cfg.cache.readdirplus == ringfs_config::ReaddirplusMode::Auto;
    let mut session_cfg = SessionConfig::default();
    session_cfg.workers = worker_count(cfg.transport.workers);
    session_cfg.init = init;
    session_cfg.transport = match cfg.transport.mode {
        // Crash failover needs requests the kernel can resend to the next server: only the
        // classic channel's are (FUSE_NOTIFY_RESEND walks no ring). Asked for, it picks the
        // channel when the configuration leaves the choice to ringfs.
        ringfs_config::TransportMode::Auto if cfg.failover => {
            log::info!(
                "transport: the classic /dev/fuse channel, for crash failover (failover = on; the kernel cannot \
                 resend FUSE over io_uring requests)"
            );
            TransportMode::DevFuse
        }
        ringfs_config::TransportMode::Auto => TransportMode::Auto,
        ringfs_config::TransportMode::Uring => TransportMode::Uring,
        ringfs_config::TransportMode::DevFuse => TransportMode::DevFuse,
    };
    session_cfg.queue_depth = cfg.transport.queue_depth as usize;
    session_cfg.busy_poll = std::time::Duration::from_micros(cfg.transport.busy_poll_us);
    let mut metrics_listener = None;
    let mut control_listener = None;
    // A failover: the dead server's queue descriptors (kept until the kernel resent what was
    // read through them), and when it was found dead.
    let mut old_clones = Vec::new();
    let mut died_at: Option<u64> = None;
    // The format of the state a takeover receives (announced in HELLO).
    let mut state_version = crate::upgrade::STATE_VERSION;
    let (session, dev) = match (hello, handover.take()) {
        (None, Some(h)) => {
            metrics_listener = h.metrics_listener;
            control_listener = h.control_listener;
            old_clones = h.old_clones;
            fs.set_mount_dev(h.dev);
            let s =
                Session::adopt(h.fuse_fd, h.dev, mountpoint.clone(), fs.clone(), &session_cfg, &h.init_in, &h.init_out)
                    .map_err(|e| format!("failover: taking the connection over: {e}"))?;
            let r = fs.import_failover(&h.journal).map_err(|e| format!("failover: {e}"))?;
            crate::failover::LOST_HANDLES.fetch_add(r.lost as u64, Ordering::Relaxed);
            log::info!(
                "failover: took the state of the dead server over: {} nodes, {} open handles reopened, {} lost (EIO)",
                r.nodes,
                r.handles,
                r.lost
            );
            died_at = Some(h.died_at_ns);
            (s, h.dev)
        }
        (Some(hello), _) => {
            let tk = takeover.as_ref().ok_or("takeover without its socket")?;
            let dev = hello.dev;
            state_version = hello.version;
            metrics_listener = hello.metrics_listener;
            control_listener = hello.control_listener;
            fs.set_mount_dev(dev);
            let adopted = Session::adopt(
                hello.fuse_fd,
                dev,
                mountpoint.clone(),
                fs.clone(),
                &session_cfg,
                &hello.init_in,
                &hello.init_out,
            );
            match adopted {
                Ok(s) => (s, dev),
                Err(e) => return Err(tk.refuse(&e.to_string())),
            }
        }
        (None, None) => {
            let fsname = if cfg.fsname.is_empty() { source.display().to_string() } else { cfg.fsname.clone() };
            let mut opts = MountOptions::new(mountpoint.clone());
            opts.fsname = fsname.replace(',', "_");
            opts.subtype = cfg.subtype.clone();
            opts.allow_other = cfg.allow_other;
            opts.default_permissions = cfg.default_permissions;
            opts.read_only = cfg.ro;
            opts.nosuid = cfg.mount_flags.nosuid;
            opts.nodev = cfg.mount_flags.nodev;
            opts.noexec = cfg.mount_flags.noexec;
            opts.noatime = cfg.mount_flags.noatime;
            opts.strictatime = cfg.mount_flags.strictatime;
            opts.nodiratime = cfg.mount_flags.nodiratime;
            opts.max_read = cfg.fuse.max_write;
            let mounted = mount::mount(&opts).map_err(|e| e.to_string())?;
            let dev = mounted.dev();
            // Before the first request: from now on a backing name leading into this mount is refused.
            fs.set_mount_dev(dev);
            match Session::init(mounted, fs.clone(), &session_cfg) {
                Ok(s) => (s, dev),
                Err(e) => {
                    let _ = mount::unmount(&mountpoint);
                    return Err(e.to_string());
                }
            }
        }
    };
    let session = Arc::new(session);
    // The watchdog guards the mount from the moment it is this server's: a live upgrade's new
    // server says so once the old one has handed it over (below). Told earlier, its watchdog
    // would detach a mount the old server (or a failover of it) still serves if this server
    // died or gave up during the hand-over.
    let mut watchdog_link = None;
    if takeover.is_none() {
        if let Err(e) = watchdog.mounted(dev) {
            log::warn!("watchdog not told about the mount: {e}");
        }
    } else {
        watchdog_link = Some(watchdog.link().map_err(|e| format!("watchdog: {e}"))?);
    }
    let failover_link = failover_setup(&cfg, &session, &fs, &watchdog, dev);
    if let Some(link) = &failover_link {
        let l = link.clone();
        session.set_clone_hook(Arc::new(move |fds| l.set_clones(fds)));
        // A live upgrade's new server starts its journal once the old state is in (below).
        if takeover.is_none() {
            start_journal(&fs, link);
        }
    }
    // A takeover: the queues wait at their gate until the state is in; the old server drains
    // only once our io_uring entries are registered (see `upgrade`).
    let takeover_done = takeover.map(|tk| {
        let (fs, session) = (fs.clone(), session.clone());
        let failover_link = failover_link.clone();
        let mountpoint_s = mountpoint.display().to_string();
        std::thread::spawn(move || -> Result<(), RunError> {
            if !session.wait_queues_at_gate(Duration::from_secs(10)) {
                session.open_gate(false);
                return Err(tk.refuse("the queues did not start"));
            }
            let (state, fds, t0) = match tk.ready_and_receive(&session.round_fds()) {
                Ok(x) => x,
                Err(e) => {
                    session.open_gate(false);
                    return Err(e);
                }
            };
            let nfds = fds.len();
            if let Err(e) = fs.import_live(state_version, &state, fds) {
                session.open_gate(false);
                return Err(tk.refuse(e));
            }
            if let Some(link) = &failover_link {
                start_journal(&fs, link);
            }
            session.open_gate(true);
            // Before the old server exits (it waits for RESUMED): systemd must not see the
            // service's main process gone.
            crate::service::new_main_process(&format!("serving {} (taken over by a live upgrade)", mountpoint_s));
            tk.resumed(t0, || {
                // Before the old server is answered (and exits): from its exit on, this
                // server's watchdog guards the mount.
                if let Some(link) = &watchdog_link {
                    if let Err(e) = link.mounted(dev) {
                        log::warn!("watchdog not told about the mount: {e}");
                    }
                }
                if let Some(link) = &failover_link {
                    // The upgrade counters changed: hand the new ones on.
                    link.rearm();
                }
            });
            log::info!(
                "took over from the previous server: {} open handles, {} descriptors, {} bytes of state, pause {:.1} ms",
                fs.open_handles(),
                nfds,
                state.len(),
                crate::upgrade::LAST_PAUSE_US.load(Ordering::Relaxed) as f64 / 1e3
            );
            Ok(())
        })
    });
    // A failover: the queues wait at their gate until the kernel has put the requests the dead
    // server had taken back in its queue.
    let failover_done = died_at.map(|died| {
        let session = session.clone();
        let mountpoint_s = mountpoint.display().to_string();
        std::thread::spawn(move || -> Result<(), RunError> {
            if !session.wait_queues_at_gate(Duration::from_secs(10)) {
                session.open_gate(false);
                return Err("failover: the queues did not start".into());
            }
            if let Err(e) = session.resend() {
                log::error!("failover: FUSE_NOTIFY_RESEND failed ({e}): requests the dead server had taken will fail");
            }
            // Empty now: closing them ends nothing.
            drop(old_clones);
            session.open_gate(true);
            let pause_us = ringfs_transport::watchdog::monotonic_ns().saturating_sub(died) / 1000;
            crate::failover::LAST_PAUSE_US.store(pause_us, Ordering::Relaxed);
            crate::service::new_main_process(&format!("serving {mountpoint_s} (after a crash failover)"));
            log::info!(
                "failover: serving {mountpoint_s} again {:.1} ms after the previous server was found dead",
                pause_us as f64 / 1e3
            );
            Ok(())
        })
    });
    let takeover_done = takeover_done.or(failover_done);
    log::info!(
        "{} {} on {} (dev {}:{}, transport {})",
        if takeover_done.is_some() { "taking over" } else { "mounted" },
        source.display(),
        mountpoint.display(),
        libc::major(dev),
        libc::minor(dev),
        if session.stats().uring { "io_uring" } else { "dev-fuse" }
    );
    if let Some(w) = watch {
        let kind = w.kind();
        match fs.start_watch(w) {
            Ok(()) => log::info!("coherence: {kind} watch on {}", source.display()),
            Err(e) => log::warn!("backing-directory watch not started: {e}"),
        }
    }
    // eBPF accounting and the metrics endpoint. After a crash failover they start once the
    // queues serve again: loading and verifying the eBPF programs takes 100-200 ms of CPU, which
    // would add to the clients' pause.
    let link_metrics = metrics_listener.as_ref().and_then(|l| l.try_clone().ok());
    let observe = {
        let (ebpf_cfg, metrics_addr, mountpoint_o) = (cfg.ebpf.clone(), cfg.metrics.addr, mountpoint.clone());
        let (session_o, fs_o) = (session.clone(), fs.clone());
        let metrics_listener = metrics_listener.take();
        move || {
            let ebpf = if ebpf_cfg.enable {
                let opts = ringfs_bpf::AccountingOptions {
                    dev,
                    mountpoint: mountpoint_o.clone(),
                    demand_tracing: ebpf_cfg.demand_tracing,
                    tracepoint_overrides: Vec::new(),
                    attach: match ebpf_cfg.fuse_attach {
                        ringfs_config::FuseAttach::Auto => ringfs_bpf::Attach::TpBtf,
                        ringfs_config::FuseAttach::RawTp => ringfs_bpf::Attach::RawTp,
                    },
                };
                match ringfs_bpf::Accounting::load(&opts) {
                    Ok(a) => {
                        // One line per piece this kernel cannot give, naming it and why.
                        for p in a.programs() {
                            if let Some(why) = &p.missing {
                                log::warn!(
                                    "eBPF program {} not attached ({} not counted): {why}",
                                    p.program.name,
                                    p.program.counts
                                );
                            } else if let (Some(via), Some(why)) = (p.via, &p.tp_btf_refused) {
                                log::info!(
                                    "eBPF program {} attached as {} to {} (tp_btf: {why})",
                                    p.program.name,
                                    via.as_str(),
                                    p.program.tracepoint
                                );
                            }
                        }
                        for f in a.features() {
                            if let Some(why) = &f.missing {
                                log::info!("eBPF counter {} unavailable: {why}", f.feature);
                            }
                        }
                        let attached = a.programs().iter().filter(|p| p.missing.is_none()).count();
                        log::info!(
                            "eBPF accounting attached ({attached} of {} programs; demand tracing {})",
                            a.programs().len(),
                            if a.snapshot().is_ok_and(|s| s.demand_tracing) {
                                "on"
                            } else if opts.demand_tracing {
                                "requested but unavailable"
                            } else {
                                "off"
                            }
                        );
                        Some(std::sync::Mutex::new(a))
                    }
                    Err(e) => {
                        log::warn!("eBPF accounting unavailable, serving without it: {e}");
                        None
                    }
                }
            } else {
                None
            };
            if let Some(addr) = metrics_addr {
                let sources = crate::metrics::Sources {
                    ebpf,
                    dispatch: session_o.dispatch_stats(),
                    session: session_o.stats(),
                    notify: session_o.notify_stats(),
                    passthrough: fs_o.passthrough_stats(),
                    passthrough_enabled: session_o.conn().passthrough,
                    fs: fs_o.clone(),
                    mountpoint: mountpoint_o.display().to_string(),
                    started,
                };
                match metrics_listener {
                    Some(l) => crate::metrics::start_on(addr, sources, l),
                    None => crate::metrics::start(addr, sources),
                };
            }
        }
    };
    if died_at.is_some() {
        std::thread::Builder::new()
            .name("ringfs-observe".into())
            .spawn(observe)
            .map_err(|e| format!("starting the metrics thread: {e}"))?;
    } else {
        observe();
    }
    let transport = if session.stats().uring { "io_uring" } else { "/dev/fuse" };
    let passthrough = if session.conn().passthrough { ", passthrough" } else { "" };
    crate::service::ready(&format!(
        "serving {} on {} ({transport}{passthrough})",
        source.display(),
        mountpoint.display()
    ));
    if let Some(mut p) = ready_pipe.take() {
        // Whoever started us (mount(8), a script's `$(...)`) may wait for end-of-file on our
        // standard descriptors, which would otherwise come only at unmount.
        ringfs_transport::watchdog::detach_stdio();
        let _ = p.write_all(b"O");
    }

    let upgrader = Arc::new(
        crate::upgrade::Upgrader::new(
            session.control(),
            session.fuse_fd(),
            session.init_record(),
            dev,
            fs.clone(),
            // After a failover the endpoint may still be starting: the listener handed over.
            link_metrics.as_ref().and_then(|l| l.try_clone().ok()).or_else(crate::metrics::listener_fd),
            session.stats().uring,
        )
        .map_err(|e| format!("setting up live upgrades: {e}"))?,
    );
    let control_path = crate::upgrade::control_path(&mountpoint);
    if let Err(e) = crate::upgrade::serve_control(&control_path, upgrader.clone(), control_listener) {
        log::warn!(
            "no control socket at {} (`ringfs upgrade` unavailable; SIGHUP still upgrades): {e}",
            control_path.display()
        );
    }
    if let Some(link) = &failover_link {
        link.set_listeners(link_metrics.or_else(crate::metrics::listener_fd), upgrader.control_listener_fd());
    }
    let finished = Arc::new(AtomicBool::new(false));
    {
        let mountpoint = mountpoint.clone();
        let finished = finished.clone();
        let upgrader = upgrader.clone();
        std::thread::Builder::new()
            .name("ringfs-signals".into())
            .spawn(move || signal_thread(sigset, &mountpoint, dev, &finished, &upgrader))
            .map_err(|e| format!("starting the signal thread: {e}"))?;
    }
    let mut takeover_done = takeover_done;
    let result = loop {
        let served = session.serve();
        if let Some(t) = takeover_done.take() {
            // The first round of a takeover: it ends at once if the state was not taken in.
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("the takeover thread panicked".into()),
            }
        }
        match served {
            Ok(ringfs_transport::Ended::Drained) => match upgrader.on_drained() {
                crate::upgrade::Verdict::HandedOver => {
                    // The next server owns the mount (and the control socket) now.
                    watchdog.done();
                    log::info!("handed {} over to the next server; exiting", mountpoint.display());
                    std::process::exit(0);
                }
                crate::upgrade::Verdict::Resume => {
                    log::info!("serving {} again", mountpoint.display());
                    continue;
                }
            },
            Ok(ringfs_transport::Ended::Gone) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    session.finish();
    let _ = std::fs::remove_file(&control_path);
    crate::service::stopping(&format!("{} unmounted", mountpoint.display()));
    finished.store(true, Ordering::SeqCst);
    // The mount is gone (unmounted by us, by the user, or aborted): tell the watchdog to stand down.
    watchdog.done();
    log::info!("unmounted {}", mountpoint.display());
    result.map_err(|e| e.to_string())
}

/// Decides crash failover for this mount and says at start-up what is in effect; the link to
/// the watchdog when failover is on.
fn failover_setup(
    cfg: &Config,
    session: &Session<PassthroughFs>,
    fs: &PassthroughFs,
    watchdog: &Watchdog,
    dev: u64,
) -> Option<Arc<crate::failover::Link>> {
    use crate::failover::{unavailable, Link, MODE};
    if !cfg.failover {
        MODE.store(0, Ordering::Relaxed);
        log::info!("crash failover: off (failover = false); if the server dies, the watchdog detaches the mount");
        return None;
    }
    if let Some(why) = unavailable(session.stats().uring, session.kernel_resends(), fs.reopens_by_handle()) {
        MODE.store(2, Ordering::Relaxed);
        log::warn!("crash failover: unavailable: {why}; if the server dies, the watchdog detaches the mount");
        return None;
    }
    let link = watchdog
        .link()
        .and_then(|wd| Link::new(wd, dev, session.init_record(), session.fuse_fd(), session.dispatch_stats()));
    match link {
        Ok(l) => {
            MODE.store(1, Ordering::Relaxed);
            log::info!(
                "crash failover: on (classic /dev/fuse channel, FUSE_NOTIFY_RESEND): the watchdog holds the \
                 connection; if the server dies it starts a new one and the kernel resends the requests in flight"
            );
            Some(l)
        }
        Err(e) => {
            MODE.store(2, Ordering::Relaxed);
            log::warn!("crash failover: unavailable: {e}; if the server dies, the watchdog detaches the mount");
            None
        }
    }
}

/// Starts the failover journal and hands it to the watchdog.
fn start_journal(fs: &PassthroughFs, link: &Arc<crate::failover::Link>) {
    use std::os::fd::AsFd;
    let l = link.clone();
    match fs.start_journal(Arc::new(move |fd| l.set_journal(fd))) {
        Ok(fd) => link.set_journal(fd.as_fd()),
        Err(e) => log::error!("crash failover: the journal could not be started ({e}); a crash ends the mount"),
    }
}

/// A user's mount cannot have `strictatime` or `nodiratime` (`mount::user_mount_refuses`):
/// refused here, before anything is mounted or forked, with what access times will do instead.
fn user_atime_check(cfg: &Config, source: &Path) -> Result<(), RunError> {
    let mut opts = MountOptions::new(PathBuf::new());
    opts.strictatime = cfg.mount_flags.strictatime;
    opts.nodiratime = cfg.mount_flags.nodiratime;
    let refused = mount::user_mount_refuses(&opts);
    if refused.is_empty() {
        return Ok(());
    }
    // The mode the backing directory's own mount gives (what the user gets instead).
    use rustix::fs::StatVfsMountFlags as F;
    let backing = match rustix::fs::statvfs(source) {
        Ok(st) if st.f_flag.contains(F::NOATIME) => "noatime",
        Ok(st) if st.f_flag.contains(F::RELATIME) => "relatime",
        Ok(_) => "strictatime",
        Err(_) => "its own mode",
    };
    let words = refused.join(" and ");
    let (verb, them) = if refused.len() > 1 { ("need", "them") } else { ("needs", "it") };
    Err(format!(
        "{words} {verb} root: {} refuses {them} for a user's mount, and the server applies them through a \
         private bind mount of the backing directory, which needs CAP_SYS_ADMIN. Leave {words} out \
         (access times then follow the backing directory's mount: {backing}) or mount as root; \
         noatime works without root",
        mount::FUSERMOUNT
    ))
}

/// The one line a server without root logs: what it switched off, and why.
fn unprivileged_note(reopens_by_handle: bool, watching: bool) -> String {
    let mut off = vec![
        "passthrough (FUSE_DEV_IOC_BACKING_OPEN needs CAP_SYS_ADMIN)",
        "eBPF accounting (needs CAP_BPF and CAP_PERFMON)",
        "private bind mounts for access times and passthrough writes (open_tree/mount_setattr need CAP_SYS_ADMIN)",
    ];
    if watching {
        off.push("the fanotify watch (FAN_MARK_FILESYSTEM needs CAP_SYS_ADMIN; inotify watches instead)");
    }
    let mut note =
        format!("running without root: mounted through {}; switched off: {}", mount::FUSERMOUNT, off.join(", "));
    if !reopens_by_handle {
        // RLIM_INFINITY (None) as its raw value, as before.
        let cur = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
        note.push_str(&format!(
            ", file handles across remounts and NFS export (open_by_handle_at needs CAP_DAC_READ_SEARCH): every \
             known inode keeps its descriptor open, so at most about {cur} inodes (RLIMIT_NOFILE)"
        ));
    }
    note
}

/// Takes SIGHUP (a live upgrade to the binary now installed, see `upgrade`; the thread goes on
/// waiting) and SIGINT/SIGTERM: unmounts, then makes sure the process ends within
/// [`SHUTDOWN_GRACE`]. The kernel normally hangs up the connection at the unmount (or, for a
/// mount detached while busy, when its last user leaves); it does not when another mount
/// namespace holds a copy of the mount (`unshare -m` while mounted), and the server would then
/// wait in /dev/fuse until that namespace goes away. So whatever the unmount reported, a
/// connection still up after the grace period is aborted through fusectl.
fn signal_thread(
    set: libc::sigset_t,
    mountpoint: &Path,
    dev: u64,
    finished: &AtomicBool,
    upgrader: &Arc<crate::upgrade::Upgrader>,
) {
    let mut sig = 0;
    loop {
        // SAFETY: set is a valid signal set blocked in this thread.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        if sig != libc::SIGHUP {
            break;
        }
        log::info!("SIGHUP: upgrading to the installed binary");
        let upgrader = upgrader.clone();
        let _ = std::thread::Builder::new().name("ringfs-upgrade".into()).spawn(move || {
            if upgrader.upgrade(None, false).is_ok() {
                upgrader.handed_over();
            }
        });
    }
    log::info!("signal {sig}: unmounting {}", mountpoint.display());
    crate::service::stopping(&format!("signal {sig}: unmounting {}", mountpoint.display()));
    match mount::unmount(mountpoint) {
        Ok(false) => {}
        Ok(true) => log::info!("{} is busy: detached; waiting for its last users", mountpoint.display()),
        Err(e) => log::warn!("unmounting {}: {e}", mountpoint.display()),
    }
    let wait = |limit: Duration| {
        let start = Instant::now();
        while start.elapsed() < limit {
            if finished.load(Ordering::SeqCst) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    if wait(SHUTDOWN_GRACE) {
        return;
    }
    log::warn!(
        "the connection is still up {:?} after the unmount (still in use, or held by another mount namespace): aborting it",
        SHUTDOWN_GRACE
    );
    if let Err(e) = mount::abort_connection(dev) {
        log::error!("{e}; exiting");
        std::process::exit(0);
    }
    // The queues see the connection gone at once; exit anyway if they do not.
    if !wait(Duration::from_secs(2)) {
        log::error!("the server did not stop after the abort; exiting");
        std::process::exit(1);
    }
}

/// File system types whose metadata calls on cached objects are answered from memory.
const LOCAL_FS_TYPES: &[&str] =
    &["ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "bcachefs", "tmpfs", "ramfs", "vfat", "exfat", "jfs"];

/// Whether metadata calls under `source` may run inline on the queue threads: the file system
/// holding `source` and every file system mounted below it must be local ones (`Err` names the
/// first that is not).
pub(crate) fn inline_metadata_safe(source: &Path) -> Result<(), String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("reading mountinfo: {e}"))?;
    check_mounts_local(&info, source)
}

/// [`inline_metadata_safe`] over the text of a mountinfo file.
fn check_mounts_local(mountinfo: &str, source: &Path) -> Result<(), String> {
    let mut containing: Option<(usize, String)> = None;
    for m in mount::parse_mountinfo(mountinfo) {
        let local = LOCAL_FS_TYPES.contains(&m.fstype.as_str());
        if source.starts_with(&m.mountpoint) {
            let depth = m.mountpoint.components().count();
            if containing.as_ref().is_none_or(|(d, _)| depth >= *d) {
                containing = Some((depth, m.fstype));
            }
        } else if m.mountpoint.starts_with(source) && !local {
            return Err(format!("{} is {}", m.mountpoint.display(), m.fstype));
        }
    }
    match containing {
        Some((_, t)) if LOCAL_FS_TYPES.contains(&t.as_str()) => Ok(()),
        Some((_, t)) => Err(format!("{} is on {t}", source.display())),
        None => Err(format!("no mount holds {}", source.display())),
    }
}

#[cfg(test)]
mod mountinfo_tests {
    use super::*;

    const INFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /srv/data/nfs rw shared:5 - nfs4 host:/x rw
31 22 0:27 / /srv/data/tmp\\040dir rw shared:6 - tmpfs tmpfs rw
32 22 0:28 / /mnt/fuse rw shared:7 - fuse.ringfs /srv rw
";

    #[test]
    fn local_when_every_mount_below_is_local() {
        assert_eq!(check_mounts_local(INFO, Path::new("/srv/other")), Ok(()));
        assert_eq!(check_mounts_local(INFO, Path::new("/srv/data/tmp dir/x")), Ok(()));
    }

    #[test]
    fn not_local_with_a_network_mount_below_or_around() {
        assert_eq!(check_mounts_local(INFO, Path::new("/srv/data")), Err("/srv/data/nfs is nfs4".into()));
        assert_eq!(check_mounts_local(INFO, Path::new("/srv/data/nfs/a")), Err("/srv/data/nfs/a is on nfs4".into()));
        assert_eq!(check_mounts_local(INFO, Path::new("/mnt/fuse")), Err("/mnt/fuse is on fuse.ringfs".into()));
    }
}
