//! The watchdog: a small process, forked before any thread exists, that lazily unmounts the
//! mount when the server dies without unmounting (kill -9, a crash), so the mount point never
//! stays "Transport endpoint is not connected".
//!
//! Protocol over a pipe from server to watchdog: `M` + 8-byte device number once mounted,
//! `D` when the server has unmounted cleanly. On end-of-file without `D`, the watchdog
//! detaches the mount point if it still carries the server's mount (same device number).

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::mount::parse_mountinfo;

/// The server's end of the watchdog pipe.
#[derive(Debug)]
pub struct Watchdog {
    pipe: std::fs::File,
    pid: libc::pid_t,
}

impl Watchdog {
    /// Forks the watchdog for `mountpoint`. Must be called before any thread is started.
    ///
    /// With `detach`, the watchdog lets go of standard descriptors that a waiting parent may
    /// read to end-of-file (see [`detach_stdio`]): use it for a server that runs in the
    /// background.
    pub fn spawn(mountpoint: &Path, detach: bool) -> io::Result<Watchdog> {
        let (rd, wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: the process is single-threaded here (documented precondition), so the child
        // may run arbitrary code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            drop(wr);
            if detach {
                detach_stdio();
            }
            let code = watch(std::fs::File::from(rd), mountpoint, &target);
            // SAFETY: leaving the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        drop(rd);
        Ok(Watchdog { pipe: std::fs::File::from(wr), pid })
    }

    /// Tells the watchdog which mount to guard.
    pub fn mounted(&mut self, dev: u64) -> io::Result<()> {
        let mut msg = [0u8; 9];
        msg[0] = b'M';
        msg[1..].copy_from_slice(&dev.to_ne_bytes());
        self.pipe.write_all(&msg)
    }

    /// Tells the watchdog the server unmounted cleanly, and reaps it.
    pub fn done(mut self) {
        let _ = self.pipe.write_all(b"D");
        drop(self.pipe);
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid) {
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        }
    }
}

fn watch(mut pipe: std::fs::File, mountpoint: &Path, target: &CString) -> i32 {
    // SAFETY: setting signal dispositions in the single-threaded child.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::setsid();
    }
    let mut dev: Option<u64> = None;
    let mut byte = [0u8; 1];
    loop {
        match pipe.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'M' => {
                let mut d = [0u8; 8];
                if pipe.read_exact(&mut d).is_err() {
                    break;
                }
                dev = Some(u64::from_ne_bytes(d));
            }
            Ok(_) if byte[0] == b'D' => return 0,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let Some(dev) = dev else { return 0 };
    if still_mounted(mountpoint, dev) {
        let mut rc = rustix::mount::unmount(target.as_c_str(), rustix::mount::UnmountFlags::DETACH);
        if rc == Err(rustix::io::Errno::PERM) {
            // A user's mount: detached by the set-uid helper that mounted it.
            rc = match crate::mount::fusermount_unmount(mountpoint, true) {
                Ok(()) => Ok(()),
                Err(e) => {
                    eprintln!("ringfs watchdog: server died; unmounting {} failed: {e}", mountpoint.display());
                    return 1;
                }
            };
        }
        match rc {
            Ok(()) => eprintln!("ringfs watchdog: server died; detached {}", mountpoint.display()),
            Err(e) => {
                eprintln!(
                    "ringfs watchdog: server died; unmounting {} failed: {}",
                    mountpoint.display(),
                    io::Error::from(e)
                );
                return 1;
            }
        }
    }
    0
}

fn still_mounted(mountpoint: &Path, dev: u64) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let mp = PathBuf::from(mountpoint);
    parse_mountinfo(&text).iter().any(|m| m.mountpoint == mp && m.dev == dev)
}

/// Points stdin and stdout at /dev/null, and stderr too unless it is a socket (the journal): a
/// background process must not hold the pipes of whoever started it (mount(8), a script's
/// `$(...)`, a test harness), which may wait for end-of-file on them, nor write into the output
/// files of whoever mounted it (xfstests compares a test's output, server lines included), as
/// libfuse's daemonize does not either. Run in the foreground (`-f`) to log to a file.
/// Async-signal-safe (raw syscalls), so a freshly forked child may call it.
pub fn detach_stdio() {
    use rustix::{fs, stdio};
    let Ok(null) = fs::open(c"/dev/null", fs::OFlags::RDWR | fs::OFlags::CLOEXEC, fs::Mode::empty()) else {
        return;
    };
    let keep_stderr = fs::fstat(stdio::stderr()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK);
    let _ = stdio::dup2_stdin(&null);
    let _ = stdio::dup2_stdout(&null);
    if !keep_stderr {
        let _ = stdio::dup2_stderr(&null);
    }
    // `null` is closed here.
}
