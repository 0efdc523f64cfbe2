//! Per-operation counters kept by the dispatcher: requests, errors by errno, latency histograms.
//!
//! Everything is a relaxed atomic in a table sized at start-up, so recording costs a few
//! uncontended atomic adds and never allocates; readers (the metrics endpoint) sum whenever
//! they like. Latency buckets are fixed ([`LATENCY_BOUNDS_NS`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::abi::opcode;

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

/// Counters of one opcode.
#[derive(Debug)]
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

/// Start times of the requests being served, to report the oldest one's age.
///
/// A fixed table of slots; a request claims a free slot (compare-and-swap of 0 → its start
/// time) and clears it when done. When every slot is taken the request simply goes untracked.
#[derive(Debug)]
pub struct InFlight {
    slots: Box<[AtomicU64]>,
    next: AtomicUsize,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    // +1 so that a start time is never 0 (the free marker).
    epoch().elapsed().as_nanos().min(u64::MAX as u128 - 1) as u64 + 1
}

impl InFlight {
    const SLOTS: usize = 4096;

    fn new() -> Self {
        epoch();
        InFlight { slots: (0..Self::SLOTS).map(|_| AtomicU64::new(0)).collect(), next: AtomicUsize::new(0) }
    }

    /// Records a request start; returns its slot (or `usize::MAX` when untracked).
    pub fn enter(&self) -> usize {
        let start = now_ns();
        let base = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..8 {
            let i = (base + k * 97) % Self::SLOTS;
            if self.slots[i].compare_exchange(0, start, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                return i;
            }
        }
        usize::MAX
    }

    /// Records a request end.
    pub fn exit(&self, slot: usize) {
        if let Some(s) = self.slots.get(slot) {
            s.store(0, Ordering::Relaxed);
        }
    }

    /// Age of the oldest request being served (zero when none).
    pub fn oldest_age(&self) -> Duration {
        let oldest = self.slots.iter().map(|s| s.load(Ordering::Relaxed)).filter(|&v| v != 0).min();
        oldest.map_or(Duration::ZERO, |start| Duration::from_nanos(now_ns().saturating_sub(start)))
    }
}

/// Dispatcher statistics.
#[derive(Debug)]
pub struct DispatchStats {
    /// Per opcode (index = opcode; the last slot collects unknown opcodes).
    pub ops: Vec<OpCounters>,
    /// Errors by errno (index = errno, 0 = out of range).
    pub errnos: Vec<AtomicU64>,
    /// Requests being served right now.
    pub in_flight: AtomicU64,
    /// Requests whose arguments could not be parsed.
    pub malformed: AtomicU64,
    /// Start times of the requests being served.
    pub inflight_starts: InFlight,
}

impl Default for DispatchStats {
    fn default() -> Self {
        DispatchStats {
            ops: (0..=opcode::COUNT).map(|_| OpCounters::default()).collect(),
            errnos: (0..ERRNO_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            in_flight: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            inflight_starts: InFlight::new(),
        }
    }
}

impl DispatchStats {
    /// The counters of `op`.
    pub fn op(&self, op: u32) -> &OpCounters {
        &self.ops[(op as usize).min(opcode::COUNT)]
    }

    /// Requests of `op` served so far.
    pub fn requests(&self, op: u32) -> u64 {
        self.op(op).requests.load(Ordering::Relaxed)
    }

    /// Records one finished request.
    pub fn record(&self, op: u32, error: i32, elapsed: Duration, bytes_in: usize, bytes_out: usize) {
        let c = self.op(op);
        c.requests.fetch_add(1, Ordering::Relaxed);
        if error != 0 {
            c.errors.fetch_add(1, Ordering::Relaxed);
            let e = (-error) as usize;
            self.errnos[if e < ERRNO_SLOTS { e } else { 0 }].fetch_add(1, Ordering::Relaxed);
        }
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        let b = LATENCY_BOUNDS_NS.iter().position(|&bound| ns <= bound).unwrap_or(LATENCY_BOUNDS_NS.len());
        c.buckets[b].fetch_add(1, Ordering::Relaxed);
        c.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
        if bytes_in > 0 {
            c.bytes_in.fetch_add(bytes_in as u64, Ordering::Relaxed);
        }
        if bytes_out > 0 {
            c.bytes_out.fetch_add(bytes_out as u64, Ordering::Relaxed);
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
        assert_eq!(s.errnos[libc::ENOENT as usize].load(Ordering::Relaxed), 1);
        assert_eq!(s.requests(9999), 1);
    }
}
