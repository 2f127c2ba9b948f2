//! The virtio network device (VIRTIO 1.2 section 5.1) over the modern PCI transport, with
//! split virtqueues in IOMMU-mapped memory, implementing [`NetQueue`].
//!
//! # Initialisation (section 3.1.1, 5.1.5)
//! Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (re-read to check the device kept it),
//! virtqueues, receive buffers, DRIVER_OK. Required: VIRTIO_F_VERSION_1 and
//! VIRTIO_F_ACCESS_PLATFORM; without the latter the device would DMA to guest-physical
//! addresses around the IOMMU, so [`VirtioNet::open`] refuses with
//! [`DriverError::NoAccessPlatform`] (which names QEMU's `iommu_platform=on`) and sets FAILED.
//! Taken when offered: MAC, STATUS, CSUM, HOST_TSO4 and HOST_TSO6 (unless switched off in
//! [`NicConfig::offloads`]), INDIRECT_DESC, and RING_PACKED (with INDIRECT_DESC; see
//! below). Not taken: EVENT_IDX (we poll; the device's "no notification" hints suffice),
//! MRG_RXBUF (every frame fits one
//! buffer), GUEST_CSUM/GUEST_TSO* (the queue API has no way to hand partial checksums or
//! large frames to the stack), CTRL_VQ, MQ, RSS (taken by the multi-queue driver,
//! [`super::multiqueue`]). What was offered and taken is logged (`tracing`,
//! info) and available from [`VirtioNet::offered_features`] /
//! [`VirtioNet::negotiated_features`].
//!
//! # Queues and memory
//! One queue pair: receiveq1 is virtqueue 0, transmitq1 virtqueue 1 (section 5.1.2); no
//! control queue. Every frame on either queue is preceded by a 12-byte
//! `struct virtio_net_hdr` (section 5.1.6; 12 bytes because VIRTIO_F_VERSION_1 always includes
//! `num_buffers`). Ring sizes come from [`NicConfig`], rounded down to a power of two and
//! capped at the device's maximum (QEMU: 256). Everything per queue (rings, buffers, the
//! RX and TX paths, counters) is in `VqPair`, which the multi-queue driver
//! ([`super::multiqueue`]) uses once per pair; `VirtioNet` adds the device-wide part (features,
//! interrupts, status checks, reset and recovery).
//!
//! - **TX**: a frame is our `virtio_net_hdr` (in a driver-owned region the device may only
//!   read, one 12-byte slot per ring descriptor) followed by the caller's segments,
//!   unchanged, pointing straight at the caller's IOVAs: no byte of the frame is copied or
//!   edited. With INDIRECT_DESC (section 2.7.5.3) the whole chain lives in a per-slot
//!   indirect table and takes one ring descriptor, so the ring holds as many frames as it
//!   has entries whatever their segment count (QEMU caps the TX ring at 256; direct chains
//!   of two or more descriptors would halve that or worse). Without it, chains take ring
//!   descriptors from a free list. Frames are published in bursts with one notification per
//!   [`NetQueue::tx_flush`], none while the device sets VIRTQ_USED_F_NO_NOTIFY.
//!   Completions may arrive in any order (we do not negotiate VIRTIO_F_IN_ORDER); tokens
//!   are handed back strictly in submission order.
//! - **RX**: one buffer of `rx_buffer_size` bytes (at least 12 + 1514) per ring entry, in a
//!   region the device may write, descriptor *i* permanently describing buffer *i*, all
//!   posted at start; a received buffer is lent to the caller and re-posted when recycled.
//!   Before a buffer is posted its header's `flags`/`gso_type` get a poison value the device
//!   always overwrites: a "used" buffer still holding it was never written (the IOMMU refused
//!   the device's write) and is dropped, never handed out.
//!
//! - **Packed virtqueues** (section 2.8, [`super::packed`]): when the device offers
//!   VIRTIO_F_RING_PACKED (QEMU: `packed=on`) together with INDIRECT_DESC, both queues use
//!   the packed layout; every buffer is then one descriptor (a TX frame's indirect table, in
//!   the packed table layout of section 2.8.19, or one RX buffer). `NicConfig::virtio_packed`
//!   and `NicConfig::virtio_indirect` switch them off, for comparisons.
//!
//! # Offloads (section 5.1.6.2)
//! An offload request is translated into the `virtio_net_hdr` and nothing else: the driver
//! never reads or edits the frame's own headers, so the TX header slot holds only the
//! `virtio_net_hdr` and the caller's segments follow unchanged.
//! - L4 checksum -> `VIRTIO_NET_HDR_F_NEEDS_CSUM` with `csum_start` = where summing starts
//!   and `csum_offset` = from there to the checksum field (section 5.1.6.2, item 2). The
//!   field already holds the pseudo-header sum, exactly the queue API's contract and what
//!   section 5.1.6.2.1 requires. TCP and UDP alike.
//! - TSO -> `VIRTIO_NET_HDR_GSO_TCPV4` with `hdr_len` = [`Tso::header_len`] (Ethernet, IPv4
//!   and TCP headers; without VIRTIO_NET_F_GUEST_HDRLEN any value not less than their
//!   length) and `gso_size` = [`Tso::mss`] (item 3), always with NEEDS_CSUM (section
//!   5.1.6.2.1: the driver MUST set NEEDS_CSUM when `gso_type` is not GSO_NONE). The
//!   device cuts the packet as given, so its headers must describe the whole large packet:
//!   [`Capabilities::tso_headers`] is [`TsoHeaders::WholePacket`] (IPv4 total length of the
//!   whole packet, a valid IPv4 header checksum, the TCP checksum field holding the
//!   pseudo-header sum over the whole TCP length; what Linux's virtio_net driver sends).
//!   The specification leaves the IPv4 header of a GSO packet unsaid; QEMU hands the packet
//!   and its `virtio_net_hdr` to its TAP backend, where the host kernel receives it like any
//!   packet (header checksum verified, packet trimmed to the IPv4 total length) and its GSO
//!   derives every segment's lengths and checksums from the whole packet's.
//! - TSO of an IPv6 frame ([`TxOffload::ipv6_header`]) -> `VIRTIO_NET_HDR_GSO_TCPV6`, only
//!   with VIRTIO_NET_F_HOST_TSO6 negotiated ([`Capabilities::tso_ipv6`]); the headers again
//!   describe the whole packet (IPv6 Payload Length of the large packet, pseudo-header sum
//!   over the whole TCP length). HOST_TSO6 is used only together with HOST_TSO4.
//! - IPv4 header checksum: virtio-net has no such offload, so [`Capabilities`] says
//!   `ipv4_header_checksum: false` and a request for it ([`TxOffload::ipv4_header`]) is
//!   refused with [`DriverError::BadFrame`]: the caller fills the field in (smoltcp does).
//!
//! Requests are checked with what the request and the segment lengths say, never the
//! frame's bytes: offsets inside the frame, the negotiated features, TSO only with a TCP
//! checksum request, headers wholly in the first segment (the queue API's contract, which
//! the Intel drivers need), a non-zero MSS whose segments fit the MTU, frame sizes. Two
//! duties stay with the caller because checking them would mean reading the frame: the
//! checksum field's pseudo-header sum, and clear ECN bits in TSO frames (section 5.1.6.2.1;
//! VIRTIO_NET_F_HOST_ECN is not negotiated).
//!
//! # Errors and recovery
//! A device that hits an error it cannot recover from (for instance a descriptor whose IOVA
//! the IOMMU refuses, when it does not simply substitute zeros as QEMU 7.2 does for a single
//! refused read) sets DEVICE_NEEDS_RESET (section 2.1.2). The poll paths read the status
//! when the device has been idle for a millisecond; on DEVICE_NEEDS_RESET, a used-ring entry
//! that is not an outstanding chain, or published frames making no progress for
//! `tx_hang_timeout`, the driver resets the device (so it no longer touches any buffer),
//! hands back the tokens of the frames it dropped, re-initialises with the same features,
//! and [`NetQueue::tx_reap`] reports the error ([`DriverError::TxHang`] for the watchdog,
//! [`DriverError::DeviceReset`] otherwise) after the tokens; only a device that cannot be
//! re-initialised is reported as [`DriverError::Device`]. `hw-tests/tests/faults.rs`
//! produces both at run time (withheld notifications, a malformed descriptor; see
//! `driver::faults`, feature `fault-injection`).
//!
//! [`NicConfig::offloads`]: crate::anynic::NicConfig
//! [`Tso::header_len`]: crate::queue::Tso::header_len
//! [`Tso::mss`]: crate::queue::Tso::mss

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::anynic::NicConfig;
use crate::dma::{DmaAccess, DmaRegion, DmaSpace};
use crate::error::{DriverError, Result};
use crate::irq::{DeviceIrq, Interruptible, IrqMode};
use crate::queue::{
    Capabilities, DeviceStats, L4Protocol, MacAddress, NetQueue, RxBuffer, TsoHeaders, TxFrame,
    TxOffload, TxSegment, TxToken,
};
use crate::vfio::VfioPci;

use super::features as f;
use super::packed::{write_indirect_desc, PackedQueue};
use super::transport::{DeviceStatus, VirtioPciTransport, NO_VECTOR};
use super::virtqueue::{
    write_desc, SplitQueue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE,
};

