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
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use ringfs_protocol::abi::{uring as u, FuseInHeader, FuseOutHeader, FuseUringCmdReq, FuseUringEntInOut};
use ringfs_protocol::dispatch::{Dispatcher, Outcome};
use ringfs_protocol::request;
use ringfs_protocol::FileSystem;

use crate::task_cell::TaskCell;
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

/// Per-queue counters. Only the queue's own thread writes them, with a plain load and store
/// ([`bump`]: no atomic read-modify-write on the request path); readers load them.
#[derive(Debug, Default)]
#[non_exhaustive]
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

/// Adds `n` to a counter that only the calling thread writes (a [`QueueStats`] field written
/// by its queue's thread): a relaxed load and store, which readers on other threads see
/// whole, never torn, and at most a little late.
#[inline]
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

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
    /// The request being served: its future, polled on the queue thread until it completes,
    /// in room the slot keeps from one request to the next.
    task: TaskCell,
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
/// Bit set in user_data of a Dev slot's WRITE (the reply); without it, its READ.
const WRITE_BIT: u64 = 1 << 62;

/// Tasks whose waker was called, to be polled by the owning queue, and the doorbell that wakes
/// that queue when the waker runs on another thread.
///
/// A waker called on the queue's own thread (a completion reaped by the loop) only records the
/// task: the loop polls everything recorded before it sleeps. A waker called elsewhere (a
/// channel filled by another thread, a timer thread, a network future) also rings the doorbell,
/// an eventfd the queue always has a READ armed on, so a queue asleep in `io_uring_enter` wakes
/// up. `rung` makes that one write per sleep, not one per wake-up: the queue clears it before it
/// takes the list, so a waker that finds it set knows the queue will still see its entry.
struct ReadyList {
    list: Mutex<Vec<usize>>,
    bell: OwnedFd,
    rung: AtomicBool,
    /// The owning thread's [`thread_mark`].
    owner: usize,
}

thread_local! {
    static THREAD_MARK: u8 = const { 0 };
}

/// A number unique to the calling thread while it lives (the address of a thread-local),
/// cheaper than `std::thread::current().id()`, which clones the thread's shared handle (an
/// atomic increment and decrement) on every call.
fn thread_mark() -> usize {
    THREAD_MARK.with(|m| std::ptr::from_ref(m) as usize)
}

impl ReadyList {
    fn new() -> io::Result<ReadyList> {
        use rustix::event::{eventfd, EventfdFlags};
        Ok(ReadyList {
            list: Mutex::new(Vec::new()),
            bell: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            rung: AtomicBool::new(false),
            owner: thread_mark(),
        })
    }

    fn push(&self, idx: usize) {
        if let Ok(mut v) = self.list.lock() {
            v.push(idx);
        }
        if thread_mark() != self.owner && !self.rung.swap(true, Ordering::SeqCst) {
            let _ = rustix::io::write(&self.bell, &1u64.to_ne_bytes());
        }
    }

    fn is_empty(&self) -> bool {
        self.list.lock().map(|v| v.is_empty()).unwrap_or(true)
    }

    fn take_into(&self, out: &mut Vec<usize>) {
        if let Ok(mut v) = self.list.lock() {
            out.append(&mut v);
        }
    }
}

struct EntryWaker {
    idx: usize,
    ready: Arc<ReadyList>,
}

impl Wake for EntryWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.idx);
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
        use rustix::event::{eventfd, EventfdFlags};
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(InterruptInbox { uniques: Mutex::new(Vec::new()), wake_fd: Some(fd) })
    }

    /// Queues an interrupt and wakes the queue.
    pub(crate) fn push(&self, unique: u64) {
        if let Ok(mut v) = self.uniques.lock() {
            if v.len() < 4096 {
                v.push(unique);
            }
        }
        if let Some(fd) = &self.wake_fd {
            let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
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
    let mut set = rustix::thread::CpuSet::new();
    // Beyond the set's size the set stays empty and the kernel refuses it (as CPU_SET did).
    if cpu < rustix::thread::CpuSet::MAX_CPU {
        set.set(cpu);
    }
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        log::debug!("queue {cpu}: not pinned: {}", io::Error::from(e));
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

/// Everything one queue thread needs.
pub(crate) struct QueueParams<F> {
    pub qid: usize,
    pub channel: QueueChannel,
    pub depth: usize,
    /// Keep polling this long after the last request before sleeping (see [`SessionConfig`]).
    pub busy_poll: std::time::Duration,
    pub payload_size: usize,
    pub dispatcher: Dispatcher<F>,
    pub stats: Arc<QueueStats>,
    pub stop: Arc<AtomicBool>,
    pub wake_fd: RawFd,
    pub interrupts: Arc<Vec<InterruptInbox>>,
    /// Per-opcode counters of requests read from /dev/fuse (classic channel only).
    pub dev_counts: Arc<super::session::SessionStats>,
    /// Called when the queue cannot go on (ring failure): aborts the connection.
    pub on_failure: Arc<dyn Fn() + Send + Sync>,
    /// Set (with a wake-up through `wake_fd`) when the queue must hand over: stop taking
    /// requests, answer those taken, then end (see [`Queue::start_drain`]).
    pub drain: Arc<AtomicBool>,
    /// When given, the queue registers its ring entries (or opens its reads) and then waits
    /// for the gate to open before it handles any request (a server taking over a mount
    /// registers while the previous one still serves).
    pub gate: Option<Arc<Gate>>,
    /// Hand-over of an io_uring queue: asks the next server to register a batch of entries on
    /// this queue after this queue's last reply, then writes 1 to the given eventfd (see
    /// [`Queue::start_drain`]). None: the queue waits for quiet instead.
    pub register_round: Option<Arc<RoundHook>>,
}

/// Asks the next server for a registration round on queue `qid`; returns the eventfd that
/// becomes readable when the round is done (None: no round possible).
pub type RoundHook = dyn Fn(usize) -> Option<RawFd> + Send + Sync;

/// A one-shot gate: the queues of a server taking over a mount wait on it until it is opened
/// (or closed for good). While they wait, io_uring queues answer registration rounds: the
/// previous server writes a queue's `round` eventfd, the queue registers a few more entries and
/// writes its `done` eventfd (see `Queue::start_round`).
#[derive(Debug)]
pub struct Gate {
    state: std::sync::Mutex<Option<bool>>,
    cond: std::sync::Condvar,
    /// Written when the gate opens or closes (so a queue can poll it with its round eventfd).
    opened: OwnedFd,
    /// Queues that have registered their entries (io_uring) or started (classic channel).
    arrived: AtomicUsize,
    /// Per queue: (round asked, round done) eventfds.
    rounds: Vec<(OwnedFd, OwnedFd)>,
}

fn blocking_eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?)
}

