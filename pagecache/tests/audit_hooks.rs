//! Proof that the audit can fail, through the public `test-hooks` API other crates use.
#![cfg(feature = "test-hooks")]

mod common;

use pagecache::{CacheConfig, FrameArena, OpenOptions, PageCache, WritePolicy, PAGE_SIZE};

#[test]
fn in_place_unsafe_writes_are_caught_by_the_audit() {
    let dir = common::temp_dir("pagecache-audit");
    let path = common::make_file(&dir, "f", &vec![7u8; 3 * PAGE_SIZE]);
    let config = CacheConfig {
        audit: true,
        ..CacheConfig::default()
    };
    let cache = PageCache::new(FrameArena::anonymous(0, 16 * PAGE_SIZE).unwrap(), config).unwrap();
    let file = cache
        .open(&path, OpenOptions::read_write(WritePolicy::InPlaceUnsafe))
        .unwrap();
    let pin = file.pin(0..3 * PAGE_SIZE as u64).unwrap();
    let checksum_at_pin = crc32fast::hash(&pin.to_vec());
    file.write(PAGE_SIZE as u64 + 1, b"corrupt").unwrap();
    assert_ne!(crc32fast::hash(&pin.to_vec()), checksum_at_pin);
    drop(pin);
    let stats = cache.stats();
    assert_eq!(stats.audit_checks, 3);
    assert_eq!(stats.audit_violations, 1);
}

/// The guarantee switched off: with the in-place policy a streaming reader sees a torn body
/// (its first page from one version, the rest from the next); with copy-on-write, the same
/// sequence gives one version.
#[test]
fn in_place_unsafe_writes_tear_a_streaming_body() {
    let dir = common::temp_dir("pagecache-torn");
    let old = vec![1u8; 4 * PAGE_SIZE];
    let new = vec![2u8; 4 * PAGE_SIZE];
    let body = |policy: WritePolicy| {
        let path = common::make_file(&dir, "torn", &old);
        let cache = PageCache::new(
            FrameArena::anonymous(0, 16 * PAGE_SIZE).unwrap(),
            CacheConfig::default(),
        )
        .unwrap();
        let file = cache.open(&path, OpenOptions::read_write(policy)).unwrap();
        drop(file.pin(0..4 * PAGE_SIZE as u64).unwrap()); // resident
        let mut snapshot = file.snapshot(0..4 * PAGE_SIZE as u64).unwrap();
        let mut body = snapshot
            .pin_next(PAGE_SIZE as u64)
            .unwrap()
            .ready()
            .unwrap()
            .to_vec();
        file.write(0, &new).unwrap();
        while snapshot.remaining() > 0 {
            let next = snapshot
                .pin_next(PAGE_SIZE as u64)
                .unwrap()
                .ready()
                .expect("resident");
            body.extend(next.to_vec());
        }
        body
    };
    let torn = body(WritePolicy::InPlaceUnsafe);
    assert_eq!(&torn[..PAGE_SIZE], &old[..PAGE_SIZE]);
    assert_eq!(
        &torn[PAGE_SIZE..],
        &new[PAGE_SIZE..],
        "the unsafe policy tears the body"
    );
    assert_eq!(
        body(WritePolicy::CopyOnWrite),
        old,
        "copy-on-write keeps one version"
    );
}
