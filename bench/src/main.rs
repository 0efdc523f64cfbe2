//! `ringfs-bench`: runs the fio profiles in `fio/` and a set of real workloads against a backing
//! directory natively and through ringfs (one or more named configurations) and peer FUSE
//! servers, alternating targets to cancel drift, and reports medians and ratios to native as a
//! table, JSON, CSV and an SVG chart. See `docs/benchmarks.md`.

mod mount;
mod proc;
mod profiles;
mod report;
mod requests;
mod workloads;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;

use mount::{MountEnv, Target, TargetKind};
use profiles::{FioParams, Measures, Profile};
use report::{Measurement, Report, RowInfo};
use workloads::{Prepared, WlParams};

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "ringfs-bench",
    version,
    about = "Benchmark ringfs against the native backing directory and peer FUSE servers.",
    after_help = "Examples:\n  ringfs-bench --smoke\n  ringfs-bench --all --runtime 10 --repeat 3 \\\n    \
                  --variant uring-pt:transport=uring,passthrough=true \\\n    \
                  --variant devfuse-nopt:transport=dev-fuse,passthrough=false \\\n    \
                  --peer-cmd 'passthrough_ll=/opt/peers/passthrough_ll -f -o source={src} {mnt}'\n\n\
                  Ratios are performance relative to native (1.0 = native speed, 0.5 = half as fast).\n\
                  Exit status: 0 all measured, 2 some measurement failed (outputs still written),\n\
                  1 setup error, 130 interrupted (partial outputs written)."
)]
struct Cli {
    /// ringfs `-o` options applied to every ringfs variant (after `metrics_addr=`, which
    /// disables the metrics endpoint unless overridden).
    #[arg(long, value_name = "OPTS", default_value = "")]
    ringfs_opts: String,
    /// A named ringfs configuration, NAME:OPTS (repeatable). Without any, one variant named
    /// `ringfs` with --ringfs-opts alone.
    #[arg(long = "variant", value_name = "NAME:OPTS")]
    variants: Vec<String>,
    /// Measure no ringfs variant (native and peers only).
    #[arg(long)]
    no_ringfs: bool,
    /// A FUSE mount you started yourself serving the source directory, NAME=MOUNTPOINT.
    #[arg(long = "peer", value_name = "NAME=MOUNTPOINT")]
    peers: Vec<String>,
    /// A foreground FUSE server the harness starts and stops for each measurement,
    /// NAME='COMMAND with {src} {mnt}' (run by /bin/sh; SIGTERM stops it).
    #[arg(long = "peer-cmd", value_name = "NAME=COMMAND")]
    peer_cmds: Vec<String>,
    /// fio profiles to run, comma-separated (`all` for every one; see --list).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    profiles: Vec<String>,
    /// Run every fio profile and every workload.
    #[arg(long)]
    all: bool,
    /// Run real workloads: all of them, or a comma-separated list (see --list).
    #[arg(long, num_args = 0..=1, default_missing_value = "all", value_name = "LIST")]
    workloads: Option<String>,
    /// Repetitions of every measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Seconds per timed fio job (RUNTIME).
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Bytes per fio job file (SIZE, fio syntax).
    #[arg(long, default_value = "256M")]
    size: String,
    /// Jobs of the multi-job profiles (the `-4j` ones and the personalities).
    #[arg(long, default_value_t = 4)]
    many_jobs: u32,
    /// Files of the metadata storms (fio's and the Python one).
    #[arg(long, default_value_t = 10000)]
    meta_files: u32,
    /// Seconds between the last mass deletion and a Python storm's create phase: ext4 skips
    /// inodes freed in the last 30 s when allocating, which slows creates right after deletes
    /// by up to 20x and would make create rates depend on the order of the targets.
    #[arg(long, default_value_t = 35)]
    meta_settle: u64,
    /// Files of the small-file and personality profiles.
    #[arg(long, default_value_t = 2000)]
    small_files: u32,
    /// Generated small files in the workload source tree (plus this repository's sources).
    #[arg(long, default_value_t = 20000)]
    tree_files: u32,
    /// Working directory: source directory, mount points and cached tarball.
    #[arg(long, default_value = "/var/tmp/ringfs-bench")]
    work: PathBuf,
    /// Backing (source) directory; default WORK/src. Must be on the file system under test.
    #[arg(long)]
    src: Option<PathBuf>,
    /// Where results go (results.json, results.csv, chart.svg, table.md, fio/, logs/).
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// The ringfs binary (default: $RINGFS_BIN, else `ringfs` next to this binary).
    #[arg(long)]
    ringfs_bin: Option<PathBuf>,
    /// Directory of the fio job files (default: $RINGFS_BENCH_FIO_DIR, else the repository's fio/).
    #[arg(long)]
    fio_dir: Option<PathBuf>,
    /// Pass --enable-uring to ringfs (switches on FUSE over io_uring machine-wide).
    #[arg(long)]
    enable_uring: bool,
    /// Quick check: 16M files, 1 s runtimes, 1 repetition, two profiles and one workload,
    /// small file counts (explicit --profiles/--workloads still apply).
    #[arg(long)]
    smoke: bool,
    /// List the profiles and workloads and exit.
    #[arg(long)]
    list: bool,
    /// Count FUSE requests instead of timing: for each workload (all unless --workloads) and
    /// each mount (ringfs variants and peers), requests by opcode, system calls (strace -c,
    /// first repetition), requests per system call and server CPU per request.
    #[arg(long)]
    requests: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    proc::install_signal_handlers();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringfs-bench: {e:#}");
            if proc::interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// What to run, resolved from the command line.
struct Plan {
    requests: bool,
    profiles: Vec<&'static Profile>,
    workloads: Vec<String>,
    targets: Vec<Target>,
    repeat: u32,
    fio: FioParams,
    wl: WlParams,
    fio_dir: PathBuf,
    env: MountEnv,
    out: PathBuf,
}

fn split_named(s: &str, sep: char, what: &str) -> Result<(String, String)> {
    let (name, rest) = s.split_once(sep).with_context(|| format!("{what} `{s}` is not NAME{sep}VALUE"))?;
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        bail!("{what} name `{name}` must be letters, digits, '-', '_' or '.'");
    }
    Ok((name.to_owned(), rest.to_owned()))
}

fn plan(mut cli: Cli) -> Result<Plan> {
    if cli.requests {
        if !cli.profiles.is_empty() {
            bail!("--requests runs workloads only (no --profiles)");
        }
        if cli.workloads.is_none() {
            cli.workloads = Some("all".into());
        }
        cli.all = false;
    }
    if cli.smoke {
        cli.runtime = 1;
        cli.repeat = 1;
        cli.size = "16M".into();
        cli.meta_files = cli.meta_files.min(500);
        cli.meta_settle = 0;
        cli.small_files = cli.small_files.min(100);
        cli.tree_files = cli.tree_files.min(500);
        cli.many_jobs = cli.many_jobs.min(2);
        if cli.profiles.is_empty() && !cli.all {
            cli.profiles = vec!["seq-read-1m".into(), "rand-write-4k".into()];
        }
        if cli.workloads.is_none() && !cli.all {
            cli.workloads = Some("meta-py".into());
        }
    }
    let profiles: Vec<&'static Profile> = if cli.all || cli.profiles.iter().any(|p| p == "all") {
        profiles::PROFILES.iter().collect()
    } else {
        cli.profiles
            .iter()
            .map(|n| profiles::find(n.trim()).with_context(|| format!("unknown profile `{n}` (see --list)")))
            .collect::<Result<_>>()?
    };
    let workloads: Vec<String> = match (cli.all, cli.workloads.as_deref()) {
        (true, _) | (_, Some("all")) => workloads::WORKLOADS.iter().map(|s| (*s).to_owned()).collect(),
        (false, Some(list)) => list
            .split(',')
            .map(|w| {
                let w = w.trim();
                if workloads::WORKLOADS.contains(&w) {
                    Ok(w.to_owned())
                } else {
                    bail!("unknown workload `{w}` (see --list)")
                }
            })
            .collect::<Result<_>>()?,
        (false, None) => Vec::new(),
    };
    if profiles.is_empty() && workloads.is_empty() {
        bail!("nothing to run: give --profiles, --workloads, --all or --smoke (see --help)");
    }
    if cli.repeat == 0 {
        bail!("--repeat must be at least 1");
    }

