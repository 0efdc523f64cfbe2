//! The kernel channel handed to the file system: passthrough backing files and cache
//! invalidations.
//!
//! Invalidations are written to `/dev/fuse` by a dedicated notifier thread fed by a queue:
//! the kernel may block an invalidation on a directory lock held by a request that this same
//! server has yet to answer, so a request-serving thread must never write one itself.

use std::io;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use ringfs_protocol::abi::{
    ioctl, notify, FuseBackingMap, FuseNotifyDeleteOut, FuseNotifyInvalEntryOut, FuseNotifyInvalInodeOut, FuseOutHeader,
};
use ringfs_protocol::{Errno, KernelChannel, NodeId};
use zerocopy::IntoBytes;

enum Notification {
    InvalEntry { parent: u64, name: Name },
    InvalInode { node: u64, offset: i64, len: i64 },
    Delete { parent: u64, child: u64, name: Name },
}

/// Longest name carried inline (NAME_MAX).
const INLINE_NAME: usize = 255;

/// A name on its way to the notifier: inline up to [`INLINE_NAME`] bytes, so an invalidation
/// allocates nothing; longer ones (not seen on Linux file systems) on the heap.
#[allow(clippy::large_enum_variant)] // inline on purpose: boxing is the allocation avoided
enum Name {
    Inline { len: u8, bytes: [u8; INLINE_NAME] },
    Heap(Box<[u8]>),
}

impl Name {
    fn new(b: &[u8]) -> Name {
        if b.len() <= INLINE_NAME {
            let mut bytes = [0u8; INLINE_NAME];
            bytes[..b.len()].copy_from_slice(b);
            Name::Inline { len: b.len() as u8, bytes }
        } else {
            Name::Heap(b.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Name::Inline { len, bytes } => &bytes[..*len as usize],
            Name::Heap(b) => b,
        }
    }
}

/// Counters of the kernel channel.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct NotifyStats {
    /// Invalidations written to the kernel (counted as they are written, refused ones too).
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

fn write_notification(fd: BorrowedFd<'_>, code: i32, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = size_of::<FuseOutHeader>() + parts.iter().map(|p| p.len()).sum::<usize>();
    let h = FuseOutHeader { len: len as u32, error: code, unique: 0 };
    // On the stack: every notification has at most three parts.
    let mut iov = [IoSlice::new(&[]); 4];
    if parts.len() >= iov.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    iov[0] = IoSlice::new(h.as_bytes());
    for (v, p) in iov[1..].iter_mut().zip(parts) {
        *v = IoSlice::new(p);
    }
    rustix::io::writev(fd, &iov[..parts.len() + 1])?;
    Ok(())
}

fn notifier(fd: &OwnedFd, rx: Receiver<Notification>, stats: &NotifyStats) {
    for n in rx {
        // Counted before the write (a counter never goes back): whoever sees an invalidation's
        // effect through the mount also sees it counted. Refusals are counted in `failed` too.
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let r = match &n {
            Notification::InvalEntry { parent, name } => {
                let name = name.as_bytes();
                let arg = FuseNotifyInvalEntryOut { parent: *parent, namelen: name.len() as u32, flags: 0 };
                write_notification(fd.as_fd(), notify::INVAL_ENTRY, &[arg.as_bytes(), name, b"\0"])
            }
            Notification::InvalInode { node, offset, len } => {
                let arg = FuseNotifyInvalInodeOut { ino: *node, off: *offset, len: *len };
                write_notification(fd.as_fd(), notify::INVAL_INODE, &[arg.as_bytes()])
            }
            Notification::Delete { parent, child, name } => {
                let name = name.as_bytes();
                let arg =
                    FuseNotifyDeleteOut { parent: *parent, child: *child, namelen: name.len() as u32, padding: 0 };
                write_notification(fd.as_fd(), notify::DELETE, &[arg.as_bytes(), name, b"\0"])
            }
        };
        match r {
            Ok(()) => {}
            // Not cached in the kernel: nothing to invalidate.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
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
        self.send(Notification::InvalEntry { parent: parent.0, name: Name::new(name) });
    }

    fn inval_inode(&self, node: NodeId, offset: i64, len: i64) {
        self.send(Notification::InvalInode { node: node.0, offset, len });
    }

    fn delete(&self, parent: NodeId, child: NodeId, name: &[u8]) {
        self.send(Notification::Delete { parent: parent.0, child: child.0, name: Name::new(name) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_inline_and_on_the_heap() {
        for len in [0, 1, 200, INLINE_NAME, INLINE_NAME + 1, 1000] {
            let b: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let n = Name::new(&b);
            assert_eq!(n.as_bytes(), &b[..]);
            assert_eq!(matches!(n, Name::Inline { .. }), len <= INLINE_NAME);
        }
    }
}
