//! Live upgrade: the running server hands its mount to a new server process without
//! unmounting (`ringfs upgrade MOUNTPOINT`, or SIGHUP).
//!
//! The old server starts the new binary with the same command line and one end of a
//! `SOCK_SEQPACKET` socket pair as descriptor 3 (`RINGFS_TAKEOVER_FD=3`). Messages:
//!
//! 1. old → new `HELLO`: the state version, the device number, the upgrade counters, the
//!    kernel's INIT request and the reply the old server sent; with the /dev/fuse descriptor
//!    (and the metrics listener, when there is one). The new server refuses a version it cannot
//!    read (`REFUSE:reason`; the old one never stopped serving) or an INIT it would answer
//!    differently; else it opens the backing directory, starts its queues behind a gate (io_uring
//!    entries are registered: the kernel may queue requests on them, which wait) and answers
//!    `READY`.
//! 2. The old server drains ([`ringfs_transport::Control::drain`]): it takes no new request and
//!    answers every request it took. Then it sends its file-system state
//!    ([`PassthroughFs::export_live`]) in `S` chunks, the descriptors in `F` batches, and `E` with
//!    the instant (CLOCK_MONOTONIC) it started draining.
//! 3. The new server takes the state over, opens its gate and answers `RESUMED`; the old one
//!    tells its watchdog to stand down and exits. A `REFUSE` or a lost peer at this point: the old
//!    server serves again (see docs/reliability.md for what that costs on io_uring).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fs::PassthroughFs;

/// The state version this build writes, and the newest it reads.
pub const STATE_VERSION: u32 = 1;

/// Environment variable naming the descriptor of the hand-over socket in a new server.
pub const TAKEOVER_ENV: &str = "RINGFS_TAKEOVER_FD";

/// Test hook: the state version this process reads (and announces); default [`STATE_VERSION`].
/// A value below 1 makes a build that understands no state, to test the refusal.
const VERSION_ENV: &str = "RINGFS_STATE_VERSION";

/// How long the old server waits for the new one to get ready, and then to take over.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Upgrade counters of this mount (carried from server to server).
pub static UPGRADES_OK: AtomicU64 = AtomicU64::new(0);
/// Upgrades the new server refused (version, INIT, state).
pub static UPGRADES_REFUSED: AtomicU64 = AtomicU64::new(0);
/// Upgrades that failed otherwise (the new binary would not start, died, timed out).
pub static UPGRADES_FAILED: AtomicU64 = AtomicU64::new(0);
/// Time from the start of the last drain to the new server serving, in microseconds.
pub static LAST_PAUSE_US: AtomicU64 = AtomicU64::new(0);

fn state_version() -> u32 {
    std::env::var(VERSION_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(STATE_VERSION)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Largest message (state chunk) and descriptor batch.
const CHUNK: usize = 48 * 1024;
const FD_BATCH: usize = 200;

fn send_msg(sock: &OwnedFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    ringfs_transport::fdpass::send(sock, data, fds)
}

/// Receives one message (empty: the peer is gone) and the descriptors it carries; waits at most
/// `timeout`.
fn recv_msg(sock: &OwnedFd, timeout: Duration) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut pfd = [rustix::event::PollFd::new(sock, rustix::event::PollFlags::IN)];
    let timeout =
        rustix::event::Timespec::try_from(timeout).unwrap_or(rustix::event::Timespec { tv_sec: i64::MAX, tv_nsec: 0 });
    if rustix::event::poll(&mut pfd, Some(&timeout))? == 0 {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "the other server did not answer in time"));
    }
    ringfs_transport::fdpass::recv(sock, CHUNK + 64, FD_BATCH)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> io::Result<&'a [u8]> {
    if b.len() < n {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated hand-over message"));
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

fn take_u32(b: &mut &[u8]) -> io::Result<u32> {
    Ok(u32::from_le_bytes(take(b, 4)?.try_into().unwrap_or_default()))
}

fn take_u64(b: &mut &[u8]) -> io::Result<u64> {
    Ok(u64::from_le_bytes(take(b, 8)?.try_into().unwrap_or_default()))
}

fn take_bytes<'a>(b: &mut &'a [u8]) -> io::Result<&'a [u8]> {
    let n = take_u32(b)? as usize;
    take(b, n)
}

