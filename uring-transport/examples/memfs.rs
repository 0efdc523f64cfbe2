//! An in-memory file system whose work runs on another thread, built only on the public API.
//!
//! Every `FileSystem` method packs its arguments into a job, sends it over a channel to one
//! "storage" thread that owns all state, and awaits the reply. The queue thread that received
//! the request is free meanwhile; the storage thread's answer wakes it (the waker is `Send`).
//! This is the shape of any file system whose work is done elsewhere: a thread pool, a database
//! client, a network service.
//!
//! It serves directories, regular files (read, write, truncate), symbolic links, rename,
//! attributes and directory listings. `memfs MOUNTPOINT [dev-fuse|uring|auto]`;
//! `umount MOUNTPOINT` ends it.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ringfs_protocol::*;
use ringfs_transport::mount::{mount, MountOptions};
use ringfs_transport::{Session, SessionConfig, TransportMode};

/// How long the kernel may cache names and attributes. Every change goes through this server,
/// so a positive timeout is safe on one mount.
const TTL: Duration = Duration::from_secs(1);

/// `_IOR('M', 1, u64)`: an ioctl of this file system's own, answering how many nodes it holds.
const MEMFS_IOC_NODES: u32 = (2 << 30) | (8 << 16) | ((b'M' as u32) << 8) | 1;

/// `_IOR('M', 2, u64)`: how many locks (POSIX and flock) are held on the file.
const MEMFS_IOC_LOCKS: u32 = (2 << 30) | (8 << 16) | ((b'M' as u32) << 8) | 2;

// ---------------------------------------------------------------------------------------------
// A one-shot reply from the storage thread.

/// The slot a reply lands in, and the waker of the request waiting for it.
struct Slot<T> {
    state: Mutex<(Option<T>, Option<Waker>)>,
}

/// Awaits the reply to one job.
struct Reply<T>(Arc<Slot<T>>);

impl<T> Future for Reply<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<T> {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// One directory entry: (position after it, ino, type, name).
type Listed = (u64, u64, DirentType, Vec<u8>);

/// A unit of work for the storage thread.
type Job = Box<dyn FnOnce(&mut Store) + Send>;

// ---------------------------------------------------------------------------------------------
// The state, owned by the storage thread alone (no locking needed inside).

enum Kind {
    Dir(BTreeMap<Vec<u8>, u64>),
    File(Vec<u8>),
    Symlink(Vec<u8>),
}

struct Node {
    attr: FileAttr,
    kind: Kind,
    /// The kernel's references (lookup counts), returned by `forget`.
    lookups: u64,
    /// Open handles.
    opens: u64,
}

/// A lock held on a file: POSIX record locks and flock locks live side by side and never
/// conflict with each other (as on Linux).
#[derive(Clone, Copy, Debug)]
struct Held {
    owner: LockOwner,
    lock: Lock,
}

struct Store {
    nodes: HashMap<u64, Node>,
    next: u64,
    /// Locks per node.
    locks: HashMap<u64, Vec<Held>>,
}

fn now() -> Timespec {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Timespec::new(d.as_secs() as i64, d.subsec_nanos())
}

fn dirent_type(mode: u32) -> DirentType {
    (mode & libc::S_IFMT) >> 12
}

impl Store {
    fn new() -> Store {
        let t = now();
        let root = Node {
            attr: {
                let mut attr = FileAttr::new(1, libc::S_IFDIR | 0o755);
                attr.nlink = 2;
                attr.blksize = 4096;
                attr.atime = t;
                attr.mtime = t;
                attr.ctime = t;
                attr
            },
            kind: Kind::Dir(BTreeMap::new()),
            lookups: 1,
            opens: 0,
        };
        Store { nodes: HashMap::from([(1, root)]), next: 2, locks: HashMap::new() }
    }

    fn node(&mut self, n: u64) -> Result<&mut Node> {
        self.nodes.get_mut(&n).ok_or(Errno::ENOENT)
    }

    fn dir(&mut self, n: u64) -> Result<&mut BTreeMap<Vec<u8>, u64>> {
        match &mut self.node(n)?.kind {
            Kind::Dir(d) => Ok(d),
            _ => Err(Errno::ENOTDIR),
        }
    }

