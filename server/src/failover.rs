//! Crash failover (`failover = on`): the watchdog process holds the mount's connection and, when
//! the server dies, starts a new one that takes the mount over (docs/reliability.md, "Crash
//! failover").
//!
//! This server arms its watchdog ([`ringfs_transport::watchdog::WatchdogLink::arm`]) with what
//! a successor needs, as bytes and descriptors:
//! - the mount's /dev/fuse descriptor, and the clones its queues read requests through (held
//!   by the watchdog too, the requests read through them stay on the connection when this
//!   process dies, where `FUSE_NOTIFY_RESEND` finds them; a clone closed with requests on it
//!   would end them with ECONNABORTED);
//! - the journal (a memfd, `crate::fs::journal`): node ids with file handles, open handles;
//! - the metrics and control listeners (no moment without either);
//! - the device number, the kernel's INIT request and the reply sent, and the counters.
//!
//! It re-arms whenever one of those changes (the clones at each serving round, the journal at
//! each compaction). A server started for a failover ([`Handover::from_env`]) adopts the
//! connection (as a live upgrade does), imports the journal, starts its queues behind their
//! gate, sends `FUSE_NOTIFY_RESEND`, drops the dead server's clones and opens the gate.
//!
//! Message (little-endian): `RFO` + version byte, device, failovers, upgrades ok / refused /
//! failed, handles lost, requests resent (u64 each), INIT request and reply (u32 length +
//! bytes), flags (u32: 1 metrics listener, 2 control listener), clone count (u32).
//! Descriptors: /dev/fuse, journal, [metrics], [control], clones.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ringfs_transport::watchdog::{Failover, Watchdog, WatchdogLink};

/// Failovers this mount went through (carried from server to server).
pub static FAILOVERS: AtomicU64 = AtomicU64::new(0);
/// Time from the watchdog finding the last server dead to the new one serving, microseconds.
pub static LAST_PAUSE_US: AtomicU64 = AtomicU64::new(0);
/// Open handles that could not be opened again after a failover (carried).
pub static LOST_HANDLES: AtomicU64 = AtomicU64::new(0);
/// Requests resent to earlier servers of this mount (this server's own are in its dispatch
/// statistics).
pub static RESENT_BEFORE: AtomicU64 = AtomicU64::new(0);
/// Failover mode in effect: 0 off, 1 on, 2 asked for but unavailable (metric).
pub static MODE: AtomicU64 = AtomicU64::new(0);

const MAGIC: &[u8; 3] = b"RFO";
const VERSION: u8 = 1;

struct Parts {
    journal: Option<OwnedFd>,
    metrics: Option<OwnedFd>,
    control: Option<OwnedFd>,
    clones: Option<Vec<OwnedFd>>,
}