    let mut targets = vec![Target { name: "native".into(), kind: TargetKind::Native }];
    let base_opts = vec!["metrics_addr=".to_owned(), cli.ringfs_opts.clone()];
    if !cli.no_ringfs {
        if cli.variants.is_empty() {
            targets.push(Target { name: "ringfs".into(), kind: TargetKind::Ringfs(base_opts.clone()) });
        }
        for v in &cli.variants {
            let (name, opts) = split_named(v, ':', "--variant")?;
            let mut all = base_opts.clone();
            all.push(opts);
            targets.push(Target { name, kind: TargetKind::Ringfs(all) });
        }
    }
    for p in &cli.peers {
        let (name, mnt) = split_named(p, '=', "--peer")?;
        let mnt = fs::canonicalize(&mnt).with_context(|| format!("--peer mount point {mnt}"))?;
        targets.push(Target { name, kind: TargetKind::PeerMounted(mnt) });
    }
    for p in &cli.peer_cmds {
        let (name, cmd) = split_named(p, '=', "--peer-cmd")?;
        if !cmd.contains("{mnt}") {
            bail!("--peer-cmd {name}: the command must contain {{mnt}}");
        }
        targets.push(Target { name, kind: TargetKind::PeerCmd(cmd) });
    }
    for (i, t) in targets.iter().enumerate() {
        if targets[..i].iter().any(|u| u.name == t.name) {
            bail!("target name `{}` used twice", t.name);
        }
    }

