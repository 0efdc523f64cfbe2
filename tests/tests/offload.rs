//! Kernel offload: passthrough I/O never reaches the server, every fallback still opens,
//! repeated metadata is answered by the kernel, and changes made directly on the backing
//! directory show through the mount within 50 ms although the timeouts are an hour (measured
//! up to `BUDGET_TRIALS` times: a loaded machine may spoil a measurement, never every one).

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::time::{Duration, Instant};

use support::{metric, require, wait_until, Server};

fn requests(text: &str, op: &str) -> f64 {
    metric(text, &format!("ringfs_requests_total{{op=\"{op}\"}}"))
}

fn fallbacks(text: &str, reason: &str) -> f64 {
    metric(text, &format!("ringfs_passthrough_fallbacks_total{{reason=\"{reason}\"}}"))
}

#[test]
fn passthrough_reads_and_writes_never_reach_the_server() {
    if !require("passthrough_reads_and_writes_never_reach_the_server", false, &[]) {
        return;
    }
    let mut m = Server::ringfs("metrics_addr=127.0.0.1:0");
    let data: Vec<u8> = (0..8 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(m.source.join("big"), &data).expect("write backing");
    assert_eq!(std::fs::read(m.mountpoint.join("big")).expect("read through mount"), data);
    let mut f = std::fs::OpenOptions::new().write(true).open(m.mountpoint.join("big")).expect("open rw");
    f.seek(SeekFrom::Start(4096)).expect("seek");
    f.write_all(&[0xAB; 8192]).expect("write through mount");
    drop(f);
    let back = std::fs::read(m.source.join("big")).expect("read backing");
    assert_eq!(&back[4096..4096 + 8192], &[0xAB; 8192][..]);
    let text = m.scrape();
    assert_eq!(metric(&text, "ringfs_passthrough_enabled"), 1.0, "{text}");
    assert_eq!(requests(&text, "read"), 0.0, "reads reached the server:\n{text}");
    assert_eq!(requests(&text, "write"), 0.0, "writes reached the server:\n{text}");
    assert!(metric(&text, "ringfs_passthrough_opens_total") >= 2.0, "{text}");
    assert_eq!(metric(&text, "ringfs_server_read_bytes_total"), 0.0);
}

#[test]
fn mmap_odirect_and_splice_work_through_passthrough() {
    if !require("mmap_odirect_and_splice_work_through_passthrough", false, &[]) {
        return;
    }
    let mut m = Server::ringfs("metrics_addr=127.0.0.1:0");
    let path = m.mountpoint.join("f");
    std::fs::write(&path, vec![1u8; 65536]).expect("create");
    // mmap: a shared write lands in the backing file.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
    // SAFETY: mapping 64 KiB of a file we just sized; unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            65536,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap failed: {}", std::io::Error::last_os_error());
        let s = std::slice::from_raw_parts_mut(p as *mut u8, 65536);
        assert_eq!(s[100], 1);
        s[0..5].copy_from_slice(b"MMAP!");
        assert_eq!(libc::msync(p, 65536, libc::MS_SYNC), 0);
        libc::munmap(p, 65536);
    }
    drop(f);
    assert_eq!(&std::fs::read(m.source.join("f")).expect("backing")[..5], b"MMAP!");
    // O_DIRECT: aligned read and write.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("open O_DIRECT");
    let layout = std::alloc::Layout::from_size_align(8192, 4096).expect("layout");
    // SAFETY: an aligned allocation of 8192 bytes, freed below.
    let buf = unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc_zeroed(layout), 8192) };
    buf.fill(7);
    f.seek(SeekFrom::Start(8192)).expect("seek");
    f.write_all(buf).expect("O_DIRECT write");
    buf.fill(0);
    f.seek(SeekFrom::Start(8192)).expect("seek");
    f.read_exact(buf).expect("O_DIRECT read");
    assert!(buf.iter().all(|&b| b == 7));
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf.as_mut_ptr(), layout) };
    drop(f);
    // splice: file → pipe → file.
    let src = std::fs::File::open(&path).expect("open");
    let dst = std::fs::File::create(m.mountpoint.join("copy")).expect("create copy");
    let mut fds = [0i32; 2];
    // SAFETY: plain syscalls on fds we own.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        let mut moved = 0usize;
        while moved < 65536 {
            let n = libc::splice(
                std::os::fd::AsRawFd::as_raw_fd(&src),
                std::ptr::null_mut(),
                fds[1],
                std::ptr::null_mut(),
                16384,
                0,
            );
            assert!(n > 0, "splice in: {}", std::io::Error::last_os_error());
            let w = libc::splice(
                fds[0],
                std::ptr::null_mut(),
                std::os::fd::AsRawFd::as_raw_fd(&dst),
                std::ptr::null_mut(),
                n as usize,
                0,
            );
            assert_eq!(w, n, "splice out: {}", std::io::Error::last_os_error());
            moved += n as usize;
        }
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    drop(dst);
    assert_eq!(std::fs::read(m.mountpoint.join("copy")).expect("read copy"), std::fs::read(&path).expect("read"));
    let text = m.scrape();
    assert_eq!(requests(&text, "read"), 0.0, "{text}");
}

