//! The Grafana dashboard and the Prometheus alert rules in `dashboards/`, checked the way an
//! operator uses them:
//!
//! - the dashboard JSON validates against `dashboards/schema/grafana-dashboard.schema.json`
//!   (Grafana's dashboard model plus this project's conventions), panel ids and layout are sane,
//!   every metric it names is one ringfs exports, and `docs/observability.md` explains every panel;
//! - the alert rules pass `promtool check rules` and their unit tests (`promtool test rules`),
//!   and the example Prometheus configuration passes `promtool check config`;
//! - a real Prometheus (the Debian `prometheus` binary, on loopback, TSDB in a temporary
//!   directory, 1 s scrapes, the alert rules loaded) scrapes a live ringfs mount under a fio load
//!   plus a metadata loop; every panel query of the dashboard, with its variables substituted as
//!   Grafana would, goes through `/api/v1/query` and must succeed with data, and every variable
//!   query must list the live mount.
//!
//! The rule for "must return data": every query must, except
//! - queries on the kernel-side families (`ringfs_kernel_*`, `ringfs_passthrough_read_bytes_total`,
//!   `ringfs_passthrough_write_bytes_total`, `ringfs_ebpf_enabled`) when `ringfs_ebpf_enabled` is
//!   not 1 (0, or not exported at all): those come from the eBPF accounting, which needs BPF
//!   support the machine may not have; with `ringfs_ebpf_enabled` 1 they must return data too;
//! - queries on the io_uring queue families (`ringfs_queue_*`) when the mount runs the `dev_fuse`
//!   transport: those families exist only with io_uring queues.
//!
//! - the attribution scenario (`attribution/mod.rs`) runs on a live mount scraped by a real
//!   Prometheus with the recording rules loaded: each class's recorded hit rate must equal the
//!   one the scenario's checked counters give.
//!
//! Everything started (ringfs, prometheus, fio, the metadata loop) is stopped by a guard on every
//! path, and every wait is bounded.

mod attribution;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::{require, Server};

/// Scrape (and rule evaluation) interval of the test's Prometheus.
const SCRAPE_INTERVAL_S: u64 = 1;
/// What Grafana would put for `$__interval` on a short range with a 1 s scrape interval.
const INTERVAL: &str = "2s";
/// What Grafana puts for `$__rate_interval`: max($__interval + scrape interval, 4 x scrape
/// interval) = max(3 s, 4 s).
const RATE_INTERVAL: &str = "4s";
/// How long the fio load and the metadata loop run.
const LOAD_SECS: u64 = 14;
/// The job name of the test's scrape config; the alert rules select it too.
const JOB: &str = "ringfs";

/// Every metric family ringfs exports (histograms by base name), and `up`.
const KNOWN_FAMILIES: &[&str] = &[
    "up",
    "ringfs_build_info",
    "ringfs_transport_info",
    "ringfs_passthrough_enabled",
    "ringfs_uptime_seconds",
    "ringfs_requests_total",
    "ringfs_request_errors_total",
    "ringfs_errors_total",
    "ringfs_request_duration_seconds",
    "ringfs_requests_in_flight",
    "ringfs_oldest_request_age_seconds",
    "ringfs_malformed_requests_total",
    "ringfs_faults_total",
    "ringfs_server_read_bytes_total",
    "ringfs_server_write_bytes_total",
    "ringfs_devfuse_requests_total",
    "ringfs_queue_requests_total",
    "ringfs_queue_submits_total",
    "ringfs_queue_busy_poll_hits_total",
    "ringfs_inodes",
    "ringfs_inodes_retired",
    "ringfs_open_handles",
    "ringfs_passthrough_opens_total",
    "ringfs_passthrough_fallbacks_total",
    "ringfs_backing_files",
    "ringfs_invalidations_total",
    "ringfs_invalidation_failures_total",
    "ringfs_inline_metadata_calls_total",
    "ringfs_inline_metadata_slow_total",
    "ringfs_ebpf_enabled",
    "ringfs_kernel_fallbacks_total",
    "ringfs_kernel_fallback_errors_total",
    "ringfs_kernel_request_duration_seconds",
    "ringfs_kernel_fallback_requests_total",
    "ringfs_kernel_demand_calls_total",
    "ringfs_kernel_calls_with_fallback_total",
    "ringfs_kernel_io_bytes_total",
    "ringfs_kernel_read_bytes_total",
    "ringfs_kernel_write_bytes_total",
    "ringfs_passthrough_read_bytes_total",
    "ringfs_passthrough_write_bytes_total",
    "ringfs_upgrades_total",
    "ringfs_upgrade_last_pause_seconds",
    "ringfs_failover_mode",
    "ringfs_failovers_total",
    "ringfs_failover_resent_requests_total",
    "ringfs_failover_resent_done_total",
    "ringfs_failover_last_pause_seconds",
    "ringfs_failover_lost_handles_total",
    "ringfs_failover_journal_bytes",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
];

