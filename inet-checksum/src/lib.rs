//! The Internet checksum (RFC 1071), over scattered pieces of any length.
//!
//! The one implementation in the workspace: the stack uses it when the NIC cannot checksum
//! TCP itself (the sum is then computed from the pinned page bytes the NIC will DMA, which
//! cannot change before the DMA completes), and the software NIC uses it to play a device
//! that fills in checksums. (`hw_tests::wire` keeps an independent, deliberately naive
//! reference implementation to judge what reaches the wire: a check that shared this code
//! would share its bugs.)

/// Running one's-complement sum over a byte stream given in pieces.
///
/// Pieces may have odd lengths: a piece that starts at an odd stream position is summed as
/// if aligned and its sum byte-swapped (RFC 1071, "byte order independence").
#[derive(Clone, Copy, Debug, Default)]
pub struct Checksum {
    sum: u64,
    odd: bool,
}

impl Checksum {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next piece of the stream.
    #[inline]
    pub fn add(&mut self, bytes: &[u8]) {
        let piece = fold(sum_be(bytes));
        let piece = if self.odd { piece.swap_bytes() } else { piece };
        self.sum += piece as u64;
        self.odd ^= bytes.len() % 2 == 1;
    }

    /// Adds a 16-bit word at an even stream position (pseudo-header fields).
    #[inline]
    pub fn add_word(&mut self, word: u16) {
        debug_assert!(!self.odd);
        self.sum += word as u64;
    }

    /// The folded sum, not inverted (what goes in the field for checksum offload).
    pub fn sum(&self) -> u16 {
        fold(self.sum)
    }

    /// The checksum to store: the inverted folded sum.
    pub fn finish(&self) -> u16 {
        !self.sum()
    }
}

/// Folds a wide one's-complement sum to 16 bits.
#[inline]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Sum of big-endian 16-bit words (odd tail padded with zero), unfolded.
///
/// Adds 32-bit big-endian words into a 64-bit accumulator: the folded result equals the
/// 16-bit word sum, and it runs several times faster.
#[inline]
pub fn sum_be(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut chunks = bytes.chunks_exact(16);
    for c in &mut chunks {
        sum += u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as u64;
        sum += u32::from_be_bytes([c[4], c[5], c[6], c[7]]) as u64;
        sum += u32::from_be_bytes([c[8], c[9], c[10], c[11]]) as u64;
        sum += u32::from_be_bytes([c[12], c[13], c[14], c[15]]) as u64;
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = rest.remainder() {
        sum += (*last as u64) << 8;
    }
    sum
}

/// The checksum to store for `bytes` alone (e.g. an IPv4 header with its checksum field
/// zero): the inverted folded sum.
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum_be(bytes))
}

/// One's-complement addition of two 16-bit sums (end-around carry).
pub fn add(a: u16, b: u16) -> u16 {
    fold(a as u64 + b as u64)
}

/// The IPv4 pseudo-header sum (not inverted) for `protocol` and an L4 length.
pub fn ipv4_pseudo_header(src: [u8; 4], dst: [u8; 4], protocol: u8, l4_len: u32) -> u16 {
    let mut c = Checksum::new();
    c.add(&src);
    c.add(&dst);
    c.add_word(protocol as u16);
    c.sum += l4_len as u64;
    c.sum()
}

/// The IPv6 pseudo-header sum (not inverted; RFC 8200 section 8.1: source, destination,
/// 32-bit upper-layer packet length, three zero bytes, next header).
pub fn ipv6_pseudo_header(src: [u8; 16], dst: [u8; 16], next_header: u8, l4_len: u32) -> u16 {
    let mut c = Checksum::new();
    c.add(&src);
    c.add(&dst);
    c.add(&l4_len.to_be_bytes());
    c.add_word(next_header as u16);
    c.sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(bytes: &[u8]) -> u16 {
        let mut sum = 0u32;
        for c in bytes.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                (c[0] as u16) << 8
            };
            sum += w as u32;
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn matches_the_reference_for_any_split() {
        let data: Vec<u8> = (0..3001u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let expected = reference(&data);
        for split in [0usize, 1, 2, 3, 15, 16, 17, 1000, 2999, 3000, 3001] {
            for second in [split, (split + 7).min(data.len())] {
                let mut c = Checksum::new();
                c.add(&data[..split]);
                c.add(&data[split..second]);
                c.add(&data[second..]);
                assert_eq!(c.sum(), expected, "split {split}/{second}");
            }
        }
    }

    #[test]
    fn header_checksum_verifies_and_addition_wraps() {
        let mut header = [
            0x45, 0, 0, 0x3c, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 0xac, 0x10, 0x0a, 0x63, 0xac,
            0x10, 0x0a, 0x0c,
        ];
        let sum = checksum(&header);
        assert_eq!(sum, 0xb1e6, "the RFC 1071-style textbook example");
        header[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(
            checksum(&header),
            0,
            "a header with its checksum sums to 0xffff"
        );
        assert_eq!(add(0xffff, 0x0001), 0x0001);
        assert_eq!(add(0x8000, 0x8000), 0x0001);
    }

    /// Software segmentation sums a segment's pseudo-header once without its length and
    /// adds each piece's TCP length: that must equal the full sum for every length, carry
    /// included (addresses chosen so the base sum is near 0xffff).
    #[test]
    fn pseudo_header_length_added_later_matches_the_full_sum() {
        let pairs = [
            ([10, 0, 0, 1], [10, 0, 0, 2]),
            ([0xff, 0xff, 0xff, 0xf0], [0xff, 0xff, 0x00, 0x09]),
            ([192, 168, 200, 255], [172, 31, 255, 254]),
        ];
        for (src, dst) in pairs {
            let base = ipv4_pseudo_header(src, dst, 6, 0);
            for len in (0u32..=65535).step_by(7).chain([1, 20, 1480, 65535]) {
                assert_eq!(
                    add(base, len as u16),
                    ipv4_pseudo_header(src, dst, 6, len),
                    "{src:?} -> {dst:?}, length {len}"
                );
            }
        }
    }

    #[test]
    fn pseudo_header_matches_a_known_value() {
        // 10.0.0.1 -> 10.0.0.2, TCP, length 20: 0x0a00+0x0001+0x0a00+0x0002+6+20.
        assert_eq!(
            ipv4_pseudo_header([10, 0, 0, 1], [10, 0, 0, 2], 6, 20),
            0x1403 + 0x1a
        );
    }

    #[test]
    fn ipv6_pseudo_header_matches_a_hand_sum() {
        // fe80::1 -> fe80::2, TCP, length 0x1_0014 (the 32-bit length's high word counts).
        let mut src = [0u8; 16];
        src[0] = 0xfe;
        src[1] = 0x80;
        let mut dst = src;
        src[15] = 1;
        dst[15] = 2;
        let by_hand = 0xfe80u32 + 1 + 0xfe80 + 2 + 1 + 0x14 + 6;
        let folded = (by_hand & 0xffff) + (by_hand >> 16);
        assert_eq!(ipv6_pseudo_header(src, dst, 6, 0x1_0014), folded as u16);
    }
}
