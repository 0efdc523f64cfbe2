//! The service manager's view of the server: systemd readiness notifications (`Type=notify`)
//! and journald priorities on log lines.
//!
//! Both are no-ops outside systemd: without `NOTIFY_SOCKET` nothing is sent, and log lines get
//! a priority prefix only when standard error is the journal's stream (`JOURNAL_STREAM` names
//! its device and inode, as systemd sets it for a service's stdout/stderr).

use std::os::unix::fs::MetadataExt;

use sd_notify::NotifyState;

/// Tells the service manager the mount serves (`READY=1`) with a one-line status.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line the service manager shows (`STATUS=`).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells the service manager this process is the service's main process now (`MAINPID=`, a
/// live upgrade; the unit needs `NotifyAccess=all`), and that it serves.
pub fn new_main_process(status: &str) {
    send(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager the server is shutting down (`STOPPING=1`).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}

/// True when standard error is the journal's stream: `JOURNAL_STREAM` is `DEV:INO` of the
/// socket systemd connected to the service's stderr, and descriptor 2 is still that socket
/// (a child that redirected stderr elsewhere must not prefix its lines).
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(md) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    md.dev() == dev && md.ino() == ino
}

/// The syslog priority journald reads from a `<N>` line prefix.
pub fn journal_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(journal_priority(log::Level::Error), 3);
        assert_eq!(journal_priority(log::Level::Warn), 4);
        assert_eq!(journal_priority(log::Level::Info), 6);
        assert_eq!(journal_priority(log::Level::Trace), 7);
    }
}
