//! Real workloads (untar, find + stat, git status, cargo build) and metadata storms timed in
//! Python, each timed natively and through every mount.
//!
//! Each workload has an untimed native setup (run before the target is mounted), an untimed warm
//! step, and one timed command run through the target's path. Targets are mounted fresh for every
//! measurement, so through a mount the FUSE caches start cold while the backing file system's
//! caches are warm.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::proc;

/// Every workload, in report order.
pub(crate) const WORKLOADS: &[&str] =
    &["untar", "find-stat", "find-flat", "ls", "ls-l", "git-status", "cargo-build", "rm-rf", "meta-py"];

/// One result row of a workload: name, unit, and whether higher is better.
pub(crate) struct Row {
    /// Row name.
    pub name: String,
    /// Unit.
    pub unit: &'static str,
    /// True for rates, false for durations.
    pub higher_is_better: bool,
}

/// The result rows of workload `name`.
pub(crate) fn rows(name: &str) -> Vec<Row> {
    if name == "meta-py" {
        META_PHASES
            .iter()
            .map(|p| Row { name: format!("meta-py:{p}"), unit: "files/s", higher_is_better: true })
            .collect()
    } else {
        vec![Row { name: name.to_owned(), unit: "s", higher_is_better: false }]
    }
}

/// What the workloads need.
#[derive(Clone, Debug)]
pub(crate) struct WlParams {
    /// Generated small files in the source tree (besides the repository sources).
    pub tree_files: u32,
    /// Files of the Python metadata storm.
    pub meta_files: u32,
    /// Minimum time between the last mass deletion and the storm's create phase.
    pub meta_settle: std::time::Duration,
    /// Repository whose sources go into the tarball (None: generated files only).
    pub repo_root: Option<PathBuf>,
    /// Where the tarball is kept between runs.
    pub cache_dir: PathBuf,
}

/// Things made once by [`prepare`].
#[derive(Clone, Debug)]
pub(crate) struct Prepared {
    /// The source tarball.
    pub tarball: PathBuf,
    /// Entries in it.
    pub entries: usize,
}

const TIMEOUT: Duration = Duration::from_secs(900);

fn wl(src: &Path) -> PathBuf {
    src.join("wl")
}

/// Builds the tarball (cached) and, natively in `src`, the trees the workloads read.
pub(crate) fn prepare(selected: &[String], src: &Path, params: &WlParams) -> Result<Prepared> {
    let needs_tree = selected.iter().any(|w| ["untar", "find-stat", "git-status", "rm-rf"].contains(&w.as_str()));
    let mut prepared = Prepared { tarball: PathBuf::new(), entries: 0 };
    if needs_tree {
        prepared = make_tarball(params)?;
    }
    let wl = wl(src);
    fs::create_dir_all(&wl)?;
    let stamp = format!("{}\n", prepared.tarball.display());
    if selected.iter().any(|w| w == "find-stat") {
        extract_once(&prepared, &wl.join("tree"), &stamp, false)?;
    }
    if selected.iter().any(|w| w == "git-status") {
        extract_once(&prepared, &wl.join("repo"), &stamp, true)?;
    }
    if selected.iter().any(|w| w == "cargo-build") {
        make_crate(&wl.join("crate"))?;
    }
    if selected.iter().any(|w| ["ls", "ls-l", "find-flat"].contains(&w.as_str())) {
        make_flat_dir(&wl.join("lsdir"), params.meta_files)?;
    }
    Ok(prepared)
}

/// `dir` with `n` empty files (kept between runs when the count matches).
fn make_flat_dir(dir: &Path, n: u32) -> Result<()> {
    let stamp = dir.with_extension("stamp");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(&format!("{n}\n")) && dir.is_dir() {
        return Ok(());
    }
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    for i in 0..n {
        fs::File::create(dir.join(format!("f{i:06}")))?;
    }
    fs::write(stamp, format!("{n}\n"))?;
    Ok(())
}

