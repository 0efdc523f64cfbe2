//! The coherence watch's fallback where fanotify with file handles is unavailable (kernels
//! before 5.9, file systems that cannot encode file handles, no CAP_SYS_ADMIN): inotify.
//!
//! inotify watches directories, not file systems: every directory the kernel knows (each
//! directory node of the inode table, root included) gets a watch when it enters the table
//! and loses it when the kernel forgets it. A watched directory reports changes to its entries
//! by name; for attribute and data changes of a child, the child's node is found by
//! (st_dev, st_ino). Unlike fanotify, inotify does not say which process made a change, so
//! changes made through the mount are echoed as invalidations too (correct, a little slower).
//! When the watch limit (`fs.inotify.max_user_watches`) is reached, one warning is logged and
//! directories beyond it are covered only by the cache timeouts.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use rustix::fs::inotify;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ringfs_protocol::KernelChannel;

use super::inode::{DirHooks, InodeTable};
use super::watch::{flush, Inval, COALESCE};

const EVENTS: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_ONLYDIR
    | libc::IN_EXCL_UNLINK;

/// The watch descriptors of the directories being watched.
pub(crate) struct Inotify {
    fd: Arc<OwnedFd>,
    /// wd → node, and node → wd.
    wds: Mutex<(HashMap<i32, u64>, HashMap<u64, i32>)>,
    limit_warned: AtomicBool,
}

impl Inotify {
    /// An inotify instance; the backing root's watch is added when the watch starts.
    pub(crate) fn new(source: &Path) -> io::Result<(Arc<OwnedFd>, Arc<Inotify>)> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .map_err(|e| io::Error::other(format!("inotify_init1: {}", io::Error::from(e))))?;
        let fd = Arc::new(fd);
        if !source.is_dir() {
            return Err(io::Error::other(format!("{} is not a directory", source.display())));
        }
        let ino =
            Inotify { fd: fd.clone(), wds: Mutex::new((HashMap::new(), HashMap::new())), limit_warned: false.into() };
        Ok((fd, Arc::new(ino)))
    }

    fn add(&self, node: u64, dir: RawFd) {
        let Ok(path) = CString::new(format!("/proc/self/fd/{dir}")) else { return };
        // The magic link leads to the directory itself.
        let wd = inotify::add_watch(self.fd.as_fd(), path.as_c_str(), inotify::WatchFlags::from_bits_retain(EVENTS));
        let wd = match wd {
            Ok(wd) => wd,
            Err(e) => {
                let e = io::Error::from(e);
                if !self.limit_warned.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "inotify watch not added ({e}): changes made directly in some backing directories show \
                     only when their cache timeouts expire (raise fs.inotify.max_user_watches)"
                    );
                }
                return;
            }
        };
        let mut g = self.wds.lock().unwrap_or_else(|e| e.into_inner());
        g.0.insert(wd, node);
        g.1.insert(node, wd);
    }

    fn node(&self, wd: i32) -> Option<u64> {
        self.wds.lock().unwrap_or_else(|e| e.into_inner()).0.get(&wd).copied()
    }

    fn forget_wd(&self, wd: i32) {
        let mut g = self.wds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(node) = g.0.remove(&wd) {
            if g.1.get(&node) == Some(&wd) {
                g.1.remove(&node);
            }
        }
    }
}

impl DirHooks for Inotify {
    fn dir_added(&self, id: u64, fd: RawFd) {
        self.add(id, fd);
    }

    fn dir_removed(&self, id: u64) {
        let wd = {
            let mut g = self.wds.lock().unwrap_or_else(|e| e.into_inner());
            let Some(wd) = g.1.remove(&id) else { return };
            g.0.remove(&wd);
            wd
        };
        // A stale wd only fails with EINVAL.
        let _ = inotify::remove_watch(self.fd.as_fd(), wd);
    }
}

/// Runs the inotify watch: registers the hooks and the root's watch, then turns events into
/// coalesced invalidations until the process exits.
pub(crate) fn run(fd: &OwnedFd, ino: &Arc<Inotify>, inodes: &Arc<InodeTable>, kernel: &dyn KernelChannel) {
    if let Ok((root, _)) = inodes.get(ringfs_protocol::NodeId::ROOT.0) {
        ino.add(ringfs_protocol::NodeId::ROOT.0, root.as_raw_fd());
    }
    let mut buf = vec![0u64; 8192];
    let mut pending: HashSet<Inval> = HashSet::new();
    loop {
        let mut pfd = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        if rustix::event::poll(&mut pfd, None).unwrap_or(0) == 0 {
            continue;
        }
        std::thread::sleep(COALESCE);
        loop {
            let bytes: &mut [u8] = zerocopy::IntoBytes::as_mut_bytes(buf.as_mut_slice());
            // Non-blocking: EAGAIN once drained.
            let n = match rustix::io::read(fd, &mut *bytes) {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            parse(&bytes[..n], ino, inodes, &mut pending);
        }
        flush(&mut pending, kernel);
    }
}

/// Walks a buffer of `struct inotify_event { i32 wd; u32 mask; u32 cookie; u32 len; name[len] }`.
fn parse(buf: &[u8], ino: &Inotify, inodes: &InodeTable, out: &mut HashSet<Inval>) {
    let mut pos = 0usize;
    while pos + 16 <= buf.len() {
        let word =
            |at: usize| u32::from_ne_bytes([buf[pos + at], buf[pos + at + 1], buf[pos + at + 2], buf[pos + at + 3]]);
        let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
        let Some(name_bytes) = buf.get(pos + 16..pos + 16 + len) else { return };
        pos += 16 + len;
        if mask & libc::IN_Q_OVERFLOW != 0 {
            log::warn!(
                "backing-directory watch lost events (inotify queue overflow); caches may be stale until they expire"
            );
            continue;
        }
        if mask & libc::IN_IGNORED != 0 {
            ino.forget_wd(wd);
            continue;
        }
        let Some(parent) = ino.node(wd) else { continue };
        let name = name_bytes.split(|&b| b == 0).next().unwrap_or(&[]);
        if name.is_empty() {
            // The directory itself.
            if mask & libc::IN_ATTRIB != 0 {
                out.insert(Inval::Inode(parent, false));
            }
            continue;
        }
        if mask & (libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO) != 0 {
            out.insert(Inval::Entry(parent, name.to_vec()));
            // The directory's attributes and cached listing changed too.
            out.insert(Inval::Inode(parent, true));
        }
        if mask & (libc::IN_ATTRIB | libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0 {
            if let Some(child) = child_node(inodes, parent, name) {
                out.insert(Inval::Inode(child, mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0));
            }
        }
    }
}

/// The node of entry `name` of directory node `parent`, if the kernel knows it.
fn child_node(inodes: &InodeTable, parent: u64, name: &[u8]) -> Option<u64> {
    let (dir, _) = inodes.get(parent).ok()?;
    let name = CString::new(name).ok()?;
    let name: &CStr = &name;
    // AT_STATX_DONT_SYNC: when `name` is a mount point of a FUSE mount (this server's own, bind
    // mounted into the backing tree), the answer comes from its cache, never from a request.
    let flags = rustix::fs::AtFlags::SYMLINK_NOFOLLOW | rustix::fs::AtFlags::STATX_DONT_SYNC;
    let stx = rustix::fs::statx(dir.as_fd(), name, flags, rustix::fs::StatxFlags::INO).ok()?;
    inodes.node_by_key(libc::makedev(stx.stx_dev_major, stx.stx_dev_minor), stx.stx_ino)
}
