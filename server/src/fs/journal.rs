//! The crash-failover journal: what changes between requests and what a server started after
//! this one died (crash failover, see `crate::failover`) needs to answer the kernel as this one
//! would: the node ids the kernel holds (with backing file handles), and the open file and
//! directory handles (fh, node, open flags, passthrough backing id).
//!
//! It lives in a memfd (no name in any file system: only a process given the descriptor reads
//! it, here the server and its watchdog, both root or the mount's owner), appended with one
//! `pwrite` per change before the reply that makes the change known to the kernel. A record is
//! `u32 length, u32 checksum (FNV-1a of the payload), payload`; a torn record (a server killed
//! inside the write) ends the replay. When the log has grown past four times the live state
//! (and 1 MiB), it is rewritten compacted into a new memfd, which is handed to the watchdog
//! before the old one is dropped: the journal stays within a small multiple of the state the
//! kernel holds.
//!
//! Payloads (little-endian), by first byte:
//! - `K` root (dev, ino), generation key (2 × u64): the first record.
//! - `I` the next node id to give out (a high-water mark, so ids are never reused).
//! - `N` node: id, dev, ino (u64), file type (u32), file handle (the rest; may be empty).
//! - `X` node id: the kernel forgot it.
//! - `O` handle: fh, node (u64), open flags (i32), directory (u8), backing id (i32, 0: none).
//! - `C` fh: released.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

/// Compaction starts past this many bytes.
const COMPACT_MIN: u64 = 1 << 20;

