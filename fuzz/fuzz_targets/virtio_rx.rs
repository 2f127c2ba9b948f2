//! The virtio-net receive queue's used-ring reading (`driver::virtio::net`, the code behind
//! `rx_next`, `rx_read`, `rx_recycle`, `rx_flush`), split and packed layouts, against a lying
//! device: the fuzz input plays the device, writing used-ring elements and the used index
//! (split) or used descriptors with any flags, id and length (packed), and arbitrary bytes
//! into any buffer (its `virtio_net_hdr` included), through the software IOMMU, interleaved
//! with the driver's calls. Checks: no panic; a buffer id that is not outstanding resets the
//! queue instead of being used; only frames of 14..=buffer size - header bytes whose buffer
//! the device wrote are lent out; a buffer is never lent twice; every buffer is always in
//! exactly one place (posted, lent, recycled).
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use driver::dma::{DmaMapper, DmaSpace};
use driver::virtio::net::{RxQueueHarness, NET_HDR_LEN};
use driver::RxBuffer;
use libfuzzer_sys::fuzz_target;
use softnic::SoftIommu;

#[derive(Arbitrary, Debug)]
enum Op {
    /// Split: used element at ring slot `slot`. Packed: descriptor `slot`'s id and len.
    Used {
        slot: u8,
        id: u16,
        len: u32,
    },
    /// Split: the used index. Packed: descriptor `slot`'s flags.
    Index {
        slot: u8,
        value: u16,
    },
    /// A plausible completion: the next used entry names an outstanding buffer `id`, its
    /// header written (not poisoned), length `len`; split: the index advances by one.
    Complete {
        id: u16,
        len: u16,
    },
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
    packed: bool,
    size_log2: u8,
    small_buffers: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let iommu = SoftIommu::new();
    let mapper: Arc<dyn DmaMapper> = iommu.clone();
    let dma = DmaSpace::new(mapper);
    let size = 1u16 << (input.size_log2 % 7); // 1..=64
    let buffer_size = if input.small_buffers { 128 } else { 2048 };
    let mut q = RxQueueHarness::new(&dma, size, buffer_size, input.packed).unwrap();
    q.check_accounting();
    let (desc, _driver, device) = q.areas();
    let buffers = q.buffers_iova();
    let mut lent: Vec<RxBuffer> = Vec::new();
    // The device's own view: next used position (split: used idx; packed: ring position and
    // wrap counter).
    let mut used_idx: u16 = 0;
    let mut packed_pos: u16 = 0;
    let mut packed_wrap = true;
    let mut resets = 0;
    for op in input.ops.into_iter().take(256) {
        if q.resets != resets {
            // The driver reset the queue: the device starts over too.
            resets = q.resets;
            used_idx = 0;
            packed_pos = 0;
            packed_wrap = true;
        }
        match op {
            Op::Used { slot, id, len } => {
                let slot = slot as u64 % size as u64;
                if input.packed {
                    let at = desc + slot * 16;
                    iommu.dma_write(at + 8, &len.to_le_bytes()).unwrap();
                    iommu.dma_write(at + 12, &id.to_le_bytes()).unwrap();
                } else {
                    let at = device + 4 + slot * 8;
                    iommu.dma_write(at, &(id as u32).to_le_bytes()).unwrap();
                    iommu.dma_write(at + 4, &len.to_le_bytes()).unwrap();
                }
            }
            Op::Index { slot, value } => {
                if input.packed {
                    let at = desc + (slot as u64 % size as u64) * 16 + 14;
                    iommu.dma_write(at, &value.to_le_bytes()).unwrap();
                } else {
                    used_idx = value;
                    iommu.dma_write(device + 2, &value.to_le_bytes()).unwrap();
                }
            }
            Op::Complete { id, len } => {
                let id = id % size;
                let header_at = buffers + (id as usize * buffer_size) as u64;
                iommu.dma_write(header_at, &[0u8; NET_HDR_LEN]).unwrap();
                if input.packed {
                    let at = desc + packed_pos as u64 * 16;
                    iommu
                        .dma_write(at + 8, &(len as u32).to_le_bytes())
                        .unwrap();
                    iommu.dma_write(at + 12, &id.to_le_bytes()).unwrap();
                    let flags: u16 = if packed_wrap { 1 << 7 | 1 << 15 } else { 0 };
                    iommu
                        .dma_write(at + 14, &(flags | 2).to_le_bytes())
                        .unwrap();
                    packed_pos += 1;
                    if packed_pos == size {
                        packed_pos = 0;
                        packed_wrap = !packed_wrap;
                    }
                } else {
                    let at = device + 4 + (used_idx % size) as u64 * 8;
                    iommu.dma_write(at, &(id as u32).to_le_bytes()).unwrap();
                    iommu
                        .dma_write(at + 4, &(len as u32).to_le_bytes())
                        .unwrap();
                    used_idx = used_idx.wrapping_add(1);
                    iommu
                        .dma_write(device + 2, &used_idx.to_le_bytes())
                        .unwrap();
                }
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
                if let Some(buffer) = q.rx_next() {
                    let len = buffer.len as usize;
                    assert!(
                        (14..=buffer_size - NET_HDR_LEN).contains(&len),
                        "lent a frame of {len} bytes"
                    );
                    assert!((buffer.slot as usize) < size as usize);
                    assert!(
                        lent.iter().all(|b| b.slot != buffer.slot),
                        "buffer {} lent twice",
                        buffer.slot
                    );
                    let mut out = vec![0u8; out_len as usize % 4096];
                    let got = q.rx_read(&buffer, &mut out).len();
                    assert_eq!(got, len.min(out.len()));
                    lent.push(buffer);
                }
            }
            Op::Recycle { which } => {
                if !lent.is_empty() {
                    let b = lent.swap_remove(which as usize % lent.len());
                    q.rx_recycle(b);
                }
            }
            Op::Flush => q.rx_flush(),
        }
        q.check_accounting();
    }
});
