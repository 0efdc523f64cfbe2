//! FUSE over io_uring: one queue per possible CPU, each owned by a thread pinned to that CPU.
//!
//! A queue owns `depth` ring entries. An entry is a 288-byte header (`fuse_uring_req_header`:
//! in/out header, per-opcode argument area, `fuse_uring_ent_in_out`) and a payload buffer,
//! both allocated by the owning thread at start-up and registered with the kernel once
//! (URING_CMD `REGISTER`). The kernel fills an entry with a request and completes its command;
//! the thread answers in the same entry and hands it back with `COMMIT_AND_FETCH`, which also
//! asks for the next request. One loop iteration reaps every ready completion, serves them,
//! and submits all answers in one `io_uring_enter`.
//!
//! The same threads also serve the fallback: when the kernel does not offer FUSE over
//! io_uring, each thread reads requests from its own non-blocking clone of the /dev/fuse fd
//! with io_uring `READ`s and writes the replies with `WRITE`s.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use protocol::abi::{uring as u, FuseInHeader, FuseOutHeader, FuseUringCmdReq, FuseUringEntInOut};
use protocol::dispatch::{Dispatcher, Outcome};
use protocol::request;
use protocol::FileSystem;
use zerocopy::{FromBytes, IntoBytes};

use crate::executor::block_on;

/// A zeroed heap buffer with a chosen alignment, owned by one queue thread.
pub(crate) struct AlignedBox {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBox {
    pub(crate) fn new(len: usize, align: usize) -> AlignedBox {
        let layout = Layout::from_size_align(len.max(1), align).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBox { ptr, layout }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised (zeroed) bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for AlignedBox {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Per-queue counters.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests served by this queue.
    pub requests: AtomicU64,
    /// io_uring_enter calls made by this queue's thread.
    pub submits: AtomicU64,
    /// Completions reaped.
    pub completions: AtomicU64,
}

/// One ring entry: header and payload registered with the kernel.
struct Entry {
    header: AlignedBox,
    payload: AlignedBox,
    iov: [libc::iovec; 2],
    live: bool,
}

const HDR_IN_OUT: usize = 0;
const HDR_OP_IN: usize = u::IN_OUT_HEADER_SZ;
const HDR_ENT: usize = u::IN_OUT_HEADER_SZ + u::OP_IN_OUT_SZ;

/// user_data tag for the shutdown eventfd read.
const WAKE_TAG: u64 = u64::MAX;

/// Builds a FUSE URING_CMD SQE.
fn uring_cmd(cmd_op: u32, qid: u16, commit_id: u64, iov: Option<*const libc::iovec>) -> squeue::Entry128 {
    let req = FuseUringCmdReq { flags: 0, commit_id, qid, padding: [0; 6] };
    let mut cmd = [0u8; 80];
    cmd[..size_of::<FuseUringCmdReq>()].copy_from_slice(req.as_bytes());
    let mut b = opcode::UringCmd80::new(types::Fixed(0), cmd_op).cmd(cmd);
    if let Some(iov) = iov {
        b = b.addr(Some(iov as u64));
    }
    let e = b.build();
    if iov.is_none() {
        return e;
    }
    // io-uring 0.7 has no setter for `len` on UringCmd80; REGISTER needs len = 2 (iovecs).
    // SAFETY: Entry128 is #[repr(C)] over a 64-byte io_uring_sqe and 64 more bytes; `len` is the
    // u32 at byte offset 24 of io_uring_sqe (uapi layout).
    unsafe {
        let mut bytes: [u8; 128] = std::mem::transmute(e);
        bytes[24..28].copy_from_slice(&2u32.to_ne_bytes());
        std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes)
    }
}

/// Pins the calling thread to `cpu`; failure (offline CPU) is only logged.
pub(crate) fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against the set size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::debug!("queue {cpu}: not pinned: {}", io::Error::last_os_error());
        }
    }
}

/// Number of possible CPUs (the kernel makes one FUSE ring queue per possible CPU).
pub fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let mut max = 0usize;
    for part in text.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or("0");
        if let Ok(n) = last.parse::<usize>() {
            max = max.max(n + 1);
        }
    }
    if max == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        max
    }
}