/// Called with the new journal's descriptor after a compaction (to hand it to the watchdog).
pub(crate) type Rearm = dyn Fn(BorrowedFd<'_>) + Send + Sync;

fn fnv(b: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &x in b {
        h ^= u32::from(x);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(payload.len() + 8);
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(&fnv(payload).to_le_bytes());
    r.extend_from_slice(payload);
    r
}

fn memfd() -> io::Result<OwnedFd> {
    Ok(rustix::fs::memfd_create("ringfs-journal", rustix::fs::MemfdFlags::CLOEXEC)?)
}

fn write_all_at(fd: &OwnedFd, mut b: &[u8], mut at: u64) -> io::Result<()> {
    while !b.is_empty() {
        match rustix::io::pwrite(fd, b, at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                b = &b[n..];
                at += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

struct Inner {
    fd: OwnedFd,
    len: u64,
    /// Framed records of the live state, to rewrite at compaction.
    key: Vec<u8>,
    nodes: HashMap<u64, Vec<u8>>,
    handles: HashMap<u64, Vec<u8>>,
    live_bytes: u64,
    next_id: u64,
    /// A write failed: failover can no longer be trusted (logged once).
    failed: bool,
}

/// The journal of one server process.
pub(crate) struct Journal {
    inner: Mutex<Inner>,
    rearm: Arc<Rearm>,
}

/// A journaled node: backing (dev, ino), file type, file handle.
pub(crate) type NodeRecord = ((u64, u64), u32, Vec<u8>);

/// What a replay found.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// Root (dev, ino) and generation key.
    pub(crate) key: Option<((u64, u64), [u64; 2])>,
    /// Next node id to give out.
    pub(crate) next_id: u64,
    /// Node id → (dev, ino, file type, file handle).
    pub(crate) nodes: BTreeMap<u64, NodeRecord>,
    /// fh → (node, open flags, directory, backing id).
    pub(crate) handles: BTreeMap<u64, (u64, i32, bool, i32)>,
    /// Records read, and whether the log ended in a torn record.
    pub(crate) records: u64,
    pub(crate) torn: bool,
}

impl Journal {
    /// A new journal holding `key` (root key, generation key), the next node id, and the
    /// given live nodes and handles.
    pub(crate) fn create(root: (u64, u64), gen: [u64; 2], next_id: u64, rearm: Arc<Rearm>) -> io::Result<Arc<Journal>> {
        let mut k = vec![b'K'];
        for w in [root.0, root.1, gen[0], gen[1]] {
            k.extend_from_slice(&w.to_le_bytes());
        }
        let key = frame(&k);
        let fd = memfd()?;
        let mut i = vec![b'I'];
        i.extend_from_slice(&next_id.to_le_bytes());
        let mut first = key.clone();
        first.extend_from_slice(&frame(&i));
        write_all_at(&fd, &first, 0)?;
        Ok(Arc::new(Journal {
            inner: Mutex::new(Inner {
                fd,
                len: first.len() as u64,
                key,
                nodes: HashMap::new(),
                handles: HashMap::new(),
                live_bytes: 0,
                next_id,
                failed: false,
            }),
            rearm,
        }))
    }

    /// The journal's descriptor (to hand to the watchdog). Stays valid until the next
    /// compaction, which calls the rearm hook with the new one.
    pub(crate) fn fd(&self) -> io::Result<OwnedFd> {
        self.lock().fd.as_fd().try_clone_to_owned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, g: &mut Inner, rec: &[u8]) {
        if g.failed {
            return;
        }
        if let Err(e) = write_all_at(&g.fd, rec, g.len) {
            g.failed = true;
            log::error!("failover journal: {e}; a crash now would lose open files");
            return;
        }
        g.len += rec.len() as u64;
        if g.len > COMPACT_MIN && g.len > 4 * (g.live_bytes + g.key.len() as u64) {
            self.compact(g);
        }
    }

    fn compact(&self, g: &mut Inner) {
        let mut all = g.key.clone();
        let mut i = vec![b'I'];
        i.extend_from_slice(&g.next_id.to_le_bytes());
        all.extend_from_slice(&frame(&i));
        for r in g.nodes.values().chain(g.handles.values()) {
            all.extend_from_slice(r);
        }
        let fd = match memfd().and_then(|fd| write_all_at(&fd, &all, 0).map(|()| fd)) {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("failover journal: compaction failed ({e}); appending on");
                return;
            }
        };
        // The watchdog has the new journal before the old one goes.
        (self.rearm)(fd.as_fd());
        log::debug!("failover journal compacted from {} to {} bytes", g.len, all.len());
        g.fd = fd;
        g.len = all.len() as u64;
    }

    /// Node `id` (backing `key`, file type `kind`, file handle) is known to the kernel.
    pub(crate) fn node(&self, id: u64, key: (u64, u64), kind: u32, handle: Option<&[u8]>) {
        let mut p = Vec::with_capacity(29 + handle.map_or(0, <[u8]>::len));
        p.push(b'N');
        for w in [id, key.0, key.1] {
            p.extend_from_slice(&w.to_le_bytes());
        }
        p.extend_from_slice(&kind.to_le_bytes());
        p.extend_from_slice(handle.unwrap_or_default());
        let rec = frame(&p);
        let mut g = self.lock();
        g.next_id = g.next_id.max(id + 1);
        g.live_bytes += rec.len() as u64;
        if let Some(old) = g.nodes.insert(id, rec.clone()) {
            g.live_bytes -= old.len() as u64;
        }
        self.append(&mut g, &rec);
    }

    /// Node `id` was forgotten.
    pub(crate) fn node_gone(&self, id: u64) {
        let mut p = vec![b'X'];
        p.extend_from_slice(&id.to_le_bytes());
        let mut g = self.lock();
        if let Some(old) = g.nodes.remove(&id) {
            g.live_bytes -= old.len() as u64;
        }
        self.append(&mut g, &frame(&p));
    }

    /// Handle `fh` of `node` was opened with `flags` (`dir`: a directory), passthrough
    /// backing id `backing` (0: none).
    pub(crate) fn opened(&self, fh: u64, node: u64, flags: i32, dir: bool, backing: i32) {
        let mut p = vec![b'O'];
        p.extend_from_slice(&fh.to_le_bytes());
        p.extend_from_slice(&node.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        p.push(u8::from(dir));
        p.extend_from_slice(&backing.to_le_bytes());
        let rec = frame(&p);
        let mut g = self.lock();
        g.live_bytes += rec.len() as u64;
        if let Some(old) = g.handles.insert(fh, rec.clone()) {
            g.live_bytes -= old.len() as u64;
        }
        self.append(&mut g, &rec);
    }

    /// Handle `fh` was released.
    pub(crate) fn closed(&self, fh: u64) {
        let mut p = vec![b'C'];
        p.extend_from_slice(&fh.to_le_bytes());
        let mut g = self.lock();
        if let Some(old) = g.handles.remove(&fh) {
            g.live_bytes -= old.len() as u64;
        }
        self.append(&mut g, &frame(&p));
    }

    /// Current size in bytes (metrics, tests).
    pub(crate) fn len(&self) -> u64 {
        self.lock().len
    }
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    b.get(i..i + 8).map_or(0, |x| u64::from_le_bytes(x.try_into().unwrap_or_default()))
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    b.get(i..i + 4).map_or(0, |x| u32::from_le_bytes(x.try_into().unwrap_or_default()))
}

/// Reads a journal (a dead server's, handed over by the watchdog).
pub(crate) fn replay(fd: &OwnedFd) -> io::Result<Replayed> {
    let size = rustix::fs::fstat(fd)?.st_size as u64;
    let mut buf = vec![0u8; size as usize];
    let mut at = 0usize;
    while at < buf.len() {
        match rustix::io::pread(fd, &mut buf[at..], at as u64) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(at);
    Ok(replay_bytes(&buf))
}

/// [`replay`] of the journal's bytes.
pub(crate) fn replay_bytes(mut b: &[u8]) -> Replayed {
    let mut r = Replayed::default();
    while b.len() >= 8 {
        let len = u32_at(b, 0) as usize;
        let sum = u32_at(b, 4);
        if len == 0 {
            break;
        }
        let Some(p) = b.get(8..8 + len) else {
            r.torn = true;
            break;
        };
        if fnv(p) != sum {
            r.torn = true;
            break;
        }
        b = &b[8 + len..];
        r.records += 1;
        match p[0] {
            b'K' if p.len() == 33 => {
                r.key = Some(((u64_at(p, 1), u64_at(p, 9)), [u64_at(p, 17), u64_at(p, 25)]));
            }
            b'I' if p.len() == 9 => r.next_id = r.next_id.max(u64_at(p, 1)),
            b'N' if p.len() >= 29 => {
                let id = u64_at(p, 1);
                r.next_id = r.next_id.max(id + 1);
                r.nodes.insert(id, ((u64_at(p, 9), u64_at(p, 17)), u32_at(p, 25), p[29..].to_vec()));
            }
            b'X' if p.len() == 9 => {
                r.nodes.remove(&u64_at(p, 1));
            }
            b'O' if p.len() == 26 => {
                let (fh, node) = (u64_at(p, 1), u64_at(p, 9));
                let flags = u32_at(p, 17) as i32;
                let dir = p[21] == 1;
                let backing = u32_at(p, 22) as i32;
                r.handles.insert(fh, (node, flags, dir, backing));
            }
            b'C' if p.len() == 9 => {
                r.handles.remove(&u64_at(p, 1));
            }
            _ => {}
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_what_was_written_and_stops_at_a_torn_record() {
        let rearmed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r2 = rearmed.clone();
        let j = Journal::create(
            (1, 2),
            [3, 4],
            10,
            Arc::new(move |_| {
                r2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
        )
        .unwrap();
        j.node(11, (1, 100), libc::S_IFREG, Some(b"handle-11"));
        j.node(12, (1, 101), libc::S_IFDIR, Some(b"handle-12"));
        j.opened(7, 11, libc::O_RDWR, false, 3);
        j.opened(8, 12, libc::O_RDONLY | libc::O_DIRECTORY, true, 0);
        j.closed(8);
        j.node_gone(12);
        let r = replay(&j.fd().unwrap()).unwrap();
        assert_eq!(r.key, Some(((1, 2), [3, 4])));
        assert_eq!(r.next_id, 13);
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.nodes[&11], ((1, 100), libc::S_IFREG, b"handle-11".to_vec()));
        assert_eq!(r.handles.len(), 1);
        assert_eq!(r.handles[&7], (11, libc::O_RDWR, false, 3));
        assert!(!r.torn);
        // A torn last record is ignored.
        let mut bytes = vec![0u8; j.len() as usize];
        rustix::io::pread(j.fd().unwrap(), &mut bytes, 0).unwrap();
        let cut = bytes.len() - 3;
        let t = replay_bytes(&bytes[..cut]);
        assert!(t.torn);
        assert_eq!(t.nodes.len(), 2, "the torn X record of node 12 is not applied");
        assert_eq!(rearmed.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn compaction_bounds_the_journal_and_keeps_the_state() {
        let rearmed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r2 = rearmed.clone();
        let j = Journal::create(
            (1, 2),
            [3, 4],
            2,
            Arc::new(move |_| {
                r2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
        )
        .unwrap();
        j.node(5, (1, 5), libc::S_IFREG, Some(b"h5"));
        for fh in 0..100_000u64 {
            j.opened(fh + 100, 5, libc::O_RDONLY, false, 0);
            j.closed(fh + 100);
        }
        j.opened(99, 5, libc::O_WRONLY, false, 0);
        assert!(rearmed.load(std::sync::atomic::Ordering::Relaxed) > 0);
        assert!(j.len() < 2 * COMPACT_MIN, "journal of {} bytes", j.len());
        let r = replay(&j.fd().unwrap()).unwrap();
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.handles.len(), 1);
        assert_eq!(r.handles[&99], (5, libc::O_WRONLY, false, 0));
        assert_eq!(r.next_id, 6);
    }
}
