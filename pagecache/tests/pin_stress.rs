//! Multi-threaded stress of the lock-free pin path (`CachedFile::pin` of resident pages):
//! pinner threads pin random ranges of a file while writers rewrite the whole file as new
//! versions (copy-on-write and `Wait` handles) and a churn thread reads another file through
//! a small arena (so pages of the first are evicted and refilled under the pinners). Each
//! pinner checks that what it pinned is one version (an atomic snapshot), and that the crc32
//! of its bytes at release is the crc32 at pin time.
//!
//! Audit mode is off here: audit pins take the locked path, and this test is about the
//! lock-free one (it checks `lock_free_pins` grew). The two negative tests switch the
//! guarantee off and show the same checks fail: writers that write pinned pages in place
//! (`WritePolicy::InPlaceUnsafe`), and lock-free pins that skip their validation (the
//! sequence re-check, `set_unsafe_skip_pin_recheck`).
//!
//! Needs the `test-hooks` feature: `cargo test -p pagecache --features test-hooks --test
//! pin_stress`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{xorshift, WORD};
use pagecache::{Backpressure, CacheConfig, CacheStats, OpenOptions, WritePolicy, PAGE_SIZE};

const FILE_PAGES: usize = 8;
const FILE_LEN: usize = FILE_PAGES * PAGE_SIZE;
const CHURN_PAGES: usize = 64;
/// Arena: the hot file a few times over (old versions held by pins) but less than both
/// files, so the churn reader evicts hot pages.
const FRAMES: usize = 48;
const PINNERS: usize = 4;

/// The process-wide test hook must not leak into a concurrently running test.
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Debug, Default)]
struct Outcome {
    pins: u64,
    /// Pins whose bytes were not one version.
    torn: u64,
    /// Pins whose bytes changed between pin and release.
    changed: u64,
    writes: u64,
    stats: CacheStats,
    elapsed: Duration,
}

#[derive(Clone, Copy, PartialEq)]
enum Breakage {
    None,
    InPlaceWriter,
    SkipRecheck,
}

/// The version the words of `bytes` (at file offset `at`) belong to if they all agree.
fn one_version(at: usize, bytes: &[u8]) -> Option<u64> {
    let mut versions = common::word_versions(at, bytes);
    let first = versions.next()?;
    versions.all(|v| v == first).then_some(first)
}

