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
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use protocol::abi::{uring as u, FuseInHeader, FuseOutHeader, FuseUringCmdReq, FuseUringEntInOut};
use protocol::dispatch::{Dispatcher, Outcome};
use protocol::request;
use protocol::FileSystem;
use zerocopy::{FromBytes, IntoBytes};

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
    /// Times a brief poll after a request found new work without sleeping.
    pub polled: AtomicU64,
}

/// A request being served: its future, polled on the queue thread until it completes.
type Task = Pin<Box<dyn Future<Output = (i32, usize)>>>;

/// Where a slot's requests come from.
enum SlotBufs {
    /// A FUSE-over-io_uring ring entry: header and payload registered with the kernel.
    Ring {
        header: AlignedBox,
        payload: AlignedBox,
        /// Where replies go for requests that read their input from `payload`.
        scratch: AlignedBox,
        iov: [libc::iovec; 2],
        /// The reply was written to `scratch` and must be copied into `payload`.
        via_scratch: bool,
    },
    /// A classic-channel read slot: a READ of the queue's /dev/fuse clone lands in `input`;
    /// the reply (out header + payload) is built in `output` and written with a WRITE.
    Dev { input: AlignedBox, output: AlignedBox, reply_len: usize },
}

/// One slot of a queue: its buffers and the request it is serving.
struct Slot {
    bufs: SlotBufs,
    live: bool,
    task: Option<Task>,
    unique: u64,
    opcode: u32,
    /// Thread id of the caller (from the request header; 0 if outside our pid namespace).
    pid: u32,
    interrupted: bool,
    waker: Waker,
}

/// Scratch size: the largest reply to a request that carries payload input is an xattr value
/// (at most XATTR_SIZE_MAX = 64 KiB).
const SCRATCH_SIZE: usize = 64 * 1024 + 4096;

const HDR_IN_OUT: usize = 0;
const HDR_OP_IN: usize = u::IN_OUT_HEADER_SZ;
const HDR_ENT: usize = u::IN_OUT_HEADER_SZ + u::OP_IN_OUT_SZ;

/// user_data tag for the queue's wake-up eventfd read.
const WAKE_TAG: u64 = u64::MAX;
/// user_data tag for cancellations (their own completions are ignored).
const CANCEL_TAG: u64 = u64::MAX - 1;
/// Bit set in user_data of a Dev slot's WRITE (the reply); without it, its READ.
const WRITE_BIT: u64 = 1 << 62;

/// Entries whose task was woken, to be polled by the queue loop.
#[derive(Default)]
struct ReadyList(Mutex<Vec<usize>>);

struct EntryWaker {
    idx: usize,
    ready: Arc<ReadyList>,
}

impl Wake for EntryWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Ok(mut v) = self.ready.0.lock() {
            v.push(self.idx);
        }
    }
}

/// Requests the kernel asked to interrupt, routed to every queue (the one serving the request
/// acts on it; the others drop it after a while).
#[derive(Debug, Default)]
pub(crate) struct InterruptInbox {
    uniques: Mutex<Vec<u64>>,
    /// eventfd that wakes the queue thread.
    pub(crate) wake_fd: Option<OwnedFd>,
}

impl InterruptInbox {
    pub(crate) fn new() -> io::Result<InterruptInbox> {
        // SAFETY: eventfd returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        Ok(InterruptInbox { uniques: Mutex::new(Vec::new()), wake_fd: Some(unsafe { crate::mount::owned(fd) }) })
    }

    /// Queues an interrupt and wakes the queue.
    pub(crate) fn push(&self, unique: u64) {
        if let Ok(mut v) = self.uniques.lock() {
            if v.len() < 4096 {
                v.push(unique);
            }
        }
        if let Some(fd) = &self.wake_fd {
            let one = 1u64;
            // SAFETY: writing 8 bytes from a valid u64.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    fn take(&self) -> Vec<u64> {
        self.uniques.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
    }
}

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
    b.setup_single_issuer().setup_defer_taskrun().setup_taskrun_flag().setup_cqsize(entries * 2);
    match b.build(entries) {
        Ok(r) => Ok(r),
        Err(_) => IoUring::<squeue::Entry128, cqueue::Entry>::builder().setup_cqsize(entries * 2).build(entries),
    }
}