/// Creates a ring, with the cheapest task-running mode the kernel accepts.
pub(crate) fn new_ring(entries: u32) -> io::Result<IoUring<squeue::Entry128, cqueue::Entry>> {
    let mut b = IoUring::<squeue::Entry128, cqueue::Entry>::builder();
    b.setup_single_issuer().setup_defer_taskrun().setup_cqsize(entries * 2);
    match b.build(entries) {
        Ok(r) => Ok(r),
        Err(_) => IoUring::<squeue::Entry128, cqueue::Entry>::builder().setup_cqsize(entries * 2).build(entries),
    }
}

/// Everything one queue thread needs.
pub(crate) struct QueueParams<F> {
    pub qid: usize,
    pub fuse_fd: RawFd,
    pub depth: usize,
    pub payload_size: usize,
    pub dispatcher: Dispatcher<F>,
    pub stats: Arc<QueueStats>,
    pub stop: Arc<AtomicBool>,
    pub wake_fd: RawFd,
}

/// Pushes to the submission queue, submitting first when it is full.
fn push(ring: &mut IoUring<squeue::Entry128, cqueue::Entry>, e: &squeue::Entry128) -> io::Result<()> {
    loop {
        // SAFETY: every buffer an SQE points at is owned by the queue and outlives the operation.
        if unsafe { ring.submission().push(e) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Runs one FUSE-over-io_uring queue until the connection goes away.
pub(crate) fn run_uring_queue<F: FileSystem>(p: QueueParams<F>) -> io::Result<()> {
    pin_to_cpu(p.qid);
    let sq = (p.depth + 2).next_power_of_two() as u32;
    let mut ring = new_ring(sq)?;
    ring.submitter().register_files(&[p.fuse_fd])?;
    let mut entries: Vec<Entry> = (0..p.depth)
        .map(|_| Entry {
            header: AlignedBox::new(u::REQ_HEADER_SZ, 64),
            payload: AlignedBox::new(p.payload_size, 4096),
            iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 2],
            live: true,
        })
        .collect();
    for (i, e) in entries.iter_mut().enumerate() {
        e.iov[0] = libc::iovec { iov_base: e.header.as_mut_ptr().cast(), iov_len: e.header.len() };
        e.iov[1] = libc::iovec { iov_base: e.payload.as_mut_ptr().cast(), iov_len: e.payload.len() };
        let sqe = uring_cmd(u::CMD_REGISTER, p.qid as u16, 0, Some(e.iov.as_ptr())).user_data(i as u64);
        push(&mut ring, &sqe)?;
    }
    let mut wake_buf = [0u8; 8];
    let wake = opcode::Read::new(types::Fd(p.wake_fd), wake_buf.as_mut_ptr(), 8).build().user_data(WAKE_TAG);
    push(&mut ring, &wake.into())?;
    let mut scratch = AlignedBox::new(p.payload_size, 4096);
    let mut live = p.depth;
    let mut ready: Vec<(u64, i32)> = Vec::with_capacity(sq as usize * 2);
    while live > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)) => {}
            Err(e) => return Err(e),
        }
        p.stats.submits.fetch_add(1, Ordering::Relaxed);
        ready.clear();
        ready.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        p.stats.completions.fetch_add(ready.len() as u64, Ordering::Relaxed);
        for &(tag, res) in &ready {
            if tag == WAKE_TAG {
                // Normally the kernel ends a queue by completing its commands with ENOTCONN
                // at unmount; a wake-up with the stop flag set is a forced stop (abort).
                if p.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                let wake =
                    opcode::Read::new(types::Fd(p.wake_fd), wake_buf.as_mut_ptr(), 8).build().user_data(WAKE_TAG);
                push(&mut ring, &wake.into())?;
                continue;
            }
            let i = tag as usize;
            let Some(e) = entries.get_mut(i) else { continue };
            if res < 0 {
                match -res {
                    libc::EAGAIN | libc::EINTR => {
                        // REGISTER before INIT completed, or an interrupted wait: try again.
                        let sqe = uring_cmd(u::CMD_REGISTER, p.qid as u16, 0, Some(e.iov.as_ptr())).user_data(tag);
                        push(&mut ring, &sqe)?;
                    }
                    err => {
                        if err != libc::ENOTCONN && err != libc::ENODEV && err != libc::ECANCELED {
                            log::warn!("queue {} entry {i}: {}", p.qid, io::Error::from_raw_os_error(err));
                        }
                        if e.live {
                            e.live = false;
                            live -= 1;
                        }
                    }
                }
                continue;
            }
            p.stats.requests.fetch_add(1, Ordering::Relaxed);
            let unique = serve_entry(e, &p.dispatcher, &mut scratch);
            let sqe = uring_cmd(u::CMD_COMMIT_AND_FETCH, p.qid as u16, unique, None).user_data(tag);
            push(&mut ring, &sqe)?;
        }
    }
    Ok(())
}

