//! A served FUSE connection: INIT, then worker threads that carry requests to the dispatcher.
//!
//! Classic channel: the INIT request is read from the mount's fd; then `workers` threads each
//! read requests from their own clone of that fd (FUSE_DEV_IOC_CLONE), so the kernel hands
//! requests to whichever thread is free, and write replies back on the same fd.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use ringfs_protocol::abi::{opcode, FuseInHeader, FuseOutHeader, InitFlags};
use ringfs_protocol::dispatch::{Dispatcher, Outcome};
use ringfs_protocol::init::{self, InitParams};
use ringfs_protocol::request::{self, Operation};
use ringfs_protocol::{ConnInfo, FileSystem};
use zerocopy::IntoBytes;

use crate::executor::block_on;
use crate::mount::{clone_fd, Mounted};
use crate::notify::{Channel, NotifyStats};
use crate::ring::{
    possible_cpus, run_queue, AlignedBox, Gate, InterruptInbox, QueueChannel, QueueParams, QueueStats, RoundHook,
    StopSignal,
};

/// Which channel carries requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportMode {
    /// FUSE over io_uring when the kernel offers it, else the classic channel.
    Auto,
    /// FUSE over io_uring, or fail at start-up.
    Uring,
    /// The classic /dev/fuse read/write channel.
    DevFuse,
}

/// How the session runs. Start from [`SessionConfig::default`] and change the fields you need
/// (new fields may be added: the struct is `#[non_exhaustive]`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Worker threads of the classic channel (at least 1).
    pub workers: usize,
    /// INIT parameters.
    pub init: InitParams,
    /// Channel selection.
    pub transport: TransportMode,
    /// Ring entries per io_uring queue.
    pub queue_depth: usize,
    /// How long an io_uring queue thread keeps polling for the next request after serving one
    /// before it sleeps (zero: sleep at once). The classic channel always sleeps at once.
    pub busy_poll: std::time::Duration,
}

impl Default for SessionConfig {
    /// Two classic-channel workers, [`InitParams::default`], FUSE over io_uring when the kernel
    /// offers it, 16 ring entries per queue, no busy polling.
    fn default() -> SessionConfig {
        SessionConfig {
            workers: 2,
            init: InitParams::default(),
            transport: TransportMode::Auto,
            queue_depth: 16,
            busy_poll: std::time::Duration::ZERO,
        }
    }
}

/// Counters of a session, readable while it runs.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct SessionStats {
    /// Requests received, per opcode.
    pub requests: Vec<AtomicU64>,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Requests that could not be parsed.
    pub malformed: AtomicU64,
    /// Per-queue counters of the io_uring transport (empty on the classic channel).
    pub queues: Vec<Arc<QueueStats>>,
    /// Whether requests travel through io_uring.
    pub uring: bool,
    /// Requests whose file-system method panicked (each was answered EIO).
    pub panics: AtomicU64,
    /// Queues that could not go on (ring failure); each aborted the connection.
    pub failed_queues: AtomicU64,
}

impl SessionStats {
    fn new(uring: bool, queues: usize) -> Self {
        SessionStats {
            requests: (0..opcode::COUNT + 1).map(|_| AtomicU64::new(0)).collect(),
            errors: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            queues: (0..queues).map(|_| Arc::new(QueueStats::default())).collect(),
            uring,
            panics: AtomicU64::new(0),
            failed_queues: AtomicU64::new(0),
        }
    }

