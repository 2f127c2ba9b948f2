//! Intel 8254x (82540EM, 82545EM) and 82574L driver, polling mode.
//!
//! [`E1000`] drives one queue pair (every model). The 82574L's two queue pairs with RSS, one
//! [`multiqueue::E1000Queue`] per pair, are in [`multiqueue`]; both use the same ring code
//! (`TxRing`, `RxRing` here: enqueue, doorbells, completion, the watchdog's ring reset,
//! receive and its integrity check), with legacy receive descriptors for one queue and the
//! 82574's extended ones (which carry the RSS hash) for two.
//!
//! References: "PCI/PCI-X Family of Gigabit Ethernet Controllers Software Developer's Manual"
//! (8254x SDM, 317453006EN) and the "82574 GbE Controller Datasheet" (82574 DS). Register
//! citations are on the constants in [`regs`], descriptor citations in [`desc`].
//!
//! # What the driver does
//! - **Initialisation** ([`E1000::open`]): interrupts masked, receiver and transmitter
//!   stopped, global reset (CTRL.RST), interrupts masked again, link set up (CTRL.SLU and
//!   ASDE; SDM 14.3), the 82574's required bits (GCR, GCR2, CTRL_EXT, TARC0, TXDCTL;
//!   82574 DS 4.6), the station address in RAL0/RAH0, the other address filters and the
//!   multicast table cleared, receive and transmit rings programmed (SDM 14.4, 14.5), the
//!   receiver enabled **once** (RCTL is never written again), then a bounded wait for
//!   STATUS.LU.
//! - **Transmit**: frames without offloads use legacy descriptors (SDM 3.3.3); frames with
//!   offloads use a TCP/IP context descriptor (SDM 3.3.6) followed by TCP/IP data
//!   descriptors (SDM 3.3.7). Every frame may span many descriptors; EOP and RS are set on the
//!   last one only, IFCS on all. The checksum context is written only when its parameters
//!   change; a TSO context is written for every TSO frame (its PAYLEN is per frame) and
//!   invalidates the cached checksum context. Descriptors point straight at the caller's
//!   IOVAs: no copy. A segment is split where its memory's IOMMU pages end (4 KiB, or 2 MiB in regions
//!   backed by huge pages) and at 16288 bytes ([`desc::SPLIT_BOUNDARY`]).
//! - **Completion**: the DD bit of each frame's last descriptor (SDM 3.3.3.2); TDH is never
//!   used for that (SDM 13.4.39 says it is unreliable).
//! - **TX-hang watchdog** in [`NetQueue::tx_reap`]: when frames handed to the device make no
//!   progress for [`NicConfig::tx_hang_timeout`] while the link is up, the transmitter is
//!   stopped (TCTL.EN = 0), the ring is rewound (TDH = TDT = 0 is allowed while TCTL.EN is
//!   0, SDM 13.4.39), every outstanding token is returned, and [`DriverError::TxHang`] is
//!   reported. This is what a blocked descriptor fetch or completion write-back looks like
//!   (tested with `FaultInjection::TxRingReadOnly`). A blocked *data* read is invisible
//!   to the driver: real controllers may abort or hang (the watchdog catches that), QEMU's
//!   models send zeroes in place of the unreadable bytes and complete the frame.
//! - **Receive**: legacy descriptors (SDM 3.2.3) into driver-owned buffers of
//!   [`NicConfig::rx_buffer_size`]; RCTL.SECRC strips the FCS, RCTL.BAM accepts broadcast, RCTL.MPE multicast
//!   (IPv6 neighbour discovery).
//!   Buffers are lent to the caller and recycled; [`NetQueue::rx_flush`] re-posts them with
//!   one RDT write. Before posting, the driver clears the first 8 bytes of each buffer; a
//!   completed frame whose destination address would not have passed the device's own
//!   filter (our address or multicast) cannot have been written by the device — typically
//!   because the IOMMU blocked the write — and is dropped and counted in
//!   [`DeviceStats::rx_errors`].
//! - **Statistics**: the clear-on-read counters of SDM 13.7 are accumulated into
//!   [`DeviceStats`]; byte counts exclude the 4-byte FCS the device counts.
//!
//! # Offload contract details (beyond [`crate::queue`])
//! - The IPv4 header checksum field must be **zero** when [`TxOffload::ipv4_header`](crate::queue::TxOffload::ipv4_header) is
//!   requested. The header is taken to end where the L4 header starts; without an L4 request
//!   a 20-byte header is assumed.
//! - Offsets of the IPv4 header, the L4 header and the L4 checksum field must be below 256
//!   (the context descriptor fields are 8 bits), and [`Tso::header_len`](crate::queue::Tso::header_len) below 256.
//!
//! # Tested
//! `hw-tests/tests/nic.rs` runs the driver in QEMU 7.2 guests (e1000 = 82540EM, e1000e =
//! 82574L) behind the emulated VT-d IOMMU: multi-segment frames byte-exact on the wire,
//! offloaded IPv4/TCP/UDP checksums, 60 KiB TSO (MSS segments on the e1000 model; QEMU 7.2's
//! e1000e model emits IPv4 fragments instead, a model bug), reception from the host, and
//! IOMMU refusals (unmapped TX segment, read-only RX buffers, read-only TX ring -> watchdog).
//! `hw-tests/tests/faults.rs` stops the transmitter mid-stream (`driver::faults`, feature
//! `fault-injection`): the watchdog must hand back every token and report the hang, and a
//! server download across it must arrive byte-exact.
//! `scripts/bench-nic` measures TX throughput.
//!
//! # No `unsafe`
//! Register access goes through [`Mmio`] and descriptor/buffer access through [`DmaRegion`],
//! both bounds-checked and volatile; received frames are copied out with volatile reads
//! ([`NetQueue::rx_read`]), never lent as a slice of device-writable memory.

pub mod desc;
pub mod multiqueue;
pub mod regs;

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::anynic::{NicConfig, OffloadSwitches};
use crate::dma::{DmaAccess, DmaRegion, DmaSpace, LargePageRanges};
use crate::error::{DriverError, Result};
use crate::irq::{DeviceIrq, Interruptible, IrqMode};
use crate::mmio::Mmio;
use crate::nic::NicModel;
use crate::queue::{
    Capabilities, DeviceStats, MacAddress, NetQueue, RxBuffer, TsoHeaders, TxFrame, TxSegment,
    TxToken,
};
use crate::vfio::VfioPci;

use desc::{Context, RxFormat, DESC_LEN};

/// The station address from Receive Address 0 (RAL0/RAH0), which the controller loads from
/// the EEPROM at reset (SDM 13.5.2, 13.5.3; 82574 DS 10.2).
pub fn read_mac_from_receive_address(bar0: &Mmio) -> Option<MacAddress> {
    let low = bar0.read32(regs::RAL0);
    let high = bar0.read32(regs::RAH0);
    if high & regs::RAH_AV == 0 {
        return None;
    }
    let l = low.to_le_bytes();
    let h = high.to_le_bytes();
    Some(MacAddress([l[0], l[1], l[2], l[3], h[0], h[1]]))
}

/// The largest TSO frame accepted: one IPv4 datagram (65535 bytes) plus the Ethernet
/// header. PAYLEN itself has 20 bits (SDM 3.3.6), but the prototype header's IPv4 total
/// length must stay meaningful.
pub const TSO_MAX_FRAME: u32 = 65535 + 14;
/// Data descriptors one frame may use (after 4 KiB splitting).
pub const MAX_DESCS_PER_FRAME: usize = 64;
/// Segments one frame may have ([`Capabilities::max_tx_segments`]).
pub const MAX_TX_SEGMENTS: usize = 32;
/// Ethernet MTU (largest IP packet) without jumbo frames (RCTL.LPE is left off).
pub const MTU: usize = 1500;

