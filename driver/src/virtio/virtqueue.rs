//! Split virtqueues (VIRTIO 1.2 section 2.7) in DMA memory.
//!
//! A split virtqueue has three parts (section 2.7, table "Virtqueue Part Alignment Size"):
//!
//! | part             | alignment | size                | device access |
//! |------------------|-----------|---------------------|---------------|
//! | Descriptor Table | 16        | 16 * queue_size     | reads         |
//! | Available Ring   | 2         | 6 + 2 * queue_size  | reads         |
//! | Used Ring        | 4         | 6 + 8 * queue_size  | writes        |
//!
//! The descriptor table and the available ring (the "driver area") live in one region mapped
//! [`DmaAccess::DeviceReads`]; the used ring (the "device area") in a region mapped
//! [`DmaAccess::DeviceReadsWrites`]. The device thus cannot rewrite a descriptor to point a
//! transfer elsewhere: least privilege, enforced by the IOMMU. Both regions are page-aligned,
//! which satisfies every alignment above.
//!
//! This type knows the ring layout and the memory-ordering rules; which descriptors form which
//! chain is the caller's business (the network driver keeps a free list for TX and a fixed
//! one-descriptor-per-buffer layout for RX).

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::dma::{DmaAccess, DmaRegion, DmaSpace};
use crate::error::{DriverError, Result};
use crate::queue::Iova;

/// `struct virtq_desc` (section 2.7.5): `le64 addr; le32 len; le16 flags; le16 next;`.
pub const DESC_SIZE: usize = 16;
const DESC_ADDR: usize = 0;
const DESC_LEN: usize = 8;
const DESC_FLAGS: usize = 12;
const DESC_NEXT: usize = 14;
/// `VIRTQ_DESC_F_NEXT`: the buffer continues in the `next` field (section 2.7.5).
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: the buffer is device write-only (otherwise device read-only).
pub const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors (section 2.7.5.3).
pub const DESC_F_INDIRECT: u16 = 4;

/// Write a `struct virtq_desc` at byte `offset` of `region`: a descriptor table of a queue
/// or an indirect table (section 2.7.5.3: same layout).
pub fn write_desc(region: &DmaRegion, offset: usize, addr: Iova, len: u32, flags: u16, next: u16) {
    region.write_volatile(offset + DESC_ADDR, addr.to_le());
    region.write_volatile(offset + DESC_LEN, len.to_le());
    region.write_volatile(offset + DESC_FLAGS, flags.to_le());
    region.write_volatile(offset + DESC_NEXT, next.to_le());
}

/// `struct virtq_avail` (section 2.7.6): `le16 flags; le16 idx; le16 ring[queue_size];
/// le16 used_event;` (`used_event` only with VIRTIO_F_EVENT_IDX, which we do not negotiate).
const AVAIL_FLAGS: usize = 0;
const AVAIL_IDX: usize = 2;
const AVAIL_RING: usize = 4;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: set while we poll, so the device need not interrupt
/// (section 2.7.7); cleared by [`SplitQueue::set_interrupts`] before the loop sleeps.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// `struct virtq_used` (section 2.7.8): `le16 flags; le16 idx; struct virtq_used_elem
/// ring[queue_size]; le16 avail_event;` with `struct virtq_used_elem { le32 id; le32 len; }`.
const USED_FLAGS: usize = 0;
const USED_IDX: usize = 2;
const USED_RING: usize = 4;
const USED_ELEM_SIZE: usize = 8;
/// `VIRTQ_USED_F_NO_NOTIFY`: the device does not need a notification now (section 2.7.10).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Largest queue size of a split virtqueue (section 2.7: "Queue Size ... maximum 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One split virtqueue's memory and ring indices.
pub struct SplitQueue {
    index: u16,
    size: u16,
    /// Descriptor table at offset 0, available ring at `avail_offset`. Device reads only.
    driver_area: DmaRegion,
    avail_offset: usize,
    /// Used ring. Device writes.
    device_area: DmaRegion,
    /// Free-running index of the next available-ring slot to fill.
    next_avail: u16,
    /// The `avail.idx` value last published to the device.
    published: u16,
    /// Free-running index of the next used-ring element to consume (section 2.7.8: the
    /// driver keeps its own copy of where it is in the used ring).
    last_used: u16,
}

impl SplitQueue {
    /// Allocate a queue of `size` entries (a power of two: section 2.7 "Queue Size value is
    /// always a power of 2" for split queues) for virtqueue `index`.
    pub fn new(dma: &Arc<DmaSpace>, index: u16, size: u16) -> Result<Self> {
        Self::with_used_ring_access(dma, index, size, DmaAccess::DeviceReadsWrites)
    }

