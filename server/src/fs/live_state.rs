//! The file system's part of a live upgrade: what the next server process of the same mount
//! needs to answer the kernel's requests as this one would. The kernel holds node ids (with
//! lookup counts), open handles (fh values) and passthrough backing ids; all three are carried
//! over, with the descriptors of open handles (and of inodes without a file handle) sent along
//! by the caller over a unix socket, so an open file keeps its very open file description
//! (offset, flags, even when the file was deleted meanwhile).
//!
//! Format (little-endian), version 1 (the outer frame in `crate::upgrade` carries the version):
//! the handle state (`handle_state::encode`: keys, next node id, remembered handles) as u32
//! length + bytes; live node count (u64), then per node: id, dev, ino (u64), file type (u32),
//! lookups (u64), handle flag (u8) [+ u32 length + bytes], descriptor flag (u8); handle count
//! (u64), then per handle: fh, node (u64), directory flag (u8); passthrough count (u64), then per
//! inode: node (u64), backing id (i32, 0 = served), opens (u64). Descriptors travel in order:
//! those of the nodes with the flag, then one per handle.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::handle_state;
pub(crate) use super::inode::HandleState;
use super::inode::LiveNode;
use super::PassthroughFs;

/// A decoding failure (the caller refuses the upgrade with it).
pub type DecodeError = &'static str;

/// Upper bounds on counts read from a state (64-bit counts from a peer are not trusted).
const MAX_COUNT: u64 = 1 << 26;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err("truncated state");
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "truncated state")?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "truncated state")?))
    }
    fn count(&mut self) -> Result<u64, DecodeError> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err("count out of range");
        }
        Ok(n)
    }
}

/// The live state as data: what the format carries (descriptors travel beside it, in the order
/// the records that have one appear). [`encode`] and [`decode`] are pure, so the format is
/// tested byte for byte against the checked-in fixtures (`server/tests/fixtures/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LiveState {
    /// Handles to remember beyond the live nodes (the state a remount would keep).
    pub(crate) handles: HandleState,
    /// The nodes the kernel holds.
    pub(crate) nodes: Vec<NodeRecord>,
    /// Open file and directory handles (each with a descriptor).
    pub(crate) open: Vec<OpenRecord>,
    /// Passthrough states: (node, backing id (0: served), opens).
    pub(crate) passthrough: Vec<(u64, i32, u64)>,
}

/// One live node of [`LiveState`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodeRecord {
    pub(crate) id: u64,
    /// Backing (st_dev, st_ino).
    pub(crate) key: (u64, u64),
    /// File type bits (`S_IFMT`).
    pub(crate) kind: u32,
    pub(crate) lookups: u64,
    /// The backing file handle, if the file system has them.
    pub(crate) handle: Option<Vec<u8>>,
    /// A descriptor travels for this node (it has no handle to be reopened by).
    pub(crate) fd: bool,
}

/// One open handle of [`LiveState`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OpenRecord {
    pub(crate) fh: u64,
    pub(crate) node: u64,
    pub(crate) dir: bool,
}

/// Encodes `s` in the format of `crate::upgrade::STATE_VERSION` (see the module documentation).
pub(crate) fn encode(s: &LiveState) -> Vec<u8> {
    let mut out = Vec::new();
    let hs = handle_state::encode(&s.handles);
    out.extend_from_slice(&(hs.len() as u32).to_le_bytes());
    out.extend_from_slice(&hs);
    out.extend_from_slice(&(s.nodes.len() as u64).to_le_bytes());
    for n in &s.nodes {
        for w in [n.id, n.key.0, n.key.1] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&n.kind.to_le_bytes());
        out.extend_from_slice(&n.lookups.to_le_bytes());
        match &n.handle {
            Some(h) => {
                out.push(1);
                out.extend_from_slice(&(h.len() as u32).to_le_bytes());
                out.extend_from_slice(h);
            }
            None => out.push(0),
        }
        out.push(u8::from(n.fd));
    }
    out.extend_from_slice(&(s.open.len() as u64).to_le_bytes());
    for h in &s.open {
        out.extend_from_slice(&h.fh.to_le_bytes());
        out.extend_from_slice(&h.node.to_le_bytes());
        out.push(u8::from(h.dir));
    }
    out.extend_from_slice(&(s.passthrough.len() as u64).to_le_bytes());
    for (node, id, opens) in &s.passthrough {
        out.extend_from_slice(&node.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&opens.to_le_bytes());
    }
    out
}

