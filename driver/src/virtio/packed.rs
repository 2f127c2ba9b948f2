//! Packed virtqueues (VIRTIO 1.2 section 2.8) in DMA memory, for buffers of one descriptor
//! each (a TX frame is one indirect descriptor, an RX buffer one device-writable descriptor).
//!
//! | part                       | alignment | size               | device access  |
//! |----------------------------|-----------|--------------------|----------------|
//! | Descriptor Ring            | 16        | 16 * queue_size    | reads, writes  |
//! | Driver Event Suppression   | 4         | 4                  | reads          |
//! | Device Event Suppression   | 4         | 4                  | writes         |
//!
//! The device writes used descriptors back into the descriptor ring, so unlike a split
//! queue's descriptor table the ring must be device-writable. The driver event suppression
//! structure lives in a region the device may only read, the device's in one it may write.
//!
//! Buffers become available in ring order: the driver writes a descriptor's `addr`, `len`
//! and `id`, then its `flags` with VIRTQ_DESC_F_AVAIL equal to the driver's wrap counter and
//! VIRTQ_DESC_F_USED its inverse (section 2.8.1, 2.8.21). To publish a burst at once, the
//! flags of the burst's first descriptor are written last (section 2.8.21.1 recommends the
//! same for chains): the device reads in ring order, so it sees nothing of the burst before
//! [`PackedQueue::publish`].

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::virtqueue::DESC_SIZE;
use crate::dma::{DmaAccess, DmaRegion, DmaSpace};
use crate::error::{DriverError, Result};
use crate::queue::Iova;

/// `struct pvirtq_desc` (section 2.8.13): `le64 addr; le32 len; le16 id; le16 flags;`.
const DESC_ADDR: usize = 0;
const DESC_LEN: usize = 8;
const DESC_ID: usize = 12;
const DESC_FLAGS: usize = 14;
/// `VIRTQ_DESC_F_AVAIL` / `VIRTQ_DESC_F_USED` (section 2.8.1).
const DESC_F_AVAIL: u16 = 1 << 7;
const DESC_F_USED: u16 = 1 << 15;

/// `struct pvirtq_event_suppress` (section 2.8.14): `le16 desc_event_off_wrap;
/// le16 desc_event_flags;`.
const EVENT_FLAGS: usize = 2;
/// `RING_EVENT_FLAGS_DISABLE` (section 2.8.14; ENABLE is 0, DESC 2).
const RING_EVENT_FLAGS_DISABLE: u16 = 1;

/// Write entry `index` of a packed-ring indirect table (section 2.8.19: `struct pvirtq_desc`
/// entries, consecutive, no NEXT flag; only VIRTQ_DESC_F_WRITE is valid and the buffer id is
/// ignored). Not the split layout: there flags and next sit where `id` and flags are here.
pub fn write_indirect_desc(table: &DmaRegion, offset: usize, addr: Iova, len: u32, flags: u16) {
    table.write_volatile(offset + DESC_ADDR, addr.to_le());
    table.write_volatile(offset + DESC_LEN, len.to_le());
    table.write_volatile(offset + DESC_ID, 0u16);
    table.write_volatile(offset + DESC_FLAGS, flags.to_le());
}

/// One packed virtqueue.
pub struct PackedQueue {
    size: u16,
    /// Descriptor ring; the device reads available and writes used descriptors here.
    ring: DmaRegion,
    /// Driver event suppression (device reads), then nothing else.
    driver_event: DmaRegion,
    /// Device event suppression (device writes).
    device_event: DmaRegion,
    /// Ring position and wrap counter of the next descriptor we make available.
    next_avail: u16,
    avail_wrap: bool,
    /// Position and flags of the first descriptor not yet published (its flags are withheld).
    pending: Option<(u16, u16)>,
    unpublished: u16,
    /// Ring position and wrap counter of the next used descriptor we expect.
    next_used: u16,
    used_wrap: bool,
    /// Buffers the device holds (made available, not yet used).
    outstanding: u16,
}

impl PackedQueue {
    pub fn new(dma: &Arc<DmaSpace>, size: u16) -> Result<Self> {
        Self::with_ring_access(dma, size, DmaAccess::DeviceReadsWrites)
    }

    /// As [`PackedQueue::new`], with the descriptor ring mapped with `ring_access`: only
    /// fault injection maps it [`DmaAccess::DeviceReads`], so that the device's used
    /// descriptors are stopped by the IOMMU.
    pub fn with_ring_access(
        dma: &Arc<DmaSpace>,
        size: u16,
        ring_access: DmaAccess,
    ) -> Result<Self> {
        if size == 0 || size > 32768 {
            return Err(DriverError::InvalidArgument(format!(
                "packed virtqueue size {size} must be 1..=32768"
            )));
        }
        let mut q = PackedQueue {
            size,
            ring: dma.allocate(DESC_SIZE * size as usize, ring_access)?,
            driver_event: dma.allocate(4, DmaAccess::DeviceReads)?,
            device_event: dma.allocate(4, DmaAccess::DeviceReadsWrites)?,
            next_avail: 0,
            avail_wrap: true,
            pending: None,
            unpublished: 0,
            next_used: 0,
            used_wrap: true,
            outstanding: 0,
        };
        q.reset();
        Ok(q)
    }