/// A frame handed to the ring, in submission order.
#[derive(Debug)]
struct RingFrame {
    /// Index of its last descriptor (the one with EOP and RS).
    eop: u16,
    /// Descriptors it occupies (context descriptor included).
    descs: u16,
    token: TxToken,
    /// What it becomes on the wire: frames (TSO segments) and bytes without FCS.
    wire_frames: u32,
    wire_bytes: u64,
}

/// Frames and bytes (FCS excluded) that a frame of `frame_len` bytes becomes on the wire:
/// one frame padded to 60 bytes (TCTL.PSP), or for TSO one segment per `mss` bytes of
/// payload, each carrying the `header_len` bytes of headers (SDM 3.5).
fn wire_size(frame_len: u64, tso: Option<crate::queue::Tso>) -> (u32, u64) {
    match tso {
        Some(t) if t.mss > 0 => {
            let payload = frame_len.saturating_sub(t.header_len as u64);
            let segments = payload.div_ceil(t.mss as u64).max(1);
            (segments as u32, payload + segments * t.header_len as u64)
        }
        _ => (1, frame_len.max(60)),
    }
}

/// One transmit ring (queue 0 of any model, or queue 1 of the 82574) and the code that fills
/// it: the same for the single-queue driver and each pair of the multi-queue driver.
struct TxRing {
    ring: Arc<DmaRegion>,
    size: u16,
    /// Next descriptor software fills.
    tail: u16,
    /// Descriptors in use (written and not yet reclaimed).
    used: u16,
    frames: VecDeque<RingFrame>,
    /// Frames at the back of `frames` whose descriptors the device has not been told about.
    unflushed: usize,
    /// The checksum (non-TSO) context the device holds, if known.
    csum_context: Option<Context>,
    /// Last time the device showed progress (or the ring went from idle to busy).
    last_progress: Instant,
    /// Wire frames and bytes of the frames completed so far ([`wire_size`]).
    completed_frames: u64,
    completed_bytes: u64,
    /// Which IOVAs lie in 2 MiB pages, so descriptors are cut only where the memory's
    /// IOMMU pages end ([`desc::SPLIT_BOUNDARY`]).
    pages: LargePageRanges,
}

impl TxRing {
    /// An empty ring of `size` descriptors in `ring` (zeroed).
    fn new(ring: Arc<DmaRegion>, size: u16) -> TxRing {
        ring.zero();
        let pages = LargePageRanges::new(Arc::clone(ring.space()));
        TxRing {
            pages,
            ring,
            size,
            tail: 0,
            used: 0,
            frames: VecDeque::with_capacity(size as usize),
            unflushed: 0,
            csum_context: None,
            last_progress: Instant::now(),
            completed_frames: 0,
            completed_bytes: 0,
        }
    }

    fn free(&self) -> usize {
        // One descriptor stays unused so that TDH == TDT always means "empty" (SDM 3.4).
        self.size as usize - 1 - self.used as usize
    }

    /// Hand back the tokens of completed frames, oldest first: a frame is complete when the
    /// device has set DD in its last descriptor (SDM 3.3.3.2; the RS bit asks for that
    /// write-back). Frames complete in ring order, so the first incomplete one ends the scan.
    /// Progress (at `now`) restarts the watchdog's clock.
    fn reap(&mut self, done: &mut dyn FnMut(TxToken), now: Instant) -> usize {
        let mut n = 0;
        while self.frames.len() > self.unflushed {
            let front = &self.frames[0];
            let word1: u64 = self.ring.read_volatile(front.eop as usize * DESC_LEN + 8);
            if word1 & desc::TX_STA_DD == 0 {
                break;
            }
            fence(Ordering::Acquire);
            let f = self.frames.pop_front().expect("checked non-empty");
            self.used -= f.descs;
            self.completed_frames += f.wire_frames as u64;
            self.completed_bytes += f.wire_bytes;
            done(f.token);
            n += 1;
        }
        if n > 0 {
            self.last_progress = now;
        }
        n
    }

    /// Whether the device has been told about no frame that is not yet handed back (then
    /// there is nothing to reap and no watchdog to run, and no clock to read per poll).
    fn nothing_flushed(&self) -> bool {
        self.frames.len() == self.unflushed
    }

    /// Wire frames and bytes of every frame the device has completed, reaped or not (the
    /// not yet reaped ones found by their DD bit, as [`TxRing::reap`] finds them, without
    /// handing them back).
    fn completed(&self) -> (u64, u64) {
        let (mut frames, mut bytes) = (self.completed_frames, self.completed_bytes);
        let flushed = self.frames.len() - self.unflushed;
        for f in self.frames.iter().take(flushed) {
            let word1: u64 = self.ring.read_volatile(f.eop as usize * DESC_LEN + 8);
            if word1 & desc::TX_STA_DD == 0 {
                break;
            }
            frames += f.wire_frames as u64;
            bytes += f.wire_bytes;
        }
        (frames, bytes)
    }

    /// The watchdog's verdict: how long frames the device was told about (flushed) have
    /// made no progress, if that is longer than `timeout`. Frames not yet flushed do not
    /// count: the device knows nothing of them.
    fn stalled(&self, now: Instant, timeout: Duration) -> Option<Duration> {
        let outstanding = self.frames.len() - self.unflushed;
        let stalled = now.duration_since(self.last_progress);
        (outstanding > 0 && stalled > timeout).then_some(stalled)
    }

    /// Forget every frame on the ring (the transmitter is stopped): hand each token to `done`,
    /// oldest first, flushed or not, and start again with an empty ring at descriptor 0 (the
    /// caller rewinds TDH and TDT to match). Returns how many frames were dropped.
    fn rewind(&mut self, done: &mut dyn FnMut(TxToken)) -> usize {
        let lost = self.frames.len();
        for f in self.frames.drain(..) {
            done(f.token);
        }
        self.ring.zero();
        self.tail = 0;
        self.used = 0;
        self.unflushed = 0;
        self.csum_context = None;
        lost
    }

    /// Write one descriptor (its two 64-bit words) at the tail.
    fn write(&mut self, word0: u64, word1: u64) {
        write_desc(
            &self.ring,
            self.size,
            &mut self.tail,
            &mut self.used,
            [word0, word1],
        );
    }

    /// Frames of `segments` segments that fit now (see [`NetQueue::tx_capacity`]).
    fn capacity(&self, segments: usize) -> usize {
        self.free() / (2 * segments.max(1) + 1)
    }

