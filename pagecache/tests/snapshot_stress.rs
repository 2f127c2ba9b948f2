//! Concurrency stress of streaming snapshots: reader threads stream whole-file and partial
//! snapshots in small windows (holding a few pins, releasing the oldest), while writer
//! threads write whole-file versions (blocking and non-blocking), under a small arena
//! (eviction, background fills and writeback) and a small old-version limit, with audit on.
//! Every body must be exactly one version; the limit must hold; everything returns to zero.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{xorshift, StressShared, WORD};
use pagecache::{
    Attempt, CacheConfig, Error, OldVersionPolicy, OpenOptions, Pin, WritePolicy, PAGE_SIZE,
};

const FILE_PAGES: usize = 16;
const FILE_LEN: usize = FILE_PAGES * PAGE_SIZE;
const OLD_LIMIT: usize = 24;

/// Version `v` of the file (see [`common::version_bytes`]).
fn version_bytes(v: u64) -> Vec<u8> {
    common::version_bytes(v, FILE_LEN)
}

/// The versions in `bytes` (at file offset `at`), each once per run of words.
fn versions_in(at: usize, bytes: &[u8]) -> Vec<u64> {
    let mut seen: Vec<u64> = Vec::new();
    for v in common::word_versions(at, bytes) {
        if seen.last() != Some(&v) {
            seen.push(v);
        }
    }
    seen
}

fn stress(policy: OldVersionPolicy, audit: bool) -> pagecache::CacheStats {
    let dir = common::temp_dir("pagecache-snapstress");
    let path = common::make_file(&dir, "versions", &version_bytes(0));
    let config = CacheConfig {
        old_version_limit_pages: Some(OLD_LIMIT),
        old_version_policy: policy,
        readahead_max_pages: 4,
        // Audit pins take the locked path; without audit, pins of pages at the snapshot's
        // version go lock-free (`Snapshot::pin_next`).
        audit,
        ..common::stress_config()
    };
    // Room for the file, the old-version limit and the readers' windows, not much more:
    // eviction, background fills and writeback happen.
    let cache = common::cache(3 * FILE_PAGES + 8, config);
    let file = cache
        .open(&path, OpenOptions::read_write(WritePolicy::CopyOnWrite))
        .unwrap();
    let shared = StressShared::new(&file);
    let bodies = Arc::new(AtomicU64::new(0));
    let cut_short = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();

    for writer in 0..2 {
        let StressShared { file, next, stop } = shared.clone();
        threads.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let v = next.fetch_add(1, Ordering::SeqCst);
                let data = version_bytes(v);
                if writer == 0 {
                    match file.write(0, &data) {
                        Ok(()) | Err(Error::OldVersionLimit { .. }) => {}
                        Err(e) => panic!("writer: {e}"),
                    }
                } else {
                    // Non-blocking: retry when told, give up at the deadline.
                    loop {
                        match file.try_write(0, &data).unwrap() {
                            Attempt::Ready(()) => break,
                            Attempt::Pending(p) => {
                                let until = p
                                    .deadline()
                                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(5));
                                if !p.wait_until(until) {
                                    break;
                                }
                            }
                        }
                    }
                    if v % 8 == 0 {
                        let synced = file.start_fsync().unwrap();
                        assert!(synced.wait_until(Instant::now() + Duration::from_secs(10)));
                    }
                }
            }
        }));
    }

    for reader in 0..3u64 {
        let StressShared { file, next, stop } = shared.clone();
        let (bodies, cut_short) = (bodies.clone(), cut_short.clone());
        threads.push(thread::spawn(move || {
            let mut rng = (reader + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            while !stop.load(Ordering::Relaxed) {
                xorshift(&mut rng);
                let start = if rng % 2 == 0 {
                    0
                } else {
                    (rng as usize >> 8) % (FILE_LEN / 2) / WORD * WORD
                };
                let mut snapshot = file.snapshot(start as u64..FILE_LEN as u64).unwrap();
                let window = (1 + (rng >> 20) % 3) * PAGE_SIZE as u64;
                let mut body = Vec::new();
                let mut held: Vec<Pin> = Vec::new();
                let complete = loop {
                    if snapshot.remaining() == 0 {
                        break true;
                    }
                    match snapshot.pin_next(window) {
                        Ok(Attempt::Ready(pin)) => {
                            body.extend(pin.to_vec());
                            held.push(pin);
                            if held.len() > 2 {
                                held.remove(0);
                            }
                        }
                        Ok(Attempt::Pending(p)) => {
                            let until = p
                                .deadline()
                                .unwrap_or_else(|| Instant::now() + Duration::from_secs(10));
                            p.wait_until(until);
                        }
                        Err(Error::SnapshotInvalidated { .. } | Error::OutOfFrames { .. }) => {
                            break false
                        }
                        Err(e) => panic!("reader {reader}: {e}"),
                    }
                    if rng % 5 == 0 {
                        thread::yield_now(); // a slow reader
                    }
                };
                let versions = versions_in(start, &body);
                // A body cut short (invalidated, out of frames) is a prefix of one version.
                assert!(
                    versions.len() <= 1,
                    "reader {reader}: torn body {versions:?}"
                );
                assert!(!complete || versions.len() == 1);
                assert!(versions.iter().all(|&v| v < next.load(Ordering::SeqCst)));
                if complete {
                    bodies.fetch_add(1, Ordering::Relaxed);
                } else {
                    cut_short.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    shared.run(threads, || {
        let stats = cache.stats();
        assert!(stats.old_version_pages_now <= OLD_LIMIT as u64, "{stats:?}");
    });
    file.fsync().unwrap();
    let stats = cache.stats();
    assert!(
        bodies.load(Ordering::Relaxed) > 20,
        "too few bodies: {stats:?}"
    );
    common::assert_settled(&stats);
    assert_eq!(stats.old_version_pages_now, 0, "{stats:?}");
    assert!(
        stats.old_version_pages_peak <= OLD_LIMIT as u64,
        "{stats:?}"
    );
    eprintln!(
        "{policy:?}: {} bodies, {} cut short, {stats:?}",
        bodies.load(Ordering::Relaxed),
        cut_short.load(Ordering::Relaxed)
    );
    stats
}

#[test]
fn stress_snapshots_writer_waits() {
    let stats = stress(
        OldVersionPolicy::WriterWaits {
            timeout: Duration::from_millis(100),
        },
        true,
    );
    assert_eq!(stats.snapshots_invalidated, 0);
}

#[test]
fn stress_snapshots_invalidated() {
    stress(OldVersionPolicy::InvalidateSnapshots, true);
    stress(OldVersionPolicy::InvalidateSnapshots, false);
}

/// The same without audit: streaming pins of unchanged versions are lock-free, mixed with
/// locked ones (old versions, fills), and every body is still one version.
#[test]
fn stress_snapshots_lock_free() {
    let stats = stress(
        OldVersionPolicy::WriterWaits {
            timeout: Duration::from_millis(100),
        },
        false,
    );
    assert_eq!(stats.snapshots_invalidated, 0);
    assert!(stats.lock_free_pins > 0, "{stats:?}");
    assert!(stats.lock_free_pins < stats.pins, "{stats:?}");
}
