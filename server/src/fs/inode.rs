//! The inode table: backing (st_dev, st_ino) → kernel node id, with lookup counts, file
//! handles and a bounded LRU of cached O_PATH descriptors.
//!
//! An inode is identified on the backing file system by its `name_to_handle_at` file handle, so
//! its O_PATH descriptor can be closed when the cache is full and reopened later with
//! `open_by_handle_at`. The handle is computed lazily, from the node's descriptor, only when
//! something needs it ([`Fh::Lazy`]): before the descriptor is evicted, when the node is
//! retired (forgotten, for file-handle export), at its first open (the open descriptor then
//! stands for the node's own), and at an export of the table; a new node computes it at once
//! only where it may be a retired inode found again (its (st_dev, st_ino) is a retired one's,
//! or retired inodes of unknown key were taken over from a previous server). A cold LOOKUP
//! thus costs no `name_to_handle_at`; the coherence watch resolves the handles of such nodes
//! by opening them ([`InodeTable::node_by_handle`]). Inodes that cannot be reopened that way (no handle support, O_TMPFILE
//! files, other file systems below the backing root) and inodes with open file handles keep
//! their descriptor pinned while they are referenced. Without CAP_DAC_READ_SEARCH
//! (`open_by_handle_at` refused, probed at start on the root's own handle) no inode is reopened
//! that way: all are pinned, and the number of known inodes is bounded by RLIMIT_NOFILE.
//!
//! One reader-writer lock guards the table; it is never held across a system call that may
//! touch the backing disk (descriptors are opened/closed outside it). Lazy handles are computed
//! under it where needed (eviction, retirement, first open): encoding the handle of an open
//! descriptor reads only the in-memory inode. The
//! request path's common cases only read it: finding a node's descriptor (every request that
//! names a node) and taking one more lookup reference on a known inode (a LOOKUP hit) run
//! under the shared lock, with the lookup count an atomic in the node and the cache's recency a
//! "referenced" bit (CLOCK, second chance) instead of a reordered LRU list; FORGET that leaves
//! the count above zero does too. Creating and dropping nodes, opens and evictions take the
//! exclusive lock.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ringfs_protocol::{Errno, NodeId, Result};

use super::{sys, IdHash};

/// A shared O_PATH descriptor; stays open while any operation still uses it, even after the
/// cache dropped it.
pub(crate) type InodeFd = Arc<OwnedFd>;

/// One known inode.
struct Inode {
    /// Backing (st_dev, st_ino).
    key: (u64, u64),
    /// `st_mode & S_IFMT`.
    kind: u32,
    /// File handle, if the inode can be reopened by handle (possibly not computed yet).
    handle: Fh,
    /// Kernel lookup references (taken under the shared lock, so atomic; dropped to zero only
    /// under the exclusive one).
    lookups: AtomicU64,
    /// Open file handles on this inode (pin the descriptor).
    opens: u64,
    /// Cached or pinned O_PATH descriptor.
    fd: Option<InodeFd>,
    /// The descriptor is cached and evictable (counted in `Inner::cached`).
    cached: bool,
    /// The node has an entry in `Inner::clock`.
    in_clock: bool,
    /// Used since the clock hand last passed (second chance).
    referenced: AtomicBool,
    /// Never removed nor evicted (the root).
    permanent: bool,
}

impl Inode {
    /// Marks the node used (for the cache's second chance); a store only when needed, so a
    /// hot node's cache line stays shared between cores.
    fn touch(&self) {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
    }

    fn pinned(&self) -> bool {
        self.permanent || self.handle == Fh::None || self.opens > 0
    }
}

/// An inode's file handle (`name_to_handle_at`).
#[derive(Clone, PartialEq, Eq)]
enum Fh {
    /// Not computed yet, but the inode can have one (on the backing root's file system, with
    /// `open_by_handle_at` allowed): it is computed from the node's descriptor when first
    /// needed ([`Inner::settle_handle`]). A node in this state always has a descriptor.
    Lazy,
    /// None: the node's descriptor is pinned.
    None,
    /// The complete `struct file_handle` bytes.
    Some(Arc<[u8]>),
}

impl Fh {
    fn bytes(&self) -> Option<&Arc<[u8]>> {
        match self {
            Fh::Some(h) => Some(h),
            _ => None,
        }
    }

    fn from_computed(h: Option<Arc<[u8]>>) -> Fh {
        h.map_or(Fh::None, Fh::Some)
    }
}

