//! Crate-level tests: defaults, merging, `-o` resolution and every error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use crate::schema::KEYS;
use crate::*;

const EXAMPLE: &str = include_str!("../ringfs.example.toml");
const MINIMAL: &str = "source = \"/srv/data\"\nmountpoint = \"/mnt/data\"\n";

fn opts(list: &str) -> Vec<(String, String)> {
    parse_mount_options(list).unwrap()
}

/// Builds from the minimal file plus `-o` options.
fn with_opts(list: &str) -> Result<Config, ConfigError> {
    build(Some(MINIMAL), None, None, &opts(list))
}

fn expected_default() -> Config {
    Config { source: "/srv/data".into(), mountpoint: "/mnt/data".into(), ..Config::default() }
}

#[test]
fn defaults() {
    let c = Config::default();
    assert_eq!(c.source, PathBuf::new());
    assert_eq!(c.mountpoint, PathBuf::new());
    assert!(!c.allow_other);
    assert!(c.default_permissions);
    assert!(c.lsm_labels);
    assert!(!c.ro);
    assert_eq!(c.fsname, "");
    assert_eq!(c.subtype, "ringfs");
    assert_eq!(c.mount_flags, MountFlags::default());
    assert!(!c.mount_flags.nosuid && !c.mount_flags.nodev && !c.mount_flags.noexec);
    assert_eq!(c.cache.entry_timeout, Duration::from_secs(3600));
    assert_eq!(c.cache.attr_timeout, Duration::from_secs(3600));
    assert_eq!(c.cache.negative_timeout, Duration::from_secs(3600));
    assert_eq!(c.cache.coherence, CoherenceMode::Watch);
    assert_eq!(c.cache.readdirplus, ReaddirplusMode::Always);
    assert_eq!(c.fuse.max_write, 1_048_576);
    assert_eq!(c.fuse.max_readahead, 1_048_576);
    assert_eq!(c.fuse.max_background, 64);
    assert_eq!(c.fuse.congestion_threshold, 48);
    assert!(!c.fuse.writeback_cache);
    assert_eq!(c.transport.mode, TransportMode::Auto);
    assert_eq!(c.transport.workers, 0);
    assert_eq!(c.transport.queue_depth, 8);
    assert!(c.offload.passthrough);
    assert_eq!(c.metrics.addr, Some("127.0.0.1:9464".parse::<SocketAddr>().unwrap()));
    assert!(c.ebpf.enable);
    assert!(!c.ebpf.demand_tracing);
    assert_eq!(c.log.level, LogLevel::Info);

    // The default is invalid only because source and mountpoint are missing.
    assert_eq!(c.validate().unwrap_err().key(), Some("source"));
    expected_default().validate().unwrap();
    assert_eq!(from_toml_str(MINIMAL).unwrap(), expected_default());
}

#[test]
fn example_file_parses_and_equals_the_defaults() {
    assert_eq!(from_toml_str(EXAMPLE).unwrap(), expected_default());
}

#[test]
fn example_file_has_every_key_with_a_comment() {
    let table: Table = EXAMPLE.parse().unwrap();
    let lines: Vec<&str> = EXAMPLE.lines().collect();
    for key in KEYS {
        let (section, leaf) = match key.path.split_once('.') {
            Some((s, l)) => (Some(s), l),
            None => (None, key.path),
        };
        let present = match section {
            None => table.contains_key(leaf),
            Some(s) => table[s].as_table().unwrap().contains_key(leaf),
        };
        assert!(present, "{} missing from the example", key.path);
        let at = lines.iter().position(|l| l.starts_with(&format!("{leaf} = "))).unwrap();
        assert!(lines[at - 1].starts_with("# "), "{} has no comment", key.path);
    }
}

/// The schema table and the serde types describe the same keys.
#[test]
fn schema_matches_the_types() {
    let table = Table::try_from(Config::default()).unwrap();
    let mut serialized = Vec::new();
    for (name, value) in &table {
        match value {
            Value::Table(t) => serialized.extend(t.keys().map(|k| format!("{name}.{k}"))),
            _ => serialized.push(name.clone()),
        }
    }
    serialized.sort();
    let mut schema: Vec<String> = KEYS.iter().map(|k| k.path.to_owned()).collect();
    schema.sort();
    assert_eq!(serialized, schema);
}