fn extract_once(prepared: &Prepared, dir: &Path, stamp: &str, git: bool) -> Result<()> {
    let stamp_file = dir.with_extension("stamp");
    if fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp) && dir.is_dir() {
        return Ok(());
    }
    eprintln!("preparing {} ...", dir.display());
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    proc::run_ok(Command::new("tar").arg("-xf").arg(&prepared.tarball).arg("-C").arg(dir), "tar -x")?;
    if git {
        let git = |args: &[&str]| -> Result<()> {
            let mut cmd = Command::new("git");
            cmd.arg("-C").arg(dir).args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"]).args(args);
            proc::run_ok(&mut cmd, &format!("git {}", args.join(" ")))?;
            Ok(())
        };
        git(&["init", "-q"])?;
        git(&["add", "-A"])?;
        git(&["commit", "-q", "-m", "benchmark tree"])?;
    }
    fs::write(stamp_file, stamp)?;
    Ok(())
}

/// Creates `cache_dir/tree-N.tar`: the repository's sources (no `target/`, no hidden entries)
/// plus N generated small files in directories of 100.
fn make_tarball(params: &WlParams) -> Result<Prepared> {
    fs::create_dir_all(&params.cache_dir)?;
    let tarball = params.cache_dir.join(format!(
        "tree-{}{}.tar",
        params.tree_files,
        if params.repo_root.is_some() { "-src" } else { "" }
    ));
    let count_file = tarball.with_extension("count");
    if let (true, Ok(count)) = (tarball.is_file(), fs::read_to_string(&count_file)) {
        if let Ok(entries) = count.trim().parse() {
            return Ok(Prepared { tarball, entries });
        }
    }
    eprintln!("building {} ...", tarball.display());
    let stage = params.cache_dir.join("stage");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage)?;
    let mut entries = 0;
    if let Some(repo) = &params.repo_root {
        entries += copy_sources(repo, &stage.join("ringfs"))?;
    }
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..params.tree_files {
        let dir = stage.join("gen").join(format!("d{:04}", i / 100));
        if i % 100 == 0 {
            fs::create_dir_all(&dir)?;
            entries += 1;
        }
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let len = 64 + (seed >> 33) as usize % 8128;
        let line = format!("generated file {i} of the ringfs benchmark tree\n");
        let body: String = line.repeat(len / line.len() + 1).chars().take(len).collect();
        fs::write(dir.join(format!("f{i:06}.txt")), body)?;
        entries += 1;
    }
    let tmp = tarball.with_extension("tmp");
    proc::run_ok(Command::new("tar").arg("-cf").arg(&tmp).arg("-C").arg(&stage).arg("."), "tar -c")?;
    fs::rename(&tmp, &tarball)?;
    fs::write(&count_file, format!("{entries}\n"))?;
    let _ = fs::remove_dir_all(&stage);
    Ok(Prepared { tarball, entries })
}

fn copy_sources(from: &Path, to: &Path) -> Result<usize> {
    let mut n = 0;
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        if name_s.starts_with('.') || name_s == "target" {
            continue;
        }
        let ft = entry.file_type()?;
        if ft.is_dir() {
            n += 1 + copy_sources(&entry.path(), &to.join(&name))?;
        } else if ft.is_file() && entry.metadata()?.len() <= 1 << 20 {
            fs::copy(entry.path(), to.join(&name))?;
            n += 1;
        }
    }
    Ok(n)
}

