//! POSIX conformance: the pjdfstest suite (crates.io `pjdfstest` 0.2.2) on native ext4 and
//! through ringfs mounts, compared test by test.
//!
//! The same configuration (`tests/pjdfstest/pjdfstest.toml`) drives every run. A test that
//! passes natively but fails through ringfs is a regression of ringfs and fails this test; tests
//! that fail natively too (this pjdfstest version has known bugs) are only reported.
//!
//! Needs `pjdfstest` (`PJDFSTEST`, the `PATH`, or `$CARGO_HOME/bin`) and the dummy users of the
//! configuration (`nobody`/`nogroup`, `pjdtest`), which `scripts/setup.sh` provides.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tests::{require_root_fuse, skip, wait_until, Mount};

/// Longest a single pjdfstest run may take (a full run takes seconds).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Skip,
    ExpectedFail,
    UnexpectedPass,
}

/// The outcome of every test case of one run, and the detail lines printed under failures.
#[derive(Debug, Default)]
struct Run {
    outcomes: BTreeMap<String, Outcome>,
    details: BTreeMap<String, String>,
    elapsed: Duration,
}

impl Run {
    fn count(&self, o: Outcome) -> usize {
        self.outcomes.values().filter(|&&v| v == o).count()
    }

    fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped ({} total, {:.1} s)",
            self.count(Outcome::Pass) + self.count(Outcome::UnexpectedPass),
            self.count(Outcome::Fail) + self.count(Outcome::ExpectedFail),
            self.count(Outcome::Skip),
            self.outcomes.len(),
            self.elapsed.as_secs_f64()
        )
    }

    fn passed(&self, name: &str) -> bool {
        matches!(self.outcomes.get(name), Some(Outcome::Pass | Outcome::UnexpectedPass))
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses pjdfstest's per-test lines (`name <spaces> ok|FAILED|skipped|...`); indented lines
/// after a test are its details.
fn parse(output: &str) -> Run {
    let mut run = Run::default();
    let mut last: Option<String> = None;
    for raw in output.lines() {
        let line = strip_ansi(raw);
        if line.starts_with('\t') || line.starts_with(' ') {
            if let Some(name) = &last {
                let d = run.details.entry(name.clone()).or_default();
                d.push_str(line.trim());
                d.push('\n');
            }
            continue;
        }
        let line = line.trim_end();
        let Some((name, rest)) = line.split_once(char::is_whitespace) else { continue };
        let outcome = match rest.trim() {
            "ok" => Outcome::Pass,
            "FAILED" => Outcome::Fail,
            "skipped" => Outcome::Skip,
            "failed as expected" => Outcome::ExpectedFail,
            "PASSED UNEXPECTEDLY" => Outcome::UnexpectedPass,
            _ => {
                last = None;
                continue;
            }
        };
        run.outcomes.insert(name.to_owned(), outcome);
        last = Some(name.to_owned());
    }
    run
}

fn pjdfstest_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PJDFSTEST") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(h).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join("pjdfstest")).find(|p| p.is_file())
}

fn config_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pjdfstest/pjdfstest.toml")
}

/// Users and groups named in the configuration's `[dummy_auth]` exist.
fn dummy_users_missing() -> Option<String> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let has = |db: &str, name: &str| db.lines().any(|l| l.split(':').next() == Some(name));
    for (u, g) in [("nobody", "nogroup"), ("pjdtest", "pjdtest")] {
        if !has(&passwd, u) || !has(&group, g) {
            return Some(format!("user {u} / group {g} missing (run scripts/setup.sh)"));
        }
    }
    None
}

/// A directory on another file system for the EXDEV tests.
fn secondary_fs(primary: &Path) -> Option<PathBuf> {
    let dev = fs::metadata(primary).ok()?.dev();
    ["/dev/shm", "/run", "/tmp"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_dir() && m.dev() != dev))
}

/// Runs the whole suite in `dir` and parses its output (kept in `log`).
fn run_suite(bin: &Path, dir: &Path, log: &Path) -> Run {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(config_file()).arg("-p").arg(dir);
    if let Some(s) = secondary_fs(dir) {
        cmd.arg("-s").arg(s);
    }
    let out = File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let start = Instant::now();
    let mut child = cmd
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let finished = wait_until(RUN_TIMEOUT, || matches!(child.try_wait(), Ok(Some(_))));
    if !finished {
        let _ = child.kill();
        let _ = child.wait();
        panic!("pjdfstest in {} did not finish within {RUN_TIMEOUT:?}; output in {}", dir.display(), log.display());
    }
    let mut run = parse(&fs::read_to_string(log).unwrap());
    run.elapsed = start.elapsed();
    assert!(run.outcomes.len() > 100, "pjdfstest ran only {} tests; see {}", run.outcomes.len(), log.display());
    run
}

/// Where the full outputs are kept: `<target>/pjdfstest/`.
fn log_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap_or(Path::new("/tmp")).join("pjdfstest");
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// The native ext4 baseline, run once per test process.
fn native(bin: &Path) -> &'static Run {
    static NATIVE: OnceLock<Run> = OnceLock::new();
    NATIVE.get_or_init(|| {
        // The same path shape and length as a `Mount`'s mount point (`/tmp/ringfs-test-XXXXXX/mnt`):
        // pjdfstest 0.2.2's `*::enametoolong_path` cases panic ("capacity overflow") or not
        // depending on the length of the path they run in, so both runs must use equal lengths.
        let dir = tempfile::Builder::new().prefix("ringfs-test-").tempdir_in("/tmp").unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        run_suite(bin, &mnt, &log_dir().join("native.log"))
    })
}

