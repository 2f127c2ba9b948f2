//! Unit tests (they may use the test-only `WritePolicy::InPlaceUnsafe`).

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use crate::*;

const PAGE: u64 = PAGE_SIZE as u64;

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pagecache-unit")
        .tempdir_in(std::env::temp_dir())
        .unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn make_file(dir: &tempfile::TempDir, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, data).unwrap();
    path
}

fn cache(frames: usize, config: CacheConfig) -> PageCache {
    PageCache::new(
        FrameArena::anonymous(0x10_0000, frames * PAGE_SIZE).unwrap(),
        config,
    )
    .unwrap()
}

fn rw(policy: WritePolicy) -> OpenOptions {
    OpenOptions::read_write(policy)
}

const WAIT_SHORT: WritePolicy = WritePolicy::Wait {
    timeout: Duration::from_millis(50),
};

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PageCache>();
    check::<CachedFile>();
    check::<Pin>();
    check::<FrameArena>();
}

#[test]
fn arena_exposes_frames_and_memory() {
    let arena = FrameArena::anonymous(0x4000_0000, 10 * PAGE_SIZE + 100).unwrap();
    assert_eq!(arena.frame_count(), 10);
    assert_eq!(arena.iova(3), 0x4000_0000 + 3 * PAGE);
    use vm_memory::GuestMemoryBackend;
    assert_eq!(arena.memory().num_regions(), 1);
    assert!(matches!(
        FrameArena::anonymous(0x123, 4 * PAGE_SIZE),
        Err(Error::InvalidArena(_))
    ));
}

