//! ringfs as a systemd service: readiness (`Type=notify`: READY=1 only once the mount serves,
//! STATUS=, STOPPING=1 on SIGTERM) proven by listening on a `NOTIFY_SOCKET` as systemd does,
//! journald priorities on log lines when stderr is the journal's stream, and the shipped unit
//! file checked by `systemd-analyze verify` where systemd's tools exist.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tests::{in_ci, mounted_fstype, require_root_fuse, ringfs_command, wait_until, FSTYPE};

/// Kills the server if a test fails while it runs (the mount is left to its watchdog).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `ringfs mount WORK/src WORK/mnt -f` with metrics off, its file-handle state in WORK, stderr
/// to `log`, and one extra environment variable (`RUST_LOG` unset: the default level).
fn spawn_mount(work: &std::path::Path, log: fs::File, env: (&str, &std::ffi::OsStr)) -> Server {
    let state = format!("export_state_dir={}", work.join("handles").display());
    let (src, mnt) = (work.join("src"), work.join("mnt"));
    let args =
        [src.as_os_str(), mnt.as_os_str(), "-o".as_ref(), "metrics_addr=".as_ref(), "-o".as_ref(), state.as_ref()];
    let child = ringfs_command(std::iter::once("mount".as_ref()).chain(args))
        .env(env.0, env.1)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn ringfs");
    Server(child)
}

/// Receives datagrams until one contains `want` or `timeout` passes; returns all received.
fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < timeout {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == want);
                got.push(msg);
                if done {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }
    got
}

#[test]
fn readiness_status_and_stopping_reach_the_notify_socket() {
    if !require_root_fuse("service::readiness_status_and_stopping_reach_the_notify_socket") {
        return;
    }
    let work = tempfile::tempdir_in("/tmp").unwrap();
    let (src, mnt) = (work.path().join("src"), work.path().join("mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(src.join("hello"), b"served").unwrap();
    let notify = work.path().join("notify");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let log = fs::File::create(work.path().join("log")).unwrap();
    let mut server = spawn_mount(work.path(), log, ("NOTIFY_SOCKET", notify.as_os_str()));
    let log = || fs::read_to_string(work.path().join("log")).unwrap_or_default();

    let got = recv_until(&sock, "READY=1", Duration::from_secs(10));
    assert!(got.iter().any(|m| m.lines().any(|l| l == "READY=1")), "no READY=1 within 10 s: {got:?}; log:\n{}", log());
    // READY=1 means the mount serves: no polling needed from here on.
    assert_eq!(mounted_fstype(&mnt).as_deref(), Some(FSTYPE), "READY=1 before the mount was there");
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"served", "READY=1 before the mount served");
    let ready = got.iter().find(|m| m.contains("READY=1")).unwrap();
    let status = ready.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_default();
    assert!(status.contains(&*mnt.to_string_lossy()), "STATUS= names the mount point: {ready:?}");

    // SAFETY: kill(2) on our own, not yet reaped, child.
    unsafe { libc::kill(server.0.id() as libc::pid_t, libc::SIGTERM) };
    let got = recv_until(&sock, "STOPPING=1", Duration::from_secs(10));
    assert!(got.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")), "no STOPPING=1 after SIGTERM: {got:?}");
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            status = server.0.try_wait().ok().flatten();
            status.is_some()
        }),
        "ringfs did not exit after SIGTERM; log:\n{}",
        log()
    );
    assert!(status.unwrap().success(), "exit status {status:?}; log:\n{}", log());
    assert!(mounted_fstype(&mnt).is_none(), "still mounted after a clean stop");
}

#[test]
fn log_lines_carry_journal_priorities_when_stderr_is_the_journal() {
    // A mount run whose stderr is a file named by JOURNAL_STREAM (as systemd names the
    // journal's socket): every line it logs starts with a syslog priority.
    if !require_root_fuse("service::log_lines_carry_journal_priorities_when_stderr_is_the_journal") {
        return;
    }
    let work = tempfile::tempdir_in("/tmp").unwrap();
    let (src, mnt) = (work.path().join("src"), work.path().join("mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    let log_path = work.path().join("journal");
    let log = fs::File::create(&log_path).unwrap();
    let md = fs::metadata(&log_path).unwrap();
    let stream = format!("{}:{}", md.dev(), md.ino());
    let mut server = spawn_mount(work.path(), log, ("JOURNAL_STREAM", stream.as_ref()));
    assert!(
        wait_until(Duration::from_secs(10), || fs::read_to_string(&log_path).unwrap_or_default().contains(" on ")
            && mounted_fstype(&mnt).is_some()),
        "no mount; log:\n{}",
        fs::read_to_string(&log_path).unwrap_or_default()
    );
    // SAFETY: kill(2) on our own, not yet reaped, child.
    unsafe { libc::kill(server.0.id() as libc::pid_t, libc::SIGTERM) };
    assert!(wait_until(Duration::from_secs(15), || matches!(server.0.try_wait(), Ok(Some(_)))), "no exit");
    let text = fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            l.starts_with("<3>") || l.starts_with("<4>") || l.starts_with("<6>") || l.starts_with("<7>"),
            "a line without a journal priority: {l:?} in\n{text}"
        );
    }
    assert!(lines.iter().any(|l| l.starts_with("<6>mounted ")), "the mount line is info (6):\n{text}");

    // A start-up error is an error (3) for the journal; plain when JOURNAL_STREAM names
    // another file than stderr.
    let missing = work.path().join("missing");
    let log = fs::File::create(&log_path).unwrap();
    let out = ringfs_command([missing.as_os_str(), mnt.as_os_str(), "-f".as_ref()])
        .env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()))
        .stderr(log)
        .status()
        .unwrap();
    assert!(!out.success());
    let text = fs::read_to_string(&log_path).unwrap();
    assert!(text.starts_with("<3>ringfs: backing directory"), "{text}");
    let out = ringfs_command([missing.as_os_str(), mnt.as_os_str(), "-f".as_ref()])
        .env("JOURNAL_STREAM", "1:1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("ringfs: backing directory"), "{err}");
}

#[test]
fn the_systemd_unit_is_valid() {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/ringfs@.service");
    let text = fs::read_to_string(&unit).unwrap();
    for line in ["Type=notify", "ExecStart=/usr/sbin/ringfs mount --config /etc/ringfs/%i.toml", "KillMode=mixed"] {
        assert!(text.lines().any(|l| l == line), "{line} missing from {}", unit.display());
    }
    for forbidden in ["PrivateTmp=", "ProtectSystem=", "ProtectHome=", "PrivateDevices=", "PrivateMounts="] {
        assert!(
            !text.lines().any(|l| l.starts_with(forbidden)),
            "{forbidden} would give the service its own mount namespace: the mount would be invisible"
        );
    }
    if which("systemd-analyze").is_none() {
        println!("service::the_systemd_unit_is_valid: systemd-analyze missing; checked the text only");
        assert!(!in_ci(), "CI=true: systemd-analyze (Debian's systemd) is expected");
        return;
    }
    // An instance of the template, verified offline: only a missing binary or man page (not
    // installed here) may be reported.
    let dir = tempfile::tempdir().unwrap();
    let inst = dir.path().join("ringfs@test.service");
    fs::copy(&unit, &inst).unwrap();
    let out = std::process::Command::new("systemd-analyze").arg("verify").arg(&inst).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    for l in err.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            l.contains("/usr/sbin/ringfs is not executable") || l.contains("man ringfs(8)"),
            "systemd-analyze verify: {l}\n{err}"
        );
    }
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| std::path::Path::new(d).join(cmd)).find(|p| p.is_file())
}