    /// An entry for `n`, counting one kernel reference.
    fn entry(&mut self, n: u64) -> Result<Entry> {
        let node = self.node(n)?;
        node.lookups += 1;
        Ok(Entry::new(NodeId(n), 0, node.attr, TTL, TTL))
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<Entry> {
        let child = *self.dir(parent)?.get(name).ok_or(Errno::ENOENT)?;
        self.entry(child)
    }

    /// Drops a node nobody can reach any more: no name, no kernel reference, no open handle.
    fn collect(&mut self, n: u64) {
        if let Some(node) = self.nodes.get(&n) {
            let linked = node.attr.nlink > 0 && !matches!(node.kind, Kind::Dir(_))
                || matches!(node.kind, Kind::Dir(_)) && node.attr.nlink > 1;
            if n != 1 && !linked && node.lookups == 0 && node.opens == 0 {
                self.nodes.remove(&n);
                self.locks.remove(&n);
            }
        }
    }

    fn touch(&mut self, n: u64) {
        let t = now();
        if let Ok(node) = self.node(n) {
            node.attr.mtime = t;
            node.attr.ctime = t;
        }
    }

    fn make(&mut self, ctx: Context, parent: u64, name: &[u8], mode: u32, kind: Kind) -> Result<Entry> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let pgid = {
            let p = self.node(parent)?;
            (p.attr.mode & libc::S_ISGID != 0).then_some(p.attr.gid)
        };
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let n = self.next;
        self.next += 1;
        let t = now();
        let is_dir = matches!(kind, Kind::Dir(_));
        let size = match &kind {
            Kind::Symlink(t) => t.len() as u64,
            _ => 0,
        };
        let attr = {
            let mut attr = FileAttr::new(n, mode);
            attr.nlink = if is_dir { 2 } else { 1 };
            attr.uid = ctx.uid;
            attr.gid = pgid.unwrap_or(ctx.gid);
            attr.size = size;
            attr.blksize = 4096;
            attr.atime = t;
            attr.mtime = t;
            attr.ctime = t;
            attr
        };
        self.nodes.insert(n, Node { attr, kind, lookups: 0, opens: 0 });
        self.dir(parent)?.insert(name.to_vec(), n);
        if is_dir {
            self.node(parent)?.attr.nlink += 1;
        }
        self.touch(parent);
        self.entry(n)
    }

    /// Removes `name` from `parent`; `dir` says whether it must be a directory (rmdir) or must
    /// not be one (unlink).
    fn remove(&mut self, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        let child = *self.dir(parent)?.get(name).ok_or(Errno::ENOENT)?;
        match (&self.node(child)?.kind, dir) {
            (Kind::Dir(d), true) if !d.is_empty() => return Err(Errno(libc::ENOTEMPTY)),
            (Kind::Dir(_), true) => {}
            (Kind::Dir(_), false) => return Err(Errno::EISDIR),
            (_, true) => return Err(Errno::ENOTDIR),
            (_, false) => {}
        }
        self.dir(parent)?.remove(name);
        let t = now();
        let c = self.node(child)?;
        c.attr.ctime = t;
        if dir {
            c.attr.nlink = 0;
            self.node(parent)?.attr.nlink -= 1;
        } else {
            c.attr.nlink -= 1;
        }
        self.touch(parent);
        self.collect(child);
        Ok(())
    }

    /// Whether `ancestor` is `n` or one of its ancestors (a rename must not move a directory
    /// below itself).
    fn contains(&self, ancestor: u64, mut n: u64) -> bool {
        // Walk up by searching parents; the tree is small enough for an example.
        loop {
            if n == ancestor {
                return true;
            }
            if n == 1 {
                return false;
            }
            let parent = self.nodes.iter().find_map(|(&p, node)| match &node.kind {
                Kind::Dir(d) if d.values().any(|&c| c == n) => Some(p),
                _ => None,
            });
            match parent {
                Some(p) => n = p,
                None => return false,
            }
        }
    }