#[test]
fn pin_reads_file_and_splits_spans_at_pages() {
    let dir = temp_dir();
    let data = pattern(3 * PAGE_SIZE + 123, 7);
    let path = make_file(&dir, "a", &data);
    let cache = cache(16, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(file.len(), data.len() as u64);

    let pin = file.pin(100..data.len() as u64).unwrap();
    assert_eq!(pin.len(), data.len() as u64 - 100);
    assert_eq!(pin.page_count(), 4);
    assert_eq!(pin.to_vec(), &data[100..]);

    let spans: Vec<_> = pin.spans(PAGE - 10..2 * PAGE + 5).collect();
    assert_eq!(spans.len(), 3);
    assert_eq!(spans[0].file_offset, PAGE - 10);
    assert_eq!(spans[0].bytes.len(), 10);
    assert_eq!(spans[1].file_offset, PAGE);
    assert_eq!(spans[1].bytes.len(), PAGE_SIZE);
    assert_eq!(spans[1].iova % PAGE, 0);
    assert_eq!(spans[2].bytes.len(), 5);
    assert_eq!(spans[0].iova % PAGE, PAGE - 10);
    for span in &spans {
        let at = span.file_offset as usize;
        assert_eq!(span.bytes, &data[at..at + span.bytes.len()]);
        assert!(span.iova >= 0x10_0000 && span.iova < 0x10_0000 + 16 * PAGE);
    }
    // Empty pin and out-of-range pin.
    assert!(file.pin(5..5).unwrap().is_empty());
    assert!(matches!(
        file.pin(0..data.len() as u64 + 1),
        Err(Error::OutOfRange { .. })
    ));
    let stats = cache.stats();
    assert_eq!(stats.pinned_pages_now, 4);
    drop(pin);
    assert_eq!(cache.stats().pinned_pages_now, 0);
}

#[test]
fn consecutive_pages_of_a_fresh_cache_are_contiguous_in_iova() {
    // Why it matters: adjacent pages become one DMA descriptor (and, in 2 MiB pages, one
    // IOMMU translation). Without the ascending order the free-list stack hands frames out
    // in descending order and no two pages of a file are adjacent.
    let dir = temp_dir();
    let data = pattern(20 * PAGE_SIZE, 3);
    let path = make_file(&dir, "a", &data);
    let cache = cache(64, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    let pin = file.pin(0..data.len() as u64).unwrap();
    let spans: Vec<_> = pin.all_spans().collect();
    assert_eq!(spans.len(), 20);
    let adjacent = spans
        .windows(2)
        .filter(|w| w[0].iova + w[0].bytes.len() as u64 == w[1].iova)
        .count();
    assert_eq!(
        adjacent,
        19,
        "{:x?}",
        spans.iter().map(|s| s.iova).collect::<Vec<_>>()
    );
    assert_eq!(pin.to_vec(), data);
}

#[test]
fn copy_on_write_keeps_pinned_version() {
    let dir = temp_dir();
    let old = pattern(2 * PAGE_SIZE, 1);
    let path = make_file(&dir, "cow", &old);
    let cache = cache(16, CacheConfig::default());
    let file = cache.open(&path, rw(WritePolicy::CopyOnWrite)).unwrap();

    let pin = file.pin(0..2 * PAGE).unwrap();
    let v1 = pin.version();
    file.write(10, b"hello").unwrap();
    assert_eq!(pin.to_vec(), old, "pinned bytes changed");
    let fresh = file.pin(0..2 * PAGE).unwrap();
    assert!(fresh.version() > v1);
    let mut expected = old.clone();
    expected[10..15].copy_from_slice(b"hello");
    assert_eq!(fresh.to_vec(), expected);
    assert_eq!(cache.stats().cow_copies, 1);

    // The second page was shared by both pins and never copied.
    let free_before = cache.stats().free_frames_now;
    drop(pin);
    assert_eq!(
        cache.stats().free_frames_now,
        free_before + 1,
        "old version freed"
    );
    // An unpinned page is written in place (no copy).
    drop(fresh);
    file.write(0, b"x").unwrap();
    assert_eq!(cache.stats().cow_copies, 1);
}

#[test]
fn wait_policy_times_out_without_writing() {
    let dir = temp_dir();
    let old = pattern(2 * PAGE_SIZE, 2);
    let path = make_file(&dir, "wait", &old);
    let cache = cache(16, CacheConfig::default());
    let file = cache.open(&path, rw(WAIT_SHORT)).unwrap();

    let pin = file.pin(PAGE..PAGE + 1).unwrap();
    let version = file.version();
    // Touches page 0 (unpinned) and page 1 (pinned): must not write page 0 either.
    let err = file.write(PAGE - 2, &[0xAA; 4]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::WriteTimeout {
                pinned_pages: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(file.version(), version);
    drop(pin);
    assert_eq!(file.pin(0..2 * PAGE).unwrap().to_vec(), old);
    let stats = cache.stats();
    assert_eq!(stats.write_timeouts, 1);
    assert_eq!(stats.writer_waits, 1);
    assert!(stats.writer_wait_time >= Duration::from_millis(50));
    // Writes to other pages go ahead.
    let _pin = file.pin(PAGE..PAGE + 1).unwrap();
    file.write(0, b"ok").unwrap();
}

#[test]
fn wait_policy_proceeds_when_pin_released() {
    let dir = temp_dir();
    let path = make_file(&dir, "wait2", &pattern(PAGE_SIZE, 3));
    let cache = cache(16, CacheConfig::default());
    let file = cache
        .open(
            &path,
            rw(WritePolicy::Wait {
                timeout: Duration::from_secs(10),
            }),
        )
        .unwrap();
    let pin = file.pin(0..PAGE).unwrap();
    let before = pin.to_vec();
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        assert_eq!(pin.to_vec(), before, "changed while pinned");
        drop(pin);
    });
    file.write(0, b"new").unwrap();
    releaser.join().unwrap();
    assert_eq!(&file.pin(0..3).unwrap().to_vec(), b"new");
    let stats = cache.stats();
    assert_eq!(stats.writer_waits, 1);
    assert!(stats.writer_wait_time >= Duration::from_millis(20));
    assert_eq!(stats.write_timeouts, 0);
}

#[test]
fn clones_and_sub_pins_release_progressively() {
    let dir = temp_dir();
    let data = pattern(3 * PAGE_SIZE, 4);
    let path = make_file(&dir, "sub", &data);
    let cache = cache(16, CacheConfig::default());
    let file = cache.open(&path, rw(WritePolicy::CopyOnWrite)).unwrap();

    let pin = file.pin(0..3 * PAGE).unwrap();
    let clone = pin.clone();
    let tail = pin.sub_pin(2 * PAGE + 5..3 * PAGE);
    assert_eq!(tail.page_count(), 1);
    assert_eq!(tail.len(), PAGE - 5);
    assert_eq!(tail.version(), pin.version());
    drop(pin);
    assert_eq!(cache.stats().pinned_pages_now, 3, "clone still holds all");
    drop(clone);
    assert_eq!(cache.stats().pinned_pages_now, 1, "only the sub-pin's page");

    file.write(0, b"a").unwrap(); // page 0 no longer pinned: in place
    assert_eq!(cache.stats().cow_copies, 0);
    file.write(2 * PAGE + 5, b"b").unwrap(); // page 2 pinned: copied
    assert_eq!(cache.stats().cow_copies, 1);
    assert_eq!(tail.to_vec(), &data[2 * PAGE_SIZE + 5..]);
    let spans: Vec<_> = tail.all_spans().collect();
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].file_offset, 2 * PAGE + 5);
}

