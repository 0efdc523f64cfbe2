//! The kernel channel handed to the file system: passthrough backing files and cache
//! invalidations.
//!
//! Invalidations are written to `/dev/fuse` by a dedicated notifier thread fed by a queue:
//! the kernel may block an invalidation on a directory lock held by a request that this same
//! server has yet to answer, so a request-serving thread must never write one itself.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use protocol::abi::{
    ioctl, notify, FuseBackingMap, FuseNotifyDeleteOut, FuseNotifyInvalEntryOut, FuseNotifyInvalInodeOut, FuseOutHeader,
};
use protocol::{Errno, KernelChannel, NodeId};
use zerocopy::IntoBytes;

enum Notification {
    InvalEntry { parent: u64, name: Vec<u8> },
    InvalInode { node: u64, offset: i64, len: i64 },
    Delete { parent: u64, child: u64, name: Vec<u8> },
}

/// Counters of the kernel channel.
#[derive(Debug, Default)]
pub struct NotifyStats {
    /// Invalidations written to the kernel.
    pub sent: AtomicU64,
    /// Invalidations the kernel refused (other than "not cached", which is normal).
    pub failed: AtomicU64,
    /// Backing files currently registered.
    pub backing_open: AtomicU64,
}

/// The transport's implementation of [`KernelChannel`].
pub struct Channel {
    fd: Arc<OwnedFd>,
    tx: Mutex<Option<Sender<Notification>>>,
    stats: Arc<NotifyStats>,
}

impl Channel {
    /// Starts the notifier thread writing to `fd` (a duplicate of the session's fd).
    pub fn start(fd: OwnedFd) -> io::Result<Arc<Channel>> {
        let fd = Arc::new(fd);
        let (tx, rx) = channel();
        let stats = Arc::new(NotifyStats::default());
        {
            let fd = fd.clone();
            let stats = stats.clone();
            std::thread::Builder::new().name("ringfs-notify".into()).spawn(move || notifier(&fd, rx, &stats))?;
        }
        Ok(Arc::new(Channel { fd, tx: Mutex::new(Some(tx)), stats }))
    }

    /// The channel's counters.
    pub fn stats(&self) -> Arc<NotifyStats> {
        self.stats.clone()
    }

    /// Stops the notifier thread (pending notifications are dropped).
    pub fn stop(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }

    fn send(&self, n: Notification) {
        if let Ok(tx) = self.tx.lock() {
            if let Some(tx) = tx.as_ref() {
                let _ = tx.send(n);
            }
        }
    }
}

fn write_notification(fd: RawFd, code: i32, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = size_of::<FuseOutHeader>() + parts.iter().map(|p| p.len()).sum::<usize>();
    let h = FuseOutHeader { len: len as u32, error: code, unique: 0 };
    let mut iov = Vec::with_capacity(parts.len() + 1);
    iov.push(libc::iovec { iov_base: h.as_bytes().as_ptr() as *mut _, iov_len: size_of::<FuseOutHeader>() });
    for p in parts {
        iov.push(libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() });
    }
    // SAFETY: every iovec points at a live buffer of its length.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn notifier(fd: &OwnedFd, rx: Receiver<Notification>, stats: &NotifyStats) {
    for n in rx {
        let r = match &n {
            Notification::InvalEntry { parent, name } => {
                let arg = FuseNotifyInvalEntryOut { parent: *parent, namelen: name.len() as u32, flags: 0 };
                write_notification(fd.as_raw_fd(), notify::INVAL_ENTRY, &[arg.as_bytes(), name, b"\0"])
            }
            Notification::InvalInode { node, offset, len } => {
                let arg = FuseNotifyInvalInodeOut { ino: *node, off: *offset, len: *len };
                write_notification(fd.as_raw_fd(), notify::INVAL_INODE, &[arg.as_bytes()])
            }
            Notification::Delete { parent, child, name } => {
                let arg =
                    FuseNotifyDeleteOut { parent: *parent, child: *child, namelen: name.len() as u32, padding: 0 };
                write_notification(fd.as_raw_fd(), notify::DELETE, &[arg.as_bytes(), name, b"\0"])
            }
        };
        match r {
            Ok(()) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            // Not cached in the kernel: nothing to invalidate.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return,
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                log::debug!("notification refused: {e}");
            }
        }
    }
}

impl KernelChannel for Channel {
    fn backing_open(&self, fd: RawFd) -> Result<i32, Errno> {
        let map = FuseBackingMap { fd, flags: 0, padding: 0 };
        // SAFETY: FUSE_DEV_IOC_BACKING_OPEN reads a fuse_backing_map from the pointer.
        let id = unsafe { libc::ioctl(self.fd.as_raw_fd(), ioctl::DEV_IOC_BACKING_OPEN as _, &map) };
        if id < 0 {
            return Err(Errno::last());
        }
        self.stats.backing_open.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    fn backing_close(&self, backing_id: i32) -> Result<(), Errno> {
        let id = backing_id as u32;
        // SAFETY: FUSE_DEV_IOC_BACKING_CLOSE reads a u32 from the pointer.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), ioctl::DEV_IOC_BACKING_CLOSE as _, &id) };
        if rc < 0 {
            return Err(Errno::last());
        }
        self.stats.backing_open.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    fn inval_entry(&self, parent: NodeId, name: &[u8]) {
        self.send(Notification::InvalEntry { parent: parent.0, name: name.to_vec() });
    }

    fn inval_inode(&self, node: NodeId, offset: i64, len: i64) {
        self.send(Notification::InvalInode { node: node.0, offset, len });
    }

    fn delete(&self, parent: NodeId, child: NodeId, name: &[u8]) {
        self.send(Notification::Delete { parent: parent.0, child: child.0, name: name.to_vec() });
    }
}