/// Where the control socket of the mount on `mountpoint` (canonical) lives.
pub fn control_path(mountpoint: &Path) -> PathBuf {
    let mut h = siphasher::sip::SipHasher24::new_with_keys(0x7269_6e67_6673, 0x6374_6c00);
    use std::hash::Hasher;
    h.write(mountpoint.as_os_str().as_encoded_bytes());
    // SAFETY: geteuid has no preconditions.
    let dir = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/run/ringfs")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR").map_or_else(std::env::temp_dir, PathBuf::from).join("ringfs")
    };
    dir.join(format!("{:016x}.ctl", h.finish()))
}

/// What the main thread does once its session has drained for an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The new server serves: stand the watchdog down and exit.
    HandedOver,
    /// The upgrade did not happen: serve again.
    Resume,
}

/// What the upgrade thread hears while the session drains.
enum DrainMsg {
    /// Every queue ended: the state can be taken.
    Drained,
}

/// The old server's side of an upgrade.
pub struct Upgrader {
    control: Arc<ringfs_transport::Control>,
    fuse_fd: OwnedFd,
    init: (Vec<u8>, Vec<u8>),
    dev: u64,
    fs: Arc<PassthroughFs>,
    metrics_listener: Option<OwnedFd>,
    /// The session serves FUSE over io_uring.
    uring: bool,
    /// The next server's registration-round eventfds (asked, done per io_uring queue).
    round_fds: Arc<Mutex<Vec<OwnedFd>>>,
    /// The control socket's listener (handed over too, so no `ringfs upgrade` finds no one).
    control_listener: Mutex<Option<OwnedFd>>,
    busy: Mutex<()>,
    /// Main thread and queues → upgrade thread: the session drained, or a draining io_uring
    /// queue asks for a registration round.
    drained: (Mutex<mpsc::Sender<DrainMsg>>, Mutex<mpsc::Receiver<DrainMsg>>),
    /// Upgrade thread → main thread: what to do next.
    verdict: (Mutex<mpsc::Sender<Verdict>>, Mutex<mpsc::Receiver<Verdict>>),
}

impl Upgrader {
    /// The upgrader of a serving session.
    pub fn new(
        control: Arc<ringfs_transport::Control>,
        fuse_fd: BorrowedFd<'_>,
        init: (Vec<u8>, Vec<u8>),
        dev: u64,
        fs: Arc<PassthroughFs>,
        metrics_listener: Option<OwnedFd>,
        uring: bool,
    ) -> io::Result<Upgrader> {
        let (dtx, drx) = mpsc::channel::<DrainMsg>();
        let (vtx, vrx) = mpsc::channel();
        let round_fds: Arc<Mutex<Vec<OwnedFd>>> = Arc::default();
        let fds = round_fds.clone();
        control.set_round_hook(Arc::new(move |qid| {
            let g = fds.lock().unwrap_or_else(|e| e.into_inner());
            let (asked, done) = (g.get(2 * qid)?, g.get(2 * qid + 1)?);
            let one = 1u64;
            // SAFETY: writing 8 bytes to the next server's eventfd.
            unsafe { libc::write(asked.as_raw_fd(), (&one as *const u64).cast(), 8) };
            Some(done.as_raw_fd())
        }));
        Ok(Upgrader {
            control,
            fuse_fd: fuse_fd.try_clone_to_owned()?,
            init,
            dev,
            fs,
            metrics_listener,
            uring,
            round_fds,
            control_listener: Mutex::new(None),
            busy: Mutex::new(()),
            drained: (Mutex::new(dtx), Mutex::new(drx)),
            verdict: (Mutex::new(vtx), Mutex::new(vrx)),
        })
    }

