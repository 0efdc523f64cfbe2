//! A request's future, stored in memory its slot keeps from one request to the next.
//!
//! Every request of a queue slot is served by a future of the same type (one `async` block of
//! `ring::start_task` per channel), so the slot allocates room for it once, with the first
//! request, and each later request's future is written into that room: no heap allocation per
//! request. The future stays where it was written until it is dropped (it is polled pinned in
//! place), and the room is reused or freed only once it is gone.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// What a request's future yields: (0 or a negative errno, or 1 for "no reply"; reply length).
pub(crate) type Reply = (i32, usize);

/// One slot's request future (or none), in a buffer reused across requests.
pub(crate) struct TaskCell {
    /// The room, `layout` bytes (dangling while nothing is allocated).
    buf: NonNull<u8>,
    layout: Option<Layout>,
    /// The future in `buf`, while there is one.
    live: Option<NonNull<dyn Future<Output = Reply>>>,
}

impl TaskCell {
    /// An empty cell; nothing allocated yet.
    pub(crate) const fn new() -> TaskCell {
        TaskCell { buf: NonNull::dangling(), layout: None, live: None }
    }

    /// No future is stored.
    pub(crate) fn is_empty(&self) -> bool {
        self.live.is_none()
    }

    /// Bytes of room held (for tests).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.layout.map_or(0, |l| l.size())
    }

    /// Stores the future `make` returns, dropping the one stored before, if any. Allocates
    /// only when the room held is too small or not aligned enough for `T` (the first request
    /// of a slot). `make` is called with the room ready, so the compiler can build the future
    /// in place instead of copying it there.
    pub(crate) fn set<T, M>(&mut self, make: M)
    where
        T: Future<Output = Reply> + 'static,
        M: FnOnce() -> T,
    {
        self.clear();
        let need = Layout::new::<T>();
        let at: *mut T = if need.size() == 0 {
            NonNull::<T>::dangling().as_ptr()
        } else {
            if !self.layout.is_some_and(|l| l.size() >= need.size() && l.align() >= need.align()) {
                self.free();
                // SAFETY: `need` has a non-zero size.
                let p = unsafe { alloc(need) };
                let Some(p) = NonNull::new(p) else { handle_alloc_error(need) };
                self.buf = p;
                self.layout = Some(need);
            }
            self.buf.as_ptr().cast()
        };
        // SAFETY: `at` is valid for a write of `T` and aligned for it (the room is at least
        // `need` in size and alignment, or `T` is zero-sized and `at` a dangling aligned
        // pointer), and holds no live value (cleared above).
        unsafe { at.write(make()) };
        let fut: *mut (dyn Future<Output = Reply> + 'static) = at;
        self.live = NonNull::new(fut);
    }

    /// Polls the stored future (`None` when there is none).
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Option<Poll<Reply>> {
        let fut = self.live?;
        // SAFETY: `fut` points at the live future this cell owns, borrowed mutably through
        // `&mut self`. It is never moved: it stays where `set` wrote it until `clear` drops it
        // in place, and the room is reused or freed only after that, so pinning holds.
        Some(unsafe { Pin::new_unchecked(&mut *fut.as_ptr()) }.poll(cx))
    }

    /// Drops the stored future, if any, keeping the room for the next one.
    pub(crate) fn clear(&mut self) {
        if let Some(fut) = self.live.take() {
            // SAFETY: the future is live and owned by this cell; taken out of `live` first,
            // so it is dropped once even if its drop panics (the cell is then empty).
            unsafe { std::ptr::drop_in_place(fut.as_ptr()) };
        }
    }

    /// Frees the room (nothing may be stored).
    fn free(&mut self) {
        debug_assert!(self.live.is_none());
        if let Some(l) = self.layout.take() {
            // SAFETY: allocated by `set` with this layout, and no future lives in it.
            unsafe { dealloc(self.buf.as_ptr(), l) };
            self.buf = NonNull::dangling();
        }
    }
}

impl Drop for TaskCell {
    fn drop(&mut self) {
        // A panic in the future's drop leaves the room allocated (leaked), never freed under
        // a live value.
        self.clear();
        self.free();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::Waker;

    /// Counts its drops; pending on its first poll when `pending_once`.
    struct Probe {
        drops: Rc<Cell<u32>>,
        pending_once: bool,
        value: i32,
        _pad: [u64; 8],
    }

    impl Future for Probe {
        type Output = Reply;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
            if self.pending_once {
                self.pending_once = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready((self.value, 7))
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.drops.set(self.drops.get() + 1);
        }
    }

    #[test]
    fn reuses_its_room_and_drops_each_future_once() {
        let drops = Rc::new(Cell::new(0));
        let mut cell = TaskCell::new();
        assert!(cell.is_empty());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(cell.poll(&mut cx).is_none());
        let probe = |value, pending_once| {
            let drops = drops.clone();
            move || Probe { drops, pending_once, value, _pad: [0; 8] }
        };
        cell.set(probe(1, true));
        let room = cell.buf;
        assert!(cell.capacity() >= size_of::<Probe>());
        assert_eq!(cell.poll(&mut cx), Some(Poll::Pending));
        assert_eq!(cell.poll(&mut cx), Some(Poll::Ready((1, 7))));
        cell.clear();
        assert!(cell.is_empty());
        assert_eq!(drops.get(), 1);
        for i in 2..100 {
            cell.set(probe(i, i % 2 == 0));
            assert_eq!(cell.buf, room, "the room is reused");
            while cell.poll(&mut cx) == Some(Poll::Pending) {}
            // Replaced without a clear: the old future is dropped by `set`.
        }
        assert_eq!(drops.get(), 98);
        // A larger future of another type: new room, the old one freed.
        let big = [1u8; 4096];
        cell.set(move || async move { (0, big.iter().map(|&b| b as usize).sum()) });
        assert_eq!(drops.get(), 99);
        assert!(cell.capacity() >= 4096);
        assert_eq!(cell.poll(&mut cx), Some(Poll::Ready((0, 4096))));
        cell.set(probe(5, false));
        drop(cell);
        assert_eq!(drops.get(), 100, "dropping the cell drops its future");
    }

    #[test]
    fn zero_sized_futures() {
        let mut cell = TaskCell::new();
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(size_of::<std::future::Pending<Reply>>(), 0);
        cell.set(std::future::pending::<Reply>);
        assert_eq!(cell.capacity(), 0, "nothing allocated for a zero-sized future");
        assert_eq!(cell.poll(&mut cx), Some(Poll::Pending));
        cell.clear();
        assert!(cell.is_empty());
        cell.set(|| std::future::ready((-2, 0)));
        assert_eq!(cell.poll(&mut cx), Some(Poll::Ready((-2, 0))));
        cell.set(std::future::pending::<Reply>);
        drop(cell);
    }
}
