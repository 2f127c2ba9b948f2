//! Streaming snapshots: one version of a byte range, pinned progressively.
//!
//! [`crate::CachedFile::snapshot`] fixes the version of every page in a range without pinning
//! anything or doing any I/O. The holder then pins pieces as it sends them
//! ([`Snapshot::pin_next`] or [`Snapshot::pin`]) and drops each [`Pin`] once the bytes are
//! acknowledged, so a response holds about a send window of pages instead of its whole body.
//!
//! The snapshot stays one version because writers keep what it still needs: before a page an
//! open snapshot has not released changes (write, truncation, replacement, an external change
//! found on revalidation), its current bytes are *preserved* for that snapshot: the resident
//! frame itself is kept (marked held instead of freed), and a page that is not resident is
//! first read from disk. Reading it in before the write, rather than keeping the write apart
//! until the snapshot ends, was chosen because it keeps every old version in one place (a
//! frame) with one lifetime rule, lets writeback and fsync go ahead at once (a PUT's fsync must
//! not wait for the slowest reader), and keeps eviction free to write dirty pages back; the
//! price is a read on the write path, only for pages that are both cold and still needed.
//!
//! Preserved frames are *old-version pages*, counted in
//! [`crate::CacheStats::old_version_pages_now`] and bounded by
//! [`crate::CacheConfig::old_version_limit_pages`]. At the bound, per
//! [`crate::OldVersionPolicy`], the writer waits (non-blocking: [`crate::Attempt::Pending`]; the
//! blocking calls wait up to the policy's timeout) or the oldest snapshots that need the room
//! are invalidated: their next pin fails with [`Error::SnapshotInvalidated`], so the server can
//! reset the connection; bytes already pinned stay valid, so a body is cut short, never torn.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::arena::{FrameId, PAGE_SIZE};
use crate::cache::{Backpressure, CacheShared};
use crate::error::{Error, Result};
use crate::file::{pages_covering, FileShared, FileState, SnapshotsGuard, Stall};
use crate::fill;
use crate::frames::Waiter;
use crate::identity::FileIdentity;
use crate::pin::{Anchor, Pin};
use crate::stats::StatCounters;
use crate::ticket::{Attempt, Pending, PendingReason, Ticket};

const PAGE: u64 = PAGE_SIZE as u64;

/// Why a snapshot was invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidationReason {
    /// Keeping its old version would have exceeded the old-version bound
    /// ([`crate::OldVersionPolicy::InvalidateSnapshots`]).
    OldVersionLimit,
    /// The file changed on disk (or was replaced) and some bytes of the snapshot were no
    /// longer in memory.
    ExternalChange,
}

impl std::fmt::Display for InvalidationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InvalidationReason::OldVersionLimit => "its old version exceeded the old-version limit",
            InvalidationReason::ExternalChange => "the file changed on disk",
        })
    }
}

/// What a snapshot and its entry share without the file lock, for [`Snapshot::pin_next`]'s
/// lock-free path: how far the holder has moved on (published lazily; writers read it under
/// the lock, and a stale value only makes them keep an old page a little longer), and whether
/// the snapshot was invalidated.
#[derive(Default)]
pub(crate) struct SnapShared {
    /// Pages before this one will not be pinned again (0: nothing released lock-free yet).
    released_page: AtomicU64,
    invalid: AtomicBool,
}

/// An open snapshot as the file sees it.
pub(crate) struct SnapEntry {
    /// Pages the snapshot may still pin (the start moves up as the holder releases; see
    /// [`SnapEntry::needed`] for the start including lock-free progress).
    needed: Range<u64>,
    lazy: Arc<SnapShared>,
    /// Pages whose snapshot version is no longer the file's: the frames holding it.
    pub preserved: HashMap<u64, FrameId>,
    pub invalid: Option<InvalidationReason>,
}

/// The open snapshots of a file and the old-version frames they hold.
#[derive(Default)]
pub(crate) struct Snapshots {
    /// By id, so iteration goes oldest first.
    pub entries: BTreeMap<u64, SnapEntry>,
    /// Number of snapshots holding each preserved frame (several snapshots of the same
    /// version share one frame).
    held: HashMap<FrameId, u32>,
}

