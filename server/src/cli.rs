//! The command line of the `ringfs` binary.
//!
//! Forms:
//!
//! ```text
//! ringfs mount --config FILE [SOURCE [MOUNTPOINT]] [-o OPTS]... [-f|-b]
//! ringfs mount SOURCE MOUNTPOINT [-o OPTS]... [-f|-b]
//! ringfs check-config FILE [-o OPTS]...
//! ringfs SOURCE MOUNTPOINT [-o OPTS]... [-f|-b]
//! ringfs man | ringfs completions SHELL
//! ```
//!
//! The last is the mount-helper form: `mount -t fuse.ringfs` and fstab lines
//! of type `fuse.ringfs` go through mount.fuse3, which runs
//! `ringfs SOURCE MOUNTPOINT -o OPTS`. It backgrounds by default, like other
//! FUSE programs; `ringfs mount` stays in the foreground unless `-b`.
//!
//! This layer reads the config file; merging and validation are the
//! `config` crate's ([`ringfs_config::build`]): file < positional arguments < `-o`.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Args, Parser, Subcommand};

/// What the command line asks for, with the configuration already merged
/// and validated.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Mount and serve.
    Mount {
        /// The validated configuration.
        config: ringfs_config::Config,
        /// Detach from the terminal once mounted.
        background: bool,
        /// Switch on FUSE over io_uring in the kernel (`enable_uring` module parameter, global
        /// to the machine) before mounting: an explicit opt-in, never done silently.
        enable_uring: bool,
    },
    /// `-o remount,...` (as `mount -o remount,ro MOUNTPOINT` runs the helper): change the flags
    /// of the existing mount on `mountpoint` and exit; the running server is not touched.
    Remount {
        /// The mount to change.
        mountpoint: PathBuf,
        /// The flags it gets.
        flags: ringfs_transport::mount::RemountFlags,
    },
    /// Print the effective configuration ([`ringfs_config::to_toml_string`]) and
    /// exit 0.
    CheckConfig {
        /// The validated configuration.
        config: ringfs_config::Config,
    },
    /// Ask the server of a mount to hand it over to a new server process (live upgrade) and
    /// print the outcome.
    Upgrade {
        /// The mount.
        mountpoint: PathBuf,
        /// The binary to start (default: the running server's executable path, as now installed).
        binary: Option<PathBuf>,
        /// Upgrade an io_uring mount although a request in flight may fail (ECANCELED).
        force: bool,
    },
    /// Print a document generated from this command line ([`man_page`], [`completions`]) and
    /// exit 0.
    Print {
        /// The text to print.
        text: String,
    },
}

/// Why the command line did not yield a [`Command`]: a message to print and
/// the exit code.
///
/// Code 0 is help or version output, to print verbatim on stdout (it ends in
/// a newline). Any other code is an error for stderr: usage errors, an
/// unreadable config file and invalid configuration all exit with
/// [`CliError::USAGE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CliError {
    /// Process exit code.
    pub code: i32,
    /// What to print. Error messages carry no `error:` prefix.
    pub message: String,
}

impl CliError {
    /// Exit code of a bad command line or configuration (as clap uses).
    pub const USAGE: i32 = 2;

    fn usage(message: String) -> Self {
        Self { code: Self::USAGE, message }
    }

    fn from_clap(err: clap::Error) -> Self {
        let code = err.exit_code();
        let rendered = err.render().to_string();
        let message = if code == 0 {
            rendered
        } else {
            rendered.strip_prefix("error: ").unwrap_or(&rendered).trim_end().to_owned()
        };
        Self { code, message }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message.trim_end())
    }
}

impl std::error::Error for CliError {}

const AFTER_HELP: &str = "\
Examples:
  ringfs mount /srv/data /mnt/data -o ro,entry_timeout=5
  ringfs mount --config /etc/ringfs/data.toml
  ringfs check-config /etc/ringfs/data.toml -o transport=dev-fuse
  /etc/fstab:  /srv/data  /mnt/data  fuse.ringfs  allow_other,nosuid  0 0

