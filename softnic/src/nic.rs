//! **The NIC.** [`SoftNic`] implements the [`NetQueue`] contract in software: TX frames are
//! chains of IOVA segments read through the [`SoftIommu`], given the offloads they ask for
//! (see [`crate::offload`]) and put on the wire to a [`SoftPeer`]; frames the peer sends come
//! back as RX, written by "DMA" into receive buffers mapped [`DmaAccess::DeviceReadsWrites`].
//! A DMA fault is counted, logged, and drops the frame.
//!
//! **Late DMA.** Frames are read from memory when the device processes them, not when they
//! are enqueued: with [`DmaTiming::OnFlush`] at [`NetQueue::tx_flush`], with
//! [`DmaTiming::Manual`] only when the test calls [`SoftNic::device_step`]. Tests can change
//! memory between enqueue and DMA and see what a real NIC would have sent.
//!
//! The TSO header convention is the one [`SoftNicConfig::capabilities`] announces in
//! [`Capabilities::tso_headers`]: [`TsoHeaders::PerSegment`] by default (like the e1000
//! family), [`TsoHeaders::WholePacket`] to play a virtio-net device.

use std::collections::VecDeque;
use std::sync::Arc;

use driver::dma::{DmaAccess, DmaRegion, DmaSpace};
use driver::queue::{
    Capabilities, DeviceStats, L4Protocol, MacAddress, NetQueue, RxBuffer, TsoHeaders, TxFrame,
    TxOffload, TxSegment, TxToken,
};
use driver::{DriverError, Result};

use crate::iommu::{DmaFault, SoftIommu};
use crate::offload;
use crate::tls_engine::{PendingRecord, TlsEngine, TlsEngineCounters};
use crate::wire::{self, Impairments, NicPort, SoftPeer, ETHERNET_HEADER_LEN};

/// When the device reads (DMAs) a flushed TX frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaTiming {
    /// During [`NetQueue::tx_flush`]: the simple mode.
    OnFlush,
    /// Only when the test calls [`SoftNic::device_step`].
    Manual,
}

/// Configuration of a [`SoftNic`].
#[derive(Clone, Copy, Debug)]
pub struct SoftNicConfig {
    pub mac: MacAddress,
    /// What the NIC offers. `mtu` is enforced on the wire in both directions.
    pub capabilities: Capabilities,
    /// TX descriptors: each frame takes one per segment, plus one context descriptor if it
    /// requests offloads.
    pub tx_descriptors: usize,
    /// RX buffers of [`SoftNicConfig::rx_buffer_size`] bytes.
    pub rx_buffers: usize,
    pub rx_buffer_size: usize,
    pub dma_timing: DmaTiming,
    /// Impairments of frames the NIC transmits.
    pub to_peer: Impairments,
    /// Impairments of frames the peer sends to the NIC.
    pub to_nic: Impairments,
}

impl SoftNicConfig {
    /// The same NIC with the inline TLS engine offered (AES-128/256-GCM, up to 16 record
    /// parts per frame).
    pub fn with_inline_tls(mut self) -> Self {
        self.capabilities.tls_tx = Some(driver::TlsTxCapability {
            aes_128_gcm: true,
            aes_256_gcm: true,
            max_records_per_frame: 16,
        });
        self
    }
}

impl Default for SoftNicConfig {
    fn default() -> Self {
        Self {
            mac: MacAddress([0x02, 0x00, 0x00, 0x00, 0x00, 0x01]),
            capabilities: Capabilities {
                ipv4_header_checksum: true,
                tcp_checksum: true,
                udp_checksum: true,
                tso_max_frame: Some(65535),
                tso_headers: TsoHeaders::PerSegment,
                tso_ipv6: true,
                max_tx_segments: 64,
                mtu: 1500,
                // Off by default; `SoftNicConfig::with_inline_tls` turns the engine on.
                tls_tx: None,
            },
            tx_descriptors: 1024,
            rx_buffers: 512,
            rx_buffer_size: 2048,
            dma_timing: DmaTiming::OnFlush,
            to_peer: Impairments::none(),
            to_nic: Impairments::none(),
        }
    }
}

/// Counters of the software NIC beyond [`DeviceStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SoftNicCounters {
    /// Frames accepted by `tx_enqueue`.
    pub tx_enqueued: u64,
    /// Frames the device processed (DMA-read), faulted or not.
    pub tx_processed: u64,
    /// Frames put on the wire after TSO splitting (before wire impairments).
    pub wire_frames: u64,
    /// Frames that used TSO.
    pub tso_frames: u64,
    /// Device accesses the IOMMU refused (TX reads and RX writes).
    pub dma_faults: u64,
    /// Frames dropped because a DMA faulted.
    pub fault_drops: u64,
    /// Frames (TX after segmentation, or RX) dropped for exceeding the MTU.
    pub mtu_drops: u64,
    /// `tx_enqueue` calls refused as malformed, and TSO frames whose headers the device
    /// could not segment (dropped).
    pub bad_frames: u64,
    /// Frames the wire lost, in both directions.
    pub lost: u64,
    /// Duplicates the wire delivered, in both directions.
    pub duplicated: u64,
    /// Frames the wire reordered, in both directions.
    pub reordered: u64,
}