/// Which channel a queue serves.
pub(crate) enum QueueChannel {
    /// FUSE over io_uring on the session fd.
    Ring { fuse_fd: RawFd },
    /// The classic channel on this queue's own non-blocking clone of the session fd.
    Dev { fd: OwnedFd, bufsize: usize },
}

/// Shared by a session's queues: a start instant, and when a request last finished on any queue
/// (nanoseconds after it).
pub(crate) type Activity = Arc<(std::time::Instant, AtomicU64)>;

/// Everything one queue thread needs.
pub(crate) struct QueueParams<F> {
    pub qid: usize,
    pub channel: QueueChannel,
    pub depth: usize,
    /// Keep polling this long after the last request before sleeping (see [`SessionConfig`]).
    pub busy_poll: std::time::Duration,
    /// Request activity of all the session's queues (busy polling).
    pub activity: Activity,
    pub payload_size: usize,
    pub dispatcher: Dispatcher<F>,
    pub stats: Arc<QueueStats>,
    pub stop: Arc<AtomicBool>,
    pub wake_fd: RawFd,
    pub interrupts: Arc<Vec<InterruptInbox>>,
    /// Per-opcode counters of requests read from /dev/fuse (classic channel only).
    pub dev_counts: Arc<super::session::SessionStats>,
}