#[test]
fn keyword_enums_round_trip() {
    for name in CoherenceMode::NAMES {
        assert_eq!(name.parse::<CoherenceMode>().unwrap().to_string(), *name);
    }
    for name in TransportMode::NAMES {
        assert_eq!(name.parse::<TransportMode>().unwrap().to_string(), *name);
    }
    for name in LogLevel::NAMES {
        assert_eq!(name.parse::<LogLevel>().unwrap().to_string(), *name);
    }
    assert_eq!("dev-fuse".parse::<TransportMode>(), Ok(TransportMode::DevFuse));
    assert_eq!(
        "Uring".parse::<TransportMode>().unwrap_err().to_string(),
        r#"must be one of "auto", "uring", "dev-fuse", got "Uring""#
    );
}

#[test]
fn full_file_is_read() {
    let c = from_toml_str(
        r#"
        source = "data"
        mountpoint = "mnt"
        allow_other = true
        ro = true
        nodev = true
        fsname = "ringfs-data"
        subtype = "ringfs.v2"
        [cache]
        entry_timeout = 2
        attr_timeout = 0.25
        negative_timeout = 0
        coherence = "watch"
        [fuse]
        max_write = 131072
        max_background = 16
        congestion_threshold = 0
        [transport]
        mode = "dev-fuse"
        workers = 4
        [offload]
        passthrough = false
        [metrics]
        addr = ""
        [ebpf]
        demand_tracing = true
        [log]
        level = "trace"
        "#,
    )
    .unwrap();
    assert_eq!(c.source, Path::new("data"));
    assert!(c.allow_other && c.ro && c.mount_flags.nodev && !c.mount_flags.nosuid);
    assert_eq!(c.fsname_or_source(), "ringfs-data");
    assert_eq!(c.fstype(), "fuse.ringfs.v2");
    assert_eq!(c.cache.entry_timeout, Duration::from_secs(2));
    assert_eq!(c.cache.attr_timeout, Duration::from_millis(250));
    assert_eq!(c.cache.negative_timeout, Duration::ZERO);
    assert_eq!(c.cache.coherence, CoherenceMode::Watch);
    assert_eq!(c.fuse.max_write, 131_072);
    assert_eq!(c.fuse.effective_congestion_threshold(), 12);
    assert_eq!(c.transport.mode, TransportMode::DevFuse);
    assert_eq!(c.transport.worker_count(8), 4);
    assert!(!c.offload.passthrough);
    assert_eq!(c.metrics.addr, None);
    assert!(c.ebpf.enable && c.ebpf.demand_tracing);
    assert_eq!(c.log.level, LogLevel::Trace);
}

#[test]
fn helpers() {
    let c = expected_default();
    assert_eq!(c.fsname_or_source(), "/srv/data");
    assert_eq!(c.fstype(), "fuse.ringfs");
    assert_eq!(with_opts("subtype=").unwrap().fstype(), "fuse");
    assert_eq!(c.transport.worker_count(6), 6);
    assert_eq!(c.transport.worker_count(0), 1);
    assert_eq!(c.fuse.effective_congestion_threshold(), 48);
    let big = FuseConfig { max_background: 65535, congestion_threshold: 0, ..FuseConfig::default() };
    assert_eq!(big.effective_congestion_threshold(), 49151);
    let one = FuseConfig { max_background: 1, congestion_threshold: 0, ..FuseConfig::default() };
    assert_eq!(one.effective_congestion_threshold(), 1);
}

#[test]
fn to_toml_string_round_trips() {
    let mut c = expected_default();
    c.cache.attr_timeout = Duration::from_millis(1500);
    c.metrics.addr = None;
    c.transport.mode = TransportMode::DevFuse;
    c.mount_flags.noexec = true;
    let text = to_toml_string(&c);
    assert!(text.contains("entry_timeout = 3600.0\n"), "{text}");
    assert!(text.contains("attr_timeout = 1.5\n"), "{text}");
    assert!(text.contains("addr = \"\"\n"), "{text}");
    assert!(text.contains("mode = \"dev-fuse\"\n"), "{text}");
    assert!(text.contains("noexec = true\n"), "{text}");
    assert_eq!(from_toml_str(&text).unwrap(), c);
    assert_eq!(from_toml_str(&to_toml_string(&expected_default())).unwrap(), expected_default());
}

