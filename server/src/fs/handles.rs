//! Open file and directory handles (fh → descriptor), and directory streams.
//!
//! The table is sharded (64 mutex-guarded maps on cache lines of their own, picked by fh) and
//! handle numbers come from per-thread blocks, so concurrent opens, reads and releases on
//! different queues do not meet on one lock or one counter.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ringfs_protocol::{Errno, Result};

use super::sys;
use super::IdHash;

/// One entry read from the backing directory, borrowed from the read buffer.
pub(crate) struct DirEntry<'a> {
    /// Backing inode number.
    pub(crate) ino: u64,
    /// Cookie of the entry after this one (the backing d_off).
    pub(crate) off: u64,
    /// DT_* type.
    pub(crate) kind: u8,
    /// The name (NUL-terminated in the buffer).
    pub(crate) name: &'a CStr,
}

/// The read position of an open directory.
pub(crate) struct DirStream {
    /// Raw `linux_dirent64` records read from the backing directory but not yet returned
    /// (from `pending_at` on). Empty unless a reply filled up mid-buffer; its capacity is
    /// reused.
    pending: Vec<u8>,
    pending_at: usize,
    /// Cookie of the next entry to return (where the backing fd logically is).
    pos: u64,
}

/// Size of the getdents64 buffer (one per thread).
const DIRENT_BUF: usize = 32 * 1024;

