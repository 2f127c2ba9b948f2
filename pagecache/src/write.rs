//! Writing through the cache: `write`, `set_len` and `replace_contents`, blocking and
//! non-blocking (`try_*`), with the handle's [`WritePolicy`] for pinned pages and the
//! preservation of old versions that open snapshots still need.
//!
//! Every change is planned first (checks, frames allocated, bytes read, old-version room
//! reserved), without changing anything visible, and then applied, which cannot fail: that
//! is how changes are all-or-nothing.

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::AsRawFd;

use crate::arena::{FrameId, PAGE_SIZE};
use crate::cache::{CacheShared, OldVersionPolicy};
use crate::error::{Error, Result};
use crate::file::{pages_covering, CachedFile, FileState, Io, Stall, WritePolicy};
use crate::fill;
use crate::snapshot::InvalidationReason;
use crate::stats::StatCounters;
use crate::ticket::Attempt;

const PAGE: u64 = PAGE_SIZE as u64;

/// What a planned write does to one page.
enum PageAction {
    /// Write into the page's current frame.
    InPlace(FrameId),
    /// Write into a new frame that replaces `old` (if the page was resident).
    Replace { old: Option<FrameId>, new: FrameId },
}

/// An old version to keep for open snapshots.
struct Kept {
    /// The snapshots that need it.
    ids: Vec<u64>,
    frame: FrameId,
    /// Read from disk just for the snapshots (else the page's resident frame).
    fresh: bool,
}

/// Old versions a change keeps, with their room reserved under the old-version limit.
#[derive(Default)]
struct KeepPlan {
    /// By page.
    kept: BTreeMap<u64, Kept>,
    /// Pages needed by snapshots but not resident: a frame must be read for each (the
    /// snapshots that need them).
    from_disk: BTreeMap<u64, Vec<u64>>,
    reserved: usize,
}

impl KeepPlan {
    fn keeps(&self, page: u64) -> bool {
        self.kept.contains_key(&page) || self.from_disk.contains_key(&page)
    }

    fn fresh_frame(&self, page: u64) -> Option<FrameId> {
        self.kept.get(&page).filter(|k| k.fresh).map(|k| k.frame)
    }

    fn discard(self, cache: &CacheShared) {
        let fresh: Vec<FrameId> = self
            .kept
            .values()
            .filter(|k| k.fresh)
            .map(|k| k.frame)
            .collect();
        cache.release_unused(&fresh);
        cache.unreserve_old(self.reserved);
    }

    /// Makes the kept frames old versions of their snapshots. Call before the change
    /// orphans the resident ones.
    fn apply(self, cache: &CacheShared, st: &mut FileState) {
        debug_assert!(self.from_disk.is_empty(), "disk pages read before applying");
        debug_assert_eq!(self.reserved, self.kept.len());
        for (page, kept) in self.kept {
            cache.hold(kept.frame, kept.fresh);
            st.snapshots.preserve(&kept.ids, page, kept.frame);
        }
    }
}

/// A write whose checks passed and whose frames are allocated and prepared.
struct PreparedWrite {
    offset: u64,
    steps: Vec<(u64, PageAction)>,
    keep: KeepPlan,
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
        self.keep.discard(cache);
    }
}

/// A truncation whose old versions are prepared.
struct PreparedShrink {
    /// Zeroing the tail of the new last page (when it is resident).
    tail: Option<(PreparedWrite, usize)>,
    keep: KeepPlan,
}

impl PreparedShrink {
    fn discard(self, cache: &CacheShared) {
        if let Some((tail, _)) = self.tail {
            tail.discard(cache);
        }
        self.keep.discard(cache);
    }
}

fn runs(pages: &[u64]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some(run) if run.end == p => run.end += 1,
            _ => out.push(p..p + 1),
        }
    }
    out
}