#[test]
fn every_fallback_case_still_opens() {
    if !require("every_fallback_case_still_opens", false, &[]) {
        return;
    }
    // 1. Passthrough switched off.
    let mut off = Server::ringfs("passthrough=false,metrics_addr=127.0.0.1:0");
    std::fs::write(off.mountpoint.join("a"), b"no passthrough").expect("write");
    assert_eq!(std::fs::read(off.mountpoint.join("a")).expect("read"), b"no passthrough");
    let text = off.scrape();
    assert_eq!(metric(&text, "ringfs_passthrough_enabled"), 0.0);
    assert!(requests(&text, "read") >= 1.0, "{text}");
    drop(off);

    // 2. A set-uid file written by another user: served by the server (which clears the bit),
    //    and a later open of the same inode follows that inode's mode.
    let mut m = Server::ringfs("allow_other,metrics_addr=127.0.0.1:0");
    std::fs::set_permissions(&m.mountpoint, std::fs::Permissions::from_mode(0o777)).expect("chmod root");
    let suid = m.mountpoint.join("suid");
    std::fs::write(&suid, b"#!/bin/sh\n").expect("create");
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4777)).expect("chmod");
    // The writer holds the file open (after its first line) until told to go on: a line on its
    // standard input, sent once root has opened the file too.
    let mut writer = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"])
        .arg(format!("exec 3>>{0}; echo appended >&3; read go; echo again >&3", suid.display()))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv");
    let opened = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(m.source.join("suid")).is_ok_and(|s| s.contains("appended"))
    });
    assert!(opened, "the other user's write never landed");
    // Root opens the same inode while the other user's cached open is live.
    let mut s = String::new();
    std::fs::File::open(&suid).expect("open while cached").read_to_string(&mut s).expect("read");
    assert!(s.starts_with("#!/bin/sh"));
    writer.stdin.take().expect("writer stdin").write_all(b"go\n").expect("tell the writer to go on");
    assert!(writer.wait().expect("wait").success());
    let mode = std::fs::metadata(m.source.join("suid")).expect("stat").mode();
    assert_eq!(mode & 0o4000, 0, "set-uid survived a write by another user: {mode:o}");
    assert!(std::fs::read_to_string(m.source.join("suid")).expect("read").ends_with("appended\nagain\n"));
    let text = m.scrape();
    assert!(fallbacks(&text, "setid") >= 1.0, "{text}");
    assert!(fallbacks(&text, "inode_cached") >= 1.0, "{text}");
    drop(m);

    // 3. Excluded by configuration: matching files go through the server, others do not.
    let mut x = Server::ringfs("passthrough_exclude=*.db:logs/*,metrics_addr=127.0.0.1:0");
    std::fs::create_dir(x.source.join("logs")).expect("mkdir");
    for f in ["a.db", "logs/l", "b.txt"] {
        std::fs::write(x.source.join(f), b"content").expect("write backing");
        assert_eq!(std::fs::read(x.mountpoint.join(f)).expect("read through mount"), b"content");
    }
    let text = x.scrape();
    assert_eq!(fallbacks(&text, "excluded"), 2.0, "{text}");
    assert_eq!(metric(&text, "ringfs_passthrough_opens_total"), 1.0, "{text}");
    assert!(requests(&text, "read") >= 2.0, "excluded files were not read by the server:\n{text}");
    drop(x);

    // 4. The kernel refuses the backing file: an overlayfs backing directory is already at the
    //    stacking depth passthrough allows.
    let base = tempfile::tempdir_in("/tmp").expect("tempdir");
    for d in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir(base.path().join(d)).expect("mkdir");
    }
    std::fs::write(base.path().join("lower/f"), b"from overlay").expect("write lower");
    let b = base.path().display();
    let ok = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={b}/lower,upperdir={b}/upper,workdir={b}/work"))
        .arg(base.path().join("merged"))
        .status()
        .expect("mount overlay")
        .success();
    assert!(ok, "cannot mount overlayfs for the refusal case");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _overlay = Unmount(base.path().join("merged"));
    let mut o = Server::ringfs_on(&base.path().join("merged"), "metrics_addr=127.0.0.1:0", vec![]);
    assert_eq!(std::fs::read(o.mountpoint.join("f")).expect("read over overlay"), b"from overlay");
    std::fs::write(o.mountpoint.join("g"), b"written").expect("write over overlay");
    let text = o.scrape();
    assert!(fallbacks(&text, "refused") >= 1.0, "{text}");
    drop(o);
}