struct Inner {
    nodes: HashMap<u64, Inode, IdHash>,
    by_key: HashMap<(u64, u64), u64, IdHash>,
    /// File handle bytes → node id (for change notifications from the backing file system).
    /// Nodes whose handle is still [`Fh::Lazy`] are not in it: the watch resolves handles it
    /// does not find here by opening them ([`InodeTable::node_by_handle`]).
    by_handle: HashMap<Arc<[u8]>, u64, IdHash>,
    /// Nodes whose handle is [`Fh::Lazy`].
    lazy: usize,
    /// The CLOCK of cached descriptors: node ids in the order the hand visits them. May hold
    /// ids of nodes gone or no longer cached (skipped, and compacted away).
    clock: VecDeque<u64>,
    /// Cached (evictable) descriptors.
    cached: usize,
    /// Open file and directory handles (each holds one descriptor).
    open_handles: usize,
    /// Most cached (evictable) descriptors.
    max_cached: usize,
    /// Descriptors the table may hold in all: RLIMIT_NOFILE less a reserve for everything else
    /// the server opens (rings, notification fds, sockets, descriptors in flight).
    fd_budget: usize,
    next_id: u64,
    /// Forgotten inodes kept for file handles (export support), by node id.
    retired: HashMap<u64, Retired, IdHash>,
    /// File handle bytes → retired node id: a retired inode found again keeps its node id.
    retired_by_handle: HashMap<Arc<[u8]>, u64, IdHash>,
    /// Backing (st_dev, st_ino) → retired node id: a new node with that key computes its
    /// handle at once, to find out whether it is that retired inode found again.
    retired_by_key: HashMap<(u64, u64), u64, IdHash>,
    /// Retired inodes of unknown key (taken over from a previous server): while there are
    /// any, every new node computes its handle at once.
    unkeyed: usize,
    /// (retirement number, node id), oldest first; entries whose node was revived or retired
    /// again since are skipped when popped.
    retired_order: VecDeque<(u64, u64)>,
    /// Most retired inodes kept (0: none, no export support).
    max_retired: usize,
    next_retirement: u64,
}

/// An inode the kernel forgot, remembered so a file handle naming its node id still resolves.
struct Retired {
    handle: Arc<[u8]>,
    /// Backing (st_dev, st_ino), if known.
    key: Option<(u64, u64)>,
    /// Which retirement this is (see `Inner::retired_order`).
    number: u64,
}

/// Descriptors to close once the table lock is released.
/// The first one is kept inline: the request path (an open replacing the node's O_PATH
/// descriptor, its release dropping the open one) then allocates nothing.
#[derive(Default)]
struct Garbage {
    first: Option<InodeFd>,
    more: Vec<InodeFd>,
}

impl Garbage {
    fn new() -> Garbage {
        Garbage::default()
    }

    fn push(&mut self, fd: InodeFd) {
        match self.first {
            None => self.first = Some(fd),
            Some(_) => self.more.push(fd),
        }
    }
}

