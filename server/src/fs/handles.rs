//! Open file and directory handles (fh → descriptor), and directory streams.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use protocol::{Errno, Result};

use super::sys;

/// One entry read from the backing directory.
pub(crate) struct DirEntry {
    /// Backing inode number.
    pub(crate) ino: u64,
    /// Cookie of the entry after this one (the backing d_off).
    pub(crate) off: u64,
    /// DT_* type.
    pub(crate) kind: u8,
    /// Name bytes (no NUL).
    pub(crate) name: Box<[u8]>,
}

/// The read position of an open directory.
pub(crate) struct DirStream {
    /// Entries read from the backing directory but not yet returned.
    pending: VecDeque<DirEntry>,
    /// Cookie of the next entry to return (where the backing fd logically is).
    pos: u64,
}

/// Size of the getdents64 buffer.
const DIRENT_BUF: usize = 32 * 1024;

impl DirStream {
    /// Positions the stream at cookie `offset` (seeking the backing directory if needed).
    pub(crate) fn seek(&mut self, fd: RawFd, offset: u64) -> Result<()> {
        if offset == self.pos {
            return Ok(());
        }
        // SAFETY: lseek on a descriptor we own; errors are checked.
        let r = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_SET) };
        sys::cvt_long(r)?;
        self.pending.clear();
        self.pos = offset;
        Ok(())
    }

    /// Takes the next entry, reading more from the backing directory when needed; None at
    /// the end. Follow with [`consumed`](Self::consumed) or [`unread`](Self::unread).
    pub(crate) fn next(&mut self, fd: RawFd) -> Result<Option<DirEntry>> {
        if self.pending.is_empty() {
            let mut buf = vec![0u8; DIRENT_BUF];
            let n = sys::getdents64(fd, &mut buf)?;
            parse_dirents(&buf[..n], &mut self.pending);
        }
        Ok(self.pending.pop_front())
    }

    /// The entry taken by [`next`](Self::next) was returned to the kernel.
    pub(crate) fn consumed(&mut self, e: &DirEntry) {
        self.pos = e.off;
    }

    /// The entry taken by [`next`](Self::next) did not fit: keep it for the next call.
    pub(crate) fn unread(&mut self, e: DirEntry) {
        self.pending.push_front(e);
    }
}

/// Parses `linux_dirent64` records.
fn parse_dirents(buf: &[u8], out: &mut VecDeque<DirEntry>) {
    let mut pos = 0usize;
    while pos + 19 <= buf.len() {
        let rec = &buf[pos..];
        let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
        let off = i64::from_ne_bytes(rec[8..16].try_into().unwrap_or([0; 8]));
        let reclen = u16::from_ne_bytes(rec[16..18].try_into().unwrap_or([0; 2])) as usize;
        if reclen < 19 || reclen > rec.len() {
            break;
        }
        let kind = rec[18];
        let raw = &rec[19..reclen];
        let name_len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        out.push_back(DirEntry { ino, off: off as u64, kind, name: raw[..name_len].into() });
        pos += reclen;
    }
}

/// What an open handle refers to.
pub(crate) enum HandleKind {
    /// An open regular file (shared with the inode table while it is open, so an open file
    /// costs one descriptor, not two).
    File(std::sync::Arc<OwnedFd>),
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

    /// [`file_fd`](Self::file_fd), borrowed for as long as the handle lives.
    pub(crate) fn file_borrowed(&self) -> Result<std::os::fd::BorrowedFd<'_>> {
        match &self.kind {
            HandleKind::File(fd) => Ok(std::os::fd::AsFd::as_fd(fd)),
            HandleKind::Dir(..) => Err(Errno::EISDIR),
        }
    }

    /// The descriptor of an open regular file; EBADF for directories.
    pub(crate) fn file_fd(&self) -> Result<RawFd> {
        match &self.kind {
            HandleKind::File(fd) => Ok(fd.as_raw_fd()),
            HandleKind::Dir(..) => Err(Errno::EISDIR),
        }
    }

    /// The directory descriptor and locked stream; ENOTDIR for files.
    pub(crate) fn dir(&self) -> Result<(RawFd, MutexGuard<'_, DirStream>)> {
        match &self.kind {
            HandleKind::Dir(fd, s) => Ok((fd.as_raw_fd(), s.lock().unwrap_or_else(|e| e.into_inner()))),
            HandleKind::File(_) => Err(Errno::ENOTDIR),
        }
    }
}

/// All open handles.
pub(crate) struct HandleTable {
    map: Mutex<HashMap<u64, Arc<Handle>>>,
    next: AtomicU64,
}

impl HandleTable {
    /// An empty table.
    pub(crate) fn new() -> HandleTable {
        HandleTable { map: Mutex::new(HashMap::new()), next: AtomicU64::new(1) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an open regular file.
    pub(crate) fn insert_file(&self, node: u64, fd: std::sync::Arc<OwnedFd>) -> u64 {
        self.insert(Handle { node, kind: HandleKind::File(fd) })
    }

    /// Registers an open directory (positioned at its start).
    pub(crate) fn insert_dir(&self, node: u64, fd: Arc<OwnedFd>) -> u64 {
        self.insert(Handle {
            node,
            kind: HandleKind::Dir(fd, Mutex::new(DirStream { pending: VecDeque::new(), pos: 0 })),
        })
    }

    fn insert(&self, h: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(fh, Arc::new(h));
        fh
    }

    /// The handle `fh`, or EBADF.
    pub(crate) fn get(&self, fh: u64) -> Result<Arc<Handle>> {
        self.lock().get(&fh).cloned().ok_or(Errno::EBADF)
    }

    /// Removes `fh`; its descriptor closes when the last in-flight user drops it.
    pub(crate) fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        self.lock().remove(&fh)
    }

    /// Number of open handles.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}
