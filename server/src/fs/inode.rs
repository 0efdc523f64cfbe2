//! The inode table: backing (st_dev, st_ino) → kernel node id, with lookup counts, file
//! handles and a bounded LRU of cached O_PATH descriptors.
//!
//! An inode is identified on the backing file system by its `name_to_handle_at` file handle, so
//! its O_PATH descriptor can be closed when the cache is full and reopened later with
//! `open_by_handle_at`. Inodes that cannot be reopened that way (no handle support, O_TMPFILE
//! files, other file systems below the backing root) and inodes with open file handles keep
//! their descriptor pinned while they are referenced.
//!
//! One mutex guards the table; it is never held across a system call that may touch the
//! backing disk (handles are computed and descriptors opened/closed outside it).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use protocol::{Errno, NodeId, Result};

use super::sys;

/// A shared O_PATH descriptor; stays open while any operation still uses it, even after the
/// cache dropped it.
pub(crate) type InodeFd = Arc<OwnedFd>;

/// One known inode.
struct Inode {
    /// Backing (st_dev, st_ino).
    key: (u64, u64),
    /// `st_mode & S_IFMT`.
    kind: u32,
    /// File handle bytes, if the inode can be reopened by handle.
    handle: Option<Arc<[u8]>>,
    /// Kernel lookup references.
    lookups: u64,
    /// Open file handles on this inode (pin the descriptor).
    opens: u64,
    /// Cached or pinned O_PATH descriptor.
    fd: Option<InodeFd>,
    /// LRU stamp while the descriptor is cached and evictable.
    stamp: Option<u64>,
    /// Never removed nor evicted (the root).
    permanent: bool,
}

impl Inode {
    fn pinned(&self) -> bool {
        self.permanent || self.handle.is_none() || self.opens > 0
    }
}

struct Inner {
    nodes: HashMap<u64, Inode>,
    by_key: HashMap<(u64, u64), u64>,
    /// File handle bytes → node id (for change notifications from the backing file system).
    by_handle: HashMap<Arc<[u8]>, u64>,
    /// stamp → node id, oldest first.
    lru: BTreeMap<u64, u64>,
    /// Open file and directory handles (each holds one descriptor).
    open_handles: usize,
    /// Most cached (evictable) descriptors.
    max_cached: usize,
    /// Descriptors the table may hold in all: RLIMIT_NOFILE less a reserve for everything else
    /// the server opens (rings, notification fds, sockets, descriptors in flight).
    fd_budget: usize,
    next_stamp: u64,
    next_id: u64,
}

/// Descriptors to close once the table lock is released.
type Garbage = Vec<InodeFd>;

impl Inner {
    fn touch(&mut self, id: u64) {
        let stamp = self.next_stamp;
        if let Some(node) = self.nodes.get_mut(&id) {
            if let Some(old) = node.stamp.take() {
                self.lru.remove(&old);
                node.stamp = Some(stamp);
                self.lru.insert(stamp, id);
                self.next_stamp += 1;
            }
        }
    }

    /// Puts the node's descriptor under LRU management if it is cached and evictable.
    fn make_evictable(&mut self, id: u64, garbage: &mut Garbage) {
        let stamp = self.next_stamp;
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if node.fd.is_some() && !node.pinned() && node.stamp.is_none() {
            node.stamp = Some(stamp);
            self.lru.insert(stamp, id);
            self.next_stamp += 1;
        }
        self.evict(garbage);
    }

