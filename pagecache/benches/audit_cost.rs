//! What audit mode costs per pinned page: pins and releases of cached pages the way the
//! server streams a hot file (a snapshot, pinned 16 pages at a time), audit off and on.
//!
//! Made for `valgrind --tool=callgrind` (instruction counts are repeatable on a shared
//! machine where wall time is not): run it twice with different `AUDIT_ITERS` and divide the
//! difference of the counts by the difference of pinned pages, which cancels start-up and
//! the fixture. `scripts`-free recipe (see `audit.rs`):
//!
//! ```text
//! cargo bench -p pagecache --bench audit_cost --no-run   # prints the binary's path
//! AUDIT=off AUDIT_ITERS=200 valgrind --tool=callgrind --callgrind-out-file=/dev/null BIN --bench
//! ```
//!
//! `AUDIT`: `off`, or `on` (the crate's default audit settings; `AUDIT_EVERY=N` sets
//! `audit_verify_every`), or `every` (audit on, every release verified:
//! `audit_verify_every = 1`). Without valgrind it prints ns per
//! pinned page (wall time, noisy on a loaded machine).

mod common;

use std::hint::black_box;
use std::time::Instant;

use pagecache::{Attempt, CacheConfig, FrameArena, OpenOptions, PageCache, PAGE_SIZE};

const FILE_PAGES: usize = 256;
const WINDOW_PAGES: u64 = 16;

fn config(mode: &str) -> CacheConfig {
    let base = CacheConfig::default();
    match mode {
        "off" => CacheConfig {
            audit: false,
            ..base
        },
        "on" => CacheConfig {
            audit: true,
            audit_verify_every: std::env::var("AUDIT_EVERY")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(base.audit_verify_every),
            ..base
        },
        "every" => CacheConfig {
            audit: true,
            audit_verify_every: 1,
            ..base
        },
        other => panic!("AUDIT={other}: off, on or every"),
    }
}

fn main() {
    let mode = std::env::var("AUDIT").unwrap_or_else(|_| "on".into());
    let smoke = !std::env::args().any(|a| a == "--bench");
    let iters: u64 = if smoke {
        2
    } else {
        std::env::var("AUDIT_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200)
    };
    let (_dir, path) = common::temp_file("pagecache-audit-cost", FILE_PAGES * PAGE_SIZE, 0x5a);
    let arena = FrameArena::anonymous(1 << 32, 2 * FILE_PAGES * PAGE_SIZE).unwrap();
    let cache = PageCache::new(arena, config(&mode)).unwrap();
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    drop(file.pin(0..file.len()).unwrap()); // resident
    let window = WINDOW_PAGES * PAGE_SIZE as u64;
    let start = Instant::now();
    let mut pages = 0u64;
    for _ in 0..iters {
        let mut snapshot = file.snapshot(0..file.len()).unwrap();
        while snapshot.remaining() > 0 {
            match snapshot.pin_next(window).unwrap() {
                Attempt::Ready(pin) => {
                    pages += pin.page_count() as u64;
                    black_box(&pin);
                }
                Attempt::Pending(_) => unreachable!("resident"),
            }
        }
    }
    let elapsed = start.elapsed();
    let stats = cache.stats();
    println!(
        "audit={mode}: {pages} pinned pages, {:.1} ns per pinned page (wall), records {} checks {} skipped {} violations {}",
        elapsed.as_nanos() as f64 / pages.max(1) as f64,
        stats.audit_records,
        stats.audit_checks,
        stats.audit_skipped,
        stats.audit_violations
    );
}
