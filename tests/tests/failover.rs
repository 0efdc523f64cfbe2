//! Crash failover (`failover=on`, classic channel): the server is killed with SIGKILL again and
//! again while clients hold files open and keep writing, reading back and fsyncing them, a
//! metadata loop changes names, and fio verifies what it wrote. The watchdog starts a new
//! server each time; no system call may fail, no byte may change, the mount may never be
//! absent.
//!
//! Each failover prints one `FAILOVER` line (the pause the new server measured from the
//! watchdog finding the old one dead, and the longest stall any client operation saw across
//! it); `RINGFS_FAILOVERS` sets how many (default 5), for the pause measurement.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use tests::{wait_until, Mount};

mod support;
use support::load::*;

fn failovers() -> usize {
    std::env::var("RINGFS_FAILOVERS").ok().and_then(|v| v.parse().ok()).unwrap_or(5)
}

/// The kernel resends requests on FUSE_NOTIFY_RESEND from Linux 6.9 (protocol 7.40).
fn kernel_resends() -> bool {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse::<u32>().ok());
    matches!((it.next(), it.next()), (Some(maj), Some(min)) if (maj, min) >= (6, 9))
}

fn require(test: &str) -> bool {
    if !tests::require_root_fuse(test) {
        return false;
    }
    if !kernel_resends() {
        return tests::skip(test, "the kernel has no FUSE_NOTIFY_RESEND (Linux 6.9+)");
    }
    true
}

/// The server serving the mount now, and how many failovers its log shows.
struct Served<'a> {
    m: &'a Mount,
    pid: u32,
}

impl Served<'_> {
    fn failovers_logged(&self) -> usize {
        self.m.log().matches("failover: serving").count()
    }

    /// The pid the watchdog started last (from its log line).
    fn last_started(&self) -> Option<u32> {
        let log = self.m.log();
        log.lines().rev().find_map(|l| {
            l.split("started pid ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|p| p.parse().ok())
        })
    }

    /// SIGKILL to the current server; waits until its successor serves. Returns the pause
    /// (ms) the successor logged.
    fn kill_and_wait(&mut self, round: usize) -> f64 {
        let before = self.failovers_logged();
        let started = self.m.log().matches("started pid ").count();
        // SAFETY: kill(2) on the server process.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        assert!(
            wait_until(Duration::from_secs(30), || self.failovers_logged() > before
                && self.m.log().matches("started pid ").count() > started),
            "no server took over after SIGKILL {round}; log:\n{}",
            self.m.log()
        );
        let next = self.last_started().expect("the watchdog names the server it started");
        assert_ne!(next, self.pid);
        self.pid = next;
        let log = self.m.log();
        let line = log.lines().rev().find(|l| l.contains("failover: serving")).unwrap_or("");
        line.split(" again ").nth(1).and_then(|r| r.split(" ms").next()).and_then(|v| v.parse().ok()).unwrap_or(-1.0)
    }
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the server process.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        wait_until(Duration::from_secs(10), || !self.m.is_mounted());
    }
}