thread_local! {
    /// The thread's getdents64 buffer, allocated once.
    static DENTS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Walks the records of `buf`, offering each to `f` until it declines one. Returns the bytes
/// of the records taken, the cookie after the last one taken, and whether `f` declined.
fn walk(buf: &[u8], f: &mut dyn FnMut(&DirEntry<'_>) -> bool) -> (usize, Option<u64>, bool) {
    let mut pos = 0usize;
    let mut last = None;
    while pos + 19 <= buf.len() {
        let rec = &buf[pos..];
        let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
        let off = i64::from_ne_bytes(rec[8..16].try_into().unwrap_or([0; 8])) as u64;
        let reclen = u16::from_ne_bytes(rec[16..18].try_into().unwrap_or([0; 2])) as usize;
        if reclen < 20 || reclen > rec.len() {
            break;
        }
        let Ok(name) = CStr::from_bytes_until_nul(&rec[19..reclen]) else { break };
        if !f(&DirEntry { ino, off, kind: rec[18], name }) {
            return (pos, last, true);
        }
        last = Some(off);
        pos += reclen;
    }
    (buf.len(), last, false)
}

impl DirStream {
    /// A stream at the start of a freshly opened directory.
    pub(crate) fn new() -> DirStream {
        DirStream { pending: Vec::new(), pending_at: 0, pos: 0 }
    }

    /// Cookie of the next entry the stream returns.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// Positions the stream at cookie `offset` (seeking the backing directory if needed).
    fn seek(&mut self, fd: BorrowedFd<'_>, offset: u64) -> Result<()> {
        if offset == self.pos {
            return Ok(());
        }
        sys::rx(rustix::fs::seek(fd, rustix::fs::SeekFrom::Start(offset)))?;
        self.pending.clear();
        self.pending_at = 0;
        self.pos = offset;
        Ok(())
    }

    /// Offers the entries from cookie `offset` on to `f`, in order, until it declines one
    /// (which is kept for the next call) or the directory ends. A read error is returned only
    /// if no entry was taken.
    pub(crate) fn read(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: u64,
        f: &mut dyn FnMut(&DirEntry<'_>) -> bool,
    ) -> Result<()> {
        self.seek(fd, offset)?;
        let mut took = false;
        loop {
            if self.pending_at < self.pending.len() {
                let (n, last, full) = walk(&self.pending[self.pending_at..], f);
                self.pending_at += n;
                if let Some(off) = last {
                    self.pos = off;
                    took = true;
                }
                if full {
                    return Ok(());
                }
            }
            self.pending.clear();
            self.pending_at = 0;
            let done = DENTS.with(|d| -> Result<bool> {
                let mut buf = d.borrow_mut();
                if buf.len() < DIRENT_BUF {
                    buf.resize(DIRENT_BUF, 0);
                }
                let n = sys::getdents64(fd.as_raw_fd(), &mut buf)?;
                if n == 0 {
                    return Ok(true);
                }
                let (m, last, full) = walk(&buf[..n], f);
                if let Some(off) = last {
                    self.pos = off;
                    took = true;
                }
                if full {
                    // Keep what did not fit (the stream's own buffer, reused).
                    self.pending.extend_from_slice(&buf[m..n]);
                }
                Ok(full)
            });
            match done {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if !took => return Err(e),
                Err(_) => return Ok(()),
            }
        }
    }
}

/// What an open handle refers to.
pub(crate) enum HandleKind {
    /// An open regular file (shared with the inode table while it is open, so an open file
    /// costs one descriptor, not two).
    File(Arc<OwnedFd>),
    /// An open directory and its read position.
    Dir(Arc<OwnedFd>, Mutex<DirStream>),
}

/// One open file or directory.
pub(crate) struct Handle {
    /// The node it was opened on.
    pub(crate) node: u64,
    /// The descriptor(s).
    pub(crate) kind: HandleKind,
}

impl Handle {
    /// The descriptor (file or directory).
    pub(crate) fn fd(&self) -> RawFd {
        match &self.kind {
            HandleKind::File(fd) => fd.as_raw_fd(),
            HandleKind::Dir(fd, _) => fd.as_raw_fd(),
        }
    }

    /// [`fd`](Self::fd), borrowed for as long as the handle lives.
    pub(crate) fn borrowed_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.kind {
            HandleKind::File(fd) => std::os::fd::AsFd::as_fd(fd),
            HandleKind::Dir(fd, _) => std::os::fd::AsFd::as_fd(fd),
        }
    }

    /// The descriptor of an open regular file, borrowed for as long as the handle lives; EISDIR
    /// for directories.
    pub(crate) fn file_borrowed(&self) -> Result<std::os::fd::BorrowedFd<'_>> {
        match &self.kind {
            HandleKind::File(fd) => Ok(std::os::fd::AsFd::as_fd(fd)),
            HandleKind::Dir(..) => Err(Errno::EISDIR),
        }
    }

    /// The directory descriptor and locked stream; ENOTDIR for files.
    pub(crate) fn dir(&self) -> Result<(BorrowedFd<'_>, MutexGuard<'_, DirStream>)> {
        match &self.kind {
            HandleKind::Dir(fd, s) => Ok((fd.as_fd(), s.lock().unwrap_or_else(|e| e.into_inner()))),
            HandleKind::File(_) => Err(Errno::ENOTDIR),
        }
    }
}

/// Number of shards of the handle table.
const SHARDS: usize = 64;

/// Handle numbers a thread takes from the shared counter at once.
const FH_BLOCK: u64 = 1024;

/// One shard, on cache lines of its own.
#[repr(align(128))]
struct Shard(Mutex<HashMap<u64, Arc<Handle>, IdHash>>);

thread_local! {
    /// The calling thread's block of handle numbers: (table, next, end).
    static FH_RANGE: std::cell::Cell<(u64, u64, u64)> = const { std::cell::Cell::new((0, 0, 0)) };
}

/// Identifies tables (for the per-thread blocks); 0 is never used.
static TABLES: AtomicU64 = AtomicU64::new(1);

/// All open handles.
pub(crate) struct HandleTable {
    shards: Box<[Shard]>,
    /// Start of the next block of handle numbers.
    next: AtomicU64,
    /// This table's identity.
    id: u64,
    /// Handles a dead server gave out that could not be opened again (crash failover): EIO
    /// until released.
    lost: Mutex<std::collections::HashSet<u64>>,
}

impl HandleTable {
    /// An empty table.
    pub(crate) fn new() -> HandleTable {
        HandleTable {
            shards: (0..SHARDS).map(|_| Shard(Mutex::new(HashMap::with_hasher(IdHash::default())))).collect(),
            next: AtomicU64::new(1),
            id: TABLES.fetch_add(1, Ordering::Relaxed),
            lost: Mutex::new(std::collections::HashSet::new()),
        }
    }

    fn shard(&self, fh: u64) -> MutexGuard<'_, HashMap<u64, Arc<Handle>, IdHash>> {
        self.shards[(fh % SHARDS as u64) as usize].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh handle number (never 0, never given out twice by this table). A thread takes
    /// numbers from a block of its own, so opens on different queues share no counter.
    fn fresh(&self) -> u64 {
        FH_RANGE.with(|r| {
            let (table, mut next, mut end) = r.get();
            if table != self.id || next >= end {
                next = self.next.fetch_add(FH_BLOCK, Ordering::Relaxed);
                end = next + FH_BLOCK;
            }
            r.set((self.id, next + 1, end));
            next
        })
    }

    /// Registers an open regular file.
    pub(crate) fn insert_file(&self, node: u64, fd: Arc<OwnedFd>) -> u64 {
        self.insert(Handle { node, kind: HandleKind::File(fd) })
    }

    /// Registers an open directory (positioned at its start).
    pub(crate) fn insert_dir(&self, node: u64, fd: Arc<OwnedFd>) -> u64 {
        self.insert(Handle { node, kind: HandleKind::Dir(fd, Mutex::new(DirStream::new())) })
    }

    fn insert(&self, h: Handle) -> u64 {
        let fh = self.fresh();
        self.shard(fh).insert(fh, Arc::new(h));
        fh
    }

    /// The handle `fh`, or EBADF (EIO for a handle lost in a crash failover).
    pub(crate) fn get(&self, fh: u64) -> Result<Arc<Handle>> {
        match self.shard(fh).get(&fh) {
            Some(h) => Ok(h.clone()),
            None if self.is_lost(fh) => Err(Errno::EIO),
            None => Err(Errno::EBADF),
        }
    }

    fn is_lost(&self, fh: u64) -> bool {
        let lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        !lost.is_empty() && lost.contains(&fh)
    }

    /// Marks `fh` as a handle of a dead server that could not be opened again: its requests
    /// get EIO until the kernel releases it. Numbers given out later are above it.
    pub(crate) fn mark_lost(&self, fh: u64) {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).insert(fh);
        let above = (fh / FH_BLOCK + 1) * FH_BLOCK;
        self.next.fetch_max(above, Ordering::Relaxed);
    }

    /// Removes `fh`; its descriptor closes when the last in-flight user drops it.
    pub(crate) fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        let h = self.shard(fh).remove(&fh);
        if h.is_none() {
            let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
            if !lost.is_empty() {
                lost.remove(&fh);
            }
        }
        h
    }

    /// Every open handle: (fh, handle) (live upgrade).
    pub(crate) fn export(&self) -> Vec<(u64, Arc<Handle>)> {
        let mut all = Vec::new();
        for sh in self.shards.iter() {
            let g = sh.0.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(g.iter().map(|(&fh, h)| (fh, h.clone())));
        }
        all
    }

    /// Registers a handle a previous server gave out, under the same number (live upgrade;
    /// before any request is served). Numbers given out later are above every imported one. A
    /// directory's stream is re-positioned at its next read.
    pub(crate) fn import(&self, fh: u64, node: u64, dir: bool, fd: Arc<OwnedFd>) {
        let kind = if dir {
            HandleKind::Dir(fd, Mutex::new(DirStream { pending: Vec::new(), pending_at: 0, pos: u64::MAX }))
        } else {
            HandleKind::File(fd)
        };
        self.shard(fh).insert(fh, Arc::new(Handle { node, kind }));
        let above = (fh / FH_BLOCK + 1) * FH_BLOCK;
        self.next.fetch_max(above, Ordering::Relaxed);
    }

    /// Number of open handles.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }
}

