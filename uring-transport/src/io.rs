//! Backing-file I/O for file systems, issued on the calling queue's io_uring when there is one.
//!
//! On an io_uring queue thread each call becomes one SQE on that queue's ring, submitted with
//! the queue's next batch; the calling request's future sleeps until the completion arrives,
//! and the thread serves other requests meanwhile. So a slow backing file stalls one request,
//! not the core. Anywhere else (classic workers, tests, tools) the same calls run as plain
//! system calls.
//!
//! **Inline metadata.** io_uring runs statx, openat2, unlinkat and renameat on its io-wq worker
//! threads, never inline: every such call costs two thread switches (queue thread -> worker ->
//! queue thread), which on small VMs is several times the call itself. Where the file system
//! says the backing store answers these from memory ([`set_inline_metadata`]: local disk file
//! systems, never network or FUSE ones), a queue thread runs them as plain system calls instead,
//! timing each one. A call slower than [`SLOW_INLINE`] (a cold directory block, a journal stall,
//! or only the vCPU being descheduled) is a strike; a second strike within [`STRIKE_CALLS`]
//! calls (or one call slower than [`SLOW_INLINE_ALONE`]) sends that thread back to the ring for
//! a pause of [`INLINE_PAUSE_MIN`], doubled for every pause that comes within two seconds of the
//! previous one, up to [`INLINE_PAUSE`]. A lone slow call among fast ones, the usual sign of a
//! preemption on a busy machine, costs no pause of io-wq hops (on a loaded 2-vCPU VM a
//! cold-LOOKUP storm paid ~20% of its calls through io-wq for lone 10-17 ms preemptions). A
//! slow disk thus soon stalls a core for at most two calls per second. Data I/O (read, write,
//! fsync, fallocate) always goes through the ring.
//!
//! **Dropping a future is safe.** An operation owns everything its SQE points at (a data buffer
//! the caller's bytes are copied from or into, copies of the paths, argument structs, and
//! duplicates of the descriptors it names). A future dropped with its operation in flight hands
//! these to the thread's reactor, which asks the kernel to cancel the operation and frees them
//! only when its completion arrives; the queue loop closes its ring before freeing anything the
//! ring may still write. Interrupted requests are still cancelled through the kernel (their
//! futures see `ECANCELED`), not dropped.

use std::cell::{Cell, RefCell};
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

/// High bit of `user_data` marks backing I/O completions (the rest is the slot index).
pub(crate) const IO_TAG: u64 = 1 << 63;
/// `user_data` of cancellations (their own completions carry nothing to act on).
pub(crate) const CANCEL_TAG: u64 = u64::MAX - 1;

/// What the kernel may read or write while an operation is in flight: the buffers, paths and
/// argument structs its SQE points at, and duplicates of the descriptors it names (io_uring
/// resolves a path operation's directory fd by number when the operation runs, possibly on an
/// io-wq worker long after submission). An [`Op`] owns its `OpMem`; if the future is dropped
/// while the operation is in flight, the `OpMem` moves into the reactor, which frees it when the
/// completion (or the cancellation's) arrives. So a dropped future never lets the kernel write
/// freed memory or act on a reused descriptor number.
#[derive(Default)]
struct OpMem {
    /// Data buffer (reads land here, writes are copied here first).
    buf: Option<Vec<u8>>,
    /// Path arguments (NUL-terminated copies).
    paths: Vec<CString>,
    /// statx output.
    stx: Option<Box<libc::statx>>,
    /// Timeout argument (only kept alive: the kernel reads it).
    _ts: Option<Box<types::Timespec>>,
    /// openat2 argument.
    how: Option<Box<types::OpenHow>>,
    /// Descriptors the SQE names, kept open until the completion.
    fds: Vec<OwnedFd>,
}

/// One operation slot of the reactor.
#[derive(Default)]
enum Slot {
    #[default]
    Free,
    /// In flight; the future waits (with the waker of its last poll).
    Waiting(Option<Waker>),
    /// Completed; the future has not collected the result yet.
    Done(i32),
    /// In flight, but its future was dropped: the memory is kept until the completion.
    Orphaned(OpMem),
}

/// Most data buffers kept for reuse by a reactor.
const POOLED_BUFS: usize = 8;

/// The per-thread registry of backing operations in flight.
#[derive(Default)]
pub(crate) struct Reactor {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// SQEs produced by futures since the last submit (with their operation slot, `usize::MAX`
    /// for cancellations); the queue loop takes and pushes them.
    pending: Vec<(usize, squeue::Entry128)>,
    /// Operations submitted and not completed (orphans included).
    pub(crate) inflight: usize,
    /// The queue slot whose request is being polled (owner of the operations it submits).
    pub(crate) current: Option<usize>,
    /// Owner of each operation slot.
    owners: Vec<Option<usize>>,
    /// Queue slots whose request the kernel interrupted (and the queue honours it): their new
    /// operations fail at once with ECANCELED, so a request that was awaiting something else
    /// (another thread's answer) when the interrupt came still stops at its next I/O.
    interrupted: Vec<usize>,
    /// Data buffers for reuse.
    bufs: Vec<Vec<u8>>,
    /// Operations whose future was dropped in flight and that have since completed (with the
    /// number of those the kernel completed with data: it wrote their buffers after the drop).
    pub(crate) orphans_done: (u64, u64),
    /// Leave orphaned operations to complete on their own instead of cancelling them (tests: so
    /// that the kernel writes their memory after the drop).
    #[cfg(test)]
    keep_orphans: bool,
    /// Personality registrations tasks asked for, by ask number (see [`register_personality`]).
    asks: Vec<(u64, Ask)>,
    /// The next ask number.
    next_ask: u64,
    /// Personalities to unregister once the SQEs queued so far are submitted.
    unregister: Vec<u16>,
}

/// Switches the queue thread's credentials for one registration; what it returns is dropped
/// right after the registration (a guard that switches them back).
type Enter = Box<dyn FnOnce() -> Box<dyn std::any::Any>>;

/// A personality registration a task asked the queue loop for.
struct Ask {
    /// The credentials to register (taken when the loop serves the ask).
    enter: Option<Enter>,
    /// The waker of the task that waits for the answer.
    waker: Option<Waker>,
    /// The answer, until the task collects it.
    result: Option<io::Result<u16>>,
}

thread_local! {
    static REACTOR: RefCell<Option<Reactor>> = const { RefCell::new(None) };
    /// Until when this thread sends metadata calls to the ring after a slow inline call.
    static INLINE_PAUSED_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
    /// A file system asked this queue to fail (test hook, [`fail_this_queue`]).
    static INJECTED_FAILURE: Cell<bool> = const { Cell::new(false) };
    /// The last slow inline call on this thread, and the pause it started.
    static INLINE_LAST_SLOW: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
    /// Inline calls made on this thread, and the count when the last slow one ended (the
    /// strike that a second slow call within [`STRIKE_CALLS`] turns into a pause).
    static INLINE_COUNT: Cell<u64> = const { Cell::new(0) };
    static INLINE_STRIKE: Cell<Option<u64>> = const { Cell::new(None) };
}

