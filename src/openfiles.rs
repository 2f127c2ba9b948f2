//! Files recently resolved and opened for reading, by request path.
//!
//! Without it, every GET walks its path twice (`realpath` in [`crate::root::ServeRoot`], then
//! in the page cache's open) and `stat`s the file twice (is it a directory; has it changed on
//! disk). Measured in the guest with a TCG plugin counting executed instructions (4 KiB
//! keep-alive GETs, e1000): 85 k guest instructions per request, 40 k of them in the guest
//! kernel, 24.5 k of those in `memset` (the kernel zeroes the 4 KiB path-name buffer of
//! every path syscall) and most of the rest in the path walk.
//!
//! What this costs in freshness, and what it may not:
//! - a file replaced through zerosend (a PUT, published by the page cache's install) is seen
//!   at once, on every core: the install detaches the old entry, which a hit checks;
//! - writes through the page cache (a ranged PUT) go to the very entry cached here;
//! - a change made on disk by another program is seen within `interval`
//!   (`--file-check-ms`; as nginx's `open_file_cache_valid`); 0 checks on every request.
//!
//! Every response is still exactly one version's bytes: this caches which file a path names,
//! never what the file holds. Bounded: at most `capacity` entries; entries past their interval
//! or detached are dropped by [`OpenFiles::sweep`] (run by the loop with its timeouts), so
//! the cache never keeps a replaced file's old version alive for long.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pagecache::CachedFile;

/// Paths resolved and opened recently: see the module documentation.
pub struct OpenFiles {
    interval: Duration,
    capacity: usize,
    map: HashMap<Box<str>, Entry>,
}

struct Entry {
    file: CachedFile,
    content_type: &'static str,
    checked: Instant,
}

impl Entry {
    fn fresh(&self, now: Instant, interval: Duration) -> bool {
        now.saturating_duration_since(self.checked) < interval && !self.file.is_detached()
    }
}

impl OpenFiles {
    /// Entries are trusted for `interval` after their check (zero: never cached).
    pub fn new(interval: Duration, capacity: usize) -> Self {
        OpenFiles {
            interval,
            capacity,
            map: HashMap::new(),
        }
    }

    /// The file `raw_path` named when last checked, and its content type, if that was less
    /// than the interval ago and the cache has not replaced the file since.
    pub fn get(&mut self, raw_path: &str, now: Instant) -> Option<(CachedFile, &'static str)> {
        let entry = self.map.get(raw_path)?;
        if entry.fresh(now, self.interval) {
            return Some((entry.file.clone(), entry.content_type));
        }
        self.map.remove(raw_path);
        None
    }

    /// Remember what `raw_path` resolved to, checked at `now`.
    pub fn insert(
        &mut self,
        raw_path: &str,
        file: CachedFile,
        content_type: &'static str,
        now: Instant,
    ) {
        if self.interval.is_zero() || self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(raw_path) {
            self.sweep(now);
            if self.map.len() >= self.capacity {
                // Many distinct paths at once: a scan gains nothing from the cache; start over.
                self.map.clear();
            }
        }
        self.map.insert(
            raw_path.into(),
            Entry {
                file,
                content_type,
                checked: now,
            },
        );
    }

    /// Drop entries past their interval or replaced.
    pub fn sweep(&mut self, now: Instant) {
        let interval = self.interval;
        self.map.retain(|_, e| e.fresh(now, interval));
    }

    /// Entries held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecache::{CacheConfig, FrameArena, OpenOptions, PageCache};

    /// A page cache over a temporary directory holding the file `a`, and `a` opened.
    fn opened() -> (tempfile::TempDir, PageCache, CachedFile) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"first").unwrap();
        let arena = FrameArena::anonymous(0x1000_0000, 1 << 20).unwrap();
        let cache = PageCache::new(arena, CacheConfig::default()).unwrap();
        let file = cache
            .open(dir.path().join("a"), OpenOptions::read_only())
            .unwrap();
        (dir, cache, file)
    }

    #[test]
    fn a_hit_within_the_interval_and_none_after() {
        let (_dir, _cache, file) = opened();
        let mut open = OpenFiles::new(Duration::from_millis(100), 4);
        let t0 = Instant::now();
        open.insert("/a", file, "text/plain", t0);
        assert!(open.get("/a", t0 + Duration::from_millis(99)).is_some());
        assert!(open.get("/b", t0).is_none());
        assert!(open.get("/a", t0 + Duration::from_millis(100)).is_none());
        assert_eq!(open.len(), 0, "an expired entry is dropped when looked up");
    }

    #[test]
    fn zero_interval_caches_nothing() {
        let (_dir, _cache, file) = opened();
        let mut open = OpenFiles::new(Duration::ZERO, 4);
        open.insert("/a", file, "text/plain", Instant::now());
        assert_eq!(open.len(), 0);
        assert!(open.get("/a", Instant::now()).is_none());
    }

    /// A file the page cache replaced (as a PUT does) is not served from the cache, however
    /// recent its check: the next GET resolves the path again and finds the new file.
    #[test]
    fn a_replaced_file_is_never_a_hit() {
        let (dir, cache, file) = opened();
        let mut open = OpenFiles::new(Duration::from_secs(3600), 4);
        let now = Instant::now();
        open.insert("/a", file, "text/plain", now);
        let (new, path) = (dir.path().join("a.new"), dir.path().join("a"));
        std::fs::write(&new, b"second").unwrap();
        cache.install(&new, &path).unwrap();
        assert!(open.get("/a", now).is_none());
        let reopened = cache.open(&path, OpenOptions::read_only()).unwrap();
        assert_eq!(reopened.len(), 6);
    }

    #[test]
    fn bounded_and_swept() {
        let (_dir, _cache, file) = opened();
        let mut open = OpenFiles::new(Duration::from_millis(100), 3);
        let t0 = Instant::now();
        for (i, p) in ["/1", "/2", "/3", "/4", "/5"].iter().enumerate() {
            open.insert(p, file.clone(), "x", t0 + Duration::from_millis(i as u64));
            assert!(open.len() <= 3);
        }
        open.sweep(t0 + Duration::from_secs(1));
        assert_eq!(open.len(), 0);
    }
}