/// receiveq1 and transmitq1 (section 5.1.2); the driver computes every pair's indices
/// ([`VqPair::new`]), these name pair 0 for the fuzz harness and the tests.
#[cfg(feature = "fuzzing")]
const RX_QUEUE: u16 = 0;
#[cfg(test)]
const TX_QUEUE: u16 = 1;

/// `struct virtio_net_hdr` (section 5.1.6): `u8 flags; u8 gso_type; le16 hdr_len;
/// le16 gso_size; le16 csum_start; le16 csum_offset; le16 num_buffers;`. With
/// VIRTIO_F_VERSION_1 the header always has `num_buffers`: 12 bytes.
pub const NET_HDR_LEN: usize = 12;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM` (section 5.1.6).
const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE` / `_TCPV4` / `_TCPV6` (section 5.1.6).
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// `struct virtio_net_config` (section 5.1.4): `u8 mac[6]; le16 status; ...`.
const CONFIG_MAC: usize = 0;
const CONFIG_STATUS: usize = 6;
/// `VIRTIO_NET_S_LINK_UP` (section 5.1.4).
const S_LINK_UP: u16 = 1;

/// Ethernet header + 1500-byte MTU.
const MAX_FRAME: u64 = 1514;
/// Largest TSO frame: one IPv4 datagram (total length is 16 bits) plus the Ethernet header.
const TSO_MAX_FRAME: u32 = 65535 + 14;
/// Per-head TX header slot: exactly one `virtio_net_hdr`.
const TX_HDR_SLOT: usize = NET_HDR_LEN;
/// Most caller segments per frame (a 64 KiB TSO frame of 4 KiB pages needs 17 or 18).
const MAX_TX_SEGMENTS: usize = 64;
/// Bytes of one frame's indirect descriptor table: the header descriptor, then one per
/// caller segment.
const INDIRECT_TABLE: usize = (MAX_TX_SEGMENTS + 1) * DESC_SIZE;
/// How long the device must be idle before the poll paths read its status register.
const STATUS_CHECK_INTERVAL: Duration = Duration::from_millis(1);

/// The queue layout negotiated: split (section 2.7) or packed (section 2.8, with
/// VIRTIO_F_RING_PACKED). The packed layout is used only with INDIRECT_DESC, so every buffer
/// on it is one descriptor.
pub(super) enum Ring {
    Split(SplitQueue),
    Packed(PackedQueue),
}

impl Ring {
    pub(super) fn new(
        dma: &Arc<DmaSpace>,
        index: u16,
        size: u16,
        packed: bool,
        device_writes: DmaAccess,
    ) -> Result<Ring> {
        Ok(if packed {
            Ring::Packed(PackedQueue::with_ring_access(dma, size, device_writes)?)
        } else {
            Ring::Split(SplitQueue::with_used_ring_access(
                dma,
                index,
                size,
                device_writes,
            )?)
        })
    }
    pub(super) fn size(&self) -> u16 {
        match self {
            Ring::Split(q) => q.size(),
            Ring::Packed(q) => q.size(),
        }
    }
    /// `queue_desc`, `queue_driver`, `queue_device` (section 4.1.4.3).
    pub(super) fn areas(&self) -> (u64, u64, u64) {
        match self {
            Ring::Split(q) => (q.desc_iova(), q.avail_iova(), q.used_iova()),
            Ring::Packed(q) => (q.desc_iova(), q.driver_iova(), q.device_iova()),
        }
    }
    pub(super) fn reset(&mut self) {
        match self {
            Ring::Split(q) => q.reset(),
            Ring::Packed(q) => q.reset(),
        }
    }
    pub(super) fn publish(&mut self) -> bool {
        match self {
            Ring::Split(q) => q.publish(),
            Ring::Packed(q) => q.publish(),
        }
    }
    pub(super) fn device_wants_notification(&self) -> bool {
        match self {
            Ring::Split(q) => q.device_wants_notification(),
            Ring::Packed(q) => q.device_wants_notification(),
        }
    }
    pub(super) fn pop_used(&mut self) -> Option<(u32, u32)> {
        match self {
            Ring::Split(q) => q.pop_used(),
            Ring::Packed(q) => q.pop_used(),
        }
    }
    pub(super) fn set_interrupts(&self, enabled: bool) {
        match self {
            Ring::Split(q) => q.set_interrupts(enabled),
            Ring::Packed(q) => q.set_interrupts(enabled),
        }
    }
    pub(super) fn unpublished(&self) -> u16 {
        match self {
            Ring::Split(q) => q.unpublished(),
            Ring::Packed(q) => q.unpublished(),
        }
    }
    /// Make a one-descriptor buffer with buffer id `id` available (split: in descriptor
    /// `id`, which the caller owns). The caller guarantees room: ids are unique among the
    /// outstanding buffers and there are at most `size` of them.
    pub(super) fn post(&mut self, id: u16, iova: u64, len: u32, flags: u16) {
        match self {
            Ring::Split(q) => {
                q.set_desc(id, iova, len, flags, 0);
                q.push_avail(id);
            }
            Ring::Packed(q) => q.add(id, iova, len, flags).expect("packed ring overflow"),
        }
    }
    /// The split queue, for TX chains of several ring descriptors (no INDIRECT_DESC).
    pub(super) fn split(&mut self) -> &mut SplitQueue {
        match self {
            Ring::Split(q) => q,
            Ring::Packed(_) => unreachable!("packed rings are used only with indirect descriptors"),
        }
    }
}

/// Transmit side state.
struct Tx {
    vq: Ring,
    /// `TX_HDR_SLOT` bytes per descriptor index, used for chains headed by that descriptor.
    headers: DmaRegion,
    /// With VIRTIO_F_INDIRECT_DESC: an `INDIRECT_TABLE` per ring descriptor; each frame then
    /// takes one ring descriptor pointing at its table (section 2.7.5.3), so the ring holds
    /// as many frames as it has entries, whatever their segment counts.
    indirect: Option<DmaRegion>,
    /// Free descriptor indices.
    free: Vec<u16>,
    /// Our copy of each descriptor's `next` (the device cannot change the table, but reading
    /// our own shadow avoids volatile reads of DMA memory).
    next: Vec<u16>,
    /// Per head: descriptors in the chain, token and frame bytes, whether in flight, done.
    chain_len: Vec<u16>,
    token: Vec<TxToken>,
    bytes: Vec<u64>,
    in_flight: Vec<bool>,
    done: Vec<bool>,
    /// Heads in submission order.
    order: VecDeque<u16>,
    /// Last time a frame completed (or the ring went from idle to busy).
    last_progress: Instant,
}

impl Tx {
    /// A transmit queue on ring `vq` with nothing in flight: `headers` holds a header slot
    /// per descriptor, `indirect` a table per descriptor when indirect descriptors are used.
    fn new(vq: Ring, headers: DmaRegion, indirect: Option<DmaRegion>) -> Tx {
        let size = vq.size();
        let n = size as usize;
        Tx {
            vq,
            headers,
            indirect,
            free: (0..size).rev().collect(),
            next: vec![0; n],
            chain_len: vec![0; n],
            token: vec![0; n],
            bytes: vec![0; n],
            in_flight: vec![false; n],
            done: vec![false; n],
            order: VecDeque::with_capacity(n),
            last_progress: Instant::now(),
        }
    }

    /// Forget every frame (the device has been reset and no longer reads any of them):
    /// append each token to `lost` in submission order (completed but not yet handed back,
    /// in flight, or not yet published alike) and free every descriptor. The caller resets
    /// the ring itself. Returns how many frames were dropped.
    fn drop_all(&mut self, lost: &mut VecDeque<TxToken>) -> usize {
        let n = self.order.len();
        while let Some(head) = self.order.pop_front() {
            lost.push_back(self.token[head as usize]);
            self.in_flight[head as usize] = false;
            self.done[head as usize] = false;
        }
        self.free = (0..self.vq.size()).rev().collect();
        n
    }
}

/// Receive side state.
struct Rx {
    vq: Ring,
    buffers: DmaRegion,
    buffer_size: usize,
    /// Buffer (= descriptor) is in the device's hands.
    posted: Vec<bool>,
    /// Buffer is lent to the caller.
    lent: Vec<bool>,
    /// Recycled, waiting for `rx_flush`.
    recycled: Vec<u16>,
}

/// Written into `flags` and `gso_type` of a receive buffer's `virtio_net_hdr` before it is
/// posted. The device always writes both (section 5.1.6.4), and 0xff is not a valid value of
/// either, so a buffer the device reports as used that still holds it was never written:
/// the IOMMU refused the device's write (see `FaultInjection::RxBuffersReadOnly`).
const RX_POISON: u16 = 0xffff;

impl Rx {
    /// Hand buffer `slot` to the device (not yet published).
    fn post(&mut self, slot: u16) {
        self.poison(slot);
        let iova = self.buffers.iova() + (slot as usize * self.buffer_size) as u64;
        self.vq
            .post(slot, iova, self.buffer_size as u32, DESC_F_WRITE);
        self.posted[slot as usize] = true;
    }