impl Inner {
    /// Puts the node's descriptor under the cache's management if it is cached and evictable.
    fn make_evictable(&mut self, id: u64, garbage: &mut Garbage) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        if node.fd.is_some() && !node.pinned() && !node.cached {
            node.cached = true;
            node.referenced.store(true, Ordering::Relaxed);
            self.cached += 1;
            if !node.in_clock {
                node.in_clock = true;
                self.clock.push_back(id);
            }
        }
        self.evict(garbage);
    }

    /// Takes the node out of the cache's management (its descriptor becomes pinned or goes
    /// away); its clock entry, if any, is skipped later.
    fn unlist(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            if node.cached {
                node.cached = false;
                self.cached -= 1;
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

    /// Closes cached descriptors beyond [`cache_room`](Self::cache_room), the least recently
    /// used first as CLOCK approximates it: the hand skips (and clears) referenced ones once.
    fn evict(&mut self, garbage: &mut Garbage) {
        let max = self.cache_room();
        while self.cached > max {
            let Some(id) = self.clock.pop_front() else {
                break;
            };
            let Some(node) = self.nodes.get_mut(&id) else {
                continue;
            };
            node.in_clock = false;
            if !node.cached {
                continue;
            }
            if node.referenced.swap(false, Ordering::Relaxed) {
                node.in_clock = true;
                self.clock.push_back(id);
                continue;
            }
            // Only a node with a handle can be reopened: one without (a failed encoding)
            // becomes pinned instead.
            if !self.settle_handle(id) {
                continue;
            }
            let Some(node) = self.nodes.get_mut(&id) else {
                continue;
            };
            node.cached = false;
            self.cached -= 1;
            if let Some(fd) = node.fd.take() {
                garbage.push(fd);
            }
        }
        // Entries of nodes gone or no longer cached pile up under churn: compact.
        if self.clock.len() > 2 * self.cached + 64 {
            let nodes = &mut self.nodes;
            self.clock.retain(|id| match nodes.get_mut(id) {
                Some(n) if n.in_clock && n.cached => true,
                Some(n) => {
                    n.in_clock = false;
                    false
                }
                None => false,
            });
        }
    }

    /// Gives node `id` its file handle now if it is still [`Fh::Lazy`], computed from its
    /// descriptor; true when the node has a handle. Runs under the table's lock: encoding the
    /// handle of an open descriptor reads the in-memory inode (its number and generation on
    /// the file systems that give handles), never the disk. A node whose encoding fails gets
    /// [`Fh::None`] and becomes pinned.
    fn settle_handle(&mut self, id: u64) -> bool {
        let Some(node) = self.nodes.get(&id) else {
            return false;
        };
        match &node.handle {
            Fh::Some(_) => return true,
            Fh::None => return false,
            Fh::Lazy => {}
        }
        let h = node.fd.as_ref().and_then(|fd| sys::name_to_handle(fd.as_raw_fd()).ok());
        self.set_handle(id, Fh::from_computed(h))
    }

    /// Sets lazy node `id`'s handle to `fh`; true when the node has a handle afterwards.
    fn set_handle(&mut self, id: u64, fh: Fh) -> bool {
        let Some(node) = self.nodes.get_mut(&id) else {
            return false;
        };
        if node.handle != Fh::Lazy {
            return node.handle != Fh::None;
        }
        self.lazy -= 1;
        match fh {
            Fh::Some(h) => {
                node.handle = Fh::Some(h.clone());
                self.by_handle.insert(h, id);
                true
            }
            _ => {
                node.handle = Fh::None;
                self.unlist(id);
                false
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<Inode> {
        self.unlist(id);
        if self.max_retired > 0 {
            // Retirement keeps the handle: compute it while the descriptor is at hand.
            self.settle_handle(id);
        }
        let node = self.nodes.remove(&id)?;
        if node.handle == Fh::Lazy {
            self.lazy -= 1;
        }
        if self.by_key.get(&node.key) == Some(&id) {
            self.by_key.remove(&node.key);
        }
        if let Fh::Some(h) = &node.handle {
            if self.by_handle.get(h) == Some(&id) {
                self.by_handle.remove(h);
            }
            self.retire(id, h.clone(), Some(node.key));
        }
        Some(node)
    }

    /// Forgets retired node `id` (whatever its retirement number).
    fn unretire(&mut self, id: u64) -> Option<Retired> {
        let r = self.retired.remove(&id)?;
        match r.key {
            Some(key) => {
                if self.retired_by_key.get(&key) == Some(&id) {
                    self.retired_by_key.remove(&key);
                }
            }
            None => self.unkeyed -= 1,
        }
        Some(r)
    }

    /// Remembers forgotten node `id` with file handle `handle` and backing key `key` (if
    /// export support keeps any).
    fn retire(&mut self, id: u64, handle: Arc<[u8]>, key: Option<(u64, u64)>) {
        if self.max_retired == 0 {
            return;
        }
        let number = self.next_retirement;
        self.next_retirement += 1;
        if let Some(old) = self.retired_by_handle.insert(handle.clone(), id) {
            if old != id {
                self.unretire(old);
            }
        }
        self.unretire(id);
        match key {
            Some(key) => {
                self.retired_by_key.insert(key, id);
            }
            None => self.unkeyed += 1,
        }
        self.retired.insert(id, Retired { handle, key, number });
        self.retired_order.push_back((number, id));
        while self.retired.len() > self.max_retired {
            let Some((number, id)) = self.retired_order.pop_front() else {
                break;
            };
            self.forget_retired(id, number);
        }
        // Skipped entries (revived or retired again) pile up under churn: compact.
        if self.retired_order.len() > 2 * self.max_retired + 64 {
            let retired = &self.retired;
            self.retired_order.retain(|(n, id)| retired.get(id).is_some_and(|r| r.number == *n));
        }
    }

    /// Drops retired node `id` if `number` is still its current retirement.
    fn forget_retired(&mut self, id: u64, number: u64) {
        if self.retired.get(&id).is_some_and(|r| r.number == number) {
            if let Some(r) = self.unretire(id) {
                if self.retired_by_handle.get(&r.handle) == Some(&id) {
                    self.retired_by_handle.remove(&r.handle);
                }
            }
        }
    }

    /// The node id to give a new node with file handle `handle`: the one it had before it was
    /// forgotten, if remembered, so a file handle issued then still names it.
    fn take_id(&mut self, handle: Option<&Arc<[u8]>>) -> u64 {
        if let Some(id) = handle.and_then(|h| self.retired_by_handle.remove(h)) {
            self.unretire(id);
            if !self.nodes.contains_key(&id) {
                return id;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

/// Two random 64-bit words from the operating system's random source. There is no weaker
/// fallback: a guessable key would make file handles guessable.
fn random_key() -> Result<[u64; 2]> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| {
        log::error!("no random key for file-handle generations: {e}");
        Errno::EIO
    })?;
    let (lo, hi) = b.split_at(8);
    Ok([u64::from_ne_bytes(lo.try_into().unwrap_or_default()), u64::from_ne_bytes(hi.try_into().unwrap_or_default())])
}

/// RLIMIT_NOFILE (soft) less [`FD_RESERVE`].
fn fd_budget() -> usize {
    // None: RLIM_INFINITY.
    match rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
        Some(cur) => (cur as usize).saturating_sub(FD_RESERVE),
        None => usize::MAX,
    }
}

/// The descriptor a new node would get: one of its own, or an open file's, shared.
enum NewFd<'a> {
    Owned(OwnedFd),
    Shared(&'a InodeFd),
}

/// The table of inodes known to the kernel.
pub(crate) struct InodeTable {
    inner: RwLock<Inner>,
    /// Told about directories entering and leaving the table (the inotify watch).
    hooks: std::sync::OnceLock<Arc<dyn DirHooks>>,
    /// The backing root opened O_RDONLY: the mount fd for open_by_handle_at (which refuses
    /// O_PATH descriptors).
    mount_fd: OwnedFd,
    root_dev: u64,
    /// Backing (st_dev, st_ino) of the root.
    root_key: (u64, u64),
    /// `open_by_handle_at` works here (probed at start on the root's own handle; it needs
    /// CAP_DAC_READ_SEARCH). Without it, every inode keeps its O_PATH descriptor while the
    /// kernel references it (no eviction), as libfuse's passthrough_ll does, so the number of
    /// known inodes is bounded by RLIMIT_NOFILE.
    reopen_by_handle: bool,
    /// Keys the node generations (see [`InodeTable::generation`]); random, or carried over
    /// from the previous server of this mount ([`InodeTable::import`]).
    gen_key: [AtomicU64; 2],
    /// The crash-failover journal, when failover is on: told about every node that enters or
    /// leaves the table.
    journal: std::sync::OnceLock<Arc<super::journal::Journal>>,
}

/// One inode the kernel holds, as handed to the next server at a live upgrade.
pub(crate) struct LiveNode {
    pub(crate) id: u64,
    pub(crate) key: (u64, u64),
    pub(crate) kind: u32,
    pub(crate) lookups: u64,
    pub(crate) handle: Option<Vec<u8>>,
    /// The pinned descriptor of a node without a handle (sent along).
    pub(crate) fd: Option<InodeFd>,
}

/// What a later server of the same mount needs so that file handles given out by this one
/// still resolve: the generation key, the next node id, and (node id, backing file handle)
/// of the inodes to remember, most recently used first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HandleState {
    /// Backing (st_dev, st_ino) of the root: the state only fits the same backing directory.
    pub(crate) root_key: (u64, u64),
    pub(crate) gen_key: [u64; 2],
    pub(crate) next_id: u64,
    pub(crate) nodes: Vec<(u64, Vec<u8>)>,
}

/// Backing (st_dev, st_ino) of an inode.
pub(crate) type BackingKey = (u64, u64);

/// Export order of a live node: (recently used, node id), larger first.
type Recency = (bool, u64);

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
        self.read().by_key.get(&(dev, ino)).copied()
    }

    /// Creates the table with the root directory (node 1) pinned. `max_retired` forgotten
    /// inodes stay resolvable by node id for file handles ([`revive`](Self::revive)).
    pub(crate) fn new(root_fd: OwnedFd, max_cached: usize, max_retired: usize) -> Result<InodeTable> {
        let st = sys::fstat(root_fd.as_raw_fd())?;
        let mount_fd = sys::openat(root_fd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC, 0)?;
        let root_fd = Arc::new(root_fd);
        let handle = sys::name_to_handle(root_fd.as_raw_fd()).ok();
        // The root's own handle reopened: EPERM without CAP_DAC_READ_SEARCH.
        let reopen_by_handle = handle.as_ref().is_some_and(|h| {
            sys::open_by_handle(mount_fd.as_raw_fd(), h, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC).is_ok()
        });
        let handle = handle.filter(|_| reopen_by_handle);
        let mut by_handle = HashMap::default();
        if let Some(h) = &handle {
            by_handle.insert(h.clone(), NodeId::ROOT.0);
        }
        let key = (st.st_dev, st.st_ino);
        let mut nodes = HashMap::default();
        nodes.insert(
            NodeId::ROOT.0,
            Inode {
                key,
                kind: st.st_mode & libc::S_IFMT,
                handle: Fh::from_computed(handle),
                lookups: AtomicU64::new(1),
                opens: 0,
                fd: Some(root_fd.clone()),
                cached: false,
                in_clock: false,
                referenced: AtomicBool::new(false),
                permanent: true,
            },
        );
        let mut by_key = HashMap::default();
        by_key.insert(key, NodeId::ROOT.0);
        Ok(InodeTable {
            inner: RwLock::new(Inner {
                nodes,
                by_key,
                by_handle,
                lazy: 0,
                clock: VecDeque::new(),
                cached: 0,
                open_handles: 0,
                max_cached: max_cached.max(1),
                fd_budget: fd_budget(),
                next_id: 2,
                retired: HashMap::default(),
                retired_by_handle: HashMap::default(),
                retired_by_key: HashMap::default(),
                unkeyed: 0,
                retired_order: VecDeque::new(),
                max_retired,
                next_retirement: 0,
            }),
            hooks: std::sync::OnceLock::new(),
            mount_fd,
            root_dev: st.st_dev,
            root_key: key,
            reopen_by_handle,
            gen_key: random_key()?.map(AtomicU64::new),
            journal: std::sync::OnceLock::new(),
        })
    }

    /// The state to hand to the next server of this mount: every inode with a file handle,
    /// known or forgotten, most recently used first, at most `max_retired`.
    pub(crate) fn export(&self) -> HandleState {
        self.settle_all();
        let g = self.read();
        let mut live: Vec<(Recency, u64, &Arc<[u8]>)> = g
            .nodes
            .iter()
            .filter(|(_, n)| !n.permanent)
            // Recently used (referenced, or pinned by an open) first, then the newest ids.
            .filter_map(|(&id, n)| {
                let recent = !n.cached || n.referenced.load(Ordering::Relaxed);
                n.handle.bytes().map(|h| ((recent, id), id, h))
            })
            .collect();
        live.sort_by_key(|e| std::cmp::Reverse(e.0));
        let mut retired: Vec<(u64, u64, &Arc<[u8]>)> =
            g.retired.iter().map(|(&id, r)| (r.number, id, &r.handle)).collect();
        retired.sort_by_key(|e| std::cmp::Reverse(e.0));
        let nodes = live
            .into_iter()
            .map(|(_, id, h)| (id, h))
            .chain(retired.into_iter().map(|(_, id, h)| (id, h)))
            .take(g.max_retired)
            .map(|(id, h)| (id, h.to_vec()))
            .collect();
        HandleState {
            root_key: self.root_key,
            gen_key: [self.gen_key[0].load(Ordering::Relaxed), self.gen_key[1].load(Ordering::Relaxed)],
            next_id: g.next_id,
            nodes,
        }
    }

    /// The inodes the kernel holds references to (live upgrade): id, backing key, file type,
    /// lookup count, file handle; and, for those without a handle, their pinned descriptor.
    pub(crate) fn export_live(&self) -> Vec<LiveNode> {
        self.settle_all();
        let g = self.read();
        g.nodes
            .iter()
            .filter(|(_, n)| !n.permanent)
            .map(|(&id, n)| LiveNode {
                id,
                key: n.key,
                kind: n.kind,
                lookups: n.lookups.load(Ordering::Relaxed),
                handle: n.handle.bytes().map(|h| h.to_vec()),
                fd: if n.handle.bytes().is_none() { n.fd.clone() } else { None },
            })
            .collect()
    }

    /// Takes over the inodes a previous server of this mount exported with
    /// [`export_live`](Self::export_live), under their node ids, before any request is served.
    /// A node without a handle must come with its descriptor (else it is skipped: EINVAL).
    pub(crate) fn import_live(&self, nodes: Vec<LiveNode>) -> Result<()> {
        let mut g = self.write();
        let mut garbage = Garbage::new();
        for n in nodes {
            if n.id <= NodeId::ROOT.0 || g.nodes.contains_key(&n.id) {
                return Err(Errno::EINVAL);
            }
            if n.handle.is_none() && n.fd.is_none() {
                return Err(Errno::EINVAL);
            }
            let handle: Option<Arc<[u8]>> = n.handle.map(Arc::from);
            g.unretire(n.id);
            if let Some(h) = &handle {
                g.retired_by_handle.remove(h);
                g.by_handle.insert(h.clone(), n.id);
            }
            g.by_key.insert(n.key, n.id);
            g.next_id = g.next_id.max(n.id + 1);
            g.nodes.insert(
                n.id,
                Inode {
                    key: n.key,
                    kind: n.kind,
                    handle: Fh::from_computed(handle),
                    lookups: AtomicU64::new(n.lookups),
                    opens: 0,
                    fd: n.fd,
                    cached: false,
                    in_clock: false,
                    referenced: AtomicBool::new(false),
                    permanent: false,
                },
            );
            if g.nodes.get(&n.id).is_some_and(|x| x.fd.is_some() && x.handle.bytes().is_some()) {
                g.make_evictable(n.id, &mut garbage);
            }
        }
        drop(g);
        drop(garbage);
        Ok(())
    }

    /// Takes over a previous server's [`HandleState`] (before any request is served): its
    /// inodes become forgotten ones, resolvable under their old node ids. Refused
    /// (`EINVAL`) for another backing directory.
    pub(crate) fn import(&self, state: &HandleState) -> Result<()> {
        if state.root_key != self.root_key {
            return Err(Errno::EINVAL);
        }
        let mut g = self.write();
        if g.nodes.len() > 1 || g.max_retired == 0 {
            return Err(Errno::EINVAL);
        }
        self.gen_key[0].store(state.gen_key[0], Ordering::Relaxed);
        self.gen_key[1].store(state.gen_key[1], Ordering::Relaxed);
        g.next_id = g.next_id.max(state.next_id);
        // Oldest first, so the most recently used are retired last and kept longest.
        for (id, handle) in state.nodes.iter().rev() {
            if *id <= NodeId::ROOT.0 || *id >= state.next_id {
                continue;
            }
            g.retire(*id, Arc::from(handle.as_slice()), None);
        }
        Ok(())
    }

    /// Starts telling `journal` about nodes (crash failover); returns the nodes live now
    /// (id, key, file type, handle), for the journal's first records. Before any request.
    pub(crate) fn set_journal(&self, journal: Arc<super::journal::Journal>) -> Vec<LiveNode> {
        let _ = self.journal.set(journal);
        self.export_live()
    }

    /// The generation key and the next node id (for a failover journal).
    pub(crate) fn keys(&self) -> ([u64; 2], u64) {
        ([self.gen_key[0].load(Ordering::Relaxed), self.gen_key[1].load(Ordering::Relaxed)], self.read().next_id)
    }

    /// Takes over a dead server's generation key and next node id (crash failover; before any
    /// request), so its node ids and file handles stay valid and no id is given out twice.
    pub(crate) fn set_keys(&self, gen_key: [u64; 2], next_id: u64) {
        self.gen_key[0].store(gen_key[0], Ordering::Relaxed);
        self.gen_key[1].store(gen_key[1], Ordering::Relaxed);
        let mut g = self.write();
        g.next_id = g.next_id.max(next_id);
    }

    /// Opens node `id` again from its file handle with `flags` (crash failover: the open files
    /// of a dead server). Root credentials.
    pub(crate) fn reopen_handle(&self, id: u64, flags: i32) -> Result<OwnedFd> {
        let handle = self.read().nodes.get(&id).and_then(|n| n.handle.bytes().cloned()).ok_or(Errno::ESTALE)?;
        sys::open_by_handle(self.mount_fd.as_raw_fd(), &handle, flags | libc::O_CLOEXEC)
    }

    /// True when the backing file system gives file handles (the root has one).
    /// Whether evicted descriptors can be reopened by file handle (`open_by_handle_at` works:
    /// CAP_DAC_READ_SEARCH, and handles on the backing file system). When not, every inode is
    /// pinned, and no file handles are given out.
    pub(crate) fn reopens_by_handle(&self) -> bool {
        self.reopen_by_handle
    }

    pub(crate) fn handles_supported(&self) -> bool {
        self.read().nodes.get(&NodeId::ROOT.0).is_some_and(|n| n.handle.bytes().is_some())
    }

    /// Backing (st_dev, st_ino) of the root directory.
    pub(crate) fn root_key(&self) -> (u64, u64) {
        self.root_key
    }

    /// The generation given out with node `id`: 0 for the root (the kernel's own choice),
    /// otherwise a 32-bit value keyed by a per-process random key, so node ids (which count
    /// up) do not make file handles guessable. Node ids are never reused for another inode, so
    /// (id, generation) is unique; the kernel keeps generations as 32 bits.
    pub(crate) fn generation(&self, id: u64) -> u64 {
        use std::hash::Hasher;
        if id == NodeId::ROOT.0 {
            return 0;
        }
        let mut h = siphasher::sip::SipHasher24::new_with_keys(
            self.gen_key[0].load(Ordering::Relaxed),
            self.gen_key[1].load(Ordering::Relaxed),
        );
        h.write_u64(id);
        h.finish() & 0xffff_ffff
    }

    /// Takes one more lookup reference on live node `id` and returns its descriptor; `None`
    /// if the node is not in the table (forgotten).
    pub(crate) fn add_ref(&self, id: u64) -> Result<Option<InodeFd>> {
        let fd = match self.get(id) {
            Ok((fd, _)) => fd,
            Err(e) if e == Errno::ESTALE => return Ok(None),
            Err(e) => return Err(e),
        };
        let g = self.read();
        match g.nodes.get(&id) {
            Some(node) => {
                node.lookups.fetch_add(1, Ordering::Relaxed);
                Ok(Some(fd))
            }
            None => Ok(None),
        }
    }

    /// Reopens forgotten node `id` from its file handle, if it is still remembered: an O_PATH
    /// descriptor to register again with [`insert_or_ref`](Self::insert_or_ref) (which gives
    /// it its old node id back). `ESTALE` when forgotten for good or the file is gone. Must be
    /// called with root credentials.
    pub(crate) fn revive(&self, id: u64) -> Result<OwnedFd> {
        let handle = self.read().retired.get(&id).map(|r| r.handle.clone()).ok_or(Errno::ESTALE)?;
        sys::open_by_handle(self.mount_fd.as_raw_fd(), &handle, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .map_err(|e| if e == Errno::ENOENT { Errno::ESTALE } else { e })
    }

    /// Number of forgotten inodes remembered for file handles.
    pub(crate) fn retired_len(&self) -> usize {
        self.read().retired.len()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock leaves the table consistent enough to go on.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The node whose backing file handle (complete `struct file_handle` bytes) is `handle`.
    /// A handle not in the table while nodes of unknown handle exist ([`Fh::Lazy`]) is opened
    /// (`open_by_handle_at`) and its (st_dev, st_ino) looked up; a node found that way keeps
    /// the handle, so the next event about it is a map lookup. Off the request path: the
    /// watch calls this per event it does not skip, and caches answers per batch.
    pub(crate) fn node_by_handle(&self, handle: &[u8]) -> Option<u64> {
        {
            let g = self.read();
            if let Some(&id) = g.by_handle.get(handle) {
                return Some(id);
            }
            if g.lazy == 0 {
                return None;
            }
        }
        let fd =
            sys::open_by_handle(self.mount_fd.as_raw_fd(), handle, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .ok()?;
        let st = sys::fstat(fd.as_raw_fd()).ok()?;
        let id = {
            let g = self.read();
            let id = *g.by_key.get(&(st.st_dev, st.st_ino))?;
            let node = g.nodes.get(&id)?;
            // Only a node whose descriptor is open: it holds its inode, so (dev, ino) names that
            // same inode (a node known by handle alone may be a gone inode whose number was
            // reused). One known under other handle bytes (another handle type) is it too.
            node.fd.as_ref()?;
            if node.handle != Fh::Lazy {
                return Some(id);
            }
            id
        };
        self.write().set_handle(id, Fh::Some(Arc::from(handle)));
        Some(id)
    }

    /// Node `id`'s file handle (computed now if it was not yet) and backing (st_dev, st_ino);
    /// `None` for a node without a handle.
    pub(crate) fn handle_and_key(&self, id: u64) -> Option<(Arc<[u8]>, BackingKey)> {
        let fd = {
            let g = self.read();
            let node = g.nodes.get(&id)?;
            match &node.handle {
                Fh::Some(h) => return Some((h.clone(), node.key)),
                Fh::None => return None,
                Fh::Lazy => node.fd.clone()?,
            }
        };
        let fh = Fh::from_computed(sys::name_to_handle(fd.as_raw_fd()).ok());
        let mut g = self.write();
        g.set_handle(id, fh);
        let node = g.nodes.get(&id)?;
        Some((node.handle.bytes()?.clone(), node.key))
    }

    /// Computes the handles still [`Fh::Lazy`] (before an export), outside the lock.
    fn settle_all(&self) {
        let todo: Vec<(u64, InodeFd)> = {
            let g = self.read();
            if g.lazy == 0 {
                return;
            }
            g.nodes
                .iter()
                .filter(|(_, n)| n.handle == Fh::Lazy)
                .filter_map(|(&id, n)| Some((id, n.fd.clone()?)))
                .collect()
        };
        let computed: Vec<(u64, Fh)> = todo
            .into_iter()
            .map(|(id, fd)| (id, Fh::from_computed(sys::name_to_handle(fd.as_raw_fd()).ok())))
            .collect();
        let mut g = self.write();
        for (id, fh) in computed {
            g.set_handle(id, fh);
        }
    }

    /// Number of inodes in the table (the root included).
    pub(crate) fn len(&self) -> usize {
        self.read().nodes.len()
    }

    /// Number of cached (evictable) descriptors.
    #[cfg(test)]
    pub(crate) fn cached_fds(&self) -> usize {
        self.read().cached
    }

    /// Number of nodes whose file handle is not computed yet.
    #[cfg(test)]
    pub(crate) fn lazy_handles(&self) -> usize {
        self.read().lazy
    }

    /// Lookup count of a node (0 if unknown).
    #[cfg(test)]
    pub(crate) fn lookups(&self, id: u64) -> u64 {
        self.read().nodes.get(&id).map_or(0, |n| n.lookups.load(Ordering::Relaxed))
    }

    /// The O_PATH descriptor and file type of node `id`, reopening it by handle if the cache
    /// dropped it. Must be called with root credentials (open_by_handle_at needs
    /// CAP_DAC_READ_SEARCH).
    pub(crate) fn get(&self, id: u64) -> Result<(InodeFd, u32)> {
        let (handle, kind) = {
            let g = self.read();
            let node = g.nodes.get(&id).ok_or(Errno::ESTALE)?;
            let kind = node.kind;
            if let Some(fd) = &node.fd {
                node.touch();
                return Ok((fd.clone(), kind));
            }
            (node.handle.bytes().cloned().ok_or(Errno::ESTALE)?, kind)
        };
        let fd = Arc::new(sys::open_by_handle(
            self.mount_fd.as_raw_fd(),
            &handle,
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )?);
        let mut garbage = Garbage::new();
        let fd = {
            let mut g = self.write();
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
        self.insert_or_ref_fd(NewFd::Owned(fd), st, reopenable, false)
            .map(|r| r.expect("a node without a handle is allowed"))
    }

    /// [`insert_or_ref`](Self::insert_or_ref) for a file just opened (and created) by the
    /// server, which [`pin_open`](Self::pin_open) is about to give the node as its descriptor
    /// anyway: a node that can be reopened by handle takes `file` from the start, which saves
    /// opening an O_PATH descriptor (through /proc) only to close it again at `pin_open`. `None`
    /// when the node would have no file handle: its descriptor must then be an O_PATH one of
    /// its own (it outlives the open), so call `insert_or_ref` with one.
    pub(crate) fn insert_or_ref_open(
        &self,
        file: &InodeFd,
        st: &libc::stat,
        reopenable: bool,
    ) -> Result<Option<(u64, InodeFd)>> {
        self.insert_or_ref_fd(NewFd::Shared(file), st, reopenable, true)
    }

    /// Both of the above; `need_handle`: create no node without a file handle (answer `None`).
    fn insert_or_ref_fd(
        &self,
        fd: NewFd<'_>,
        st: &libc::stat,
        reopenable: bool,
        need_handle: bool,
    ) -> Result<Option<(u64, InodeFd)>> {
        let key = (st.st_dev, st.st_ino);
        let kind = st.st_mode & libc::S_IFMT;
        // Outer None: not computed yet; inner None: no usable handle (pin the fd).
        let mut handle: Option<Option<Arc<[u8]>>> = None;
        // The inode can have a handle that reopens it.
        let candidate = reopenable && self.reopen_by_handle && st.st_dev == self.root_dev;
        {
            // A known inode whose descriptor is at hand (a LOOKUP hit): the shared lock will do.
            let g = self.read();
            if let Some((&id, node)) = g.by_key.get(&key).and_then(|id| g.nodes.get(id).map(|n| (id, n))) {
                if let Some(existing) = &node.fd {
                    node.lookups.fetch_add(1, Ordering::Relaxed);
                    node.touch();
                    return Ok(Some((id, existing.clone())));
                }
            }
        }
        // Shared only now: a LOOKUP hit (above) allocates nothing.
        let fd = match fd {
            NewFd::Owned(fd) => Arc::new(fd),
            NewFd::Shared(fd) => fd.clone(),
        };
        loop {
            let mut garbage = Garbage::new();
            {
                let mut g = self.write();
                if let Some(&id) = g.by_key.get(&key) {
                    let Some(node) = g.nodes.get_mut(&id) else {
                        // Cannot happen (by_key only names live nodes); repair and go on.
                        g.by_key.remove(&key);
                        continue;
                    };
                    if let Some(existing) = &node.fd {
                        // The descriptor keeps the backing inode alive, so (dev, ino) cannot
                        // have been reused: this is the same inode.
                        node.lookups.fetch_add(1, Ordering::Relaxed);
                        node.touch();
                        return Ok(Some((id, existing.clone())));
                    }
                    // Only a handle is left: (dev, ino) may belong to a new inode now.
                    match &handle {
                        None => {}
                        Some(h) => {
                            if h.is_some() && h.as_ref() == node.handle.bytes() {
                                node.lookups.fetch_add(1, Ordering::Relaxed);
                                node.fd = Some(fd.clone());
                                g.make_evictable(id, &mut garbage);
                                drop(g);
                                drop(garbage);
                                return Ok(Some((id, fd)));
                            }
                            // A different inode took over (dev, ino): detach the old node
                            // (the kernel may still reference it; it goes at its last forget).
                            g.by_key.remove(&key);
                        }
                    }
                }
                // The handle of a new node: computed only where it is needed now (a node that
                // may be a retired inode found again, or one that replaces the open file's
                // descriptor at once); otherwise from its descriptor when first needed.
                let fh = match &handle {
                    Some(h) => Some(Fh::from_computed(h.clone())),
                    None if !candidate => Some(Fh::None),
                    None if need_handle || g.unkeyed > 0 || g.retired_by_key.contains_key(&key) => None,
                    None => Some(Fh::Lazy),
                };
                if let Some(fh) = fh {
                    if need_handle && fh == Fh::None {
                        return Ok(None);
                    }
                    let id = g.take_id(fh.bytes());
                    if fh == Fh::Lazy {
                        g.lazy += 1;
                    }
                    g.nodes.insert(
                        id,
                        Inode {
                            key,
                            kind,
                            handle: fh.clone(),
                            lookups: AtomicU64::new(1),
                            opens: 0,
                            fd: Some(fd.clone()),
                            cached: false,
                            in_clock: false,
                            referenced: AtomicBool::new(false),
                            permanent: false,
                        },
                    );
                    g.by_key.insert(key, id);
                    if let Fh::Some(h) = fh {
                        g.by_handle.insert(h, id);
                    }
                    // Under the lock, so that the journal sees a node's life in order. A node
                    // the journal names needs its handle now (a server after a crash reopens
                    // it from there).
                    if let Some(j) = self.journal.get() {
                        g.settle_handle(id);
                        let h = g.nodes.get(&id).and_then(|n| n.handle.bytes().cloned());
                        j.node(id, key, kind, h.as_deref());
                    }
                    g.make_evictable(id, &mut garbage);
                    drop(g);
                    drop(garbage);
                    if kind == libc::S_IFDIR {
                        if let Some(h) = self.hooks.get() {
                            h.dir_added(id, fd.as_raw_fd());
                        }
                    }
                    return Ok(Some((id, fd)));
                }
            }
            // Compute the handle without holding the lock, then re-check.
            handle = Some(if candidate { sys::name_to_handle(fd.as_raw_fd()).ok() } else { None });
        }
    }

    /// Drops `n` lookup references; the node goes away at zero (unless files are open on it).
    pub(crate) fn forget(&self, id: u64, n: u64) {
        if id == NodeId::ROOT.0 {
            return;
        }
        {
            // References left afterwards: the shared lock will do (FORGET arrives on the
            // /dev/fuse reader while queues take references; the count is an atomic).
            let g = self.read();
            let Some(node) = g.nodes.get(&id) else {
                return;
            };
            let mut cur = node.lookups.load(Ordering::Relaxed);
            while cur > n {
                match node.lookups.compare_exchange_weak(cur, cur - n, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => return,
                    Err(now) => cur = now,
                }
            }
        }
        let removed = {
            let mut g = self.write();
            let Some(node) = g.nodes.get_mut(&id) else {
                return;
            };
            let left = node.lookups.load(Ordering::Relaxed).saturating_sub(n);
            node.lookups.store(left, Ordering::Relaxed);
            if left > 0 || node.opens > 0 || node.permanent {
                return;
            }
            if let Some(j) = self.journal.get() {
                j.node_gone(id);
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
            let mut g = self.write();
            g.unlist(id);
            // The first open of a node of lazy handle computes it: the open descriptor can
            // then stand for the node's own (one descriptor per open file), and be dropped at
            // the release.
            let first = g.nodes.get(&id).is_some_and(|n| n.opens == 0 && !n.permanent);
            let shares = first && g.settle_handle(id);
            let inner = &mut *g;
            if let Some(node) = inner.nodes.get_mut(&id) {
                node.opens += 1;
                inner.open_handles += 1;
                if shares {
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
            let mut g = self.write();
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
            if node.handle.bytes().is_some() && !node.permanent {
                // Possibly an open file's descriptor (see `pin_open`): let it close with its
                // handle; the inode is reopened by handle when needed.
                if let Some(fd) = node.fd.take() {
                    garbage.push(fd);
                }
            }
            if node.lookups.load(Ordering::Relaxed) == 0 && !node.permanent {
                if let Some(j) = self.journal.get() {
                    j.node_gone(id);
                }
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
