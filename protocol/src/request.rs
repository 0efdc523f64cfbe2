//! Requests from the kernel, parsed by borrowing from the transport's buffer.
//!
//! A request is `fuse_in_header`, then per-opcode arguments, then (protocol 7.38+) optional
//! extensions of `total_extlen * 8` bytes. Parsing never panics: a short or inconsistent
//! request is a [`ParseError`], which the dispatcher answers with `EIO` when it still knows the
//! `unique` (and drops with a log line when it does not).

use std::ffi::CStr;

use zerocopy::FromBytes;

use crate::abi::opcode;
use crate::abi::*;

/// Why a request could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer bytes than a `fuse_in_header`.
    ShortHeader,
    /// `len` in the header disagrees with the bytes received.
    BadLength,
    /// The arguments of the opcode are truncated or malformed.
    BadArguments,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParseError::ShortHeader => "request shorter than its header",
            ParseError::BadLength => "request length field disagrees with the data",
            ParseError::BadArguments => "request arguments truncated or malformed",
        })
    }
}

impl std::error::Error for ParseError {}

/// A cursor over argument bytes.
struct Args<'a> {
    data: &'a [u8],
}

impl<'a> Args<'a> {
    fn fetch<T: FromBytes>(&mut self) -> Result<T, ParseError> {
        let (v, rest) = T::read_from_prefix(self.data).map_err(|_| ParseError::BadArguments)?;
        self.data = rest;
        Ok(v)
    }

    /// A struct whose older, shorter form the kernel may still send: missing bytes are zero.
    fn fetch_compat<T: FromBytes + zerocopy::IntoBytes + Default>(&mut self, min: usize) -> Result<T, ParseError> {
        let mut v = T::default();
        let want = size_of::<T>();
        let n = want.min(self.data.len());
        if n < min {
            return Err(ParseError::BadArguments);
        }
        v.as_mut_bytes()[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(v)
    }

    fn name(&mut self) -> Result<&'a CStr, ParseError> {
        let s = CStr::from_bytes_until_nul(self.data).map_err(|_| ParseError::BadArguments)?;
        self.data = &self.data[s.to_bytes_with_nul().len()..];
        Ok(s)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        if self.data.len() < n {
            return Err(ParseError::BadArguments);
        }
        let (v, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(v)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// One parsed operation with its arguments.
#[derive(Debug)]
#[allow(missing_docs)]
pub enum Operation<'a> {
    Lookup {
        name: &'a CStr,
    },
    Forget {
        arg: FuseForgetIn,
    },
    BatchForget {
        forgets: Vec<FuseForgetOne>,
    },
    Getattr {
        arg: FuseGetattrIn,
    },
    Setattr {
        arg: FuseSetattrIn,
    },
    Readlink,
    Symlink {
        name: &'a CStr,
        target: &'a CStr,
    },
    Mknod {
        arg: FuseMknodIn,
        name: &'a CStr,
    },
    Mkdir {
        arg: FuseMkdirIn,
        name: &'a CStr,
    },
    Unlink {
        name: &'a CStr,
    },
    Rmdir {
        name: &'a CStr,
    },
    Rename {
        newdir: u64,
        flags: u32,
        name: &'a CStr,
        newname: &'a CStr,
    },
    Link {
        arg: FuseLinkIn,
        name: &'a CStr,
    },
    Open {
        arg: FuseOpenIn,
    },
    Read {
        arg: FuseReadIn,
    },
    Write {
        arg: FuseWriteIn,
        data: &'a [u8],
    },
    Statfs,
    Release {
        arg: FuseReleaseIn,
    },
    Fsync {
        arg: FuseFsyncIn,
    },
    Setxattr {
        size: u32,
        flags: u32,
        name: &'a CStr,
        value: &'a [u8],
    },
    Getxattr {
        arg: FuseGetxattrIn,
        name: &'a CStr,
    },
    Listxattr {
        arg: FuseGetxattrIn,
    },
    Removexattr {
        name: &'a CStr,
    },
    Flush {
        arg: FuseFlushIn,
    },
    Init {
        arg: FuseInitIn,
    },
    Opendir {
        arg: FuseOpenIn,
    },
    Readdir {
        arg: FuseReadIn,
    },
    Releasedir {
        arg: FuseReleaseIn,
    },
    Fsyncdir {
        arg: FuseFsyncIn,
    },
    /// F_GETLK: `lock` is the lock the caller would take.
    Getlk {
        fh: u64,
        owner: crate::fs::LockOwner,
        lock: crate::fs::Lock,
    },
    /// F_SETLK (`sleep` false) or F_SETLKW (`sleep` true), and flock(2) (`lock.flock`).
    Setlk {
        fh: u64,
        owner: crate::fs::LockOwner,
        lock: crate::fs::Lock,
        sleep: bool,
    },
    Access {
        arg: FuseAccessIn,
    },
    Create {
        arg: FuseCreateIn,
        name: &'a CStr,
    },
    Interrupt {
        arg: FuseInterruptIn,
    },
    Bmap {
        arg: FuseBmapIn,
    },
    Destroy,
    Fallocate {
        arg: FuseFallocateIn,
    },
    Readdirplus {
        arg: FuseReadIn,
    },
    Lseek {
        arg: FuseLseekIn,
    },
    CopyFileRange {
        arg: FuseCopyFileRangeIn,
        wide: bool,
    },
    Syncfs,
    Tmpfile {
        arg: FuseCreateIn,
    },
    Statx {
        arg: FuseStatxIn,
    },
    /// FUSE_IOCTL: `data` is the caller's input (`arg.in_size` bytes).
    Ioctl {
        arg: FuseIoctlIn,
        data: &'a [u8],
    },
    /// An opcode this server does not know or does not serve (poll, DAX mappings...).
    Unsupported {
        opcode: u32,
    },
}

/// A parsed request, borrowing its names and data from the receive buffer.
#[derive(Debug)]
pub struct Request<'a> {
    /// The request header.
    pub header: FuseInHeader,
    /// The operation and its arguments.
    pub op: Operation<'a>,
    /// Supplementary groups sent with create-like requests (FUSE_CREATE_SUPP_GROUP), raw
    /// native-endian u32 values.
    pub supp_groups: &'a [u8],
}

impl Request<'_> {
    /// The request's unique id.
    pub fn unique(&self) -> u64 {
        self.header.unique
    }

