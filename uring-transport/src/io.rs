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
//! or only the vCPU being descheduled) sends that thread back to the ring for a pause of
//! [`INLINE_PAUSE_MIN`], doubled for every slow call that comes within two seconds of the
//! previous one, up to [`INLINE_PAUSE`]. A slow disk thus soon stalls a core for at most one
//! call per second, while a stray preemption costs only a short detour through io-wq. Data I/O
//! (read, write, fsync, fallocate) always goes through the ring.
//!
//! Buffers passed to these functions must stay valid until the returned future completes; the
//! futures are not cancel-safe (dropping one with its operation in flight is a bug, and the
//! executor never does it: interrupted requests are cancelled through the kernel instead).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

/// High bit of `user_data` marks backing I/O completions (the rest is the slot index).
pub(crate) const IO_TAG: u64 = 1 << 63;

#[derive(Default)]
enum Slot {
    #[default]
    Free,
    Waiting(Option<Waker>),
    Done(i32),
}

/// The per-thread registry of backing operations in flight.
#[derive(Default)]
pub(crate) struct Reactor {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// SQEs produced by futures since the last submit; the queue loop pushes them.
    pub(crate) pending: Vec<squeue::Entry128>,
    /// Operations in flight.
    pub(crate) inflight: usize,
    /// The queue slot whose request is being polled (owner of the operations it submits).
    pub(crate) current: Option<usize>,
    /// Owner of each operation slot.
    owners: Vec<Option<usize>>,
    /// The queue's ring (for registering personalities).
    ring_fd: RawFd,
}

thread_local! {
    static REACTOR: RefCell<Option<Reactor>> = const { RefCell::new(None) };
    /// Until when this thread sends metadata calls to the ring after a slow inline call.
    static INLINE_PAUSED_UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The last slow inline call on this thread, and the pause it started.
    static INLINE_LAST_SLOW: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
}

/// An inline metadata call slower than this pauses inline calls on its thread.
pub const SLOW_INLINE: Duration = Duration::from_millis(2);
/// The longest a thread sends metadata calls through the ring after a slow inline one (the
/// pause after slow calls in a row).
pub const INLINE_PAUSE: Duration = Duration::from_secs(1);
/// The pause after a slow inline call that follows fast ones.
pub const INLINE_PAUSE_MIN: Duration = Duration::from_millis(50);

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

/// Runs an inline call, pausing inline calls on this thread when it was slow.
fn run_inline<R>(f: impl FnOnce() -> R) -> R {
    let start = Instant::now();
    let r = f();
    let took = start.elapsed();
    INLINE_CALLS.fetch_add(1, Ordering::Relaxed);
    if took > SLOW_INLINE {
        INLINE_SLOW.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let pause = match INLINE_LAST_SLOW.get() {
            Some((at, last)) if now.duration_since(at) < 2 * INLINE_PAUSE => (last * 2).min(INLINE_PAUSE),
            _ => INLINE_PAUSE_MIN,
        };
        INLINE_LAST_SLOW.set(Some((now, pause)));
        INLINE_PAUSED_UNTIL.set(Some(now + pause));
        log::debug!("inline metadata call took {took:?}: this queue uses the ring for {pause:?}");
    }
    r
}

/// Installs a reactor for the ring `ring_fd` on the calling (queue) thread.
pub(crate) fn install(ring_fd: RawFd) {
    REACTOR.with(|r| *r.borrow_mut() = Some(Reactor { ring_fd, ..Reactor::default() }));
}

const IORING_REGISTER_PERSONALITY: libc::c_uint = 9;
const IORING_UNREGISTER_PERSONALITY: libc::c_uint = 10;

