// Shared helpers for the integration tests (included with `mod common;`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use pagecache::{
    Backpressure, CacheConfig, CacheStats, CachedFile, FrameArena, OpenOptions, PageCache,
    WritePolicy, PAGE_SIZE,
};

pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(std::env::temp_dir())
        .unwrap()
}

pub fn make_file(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// A cache of `frames` frames of anonymous memory (where its IOVAs lie does not matter to
/// these tests).
pub fn cache(frames: usize, config: CacheConfig) -> PageCache {
    PageCache::new(
        FrameArena::anonymous(0x20_0000, frames * PAGE_SIZE).unwrap(),
        config,
    )
    .unwrap()
}

/// The model tests' cache configuration: audited, failing at once when out of frames (so
/// that every step of a model run finishes), and with little read-ahead (so that eviction
/// stays in reach of a small arena).
pub fn model_config() -> CacheConfig {
    CacheConfig {
        audit: true,
        backpressure: Backpressure::Error,
        readahead_max_pages: 2,
        ..CacheConfig::default()
    }
}

/// The model tests' two writers of `path`: a copy-on-write one, and a `Wait` one with a
/// zero timeout, which fails at once on pinned pages, writing nothing.
pub fn cow_and_impatient_writers(cache: &PageCache, path: &Path) -> (CachedFile, CachedFile) {
    let cow = cache
        .open(path, OpenOptions::read_write(WritePolicy::CopyOnWrite))
        .unwrap();
    let impatient = cache
        .open(
            path,
            OpenOptions::read_write(WritePolicy::Wait {
                timeout: Duration::ZERO,
            }),
        )
        .unwrap();
    (cow, impatient)
}

/// What a successful write of `data` at `offset` makes of a file whose bytes were `model`
/// (a write past the end extends the file).
pub fn write_to_model(model: &mut Vec<u8>, offset: usize, data: &[u8]) {
    let end = offset + data.len();
    if model.len() < end {
        model.resize(end, 0);
    }
    model[offset..end].copy_from_slice(data);
}

/// Replaces the content of `path` as another process would, and sets its modification time
/// to `mtime_secs` after the epoch, so that the change is visible even on file systems with
/// coarse modification times.
pub fn change_externally(path: &Path, data: &[u8], mtime_secs: u64) {
    std::fs::write(path, data).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime_secs))
        .unwrap();
}

/// At the end of a test, with every pin released: no page pinned, and no audit violation.
pub fn assert_settled(stats: &CacheStats) {
    assert_eq!(stats.pinned_pages_now, 0, "{stats:?}");
    assert_eq!(stats.audit_violations, 0, "{stats:?}");
}

// ---------------------------------------------------------------------------------------
// The stress tests' versions: every 8-byte word of version `v` holds `v` (little endian) xor
// its index, so a torn or shifted body cannot pass for a version.
// ---------------------------------------------------------------------------------------

pub const WORD: usize = 8;

/// The stress tests' cache configuration: audited, and waiting for frames (up to 10 s)
/// rather than failing when none is free.
pub fn stress_config() -> CacheConfig {
    CacheConfig {
        audit: true,
        backpressure: Backpressure::Wait {
            timeout: Duration::from_secs(10),
        },
        ..CacheConfig::default()
    }
}

/// Version `v` of a file of `len` bytes.
pub fn version_bytes(v: u64, len: usize) -> Vec<u8> {
    (0..len / WORD)
        .flat_map(|i| (v ^ ((i as u64) << 40)).to_le_bytes())
        .collect()
}

/// The version each word of `bytes` (read at file offset `at`, word aligned) belongs to.
pub fn word_versions(at: usize, bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(WORD).enumerate().map(move |(k, word)| {
        let index = (at / WORD + k) as u64;
        u64::from_le_bytes(word.try_into().unwrap()) ^ (index << 40)
    })
}

/// One xorshift step of a reader's cheap, seeded random numbers; returns the new state.
pub fn xorshift(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

/// How long a stress test's threads run.
pub const STRESS_RUN_FOR: Duration = Duration::from_millis(1500);

/// What every thread of a stress test holds: the file, the next version a writer is to
/// write (starting at 1: the file is made of version 0; every version below it has been
/// issued), and the flag that ends the test.
#[derive(Clone)]
pub struct StressShared {
    pub file: CachedFile,
    pub next: Arc<AtomicU64>,
    pub stop: Arc<AtomicBool>,
}

impl StressShared {
    pub fn new(file: &CachedFile) -> Self {
        StressShared {
            file: file.clone(),
            next: Arc::new(AtomicU64::new(1)),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Lets `threads` run for [`STRESS_RUN_FOR`], calling `check` every 20 ms meanwhile,
    /// then raises `stop` and joins them (a thread's panic fails the test).
    pub fn run(&self, threads: Vec<thread::JoinHandle<()>>, mut check: impl FnMut()) {
        let started = Instant::now();
        while started.elapsed() < STRESS_RUN_FOR {
            thread::sleep(Duration::from_millis(20));
            check();
        }
        self.stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
    }
}