/// Pushes to the submission queue, submitting first when it is full.
fn push(ring: &mut IoUring<squeue::Entry128, cqueue::Entry>, e: &squeue::Entry128) -> io::Result<()> {
    loop {
        // SAFETY: every buffer an SQE points at is owned by the queue (slots) or by a request
        // future that the queue keeps alive until the operation completes.
        if unsafe { ring.submission().push(e) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// The channel-specific half of a slot's life: (re)arming its receive operation.
fn arm(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    ch: &QueueChannel,
    qid: usize,
    i: usize,
    s: &mut Slot,
) -> io::Result<()> {
    match (&mut s.bufs, ch) {
        (SlotBufs::Ring { iov, .. }, QueueChannel::Ring { .. }) => {
            push(ring, &uring_cmd(u::CMD_REGISTER, qid as u16, 0, Some(iov.as_ptr())).user_data(i as u64))
        }
        (SlotBufs::Dev { input, .. }, QueueChannel::Dev { fd, .. }) => {
            let len = input.len() as u32;
            let sqe = opcode::Read::new(types::Fd(fd.as_raw_fd()), input.as_mut_ptr(), len).offset(u64::MAX).build();
            push(ring, &sqe.user_data(i as u64).into())
        }
        _ => Ok(()),
    }
}

/// Runs one queue (FUSE over io_uring, or the classic channel read through io_uring) until the
/// connection goes away.
pub(crate) fn run_queue<F: FileSystem>(p: QueueParams<F>) -> io::Result<()> {
    pin_to_cpu(p.qid);
    let sq = ((p.depth + 4) * 2).next_power_of_two() as u32;
    let mut ring = new_ring(sq)?;
    crate::io::install(ring.as_raw_fd());
    if let QueueChannel::Ring { fuse_fd } = &p.channel {
        ring.submitter().register_files(&[*fuse_fd])?;
    }
    let ready = Arc::new(ReadyList::default());
    let mut slots: Vec<Slot> = (0..p.depth)
        .map(|idx| Slot {
            bufs: match &p.channel {
                QueueChannel::Ring { .. } => SlotBufs::Ring {
                    header: AlignedBox::new(u::REQ_HEADER_SZ, 64),
                    payload: AlignedBox::new(p.payload_size, 4096),
                    scratch: AlignedBox::new(SCRATCH_SIZE, 4096),
                    iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 2],
                    via_scratch: false,
                },
                QueueChannel::Dev { bufsize, .. } => SlotBufs::Dev {
                    input: AlignedBox::new(*bufsize, 4096),
                    output: AlignedBox::new(16 + p.payload_size + 4096, 4096),
                    reply_len: 0,
                },
            },
            live: true,
            task: None,
            unique: 0,
            opcode: 0,
            pid: 0,
            interrupted: false,
            waker: Waker::from(Arc::new(EntryWaker { idx, ready: ready.clone() })),
        })
        .collect();
    for (i, s) in slots.iter_mut().enumerate() {
        if let SlotBufs::Ring { header, payload, iov, .. } = &mut s.bufs {
            iov[0] = libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() };
            iov[1] = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
        }
        arm(&mut ring, &p.channel, p.qid, i, s)?;
    }
    let my_inbox = &p.interrupts[p.qid];
    let inbox_fd = my_inbox.wake_fd.as_ref().map_or(-1, |f| f.as_raw_fd());
    let mut wake_buf = [0u8; 8];
    let mut inbox_buf = [0u8; 8];
    push(
        &mut ring,
        &opcode::Read::new(types::Fd(p.wake_fd), wake_buf.as_mut_ptr(), 8).build().user_data(WAKE_TAG).into(),
    )?;
    let inbox_tag = WAKE_TAG - 2;
    if inbox_fd >= 0 {
        let sqe = opcode::Read::new(types::Fd(inbox_fd), inbox_buf.as_mut_ptr(), 8).build().user_data(inbox_tag);
        push(&mut ring, &sqe.into())?;
    }
    // Interrupts whose request this queue has not seen (yet, or ever), with their arrival.
    let mut early_interrupts: Vec<(u64, std::time::Instant)> = Vec::new();
    let dispatcher = Rc::new(p.dispatcher.clone());
    let mut live = p.depth;
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(sq as usize * 2);
    let mut woken: Vec<usize> = Vec::with_capacity(p.depth);
    let poll = p.busy_poll;
    // When any queue last finished a request, in nanoseconds since `p.activity.0`: the caller of
    // a storm moves between CPUs, so every queue keeps polling while any of them is busy.
    let since_request = |a: &Activity| {
        let now = a.0.elapsed().as_nanos() as u64;
        std::time::Duration::from_nanos(now.saturating_sub(a.1.load(Ordering::Relaxed)))
    };
    while live > 0 {
        // Everything the tasks queued since the last round goes out with this submit.
        let pending = crate::io::with(|r| std::mem::take(&mut r.pending)).unwrap_or_default();
        for sqe in &pending {
            push(&mut ring, sqe)?;
        }
        let have_ready = ready.0.lock().map(|v| !v.is_empty()).unwrap_or(false);
        let want = if have_ready { 0 } else { 1 };
        if want == 1 && !poll.is_zero() && since_request(&p.activity) < poll {
            // The replies go out now; a transient failure leaves them for submit_and_wait below.
            match ring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)) => {}
                Err(e) => return Err(e),
            }
            loop {
                if ring.submission().taskrun()
                    || !ring.completion().is_empty()
                    || ready.0.lock().map(|v| !v.is_empty()).unwrap_or(false)
                {
                    p.stats.polled.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if since_request(&p.activity) >= poll {
                    break;
                }
                // SAFETY: no arguments; gives the CPU to a runnable task (the caller) if any.
                unsafe { libc::sched_yield() };
            }
        }
        match ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)) => {}
            Err(e) => return Err(e),
        }
        p.stats.submits.fetch_add(1, Ordering::Relaxed);
        cqes.clear();
        cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        p.stats.completions.fetch_add(cqes.len() as u64, Ordering::Relaxed);
        for &(tag, res) in &cqes {
            if tag == WAKE_TAG {
                // Normally the kernel ends a queue (ENOTCONN/ENODEV completions at unmount); a
                // wake-up with the stop flag set is a forced stop (abort).
                if p.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                let sqe = opcode::Read::new(types::Fd(p.wake_fd), wake_buf.as_mut_ptr(), 8).build().user_data(WAKE_TAG);
                push(&mut ring, &sqe.into())?;
                continue;
            }
            if tag == inbox_tag {
                for unique in my_inbox.take() {
                    match slots.iter().position(|s| s.task.is_some() && s.unique == unique) {
                        Some(i) if honours_interrupt(&slots[i]) => interrupt_slot(&mut ring, &mut slots[i], i)?,
                        Some(_) => {}
                        None => early_interrupts.push((unique, std::time::Instant::now())),
                    }
                }
                early_interrupts.retain(|(_, t)| t.elapsed() < std::time::Duration::from_secs(2));
                let sqe =
                    opcode::Read::new(types::Fd(inbox_fd), inbox_buf.as_mut_ptr(), 8).build().user_data(inbox_tag);
                push(&mut ring, &sqe.into())?;
                continue;
            }
            if tag == CANCEL_TAG {
                continue;
            }
            if tag & crate::io::IO_TAG != 0 {
                crate::io::with(|r| r.complete((tag & !crate::io::IO_TAG) as usize, res));
                continue;
            }
            let i = (tag & !WRITE_BIT) as usize;
            let Some(s) = slots.get_mut(i) else { continue };
            if tag & WRITE_BIT != 0 {
                // A classic reply went out (or the request was gone: ENOENT): read the next one.
                if res < 0 && res != -libc::ENOENT && res != -libc::ENODEV {
                    log::warn!("queue {}: writing a reply: {}", p.qid, io::Error::from_raw_os_error(-res));
                }
                if res == -libc::ENODEV {
                    s.live = false;
                    live -= 1;
                } else {
                    arm(&mut ring, &p.channel, p.qid, i, s)?;
                }
                continue;
            }
            if res < 0 {
                match -res {
                    libc::EAGAIN | libc::EINTR | libc::ENOENT => arm(&mut ring, &p.channel, p.qid, i, s)?,
                    err => {
                        if err != libc::ENOTCONN && err != libc::ENODEV && err != libc::ECANCELED {
                            log::warn!("queue {} slot {i}: {}", p.qid, io::Error::from_raw_os_error(err));
                        }
                        if s.live {
                            s.live = false;
                            live -= 1;
                        }
                    }
                }
                continue;
            }
            match start_task(s, res as usize, &dispatcher, &p) {
                Started::Task => {
                    if let Some(k) = early_interrupts.iter().position(|(u, _)| *u == s.unique) {
                        early_interrupts.swap_remove(k);
                        s.interrupted = honours_interrupt(s);
                    }
                    woken.push(i);
                }
                // Classic channel: FORGET and the like need no reply; INTERRUPT was routed.
                Started::Nothing => arm(&mut ring, &p.channel, p.qid, i, s)?,
            }
        }
        if let Ok(mut v) = ready.0.lock() {
            woken.append(&mut v);
        }
        for i in woken.drain(..) {
            let s = &mut slots[i];
            let Some(task) = s.task.as_mut() else { continue };
            crate::io::with(|r| r.current = Some(i));
            let mut cx = Context::from_waker(&s.waker);
            let polled = task.as_mut().poll(&mut cx);
            crate::io::with(|r| r.current = None);
            if let Poll::Ready((error, len)) = polled {
                s.task = None;
                p.stats.requests.fetch_add(1, Ordering::Relaxed);
                if !poll.is_zero() {
                    // The caller is about to be woken: its next request may follow at once.
                    p.activity.1.store(p.activity.0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                let error = if s.interrupted && error == -libc::ECANCELED { -libc::EINTR } else { error };
                s.interrupted = false;
                match finish_slot(s, error, len) {
                    Finish::Commit(unique) => {
                        let sqe = uring_cmd(u::CMD_COMMIT_AND_FETCH, p.qid as u16, unique, None).user_data(i as u64);
                        push(&mut ring, &sqe)?;
                    }
                    Finish::Write(ptr, n) => {
                        let QueueChannel::Dev { fd, .. } = &p.channel else { continue };
                        let sqe = opcode::Write::new(types::Fd(fd.as_raw_fd()), ptr, n as u32).offset(u64::MAX).build();
                        push(&mut ring, &sqe.user_data(i as u64 | WRITE_BIT).into())?;
                    }
                    Finish::Rearm => arm(&mut ring, &p.channel, p.qid, i, s)?,
                }
            }
        }
    }
    Ok(())
}

