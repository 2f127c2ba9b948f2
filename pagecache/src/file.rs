//! Cached files: opening, filling pages from disk (with read-ahead), pinning, writing with a
//! per-handle [`WritePolicy`], truncation and revalidation against the file on disk.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::arena::{FrameId, PAGE_SIZE};
use crate::cache::{Backpressure, CacheShared, OwnFile};
use crate::error::{Error, Result};
use crate::frames::{Ticket, PIN_MASK};
use crate::pin::Pin;
use crate::stats::StatCounters;
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

/// What identifies a version of a file on disk, for revalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
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

pub(crate) type PageTable = HashMap<u64, FrameId, BuildHasherDefault<PageIndexHasher>>;

/// Mutable state of a cached file, behind its lock. Every operation that changes which bytes
/// the file holds (write, truncate, invalidate) and every pin takes this lock, which is what
/// makes a multi-page pin an atomic snapshot.
pub(crate) struct FileState {
    pub fd: Arc<fs::File>,
    pub fd_writable: bool,
    /// Length of the file as seen through the cache (may exceed the disk's until writeback).
    pub len: u64,
    /// Incremented on every change of content or length.
    pub version: u64,
    pub pages: PageTable,
    pub dirty: BTreeSet<u64>,
    /// The file on disk as last seen (after our own writes, refreshed by fstat).
    pub disk: DiskIdentity,
    /// Page after the last pin, to detect sequential access.
    next_sequential_page: u64,
    /// Current read-ahead window in pages.
    readahead_pages: usize,
}

/// A cached file, shared by all its handles.
pub(crate) struct FileShared {
    pub id: u32,
    pub path: PathBuf,
    pub state: Mutex<FileState>,
    /// Serializes writeback against truncation, so a writeback in flight cannot re-extend a
    /// file that was just truncated.
    pub io_lock: Mutex<()>,
}

impl FileShared {
    pub fn open(id: u32, path: PathBuf, writable: bool) -> Result<Self> {
        let fd = fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        let meta = fd.metadata().map_err(|e| Error::io("fstat", &path, e))?;
        let disk = DiskIdentity::of(&meta);
        Ok(Self {
            id,
            state: Mutex::new(FileState {
                fd: Arc::new(fd),
                fd_writable: writable,
                len: disk.size,
                version: 1,
                pages: PageTable::default(),
                dirty: BTreeSet::new(),
                disk,
                next_sequential_page: 0,
                readahead_pages: 0,
            }),
            path,
            io_lock: Mutex::new(()),
        })
    }

    pub fn with_id(mut self, id: u32) -> Self {
        self.id = id;
        self
    }

    /// Upgrades the shared descriptor to read-write if a writable handle is opened on a file
    /// first opened read-only.
    pub fn ensure_writable_fd(&self) -> Result<()> {
        let mut st = self.state.lock();
        if !st.fd_writable {
            let fd = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(|e| Error::io("open", &self.path, e))?;
            st.fd = Arc::new(fd);
            st.fd_writable = true;
        }
        Ok(())
    }
}

/// Why an attempt under the file lock could not complete.
pub(crate) enum Stall {
    Fatal(Error),
    NeedFrames(usize),
    /// A `Wait` writer found this many touched pages pinned.
    Pinned(usize),
}

impl From<Error> for Stall {
    fn from(e: Error) -> Self {
        Stall::Fatal(e)
    }
}

/// A handle on a cached file. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct CachedFile {
    cache: Arc<CacheShared>,
    shared: Arc<FileShared>,
    options: OpenOptions,
}

impl std::fmt::Debug for CachedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedFile")
            .field("path", &self.shared.path)
            .field("options", &self.options)
            .finish()
    }
}

/// What a planned write does to one page.
enum PageAction {
    /// Write into the page's current frame.
    InPlace(FrameId),
    /// Write into a new frame that replaces `old` (if the page was resident).
    Replace { old: Option<FrameId>, new: FrameId },
}

/// A write whose checks passed and whose frames are allocated and prepared; applying it
/// cannot fail, which is how writes are all-or-nothing.
struct PreparedWrite {
    offset: u64,
    steps: Vec<(u64, PageAction)>,
}

