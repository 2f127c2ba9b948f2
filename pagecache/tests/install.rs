//! Replacing a file by rename ([`PageCache::install`]) while snapshots of the old version
//! are still being streamed: each reader gets exactly the version it started with, even for
//! pages that were never in memory, and the old version is let go once nobody reads it.

mod common;

use std::time::{Duration, Instant};

use pagecache::{
    Attempt, CacheConfig, Error, FrameArena, OpenOptions, PageCache, Snapshot, PAGE_SIZE,
};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i / PAGE_SIZE) as u8)
        .collect()
}

/// Streams what is left of a snapshot, waiting for fills like a blocking caller.
fn stream_rest(snapshot: &mut Snapshot) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    while snapshot.remaining() > 0 {
        match snapshot.pin_next(4 * PAGE_SIZE as u64)? {
            Attempt::Ready(pin) => out.extend(pin.to_vec()),
            Attempt::Pending(p) => {
                assert!(p.wait_until(Instant::now() + Duration::from_secs(10)));
            }
        }
    }
    Ok(out)
}

/// A cache of 16 frames: a 64-page file can never be resident at once.
fn small_cache() -> PageCache {
    PageCache::new(
        FrameArena::anonymous(0x40_0000, 16 * PAGE_SIZE).unwrap(),
        CacheConfig::default(),
    )
    .unwrap()
}

#[test]
fn snapshots_of_a_replaced_file_keep_reading_the_old_version() {
    let dir = common::temp_dir("pagecache-install");
    let target = dir.path().join("video.bin");
    let old = pattern(64 * PAGE_SIZE + 7, 1);
    let new = pattern(40 * PAGE_SIZE + 3, 2);
    std::fs::write(&target, &old).unwrap();
    let cache = small_cache();
    let file = cache.open(&target, OpenOptions::read_only()).unwrap();
    let mut reader = file.snapshot(0..old.len() as u64).unwrap();
    let mut head = stream_prefix(&mut reader, 8 * PAGE_SIZE);
    drop(file);

    let upload = dir.path().join(".upload.tmp");
    std::fs::write(&upload, &new).unwrap();
    cache.install(&upload, &target).unwrap();
    assert_eq!(cache.stats().replaced_files_now, 1);

    // A new reader sees the new version at once.
    let file = cache.open(&target, OpenOptions::read_only()).unwrap();
    let mut fresh = file.snapshot(0..file.len()).unwrap();
    assert_eq!(stream_rest(&mut fresh).unwrap(), new);
    drop((file, fresh));
    // The old reader goes on with the old version, read from the old inode.
    head.extend(stream_rest(&mut reader).unwrap());
    assert!(head == old, "the old reader got bytes of the new version");
    drop(reader);

    // Nobody needs the old file now: an open lets it go, frames and descriptor, once the
    // read-ahead it may still have in flight has finished.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.stats().replaced_files_now > 0 && Instant::now() < deadline {
        drop(cache.open(&target, OpenOptions::read_only()).unwrap());
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = cache.stats();
    assert_eq!(stats.replaced_files_now, 0);
    assert_eq!(stats.installs, 1);
    assert!(stats.resident_pages_now <= 16);
    assert!(!upload.exists());
}

/// Without `install`, a plain rename is an external change: the streaming reader of a file
/// that is not resident is cut off (invalidated, never torn). This is what `install` avoids.
#[test]
fn a_plain_rename_invalidates_readers_that_install_would_keep() {
    let dir = common::temp_dir("pagecache-rename");
    let target = dir.path().join("video.bin");
    let old = pattern(64 * PAGE_SIZE, 3);
    std::fs::write(&target, &old).unwrap();
    let cache = small_cache();
    let file = cache.open(&target, OpenOptions::read_only()).unwrap();
    let mut reader = file.snapshot(0..old.len() as u64).unwrap();
    stream_prefix(&mut reader, 8 * PAGE_SIZE);
    let upload = dir.path().join(".upload.tmp");
    std::fs::write(&upload, pattern(64 * PAGE_SIZE, 4)).unwrap();
    std::fs::rename(&upload, &target).unwrap();
    cache.open(&target, OpenOptions::read_only()).unwrap();
    assert!(matches!(
        stream_rest(&mut reader),
        Err(Error::SnapshotInvalidated { .. })
    ));
}

#[test]
fn install_of_a_new_path_and_a_failed_rename() {
    let dir = common::temp_dir("pagecache-install-new");
    let cache = small_cache();
    let upload = dir.path().join(".upload.tmp");
    std::fs::write(&upload, b"first").unwrap();
    cache.install(&upload, &dir.path().join("new.txt")).unwrap();
    assert_eq!(std::fs::read(dir.path().join("new.txt")).unwrap(), b"first");
    // Renaming a file that does not exist fails and leaves the target as it was.
    let err = cache.install(&dir.path().join("missing.tmp"), &dir.path().join("new.txt"));
    assert!(matches!(err, Err(Error::Io { .. })));
    let file = cache
        .open(dir.path().join("new.txt"), OpenOptions::read_only())
        .unwrap();
    assert_eq!(file.pin(0..5).unwrap().to_vec(), b"first");
}

/// Streams at least `len` bytes from the start of a snapshot.
fn stream_prefix(snapshot: &mut Snapshot, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < len {
        match snapshot.pin_next((len - out.len()) as u64).unwrap() {
            Attempt::Ready(pin) => out.extend(pin.to_vec()),
            Attempt::Pending(p) => {
                assert!(p.wait_until(Instant::now() + Duration::from_secs(10)));
            }
        }
    }
    out
}
