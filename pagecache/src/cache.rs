//! The cache itself: configuration, the open-file registry, frame pinning primitives and
//! frame allocation with eviction.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::arena::{FrameArena, FrameId};
use crate::audit;
use crate::error::{Error, Result};
use crate::file::{CachedFile, FileShared, FileState, OpenOptions};
use crate::frames::{Events, FrameTable, Owner, HELD, ORPHAN, PIN_MASK};
use crate::io_pool::IoPool;
use crate::open_files::OpenFiles;
use crate::stats::{CacheStats, StatCounters};
use crate::writeback;

/// What an operation that needs a frame does when every frame is pinned or otherwise
/// unevictable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backpressure {
    /// Fail at once with [`Error::OutOfFrames`].
    Error,
    /// Wait up to `timeout` for pins to be released, then fail with [`Error::OutOfFrames`].
    Wait {
        /// Longest time to wait.
        timeout: Duration,
    },
}

/// What happens when keeping the old versions that open snapshots need would exceed
/// [`CacheConfig::old_version_limit_pages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldVersionPolicy {
    /// The writer waits for snapshots to let old versions go: non-blocking writes return
    /// [`crate::Attempt::Pending`] with [`crate::PendingReason::OldVersionLimit`] (and a
    /// deadline `timeout` from the call); blocking writes wait up to `timeout`, then fail
    /// with [`Error::OldVersionLimit`] having written nothing. Readers are never cut short.
    WriterWaits {
        /// Longest time a blocking writer waits (and the deadline of a pending one).
        timeout: Duration,
    },
    /// The write goes ahead at once; the oldest snapshots that need the room are
    /// invalidated (their next pin fails with [`Error::SnapshotInvalidated`]; bytes they
    /// already pinned stay valid).
    InvalidateSnapshots,
}

/// Configuration of a [`PageCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Soft limit on resident frames: above it, allocations first try to evict. The hard
    /// limit is the arena size. `None` means the arena size.
    pub soft_limit_frames: Option<usize>,
    /// Behaviour when no frame can be found.
    pub backpressure: Backpressure,
    /// Audit mode: prove at run time that pinned pages do not change. The crc32 of each frame
    /// version is recorded at its first pin; it is verified at every
    /// [`CacheConfig::audit_verify_every`]-th release of a pin of the frame and when the
    /// version ends (written while unpinned, evicted, freed). See
    /// [`CacheStats::audit_violations`] and the other `audit_*` counters.
    pub audit: bool,
    /// Audit mode: verify a frame's checksum at every N-th release of a pin of it (counted
    /// per frame, deterministic: releases 0, N, 2N, ...). 1 verifies every release (tests); 0
    /// only when the version ends. Larger N costs less (each verification is a crc32 of
    /// 4 KiB) and reports a violation later, never misses one that persists. Default 16.
    pub audit_verify_every: u32,
    /// Largest read-ahead window, in pages, for sequential pins (0 disables read-ahead).
    pub readahead_max_pages: usize,
    /// Most frames that may hold old versions kept for open snapshots
    /// ([`CacheStats::old_version_pages_now`]); `None` means a quarter of the arena.
    pub old_version_limit_pages: Option<usize>,
    /// What a write does when the old-version limit is reached.
    pub old_version_policy: OldVersionPolicy,
    /// Threads of the cache's I/O pool (background fills, writeback, fsync); at least 1.
    pub io_threads: usize,
    /// Most file descriptors the cache keeps open; least recently used ones are closed and
    /// reopened on demand.
    pub max_open_files: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            soft_limit_frames: None,
            backpressure: Backpressure::Error,
            audit: false,
            audit_verify_every: audit::DEFAULT_VERIFY_EVERY,
            readahead_max_pages: 32,
            old_version_limit_pages: None,
            old_version_policy: OldVersionPolicy::WriterWaits {
                timeout: Duration::from_secs(2),
            },
            io_threads: 2,
            max_open_files: 512,
        }
    }
}

#[derive(Default)]
struct Registry {
    by_path: HashMap<PathBuf, Arc<FileShared>>,
    by_id: HashMap<u32, Arc<FileShared>>,
    next_id: u32,
    /// Files replaced by [`PageCache::install`]: no longer under their path, still in
    /// `by_id` (their pages stay evictable) until nothing refers to them.
    replaced: Vec<Arc<FileShared>>,
}

