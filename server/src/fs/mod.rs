//! The passthrough (stacking) file system: serves a backing directory through FUSE.
//!
//! # Design
//! - **Inodes** ([`inode`]): backing (st_dev, st_ino) → node id (counter from 2, never reused
//!   for another inode; `generation` is a keyed hash of the id), with lookup counts and a
//!   `name_to_handle_at` file handle, computed lazily (at eviction, retirement, first open,
//!   export). Forgotten inodes stay resolvable by node id for file
//!   handles (`lookup_node`, `lookup_parent`; [`handle_state`] carries them to the next server).
//!   O_PATH descriptors live in a bounded cache (`max_cached_fds`, CLOCK eviction) and are reopened with
//!   `open_by_handle_at` on a miss; inodes without a usable handle (O_TMPFILE, no handle
//!   support, other file systems under the root) and inodes with open handles stay pinned.
//! - **Names** are resolved one component at a time relative to the parent's descriptor with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS, O_NOFOLLOW)`;
//!   `.`, `..`, empty names and names with `/` are refused (the export lookups of "." and ".."
//!   come as `lookup_node`/`lookup_parent`). Backing symlinks are never followed.
//! - **Reopening** an inode (open, opendir, truncate, chmod fallback, xattrs, link) goes through
//!   `/proc/self/fd/N`, which reaches exactly the inode the O_PATH descriptor refers to.
//! - **Credentials** ([`creds`]): creations run under the caller's fsuid/fsgid (per thread);
//!   without `default_permissions` every permission-checked operation does. On EACCES/EPERM
//!   the caller's supplementary groups are loaded from `/proc/<pid>/status` and the call is
//!   retried once.

mod creds;
pub mod handle_state;
mod handles;
mod inode;
mod inotify;
pub(crate) mod journal;
pub mod live_state;
pub mod passthrough;
mod sys;
#[cfg(test)]
mod tests;
pub mod watch;

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustix::fs::{AtFlags, Mode, SeekFrom};

use ringfs_protocol::{
    AttrOut, ConnInfo, Context, DirBuffer, DirPlusBuffer, Entry, Errno, FileAttr, FileHandle, FileSystem, FsXattr,
    NodeId, OpenOptions, Opened, Result, SetAttr, SetTime, StatFs, StatxAttr, WriteFlags, XattrReply,
};

use creds::CredGuard;
use handles::HandleTable;
use inode::{InodeFd, InodeTable};
use sys::cvt;

/// Hasher for the server's tables, whose keys are integers it chose or the backing file
/// system gave (node ids, handle numbers, (st_dev, st_ino), file handles): a multiply-rotate
/// hash (as rustc's FxHash), far cheaper than SipHash on the request path.
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        // The product's low bits depend only on the key's low bits, and maps index buckets by
        // the low bits: bring the well-mixed high bits down (keys of one shard share their
        // low bits).
        self.0.rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        }
        let mut tail = [0u8; 8];
        let r = chunks.remainder();
        tail[..r.len()].copy_from_slice(r);
        self.write_u64(u64::from_ne_bytes(tail) ^ (r.len() as u64) << 56);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

/// True for the extended attributes that carry an LSM's security label (SELinux, Smack,
/// AppArmor): the names hidden by [`FsConfig::lsm_labels`] = false.
fn is_lsm_label(name: &[u8]) -> bool {
    name == b"security.selinux" || name == b"security.apparmor" || name.starts_with(b"security.SMACK64")
}

/// [`FastHasher`] as a map's hasher.
pub(crate) type IdHash = std::hash::BuildHasherDefault<FastHasher>;

/// Configuration of a [`PassthroughFs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The backing directory to serve.
    pub source: PathBuf,
    /// How long the kernel may cache name → node bindings.
    pub entry_timeout: Duration,
    /// How long the kernel may cache attributes.
    pub attr_timeout: Duration,
    /// How long the kernel may cache "no such name" (0 = answer ENOENT, no negative entry).
    pub negative_timeout: Duration,
    /// The kernel checks permissions itself (`default_permissions`). When false, every
    /// operation runs under the caller's credentials so the backing file system checks them.
    /// `init` replaces this with the negotiated [`ConnInfo::default_permissions`].
    pub default_permissions: bool,
    /// Maximum number of cached (evictable) O_PATH descriptors.
    pub max_cached_fds: usize,
    /// Let the kernel do reads and writes of regular files on the backing file itself
    /// (FUSE passthrough), when the kernel negotiated it.
    pub passthrough: bool,
    /// Files never passed through: glob patterns (see `offload.passthrough_exclude`).
    pub passthrough_exclude: Vec<String>,
    /// Keep a file's page cache across opens (FOPEN_KEEP_CACHE) for opens the server serves.
    /// Safe only while changes made behind the mount's back are invalidated (the watch).
    pub keep_cache: bool,
    /// Let the kernel enforce POSIX ACLs (FUSE_POSIX_ACL) when it checks permissions and the
    /// backing file system supports ACLs; without it, the kernel checks mode bits only and
    /// ACL entries that grant or deny access are ignored through the mount.
    pub posix_acl: bool,
    /// Show and store the backing files' LSM security labels (`security.selinux`,
    /// `security.SMACK64*`, `security.apparmor`). When false the mount has no labels: reading,
    /// writing or removing one answers EOPNOTSUPP (as a file system without label support,
    /// which label readers such as `ls -l` remember for the whole device instead of asking
    /// per file) and listings omit them; the backing files keep theirs.
    /// `security.capability` and the other `security.*` names are not affected.
    pub lsm_labels: bool,
    /// Open directories without OPENDIR/RELEASEDIR round trips (zero-message opendir) when the
    /// kernel supports it and checks permissions itself (`default_permissions`): the kernel then
    /// keeps every directory's cached listing across opens, so this needs the watch (as
    /// `keep_cache`). Listing chunks arrive with fh 0 and read through parked streams.
    pub zero_message_opendir: bool,
    /// The mount's `noatime`: the backing directory is reached through a private bind mount
    /// with MOUNT_ATTR_NOATIME, so no access (passthrough reads included: the kernel opens its
    /// backing files on the server's mount) updates access times; backing files and
    /// directories are also opened with O_NOATIME (which covers the server's own reads should
    /// the private mount be refused).
    pub noatime: bool,
    /// The mount's `strictatime`: the private mount of the backing directory updates access
    /// times on every access (`noatime` wins).
    pub strictatime: bool,
    /// The mount's `nodiratime`, applied the same way.
    pub nodiratime: bool,
    /// File handles (`name_to_handle_at`, NFS export): how many inodes stay resolvable by
    /// node id after the kernel forgot them (0: no export support, handles are EOPNOTSUPP).
    /// Needs file handles on the backing file system.
    pub export_handles: usize,
    /// Where the node ids of this mount are kept between servers (see [`handle_state`]), so
    /// file handles survive an unmount and mount; `None`: handles end with the server.
    pub handle_state: Option<PathBuf>,
    /// Try private mounts (`open_tree`/`mount_setattr`, which need CAP_SYS_ADMIN): the
    /// access-time bind mount of the backing directory and the mount for passthrough writes.
    /// False for a server without the privilege: no attempt, no warning.
    pub private_mounts: bool,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            source: PathBuf::new(),
            entry_timeout: Duration::from_secs(1),
            attr_timeout: Duration::from_secs(1),
            negative_timeout: Duration::from_secs(1),
            default_permissions: true,
            max_cached_fds: 4096,
            passthrough: true,
            passthrough_exclude: Vec::new(),
            keep_cache: false,
            posix_acl: true,
            lsm_labels: true,
            zero_message_opendir: false,
            export_handles: 65536,
            private_mounts: true,
            handle_state: None,
            noatime: false,
            strictatime: false,
            nodiratime: false,
        }
    }
}

/// A FUSE file system that passes every operation through to a backing directory.
pub struct PassthroughFs {
    cfg: FsConfig,
    /// What paths of backing descriptors (read from /proc/self/fd) start with: the source,
    /// or "/" when the backing directory is reached through a private mount.
    path_prefix: PathBuf,
    inodes: std::sync::Arc<InodeTable>,
    handles: HandleTable,
    /// `/proc/self/fd`, for reopening inodes by their O_PATH descriptor.
    proc_fd: OwnedFd,
    default_permissions: AtomicBool,
    /// The backing root answers `system.posix_acl_access` (the backing file system has ACLs).
    acl_supported: bool,
    /// FUSE_POSIX_ACL is in effect: creation modes arrive without the umask (see `init`).
    posix_acl: AtomicBool,
    /// fchmodat2(AT_EMPTY_PATH) is unavailable: use `/proc/self/fd/N`.
    no_fchmodat2: AtomicBool,
    /// The kernel caches writes (FUSE_WRITEBACK_CACHE): it reads partial pages back and sends
    /// page writes at explicit offsets, so backing files open read-write and without O_APPEND.
    writeback: AtomicBool,
    /// Passthrough decisions and backing ids.
    passthrough: passthrough::Passthrough,
    /// Closing a backing file does nothing worth a FLUSH round trip (local file systems); on
    /// network file systems close-to-open semantics need it.
    noflush: bool,
    /// FAN_MODIFY ignore marks for files open for writing through passthrough (with the watch).
    write_ignores: std::sync::OnceLock<watch::WriteIgnores>,
    /// FUSE_EXPORT_SUPPORT was negotiated: file handles were given out.
    exported: AtomicBool,
    /// The device number (`st_dev`) of the FUSE mount this file system serves, once mounted
    /// (0 before): a backing path that leads into it is refused (see [`Self::crossing`]).
    mount_dev: AtomicU64,
    /// The root (opened O_RDONLY) and device of the mount on which passthrough backing files
    /// are registered, which the watch ignores for FAN_MODIFY (see [`writes_mount`]).
    writes_mount: Option<(OwnedFd, u64)>,
    /// Zero-message opendir is in effect (see [`FsConfig::zero_message_opendir`]).
    no_opendir: AtomicBool,
    /// Directory streams between the chunks of listings made without a handle (fh 0).
    parked: handles::ParkedStreams,
    /// The crash-failover journal (failover on): every open and release is written to it.
    journal: std::sync::OnceLock<std::sync::Arc<journal::Journal>>,
}

