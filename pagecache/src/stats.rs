//! Counters exposed through [`crate::PageCache::stats`].
//!
//! The counters a pin and its release touch (pins, pinned pages) are sharded per thread, each
//! shard on its own cache line, so pinning on many cores writes no shared line (see `fast`);
//! the rest are relaxed atomics bumped off the hot path.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crate::fast::Padded;

/// Shards per sharded counter (a power of two). Threads are spread over them round-robin in
/// the order they first count something; 64 keeps one shard per core on a 64-core machine.
const SHARDS: usize = 64;

/// This thread's shard.
pub(crate) fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|shard| {
        let mut index = shard.get();
        if index == usize::MAX {
            index = NEXT.fetch_add(1, Relaxed) % SHARDS;
            shard.set(index);
        }
        index
    })
}

/// A cumulative counter split into per-thread shards; reading sums them.
pub(crate) struct Sharded {
    shards: Box<[Padded<AtomicU64>]>,
}

impl Default for Sharded {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
        }
    }
}

impl Sharded {
    #[inline]
    pub fn add(&self, n: u64) {
        self.shards[shard()].fetch_add(n, Relaxed);
    }

    pub fn sum(&self) -> u64 {
        self.shards.iter().map(|s| s.load(Relaxed)).sum()
    }
}

/// Tokens a shard takes from (or gives back to) the shared count at a time.
const BATCH: i64 = 4;

/// The number of pinned frames, with its peak, without a shared write per pin.
///
/// `total` counts pinned frames *plus* tokens that shards hold in reserve: a pin from zero
/// takes a token from its thread's shard and only when the shard has none moves [`BATCH`]
/// from `total` (updating the peak); a release gives its token back to its shard, which
/// returns a batch once it holds more than two. So the number pinned is `total` minus the
/// reserves (exact once quiet), and the recorded peak never understates the true one and
/// overstates it by at most `2 * BATCH` per thread that pinned or released recently.
pub(crate) struct PinnedGauge {
    total: Padded<AtomicU64>,
    peak: Padded<AtomicU64>,
    reserve: Box<[Padded<AtomicI64>]>,
}

impl Default for PinnedGauge {
    fn default() -> Self {
        Self {
            total: Padded::default(),
            peak: Padded::default(),
            reserve: (0..SHARDS).map(|_| Padded::default()).collect(),
        }
    }
}

impl PinnedGauge {
    #[inline]
    pub fn add_one(&self) {
        let reserve = &self.reserve[shard()];
        if reserve.fetch_sub(1, Relaxed) > 0 {
            return;
        }
        let total = self.total.fetch_add(BATCH as u64, Relaxed) + BATCH as u64;
        reserve.fetch_add(BATCH, Relaxed);
        self.peak.fetch_max(total, Relaxed);
    }

    #[inline]
    pub fn sub_one(&self) {
        let reserve = &self.reserve[shard()];
        if reserve.fetch_add(1, Relaxed) + 1 > 2 * BATCH {
            reserve.fetch_sub(BATCH, Relaxed);
            self.total.fetch_sub(BATCH as u64, Relaxed);
        }
    }

    /// Frames pinned now (exact when no pin or release runs concurrently).
    pub fn now(&self) -> u64 {
        let reserved: i64 = self.reserve.iter().map(|r| r.load(Relaxed)).sum();
        (self.total.load(Relaxed) as i64 - reserved).max(0) as u64
    }

    /// The highest count seen (see the type's documentation for its precision).
    pub fn peak(&self) -> u64 {
        let now = self.now();
        self.peak.fetch_max(now, Relaxed).max(now)
    }
}

