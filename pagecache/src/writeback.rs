//! Writing dirty pages back to disk.
//!
//! A page under writeback is pinned exactly like a page a packet refers to, so writers wait
//! for it or copy it (per their policy) instead of changing bytes the kernel is reading.

use std::os::fd::AsRawFd;
use std::path::Path;

use crate::arena::{FrameId, PAGE_SIZE};
use crate::cache::CacheShared;
use crate::error::{Error, Result};
use crate::file::{DiskIdentity, FileShared, FileState};
use crate::stats::StatCounters;

const PAGE: u64 = PAGE_SIZE as u64;

/// Writes back all dirty pages of a file; returns how many pages were written.
///
/// The file lock is only held to collect (and pin) the dirty pages and to record the result,
/// not during the I/O.
pub(crate) fn writeback_file(cache: &CacheShared, file: &FileShared) -> Result<usize> {
    let _io = file.io_lock.lock();
    let (fd, runs, len) = {
        let mut st = file.state.lock();
        if st.dirty.is_empty() {
            return Ok(0);
        }
        let mut runs: Vec<(u64, Vec<FrameId>)> = Vec::new();
        for &page in &st.dirty {
            let frame = st.pages[&page];
            cache.pin_locked(frame);
            match runs.last_mut() {
                Some((start, frames)) if *start + frames.len() as u64 == page => frames.push(frame),
                _ => runs.push((page, vec![frame])),
            }
        }
        st.dirty.clear();
        (st.fd.clone(), runs, st.len)
    };

    let mut first_error = None;
    let mut failed = Vec::new();
    let (mut pages, mut bytes) = (0u64, 0u64);
    for (index, (start, frames)) in runs.iter().enumerate() {
        let offset = start * PAGE;
        let n = len
            .saturating_sub(offset)
            .min((frames.len() * PAGE_SIZE) as u64) as usize;
        // SAFETY: we pinned every frame above, so no writer changes them during the I/O.
        match unsafe { cache.arena.write_to_file(fd.as_raw_fd(), frames, offset, n) } {
            Ok(()) => {
                pages += frames.len() as u64;
                bytes += n as u64;
            }
            Err(e) => {
                first_error.get_or_insert_with(|| Error::io("pwrite", &file.path, e));
                failed.push(index);
            }
        }
    }

    {
        let mut st = file.state.lock();
        for index in failed {
            let (start, frames) = &runs[index];
            for (i, &frame) in frames.iter().enumerate() {
                let page = start + i as u64;
                // Still the same version of the page: it remains dirty.
                if st.pages.get(&page) == Some(&frame) {
                    st.dirty.insert(page);
                }
            }
        }
        if pages > 0 {
            refresh_disk_identity(&mut st);
        }
    }
    for (_, frames) in &runs {
        for &frame in frames {
            cache.unpin(frame);
        }
    }
    StatCounters::add(&cache.stats.writebacks, pages);
    StatCounters::add(&cache.stats.bytes_written, bytes);
    first_error.map_or(Ok(pages as usize), Err)
}

/// Evicts page `page` (held in `frame`) of a file whose lock the caller holds, writing it
/// back first if dirty. Returns false (changing nothing) if the page is pinned, no longer in
/// that frame, or cannot be written back.
pub(crate) fn evict_page(
    cache: &CacheShared,
    path: &Path,
    st: &mut FileState,
    page: u64,
    frame: FrameId,
) -> bool {
    if st.pages.get(&page) != Some(&frame) {
        return false;
    }
    // Pinning needs the file lock, which we hold: an unpinned frame stays unpinned.
    if cache
        .frames
        .meta(frame)
        .state
        .load(std::sync::atomic::Ordering::SeqCst)
        != 0
    {
        return false;
    }
    if st.dirty.contains(&page) {
        let offset = page * PAGE;
        let n = st.len.saturating_sub(offset).min(PAGE) as usize;
        // SAFETY: we hold the file lock and the frame is unpinned, so nobody writes it.
        let written = unsafe {
            cache
                .arena
                .write_to_file(st.fd.as_raw_fd(), &[frame], offset, n)
        };
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), page, error = %e, "pagecache: writeback for eviction failed");
            return false;
        }
        st.dirty.remove(&page);
        StatCounters::add(&cache.stats.writebacks, 1);
        StatCounters::add(&cache.stats.bytes_written, n as u64);
        refresh_disk_identity(st);
    }
    st.pages.remove(&page);
    cache.frames.set_owner(frame, None);
    true
}

/// After our own writes, remember the file's new mtime/size so revalidation does not take
/// them for an external change.
fn refresh_disk_identity(st: &mut FileState) {
    if let Ok(meta) = st.fd.metadata() {
        st.disk = DiskIdentity::of(&meta);
    }
}
