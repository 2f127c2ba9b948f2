//! The split virtqueue against a device side that reads and writes only through the software
//! IOMMU, so the access rights of each part are enforced (VIRTIO 1.2 section 2.7).
//!
//! (An integration test rather than a unit test: the software IOMMU lives in the `softnic`
//! crate, which implements the `driver` crate's `DmaMapper` as other crates see it.)

use std::sync::Arc;

use driver::dma::{DmaAccess, DmaSpace};
use driver::virtio::virtqueue::{
    write_desc, SplitQueue, AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, USED_F_NO_NOTIFY,
};
use driver::Iova;
use softnic::{DmaFaultKind, SoftIommu};

/// A chain as the device sees it: head, then (addr, len, flags) per buffer.
type Chain = (u16, Vec<(u64, u32, u16)>);

/// The device side of a split virtqueue, reading and writing only through the software
/// IOMMU (so access rights are enforced), written from section 2.7 independently of the
/// driver side.
struct Device {
    iommu: Arc<SoftIommu>,
    size: u16,
    desc: Iova,
    avail: Iova,
    used: Iova,
    last_avail: u16,
    used_idx: u16,
}

impl Device {
    fn read<const N: usize>(&self, iova: Iova) -> [u8; N] {
        let mut b = [0u8; N];
        self.iommu.dma_read(iova, &mut b).unwrap();
        b
    }
    fn u16_at(&self, iova: Iova) -> u16 {
        u16::from_le_bytes(self.read(iova))
    }
    /// `(addr, len, flags, next)` of descriptor `i` of the table at `table`.
    fn desc(&self, table: Iova, i: u16) -> (u64, u32, u16, u16) {
        let d: [u8; 16] = self.read(table + i as u64 * 16);
        (
            u64::from_le_bytes(d[0..8].try_into().unwrap()),
            u32::from_le_bytes(d[8..12].try_into().unwrap()),
            u16::from_le_bytes(d[12..14].try_into().unwrap()),
            u16::from_le_bytes(d[14..16].try_into().unwrap()),
        )
    }
    /// Every chain made available since the last call: (head, [(addr, len, flags)]).
    fn take(&mut self) -> Vec<Chain> {
        let idx = self.u16_at(self.avail + 2);
        let mut out = Vec::new();
        while self.last_avail != idx {
            let slot = (self.last_avail % self.size) as u64;
            let head = self.u16_at(self.avail + 4 + 2 * slot);
            let (mut table, mut i) = (self.desc, head);
            let mut chain = Vec::new();
            loop {
                let (addr, len, flags, next) = self.desc(table, i);
                if flags & DESC_F_INDIRECT != 0 {
                    assert_eq!(
                        flags & DESC_F_NEXT,
                        0,
                        "INDIRECT with NEXT (section 2.7.5.3.1)"
                    );
                    (table, i) = (addr, 0);
                    continue;
                }
                chain.push((addr, len, flags));
                if flags & DESC_F_NEXT == 0 {
                    break;
                }
                i = next;
            }
            out.push((head, chain));
            self.last_avail = self.last_avail.wrapping_add(1);
        }
        out
    }
    fn complete(&mut self, id: u16, len: u32) {
        let slot = (self.used_idx % self.size) as u64;
        let mut e = (id as u32).to_le_bytes().to_vec();
        e.extend_from_slice(&len.to_le_bytes());
        self.iommu.dma_write(self.used + 4 + 8 * slot, &e).unwrap();
        self.used_idx = self.used_idx.wrapping_add(1);
        self.iommu
            .dma_write(self.used + 2, &self.used_idx.to_le_bytes())
            .unwrap();
    }
}

fn setup(size: u16) -> (SplitQueue, Device) {
    let iommu = SoftIommu::new();
    let dma = DmaSpace::new(iommu.clone());
    let q = SplitQueue::new(&dma, 1, size).unwrap();
    let dev = Device {
        iommu,
        size,
        desc: q.desc_iova(),
        avail: q.avail_iova(),
        used: q.used_iova(),
        last_avail: 0,
        used_idx: 0,
    };
    (q, dev)
}

