//! The command line and the TOML configuration: `check-config`, `-o` keys, `mount --config`.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use tests::{mount_at, require_root_fuse, run_ringfs, Mount};

const T: Duration = Duration::from_secs(10);

fn toml_file(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    fs::File::create(&p).unwrap().write_all(body.as_bytes()).unwrap();
    p
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("ringfs-cfg-").tempdir_in("/tmp").unwrap()
}

fn check_config(file: &Path) -> tests::RunOutput {
    run_ringfs(&[OsString::from("check-config"), file.into()], T)
}

#[test]
fn check_config_accepts_a_valid_file_and_prints_it() {
    let d = scratch();
    let f = toml_file(
        d.path(),
        "ok.toml",
        "source = \"/srv/data\"\nmountpoint = \"/mnt/data\"\nallow_other = true\n\n[cache]\nentry_timeout = 5\n\n[metrics]\naddr = \"\"\n",
    );
    let out = check_config(&f);
    assert_eq!(out.status.code(), Some(0), "check-config of a valid file: {}", out.stderr);
    assert!(out.stdout.contains("allow_other = true"), "effective config printed:\n{}", out.stdout);
    assert!(out.stdout.contains("entry_timeout = 5"), "the file's value, not the default:\n{}", out.stdout);
    assert!(out.stdout.contains("attr_timeout"), "defaults are printed too:\n{}", out.stdout);
    // The printed effective configuration is itself a valid configuration.
    let again = toml_file(d.path(), "again.toml", &out.stdout);
    let out2 = check_config(&again);
    assert_eq!(out2.status.code(), Some(0), "{}", out2.stderr);
    assert_eq!(out2.stdout, out.stdout, "check-config output is a fixed point");
    // The shipped example is valid.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/ringfs.example.toml");
    if example.exists() {
        let out = check_config(&example);
        assert_eq!(out.status.code(), Some(0), "config/ringfs.example.toml: {}", out.stderr);
    }
}

#[test]
fn check_config_rejects_bad_files_with_exit_2() {
    let d = scratch();
    let cases = [
        ("syntax.toml", "source = \"/srv\nmountpoint = 1\n", vec!["syntax.toml"]),
        ("unknown.toml", "source = \"/a\"\nmountpoint = \"/b\"\nbogus_key = 1\n", vec!["bogus_key"]),
        (
            "unknown_nested.toml",
            "source = \"/a\"\nmountpoint = \"/b\"\n[cache]\nentry_timeot = 3\n",
            vec!["entry_timeot"],
        ),
        ("wrong_type.toml", "source = \"/a\"\nmountpoint = \"/b\"\nallow_other = \"yes\"\n", vec!["allow_other"]),
        ("wrong_type2.toml", "source = \"/a\"\nmountpoint = \"/b\"\n[fuse]\nmax_write = \"big\"\n", vec!["max_write"]),
        ("range.toml", "source = \"/a\"\nmountpoint = \"/b\"\n[fuse]\nmax_write = 1000\n", vec!["max_write"]),
        ("mode.toml", "source = \"/a\"\nmountpoint = \"/b\"\n[transport]\nmode = \"carrier-pigeon\"\n", vec!["mode"]),
    ];
    for (name, body, must_name) in cases {
        let f = toml_file(d.path(), name, body);
        let out = check_config(&f);
        assert_eq!(out.status.code(), Some(2), "{name}: exit 2; stderr: {}", out.stderr);
        assert!(!out.stderr.trim().is_empty(), "{name}: an error message");
        for what in must_name {
            assert!(out.stderr.contains(what), "{name}: the message names {what:?}: {}", out.stderr);
        }
        assert!(out.stdout.is_empty(), "{name}: nothing on stdout: {}", out.stdout);
    }
    let missing = d.path().join("missing.toml");
    let out = check_config(&missing);
    assert_eq!(out.status.code(), Some(2), "missing file: {}", out.stderr);
    assert!(out.stderr.contains("missing.toml"), "names the file: {}", out.stderr);
}

