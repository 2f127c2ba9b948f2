//! Audit mode: proves at run time that pinned bytes did not change.
//!
//! When a frame goes from zero to one pin, the crc32 of its 4 KiB is recorded; when its last
//! pin is about to be released (while that pin is still held, so the bytes are supposed to be
//! immutable), the crc is recomputed and compared. A mismatch is a violation of the
//! stable-page guarantee and is counted in [`crate::CacheStats::audit_violations`].

use std::sync::atomic::Ordering;

use crate::arena::{FrameArena, FrameId};
use crate::frames::FrameMeta;

/// Records the checksum of a frame that is being pinned for the first time.
///
/// Called with the owning file's lock held (or the frame otherwise stable).
pub(crate) fn record(arena: &FrameArena, frame: FrameId, meta: &FrameMeta) {
    // SAFETY: the caller holds the owning file's lock and has just pinned the frame, so no
    // writer can change it while we read it.
    let bytes = unsafe { arena.bytes(frame) };
    meta.audit_crc
        .store(crc32fast::hash(bytes), Ordering::Relaxed);
}

/// Returns whether a frame still has the checksum recorded when it was first pinned.
///
/// Called by the holder of the frame's last pin, before releasing it.
pub(crate) fn verify(arena: &FrameArena, frame: FrameId, meta: &FrameMeta) -> bool {
    // SAFETY: the caller still holds a pin on the frame; pinned frames are never written
    // (except by the test-only InPlaceUnsafe policy, which is what the audit is meant to catch).
    let bytes = unsafe { arena.bytes(frame) };
    crc32fast::hash(bytes) == meta.audit_crc.load(Ordering::Relaxed)
}
