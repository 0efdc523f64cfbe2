//! ringfs mount configuration: the schema, TOML and `-o` options, merged and
//! validated.
//!
//! Sources merge in this order, later winning: TOML text, then the positional
//! source and mountpoint, then `-o` options. All of them land in one
//! `toml::Table`, which is checked against the key list, deserialized and
//! validated, so an error reads the same whatever its origin and always
//! names the key as a dotted path.
//!
//! **Architecture Invariant:** this crate is pure. It does not touch the file
//! system (not even to canonicalize a path), read the environment, log, or
//! start anything; callers pass in the text and arguments they have read.
#![deny(clippy::undocumented_unsafe_blocks)]

mod error;
mod options;
mod schema;
mod types;

#[cfg(test)]
mod tests;

use std::path::Path;

use toml::{Table, Value};

pub use error::ConfigError;
pub use options::parse_mount_options;
pub use types::{
    CacheConfig, CoherenceMode, Config, EbpfConfig, FuseAttach, FuseConfig, LogConfig, LogLevel, MetricsConfig,
    MountFlags, OffloadConfig, ParseKeywordError, ReaddirplusMode, TransportConfig, TransportMode,
};

/// Parses and validates a complete configuration from TOML text.
///
/// Same as [`build`] with only the text: `source` and `mountpoint` must be
/// in it.
pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
    build(Some(text), None, None, &[])
}

/// Merges the configuration sources and validates the result.
///
/// Precedence, lowest first: `base_toml` (the config file's text, if any),
/// then `source` and `mountpoint` (the positional arguments), then `options`
/// in order (the `-o` pairs from [`parse_mount_options`]; later wins).
///
/// When a positional `source` is overridden by a `source=` option (the
/// convention of mount(8) lines such as `mount -t fuse.ringfs tag /mnt -o
/// source=/srv/data`), the positional names the mount: it becomes `fsname`
/// unless `fsname` is set, so /proc/mounts shows what mount(8) was given.
///
/// Paths are taken as given (relative ones too) and must be valid UTF-8.
pub fn build(
    base_toml: Option<&str>,
    source: Option<&Path>,
    mountpoint: Option<&Path>,
    options: &[(String, String)],
) -> Result<Config, ConfigError> {
    let mut table = match base_toml {
        Some(text) => text.parse::<Table>().map_err(|e| ConfigError::syntax(&e))?,
        None => Table::new(),
    };
    for (name, path) in [("source", source), ("mountpoint", mountpoint)] {
        if let Some(path) = path {
            options::set(&mut table, name, Value::String(utf8_path(name, path)?.to_owned()))?;
        }
    }
    for (name, value) in options {
        options::apply_option(&mut table, name, value)?;
    }
    if let Some(tag) = source {
        let overridden = options.iter().any(|(n, _)| n == "source");
        if overridden && !table.contains_key("fsname") {
            table.insert("fsname".into(), Value::String(utf8_path("source", tag)?.to_owned()));
        }
    }

    schema::check_table(&table)?;
    // The schema check has vetted every key and value, so a failure here is
    // a gap between the schema and the types; report it all the same.
    let config: Config =
        table.try_into().map_err(|e: toml::de::Error| ConfigError::invalid("config", e.message().to_owned()))?;
    config.check_relations()?;
    Ok(config)
}

/// The configuration as TOML text, every key included, durations as float
/// seconds and `metrics.addr = ""` when metrics are off. Parsing it back with
/// [`from_toml_str`] gives the same `Config`.
pub fn to_toml_string(config: &Config) -> String {
    toml::to_string(config).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
}

impl Config {
    /// Checks every key's value and the rules between keys, as [`build`]
    /// does; for a `Config` built or changed in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, path) in [("source", &self.source), ("mountpoint", &self.mountpoint)] {
            utf8_path(name, path)?;
        }
        let table =
            Table::try_from(self).map_err(|e| ConfigError::invalid("config", format!("cannot be represented: {e}")))?;
        schema::check_table(&table)?;
        self.check_relations()
    }

    /// The rules that involve more than one key.
    fn check_relations(&self) -> Result<(), ConfigError> {
        if self.source.as_os_str() == self.mountpoint.as_os_str() {
            return Err(ConfigError::invalid(
                "mountpoint",
                format!("must differ from source (both are {:?})", self.source),
            ));
        }
        let fuse = &self.fuse;
        if fuse.congestion_threshold > fuse.max_background {
            return Err(ConfigError::invalid(
                "fuse.congestion_threshold",
                format!(
                    "must be at most fuse.max_background ({}), got {}; \
                     or 0 for 3/4 of max_background",
                    fuse.max_background, fuse.congestion_threshold
                ),
            ));
        }
        if !fuse.export_state_dir.is_empty() && !fuse.export_state_dir.starts_with('/') {
            return Err(ConfigError::invalid(
                "fuse.export_state_dir",
                format!("must be an absolute path or \"\", got {:?}", fuse.export_state_dir),
            ));
        }
        if self.allow_other && !self.default_permissions {
            return Err(ConfigError::invalid(
                "default_permissions",
                "cannot be false together with allow_other = true: the kernel's FUSE module then \
                 checks no permissions itself, and some accesses never reach the server to be \
                 checked: path walks through cached entries (a 0700 directory's files become \
                 reachable by other users) and opens of device nodes and FIFOs; keep \
                 default_permissions = true (the kernel checks mode bits and POSIX ACLs), or \
                 drop allow_other (only the mounting user can then reach the mount)",
            ));
        }
        if self.offload.passthrough && fuse.writeback_cache {
            return Err(ConfigError::invalid(
                "offload.passthrough",
                "cannot be true together with fuse.writeback_cache = true: \
                 the kernel disables passthrough when writeback cache is on: \
                 set one of them to false",
            ));
        }
        Ok(())
    }
}

fn utf8_path<'p>(name: &str, path: &'p Path) -> Result<&'p str, ConfigError> {
    path.to_str()
        .ok_or_else(|| ConfigError::invalid(name, format!("must be valid UTF-8, got {}", path.to_string_lossy())))
}