/// An inline metadata call slower than this pauses inline calls on its thread.
pub const SLOW_INLINE: Duration = Duration::from_millis(2);
/// The longest a thread sends metadata calls through the ring after a slow inline one (the
/// pause after slow calls in a row).
pub const INLINE_PAUSE: Duration = Duration::from_secs(1);
/// The pause after a slow inline call that follows fast ones.
pub const INLINE_PAUSE_MIN: Duration = Duration::from_millis(50);
/// A slow inline call pauses inline calls only when another one was slow within this many
/// inline calls on the same thread (or when it was slower than [`SLOW_INLINE_ALONE`]): one slow
/// call among fast ones is most often the vCPU or the thread being preempted, which says
/// nothing about the backing store, while a slow disk makes calls slow in a row.
pub const STRIKE_CALLS: u64 = 64;
/// An inline call slower than this pauses inline calls on its own (longer than a preemption
/// by the scheduler takes on a busy machine).
pub const SLOW_INLINE_ALONE: Duration = Duration::from_millis(50);

static INLINE_METADATA: AtomicBool = AtomicBool::new(false);
static INLINE_CALLS: AtomicU64 = AtomicU64::new(0);
static INLINE_SLOW: AtomicU64 = AtomicU64::new(0);

/// Lets queue threads run metadata calls (statx, openat2, unlinkat, renameat2) inline, for a
/// backing store that answers them from memory (see the module documentation). Off by default.
pub fn set_inline_metadata(on: bool) {
    INLINE_METADATA.store(on, Ordering::Relaxed);
}

/// Counters of inline metadata calls: (calls made inline on queue threads, of which slower
/// than [`SLOW_INLINE`], each of which paused inline calls on its thread).
pub fn inline_stats() -> (u64, u64) {
    (INLINE_CALLS.load(Ordering::Relaxed), INLINE_SLOW.load(Ordering::Relaxed))
}

/// How a metadata call runs on this thread.
enum Way {
    /// A plain system call, off the queues.
    Plain,
    /// A plain system call on a queue thread, timed.
    Inline,
    /// An SQE on this queue's ring.
    Ring,
}

fn metadata_way() -> Way {
    if !on_ring() {
        return Way::Plain;
    }
    if !INLINE_METADATA.load(Ordering::Relaxed) {
        return Way::Ring;
    }
    match INLINE_PAUSED_UNTIL.get() {
        Some(t) if Instant::now() < t => Way::Ring,
        Some(_) => {
            INLINE_PAUSED_UNTIL.set(None);
            Way::Inline
        }
        None => Way::Inline,
    }
}

/// Runs an inline call, pausing inline calls on this thread when it was slow (see
/// [`STRIKE_CALLS`]).
///
/// One clock reading per call: a call is timed from the thread's previous reading (the
/// dispatcher's start of the request, the previous inline call, or the queue's reading after it
/// last waited for completions), so what it measures includes the little user-space work done
/// since, which is far below [`SLOW_INLINE`].
fn run_inline<R>(f: impl FnOnce() -> R) -> R {
    let start = ringfs_protocol::stats::last_reading();
    let r = f();
    let end = ringfs_protocol::stats::clock();
    let took = start.map_or(Duration::ZERO, |s| end.saturating_duration_since(s));
    INLINE_CALLS.fetch_add(1, Ordering::Relaxed);
    let n = INLINE_COUNT.get() + 1;
    INLINE_COUNT.set(n);
    if took > SLOW_INLINE {
        INLINE_SLOW.fetch_add(1, Ordering::Relaxed);
        if slow_call_pauses(INLINE_STRIKE.replace(Some(n)), n, took) {
            let now = end;
            let pause = match INLINE_LAST_SLOW.get() {
                Some((at, last)) if now.duration_since(at) < 2 * INLINE_PAUSE => (last * 2).min(INLINE_PAUSE),
                _ => INLINE_PAUSE_MIN,
            };
            INLINE_LAST_SLOW.set(Some((now, pause)));
            INLINE_PAUSED_UNTIL.set(Some(now + pause));
            log::debug!("inline metadata call took {took:?}: this queue uses the ring for {pause:?}");
        } else {
            log::debug!("inline metadata call took {took:?}: a strike, inline calls go on");
        }
    }
    r
}

/// Whether a slow inline call (the `n`th on its thread, taking `took`) pauses inline calls,
/// given the call count of the previous slow one (`strike`).
fn slow_call_pauses(strike: Option<u64>, n: u64, took: Duration) -> bool {
    took > SLOW_INLINE_ALONE || strike.is_some_and(|s| n - s <= STRIKE_CALLS)
}

/// Installs a reactor on the calling (queue) thread, whose loop submits what the reactor queues
/// to its ring and calls [`serve_personalities`] and [`release_personalities`].
pub(crate) fn install() {
    REACTOR.with(|r| *r.borrow_mut() = Some(Reactor::default()));
}

/// Removes this thread's reactor. `clean`: no operation is in flight any more (the ring is gone
/// and every completion was reaped), so the memory orphaned operations kept may be freed;
/// otherwise it is leaked, since the kernel may still write it.
pub(crate) fn uninstall(clean: bool) {
    let r = REACTOR.with(|r| r.try_borrow_mut().ok().and_then(|mut r| r.take()));
    if let Some(r) = r {
        if !clean && r.inflight > 0 {
            log::warn!("{} backing operations still in flight at queue exit: their buffers are leaked", r.inflight);
            std::mem::forget(r);
        }
    }
}

/// Registers credentials as an io_uring personality of this queue's ring; operations submitted
/// with it (the `*_as` functions) run with those credentials on io-wq. Only on a queue thread
/// (`EOPNOTSUPP` elsewhere).
///
/// The kernel registers the credentials of the thread that asks (fsuid, fsgid, supplementary
/// groups, capabilities), and the ring belongs to the queue loop, which holds it while it polls
/// the task. So the registration is asked of the loop: between two rounds of polls it calls
/// `enter` on the queue thread, registers the thread's credentials as they are then, drops what
/// `enter` returned (a guard that switches the credentials back), and wakes the task with the
/// personality's id. `enter` runs while no task runs; it must not panic with the credentials
/// switched (a panic in it answers `EIO`).
///
/// Dropping the future before it collects the id unregisters the personality.
pub async fn register_personality<G: 'static>(enter: impl FnOnce() -> G + 'static) -> io::Result<u16> {
    let enter: Enter = Box::new(move || Box::new(enter()) as Box<dyn std::any::Any>);
    let Some(id) = with(|r| r.ask_personality(enter)) else {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    };
    let mut ask = AskFuture { id, done: false };
    std::future::poll_fn(|cx| ask.poll(cx)).await
}