impl SnapEntry {
    /// Pages the snapshot may still pin.
    pub fn needed(&self) -> Range<u64> {
        let released = self.lazy.released_page.load(Ordering::Acquire);
        self.needed.start.max(released).min(self.needed.end)..self.needed.end
    }
}

impl Snapshots {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records that `frame` (already marked held by [`CacheShared::hold`]) keeps `page` for
    /// the snapshots `ids`.
    pub fn preserve(&mut self, ids: &[u64], page: u64, frame: FrameId) {
        for id in ids {
            if let Some(entry) = self.entries.get_mut(id) {
                entry.preserved.insert(page, frame);
            }
        }
        *self.held.entry(frame).or_insert(0) += ids.len() as u32;
    }

    fn unhold(&mut self, cache: &CacheShared, frame: FrameId) {
        let holders = self.held.get_mut(&frame).expect("held frame has holders");
        *holders -= 1;
        if *holders == 0 {
            self.held.remove(&frame);
            cache.release_hold(frame);
        }
    }

    /// The snapshot will not pin pages before `first_needed` any more.
    pub fn release_before(&mut self, cache: &CacheShared, id: u64, first_needed: u64) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        entry.needed.start = entry.needed.start.max(first_needed).min(entry.needed.end);
        let done: Vec<(u64, FrameId)> = entry
            .preserved
            .iter()
            .filter(|(&p, _)| p < first_needed)
            .map(|(&p, &f)| (p, f))
            .collect();
        for (page, frame) in done {
            self.entries
                .get_mut(&id)
                .expect("looked up above")
                .preserved
                .remove(&page);
            self.unhold(cache, frame);
        }
    }

    /// Marks a snapshot invalid and lets go of everything it held.
    pub fn invalidate(&mut self, cache: &CacheShared, id: u64, reason: InvalidationReason) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        if entry.invalid.is_some() {
            return;
        }
        entry.invalid = Some(reason);
        entry.lazy.invalid.store(true, Ordering::Release);
        let frames: Vec<FrameId> = entry.preserved.drain().map(|(_, f)| f).collect();
        for frame in frames {
            self.unhold(cache, frame);
        }
        StatCounters::add(&cache.stats.snapshots_invalidated, 1);
        tracing::debug!(snapshot = id, %reason, "pagecache: snapshot invalidated");
    }

    pub fn remove(&mut self, cache: &CacheShared, id: u64) {
        if let Some(mut entry) = self.entries.remove(&id) {
            for (_, frame) in entry.preserved.drain() {
                self.unhold(cache, frame);
            }
        }
    }

    /// Before the file's bytes change wholesale (external change): keeps the resident pages
    /// every valid snapshot still needs, and invalidates the snapshots whose needed pages are
    /// not all in memory or would not fit under the old-version bound.
    pub fn keep_for_external_change(
        &mut self,
        cache: &CacheShared,
        pages: &crate::file::PageTable,
    ) {
        let ids: Vec<u64> = self.entries.keys().copied().collect();
        for id in ids {
            let entry = &self.entries[&id];
            if entry.invalid.is_some() {
                continue;
            }
            let missing: Vec<u64> = entry
                .needed()
                .filter(|p| !entry.preserved.contains_key(p))
                .collect();
            let all_resident = missing.iter().all(|p| pages.contains_key(p));
            // Frames another snapshot already holds need no new room.
            let new_frames = missing
                .iter()
                .filter(|p| pages.get(p).is_some_and(|f| !self.held.contains_key(f)))
                .count();
            let fits = all_resident && cache.reserve_old(new_frames);
            if !fits {
                let reason = if all_resident {
                    InvalidationReason::OldVersionLimit
                } else {
                    InvalidationReason::ExternalChange
                };
                self.invalidate(cache, id, reason);
                continue;
            }
            // Pages may repeat across snapshots; hold each frame once (its room reserved).
            for page in missing {
                let frame = pages[&page];
                if !self.held.contains_key(&frame) {
                    cache.hold(frame, false);
                }
                self.preserve(&[id], page, frame);
            }
        }
    }
}

