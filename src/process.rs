//! This process's own resource use, from `/proc`, for the metrics page and the memory
//! budget, and the one allocator setting the budget relies on.

use std::fs;

/// `AT_PAGESZ` in the auxiliary vector (`<elf.h>`).
const AT_PAGESZ: u64 = 6;
/// The page size when `/proc/self/auxv` cannot be read (x86-64's).
const FALLBACK_PAGE_SIZE: u64 = 4096;

/// The kernel's page size, from the auxiliary vector the kernel gave this process (read once
/// at start-up, with no libc call).
pub fn page_size() -> u64 {
    fs::read("/proc/self/auxv")
        .ok()
        .and_then(|auxv| auxv_value(&auxv, AT_PAGESZ))
        .filter(|&size| size.is_power_of_two())
        .unwrap_or(FALLBACK_PAGE_SIZE)
}

/// Resident set size in bytes, from `/proc/self/statm` (cheap: procfs never waits on I/O).
pub fn resident_bytes(page_size: u64) -> Option<u64> {
    let statm = fs::read_to_string("/proc/self/statm").ok()?;
    Some(statm_resident_pages(&statm)? * page_size)
}

/// Memory the kernel could give this process without swapping, in bytes: `MemAvailable`
/// of `/proc/meminfo` (2 MiB pages reserved for the page cache are not in it).
pub fn available_bytes() -> Option<u64> {
    meminfo_available_kib(&fs::read_to_string("/proc/meminfo").ok()?).map(|kib| kib << 10)
}

fn meminfo_available_kib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Allocations of at least this many bytes get their own fresh mapping.
const FRESH_MAPPING_THRESHOLD: i32 = 128 << 10;

/// Makes every large allocation (a TCP send ring: megabytes) a fresh anonymous mapping,
/// unmapped again when freed. glibc's default raises its mapping threshold to the size of
/// the first such block freed, after which a new ring comes from the heap: `calloc` then
/// zeroes memory an earlier connection used, committing the whole ring, and freed rings
/// stay resident. Under 300 slowloris clients that took a 1 GiB guest's server to
/// 558 MiB and the kernel killed it. A fixed threshold keeps an untouched ring free of
/// memory and returns a closed connection's at once. Returns whether the setting took.
#[allow(unsafe_code)]
pub fn map_large_allocations_fresh() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes a tunable of glibc's allocator; it is safe to
        // call at any time, from any thread, and leaves existing allocations valid.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, FRESH_MAPPING_THRESHOLD) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        // Other allocators (musl's) already map large blocks on their own.
        true
    }
}

/// The second field of `statm` (`size resident shared text lib data dt`, in pages).
fn statm_resident_pages(statm: &str) -> Option<u64> {
    statm.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// The value of entry `key` of an auxiliary vector: native-endian (type, value) words.
fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    const WORD: usize = std::mem::size_of::<usize>();
    auxv.chunks_exact(2 * WORD).find_map(|pair| {
        let word = |bytes: &[u8]| usize::from_ne_bytes(bytes.try_into().unwrap()) as u64;
        (word(&pair[..WORD]) == key).then(|| word(&pair[WORD..]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_and_auxv_parsing() {
        assert_eq!(statm_resident_pages("2048 300 100 10 0 500 0\n"), Some(300));
        assert_eq!(statm_resident_pages("2048"), None);
        let mut auxv = Vec::new();
        for (k, v) in [(33u64, 0x7fff_0000u64), (AT_PAGESZ, 16384), (0, 0)] {
            auxv.extend_from_slice(&(k as usize).to_ne_bytes());
            auxv.extend_from_slice(&(v as usize).to_ne_bytes());
        }
        assert_eq!(auxv_value(&auxv, AT_PAGESZ), Some(16384));
        assert_eq!(auxv_value(&auxv, 99), None);
        let meminfo =
            "MemTotal:        1004268 kB\nMemFree:  500 kB\nMemAvailable:     671232 kB\n";
        assert_eq!(meminfo_available_kib(meminfo), Some(671232));
        assert_eq!(meminfo_available_kib("MemTotal: 1 kB\n"), None);
        assert!(available_bytes().unwrap() > 0);
    }

    /// Rings used and freed by earlier connections are returned, and new zeroed rings cost
    /// nothing until written. Without [`map_large_allocations_fresh`] the second batch of
    /// rings reuses the first's heap memory, and `calloc` commits all of it.
    #[test]
    fn freed_rings_return_their_memory_and_new_rings_cost_nothing() {
        const RING: usize = 2 << 20;
        const RINGS: usize = 24;
        let page = page_size();
        let rss = || resident_bytes(page).unwrap() as i64;
        if std::env::var_os("ZEROSEND_TEST_DEFAULT_MALLOC").is_none() {
            assert!(map_large_allocations_fresh());
        }
        // A connection came and went (with glibc's default, this raised its threshold).
        drop(vec![0xa5u8; RING]);
        // Used rings: written all over, then freed (connections that served and closed),
        // each followed by a small buffer that lives on (a newer connection's request).
        let (used, small): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (0..RINGS)
            .map(|_| (vec![0xa5u8; RING], vec![1u8; 4096]))
            .unzip();
        let before_free = rss();
        drop(used);
        let after_free = rss();
        // New connections' rings: zeroed, never written.
        let fresh: Vec<Vec<u8>> = (0..RINGS).map(|_| vec![0u8; RING]).collect();
        let after_fresh = rss();
        assert!(fresh.iter().all(|r| r.len() == RING) && small.len() == RINGS);
        let mib = |b: i64| b as f64 / f64::from(1 << 20);
        let returned = before_free - after_free;
        let committed = after_fresh - after_free;
        let total = (RINGS * RING) as i64;
        assert!(
            returned > total / 2 && committed < total / 4,
            "{RINGS} rings of {} MiB: {:.1} MiB returned on free, {:.1} MiB committed by new zeroed rings",
            RING >> 20,
            mib(returned),
            mib(committed)
        );
    }

    #[test]
    fn this_process_has_a_page_size_and_resident_memory() {
        let page = page_size();
        assert!(page >= 4096 && page.is_power_of_two());
        let rss = resident_bytes(page).unwrap();
        assert!(rss > 1 << 20, "a test process uses more than 1 MiB: {rss}");
    }
}
