//! Live upgrade (`ringfs upgrade MOUNTPOINT`): the mount is handed to a new server process while
//! clients keep files open and keep reading, writing, fsyncing and changing names. No system
//! call may fail, no byte may change, the mount may never be absent, and afterwards the old
//! server is gone and a new one serves. Both channels, passthrough on and off.
//!
//! Each upgrade prints one `UPGRADE` line (the server's pause and the longest stall any client
//! operation saw across it); `scripts/upgrade-pause.sh` runs many and reports p50/p99.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tests::{ringfs_bin, wait_until, Mount};

mod support;
use support::load::*;

/// Upgrades per test (`RINGFS_UPGRADES` overrides, for the pause measurement).
fn upgrades() -> usize {
    std::env::var("RINGFS_UPGRADES").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}

fn uring_enabled() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y")
}

fn require(test: &str, uring: bool) -> bool {
    if !tests::require_root_fuse(test) {
        return false;
    }
    if uring && !uring_enabled() {
        return tests::skip(test, "FUSE over io_uring is off (/sys/module/fuse/parameters/enable_uring)");
    }
    true
}

/// `ringfs upgrade MOUNTPOINT [--binary B] [--force]`: Ok((new pid, pause µs)) or the error line.
fn upgrade(m: &Mount, binary: Option<&Path>, force: bool) -> Result<(u32, u64), String> {
    let mut cmd = Command::new(ringfs_bin());
    cmd.arg("upgrade").arg(&m.mountpoint);
    if force {
        cmd.arg("--force");
    }
    if let Some(b) = binary {
        cmd.arg("--binary").arg(b);
    }
    let out = cmd.output().expect("run ringfs upgrade");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!("{}{}", stdout, String::from_utf8_lossy(&out.stderr)));
    }
    let w: Vec<&str> = stdout.split_whitespace().collect();
    match w.as_slice() {
        ["ok", pid, pause] => Ok((pid.parse().expect("pid"), pause.parse().expect("pause"))),
        _ => Err(format!("unexpected answer: {stdout}")),
    }
}

/// Ends whatever server serves the mount now (the test's own child is long gone after an
/// upgrade), and waits for the mount to go.
struct Current<'a> {
    pid: u32,
    m: &'a Mount,
}

impl Drop for Current<'_> {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the server process.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        wait_until(Duration::from_secs(10), || !self.m.is_mounted());
    }
}

fn upgrades_under_load(test: &str, transport: &str, passthrough: bool) {
    if !require(test, transport == "uring") {
        return;
    }
    upgrades_between(transport, passthrough, &[]);
}

/// A server build for [`upgrades_between`]: its binary, and the `build` label its
/// `ringfs_build_info` carries (`None`: not checked, e.g. a build older than the label).
struct Build {
    bin: PathBuf,
    label: Option<String>,
}

