//! The file-system API: what a ringfs file system implements.
//!
//! The dispatcher decodes every kernel request into a call of one method of [`FileSystem`]
//! and encodes the returned value as the reply. An implementation never sees raw bytes or
//! opcodes. Every method has a default that answers `ENOSYS`, which the kernel treats as
//! "not implemented" (for most operations it then stops asking).
//!
//! # Protocol contract
//! - **Lookup counts.** Every successful reply that carries an [`Entry`] with a non-zero
//!   `nodeid` (`lookup`, `mknod`, `mkdir`, `symlink`, `link`, `create`, `tmpfile`, and each entry
//!   added to a [`DirPlusBuffer`]) makes the kernel hold one more reference on that node. The
//!   kernel gives references back with [`FileSystem::forget`] (`nlookup` at a time). A node must
//!   stay valid while its count is above zero. The root ([`NodeId::ROOT`]) is never forgotten.
//! - **Negative entries.** `lookup` may answer [`Entry::negative`] (node id 0) to let the kernel
//!   cache "no such name" for the entry timeout; it takes no reference.
//! - **Handles.** `open`/`create`/`tmpfile`/`opendir` return a [`FileHandle`] that comes back in
//!   every call on that open file until `release`/`releasedir`, which is called exactly once.
//! - **Errors** are positive errno values ([`Errno`]); the dispatcher negates them on the wire.
//! - **Async.** Methods are `async` so that a transport may run many requests of one core
//!   concurrently. The futures need not be `Send`: a request is started and finished on one thread.
//!
//! # Value types can grow
//! The structs a file system fills or receives ([`FileAttr`], [`Entry`], [`AttrOut`],
//! [`Opened`], [`OpenOptions`], [`StatFs`], [`StatxAttr`], [`FsXattr`], [`SetAttr`],
//! [`WriteFlags`], [`Context`], [`Timespec`], [`Lock`], [`Ioctl`], [`ConnInfo`]) are
//! `#[non_exhaustive]`: later versions may add fields without breaking file systems. Outside this
//! crate build them with their constructors (`Entry::new`, `AttrOut::new`, `Opened::new`,
//! `FileAttr::new`, `FileAttr::from_stat`, `StatFs::from_statfs`, `SetAttr::with_size`, ...) or
//! with `Default` and then set the public fields; match them with `..`.

use std::ffi::CStr;
use std::time::Duration;

/// A positive `errno` value returned by file-system operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// No such file or directory.
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    /// I/O error.
    pub const EIO: Errno = Errno(libc::EIO);
    /// Bad file handle.
    pub const EBADF: Errno = Errno(libc::EBADF);
    /// Permission denied.
    pub const EACCES: Errno = Errno(libc::EACCES);
    /// File exists.
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    /// Not a directory.
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    /// Is a directory.
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// Result too large / buffer too small.
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    /// Function not implemented.
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    /// No data available (missing xattr).
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    /// Operation not supported.
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    /// Stale file handle.
    pub const ESTALE: Errno = Errno(libc::ESTALE);
    /// Too many open files.
    pub const EMFILE: Errno = Errno(libc::EMFILE);
    /// Interrupted.
    pub const EINTR: Errno = Errno(libc::EINTR);
    /// Read-only file system.
    pub const EROFS: Errno = Errno(libc::EROFS);
    /// Name too long.
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    /// Cross-device link.
    pub const EXDEV: Errno = Errno(libc::EXDEV);
    /// Too many levels of symbolic links (also: a path that would lead back into the mount).
    pub const ELOOP: Errno = Errno(libc::ELOOP);
    /// Inappropriate ioctl for device.
    pub const ENOTTY: Errno = Errno(libc::ENOTTY);

    /// The calling thread's current `errno`.
    pub fn last() -> Errno {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

/// Result of a file-system operation.
pub type Result<T> = std::result::Result<T, Errno>;

/// A kernel node id (the FUSE "inode number" of the protocol, not the backing st_ino).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The root directory's node id, fixed by the protocol.
    pub const ROOT: NodeId = NodeId(1);
}

/// An open file or directory handle chosen by the file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileHandle(pub u64);

/// Who is asking: the credentials and pid of the calling process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Context {
    /// Caller's fsuid.
    pub uid: u32,
    /// Caller's fsgid.
    pub gid: u32,
    /// Caller's thread group id (0 for kernel-internal requests).
    pub pid: u32,
}

impl Context {
    /// The caller `uid`/`gid` (fsuid/fsgid) with process `pid`.
    pub const fn new(uid: u32, gid: u32, pid: u32) -> Context {
        Context { uid, gid, pid }
    }
}