    /// The next good frame the device returned, lent to the caller; `Ok(None)`: none yet.
    /// Everything read from the used ring is device-written: a buffer id that is not
    /// outstanding is `Err(id)` (the device is broken: reset it); a length too short or too
    /// long for the buffer, or a buffer the device never wrote, is dropped and counted.
    fn take(&mut self, stats: &mut DeviceStats) -> std::result::Result<Option<RxBuffer>, u32> {
        loop {
            let Some((id, len)) = self.vq.pop_used() else {
                return Ok(None);
            };
            let size = self.vq.size() as u32;
            if id >= size || !self.posted[id as usize] {
                return Err(id);
            }
            self.posted[id as usize] = false;
            // len counts the bytes written, virtio_net_hdr included (section 2.7.8).
            let len = len as usize;
            if len < NET_HDR_LEN + 14 || len > self.buffer_size || self.poisoned(id as u16) {
                // Too short, too long, or the device's write never landed (the header still
                // holds the poison): never hand out such a buffer.
                stats.rx_errors += 1;
                self.recycled.push(id as u16);
                continue;
            }
            self.lent[id as usize] = true;
            let frame = (len - NET_HDR_LEN) as u32;
            stats.rx_frames += 1;
            stats.rx_bytes += frame as u64;
            return Ok(Some(RxBuffer {
                slot: id,
                len: frame,
            }));
        }
    }

    /// Copies a lent buffer's frame out (after its `virtio_net_hdr`).
    fn read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        let slot = buffer.slot as usize;
        assert!(
            self.lent.get(slot) == Some(&true),
            "rx_read on a buffer that is not lent out"
        );
        let at = slot * self.buffer_size + NET_HDR_LEN;
        let n = (buffer.len as usize).min(out.len());
        self.buffers.read_bytes(at, &mut out[..n]);
        &out[..n]
    }

    fn recycle(&mut self, buffer: RxBuffer) {
        let slot = buffer.slot as usize;
        if slot < self.lent.len() && self.lent[slot] {
            self.lent[slot] = false;
            self.recycled.push(slot as u16);
        }
    }

    /// Posts the recycled buffers again and publishes them; returns whether anything was
    /// published (the device may want a notification).
    fn repost(&mut self) -> bool {
        if self.recycled.is_empty() {
            return false;
        }
        for i in 0..self.recycled.len() {
            let slot = self.recycled[i];
            self.post(slot);
        }
        self.recycled.clear();
        self.vq.publish()
    }

    /// After a (re)start of the queue: every buffer not lent out is posted and published
    /// (buffer id i is buffer i; split: in descriptor i), device-writable.
    fn post_all(&mut self) {
        self.recycled.clear();
        for i in 0..self.vq.size() {
            self.posted[i as usize] = false;
            if !self.lent[i as usize] {
                self.post(i);
            }
        }
        self.vq.publish();
    }

    fn poison(&self, slot: u16) {
        self.buffers
            .write_volatile(slot as usize * self.buffer_size, RX_POISON);
    }

    fn poisoned(&self, slot: u16) -> bool {
        self.buffers
            .read_volatile::<u16>(slot as usize * self.buffer_size)
            == RX_POISON
    }
}

/// One receiveq/transmitq pair with its rings and buffers: the per-queue half of the driver,
/// shared by [`VirtioNet`] (pair 0 alone) and the multi-queue handles of
/// [`super::multiqueue`]. Pair `k` is receiveq(k+1) = virtqueue 2k and transmitq(k+1) =
/// virtqueue 2k+1 (section 5.1.2). It touches the device only through the select-free
/// registers (its own notification addresses), so pairs can be driven from different
/// threads; queue set-up and resets stay with the owner of the whole device.
pub(super) struct VqPair {
    // Boxed: keeps `VirtioNet` (and `AnyNic`) small to move.
    rx: Box<Rx>,
    tx: Box<Tx>,
    rx_index: u16,
    tx_index: u16,
    rx_notify: usize,
    tx_notify: usize,
    caps: Capabilities,
    pub(super) stats: DeviceStats,
}

impl VqPair {
    /// Rings and buffers of pair `pair` (not yet set up on the device): ring sizes from
    /// `config`, rounded down to a power of two and capped at the device's maximum
    /// (section 4.1.4.3.2: the driver may choose a smaller queue_size), buffers mapped as
    /// `config`'s fault injection says.
    pub(super) fn new(
        t: &VirtioPciTransport,
        dma: &Arc<DmaSpace>,
        config: &NicConfig,
        negotiated: u64,
        pair: u16,
    ) -> Result<VqPair> {
        let (rx_index, tx_index) = (2 * pair, 2 * pair + 1);
        let rx_size = fit_queue_size(t, config.rx_ring_size, rx_index)?;
        let tx_size = fit_queue_size(t, config.tx_ring_size, tx_index)?;
        if tx_size < 4 {
            return Err(DriverError::InvalidArgument(format!(
                "virtio-net TX queue of {tx_size} entries is too small"
            )));
        }
        let packed = negotiated & f::F_RING_PACKED != 0;
        // Fault injection: the device's writes into the receive buffers, or into the TX used
        // ring (its completions), are stopped by the IOMMU.
        let (rx_access, tx_used_access) =
            (config.rx_buffer_access(), config.tx_completion_access());
        let rx = Rx {
            vq: Ring::new(dma, rx_index, rx_size, packed, DmaAccess::DeviceReadsWrites)?,
            buffers: dma.allocate(rx_size as usize * config.rx_buffer_size, rx_access)?,
            buffer_size: config.rx_buffer_size,
            posted: vec![false; rx_size as usize],
            lent: vec![false; rx_size as usize],
            recycled: Vec::new(),
        };
        let n = tx_size as usize;
        let tx = Tx::new(
            Ring::new(dma, tx_index, tx_size, packed, tx_used_access)?,
            dma.allocate(n * TX_HDR_SLOT, DmaAccess::DeviceReads)?,
            if negotiated & f::F_INDIRECT_DESC != 0 {
                Some(dma.allocate(n * INDIRECT_TABLE, DmaAccess::DeviceReads)?)
            } else {
                None
            },
        );
        Ok(VqPair {
            rx: Box::new(rx),
            tx: Box::new(tx),
            rx_index,
            tx_index,
            rx_notify: 0,
            tx_notify: 0,
            caps: capabilities(negotiated, tx_size),
            stats: DeviceStats::default(),
        })
    }

    pub(super) fn caps(&self) -> Capabilities {
        self.caps
    }

    /// (receive, transmit) ring sizes.
    pub(super) fn ring_sizes(&self) -> (u16, u16) {
        (self.rx.vq.size(), self.tx.vq.size())
    }

    /// Set up both virtqueues with MSI-X `vector` (or NO_VECTOR) and post every receive
    /// buffer not lent out (section 3.1.1 step 7, section 5.1.6.3). The device is between
    /// FEATURES_OK and DRIVER_OK, the queues disabled, our rings zeroed. The receive queue
    /// is notified by [`VqPair::kick_rx`] after DRIVER_OK.
    pub(super) fn setup(&mut self, t: &VirtioPciTransport, vector: u16) -> Result<()> {
        self.rx_notify =
            t.setup_queue(self.rx_index, self.rx.vq.size(), self.rx.vq.areas(), vector)?;
        self.tx_notify =
            t.setup_queue(self.tx_index, self.tx.vq.size(), self.tx.vq.areas(), vector)?;
        self.rx.post_all();
        Ok(())
    }

    /// Tell the device about the posted receive buffers (after DRIVER_OK: section 3.1.1
    /// forbids notifications before it).
    pub(super) fn kick_rx(&mut self, t: &VirtioPciTransport) {
        t.notify(self.rx_notify, self.rx_index);
        self.stats.doorbells += 1;
    }

    /// After a device reset (the device no longer touches any buffer): drop every frame,
    /// appending its token to `lost` in submission order, and zero both rings. Returns how
    /// many frames were dropped.
    pub(super) fn reset_rings(&mut self, lost: &mut VecDeque<TxToken>) -> usize {
        let n = self.tx.drop_all(lost);
        self.tx.vq.reset();
        self.rx.vq.reset();
        self.tx.last_progress = Instant::now();
        n
    }

    pub(super) fn tx_capacity(&self, segments: usize) -> usize {
        if segments == 0 || segments > self.caps.max_tx_segments {
            return 0;
        }
        if self.tx.indirect.is_some() {
            return self.tx.free.len();
        }
        // The header descriptor, then one per segment.
        self.tx.free.len() / (segments + 1)
    }