    let uring_on = fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .map(|s| matches!(s.trim(), "Y" | "1"))
        .unwrap_or(false);
    for t in &targets {
        if let TargetKind::Ringfs(opts) = &t.kind {
            if opts.iter().any(|o| o.split(',').any(|kv| kv.trim() == "transport=uring"))
                && !uring_on
                && !cli.enable_uring
            {
                bail!(
                    "variant {} asks for transport=uring but /sys/module/fuse/parameters/enable_uring is off: \
                     pass --enable-uring or write 1 to it",
                    t.name
                );
            }
        }
    }

    let needs_ringfs = targets.iter().any(|t| matches!(t.kind, TargetKind::Ringfs(_)));
    let ringfs_bin = match cli.ringfs_bin.clone().or_else(|| std::env::var_os("RINGFS_BIN").map(PathBuf::from)) {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("ringfs"),
    };
    if needs_ringfs && !ringfs_bin.is_file() {
        bail!(
            "ringfs binary not found at {} (build it with `cargo build --release -p server`, or pass --ringfs-bin / RINGFS_BIN)",
            ringfs_bin.display()
        );
    }
    fs::create_dir_all(&cli.work)?;
    let work = fs::canonicalize(&cli.work)?;
    // Measure one binary for the whole run, even if someone rebuilds target/ meanwhile.
    let ringfs_bin = if needs_ringfs {
        let snapshot = work.join("bin").join("ringfs");
        fs::create_dir_all(work.join("bin"))?;
        let tmp = snapshot.with_extension("tmp");
        fs::copy(&ringfs_bin, &tmp).with_context(|| format!("copying {}", ringfs_bin.display()))?;
        fs::rename(&tmp, &snapshot)?;
        eprintln!("measuring a copy of {} ({})", ringfs_bin.display(), snapshot.display());
        snapshot
    } else {
        ringfs_bin
    };
    let fio_dir = cli
        .fio_dir
        .clone()
        .or_else(|| std::env::var_os("RINGFS_BENCH_FIO_DIR").map(PathBuf::from))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../fio"));
    if !profiles.is_empty() && !fio_dir.join("common.fio").is_file() {
        bail!("no fio job files in {} (pass --fio-dir)", fio_dir.display());
    }

