//! ringfs server library: the passthrough file system and the pieces of the binary.
#![deny(clippy::undocumented_unsafe_blocks)]
pub mod cli;
pub mod failover;
pub mod fs;
pub mod metrics;
pub mod run;
pub mod service;
pub mod upgrade;

/// What tells this build apart from others of the same version: `RINGFS_BUILD_ID` at build time
/// (a package build sets it; the cross-build upgrade test builds a second binary with its own),
/// empty when unset. Shown by `ringfs --version` and as the `build` label of `ringfs_build_info`.
pub const BUILD_ID: &str = match option_env!("RINGFS_BUILD_ID") {
    Some(b) => b,
    None => "",
};

/// `ringfs --version`'s version: the package version, and the build when it has an id.
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| match BUILD_ID {
        "" => env!("CARGO_PKG_VERSION").to_string(),
        b => format!("{} (build {b})", env!("CARGO_PKG_VERSION")),
    })
}