    /// A duplicate of the control socket's listener, once serving (for crash failover).
    pub fn control_listener_fd(&self) -> Option<OwnedFd> {
        self.control_listener.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|l| l.try_clone().ok())
    }

    /// Called by the main thread when its session returned `Drained`: hands the state over and
    /// says whether to exit or to serve again.
    pub fn on_drained(&self) -> Verdict {
        let _ = self.drained.0.lock().unwrap_or_else(|e| e.into_inner()).send(DrainMsg::Drained);
        self.verdict.1.lock().unwrap_or_else(|e| e.into_inner()).recv().unwrap_or(Verdict::Resume)
    }

    /// After a successful [`upgrade`](Self::upgrade), once its caller has been answered: lets
    /// the main thread stand the watchdog down and exit.
    pub fn handed_over(&self) {
        self.tell_main(Verdict::HandedOver);
    }

    fn tell_main(&self, v: Verdict) {
        let _ = self.verdict.0.lock().unwrap_or_else(|e| e.into_inner()).send(v);
    }

    /// Runs one upgrade to the binary at `binary` (default: this process's executable as now
    /// installed). Returns the new server's pid and the pause, or why not. Blocks. On success the
    /// caller must call [`handed_over`](Self::handed_over) (this process then exits).
    ///
    /// On FUSE over io_uring the hand-over is refused unless `force`: the kernel cannot retire
    /// a ring entry, so a request it gives one of the old server's entries while they are torn
    /// down fails with ECANCELED (rare; docs/reliability.md, "Live upgrade").
    pub fn upgrade(&self, binary: Option<PathBuf>, force: bool) -> Result<(u32, Duration), String> {
        let Ok(_one) = self.busy.try_lock() else {
            return Err("failed: an upgrade is already running".into());
        };
        if self.uring && !force {
            UPGRADES_REFUSED.fetch_add(1, Ordering::Relaxed);
            let e = "refused: the mount uses FUSE over io_uring, where this kernel cannot take ring entries back \
                     without a small chance of failing a request in flight (ECANCELED); use the classic channel \
                     (transport=dev-fuse) for upgrades that never fail a system call, or `ringfs upgrade --force`"
                .to_string();
            log::warn!("upgrade: {e}");
            return Err(e);
        }
        let r = self.run(binary);
        match &r {
            Ok((pid, pause)) => log::info!("upgrade: pid {pid} serves now (pause {:.1} ms)", pause.as_secs_f64() * 1e3),
            Err(e) => log::warn!("upgrade: {e}; this server goes on"),
        }
        r
    }

    fn run(&self, binary: Option<PathBuf>) -> Result<(u32, Duration), String> {
        let fail = |e: String| {
            UPGRADES_FAILED.fetch_add(1, Ordering::Relaxed);
            format!("failed: {e}")
        };
        let refuse = |e: String| {
            UPGRADES_REFUSED.fetch_add(1, Ordering::Relaxed);
            format!("refused: {e}")
        };
        let binary = match binary {
            Some(b) => b,
            None => current_exe().map_err(|e| fail(format!("this server's executable: {e}")))?,
        };
        let mut fds = [0; 2];
        // SAFETY: valid array.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) }
            != 0
        {
            return Err(fail(format!("socketpair: {}", io::Error::last_os_error())));
        }
        // SAFETY: fresh descriptors we own.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        let mut cmd = std::process::Command::new(&binary);
        cmd.args(&args).env(TAKEOVER_ENV, "3").stdin(std::process::Stdio::null());
        let child_fd = theirs.as_raw_fd();
        // SAFETY: dup2 and setsid are async-signal-safe; nothing else runs before exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::dup2(child_fd, 3) < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| fail(format!("starting {}: {e}", binary.display())))?;
        drop(theirs);
        let pid = child.id();
        // Reaped by a thread of its own once it exits (it outlives us when all goes well).
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let control = self.control_listener.lock().unwrap_or_else(|e| e.into_inner());
        let mut hello_fds = vec![self.fuse_fd.as_raw_fd()];
        hello_fds.extend(self.metrics_listener.as_ref().map(|l| l.as_raw_fd()));
        hello_fds.extend(control.as_ref().map(|l| l.as_raw_fd()));
        let flags = u32::from(self.metrics_listener.is_some()) | (u32::from(control.is_some()) << 1);
        drop(control);
        let hello = encode_hello(&(
            state_version(),
            [
                self.dev,
                UPGRADES_OK.load(Ordering::Relaxed),
                UPGRADES_REFUSED.load(Ordering::Relaxed),
                UPGRADES_FAILED.load(Ordering::Relaxed),
            ],
            self.init.0.clone(),
            self.init.1.clone(),
            flags,
        ));
        send_msg(&ours, &hello, &hello_fds).map_err(|e| fail(format!("sending to pid {pid}: {e}")))?;
        match recv_msg(&ours, PEER_TIMEOUT) {
            Ok((m, fds)) if m == b"READY" => {
                *self.round_fds.lock().unwrap_or_else(|e| e.into_inner()) = fds;
            }
            Ok((m, _)) if m.starts_with(b"REFUSE:") => {
                return Err(refuse(format!("pid {pid}: {}", String::from_utf8_lossy(&m[7..]))));
            }
            Ok((m, _)) if m.is_empty() => return Err(fail(format!("pid {pid} exited before taking over"))),
            Ok(_) => return Err(fail(format!("pid {pid} sent an unexpected message"))),
            Err(e) => {
                kill(pid);
                return Err(fail(format!("pid {pid}: {e}")));
            }
        }
        // From here the connection is handed over or this server serves again.
        let started = Instant::now();
        let t0 = monotonic_ns();
        // Stale messages of an earlier attempt.
        while self.drained.1.lock().unwrap_or_else(|e| e.into_inner()).try_recv().is_ok() {}
        self.control.drain();
        while !matches!(self.drained.1.lock().unwrap_or_else(|e| e.into_inner()).recv(), Ok(DrainMsg::Drained) | Err(_))
        {
        }
        log::debug!("upgrade: drained in {:?}", started.elapsed());
        let sent = self.send_state(&ours, t0);
        let answer = sent.and_then(|()| recv_msg(&ours, PEER_TIMEOUT));
        match answer {
            Ok((m, _)) if m == b"RESUMED" => {
                let pause = started.elapsed();
                UPGRADES_OK.fetch_add(1, Ordering::Relaxed);
                LAST_PAUSE_US.store(pause.as_micros() as u64, Ordering::Relaxed);
                // The main thread exits at `handed_over`: after the caller has answered.
                Ok((pid, pause))
            }
            other => {
                kill(pid);
                self.tell_main(Verdict::Resume);
                Err(match other {
                    Ok((m, _)) if m.starts_with(b"REFUSE:") => {
                        refuse(format!("pid {pid}: {}", String::from_utf8_lossy(&m[7..])))
                    }
                    Ok((m, _)) if m.is_empty() => fail(format!("pid {pid} exited while taking over")),
                    Ok(_) => fail(format!("pid {pid} sent an unexpected message")),
                    Err(e) => fail(format!("pid {pid}: {e}")),
                })
            }
        }
    }

    fn send_state(&self, sock: &OwnedFd, t0: u64) -> io::Result<()> {
        let (state, fds) = self.fs.export_live();
        for chunk in state.chunks(CHUNK) {
            let mut m = Vec::with_capacity(chunk.len() + 1);
            m.push(b'S');
            m.extend_from_slice(chunk);
            send_msg(sock, &m, &[])?;
        }
        for batch in fds.chunks(FD_BATCH) {
            let raw: Vec<RawFd> = batch.iter().map(|f| f.as_raw_fd()).collect();
            send_msg(sock, b"F", &raw)?;
        }
        let mut end = b"E".to_vec();
        end.extend_from_slice(&t0.to_le_bytes());
        end.extend_from_slice(&(state.len() as u64).to_le_bytes());
        end.extend_from_slice(&(fds.len() as u64).to_le_bytes());
        send_msg(sock, &end, &[])
    }
}