/// A timestamp: seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timespec {
    /// Seconds since the epoch.
    pub sec: i64,
    /// Nanoseconds, 0..1e9.
    pub nsec: u32,
}

impl Timespec {
    /// `sec` seconds and `nsec` nanoseconds since the epoch.
    pub const fn new(sec: i64, nsec: u32) -> Timespec {
        Timespec { sec, nsec }
    }

    fn from_statx(t: &libc::statx_timestamp) -> Timespec {
        Timespec { sec: t.tv_sec, nsec: t.tv_nsec }
    }
}

/// Attributes of a node, as the kernel caches them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileAttr {
    /// Inode number shown to users (st_ino).
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Last access.
    pub atime: Timespec,
    /// Last modification.
    pub mtime: Timespec,
    /// Last status change.
    pub ctime: Timespec,
    /// File type and permission bits (st_mode).
    pub mode: u32,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

impl FileAttr {
    /// Attributes of node `ino` with file type and permission bits `mode`; everything else zero
    /// (set the other fields, which are public, as needed).
    pub fn new(ino: u64, mode: u32) -> FileAttr {
        FileAttr { ino, mode, ..FileAttr::default() }
    }

    /// Converts a `statx` buffer (the fields of `STATX_BASIC_STATS`).
    pub fn from_statx(stx: &libc::statx) -> FileAttr {
        FileAttr {
            ino: stx.stx_ino,
            size: stx.stx_size,
            blocks: stx.stx_blocks,
            atime: Timespec::from_statx(&stx.stx_atime),
            mtime: Timespec::from_statx(&stx.stx_mtime),
            ctime: Timespec::from_statx(&stx.stx_ctime),
            mode: stx.stx_mode as u32,
            nlink: stx.stx_nlink,
            uid: stx.stx_uid,
            gid: stx.stx_gid,
            rdev: libc::makedev(stx.stx_rdev_major, stx.stx_rdev_minor) as u32,
            blksize: stx.stx_blksize,
        }
    }

    /// Converts a `stat` buffer.
    pub fn from_stat(st: &libc::stat) -> FileAttr {
        FileAttr {
            ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: Timespec { sec: st.st_atime, nsec: st.st_atime_nsec as u32 },
            mtime: Timespec { sec: st.st_mtime, nsec: st.st_mtime_nsec as u32 },
            ctime: Timespec { sec: st.st_ctime, nsec: st.st_ctime_nsec as u32 },
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }
}

/// Extended attributes returned by [`FileSystem::statx`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatxAttr {
    /// The classic attributes.
    pub attr: FileAttr,
    /// Which `STATX_*` fields are valid.
    pub mask: u32,
    /// Birth time (valid when `mask` has `STATX_BTIME`).
    pub btime: Timespec,
    /// `STATX_ATTR_*` flags.
    pub attributes: u64,
    /// Which attribute flags are supported.
    pub attributes_mask: u64,
}

impl StatxAttr {
    /// Converts a `statx` buffer: the classic attributes, the valid-field mask, birth time and
    /// attribute flags.
    pub fn from_statx(stx: &libc::statx) -> StatxAttr {
        StatxAttr {
            attr: FileAttr::from_statx(stx),
            mask: stx.stx_mask,
            btime: Timespec::from_statx(&stx.stx_btime),
            attributes: stx.stx_attributes,
            attributes_mask: stx.stx_attributes_mask,
        }
    }
}

/// Reply to `getattr`/`setattr`: attributes plus how long the kernel may cache them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AttrOut {
    /// The attributes.
    pub attr: FileAttr,
    /// Attribute cache timeout.
    pub timeout: Duration,
}

impl AttrOut {
    /// `attr`, cacheable for `timeout`.
    pub fn new(attr: FileAttr, timeout: Duration) -> AttrOut {
        AttrOut { attr, timeout }
    }
}

/// Reply to lookup-like operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry {
    /// Node id; 0 means a negative entry.
    pub nodeid: NodeId,
    /// Generation: (nodeid, generation) must be unique over the file system's lifetime.
    pub generation: u64,
    /// Attributes of the node.
    pub attr: FileAttr,
    /// How long the kernel may cache the name → node binding.
    pub entry_timeout: Duration,
    /// How long the kernel may cache the attributes.
    pub attr_timeout: Duration,
}

impl Entry {
    /// A positive entry: `nodeid` (with `generation`) has attributes `attr`; the name binding
    /// may be cached for `entry_timeout`, the attributes for `attr_timeout`.
    pub fn new(
        nodeid: NodeId,
        generation: u64,
        attr: FileAttr,
        entry_timeout: Duration,
        attr_timeout: Duration,
    ) -> Entry {
        Entry { nodeid, generation, attr, entry_timeout, attr_timeout }
    }