    /// Supplementary group ids the kernel sent with this request.
    pub fn supp_groups(&self) -> impl Iterator<Item = u32> + '_ {
        self.supp_groups.chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
    }
}

/// Reads just the header of a request (to answer an unparseable request by its `unique`).
pub fn parse_header(buf: &[u8]) -> Result<FuseInHeader, ParseError> {
    FuseInHeader::read_from_prefix(buf).map(|(h, _)| h).map_err(|_| ParseError::ShortHeader)
}

/// Parses one request occupying all of `buf` (as read from /dev/fuse).
pub fn parse(buf: &[u8]) -> Result<Request<'_>, ParseError> {
    let header = parse_header(buf)?;
    if header.len as usize != buf.len() {
        return Err(ParseError::BadLength);
    }
    parse_parts(header, &buf[size_of::<FuseInHeader>()..])
}

/// Parses a request whose header and argument bytes (arguments followed by extensions) are
/// given separately, as FUSE-over-io_uring ring entries deliver them.
pub fn parse_parts(header: FuseInHeader, body: &[u8]) -> Result<Request<'_>, ParseError> {
    let hsize = if header.opcode == opcode::INIT {
        body.len().min(size_of::<FuseInitIn>())
    } else {
        op_header_size(header.opcode)
    };
    if body.len() < hsize {
        return Err(ParseError::BadArguments);
    }
    let (op_in, payload) = body.split_at(hsize);
    parse_split(header, op_in, payload)
}

