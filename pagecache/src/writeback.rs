//! Writing dirty pages back to disk.
//!
//! A page under writeback is pinned exactly like a page a packet refers to, so writers wait
//! for it or copy it (per their policy) instead of changing bytes the kernel is reading.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::arena::{FrameId, PAGE_SIZE};
use crate::cache::CacheShared;
use crate::error::{Error, Result};
use crate::file::{FileShared, FileState, Stall};
use crate::frames::LOW_MASK;
use crate::stats::StatCounters;
use crate::ticket::{IoFailure, Ticket};

const PAGE: u64 = PAGE_SIZE as u64;

/// Writes back all dirty pages of a file; returns how many pages were written.
///
/// The file lock is only held to collect (and pin) the dirty pages and to record the result,
/// not during the I/O.
pub(crate) fn writeback_file(cache: &CacheShared, file: &Arc<FileShared>) -> Result<usize> {
    let _io = file.io_lock.lock();
    writeback_io_locked(cache, file)
}

/// [`writeback_file`] for the I/O pool: `None` (doing nothing) if the file's I/O lock is
/// taken. A pool thread must never wait for that lock: its holder (a blocking `set_len` or
/// `replace_contents`) may itself be waiting for a fill queued behind this job.
fn writeback_if_idle(cache: &CacheShared, file: &Arc<FileShared>) -> Option<Result<usize>> {
    let _io = file.io_lock.try_lock()?;
    Some(writeback_io_locked(cache, file))
}

/// Runs `job` on the I/O pool; if it reports the file busy, queues it again behind whatever
/// was queued meanwhile (the fill its blocker may be waiting for).
fn submit_retrying(
    cache: &CacheShared,
    job: impl FnMut(&Arc<CacheShared>) -> bool + Send + 'static,
) -> bool {
    fn run(
        cache: &Arc<CacheShared>,
        mut job: impl FnMut(&Arc<CacheShared>) -> bool + Send + 'static,
    ) {
        if !job(cache) {
            std::thread::yield_now();
            cache.io.submit(Box::new(move |cache| run(cache, job)));
        }
    }
    cache.io.submit(Box::new(move |cache| run(cache, job)))
}

fn writeback_io_locked(cache: &CacheShared, file: &Arc<FileShared>) -> Result<usize> {
    let (fd, runs, len) = {
        let mut st = file.state.lock();
        if st.dirty.is_empty() {
            return Ok(0);
        }
        let fd = match st.io_fd(cache, file) {
            Ok(fd) => fd,
            // The file changed on disk meanwhile: the external writer won, nothing is dirty.
            Err(Stall::Restart) => return Ok(0),
            Err(Stall::Fatal(e)) => return Err(e),
            Err(_) => unreachable!("opening a descriptor only fails or restarts"),
        };
        let mut runs: Vec<(u64, Vec<FrameId>)> = Vec::new();
        for &page in &st.dirty {
            let frame = st.pages[&page];
            cache.pin_locked(frame);
            match runs.last_mut() {
                Some((start, frames)) if *start + frames.len() as u64 == page => frames.push(frame),
                _ => runs.push((page, vec![frame])),
            }
        }
        st.writing_back = std::mem::take(&mut st.dirty);
        st.own_disk_writes += 1;
        (fd, runs, st.len)
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
        st.writing_back.clear();
        st.own_disk_writes += 1;
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
            st.refresh_disk_identity(&fd);
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

/// Writes a file's dirty pages back on the I/O pool (once queued, later requests are no-ops
/// until it ran), then wakes waiters for frames: the pages are now evictable.
pub(crate) fn schedule_writeback(cache: &CacheShared, file: &Arc<FileShared>) {
    if file.writeback_queued.swap(true, Ordering::SeqCst) {
        return;
    }
    let file = file.clone();
    submit_retrying(cache, move |cache| {
        let Some(outcome) = writeback_if_idle(cache, &file) else {
            return false;
        };
        file.writeback_queued.store(false, Ordering::SeqCst);
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "pagecache: background writeback failed");
        }
        cache.events.notify();
        true
    });
}

