//! Child processes: interruptible, timed waits, and the Ctrl-C flag.
//!
//! SIGINT, SIGTERM and SIGHUP only set a flag. Every wait polls it; when set, the running child
//! is killed and the wait returns an error, so the caller unwinds and the mount guards unmount.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP set the interrupt flag instead of killing the harness.
/// Children get the default dispositions back at exec.
pub(crate) fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid value; the handler only stores to an atomic,
        // which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Whether the user asked the harness to stop.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails with "interrupted" once the user asked to stop.
pub(crate) fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// What a finished child left behind.
pub(crate) struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Wall time from just before spawn to reaping.
    pub elapsed: Duration,
    /// Captured standard output (empty unless piped).
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
}

impl Finished {
    /// Fails with the command's stderr tail unless it exited 0.
    pub fn check(self, what: &str) -> Result<Self> {
        if self.status.success() {
            return Ok(self);
        }
        let mut lines: Vec<&str> = Vec::new();
        for line in self.stderr.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if !lines.contains(&line) {
                lines.push(line);
            }
        }
        let mut tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        if tail.len() > 400 {
            let cut = (0..=400).rev().find(|i| tail.is_char_boundary(*i)).unwrap_or(0);
            tail.truncate(cut);
            tail.push_str("...");
        }
        bail!("{what} failed ({}): {tail}", self.status);
    }
}

/// Runs `cmd` to completion, timing it, with stdout captured unless `cmd` already set it, and
/// stderr captured. Kills it and fails on timeout or interrupt.
pub(crate) fn run(cmd: &mut Command, timeout: Duration, capture_stdout: bool) -> Result<Finished> {
    check_interrupted()?;
    if capture_stdout {
        cmd.stdout(Stdio::piped());
    }
    cmd.stderr(Stdio::piped()).stdin(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let stdout_reader = child.stdout.take().map(spawn_reader);
    let stderr_reader = child.stderr.take().map(spawn_reader);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let result = child.wait();
        let elapsed = start.elapsed();
        let _ = tx.send((result, elapsed));
    });
    let mut killed = None;
    let (status, elapsed) = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((status, elapsed)) => break (status?, elapsed),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("waiter thread vanished"),
        }
        if killed.is_none() {
            if interrupted() {
                killed = Some("interrupted");
            } else if start.elapsed() > timeout {
                killed = Some("timed out");
            }
            if killed.is_some() {
                // SAFETY: plain syscall; the child is not reaped yet (the waiter still holds it),
                // so the pid cannot have been reused.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    };
    let stdout = stdout_reader.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    let stderr = stderr_reader.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    if let Some(why) = killed {
        bail!("{:?} {why} after {:.1} s", cmd.get_program(), elapsed.as_secs_f64());
    }
    Ok(Finished { status, elapsed, stdout, stderr })
}

fn spawn_reader<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs a shell-free command quickly (setup steps): fails unless it exits 0.
pub(crate) fn run_ok(cmd: &mut Command, what: &str) -> Result<Finished> {
    run(cmd, Duration::from_secs(1800), true)?.check(what)
}

/// Sends `signal` to `pid` (or to the process group `-pid` when `group`).
pub(crate) fn signal(pid: u32, signal: libc::c_int, group: bool) {
    let target = if group { -(pid as libc::pid_t) } else { pid as libc::pid_t };
    // SAFETY: plain syscall.
    unsafe { libc::kill(target, signal) };
}

/// Waits up to `timeout` for `child` to exit; true when it did.
pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) => {}
        }
        if start.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