/// File systems whose close(2) does work that may fail (so FLUSH must reach the server).
fn close_matters(f_type: i64) -> bool {
    const NFS: i64 = 0x6969;
    const SMB2: i64 = 0xFE53_4D42;
    const CIFS: i64 = 0xFF53_4D42;
    const FUSE: i64 = 0x6573_5546;
    const CEPH: i64 = 0x00C3_6400;
    const AFS: i64 = 0x6B41_4653;
    matches!(f_type, NFS | SMB2 | CIFS | FUSE | CEPH | AFS)
}

/// Open flags passed through to the backing file system on open/create.
///
/// O_DIRECT is not among them: the kernel already bypasses the mount's page cache for an
/// O_DIRECT open, and the server's request buffers are not aligned the way O_DIRECT on the
/// backing file would demand (with passthrough the kernel applies the caller's O_DIRECT to the
/// backing file itself).
const OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_NOATIME
    | libc::O_LARGEFILE;

/// `f_type` of the file system holding `path` (0 when unknown).
fn backing_fs_type(path: &std::path::Path) -> i64 {
    rustix::fs::statfs(path).map_or(0, |s| s.f_type)
}

/// Opens the backing root: directly, or, when the mount asks for an access-time mode of its own
/// (`noatime`, `strictatime`, `nodiratime`), as the root of a private, detached bind mount of
/// the backing directory (and every mount below it) with that mode. The kernel opens the
/// backing files of passthrough opens on the server's mount, so the mode then holds for the
/// reads it does itself too. A refused private mount (no CAP_SYS_ADMIN, old kernel) falls back
/// to the backing mount's own mode, with a warning. Returns the root and whether it is private.
fn open_root(cfg: &FsConfig, path: &CStr) -> Result<(OwnedFd, bool)> {
    let plain = || sys::openat(rustix::fs::CWD, path, libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC, 0);
    if !(cfg.noatime || cfg.strictatime || cfg.nodiratime) || !cfg.private_mounts {
        return Ok((plain()?, false));
    }
    // The root must be a directory (and exist) whichever way it is opened.
    drop(plain()?);
    let (mut set, mut clear) = (0u64, 0u64);
    if cfg.noatime || cfg.strictatime {
        clear |= sys::MOUNT_ATTR__ATIME;
        set |= if cfg.noatime { sys::MOUNT_ATTR_NOATIME } else { sys::MOUNT_ATTR_STRICTATIME };
    }
    if cfg.nodiratime {
        set |= sys::MOUNT_ATTR_NODIRATIME;
    }
    match sys::private_mount(path, set, clear, true) {
        Ok(fd) => Ok((fd, true)),
        Err(e) => {
            log::warn!(
                "cannot make a private mount of the backing directory ({}): access times follow its own mount",
                io::Error::from_raw_os_error(e.0)
            );
            Ok((plain()?, false))
        }
    }
}

/// The mount the kernel's passthrough backing files are opened on, whose FAN_MODIFY events the
/// watch ignores (see `watch::Watch::ignore_own_mount`): the private root when there is one;
/// else a private, detached, non-recursive clone of the backing directory's own mount, used for
/// nothing but registering backing files (lookups and the server's own opens stay on the backing
/// mount, so mounts made below the backing directory later stay visible, and none is pinned).
/// Returns the mount's root, opened O_RDONLY (as `open_by_handle_at` wants it), and its device;
/// None where no clone can be made (no CAP_SYS_ADMIN, old kernel).
fn writes_mount(path: &CStr, root: &OwnedFd, private_root: bool) -> Option<(OwnedFd, u64)> {
    let reopen = |fd: BorrowedFd<'_>| sys::openat(fd, c".", libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC, 0);
    let fd = if private_root {
        reopen(root.as_fd())
    } else {
        sys::private_mount(path, 0, 0, false).and_then(|m| reopen(m.as_fd()))
    };
    match fd {
        Ok(fd) => {
            let dev = sys::fstat(fd.as_raw_fd()).ok()?.st_dev;
            Some((fd, dev))
        }
        Err(e) => {
            log::info!(
                "no private mount for passthrough writes ({}): per-file FAN_MODIFY ignore marks instead",
                io::Error::from_raw_os_error(e.0)
            );
            None
        }
    }
}

fn io_err(e: Errno, what: &str) -> io::Error {
    let os = io::Error::from_raw_os_error(e.0);
    io::Error::new(os.kind(), format!("{what}: {os}"))
}

/// Checks a name to create/remove/rename: one non-empty path component, not `.`/`..`.
fn check_name(name: &CStr) -> Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// True when directory `dir` lies below the directory with backing key `root` (walking up
/// "..": bounded, so a deep or changing tree answers false rather than loop).
fn beneath(dir: &OwnedFd, root: (u64, u64)) -> Result<bool> {
    let mut cur = sys::openat(dir.as_fd(), c"..", libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC, 0)?;
    let mut key = {
        let st = sys::fstat(dir.as_raw_fd())?;
        (st.st_dev, st.st_ino)
    };
    for _ in 0..4096 {
        let st = sys::fstat(cur.as_raw_fd())?;
        let up = (st.st_dev, st.st_ino);
        if up == root {
            return Ok(true);
        }
        if up == key {
            return Ok(false); // the top of the file-system tree
        }
        key = up;
        cur = sys::openat(cur.as_fd(), c"..", libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC, 0)?;
    }
    Ok(false)
}

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

/// The set-id bits that a change (write, truncate, fallocate, chown, ...) by `ctx` clears on a
/// file of mode `mode` and group `gid`, as the kernel decides natively: set-uid always, set-gid
/// when group execution makes it one or when the caller is neither in the file's group nor
/// privileged (the kernel's `setattr_should_drop_sgid`; uid 0 stands for CAP_FSETID). Callers
/// ask only where the kernel would clear bits at all: a chown clears set-uid even for root,
/// writes and truncates by root clear nothing.
fn suidgid_to_kill(ctx: &Context, mode: u32, gid: u32) -> u32 {
    let mut kill = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || (ctx.uid != 0 && !caller_in_group(ctx, gid))) {
        kill |= libc::S_ISGID;
    }
    kill
}

/// Whether `gid` is the caller's group or one of its supplementary groups.
fn caller_in_group(ctx: &Context, gid: u32) -> bool {
    ctx.gid == gid || creds::caller_groups(ctx.pid).is_ok_and(|g| g.contains(&gid))
}

fn timespec_of(t: Option<SetTime>) -> rustix::fs::Timespec {
    match t {
        None => rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        Some(SetTime::Now) => rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        Some(SetTime::At(t)) => rustix::fs::Timespec { tv_sec: t.sec, tv_nsec: t.nsec as _ },
    }
}