    /// Check `frame`, build its `virtio_net_hdr` and descriptor chain, and push it on the
    /// available ring (published by [`VqPair::tx_publish`]).
    pub(super) fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> Result<()> {
        let (segments, offload, token) = (frame.segments, frame.offload, frame.token);
        if !frame.tls.is_empty() {
            // It would put the plaintext on the wire.
            return Err(DriverError::BadFrame("no inline TLS engine".into()));
        }
        if segments.is_empty() || segments.len() > self.caps.max_tx_segments {
            return Err(DriverError::BadFrame(format!(
                "{} segments (1 to {} allowed)",
                segments.len(),
                self.caps.max_tx_segments
            )));
        }
        if segments.iter().any(|s| s.len == 0) {
            return Err(DriverError::BadFrame("zero-length segment".into()));
        }
        let total: u64 = segments.iter().map(|s| s.len as u64).sum();
        if total < 14 {
            return Err(DriverError::BadFrame(format!(
                "{total}-byte frame is shorter than an Ethernet header"
            )));
        }
        let hdr = tx_net_hdr(&self.caps, segments, offload, total)?;
        // The chain: the header descriptor, then the caller's segments (in the ring, or in
        // the frame's indirect table behind one ring descriptor).
        let n = segments.len() + 1;
        let ring_descs = if self.tx.indirect.is_some() { 1 } else { n };
        if self.tx.free.len() < ring_descs {
            return Err(DriverError::TxRingFull);
        }
        let head = *self.tx.free.last().unwrap();
        let slot = head as usize * TX_HDR_SLOT;
        self.tx.headers.write_bytes(slot, &hdr);
        let header = (self.tx.headers.iova() + slot as u64, NET_HDR_LEN as u32);
        let pieces = std::iter::once(header).chain(segments.iter().map(|s| (s.iova, s.len)));
        let h = head as usize;
        if let Some(table) = &self.tx.indirect {
            // Section 2.7.5.3 (split): the table's descriptors chain by index within the
            // table; the ring descriptor has only VIRTQ_DESC_F_INDIRECT (never with NEXT),
            // and its len is the table's size in bytes. Section 2.8.19 (packed): the same
            // ring descriptor, the table in the packed layout.
            let base = h * INDIRECT_TABLE;
            let packed = matches!(self.tx.vq, Ring::Packed(_));
            for (k, (iova, len)) in pieces.enumerate() {
                if packed {
                    // Section 2.8.19: packed-layout entries, consecutive, no NEXT.
                    write_indirect_desc(table, base + k * DESC_SIZE, iova, len, 0);
                    continue;
                }
                let (flags, next) = if k + 1 == n {
                    (0, 0)
                } else {
                    (DESC_F_NEXT, k as u16 + 1)
                };
                write_desc(table, base + k * DESC_SIZE, iova, len, flags, next);
            }
            self.tx.free.pop();
            let table_iova = table.iova() + base as u64;
            let table_len = (n * DESC_SIZE) as u32;
            self.tx
                .vq
                .post(head, table_iova, table_len, DESC_F_INDIRECT);
            self.tx.chain_len[h] = 1;
        } else {
            let mut d = self.tx.free.pop().unwrap();
            debug_assert_eq!(d, head);
            for (k, (iova, len)) in pieces.enumerate() {
                let (flags, next) = if k + 1 == n {
                    (0, 0)
                } else {
                    (DESC_F_NEXT, self.tx.free.pop().unwrap())
                };
                // TX buffers are device-readable: no VIRTQ_DESC_F_WRITE (section 2.7.5).
                self.tx.vq.split().set_desc(d, iova, len, flags, next);
                self.tx.next[d as usize] = next;
                d = next;
            }
            self.tx.chain_len[h] = n as u16;
            self.tx.vq.split().push_avail(head);
        }
        self.tx.token[h] = token;
        self.tx.bytes[h] = total;
        self.tx.in_flight[h] = true;
        self.tx.done[h] = false;
        if self.tx.order.is_empty() {
            self.tx.last_progress = Instant::now();
        }
        self.tx.order.push_back(head);
        Ok(())
    }

    /// Publish the enqueued frames and notify the transmit queue unless the device said it
    /// needs no notification (section 2.7.13.3-4, 2.8.21.3).
    pub(super) fn tx_publish(&mut self, t: &VirtioPciTransport) {
        if self.tx.vq.publish() && self.tx.vq.device_wants_notification() {
            t.notify(self.tx_notify, self.tx_index);
            self.stats.doorbells += 1;
        }
    }

    /// Consume the transmit used ring and hand back, in submission order, the tokens of the
    /// frames completed. `Err(id)`: the device returned `id`, which is not an outstanding
    /// chain (section 2.7.8: used ids are heads the driver made available); no token is
    /// handed back then, and the caller must stop the device before reusing anything.
    pub(super) fn tx_complete(
        &mut self,
        done: &mut dyn FnMut(TxToken),
    ) -> std::result::Result<usize, u32> {
        let size = self.tx.vq.size() as u32;
        while let Some((id, _len)) = self.tx.vq.pop_used() {
            if id >= size || !self.tx.in_flight[id as usize] || self.tx.done[id as usize] {
                return Err(id);
            }
            self.tx.done[id as usize] = true;
        }
        let mut n = 0;
        while let Some(&head) = self.tx.order.front() {
            let h = head as usize;
            if !self.tx.done[h] {
                break;
            }
            self.tx.order.pop_front();
            self.tx.in_flight[h] = false;
            self.tx.done[h] = false;
            let mut d = head;
            for _ in 0..self.tx.chain_len[h] {
                self.tx.free.push(d);
                d = self.tx.next[d as usize];
            }
            self.stats.tx_frames += 1;
            self.stats.tx_bytes += self.tx.bytes[h];
            done(self.tx.token[h]);
            n += 1;
        }
        Ok(n)
    }

    /// The TX watchdog's view after a [`VqPair::tx_complete`] that handed back `completed`
    /// frames: `None` while there is progress or nothing published, otherwise how long the
    /// published frames have made none.
    pub(super) fn tx_stalled(&mut self, completed: usize) -> Option<Duration> {
        let published = self.tx.order.len() - self.tx.vq.unpublished() as usize;
        if completed > 0 || published == 0 {
            self.tx.last_progress = Instant::now();
            return None;
        }
        Some(self.tx.last_progress.elapsed())
    }

    /// Frames enqueued and not yet handed back.
    pub(super) fn tx_outstanding(&self) -> usize {
        self.tx.order.len()
    }

    /// The next good received frame, lent out (see [`Rx::take`]); `Err(id)`: a used id
    /// that was not posted (the device is broken).
    pub(super) fn rx_take(&mut self) -> std::result::Result<Option<RxBuffer>, u32> {
        self.rx.take(&mut self.stats)
    }

    pub(super) fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        self.rx.read(buffer, out)
    }

    pub(super) fn rx_recycle(&mut self, buffer: RxBuffer) {
        self.rx.recycle(buffer)
    }

    /// Re-post the recycled buffers and notify the receive queue if the device wants it
    /// (it asks only after it found the ring without room). Returns whether it notified.
    pub(super) fn rx_flush(&mut self, t: &VirtioPciTransport) -> bool {
        if self.rx.repost() && self.rx.vq.device_wants_notification() {
            t.notify(self.rx_notify, self.rx_index);
            self.stats.doorbells += 1;
            return true;
        }
        false
    }

    /// The receive queue's notification address offset and queue index (set by `setup`).
    pub(super) fn rx_doorbell(&self) -> (usize, u16) {
        (self.rx_notify, self.rx_index)
    }

    /// Used buffer notifications of both queues on or off (section 2.7.7, 2.8.10).
    pub(super) fn set_interrupts(&self, enabled: bool) {
        self.rx.vq.set_interrupts(enabled);
        self.tx.vq.set_interrupts(enabled);
    }
}

/// The largest power of two no larger than `want` and virtqueue `index`'s maximum.
pub(super) fn fit_queue_size(t: &VirtioPciTransport, want: u16, index: u16) -> Result<u16> {
    let max = t.max_queue_size(index);
    if max == 0 {
        return Err(DriverError::Device(format!(
            "virtio-net has no virtqueue {index}"
        )));
    }
    // Section 4.1.4.3.2: the driver may choose a smaller queue_size than the device's
    // maximum.
    let size = want.min(max).max(1);
    Ok(1u16 << (15 - size.leading_zeros()))
}

/// What the queue API may use with `negotiated` features and a TX ring of `tx_size`.
fn capabilities(negotiated: u64, tx_size: u16) -> Capabilities {
    let csum = negotiated & f::NET_F_CSUM != 0;
    Capabilities {
        // Section 5.1.6.2: virtio-net offers L4 checksums and segmentation only.
        ipv4_header_checksum: false,
        tcp_checksum: csum,
        udp_checksum: csum,
        tso_max_frame: (negotiated & f::NET_F_HOST_TSO4 != 0).then_some(TSO_MAX_FRAME),
        tso_headers: TsoHeaders::WholePacket,
        tso_ipv6: negotiated & f::NET_F_HOST_TSO4 != 0 && negotiated & f::NET_F_HOST_TSO6 != 0,
        max_tx_segments: if negotiated & f::F_INDIRECT_DESC != 0 {
            MAX_TX_SEGMENTS
        } else {
            // A direct chain is the header descriptor plus one per segment.
            MAX_TX_SEGMENTS.min(tx_size as usize - 1)
        },
        mtu: 1500,
        // virtio-net has no TLS offload: the stack encrypts records itself.
        tls_tx: None,
    }
}

/// The checks `open` makes before touching the device: the configuration, the PCI ids
/// (modern virtio-net, section 4.1.2.1: 0x1040 + device id 1) and a receive buffer size
/// that holds the header and a full frame.
pub(super) fn check_open(pci: &VfioPci, config: &NicConfig) -> Result<()> {
    config.validate()?;
    let (vendor, device) = pci.ids();
    if (vendor, device) != (0x1af4, 0x1041) {
        return Err(DriverError::UnsupportedDevice { vendor, device });
    }
    if config.rx_buffer_size < NET_HDR_LEN + MAX_FRAME as usize {
        return Err(DriverError::InvalidArgument(format!(
            "virtio-net receive buffers must hold the 12-byte header and a 1514-byte frame; {} is too small",
            config.rx_buffer_size
        )));
    }
    Ok(())
}