/// Unregisters a personality registered with [`register_personality`] on this thread's ring.
/// The queue loop does it once the SQEs queued so far (which may carry the id) are submitted:
/// the kernel takes an SQE's credentials when it is submitted, so they keep theirs.
pub fn unregister_personality(id: u16) {
    with(|r| r.unregister.push(id));
}

/// The future of one [`register_personality`] call: its ask number.
struct AskFuture {
    id: u64,
    /// The answer was collected.
    done: bool,
}

impl AskFuture {
    fn poll(&mut self, cx: &Context<'_>) -> Poll<io::Result<u16>> {
        let polled =
            with(|r| r.poll_ask(self.id, cx)).unwrap_or(Poll::Ready(Err(io::Error::from_raw_os_error(libc::EIO))));
        if polled.is_ready() {
            self.done = true;
        }
        polled
    }
}

impl Drop for AskFuture {
    fn drop(&mut self) {
        if !self.done {
            // Not answered yet: the loop skips the ask; answered: the id goes back.
            REACTOR.with(|r| {
                if let Ok(mut r) = r.try_borrow_mut() {
                    if let Some(r) = r.as_mut() {
                        r.drop_ask(self.id);
                    }
                }
            });
        }
    }
}

/// Serves the personality registrations tasks asked for ([`register_personality`]) on this
/// thread's ring, through its `submitter`. The queue loop calls it between rounds of polls,
/// when no task runs; the tasks asking are woken with their answer. Returns how many asks it
/// served.
pub(crate) fn serve_personalities(submitter: &io_uring::Submitter<'_>) -> usize {
    let asks = with(|r| r.take_asks()).unwrap_or_default();
    let n = asks.len();
    for (id, enter) in asks {
        let registered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let creds = enter();
            let r = submitter.register_personality();
            drop(creds);
            r
        }));
        let res = registered.unwrap_or_else(|_| {
            log::error!("switching credentials for an io_uring personality panicked; answered EIO");
            Err(io::Error::from_raw_os_error(libc::EIO))
        });
        with(|r| r.answer_ask(id, res));
    }
    n
}

/// Unregisters the personalities given back ([`unregister_personality`]). The queue loop calls
/// it only when its submission queue is empty (every SQE that may carry such an id submitted).
pub(crate) fn release_personalities(submitter: &io_uring::Submitter<'_>) {
    for id in with(|r| std::mem::take(&mut r.unregister)).unwrap_or_default() {
        if let Err(e) = submitter.unregister_personality(id) {
            log::debug!("io_uring personality {id} not unregistered: {e}");
        }
    }
}

/// Whether a task waits for a personality registration (the queue loop must not sleep).
pub(crate) fn personality_asked() -> bool {
    with(|r| r.asks.iter().any(|(_, a)| a.enter.is_some())).unwrap_or(false)
}

/// True when this thread sends metadata calls through its ring right now (a queue thread with
/// inline metadata off or paused); false off the queues or while calls run inline.
pub fn metadata_on_ring() -> bool {
    matches!(metadata_way(), Way::Ring)
}

/// Runs `f` on this thread's reactor, if any.
pub(crate) fn with<R>(f: impl FnOnce(&mut Reactor) -> R) -> Option<R> {
    REACTOR.with(|r| r.borrow_mut().as_mut().map(f))
}

/// Fault injection for tests: makes the calling queue thread's loop fail as if its ring had
/// failed, after the current round. The session then aborts the connection. No effect off the
/// queue threads. Not for production use.
#[doc(hidden)]
pub fn fail_this_queue() {
    if on_ring() {
        INJECTED_FAILURE.set(true);
    }
}

/// Takes the failure [`fail_this_queue`] injected on this thread.
pub(crate) fn take_injected_failure() -> bool {
    INJECTED_FAILURE.replace(false)
}

/// Whether the request being served on this queue thread was interrupted by the kernel (an
/// INTERRUPT the transport honours: a SETLKW, or a caller that is being killed). Such a
/// request's ring operations already fail with `ECANCELED`; a file system that waits on
/// something else (another thread, a retry loop) checks this and answers `EINTR`. False off a
/// queue thread.
pub fn interrupted() -> bool {
    with(|r| r.current_interrupted()).unwrap_or(false)
}

/// True on a thread that issues backing I/O through io_uring.
pub fn on_ring() -> bool {
    REACTOR.with(|r| r.borrow().is_some())
}

impl Reactor {
    fn ask_personality(&mut self, enter: Enter) -> u64 {
        let id = self.next_ask;
        self.next_ask += 1;
        self.asks.push((id, Ask { enter: Some(enter), waker: None, result: None }));
        id
    }

    /// The asks not served yet, with their credentials.
    fn take_asks(&mut self) -> Vec<(u64, Enter)> {
        self.asks.iter_mut().filter_map(|(id, a)| a.enter.take().map(|e| (*id, e))).collect()
    }

    /// Records the answer to ask `id` and wakes its task (or gives the personality back when
    /// the task is gone).
    fn answer_ask(&mut self, id: u64, res: io::Result<u16>) {
        match self.asks.iter_mut().find(|(i, _)| *i == id) {
            Some((_, a)) => {
                a.result = Some(res);
                if let Some(w) = a.waker.take() {
                    w.wake();
                }
            }
            None => {
                if let Ok(p) = res {
                    self.unregister.push(p);
                }
            }
        }
    }