/// One version of a byte range of a file, to be pinned progressively.
///
/// Creating it pins nothing and reads nothing. Every [`Pin`] it returns belongs to the version
/// the file had when the snapshot was taken ([`Snapshot::version`]), whatever writers do
/// meanwhile. Dropping the snapshot lets go of the old versions it kept; pins it returned stay
/// valid on their own. `Send + Sync`.
pub struct Snapshot {
    cache: Arc<CacheShared>,
    /// What its pins hold the cache by (one per snapshot: its pins are taken in sequence).
    anchor: Arc<Anchor>,
    lazy: Arc<SnapShared>,
    file: Arc<FileShared>,
    id: u64,
    range: Range<u64>,
    identity: FileIdentity,
    cursor: u64,
    released: u64,
    /// When pins first found no frame, for the back-pressure deadline.
    frames_short_since: Option<Instant>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("path", &self.file.path)
            .field("range", &self.range)
            .field("version", &self.identity.version)
            .field("cursor", &self.cursor)
            .finish()
    }
}

impl Snapshot {
    pub(crate) fn open(
        cache: Arc<CacheShared>,
        file: Arc<FileShared>,
        st: &mut SnapshotsGuard<'_>,
        range: Range<u64>,
    ) -> Result<Self> {
        if range.start > range.end || range.end > st.len {
            return Err(Error::OutOfRange {
                start: range.start,
                end: range.end,
                len: st.len,
            });
        }
        let id = cache.next_snapshot_id();
        let lazy = Arc::new(SnapShared::default());
        st.snapshots().entries.insert(
            id,
            SnapEntry {
                needed: pages_covering(&range),
                lazy: lazy.clone(),
                preserved: HashMap::new(),
                invalid: None,
            },
        );
        StatCounters::add(&cache.stats.snapshots, 1);
        Ok(Self {
            identity: st.identity(),
            anchor: Anchor::new(cache.clone()),
            lazy,
            cache,
            file,
            id,
            cursor: range.start,
            released: range.start,
            range,
            frames_short_since: None,
        })
    }

    /// The byte range of the snapshot.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    /// Number of bytes in the snapshot.
    pub fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    /// Whether the snapshot covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The version every pin of this snapshot has ([`Pin::version`]).
    pub fn version(&self) -> u64 {
        self.identity.version
    }

    /// The file identity of the snapshot's version, to build the response's validators from
    /// (its `len` is the whole file's length, for `Content-Range`).
    pub fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// Offset [`Snapshot::pin_next`] continues from.
    pub fn position(&self) -> u64 {
        self.cursor
    }

    /// Bytes from [`Snapshot::position`] to the end of the snapshot.
    pub fn remaining(&self) -> u64 {
        self.range.end - self.cursor
    }

    /// Pins up to `max_len` bytes from [`Snapshot::position`] and moves the position past
    /// them: the streaming call. Returns a shorter pin when only a prefix is in memory
    /// (the rest is read meanwhile), and starts read-ahead behind the pin. Pages before the
    /// new position are released from the snapshot (the returned pin holds them), so a
    /// snapshot keeps no old version of bytes already handed out.
    ///
    /// `Pending` when the next page is not in memory yet (filling) or no frame is available
    /// (until the back-pressure deadline; a retry after it fails with
    /// [`Error::OutOfFrames`]). Fails with [`Error::SnapshotInvalidated`] if the snapshot was
    /// invalidated. At the end, returns an empty pin.
    ///
    /// While the file is still at the snapshot's version and the pages (and the read-ahead
    /// window behind them) are resident, this takes no lock: the pin is validated like a
    /// lock-free [`crate::CachedFile::pin`], and the release of the bytes before it is
    /// published to writers lazily (an atomic they read under the lock).
    pub fn pin_next(&mut self, max_len: u64) -> Result<Attempt<Pin>> {
        let end = self.cursor.saturating_add(max_len).min(self.range.end);
        let range = self.cursor..end;
        if let Some(pin) = self.pin_lock_free(&range) {
            self.cursor = pin.range().end;
            self.released = self.cursor;
            let first_needed = if self.cursor >= self.range.end {
                u64::MAX
            } else {
                self.cursor / PAGE
            };
            self.lazy
                .released_page
                .fetch_max(first_needed, Ordering::Release);
            return Ok(Attempt::Ready(pin));
        }
        let attempt = self.attempt(range, true)?;
        if let Attempt::Ready(pin) = &attempt {
            self.cursor = pin.range().end;
            self.release_before(self.cursor);
        }
        Ok(attempt)
    }