struct PendingTx {
    segments: Vec<TxSegment>,
    offload: TxOffload,
    token: TxToken,
    descriptors: usize,
    /// Record parts the inline TLS engine encrypts (empty for other frames).
    tls: Vec<PendingRecord>,
}

/// Callback shown every frame the NIC puts on the wire (after offloads, before impairments).
pub type TxTap = Box<dyn FnMut(&[u8]) + Send>;

/// The software NIC. See the module documentation.
pub struct SoftNic {
    config: SoftNicConfig,
    iommu: Arc<SoftIommu>,
    dma: Arc<DmaSpace>,
    port: NicPort,
    /// Frames on the TX ring: `[..posted]` were flushed (visible to the device).
    tx_ring: VecDeque<PendingTx>,
    tx_posted: usize,
    tx_descriptors_used: usize,
    /// Recycled `PendingTx::segments` vectors, so enqueue does not allocate.
    spare_segment_lists: Vec<Vec<TxSegment>>,
    tx_done: VecDeque<TxToken>,
    /// Reused buffer for the bytes read by a TX DMA.
    dma_buffer: Vec<u8>,
    tap: Option<TxTap>,
    rx_region: DmaRegion,
    /// Buffers the device may fill.
    rx_available: VecDeque<u32>,
    /// Buffers the driver recycled but did not publish yet.
    rx_recycled: Vec<u32>,
    /// Filled buffers not yet taken by `rx_next`.
    rx_filled: VecDeque<RxBuffer>,
    faults: Vec<DmaFault>,
    counters: SoftNicCounters,
    stats: DeviceStats,
    /// Inline TLS encryption, when the capabilities offer it.
    tls_engine: TlsEngine,
}

impl std::fmt::Debug for SoftNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftNic")
            .field("config", &self.config)
            .field("counters", &self.counters)
            .finish()
    }
}

/// Keys the inline TLS engine's table holds.
const TLS_KEYS: usize = 1024;

/// Most faults kept in [`SoftNic::faults`]; later ones are only counted.
const FAULT_LOG_LIMIT: usize = 1024;

impl SoftNic {
    /// A NIC and the peer at the other end of its wire.
    pub fn new(config: SoftNicConfig) -> Result<(SoftNic, SoftPeer)> {
        if config.rx_buffers == 0 || config.tx_descriptors < 2 {
            return Err(DriverError::InvalidArgument(
                "software NIC rings too small".into(),
            ));
        }
        let max_frame = config.capabilities.mtu + ETHERNET_HEADER_LEN;
        if config.rx_buffer_size < max_frame {
            return Err(DriverError::InvalidArgument(format!(
                "RX buffers of {} bytes cannot hold {max_frame}-byte frames",
                config.rx_buffer_size
            )));
        }
        let iommu = SoftIommu::new();
        let dma = DmaSpace::new(iommu.clone());
        let rx_region = dma.allocate(
            config.rx_buffers * config.rx_buffer_size,
            DmaAccess::DeviceReadsWrites,
        )?;
        let (port, peer) = wire::wire(config.to_peer, config.to_nic, config.capabilities.mtu);
        let nic = SoftNic {
            iommu,
            dma,
            port,
            tx_ring: VecDeque::with_capacity(config.tx_descriptors),
            tx_posted: 0,
            tx_descriptors_used: 0,
            spare_segment_lists: Vec::new(),
            tx_done: VecDeque::with_capacity(config.tx_descriptors),
            dma_buffer: Vec::with_capacity(64 * 1024 + 256),
            tap: None,
            rx_region,
            rx_available: (0..config.rx_buffers as u32).collect(),
            rx_recycled: Vec::with_capacity(config.rx_buffers),
            rx_filled: VecDeque::with_capacity(config.rx_buffers),
            faults: Vec::new(),
            counters: SoftNicCounters::default(),
            stats: DeviceStats::default(),
            tls_engine: TlsEngine::new(TLS_KEYS),
            config,
        };
        Ok((nic, peer))
    }

    /// What the inline TLS engine did.
    pub fn tls_counters(&self) -> TlsEngineCounters {
        self.tls_engine.counters
    }

    /// The IOMMU the device's DMA goes through.
    pub fn iommu(&self) -> &Arc<SoftIommu> {
        &self.iommu
    }

    pub fn config(&self) -> &SoftNicConfig {
        &self.config
    }

    /// Frames flushed to the device that it has not read yet.
    pub fn pending_dma(&self) -> usize {
        self.tx_posted
    }

    /// Let the device DMA-read and transmit up to `max_frames` flushed frames ("DMA now").
    /// Returns how many it processed.
    pub fn device_step(&mut self, max_frames: usize) -> usize {
        let mut n = 0;
        while n < max_frames && self.tx_posted > 0 {
            let pending = self.tx_ring.pop_front().expect("posted frame on the ring");
            self.tx_posted -= 1;
            self.tx_descriptors_used -= pending.descriptors;
            self.process_tx(&pending);
            self.tx_done.push_back(pending.token);
            let mut segments = pending.segments;
            segments.clear();
            self.spare_segment_lists.push(segments);
            n += 1;
        }
        n
    }

    /// Watch every frame the NIC puts on the wire (after offloads, before impairments).
    pub fn set_tx_tap(&mut self, tap: Option<TxTap>) {
        self.tap = tap;
    }