    let src = cli.src.clone().unwrap_or_else(|| work.join("src"));
    fs::create_dir_all(&src)?;
    let src = fs::canonicalize(&src)?;
    let out = cli.out.clone();
    fs::create_dir_all(&out)?;
    let repo_root = fio_dir.parent().map(Path::to_path_buf).filter(|r| r.join("Cargo.toml").is_file());
    Ok(Plan {
        requests: cli.requests,
        profiles,
        workloads,
        targets,
        repeat: cli.repeat,
        fio: FioParams {
            size: cli.size.clone(),
            runtime: cli.runtime,
            many_jobs: cli.many_jobs,
            meta_files: cli.meta_files,
            small_files: cli.small_files,
        },
        wl: WlParams {
            tree_files: cli.tree_files,
            meta_files: cli.meta_files,
            meta_settle: std::time::Duration::from_secs(cli.meta_settle),
            repo_root: if cli.smoke { None } else { repo_root },
            cache_dir: work.join("cache"),
        },
        fio_dir,
        env: MountEnv {
            src,
            mnt_base: work.join("mnt"),
            log_dir: out.join("logs"),
            ringfs_bin,
            enable_uring: cli.enable_uring,
        },
        out,
    })
}

fn list() {
    println!("fio profiles (page-cache: warmed right before measuring; device: caches dropped first):");
    for p in profiles::PROFILES {
        println!("  {:<22} {:<24} {:<10} {}", p.name, p.file, p.measures.label(), p.unit());
    }
    println!("workloads (timed natively and through each mount; FUSE caches cold, backing warm):");
    for w in workloads::WORKLOADS {
        let units: Vec<String> = workloads::rows(w).iter().map(|r| format!("{} [{}]", r.name, r.unit)).collect();
        println!("  {:<22} {}", w, units.join(", "));
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if cli.list {
        list();
        return Ok(ExitCode::SUCCESS);
    }
    let args: Vec<String> = std::env::args().collect();
    let plan = plan(cli)?;
    if plan.requests {
        return run_requests(&plan, &args);
    }
    let started = Instant::now();

    let token = format!(
        "{}-{}\n",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    );
    fs::write(plan.env.src.join(mount::MARKER), token)?;
    let can_drop = !plan.profiles.iter().any(|p| p.measures == Measures::Device) || profiles::drop_caches().is_ok();
    if !can_drop {
        eprintln!("warning: cannot drop caches (need root): device profiles run with whatever is cached");
    }
    fs::create_dir_all(plan.out.join("fio"))?;

    let mut rows = Vec::new();
    for p in &plan.profiles {
        for r in p.rows() {
            rows.push(RowInfo { name: r, unit: p.unit(), kind: p.measures.label(), higher_is_better: true });
        }
    }
    for w in &plan.workloads {
        for r in workloads::rows(w) {
            rows.push(RowInfo { name: r.name, unit: r.unit, kind: "workload", higher_is_better: r.higher_is_better });
        }
    }
    let config = json!({
        "command": args,
        "machine": machine_info(&plan.env.src),
        "runtime_s": plan.fio.runtime,
        "size": plan.fio.size,
        "repeat": plan.repeat,
        "many_jobs": plan.fio.many_jobs,
        "meta_files": plan.fio.meta_files,
        "small_files": plan.fio.small_files,
        "tree_files": plan.wl.tree_files,
        "source_dir": plan.env.src,
        "drop_caches": can_drop,
        "order": "for each profile/workload, for each repetition: every target in order (native first)",
        "mounting": "each measurement mounts its target fresh and unmounts it after",
        "started_unix": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    });
    let mut report = Report {
        rows,
        targets: plan.targets.iter().map(|t| (t.name.clone(), t.kind.describe())).collect(),
        measurements: Vec::new(),
        config,
    };

    let outcome = measure_all(&plan, &mut report, can_drop);
    report.config["elapsed_s"] = json!(started.elapsed().as_secs_f64());
    report.write_all(&plan.out)?;
    println!("{}", report.table());
    let errors = report.error_lines();
    for e in &errors {
        println!("error: {e}");
    }
    println!("ratios: performance relative to native (1.0 = native speed); * = some repetitions failed");
    println!("results in {} ({:.0} s)", plan.out.display(), started.elapsed().as_secs_f64());
    outcome?;
    Ok(if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

struct Progress {
    done: usize,
    total: usize,
    started: Instant,
}

impl Progress {
    fn step(&mut self, what: &str, rep: u32, repeat: u32, target: &str, result: &str) {
        self.done += 1;
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = elapsed / self.done as f64 * (self.total - self.done) as f64;
        eprintln!(
            "[{}/{}] {what} rep {rep}/{repeat} {target}: {result}  ({:.0} s elapsed, ~{:.0} s left)",
            self.done, self.total, elapsed, eta
        );
    }
}

fn measure_all(plan: &Plan, report: &mut Report, can_drop: bool) -> Result<()> {
    let units = plan.profiles.len() + plan.workloads.len();
    let mut progress =
        Progress { done: 0, total: units * plan.repeat as usize * plan.targets.len(), started: Instant::now() };
    for p in &plan.profiles {
        proc::check_interrupted()?;
        let native_dir = plan.env.src.join("fio").join(p.name);
        eprintln!("laying out {} in {} ...", p.name, native_dir.display());
        if let Err(e) = p.layout(&plan.fio_dir, &native_dir, &plan.fio) {
            proc::check_interrupted()?;
            eprintln!("error: layout of {} failed: {e:#}", p.name);
        }
        for rep in 1..=plan.repeat {
            for t in &plan.targets {
                let json_out = plan.out.join("fio").join(format!("{}.{}.{rep}.json", p.name, t.name));
                let result = measure_profile(plan, p, t, &json_out, can_drop);
                proc::check_interrupted()?;
                let shown = record(report, &p.rows(), &t.name, rep, result, p.unit());
                progress.step(p.name, rep, plan.repeat, &t.name, &shown);
            }
        }
    }
    if !plan.workloads.is_empty() {
        eprintln!("preparing workloads ...");
        let prepared = workloads::prepare(&plan.workloads, &plan.env.src, &plan.wl)?;
        if prepared.entries > 0 {
            eprintln!("workload tree: {} entries in {}", prepared.entries, prepared.tarball.display());
        }
        for w in &plan.workloads {
            let row_names: Vec<String> = workloads::rows(w).into_iter().map(|r| r.name).collect();
            let unit = workloads::rows(w)[0].unit;
            for rep in 1..=plan.repeat {
                for t in &plan.targets {
                    let result = measure_workload(plan, w, t, &prepared);
                    proc::check_interrupted()?;
                    let shown = record(report, &row_names, &t.name, rep, result, unit);
                    progress.step(w, rep, plan.repeat, &t.name, &shown);
                }
            }
        }
    }
    Ok(())
}

fn measure_profile(
    plan: &Plan,
    p: &Profile,
    t: &Target,
    json_out: &Path,
    can_drop: bool,
) -> Result<Vec<(String, f64)>> {
    let active = t.activate(&plan.env)?;
    let dir = active.root.join("fio").join(p.name);
    match p.measures {
        Measures::PageCache => {
            if dir.is_dir() {
                profiles::warm(&dir)?;
            }
        }
        Measures::Device => {
            if can_drop {
                profiles::drop_caches()?;
            }
        }
    }
    p.run(&plan.fio_dir, &dir, &plan.fio, json_out)
}

fn measure_workload(plan: &Plan, w: &str, t: &Target, prepared: &Prepared) -> Result<Vec<(String, f64)>> {
    workloads::setup(w, &plan.env.src, &plan.wl)?;
    let active = t.activate(&plan.env)?;
    workloads::measure(w, &plan.env.src, &active.root, prepared, &plan.wl)
}

/// Stores a result (or the error, for every row) and returns a short description of it.
fn record(
    report: &mut Report,
    rows: &[String],
    target: &str,
    rep: u32,
    result: Result<Vec<(String, f64)>>,
    unit: &str,
) -> String {
    match result {
        Ok(values) => {
            let mut shown = Vec::new();
            for (row, v) in values {
                shown.push(format!("{v:.1} {unit}"));
                report.measurements.push(Measurement { row, target: target.to_owned(), rep, value: Ok(v) });
            }
            shown.join(", ")
        }
        Err(e) => {
            let msg = format!("{e:#}");
            for row in rows {
                report.measurements.push(Measurement {
                    row: row.clone(),
                    target: target.to_owned(),
                    rep,
                    value: Err(msg.clone()),
                });
            }
            format!("ERROR {msg}")
        }
    }
}

fn machine_info(src: &Path) -> serde_json::Value {
    let read = |p: &str| fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_default();
    let fio_version = Command::new("fio")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": mem_kib as f64 / 1024.0 / 1024.0,
        "source_fs": mount::fs_type_of(src),
        "fio": fio_version,
        "fuse_enable_uring": read("/sys/module/fuse/parameters/enable_uring"),
    })
}

/// `--requests`: FUSE requests per workload and per system call, for every mount target.
fn run_requests(plan: &Plan, args: &[String]) -> Result<ExitCode> {
    requests::probe()?;
    let started = Instant::now();
    let token = format!("{}-requests\n", std::process::id());
    fs::write(plan.env.src.join(mount::MARKER), token)?;
    let targets: Vec<&Target> = plan.targets.iter().filter(|t| !matches!(t.kind, TargetKind::Native)).collect();
    if targets.is_empty() {
        bail!("--requests needs a mount: a ringfs variant or a peer");
    }
    eprintln!("preparing workloads ...");
    let prepared = workloads::prepare(&plan.workloads, &plan.env.src, &plan.wl)?;
    fs::create_dir_all(plan.out.join("strace"))?;
    let mut results: Vec<(String, String, Vec<requests::Sample>)> = Vec::new();
    let mut errors = Vec::new();
    let mut progress = Progress {
        done: 0,
        total: plan.workloads.len() * plan.repeat as usize * targets.len(),
        started: Instant::now(),
    };
    for w in &plan.workloads {
        for rep in 1..=plan.repeat {
            for t in &targets {
                let traced = rep == 1;
                let r = measure_requests(plan, w, t, &prepared, traced);
                proc::check_interrupted()?;
                let shown = match r {
                    Ok(sample) => {
                        let shown = format!(
                            "{} requests{}{}",
                            sample.total(),
                            sample.syscalls.as_ref().map(|(n, _)| format!(", {n} syscalls")).unwrap_or_default(),
                            sample
                                .cpu_ns
                                .filter(|_| sample.total() > 0)
                                .map(|c| format!(", {:.1} us CPU/request", c as f64 / 1000.0 / sample.total() as f64))
                                .unwrap_or_default()
                        );
                        match results.iter_mut().find(|(rw, rt, _)| rw == w && rt == &t.name) {
                            Some((_, _, v)) => v.push(sample),
                            None => results.push((w.clone(), t.name.clone(), vec![sample])),
                        }
                        shown
                    }
                    Err(e) => {
                        errors.push(format!("{w} rep {rep} {}: {e:#}", t.name));
                        format!("error: {e:#}")
                    }
                };
                progress.step(w, rep, plan.repeat, &t.name, &shown);
            }
        }
    }
    let mut md = String::new();
    let mut json_rows = Vec::new();
    for w in &plan.workloads {
        md.push_str(&format!("\n#### {w}\n\n| target | syscalls | requests | requests/syscall | server CPU us/request | s | requests by opcode |\n|---|---:|---:|---:|---:|---:|---|\n"));
        for (_, t, samples) in results.iter().filter(|(rw, _, _)| rw == w) {
            let s = requests::summarise(samples);
            let ops: Vec<String> = s.by_op.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
            let per = s.syscalls.filter(|n| *n > 0).map(|n| s.total / n as f64);
            md.push_str(&format!(
                "| {t} | {} | {:.0}{} | {} | {} | {} | {} |\n",
                s.syscalls.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                s.total,
                if s.lost > 0 { format!(" (lost {})", s.lost) } else { String::new() },
                per.map(|p| format!("{p:.3}")).unwrap_or_else(|| "-".into()),
                s.cpu_us_per_req.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
                s.seconds.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
                ops.join(", ")
            ));
            json_rows.push(json!({
                "workload": w, "target": t, "requests": s.total, "by_opcode": s.by_op,
                "syscalls": s.syscalls, "requests_per_syscall": per, "cpu_us_per_request": s.cpu_us_per_req,
                "seconds": s.seconds, "lost_events": s.lost, "repetitions": samples.len(),
                "syscalls_by_name": samples.iter().find_map(|x| x.syscalls.as_ref().map(|(_, b)| b.clone())),
            }));
        }
    }
    let doc = json!({
        "command": args,
        "machine": machine_info(&plan.env.src),
        "targets": targets.iter().map(|t| json!({"name": t.name, "kind": t.kind.describe()})).collect::<Vec<_>>(),
        "repeat": plan.repeat,
        "method": "requests: fuse:fuse_request_send filtered on the mount's connection (FORGETs not included); \
                   syscalls: strace -f -c -e trace=%file,%desc on repetition 1; CPU: server threads' schedstat \
                   over the timed command, repetitions 2.. (1 if only one)",
        "results": json_rows,
        "errors": errors,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    fs::write(plan.out.join("requests.json"), serde_json::to_string_pretty(&doc)?)?;
    fs::write(plan.out.join("requests.md"), &md)?;
    println!("{md}");
    for e in &errors {
        println!("error: {e}");
    }
    println!("results in {} ({:.0} s)", plan.out.display(), started.elapsed().as_secs_f64());
    Ok(if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn measure_requests(plan: &Plan, w: &str, t: &Target, prepared: &Prepared, traced: bool) -> Result<requests::Sample> {
    workloads::setup(w, &plan.env.src, &plan.wl)?;
    let active = t.activate(&plan.env)?;
    let conn = requests::connection_of(&active.root)?;
    let pid = active.server_pid();
    let strace_out = traced.then(|| plan.out.join("strace").join(format!("{w}.{}.txt", t.name)));
    workloads::count_syscalls_into(strace_out.clone());
    let counter = requests::Counter::start(conn)?;
    let cpu0 = pid.map(requests::cpu_ns);
    let values = workloads::measure(w, &plan.env.src, &active.root, prepared, &plan.wl);
    let cpu1 = pid.map(requests::cpu_ns);
    workloads::count_syscalls_into(None);
    let (counts, lost) = counter.finish()?;
    let values = values?;
    let seconds = if w == "meta-py" {
        values.iter().map(|(_, rate)| f64::from(plan.wl.meta_files.max(1)) / rate.max(1e-9)).sum()
    } else {
        values.first().map_or(0.0, |(_, v)| *v)
    };
    let syscalls = match strace_out {
        Some(p) => Some(requests::parse_strace_summary(
            &fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
        )),
        None => None,
    };
    Ok(requests::Sample {
        requests: counts,
        lost,
        cpu_ns: cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a)),
        syscalls,
        seconds,
    })
}
