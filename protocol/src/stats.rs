//! Per-operation counters kept by the dispatcher: requests, errors by errno, latency histograms.
//!
//! Shared-nothing: every thread that records (a queue thread, the /dev/fuse reader) owns a
//! slot of its own, claimed once per thread from a process-wide table ([`thread_slot`]), and
//! writes only the counters of its slot, with plain relaxed loads and stores (no atomic
//! read-modify-write, no cache line shared with another writer: slots are cache-line
//! aligned). A slot's counters are allocated on the thread's first request, so recording never
//! allocates after that. Readers (the metrics endpoint) sum the slots at scrape time. A thread
//! that finds every slot taken (more than [`MAX_SLOTS`] recording threads at once) counts into
//! a shared overflow slot with atomic adds. Latency buckets are fixed ([`LATENCY_BOUNDS_NS`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::abi::opcode;

/// Most threads that record with slots of their own at once (others share an overflow slot).
pub const MAX_SLOTS: usize = 128;

/// Which slots a live thread holds.
static SLOT_TAKEN: [AtomicBool; MAX_SLOTS] = [const { AtomicBool::new(false) }; MAX_SLOTS];

/// A thread's claim on a slot, released when the thread ends.
struct SlotClaim(usize);

impl SlotClaim {
    fn claim() -> SlotClaim {
        for (i, taken) in SLOT_TAKEN.iter().enumerate() {
            // Acquire: the previous owner's writes to the slot's counters happened before.
            if !taken.load(Ordering::Relaxed)
                && taken.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                return SlotClaim(i);
            }
        }
        SlotClaim(OVERFLOW)
    }
}

impl Drop for SlotClaim {
    fn drop(&mut self) {
        if let Some(t) = SLOT_TAKEN.get(self.0) {
            // Release: this thread's counter writes are visible to the slot's next owner.
            t.store(false, Ordering::Release);
        }
    }
}

/// Index of the overflow slot (shared; counted with atomic adds).
const OVERFLOW: usize = MAX_SLOTS;

thread_local! {
    static SLOT: SlotClaim = SlotClaim::claim();
}

/// The calling thread's slot: `< MAX_SLOTS` when the thread owns it (only this thread writes
/// its counters), [`MAX_SLOTS`] for the shared overflow slot.
pub fn thread_slot() -> usize {
    SLOT.try_with(|s| s.0).unwrap_or(OVERFLOW)
}

/// Adds `v` to a counter of slot `slot`: a load and a store when the thread owns the slot, an
/// atomic add in the shared overflow slot.
#[inline]
fn add(a: &AtomicU64, v: u64, slot: usize) {
    if slot < MAX_SLOTS {
        a.store(a.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    } else {
        a.fetch_add(v, Ordering::Relaxed);
    }
}

/// Upper bounds of the latency buckets, in nanoseconds (the last bucket is +Inf).
pub const LATENCY_BOUNDS_NS: [u64; 16] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
];

/// Number of errno values tracked individually (larger ones count as `other`).
pub const ERRNO_SLOTS: usize = 134;

/// Counters of one opcode (one slot's, or the sum of all slots' from [`DispatchStats::op`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct OpCounters {
    /// Requests served.
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Latency histogram: count per bucket (last = above every bound).
    pub buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    /// Sum of latencies in nanoseconds.
    pub latency_sum_ns: AtomicU64,
    /// Reply payload bytes (data read for READ).
    pub bytes_out: AtomicU64,
    /// Request data bytes (data written for WRITE).
    pub bytes_in: AtomicU64,
}

impl Default for OpCounters {
    fn default() -> Self {
        OpCounters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_ns: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
        }
    }
}

