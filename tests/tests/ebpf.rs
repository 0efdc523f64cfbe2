//! eBPF accounting on real mounts: attribution of every request to the call that caused it
//! (the scripted scenario of `attribution/mod.rs`, every phase checked), hit rates, fallbacks
//! equal to the server's own counts, passthrough bytes, isolation between mounts, and a
//! `/metrics` that promtool accepts.

mod attribution;
mod support;

use std::io::Read;
use std::process::{Command, Stdio};

use support::{metric, require, Server};

fn ebpf_required(test: &str) -> bool {
    if !require(test, false, &[]) {
        return false;
    }
    let mut probe = Server::ringfs("ebpf.demand_tracing=true,metrics_addr=127.0.0.1:0");
    let text = probe.scrape();
    if metric(&text, "ringfs_ebpf_enabled") == 1.0 {
        return true;
    }
    let why = probe.log().lines().find(|l| l.contains("eBPF")).unwrap_or("no reason logged").to_string();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: eBPF accounting is not available under CI: {why}");
    }
    eprintln!("SKIP {test}: eBPF accounting unavailable: {why}");
    false
}

/// Waits until the server has attached its programs: it loads them after the mount appears
/// and starts `/metrics` right after, so calls made before the metrics address is logged may
/// be missed.
fn attached(m: &mut Server) {
    m.metrics_addr();
    assert!(m.log().contains("eBPF accounting attached"), "eBPF accounting not attached:\n{}", m.log());
}

/// Calls of `class` and those that caused a request.
fn class_counts(text: &str, class: &str) -> (f64, f64) {
    (
        metric(text, &format!("ringfs_kernel_demand_calls_total{{class=\"{class}\"}}")),
        metric(text, &format!("ringfs_kernel_calls_with_fallback_total{{class=\"{class}\"}}")),
    )
}

#[test]
fn stat_hit_rate_with_and_without_caching() {
    if !ebpf_required("stat_hit_rate_with_and_without_caching") {
        return;
    }
    for (opts, check) in [
        ("entry_timeout=3600,attr_timeout=3600", (|r: f64| r >= 0.99) as fn(f64) -> bool),
        ("entry_timeout=0,attr_timeout=0,negative_timeout=0,coherence=ttl", |r: f64| r <= 0.05),
    ] {
        let mut m = Server::ringfs(&format!("{opts},ebpf.demand_tracing=true,metrics_addr=127.0.0.1:0"));
        attached(&mut m);
        std::fs::write(m.source.join("f"), b"x").expect("write");
        let p = m.mountpoint.join("f");
        for _ in 0..1000 {
            std::fs::metadata(&p).expect("stat");
        }
        let text = m.scrape();
        let (calls, fell) = class_counts(&text, "stat");
        assert!(calls >= 1000.0, "{opts}: {calls} stat calls counted for 1000\n{text}");
        let r = 1.0 - fell / calls;
        assert!(check(r), "{opts}: stat hit rate {r}\n{text}");
    }
}