    fn rename(&mut self, parent: u64, name: &[u8], np: u64, nn: &[u8], flags: u32) -> Result<()> {
        if flags & !libc::RENAME_NOREPLACE != 0 {
            return Err(Errno::EINVAL);
        }
        let child = *self.dir(parent)?.get(name).ok_or(Errno::ENOENT)?;
        self.dir(np)?;
        let child_is_dir = matches!(self.node(child)?.kind, Kind::Dir(_));
        if child_is_dir && self.contains(child, np) {
            return Err(Errno::EINVAL);
        }
        if let Some(&old) = self.dir(np)?.get(nn) {
            if old == child {
                return Ok(());
            }
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(Errno::EEXIST);
            }
            let old_is_dir = matches!(self.node(old)?.kind, Kind::Dir(_));
            match (child_is_dir, old_is_dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                _ => self.remove(np, nn, old_is_dir)?,
            }
        }
        self.dir(parent)?.remove(name);
        self.dir(np)?.insert(nn.to_vec(), child);
        if child_is_dir && parent != np {
            self.node(parent)?.attr.nlink -= 1;
            self.node(np)?.attr.nlink += 1;
        }
        self.node(child)?.attr.ctime = now();
        self.touch(parent);
        self.touch(np);
        Ok(())
    }

    fn setattr(&mut self, n: u64, a: SetAttr) -> Result<AttrOut> {
        let t = now();
        let node = self.node(n)?;
        if let Some(size) = a.size {
            match &mut node.kind {
                Kind::File(data) => data.resize(usize::try_from(size).map_err(|_| Errno(libc::EFBIG))?, 0),
                Kind::Dir(_) => return Err(Errno::EISDIR),
                Kind::Symlink(_) => return Err(Errno::EINVAL),
            }
            node.attr.size = size;
            node.attr.mtime = t;
        }
        if let Some(mode) = a.mode {
            node.attr.mode = (node.attr.mode & libc::S_IFMT) | (mode & !libc::S_IFMT);
        }
        if let Some(uid) = a.uid {
            node.attr.uid = uid;
        }
        if let Some(gid) = a.gid {
            node.attr.gid = gid;
        }
        let pick = |s: SetTime| match s {
            SetTime::At(ts) => ts,
            SetTime::Now => t,
        };
        if let Some(s) = a.atime {
            node.attr.atime = pick(s);
        }
        if let Some(s) = a.mtime {
            node.attr.mtime = pick(s);
        }
        node.attr.ctime = a.ctime.unwrap_or(t);
        Ok(AttrOut::new(node.attr, TTL))
    }

    fn read(&mut self, n: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
        match &self.node(n)?.kind {
            Kind::File(data) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
                let end = start.saturating_add(len).min(data.len());
                Ok(data[start..end].to_vec())
            }
            Kind::Dir(_) => Err(Errno::EISDIR),
            Kind::Symlink(_) => Err(Errno::EINVAL),
        }
    }

    fn write(&mut self, n: u64, offset: u64, src: &[u8]) -> Result<usize> {
        let t = now();
        let node = self.node(n)?;
        let Kind::File(data) = &mut node.kind else { return Err(Errno::EISDIR) };
        let start = usize::try_from(offset).map_err(|_| Errno(libc::EFBIG))?;
        let end = start.checked_add(src.len()).ok_or(Errno(libc::EFBIG))?;
        if end > data.len() {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(src);
        node.attr.size = data.len() as u64;
        node.attr.blocks = node.attr.size.div_ceil(512);
        node.attr.mtime = t;
        node.attr.ctime = t;
        Ok(src.len())
    }

    /// Directory entries from position `offset` on: (position after it, ino, type, name).
    fn list(&mut self, n: u64, offset: u64, max: usize) -> Result<Vec<Listed>> {
        let d = self.dir(n)?.clone();
        let mut out = Vec::new();
        let all = [(b".".to_vec(), n), (b"..".to_vec(), n)].into_iter().chain(d);
        for (i, (name, ino)) in all.enumerate().skip(offset as usize).take(max) {
            let kind = self.nodes.get(&ino).map_or(0, |c| dirent_type(c.attr.mode));
            out.push((i as u64 + 1, ino, kind, name));
        }
        Ok(out)
    }

    /// The first lock of another owner that keeps `owner` from taking `want`.
    fn conflict(&self, n: u64, owner: LockOwner, want: &Lock) -> Option<Lock> {
        let held = self.locks.get(&n)?;
        held.iter()
            .find(|h| h.owner != owner && h.lock.flock == want.flock && h.lock.conflicts_with(want))
            .map(|h| h.lock)
    }

    /// Takes, changes or drops (`LockKind::Unlock`) `owner`'s lock on `want`'s range: its
    /// overlapping ranges are cut and the new one put in, as POSIX requires. `EAGAIN` on a
    /// conflict.
    fn set_lock(&mut self, n: u64, owner: LockOwner, want: Lock) -> Result<()> {
        self.node(n)?;
        if want.kind != LockKind::Unlock && self.conflict(n, owner, &want).is_some() {
            return Err(Errno(libc::EAGAIN));
        }
        let list = self.locks.entry(n).or_default();
        let mut kept = Vec::with_capacity(list.len() + 2);
        for h in list.drain(..) {
            if h.owner != owner || h.lock.flock != want.flock || !h.lock.overlaps(&want) {
                kept.push(h);
                continue;
            }
            // Keep the parts of the old range outside the new one.
            if h.lock.start < want.start {
                let mut left = h;
                left.lock.end = want.start - 1;
                kept.push(left);
            }
            if h.lock.end > want.end {
                let mut right = h;
                right.lock.start = want.end + 1;
                kept.push(right);
            }
        }
        if want.kind != LockKind::Unlock {
            kept.push(Held { owner, lock: want });
        }
        *list = kept;
        Ok(())
    }
}