impl OpCounters {
    /// Adds `other`'s values to these (summing slots).
    fn absorb(&self, other: &OpCounters) {
        let sum = |a: &AtomicU64, b: &AtomicU64| {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        sum(&self.requests, &other.requests);
        sum(&self.errors, &other.errors);
        for (a, b) in self.buckets.iter().zip(&other.buckets) {
            sum(a, b);
        }
        sum(&self.latency_sum_ns, &other.latency_sum_ns);
        sum(&self.bytes_out, &other.bytes_out);
        sum(&self.bytes_in, &other.bytes_in);
    }
}

/// Start times of the requests being served, to report the oldest one's age.
///
/// A fixed table: each thread slot ([`thread_slot`]) has [`InFlight::PER_SLOT`] entries of its
/// own (written by that thread only), the overflow slot's are claimed by compare-and-swap. A
/// request takes a free entry (0 → its start time) and clears it when done; when its slot's
/// entries are all taken the request simply goes untracked.
#[derive(Debug)]
pub struct InFlight {
    slots: Box<[Starts]>,
}

/// One slot's start times, on cache lines of their own.
#[derive(Debug)]
#[repr(align(128))]
struct Starts([AtomicU64; InFlight::PER_SLOT]);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// `t` as nanoseconds since the epoch, +1 so that a start time is never 0 (the free marker).
fn ns_at(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos().min(u64::MAX as u128 - 1) as u64 + 1
}

thread_local! {
    /// The last [`clock`] reading on this thread.
    static LAST_READING: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Reads the monotonic clock and remembers the reading as this thread's
/// [`last_reading`]. The request path shares its readings this way: the dispatcher's start and
/// end of a request, the transport's after each wait for completions, and the transport's
/// timing of inline backing calls, which measures from the previous reading instead of taking
/// one of its own before each call.
pub fn clock() -> Instant {
    let t = Instant::now();
    LAST_READING.set(Some(t));
    t
}

/// The last [`clock`] reading on this thread, if any.
pub fn last_reading() -> Option<Instant> {
    LAST_READING.get()
}

impl InFlight {
    /// Requests tracked per thread slot (a queue serves at most its depth at once).
    pub const PER_SLOT: usize = 32;

    fn new() -> Self {
        epoch();
        InFlight { slots: (0..=MAX_SLOTS).map(|_| Starts(std::array::from_fn(|_| AtomicU64::new(0)))).collect() }
    }

    /// Records a request start; returns its entry (or `usize::MAX` when untracked).
    pub fn enter(&self) -> usize {
        self.enter_at(Instant::now())
    }

    /// [`enter`](Self::enter) for a request that started at `start`.
    pub fn enter_at(&self, start: Instant) -> usize {
        let start = ns_at(start);
        let slot = thread_slot();
        let Some(starts) = self.slots.get(slot) else { return usize::MAX };
        for (i, s) in starts.0.iter().enumerate() {
            let free = if slot < MAX_SLOTS {
                // Only this thread writes its slot's entries.
                s.load(Ordering::Relaxed) == 0 && {
                    s.store(start, Ordering::Relaxed);
                    true
                }
            } else {
                s.compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            };
            if free {
                return slot * Self::PER_SLOT + i;
            }
        }
        usize::MAX
    }

    /// Records a request end.
    pub fn exit(&self, entry: usize) {
        if let Some(s) = self.slots.get(entry / Self::PER_SLOT).and_then(|s| s.0.get(entry % Self::PER_SLOT)) {
            s.store(0, Ordering::Relaxed);
        }
    }

    /// Age of the oldest request being served (zero when none).
    pub fn oldest_age(&self) -> Duration {
        let oldest =
            self.slots.iter().flat_map(|s| s.0.iter()).map(|s| s.load(Ordering::Relaxed)).filter(|&v| v != 0).min();
        oldest.map_or(Duration::ZERO, |start| Duration::from_nanos(now_ns().saturating_sub(start)))
    }
}

/// The counters one thread slot writes.
#[derive(Debug)]
#[repr(align(128))]
struct Slot {
    /// Per opcode (index = opcode; the last entry collects unknown opcodes).
    ops: [OpCounters; opcode::COUNT + 1],
    /// Errors by errno (index = errno, 0 = out of range).
    errnos: [AtomicU64; ERRNO_SLOTS],
    /// Requests started less requests finished (wrapping: a slot's sum may dip below zero
    /// only transiently across slots, never in total).
    in_flight: AtomicU64,
}

impl Slot {
    fn new() -> Box<Slot> {
        Box::new(Slot {
            ops: std::array::from_fn(|_| OpCounters::default()),
            errnos: std::array::from_fn(|_| AtomicU64::new(0)),
            in_flight: AtomicU64::new(0),
        })
    }
}

/// Dispatcher statistics: one set of counters per recording thread, summed when read.
#[derive(Debug)]
pub struct DispatchStats {
    /// Per thread slot (the last is the shared overflow slot); allocated at first use.
    slots: Box<[OnceLock<Box<Slot>>]>,
    /// Requests whose arguments could not be parsed (rare; a shared atomic).
    pub malformed: AtomicU64,
    /// Requests the kernel resent (`FUSE_NOTIFY_RESEND` after a crash failover; rare: a
    /// shared atomic).
    pub resent: AtomicU64,
    /// Resent requests whose first attempt had already taken effect (answered as done).
    pub resent_done: AtomicU64,
    /// Start times of the requests being served.
    pub inflight_starts: InFlight,
}

impl Default for DispatchStats {
    fn default() -> Self {
        DispatchStats {
            slots: (0..=MAX_SLOTS).map(|_| OnceLock::new()).collect(),
            malformed: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            resent_done: AtomicU64::new(0),
            inflight_starts: InFlight::new(),
        }
    }
}

/// A request being served (see [`DispatchStats::begin`]).
#[derive(Debug)]
pub struct Started {
    slot: usize,
    entry: usize,
}

fn op_index(op: u32) -> usize {
    (op as usize).min(opcode::COUNT)
}

impl DispatchStats {
    /// The calling thread's slot and its counters (allocated on the thread's first use).
    fn mine(&self) -> (usize, &Slot) {
        let slot = thread_slot().min(MAX_SLOTS);
        (slot, self.slots[slot].get_or_init(Slot::new))
    }

    fn each(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter_map(|s| s.get().map(|b| &**b))
    }

    /// The counters of `op`, summed over every thread.
    pub fn op(&self, op: u32) -> OpCounters {
        let sum = OpCounters::default();
        for s in self.each() {
            sum.absorb(&s.ops[op_index(op)]);
        }
        sum
    }

    /// Requests of `op` served so far.
    pub fn requests(&self, op: u32) -> u64 {
        self.each().map(|s| s.ops[op_index(op)].requests.load(Ordering::Relaxed)).sum()
    }

    /// Error replies by errno (index = errno, 0 = out of range), summed over every thread.
    pub fn errnos(&self) -> Vec<u64> {
        let mut v = vec![0u64; ERRNO_SLOTS];
        for s in self.each() {
            for (a, b) in v.iter_mut().zip(&s.errnos) {
                *a += b.load(Ordering::Relaxed);
            }
        }
        v
    }

    /// Requests being served right now.
    pub fn in_flight(&self) -> u64 {
        self.each().fold(0u64, |a, s| a.wrapping_add(s.in_flight.load(Ordering::Relaxed)))
    }

    /// Records a request start (in flight, and its start time); end it with
    /// [`record`](Self::record) and [`end`](Self::end) on the same thread.
    pub fn begin(&self) -> Started {
        self.begin_at(Instant::now())
    }

    /// [`begin`](Self::begin) for a request that started at `start` (a clock reading the
    /// caller already has).
    pub fn begin_at(&self, start: Instant) -> Started {
        let (slot, s) = self.mine();
        add(&s.in_flight, 1, slot);
        Started { slot, entry: self.inflight_starts.enter_at(start) }
    }

    /// The request `started` is no longer in flight.
    pub fn end(&self, started: Started) {
        self.inflight_starts.exit(started.entry);
        if let Some(s) = self.slots[started.slot.min(MAX_SLOTS)].get() {
            // The slot of the thread that began it: begin and end run on one thread (a
            // request's future is polled by the queue that started it).
            add(&s.in_flight, u64::MAX, started.slot);
        }
    }

    /// Records one finished request.
    pub fn record(&self, op: u32, error: i32, elapsed: Duration, bytes_in: usize, bytes_out: usize) {
        let (slot, s) = self.mine();
        let c = &s.ops[op_index(op)];
        add(&c.requests, 1, slot);
        if error != 0 {
            add(&c.errors, 1, slot);
            let e = error.unsigned_abs() as usize;
            add(&s.errnos[if e < ERRNO_SLOTS { e } else { 0 }], 1, slot);
        }
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        let b = LATENCY_BOUNDS_NS.iter().position(|&bound| ns <= bound).unwrap_or(LATENCY_BOUNDS_NS.len());
        add(&c.buckets[b], 1, slot);
        add(&c.latency_sum_ns, ns, slot);
        if bytes_in > 0 {
            add(&c.bytes_in, bytes_in as u64, slot);
        }
        if bytes_out > 0 {
            add(&c.bytes_out, bytes_out as u64, slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_in_flight_age() {
        let f = InFlight::new();
        assert_eq!(f.oldest_age(), Duration::ZERO);
        let a = f.enter();
        std::thread::sleep(Duration::from_millis(20));
        let b = f.enter();
        assert_ne!(a, b);
        assert!(f.oldest_age() >= Duration::from_millis(20));
        f.exit(a);
        assert!(f.oldest_age() < Duration::from_millis(20));
        f.exit(b);
        assert_eq!(f.oldest_age(), Duration::ZERO);
    }

    #[test]
    fn buckets_and_errors() {
        let s = DispatchStats::default();
        s.record(opcode::READ, 0, Duration::from_micros(3), 0, 4096);
        s.record(opcode::READ, -libc::ENOENT, Duration::from_secs(100), 0, 0);
        s.record(9999, 0, Duration::ZERO, 0, 0);
        let r = s.op(opcode::READ);
        assert_eq!(r.requests.load(Ordering::Relaxed), 2);
        assert_eq!(r.errors.load(Ordering::Relaxed), 1);
        assert_eq!(r.buckets[2].load(Ordering::Relaxed), 1);
        assert_eq!(r.buckets[LATENCY_BOUNDS_NS.len()].load(Ordering::Relaxed), 1);
        assert_eq!(r.bytes_out.load(Ordering::Relaxed), 4096);
        assert_eq!(s.errnos()[libc::ENOENT as usize], 1);
        assert_eq!(s.requests(9999), 1);
    }

    /// Counts from many threads (each its own slot, and slots reused as threads end) add up,
    /// and the in-flight gauge returns to zero.
    #[test]
    fn threads_sum_at_read_time() {
        let s = std::sync::Arc::new(DispatchStats::default());
        for round in 0..3 {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        for _ in 0..1000 {
                            let t = s.begin();
                            s.record(opcode::LOOKUP, -libc::ENOENT, Duration::from_micros(1), 0, 0);
                            s.end(t);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(s.requests(opcode::LOOKUP), 8000 * (round + 1));
            assert_eq!(s.op(opcode::LOOKUP).errors.load(Ordering::Relaxed), 8000 * (round + 1));
            assert_eq!(s.errnos()[libc::ENOENT as usize], 8000 * (round + 1));
            assert_eq!(s.in_flight(), 0);
            assert_eq!(s.inflight_starts.oldest_age(), Duration::ZERO);
        }
    }

    #[test]
    fn in_flight_gauge() {
        let s = DispatchStats::default();
        let a = s.begin();
        let b = s.begin();
        assert_eq!(s.in_flight(), 2);
        s.end(a);
        assert_eq!(s.in_flight(), 1);
        s.end(b);
        assert_eq!(s.in_flight(), 0);
    }
}