/// Directory streams parked between listing requests, for directories the kernel opens without
/// OPENDIR (zero-message opendir: every READDIR/READDIRPLUS comes with fh 0 and names only the
/// node and the cookie to resume from). The stream a chunk leaves behind waits here under
/// (node, cookie of its next entry), so the next chunk of the same listing continues on the same
/// backing descriptor instead of opening and seeking again, and the final, empty chunk costs no
/// open. Bounded: [`PARKED_SHARDS`] x [`PARKED_PER_SHARD`] streams (one descriptor each); the
/// oldest of a full shard is closed (a later chunk of its listing then reopens and seeks).
pub(crate) struct ParkedStreams {
    shards: Box<[ParkedShard]>,
}

/// Shards of [`ParkedStreams`].
const PARKED_SHARDS: usize = 16;
/// Streams per shard of [`ParkedStreams`].
const PARKED_PER_SHARD: usize = 8;

/// A parked stream: (node, cookie of its next entry, descriptor, stream).
type Parked = (u64, u64, OwnedFd, DirStream);

/// One shard, on cache lines of its own; oldest first.
#[repr(align(128))]
struct ParkedShard(Mutex<Vec<Parked>>);

impl ParkedStreams {
    /// No streams.
    pub(crate) fn new() -> ParkedStreams {
        ParkedStreams {
            shards: (0..PARKED_SHARDS).map(|_| ParkedShard(Mutex::new(Vec::with_capacity(PARKED_PER_SHARD)))).collect(),
        }
    }

    fn shard(&self, node: u64) -> MutexGuard<'_, Vec<Parked>> {
        self.shards[(node % PARKED_SHARDS as u64) as usize].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the stream of `node` whose next entry is at cookie `offset`, if one is parked.
    pub(crate) fn take(&self, node: u64, offset: u64) -> Option<(OwnedFd, DirStream)> {
        let mut s = self.shard(node);
        let i = s.iter().position(|p| p.0 == node && p.1 == offset)?;
        let (_, _, fd, stream) = s.remove(i);
        Some((fd, stream))
    }

    /// Parks `stream` (reading `fd` of `node`) until the chunk that resumes at its position.
    pub(crate) fn park(&self, node: u64, fd: OwnedFd, stream: DirStream) {
        let pos = stream.pos();
        let old = {
            let mut s = self.shard(node);
            let old = if s.len() >= PARKED_PER_SHARD { Some(s.remove(0)) } else { None };
            s.push((node, pos, fd, stream));
            old
        };
        // Closed outside the lock.
        drop(old);
    }

    /// Number of parked streams.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }
}