    /// Pins `range` (inside the snapshot and not released) all at once: `Ready` only when
    /// every page is in memory. Does not move the position.
    pub fn pin(&mut self, range: Range<u64>) -> Result<Attempt<Pin>> {
        if range.start > range.end || range.start < self.range.start || range.end > self.range.end {
            return Err(Error::OutOfRange {
                start: range.start,
                end: range.end,
                len: self.range.end,
            });
        }
        if range.start < self.released {
            return Err(Error::Released {
                start: range.start,
                released_before: self.released,
            });
        }
        self.attempt(range, false)
    }

    /// Blocking [`Snapshot::pin`] for callers that may block (tools, tests): waits for fills
    /// and, within the back-pressure deadline, for frames.
    pub fn pin_blocking(&mut self, range: Range<u64>) -> Result<Pin> {
        loop {
            match self.pin(range.clone())? {
                Attempt::Ready(pin) => return Ok(pin),
                Attempt::Pending(pending) => {
                    let until = pending
                        .deadline()
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
                    pending.wait_until(until);
                }
            }
        }
    }

    /// Declares that bytes before `offset` will not be pinned through this snapshot again:
    /// old versions of pages wholly before it are let go. [`Snapshot::pin_next`] does this by
    /// itself; call it when pinning with [`Snapshot::pin`].
    pub fn release_before(&mut self, offset: u64) {
        let offset = offset.clamp(self.released, self.range.end);
        self.released = offset;
        self.cursor = self.cursor.max(offset);
        let first_needed = if offset >= self.range.end {
            u64::MAX
        } else {
            offset / PAGE
        };
        let mut st = self.file.state.lock_snapshots();
        st.snapshots()
            .release_before(&self.cache, self.id, first_needed);
    }

    /// [`Snapshot::pin_next`] always through the file lock, as before its lock-free path: for
    /// benchmarks comparing the two in one run, not for production use.
    #[doc(hidden)]
    pub fn pin_next_locked(&mut self, max_len: u64) -> Result<Attempt<Pin>> {
        let end = self.cursor.saturating_add(max_len).min(self.range.end);
        let attempt = self.attempt(self.cursor..end, true)?;
        if let Attempt::Ready(pin) = &attempt {
            self.cursor = pin.range().end;
            self.release_before(self.cursor);
        }
        Ok(attempt)
    }

    /// [`Snapshot::pin_next`] without the file lock: only while the file is at the snapshot's
    /// version (then no page of it was preserved or changed: every resident page of the file
    /// is the snapshot's) and the snapshot is valid; `None` leaves it to the locked path.
    fn pin_lock_free(&self, range: &Range<u64>) -> Option<Pin> {
        let cache = &*self.cache;
        if range.is_empty() {
            return None;
        }
        let pages = pages_covering(range);
        let needed_end = pages_covering(&self.range).end;
        let readahead = cache.config.readahead_max_pages as u64;
        // The far end of the read-ahead window must be resident, else the locked path starts
        // the fills behind this pin.
        let ahead = (readahead > 0 && pages.end < needed_end)
            .then(|| (pages.end + readahead).min(needed_end) - 1);
        let lazy = &self.lazy;
        let (frames, version) = crate::file::pin_resident(
            cache,
            self.file.state.published(),
            range,
            Some(self.identity.version),
            ahead,
            || !lazy.invalid.load(Ordering::Acquire),
        )?;
        cache.stats.pins.add(1);
        cache.stats.lock_free_pins.add(1);
        Some(Pin::new(
            self.anchor.clone(),
            range.clone(),
            version,
            pages.start,
            frames,
        ))
    }

