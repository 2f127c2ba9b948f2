//! [`PageCache::sync_all`], the orderly stop's last step: every dirty page is written back
//! and made durable, whatever file it belongs to; a second call finds nothing to do.

mod common;

use pagecache::{CacheConfig, OpenOptions, WritePolicy, PAGE_SIZE};

#[test]
fn sync_all_writes_back_every_dirty_file() {
    let dir = common::temp_dir("sync-all");
    let a = common::make_file(&dir, "a.bin", &vec![1u8; 4 * PAGE_SIZE]);
    let b = common::make_file(&dir, "b.bin", &vec![2u8; 4 * PAGE_SIZE]);
    let untouched = common::make_file(&dir, "c.bin", &vec![3u8; PAGE_SIZE]);
    let cache = common::cache(64, CacheConfig::default());
    let open = |p| {
        cache
            .open(p, OpenOptions::read_write(WritePolicy::CopyOnWrite))
            .unwrap()
    };
    let (fa, fb, fc) = (open(&a), open(&b), open(&untouched));
    fa.write(100, b"first file").unwrap();
    fb.write(3 * PAGE_SIZE as u64, b"second file").unwrap();
    let _ = fc.len();
    // Nothing wrote them back yet: the disk still has the old bytes.
    assert_eq!(std::fs::read(&a).unwrap()[100..110], [1u8; 10]);
    assert_eq!(cache.sync_all().unwrap(), 2, "two files had dirty pages");
    let on_disk = std::fs::read(&a).unwrap();
    assert_eq!(&on_disk[100..110], b"first file");
    let on_disk = std::fs::read(&b).unwrap();
    assert_eq!(&on_disk[3 * PAGE_SIZE..3 * PAGE_SIZE + 11], b"second file");
    assert_eq!(std::fs::read(&untouched).unwrap(), vec![3u8; PAGE_SIZE]);
    assert_eq!(cache.sync_all().unwrap(), 0, "nothing left to sync");
}