    /// Place `frame` on the ring without telling the device ([`NetQueue::tx_enqueue`]).
    /// `offloads` are the ones the configuration allows, `model` the controller.
    fn enqueue(
        &mut self,
        frame: TxFrame<'_>,
        offloads: &OffloadSwitches,
        model: NicModel,
    ) -> Result<()> {
        let (segments, offload, token) = (frame.segments, frame.offload, frame.token);
        if !frame.tls.is_empty() {
            // It would put the plaintext on the wire.
            return Err(DriverError::BadFrame("no inline TLS engine".into()));
        }
        if segments.is_empty() || segments.len() > MAX_TX_SEGMENTS {
            return Err(DriverError::BadFrame(format!(
                "{} segments (1..={MAX_TX_SEGMENTS} allowed)",
                segments.len()
            )));
        }
        let frame_len: u64 = segments.iter().map(|s| s.len as u64).sum();
        let limit = if offload.tso.is_some() {
            TSO_MAX_FRAME as u64
        } else {
            MTU as u64 + 14
        };
        if frame_len == 0 || frame_len > limit {
            return Err(DriverError::BadFrame(format!(
                "frame of {frame_len} bytes (1..={limit} allowed)"
            )));
        }
        let o = offloads;
        if (offload.ipv4_header.is_some() && !o.ipv4_header_checksum)
            || (offload.l4_checksum.is_some() && !o.l4_checksum)
            || (offload.tso.is_some() && !o.tso)
            || (offload.tso.is_some() && offload.ipv6_header.is_some() && !tso_ipv6(model))
        {
            return Err(DriverError::BadFrame(
                "offload requested that NicConfig switched off".into(),
            ));
        }
        let plan = desc::plan_offload(offload, frame_len as u32, MTU)?;
        if let Some(tso) = offload.tso {
            if (segments[0].len as u64) < tso.header_len as u64 {
                return Err(DriverError::BadFrame(
                    "TSO headers must lie wholly in the first segment".into(),
                ));
            }
        }
        self.pages.refresh();
        let data_descs = descriptors_needed(segments, &self.pages);
        if data_descs > MAX_DESCS_PER_FRAME {
            return Err(DriverError::BadFrame(format!(
                "frame needs {data_descs} descriptors (at most {MAX_DESCS_PER_FRAME})"
            )));
        }
        let context = plan
            .map(|p| p.context)
            .filter(|c| c.is_tso() || self.csum_context != Some(*c));
        let needed = data_descs + context.is_some() as usize;
        if needed > self.free() {
            return Err(DriverError::TxRingFull);
        }

        if let Some(c) = context {
            let [w0, w1] = c.words();
            self.write(w0, w1);
            // A TSO context may replace the checksum context (the 82574 holds one context).
            self.csum_context = if c.is_tso() { None } else { Some(c) };
        }
        let (dcmd_extra, popts) = match plan {
            Some(p) if p.context.is_tso() => (desc::DCMD_TSE, p.popts),
            Some(p) => (0, p.popts),
            None => (0, 0),
        };
        let mut remaining = data_descs;
        for s in segments {
            let page_size_at = |iova| self.pages.page_size_at(iova);
            desc::split_points(s.iova, s.len as u64, page_size_at, |iova, len| {
                remaining -= 1;
                let last = remaining == 0;
                let mut cmd = desc::CMD_IFCS;
                if last {
                    cmd |= desc::CMD_EOP | desc::CMD_RS;
                }
                let word1 = if plan.is_some() {
                    desc::data_tx(len as u32, cmd | dcmd_extra, popts)
                } else {
                    desc::legacy_tx(len as u16, cmd)
                };
                // By fields, not `self.write`: `page_size_at` borrows `self.pages`.
                write_desc(
                    &self.ring,
                    self.size,
                    &mut self.tail,
                    &mut self.used,
                    [iova, word1],
                );
            });
        }
        let eop = (self.tail + self.size - 1) % self.size;
        let (wire_frames, wire_bytes) = wire_size(frame_len, offload.tso);
        self.frames.push_back(RingFrame {
            eop,
            descs: needed as u16,
            token,
            wire_frames,
            wire_bytes,
        });
        self.unflushed += 1;
        Ok(())
    }

    /// Whether there are frames to tell the device about; if the ring was idle, the
    /// watchdog measures from now.
    fn begin_flush(&mut self) -> bool {
        if self.unflushed == 0 {
            return false;
        }
        if self.frames.len() == self.unflushed {
            self.last_progress = Instant::now();
        }
        true
    }

    /// The doorbell: the new tail to `tdt` (after [`TxRing::begin_flush`]).
    fn ring_doorbell(&mut self, bar0: &Mmio, tdt: usize) {
        // Descriptors must be visible before the device sees the new tail.
        fence(Ordering::SeqCst);
        bar0.write32(tdt, self.tail as u32);
        self.unflushed = 0;
    }

    /// The TX-hang recovery for the ring whose head and tail registers are `tdh`/`tdt`:
    /// stop the transmitter, rewind the ring, give every outstanding token back, start the
    /// transmitter again. Returns how many frames were dropped.
    ///
    /// TCTL.EN is device-wide: on a two-queue 82574 this pauses the other queue's transmit
    /// ring too, whose descriptors and registers are left alone; it resumes where it was
    /// when the transmitter is enabled again (SDM 13.4.33: clearing EN stops transmission
    /// after the frame in progress, SDM 3.4: the ring is processed while EN is set).
    fn reset(
        &mut self,
        bar0: &Mmio,
        tdh: usize,
        tdt: usize,
        done: &mut dyn FnMut(TxToken),
    ) -> usize {
        let tctl = bar0.read32(regs::TCTL);
        bar0.write32(regs::TCTL, tctl & !regs::TCTL_EN);
        // Flush the posted write.
        let _ = bar0.read32(regs::STATUS);
        // TCTL.EN = 0 stops after the frame in progress (SDM 13.4.33); give a stalled DMA
        // engine time to settle before the memory goes back to the caller.
        std::thread::sleep(Duration::from_millis(10));
        let lost = self.rewind(done);
        // TDH may be written while TCTL.EN is 0 (SDM 13.4.39).
        bar0.write32(tdh, 0);
        bar0.write32(tdt, 0);
        bar0.write32(regs::TCTL, tctl | regs::TCTL_EN);
        self.last_progress = Instant::now();
        lost
    }
}

/// Writes one descriptor at `tail` of the ring of `size` descriptors and advances it.
fn write_desc(ring: &DmaRegion, size: u16, tail: &mut u16, used: &mut u16, words: [u64; 2]) {
    let at = *tail as usize * DESC_LEN;
    ring.write_volatile(at, words[0]);
    ring.write_volatile(at + 8, words[1]);
    *tail = (*tail + 1) % size;
    *used += 1;
}

/// Data descriptors `segments` need after splitting at page boundaries and
/// [`desc::MAX_DESC_LEN`].
fn descriptors_needed(segments: &[TxSegment], pages: &LargePageRanges) -> usize {
    segments
        .iter()
        .map(|s| desc::split_count(s.iova, s.len as u64, |iova| pages.page_size_at(iova)))
        .sum()
}

/// One receive ring and its buffers (queue 0 of any model, or queue 1 of the 82574), shared
/// by the single-queue driver and each pair of the multi-queue driver.
/// Descriptors posted before the receive tail is written (see [`RxRing::flush`]).
const RX_DOORBELL_BATCH: u16 = 16;

struct RxRing {
    ring: Arc<DmaRegion>,
    buffers: Arc<DmaRegion>,
    /// The descriptor layout the device writes back.
    format: RxFormat,
    buffer_size: usize,
    size: u16,
    /// Next descriptor to check for DD.
    next: u16,
    /// Next descriptor to post a buffer at.
    tail: u16,
    /// Value last written to RDT.
    hw_tail: u16,
    /// Descriptors holding a posted buffer (flushed or not).
    posted: u16,
    /// Buffer slot held by each descriptor.
    desc_slot: Vec<u32>,
    /// Recycled buffers waiting to be posted.
    free: Vec<u32>,
    /// Buffers currently lent to the caller.
    lent: Vec<bool>,
    /// Good frames handed out, and their bytes (FCS stripped).
    frames: u64,
    bytes: u64,
    /// Frames dropped: written back bad ([`RxTake::Bad`]), or never written
    /// ([`RxTake::Unwritten`]).
    bad: u64,
    unwritten: u64,
}

/// An e1000-family NIC driven through VFIO. See the [module documentation](self).
pub struct E1000 {
    bar0: Mmio,
    model: NicModel,
    mac: MacAddress,
    config: NicConfig,
    tx: TxRing,
    rx: RxRing,
    /// Counters read from the device (SDM 13.7) and the driver's own (doorbells, resets);
    /// the receive ring's drops are added in [`NetQueue::stats`].
    stats: DeviceStats,
    /// Test-only run-time faults ([`crate::faults`]).
    #[cfg(feature = "fault-injection")]
    faults: crate::faults::FaultInjector,
    /// Interrupts through VFIO (`NicConfig::interrupts`), and the causes IMS enables when
    /// armed.
    irq: Option<DeviceIrq>,
    irq_causes: u32,
    /// Last: the VFIO device (and with it the IOMMU domain) outlives every mapping above.
    pci: VfioPci,
}

