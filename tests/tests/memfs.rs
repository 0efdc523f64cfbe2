//! The in-memory example file system (`uring-transport/examples/memfs.rs`), built only on the
//! library's public API and served from a storage thread, mounted on both transports and put
//! through a real workload: a tree, patterned data, rename, unlink, `ls -l`, `cp -r` + `diff -r`,
//! concurrent writers from several processes; and its locks: fcntl record locks and flock locks
//! contended by two processes through the mount, and an ioctl of its own.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{require, Server};

/// Runs `f` on a thread and fails the test if it takes longer than `limit` (a hang).
fn within<T: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not finish within {limit:?}"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} failed (see the panic above)"),
    }
}

/// Deterministic contents for file `seed`: `len` bytes no two files share.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// A source tree for `cp -r`: nested directories, files of several sizes, a symlink, an empty
/// directory.
fn source_tree() -> tempfile::TempDir {
    let src = tempfile::tempdir_in("/tmp").expect("tempdir");
    for d in 0..4u64 {
        let dir = src.path().join(format!("dir{d}")).join("inner");
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..6u64 {
            let len = [0, 1, 4095, 4096, 70_000, 300_001][f as usize];
            std::fs::write(dir.join(format!("f{f}")), pattern(d * 100 + f, len)).expect("write");
        }
    }
    std::fs::create_dir(src.path().join("empty")).expect("mkdir");
    std::os::unix::fs::symlink("dir0/inner/f5", src.path().join("link")).expect("symlink");
    src
}

fn workload(mnt: &Path) {
    // A tree of patterned files, read back.
    for d in 0..3u64 {
        let dir = mnt.join(format!("d{d}/sub"));
        std::fs::create_dir_all(&dir).expect("mkdir -p");
        for f in 0..5u64 {
            std::fs::write(dir.join(format!("f{f}")), pattern(d * 10 + f, 1000 + 37_000 * f as usize)).expect("write");
        }
    }
    for d in 0..3u64 {
        for f in 0..5u64 {
            let got = std::fs::read(mnt.join(format!("d{d}/sub/f{f}"))).expect("read back");
            assert!(got == pattern(d * 10 + f, 1000 + 37_000 * f as usize), "d{d}/sub/f{f} read back differs");
        }
    }
    // Overwrite in the middle, truncate, extend.
    let p = mnt.join("d0/sub/f4");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&p).expect("open");
        f.write_all_at(b"MIDDLE", 5000).expect("pwrite");
        f.set_len(6000).expect("ftruncate");
        f.set_len(7000).expect("extend");
    }
    let mut want = pattern(4, 1000 + 37_000 * 4);
    want[5000..5006].copy_from_slice(b"MIDDLE");
    want.truncate(6000);
    want.resize(7000, 0);
    assert!(std::fs::read(&p).expect("read") == want, "overwrite/truncate/extend differs");

    // Rename a file across directories and over an existing one, and a directory.
    std::fs::rename(mnt.join("d0/sub/f0"), mnt.join("d1/moved")).expect("rename file");
    assert_eq!(err_of(std::fs::metadata(mnt.join("d0/sub/f0"))), Some(libc::ENOENT));
    assert!(std::fs::read(mnt.join("d1/moved")).expect("read moved") == pattern(0, 1000));
    std::fs::rename(mnt.join("d1/moved"), mnt.join("d1/sub/f1")).expect("rename over a file");
    assert!(std::fs::read(mnt.join("d1/sub/f1")).expect("read replaced") == pattern(0, 1000));
    std::fs::rename(mnt.join("d2"), mnt.join("d0/d2moved")).expect("rename dir");
    assert!(std::fs::read(mnt.join("d0/d2moved/sub/f2")).expect("read in moved dir") == pattern(22, 75_000));
    assert_eq!(
        err_of(std::fs::rename(mnt.join("d0"), mnt.join("d0/d2moved/inside"))),
        Some(libc::EINVAL),
        "a directory moved below itself"
    );
    assert_eq!(err_of(std::fs::remove_dir(mnt.join("d1/sub"))), Some(libc::ENOTEMPTY));

    // ls -l sees names, types and sizes.
    let ls = run(Command::new("ls").arg("-ln").arg(mnt.join("d1/sub")));
    let line = ls.lines().find(|l| l.ends_with(" f3")).unwrap_or_else(|| panic!("f3 missing in ls -l:\n{ls}"));
    assert!(line.starts_with("-rw"), "{line}");
    assert!(line.contains(&format!(" {} ", 1000 + 37_000 * 3)), "size of f3 in {line}");
    let ls = run(Command::new("ls").arg("-ln").arg(mnt.join("d0")));
    assert!(ls.lines().any(|l| l.starts_with('d') && l.ends_with(" d2moved")), "{ls}");

    // Unlink an open file: it stays readable through the open descriptor.
    let open = std::fs::File::open(mnt.join("d1/sub/f2")).expect("open");
    std::fs::remove_file(mnt.join("d1/sub/f2")).expect("unlink");
    assert_eq!(err_of(std::fs::metadata(mnt.join("d1/sub/f2"))), Some(libc::ENOENT));
    {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; 75_000];
        open.read_exact_at(&mut buf, 0).expect("read unlinked file");
        assert!(buf == pattern(12, 75_000), "unlinked file contents");
    }
    drop(open);

    // cp -r in, diff -r back.
    let src = source_tree();
    run(Command::new("cp").arg("-r").arg(src.path()).arg(mnt.join("copy")));
    run(Command::new("diff").arg("-r").arg("--no-dereference").arg(src.path()).arg(mnt.join("copy")));
    assert_eq!(std::fs::read_link(mnt.join("copy/link")).expect("readlink"), PathBuf::from("dir0/inner/f5"));

    // rm -r everything; the root is empty again.
    run(Command::new("rm").arg("-r").arg(mnt.join("copy")).arg(mnt.join("d0")).arg(mnt.join("d1")));
    assert_eq!(std::fs::read_dir(mnt).expect("readdir").count(), 0);
}