impl PassthroughFs {
    /// Opens the backing root `cfg.source` (which must be an existing directory).
    ///
    /// Also sets the process umask to 0 (the kernel already applied the caller's umask) and
    /// drops the process's supplementary groups (callers' groups are set per operation).
    pub fn new(cfg: FsConfig) -> io::Result<PassthroughFs> {
        let noflush = !close_matters(backing_fs_type(&cfg.source));
        rustix::process::umask(rustix::fs::Mode::empty());
        // Process-wide (glibc broadcasts to all threads): no stray groups of the server may
        // grant access to callers. Failure (not root) is harmless.
        // SAFETY: an empty group list.
        unsafe { libc::setgroups(0, std::ptr::null()) };
        if cfg.source.as_os_str().is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no backing directory (source) given"));
        }
        let what = format!("backing directory {}", cfg.source.display());
        let path = CString::new(cfg.source.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, what.clone()))?;
        let (root, private_mount) = open_root(&cfg, &path).map_err(|e| io_err(e, &what))?;
        let writes_mount = if cfg.private_mounts { writes_mount(&path, &root, private_mount) } else { None };
        let proc_fd =
            sys::openat(rustix::fs::CWD, c"/proc/self/fd", libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC, 0)
                .map_err(|e| io_err(e, "/proc/self/fd"))?;
        let acl_supported = !matches!(
            sys::xattr::get(&sys::proc_path(root.as_raw_fd()), c"system.posix_acl_access", &mut []),
            Err(e) if e == Errno::EOPNOTSUPP || e == Errno(libc::ENOTSUP)
        );
        let inodes = std::sync::Arc::new(
            InodeTable::new(root, cfg.max_cached_fds, cfg.export_handles).map_err(|e| io_err(e, &what))?,
        );
        if let Some(path) = cfg.handle_state.as_deref().filter(|_| cfg.export_handles > 0 && inodes.reopens_by_handle())
        {
            match handle_state::take(path) {
                Ok(Some(state)) => match inodes.import(&state) {
                    Ok(()) => log::info!("file handles of the previous server: {} inodes", state.nodes.len()),
                    Err(_) => log::warn!("{}: for another backing directory; ignored", path.display()),
                },
                Ok(None) => {}
                Err(e) => log::warn!("{}: {e}; file handles of the previous server are stale", path.display()),
            }
        }
        // Paths read back from /proc/self/fd start at the private mount's root, "/".
        let path_prefix = if private_mount { PathBuf::from("/") } else { cfg.source.clone() };
        Ok(PassthroughFs {
            path_prefix,
            default_permissions: AtomicBool::new(cfg.default_permissions),
            acl_supported,
            posix_acl: AtomicBool::new(false),
            cfg,
            inodes,
            handles: HandleTable::new(),
            no_opendir: AtomicBool::new(false),
            parked: handles::ParkedStreams::new(),
            journal: std::sync::OnceLock::new(),
            proc_fd,
            no_fchmodat2: AtomicBool::new(false),
            writeback: AtomicBool::new(false),
            passthrough: Default::default(),
            noflush,
            write_ignores: std::sync::OnceLock::new(),
            exported: AtomicBool::new(false),
            mount_dev: AtomicU64::new(0),
            writes_mount,
        })
    }

    /// Tells the file system the device number of the mount it serves (`st_dev` of the mount
    /// point once mounted), before it serves any request. From then on, a backing name that is
    /// a mount point of this very mount (a bind mount of the mount into the backing tree, the
    /// mount point below the backing directory reached by mount propagation) answers `ELOOP`
    /// instead of sending the server a request it would wait on itself.
    pub fn set_mount_dev(&self, dev: u64) {
        self.mount_dev.store(dev, Ordering::Relaxed);
    }

    /// Resolves `name`, a mount point in directory `dir` (a resolution with `RESOLVE_NO_XDEV`
    /// answered `EXDEV`), to an O_PATH descriptor of what is mounted there, unless that is this
    /// server's own mount: then `ELOOP`. Serving a request by a system call on its own mount
    /// would make a queue thread wait for itself (in io_uring mode the kernel routes the
    /// request to the queue of the caller's CPU, the blocked thread's own), an unkillable hang.
    /// Opening an O_PATH descriptor and reading its device number without attributes sends no
    /// FUSE request, so the check itself cannot hang.
    fn crossing(&self, dir: RawFd, name: &CStr) -> Result<OwnedFd> {
        let fd = sys::openat2(dir, name, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0, sys::RESOLVE_CROSSING)?;
        let own = self.mount_dev.load(Ordering::Relaxed);
        if own != 0 && sys::dev_nosync(fd.as_raw_fd())? == own {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if WARNED.swap(true, Ordering::Relaxed) {
                return Err(Errno::ELOOP);
            }
            log::warn!(
                "refused backing name {:?}: it leads into this mount itself (a bind mount of the mount into its \
                 backing directory?); such names answer ELOOP (logged once)",
                name.to_string_lossy()
            );
            return Err(Errno::ELOOP);
        }
        Ok(fd)
    }

    /// O_PATH descriptor of `name` in backing directory `dir`: no symlink followed, no escape,
    /// and a mount point crossed only when it does not lead into this mount.
    fn resolve(&self, dir: RawFd, name: &CStr) -> Result<OwnedFd> {
        match sys::openat2(dir, name, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0, sys::RESOLVE_STRICT) {
            Err(e) if e == Errno::EXDEV => self.crossing(dir, name),
            r => r,
        }
    }

    /// Opens (and perhaps creates) `name` in backing directory `dir` with `oflags`, which
    /// include `O_CREAT`. When `name` is a mount point, nothing is created: what is mounted
    /// there is opened (refused if it is this mount, `EEXIST` with `O_EXCL`, `EISDIR` for a
    /// directory), through the checked descriptor, never by a second walk.
    fn create_at(&self, dir: RawFd, name: &CStr, oflags: i32, mode: u32) -> Result<OwnedFd> {
        match sys::openat2(dir, name, oflags, mode, sys::RESOLVE_STRICT) {
            Err(e) if e == Errno::EXDEV => {
                let fd = self.crossing(dir, name)?;
                if oflags & libc::O_EXCL != 0 {
                    return Err(Errno::EEXIST);
                }
                if sys::fstat(fd.as_raw_fd())?.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    return Err(Errno::EISDIR);
                }
                self.reopen(fd.as_raw_fd(), oflags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW))
            }
            r => r,
        }
    }

    /// The mode to create a node with in directory `dir`: with FUSE_POSIX_ACL the kernel sends
    /// `mode` without the caller's `umask`, which applies unless `dir` has a default ACL (the
    /// backing file system then derives the mode from that ACL, as it would natively; the
    /// server's own umask is 0).
    fn creation_mode(&self, dir: RawFd, mode: u32, umask: u32) -> u32 {
        if !self.posix_acl.load(Ordering::Relaxed) {
            return mode;
        }
        match sys::xattr::get_dir(dir, c"system.posix_acl_default", &mut []) {
            Ok(n) if n > 0 => mode,
            _ => mode & !umask,
        }
    }

    /// Whether inode descriptors can be closed and reopened by file handle (`open_by_handle_at`
    /// works: CAP_DAC_READ_SEARCH). When not, every known inode keeps its descriptor (at most
    /// about RLIMIT_NOFILE inodes) and file handles (export) are off.
    pub fn reopens_by_handle(&self) -> bool {
        self.inodes.reopens_by_handle()
    }

    /// Number of inodes the kernel currently references (the root included).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Number of forgotten inodes kept resolvable by node id for file handles.
    pub fn retired_inode_count(&self) -> usize {
        self.inodes.retired_len()
    }

    /// Number of open file and directory handles.
    pub fn open_handle_count(&self) -> usize {
        self.handles.len()
    }

    fn entry(&self, id: u64, st: &libc::stat) -> Entry {
        Entry::new(
            NodeId(id),
            self.inodes.generation(id),
            FileAttr::from_stat(st),
            self.cfg.entry_timeout,
            self.cfg.attr_timeout,
        )
    }

    fn attr_out(&self, st: &libc::stat) -> AttrOut {
        AttrOut::new(FileAttr::from_stat(st), self.cfg.attr_timeout)
    }

    /// The kernel-side options of an open file whose backing id (0: none) is `backing_id`.
    fn file_options(&self, backing_id: i32) -> OpenOptions {
        let mut o = OpenOptions::default();
        o.backing_id = backing_id;
        o.noflush = self.noflush;
        o.keep_cache = self.cfg.keep_cache && backing_id == 0;
        o
    }

    /// Runs `f` under the caller's credentials when required: always if `force`, otherwise
    /// when the kernel does not check permissions itself. Retries once with the caller's
    /// supplementary groups on EACCES/EPERM.
    fn as_caller<T>(&self, ctx: &Context, force: bool, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        if !force && self.default_permissions.load(Ordering::Relaxed) {
            return f();
        }
        let mut guard = CredGuard::switch(ctx.uid, ctx.gid);
        if !guard.is_switched() {
            return f();
        }
        match f() {
            Err(e) if (e == Errno::EACCES || e == Errno::EPERM) && ctx.uid != 0 => {
                match creds::caller_groups(ctx.pid) {
                    Ok(groups) if !groups.is_empty() => {
                        if guard.set_groups(&groups).is_ok() {
                            f()
                        } else {
                            Err(e)
                        }
                    }
                    _ => Err(e),
                }
            }
            r => r,
        }
    }

    /// Resolves `name` in directory `dir` (no symlink following, no escape) and registers a
    /// lookup reference. The resolution itself runs under `ctx` when permissions are ours to
    /// check.
    fn lookup_at(&self, ctx: &Context, dir: RawFd, name: &CStr) -> Result<(u64, libc::stat)> {
        let fd = self.as_caller(ctx, false, || self.resolve(dir, name))?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let (id, _) = self.inodes.insert_or_ref(fd, &st, true)?;
        Ok((id, st))
    }

    /// The flags to open a backing file with for an open(2) with `flags`.
    fn backing_open_flags(&self, flags: i32) -> i32 {
        if !self.writeback.load(Ordering::Relaxed) {
            return flags;
        }
        let mut f = flags & !libc::O_APPEND;
        if f & libc::O_ACCMODE == libc::O_WRONLY {
            f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
        }
        f
    }

    /// True when the kernel checks permissions (`default_permissions`), so operations may run
    /// with the server's credentials, and so through the queue's ring.
    fn kernel_checks(&self) -> bool {
        self.default_permissions.load(Ordering::Relaxed)
    }

    /// [`lookup_at`](Self::lookup_at) through the queue's io_uring (server credentials).
    async fn lookup_at_ring(&self, dir: RawFd, name: &CStr) -> Result<(u64, libc::stat)> {
        let fd = match ringfs_transport::io::openat2(
            dir,
            name,
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0,
            sys::RESOLVE_STRICT,
        )
        .await
        {
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => self.crossing(dir, name)?,
            r => r?,
        };
        let st = sys::fstat_async(fd.as_fd()).await?;
        let (id, _) = self.inodes.insert_or_ref(fd, &st, true)?;
        Ok((id, st))
    }

    /// The io_uring personality to create files as `ctx`'s caller with, when this queue sends
    /// metadata calls through its ring right now; `None`: create synchronously under the
    /// caller's credentials (inline metadata, off the queues, or no personality available).
    async fn ring_creator(&self, ctx: &Context) -> Option<u16> {
        if !ringfs_transport::io::metadata_on_ring() {
            return None;
        }
        creds::personality(ctx.uid, ctx.gid).await
    }

    /// [`created`](Self::created) through the queue's ring.
    async fn created_ring(&self, dir: RawFd, name: &CStr) -> Result<Entry> {
        let (id, st) = self.lookup_at_ring(dir, name).await?;
        Ok(self.entry(id, &st))
    }

    /// After a successful creation of `name` in `dir`: look it up (as the server).
    fn created(&self, dir: RawFd, name: &CStr) -> Result<Entry> {
        let fd = self.resolve(dir, name)?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let (id, _) = self.inodes.insert_or_ref(fd, &st, true)?;
        Ok(self.entry(id, &st))
    }

    /// Registers a freshly created and opened file `file` (create/tmpfile).
    fn created_open(&self, ctx: &Context, file: OwnedFd, flags: i32, reopenable: bool) -> Result<(Entry, Opened)> {
        let st = sys::fstat(file.as_raw_fd())?;
        let file = std::sync::Arc::new(file);
        let (id, ifd) = match self.inodes.insert_or_ref_open(&file, &st, reopenable)? {
            Some(found) => found,
            None => {
                let opath = sys::openat(
                    self.proc_fd.as_fd(),
                    &sys::fd_name(file.as_raw_fd()),
                    libc::O_PATH | libc::O_CLOEXEC,
                    0,
                )?;
                self.inodes.insert_or_ref(opath, &st, reopenable)?
            }
        };
        // Even a file this open just created may be set-id (a mode with S_ISUID, or an existing
        // file that O_CREAT opened), and writes by its non-root owner must clear that too.
        let backing_id = self.passthrough_open(ctx, id, &file, st.st_mode & libc::S_IFMT, flags);
        let fh = self.handles.insert_file(id, file.clone());
        self.journal_open(fh, id, &file, false, backing_id);
        self.note_writer(fh, id, &file, backing_id);
        self.inodes.pin_open(id, &file);
        drop(ifd);
        Ok((self.entry(id, &st), Opened::new(FileHandle(fh), self.file_options(backing_id))))
    }

    /// Writes open `fh` of `node` to the failover journal (failover on): its open flags as
    /// the backing file has them (what a server after a crash opens it with again).
    fn journal_open(&self, fh: u64, node: u64, file: &OwnedFd, dir: bool, backing_id: i32) {
        if let Some(j) = self.journal.get() {
            let flags = rustix::fs::fcntl_getfl(file.as_fd()).map_or(libc::O_RDONLY, |f| f.bits() as i32);
            j.opened(fh, node, flags, dir, backing_id);
        }
    }

    /// Registers open `fh` of `node` with the watch's write ignores when it writes through
    /// passthrough (see [`watch::WriteIgnores`]).
    fn note_writer(&self, fh: u64, node: u64, file: &OwnedFd, backing_id: i32) {
        let Some(w) = self.write_ignores.get() else { return };
        if backing_id == 0 {
            return;
        }
        let fl = rustix::fs::fcntl_getfl(file.as_fd());
        if fl.is_ok_and(|fl| fl.bits() as i32 & libc::O_ACCMODE != libc::O_RDONLY) {
            w.opened(fh, node, file.as_fd());
        }
    }

    /// Decides passthrough for a new open of a regular file; returns the backing id (0 = none).
    fn passthrough_open(&self, ctx: &Context, node: u64, file: &OwnedFd, kind: u32, flags: i32) -> i32 {
        if kind != libc::S_IFREG {
            return 0;
        }
        // Writes through passthrough run with the server's credentials on the backing file, so
        // the backing file system never clears set-uid/set-gid for them, while a write by anyone
        // without CAP_FSETID (the file's owner included) must. Such opens stay on the server
        // path, where WRITE's kill flag does the clearing.
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let setid_risk = writable
            && ctx.uid != 0
            && sys::fstat(file.as_raw_fd()).map(|st| suidgid_to_kill(ctx, st.st_mode, st.st_gid) != 0).unwrap_or(true);
        let excluded = !self.cfg.passthrough_exclude.is_empty() && self.excluded(file.as_raw_fd());
        let id = self.passthrough.open(node, file.as_raw_fd(), setid_risk, excluded, || self.on_writes_mount(node));
        if id > 0 && setid_risk {
            // The inode was already open through passthrough (its first open decides, and the
            // kernel allows no mixing), so this writer's writes will keep the bits: clear them
            // now, as its first write would.
            if self.kill_suidgid(ctx, file.as_fd()).is_ok_and(|killed| killed) {
                self.attr_changed(node);
            }
        }
        id
    }

    /// `file` opened again on the writes mount ([`writes_mount`]), for registering it as a
    /// passthrough backing file: the kernel opens the backing files of passthrough opens on the
    /// registered file's mount, so the mount's own writes then land on the mount the watch
    /// ignores. None (register `file` itself) for files of other file systems (below the
    /// backing directory on other mounts) or without file handles, or when the private root is
    /// the writes mount already.
    ///
    /// `node` is the file's node: its backing key and file handle (the inode table's, computed
    /// once per node) name the inode, so no `fstat` and `name_to_handle_at` of the file itself.
    fn on_writes_mount(&self, node: u64) -> Option<OwnedFd> {
        let (mount, dev) = self.writes_mount.as_ref()?;
        if self.cfg.noatime || self.cfg.strictatime || self.cfg.nodiratime {
            // The private root is the writes mount: `file` is on it already (or there is none).
            return None;
        }
        let (handle, key) = self.inodes.handle_and_key(node)?;
        if key.0 != *dev {
            return None;
        }
        // Same device, so the same file system: the handle decodes to the node's own inode
        // (or fails, ESTALE, if it is gone), with no fstat to check.
        sys::open_by_handle(mount.as_raw_fd(), &handle, libc::O_RDONLY | libc::O_CLOEXEC).ok()
    }

    /// Clears on the open file `fd` the set-id bits that a change by `ctx` clears natively
    /// ([`suidgid_to_kill`]). Whether any bit was cleared.
    fn kill_suidgid(&self, ctx: &Context, fd: BorrowedFd<'_>) -> Result<bool> {
        let st = sys::fstat(fd.as_raw_fd())?;
        let mode = st.st_mode;
        let kill = suidgid_to_kill(ctx, mode, st.st_gid);
        if kill != 0 {
            sys::rx(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777 & !kill)))?;
        }
        Ok(kill != 0)
    }

    /// Tells the kernel that `node`'s attributes changed behind a request that carries none
    /// back (a WRITE whose kill flag cleared set-id bits): its cached mode is stale otherwise
    /// until the attribute timeout.
    fn attr_changed(&self, node: u64) {
        if let Some(k) = self.passthrough.kernel() {
            k.inval_inode(NodeId(node), -1, 0);
        }
    }

    /// Whether the open file `fd` matches `passthrough_exclude` (by its current path).
    fn excluded(&self, fd: RawFd) -> bool {
        let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else { return false };
        let Ok(rel) = path.strip_prefix(&self.path_prefix) else { return false };
        passthrough::excluded(&self.cfg.passthrough_exclude, rel.as_os_str().as_bytes())
    }

    /// Starts pushing changes made directly on the backing directory to the kernel's caches.
    /// Needs the kernel channel (attached at INIT).
    pub fn start_watch(&self, mut watch: watch::Watch) -> io::Result<()> {
        let kernel = self.passthrough.kernel().ok_or_else(|| io::Error::other("no kernel channel attached"))?;
        if let Some((root, _)) = &self.writes_mount {
            if let Err(e) = watch.ignore_own_mount(root.as_raw_fd()) {
                log::info!("FAN_MODIFY not ignored on the server's private mount ({e}): per-file ignore marks instead");
            }
        }
        if let Some(w) = watch.write_ignores() {
            let _ = self.write_ignores.set(w);
        }
        if let Some(ino) = &watch.inotify {
            self.inodes.set_hooks(ino.clone());
        }
        let inodes = self.inodes.clone();
        std::thread::Builder::new().name("ringfs-watch".into()).spawn(move || watch::run(watch, inodes, kernel))?;
        Ok(())
    }

    /// Counters of passthrough decisions.
    pub fn passthrough_stats(&self) -> std::sync::Arc<passthrough::PassthroughStats> {
        self.passthrough.stats.clone()
    }

    /// Reopens the inode behind O_PATH descriptor `fd` with real open flags.
    fn reopen(&self, fd: RawFd, flags: i32) -> Result<OwnedFd> {
        sys::openat(self.proc_fd.as_fd(), &sys::fd_name(fd), flags, 0)
    }

    /// chmod of the inode (`hfd`: an open file descriptor of it, if any).
    fn chmod(&self, fd: &InodeFd, hfd: Option<BorrowedFd<'_>>, kind: u32, mode: u32) -> Result<()> {
        if kind == libc::S_IFLNK {
            return Err(Errno::EOPNOTSUPP);
        }
        let mode = mode & 0o7777;
        if let Some(h) = hfd {
            return sys::rx(rustix::fs::fchmod(h, Mode::from_raw_mode(mode)));
        }
        if !self.no_fchmodat2.load(Ordering::Relaxed) {
            match sys::fchmod_empty(fd.as_raw_fd(), mode) {
                Err(e) if e == Errno::ENOSYS => self.no_fchmodat2.store(true, Ordering::Relaxed),
                r => return r,
            }
        }
        let name = sys::fd_name(fd.as_raw_fd());
        // Following the magic link reaches the inode.
        sys::rx(rustix::fs::chmodat(self.proc_fd.as_fd(), &*name, Mode::from_raw_mode(mode), AtFlags::empty()))
    }

    /// The open handle a file-attribute ioctl came with; it must belong to `node`.
    fn fileattr_handle(&self, node: NodeId, fh: FileHandle) -> Result<std::sync::Arc<handles::Handle>> {
        if fh.0 == 0 && self.no_opendir.load(Ordering::Relaxed) {
            // A directory opened without OPENDIR (files always have a handle).
            let fd = std::sync::Arc::new(self.open_dir(node)?);
            let kind = handles::HandleKind::Dir(fd, std::sync::Mutex::new(handles::DirStream::new()));
            return Ok(std::sync::Arc::new(handles::Handle { node: node.0, kind }));
        }
        let h = self.handle_fd(fh)?;
        if h.node != node.0 {
            return Err(Errno::EBADF);
        }
        Ok(h)
    }

    fn handle_fd(&self, fh: FileHandle) -> Result<std::sync::Arc<handles::Handle>> {
        self.handles.get(fh.0)
    }

    fn do_setattr(&self, ctx: &Context, node: NodeId, attr: &SetAttr) -> Result<AttrOut> {
        let (fd, kind) = self.inodes.get(node.0)?;
        let handle = match attr.fh {
            Some(fh) => Some(self.handle_fd(fh)?),
            None => None,
        };
        let hfd = handle.as_ref().and_then(|h| h.file_borrowed().ok());
        let mut mode = attr.mode;
        // Set-uid/set-gid clearing: asked by the kernel, or a truncate by an unprivileged
        // caller (the server's CAP_FSETID would otherwise keep the bits).
        if kind == libc::S_IFREG && (attr.kill_suidgid || (attr.size.is_some() && ctx.uid != 0)) {
            let st = sys::fstat(fd.as_raw_fd())?;
            let cur = mode.unwrap_or(st.st_mode);
            let kill = suidgid_to_kill(ctx, cur, st.st_gid);
            if kill != 0 {
                match mode {
                    Some(m) => mode = Some(m & !kill),
                    // Done as the server: a local truncate clears the bits for non-owners too.
                    // The reply's attributes update the kernel, except after a truncating
                    // OPEN (the dispatcher's kill before it), whose reply carries none.
                    None => {
                        self.chmod(&fd, hfd, kind, cur & !kill)?;
                        self.attr_changed(node.0);
                    }
                }
            }
        }
        self.as_caller(ctx, false, || {
            if let Some(m) = mode {
                self.chmod(&fd, hfd, kind, m)?;
            }
            // A SETATTR that changes nothing else is `chown(f, -1, -1)` (the kernel sends no
            // attribute, or with the writeback cache only FATTR_CTIME): local file systems update
            // ctime for it, and the same call on the backing file does (and clears set-uid as
            // they do).
            let touch_ctime = mode.is_none()
                && attr.size.is_none()
                && attr.atime.is_none()
                && attr.mtime.is_none()
                && !attr.kill_suidgid;
            if attr.uid.is_some() || attr.gid.is_some() || touch_ctime {
                // None is -1: "unchanged".
                sys::rx(rustix::fs::chownat(
                    fd.as_fd(),
                    sys::EMPTY,
                    attr.uid.map(rustix::fs::Uid::from_raw),
                    attr.gid.map(rustix::fs::Gid::from_raw),
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                ))?;
            }
            if let Some(size) = attr.size {
                let size = i64::try_from(size).map_err(|_| Errno::EINVAL)?;
                match hfd {
                    Some(h) => sys::rx(rustix::fs::ftruncate(h, size as u64))?,
                    None => {
                        let p = sys::proc_path(fd.as_raw_fd());
                        // SAFETY: `p` is NUL-terminated; truncate(2) follows the magic link.
                        cvt(unsafe { libc::truncate(p.as_ptr(), size) })?;
                    }
                };
            }
            if attr.atime.is_some() || attr.mtime.is_some() {
                let times = rustix::fs::Timestamps {
                    last_access: timespec_of(attr.atime),
                    last_modification: timespec_of(attr.mtime),
                };
                sys::rx(rustix::fs::utimensat(
                    fd.as_fd(),
                    sys::EMPTY,
                    &times,
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                ))?;
            }
            Ok(())
        })?;
        let st = sys::fstat(hfd.map_or(fd.as_raw_fd(), |h| h.as_raw_fd()))?;
        Ok(self.attr_out(&st))
    }

    /// Runs `read` on the directory stream of `fh`, or, for fh 0 under zero-message opendir, on
    /// the parked stream of `node` (or a freshly opened one), which is parked again afterwards
    /// unless `read` took no entry (the end of the listing). `read` returns the entries taken.
    fn with_dir(
        &self,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        read: &mut dyn FnMut(BorrowedFd<'_>, &mut handles::DirStream) -> Result<usize>,
    ) -> Result<()> {
        if fh.0 != 0 || !self.no_opendir.load(Ordering::Relaxed) {
            let h = self.handle_fd(fh)?;
            let (fd, mut s) = h.dir()?;
            return read(fd, &mut s).map(drop);
        }
        // No stream parked at this offset: open the directory (`read` seeks to the offset).
        let (fd, mut s) = match self.parked.take(node.0, offset) {
            Some(p) => p,
            None => (self.open_dir(node)?, handles::DirStream::new()),
        };
        if read(fd.as_fd(), &mut s)? > 0 {
            self.parked.park(node.0, fd, s);
        }
        Ok(())
    }

    /// A new descriptor for reading directory `node`, opened as the server (zero-message
    /// opendir: the kernel checked the opener's permission).
    fn open_dir(&self, node: NodeId) -> Result<OwnedFd> {
        let (fd, kind) = self.inodes.get(node.0)?;
        if kind != libc::S_IFDIR {
            return Err(Errno::ENOTDIR);
        }
        let noatime = if self.cfg.noatime { libc::O_NOATIME } else { 0 };
        self.reopen(fd.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | noatime)
    }

    fn do_readdirplus(
        &self,
        ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        out: &mut DirPlusBuffer<'_>,
    ) -> Result<()> {
        self.with_dir(node, fh, offset, &mut |fd, s| self.readdirplus_chunk(ctx, fd, s, offset, out))
    }

    fn readdirplus_chunk(
        &self,
        ctx: &Context,
        fd: BorrowedFd<'_>,
        s: &mut handles::DirStream,
        offset: u64,
        out: &mut DirPlusBuffer<'_>,
    ) -> Result<usize> {
        let mut took = 0usize;
        s.read(fd, offset, &mut |e| {
            let taken = self.readdirplus_entry(ctx, fd.as_raw_fd(), e, out);
            took += usize::from(taken);
            taken
        })?;
        Ok(took)
    }

    /// Offers one entry to a READDIRPLUS reply; false when it does not fit (kept for the next).
    fn readdirplus_entry(
        &self,
        ctx: &Context,
        fd: RawFd,
        e: &handles::DirEntry<'_>,
        out: &mut DirPlusBuffer<'_>,
    ) -> bool {
        let kind = e.kind as u32;
        let name = e.name.to_bytes();
        let bare = Entry::new(NodeId(0), 0, FileAttr::new(e.ino, kind << 12), Duration::ZERO, Duration::ZERO);
        if is_dot(name) {
            return out.add(&bare, e.off, kind, name);
        }
        if !out.fits(name) {
            return false;
        }
        match self.lookup_at(ctx, fd, e.name) {
            Ok((id, st)) => {
                let entry = self.entry(id, &st);
                if !out.add(&entry, e.off, kind, name) {
                    self.inodes.forget(id, 1);
                    return false;
                }
                true
            }
            // Removed meanwhile: skip it.
            Err(err) if err == Errno::ENOENT => true,
            // Cannot look it up (permissions, fd limits...): name it without a node.
            Err(_) => out.add(&bare, e.off, kind, name),
        }
    }

    /// EOPNOTSUPP for the names this mount does not have (LSM labels with
    /// [`FsConfig::lsm_labels`] off).
    fn check_xattr_name(&self, name: &CStr) -> Result<()> {
        if !self.cfg.lsm_labels && is_lsm_label(name.to_bytes()) {
            return Err(Errno::EOPNOTSUPP);
        }
        Ok(())
    }

    fn do_listxattr(&self, ctx: &Context, node: NodeId, size: u32) -> Result<XattrReply> {
        let (fd, _) = self.inodes.get(node.0)?;
        let p = sys::proc_path(fd.as_raw_fd());
        let mut buf = Vec::new();
        self.as_caller(ctx, false, || loop {
            let n = sys::xattr::list(&p, &mut [])?;
            if n == 0 {
                buf.clear();
                return Ok(());
            }
            buf.resize(n, 0);
            match sys::xattr::list(&p, &mut buf) {
                Ok(m) => {
                    buf.truncate(m);
                    return Ok(());
                }
                // The list grew between the two calls.
                Err(e) if e == Errno::ERANGE => continue,
                Err(e) => return Err(e),
            }
        })?;
        let hide_trusted = ctx.uid != 0;
        let hide_labels = !self.cfg.lsm_labels;
        if hide_trusted || hide_labels {
            // trusted.* names are visible to CAP_SYS_ADMIN only; the server has it, the
            // caller (as far as we know) does not.
            let mut filtered = Vec::with_capacity(buf.len());
            for name in buf.split(|&b| b == 0).filter(|n| !n.is_empty()) {
                let hidden = (hide_trusted && name.starts_with(b"trusted.")) || (hide_labels && is_lsm_label(name));
                if !hidden {
                    filtered.extend_from_slice(name);
                    filtered.push(0);
                }
            }
            buf = filtered;
        }
        if size == 0 {
            return Ok(XattrReply::Size(buf.len() as u32));
        }
        if buf.len() > size as usize {
            return Err(Errno::ERANGE);
        }
        Ok(XattrReply::Data(buf))
    }
}

