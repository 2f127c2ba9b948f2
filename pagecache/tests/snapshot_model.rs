//! Randomized model check of streaming snapshots: readers take snapshots and pin them
//! progressively (holding and releasing pins, abandoning some), while writers (blocking and
//! non-blocking, copy-on-write and wait) write, replace, truncate and write back, under a
//! small frame budget (eviction) and a small old-version limit (both policies).
//!
//! Checked after every step: every byte a reader observes equals the file's content at its
//! snapshot's version; held pins never change; old-version pages never exceed the limit.
//! At the end, with all readers gone, pinned and old-version pages are back to zero.

mod common;

use std::time::{Duration, Instant};

use pagecache::{
    Attempt, CacheConfig, CachedFile, Error, OldVersionPolicy, PageCache, Pin, Snapshot, PAGE_SIZE,
};
use proptest::prelude::*;

const PAGE: u64 = PAGE_SIZE as u64;
const MAX_LEN: u64 = 8 * PAGE;
const OLD_LIMIT: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Snapshot {
        start: u64,
        len: u64,
    },
    PinNext {
        which: usize,
        pages: u8,
    },
    ReleasePin {
        which: usize,
    },
    DropSnapshot {
        which: usize,
    },
    Write {
        how: u8,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Replace {
        how: u8,
        len: u64,
        seed: u8,
    },
    SetLen {
        len: u64,
    },
    Writeback,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..MAX_LEN, 0..MAX_LEN).prop_map(|(start, len)| Op::Snapshot { start, len }),
        5 => (any::<usize>(), 1..4u8).prop_map(|(which, pages)| Op::PinNext { which, pages }),
        3 => any::<usize>().prop_map(|which| Op::ReleasePin { which }),
        1 => any::<usize>().prop_map(|which| Op::DropSnapshot { which }),
        4 => (any::<u8>(), 0..MAX_LEN, 1..2 * PAGE_SIZE, any::<u8>())
            .prop_map(|(how, offset, len, seed)| Op::Write { how, offset, len, seed }),
        1 => (any::<u8>(), 0..MAX_LEN, any::<u8>()).prop_map(|(how, len, seed)| Op::Replace { how, len, seed }),
        1 => (0..MAX_LEN).prop_map(|len| Op::SetLen { len }),
        1 => Just(Op::Writeback),
    ]
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i / PAGE_SIZE) as u8)
        .collect()
}

struct Reader {
    snapshot: Snapshot,
    /// The file's bytes in the snapshot's range, at the snapshot's version.
    expected: Vec<u8>,
    /// Pins handed out and not yet "acknowledged", with the bytes they must hold.
    held: Vec<(Pin, Vec<u8>)>,
}

/// Waits for a pending result like an event loop would (bounded).
fn settle<T>(mut attempt: impl FnMut() -> Result<Attempt<T>, Error>) -> Result<Option<T>, Error> {
    for _ in 0..100 {
        match attempt()? {
            Attempt::Ready(value) => return Ok(Some(value)),
            Attempt::Pending(pending) => {
                let deadline = pending
                    .deadline()
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(10));
                if !pending.wait_until(deadline) {
                    return Ok(None); // the caller gives up at the deadline
                }
            }
        }
    }
    Ok(None)
}

/// Compares without printing kilobytes: the first differing offset is what helps.
#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: {} vs {} bytes, first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

fn check(readers: &[Reader], cache: &PageCache) {
    for r in readers {
        for (pin, bytes) in &r.held {
            same(&pin.to_vec(), bytes, "held pin changed");
        }
    }
    let stats = cache.stats();
    assert!(stats.old_version_pages_now <= OLD_LIMIT as u64, "{stats:?}");
    assert!(
        stats.old_version_pages_peak <= OLD_LIMIT as u64,
        "{stats:?}"
    );
}