impl PreparedWrite {
    fn discard(self, cache: &CacheShared) {
        let new: Vec<FrameId> = self
            .steps
            .iter()
            .filter_map(|(_, action)| match action {
                PageAction::Replace { new, .. } => Some(*new),
                PageAction::InPlace(_) => None,
            })
            .collect();
        cache.release_unused(&new);
    }
}

fn pages_covering(range: &Range<u64>) -> Range<u64> {
    if range.is_empty() {
        return range.start / PAGE..range.start / PAGE;
    }
    range.start / PAGE..(range.end - 1) / PAGE + 1
}

impl CachedFile {
    pub(crate) fn new(
        cache: Arc<CacheShared>,
        shared: Arc<FileShared>,
        options: OpenOptions,
    ) -> Self {
        Self {
            cache,
            shared,
            options,
        }
    }

    /// The canonical path of the file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The options this handle was opened with.
    pub fn options(&self) -> OpenOptions {
        self.options
    }

    /// Length of the file as seen through the cache (includes unwritten-back writes).
    pub fn len(&self) -> u64 {
        self.shared.state.lock().len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Current version number of the file's content (see [`Pin::version`]).
    pub fn version(&self) -> u64 {
        self.shared.state.lock().version
    }

    /// Pins `range` (byte offsets) as an atomic snapshot: every page comes from the same
    /// version of the file, and none of the pinned bytes change until the returned [`Pin`]
    /// (and all its clones and sub-pins) are dropped. Missing pages are read from disk.
    ///
    /// Fails with [`Error::OutOfRange`] if the range reaches past the end of the file, and
    /// with [`Error::OutOfFrames`] if the pages cannot be brought in (see
    /// [`crate::Backpressure`]).
    pub fn pin(&self, range: Range<u64>) -> Result<Pin> {
        self.run(|this, st| this.try_pin(st, &range))
    }

    /// Writes `data` at `offset`, extending the file if needed. All or nothing: on error,
    /// nothing was written. Pinned pages are handled per the handle's [`WritePolicy`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        if data.is_empty() {
            return Ok(());
        }
        offset
            .checked_add(data.len() as u64)
            .ok_or(Error::OutOfRange {
                start: offset,
                end: u64::MAX,
                len: u64::MAX,
            })?;
        self.run(|this, st| {
            let prepared = this.prepare_write(st, offset, data.len())?;
            this.apply_write(st, prepared, data);
            Ok(())
        })
    }

    /// Truncates or extends the file (on disk at once, with `ftruncate`). Pins of pages past
    /// the new end keep their bytes; zeroing the tail of a pinned last page follows the
    /// write policy.
    pub fn set_len(&self, new_len: u64) -> Result<()> {
        self.check_writable()?;
        let _io = self.shared.io_lock.lock();
        self.run(|this, st| this.try_set_len(st, new_len))
    }

    /// Replaces the whole content with `data` as one atomic step: a pin taken at any moment
    /// sees either the old content or `data`, never a mix or an intermediate length (a
    /// `write` followed by `set_len` could be observed in between). Used for HTTP PUT.
    pub fn replace_contents(&self, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let _io = self.shared.io_lock.lock();
        self.run(|this, st| {
            if !data.is_empty() {
                let prepared = this.prepare_write(st, 0, data.len())?;
                this.apply_write(st, prepared, data);
            }
            // Cannot stall now: the page holding the new end was just written, so it is
            // unpinned (Wait) or a fresh unpinned copy (CopyOnWrite), and zeroing its tail
            // needs no new frame.
            this.try_set_len(st, data.len() as u64)
        })
    }

    /// Writes the file's dirty pages back to disk (`pwrite`), without waiting for durability.
    pub fn writeback(&self) -> Result<()> {
        writeback::writeback_file(&self.cache, &self.shared).map(|_| ())
    }

    /// Writes dirty pages back and makes them durable (`fdatasync`).
    pub fn fsync(&self) -> Result<()> {
        self.check_writable()?;
        writeback::writeback_file(&self.cache, &self.shared)?;
        let fd = self.shared.state.lock().fd.clone();
        fd.sync_data()
            .map_err(|e| Error::io("fdatasync", &self.shared.path, e))
    }

    /// Checks the file on disk (size, mtime, ctime, inode). If another process changed it,
    /// the cached pages are dropped (pins keep their bytes), the version is bumped and later
    /// pins read the new data. Returns whether a change was found.
    ///
    /// Dirty pages not yet written back are discarded on such a change: the external writer
    /// wins (a warning is logged).
    pub fn revalidate(&self) -> Result<bool> {
        let path = &self.shared.path;
        let meta = fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
        let now = DiskIdentity::of(&meta);
        let mut st = self.shared.state.lock();
        if now == st.disk {
            return Ok(false);
        }
        if now.ino != st.disk.ino || now.dev != st.disk.dev {
            // The path now names another file (e.g. replaced by rename).
            let fd = fs::OpenOptions::new()
                .read(true)
                .write(st.fd_writable)
                .open(path)
                .map_err(|e| Error::io("open", path, e))?;
            st.fd = Arc::new(fd);
        }
        if !st.dirty.is_empty() {
            tracing::warn!(
                path = %path.display(),
                dirty_pages = st.dirty.len(),
                "pagecache: file changed on disk; discarding unwritten cached writes"
            );
            st.dirty.clear();
        }
        let pages: Vec<(u64, FrameId)> = st.pages.drain().collect();
        for (_, frame) in pages {
            self.cache.orphan(frame);
        }
        st.len = now.size;
        st.version += 1;
        st.disk = now;
        st.next_sequential_page = 0;
        st.readahead_pages = 0;
        StatCounters::add(&self.cache.stats.external_changes, 1);
        tracing::debug!(path = %path.display(), "pagecache: external change detected");
        Ok(true)
    }

    fn check_writable(&self) -> Result<()> {
        if self.options.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                path: self.shared.path.clone(),
            })
        }
    }

    /// Runs `attempt` under the file lock, and when it stalls (no frames, or pinned pages for
    /// a `Wait` writer) drops the lock, waits for a pin release / frame free, and retries,
    /// within the configured bounds.
    fn run<T>(
        &self,
        mut attempt: impl FnMut(&Self, &mut FileState) -> Result<T, Stall>,
    ) -> Result<T> {
        let cache = &*self.cache;
        let start = Instant::now();
        let mut ticket: Option<Ticket<'_>> = None;
        let mut waited_for_pins = false;
        let mut waited_for_frames = false;
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
                Err(Stall::NeedFrames(needed)) => {
                    let timeout = match cache.config.backpressure {
                        Backpressure::Error => Duration::ZERO,
                        Backpressure::Wait { timeout } => timeout,
                    };
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
                    let timeout = match self.options.policy {
                        WritePolicy::Wait { timeout } => timeout,
                        _ => Duration::ZERO,
                    };
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
            };
            // The ticket taken before this attempt tells us whether anything was released
            // since; the first stall has no ticket yet and simply retries with one.
            if let Some(ticket) = ticket.take() {
                ticket.wait_until(deadline);
            }
            ticket = Some(cache.events.ticket());
        }
    }

    fn own<'a>(&'a self, st: &'a mut FileState, protect: Range<u64>) -> OwnFile<'a> {
        OwnFile {
            id: self.shared.id,
            path: &self.shared.path,
            state: st,
            protect,
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
            let sequential = pages.start == st.next_sequential_page
                || pages.start + 1 == st.next_sequential_page;
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
            st.next_sequential_page = pages.end;
        }
        let mut frames = Vec::with_capacity(pages.clone().count());
        for page in pages.clone() {
            let frame = st.pages[&page];
            self.cache.pin_locked(frame);
            frames.push(frame);
        }
        StatCounters::add(&self.cache.stats.pins, 1);
        Ok(Pin::new(
            self.cache.clone(),
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
        let missing = pages.clone().filter(|p| !st.pages.contains_key(p)).count();
        if missing > 0 {
            let mut own = self.own(st, pages.clone());
            let frames = self
                .cache
                .alloc_frames(missing, &mut own)
                .ok_or(Stall::NeedFrames(missing))?;
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
                if let Err(e) = self.fill(st, page, run) {
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
            while run_end < end && !st.pages.contains_key(&run_end) {
                run_end += 1;
            }
            let want = (run_end - pages.end) as usize;
            if want > 0 {
                let mut own = self.own(st, pages.start..run_end);
                let frames = self.cache.alloc_best_effort(want, &mut own);
                if !frames.is_empty() {
                    if let Err(e) = self.fill(st, pages.end, &frames) {
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
    fn fill(&self, st: &mut FileState, first: u64, frames: &[FrameId]) -> Result<()> {
        let offset = first * PAGE;
        let wanted = st
            .len
            .saturating_sub(offset)
            .min((frames.len() * PAGE_SIZE) as u64) as usize;
        let arena = &self.cache.arena;
        // SAFETY: the frames were just allocated and are not mapped anywhere yet, so we have
        // exclusive access.
        let read = unsafe { arena.read_from_file(st.fd.as_raw_fd(), frames, offset, wanted) }
            .map_err(|e| Error::io("pread", &self.shared.path, e))?;
        for (i, &frame) in frames.iter().enumerate() {
            let filled = read.saturating_sub(i * PAGE_SIZE).min(PAGE_SIZE);
            if filled < PAGE_SIZE {
                // SAFETY: as above, the frame is exclusively ours.
                unsafe { arena.zero_from(frame, filled) };
            }
        }
        for (i, &frame) in frames.iter().enumerate() {
            st.pages.insert(first + i as u64, frame);
        }
        self.cache.frames.set_owners(frames, self.shared.id, first);
        StatCounters::add(&self.cache.stats.fills, frames.len() as u64);
        StatCounters::add(&self.cache.stats.bytes_read, read as u64);
        Ok(())
    }

    fn is_pinned(&self, frame: FrameId) -> bool {
        self.cache
            .frames
            .meta(frame)
            .state
            .load(std::sync::atomic::Ordering::SeqCst)
            & PIN_MASK
            != 0
    }

    /// Checks the write policy and allocates and prepares new frames for a write of `len`
    /// bytes at `offset`, without changing anything visible.
    fn prepare_write(
        &self,
        st: &mut FileState,
        offset: u64,
        len: usize,
    ) -> Result<PreparedWrite, Stall> {
        let end = offset + len as u64;
        let pages = pages_covering(&(offset..end));
        if let WritePolicy::Wait { .. } = self.options.policy {
            let pinned = pages
                .clone()
                .filter(|p| st.pages.get(p).is_some_and(|&f| self.is_pinned(f)))
                .count();
            if pinned > 0 {
                return Err(Stall::Pinned(pinned));
            }
        }
        // Decide per page; pins can only go away meanwhile (pinning needs our lock), so a
        // decision to copy stays safe even if the pin is released before we apply.
        let mut needs_frame = Vec::new();
        for page in pages.clone() {
            let copy = match st.pages.get(&page) {
                None => true,
                Some(&frame) => match self.options.policy {
                    WritePolicy::CopyOnWrite => self.is_pinned(frame),
                    WritePolicy::Wait { .. } => false,
                    #[cfg(any(test, feature = "test-hooks"))]
                    WritePolicy::InPlaceUnsafe => false,
                },
            };
            needs_frame.push(copy);
        }
        let needed = needs_frame.iter().filter(|&&c| c).count();
        let mut own = self.own(st, pages.clone());
        let mut new_frames = self
            .cache
            .alloc_frames(needed, &mut own)
            .ok_or(Stall::NeedFrames(needed))?
            .into_iter();
        let mut prepared = PreparedWrite {
            offset,
            steps: Vec::with_capacity(needs_frame.len()),
        };
        for (page, copy) in pages.zip(needs_frame) {
            let old = st.pages.get(&page).copied();
            if !copy {
                prepared
                    .steps
                    .push((page, PageAction::InPlace(old.expect("resident"))));
                continue;
            }
            let new = new_frames
                .next()
                .expect("allocated one frame per copied page");
            prepared
                .steps
                .push((page, PageAction::Replace { old, new }));
            let page_start = page * PAGE;
            let whole_page = offset <= page_start && end >= page_start + PAGE;
            if whole_page {
                continue; // every byte will be overwritten
            }
            if let Some(old) = old {
                // SAFETY: `old` is pinned (bytes immutable) or we hold the file lock (no
                // writer); `new` is freshly allocated and exclusively ours.
                unsafe { self.cache.arena.copy_frame(old, new) };
            } else if let Err(e) = self.read_page_into(st, page, new) {
                prepared.discard(&self.cache);
                return Err(e.into());
            }
        }
        Ok(prepared)
    }

    /// Reads a page's current on-disk bytes into a private frame, zero-filling past EOF.
    fn read_page_into(&self, st: &FileState, page: u64, frame: FrameId) -> Result<()> {
        let page_start = page * PAGE;
        let available = st.len.saturating_sub(page_start).min(PAGE) as usize;
        let arena = &self.cache.arena;
        // SAFETY: `frame` was just allocated and is exclusively ours.
        let read =
            unsafe { arena.read_from_file(st.fd.as_raw_fd(), &[frame], page_start, available) }
                .map_err(|e| Error::io("pread", &self.shared.path, e))?;
        // SAFETY: as above.
        unsafe { arena.zero_from(frame, read) };
        StatCounters::add(&self.cache.stats.bytes_read, read as u64);
        Ok(())
    }

    /// Applies a prepared write; cannot fail.
    fn apply_write(&self, st: &mut FileState, prepared: PreparedWrite, data: &[u8]) {
        let arena = &self.cache.arena;
        let offset = prepared.offset;
        let end = offset + data.len() as u64;
        for (page, action) in prepared.steps {
            let page_start = page * PAGE;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE);
            let chunk = &data[(from - offset) as usize..(to - offset) as usize];
            let in_page = (from - page_start) as usize;
            match action {
                PageAction::InPlace(frame) => {
                    // SAFETY: under the Wait and CopyOnWrite policies the frame is unpinned
                    // (checked under the file lock we hold, and pinning needs that lock), so
                    // we have exclusive access. Under the test-only InPlaceUnsafe policy this
                    // deliberately writes pinned bytes.
                    unsafe { arena.write(frame, in_page, chunk) };
                }
                PageAction::Replace { old, new } => {
                    // SAFETY: `new` is freshly allocated and not yet mapped: exclusively ours.
                    unsafe { arena.write(new, in_page, chunk) };
                    st.pages.insert(page, new);
                    self.cache.frames.set_owners(&[new], self.shared.id, page);
                    if let Some(old) = old {
                        self.cache.orphan(old);
                        StatCounters::add(&self.cache.stats.cow_copies, 1);
                    }
                }
            }
            st.dirty.insert(page);
        }
        st.len = st.len.max(end);
        st.version += 1;
    }

    fn try_set_len(&self, st: &mut FileState, new_len: u64) -> Result<(), Stall> {
        let mut tail_zeroing = None;
        let ends_mid_page = new_len & (PAGE - 1) != 0;
        if new_len < st.len && ends_mid_page && st.pages.contains_key(&(new_len / PAGE)) {
            // The bytes of the new last page past the new end must read as zero later.
            let zero_to = st.len.min((new_len / PAGE + 1) * PAGE);
            let zeros = (zero_to - new_len) as usize;
            tail_zeroing = Some((self.prepare_write(st, new_len, zeros)?, zeros));
        }
        if let Err(e) = st.fd.set_len(new_len) {
            if let Some((prepared, _)) = tail_zeroing {
                prepared.discard(&self.cache);
            }
            return Err(Error::io("ftruncate", &self.shared.path, e).into());
        }
        if let Some((prepared, zeros)) = tail_zeroing {
            self.apply_write(st, prepared, &[0u8; PAGE_SIZE][..zeros]);
        }
        if new_len < st.len {
            let keep = new_len.div_ceil(PAGE);
            let doomed: Vec<u64> = st.pages.keys().copied().filter(|&p| p >= keep).collect();
            for page in doomed {
                let frame = st.pages.remove(&page).expect("listed above");
                self.cache.orphan(frame);
            }
            st.dirty.split_off(&keep);
        }
        st.len = new_len;
        st.version += 1;
        if let Ok(meta) = st.fd.metadata() {
            st.disk = DiskIdentity::of(&meta);
        }
        Ok(())
    }
}
