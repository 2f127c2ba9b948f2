//! Cached files: opening, filling pages from disk (with read-ahead), pinning, snapshots,
//! revalidation against the file on disk, and the loops that retry an operation after a
//! stall (blocking) or report it as pending (non-blocking). Writes live in `write`.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use crate::arena::{FrameId, PAGE_SIZE};
use crate::cache::{Backpressure, CacheShared, OldVersionPolicy, OwnFile};
use crate::error::{Error, Result};
use crate::fast::{Published, Slot, MAX_FAST_PAGES};
use crate::frames::{FrameTable, Waiter, PIN_MASK};
use crate::identity::{DiskIdentity, FileIdentity};
use crate::pin::{Anchor, Anchors, Pin};
use crate::snapshot::{Snapshot, Snapshots};
use crate::stats::StatCounters;
use crate::ticket::{Attempt, Pending, PendingReason, Ticket};
use crate::writeback;

const PAGE: u64 = PAGE_SIZE as u64;

/// What a writer does about pages that are pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePolicy {
    /// Wait until no page the write touches is pinned (like the kernel's stable pages), at
    /// most `timeout`; then fail with [`Error::WriteTimeout`] having written nothing.
    Wait {
        /// Longest time to wait for pins to be released.
        timeout: Duration,
    },
    /// Never wait: a pinned page is copied to a new frame which takes the write; pins keep
    /// the old version, which is freed when its last pin goes.
    CopyOnWrite,
    /// **Test only** (`cfg(test)` or feature `test-hooks`): write straight into pinned
    /// frames, as Linux `sendfile` effectively allows. Breaks the guarantee on purpose so
    /// that corruption detectors (the audit mode, checksums in other crates) can be shown
    /// to fire.
    #[cfg(any(test, feature = "test-hooks"))]
    InPlaceUnsafe,
}

/// How to open a file in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Whether the handle may write (`write`, `set_len`, `fsync`).
    pub writable: bool,
    /// How this handle's writes treat pinned pages.
    pub policy: WritePolicy,
}

impl Default for OpenOptions {
    /// Read-only; the policy is irrelevant for a read-only handle and set to copy-on-write.
    fn default() -> Self {
        Self {
            writable: false,
            policy: WritePolicy::CopyOnWrite,
        }
    }
}

impl OpenOptions {
    /// A read-only handle.
    pub fn read_only() -> Self {
        Self::default()
    }

    /// A read-write handle with the given write policy.
    pub fn read_write(policy: WritePolicy) -> Self {
        Self {
            writable: true,
            policy,
        }
    }
}

/// Cheap hasher for page indices (the page table is hit on every pin).
#[derive(Default)]
pub(crate) struct PageIndexHasher(u64);

impl Hasher for PageIndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        let x = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

type PageMap = HashMap<u64, FrameId, BuildHasherDefault<PageIndexHasher>>;

/// A file's page table (page index -> frame), mirrored into the lock-free [`SlotTree`] of
/// its [`Published`] state on every change, so lock-free pinners see exactly the frames the
/// table maps (with each frame's incarnation at mapping time). Reads go through `Deref` to
/// the map; the only ways to change it are the methods below, which keep the mirror.
pub(crate) struct PageTable {
    map: PageMap,
    published: Arc<Published>,
}

impl std::ops::Deref for PageTable {
    type Target = PageMap;
    fn deref(&self) -> &PageMap {
        &self.map
    }
}

impl PageTable {
    fn new(published: Arc<Published>) -> Self {
        Self {
            map: PageMap::default(),
            published,
        }
    }

    /// Maps `page` to `frame`, a frame just allocated (not mapped elsewhere).
    pub fn insert(&mut self, page: u64, frame: FrameId, frames: &FrameTable) -> Option<FrameId> {
        let state = frames.meta(frame).state.load(Ordering::SeqCst);
        self.published.slots.set(
            page,
            Some(Slot {
                frame,
                incarnation: crate::frames::incarnation(state),
            }),
        );
        self.map.insert(page, frame)
    }

    pub fn remove(&mut self, page: &u64) -> Option<FrameId> {
        self.published.slots.set(*page, None);
        self.map.remove(page)
    }

    /// Unmaps every page.
    pub fn take_all(&mut self) -> Vec<(u64, FrameId)> {
        let all: Vec<(u64, FrameId)> = self.map.drain().collect();
        for &(page, _) in &all {
            self.published.slots.set(page, None);
        }
        all
    }

    /// The lock-free state this table publishes into.
    pub fn published(&self) -> &Published {
        &self.published
    }
}

/// The lock of a file's [`FileState`]. Taking it makes the file's published sequence odd, and
/// letting go publishes length and version and makes it even again (see `fast`), so every
/// change made under the lock is seen by lock-free pinners, which then back out. Reading
/// without changing anything goes through [`StateLock::read`], which leaves the sequence
/// alone (lock-free pins go on meanwhile).
pub(crate) struct StateLock {
    mutex: Mutex<FileState>,
    published: Arc<Published>,
}

/// The file lock, held for changing: see [`StateLock`].
pub(crate) struct StateGuard<'a> {
    guard: MutexGuard<'a, FileState>,
    published: &'a Published,
}

