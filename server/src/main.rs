//! `ringfs`: mount a backing directory through FUSE.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::process::ExitCode;

use server::cli::{self, Command};

fn init_logging(level: &str) {
    use std::io::Write;
    let env = env_logger::Env::default().default_filter_or(level);
    let mut b = env_logger::Builder::from_env(env);
    if server::service::stderr_is_journal() {
        // journald stamps the time and reads the priority from a `<N>` prefix.
        b.format(|f, r| writeln!(f, "<{}>{}", server::service::journal_priority(r.level()), r.args()));
    } else {
        b.format_target(false);
    }
    b.init();
}

fn stderr_is_terminal_or_socket() -> bool {
    use std::os::fd::AsFd;
    let stderr = std::io::stderr();
    rustix::termios::isatty(stderr.as_fd())
        || rustix::fs::fstat(stderr.as_fd()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

fn main() -> ExitCode {
    // The kernel applies the caller's umask before it sends a mode; ours must not apply again.
    rustix::process::umask(rustix::fs::Mode::empty());
    let command = match cli::parse_args(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => {
            if e.code == 0 {
                print!("{}", e.message);
            } else {
                eprintln!("ringfs: {}", e.message.trim_end());
            }
            return ExitCode::from(e.code as u8);
        }
    };
    match command {
        Command::Remount { mountpoint, flags } => match ringfs_transport::mount::remount(&mountpoint, &flags) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringfs: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Upgrade { mountpoint, binary, force } => {
            match server::upgrade::request(&mountpoint, binary.as_deref(), force, std::time::Duration::from_secs(120)) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ringfs: upgrade {}: {e}", mountpoint.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Print { text } => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => {
            print!("{}", ringfs_config::to_toml_string(&config));
            ExitCode::SUCCESS
        }
        Command::Mount { config, background, enable_uring } => {
            let level = config.log.level.to_string();
            // A backgrounded server keeps only a journal socket as stderr (detach_stdio); until
            // it detaches it logs only errors into a file or pipe its starter reads as its own
            // output (a test harness comparing outputs, a script's log), as libfuse's daemons
            // print nothing on a successful mount. A terminal still sees the start-up lines.
            init_logging(if background && !stderr_is_terminal_or_socket() { "error" } else { &level });
            if enable_uring {
                if let Err(e) = std::fs::write(ringfs_transport::session::URING_PARAM, b"1") {
                    eprintln!("ringfs: --enable-uring: cannot write {}: {e}", ringfs_transport::session::URING_PARAM);
                    return ExitCode::FAILURE;
                }
                log::info!("FUSE over io_uring switched on in the kernel (--enable-uring)");
            }
            match server::run::run_mount(config, background) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // An error priority for the journal, which would take the line as info.
                    let prio = if server::service::stderr_is_journal() { "<3>" } else { "" };
                    eprintln!("{prio}ringfs: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