/// Several processes write disjoint 64 KiB blocks of one file and whole files of their own at
/// the same time; everything reads back.
fn concurrent_writers(mnt: &Path) {
    const PROCS: u64 = 6;
    const BLOCKS: u64 = 8;
    let src = tempfile::tempdir_in("/tmp").expect("tempdir");
    let mut kids = Vec::new();
    for p in 0..PROCS {
        let block = src.path().join(format!("b{p}"));
        std::fs::write(&block, pattern(1000 + p, 64 * 1024 * BLOCKS as usize)).expect("write source");
        // Process p writes blocks p, p + PROCS, ... of `shared` and all of `own{p}`.
        let mut script = String::new();
        for b in 0..BLOCKS {
            script += &format!(
                "dd if={blk} of={mnt}/shared bs=65536 skip={b} seek={s} count=1 conv=notrunc status=none && ",
                blk = block.display(),
                mnt = mnt.display(),
                s = b * PROCS + p,
            );
        }
        script += &format!("cp {} {}/own{p}", block.display(), mnt.display());
        kids.push(Command::new("sh").arg("-c").arg(script).spawn().expect("spawn writer"));
    }
    for mut k in kids {
        assert!(k.wait().expect("wait writer").success(), "a writer process failed");
    }
    let shared = std::fs::read(mnt.join("shared")).expect("read shared");
    assert_eq!(shared.len() as u64, 64 * 1024 * BLOCKS * PROCS);
    for p in 0..PROCS {
        let want = pattern(1000 + p, 64 * 1024 * BLOCKS as usize);
        assert!(std::fs::read(mnt.join(format!("own{p}"))).expect("read own") == want, "own{p} differs");
        for b in 0..BLOCKS {
            let at = ((b * PROCS + p) * 65536) as usize;
            let from = (b * 65536) as usize;
            assert!(shared[at..at + 65536] == want[from..from + 65536], "shared block {b} of writer {p} differs");
        }
    }
}

