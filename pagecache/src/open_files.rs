//! The bounded set of open descriptors: the cache keeps at most
//! [`crate::CacheConfig::max_open_files`] files open, closing the least recently used ones
//! and reopening them on demand, so that a tree of 100,000 files can be served without
//! running out of descriptors (EMFILE).
//!
//! A file's cached pages, snapshots and identity outlive its descriptor. Reopening checks
//! the file's identity (device, inode, size, mtime, ctime) against what the cache last saw:
//! a file replaced or changed while it was closed is an external change, never a silent
//! mix of two files.
//!
//! A descriptor is only closed when its file lock can be taken without waiting and it has no
//! dirty pages (writeback and eviction of dirty pages always have a descriptor at hand), so
//! the bound can be exceeded briefly by files that are busy at that moment, and by
//! descriptors an I/O thread still holds for a job in flight.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::file::FileShared;

#[derive(Default)]
struct Lru {
    clock: u64,
    /// Open files by last use.
    by_use: BTreeMap<u64, Arc<FileShared>>,
    /// Last use of each open file, by file id.
    last_use: HashMap<u32, u64>,
}

pub(crate) struct OpenFiles {
    max: usize,
    lru: Mutex<Lru>,
}

impl OpenFiles {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            lru: Mutex::new(Lru::default()),
        }
    }

    /// Records that `file`'s descriptor is open and was just used, then closes least recently
    /// used descriptors of other files while over the limit. Returns how many were closed.
    ///
    /// May be called with `file`'s lock held: other files' locks are only tried, never
    /// waited for.
    pub fn used(&self, file: &Arc<FileShared>) -> usize {
        if file.detached.load(std::sync::atomic::Ordering::SeqCst) {
            return 0; // a replaced file keeps its descriptor: the path names another file
        }
        let mut lru = self.lru.lock();
        lru.clock += 1;
        let now = lru.clock;
        if let Some(before) = lru.last_use.insert(file.id, now) {
            lru.by_use.remove(&before);
        }
        lru.by_use.insert(now, file.clone());
        let mut closed = 0;
        let mut over = lru.by_use.len().saturating_sub(self.max);
        if over == 0 {
            return 0;
        }
        let candidates: Vec<(u64, Arc<FileShared>)> = lru
            .by_use
            .iter()
            .filter(|(_, f)| f.id != file.id)
            .map(|(&t, f)| (t, f.clone()))
            .collect();
        for (tick, victim) in candidates {
            if over == 0 {
                break;
            }
            if victim.detached.load(std::sync::atomic::Ordering::SeqCst) {
                continue; // being detached (see `forget`)
            }
            let Some(mut st) = victim.state.try_lock() else {
                continue; // busy: try the next one
            };
            if !st.dirty.is_empty() {
                continue;
            }
            if st.fd.take().is_some() {
                closed += 1;
            }
            drop(st);
            lru.by_use.remove(&tick);
            lru.last_use.remove(&victim.id);
            over -= 1;
        }
        closed
    }

    /// Takes `file` out of the bound for good (it was replaced and keeps its descriptor).
    pub fn forget(&self, file: &FileShared) {
        let mut lru = self.lru.lock();
        if let Some(tick) = lru.last_use.remove(&file.id) {
            lru.by_use.remove(&tick);
        }
    }

    /// Number of descriptors the cache currently keeps open.
    pub fn open_count(&self) -> usize {
        self.lru.lock().by_use.len()
    }
}
