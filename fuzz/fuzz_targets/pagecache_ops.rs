//! Page-cache operation sequences on a temporary directory (in /dev/shm when there is one,
//! so fsync is cheap), checked against a model of the file's bytes, as
//! `pagecache/tests/model.rs` checks with proptest, plus open/close of handles, snapshots
//! and `install` (replace by rename) of a new version: every pin equals the model when it is
//! taken and never changes while held, a snapshot streams the version it was taken of (or is
//! invalidated, never wrong), the whole file equals the model at the end and after fsync so
//! does the disk, and no page stays pinned and the audit finds no violation.
#![no_main]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagecache::{
    Attempt, Backpressure, CacheConfig, CachedFile, Error, FrameArena, OpenOptions, PageCache, Pin,
    Snapshot, WritePolicy, PAGE_SIZE,
};

const MAX_LEN: u64 = 6 * PAGE_SIZE as u64;

#[derive(Arbitrary, Debug)]
enum Op {
    Pin {
        start: u16,
        len: u16,
    },
    SubPin {
        which: u8,
        start_frac: u8,
        len_frac: u8,
    },
    Unpin {
        which: u8,
    },
    Write {
        cow: bool,
        offset: u16,
        len: u16,
        seed: u8,
    },
    SetLen {
        cow: bool,
        len: u16,
    },
    Writeback,
    Fsync,
    /// Another process replaces the content.
    External {
        len: u16,
        seed: u8,
    },
    /// Close both handles and open them again.
    Reopen,
    Snapshot {
        start: u16,
        len: u16,
    },
    /// Stream some of the oldest open snapshot.
    Stream {
        which: u8,
        max: u16,
    },
    /// A new version written beside the file, then `install`ed over it.
    Install {
        len: u16,
        seed: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    tight: bool,
    ops: Vec<Op>,
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
        .collect()
}

/// Scale a 16-bit fuzz value to 0..=max.
fn scale(v: u16, max: u64) -> u64 {
    v as u64 * max / u16::MAX as u64
}

struct Held {
    pin: Pin,
    expected: Vec<u8>,
}

struct OpenSnapshot {
    snapshot: Snapshot,
    /// The snapshot's range's bytes when it was taken.
    expected: Vec<u8>,
    streamed: usize,
}

fn open(cache: &PageCache, path: &Path) -> (CachedFile, CachedFile) {
    let cow = cache
        .open(path, OpenOptions::read_write(WritePolicy::CopyOnWrite))
        .unwrap();
    let impatient = cache
        .open(
            path,
            OpenOptions::read_write(WritePolicy::Wait {
                timeout: Duration::ZERO,
            }),
        )
        .unwrap();
    (cow, impatient)
}

fn change_externally(path: &Path, data: &[u8], mtime_secs: u64) {
    std::fs::write(path, data).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime_secs))
        .unwrap();
}

fn base_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn stream(s: &mut OpenSnapshot, max: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.snapshot.remaining() > 0 && max > 0 {
        match s.snapshot.pin_next(max) {
            Ok(Attempt::Ready(pin)) => {
                let got = pin.to_vec();
                let want = &s.expected[s.streamed..s.streamed + got.len()];
                assert_eq!(
                    got, want,
                    "snapshot streamed other bytes than its version's"
                );
                s.streamed += got.len();
                return;
            }
            Ok(Attempt::Pending(p)) => {
                assert!(p.wait_until(deadline), "a fill never completed");
            }
            // Invalidated (an external change, a failed install) or no frames: refused,
            // never wrong.
            Err(_) => return,
        }
    }
}