/// This server's side: keeps the watchdog armed.
pub struct Link {
    wd: WatchdogLink,
    dev: u64,
    init: (Vec<u8>, Vec<u8>),
    fuse: OwnedFd,
    dispatch: Arc<ringfs_protocol::stats::DispatchStats>,
    parts: Mutex<Parts>,
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

impl Link {
    /// A link for the mount `dev` served through `fuse` (INIT record `init`). Arms nothing
    /// until the journal and the clones are known.
    pub fn new(
        wd: WatchdogLink,
        dev: u64,
        init: (Vec<u8>, Vec<u8>),
        fuse: BorrowedFd<'_>,
        dispatch: Arc<ringfs_protocol::stats::DispatchStats>,
    ) -> io::Result<Arc<Link>> {
        Ok(Arc::new(Link {
            wd,
            dev,
            init,
            fuse: fuse.try_clone_to_owned()?,
            dispatch,
            parts: Mutex::new(Parts { journal: None, metrics: None, control: None, clones: None }),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parts> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The metrics and control listeners (handed on, so a successor listens on the same ones).
    pub fn set_listeners(&self, metrics: Option<OwnedFd>, control: Option<OwnedFd>) {
        let mut p = self.lock();
        p.metrics = metrics;
        p.control = control;
    }

    /// The queues' clones of this serving round (the session's clone hook).
    pub fn set_clones(&self, clones: &[BorrowedFd<'_>]) {
        let owned: io::Result<Vec<OwnedFd>> = clones.iter().map(|c| c.try_clone_to_owned()).collect();
        let mut p = self.lock();
        match owned {
            Ok(v) => p.clones = Some(v),
            Err(e) => {
                log::error!("failover: cannot keep the queues' descriptors ({e}); a crash now ends the mount");
                return;
            }
        }
        self.arm(&p);
    }

    /// The journal's (new) descriptor.
    pub fn set_journal(&self, journal: BorrowedFd<'_>) {
        let mut p = self.lock();
        match journal.try_clone_to_owned() {
            Ok(fd) => p.journal = Some(fd),
            Err(e) => {
                log::error!("failover: cannot keep the journal's descriptor ({e})");
                return;
            }
        }
        self.arm(&p);
    }

    /// Arms the watchdog again with what it holds (after the counters changed).
    pub fn rearm(&self) {
        let p = self.lock();
        self.arm(&p);
    }

    fn arm(&self, p: &Parts) {
        let (Some(journal), Some(clones)) = (&p.journal, &p.clones) else { return };
        use crate::upgrade::{UPGRADES_FAILED, UPGRADES_OK, UPGRADES_REFUSED};
        let mut m = MAGIC.to_vec();
        m.push(VERSION);
        let resent = RESENT_BEFORE.load(Ordering::Relaxed) + self.dispatch.resent.load(Ordering::Relaxed);
        for w in [
            self.dev,
            FAILOVERS.load(Ordering::Relaxed),
            UPGRADES_OK.load(Ordering::Relaxed),
            UPGRADES_REFUSED.load(Ordering::Relaxed),
            UPGRADES_FAILED.load(Ordering::Relaxed),
            LOST_HANDLES.load(Ordering::Relaxed),
            resent,
        ] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        put_bytes(&mut m, &self.init.0);
        put_bytes(&mut m, &self.init.1);
        let flags = u32::from(p.metrics.is_some()) | (u32::from(p.control.is_some()) << 1);
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(clones.len() as u32).to_le_bytes());
        let mut fds = vec![self.fuse.as_fd(), journal.as_fd()];
        fds.extend(p.metrics.as_ref().map(|f| f.as_fd()));
        fds.extend(p.control.as_ref().map(|f| f.as_fd()));
        fds.extend(clones.iter().map(|f| f.as_fd()));
        if let Err(e) = self.wd.arm(&m, &fds) {
            log::error!("failover: arming the watchdog failed ({e}); a crash now ends the mount");
        }
    }
}

/// What a server started for a failover receives.
pub struct Handover {
    /// The socket to the watchdog (this server's watchdog from now on).
    pub watchdog: Option<Watchdog>,
    /// When the watchdog found the previous server dead (CLOCK_MONOTONIC ns).
    pub died_at_ns: u64,
    /// The mount's device number.
    pub dev: u64,
    /// The kernel's INIT request and the reply the first server sent.
    pub init_in: Vec<u8>,
    /// See `init_in`.
    pub init_out: Vec<u8>,
    /// The mount's /dev/fuse descriptor.
    pub fuse_fd: OwnedFd,
    /// The dead server's journal.
    pub journal: OwnedFd,
    /// Listeners of the dead server.
    pub metrics_listener: Option<OwnedFd>,
    /// See `metrics_listener`.
    pub control_listener: Option<OwnedFd>,
    /// The dead server's queue descriptors (dropped once the kernel resent their requests).
    pub old_clones: Vec<OwnedFd>,
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err("truncated failover hand-over".into());
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

fn take_u64(b: &mut &[u8]) -> Result<u64, String> {
    Ok(u64::from_le_bytes(take(b, 8)?.try_into().unwrap_or_default()))
}

fn take_u32(b: &mut &[u8]) -> Result<u32, String> {
    Ok(u32::from_le_bytes(take(b, 4)?.try_into().unwrap_or_default()))
}

impl Handover {
    /// The hand-over from the watchdog if this process was started for a failover.
    pub fn from_env() -> Option<Result<Handover, String>> {
        let f = Failover::from_env()?;
        Some(f.map_err(|e| format!("failover hand-over: {e}")).and_then(Handover::decode))
    }

    fn decode(f: Failover) -> Result<Handover, String> {
        let mut b = f.state.as_slice();
        if take(&mut b, 3)? != MAGIC {
            return Err("failover hand-over: not a ringfs state".into());
        }
        let v = take(&mut b, 1)?[0];
        if v != VERSION {
            return Err(format!("failover hand-over: state version {v} is not understood by this build ({VERSION})"));
        }
        let w: Vec<u64> = (0..7).map(|_| take_u64(&mut b)).collect::<Result<_, _>>()?;
        let n = take_u32(&mut b)? as usize;
        let init_in = take(&mut b, n)?.to_vec();
        let n = take_u32(&mut b)? as usize;
        let init_out = take(&mut b, n)?.to_vec();
        let flags = take_u32(&mut b)?;
        let nclones = take_u32(&mut b)? as usize;
        let mut fds = f.fds.into_iter();
        let mut next = |what: &str| fds.next().ok_or_else(|| format!("failover hand-over: {what} missing"));
        let fuse_fd = next("/dev/fuse descriptor")?;
        let journal = next("journal")?;
        let metrics_listener = if flags & 1 != 0 { Some(next("metrics listener")?) } else { None };
        let control_listener = if flags & 2 != 0 { Some(next("control listener")?) } else { None };
        let old_clones = (0..nclones).map(|_| next("queue descriptor")).collect::<Result<Vec<_>, _>>()?;
        use crate::upgrade::{UPGRADES_FAILED, UPGRADES_OK, UPGRADES_REFUSED};
        // This one included (the count is handed on when this server arms its watchdog).
        FAILOVERS.store(w[1] + 1, Ordering::Relaxed);
        UPGRADES_OK.store(w[2], Ordering::Relaxed);
        UPGRADES_REFUSED.store(w[3], Ordering::Relaxed);
        UPGRADES_FAILED.store(w[4], Ordering::Relaxed);
        LOST_HANDLES.store(w[5], Ordering::Relaxed);
        RESENT_BEFORE.store(w[6], Ordering::Relaxed);
        Ok(Handover {
            watchdog: Some(f.watchdog),
            died_at_ns: f.died_at_ns,
            dev: w[0],
            init_in,
            init_out,
            fuse_fd,
            journal,
            metrics_listener,
            control_listener,
            old_clones,
        })
    }
}

/// Why crash failover cannot work on this mount (`None`: it can).
pub fn unavailable(uring: bool, kernel_resends: bool, reopens_by_handle: bool) -> Option<&'static str> {
    if uring {
        Some(
            "the mount uses FUSE over io_uring, whose requests the kernel cannot resend to another server \
             (FUSE_NOTIFY_RESEND walks the classic channel only); use transport.mode = \"dev-fuse\" for failover",
        )
    } else if !kernel_resends {
        Some("this kernel has no FUSE_NOTIFY_RESEND (protocol 7.40, Linux 6.9+)")
    } else if !reopens_by_handle {
        Some("open files cannot be reopened by file handle (open_by_handle_at needs CAP_DAC_READ_SEARCH)")
    } else {
        None
    }
}