fn kill(pid: u32) {
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// This process's executable as now installed: `/proc/self/exe` names the file we were started
/// from (" (deleted)" once a package upgrade replaced it); the path is what counts.
fn current_exe() -> io::Result<PathBuf> {
    let p = std::fs::read_link("/proc/self/exe")?;
    let s = p.as_os_str().as_encoded_bytes();
    let s = s.strip_suffix(b" (deleted)").unwrap_or(s);
    // SAFETY: a prefix of bytes that came from an OsStr, cut at an ASCII boundary.
    Ok(PathBuf::from(unsafe { std::ffi::OsStr::from_encoded_bytes_unchecked(s) }))
}

/// HELLO's fields: state version, (device, ok, refused, failed), INIT request, INIT reply, flags
/// (1: a metrics listener travels, 2: a control listener travels).
pub(crate) type HelloFields = (u32, [u64; 4], Vec<u8>, Vec<u8>, u32);

/// The HELLO message: `HELLO`, the state version (u32), then the rest of [`HelloFields`]
/// (u64 words, u32-length-prefixed INIT request and reply, u32 flags), little-endian. The
/// version comes first so that any build can read it and refuse what it does not understand.
pub(crate) fn encode_hello(f: &HelloFields) -> Vec<u8> {
    let mut hello = b"HELLO".to_vec();
    hello.extend_from_slice(&f.0.to_le_bytes());
    for w in f.1 {
        hello.extend_from_slice(&w.to_le_bytes());
    }
    put_bytes(&mut hello, &f.2);
    put_bytes(&mut hello, &f.3);
    hello.extend_from_slice(&f.4.to_le_bytes());
    hello
}

/// Reads a HELLO written by [`encode_hello`].
pub(crate) fn decode_hello(mut b: &[u8]) -> io::Result<HelloFields> {
    let b = &mut b;
    if take(b, 5)? != b"HELLO" {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a HELLO"));
    }
    let v = take_u32(b)?;
    let words = [take_u64(b)?, take_u64(b)?, take_u64(b)?, take_u64(b)?];
    let (init_in, init_out) = (take_bytes(b)?.to_vec(), take_bytes(b)?.to_vec());
    let flags = take_u32(b)?;
    Ok((v, words, init_in, init_out, flags))
}

/// What the old server handed over first.
pub struct Hello {
    /// The format of the state that follows (one this build reads).
    pub version: u32,
    /// The mount's /dev/fuse descriptor.
    pub fuse_fd: OwnedFd,
    /// The mount's device number.
    pub dev: u64,
    /// The kernel's INIT request, as received.
    pub init_in: Vec<u8>,
    /// The reply the first server sent.
    pub init_out: Vec<u8>,
    /// The metrics listener of the old server, if it had one.
    pub metrics_listener: Option<OwnedFd>,
    /// The old server's control socket listener, if it had one.
    pub control_listener: Option<OwnedFd>,
}

/// The new server's side: the socket to the old one.
pub struct Takeover {
    sock: OwnedFd,
}

impl Takeover {
    /// The hand-over socket named by [`TAKEOVER_ENV`], if this process was started for a takeover.
    pub fn from_env() -> Option<Takeover> {
        let fd: RawFd = std::env::var(TAKEOVER_ENV).ok()?.parse().ok()?;
        std::env::remove_var(TAKEOVER_ENV);
        // SAFETY: descriptor 3 was set up by the old server for us; nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fcntl on the descriptor we now own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Some(Takeover { sock })
    }

    /// Reads `HELLO`; refuses (and says so to the old server) a state version this build cannot
    /// read.
    pub fn hello(&self) -> Result<Hello, String> {
        let (m, mut fds) = recv_msg(&self.sock, PEER_TIMEOUT).map_err(|e| format!("hand-over socket: {e}"))?;
        let (version, words, init_in, init_out, flags) = match decode_hello(&m) {
            Ok(x) => x,
            Err(e) => return Err(self.refuse(&format!("malformed HELLO: {e}"))),
        };
        let readable = state_version();
        if version == 0 || version > readable || readable == 0 {
            return Err(self.refuse(&format!(
                "state version {version} is not understood by this build (it reads versions 1 to {readable})"
            )));
        }
        if fds.is_empty() {
            return Err(self.refuse("no /dev/fuse descriptor"));
        }
        UPGRADES_OK.store(words[1], Ordering::Relaxed);
        UPGRADES_REFUSED.store(words[2], Ordering::Relaxed);
        UPGRADES_FAILED.store(words[3], Ordering::Relaxed);
        let fuse_fd = fds.remove(0);
        let mut rest = fds.into_iter();
        let metrics_listener = if flags & 1 != 0 { rest.next() } else { None };
        let control_listener = if flags & 2 != 0 { rest.next() } else { None };
        Ok(Hello { version, fuse_fd, dev: words[0], init_in, init_out, metrics_listener, control_listener })
    }

    /// Tells the old server no, and returns the reason (for the caller's error).
    pub fn refuse(&self, why: &str) -> String {
        let mut m = b"REFUSE:".to_vec();
        m.extend_from_slice(why.as_bytes());
        let _ = send_msg(&self.sock, &m, &[]);
        format!("upgrade refused: {why}")
    }

    /// Says the queues are set up, then receives the state and its descriptors. Returns them
    /// and the instant the old server started draining (CLOCK_MONOTONIC ns).
    /// `round_fds`: the registration-round eventfds of the queues, for the old server.
    pub fn ready_and_receive(&self, round_fds: &[RawFd]) -> Result<(Vec<u8>, Vec<OwnedFd>, u64), String> {
        send_msg(&self.sock, b"READY", round_fds).map_err(|e| format!("hand-over socket: {e}"))?;
        let mut state = Vec::new();
        let mut fds = Vec::new();
        loop {
            let (m, got) = recv_msg(&self.sock, PEER_TIMEOUT).map_err(|e| format!("hand-over socket: {e}"))?;
            match m.first() {
                Some(b'S') => state.extend_from_slice(&m[1..]),
                Some(b'F') => fds.extend(got),
                Some(b'E') => {
                    let mut b = &m[1..];
                    let t0 = take_u64(&mut b).map_err(|e| e.to_string())?;
                    let len = take_u64(&mut b).map_err(|e| e.to_string())?;
                    let nfds = take_u64(&mut b).map_err(|e| e.to_string())?;
                    if len != state.len() as u64 || nfds != fds.len() as u64 {
                        return Err("state or descriptors lost in transit".into());
                    }
                    return Ok((state, fds, t0));
                }
                _ => return Err("the old server went away during the hand-over".into()),
            }
        }
    }

    /// Says this server serves now; records the pause. `counted` runs once the counters are
    /// updated, before the old server (and so the `ringfs upgrade` caller) hears of it.
    pub fn resumed(&self, t0: u64, counted: impl FnOnce()) {
        UPGRADES_OK.fetch_add(1, Ordering::Relaxed);
        LAST_PAUSE_US.store(monotonic_ns().saturating_sub(t0) / 1000, Ordering::Relaxed);
        counted();
        let _ = send_msg(&self.sock, b"RESUMED", &[]);
    }
}

/// Serves `ringfs upgrade` requests on the mount's control socket (one line in, one line out:
/// `upgrade force|safe [BINARY]` → `ok PID PAUSE_US` or `refused: ...`/`failed: ...`).
/// `inherited`: the listener the previous server handed over (a live upgrade), used as it is.
pub fn serve_control(path: &Path, upgrader: Arc<Upgrader>, inherited: Option<OwnedFd>) -> io::Result<()> {
    let listener = match inherited {
        Some(fd) => UnixListener::from(fd),
        None => {
            if let Some(dir) = path.parent() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            }
            // A stale socket of a server that died: this mount's server is us now.
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path)?
        }
    };
    *upgrader.control_listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(OwnedFd::from(listener.try_clone()?));
    std::thread::Builder::new().name("ringfs-control".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            if handle_client(conn, &upgrader) {
                // Handed over: the next server accepts on this socket now.
                return;
            }
        }
    })?;
    Ok(())
}

