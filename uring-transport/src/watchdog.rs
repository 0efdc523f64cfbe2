//! The watchdog: a small process, forked before any thread exists, that lazily unmounts the
//! mount when the server dies without unmounting (kill -9, a crash), so the mount point never
//! stays "Transport endpoint is not connected".
//!
//! With crash failover armed ([`WatchdogLink::arm`]), it is the mount's supervisor instead: it
//! holds the descriptors the server gave it (the mount's /dev/fuse descriptor and whatever else
//! the server needs again: opaque to the watchdog), so the connection outlives the server, and
//! when the server dies it starts the same binary with the same arguments and
//! `RINGFS_FAILOVER_FD` naming a socket on which it hands those descriptors over
//! ([`Failover::from_env`]). The new server re-arms it; a server that dies before re-arming
//! (it could not start), a mount that is gone, or too many failovers in a row end in the lazy
//! unmount.
//!
//! Protocol over a `SOCK_SEQPACKET` socket pair, server to watchdog: `M` + 8-byte device number
//! once mounted; `D` when the server has unmounted cleanly (or handed the mount to another
//! server); `F` + opaque bytes with descriptors (`SCM_RIGHTS`): arm failover with these (they
//! replace any held before). On end-of-file without `D`, the watchdog fails over (armed) or
//! detaches the mount point if it still carries the server's mount (same device number).
//! Watchdog to a new server: `H` + the instant the old one was found dead (CLOCK_MONOTONIC ns,
//! 8 bytes) + the bytes of the last `F`, with its descriptors.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::mount::parse_mountinfo;

/// Environment variable naming the descriptor of the socket to the watchdog in a server started
/// for a failover.
pub const FAILOVER_ENV: &str = "RINGFS_FAILOVER_FD";

/// Largest `F`/`H` message (bytes) and descriptor count.
const MAX_MSG: usize = 64 * 1024;
const MAX_FDS: usize = 250;

/// Failovers without a server that re-armed in between before the watchdog gives up.
const MAX_FAILED_STARTS: u32 = 3;
/// At most this many failovers within [`FAILOVER_WINDOW`].
const MAX_FAILOVERS: usize = 20;
const FAILOVER_WINDOW: Duration = Duration::from_secs(60);

/// The server's end of the watchdog socket.
#[derive(Debug)]
pub struct Watchdog {
    sock: OwnedFd,
    /// The watchdog's pid when we forked it (reaped at [`done`](Self::done)); `None` when the
    /// watchdog started us (a failover): it is our parent.
    pid: Option<libc::pid_t>,
}

/// A second handle on the watchdog socket, for arming failover from any thread.
#[derive(Debug)]
pub struct WatchdogLink {
    sock: OwnedFd,
}

/// What the watchdog hands a server it started for a failover.
#[derive(Debug)]
pub struct Failover {
    /// The socket to the watchdog (becomes this server's [`Watchdog`]).
    pub watchdog: Watchdog,
    /// When the watchdog found the previous server dead (CLOCK_MONOTONIC, ns).
    pub died_at_ns: u64,
    /// The bytes the previous server armed the watchdog with.
    pub state: Vec<u8>,
    /// The descriptors it armed it with, in order.
    pub fds: Vec<OwnedFd>,
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    Ok((a, b))
}

/// Sends one message with descriptors.
fn send(sock: &OwnedFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS || data.len() > MAX_MSG {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "watchdog message too large"));
    }
    crate::fdpass::send(sock, data, fds)
}

/// Receives one message (empty: the peer is gone) and its descriptors; blocks.
fn recv(sock: &OwnedFd) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    crate::fdpass::recv(sock, MAX_MSG + 64, MAX_FDS)
}

impl Watchdog {
    /// Forks the watchdog for `mountpoint`. Must be called before any thread is started.
    ///
    /// With `detach`, the watchdog lets go of standard descriptors that a waiting parent may
    /// read to end-of-file (see [`detach_stdio`]): use it for a server that runs in the
    /// background.
    pub fn spawn(mountpoint: &Path, detach: bool) -> io::Result<Watchdog> {
        let (ours, theirs) = socketpair()?;
        let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: the process is single-threaded here (documented precondition), so the child
        // may run arbitrary code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            drop(ours);
            if detach {
                detach_stdio();
            }
            let code = watch(theirs, mountpoint, &target);
            // SAFETY: leaving the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        drop(theirs);
        Ok(Watchdog { sock: ours, pid: Some(pid) })
    }

    /// Tells the watchdog which mount to guard.
    pub fn mounted(&mut self, dev: u64) -> io::Result<()> {
        mounted_msg(&self.sock, dev)
    }