/// Decodes a state written in format `version` (one the HELLO announced and this build reads:
/// 1 to `crate::upgrade::STATE_VERSION`). A new format adds its version here and keeps the
/// readers of the older ones, each tested against its fixture.
pub(crate) fn decode(version: u32, state: &[u8]) -> Result<LiveState, DecodeError> {
    match version {
        1 => decode_v1(state),
        _ => Err("state version not understood"),
    }
}

fn decode_v1(state: &[u8]) -> Result<LiveState, DecodeError> {
    let mut r = Reader(state);
    let hs_len = r.u32()? as usize;
    let handles = handle_state::decode(r.take(hs_len)?).ok_or("malformed handle state")?;
    let count = r.count()?;
    let mut nodes = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let (id, dev, ino) = (r.u64()?, r.u64()?, r.u64()?);
        let kind = r.u32()?;
        let lookups = r.u64()?;
        let handle = if r.u8()? == 1 {
            let len = r.u32()? as usize;
            if len > 256 {
                return Err("file handle too long");
            }
            Some(r.take(len)?.to_vec())
        } else {
            None
        };
        let fd = r.u8()? == 1;
        nodes.push(NodeRecord { id, key: (dev, ino), kind, lookups, handle, fd });
    }
    let count = r.count()?;
    let mut open = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let (fh, node) = (r.u64()?, r.u64()?);
        let dir = r.u8()? == 1;
        open.push(OpenRecord { fh, node, dir });
    }
    let count = r.count()?;
    let mut passthrough = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let node = r.u64()?;
        let id = r.u32()? as i32;
        let opens = r.u64()?;
        passthrough.push((node, id, opens));
    }
    if !r.0.is_empty() {
        return Err("trailing bytes in state");
    }
    Ok(LiveState { handles, nodes, open, passthrough })
}

impl PassthroughFs {
    /// The state to hand to the next server, and the descriptors to send with it. Call only
    /// while no request is being served (the session drained).
    pub fn export_live(&self) -> (Vec<u8>, Vec<Arc<OwnedFd>>) {
        let mut fds = Vec::new();
        let mut nodes = Vec::new();
        for n in self.inodes.export_live() {
            let fd = n.fd.is_some();
            fds.extend(n.fd);
            nodes.push(NodeRecord { id: n.id, key: n.key, kind: n.kind, lookups: n.lookups, handle: n.handle, fd });
        }
        let mut open = Vec::new();
        for (fh, h) in self.handles.export() {
            let (dir, fd) = match &h.kind {
                super::handles::HandleKind::File(fd) => (false, fd.clone()),
                super::handles::HandleKind::Dir(fd, _) => (true, fd.clone()),
            };
            open.push(OpenRecord { fh, node: h.node, dir });
            fds.push(fd);
        }
        let state = LiveState { handles: self.inodes.export(), nodes, open, passthrough: self.passthrough.export() };
        (encode(&state), fds)
    }

    /// Takes over the state [`export_live`](Self::export_live) of the previous server gave (in
    /// format `version`), with its descriptors, before any request is served.
    pub fn import_live(&self, version: u32, state: &[u8], fds: Vec<OwnedFd>) -> Result<(), DecodeError> {
        let s = decode(version, state)?;
        if s.handles.root_key != self.inodes.root_key() {
            return Err("the state is of another backing directory");
        }
        let mut fds = fds.into_iter();
        // Refused only without export support (no remembered handles to carry); the live
        // nodes below are taken over either way.
        let _ = self.inodes.import(&s.handles);
        let mut nodes = Vec::with_capacity(s.nodes.len());
        for n in s.nodes {
            let fd = if n.fd { Some(Arc::new(fds.next().ok_or("descriptor missing")?)) } else { None };
            nodes.push(LiveNode { id: n.id, key: n.key, kind: n.kind, lookups: n.lookups, handle: n.handle, fd });
        }
        self.inodes.import_live(nodes).map_err(|_| "node table not accepted")?;
        for h in s.open {
            let fd = Arc::new(fds.next().ok_or("descriptor missing")?);
            self.inodes.pin_open(h.node, &fd);
            self.handles.import(h.fh, h.node, h.dir, fd);
        }
        for (node, id, opens) in s.passthrough {
            self.passthrough.import(node, id, opens);
        }
        Ok(())
    }

    /// Open handles (for logs and tests of the upgrade).
    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }
}

/// What a crash failover recovered of the dead server's open handles.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovered {
    /// Nodes taken over.
    pub nodes: usize,
    /// Open handles opened again by file handle.
    pub handles: usize,
    /// Open handles that could not be opened again (their file is gone): EIO until released.
    pub lost: usize,
}