fn make_crate(dir: &Path) -> Result<()> {
    if dir.join("Cargo.lock").is_file() {
        return Ok(());
    }
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("src"))?;
    fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"benchcrate\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\n\n[workspace]\n",
    )?;
    let mut main = String::new();
    for m in 0..16 {
        main.push_str(&format!("mod m{m};\n"));
        let mut body = String::new();
        for f in 0..12 {
            body.push_str(&format!(
                "/// Generated.\npub fn f{f}(v: &[u64]) -> u64 {{\n    v.iter().enumerate().map(|(i, x)| x.wrapping_mul(i as u64 + {f})).fold({m}, |a, b| a ^ b.rotate_left({f}))\n}}\n\n"
            ));
        }
        body.push_str("/// Generated.\npub fn all(v: &[u64]) -> u64 {\n    0");
        for f in 0..12 {
            body.push_str(&format!(" ^ f{f}(v)"));
        }
        body.push_str("\n}\n");
        fs::write(dir.join("src").join(format!("m{m}.rs")), body)?;
    }
    main.push_str("\nfn main() {\n    let v: Vec<u64> = (0..100).collect();\n    let mut x = 0;\n");
    for m in 0..16 {
        main.push_str(&format!("    x ^= m{m}::all(&v);\n"));
    }
    main.push_str("    println!(\"{x}\");\n}\n");
    fs::write(dir.join("src/main.rs"), main)?;
    let mut cmd = Command::new("cargo");
    cmd.args(["generate-lockfile", "--offline", "--manifest-path"]).arg(dir.join("Cargo.toml"));
    proc::run_ok(&mut cmd, "cargo generate-lockfile")?;
    Ok(())
}

/// Phases of the Python metadata storm, in order.
const META_PHASES: [&str; 4] = ["create", "stat", "stat-cold", "unlink"];

/// When the last Python storm (or its set-up) deleted files.
static LAST_DELETE: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

