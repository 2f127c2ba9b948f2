//! What the server does under concurrent PUTs, as a stress test of the cache alone: reader
//! threads answer "GETs" the way `src/conn.rs` does (open the path, snapshot `0..len`, stream
//! it with `pin_next`, or pin it whole with `CachedFile::pin`, the lock-free path), while a
//! writer thread publishes new versions the way an upload does (write a temporary file,
//! fsync, [`PageCache::install`]) and another truncates and rewrites a second file through
//! the cache. Every body must be exactly one version, and no read may fail: an error here is
//! what the server turns into a 500 (`cache_error_status`), except the length race it retries
//! (`OutOfRange` from a snapshot of a length read just before a change).
//!
//! The race this was written for: a reader opening the path between the moment `install`
//! took the old entry off the path and the rename made a fresh entry on the *old* inode, which
//! the rename then unlinked under it (its ctime moved). Its fill, or the next open's
//! revalidation, took that for an external edit and invalidated the reader's snapshot
//! (`SnapshotInvalidated`: a 500 in the server).

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pagecache::{Attempt, CacheConfig, Error, OpenOptions, PageCache, WritePolicy, PAGE_SIZE};

const PAGES: usize = 24;
const LEN: usize = PAGES * PAGE_SIZE;

#[derive(Default, Debug)]
struct Tally {
    bodies: u64,
    pins: u64,
    torn: u64,
    retried_len: u64,
    errors: Vec<String>,
    /// What the first torn bodies held: who read them, and their runs of one version.
    torn_examples: Vec<String>,
}

impl Tally {
    /// Counts a torn body and keeps a description of the first few.
    fn torn(&mut self, who: &str, bytes: &[u8]) {
        self.torn += 1;
        if self.torn_examples.len() < 8 {
            let mut runs: Vec<(u64, usize, usize)> = Vec::new();
            for (k, v) in common::word_versions(0, bytes).enumerate() {
                match runs.last_mut() {
                    Some((last, _, n)) if *last == v => *n += 1,
                    _ => runs.push((v, k, 1)),
                }
            }
            let runs: Vec<String> = runs
                .iter()
                .take(12)
                .map(|(v, at, n)| format!("v{v:#x}@page{}+{}w", at * common::WORD / PAGE_SIZE, n))
                .collect();
            self.torn_examples.push(format!(
                "{who}: {} bytes, runs {}",
                bytes.len(),
                runs.join(" ")
            ));
        }
    }
}

fn one_version(at: usize, bytes: &[u8]) -> Option<u64> {
    let mut versions = common::word_versions(at, bytes);
    let first = versions.next()?;
    versions.all(|v| v == first).then_some(first)
}

/// One GET as `Core::get` + `start_body` + the streaming loop do it.
fn get_like_the_server(cache: &PageCache, path: &std::path::Path, tally: &mut Tally) {
    let file = match cache.open(path, OpenOptions::read_only()) {
        Ok(f) => f,
        Err(e) => return tally.errors.push(format!("open: {e}")),
    };
    let mut snapshot = match file.snapshot(0..file.len()) {
        Ok(s) => s,
        Err(Error::OutOfRange { .. }) => {
            tally.retried_len += 1;
            return;
        }
        Err(e) => return tally.errors.push(format!("snapshot: {e}")),
    };
    let mut body = Vec::with_capacity(LEN);
    while snapshot.remaining() > 0 {
        match snapshot.pin_next(4 * PAGE_SIZE as u64) {
            Ok(Attempt::Ready(pin)) => body.extend(pin.to_vec()),
            Ok(Attempt::Pending(p)) => {
                if !p.wait_until(Instant::now() + Duration::from_secs(10)) {
                    return tally.errors.push("pending for 10 s".into());
                }
            }
            Err(e) => return tally.errors.push(format!("pin_next: {e}")),
        }
    }
    tally.bodies += 1;
    if body.len() != LEN || one_version(0, &body).is_none() {
        tally.torn("streamed GET", &body);
    }
}

/// A pin of the whole file through `CachedFile::pin` (lock-free when resident).
fn pin_whole(cache: &PageCache, path: &std::path::Path, tally: &mut Tally) {
    let file = match cache.open(path, OpenOptions::read_only()) {
        Ok(f) => f,
        Err(e) => return tally.errors.push(format!("open: {e}")),
    };
    for try_ in 0..4 {
        let len = file.len();
        match file.pin(0..len) {
            Ok(pin) => {
                tally.pins += 1;
                let bytes = pin.to_vec();
                if bytes.len() != LEN || one_version(0, &bytes).is_none() {
                    tally.torn(&format!("whole pin, try {try_}"), &bytes);
                }
            }
            Err(Error::OutOfRange { .. }) => tally.retried_len += 1,
            Err(e) => tally.errors.push(format!("pin: {e}")),
        }
    }
}