/// Size of the fixed per-opcode argument struct that precedes names and data: what
/// FUSE-over-io_uring puts in the ring entry's `op_in` area (0 when the opcode has none).
pub fn op_header_size(op: u32) -> usize {
    use crate::abi::opcode as o;
    match op {
        o::FORGET => size_of::<FuseForgetIn>(),
        o::BATCH_FORGET => size_of::<FuseBatchForgetIn>(),
        o::GETATTR => size_of::<FuseGetattrIn>(),
        o::SETATTR => size_of::<FuseSetattrIn>(),
        o::MKNOD => size_of::<FuseMknodIn>(),
        o::MKDIR => size_of::<FuseMkdirIn>(),
        o::RENAME => size_of::<FuseRenameIn>(),
        o::RENAME2 => size_of::<FuseRename2In>(),
        o::LINK => size_of::<FuseLinkIn>(),
        o::OPEN | o::OPENDIR => size_of::<FuseOpenIn>(),
        o::READ | o::READDIR | o::READDIRPLUS => size_of::<FuseReadIn>(),
        o::WRITE => size_of::<FuseWriteIn>(),
        o::RELEASE | o::RELEASEDIR => size_of::<FuseReleaseIn>(),
        o::FSYNC | o::FSYNCDIR => size_of::<FuseFsyncIn>(),
        // The 8-byte form: FUSE_SETXATTR_EXT is not negotiated.
        o::SETXATTR => 8,
        o::GETXATTR | o::LISTXATTR => size_of::<FuseGetxattrIn>(),
        o::FLUSH => size_of::<FuseFlushIn>(),
        o::GETLK | o::SETLK | o::SETLKW => size_of::<FuseLkIn>(),
        o::ACCESS => size_of::<FuseAccessIn>(),
        o::CREATE | o::TMPFILE => size_of::<FuseCreateIn>(),
        o::INTERRUPT => size_of::<FuseInterruptIn>(),
        o::BMAP => size_of::<FuseBmapIn>(),
        o::FALLOCATE => size_of::<FuseFallocateIn>(),
        o::LSEEK => size_of::<FuseLseekIn>(),
        o::COPY_FILE_RANGE | o::COPY_FILE_RANGE_64 => size_of::<FuseCopyFileRangeIn>(),
        o::STATX => size_of::<FuseStatxIn>(),
        o::IOCTL => size_of::<FuseIoctlIn>(),
        o::INIT => size_of::<FuseInitIn>(),
        o::SYNCFS => size_of::<FuseSyncfsIn>(),
        _ => 0,
    }
}

