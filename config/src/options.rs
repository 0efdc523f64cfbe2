//! `-o` mount options: splitting, key resolution and value conversion.
//!
//! An option name resolves, in this order, as
//! 1. a full dotted key (`cache.entry_timeout`, `ro`),
//! 2. an alias from [`ALIASES`] (`transport=uring`, `rw`, `suid`),
//! 3. a mount(8)/fstab word from [`IGNORED`], or any `x-*` word, which is dropped,
//! 4. `section_leaf` (`metrics_addr`, `transport_queue_depth`),
//! 5. a bare leaf name when exactly one key has it (`entry_timeout`, `passthrough`).
//!
//! Anything else is an error naming the option.

use toml::{Table, Value};

use crate::error::ConfigError;
use crate::schema::{self, Key, Kind, KEYS};

/// How an alias maps onto a key.
#[derive(Clone, Copy, Debug)]
enum Alias {
    /// The value goes to this key unchanged.
    Same(&'static str),
    /// A boolean whose negation goes to this key.
    Negated(&'static str),
}

/// `-o` words that are not key names but stand for keys.
const ALIASES: &[(&str, Alias)] = &[
    // `transport=uring`: the section name for its main choice.
    ("transport", Alias::Same("transport.mode")),
    // mount(8) and fstab often spell out the defaults; each clears its opposite.
    ("rw", Alias::Negated("ro")),
    ("suid", Alias::Negated("nosuid")),
    ("dev", Alias::Negated("nodev")),
    ("exec", Alias::Negated("noexec")),
    ("atime", Alias::Negated("noatime")),
    ("relatime", Alias::Negated("strictatime")),
    ("diratime", Alias::Negated("nodiratime")),
];

/// Standard mount(8)/fstab words that mean nothing to ringfs and are dropped,
/// each with the reason. (`rw`, `suid`, `dev`, `exec`, `atime`, `relatime`, `diratime`
/// and their opposites are recorded instead: see [`ALIASES`] and the top-level keys.) Any word
/// starting with `x-` is dropped too: those are for user-space tools.
pub(crate) const IGNORED: &[(&str, &str)] = &[
    ("defaults", "fstab placeholder for the default options"),
    ("auto", "read by mount -a, not by the file system"),
    ("noauto", "read by mount -a, not by the file system"),
    ("user", "mount(8)'s permission check for user mounts"),
    ("nouser", "mount(8)'s permission check for user mounts"),
    ("users", "mount(8)'s permission check for user mounts"),
    ("owner", "mount(8)'s permission check for user mounts"),
    ("group", "mount(8)'s permission check for user mounts"),
    ("nofail", "read by mount(8) and systemd at boot"),
    ("_netdev", "read by systemd to order network mounts"),
    ("comment", "fstab annotation for user-space tools"),
    ("async", "the default; FUSE has no sync mount mode of ours"),
    ("lazytime", "a property of the backing file system's super block"),
];

/// Splits a `-o` argument: a comma-separated list of `key` or `key=value`.
///
/// A bare `key` means `key=true`. Empty items (`a,,b`, a trailing comma) are
/// skipped. A backslash escapes the next character, so a value may contain a
/// comma as `\,` (as in libfuse). No name is checked here; [`crate::build`]
/// does that.
pub fn parse_mount_options(opts: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = opts.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.push(chars.next().unwrap_or('\\')),
            ',' => items.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    items.push(current);

    // The first '=' separates name and value: names never contain one,
    // values may.
    let mut out = Vec::new();
    for item in items.into_iter().filter(|i| !i.is_empty()) {
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => (item.clone(), "true".to_owned()),
        };
        if name.is_empty() {
            return Err(ConfigError::invalid("-o", format!("option {item:?} has no name before '='")));
        }
        out.push((name, value));
    }
    Ok(out)
}

/// What an option name stands for.
#[derive(Debug)]
enum Target {
    Key(&'static Key),
    Negated(&'static Key),
    Ignored,
}

fn resolve(name: &str) -> Result<Target, ConfigError> {
    if let Some(k) = schema::find(name) {
        return Ok(Target::Key(k));
    }
    if let Some((_, alias)) = ALIASES.iter().find(|(a, _)| *a == name) {
        let (path, negated) = match *alias {
            Alias::Same(p) => (p, false),
            Alias::Negated(p) => (p, true),
        };
        let k = schema::find(path).expect("every alias names a key of the schema");
        return Ok(if negated { Target::Negated(k) } else { Target::Key(k) });
    }
    if name.starts_with("x-") || IGNORED.iter().any(|(w, _)| *w == name) {
        return Ok(Target::Ignored);
    }
    if let Some(k) = KEYS.iter().find(|k| k.section().is_some_and(|s| underscore_form(s, k.leaf()) == name)) {
        return Ok(Target::Key(k));
    }
    let mut by_leaf = KEYS.iter().filter(|k| k.leaf() == name);
    match (by_leaf.next(), by_leaf.next()) {
        (Some(k), None) => Ok(Target::Key(k)),
        (Some(_), Some(_)) => {
            let paths: Vec<&str> = KEYS.iter().filter(|k| k.leaf() == name).map(|k| k.path).collect();
            Err(ConfigError::invalid(name, format!("ambiguous option, write one of {}", paths.join(", "))))
        }
        (None, _) => Err(ConfigError::unknown_option(name, suggest_option(name))),
    }
}

fn underscore_form(section: &str, leaf: &str) -> String {
    format!("{section}_{leaf}")
}

/// A close accepted spelling for an unknown option.
fn suggest_option(name: &str) -> Option<String> {
    let mut spellings: Vec<String> = Vec::new();
    for k in KEYS {
        spellings.push(k.path.to_owned());
        if let Some(s) = k.section() {
            spellings.push(underscore_form(s, k.leaf()));
            spellings.push(k.leaf().to_owned());
        }
    }
    spellings.extend(ALIASES.iter().map(|(a, _)| (*a).to_owned()));
    schema::closest(name, spellings.iter().map(String::as_str)).map(str::to_owned)
}

/// Applies one `-o` option to the merged table.
pub(crate) fn apply_option(table: &mut Table, name: &str, value: &str) -> Result<(), ConfigError> {
    match resolve(name)? {
        Target::Ignored => Ok(()),
        Target::Key(k) => set(table, k.path, convert(k.kind, value)),
        Target::Negated(k) => {
            let b = parse_bool(value)
                .ok_or_else(|| ConfigError::invalid(name, format!("must be true or false, got {value:?}")))?;
            set(table, k.path, Value::Boolean(!b))
        }
    }
}

/// Turns an option string into the TOML type its key expects. A string that
/// does not convert is kept as a string, so the schema check reports it
/// exactly as it would a wrong value in the TOML file.
fn convert(kind: Kind, value: &str) -> Value {
    let fallback = || Value::String(value.to_owned());
    match kind {
        Kind::Bool => parse_bool(value).map_or_else(fallback, Value::Boolean),
        Kind::Seconds => value.parse::<f64>().map_or_else(|_| fallback(), Value::Float),
        Kind::Int { .. } => value.parse::<i64>().map_or_else(|_| fallback(), Value::Integer),
        Kind::Path | Kind::Text | Kind::Word | Kind::Keyword(_) | Kind::AddrOrEmpty => fallback(),
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Sets a dotted path (one dot at most) in the table, creating the section.
pub(crate) fn set(table: &mut Table, path: &str, value: Value) -> Result<(), ConfigError> {
    let Some((section, leaf)) = path.split_once('.') else {
        table.insert(path.to_owned(), value);
        return Ok(());
    };
    let entry = table.entry(section.to_owned()).or_insert_with(|| Value::Table(Table::new()));
    match entry {
        Value::Table(t) => {
            t.insert(leaf.to_owned(), value);
            Ok(())
        }
        other => Err(schema::not_a_table(section, other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[test]
    fn splits_lists() {
        assert_eq!(
            parse_mount_options("ro,max_write=4096,,fsname=a\\,b,").unwrap(),
            pairs(&[("ro", "true"), ("max_write", "4096"), ("fsname", "a,b")])
        );
        assert_eq!(parse_mount_options("").unwrap(), pairs(&[]));
        assert_eq!(parse_mount_options("metrics.addr=").unwrap(), pairs(&[("metrics.addr", "")]));
        assert_eq!(parse_mount_options("a=b=c").unwrap(), pairs(&[("a", "b=c")]));
        let err = parse_mount_options("=x").unwrap_err();
        assert_eq!(err.key(), Some("-o"));
    }

    #[test]
    fn every_ignored_word_and_alias_resolves() {
        for (w, _) in IGNORED {
            assert!(matches!(resolve(w), Ok(Target::Ignored)), "{w}");
            // An ignored word must not shadow a key.
            assert!(schema::find(w).is_none(), "{w}");
        }
        for (a, _) in ALIASES {
            assert!(!matches!(resolve(a), Ok(Target::Ignored)), "{a}");
        }
    }

    #[test]
    fn bools() {
        for t in ["true", "1", "yes", "YES", "on"] {
            assert_eq!(parse_bool(t), Some(true));
        }
        for f in ["false", "0", "no", "off"] {
            assert_eq!(parse_bool(f), Some(false));
        }
        assert_eq!(parse_bool("maybe"), None);
    }
}