    /// Requests seen of `op`.
    pub fn count(&self, op: u32) -> u64 {
        self.requests.get(op as usize).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub(crate) fn record(&self, op: u32) {
        let i = (op as usize).min(opcode::COUNT);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A mounted, initialised connection ready to be served.
pub struct Session<F> {
    mounted: Mounted,
    dispatcher: Dispatcher<F>,
    bufsize: usize,
    outsize: usize,
    payload_size: usize,
    queue_depth: usize,
    busy_poll: std::time::Duration,
    stats: Arc<SessionStats>,
    channel: Arc<Channel>,
    conn: ConnInfo,
    /// The kernel's INIT request and our reply, as sent (a server taking over checks that it
    /// would answer the same).
    init_in: ringfs_protocol::abi::FuseInitIn,
    init_out: Vec<u8>,
    control: Arc<Control>,
    gate: Option<Arc<Gate>>,
    clone_hook: std::sync::Mutex<Option<Arc<CloneHook>>>,
}

/// Called by [`Session::serve`] on the classic channel with the clones its queues are about to
/// read through, before any of them reads (see [`Session::set_clone_hook`]).
pub type CloneHook = dyn Fn(&[std::os::fd::BorrowedFd<'_>]) + Send + Sync;

/// How a call of [`Session::serve`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The connection is gone (unmounted or aborted).
    Gone,
    /// [`Control::drain`] was called: every request taken has been answered and no queue
    /// takes new ones; the connection is still up (another server may take it over, or
    /// [`Session::serve`] may be called again).
    Drained,
}

/// Asks a serving session to hand over (from any thread).
pub struct Control {
    drain: Arc<AtomicBool>,
    round_hook: std::sync::Mutex<Option<Arc<RoundHook>>>,
    stop: StopSignal,
    reader_wake: OwnedFd,
    queues: usize,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("drain", &self.drain).field("queues", &self.queues).finish_non_exhaustive()
    }
}

impl Control {
    fn new(queues: usize) -> io::Result<Control> {
        let reader_wake =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)?;
        Ok(Control {
            drain: Arc::new(AtomicBool::new(false)),
            round_hook: std::sync::Mutex::new(None),
            stop: StopSignal::new()?,
            reader_wake,
            queues,
        })
    }

    /// Stops taking requests: [`Session::serve`] returns [`Ended::Drained`] once every request
    /// taken is answered. The classic channel stops at once (its reads are cancelled); an io_uring
    /// queue ends when nothing is in flight and no request came for a short while (the kernel
    /// cannot take ring entries back: see docs/reliability.md).
    pub fn drain(&self) {
        self.drain.store(true, Ordering::Release);
        self.stop.wake(self.queues);
        let one = 1u64;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.reader_wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Sets how a draining io_uring queue asks the next server for a registration round:
    /// `hook(qid)` writes the next server's round eventfd of that queue (see
    /// [`Session::round_fds`]) and returns its done eventfd (without blocking). Without a hook, a draining
    /// io_uring queue ends after a quiet spell instead, which can lose a request to the race
    /// documented in docs/reliability.md. Takes effect at the next [`Session::serve`].
    pub fn set_round_hook(&self, hook: Arc<RoundHook>) {
        *self.round_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    fn reset(&self) {
        self.drain.store(false, Ordering::Release);
        let mut v = 0u64;
        // SAFETY: reading 8 bytes into a valid u64 (non-blocking; nothing to read is fine).
        unsafe { libc::read(self.reader_wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// Alignment of the /dev/fuse reader's buffers: request structs are read in place.
const DEV_BUF_ALIGN: usize = 8;

fn dup_fd(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::io::read(fd, buf)?)
}

fn write_fd(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    Ok(rustix::io::write(fd, buf)?)
}

/// Sends a reply whose payload already sits in `out[16..16 + len]`.
fn send_reply(fd: &OwnedFd, out: &mut [u8], unique: u64, error: i32, len: usize) -> io::Result<()> {
    let h = FuseOutHeader { len: (16 + len) as u32, error, unique };
    out[..16].copy_from_slice(h.as_bytes());
    match write_fd(fd, &out[..16 + len]) {
        Ok(_) => Ok(()),
        // The request was interrupted and already answered by the kernel.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

impl<F: FileSystem> Session<F> {
    /// Answers INIT on the mount's fd. Blocks until the kernel sends it (right after mount).
    pub fn init(mounted: Mounted, fs: Arc<F>, cfg: &SessionConfig) -> io::Result<Session<F>> {
        let bufsize = cfg.init.max_write.max(128 * 1024) as usize + 8192;
        let mut inbuf = AlignedBox::new(bufsize, DEV_BUF_ALIGN);
        let buf = inbuf.as_mut_slice();
        let n = loop {
            match read_fd(&mounted.fd, buf) {
                Ok(n) => break n,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) => continue,
                Err(e) => return Err(io::Error::new(e.kind(), format!("reading INIT from /dev/fuse: {e}"))),
            }
        };
        let req = request::parse(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("malformed INIT: {e}")))?;
        let Operation::Init { arg } = req.op else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "first request was not INIT"));
        };
        let mut out = vec![0u8; 16 + 256];
        let mut params = cfg.init.clone();
        params.over_io_uring = cfg.transport != TransportMode::DevFuse;
        let mut negotiated = match init::negotiate(&arg, &params) {
            Ok(n) => n,
            Err(e) => {
                let _ = send_reply(&mounted.fd, &mut out, req.unique(), -e.0, 0);
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("kernel FUSE protocol {}.{} is too old (need 7.36 or newer)", arg.major, arg.minor),
                ));
            }
        };
        let channel = Channel::start(dup_fd(&mounted.fd)?)?;
        fs.attach_kernel(channel.clone());
        if let Err(e) = fs.init(&mut negotiated.conn) {
            let _ = send_reply(&mounted.fd, &mut out, req.unique(), -e.0, 0);
            return Err(io::Error::other(format!("file system refused INIT: {e}")));
        }
        init::apply_conn(&mut negotiated);
        let uring = negotiated.flags.contains(InitFlags::OVER_IO_URING);
        if cfg.transport == TransportMode::Uring && !uring {
            let _ = send_reply(&mounted.fd, &mut out, req.unique(), -libc::EPROTO, 0);
            return Err(io::Error::new(io::ErrorKind::Unsupported, uring_unavailable_reason()));
        }
        let payload = negotiated.out.as_bytes();
        out[16..16 + payload.len()].copy_from_slice(payload);
        send_reply(&mounted.fd, &mut out, req.unique(), 0, payload.len())?;
        log::info!(
            "FUSE {}.{} negotiated: max_write={} passthrough={} readdirplus={} writeback_cache={} posix_acl={}",
            arg.major,
            arg.minor,
            negotiated.conn.max_write,
            negotiated.conn.passthrough,
            negotiated.conn.readdirplus,
            negotiated.conn.writeback_cache,
            negotiated.conn.posix_acl
        );
        if uring {
            log::info!("transport: FUSE over io_uring, {} queues x {} entries", possible_cpus(), cfg.queue_depth);
        } else if cfg.transport == TransportMode::Auto {
            log::info!("transport: classic /dev/fuse channel ({})", uring_unavailable_reason());
        } else {
            log::info!("transport: classic /dev/fuse channel (configured)");
        }
        let init_out = payload.to_vec();
        Session::assemble(mounted, fs, cfg, channel, arg, init_out, &negotiated, false)
    }

    /// The session for a negotiated connection (`gated`: its queues wait for
    /// [`Session::open_gate`]).
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        mounted: Mounted,
        fs: Arc<F>,
        cfg: &SessionConfig,
        channel: Arc<Channel>,
        init_in: ringfs_protocol::abi::FuseInitIn,
        init_out: Vec<u8>,
        negotiated: &init::Negotiated,
        gated: bool,
    ) -> io::Result<Session<F>> {
        let uring = negotiated.flags.contains(InitFlags::OVER_IO_URING);
        let largest = negotiated.conn.max_read.max(negotiated.conn.max_write) as usize;
        let queues = if uring { possible_cpus() } else { cfg.workers.max(1) };
        Ok(Session {
            init_in,
            init_out,
            control: Arc::new(Control::new(queues)?),
            gate: if gated { Some(Arc::new(Gate::new(queues)?)) } else { None },
            clone_hook: std::sync::Mutex::new(None),
            mounted,
            dispatcher: Dispatcher::new(fs),
            bufsize: cfg.init.max_write.max(128 * 1024) as usize + 8192,
            outsize: 16 + largest + 8192,
            payload_size: largest.max(8192),
            queue_depth: cfg.queue_depth.clamp(1, 1024),
            busy_poll: if uring { cfg.busy_poll } else { std::time::Duration::ZERO },
            stats: Arc::new(SessionStats::new(uring, queues)),
            channel,
            conn: negotiated.conn.clone(),
        })
    }

    /// Takes over a connection another server initialised and handed over (its /dev/fuse
    /// descriptor, the kernel's INIT request and the reply that server sent). No INIT is
    /// exchanged: the negotiation is run again from `init_in` and must give exactly `init_out`
    /// (else `InvalidData`: the kernel keeps the first server's answer, which this build would
    /// not honour). The queues wait for [`Session::open_gate`] before handling requests.
    pub fn adopt(
        fd: OwnedFd,
        dev: u64,
        mountpoint: std::path::PathBuf,
        fs: Arc<F>,
        cfg: &SessionConfig,
        init_in: &[u8],
        init_out: &[u8],
    ) -> io::Result<Session<F>> {
        use zerocopy::FromBytes;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let arg =
            ringfs_protocol::abi::FuseInitIn::read_from_bytes(init_in).map_err(|_| bad("malformed INIT record"))?;
        let mut params = cfg.init.clone();
        params.over_io_uring = cfg.transport != TransportMode::DevFuse;
        let mut negotiated =
            init::negotiate(&arg, &params).map_err(|_| bad("the kernel's INIT is not acceptable to this build"))?;
        let mounted = Mounted::from_parts(fd, mountpoint, dev);
        let channel = Channel::start(dup_fd(&mounted.fd)?)?;
        fs.attach_kernel(channel.clone());
        fs.init(&mut negotiated.conn).map_err(|e| io::Error::other(format!("file system refused INIT: {e}")))?;
        init::apply_conn(&mut negotiated);
        let payload = negotiated.out.as_bytes();
        if payload != init_out {
            return Err(bad("this build (or configuration) would answer INIT differently than the running server did"));
        }
        let init_out = payload.to_vec();
        Session::assemble(mounted, fs, cfg, channel, arg, init_out, &negotiated, true)
    }

    /// Waits (up to `limit`) until every queue of an adopted session being served has reached
    /// its gate: io_uring entries registered with the kernel, classic-channel threads started.
    pub fn wait_queues_at_gate(&self, limit: std::time::Duration) -> bool {
        let Some(g) = &self.gate else { return true };
        let start = std::time::Instant::now();
        while g.arrived() < self.stats.queues.len() {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        true
    }

    /// The registration-round eventfds of an adopted session's queues, (asked, done) per queue
    /// in order, to hand to the previous server (see [`Control::set_round_hook`]).
    pub fn round_fds(&self) -> Vec<RawFd> {
        self.gate.as_ref().map_or_else(Vec::new, |g| g.round_fds())
    }

    /// Lets the queues of an adopted session ([`Session::adopt`]) handle requests (`true`), or
    /// makes them end (`false`).
    pub fn open_gate(&self, serve: bool) {
        if let Some(g) = &self.gate {
            g.open(serve);
        }
    }

    /// Sets what [`serve`](Self::serve) calls, on the classic channel, with the descriptors its
    /// queues read requests through, before the first read (crash failover: a supervisor that
    /// holds them keeps the requests read through them on the connection, where
    /// [`resend`](Self::resend) finds them after the server died; requests read through a
    /// descriptor that closes are ended with ECONNABORTED).
    pub fn set_clone_hook(&self, hook: Arc<CloneHook>) {
        *self.clone_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Whether the kernel resends requests on [`resend`](Self::resend) (`FUSE_HAS_RESEND` at
    /// INIT: protocol 7.40, Linux 6.9+).
    pub fn kernel_resends(&self) -> bool {
        let flags = u64::from(self.init_in.flags) | (u64::from(self.init_in.flags2) << 32);
        flags & InitFlags::HAS_RESEND.bits() != 0
    }

    /// Sends `FUSE_NOTIFY_RESEND`: the kernel puts every request taken by a reader of this
    /// connection and not answered yet back in its queue, `unique` marked with
    /// [`ringfs_protocol::abi::UNIQUE_RESEND`] (also requests this session's own queues are serving:
    /// call it before they read, i.e. with the gate of an adopted session closed).
    pub fn resend(&self) -> io::Result<()> {
        let h = FuseOutHeader { len: 16, error: ringfs_protocol::abi::notify::RESEND, unique: 0 };
        write_fd(&self.mounted.fd, h.as_bytes()).map(drop)
    }

    /// The kernel's INIT request and the reply this session sent (for [`Session::adopt`]).
    pub fn init_record(&self) -> (Vec<u8>, Vec<u8>) {
        (self.init_in.as_bytes().to_vec(), self.init_out.clone())
    }

    /// The mount's /dev/fuse descriptor (to hand to the next server).
    pub fn fuse_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.mounted.fd.as_fd()
    }

    /// The hand-over control of this session.
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// The session's counters.
    pub fn stats(&self) -> Arc<SessionStats> {
        self.stats.clone()
    }

    /// What was negotiated at INIT.
    pub fn conn(&self) -> &ConnInfo {
        &self.conn
    }

    /// The dispatcher's per-operation counters.
    pub fn dispatch_stats(&self) -> Arc<ringfs_protocol::stats::DispatchStats> {
        self.dispatcher.stats().clone()
    }

    /// The kernel channel's counters (invalidations, backing files).
    pub fn notify_stats(&self) -> Arc<NotifyStats> {
        self.channel.stats()
    }

    /// The mount's device number.
    pub fn dev(&self) -> u64 {
        self.mounted.dev()
    }

    /// Serves requests until the connection goes away (unmount or abort).
    ///
    /// Either mode runs one thread per queue, each with its own io_uring: FUSE-over-io_uring
    /// queues (one per possible CPU), or classic-channel queues reading their own non-blocking
    /// clone of the session fd through io_uring. In io_uring mode the session fd itself is read
    /// by one more thread for what the kernel keeps on /dev/fuse (FORGET, INTERRUPT).
    pub fn run(self) -> io::Result<()> {
        let served = self.serve();
        self.finish();
        served.map(|_| ())
    }

    /// Ends a session that [`serve`](Self::serve) is done with: stops the notifier and tells
    /// the file system (`destroy`). Not for a session that handed over: its file system's state
    /// lives on in the next server.
    pub fn finish(&self) {
        self.channel.stop();
        self.dispatcher.fs().destroy();
    }

    /// Serves requests until the connection goes away ([`Ended::Gone`]) or [`Control::drain`]
    /// was called and every request taken is answered ([`Ended::Drained`]; `serve` may be
    /// called again to go on serving).
    pub fn serve(&self) -> io::Result<Ended> {
        self.control.reset();
        let waker = &self.control.stop;
        let stop = Arc::new(AtomicBool::new(false));
        let nqueues = self.stats.queues.len();
        let interrupts: Arc<Vec<InterruptInbox>> =
            Arc::new((0..nqueues).map(|_| InterruptInbox::new()).collect::<io::Result<_>>()?);
        let mut handles = Vec::new();
        let dev = self.mounted.dev();
        let failed = self.stats.clone();
        let on_failure: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            failed.failed_queues.fetch_add(1, Ordering::Relaxed);
            log::error!("a queue cannot go on: aborting the connection (callers get ENOTCONN)");
            if let Err(e) = crate::mount::abort_connection(dev) {
                log::error!("aborting the connection: {e}");
            }
        });
        let mut clones = Vec::new();
        if !self.stats.uring {
            for _ in 0..nqueues {
                let fd = clone_fd(&self.mounted.fd)?;
                set_nonblocking(&fd)?;
                clones.push(fd);
            }
            let hook = self.clone_hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(hook) = hook {
                use std::os::fd::AsFd;
                let fds: Vec<_> = clones.iter().map(|f| f.as_fd()).collect();
                hook(&fds);
            }
        }
        let mut clones = clones.into_iter();
        for (qid, qstats) in self.stats.queues.iter().enumerate() {
            let channel = match clones.next() {
                None => QueueChannel::Ring { fuse_fd: self.mounted.fd.as_raw_fd() },
                Some(fd) => QueueChannel::Dev { fd, bufsize: self.bufsize },
            };
            let params = QueueParams {
                qid,
                channel,
                depth: self.queue_depth,
                busy_poll: self.busy_poll,
                payload_size: self.payload_size,
                dispatcher: self.dispatcher.clone(),
                stats: qstats.clone(),
                stop: stop.clone(),
                wake_fd: waker.fd.as_raw_fd(),
                interrupts: interrupts.clone(),
                dev_counts: self.stats.clone(),
                on_failure: on_failure.clone(),
                drain: self.control.drain.clone(),
                gate: self.gate.clone(),
                register_round: self.control.round_hook.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            };
            let h = std::thread::Builder::new().name(format!("ringfs-q{qid}")).spawn(move || {
                let r = run_queue(params);
                if let Err(e) = &r {
                    log::error!("queue {qid} failed: {e}");
                }
                r.map_err(|e| io::Error::new(e.kind(), format!("queue {qid}: {e}")))
            })?;
            handles.push(h);
        }
        if self.stats.uring {
            // FORGET, BATCH_FORGET and INTERRUPT still arrive on /dev/fuse. Non-blocking, so
            // the reader never sleeps in read(2) where a hand-over could not wake it.
            set_nonblocking(&self.mounted.fd)?;
            let serve = self.gate.as_ref().is_none_or(|g| g.wait());
            if serve {
                worker(
                    &self.mounted.fd,
                    &self.control.reader_wake,
                    &self.dispatcher,
                    &self.stats,
                    &interrupts,
                    self.bufsize,
                    self.outsize,
                );
            }
            if !self.control.drain.load(Ordering::Acquire) {
                stop.store(true, Ordering::Release);
                waker.wake(handles.len());
            }
        }
        let mut failure = None;
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => failure = failure.or(Some(io::Error::other("a queue thread panicked"))),
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(if self.control.drain.load(Ordering::Acquire) { Ended::Drained } else { Ended::Gone })
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    Ok(rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?)
}

/// Why FUSE over io_uring is not in use, for the log and for start-up errors.
pub fn uring_unavailable_reason() -> String {
    match std::fs::read_to_string(URING_PARAM) {
        Ok(v) if v.trim() == "Y" => "the kernel did not offer FUSE_OVER_IO_URING at INIT".into(),
        Ok(_) => format!("the kernel has FUSE over io_uring switched off ({URING_PARAM} is N; enable it with --enable-uring or `echo 1 > {URING_PARAM}`)"),
        Err(_) => "this kernel has no FUSE over io_uring (CONFIG_FUSE_IO_URING, Linux 6.14+)".into(),
    }
}

/// The fuse module parameter that switches FUSE over io_uring on.
pub const URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

#[allow(clippy::too_many_arguments)]
fn worker<F: FileSystem>(
    fd: &OwnedFd,
    wake: &OwnedFd,
    d: &Dispatcher<F>,
    stats: &SessionStats,
    interrupts: &[InterruptInbox],
    bufsize: usize,
    outsize: usize,
) {
    let mut inbuf = AlignedBox::new(bufsize, DEV_BUF_ALIGN);
    let mut outbuf = AlignedBox::new(outsize, DEV_BUF_ALIGN);
    let out = outbuf.as_mut_slice();
    loop {
        // Sleep until a request or a hand-over (which must find this thread out of read(2):
        // the next server reads the same descriptor).
        let mut pfd = [
            libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfd structs.
        let r = unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) };
        if r < 0 {
            continue;
        }
        if pfd[1].revents != 0 {
            return;
        }
        if pfd[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 && pfd[0].revents & libc::POLLIN == 0
        {
            return;
        }
        if pfd[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let buf = inbuf.as_mut_slice();
        let n = match read_fd(fd, buf) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                Some(libc::ENODEV) => return,
                _ => {
                    log::error!("reading /dev/fuse: {e}; worker stops");
                    return;
                }
            },
        };
        let data = &buf[..n];
        let req = match request::parse(data) {
            Ok(r) => r,
            Err(e) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                match request::parse_header(data) {
                    Ok(h) if !no_reply(&h) => {
                        log::warn!(
                            "malformed {} request (unique {}): {e}; answered EIO",
                            opcode::name(h.opcode),
                            h.unique
                        );
                        let _ = send_reply(fd, out, h.unique, -libc::EIO, 0);
                    }
                    Ok(h) => log::warn!("malformed {} request dropped: {e}", opcode::name(h.opcode)),
                    Err(_) => log::warn!("unreadable request of {n} bytes dropped: {e}"),
                }
                continue;
            }
        };
        stats.record(req.header.opcode);
        if let Operation::Interrupt { arg } = &req.op {
            // The request runs on some queue: tell them all; the one serving it cancels it.
            for inbox in interrupts {
                inbox.push(arg.unique);
            }
            continue;
        }
        let served =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| block_on(d.dispatch(&req, &mut out[16..]))));
        let outcome = match served {
            Ok(o) => o,
            Err(_) => {
                stats.panics.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "the file system panicked serving {} (unique {}); answered EIO",
                    opcode::name(req.header.opcode),
                    req.unique()
                );
                if no_reply(&req.header) {
                    Outcome::NoReply
                } else {
                    Outcome::Reply { error: -libc::EIO, len: 0 }
                }
            }
        };
        match outcome {
            Outcome::Reply { error, len } => {
                if error != 0 {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(e) = send_reply(fd, out, req.unique(), error, len) {
                    if e.raw_os_error() == Some(libc::ENODEV) {
                        return;
                    }
                    log::warn!("writing reply to {}: {e}", opcode::name(req.header.opcode));
                }
            }
            Outcome::NoReply => {}
        }
    }
}

fn no_reply(h: &FuseInHeader) -> bool {
    matches!(h.opcode, opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT)
}
