//! PID 1 of the guest of scripts/arm64.sh (built static for aarch64 with rustc alone, no
//! crates): mounts /proc, /sys, /dev, /tmp and tracefs, loads /fuse.ko, runs `/ringfs-bpf-tests`
//! (the ringfs-bpf unit tests built for aarch64) with the arguments on the kernel command line
//! after `--`, then mounts a directory with `/ringfs` and uses it (a file read through the mount,
//! one written through it, SIGTERM, the server's exit), prints `ARM64-RC=<0 or 1>` on the
//! console and powers the machine off.

use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_long, c_ulong, c_void};
use std::time::{Duration, Instant};

extern "C" {
    fn mount(
        source: *const c_char,
        target: *const c_char,
        fstype: *const c_char,
        flags: c_ulong,
        data: *const c_void,
    ) -> c_int;
    fn reboot(cmd: c_int) -> c_int;
    fn sync();
    fn syscall(num: c_long, ...) -> c_long;
    fn kill(pid: c_int, sig: c_int) -> c_int;
}

/// `RB_POWER_OFF` of reboot(2).
const RB_POWER_OFF: c_int = 0x4321_fedc_u32 as c_int;
/// `finit_module` in the generic system call table (arm64).
const SYS_FINIT_MODULE: c_long = 273;
const SIGTERM: c_int = 15;

fn mount_fs(fstype: &str, target: &str) {
    let _ = std::fs::create_dir_all(target);
    let (f, t) = (CString::new(fstype).unwrap(), CString::new(target).unwrap());
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    if unsafe { mount(f.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) } != 0 {
        println!("arm64-init: mount {fstype} on {target}: {}", std::io::Error::last_os_error());
    }
}

fn load_module(path: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: an open descriptor and an empty, NUL-terminated parameter string.
    if unsafe { syscall(SYS_FINIT_MODULE, f.as_raw_fd(), c"".as_ptr(), 0) } != 0 {
        return Err(format!("finit_module {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            return Err(format!("{what}: not within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Mounts /tmp/b on /tmp/m with /ringfs and uses the mount.
fn mount_and_use() -> Result<(), String> {
    wait_for("/dev/fuse", Duration::from_secs(10), || std::path::Path::new("/dev/fuse").exists())?;
    for d in ["/tmp/b", "/tmp/m"] {
        std::fs::create_dir_all(d).map_err(|e| format!("{d}: {e}"))?;
    }
    std::fs::write("/tmp/b/hello", b"served on arm64\n").map_err(|e| e.to_string())?;
    let mut server = std::process::Command::new("/ringfs")
        .args(["mount", "/tmp/b", "/tmp/m", "-f", "-o", "metrics_addr="])
        .spawn()
        .map_err(|e| format!("/ringfs: {e}"))?;
    let result = (|| {
        wait_for("the mount", Duration::from_secs(60), || std::fs::read("/tmp/m/hello").is_ok())?;
        let got = std::fs::read("/tmp/m/hello").map_err(|e| e.to_string())?;
        if got != b"served on arm64\n" {
            return Err(format!("read through the mount: {:?}", String::from_utf8_lossy(&got)));
        }
        std::fs::write("/tmp/m/new", b"written through the mount").map_err(|e| format!("write: {e}"))?;
        let back = std::fs::read("/tmp/b/new").map_err(|e| format!("backing file: {e}"))?;
        if back != b"written through the mount" {
            return Err("the write did not land in the backing directory".into());
        }
        println!("arm64-init: the mount serves (read and write through /tmp/m)");
        Ok(())
    })();
    // SAFETY: a child we started.
    unsafe { kill(server.id() as c_int, SIGTERM) };
    let mut status = None;
    let _ = wait_for("the server's exit after SIGTERM", Duration::from_secs(30), || {
        status = server.try_wait().ok().flatten();
        status.is_some()
    });
    result?;
    match status {
        Some(s) if s.success() => {}
        other => return Err(format!("server exit after SIGTERM: {other:?}")),
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.contains(" /tmp/m ") {
        return Err("still mounted after the server exited".into());
    }
    println!("arm64-init: SIGTERM unmounted and the server exited 0");
    Ok(())
}

fn main() {
    mount_fs("proc", "/proc");
    mount_fs("sysfs", "/sys");
    mount_fs("devtmpfs", "/dev");
    mount_fs("tmpfs", "/tmp");
    mount_fs("tracefs", "/sys/kernel/tracing");
    // Before the tests: the fuse module's BTF (struct fuse_req, ...) is then there to relocate
    // against, as on a machine that mounted FUSE once.
    let module = load_module("/fuse.ko");
    if let Err(e) = &module {
        println!("arm64-init: {e}");
    }
    // The kernel passes what follows `--` on its command line to init as arguments.
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("arm64-init: running /ringfs-bpf-tests {}", args.join(" "));
    let tests_ok = match std::process::Command::new("/ringfs-bpf-tests").args(&args).env("CI", "true").status() {
        Ok(s) => s.success(),
        Err(e) => {
            println!("arm64-init: cannot run /ringfs-bpf-tests: {e}");
            false
        }
    };
    let mount_ok = match module.and_then(|()| mount_and_use()) {
        Ok(()) => true,
        Err(e) => {
            println!("arm64-init: mount test FAILED: {e}");
            false
        }
    };
    println!("ARM64-RC={}", if tests_ok && mount_ok { 0 } else { 1 });
    // SAFETY: plain system calls; PID 1 powering off is the end of the run.
    unsafe {
        sync();
        reboot(RB_POWER_OFF);
    }
}