    /// A negative entry: "this name does not exist", cacheable for `timeout`.
    pub fn negative(timeout: Duration) -> Entry {
        Entry {
            nodeid: NodeId(0),
            generation: 0,
            attr: FileAttr::default(),
            entry_timeout: timeout,
            attr_timeout: Duration::ZERO,
        }
    }
}

/// Kernel-side treatment of an open file, chosen by the file system at open time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Bypass the page cache (FOPEN_DIRECT_IO).
    pub direct_io: bool,
    /// Keep cached data of this file from earlier opens (FOPEN_KEEP_CACHE).
    pub keep_cache: bool,
    /// The file is not seekable (FOPEN_NONSEEKABLE).
    pub nonseekable: bool,
    /// Allow the kernel to cache directory contents (FOPEN_CACHE_DIR, opendir only).
    pub cache_dir: bool,
    /// Allow parallel direct writes (FOPEN_PARALLEL_DIRECT_WRITES).
    pub parallel_direct_writes: bool,
    /// Do not send FLUSH on close(2) (FOPEN_NOFLUSH): for file systems whose flush does nothing.
    pub noflush: bool,
    /// Kernel does I/O on this backing id itself (FOPEN_PASSTHROUGH); see the transport's
    /// backing-file API. 0 = no passthrough.
    pub backing_id: i32,
}

/// Reply to `open`/`opendir` (and the open half of `create`/`tmpfile`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Opened {
    /// The handle passed back on every later call on this open file.
    pub fh: FileHandle,
    /// Kernel-side options.
    pub options: OpenOptions,
}

impl Opened {
    /// Handle `fh` with kernel-side `options`.
    pub fn new(fh: FileHandle, options: OpenOptions) -> Opened {
        Opened { fh, options }
    }
}

/// A time to set: a given time or "now".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// A specific time.
    At(Timespec),
    /// The current time (UTIME_NOW).
    Now,
}

/// What `setattr` changes; `None` fields stay as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SetAttr {
    /// New permission bits (and type bits, which must match).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
    /// New change time (only honoured where the backing file system allows it).
    pub ctime: Option<Timespec>,
    /// The open file this comes through (ftruncate, futimens...), if any.
    pub fh: Option<FileHandle>,
    /// The kernel asks the server to clear set-uid/set-gid (FATTR_KILL_SUIDGID,
    /// only with FUSE_HANDLE_KILLPRIV_V2).
    pub kill_suidgid: bool,
}

impl SetAttr {
    /// Also sets the permission bits.
    pub fn with_mode(mut self, mode: u32) -> SetAttr {
        self.mode = Some(mode);
        self
    }

    /// Also sets the owner.
    pub fn with_uid(mut self, uid: u32) -> SetAttr {
        self.uid = Some(uid);
        self
    }

    /// Also sets the group.
    pub fn with_gid(mut self, gid: u32) -> SetAttr {
        self.gid = Some(gid);
        self
    }

    /// Also sets the size.
    pub fn with_size(mut self, size: u64) -> SetAttr {
        self.size = Some(size);
        self
    }

    /// Also sets the access time.
    pub fn with_atime(mut self, t: SetTime) -> SetAttr {
        self.atime = Some(t);
        self
    }

    /// Also sets the modification time.
    pub fn with_mtime(mut self, t: SetTime) -> SetAttr {
        self.mtime = Some(t);
        self
    }

    /// Also sets the change time.
    pub fn with_ctime(mut self, t: Timespec) -> SetAttr {
        self.ctime = Some(t);
        self
    }

    /// Through open file `fh`.
    pub fn with_fh(mut self, fh: FileHandle) -> SetAttr {
        self.fh = Some(fh);
        self
    }

    /// Also asks to clear set-uid/set-gid.
    pub fn with_kill_suidgid(mut self, kill: bool) -> SetAttr {
        self.kill_suidgid = kill;
        self
    }
}

/// `struct fsxattr` of `FS_IOC_FSGETXATTR`/`FS_IOC_FSSETXATTR`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FsXattr {
    /// `FS_XFLAG_*` flags.
    pub xflags: u32,
    /// Extent size hint.
    pub extsize: u32,
    /// Number of extents (read only).
    pub nextents: u32,
    /// Project id.
    pub projid: u32,
    /// Copy-on-write extent size hint.
    pub cowextsize: u32,
}

/// File-system statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatFs {
    /// Total blocks (in `frsize` units).
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks for unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Maximum name length.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

impl StatFs {
    /// Converts an `fstatfs`/`statfs` buffer.
    pub fn from_statfs(s: &libc::statfs) -> StatFs {
        StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namelen as u32,
            frsize: s.f_frsize as u32,
        }
    }
}

