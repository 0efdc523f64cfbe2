//! Property tests: malformed requests never panic the parser or the dispatcher.
//!
//! Three sources of input, each run through every parsing entry point the transports use
//! (`parse` for /dev/fuse reads, `parse_parts` and `parse_split` for FUSE-over-io_uring ring
//! entries), and every request that parses is then served by a [`Dispatcher`] over two stub
//! file systems: one that answers everything with its default (`ENOSYS`), and one that answers
//! with successful replies of awkward sizes (replies larger than the kernel asked for, more
//! bytes "read" than the buffer holds, out-of-range errno values).
//!
//! - random bytes;
//! - well-formed requests built for every opcode (these must parse, with the fields they were
//!   built from);
//! - well-formed requests then mutated: bytes flipped, truncated or extended, the `len` and
//!   `total_extlen` header fields overwritten, garbage extensions appended.
//!
//! The number of cases per property is proptest's default (256); `PROPTEST_CASES=100000 cargo
//! test --release -p protocol --test parser_props` runs a longer campaign.

use std::ffi::CStr;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use proptest::prelude::*;
use ringfs_protocol::abi::{self, opcode, FuseInHeader};
use ringfs_protocol::dispatch::{Dispatcher, Outcome};
use ringfs_protocol::request::{op_header_size, parse, parse_header, parse_parts, parse_split, Operation, Request};
use ringfs_protocol::*;
use zerocopy::{FromBytes, IntoBytes};

const HEADER: usize = size_of::<FuseInHeader>();

/// Size of the reply buffer the dispatcher gets: a 128 KiB max read plus one page (the
/// documented contract of `Dispatcher::dispatch`).
const OUT: usize = 128 * 1024 + 4096;

/// Every opcode the ABI names, including the ones ringfs does not serve.
const OPCODES: &[u32] = &[
    opcode::LOOKUP,
    opcode::FORGET,
    opcode::GETATTR,
    opcode::SETATTR,
    opcode::READLINK,
    opcode::SYMLINK,
    opcode::MKNOD,
    opcode::MKDIR,
    opcode::UNLINK,
    opcode::RMDIR,
    opcode::RENAME,
    opcode::LINK,
    opcode::OPEN,
    opcode::READ,
    opcode::WRITE,
    opcode::STATFS,
    opcode::RELEASE,
    opcode::FSYNC,
    opcode::SETXATTR,
    opcode::GETXATTR,
    opcode::LISTXATTR,
    opcode::REMOVEXATTR,
    opcode::FLUSH,
    opcode::INIT,
    opcode::OPENDIR,
    opcode::READDIR,
    opcode::RELEASEDIR,
    opcode::FSYNCDIR,
    opcode::GETLK,
    opcode::SETLK,
    opcode::SETLKW,
    opcode::ACCESS,
    opcode::CREATE,
    opcode::INTERRUPT,
    opcode::BMAP,
    opcode::DESTROY,
    opcode::IOCTL,
    opcode::POLL,
    opcode::NOTIFY_REPLY,
    opcode::BATCH_FORGET,
    opcode::FALLOCATE,
    opcode::READDIRPLUS,
    opcode::RENAME2,
    opcode::LSEEK,
    opcode::COPY_FILE_RANGE,
    opcode::SETUPMAPPING,
    opcode::REMOVEMAPPING,
    opcode::SYNCFS,
    opcode::TMPFILE,
    opcode::STATX,
    opcode::COPY_FILE_RANGE_64,
];

/// Runs a future that never waits (the stubs below answer at once) to completion.
fn run<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = TaskContext::from_waker(Waker::noop());
    for _ in 0..1000 {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("a dispatch over a stub file system did not complete");
}

/// A file system that implements nothing: every operation gets the trait's default.
struct Enosys;
impl FileSystem for Enosys {}

/// A file system that says yes to everything, with replies of awkward sizes derived from the
/// request, and sometimes errno values the kernel would not accept.
struct Eager;

fn attr(node: NodeId) -> FileAttr {
    let mut a = FileAttr::new(node.0, libc::S_IFREG | 0o644);
    a.size = node.0;
    a.nlink = 1;
    a
}

fn entry(node: NodeId) -> Entry {
    let t = Duration::from_secs(node.0 % 7);
    Entry::new(NodeId(node.0 | 2), node.0, attr(node), t, t)
}

