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