impl std::fmt::Debug for E1000 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E1000")
            .field("device", self.pci.address())
            .field("model", &self.model)
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

/// Poll `cond` until it holds or `timeout` passes; never spins without sleeping.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

impl E1000 {
    /// Initialise the NIC behind `pci` (an 82540EM, 82545EM or 82574L) and return a ready
    /// queue. Enables bus mastering, resets the device, programs both rings and waits up to
    /// [`NicConfig::link_wait`] for the link (a link that is still down is not an error:
    /// check [`NetQueue::link_up`]).
    pub fn open(pci: VfioPci, config: &NicConfig) -> Result<E1000> {
        config.validate()?;
        let (model, bar0, mac) = bring_up(&pci)?;
        let dma = Arc::clone(pci.dma());

        let rx = init_rx(&bar0, &dma, config, 0, RxFormat::Legacy)?;
        // Write descriptors back at once; we poll (SDM 13.4.30, 13.4.31).
        bar0.write32(regs::RDTR, 0);
        bar0.write32(regs::RADV, 0);
        let tx = init_tx(&bar0, &dma, config, model, 0)?;
        enable_transmitter(&bar0);
        let (irq, irq_causes) = if config.interrupts {
            init_interrupts(&pci, &bar0, model)
        } else {
            (None, 0)
        };

        let mut nic = E1000 {
            bar0,
            model,
            mac,
            config: config.clone(),
            tx,
            rx,
            stats: DeviceStats::default(),
            #[cfg(feature = "fault-injection")]
            faults: Default::default(),
            irq,
            irq_causes,
            pci,
        };
        start_receiver(&nic.bar0, config, nic.pci.address());
        // Counters are cumulative from here on (reset cleared them; this discards anything
        // counted during initialisation).
        nic.read_counters();
        nic.stats = DeviceStats::default();
        tracing::info!(device = %nic.pci.address(), model = %model, mac = %mac, "e1000 ready");
        Ok(nic)
    }

    /// The controller model.
    pub fn model(&self) -> NicModel {
        self.model
    }

    /// The VFIO device this driver owns.
    pub fn pci(&self) -> &VfioPci {
        &self.pci
    }

    /// Frames dropped because their data never arrived in the buffer (see the module docs);
    /// included in [`DeviceStats::rx_errors`].
    pub fn rx_integrity_drops(&self) -> u64 {
        self.rx.unwritten
    }

    #[cfg(feature = "fault-injection")]
    pub(crate) fn fault_injector(&mut self) -> &mut crate::faults::FaultInjector {
        &mut self.faults
    }

    /// Test hook ([`crate::faults`]): produce a fault that strikes before this doorbell.
    #[cfg(feature = "fault-injection")]
    fn inject_before_doorbell(&mut self) {
        use crate::faults::Fault;
        match self.faults.before_doorbell(self.tx.unflushed) {
            Some(Fault::TxHang) => {
                // TCTL.EN = 0: the transmit unit stops fetching descriptors (SDM 13.4.33,
                // SDM 3.4), so the frames of this and later doorbells never complete. Only
                // the watchdog's reset (`reset_tx_ring`) enables it again.
                let tctl = self.bar0.read32(regs::TCTL);
                self.bar0.write32(regs::TCTL, tctl & !regs::TCTL_EN);
            }
            // Refused by `AnyNic::inject_fault`: the e1000 family has no such fault.
            Some(Fault::DeviceError) | None => {}
        }
    }

    /// Read the clear-on-read counters (SDM 13.7) into `self.stats`.
    fn read_counters(&mut self) {
        read_device_counters(&self.bar0, &mut self.stats, true);
    }

    /// Stop the transmitter, rewind the ring, give every outstanding token back.
    fn reset_tx_ring(&mut self, done: &mut dyn FnMut(TxToken)) -> usize {
        let lost = self.tx.reset(&self.bar0, regs::TDH, regs::TDT, done);
        #[cfg(feature = "fault-injection")]
        self.faults.on_reset();
        self.stats.watchdog_resets += 1;
        lost
    }
}

/// Add the device's clear-on-read counters (SDM 13.7) to `stats`: the error and missed
/// counters, and with `traffic` also the good frames and octets (byte counts without FCS).
fn read_device_counters(bar0: &Mmio, s: &mut DeviceStats, traffic: bool) {
    let r = |reg| bar0.read32(reg) as u64;
    if traffic {
        // The 64-bit octet counters clear when the high word is read: low first.
        let gotc = r(regs::GOTCL) | r(regs::GOTCH) << 32;
        let gorc = r(regs::GORCL) | r(regs::GORCH) << 32;
        let gptc = r(regs::GPTC);
        let gprc = r(regs::GPRC);
        s.tx_frames += gptc;
        s.tx_bytes += gotc.saturating_sub(gptc * regs::FCS_LEN);
        s.rx_frames += gprc;
        s.rx_bytes += gorc.saturating_sub(gprc * regs::FCS_LEN);
    }
    s.rx_missed += r(regs::MPC);
    s.rx_errors += r(regs::CRCERRS) + r(regs::RXERRC);
    s.tx_errors += r(regs::ECOL) + r(regs::LATECOL) + r(regs::TSCTFC);
}

/// What every open does first, one queue or two: check the model, bus mastering on, BAR0
/// mapped, global reset, the 82574's bits, link set-up (SDM 14.3), the station address and
/// the address filters. Receive and transmit are still off.
fn bring_up(pci: &VfioPci) -> Result<(NicModel, Mmio, MacAddress)> {
    let (vendor, device) = pci.ids();
    let model = NicModel::from_ids(vendor, device)?;
    if !model.is_e1000_family() {
        return Err(DriverError::UnsupportedDevice { vendor, device });
    }
    pci.enable_bus_master()?;
    let bar0 = pci.map_bar(0)?;
    if bar0.len() < regs::GCR2 + 4 {
        return Err(DriverError::Device(format!(
            "BAR0 of {} bytes is too small for an e1000",
            bar0.len()
        )));
    }
    reset(&bar0)?;
    if model == NicModel::I82574L {
        init_82574_bits(&bar0);
    }
    // Link set-up (SDM 14.3): SLU and ASDE, no forced speed/duplex, no resets pending.
    let ctrl = bar0.read32(regs::CTRL);
    let ctrl = (ctrl | regs::CTRL_SLU | regs::CTRL_ASDE)
        & !(regs::CTRL_LRST
            | regs::CTRL_PHY_RST
            | regs::CTRL_ILOS
            | regs::CTRL_FRCSPD
            | regs::CTRL_FRCDPLX
            | regs::CTRL_VME);
    bar0.write32(regs::CTRL, ctrl);

    let mac = match read_mac_from_receive_address(&bar0) {
        Some(mac) => mac,
        None => read_mac_from_eeprom(&bar0, model)?,
    };
    program_filters(&bar0, mac);
    Ok((model, bar0, mac))
}

/// Stop all DMA before rings and buffers are unmapped: interrupts masked, transmitter and
/// receiver off, global reset (SDM 14.2).
fn quiesce(bar0: &Mmio) {
    bar0.write32(regs::IMC, regs::IMC_ALL);
    bar0.write32(regs::TCTL, 0);
    bar0.write32(regs::RCTL, 0);
    bar0.write32(regs::CTRL, bar0.read32(regs::CTRL) | regs::CTRL_RST);
    std::thread::sleep(Duration::from_millis(1));
}

