//! Coherence with the backing directory: changes made there by other processes (not through
//! the mount) are pushed to the kernel's caches as invalidations.
//!
//! A fanotify group with a file-system mark reports every create/delete/rename/attribute/data
//! change on the backing file system as (directory file handle, name) plus the changed object's
//! own file handle. Handles are mapped to the nodes the kernel knows (an unknown handle means
//! the kernel has nothing cached for it: ignored). Events caused by this server itself (changes
//! made through the mount) are skipped: the kernel already knows. Invalidations are coalesced
//! over a short window so that a storm of writes costs one notification per node per window,
//! then handed to the notifier thread (never written from here).

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringfs_protocol::{KernelChannel, NodeId};

use super::inode::InodeTable;

const FAN_CLOEXEC: u32 = 0x1;
const FAN_NONBLOCK: u32 = 0x2;
const FAN_UNLIMITED_QUEUE: u32 = 0x10;
const FAN_REPORT_FID: u32 = 0x200;
const FAN_REPORT_DIR_FID: u32 = 0x400;
const FAN_REPORT_NAME: u32 = 0x800;
const FAN_REPORT_TARGET_FID: u32 = 0x1000;
const FAN_MARK_ADD: u32 = 0x1;
const FAN_MARK_MOUNT: u32 = 0x10;
const FAN_MARK_FILESYSTEM: u32 = 0x100;

const FAN_MODIFY: u64 = 0x2;
const FAN_ATTRIB: u64 = 0x4;
const FAN_MOVED_FROM: u64 = 0x40;
const FAN_MOVED_TO: u64 = 0x80;
const FAN_CREATE: u64 = 0x100;
const FAN_DELETE: u64 = 0x200;
const FAN_ONDIR: u64 = 0x4000_0000;
const FAN_Q_OVERFLOW: u64 = 0x4000;

const INFO_FID: u8 = 1;
const INFO_DFID_NAME: u8 = 2;
const INFO_DFID: u8 = 3;

/// How long changes are collected before their invalidations go out.
pub(crate) const COALESCE: Duration = Duration::from_millis(5);

/// An open fanotify group watching the backing file system.
pub struct Watch {
    fd: Arc<OwnedFd>,
    /// FAN_MODIFY is ignored on the server's own (private) mount: see [`Watch::ignore_own_mount`].
    own_mount_ignored: bool,
    /// Set for the inotify fallback (see [`super::inotify`]); `fd` is then its inotify fd.
    pub(crate) inotify: Option<Arc<super::inotify::Inotify>>,
}

impl Watch {
    /// Sets up the watch on the file system holding `source`. Fails (with the reason) where
    /// fanotify with file handles is unavailable (old kernel, file system without file handles).
    pub fn new(source: &Path) -> io::Result<Watch> {
        let flags =
            FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_QUEUE | FAN_REPORT_FID | FAN_REPORT_DIR_FID | FAN_REPORT_NAME;
        // SAFETY: plain syscall; returns an fd or -1.
        let mut fd = unsafe { libc::fanotify_init(flags | FAN_REPORT_TARGET_FID, libc::O_RDONLY as u32) };
        if fd < 0 {
            // SAFETY: as above, without TARGET_FID (kernels before 5.17).
            fd = unsafe { libc::fanotify_init(flags, libc::O_RDONLY as u32) };
        }
        if fd < 0 {
            return Err(io::Error::other(format!("fanotify_init: {}", io::Error::last_os_error())));
        }
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(source.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mask = FAN_MODIFY | FAN_ATTRIB | FAN_MOVED_FROM | FAN_MOVED_TO | FAN_CREATE | FAN_DELETE | FAN_ONDIR;
        // SAFETY: valid fd and path.
        let rc = unsafe {
            libc::fanotify_mark(fd.as_raw_fd(), FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, libc::AT_FDCWD, path.as_ptr())
        };
        if rc != 0 {
            return Err(io::Error::other(format!(
                "fanotify_mark on {}: {}",
                source.display(),
                io::Error::last_os_error()
            )));
        }
        Ok(Watch { fd: Arc::new(fd), own_mount_ignored: false, inotify: None })
    }

    /// The inotify fallback for `source` (see [`super::inotify`]).
    pub fn inotify(source: &Path) -> io::Result<Watch> {
        let (fd, ino) = super::inotify::Inotify::new(source)?;
        Ok(Watch { fd, own_mount_ignored: false, inotify: Some(ino) })
    }

    /// Which mechanism this watch uses.
    pub fn kind(&self) -> &'static str {
        if self.inotify.is_some() {
            "inotify"
        } else {
            "fanotify"
        }
    }

