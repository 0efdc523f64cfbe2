//! Per-operation counters kept by the dispatcher: requests, errors by errno, latency histograms.
//!
//! Everything is a relaxed atomic in a table sized at start-up, so recording costs a few
//! uncontended atomic adds and never allocates; readers (the metrics endpoint) sum whenever
//! they like. Latency buckets are fixed ([`LATENCY_BOUNDS_NS`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
}

impl Default for DispatchStats {
    fn default() -> Self {
        DispatchStats {
            ops: (0..=opcode::COUNT).map(|_| OpCounters::default()).collect(),
            errnos: (0..ERRNO_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            in_flight: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
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