/// The MAC address: the device's with VIRTIO_NET_F_MAC, otherwise a random locally
/// administered unicast one (section 5.1.5: "If the VIRTIO_NET_F_MAC feature bit is not set,
/// the driver SHOULD generate a random MAC address").
pub(super) fn read_mac(t: &VirtioPciTransport, negotiated: u64) -> Result<MacAddress> {
    if negotiated & f::NET_F_MAC != 0 {
        let mut mac = [0u8; 6];
        t.read_device_config(CONFIG_MAC, &mut mac)?;
        return Ok(MacAddress(mac));
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (std::process::id() as u64) << 20;
    let b = seed.to_le_bytes();
    Ok(MacAddress([0x02, b[0], b[1], b[2], b[3], b[4]]))
}

/// The link state (section 5.1.4: the `status` field's VIRTIO_NET_S_LINK_UP; without
/// VIRTIO_NET_F_STATUS the link is assumed active).
pub(super) fn link_status(t: &VirtioPciTransport, negotiated: u64) -> bool {
    if negotiated & f::NET_F_STATUS == 0 {
        return true;
    }
    t.device_config_read16(CONFIG_STATUS)
        .map(|s| s & S_LINK_UP != 0)
        .unwrap_or(false)
}

/// A modern virtio-net device driven through VFIO.
pub struct VirtioNet {
    /// Interrupts through VFIO (`NicConfig::interrupts`): MSI-X vector 0 for both queues,
    /// or INTx (the ISR byte). First, so they are disabled before anything else goes.
    irq: Option<DeviceIrq>,
    transport: VirtioPciTransport,
    pci: VfioPci,
    config: NicConfig,
    offered: u64,
    negotiated: u64,
    mac: MacAddress,
    /// receiveq1 and transmitq1.
    q: VqPair,
    /// Tokens of frames dropped by a reset, handed back by the next `tx_reap`.
    lost: VecDeque<TxToken>,
    /// Error to report from the next `tx_reap` (after the lost tokens).
    pending_error: Option<DriverError>,
    /// Set when re-initialisation failed: the device is unusable.
    dead: Option<String>,
    last_status_check: Instant,
    /// Test-only run-time faults ([`crate::faults`]).
    #[cfg(feature = "fault-injection")]
    faults: crate::faults::FaultInjector,
}

impl VirtioNet {
    /// Initialise the virtio-net function behind `pci` (section 3.1.1 with the network
    /// device's steps of section 5.1.5): reset, ACKNOWLEDGE, DRIVER, feature negotiation
    /// (VERSION_1 and ACCESS_PLATFORM required), FEATURES_OK (checked), virtqueue set-up,
    /// receive buffers, DRIVER_OK.
    ///
    /// From `config`: ring sizes (rounded down to a power of two and capped at the device's
    /// maximum), receive buffer size, which offloads to negotiate or offer, how long to wait
    /// for the link, the TX-hang timeout, and fault injection (read-only receive buffers).
    pub fn open(pci: VfioPci, config: &NicConfig) -> Result<VirtioNet> {
        check_open(&pci, config)?;
        pci.enable_bus_master()?;
        let transport = VirtioPciTransport::new(&pci)?;
        transport.reset()?;
        // Interrupts before the queues are set up: queue_msix_vector is written then
        // (section 4.1.5.1.2). MSI-X is how virtio-pci signals per queue (section 4.1.4.3,
        // 4.1.5.1.2); without it, INTx with the ISR status (section 4.1.4.5).
        let irq = if config.interrupts {
            match pci.enable_interrupts(&[IrqMode::MsiX, IrqMode::Intx], 1) {
                Ok(irq) => {
                    tracing::info!(device = %pci.address(), mode = %irq.mode(), "virtio-net interrupts enabled");
                    Some(irq)
                }
                Err(e) => {
                    tracing::warn!(device = %pci.address(), "{e}");
                    None
                }
            }
        } else {
            None
        };
        let (offered, negotiated) = negotiate(&transport, config, None, 0)?;
        let mac = read_mac(&transport, negotiated)?;
        let dma = Arc::clone(pci.dma());
        let q = VqPair::new(&transport, &dma, config, negotiated, 0)?;
        let mut nic = VirtioNet {
            irq,
            transport,
            pci,
            config: config.clone(),
            offered,
            negotiated,
            mac,
            q,
            lost: VecDeque::new(),
            pending_error: None,
            dead: None,
            last_status_check: Instant::now(),
            #[cfg(feature = "fault-injection")]
            faults: Default::default(),
        };
        if let Err(e) = nic.start_queues() {
            nic.transport.fail();
            return Err(e);
        }
        let link_deadline = Instant::now() + config.link_wait;
        while !nic.link_up() && Instant::now() < link_deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (rx_size, tx_size) = nic.q.ring_sizes();
        tracing::info!(
            mac = %nic.mac,
            rx_queue = rx_size,
            tx_queue = tx_size,
            caps = ?nic.q.caps(),
            "virtio-net ready"
        );
        Ok(nic)
    }

    /// Feature bits the device offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Feature bits negotiated (offered and taken).
    pub fn negotiated_features(&self) -> u64 {
        self.negotiated
    }

    /// The device's status byte (section 2.1).
    pub fn device_status(&self) -> u8 {
        self.transport.status()
    }

    /// The PCI function.
    pub fn pci(&self) -> &VfioPci {
        &self.pci
    }

    #[cfg(feature = "fault-injection")]
    pub(crate) fn fault_injector(&mut self) -> &mut crate::faults::FaultInjector {
        &mut self.faults
    }

    /// Whether [`crate::faults::Fault::DeviceError`] can be produced: it corrupts the
    /// indirect-table length of a split-queue ring descriptor.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn can_inject_device_error(&self) -> bool {
        self.q.tx.indirect.is_some() && matches!(self.q.tx.vq, Ring::Split(_))
    }

    /// Test hook ([`crate::faults`]): produce a fault that strikes at this doorbell, before
    /// the new frames are published. Returns false if the notification must be withheld.
    #[cfg(feature = "fault-injection")]
    fn inject_before_doorbell(&mut self) -> bool {
        use crate::faults::Fault;
        let tx = &mut self.q.tx;
        let new = tx.vq.unpublished() as usize;
        if new > 0 && self.faults.before_doorbell(new) == Some(Fault::DeviceError) {
            // The first new frame's ring descriptor announces an indirect table of half a
            // descriptor: not an array of `struct virtq_desc` (section 2.7.5.3), so the
            // device cannot use the buffer and reports DEVICE_NEEDS_RESET (section 2.1.2).
            let head = tx.order[tx.order.len() - new];
            let table = tx.indirect.as_ref().expect("checked when armed");
            let iova = table.iova() + (head as usize * INDIRECT_TABLE) as u64;
            tx.vq
                .split()
                .set_desc(head, iova, DESC_SIZE as u32 / 2, DESC_F_INDIRECT, 0);
        }
        // TX hang: no available buffer notification reaches the device (section 2.7.13.4)
        // until the driver resets it.
        !self.faults.is_active(Fault::TxHang)
    }

    /// Set up both virtqueues, post every receive buffer not lent out, and set DRIVER_OK
    /// (section 3.1.1 steps 7-8, section 5.1.5 step 5). The device is between FEATURES_OK
    /// and DRIVER_OK, its queues disabled; our rings are zeroed.
    fn start_queues(&mut self) -> Result<()> {
        let t = &self.transport;
        let vector = match self.irq.as_ref().map(DeviceIrq::mode) {
            Some(IrqMode::MsiX) => 0,
            _ => NO_VECTOR,
        };
        self.q.setup(t, vector)?;
        // Section 3.1.1 step 8; section 3.1.1 also forbids notifications before DRIVER_OK.
        t.add_status(DeviceStatus::DRIVER_OK);
        let status = t.status();
        if status & (DeviceStatus::DEVICE_NEEDS_RESET | DeviceStatus::FAILED) != 0 {
            return Err(DriverError::Device(format!(
                "virtio-net refused DRIVER_OK: status {status:#04x}"
            )));
        }
        self.q.kick_rx(t);
        Ok(())
    }

    /// Reset the device after an error, hand back what was in flight, and start it again
    /// with the same features. Records `error` for `tx_reap`.
    fn recover(&mut self, error: impl FnOnce(usize) -> DriverError) {
        // Reset first: once the status reads 0 the device no longer touches any buffer, so
        // the dropped frames' memory may be reused by the caller (section 2.4).
        let reset = self.transport.reset();
        let lost = self.q.reset_rings(&mut self.lost);
        self.q.stats.tx_errors += lost as u64;
        self.q.stats.watchdog_resets += 1;
        #[cfg(feature = "fault-injection")]
        self.faults.on_reset();
        let err = error(lost);
        tracing::warn!("virtio-net: {err}");
        let restarted = reset
            .and_then(|()| negotiate(&self.transport, &self.config, Some(self.negotiated), 0))
            .and_then(|_| self.start_queues());
        match restarted {
            // Recovered: `tx_reap` reports it (once, with every frame dropped since the
            // last report) after handing back the tokens.
            Ok(()) => {
                self.pending_error = Some(match self.pending_error.take() {
                    Some(earlier) => earlier.with_more_lost(lost),
                    None => err,
                })
            }
            // Not recovered: the device is unusable, and `tx_reap` must say so
            // (`DriverError::Device`) rather than report a recovered fault.
            Err(e) => {
                self.transport.fail();
                tracing::error!("virtio-net: re-initialisation after reset failed: {e}");
                self.pending_error = None;
                self.dead = Some(format!(
                    "virtio-net could not be re-initialised after a reset ({err}): {e}"
                ));
            }
        }
    }

    /// Read the status when the device has been idle for a while; recover on
    /// DEVICE_NEEDS_RESET (section 2.1.2: the driver must reset a device that sets it).
    fn check_status(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_status_check) < STATUS_CHECK_INTERVAL {
            return;
        }
        self.last_status_check = now;
        let status = self.transport.status();
        if status & DeviceStatus::DEVICE_NEEDS_RESET != 0 {
            self.recover(|lost| {
                DriverError::DeviceReset {
                    reason: format!("virtio-net set DEVICE_NEEDS_RESET (status {status:#04x}): it hit an error it cannot recover from, such as a descriptor whose IOVA the IOMMU does not map"),
                    lost,
                }
            });
        } else if status & DeviceStatus::DRIVER_OK == 0 && self.dead.is_none() {
            // Reset behind our back (e.g. a function reset).
            self.recover(|lost| DriverError::DeviceReset {
                reason: format!("virtio-net lost DRIVER_OK (status {status:#04x})"),
                lost,
            });
        }
    }
}