/// Registers the calling thread's current credentials (fsuid, fsgid, groups, capabilities) as
/// an io_uring personality of this queue's ring; operations submitted with it (the `*_as`
/// functions) run with those credentials on io-wq. Only on a queue thread.
pub fn register_personality() -> io::Result<u16> {
    let fd = with(|r| r.ring_fd).ok_or_else(|| io::Error::from_raw_os_error(libc::EOPNOTSUPP))?;
    // SAFETY: io_uring_register on our own ring; this opcode takes no argument.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_register, fd, IORING_REGISTER_PERSONALITY, 0usize, 0u32) };
    let id = sys(r as isize)?;
    u16::try_from(id).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Drops a personality registered with [`register_personality`] on this thread's ring.
pub fn unregister_personality(id: u16) {
    if let Some(fd) = with(|r| r.ring_fd) {
        // SAFETY: io_uring_register on our own ring; the id travels in nr_args.
        unsafe { libc::syscall(libc::SYS_io_uring_register, fd, IORING_UNREGISTER_PERSONALITY, 0usize, u32::from(id)) };
    }
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

/// True on a thread that issues backing I/O through io_uring.
pub fn on_ring() -> bool {
    REACTOR.with(|r| r.borrow().is_some())
}

impl Reactor {
    fn submit(&mut self, sqe: squeue::Entry128) -> usize {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::Free);
            self.owners.push(None);
            self.slots.len() - 1
        });
        self.slots[idx] = Slot::Waiting(None);
        self.owners[idx] = self.current;
        self.pending.push(sqe.user_data(IO_TAG | idx as u64));
        self.inflight += 1;
        idx
    }

    /// Operations in flight on behalf of queue slot `owner`.
    pub(crate) fn ops_of(&self, owner: usize) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.owners[i] == Some(owner) && matches!(self.slots[i], Slot::Waiting(_)))
            .collect()
    }

    /// Records the completion of slot `idx` and wakes its future.
    pub(crate) fn complete(&mut self, idx: usize, res: i32) {
        if let Some(slot) = self.slots.get_mut(idx) {
            if let Slot::Waiting(w) = std::mem::replace(slot, Slot::Done(res)) {
                self.inflight -= 1;
                if let Some(w) = w {
                    w.wake();
                }
            }
        }
    }

    fn poll_slot(&mut self, idx: usize, cx: &Context<'_>) -> Poll<i32> {
        match &mut self.slots[idx] {
            Slot::Done(res) => {
                let res = *res;
                self.slots[idx] = Slot::Free;
                self.free.push(idx);
                Poll::Ready(res)
            }
            Slot::Waiting(w) => {
                *w = Some(cx.waker().clone());
                Poll::Pending
            }
            Slot::Free => Poll::Ready(-libc::EIO),
        }
    }
}

/// A future for one SQE.
struct Op {
    sqe: Option<squeue::Entry128>,
    slot: Option<usize>,
}

impl Future for Op {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        if let Some(sqe) = self.sqe.take() {
            let slot = with(|r| r.submit(sqe));
            self.slot = slot;
            if slot.is_none() {
                return Poll::Ready(-libc::ENOSYS);
            }
        }
        let Some(idx) = self.slot else { return Poll::Ready(-libc::EIO) };
        with(|r| r.poll_slot(idx, cx)).unwrap_or(Poll::Ready(-libc::EIO))
    }
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
pub async fn pread(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    if !on_ring() {
        // SAFETY: buf is valid for writes of its length.
        return sys(unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), offset as i64) });
    }
    let sqe = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32).offset(offset).build();
    result(Op { sqe: Some(sqe.into()), slot: None }.await)
}

/// Writes `buf` at `offset` (appends when the fd was opened with O_APPEND).
pub async fn pwrite(fd: RawFd, buf: &[u8], offset: u64) -> io::Result<usize> {
    if !on_ring() {
        // SAFETY: buf is valid for reads of its length.
        return sys(unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset as i64) });
    }
    let sqe = opcode::Write::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32).offset(offset).build();
    result(Op { sqe: Some(sqe.into()), slot: None }.await)
}

/// fsync / fdatasync.
pub async fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    if !on_ring() {
        // SAFETY: plain syscalls on an fd.
        let rc = unsafe {
            if datasync {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        };
        return sys(rc as isize).map(|_| ());
    }
    let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
    let sqe = opcode::Fsync::new(types::Fd(fd)).flags(flags).build();
    result(Op { sqe: Some(sqe.into()), slot: None }.await).map(|_| ())
}

/// fallocate(2).
pub async fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    if !on_ring() {
        // SAFETY: plain syscall on an fd.
        let rc = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
        return sys(rc as isize).map(|_| ());
    }
    let sqe = opcode::Fallocate::new(types::Fd(fd), len).offset(offset).mode(mode).build();
    result(Op { sqe: Some(sqe.into()), slot: None }.await).map(|_| ())
}

/// statx(2) of `path` relative to `dirfd` (use an empty path with `AT_EMPTY_PATH`).
pub async fn statx(dirfd: RawFd, path: &std::ffi::CStr, flags: i32, mask: u32) -> io::Result<libc::statx> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path pointer and output buffer.
    let plain = |stx: &mut libc::statx| unsafe { libc::statx(dirfd, path.as_ptr(), flags, mask, stx) };
    match metadata_way() {
        Way::Plain => return sys(plain(&mut stx) as isize).map(|_| stx),
        Way::Inline => return sys(run_inline(|| plain(&mut stx)) as isize).map(|_| stx),
        Way::Ring => {}
    }
    let sqe = opcode::Statx::new(types::Fd(dirfd), path.as_ptr(), (&mut stx as *mut libc::statx).cast())
        .flags(flags)
        .mask(mask)
        .build();
    result(Op { sqe: Some(sqe.into()), slot: None }.await).map(|_| stx)
}