/// Whether an INTERRUPT for the request in `s` is acted on. A signal that the caller handles
/// and returns from (stress-ng's SIGALRM, a shell's SIGCHLD) must not turn a mkdir or a read
/// into EINTR, which local file systems never return for them; so, as in the kernel's own file
/// systems, only a blocking lock wait (SETLKW, where EINTR is the documented answer) is cut
/// short by any signal, and every other request only when its caller gives up on it: the
/// caller is being killed (a fatal signal queues SIGKILL on the thread before the kernel sends
/// INTERRUPT), or it is an io_uring worker whose work was cancelled (another FUSE server, ringfs
/// itself among them, cancelling its backing call). A process stuck on a hung file system can
/// then still die promptly.
fn honours_interrupt(s: &Slot) -> bool {
    s.opcode == protocol::abi::opcode::SETLKW || caller_gives_up(s.pid)
}

/// True when thread `pid` has SIGKILL pending or is an io_uring worker (read from /proc; false
/// when it cannot be read).
fn caller_gives_up(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let kill_bit = 1u64 << (libc::SIGKILL - 1);
    status.lines().any(|l| {
        if let Some(name) = l.strip_prefix("Name:") {
            return name.trim().starts_with("iou-wrk-");
        }
        let Some(v) = l.strip_prefix("SigPnd:").or_else(|| l.strip_prefix("ShdPnd:")) else { return false };
        u64::from_str_radix(v.trim(), 16).is_ok_and(|m| m & kill_bit != 0)
    })
}