    /// Removes the node from the LRU (its descriptor becomes pinned or goes away).
    fn unlist(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            if let Some(s) = node.stamp.take() {
                self.lru.remove(&s);
            }
        }
    }

    /// How many evictable descriptors may stay cached now: `max_cached`, less what open
    /// handles take beyond the budget, so clients holding many files or directories open
    /// push cached descriptors out instead of meeting EMFILE.
    fn cache_room(&self) -> usize {
        let room = self.fd_budget.saturating_sub(self.open_handles);
        self.max_cached.min(room.max(MIN_CACHED.min(self.max_cached)))
    }

    /// Closes the least recently used cached descriptors beyond [`cache_room`](Self::cache_room).
    fn evict(&mut self, garbage: &mut Garbage) {
        let max = self.cache_room();
        while self.lru.len() > max {
            let Some((_, id)) = self.lru.pop_first() else {
                break;
            };
            if let Some(node) = self.nodes.get_mut(&id) {
                node.stamp = None;
                if let Some(fd) = node.fd.take() {
                    garbage.push(fd);
                }
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<Inode> {
        self.unlist(id);
        let node = self.nodes.remove(&id)?;
        if self.by_key.get(&node.key) == Some(&id) {
            self.by_key.remove(&node.key);
        }
        if let Some(h) = &node.handle {
            if self.by_handle.get(h) == Some(&id) {
                self.by_handle.remove(h);
            }
        }
        Some(node)
    }
}

/// RLIMIT_NOFILE (soft) less [`FD_RESERVE`].
fn fd_budget() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return usize::MAX;
    }
    (lim.rlim_cur as usize).saturating_sub(FD_RESERVE)
}

/// The table of inodes known to the kernel.
pub(crate) struct InodeTable {
    inner: Mutex<Inner>,
    /// Told about directories entering and leaving the table (the inotify watch).
    hooks: std::sync::OnceLock<Arc<dyn DirHooks>>,
    /// The backing root opened O_RDONLY: the mount fd for open_by_handle_at (which refuses
    /// O_PATH descriptors).
    mount_fd: OwnedFd,
    root_dev: u64,
}

/// Descriptors kept out of the inode table's budget for the rest of the server.
const FD_RESERVE: usize = 512;

/// Cached descriptors are never squeezed below this many.
const MIN_CACHED: usize = 64;

/// Observer of the directories the kernel knows (see [`InodeTable::set_hooks`]).
pub(crate) trait DirHooks: Send + Sync {
    /// Directory node `id` entered the table; `fd` is a descriptor of it.
    fn dir_added(&self, id: u64, fd: RawFd);
    /// Directory node `id` left the table.
    fn dir_removed(&self, id: u64);
}

impl InodeTable {
    /// Installs `hooks` (once); it is called outside the table's lock.
    pub(crate) fn set_hooks(&self, hooks: Arc<dyn DirHooks>) {
        let _ = self.hooks.set(hooks);
    }

    /// The node of backing inode (st_dev, st_ino), if the table has it.
    pub(crate) fn node_by_key(&self, dev: u64, ino: u64) -> Option<u64> {
        self.lock().by_key.get(&(dev, ino)).copied()
    }