/// Parses a request from its header, its per-opcode argument struct (`op_in`, at least
/// [`op_header_size`] bytes; longer is fine) and the rest (`payload`: names, data, then
/// `total_extlen * 8` bytes of extensions).
pub fn parse_split<'a>(header: FuseInHeader, op_in: &'a [u8], payload: &'a [u8]) -> Result<Request<'a>, ParseError> {
    let ext_len = header.total_extlen as usize * 8;
    if ext_len > payload.len() {
        return Err(ParseError::BadLength);
    }
    let (args, ext) = payload.split_at(payload.len() - ext_len);
    let supp_groups = parse_extensions(ext)?;
    let mut h = Args { data: op_in };
    let mut a = Args { data: args };
    use crate::abi::opcode as op;
    let op = match header.opcode {
        op::LOOKUP => Operation::Lookup { name: a.name()? },
        op::FORGET => Operation::Forget { arg: h.fetch()? },
        op::BATCH_FORGET => {
            let arg: FuseBatchForgetIn = h.fetch()?;
            let n = arg.count as usize;
            if n > a.data.len() / size_of::<FuseForgetOne>() {
                return Err(ParseError::BadArguments);
            }
            let mut forgets = Vec::with_capacity(n);
            for _ in 0..n {
                forgets.push(a.fetch::<FuseForgetOne>()?);
            }
            Operation::BatchForget { forgets }
        }
        op::GETATTR => Operation::Getattr { arg: h.fetch()? },
        op::SETATTR => Operation::Setattr { arg: h.fetch()? },
        op::READLINK => Operation::Readlink,
        op::SYMLINK => {
            let name = a.name()?;
            let target = a.name()?;
            Operation::Symlink { name, target }
        }
        op::MKNOD => {
            let arg = h.fetch_compat::<FuseMknodIn>(8)?;
            Operation::Mknod { arg, name: a.name()? }
        }
        op::MKDIR => {
            let arg = h.fetch()?;
            Operation::Mkdir { arg, name: a.name()? }
        }
        op::UNLINK => Operation::Unlink { name: a.name()? },
        op::RMDIR => Operation::Rmdir { name: a.name()? },
        op::RENAME => {
            let arg: FuseRenameIn = h.fetch()?;
            let name = a.name()?;
            let newname = a.name()?;
            Operation::Rename { newdir: arg.newdir, flags: 0, name, newname }
        }
        op::RENAME2 => {
            let arg: FuseRename2In = h.fetch()?;
            let name = a.name()?;
            let newname = a.name()?;
            Operation::Rename { newdir: arg.newdir, flags: arg.flags, name, newname }
        }
        op::LINK => {
            let arg = h.fetch()?;
            Operation::Link { arg, name: a.name()? }
        }
        op::OPEN => Operation::Open { arg: h.fetch()? },
        op::READ => Operation::Read { arg: h.fetch()? },
        op::WRITE => {
            let arg: FuseWriteIn = h.fetch()?;
            let data = a.bytes(arg.size as usize)?;
            Operation::Write { arg, data }
        }
        op::STATFS => Operation::Statfs,
        op::RELEASE => Operation::Release { arg: h.fetch()? },
        op::FSYNC => Operation::Fsync { arg: h.fetch()? },
        op::SETXATTR => {
            // Without FUSE_SETXATTR_EXT (not negotiated) the kernel sends the 8-byte form.
            let size: u32 = h.fetch()?;
            let flags: u32 = h.fetch()?;
            let name = a.name()?;
            let value = a.bytes(size as usize)?;
            Operation::Setxattr { size, flags, name, value }
        }
        op::GETXATTR => {
            let arg = h.fetch()?;
            Operation::Getxattr { arg, name: a.name()? }
        }
        op::LISTXATTR => Operation::Listxattr { arg: h.fetch()? },
        op::REMOVEXATTR => Operation::Removexattr { name: a.name()? },
        op::FLUSH => Operation::Flush { arg: h.fetch()? },
        op::INIT => {
            // Kernels before 7.36 send a 16-byte fuse_init_in.
            Operation::Init { arg: h.fetch_compat(16)? }
        }
        op::OPENDIR => Operation::Opendir { arg: h.fetch()? },
        op::READDIR => Operation::Readdir { arg: h.fetch()? },
        op::RELEASEDIR => Operation::Releasedir { arg: h.fetch()? },
        op::FSYNCDIR => Operation::Fsyncdir { arg: h.fetch()? },
        op::GETLK => {
            let (fh, owner, lock) = lock_in(&h.fetch()?)?;
            Operation::Getlk { fh, owner, lock }
        }
        op::SETLK | op::SETLKW => {
            let (fh, owner, lock) = lock_in(&h.fetch()?)?;
            Operation::Setlk { fh, owner, lock, sleep: header.opcode == op::SETLKW }
        }
        op::ACCESS => Operation::Access { arg: h.fetch()? },
        op::CREATE => {
            let arg = h.fetch()?;
            Operation::Create { arg, name: a.name()? }
        }
        op::INTERRUPT => Operation::Interrupt { arg: h.fetch()? },
        op::BMAP => Operation::Bmap { arg: h.fetch()? },
        op::DESTROY => Operation::Destroy,
        op::FALLOCATE => Operation::Fallocate { arg: h.fetch()? },
        op::READDIRPLUS => Operation::Readdirplus { arg: h.fetch()? },
        op::LSEEK => Operation::Lseek { arg: h.fetch()? },
        op::COPY_FILE_RANGE => Operation::CopyFileRange { arg: h.fetch()?, wide: false },
        op::COPY_FILE_RANGE_64 => Operation::CopyFileRange { arg: h.fetch()?, wide: true },
        op::SYNCFS => Operation::Syncfs,
        op::TMPFILE => {
            let arg = h.fetch()?;
            // The kernel also sends the placeholder dentry name; it carries no meaning.
            let _ = a.rest();
            Operation::Tmpfile { arg }
        }
        op::STATX => Operation::Statx { arg: h.fetch()? },
        op::IOCTL => {
            let arg: FuseIoctlIn = h.fetch()?;
            let data = a.bytes(arg.in_size as usize)?;
            Operation::Ioctl { arg, data }
        }
        opcode => Operation::Unsupported { opcode },
    };
    Ok(Request { header, op, supp_groups })
}