/// Mask interrupts, stop RX/TX and reset the controller (SDM 14.2-14.3; 82574 DS 4.6).
fn reset(bar0: &Mmio) -> Result<()> {
    bar0.write32(regs::IMC, regs::IMC_ALL);
    bar0.write32(regs::RCTL, 0);
    bar0.write32(regs::TCTL, regs::TCTL_PSP);
    let _ = bar0.read32(regs::STATUS);
    // Let pending PCI transactions complete before the reset.
    std::thread::sleep(Duration::from_millis(10));
    bar0.write32(regs::CTRL, bar0.read32(regs::CTRL) | regs::CTRL_RST);
    // The SDM asks for at least 1 us before accessing the device after a global reset;
    // the 82574 DS asks software to wait until CTRL.RST has cleared.
    std::thread::sleep(Duration::from_millis(1));
    if !wait_until(Duration::from_secs(1), || {
        bar0.read32(regs::CTRL) & regs::CTRL_RST == 0
    }) {
        return Err(DriverError::Timeout(
            "CTRL.RST to clear after a global reset",
        ));
    }
    // Interrupts come back unmasked-by-default after reset on some parts: mask, then clear
    // any pending cause by reading ICR (SDM 13.4.17).
    bar0.write32(regs::IMC, regs::IMC_ALL);
    let _ = bar0.read32(regs::ICR);
    Ok(())
}

/// Enable interrupts through VFIO, all causes still masked (IMC): MSI-X on the 82574 (its
/// 5 vectors, 82574 DS 7.4.2; we route every cause to vector 0 through IVAR), else MSI,
/// else INTx (the 82540EM/82545EM as QEMU models them have neither MSI nor MSI-X). RDTR is
/// 0 (`init_rx`), so a received frame raises RXT0 at once; ITR is left at its reset value
/// (SDM 13.4.18, 82574 DS 10.2.4.2): the loop masks interrupts while busy, so throttling
/// only matters for the first wake-up. Returns the causes to set in IMS when arming.
fn init_interrupts(pci: &VfioPci, bar0: &Mmio, model: NicModel) -> (Option<DeviceIrq>, u32) {
    let modes: &[IrqMode] = if model == NicModel::I82574L {
        &[IrqMode::MsiX, IrqMode::Msi, IrqMode::Intx]
    } else {
        &[IrqMode::Msi, IrqMode::Intx]
    };
    match pci.enable_interrupts(modes, 1) {
        Ok(irq) => {
            let causes = if irq.mode() == IrqMode::MsiX {
                // 82574 DS 7.4.2.1 / 10.2.4.9: each MSI-X cause goes to the vector its IVAR
                // entry names, if valid; no auto-clear (EIAC 0) so the ICR bits stay until
                // the driver clears them on waking.
                bar0.write32(regs::IVAR, regs::IVAR_ALL_TO_VECTOR_0);
                bar0.write32(regs::EIAC, 0);
                let ext = bar0.read32(regs::CTRL_EXT) | regs::CTRL_EXT_PBA_SUPPORT;
                bar0.write32(regs::CTRL_EXT, ext);
                regs::IMS_WAKE_MSIX
            } else {
                regs::IMS_WAKE
            };
            tracing::info!(device = %pci.address(), mode = %irq.mode(), "e1000 interrupts enabled");
            (Some(irq), causes)
        }
        Err(e) => {
            tracing::warn!(device = %pci.address(), "{e}");
            (None, 0)
        }
    }
}

impl Interruptible for E1000 {
    fn irq_mode(&self) -> Option<IrqMode> {
        self.irq.as_ref().map(DeviceIrq::mode)
    }

    fn irq_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.irq.as_ref().map(DeviceIrq::fds).unwrap_or_default()
    }

    fn irq_arm(&mut self) {
        if self.irq.is_some() {
            // A cause already pending in ICR interrupts at once (the device asserts when
            // ICR & IMS != 0, SDM 13.4.17-13.4.20), so nothing that arrived since the last
            // clear is missed.
            self.bar0.write32(regs::IMS, self.irq_causes);
        }
    }

    fn irq_disarm(&mut self) -> u64 {
        let Some(irq) = &mut self.irq else {
            return 0;
        };
        // Mask first: with IMS 0 the 82574 also clears ICR on read (82574 DS 10.2.4.1); the
        // write of the causes read clears them where ICR is write-1-to-clear. For INTx this
        // deasserts the line before VFIO unmasks it.
        self.bar0.write32(regs::IMC, regs::IMC_ALL);
        let causes = self.bar0.read32(regs::ICR);
        if causes != 0 {
            self.bar0.write32(regs::ICR, causes);
        }
        let n = irq.drain();
        irq.unmask();
        n
    }

    fn irq_count(&self) -> u64 {
        self.irq.as_ref().map_or(0, DeviceIrq::count)
    }
}

/// 82574-specific initialisation bits (82574 DS 4.6 and the reserved-bit notes in 10.2).
fn init_82574_bits(bar0: &Mmio) {
    let ctrl = bar0.read32(regs::CTRL) & !regs::CTRL_82574_RESERVED_29;
    bar0.write32(regs::CTRL, ctrl);
    let ext = (bar0.read32(regs::CTRL_EXT) | regs::CTRL_EXT_82574_SET_22)
        & !regs::CTRL_EXT_82574_CLEAR_23;
    bar0.write32(regs::CTRL_EXT, ext);
    bar0.write32(regs::GCR, bar0.read32(regs::GCR) | regs::GCR_82574_SET_22);
    bar0.write32(regs::GCR2, bar0.read32(regs::GCR2) | regs::GCR2_82574_SET_0);
    bar0.write32(
        regs::TARC0,
        bar0.read32(regs::TARC0) | regs::TARC0_82574_SET_26,
    );
}

/// Read the station address from EEPROM words 0-2 through EERD (SDM 13.4.4; 82574 DS 10.2),
/// for parts whose RAL0/RAH0 were not loaded.
fn read_mac_from_eeprom(bar0: &Mmio, model: NicModel) -> Result<MacAddress> {
    let (done, shift) = if model == NicModel::I82574L {
        (regs::EERD_82574_DONE, regs::EERD_82574_ADDR_SHIFT)
    } else {
        (regs::EERD_8254X_DONE, regs::EERD_8254X_ADDR_SHIFT)
    };
    let mut mac = [0u8; 6];
    for word in 0..3u32 {
        bar0.write32(regs::EERD, regs::EERD_START | word << shift);
        let mut value = 0;
        if !wait_until(Duration::from_millis(100), || {
            value = bar0.read32(regs::EERD);
            value & done != 0
        }) {
            return Err(DriverError::Timeout("an EEPROM read (EERD.DONE)"));
        }
        let data = (value >> regs::EERD_DATA_SHIFT) as u16;
        mac[word as usize * 2..word as usize * 2 + 2].copy_from_slice(&data.to_le_bytes());
    }
    if mac == [0; 6] || mac == [0xff; 6] {
        return Err(DriverError::Device(
            "the EEPROM holds no station address".into(),
        ));
    }
    Ok(MacAddress(mac))
}

