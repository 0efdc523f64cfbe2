//! Cost of demand tracing for processes *outside* the mount: the syscall tracepoints run for
//! every system call on the machine. Times a syscall-heavy loop (fstat, read of /dev/zero,
//! getppid) without the programs, with fallback accounting only, and with demand tracing, and
//! prints the ratios. As root: `cargo run --release -p bpf-programs --example overhead`.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use bpf_programs::{Accounting, AccountingOptions};

fn workload(iters: u32) -> Duration {
    let f = std::fs::File::open("/dev/zero").expect("open /dev/zero");
    let mut buf = [0u8; 64];
    // SAFETY: plain syscalls on a valid fd and buffers.
    let start = Instant::now();
    for _ in 0..iters {
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(f.as_raw_fd(), &mut st);
            libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
            libc::getppid();
        }
    }
    start.elapsed()
}

fn best_of(n: usize, iters: u32) -> Duration {
    (0..n).map(|_| workload(iters)).min().unwrap_or_default()
}

fn main() {
    let iters = 500_000;
    // Any device number will do: the programs run for every syscall and filter by device.
    let opts = |demand| AccountingOptions {
        dev: libc::makedev(0, 9999),
        mountpoint: "/nonexistent".into(),
        demand_tracing: demand,
    };
    let base = best_of(5, iters);
    let fallback_only = {
        let _a = Accounting::load(&opts(false)).expect("load accounting");
        best_of(5, iters)
    };
    let demand = {
        let _a = Accounting::load(&opts(true)).expect("load accounting with demand tracing");
        best_of(5, iters)
    };
    let per = |d: Duration| d.as_nanos() as f64 / (iters as f64 * 3.0);
    println!("syscalls: {} per run (fstat + read + getppid), best of 5", iters * 3);
    println!("no eBPF:          {:8.1} ns/syscall", per(base));
    println!("fallbacks only:   {:8.1} ns/syscall  ratio {:.3}", per(fallback_only), per(fallback_only) / per(base));
    println!("demand tracing:   {:8.1} ns/syscall  ratio {:.3}", per(demand), per(demand) / per(base));
}
