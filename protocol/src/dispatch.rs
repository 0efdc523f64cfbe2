//! The dispatcher: a parsed request in, a call of the file system, an encoded reply out.
//!
//! It knows opcodes and reply layouts; the file system knows neither. INIT, INTERRUPT and the
//! channel's life belong to the transport, which handles them before calling [`Dispatcher`].

use std::ffi::CStr;
use std::sync::Arc;
use std::time::Instant;

use crate::abi::{self, FuseGetxattrOut, FuseLseekOut, FuseWriteOut};
use crate::fs::*;
use crate::reply::{self, put};
use crate::request::{Operation, Request};
use crate::stats::{DispatchStats, Started};

/// What the transport must send back for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send a reply: `error` is 0 or a negative errno; `len` payload bytes are at the start of
    /// the output buffer (always 0 on error).
    Reply {
        /// 0 or negative errno.
        error: i32,
        /// Payload length.
        len: usize,
    },
    /// The operation has no reply (FORGET, BATCH_FORGET, INTERRUPT).
    NoReply,
}

impl Outcome {
    fn ok(len: usize) -> Outcome {
        Outcome::Reply { error: 0, len }
    }

    fn err(e: Errno) -> Outcome {
        // Only 1..=4095 are errno values the kernel accepts; anything else is a bug: EIO.
        let e = if (1..4096).contains(&e.0) { e.0 } else { libc::EIO };
        Outcome::Reply { error: -e, len: 0 }
    }
}

/// Calls a [`FileSystem`] for each request, counting what it does.
pub struct Dispatcher<F> {
    fs: Arc<F>,
    stats: Arc<DispatchStats>,
}

impl<F> Clone for Dispatcher<F> {
    fn clone(&self) -> Self {
        Dispatcher { fs: self.fs.clone(), stats: self.stats.clone() }
    }
}

fn context(req: &Request<'_>) -> Context {
    Context { uid: req.header.uid, gid: req.header.gid, pid: req.header.pid }
}

fn fh_if(valid: bool, fh: u64) -> Option<FileHandle> {
    valid.then_some(FileHandle(fh))
}

fn set_time(valid: u32, set: u32, now: u32, sec: u64, nsec: u32) -> Option<SetTime> {
    if valid & now != 0 {
        Some(SetTime::Now)
    } else if valid & set != 0 {
        Some(SetTime::At(Timespec { sec: sec as i64, nsec }))
    } else {
        None
    }
}

/// Converts `fuse_setattr_in`.
pub fn setattr_from(arg: &abi::FuseSetattrIn) -> SetAttr {
    use abi::fattr as f;
    let v = arg.valid;
    SetAttr {
        mode: (v & f::MODE != 0).then_some(arg.mode),
        uid: (v & f::UID != 0).then_some(arg.uid),
        gid: (v & f::GID != 0).then_some(arg.gid),
        size: (v & f::SIZE != 0).then_some(arg.size),
        atime: set_time(v, f::ATIME, f::ATIME_NOW, arg.atime, arg.atimensec),
        mtime: set_time(v, f::MTIME, f::MTIME_NOW, arg.mtime, arg.mtimensec),
        ctime: (v & f::CTIME != 0).then_some(Timespec { sec: arg.ctime as i64, nsec: arg.ctimensec }),
        fh: fh_if(v & f::FH != 0, arg.fh),
        kill_suidgid: v & f::KILL_SUIDGID != 0,
    }
}

fn entry_reply(out: &mut [u8], r: Result<Entry>) -> Outcome {
    match r {
        Ok(e) => put(out, &reply::entry_out(&e)).map_or(Outcome::err(Errno::EIO), Outcome::ok),
        Err(e) => Outcome::err(e),
    }
}

fn attr_reply(out: &mut [u8], r: Result<AttrOut>) -> Outcome {
    match r {
        Ok(a) => put(out, &reply::attr_out(&a)).map_or(Outcome::err(Errno::EIO), Outcome::ok),
        Err(e) => Outcome::err(e),
    }
}

fn empty_reply(r: Result<()>) -> Outcome {
    match r {
        Ok(()) => Outcome::ok(0),
        Err(e) => Outcome::err(e),
    }
}