impl PassthroughFs {
    /// Starts the crash-failover journal (failover on): from now on every node the kernel
    /// learns or forgets and every open and release is written to it; the nodes and handles
    /// present now are written first. Call before requests are served (at start, or once a
    /// taken-over state is in). `rearm` gets the journal's new descriptor after each
    /// compaction. Returns the journal's descriptor (for the watchdog).
    pub fn start_journal(&self, rearm: Arc<super::journal::Rearm>) -> std::io::Result<OwnedFd> {
        let (gen, next_id) = self.inodes.keys();
        let j = super::journal::Journal::create(self.inodes.root_key(), gen, next_id, rearm)?;
        for n in self.inodes.set_journal(j.clone()) {
            j.node(n.id, n.key, n.kind, n.handle.as_deref());
        }
        let backing: std::collections::HashMap<u64, i32> =
            self.passthrough.export().into_iter().map(|(node, id, _)| (node, id)).collect();
        for (fh, h) in self.handles.export() {
            let (fd, dir) = match &h.kind {
                super::handles::HandleKind::File(fd) => (fd.clone(), false),
                super::handles::HandleKind::Dir(fd, _) => (fd.clone(), true),
            };
            let flags = rustix::fs::fcntl_getfl(&*fd).map_or(libc::O_RDONLY, |f| f.bits() as i32);
            let id = if dir { 0 } else { backing.get(&h.node).copied().unwrap_or(0) };
            j.opened(fh, h.node, flags, dir, id);
        }
        let fd = j.fd()?;
        let _ = self.journal.set(j);
        Ok(fd)
    }

    /// Size of the failover journal in bytes (0 when failover is off).
    pub fn journal_bytes(&self) -> u64 {
        self.journal.get().map_or(0, |j| j.len())
    }

    /// Takes over the state of a server that died (crash failover), from its journal, before
    /// any request is served: its node ids (with its generation key, so file handles and the
    /// kernel's inodes stay valid; lookup counts are not journaled, so these nodes stay until
    /// unmount), and its open handles under the same fh values, opened again by file handle
    /// with the same flags. A handle whose file cannot be opened again (deleted, not reachable
    /// by handle) answers EIO until the kernel releases it. Passthrough backing ids belong to
    /// the connection and stay valid.
    pub fn import_failover(&self, journal: &OwnedFd) -> Result<Recovered, String> {
        let r = super::journal::replay(journal).map_err(|e| format!("reading the journal: {e}"))?;
        let Some((root, gen)) = r.key else { return Err("the journal has no key record".into()) };
        if root != self.inodes.root_key() {
            return Err("the journal is of another backing directory".into());
        }
        if r.torn {
            log::warn!("failover journal: its last record was torn (the server died writing it); ignored");
        }
        self.inodes.set_keys(gen, r.next_id);
        let nodes: Vec<LiveNode> = r
            .nodes
            .into_iter()
            .filter(|(id, (_, _, h))| *id > 1 && !h.is_empty())
            .map(|(id, (key, kind, h))| LiveNode { id, key, kind, lookups: 1 << 40, handle: Some(h), fd: None })
            .collect();
        let mut out = Recovered { nodes: nodes.len(), ..Recovered::default() };
        self.inodes.import_live(nodes).map_err(|e| format!("node table not accepted: {e:?}"))?;
        let mut opens: std::collections::HashMap<u64, (i32, u64)> = std::collections::HashMap::new();
        for (fh, (node, flags, dir, backing)) in r.handles {
            let f = if dir {
                libc::O_RDONLY | libc::O_DIRECTORY
            } else {
                flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_CLOEXEC)
            };
            match self.inodes.reopen_handle(node, f) {
                Ok(fd) => {
                    let fd = Arc::new(fd);
                    self.inodes.pin_open(node, &fd);
                    self.handles.import(fh, node, dir, fd);
                    if !dir {
                        let e = opens.entry(node).or_insert((0, 0));
                        if backing > 0 {
                            e.0 = backing;
                        }
                        e.1 += 1;
                    }
                    out.handles += 1;
                }
                Err(e) => {
                    log::warn!("failover: open handle {fh} of node {node} cannot be opened again ({e:?}): EIO on it");
                    self.handles.mark_lost(fh);
                    out.lost += 1;
                }
            }
        }
        for (node, (backing, n)) in opens {
            self.passthrough.import(node, backing, n);
        }
        Ok(out)
    }
}