    fn poll_ask(&mut self, id: u64, cx: &Context<'_>) -> Poll<io::Result<u16>> {
        let Some(k) = self.asks.iter().position(|(i, _)| *i == id) else {
            return Poll::Ready(Err(io::Error::from_raw_os_error(libc::EIO)));
        };
        let a = &mut self.asks[k].1;
        if a.result.is_none() {
            a.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let (_, a) = self.asks.swap_remove(k);
        Poll::Ready(a.result.unwrap_or_else(|| Err(io::Error::from_raw_os_error(libc::EIO))))
    }

    /// The future of ask `id` was dropped before it collected the answer.
    fn drop_ask(&mut self, id: u64) {
        if let Some(k) = self.asks.iter().position(|(i, _)| *i == id) {
            let (_, a) = self.asks.swap_remove(k);
            if let Some(Ok(p)) = a.result {
                self.unregister.push(p);
            }
        }
    }

    fn submit(&mut self, sqe: squeue::Entry128) -> usize {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::Free);
            self.owners.push(None);
            self.slots.len() - 1
        });
        self.slots[idx] = Slot::Waiting(None);
        self.owners[idx] = self.current;
        self.pending.push((idx, sqe.user_data(IO_TAG | idx as u64)));
        self.inflight += 1;
        idx
    }

    /// Takes the SQEs queued since the last call, for the queue loop to submit.
    pub(crate) fn take_pending(&mut self) -> Vec<squeue::Entry128> {
        self.pending.drain(..).map(|(_, sqe)| sqe).collect()
    }

    /// Marks queue slot `owner`'s request interrupted (until [`Reactor::clear_interrupted`]).
    pub(crate) fn mark_interrupted(&mut self, owner: usize) {
        if !self.interrupted.contains(&owner) {
            self.interrupted.push(owner);
        }
    }

    /// Queue slot `owner`'s request finished.
    pub(crate) fn clear_interrupted(&mut self, owner: usize) {
        self.interrupted.retain(|&o| o != owner);
    }

    /// Whether the request being polled was interrupted.
    fn current_interrupted(&self) -> bool {
        self.current.is_some_and(|c| self.interrupted.contains(&c))
    }

    /// Operations in flight on behalf of queue slot `owner`.
    pub(crate) fn ops_of(&self, owner: usize) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.owners[i] == Some(owner) && matches!(self.slots[i], Slot::Waiting(_)))
            .collect()
    }

    fn release(&mut self, idx: usize) {
        self.slots[idx] = Slot::Free;
        self.owners[idx] = None;
        self.free.push(idx);
    }

    /// Records the completion of slot `idx` and wakes its future (or frees what an orphaned
    /// operation kept).
    pub(crate) fn complete(&mut self, idx: usize, res: i32) {
        let Some(slot) = self.slots.get_mut(idx) else { return };
        match std::mem::replace(slot, Slot::Done(res)) {
            Slot::Waiting(w) => {
                self.inflight -= 1;
                if let Some(w) = w {
                    w.wake();
                }
            }
            Slot::Orphaned(mem) => {
                self.inflight -= 1;
                self.orphans_done.0 += 1;
                self.orphans_done.1 += u64::from(res > 0);
                self.release(idx);
                self.recycle(mem);
            }
            other => *slot = other,
        }
    }

    fn poll_slot(&mut self, idx: usize, cx: &Context<'_>) -> Poll<i32> {
        match &mut self.slots[idx] {
            Slot::Done(res) => {
                let res = *res;
                self.release(idx);
                Poll::Ready(res)
            }
            Slot::Waiting(w) => {
                *w = Some(cx.waker().clone());
                Poll::Pending
            }
            Slot::Free | Slot::Orphaned(_) => Poll::Ready(-libc::EIO),
        }
    }

    /// The future of slot `idx` was dropped before collecting its result.
    fn orphan(&mut self, idx: usize, mem: OpMem) {
        if let Some(k) = self.pending.iter().position(|(i, _)| *i == idx) {
            // Never submitted: nothing in the kernel refers to `mem`.
            self.pending.remove(k);
            self.inflight -= 1;
            self.release(idx);
            self.recycle(mem);
            return;
        }
        match self.slots[idx] {
            Slot::Waiting(_) => {
                self.slots[idx] = Slot::Orphaned(mem);
                #[cfg(test)]
                if self.keep_orphans {
                    return;
                }
                // Nobody waits for the result: ask the kernel to give it up.
                let cancel = opcode::AsyncCancel::new(IO_TAG | idx as u64).build().user_data(CANCEL_TAG);
                self.pending.push((usize::MAX, cancel.into()));
            }
            Slot::Done(_) => {
                self.release(idx);
                self.recycle(mem);
            }
            Slot::Free | Slot::Orphaned(_) => {}
        }
    }

    /// A data buffer of at least `len` bytes of capacity.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        match self.bufs.iter().position(|b| b.capacity() >= len) {
            Some(k) => self.bufs.swap_remove(k),
            None => Vec::with_capacity(len),
        }
    }

    /// Keeps the data buffer of a finished operation for reuse; the rest is dropped.
    fn recycle(&mut self, mut mem: OpMem) {
        if let Some(mut b) = mem.buf.take() {
            if self.bufs.len() < POOLED_BUFS {
                b.clear();
                self.bufs.push(b);
            }
        }
    }
}

/// A future for one SQE, owning what the SQE points at (see [`OpMem`]).
struct Op {
    sqe: Option<squeue::Entry128>,
    slot: Option<usize>,
    /// The completion was collected (or the operation never reached the reactor).
    finished: bool,
    mem: OpMem,
}

impl Op {
    fn new(sqe: impl Into<squeue::Entry128>, mem: OpMem) -> Op {
        Op { sqe: Some(sqe.into()), slot: None, finished: false, mem }
    }

    /// Submits the operation and waits for its result; returns the result and the memory.
    async fn run(mut self) -> (i32, OpMem) {
        let res = std::future::poll_fn(|cx| self.poll_op(cx)).await;
        (res, std::mem::take(&mut self.mem))
    }

    fn poll_op(&mut self, cx: &Context<'_>) -> Poll<i32> {
        if let Some(sqe) = self.sqe.take() {
            if with(|r| r.current_interrupted()) == Some(true) {
                // The request was interrupted while it awaited something else: do not start.
                self.finished = true;
                return Poll::Ready(-libc::ECANCELED);
            }
            self.slot = with(|r| r.submit(sqe));
            if self.slot.is_none() {
                self.finished = true;
                return Poll::Ready(-libc::ENOSYS);
            }
        }
        let Some(idx) = self.slot else { return Poll::Ready(-libc::EIO) };
        let polled = with(|r| r.poll_slot(idx, cx)).unwrap_or(Poll::Ready(-libc::EIO));
        if polled.is_ready() {
            self.finished = true;
        }
        polled
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let mem = std::mem::take(&mut self.mem);
        let Some(idx) = self.slot.filter(|_| !self.finished) else {
            with(|r| r.recycle(mem));
            return;
        };
        // Dropped with the operation in flight: the reactor keeps its memory until the kernel is
        // done with it. Without a reactor (the queue thread is tearing down) the memory is
        // leaked rather than freed under the kernel's feet.
        let parked = REACTOR.with(|r| match r.try_borrow_mut() {
            Ok(mut r) => match r.as_mut() {
                Some(r) => {
                    r.orphan(idx, mem);
                    None
                }
                None => Some(mem),
            },
            Err(_) => Some(mem),
        });
        if let Some(mem) = parked {
            std::mem::forget(mem);
        }
    }
}

/// Keeps a descriptor open for an operation's life: a duplicate the operation owns.
fn keep(fd: BorrowedFd<'_>, mem: &mut OpMem) -> io::Result<RawFd> {
    let owned = fd.try_clone_to_owned()?;
    let raw = owned.as_raw_fd();
    mem.fds.push(owned);
    Ok(raw)
}

