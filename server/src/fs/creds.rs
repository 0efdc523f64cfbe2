//! Per-thread credential switching for operations done on behalf of a caller.
//!
//! Linux credentials are per thread at the kernel level. The raw `setfsuid`/`setfsgid`/
//! `setgroups` system calls change only the calling thread (glibc's `setgroups` wrapper would
//! broadcast to every thread of the process, so it is never used here).

use std::marker::PhantomData;

use ringfs_protocol::{Errno, Result};

/// Switches the calling thread's fsuid/fsgid (and optionally its supplementary groups) and
/// restores root credentials when dropped.
///
/// Not `Send`: it must be dropped on the thread that created it.
pub(crate) struct CredGuard {
    switched: bool,
    groups: bool,
    _not_send: PhantomData<*const ()>,
}

impl CredGuard {
    /// Switches to `uid`/`gid` (fsgid first, then fsuid). Root/root switches nothing.
    pub(crate) fn switch(uid: u32, gid: u32) -> CredGuard {
        if uid == 0 && gid == 0 {
            return CredGuard { switched: false, groups: false, _not_send: PhantomData };
        }
        // SAFETY: setfsgid/setfsuid take an integer and only change this thread's credentials.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, gid);
            libc::syscall(libc::SYS_setfsuid, uid);
        }
        CredGuard { switched: true, groups: false, _not_send: PhantomData }
    }

    /// True when the thread's credentials were changed.
    pub(crate) fn is_switched(&self) -> bool {
        self.switched
    }

    /// Sets this thread's supplementary groups (raw syscall: this thread only); they are
    /// reset to the empty set when the guard is dropped.
    pub(crate) fn set_groups(&mut self, groups: &[libc::gid_t]) -> Result<()> {
        let groups: Vec<rustix::process::Gid> = groups.iter().map(|&g| rustix::process::Gid::from_raw(g)).collect();
        rustix::thread::set_thread_groups(&groups).map_err(|e| Errno(e.raw_os_error()))?;
        self.groups = true;
        Ok(())
    }
}

impl Drop for CredGuard {
    fn drop(&mut self) {
        if self.switched {
            // SAFETY: restoring root fs credentials of this thread (fsuid first, then fsgid).
            unsafe {
                libc::syscall(libc::SYS_setfsuid, 0);
                libc::syscall(libc::SYS_setfsgid, 0);
            }
        }
        if self.groups {
            // An empty group list, for this thread only. Failure leaves the caller's groups on
            // a thread running as root: not possible for a thread that could set them.
            let _ = rustix::thread::set_thread_groups(&[]);
        }
    }
}

/// Reads the supplementary groups of process `pid` from `/proc/<pid>/status`.
pub(crate) fn caller_groups(pid: u32) -> Result<Vec<libc::gid_t>> {
    if pid == 0 {
        return Ok(Vec::new());
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(parse_groups(&status))
}

/// Parses the `Groups:` line of a `/proc/<pid>/status` text.
pub(crate) fn parse_groups(status: &str) -> Vec<libc::gid_t> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|rest| rest.split_whitespace().filter_map(|g| g.parse::<libc::gid_t>().ok()).collect())
        .unwrap_or_default()
}

/// Personalities registered per queue thread before the cache is emptied.
const MAX_PERSONALITIES: usize = 64;

thread_local! {
    /// This queue thread's io_uring personalities, by (uid, gid).
    static PERSONALITIES: std::cell::RefCell<std::collections::HashMap<(u32, u32), u16>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The io_uring personality of this queue thread's ring that carries `uid`/`gid` as fsuid/fsgid
/// (no supplementary groups), registering it on first use: operations submitted with it run
/// on io-wq as that user, so creations need not switch the queue thread's own credentials.
/// `Some(0)` for root/root (the server's own credentials); `None` when registering fails.
///
/// A registration is asked of the queue loop, which switches the queue thread to `uid`/`gid`
/// for the registration only, between two rounds of polls (see
/// `ringfs_transport::io::register_personality`).
pub(crate) async fn personality(uid: u32, gid: u32) -> Option<u16> {
    if uid == 0 && gid == 0 {
        return Some(0);
    }
    if let Some(id) = PERSONALITIES.with(|cache| cache.borrow().get(&(uid, gid)).copied()) {
        return Some(id);
    }
    match ringfs_transport::io::register_personality(move || CredGuard::switch(uid, gid)).await {
        Ok(id) => Some(PERSONALITIES.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(&known) = cache.get(&(uid, gid)) {
                // Another request registered the same credentials meanwhile: keep that one.
                ringfs_transport::io::unregister_personality(id);
                return known;
            }
            if cache.len() >= MAX_PERSONALITIES {
                // Given back once the SQEs already queued with them are submitted.
                for (_, id) in cache.drain() {
                    ringfs_transport::io::unregister_personality(id);
                }
            }
            cache.insert((uid, gid), id);
            log::debug!("io_uring personality {id} registered for {uid}:{gid}");
            id
        })),
        Err(e) => {
            log::debug!("io_uring personality for {uid}:{gid} not registered: {e}");
            None
        }
    }
}