fn failovers_under_load(test: &str, passthrough: bool) {
    if !require(test) {
        return;
    }
    let pt = format!("passthrough={passthrough}");
    let m = Mount::start(&["transport=dev-fuse", &pt, "failover=on", "metrics_addr=127.0.0.1:0"]);
    assert!(
        wait_until(Duration::from_secs(10), || m.log().contains("crash failover: on")),
        "start-up must say failover is on:\n{}",
        m.log()
    );
    let mut cur = Served { m: &m, pid: m.pid() };
    let files = 3;
    let clients = Clients::start(&m, files);
    let rep = clients.rep.clone();
    let ops = |rep: &Report| rep.ops.iter().map(|o| o.load(Ordering::Relaxed)).collect::<Vec<_>>();
    let all_advanced = |rep: &Report, before: &[u64], by: u64| {
        rep.ops.iter().zip(before).all(|(o, b)| o.load(Ordering::Relaxed) >= b + by)
            || !rep.failures.lock().unwrap().is_empty()
    };
    let n = failovers();
    for round in 0..n {
        for x in &rep.max_us {
            x.store(0, Ordering::Relaxed);
        }
        let before = ops(&rep);
        assert!(wait_until(Duration::from_secs(30), || all_advanced(&rep, &before, 5)), "clients stalled");
        let baseline = rep.max_us.iter().map(|x| x.swap(0, Ordering::Relaxed)).max().unwrap_or(0);
        let old = cur.pid;
        let pause_ms = cur.kill_and_wait(round);
        assert!(wait_until(Duration::from_secs(10), || !pid_alive(old)), "killed server {old} still there");
        let after = ops(&rep);
        assert!(
            wait_until(Duration::from_secs(30), || all_advanced(&rep, &after, 2)),
            "clients stalled after failover {round}:\n{}",
            m.log()
        );
        let stall = rep.max_us.iter().map(|x| x.load(Ordering::Relaxed)).max().unwrap_or(0);
        println!(
            "FAILOVER passthrough={passthrough} round={round} pause_ms={pause_ms} max_stall_us={stall} baseline_us={baseline}"
        );
        let failures = rep.failures.lock().unwrap().clone();
        assert!(failures.is_empty(), "client failures after failover {round}: {failures:?}\nserver log:\n{}", m.log());
    }
    clients.finish(&m);
    // The metrics listener was handed on: the same address answers, and counts every failover.
    let addr = metrics_addr(&m).expect("metrics address in the log");
    let text = scrape(&addr);
    assert_eq!(sample(&text, "ringfs_failovers_total"), Some(n as f64), "metrics:\n{text}");
    assert!(sample(&text, "ringfs_failover_last_pause_seconds").is_some_and(|p| p > 0.0), "{text}");
    assert_eq!(sample(&text, "ringfs_failover_lost_handles_total"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "ringfs_failover_mode{mode=\"on\"}"), Some(1.0), "{text}");
    assert!(sample(&text, "ringfs_failover_resent_requests_total").is_some(), "{text}");
    drop(cur);
    assert!(!m.is_mounted(), "the last server did not unmount at SIGTERM");
}

#[test]
fn failover_dev_fuse_passthrough() {
    failovers_under_load("failover_dev_fuse_passthrough", true);
}

#[test]
fn failover_dev_fuse_served() {
    failovers_under_load("failover_dev_fuse_served", false);
}

/// Without `failover=on` nothing changes: SIGKILL detaches the mount (the watchdog's old job),
/// and start-up says failover is off.
#[test]
fn without_failover_sigkill_still_detaches() {
    let test = "without_failover_sigkill_still_detaches";
    if !tests::require_root_fuse(test) {
        return;
    }
    let mut m = Mount::start(&["transport=dev-fuse"]);
    assert!(wait_until(Duration::from_secs(10), || m.log().contains("crash failover: off")), "{}", m.log());
    m.kill9();
    assert!(wait_until(Duration::from_secs(5), || !m.is_mounted()), "not detached after SIGKILL:\n{}", m.log());
}

/// An open file whose backing file is gone cannot be opened again by the new server: that one
/// descriptor answers EIO, the others (and the mount) go on, and the loss is counted.
#[test]
fn a_deleted_open_file_is_lost_alone() {
    let test = "a_deleted_open_file_is_lost_alone";
    if !require(test) {
        return;
    }
    let m = Mount::start(&["transport=dev-fuse", "passthrough=false", "failover=on", "metrics_addr=127.0.0.1:0"]);
    let mut cur = Served { m: &m, pid: m.pid() };
    std::fs::write(m.path("gone"), b"gone").expect("write");
    std::fs::write(m.path("kept"), b"kept").expect("write");
    let gone = std::fs::File::open(m.path("gone")).expect("open gone");
    let kept = std::fs::File::open(m.path("kept")).expect("open kept");
    std::fs::remove_file(m.path("gone")).expect("unlink while open");
    cur.kill_and_wait(0);
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 4];
    // EIO from its handle, or ESTALE from its inode (the kernel may ask for its attributes first).
    let e = gone.read_at(&mut b, 0).expect_err("the deleted file's descriptor is lost");
    assert!(matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ESTALE)), "{e}");
    kept.read_exact_at(&mut b, 0).expect("the other descriptor goes on");
    assert_eq!(&b, b"kept");
    let text = scrape(&metrics_addr(&m).expect("metrics address"));
    assert_eq!(sample(&text, "ringfs_failover_lost_handles_total"), Some(1.0), "{text}");
    drop(gone);
    drop(kept);
    drop(cur);
}