#[test]
fn merge_precedence() {
    let file = "source = \"/file/src\"\nmountpoint = \"/file/mnt\"\nro = true\n\
                [cache]\nentry_timeout = 5\n";
    // File alone.
    let c = build(Some(file), None, None, &[]).unwrap();
    assert_eq!(c.source, Path::new("/file/src"));
    assert!(c.ro);
    // Positional arguments beat the file.
    let c = build(Some(file), Some(Path::new("/arg/src")), Some(Path::new("/arg/mnt")), &[]).unwrap();
    assert_eq!(c.source, Path::new("/arg/src"));
    assert_eq!(c.mountpoint, Path::new("/arg/mnt"));
    assert_eq!(c.cache.entry_timeout, Duration::from_secs(5));
    // Only one positional: the other comes from the file.
    let c = build(Some(file), Some(Path::new("/arg/src")), None, &[]).unwrap();
    assert_eq!(c.mountpoint, Path::new("/file/mnt"));
    // -o beats both, and the last -o wins.
    let c = build(
        Some(file),
        Some(Path::new("/arg/src")),
        None,
        &opts("source=/opt/src,rw,entry_timeout=7,entry_timeout=8"),
    )
    .unwrap();
    assert_eq!(c.source, Path::new("/opt/src"));
    assert!(!c.ro);
    assert_eq!(c.cache.entry_timeout, Duration::from_secs(8));
    // No file at all.
    let c = build(None, Some(Path::new("src")), Some(Path::new("mnt")), &opts("ro")).unwrap();
    assert_eq!(c.source, Path::new("src"));
    assert!(c.ro);
}

#[test]
fn option_key_forms() {
    // Full dotted path, section_leaf, unique bare leaf: all the same key.
    for list in ["cache.entry_timeout=2.5", "cache_entry_timeout=2.5", "entry_timeout=2.5"] {
        let c = with_opts(list).unwrap();
        assert_eq!(c.cache.entry_timeout, Duration::from_millis(2500), "{list}");
    }
    for list in ["metrics.addr=0.0.0.0:9000", "metrics_addr=0.0.0.0:9000", "addr=0.0.0.0:9000"] {
        let c = with_opts(list).unwrap();
        assert_eq!(c.metrics.addr, Some("0.0.0.0:9000".parse().unwrap()), "{list}");
    }
    assert_eq!(with_opts("metrics_addr=").unwrap().metrics.addr, None);
    assert_eq!(with_opts("transport_queue_depth=64").unwrap().transport.queue_depth, 64);
    assert_eq!(with_opts("max_write=65536").unwrap().fuse.max_write, 65536);
    assert!(!with_opts("passthrough=no").unwrap().offload.passthrough);
    assert_eq!(with_opts("log.level=debug").unwrap().log.level, LogLevel::Debug);
    assert_eq!(with_opts("fsname=a\\,b").unwrap().fsname, "a,b");
}

#[test]
fn option_values_by_type() {
    // Booleans: bare key, true/false, 1/0, yes/no.
    assert!(with_opts("allow_other").unwrap().allow_other);
    assert!(with_opts("allow_other=1").unwrap().allow_other);
    assert!(with_opts("allow_other=yes").unwrap().allow_other);
    assert!(!with_opts("default_permissions=0").unwrap().default_permissions);
    assert!(!with_opts("default_permissions=false").unwrap().default_permissions);
    assert!(!with_opts("lsm_labels=false").unwrap().lsm_labels);
    assert!(!Config::default().cache.opendir_requests);
    assert!(with_opts("opendir_requests").unwrap().cache.opendir_requests);
}

#[test]
fn server_side_permissions_are_refused_for_other_users() {
    // The kernel would skip checks the server cannot make (cached path walks, device nodes,
    // FIFOs): other users would get past permissions. Only the mounting user may use the mode.
    let e = with_opts("allow_other,default_permissions=false").unwrap_err().to_string();
    assert!(e.contains("default_permissions") && e.contains("allow_other"), "{e}");
    assert!(e.contains("FIFOs"), "the error says why: {e}");
    assert!(!with_opts("default_permissions=false").unwrap().default_permissions);
    assert!(with_opts("allow_other,default_permissions").unwrap().allow_other);
    // Durations: integer or float seconds.
    assert_eq!(with_opts("negative_timeout=0").unwrap().cache.negative_timeout, Duration::ZERO);
    assert_eq!(with_opts("attr_timeout=30").unwrap().cache.attr_timeout, Duration::from_secs(30));
}