impl StateLock {
    fn new(state: FileState, published: Arc<Published>) -> Self {
        published.len.store(state.len, Ordering::Release);
        published.version.store(state.version, Ordering::Release);
        Self {
            mutex: Mutex::new(state),
            published,
        }
    }

    pub fn lock(&self) -> StateGuard<'_> {
        let guard = self.mutex.lock();
        self.published.begin();
        StateGuard {
            guard,
            published: &self.published,
        }
    }

    pub fn try_lock(&self) -> Option<StateGuard<'_>> {
        let guard = self.mutex.try_lock()?;
        self.published.begin();
        Some(StateGuard {
            guard,
            published: &self.published,
        })
    }

    /// The lock for changing the file's snapshot registry only (opening, releasing and closing
    /// snapshots): no page, byte, length or version can change through it, so it leaves the
    /// sequence alone and lock-free pins of the file go on meanwhile (a server opening and
    /// closing a snapshot per response would otherwise send every concurrent lock-free pin of
    /// the file to the locked path). Freeing old-version frames through it is fine: they are
    /// held orphans, which no page table maps and lock-free pinners refuse.
    pub fn lock_snapshots(&self) -> SnapshotsGuard<'_> {
        SnapshotsGuard {
            guard: self.mutex.lock(),
        }
    }

    /// The lock for reading only: no change is possible through it (`Deref` only).
    pub fn read(&self) -> impl std::ops::Deref<Target = FileState> + '_ {
        self.mutex.lock()
    }

    pub fn published(&self) -> &Published {
        &self.published
    }
}

/// The file lock, held for the snapshot registry only: see [`StateLock::lock_snapshots`].
pub(crate) struct SnapshotsGuard<'a> {
    guard: MutexGuard<'a, FileState>,
}

impl SnapshotsGuard<'_> {
    pub fn snapshots(&mut self) -> &mut Snapshots {
        &mut self.guard.snapshots
    }
}

impl std::ops::Deref for SnapshotsGuard<'_> {
    type Target = FileState;
    fn deref(&self) -> &FileState {
        &self.guard
    }
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = FileState;
    fn deref(&self) -> &FileState {
        &self.guard
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut FileState {
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        // Before the mutex is let go (fields drop after this): the next holder's odd window
        // starts from an even sequence.
        self.published.end(self.guard.len, self.guard.version);
    }
}
/// Pages being read by the I/O pool, with the ticket of their fill.
pub(crate) type FillTable = HashMap<u64, Ticket, BuildHasherDefault<PageIndexHasher>>;

/// Mutable state of a cached file, behind its lock ([`StateLock`]). Every operation that
/// changes which bytes the file holds (write, truncate, invalidate, fill, evict) takes this
/// lock, and so does every pin that is not served lock-free; lock-free pins validate against
/// the sequence the lock publishes, which is what keeps a multi-page pin an atomic snapshot
/// either way.
pub(crate) struct FileState {
    /// `None` while closed by the open-file bound ([`crate::CacheConfig::max_open_files`]);
    /// reopened by [`FileState::io_fd`].
    pub fd: Option<Arc<fs::File>>,
    pub fd_writable: bool,
    /// Length of the file as seen through the cache (may exceed the disk's until writeback).
    pub len: u64,
    /// Incremented on every change of content or length.
    pub version: u64,
    pub pages: PageTable,
    pub filling: FillTable,
    pub dirty: BTreeSet<u64>,
    /// Pages a writeback is writing now (it collected them under the lock and writes them
    /// without it). Eviction must not write a newer version of such a page: the older write
    /// could land after it and leave stale bytes on disk.
    pub writing_back: BTreeSet<u64>,
    /// Counts the cache's own changes to the file on disk (writebacks, truncation), so a
    /// background fill can tell an identity change it did not cause (see `fill`).
    pub own_disk_writes: u64,
    /// Open snapshots and the old versions they hold.
    pub snapshots: Snapshots,
    /// The file on disk as last seen (after our own writes, refreshed by fstat).
    pub disk: DiskIdentity,
    /// The version whose bytes `disk` describes (see [`FileIdentity::matches_disk`]).
    pub disk_version: u64,
    /// Current read-ahead window in pages.
    readahead_pages: usize,
}

impl FileState {
    pub fn identity(&self) -> FileIdentity {
        FileIdentity::new(
            &self.disk,
            self.len,
            self.version,
            self.disk_version == self.version,
        )
    }

    /// The descriptor for I/O, reopened if the open-file bound closed it. Reopening checks
    /// the file's identity: if it changed while closed, the change is applied as an external
    /// change and [`Stall::Restart`] returned (the caller starts over with the new state).
    pub fn io_fd(
        &mut self,
        cache: &CacheShared,
        file: &Arc<FileShared>,
    ) -> Result<Arc<fs::File>, Stall> {
        if let Some(fd) = &self.fd {
            let fd = fd.clone();
            let closed = cache.open_files.used(file);
            StatCounters::add(&cache.stats.files_closed, closed as u64);
            return Ok(fd);
        }
        let fd = open_fd(&file.path, self.fd_writable)?;
        let meta = fd
            .metadata()
            .map_err(|e| Error::io("fstat", &file.path, e))?;
        let now = DiskIdentity::of(&meta);
        let fd = Arc::new(fd);
        self.fd = Some(fd.clone());
        StatCounters::add(&cache.stats.files_reopened, 1);
        let closed = cache.open_files.used(file);
        StatCounters::add(&cache.stats.files_closed, closed as u64);
        // Not during our own writeback: its writes are not another program's (see
        // `CachedFile::revalidate`).
        if now != self.disk && !self.own_write_in_flight() {
            apply_external_change(cache, &file.path, self, now);
            return Err(Stall::Restart);
        }
        Ok(fd)
    }