fn prerequisites(test: &str) -> Option<PathBuf> {
    if !require_root_fuse(test) {
        return None;
    }
    let Some(bin) = pjdfstest_bin() else {
        skip(test, "pjdfstest not installed (cargo install pjdfstest --version 0.2.2 --locked; scripts/setup.sh)");
        return None;
    };
    if let Some(why) = dummy_users_missing() {
        skip(test, &why);
        return None;
    }
    Some(bin)
}

/// Runs the suite through a ringfs mount with `opts` and compares it with native ext4.
fn compare(test: &str, label: &str, opts: &[&str]) {
    let Some(bin) = prerequisites(test) else { return };
    let native = native(&bin);
    let m = Mount::start(opts);
    assert_eq!(m.mountpoint.as_os_str().len(), "/tmp/ringfs-test-XXXXXX/mnt".len(), "see native()");
    let log = log_dir().join(format!("ringfs-{label}.log"));
    let ours = run_suite(&bin, &m.mountpoint, &log);
    assert!(m.is_mounted(), "the mount disappeared during pjdfstest; server log:\n{}", m.log());
    drop(m);

    let extra = std::env::var("RINGFS_EXTRA_OPTS").map(|e| format!(",{e}")).unwrap_or_default();
    println!(
        "pjdfstest native: {} passed, {} failed; ringfs ({label}): {} passed, {} failed",
        native.count(Outcome::Pass) + native.count(Outcome::UnexpectedPass),
        native.count(Outcome::Fail) + native.count(Outcome::ExpectedFail),
        ours.count(Outcome::Pass) + ours.count(Outcome::UnexpectedPass),
        ours.count(Outcome::Fail) + ours.count(Outcome::ExpectedFail),
    );
    println!("  native ext4: {}", native.summary());
    println!("  ringfs -o {}{extra}: {}", opts.join(","), ours.summary());
    let native_failures: Vec<&String> = native
        .outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Fail | Outcome::ExpectedFail))
        .map(|(n, _)| n)
        .collect();
    if !native_failures.is_empty() {
        println!("failing natively too (not counted): {native_failures:?}");
    }
    let skipped_only_here: Vec<&String> =
        ours.outcomes.iter().filter(|(n, o)| **o == Outcome::Skip && native.passed(n)).map(|(n, _)| n).collect();
    if !skipped_only_here.is_empty() {
        println!("pass natively, skipped through ringfs: {skipped_only_here:?}");
        for n in &skipped_only_here {
            println!("  {n}: {}", ours.details.get(*n).map(|s| s.trim()).unwrap_or(""));
        }
    }
    let missing: Vec<&String> = native.outcomes.keys().filter(|n| !ours.outcomes.contains_key(*n)).collect();
    let regressions: Vec<&String> = native
        .outcomes
        .keys()
        .filter(|n| native.passed(n) && matches!(ours.outcomes.get(*n), Some(Outcome::Fail | Outcome::ExpectedFail)))
        .collect();
    let mut report = String::new();
    for n in &regressions {
        report.push_str(&format!("  {n}\n"));
        for l in ours.details.get(*n).map(|s| s.lines().take(6).collect::<Vec<_>>()).unwrap_or_default() {
            report.push_str(&format!("      {l}\n"));
        }
    }
    println!("pass natively, fail through ringfs ({label}): {}\n{report}", regressions.len());
    assert!(missing.is_empty(), "tests run natively but not through ringfs: {missing:?} (see {})", log.display());
    assert!(
        regressions.is_empty(),
        "{} pjdfstest cases pass on native ext4 but fail through ringfs ({label}); full output in {}:\n{report}",
        regressions.len(),
        log.display()
    );
}

#[test]
fn pjdfstest_default_options() {
    compare("pjdfstest::pjdfstest_default_options", "default", &["allow_other"]);
}

#[test]
fn pjdfstest_dev_fuse_without_passthrough() {
    compare(
        "pjdfstest::pjdfstest_dev_fuse_without_passthrough",
        "dev-fuse-no-passthrough",
        &["allow_other", "transport=dev-fuse", "passthrough=false", "entry_timeout=0", "attr_timeout=0"],
    );
}

/// Metadata calls through the rings' io-wq workers instead of inline: creations run as the
/// caller through io_uring personalities, which this run checks for ownership and permissions.
#[test]
fn pjdfstest_metadata_through_the_ring() {
    compare(
        "pjdfstest::pjdfstest_metadata_through_the_ring",
        "ring-metadata",
        &["allow_other", "inline_metadata=false"],
    );
}

#[test]
fn parser_reads_pjdfstest_lines() {
    let out = "chmod::a      ok\n\u{1b}[34mchmod::b\u{1b}[0m    \u{1b}[31mFAILED\u{1b}[0m\n\tassertion failed\n\
               link::c    skipped\n\trequires features: x\nx::d   failed as expected\n\nSummary: 1 failed\n";
    let run = parse(out);
    assert_eq!(run.outcomes.len(), 4);
    assert_eq!(run.outcomes["chmod::a"], Outcome::Pass);
    assert_eq!(run.outcomes["chmod::b"], Outcome::Fail);
    assert_eq!(run.outcomes["link::c"], Outcome::Skip);
    assert_eq!(run.outcomes["x::d"], Outcome::ExpectedFail);
    assert_eq!(run.details["chmod::b"].trim(), "assertion failed");
}