/// The rule files Prometheus loads: recording rules first (the alerts use them).
const RULE_FILES: &[&str] = &["ringfs-rules.yml", "ringfs-alerts.yml"];

/// The histogram families (exported as `_bucket`, `_sum`, `_count`).
const HISTOGRAMS: &[&str] = &["ringfs_request_duration_seconds", "ringfs_kernel_request_duration_seconds"];

/// Families fed by the eBPF accounting: may be absent unless `ringfs_ebpf_enabled` is 1.
fn is_kernel_family(family: &str) -> bool {
    family.starts_with("ringfs_kernel_")
        || family == "ringfs_ebpf_enabled"
        || family == "ringfs_passthrough_read_bytes_total"
        || family == "ringfs_passthrough_write_bytes_total"
}

/// Families that exist only with io_uring queues.
fn is_queue_family(family: &str) -> bool {
    family.starts_with("ringfs_queue_")
}

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("dashboards")
}

fn dashboard_path() -> PathBuf {
    dashboards_dir().join("grafana").join("ringfs.json")
}

fn rules_dir() -> PathBuf {
    dashboards_dir().join("prometheus")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn load_dashboard() -> Value {
    serde_json::from_str(&read(&dashboard_path())).expect("dashboard JSON parses")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// `name` on the PATH.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The binaries `names` from the PATH, or None after printing SKIP (a panic under CI=true).
fn require_tools(test: &str, names: &[&str]) -> Option<Vec<PathBuf>> {
    let found: Vec<Option<PathBuf>> = names.iter().map(|n| which(n)).collect();
    let missing: Vec<String> = names
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(n, _)| format!("{n} not on PATH (apt-get install prometheus fio)"))
        .collect();
    if missing.is_empty() {
        return Some(found.into_iter().flatten().collect());
    }
    let why = missing.join("; ");
    if in_ci() {
        panic!("{test}: required tool missing under CI: {why}");
    }
    eprintln!("SKIP {test}: {why}");
    None
}

/// Every panel, rows' nested panels included.
fn all_panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// (panel title, refId, expr) of every query of the dashboard.
fn all_targets(d: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in all_panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or("?").to_string(),
                t["refId"].as_str().unwrap_or("?").to_string(),
                t["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

/// Metric families a PromQL expression (or any text) names: identifiers `ringfs_*`,
/// `process_*` or `up`, histogram suffixes folded to the family.
fn families(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("ringfs_") || w.starts_with("process_") || *w == "up")
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s).filter(|b| HISTOGRAMS.contains(b)))
                .unwrap_or(w)
                .to_string()
        })
        .collect()
}

/// Grafana's escaping of a multi-value or include-all variable's value inside a regex matcher.
fn special_regex_escape(v: &str) -> String {
    let mut out = String::new();
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\\\\\"),
            '$' | '^' | '*' | '{' | '}' | '[' | ']' | '\'' | '+' | '?' | '.' | '(' | ')' | '|' => {
                out.push_str("\\\\");
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

/// Grafana's escaping of a single-value variable's value.
fn regular_escape(v: &str) -> String {
    v.replace('\\', "\\\\\\\\").replace('\'', "\\\\'")
}

/// Replaces `$name` and `${name}` with `vars[name]`; an unknown variable is an error.
fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').ok_or_else(|| format!("unclosed ${{ in {expr}"))?;
            (&braced[..end], end + 2)
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], end)
        };
        let value = vars.get(name).ok_or_else(|| format!("unknown variable ${name} in {expr}"))?;
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

// ------------------------------------------------------------------ static checks

