//! Runs `ringfs-bench --smoke` against a real ringfs mount and checks its outputs.
//!
//! Needs root, /dev/fuse, fio, python3 and the `ringfs` binary. When one is missing the test
//! prints `SKIP smoke: <reason>` and passes, except under `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

fn skip(reason: &str) {
    if in_ci() {
        panic!("smoke test cannot run under CI=true: {reason}");
    }
    println!("SKIP smoke: {reason}");
}

/// `target/<profile>/ringfs`: the test binary lives in `target/<profile>/deps`.
fn ringfs_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RINGFS_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let candidate = profile_dir.join("ringfs");
    if candidate.is_file() {
        return Some(candidate);
    }
    // Not built yet (e.g. `cargo test -p bench` alone): build it into the same profile dir.
    let cargo = std::env::var_os("CARGO")?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "server", "--bin", "ringfs"]).current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        cmd.arg("--release");
    }
    let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
    (ok && candidate.is_file()).then_some(candidate)
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

fn probe() -> Result<PathBuf, String> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (mounting needs CAP_SYS_ADMIN)".into());
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_err() {
        return Err("/dev/fuse cannot be opened".into());
    }
    for tool in ["fio", "python3"] {
        if !have(tool) {
            return Err(format!("{tool} is not installed"));
        }
    }
    ringfs_bin().filter(|p| p.is_file()).ok_or_else(|| "ringfs binary not found (set RINGFS_BIN)".into())
}

fn fuse_mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.to_string_lossy().into_owned();
    info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|mp| mp.starts_with(&dir)).map(str::to_owned).collect()
}

#[test]
fn smoke_run_writes_parseable_outputs() {
    let ringfs = match probe() {
        Ok(p) => p,
        Err(reason) => return skip(&reason),
    };
    let work = tempfile::Builder::new().prefix("ringfs-bench-smoke").tempdir_in("/var/tmp").expect("work dir");
    let out = work.path().join("out");
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_ringfs-bench"))
        .arg("--smoke")
        .arg("--work")
        .arg(work.path())
        .arg("--out")
        .arg(&out)
        .arg("--ringfs-bin")
        .arg(&ringfs)
        .output()
        .expect("running ringfs-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "ringfs-bench --smoke failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(started.elapsed().as_secs() < 60, "smoke mode took {:?}", started.elapsed());
    assert!(fuse_mounts_under(work.path()).is_empty(), "mounts left behind: {:?}", fuse_mounts_under(work.path()));

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("results.json")).expect("JSON");
    let rows = json["rows"].as_array().expect("rows array");
    assert!(rows.len() >= 3, "{rows:?}");
    for row in rows {
        for target in ["native", "ringfs"] {
            let median = row["results"][target]["median"].as_f64();
            assert!(median.is_some_and(|m| m > 0.0), "row {} has no median for {target}", row["name"]);
        }
        assert!(row["results"]["ringfs"]["ratio_to_native"].as_f64().is_some());
    }

    let csv = std::fs::read_to_string(out.join("results.csv")).expect("results.csv");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("row,unit,kind,target,median,min,max,n,ratio_to_native,errors"));
    assert_eq!(lines.count(), rows.len() * 2);

    let svg = std::fs::read_to_string(out.join("chart.svg")).expect("chart.svg");
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{}", &svg[..svg.len().min(80)]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(stdout.contains("| row | unit | kind | native | ringfs |"), "{stdout}");
}
