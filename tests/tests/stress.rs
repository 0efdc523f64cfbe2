//! stress-ng's file-system stressors on a real mount: a third-party workload generator that
//! hammers one kind of operation per stressor (directories held open, renames, links, locks,
//! xattrs, holes, ...) from several processes and checks its own results. Every stressor must
//! finish without a failure, as it does on the backing file system, and the server must stay up.
//!
//! Needs root, /dev/fuse and `stress-ng` (Debian package stress-ng; `scripts/setup.sh` installs
//! it). Without them the tests print `SKIP ...`, except under `CI=true`, where they fail.

use std::fs;
use std::process::Command;
use std::time::Duration;

use tests::{require_root_fuse, skip, Mount};

/// Stressors run one after another, two instances each.
const STRESSORS: &[&str] = &[
    "chdir",
    "chmod",
    "chown",
    "copy-file",
    "dentry",
    "dir",
    "dirdeep",
    "fallocate",
    "fcntl",
    "filename",
    "flock",
    "fpunch",
    "fstat",
    "getdent",
    "hdd",
    "inode-flags",
    "iomix",
    "link",
    "lockf",
    "lockofd",
    "mknod",
    "mmap",
    "open",
    "readahead",
    "rename",
    "seek",
    "sendfile",
    "splice",
    "symlink",
    "sync-file",
    "touch",
    "utime",
    "xattr",
];

/// Seconds per stressor.
const SECS: u32 = 2;

fn have_stress_ng(test: &str) -> bool {
    match Command::new("stress-ng").arg("--version").output() {
        Ok(o) if o.status.success() => true,
        _ => skip(test, "stress-ng is not installed (apt-get install stress-ng)"),
    }
}

fn run_stressors(test: &str, opts: &[&str]) {
    if !require_root_fuse(test) || !have_stress_ng(test) {
        return;
    }
    let m = Mount::start(opts);
    fs::create_dir(m.path("stress")).unwrap();
    let mut failed = Vec::new();
    for s in STRESSORS {
        let out = Command::new("stress-ng")
            .arg(format!("--{s}"))
            .arg("2")
            .args(["--timeout", &SECS.to_string(), "--temp-path"])
            .arg(m.path("stress"))
            .output()
            .expect("run stress-ng");
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().filter(|l| l.contains("fail") || l.contains("error")).take(4).collect();
            failed.push(format!("{s} (exit {:?}): {}", out.status.code(), lines.join(" | ")));
        }
        assert!(m.is_mounted(), "the server died during stressor {s}");
    }
    assert!(failed.is_empty(), "{test}: stressors failed through the mount:\n{}", failed.join("\n"));
    // stress-ng removes what it made: the mount and the backing directory agree on that.
    assert!(tests::wait_until(Duration::from_secs(10), || fs::read_dir(m.path("stress")).unwrap().count() == 0));
    assert_eq!(fs::read_dir(m.backing("stress")).unwrap().count(), 0);
}

#[test]
fn stress_ng_file_system_stressors() {
    run_stressors("stress::stress_ng_file_system_stressors", &[]);
}

#[test]
fn stress_ng_file_system_stressors_served_by_the_server() {
    // No passthrough, the classic channel: every read and write goes through the server.
    run_stressors(
        "stress::stress_ng_file_system_stressors_served_by_the_server",
        &["passthrough=false", "transport=dev-fuse"],
    );
}