    /// The cache's own writeback of this file is between its first write and the moment it
    /// records the file's new identity: the file on disk differs from `disk` because of us.
    pub fn own_write_in_flight(&self) -> bool {
        !self.writing_back.is_empty()
    }

    /// After our own writes, remember the file's new identity so revalidation does not take
    /// it for an external change; if nothing is dirty and the identity visibly changed, it
    /// now describes the current version.
    pub fn refresh_disk_identity(&mut self, fd: &fs::File) {
        if let Ok(meta) = fd.metadata() {
            let now = DiskIdentity::of(&meta);
            let changed = now != self.disk;
            self.disk = now;
            if changed && self.dirty.is_empty() {
                self.disk_version = self.version;
            }
        }
    }
}

fn open_fd(path: &Path, writable: bool) -> Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| Error::io("open", path, e))
}

/// The file on disk is not what the cache saw: the external writer wins. Snapshots keep the
/// resident pages they need (or are invalidated), cached pages are dropped (pins keep their
/// bytes), fills in flight are cancelled, unwritten cached writes are discarded (with a
/// warning) and the version moves on.
pub(crate) fn apply_external_change(
    cache: &CacheShared,
    path: &Path,
    st: &mut FileState,
    now: DiskIdentity,
) {
    st.snapshots.keep_for_external_change(cache, &st.pages);
    if !st.dirty.is_empty() {
        tracing::warn!(
            path = %path.display(),
            dirty_pages = st.dirty.len(),
            "pagecache: file changed on disk; discarding unwritten cached writes"
        );
        st.dirty.clear();
    }
    let pages = st.pages.take_all();
    for (_, frame) in pages {
        cache.orphan(frame);
    }
    st.filling.clear();
    st.len = now.size;
    st.version += 1;
    st.disk = now;
    st.disk_version = st.version;
    st.pages
        .published()
        .next_sequential_page
        .store(0, Ordering::Relaxed);
    st.readahead_pages = 0;
    StatCounters::add(&cache.stats.external_changes, 1);
    tracing::debug!(path = %path.display(), "pagecache: external change detected");
}

/// A cached file, shared by all its handles.
pub(crate) struct FileShared {
    pub id: u32,
    pub path: PathBuf,
    pub state: StateLock,
    /// Serializes writeback against truncation, so a writeback in flight cannot re-extend a
    /// file that was just truncated.
    pub io_lock: Mutex<()>,
    /// A background writeback is queued (see `writeback::schedule_writeback`).
    pub writeback_queued: AtomicBool,
    /// Replaced by [`crate::PageCache::install`]: no path names this file any more; its
    /// descriptor stays open on the old inode and it is never revalidated against the path.
    pub detached: AtomicBool,
}

impl FileShared {
    pub fn open(id: u32, path: PathBuf, writable: bool) -> Result<Self> {
        let fd = open_fd(&path, writable)?;
        let meta = fd.metadata().map_err(|e| Error::io("fstat", &path, e))?;
        let disk = DiskIdentity::of(&meta);
        let published = Arc::new(Published::default());
        Ok(Self {
            id,
            state: StateLock::new(
                FileState {
                    fd: Some(Arc::new(fd)),
                    fd_writable: writable,
                    len: disk.size,
                    version: 1,
                    pages: PageTable::new(published.clone()),
                    filling: FillTable::default(),
                    dirty: BTreeSet::new(),
                    writing_back: BTreeSet::new(),
                    own_disk_writes: 0,
                    snapshots: Snapshots::default(),
                    disk,
                    disk_version: 1,
                    readahead_pages: 0,
                },
                published,
            ),
            path,
            io_lock: Mutex::new(()),
            writeback_queued: AtomicBool::new(false),
            detached: AtomicBool::new(false),
        })
    }

    pub fn with_id(mut self, id: u32) -> Self {
        self.id = id;
        self
    }

    /// Upgrades the shared descriptor to read-write if a writable handle is opened on a file
    /// first opened read-only (or reopens it, if the open-file bound had closed it).
    pub fn ensure_writable_fd(self: &Arc<Self>, cache: &CacheShared) -> Result<()> {
        let mut st = self.state.lock();
        if !st.fd_writable {
            st.fd = Some(Arc::new(open_fd(&self.path, true)?));
            st.fd_writable = true;
            let closed = cache.open_files.used(self);
            StatCounters::add(&cache.stats.files_closed, closed as u64);
        }
        Ok(())
    }