/// A NUL-terminated copy of a path, owned by the operation.
fn path(p: &CStr, mem: &mut OpMem) -> *const libc::c_char {
    mem.paths.push(p.to_owned());
    mem.paths.last().map_or(std::ptr::null(), |c| c.as_ptr())
}

fn result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

fn sys(res: isize) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(res as usize)
    }
}

/// Reads up to `buf.len()` bytes at `offset`.
///
/// On a queue thread the kernel reads into a buffer the operation owns, copied into `buf` when
/// it completes: dropping the future mid-flight is safe (the reactor keeps that buffer and a
/// duplicate of `fd` until the kernel is done).
pub async fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    if !on_ring() {
        return Ok(rustix::io::pread(fd, buf, offset)?);
    }
    let mut mem = OpMem::default();
    let raw = keep(fd, &mut mem)?;
    let mut data = with(|r| r.buffer(buf.len())).unwrap_or_default();
    let len = buf.len().min(data.capacity()).min(u32::MAX as usize);
    let sqe = opcode::Read::new(types::Fd(raw), data.as_mut_ptr(), len as u32).offset(offset).build();
    mem.buf = Some(data);
    let (res, mem) = Op::new(sqe, mem).run().await;
    let n = result(res)?.min(len);
    if let Some(data) = &mem.buf {
        // SAFETY: the kernel wrote the first `n` bytes of `data`'s allocation (the read's
        // result), and the operation is complete.
        buf[..n].copy_from_slice(unsafe { std::slice::from_raw_parts(data.as_ptr(), n) });
    }
    with(|r| r.recycle(mem));
    Ok(n)
}

/// Writes `buf` at `offset` (appends when the fd was opened with O_APPEND).
///
/// On a queue thread the data is first copied into a buffer the operation owns (see [`pread`]).
pub async fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    if !on_ring() {
        return Ok(rustix::io::pwrite(fd, buf, offset)?);
    }
    let mut mem = OpMem::default();
    let raw = keep(fd, &mut mem)?;
    let mut data = with(|r| r.buffer(buf.len())).unwrap_or_default();
    data.extend_from_slice(buf);
    let len = data.len().min(u32::MAX as usize);
    let sqe = opcode::Write::new(types::Fd(raw), data.as_ptr(), len as u32).offset(offset).build();
    mem.buf = Some(data);
    let (res, mem) = Op::new(sqe, mem).run().await;
    with(|r| r.recycle(mem));
    result(res)
}

/// fsync / fdatasync.
pub async fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    if !on_ring() {
        return Ok(if datasync { rustix::fs::fdatasync(fd) } else { rustix::fs::fsync(fd) }?);
    }
    let mut mem = OpMem::default();
    let raw = keep(fd, &mut mem)?;
    let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
    let sqe = opcode::Fsync::new(types::Fd(raw)).flags(flags).build();
    result(Op::new(sqe, mem).run().await.0).map(|_| ())
}

/// fallocate(2).
pub async fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    if !on_ring() {
        return Ok(rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::from_bits_retain(mode as u32), offset, len)?);
    }
    let mut mem = OpMem::default();
    let raw = keep(fd, &mut mem)?;
    let sqe = opcode::Fallocate::new(types::Fd(raw), len).offset(offset).mode(mode).build();
    result(Op::new(sqe, mem).run().await.0).map(|_| ())
}

/// statx(2) of `path` relative to `dirfd` (use an empty path with `AT_EMPTY_PATH`).
pub async fn statx(dirfd: BorrowedFd<'_>, path_: &CStr, flags: i32, mask: u32) -> io::Result<libc::statx> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let dir = dirfd.as_raw_fd();
    // SAFETY: valid path pointer and output buffer.
    let plain = |stx: &mut libc::statx| unsafe { libc::statx(dir, path_.as_ptr(), flags, mask, stx) };
    match metadata_way() {
        Way::Plain => return sys(plain(&mut stx) as isize).map(|_| stx),
        Way::Inline => return sys(run_inline(|| plain(&mut stx)) as isize).map(|_| stx),
        Way::Ring => {}
    }
    let mut mem = OpMem::default();
    let raw = keep(dirfd, &mut mem)?;
    let p = path(path_, &mut mem);
    let mut out = Box::new(stx);
    let sqe =
        opcode::Statx::new(types::Fd(raw), p, (&mut *out as *mut libc::statx).cast()).flags(flags).mask(mask).build();
    mem.stx = Some(out);
    let (res, mem) = Op::new(sqe, mem).run().await;
    result(res)?;
    Ok(mem.stx.map_or(stx, |b| *b))
}

/// unlinkat(2).
pub async fn unlinkat(dirfd: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    let plain = || rustix::fs::unlinkat(dirfd, name, rustix::fs::AtFlags::from_bits_retain(flags as u32));
    match metadata_way() {
        Way::Plain => return Ok(plain()?),
        Way::Inline => return Ok(run_inline(plain)?),
        Way::Ring => {}
    }
    let mut mem = OpMem::default();
    let raw = keep(dirfd, &mut mem)?;
    let sqe = opcode::UnlinkAt::new(types::Fd(raw), path(name, &mut mem)).flags(flags).build();
    result(Op::new(sqe, mem).run().await.0).map(|_| ())
}

/// renameat2(2).
pub async fn renameat2(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    let plain =
        || rustix::fs::renameat_with(olddir, old, newdir, new, rustix::fs::RenameFlags::from_bits_retain(flags));
    match metadata_way() {
        Way::Plain => return Ok(plain()?),
        Way::Inline => return Ok(run_inline(plain)?),
        Way::Ring => {}
    }
    let mut mem = OpMem::default();
    let (o, n) = (keep(olddir, &mut mem)?, keep(newdir, &mut mem)?);
    let (op, np) = (path(old, &mut mem), path(new, &mut mem));
    let sqe = opcode::RenameAt::new(types::Fd(o), op, types::Fd(n), np).flags(flags).build();
    result(Op::new(sqe, mem).run().await.0).map(|_| ())
}

/// Sleeps for `d`; on a queue thread this is an io_uring timeout, so the core keeps serving
/// other requests, and an interrupted request's sleep is cancelled (`ECANCELED`).
pub async fn sleep(d: std::time::Duration) -> io::Result<()> {
    if !on_ring() {
        std::thread::sleep(d);
        return Ok(());
    }
    let ts = Box::new(types::Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos()));
    let sqe = opcode::Timeout::new(&*ts as *const types::Timespec).build();
    let mem = OpMem { _ts: Some(ts), ..OpMem::default() };
    match Op::new(sqe, mem).run().await.0 {
        r if r == -libc::ETIME || r >= 0 => Ok(()),
        r => Err(io::Error::from_raw_os_error(-r)),
    }
}