/// A snapshot of the cache's counters. Counters are cumulative since the cache was created,
/// except the `*_now` and `*_peak` fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// `pin` and `sub_pin` calls that succeeded.
    pub pins: u64,
    /// Of `pins`, those served without the file lock (resident pages, see
    /// [`crate::CachedFile::pin`]).
    pub lock_free_pins: u64,
    /// Frames currently pinned (by `Pin`s or by writeback in flight).
    pub pinned_pages_now: u64,
    /// Highest `pinned_pages_now` seen. Counted per thread without a shared write per pin, it
    /// may exceed the true peak by up to 8 pages per thread that pinned or released pages
    /// recently (it never understates it).
    pub pinned_pages_peak: u64,
    /// Frames currently holding file pages (including pinned copy-on-write orphans).
    pub resident_pages_now: u64,
    /// Frames currently free.
    pub free_frames_now: u64,
    /// Pinned pages a copy-on-write writer copied to a new frame.
    pub cow_copies: u64,
    /// Times a `Wait` writer had to wait for pins to go away.
    pub writer_waits: u64,
    /// Total time `Wait` writers spent waiting.
    pub writer_wait_time: Duration,
    /// `Wait` writes that gave up with [`crate::Error::WriteTimeout`].
    pub write_timeouts: u64,
    /// Times an allocation waited for frames (back-pressure `Wait`).
    pub frame_waits: u64,
    /// Allocations that failed with [`crate::Error::OutOfFrames`].
    pub out_of_frames: u64,
    /// Pages evicted to make room.
    pub evictions: u64,
    /// Pages filled from disk (including read-ahead).
    pub fills: u64,
    /// Bytes read from disk by fills.
    pub bytes_read: u64,
    /// Pages written back to disk.
    pub writebacks: u64,
    /// Bytes written to disk by writeback.
    pub bytes_written: u64,
    /// Audit mode: checksums of frame versions recorded (once per version, at its first pin).
    pub audit_records: u64,
    /// Audit mode: checksums verified (at sampled releases and when a version ends).
    pub audit_checks: u64,
    /// Audit mode: releases of pinned pages not verified (1-in-N sampling,
    /// [`crate::CacheConfig::audit_verify_every`]).
    pub audit_skipped: u64,
    /// Pages whose bytes changed while pinned (audit mode). Must stay zero unless the
    /// test-only `InPlaceUnsafe` policy is used.
    pub audit_violations: u64,
    /// Times an external change of a file was detected by revalidation.
    pub external_changes: u64,
    /// Pages filled by the I/O pool (included in `fills`).
    pub background_fills: u64,
    /// Snapshots taken.
    pub snapshots: u64,
    /// Snapshots invalidated (old-version limit or external change).
    pub snapshots_invalidated: u64,
    /// Frames currently holding (or reserved for) old versions that open snapshots need.
    pub old_version_pages_now: u64,
    /// Highest `old_version_pages_now` seen.
    pub old_version_pages_peak: u64,
    /// Writes that found the old-version limit reached and had to wait (or were pending).
    pub old_version_waits: u64,
    /// File descriptors the cache currently keeps open.
    pub open_files_now: u64,
    /// Descriptors closed to stay under `max_open_files`.
    pub files_closed: u64,
    /// Descriptors reopened on demand after such a close.
    pub files_reopened: u64,
    /// Files replaced with [`crate::PageCache::install`] whose old contents are still kept
    /// (open on their old inode) for snapshots, handles or pages not yet let go.
    pub replaced_files_now: u64,
    /// Files replaced with [`crate::PageCache::install`].
    pub installs: u64,
}

#[derive(Default)]
pub(crate) struct StatCounters {
    pub pins: Sharded,
    pub lock_free_pins: Sharded,
    pub pinned_pages: PinnedGauge,
    pub cow_copies: AtomicU64,
    pub writer_waits: AtomicU64,
    pub writer_wait_nanos: AtomicU64,
    pub write_timeouts: AtomicU64,
    pub frame_waits: AtomicU64,
    pub out_of_frames: AtomicU64,
    pub evictions: AtomicU64,
    pub fills: AtomicU64,
    pub bytes_read: AtomicU64,
    pub writebacks: AtomicU64,
    pub bytes_written: AtomicU64,
    pub audit_records: Sharded,
    pub audit_checks: Sharded,
    pub audit_skipped: Sharded,
    pub audit_violations: AtomicU64,
    pub external_changes: AtomicU64,
    pub background_fills: AtomicU64,
    pub snapshots: AtomicU64,
    pub snapshots_invalidated: AtomicU64,
    pub old_version_waits: AtomicU64,
    pub files_closed: AtomicU64,
    pub files_reopened: AtomicU64,
    pub installs: AtomicU64,
}

impl StatCounters {
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self, resident: u64, free: u64) -> CacheStats {
        CacheStats {
            pins: self.pins.sum(),
            lock_free_pins: self.lock_free_pins.sum(),
            pinned_pages_now: self.pinned_pages.now(),
            pinned_pages_peak: self.pinned_pages.peak(),
            resident_pages_now: resident,
            free_frames_now: free,
            cow_copies: self.cow_copies.load(Relaxed),
            writer_waits: self.writer_waits.load(Relaxed),
            writer_wait_time: Duration::from_nanos(self.writer_wait_nanos.load(Relaxed)),
            write_timeouts: self.write_timeouts.load(Relaxed),
            frame_waits: self.frame_waits.load(Relaxed),
            out_of_frames: self.out_of_frames.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            fills: self.fills.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            writebacks: self.writebacks.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            audit_records: self.audit_records.sum(),
            audit_checks: self.audit_checks.sum(),
            audit_skipped: self.audit_skipped.sum(),
            audit_violations: self.audit_violations.load(Relaxed),
            external_changes: self.external_changes.load(Relaxed),
            background_fills: self.background_fills.load(Relaxed),
            snapshots: self.snapshots.load(Relaxed),
            snapshots_invalidated: self.snapshots_invalidated.load(Relaxed),
            old_version_pages_now: 0,
            old_version_pages_peak: 0,
            old_version_waits: self.old_version_waits.load(Relaxed),
            open_files_now: 0,
            files_closed: self.files_closed.load(Relaxed),
            files_reopened: self.files_reopened.load(Relaxed),
            replaced_files_now: 0,
            installs: self.installs.load(Relaxed),
        }
    }
}