impl FileSystem for PassthroughFs {
    fn attach_kernel(&self, kernel: std::sync::Arc<dyn ringfs_protocol::KernelChannel>) {
        self.passthrough.attach(kernel);
    }

    fn init(&self, conn: &mut ConnInfo) -> Result<()> {
        self.default_permissions.store(conn.default_permissions, Ordering::Relaxed);
        // OPENDIR checks no permission with default_permissions (the kernel did): without it,
        // the server's open as the caller is the check, and the round trip stays.
        self.no_opendir.store(
            self.cfg.zero_message_opendir && conn.default_permissions && conn.no_opendir_support,
            Ordering::Relaxed,
        );
        conn.passthrough &= self.cfg.passthrough;
        self.writeback.store(conn.writeback_cache, Ordering::Relaxed);
        self.passthrough.set_enabled(conn.passthrough);
        // The server clears set-uid/set-gid itself (WRITE/SETATTR/OPEN kill flags are honoured),
        // which lets the kernel skip its per-write security.capability check (SB_NOSEC).
        conn.handle_killpriv_v2 = true;
        // The kernel enforces ACLs (fetched once per inode with GETXATTR and cached), and
        // creation modes come unmasked so a parent's default ACL can replace the umask.
        conn.posix_acl = conn.default_permissions && self.cfg.posix_acl && self.acl_supported;
        self.posix_acl.store(conn.posix_acl, Ordering::Relaxed);
        // Node ids stay resolvable through the backing file handles the table keeps.
        conn.export_support = self.cfg.export_handles > 0 && self.inodes.handles_supported();
        self.exported.store(conn.export_support, Ordering::Relaxed);
        Ok(())
    }

