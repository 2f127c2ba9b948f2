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

use std::os::fd::RawFd;
use std::sync::Arc;

use crate::anynic::NicConfig;
use crate::dma::DmaSpace;
use crate::error::{DriverError, Result};
use crate::irq::{Interruptible, IrqMode};
use crate::nic::NicModel;
use crate::pci::PciAddress;
use crate::queue::{Capabilities, DeviceStats, MacAddress, NetQueue, RxBuffer, TxFrame, TxToken};
use crate::vfio::VfioPci;

/// One queue pair of a multi-queue device.
pub trait QueuePair: NetQueue + Interruptible + Send {
    /// This pair's index on the device (0 is the pair that also gets unhashed frames).
    fn queue_index(&self) -> usize;
}

/// Opens the NIC at `address` with up to `pairs` queue pairs (fewer if the device has
/// fewer: the e1000 has one, the 82574L two, virtio-net what `max_virtqueue_pairs` says) and
/// RSS across them; one handle per pair, pair 0 first.
pub fn open_nic_queues(
    address: &PciAddress,
    config: &NicConfig,
    pairs: usize,
) -> Result<Vec<Box<dyn QueuePair>>> {
    if pairs == 0 {
        return Err(DriverError::InvalidArgument(
            "queue pairs: at least 1".into(),
        ));
    }
    let pci = VfioPci::open(address)?;
    let (vendor, device) = pci.ids();
    match NicModel::from_ids(vendor, device)? {
        NicModel::I82540EM | NicModel::I82545EM | NicModel::I82574L => {
            crate::e1000::multiqueue::open_queues(pci, config, pairs)
        }
        NicModel::VirtioNet => crate::virtio::multiqueue::open_queues(pci, config, pairs),
    }
}

/// A boxed queue pair is a queue: the stack and the server take `Box<dyn QueuePair>`.
impl<Q: NetQueue + ?Sized> NetQueue for Box<Q> {
    fn mac_address(&self) -> MacAddress {
        (**self).mac_address()
    }
    fn dma(&self) -> &Arc<DmaSpace> {
        (**self).dma()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn link_up(&mut self) -> bool {
        (**self).link_up()
    }
    fn tx_capacity(&self, segments: usize) -> usize {
        (**self).tx_capacity(segments)
    }
    fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> Result<()> {
        (**self).tx_enqueue(frame)
    }
    fn tx_flush(&mut self) {
        (**self).tx_flush()
    }
    fn tx_reap(&mut self, done: &mut dyn FnMut(TxToken)) -> Result<usize> {
        (**self).tx_reap(done)
    }
    fn rx_next(&mut self) -> Option<RxBuffer> {
        (**self).rx_next()
    }
    fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        (**self).rx_read(buffer, out)
    }
    fn rx_recycle(&mut self, buffer: RxBuffer) {
        (**self).rx_recycle(buffer)
    }
    fn rx_flush(&mut self) {
        (**self).rx_flush()
    }
    fn rx_poll(&mut self, budget: usize, f: &mut dyn FnMut(&[u8])) -> usize {
        (**self).rx_poll(budget, f)
    }
    fn stats(&mut self) -> DeviceStats {
        (**self).stats()
    }
}

impl<Q: Interruptible + ?Sized> Interruptible for Box<Q> {
    fn irq_mode(&self) -> Option<IrqMode> {
        (**self).irq_mode()
    }
    fn irq_fds(&self) -> Vec<RawFd> {
        (**self).irq_fds()
    }
    fn irq_arm(&mut self) {
        (**self).irq_arm()
    }
    fn irq_disarm(&mut self) -> u64 {
        (**self).irq_disarm()
    }
    fn irq_count(&self) -> u64 {
        (**self).irq_count()
    }
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