fn open_reply(out: &mut [u8], r: Result<Opened>) -> Outcome {
    match r {
        Ok(o) => put(out, &reply::open_out(&o)).map_or(Outcome::err(Errno::EIO), Outcome::ok),
        Err(e) => Outcome::err(e),
    }
}

fn create_reply(out: &mut [u8], r: Result<(Entry, Opened)>) -> Outcome {
    match r {
        Ok((e, o)) => {
            let Some(n) = put(out, &reply::entry_out(&e)) else { return Outcome::err(Errno::EIO) };
            match put(&mut out[n..], &reply::open_out(&o)) {
                Some(m) => Outcome::ok(n + m),
                None => Outcome::err(Errno::EIO),
            }
        }
        Err(e) => Outcome::err(e),
    }
}

/// FUSE_IOCTL: the file-attribute ioctls (`lsattr`/`chattr`, `xfs_io -c lsattr`) go to their
/// typed methods; every other command to [`FileSystem::ioctl`] (ENOTTY by default, as on a file
/// system without ioctls).
async fn ioctl<F: FileSystem + ?Sized>(
    fs: &F,
    ctx: &Context,
    node: NodeId,
    arg: &abi::FuseIoctlIn,
    data: &[u8],
    out: &mut [u8],
) -> Outcome {
    use abi::fileattr as fa;
    let fh = FileHandle(arg.fh);
    let dir = arg.flags & abi::flags::IOCTL_DIR != 0;
    let head = std::mem::size_of::<abi::FuseIoctlOut>();
    let out_size = arg.out_size as usize;
    if out.len() < head + out_size {
        // Larger than any reply of the ioctls served here.
        return Outcome::err(Errno::ENOTTY);
    }
    let u32_at = |b: &[u8], i: usize| b.get(i * 4..i * 4 + 4).map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]));
    let payload: Result<Vec<u8>> = match arg.cmd {
        fa::GETFLAGS | fa::GETFLAGS32 => fs.get_inode_flags(ctx, node, fh, dir).await.map(|f| f.to_ne_bytes().to_vec()),
        fa::SETFLAGS | fa::SETFLAGS32 => match u32_at(data, 0) {
            Some(flags) => fs.set_inode_flags(ctx, node, fh, dir, flags).await.map(|()| Vec::new()),
            None => Err(Errno::EINVAL),
        },
        fa::FSGETXATTR => fs.get_fsxattr(ctx, node, fh, dir).await.map(|x| {
            let mut v = Vec::with_capacity(fa::FSXATTR_SIZE);
            for w in [x.xflags, x.extsize, x.nextents, x.projid, x.cowextsize] {
                v.extend_from_slice(&w.to_ne_bytes());
            }
            v.resize(fa::FSXATTR_SIZE, 0);
            v
        }),
        fa::FSSETXATTR => {
            let w = |i| u32_at(data, i);
            match (w(0), w(1), w(2), w(3), w(4)) {
                (Some(xflags), Some(extsize), Some(nextents), Some(projid), Some(cowextsize)) => {
                    let x = FsXattr { xflags, extsize, nextents, projid, cowextsize };
                    fs.set_fsxattr(ctx, node, fh, dir, &x).await.map(|()| Vec::new())
                }
                _ => Err(Errno::EINVAL),
            }
        }
        cmd => {
            let req = Ioctl { fh, cmd, arg: arg.arg, dir, input: data, out_size: arg.out_size };
            fs.ioctl(ctx, node, &req).await
        }
    };
    match payload {
        Ok(v) => {
            // The reply carries exactly `out_size` bytes after fuse_ioctl_out.
            let Some(n) = put(out, &abi::FuseIoctlOut::default()) else { return Outcome::err(Errno::EIO) };
            let body = &mut out[n..n + out_size];
            body.fill(0);
            let k = v.len().min(out_size);
            body[..k].copy_from_slice(&v[..k]);
            Outcome::ok(n + out_size)
        }
        Err(e) => Outcome::err(e),
    }
}