    /// A handle for arming failover from another thread.
    pub fn link(&self) -> io::Result<WatchdogLink> {
        Ok(WatchdogLink { sock: self.sock.try_clone()? })
    }

    /// Tells the watchdog the server unmounted cleanly (or handed the mount over), and reaps it
    /// if we started it.
    pub fn done(self) {
        let _ = send(&self.sock, b"D", &[]);
        drop(self.sock);
        if let Some(pid) = self.pid.and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        }
    }
}

/// The `M` message: the mount (by device number) the watchdog guards from now on.
fn mounted_msg(sock: &OwnedFd, dev: u64) -> io::Result<()> {
    let mut msg = [0u8; 9];
    msg[0] = b'M';
    msg[1..].copy_from_slice(&dev.to_ne_bytes());
    send(sock, &msg, &[])
}

impl WatchdogLink {
    /// Tells the watchdog which mount to guard ([`Watchdog::mounted`] from another thread): a
    /// server taking a mount over by a live upgrade says so only once the mount is its own, so
    /// that its watchdog never detaches a mount another server still serves.
    pub fn mounted(&self, dev: u64) -> io::Result<()> {
        mounted_msg(&self.sock, dev)
    }

    /// Arms (or re-arms) failover: the watchdog keeps `fds` (duplicates: the caller keeps its
    /// own) and `state`, replacing what it held, and hands both to the server it starts when
    /// this one dies. Descriptors in flight are held by the socket: once this returns, a
    /// crash cannot lose them.
    pub fn arm(&self, state: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(state.len() + 1);
        msg.push(b'F');
        msg.extend_from_slice(state);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send(&self.sock, &msg, &raw)
    }
}

impl Failover {
    /// The hand-over from the watchdog, if this process was started for a failover
    /// ([`FAILOVER_ENV`]). Reads the `H` message.
    pub fn from_env() -> Option<io::Result<Failover>> {
        let fd: RawFd = std::env::var(FAILOVER_ENV).ok()?.parse().ok()?;
        std::env::remove_var(FAILOVER_ENV);
        // SAFETY: the descriptor was set up by the watchdog for us; nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fcntl on the descriptor we now own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Some(recv(&sock).and_then(|(m, fds)| {
            if m.len() < 9 || m[0] != b'H' {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "no hand-over from the watchdog"));
            }
            let died_at_ns = u64::from_le_bytes(m[1..9].try_into().unwrap_or_default());
            Ok(Failover { watchdog: Watchdog { sock, pid: None }, died_at_ns, state: m[9..].to_vec(), fds })
        }))
    }
}

/// What the watchdog holds for a failover.
struct Armed {
    state: Vec<u8>,
    fds: Vec<OwnedFd>,
}

fn watch(mut sock: OwnedFd, mountpoint: &Path, target: &CString) -> i32 {
    // SAFETY: setting signal dispositions in the single-threaded child.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::setsid();
    }
    let mut dev: Option<u64> = None;
    let mut armed: Option<Armed> = None;
    // The server this watchdog started (to reap), whether it re-armed, failovers so far.
    let mut child: Option<libc::pid_t> = None;
    let mut rearmed = true;
    let mut failed_starts = 0u32;
    let mut recent: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    loop {
        match recv(&sock) {
            Ok((m, fds)) if !m.is_empty() => match m[0] {
                b'M' if m.len() == 9 => dev = Some(u64::from_ne_bytes(m[1..9].try_into().unwrap_or_default())),
                b'D' => return 0,
                b'F' => {
                    armed = Some(Armed { state: m[1..].to_vec(), fds });
                    if !rearmed {
                        rearmed = true;
                        failed_starts = 0;
                    }
                }
                _ => {}
            },
            Ok(_) => {
                // The server is gone.
                let died = monotonic_ns();
                if let Some(pid) = child.take().and_then(rustix::process::Pid::from_raw) {
                    let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
                }
                if !rearmed {
                    failed_starts += 1;
                }
                let now = Instant::now();
                while recent.front().is_some_and(|t| now.duration_since(*t) > FAILOVER_WINDOW) {
                    recent.pop_front();
                }
                let mounted = dev.is_some_and(|d| still_mounted(mountpoint, d));
                let why_not = if armed.is_none() {
                    None
                } else if !mounted {
                    Some("the mount is gone".to_string())
                } else if failed_starts >= MAX_FAILED_STARTS {
                    Some(format!("{failed_starts} servers in a row died before serving"))
                } else if recent.len() >= MAX_FAILOVERS {
                    Some(format!("{} failovers within {:?}", recent.len(), FAILOVER_WINDOW))
                } else {
                    None
                };
                if let (Some(a), None) = (&armed, &why_not) {
                    match start_server(a, died, mountpoint) {
                        Ok((pid, s)) => {
                            sock = s;
                            child = Some(pid);
                            rearmed = false;
                            recent.push_back(now);
                            continue;
                        }
                        Err(e) => eprintln!("ringfs watchdog: server died; starting a new server failed: {e}"),
                    }
                } else if let Some(why) = why_not {
                    eprintln!("ringfs watchdog: server died; no failover ({why})");
                }
                break;
            }
            Err(_) => break,
        }
    }
    // Let go of the connection first: with no descriptor left, the kernel ends it, so callers
    // blocked on the mount get an error instead of waiting.
    drop(armed);
    let Some(dev) = dev else { return 0 };
    if still_mounted(mountpoint, dev) {
        let mut rc = rustix::mount::unmount(target.as_c_str(), rustix::mount::UnmountFlags::DETACH);
        if rc == Err(rustix::io::Errno::PERM) {
            // A user's mount: detached by the set-uid helper that mounted it.
            rc = match crate::mount::fusermount_unmount(mountpoint, true) {
                Ok(()) => Ok(()),
                Err(e) => {
                    eprintln!("ringfs watchdog: server died; unmounting {} failed: {e}", mountpoint.display());
                    return 1;
                }
            };
        }
        match rc {
            Ok(()) => eprintln!("ringfs watchdog: server died; detached {}", mountpoint.display()),
            Err(e) => {
                eprintln!(
                    "ringfs watchdog: server died; unmounting {} failed: {}",
                    mountpoint.display(),
                    io::Error::from(e)
                );
                return 1;
            }
        }
    }
    0
}

