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
