//! Streaming snapshots, non-blocking pins and writes, the open-file bound and file identity,
//! through the public API.

mod common;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagecache::{
    Attempt, Backpressure, CacheConfig, CachedFile, Error, InvalidationReason, OldVersionPolicy,
    OpenOptions, PageCache, PendingReason, Pin, Snapshot, WritePolicy, PAGE_SIZE,
};

const PAGE: u64 = PAGE_SIZE as u64;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i / PAGE_SIZE) as u8)
        .collect()
}

/// Pins the next piece, waiting for fills and frames like a blocking caller.
fn next(snapshot: &mut Snapshot, max: u64) -> Result<Pin, Error> {
    loop {
        match snapshot.pin_next(max)? {
            Attempt::Ready(pin) => return Ok(pin),
            Attempt::Pending(p) => {
                assert!(p.wait_until(Instant::now() + Duration::from_secs(10)));
            }
        }
    }
}

/// Streams a whole snapshot in `window`-sized pins, dropping each at once.
fn stream(snapshot: &mut Snapshot, window: u64) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    while snapshot.remaining() > 0 {
        out.extend(next(snapshot, window)?.to_vec());
    }
    Ok(out)
}

/// A file `name` holding `data` in a new temporary directory (which holds the file as long
/// as it lives), and a cache of `frames` frames configured by `config`.
fn file_and_cache(
    name: &str,
    data: &[u8],
    frames: usize,
    config: CacheConfig,
) -> (tempfile::TempDir, PathBuf, PageCache) {
    let dir = common::temp_dir("pagecache-snap");
    let path = common::make_file(&dir, name, data);
    (dir, path, common::cache(frames, config))
}

/// Without read-ahead: only what a test pins or streams is resident.
fn no_readahead() -> CacheConfig {
    CacheConfig {
        readahead_max_pages: 0,
        ..CacheConfig::default()
    }
}

fn cow(cache: &PageCache, path: &std::path::Path) -> CachedFile {
    cache
        .open(path, OpenOptions::read_write(WritePolicy::CopyOnWrite))
        .unwrap()
}