    fn destroy(&self) {
        // Once (DESTROY and the end of the session both call it).
        if !self.exported.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Some(path) = &self.cfg.handle_state {
            let state = self.inodes.export();
            match handle_state::save(path, &state) {
                Ok(()) => log::debug!("{}: {} inodes for the next server", path.display(), state.nodes.len()),
                Err(e) => log::warn!("{}: {e}; file handles will be stale after a remount", path.display()),
            }
        }
    }

    async fn lookup_node(&self, _ctx: &Context, node: NodeId) -> Result<Entry> {
        if node == NodeId::ROOT {
            let (fd, _) = self.inodes.get(node.0)?;
            return Ok(self.entry(node.0, &sys::fstat(fd.as_raw_fd())?));
        }
        // Still known (the kernel's FORGET may be in flight on another queue), or forgotten
        // and reopened from its file handle under the same node id; a FORGET that lands
        // between the two steps is met by the second round.
        for _ in 0..2 {
            if let Some(fd) = self.inodes.add_ref(node.0)? {
                return Ok(self.entry(node.0, &sys::fstat(fd.as_raw_fd())?));
            }
            let fd = match self.inodes.revive(node.0) {
                Ok(fd) => fd,
                Err(e) if e == Errno::ESTALE => continue,
                Err(e) => return Err(e),
            };
            let st = sys::fstat(fd.as_raw_fd())?;
            let (id, _) = self.inodes.insert_or_ref(fd, &st, true)?;
            if id != node.0 {
                // Another node has this inode now: the handle names a file the kernel knows
                // under a different id.
                self.inodes.forget(id, 1);
                return Err(Errno::ESTALE);
            }
            return Ok(self.entry(id, &st));
        }
        Err(Errno::ESTALE)
    }