/// Untimed native setup before the target is mounted.
pub(crate) fn setup(name: &str, src: &Path, params: &WlParams) -> Result<()> {
    let wl = wl(src);
    let fresh = |d: &Path| -> Result<()> {
        let _ = fs::remove_dir_all(d);
        fs::create_dir_all(d)?;
        Ok(())
    };
    match name {
        "untar" => fresh(&wl.join("untar"))?,
        "cargo-build" => {
            let _ = fs::remove_dir_all(wl.join("crate-target"));
        }
        "meta-py" => fresh(&wl.join("meta"))?,
        "rm-rf" => {
            let _ = fs::remove_dir_all(wl.join("rmtree"));
            fs::create_dir_all(wl.join("rmtree"))?;
            let tarball = params.cache_dir.join(format!(
                "tree-{}{}.tar",
                params.tree_files,
                if params.repo_root.is_some() { "-src" } else { "" }
            ));
            proc::run_ok(Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(wl.join("rmtree")), "tar -x")?;
        }
        _ => {}
    }
    // Flush what the removal (and earlier runs) dirtied, so the timed run does not pay for it.
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
    if name == "meta-py" {
        let last = *LAST_DELETE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(wait) = last.and_then(|t| params.meta_settle.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}

const META_PY: &str = r#"
import json, os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
names = [os.path.join(d, "f%06d" % i) for i in range(n)]
t0 = time.perf_counter()
for p in names:
    os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
t1 = time.perf_counter()
for p in names:
    os.stat(p)
t2 = time.perf_counter()
# Cold: the kernel's dentry and inode caches dropped (the backing file system's blocks stay
# cached), so every stat looks the name up again: through FUSE, one LOOKUP per file.
with open("/proc/sys/vm/drop_caches", "w") as f:
    f.write("2")
t3 = time.perf_counter()
for p in names:
    os.stat(p)
t4 = time.perf_counter()
for p in names:
    os.unlink(p)
t5 = time.perf_counter()
print(json.dumps({"create": t1 - t0, "stat": t2 - t1, "stat-cold": t4 - t3, "unlink": t5 - t4}))
"#;

/// Where the next timed command's system calls are counted (`strace -c`), if anywhere.
static STRACE_OUT: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Makes the next timed command of [`measure`] run under `strace -f -c -o out`, counting the
/// file and descriptor system calls (`%file,%desc`) of it and all its children.
pub(crate) fn count_syscalls_into(out: Option<PathBuf>) {
    *STRACE_OUT.lock().unwrap_or_else(|e| e.into_inner()) = out;
}

/// `cmd` itself, or `cmd` under strace when [`count_syscalls_into`] asked for it (once).
fn traced(cmd: Command) -> Command {
    let Some(out) = STRACE_OUT.lock().unwrap_or_else(|e| e.into_inner()).take() else { return cmd };
    let mut c = Command::new("strace");
    c.args(["-f", "-c", "-e", "trace=%file,%desc", "-o"]).arg(out).arg("--").arg(cmd.get_program());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c.stdout(Stdio::null());
    c
}

/// Warms (untimed) and then times workload `name` through `root` (the target's view of `src`).
pub(crate) fn measure(
    name: &str,
    src: &Path,
    root: &Path,
    prepared: &Prepared,
    params: &WlParams,
) -> Result<Vec<(String, f64)>> {
    let native = wl(src);
    let wl = wl(root);
    let quiet = |mut c: Command| {
        c.stdout(Stdio::null());
        c
    };
    let secs = |cmd: Command, what: &str| -> Result<Vec<(String, f64)>> {
        let mut cmd = traced(cmd);
        let done = proc::run(&mut cmd, TIMEOUT, false)?.check(what)?;
        Ok(vec![(name.to_owned(), done.elapsed.as_secs_f64())])
    };
    match name {
        "untar" => {
            fs::read(&prepared.tarball)?; // warm the tarball, which lives outside every mount
            let mut c = Command::new("tar");
            c.arg("-xf").arg(&prepared.tarball).arg("-C").arg(wl.join("untar"));
            secs(c, "tar -x")
        }
        "find-stat" => {
            let mut warm = quiet(Command::new("find"));
            warm.arg(native.join("tree")).arg("-ls");
            proc::run(&mut warm, TIMEOUT, false)?.check("find (warm-up)")?;
            let mut c = quiet(Command::new("find"));
            c.arg(wl.join("tree")).arg("-ls");
            secs(c, "find -ls")
        }
        "ls" | "ls-l" | "find-flat" => {
            let (prog, args): (&str, &[&str]) = match name {
                "ls" => ("ls", &[]),
                "ls-l" => ("ls", &["-l"]),
                _ => ("find", &["-ls"]),
            };
            let mut warm = quiet(Command::new(prog));
            warm.arg(native.join("lsdir")).args(args);
            proc::run(&mut warm, TIMEOUT, false)?.check("warm-up")?;
            let mut c = quiet(Command::new(prog));
            c.arg(wl.join("lsdir")).args(args);
            secs(c, name)
        }
        "rm-rf" => {
            let mut c = Command::new("rm");
            c.arg("-rf").arg(wl.join("rmtree"));
            secs(c, "rm -rf")
        }
        "git-status" => {
            let git = |dir: PathBuf| {
                let mut c = quiet(Command::new("git"));
                c.arg("--no-optional-locks").arg("-C").arg(dir).args(["status", "--porcelain"]);
                c
            };
            let mut warm = git(native.join("repo"));
            proc::run(&mut warm, TIMEOUT, false)?.check("git status (warm-up)")?;
            secs(git(wl.join("repo")), "git status")
        }
        "cargo-build" => {
            let mut c = quiet(Command::new("cargo"));
            c.args(["build", "--offline", "--quiet", "--manifest-path"])
                .arg(wl.join("crate/Cargo.toml"))
                .env("CARGO_TARGET_DIR", wl.join("crate-target"))
                .env_remove("RUSTC_WRAPPER")
                .env_remove("CARGO_BUILD_RUSTC_WRAPPER");
            secs(c, "cargo build")
        }
        "meta-py" => {
            let n = params.meta_files.max(1);
            let mut c = Command::new("python3");
            c.arg("-c").arg(META_PY).arg(wl.join("meta")).arg(n.to_string());
            let mut c = traced(c);
            let done = proc::run(&mut c, TIMEOUT, true);
            *LAST_DELETE.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
            let done = done?.check("python metadata storm")?;
            let v: Value = serde_json::from_str(done.stdout.trim()).context("parsing the Python storm's output")?;
            META_PHASES
                .iter()
                .map(|p| {
                    let t = v.get(*p).and_then(Value::as_f64).context("missing phase time")?;
                    Ok((format!("meta-py:{p}"), f64::from(n) / t.max(1e-9)))
                })
                .collect()
        }
        other => bail!("unknown workload {other}"),
    }
}
