//! Configuration errors: each one names file, line, column and dotted key, and says what to write.
//!
//! Errors are *collected* (see [`Collector`]) rather than returned one at a time: an operator
//! fixing a config file wants every mistake in one run, like `postfix check`, not one per restart.

use std::fmt;
use std::ops::Range;

/// One configuration mistake, located in the file, with the fix in its message.
///
/// Displays as `FILE:LINE:COLUMN: KEY: MESSAGE` (parts that do not apply are left out), for
/// example `postern.toml:12:7: listener.lan.tls: unknown value "startls"; write one of "none",
/// "starttls", "implicit"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The configuration file as given (a path, or `<embedded default>`).
    pub file: String,
    /// 1-based line, when the error has a place in the file (not for "cannot read the file").
    pub line: Option<usize>,
    /// 1-based column in characters, when `line` is set.
    pub column: Option<usize>,
    /// Dotted key such as `listener.lan.tls`; empty for TOML syntax errors.
    pub key: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every error found in one configuration, in file order. Displays one error per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The errors, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// How many errors there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are none (a `ConfigErrors` returned by the loaders is never empty).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Gathers errors while one configuration text is checked, turning byte spans into line:column.
pub(crate) struct Collector<'t> {
    file: String,
    text: &'t str,
    /// (byte offset, error): the offset keeps the final list in file order.
    errors: Vec<(usize, ConfigError)>,
    /// Dotted keys offered as "did you mean" for a misspelt key. A required key in this set is
    /// not also reported as missing: `adress = ...` is one mistake, not two.
    suggested: Vec<String>,
}

impl<'t> Collector<'t> {
    /// A collector for `text`, which errors will call `file`.
    pub(crate) fn new(file: &str, text: &'t str) -> Self {
        Self {
            file: file.to_owned(),
            text,
            errors: Vec::new(),
            suggested: Vec::new(),
        }
    }

    /// Record an error at `span` (its start is reported) for `key`.
    pub(crate) fn at(&mut self, span: &Range<usize>, key: &str, message: impl Into<String>) {
        let offset = span.start.min(self.text.len());
        let (line, column) = line_column(self.text, offset);
        let error = ConfigError {
            file: self.file.clone(),
            line: Some(line),
            column: Some(column),
            key: key.to_owned(),
            // Messages end up one per line; a newline from a library message would break that.
            message: message.into().replace(['\r', '\n'], " "),
        };
        self.errors.push((offset, error));
    }

    /// Record an error about something missing from the whole file; it is placed at the end of
    /// the file, where the missing table would be added.
    pub(crate) fn at_end(&mut self, key: &str, message: impl Into<String>) {
        let end = self.text.len();
        self.at(&(end..end), key, message);
    }

    /// Remember that `key` (dotted) was suggested for a misspelt key.
    pub(crate) fn suggested(&mut self, key: String) {
        self.suggested.push(key);
    }

    /// Whether `key` (dotted) was suggested for a misspelt key.
    pub(crate) fn was_suggested(&self, key: &str) -> bool {
        self.suggested.iter().any(|k| k == key)
    }

    /// Whether any error was recorded.
    pub(crate) fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// All errors, sorted by position in the file (stable, so same-place errors keep their order).
    pub(crate) fn finish(mut self) -> ConfigErrors {
        self.errors.sort_by_key(|(offset, _)| *offset);
        ConfigErrors(self.errors.into_iter().map(|(_, e)| e).collect())
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    // Clamp to a char boundary so a span inside a multi-byte character cannot panic.
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The line number of byte `offset`, for messages that refer to another place ("see line 9").
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    line_column(text, offset).0
}