/// fio with `--verify=crc32c --verify_fatal=1` (4 KiB random buffered writes, then 128 KiB
/// sequential O_DIRECT writes, in turn) runs through SIGKILLs of the server, passthrough on
/// and off: every fio run exits 0 and reads back what it wrote.
#[test]
fn fio_verify_through_failovers() {
    let test = "fio_verify_through_failovers";
    if !require(test) {
        return;
    }
    if Command::new("fio").arg("--version").output().is_err() {
        tests::skip(test, "fio is not installed");
        return;
    }
    for passthrough in ["passthrough=true", "passthrough=false"] {
        let m = Mount::start(&["transport=dev-fuse", passthrough, "failover=on"]);
        let mut cur = Served { m: &m, pid: m.pid() };
        let fio = FioLoop::start(m.path(""), "fo");
        for round in 0..3 {
            fio.wait_for_a_run();
            cur.kill_and_wait(round);
        }
        let (runs, failures) = fio.finish();
        assert!(failures.is_empty(), "{passthrough}: {failures:?}\nserver log:\n{}", m.log());
        assert!(runs >= 4, "fio ran {runs} times");
        drop(cur);
    }
}

/// A live upgrade hands the mount to a new server with its own watchdog, armed again: a SIGKILL
/// of the upgraded server fails over, and the file held open across both goes on.
#[test]
fn failover_after_a_live_upgrade() {
    let test = "failover_after_a_live_upgrade";
    if !require(test) {
        return;
    }
    let m = Mount::start(&["transport=dev-fuse", "failover=on", "metrics_addr=127.0.0.1:0"]);
    let mut cur = Served { m: &m, pid: m.pid() };
    let held = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(m.path("held"));
    let held = held.expect("open");
    use std::os::unix::fs::FileExt;
    held.write_all_at(b"one", 0).expect("write");
    let out = Command::new(tests::ringfs_bin()).arg("upgrade").arg(&m.mountpoint).output().expect("ringfs upgrade");
    let answer = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "upgrade: {answer}{}", String::from_utf8_lossy(&out.stderr));
    cur.pid = answer.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("new pid");
    // The upgraded server arms its own watchdog once its state is in (its log line).
    assert!(wait_until(Duration::from_secs(10), || m.log().matches("crash failover: on").count() >= 2), "{}", m.log());
    held.write_all_at(b"two", 3).expect("write after the upgrade");
    cur.kill_and_wait(0);
    held.write_all_at(b"six", 6).expect("write after the failover");
    held.sync_all().expect("fsync");
    let mut b = [0u8; 9];
    held.read_exact_at(&mut b, 0).expect("read back");
    assert_eq!(&b, b"onetwosix");
    assert_eq!(std::fs::read(m.backing("held")).expect("backing"), b"onetwosix");
    let text = scrape(&metrics_addr(&m).expect("metrics address"));
    assert_eq!(sample(&text, "ringfs_failovers_total"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "ringfs_upgrades_total{result=\"ok\"}"), Some(1.0), "{text}");
    drop(held);
    drop(cur);
}