/// unlinkat(2).
pub async fn unlinkat(dirfd: RawFd, name: &std::ffi::CStr, flags: i32) -> io::Result<()> {
    // SAFETY: valid path pointer.
    let plain = || unsafe { libc::unlinkat(dirfd, name.as_ptr(), flags) };
    match metadata_way() {
        Way::Plain => return sys(plain() as isize).map(|_| ()),
        Way::Inline => return sys(run_inline(plain) as isize).map(|_| ()),
        Way::Ring => {}
    }
    let sqe = opcode::UnlinkAt::new(types::Fd(dirfd), name.as_ptr()).flags(flags).build();
    result(Op { sqe: Some(sqe.into()), slot: None }.await).map(|_| ())
}

/// renameat2(2).
pub async fn renameat2(
    olddir: RawFd,
    old: &std::ffi::CStr,
    newdir: RawFd,
    new: &std::ffi::CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid path pointers.
    let plain = || unsafe { libc::renameat2(olddir, old.as_ptr(), newdir, new.as_ptr(), flags) };
    match metadata_way() {
        Way::Plain => return sys(plain() as isize).map(|_| ()),
        Way::Inline => return sys(run_inline(plain) as isize).map(|_| ()),
        Way::Ring => {}
    }
    let sqe =
        opcode::RenameAt::new(types::Fd(olddir), old.as_ptr(), types::Fd(newdir), new.as_ptr()).flags(flags).build();
    result(Op { sqe: Some(sqe.into()), slot: None }.await).map(|_| ())
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
    let res = Op { sqe: Some(sqe.into()), slot: None }.await;
    drop(ts);
    match res {
        r if r == -libc::ETIME || r >= 0 => Ok(()),
        r => Err(io::Error::from_raw_os_error(-r)),
    }
}

/// mkdirat(2) as personality `personality` (0: the thread's own credentials).
pub async fn mkdirat_as(dirfd: RawFd, name: &std::ffi::CStr, mode: u32, personality: u16) -> io::Result<()> {
    if !on_ring() {
        // SAFETY: valid path pointer.
        return sys(unsafe { libc::mkdirat(dirfd, name.as_ptr(), mode) } as isize).map(|_| ());
    }
    let sqe = opcode::MkDirAt::new(types::Fd(dirfd), name.as_ptr()).mode(mode).build().personality(personality);
    result(Op { sqe: Some(sqe.into()), slot: None }.await).map(|_| ())
}

/// symlinkat(2) as personality `personality` (0: the thread's own credentials).
pub async fn symlinkat_as(
    target: &std::ffi::CStr,
    dirfd: RawFd,
    name: &std::ffi::CStr,
    personality: u16,
) -> io::Result<()> {
    if !on_ring() {
        // SAFETY: valid path pointers.
        return sys(unsafe { libc::symlinkat(target.as_ptr(), dirfd, name.as_ptr()) } as isize).map(|_| ());
    }
    let sqe = opcode::SymlinkAt::new(types::Fd(dirfd), target.as_ptr(), name.as_ptr()).build().personality(personality);
    result(Op { sqe: Some(sqe.into()), slot: None }.await).map(|_| ())
}

/// linkat(2) as personality `personality` (0: the thread's own credentials).
pub async fn linkat_as(
    olddir: RawFd,
    old: &std::ffi::CStr,
    newdir: RawFd,
    new: &std::ffi::CStr,
    flags: i32,
    personality: u16,
) -> io::Result<()> {
    if !on_ring() {
        // SAFETY: valid path pointers.
        return sys(unsafe { libc::linkat(olddir, old.as_ptr(), newdir, new.as_ptr(), flags) } as isize).map(|_| ());
    }
    let sqe = opcode::LinkAt::new(types::Fd(olddir), old.as_ptr(), types::Fd(newdir), new.as_ptr())
        .flags(flags)
        .build()
        .personality(personality);
    result(Op { sqe: Some(sqe.into()), slot: None }.await).map(|_| ())
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
        Way::Ring => {
            let sqe = opcode::OpenAt2::new(types::Fd(dirfd), path.as_ptr(), &how as *const types::OpenHow)
                .build()
                .personality(personality.unwrap_or(0));
            result(Op { sqe: Some(sqe.into()), slot: None }.await)?
        }
    };
    // SAFETY: a descriptor the kernel just opened for us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}