/// Reply to `getxattr`/`listxattr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XattrReply {
    /// The caller probed with size 0: this is the size it needs.
    Size(u32),
    /// The value (or the NUL-separated name list), at most the size the caller asked for.
    Data(Vec<u8>),
}

/// Arguments of `write` besides the data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteFlags {
    /// The write comes from the page cache (delayed writeback).
    pub cache: bool,
    /// The kernel asks the server to clear set-uid/set-gid (FUSE_WRITE_KILL_SUIDGID).
    pub kill_suidgid: bool,
    /// The open flags of the file.
    pub open_flags: u32,
}

/// The kind of a file lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockKind {
    /// A shared (read) lock: `F_RDLCK`, `LOCK_SH`.
    Read,
    /// An exclusive (write) lock: `F_WRLCK`, `LOCK_EX`.
    Write,
    /// No lock: `F_UNLCK`, `LOCK_UN`. In a `getlk` answer, "nothing conflicts".
    Unlock,
}

/// A byte-range lock as `fcntl` sees it (or, with `flock`, a whole-file `flock(2)` lock).
///
/// Ranges are inclusive: `start..=end`; `end == u64::MAX` means "to the end of the file, however
/// long it grows" (`l_len == 0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Lock {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive); `u64::MAX` for "to end of file".
    pub end: u64,
    /// Read, write or unlock.
    pub kind: LockKind,
    /// The process that holds (in a `getlk` answer) or asks for the lock, as the kernel numbers
    /// it for the file system (its pid in the server's pid namespace); 0 if unknown.
    pub pid: u32,
    /// A BSD `flock(2)` lock rather than a POSIX record lock (only with
    /// [`ConnInfo::flock_locks`]).
    pub flock: bool,
}

impl Lock {
    /// A POSIX lock of `kind` on `start..=end`, held or asked for by `pid`.
    pub fn new(kind: LockKind, start: u64, end: u64, pid: u32) -> Lock {
        Lock { start, end, kind, pid, flock: false }
    }

    /// The answer to `getlk` when nothing conflicts.
    pub fn unlocked() -> Lock {
        Lock::new(LockKind::Unlock, 0, 0, 0)
    }

    /// Whether the two ranges share a byte.
    pub fn overlaps(&self, other: &Lock) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// Whether `self` (held by another owner) keeps `other` from being taken: overlapping
    /// ranges and at least one write lock.
    pub fn conflicts_with(&self, other: &Lock) -> bool {
        self.kind != LockKind::Unlock
            && other.kind != LockKind::Unlock
            && self.overlaps(other)
            && (self.kind == LockKind::Write || other.kind == LockKind::Write)
    }
}

/// Who owns a lock: the kernel's lock-owner id (per process for POSIX locks, per open file for
/// `flock` and OFD locks). Opaque; compare for equality only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockOwner(pub u64);

/// An ioctl the kernel forwards (`FUSE_IOCTL`, restricted form): the command's `_IOC` size and
/// direction decide how much data comes in and may go out.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Ioctl<'a> {
    /// The open file it was issued on.
    pub fh: FileHandle,
    /// The ioctl command (`_IOC` encoded).
    pub cmd: u32,
    /// The raw argument (for `_IOC_NONE` commands, the value itself).
    pub arg: u64,
    /// Issued on a directory.
    pub dir: bool,
    /// The data the caller passes in (`_IOC_WRITE` commands: `_IOC_SIZE(cmd)` bytes).
    pub input: &'a [u8],
    /// The most bytes the answer may carry back (`_IOC_READ` commands: `_IOC_SIZE(cmd)`);
    /// longer answers are cut, shorter ones padded with zeros.
    pub out_size: u32,
}

/// File type of a directory entry (DT_* values).
pub type DirentType = u32;

/// A buffer that `readdir` fills with directory entries.
///
/// Entries are encoded directly into the kernel reply; the file system only names them.
pub struct DirBuffer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> DirBuffer<'a> {
    /// Wraps `buf`, which limits how many entries fit.
    pub fn new(buf: &'a mut [u8]) -> Self {
        DirBuffer { buf, len: 0 }
    }

    /// Adds one entry. `offset` is the cookie of the *next* entry (what a later `readdir` gets
    /// to continue after this one). Returns false, adding nothing, when the buffer is full.
    pub fn add(&mut self, ino: u64, offset: u64, kind: DirentType, name: &[u8]) -> bool {
        match crate::reply::encode_dirent(&mut self.buf[self.len..], ino, offset, kind, name) {
            Some(n) => {
                self.len += n;
                true
            }
            None => false,
        }
    }

    /// Bytes used so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A buffer that `readdirplus` fills with entries and their attributes.