fn xattr_reply(out: &mut [u8], size: u32, r: Result<XattrReply>) -> Outcome {
    match r {
        Ok(XattrReply::Size(n)) => {
            put(out, &FuseGetxattrOut { size: n, padding: 0 }).map_or(Outcome::err(Errno::EIO), Outcome::ok)
        }
        Ok(XattrReply::Data(v)) => {
            if size == 0 {
                let n = v.len() as u32;
                return put(out, &FuseGetxattrOut { size: n, padding: 0 })
                    .map_or(Outcome::err(Errno::EIO), Outcome::ok);
            }
            if v.len() > size as usize || v.len() > out.len() {
                return Outcome::err(Errno::ERANGE);
            }
            out[..v.len()].copy_from_slice(&v);
            Outcome::ok(v.len())
        }
        Err(e) => Outcome::err(e),
    }
}

fn name_ok(name: &CStr) -> bool {
    let b = name.to_bytes();
    !b.is_empty() && !b.contains(&b'/')
}

impl<F: FileSystem> Dispatcher<F> {
    /// Wraps a file system.
    pub fn new(fs: Arc<F>) -> Self {
        Dispatcher { fs, stats: Arc::new(DispatchStats::default()) }
    }

    /// Per-operation counters.
    pub fn stats(&self) -> &Arc<DispatchStats> {
        &self.stats
    }

    /// The file system.
    pub fn fs(&self) -> &Arc<F> {
        &self.fs
    }

    /// Serves one request, writing the reply payload into `out`, which must hold at least the
    /// negotiated max read size plus one page.
    pub async fn dispatch(&self, req: &Request<'_>, out: &mut [u8]) -> Outcome {
        // Two clock readings per request, shared with the in-flight record and (through
        // `stats::last_reading`) with the transport's timing of inline backing calls.
        let start = crate::stats::clock();
        // Ends the in-flight record however the request ends: a reply, a panic in the file
        // system (caught by the queue), or the task dropped at a forced stop.
        let in_flight = InFlightGuard::enter(&self.stats, start);
        let mut outcome = self.serve(req, out).await;
        if req.header.unique & abi::UNIQUE_RESEND != 0 {
            self.stats.resent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Outcome::Reply { error, .. } = outcome {
                if error == -libc::EEXIST || error == -libc::ENOENT {
                    if let Some(o) = self.already_done(req, out, -error).await {
                        self.stats.resent_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        outcome = o;
                    }
                }
            }
        }
        let op = req.header.opcode;
        let (error, len) = match outcome {
            Outcome::Reply { error, len } => (error, len),
            Outcome::NoReply => (0, 0),
        };
        let bytes_in = match &req.op {
            Operation::Write { data, .. } => data.len(),
            _ => 0,
        };
        let bytes_out = if op == abi::opcode::READ { len } else { 0 };
        let end = crate::stats::clock();
        self.stats.record(op, error, end.saturating_duration_since(start), bytes_in, bytes_out);
        drop(in_flight);
        outcome
    }

    /// A resent request (the server that took it first died: crash failover) that failed with
    /// `errno` as its first attempt would have succeeded: if that first attempt had already
    /// taken effect (the name it created exists, the name it removed or renamed is gone), the
    /// answer the caller was owed. `None`: the error stands.
    ///
    /// The check is by outcome, not by proof: another process that created or removed the
    /// same name while the mount was failing over would be taken for the first attempt.
    async fn already_done(&self, req: &Request<'_>, out: &mut [u8], errno: i32) -> Option<Outcome> {
        let fs = &*self.fs;
        let ctx = context(req);
        let node = NodeId(req.header.nodeid);
        match (&req.op, errno) {
            (
                Operation::Mkdir { name, .. }
                | Operation::Mknod { name, .. }
                | Operation::Symlink { name, .. }
                | Operation::Link { name, .. },
                libc::EEXIST,
            ) => Some(entry_reply(out, fs.lookup(&ctx, node, name).await)),
            (Operation::Create { arg, name }, libc::EEXIST) if arg.flags as i32 & libc::O_EXCL != 0 => {
                let flags = arg.flags & !(libc::O_EXCL as u32);
                Some(create_reply(out, fs.create(&ctx, node, name, arg.mode, arg.umask, flags).await))
            }
            (Operation::Unlink { .. } | Operation::Rmdir { .. }, libc::ENOENT) => Some(Outcome::ok(0)),
            (Operation::Rename { newdir, newname, .. }, libc::ENOENT) => {
                // Done if the new name exists (the reference the lookup took is given back).
                let e = fs.lookup(&ctx, NodeId(*newdir), newname).await.ok()?;
                if e.nodeid.0 == 0 {
                    return None;
                }
                fs.forget(e.nodeid, 1);
                Some(Outcome::ok(0))
            }
            _ => None,
        }
    }