/// The storage thread: runs jobs in order until every sender is gone.
fn storage(rx: mpsc::Receiver<Job>) {
    let mut store = Store::new();
    for job in rx {
        job(&mut store);
    }
}

// ---------------------------------------------------------------------------------------------
// The file system: every method is a job for the storage thread.

struct MemFs {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl MemFs {
    /// Runs `f` on the storage thread and awaits its result.
    fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Store) -> T + Send + 'static) -> Reply<T> {
        let slot = Arc::new(Slot { state: Mutex::new((None, None)) });
        let filled = slot.clone();
        let job: Job = Box::new(move |store| {
            let v = f(store);
            let waker = {
                let mut s = filled.state.lock().unwrap_or_else(|e| e.into_inner());
                s.0 = Some(v);
                s.1.take()
            };
            // The wake-up comes from this (storage) thread; it wakes the queue that polls
            // the request.
            if let Some(w) = waker {
                w.wake();
            }
        });
        // The storage thread lives as long as the process; a send cannot fail.
        let _ = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(job);
        Reply(slot)
    }
}

fn name(n: &CStr) -> Vec<u8> {
    n.to_bytes().to_vec()
}

impl FileSystem for MemFs {
    fn init(&self, conn: &mut ConnInfo) -> Result<()> {
        conn.readdirplus = false;
        // Locks are served here, not kept by the kernel: see getlk/setlk.
        conn.posix_locks = true;
        conn.flock_locks = true;
        Ok(())
    }

    async fn lookup(&self, _: &Context, parent: NodeId, n: &CStr) -> Result<Entry> {
        let n = name(n);
        self.run(move |s| s.lookup(parent.0, &n)).await
    }

    fn forget(&self, node: NodeId, nlookup: u64) {
        // Not async: queue the job and do not wait.
        drop(self.run(move |s| {
            if let Ok(n) = s.node(node.0) {
                n.lookups = n.lookups.saturating_sub(nlookup);
            }
            s.collect(node.0);
        }));
    }

    async fn getattr(&self, _: &Context, node: NodeId, _: Option<FileHandle>) -> Result<AttrOut> {
        self.run(move |s| Ok(AttrOut::new(s.node(node.0)?.attr, TTL))).await
    }

    async fn setattr(&self, _: &Context, node: NodeId, attr: &SetAttr) -> Result<AttrOut> {
        let attr = *attr;
        self.run(move |s| s.setattr(node.0, attr)).await
    }

    async fn readlink(&self, _: &Context, node: NodeId) -> Result<Vec<u8>> {
        self.run(move |s| match &s.node(node.0)?.kind {
            Kind::Symlink(t) => Ok(t.clone()),
            _ => Err(Errno::EINVAL),
        })
        .await
    }

    async fn symlink(&self, ctx: &Context, parent: NodeId, n: &CStr, target: &CStr) -> Result<Entry> {
        let (ctx, n, t) = (*ctx, name(n), name(target));
        self.run(move |s| s.make(ctx, parent.0, &n, libc::S_IFLNK | 0o777, Kind::Symlink(t))).await
    }