fn run(run_for: Duration, audit: bool) -> (Tally, u64, pagecache::CacheStats) {
    let dir = common::temp_dir("pagecache-replace-stress");
    let target = common::make_file(&dir, "versioned.bin", &common::version_bytes(0, LEN));
    let other = common::make_file(&dir, "rewritten.bin", &common::version_bytes(0, LEN));
    // Room for a few versions at once: the readers' fills compete for frames.
    let config = CacheConfig {
        audit,
        ..common::stress_config()
    };
    let cache = common::cache(PAGES * 6, config);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let installs = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));

    let mut threads = Vec::new();
    {
        let (cache, target, stop, installs) = (
            cache.clone(),
            target.clone(),
            stop.clone(),
            installs.clone(),
        );
        threads.push(thread::spawn(move || {
            let mut v = 1;
            while !stop.load(Ordering::Relaxed) {
                let tmp = target.with_file_name(format!(".upload-{v}"));
                let mut f = std::fs::File::create(&tmp).unwrap();
                f.write_all(&common::version_bytes(v, LEN)).unwrap();
                f.sync_all().unwrap();
                drop(f);
                cache.install(&tmp, &target).unwrap();
                installs.fetch_add(1, Ordering::Relaxed);
                v += 1;
            }
        }));
    }
    {
        // Truncates and rewrites another file in place through the cache (the pinners of that
        // file see lengths change under them).
        let (cache, other, stop) = (cache.clone(), other.clone(), stop.clone());
        threads.push(thread::spawn(move || {
            let file = cache
                .open(&other, OpenOptions::read_write(WritePolicy::CopyOnWrite))
                .unwrap();
            let mut v = 1;
            while !stop.load(Ordering::Relaxed) {
                file.set_len(0).unwrap();
                file.write(0, &common::version_bytes(v, LEN)).unwrap();
                v += 1;
            }
        }));
    }
    for reader in 0..3 {
        let (cache, target, other, stop, tally) = (
            cache.clone(),
            target.clone(),
            other.clone(),
            stop.clone(),
            tally.clone(),
        );
        threads.push(thread::spawn(move || {
            let mut mine = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                get_like_the_server(&cache, &target, &mut mine);
                if reader == 0 {
                    pin_whole(&cache, &target, &mut mine);
                } else {
                    pin_whole_or_empty(&cache, &other, &mut mine);
                }
            }
            let mut all = tally.lock().unwrap();
            all.bodies += mine.bodies;
            all.pins += mine.pins;
            all.torn += mine.torn;
            all.retried_len += mine.retried_len;
            all.errors.extend(mine.errors);
            all.torn_examples.extend(mine.torn_examples);
        }));
    }
    thread::sleep(run_for);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    (tally, installs.load(Ordering::Relaxed), cache.stats())
}

/// Pins of the file that is truncated and rewritten: any length, but one version.
fn pin_whole_or_empty(cache: &PageCache, path: &std::path::Path, tally: &mut Tally) {
    let file = match cache.open(path, OpenOptions::read_only()) {
        Ok(f) => f,
        Err(e) => return tally.errors.push(format!("open: {e}")),
    };
    for try_ in 0..4 {
        let len = file.len();
        match file.pin(0..len) {
            Ok(pin) => {
                tally.pins += 1;
                let bytes = pin.to_vec();
                if !bytes.is_empty() && one_version(0, &bytes).is_none() {
                    tally.torn(&format!("rewritten file's pin, try {try_}"), &bytes);
                }
            }
            Err(Error::OutOfRange { .. }) => tally.retried_len += 1,
            Err(e) => tally.errors.push(format!("pin: {e}")),
        }
    }
}

fn check(audit: bool) {
    // REPLACE_STRESS_SECS runs longer, to hunt a rare race.
    let secs = std::env::var("REPLACE_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let (tally, installs, stats) = run(Duration::from_secs(secs), audit);
    eprintln!(
        "audit {audit}: {} bodies, {} pins, {installs} installs, {} length retries, {} errors; \
         {} of {} cache pins lock-free",
        tally.bodies,
        tally.pins,
        tally.retried_len,
        tally.errors.len(),
        stats.lock_free_pins,
        stats.pins,
    );
    if !audit {
        assert!(stats.lock_free_pins > 0, "{stats:?}");
    }
    assert!(installs > 10 && tally.bodies > 10, "{tally:?}");
    assert_eq!(tally.torn, 0, "{tally:?} {stats:?}");
    let mut distinct = tally.errors.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        tally.errors.is_empty(),
        "{} reads failed (a 500 in the server), e.g. {:?}",
        tally.errors.len(),
        &distinct[..distinct.len().min(5)]
    );
    // Nothing but the cache changes these files: a difference taken for another program's
    // edit is the cache misreading its own writes (it discarded unwritten pages and read the
    // half-written file's holes as zeros; it invalidated snapshots being streamed).
    assert_eq!(stats.external_changes, 0, "{stats:?}");
    common::assert_settled(&stats);
}

#[test]
fn gets_during_installs_and_truncations_never_fail() {
    check(false);
}

#[test]
fn audited_gets_during_installs_and_truncations_never_fail() {
    check(true);
}