    /// The file an allocation under this file's lock is made for.
    pub fn own<'a>(
        self: &'a Arc<Self>,
        st: &'a mut FileState,
        protect: Range<u64>,
        allow_io: bool,
    ) -> OwnFile<'a> {
        OwnFile {
            file: self,
            state: st,
            protect,
            allow_io,
        }
    }
}

/// Why an attempt under the file lock could not complete.
pub(crate) enum Stall {
    Fatal(Error),
    NeedFrames(usize),
    /// A `Wait` writer found this many touched pages pinned.
    Pinned(usize),
    /// A page the operation needs is being read by the I/O pool.
    Filling(Ticket),
    /// Keeping old versions for snapshots would exceed the limit by this many pages
    /// ([`OldVersionPolicy::WriterWaits`]).
    OldVersions(usize),
    /// The file's state changed under the attempt (an external change found on reopening
    /// its descriptor); try again at once.
    Restart,
    /// Another operation on the file (a writeback) is running; only non-blocking callers
    /// see this, instead of waiting for its lock.
    Busy,
}

impl From<Error> for Stall {
    fn from(e: Error) -> Self {
        Stall::Fatal(e)
    }
}

/// Whether an operation may do disk I/O on the caller's thread (the blocking API, as before)
/// or must leave it to the I/O pool and report the operation as pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Io {
    Inline,
    Background,
}

/// A handle on a cached file. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct CachedFile {
    pub(crate) cache: Arc<CacheShared>,
    pub(crate) shared: Arc<FileShared>,
    pub(crate) options: OpenOptions,
    /// What this handle's pins hold the cache by, one per thread shard (see [`Anchors`]).
    anchors: Arc<Anchors>,
}

impl std::fmt::Debug for CachedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedFile")
            .field("path", &self.shared.path)
            .field("options", &self.options)
            .finish()
    }
}

/// Test hook (feature `test-hooks`): lock-free pins skip the re-check of the file's sequence,
/// so a pin may overlap a change. Switches the guarantee off for the lock-free path on purpose,
/// to show that the stress test catches it.
#[cfg(any(test, feature = "test-hooks"))]
static SKIP_RECHECK: AtomicBool = AtomicBool::new(false);

#[cfg(any(test, feature = "test-hooks"))]
fn skip_recheck() -> bool {
    SKIP_RECHECK.load(Ordering::Relaxed)
}

#[cfg(not(any(test, feature = "test-hooks")))]
fn skip_recheck() -> bool {
    false
}

/// **Test only** (feature `test-hooks`): makes lock-free pins skip their validation (see
/// [`CachedFile::pin`]), breaking the stable-page guarantee on purpose.
#[cfg(any(test, feature = "test-hooks"))]
#[doc(hidden)]
pub fn set_unsafe_skip_pin_recheck(skip: bool) {
    SKIP_RECHECK.store(skip, Ordering::Relaxed);
}

/// The core of every lock-free pin (see `fast`): pins the resident pages covering `range`
/// (non-empty) as one version of the file and returns their frames and that version, or
/// `None` (nothing pinned) when the locked path must decide: the range reaches past the
/// published length or spans more than [`MAX_FAST_PAGES`], a page is not resident, the file
/// is not at `want_version` (when given), page `ahead` (when given and inside the file) is
/// not resident (read-ahead is due: the locked path starts it), `still_valid` says no (read
/// inside the validated window), or the file changed meanwhile.
pub(crate) fn pin_resident(
    cache: &CacheShared,
    published: &Published,
    range: &Range<u64>,
    want_version: Option<u64>,
    ahead: Option<u64>,
    still_valid: impl Fn() -> bool,
) -> Option<(Box<[FrameId]>, u64)> {
    const ATTEMPTS: usize = 2;
    let pages = pages_covering(range);
    if pages.is_empty() || pages.end - pages.start > MAX_FAST_PAGES {
        return None;
    }
    for _ in 0..ATTEMPTS {
        let seq = published.seq.load(Ordering::Acquire);
        if seq & 1 != 0 && !skip_recheck() {
            std::hint::spin_loop();
            continue;
        }
        let len = published.len.load(Ordering::Acquire);
        let version = published.version.load(Ordering::Acquire);
        if range.end > len || want_version.is_some_and(|v| v != version) {
            return None; // the locked path reports it (or sees a newer state)
        }
        if let Some(ahead) = ahead {
            if ahead < len.div_ceil(PAGE) && published.slots.get(ahead).is_none() {
                return None;
            }
        }
        let mut frames = Vec::with_capacity((pages.end - pages.start) as usize);
        let mut complete = true;
        for page in pages.clone() {
            match published.slots.get(page) {
                Some(slot) if cache.pin_lock_free(slot.frame, slot.incarnation) => {
                    frames.push(slot.frame)
                }
                _ => {
                    complete = false;
                    break;
                }
            }
        }
        // SeqCst: after the pins' CASes (the pinner's half of the Dekker pattern).
        let valid = complete
            && still_valid()
            && (published.seq.load(Ordering::SeqCst) == seq || skip_recheck());
        if !valid {
            for &frame in &frames {
                cache.unpin_unused(frame);
            }
            if !complete {
                return None;
            }
            continue;
        }
        for &frame in &frames {
            cache.audit_pinned(frame);
        }
        return Some((frames.into_boxed_slice(), version));
    }
    None
}