fn eventfd_write(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writing 8 bytes from a valid u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

impl Gate {
    /// A closed gate for `queues` queues.
    pub fn new(queues: usize) -> io::Result<Gate> {
        Ok(Gate {
            state: std::sync::Mutex::new(None),
            cond: std::sync::Condvar::new(),
            opened: blocking_eventfd()?,
            arrived: AtomicUsize::new(0),
            rounds: (0..queues).map(|_| Ok((blocking_eventfd()?, blocking_eventfd()?))).collect::<io::Result<_>>()?,
        })
    }

    /// Queues that reached the gate.
    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::Acquire)
    }

    /// The (round asked, round done) eventfds of every queue, to hand to the previous server.
    pub fn round_fds(&self) -> Vec<RawFd> {
        self.rounds.iter().flat_map(|(a, d)| [a.as_raw_fd(), d.as_raw_fd()]).collect()
    }

    /// Opens the gate (`true`: serve) or closes it for good (`false`: end).
    pub fn open(&self, serve: bool) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(serve);
        eventfd_write(self.opened.as_raw_fd());
        self.cond.notify_all();
    }

    fn state(&self) -> Option<bool> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the gate is opened or closed; true when opened.
    pub fn wait(&self) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(serve) = *g {
                return serve;
            }
            g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until the gate opens or closes (`Some`), or a registration round is asked of
    /// queue `qid` (`None`; the request is consumed).
    fn wait_or_round(&self, qid: usize) -> Option<bool> {
        loop {
            if let Some(serve) = self.state() {
                return Some(serve);
            }
            let Some((asked, _)) = self.rounds.get(qid) else { return Some(self.wait()) };
            let mut pfd = [
                libc::pollfd { fd: asked.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.opened.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two valid pollfds.
            unsafe { libc::poll(pfd.as_mut_ptr(), 2, 1000) };
            if pfd[0].revents & libc::POLLIN != 0 {
                let mut v = 0u64;
                // SAFETY: reading 8 bytes into a valid u64.
                unsafe { libc::read(asked.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
                return None;
            }
        }
    }

    fn round_done(&self, qid: usize) {
        if let Some((_, done)) = self.rounds.get(qid) {
            eventfd_write(done.as_raw_fd());
        }
    }
}

/// `IORING_ENTER_GETEVENTS`: an enter that runs deferred task work.
const IORING_ENTER_GETEVENTS: u32 = 1;

/// A draining FUSE-over-io_uring queue ends after this long without a new request and with
/// none in flight (the kernel has no way to take ring entries back but closing the ring, so
/// the queue waits until requests have moved to the next server's entries; see
/// docs/reliability.md, "Live upgrade").
const RING_QUIET: std::time::Duration = std::time::Duration::from_millis(3);

/// A queue's ring.
type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

/// user_data tag for the interrupt inbox's eventfd read.
const INBOX_TAG: u64 = u64::MAX - 2;
/// user_data tag for the doorbell's eventfd read (a task woken on another thread).
const BELL_TAG: u64 = u64::MAX - 3;
/// user_data tag for the eventfd read that ends a registration round (io_uring hand-over).
const ROUND_TAG: u64 = u64::MAX - 4;

/// Registration rounds a draining io_uring queue asks for before it falls back to waiting for
/// quiet.
const MAX_ROUNDS: u32 = 64;

/// Entries a server taking over adds to a queue in registration rounds, in queue depths.
const MAX_EXTRA_DEPTHS: usize = 16;

/// What a completion on a queue's ring is about: one kind per source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Completion {
    /// The session's stop eventfd was written.
    Stop,
    /// INTERRUPTs were routed to this queue's inbox.
    Interrupts,
    /// A task was woken on another thread.
    Doorbell,
    /// The next server finished a registration round (hand-over).
    Round,
    /// A cancellation finished (its target completes on its own).
    Cancelled,
    /// A backing operation of the reactor completed: (operation slot, result).
    Io(usize, i32),
    /// A classic-channel reply was written: (slot, result).
    Written(usize, i32),
    /// A slot's receive operation completed, a request or a channel error: (slot, result).
    Received(usize, i32),
}

impl Completion {
    fn decode(tag: u64, res: i32) -> Completion {
        match tag {
            WAKE_TAG => Completion::Stop,
            INBOX_TAG => Completion::Interrupts,
            BELL_TAG => Completion::Doorbell,
            ROUND_TAG => Completion::Round,
            crate::io::CANCEL_TAG => Completion::Cancelled,
            t if t & crate::io::IO_TAG != 0 => Completion::Io((t & !crate::io::IO_TAG) as usize, res),
            t if t & WRITE_BIT != 0 => Completion::Written((t & !WRITE_BIT) as usize, res),
            t => Completion::Received(t as usize, res),
        }
    }
}

/// Pushes to the submission queue, submitting first when it is full; counts what the kernel
/// owes a completion for.
fn push(ring: &mut Ring, outstanding: &mut usize, e: &squeue::Entry128) -> io::Result<()> {
    loop {
        // SAFETY: every buffer an SQE points at is owned by the queue (slots, eventfd buffers:
        // kept until every completion is reaped or leaked, see `Queue::drop`) or by an operation
        // of the reactor (kept until its completion, see `io::OpMem`).
        if unsafe { ring.submission().push(e) }.is_ok() {
            *outstanding += 1;
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Tolerated results of `io_uring_enter`: try again next round.
fn transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::ETIME))
}

/// One queue's state. The loop ([`Queue::serve`]) is: submit what is pending, wait for a
/// completion, act on each completion by its [`Completion`] kind, poll the woken tasks, repeat.
/// Dropping a queue cancels what is in flight, waits (bounded) for the kernel to finish with the
/// queue's memory, closes the ring, and only then frees the buffers (or leaks them, when the
/// kernel did not let go in time).
struct Queue<'p, F> {
    p: &'p QueueParams<F>,
    ring: ManuallyDrop<Ring>,
    /// SQEs pushed whose completion has not been reaped.
    outstanding: usize,
    slots: Vec<Slot>,
    ready: Arc<ReadyList>,
    wake_buf: Box<[u8; 8]>,
    inbox_buf: Box<[u8; 8]>,
    bell_buf: Box<[u8; 8]>,
    /// Interrupts whose request this queue has not seen (yet, or ever), with their arrival.
    early_interrupts: Vec<(u64, std::time::Instant)>,
    dispatcher: Rc<Dispatcher<F>>,
    /// Slots whose channel still works.
    live: usize,
    /// When this queue last finished a request (busy polling).
    last_request: std::time::Instant,
    /// A request finished since busy polling last looked; `last_request` is then the
    /// dispatcher's clock reading at its end (no reading of its own).
    replied: bool,
    /// The clock reading after the last wait for completions.
    batch_time: std::time::Instant,
    /// Handing over: no new receive is armed (classic channel), or the queue ends once quiet
    /// (io_uring).
    draining: bool,
    /// When the last request arrived (io_uring drain).
    last_arrival: std::time::Instant,
    /// io_uring drain: a registration round of the next server is under way.
    round_pending: bool,
    /// io_uring drain: a request arrived since the round was asked for.
    dirty: bool,
    /// io_uring drain: rounds asked for so far.
    rounds: u32,
    /// io_uring drain: where the end of a round is read.
    round_buf: Box<[u8; 8]>,
}

/// Switches the calling thread to SCHED_FIFO (priority 1) or back to SCHED_OTHER.
fn set_realtime(on: bool) {
    let param = libc::sched_param { sched_priority: i32::from(on) };
    let policy = if on { libc::SCHED_FIFO } else { libc::SCHED_OTHER };
    // SAFETY: pid 0 is the calling thread; param is valid.
    unsafe { libc::sched_setscheduler(0, policy, &param) };
}

/// A slot with its buffers for queue `p` (index `idx`).
fn new_slot<F>(p: &QueueParams<F>, idx: usize, ready: &Arc<ReadyList>) -> Slot {
    Slot {
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
        task: TaskCell::new(),
        unique: 0,
        opcode: 0,
        pid: 0,
        interrupted: false,
        waker: Waker::from(Arc::new(EntryWaker { idx, ready: ready.clone() })),
    }
}

impl<'p, F: FileSystem> Queue<'p, F> {
    /// Adds `n` ring entries and registers them (a registration round of a server taking over).
    fn add_entries(&mut self, n: usize) -> io::Result<()> {
        for _ in 0..n {
            let i = self.slots.len();
            let mut slot = new_slot(self.p, i, &self.ready);
            if let SlotBufs::Ring { header, payload, iov, .. } = &mut slot.bufs {
                iov[0] = libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() };
                iov[1] = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
            }
            self.slots.push(slot);
            self.live += 1;
            self.arm(i)?;
        }
        self.ring.submit()?;
        Ok(())
    }

    fn new(p: &'p QueueParams<F>) -> io::Result<Queue<'p, F>> {
        let sq = ((p.depth + 4) * 2).next_power_of_two() as u32;
        let ring = new_ring(sq)?;
        if let QueueChannel::Ring { fuse_fd } = &p.channel {
            ring.submitter().register_files(&[*fuse_fd])?;
        }
        let ready = Arc::new(ReadyList::new()?);
        let slots = (0..p.depth).map(|idx| new_slot(p, idx, &ready)).collect();
        crate::io::install();
        let mut q = Queue {
            p,
            ring: ManuallyDrop::new(ring),
            outstanding: 0,
            slots,
            ready,
            wake_buf: Box::new([0; 8]),
            inbox_buf: Box::new([0; 8]),
            bell_buf: Box::new([0; 8]),
            early_interrupts: Vec::new(),
            last_request: std::time::Instant::now(),
            replied: false,
            batch_time: std::time::Instant::now(),
            dispatcher: Rc::new(p.dispatcher.clone()),
            live: p.depth,
            draining: false,
            last_arrival: std::time::Instant::now(),
            round_pending: false,
            dirty: false,
            rounds: 0,
            round_buf: Box::new([0; 8]),
        };
        for i in 0..p.depth {
            if let SlotBufs::Ring { header, payload, iov, .. } = &mut q.slots[i].bufs {
                iov[0] = libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: header.len() };
                iov[1] = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
            }
            q.arm(i)?;
        }
        q.arm_eventfd(Completion::Stop)?;
        q.arm_eventfd(Completion::Interrupts)?;
        q.arm_eventfd(Completion::Doorbell)?;
        Ok(q)
    }

    /// (Re)arms slot `i`'s receive operation: REGISTER of the ring entry, or a READ of the
    /// queue's /dev/fuse clone.
    fn arm(&mut self, i: usize) -> io::Result<()> {
        if self.draining && matches!(self.p.channel, QueueChannel::Dev { .. }) {
            // Handing over: this slot reads no more.
            self.kill_slot(i);
            return Ok(());
        }
        let sqe: squeue::Entry128 = match (&mut self.slots[i].bufs, &self.p.channel) {
            (SlotBufs::Ring { iov, .. }, QueueChannel::Ring { .. }) => {
                uring_cmd(u::CMD_REGISTER, self.p.qid as u16, 0, Some(iov.as_ptr())).user_data(i as u64)
            }
            (SlotBufs::Dev { input, .. }, QueueChannel::Dev { fd, .. }) => {
                let len = input.len() as u32;
                let read = opcode::Read::new(types::Fd(fd.as_raw_fd()), input.as_mut_ptr(), len).offset(u64::MAX);
                read.build().user_data(i as u64).into()
            }
            _ => return Ok(()),
        };
        self.push(&sqe)
    }

    /// Arms the 8-byte READ of one of the queue's eventfds (stop, interrupt inbox, doorbell).
    fn arm_eventfd(&mut self, kind: Completion) -> io::Result<()> {
        let (fd, buf, tag) = match kind {
            Completion::Stop => (self.p.wake_fd, &mut self.wake_buf, WAKE_TAG),
            Completion::Interrupts => {
                let fd = self.p.interrupts[self.p.qid].wake_fd.as_ref().map_or(-1, |f| f.as_raw_fd());
                (fd, &mut self.inbox_buf, INBOX_TAG)
            }
            Completion::Doorbell => (self.ready.bell.as_raw_fd(), &mut self.bell_buf, BELL_TAG),
            _ => return Ok(()),
        };
        if fd < 0 {
            return Ok(());
        }
        let sqe = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8).build().user_data(tag);
        self.push(&sqe.into())
    }

    /// Serves requests until the channel is gone (`Ok`) or the ring fails (`Err`).
    fn serve(&mut self) -> io::Result<()> {
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(self.ring.params().cq_entries() as usize);
        let mut woken: Vec<usize> = Vec::with_capacity(self.p.depth);
        while self.live > 0 {
            // Everything the tasks queued since the last round goes out with this submit.
            for sqe in crate::io::with(|r| r.take_pending()).unwrap_or_default() {
                self.push(&sqe)?;
            }
            // Personalities the tasks asked for: registered now, when no task holds the ring;
            // their tasks are woken, so this round does not sleep.
            crate::io::serve_personalities(&self.ring.submitter());
            let want = if self.ready.is_empty() && !crate::io::personality_asked() { 1 } else { 0 };
            if want == 1 && !self.draining {
                self.busy_poll()?;
            }
            let waited = if self.draining && matches!(self.p.channel, QueueChannel::Ring { .. }) {
                // The replies (COMMIT_AND_FETCH) go out before anything else.
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(e) if transient(&e) => {}
                    Err(e) => return Err(e),
                }
                let idle = self.slots.iter().all(|s| s.task.is_empty());
                match self.p.register_round.clone() {
                    Some(hook) if self.rounds < MAX_ROUNDS => {
                        if idle && !self.round_pending {
                            self.start_round(&hook)?;
                        }
                    }
                    _ => {
                        if self.ring_quiet() && self.ring_empty_after_tw() {
                            log::warn!(
                                "queue {}: handed over after a quiet spell ({} registration rounds)",
                                self.p.qid,
                                self.rounds
                            );
                            return Ok(());
                        }
                    }
                }
                let ts = types::Timespec::from(std::time::Duration::from_millis(1));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            } else {
                self.ring.submit_and_wait(want)
            };
            match waited {
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(e) => return Err(e),
            }
            // One reading per batch, after the wait: the time of the requests' arrival (drain)
            // and the start from which inline backing calls are timed (`io::run_inline`), so
            // the wait itself is never charged to a call.
            self.batch_time = ringfs_protocol::stats::clock();
            bump(&self.p.stats.submits, 1);
            if self.ring.submission().is_empty() {
                // Every SQE that may name a personality given back is submitted (the kernel
                // took its credentials then): the personalities can go.
                crate::io::release_personalities(&self.ring.submitter());
            }
            let mut round_ended = false;
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            self.outstanding -= cqes.len().min(self.outstanding);
            bump(&self.p.stats.completions, cqes.len() as u64);
            for &(tag, res) in &cqes {
                match Completion::decode(tag, res) {
                    Completion::Stop => {
                        // Normally the kernel ends a queue (ENOTCONN/ENODEV completions at
                        // unmount); a wake-up with the stop flag set is a forced stop (abort).
                        if self.p.stop.load(Ordering::Acquire) {
                            return Ok(());
                        }
                        if self.p.drain.load(Ordering::Acquire) {
                            self.start_drain()?;
                        } else {
                            self.arm_eventfd(Completion::Stop)?;
                        }
                    }
                    Completion::Interrupts => self.on_interrupts()?,
                    Completion::Doorbell => {
                        // Cleared before the list is taken below (see `ReadyList`).
                        self.ready.rung.store(false, Ordering::SeqCst);
                        self.arm_eventfd(Completion::Doorbell)?;
                    }
                    Completion::Round => {
                        self.round_pending = false;
                        round_ended = true;
                    }
                    Completion::Cancelled => {}
                    Completion::Io(op, res) => {
                        crate::io::with(|r| r.complete(op, res));
                    }
                    Completion::Written(i, res) => self.on_written(i, res)?,
                    Completion::Received(i, res) => {
                        if self.on_received(i, res)? {
                            woken.push(i);
                        }
                    }
                }
            }
            self.ready.take_into(&mut woken);
            for i in woken.drain(..) {
                self.poll_task(i)?;
            }
            if round_ended && !self.dirty && self.slots.iter().all(|s| s.task.is_empty()) && self.ring_empty_after_tw()
            {
                // The next server's entries came after our last reply and no request reached
                // us since: the kernel sends this queue's requests to them now.
                log::debug!("queue {}: handed over after {} registration rounds", self.p.qid, self.rounds);
                return Ok(());
            }
            if crate::io::take_injected_failure() {
                return Err(io::Error::other("failure injected by the file system (test hook)"));
            }
        }
        Ok(())
    }

    /// Hand-over: stop taking requests and end once those taken are answered. Classic channel:
    /// the reads in flight are cancelled (a read that already took a request completes with it
    /// and is served) and no slot reads again; the queue ends when every slot has written its
    /// last reply. FUSE over io_uring: an entry cannot be taken back from the kernel except by
    /// closing the ring, which loses a request dispatched to it meanwhile, so the queue keeps
    /// serving and ends when nothing is in flight and no request came for [`RING_QUIET`] (by
    /// then the kernel sends this queue's requests to the next server's newer entries).
    fn start_drain(&mut self) -> io::Result<()> {
        if self.draining {
            return Ok(());
        }
        self.draining = true;
        self.last_arrival = ringfs_protocol::stats::clock();
        if let QueueChannel::Dev { fd, .. } = &self.p.channel {
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd.as_raw_fd())).all())
                .build()
                .user_data(crate::io::CANCEL_TAG);
            self.push(&cancel.into())?;
        }
        Ok(())
    }

    /// Asks the next server to register a batch of entries on this queue now, after this
    /// queue's last reply: from then on the kernel prefers those entries to ours (it takes the
    /// entry made available last). When the round ends with no request having reached this
    /// queue meanwhile, none can any more (unless every newer entry is busy), and the queue ends.
    fn start_round(&mut self, hook: &Arc<RoundHook>) -> io::Result<()> {
        self.rounds += 1;
        let Some(fd) = hook(self.p.qid) else {
            // No round possible: wait for quiet instead.
            self.rounds = MAX_ROUNDS;
            return Ok(());
        };
        let sqe = opcode::Read::new(types::Fd(fd), self.round_buf.as_mut_ptr(), 8).build().user_data(ROUND_TAG);
        self.dirty = false;
        self.round_pending = true;
        self.push(&sqe.into())?;
        self.ring.submit()?;
        Ok(())
    }

    /// Runs the kernel's deferred task work (a request it gave one of our entries becomes a
    /// completion only then); true when no completion is waiting afterwards.
    fn ring_empty_after_tw(&mut self) -> bool {
        // SAFETY: io_uring_enter with no submissions, no wait and no argument.
        let ran = unsafe { self.ring.submitter().enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None) };
        ran.is_ok() && self.ring.completion().is_empty() && !self.ring.submission().taskrun()
    }

    /// A draining io_uring queue with nothing in flight and no request for [`RING_QUIET`].
    fn ring_quiet(&self) -> bool {
        self.slots.iter().all(|s| s.task.is_empty()) && self.last_arrival.elapsed() >= RING_QUIET
    }

    /// Busy polling: after a request, watch the rings in user space for a while before
    /// sleeping (see [`SessionConfig`](crate::SessionConfig)).
    fn busy_poll(&mut self) -> io::Result<()> {
        let poll = self.p.busy_poll;
        // Only the queue that served the last request polls: the caller of a storm stays on
        // its CPU, hence on this queue, between requests, and a queue that polled whenever any
        // queue was busy spun through the storm beside it (a third of the server's CPU in a
        // single-client cold-LOOKUP storm on 2 vCPUs). A caller that moves to another CPU
        // costs one wake-up there, after which that queue polls.
        if poll.is_zero() {
            return Ok(());
        }
        let last = if std::mem::take(&mut self.replied) {
            // Just replied: the dispatcher's reading at the request's end is recent enough.
            let t = ringfs_protocol::stats::last_reading().unwrap_or_else(ringfs_protocol::stats::clock);
            self.last_request = t;
            t
        } else {
            let last = self.last_request;
            if ringfs_protocol::stats::clock().saturating_duration_since(last) >= poll {
                return Ok(());
            }
            last
        };
        // The replies go out now; a transient failure leaves them for submit_and_wait.
        match self.ring.submit() {
            Ok(_) => {}
            Err(e) if transient(&e) => {}
            Err(e) => return Err(e),
        }
        loop {
            if self.ring.submission().taskrun() || !self.ring.completion().is_empty() || !self.ready.is_empty() {
                bump(&self.p.stats.polled, 1);
                return Ok(());
            }
            if ringfs_protocol::stats::clock().saturating_duration_since(last) >= poll {
                return Ok(());
            }
            // Gives the CPU to a runnable task (the caller) if any.
            rustix::thread::sched_yield();
        }
    }

    /// INTERRUPTs arrived in the inbox: cancel the requests this queue serves.
    fn on_interrupts(&mut self) -> io::Result<()> {
        for unique in self.p.interrupts[self.p.qid].take() {
            match self.slots.iter().position(|s| !s.task.is_empty() && s.unique == unique) {
                Some(i) if honours_interrupt(&self.slots[i]) => self.interrupt_slot(i)?,
                Some(_) => {}
                None => self.early_interrupts.push((unique, std::time::Instant::now())),
            }
        }
        self.early_interrupts.retain(|(_, t)| t.elapsed() < std::time::Duration::from_secs(2));
        self.arm_eventfd(Completion::Interrupts)
    }

    /// Cancels the backing operations of the request in slot `i` (the kernel asked to interrupt
    /// it). Operations complete with ECANCELED, which the request then answers as EINTR; a
    /// request with nothing in flight finishes normally.
    fn interrupt_slot(&mut self, i: usize) -> io::Result<()> {
        self.slots[i].interrupted = true;
        crate::io::with(|r| r.mark_interrupted(i));
        for op in crate::io::with(|r| r.ops_of(i)).unwrap_or_default() {
            let sqe = opcode::AsyncCancel::new(crate::io::IO_TAG | op as u64).build().user_data(crate::io::CANCEL_TAG);
            self.push(&sqe.into())?;
        }
        Ok(())
    }

    /// A classic reply went out (or the request was gone: ENOENT): read the next one.
    fn on_written(&mut self, i: usize, res: i32) -> io::Result<()> {
        if res < 0 && res != -libc::ENOENT && res != -libc::ENODEV {
            log::warn!("queue {}: writing a reply: {}", self.p.qid, io::Error::from_raw_os_error(-res));
        }
        if res == -libc::ENODEV {
            self.kill_slot(i);
            Ok(())
        } else {
            self.arm(i)
        }
    }

    fn kill_slot(&mut self, i: usize) {
        if let Some(s) = self.slots.get_mut(i) {
            if s.live {
                s.live = false;
                self.live -= 1;
            }
        }
    }

    /// A slot's receive operation completed; true when a task was started for it.
    fn on_received(&mut self, i: usize, res: i32) -> io::Result<bool> {
        if i >= self.slots.len() {
            return Ok(false);
        }
        if res < 0 {
            match -res {
                libc::EAGAIN | libc::EINTR | libc::ENOENT => self.arm(i)?,
                // The connection is gone (unmounted, or aborted: by fusectl, by another queue
                // that failed): no request can be answered any more, so the queue ends now
                // rather than when its in-flight tasks finish (a file system may take minutes).
                // Dropping the queue drops those tasks, whose backing I/O is then cancelled.
                libc::ENOTCONN | libc::ENODEV | libc::ECONNABORTED => {
                    for k in 0..self.slots.len() {
                        self.kill_slot(k);
                    }
                }
                err => {
                    if err != libc::ECANCELED {
                        log::warn!("queue {} slot {i}: {}", self.p.qid, io::Error::from_raw_os_error(err));
                    }
                    self.kill_slot(i);
                }
            }
            return Ok(false);
        }
        if self.draining {
            // Only a hand-over watches arrivals.
            self.last_arrival = self.batch_time;
            self.dirty = true;
        }
        let s = &mut self.slots[i];
        match start_task(s, res as usize, &self.dispatcher, self.p) {
            Started::Task => {
                // A new request in this slot: nothing of an earlier one's interrupt carries over.
                crate::io::with(|r| r.clear_interrupted(i));
                if let Some(k) = self.early_interrupts.iter().position(|(u, _)| *u == s.unique) {
                    self.early_interrupts.swap_remove(k);
                    s.interrupted = honours_interrupt(s);
                    if s.interrupted {
                        crate::io::with(|r| r.mark_interrupted(i));
                    }
                }
                Ok(true)
            }
            // Classic channel: FORGET and the like need no reply; INTERRUPT was routed.
            Started::Nothing => self.arm(i).map(|_| false),
        }
    }

    /// Polls slot `i`'s task; when it finishes, sends its reply. A panic in the file system
    /// becomes EIO for that request (counted and logged); the queue goes on.
    fn poll_task(&mut self, i: usize) -> io::Result<()> {
        let s = &mut self.slots[i];
        if s.task.is_empty() {
            return Ok(());
        }
        crate::io::with(|r| r.current = Some(i));
        let mut cx = Context::from_waker(&s.waker);
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| s.task.poll(&mut cx)));
        crate::io::with(|r| r.current = None);
        let (error, len) = match polled {
            Ok(None | Some(Poll::Pending)) => return Ok(()),
            Ok(Some(Poll::Ready(r))) => r,
            Err(panic) => {
                self.p.dev_counts.panics.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "queue {}: the file system panicked serving {} (unique {}): {}; answered EIO",
                    self.p.qid,
                    ringfs_protocol::abi::opcode::name(s.opcode),
                    s.unique,
                    panic_message(&*panic)
                );
                (-libc::EIO, 0)
            }
        };
        // A panicked task is dropped here too: its in-flight operations go to the reactor, which
        // cancels them and keeps their memory until they complete.
        if std::panic::catch_unwind(AssertUnwindSafe(|| s.task.clear())).is_err() {
            log::error!("queue {}: dropping a request's future panicked", self.p.qid);
        }
        bump(&self.p.stats.requests, 1);
        // The caller is about to be woken: its next request may follow at once (busy polling).
        self.replied = true;
        let error = if s.interrupted && error == -libc::ECANCELED { -libc::EINTR } else { error };
        s.interrupted = false;
        crate::io::with(|r| r.clear_interrupted(i));
        let sqe: squeue::Entry128 = match finish_slot(s, error, len) {
            Finish::Commit(unique) => {
                uring_cmd(u::CMD_COMMIT_AND_FETCH, self.p.qid as u16, unique, None).user_data(i as u64)
            }
            Finish::Write(ptr, n) => {
                let QueueChannel::Dev { fd, .. } = &self.p.channel else { return Ok(()) };
                let sqe = opcode::Write::new(types::Fd(fd.as_raw_fd()), ptr, n as u32).offset(u64::MAX).build();
                sqe.user_data(i as u64 | WRITE_BIT).into()
            }
            Finish::Rearm => return self.arm(i),
        };
        self.push(&sqe)
    }
}

