//! Audit mode: proves at run time that pinned bytes did not change.
//!
//! # Design: one checksum per frame version, sampled verification, a check when it ends
//! The first audit (crc32 of a frame at every zero-to-one pin, recomputed at every last
//! release) cost two crc32 of 4 KiB per pin cycle of every page: more than the TCP checksum
//! and copy work of sending the page, so a server with audit on ran at 0.35-0.63x. Now:
//!
//! * **Recorded once per frame version.** The crc32 of a frame is recorded at the first pin of
//!   the frame's current contents (a *version* of the frame: from the moment it is filled or
//!   written while unpinned until it is written again, evicted or freed), not at every
//!   zero-to-one pin. A hot page pinned a million times is summed once.
//! * **Verified at a deterministic 1-in-N of its releases** ([`crate::CacheConfig::audit_verify_every`],
//!   default [`DEFAULT_VERIFY_EVERY`]): each frame counts the releases of its pins (a counter on
//!   the frame's own cache line, which the release writes anyway) and verifies, while the
//!   releasing pin is still held, at release 0, N, 2N, ... of the frame's version (so every
//!   version that is pinned at all is verified at least once at a release). Counting per frame rather than per
//!   thread means no frame is skipped systematically (a thread that always pins two pages would
//!   alias with N = 2). `N = 1` verifies every release (the tests' setting); `N = 0` only the
//!   end-of-version check below.
//! * **Verified when the version ends.** Before a frame's bytes legitimately change or go (a
//!   write into it while unpinned, eviction, freeing), a recorded checksum is verified and
//!   cleared. A change made while the frame was pinned (which only the test-only
//!   `InPlaceUnsafe` policy does) does *not* clear the record, so it is caught at a sampled
//!   release or at the latest when the version ends: sampling makes detection later, never
//!   impossible, as long as the frame's bytes are not changed back.
//!
//! What is given up against the first design: a violation is reported up to N releases (or
//! the end of the version) late instead of at the pin's release, and a change that is undone
//! before the next check goes unseen. Why crc32 still: hardware-assisted (`crc32fast`), it is
//! no longer on the per-pin path, so a weaker sum would save little.
//!
//! Counters: [`crate::CacheStats::audit_records`] (checksums recorded),
//! [`crate::CacheStats::audit_checks`] (verifications), [`crate::CacheStats::audit_skipped`]
//! (releases not sampled) and [`crate::CacheStats::audit_violations`].
//!
//! # Cost
//! `benches/audit_cost.rs` under callgrind (a 1 MiB resident file streamed by snapshots in
//! 16-page pins; instructions per pinned page, start-up cancelled by two run lengths):
//!
//! | audit                                   | instructions per pinned page |
//! |-----------------------------------------|------------------------------|
//! | off                                     | 213 (197 before this design) |
//! | first design (crc at pin and at release)| 4163                         |
//! | this design, N = 16                     | 373                          |
//! | this design, N = 64 (default)           | 275                          |
//! | this design, N = 0 (end of version only)| 252                          |
//! | this design, N = 1 (every release)      | 2219                         |
//!
//! One crc32 of 4 KiB is about 2000 instructions; N = 16 adds 160 per pinned page, 4% of what
//! the first design added (3966), the default (64) 62. Natively that is noise; in the TCG
//! guest a crc32 instruction costs far more than the send path's (see
//! [`DEFAULT_VERIFY_EVERY`]), which is why the default is 64.

use std::sync::atomic::Ordering;

use crate::arena::{FrameArena, FrameId};
use crate::frames::FrameMeta;
use crate::stats::StatCounters;

/// Default of [`crate::CacheConfig::audit_verify_every`].
///
/// 64, not 16: under TCG (the benchmarks' guest, whose QEMU 7.2 emulates `pclmulqdq`, which
/// crc32fast uses, with a slow helper) a crc32 of 4 KiB costs about nine times what sending
/// the page costs, so N = 16 made 1 MiB GETs (16 connections) 1.49x slower on virtio and 1.54x
/// on e1000e; N = 64 1.18x and 1.15x (`scripts/bench`, same run, 2 boots each). Every version
/// that is pinned at all is still verified at its first release.
pub const DEFAULT_VERIFY_EVERY: u32 = 64;

/// In a frame's audit word: a checksum of its current version is recorded (low 32 bits).
const RECORDED: u64 = 1 << 32;

fn checksum(arena: &FrameArena, frame: FrameId) -> u32 {
    // SAFETY: every caller either holds a pin on the frame (pinned frames are not written,
    // except by the test-only InPlaceUnsafe policy, which is what the audit is meant to
    // catch) or has exclusive use of it (the file lock of its only mapping, an unpinned frame
    // claimed for eviction, or a frame being freed by its last holder).
    let bytes = unsafe { arena.bytes(frame) };
    crc32fast::hash(bytes)
}

/// After a pin of `frame` took effect (the frame is pinned, its bytes stable): records the
/// checksum of its version unless one is recorded already (one load in the common case).
#[inline]
pub(crate) fn on_pin(arena: &FrameArena, frame: FrameId, meta: &FrameMeta, stats: &StatCounters) {
    if meta.audit.load(Ordering::Acquire) & RECORDED != 0 {
        return;
    }
    let word = RECORDED | u64::from(checksum(arena, frame));
    // Two first pinners compute the same sum (the bytes are pinned); one records it.
    if meta
        .audit
        .compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
    {
        stats.audit_records.add(1);
    }
}

/// Before a pin of `frame` is released (still held): verifies at every `every`-th release of
/// the frame (never if `every` is 0).
#[inline]
pub(crate) fn on_release(
    arena: &FrameArena,
    frame: FrameId,
    meta: &FrameMeta,
    every: u32,
    stats: &StatCounters,
) {
    let n = meta.audit_releases.fetch_add(1, Ordering::Relaxed);
    if every == 0 || !n.is_multiple_of(every) {
        stats.audit_skipped.add(1);
        return;
    }
    let word = meta.audit.load(Ordering::Acquire);
    if word & RECORDED != 0 {
        verify(arena, frame, word as u32, stats);
    }
}

/// The frame's current version ends (it is about to be written while unpinned, evicted or
/// freed; the caller has exclusive use of it): verifies a recorded checksum and clears it,
/// so that the next version is recorded afresh.
pub(crate) fn end_of_version(
    arena: &FrameArena,
    frame: FrameId,
    meta: &FrameMeta,
    stats: &StatCounters,
) {
    let word = meta.audit.swap(0, Ordering::AcqRel);
    // The next version's first release is verified again.
    meta.audit_releases.store(0, Ordering::Relaxed);
    if word & RECORDED != 0 {
        verify(arena, frame, word as u32, stats);
    }
}

fn verify(arena: &FrameArena, frame: FrameId, recorded: u32, stats: &StatCounters) {
    stats.audit_checks.add(1);
    if checksum(arena, frame) != recorded {
        StatCounters::add(&stats.audit_violations, 1);
        tracing::error!(frame, "audit: pinned page changed while pinned");
    }
}