pub(crate) fn pages_covering(range: &Range<u64>) -> Range<u64> {
    if range.is_empty() {
        return range.start / PAGE..range.start / PAGE;
    }
    range.start / PAGE..(range.end - 1) / PAGE + 1
}

/// How long a blocking caller waits for a fill before looking again (fills end by
/// themselves; this only bounds a wait on a ticket that a shutdown dropped).
const FILL_WAIT: Duration = Duration::from_secs(5);

impl CachedFile {
    pub(crate) fn new(
        cache: Arc<CacheShared>,
        shared: Arc<FileShared>,
        options: OpenOptions,
    ) -> Self {
        Self {
            anchors: Arc::new(Anchors::new(cache.clone())),
            cache,
            shared,
            options,
        }
    }

    /// The anchor this thread's pins of this handle hold.
    pub(crate) fn anchor(&self) -> Arc<Anchor> {
        self.anchors.get()
    }

    /// The canonical path of the file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Whether the path no longer names this file because the cache replaced it
    /// ([`crate::PageCache::install`]): a later open of the path finds the new one.
    pub fn is_detached(&self) -> bool {
        self.shared
            .detached
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The options this handle was opened with.
    pub fn options(&self) -> OpenOptions {
        self.options
    }

    /// Length of the file as seen through the cache (includes unwritten-back writes).
    pub fn len(&self) -> u64 {
        // As published when the lock was last let go: what a lock-free reader sees.
        self.shared.state.published().len.load(Ordering::Acquire)
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Current version number of the file's content (see [`Pin::version`]).
    pub fn version(&self) -> u64 {
        self.shared
            .state
            .published()
            .version
            .load(Ordering::Acquire)
    }

    /// The identity of the file's current version (device, inode, size and mtime on disk,
    /// in-process version), for validators that survive restarts; see [`FileIdentity`].
    pub fn identity(&self) -> FileIdentity {
        self.shared.state.read().identity()
    }

    /// Pins `range` (byte offsets) as an atomic snapshot: every page comes from the same
    /// version of the file, and none of the pinned bytes change until the returned [`Pin`]
    /// (and all its clones and sub-pins) are dropped. Missing pages are read from disk.
    ///
    /// Fails with [`Error::OutOfRange`] if the range reaches past the end of the file, and
    /// with [`Error::OutOfFrames`] if the pages cannot be brought in (see
    /// [`crate::Backpressure`]).
    ///
    /// When every page is resident (and no read-ahead is due, audit mode is off, the range
    /// spans at most 64 pages), the pin takes no lock: it is counted in
    /// [`crate::CacheStats::lock_free_pins`]. Otherwise, or when a change of the file
    /// overlaps it, it takes the file lock as before.
    pub fn pin(&self, range: Range<u64>) -> Result<Pin> {
        if let Some(pin) = self.pin_lock_free(&range) {
            return Ok(pin);
        }
        self.pin_locked(range)
    }

    /// [`CachedFile::pin`] always through the file lock, as every pin was before the
    /// lock-free path: for benchmarks comparing the two in one run, not for production use.
    #[doc(hidden)]
    pub fn pin_locked(&self, range: Range<u64>) -> Result<Pin> {
        self.run(|this, st| this.try_pin(st, &range))
    }

    /// The lock-free pin of resident pages (see `fast`); `None` when the locked path must
    /// decide (absent pages, read-ahead due, errors, a concurrent change, audit mode).
    fn pin_lock_free(&self, range: &Range<u64>) -> Option<Pin> {
        let cache = &*self.cache;
        if range.start >= range.end {
            return None;
        }
        let published = self.shared.state.published();
        let pages = pages_covering(range);
        let ahead = (cache.config.readahead_max_pages > 0).then_some(pages.end);
        let (frames, version) = pin_resident(cache, published, range, None, ahead, || true)?;
        let next_sequential = &published.next_sequential_page;
        if next_sequential.load(Ordering::Relaxed) == pages.start {
            // Continuing a sequential stream: keep read-ahead's detection in step. Pins
            // elsewhere in the file leave the line alone (no shared write).
            next_sequential.store(pages.end, Ordering::Relaxed);
        }
        cache.stats.pins.add(1);
        cache.stats.lock_free_pins.add(1);
        Some(Pin::new(
            self.anchor(),
            range.clone(),
            version,
            pages.start,
            frames,
        ))
    }

    /// Takes a [`Snapshot`] of `range`: fixes the current version of every page in it
    /// without pinning anything or reading anything (cheap). Pin it progressively with
    /// [`Snapshot::pin_next`]. Fails with [`Error::OutOfRange`] if the range reaches past the
    /// end of the file.
    pub fn snapshot(&self, range: Range<u64>) -> Result<Snapshot> {
        let mut st = self.shared.state.lock_snapshots();
        Snapshot::open(self.cache.clone(), self.shared.clone(), &mut st, range)
    }

    /// Writes the file's dirty pages back to disk (`pwrite`), without waiting for durability.
    pub fn writeback(&self) -> Result<()> {
        writeback::writeback_file(&self.cache, &self.shared).map(|_| ())
    }

    /// Writes dirty pages back and makes them durable (`fdatasync`).
    pub fn fsync(&self) -> Result<()> {
        self.check_writable()?;
        writeback::fsync_file(&self.cache, &self.shared)
    }

    /// [`CachedFile::fsync`] on the cache's I/O threads: returns at once; the [`Pending`]
    /// (reason [`PendingReason::Io`]) becomes ready when the data is durable, and its
    /// [`Pending::outcome`] tells whether it worked.
    pub fn start_fsync(&self) -> Result<Pending> {
        self.check_writable()?;
        let ticket = Ticket::new();
        writeback::schedule_fsync(&self.cache, &self.shared, ticket.clone());
        Ok(Pending::new(ticket, PendingReason::Io, None))
    }

    /// Checks the file on disk (size, mtime, ctime, inode). If another process changed it,
    /// the cached pages are dropped (pins keep their bytes), the version is bumped and later
    /// pins read the new data. Returns whether a change was found. Open snapshots keep the
    /// pages they need if those are all in memory, else they are invalidated
    /// ([`crate::InvalidationReason::ExternalChange`]).
    ///
    /// Dirty pages not yet written back are discarded on such a change: the external writer
    /// wins (a warning is logged).
    ///
    /// While the cache's own writeback of the file is in flight, nothing is taken for an
    /// external change: its writes move the file's size and mtime before the cache records
    /// them (at the writeback's end), and taking them for another program's discarded the
    /// unwritten pages and read the half-written file's holes as zeros. A change another
    /// program makes to the same file during that window is not seen (the writeback's end
    /// adopts the identity it finds); a rename over the path is, at the next check.
    pub fn revalidate(&self) -> Result<bool> {
        let detached = || {
            self.shared
                .detached
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        if detached() {
            return Ok(false); // the path names another file now; this one cannot change
        }
        let path = &self.shared.path;
        let stat = || -> Result<DiskIdentity> {
            let meta = fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
            Ok(DiskIdentity::of(&meta))
        };
        // The common case, without moving the file's sequence (lock-free pins go on).
        let first = stat()?;
        {
            let st = self.shared.state.read();
            if first == st.disk || st.own_write_in_flight() {
                return Ok(false);
            }
        }
        // A difference may be stale: the stat above ran before the lock, and one of our own
        // changes (a truncation, an eviction's write) may have landed and been recorded in
        // between; or an install may have replaced the file meanwhile. Look again with both
        // excluded: no install runs while `paths` is held, and our own disk writes happen
        // under the file lock or inside the writeback window.
        let _paths = self.cache.paths.read();
        if detached() {
            return Ok(false);
        }
        let mut st = self.shared.state.lock();
        if st.own_write_in_flight() {
            return Ok(false);
        }
        let now = stat()?;
        if now == st.disk {
            return Ok(false);
        }
        if (now.ino != st.disk.ino || now.dev != st.disk.dev) && st.fd.is_some() {
            // The path now names another file (e.g. replaced by rename).
            st.fd = Some(Arc::new(open_fd(path, st.fd_writable)?));
            let closed = self.cache.open_files.used(&self.shared);
            StatCounters::add(&self.cache.stats.files_closed, closed as u64);
        }
        apply_external_change(&self.cache, path, &mut st, now);
        Ok(true)
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.options.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                path: self.shared.path.clone(),
            })
        }
    }

