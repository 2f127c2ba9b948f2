//! Criterion benchmarks of the page cache hot paths.
//!
//! Run with `cargo bench -p pagecache --bench pagecache`.

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pagecache::{
    CacheConfig, CachedFile, FrameArena, OpenOptions, PageCache, WritePolicy, PAGE_SIZE,
};

const PAGE: u64 = PAGE_SIZE as u64;

struct Fixture {
    _dir: tempfile::TempDir,
    _cache: PageCache,
    file: CachedFile,
}

fn fixture(file_bytes: usize, policy: WritePolicy) -> Fixture {
    let (dir, path) = common::temp_file("pagecache-bench", file_bytes, 0x5a);
    let arena = FrameArena::anonymous(1 << 32, 4 * file_bytes + 64 * PAGE_SIZE).unwrap();
    let cache = PageCache::new(arena, CacheConfig::default()).unwrap();
    let file = cache.open(&path, OpenOptions::read_write(policy)).unwrap();
    // Warm: every page resident.
    drop(file.pin(0..file_bytes as u64).unwrap());
    Fixture {
        _dir: dir,
        _cache: cache,
        file,
    }
}

fn pin_release(c: &mut Criterion) {
    let f = fixture(16 * PAGE_SIZE, WritePolicy::CopyOnWrite);
    c.bench_function("pin+release cached 4 KiB page", |b| {
        b.iter(|| black_box(f.file.pin(black_box(PAGE..2 * PAGE)).unwrap()))
    });
}

fn copy_on_write(c: &mut Criterion) {
    let f = fixture(16 * PAGE_SIZE, WritePolicy::CopyOnWrite);
    let data = [1u8; 64];
    c.bench_function(
        "copy-on-write of a pinned 4 KiB page (pin+write+release)",
        |b| {
            b.iter(|| {
                let pin = f.file.pin(0..PAGE).unwrap();
                f.file.write(100, black_box(&data)).unwrap();
                drop(pin); // frees the old version
            })
        },
    );
}

fn snapshot_1mib(c: &mut Criterion) {
    const MIB: u64 = 1 << 20;
    let f = fixture(MIB as usize, WritePolicy::CopyOnWrite);
    let mut group = c.benchmark_group("snapshot");
    group.throughput(Throughput::Bytes(MIB));
    group.bench_function("pin+release 1 MiB (256 pages)", |b| {
        b.iter(|| black_box(f.file.pin(0..MIB).unwrap()))
    });
    group.finish();
}

fn concurrent_pins(c: &mut Criterion) {
    let f = Arc::new(fixture(64 * PAGE_SIZE, WritePolicy::CopyOnWrite));
    let mut group = c.benchmark_group("concurrent pin+release");
    for threads in [1usize, 2] {
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function(format!("{threads} thread(s), distinct pages"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                let workers: Vec<_> = (0..threads)
                    .map(|t| {
                        let f = f.clone();
                        thread::spawn(move || {
                            let page = t as u64 * 8;
                            for _ in 0..iters {
                                black_box(f.file.pin(page * PAGE..(page + 1) * PAGE).unwrap());
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.join().unwrap();
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion(Duration::from_secs(1));
    targets = pin_release, copy_on_write, snapshot_1mib, concurrent_pins
}
criterion_main!(benches);