    /// As [`SplitQueue::new`], with the used ring mapped with `used_access`: only fault
    /// injection maps it [`DmaAccess::DeviceReads`], so that the device's completions are
    /// stopped by the IOMMU.
    pub fn with_used_ring_access(
        dma: &Arc<DmaSpace>,
        index: u16,
        size: u16,
        used_access: DmaAccess,
    ) -> Result<Self> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(DriverError::InvalidArgument(format!(
                "virtqueue size {size} must be a power of two no larger than {MAX_QUEUE_SIZE}"
            )));
        }
        let n = size as usize;
        let avail_offset = DESC_SIZE * n;
        let driver_area = dma.allocate(
            avail_offset + AVAIL_RING + 2 * n + 2,
            DmaAccess::DeviceReads,
        )?;
        let device_area = dma.allocate(USED_RING + USED_ELEM_SIZE * n + 2, used_access)?;
        let q = SplitQueue {
            index,
            size,
            driver_area,
            avail_offset,
            device_area,
            next_avail: 0,
            published: 0,
            last_used: 0,
        };
        q.clear();
        Ok(q)
    }

    /// Zero the rings and the indices, as a freshly reset device expects (section 2.7:
    /// after reset the device starts at avail/used index 0). Only while the queue is not
    /// enabled (before set-up or after a device reset).
    pub fn reset(&mut self) {
        self.clear();
        self.next_avail = 0;
        self.published = 0;
        self.last_used = 0;
    }

    fn clear(&self) {
        self.driver_area.zero();
        self.device_area.zero();
        // We poll and never enable interrupts; say so (section 2.7.7, 2.7.7.1: the driver
        // MUST set flags to 0 or 1).
        self.driver_area.write_volatile(
            self.avail_offset + AVAIL_FLAGS,
            AVAIL_F_NO_INTERRUPT.to_le(),
        );
    }

    /// Used buffer notifications on or off (section 2.7.7: without VIRTIO_F_EVENT_IDX the
    /// driver sets `VIRTQ_AVAIL_F_NO_INTERRUPT` in the available ring's flags to ask the
    /// device not to interrupt; the device may still do so, which costs a spurious wake-up).
    /// Enabling is followed by a full fence, so a later look at the used ring sees every
    /// buffer the device used without seeing the flag clear.
    pub fn set_interrupts(&self, enabled: bool) {
        let flags = if enabled { 0 } else { AVAIL_F_NO_INTERRUPT };
        self.driver_area
            .write_volatile(self.avail_offset + AVAIL_FLAGS, flags.to_le());
        if enabled {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub fn index(&self) -> u16 {
        self.index
    }
    pub fn size(&self) -> u16 {
        self.size
    }
    /// IOVA of the descriptor table (`queue_desc`).
    pub fn desc_iova(&self) -> Iova {
        self.driver_area.iova()
    }
    /// IOVA of the available ring (`queue_driver`).
    pub fn avail_iova(&self) -> Iova {
        self.driver_area.iova() + self.avail_offset as u64
    }
    /// IOVA of the used ring (`queue_device`).
    pub fn used_iova(&self) -> Iova {
        self.device_area.iova()
    }

    /// Write descriptor `i` (section 2.7.5). The device does not look at it until its chain's
    /// head is published in the available ring.
    pub fn set_desc(&self, i: u16, addr: Iova, len: u32, flags: u16, next: u16) {
        debug_assert!(i < self.size && next < self.size);
        write_desc(
            &self.driver_area,
            i as usize * DESC_SIZE,
            addr,
            len,
            flags,
            next,
        );
    }

    /// Place the chain starting at descriptor `head` in the next available-ring slot
    /// (section 2.7.13.2). Not visible to the device until [`SplitQueue::publish`].
    pub fn push_avail(&mut self, head: u16) {
        let slot = (self.next_avail & (self.size - 1)) as usize;
        self.driver_area
            .write_volatile(self.avail_offset + AVAIL_RING + 2 * slot, head.to_le());
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Chains pushed but not yet published.
    pub fn unpublished(&self) -> u16 {
        self.next_avail.wrapping_sub(self.published)
    }

    /// Make every pushed chain visible to the device by writing `avail.idx` (section
    /// 2.7.13.3). Returns false if there was nothing new.
    pub fn publish(&mut self) -> bool {
        if self.next_avail == self.published {
            return false;
        }
        // Section 2.7.13.3.1: "The driver MUST perform a suitable memory barrier before the
        // idx update, to ensure the device sees the most up-to-date copy" of the descriptors
        // and ring entries. A release fence orders every earlier store (the descriptor and
        // ring writes above) before the idx store below; on x86 stores are not reordered with
        // each other, so this is a compiler barrier, on weaker CPUs a store barrier.
        fence(Ordering::Release);
        self.driver_area
            .write_volatile(self.avail_offset + AVAIL_IDX, self.next_avail.to_le());
        self.published = self.next_avail;
        true
    }

    /// Whether the device wants a notification for what was just published (section
    /// 2.7.13.4: without VIRTIO_F_EVENT_IDX, notify unless the used ring's flags have
    /// VIRTQ_USED_F_NO_NOTIFY).
    pub fn device_wants_notification(&self) -> bool {
        // Section 2.7.13.4.1: "The driver MUST perform a suitable memory barrier before
        // reading flags ... to avoid missing a notification." This orders our idx store
        // before the flags load (store->load), which only a full fence does (MFENCE on
        // x86): otherwise we could read a stale NO_NOTIFY that the device has cleared after
        // deciding the ring was empty, and both sides would wait forever.
        fence(Ordering::SeqCst);
        let flags = u16::from_le(self.device_area.read_volatile::<u16>(USED_FLAGS));
        flags & USED_F_NO_NOTIFY == 0
    }

    /// The next used-ring element `(id, len)` (section 2.7.8), if the device has added one
    /// since the last call.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        let used_idx = u16::from_le(self.device_area.read_volatile::<u16>(USED_IDX));
        if used_idx == self.last_used {
            return None;
        }
        // The device writes the element, then (after its own barrier) the idx (section
        // 2.7.8.2). The acquire fence keeps our reads of the element from being performed
        // before the idx read above, so we never see an element older than the idx says.
        fence(Ordering::Acquire);
        let slot = (self.last_used & (self.size - 1)) as usize;
        let at = USED_RING + USED_ELEM_SIZE * slot;
        let id = u32::from_le(self.device_area.read_volatile::<u32>(at));
        let len = u32::from_le(self.device_area.read_volatile::<u32>(at + 4));
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// How many used elements the device has added that we have not consumed. More than the
    /// queue size means the device is broken.
    pub fn used_pending(&self) -> u16 {
        u16::from_le(self.device_area.read_volatile::<u16>(USED_IDX)).wrapping_sub(self.last_used)
    }
}