#[test]
fn snapshot_is_cheap_and_streams_a_file_larger_than_the_cache() {
    let data = pattern(64 * PAGE_SIZE + 5, 1);
    let (_dir, path, cache) = file_and_cache("big", &data, 16, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    let mut snapshot = file.snapshot(0..file.len()).unwrap();
    let stats = cache.stats();
    assert_eq!(stats.pinned_pages_now, 0, "a snapshot pins nothing");
    assert_eq!(stats.fills, 0, "a snapshot reads nothing");
    assert_eq!(snapshot.len(), data.len() as u64);
    assert_eq!(snapshot.version(), file.version());

    let mut seen = Vec::new();
    let mut max_pinned = 0;
    let mut held: Vec<Pin> = Vec::new();
    while snapshot.remaining() > 0 {
        let pin = next(&mut snapshot, 2 * PAGE).unwrap();
        assert_eq!(pin.version(), snapshot.version());
        seen.extend(pin.to_vec());
        held.push(pin);
        if held.len() > 2 {
            held.remove(0); // "acknowledged"
        }
        max_pinned = max_pinned.max(cache.stats().pinned_pages_now);
    }
    assert_eq!(seen, data);
    assert!(
        max_pinned <= 6,
        "pinned pages bounded by the window: {max_pinned}"
    );
    drop(held);
    assert_eq!(cache.stats().pinned_pages_now, 0);
    assert!(cache.stats().background_fills > 0);
}

#[test]
fn a_cold_pin_is_pending_and_notifies_a_channel() {
    let data = pattern(8 * PAGE_SIZE, 2);
    let (_dir, path, cache) = file_and_cache("cold", &data, 64, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    let mut snapshot = file.snapshot(0..file.len()).unwrap();
    let (tx, rx) = mpsc::channel();
    let pending = match snapshot.pin(0..4 * PAGE).unwrap() {
        Attempt::Pending(p) => p,
        Attempt::Ready(_) => panic!("cold pages cannot be ready at once"),
    };
    assert_eq!(pending.reason(), PendingReason::Filling);
    assert_eq!(pending.deadline(), None);
    pending.notify(&tx, 42);
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 42);
    assert!(pending.is_ready());
    let pin = snapshot.pin(0..4 * PAGE).unwrap().ready().expect("filled");
    assert_eq!(pin.to_vec(), &data[..4 * PAGE_SIZE]);
}

#[test]
fn writers_keep_what_open_snapshots_need() {
    let old = pattern(12 * PAGE_SIZE, 3);
    let (_dir, path, cache) = file_and_cache("cow", &old, 64, CacheConfig::default());
    let file = cow(&cache, &path);
    drop(file.pin(0..4 * PAGE).unwrap()); // pages 0..4 resident, 4..12 cold
    let mut snapshot = file.snapshot(0..file.len()).unwrap();
    let first = next(&mut snapshot, PAGE).unwrap();

    // Resident and cold pages, a whole-file replacement and a truncation.
    file.write(PAGE + 10, &[0xEE; 3 * PAGE_SIZE]).unwrap();
    file.replace_contents(&pattern(5 * PAGE_SIZE + 7, 9))
        .unwrap();
    file.set_len(PAGE).unwrap();
    assert!(cache.stats().old_version_pages_now > 0);
    assert!(cache.stats().old_version_pages_peak >= cache.stats().old_version_pages_now);

    let mut body = first.to_vec();
    body.extend(stream(&mut snapshot, 3 * PAGE).unwrap());
    assert_eq!(body, old, "the snapshot is one version");
    drop(first);
    drop(snapshot);
    let stats = cache.stats();
    assert_eq!(stats.old_version_pages_now, 0, "{stats:?}");
    assert_eq!(stats.pinned_pages_now, 0, "{stats:?}");
    // A new snapshot sees the new content.
    let mut fresh = file.snapshot(0..file.len()).unwrap();
    assert_eq!(
        stream(&mut fresh, PAGE).unwrap(),
        &pattern(5 * PAGE_SIZE + 7, 9)[..PAGE_SIZE]
    );
}

#[test]
fn pages_already_streamed_are_not_kept() {
    let (_dir, path, cache) =
        file_and_cache("f", &pattern(8 * PAGE_SIZE, 4), 64, CacheConfig::default());
    let file = cow(&cache, &path);
    let mut snapshot = file.snapshot(0..file.len()).unwrap();
    drop(next(&mut snapshot, 4 * PAGE).unwrap()); // sent and acknowledged
    file.write(0, &[1; 4 * PAGE_SIZE]).unwrap();
    assert_eq!(
        cache.stats().old_version_pages_now,
        0,
        "released pages need no old version"
    );
    file.write(4 * PAGE, &[1; PAGE_SIZE]).unwrap();
    assert_eq!(cache.stats().old_version_pages_now, 1);
    snapshot.release_before(5 * PAGE);
    assert_eq!(cache.stats().old_version_pages_now, 0);
    assert!(matches!(
        snapshot.pin(4 * PAGE..5 * PAGE),
        Err(Error::Released { .. })
    ));
}

fn limited(policy: OldVersionPolicy, limit: usize) -> CacheConfig {
    CacheConfig {
        old_version_limit_pages: Some(limit),
        old_version_policy: policy,
        ..CacheConfig::default()
    }
}

#[test]
fn at_the_limit_a_writer_waits_without_blocking() {
    let dir = common::temp_dir("pagecache-snap");
    let old = pattern(8 * PAGE_SIZE, 5);
    let path = common::make_file(&dir, "w", &old);
    let policy = OldVersionPolicy::WriterWaits {
        timeout: Duration::from_millis(50),
    };
    let cache = common::cache(64, limited(policy, 2));
    let file = cow(&cache, &path);
    let mut snapshot = file.snapshot(0..file.len()).unwrap();

    // Two pages fit under the limit, four do not: nothing is written.
    file.write(0, &[7; 2 * PAGE_SIZE]).unwrap();
    let version = file.version();
    let pending = match file.try_write(2 * PAGE, &[8; 2 * PAGE_SIZE]).unwrap() {
        Attempt::Pending(p) => p,
        Attempt::Ready(()) => panic!("over the old-version limit"),
    };
    assert_eq!(
        pending.reason(),
        PendingReason::OldVersionLimit { needed: 2 }
    );
    assert!(pending.deadline().is_some());
    assert_eq!(file.version(), version, "nothing written");
    assert!(matches!(
        file.write(2 * PAGE, &[8; 2 * PAGE_SIZE]),
        Err(Error::OldVersionLimit {
            needed: 2,
            limit: 2
        })
    ));
    assert!(cache.stats().old_version_pages_now <= 2);

    // The reader moves on: the writer is told and goes ahead.
    let (tx, rx) = mpsc::channel();
    pending.notify(&tx, 7);
    while snapshot.position() < 4 * PAGE {
        let left = 4 * PAGE - snapshot.position();
        drop(next(&mut snapshot, left).unwrap());
    }
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
    loop {
        // May still be pending for the snapshot's read-ahead fills of those pages.
        match file.try_write(2 * PAGE, &[8; 2 * PAGE_SIZE]).unwrap() {
            Attempt::Ready(()) => break,
            Attempt::Pending(p) => {
                assert_eq!(p.reason(), PendingReason::Filling);
                assert!(p.wait_until(Instant::now() + Duration::from_secs(10)));
            }
        }
    }
    assert_eq!(stream(&mut snapshot, PAGE).unwrap(), &old[4 * PAGE_SIZE..]);
    assert!(cache.stats().old_version_waits >= 2);
}

#[test]
fn at_the_limit_snapshots_can_be_invalidated_instead() {
    let old = pattern(8 * PAGE_SIZE, 6);
    let (_dir, path, cache) = file_and_cache(
        "i",
        &old,
        64,
        limited(OldVersionPolicy::InvalidateSnapshots, 2),
    );
    let file = cow(&cache, &path);
    let mut older = file.snapshot(0..file.len()).unwrap();
    let first = next(&mut older, PAGE).unwrap();
    file.write(7 * PAGE, b"x").unwrap(); // one old page kept for `older`
    let mut newer = file.snapshot(0..file.len()).unwrap();
    // Needs 7 pages for `older` (1..7 minus none kept) and 8 for `newer`: over the limit.
    file.write(0, &[9; 8 * PAGE_SIZE]).unwrap();
    assert!(cache.stats().old_version_pages_now <= 2);
    assert_eq!(cache.stats().snapshots_invalidated, 2);
    for snapshot in [&mut older, &mut newer] {
        assert!(matches!(
            snapshot.pin_next(PAGE),
            Err(Error::SnapshotInvalidated {
                reason: InvalidationReason::OldVersionLimit
            })
        ));
    }
    assert_eq!(first.to_vec(), &old[..PAGE_SIZE], "pinned bytes stay valid");
    drop((older, newer));
    assert_eq!(cache.stats().old_version_pages_now, 0);
}

#[test]
fn out_of_frames_is_pending_with_a_deadline_then_an_error() {
    let dir = common::temp_dir("pagecache-snap");
    let path = common::make_file(&dir, "f", &pattern(16 * PAGE_SIZE, 7));
    let config = CacheConfig {
        backpressure: Backpressure::Wait {
            timeout: Duration::from_millis(30),
        },
        readahead_max_pages: 0,
        ..CacheConfig::default()
    };
    let cache = common::cache(4, config);
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    let held = file.pin(0..4 * PAGE).unwrap();
    let mut snapshot = file.snapshot(4 * PAGE..8 * PAGE).unwrap();
    let pending = match snapshot.pin_next(PAGE).unwrap() {
        Attempt::Pending(p) => p,
        Attempt::Ready(_) => panic!("every frame is pinned"),
    };
    assert_eq!(pending.reason(), PendingReason::OutOfFrames { needed: 1 });
    let deadline = pending.deadline().expect("a deadline");
    assert!(!pending.is_ready());
    drop(held);
    assert!(pending.is_ready(), "a released pin readies the waiter");
    assert!(deadline > Instant::now() - Duration::from_secs(1));
    let pin = next(&mut snapshot, PAGE).unwrap();
    drop(pin);
    // Past the deadline, a retry fails.
    let _held = file.pin(8 * PAGE..12 * PAGE).unwrap();
    let mut stuck = file.snapshot(12 * PAGE..16 * PAGE).unwrap();
    assert!(stuck.pin_next(PAGE).unwrap().is_pending());
    std::thread::sleep(Duration::from_millis(40));
    assert!(matches!(
        stuck.pin_next(PAGE),
        Err(Error::OutOfFrames { .. })
    ));
}

#[test]
fn an_external_change_keeps_resident_snapshots_and_invalidates_the_rest() {
    let old = pattern(4 * PAGE_SIZE, 8);
    let (_dir, path, cache) = file_and_cache("e", &old, 64, no_readahead());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    drop(file.pin(0..2 * PAGE).unwrap());
    let mut resident = file.snapshot(0..2 * PAGE).unwrap();
    let mut cold = file.snapshot(0..4 * PAGE).unwrap();
    common::change_externally(&path, &pattern(4 * PAGE_SIZE, 99), 5);
    assert!(file.revalidate().unwrap());
    assert_eq!(stream(&mut resident, PAGE).unwrap(), &old[..2 * PAGE_SIZE]);
    assert!(matches!(
        cold.pin_next(PAGE),
        Err(Error::SnapshotInvalidated {
            reason: InvalidationReason::ExternalChange
        })
    ));
    drop((resident, cold));
    assert_eq!(cache.stats().old_version_pages_now, 0);
}

#[test]
fn at_most_max_open_files_descriptors_are_kept() {
    let dir = common::temp_dir("pagecache-fds");
    let config = CacheConfig {
        max_open_files: 3,
        ..CacheConfig::default()
    };
    let cache = common::cache(256, config);
    let contents: Vec<Vec<u8>> = (0..20).map(|i| pattern(PAGE_SIZE + i, i as u8)).collect();
    let files: Vec<CachedFile> = contents
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let path = common::make_file(&dir, &format!("f{i}"), data);
            cache.open(&path, OpenOptions::read_only()).unwrap()
        })
        .collect();
    assert!(cache.stats().open_files_now <= 3, "{:?}", cache.stats());
    for round in 0..2 {
        for (file, data) in files.iter().zip(&contents) {
            let mut snapshot = file.snapshot(0..file.len()).unwrap();
            assert_eq!(&stream(&mut snapshot, PAGE).unwrap(), data, "round {round}");
            assert!(cache.stats().open_files_now <= 3);
        }
    }
    let stats = cache.stats();
    assert!(stats.files_reopened >= 17, "{stats:?}");
    assert!(stats.files_closed >= 17, "{stats:?}");
    // A file replaced while its descriptor was closed is an external change, not a mix.
    let replacement = pattern(PAGE_SIZE + 3, 77);
    common::change_externally(&dir.path().join("f0"), &replacement, 9);
    let file = &files[0];
    let mut snapshot = file.snapshot(0..PAGE).unwrap();
    match stream(&mut snapshot, PAGE) {
        Err(Error::SnapshotInvalidated { .. }) => {}
        Ok(bytes) => assert_eq!(bytes, &contents[0][..PAGE_SIZE], "still resident"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn identity_survives_restarts_and_changes_with_content() {
    let dir = common::temp_dir("pagecache-id");
    let path = common::make_file(&dir, "id", &pattern(3 * PAGE_SIZE, 10));
    let meta = std::fs::metadata(&path).unwrap();
    let etag_before = {
        let cache = common::cache(32, CacheConfig::default());
        let file = cow(&cache, &path);
        let id = file.identity();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (id.dev, id.ino, id.disk_size),
            (meta.dev(), meta.ino(), meta.size())
        );
        assert_eq!(id.mtime, meta.modified().unwrap(), "nanoseconds kept");
        assert!(id.matches_disk);
        let etag = id.etag();
        let snapshot = file.snapshot(0..PAGE).unwrap();
        assert_eq!(snapshot.identity(), id);
        file.write(0, b"changed").unwrap();
        let written = file.identity();
        assert!(!written.matches_disk);
        assert_ne!(written.etag(), etag, "an unwritten change has its own ETag");
        let started = file.start_fsync().unwrap();
        assert!(started.wait_until(Instant::now() + Duration::from_secs(10)));
        started.outcome().unwrap().unwrap();
        let synced = file.identity();
        assert_ne!(synced.etag(), etag);
        synced.etag()
    };
    // "Restart": a new cache on the unchanged file gives the same ETag.
    let cache = common::cache(32, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    let after = file.identity();
    if after.matches_disk {
        assert_eq!(after.etag(), etag_before);
    }
    // Edited "while the server was down": another ETag.
    drop((file, cache));
    std::fs::write(&path, pattern(3 * PAGE_SIZE, 11)).unwrap();
    let cache = common::cache(32, CacheConfig::default());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    assert_ne!(file.identity().etag(), etag_before);
}

#[test]
fn an_edit_by_another_process_during_a_stream_is_caught_by_the_fill() {
    let old = pattern(8 * PAGE_SIZE, 12);
    let (_dir, path, cache) = file_and_cache("edited", &old, 64, no_readahead());
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    let mut snapshot = file.snapshot(0..file.len()).unwrap();
    let first = next(&mut snapshot, PAGE).unwrap();
    // Edited in place by "another process", same size, no revalidation by anyone.
    common::change_externally(&path, &pattern(8 * PAGE_SIZE, 13), 11);
    assert!(matches!(
        next(&mut snapshot, PAGE),
        Err(Error::SnapshotInvalidated {
            reason: InvalidationReason::ExternalChange
        })
    ));
    assert_eq!(
        first.to_vec(),
        &old[..PAGE_SIZE],
        "what was sent is one version"
    );
    assert_eq!(cache.stats().external_changes, 1);
    // New requests see the new version.
    let mut fresh = file.snapshot(0..file.len()).unwrap();
    assert_eq!(
        stream(&mut fresh, 4 * PAGE).unwrap(),
        pattern(8 * PAGE_SIZE, 13)
    );
}

/// The figures scaled down 8x (32 MiB cache -> 4 MiB): 16 concurrent 512 KiB
/// downloads (8 MiB, twice the cache) served by one event-loop thread that never blocks:
/// pins when it has window space, parks pending connections on an mpsc channel, drops pins
/// when "acknowledged". Then four snapshots of four versions of a file that never read,
/// while later requests still succeed.
#[test]
fn one_event_loop_serves_more_than_the_cache_holds() {
    let dir = common::temp_dir("pagecache-loop");
    const BODY: usize = 128 * PAGE_SIZE;
    let config = CacheConfig {
        backpressure: Backpressure::Wait {
            timeout: Duration::from_secs(5),
        },
        ..CacheConfig::default()
    };
    let cache = common::cache(1024, config);
    let files: Vec<(CachedFile, Vec<u8>)> = (0..4)
        .map(|i| {
            let data = pattern(BODY, 40 + i as u8);
            let path = common::make_file(&dir, &format!("f{i}"), &data);
            (cache.open(&path, OpenOptions::read_only()).unwrap(), data)
        })
        .collect();
    struct Conn {
        snapshot: Snapshot,
        expected: usize,
        body: Vec<u8>,
        in_flight: Vec<Pin>,
        parked: bool,
    }
    let mut conns: Vec<Conn> = (0..16)
        .map(|i| Conn {
            snapshot: files[i % 4].0.snapshot(0..BODY as u64).unwrap(),
            expected: i % 4,
            body: Vec::new(),
            in_flight: Vec::new(),
            parked: false,
        })
        .collect();
    let (ready_tx, ready_rx) = mpsc::channel::<u64>();
    let mut peak_pinned = 0;
    let started = Instant::now();
    while conns.iter().any(|c| c.snapshot.remaining() > 0) {
        assert!(started.elapsed() < Duration::from_secs(30), "stuck");
        for token in ready_rx.try_iter() {
            conns[token as usize].parked = false;
        }
        for (token, conn) in conns.iter_mut().enumerate() {
            // "ACK + TX completion" of the oldest piece, one loop iteration after sending.
            if !conn.in_flight.is_empty() {
                conn.in_flight.remove(0);
            }
            if conn.parked || conn.snapshot.remaining() == 0 {
                continue;
            }
            match conn.snapshot.pin_next(16 * PAGE).unwrap() {
                Attempt::Ready(pin) => {
                    conn.body.extend(pin.to_vec());
                    conn.in_flight.push(pin);
                }
                Attempt::Pending(p) => {
                    conn.parked = true;
                    p.notify(&ready_tx, token as u64);
                }
            }
        }
        peak_pinned = peak_pinned.max(cache.stats().pinned_pages_now);
        let busy = conns.iter().any(|c| c.snapshot.remaining() > 0);
        if busy
            && conns
                .iter()
                .all(|c| c.parked || c.snapshot.remaining() == 0)
        {
            // Nothing to do until a completion: block on the queue (a real loop would poll
            // the NIC here).
            if let Ok(token) = ready_rx.recv_timeout(Duration::from_secs(5)) {
                conns[token as usize].parked = false;
            }
        }
    }
    for conn in &conns {
        assert_eq!(conn.body, files[conn.expected].1, "one version per body");
    }
    assert!(
        peak_pinned <= 16 * 2 * 16,
        "pins bounded by the windows: {peak_pinned}"
    );
    drop(conns);

    // Four non-reading readers holding four versions: bounded, and the server still serves.
    let path = common::make_file(&dir, "hot", &pattern(BODY, 1));
    let writer = cow(&cache, &path);
    let mut idle = Vec::new();
    for v in 0..4u8 {
        idle.push(writer.snapshot(0..BODY as u64).unwrap());
        // Non-blocking: cold pages the snapshot needs are read in first (Filling); at the
        // limit the writer is told to come back later.
        loop {
            match writer.try_write(0, &pattern(BODY, 2 + v)).unwrap() {
                Attempt::Ready(()) => break,
                Attempt::Pending(p) if p.reason() == PendingReason::Filling => {
                    assert!(p.wait_until(Instant::now() + Duration::from_secs(10)));
                }
                Attempt::Pending(p) => {
                    assert_eq!(p.reason(), PendingReason::OldVersionLimit { needed: 128 });
                    break;
                }
            }
        }
    }
    let stats = cache.stats();
    assert!(
        stats.old_version_pages_now <= 256,
        "a quarter of the arena: {stats:?}"
    );
    let mut later = files[0].0.snapshot(0..BODY as u64).unwrap();
    assert_eq!(stream(&mut later, 16 * PAGE).unwrap(), files[0].1);
    drop(idle);
    assert_eq!(cache.stats().old_version_pages_now, 0);
}