#[test]
fn dashboard_json_matches_the_schema_and_conventions() {
    let dashboard = load_dashboard();
    let schema_path = dashboards_dir().join("schema").join("grafana-dashboard.schema.json");
    let schema: Value = serde_json::from_str(&read(&schema_path)).expect("schema JSON parses");
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.add_resource("mem:///grafana-dashboard.schema.json", schema).expect("add schema");
    let index = compiler.compile("mem:///grafana-dashboard.schema.json", &mut schemas).expect("schema compiles");
    if let Err(e) = schemas.validate(&dashboard, index) {
        panic!("{} does not match {}:\n{e:#}", dashboard_path().display(), schema_path.display());
    }

    let mut problems = Vec::new();
    // Panel ids unique; no panel sticks out of the 24-column grid or overlaps another.
    let panels = all_panels(&dashboard);
    let mut ids = BTreeSet::new();
    let mut boxes = Vec::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        if !ids.insert(p["id"].as_u64().unwrap_or(0)) {
            problems.push(format!("duplicate panel id {} ({title})", p["id"]));
        }
        let g = &p["gridPos"];
        let (x, y, w, h) = (g["x"].as_u64(), g["y"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else {
            problems.push(format!("{title}: bad gridPos {g}"));
            continue;
        };
        if x + w > 24 {
            problems.push(format!("{title}: x {x} + w {w} exceeds the 24-column grid"));
        }
        for (other, ox, oy, ow, oh) in &boxes {
            if x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h {
                problems.push(format!("{title} overlaps {other}"));
            }
        }
        boxes.push((title.to_string(), x, y, w, h));
        let refs: Vec<&str> =
            p["targets"].as_array().into_iter().flatten().filter_map(|t| t["refId"].as_str()).collect();
        if refs.iter().collect::<BTreeSet<_>>().len() != refs.len() {
            problems.push(format!("{title}: duplicate refId"));
        }
    }
    // Every variable a query uses is defined (or a Grafana global); every family is exported.
    let mut vars: BTreeMap<String, String> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .map(|n| (n.to_string(), "x".to_string()))
        .collect();
    for g in ["__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"] {
        vars.insert(g.to_string(), "1s".to_string());
    }
    for (title, refid, expr) in all_targets(&dashboard) {
        if let Err(e) = substitute(&expr, &vars) {
            problems.push(format!("{title}/{refid}: {e}"));
        }
        for f in families(&expr) {
            if !KNOWN_FAMILIES.contains(&f.as_str()) {
                problems.push(format!("{title}/{refid}: unknown metric family {f}"));
            }
        }
    }
    for file in RULE_FILES {
        for f in families(&read(&rules_dir().join(file))) {
            if !KNOWN_FAMILIES.contains(&f.as_str()) {
                problems.push(format!("{file}: unknown metric family {f}"));
            }
        }
    }
    // The operator documentation explains every panel (by its title) and every alert.
    let doc = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/observability.md"));
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        if !doc.contains(title) {
            problems.push(format!("docs/observability.md does not mention panel {title:?}"));
        }
    }
    for line in read(&rules_dir().join("ringfs-alerts.yml")).lines() {
        if let Some(alert) = line.trim().strip_prefix("- alert: ") {
            if !doc.contains(alert) {
                problems.push(format!("docs/observability.md does not mention alert {alert}"));
            }
        }
    }
    // Provisioning: a file provider for the dashboard and a Prometheus data source.
    let provider = read(&dashboards_dir().join("grafana/provisioning/dashboards/ringfs.yaml"));
    let datasource = read(&dashboards_dir().join("grafana/provisioning/datasources/prometheus.yaml"));
    for (file, text, needles) in [
        (
            "provisioning/dashboards/ringfs.yaml",
            &provider,
            &["apiVersion: 1", "providers:", "type: file", "path: "][..],
        ),
        (
            "provisioning/datasources/prometheus.yaml",
            &datasource,
            &["apiVersion: 1", "datasources:", "type: prometheus"][..],
        ),
    ] {
        for n in needles {
            if !text.contains(n) {
                problems.push(format!("{file}: no {n:?}"));
            }
        }
    }
    assert!(problems.is_empty(), "dashboard problems:\n{}", problems.join("\n"));
}