/// The scripted scenario (see `attribution/mod.rs` for each phase and its tolerance), on a
/// real mount with demand tracing, passthrough for `*.pt` files and the server for `*.srv`, on
/// both transports (the classic channel flushes queued requests from other contexts).
#[test]
fn attribution_scenario_matches_ground_truth() {
    if !ebpf_required("attribution_scenario_matches_ground_truth") {
        return;
    }
    let mut transports = vec!["dev-fuse"];
    if support::uring_enabled() {
        transports.push("uring");
    } else {
        eprintln!("attribution_scenario_matches_ground_truth: FUSE over io_uring is off, dev-fuse only");
    }
    let mut failures = Vec::new();
    for transport in transports {
        // The phases count on the kernel keeping what it cached: a cache drop anywhere on the
        // machine meanwhile (another test, a benchmark) voids the run, which is made again on a
        // fresh mount.
        let mut attempt = 0;
        let (mut m, phases) = loop {
            attempt += 1;
            let src = tempfile::tempdir_in("/tmp").expect("tempdir");
            attribution::prepare_source(src.path());
            let source = src.path().to_path_buf();
            let opts = format!("{},transport={transport},metrics_addr=127.0.0.1:0", attribution::OPTIONS);
            let mut m = Server::ringfs_on(&source, &opts, vec![src]);
            attached(&mut m);
            let mnt = m.mountpoint.clone();
            let drops = support::cache_drops();
            let phases = attribution::run(&mnt, || attribution::Counters::parse(&m.scrape()));
            if support::cache_drops() == drops || attempt == 3 {
                break (m, phases);
            }
            eprintln!("{transport}: the kernel's caches were dropped during the scenario: run {attempt} voided");
        };
        for p in &phases {
            eprintln!("{transport}: phase {}:\n{}", p.name, p.delta.describe());
            for problem in &p.problems {
                failures.push(format!("{transport}: {}: {problem}\n{}", p.name, p.delta.describe()));
            }
        }
        // Every hit rate the counters give is within [0, 1].
        let totals = &phases.last().expect("totals").delta;
        for (class, calls) in &totals.demand {
            if *calls > 0.0 {
                let r = 1.0 - totals.fell_back(class) as f64 / calls;
                if !(0.0..=1.0).contains(&r) {
                    failures.push(format!("{transport}: {class}: hit rate {r} outside [0, 1]"));
                }
            }
        }
        let text = m.scrape();
        failures.extend(charged_once(&text).into_iter().map(|f| format!("{transport}: {f}")));
        // Every family the scenario fed (all classes, bytes, requests by cause) is clean.
        if let Err(e) = promtool_check_metrics(&text) {
            failures.push(format!("{transport}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));
}

/// Every request is charged to exactly one class: per operation, the requests by class add up
/// to `ringfs_kernel_fallbacks_total`. Returns the mismatches.
fn charged_once(text: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (labels, total) in support::samples(text, "ringfs_kernel_fallbacks_total") {
        let op = labels.trim_start_matches("op=");
        let by_class: f64 = support::samples(text, "ringfs_kernel_fallback_requests_total")
            .iter()
            .filter(|(l, _)| l.ends_with(&format!("op={op}")))
            .map(|(_, v)| v)
            .sum();
        if by_class != total {
            failures.push(format!("{labels}: {total} requests, {by_class} charged to classes"));
        }
    }
    failures
}

/// Without demand tracing, requests are still charged: `background` for those no user call is
/// behind, `untraced` for the rest; no demand families are exported.
#[test]
fn without_demand_tracing_requests_are_untraced_or_background() {
    if !ebpf_required("without_demand_tracing_requests_are_untraced_or_background") {
        return;
    }
    let mut m = Server::ringfs("ebpf.demand_tracing=false,metrics_addr=127.0.0.1:0");
    attached(&mut m);
    for i in 0..10 {
        std::fs::write(m.mountpoint.join(format!("f{i}")), b"x").expect("create");
    }
    // The RELEASEs of those files are sent after close() returned: wait for the last one.
    let releases =
        |text: &str| metric(text, "ringfs_kernel_fallback_requests_total{class=\"background\",op=\"release\"}");
    assert!(
        support::wait_until(std::time::Duration::from_secs(30), || releases(&m.scrape()) >= 10.0),
        "RELEASE not charged to background:\n{}",
        m.scrape()
    );
    let text = m.scrape();
    assert_eq!(
        metric(&text, "ringfs_kernel_fallback_requests_total{class=\"untraced\",op=\"create\"}"),
        10.0,
        "{text}"
    );
    assert!(!text.contains("ringfs_kernel_demand_calls_total"), "demand exported without demand tracing:\n{text}");
    let failures = charged_once(&text);
    assert!(failures.is_empty(), "{}\n{text}", failures.join("\n"));
}

#[test]
fn kernel_fallbacks_equal_server_requests() {
    if !ebpf_required("kernel_fallbacks_equal_server_requests") {
        return;
    }
    fallbacks_equal_server_requests("");
}

/// The same with the fuse programs attached as `raw_tp` (what a kernel with FUSE as a module
/// gets: its tracepoints are the module's, which `tp_btf` cannot reach here), forced by
/// `ebpf.fuse_attach`: the log and the metric say so, and the counts, causes and round trips
/// are the same.
#[test]
fn raw_tp_fallback_counts_the_same() {
    if !ebpf_required("raw_tp_fallback_counts_the_same") {
        return;
    }
    let text = fallbacks_equal_server_requests(",ebpf.fuse_attach=raw_tp");
    for (p, tp) in [("fuse_send", "fuse_request_send"), ("fuse_end", "fuse_request_end")] {
        let name = format!("ringfs_ebpf_program_attached{{program=\"{p}\",tracepoint=\"{tp}\",via=\"raw_tp\"}}");
        assert_eq!(metric(&text, &name), 1.0, "{name}\n{text}");
    }
    let name = "ringfs_ebpf_program_attached{program=\"sys_enter\",tracepoint=\"sys_enter\",via=\"tp_btf\"}";
    assert_eq!(metric(&text, name), 1.0, "{name}\n{text}");
    // fuse_end: round trips in the histogram (one per request that was answered).
    let rt = metric(&text, "ringfs_kernel_request_duration_seconds_count{op=\"lookup\"}");
    assert!(rt >= metric(&text, "ringfs_kernel_fallbacks_total{op=\"lookup\"}") && rt > 0.0, "{text}");
    // Causes: the creations were charged to the calls that made them (demand tracing).
    assert!(metric(&text, "ringfs_kernel_fallback_requests_total{class=\"create\",op=\"create\"}") >= 20.0, "{text}");
}

/// Runs a workload with passthrough off and checks that the kernel-side fallback counters
/// equal the server's own request counts, op by op. Returns the last scrape.
fn fallbacks_equal_server_requests(extra: &str) -> String {
    let mut m = Server::ringfs(&format!("passthrough=false,ebpf.demand_tracing=true,metrics_addr=127.0.0.1:0{extra}"));
    attached(&mut m);
    if extra.contains("raw_tp") {
        for p in ["fuse_send", "fuse_end"] {
            let line = format!("eBPF program {p} attached as raw_tp");
            assert!(m.log().contains(&line), "no `{line}` in the log:\n{}", m.log());
        }
    }
    for i in 0..20 {
        let p = m.mountpoint.join(format!("f{i}"));
        std::fs::write(&p, vec![b'a'; 5000]).expect("write");
        assert_eq!(std::fs::read(&p).expect("read").len(), 5000);
        std::fs::rename(&p, m.mountpoint.join(format!("g{i}"))).expect("rename");
    }
    std::fs::create_dir(m.mountpoint.join("d")).expect("mkdir");
    assert_eq!(std::fs::read_dir(&m.mountpoint).expect("readdir").count(), 21);
    let ops = [
        "lookup",
        "create",
        "write",
        "read",
        "rename",
        "mkdir",
        "open",
        "release",
        "readdirplus",
        "readdir",
        "getattr",
    ];
    let server = |text: &str, op: &str| metric(text, &format!("ringfs_requests_total{{op=\"{op}\"}}"));
    let kernel = |text: &str, op: &str| metric(text, &format!("ringfs_kernel_fallbacks_total{{op=\"{op}\"}}"));
    // Background requests (the RELEASEs of the 40 opens, sent after close returned) may still be
    // on their way: compare once they are all served and the two sides agree (a count that
    // never matches fails at the deadline).
    let mut text = m.scrape();
    support::wait_until(std::time::Duration::from_secs(30), || {
        text = m.scrape();
        server(&text, "release") >= 40.0 && ops.iter().all(|op| kernel(&text, op) == server(&text, op))
    });
    for op in ["create", "write", "read", "rename", "mkdir"] {
        assert!(server(&text, op) > 0.0, "the workload did not send {op} to the server:\n{text}");
    }
    assert!(server(&text, "release") >= 40.0, "the 40 RELEASEs were never served:\n{text}");
    for op in ops {
        let (server, kernel) = (server(&text, op), kernel(&text, op));
        assert_eq!(kernel, server, "{op}: kernel saw {kernel} requests sent, the server counted {server}\n{text}");
    }
    text
}

#[test]
fn passthrough_bytes_are_counted_in_the_kernel() {
    if !ebpf_required("passthrough_bytes_are_counted_in_the_kernel") {
        return;
    }
    let mut m = Server::ringfs("ebpf.demand_tracing=true,metrics_addr=127.0.0.1:0");
    attached(&mut m);
    let n = 3 * 1024 * 1024 + 123;
    std::fs::write(m.source.join("big"), vec![7u8; n]).expect("write backing");
    let mut buf = Vec::new();
    std::fs::File::open(m.mountpoint.join("big")).expect("open").read_to_end(&mut buf).expect("read");
    assert_eq!(buf.len(), n);
    let text = m.scrape();
    assert_eq!(metric(&text, "ringfs_passthrough_read_bytes_total"), n as f64, "{text}");
    assert_eq!(metric(&text, "ringfs_requests_total{op=\"read\"}"), 0.0);
    assert_eq!(metric(&text, "ringfs_server_read_bytes_total"), 0.0);
}

#[test]
fn another_mount_does_not_leak_into_the_counters() {
    if !ebpf_required("another_mount_does_not_leak_into_the_counters") {
        return;
    }
    let mut a = Server::ringfs("ebpf.demand_tracing=true,metrics_addr=127.0.0.1:0");
    let mut b = Server::ringfs("ebpf.demand_tracing=true,metrics_addr=127.0.0.1:0");
    attached(&mut a);
    attached(&mut b);
    std::fs::write(b.source.join("f"), vec![1u8; 100_000]).expect("write");
    for _ in 0..200 {
        std::fs::metadata(b.mountpoint.join("f")).expect("stat b");
        let _ = std::fs::read(b.mountpoint.join("f")).expect("read b");
    }
    let ta = a.scrape();
    let tb = b.scrape();
    assert!(metric(&tb, "ringfs_kernel_demand_calls_total{class=\"stat\"}") >= 200.0, "{tb}");
    assert!(metric(&ta, "ringfs_kernel_demand_calls_total{class=\"stat\"}") < 5.0, "mount A counted B's stats:\n{ta}");
    assert_eq!(metric(&ta, "ringfs_kernel_read_bytes_total"), 0.0, "mount A counted B's reads:\n{ta}");
    assert_eq!(metric(&ta, "ringfs_kernel_fallbacks_total{op=\"open\"}"), 0.0, "{ta}");
}

#[test]
fn live_scrape_passes_promtool() {
    if !ebpf_required("live_scrape_passes_promtool") {
        return;
    }
    let mut m = Server::ringfs("ebpf.demand_tracing=true,metrics_addr=127.0.0.1:0");
    std::fs::write(m.mountpoint.join("x"), b"data").expect("write");
    let _ = std::fs::read(m.mountpoint.join("x")).expect("read");
    let _ = std::fs::read(m.mountpoint.join("missing"));
    let text = m.scrape();
    if let Err(e) = promtool_check_metrics(&text) {
        panic!("{e}");
    }
}

/// `promtool check metrics` on `text`: Err with its complaints.
fn promtool_check_metrics(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), text.as_bytes()).expect("feed promtool");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("promtool");
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Every program is attached on this kernel, one `ringfs_ebpf_program_attached` series each,
/// and no piece is reported missing in the log (a program the verifier rejects, for instance a
/// CO-RE relocation gone wrong, shows up here by name).
#[test]
fn every_program_is_attached_and_reported() {
    if !ebpf_required("every_program_is_attached_and_reported") {
        return;
    }
    let mut m = Server::ringfs("ebpf.demand_tracing=true,metrics_addr=127.0.0.1:0");
    attached(&mut m);
    let text = m.scrape();
    let series: Vec<&str> = text.lines().filter(|l| l.starts_with("ringfs_ebpf_program_attached{")).collect();
    let expected = ringfs_bpf::PROGRAMS.len();
    assert_eq!(series.len(), expected, "{text}");
    for p in ringfs_bpf::PROGRAMS {
        let name = format!(
            "ringfs_ebpf_program_attached{{program=\"{}\",tracepoint=\"{}\",via=\"tp_btf\"}}",
            p.name, p.tracepoint
        );
        assert_eq!(metric(&text, &name), 1.0, "{name}\n{}", m.log());
    }
    assert_eq!(metric(&text, "ringfs_ebpf_feature_available{feature=\"passthrough_bytes\"}"), 1.0, "{text}");
    assert!(!m.log().contains("not attached"), "{}", m.log());
    assert!(m.log().contains(&format!("{expected} of {expected} programs; demand tracing on")), "{}", m.log());
}

/// The object built with the build machine's BTF hidden (scripts/ebpf-btf-free.sh: a private
/// mount namespace with an empty tmpfs on /sys/kernel/btf) is the object every other test here
/// loads, byte for byte, and loads and counts on this kernel.
#[test]
fn object_built_without_kernel_btf_loads_and_counts() {
    if !ebpf_required("object_built_without_kernel_btf_loads_and_counts") {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join("target/btf-free");
    let out = Command::new(root.join("scripts/ebpf-btf-free.sh"))
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("run scripts/ebpf-btf-free.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    for want in [
        "identical to the normal build's object",
        "test tests::a_missing_tracepoint_disables_only_its_program ... ok",
        "test tests::every_program_attaches_on_this_kernel ... ok",
        "OK",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn disabled_ebpf_is_reported_not_fatal() {
    if !require("disabled_ebpf_is_reported_not_fatal", false, &[]) {
        return;
    }
    let mut m = Server::ringfs("ebpf.enable=false,metrics_addr=127.0.0.1:0");
    std::fs::write(m.mountpoint.join("x"), b"data").expect("write through a mount without eBPF");
    let text = m.scrape();
    assert_eq!(metric(&text, "ringfs_ebpf_enabled"), 0.0, "{text}");
    assert!(!text.contains("ringfs_kernel_fallbacks_total{"), "{text}");
}