/// On FUSE over io_uring the kernel cannot resend what a dead server's ring entries had taken:
/// failover is unavailable, start-up says so, and SIGKILL detaches the mount as before.
#[test]
fn failover_on_io_uring_is_unavailable_and_detaches() {
    let test = "failover_on_io_uring_is_unavailable_and_detaches";
    if !require(test) {
        return;
    }
    if std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring").map_or(true, |v| v.trim() != "Y") {
        tests::skip(test, "FUSE over io_uring is off (/sys/module/fuse/parameters/enable_uring)");
        return;
    }
    let mut m = Mount::start(&["transport=uring", "failover=on"]);
    assert!(wait_until(Duration::from_secs(10), || m.log().contains("crash failover: unavailable")), "{}", m.log());
    assert!(m.log().contains("io_uring"), "{}", m.log());
    m.kill9();
    assert!(wait_until(Duration::from_secs(5), || !m.is_mounted()), "not detached after SIGKILL:\n{}", m.log());
}

/// `failover=on` with the transport left to ringfs (`auto`) picks the classic channel, so that
/// failover is on (not unavailable because `auto` chose io_uring), and a SIGKILL fails over.
#[test]
fn failover_on_picks_the_classic_channel() {
    let test = "failover_on_picks_the_classic_channel";
    if !require(test) {
        return;
    }
    let m = Mount::start(&["transport=auto", "failover=on"]);
    let mut cur = Served { m: &m, pid: m.pid() };
    assert!(wait_until(Duration::from_secs(10), || m.log().contains("crash failover: on")), "{}", m.log());
    assert!(m.log().contains("the classic /dev/fuse channel, for crash failover"), "{}", m.log());
    std::fs::write(m.path("kept"), b"before").unwrap();
    let held = std::fs::File::open(m.path("kept")).unwrap();
    cur.kill_and_wait(0);
    assert_eq!(std::fs::read(m.path("kept")).unwrap(), b"before");
    let mut back = String::new();
    std::io::Read::read_to_string(&mut &held, &mut back).unwrap();
    assert_eq!(back, "before", "the descriptor held across the failover reads on");
    drop(held);
    drop(cur);
}

/// `ringfs upgrade MOUNTPOINT`: the new server's pid and the pause (µs) the old one measured.
fn upgrade(m: &Mount) -> Result<(u32, u64), String> {
    let out = Command::new(tests::ringfs_bin()).arg("upgrade").arg(&m.mountpoint).output().expect("ringfs upgrade");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    match (out.status.success(), stdout.split_whitespace().collect::<Vec<_>>().as_slice()) {
        (true, ["ok", pid, pause]) => Ok((pid.parse().expect("pid"), pause.parse().expect("pause"))),
        _ => Err(format!("{}: {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr))),
    }
}

/// Nearest-rank percentile `p` (0-100) of `v` (sorted here).
fn percentile(v: &mut [u64], p: usize) -> u64 {
    v.sort_unstable();
    if v.is_empty() {
        return 0;
    }
    v[((v.len() * p).div_ceil(100)).clamp(1, v.len()) - 1]
}

/// The children of process `pid` (all its threads').
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()).collect::<Vec<_>>())
        .collect()
}

/// The process `pid` started for a live upgrade (it carries `RINGFS_TAKEOVER_FD`), if any yet;
/// `known` are children it had before (its watchdog, forked from it, shows the same variable
/// when `pid` was itself started for an upgrade).
fn upgrade_child(pid: u32, known: &[u32]) -> Option<u32> {
    children(pid).into_iter().filter(|c| !known.contains(c)).find(|c| {
        std::fs::read(format!("/proc/{c}/environ"))
            .is_ok_and(|e| e.split(|&b| b == 0).any(|v| v.starts_with(b"RINGFS_TAKEOVER_FD=")))
    })
}