/// State shared by the cache, its file handles and its pins.
pub(crate) struct CacheShared {
    pub arena: FrameArena,
    pub frames: FrameTable,
    pub stats: StatCounters,
    pub events: Events,
    pub config: CacheConfig,
    pub soft_limit: usize,
    /// Resolved [`CacheConfig::old_version_limit_pages`].
    pub old_version_limit: usize,
    /// Old-version frames held or reserved for open snapshots.
    old_versions: AtomicUsize,
    old_versions_peak: AtomicUsize,
    next_snapshot: AtomicU64,
    pub open_files: OpenFiles,
    pub io: IoPool,
    registry: Mutex<Registry>,
    /// Orders [`PageCache::install`] (write: taking the old entry off the path *and* the
    /// rename) against [`PageCache::open`] (read: finding or creating the path's entry). Without
    /// it an open between the two made a fresh entry on the old inode, which the rename then
    /// unlinked under it: its ctime moved, so its next fill or revalidation took the rename for
    /// an external edit and invalidated the snapshots being streamed from it (a GET during a
    /// PUT answered 500; `tests/replace_stress.rs`). A revalidation that found a difference
    /// holds it (read) to look again, so a rename in progress is not taken for an edit.
    pub(crate) paths: RwLock<()>,
}

/// The file a frame allocation is made for: its lock is already held by the caller, and
/// pages in `protect` (those the operation is about to use) must not be evicted. Without
/// `allow_io` (non-blocking callers) eviction skips dirty pages and has them written back in
/// the background instead of writing them on the caller's thread.
pub(crate) struct OwnFile<'a> {
    pub file: &'a Arc<FileShared>,
    pub state: &'a mut FileState,
    pub protect: Range<u64>,
    pub allow_io: bool,
}