/// An errno from `seed`: mostly valid, sometimes 0, negative or past 4095.
fn weird_errno(seed: u64) -> Errno {
    match seed % 5 {
        0 => Errno(0),
        1 => Errno(-(seed as i32 & 0xffff)),
        2 => Errno(4096 + (seed as i32 & 0xffff)),
        3 => Errno(i32::MIN),
        _ => Errno(1 + (seed % 4095) as i32),
    }
}

impl FileSystem for Eager {
    async fn lookup(&self, _: &ringfs_protocol::Context, parent: NodeId, name: &CStr) -> Result<Entry> {
        if name.to_bytes().len() % 11 == 3 {
            return Err(weird_errno(parent.0));
        }
        Ok(entry(parent))
    }
    async fn getattr(&self, _: &ringfs_protocol::Context, node: NodeId, _: Option<FileHandle>) -> Result<AttrOut> {
        Ok(AttrOut::new(attr(node), Duration::from_secs(u64::MAX / 2)))
    }
    async fn statx(
        &self,
        _: &ringfs_protocol::Context,
        node: NodeId,
        _: Option<FileHandle>,
        _: u32,
        mask: u32,
    ) -> Result<(StatxAttr, Duration)> {
        let mut sx = StatxAttr::default();
        sx.attr = attr(node);
        sx.mask = mask;
        Ok((sx, Duration::ZERO))
    }
    async fn setattr(&self, _: &ringfs_protocol::Context, node: NodeId, _: &SetAttr) -> Result<AttrOut> {
        Ok(AttrOut::new(attr(node), Duration::ZERO))
    }
    async fn readlink(&self, _: &ringfs_protocol::Context, node: NodeId) -> Result<Vec<u8>> {
        // Sometimes longer than the reply buffer.
        Ok(vec![b'l'; (node.0 % (2 * OUT as u64)) as usize])
    }
    async fn symlink(&self, _: &ringfs_protocol::Context, parent: NodeId, _: &CStr, _: &CStr) -> Result<Entry> {
        Ok(entry(parent))
    }
    async fn mknod(
        &self,
        _: &ringfs_protocol::Context,
        parent: NodeId,
        _: &CStr,
        _: u32,
        _: u32,
        _: u32,
    ) -> Result<Entry> {
        Ok(entry(parent))
    }
    async fn mkdir(&self, _: &ringfs_protocol::Context, parent: NodeId, _: &CStr, _: u32, _: u32) -> Result<Entry> {
        Ok(entry(parent))
    }
    async fn unlink(&self, _: &ringfs_protocol::Context, parent: NodeId, _: &CStr) -> Result<()> {
        Err(weird_errno(parent.0))
    }
    async fn link(&self, _: &ringfs_protocol::Context, node: NodeId, _: NodeId, _: &CStr) -> Result<Entry> {
        Ok(entry(node))
    }
    async fn open(&self, _: &ringfs_protocol::Context, node: NodeId, flags: u32) -> Result<Opened> {
        let mut options = OpenOptions::default();
        options.direct_io = flags & 1 != 0;
        options.backing_id = node.0 as i32;
        Ok(Opened::new(FileHandle(node.0), options))
    }
    async fn create(
        &self,
        _: &ringfs_protocol::Context,
        parent: NodeId,
        _: &CStr,
        _: u32,
        _: u32,
        _: u32,
    ) -> Result<(Entry, Opened)> {
        Ok((entry(parent), Opened::new(FileHandle(7), OpenOptions::default())))
    }
    async fn tmpfile(
        &self,
        _: &ringfs_protocol::Context,
        parent: NodeId,
        _: u32,
        _: u32,
        _: u32,
    ) -> Result<(Entry, Opened)> {
        Ok((entry(parent), Opened::new(FileHandle(8), OpenOptions::default())))
    }
    async fn read(
        &self,
        _: &ringfs_protocol::Context,
        _: NodeId,
        _: FileHandle,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        buf.fill(0xa5);
        // Claims more than the buffer holds: the dispatcher must clamp.
        Ok(buf.len() + (offset % 4096) as usize)
    }
    async fn write(
        &self,
        _: &ringfs_protocol::Context,
        _: NodeId,
        _: FileHandle,
        _: u64,
        data: &[u8],
        _: WriteFlags,
    ) -> Result<usize> {
        Ok(data.len() * 2 + 1)
    }
    async fn flush(&self, _: &ringfs_protocol::Context, node: NodeId, _: FileHandle, _: u64) -> Result<()> {
        Err(weird_errno(node.0))
    }
    async fn fsync(&self, _: &ringfs_protocol::Context, _: NodeId, _: FileHandle, _: bool) -> Result<()> {
        Ok(())
    }
    async fn opendir(&self, _: &ringfs_protocol::Context, node: NodeId, _: u32) -> Result<Opened> {
        let mut options = OpenOptions::default();
        options.cache_dir = true;
        Ok(Opened::new(FileHandle(node.0), options))
    }
    async fn readdir(
        &self,
        _: &ringfs_protocol::Context,
        node: NodeId,
        _: FileHandle,
        offset: u64,
        out: &mut DirBuffer<'_>,
    ) -> Result<()> {
        // Fill until the buffer refuses, with names up to 255 bytes.
        for i in 0..100_000u64 {
            let name = vec![b'a' + (i % 26) as u8; 1 + ((node.0 + i) % 255) as usize];
            if !out.add(i + 1, offset.wrapping_add(i + 1), (i % 16) as u32, &name) {
                break;
            }
        }
        Ok(())
    }
    async fn readdirplus(
        &self,
        _: &ringfs_protocol::Context,
        node: NodeId,
        _: FileHandle,
        offset: u64,
        out: &mut DirPlusBuffer<'_>,
    ) -> Result<()> {
        for i in 0..100_000u64 {
            let name = vec![b'A' + (i % 26) as u8; 1 + ((node.0 + i) % 255) as usize];
            if !out.fits(&name) || !out.add(&entry(NodeId(i)), offset.wrapping_add(i + 1), (i % 16) as u32, &name) {
                break;
            }
        }
        Ok(())
    }
    async fn statfs(&self, _: &ringfs_protocol::Context, node: NodeId) -> Result<StatFs> {
        let mut st = StatFs::default();
        st.blocks = node.0;
        st.bsize = u32::MAX;
        st.namelen = 255;
        Ok(st)
    }
    async fn setxattr(&self, _: &ringfs_protocol::Context, _: NodeId, _: &CStr, _: &[u8], _: u32) -> Result<()> {
        Ok(())
    }
    async fn getxattr(&self, _: &ringfs_protocol::Context, node: NodeId, name: &CStr, size: u32) -> Result<XattrReply> {
        // Ignores `size` on purpose: sometimes larger than asked, sometimes larger than `out`.
        let n = (name.to_bytes().len() as u64 * 997 + node.0) % (2 * OUT as u64);
        if size == 0 && node.0 % 2 == 0 {
            return Ok(XattrReply::Size(n as u32));
        }
        Ok(XattrReply::Data(vec![b'v'; n as usize]))
    }
    async fn listxattr(&self, _: &ringfs_protocol::Context, node: NodeId, size: u32) -> Result<XattrReply> {
        Ok(XattrReply::Data(vec![0; (node.0 % (size as u64 + 2)) as usize]))
    }
    async fn removexattr(&self, _: &ringfs_protocol::Context, node: NodeId, _: &CStr) -> Result<()> {
        Err(weird_errno(node.0))
    }
    async fn access(&self, _: &ringfs_protocol::Context, _: NodeId, _: u32) -> Result<()> {
        Ok(())
    }
    async fn fallocate(
        &self,
        _: &ringfs_protocol::Context,
        _: NodeId,
        _: FileHandle,
        _: u64,
        _: u64,
        _: u32,
    ) -> Result<()> {
        Ok(())
    }
    async fn lseek(&self, _: &ringfs_protocol::Context, _: NodeId, _: FileHandle, offset: u64, _: u32) -> Result<u64> {
        Ok(offset.wrapping_mul(3))
    }
    async fn copy_file_range(
        &self,
        _: &ringfs_protocol::Context,
        _: NodeId,
        _: FileHandle,
        _: u64,
        _: NodeId,
        _: FileHandle,
        _: u64,
        _: u64,
        _: u64,
    ) -> Result<u64> {
        Ok(u64::MAX)
    }
}