/// mkdirat(2) as personality `personality` (0: the thread's own credentials).
pub async fn mkdirat_as(dirfd: BorrowedFd<'_>, name: &CStr, mode: u32, personality: u16) -> io::Result<()> {
    if !on_ring() {
        return Ok(rustix::fs::mkdirat(dirfd, name, rustix::fs::Mode::from_raw_mode(mode))?);
    }
    let mut mem = OpMem::default();
    let raw = keep(dirfd, &mut mem)?;
    let sqe = opcode::MkDirAt::new(types::Fd(raw), path(name, &mut mem)).mode(mode).build().personality(personality);
    result(Op::new(sqe, mem).run().await.0).map(|_| ())
}

/// symlinkat(2) as personality `personality` (0: the thread's own credentials).
pub async fn symlinkat_as(target: &CStr, dirfd: BorrowedFd<'_>, name: &CStr, personality: u16) -> io::Result<()> {
    if !on_ring() {
        return Ok(rustix::fs::symlinkat(target, dirfd, name)?);
    }
    let mut mem = OpMem::default();
    let raw = keep(dirfd, &mut mem)?;
    let (t, n) = (path(target, &mut mem), path(name, &mut mem));
    let sqe = opcode::SymlinkAt::new(types::Fd(raw), t, n).build().personality(personality);
    result(Op::new(sqe, mem).run().await.0).map(|_| ())
}

/// linkat(2) as personality `personality` (0: the thread's own credentials). `olddir` `None`
/// means `AT_FDCWD`.
pub async fn linkat_as(
    olddir: Option<BorrowedFd<'_>>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
    flags: i32,
    personality: u16,
) -> io::Result<()> {
    if !on_ring() {
        let o = olddir.unwrap_or(rustix::fs::CWD);
        return Ok(rustix::fs::linkat(o, old, newdir, new, rustix::fs::AtFlags::from_bits_retain(flags as u32))?);
    }
    let mut mem = OpMem::default();
    let o = match olddir {
        Some(f) => keep(f, &mut mem)?,
        None => libc::AT_FDCWD,
    };
    let n = keep(newdir, &mut mem)?;
    let (op, np) = (path(old, &mut mem), path(new, &mut mem));
    let sqe = opcode::LinkAt::new(types::Fd(o), op, types::Fd(n), np).flags(flags).build().personality(personality);
    result(Op::new(sqe, mem).run().await.0).map(|_| ())
}

/// openat2(2) through the ring as personality `personality` (0: the thread's own
/// credentials), for creating files as their creator; a plain syscall off the queues.
pub async fn openat2_as(
    dirfd: RawFd,
    path: &std::ffi::CStr,
    flags: i32,
    mode: u32,
    resolve: u64,
    personality: u16,
) -> io::Result<std::os::fd::OwnedFd> {
    openat2_once(dirfd, path, flags, mode, resolve, Some(personality)).await
}

/// How often an openat2 that failed with `EAGAIN` is tried again. `RESOLVE_BENEATH` (and the
/// other scoped resolutions) answers `EAGAIN` when a rename or a mount anywhere on the system
/// raced with the walk; a bounded retry keeps a concurrent renamer from spinning a queue thread.
pub const OPENAT2_RETRIES: u32 = 16;

/// The raw openat2(2) system call.
fn openat2_raw(dirfd: RawFd, path: &std::ffi::CStr, how: &types::OpenHow) -> isize {
    // SAFETY: `path` is NUL-terminated and `how` is a valid `open_how` of the size passed.
    unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            path.as_ptr(),
            how as *const types::OpenHow,
            size_of::<types::OpenHow>(),
        ) as isize
    }
}

/// openat2(2) with `RESOLVE_*` flags as a plain, blocking system call on any thread, with the
/// same retry rule as [`openat2`] (`EAGAIN` up to [`OPENAT2_RETRIES`] times, `EINTR` always).
pub fn openat2_blocking(
    dirfd: RawFd,
    path: &std::ffi::CStr,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let how = types::OpenHow::new().flags(flags as u32 as u64).mode(mode as u64).resolve(resolve);
    let mut tries = 0;
    loop {
        match sys(openat2_raw(dirfd, path, &how)) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < OPENAT2_RETRIES => tries += 1,
            // SAFETY: a descriptor the kernel just opened for us.
            Ok(fd) => return Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) }),
            Err(e) => return Err(e),
        }
    }
}