/// `ringfs upgrade` with a SIGKILL of the old server as soon as it has started the new one (in
/// the middle of the hand-over): the new server must give up, the watchdog fail over. Returns
/// whether the kill landed before the upgrade was done (the upgrade then fails), and the
/// failover's pause (ms).
fn kill_during_upgrade(cur: &mut Served, round: usize) -> (bool, f64) {
    let m = cur.m;
    let before = cur.failovers_logged();
    let started = m.log().matches("started pid ").count();
    let known = children(cur.pid);
    let mut cli = Command::new(tests::ringfs_bin())
        .arg("upgrade")
        .arg(&m.mountpoint)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ringfs upgrade");
    let old = cur.pid;
    let mut child = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // A tight poll: the hand-over takes milliseconds.
    while child.is_none() && std::time::Instant::now() < deadline {
        child = upgrade_child(old, &known);
        if child.is_none() && cli.try_wait().expect("wait for ringfs upgrade").is_some() {
            break;
        }
        std::thread::yield_now();
    }
    // SAFETY: kill(2) on the server process.
    unsafe { libc::kill(old as libc::pid_t, libc::SIGKILL) };
    let out = cli.wait_with_output().expect("ringfs upgrade");
    let answer = String::from_utf8_lossy(&out.stdout).to_string();
    let done = out.status.success() && answer.starts_with("ok ");
    let during = child.is_some() && !done;
    if let (Some(c), false) = (child, done) {
        let gone = wait_until(Duration::from_secs(20), || !pid_alive(c));
        let wchan = std::fs::read_to_string(format!("/proc/{c}/wchan")).unwrap_or_default();
        // SAFETY: kill(2) on the stray server (not to leave it behind when the test fails).
        unsafe { libc::kill(c as libc::pid_t, libc::SIGKILL) };
        assert!(
            gone,
            "kill {round}: the new server {c} stays (waiting in {wchan}); upgrade said {answer}{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            m.log()
        );
    }
    if done {
        // The upgrade was done first: the kill hit its new server's predecessor, already gone;
        // kill the new one instead, an ordinary failover.
        let new: u32 = answer.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("new pid");
        cur.pid = new;
        return (false, cur.kill_and_wait(round));
    }
    assert!(
        wait_until(Duration::from_secs(30), || cur.failovers_logged() > before
            && m.log().matches("started pid ").count() > started),
        "no server took over after the SIGKILL during upgrade {round}; upgrade said {answer}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
    cur.pid = cur.last_started().expect("the watchdog names the server it started");
    let log = m.log();
    let line = log.lines().rev().find(|l| l.contains("failover: serving")).unwrap_or("");
    let pause = line.split(" again ").nth(1).and_then(|r| r.split(" ms").next()).and_then(|v| v.parse().ok());
    (during, pause.unwrap_or(-1.0))
}

/// Upgrades in [`upgrades_and_failovers_combined`], and the SIGKILL after every `KILL_EVERY`-th.
const COMBINED_UPGRADES: usize = 20;
const KILL_EVERY: usize = 4;

/// Issue 20's reliability test, all at once on one classic-channel mount with `failover=on`:
/// 3 clients holding files open (pwrite, pread-verify, fsync every 8th), the metadata loop, the
/// mountinfo watch and fio (`--verify=crc32c --verify_fatal=1`, buffered and O_DIRECT in turn)
/// run while the server is upgraded 20 times and killed with SIGKILL after every 4th upgrade
/// (5 failovers). No failed system call, every written block intact through the mount and in
/// the backing file, the mount never absent, the held descriptors kept, fio error=0. Prints one
/// `COMBINED` line per event and the p50/p99 of the longest client stall per upgrade and per
/// failover (docs/reliability.md).
fn combined(passthrough: bool, kill_in_upgrade: bool) {
    let pt = format!("passthrough={passthrough}");
    let m = Mount::start(&["transport=dev-fuse", &pt, "failover=on", "metrics_addr=127.0.0.1:0"]);
    let armed = || m.log().matches("crash failover: on").count();
    assert!(wait_until(Duration::from_secs(10), || armed() >= 1), "failover must be on:\n{}", m.log());
    let mut cur = Served { m: &m, pid: m.pid() };
    let files = 3;
    std::fs::create_dir(m.path("fio")).expect("mkdir fio");
    let clients = Clients::start(&m, files);
    let (rep, stop) = (clients.rep.clone(), clients.stop.clone());
    let fio = FioLoop::start(m.path("fio"), "comb");
    // The descriptors the file clients hold (their targets name the mount): none may go.
    let held = || -> usize {
        std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter(|t| (0..files).any(|i| *t == m.path(format!("f{i}"))))
                    .count()
            })
            .unwrap_or(0)
    };
    let ops = |rep: &Report| rep.ops.iter().map(|o| o.load(Ordering::Relaxed)).collect::<Vec<_>>();
    let all_advanced = |rep: &Report, before: &[u64], by: u64| {
        rep.ops.iter().zip(before).all(|(o, b)| o.load(Ordering::Relaxed) >= b + by)
            || !rep.failures.lock().unwrap().is_empty()
    };
    let before = ops(&rep);
    assert!(wait_until(Duration::from_secs(30), || all_advanced(&rep, &before, 5)), "clients did not start");
    assert!(wait_until(Duration::from_secs(10), || held() == files), "the file clients hold {} files", held());
    let (mut upgrade_stalls, mut failover_stalls, baselines) = (Vec::new(), Vec::new(), Mutex::new(Vec::new()));
    let kills_in_upgrade = Mutex::new(Vec::new());
    // One event: clients busy first (the stretch before is the baseline), then the event, then
    // every client two operations further; returns the longest client operation across it.
    let event = |what: &str, round: usize, cur: &mut Served, stalls: &mut Vec<u64>| {
        for x in &rep.max_us {
            x.store(0, Ordering::Relaxed);
        }
        let before = ops(&rep);
        assert!(wait_until(Duration::from_secs(30), || all_advanced(&rep, &before, 5)), "clients stalled");
        let baseline = rep.max_us.iter().map(|x| x.swap(0, Ordering::Relaxed)).max().unwrap_or(0);
        baselines.lock().unwrap().push(baseline);
        let old = cur.pid;
        let pause_us = if what == "upgrade" {
            let was_armed = armed();
            let (pid, pause_us) = upgrade(&m).unwrap_or_else(|e| {
                stop.store(true, Ordering::Relaxed);
                panic!("upgrade {round} failed: {e}\nserver log:\n{}", m.log())
            });
            cur.pid = pid;
            // The new server arms its own watchdog once its state is in; a SIGKILL before
            // that would meet the old watchdog standing down.
            assert!(
                wait_until(Duration::from_secs(20), || armed() > was_armed),
                "upgrade {round}: the new server did not arm its watchdog:\n{}",
                m.log()
            );
            pause_us
        } else if what == "kill-in-upgrade" {
            let (during, pause_ms) = kill_during_upgrade(cur, round);
            kills_in_upgrade.lock().unwrap().push(during);
            (pause_ms * 1000.0) as u64
        } else {
            (cur.kill_and_wait(round) * 1000.0) as u64
        };
        assert_ne!(cur.pid, old);
        assert!(wait_until(Duration::from_secs(10), || !pid_alive(old)), "{what} {round}: server {old} still runs");
        let after = ops(&rep);
        assert!(
            wait_until(Duration::from_secs(30), || all_advanced(&rep, &after, 2)),
            "clients stalled after {what} {round}:\n{}",
            m.log()
        );
        let stall = rep.max_us.iter().map(|x| x.load(Ordering::Relaxed)).max().unwrap_or(0);
        stalls.push(stall);
        println!(
            "COMBINED passthrough={passthrough} {what}={round} pause_us={pause_us} max_stall_us={stall} baseline_us={baseline}"
        );
        let failures = rep.failures.lock().unwrap().clone();
        assert!(failures.is_empty(), "client failures after {what} {round}: {failures:?}\nserver log:\n{}", m.log());
        assert_eq!(held(), files, "{what} {round}: a file client lost its descriptor");
    };
    for u in 1..=COMBINED_UPGRADES {
        event("upgrade", u, &mut cur, &mut upgrade_stalls);
        if u % KILL_EVERY == 0 {
            event("failover", u / KILL_EVERY, &mut cur, &mut failover_stalls);
        }
        if kill_in_upgrade && u == COMBINED_UPGRADES / 2 {
            event("kill-in-upgrade", 1, &mut cur, &mut failover_stalls);
        }
    }
    let (runs, fio_failures) = fio.finish();
    clients.finish(&m);
    assert!(fio_failures.is_empty(), "{pt}: {fio_failures:?}\nserver log:\n{}", m.log());
    assert!(runs >= 2, "fio ran {runs} times");
    let text = scrape(&metrics_addr(&m).expect("metrics address in the log"));
    // Upgrades are counted across failovers; the failover counters are not (yet) handed on by
    // an upgrade (its HELLO carries the upgrade counters only), so the last server counts the
    // failovers since the last upgrade: here the one after it.
    let ok = sample(&text, "ringfs_upgrades_total{result=\"ok\"}");
    let landed = kills_in_upgrade.into_inner().unwrap().iter().all(|&d| d);
    // A kill that came too late (the upgrade was done) left one more upgrade done.
    assert_eq!(ok, Some((COMBINED_UPGRADES + usize::from(!landed)) as f64), "metrics:\n{text}");
    assert!(sample(&text, "ringfs_failovers_total").is_some_and(|n| n >= 1.0), "metrics:\n{text}");
    assert_eq!(sample(&text, "ringfs_failover_lost_handles_total"), Some(0.0), "{text}");
    let ms = |us: u64| us as f64 / 1000.0;
    let (u50, u99) = (percentile(&mut upgrade_stalls, 50), percentile(&mut upgrade_stalls, 99));
    let (f50, f99) = (percentile(&mut failover_stalls, 50), percentile(&mut failover_stalls, 99));
    let mut baselines = baselines.into_inner().unwrap();
    let (b50, b99) = (percentile(&mut baselines, 50), percentile(&mut baselines, 99));
    println!(
        "COMBINED SUMMARY passthrough={passthrough} upgrades={} stall_p50_ms={:.1} stall_p99_ms={:.1} \
         failovers={} stall_p50_ms={:.1} stall_p99_ms={:.1} without_event_p50_ms={:.1} p99_ms={:.1} \
         fio_runs={runs} kill_landed_in_upgrade={landed}",
        upgrade_stalls.len(),
        ms(u50),
        ms(u99),
        failover_stalls.len(),
        ms(f50),
        ms(f99),
        ms(b50),
        ms(b99)
    );
    drop(cur);
    assert!(!m.is_mounted(), "the last server did not unmount at SIGTERM");
}

#[test]
fn upgrades_and_failovers_combined() {
    let test = "upgrades_and_failovers_combined";
    if !require(test) {
        return;
    }
    if Command::new("fio").arg("--version").output().is_err() {
        tests::skip(test, "fio is not installed");
        return;
    }
    for passthrough in [true, false] {
        combined(passthrough, false);
    }
}

/// [`upgrades_and_failovers_combined`] plus one SIGKILL of the old server in the middle of an
/// upgrade (as soon as it has started the new server): the watchdog fails over; in 1 of 3 runs
/// a file client's fsync still gets EIO (docs/reliability.md, "Not safe yet"). Ignored until
/// that is understood and fixed.
#[test]
#[ignore = "a SIGKILL inside a live upgrade is not yet safe for clients (docs/reliability.md)"]
fn upgrades_and_failovers_combined_with_a_kill_during_an_upgrade() {
    let test = "upgrades_and_failovers_combined_with_a_kill_during_an_upgrade";
    if !require(test) {
        return;
    }
    if Command::new("fio").arg("--version").output().is_err() {
        tests::skip(test, "fio is not installed");
        return;
    }
    for passthrough in [true, false] {
        combined(passthrough, true);
    }
}