/// The `virtio_net_hdr` of one transmitted frame of `total` bytes in `segments`, from the
/// offload request alone (section 5.1.6.2): the frame's own bytes are neither read nor
/// changed. `num_buffers` (bytes 10..12) stays zero, as section 5.1.6.2.1 requires on
/// transmit.
fn tx_net_hdr(
    caps: &Capabilities,
    segments: &[TxSegment],
    offload: &TxOffload,
    total: u64,
) -> Result<[u8; NET_HDR_LEN]> {
    if let Some(ip) = offload.ipv4_header {
        return Err(DriverError::BadFrame(format!(
            "IPv4 header checksum offload requested (header at offset {ip}), but virtio-net has none (VIRTIO 1.2 section 5.1.6.2 offers L4 checksums and segmentation only; capabilities().ipv4_header_checksum is false): fill in the IPv4 header checksum before enqueueing"
        )));
    }
    let mut hdr = [0u8; NET_HDR_LEN];
    if let Some(c) = offload.l4_checksum {
        let offered = match c.protocol {
            L4Protocol::Tcp => caps.tcp_checksum,
            L4Protocol::Udp => caps.udp_checksum,
        };
        if !offered {
            return Err(DriverError::BadFrame(
                "L4 checksum offload requested but VIRTIO_NET_F_CSUM was not negotiated (see capabilities())".into(),
            ));
        }
        if c.field < c.start || c.field as u64 + 2 > total {
            return Err(DriverError::BadFrame(format!(
                "L4 checksum field at {} outside the L4 data ({}..{total})",
                c.field, c.start
            )));
        }
        // Section 5.1.6.2 item 2: the device sums from csum_start to the end of the packet
        // and stores the result csum_offset bytes further on.
        hdr[0] = HDR_F_NEEDS_CSUM;
        hdr[6..8].copy_from_slice(&c.start.to_le_bytes());
        hdr[8..10].copy_from_slice(&(c.field - c.start).to_le_bytes());
    }
    let Some(tso) = offload.tso else {
        if total > MAX_FRAME {
            return Err(DriverError::BadFrame(format!(
                "{total}-byte frame without TSO exceeds {MAX_FRAME}"
            )));
        }
        // Section 5.1.6.2.1: gso_type VIRTIO_NET_HDR_GSO_NONE; hdr_len and gso_size stay 0.
        hdr[1] = GSO_NONE;
        return Ok(hdr);
    };
    if caps.tso_max_frame.is_none() {
        return Err(DriverError::BadFrame(
            "TSO requested but VIRTIO_NET_F_HOST_TSO4 was not negotiated (see capabilities())"
                .into(),
        ));
    }
    if offload.ipv6_header.is_some() && !caps.tso_ipv6 {
        return Err(DriverError::BadFrame(
            "IPv6 TSO requested but VIRTIO_NET_F_HOST_TSO6 was not negotiated (see capabilities())"
                .into(),
        ));
    }
    // Section 5.1.6.2.1: with a gso_type other than GSO_NONE the driver MUST also set
    // NEEDS_CSUM; and TCPV4 segmentation is of TCP.
    let Some(c) = offload
        .l4_checksum
        .filter(|c| c.protocol == L4Protocol::Tcp)
    else {
        return Err(DriverError::BadFrame(
            "TSO needs a TCP l4_checksum request".into(),
        ));
    };
    let header_len = tso.header_len as u64;
    if tso.mss == 0 || header_len >= total || c.field as u64 + 2 > header_len {
        return Err(DriverError::BadFrame(format!(
            "TSO with MSS {} and header length {} (TCP checksum field at {}) for a {total}-byte frame",
            tso.mss, tso.header_len, c.field
        )));
    }
    // Every segment the device emits must be a legal Ethernet frame.
    if tso.header_len as usize + tso.mss as usize > caps.mtu + 14 {
        return Err(DriverError::BadFrame(format!(
            "TSO segments of {} header + {} MSS bytes exceed the {}-byte MTU",
            tso.header_len, tso.mss, caps.mtu
        )));
    }
    // The queue API's contract (the Intel drivers need it; virtio would not): a caller that
    // works here works on every NIC.
    if (segments[0].len as u64) < header_len {
        return Err(DriverError::BadFrame(
            "TSO headers must lie wholly in the first segment".into(),
        ));
    }
    if total > TSO_MAX_FRAME as u64 {
        return Err(DriverError::BadFrame(format!(
            "TSO frame of {total} bytes exceeds {TSO_MAX_FRAME}"
        )));
    }
    // Section 5.1.6.2 item 3: gso_type, hdr_len (at least the headers, TCP's included),
    // gso_size (the MSS).
    hdr[1] = if offload.ipv6_header.is_some() {
        GSO_TCPV6
    } else {
        GSO_TCPV4
    };
    hdr[2..4].copy_from_slice(&tso.header_len.to_le_bytes());
    hdr[4..6].copy_from_slice(&tso.mss.to_le_bytes());
    Ok(hdr)
}

/// Feature negotiation (section 3.1.1 steps 2-6, section 2.2): ACKNOWLEDGE, DRIVER, read the
/// offered bits, refuse without VERSION_1 or ACCESS_PLATFORM, take what we use, FEATURES_OK
/// and check that the device kept it. With `same`, insist on exactly those bits (re-init).
/// `extra`: further bits to take when offered (the multi-queue driver's MQ, CTRL_VQ, RSS).
/// Returns (offered, negotiated).
pub(super) fn negotiate(
    t: &VirtioPciTransport,
    config: &NicConfig,
    same: Option<u64>,
    extra: u64,
) -> Result<(u64, u64)> {
    t.add_status(DeviceStatus::ACKNOWLEDGE);
    t.add_status(DeviceStatus::DRIVER);
    let offered = t.device_features();
    if offered & f::F_VERSION_1 == 0 {
        t.fail();
        return Err(DriverError::MissingFeature(
            "VIRTIO_F_VERSION_1 (a legacy or transitional device; in QEMU use disable-legacy=on)",
        ));
    }
    if offered & f::F_ACCESS_PLATFORM == 0 {
        // Without it the device would use guest-physical addresses and bypass the IOMMU.
        t.fail();
        return Err(DriverError::NoAccessPlatform);
    }
    let mut want = f::F_VERSION_1 | f::F_ACCESS_PLATFORM | f::NET_F_MAC | f::NET_F_STATUS;
    // Indirect descriptors for TX (measured: see the module documentation).
    // `NicConfig::virtio_indirect` switches them off, for comparison.
    let indirect = config.virtio_indirect;
    if indirect {
        want |= f::F_INDIRECT_DESC;
    }
    // Packed virtqueues (section 2.8), only with indirect descriptors (every buffer is then
    // one descriptor). QEMU offers them with `packed=on`. `NicConfig::virtio_packed` off
    // keeps split queues, for comparison.
    if indirect && offered & f::F_INDIRECT_DESC != 0 && config.virtio_packed {
        want |= f::F_RING_PACKED;
    }
    if config.offloads.l4_checksum {
        want |= f::NET_F_CSUM;
        // Section 5.1.3.1: HOST_TSO4 and HOST_TSO6 require CSUM.
        if config.offloads.tso && offered & f::NET_F_CSUM != 0 {
            want |= f::NET_F_HOST_TSO4 | f::NET_F_HOST_TSO6;
        }
    }
    let taken = match same {
        Some(bits) if offered & bits != bits => {
            t.fail();
            return Err(DriverError::Device(format!(
                "after reset the device no longer offers {}",
                f::names(bits & !offered).join(",")
            )));
        }
        Some(bits) => bits,
        None => {
            let mut taken = offered & (want | extra);
            // Section 5.1.3.1: MQ and RSS require CTRL_VQ (a device offering them without it
            // is broken; use one queue pair then).
            if taken & f::NET_F_CTRL_VQ == 0 {
                taken &= !(f::NET_F_MQ | f::NET_F_RSS);
            }
            taken
        }
    };
    if same.is_none() {
        tracing::info!(
            offered = %f::names(offered).join(","),
            taken = %f::names(taken).join(","),
            not_taken = %f::names(offered & !taken).join(","),
            "virtio-net features"
        );
    }
    t.set_driver_features(taken);
    t.add_status(DeviceStatus::FEATURES_OK);
    // Section 3.1.1 step 6: re-read device status to ensure FEATURES_OK is still set.
    if t.status() & DeviceStatus::FEATURES_OK == 0 {
        t.fail();
        return Err(DriverError::Device(format!(
            "virtio-net did not accept features {}",
            f::names(taken).join(",")
        )));
    }
    Ok((offered, taken))
}