/// Cancels the backing operations of the request in slot `i` (the kernel asked to interrupt
/// it). Operations complete with ECANCELED, which the request then answers as EINTR; a request
/// with nothing in flight finishes normally.
fn interrupt_slot(ring: &mut IoUring<squeue::Entry128, cqueue::Entry>, s: &mut Slot, i: usize) -> io::Result<()> {
    s.interrupted = true;
    let ops = crate::io::with(|r| r.ops_of(i)).unwrap_or_default();
    for op in ops {
        let sqe = opcode::AsyncCancel::new(crate::io::IO_TAG | op as u64).build().user_data(CANCEL_TAG);
        push(ring, &sqe.into())?;
    }
    Ok(())
}

enum Started {
    Task,
    Nothing,
}

enum Finish {
    Commit(u64),
    Write(*const u8, usize),
    Rearm,
}

/// Parses the request in slot `s` (`n`: bytes read, classic channel) and creates the task that
/// serves it.
fn start_task<F: FileSystem>(s: &mut Slot, n: usize, d: &Rc<Dispatcher<F>>, p: &QueueParams<F>) -> Started {
    match &mut s.bufs {
        SlotBufs::Ring { header, payload, scratch, via_scratch, .. } => {
            let hdr = header.as_slice();
            let inh = FuseInHeader::read_from_prefix(&hdr[HDR_IN_OUT..]).map(|(h, _)| h).unwrap_or_default();
            let ent = FuseUringEntInOut::read_from_prefix(&hdr[HDR_ENT..]).map(|(h, _)| h).unwrap_or_default();
            s.unique = inh.unique;
            s.opcode = inh.opcode;
            s.pid = inh.pid;
            let payload_sz = (ent.payload_sz as usize).min(payload.len());
            *via_scratch = payload_sz > 0;
            let op_in: *const u8 = hdr[HDR_OP_IN..].as_ptr();
            let payload_ptr: *mut u8 = payload.as_mut_ptr();
            let payload_len = payload.len();
            let scratch_ptr: *mut u8 = scratch.as_mut_ptr();
            let d = d.clone();
            let task = async move {
                // SAFETY: the header, payload and scratch buffers belong to this slot, live as
                // long as the queue, and nothing else touches them until this task completes (the
                // kernel gave the entry to us; it gets it back only with the COMMIT that follows).
                let op_in = unsafe { std::slice::from_raw_parts(op_in, u::OP_IN_OUT_SZ) };
                let (input, out): (&[u8], &mut [u8]) = if payload_sz > 0 {
                    // SAFETY: as above; payload (input) and scratch (output) are distinct.
                    unsafe {
                        (
                            std::slice::from_raw_parts(payload_ptr, payload_sz),
                            std::slice::from_raw_parts_mut(scratch_ptr, SCRATCH_SIZE),
                        )
                    }
                } else {
                    // SAFETY: as above; nothing borrows the payload as input.
                    (&[], unsafe { std::slice::from_raw_parts_mut(payload_ptr, payload_len) })
                };
                match request::parse_split(inh, op_in, input) {
                    Ok(req) => match d.dispatch(&req, out).await {
                        Outcome::Reply { error, len } => (error, len),
                        Outcome::NoReply => (-libc::EIO, 0),
                    },
                    Err(err) => {
                        d.stats().malformed.fetch_add(1, Ordering::Relaxed);
                        log::warn!("malformed ring request (unique {}): {err}", inh.unique);
                        (-libc::EIO, 0)
                    }
                }
            };
            s.task = Some(Box::pin(task));
            Started::Task
        }
        SlotBufs::Dev { input, output, .. } => {
            let data = &input.as_slice()[..n.min(input.len())];
            let Ok(h) = request::parse_header(data) else {
                d.stats().malformed.fetch_add(1, Ordering::Relaxed);
                log::warn!("unreadable request of {n} bytes dropped");
                return Started::Nothing;
            };
            p.dev_counts.record(h.opcode);
            s.unique = h.unique;
            s.opcode = h.opcode;
            s.pid = h.pid;
            if h.opcode == protocol::abi::opcode::INTERRUPT {
                if let Ok(req) = request::parse(data) {
                    if let request::Operation::Interrupt { arg } = req.op {
                        for inbox in p.interrupts.iter() {
                            inbox.push(arg.unique);
                        }
                    }
                }
                return Started::Nothing;
            }
            let in_ptr: *const u8 = input.as_mut_ptr();
            let out_ptr: *mut u8 = output.as_mut_ptr();
            let out_len = output.len();
            let d = d.clone();
            let task = async move {
                // SAFETY: input and output belong to this slot and are untouched by anything
                // else until the task completes and its reply is written.
                let (data, out) = unsafe {
                    (std::slice::from_raw_parts(in_ptr, n), std::slice::from_raw_parts_mut(out_ptr, out_len))
                };
                match request::parse(data) {
                    Ok(req) => match d.dispatch(&req, &mut out[16..]).await {
                        Outcome::Reply { error, len } => (error, len),
                        Outcome::NoReply => (1, 0),
                    },
                    Err(err) => {
                        d.stats().malformed.fetch_add(1, Ordering::Relaxed);
                        let no_reply =
                            matches!(h.opcode, protocol::abi::opcode::FORGET | protocol::abi::opcode::BATCH_FORGET);
                        log::warn!(
                            "malformed {} request (unique {}): {err}",
                            protocol::abi::opcode::name(h.opcode),
                            h.unique
                        );
                        if no_reply {
                            (1, 0)
                        } else {
                            (-libc::EIO, 0)
                        }
                    }
                }
            };
            s.task = Some(Box::pin(task));
            Started::Task
        }
    }
}