    async fn mknod(&self, ctx: &Context, parent: NodeId, n: &CStr, mode: u32, _: u32, umask: u32) -> Result<Entry> {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Errno::EOPNOTSUPP);
        }
        let (ctx, n) = (*ctx, name(n));
        self.run(move |s| s.make(ctx, parent.0, &n, mode & !umask, Kind::File(Vec::new()))).await
    }

    async fn mkdir(&self, ctx: &Context, parent: NodeId, n: &CStr, mode: u32, umask: u32) -> Result<Entry> {
        let (ctx, n) = (*ctx, name(n));
        let mode = libc::S_IFDIR | (mode & !umask & 0o7777);
        self.run(move |s| s.make(ctx, parent.0, &n, mode, Kind::Dir(BTreeMap::new()))).await
    }

    async fn unlink(&self, _: &Context, parent: NodeId, n: &CStr) -> Result<()> {
        let n = name(n);
        self.run(move |s| s.remove(parent.0, &n, false)).await
    }

    async fn rmdir(&self, _: &Context, parent: NodeId, n: &CStr) -> Result<()> {
        let n = name(n);
        self.run(move |s| s.remove(parent.0, &n, true)).await
    }

    async fn rename(
        &self,
        _: &Context,
        parent: NodeId,
        n: &CStr,
        new_parent: NodeId,
        new_name: &CStr,
        flags: u32,
    ) -> Result<()> {
        let (n, nn) = (name(n), name(new_name));
        self.run(move |s| s.rename(parent.0, &n, new_parent.0, &nn, flags)).await
    }

    async fn open(&self, _: &Context, node: NodeId, _: u32) -> Result<Opened> {
        self.run(move |s| {
            let n = s.node(node.0)?;
            if matches!(n.kind, Kind::Dir(_)) {
                return Err(Errno::EISDIR);
            }
            n.opens += 1;
            Ok(Opened::new(FileHandle(node.0), OpenOptions::default()))
        })
        .await
    }

    async fn create(
        &self,
        ctx: &Context,
        parent: NodeId,
        n: &CStr,
        mode: u32,
        umask: u32,
        _: u32,
    ) -> Result<(Entry, Opened)> {
        let (ctx, n) = (*ctx, name(n));
        let mode = libc::S_IFREG | (mode & !umask & 0o7777);
        self.run(move |s| {
            let e = s.make(ctx, parent.0, &n, mode, Kind::File(Vec::new()))?;
            s.node(e.nodeid.0)?.opens += 1;
            Ok((e, Opened::new(FileHandle(e.nodeid.0), OpenOptions::default())))
        })
        .await
    }

    async fn read(&self, _: &Context, node: NodeId, _: FileHandle, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let len = buf.len();
        let data = self.run(move |s| s.read(node.0, offset, len)).await?;
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }

    async fn write(
        &self,
        _: &Context,
        node: NodeId,
        _: FileHandle,
        offset: u64,
        data: &[u8],
        _: WriteFlags,
    ) -> Result<usize> {
        let data = data.to_vec();
        self.run(move |s| s.write(node.0, offset, &data)).await
    }

    async fn flush(&self, _: &Context, node: NodeId, _: FileHandle, lock_owner: u64) -> Result<()> {
        // A close: POSIX locks are per process, and a process's close of any descriptor of the
        // file drops them all (the kernel sends no unlock of its own for locks it does not keep).
        self.run(move |s| {
            if let Some(list) = s.locks.get_mut(&node.0) {
                list.retain(|h| h.lock.flock || h.owner != LockOwner(lock_owner));
            }
        })
        .await;
        Ok(())
    }

    async fn release(&self, _: &Context, node: NodeId, _: FileHandle, _: u32) -> Result<()> {
        self.run(move |s| {
            if let Ok(n) = s.node(node.0) {
                n.opens = n.opens.saturating_sub(1);
            }
            s.collect(node.0);
            Ok(())
        })
        .await
    }

    async fn fsync(&self, _: &Context, _: NodeId, _: FileHandle, _: bool) -> Result<()> {
        Ok(())
    }

    async fn opendir(&self, _: &Context, node: NodeId, _: u32) -> Result<Opened> {
        self.run(move |s| {
            s.dir(node.0)?;
            Ok(Opened::new(FileHandle(node.0), OpenOptions::default()))
        })
        .await
    }

    async fn readdir(
        &self,
        _: &Context,
        node: NodeId,
        _: FileHandle,
        offset: u64,
        out: &mut DirBuffer<'_>,
    ) -> Result<()> {
        // Ask for a batch at a time; what does not fit is asked for again at its offset.
        let mut offset = offset;
        loop {
            let batch = self.run(move |s| s.list(node.0, offset, 64)).await?;
            if batch.is_empty() {
                return Ok(());
            }
            for (next, ino, kind, n) in batch {
                if !out.add(ino, next, kind, &n) {
                    return Ok(());
                }
                offset = next;
            }
        }
    }

    async fn fsyncdir(&self, _: &Context, _: NodeId, _: FileHandle, _: bool) -> Result<()> {
        Ok(())
    }

    async fn getlk(&self, _: &Context, node: NodeId, _: FileHandle, owner: LockOwner, lock: &Lock) -> Result<Lock> {
        let want = *lock;
        Ok(self.run(move |s| s.conflict(node.0, owner, &want).unwrap_or_else(Lock::unlocked)).await)
    }

    async fn setlk(
        &self,
        _: &Context,
        node: NodeId,
        _: FileHandle,
        owner: LockOwner,
        lock: &Lock,
        wait: bool,
    ) -> Result<()> {
        let want = *lock;
        loop {
            match self.run(move |s| s.set_lock(node.0, owner, want)).await {
                Err(e) if e.0 == libc::EAGAIN && wait => {
                    // SETLKW: try again a little later. The sleep runs on the queue's ring (the
                    // thread serves other requests meanwhile); when the caller is interrupted
                    // (a signal) it fails with ECANCELED, and the caller gets EINTR.
                    if ringfs_transport::io::interrupted()
                        || ringfs_transport::io::sleep(Duration::from_millis(2)).await.is_err()
                    {
                        return Err(Errno::EINTR);
                    }
                }
                r => return r,
            }
        }
    }

    async fn ioctl(&self, _: &Context, node: NodeId, req: &Ioctl<'_>) -> Result<Vec<u8>> {
        match req.cmd {
            MEMFS_IOC_LOCKS => {
                let n = self.run(move |s| s.locks.get(&node.0).map_or(0, |l| l.len() as u64)).await;
                Ok(n.to_ne_bytes().to_vec())
            }
            // MEMFS_IOC_NODES: how many nodes the store holds, as a u64.
            MEMFS_IOC_NODES => Ok(self.run(|s| s.nodes.len() as u64).await.to_ne_bytes().to_vec()),
            _ => Err(Errno::ENOTTY),
        }
    }

    async fn statfs(&self, _: &Context, _: NodeId) -> Result<StatFs> {
        let files = self.run(|s| s.nodes.len() as u64).await;
        let mut st = StatFs::default();
        st.blocks = 1 << 20;
        st.bfree = 1 << 19;
        st.bavail = 1 << 19;
        st.files = files + (1 << 20);
        st.ffree = 1 << 20;
        st.bsize = 4096;
        st.namelen = 255;
        st.frsize = 4096;
        Ok(st)
    }
}

fn main() -> std::io::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut args = std::env::args().skip(1);
    let mountpoint = args.next().expect("usage: memfs MOUNTPOINT [dev-fuse|uring|auto]");
    let transport = match args.next().as_deref() {
        Some("dev-fuse") => TransportMode::DevFuse,
        Some("uring") => TransportMode::Uring,
        _ => TransportMode::Auto,
    };
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new().name("memfs-storage".into()).spawn(move || storage(rx))?;
    let fs = MemFs { jobs: Mutex::new(tx) };
    let mut opts = MountOptions::new(std::fs::canonicalize(mountpoint)?);
    opts.fsname = "memfs".into();
    opts.subtype = "memfs".into();
    opts.allow_other = true;
    let mounted = mount(&opts)?;
    let mut cfg = SessionConfig::default();
    cfg.transport = transport;
    Session::init(mounted, Arc::new(fs), &cfg)?.run()
}