/// RAL0/RAH0 = our address, other receive addresses invalid, multicast table clear
/// (SDM 14.4: "program the Receive Address Register(s)", "initialize the MTA to 0b").
fn program_filters(bar0: &Mmio, mac: MacAddress) {
    let m = mac.0;
    // Write low before high; clear high before low (SDM 13.5.3 note).
    bar0.write32(regs::RAL0, u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
    bar0.write32(
        regs::RAH0,
        u32::from_le_bytes([m[4], m[5], 0, 0]) | regs::RAH_AV,
    );
    for n in 1..regs::RA_ENTRIES {
        bar0.write32(regs::RAH0 + 8 * n, 0);
        bar0.write32(regs::RAL0 + 8 * n, 0);
    }
    for w in 0..regs::MTA_WORDS {
        bar0.write32(regs::MTA + 4 * w, 0);
    }
}

/// Turns the receiver on, once, after every ring is set (RCTL is never written again: QEMU's
/// e1000 refuses frames for a second after every RCTL write), then waits up to
/// `config.link_wait` for the link (8254x SDM 13.4.2 STATUS.LU), warning if it stays down.
pub(super) fn start_receiver(bar0: &Mmio, config: &NicConfig, address: &crate::pci::PciAddress) {
    bar0.write32(regs::RCTL, rctl_value(config.rx_buffer_size));
    if !wait_until(config.link_wait, || {
        bar0.read32(regs::STATUS) & regs::STATUS_LU != 0
    }) {
        tracing::warn!(device = %address, "link still down after {:?}", config.link_wait);
    }
}

/// RCTL: EN, BAM, MPE, SECRC and the buffer size (SDM 13.4.22). Unicast to RAL0, broadcast
/// and multicast: IPv6 neighbour discovery solicits our addresses at their solicited-node
/// multicast groups (RFC 4861 section 7.2.2; MAC 33:33:ff:xx:xx:xx, RFC 2464 section 7),
/// whose low 24 bits the 12-bit MTA hash cannot single out, and routers advertise to
/// all-nodes; the stack drops groups it has not joined. No unicast promiscuous mode, no
/// long packets, bad frames not stored.
fn rctl_value(buffer_size: usize) -> u32 {
    let size_bits = match buffer_size {
        2048 => 0b00 << regs::RCTL_BSIZE_SHIFT,
        4096 => regs::RCTL_BSEX | 0b11 << regs::RCTL_BSIZE_SHIFT,
        8192 => regs::RCTL_BSEX | 0b10 << regs::RCTL_BSIZE_SHIFT,
        _ => regs::RCTL_BSEX | 0b01 << regs::RCTL_BSIZE_SHIFT, // 16384 (validated)
    };
    regs::RCTL_EN | regs::RCTL_BAM | regs::RCTL_MPE | regs::RCTL_SECRC | size_bits
}

/// Receive initialisation of queue `queue` without enabling the receiver (SDM 14.4; the
/// 82574's queue 1 at [`regs::queue_reg`]): ring, buffers, base, length, head and tail.
fn init_rx(
    bar0: &Mmio,
    dma: &Arc<DmaSpace>,
    config: &NicConfig,
    queue: usize,
    format: RxFormat,
) -> Result<RxRing> {
    let mut rx = RxRing::new(
        dma,
        config.rx_ring_size,
        config.rx_buffer_size,
        config.rx_buffer_access(),
        format,
    )?;
    let q = |reg| regs::queue_reg(reg, queue);
    let base = rx.ring.iova();
    bar0.write32(q(regs::RDBAL), base as u32);
    bar0.write32(q(regs::RDBAH), (base >> 32) as u32);
    bar0.write32(q(regs::RDLEN), (rx.size as usize * DESC_LEN) as u32);
    bar0.write32(q(regs::RDH), 0);
    bar0.write32(q(regs::RDT), 0);
    fence(Ordering::SeqCst);
    bar0.write32(q(regs::RDT), rx.tail as u32);
    rx.hw_tail = rx.tail;
    Ok(rx)
}

/// Transmit ring initialisation of queue `queue` (SDM 14.5; 82574 DS 4.6), the transmitter
/// not yet enabled ([`enable_transmitter`]).
fn init_tx(
    bar0: &Mmio,
    dma: &Arc<DmaSpace>,
    config: &NicConfig,
    model: NicModel,
    queue: usize,
) -> Result<TxRing> {
    let size = config.tx_ring_size;
    let ring = Arc::new(dma.allocate(size as usize * DESC_LEN, config.tx_completion_access())?);
    let tx = TxRing::new(ring, size);
    let q = |reg| regs::queue_reg(reg, queue);
    let base = tx.ring.iova();
    bar0.write32(q(regs::TDBAL), base as u32);
    bar0.write32(q(regs::TDBAH), (base >> 32) as u32);
    bar0.write32(q(regs::TDLEN), (size as usize * DESC_LEN) as u32);
    bar0.write32(q(regs::TDH), 0);
    bar0.write32(q(regs::TDT), 0);
    if model == NicModel::I82574L {
        bar0.write32(q(regs::TXDCTL), regs::TXDCTL_82574_INIT);
    }
    Ok(tx)
}

/// Inter-packet gap and TCTL with the transmitter enabled (SDM 14.5), once every ring is
/// programmed.
fn enable_transmitter(bar0: &Mmio) {
    bar0.write32(regs::TIPG, regs::TIPG_COPPER);
    bar0.write32(
        regs::TCTL,
        regs::TCTL_EN
            | regs::TCTL_PSP
            | regs::TCTL_CT_RECOMMENDED << regs::TCTL_CT_SHIFT
            | regs::TCTL_COLD_FULL_DUPLEX << regs::TCTL_COLD_SHIFT
            | regs::TCTL_RTLC,
    );
}

/// What the next receive descriptor held (see [`RxRing::take`]).
enum RxTake {
    /// The device has not written it back yet.
    Empty,
    /// A good frame, now lent to the caller.
    Frame(RxBuffer),
    /// Written back with an error, without EOP, or with a length the buffer cannot hold
    /// (the device can lie): dropped, the buffer back to the free list.
    Bad,
    /// Its destination address is not ours: the data never landed (the IOMMU refused the
    /// device's write). Dropped likewise.
    Unwritten,
}

impl RxRing {
    /// A ring of `size` descriptors, a buffer of `buffer_size` bytes posted on each but
    /// one (the device is not told yet).
    fn new(
        dma: &Arc<DmaSpace>,
        size: u16,
        buffer_size: usize,
        buffer_access: DmaAccess,
        format: RxFormat,
    ) -> Result<RxRing> {
        let ring = Arc::new(dma.allocate(size as usize * DESC_LEN, DmaAccess::DeviceReadsWrites)?);
        ring.zero();
        let count = size as usize; // one spare beyond the size-1 the ring can hold
        let buffers = Arc::new(dma.allocate(count * buffer_size, buffer_access)?);
        let mut rx = RxRing {
            ring,
            buffers,
            format,
            buffer_size,
            size,
            next: 0,
            tail: 0,
            hw_tail: 0,
            posted: 0,
            desc_slot: vec![0; size as usize],
            free: (0..count as u32).rev().collect(),
            lent: vec![false; count],
            frames: 0,
            bytes: 0,
            bad: 0,
            unwritten: 0,
        };
        rx.post_free();
        Ok(rx)
    }

    /// Takes the next descriptor the device wrote back. Everything it reads from the
    /// descriptor and buffer is device-written and checked before a buffer is lent out.
    fn take(&mut self, mac: &MacAddress) -> RxTake {
        if self.posted == 0 {
            return RxTake::Empty;
        }
        let i = self.next as usize;
        let word1: u64 = self.ring.read_volatile(i * DESC_LEN + 8);
        let wb = desc::rx_writeback(self.format, word1);
        if !wb.done {
            return RxTake::Empty;
        }
        fence(Ordering::Acquire);
        self.ring.write_volatile::<u64>(i * DESC_LEN + 8, 0);
        let slot = self.desc_slot[i];
        self.next = (self.next + 1) % self.size;
        self.posted -= 1;
        let len = wb.len as usize;
        let bad_frame = wb.frame_error || !wb.eop || len < 14 || len > self.buffer_size;
        if bad_frame {
            self.free.push(slot);
            return RxTake::Bad;
        }
        let mut dst = [0u8; 6];
        self.buffers
            .read_bytes(slot as usize * self.buffer_size, &mut dst);
        // Multicast (broadcast included) is accepted by RCTL.MPE/BAM; the buffer's cleared
        // first bytes are not multicast, so a blocked write still shows.
        if dst != mac.0 && dst[0] & 1 == 0 {
            // Not something the device's filter accepts: the data never landed here.
            self.free.push(slot);
            return RxTake::Unwritten;
        }
        self.lent[slot as usize] = true;
        RxTake::Frame(RxBuffer {
            slot,
            len: len as u32,
        })
    }

    /// The next good frame ([`NetQueue::rx_next`]), dropping and counting bad and unwritten
    /// ones on the way; the first unwritten one is logged, naming `device`.
    fn next(&mut self, mac: &MacAddress, device: &dyn std::fmt::Display) -> Option<RxBuffer> {
        loop {
            match self.take(mac) {
                RxTake::Empty => return None,
                RxTake::Frame(buffer) => {
                    self.frames += 1;
                    self.bytes += buffer.len as u64;
                    return Some(buffer);
                }
                RxTake::Bad => self.bad += 1,
                RxTake::Unwritten => {
                    self.unwritten += 1;
                    if self.unwritten == 1 {
                        tracing::error!(
                            %device,
                            "received frame's data missing from its buffer (device write blocked by the IOMMU?)"
                        );
                    }
                }
            }
        }
    }

    /// Post recycled buffers and tell the device through `rdt`, in batches: only once
    /// [`RX_DOORBELL_BATCH`] (at most a quarter of the ring) new descriptors wait, or at once
    /// when the device may be short of buffers (under half the ring flushed and not yet
    /// taken back). Each RDT write is a trip into the device model (in QEMU's e1000e also
    /// a flush of its queued packets and a main-loop wake-up); Linux's e1000e batches its
    /// RDT writes by 16 for the same reason (`E1000_RX_BUFFER_WRITE`). Returns whether a
    /// doorbell was written.
    fn flush(&mut self, bar0: &Mmio, rdt: usize) -> bool {
        self.post_free();
        let waiting = (self.tail + self.size - self.hw_tail) % self.size;
        if waiting == 0 {
            return false;
        }
        let flushed = self.posted - waiting;
        let batch = RX_DOORBELL_BATCH.min(self.size / 4).max(1);
        if waiting < batch && flushed >= self.size / 2 {
            return false;
        }
        fence(Ordering::SeqCst);
        bar0.write32(rdt, self.tail as u32);
        self.hw_tail = self.tail;
        true
    }

    fn read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        let slot = buffer.slot as usize;
        assert!(
            self.lent.get(slot) == Some(&true) && buffer.len as usize <= self.buffer_size,
            "rx_read: buffer {buffer:?} is not lent out by this driver"
        );
        let n = (buffer.len as usize).min(out.len());
        self.buffers
            .read_bytes(slot * self.buffer_size, &mut out[..n]);
        &out[..n]
    }

    fn recycle(&mut self, buffer: RxBuffer) {
        let slot = buffer.slot as usize;
        assert!(
            self.lent.get(slot) == Some(&true),
            "rx_recycle: buffer {buffer:?} is not lent out"
        );
        self.lent[slot] = false;
        self.free.push(buffer.slot);
    }

    /// Put free buffers on descriptors (without telling the device).
    fn post_free(&mut self) {
        while self.posted < self.size - 1 {
            let Some(slot) = self.free.pop() else { break };
            let offset = slot as usize * self.buffer_size;
            // Clear the destination address so the integrity check can tell a frame the
            // device really wrote from stale or never-written memory.
            self.buffers.write_volatile::<u64>(offset, 0);
            let at = self.tail as usize * DESC_LEN;
            self.ring
                .write_volatile(at, self.buffers.iova() + offset as u64);
            self.ring.write_volatile::<u64>(at + 8, 0);
            self.desc_slot[self.tail as usize] = slot;
            self.tail = (self.tail + 1) % self.size;
            self.posted += 1;
        }
    }
}