    async fn lookup_parent(&self, _ctx: &Context, dir: NodeId) -> Result<Entry> {
        let (fd, kind) = self.inodes.get(dir.0)?;
        if kind != libc::S_IFDIR {
            return Err(Errno::ENOTDIR);
        }
        let root = self.inodes.root_key();
        let st = sys::fstat(fd.as_raw_fd())?;
        if (st.st_dev, st.st_ino) == root {
            return Ok(self.entry(NodeId::ROOT.0, &st));
        }
        let parent = sys::openat(fd.as_fd(), c"..", libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC, 0)?;
        let pst = sys::fstat(parent.as_raw_fd())?;
        if (pst.st_dev, pst.st_ino) == root {
            return Ok(self.entry(NodeId::ROOT.0, &pst));
        }
        // A directory moved out of the backing tree behind the mount's back must not lead
        // there: the parent must have the root among its ancestors.
        if !beneath(&parent, root)? {
            return Err(Errno::ENOENT);
        }
        let (id, _) = self.inodes.insert_or_ref(parent, &pst, true)?;
        Ok(self.entry(id, &pst))
    }

    async fn lookup(&self, ctx: &Context, parent: NodeId, name: &CStr) -> Result<Entry> {
        let b = name.to_bytes();
        if is_dot(b) {
            return Err(Errno::ENOENT);
        }
        check_name(name)?;
        let (pfd, _) = self.inodes.get(parent.0)?;
        let found = if self.kernel_checks() {
            // The kernel checked permissions: resolve through the queue's ring, so a slow
            // backing directory does not hold the core.
            self.lookup_at_ring(pfd.as_raw_fd(), name).await
        } else {
            self.lookup_at(ctx, pfd.as_raw_fd(), name)
        };
        match found {
            Ok((id, st)) => Ok(self.entry(id, &st)),
            Err(e) if e == Errno::ENOENT && !self.cfg.negative_timeout.is_zero() => {
                Ok(Entry::negative(self.cfg.negative_timeout))
            }
            Err(e) => Err(e),
        }
    }

    fn forget(&self, node: NodeId, nlookup: u64) {
        self.inodes.forget(node.0, nlookup);
    }

    async fn getattr(&self, _ctx: &Context, node: NodeId, fh: Option<FileHandle>) -> Result<AttrOut> {
        let st = match fh.map(|fh| self.handle_fd(fh)) {
            Some(Ok(h)) => sys::fstat_async(h.borrowed_fd()).await?,
            _ => {
                let (fd, _) = self.inodes.get(node.0)?;
                sys::fstat_async(fd.as_fd()).await?
            }
        };
        Ok(self.attr_out(&st))
    }

    async fn statx(
        &self,
        _ctx: &Context,
        node: NodeId,
        fh: Option<FileHandle>,
        flags: u32,
        mask: u32,
    ) -> Result<(StatxAttr, Duration)> {
        let sync = flags as i32 & libc::AT_STATX_SYNC_TYPE;
        let stx = match fh.map(|fh| self.handle_fd(fh)) {
            Some(Ok(h)) => sys::statx(h.fd(), sync, mask)?,
            _ => sys::statx(self.inodes.get(node.0)?.0.as_raw_fd(), sync, mask)?,
        };
        Ok((StatxAttr::from_statx(&stx), self.cfg.attr_timeout))
    }

    async fn setattr(&self, ctx: &Context, node: NodeId, attr: &SetAttr) -> Result<AttrOut> {
        self.do_setattr(ctx, node, attr)
    }

    async fn readlink(&self, _ctx: &Context, node: NodeId) -> Result<Vec<u8>> {
        let (fd, _) = self.inodes.get(node.0)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        let n = sys::rx(rustix::fs::readlinkat_raw(fd.as_fd(), sys::EMPTY, &mut buf[..]))?;
        buf.truncate(n);
        Ok(buf)
    }

    async fn symlink(&self, ctx: &Context, parent: NodeId, name: &CStr, target: &CStr) -> Result<Entry> {
        check_name(name)?;
        let (pfd, _) = self.inodes.get(parent.0)?;
        if let Some(p) = self.ring_creator(ctx).await {
            match ringfs_transport::io::symlinkat_as(target, pfd.as_fd(), name, p).await {
                Ok(()) => return self.created_ring(pfd.as_raw_fd(), name).await,
                Err(e) if !groups_may_help(ctx, &e) => return Err(e.into()),
                Err(_) => {}
            }
        }
        self.as_caller(ctx, true, || sys::rx(rustix::fs::symlinkat(target, pfd.as_fd(), name)))?;
        self.created(pfd.as_raw_fd(), name)
    }