impl<F> Queue<'_, F> {
    fn push(&mut self, e: &squeue::Entry128) -> io::Result<()> {
        push(&mut self.ring, &mut self.outstanding, e)
    }

    /// Cancels everything in flight and waits up to `limit` for the kernel to complete it;
    /// true when nothing is outstanding any more.
    fn drain(&mut self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut pending = crate::io::with(|r| r.take_pending()).unwrap_or_default();
        let cancel_all = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build();
        pending.push(cancel_all.user_data(crate::io::CANCEL_TAG).into());
        for sqe in &pending {
            if self.push(sqe).is_err() {
                return false;
            }
        }
        while self.outstanding > 0 {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let ts = types::Timespec::from((deadline - now).min(std::time::Duration::from_millis(50)));
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(_) => return false,
            }
            let done: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            self.outstanding -= done.len().min(self.outstanding);
            for (tag, res) in done {
                if let Completion::Io(op, res) = Completion::decode(tag, res) {
                    crate::io::with(|r| r.complete(op, res));
                }
            }
        }
        true
    }
}

impl<F> Drop for Queue<'_, F> {
    fn drop(&mut self) {
        // Tasks first: the operations they have in flight move to the reactor.
        for s in &mut self.slots {
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| s.task.clear()));
        }
        // A ring queue that handed over has its entries registered with the kernel, which gives
        // them back only when the ring goes away (the exit of the thread that registered them
        // does not cancel them: an entry left so would take requests that then fail with
        // ECANCELED). So the ring is closed now, and the kernel cancels the entries in the
        // ring's exit work; the registration rounds put the next server's entries before ours,
        // so none of ours is chosen meanwhile. The buffers are kept (leaked): nothing waits for
        // the kernel to let go of them.
        let handed_over = self.draining && matches!(self.p.channel, QueueChannel::Ring { .. });
        if handed_over {
            // SAFETY: the ring is dropped exactly once, here, and not used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.ring) };
            crate::io::uninstall(false);
            std::mem::forget(std::mem::take(&mut self.slots));
            for b in [&mut self.wake_buf, &mut self.inbox_buf, &mut self.bell_buf, &mut self.round_buf] {
                std::mem::forget(std::mem::replace(b, Box::new([0; 8])));
            }
            return;
        }
        let clean = self.drain(DRAIN_LIMIT);
        // SAFETY: the ring is dropped exactly once, here, and not used afterwards; it goes
        // before the buffers it may write into.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
        crate::io::uninstall(clean);
        if !clean {
            log::warn!(
                "queue {}: the kernel still held {} operations after the ring was cancelled; their buffers are leaked",
                self.p.qid,
                self.outstanding
            );
            std::mem::forget(std::mem::take(&mut self.slots));
            for b in [&mut self.wake_buf, &mut self.inbox_buf, &mut self.bell_buf] {
                std::mem::forget(std::mem::replace(b, Box::new([0; 8])));
            }
        }
    }
}