/// openat2(2) with `RESOLVE_*` flags; returns the new descriptor. `EAGAIN` (a concurrent
/// rename or mount raced with `RESOLVE_BENEATH`) is retried up to [`OPENAT2_RETRIES`] times.
pub async fn openat2(
    dirfd: RawFd,
    path: &std::ffi::CStr,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> io::Result<std::os::fd::OwnedFd> {
    let mut tries = 0;
    loop {
        match openat2_once(dirfd, path, flags, mode, resolve, None).await {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < OPENAT2_RETRIES => tries += 1,
            r => return r,
        }
    }
}

/// One openat2: by the metadata policy, or always through the ring as `personality` when given.
async fn openat2_once(
    dirfd: RawFd,
    path: &std::ffi::CStr,
    flags: i32,
    mode: u32,
    resolve: u64,
    personality: Option<u16>,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let how = types::OpenHow::new().flags(flags as u32 as u64).mode(mode as u64).resolve(resolve);
    let plain = || openat2_raw(dirfd, path, &how);
    let way = match (personality, on_ring()) {
        (Some(_), true) => Way::Ring,
        (Some(_), false) => Way::Plain,
        (None, _) => metadata_way(),
    };
    let fd = match way {
        Way::Plain => sys(plain())?,
        Way::Inline => sys(run_inline(plain))?,
        Way::Ring => openat2_ring(dirfd, path, how, personality.unwrap_or(0)).await?,
    };
    // SAFETY: a descriptor the kernel just opened for us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}

/// openat2 as an SQE whose path, `open_how` and directory descriptor the operation owns.
async fn openat2_ring(dirfd: RawFd, p: &CStr, how: types::OpenHow, personality: u16) -> io::Result<usize> {
    let mut mem = OpMem::default();
    // SAFETY: the caller's `dirfd` is open for the duration of this call (it is borrowed for
    // the whole future), and is duplicated here so that the operation owns one.
    let raw = keep(unsafe { BorrowedFd::borrow_raw(dirfd) }, &mut mem)?;
    let how = Box::new(how);
    let sqe = opcode::OpenAt2::new(types::Fd(raw), path(p, &mut mem), &*how as *const types::OpenHow)
        .build()
        .personality(personality);
    mem.how = Some(how);
    result(Op::new(sqe, mem).run().await.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[test]
    fn a_lone_slow_call_is_a_strike_two_pause() {
        let slow = SLOW_INLINE * 2;
        // The first slow call on a thread, and one long after the previous: no pause.
        assert!(!slow_call_pauses(None, 10, slow));
        assert!(!slow_call_pauses(Some(10), 10 + STRIKE_CALLS + 1, slow));
        // A second slow call soon after the first: pause.
        assert!(slow_call_pauses(Some(10), 11, slow));
        assert!(slow_call_pauses(Some(10), 10 + STRIKE_CALLS, slow));
        // A call slower than any preemption pauses on its own.
        assert!(slow_call_pauses(None, 1, SLOW_INLINE_ALONE * 2));
    }
    use std::os::fd::AsFd;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::Wake;

    struct Flag;
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {}
    }

    /// A test queue: a plain ring with this thread's reactor installed, driven by hand.
    struct TestRing {
        ring: Option<io_uring::IoUring<squeue::Entry128, io_uring::cqueue::Entry>>,
    }

    impl TestRing {
        fn new() -> TestRing {
            let ring = crate::ring::new_ring(256).expect("io_uring");
            install();
            TestRing { ring: Some(ring) }
        }

        /// Submits what the reactor queued and reaps completions, waiting up to `wait`.
        fn turn(&mut self, wait: Duration) {
            let ring = self.ring.as_mut().expect("ring");
            for sqe in with(|r| r.take_pending()).unwrap_or_default() {
                // SAFETY: the SQE's memory is owned by its operation (OpMem), kept until the
                // completion is reaped by `turn` or `settle`.
                while unsafe { ring.submission().push(&sqe) }.is_err() {
                    ring.submit().expect("submit");
                }
            }
            if serve_personalities(&ring.submitter()) > 0 {
                return;
            }
            let ts = types::Timespec::from(wait);
            let args = types::SubmitArgs::new().timespec(&ts);
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
                Err(e) => panic!("submit: {e}"),
            }
            if ring.submission().is_empty() {
                release_personalities(&ring.submitter());
            }
            let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (tag, res) in done {
                if tag != CANCEL_TAG && tag & IO_TAG != 0 {
                    with(|r| r.complete((tag & !IO_TAG) as usize, res));
                }
            }
        }

        /// Polls `fut` to completion.
        fn run<T>(&mut self, fut: impl Future<Output = T>) -> T {
            let mut fut = std::pin::pin!(fut);
            let waker = Waker::from(Arc::new(Flag));
            let mut cx = Context::from_waker(&waker);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    return v;
                }
                assert!(Instant::now() < deadline, "operation did not complete");
                self.turn(Duration::from_millis(20));
            }
        }

        /// Turns the ring until nothing is in flight.
        fn settle(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while with(|r| r.inflight).unwrap_or(0) > 0 {
                assert!(Instant::now() < deadline, "operations never completed");
                self.turn(Duration::from_millis(20));
            }
        }
    }

    impl Drop for TestRing {
        fn drop(&mut self) {
            self.settle();
            self.ring = None;
            uninstall(true);
        }
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
    }

    /// Polls `fut` once, then (if still pending) `race` until it wins; drops `fut` either way.
    /// Returns whether `fut` was dropped unfinished.
    fn race_and_drop<A: Future>(t: &mut TestRing, fut: A, race: Duration) -> bool {
        let mut fut: Pin<Box<A>> = Box::pin(fut);
        let waker = Waker::from(Arc::new(Flag));
        let mut cx = Context::from_waker(&waker);
        let mut timer: Pin<Box<dyn Future<Output = io::Result<()>>>> = Box::pin(sleep(race));
        loop {
            if fut.as_mut().poll(&mut cx).is_ready() {
                return false;
            }
            if timer.as_mut().poll(&mut cx).is_ready() {
                return true;
            }
            t.turn(Duration::from_millis(5));
        }
    }

    #[test]
    fn read_write_statx_sleep_through_the_ring() {
        let mut t = TestRing::new();
        let dir = std::env::temp_dir().join(format!("ringfs-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f =
            std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(dir.join("a")).unwrap();
        assert_eq!(t.run(pwrite(f.as_fd(), b"hello ring", 0)).unwrap(), 10);
        let mut buf = [0u8; 32];
        assert_eq!(t.run(pread(f.as_fd(), &mut buf, 6)).unwrap(), 4);
        assert_eq!(&buf[..4], b"ring");
        let d = std::fs::File::open(&dir).unwrap();
        let stx = t.run(statx(d.as_fd(), c"a", 0, libc::STATX_SIZE)).unwrap();
        assert_eq!(stx.stx_size, 10);
        let start = Instant::now();
        t.run(sleep(Duration::from_millis(30))).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(25));
        t.run(renameat2(d.as_fd(), c"a", d.as_fd(), c"b", 0)).unwrap();
        t.run(unlinkat(d.as_fd(), c"b", 0)).unwrap();
        assert_eq!(t.run(statx(d.as_fd(), c"b", 0, 0)).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A thousand reads dropped mid-flight (the race of a read against a timeout): the kernel
    /// completes them after the drop, and must write only memory the reactor kept, never the
    /// caller's buffers, which are freed and reused as canaries at once.
    #[test]
    fn dropped_reads_never_write_freed_memory() {
        let mut t = TestRing::new();
        const N: usize = 1000;
        const LEN: usize = 512;
        // A fresh pipe per read: an empty pipe keeps the read in flight until data comes.
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..N).map(|_| pipe()).collect();
        let mut canaries: Vec<Vec<u8>> = Vec::new();
        let mut dropped = 0;
        let waker = Waker::from(Arc::new(Flag));
        let mut cx = Context::from_waker(&waker);
        let data = [0x55u8; LEN];
        let feed = |w: &OwnedFd| {
            // SAFETY: writing LEN bytes from a valid buffer to our pipe.
            let n = unsafe { libc::write(w.as_raw_fd(), data.as_ptr().cast(), LEN) };
            assert_eq!(n, LEN as isize);
        };
        for (i, (r, w)) in pipes.iter().enumerate() {
            let mut buf = vec![0u8; LEN];
            let mut read = Box::pin(pread(r.as_fd(), &mut buf, 0));
            let mut timer = Box::pin(sleep(Duration::from_micros(100)));
            // The read races a timeout and loses (its pipe is empty): it is dropped in flight.
            assert!(read.as_mut().poll(&mut cx).is_pending());
            while timer.as_mut().poll(&mut cx).is_pending() {
                t.turn(Duration::from_millis(5));
                assert!(read.as_mut().poll(&mut cx).is_pending(), "the read of an empty pipe finished");
            }
            // Half of the dropped reads are left to complete (not cancelled): their data comes
            // after the drop, and the kernel writes it into memory the reactor kept.
            with(|r| r.keep_orphans = i % 2 == 0);
            drop(read);
            dropped += 1;
            drop(buf);
            // Likely the same allocation as `buf`: a canary the kernel must not touch.
            canaries.push(vec![0xAAu8; LEN]);
            feed(w);
            t.turn(Duration::ZERO);
        }
        t.settle();
        // Empty the pipes (reads that were cancelled left their data there).
        for (r, _) in &pipes {
            let mut sink = [0u8; 4096];
            // SAFETY: fcntl on our own pipe descriptor.
            unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
            // SAFETY: reading into a valid buffer of the length passed.
            while unsafe { libc::read(r.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) } > 0 {}
        }
        assert!(dropped > N / 2, "only {dropped} of {N} reads were dropped in flight: test is void");
        for (i, c) in canaries.iter().enumerate() {
            assert!(c.iter().all(|&b| b == 0xAA), "canary {i} was overwritten by a dropped read");
        }
        let (done, with_data) = with(|r| r.orphans_done).unwrap();
        assert_eq!(done as usize, dropped, "every orphaned read completed");
        assert!(with_data > 0, "no dropped read was completed with data after its drop: test is void");
        assert_eq!(with(|r| r.inflight), Some(0));
    }

    /// Reads of regular files dropped at every stage (before submission, in flight, done but
    /// not collected) leave nothing behind.
    #[test]
    fn dropped_file_reads_leave_the_reactor_clean() {
        let mut t = TestRing::new();
        let path = std::env::temp_dir().join(format!("ringfs-io-drop-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let mut finished = 0;
        for i in 0..1000u64 {
            let mut buf = vec![0u8; 64 << 10];
            if !race_and_drop(&mut t, pread(f.as_fd(), &mut buf, (i * 4096) % (1 << 20)), Duration::ZERO) {
                finished += 1;
            }
            if i % 3 == 0 {
                // Dropped before it was ever submitted.
                let mut fut = Box::pin(pread(f.as_fd(), &mut buf, 0));
                let waker = Waker::from(Arc::new(Flag));
                assert!(fut.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
            }
        }
        t.settle();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(with(|r| r.inflight), Some(0));
        assert!(with(|r| r.pending.is_empty()).unwrap());
        let _ = finished;
    }

    /// Switches this thread's fsuid/fsgid until dropped (test credentials for personalities).
    struct FsCreds;
    impl FsCreds {
        fn switch(uid: u32, gid: u32) -> FsCreds {
            // SAFETY: setfsgid/setfsuid take integers and change only this thread's credentials.
            unsafe {
                libc::syscall(libc::SYS_setfsgid, gid);
                libc::syscall(libc::SYS_setfsuid, uid);
            }
            FsCreds
        }
    }
    impl Drop for FsCreds {
        fn drop(&mut self) {
            // SAFETY: as above, back to root.
            unsafe {
                libc::syscall(libc::SYS_setfsuid, 0);
                libc::syscall(libc::SYS_setfsgid, 0);
            }
        }
    }

    /// A personality registered through the loop carries the credentials `enter` set (and only
    /// for the registration): a creation as it is refused where that user may not write and
    /// owned by that user where it may; the thread itself stays root.
    #[test]
    fn personalities_registered_by_the_loop_carry_the_callers_credentials() {
        if rustix::process::geteuid().as_raw() != 0 {
            assert!(std::env::var_os("CI").is_none(), "needs root (CAP_SETUID) under CI");
            eprintln!("skipped: needs root to switch credentials");
            return;
        }
        let mut t = TestRing::new();
        let dir = std::env::temp_dir().join(format!("ringfs-io-personality-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let open = std::fs::File::open(&dir).unwrap();
        let nobody = t.run(register_personality(|| FsCreds::switch(65534, 65534))).unwrap();
        assert_ne!(nobody, 0);
        // The guard was dropped after the registration: the thread is root again.
        // SAFETY: setfsuid(-1) changes nothing and returns the current fsuid.
        assert_eq!(unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) }, 0);
        let denied = t.run(mkdirat_as(open.as_fd(), c"denied", 0o755, nobody)).unwrap_err();
        assert_eq!(denied.raw_os_error(), Some(libc::EACCES));
        t.run(mkdirat_as(open.as_fd(), c"as-root", 0o777, 0)).unwrap();
        let sub = std::fs::File::open(dir.join("as-root")).unwrap();
        std::fs::set_permissions(dir.join("as-root"), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        t.run(mkdirat_as(sub.as_fd(), c"mine", 0o755, nobody)).unwrap();
        let meta = std::fs::metadata(dir.join("as-root/mine")).unwrap();
        assert_eq!(
            (std::os::unix::fs::MetadataExt::uid(&meta), std::os::unix::fs::MetadataExt::gid(&meta)),
            (65534, 65534)
        );
        // Given back after the next submit: the id is unknown to the ring afterwards.
        unregister_personality(nobody);
        t.run(sleep(Duration::from_millis(1))).unwrap();
        let gone = t.run(mkdirat_as(sub.as_fd(), c"after", 0o755, nobody)).unwrap_err();
        assert_eq!(gone.raw_os_error(), Some(libc::EINVAL));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An ask whose future is dropped before the loop serves it is never registered; one dropped
    /// after the loop answered gives its personality back.
    #[test]
    fn dropped_personality_asks_leave_nothing_registered() {
        let mut t = TestRing::new();
        let waker = Waker::from(Arc::new(Flag));
        let mut cx = Context::from_waker(&waker);
        let ran = std::rc::Rc::new(Cell::new(false));
        let flag = ran.clone();
        let mut early = Box::pin(register_personality(move || flag.set(true)));
        assert!(early.as_mut().poll(&mut cx).is_pending());
        drop(early);
        t.turn(Duration::ZERO);
        assert!(!ran.get(), "a dropped ask was served");
        let mut late = Box::pin(register_personality(|| ()));
        assert!(late.as_mut().poll(&mut cx).is_pending());
        t.turn(Duration::ZERO);
        drop(late);
        assert_eq!(with(|r| r.unregister.len()), Some(1), "the answered personality was not given back");
        t.run(sleep(Duration::from_millis(1))).unwrap();
        assert_eq!(with(|r| (r.unregister.len(), r.asks.len())), Some((0, 0)));
    }

    /// A dropped sleep is cancelled (its slot freed without waiting for the timeout).
    #[test]
    fn dropped_sleep_is_cancelled() {
        let mut t = TestRing::new();
        let start = Instant::now();
        assert!(race_and_drop(&mut t, sleep(Duration::from_secs(30)), Duration::from_millis(10)));
        t.settle();
        assert!(start.elapsed() < Duration::from_secs(5), "the dropped timeout was not cancelled");
    }
}