#[test]
fn layout_alignment_and_device_access_rights() {
    let (q, dev) = setup(256);
    assert_eq!(q.desc_iova() % 16, 0);
    assert_eq!(q.avail_iova() % 2, 0);
    assert_eq!(q.used_iova() % 4, 0);
    assert_eq!(q.avail_iova() - q.desc_iova(), 16 * 256);
    // We poll: VIRTQ_AVAIL_F_NO_INTERRUPT.
    assert_eq!(dev.u16_at(dev.avail), AVAIL_F_NO_INTERRUPT);
    // The device may read but not write the descriptor table and the available ring...
    for iova in [q.desc_iova(), q.avail_iova() + 2] {
        let fault = dev.iommu.dma_write(iova, &[0xff; 2]).unwrap_err();
        assert_eq!(fault.kind, DmaFaultKind::WriteToReadOnly);
    }
    // ...and may write the used ring, up to avail_event.
    dev.iommu
        .dma_write(q.used_iova() + 4 + 8 * 256, &[0; 2])
        .unwrap();
}

#[test]
fn chains_wrap_around_and_completions_come_back_in_used_order() {
    let size = 8u16;
    let (mut q, mut dev) = setup(size);
    let mut next_head = 0u16;
    for round in 0..5u64 {
        // Two-descriptor chains (head, head+1) filling the table, published in one burst.
        let mut heads = Vec::new();
        for k in 0..size / 2 {
            let head = (next_head + 2 * k) % size;
            let addr = 0x10_0000 * (round + 1) + k as u64 * 0x1000;
            q.set_desc(head, addr, 12, DESC_F_NEXT, head + 1);
            q.set_desc(head + 1, addr + 0x100, 100 + k as u32, 0, 0);
            q.push_avail(head);
            heads.push(head);
        }
        assert!(dev.take().is_empty(), "nothing is visible before publish");
        assert_eq!(q.unpublished(), size / 2);
        assert!(q.publish());
        assert!(!q.publish(), "nothing new the second time");
        let chains = dev.take();
        assert_eq!(chains.iter().map(|c| c.0).collect::<Vec<_>>(), heads);
        for (k, (_, chain)) in chains.iter().enumerate() {
            let addr = 0x10_0000 * (round + 1) + k as u64 * 0x1000;
            assert_eq!(
                chain,
                &vec![(addr, 12, DESC_F_NEXT), (addr + 0x100, 100 + k as u32, 0)]
            );
        }
        // The device completes them in reverse order; the driver sees used-ring order.
        for &h in heads.iter().rev() {
            dev.complete(h, 0);
        }
        assert_eq!(q.used_pending(), size / 2);
        let popped: Vec<u32> = std::iter::from_fn(|| q.pop_used().map(|(id, _)| id)).collect();
        assert_eq!(
            popped,
            heads.iter().rev().map(|&h| h as u32).collect::<Vec<_>>()
        );
        assert_eq!(q.pop_used(), None);
        next_head = (next_head + 2) % size;
    }
}

#[test]
fn indirect_tables_and_notification_suppression() {
    let iommu = SoftIommu::new();
    let dma = DmaSpace::new(iommu.clone());
    let mut q = SplitQueue::new(&dma, 1, 4).unwrap();
    let mut dev = Device {
        iommu,
        size: 4,
        desc: q.desc_iova(),
        avail: q.avail_iova(),
        used: q.used_iova(),
        last_avail: 0,
        used_idx: 0,
    };
    let table = dma.allocate(4096, DmaAccess::DeviceReads).unwrap();
    write_desc(&table, 0, 0xa000, 12, DESC_F_NEXT, 1);
    write_desc(&table, 16, 0xb000, 1500, 0, 0);
    q.set_desc(3, table.iova(), 32, DESC_F_INDIRECT, 0);
    q.push_avail(3);
    q.publish();
    assert_eq!(
        dev.take(),
        vec![(3, vec![(0xa000, 12, DESC_F_NEXT), (0xb000, 1500, 0)])]
    );
    assert!(q.device_wants_notification());
    dev.iommu
        .dma_write(dev.used, &USED_F_NO_NOTIFY.to_le_bytes())
        .unwrap();
    assert!(!q.device_wants_notification());
    q.reset();
    assert_eq!(q.unpublished(), 0);
    assert_eq!(dev.u16_at(dev.used), 0, "reset clears the rings");
}