    fn attempt(&mut self, range: Range<u64>, prefix_ok: bool) -> Result<Attempt<Pin>> {
        let cache = self.cache.clone();
        // Registered only after a first stall, then the attempt is made again (see
        // `CachedFile::run_now`).
        let mut waiter: Option<Waiter<'_>> = None;
        loop {
            let outcome = {
                let mut st = self.file.state.lock();
                self.try_pin(&mut st, &range, prefix_ok)
            };
            if matches!(outcome, Err(Stall::NeedFrames(_))) && waiter.is_none() {
                waiter = Some(cache.events.waiter());
                continue;
            }
            match outcome {
                Ok(pin) => {
                    self.frames_short_since = None;
                    return Ok(Attempt::Ready(pin));
                }
                Err(Stall::Restart) => continue,
                Err(Stall::Fatal(e)) => return Err(e),
                Err(Stall::Filling(ticket)) => return Attempt::after_fill(ticket),
                Err(Stall::NeedFrames(needed)) => {
                    let now = Instant::now();
                    let since = *self.frames_short_since.get_or_insert(now);
                    let timeout = match cache.config.backpressure {
                        Backpressure::Error => Duration::ZERO,
                        Backpressure::Wait { timeout } => timeout,
                    };
                    if now >= since + timeout {
                        self.frames_short_since = None;
                        StatCounters::add(&cache.stats.out_of_frames, 1);
                        return Err(Error::OutOfFrames { needed });
                    }
                    StatCounters::add(&cache.stats.frame_waits, 1);
                    let ticket = Ticket::new();
                    cache
                        .events
                        .park(&ticket, waiter.take().expect("registered"));
                    return Ok(Attempt::Pending(Pending::new(
                        ticket,
                        PendingReason::OutOfFrames { needed },
                        Some(since + timeout),
                    )));
                }
                Err(Stall::Pinned(_) | Stall::OldVersions(_) | Stall::Busy) => {
                    unreachable!("pins never wait for pins, old versions or other operations")
                }
            }
        }
    }

    fn try_pin(
        &self,
        st: &mut FileState,
        range: &Range<u64>,
        prefix_ok: bool,
    ) -> Result<Pin, Stall> {
        let entry = st
            .snapshots
            .entries
            .get(&self.id)
            .expect("an open snapshot has an entry");
        if let Some(reason) = entry.invalid {
            return Err(Error::SnapshotInvalidated { reason }.into());
        }
        let pages = pages_covering(range);
        let mut frames = Vec::with_capacity((pages.end - pages.start) as usize);
        for page in pages.clone() {
            match entry.preserved.get(&page).or_else(|| st.pages.get(&page)) {
                Some(&frame) => frames.push(frame),
                None => break,
            }
        }
        let readahead = self.cache.config.readahead_max_pages as u64;
        let available_end = pages.start + frames.len() as u64;
        if available_end < pages.end && (!prefix_ok || frames.is_empty()) {
            // The first missing page decides: wait for its fill (starting it, and the rest
            // of the range plus read-ahead, if needed).
            let wanted = available_end..(pages.end + readahead).min(self.needed_end(st));
            let skip = preserved_in(entry, &wanted);
            let started =
                fill::start_fills(&self.cache, &self.file, st, wanted, pages.clone(), &skip)?;
            return Err(match started.first {
                Some(ticket) => Stall::Filling(ticket),
                None => Stall::NeedFrames(started.short.max(1)),
            });
        }
        for &frame in &frames {
            self.cache.pin_locked(frame);
        }
        self.cache.stats.pins.add(1);
        let end = range.end.min(available_end * PAGE).max(range.start);
        let pin = Pin::new(
            self.anchor.clone(),
            range.start..end,
            self.identity.version,
            pages.start,
            frames.into_boxed_slice(),
        );
        if readahead > 0 {
            // Best effort, behind the pin: keeps the next pins from waiting for the disk.
            let ahead = available_end..(available_end + readahead).min(self.needed_end(st));
            let entry = &st.snapshots.entries[&self.id];
            let skip = preserved_in(entry, &ahead);
            if let Err(Stall::Fatal(e)) =
                fill::start_fills(&self.cache, &self.file, st, ahead.clone(), ahead, &skip)
            {
                tracing::debug!(error = %e, "pagecache: snapshot read-ahead failed");
            }
        }
        Ok(pin)
    }

    fn needed_end(&self, st: &FileState) -> u64 {
        st.snapshots.entries[&self.id].needed.end
    }
}

fn preserved_in(entry: &SnapEntry, pages: &Range<u64>) -> Vec<u64> {
    entry
        .preserved
        .keys()
        .copied()
        .filter(|p| pages.contains(p))
        .collect()
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let mut st = self.file.state.lock_snapshots();
        st.snapshots().remove(&self.cache, self.id);
    }
}