impl CachedFile {
    /// Writes `data` at `offset`, extending the file if needed. All or nothing: on error,
    /// nothing was written. Pinned pages are handled per the handle's [`WritePolicy`]; old
    /// versions open snapshots need are kept (see [`crate::Snapshot`]).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_write(offset, data)?;
        if data.is_empty() {
            return Ok(());
        }
        self.run(|this, st| this.write_locked(st, offset, data, Io::Inline))
    }

    /// Non-blocking [`CachedFile::write`]: never waits and never reads the disk on this
    /// thread. `Pending` when pages must first be read (by the I/O pool), when a `Wait`
    /// writer finds pages pinned, when frames are short, or at the old-version limit under
    /// [`OldVersionPolicy::WriterWaits`]; retry when it is ready. Nothing is written unless
    /// `Ready`.
    pub fn try_write(&self, offset: u64, data: &[u8]) -> Result<Attempt<()>> {
        self.check_write(offset, data)?;
        if data.is_empty() {
            return Ok(Attempt::Ready(()));
        }
        self.run_now(|this, st| this.write_locked(st, offset, data, Io::Background))
    }

    /// Truncates or extends the file (on disk at once, with `ftruncate`). Pins of pages past
    /// the new end keep their bytes; zeroing the tail of a pinned last page follows the
    /// write policy.
    pub fn set_len(&self, new_len: u64) -> Result<()> {
        self.check_writable()?;
        let _io = self.shared.io_lock.lock();
        self.run(|this, st| this.try_set_len(st, new_len, Io::Inline))
    }

    /// Replaces the whole content with `data` as one atomic step: a pin taken at any moment
    /// sees either the old content or `data`, never a mix or an intermediate length (a
    /// `write` followed by `set_len` could be observed in between). Used for HTTP PUT.
    pub fn replace_contents(&self, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let _io = self.shared.io_lock.lock();
        self.run(|this, st| this.replace_locked(st, data, Io::Inline))
    }

    /// Non-blocking [`CachedFile::replace_contents`] (see [`CachedFile::try_write`] for when
    /// it is pending). The `ftruncate` that sets the new length on disk runs on this thread.
    pub fn try_replace_contents(&self, data: &[u8]) -> Result<Attempt<()>> {
        self.check_writable()?;
        // A writeback holds this lock while it writes: do not wait for it.
        let Some(_io) = self.shared.io_lock.try_lock() else {
            return self.run_now(|_, _| Err(Stall::Busy));
        };
        self.run_now(|this, st| this.replace_locked(st, data, Io::Background))
    }

    fn check_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        offset
            .checked_add(data.len() as u64)
            .ok_or(Error::OutOfRange {
                start: offset,
                end: u64::MAX,
                len: u64::MAX,
            })?;
        Ok(())
    }

    fn write_locked(
        &self,
        st: &mut FileState,
        offset: u64,
        data: &[u8],
        io: Io,
    ) -> Result<(), Stall> {
        let prepared = self.prepare_write(st, offset, data.len(), io)?;
        self.apply_write(st, prepared, data, data.len());
        Ok(())
    }

    fn replace_locked(&self, st: &mut FileState, data: &[u8], io: Io) -> Result<(), Stall> {
        if let Some(ticket) = st.filling.values().next() {
            return Err(Stall::Filling(ticket.clone()));
        }
        let new_len = data.len() as u64;
        // Writing zeros over the rest of the new last page does the truncation's tail zeroing
        // in the same step, so the whole replacement is planned before anything changes.
        let zero_to = if new_len < st.len && !new_len.is_multiple_of(PAGE) {
            st.len.min((new_len / PAGE + 1) * PAGE)
        } else {
            new_len
        };
        let write = if zero_to > 0 {
            Some(self.prepare_write(st, 0, zero_to as usize, io)?)
        } else {
            None
        };
        // Page 0 on is protected: the write prepared above refers to those frames.
        let shrink = match self.prepare_shrink(st, new_len, io, false, 0) {
            Ok(shrink) => shrink,
            Err(stall) => {
                if let Some(write) = write {
                    write.discard(&self.cache);
                }
                return Err(stall);
            }
        };
        if let Err(stall) = self.truncate_on_disk(st, new_len) {
            if let Some(write) = write {
                write.discard(&self.cache);
            }
            shrink.discard(&self.cache);
            return Err(stall);
        }
        if let Some(write) = write {
            self.apply_write(st, write, data, zero_to as usize);
        }
        self.apply_shrink(st, shrink, new_len);
        Ok(())
    }

    pub(crate) fn try_set_len(
        &self,
        st: &mut FileState,
        new_len: u64,
        io: Io,
    ) -> Result<(), Stall> {
        let shrink = self.prepare_shrink(st, new_len, io, true, new_len / PAGE)?;
        if let Err(stall) = self.truncate_on_disk(st, new_len) {
            shrink.discard(&self.cache);
            return Err(stall);
        }
        self.apply_shrink(st, shrink, new_len);
        Ok(())
    }

    fn truncate_on_disk(&self, st: &mut FileState, new_len: u64) -> Result<(), Stall> {
        let fd = st.io_fd(&self.cache, &self.shared)?;
        st.own_disk_writes += 1;
        fd.set_len(new_len)
            .map_err(|e| Error::io("ftruncate", &self.shared.path, e).into())
    }

    /// Plans which old versions of `pages` (about to change) open snapshots need, and
    /// reserves their room, applying the old-version policy at the limit. Snapshots may be
    /// invalidated here (policy `InvalidateSnapshots`), even if the change then stalls for
    /// another reason: invalidation is what makes room, and the change is retried.
    fn plan_keep(&self, st: &mut FileState, ranges: &[Range<u64>]) -> Result<KeepPlan, Stall> {
        #[cfg(any(test, feature = "test-hooks"))]
        if self.options.policy == WritePolicy::InPlaceUnsafe {
            // The test-only policy breaks the guarantee on purpose: no old version is kept.
            return Ok(KeepPlan::default());
        }
        if st.snapshots.is_empty() {
            return Ok(KeepPlan::default());
        }
        let cache = &*self.cache;
        loop {
            let mut needs: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            for (&id, entry) in &st.snapshots.entries {
                if entry.invalid.is_some() {
                    continue;
                }
                for range in ranges {
                    let needed = entry.needed();
                    let from = range.start.max(needed.start);
                    let to = range.end.min(needed.end);
                    for page in from..to {
                        if !entry.preserved.contains_key(&page) {
                            needs.entry(page).or_default().push(id);
                        }
                    }
                }
            }
            if cache.reserve_old(needs.len()) {
                let mut plan = KeepPlan {
                    reserved: needs.len(),
                    ..KeepPlan::default()
                };
                for (page, ids) in needs {
                    match st.pages.get(&page) {
                        Some(&frame) => {
                            let kept = Kept {
                                ids,
                                frame,
                                fresh: false,
                            };
                            plan.kept.insert(page, kept);
                        }
                        None => {
                            plan.from_disk.insert(page, ids);
                        }
                    }
                }
                return Ok(plan);
            }
            match cache.config.old_version_policy {
                OldVersionPolicy::WriterWaits { .. } => {
                    return Err(Stall::OldVersions(needs.len()))
                }
                OldVersionPolicy::InvalidateSnapshots => {
                    // The oldest snapshot that needs room goes first; then plan again.
                    let oldest = needs
                        .values()
                        .flatten()
                        .copied()
                        .min()
                        .expect("over the limit only with pages to keep");
                    st.snapshots
                        .invalidate(cache, oldest, InvalidationReason::OldVersionLimit);
                }
            }
        }
    }

    /// Reads the pages of `plan.from_disk` into fresh frames (inline), or, for a
    /// non-blocking caller, starts their fills and stalls. `frames` are allocated by the
    /// caller, one per such page.
    fn read_kept_pages(
        &self,
        st: &FileState,
        plan: &mut KeepPlan,
        frames: &mut impl Iterator<Item = FrameId>,
    ) -> Result<()> {
        for (page, ids) in std::mem::take(&mut plan.from_disk) {
            let frame = frames.next().expect("a frame per page read for snapshots");
            // Recorded first so that a failed read still gives the frame back on discard.
            let kept = Kept {
                ids,
                frame,
                fresh: true,
            };
            plan.kept.insert(page, kept);
            self.read_page_into(st, page, frame)?;
        }
        Ok(())
    }

    /// Stalls a non-blocking change until `pages` are resident: starts their fills.
    fn stall_for_fills(&self, st: &mut FileState, pages: &[u64]) -> Stall {
        let mut short = 0;
        for run in runs(pages) {
            match fill::start_fills(&self.cache, &self.shared, st, run.clone(), run.clone(), &[]) {
                Ok(started) => {
                    if let Some(ticket) = started
                        .first
                        .or_else(|| st.filling.get(&run.start).cloned())
                    {
                        return Stall::Filling(ticket);
                    }
                    short += started.short;
                }
                Err(stall) => return stall,
            }
        }
        Stall::NeedFrames(short.max(1))
    }

    /// Checks the write policy and allocates and prepares new frames for a write of `len`
    /// bytes at `offset`, without changing anything visible.
    fn prepare_write(
        &self,
        st: &mut FileState,
        offset: u64,
        len: usize,
        io: Io,
    ) -> Result<PreparedWrite, Stall> {
        let end = offset + len as u64;
        let pages = pages_covering(&(offset..end));
        // A fill in flight would install bytes older than this write: let it finish first.
        if let Some(ticket) = pages.clone().find_map(|p| st.filling.get(&p)) {
            return Err(Stall::Filling(ticket.clone()));
        }
        if let WritePolicy::Wait { .. } = self.options.policy {
            let pinned = pages
                .clone()
                .filter(|p| st.pages.get(p).is_some_and(|&f| self.is_pinned(f)))
                .count();
            if pinned > 0 {
                return Err(Stall::Pinned(pinned));
            }
        }
        let partial = |page: u64| {
            let page_start = page * PAGE;
            !(offset <= page_start && end >= page_start + PAGE)
        };
        let cold = |st: &FileState, p: u64| !st.pages.contains_key(&p) && p * PAGE < st.len;
        if io == Io::Inline && pages.clone().any(|p| cold(st, p)) {
            // Reading on this thread may be needed: have the descriptor (reopening it may
            // find an external change and restart).
            st.io_fd(&self.cache, &self.shared)?;
        }
        let mut keep = self.plan_keep(st, std::slice::from_ref(&pages))?;
        if io == Io::Background {
            // Bytes this write needs from disk (old versions for snapshots, the rest of a
            // partly written page) are read by the I/O pool first.
            let from_disk: Vec<u64> = pages
                .clone()
                .filter(|&p| cold(st, p) && (keep.keeps(p) || partial(p)))
                .collect();
            if !from_disk.is_empty() {
                keep.discard(&self.cache);
                return Err(self.stall_for_fills(st, &from_disk));
            }
        }
        // Decide per page; pins can only go away meanwhile, so a decision to copy stays safe
        // even if the pin is released before we apply. (A lock-free pin can still land on a
        // frame we found unpinned, but our lock keeps the file's sequence odd since before
        // this check, so such a pin backs out without using a byte: see `fast`.) A page
        // kept for snapshots is always replaced: its frame becomes their old version.
        let mut needs_frame = Vec::new();
        for page in pages.clone() {
            let copy = match st.pages.get(&page) {
                None => true,
                Some(_) if keep.keeps(page) => true,
                Some(&frame) => match self.options.policy {
                    WritePolicy::CopyOnWrite => self.is_pinned(frame),
                    WritePolicy::Wait { .. } => false,
                    #[cfg(any(test, feature = "test-hooks"))]
                    WritePolicy::InPlaceUnsafe => false,
                },
            };
            needs_frame.push(copy);
        }
        let needed = needs_frame.iter().filter(|&&c| c).count() + keep.from_disk.len();
        let allocated = {
            let mut own = self.shared.own(st, pages.clone(), io == Io::Inline);
            self.cache.alloc_frames(needed, &mut own)
        };
        let Some(frames) = allocated else {
            keep.discard(&self.cache);
            return Err(Stall::NeedFrames(needed));
        };
        let mut new_frames = frames.into_iter();
        if let Err(e) = self.read_kept_pages(st, &mut keep, &mut new_frames) {
            let rest: Vec<FrameId> = new_frames.collect();
            self.cache.release_unused(&rest);
            keep.discard(&self.cache);
            return Err(e.into());
        }
        let mut prepared = PreparedWrite {
            offset,
            steps: Vec::with_capacity(needs_frame.len()),
            keep,
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
            if !partial(page) {
                continue; // every byte will be overwritten
            }
            if let Some(source) = old.or_else(|| prepared.keep.fresh_frame(page)) {
                // SAFETY: `source` is pinned or held (bytes immutable), or we hold the file
                // lock (no writer); `new` is freshly allocated and exclusively ours.
                unsafe { self.cache.arena.copy_frame(source, new) };
            } else if let Err(e) = self.read_page_into(st, page, new) {
                let rest: Vec<FrameId> = new_frames.collect();
                self.cache.release_unused(&rest);
                prepared.discard(&self.cache);
                return Err(e.into());
            }
        }
        Ok(prepared)
    }

    /// Reads a page's current on-disk bytes into a private frame, zero-filling past EOF.
    /// The caller made sure the descriptor is open if the page has bytes on disk.
    fn read_page_into(&self, st: &FileState, page: u64, frame: FrameId) -> Result<()> {
        let page_start = page * PAGE;
        let available = st.len.saturating_sub(page_start).min(PAGE) as usize;
        let arena = &self.cache.arena;
        let read = match &st.fd {
            Some(fd) if available > 0 => {
                // SAFETY: `frame` was just allocated and is exclusively ours.
                unsafe { arena.read_from_file(fd.as_raw_fd(), &[frame], page_start, available) }
                    .map_err(|e| Error::io("pread", &self.shared.path, e))?
            }
            _ => 0,
        };
        // SAFETY: as above.
        unsafe { arena.zero_from(frame, read) };
        StatCounters::add(&self.cache.stats.bytes_read, read as u64);
        Ok(())
    }

    /// Applies a prepared write of `total` bytes: `data` followed by zeros; cannot fail.
    fn apply_write(&self, st: &mut FileState, prepared: PreparedWrite, data: &[u8], total: usize) {
        let arena = &self.cache.arena;
        let offset = prepared.offset;
        let end = offset + total as u64;
        let data_end = offset + data.len() as u64;
        prepared.keep.apply(&self.cache, st);
        for (page, action) in prepared.steps {
            let page_start = page * PAGE;
            let from = offset.max(page_start);
            let to = end.min(page_start + PAGE);
            let put = |frame: FrameId| {
                let data_to = to.min(data_end).max(from);
                if data_to > from {
                    let chunk = &data[(from - offset) as usize..(data_to - offset) as usize];
                    // SAFETY: as at the call sites below.
                    unsafe { arena.write(frame, (from - page_start) as usize, chunk) };
                }
                if to > data_to {
                    let zeros = [0u8; PAGE_SIZE];
                    let n = (to - data_to) as usize;
                    // SAFETY: as at the call sites below.
                    unsafe { arena.write(frame, (data_to - page_start) as usize, &zeros[..n]) };
                }
            };
            match action {
                PageAction::InPlace(frame) => {
                    // SAFETY (for `put`): under the Wait and CopyOnWrite policies the frame is
                    // unpinned and not kept for snapshots (checked under the file lock we
                    // hold; a pin taken since is lock-free and backs out unused, as our lock
                    // keeps the sequence odd, see `fast`), so nobody reads these bytes as
                    // pinned. Under the test-only InPlaceUnsafe policy this deliberately
                    // writes pinned bytes.
                    if !self.is_pinned(frame) {
                        // The frame's version ends here (a write into a *pinned* frame keeps
                        // its recorded checksum, so the audit catches it later).
                        self.cache.end_of_version(frame);
                    }
                    put(frame);
                }
                PageAction::Replace { old, new } => {
                    // SAFETY (for `put`): `new` is freshly allocated and not yet mapped.
                    put(new);
                    st.pages.insert(page, new, &self.cache.frames);
                    self.cache.frames.set_owners(&[new], self.shared.id, page);
                    if let Some(old) = old {
                        // A frame kept for snapshots is held, so this does not free it.
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

    /// Plans a change of length to `new_len`: zeroing the tail of the new last page (if
    /// `zero_tail`) and the old versions of the pages it drops or changes on disk. Pages from
    /// `protect_from` on are not evicted to make room (a prepared change refers to them).
    fn prepare_shrink(
        &self,
        st: &mut FileState,
        new_len: u64,
        io: Io,
        zero_tail: bool,
        protect_from: u64,
    ) -> Result<PreparedShrink, Stall> {
        if new_len >= st.len {
            return Ok(PreparedShrink {
                tail: None,
                keep: KeepPlan::default(),
            });
        }
        let tail_page = new_len / PAGE;
        if let Some((_, ticket)) = st.filling.iter().find(|(&p, _)| p >= tail_page) {
            return Err(Stall::Filling(ticket.clone()));
        }
        // The truncation needs the descriptor anyway; have it before planning (reopening it
        // may find an external change and restart).
        st.io_fd(&self.cache, &self.shared)?;
        let keep_pages = new_len.div_ceil(PAGE);
        let old_pages = st.len.div_ceil(PAGE);
        let mid_page = !new_len.is_multiple_of(PAGE);
        let mut tail = None;
        // Pages whose bytes change without a write: the dropped ones, and a non-resident
        // new last page (ftruncate zeroes its tail on disk).
        let mut changed: Vec<Range<u64>> = Vec::with_capacity(2);
        changed.push(keep_pages..old_pages);
        if zero_tail && mid_page {
            if st.pages.contains_key(&tail_page) {
                // The bytes of the new last page past the new end must read as zero later.
                let zero_to = st.len.min((tail_page + 1) * PAGE);
                let zeros = (zero_to - new_len) as usize;
                tail = Some((self.prepare_write(st, new_len, zeros, io)?, zeros));
            } else {
                changed.push(tail_page..tail_page + 1);
            }
        }
        let discard_tail = |tail: Option<(PreparedWrite, usize)>| {
            if let Some((tail, _)) = tail {
                tail.discard(&self.cache);
            }
        };
        let mut keep = match self.plan_keep(st, &changed) {
            Ok(keep) => keep,
            Err(stall) => {
                discard_tail(tail);
                return Err(stall);
            }
        };
        if !keep.from_disk.is_empty() {
            if io == Io::Background {
                let pages: Vec<u64> = keep.from_disk.keys().copied().collect();
                keep.discard(&self.cache);
                discard_tail(tail);
                return Err(self.stall_for_fills(st, &pages));
            }
            let needed = keep.from_disk.len();
            let allocated = {
                let protect = protect_from.min(tail_page)..old_pages;
                let mut own = self.shared.own(st, protect, true);
                self.cache.alloc_frames(needed, &mut own)
            };
            let Some(frames) = allocated else {
                keep.discard(&self.cache);
                discard_tail(tail);
                return Err(Stall::NeedFrames(needed));
            };
            let mut frames = frames.into_iter();
            if let Err(e) = self.read_kept_pages(st, &mut keep, &mut frames) {
                self.cache.release_unused(&frames.collect::<Vec<_>>());
                keep.discard(&self.cache);
                discard_tail(tail);
                return Err(e.into());
            }
        }
        Ok(PreparedShrink { tail, keep })
    }

    /// Applies a planned change of length (after `ftruncate` succeeded); cannot fail.
    fn apply_shrink(&self, st: &mut FileState, shrink: PreparedShrink, new_len: u64) {
        if let Some((tail, zeros)) = shrink.tail {
            self.apply_write(st, tail, &[], zeros);
        }
        shrink.keep.apply(&self.cache, st);
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
        if let Some(fd) = st.fd.clone() {
            st.refresh_disk_identity(&fd);
        }
    }
}