    async fn serve(&self, req: &Request<'_>, out: &mut [u8]) -> Outcome {
        let fs = &*self.fs;
        let ctx = context(req);
        let node = NodeId(req.header.nodeid);
        match &req.op {
            Operation::Lookup { name } => {
                if !name_ok(name) {
                    return Outcome::err(Errno::ENOENT);
                }
                // The kernel sends "." and ".." only to decode file handles (export support).
                match name.to_bytes() {
                    b"." => entry_reply(out, fs.lookup_node(&ctx, node).await),
                    b".." => entry_reply(out, fs.lookup_parent(&ctx, node).await),
                    _ => entry_reply(out, fs.lookup(&ctx, node, name).await),
                }
            }
            Operation::Forget { arg } => {
                fs.forget(node, arg.nlookup);
                Outcome::NoReply
            }
            Operation::BatchForget { forgets } => {
                for f in forgets {
                    fs.forget(NodeId(f.nodeid), f.nlookup);
                }
                Outcome::NoReply
            }
            Operation::Getattr { arg } => {
                let fh = fh_if(arg.getattr_flags & abi::flags::GETATTR_FH != 0, arg.fh);
                attr_reply(out, fs.getattr(&ctx, node, fh).await)
            }
            Operation::Setattr { arg } => attr_reply(out, fs.setattr(&ctx, node, &setattr_from(arg)).await),
            Operation::Readlink => match fs.readlink(&ctx, node).await {
                Ok(t) if t.len() <= out.len() => {
                    out[..t.len()].copy_from_slice(&t);
                    Outcome::ok(t.len())
                }
                Ok(_) => Outcome::err(Errno::ENAMETOOLONG),
                Err(e) => Outcome::err(e),
            },
            Operation::Symlink { name, target } => {
                if !name_ok(name) {
                    return Outcome::err(Errno::EINVAL);
                }
                entry_reply(out, fs.symlink(&ctx, node, name, target).await)
            }
            Operation::Mknod { arg, name } => {
                if !name_ok(name) {
                    return Outcome::err(Errno::EINVAL);
                }
                entry_reply(out, fs.mknod(&ctx, node, name, arg.mode, arg.rdev, arg.umask).await)
            }
            Operation::Mkdir { arg, name } => {
                if !name_ok(name) {
                    return Outcome::err(Errno::EINVAL);
                }
                entry_reply(out, fs.mkdir(&ctx, node, name, arg.mode, arg.umask).await)
            }
            Operation::Unlink { name } => empty_reply(fs.unlink(&ctx, node, name).await),
            Operation::Rmdir { name } => empty_reply(fs.rmdir(&ctx, node, name).await),
            Operation::Rename { newdir, flags, name, newname } => {
                if !name_ok(name) || !name_ok(newname) {
                    return Outcome::err(Errno::EINVAL);
                }
                empty_reply(fs.rename(&ctx, node, name, NodeId(*newdir), newname, *flags).await)
            }
            Operation::Link { arg, name } => {
                if !name_ok(name) {
                    return Outcome::err(Errno::EINVAL);
                }
                entry_reply(out, fs.link(&ctx, NodeId(arg.oldnodeid), node, name).await)
            }
            Operation::Open { arg } => {
                if arg.open_flags & abi::flags::OPEN_KILL_SUIDGID != 0 {
                    // HANDLE_KILLPRIV_V2: a truncating open by a caller without CAP_FSETID.
                    let kill = SetAttr { kill_suidgid: true, ..SetAttr::default() };
                    if let Err(e) = fs.setattr(&ctx, node, &kill).await {
                        return Outcome::err(e);
                    }
                }
                open_reply(out, fs.open(&ctx, node, arg.flags).await)
            }
            Operation::Read { arg } => {
                let n = (arg.size as usize).min(out.len());
                match fs.read(&ctx, node, FileHandle(arg.fh), arg.offset, &mut out[..n]).await {
                    Ok(got) => Outcome::ok(got.min(n)),
                    Err(e) => Outcome::err(e),
                }
            }
            Operation::Write { arg, data } => {
                let flags = WriteFlags {
                    cache: arg.write_flags & abi::flags::WRITE_CACHE != 0,
                    kill_suidgid: arg.write_flags & abi::flags::WRITE_KILL_SUIDGID != 0,
                    open_flags: arg.flags,
                };
                match fs.write(&ctx, node, FileHandle(arg.fh), arg.offset, data, flags).await {
                    Ok(n) => {
                        let w = FuseWriteOut { size: n.min(data.len()) as u32, padding: 0 };
                        put(out, &w).map_or(Outcome::err(Errno::EIO), Outcome::ok)
                    }
                    Err(e) => Outcome::err(e),
                }
            }
            Operation::Statfs => match fs.statfs(&ctx, node).await {
                Ok(s) => put(out, &reply::statfs_out(&s)).map_or(Outcome::err(Errno::EIO), Outcome::ok),
                Err(e) => Outcome::err(e),
            },
            Operation::Release { arg } => {
                if arg.release_flags & abi::flags::RELEASE_FLUSH != 0 {
                    let _ = fs.flush(&ctx, node, FileHandle(arg.fh), arg.lock_owner).await;
                }
                if arg.release_flags & abi::flags::RELEASE_FLOCK_UNLOCK != 0 {
                    // The open file's last reference: its flock locks go (FUSE_FLOCK_LOCKS only).
                    let mut unlock = Lock::new(LockKind::Unlock, 0, u64::MAX, ctx.pid);
                    unlock.flock = true;
                    let owner = LockOwner(arg.lock_owner);
                    let _ = fs.setlk(&ctx, node, FileHandle(arg.fh), owner, &unlock, false).await;
                }
                empty_reply(fs.release(&ctx, node, FileHandle(arg.fh), arg.flags).await)
            }
            Operation::Fsync { arg } => {
                let datasync = arg.fsync_flags & abi::flags::FSYNC_FDATASYNC != 0;
                empty_reply(fs.fsync(&ctx, node, FileHandle(arg.fh), datasync).await)
            }
            Operation::Setxattr { flags, name, value, .. } => {
                empty_reply(fs.setxattr(&ctx, node, name, value, *flags).await)
            }
            Operation::Getxattr { arg, name } => {
                xattr_reply(out, arg.size, fs.getxattr(&ctx, node, name, arg.size).await)
            }
            Operation::Listxattr { arg } => xattr_reply(out, arg.size, fs.listxattr(&ctx, node, arg.size).await),
            Operation::Removexattr { name } => empty_reply(fs.removexattr(&ctx, node, name).await),
            Operation::Flush { arg } => empty_reply(fs.flush(&ctx, node, FileHandle(arg.fh), arg.lock_owner).await),
            Operation::Opendir { arg } => open_reply(out, fs.opendir(&ctx, node, arg.flags).await),
            Operation::Readdir { arg } => {
                let n = (arg.size as usize).min(out.len());
                let mut buf = DirBuffer::new(&mut out[..n]);
                match fs.readdir(&ctx, node, FileHandle(arg.fh), arg.offset, &mut buf).await {
                    Ok(()) => Outcome::ok(buf.len()),
                    Err(e) => Outcome::err(e),
                }
            }
            Operation::Readdirplus { arg } => {
                let n = (arg.size as usize).min(out.len());
                let mut buf = DirPlusBuffer::new(&mut out[..n]);
                match fs.readdirplus(&ctx, node, FileHandle(arg.fh), arg.offset, &mut buf).await {
                    Ok(()) => Outcome::ok(buf.len()),
                    Err(e) => Outcome::err(e),
                }
            }
            Operation::Releasedir { arg } => empty_reply(fs.releasedir(&ctx, node, FileHandle(arg.fh)).await),
            Operation::Fsyncdir { arg } => {
                let datasync = arg.fsync_flags & abi::flags::FSYNC_FDATASYNC != 0;
                empty_reply(fs.fsyncdir(&ctx, node, FileHandle(arg.fh), datasync).await)
            }
            Operation::Access { arg } => empty_reply(fs.access(&ctx, node, arg.mask).await),
            Operation::Create { arg, name } => {
                if !name_ok(name) {
                    return Outcome::err(Errno::EINVAL);
                }
                create_reply(out, fs.create(&ctx, node, name, arg.mode, arg.umask, arg.flags).await)
            }
            Operation::Tmpfile { arg } => {
                create_reply(out, fs.tmpfile(&ctx, node, arg.mode, arg.umask, arg.flags).await)
            }
            Operation::Fallocate { arg } => {
                empty_reply(fs.fallocate(&ctx, node, FileHandle(arg.fh), arg.offset, arg.length, arg.mode).await)
            }
            Operation::Lseek { arg } => match fs.lseek(&ctx, node, FileHandle(arg.fh), arg.offset, arg.whence).await {
                Ok(offset) => put(out, &FuseLseekOut { offset }).map_or(Outcome::err(Errno::EIO), Outcome::ok),
                Err(e) => Outcome::err(e),
            },
            Operation::CopyFileRange { arg, wide } => {
                let len = if *wide { arg.len } else { arg.len.min(u32::MAX as u64 & !0xfff) };
                let r = fs
                    .copy_file_range(
                        &ctx,
                        node,
                        FileHandle(arg.fh_in),
                        arg.off_in,
                        NodeId(arg.nodeid_out),
                        FileHandle(arg.fh_out),
                        arg.off_out,
                        len,
                        arg.flags,
                    )
                    .await;
                match r {
                    Ok(n) if *wide => put(out, &abi::FuseCopyFileRangeOut { bytes_copied: n })
                        .map_or(Outcome::err(Errno::EIO), Outcome::ok),
                    Ok(n) => put(out, &FuseWriteOut { size: n.min(u32::MAX as u64) as u32, padding: 0 })
                        .map_or(Outcome::err(Errno::EIO), Outcome::ok),
                    Err(e) => Outcome::err(e),
                }
            }
            Operation::Ioctl { arg, data } => ioctl(fs, &ctx, node, arg, data, out).await,
            Operation::Statx { arg } => {
                let fh = fh_if(arg.getattr_flags & abi::flags::GETATTR_FH != 0, arg.fh);
                match fs.statx(&ctx, node, fh, arg.sx_flags, arg.sx_mask).await {
                    Ok((s, t)) => put(out, &reply::statx_out(&s, t)).map_or(Outcome::err(Errno::EIO), Outcome::ok),
                    Err(e) => Outcome::err(e),
                }
            }
            Operation::Destroy => {
                fs.destroy();
                Outcome::ok(0)
            }
            Operation::Interrupt { .. } => Outcome::NoReply,
            // INIT is the transport's; a second INIT is a protocol error.
            Operation::Init { .. } => Outcome::err(Errno::EIO),
            // Locks are kept by the kernel (POSIX_LOCKS/FLOCK_LOCKS are not negotiated);
            // bmap/syncfs/ioctl/poll/DAX mappings are not served.
            Operation::Getlk { fh, owner, lock } => match fs.getlk(&ctx, node, FileHandle(*fh), *owner, lock).await {
                Ok(l) => put(out, &reply::lk_out(&l)).map_or(Outcome::err(Errno::EIO), Outcome::ok),
                Err(e) => Outcome::err(e),
            },
            Operation::Setlk { fh, owner, lock, sleep } => {
                empty_reply(fs.setlk(&ctx, node, FileHandle(*fh), *owner, lock, *sleep).await)
            }
            Operation::Bmap { .. } | Operation::Syncfs => Outcome::err(Errno::ENOSYS),
            Operation::Unsupported { .. } => Outcome::err(Errno::ENOSYS),
        }
    }
}

/// A request counted in flight until dropped: also when its future is dropped unfinished or
/// the file system panics, so the in-flight gauges never keep a request that is gone.
struct InFlightGuard<'a> {
    stats: &'a DispatchStats,
    started: Option<Started>,
}

impl<'a> InFlightGuard<'a> {
    fn enter(stats: &'a DispatchStats, start: Instant) -> Self {
        InFlightGuard { stats, started: Some(stats.begin_at(start)) }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        // On the thread that began it: a request's future is polled, and dropped, by its queue.
        if let Some(s) = self.started.take() {
            self.stats.end(s);
        }
    }
}