#[test]
#[should_panic(expected = "not inside")]
fn spans_outside_pin_panic() {
    let dir = temp_dir();
    let path = make_file(&dir, "p", &pattern(PAGE_SIZE, 0));
    let cache = cache(4, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    let pin = file.pin(10..20).unwrap();
    let _ = pin.spans(0..20).count();
}

#[test]
fn read_only_handle_rejects_writes() {
    let dir = temp_dir();
    let path = make_file(&dir, "ro", b"abc");
    let cache = cache(4, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    assert!(matches!(file.write(0, b"x"), Err(Error::ReadOnly { .. })));
    assert!(matches!(file.set_len(0), Err(Error::ReadOnly { .. })));
    // A writable handle on the same (already cached) file works.
    let writable = cache.open(&path, rw(WritePolicy::CopyOnWrite)).unwrap();
    writable.write(0, b"x").unwrap();
    writable.fsync().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"xbc");
}

#[test]
fn writes_extend_and_writeback_reaches_disk() {
    let dir = temp_dir();
    let mut data = pattern(PAGE_SIZE + 10, 5);
    let path = make_file(&dir, "wb", &data);
    let cache = cache(16, CacheConfig::default());
    let file = cache.open(&path, rw(WritePolicy::CopyOnWrite)).unwrap();
    let extra = pattern(2 * PAGE_SIZE, 9);
    file.write(PAGE + 100, &extra).unwrap();
    data.resize(PAGE_SIZE + 100, 0);
    data.extend_from_slice(&extra);
    assert_eq!(file.len(), data.len() as u64);
    assert_eq!(file.pin(0..file.len()).unwrap().to_vec(), data);
    // Not on disk yet, but after fsync it is, and revalidation sees no external change.
    assert_ne!(std::fs::read(&path).unwrap(), data);
    file.fsync().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert!(cache.stats().writebacks >= 3);
    assert!(!file.revalidate().unwrap());
    cache.writeback_all().unwrap();
}

#[test]
fn set_len_shrinks_and_grows_with_zeroes() {
    let dir = temp_dir();
    let data = pattern(3 * PAGE_SIZE, 6);
    let path = make_file(&dir, "len", &data);
    let cache = cache(16, CacheConfig::default());
    let file = cache.open(&path, rw(WritePolicy::CopyOnWrite)).unwrap();
    let pin = file.pin(0..3 * PAGE).unwrap();

    file.set_len(PAGE + 7).unwrap();
    assert_eq!(file.len(), PAGE + 7);
    assert_eq!(pin.to_vec(), data, "truncation must not touch pinned bytes");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), PAGE + 7);

    file.set_len(3 * PAGE).unwrap();
    let mut expected = data[..PAGE_SIZE + 7].to_vec();
    expected.resize(3 * PAGE_SIZE, 0);
    assert_eq!(file.pin(0..3 * PAGE).unwrap().to_vec(), expected);
    file.fsync().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), expected);
    drop(pin);
    assert_eq!(cache.stats().pinned_pages_now, 0);
}