impl NetQueue for VirtioNet {
    fn mac_address(&self) -> MacAddress {
        self.mac
    }

    fn dma(&self) -> &Arc<DmaSpace> {
        self.pci.dma()
    }

    fn capabilities(&self) -> Capabilities {
        self.q.caps()
    }

    fn link_up(&mut self) -> bool {
        self.check_status();
        if self.dead.is_some() {
            return false;
        }
        link_status(&self.transport, self.negotiated)
    }

    fn tx_capacity(&self, segments: usize) -> usize {
        if self.dead.is_some() {
            return 0;
        }
        self.q.tx_capacity(segments)
    }

    fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> Result<()> {
        if let Some(why) = &self.dead {
            return Err(DriverError::Device(why.clone()));
        }
        self.q.tx_enqueue(frame)
    }

    fn tx_flush(&mut self) {
        #[cfg(feature = "fault-injection")]
        if !self.inject_before_doorbell() {
            self.q.tx.vq.publish();
            return;
        }
        self.q.tx_publish(&self.transport);
    }

    fn tx_reap(&mut self, done: &mut dyn FnMut(TxToken)) -> Result<usize> {
        let mut n = 0;
        while let Some(token) = self.lost.pop_front() {
            done(token);
            n += 1;
        }
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        if let Some(why) = &self.dead {
            return Err(DriverError::Device(why.clone()));
        }
        let completed = match self.q.tx_complete(done) {
            Ok(completed) => completed,
            Err(id) => {
                self.recover(|lost| DriverError::DeviceReset {
                    reason: format!(
                        "virtio-net returned descriptor {id}, which is not an outstanding TX chain"
                    ),
                    lost,
                });
                return self.tx_reap(done).map(|m| m + n);
            }
        };
        n += completed;
        let Some(stalled) = self.q.tx_stalled(completed) else {
            return Ok(n);
        };
        self.check_status();
        if self.pending_error.is_none()
            && self.dead.is_none()
            && stalled > self.config.tx_hang_timeout
        {
            let ms = stalled.as_millis() as u64;
            self.recover(|lost| DriverError::TxHang { ms, lost });
        }
        if self.pending_error.is_some() || self.dead.is_some() || !self.lost.is_empty() {
            // A reset happened: hand back its tokens and report it (or the dead device).
            return self.tx_reap(done).map(|m| m + n);
        }
        Ok(n)
    }

    fn rx_next(&mut self) -> Option<RxBuffer> {
        if self.dead.is_some() {
            return None;
        }
        match self.q.rx_take() {
            Ok(Some(buffer)) => Some(buffer),
            Ok(None) => {
                self.check_status();
                None
            }
            Err(id) => {
                self.recover(|lost| DriverError::DeviceReset {
                    reason: format!("virtio-net returned RX descriptor {id}, which was not posted"),
                    lost,
                });
                None
            }
        }
    }

    fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        self.q.rx_read(buffer, out)
    }

    fn rx_recycle(&mut self, buffer: RxBuffer) {
        self.q.rx_recycle(buffer)
    }

    fn rx_flush(&mut self) {
        let _ = self.q.rx_flush(&self.transport);
    }

    fn stats(&mut self) -> DeviceStats {
        self.q.stats
    }
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        out.debug_struct("VirtioNet")
            .field("pci", &self.pci.address().to_string())
            .field("mac", &self.mac)
            .field("negotiated", &f::names(self.negotiated).join(","))
            .field("rx_queue", &self.q.rx.vq.size())
            .field("tx_queue", &self.q.tx.vq.size())
            .field("in_flight", &self.q.tx_outstanding())
            .field("dead", &self.dead)
            .finish()
    }
}

impl Interruptible for VirtioNet {
    fn irq_mode(&self) -> Option<IrqMode> {
        self.irq.as_ref().map(DeviceIrq::mode)
    }

    fn irq_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.irq.as_ref().map(DeviceIrq::fds).unwrap_or_default()
    }

    fn irq_arm(&mut self) {
        if self.irq.is_some() {
            self.q.set_interrupts(true);
        }
    }

    fn irq_disarm(&mut self) -> u64 {
        let Some(irq) = &mut self.irq else {
            return 0;
        };
        self.q.set_interrupts(false);
        if irq.mode() == IrqMode::Intx {
            // Reading the ISR status clears it and deasserts the line (section 4.1.4.5.1)
            // before VFIO unmasks it.
            let _ = self.transport.isr_status();
        }
        let n = irq.drain();
        irq.unmask();
        n
    }

    fn irq_count(&self) -> u64 {
        self.irq.as_ref().map_or(0, DeviceIrq::count)
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        // Stop all DMA before the rings and buffers are unmapped and freed.
        if let Err(e) = self.transport.reset() {
            tracing::error!("virtio-net: reset on close failed: {e}");
        }
    }
}

/// The receive queue's used-ring reading without a device, for the fuzz targets (`fuzz/`):
/// the caller plays the device, writing the used ring (split) or used descriptors (packed)
/// and the buffers through the DMA space by IOVA, and calls what `rx_next`, `rx_read`,
/// `rx_recycle` and `rx_flush` call. A bad buffer id resets the queue as `recover` does.
#[cfg(feature = "fuzzing")]
pub struct RxQueueHarness {
    rx: Rx,
    pub stats: DeviceStats,
    /// Queue resets for a device that returned a buffer id not outstanding.
    pub resets: u64,
}