/// Runs the stress for `run_for`, or (when `until_broken`) until a pinner saw a torn or
/// changed pin, at most `run_for`.
fn stress(breakage: Breakage, run_for: Duration, until_broken: bool) -> Outcome {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::temp_dir("pagecache-pin-stress");
    let hot = common::make_file(&dir, "hot", &common::version_bytes(0, FILE_LEN));
    let churn = common::make_file(&dir, "churn", &vec![0xc5; CHURN_PAGES * PAGE_SIZE]);
    let config = CacheConfig {
        audit: false,
        // Read-ahead off: more pins find their pages resident (and go lock-free) right after
        // a refill; the locked path still fills whatever is missing.
        readahead_max_pages: 0,
        backpressure: Backpressure::Wait {
            timeout: Duration::from_secs(10),
        },
        ..CacheConfig::default()
    };
    let cache = common::cache(FRAMES, config);
    let reader = cache.open(&hot, OpenOptions::read_only()).unwrap();
    let cow_policy = match breakage {
        Breakage::InPlaceWriter => WritePolicy::InPlaceUnsafe,
        _ => WritePolicy::CopyOnWrite,
    };
    let writers = [
        cache
            .open(&hot, OpenOptions::read_write(cow_policy))
            .unwrap(),
        cache
            .open(
                &hot,
                OpenOptions::read_write(WritePolicy::Wait {
                    timeout: Duration::from_millis(5),
                }),
            )
            .unwrap(),
    ];
    let churn = cache.open(&churn, OpenOptions::read_only()).unwrap();
    pagecache::set_unsafe_skip_pin_recheck(breakage == Breakage::SkipRecheck);

    let stop = Arc::new(AtomicBool::new(false));
    let broken = Arc::new(AtomicBool::new(false));
    let next_version = Arc::new(AtomicU64::new(1));
    let pins = Arc::new(AtomicU64::new(0));
    let torn = Arc::new(AtomicU64::new(0));
    let changed = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();

    for (w, file) in writers.into_iter().enumerate() {
        let (stop, next_version, writes) = (stop.clone(), next_version.clone(), writes.clone());
        threads.push(thread::spawn(move || {
            let mut rng = 0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                let v = next_version.fetch_add(1, Ordering::SeqCst);
                match file.write(0, &common::version_bytes(v, FILE_LEN)) {
                    Ok(()) => {
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(pagecache::Error::WriteTimeout { .. }) => {}
                    Err(e) => panic!("write: {e}"),
                }
                if xorshift(&mut rng).is_multiple_of(4) {
                    thread::yield_now();
                }
            }
        }));
    }
    {
        let stop = stop.clone();
        threads.push(thread::spawn(move || {
            let mut rng = 0x1234_5678_u64;
            while !stop.load(Ordering::Relaxed) {
                let page = xorshift(&mut rng) % CHURN_PAGES as u64;
                let range = page * PAGE_SIZE as u64..(page + 1) * PAGE_SIZE as u64;
                match churn.pin(range) {
                    Ok(pin) => assert!(pin.to_vec().iter().all(|&b| b == 0xc5)),
                    Err(pagecache::Error::OutOfFrames { .. }) => {}
                    Err(e) => panic!("churn pin: {e}"),
                }
            }
        }));
    }
    for p in 0..PINNERS {
        let file = reader.clone();
        let (stop, broken, pins, torn, changed) = (
            stop.clone(),
            broken.clone(),
            pins.clone(),
            torn.clone(),
            changed.clone(),
        );
        threads.push(thread::spawn(move || {
            let mut rng = 0xdead_beef_u64 ^ ((p as u64 + 1) << 20);
            while !stop.load(Ordering::Relaxed) {
                let start_word = (xorshift(&mut rng) % (FILE_LEN / WORD) as u64) as usize;
                let max_words = (FILE_LEN / WORD - start_word).min(3 * PAGE_SIZE / WORD);
                let words = 1 + (xorshift(&mut rng) % max_words as u64) as usize;
                let at = start_word * WORD;
                let range = at as u64..(at + words * WORD) as u64;
                let pin = match file.pin(range) {
                    Ok(pin) => pin,
                    Err(pagecache::Error::OutOfFrames { .. }) => continue,
                    Err(e) => panic!("pin: {e}"),
                };
                let bytes = pin.to_vec();
                let crc_at_pin = crc32fast::hash(&bytes);
                if one_version(at, &bytes).is_none() {
                    torn.fetch_add(1, Ordering::Relaxed);
                    broken.store(true, Ordering::Relaxed);
                }
                // Hold it a little while writers run.
                for _ in 0..(xorshift(&mut rng) % 64) {
                    std::hint::spin_loop();
                }
                if xorshift(&mut rng).is_multiple_of(8) {
                    thread::yield_now();
                }
                if crc32fast::hash(&pin.to_vec()) != crc_at_pin {
                    changed.fetch_add(1, Ordering::Relaxed);
                    broken.store(true, Ordering::Relaxed);
                }
                drop(pin);
                pins.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    while started.elapsed() < run_for && !(until_broken && broken.load(Ordering::Relaxed)) {
        thread::sleep(Duration::from_millis(5));
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    pagecache::set_unsafe_skip_pin_recheck(false);
    let outcome = Outcome {
        pins: pins.load(Ordering::Relaxed),
        torn: torn.load(Ordering::Relaxed),
        changed: changed.load(Ordering::Relaxed),
        writes: writes.load(Ordering::Relaxed),
        stats: cache.stats(),
        elapsed,
    };
    println!(
        "{}: {} pins ({} lock-free of {} cache pins), {} writes, {} torn, {} changed, {} evictions, {} cow copies, in {:.2?}",
        match breakage {
            Breakage::None => "intact",
            Breakage::InPlaceWriter => "in-place writer",
            Breakage::SkipRecheck => "lock-free pins skip the re-check",
        },
        outcome.pins,
        outcome.stats.lock_free_pins,
        outcome.stats.pins,
        outcome.writes,
        outcome.torn,
        outcome.changed,
        outcome.stats.evictions,
        outcome.stats.cow_copies,
        outcome.elapsed,
    );
    outcome
}

#[test]
fn lock_free_pins_stay_one_unchanging_version_under_writers_and_eviction() {
    let out = stress(Breakage::None, Duration::from_secs(2), false);
    assert_eq!(out.torn, 0, "{out:?}");
    assert_eq!(out.changed, 0, "{out:?}");
    assert!(out.pins > 1000 && out.writes > 100, "{out:?}");
    assert!(
        out.stats.lock_free_pins > out.pins / 10,
        "the lock-free path was exercised: {out:?}"
    );
    assert!(
        out.stats.evictions > 0,
        "hot pages were evicted under the pinners: {out:?}"
    );
    assert!(out.stats.cow_copies > 0, "{out:?}");
    common::assert_settled(&out.stats);
}

#[test]
fn the_checks_fail_with_writers_that_write_pinned_pages_in_place() {
    let out = stress(Breakage::InPlaceWriter, Duration::from_secs(10), true);
    assert!(out.torn + out.changed > 0, "{out:?}");
}

#[test]
fn the_checks_fail_when_lock_free_pins_skip_their_re_check() {
    let out = stress(Breakage::SkipRecheck, Duration::from_secs(20), true);
    assert!(out.torn + out.changed > 0, "{out:?}");
}