    async fn mknod(
        &self,
        ctx: &Context,
        parent: NodeId,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> Result<Entry> {
        check_name(name)?;
        let (pfd, _) = self.inodes.get(parent.0)?;
        let mode = self.creation_mode(pfd.as_raw_fd(), mode, umask);
        self.as_caller(ctx, true, || {
            // SAFETY: `name` is NUL-terminated. The FUSE rdev encoding equals glibc's dev_t
            // encoding for 32-bit values.
            cvt(unsafe { libc::mknodat(pfd.as_raw_fd(), name.as_ptr(), mode, rdev as libc::dev_t) })
        })?;
        self.created(pfd.as_raw_fd(), name)
    }

    async fn mkdir(&self, ctx: &Context, parent: NodeId, name: &CStr, mode: u32, umask: u32) -> Result<Entry> {
        check_name(name)?;
        let (pfd, _) = self.inodes.get(parent.0)?;
        let mode = self.creation_mode(pfd.as_raw_fd(), mode, umask);
        if let Some(p) = self.ring_creator(ctx).await {
            match ringfs_transport::io::mkdirat_as(pfd.as_fd(), name, mode & 0o7777, p).await {
                Ok(()) => return self.created_ring(pfd.as_raw_fd(), name).await,
                Err(e) if !groups_may_help(ctx, &e) => return Err(e.into()),
                Err(_) => {}
            }
        }
        self.as_caller(ctx, true, || {
            sys::rx(rustix::fs::mkdirat(pfd.as_fd(), name, Mode::from_raw_mode(mode & 0o7777)))
        })?;
        self.created(pfd.as_raw_fd(), name)
    }

    async fn unlink(&self, ctx: &Context, parent: NodeId, name: &CStr) -> Result<()> {
        check_name(name)?;
        let (pfd, _) = self.inodes.get(parent.0)?;
        if self.kernel_checks() {
            return Ok(ringfs_transport::io::unlinkat(pfd.as_fd(), name, 0).await?);
        }
        self.as_caller(ctx, false, || sys::rx(rustix::fs::unlinkat(pfd.as_fd(), name, AtFlags::empty())))
    }

    async fn rmdir(&self, ctx: &Context, parent: NodeId, name: &CStr) -> Result<()> {
        check_name(name)?;
        let (pfd, _) = self.inodes.get(parent.0)?;
        if self.kernel_checks() {
            return Ok(ringfs_transport::io::unlinkat(pfd.as_fd(), name, libc::AT_REMOVEDIR).await?);
        }
        self.as_caller(ctx, false, || sys::rx(rustix::fs::unlinkat(pfd.as_fd(), name, AtFlags::REMOVEDIR)))
    }

    async fn rename(
        &self,
        ctx: &Context,
        parent: NodeId,
        name: &CStr,
        new_parent: NodeId,
        new_name: &CStr,
        flags: u32,
    ) -> Result<()> {
        check_name(name)?;
        check_name(new_name)?;
        let (ofd, _) = self.inodes.get(parent.0)?;
        let (nfd, _) = self.inodes.get(new_parent.0)?;
        if self.kernel_checks() {
            return Ok(ringfs_transport::io::renameat2(ofd.as_fd(), name, nfd.as_fd(), new_name, flags).await?);
        }
        self.as_caller(ctx, false, || sys::renameat2(ofd.as_fd(), name, nfd.as_fd(), new_name, flags))
    }

    async fn link(&self, ctx: &Context, node: NodeId, new_parent: NodeId, new_name: &CStr) -> Result<Entry> {
        check_name(new_name)?;
        let (fd, _) = self.inodes.get(node.0)?;
        let (pfd, _) = self.inodes.get(new_parent.0)?;
        let src = sys::proc_path(fd.as_raw_fd());
        // Through the ring: as the server when the kernel checked permissions, else as the caller.
        let creator = match (ringfs_transport::io::metadata_on_ring(), self.kernel_checks()) {
            (false, _) => None,
            (true, true) => Some(0),
            (true, false) => self.ring_creator(ctx).await,
        };
        if let Some(p) = creator {
            let flags = libc::AT_SYMLINK_FOLLOW;
            match ringfs_transport::io::linkat_as(None, &src, pfd.as_fd(), new_name, flags, p).await {
                Ok(()) => return self.created_ring(pfd.as_raw_fd(), new_name).await,
                Err(e) if !groups_may_help(ctx, &e) => return Err(e.into()),
                Err(_) => {}
            }
        }
        self.as_caller(ctx, false, || {
            // Following the magic link reaches the inode itself (a symlink is not followed
            // further); unlike AT_EMPTY_PATH this needs no CAP_DAC_READ_SEARCH, so it also works
            // under the caller's credentials.
            sys::rx(rustix::fs::linkat(rustix::fs::CWD, &*src, pfd.as_fd(), new_name, AtFlags::SYMLINK_FOLLOW))
        })?;
        self.created(pfd.as_raw_fd(), new_name)
    }

    async fn open(&self, ctx: &Context, node: NodeId, flags: u32) -> Result<Opened> {
        let (fd, kind) = self.inodes.get(node.0)?;
        if kind == libc::S_IFDIR {
            return Err(Errno::EISDIR);
        }
        // Only flags open(2) knows: the kernel's may carry internal bits (__FMODE_EXEC for an
        // exec) that openat2 would refuse with EINVAL.
        let flags = self.backing_open_flags(flags as i32 & OPEN_FLAGS) | libc::O_CLOEXEC;
        let flags = if self.cfg.noatime { flags | libc::O_NOATIME } else { flags };
        let file = if self.kernel_checks() {
            // Through the queue's ring: opening may block on the backing file (NFS, devices).
            let name = sys::fd_name(fd.as_raw_fd());
            ringfs_transport::io::openat2(self.proc_fd.as_raw_fd(), &name, flags, 0, 0).await?
        } else {
            // As the caller, O_NOATIME needs ownership of the file (EPERM otherwise).
            match self.as_caller(ctx, false, || self.reopen(fd.as_raw_fd(), flags)) {
                Err(e) if e == Errno::EPERM && flags & libc::O_NOATIME != 0 => {
                    self.as_caller(ctx, false, || self.reopen(fd.as_raw_fd(), flags & !libc::O_NOATIME))?
                }
                r => r?,
            }
        };
        let backing_id = self.passthrough_open(ctx, node.0, &file, kind, flags);
        let file = std::sync::Arc::new(file);
        let fh = self.handles.insert_file(node.0, file.clone());
        self.journal_open(fh, node.0, &file, false, backing_id);
        self.note_writer(fh, node.0, &file, backing_id);
        self.inodes.pin_open(node.0, &file);
        drop(fd);
        Ok(Opened::new(FileHandle(fh), self.file_options(backing_id)))
    }

    async fn create(
        &self,
        ctx: &Context,
        parent: NodeId,
        name: &CStr,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> Result<(Entry, Opened)> {
        check_name(name)?;
        let (pfd, _) = self.inodes.get(parent.0)?;
        let mode = self.creation_mode(pfd.as_raw_fd(), mode, umask);
        let oflags = self.backing_open_flags(flags as i32 & (OPEN_FLAGS | libc::O_EXCL))
            | libc::O_CREAT
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | if self.cfg.noatime { libc::O_NOATIME } else { 0 };
        if let Some(p) = self.ring_creator(ctx).await {
            let (dir, mode) = (pfd.as_raw_fd(), mode & 0o7777);
            match ringfs_transport::io::openat2_as(dir, name, oflags, mode, sys::RESOLVE_STRICT, p).await {
                Ok(file) => return self.created_open(ctx, file, flags as i32, true),
                // A mount point: checked by the synchronous path below.
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
                Err(e) if !groups_may_help(ctx, &e) => return Err(e.into()),
                Err(_) => {}
            }
        }
        let create =
            |oflags| self.as_caller(ctx, true, || self.create_at(pfd.as_raw_fd(), name, oflags, mode & 0o7777));
        let file = match create(oflags) {
            // O_CREAT without O_EXCL opened someone else's file: O_NOATIME needs ownership.
            Err(e) if e == Errno::EPERM && oflags & libc::O_NOATIME != 0 => create(oflags & !libc::O_NOATIME)?,
            r => r?,
        };
        self.created_open(ctx, file, flags as i32, true)
    }

    async fn tmpfile(
        &self,
        ctx: &Context,
        parent: NodeId,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> Result<(Entry, Opened)> {
        let (pfd, _) = self.inodes.get(parent.0)?;
        let mode = self.creation_mode(pfd.as_raw_fd(), mode, umask);
        let oflags = self.backing_open_flags(flags as i32 & (OPEN_FLAGS | libc::O_EXCL) & !libc::O_TRUNC)
            | libc::O_TMPFILE
            | libc::O_CLOEXEC;
        if let Some(p) = self.ring_creator(ctx).await {
            match ringfs_transport::io::openat2_as(pfd.as_raw_fd(), c".", oflags, mode & 0o7777, 0, p).await {
                // An unnamed inode cannot be reopened by handle: keep its descriptor pinned.
                Ok(file) => return self.created_open(ctx, file, flags as i32, false),
                Err(e) if !groups_may_help(ctx, &e) => return Err(e.into()),
                Err(_) => {}
            }
        }
        let file = self.as_caller(ctx, true, || sys::openat(pfd.as_fd(), c".", oflags, mode & 0o7777))?;
        // An unnamed inode cannot be reopened by handle: keep its descriptor pinned.
        self.created_open(ctx, file, flags as i32, false)
    }

    async fn read(&self, _ctx: &Context, _node: NodeId, fh: FileHandle, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let h = self.handle_fd(fh)?;
        // On an io_uring queue thread this is an SQE on the queue's ring, which keeps a
        // duplicate of the descriptor until it completes.
        Ok(ringfs_transport::io::pread(h.file_borrowed()?, buf, offset).await?)
    }

    async fn write(
        &self,
        ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        flags: WriteFlags,
    ) -> Result<usize> {
        let h = self.handle_fd(fh)?;
        let fd = h.file_borrowed()?;
        if flags.kill_suidgid && self.kill_suidgid(ctx, fd)? {
            self.attr_changed(node.0);
        }
        // On an O_APPEND descriptor a positioned write appends, as the open asked for.
        Ok(ringfs_transport::io::pwrite(h.file_borrowed()?, data, offset).await?)
    }

    async fn flush(&self, _ctx: &Context, _node: NodeId, fh: FileHandle, _lock_owner: u64) -> Result<()> {
        let h = self.handle_fd(fh)?;
        // Closing a duplicate runs the backing file system's flush (e.g. NFS close-to-open)
        // without closing our descriptor.
        // SAFETY: dup of an open descriptor; the duplicate is closed right away.
        let d = cvt(unsafe { libc::dup(h.fd()) })?;
        // SAFETY: `d` is the duplicate we own.
        cvt(unsafe { libc::close(d) }).map(drop)
    }

    async fn release(&self, _ctx: &Context, _node: NodeId, fh: FileHandle, _flags: u32) -> Result<()> {
        if let Some(j) = self.journal.get() {
            j.closed(fh.0);
        }
        if let Some(h) = self.handles.remove(fh.0) {
            if let handles::HandleKind::File(f) = &h.kind {
                if let Some(w) = self.write_ignores.get() {
                    if w.closed(fh.0, h.node, f.as_fd()) {
                        // Another writer's size/time changes were not reported meanwhile.
                        if let Some(k) = self.passthrough.kernel() {
                            k.inval_inode(NodeId(h.node), -1, 0);
                        }
                    }
                }
                self.passthrough.release(h.node);
            }
            self.inodes.unpin(h.node);
        }
        Ok(())
    }

    async fn fsync(&self, _ctx: &Context, _node: NodeId, fh: FileHandle, datasync: bool) -> Result<()> {
        let h = self.handle_fd(fh)?;
        Ok(ringfs_transport::io::fsync(h.borrowed_fd(), datasync).await?)
    }

    async fn opendir(&self, ctx: &Context, node: NodeId, _flags: u32) -> Result<Opened> {
        if self.no_opendir.load(Ordering::Relaxed) {
            // The kernel stops sending OPENDIR/RELEASEDIR for the whole mount.
            return Err(Errno::ENOSYS);
        }
        let (fd, kind) = self.inodes.get(node.0)?;
        if kind != libc::S_IFDIR {
            return Err(Errno::ENOTDIR);
        }
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let noatime = if self.cfg.noatime { libc::O_NOATIME } else { 0 };
        let dir = match self.as_caller(ctx, false, || self.reopen(fd.as_raw_fd(), flags | noatime)) {
            // As the caller, O_NOATIME needs ownership of the directory (EPERM otherwise).
            Err(e) if e == Errno::EPERM && noatime != 0 => {
                self.as_caller(ctx, false, || self.reopen(fd.as_raw_fd(), flags))?
            }
            r => r?,
        };
        // The open directory doubles as the node's descriptor while it is open (as an open
        // file does): a client holding thousands of directories open costs one descriptor each.
        let dir = std::sync::Arc::new(dir);
        let fh = self.handles.insert_dir(node.0, dir.clone());
        self.journal_open(fh, node.0, &dir, true, 0);
        self.inodes.pin_open(node.0, &dir);
        drop(fd);
        // With the watch, a directory's cached listing is dropped when the backing directory
        // changes (and by the kernel itself for changes made through the mount): let the kernel
        // keep it across opens.
        let cache = self.cfg.keep_cache;
        let mut options = OpenOptions::default();
        options.cache_dir = cache;
        options.keep_cache = cache;
        Ok(Opened::new(FileHandle(fh), options))
    }

    async fn readdir(
        &self,
        _ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        out: &mut DirBuffer<'_>,
    ) -> Result<()> {
        self.with_dir(node, fh, offset, &mut |fd, s| {
            let mut took = 0usize;
            s.read(fd, offset, &mut |e| {
                let added = out.add(e.ino, e.off, e.kind as u32, e.name.to_bytes());
                took += usize::from(added);
                added
            })?;
            Ok(took)
        })
    }

    async fn readdirplus(
        &self,
        ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        out: &mut DirPlusBuffer<'_>,
    ) -> Result<()> {
        self.do_readdirplus(ctx, node, fh, offset, out)
    }

    async fn releasedir(&self, _ctx: &Context, _node: NodeId, fh: FileHandle) -> Result<()> {
        if let Some(j) = self.journal.get() {
            j.closed(fh.0);
        }
        if let Some(h) = self.handles.remove(fh.0) {
            self.inodes.unpin(h.node);
        }
        Ok(())
    }

    async fn fsyncdir(&self, ctx: &Context, node: NodeId, fh: FileHandle, datasync: bool) -> Result<()> {
        if fh.0 == 0 && self.no_opendir.load(Ordering::Relaxed) {
            let fd = self.open_dir(node)?;
            return Ok(ringfs_transport::io::fsync(fd.as_fd(), datasync).await?);
        }
        self.fsync(ctx, node, fh, datasync).await
    }

    async fn statfs(&self, _ctx: &Context, node: NodeId) -> Result<StatFs> {
        let (fd, _) = self.inodes.get(node.0)?;
        // fstatfs accepts O_PATH descriptors.
        let s = sys::rx(rustix::fs::fstatfs(fd.as_fd()))?;
        let mut out = StatFs::default();
        out.blocks = s.f_blocks as u64;
        out.bfree = s.f_bfree as u64;
        out.bavail = s.f_bavail as u64;
        out.files = s.f_files as u64;
        out.ffree = s.f_ffree as u64;
        out.bsize = s.f_bsize as u32;
        out.namelen = s.f_namelen as u32;
        out.frsize = s.f_frsize as u32;
        Ok(out)
    }

    async fn setxattr(&self, ctx: &Context, node: NodeId, name: &CStr, value: &[u8], flags: u32) -> Result<()> {
        self.check_xattr_name(name)?;
        let (fd, _) = self.inodes.get(node.0)?;
        let p = sys::proc_path(fd.as_raw_fd());
        // Setting an access ACL clears set-gid when the caller is neither in the file's group nor
        // privileged, as the kernel does natively. With default_permissions the set runs as the
        // server (root), for which the backing file system keeps the bit: decide it here, with
        // the caller's groups.
        let kill_sgid = ctx.uid != 0
            && name.to_bytes() == b"system.posix_acl_access"
            && self.default_permissions.load(Ordering::Relaxed)
            && sys::fstat(fd.as_raw_fd()).is_ok_and(|st| {
                st.st_mode & libc::S_IFMT != libc::S_IFLNK
                    && st.st_mode & libc::S_ISGID != 0
                    && st.st_gid != ctx.gid
                    && !creds::caller_groups(ctx.pid).is_ok_and(|g| g.contains(&st.st_gid))
            });
        self.as_caller(ctx, false, || sys::xattr::set(&p, name, value, flags as i32))?;
        if kill_sgid {
            let st = sys::fstat(fd.as_raw_fd())?;
            // Through /proc: the node's descriptor may be an O_PATH one.
            sys::rx(rustix::fs::chmod(&*p, Mode::from_raw_mode(st.st_mode & 0o7777 & !libc::S_ISGID)))?;
        }
        Ok(())
    }

    async fn getxattr(&self, ctx: &Context, node: NodeId, name: &CStr, size: u32) -> Result<XattrReply> {
        self.check_xattr_name(name)?;
        let (fd, _) = self.inodes.get(node.0)?;
        let p = sys::proc_path(fd.as_raw_fd());
        if size == 0 {
            let n = self.as_caller(ctx, false, || sys::xattr::get(&p, name, &mut []))?;
            return Ok(XattrReply::Size(n as u32));
        }
        let mut buf = vec![0u8; size as usize];
        let n = self.as_caller(ctx, false, || sys::xattr::get(&p, name, &mut buf))?;
        buf.truncate(n);
        Ok(XattrReply::Data(buf))
    }

    async fn listxattr(&self, ctx: &Context, node: NodeId, size: u32) -> Result<XattrReply> {
        self.do_listxattr(ctx, node, size)
    }

    async fn removexattr(&self, ctx: &Context, node: NodeId, name: &CStr) -> Result<()> {
        self.check_xattr_name(name)?;
        let (fd, _) = self.inodes.get(node.0)?;
        let p = sys::proc_path(fd.as_raw_fd());
        self.as_caller(ctx, false, || sys::xattr::remove(&p, name))
    }

    async fn access(&self, ctx: &Context, node: NodeId, mask: u32) -> Result<()> {
        let (fd, _) = self.inodes.get(node.0)?;
        self.as_caller(ctx, true, || sys::faccessat2(fd.as_raw_fd(), mask, libc::AT_EMPTY_PATH | libc::AT_EACCESS))
    }

    async fn fallocate(
        &self,
        ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: u32,
    ) -> Result<()> {
        let h = self.handle_fd(fh)?;
        let fd = h.file_borrowed()?;
        ringfs_transport::io::fallocate(fd, mode as i32, offset, length).await?;
        // fallocate by an unprivileged caller clears set-id bits natively; FALLOCATE carries no
        // kill flag and runs as the server, so clear them here.
        if ctx.uid != 0 && self.kill_suidgid(ctx, fd)? {
            self.attr_changed(node.0);
        }
        Ok(())
    }

    async fn get_inode_flags(&self, _ctx: &Context, node: NodeId, fh: FileHandle, _dir: bool) -> Result<u32> {
        let h = self.fileattr_handle(node, fh)?;
        sys::get_inode_flags(h.fd())
    }

    async fn set_inode_flags(&self, ctx: &Context, node: NodeId, fh: FileHandle, _dir: bool, flags: u32) -> Result<()> {
        let h = self.fileattr_handle(node, fh)?;
        // The kernel checked ownership and CAP_LINUX_IMMUTABLE; ext4 also guards data
        // journalling with CAP_SYS_RESOURCE, which the server has and the caller may not.
        if ctx.uid != 0 && (sys::get_inode_flags(h.fd())? ^ flags) & sys::FS_JOURNAL_DATA_FL != 0 {
            return Err(Errno::EPERM);
        }
        sys::set_inode_flags(h.fd(), flags)?;
        // The change moved the backing ctime; the kernel asks for fresh attributes.
        self.attr_changed(node.0);
        Ok(())
    }

    async fn get_fsxattr(&self, _ctx: &Context, node: NodeId, fh: FileHandle, _dir: bool) -> Result<FsXattr> {
        let h = self.fileattr_handle(node, fh)?;
        sys::get_fsxattr(h.fd())
    }

    async fn set_fsxattr(
        &self,
        _ctx: &Context,
        node: NodeId,
        fh: FileHandle,
        _dir: bool,
        attr: &FsXattr,
    ) -> Result<()> {
        // No capability-guarded flag is reachable through the xflags (ext4 maps none to data
        // journalling); the kernel checked the rest.
        let h = self.fileattr_handle(node, fh)?;
        sys::set_fsxattr(h.fd(), attr)?;
        self.attr_changed(node.0);
        Ok(())
    }

    async fn lseek(&self, _ctx: &Context, _node: NodeId, fh: FileHandle, offset: u64, whence: u32) -> Result<u64> {
        let h = self.handle_fd(fh)?;
        // The handle's own position is not used by pread/pwrite, so moving it is harmless.
        let pos = match whence as i32 {
            libc::SEEK_SET => SeekFrom::Start(offset),
            libc::SEEK_CUR => SeekFrom::Current(offset as i64),
            libc::SEEK_END => SeekFrom::End(offset as i64),
            libc::SEEK_DATA => SeekFrom::Data(offset),
            libc::SEEK_HOLE => SeekFrom::Hole(offset),
            // What lseek(2) answers for an unknown `whence`.
            _ => return Err(Errno::EINVAL),
        };
        sys::rx(rustix::fs::seek(h.file_borrowed()?, pos))
    }

    async fn copy_file_range(
        &self,
        ctx: &Context,
        _node_in: NodeId,
        fh_in: FileHandle,
        offset_in: u64,
        node_out: NodeId,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> Result<u64> {
        let hi = self.handle_fd(fh_in)?;
        let ho = self.handle_fd(fh_out)?;
        let n = sys::copy_file_range(
            hi.file_borrowed()?,
            offset_in as i64,
            ho.file_borrowed()?,
            offset_out as i64,
            len as usize,
            flags as u32,
        )?;
        // As a write: an unprivileged caller's copy clears the destination's set-id bits.
        if ctx.uid != 0 && n > 0 && self.kill_suidgid(ctx, ho.file_borrowed()?)? {
            self.attr_changed(node_out.0);
        }
        Ok(n as u64)
    }
}

/// After a creation through the ring as `ctx`'s fsuid/fsgid failed with `e`: whether retrying
/// synchronously with the caller's supplementary groups may succeed.
fn groups_may_help(ctx: &Context, e: &std::io::Error) -> bool {
    ctx.uid != 0 && matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
}