/// Mounts, runs the clients, and upgrades [`upgrades`] times while they run. With `builds`, the
/// mount is served by `builds[0]` first and upgrade `i` goes to `builds[(i + 1) % len]` (each
/// checked to be the binary serving afterwards); without, each upgrade goes to the same binary.
fn upgrades_between(transport: &str, passthrough: bool, builds: &[Build]) {
    let pt = format!("passthrough={passthrough}");
    let tr = format!("transport={transport}");
    let opts = [&tr[..], &pt[..], "metrics_addr=127.0.0.1:0"];
    let m = match builds.first() {
        Some(b) => Mount::start_program(&b.bin, &opts),
        None => Mount::start(&opts),
    };
    let mut cur = Current { pid: m.pid(), m: &m };
    let files = 3;
    let clients = Clients::start(&m, files);
    let (rep, stop) = (clients.rep.clone(), clients.stop.clone());
    let ops = |rep: &Report| rep.ops.iter().map(|o| o.load(Ordering::Relaxed)).collect::<Vec<_>>();
    let all_advanced = |rep: &Report, before: &[u64], by: u64| {
        rep.ops.iter().zip(before).all(|(o, b)| o.load(Ordering::Relaxed) >= b + by)
            || !rep.failures.lock().unwrap().is_empty()
    };
    let n = upgrades();
    for round in 0..n {
        // Every client is busy before the upgrade (and made progress since the last one).
        for x in &rep.max_us {
            x.store(0, Ordering::Relaxed);
        }
        let before = ops(&rep);
        assert!(wait_until(Duration::from_secs(20), || all_advanced(&rep, &before, 5)), "clients stalled");
        // The longest operation in a stretch without an upgrade (the machine's own noise).
        let baseline = rep.max_us.iter().map(|x| x.swap(0, Ordering::Relaxed)).max().unwrap_or(0);
        let old = cur.pid;
        let to = (!builds.is_empty()).then(|| &builds[(round + 1) % builds.len()]);
        let (pid, pause_us) = match upgrade(&m, to.map(|b| b.bin.as_path()), false) {
            Ok(x) => x,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                panic!("upgrade {round} failed: {e}\nserver log:\n{}", m.log());
            }
        };
        cur.pid = pid;
        assert_ne!(pid, old);
        assert!(wait_until(Duration::from_secs(10), || !pid_alive(old)), "old server {old} still running");
        assert!(pid_alive(pid), "new server {pid} not running");
        if let Some(b) = to {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the new server's executable");
            assert_eq!(exe, std::fs::canonicalize(&b.bin).expect("build path"), "upgrade {round}: wrong build serves");
            if let Some(label) = &b.label {
                let text = scrape(&metrics_addr(&m).expect("metrics address in the log"));
                let info = text.lines().find(|l| l.starts_with("ringfs_build_info{")).unwrap_or_default();
                assert!(info.contains(&format!("build=\"{label}\"")), "upgrade {round}: {info}");
            }
        }
        // Ops blocked across the hand-over have finished once every client did two more.
        let after = ops(&rep);
        assert!(
            wait_until(Duration::from_secs(20), || all_advanced(&rep, &after, 2)),
            "clients stalled after upgrade {round}:\n{}",
            m.log()
        );
        let stall = rep.max_us.iter().map(|x| x.load(Ordering::Relaxed)).max().unwrap_or(0);
        println!(
            "UPGRADE transport={transport} passthrough={passthrough} round={round} pause_us={pause_us} max_stall_us={stall} baseline_us={baseline}"
        );
        let failures = rep.failures.lock().unwrap().clone();
        assert!(failures.is_empty(), "client failures after upgrade {round}: {failures:?}\nserver log:\n{}", m.log());
    }
    clients.finish(&m);
    // Every byte written is there, through the mount and in the backing file.
    // The last server counts every upgrade of this mount.
    let addr = metrics_addr(&m).expect("metrics address in the log");
    let text = scrape(&addr);
    assert_eq!(sample(&text, "ringfs_upgrades_total{result=\"ok\"}"), Some(n as f64), "metrics:\n{text}");
    assert!(sample(&text, "ringfs_upgrade_last_pause_seconds").is_some_and(|p| p > 0.0));
    drop(cur);
    assert!(!m.is_mounted(), "the last server did not unmount at SIGTERM");
}

/// FUSE over io_uring: a plain upgrade is refused (the kernel cannot take ring entries back
/// without a chance of failing a request in flight; docs/reliability.md), the server goes on.
#[test]
fn upgrade_uring_is_refused_without_force() {
    let test = "upgrade_uring_is_refused_without_force";
    if !require(test, true) {
        return;
    }
    let m = Mount::start(&["transport=uring", "metrics_addr=127.0.0.1:0"]);
    let _cur = Current { pid: m.pid(), m: &m };
    std::fs::write(m.path("f"), b"kept").expect("write");
    let err = upgrade(&m, None, false).expect_err("refused on io_uring");
    assert!(err.contains("refused") && err.contains("io_uring") && err.contains("--force"), "{err}");
    assert!(pid_alive(m.pid()));
    assert_eq!(std::fs::read(m.path("f")).expect("read"), b"kept");
    let text = scrape(&metrics_addr(&m).expect("metrics address"));
    assert_eq!(sample(&text, "ringfs_upgrades_total{result=\"refused\"}"), Some(1.0), "{text}");
}