    /// The DMA faults seen so far (the first `FAULT_LOG_LIMIT`).
    pub fn faults(&self) -> &[DmaFault] {
        &self.faults
    }

    /// Device counters, including the wire's.
    pub fn counters(&self) -> SoftNicCounters {
        let mut c = self.counters;
        for w in self.port.counters() {
            c.lost += w.lost;
            c.duplicated += w.duplicated;
            c.reordered += w.reordered;
            c.mtu_drops += w.oversized;
        }
        c
    }

    fn record_fault(&mut self, fault: DmaFault) {
        self.counters.dma_faults += 1;
        if self.faults.len() < FAULT_LOG_LIMIT {
            self.faults.push(fault);
        }
        tracing::warn!("soft NIC: {fault}");
    }

    fn validate(&self, segments: &[TxSegment], offload: &TxOffload) -> Result<()> {
        let caps = &self.config.capabilities;
        let bad = |why: String| Err(DriverError::BadFrame(why));
        if segments.is_empty() || segments.len() > caps.max_tx_segments {
            return bad(format!(
                "{} segments (1..={} allowed)",
                segments.len(),
                caps.max_tx_segments
            ));
        }
        if segments.iter().any(|s| s.len == 0) {
            return bad("empty segment".into());
        }
        let total: u64 = segments.iter().map(|s| s.len as u64).sum();
        if total < ETHERNET_HEADER_LEN as u64 {
            return bad(format!("{total}-byte frame"));
        }
        if let Some(ip) = offload.ipv4_header {
            if !caps.ipv4_header_checksum && offload.tso.is_none() {
                return bad("IPv4 header checksum offload not offered".into());
            }
            if ip as u64 + 20 > total {
                return bad("IPv4 header beyond the frame".into());
            }
        }
        if let Some(l4) = offload.l4_checksum {
            let offered = match l4.protocol {
                L4Protocol::Tcp => caps.tcp_checksum,
                L4Protocol::Udp => caps.udp_checksum,
            };
            if !offered {
                return bad(format!("{:?} checksum offload not offered", l4.protocol));
            }
            if l4.field as u64 + 2 > total || l4.field < l4.start {
                return bad("L4 checksum field outside the frame".into());
            }
        }
        match offload.tso {
            Some(tso) => {
                let Some(max) = caps.tso_max_frame else {
                    return bad("TSO not offered".into());
                };
                if total > max as u64 {
                    return bad(format!("TSO frame of {total} bytes (max {max})"));
                }
                let tcp = matches!(offload.l4_checksum, Some(l4) if l4.protocol == L4Protocol::Tcp);
                if !tcp || tso.mss == 0 {
                    return bad("TSO needs TCP checksum offload and an MSS".into());
                }
                // Per-segment headers leave the IPv4 checksum to the device, which must be
                // asked for it; whole-packet headers come with a valid one.
                // An IPv6 frame has no header checksum: it names its header instead.
                if let Some(ip6) = offload.ipv6_header {
                    if !caps.tso_ipv6 {
                        return bad("IPv6 TSO not offered".into());
                    }
                    if offload.ipv4_header.is_some() {
                        return bad("both an IPv4 and an IPv6 header".into());
                    }
                    if ip6 as usize + 40 > tso.header_len as usize {
                        return bad("the IPv6 header must lie in the TSO headers".into());
                    }
                } else if caps.tso_headers == TsoHeaders::PerSegment
                    && offload.ipv4_header.is_none()
                {
                    return bad("per-segment TSO needs IPv4 header checksum offload".into());
                }
                if tso.header_len as u32 > segments[0].len {
                    return bad("TSO headers must lie in the first segment".into());
                }
            }
            None => {
                let max = (caps.mtu + ETHERNET_HEADER_LEN) as u64;
                if total > max {
                    return bad(format!("{total}-byte frame exceeds the MTU ({max})"));
                }
            }
        }
        Ok(())
    }

    /// The device's work on one frame: DMA-read, offloads, wire.
    fn process_tx(&mut self, pending: &PendingTx) {
        self.counters.tx_processed += 1;
        let mut buffer = std::mem::take(&mut self.dma_buffer);
        buffer.clear();
        for segment in &pending.segments {
            let at = buffer.len();
            buffer.resize(at + segment.len as usize, 0);
            if let Err(fault) = self.iommu.dma_read(segment.iova, &mut buffer[at..]) {
                self.record_fault(fault);
                self.counters.fault_drops += 1;
                self.stats.tx_errors += 1;
                self.dma_buffer = buffer;
                return;
            }
        }
        if !pending.tls.is_empty() {
            // Inline TLS: the payload is records in plaintext; encrypt before the checksums
            // and segmentation, as a kTLS-offload NIC does.
            let iommu = &self.iommu;
            let mut faulted = None;
            let mut read = |segments: &[TxSegment], out: &mut Vec<u8>| {
                for segment in segments {
                    let at = out.len();
                    out.resize(at + segment.len as usize, 0);
                    if let Err(fault) = iommu.dma_read(segment.iova, &mut out[at..]) {
                        faulted = Some(fault);
                        return false;
                    }
                }
                true
            };
            let applied = self.tls_engine.apply(&mut buffer, &pending.tls, &mut read);
            if let Some(fault) = faulted {
                self.record_fault(fault);
            }
            if let Err(e) = applied {
                tracing::debug!("soft NIC: TLS frame dropped: {e}");
                self.counters.bad_frames += 1;
                self.stats.tx_errors += 1;
                self.dma_buffer = buffer;
                return;
            }
        }
        let offload = pending.offload;
        match offload.tso {
            Some(tso) if buffer.len() > tso.header_len as usize => {
                self.counters.tso_frames += 1;
                let convention = self.config.capabilities.tso_headers;
                let segmented = offload::segment(&buffer, &offload, tso, convention, |segment| {
                    self.put_on_wire(segment)
                });
                if let Err(e) = segmented {
                    tracing::debug!("soft NIC: TSO frame dropped: {e}");
                    self.counters.bad_frames += 1;
                }
            }
            _ => {
                offload::insert_checksums(&mut buffer, &offload);
                self.put_on_wire(&buffer);
            }
        }
        self.dma_buffer = buffer;
    }

