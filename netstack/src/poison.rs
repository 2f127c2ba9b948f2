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
    fill_at(ring, 0)
}

/// Fills `bytes`, which hold stream offsets `offset..`, with the poison pattern in phase
/// with the stream, so that pieces filled separately still form one unbroken pattern.
pub fn fill_at(bytes: &mut [u8], offset: u64) {
    let period = PLACEHOLDER_POISON.len();
    let mut phased = [0u8; 16];
    let phase = (offset % period as u64) as usize;
    for (i, b) in phased.iter_mut().enumerate() {
        *b = PLACEHOLDER_POISON[(phase + i) % period];
    }
    for chunk in bytes.chunks_mut(period) {
        chunk.copy_from_slice(&phased[..chunk.len()]);
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
        // Filled in small pieces, in phase with the stream: still one pattern.
        let mut pieces = [0u8; 64];
        let mut at = 0;
        for len in [3usize, 7, 1, 20, 33] {
            fill_at(&mut pieces[at..at + len], 1000 + at as u64);
            at += len;
        }
        assert!(find_poison(&pieces[1..33]).is_some());
        assert_eq!(find_poison(&ring[..15]), None);
    }
}
