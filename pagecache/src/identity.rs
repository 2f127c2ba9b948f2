//! File identity: what the cache knows about a file on disk (for revalidation) and what it
//! exposes to build validators (ETag, Last-Modified) that stay right across restarts.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What identifies a version of a file on disk, for revalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl DiskIdentity {
    pub fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The identity of one version of a cached file, to build HTTP validators from.
///
/// `dev`, `ino`, `disk_size` and `mtime` come from the file on disk as the cache last saw it
/// (at open, revalidation, reopening a closed descriptor, or after writing back). They survive
/// a restart: a file edited while the server was down has another mtime (or inode, or size).
/// `version` is the cache's in-process version counter, which restarts at 1 with every
/// process; it only distinguishes versions the cache itself made (writes not yet reflected
/// by a new disk identity), so validators should use it only when
/// [`FileIdentity::matches_disk`] is false, together with [`FileIdentity::instance`].
/// [`FileIdentity::etag`] does exactly that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device of the file.
    pub dev: u64,
    /// Inode of the file.
    pub ino: u64,
    /// Size of the file on disk when the identity was read.
    pub disk_size: u64,
    /// Modification time on disk, with nanoseconds.
    pub mtime: SystemTime,
    /// Length as seen through the cache (differs from `disk_size` while writes are not yet
    /// written back).
    pub len: u64,
    /// In-process version of the content (see [`crate::Pin::version`]).
    pub version: u64,
    /// Whether the disk identity describes exactly this version's bytes (false after a write
    /// through the cache until it is written back with a visibly new mtime).
    pub matches_disk: bool,
    /// An id of this cache's process, different across restarts.
    pub instance: u64,
}

impl FileIdentity {
    /// A strong ETag (with quotes) that changes whenever the content may have: built from the
    /// disk identity alone when it describes the bytes (so it is the same after a restart),
    /// else from the disk identity plus this process's instance and version (so it can never
    /// name other bytes after a restart).
    pub fn etag(&self) -> String {
        let nanos = self
            .mtime
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let disk = format!(
            "{:x}-{:x}-{:x}-{:x}",
            self.dev, self.ino, self.disk_size, nanos
        );
        if self.matches_disk {
            format!("\"{disk}\"")
        } else {
            format!(
                "\"{disk}-{:x}.{:x}.{:x}\"",
                self.instance, self.version, self.len
            )
        }
    }

    /// The modification time to send as `Last-Modified` (whole seconds on the wire).
    pub fn last_modified(&self) -> SystemTime {
        self.mtime
    }

    pub(crate) fn new(disk: &DiskIdentity, len: u64, version: u64, matches_disk: bool) -> Self {
        Self {
            dev: disk.dev,
            ino: disk.ino,
            disk_size: disk.size,
            mtime: system_time(disk.mtime),
            len,
            version,
            matches_disk,
            instance: instance(),
        }
    }
}

fn system_time((secs, nanos): (i64, i64)) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.clamp(0, 999_999_999) as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

/// This process's instance id: start time (nanoseconds) mixed with the pid, fixed at first use.
fn instance() -> u64 {
    static INSTANCE: OnceLock<u64> = OnceLock::new();
    *INSTANCE.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        (nanos ^ (u64::from(std::process::id()) << 48)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    })
}
