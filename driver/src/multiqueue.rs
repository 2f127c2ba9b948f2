//! Several queue pairs of one device, each driven by its own thread.
//!
//! A multi-queue driver opens the device with up to `pairs` receive/transmit queue pairs,
//! programs receive-side scaling (RSS: the device hashes each received TCP frame's
//! addresses and ports with the Toeplitz function under [`RSS_KEY`] and picks a queue from an
//! indirection table) and hands out one [`QueuePair`] per pair. Every pair has the full
//! [`NetQueue`] API, its own interrupt vector and its own counters, and is `Send`, so a
//! thread per core can own one. Frames the hash does not cover (ARP, ICMP, fragments) arrive
//! on pair 0.
//!
//! [`toeplitz_hash`] computes the same hash in software, so tests can predict the queue a
//! flow lands on and check the device did what the specification says.

use crate::irq::Interruptible;
use crate::queue::NetQueue;

/// One queue pair of a multi-queue device.
pub trait QueuePair: NetQueue + Interruptible + Send {
    /// This pair's index on the device (0 is the pair that also gets unhashed frames).
    fn queue_index(&self) -> usize;
}

/// The RSS secret key every driver programs: the well-known default key of Microsoft's RSS
/// specification ("Verifying the RSS Hash Calculation"), also Linux's and DPDK's test key, so
/// hashes can be checked against published values.
pub const RSS_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// The Toeplitz hash of `input` under `key` (RSS specification): for every set bit of the
/// input, XOR in the 32 key bits starting at that bit position.
///
/// # Panics
/// If the key is shorter than `input.len() + 4` bytes.
pub fn toeplitz_hash(key: &[u8], input: &[u8]) -> u32 {
    assert!(
        key.len() >= input.len() + 4,
        "RSS key too short for the input"
    );
    let mut hash = 0u32;
    let mut window = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    for (i, &byte) in input.iter().enumerate() {
        let next = key[i + 4];
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                hash ^= window;
            }
            window = (window << 1) | u32::from((next >> (7 - bit)) & 1);
        }
    }
    hash
}

/// The RSS input for TCP over IPv4: source address, destination address, source port,
/// destination port, as received (the sender's address first).
pub fn ipv4_tcp_hash_input(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> [u8; 12] {
    let mut input = [0u8; 12];
    input[..4].copy_from_slice(&src);
    input[4..8].copy_from_slice(&dst);
    input[8..10].copy_from_slice(&src_port.to_be_bytes());
    input[10..].copy_from_slice(&dst_port.to_be_bytes());
    input
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published IPv4/TCP verification values of the RSS specification.
    #[test]
    fn toeplitz_matches_the_specification_examples() {
        let cases = [
            (
                [66, 9, 149, 187],
                2794,
                [161, 142, 100, 80],
                1766,
                0x51cc_c178u32,
            ),
            (
                [199, 92, 111, 2],
                14230,
                [65, 69, 140, 83],
                4739,
                0xc626_b0ea,
            ),
            (
                [24, 19, 198, 95],
                12898,
                [12, 22, 207, 184],
                38024,
                0x5c2b_394a,
            ),
            (
                [38, 27, 205, 30],
                48228,
                [209, 142, 163, 6],
                2217,
                0xafc7_327f,
            ),
            (
                [153, 39, 163, 191],
                44251,
                [202, 188, 127, 2],
                1303,
                0x10e8_28a2,
            ),
        ];
        for (src, sport, dst, dport, expected) in cases {
            let input = ipv4_tcp_hash_input(src, dst, sport, dport);
            assert_eq!(toeplitz_hash(&RSS_KEY, &input), expected, "{src:?}:{sport}");
        }
    }
}