pub struct DirPlusBuffer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> DirPlusBuffer<'a> {
    /// Wraps `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        DirPlusBuffer { buf, len: 0 }
    }

    /// True when an entry named `name` still fits. Check this *before* taking a lookup
    /// reference for the entry.
    pub fn fits(&self, name: &[u8]) -> bool {
        crate::reply::direntplus_size(name.len()) <= self.buf.len() - self.len
    }

    /// Adds one entry with its attributes. A non-zero `entry.nodeid` hands one lookup
    /// reference to the kernel (see the module docs); use `Entry::negative(Duration::ZERO)`-like
    /// zero node ids for `.` and `..`. Returns false, adding nothing, when the buffer is full.
    pub fn add(&mut self, entry: &Entry, offset: u64, kind: DirentType, name: &[u8]) -> bool {
        match crate::reply::encode_direntplus(&mut self.buf[self.len..], entry, offset, kind, name) {
            Some(n) => {
                self.len += n;
                true
            }
            None => false,
        }
    }

    /// Bytes used so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Capabilities of the connection, negotiated at INIT. The file system may switch off what the
/// transport offered before the reply goes to the kernel, and switch on the opt-ins. New fields
/// may be added (`#[non_exhaustive]`); outside tests only the transport creates it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnInfo {
    /// Kernel protocol minor version.
    pub proto_minor: u32,
    /// FUSE_PASSTHROUGH will be enabled (kernel supports it and it was asked for).
    pub passthrough: bool,
    /// READDIRPLUS is enabled.
    pub readdirplus: bool,
    /// FUSE_WRITEBACK_CACHE is enabled (excludes passthrough).
    pub writeback_cache: bool,
    /// FUSE_HANDLE_KILLPRIV_V2 is enabled: the server clears set-uid/set-gid bits.
    pub handle_killpriv_v2: bool,
    /// FUSE_POSIX_ACL with FUSE_DONT_MASK: the kernel enforces POSIX ACLs (read through
    /// GETXATTR `system.posix_acl_access`/`_default` and cached) and sends creation modes
    /// *without* the caller's umask. Opt-in, offered when the kernel checks permissions: a file
    /// system that sets it must apply `umask` itself unless the parent directory has a default
    /// ACL (which replaces the umask, as on a local file system).
    pub posix_acl: bool,
    /// FUSE_EXPORT_SUPPORT: the kernel encodes file handles (`name_to_handle_at`, NFS export) as
    /// (node id, generation) and, for a handle whose inode it no longer caches, asks
    /// [`FileSystem::lookup_node`]; it reconnects directories with [`FileSystem::lookup_parent`].
    /// Opt-in: a file system that sets it must keep node ids resolvable after their last
    /// `forget` (or answer `ESTALE`) and never hand out one (node id, generation) pair for two
    /// different files. Off: `name_to_handle_at` fails with `EOPNOTSUPP`.
    pub export_support: bool,
    /// FUSE_POSIX_LOCKS: `fcntl` record locks (F_GETLK, F_SETLK, F_SETLKW, OFD locks) go to
    /// [`FileSystem::getlk`] and [`FileSystem::setlk`]. Opt-in: off, the kernel keeps POSIX locks
    /// itself, local to this mount (correct for every user of one mount, which is what a file
    /// system without shared state needs). A file system that sets it must also implement
    /// [`FileSystem::flush`] (not ENOSYS) and drop there every POSIX lock its `lock_owner`
    /// holds on the node: a close releases a process's locks, and the kernel sends no unlock of
    /// its own for locks it does not keep.
    pub posix_locks: bool,
    /// FUSE_FLOCK_LOCKS: `flock(2)` locks go to [`FileSystem::setlk`] with [`Lock::flock`] set
    /// (whole-file, owned by the open file); the last close of the open file unlocks them with a
    /// `setlk` of [`LockKind::Unlock`]. Opt-in, only together with `posix_locks`; off, the
    /// kernel keeps flock locks itself.
    pub flock_locks: bool,
    /// The kernel checks permissions itself (`default_permissions` mount option).
    pub default_permissions: bool,
    /// The kernel supports zero-message opendir (it offered FUSE_NO_OPENDIR_SUPPORT; nothing
    /// is replied): once [`FileSystem::opendir`] answers `ENOSYS`, it sends no more OPENDIR or
    /// RELEASEDIR, keeps every directory's listing cached across opens (as if each open had
    /// answered `cache_dir` and `keep_cache`), and every later request on an open directory
    /// (READDIR, READDIRPLUS, FSYNCDIR, file-attribute ioctls) carries fh 0. Only for a file
    /// system that checks no permission at OPENDIR (the kernel checks them with
    /// `default_permissions`).
    pub no_opendir_support: bool,
    /// Maximum write size the kernel will send.
    pub max_write: u32,
    /// Maximum read size the kernel will ask for.
    pub max_read: u32,
}