#[test]
fn repeated_stats_are_answered_by_the_kernel() {
    if !require("repeated_stats_are_answered_by_the_kernel", false, &[]) {
        return;
    }
    let mut m = Server::ringfs("metrics_addr=127.0.0.1:0");
    let mut sentinel = Sentinel::new(&m);
    std::fs::write(m.source.join("s"), b"x").expect("write");
    // The create and write are changes on the backing directory: their invalidations (which
    // would cost a LOOKUP and a GETATTR) must be out before counting.
    sentinel.settle(&mut m);
    let p = m.mountpoint.join("s");
    std::fs::metadata(&p).expect("first stat");
    // A cache drop (another test of this binary writes drop_caches) makes the kernel forget
    // the name and look it up again: seen as a FORGET, and the round is counted again.
    let forgets = |t: &str| requests(t, "forget") + requests(t, "batch_forget");
    let (before, after) = (0..3)
        .map(|_| {
            let before = m.scrape();
            for _ in 0..1000 {
                std::fs::metadata(&p).expect("stat");
            }
            (before, m.scrape())
        })
        .find(|(b, a)| forgets(a) == forgets(b))
        .expect("every round was disturbed by a cache drop");
    let delta = |op: &str| requests(&after, op) - requests(&before, op);
    let total = delta("getattr") + delta("lookup") + delta("statx");
    assert!(total <= 1.0, "1000 stats caused {total} GETATTR/LOOKUP/STATX requests");
}

/// How long the threads a change on the backing directory travels through (the server's
/// watch, notify and queue threads, and the calling thread) have waited for a CPU so far.
fn cpu_wait(pid: u32) -> Option<Duration> {
    support::cpu_wait(pid, &["ringfs-watch", "ringfs-notify", "ringfs-q"])
}