#[test]
fn external_changes_are_seen_after_revalidation() {
    let dir = temp_dir();
    let path = make_file(&dir, "ext", &pattern(2 * PAGE_SIZE, 1));
    let cache = cache(16, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    let old_pin = file.pin(0..2 * PAGE).unwrap();
    let old = old_pin.to_vec();

    let new = pattern(PAGE_SIZE + 1, 77);
    std::fs::write(&path, &new).unwrap();
    assert_eq!(
        old_pin.to_vec(),
        old,
        "disk writes never change cached frames"
    );
    assert!(file.revalidate().unwrap());
    assert_eq!(file.len(), new.len() as u64);
    let new_pin = file.pin(0..file.len()).unwrap();
    assert_eq!(new_pin.to_vec(), new);
    assert!(new_pin.version() > old_pin.version());
    assert_eq!(old_pin.to_vec(), old);

    // Replacing the file by rename is detected on open of the cached path.
    let replacement = pattern(100, 3);
    let tmp = make_file(&dir, "ext.tmp", &replacement);
    std::fs::rename(&tmp, &path).unwrap();
    let reopened = cache.open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(reopened.pin(0..100).unwrap().to_vec(), replacement);
    assert_eq!(cache.stats().external_changes, 2);
}

#[test]
fn eviction_recycles_unpinned_pages() {
    let dir = temp_dir();
    let data = pattern(32 * PAGE_SIZE, 8);
    let path = make_file(&dir, "big", &data);
    let cache = cache(8, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    let keep = file.pin(0..PAGE).unwrap();
    for round in 0..2 {
        for page in (0..32u64).rev() {
            let pin = file.pin(page * PAGE..(page + 1) * PAGE).unwrap();
            let at = (page * PAGE) as usize;
            assert_eq!(
                pin.to_vec(),
                &data[at..at + PAGE_SIZE],
                "round {round} page {page}"
            );
        }
    }
    assert!(cache.stats().evictions >= 24);
    assert_eq!(
        keep.to_vec(),
        &data[..PAGE_SIZE],
        "pinned page survived eviction"
    );
}

#[test]
fn dirty_pages_are_written_back_to_make_room() {
    let dir = temp_dir();
    let path = make_file(&dir, "dirty", b"");
    let cache = cache(4, CacheConfig::default());
    let file = cache.open(&path, rw(WritePolicy::CopyOnWrite)).unwrap();
    let data = pattern(20 * PAGE_SIZE, 11);
    for chunk in 0..20 {
        let at = chunk * PAGE_SIZE;
        file.write(at as u64, &data[at..at + PAGE_SIZE]).unwrap();
    }
    assert!(cache.stats().evictions >= 16);
    assert_eq!(file.len(), 20 * PAGE);
    file.fsync().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let mut reread = Vec::new();
    for page in 0..20u64 {
        reread.extend(file.pin(page * PAGE..(page + 1) * PAGE).unwrap().to_vec());
    }
    assert_eq!(reread, data);
}

#[test]
fn out_of_frames_is_an_error_or_a_bounded_wait() {
    let dir = temp_dir();
    let data = pattern(8 * PAGE_SIZE, 12);
    let path = make_file(&dir, "oof", &data);

    let cache_err = cache(4, CacheConfig::default());
    let file = cache_err.open(&path, OpenOptions::read_only()).unwrap();
    let held = file.pin(0..4 * PAGE).unwrap();
    let err = file.pin(4 * PAGE..5 * PAGE).unwrap_err();
    assert!(matches!(err, Error::OutOfFrames { needed: 1 }), "{err}");
    assert_eq!(cache_err.stats().out_of_frames, 1);
    drop(held);
    assert!(file.pin(4 * PAGE..5 * PAGE).is_ok());

    let cache_wait = cache(
        4,
        CacheConfig {
            backpressure: Backpressure::Wait {
                timeout: Duration::from_secs(10),
            },
            ..CacheConfig::default()
        },
    );
    let file = cache_wait.open(&path, OpenOptions::read_only()).unwrap();
    let held = file.pin(0..4 * PAGE).unwrap();
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        drop(held);
    });
    let pin = file.pin(4 * PAGE..5 * PAGE).unwrap();
    assert_eq!(pin.to_vec(), &data[4 * PAGE_SIZE..5 * PAGE_SIZE]);
    releaser.join().unwrap();
    assert_eq!(cache_wait.stats().frame_waits, 1);

    // A bounded wait that runs out reports OutOfFrames too.
    let cache_short = cache(
        2,
        CacheConfig {
            backpressure: Backpressure::Wait {
                timeout: Duration::from_millis(20),
            },
            ..CacheConfig::default()
        },
    );
    let file = cache_short.open(&path, OpenOptions::read_only()).unwrap();
    let _held = file.pin(0..2 * PAGE).unwrap();
    assert!(matches!(
        file.pin(2 * PAGE..3 * PAGE),
        Err(Error::OutOfFrames { .. })
    ));
}