/// The text of a panic payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// How long a stopping queue waits for the kernel to give back its buffers.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs one queue (FUSE over io_uring, or the classic channel read through io_uring) until the
/// connection goes away. An `Err` means the queue could not go on (its ring failed, or its
/// loop panicked): the caller must abort the connection, or the requests the kernel routes to
/// this queue would wait forever.
pub(crate) fn run_queue<F: FileSystem>(p: QueueParams<F>) -> io::Result<()> {
    pin_to_cpu(p.qid);
    let ring = matches!(p.channel, QueueChannel::Ring { .. });
    if let (Some(gate), false) = (&p.gate, ring) {
        // Classic channel: a read armed now would take a request from the previous server.
        gate.arrived.fetch_add(1, Ordering::AcqRel);
        if !gate.wait() {
            return Ok(());
        }
    }
    let mut q = Queue::new(&p)?;
    if let (Some(gate), true) = (&p.gate, ring) {
        // The entries are registered now (the kernel may queue requests on them: they wait
        // here until the gate opens).
        q.ring.submit()?;
        gate.arrived.fetch_add(1, Ordering::AcqRel);
        // A round must register before the caller the previous server just answered (often on
        // this CPU) sends its next request: while waiting here the thread runs real-time, so its
        // wake-up preempts that caller. Best effort (refused without CAP_SYS_NICE).
        set_realtime(true);
        let waited = loop {
            match gate.wait_or_round(p.qid) {
                Some(serve) => break Ok(serve),
                None => {
                    // Registered after the previous server's last reply on this queue: these
                    // entries come first now (see `Queue::start_round`).
                    // As many as the queue's depth (callers that may arrive at once), up to a
                    // bound on what the rounds of one hand-over add.
                    let n = if q.slots.len() < p.depth * (1 + MAX_EXTRA_DEPTHS) { p.depth } else { 0 };
                    if let Err(e) = q.add_entries(n) {
                        break Err(e);
                    }
                    gate.round_done(p.qid);
                }
            }
        };
        set_realtime(false);
        if !waited? {
            q.draining = true;
            drop(q);
            return Ok(());
        }
    }
    let served = std::panic::catch_unwind(AssertUnwindSafe(|| q.serve()));
    let result = match served {
        Ok(r) => r,
        Err(panic) => Err(io::Error::other(format!("queue loop panicked: {}", panic_message(&*panic)))),
    };
    if result.is_err() {
        // The kernel completes this queue's ring entries only when the connection ends.
        (p.on_failure)();
    }
    drop(q);
    result
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
    s.opcode == ringfs_protocol::abi::opcode::SETLKW || caller_gives_up(s.pid)
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
            s.task.set(move || async move {
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
            });
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
            if h.opcode == ringfs_protocol::abi::opcode::INTERRUPT {
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
            s.task.set(move || async move {
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
                        let no_reply = matches!(
                            h.opcode,
                            ringfs_protocol::abi::opcode::FORGET | ringfs_protocol::abi::opcode::BATCH_FORGET
                        );
                        log::warn!(
                            "malformed {} request (unique {}): {err}",
                            ringfs_protocol::abi::opcode::name(h.opcode),
                            h.unique
                        );
                        if no_reply {
                            (1, 0)
                        } else {
                            (-libc::EIO, 0)
                        }
                    }
                }
            });
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
        use rustix::event::{eventfd, EventfdFlags};
        Ok(StopSignal { fd: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::SEMAPHORE)? })
    }

    /// Wakes `n` queue threads.
    pub(crate) fn wake(&self, n: usize) {
        let _ = rustix::io::write(&self.fd, &(n as u64).to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bell_count(r: &ReadyList) -> u64 {
        // Non-blocking eventfd: EAGAIN (0 here) when it was never rung.
        let mut v = [0u8; 8];
        let _ = rustix::io::read(&r.bell, &mut v);
        u64::from_ne_bytes(v)
    }

    #[test]
    fn wakeups_on_the_owner_thread_do_not_ring() {
        let r = ReadyList::new().unwrap();
        r.push(3);
        r.push(4);
        assert_eq!(bell_count(&r), 0);
        let mut out = Vec::new();
        r.take_into(&mut out);
        assert_eq!(out, vec![3, 4]);
        assert!(r.is_empty());
    }

    #[test]
    fn wakeups_from_other_threads_ring_once_per_sleep() {
        let r = Arc::new(ReadyList::new().unwrap());
        let r2 = r.clone();
        std::thread::spawn(move || {
            r2.push(1);
            r2.push(2);
        })
        .join()
        .unwrap();
        assert_eq!(bell_count(&r), 1, "two wake-ups, one ring");
        // The queue clears the flag, then takes the list: the next wake-up rings again.
        r.rung.store(false, Ordering::SeqCst);
        let mut out = Vec::new();
        r.take_into(&mut out);
        assert_eq!(out, vec![1, 2]);
        let r2 = r.clone();
        std::thread::spawn(move || r2.push(5)).join().unwrap();
        assert_eq!(bell_count(&r), 1);
    }

    #[test]
    fn completions_decode_by_kind() {
        assert_eq!(Completion::decode(WAKE_TAG, 8), Completion::Stop);
        assert_eq!(Completion::decode(INBOX_TAG, 8), Completion::Interrupts);
        assert_eq!(Completion::decode(BELL_TAG, 8), Completion::Doorbell);
        assert_eq!(Completion::decode(crate::io::CANCEL_TAG, 0), Completion::Cancelled);
        assert_eq!(Completion::decode(crate::io::IO_TAG | 7, 42), Completion::Io(7, 42));
        assert_eq!(Completion::decode(WRITE_BIT | 3, 16), Completion::Written(3, 16));
        assert_eq!(Completion::decode(5, -libc::ENODEV), Completion::Received(5, -libc::ENODEV));
    }
}