#[test]
fn option_aliases() {
    assert_eq!(with_opts("transport=uring").unwrap().transport.mode, TransportMode::Uring);
    assert_eq!(with_opts("transport=dev-fuse").unwrap().transport.mode, TransportMode::DevFuse);
    let c = with_opts("ro,nosuid,nodev,noexec,noatime,allow_other,default_permissions").unwrap();
    assert!(c.ro && c.allow_other && c.default_permissions);
    assert_eq!(
        c.mount_flags,
        MountFlags { nosuid: true, nodev: true, noexec: true, noatime: true, ..MountFlags::default() }
    );
    // The positive words clear what the file or an earlier option set.
    let c = build(
        Some(&format!("ro = true\nnosuid = true\nnodev = true\nnoexec = true\nnoatime = true\n{MINIMAL}")),
        None,
        None,
        &opts("rw,suid,dev,exec,atime"),
    )
    .unwrap();
    assert!(!c.ro);
    assert_eq!(c.mount_flags, MountFlags::default());
    assert!(with_opts("rw=false").unwrap().ro);
    let err = with_opts("rw=perhaps").unwrap_err();
    assert_eq!(err.key(), Some("rw"));
    assert_eq!(err.to_string(), r#"rw: must be true or false, got "perhaps""#);
}

#[test]
fn mount_words_are_ignored() {
    let c = with_opts(
        "defaults,auto,noauto,user,nouser,users,nofail,_netdev,async,\
         relatime,x-systemd.automount,x-gvfs-show,comment=systemd.automount",
    )
    .unwrap();
    assert_eq!(c, expected_default());
}

#[test]
fn unknown_options() {
    let err = with_opts("bogus").unwrap_err();
    assert_eq!(err.key(), Some("bogus"));
    assert_eq!(err.to_string(), r#"unknown option "bogus" in -o"#);
    let err = with_opts("entry_timeot=3").unwrap_err();
    assert_eq!(err.to_string(), r#"unknown option "entry_timeot" in -o (did you mean "entry_timeout"?)"#);
    let err = with_opts("cache.bogus=1").unwrap_err();
    assert_eq!(err.key(), Some("cache.bogus"));
    // Words of libfuse we do not support are not silently dropped.
    assert_eq!(with_opts("kernel_cache").unwrap_err().key(), Some("kernel_cache"));
    assert_eq!(with_opts("sync").unwrap_err().key(), Some("sync"));
}

#[test]
fn unknown_keys_at_every_level() {
    let cases = [
        ("bogus = 1", "bogus"),
        ("[bogus]\nx = 1", "bogus"),
        ("entry_timeout = 1", "entry_timeout"),
        ("[cache]\nentry_timeot = 1", "cache.entry_timeot"),
        ("[fuse]\nbogus = 1", "fuse.bogus"),
        ("[transport]\nbogus = 1", "transport.bogus"),
        ("[offload]\nbogus = 1", "offload.bogus"),
        ("[metrics]\nbogus = 1", "metrics.bogus"),
        ("[ebpf]\nbogus = 1", "ebpf.bogus"),
        ("[log]\nbogus = 1", "log.bogus"),
        ("[mount_flags]\nnosuid = true", "mount_flags"),
    ];
    for (extra, key) in cases {
        let err = from_toml_str(&format!("{MINIMAL}{extra}\n")).unwrap_err();
        assert_eq!(err.key(), Some(key), "{extra}");
        assert!(err.to_string().starts_with(&format!("unknown key {key:?}")), "{err}");
    }
    let err = from_toml_str(&format!("{MINIMAL}[cache]\nentry_timeot = 1\n")).unwrap_err();
    assert_eq!(err.to_string(), r#"unknown key "cache.entry_timeot" (did you mean "cache.entry_timeout"?)"#);
    let err = from_toml_str(&format!("entry_timeout = 1\n{MINIMAL}")).unwrap_err();
    assert_eq!(err.to_string(), r#"unknown key "entry_timeout" (did you mean "cache.entry_timeout"?)"#);
}

/// Every single-key rule: the error names the key, from TOML and from -o alike.
#[test]
fn value_errors_name_their_key() {
    // (TOML line, -o option or "", key, message after "key: ")
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "cache.entry_timeout = \"abc\"",
            "entry_timeout=abc",
            "cache.entry_timeout",
            r#"must be a number of seconds >= 0, got "abc""#,
        ),
        (
            "cache.attr_timeout = -1",
            "attr_timeout=-1",
            "cache.attr_timeout",
            "must be a number of seconds >= 0, got -1",
        ),
        (
            "cache.negative_timeout = 1e12",
            "",
            "cache.negative_timeout",
            "must be at most 31536000 seconds (one year), got 1000000000000.0",
        ),
        (
            "cache.negative_timeout = nan",
            "negative_timeout=nan",
            "cache.negative_timeout",
            "must be a number of seconds >= 0, got nan",
        ),
        (
            "cache.coherence = \"poll\"",
            "coherence=poll",
            "cache.coherence",
            r#"must be one of "ttl", "watch", "inotify", got "poll""#,
        ),
        (
            "fuse.max_write = 5000",
            "max_write=5000",
            "fuse.max_write",
            "must be a multiple of 4096 from 4096 to 16777216, got 5000",
        ),
        (
            "fuse.max_write = 33554432",
            "",
            "fuse.max_write",
            "must be a multiple of 4096 from 4096 to 16777216, got 33554432",
        ),
        (
            "fuse.max_readahead = 16777217",
            "max_readahead=16777217",
            "fuse.max_readahead",
            "must be an integer from 0 to 16777216, got 16777217",
        ),
        (
            "fuse.max_background = 0",
            "max_background=0",
            "fuse.max_background",
            "must be an integer from 1 to 65535, got 0",
        ),
        (
            "fuse.congestion_threshold = 70000",
            "",
            "fuse.congestion_threshold",
            "must be an integer from 0 to 65535, got 70000",
        ),
        (
            "fuse.writeback_cache = \"yes\"",
            "writeback_cache=maybe",
            "fuse.writeback_cache",
            "must be true or false, got ",
        ),
        (
            "transport.mode = \"fast\"",
            "transport=fast",
            "transport.mode",
            r#"must be one of "auto", "uring", "dev-fuse", got "fast""#,
        ),
        (
            "transport.workers = 1025",
            "workers=1025",
            "transport.workers",
            "must be an integer from 0 to 1024, got 1025",
        ),
        (
            "transport.queue_depth = 0",
            "queue_depth=0",
            "transport.queue_depth",
            "must be an integer from 1 to 1024, got 0",
        ),
        (
            "transport.queue_depth = 1.5",
            "queue_depth=lots",
            "transport.queue_depth",
            "must be an integer from 1 to 1024, got ",
        ),
        ("offload.passthrough = 1", "", "offload.passthrough", "must be true or false, got 1"),
        ("metrics.addr = \"localhost\"", "metrics_addr=localhost", "metrics.addr", "must be an address with a port"),
        ("ebpf.enable = \"sure\"", "enable=sure", "ebpf.enable", r#"must be true or false, got "sure""#),
        (
            "log.level = \"verbose\"",
            "level=verbose",
            "log.level",
            r#"must be one of "error", "warn", "info", "debug", "trace", got "verbose""#,
        ),
        (
            "subtype = \"a b\"",
            "subtype=a/b",
            "subtype",
            r#"must be a name of ASCII letters, digits, '.', '_' and '-' (or empty), got "a"#,
        ),
        ("fsname = 3", "", "fsname", "must be a string, got 3"),
        ("allow_other = \"true\"", "allow_other=sure", "allow_other", "must be true or false, got "),
        ("cache = 5", "", "cache", "must be a table, got 5"),
    ];
    for (toml_line, option, key, message) in cases {
        // Dotted keys must come before the first table header.
        let err = from_toml_str(&format!("{toml_line}\n{MINIMAL}")).unwrap_err();
        assert_eq!(err.key(), Some(*key), "{toml_line}: {err}");
        let prefix = format!("{key}: {message}");
        assert!(err.to_string().starts_with(&prefix), "{toml_line}: {err}");
        if !option.is_empty() {
            let err = with_opts(option).unwrap_err();
            assert_eq!(err.key(), Some(*key), "-o {option}: {err}");
            assert!(err.to_string().starts_with(&prefix), "-o {option}: {err}");
        }
    }
}

#[test]
fn option_into_a_non_table_section() {
    let err = build(Some(&format!("cache = 5\n{MINIMAL}")), None, None, &opts("entry_timeout=1")).unwrap_err();
    assert_eq!(err.to_string(), "cache: must be a table, got 5");
}

#[test]
fn required_and_path_errors() {
    let err = from_toml_str("mountpoint = \"/mnt\"").unwrap_err();
    assert_eq!(err.to_string(), "source: required (give it in the config file or as the first argument)");
    let err = from_toml_str("source = \"/srv\"").unwrap_err();
    assert_eq!(err.to_string(), "mountpoint: required (give it in the config file or as the second argument)");
    let err = build(None, None, None, &[]).unwrap_err();
    assert_eq!(err.key(), Some("source"));
    let err = from_toml_str("source = \"\"\nmountpoint = \"/mnt\"").unwrap_err();
    assert_eq!(err.key(), Some("source"));
    let err = from_toml_str("source = 1\nmountpoint = \"/mnt\"").unwrap_err();
    assert_eq!(err.to_string(), "source: must be a path string, got 1");
    let err = from_toml_str("source = \"/a\\u0000b\"\nmountpoint = \"/mnt\"").unwrap_err();
    assert_eq!(err.to_string(), "source: must not contain NUL bytes");
    let err = from_toml_str("source = \"/same\"\nmountpoint = \"/same\"").unwrap_err();
    assert_eq!(err.to_string(), r#"mountpoint: must differ from source (both are "/same")"#);
}

#[cfg(unix)]
#[test]
fn non_utf8_paths_are_refused() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let bad = Path::new(OsStr::from_bytes(b"/srv/\xff"));
    let err = build(None, Some(bad), Some(Path::new("/mnt")), &[]).unwrap_err();
    assert_eq!(err.key(), Some("source"));
    let c = Config { source: bad.to_path_buf(), ..expected_default() };
    assert_eq!(c.validate().unwrap_err().key(), Some("source"));
}

#[test]
fn relations_between_keys() {
    let err = with_opts("writeback_cache").unwrap_err();
    assert_eq!(err.key(), Some("offload.passthrough"));
    assert!(
        err.to_string()
            .contains("the kernel disables passthrough when writeback cache is on: set one of them to false"),
        "{err}"
    );
    let c = with_opts("writeback_cache,passthrough=false").unwrap();
    assert!(c.fuse.writeback_cache && !c.offload.passthrough);

    let err = with_opts("max_background=16").unwrap_err();
    assert_eq!(err.key(), Some("fuse.congestion_threshold"));
    assert_eq!(
        err.to_string(),
        "fuse.congestion_threshold: must be at most fuse.max_background (16), got 48; \
         or 0 for 3/4 of max_background"
    );
    with_opts("max_background=16,congestion_threshold=16").unwrap();
    let err = with_opts("export_state_dir=state").unwrap_err();
    assert!(err.to_string().contains("fuse.export_state_dir: must be an absolute path"), "{err}");
    assert!(with_opts("export_state_dir=").unwrap().fuse.export_state_dir.is_empty());
    with_opts("max_background=16,congestion_threshold=0").unwrap();
}

#[test]
fn validate_checks_configs_built_in_code() {
    let mut c = expected_default();
    c.fuse.max_write = 100;
    assert_eq!(c.validate().unwrap_err().key(), Some("fuse.max_write"));
    let mut c = expected_default();
    c.cache.entry_timeout = Duration::from_secs(400 * 24 * 3600);
    assert_eq!(c.validate().unwrap_err().key(), Some("cache.entry_timeout"));
    let mut c = expected_default();
    c.transport.workers = 5000;
    assert_eq!(c.validate().unwrap_err().key(), Some("transport.workers"));
    let mut c = expected_default();
    c.subtype = "x,y".into();
    assert_eq!(c.validate().unwrap_err().key(), Some("subtype"));
    let mut c = expected_default();
    c.fuse.writeback_cache = true;
    assert_eq!(c.validate().unwrap_err().key(), Some("offload.passthrough"));
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let err = from_toml_str("source = \"/srv\"\nmountpoint = /mnt\n").unwrap_err();
    assert!(err.is_syntax());
    assert_eq!(err.key(), None);
    assert!(err.to_string().contains("line 2, column"), "{err}");
}

#[test]
fn errors_are_std_errors() {
    fn takes(_: &dyn std::error::Error) {}
    takes(&with_opts("bogus").unwrap_err());
}

#[test]
fn source_option_over_a_positional_tag_keeps_the_tag_as_fsname() {
    let tag = Path::new("non1");
    let mnt = Path::new("/mnt/test");
    let c = build(None, Some(tag), Some(mnt), &opts("source=/home/test/test")).unwrap();
    assert_eq!(c.source, Path::new("/home/test/test"));
    assert_eq!(c.fsname, "non1");
    // An explicit fsname wins, in either order.
    let c = build(None, Some(tag), Some(mnt), &opts("fsname=data,source=/srv")).unwrap();
    assert_eq!(c.fsname, "data");
    // Without the override the positional is the source and fsname stays unset.
    let c = build(None, Some(Path::new("/srv")), Some(mnt), &[]).unwrap();
    assert_eq!((c.source.as_path(), c.fsname.as_str()), (Path::new("/srv"), ""));
}