impl Drop for E1000 {
    fn drop(&mut self) {
        // Stop all DMA before the rings and buffers are unmapped (fields drop after this).
        quiesce(&self.bar0);
    }
}

/// Whether TSO is used for IPv6 frames on this model. The 82574 datasheet (section 7.3.6,
/// "TCP segmentation ... for IPv4 and IPv6") and Linux's e1000e (`NETIF_F_TSO6`) do. The
/// generic 8254x SDM describes the IPv6 Payload Length update (section 3.5.9), but its
/// formula as printed (MSS + HDRLEN - IPCSS, with HDRLEN counting the IPv6 header) and
/// QEMU's `e1000` model, which implements it (hw/net/e1000.c `xmit_seg`: `size - ipcss`),
/// put 40 bytes too many into Payload Length, and Linux's e1000 never offers
/// `NETIF_F_TSO6` on the 82540/82545. On those the stack segments IPv6 itself (MSS frames;
/// TCP checksum offload is still used).
fn tso_ipv6(model: NicModel) -> bool {
    model == NicModel::I82574L
}

/// What the e1000 family offers with the offloads `o` allows (the same for every queue).
fn capabilities(o: &OffloadSwitches, model: NicModel) -> Capabilities {
    Capabilities {
        ipv4_header_checksum: o.ipv4_header_checksum,
        tcp_checksum: o.l4_checksum,
        udp_checksum: o.l4_checksum,
        tso_max_frame: (o.tso && o.l4_checksum && o.ipv4_header_checksum).then_some(TSO_MAX_FRAME),
        tso_headers: TsoHeaders::PerSegment,
        tso_ipv6: o.tso && o.l4_checksum && tso_ipv6(model),
        max_tx_segments: MAX_TX_SEGMENTS,
        mtu: MTU,
        // No inline TLS engine: the stack encrypts records itself.
        tls_tx: None,
    }
}

impl NetQueue for E1000 {
    fn mac_address(&self) -> MacAddress {
        self.mac
    }

    fn dma(&self) -> &Arc<DmaSpace> {
        self.pci.dma()
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(&self.config.offloads, self.model)
    }

    fn link_up(&mut self) -> bool {
        self.bar0.read32(regs::STATUS) & regs::STATUS_LU != 0
    }

    /// Frames of `segments` segments that fit now, counting a context descriptor per frame
    /// and two descriptors per segment (a segment crossing one 4 KiB IOVA boundary). Larger
    /// segments need one more descriptor per 4 KiB; [`NetQueue::tx_enqueue`] reports
    /// [`DriverError::TxRingFull`] when a frame does not fit.
    fn tx_capacity(&self, segments: usize) -> usize {
        self.tx.capacity(segments)
    }

    fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> Result<()> {
        self.tx.enqueue(frame, &self.config.offloads, self.model)
    }

    fn tx_flush(&mut self) {
        if !self.tx.begin_flush() {
            return;
        }
        #[cfg(feature = "fault-injection")]
        self.inject_before_doorbell();
        self.tx.ring_doorbell(&self.bar0, regs::TDT);
        self.stats.doorbells += 1;
    }

    fn tx_reap(&mut self, done: &mut dyn FnMut(TxToken)) -> Result<usize> {
        if self.tx.nothing_flushed() {
            return Ok(0);
        }
        let now = Instant::now();
        let n = self.tx.reap(done, now);
        if n > 0 {
            return Ok(n);
        }
        let Some(stalled) = self.tx.stalled(now, self.config.tx_hang_timeout) else {
            return Ok(0);
        };
        if !self.link_up() {
            // No link, no progress expected: start counting again when it returns.
            self.tx.last_progress = now;
            return Ok(0);
        }
        let lost = self.reset_tx_ring(done);
        tracing::error!(device = %self.pci.address(), lost, "TX hang: no completion for {stalled:?}; TX ring reset");
        Err(DriverError::TxHang {
            ms: stalled.as_millis() as u64,
            lost,
        })
    }

    fn rx_next(&mut self) -> Option<RxBuffer> {
        self.rx.next(&self.mac, self.pci.address())
    }

    /// Copies a lent buffer's bytes out.
    ///
    /// # Panics
    /// If `buffer` is not a buffer this driver lent out and that is still lent (a forged or
    /// already recycled [`RxBuffer`]).
    fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        self.rx.read(buffer, out)
    }

    fn rx_recycle(&mut self, buffer: RxBuffer) {
        self.rx.recycle(buffer)
    }

    fn rx_flush(&mut self) {
        if self.rx.flush(&self.bar0, regs::RDT) {
            self.stats.doorbells += 1;
        }
    }

    fn stats(&mut self) -> DeviceStats {
        self.read_counters();
        let mut s = self.stats;
        s.rx_errors += self.rx.bad + self.rx.unwritten;
        s
    }
}