/// Runs `cmd` with a deadline; returns (success, stdout + stderr).
fn run_bounded(mut cmd: Command, limit: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"));
    let mut child = Guard::new("command", cmd.spawn().expect("spawn command"), false);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(child);
    let text = format!("{}{}", std::fs::read_to_string(out_path).unwrap_or_default(), read(&err_path));
    match status {
        Some(s) => (s.success(), text),
        None => (false, format!("timed out after {limit:?}\n{text}")),
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let test = "alert_rules_pass_promtool_check_and_unit_tests";
    let Some(tools) = require_tools(test, &["promtool"]) else {
        return;
    };
    let promtool = &tools[0];
    let dir = rules_dir();
    for args in [
        &["check", "rules", "ringfs-rules.yml", "ringfs-alerts.yml"][..],
        &["test", "rules", "ringfs-alerts.test.yml"][..],
        &["check", "config", "prometheus.yml"][..],
    ] {
        let mut cmd = Command::new(promtool);
        cmd.args(args).current_dir(&dir);
        let (ok, out) = run_bounded(cmd, Duration::from_secs(60));
        assert!(ok, "promtool {} failed:\n{out}", args.join(" "));
        eprintln!("promtool {}: ok", args.join(" "));
    }
}

// ------------------------------------------------------------------ live check

/// A child process killed (after SIGTERM when `term` is set, 5 s grace) and reaped on drop.
struct Guard {
    name: &'static str,
    child: Child,
    term: bool,
}

impl Guard {
    fn new(name: &'static str, child: Child, term: bool) -> Guard {
        Guard { name, child, term }
    }

    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        if self.term {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if self.try_wait().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("{} did not stop on SIGTERM within 5 s: killing it", self.name);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET on loopback (no chunked encoding to undo); (status, body).
fn http_get(addr: &str, target: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of headers")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
    Ok((status, body.to_string()))
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

/// A Prometheus server on loopback with its TSDB in a temporary directory.
struct Prometheus {
    addr: String,
    _guard: Guard,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `bin` scraping `target` (labelled with `mount`) every second, with the alert rules.
    fn start(bin: &Path, target: &str, mount: &Path) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules: String = RULE_FILES
            .iter()
            .map(|f| {
                let path = rules_dir().join(f).canonicalize().expect("rules path");
                format!("\n  - {}", serde_json::to_string(&path.display().to_string()).expect("json"))
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  scrape_timeout: {SCRAPE_INTERVAL_S}s\n  \
             evaluation_interval: {SCRAPE_INTERVAL_S}s\nrule_files:{rules}\nscrape_configs:\n  \
             - job_name: {JOB}\n    static_configs:\n      - targets: [{target}]\n        labels:\n          \
             mount: {mount}\n",
            target = serde_json::to_string(target).expect("json"),
            mount = serde_json::to_string(&mount.display().to_string()).expect("json"),
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write prometheus.yml");
        // The port is found free, then handed over: retry if someone took it meanwhile.
        for attempt in 1..=3 {
            let addr = format!("127.0.0.1:{}", free_port());
            let log = dir.path().join(format!("prometheus-{attempt}.log"));
            let child = Command::new(bin)
                .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--storage.tsdb.retention.time=1h")
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("spawn prometheus");
            let mut guard = Guard::new("prometheus", child, true);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && guard.try_wait().is_none() {
                if matches!(http_get(&addr, "/-/ready"), Ok((200, _))) {
                    return Prometheus { addr, _guard: guard, dir };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let text = read(&log);
            let exited = guard.try_wait().is_some();
            drop(guard);
            if exited && text.contains("address already in use") && attempt < 3 {
                continue;
            }
            panic!("prometheus did not become ready on {addr} (exited: {exited}):\n{text}");
        }
        unreachable!("the last attempt panics");
    }

    /// GET an API path; the `data` of a successful answer.
    fn api(&self, target: &str) -> Result<Value, String> {
        let (status, body) = http_get(&self.addr, target)?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if status != 200 || v["status"] != "success" {
            return Err(format!("HTTP {status}: {} {}", v["errorType"], v["error"]));
        }
        Ok(v["data"].clone())
    }

    /// An instant query at `time`; the result vector.
    fn query(&self, expr: &str, time: f64) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}&time={time:.3}", urlencode(expr)))?;
        match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => Ok(data["result"].as_array().cloned().unwrap_or_default()),
            Some("scalar") => Ok(vec![data["result"].clone()]),
            other => Err(format!("unexpected result type {other:?}")),
        }
    }

    /// The first sample's value of `expr` at `time`, if any.
    fn value(&self, expr: &str, time: f64) -> Option<f64> {
        let r = self.query(expr, time).ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }
}

/// A loop of metadata operations on the mount (and, for invalidations, on the backing
/// directory) until `LOAD_SECS` pass or the guard is dropped. Makes lookups, creates,
/// setattr, renames, readdirs, symlinks, xattr misses (ENODATA) and rmdir of a non-empty
/// directory (ENOTEMPTY) reach the server.
struct MetaLoop {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl MetaLoop {
    fn start(mountpoint: &Path, source: &Path) -> MetaLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let (mnt, src, flag) = (mountpoint.join("meta"), source.to_path_buf(), stop.clone());
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(LOAD_SECS);
            std::fs::create_dir_all(mnt.join("full")).expect("mkdir meta/full");
            std::fs::write(mnt.join("full/keep"), b"x").expect("create meta/full/keep");
            let attr = std::ffi::CString::new("user.ringfs.absent").expect("cstr");
            let mut rounds = 0u64;
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                for i in 0..20 {
                    let f = mnt.join(format!("f{i}"));
                    let _ = std::fs::write(&f, b"hello");
                    let _ = std::fs::metadata(&f);
                    let _ = std::fs::metadata(mnt.join(format!("absent-{rounds}-{i}")));
                    let _ = std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o640));
                    let c = std::ffi::CString::new(f.as_os_str().as_encoded_bytes()).expect("cstr");
                    let mut buf = [0u8; 64];
                    // SAFETY: valid C strings and buffer; the ENODATA result is the point.
                    unsafe { libc::getxattr(c.as_ptr(), attr.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
                    let _ = std::fs::rename(&f, mnt.join(format!("g{i}")));
                    let _ = symlink(format!("g{i}"), mnt.join(format!("l{i}")));
                    let _ = std::fs::read_link(mnt.join(format!("l{i}")));
                }
                let _ = std::fs::read_dir(&mnt).map(|d| d.count());
                let _ = std::fs::remove_dir(mnt.join("full"));
                for i in 0..20 {
                    let _ = std::fs::remove_file(mnt.join(format!("g{i}")));
                    let _ = std::fs::remove_file(mnt.join(format!("l{i}")));
                }
                // A change behind the mount's back: ringfs invalidates the kernel's cache.
                let _ = std::fs::write(src.join("meta/full/keep"), rounds.to_string());
                rounds += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            rounds
        });
        MetaLoop { stop, handle: Some(handle) }
    }
}

impl Drop for MetaLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            // Bounded: a thread stuck on a hung mount is left behind; unmounting frees it.
            if support::wait_until(Duration::from_secs(10), || h.is_finished()) {
                let _ = h.join();
            } else {
                eprintln!("metadata loop still blocked after 10 s: leaving it to the unmount");
            }
        }
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64()
}

