//! The library's error type: every message names the input it is about and, where it can, what to do.
use std::path::PathBuf;

/// Errors returned by the lisa library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}{}", io_hint(.source.kind()))]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are not what was expected.
    #[error("{path}: {msg}")]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        msg: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A checkpoint does not match the model or run it is loaded into.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// What does not match.
        msg: String,
    },
    /// Training diverged or produced non-finite values.
    #[error("training: {0}")]
    Training(String),
    /// A multi-process run could not start or lost a peer.
    #[error("distributed training: {0}")]
    Distributed(String),
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to do about an I/O failure of a given kind, as a suffix for its message ("" when there is no
/// general advice).
pub fn io_hint(kind: std::io::ErrorKind) -> &'static str {
    use std::io::ErrorKind as K;
    match kind {
        K::NotFound => "; check the path",
        K::PermissionDenied => "; check its permissions or choose another location",
        K::StorageFull | K::QuotaExceeded => "; the disk is full: free some space or choose another location",
        K::ReadOnlyFilesystem => "; the file system is read-only: choose another location",
        K::NotADirectory => "; part of the path is a file, not a folder: choose another location",
        K::IsADirectory => "; it is a folder, not a file: give a file",
        K::AlreadyExists => "; something of that name is in the way: choose another location",
        _ => "",
    }
}

/// [`io_hint`] for an error known only by its text (libtorch's safetensors writer wraps the I/O error).
pub(crate) fn io_hint_in(text: &str) -> &'static str {
    use std::io::ErrorKind as K;
    let kinds = [
        (K::StorageFull, "StorageFull"),
        (K::PermissionDenied, "PermissionDenied"),
        (K::ReadOnlyFilesystem, "ReadOnlyFilesystem"),
    ];
    kinds.iter().find(|(_, name)| text.contains(name)).map_or("", |(k, _)| io_hint(*k))
}

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// A format error about `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
}