/// Decodes `fuse_lk_in`: the kind must be F_RDLCK, F_WRLCK or F_UNLCK and the range must not
/// end before it starts (the kernel checks both; a request that breaks them is malformed).
fn lock_in(arg: &FuseLkIn) -> Result<(u64, crate::fs::LockOwner, crate::fs::Lock), ParseError> {
    use crate::fs::{Lock, LockKind, LockOwner};
    let kind = match arg.lk.type_ as i32 {
        libc::F_RDLCK => LockKind::Read,
        libc::F_WRLCK => LockKind::Write,
        libc::F_UNLCK => LockKind::Unlock,
        _ => return Err(ParseError::BadArguments),
    };
    if arg.lk.end < arg.lk.start {
        return Err(ParseError::BadArguments);
    }
    let mut lock = Lock::new(kind, arg.lk.start, arg.lk.end, arg.lk.pid);
    lock.flock = arg.lk_flags & crate::abi::flags::LK_FLOCK != 0;
    Ok((arg.fh, LockOwner(arg.owner), lock))
}

/// Walks the extension area; returns the supplementary group bytes if present.
fn parse_extensions(mut ext: &[u8]) -> Result<&[u8], ParseError> {
    let mut groups: &[u8] = &[];
    while !ext.is_empty() {
        let (h, _) = FuseExtHeader::read_from_prefix(ext).map_err(|_| ParseError::BadArguments)?;
        let size = h.size as usize;
        if size < size_of::<FuseExtHeader>() || size > ext.len() || size % 8 != 0 {
            return Err(ParseError::BadArguments);
        }
        let body = &ext[size_of::<FuseExtHeader>()..size];
        if h.type_ == crate::abi::flags::EXT_GROUPS {
            let (g, rest) = FuseSuppGroups::read_from_prefix(body).map_err(|_| ParseError::BadArguments)?;
            let n = g.nr_groups as usize;
            if n.checked_mul(4).is_none_or(|b| b > rest.len()) {
                return Err(ParseError::BadArguments);
            }
            groups = &rest[..n * 4];
        }
        ext = &ext[size..];
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn request(opcode: u32, args: &[u8]) -> Vec<u8> {
        let header = FuseInHeader {
            len: (40 + args.len()) as u32,
            opcode,
            unique: 7,
            nodeid: 1,
            uid: 1000,
            gid: 1000,
            pid: 42,
            total_extlen: 0,
            padding: 0,
        };
        let mut v = header.as_bytes().to_vec();
        v.extend_from_slice(args);
        v
    }

    #[test]
    fn lookup_borrows_name() {
        let buf = request(opcode::LOOKUP, b"hello\0");
        let req = parse(&buf).unwrap();
        match req.op {
            Operation::Lookup { name } => assert_eq!(name.to_bytes(), b"hello"),
            other => panic!("{other:?}"),
        }
        assert_eq!(req.unique(), 7);
    }

    #[test]
    fn missing_nul_is_an_error() {
        let buf = request(opcode::LOOKUP, b"hello");
        assert_eq!(parse(&buf).unwrap_err(), ParseError::BadArguments);
    }

    #[test]
    fn short_and_inconsistent_buffers() {
        assert_eq!(parse(&[0u8; 10]).unwrap_err(), ParseError::ShortHeader);
        let mut buf = request(opcode::GETATTR, &[0u8; 16]);
        buf.pop();
        assert_eq!(parse(&buf).unwrap_err(), ParseError::BadLength);
        let buf = request(opcode::GETATTR, &[0u8; 8]);
        assert_eq!(parse(&buf).unwrap_err(), ParseError::BadArguments);
    }

    #[test]
    fn write_data_length_checked() {
        let arg = FuseWriteIn { size: 100, ..Default::default() };
        let mut args = arg.as_bytes().to_vec();
        args.extend_from_slice(&[1u8; 10]);
        let buf = request(opcode::WRITE, &args);
        assert_eq!(parse(&buf).unwrap_err(), ParseError::BadArguments);
    }

    #[test]
    fn ioctl_input_length_checked() {
        let arg = FuseIoctlIn { cmd: 0x4008_6602, in_size: 4, ..Default::default() };
        let mut args = arg.as_bytes().to_vec();
        args.extend_from_slice(&7u32.to_ne_bytes());
        let buf = request(opcode::IOCTL, &args);
        match parse(&buf).unwrap().op {
            Operation::Ioctl { arg, data } => assert_eq!((arg.cmd, data), (0x4008_6602, &7u32.to_ne_bytes()[..])),
            op => panic!("parsed as {op:?}"),
        }
        let short = FuseIoctlIn { in_size: 64, ..arg };
        let buf = request(opcode::IOCTL, short.as_bytes());
        assert!(parse(&buf).is_err(), "in_size beyond the request");
    }

    /// `fuse_lk_in` as the kernel lays it out: fh, owner, {start, end, type, pid}, lk_flags, pad.
    fn lk_bytes(fh: u64, owner: u64, start: u64, end: u64, type_: u32, pid: u32, lk_flags: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [fh, owner, start, end] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        for x in [type_, pid, lk_flags, 0] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        assert_eq!(v.len(), size_of::<FuseLkIn>());
        v
    }

    #[test]
    fn lock_requests_parse_from_raw_bytes() {
        use crate::fs::{LockKind, LockOwner};
        let wr = libc::F_WRLCK as u32;
        let buf = request(opcode::SETLKW, &lk_bytes(5, 0xabcd, 10, 19, wr, 77, 0));
        match parse(&buf).unwrap().op {
            Operation::Setlk { fh, owner, lock, sleep } => {
                assert_eq!((fh, owner, sleep), (5, LockOwner(0xabcd), true));
                assert_eq!(
                    (lock.kind, lock.start, lock.end, lock.pid, lock.flock),
                    (LockKind::Write, 10, 19, 77, false)
                );
            }
            op => panic!("parsed as {op:?}"),
        }
        let buf = request(opcode::SETLK, &lk_bytes(5, 1, 0, u64::MAX, libc::F_RDLCK as u32, 1, 1));
        match parse(&buf).unwrap().op {
            Operation::Setlk { lock, sleep, .. } => {
                assert!(!sleep && lock.flock);
                assert_eq!((lock.kind, lock.end), (LockKind::Read, u64::MAX));
            }
            op => panic!("parsed as {op:?}"),
        }
        let buf = request(opcode::GETLK, &lk_bytes(9, 2, 0, 0, libc::F_UNLCK as u32, 0, 0));
        assert!(
            matches!(parse(&buf).unwrap().op, Operation::Getlk { fh: 9, lock, .. } if lock.kind == LockKind::Unlock)
        );
    }

    #[test]
    fn malformed_lock_requests_are_errors() {
        let wr = libc::F_WRLCK as u32;
        // Unknown lock type.
        let buf = request(opcode::SETLK, &lk_bytes(1, 1, 0, 10, 7, 1, 0));
        assert_eq!(parse(&buf).unwrap_err(), ParseError::BadArguments);
        // End before start.
        let buf = request(opcode::GETLK, &lk_bytes(1, 1, 10, 9, wr, 1, 0));
        assert_eq!(parse(&buf).unwrap_err(), ParseError::BadArguments);
        // Truncated fuse_lk_in.
        let full = lk_bytes(1, 1, 0, 10, wr, 1, 0);
        for cut in [0, 8, 40, full.len() - 1] {
            let buf = request(opcode::SETLKW, &full[..cut]);
            assert_eq!(parse(&buf).unwrap_err(), ParseError::BadArguments, "cut at {cut}");
        }
    }

    #[test]
    fn batch_forget_count_bounded() {
        let arg = FuseBatchForgetIn { count: u32::MAX, dummy: 0 };
        let buf = request(opcode::BATCH_FORGET, arg.as_bytes());
        assert_eq!(parse(&buf).unwrap_err(), ParseError::BadArguments);
    }

    #[test]
    fn unknown_opcode_is_unsupported() {
        let buf = request(9999, b"");
        assert!(matches!(parse(&buf).unwrap().op, Operation::Unsupported { opcode: 9999 }));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small deterministic xorshift fuzz over every opcode.
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for round in 0..20000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 200) as usize;
            let mut args = Vec::with_capacity(len);
            let mut y = x;
            for _ in 0..len {
                y = y.wrapping_mul(6364136223846793005).wrapping_add(1);
                args.push((y >> 56) as u8);
            }
            let mut buf = request(round % 60, &args);
            if round % 3 == 0 {
                buf[32] = (x >> 8) as u8; // total_extlen
            }
            let _ = parse(&buf);
        }
    }
}