/// Checks what the dispatcher may answer for any request: a kernel-acceptable errno, a
/// payload that fits the buffer, no payload with an error, no reply only where FUSE has none.
fn check_outcome(req: &Request<'_>, o: Outcome, out_len: usize) {
    match o {
        Outcome::Reply { error, len } => {
            assert!((-4095..=0).contains(&error), "errno {error} out of range for {:?}", req.op);
            assert!(len <= out_len, "reply of {len} bytes for a {out_len}-byte buffer ({:?})", req.op);
            assert!(error == 0 || len == 0, "an error reply with a payload ({:?})", req.op);
        }
        Outcome::NoReply => assert!(
            matches!(req.op, Operation::Forget { .. } | Operation::BatchForget { .. } | Operation::Interrupt { .. }),
            "no reply for {:?}",
            req.op
        ),
    }
}

/// Serves a parsed request with both stubs and checks the outcomes.
fn serve(req: &Request<'_>, out: &mut [u8]) {
    let enosys = Dispatcher::new(Arc::new(Enosys));
    let o = run(enosys.dispatch(req, out));
    check_outcome(req, o, out.len());
    if let Outcome::Reply { error: 0, .. } = o {
        // Only what the dispatcher answers itself (or the trait defaults to Ok) may succeed.
        assert!(
            matches!(req.op, Operation::Destroy | Operation::Release { .. } | Operation::Releasedir { .. }),
            "the ENOSYS stub succeeded at {:?}",
            req.op
        );
    }
    let eager = Dispatcher::new(Arc::new(Eager));
    let o = run(eager.dispatch(req, out));
    check_outcome(req, o, out.len());
}