    fn put_on_wire(&mut self, frame: &[u8]) {
        self.counters.wire_frames += 1;
        if frame.len() > self.config.capabilities.mtu + ETHERNET_HEADER_LEN {
            self.counters.mtu_drops += 1;
            self.stats.tx_errors += 1;
            return;
        }
        if let Some(tap) = self.tap.as_mut() {
            tap(frame);
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += frame.len() as u64;
        self.port.transmit(frame.to_vec());
    }

    /// Move frames from the wire into available RX buffers ("DMA writes").
    fn receive_from_wire(&mut self) {
        let max_frame = self.config.capabilities.mtu + ETHERNET_HEADER_LEN;
        while let Some(&slot) = self.rx_available.front() {
            let Some(frame) = self.port.receive() else {
                break;
            };
            if frame.len() > max_frame {
                self.counters.mtu_drops += 1;
                self.stats.rx_errors += 1;
                continue;
            }
            let iova = self.rx_region.iova() + slot as u64 * self.config.rx_buffer_size as u64;
            if let Err(fault) = self.iommu.dma_write(iova, &frame) {
                self.record_fault(fault);
                self.stats.rx_errors += 1;
                continue;
            }
            self.rx_available.pop_front();
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += frame.len() as u64;
            self.rx_filled.push_back(RxBuffer {
                slot,
                len: frame.len() as u32,
            });
        }
    }
}

impl NetQueue for SoftNic {
    fn mac_address(&self) -> MacAddress {
        self.config.mac
    }

    fn dma(&self) -> &Arc<DmaSpace> {
        &self.dma
    }

    fn capabilities(&self) -> Capabilities {
        self.config.capabilities
    }

    fn link_up(&mut self) -> bool {
        true
    }

    fn tx_capacity(&self, segments: usize) -> usize {
        if segments == 0 || segments > self.config.capabilities.max_tx_segments {
            return 0;
        }
        (self.config.tx_descriptors - self.tx_descriptors_used) / (segments + 1)
    }

    fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> Result<()> {
        let (segments, offload, token) = (frame.segments, frame.offload, frame.token);
        if let Err(e) = self.validate(segments, offload) {
            self.counters.bad_frames += 1;
            return Err(e);
        }
        let mut tls = Vec::new();
        if !frame.tls.is_empty() {
            let refuse = |why: String| Err(DriverError::BadFrame(why));
            let Some(engine) = self.config.capabilities.tls_tx else {
                self.counters.bad_frames += 1;
                return refuse("no inline TLS engine".into());
            };
            if frame.tls.len() > engine.max_records_per_frame
                || frame.tls.iter().any(|r| !engine.supports(r.key.cipher))
                || offload.l4_checksum.is_none()
            {
                self.counters.bad_frames += 1;
                return refuse(
                    "TLS records beyond what the engine offers (or no checksum offload)".into(),
                );
            }
            for slice in frame.tls {
                match PendingRecord::from_slice(slice) {
                    Ok(record) => tls.push(record),
                    Err(e) => {
                        self.counters.bad_frames += 1;
                        return refuse(e.to_string());
                    }
                }
            }
        }
        let context = usize::from(*offload != TxOffload::default());
        let descriptors = segments.len() + context;
        if self.config.tx_descriptors - self.tx_descriptors_used < descriptors {
            return Err(DriverError::TxRingFull);
        }
        let mut list = self.spare_segment_lists.pop().unwrap_or_default();
        list.extend_from_slice(segments);
        self.tx_descriptors_used += descriptors;
        self.tx_ring.push_back(PendingTx {
            segments: list,
            offload: *offload,
            token,
            descriptors,
            tls,
        });
        self.counters.tx_enqueued += 1;
        Ok(())
    }

    fn tx_flush(&mut self) {
        if self.tx_posted == self.tx_ring.len() {
            return;
        }
        self.stats.doorbells += 1;
        self.tx_posted = self.tx_ring.len();
        if self.config.dma_timing == DmaTiming::OnFlush {
            self.device_step(usize::MAX);
        }
    }

    fn tx_reap(&mut self, done: &mut dyn FnMut(TxToken)) -> Result<usize> {
        let n = self.tx_done.len();
        for token in self.tx_done.drain(..) {
            done(token);
        }
        Ok(n)
    }