/// Writes the reply of a finished request into its slot. `error` 1 means "no reply".
fn finish_slot(s: &mut Slot, error: i32, len: usize) -> Finish {
    let unique = s.unique;
    match &mut s.bufs {
        SlotBufs::Ring { header, payload, scratch, via_scratch, .. } => {
            let (error, len) = if error > 0 { (-libc::EIO, 0) } else { (error, if error != 0 { 0 } else { len }) };
            if *via_scratch && len > 0 {
                let n = len.min(SCRATCH_SIZE).min(payload.len());
                payload.as_mut_slice()[..n].copy_from_slice(&scratch.as_slice()[..n]);
            }
            let oh = FuseOutHeader { len: (size_of::<FuseOutHeader>() + len) as u32, error, unique };
            let ent_out =
                FuseUringEntInOut { flags: 0, commit_id: unique, payload_sz: len as u32, padding: 0, reserved: 0 };
            let hdr = header.as_mut_slice();
            hdr[HDR_IN_OUT..HDR_IN_OUT + u::IN_OUT_HEADER_SZ].fill(0);
            hdr[HDR_IN_OUT..HDR_IN_OUT + size_of::<FuseOutHeader>()].copy_from_slice(oh.as_bytes());
            hdr[HDR_ENT..HDR_ENT + size_of::<FuseUringEntInOut>()].copy_from_slice(ent_out.as_bytes());
            Finish::Commit(unique)
        }
        SlotBufs::Dev { output, reply_len, .. } => {
            if error > 0 {
                return Finish::Rearm;
            }
            let len = if error != 0 { 0 } else { len };
            let oh = FuseOutHeader { len: (size_of::<FuseOutHeader>() + len) as u32, error, unique };
            output.as_mut_slice()[..16].copy_from_slice(oh.as_bytes());
            *reply_len = 16 + len;
            Finish::Write(output.as_mut_ptr(), *reply_len)
        }
    }
}

/// Wakes queue threads at shutdown.
#[derive(Debug)]
pub(crate) struct StopSignal {
    pub fd: OwnedFd,
}

impl StopSignal {
    pub(crate) fn new() -> io::Result<StopSignal> {
        // SAFETY: eventfd returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        Ok(StopSignal { fd: unsafe { crate::mount::owned(fd) } })
    }

    /// Wakes `n` queue threads.
    pub(crate) fn wake(&self, n: usize) {
        let one = n as u64;
        // SAFETY: writing 8 bytes from a valid u64.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}