    /// Creates the table with the root directory (node 1) pinned.
    pub(crate) fn new(root_fd: OwnedFd, max_cached: usize) -> Result<InodeTable> {
        let st = sys::fstat(root_fd.as_raw_fd())?;
        let mount_fd = sys::openat(root_fd.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC, 0)?;
        let root_fd = Arc::new(root_fd);
        let handle = sys::name_to_handle(root_fd.as_raw_fd()).ok().map(Arc::<[u8]>::from);
        let mut by_handle = HashMap::new();
        if let Some(h) = &handle {
            by_handle.insert(h.clone(), NodeId::ROOT.0);
        }
        let key = (st.st_dev, st.st_ino);
        let mut nodes = HashMap::new();
        nodes.insert(
            NodeId::ROOT.0,
            Inode {
                key,
                kind: st.st_mode & libc::S_IFMT,
                handle,
                lookups: 1,
                opens: 0,
                fd: Some(root_fd.clone()),
                stamp: None,
                permanent: true,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(key, NodeId::ROOT.0);
        Ok(InodeTable {
            inner: Mutex::new(Inner {
                nodes,
                by_key,
                by_handle,
                lru: BTreeMap::new(),
                open_handles: 0,
                max_cached: max_cached.max(1),
                fd_budget: fd_budget(),
                next_stamp: 1,
                next_id: 2,
            }),
            hooks: std::sync::OnceLock::new(),
            mount_fd,
            root_dev: st.st_dev,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the table consistent enough to go on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node whose backing file handle (complete `struct file_handle` bytes) is `handle`.
    pub(crate) fn node_by_handle(&self, handle: &[u8]) -> Option<u64> {
        self.lock().by_handle.get(handle).copied()
    }

    /// Number of inodes in the table (the root included).
    pub(crate) fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    /// Number of cached (evictable) descriptors.
    #[cfg(test)]
    pub(crate) fn cached_fds(&self) -> usize {
        self.lock().lru.len()
    }

    /// Lookup count of a node (0 if unknown).
    #[cfg(test)]
    pub(crate) fn lookups(&self, id: u64) -> u64 {
        self.lock().nodes.get(&id).map_or(0, |n| n.lookups)
    }

    /// The O_PATH descriptor and file type of node `id`, reopening it by handle if the cache
    /// dropped it. Must be called with root credentials (open_by_handle_at needs
    /// CAP_DAC_READ_SEARCH).
    pub(crate) fn get(&self, id: u64) -> Result<(InodeFd, u32)> {
        let (handle, kind) = {
            let mut g = self.lock();
            let node = g.nodes.get(&id).ok_or(Errno::ESTALE)?;
            let kind = node.kind;
            if let Some(fd) = &node.fd {
                let fd = fd.clone();
                g.touch(id);
                return Ok((fd, kind));
            }
            (node.handle.clone().ok_or(Errno::ESTALE)?, kind)
        };
        let fd = Arc::new(sys::open_by_handle(
            self.mount_fd.as_raw_fd(),
            &handle,
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )?);
        let mut garbage = Garbage::new();
        let fd = {
            let mut g = self.lock();
            match g.nodes.get_mut(&id) {
                Some(node) => match &node.fd {
                    Some(existing) => existing.clone(),
                    None => {
                        node.fd = Some(fd.clone());
                        g.make_evictable(id, &mut garbage);
                        fd
                    }
                },
                None => fd,
            }
        };
        drop(garbage);
        Ok((fd, kind))
    }

    /// Registers one more lookup reference for the inode `fd` (an O_PATH descriptor) with
    /// attributes `st`, creating the node if needed. `reopenable` is false for inodes that can
    /// never be reopened by handle (O_TMPFILE). Returns the node id and the node's descriptor.
    pub(crate) fn insert_or_ref(&self, fd: OwnedFd, st: &libc::stat, reopenable: bool) -> Result<(u64, InodeFd)> {
        let key = (st.st_dev, st.st_ino);
        let kind = st.st_mode & libc::S_IFMT;
        let fd = Arc::new(fd);
        // Outer None: not computed yet; inner None: no usable handle (pin the fd).
        let mut handle: Option<Option<Arc<[u8]>>> = None;
        loop {
            let mut garbage = Garbage::new();
            {
                let mut g = self.lock();
                if let Some(&id) = g.by_key.get(&key) {
                    let Some(node) = g.nodes.get_mut(&id) else {
                        // Cannot happen (by_key only names live nodes); repair and go on.
                        g.by_key.remove(&key);
                        continue;
                    };
                    if let Some(existing) = &node.fd {
                        // The descriptor keeps the backing inode alive, so (dev, ino) cannot
                        // have been reused: this is the same inode.
                        let existing = existing.clone();
                        node.lookups += 1;
                        g.touch(id);
                        return Ok((id, existing));
                    }
                    // Only a handle is left: (dev, ino) may belong to a new inode now.
                    match &handle {
                        None => {}
                        Some(h) => {
                            if h.is_some() && *h == node.handle {
                                node.lookups += 1;
                                node.fd = Some(fd.clone());
                                g.make_evictable(id, &mut garbage);
                                drop(g);
                                drop(garbage);
                                return Ok((id, fd));
                            }
                            // A different inode took over (dev, ino): detach the old node
                            // (the kernel may still reference it; it goes at its last forget).
                            g.by_key.remove(&key);
                        }
                    }
                }
                if let Some(h) = &handle {
                    let id = g.next_id;
                    g.next_id += 1;
                    g.nodes.insert(
                        id,
                        Inode {
                            key,
                            kind,
                            handle: h.clone(),
                            lookups: 1,
                            opens: 0,
                            fd: Some(fd.clone()),
                            stamp: None,
                            permanent: false,
                        },
                    );
                    g.by_key.insert(key, id);
                    if let Some(h) = h {
                        g.by_handle.insert(h.clone(), id);
                    }
                    g.make_evictable(id, &mut garbage);
                    drop(g);
                    drop(garbage);
                    if kind == libc::S_IFDIR {
                        if let Some(h) = self.hooks.get() {
                            h.dir_added(id, fd.as_raw_fd());
                        }
                    }
                    return Ok((id, fd));
                }
            }
            // Compute the handle without holding the lock, then re-check.
            handle = Some(if reopenable && st.st_dev == self.root_dev {
                sys::name_to_handle(fd.as_raw_fd()).ok().map(Arc::from)
            } else {
                None
            });
        }
    }

    /// Drops `n` lookup references; the node goes away at zero (unless files are open on it).
    pub(crate) fn forget(&self, id: u64, n: u64) {
        if id == NodeId::ROOT.0 {
            return;
        }
        let removed = {
            let mut g = self.lock();
            let Some(node) = g.nodes.get_mut(&id) else {
                return;
            };
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups > 0 || node.opens > 0 || node.permanent {
                return;
            }
            g.remove(id)
        };
        if removed.as_ref().is_some_and(|n| n.kind == libc::S_IFDIR) {
            if let Some(h) = self.hooks.get() {
                h.dir_removed(id);
            }
        }
        drop(removed);
    }

    /// Registers an open file or directory on `id`. An inode that can be reopened by handle
    /// takes the open descriptor as its own while open (its O_PATH one is closed), so an open
    /// file costs one descriptor; the others keep their pinned O_PATH descriptor. Every open
    /// handle shrinks the room left for cached descriptors (see `Inner::cache_room`).
    pub(crate) fn pin_open(&self, id: u64, file: &InodeFd) {
        let mut garbage = Garbage::new();
        {
            let mut g = self.lock();
            g.unlist(id);
            let inner = &mut *g;
            if let Some(node) = inner.nodes.get_mut(&id) {
                node.opens += 1;
                inner.open_handles += 1;
                if node.opens == 1 && node.handle.is_some() && !node.permanent {
                    if let Some(old) = node.fd.replace(file.clone()) {
                        garbage.push(old);
                    }
                } else if node.fd.is_none() {
                    node.fd = Some(file.clone());
                }
            }
            g.evict(&mut garbage);
        }
        drop(garbage);
    }

    /// An open file handle on node `id` was released.
    pub(crate) fn unpin(&self, id: u64) {
        let mut garbage = Garbage::new();
        let removed = {
            let mut g = self.lock();
            let inner = &mut *g;
            let Some(node) = inner.nodes.get_mut(&id) else {
                return;
            };
            if node.opens == 0 {
                return;
            }
            node.opens -= 1;
            inner.open_handles = inner.open_handles.saturating_sub(1);
            if node.opens > 0 {
                return;
            }
            if node.handle.is_some() && !node.permanent {
                // Possibly an open file's descriptor (see `pin_open`): let it close with its
                // handle; the inode is reopened by handle when needed.
                if let Some(fd) = node.fd.take() {
                    garbage.push(fd);
                }
            }
            if node.lookups == 0 && !node.permanent {
                g.remove(id)
            } else {
                g.make_evictable(id, &mut garbage);
                None
            }
        };
        drop(removed);
        drop(garbage);
    }
}
