//! The e1000 receive ring's descriptor reading (`driver::e1000`, the code behind `rx_next`,
//! `rx_read`, `rx_recycle`, `rx_flush`) against a lying device: the fuzz input plays the
//! device, writing descriptor write-backs (length, status, errors, even the address word) at
//! any descriptor and arbitrary bytes into any buffer, through the software IOMMU as a device
//! would, interleaved with the driver's calls. Checks: no panic; only frames with DD, EOP, no
//! error and a length of 14..=buffer size are lent out; a buffer is never lent twice; every
//! buffer slot is always in exactly one place (free, posted, lent).
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use driver::dma::{DmaMapper, DmaSpace};
use driver::e1000::desc::{RX_ERR_FRAME, RX_STA_DD, RX_STA_EOP};
use driver::e1000::RxRingHarness;
use driver::{MacAddress, RxBuffer};
use libfuzzer_sys::fuzz_target;
use softnic::SoftIommu;

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

#[derive(Arbitrary, Debug)]
enum Op {
    /// The device writes back descriptor `next + ahead` (or absolute `ahead` if `absolute`).
    WriteBack {
        ahead: u8,
        absolute: bool,
        len: u16,
        csum: u16,
        status: u8,
        errors: u8,
        special: u16,
    },
    /// A plausible write-back: DD and EOP, no error, `len`, and the frame's destination
    /// written into the buffer the driver posted there.
    GoodFrame {
        ahead: u8,
        len: u16,
        broadcast: bool,
    },
    /// The device overwrites a descriptor's address word.
    WriteAddress {
        index: u8,
        addr: u64,
    },
    /// The device writes bytes into a buffer slot.
    WriteBuffer {
        slot: u8,
        offset: u16,
        bytes: Vec<u8>,
    },
    Next {
        out_len: u16,
    },
    Recycle {
        which: u8,
    },
    Flush,
}

#[derive(Arbitrary, Debug)]
struct Input {
    size_log2: u8,
    small_buffers: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let iommu = SoftIommu::new();
    let mapper: Arc<dyn DmaMapper> = iommu.clone();
    let dma = DmaSpace::new(mapper);
    let size = 1u16 << (3 + input.size_log2 % 4); // 8..=64 descriptors
    let buffer_size = if input.small_buffers { 256 } else { 2048 };
    let mut ring = RxRingHarness::new(&dma, size, buffer_size, MacAddress(MAC)).unwrap();
    ring.check_accounting();
    let mut lent: Vec<RxBuffer> = Vec::new();
    let ring_iova = ring.ring_iova();
    let desc_iova = |i: u16| ring_iova + i as u64 * 16;
    let buffers = ring.buffers_iova();
    for op in input.ops.into_iter().take(256) {
        match op {
            Op::WriteBack {
                ahead,
                absolute,
                len,
                csum,
                status,
                errors,
                special,
            } => {
                let (next, _) = ring.next_and_tail();
                let i = if absolute {
                    ahead as u16 % size
                } else {
                    (next + ahead as u16) % size
                };
                let word1 = len as u64
                    | (csum as u64) << 16
                    | (status as u64) << 32
                    | (errors as u64) << 40
                    | (special as u64) << 48;
                iommu
                    .dma_write(desc_iova(i) + 8, &word1.to_le_bytes())
                    .unwrap();
            }
            Op::GoodFrame {
                ahead,
                len,
                broadcast,
            } => {
                let (next, _) = ring.next_and_tail();
                let i = (next + ahead as u16) % size;
                // Where the driver pointed this descriptor (the device reads the address).
                let mut addr = [0u8; 8];
                iommu.dma_read(desc_iova(i), &mut addr).unwrap();
                let addr = u64::from_le_bytes(addr);
                let dst = if broadcast { [0xff; 6] } else { MAC };
                // A lie in the address word (a previous WriteAddress) faults here, as the
                // IOMMU would stop the device.
                let _ = iommu.dma_write(addr, &dst);
                let word1 = len as u64 | RX_STA_DD | RX_STA_EOP;
                iommu
                    .dma_write(desc_iova(i) + 8, &word1.to_le_bytes())
                    .unwrap();
            }
            Op::WriteAddress { index, addr } => {
                let i = index as u16 % size;
                iommu.dma_write(desc_iova(i), &addr.to_le_bytes()).unwrap();
            }
            Op::WriteBuffer {
                slot,
                offset,
                bytes,
            } => {
                let slot = slot as usize % size as usize;
                let offset = offset as usize % buffer_size;
                let n = bytes.len().min(buffer_size - offset);
                let at = buffers + (slot * buffer_size + offset) as u64;
                iommu.dma_write(at, &bytes[..n]).unwrap();
            }
            Op::Next { out_len } => {
                if let Some(buffer) = ring.rx_next() {
                    let len = buffer.len as usize;
                    assert!(
                        (14..=buffer_size).contains(&len),
                        "lent a frame of {len} bytes"
                    );
                    assert!(
                        lent.iter().all(|b| b.slot != buffer.slot),
                        "buffer {} lent twice",
                        buffer.slot
                    );
                    let mut out = vec![0u8; out_len as usize % 4096];
                    let got = ring.rx_read(&buffer, &mut out).len();
                    assert_eq!(got, len.min(out.len()));
                    lent.push(buffer);
                }
            }
            Op::Recycle { which } => {
                if !lent.is_empty() {
                    let b = lent.swap_remove(which as usize % lent.len());
                    ring.rx_recycle(b);
                }
            }
            Op::Flush => ring.post_free(),
        }
        ring.check_accounting();
    }
    // The flags the driver checks are the ones the SDM defines.
    debug_assert_eq!(RX_ERR_FRAME >> 40, 0b1001_0111);
});