    fn rx_next(&mut self) -> Option<RxBuffer> {
        if self.rx_filled.is_empty() {
            self.receive_from_wire();
        }
        self.rx_filled.pop_front()
    }

    fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        let offset = buffer.slot as usize * self.config.rx_buffer_size;
        let n = (buffer.len as usize).min(out.len());
        self.rx_region.read_bytes(offset, &mut out[..n]);
        &out[..n]
    }

    fn rx_recycle(&mut self, buffer: RxBuffer) {
        self.rx_recycled.push(buffer.slot);
    }

    fn rx_flush(&mut self) {
        if self.rx_recycled.is_empty() {
            return;
        }
        self.stats.doorbells += 1;
        self.rx_available.extend(self.rx_recycled.drain(..));
    }

    fn stats(&mut self) -> DeviceStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::DmaFaultKind;
    use crate::test_frames::{
        ipv4_header_ok, prepare_tso, pseudo, tcp_checksum_ok, tcp_frame, tcp_offload, IP, TCP,
    };
    use driver::queue::{L4Checksum, Tso};
    use inet_checksum::{fold, sum_be};
    use std::sync::Mutex;

    fn nic(config: SoftNicConfig) -> (SoftNic, SoftPeer) {
        SoftNic::new(config).unwrap()
    }

    /// Allocates device-readable memory holding `bytes`.
    fn stage(nic: &SoftNic, bytes: &[u8]) -> DmaRegion {
        let region = nic
            .dma()
            .allocate(bytes.len(), DmaAccess::DeviceReads)
            .unwrap();
        region.write_bytes(0, bytes);
        region
    }

    fn send(nic: &mut SoftNic, segments: &[TxSegment], offload: &TxOffload, token: u64) {
        nic.tx_enqueue(TxFrame::new(segments, offload, token))
            .unwrap();
        nic.tx_flush();
    }

    /// The first `len` bytes of `region`, as one segment.
    fn segment(region: &DmaRegion, len: usize) -> TxSegment {
        TxSegment {
            iova: region.iova(),
            len: len as u32,
        }
    }

    /// Stages `frame` and sends it in one segment; returns its memory.
    fn send_frame(nic: &mut SoftNic, frame: &[u8], offload: &TxOffload, token: u64) -> DmaRegion {
        let region = stage(nic, frame);
        send(nic, &[segment(&region, frame.len())], offload, token);
        region
    }

    /// Sends `frame` in two segments, its 54 bytes of headers and the rest, as a TSO frame
    /// usually comes; returns their memory.
    fn send_headers_apart(
        nic: &mut SoftNic,
        frame: &[u8],
        offload: &TxOffload,
        token: u64,
    ) -> [DmaRegion; 2] {
        let headers = stage(nic, &frame[..54]);
        let body = stage(nic, &frame[54..]);
        let segs = [segment(&headers, 54), segment(&body, frame.len() - 54)];
        send(nic, &segs, offload, token);
        [headers, body]
    }

    /// The payload of the 5000-byte TSO frames.
    fn tso_payload() -> Vec<u8> {
        (0..5000u32).map(|i| (i * 7) as u8).collect()
    }