/// Every entry point on one buffer: `parse`, then `parse_parts`/`parse_split` with the header
/// the buffer starts with (whatever its `len` says) and every way of splitting the rest.
fn parse_everywhere(buf: &[u8], split: usize, out: &mut [u8]) -> bool {
    let whole = parse(buf);
    if let Ok(req) = &whole {
        assert_eq!(req.header.len as usize, buf.len(), "parse accepted a length mismatch");
        serve(req, out);
    }
    if let Ok(header) = parse_header(buf) {
        let body = &buf[HEADER..];
        if let Ok(req) = parse_parts(header, body) {
            serve(&req, out);
        }
        let at = split % (body.len() + 1);
        let (op_in, payload) = body.split_at(at);
        if let Ok(req) = parse_split(header, op_in, payload) {
            serve(&req, out);
        }
    } else {
        assert!(buf.len() < HEADER, "parse_header refused {} bytes", buf.len());
    }
    whole.is_ok()
}

/// The recipe of a well-formed request.
#[derive(Clone, Debug)]
struct Spec {
    opcode: u32,
    unique: u64,
    nodeid: u64,
    ids: (u32, u32, u32),
    op_in: Vec<u8>,
    name1: Vec<u8>,
    name2: Vec<u8>,
    data: Vec<u8>,
    groups: Option<Vec<u32>>,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(1u8..=255, 0..300)
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![9 => prop::sample::select(OPCODES), 1 => any::<u32>()],
        any::<u64>(),
        any::<u64>(),
        any::<(u32, u32, u32)>(),
        prop::collection::vec(any::<u8>(), 128),
        name(),
        name(),
        prop::collection::vec(any::<u8>(), 0..2048),
        prop::option::of(prop::collection::vec(any::<u32>(), 0..40)),
    )
        .prop_map(|(opcode, unique, nodeid, ids, op_in, name1, name2, data, groups)| Spec {
            opcode,
            unique,
            nodeid,
            ids,
            op_in,
            name1,
            name2,
            data,
            groups,
        })
}

fn with_nul(v: &[u8]) -> Vec<u8> {
    let mut v = v.to_vec();
    v.push(0);
    v
}