fn run(ops: Vec<Op>, frames: usize, policy: OldVersionPolicy) {
    let dir = common::temp_dir("pagecache-snapmodel");
    let initial = bytes(5 * PAGE_SIZE + 77, 31);
    let path = common::make_file(&dir, "model", &initial);
    let config = CacheConfig {
        old_version_limit_pages: Some(OLD_LIMIT),
        old_version_policy: policy,
        io_threads: 1,
        ..common::model_config()
    };
    let cache = common::cache(frames, config);
    let (cow, wait) = common::cow_and_impatient_writers(&cache, &path);
    let mut model = initial;
    let mut readers: Vec<Reader> = Vec::new();

    for op in ops {
        match op {
            Op::Snapshot { start, len } => {
                let start = start.min(model.len() as u64);
                let end = (start + len).min(model.len() as u64);
                let snapshot = cow.snapshot(start..end).unwrap();
                readers.push(Reader {
                    snapshot,
                    expected: model[start as usize..end as usize].to_vec(),
                    held: Vec::new(),
                });
            }
            Op::PinNext { which, pages } => {
                if readers.is_empty() {
                    continue;
                }
                let i = which % readers.len();
                let r = &mut readers[i];
                let at = (r.snapshot.position() - r.snapshot.range().start) as usize;
                match settle(|| r.snapshot.pin_next(u64::from(pages) * PAGE)) {
                    Ok(Some(pin)) => {
                        let got = pin.to_vec();
                        same(
                            &got,
                            &r.expected[at..at + got.len()],
                            "reader saw another version",
                        );
                        assert_eq!(pin.version(), r.snapshot.version());
                        r.held.push((pin, got));
                    }
                    // Out of frames (back-pressure Error) or invalidated: the server resets
                    // the connection; what was sent stays a prefix of one version.
                    Ok(None)
                    | Err(Error::OutOfFrames { .. })
                    | Err(Error::SnapshotInvalidated { .. }) => {
                        readers.swap_remove(i);
                    }
                    Err(e) => panic!("pin_next: {e}"),
                }
            }
            Op::ReleasePin { which } => {
                if let Some(r) = readers.iter_mut().find(|r| !r.held.is_empty()) {
                    let n = r.held.len();
                    r.held.remove(which % n);
                }
            }
            Op::DropSnapshot { which } => {
                if !readers.is_empty() {
                    readers.swap_remove(which % readers.len());
                }
            }
            Op::Write {
                how,
                offset,
                len,
                seed,
            } => {
                let offset = offset.min(model.len() as u64);
                let data = bytes(len, seed);
                let handle: &CachedFile = if how & 1 == 0 { &cow } else { &wait };
                let outcome = if how & 2 == 0 {
                    handle.write(offset, &data).map(Some)
                } else {
                    settle(|| handle.try_write(offset, &data))
                };
                match outcome {
                    Ok(Some(())) => {
                        common::write_to_model(&mut model, offset as usize, &data);
                    }
                    Ok(None)
                    | Err(Error::WriteTimeout { .. })
                    | Err(Error::OutOfFrames { .. })
                    | Err(Error::OldVersionLimit { .. }) => {}
                    Err(e) => panic!("write: {e}"),
                }
            }
            Op::Replace { how, len, seed } => {
                let data = bytes(len as usize, seed);
                let outcome = if how & 1 == 0 {
                    cow.replace_contents(&data).map(Some)
                } else {
                    settle(|| cow.try_replace_contents(&data))
                };
                match outcome {
                    Ok(Some(())) => model = data,
                    Ok(None)
                    | Err(Error::OutOfFrames { .. })
                    | Err(Error::OldVersionLimit { .. }) => {}
                    Err(e) => panic!("replace: {e}"),
                }
            }
            Op::SetLen { len } => match cow.set_len(len) {
                Ok(()) => model.resize(len as usize, 0),
                Err(Error::OutOfFrames { .. }) | Err(Error::OldVersionLimit { .. }) => {}
                Err(e) => panic!("set_len: {e}"),
            },
            Op::Writeback => cache.writeback_all().unwrap(),
        }
        assert_eq!(cow.len(), model.len() as u64, "length");
        check(&readers, &cache);
    }
    // The readers that are left finish their bodies (with every pin released, frames are
    // enough), each exactly its version.
    for r in &mut readers {
        r.held.clear();
    }
    for mut r in readers {
        let mut at = (r.snapshot.position() - r.snapshot.range().start) as usize;
        while r.snapshot.remaining() > 0 {
            match settle(|| r.snapshot.pin_next(PAGE)) {
                Ok(Some(pin)) => {
                    let got = pin.to_vec();
                    same(&got, &r.expected[at..at + got.len()], "final stream");
                    at += got.len();
                }
                Ok(None)
                | Err(Error::SnapshotInvalidated { .. })
                | Err(Error::OutOfFrames { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    // Background writeback scheduled by the non-blocking writes pins its frames while it
    // runs: let it finish before checking that nothing is pinned.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().pinned_pages_now > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = cache.stats();
    common::assert_settled(&stats);
    assert_eq!(stats.old_version_pages_now, 0, "{stats:?}");
    cow.fsync().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model, "disk after fsync");
}

const WAITS: OldVersionPolicy = OldVersionPolicy::WriterWaits {
    timeout: Duration::ZERO,
};

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn snapshots_writer_waits_roomy(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, 64, WAITS);
    }

    #[test]
    fn snapshots_writer_waits_tight(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, 10, WAITS);
    }

    #[test]
    fn snapshots_invalidated_roomy(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, 64, OldVersionPolicy::InvalidateSnapshots);
    }

    #[test]
    fn snapshots_invalidated_tight(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, 10, OldVersionPolicy::InvalidateSnapshots);
    }
}
