//! The one error type of the crate.

use std::fmt;

/// A configuration problem, from any origin (TOML text, positional arguments
/// or `-o` options).
///
/// The message names the key as a dotted TOML path and says what is wrong,
/// for example `cache.entry_timeout: must be a number of seconds >= 0, got "abc"`.
/// Only the first problem found is reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    /// A known key holds a value we refuse.
    Invalid { key: String, problem: String },
    /// A key in the TOML table that the schema does not have.
    UnknownKey { key: String, suggestion: Option<String> },
    /// A `-o` option that is neither a key, an alias nor an ignored mount word.
    UnknownOption { option: String, suggestion: Option<String> },
    /// The TOML text does not parse; the message carries line and column.
    Syntax { message: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { kind: Kind::Invalid { key: key.into(), problem: problem.into() } }
    }

    pub(crate) fn unknown_key(key: impl Into<String>, suggestion: Option<String>) -> Self {
        Self { kind: Kind::UnknownKey { key: key.into(), suggestion } }
    }

    pub(crate) fn unknown_option(option: impl Into<String>, suggestion: Option<String>) -> Self {
        Self { kind: Kind::UnknownOption { option: option.into(), suggestion } }
    }

    pub(crate) fn syntax(err: &toml::de::Error) -> Self {
        Self { kind: Kind::Syntax { message: err.to_string().trim_end().to_owned() } }
    }

    /// The key the error is about: a dotted TOML path (`cache.entry_timeout`),
    /// or the `-o` option as written for an unknown option. `None` for TOML
    /// syntax errors.
    pub fn key(&self) -> Option<&str> {
        match &self.kind {
            Kind::Invalid { key, .. } | Kind::UnknownKey { key, .. } => Some(key),
            Kind::UnknownOption { option, .. } => Some(option),
            Kind::Syntax { .. } => None,
        }
    }

    /// True when the TOML text itself does not parse (as opposed to a parsed
    /// value being wrong). The caller may want to name the file it read.
    pub fn is_syntax(&self) -> bool {
        matches!(self.kind, Kind::Syntax { .. })
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Invalid { key, problem } => write!(f, "{key}: {problem}"),
            Kind::UnknownKey { key, suggestion } => {
                write!(f, "unknown key {key:?}")?;
                if let Some(s) = suggestion {
                    write!(f, " (did you mean {s:?}?)")?;
                }
                Ok(())
            }
            Kind::UnknownOption { option, suggestion } => {
                write!(f, "unknown option {option:?} in -o")?;
                if let Some(s) = suggestion {
                    write!(f, " (did you mean {s:?}?)")?;
                }
                Ok(())
            }
            Kind::Syntax { message } => f.write_str(message),
        }
    }
}

impl std::error::Error for ConfigError {}
