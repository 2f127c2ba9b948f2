//! Concurrency stress: reader threads pin snapshots (whole file and random sub-ranges) while
//! writer threads write whole-file versions, under both write policies, with a small arena
//! (eviction and dirty writeback happen) and audit mode on. Every snapshot must be exactly
//! one version written by the writers, and must not change while pinned.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{xorshift, StressShared, WORD};
use pagecache::{Error, OpenOptions, WritePolicy, PAGE_SIZE};

const FILE_PAGES: usize = 16;
const FILE_LEN: usize = FILE_PAGES * PAGE_SIZE;

/// Version `v` of the file (see [`common::version_bytes`]).
fn version_bytes(v: u64) -> Vec<u8> {
    common::version_bytes(v, FILE_LEN)
}

/// The single version a pinned range of bytes (starting at file offset `at`, word aligned)
/// belongs to, or a panic.
fn version_of(at: usize, bytes: &[u8]) -> u64 {
    assert_eq!(at % WORD, 0);
    let mut version = None;
    for (k, v) in common::word_versions(at, bytes).enumerate() {
        match version {
            None => version = Some(v),
            Some(seen) => assert_eq!(seen, v, "torn snapshot at offset {}", at + k * WORD),
        }
    }
    version.expect("non-empty")
}

fn stress(policy: WritePolicy) -> pagecache::CacheStats {
    let dir = common::temp_dir("pagecache-stress");
    let path = common::make_file(&dir, "versions", &version_bytes(0));
    // Room for the file a few times over: readers holding old versions force evictions
    // and copy-on-write churn.
    let cache = common::cache(4 * FILE_PAGES, common::stress_config());
    let file = cache.open(&path, OpenOptions::read_write(policy)).unwrap();

    let shared = StressShared::new(&file);
    let snapshots = Arc::new(AtomicU64::new(0));
    // File version (Pin::version) -> content version seen by readers.
    let content_of = Arc::new(Mutex::new(HashMap::new()));
    let mut threads = Vec::new();

    for writer in 0..2 {
        let StressShared { file, next, stop } = shared.clone();
        threads.push(thread::spawn(move || {
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let v = next.fetch_add(1, Ordering::SeqCst);
                match file.write(0, &version_bytes(v)) {
                    Ok(()) => writes += 1,
                    // A Wait writer may give up if readers keep pages pinned; fine.
                    Err(Error::WriteTimeout { .. }) => {}
                    Err(e) => panic!("writer {writer}: {e}"),
                }
                if writes & 15 == 0 {
                    file.fsync().unwrap();
                }
            }
        }));
    }

    for reader in 0..3u64 {
        let StressShared { file, next, stop } = shared.clone();
        let (snapshots, content_of) = (snapshots.clone(), content_of.clone());
        threads.push(thread::spawn(move || {
            let mut held = Vec::new();
            let mut last_file_version = 0;
            let mut rng = reader.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            while !stop.load(Ordering::Relaxed) {
                xorshift(&mut rng);
                let whole = rng % 3 == 0;
                let (start, end) = if whole {
                    (0, FILE_LEN)
                } else {
                    let a = (rng as usize >> 8) % (FILE_LEN / WORD);
                    let b = (rng as usize >> 32) % (FILE_LEN / WORD);
                    (a.min(b) * WORD, (a.max(b) + 1) * WORD)
                };
                let pin = file.pin(start as u64..end as u64).unwrap();
                let bytes = pin.to_vec();
                let v = version_of(start, &bytes);
                // It is a version some writer produced...
                assert!(
                    v < next.load(Ordering::SeqCst),
                    "reader {reader}: unknown version {v}"
                );
                // ...file versions only move forward for an observer...
                assert!(
                    pin.version() >= last_file_version,
                    "file version went backwards"
                );
                last_file_version = pin.version();
                // ...and one file version always has the same content, across all readers.
                let seen = *content_of.lock().unwrap().entry(pin.version()).or_insert(v);
                assert_eq!(seen, v, "file version {} has two contents", pin.version());
                // Sub-pins see the same version.
                let mid = start + (end - start) / 2 / WORD * WORD;
                let sub = pin.sub_pin(mid as u64..end as u64);
                assert_eq!(version_of(mid, &sub.to_vec()), v);
                held.push((start, v, bytes, pin, sub));
                snapshots.fetch_add(1, Ordering::Relaxed);
                // Hold a few pins for a while, releasing the oldest, re-checking on release.
                if held.len() > 4 {
                    let (start, v, bytes, pin, sub) = held.remove(0);
                    assert_eq!(pin.to_vec(), bytes, "pinned bytes changed");
                    assert_eq!(version_of(start, &pin.to_vec()), v);
                    drop(pin);
                    assert_eq!(sub.to_vec(), &bytes[mid_offset(&sub, start)..]);
                }
            }
            for (_, _, bytes, pin, _) in held {
                assert_eq!(pin.to_vec(), bytes, "pinned bytes changed");
            }
        }));
    }

    shared.run(threads, || {});

    // Writers race, so the final content is whichever write went last; it must be a single
    // version, on disk too after fsync.
    file.fsync().unwrap();
    let last = version_of(0, &file.pin(0..FILE_LEN as u64).unwrap().to_vec());
    assert_eq!(std::fs::read(&path).unwrap(), version_bytes(last));
    let stats = cache.stats();
    assert!(
        snapshots.load(Ordering::Relaxed) > 100,
        "too few snapshots: {stats:?}"
    );
    common::assert_settled(&stats);
    assert!(stats.audit_checks > 0);
    stats
}

fn mid_offset(sub: &pagecache::Pin, start: usize) -> usize {
    sub.range().start as usize - start
}

#[test]
fn stress_copy_on_write() {
    let stats = stress(WritePolicy::CopyOnWrite);
    assert!(stats.cow_copies > 0, "{stats:?}");
    assert_eq!(stats.writer_waits, 0);
}

#[test]
fn stress_wait() {
    let stats = stress(WritePolicy::Wait {
        timeout: Duration::from_millis(200),
    });
    assert_eq!(stats.cow_copies, 0, "{stats:?}");
    assert!(stats.writer_waits > 0, "{stats:?}");
}
