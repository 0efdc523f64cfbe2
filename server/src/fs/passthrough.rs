//! Kernel passthrough of file I/O: which opens get a backing file, and the backing ids.
//!
//! The kernel allows one backing file per inode at a time (concurrent opens of one inode with
//! different backing files fail with EBUSY) and refuses to mix passthrough and cached opens of
//! one inode (ETXTBSY, seen by the caller as EIO). So each inode has a mode decided by its
//! first open and kept while any open exists: passthrough opens share one backing id, which is
//! closed with the last of them; when the kernel refuses a backing file, the inode's opens go
//! through the server ("cached" mode) instead of failing the user's open().

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use ringfs_protocol::KernelChannel;

/// How the opens of one inode are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The kernel does the I/O on backing id `.0`.
    Passthrough(i32),
    /// Reads and writes come to the server.
    Cached,
}

struct State {
    mode: Mode,
    opens: u64,
}

/// Why an open of a regular file was not passed through (a bounded set: metrics labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// Passthrough is switched off or was not negotiated.
    Disabled,
    /// Another open of the same inode is served by the server.
    InodeCached,
    /// The kernel refused the backing file (stack depth, file type, ...).
    Refused,
    /// A set-uid/set-gid file opened for writing by a user other than its owner.
    SetId,
    /// The file matches `offload.passthrough_exclude`.
    Excluded,
}

impl Fallback {
    /// All reasons, for exporting zero counters.
    pub const ALL: [Fallback; 5] =
        [Fallback::Disabled, Fallback::InodeCached, Fallback::Refused, Fallback::SetId, Fallback::Excluded];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Disabled => "disabled",
            Fallback::InodeCached => "inode_cached",
            Fallback::Refused => "refused",
            Fallback::SetId => "setid",
            Fallback::Excluded => "excluded",
        }
    }
}

/// Counters of passthrough decisions.
#[derive(Debug, Default)]
pub struct PassthroughStats {
    /// Opens served by passthrough.
    pub enabled: AtomicU64,
    /// Opens that fell back, by [`Fallback`] (same order as [`Fallback::ALL`]).
    pub fallback: [AtomicU64; 5],
}

/// Per-inode passthrough bookkeeping.
#[derive(Default)]
pub(crate) struct Passthrough {
    kernel: OnceLock<Arc<dyn KernelChannel>>,
    enabled: std::sync::atomic::AtomicBool,
    inodes: StateShards,
    pub(crate) stats: Arc<PassthroughStats>,
}

/// Per-inode states, sharded by node id: the one-backing-id-per-inode rule needs only the
/// inode's own shard locked, so opens and releases of different files on different queues do
/// not meet on one lock.
struct StateShards(Box<[StateShard]>);

/// One shard, on cache lines of its own.
#[derive(Default)]
#[repr(align(128))]
struct StateShard(Mutex<HashMap<u64, State, super::IdHash>>);

const STATE_SHARDS: u64 = 64;

impl Default for StateShards {
    fn default() -> Self {
        StateShards((0..STATE_SHARDS).map(|_| StateShard::default()).collect())
    }
}

impl StateShards {
    fn of(&self, node: u64) -> &Mutex<HashMap<u64, State, super::IdHash>> {
        &self.0[(node % STATE_SHARDS) as usize].0
    }
}

impl Passthrough {
    pub(crate) fn attach(&self, kernel: Arc<dyn KernelChannel>) {
        let _ = self.kernel.set(kernel);
    }

    pub(crate) fn kernel(&self) -> Option<Arc<dyn KernelChannel>> {
        self.kernel.get().cloned()
    }

    pub(crate) fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    fn count(&self, r: std::result::Result<i32, Fallback>) -> i32 {
        match r {
            Ok(id) => {
                self.stats.enabled.fetch_add(1, Ordering::Relaxed);
                id
            }
            Err(f) => {
                let i = Fallback::ALL.iter().position(|x| *x == f).unwrap_or(0);
                self.stats.fallback[i].fetch_add(1, Ordering::Relaxed);
                0
            }
        }
    }

    /// Decides how a new open of regular file `node` (backing descriptor `fd`) is served and
    /// records it. Returns the backing id for the reply (0 = served by the server).
    /// `setid_risk`: the open could write to a set-uid/set-gid file that is not the caller's.
    /// `backing`: the file to register with the kernel instead of `fd` when the inode gets its
    /// backing id (asked only then; None: `fd` itself).
    pub(crate) fn open(
        &self,
        node: u64,
        fd: RawFd,
        setid_risk: bool,
        excluded: bool,
        backing: impl FnOnce() -> Option<OwnedFd>,
    ) -> i32 {
        let r = self.decide(node, fd, setid_risk, excluded, backing);
        self.count(r)
    }

