//! The placeholder poison: what smoltcp's send rings hold in zero-copy mode.
//!
//! In zero-copy mode smoltcp's TCP send ring only accounts for stream positions; the bytes
//! smoltcp copies out of it into a frame are never meant to reach the wire (the device
//! boundary replaces them with the real payload by IOVA, or drops the frame). The ring is
//! filled with a distinctive 16-byte pattern instead of zeros, so a placeholder that did
//! reach a NIC is unmistakable: every test that sees frames on the wire (the software NIC's
//! TX tap, the guest tests' pcaps) scans them with [`find_poison`].

/// The repeated pattern. Any leaked run of 31 or more placeholder bytes contains it whole.
pub const PLACEHOLDER_POISON: [u8; 16] = *b"\xa5zs-placeholder\x5a";

/// Fills `ring` with the repeated [`PLACEHOLDER_POISON`].
pub fn fill(ring: &mut [u8]) {
    for (i, byte) in ring.iter_mut().enumerate() {
        *byte = PLACEHOLDER_POISON[i % PLACEHOLDER_POISON.len()];
    }
}

/// Offset of the first whole [`PLACEHOLDER_POISON`] in `bytes`, if any.
pub fn find_poison(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(PLACEHOLDER_POISON.len())
        .position(|w| w == PLACEHOLDER_POISON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_leaked_run_of_31_bytes_is_found_at_any_alignment() {
        let mut ring = vec![0u8; 4096];
        fill(&mut ring);
        for start in 0..16 {
            let mut frame = vec![0x11u8; 54];
            frame.extend_from_slice(&ring[start..start + 31]);
            assert!(find_poison(&frame).is_some(), "start {start}");
        }
        assert_eq!(find_poison(&[0u8; 1500]), None);
        assert_eq!(find_poison(&ring[..15]), None);
    }
}
