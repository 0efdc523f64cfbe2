//! Thin wrappers around the Linux system calls the passthrough file system uses.
//!
//! Every wrapper returns the backing errno on failure (read immediately after the call) and
//! owned file descriptors as [`OwnedFd`], so nothing leaks on error paths.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use ringfs_protocol::{Errno, Result};
use rustix::fs::{Mode, OFlags};

/// Converts a rustix result (the kernel's errno on failure) into a result.
pub(crate) fn rx<T>(r: rustix::io::Result<T>) -> Result<T> {
    r.map_err(|e| Errno(e.raw_os_error()))
}

/// Converts a `c_int` return value (negative on error) into a result.
pub(crate) fn cvt(r: libc::c_int) -> Result<libc::c_int> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// Converts a `c_long`/`ssize_t` return value (negative on error) into a result.
pub(crate) fn cvt_long(r: i64) -> Result<i64> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// Takes ownership of a file descriptor returned by a system call.
fn owned(fd: libc::c_int) -> Result<OwnedFd> {
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` was just returned by a successful open-like system call, so it is a valid,
    // open descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The empty path, for `*at` calls with `AT_EMPTY_PATH`.
pub(crate) const EMPTY: &CStr = c"";

/// Resolution flags used for every user-supplied name: stay beneath the directory, never
/// follow symlinks (a trailing symlink is returned as an O_PATH fd when O_PATH|O_NOFOLLOW), and
/// never cross into another mount. A name that is a mount point answers `EXDEV`; the file system
/// then resolves it again with [`RESOLVE_CROSSING`] and checks where it landed (it may be this
/// server's own mount, bind-mounted into the backing tree: see `PassthroughFs::crossing`).
pub(crate) const RESOLVE_STRICT: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_XDEV;

/// [`RESOLVE_STRICT`] without `RESOLVE_NO_XDEV`: for a name already known to be a mount point.
pub(crate) const RESOLVE_CROSSING: u64 = RESOLVE_STRICT & !libc::RESOLVE_NO_XDEV;

/// openat2(2), blocking, with the transport's retry rule for `EAGAIN`.
pub(crate) fn openat2(dir: RawFd, name: &CStr, flags: i32, mode: u32, resolve: u64) -> Result<OwnedFd> {
    Ok(ringfs_transport::io::openat2_blocking(dir, name, flags, mode, resolve)?)
}

/// The device number (`st_dev`) of what `fd` refers to, without asking its file system for
/// attributes (`AT_STATX_DONT_SYNC` and an empty mask: a FUSE mount answers from the superblock,
/// so this never sends a request, not even to this server's own mount).
pub(crate) fn dev_nosync(fd: RawFd) -> Result<u64> {
    let x = statx(fd, libc::AT_STATX_DONT_SYNC, 0)?;
    Ok(libc::makedev(x.stx_dev_major, x.stx_dev_minor))
}

/// openat(2) (`rustix::fs::CWD` for `AT_FDCWD`).
pub(crate) fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    rx(rustix::fs::openat(dir, name, OFlags::from_bits_retain(flags as u32), Mode::from_raw_mode(mode)))
}

/// stat of whatever `fd` refers to (an O_PATH fd works; symlinks are not followed).
pub(crate) fn fstat(fd: RawFd) -> Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is a writable `stat` buffer; EMPTY is NUL-terminated.
    cvt(unsafe {
        libc::fstatat(fd, EMPTY.as_ptr(), st.as_mut_ptr(), libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    })?;
    // SAFETY: fstatat succeeded and filled the buffer (it was zeroed anyway).
    Ok(unsafe { st.assume_init() })
}

/// statx(2) of whatever `fd` refers to.
pub(crate) fn statx(fd: RawFd, flags: i32, mask: u32) -> Result<libc::statx> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `stx` is a writable `statx` buffer; EMPTY is NUL-terminated.
    cvt(unsafe {
        libc::statx(fd, EMPTY.as_ptr(), flags | libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW, mask, stx.as_mut_ptr())
    })?;
    // SAFETY: statx succeeded; the buffer was zero-initialised in any case.
    Ok(unsafe { stx.assume_init() })
}

/// The `stat` view of a `statx` result (basic fields).
pub(crate) fn stat_from_statx(x: &libc::statx) -> libc::stat {
    // SAFETY: stat is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    st.st_dev = libc::makedev(x.stx_dev_major, x.stx_dev_minor);
    st.st_ino = x.stx_ino;
    st.st_mode = x.stx_mode as u32;
    st.st_nlink = x.stx_nlink as _;
    st.st_uid = x.stx_uid;
    st.st_gid = x.stx_gid;
    st.st_rdev = libc::makedev(x.stx_rdev_major, x.stx_rdev_minor);
    st.st_size = x.stx_size as i64;
    st.st_blksize = x.stx_blksize as _;
    st.st_blocks = x.stx_blocks as i64;
    st.st_atime = x.stx_atime.tv_sec;
    st.st_atime_nsec = x.stx_atime.tv_nsec as i64;
    st.st_mtime = x.stx_mtime.tv_sec;
    st.st_mtime_nsec = x.stx_mtime.tv_nsec as i64;
    st.st_ctime = x.stx_ctime.tv_sec;
    st.st_ctime_nsec = x.stx_ctime.tv_nsec as i64;
    st
}

/// fstat through the queue's io_uring (a plain syscall off the queues).
pub(crate) async fn fstat_async(fd: std::os::fd::BorrowedFd<'_>) -> Result<libc::stat> {
    let x = ringfs_transport::io::statx(
        fd,
        EMPTY,
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        libc::STATX_BASIC_STATS,
    )
    .await?;
    Ok(stat_from_statx(&x))
}

/// Size of the `struct file_handle` header (handle_bytes, handle_type).
const HANDLE_HEADER: usize = 8;
/// Aligned buffer big enough for any `struct file_handle`.
type HandleBuf = [u64; (HANDLE_HEADER + libc::MAX_HANDLE_SZ as usize) / 8];

/// name_to_handle_at(fd, "", AT_EMPTY_PATH): the complete `struct file_handle` bytes, shared
/// (the inode table keeps them under two keys); one allocation.
pub(crate) fn name_to_handle(fd: RawFd) -> Result<std::sync::Arc<[u8]>> {
    use zerocopy::IntoBytes;
    let mut buf: HandleBuf = [0; (HANDLE_HEADER + libc::MAX_HANDLE_SZ as usize) / 8];
    // handle_bytes, the header's first field: the room for the handle.
    buf.as_mut_bytes()[..4].copy_from_slice(&(libc::MAX_HANDLE_SZ as u32).to_ne_bytes());
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is an 8-byte aligned `struct file_handle` with MAX_HANDLE_SZ handle bytes as
    // announced in handle_bytes; `mount_id` is writable; EMPTY is NUL-terminated.
    cvt(unsafe {
        libc::name_to_handle_at(fd, EMPTY.as_ptr(), buf.as_mut_ptr().cast(), &mut mount_id, libc::AT_EMPTY_PATH)
    })?;
    let bytes = buf.as_bytes();
    let n = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if n > libc::MAX_HANDLE_SZ as usize {
        return Err(Errno(libc::EOVERFLOW));
    }
    // Straight into the shared form the inode table keeps (one allocation).
    Ok(std::sync::Arc::from(&bytes[..HANDLE_HEADER + n]))
}

/// open_by_handle_at(mount_fd, handle, flags) for a handle from [`name_to_handle`].
pub(crate) fn open_by_handle(mount_fd: RawFd, handle: &[u8], flags: i32) -> Result<OwnedFd> {
    use zerocopy::IntoBytes;
    let mut buf: HandleBuf = [0; (HANDLE_HEADER + libc::MAX_HANDLE_SZ as usize) / 8];
    if handle.len() < HANDLE_HEADER || handle.len() > std::mem::size_of::<HandleBuf>() {
        return Err(Errno::EINVAL);
    }
    buf.as_mut_bytes()[..handle.len()].copy_from_slice(handle);
    retry_enomem(|| {
        // SAFETY: `buf` holds a complete, aligned `struct file_handle`.
        owned(unsafe { libc::open_by_handle_at(mount_fd, buf.as_mut_ptr().cast(), flags) })
    })
}

/// Runs `f` again while it fails with `ENOMEM`, a few times over about 13 ms.
///
/// open_by_handle_at answers `ENOMEM`, not `ESTALE`, for the handle of a deleted file whose
/// inode number a file being created at that moment reuses: the kernel's inode cache lookup
/// meets the new inode while it is still being set up (`I_CREATING`), `iget_locked` returns
/// NULL, and ext4 turns that into `ENOMEM`. Measured here: 1 in 20000 stale handles with two
/// threads creating files in the same directory (more on a loaded machine). Once the creation
/// finishes, the same call answers `ESTALE` (the generation differs), which is what the kernel
/// must hear for a stale handle. A real allocation failure persists and is returned.
pub(crate) fn retry_enomem<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut pause = std::time::Duration::from_micros(50);
    for _ in 0..8 {
        match f() {
            Err(e) if e == Errno::ENOMEM => {
                std::thread::sleep(pause);
                pause *= 2;
            }
            r => return r,
        }
    }
    f()
}

/// A short NUL-terminated string formatted on the stack (descriptor names and
/// `/proc/self/fd` paths: no allocation per request).
pub(crate) struct StackCStr {
    buf: [u8; 32],
    /// Length including the NUL.
    len: usize,
}

impl StackCStr {
    /// `prefix` followed by the decimal digits of `n` (a descriptor: never negative here;
    /// a negative one gives the digits of its magnitude after a '-').
    fn with_number(prefix: &[u8], n: RawFd) -> StackCStr {
        let mut digits = [0u8; 12];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            i -= 1;
            digits[i] = b'-';
        }
        let mut s = StackCStr { buf: [0; 32], len: 0 };
        let d = &digits[i..];
        s.buf[..prefix.len()].copy_from_slice(prefix);
        s.buf[prefix.len()..prefix.len() + d.len()].copy_from_slice(d);
        s.len = prefix.len() + d.len() + 1;
        s
    }
}

impl std::ops::Deref for StackCStr {
    type Target = CStr;
    fn deref(&self) -> &CStr {
        // The buffer holds no NUL before `len - 1` and one at `len - 1`.
        CStr::from_bytes_with_nul(&self.buf[..self.len]).unwrap_or(c"")
    }
}

/// The decimal name of `fd` inside `/proc/self/fd`.
pub(crate) fn fd_name(fd: RawFd) -> StackCStr {
    StackCStr::with_number(b"", fd)
}

/// `/proc/self/fd/<fd>`: a path that reaches exactly the inode `fd` refers to.
pub(crate) fn proc_path(fd: RawFd) -> StackCStr {
    StackCStr::with_number(b"/proc/self/fd/", fd)
}

/// renameat2(2).
pub(crate) fn renameat2(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> Result<()> {
    rx(rustix::fs::renameat_with(olddir, old, newdir, new, rustix::fs::RenameFlags::from_bits_retain(flags)))
}

/// fchmodat2(fd, "", mode, AT_EMPTY_PATH) (kernel 6.6+); works on O_PATH fds.
pub(crate) fn fchmod_empty(fd: RawFd, mode: u32) -> Result<()> {
    // 452 on every architecture (x86_64 and the generic table arm64 uses); the libc crate names
    // it for x86_64 only.
    const SYS_FCHMODAT2: libc::c_long = 452;
    // SAFETY: EMPTY is NUL-terminated.
    let r = unsafe { libc::syscall(SYS_FCHMODAT2, fd, EMPTY.as_ptr(), mode, libc::AT_EMPTY_PATH) };
    cvt_long(r).map(drop)
}

/// faccessat2(2).
pub(crate) fn faccessat2(fd: RawFd, mask: u32, flags: i32) -> Result<()> {
    // SAFETY: EMPTY is NUL-terminated.
    let r = unsafe { libc::syscall(libc::SYS_faccessat2, fd, EMPTY.as_ptr(), mask, flags) };
    cvt_long(r).map(drop)
}

/// getdents64(2) into `buf`; returns the number of bytes filled (0 at end of directory).
pub(crate) fn getdents64(fd: RawFd, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: `buf` is writable for `buf.len()` bytes.
    let r = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    cvt_long(r).map(|n| n as usize)
}

/// copy_file_range(2) with explicit offsets. The kernel defines no flags: any is `EINVAL`, as
/// the system call itself answers.
pub(crate) fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: i64,
    fd_out: BorrowedFd<'_>,
    off_out: i64,
    len: usize,
    flags: u32,
) -> Result<usize> {
    if flags != 0 {
        return Err(Errno::EINVAL);
    }
    // Negative offsets keep their bits (loff_t): the kernel refuses them as before.
    let (mut oi, mut oo) = (off_in as u64, off_out as u64);
    rx(rustix::fs::copy_file_range(fd_in, Some(&mut oi), fd_out, Some(&mut oo), len))
}

/// Extended-attribute calls on `/proc/self/fd/N`, which reach the inode itself (also for
/// symlinks and special files, where O_PATH fds refuse the f*xattr calls).
pub(crate) mod xattr {
    use super::*;

    /// getxattr(2); `buf` empty = size probe.
    pub(crate) fn get(path: &CStr, name: &CStr, buf: &mut [u8]) -> Result<usize> {
        if buf.is_empty() {
            // rustix answers 0 for an empty buffer; the probe is its own call.
            return rx(rustix::fs::getxattr_query(path, name));
        }
        rx(rustix::fs::getxattr(path, name, buf))
    }

    /// `getxattrat(2)`'s argument block (`struct xattr_args`, Linux 6.13).
    #[repr(C)]
    struct XattrArgs {
        value: u64,
        size: u32,
        flags: u32,
    }

    /// The system call number of `getxattrat` (the same on every architecture since 6.13's
    /// unified table; only the two this project builds for are named).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    const SYS_GETXATTRAT: libc::c_long = 464;

    /// Whether `getxattrat` answered ENOSYS once (an older kernel): use the /proc path.
    static NO_GETXATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// getxattr of the directory `fd` refers to (an O_PATH descriptor will do); `buf` empty =
    /// size probe. `getxattrat(fd, ".")` where the kernel has it (6.13): one system call whose
    /// walk is the one component ".", instead of the walk of `/proc/self/fd/N` (and its magic
    /// link) that [`get`] on [`proc_path`] makes, which cost a third of a CREATE's default-ACL
    /// check; otherwise that path. (`AT_EMPTY_PATH` would reach files too, but getxattrat
    /// refuses O_PATH descriptors with EBADF.)
    pub(crate) fn get_dir(fd: RawFd, name: &CStr, buf: &mut [u8]) -> Result<usize> {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if !NO_GETXATTRAT.load(std::sync::atomic::Ordering::Relaxed) {
            let mut args = XattrArgs {
                value: if buf.is_empty() { 0 } else { buf.as_mut_ptr() as u64 },
                size: buf.len().min(u32::MAX as usize) as u32,
                flags: 0,
            };
            // SAFETY: `name` and "." are NUL-terminated; `args` is a valid xattr_args of the size
            // passed, and its value pointer is null with size 0 or writable for `size` bytes.
            let r = unsafe {
                libc::syscall(
                    SYS_GETXATTRAT,
                    fd,
                    c".".as_ptr(),
                    0 as libc::c_uint,
                    name.as_ptr(),
                    &mut args as *mut XattrArgs,
                    size_of::<XattrArgs>(),
                )
            };
            match cvt_long(r as i64) {
                Err(e) if e == Errno::ENOSYS => NO_GETXATTRAT.store(true, std::sync::atomic::Ordering::Relaxed),
                r => return r.map(|n| n as usize),
            }
        }
        get(&proc_path(fd), name, buf)
    }

    /// listxattr(2); `buf` empty = size probe.
    pub(crate) fn list(path: &CStr, buf: &mut [u8]) -> Result<usize> {
        if buf.is_empty() {
            return rx(rustix::fs::listxattr_query(path));
        }
        rx(rustix::fs::listxattr(path, buf))
    }

    /// setxattr(2).
    pub(crate) fn set(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> Result<()> {
        rx(rustix::fs::setxattr(path, name, value, rustix::fs::XattrFlags::from_bits_retain(flags as u32)))
    }

    /// removexattr(2).
    pub(crate) fn remove(path: &CStr, name: &CStr) -> Result<()> {
        rx(rustix::fs::removexattr(path, name))
    }
}

/// `FS_JOURNAL_DATA_FL`: ext4 data journalling (`chattr +j`), guarded by CAP_SYS_RESOURCE.
pub(crate) const FS_JOURNAL_DATA_FL: u32 = 0x0000_4000;
const FS_IOC_GETFLAGS: libc::c_ulong = ringfs_protocol::abi::fileattr::GETFLAGS as libc::c_ulong;
const FS_IOC_SETFLAGS: libc::c_ulong = ringfs_protocol::abi::fileattr::SETFLAGS as libc::c_ulong;
const FS_IOC_FSGETXATTR: libc::c_ulong = ringfs_protocol::abi::fileattr::FSGETXATTR as libc::c_ulong;
const FS_IOC_FSSETXATTR: libc::c_ulong = ringfs_protocol::abi::fileattr::FSSETXATTR as libc::c_ulong;

/// `struct fsxattr` as the ioctls take it.
#[repr(C)]
#[derive(Default)]
struct RawFsxattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// `FS_IOC_GETFLAGS` on an open descriptor.
pub(crate) fn get_inode_flags(fd: RawFd) -> Result<u32> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int to the pointer (the kernel's `long` in the name
    // notwithstanding).
    cvt(unsafe { libc::ioctl(fd, FS_IOC_GETFLAGS, &mut flags) })?;
    Ok(flags as u32)
}

/// `FS_IOC_SETFLAGS` on an open descriptor.
pub(crate) fn set_inode_flags(fd: RawFd, flags: u32) -> Result<()> {
    let flags = flags as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads one int from the pointer.
    cvt(unsafe { libc::ioctl(fd, FS_IOC_SETFLAGS, &flags) }).map(drop)
}

/// `FS_IOC_FSGETXATTR` on an open descriptor.
pub(crate) fn get_fsxattr(fd: RawFd) -> Result<ringfs_protocol::FsXattr> {
    let mut x = RawFsxattr::default();
    // SAFETY: FS_IOC_FSGETXATTR fills a `struct fsxattr`, which `RawFsxattr` is.
    cvt(unsafe { libc::ioctl(fd, FS_IOC_FSGETXATTR, &mut x) })?;
    let mut out = ringfs_protocol::FsXattr::default();
    out.xflags = x.xflags;
    out.extsize = x.extsize;
    out.nextents = x.nextents;
    out.projid = x.projid;
    out.cowextsize = x.cowextsize;
    Ok(out)
}

/// `FS_IOC_FSSETXATTR` on an open descriptor.
pub(crate) fn set_fsxattr(fd: RawFd, a: &ringfs_protocol::FsXattr) -> Result<()> {
    let x = RawFsxattr {
        xflags: a.xflags,
        extsize: a.extsize,
        nextents: a.nextents,
        projid: a.projid,
        cowextsize: a.cowextsize,
        pad: [0; 8],
    };
    // SAFETY: FS_IOC_FSSETXATTR reads a `struct fsxattr`, which `RawFsxattr` is.
    cvt(unsafe { libc::ioctl(fd, FS_IOC_FSSETXATTR, &x) }).map(drop)
}

/// `MOUNT_ATTR_NOATIME`.
pub(crate) const MOUNT_ATTR_NOATIME: u64 = 0x10;
/// `MOUNT_ATTR_STRICTATIME`.
pub(crate) const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
/// `MOUNT_ATTR__ATIME`: the access-time mode bits (cleared to change the mode).
pub(crate) const MOUNT_ATTR__ATIME: u64 = 0x70;
/// `MOUNT_ATTR_NODIRATIME`.
pub(crate) const MOUNT_ATTR_NODIRATIME: u64 = 0x80;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// `struct mount_attr` (version 0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A private, detached copy of the mount at `path` (`open_tree(OPEN_TREE_CLONE)`, with every
/// mount below it when `recursive`: `AT_RECURSIVE`) with mount attributes `set` applied and `clear` cleared on every mount in
/// it (nothing to apply when both are 0); returns the descriptor of its root. The copy lives as
/// long as the descriptor and what is opened through it.
pub(crate) fn private_mount(path: &CStr, set: u64, clear: u64, recursive: bool) -> Result<OwnedFd> {
    use rustix::mount::OpenTreeFlags;
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let fd = rx(rustix::mount::open_tree(rustix::fs::CWD, path, flags))?;
    if set == 0 && clear == 0 {
        return Ok(fd);
    }
    let attr = MountAttr { attr_set: set, attr_clr: clear, propagation: 0, userns_fd: 0 };
    // SAFETY: mount_setattr on our descriptor with EMPTY (NUL-terminated) and a mount_attr of
    // the size passed.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            EMPTY.as_ptr(),
            (libc::AT_EMPTY_PATH as libc::c_uint) | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(fd)
}