/// The receive ring's descriptor-reading code without a device, for the fuzz targets
/// (`fuzz/`): the caller plays the device, writing descriptors and buffers through the DMA
/// space by IOVA, and calls what `rx_next`, `rx_read`, `rx_recycle` and `rx_flush` call.
#[cfg(feature = "fuzzing")]
pub struct RxRingHarness {
    ring: RxRing,
    mac: MacAddress,
    /// Frames dropped as `rx_next` counts them in `rx_errors`, and of those the ones whose
    /// data never landed.
    pub rx_errors: u64,
    pub unwritten: u64,
}

#[cfg(feature = "fuzzing")]
impl RxRingHarness {
    pub fn new(
        dma: &Arc<DmaSpace>,
        size: u16,
        buffer_size: usize,
        mac: MacAddress,
    ) -> Result<Self> {
        Ok(Self {
            ring: RxRing::new(
                dma,
                size,
                buffer_size,
                DmaAccess::DeviceReadsWrites,
                RxFormat::Legacy,
            )?,
            mac,
            rx_errors: 0,
            unwritten: 0,
        })
    }
    /// IOVA of the descriptor ring (16 bytes per descriptor).
    pub fn ring_iova(&self) -> crate::Iova {
        self.ring.ring.iova()
    }
    /// IOVA of the receive buffers (`buffer_size` bytes per slot, `size` slots).
    pub fn buffers_iova(&self) -> crate::Iova {
        self.ring.buffers.iova()
    }
    pub fn size(&self) -> u16 {
        self.ring.size
    }
    pub fn buffer_size(&self) -> usize {
        self.ring.buffer_size
    }
    /// The descriptor index the driver checks next, and the index it posts at next (RDT).
    pub fn next_and_tail(&self) -> (u16, u16) {
        (self.ring.next, self.ring.tail)
    }
    /// As `NetQueue::rx_next`.
    pub fn rx_next(&mut self) -> Option<RxBuffer> {
        loop {
            match self.ring.take(&self.mac) {
                RxTake::Empty => return None,
                RxTake::Frame(buffer) => return Some(buffer),
                RxTake::Bad => self.rx_errors += 1,
                RxTake::Unwritten => {
                    self.rx_errors += 1;
                    self.unwritten += 1;
                }
            }
        }
    }
    pub fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        self.ring.read(buffer, out)
    }
    pub fn rx_recycle(&mut self, buffer: RxBuffer) {
        self.ring.recycle(buffer)
    }
    /// As `rx_flush` without the doorbell: free buffers go on descriptors.
    pub fn post_free(&mut self) {
        self.ring.post_free();
        self.ring.hw_tail = self.ring.tail;
    }
    /// Every buffer slot is in exactly one place (free, posted on a descriptor, or lent),
    /// and at most size - 1 are posted. Panics otherwise.
    pub fn check_accounting(&self) {
        let r = &self.ring;
        let count = r.lent.len();
        assert!(r.posted < r.size, "posted {} of {}", r.posted, r.size);
        let mut seen = vec![0u32; count];
        for &slot in &r.free {
            seen[slot as usize] += 1;
        }
        for k in 0..r.posted {
            let i = (r.next + k) % r.size;
            seen[r.desc_slot[i as usize] as usize] += 1;
        }
        for (slot, &lent) in r.lent.iter().enumerate() {
            seen[slot] += lent as u32;
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "buffer slots lost or duplicated: {seen:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(size: u16) -> TxRing {
        let dma = crate::dma::test_space();
        let ring = dma
            .allocate(size as usize * DESC_LEN, DmaAccess::DeviceReadsWrites)
            .unwrap();
        TxRing::new(Arc::new(ring), size)
    }

    /// Queue a frame of `descs` legacy descriptors, as `tx_enqueue` does (not flushed).
    fn enqueue(tx: &mut TxRing, descs: u16, token: TxToken) {
        for k in 0..descs {
            let cmd = if k + 1 == descs {
                desc::CMD_EOP | desc::CMD_RS
            } else {
                0
            };
            tx.write(0x10_0000, desc::legacy_tx(60, cmd | desc::CMD_IFCS));
        }
        let eop = (tx.tail + tx.size - 1) % tx.size;
        tx.frames.push_back(RingFrame {
            eop,
            descs,
            token,
            wire_frames: 1,
            wire_bytes: 60,
        });
        tx.unflushed += 1;
    }

    /// What the device does when it has sent a frame: DD in its last descriptor.
    fn complete(tx: &TxRing, frame: usize) {
        let at = tx.frames[frame].eop as usize * DESC_LEN + 8;
        let word1: u64 = tx.ring.read_volatile(at);
        tx.ring.write_volatile(at, word1 | desc::TX_STA_DD);
    }

    fn reap(tx: &mut TxRing) -> Vec<TxToken> {
        let mut tokens = Vec::new();
        tx.reap(&mut |t| tokens.push(t), Instant::now());
        tokens
    }

    #[test]
    fn reap_returns_completed_frames_in_order_and_stops_at_the_first_incomplete() {
        let mut tx = ring(16);
        for token in [10, 11, 12] {
            enqueue(&mut tx, 2, token);
        }
        tx.unflushed = 0;
        complete(&tx, 0);
        complete(&tx, 2); // cannot happen on a real ring; must not overtake frame 1
        assert_eq!(reap(&mut tx), [10]);
        assert_eq!(tx.used, 4);
        complete(&tx, 0); // frame 11, now at the front
                          // Frame 10 reaped; 11 and 12 carry DD but are not reaped yet.
        assert_eq!(tx.completed(), (3, 180));
        assert_eq!(reap(&mut tx), [11, 12]);
        assert_eq!(tx.completed(), (3, 180));
        assert_eq!(tx.free(), 15);
    }

    #[test]
    fn unflushed_frames_are_never_reaped_nor_watched() {
        let mut tx = ring(16);
        enqueue(&mut tx, 1, 1);
        complete(&tx, 0); // stale memory must not complete a frame the device never saw
        assert_eq!(reap(&mut tx), Vec::<TxToken>::new());
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(tx.stalled(later, Duration::from_secs(1)), None);
        tx.unflushed = 0;
        assert!(tx.stalled(later, Duration::from_secs(1)).unwrap() >= Duration::from_secs(4));
        assert_eq!(tx.stalled(later, Duration::from_secs(10)), None);
    }

    #[test]
    fn rewind_returns_every_outstanding_token_oldest_first() {
        let mut tx = ring(16);
        for token in [20, 21, 22, 23] {
            enqueue(&mut tx, 3, token);
        }
        // Three flushed, one not; the first completed.
        tx.unflushed = 1;
        complete(&tx, 0);
        assert_eq!(reap(&mut tx), [20]);
        let mut lost = Vec::new();
        assert_eq!(tx.rewind(&mut |t| lost.push(t)), 3);
        assert_eq!(
            lost,
            [21, 22, 23],
            "flushed and unflushed, in submission order"
        );
        assert_eq!((tx.tail, tx.used, tx.unflushed), (0, 0, 0));
        assert_eq!(tx.free(), 15);
        assert!(tx.frames.is_empty());
        // No descriptor the device wrote back survives to complete a later frame.
        for i in 0..16 {
            assert_eq!(tx.ring.read_volatile::<u64>(i * DESC_LEN + 8), 0);
        }
        enqueue(&mut tx, 1, 30);
        tx.unflushed = 0;
        assert_eq!(reap(&mut tx), Vec::<TxToken>::new());
        complete(&tx, 0);
        assert_eq!(reap(&mut tx), [30]);
    }
}
