//! The spool: one directory per message, moved between state directories by atomic renames.

mod envelope;

pub use envelope::{ENVELOPE_VERSION, Envelope, RcptStatus, Recipient};

/// Errors from spool operations.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The path involved.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}
