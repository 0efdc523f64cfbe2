//! The list of keys, their types and limits, and the check of a merged
//! `toml::Table` against it.
//!
//! This table is the single place that knows what each key accepts. The same
//! check runs on the table merged from TOML text, positional arguments and
//! `-o` options, and (through serialization) in [`crate::Config::validate`],
//! so a bad value reads the same whatever its origin.

use std::net::SocketAddr;

use toml::{Table, Value};

use crate::error::ConfigError;
use crate::types::{CoherenceMode, FuseAttach, LogLevel, ReaddirplusMode, TransportMode};

/// Largest cache timeout: one year of seconds. Longer is certainly a typo,
/// and the kernel's timeouts are 64-bit seconds anyway.
pub(crate) const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// 16 MiB: the upper bound of `max_write` and `max_readahead`.
const SIXTEEN_MIB: i64 = 16 << 20;

/// What a key accepts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    /// `true` / `false`.
    Bool,
    /// A non-empty path string without NUL bytes.
    Path,
    /// Any string without NUL bytes, empty allowed.
    Text,
    /// A non-empty name of ASCII letters, digits, `.`, `_`, `-`.
    Word,
    /// Seconds as integer or float, `0..=MAX_SECONDS`.
    Seconds,
    /// An integer in `min..=max` that is a multiple of `step`.
    Int { min: i64, max: i64, step: i64 },
    /// One of a fixed set of keywords.
    Keyword(&'static [&'static str]),
    /// A socket address, or `""` for none.
    AddrOrEmpty,
}

/// One key of the schema.
#[derive(Debug)]
pub(crate) struct Key {
    /// Dotted TOML path: `source`, `cache.entry_timeout`.
    pub path: &'static str,
    /// What it accepts.
    pub kind: Kind,
    /// For required keys: the message when it is missing or empty.
    pub required: Option<&'static str>,
}

impl Key {
    /// The table part of the path (`cache`), or `None` for top-level keys.
    pub fn section(&self) -> Option<&'static str> {
        self.path.split_once('.').map(|(s, _)| s)
    }

    /// The last part of the path (`entry_timeout`).
    pub fn leaf(&self) -> &'static str {
        self.path.rsplit_once('.').map_or(self.path, |(_, l)| l)
    }
}

const fn key(path: &'static str, kind: Kind) -> Key {
    Key { path, kind, required: None }
}

const fn int(min: i64, max: i64) -> Kind {
    Kind::Int { min, max, step: 1 }
}

/// Every key, in the order of the example file. Sections are implied by the
/// dotted paths.
pub(crate) const KEYS: &[Key] = &[
    Key {
        path: "source",
        kind: Kind::Path,
        required: Some("required (give it in the config file or as the first argument)"),
    },
    Key {
        path: "mountpoint",
        kind: Kind::Path,
        required: Some("required (give it in the config file or as the second argument)"),
    },
    key("allow_other", Kind::Bool),
    key("default_permissions", Kind::Bool),
    key("lsm_labels", Kind::Bool),
    key("failover", Kind::Bool),
    key("ro", Kind::Bool),
    key("nosuid", Kind::Bool),
    key("noatime", Kind::Bool),
    key("strictatime", Kind::Bool),
    key("nodiratime", Kind::Bool),
    key("nodev", Kind::Bool),
    key("noexec", Kind::Bool),
    key("fsname", Kind::Text),
    key("subtype", Kind::Word),
    key("cache.entry_timeout", Kind::Seconds),
    key("cache.attr_timeout", Kind::Seconds),
    key("cache.negative_timeout", Kind::Seconds),
    key("cache.coherence", Kind::Keyword(CoherenceMode::NAMES)),
    key("cache.readdirplus", Kind::Keyword(ReaddirplusMode::NAMES)),
    key("cache.opendir_requests", Kind::Bool),
    key("fuse.max_write", Kind::Int { min: 4096, max: SIXTEEN_MIB, step: 4096 }),
    key("fuse.max_readahead", int(0, SIXTEEN_MIB)),
    key("fuse.max_background", int(1, 65535)),
    key("fuse.congestion_threshold", int(0, 65535)),
    key("fuse.writeback_cache", Kind::Bool),
    key("fuse.export_handles", int(0, 16_777_216)),
    key("fuse.export_state_dir", Kind::Text),
    key("transport.mode", Kind::Keyword(TransportMode::NAMES)),
    key("transport.workers", int(0, 1024)),
    key("transport.queue_depth", int(1, 1024)),
    key("transport.inline_metadata", Kind::Bool),
    key("transport.busy_poll_us", int(0, 10_000)),
    key("offload.passthrough", Kind::Bool),
    key("offload.passthrough_exclude", Kind::Text),
    key("metrics.addr", Kind::AddrOrEmpty),
    key("ebpf.enable", Kind::Bool),
    key("ebpf.demand_tracing", Kind::Bool),
    key("ebpf.fuse_attach", Kind::Keyword(FuseAttach::NAMES)),
    key("log.level", Kind::Keyword(LogLevel::NAMES)),
];

/// The key with this exact dotted path.
pub(crate) fn find(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.path == path)
}

/// True when `name` is a section (`cache`, `fuse`, ...).
pub(crate) fn is_section(name: &str) -> bool {
    KEYS.iter().any(|k| k.section() == Some(name))
}

