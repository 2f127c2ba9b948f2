//! The placeholder poison: what smoltcp's send rings hold in zero-copy mode.
//!
//! In zero-copy mode smoltcp's TCP send ring only accounts for stream positions; the bytes
//! smoltcp copies out of it into a frame are never meant to reach the wire (the device
//! boundary replaces them with the real payload by IOVA, or drops the frame). The ring is
//! filled with a distinctive 16-byte pattern instead of zeros, so a placeholder that did
//! reach a NIC is unmistakable: every test that sees frames on the wire (the software NIC's
//! TX tap, the guest tests' pcaps) scans them with [`find_poison`].

/// Stream bytes of a connection whose ring space is poisoned: the first 64 KiB. The rest of a
/// fresh ring is never written (smoltcp only reads it), so it stays untouched anonymous
/// memory, which reads as the kernel's shared zero page: a send ring of megabytes costs
/// memory only for this span. A placeholder leaked from beyond it would be zeros, which the
/// byte checks of every test (sha256 of what a client received) catch instead.
pub const POISON_SPAN: u64 = 64 << 10;

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

/// Poisons the part of `ring[..n]` (ring space just claimed for stream bytes `fed..fed + n`)
/// that was never written before and lies in the first [`POISON_SPAN`] stream bytes; a ring
/// of `ring_len` bytes has been written all over once `fed` passes `ring_len`.
pub fn fill_fresh(ring: &mut [u8], n: usize, fed: u64, ring_len: u64) {
    let limit = ring_len.min(POISON_SPAN);
    if fed < limit {
        let fresh = (limit - fed).min(n as u64) as usize;
        fill_at(&mut ring[..fresh], fed);
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
    fn only_the_first_span_of_a_fresh_ring_is_poisoned() {
        let span = POISON_SPAN as usize;
        let ring_len = 4 * span;
        let mut ring = vec![0u8; ring_len];
        // Claimed in two pieces straddling the end of the span, then one past it.
        fill_fresh(&mut ring[..], span - 100, 0, ring_len as u64);
        fill_fresh(
            &mut ring[span - 100..],
            200,
            POISON_SPAN - 100,
            ring_len as u64,
        );
        fill_fresh(
            &mut ring[span + 100..],
            span,
            POISON_SPAN + 100,
            ring_len as u64,
        );
        let mut whole = vec![0u8; span];
        fill(&mut whole);
        assert_eq!(
            &ring[..span],
            &whole[..],
            "one unbroken pattern over the span"
        );
        assert!(
            ring[span..].iter().all(|&b| b == 0),
            "nothing written past the span"
        );
        // After a wrap nothing is written at all.
        let mut again = vec![0u8; 64];
        fill_fresh(&mut again, 64, ring_len as u64, ring_len as u64);
        assert!(again.iter().all(|&b| b == 0));
        // A ring smaller than the span is poisoned whole on its first pass.
        let mut small = vec![0u8; 1000];
        fill_fresh(&mut small, 1000, 0, 1000);
        assert_eq!(find_poison(&small), Some(0));
    }

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
