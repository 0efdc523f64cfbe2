//! Cost of demand tracing for processes *outside* the mount: the syscall tracepoints run for
//! every system call on the machine, the page-fault ones for every user page fault. Times a
//! syscall-heavy loop (fstat, read of /dev/zero, getppid) and a page-fault loop (anonymous
//! memory touched page by page) without the programs, with fallback accounting only, and with
//! demand tracing, and prints the ratios. As root: `cargo run --release -p bpf-programs --example overhead`.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// CPU time of the calling thread: unlike wall-clock time, it does not count time the thread
/// waited for a CPU, so other load on the machine disturbs it less.
struct Instant(Duration);

impl Instant {
    fn now() -> Instant {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid out pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Instant(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    fn elapsed(&self) -> Duration {
        Instant::now().0.saturating_sub(self.0)
    }
}

use ringfs_bpf::{Accounting, AccountingOptions};

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

/// Pages faulted in per run of [`faults`].
const FAULT_PAGES: usize = 16384;

/// Maps 64 MiB of anonymous memory, touches every page (one fault each), unmaps it.
fn faults() -> Duration {
    let len = FAULT_PAGES * 4096;
    let start = Instant::now();
    // SAFETY: a fresh private anonymous mapping, written inside its bounds, then unmapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        for off in (0..len).step_by(4096) {
            std::ptr::write_volatile((p as *mut u8).add(off), 1);
        }
        libc::munmap(p, len);
    }
    start.elapsed()
}

fn best_faults(n: usize) -> Duration {
    (0..n).map(|_| faults()).min().unwrap_or_default()
}

fn main() {
    let iters = 500_000;
    // Any device number will do: the programs run for every syscall and filter by device.
    let opts = |demand| AccountingOptions {
        dev: libc::makedev(0, 9999),
        mountpoint: "/nonexistent".into(),
        demand_tracing: demand,
        tracepoint_overrides: Vec::new(),
        attach: ringfs_bpf::Attach::TpBtf,
    };
    let (base, base_f) = (best_of(5, iters), best_faults(5));
    let (fallback_only, fallback_f) = {
        let _a = Accounting::load(&opts(false)).expect("load accounting");
        (best_of(5, iters), best_faults(5))
    };
    let (demand, demand_f) = {
        let _a = Accounting::load(&opts(true)).expect("load accounting with demand tracing");
        (best_of(5, iters), best_faults(5))
    };
    let per = |d: Duration| d.as_nanos() as f64 / (iters as f64 * 3.0);
    println!("syscalls: {} per run (fstat + read + getppid), best of 5", iters * 3);
    println!("no eBPF:          {:8.1} ns/syscall", per(base));
    println!("fallbacks only:   {:8.1} ns/syscall  ratio {:.3}", per(fallback_only), per(fallback_only) / per(base));
    println!("demand tracing:   {:8.1} ns/syscall  ratio {:.3}", per(demand), per(demand) / per(base));
    let pf = |d: Duration| d.as_nanos() as f64 / FAULT_PAGES as f64;
    println!("page faults: {FAULT_PAGES} per run (anonymous memory, map + touch + unmap), best of 5");
    println!("no eBPF:          {:8.1} ns/fault", pf(base_f));
    println!("fallbacks only:   {:8.1} ns/fault  ratio {:.3}", pf(fallback_f), pf(fallback_f) / pf(base_f));
    println!("demand tracing:   {:8.1} ns/fault  ratio {:.3}", pf(demand_f), pf(demand_f) / pf(base_f));
}