    /// How long a writer may wait at the old-version limit.
    fn old_version_timeout(&self) -> Duration {
        match self.cache.config.old_version_policy {
            OldVersionPolicy::WriterWaits { timeout } => timeout,
            OldVersionPolicy::InvalidateSnapshots => Duration::ZERO,
        }
    }

    fn frames_timeout(&self) -> Duration {
        match self.cache.config.backpressure {
            Backpressure::Error => Duration::ZERO,
            Backpressure::Wait { timeout } => timeout,
        }
    }

    fn pins_timeout(&self) -> Duration {
        match self.options.policy {
            WritePolicy::Wait { timeout } => timeout,
            _ => Duration::ZERO,
        }
    }

    /// Runs `attempt` under the file lock, and when it stalls (no frames, pinned pages for
    /// a `Wait` writer, the old-version limit, a fill in flight) drops the lock, waits for
    /// the event that may unblock it, and retries, within the configured bounds.
    pub(crate) fn run<T>(
        &self,
        mut attempt: impl FnMut(&Self, &mut FileState) -> Result<T, Stall>,
    ) -> Result<T> {
        let cache = &*self.cache;
        let start = Instant::now();
        let mut waiter: Option<Waiter<'_>> = None;
        let mut waited_for_pins = false;
        let mut waited_for_frames = false;
        let mut waited_for_old = false;
        let finish_pin_wait = |waited: bool| {
            if waited {
                StatCounters::add(
                    &cache.stats.writer_wait_nanos,
                    start.elapsed().as_nanos() as u64,
                );
            }
        };
        loop {
            let outcome = {
                let mut st = self.shared.state.lock();
                attempt(self, &mut st)
            };
            let deadline = match outcome {
                Ok(value) => {
                    finish_pin_wait(waited_for_pins);
                    return Ok(value);
                }
                Err(Stall::Fatal(e)) => {
                    finish_pin_wait(waited_for_pins);
                    return Err(e);
                }
                Err(Stall::Restart | Stall::Busy) => continue,
                Err(Stall::Filling(ticket)) => {
                    waiter = None;
                    ticket.wait_until(Instant::now() + FILL_WAIT);
                    if let Some(Err(e)) = ticket.outcome() {
                        finish_pin_wait(waited_for_pins);
                        return Err(e);
                    }
                    continue;
                }
                Err(Stall::NeedFrames(needed)) => {
                    let timeout = self.frames_timeout();
                    if start.elapsed() >= timeout {
                        finish_pin_wait(waited_for_pins);
                        StatCounters::add(&cache.stats.out_of_frames, 1);
                        return Err(Error::OutOfFrames { needed });
                    }
                    if !waited_for_frames {
                        waited_for_frames = true;
                        StatCounters::add(&cache.stats.frame_waits, 1);
                    }
                    start + timeout
                }
                Err(Stall::Pinned(pinned_pages)) => {
                    let timeout = self.pins_timeout();
                    let waited = start.elapsed();
                    if waited >= timeout {
                        finish_pin_wait(waited_for_pins);
                        StatCounters::add(&cache.stats.write_timeouts, 1);
                        return Err(Error::WriteTimeout {
                            waited,
                            pinned_pages,
                        });
                    }
                    if !waited_for_pins {
                        waited_for_pins = true;
                        StatCounters::add(&cache.stats.writer_waits, 1);
                    }
                    start + timeout
                }
                Err(Stall::OldVersions(needed)) => {
                    if !waited_for_old {
                        waited_for_old = true;
                        StatCounters::add(&cache.stats.old_version_waits, 1);
                    }
                    let timeout = self.old_version_timeout();
                    if start.elapsed() >= timeout {
                        finish_pin_wait(waited_for_pins);
                        return Err(Error::OldVersionLimit {
                            needed,
                            limit: cache.old_version_limit,
                        });
                    }
                    start + timeout
                }
            };
            // The waiter registered before this attempt tells us whether anything was
            // released since; the first stall has none yet and simply retries with one.
            if let Some(waiter) = waiter.take() {
                waiter.wait_until(deadline);
            }
            waiter = Some(cache.events.waiter());
        }
    }