fn flock_struct(kind: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is valid.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind as i16;
    l.l_whence = libc::SEEK_SET as i16;
    l.l_start = start;
    l.l_len = len;
    l
}

extern "C" fn on_alarm(_: i32) {}

/// Runs `child` in a forked process and returns its exit code (within `limit`). The child may
/// only make async-signal-safe calls (fcntl, flock, open, alarm, sigaction).
fn in_child(limit: Duration, child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child makes only async-signal-safe calls, then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = child();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let start = std::time::Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            assert!(libc::WIFEXITED(status), "child ended by a signal ({status:#x})");
            return libc::WEXITSTATUS(status);
        }
        if start.elapsed() > limit {
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("child did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// memfs's own ioctl: how many locks it holds on the file.
fn locks_held(fd: i32) -> u64 {
    const MEMFS_IOC_LOCKS: u32 = (2 << 30) | (8 << 16) | ((b'M' as u32) << 8) | 2;
    let mut n: u64 = u64::MAX;
    // SAFETY: the command writes 8 bytes into n.
    let r = unsafe { libc::ioctl(fd, MEMFS_IOC_LOCKS as _, &mut n as *mut u64) };
    assert_eq!(r, 0, "MEMFS_IOC_LOCKS: {}", std::io::Error::last_os_error());
    n
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Two processes contend for fcntl and flock locks through the mount: the file system, not the
/// kernel, keeps them (memfs opts in), so conflicts, F_GETLK's holder, SETLKW's wait and its
/// interruption all cross the server.
fn locks(mnt: &Path) {
    use std::os::fd::AsRawFd;
    let path = mnt.join("locked");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("create");
    let fd = f.as_raw_fd();
    let cpath = std::ffi::CString::new(path.to_str().expect("utf-8 path")).expect("c path");
    let me = std::process::id() as i32;
    // The parent write-locks bytes 0..100.
    let l = flock_struct(libc::F_WRLCK, 0, 100);
    // SAFETY: valid fd and flock struct.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETLK, &l) }, 0, "F_SETLK: {}", std::io::Error::last_os_error());
    // The lock is in the file system's table, not the kernel's.
    assert_eq!(locks_held(fd), 1, "memfs does not hold the lock");

    // Another process: a conflicting F_SETLK fails with EAGAIN, F_GETLK names the parent, a
    // lock on other bytes is granted.
    let code = in_child(Duration::from_secs(20), || {
        // SAFETY: async-signal-safe calls on a valid path and structs.
        unsafe {
            let fd = libc::open(cpath.as_ptr(), libc::O_RDWR);
            if fd < 0 {
                return 10;
            }
            let want = flock_struct(libc::F_WRLCK, 50, 10);
            if libc::fcntl(fd, libc::F_SETLK, &want) != -1 || errno() != libc::EAGAIN {
                return 11;
            }
            let mut probe = flock_struct(libc::F_RDLCK, 50, 10);
            if libc::fcntl(fd, libc::F_GETLK, &mut probe) != 0 {
                return 12;
            }
            if probe.l_type != libc::F_WRLCK as i16 || probe.l_pid != me || probe.l_start != 0 || probe.l_len != 100 {
                return 13;
            }
            let other = flock_struct(libc::F_WRLCK, 200, 100);
            if libc::fcntl(fd, libc::F_SETLK, &other) != 0 {
                return 14;
            }
            // SETLKW interrupted by a signal: EINTR, not a hang.
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_alarm as *const () as usize;
            libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
            libc::alarm(1);
            if libc::fcntl(fd, libc::F_SETLKW, &want) != -1 || errno() != libc::EINTR {
                return 15;
            }
            0
        }
    });
    assert_eq!(code, 0, "lock contention seen from a second process (failed step {code})");

    // The child's exit dropped its lock on 200..300: the parent takes it.
    let other = flock_struct(libc::F_WRLCK, 200, 100);
    // SAFETY: valid fd and struct.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETLK, &other) }, 0, "a dead process's lock stayed");
    assert_eq!(locks_held(fd), 2, "0..100 and 200..300");
    // SAFETY: as above.
    let unlock = flock_struct(libc::F_UNLCK, 200, 100);
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETLK, &unlock) }, 0);
    assert_eq!(locks_held(fd), 1, "unlocked range still held");

    // SETLKW waits for the parent's lock and gets it once the parent drops it.
    let (rd, wr) = {
        let mut p = [0; 2];
        // SAFETY: valid array.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        (p[0], p[1])
    };
    // SAFETY: fork in a helper thread would be no safer; the child only makes safe calls.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: async-signal-safe calls only.
        unsafe {
            let cfd = libc::open(cpath.as_ptr(), libc::O_RDWR);
            libc::write(wr, b"s".as_ptr().cast(), 1);
            let want = flock_struct(libc::F_WRLCK, 0, 1);
            let code = if cfd >= 0 && libc::fcntl(cfd, libc::F_SETLKW, &want) == 0 { 0 } else { 1 };
            libc::_exit(code);
        }
    }
    let mut b = [0u8; 1];
    // SAFETY: valid pipe fd and buffer.
    assert_eq!(unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) }, 1, "child started");
    // Drop the parent's lock (closing the file releases its POSIX locks).
    drop(f);
    let start = std::time::Instant::now();
    let status = loop {
        let mut status = 0;
        // SAFETY: our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "SETLKW never got the released lock");
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: closing our pipe ends.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "SETLKW child failed ({status:#x})");

    // flock(2): an exclusive lock held by one open file keeps another process out.
    let f = std::fs::File::open(&path).expect("open");
    // SAFETY: valid fd.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let code = in_child(Duration::from_secs(20), || {
        // SAFETY: async-signal-safe calls.
        unsafe {
            let fd = libc::open(cpath.as_ptr(), libc::O_RDONLY);
            if fd < 0 {
                return 20;
            }
            if libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) != -1 || errno() != libc::EWOULDBLOCK {
                return 21;
            }
            0
        }
    });
    assert_eq!(code, 0, "flock contention (failed step {code})");
    drop(f);
    // Closed: the flock lock goes with the open file's RELEASE, which the kernel sends in the
    // background after close returns; another open file gets the lock soon after.
    let g = std::fs::File::open(&path).expect("open");
    let taken = support::wait_until(Duration::from_secs(10), || {
        // SAFETY: valid fd.
        unsafe { libc::flock(g.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    });
    assert!(taken, "flock lock outlived close");
    drop(g);

    // The file system's own ioctl (MEMFS_IOC_NODES) reaches it; an unknown one is ENOTTY.
    let f = std::fs::File::open(&path).expect("open");
    let mut n: u64 = 0;
    const MEMFS_IOC_NODES: u32 = (2 << 30) | (8 << 16) | ((b'M' as u32) << 8) | 1;
    // SAFETY: the command writes 8 bytes into n.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), MEMFS_IOC_NODES as _, &mut n as *mut u64) };
    assert_eq!(r, 0, "MEMFS_IOC_NODES: {}", std::io::Error::last_os_error());
    assert!(n >= 2, "node count {n}");
    // SAFETY: as above, with a command memfs does not know (nr 0x11).
    let r = unsafe { libc::ioctl(f.as_raw_fd(), (MEMFS_IOC_NODES + 0x10) as _, &mut n as *mut u64) };
    assert_eq!((r, errno()), (-1, libc::ENOTTY));
}

fn case(transport: &str) {
    let server = Server::memfs(transport);
    let mnt = server.mountpoint.clone();
    within(Duration::from_secs(180), "memfs workload", move || {
        workload(&mnt);
        concurrent_writers(&mnt);
        locks(&mnt);
    });
    drop(server);
}

#[test]
fn memfs_serves_a_real_workload_on_uring() {
    if !require("memfs_serves_a_real_workload_on_uring", true, &["memfs"]) {
        return;
    }
    case("uring");
}

#[test]
fn memfs_serves_a_real_workload_on_dev_fuse() {
    if !require("memfs_serves_a_real_workload_on_dev_fuse", false, &["memfs"]) {
        return;
    }
    case("dev-fuse");
}