/// What a file system may ask of the kernel side of its connection, from any thread.
///
/// The transport implements it; the file system never touches `/dev/fuse` itself.
pub trait KernelChannel: Send + Sync {
    /// Registers `fd` (an open regular file) as a passthrough backing file and returns its
    /// backing id for [`OpenOptions::backing_id`]. Fails when passthrough was not negotiated.
    fn backing_open(&self, fd: std::os::fd::RawFd) -> Result<i32>;

    /// Unregisters a backing id once no open file uses it.
    fn backing_close(&self, backing_id: i32) -> Result<()>;

    /// Queues FUSE_NOTIFY_INVAL_ENTRY: the kernel forgets `name` in `parent` (a later access
    /// looks it up again). Never blocks; sent by a dedicated thread.
    fn inval_entry(&self, parent: NodeId, name: &[u8]);

    /// Queues FUSE_NOTIFY_INVAL_INODE: the kernel drops cached attributes of `node` and its
    /// cached data in `offset..offset+len` (`len` 0 = to the end, `offset` -1 = attributes only).
    fn inval_inode(&self, node: NodeId, offset: i64, len: i64);

    /// Queues FUSE_NOTIFY_DELETE: `name` in `parent`, which was `child`, is gone.
    fn delete(&self, parent: NodeId, child: NodeId, name: &[u8]);
}

