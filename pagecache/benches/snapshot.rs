//! Streaming snapshots: what a snapshot costs to take, progressive pinning per page versus
//! today's whole-range pin, and a cold streaming read of a file four times the cache.
//!
//! Run with `cargo bench -p pagecache --bench snapshot`.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pagecache::{Attempt, CacheConfig, FrameArena, OpenOptions, PageCache, Snapshot, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
const MIB: u64 = 1 << 20;

/// Pins the next piece, waiting (blocking) while pending: the bench's stand-in for an event
/// loop that would do other work meanwhile.
fn next(snapshot: &mut Snapshot, max: u64) -> pagecache::Pin {
    loop {
        match snapshot.pin_next(max).unwrap() {
            Attempt::Ready(pin) => return pin,
            Attempt::Pending(p) => {
                p.wait_until(Instant::now() + Duration::from_secs(10));
            }
        }
    }
}

fn warm_cache_benches(c: &mut Criterion) {
    let (_dir, path) = common::temp_file("pagecache-bench-snap", MIB as usize, 0x3c);
    let arena = FrameArena::anonymous(1 << 32, 4 * MIB as usize).unwrap();
    let cache = PageCache::new(arena, CacheConfig::default()).unwrap();
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    drop(file.pin(0..MIB).unwrap()); // warm

    c.bench_function("snapshot create+drop (1 MiB range)", |b| {
        b.iter(|| black_box(file.snapshot(black_box(0..MIB)).unwrap()))
    });

    let mut group = c.benchmark_group("1 MiB body, warm");
    group.throughput(Throughput::Bytes(MIB));
    group.bench_function("whole-range pin+release (today)", |b| {
        b.iter(|| black_box(file.pin(0..MIB).unwrap()))
    });
    group.bench_function("snapshot + 256 progressive 1-page pins", |b| {
        b.iter(|| {
            let mut snapshot = file.snapshot(0..MIB).unwrap();
            while snapshot.remaining() > 0 {
                black_box(next(&mut snapshot, PAGE));
            }
        })
    });
    group.bench_function("snapshot + 16 progressive 64 KiB pins", |b| {
        b.iter(|| {
            let mut snapshot = file.snapshot(0..MIB).unwrap();
            while snapshot.remaining() > 0 {
                black_box(next(&mut snapshot, 16 * PAGE));
            }
        })
    });
    group.finish();
}

fn cold_stream(c: &mut Criterion) {
    // `cargo test --benches` runs benches once in test mode: keep that small.
    let cache_bytes = 16 * MIB as usize;
    let file_bytes = 4 * cache_bytes;
    let (_dir, path) = common::temp_file("pagecache-bench-snap", file_bytes, 0x3c);
    let memory = std::sync::Arc::clone(
        FrameArena::anonymous(1 << 32, cache_bytes)
            .unwrap()
            .memory(),
    );
    let mut group = c.benchmark_group("cold stream, file 4x the cache");
    group.throughput(Throughput::Bytes(file_bytes as u64));
    group.sample_size(10);
    group.bench_function(
        "64 MiB through a 16 MiB cache, 256 KiB windows, 2 in flight",
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // A fresh, empty cache each time (the kernel's page cache stays warm, so
                    // this measures the cache's own cost, not the disk).
                    let arena = FrameArena::from_shared(memory.clone()).unwrap();
                    let cache = PageCache::new(arena, CacheConfig::default()).unwrap();
                    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
                    let start = Instant::now();
                    let mut snapshot = file.snapshot(0..file_bytes as u64).unwrap();
                    let mut in_flight = std::collections::VecDeque::new();
                    while snapshot.remaining() > 0 {
                        in_flight.push_back(next(&mut snapshot, 64 * PAGE));
                        if in_flight.len() > 2 {
                            in_flight.pop_front(); // "acknowledged"
                        }
                    }
                    drop(in_flight);
                    total += start.elapsed();
                    assert!(cache.stats().background_fills as usize >= file_bytes / PAGE_SIZE / 2);
                }
                total
            })
        },
    );
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion(Duration::from_secs(2));
    targets = warm_cache_benches, cold_stream
}
criterion_main!(benches);