#[test]
fn sequential_pins_read_ahead() {
    let dir = temp_dir();
    let data = pattern(64 * PAGE_SIZE, 13);
    let path = make_file(&dir, "ra", &data);
    let cache = cache(128, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    for page in 0..64u64 {
        let pin = file.pin(page * PAGE..(page + 1) * PAGE).unwrap();
        let at = (page * PAGE) as usize;
        assert_eq!(pin.to_vec(), &data[at..at + PAGE_SIZE]);
    }
    let stats = cache.stats();
    assert_eq!(stats.fills, 64);
    assert_eq!(stats.bytes_read, 64 * PAGE);
    // With read-ahead, far fewer pins than pages had to wait for a fill: check the
    // sequential window grew by looking at resident pages after the first few pins.
    let cache2 = self::cache(128, CacheConfig::default());
    let file2 = cache2.open(&path, OpenOptions::read_only()).unwrap();
    for page in 0..3u64 {
        drop(file2.pin(page * PAGE..(page + 1) * PAGE).unwrap());
    }
    assert!(cache2.stats().fills > 3, "read-ahead brought in more pages");
}

#[test]
fn soft_limit_keeps_resident_pages_down() {
    let dir = temp_dir();
    let data = pattern(32 * PAGE_SIZE, 14);
    let path = make_file(&dir, "soft", &data);
    let cache = cache(
        32,
        CacheConfig {
            soft_limit_frames: Some(8),
            readahead_max_pages: 0,
            ..CacheConfig::default()
        },
    );
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    for page in 0..32u64 {
        drop(file.pin(page * PAGE..(page + 1) * PAGE).unwrap());
    }
    assert!(cache.stats().resident_pages_now <= 9, "{:?}", cache.stats());
}

#[test]
fn audit_counts_checks_and_no_violations_normally() {
    let dir = temp_dir();
    let path = make_file(&dir, "audit", &pattern(4 * PAGE_SIZE, 15));
    let cache = cache(
        16,
        CacheConfig {
            audit: true,
            ..CacheConfig::default()
        },
    );
    let file = cache.open(&path, rw(WritePolicy::CopyOnWrite)).unwrap();
    let pin = file.pin(0..4 * PAGE).unwrap();
    file.write(0, &[1; 100]).unwrap();
    file.fsync().unwrap();
    drop(pin);
    let stats = cache.stats();
    assert!(stats.audit_checks >= 4, "{stats:?}");
    assert_eq!(stats.audit_violations, 0);
}

#[test]
fn audit_detects_in_place_writes_to_pinned_pages() {
    let dir = temp_dir();
    let path = make_file(&dir, "scribble", &pattern(2 * PAGE_SIZE, 16));
    let cache = cache(
        16,
        CacheConfig {
            audit: true,
            ..CacheConfig::default()
        },
    );
    let file = cache.open(&path, rw(WritePolicy::InPlaceUnsafe)).unwrap();
    let pin = file.pin(0..2 * PAGE).unwrap();
    let before = pin.to_vec();
    file.write(5, b"scribble").unwrap();
    assert_ne!(
        pin.to_vec(),
        before,
        "InPlaceUnsafe really writes pinned bytes"
    );
    drop(pin);
    let stats = cache.stats();
    assert_eq!(stats.audit_violations, 1, "{stats:?}");
    assert_eq!(stats.audit_checks, 2);
}

fn audited(verify_every: u32) -> CacheConfig {
    CacheConfig {
        audit: true,
        audit_verify_every: verify_every,
        ..CacheConfig::default()
    }
}

/// One checksum per frame version, however often it is pinned; a deterministic 1-in-N of the
/// releases verified (releases 0, N, 2N, ... of each frame), the others counted as skipped.
#[test]
fn audit_records_once_per_version_and_samples_releases() {
    let dir = temp_dir();
    let path = make_file(&dir, "sampled", &pattern(PAGE_SIZE, 17));
    let cache = cache(16, audited(4));
    let file = cache.open(&path, rw(WritePolicy::CopyOnWrite)).unwrap();
    for _ in 0..8 {
        drop(file.pin(0..PAGE).unwrap());
    }
    let stats = cache.stats();
    assert_eq!(stats.audit_records, 1, "{stats:?}");
    assert_eq!(stats.audit_checks, 2, "releases 0 and 4: {stats:?}");
    assert_eq!(stats.audit_skipped, 6, "{stats:?}");
    assert!(
        stats.lock_free_pins >= 7,
        "audit pins go lock-free: {stats:?}"
    );
    // A write into the unpinned frame ends its version (verified, then recorded anew).
    file.write(0, b"new").unwrap();
    assert_eq!(cache.stats().audit_checks, 3);
    drop(file.pin(0..PAGE).unwrap());
    let stats = cache.stats();
    assert_eq!(stats.audit_records, 2, "{stats:?}");
    assert_eq!(stats.audit_violations, 0, "{stats:?}");
}

/// With every release verified (N = 1), a write into a pinned page is reported at the release
/// of the pin that saw it, even on a release that is not the last.
#[test]
fn audit_every_release_catches_a_write_at_the_next_release() {
    let dir = temp_dir();
    let path = make_file(&dir, "every", &pattern(2 * PAGE_SIZE, 18));
    let cache = cache(16, audited(1));
    let file = cache.open(&path, rw(WritePolicy::InPlaceUnsafe)).unwrap();
    let outer = file.pin(0..2 * PAGE).unwrap();
    drop(file.pin(0..PAGE).unwrap());
    assert_eq!(cache.stats().audit_violations, 0);
    let inner = file.pin(0..PAGE).unwrap();
    file.write(1, b"scribble").unwrap();
    drop(inner); // not the last pin: the outer one still holds the page
    let stats = cache.stats();
    assert_eq!(stats.audit_violations, 1, "{stats:?}");
    drop(outer);
    assert!(cache.stats().audit_violations >= 2);
}

/// A write into a pinned page that no sampled release sees is still caught when the frame's
/// version ends (here: the next write into it once unpinned; eviction and freeing too).
#[test]
fn audit_catches_an_unsampled_violation_when_the_version_ends() {
    let dir = temp_dir();
    let path = make_file(&dir, "late", &pattern(2 * PAGE_SIZE, 19));
    let cache = cache(16, audited(0)); // no release is verified
    let file = cache.open(&path, rw(WritePolicy::InPlaceUnsafe)).unwrap();
    let pin = file.pin(0..2 * PAGE).unwrap();
    file.write(PAGE + 3, b"scribble").unwrap(); // into the pinned second page
    drop(pin);
    let stats = cache.stats();
    assert_eq!(
        (stats.audit_checks, stats.audit_violations),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(stats.audit_skipped, 2, "{stats:?}");
    // Unpinned now: this write ends both versions, and the second one had changed.
    file.write(0, &[9; 2 * PAGE_SIZE]).unwrap();
    let stats = cache.stats();
    assert_eq!(stats.audit_checks, 2, "{stats:?}");
    assert_eq!(stats.audit_violations, 1, "{stats:?}");
}

#[test]
fn replace_contents_is_one_atomic_version() {
    let dir = temp_dir();
    let old = pattern(3 * PAGE_SIZE + 100, 1);
    let path = make_file(&dir, "replace", &old);
    let cache = cache(32, CacheConfig::default());
    for policy in [
        WritePolicy::CopyOnWrite,
        WritePolicy::Wait {
            timeout: std::time::Duration::from_millis(50),
        },
    ] {
        let file = cache.open(&path, rw(policy)).unwrap();
        file.replace_contents(&old).unwrap();
        let before = file.pin(0..file.len()).unwrap();
        let shorter = pattern(PAGE_SIZE + 7, 2);
        match policy {
            WritePolicy::CopyOnWrite => {
                file.replace_contents(&shorter).unwrap();
                assert_eq!(
                    before.to_vec(),
                    old,
                    "the pinned snapshot kept the old bytes"
                );
            }
            _ => {
                // A Wait writer cannot replace pinned pages; it fails without writing.
                assert!(file.replace_contents(&shorter).is_err());
                assert_eq!(file.pin(0..file.len()).unwrap().to_vec(), old);
                drop(before);
                file.replace_contents(&shorter).unwrap();
            }
        }
        assert_eq!(file.len(), shorter.len() as u64);
        assert_eq!(file.pin(0..file.len()).unwrap().to_vec(), shorter);
        let longer = pattern(4 * PAGE_SIZE + 1, 3);
        file.replace_contents(&longer).unwrap();
        assert_eq!(file.pin(0..file.len()).unwrap().to_vec(), longer);
        file.fsync().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), longer);
    }
}