/// Checks every key of a merged table: no unknown keys, every value of the
/// right type and within its limits, required keys present. Relations
/// between keys are checked later, on the typed [`crate::Config`].
pub(crate) fn check_table(table: &Table) -> Result<(), ConfigError> {
    // Unknown keys first: a misspelt key would otherwise surface as a
    // confusing "required" error or be silently ignored.
    for (name, value) in table {
        if is_section(name) {
            let Value::Table(section) = value else {
                return Err(not_a_table(name, value));
            };
            for inner in section.keys() {
                let path = format!("{name}.{inner}");
                if find(&path).is_none() {
                    return Err(ConfigError::unknown_key(&path, suggest_key(&path)));
                }
            }
        } else if find(name).is_none() {
            return Err(ConfigError::unknown_key(name, suggest_key(name)));
        }
    }
    for key in KEYS {
        let value = lookup(table, key);
        if let Some(hint) = key.required {
            let missing = match value {
                None => true,
                Some(Value::String(s)) => s.is_empty(),
                Some(_) => false,
            };
            if missing {
                return Err(ConfigError::invalid(key.path, hint));
            }
        }
        if let Some(value) = value {
            check_value(key.kind, value).map_err(|problem| ConfigError::invalid(key.path, problem))?;
        }
    }
    Ok(())
}

/// The error for a section name that holds something else than a table.
pub(crate) fn not_a_table(name: &str, value: &Value) -> ConfigError {
    ConfigError::invalid(name, format!("must be a table, got {value}"))
}

fn lookup<'t>(table: &'t Table, key: &Key) -> Option<&'t Value> {
    match key.section() {
        None => table.get(key.path),
        Some(section) => table.get(section)?.as_table()?.get(key.leaf()),
    }
}

/// Checks one value against its kind; the error is the problem text only.
fn check_value(kind: Kind, value: &Value) -> Result<(), String> {
    match kind {
        Kind::Bool => match value {
            Value::Boolean(_) => Ok(()),
            _ => Err(format!("must be true or false, got {value}")),
        },
        Kind::Path => match value {
            Value::String(s) if s.contains('\0') => Err("must not contain NUL bytes".to_owned()),
            Value::String(s) if s.is_empty() => Err("must not be empty".to_owned()),
            Value::String(_) => Ok(()),
            _ => Err(format!("must be a path string, got {value}")),
        },
        Kind::Text => match value {
            Value::String(s) if s.contains('\0') => Err("must not contain NUL bytes".to_owned()),
            Value::String(_) => Ok(()),
            _ => Err(format!("must be a string, got {value}")),
        },
        Kind::Word => {
            let ok = value
                .as_str()
                .is_some_and(|s| s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
            if ok {
                Ok(())
            } else {
                Err(format!("must be a name of ASCII letters, digits, '.', '_' and '-' (or empty), got {value}"))
            }
        }
        Kind::Seconds => {
            let secs = match value {
                Value::Integer(i) => Some(*i as f64),
                Value::Float(f) => Some(*f),
                _ => None,
            };
            match secs {
                Some(s) if s.is_finite() && s >= 0.0 => {
                    if s <= MAX_SECONDS {
                        Ok(())
                    } else {
                        Err(format!("must be at most {MAX_SECONDS} seconds (one year), got {value}"))
                    }
                }
                _ => Err(format!("must be a number of seconds >= 0, got {value}")),
            }
        }
        Kind::Int { min, max, step } => {
            let ok = value.as_integer().is_some_and(|i| (min..=max).contains(&i) && i % step == 0);
            if ok {
                Ok(())
            } else if step == 1 {
                Err(format!("must be an integer from {min} to {max}, got {value}"))
            } else {
                Err(format!("must be a multiple of {step} from {min} to {max}, got {value}"))
            }
        }
        Kind::Keyword(names) => {
            if value.as_str().is_some_and(|s| names.contains(&s)) {
                Ok(())
            } else {
                let list: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
                Err(format!("must be one of {}, got {value}", list.join(", ")))
            }
        }
        Kind::AddrOrEmpty => {
            let ok = value.as_str().is_some_and(|s| s.is_empty() || s.parse::<SocketAddr>().is_ok());
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "must be an address with a port such as \"127.0.0.1:9464\" or \"[::1]:9464\", \
                     or \"\" to disable, got {value}"
                ))
            }
        }
    }
}

/// A known dotted path close to an unknown one: the same leaf in another
/// place (`entry_timeout` at the top level), or a small misspelling.
pub(crate) fn suggest_key(unknown: &str) -> Option<String> {
    let leaf = unknown.rsplit_once('.').map_or(unknown, |(_, l)| l);
    if let Some(k) = KEYS.iter().find(|k| k.leaf() == leaf) {
        return Some(k.path.to_owned());
    }
    closest(unknown, KEYS.iter().map(|k| k.path)).map(str::to_owned)
}

/// The candidate within a small edit distance of `word`, if any.
pub(crate) fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 4).clamp(1, 3);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over chars, one row at a time.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("entry_timeot", "entry_timeout"), 1);
    }

    #[test]
    fn paths_are_unique_with_one_dot_at_most() {
        for k in KEYS {
            assert!(k.path.matches('.').count() <= 1, "{}", k.path);
        }
        for (i, k) in KEYS.iter().enumerate() {
            for other in &KEYS[i + 1..] {
                assert_ne!(k.path, other.path);
            }
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest_key("cache.entry_timeot").as_deref(), Some("cache.entry_timeout"));
        assert_eq!(suggest_key("entry_timeout").as_deref(), Some("cache.entry_timeout"));
        assert_eq!(suggest_key("completely_else"), None);
    }
}