-o takes any config key as `cache.entry_timeout=5`, `cache_entry_timeout=5` or,
when unique, `entry_timeout=5`; a bare key means true. See ringfs.example.toml.";

const OPTIONS_HELP: &str = "\
-o takes any config key as `cache.entry_timeout=5`, `cache_entry_timeout=5` or,
when unique, `entry_timeout=5`; a bare key means true. mount(8) words such as
`defaults`, `nofail` or `x-*` are accepted and ignored.";

#[derive(Debug, Parser)]
#[command(
    name = "ringfs",
    bin_name = "ringfs",
    version = crate::version(),
    about = "Mount a directory through FUSE, served over io_uring or /dev/fuse.",
    override_usage = "ringfs mount --config FILE [SOURCE [MOUNTPOINT]] [-o OPTS]... [-f|-b]\n       \
                      ringfs mount SOURCE MOUNTPOINT [-o OPTS]... [-f|-b]\n       \
                      ringfs check-config FILE [-o OPTS]...\n       \
                      ringfs SOURCE MOUNTPOINT [-o OPTS]... [-f|-b]\n       \
                      ringfs man | ringfs completions SHELL",
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,

    /// Backing directory (mount-helper form; backgrounds unless -f).
    #[arg(value_name = "SOURCE", required = true)]
    source: Option<PathBuf>,

    /// Where to mount it.
    #[arg(value_name = "MOUNTPOINT", required = true)]
    mountpoint: Option<PathBuf>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Mount SOURCE on MOUNTPOINT, from a config file, arguments and -o options.
    #[command(after_help = OPTIONS_HELP)]
    Mount {
        /// TOML config file; SOURCE, MOUNTPOINT and -o override its values.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,

        /// Backing directory (required without --config).
        #[arg(value_name = "SOURCE", required_unless_present = "config")]
        source: Option<PathBuf>,

        /// Where to mount it (required without --config).
        #[arg(value_name = "MOUNTPOINT", required_unless_present = "config")]
        mountpoint: Option<PathBuf>,

        #[command(flatten)]
        run: RunArgs,
    },
    /// Validate a config file and print the effective configuration as TOML.
    #[command(after_help = OPTIONS_HELP)]
    CheckConfig {
        /// TOML config file.
        #[arg(value_name = "FILE")]
        file: PathBuf,

        #[command(flatten)]
        options: OptionArgs,
    },
    /// Hand a mount over to a new server process without unmounting it (live upgrade): open
    /// files stay open; on the classic channel no system call fails. SIGHUP to the server does the same.
    Upgrade {
        /// The mount point of a running ringfs server.
        #[arg(value_name = "MOUNTPOINT")]
        mountpoint: PathBuf,

        /// Start this binary (default: the server's own executable path, re-read, so a package
        /// upgrade that replaced it is picked up).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,

        /// On a FUSE-over-io_uring mount, upgrade anyway: this kernel cannot take ring entries
        /// back, and a request in flight may then fail with ECANCELED (rare). The classic
        /// channel needs no such flag.
        #[arg(long)]
        force: bool,
    },
    /// Print the manual page (roff, section 8) generated from this command line.
    Man,
    /// Print a shell completion script for SHELL.
    Completions {
        /// The shell.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
struct OptionArgs {
    /// Comma-separated options, `key` or `key=value` (repeatable; later wins).
    #[arg(short = 'o', value_name = "OPTS", action = ArgAction::Append)]
    options: Vec<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    options: OptionArgs,

    /// Stay in the foreground.
    #[arg(short, long, conflicts_with = "background")]
    foreground: bool,

    /// Detach once mounted.
    #[arg(short, long)]
    background: bool,

    /// Write 1 to /sys/module/fuse/parameters/enable_uring first (machine-wide).
    #[arg(long)]
    enable_uring: bool,
}

/// Parses the command line (`args` starts with the program name, as from
/// [`std::env::args_os`]), reads the config file if one is named, and builds
/// the validated configuration.
pub fn parse_args<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, CliError> {
    let cli = Cli::try_parse_from(args).map_err(CliError::from_clap)?;
    match cli.command {
        Some(Sub::Mount { config: None, mountpoint: Some(mountpoint), run, .. }) if is_remount(&run.options) => {
            Ok(remount(mountpoint, &run.options))
        }
        None if is_remount(&cli.run.options) => match cli.mountpoint.or(cli.source) {
            Some(mountpoint) => Ok(remount(mountpoint, &cli.run.options)),
            None => Err(CliError::usage("remount: which mount point?".into())),
        },
        Some(Sub::Mount { config, source, mountpoint, run }) => {
            let config = load(config.as_deref(), source, mountpoint, &run.options)?;
            Ok(Command::Mount { config, background: run.background, enable_uring: run.enable_uring })
        }
        Some(Sub::CheckConfig { file, options }) => {
            let config = load(Some(&file), None, None, &options)?;
            Ok(Command::CheckConfig { config })
        }
        Some(Sub::Upgrade { mountpoint, binary, force }) => Ok(Command::Upgrade { mountpoint, binary, force }),
        Some(Sub::Man) => Ok(Command::Print { text: man_page() }),
        Some(Sub::Completions { shell }) => Ok(Command::Print { text: completions(shell) }),
        None => {
            let config = load(None, cli.source, cli.mountpoint, &cli.run.options)?;
            Ok(Command::Mount { config, background: !cli.run.foreground, enable_uring: cli.run.enable_uring })
        }
    }
}

/// The manual page, ringfs(8), in roff: the command line's help, its subcommands, and the
/// configuration keys' reference (see `config/ringfs.example.toml`).
pub fn man_page() -> String {
    use clap::CommandFactory;
    let cmd = Cli::command().about(
        "Mount a directory through FUSE, served over io_uring or /dev/fuse, with kernel \
         passthrough for data and the kernel's caches for metadata.",
    );
    let man = clap_mangen::Man::new(cmd).section("8");
    let mut out = Vec::new();
    man.render(&mut out).expect("rendering into memory cannot fail");
    String::from_utf8(out).expect("roff output is UTF-8")
}

/// A completion script for `shell`, generated from the command line.
pub fn completions(shell: clap_complete::Shell) -> String {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "ringfs", &mut out);
    String::from_utf8(out).expect("completion scripts are UTF-8")
}