    fn decide(
        &self,
        node: u64,
        fd: RawFd,
        setid_risk: bool,
        excluded: bool,
        backing: impl FnOnce() -> Option<OwnedFd>,
    ) -> std::result::Result<i32, Fallback> {
        let Ok(mut map) = self.inodes.of(node).lock() else { return Err(Fallback::Disabled) };
        if let Some(st) = map.get_mut(&node) {
            st.opens += 1;
            return match st.mode {
                Mode::Passthrough(id) => Ok(id),
                Mode::Cached => Err(Fallback::InodeCached),
            };
        }
        let (mode, result) = match self.kernel.get() {
            None => (Mode::Cached, Err(Fallback::Disabled)),
            Some(_) if !self.enabled.load(Ordering::Relaxed) => (Mode::Cached, Err(Fallback::Disabled)),
            Some(_) if setid_risk => (Mode::Cached, Err(Fallback::SetId)),
            Some(_) if excluded => (Mode::Cached, Err(Fallback::Excluded)),
            Some(k) => match k.backing_open(backing().as_ref().map_or(fd, |b| b.as_raw_fd())) {
                Ok(id) => (Mode::Passthrough(id), Ok(id)),
                Err(e) => {
                    log::debug!("passthrough refused for node {node}: {e}");
                    (Mode::Cached, Err(Fallback::Refused))
                }
            },
        };
        map.insert(node, State { mode, opens: 1 });
        result
    }

    /// An open of `node` was released.
    /// Every inode's passthrough state: (node, backing id or 0 when served by the server, opens)
    /// (live upgrade: backing ids belong to the connection, so the next server keeps them).
    pub(crate) fn export(&self) -> Vec<(u64, i32, u64)> {
        let mut all = Vec::new();
        for sh in self.inodes.0.iter() {
            let g = sh.0.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(g.iter().map(|(&node, st)| {
                let id = match st.mode {
                    Mode::Passthrough(id) => id,
                    Mode::Cached => 0,
                };
                (node, id, st.opens)
            }));
        }
        all
    }

    /// Takes over one inode's state from [`export`](Self::export) of the previous server.
    pub(crate) fn import(&self, node: u64, backing_id: i32, opens: u64) {
        let mode = if backing_id > 0 { Mode::Passthrough(backing_id) } else { Mode::Cached };
        self.inodes.of(node).lock().unwrap_or_else(|e| e.into_inner()).insert(node, State { mode, opens });
    }

    pub(crate) fn release(&self, node: u64) {
        let Ok(mut map) = self.inodes.of(node).lock() else { return };
        let Some(st) = map.get_mut(&node) else { return };
        st.opens = st.opens.saturating_sub(1);
        if st.opens > 0 {
            return;
        }
        if let Some(State { mode: Mode::Passthrough(id), .. }) = map.remove(&node) {
            if let Some(k) = self.kernel.get() {
                if let Err(e) = k.backing_close(id) {
                    log::warn!("closing backing id {id}: {e}");
                }
            }
        }
    }
}

/// Shell-style match of `text` against `pattern` (`*` any run, `?` one byte).
pub(crate) fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether `rel` (a path relative to the backing root) matches one of `patterns`: a pattern
/// without `/` is matched against the file name, one with `/` against the whole path.
pub(crate) fn excluded(patterns: &[String], rel: &[u8]) -> bool {
    let name = rel.rsplit(|&c| c == b'/').next().unwrap_or(rel);
    patterns.iter().any(|p| {
        let p = p.as_bytes();
        if p.contains(&b'/') {
            glob_match(p, rel)
        } else {
            glob_match(p, name)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(b"*.db", b"x.db"));
        assert!(!glob_match(b"*.db", b"x.dbx"));
        assert!(glob_match(b"a?c*", b"abcdef"));
        assert!(glob_match(b"*", b""));
        let pats = vec!["*.sqlite".to_string(), "logs/*".to_string()];
        assert!(excluded(&pats, b"data/app.sqlite"));
        assert!(excluded(&pats, b"logs/today"));
        assert!(!excluded(&pats, b"data/logs/today"));
        assert!(!excluded(&pats, b"app.db"));
    }
}
