//! Test content: deterministic pseudo-random files and version-stamped files whose every
//! 4 KiB block names its version, so a torn response (blocks of two versions) is detectable.

use sha2::{Digest, Sha256};

/// `len` pseudo-random bytes from `seed` (xorshift64*; fast and reproducible).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub const STAMP_BLOCK: usize = 4096;

/// `blocks` blocks of 4 KiB, each starting with `version <v> block <i>` and filled with a
/// byte derived from the version.
pub fn stamped_version(version: u32, blocks: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks * STAMP_BLOCK);
    for i in 0..blocks {
        out.extend_from_slice(&stamped_block(version, i));
    }
    out
}

/// Block `index` of [`stamped_version`]`(version, _)`, for files too large to build whole.
pub fn stamped_block(version: u32, index: usize) -> [u8; STAMP_BLOCK] {
    let mut block = [b'a' + (version % 26) as u8; STAMP_BLOCK];
    let stamp = format!("version {version:08} block {index:06}\n");
    block[..stamp.len()].copy_from_slice(stamp.as_bytes());
    block
}

/// The single version every block of `body` carries, or an error describing the tear.
pub fn check_stamped(body: &[u8], blocks: usize) -> Result<u32, String> {
    if body.len() != blocks * STAMP_BLOCK {
        return Err(format!("length {} != {}", body.len(), blocks * STAMP_BLOCK));
    }
    let version_of =
        |b: &[u8]| -> Option<u32> { std::str::from_utf8(&b[8..16]).ok()?.parse().ok() };
    let v = version_of(&body[..STAMP_BLOCK]).ok_or("unstamped first block")?;
    let expected = stamped_version(v, blocks);
    if body != expected.as_slice() {
        let bad = body
            .chunks(STAMP_BLOCK)
            .zip(expected.chunks(STAMP_BLOCK))
            .position(|(a, b)| a != b)
            .unwrap();
        return Err(format!(
            "torn body: block 0 is version {v}, block {bad} differs ({:?})",
            version_of(&body[bad * STAMP_BLOCK..])
                .map(|x| x.to_string())
                .unwrap_or("?".into())
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_detect_torn_bodies() {
        let a = stamped_version(3, 4);
        assert_eq!(check_stamped(&a, 4), Ok(3));
        let mut torn = a.clone();
        torn[2 * STAMP_BLOCK..3 * STAMP_BLOCK]
            .copy_from_slice(&stamped_version(4, 4)[2 * STAMP_BLOCK..3 * STAMP_BLOCK]);
        assert!(check_stamped(&torn, 4).unwrap_err().contains("torn"));
        assert!(check_stamped(&a[..100], 4).is_err());
        assert_eq!(random_bytes(1, 100), random_bytes(1, 100));
        assert_ne!(random_bytes(1, 100), random_bytes(2, 100));
    }
}
