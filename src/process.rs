//! This process's own resource use, from `/proc`, for the metrics page.

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
    }

    #[test]
    fn this_process_has_a_page_size_and_resident_memory() {
        let page = page_size();
        assert!(page >= 4096 && page.is_power_of_two());
        let rss = resident_bytes(page).unwrap();
        assert!(rss > 1 << 20, "a test process uses more than 1 MiB: {rss}");
    }
}