#[cfg(feature = "fuzzing")]
impl RxQueueHarness {
    /// A queue of `size` (a power of two) buffers of `buffer_size` bytes, all posted.
    pub fn new(dma: &Arc<DmaSpace>, size: u16, buffer_size: usize, packed: bool) -> Result<Self> {
        let mut rx = Rx {
            vq: Ring::new(dma, RX_QUEUE, size, packed, DmaAccess::DeviceReadsWrites)?,
            buffers: dma.allocate(size as usize * buffer_size, DmaAccess::DeviceReadsWrites)?,
            buffer_size,
            posted: vec![false; size as usize],
            lent: vec![false; size as usize],
            recycled: Vec::new(),
        };
        rx.post_all();
        Ok(Self {
            rx,
            stats: DeviceStats::default(),
            resets: 0,
        })
    }
    /// `queue_desc`, `queue_driver`, `queue_device` (section 4.1.4.3).
    pub fn areas(&self) -> (crate::Iova, crate::Iova, crate::Iova) {
        self.rx.vq.areas()
    }
    pub fn buffers_iova(&self) -> crate::Iova {
        self.rx.buffers.iova()
    }
    pub fn size(&self) -> u16 {
        self.rx.vq.size()
    }
    pub fn buffer_size(&self) -> usize {
        self.rx.buffer_size
    }
    /// As `NetQueue::rx_next` (a bad id: the queue is reset and restarted, lent buffers
    /// stay lent).
    pub fn rx_next(&mut self) -> Option<RxBuffer> {
        match self.rx.take(&mut self.stats) {
            Ok(buffer) => buffer,
            Err(_) => {
                self.resets += 1;
                self.rx.vq.reset();
                self.rx.post_all();
                None
            }
        }
    }
    pub fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        self.rx.read(buffer, out)
    }
    pub fn rx_recycle(&mut self, buffer: RxBuffer) {
        self.rx.recycle(buffer)
    }
    /// As `rx_flush` without the doorbell.
    pub fn rx_flush(&mut self) {
        self.rx.repost();
    }
    /// Every buffer is in exactly one place: posted, lent, or recycled. Panics otherwise.
    pub fn check_accounting(&self) {
        let mut seen = vec![0u32; self.rx.posted.len()];
        for (i, (&posted, &lent)) in self.rx.posted.iter().zip(&self.rx.lent).enumerate() {
            seen[i] += posted as u32 + lent as u32;
        }
        for &slot in &self.rx.recycled {
            seen[slot as usize] += 1;
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "buffers lost or duplicated: {seen:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{L4Checksum, Tso};

    /// What `open` reports with CSUM and HOST_TSO4 negotiated.
    fn caps() -> Capabilities {
        Capabilities {
            tso_ipv6: false,
            ipv4_header_checksum: false,
            tcp_checksum: true,
            udp_checksum: true,
            tso_max_frame: Some(TSO_MAX_FRAME),
            tso_headers: TsoHeaders::WholePacket,
            max_tx_segments: MAX_TX_SEGMENTS,
            mtu: 1500,
            tls_tx: None,
        }
    }

    fn segs(lens: &[u32]) -> Vec<TxSegment> {
        lens.iter()
            .enumerate()
            .map(|(i, &len)| TxSegment {
                iova: 0x10_0000 * (i as u64 + 1),
                len,
            })
            .collect()
    }

    fn tcp_csum() -> Option<L4Checksum> {
        Some(L4Checksum {
            protocol: L4Protocol::Tcp,
            start: 34,
            field: 50,
        })
    }

    fn tso(mss: u16) -> TxOffload {
        TxOffload {
            ipv6_header: None,
            ipv4_header: None,
            l4_checksum: tcp_csum(),
            tso: Some(Tso {
                mss,
                header_len: 54,
            }),
        }
    }

    /// (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)
    fn fields(h: [u8; NET_HDR_LEN]) -> (u8, u8, u16, u16, u16, u16, u16) {
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        (h[0], h[1], le(2), le(4), le(6), le(8), le(10))
    }

    fn tx(size: u16) -> Tx {
        let dma = crate::dma::test_space();
        let n = size as usize;
        Tx::new(
            Ring::new(&dma, TX_QUEUE, size, false, DmaAccess::DeviceReadsWrites).unwrap(),
            dma.allocate(n * TX_HDR_SLOT, DmaAccess::DeviceReads)
                .unwrap(),
            None,
        )
    }

    #[test]
    fn a_reset_drops_every_frame_and_returns_its_token_in_submission_order() {
        let mut tx = tx(8);
        // Five one-descriptor frames, submitted in the order the free list hands out heads.
        for token in [100, 101, 102, 103, 104] {
            let head = tx.free.pop().unwrap();
            let h = head as usize;
            tx.chain_len[h] = 1;
            tx.token[h] = token;
            tx.in_flight[h] = true;
            tx.order.push_back(head);
        }
        // The device completed the second out of order (not yet handed back: the first is
        // still in flight); the last was never published. All are dropped alike.
        let second = tx.order[1] as usize;
        tx.done[second] = true;
        let mut lost = VecDeque::from([7]); // from an earlier reset, not yet handed back
        assert_eq!(tx.drop_all(&mut lost), 5);
        assert_eq!(Vec::from(lost), [7, 100, 101, 102, 103, 104]);
        assert!(tx.order.is_empty());
        assert!(tx.in_flight.iter().chain(&tx.done).all(|&b| !b));
        let mut free = tx.free.clone();
        free.sort();
        assert_eq!(
            free,
            (0..8).collect::<Vec<u16>>(),
            "every descriptor free again"
        );
    }

    #[test]
    fn two_resets_before_a_report_become_one_report_with_every_lost_frame() {
        let hang = DriverError::TxHang { ms: 1200, lost: 3 }.with_more_lost(2);
        assert!(matches!(hang, DriverError::TxHang { ms: 1200, lost: 5 }));
        assert!(hang.is_recovered());
        let reset = DriverError::DeviceReset {
            reason: "DEVICE_NEEDS_RESET".into(),
            lost: 0,
        }
        .with_more_lost(4);
        assert!(matches!(reset, DriverError::DeviceReset { lost: 4, .. }));
        let other = DriverError::Device("gone".into()).with_more_lost(1);
        assert!(!other.is_recovered());
    }

    #[test]
    fn plain_frames_get_an_all_zero_header() {
        let h = tx_net_hdr(&caps(), &segs(&[60]), &TxOffload::default(), 60).unwrap();
        assert_eq!(h, [0; NET_HDR_LEN]);
        let err = tx_net_hdr(&caps(), &segs(&[1000, 515]), &TxOffload::default(), 1515);
        assert!(
            matches!(err, Err(DriverError::BadFrame(_))),
            "1515 bytes without TSO"
        );
    }

    #[test]
    fn l4_checksum_becomes_needs_csum_with_start_and_offset() {
        // Section 5.1.6.2's own example: TCP after 14 + 20 header bytes.
        let offload = TxOffload {
            l4_checksum: tcp_csum(),
            ..TxOffload::default()
        };
        let h = tx_net_hdr(&caps(), &segs(&[54, 500]), &offload, 554).unwrap();
        assert_eq!(fields(h), (HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 16, 0));
        let udp = TxOffload {
            l4_checksum: Some(L4Checksum {
                protocol: L4Protocol::Udp,
                start: 34,
                field: 40,
            }),
            ..TxOffload::default()
        };
        let h = tx_net_hdr(&caps(), &segs(&[42, 8]), &udp, 50).unwrap();
        assert_eq!(fields(h), (HDR_F_NEEDS_CSUM, GSO_NONE, 0, 0, 34, 6, 0));
    }

    #[test]
    fn ipv6_tso_becomes_gso_tcpv6_only_with_host_tso6() {
        let v6 = TxOffload {
            ipv6_header: Some(14),
            l4_checksum: Some(L4Checksum {
                protocol: L4Protocol::Tcp,
                start: 54,
                field: 70,
            }),
            tso: Some(Tso {
                mss: 1440,
                header_len: 74,
            }),
            ..TxOffload::default()
        };
        let with_tso6 = Capabilities {
            tso_ipv6: true,
            ..caps()
        };
        let total = 74 + 57600;
        let h = tx_net_hdr(&with_tso6, &segs(&[74, 57600]), &v6, total).unwrap();
        assert_eq!(
            fields(h),
            (HDR_F_NEEDS_CSUM, GSO_TCPV6, 74, 1440, 54, 16, 0)
        );
        assert!(
            tx_net_hdr(&caps(), &segs(&[74, 57600]), &v6, total).is_err(),
            "HOST_TSO6 not negotiated"
        );
    }

    #[test]
    fn tso_becomes_gso_tcpv4_with_hdr_len_and_gso_size() {
        let total = 54 + 61440;
        let h = tx_net_hdr(&caps(), &segs(&[54, 30720, 30720]), &tso(1448), total).unwrap();
        assert_eq!(
            fields(h),
            (HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16, 0)
        );
        // Headers followed by payload in the same segment are fine too.
        tx_net_hdr(&caps(), &segs(&[1000, 60494]), &tso(1460), 61494).unwrap();
    }

    #[test]
    fn ipv4_header_checksum_requests_are_refused() {
        let offload = TxOffload {
            ipv4_header: Some(14),
            ..TxOffload::default()
        };
        let Err(DriverError::BadFrame(why)) = tx_net_hdr(&caps(), &segs(&[60]), &offload, 60)
        else {
            panic!("accepted an IPv4 header checksum request");
        };
        assert!(
            why.contains("no") && why.contains("IPv4 header checksum"),
            "{why}"
        );
        // With TSO just the same: the WholePacket convention has the caller fill it in.
        let with_tso = TxOffload {
            ipv4_header: Some(14),
            ..tso(1448)
        };
        assert!(tx_net_hdr(&caps(), &segs(&[54, 10000]), &with_tso, 10054).is_err());
    }

    #[test]
    fn malformed_requests_are_refused_without_reading_the_frame() {
        let bad = |offload: TxOffload, lens: &[u32], caps: Capabilities| {
            let total = lens.iter().map(|&l| l as u64).sum();
            matches!(
                tx_net_hdr(&caps, &segs(lens), &offload, total),
                Err(DriverError::BadFrame(_))
            )
        };
        let tcp_checksum_at = |start, field| TxOffload {
            l4_checksum: Some(L4Checksum {
                protocol: L4Protocol::Tcp,
                start,
                field,
            }),
            ..TxOffload::default()
        };
        assert!(
            bad(tcp_checksum_at(34, 59), &[60], caps()),
            "field past the end"
        );
        assert!(
            bad(tcp_checksum_at(34, 20), &[60], caps()),
            "field before start"
        );
        let no_csum = Capabilities {
            tcp_checksum: false,
            udp_checksum: false,
            tso_max_frame: None,
            ..caps()
        };
        let csum_only = TxOffload {
            l4_checksum: tcp_csum(),
            ..TxOffload::default()
        };
        assert!(bad(csum_only, &[60], no_csum), "CSUM not negotiated");
        let no_tso = Capabilities {
            tso_max_frame: None,
            ..caps()
        };
        assert!(
            bad(tso(1448), &[54, 10000], no_tso),
            "HOST_TSO4 not negotiated"
        );
        let tso_without_csum = TxOffload {
            l4_checksum: None,
            ..tso(1448)
        };
        assert!(bad(tso_without_csum, &[54, 10000], caps()), "no checksum");
        let tso_udp = TxOffload {
            l4_checksum: Some(L4Checksum {
                protocol: L4Protocol::Udp,
                start: 34,
                field: 40,
            }),
            ..tso(1448)
        };
        assert!(bad(tso_udp, &[54, 10000], caps()), "TSO of UDP");
        assert!(bad(tso(0), &[54, 10000], caps()), "MSS 0");
        assert!(
            bad(tso(1461), &[54, 10000], caps()),
            "segments above the MTU"
        );
        assert!(bad(tso(1448), &[40, 10014], caps()), "headers split");
        assert!(bad(tso(1448), &[54], caps()), "no payload");
        let tcp_field_outside_headers = TxOffload {
            tso: Some(Tso {
                mss: 1448,
                header_len: 50,
            }),
            ..tso(1448)
        };
        assert!(
            bad(tcp_field_outside_headers, &[54, 10000], caps()),
            "checksum field beyond hdr_len"
        );
        assert!(
            bad(tso(1448), &[54, 65535], caps()),
            "larger than one IPv4 datagram"
        );
    }
}