/// Encodes `s` the way the kernel does: header, fixed arguments, names/data, extensions.
fn encode(s: &Spec) -> Vec<u8> {
    use opcode as o;
    let mut op_in = s.op_in.clone();
    op_in.resize(op_header_size(s.opcode), 0);
    let mut data = s.data.clone();
    match s.opcode {
        o::WRITE => {
            let mut w = abi::FuseWriteIn::read_from_bytes(&op_in).expect("fuse_write_in size");
            w.size = data.len() as u32;
            op_in = w.as_bytes().to_vec();
        }
        o::SETXATTR => op_in[..4].copy_from_slice(&(data.len() as u32).to_ne_bytes()),
        o::IOCTL => {
            let mut i = abi::FuseIoctlIn::read_from_bytes(&op_in).expect("fuse_ioctl_in size");
            i.in_size = data.len() as u32;
            op_in = i.as_bytes().to_vec();
        }
        o::GETLK | o::SETLK | o::SETLKW => {
            // A lock type the kernel sends (F_RDLCK/F_WRLCK/F_UNLCK) and a range that does not
            // end before it starts; the rest stays random.
            let mut l = abi::FuseLkIn::read_from_bytes(&op_in).expect("fuse_lk_in size");
            l.lk.type_ %= 3;
            if l.lk.end < l.lk.start {
                std::mem::swap(&mut l.lk.start, &mut l.lk.end);
            }
            op_in = l.as_bytes().to_vec();
        }
        o::BATCH_FORGET => {
            data.truncate(data.len() / 16 * 16);
            let mut b = abi::FuseBatchForgetIn::read_from_bytes(&op_in).expect("fuse_batch_forget_in size");
            b.count = (data.len() / 16) as u32;
            op_in = b.as_bytes().to_vec();
        }
        _ => {}
    }
    let args: Vec<u8> = match s.opcode {
        o::LOOKUP
        | o::MKNOD
        | o::MKDIR
        | o::UNLINK
        | o::RMDIR
        | o::LINK
        | o::CREATE
        | o::GETXATTR
        | o::REMOVEXATTR
        | o::TMPFILE => with_nul(&s.name1),
        o::SYMLINK | o::RENAME | o::RENAME2 => [with_nul(&s.name1), with_nul(&s.name2)].concat(),
        o::SETXATTR => [with_nul(&s.name1), data].concat(),
        o::WRITE | o::BATCH_FORGET | o::IOCTL => data,
        _ => Vec::new(),
    };
    let mut ext = Vec::new();
    if let Some(groups) = &s.groups {
        let body = 8 + 4 + 4 * groups.len();
        let size = body.div_ceil(8) * 8;
        ext.extend_from_slice(abi::FuseExtHeader { size: size as u32, type_: abi::flags::EXT_GROUPS }.as_bytes());
        ext.extend_from_slice(&(groups.len() as u32).to_ne_bytes());
        for g in groups {
            ext.extend_from_slice(&g.to_ne_bytes());
        }
        ext.resize(size, 0);
    }
    let header = FuseInHeader {
        len: (HEADER + op_in.len() + args.len() + ext.len()) as u32,
        opcode: s.opcode,
        unique: s.unique,
        nodeid: s.nodeid,
        uid: s.ids.0,
        gid: s.ids.1,
        pid: s.ids.2,
        total_extlen: (ext.len() / 8) as u16,
        padding: 0,
    };
    [header.as_bytes(), &op_in, &args, &ext].concat()
}

/// One change to a valid request.
#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    SetLen(u32),
    SetExtlen(u16),
    SetOpcode(u32),
    AppendExt { size: u32, type_: u32, body: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        any::<u32>().prop_map(Mutation::SetLen),
        any::<u16>().prop_map(Mutation::SetExtlen),
        prop::sample::select(OPCODES).prop_map(Mutation::SetOpcode),
        (
            any::<u32>(),
            prop_oneof![Just(abi::flags::EXT_GROUPS), any::<u32>()],
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(size, type_, body)| Mutation::AppendExt { size, type_, body }),
    ]
}

