//! Background fills: reading cold pages on the I/O pool instead of the caller's thread.
//!
//! Starting a fill (under the file lock) allocates frames without waiting and without writing
//! dirty pages back, records the pages in the file's `filling` table with one ticket per job,
//! and queues the read. The I/O thread reads into the frames, which nobody else can reach
//! (taken off the free list, mapped nowhere), then maps them under the file lock, unless the
//! page was meanwhile cancelled (external change); then it completes the ticket. Writers and
//! truncations that touch a page being filled wait for its ticket first, so a fill can never
//! install bytes older than a write.
//!
//! After reading, the I/O thread stats the descriptor: if the file's identity changed and the
//! cache itself wrote nothing to it since the fill started, another process edited the file
//! while it was being streamed. The fill is then dropped and the change applied as an
//! external change (snapshots that needed bytes not in memory are invalidated), so a body
//! never mixes the bytes of two on-disk versions that stat can tell apart.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::arena::{FrameId, PAGE_SIZE};
use crate::cache::CacheShared;
use crate::file::{apply_external_change, FileShared, FileState, Stall};
use crate::identity::DiskIdentity;
use crate::stats::StatCounters;
use crate::ticket::{IoFailure, Ticket};

const PAGE: u64 = PAGE_SIZE as u64;
/// Longest single read: keeps several jobs in flight for parallel streams, and a fill's
/// latency (what the first pin waits for) short.
const MAX_PAGES_PER_JOB: usize = 32;

/// What [`start_fills`] did.
pub(crate) struct Started {
    /// The ticket of the fill covering the first page of the range, if that page is being
    /// filled now (by this call or earlier).
    pub first: Option<Ticket>,
    /// Pages that could not be started for lack of frames.
    pub short: usize,
}

/// Starts background fills for the pages of `pages` that are neither resident nor being
/// filled (and not in `skip`), within the file's length. Stops at the first lack of frames.
/// Frames may be taken by evicting this file's own clean pages outside `protect`: a pin
/// passes just the pages it needs, so its read-ahead never holds the frames its first
/// pages need (with a cache no larger than the read-ahead, that was a wait no event ends).
pub(crate) fn start_fills(
    cache: &Arc<CacheShared>,
    file: &Arc<FileShared>,
    st: &mut FileState,
    pages: Range<u64>,
    protect: Range<u64>,
    skip: &[u64],
) -> Result<Started, Stall> {
    let file_pages = st.len.div_ceil(PAGE);
    let pages = pages.start..pages.end.min(file_pages);
    let mut started = Started {
        first: pages
            .clone()
            .next()
            .and_then(|p| st.filling.get(&p).cloned()),
        short: 0,
    };
    let absent = |st: &FileState, p: u64| {
        !st.pages.contains_key(&p) && !st.filling.contains_key(&p) && !skip.contains(&p)
    };
    let mut page = pages.start;
    while page < pages.end {
        if !absent(st, page) {
            page += 1;
            continue;
        }
        let mut run_end = page;
        while run_end < pages.end
            && absent(st, run_end)
            && ((run_end - page) as usize) < MAX_PAGES_PER_JOB
        {
            run_end += 1;
        }
        let want = (run_end - page) as usize;
        let fd = st.io_fd(cache, file)?;
        let frames = {
            let mut own = file.own(st, protect.clone(), false);
            cache.alloc_best_effort(want, &mut own)
        };
        if frames.is_empty() {
            started.short = (pages.end - page) as usize;
            break;
        }
        let got = frames.len() as u64;
        let ticket = Ticket::new();
        for p in page..page + got {
            st.filling.insert(p, ticket.clone());
        }
        if page == pages.start {
            started.first = Some(ticket.clone());
        }
        let job = FillJob {
            file: file.clone(),
            fd,
            first: page,
            frames,
            len: st.len,
            disk: st.disk,
            own_disk_writes: st.own_disk_writes,
            ticket,
        };
        if !cache.io.submit(Box::new(move |cache| job.run(cache))) {
            // Shutting down: nothing will complete these pages.
            break;
        }
        if got < want as u64 {
            started.short = (pages.end - page - got) as usize;
            break;
        }
        page += got;
    }
    Ok(started)
}

struct FillJob {
    file: Arc<FileShared>,
    fd: Arc<std::fs::File>,
    first: u64,
    frames: Vec<FrameId>,
    /// File length when the fill started: bytes past it read as zero.
    len: u64,
    /// The file's identity and the count of the cache's own disk writes when it started.
    disk: DiskIdentity,
    own_disk_writes: u64,
    ticket: Ticket,
}

impl FillJob {
    fn run(self, cache: &Arc<CacheShared>) {
        let offset = self.first * PAGE;
        let wanted = self
            .len
            .saturating_sub(offset)
            .min((self.frames.len() * PAGE_SIZE) as u64) as usize;
        let arena = &cache.arena;
        // SAFETY: the frames were taken off the free list for this job and are mapped in no
        // page table until the job installs them below, so this thread has exclusive access.
        let read =
            unsafe { arena.read_from_file(self.fd.as_raw_fd(), &self.frames, offset, wanted) };
        if let Ok(read) = read {
            for (i, &frame) in self.frames.iter().enumerate() {
                let filled = read.saturating_sub(i * PAGE_SIZE).min(PAGE_SIZE);
                if filled < PAGE_SIZE {
                    // SAFETY: as above, the frame is exclusively ours.
                    unsafe { arena.zero_from(frame, filled) };
                }
            }
        }
        let seen_after = self.fd.metadata().ok().map(|m| DiskIdentity::of(&m));
        let failure = {
            let mut st = self.file.state.lock();
            // A replaced file's old inode changes its ctime when the rename unlinks it; no
            // path names it any more, so nobody else edits it (see `PageCache::install`).
            let detached = self.file.detached.load(std::sync::atomic::Ordering::SeqCst);
            let edited_elsewhere = read.is_ok()
                && !detached
                && st.disk == self.disk
                && st.own_disk_writes == self.own_disk_writes
                && !st.own_write_in_flight()
                && seen_after.is_some_and(|now| now != st.disk);
            if edited_elsewhere {
                // Cancels this fill's pages (the loop below then gives the frames back).
                let now = seen_after.expect("checked above");
                apply_external_change(cache, &self.file.path, &mut st, now);
            }
            let mut unused = Vec::new();
            let mut installed = 0u64;
            for (i, &frame) in self.frames.iter().enumerate() {
                let page = self.first + i as u64;
                let ours = st.filling.get(&page).is_some_and(|t| t.same(&self.ticket));
                if ours {
                    st.filling.remove(&page);
                }
                if ours && read.is_ok() {
                    st.pages.insert(page, frame, &cache.frames);
                    cache.frames.set_owners(&[frame], self.file.id, page);
                    installed += 1;
                } else {
                    unused.push(frame);
                }
            }
            drop(st);
            cache.release_unused(&unused);
            StatCounters::add(&cache.stats.fills, installed);
            StatCounters::add(&cache.stats.background_fills, installed);
            match read {
                Ok(bytes) => {
                    StatCounters::add(&cache.stats.bytes_read, bytes as u64);
                    None
                }
                Err(e) => {
                    let error = crate::Error::io("pread", &self.file.path, e);
                    tracing::warn!(%error, "pagecache: background fill failed");
                    Some(IoFailure::from_error(&error))
                }
            }
        };
        self.ticket.complete(failure);
        // Waiters for frames may now find evictable pages.
        cache.events.notify();
    }
}