/// Serves the request in `e` and writes the answer into it; returns the commit id.
fn serve_entry<F: FileSystem>(e: &mut Entry, d: &Dispatcher<F>, scratch: &mut AlignedBox) -> u64 {
    let hdr = e.header.as_slice();
    let Ok((inh, _)) = FuseInHeader::read_from_prefix(&hdr[HDR_IN_OUT..]) else { return 0 };
    let Ok((ent, _)) = FuseUringEntInOut::read_from_prefix(&hdr[HDR_ENT..]) else { return 0 };
    let unique = inh.unique;
    let payload_sz = (ent.payload_sz as usize).min(e.payload.len());
    let mut op_in = [0u8; u::OP_IN_OUT_SZ];
    op_in.copy_from_slice(&hdr[HDR_OP_IN..HDR_OP_IN + u::OP_IN_OUT_SZ]);
    let (error, len) = if payload_sz == 0 {
        // Nothing to read in the payload: the reply may be written straight into it.
        match request::parse_split(inh, &op_in, &[]) {
            Ok(req) => match block_on(d.dispatch(&req, e.payload.as_mut_slice())) {
                Outcome::Reply { error, len } => (error, len),
                Outcome::NoReply => (-libc::EIO, 0),
            },
            Err(err) => {
                log::warn!("malformed ring request (unique {unique}): {err}");
                (-libc::EIO, 0)
            }
        }
    } else {
        // The request borrows the payload; the reply goes to scratch and is copied back
        // (such replies are small: entries, write counts, xattr values).
        let out = scratch.as_mut_slice();
        let r = match request::parse_split(inh, &op_in, &e.payload.as_slice()[..payload_sz]) {
            Ok(req) => match block_on(d.dispatch(&req, out)) {
                Outcome::Reply { error, len } => (error, len),
                Outcome::NoReply => (-libc::EIO, 0),
            },
            Err(err) => {
                log::warn!("malformed ring request (unique {unique}): {err}");
                (-libc::EIO, 0)
            }
        };
        if r.1 > 0 {
            e.payload.as_mut_slice()[..r.1].copy_from_slice(&out[..r.1]);
        }
        r
    };
    let oh = FuseOutHeader { len: (size_of::<FuseOutHeader>() + len) as u32, error, unique };
    let ent_out = FuseUringEntInOut { flags: 0, commit_id: unique, payload_sz: len as u32, padding: 0, reserved: 0 };
    let hdr = e.header.as_mut_slice();
    hdr[HDR_IN_OUT..HDR_IN_OUT + u::IN_OUT_HEADER_SZ].fill(0);
    hdr[HDR_IN_OUT..HDR_IN_OUT + size_of::<FuseOutHeader>()].copy_from_slice(oh.as_bytes());
    hdr[HDR_ENT..HDR_ENT + size_of::<FuseUringEntInOut>()].copy_from_slice(ent_out.as_bytes());
    unique
}

/// Wakes queue threads at shutdown.
#[derive(Debug)]
pub(crate) struct Waker {
    pub fd: OwnedFd,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        // SAFETY: eventfd returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        Ok(Waker { fd: unsafe { crate::mount::owned(fd) } })
    }

    /// Wakes `n` queue threads.
    pub(crate) fn wake(&self, n: usize) {
        let one = n as u64;
        // SAFETY: writing 8 bytes from a valid u64.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}
