//! Cold-fill throughput of the cache versus plain `pread` into a buffer, in the same run.
//!
//! Both read the same file, which the kernel has in its page cache after the first pass, so
//! the comparison is "pread into our frames + page-table work" versus "pread into a buffer".
//! Run with `cargo bench -p pagecache --bench cold_fill`.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use pagecache::{CacheConfig, FrameArena, OpenOptions, PageCache, PAGE_SIZE};

const FILE_BYTES: usize = 64 << 20;
const CHUNK: usize = 1 << 20;
const ROUNDS: usize = 5;

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us with no args: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let file_bytes = if quick { 4 << 20 } else { FILE_BYTES };
    let (_dir, path) = common::temp_file("pagecache-coldfill", file_bytes, 0xa5);

    let mut best_fill = Duration::MAX;
    let mut best_pread = Duration::MAX;
    let mut buffer = vec![0u8; file_bytes];
    // One memory for all rounds, as a real (pre-faulted, DMA-mapped) arena would be; each
    // round builds a fresh, empty cache on it. Best of ROUNDS excludes first-touch faults
    // for both the arena and the pread buffer.
    let memory = std::sync::Arc::clone(
        FrameArena::anonymous(1 << 32, file_bytes + 64 * PAGE_SIZE)
            .unwrap()
            .memory(),
    );
    for _ in 0..ROUNDS {
        let arena = FrameArena::from_shared(memory.clone()).unwrap();
        let cache = PageCache::new(arena, CacheConfig::default()).unwrap();
        let file = cache.open(&path, OpenOptions::read_only()).unwrap();
        let start = Instant::now();
        let mut offset = 0;
        while offset < file_bytes {
            let end = (offset + CHUNK).min(file_bytes);
            drop(file.pin(offset as u64..end as u64).unwrap());
            offset = end;
        }
        best_fill = best_fill.min(start.elapsed());
        assert_eq!(cache.stats().fills as usize, file_bytes / PAGE_SIZE);

        let plain = File::open(&path).unwrap();
        let start = Instant::now();
        let mut offset = 0;
        while offset < file_bytes {
            let end = (offset + CHUNK).min(file_bytes);
            plain
                .read_exact_at(&mut buffer[offset..end], offset as u64)
                .unwrap();
            offset = end;
        }
        best_pread = best_pread.min(start.elapsed());
    }
    let fill = gbps(file_bytes, best_fill);
    let pread = gbps(file_bytes, best_pread);
    println!(
        "cold fill: {fill:.2} GB/s, pread: {pread:.2} GB/s, ratio {:.2} ({} MiB file, {} KiB pins, best of {ROUNDS})",
        fill / pread,
        file_bytes >> 20,
        CHUNK >> 10
    );
}