/// Writes back and `fdatasync`s a file on the I/O pool; `ticket` completes with the outcome.
pub(crate) fn schedule_fsync(cache: &CacheShared, file: &Arc<FileShared>, ticket: Ticket) {
    let job_file = file.clone();
    let job_ticket = ticket.clone();
    let queued = submit_retrying(cache, move |cache| {
        let Some(written) = writeback_if_idle(cache, &job_file) else {
            return false;
        };
        let outcome = written.and_then(|_| sync_data(cache, &job_file));
        cache.events.notify();
        job_ticket.complete(outcome.err().map(|e| IoFailure::from_error(&e)));
        true
    });
    if !queued {
        ticket.complete(Some(IoFailure::from_error(&Error::io(
            "fdatasync",
            &file.path,
            std::io::Error::other("the page cache is shutting down"),
        ))));
    }
}

/// Writes dirty pages back and makes them durable.
pub(crate) fn fsync_file(cache: &CacheShared, file: &Arc<FileShared>) -> Result<()> {
    writeback_file(cache, file)?;
    sync_data(cache, file)
}

fn sync_data(cache: &CacheShared, file: &Arc<FileShared>) -> Result<()> {
    let fd = {
        let mut st = file.state.lock();
        match st.io_fd(cache, file) {
            Ok(fd) => fd,
            Err(Stall::Restart) => return Ok(()),
            Err(Stall::Fatal(e)) => return Err(e),
            Err(_) => unreachable!("opening a descriptor only fails or restarts"),
        }
    };
    fd.sync_data()
        .map_err(|e| Error::io("fdatasync", &file.path, e))
}

/// Evicts page `page` (held in `frame`) of a file whose lock the caller holds, writing it
/// back first if dirty (only with `allow_io`; else the file's writeback is queued on the I/O
/// pool). Returns false (changing nothing) if the page is pinned, no longer in that frame,
/// or cannot be written back now.
pub(crate) fn evict_page(
    cache: &CacheShared,
    file: &Arc<FileShared>,
    st: &mut FileState,
    page: u64,
    frame: FrameId,
    allow_io: bool,
) -> bool {
    if st.pages.get(&page) != Some(&frame) {
        return false;
    }
    // Lock-free pinners may still pin it until it is claimed below; a pin seen now means no.
    if cache.frames.meta(frame).state.load(Ordering::SeqCst) & LOW_MASK != 0 {
        return false;
    }
    if st.dirty.contains(&page) {
        if st.writing_back.contains(&page) {
            return false; // an older version of it is being written: do not overtake it
        }
        if !allow_io {
            schedule_writeback(cache, file);
            return false;
        }
        let Ok(fd) = st.io_fd(cache, file) else {
            return false;
        };
        if !st.dirty.contains(&page) || st.pages.get(&page) != Some(&frame) {
            return false; // reopening found an external change
        }
        let offset = page * PAGE;
        let n = st.len.saturating_sub(offset).min(PAGE) as usize;
        st.own_disk_writes += 1;
        // SAFETY: we hold the file lock and the frame is unpinned, so nobody writes it.
        let written = unsafe {
            cache
                .arena
                .write_to_file(fd.as_raw_fd(), &[frame], offset, n)
        };
        if let Err(e) = written {
            tracing::warn!(path = %file.path.display(), page, error = %e, "pagecache: writeback for eviction failed");
            return false;
        }
        st.dirty.remove(&page);
        StatCounters::add(&cache.stats.writebacks, 1);
        StatCounters::add(&cache.stats.bytes_written, n as u64);
        st.refresh_disk_identity(&fd);
    }
    // Written back (or clean): claim it. The claim fails if a lock-free pinner got it
    // meanwhile (the page stays, clean); after it no stale page-table entry can pin it.
    if !cache.frames.claim_for_eviction(frame) {
        return false;
    }
    // Claimed: nobody can pin it any more, so its audited version ends here.
    cache.end_of_version(frame);
    st.pages.remove(&page);
    cache.frames.set_owner(frame, None);
    true
}
