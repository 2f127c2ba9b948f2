//! The packed virtqueue against a device side that reads and writes only through the
//! software IOMMU, so the access rights of each part are enforced (VIRTIO 1.2 section 2.8).
//!
//! (An integration test rather than a unit test: the software IOMMU lives in the `softnic`
//! crate, which implements the `driver` crate's `DmaMapper` as other crates see it.)

use std::sync::Arc;

use driver::dma::DmaSpace;
use driver::virtio::packed::PackedQueue;
use driver::Iova;
use softnic::{DmaFaultKind, SoftIommu};

/// `VIRTQ_DESC_F_AVAIL` and `VIRTQ_DESC_F_USED` (section 2.8.1), the device's own copy.
const DESC_F_AVAIL: u16 = 1 << 7;
const DESC_F_USED: u16 = 1 << 15;
/// `RING_EVENT_FLAGS_DISABLE` (section 2.8.14).
const RING_EVENT_FLAGS_DISABLE: u16 = 1;

/// The device side, written from section 2.8 and going through the software IOMMU.
struct Device {
    iommu: Arc<SoftIommu>,
    size: u16,
    ring: Iova,
    pos: u16,
    wrap: bool,
    used_pos: u16,
    used_wrap: bool,
}

impl Device {
    fn desc(&self, pos: u16) -> (u64, u32, u16, u16) {
        let mut d = [0u8; 16];
        self.iommu
            .dma_read(self.ring + pos as u64 * 16, &mut d)
            .unwrap();
        (
            u64::from_le_bytes(d[0..8].try_into().unwrap()),
            u32::from_le_bytes(d[8..12].try_into().unwrap()),
            u16::from_le_bytes(d[12..14].try_into().unwrap()),
            u16::from_le_bytes(d[14..16].try_into().unwrap()),
        )
    }
    /// Available descriptors in ring order: (addr, len, id, flags without AVAIL/USED).
    fn take(&mut self) -> Vec<(u64, u32, u16, u16)> {
        let mut out = Vec::new();
        loop {
            let (addr, len, id, flags) = self.desc(self.pos);
            let avail = flags & DESC_F_AVAIL != 0;
            let used = flags & DESC_F_USED != 0;
            if avail != self.wrap || used == self.wrap {
                return out;
            }
            out.push((addr, len, id, flags & !(DESC_F_AVAIL | DESC_F_USED)));
            self.pos += 1;
            if self.pos == self.size {
                self.pos = 0;
                self.wrap = !self.wrap;
            }
        }
    }
    fn complete(&mut self, id: u16, len: u32) {
        let at = self.ring + self.used_pos as u64 * 16;
        self.iommu.dma_write(at + 8, &len.to_le_bytes()).unwrap();
        self.iommu.dma_write(at + 12, &id.to_le_bytes()).unwrap();
        let f = if self.used_wrap {
            DESC_F_AVAIL | DESC_F_USED
        } else {
            0
        };
        self.iommu.dma_write(at + 14, &f.to_le_bytes()).unwrap();
        self.used_pos += 1;
        if self.used_pos == self.size {
            self.used_pos = 0;
            self.used_wrap = !self.used_wrap;
        }
    }
}

#[test]
fn bursts_wrap_and_used_buffers_come_back_by_id() {
    let iommu = SoftIommu::new();
    let dma = DmaSpace::new(iommu.clone());
    let mut q = PackedQueue::new(&dma, 8).unwrap();
    let mut dev = Device {
        iommu: iommu.clone(),
        size: 8,
        ring: q.desc_iova(),
        pos: 0,
        wrap: true,
        used_pos: 0,
        used_wrap: true,
    };
    // The device may not write the driver's event suppression structure.
    let fault = iommu.dma_write(q.driver_iova(), &[0; 4]).unwrap_err();
    assert_eq!(fault.kind, DmaFaultKind::WriteToReadOnly);
    for round in 0..7u16 {
        let burst = 3 + round % 4; // 3..=6 buffers, so the ring wraps at odd places
        let ids: Vec<u16> = (0..burst).map(|k| (round * 10 + k) % 100).collect();
        for (k, &id) in ids.iter().enumerate() {
            q.add(id, 0x1000 * id as u64, 100 + k as u32, 2).unwrap();
        }
        assert!(dev.take().is_empty(), "nothing visible before publish");
        assert!(q.publish());
        let seen = dev.take();
        assert_eq!(seen.iter().map(|d| d.2).collect::<Vec<_>>(), ids);
        assert!(seen.iter().all(|d| d.3 == 2 && d.0 == 0x1000 * d.2 as u64));
        assert_eq!(q.pop_used(), None);
        for &id in ids.iter().rev() {
            dev.complete(id, id as u32 + 1);
        }
        let used: Vec<(u32, u32)> = std::iter::from_fn(|| q.pop_used()).collect();
        let want: Vec<(u32, u32)> = ids
            .iter()
            .rev()
            .map(|&id| (id as u32, id as u32 + 1))
            .collect();
        assert_eq!(used, want);
        assert_eq!(q.free(), 8);
    }
    assert!(q.device_wants_notification());
    iommu
        .dma_write(q.device_iova() + 2, &RING_EVENT_FLAGS_DISABLE.to_le_bytes())
        .unwrap();
    assert!(!q.device_wants_notification());
}