/// `label_values(selector, label)` split into (selector, label).
fn parse_label_values(q: &str) -> Option<(String, String)> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (sel, label) = inner.rsplit_once(',')?;
    Some((sel.trim().to_string(), label.trim().to_string()))
}

#[test]
fn every_panel_query_returns_data_from_prometheus_scraping_a_live_mount() {
    let test = "every_panel_query_returns_data_from_prometheus_scraping_a_live_mount";
    if !require(test, false, &[]) {
        return;
    }
    let Some(tools) = require_tools(test, &["prometheus", "fio"]) else {
        return;
    };
    let (prometheus_bin, fio_bin) = (&tools[0], &tools[1]);
    let dashboard = load_dashboard();

    // Declared in start order, so dropped in reverse: load first, then Prometheus, then the mount.
    // Demand tracing on: the hit-ratio and byte panels need it.
    let mut mount = Server::ringfs("ebpf.demand_tracing=true,metrics_addr=127.0.0.1:0");
    let metrics_addr = mount.metrics_addr();
    assert!(mount.scrape().contains("ringfs_build_info"), "no metrics from {metrics_addr}");
    let prom = Prometheus::start(prometheus_bin, &metrics_addr, &mount.mountpoint);

    let job_file = prom.dir.path().join("load.fio");
    std::fs::write(
        &job_file,
        format!(
            "[global]\ndirectory={dir}\nthread=1\nioengine=psync\nruntime={LOAD_SECS}\ntime_based=1\ninvalidate=0\n\
             group_reporting=1\n\n[randrw]\nrw=randrw\nrwmixread=70\nbs=4k\nsize=16m\nfsync=32\n\n\
             [smallfiles]\nrw=randrw\nbs=4k\nnrfiles=32\nfilesize=16k\nopenfiles=2\nfile_service_type=random\n",
            dir = mount.mountpoint.display()
        ),
    )
    .expect("write fio job");
    let fio_out = prom.dir.path().join("fio.out");
    let load_start = Instant::now();
    let mut fio = Guard::new(
        "fio",
        Command::new(fio_bin)
            .arg(format!("--output={}", fio_out.display()))
            .arg(&job_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(prom.dir.path().join("fio.err")).expect("fio.err"))
            .spawn()
            .expect("spawn fio"),
        true,
    );
    let meta = MetaLoop::start(&mount.mountpoint, &mount.source);

    // A few scrapes of the loaded mount, and enough load for the rate windows.
    let scrapes = format!("count_over_time(up{{job=\"{JOB}\"}}[1m])");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let n = prom.value(&scrapes, now()).unwrap_or(0.0);
        if n >= 6.0 && load_start.elapsed() >= Duration::from_secs(8) {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus scraped {metrics_addr} only {n} times in 40 s");
        std::thread::sleep(Duration::from_millis(250));
    }
    if let Some(status) = fio.try_wait() {
        let err = std::fs::read_to_string(prom.dir.path().join("fio.err")).unwrap_or_default();
        panic!("fio ended early ({status}):\n{err}\n{}", std::fs::read_to_string(&fio_out).unwrap_or_default());
    }
    // Every query is evaluated at the same instant, in the middle of the load.
    let t = now();
    assert_eq!(prom.value(&format!("up{{job=\"{JOB}\"}}"), t), Some(1.0), "the mount's target is not up");
    let ops = prom.value(&format!("sum(rate(ringfs_requests_total{{job=\"{JOB}\"}}[{RATE_INTERVAL}]))"), t);
    assert!(ops.is_some_and(|v| v > 0.0), "no server requests under load: {ops:?}");

    let ebpf = prom.value(&format!("ringfs_ebpf_enabled{{job=\"{JOB}\"}}"), t);
    assert!(ebpf.is_some(), "ringfs_ebpf_enabled is not exported");
    let ebpf_on = ebpf == Some(1.0);
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        // CI machines support the eBPF accounting: every kernel-side panel must show data.
        assert!(ebpf_on, "eBPF accounting is off under CI; the server log says why");
    }
    let transport = prom
        .query(&format!("ringfs_transport_info{{job=\"{JOB}\"}}"), t)
        .ok()
        .and_then(|r| r.first().and_then(|s| s["metric"]["transport"].as_str().map(str::to_string)))
        .unwrap_or_default();
    eprintln!(
        "{test}: transport {transport}, ringfs_ebpf_enabled {}",
        ebpf.map_or("absent (treated as 0)".to_string(), |v| v.to_string())
    );
    let may_be_empty = |fams: &BTreeSet<String>| -> Option<&'static str> {
        if !ebpf_on && fams.iter().any(|f| is_kernel_family(f)) {
            return Some("kernel-side family, eBPF accounting off");
        }
        if transport == "dev_fuse" && fams.iter().any(|f| is_queue_family(f)) {
            return Some("io_uring queue family, dev_fuse transport");
        }
        None
    };

    // The variables, as Grafana fills them with this mount selected.
    let selected: BTreeMap<&str, String> = [
        ("job", JOB.to_string()),
        ("mount", mount.mountpoint.display().to_string()),
        ("instance", metrics_addr.clone()),
    ]
    .into_iter()
    .collect();
    let mut vars = BTreeMap::new();
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default();
        let value = match v["type"].as_str() {
            Some("datasource") => "prometheus".to_string(),
            _ => {
                let raw = selected.get(name).unwrap_or_else(|| panic!("no value for variable {name} in this test"));
                if v["multi"] == true || v["includeAll"] == true {
                    special_regex_escape(raw)
                } else {
                    regular_escape(raw)
                }
            }
        };
        vars.insert(name.to_string(), value);
    }
    vars.insert("__rate_interval".into(), RATE_INTERVAL.into());
    vars.insert("__interval".into(), INTERVAL.into());
    vars.insert("__interval_ms".into(), "2000".into());
    vars.insert("__range".into(), "1m".into());
    vars.insert("__range_s".into(), "60".into());

    let mut failures = Vec::new();
    let mut report = Vec::new();

    // Variable queries list the live mount.
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().unwrap_or_default();
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_default();
        let Some((sel, label)) = parse_label_values(q) else {
            failures.push(format!("variable {name}: cannot read {q:?}"));
            continue;
        };
        let sel = match substitute(&sel, &vars) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("variable {name}: {e}"));
                continue;
            }
        };
        let path = format!("/api/v1/label/{label}/values?match[]={}&start={:.3}&end={t:.3}", urlencode(&sel), t - 60.0);
        match prom.api(&path) {
            Ok(values) if values.as_array().is_some_and(|a| a.iter().any(|x| x == selected[name].as_str())) => {
                report.push(format!("  variable {name}: {values}"));
            }
            Ok(values) => failures.push(format!("variable {name} ({q}): {values} lacks {:?}", selected[name])),
            Err(e) => failures.push(format!("variable {name} ({q}): {e}")),
        }
    }

    // Every panel query.
    for (title, refid, expr) in all_targets(&dashboard) {
        let q = match substitute(&expr, &vars) {
            Ok(q) => q,
            Err(e) => {
                failures.push(format!("{title}/{refid}: {e}"));
                continue;
            }
        };
        let fams = families(&expr);
        match prom.query(&q, t) {
            Err(e) => failures.push(format!("{title}/{refid}: query failed: {e}\n    {q}")),
            Ok(r) if r.is_empty() => match may_be_empty(&fams) {
                Some(why) => report.push(format!("  {title}/{refid}: empty, allowed ({why})")),
                None => failures.push(format!("{title}/{refid}: no data\n    {q}")),
            },
            Ok(r) => {
                let first = r[0]["value"][1].as_str().unwrap_or("?").to_string();
                report.push(format!("  {title}/{refid}: {} series, first {first}", r.len()));
            }
        }
    }

    // Every family the dashboard and the rules name is in Prometheus (with the same exceptions).
    let names = prom.api(&format!("/api/v1/label/__name__/values?start={:.3}&end={t:.3}", t - 60.0));
    match names {
        Err(e) => failures.push(format!("metric names: {e}")),
        Ok(names) => {
            let present: BTreeSet<String> =
                names.as_array().into_iter().flatten().filter_map(|n| n.as_str().map(str::to_string)).collect();
            let mut named = BTreeSet::new();
            for (_, _, expr) in all_targets(&dashboard) {
                named.extend(families(&expr));
            }
            for file in RULE_FILES {
                named.extend(families(&read(&rules_dir().join(file))));
            }
            for f in named {
                let found = present.contains(&f) || present.contains(&format!("{f}_count"));
                if !found && may_be_empty(&BTreeSet::from([f.clone()])).is_none() {
                    failures.push(format!("metric family {f} is not exported by the live mount"));
                }
            }
        }
    }

    // The alert and recording rules load and evaluate without errors against the live series.
    let rule_count: usize = RULE_FILES
        .iter()
        .map(|f| {
            let text = read(&rules_dir().join(f));
            text.matches("- alert: ").count() + text.matches("- record: ").count()
        })
        .sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rules = prom.api("/api/v1/rules");
        let list: Vec<Value> = rules
            .as_ref()
            .map(|d| {
                d["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        let errors: Vec<String> = list
            .iter()
            .filter(|r| r["health"] == "err")
            .map(|r| format!("rule {}: {}", r["name"], r["lastError"]))
            .collect();
        let evaluated = list.iter().filter(|r| r["health"] == "ok").count();
        if !errors.is_empty() {
            failures.extend(errors);
            break;
        }
        if list.len() == rule_count && evaluated == rule_count {
            report.push(format!("  {rule_count} alert and recording rules loaded and evaluated"));
            break;
        }
        if Instant::now() > deadline {
            failures.push(format!(
                "alert rules: {} loaded, {evaluated} evaluated, {rule_count} expected ({rules:?})",
                list.len()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    drop(meta);
    drop(fio);
    eprintln!("{test}: {} queries at t={t:.3}:\n{}", report.len(), report.join("\n"));
    assert!(failures.is_empty(), "{} failures:\n{}\nserver log:\n{}", failures.len(), failures.join("\n"), mount.log());
}

/// The attribution scenario under a real Prometheus: for every class the scenario made calls
/// of, `class:ringfs_kernel_hit_rate:ratio_rate5m` (ringfs-rules.yml, the expression behind the
/// dashboard's hit-rate panel) equals 1 - calls with a fallback / calls of the scenario's
/// counters, which `attribution::run` checked phase by phase against the known effect of each
/// call. Exact up to rounding: the whole scenario fits in the 5-minute window and every series
/// starts at 0, so rate() extrapolates numerator and denominator alike.
#[test]
fn recording_rules_agree_with_the_attribution_scenario() {
    let test = "recording_rules_agree_with_the_attribution_scenario";
    if !require(test, false, &[]) {
        return;
    }
    let Some(tools) = require_tools(test, &["prometheus"]) else {
        return;
    };
    // The phases count on the kernel keeping what it cached: a cache drop anywhere on the
    // machine meanwhile (another test, a benchmark) voids the run, which is made again on a
    // fresh mount and Prometheus.
    let mut attempt = 0;
    let (mut mount, prom, before, phases) = loop {
        attempt += 1;
        let src = tempfile::tempdir_in("/tmp").expect("tempdir");
        attribution::prepare_source(src.path());
        let source = src.path().to_path_buf();
        let mut mount =
            Server::ringfs_on(&source, &format!("{},metrics_addr=127.0.0.1:0", attribution::OPTIONS), vec![src]);
        let metrics_addr = mount.metrics_addr();
        if !mount.log().contains("eBPF accounting attached") {
            let why = mount.log();
            if in_ci() {
                panic!("{test}: eBPF accounting is not available under CI:\n{why}");
            }
            eprintln!("SKIP {test}: eBPF accounting unavailable:\n{why}");
            return;
        }
        let prom = Prometheus::start(&tools[0], &metrics_addr, &mount.mountpoint);
        // Prometheus has the counters at 0 before the scenario starts.
        let scraped = support::wait_until(Duration::from_secs(30), || {
            prom.value(&format!("count_over_time(up{{job=\"{JOB}\"}}[5m])"), now()).is_some_and(|v| v >= 2.0)
        });
        assert!(scraped, "Prometheus did not scrape {metrics_addr}");
        let before = attribution::Counters::parse(&mount.scrape());
        let mnt = mount.mountpoint.clone();
        let drops = support::cache_drops();
        let phases = attribution::run(&mnt, || attribution::Counters::parse(&mount.scrape()));
        if support::cache_drops() == drops || attempt == 3 {
            break (mount, prom, before, phases);
        }
        eprintln!("{test}: the kernel's caches were dropped during the scenario: run {attempt} voided");
    };
    let problems: Vec<String> =
        phases.iter().flat_map(|p| p.problems.iter().map(move |e| format!("{}: {e}", p.name))).collect();
    assert!(problems.is_empty(), "the scenario does not match its ground truth:\n{}", problems.join("\n"));
    let truth = attribution::Counters::parse(&mount.scrape()).minus(&before);

    // Wait for a scrape with the final counters, then for a rule evaluation after it.
    let last_class = "write";
    let final_calls = truth.calls(last_class) + before.calls(last_class);
    let sample = format!("ringfs_kernel_demand_calls_total{{job=\"{JOB}\", class=\"{last_class}\"}}");
    assert!(
        support::wait_until(Duration::from_secs(30), || prom.value(&sample, now()) == Some(final_calls as f64)),
        "Prometheus never scraped the final counters ({final_calls} {last_class} calls)"
    );
    let scraped_at = prom.value(&format!("timestamp({sample})"), now()).expect("timestamp of the last scrape");
    let rule = |class: &str| format!("class:ringfs_kernel_hit_rate:ratio_rate5m{{job=\"{JOB}\", class=\"{class}\"}}");
    assert!(
        support::wait_until(Duration::from_secs(30), || {
            prom.value(&format!("timestamp({})", rule(last_class)), now()).is_some_and(|ts| ts > scraped_at + 0.5)
        }),
        "the recording rules were not evaluated after the last scrape"
    );
    let t = now();
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (class, calls) in &truth.demand {
        if *calls <= 0.0 {
            continue;
        }
        let expected = 1.0 - truth.fell_back(class) as f64 / calls;
        match prom.value(&rule(class), t) {
            None => failures.push(format!("{class}: no recorded hit rate (expected {expected:.6})")),
            Some(v) if !(0.0..=1.0).contains(&v) => {
                failures.push(format!("{class}: recorded hit rate {v} outside [0, 1]"))
            }
            Some(v) if (v - expected).abs() > 1e-6 => {
                failures.push(format!("{class}: recorded hit rate {v:.6}, scenario {expected:.6}"))
            }
            Some(v) => report.push(format!(
                "  {class}: {} calls, {} with a fallback, hit rate {v:.6}",
                *calls as u64,
                truth.fell_back(class)
            )),
        }
    }
    eprintln!("{test}: recorded hit rates at t={t:.3}:\n{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}