fuzz_target!(|input: Input| {
    let dir = tempfile::Builder::new()
        .prefix("zs-fuzz-pagecache")
        .tempdir_in(base_dir())
        .unwrap();
    let path = dir.path().join("model");
    let initial = bytes(2 * PAGE_SIZE + 100, 200);
    std::fs::write(&path, &initial).unwrap();
    let frames = if input.tight { 8 } else { 64 };
    let cache = PageCache::new(
        FrameArena::anonymous(0x20_0000, frames * PAGE_SIZE).unwrap(),
        CacheConfig {
            audit: true,
            backpressure: Backpressure::Error,
            readahead_max_pages: 2,
            ..CacheConfig::default()
        },
    )
    .unwrap();
    let (mut cow, mut wait) = open(&cache, &path);
    let mut model = initial;
    let mut held: Vec<Held> = Vec::new();
    let mut snapshots: Vec<OpenSnapshot> = Vec::new();
    let mut mtime = 1;

    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Pin { start, len } => {
                let start = scale(start, MAX_LEN).min(model.len() as u64);
                let end = (start + scale(len, 3 * PAGE_SIZE as u64)).min(model.len() as u64);
                match cow.pin(start..end) {
                    Ok(pin) => {
                        let expected = model[start as usize..end as usize].to_vec();
                        assert_eq!(pin.to_vec(), expected, "pin differs from the model");
                        held.push(Held { pin, expected });
                    }
                    Err(Error::OutOfFrames { .. }) => {}
                    Err(e) => panic!("pin failed: {e}"),
                }
            }
            Op::SubPin {
                which,
                start_frac,
                len_frac,
            } => {
                if held.is_empty() {
                    continue;
                }
                let parent = &held[which as usize % held.len()];
                let r = parent.pin.range();
                let start = r.start + (r.end - r.start) * u64::from(start_frac) / 255;
                let end = start + (r.end - start) * u64::from(len_frac) / 255;
                let sub = parent.pin.sub_pin(start..end);
                let from = (start - r.start) as usize;
                let expected = parent.expected[from..from + (end - start) as usize].to_vec();
                assert_eq!(sub.to_vec(), expected);
                held.push(Held { pin: sub, expected });
            }
            Op::Unpin { which } => {
                if !held.is_empty() {
                    let i = which as usize % held.len();
                    held.swap_remove(i);
                }
            }
            Op::Write {
                cow: use_cow,
                offset,
                len,
                seed,
            } => {
                let offset = scale(offset, MAX_LEN).min(model.len() as u64);
                let data = bytes(1 + scale(len, 2 * PAGE_SIZE as u64) as usize, seed);
                let handle = if use_cow { &cow } else { &wait };
                match handle.write(offset, &data) {
                    Ok(()) => {
                        let end = offset as usize + data.len();
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[offset as usize..end].copy_from_slice(&data);
                    }
                    Err(Error::WriteTimeout { .. }) if !use_cow => {}
                    Err(Error::OutOfFrames { .. }) => {}
                    // Open snapshots would need more old pages than allowed: refused whole.
                    Err(Error::OldVersionLimit { .. }) if !snapshots.is_empty() => {}
                    Err(e) => panic!("write failed: {e}"),
                }
            }
            Op::SetLen { cow: use_cow, len } => {
                let len = scale(len, MAX_LEN);
                let handle = if use_cow { &cow } else { &wait };
                match handle.set_len(len) {
                    Ok(()) => model.resize(len as usize, 0),
                    Err(Error::WriteTimeout { .. }) if !use_cow => {}
                    Err(Error::OutOfFrames { .. }) => {}
                    Err(Error::OldVersionLimit { .. }) if !snapshots.is_empty() => {}
                    Err(e) => panic!("set_len failed: {e}"),
                }
            }
            Op::Writeback => cache.writeback_all().unwrap(),
            Op::Fsync => {
                cow.fsync().unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), model, "disk after fsync");
            }
            Op::External { len, seed } => {
                // Our unwritten writes lose against an external change: flush them first
                // so the model stays simple.
                cow.fsync().unwrap();
                let data = bytes(scale(len, MAX_LEN) as usize, seed);
                mtime += 1;
                change_externally(&path, &data, mtime);
                assert!(cow.revalidate().unwrap());
                model = data;
            }
            Op::Reopen => {
                cow.fsync().unwrap();
                drop((cow, wait));
                (cow, wait) = open(&cache, &path);
                assert_eq!(cow.len(), model.len() as u64, "length after reopen");
            }
            Op::Snapshot { start, len } => {
                let start = scale(start, MAX_LEN).min(model.len() as u64);
                let end = (start + scale(len, MAX_LEN)).min(model.len() as u64);
                match cow.snapshot(start..end) {
                    Ok(snapshot) => snapshots.push(OpenSnapshot {
                        snapshot,
                        expected: model[start as usize..end as usize].to_vec(),
                        streamed: 0,
                    }),
                    Err(Error::OutOfFrames { .. }) => {}
                    Err(e) => panic!("snapshot failed: {e}"),
                }
            }
            Op::Stream { which, max } => {
                if !snapshots.is_empty() {
                    let i = which as usize % snapshots.len();
                    stream(&mut snapshots[i], 1 + scale(max, 2 * PAGE_SIZE as u64));
                    if snapshots[i].snapshot.remaining() == 0 {
                        snapshots.swap_remove(i);
                    }
                }
            }
            Op::Install { len, seed } => {
                cow.fsync().unwrap();
                let data = bytes(scale(len, MAX_LEN) as usize, seed);
                let new = dir.path().join("model.new");
                std::fs::write(&new, &data).unwrap();
                cache.install(&new, &path).unwrap();
                // Handles of the old version go on reading it; later opens see the new one.
                drop((cow, wait));
                (cow, wait) = open(&cache, &path);
                model = data;
            }
        }
        assert_eq!(cow.len(), model.len() as u64, "length");
        for h in &held {
            assert_eq!(
                h.pin.to_vec(),
                h.expected,
                "pinned bytes changed: {:?}",
                h.pin
            );
        }
    }
    for s in &mut snapshots {
        while s.snapshot.remaining() > 0 {
            let before = s.streamed;
            stream(s, MAX_LEN);
            if s.streamed == before {
                break; // refused (invalidated, or no frames while pins are held)
            }
        }
    }
    drop(snapshots);
    // The whole file equals the model, read a page at a time (it may be larger than the
    // arena), releasing held pins if the arena runs out.
    let mut at = 0u64;
    while at < model.len() as u64 {
        let end = (at + PAGE_SIZE as u64).min(model.len() as u64);
        match cow.pin(at..end) {
            Ok(p) => {
                assert_eq!(
                    p.to_vec(),
                    &model[at as usize..end as usize],
                    "file at {at}"
                );
                at = end;
            }
            Err(Error::OutOfFrames { .. }) => {
                held.pop()
                    .expect("out of frames for one page with nothing held");
            }
            Err(e) => panic!("{e}"),
        }
    }
    for h in &held {
        assert_eq!(
            h.pin.to_vec(),
            h.expected,
            "pinned bytes changed: {:?}",
            h.pin
        );
    }
    drop(held);
    cow.fsync().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model, "disk at the end");
    let stats = cache.stats();
    assert_eq!(stats.pinned_pages_now, 0, "{stats:?}");
    assert_eq!(stats.audit_violations, 0, "{stats:?}");
});