/// FUSE over io_uring with `--force`, with files held open but no request racing the
/// hand-over: the connection, its queues (new ring entries registered by each new process),
/// the open files and the passthrough backing ids move on, five times over.
#[test]
fn upgrade_uring_forced_with_files_held_open() {
    let test = "upgrade_uring_forced_with_files_held_open";
    if !require(test, true) {
        return;
    }
    for passthrough in ["passthrough=true", "passthrough=false"] {
        let m = Mount::start(&["transport=uring", passthrough]);
        let mut cur = Current { pid: m.pid(), m: &m };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(m.path("held"))
            .expect("open");
        let dir = std::fs::File::open(&m.mountpoint).expect("open dir");
        for round in 0..5u8 {
            use std::io::{Read, Seek};
            f.write_all(&[round; 4096]).expect("write through the held descriptor");
            f.sync_all().expect("fsync");
            let (pid, _) = upgrade(&m, None, true).unwrap_or_else(|e| panic!("upgrade {round}: {e}\n{}", m.log()));
            let old = cur.pid;
            cur.pid = pid;
            assert!(wait_until(Duration::from_secs(10), || !pid_alive(old)), "old server {old} still running");
            f.seek(std::io::SeekFrom::Start(4096 * u64::from(round))).expect("seek");
            let mut back = [0u8; 4096];
            f.read_exact(&mut back).expect("read through the held descriptor after the upgrade");
            assert_eq!(back, [round; 4096]);
            f.seek(std::io::SeekFrom::End(0)).expect("seek end");
            // SAFETY: fstat on a valid descriptor (a request on the directory handle).
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::fstat(std::os::fd::AsRawFd::as_raw_fd(&dir), &mut st) }, 0);
            assert!(std::fs::read_dir(&m.mountpoint).expect("list").count() >= 1);
        }
        assert_eq!(std::fs::metadata(m.backing("held")).expect("backing").len(), 5 * 4096);
        drop(f);
        drop(dir);
        drop(cur);
    }
}

#[test]
fn upgrade_dev_fuse_passthrough() {
    upgrades_under_load("upgrade_dev_fuse_passthrough", "dev-fuse", true);
}

#[test]
fn upgrade_dev_fuse_served() {
    upgrades_under_load("upgrade_dev_fuse_served", "dev-fuse", false);
}

/// `RINGFS_BUILD_ID` of the second build [`other_build`] makes from this source.
const OTHER_BUILD_ID: &str = "cross-build-test";

/// The `build` label of a binary's `ringfs_build_info`, from its `--version` line
/// (`ringfs 0.1.0` or `ringfs 0.1.0 (build ID)`).
fn build_label(bin: &Path) -> String {
    let out = Command::new(bin).arg("--version").output().expect("ringfs --version");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    line.split_once("(build ").and_then(|(_, b)| b.strip_suffix(')')).unwrap_or_default().to_string()
}

/// The other build of [`upgrade_between_two_builds`]: `RINGFS_OTHER_BIN` when set (for instance
/// a previous commit's binary, as `scripts/upgrade-across-builds.sh` builds it), else this source
/// built again with `RINGFS_BUILD_ID` set into a target directory of its own,
/// `<target>/cross-build` (the first build there compiles every dependency; later ones only
/// what changed since).
fn other_build() -> Build {
    if let Some(p) = std::env::var_os("RINGFS_OTHER_BIN") {
        return Build { bin: PathBuf::from(p), label: None };
    }
    let exe = std::env::current_exe().expect("test executable");
    // <target>/<profile>/deps/upgrade-HASH
    let profile_dir = exe.parent().and_then(Path::parent).expect("profile directory");
    let profile = profile_dir.file_name().and_then(|p| p.to_str()).unwrap_or("debug").to_string();
    let target = profile_dir.parent().expect("target directory").join("cross-build");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "-p", "server", "--bin", "ringfs"])
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", &target)
        .env("RINGFS_BUILD_ID", OTHER_BUILD_ID);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "building the other server build failed: {status}");
    Build { bin: target.join(&profile).join("ringfs"), label: Some(OTHER_BUILD_ID.to_string()) }
}