/// Serves one client; true when the mount was handed over.
fn handle_client(mut conn: UnixStream, upgrader: &Upgrader) -> bool {
    use std::io::{BufRead, Write};
    // Only root (or the server's own user) may ask.
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    if cred.uid != 0 && cred.uid != unsafe { libc::geteuid() } {
        let _ = writeln!(conn, "failed: permission denied");
        return false;
    }
    let mut line = String::new();
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    if std::io::BufReader::new(&conn).read_line(&mut line).is_err() {
        return false;
    }
    let mut words = line.trim_end().splitn(3, ' ');
    let (reply, done) = match (words.next(), words.next(), words.next()) {
        (Some("upgrade"), Some(force), bin) => {
            match upgrader.upgrade(bin.filter(|b| !b.is_empty()).map(PathBuf::from), force == "force") {
                Ok((pid, pause)) => (format!("ok {pid} {}", pause.as_micros()), true),
                Err(e) => (e, false),
            }
        }
        _ => ("failed: unknown request".into(), false),
    };
    let _ = writeln!(conn, "{reply}");
    let _ = conn.flush();
    if done {
        upgrader.handed_over();
    }
    done
}

/// `ringfs upgrade MOUNTPOINT [--binary PATH]`: asks the server of the mount to upgrade and
/// prints its answer. Ok with the line on success.
pub fn request(mountpoint: &Path, binary: Option<&Path>, force: bool, timeout: Duration) -> Result<String, String> {
    use std::io::{BufRead, Write};
    let mp = std::fs::canonicalize(mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let path = control_path(&mp);
    let mut conn = UnixStream::connect(&path)
        .map_err(|e| format!("no ringfs server answers for {} ({}: {e})", mp.display(), path.display()))?;
    let _ = conn.set_read_timeout(Some(timeout));
    let bin = match binary {
        Some(b) => std::fs::canonicalize(b).map_err(|e| format!("{}: {e}", b.display()))?,
        None => PathBuf::new(),
    };
    let force = if force { "force" } else { "safe" };
    writeln!(conn, "upgrade {force} {}", bin.display()).map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufReader::new(&conn).read_line(&mut line).map_err(|e| format!("waiting for the server: {e}"))?;
    let line = line.trim_end().to_string();
    if line.starts_with("ok ") {
        Ok(line)
    } else if line.is_empty() {
        Err("the server closed the connection".into())
    } else {
        Err(line)
    }
}

#[cfg(test)]
mod tests {
    //! The state format across builds: the fixtures in `server/fixtures/state/` were written by
    //! the builds of each state version (`vN.hello`: the HELLO, `vN.live`: the file system's
    //! state). This build must write exactly the fixture of [`STATE_VERSION`] (else the format
    //! changed without a version bump) and read every fixture from version 1 on (else a build
    //! that upgrades from an older one would refuse it).

    use super::*;
    use crate::fs::live_state::{self, LiveState, NodeRecord, OpenRecord};

    /// Set to write the fixture of a new state version (never rewrites an existing one).
    const WRITE_ENV: &str = "RINGFS_WRITE_STATE_FIXTURE";

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/state").join(name)
    }

    /// What the fixtures of `version` hold, as this build reads them. A new version that adds
    /// fields keeps the older versions' samples as they were, with what its reader fills in
    /// for the missing fields.
    fn sample_state(version: u32) -> LiveState {
        assert!((1..=STATE_VERSION).contains(&version));
        let handle = |seed: u8| (0..12).map(|i| seed.wrapping_mul(31).wrapping_add(i)).collect::<Vec<u8>>();
        LiveState {
            handles: live_state::HandleState {
                root_key: (0x803, 2),
                gen_key: [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210],
                next_id: 1000,
                nodes: vec![(17, handle(1)), (42, handle(2))],
            },
            nodes: vec![
                // The root: a directory with a handle.
                NodeRecord {
                    id: 1,
                    key: (0x803, 2),
                    kind: libc::S_IFDIR,
                    lookups: 1,
                    handle: Some(handle(3)),
                    fd: false,
                },
                // A file reopened by handle.
                NodeRecord {
                    id: 17,
                    key: (0x803, 1234),
                    kind: libc::S_IFREG,
                    lookups: 3,
                    handle: Some(handle(1)),
                    fd: false,
                },
                // A node without a handle: its descriptor travels.
                NodeRecord { id: 99, key: (0x804, 7), kind: libc::S_IFREG, lookups: 1, handle: None, fd: true },
            ],
            open: vec![OpenRecord { fh: 5, node: 17, dir: false }, OpenRecord { fh: 1 << 40, node: 1, dir: true }],
            passthrough: vec![(17, 3, 2), (99, 0, 1)],
        }
    }

    fn sample_hello(version: u32) -> HelloFields {
        assert!((1..=STATE_VERSION).contains(&version));
        (version, [0x2d, 7, 1, 0], b"init request bytes".to_vec(), b"init reply".to_vec(), 3)
    }

    #[test]
    fn this_build_writes_the_fixture_of_its_state_version() {
        let v = STATE_VERSION;
        for (name, written) in [
            (format!("v{v}.hello"), encode_hello(&sample_hello(v))),
            (format!("v{v}.live"), live_state::encode(&sample_state(v))),
        ] {
            let path = fixture(&name);
            match std::fs::read(&path) {
                Ok(golden) => assert!(
                    golden == written,
                    "{}: the state format of version {v} changed: a build of this version writes other bytes. \
                     Bump STATE_VERSION (server/src/upgrade.rs), keep the reader of version {v} in \
                     live_state::decode, and write the new version's fixtures ({WRITE_ENV}=1)",
                    path.display()
                ),
                Err(e) if e.kind() == io::ErrorKind::NotFound && std::env::var_os(WRITE_ENV).is_some() => {
                    std::fs::write(&path, &written).expect("write the fixture");
                }
                Err(e) => panic!(
                    "{}: {e}: no fixture for state version {v}; write it with {WRITE_ENV}=1 and check it in",
                    path.display()
                ),
            }
        }
    }

    #[test]
    fn this_build_reads_the_fixtures_of_every_state_version() {
        for v in 1..=STATE_VERSION {
            let hello = std::fs::read(fixture(&format!("v{v}.hello"))).expect("HELLO fixture");
            let fields = decode_hello(&hello).expect("HELLO of an older build");
            assert_eq!(fields.0, v, "the version is HELLO's first field");
            assert_eq!(fields, sample_hello(v));
            let live = std::fs::read(fixture(&format!("v{v}.live"))).expect("state fixture");
            assert_eq!(live_state::decode(v, &live), Ok(sample_state(v)), "state version {v}");
        }
        // A version from a newer build is refused, and so is a state cut short.
        assert!(live_state::decode(STATE_VERSION + 1, &[]).is_err());
        let live = std::fs::read(fixture(&format!("v{STATE_VERSION}.live"))).expect("state fixture");
        for cut in [1, 8, live.len() / 2, live.len() - 1] {
            assert!(live_state::decode(STATE_VERSION, &live[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = live.clone();
        longer.push(0);
        assert!(live_state::decode(STATE_VERSION, &longer).is_err());
    }
}