/// A stable-page cache of files, storing pages in a [`FrameArena`].
///
/// Cheap to clone (`Arc`); `Send + Sync`.
#[derive(Clone)]
pub struct PageCache {
    shared: Arc<CacheShared>,
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache")
            .field("arena", &self.shared.arena)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl PageCache {
    /// Creates a cache whose frames live in `arena`.
    pub fn new(arena: FrameArena, config: CacheConfig) -> Result<Self> {
        let frame_count = arena.frame_count();
        let soft_limit = config
            .soft_limit_frames
            .unwrap_or(frame_count)
            .clamp(1, frame_count);
        let old_version_limit = config
            .old_version_limit_pages
            .unwrap_or(frame_count / 4)
            .min(frame_count);
        Ok(Self {
            shared: Arc::new_cyclic(|cache| CacheShared {
                frames: FrameTable::new(frame_count),
                arena,
                stats: StatCounters::default(),
                events: Events::default(),
                config,
                soft_limit,
                old_version_limit,
                old_versions: AtomicUsize::new(0),
                old_versions_peak: AtomicUsize::new(0),
                next_snapshot: AtomicU64::new(1),
                open_files: OpenFiles::new(config.max_open_files),
                io: IoPool::start(config.io_threads, cache.clone()),
                registry: Mutex::new(Registry::default()),
                paths: RwLock::new(()),
            }),
        })
    }

    /// Opens (or returns the already-open entry for) a file.
    ///
    /// Opening a path that is already cached revalidates it against the file on disk
    /// (size, mtime, ctime, inode); on a change, later pins see the new data.
    pub fn open(&self, path: impl AsRef<Path>, options: OpenOptions) -> Result<CachedFile> {
        let path = path.as_ref();
        self.sweep_replaced();
        let canonical = std::fs::canonicalize(path).map_err(|e| Error::io("open", path, e))?;
        // No install may take the entry off the path or rename over it until the entry found
        // or made here is under the path (it is then detached properly by the install).
        let paths = self.shared.paths.read();
        let existing = self.shared.registry.lock().by_path.get(&canonical).cloned();
        let file = match existing {
            Some(file) => {
                if options.writable {
                    file.ensure_writable_fd(&self.shared)?;
                }
                file
            }
            None => {
                let fresh = FileShared::open(0, canonical.clone(), options.writable)?;
                let mut registry = self.shared.registry.lock();
                if let Some(raced) = registry.by_path.get(&canonical).cloned() {
                    // Another thread opened it meanwhile: use theirs.
                    drop(registry);
                    if options.writable {
                        raced.ensure_writable_fd(&self.shared)?;
                    }
                    raced
                } else {
                    let id = registry.next_id;
                    registry.next_id += 1;
                    let file = Arc::new(fresh.with_id(id));
                    registry.by_path.insert(canonical, file.clone());
                    registry.by_id.insert(id, file.clone());
                    drop(registry);
                    let closed = self.shared.open_files.used(&file);
                    StatCounters::add(&self.shared.stats.files_closed, closed as u64);
                    file
                }
            }
        };
        drop(paths);
        let handle = CachedFile::new(self.shared.clone(), file, options);
        handle.revalidate()?;
        Ok(handle)
    }

    /// Replaces the file at `target` with the file at `new` by `rename(2)`: the way to
    /// publish a new version written elsewhere (a PUT received into a temporary file), atomic
    /// on disk, and without disturbing readers of the old version. The old file's entry is
    /// detached from the path first, its descriptor held open on the old inode (exempt from
    /// the open-file bound), so its open snapshots, handles and pins go on reading exactly the
    /// old contents however much of them was in memory; later opens of `target` see the new
    /// file. A detached entry goes away once nothing uses it
    /// ([`CacheStats::replaced_files_now`]). The parent directory is synced, so once this
    /// returns the replacement is durable (sync `new` itself before).
    ///
    /// Blocking (a rename and a directory sync): call it from an I/O thread. If the rename
    /// fails, snapshots of the old file are invalidated (the entry could no longer tell a
    /// change of its inode) and the error returned; `target` is unchanged.
    pub fn install(&self, new: &Path, target: &Path) -> Result<()> {
        self.sweep_replaced();
        // Detach and rename as one step for `open` (see `CacheShared::paths`).
        let paths = self.shared.paths.write();
        let detached = match std::fs::canonicalize(target) {
            Ok(canonical) => self.detach(&canonical),
            Err(_) => None, // nothing there yet
        };
        let renamed = std::fs::rename(new, target);
        drop(paths);
        if let Err(e) = renamed {
            if let Some(file) = detached {
                let mut st = file.state.lock();
                let ids: Vec<u64> = st.snapshots.entries.keys().copied().collect();
                for id in ids {
                    st.snapshots.invalidate(
                        &self.shared,
                        id,
                        crate::InvalidationReason::ExternalChange,
                    );
                }
            }
            return Err(Error::io("rename", target, e));
        }
        StatCounters::add(&self.shared.stats.installs, 1);
        if let Some(parent) = target.parent() {
            let dir = std::fs::File::open(parent).map_err(|e| Error::io("open", parent, e))?;
            dir.sync_all().map_err(|e| Error::io("fsync", parent, e))?;
        }
        Ok(())
    }

    /// Takes the entry of `canonical` off its path for [`PageCache::install`], keeping its
    /// descriptor open on the file the path names now (the old one).
    fn detach(&self, canonical: &Path) -> Option<Arc<FileShared>> {
        let file = self.shared.registry.lock().by_path.remove(canonical)?;
        // Before leaving the open-file bound, so its closing loop skips the file from now on.
        file.detached.store(true, Ordering::SeqCst);
        self.shared.open_files.forget(&file);
        {
            let mut st = file.state.lock();
            if st.fd.is_none() {
                // The bound had closed it; the path still names the old file. A change found on
                // reopening is applied as an external change (snapshots keep or are invalidated).
                let _ = st.io_fd(&self.shared, &file);
            }
        }
        self.shared.registry.lock().replaced.push(file.clone());
        Some(file)
    }

    /// Drops replaced files nothing refers to any more: their pages (old contents no path
    /// names) are freed and their descriptors closed.
    fn sweep_replaced(&self) {
        let mut registry = self.shared.registry.lock();
        let Registry {
            replaced, by_id, ..
        } = &mut *registry;
        replaced.retain(|file| {
            // Held only by `by_id` and this list: no handle, snapshot or I/O job is left.
            if Arc::strong_count(file) > 2 {
                return true;
            }
            let Some(mut st) = file.state.try_lock() else {
                return true;
            };
            if !st.dirty.is_empty() || !st.writing_back.is_empty() || !st.filling.is_empty() {
                return true; // writeback still has work on the old inode; later
            }
            let pages = st.pages.take_all();
            for (_, frame) in pages {
                self.shared.orphan(frame);
            }
            drop(st);
            by_id.remove(&file.id);
            false
        });
    }

    /// Writes back the dirty pages of every cached file (without fsync).
    pub fn writeback_all(&self) -> Result<()> {
        self.sync_files(false).map(|_| ())
    }

    /// Writes back the dirty pages of every cached file and makes them durable
    /// (`fdatasync` of each file that had any): for an orderly stop. Returns how many files
    /// were synced, or the first error (every file is still tried).
    pub fn sync_all(&self) -> Result<usize> {
        self.sync_files(true)
    }

    /// Writes back every cached file's dirty pages, and with `durable` fdatasyncs each file
    /// that had any; returns how many were synced, or the first error (every file is tried).
    fn sync_files(&self, durable: bool) -> Result<usize> {
        let files: Vec<_> = self
            .shared
            .registry
            .lock()
            .by_id
            .values()
            .cloned()
            .collect();
        let mut first_error = None;
        let mut synced = 0;
        for file in files {
            let result = writeback::writeback_file(&self.shared, &file).and_then(|written| {
                match written > 0 && durable {
                    true => writeback::fsync_file(&self.shared, &file).map(|()| 1),
                    false => Ok(0),
                }
            });
            match result {
                Ok(n) => synced += n,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(synced), Err)
    }

    /// A snapshot of the cache's counters.
    pub fn stats(&self) -> CacheStats {
        self.shared.stats_snapshot()
    }

    /// The arena the cache stores its frames in (its [`FrameArena::memory`] is what the driver
    /// maps for the device).
    pub fn arena(&self) -> &FrameArena {
        &self.shared.arena
    }

    /// Most frames that may hold old versions for open snapshots (the resolved
    /// [`CacheConfig::old_version_limit_pages`]).
    pub fn old_version_limit(&self) -> usize {
        self.shared.old_version_limit
    }

    /// The configuration the cache was created with.
    pub fn config(&self) -> &CacheConfig {
        &self.shared.config
    }
}

impl CacheShared {
    pub fn stats_snapshot(&self) -> CacheStats {
        let free = self.frames.free_count() as u64;
        let mut stats = self
            .stats
            .snapshot(self.arena.frame_count() as u64 - free, free);
        stats.old_version_pages_now = self.old_versions_now() as u64;
        stats.old_version_pages_peak = self.old_versions_peak.load(Ordering::Relaxed) as u64;
        stats.open_files_now = self.open_files.open_count() as u64;
        stats.replaced_files_now = self.registry.lock().replaced.len() as u64;
        stats
    }

    pub fn next_snapshot_id(&self) -> u64 {
        self.next_snapshot.fetch_add(1, Ordering::Relaxed)
    }

    pub fn old_versions_now(&self) -> usize {
        self.old_versions.load(Ordering::SeqCst)
    }

    /// Reserves room for `n` old-version frames under the limit; all or nothing. Reserving
    /// before deciding (rather than counting after) keeps the limit exact with writers on
    /// several files at once.
    pub fn reserve_old(&self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let reserved = self
            .old_versions
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                (now + n <= self.old_version_limit).then_some(now + n)
            });
        match reserved {
            Ok(before) => {
                self.old_versions_peak
                    .fetch_max(before + n, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back reserved room (a prepared change that was discarded).
    pub fn unreserve_old(&self, n: usize) {
        if n > 0 {
            self.old_versions.fetch_sub(n, Ordering::SeqCst);
            self.events.notify();
        }
    }

    /// Marks `frame` as an old version held for snapshots (its room was reserved). A frame
    /// still mapped in a page table is orphaned by the caller right after (the change that
    /// replaces it); a `fresh` frame (read from disk just for the snapshots) is orphaned here.
    pub fn hold(&self, frame: FrameId, fresh: bool) {
        let flags = if fresh { HELD | ORPHAN } else { HELD };
        self.frames
            .meta(frame)
            .state
            .fetch_or(flags, Ordering::SeqCst);
    }

    /// The last snapshot let go of an old-version frame: free it unless a pin still holds
    /// it (then its last unpin frees it).
    pub fn release_hold(&self, frame: FrameId) {
        let meta = self.frames.meta(frame);
        let previous = meta.state.fetch_and(!HELD, Ordering::SeqCst);
        debug_assert!(previous & HELD != 0, "release_hold of a frame not held");
        debug_assert!(previous & ORPHAN != 0, "a held frame is always an orphan");
        if previous & PIN_MASK == 0 {
            self.free(frame);
        }
        self.old_versions.fetch_sub(1, Ordering::SeqCst);
        self.events.notify();
    }

    fn file_by_id(&self, id: u32) -> Option<Arc<FileShared>> {
        self.registry.lock().by_id.get(&id).cloned()
    }

    /// Pins a frame mapped in a file's page table. The caller holds that file's lock, which
    /// is what makes the zero-to-one transition race-free against writers.
    #[inline]
    pub fn pin_locked(&self, frame: FrameId) {
        let meta = self.frames.meta(frame);
        let previous = meta.state.fetch_add(1, Ordering::SeqCst);
        debug_assert!(previous & PIN_MASK < PIN_MASK, "pin count overflow");
        if previous & PIN_MASK == 0 {
            self.stats.pinned_pages.add_one();
        }
        if self.config.audit {
            audit::on_pin(&self.arena, frame, meta, &self.stats);
        }
        if !meta.referenced.load(Ordering::Relaxed) {
            meta.referenced.store(true, Ordering::Relaxed);
        }
    }

    /// Adds a pin to a frame the caller already holds a pin on (no lock needed: a pinned
    /// frame can be neither written nor freed).
    #[inline]
    pub fn pin_again(&self, frame: FrameId) {
        let previous = self.frames.meta(frame).state.fetch_add(1, Ordering::SeqCst);
        debug_assert!(previous & PIN_MASK != 0, "pin_again on an unpinned frame");
    }

    /// Releases one pin. The last release of an orphaned frame frees it; the last release of
    /// any frame wakes writers waiting for it.
    #[inline]
    pub fn unpin(&self, frame: FrameId) {
        let meta = self.frames.meta(frame);
        if self.config.audit {
            // While the pin is still held: the bytes must be the recorded ones.
            audit::on_release(
                &self.arena,
                frame,
                meta,
                self.config.audit_verify_every,
                &self.stats,
            );
        }
        let previous = meta.state.fetch_sub(1, Ordering::SeqCst);
        self.after_unpin(frame, previous);
    }

    /// Pins `frame` without the file lock if it is still in `incarnation` with no flag
    /// (see `fast`): one compare-and-swap on the frame's own cache line. Returns false
    /// (changing nothing) if the frame was freed, evicted, replaced or is held.
    #[inline]
    pub fn pin_lock_free(&self, frame: FrameId, incarnation: u32) -> bool {
        let Some(meta) = self.frames.meta.get(frame as usize) else {
            return false;
        };
        let mut current = meta.state.load(Ordering::Relaxed);
        loop {
            if crate::frames::incarnation(current) != incarnation
                || current & (ORPHAN | HELD) != 0
                || current & PIN_MASK == PIN_MASK
            {
                return false;
            }
            // SeqCst: the pinner's half of the Dekker pattern (this CAS, then the sequence
            // load); see `fast`.
            match meta.state.compare_exchange_weak(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        if current & PIN_MASK == 0 {
            self.stats.pinned_pages.add_one();
        }
        if !meta.referenced.load(Ordering::Relaxed) {
            meta.referenced.store(true, Ordering::Relaxed);
        }
        true
    }

    /// Gives back a pin taken by [`CacheShared::pin_lock_free`] whose snapshot turned out
    /// not to be valid (the file changed meanwhile): its bytes were never used, so there is
    /// nothing to audit; otherwise as [`CacheShared::unpin`].
    pub fn unpin_unused(&self, frame: FrameId) {
        let previous = self.frames.meta(frame).state.fetch_sub(1, Ordering::SeqCst);
        self.after_unpin(frame, previous);
    }

    /// After a release that left the state word at `previous - 1`.
    #[inline]
    fn after_unpin(&self, frame: FrameId, previous: u64) {
        debug_assert!(previous & PIN_MASK != 0, "unpin of an unpinned frame");
        if previous & PIN_MASK == 1 {
            self.stats.pinned_pages.sub_one();
            if previous & ORPHAN != 0 && previous & HELD == 0 {
                // We were the last holder of a frame no file maps any more (and lock-free
                // pinners refuse orphans, so nobody pins it again).
                self.free(frame);
            }
            self.events.notify();
        }
    }

    /// Detaches a frame from its file page (copy-on-write replacement, truncation,
    /// invalidation). Called under the file's lock after removing it from the page table.
    /// The frame is freed now if unpinned and not held for snapshots, else by its last unpin
    /// or [`CacheShared::release_hold`].
    pub fn orphan(&self, frame: FrameId) {
        self.frames.set_owner(frame, None);
        let previous = self
            .frames
            .meta(frame)
            .state
            .fetch_or(ORPHAN, Ordering::SeqCst);
        if previous & PIN_MASK == 0 && previous & HELD == 0 {
            self.free(frame);
            self.events.notify();
        }
    }

    /// Frees a frame that held a file page and that nobody pins, holds or maps any more (so
    /// the caller has exclusive use of it): in audit mode its version ends here.
    fn free(&self, frame: FrameId) {
        self.end_of_version(frame);
        self.frames.put_free(&[frame]);
    }

    /// Audit mode: the frame's bytes are about to change or go, legitimately (the caller has
    /// exclusive use of the frame): verify and clear its recorded checksum (see `audit`).
    #[inline]
    pub fn end_of_version(&self, frame: FrameId) {
        if self.config.audit {
            audit::end_of_version(&self.arena, frame, self.frames.meta(frame), &self.stats);
        }
    }

    /// Audit mode: a pin of `frame` was validated; record the checksum of its version if
    /// none is yet.
    #[inline]
    pub fn audit_pinned(&self, frame: FrameId) {
        if self.config.audit {
            audit::on_pin(&self.arena, frame, self.frames.meta(frame), &self.stats);
        }
    }

    /// Gives back frames that were allocated but not used.
    pub fn release_unused(&self, frames: &[FrameId]) {
        if !frames.is_empty() {
            self.frames.put_free(frames);
            self.events.notify();
        }
    }

    /// Allocates `n` frames, evicting clean or written-back unpinned pages as needed.
    /// All or nothing: returns `None` (allocating nothing) if `n` frames cannot be found.
    pub fn alloc_frames(&self, n: usize, own: &mut OwnFile<'_>) -> Option<Vec<FrameId>> {
        let got = self.alloc_best_effort(n, own);
        if got.len() < n {
            self.release_unused(&got);
            return None;
        }
        Some(got)
    }

    /// Allocates up to `n` frames, evicting as needed; may return fewer.
    pub fn alloc_best_effort(&self, n: usize, own: &mut OwnFile<'_>) -> Vec<FrameId> {
        let mut got = Vec::with_capacity(n);
        if n == 0 {
            return got;
        }
        // Above the soft limit, prefer recycling cold pages over taking free frames.
        let resident = self.frames.resident();
        if resident + n > self.soft_limit {
            let over = (resident + n - self.soft_limit).min(n);
            self.evict_into(over, own, &mut got);
        }
        let rest = n - got.len();
        got.extend(self.frames.take_free(rest, usize::MAX));
        if got.len() < n {
            let missing = n - got.len();
            self.evict_into(missing, own, &mut got);
        }
        got
    }

    /// Evicts up to `want` pages and appends their frames to `got`.
    fn evict_into(&self, want: usize, own: &mut OwnFile<'_>, got: &mut Vec<FrameId>) {
        let mut evicted = 0;
        // Two passes: the first may only clear referenced bits.
        for _ in 0..2 {
            if evicted == want {
                break;
            }
            let candidates = self.frames.clock_candidates(want - evicted);
            for (frame, owner) in candidates {
                if self.evict_candidate(frame, owner, own) {
                    got.push(frame);
                    evicted += 1;
                    if evicted == want {
                        break;
                    }
                }
            }
        }
    }

    fn evict_candidate(&self, frame: FrameId, owner: Owner, own: &mut OwnFile<'_>) -> bool {
        let evicted = if owner.file_id == own.file.id {
            !own.protect.contains(&owner.page)
                && writeback::evict_page(self, own.file, own.state, owner.page, frame, own.allow_io)
        } else {
            let Some(file) = self.file_by_id(owner.file_id) else {
                return false;
            };
            // Never block on another file's lock while holding ours (lock-order freedom).
            let Some(mut state) = file.state.try_lock() else {
                return false;
            };
            writeback::evict_page(self, &file, &mut state, owner.page, frame, own.allow_io)
        };
        if evicted {
            StatCounters::add(&self.stats.evictions, 1);
        }
        evicted
    }

    /// Writes back everything when the cache goes away (best effort).
    fn flush_on_drop(&self) {
        let files: Vec<_> = self.registry.lock().by_id.values().cloned().collect();
        for file in files {
            if let Err(e) = writeback::writeback_file(self, &file) {
                tracing::warn!(error = %e, "pagecache: writeback on drop failed");
            }
        }
    }
}

impl Drop for CacheShared {
    fn drop(&mut self) {
        self.flush_on_drop();
    }
}