/// An upgrade between two different builds (issue 20): the mount starts on the other build and
/// is handed back and forth between it and the build under test while the clients run
/// (the under-load checks: no failed system call, no byte lost, the mount never absent), each
/// new server checked to be the build it was asked for (its executable, and the `build` label
/// of its metrics). So this build takes over a state another build wrote, and the other takes
/// this one's. The other build is this source with a different build-time constant unless
/// `RINGFS_OTHER_BIN` names one (docs/reliability.md, "Upgrades between builds").
#[test]
fn upgrade_between_two_builds() {
    let test = "upgrade_between_two_builds";
    if !require(test, false) {
        return;
    }
    let other = other_build();
    let this = Build { label: Some(build_label(&ringfs_bin())), bin: ringfs_bin() };
    assert!(
        std::fs::read(&other.bin).expect("other build") != std::fs::read(&this.bin).expect("this build"),
        "{} and {} are the same build",
        other.bin.display(),
        this.bin.display()
    );
    if let (Some(a), Some(b)) = (&other.label, &this.label) {
        assert_ne!(a, b, "both builds carry the build id {a:?}");
    }
    let builds = [other, this];
    for passthrough in [true, false] {
        upgrades_between("dev-fuse", passthrough, &builds);
    }
}

/// A new binary that cannot read the running server's state version refuses it; the old server
/// never stopped serving and goes on (its open files too), and counts the refusal.
#[test]
fn a_state_version_the_new_server_cannot_read_is_refused() {
    let test = "a_state_version_the_new_server_cannot_read_is_refused";
    if !require(test, false) {
        return;
    }
    let m = Mount::start(&["transport=dev-fuse", "metrics_addr=127.0.0.1:0"]);
    let mut cur = Current { pid: m.pid(), m: &m };
    std::fs::write(m.path("f"), b"before").expect("write");
    let held = std::fs::File::open(m.path("f")).expect("open");
    // An "older build": one that reads no state version.
    let wrapper = m.scratch().join("old-ringfs");
    std::fs::write(&wrapper, format!("#!/bin/sh\nRINGFS_STATE_VERSION=0 exec {} \"$@\"\n", ringfs_bin().display()))
        .expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let err = upgrade(&m, Some(&wrapper), false).expect_err("the upgrade must be refused");
    assert!(err.contains("refused") && err.contains("state version 1"), "{err}");
    assert!(pid_alive(m.pid()), "the old server must keep serving");
    assert!(m.is_mounted());
    use std::io::Read;
    let mut s = String::new();
    (&held).read_to_string(&mut s).expect("read the held file");
    assert_eq!(s, "before");
    std::fs::write(m.path("g"), b"after").expect("write after the refusal");
    assert_eq!(std::fs::read(m.backing("g")).expect("backing"), b"after");
    let text = scrape(&metrics_addr(&m).expect("metrics address"));
    assert_eq!(sample(&text, "ringfs_upgrades_total{result=\"refused\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "ringfs_upgrades_total{result=\"ok\"}"), Some(0.0));
    // And a real upgrade still works afterwards.
    let (pid, _) = upgrade(&m, None, false).expect("upgrade after a refusal");
    cur.pid = pid;
    assert_eq!(std::fs::read(m.path("g")).expect("read through the new server"), b"after");
    drop(held);
    drop(cur);
}

/// fio with `--verify=crc32c --verify_fatal=1` (4 KiB random buffered writes, then 128 KiB
/// sequential O_DIRECT writes, in turn) runs through five upgrades of a classic-channel mount,
/// passthrough on and off: every fio run exits 0 with no error and reads back what it wrote.
#[test]
fn fio_verify_through_upgrades() {
    let test = "fio_verify_through_upgrades";
    if !require(test, false) {
        return;
    }
    if Command::new("fio").arg("--version").output().is_err() {
        tests::skip(test, "fio is not installed");
        return;
    }
    for passthrough in ["passthrough=true", "passthrough=false"] {
        let m = Mount::start(&["transport=dev-fuse", passthrough]);
        let mut cur = Current { pid: m.pid(), m: &m };
        let fio = FioLoop::start(m.path(""), "upg");
        for round in 0..5 {
            // Each upgrade lands in the middle of a run (one started since the last upgrade).
            fio.wait_for_a_run();
            let (pid, _) = upgrade(&m, None, false).unwrap_or_else(|e| panic!("upgrade {round}: {e}\n{}", m.log()));
            cur.pid = pid;
        }
        let (runs, failures) = fio.finish();
        assert!(failures.is_empty(), "{passthrough}: {failures:?}\nserver log:\n{}", m.log());
        assert!(runs >= 6, "fio ran {runs} times");
        drop(cur);
    }
}