/// Applies `m`; keeps the header's `len` true to the buffer unless the mutation is about it.
fn mutate(buf: &mut Vec<u8>, m: &Mutation) {
    let fix_len = |buf: &mut Vec<u8>| {
        if buf.len() >= 4 {
            let n = buf.len() as u32;
            buf[..4].copy_from_slice(&n.to_ne_bytes());
        }
    };
    match m {
        Mutation::Flip { at, xor } => {
            if !buf.is_empty() {
                let i = at % buf.len();
                buf[i] ^= xor;
            }
        }
        Mutation::Truncate { at } => {
            buf.truncate(at % (buf.len() + 1));
            fix_len(buf);
        }
        Mutation::Insert { at, bytes } => {
            let i = at % (buf.len() + 1);
            buf.splice(i..i, bytes.iter().copied());
            fix_len(buf);
        }
        Mutation::SetLen(n) => {
            if buf.len() >= 4 {
                buf[..4].copy_from_slice(&n.to_ne_bytes());
            }
        }
        Mutation::SetExtlen(n) => {
            if buf.len() >= 34 {
                buf[32..34].copy_from_slice(&n.to_ne_bytes());
            }
        }
        Mutation::SetOpcode(op) => {
            if buf.len() >= 8 {
                buf[4..8].copy_from_slice(&op.to_ne_bytes());
            }
        }
        Mutation::AppendExt { size, type_, body } => {
            buf.extend_from_slice(abi::FuseExtHeader { size: *size, type_: *type_ }.as_bytes());
            buf.extend_from_slice(body);
            let pad = buf.len().div_ceil(8) * 8;
            buf.resize(pad, 0);
            if buf.len() >= 34 {
                let ext = u16::from_ne_bytes([buf[32], buf[33]]);
                let added = (8 + body.len()).div_ceil(8) as u16;
                buf[32..34].copy_from_slice(&ext.wrapping_add(added).to_ne_bytes());
            }
            fix_len(buf);
        }
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..4096), split in any::<usize>()) {
        let mut out = vec![0u8; OUT];
        parse_everywhere(&buf, split, &mut out);
    }

    /// Random bytes behind a header whose `len` is right: gets past the length check into
    /// every opcode's argument parsing.
    #[test]
    fn random_arguments_never_panic(
        op in prop_oneof![9 => prop::sample::select(OPCODES), 1 => any::<u32>()],
        extlen in prop_oneof![3 => Just(0u16), 1 => any::<u16>()],
        nodeid in any::<u64>(),
        args in prop::collection::vec(any::<u8>(), 0..4096),
        split in any::<usize>(),
    ) {
        let header = FuseInHeader {
            len: (HEADER + args.len()) as u32,
            opcode: op,
            unique: 1,
            nodeid,
            total_extlen: extlen,
            ..Default::default()
        };
        let buf = [header.as_bytes(), &args].concat();
        let mut out = vec![0u8; OUT];
        parse_everywhere(&buf, split, &mut out);
    }

    /// Well-formed requests parse, carry what they were built from, and are served.
    #[test]
    fn valid_requests_parse_and_dispatch(s in spec()) {
        let buf = encode(&s);
        let mut out = vec![0u8; OUT];
        let req = parse(&buf).unwrap_or_else(|e| panic!("a well-formed request failed to parse: {e} ({s:?})"));
        prop_assert_eq!(req.header.opcode, s.opcode);
        prop_assert_eq!(req.unique(), s.unique);
        prop_assert_eq!(req.header.nodeid, s.nodeid);
        let groups: Vec<u32> = req.supp_groups().collect();
        prop_assert_eq!(groups, s.groups.clone().unwrap_or_default());
        match &req.op {
            Operation::Lookup { name } | Operation::Unlink { name } | Operation::Rmdir { name } => {
                prop_assert_eq!(name.to_bytes(), &s.name1[..]);
            }
            Operation::Rename { name, newname, .. } | Operation::Symlink { name, target: newname } => {
                prop_assert_eq!(name.to_bytes(), &s.name1[..]);
                prop_assert_eq!(newname.to_bytes(), &s.name2[..]);
            }
            Operation::Write { data, .. } => prop_assert_eq!(*data, &s.data[..]),
            Operation::BatchForget { forgets } => prop_assert_eq!(forgets.len(), s.data.len() / 16),
            _ => {}
        }
        // The ring-entry form of the same request parses the same way.
        let (header, _) = FuseInHeader::read_from_prefix(&buf).expect("header");
        let body = &buf[HEADER..];
        let split = parse_parts(header, body).expect("parse_parts of a well-formed request");
        prop_assert_eq!(split.header.opcode, s.opcode);
        serve(&req, &mut out);
    }

    /// Well-formed requests, then damaged: never a panic, and whatever still parses is served.
    #[test]
    fn mutated_requests_never_panic(
        s in spec(),
        mutations in prop::collection::vec(mutation(), 1..6),
        split in any::<usize>(),
    ) {
        let mut buf = encode(&s);
        for m in &mutations {
            mutate(&mut buf, m);
        }
        let mut out = vec![0u8; OUT];
        parse_everywhere(&buf, split, &mut out);
    }
}

/// A request whose reply buffer is smaller than the contract asks must not panic either (a
/// transport bug should cost an error reply, not the server).
#[test]
fn small_reply_buffers_never_panic() {
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(&(spec(), 0usize..256), |(s, out_len)| {
            let buf = encode(&s);
            let req = parse(&buf).expect("well-formed");
            let mut out = vec![0u8; out_len];
            serve(&req, &mut out);
            Ok(())
        })
        .unwrap();
}