    /// Checks every header field of the TSO segments of a FIN|PSH|ACK frame with sequence
    /// number 1_000_000 and IP ID 0x1234: the checksums, the IPv4 total length, the IP ID
    /// counting up, the sequence number advancing by the payload, FIN and PSH only on the
    /// last. Returns the payload they carry, in order.
    fn check_tso_segments(segments: &[Vec<u8>]) -> Vec<u8> {
        let mut received = Vec::new();
        for (i, seg) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            assert!(seg.len() <= 1514);
            assert!(ipv4_header_ok(seg), "segment {i}");
            assert!(tcp_checksum_ok(seg), "segment {i}");
            assert_eq!(
                u16::from_be_bytes([seg[IP + 2], seg[IP + 3]]) as usize,
                seg.len() - IP
            );
            assert_eq!(
                u16::from_be_bytes([seg[IP + 4], seg[IP + 5]]),
                0x1234 + i as u16
            );
            let seq = u32::from_be_bytes(seg[TCP + 4..TCP + 8].try_into().unwrap());
            assert_eq!(seq, 1_000_000 + received.len() as u32);
            assert_eq!(
                seg[TCP + 13],
                if last { 0x19 } else { 0x10 },
                "FIN/PSH only last"
            );
            received.extend_from_slice(&seg[54..]);
        }
        received
    }

    fn reap(nic: &mut SoftNic) -> Vec<u64> {
        let mut tokens = Vec::new();
        nic.tx_reap(&mut |t| tokens.push(t)).unwrap();
        tokens
    }

    #[test]
    fn plain_frame_goes_to_the_peer_unchanged() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        let frame = tcp_frame(b"hello", 0x18, 1);
        let _region = send_frame(&mut nic, &frame, &TxOffload::default(), 7);
        assert_eq!(peer.recv().unwrap(), frame);
        assert_eq!(reap(&mut nic), vec![7]);
        assert_eq!(nic.stats().tx_frames, 1);
    }

    #[test]
    fn scatter_gather_frame_is_gathered_in_order() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        let frame = tcp_frame(&[0xab; 3000][..1400], 0x18, 1);
        let a = stage(&nic, &frame[..54]);
        let b = stage(&nic, &frame[54..700]);
        let c = stage(&nic, &frame[700..]);
        let segs = [
            segment(&a, 54),
            segment(&b, 646),
            segment(&c, frame.len() - 700),
        ];
        send(&mut nic, &segs, &TxOffload::default(), 1);
        assert_eq!(peer.recv().unwrap(), frame);
    }

    #[test]
    fn ipv4_header_checksum_offload() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        let frame = tcp_frame(b"x", 0x18, 1);
        let offload = TxOffload {
            ipv4_header: Some(IP as u16),
            ..Default::default()
        };
        let _region = send_frame(&mut nic, &frame, &offload, 1);
        let out = peer.recv().unwrap();
        assert!(ipv4_header_ok(&out));
        assert_eq!(&out[..IP + 10], &frame[..IP + 10]);
    }

    #[test]
    fn tcp_checksum_offload_from_pseudo_header_sum() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        for payload_len in [0usize, 1, 2, 1000, 1459] {
            let mut frame = tcp_frame(&vec![0x5a; payload_len], 0x18, 9);
            let pseudo_sum = pseudo(6, (20 + payload_len) as u32);
            frame[TCP + 16..TCP + 18].copy_from_slice(&pseudo_sum.to_be_bytes());
            let _region = send_frame(&mut nic, &frame, &tcp_offload(), 1);
            let out = peer.recv().unwrap();
            assert!(tcp_checksum_ok(&out), "payload {payload_len}");
            assert!(ipv4_header_ok(&out));
        }
    }

    #[test]
    fn udp_checksum_offload() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        let mut frame = tcp_frame(&[], 0, 0);
        frame.truncate(TCP);
        frame[IP + 9] = 17;
        let payload = b"dhcp-ish payload";
        let udp_len = (8 + payload.len()) as u16;
        frame.extend_from_slice(&68u16.to_be_bytes());
        frame.extend_from_slice(&67u16.to_be_bytes());
        frame.extend_from_slice(&udp_len.to_be_bytes());
        frame.extend_from_slice(&pseudo(17, udp_len as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame[IP + 2..IP + 4].copy_from_slice(&(20 + udp_len).to_be_bytes());
        let offload = TxOffload {
            ipv6_header: None,
            ipv4_header: Some(IP as u16),
            l4_checksum: Some(L4Checksum {
                protocol: L4Protocol::Udp,
                start: TCP as u16,
                field: (TCP + 6) as u16,
            }),
            tso: None,
        };
        let _region = send_frame(&mut nic, &frame, &offload, 1);
        let out = peer.recv().unwrap();
        let sum = sum_be(&out[TCP..]) + pseudo(17, udp_len as u32) as u64;
        assert_eq!(fold(sum), 0xffff);
    }

    #[test]
    fn tso_splits_and_fixes_every_header_field() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        let payload = tso_payload();
        let mut frame = tcp_frame(&payload, 0x19, 1_000_000); // FIN|PSH|ACK
        frame[IP + 2..IP + 4].fill(0);
        frame[TCP + 16..TCP + 18].copy_from_slice(&pseudo(6, 0).to_be_bytes());
        let mut offload = tcp_offload();
        offload.tso = Some(Tso {
            mss: 1460,
            header_len: 54,
        });
        let _regions = send_headers_apart(&mut nic, &frame, &offload, 3);
        let segments: Vec<Vec<u8>> = std::iter::from_fn(|| peer.recv()).collect();
        let received = check_tso_segments(&segments);
        assert_eq!(segments.len(), 4);
        assert_eq!(received, payload);
        assert_eq!(nic.counters().tso_frames, 1);
        assert_eq!(reap(&mut nic), vec![3]);
    }

    fn whole_packet_nic() -> SoftNicConfig {
        let defaults = SoftNicConfig::default();
        SoftNicConfig {
            capabilities: Capabilities {
                tso_headers: TsoHeaders::WholePacket,
                ..defaults.capabilities
            },
            ..defaults
        }
    }

    /// Sends a 5000-byte TSO frame prepared for `prepared` (headers and payload in separate
    /// segments); returns what reached the peer.
    fn send_tso(nic: &mut SoftNic, peer: &SoftPeer, prepared: TsoHeaders) -> Vec<Vec<u8>> {
        let mut frame = tcp_frame(&tso_payload(), 0x19, 1_000_000); // FIN|PSH|ACK
        let offload = prepare_tso(&mut frame, prepared, 1460);
        send_headers_apart(nic, &frame, &offload, 3);
        std::iter::from_fn(|| peer.recv()).collect()
    }

    #[test]
    fn whole_packet_tso_splits_and_fixes_every_header_field() {
        let (mut nic, peer) = nic(whole_packet_nic());
        assert_eq!(nic.capabilities().tso_headers, TsoHeaders::WholePacket);
        let segments = send_tso(&mut nic, &peer, TsoHeaders::WholePacket);
        assert_eq!(segments.len(), 4);
        let sent = check_tso_segments(&segments).len();
        assert_eq!(sent, 5000);
        assert_eq!(nic.counters().tso_frames, 1);
        assert_eq!(reap(&mut nic), vec![3]);
    }

    #[test]
    fn tso_headers_of_the_wrong_convention_are_detectable() {
        // Per-segment headers on a whole-packet NIC: every segment's checksums are bad.
        let (mut whole_packet, peer) = nic(whole_packet_nic());
        let segments = send_tso(&mut whole_packet, &peer, TsoHeaders::PerSegment);
        assert_eq!(segments.len(), 4);
        assert!(segments
            .iter()
            .all(|s| !tcp_checksum_ok(s) && !ipv4_header_ok(s)));
        // Whole-packet headers on a per-segment NIC come without the IPv4 checksum request
        // the per-segment convention needs: refused at enqueue.
        let (mut nic, _peer) = nic(SoftNicConfig::default());
        let mut frame = tcp_frame(&[0; 3000], 0x10, 1);
        let offload = prepare_tso(&mut frame, TsoHeaders::WholePacket, 1460);
        let region = stage(&nic, &frame);
        assert!(matches!(
            nic.tx_enqueue(TxFrame::new(&[segment(&region, frame.len())], &offload, 1)),
            Err(DriverError::BadFrame(_))
        ));
    }

    #[test]
    fn unmapped_iova_faults_and_drops_the_frame() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        let frame = tcp_frame(b"x", 0, 0);
        let region = stage(&nic, &frame);
        let segs = [
            segment(&region, 54),
            TxSegment {
                iova: 0xdead_0000,
                len: 1,
            },
        ];
        send(&mut nic, &segs, &TxOffload::default(), 5);
        assert!(peer.recv().is_none(), "nothing on the wire");
        assert_eq!(reap(&mut nic), vec![5], "the token still comes back");
        let c = nic.counters();
        assert_eq!((c.dma_faults, c.fault_drops), (1, 1));
        assert_eq!(
            nic.faults()[0],
            DmaFault {
                iova: 0xdead_0000,
                kind: DmaFaultKind::Unmapped
            }
        );
    }

    #[test]
    fn read_past_the_end_of_a_mapping_faults() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        let frame = tcp_frame(b"x", 0, 0);
        let region = stage(&nic, &frame);
        let seg = TxSegment {
            iova: region.iova() + region.len() as u64 - 10,
            len: 64,
        };
        send(&mut nic, &[seg], &TxOffload::default(), 1);
        assert!(peer.recv().is_none());
        assert_eq!(nic.faults()[0].iova, region.iova() + region.len() as u64);
    }

    #[test]
    fn unmapped_after_drop_faults() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        let frame = tcp_frame(b"x", 0, 0);
        let region = stage(&nic, &frame);
        let seg = segment(&region, frame.len());
        drop(region);
        send(&mut nic, &[seg], &TxOffload::default(), 1);
        assert!(peer.recv().is_none());
        assert_eq!(nic.counters().dma_faults, 1);
    }

    #[test]
    fn rx_dma_into_unmapped_buffer_faults() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        // Pretend the driver published a buffer slot outside the RX region.
        nic.rx_available.clear();
        nic.rx_available.push_back(u32::MAX / 4096);
        peer.send(tcp_frame(b"x", 0, 0));
        assert!(nic.rx_next().is_none());
        assert_eq!(nic.counters().dma_faults, 1);
        assert_eq!(nic.faults()[0].kind, DmaFaultKind::Unmapped);
    }

    #[test]
    fn manual_dma_reads_memory_at_device_step_not_at_enqueue() {
        let config = SoftNicConfig {
            dma_timing: DmaTiming::Manual,
            ..Default::default()
        };
        let (mut nic, peer) = nic(config);
        let frame = tcp_frame(b"before", 0, 0);
        let region = send_frame(&mut nic, &frame, &TxOffload::default(), 1);
        assert_eq!(nic.pending_dma(), 1);
        assert!(peer.recv().is_none(), "no DMA before the device runs");
        assert!(reap(&mut nic).is_empty(), "not complete before DMA");
        region.write_bytes(54, b"AFTER!");
        assert_eq!(nic.device_step(8), 1);
        assert_eq!(&peer.recv().unwrap()[54..], b"AFTER!");
        assert_eq!(reap(&mut nic), vec![1]);
    }

    #[test]
    fn mtu_is_enforced() {
        let (mut nic, peer) = nic(SoftNicConfig::default());
        let frame = tcp_frame(&[0; 1461], 0, 0); // 1515 bytes
        let region = stage(&nic, &frame);
        let seg = segment(&region, frame.len());
        assert!(matches!(
            nic.tx_enqueue(TxFrame::new(&[seg], &TxOffload::default(), 1)),
            Err(DriverError::BadFrame(_))
        ));
        // A TSO MSS that makes oversized segments: the device drops them.
        let mut offload = tcp_offload();
        offload.tso = Some(Tso {
            mss: 2000,
            header_len: 54,
        });
        let big = tcp_frame(&[0; 3000], 0, 0);
        let _region = send_frame(&mut nic, &big, &offload, 2);
        assert_eq!(
            peer.recv().unwrap().len(),
            54 + 1000,
            "only the second segment fits"
        );
        assert!(peer.recv().is_none());
        assert_eq!(
            nic.counters().mtu_drops,
            1,
            "first segment oversized; second fits"
        );
        // RX side: an oversized frame from the peer is dropped.
        peer.send(vec![0; 1515]);
        assert!(nic.rx_next().is_none());
        assert!(nic.counters().mtu_drops >= 2);
    }

    #[test]
    fn malformed_offload_requests_are_refused() {
        let config = SoftNicConfig {
            capabilities: Capabilities {
                tso_max_frame: None,
                tso_headers: TsoHeaders::PerSegment,
                tcp_checksum: false,
                ..SoftNicConfig::default().capabilities
            },
            ..Default::default()
        };
        let (mut nic, _peer) = nic(config);
        let seg = [TxSegment {
            iova: 0x1000,
            len: 60,
        }];
        assert!(
            nic.tx_enqueue(TxFrame::new(&seg, &tcp_offload(), 1))
                .is_err(),
            "TCP checksum not offered"
        );
        let mut tso = TxOffload {
            tso: Some(Tso {
                mss: 100,
                header_len: 54,
            }),
            ..Default::default()
        };
        assert!(nic.tx_enqueue(TxFrame::new(&seg, &tso, 1)).is_err());
        tso.ipv4_header = Some(14);
        assert!(nic.tx_enqueue(TxFrame::new(&seg, &tso, 1)).is_err());
        assert!(nic
            .tx_enqueue(TxFrame::new(&[], &TxOffload::default(), 1))
            .is_err());
        assert_eq!(nic.counters().bad_frames, 4);
        assert_eq!(nic.counters().tx_enqueued, 0);
    }

    #[test]
    fn tx_ring_fills_and_reports_capacity() {
        let config = SoftNicConfig {
            tx_descriptors: 8,
            dma_timing: DmaTiming::Manual,
            ..Default::default()
        };
        let (mut nic, _peer) = nic(config);
        let region = stage(&nic, &tcp_frame(b"", 0, 0));
        let seg = [segment(&region, 54)];
        assert_eq!(nic.tx_capacity(1), 4);
        for t in 0..4 {
            nic.tx_enqueue(TxFrame::new(&seg, &tcp_offload(), t))
                .unwrap();
        }
        assert_eq!(nic.tx_capacity(1), 0);
        assert!(matches!(
            nic.tx_enqueue(TxFrame::new(&seg, &tcp_offload(), 9)),
            Err(DriverError::TxRingFull)
        ));
        nic.tx_flush();
        nic.device_step(usize::MAX);
        assert_eq!(reap(&mut nic), vec![0, 1, 2, 3], "in submission order");
        assert_eq!(nic.tx_capacity(1), 4);
    }

    #[test]
    fn rx_buffers_are_written_by_dma_and_recycled() {
        let config = SoftNicConfig {
            rx_buffers: 2,
            ..Default::default()
        };
        let (mut nic, peer) = nic(config);
        for i in 0..3u8 {
            peer.send(vec![i; 60]);
        }
        let a = nic.rx_next().unwrap();
        let b = nic.rx_next().unwrap();
        assert_eq!(nic.rx_read(&a, &mut [0u8; 2048]), &[0u8; 60][..]);
        assert_eq!(nic.rx_read(&b, &mut [0u8; 2048]), &[1u8; 60][..]);
        assert!(nic.rx_next().is_none(), "no buffer for the third frame yet");
        nic.rx_recycle(a);
        assert!(nic.rx_next().is_none(), "recycled but not published");
        nic.rx_flush();
        let c = nic.rx_next().unwrap();
        assert_eq!(nic.rx_read(&c, &mut [0u8; 2048]), &[2u8; 60][..]);
    }

    #[test]
    fn impairments_are_seeded_and_counted() {
        let run = |seed| {
            let config = SoftNicConfig {
                to_nic: Impairments::uniform(0.1, seed),
                rx_buffers: 4096,
                ..Default::default()
            };
            let (mut nic, peer) = nic(config);
            for i in 0..2000u32 {
                let mut f = vec![0u8; 60];
                f[..4].copy_from_slice(&i.to_be_bytes());
                peer.send(f);
            }
            let mut got = Vec::new();
            while let Some(b) = nic.rx_next() {
                got.push(u32::from_be_bytes(
                    nic.rx_read(&b, &mut [0u8; 2048])[..4].try_into().unwrap(),
                ));
                nic.rx_recycle(b);
                nic.rx_flush();
            }
            (got, nic.counters())
        };
        let (a, ca) = run(42);
        let (b, _) = run(42);
        let (c, _) = run(43);
        assert_eq!(a, b, "same seed, same impairments");
        assert_ne!(a, c);
        assert!(ca.lost > 100 && ca.lost < 300, "{ca:?}");
        assert!(ca.duplicated > 100 && ca.reordered > 100, "{ca:?}");
        assert_eq!(a.len() as u64, 2000 - ca.lost + ca.duplicated);
        assert!(a.windows(2).any(|w| w[0] > w[1]), "some reordering");
    }

    #[test]
    fn tap_sees_wire_frames() {
        let (mut nic, _peer) = nic(SoftNicConfig::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        nic.set_tx_tap(Some(Box::new(move |f| s.lock().unwrap().push(f.len()))));
        let frame = tcp_frame(b"abc", 0, 0);
        let _region = send_frame(&mut nic, &frame, &TxOffload::default(), 1);
        assert_eq!(*seen.lock().unwrap(), vec![frame.len()]);
    }
}