/// A user-space file system served by ringfs.
///
/// See the module docs for the protocol contract (lookup counts, handles, errors).
#[allow(unused_variables)]
pub trait FileSystem: Send + Sync + 'static {
    /// Called once at INIT, before any other request. May clear capabilities in `conn`; a file
    /// system that does not implement `readdirplus` must clear `conn.readdirplus`.
    fn init(&self, conn: &mut ConnInfo) -> Result<()> {
        Ok(())
    }

    /// Hands the file system its kernel channel (passthrough backing files, invalidations).
    /// Called once, before [`FileSystem::init`].
    fn attach_kernel(&self, kernel: std::sync::Arc<dyn KernelChannel>) {}

    /// Called when the connection goes away (unmount or DESTROY).
    fn destroy(&self) {}

    /// Looks up `name` in directory `parent`. Takes one lookup reference on success.
    async fn lookup(&self, ctx: &Context, parent: NodeId, name: &CStr) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }

    /// Looks up `node` itself, by id (a lookup of "." in it): the kernel decodes a file handle
    /// whose inode it no longer caches (only with [`ConnInfo::export_support`]). `node` may be
    /// any file type and may have been forgotten. The returned entry must carry `node` and the
    /// generation given out with it before; takes one lookup reference. `ESTALE` if the file is
    /// gone or no longer known.
    async fn lookup_node(&self, ctx: &Context, node: NodeId) -> Result<Entry> {
        Err(Errno::ESTALE)
    }

    /// Looks up the parent of directory `dir` (a lookup of ".."), to reconnect a directory
    /// decoded from a file handle (only with [`ConnInfo::export_support`]). Takes one lookup
    /// reference. Never called for the root.
    async fn lookup_parent(&self, ctx: &Context, dir: NodeId) -> Result<Entry> {
        Err(Errno::ENOENT)
    }

    /// Drops `nlookup` references of `node`.
    fn forget(&self, node: NodeId, nlookup: u64) {}

    /// Gets attributes; `fh` is set when the call comes through an open file.
    async fn getattr(&self, ctx: &Context, node: NodeId, fh: Option<FileHandle>) -> Result<AttrOut> {
        Err(Errno::ENOSYS)
    }

    /// Gets extended attributes (statx); `mask` is the STATX_* mask asked for.
    async fn statx(
        &self,
        ctx: &Context,
        node: NodeId,
        fh: Option<FileHandle>,
        flags: u32,
        mask: u32,
    ) -> Result<(StatxAttr, std::time::Duration)> {
        Err(Errno::ENOSYS)
    }

    /// Changes attributes.
    async fn setattr(&self, ctx: &Context, node: NodeId, attr: &SetAttr) -> Result<AttrOut> {
        Err(Errno::ENOSYS)
    }

    /// Reads a symlink's target.
    async fn readlink(&self, ctx: &Context, node: NodeId) -> Result<Vec<u8>> {
        Err(Errno::ENOSYS)
    }

    /// Creates a symlink `name` in `parent` pointing to `target`.
    async fn symlink(&self, ctx: &Context, parent: NodeId, name: &CStr, target: &CStr) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }

    /// Creates a node (regular file, fifo, socket, device). `mode` already has the umask applied
    /// by the kernel (`umask` is given for information) unless [`ConnInfo::posix_acl`] is on.
    async fn mknod(
        &self,
        ctx: &Context,
        parent: NodeId,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }

    /// Creates a directory. `mode` already has the umask applied (see [`FileSystem::mknod`]).
    async fn mkdir(&self, ctx: &Context, parent: NodeId, name: &CStr, mode: u32, umask: u32) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }

    /// Removes a non-directory.
    async fn unlink(&self, ctx: &Context, parent: NodeId, name: &CStr) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Removes an empty directory.
    async fn rmdir(&self, ctx: &Context, parent: NodeId, name: &CStr) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Renames; `flags` are RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT.
    async fn rename(
        &self,
        ctx: &Context,
        parent: NodeId,
        name: &CStr,
        new_parent: NodeId,
        new_name: &CStr,
        flags: u32,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Creates a hard link to `node` named `new_name` in `new_parent`.
    async fn link(&self, ctx: &Context, node: NodeId, new_parent: NodeId, new_name: &CStr) -> Result<Entry> {
        Err(Errno::ENOSYS)
    }

    /// Opens a file; `flags` are the open(2) flags.
    async fn open(&self, ctx: &Context, node: NodeId, flags: u32) -> Result<Opened> {
        Err(Errno::ENOSYS)
    }

    /// Creates and opens a file (O_CREAT). `mode` already has the umask applied (see
    /// [`FileSystem::mknod`]).
    async fn create(
        &self,
        ctx: &Context,
        parent: NodeId,
        name: &CStr,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> Result<(Entry, Opened)> {
        Err(Errno::ENOSYS)
    }

    /// Creates and opens an unnamed file in `parent` (O_TMPFILE).
    async fn tmpfile(
        &self,
        ctx: &Context,
        parent: NodeId,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> Result<(Entry, Opened)> {
        Err(Errno::ENOSYS)
    }

    /// Reads up to `buf.len()` bytes at `offset` into `buf`; returns the count (short at EOF).
    async fn read(&self, ctx: &Context, node: NodeId, fh: FileHandle, offset: u64, buf: &mut [u8]) -> Result<usize> {
        Err(Errno::ENOSYS)
    }

    /// Writes `data` at `offset`; returns the count written.
    async fn write(
        &self,
        ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        flags: WriteFlags,
    ) -> Result<usize> {
        Err(Errno::ENOSYS)
    }

    /// Called on every close(2) of a file descriptor of this open file. `lock_owner` is the
    /// closing process's lock owner: with [`ConnInfo::posix_locks`], drop its POSIX locks on
    /// the node here.
    async fn flush(&self, ctx: &Context, node: NodeId, fh: FileHandle, lock_owner: u64) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// The last reference to the open file is gone. Called exactly once per open.
    async fn release(&self, ctx: &Context, node: NodeId, fh: FileHandle, flags: u32) -> Result<()> {
        Ok(())
    }

    /// Syncs file data (and metadata unless `datasync`).
    async fn fsync(&self, ctx: &Context, node: NodeId, fh: FileHandle, datasync: bool) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Opens a directory.
    async fn opendir(&self, ctx: &Context, node: NodeId, flags: u32) -> Result<Opened> {
        Err(Errno::ENOSYS)
    }

    /// Lists a directory from cookie `offset` (0 = start) into `out`.
    async fn readdir(
        &self,
        ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        out: &mut DirBuffer<'_>,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Lists a directory with attributes (each non-dot entry takes a lookup reference).
    async fn readdirplus(
        &self,
        ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        out: &mut DirPlusBuffer<'_>,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Releases an open directory. Called exactly once per opendir.
    async fn releasedir(&self, ctx: &Context, node: NodeId, fh: FileHandle) -> Result<()> {
        Ok(())
    }

    /// Syncs a directory.
    async fn fsyncdir(&self, ctx: &Context, node: NodeId, fh: FileHandle, datasync: bool) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// File-system statistics.
    async fn statfs(&self, ctx: &Context, node: NodeId) -> Result<StatFs> {
        Err(Errno::ENOSYS)
    }

    /// Sets an extended attribute; `flags` are XATTR_CREATE / XATTR_REPLACE.
    async fn setxattr(&self, ctx: &Context, node: NodeId, name: &CStr, value: &[u8], flags: u32) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Gets an extended attribute. `size` 0 is a size probe.
    async fn getxattr(&self, ctx: &Context, node: NodeId, name: &CStr, size: u32) -> Result<XattrReply> {
        Err(Errno::ENOSYS)
    }

    /// Lists extended attribute names (NUL-separated). `size` 0 is a size probe.
    async fn listxattr(&self, ctx: &Context, node: NodeId, size: u32) -> Result<XattrReply> {
        Err(Errno::ENOSYS)
    }

    /// Removes an extended attribute.
    async fn removexattr(&self, ctx: &Context, node: NodeId, name: &CStr) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Checks access (only sent without `default_permissions`). `mask` is R_OK|W_OK|X_OK or F_OK.
    async fn access(&self, ctx: &Context, node: NodeId, mask: u32) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Allocates or punches space; `mode` as fallocate(2).
    async fn fallocate(
        &self,
        ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: u32,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Inode flags (`FS_IOC_GETFLAGS`, what `lsattr` shows) of `node`, open as `fh` (a file or,
    /// with `dir`, a directory handle the kernel opened for this call; reading the flags needs
    /// no other permission).
    async fn get_inode_flags(&self, ctx: &Context, node: NodeId, fh: FileHandle, dir: bool) -> Result<u32> {
        Err(Errno::ENOTTY)
    }

    /// Sets inode flags (`FS_IOC_SETFLAGS`, `chattr`). The kernel has already checked that the
    /// caller owns the file (or has CAP_FOWNER) and has CAP_LINUX_IMMUTABLE if the immutable or
    /// append-only flag changes; checks of flags the backing file system guards with other
    /// capabilities are the file system's.
    async fn set_inode_flags(&self, ctx: &Context, node: NodeId, fh: FileHandle, dir: bool, flags: u32) -> Result<()> {
        Err(Errno::ENOTTY)
    }

    /// Extended inode attributes (`FS_IOC_FSGETXATTR`: xflags, extent size hint, project id).
    async fn get_fsxattr(&self, ctx: &Context, node: NodeId, fh: FileHandle, dir: bool) -> Result<FsXattr> {
        Err(Errno::ENOTTY)
    }

    /// Sets extended inode attributes (`FS_IOC_FSSETXATTR`); the kernel's checks as for
    /// [`FileSystem::set_inode_flags`].
    async fn set_fsxattr(&self, ctx: &Context, node: NodeId, fh: FileHandle, dir: bool, attr: &FsXattr) -> Result<()> {
        Err(Errno::ENOTTY)
    }

    /// Seeks for data or holes (SEEK_DATA/SEEK_HOLE); returns the new offset.
    async fn lseek(&self, ctx: &Context, node: NodeId, fh: FileHandle, offset: u64, whence: u32) -> Result<u64> {
        Err(Errno::ENOSYS)
    }

    /// Copies a range between two open files; returns the bytes copied.
    #[allow(clippy::too_many_arguments)]
    async fn copy_file_range(
        &self,
        ctx: &Context,
        node_in: NodeId,
        fh_in: FileHandle,
        offset_in: u64,
        node_out: NodeId,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> Result<u64> {
        Err(Errno::ENOSYS)
    }

    /// `fcntl(F_GETLK)` (and `F_OFD_GETLK`): the first lock held by an owner other than
    /// `owner` that conflicts with `lock`, or [`Lock::unlocked`] if none. Only called when the
    /// file system opted in with [`ConnInfo::posix_locks`].
    async fn getlk(&self, ctx: &Context, node: NodeId, fh: FileHandle, owner: LockOwner, lock: &Lock) -> Result<Lock> {
        Err(Errno::ENOSYS)
    }

    /// `fcntl(F_SETLK/F_SETLKW)`, `flock(2)` (with [`Lock::flock`]) and the unlocks the kernel
    /// sends when a process closes a file or an open file's last reference goes: takes, changes
    /// or ([`LockKind::Unlock`]) drops `owner`'s lock on the range, splitting its existing
    /// ranges as POSIX requires. A conflict answers `EAGAIN` when `wait` is false; with `wait`
    /// (SETLKW), wait for the lock without blocking the queue thread (await something), and
    /// answer `EINTR` when that wait is interrupted (an awaited `ringfs_transport::io::sleep`
    /// then returns `ECANCELED`). Only called after opting in with [`ConnInfo::posix_locks`].
    async fn setlk(
        &self,
        ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        owner: LockOwner,
        lock: &Lock,
        wait: bool,
    ) -> Result<()> {
        Err(Errno::ENOSYS)
    }

    /// Any other ioctl on an open file (the file-attribute ioctls have their own methods
    /// above): the bytes to copy back to the caller (at most `req.out_size`). The default,
    /// `ENOTTY`, is what a file system without the ioctl answers.
    async fn ioctl(&self, ctx: &Context, node: NodeId, req: &Ioctl<'_>) -> Result<Vec<u8>> {
        Err(Errno::ENOTTY)
    }
}