    /// Runs `attempt` once under the file lock without waiting; a stall becomes a
    /// [`Pending`] whose deadline is measured from this call (a caller retrying should keep
    /// the deadline of its first attempt).
    pub(crate) fn run_now<T>(
        &self,
        mut attempt: impl FnMut(&Self, &mut FileState) -> Result<T, Stall>,
    ) -> Result<Attempt<T>> {
        let cache = &*self.cache;
        // Registered only after a first stall, then the attempt is made again: the common
        // (ready) case never registers, so releases stay free of wake-up work (see `Events`).
        let mut waiter: Option<Waiter<'_>> = None;
        loop {
            let outcome = {
                let mut st = self.shared.state.lock();
                attempt(self, &mut st)
            };
            let stalled = !matches!(
                outcome,
                Ok(_) | Err(Stall::Fatal(_) | Stall::Restart | Stall::Filling(_))
            );
            if stalled && waiter.is_none() {
                waiter = Some(cache.events.waiter());
                continue;
            }
            let now = Instant::now();
            let (reason, deadline) = match outcome {
                Ok(value) => return Ok(Attempt::Ready(value)),
                Err(Stall::Fatal(e)) => return Err(e),
                Err(Stall::Restart) => continue,
                Err(Stall::Busy) => {
                    let ticket = Ticket::new();
                    cache
                        .events
                        .park(&ticket, waiter.take().expect("registered"));
                    return Ok(Attempt::Pending(Pending::new(
                        ticket,
                        PendingReason::Io,
                        None,
                    )));
                }
                Err(Stall::Filling(ticket)) => return Attempt::after_fill(ticket),
                Err(Stall::NeedFrames(needed)) => {
                    StatCounters::add(&cache.stats.frame_waits, 1);
                    (
                        PendingReason::OutOfFrames { needed },
                        now + self.frames_timeout(),
                    )
                }
                Err(Stall::Pinned(pages)) => {
                    StatCounters::add(&cache.stats.writer_waits, 1);
                    (PendingReason::Pinned { pages }, now + self.pins_timeout())
                }
                Err(Stall::OldVersions(needed)) => {
                    StatCounters::add(&cache.stats.old_version_waits, 1);
                    (
                        PendingReason::OldVersionLimit { needed },
                        now + self.old_version_timeout(),
                    )
                }
            };
            let ticket = Ticket::new();
            cache
                .events
                .park(&ticket, waiter.take().expect("registered"));
            return Ok(Attempt::Pending(Pending::new(
                ticket,
                reason,
                Some(deadline),
            )));
        }
    }