#[test]
fn unknown_or_bad_mount_option_is_rejected() {
    if !require_root_fuse("config_cli::unknown_or_bad_mount_option_is_rejected") {
        return;
    }
    let d = scratch();
    let (src, mnt) = (d.path().join("src"), d.path().join("mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    for (opt, names) in [
        ("no_such_option=1", "no_such_option"),
        ("entry_timeout=soon", "entry_timeout"),
        ("transport=carrier-pigeon", "transport"),
        ("max_write=123", "max_write"),
        ("workers=-1", "workers"),
    ] {
        let args: Vec<OsString> = vec!["mount".into(), src.clone().into(), mnt.clone().into(), "-o".into(), opt.into()];
        let out = run_ringfs(&args, T);
        assert!(!out.status.success(), "-o {opt} accepted");
        assert!(out.stderr.contains(names), "-o {opt}: the message names {names}: {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "-o {opt}: one line: {}", out.stderr);
        assert!(mount_at(&mnt).is_none(), "-o {opt}: nothing mounted");
    }
}

#[test]
fn mount_with_config_file_and_o_override() {
    if !require_root_fuse("config_cli::mount_with_config_file_and_o_override") {
        return;
    }
    let d = scratch();
    let (src, mnt) = (d.path().join("src"), d.path().join("mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(src.join("hello"), b"from config").unwrap();
    let cfg = toml_file(
        d.path(),
        "ringfs.toml",
        &format!(
            "source = {:?}\nmountpoint = {:?}\nro = true\nfsname = \"cfgmount\"\n[metrics]\naddr = \"\"\n",
            src.display().to_string(),
            mnt.display().to_string()
        ),
    );
    let args: Vec<OsString> = vec!["mount".into(), "--config".into(), cfg.clone().into()];
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let m = Mount::start_args(&src, &mnt, &refs).unwrap_or_else(|(s, e)| panic!("mount --config: {s}: {e}"));
    let info = mount_at(&mnt).unwrap();
    assert_eq!(info.source, "cfgmount", "fsname from the file");
    assert_eq!(fs::read(m.path("hello")).unwrap(), b"from config");
    let err = fs::write(m.path("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "ro = true in the file");
    drop(m);

    // `-o` wins over the file.
    let args: Vec<OsString> =
        vec!["mount".into(), "--config".into(), cfg.into(), "-o".into(), "rw,fsname=override".into()];
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let m = Mount::start_args(&src, &mnt, &refs).unwrap_or_else(|(s, e)| panic!("mount --config -o rw: {s}: {e}"));
    assert_eq!(mount_at(&mnt).unwrap().source, "override");
    fs::write(m.path("new"), b"x").unwrap();
    assert_eq!(fs::read(src.join("new")).unwrap(), b"x");
}

/// Each documented `-o` key is accepted at mount and the mount works with it.
#[test]
fn documented_mount_options_work() {
    if !require_root_fuse("config_cli::documented_mount_options_work") {
        return;
    }
    let uring = fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|s| s.trim() == "Y");
    let mut sets: Vec<Vec<&str>> = vec![
        vec!["allow_other"],
        vec!["default_permissions"],
        vec!["entry_timeout=0", "attr_timeout=0", "negative_timeout=0"],
        vec!["entry_timeout=0.5", "attr_timeout=2", "negative_timeout=1"],
        vec!["max_write=4096"],
        vec!["workers=1"],
        vec!["transport=auto"],
        vec!["transport=dev-fuse"],
        vec!["passthrough=false"],
        vec!["passthrough=true"],
        vec!["transport=dev-fuse", "passthrough=false", "workers=3"],
        vec!["allow_other,default_permissions,fsname=combined"],
    ];
    if uring {
        sets.push(vec!["transport=uring"]);
        sets.push(vec!["transport=uring", "passthrough=false"]);
    } else {
        eprintln!("note: /sys/module/fuse/parameters/enable_uring is not Y: transport=uring not tested");
    }
    let data = tests::pattern(3 * 1024 * 1024 + 7, 42);
    for opts in sets {
        let m = Mount::start(&opts);
        fs::write(m.path("f"), &data).unwrap_or_else(|e| panic!("-o {opts:?}: write: {e}"));
        assert!(fs::read(m.backing("f")).unwrap() == data, "-o {opts:?}: data in the backing file");
        assert!(fs::read(m.path("f")).unwrap() == data, "-o {opts:?}: data read back");
        fs::create_dir(m.path("d")).unwrap();
        fs::rename(m.path("f"), m.path("d/g")).unwrap();
        assert_eq!(fs::read_dir(m.path("d")).unwrap().count(), 1, "-o {opts:?}");
        assert!(m.backing("d/g").exists(), "-o {opts:?}");
    }
    // ro refuses writes with EROFS.
    let m = Mount::start(&["ro"]);
    assert_eq!(fs::write(m.path("x"), b"x").unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert_eq!(fs::create_dir(m.path("d")).unwrap_err().raw_os_error(), Some(libc::EROFS));
}

#[test]
fn short_timeouts_see_backing_changes() {
    if !require_root_fuse("config_cli::short_timeouts_see_backing_changes") {
        return;
    }
    // With zero timeouts the kernel asks again each time: changes made in the backing
    // directory are visible at once.
    let m = Mount::start(&["entry_timeout=0", "attr_timeout=0", "negative_timeout=0"]);
    assert!(fs::metadata(m.path("late")).is_err());
    fs::write(m.backing("late"), b"12").unwrap();
    assert_eq!(fs::metadata(m.path("late")).unwrap().len(), 2, "negative entry not cached");
    // (The mode, not the size: with -o writeback_cache the kernel owns a cached file's size.)
    fs::set_permissions(m.backing("late"), std::os::unix::fs::PermissionsExt::from_mode(0o604)).unwrap();
    assert_eq!(fs::metadata(m.path("late")).unwrap().mode() & 0o777, 0o604, "attributes not cached");
    fs::remove_file(m.backing("late")).unwrap();
    assert!(fs::metadata(m.path("late")).is_err(), "entry not cached");
}

#[test]
fn help_and_usage_errors() {
    let out = run_ringfs(&["--help"], T);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.contains("mount") && out.stdout.contains("check-config"), "{}", out.stdout);
    let out = run_ringfs(&["no-such-subcommand-or-path"], T);
    assert!(!out.status.success(), "a lone argument is a usage error");
    assert!(!out.stderr.is_empty());
    let out = run_ringfs(&["check-config"], T);
    assert_eq!(out.status.code(), Some(2), "check-config without a file: {}", out.stderr);
}