/// A reader's open (which revalidates the file against the disk) while the cache's own
/// writeback of it is in flight is not an external change. The writeback's `pwrite`s move the
/// file's size and mtime before it records the new identity at its end; taking that for
/// another program's change discarded the unwritten pages and set the length from the
/// half-written file, whose holes later pins read as zeros (found by `replace_stress`: a
/// rewritten file pinned at its full length, all zeros). Here the window is held open by hand:
/// the pages moved to `writing_back` as the writeback does, and its first `pwrite` made.
#[test]
fn revalidating_during_our_own_writeback_is_not_an_external_change() {
    use std::os::unix::fs::FileExt;
    let dir = temp_dir();
    let path = make_file(&dir, "in-flight", &pattern(PAGE_SIZE, 1));
    let cache = cache(16, CacheConfig::default());
    let writer = cache.open(&path, rw(WritePolicy::CopyOnWrite)).unwrap();
    let data = pattern(4 * PAGE_SIZE, 2);
    writer.write(0, &data).unwrap();
    {
        let mut st = writer.shared.state.lock();
        assert_eq!(st.dirty.len(), 4, "nothing written back yet");
        st.writing_back = std::mem::take(&mut st.dirty);
    }
    // The writeback's first run: the last page (the file grows to its full length, with a
    // hole where the other pages are not written yet).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&data[3 * PAGE_SIZE..], 3 * PAGE)
        .unwrap();

    let reader = cache.open(&path, OpenOptions::read_only()).unwrap();
    assert_eq!(cache.stats().external_changes, 0, "{:?}", cache.stats());
    assert_eq!(reader.len(), data.len() as u64);
    assert_eq!(
        reader.pin(0..4 * PAGE).unwrap().to_vec(),
        data,
        "the written pages, not the half-written file"
    );

    // The writeback ends: the pages are written, the identity recorded.
    std::fs::write(&path, &data).unwrap();
    {
        let mut st = writer.shared.state.lock();
        st.writing_back.clear();
        let fd = st.fd.clone().unwrap();
        st.refresh_disk_identity(&fd);
    }
    assert!(!reader.revalidate().unwrap());
    assert_eq!(cache.stats().external_changes, 0);
    assert_eq!(std::fs::read(&path).unwrap(), data);
}