    fn try_pin(&self, st: &mut FileState, range: &Range<u64>) -> Result<Pin, Stall> {
        if range.start > range.end || range.end > st.len {
            return Err(Error::OutOfRange {
                start: range.start,
                end: range.end,
                len: st.len,
            }
            .into());
        }
        let pages = pages_covering(range);
        if !pages.is_empty() {
            let next_sequential = &st.pages.published().next_sequential_page;
            let previous_end = next_sequential.load(Ordering::Relaxed);
            let sequential = pages.start == previous_end || pages.start + 1 == previous_end;
            let readahead = if sequential && self.cache.config.readahead_max_pages > 0 {
                // Start at 4 pages and double per sequential pin, up to the configured maximum.
                (st.readahead_pages * 2)
                    .max(4)
                    .min(self.cache.config.readahead_max_pages)
            } else {
                0
            };
            self.ensure_resident(st, pages.clone(), readahead)?;
            st.readahead_pages = readahead;
            st.pages
                .published()
                .next_sequential_page
                .store(pages.end, Ordering::Relaxed);
        }
        let mut frames = Vec::with_capacity(pages.clone().count());
        for page in pages.clone() {
            let frame = st.pages[&page];
            self.cache.pin_locked(frame);
            frames.push(frame);
        }
        self.cache.stats.pins.add(1);
        Ok(Pin::new(
            self.anchor(),
            range.clone(),
            st.version,
            pages.start,
            frames.into_boxed_slice(),
        ))
    }

    /// Makes every page in `pages` resident, reading missing runs from disk, plus up to
    /// `readahead` further pages (best effort).
    fn ensure_resident(
        &self,
        st: &mut FileState,
        pages: Range<u64>,
        readahead: usize,
    ) -> Result<(), Stall> {
        if let Some(ticket) = pages.clone().find_map(|p| st.filling.get(&p)) {
            return Err(Stall::Filling(ticket.clone()));
        }
        let missing = pages.clone().filter(|p| !st.pages.contains_key(p)).count();
        if missing > 0 {
            let fd = st.io_fd(&self.cache, &self.shared)?;
            let frames = {
                let mut own = self.shared.own(st, pages.clone(), true);
                self.cache
                    .alloc_frames(missing, &mut own)
                    .ok_or(Stall::NeedFrames(missing))?
            };
            let mut unused = &frames[..];
            let mut page = pages.start;
            while page < pages.end {
                if st.pages.contains_key(&page) {
                    page += 1;
                    continue;
                }
                let mut run_end = page;
                while run_end < pages.end && !st.pages.contains_key(&run_end) {
                    run_end += 1;
                }
                let (run, rest) = unused.split_at((run_end - page) as usize);
                if let Err(e) = self.fill(st, &fd, page, run) {
                    self.cache.release_unused(unused);
                    return Err(e.into());
                }
                unused = rest;
                page = run_end;
            }
        }
        if readahead > 0 {
            let file_pages = st.len.div_ceil(PAGE);
            let end = (pages.end + readahead as u64).min(file_pages);
            let mut run_end = pages.end;
            while run_end < end
                && !st.pages.contains_key(&run_end)
                && !st.filling.contains_key(&run_end)
            {
                run_end += 1;
            }
            let want = (run_end - pages.end) as usize;
            if want > 0 {
                let fd = st.io_fd(&self.cache, &self.shared)?;
                let frames = {
                    let mut own = self.shared.own(st, pages.start..run_end, true);
                    self.cache.alloc_best_effort(want, &mut own)
                };
                if !frames.is_empty() {
                    if let Err(e) = self.fill(st, &fd, pages.end, &frames) {
                        // Read-ahead is only a hint; the pinned range is already resident.
                        self.cache.release_unused(&frames);
                        tracing::debug!(error = %e, "pagecache: read-ahead failed");
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads pages `first ..` into `frames` (freshly allocated) and maps them. Bytes beyond
    /// the end of the file are zero, an invariant writes and truncation rely on.
    fn fill(
        &self,
        st: &mut FileState,
        fd: &fs::File,
        first: u64,
        frames: &[FrameId],
    ) -> Result<()> {
        let offset = first * PAGE;
        let wanted = st
            .len
            .saturating_sub(offset)
            .min((frames.len() * PAGE_SIZE) as u64) as usize;
        let arena = &self.cache.arena;
        // SAFETY: the frames were just allocated and are not mapped anywhere yet, so we have
        // exclusive access.
        let read = unsafe { arena.read_from_file(fd.as_raw_fd(), frames, offset, wanted) }
            .map_err(|e| Error::io("pread", &self.shared.path, e))?;
        for (i, &frame) in frames.iter().enumerate() {
            let filled = read.saturating_sub(i * PAGE_SIZE).min(PAGE_SIZE);
            if filled < PAGE_SIZE {
                // SAFETY: as above, the frame is exclusively ours.
                unsafe { arena.zero_from(frame, filled) };
            }
        }
        for (i, &frame) in frames.iter().enumerate() {
            st.pages.insert(first + i as u64, frame, &self.cache.frames);
        }
        self.cache.frames.set_owners(frames, self.shared.id, first);
        StatCounters::add(&self.cache.stats.fills, frames.len() as u64);
        StatCounters::add(&self.cache.stats.bytes_read, read as u64);
        Ok(())
    }

    pub(crate) fn is_pinned(&self, frame: FrameId) -> bool {
        self.cache.frames.meta(frame).state.load(Ordering::SeqCst) & PIN_MASK != 0
    }
}
