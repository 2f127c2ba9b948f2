//! Typed errors of the page cache.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Errors returned by the page cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The memory given to [`crate::FrameArena`] cannot hold page frames.
    #[error("invalid frame arena: {0}")]
    InvalidArena(String),

    /// A system call on a cached file failed.
    #[error("{op} failed on {}: {source}", path.display())]
    Io {
        /// The operation (`open`, `pread`, `pwrite`, `fsync`, ...).
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },

    /// No free frame, and none could be evicted (all pinned, dirty or in use) within the
    /// configured back-pressure policy.
    #[error("out of page frames: {needed} more needed and none can be evicted (all pinned)")]
    OutOfFrames {
        /// Frames that were still missing.
        needed: usize,
    },

    /// A [`crate::WritePolicy::Wait`] writer gave up waiting for pins to be released.
    /// Nothing of the write was applied.
    #[error(
        "write timed out after {waited:?}: {pinned_pages} page(s) still pinned; nothing was written"
    )]
    WriteTimeout {
        /// How long the writer waited.
        waited: Duration,
        /// Touched pages that were still pinned when the writer gave up.
        pinned_pages: usize,
    },

    /// A write was attempted through a handle opened read-only.
    #[error("{} was opened read-only", path.display())]
    ReadOnly {
        /// The file concerned.
        path: PathBuf,
    },

    /// The snapshot was invalidated: its next bytes cannot be served as its version. Bytes
    /// already pinned stay valid; a server resets the connection (never a torn body).
    #[error("snapshot invalidated: {reason}")]
    SnapshotInvalidated {
        /// Why.
        reason: crate::InvalidationReason,
    },

    /// A writer under [`crate::OldVersionPolicy::WriterWaits`] gave up: keeping the old
    /// versions open snapshots need would have exceeded the limit. Nothing was written.
    #[error(
        "old-version limit: {needed} more old page(s) needed, limit {limit}; nothing was written"
    )]
    OldVersionLimit {
        /// Old-version pages the write would have had to keep.
        needed: usize,
        /// [`crate::CacheConfig::old_version_limit_pages`] in force.
        limit: usize,
    },

    /// A snapshot pin asked for bytes it had released
    /// ([`crate::Snapshot::release_before`]).
    #[error(
        "bytes from {start} were released from the snapshot (released before {released_before})"
    )]
    Released {
        /// Start of the requested range.
        start: u64,
        /// Offset before which the snapshot was released.
        released_before: u64,
    },

    /// A byte range reaches beyond the file or pin it was applied to.
    #[error("byte range {start}..{end} is outside 0..{len}")]
    OutOfRange {
        /// Start of the requested range.
        start: u64,
        /// End of the requested range.
        end: u64,
        /// Length of the file (or end of the pin) the range was checked against.
        len: u64,
    },
}

/// Result type of the page cache.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}