/// Polls `f` until it holds (or `timeout` passes); returns how long that took, less the time
/// the threads on the way spent waiting for a CPU meanwhile (see [`cpu_wait`]; server `pid`):
/// on a loaded machine the scheduler's delays are not the watch's.
fn wait_visible(pid: u32, timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    let waited_before = cpu_wait(pid);
    while start.elapsed() < timeout {
        if f() {
            let took = start.elapsed();
            let waited = match (waited_before, cpu_wait(pid)) {
                (Some(a), Some(b)) => b.saturating_sub(a),
                _ => Duration::ZERO,
            };
            return Some(took.saturating_sub(waited));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    None
}

/// The visibility budget the coherence tests hold changes on the backing directory to (time to
/// show through the mount, net of the time the threads on the way waited for a CPU).
const BUDGET: Duration = Duration::from_millis(50);

/// How many times a measurement against [`BUDGET`] is taken before a miss fails the test: a
/// loaded machine (other builds and tests, a slow CI VM) can deschedule the watch or the test
/// for longer than the budget now and then; a mechanism that does not deliver within the budget
/// misses every time.
const BUDGET_TRIALS: usize = 5;

/// Runs `trial(k)` (one fresh change on the backing directory, returning how long it took to
/// show through the mount) until one is within [`BUDGET`]; panics naming `what` if a change
/// never showed, or if all [`BUDGET_TRIALS`] were over it.
fn within_budget(what: &str, mut trial: impl FnMut(usize) -> Option<Duration>) {
    let mut over = Vec::new();
    for k in 0..BUDGET_TRIALS {
        let t = trial(k);
        eprintln!("{what}: trial {k}: {t:?} net of CPU waits");
        match t {
            None => panic!("{what} (trial {k}) never showed through the mount"),
            Some(t) if t <= BUDGET => return,
            Some(t) => over.push(t),
        }
    }
    panic!("{what}: over {BUDGET:?} (net of CPU waits) in every trial: {over:?}");
}

/// A file the kernel keeps (held open through the mount) whose mode, changed on the backing
/// directory, shows how far the backing-directory watch has got: it reads events in order.
struct Sentinel {
    backing: std::path::PathBuf,
    through_mount: std::path::PathBuf,
    _open: std::fs::File,
    mode: u32,
    /// `ringfs_invalidations_total` before each change and once it was counted (for messages).
    history: Vec<(f64, f64)>,
}

impl Sentinel {
    fn new(m: &Server) -> Sentinel {
        let backing = m.source.join(".sentinel");
        std::fs::write(&backing, b"s").expect("create sentinel");
        std::fs::set_permissions(&backing, std::fs::Permissions::from_mode(0o644)).expect("chmod sentinel");
        let through_mount = m.mountpoint.join(".sentinel");
        let _open = std::fs::File::open(&through_mount).expect("open sentinel through the mount");
        Sentinel { backing, through_mount, _open, mode: 0o644, history: Vec::new() }
    }

    /// Waits until the watch has handled every change made on the backing directory before the
    /// call and its invalidations have reached the kernel (and are counted): two changes of the
    /// sentinel's mode, each waited for through the mount and in `ringfs_invalidations_total`.
    /// Invalidations go out in batches in order, so the second one's showing means the batch
    /// holding the first (and anything before) is all out. Costs two invalidations, counted in
    /// `ringfs_invalidations_total`.
    ///
    /// A change can show through the mount before its own invalidation was sent (the kernel
    /// fetched the sentinel's attributes again for another reason: seen once in a full run
    /// under heavy load, which then counted one invalidation short); so each step also waits
    /// for the counter to move past its value before the change.
    fn settle(&mut self, m: &mut Server) {
        for _ in 0..2 {
            let counted = metric(&m.scrape(), "ringfs_invalidations_total");
            self.mode = if self.mode == 0o644 { 0o640 } else { 0o644 };
            std::fs::set_permissions(&self.backing, std::fs::Permissions::from_mode(self.mode))
                .expect("chmod sentinel");
            let mode = self.mode;
            let shown = wait_until(Duration::from_secs(10), || {
                std::fs::metadata(&self.through_mount).is_ok_and(|md| md.mode() & 0o777 == mode)
            });
            assert!(shown, "the sentinel's mode change on the backing directory never showed through the mount");
            let now = std::cell::Cell::new(counted);
            let sent = wait_until(Duration::from_secs(10), || {
                now.set(metric(&m.scrape(), "ringfs_invalidations_total"));
                now.get() > counted
            });
            assert!(sent, "the sentinel's invalidation was never counted");
            self.history.push((counted, now.get()));
        }
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[test]
fn backing_changes_show_through_within_50ms() {
    if !require("backing_changes_show_through_within_50ms", false, &[]) {
        return;
    }
    coherence_case("passthrough=true");
}

#[test]
fn backing_changes_show_through_within_50ms_without_passthrough() {
    if !require("backing_changes_show_through_within_50ms_without_passthrough", false, &[]) {
        return;
    }
    // Server-served opens keep their page cache across opens here (FOPEN_KEEP_CACHE): the
    // watch must drop it when the backing file changes.
    coherence_case("passthrough=false");
}

#[test]
fn backing_changes_show_through_within_50ms_with_inotify() {
    if !require("backing_changes_show_through_within_50ms_with_inotify", false, &[]) {
        return;
    }
    // The fallback where fanotify is unavailable, forced.
    coherence_case("coherence=inotify");
    // inotify watches directories one by one: a subdirectory the kernel learns about later is
    // covered too (names, attributes, data), and stays covered after the kernel forgets it
    // and looks it up again.
    let m = Server::ringfs("coherence=inotify,metrics_addr=");
    let (src, mnt, pid) = (m.source.clone(), m.mountpoint.clone(), m.pid());
    std::fs::create_dir_all(src.join("a/b")).expect("mkdir");
    std::fs::write(src.join("a/b/f"), b"one").expect("write");
    assert_eq!(std::fs::read_to_string(mnt.join("a/b/f")).expect("read"), "one");
    assert!(std::fs::metadata(mnt.join("a/b/g")).is_err());
    let limit = Duration::from_secs(2);
    within_budget("create in a/b", |k| {
        let g = format!("a/b/g{k}");
        assert!(std::fs::metadata(mnt.join(&g)).is_err());
        std::fs::write(src.join(&g), b"new").expect("create");
        wait_visible(pid, limit, || mnt.join(&g).exists())
    });
    within_budget("rewrite of a/b/f", |k| {
        let want = format!("second {k}");
        std::fs::write(src.join("a/b/f"), &want).expect("rewrite");
        wait_visible(pid, limit, || std::fs::read_to_string(mnt.join("a/b/f")).is_ok_and(|s| s == want))
    });
    within_budget("chmod of a/b/f", |k| {
        let mode = [0o600, 0o640, 0o604, 0o660, 0o606][k];
        std::fs::set_permissions(src.join("a/b/f"), std::fs::Permissions::from_mode(mode)).expect("chmod");
        wait_visible(pid, limit, || std::fs::metadata(mnt.join("a/b/f")).is_ok_and(|md| md.mode() & 0o777 == mode))
    });
    // Files to unlink after the forget (one per trial), known to the kernel before it.
    for k in 0..BUDGET_TRIALS {
        std::fs::write(src.join(format!("a/b/u{k}")), b"u").expect("create");
        assert!(mnt.join(format!("a/b/u{k}")).exists());
    }
    // Drop the kernel's dentries and inodes (FORGETs remove the watches), then look again.
    std::fs::write("/proc/sys/vm/drop_caches", "2").expect("drop_caches");
    within_budget("unlink in a/b after forget", |k| {
        let u = mnt.join(format!("a/b/u{k}"));
        assert!(u.exists());
        std::fs::remove_file(src.join(format!("a/b/u{k}"))).expect("unlink");
        wait_visible(pid, limit, || !u.exists())
    });
}

fn coherence_case(extra: &str) {
    let m = Server::ringfs(&format!(
        "entry_timeout=3600,attr_timeout=3600,negative_timeout=3600,coherence=watch,metrics_addr=,{extra}"
    ));
    let (src, mnt) = (m.source.clone(), m.mountpoint.clone());
    let limit = Duration::from_secs(2);
    // Rounds of 240 changes: the p99 of one round must be within the budget (a loaded machine
    // may spoil a round, never every one; see BUDGET_TRIALS).
    let mut p99s = Vec::new();
    for round in 0..BUDGET_TRIALS {
        let p = coherence_round(&src, &mnt, m.pid(), round, limit);
        eprintln!("coherence ({extra}): round {round}: p99 {p:?} net of CPU waits");
        if p <= BUDGET {
            return;
        }
        p99s.push(p);
    }
    panic!("p99 visibility over {BUDGET:?} (net of CPU waits) in every round of 240 changes: {p99s:?}");
}

/// One round of [`coherence_case`]: 40 x (rename, listing, unlink, chmod, truncate, write) on
/// the backing directory; the p99 of how long each took to show through the mount.
fn coherence_round(src: &std::path::Path, mnt: &std::path::Path, pid: u32, round: usize, limit: Duration) -> Duration {
    let mut lat: Vec<Duration> = Vec::new();
    let mut record = |what: &str, i: usize, d: Option<Duration>| match d {
        Some(d) => lat.push(d),
        None => panic!("{what} #{i} made on the backing directory never showed through the mount"),
    };
    for i in round * 40..(round + 1) * 40 {
        // rename
        let (a, b) = (format!("r{i}a"), format!("r{i}b"));
        std::fs::write(src.join(&a), b"r").expect("create");
        assert!(std::fs::metadata(mnt.join(&a)).is_ok());
        assert!(std::fs::metadata(mnt.join(&b)).is_err());
        let listed =
            |name: &str| std::fs::read_dir(mnt).is_ok_and(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name() == name));
        assert!(listed(&a), "{a} not listed through the mount");
        std::fs::rename(src.join(&a), src.join(&b)).expect("rename");
        record("rename", i, wait_visible(pid, limit, || mnt.join(&b).exists() && !mnt.join(&a).exists()));
        // The directory listing (cached by the kernel across opens) follows too.
        record("rename (listing)", i, wait_visible(pid, limit, || listed(&b) && !listed(&a)));
        // unlink
        std::fs::remove_file(src.join(&b)).expect("unlink");
        record("unlink", i, wait_visible(pid, limit, || !mnt.join(&b).exists()));
        // chmod
        let c = format!("c{i}");
        std::fs::write(src.join(&c), b"0123456789").expect("create");
        let backing_mode = std::fs::metadata(src.join(&c)).expect("stat").mode() & 0o777;
        assert_eq!(std::fs::metadata(mnt.join(&c)).expect("stat").mode() & 0o777, backing_mode);
        std::fs::set_permissions(src.join(&c), std::fs::Permissions::from_mode(0o600)).expect("chmod");
        record(
            "chmod",
            i,
            wait_visible(pid, limit, || std::fs::metadata(mnt.join(&c)).is_ok_and(|md| md.mode() & 0o777 == 0o600)),
        );
        // truncate
        std::fs::OpenOptions::new().write(true).open(src.join(&c)).expect("open").set_len(3).expect("truncate");
        record(
            "truncate",
            i,
            wait_visible(pid, limit, || std::fs::metadata(mnt.join(&c)).is_ok_and(|md| md.size() == 3)),
        );
        // write (content visible through a fresh read)
        std::fs::write(src.join(&c), format!("content {i}")).expect("write");
        let want = format!("content {i}");
        record("write", i, wait_visible(pid, limit, || std::fs::read_to_string(mnt.join(&c)).is_ok_and(|s| s == want)));
    }
    assert_eq!(lat.len(), 240);
    p99(lat)
}

/// While a file is open for writing through passthrough, its own writes raise no invalidation
/// traffic (FAN_MODIFY is ignored for it); a size change made meanwhile directly on the backing
/// file shows through the mount as soon as the writer through the mount closes, and once it
/// is closed, backing writes show through within 50 ms again.
#[test]
fn writes_through_passthrough_stay_coherent() {
    if !require("writes_through_passthrough_stay_coherent", false, &[]) {
        return;
    }
    let mut m = Server::ringfs("metrics_addr=127.0.0.1:0");
    let pid = m.pid();
    let mut sentinel = Sentinel::new(&m);
    let path = m.mountpoint.join("w");
    std::fs::write(&path, b"").expect("create");
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open rw");
    // The creating open's release is asynchronous: let it and anything it causes land first.
    assert!(wait_until(Duration::from_secs(30), || requests(&m.scrape(), "release") >= 1.0), "release not served");
    sentinel.settle(&mut m);
    let inval_before = metric(&m.scrape(), "ringfs_invalidations_total");
    for i in 0..2000u64 {
        f.write_all(&[b'x'; 512]).expect("write");
        if i % 500 == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    sentinel.settle(&mut m);
    let text = m.scrape();
    assert_eq!(requests(&text, "write"), 0.0, "writes went through passthrough: {text}");
    let inval = metric(&text, "ringfs_invalidations_total") - inval_before - 2.0;
    assert_eq!(
        inval, 0.0,
        "the mount's own passthrough writes caused {inval} invalidations (sentinel: {:?})",
        sentinel.history
    );
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 2000 * 512);

    // Another process appends directly to the backing file while the mount holds it open (the
    // descriptor above first, then a new one for each further trial).
    let backing = m.source.join("w");
    let size = || std::fs::metadata(&path).map(|s| s.len()).ok();
    let mut want = 2000 * 512;
    let mut held = Some(f);
    within_budget("size after close", |_| {
        let f = held
            .take()
            .unwrap_or_else(|| std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open rw again"));
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf 'external' >> '{}'", backing.display()))
            .status()
            .expect("sh");
        assert!(out.success());
        drop(f);
        want += 8;
        wait_visible(pid, Duration::from_secs(2), || size() == Some(want))
    });

    // Closed through the mount: a backing write shows through within 50 ms.
    within_budget("size after a backing write", |_| {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&backing)
            .expect("open backing")
            .write_all(b"more")
            .expect("append");
        want += 4;
        wait_visible(pid, Duration::from_secs(2), || size() == Some(want))
    });
}

/// The mount's own writes through passthrough are not "external" changes: 100 x (open, 4 KiB
/// pwrite, close) of files the kernel knows send no invalidation (they land on the server's
/// private mount, whose FAN_MODIFY events the watch ignores), and a later stat of each costs at
/// most the one GETATTR the kernel asks for itself after a write (a passthrough write
/// invalidates the kernel's cached size and times). A write made directly on the backing file
/// while the mount holds it open for writing still shows through at once.
#[test]
fn own_passthrough_writes_send_no_invalidations() {
    if !require("own_passthrough_writes_send_no_invalidations", false, &[]) {
        return;
    }
    let mut m = Server::ringfs("metrics_addr=127.0.0.1:0");
    let pid = m.pid();
    let n = 100;
    for i in 0..n {
        std::fs::write(m.source.join(format!("f{i}")), b"x").expect("create backing");
    }
    let mut sentinel = Sentinel::new(&m);
    for i in 0..n {
        std::fs::metadata(m.mountpoint.join(format!("f{i}"))).expect("stat");
    }
    // The creates above are changes on the backing directory: their invalidations must be out
    // before counting starts.
    sentinel.settle(&mut m);
    let before = m.scrape();
    for i in 0..n {
        let f = std::fs::OpenOptions::new().write(true).open(m.mountpoint.join(format!("f{i}"))).expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, &[b'y'; 4096], 0).expect("pwrite");
    }
    for i in 0..n {
        assert_eq!(std::fs::metadata(m.mountpoint.join(format!("f{i}"))).expect("stat").len(), 4096);
    }
    // Releases are asynchronous: wait until every one was served. Then an external change of a
    // known file: the watch handles events in order, so once its invalidation is counted, any
    // event of the writes above has been handled too.
    let released = wait_until(Duration::from_secs(30), || {
        requests(&m.scrape(), "release") - requests(&before, "release") >= n as f64
    });
    assert!(released, "releases not served");
    sentinel.settle(&mut m);
    let after = m.scrape();
    assert_eq!(requests(&after, "open") - requests(&before, "open"), n as f64, "{after}");
    assert_eq!(requests(&after, "write") - requests(&before, "write"), 0.0, "writes reached the server");
    let inval = metric(&after, "ringfs_invalidations_total") - metric(&before, "ringfs_invalidations_total") - 2.0;
    assert_eq!(
        inval, 0.0,
        "the mount's own passthrough writes caused {inval} invalidations (sentinel: {:?})",
        sentinel.history
    );
    let getattrs = requests(&after, "getattr") - requests(&before, "getattr");
    assert!(getattrs <= n as f64, "{getattrs} GETATTRs for {n} stats after writes");

    // Coherence: another process writes the backing file while the mount holds it open.
    let path = m.mountpoint.join("f0");
    let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open rw");
    std::os::unix::fs::FileExt::write_all_at(&f, &[b'z'; 100], 0).expect("pwrite");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 4096);
    let mut want = 4096;
    within_budget("external append while open", |_| {
        std::fs::OpenOptions::new()
            .append(true)
            .open(m.source.join("f0"))
            .expect("open backing")
            .write_all(b"more")
            .expect("append");
        want += 4;
        wait_visible(pid, Duration::from_secs(2), || std::fs::metadata(&path).map(|s| s.len()).ok() == Some(want))
    });
    drop(f);
}

/// `find`-like walks (the whole listing read first, then an lstat per name) cost one request
/// per listing chunk: every chunk is a READDIRPLUS (`cache.readdirplus = "always"`, the
/// default), which leaves every name in the kernel's entry cache, so no name is looked up.
/// With `"auto"` the kernel lists all but the first chunk with plain READDIR and looks the
/// other names up one by one.
#[test]
fn find_after_readdirplus_sends_no_lookups() {
    if !require("find_after_readdirplus_sends_no_lookups", false, &[]) {
        return;
    }
    let n = 3000;
    // "always": a handful at most (an entry at a chunk boundary), never one per name.
    for (mode, max_lookups) in [("always", 8.0), ("auto", f64::INFINITY)] {
        let mut m = Server::ringfs(&format!("metrics_addr=127.0.0.1:0,readdirplus={mode}"));
        let mut sentinel = Sentinel::new(&m);
        // A cache drop elsewhere on the machine (the kernel then forgets names, and looks them
        // up again) voids a walk: seen as FORGETs, and walked again on a fresh directory.
        let (before, after) = (0..3)
            .map(|k| {
                let d = m.source.join(format!("d{k}"));
                std::fs::create_dir(&d).expect("mkdir");
                for i in 0..n {
                    std::fs::File::create(d.join(format!("f{i:05}"))).expect("create backing");
                }
                // The directory's creation is a change on the backing directory: had its
                // invalidation come late, it would drop the directory's dentry (and every name
                // below it) during the walk.
                sentinel.settle(&mut m);
                std::fs::metadata(m.mountpoint.join(format!("d{k}"))).expect("stat d");
                let before = m.scrape();
                let names: Vec<_> = std::fs::read_dir(m.mountpoint.join(format!("d{k}")))
                    .expect("opendir")
                    .map(|e| e.expect("entry").path())
                    .collect();
                assert_eq!(names.len(), n);
                for p in &names {
                    std::fs::symlink_metadata(p).expect("lstat");
                }
                (before, m.scrape())
            })
            .find(|(b, a)| {
                let forgets = |t: &str| requests(t, "forget") + requests(t, "batch_forget");
                forgets(a) == forgets(b)
            })
            .expect("every walk was disturbed by a cache drop");
        let delta = |op: &str| requests(&after, op) - requests(&before, op);
        let lookups = delta("lookup");
        if mode == "always" {
            assert!(lookups <= max_lookups, "{mode}: {lookups} LOOKUPs after READDIRPLUS:\n{after}");
            assert_eq!(delta("readdir"), 0.0, "{mode}: plain READDIRs");
            assert!(delta("readdirplus") >= 2.0, "{mode}: {after}");
            // At most the directory's own (its atime moved with the listing), never one per name.
            assert!(delta("getattr") <= 1.0, "{mode}: GETATTRs after READDIRPLUS:\n{after}");
        } else {
            // The contrast that makes "always" the default: most names looked up one by one.
            assert!(lookups >= (n / 2) as f64, "{mode}: only {lookups} LOOKUPs");
        }
    }
}

/// Whether another process can take a write lock on all of `path` now (F_SETLK in a child).
fn other_process_can_lock(path: &std::path::Path) -> bool {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open for the child");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: the child only calls fcntl and _exit (async-signal-safe) on a descriptor it
    // inherited; the parent waits for it.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let mut fl: libc::flock = std::mem::zeroed();
            fl.l_type = libc::F_WRLCK as i16;
            fl.l_whence = libc::SEEK_SET as i16;
            let rc = libc::fcntl(fd, libc::F_SETLK, &fl);
            libc::_exit(if rc == 0 { 0 } else { 1 });
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}

/// On a local backing file system close(2) sends no FLUSH (FOPEN_NOFLUSH: the server's flush
/// would only close a duplicate descriptor, which does nothing on a local file system), and
/// POSIX locks, which the kernel keeps itself, are still dropped at close: another process can
/// lock the file as soon as the holder closes a descriptor of it.
#[test]
fn close_sends_no_flush_and_locks_still_release() {
    if !require("close_sends_no_flush_and_locks_still_release", false, &[]) {
        return;
    }
    let mut m = Server::ringfs("metrics_addr=127.0.0.1:0");
    let path = m.mountpoint.join("f");
    std::fs::write(&path, b"data").expect("create");
    let before = m.scrape();
    for i in 0..50 {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
        if i % 2 == 0 {
            f.write_all(b"x").expect("write");
        } else {
            let mut s = String::new();
            f.read_to_string(&mut s).expect("read");
        }
    }
    let served =
        wait_until(Duration::from_secs(30), || requests(&m.scrape(), "release") - requests(&before, "release") >= 50.0);
    assert!(served, "releases not served");
    let after = m.scrape();
    assert_eq!(requests(&after, "open") - requests(&before, "open"), 50.0, "{after}");
    assert_eq!(requests(&after, "flush") - requests(&before, "flush"), 0.0, "close() sent FLUSH:\n{after}");

    // POSIX locks across processes, released by close without a FLUSH.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    // SAFETY: fcntl on our open descriptor with a valid flock.
    assert_eq!(unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_SETLK, &fl) }, 0, "lock");
    assert!(!other_process_can_lock(&path), "another process took a lock held through the mount");
    // Closing *any* descriptor of the file drops the process's POSIX locks on it.
    drop(std::fs::File::open(&path).expect("second open"));
    assert!(other_process_can_lock(&path), "the lock survived a close");
    drop(f);
    let after = m.scrape();
    assert_eq!(requests(&after, "flush") - requests(&before, "flush"), 0.0, "close() sent FLUSH:\n{after}");
}