    /// Ignores FAN_MODIFY on the mount whose root is `root`: the server's private, detached
    /// mount on which passthrough backing files are registered, so every passthrough write made
    /// through the FUSE mount lands there (the kernel opens backing files on the registered
    /// file's mount). Writes by anyone else go through another mount and still report; the
    /// server's own writes are skipped by pid. This replaces the per-file ignore marks
    /// ([`WriteIgnores`]): no mark per open, no blind window for other writers while a file is
    /// open through the mount, and no invalidation at close for the mount's own writes (which
    /// the kernel already accounted for: a passthrough write updates its size and invalidates
    /// its cached times itself).
    pub(crate) fn ignore_own_mount(&mut self, root: RawFd) -> io::Result<()> {
        if self.inotify.is_some() {
            return Err(io::Error::other("inotify has no mount marks"));
        }
        let flags = FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_IGNORED_MASK | FAN_MARK_IGNORED_SURV_MODIFY;
        // SAFETY: fanotify_mark on our group fd; "." relative to `root` (an O_PATH descriptor,
        // which fanotify_mark only accepts as a directory fd) names the mount's root.
        let rc = unsafe { libc::fanotify_mark(self.fd.as_raw_fd(), flags, FAN_MODIFY, root, c".".as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.own_mount_ignored = true;
        Ok(())
    }

    /// The per-inode FAN_MODIFY ignore marks for files open for writing through the mount
    /// (fanotify only, where the server's own mount cannot be ignored as a whole).
    pub(crate) fn write_ignores(&self) -> Option<WriteIgnores> {
        if self.inotify.is_some() || self.own_mount_ignored {
            return None;
        }
        Some(WriteIgnores { fd: self.fd.clone(), writers: Mutex::new((HashMap::new(), HashSet::new())) })
    }
}

const FAN_MARK_REMOVE: u32 = 0x2;
const FAN_MARK_IGNORED_MASK: u32 = 0x20;
const FAN_MARK_IGNORED_SURV_MODIFY: u32 = 0x40;

/// Writes through the mount's passthrough files reach the backing file system as the writing
/// process's own writes, so each one would queue a FAN_MODIFY event (a kernel allocation, a
/// file handle encoding and a merge per write() — 15% of a 4 KiB random-write load) and wake
/// the watch to invalidate an inode the kernel already knows is being written. While a backing
/// inode is open for writing through passthrough, its FAN_MODIFY events are ignored by an
/// ignore mark on the inode; creations, renames, deletions and attribute changes still report.
/// Data read through passthrough comes from the backing file itself, so it cannot go stale;
/// size and times changed by *another* writer in that window become visible when the last
/// writer through the mount closes the file: if the backing inode's ctime moved since the
/// first writer opened it, its attributes are invalidated then (a file opened for writing and
/// not written, such as a fresh create, keeps its cached attributes).
pub(crate) struct WriteIgnores {
    fd: Arc<OwnedFd>,
    /// Per node: writing opens, and the backing ctime when the first of them opened; and the
    /// file handles counted there.
    writers: Mutex<(HashMap<u64, Writers>, HashSet<u64>)>,
}

/// Writing opens of one node, and the backing ctime when the first of them opened.
type Writers = (u32, Option<(i64, i64)>);

impl WriteIgnores {
    fn mark(&self, flags: u32, file: RawFd) -> io::Result<()> {
        // SAFETY: fanotify_mark on our group fd; a null path marks the inode `file` refers to.
        let rc = unsafe { libc::fanotify_mark(self.fd.as_raw_fd(), flags, FAN_MODIFY, file, std::ptr::null()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Passthrough open `fh` of `node` for writing, through descriptor `file`.
    pub(crate) fn opened(&self, fh: u64, node: u64, file: BorrowedFd<'_>) {
        let mut guard = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        let (w, handles) = &mut *guard;
        if !handles.insert(fh) {
            return;
        }
        let n = w.entry(node).or_insert((0, None));
        n.0 += 1;
        if n.0 == 1 {
            n.1 = ctime(file);
            let flags = FAN_MARK_ADD | FAN_MARK_IGNORED_MASK | FAN_MARK_IGNORED_SURV_MODIFY;
            if let Err(e) = self.mark(flags, file.as_raw_fd()) {
                log::debug!("FAN_MODIFY ignore mark for node {node} not set: {e}");
            }
        }
    }

    /// The release of open `fh`; true when it was the last writing open of `node` and the
    /// backing inode changed meanwhile (the caller then invalidates the inode's attributes).
    pub(crate) fn closed(&self, fh: u64, node: u64, file: BorrowedFd<'_>) -> bool {
        let mut guard = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        let (w, handles) = &mut *guard;
        if !handles.remove(&fh) {
            return false;
        }
        let Some(n) = w.get_mut(&node) else { return false };
        n.0 -= 1;
        if n.0 > 0 {
            return false;
        }
        let before = n.1;
        w.remove(&node);
        if let Err(e) = self.mark(FAN_MARK_REMOVE | FAN_MARK_IGNORED_MASK, file.as_raw_fd()) {
            log::debug!("FAN_MODIFY ignore mark for node {node} not removed: {e}");
        }
        before.is_none() || ctime(file) != before
    }
}

/// The inode change time of open file `fd`.
fn ctime(fd: BorrowedFd<'_>) -> Option<(i64, i64)> {
    rustix::fs::fstat(fd).ok().map(|st| (st.st_ctime, st.st_ctime_nsec as i64))
}

/// One invalidation to send.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) enum Inval {
    /// The name (parent node, name) changed: FUSE_NOTIFY_INVAL_ENTRY.
    Entry(u64, Vec<u8>),
    /// The node's attributes changed, and its data too when true: FUSE_NOTIFY_INVAL_INODE.
    Inode(u64, bool),
}

/// Runs the watch until the kernel channel goes away (the process exits with the mount).
pub(crate) fn run(watch: Watch, inodes: Arc<InodeTable>, kernel: Arc<dyn KernelChannel>) {
    if let Some(ino) = &watch.inotify {
        return super::inotify::run(&watch.fd, ino, &inodes, kernel.as_ref());
    }
    let own_pid = std::process::id() as i32;
    let mut buf = vec![0u64; 8192];
    let mut pending: HashSet<Inval> = HashSet::new();
    let mut nodes = NodeCache::default();
    loop {
        // Sleep until the first event, then let the coalescing window fill before reading: a
        // storm of changes (the server's own, above all) costs one wake-up per window instead
        // of one per event.
        let mut pfd = [rustix::event::PollFd::new(&watch.fd, rustix::event::PollFlags::IN)];
        if rustix::event::poll(&mut pfd, None).unwrap_or(0) == 0 {
            continue;
        }
        std::thread::sleep(COALESCE);
        loop {
            let bytes: &mut [u8] = zerocopy::IntoBytes::as_mut_bytes(buf.as_mut_slice());
            // Non-blocking: EAGAIN once drained.
            let n = match rustix::io::read(&watch.fd, &mut *bytes) {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            parse_events(&bytes[..n], own_pid, &mut nodes, &inodes, &mut pending);
            if n < bytes.len() / 2 {
                break;
            }
        }
        flush(&mut pending, kernel.as_ref());
        nodes.clear();
    }
}

/// The nodes of the file handles met in one batch of events: a handle the inode table does
/// not know costs an `open_by_handle_at` and an `fstat` to resolve
/// ([`InodeTable::node_by_handle`]), so a storm of events about one object the kernel does not
/// know (another process writing a file never looked up through the mount) resolves it once per
/// batch, not per event.
type NodeCache = HashMap<Box<[u8]>, Option<u64>>;

/// Hands the pending invalidations to the kernel channel (its notifier thread writes them).
pub(crate) fn flush(pending: &mut HashSet<Inval>, kernel: &dyn KernelChannel) {
    for inv in pending.drain() {
        match inv {
            Inval::Entry(parent, name) => kernel.inval_entry(NodeId(parent), &name),
            Inval::Inode(node, data) => kernel.inval_inode(NodeId(node), if data { 0 } else { -1 }, 0),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// Walks a buffer of `fanotify_event_metadata` records with their info records.
fn parse_events(buf: &[u8], own_pid: i32, nodes: &mut NodeCache, inodes: &InodeTable, out: &mut HashSet<Inval>) {
    let mut pos = 0usize;
    // struct fanotify_event_metadata { u32 event_len; u8 vers; u8 reserved; u16 metadata_len;
    //   u64 mask; i32 fd; i32 pid; }
    while pos + 24 <= buf.len() {
        let ev = &buf[pos..];
        let event_len = u32_at(ev, 0) as usize;
        let meta_len = u16::from_ne_bytes([ev[6], ev[7]]) as usize;
        if event_len < 24 || event_len > ev.len() || meta_len > event_len {
            return;
        }
        let mask = u64::from_ne_bytes(ev[8..16].try_into().unwrap_or([0; 8]));
        let pid = u32_at(ev, 20) as i32;
        if mask & FAN_Q_OVERFLOW != 0 {
            log::warn!("backing-directory watch lost events (queue overflow); caches may be stale until they expire");
        }
        if pid != own_pid {
            handle_event(&ev[meta_len..event_len], mask, nodes, inodes, out);
        }
        pos += event_len;
    }
}

fn handle_event(mut info: &[u8], mask: u64, nodes: &mut NodeCache, inodes: &InodeTable, out: &mut HashSet<Inval>) {
    let names_change = mask & (FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO) != 0;
    let data_change = mask & FAN_MODIFY != 0;
    // struct fanotify_event_info_header { u8 info_type; u8 pad; u16 len; } then
    // __kernel_fsid_t fsid (8 bytes), struct file_handle, [name\0].
    while info.len() >= 4 {
        let kind = info[0];
        let len = u16::from_ne_bytes([info[2], info[3]]) as usize;
        if len < 4 || len > info.len() {
            return;
        }
        let rec = &info[4..len];
        if rec.len() >= 16 && matches!(kind, INFO_FID | INFO_DFID_NAME | INFO_DFID) {
            let fh = &rec[8..];
            let handle_bytes = u32_at(fh, 0) as usize;
            let handle_len = 8 + handle_bytes;
            if handle_len <= fh.len() {
                let handle = &fh[..handle_len];
                let node = match nodes.get(handle) {
                    Some(&node) => node,
                    None => {
                        let node = inodes.node_by_handle(handle);
                        nodes.insert(handle.into(), node);
                        node
                    }
                };
                match (kind, node) {
                    (INFO_DFID_NAME, Some(parent)) if names_change => {
                        let rest = &fh[handle_len..];
                        let name = rest.split(|&b| b == 0).next().unwrap_or(&[]);
                        if !name.is_empty() && name != b"." {
                            out.insert(Inval::Entry(parent, name.to_vec()));
                        }
                        // The directory's own attributes and cached listing changed too.
                        out.insert(Inval::Inode(parent, true));
                    }
                    (INFO_FID, Some(node)) => {
                        out.insert(Inval::Inode(node, data_change));
                    }
                    (INFO_DFID, Some(node)) if names_change => {
                        out.insert(Inval::Inode(node, false));
                    }
                    _ => {}
                }
            }
        }
        info = &info[len..];
    }
}