/// This process's executable as now installed (`/proc/self/exe` without " (deleted)").
fn current_exe() -> io::Result<PathBuf> {
    let p = std::fs::read_link("/proc/self/exe")?;
    let s = p.as_os_str().as_encoded_bytes();
    let s = s.strip_suffix(b" (deleted)").unwrap_or(s);
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(s)))
}

/// Starts the server again (same binary path, same arguments) with a socket as descriptor 3,
/// and hands it what `armed` holds. Returns its pid and our end of the socket.
fn start_server(armed: &Armed, died: u64, mountpoint: &Path) -> io::Result<(libc::pid_t, OwnedFd)> {
    let (ours, theirs) = socketpair()?;
    let mut cmd = std::process::Command::new(current_exe()?);
    cmd.args(std::env::args_os().skip(1)).env(FAILOVER_ENV, "3").stdin(std::process::Stdio::null());
    let child_fd = theirs.as_raw_fd();
    // SAFETY: dup2, signal and setsid are async-signal-safe; nothing else runs before exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::dup2(child_fd, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            // The watchdog ignores these; a server must get them again.
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(s, libc::SIG_DFL);
            }
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    // Said before the hand-over: the new server cannot log before it has it.
    eprintln!("ringfs watchdog: server died; started pid {} to take {} over", child.id(), mountpoint.display());
    let mut msg = Vec::with_capacity(9 + armed.state.len());
    msg.push(b'H');
    msg.extend_from_slice(&died.to_le_bytes());
    msg.extend_from_slice(&armed.state);
    let raw: Vec<RawFd> = armed.fds.iter().map(|f| f.as_raw_fd()).collect();
    send(&ours, &msg, &raw)?;
    Ok((child.id() as libc::pid_t, ours))
}

fn still_mounted(mountpoint: &Path, dev: u64) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let mp = PathBuf::from(mountpoint);
    parse_mountinfo(&text).iter().any(|m| m.mountpoint == mp && m.dev == dev)
}

/// Points stdin and stdout at /dev/null, and stderr too unless it is a socket (the journal): a
/// background process must not hold the pipes of whoever started it (mount(8), a script's
/// `$(...)`, a test harness), which may wait for end-of-file on them, nor write into the output
/// files of whoever mounted it (xfstests compares a test's output, server lines included), as
/// libfuse's daemonize does not either. Run in the foreground (`-f`) to log to a file.
/// Async-signal-safe (raw syscalls), so a freshly forked child may call it.
pub fn detach_stdio() {
    use rustix::{fs, stdio};
    let Ok(null) = fs::open(c"/dev/null", fs::OFlags::RDWR | fs::OFlags::CLOEXEC, fs::Mode::empty()) else {
        return;
    };
    let keep_stderr = fs::fstat(stdio::stderr()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK);
    let _ = stdio::dup2_stdin(&null);
    let _ = stdio::dup2_stdout(&null);
    if !keep_stderr {
        let _ = stdio::dup2_stderr(&null);
    }
    // `null` is closed here.
}