/// Passthrough files are registered through a private clone of the backing mount (for the
/// watch's FAN_MODIFY ignore mark), but lookups stay on the backing mount: a file system mounted
/// below the backing directory after the server started is visible through the mount, and its
/// files open (and pass through) normally.
#[test]
fn mounts_made_below_the_backing_directory_later_stay_visible() {
    if !require("mounts_made_below_the_backing_directory_later_stay_visible", false, &[]) {
        return;
    }
    let mut m = Server::ringfs("metrics_addr=127.0.0.1:0");
    let sub = m.source.join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let ok =
        std::process::Command::new("mount").args(["-t", "tmpfs", "ringfs-test"]).arg(&sub).status().expect("mount");
    assert!(ok.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(sub.clone());
    std::fs::write(sub.join("x"), b"on tmpfs").expect("write on the submount");
    assert_eq!(std::fs::read(m.mountpoint.join("sub/x")).expect("read through the mount"), b"on tmpfs");
    let mut f = std::fs::OpenOptions::new().append(true).open(m.mountpoint.join("sub/x")).expect("open");
    f.write_all(b"!").expect("write through the mount");
    drop(f);
    assert_eq!(std::fs::read(sub.join("x")).expect("read backing"), b"on tmpfs!");
    let text = m.scrape();
    assert_eq!(requests(&text, "write"), 0.0, "writes went through passthrough: {text}");
}
