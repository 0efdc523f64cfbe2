//! Reply encoding: turns file-system values into the kernel's reply structs.
//!
//! A reply is `fuse_out_header` followed by a payload. The dispatcher writes only the payload,
//! into a buffer the transport owns; the transport writes the header where its channel wants
//! it (in front of the payload for /dev/fuse, in the ring entry's header area for io_uring).

use std::time::Duration;

use zerocopy::IntoBytes;

use crate::abi::*;
use crate::fs::{AttrOut, DirentType, Entry, FileAttr, Lock, LockKind, Opened, StatFs, StatxAttr, Timespec};

/// Splits a timeout into the (seconds, nanoseconds) pair of the ABI.
pub fn timeout_parts(d: Duration) -> (u64, u32) {
    (d.as_secs(), d.subsec_nanos())
}

/// Converts attributes.
pub fn fuse_attr(a: &FileAttr) -> FuseAttr {
    FuseAttr {
        ino: a.ino,
        size: a.size,
        blocks: a.blocks,
        atime: a.atime.sec as u64,
        mtime: a.mtime.sec as u64,
        ctime: a.ctime.sec as u64,
        atimensec: a.atime.nsec,
        mtimensec: a.mtime.nsec,
        ctimensec: a.ctime.nsec,
        mode: a.mode,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

/// Converts an entry.
pub fn entry_out(e: &Entry) -> FuseEntryOut {
    let (entry_valid, entry_valid_nsec) = timeout_parts(e.entry_timeout);
    let (attr_valid, attr_valid_nsec) = timeout_parts(e.attr_timeout);
    FuseEntryOut {
        nodeid: e.nodeid.0,
        generation: e.generation,
        entry_valid,
        attr_valid,
        entry_valid_nsec,
        attr_valid_nsec,
        attr: fuse_attr(&e.attr),
    }
}

/// Converts attributes with their timeout.
pub fn attr_out(a: &AttrOut) -> FuseAttrOut {
    let (attr_valid, attr_valid_nsec) = timeout_parts(a.timeout);
    FuseAttrOut { attr_valid, attr_valid_nsec, dummy: 0, attr: fuse_attr(&a.attr) }
}

/// Converts an open reply.
pub fn open_out(o: &Opened) -> FuseOpenOut {
    let opts = &o.options;
    let mut open_flags = 0;
    if opts.direct_io {
        open_flags |= fopen::DIRECT_IO;
    }
    if opts.keep_cache {
        open_flags |= fopen::KEEP_CACHE;
    }
    if opts.nonseekable {
        open_flags |= fopen::NONSEEKABLE;
    }
    if opts.cache_dir {
        open_flags |= fopen::CACHE_DIR;
    }
    if opts.parallel_direct_writes {
        open_flags |= fopen::PARALLEL_DIRECT_WRITES;
    }
    if opts.noflush {
        open_flags |= fopen::NOFLUSH;
    }
    if opts.backing_id > 0 {
        open_flags |= fopen::PASSTHROUGH;
    }
    FuseOpenOut { fh: o.fh.0, open_flags, backing_id: opts.backing_id }
}

fn sx_time(t: &Timespec) -> FuseSxTime {
    FuseSxTime { tv_sec: t.sec, tv_nsec: t.nsec, reserved: 0 }
}

/// Converts statx attributes.
pub fn statx_out(s: &StatxAttr, timeout: Duration) -> FuseStatxOut {
    let (attr_valid, attr_valid_nsec) = timeout_parts(timeout);
    let a = &s.attr;
    let rdev = a.rdev as libc::dev_t;
    FuseStatxOut {
        attr_valid,
        attr_valid_nsec,
        flags: 0,
        spare: [0; 2],
        stat: FuseStatx {
            mask: s.mask,
            blksize: a.blksize,
            attributes: s.attributes,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            mode: a.mode as u16,
            spare0: [0],
            ino: a.ino,
            size: a.size,
            blocks: a.blocks,
            attributes_mask: s.attributes_mask,
            atime: sx_time(&a.atime),
            btime: sx_time(&s.btime),
            ctime: sx_time(&a.ctime),
            mtime: sx_time(&a.mtime),
            rdev_major: libc::major(rdev),
            rdev_minor: libc::minor(rdev),
            dev_major: 0,
            dev_minor: 0,
            spare2: [0; 14],
        },
    }
}

/// `fuse_lk_out` for a GETLK answer.
pub fn lk_out(l: &Lock) -> FuseLkOut {
    let type_ = match l.kind {
        LockKind::Read => libc::F_RDLCK,
        LockKind::Write => libc::F_WRLCK,
        LockKind::Unlock => libc::F_UNLCK,
    } as u32;
    FuseLkOut { lk: FuseFileLock { start: l.start, end: l.end, type_, pid: l.pid } }
}

/// Converts file-system statistics.
pub fn statfs_out(s: &StatFs) -> FuseStatfsOut {
    FuseStatfsOut {
        st: FuseKstatfs {
            blocks: s.blocks,
            bfree: s.bfree,
            bavail: s.bavail,
            files: s.files,
            ffree: s.ffree,
            bsize: s.bsize,
            namelen: s.namelen,
            frsize: s.frsize,
            padding: 0,
            spare: [0; 6],
        },
    }
}

/// Copies `value`'s bytes to the start of `out`; returns the length, or None if it does not fit.
pub fn put<T: IntoBytes + zerocopy::Immutable>(out: &mut [u8], value: &T) -> Option<usize> {
    let bytes = value.as_bytes();
    out.get_mut(..bytes.len())?.copy_from_slice(bytes);
    Some(bytes.len())
}

const fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// Size of one `fuse_dirent` record with a name of `namelen` bytes.
pub const fn dirent_size(namelen: usize) -> usize {
    align8(size_of::<FuseDirent>() + namelen)
}

/// Size of one `fuse_direntplus` record with a name of `namelen` bytes.
pub const fn direntplus_size(namelen: usize) -> usize {
    align8(size_of::<FuseDirentplus>() + namelen)
}

/// Encodes one `fuse_dirent`; None when it does not fit in `buf`.
pub fn encode_dirent(buf: &mut [u8], ino: u64, off: u64, kind: DirentType, name: &[u8]) -> Option<usize> {
    let total = dirent_size(name.len());
    let rec = buf.get_mut(..total)?;
    let d = FuseDirent { ino, off, namelen: name.len() as u32, type_: kind };
    let h = size_of::<FuseDirent>();
    rec[..h].copy_from_slice(d.as_bytes());
    rec[h..h + name.len()].copy_from_slice(name);
    rec[h + name.len()..].fill(0);
    Some(total)
}

/// Encodes one `fuse_direntplus`; None when it does not fit in `buf`.
pub fn encode_direntplus(buf: &mut [u8], e: &Entry, off: u64, kind: DirentType, name: &[u8]) -> Option<usize> {
    let total = direntplus_size(name.len());
    let rec = buf.get_mut(..total)?;
    let d = FuseDirentplus {
        entry_out: entry_out(e),
        dirent: FuseDirent { ino: e.attr.ino, off, namelen: name.len() as u32, type_: kind },
    };
    let h = size_of::<FuseDirentplus>();
    rec[..h].copy_from_slice(d.as_bytes());
    rec[h..h + name.len()].copy_from_slice(name);
    rec[h + name.len()..].fill(0);
    Some(total)
}

/// Writes a complete reply header for `unique` with `error` (negative errno or 0) and a payload
/// of `payload_len` bytes.
pub fn out_header(unique: u64, error: i32, payload_len: usize) -> FuseOutHeader {
    FuseOutHeader { len: (size_of::<FuseOutHeader>() + payload_len) as u32, error, unique }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::NodeId;

    #[test]
    fn lock_answer_layout() {
        let l = Lock::new(LockKind::Write, 4, u64::MAX, 99);
        let out = lk_out(&l);
        let b = out.as_bytes();
        assert_eq!(b.len(), 24);
        assert_eq!(&b[0..8], &4u64.to_ne_bytes());
        assert_eq!(&b[8..16], &u64::MAX.to_ne_bytes());
        assert_eq!(&b[16..20], &(libc::F_WRLCK as u32).to_ne_bytes());
        assert_eq!(&b[20..24], &99u32.to_ne_bytes());
        assert_eq!(lk_out(&Lock::unlocked()).lk.type_, libc::F_UNLCK as u32);
    }

    #[test]
    fn dirent_layout() {
        let mut buf = [0xffu8; 64];
        let n = encode_dirent(&mut buf, 5, 9, 4, b"abc").unwrap();
        assert_eq!(n, 32);
        assert_eq!(&buf[0..8], &5u64.to_ne_bytes());
        assert_eq!(&buf[8..16], &9u64.to_ne_bytes());
        assert_eq!(&buf[16..20], &3u32.to_ne_bytes());
        assert_eq!(&buf[24..27], b"abc");
        assert_eq!(&buf[27..32], &[0u8; 5]);
        assert!(encode_dirent(&mut buf[..31], 5, 9, 4, b"abc").is_none());
    }

    #[test]
    fn direntplus_layout() {
        let mut buf = [0u8; 256];
        let e = Entry {
            nodeid: NodeId(3),
            generation: 1,
            attr: FileAttr { ino: 77, ..Default::default() },
            entry_timeout: Duration::from_millis(1500),
            attr_timeout: Duration::from_secs(2),
        };
        let n = encode_direntplus(&mut buf, &e, 1, 8, b"x").unwrap();
        assert_eq!(n, 160);
        assert_eq!(&buf[0..8], &3u64.to_ne_bytes());
        assert_eq!(&buf[16..24], &1u64.to_ne_bytes());
        assert_eq!(&buf[32..36], &500_000_000u32.to_ne_bytes());
        assert_eq!(&buf[128..136], &77u64.to_ne_bytes());
    }
}