    /// Zero the ring and restart at position 0 with both wrap counters 1 (section 2.8.1:
    /// the counters start at 1 after reset). Only while the queue is disabled.
    pub fn reset(&mut self) {
        self.ring.zero();
        self.device_event.zero();
        self.driver_event.zero();
        // We poll: no used buffer notifications (section 2.8.10).
        self.driver_event
            .write_volatile(EVENT_FLAGS, RING_EVENT_FLAGS_DISABLE.to_le());
        self.next_avail = 0;
        self.avail_wrap = true;
        self.pending = None;
        self.unpublished = 0;
        self.next_used = 0;
        self.used_wrap = true;
        self.outstanding = 0;
    }

    /// Used buffer notifications on or off: the driver event suppression structure's flags
    /// RING_EVENT_FLAGS_ENABLE (0) or DISABLE (1) (section 2.8.10, 2.8.14). Enabling is
    /// followed by a full fence, as for the split ring.
    pub fn set_interrupts(&self, enabled: bool) {
        let flags = if enabled { 0 } else { RING_EVENT_FLAGS_DISABLE };
        self.driver_event.write_volatile(EVENT_FLAGS, flags.to_le());
        if enabled {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }
    /// `queue_desc`: the descriptor ring.
    pub fn desc_iova(&self) -> Iova {
        self.ring.iova()
    }
    /// `queue_driver`: the driver event suppression structure.
    pub fn driver_iova(&self) -> Iova {
        self.driver_event.iova()
    }
    /// `queue_device`: the device event suppression structure.
    pub fn device_iova(&self) -> Iova {
        self.device_event.iova()
    }

    /// Free ring entries.
    pub fn free(&self) -> u16 {
        self.size - self.outstanding
    }

    /// Make one single-descriptor buffer available at the next ring position (not visible
    /// to the device before [`PackedQueue::publish`] if it starts a burst). `flags` may hold
    /// VIRTQ_DESC_F_WRITE or VIRTQ_DESC_F_INDIRECT, never NEXT.
    pub fn add(&mut self, id: u16, addr: Iova, len: u32, flags: u16) -> Result<()> {
        if self.outstanding == self.size {
            return Err(DriverError::TxRingFull);
        }
        let at = self.next_avail as usize * DESC_SIZE;
        self.ring.write_volatile(at + DESC_ADDR, addr.to_le());
        self.ring.write_volatile(at + DESC_LEN, len.to_le());
        self.ring.write_volatile(at + DESC_ID, id.to_le());
        let flags = flags
            | if self.avail_wrap {
                DESC_F_AVAIL
            } else {
                DESC_F_USED
            };
        if self.pending.is_none() {
            // First of the burst: its flags are written at publish.
            self.pending = Some((self.next_avail, flags));
        } else {
            // Section 2.8.21.1: addr/len/id before flags; the device reads this descriptor
            // only after the burst's first one, whose flags come after a release fence.
            self.ring.write_volatile(at + DESC_FLAGS, flags.to_le());
        }
        self.unpublished += 1;
        self.outstanding += 1;
        self.next_avail += 1;
        if self.next_avail == self.size {
            self.next_avail = 0;
            self.avail_wrap = !self.avail_wrap;
        }
        Ok(())
    }

    pub fn unpublished(&self) -> u16 {
        self.unpublished
    }

    /// Make the burst visible by writing its first descriptor's flags. Returns false if
    /// there was nothing new.
    pub fn publish(&mut self) -> bool {
        let Some((pos, flags)) = self.pending.take() else {
            return false;
        };
        // Section 2.8.21.1: "the driver MUST perform a suitable memory barrier before the
        // flags are written": every other descriptor of the burst (and this one's addr, len,
        // id) must be visible before the device can see this one as available.
        fence(Ordering::Release);
        self.ring
            .write_volatile(pos as usize * DESC_SIZE + DESC_FLAGS, flags.to_le());
        self.unpublished = 0;
        true
    }

    /// Whether the device wants an available buffer notification (section 2.8.10, without
    /// VIRTIO_F_EVENT_IDX: unless its event suppression flags say DISABLE).
    pub fn device_wants_notification(&self) -> bool {
        // Store (flags above) -> load (the device's suppression flags) ordering, as for split
        // queues (section 2.8.21.3.1): a full fence.
        fence(Ordering::SeqCst);
        // ENABLE, or DESC (only meaningful with EVENT_IDX, so treated as ENABLE).
        let flags = u16::from_le(self.device_event.read_volatile::<u16>(EVENT_FLAGS));
        flags & 0x3 != RING_EVENT_FLAGS_DISABLE
    }

    /// The next used buffer `(id, len)`: the descriptor at our used position whose AVAIL and
    /// USED flags both equal our used wrap counter (section 2.8.1, 2.8.8).
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.outstanding == 0 {
            return None;
        }
        let at = self.next_used as usize * DESC_SIZE;
        let flags = u16::from_le(self.ring.read_volatile::<u16>(at + DESC_FLAGS));
        let avail = flags & DESC_F_AVAIL != 0;
        let used = flags & DESC_F_USED != 0;
        if avail != self.used_wrap || used != self.used_wrap {
            return None;
        }
        // The device writes id and len before flags; do not read them before the flags.
        fence(Ordering::Acquire);
        let id = u16::from_le(self.ring.read_volatile::<u16>(at + DESC_ID)) as u32;
        let len = u32::from_le(self.ring.read_volatile::<u32>(at + DESC_LEN));
        self.outstanding -= 1;
        // Every buffer is one descriptor, so the next used one is at the next position.
        self.next_used += 1;
        if self.next_used == self.size {
            self.next_used = 0;
            self.used_wrap = !self.used_wrap;
        }
        Some((id, len))
    }
}