/// Whether the `-o` lists ask for a remount (the word `remount`).
fn is_remount(options: &OptionArgs) -> bool {
    options.options.iter().any(|list| list.split(',').any(|w| w.trim() == "remount"))
}

fn remount(mountpoint: PathBuf, options: &OptionArgs) -> Command {
    let flags = ringfs_transport::mount::RemountFlags::from_options(&options.options.join(","));
    Command::Remount { mountpoint, flags }
}

/// Reads the file (if any), splits the `-o` lists and builds the config.
fn load(
    file: Option<&Path>,
    source: Option<PathBuf>,
    mountpoint: Option<PathBuf>,
    options: &OptionArgs,
) -> Result<ringfs_config::Config, CliError> {
    let text = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| CliError::usage(format!("cannot read config file {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let mut pairs = Vec::new();
    for list in &options.options {
        let parsed = ringfs_config::parse_mount_options(list).map_err(|e| CliError::usage(e.to_string()))?;
        pairs.extend(parsed);
    }
    ringfs_config::build(text.as_deref(), source.as_deref(), mountpoint.as_deref(), &pairs).map_err(|e| {
        match file {
            // Only a syntax error is certainly in the file; other errors name
            // a key, which may have come from an argument or -o.
            Some(path) if e.is_syntax() => CliError::usage(format!("config file {}: {e}", path.display())),
            _ => CliError::usage(e.to_string()),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;
    use std::time::Duration;

    use ringfs_config::TransportMode;

    use super::*;

    #[test]
    fn man_page_and_completions_come_from_the_command_line() {
        let Ok(Command::Print { text }) = parse(&["man"]) else { panic!("ringfs man") };
        assert!(text.starts_with(".ie") || text.contains(".TH ringfs 8"), "{text}");
        assert!(text.contains("check\\-config") || text.contains("check-config"), "subcommands are listed");
        for shell in ["bash", "zsh", "fish"] {
            let Ok(Command::Print { text }) = parse(&["completions", shell]) else { panic!("completions {shell}") };
            assert!(text.contains("check-config"), "{shell}: {text}");
        }
        assert_eq!(err(&["completions", "tcsh"]).code, CliError::USAGE);
    }

    #[test]
    fn remount_form() {
        // mount(8) runs the helper as `ringfs SOURCE MOUNTPOINT -o ...,remount,...`.
        match parse(&["/srv", "/mnt", "-o", "ro,relatime,remount,user_id=0,dev,suid"]) {
            Ok(Command::Remount { mountpoint, flags }) => {
                assert_eq!(mountpoint, Path::new("/mnt"));
                assert!(flags.read_only && !flags.nosuid);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(&["mount", "/srv", "/mnt", "-o", "remount,rw"]), Ok(Command::Remount { .. })));
    }

    fn parse(args: &[&str]) -> Result<Command, CliError> {
        parse_args(std::iter::once("ringfs").chain(args.iter().copied()).map(OsString::from))
    }

    fn mount(args: &[&str]) -> (ringfs_config::Config, bool) {
        match parse(args) {
            Ok(Command::Mount { config, background, .. }) => (config, background),
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn err(args: &[&str]) -> CliError {
        match parse(args) {
            Err(e) => e,
            Ok(c) => panic!("{args:?} parsed: {c:?}"),
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    const FILE: &str = "source = \"/file/src\"\nmountpoint = \"/file/mnt\"\n[cache]\nentry_timeout = 5\n";

    #[test]
    fn mount_with_positionals() {
        let (c, background) = mount(&["mount", "/srv", "/mnt", "-o", "ro,entry_timeout=2", "-o", "transport=dev-fuse"]);
        assert_eq!(c.source, Path::new("/srv"));
        assert_eq!(c.mountpoint, Path::new("/mnt"));
        assert!(c.ro);
        assert_eq!(c.cache.entry_timeout, Duration::from_secs(2));
        assert_eq!(c.transport.mode, TransportMode::DevFuse);
        assert!(!background);
        assert!(mount(&["mount", "/srv", "/mnt", "-b"]).1);
        assert!(mount(&["mount", "/srv", "/mnt", "--background"]).1);
        assert!(!mount(&["mount", "-f", "/srv", "/mnt"]).1);
    }

    #[test]
    fn mount_with_config_file() {
        let f = file(FILE);
        let path = f.path().to_str().unwrap();
        let (c, background) = mount(&["mount", "--config", path]);
        assert_eq!(c.source, Path::new("/file/src"));
        assert_eq!(c.cache.entry_timeout, Duration::from_secs(5));
        assert!(!background);
        // Positional arguments, then -o, override the file.
        let (c, _) = mount(&["mount", "-c", path, "/arg/src", "/arg/mnt", "-o", "entry_timeout=1"]);
        assert_eq!(c.source, Path::new("/arg/src"));
        assert_eq!(c.mountpoint, Path::new("/arg/mnt"));
        assert_eq!(c.cache.entry_timeout, Duration::from_secs(1));
        let (c, _) = mount(&["mount", "--config", path, "/arg/src"]);
        assert_eq!(c.source, Path::new("/arg/src"));
        assert_eq!(c.mountpoint, Path::new("/file/mnt"));
        let (c, _) = mount(&["mount", "--config", path, "-o", "source=/opt/src"]);
        assert_eq!(c.source, Path::new("/opt/src"));
    }

    #[test]
    fn mount_helper_form() {
        // As mount.fuse3 runs it for an fstab line of type fuse.ringfs.
        let (c, background) = mount(&["/srv", "/mnt", "-o", "rw,nosuid,nodev,allow_other,_netdev"]);
        assert_eq!(c.source, Path::new("/srv"));
        assert!(c.allow_other && !c.ro && c.mount_flags.nosuid && c.mount_flags.nodev);
        assert!(background);
        assert!(!mount(&["/srv", "/mnt", "-f"]).1);
        assert!(!mount(&["-f", "/srv", "/mnt", "-o", "ro"]).1);
        assert!(mount(&["/srv", "/mnt", "-b"]).1);
    }

    #[test]
    fn check_config() {
        let f = file(FILE);
        let path = f.path().to_str().unwrap();
        match parse(&["check-config", path, "-o", "max_write=65536", "-o", "rw"]) {
            Ok(Command::CheckConfig { config }) => {
                assert_eq!(config.fuse.max_write, 65536);
                assert_eq!(config.cache.entry_timeout, Duration::from_secs(5));
            }
            other => panic!("{other:?}"),
        }
        let e = err(&["check-config", path, "-o", "max_write=5"]);
        assert_eq!(e.code, CliError::USAGE);
        assert!(e.message.starts_with("fuse.max_write: must be a multiple of 4096"), "{e}");
        // FILE is required.
        assert_eq!(err(&["check-config"]).code, CliError::USAGE);
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let e = err(&["mount", "--config", "/nonexistent/ringfs.toml"]);
        assert_eq!(e.code, CliError::USAGE);
        assert!(e.message.starts_with("cannot read config file /nonexistent/ringfs.toml: "), "{e}");
        let f = file("source = \n");
        let path = f.path().to_str().unwrap();
        let e = err(&["check-config", path]);
        assert_eq!(e.code, CliError::USAGE);
        assert!(e.message.starts_with(&format!("config file {path}: ")), "{e}");
        assert!(e.message.contains("line 1"), "{e}");
        let f = file("mountpoint = \"/mnt\"\n");
        let e = err(&["check-config", f.path().to_str().unwrap()]);
        assert_eq!(e.message, "source: required (give it in the config file or as the first argument)");
    }

    #[test]
    fn option_errors() {
        let e = err(&["/srv", "/mnt", "-o", "bogus"]);
        assert_eq!(e.code, CliError::USAGE);
        assert_eq!(e.message, r#"unknown option "bogus" in -o"#);
        let e = err(&["mount", "/srv", "/mnt", "-o", "=x"]);
        assert_eq!(e.code, CliError::USAGE);
        let e = err(&["mount", "/same", "/same"]);
        assert!(e.message.starts_with("mountpoint: must differ from source"), "{e}");
    }

    #[test]
    fn usage_errors() {
        for args in [
            &[][..],
            &["/srv"],
            &["mount"],
            &["mount", "/srv"],
            &["mount", "/srv", "/mnt", "-f", "-b"],
            &["/srv", "/mnt", "extra"],
            &["mount", "/srv", "/mnt", "--bogus"],
            &["-o", "ro", "mount", "/srv", "/mnt"],
        ] {
            let e = err(args);
            assert_eq!(e.code, CliError::USAGE, "{args:?}: {e}");
            assert!(!e.message.starts_with("error:"), "{e}");
        }
    }

    #[test]
    fn help_and_version_exit_zero() {
        for args in [&["--help"][..], &["-h"], &["mount", "--help"], &["check-config", "-h"], &["-V"]] {
            let e = err(args);
            assert_eq!(e.code, 0, "{args:?}");
            assert!(e.message.ends_with('\n'), "{args:?}");
        }
        assert!(err(&["--help"]).message.contains("check-config"));
        assert!(err(&["--version"]).message.starts_with("ringfs "));
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_path_is_a_config_error() {
        use std::os::unix::ffi::OsStringExt;
        let args = ["ringfs", "mount"]
            .into_iter()
            .map(OsString::from)
            .chain([OsString::from_vec(b"/srv/\xff".to_vec()), OsString::from("/mnt")]);
        let e = parse_args(args).unwrap_err();
        assert!(e.message.starts_with("source: must be valid UTF-8"), "{e}");
    }
}
