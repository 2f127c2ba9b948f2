//! The device boundary: smoltcp's `phy::Device` over a [`NetQueue`], where smoltcp's
//! contiguous frames become scatter-gather descriptor chains.
//!
//! For a TCP segment of a zero-copy connection, smoltcp has copied *placeholder* bytes from
//! its ring into the frame. [`TxPath`] keeps only the headers (Ethernet + IPv4 + TCP, in a
//! per-frame header slot of DMA memory), maps the segment's sequence range to the
//! connection's [`SendQueue`] and points the rest of the frame at the pinned page frames
//! (and copy-pool blocks) by IOVA. It then prepares checksum offload (pseudo-header sum in
//! the field) or computes the checksum in software from the pinned bytes, and requests TSO
//! when smoltcp built a segment larger than the MSS.
//!
//! Every frame owns one header slot until the NIC returns its token; the slot index is the
//! token. A frame record remembers which stream range the frame reads, so the items stay
//! referenced (`dma_refs`) until the NIC is done with them.
//!
//! TX frames are *staged* during `Interface::poll` and handed to the NIC afterwards with one
//! `tx_flush` per poll (smoltcp holds an RX token and a TX token at the same time, so the
//! TX token cannot reach the NIC itself).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::ops::Range;

use driver::dma::{DmaAccess, DmaRegion, DmaSpace};
use driver::{
    Capabilities, Iova, L4Checksum, L4Protocol, NetQueue, RxBuffer, Tso, TsoHeaders, TxOffload,
    TxSegment,
};
use smoltcp::phy::{
    self, Checksum as SmolChecksum, ChecksumCapabilities, DeviceCapabilities, Medium,
};
use smoltcp::time::Instant;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::frame::{self, FlowKey, TcpFrame, ETHERNET_HEADER_LEN, IP_PROTOCOL_TCP, TCP_SYN};
use crate::sendq::{CopyPool, SendMode, SendQueue};
use crate::StackStats;
use inet_checksum::{ipv4_pseudo_header, Checksum};

/// Size of a header slot; also holds any whole frame up to an Ethernet MTU of 1500.
pub const SLOT_SIZE: usize = 2048;
/// Largest TSO frame we ask for (IPv4 total length must fit 16 bits).
const MAX_TSO_FRAME: usize = 65535 + ETHERNET_HEADER_LEN - 1;
const NO_CONN: u32 = u32::MAX;

/// Per-connection state the device boundary needs.
pub struct ConnTx {
    pub generation: u32,
    pub flow: Option<FlowKey>,
    /// Initial send sequence number (from the SYN or SYN-ACK smoltcp sent).
    pub iss: Option<u32>,
    pub sendq: SendQueue,
}

impl ConnTx {
    /// Stream offset of `seq`, relative to what is known acknowledged. `None` if `seq` lies
    /// before it (a keep-alive probe) or the ISS is unknown.
    fn stream_offset(&self, seq: u32) -> Option<u64> {
        let iss = self.iss?;
        let acked_seq = iss.wrapping_add(1).wrapping_add(self.sendq.acked as u32);
        let delta = seq.wrapping_sub(acked_seq) as i32;
        (delta >= 0).then(|| self.sendq.acked + delta as u64)
    }
}

struct FrameRecord {
    conn: u32,
    generation: u32,
    stream: Range<u64>,
    jumbo: Option<u32>,
}

struct Staged {
    slot: u32,
    segments: Range<usize>,
    offload: TxOffload,
}

/// Where smoltcp built a frame.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BuildBuffer {
    Slot,
    Jumbo(u32),
    Scratch,
}

/// Device-independent transmit state: header slots, frame records, connection send queues.
pub struct TxPath {
    caps: Capabilities,
    tso_frame: Option<usize>,
    slots: DmaRegion,
    slots_host: *mut u8,
    free_slots: Vec<u32>,
    records: Vec<FrameRecord>,
    jumbo: Option<(DmaRegion, *mut u8, usize)>,
    free_jumbo: Vec<u32>,
    staged: std::collections::VecDeque<Staged>,
    staged_segments: Vec<TxSegment>,
    /// Frames smoltcp may still build this poll.
    budget: usize,
    scratch: Vec<u8>,
    pub pool: CopyPool,
    pub conns: Vec<ConnTx>,
    pub flows: HashMap<FlowKey, u32, FlowHashBuilder>,
    /// ISS of flows whose connection is not bound yet (accepted sockets).
    pub pending_iss: HashMap<FlowKey, u32, FlowHashBuilder>,
    pub stats: StackStats,
}

// SAFETY: the raw pointers point into the mmaps owned by `slots` / `jumbo` (Send + Sync),
// and are only dereferenced through `&mut self`.
unsafe impl Send for TxPath {}

/// A fast hash for [`FlowKey`]s (a multiplicative hash of one u64; flows are not chosen by
/// an attacker beyond what a listening server's peers choose, and a table holds few).
#[derive(Clone, Copy, Default)]
pub struct FlowHashBuilder;

/// See [`FlowHashBuilder`].
#[derive(Default)]
pub struct FlowHasher(u64);

impl std::hash::Hasher for FlowHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

impl std::hash::BuildHasher for FlowHashBuilder {
    type Hasher = FlowHasher;
    fn build_hasher(&self) -> FlowHasher {
        FlowHasher::default()
    }
}

/// Sizing of the transmit path.
#[derive(Clone, Copy, Debug)]
pub struct TxConfig {
    /// Header slots = frames in flight at most.
    pub slots: usize,
    /// Jumbo buffers for TSO-sized frames that carry their payload inline (copying mode).
    pub jumbo_buffers: usize,
    /// Copy-pool blocks (4 KiB) for small copied sends.
    pub copy_blocks: usize,
    /// Use TSO when the NIC offers it.
    pub tso: bool,
}

fn host_pointer(region: &DmaRegion) -> *mut u8 {
    region
        .memory()
        .get_host_address(GuestAddress(region.iova()))
        .expect("a DMA region's own memory translates")
}

impl TxPath {
    pub fn new(
        dma: &std::sync::Arc<DmaSpace>,
        caps: Capabilities,
        config: &TxConfig,
    ) -> driver::Result<Self> {
        let slots = dma.allocate(config.slots * SLOT_SIZE, DmaAccess::DeviceReads)?;
        let slots_host = host_pointer(&slots);
        // TSO needs the NIC to fix IPv4 and TCP checksums, and room for the header chain.
        let max_by_segments =
            ETHERNET_HEADER_LEN + 60 + 60 + (caps.max_tx_segments.saturating_sub(3)) * 4096;
        let tso_frame = caps
            .tso_max_frame
            .filter(|_| config.tso && caps.tcp_checksum)
            .map(|m| (m as usize).min(MAX_TSO_FRAME).min(max_by_segments))
            .filter(|&m| m > caps.mtu + ETHERNET_HEADER_LEN);
        let (jumbo, free_jumbo) = match tso_frame {
            Some(size) if config.jumbo_buffers > 0 => {
                let size = size.div_ceil(4096) * 4096;
                let region = dma.allocate(config.jumbo_buffers * size, DmaAccess::DeviceReads)?;
                let host = host_pointer(&region);
                (
                    Some((region, host, size)),
                    (0..config.jumbo_buffers as u32).rev().collect(),
                )
            }
            _ => (None, Vec::new()),
        };
        Ok(Self {
            caps,
            tso_frame,
            slots,
            slots_host,
            free_slots: (0..config.slots as u32).rev().collect(),
            records: (0..config.slots)
                .map(|_| FrameRecord {
                    conn: NO_CONN,
                    generation: 0,
                    stream: 0..0,
                    jumbo: None,
                })
                .collect(),
            jumbo,
            free_jumbo,
            staged: std::collections::VecDeque::with_capacity(config.slots),
            staged_segments: Vec::with_capacity(config.slots * 4),
            budget: 0,
            scratch: vec![0; tso_frame.unwrap_or(SLOT_SIZE).max(SLOT_SIZE)],
            pool: CopyPool::new(dma, config.copy_blocks)?,
            conns: Vec::new(),
            flows: HashMap::default(),
            pending_iss: HashMap::default(),
            stats: StackStats::default(),
        })
    }

    /// Largest frame handed to the NIC with TSO, if TSO is used.
    pub fn tso_frame(&self) -> Option<usize> {
        self.tso_frame
    }

    /// Frames in flight (header slots in use).
    pub fn frames_in_flight(&self) -> usize {
        self.records.len() - self.free_slots.len()
    }

    fn slot_iova(&self, slot: u32) -> Iova {
        self.slots.iova() + (slot as usize * SLOT_SIZE) as u64
    }

    fn can_build(&self) -> bool {
        self.budget > 0 && !self.free_slots.is_empty()
    }

    /// The NIC finished reading the frame with this token.
    pub fn complete(&mut self, token: u64) {
        let slot = token as u32;
        let record = &mut self.records[slot as usize];
        if record.conn != NO_CONN {
            if let Some(conn) = self.conns.get_mut(record.conn as usize) {
                if conn.generation == record.generation {
                    conn.sendq.add_dma_refs(record.stream.clone(), -1);
                }
            }
        }
        record.conn = NO_CONN;
        if let Some(j) = record.jumbo.take() {
            self.free_jumbo.push(j);
        }
        self.free_slots.push(slot);
    }

    fn abandon_slot(&mut self, slot: u32, build: BuildBuffer) {
        if let BuildBuffer::Jumbo(j) = build {
            self.free_jumbo.push(j);
        }
        self.free_slots.push(slot);
    }

    /// smoltcp built a frame in `buffer` (which is `build`); turn it into a staged descriptor
    /// chain.
    fn finish_frame(
        &mut self,
        slot: u32,
        build: BuildBuffer,
        buffer: &mut [u8],
        tso_mss: Option<u16>,
    ) {
        self.stats.frames_tx += 1;
        let segments_start = self.staged_segments.len();
        let Some(tcp) = frame::parse_tcp(buffer) else {
            return self.stage_whole(slot, build, buffer, TxOffload::default(), segments_start);
        };
        self.note_syn(&tcp);
        let conn_index = self.flows.get(&tcp.flow()).copied();
        let tso = tso_mss.filter(|_| self.tso_frame.is_some()).map(|mss| Tso {
            mss,
            header_len: tcp.header_len as u16,
        });

        // Zero-copy data segment?
        if let Some(index) = conn_index {
            let conn = &self.conns[index as usize];
            if tcp.payload_len > 0 && conn.sendq.mode == SendMode::ZeroCopy {
                if conn.iss.is_none() {
                    // Cannot map the segment: never put placeholders on the wire.
                    tracing::error!("TX segment of a flow with unknown ISS; frame dropped");
                    self.stats.tx_unmapped_drops += 1;
                    self.abandon_slot(slot, build);
                    return;
                }
                if let Some(start) = conn.stream_offset(tcp.seq) {
                    let stream = start..start + tcp.payload_len as u64;
                    return self.stage_zero_copy(
                        slot,
                        build,
                        buffer,
                        &tcp,
                        index,
                        stream,
                        tso,
                        segments_start,
                    );
                }
                // Before the acknowledged point: a keep-alive probe carrying one garbage
                // byte by design; send it as built.
            }
        }

        // Everything else goes out as smoltcp built it: copying-mode data, control segments.
        if tcp.payload_len > 0 {
            self.stats.payload_bytes_copied += tcp.payload_len as u64; // smoltcp's ring -> frame
            if let Some(index) = conn_index {
                let conn = &mut self.conns[index as usize];
                if let Some(start) = conn.stream_offset(tcp.seq) {
                    account_sent(
                        &mut self.stats,
                        &mut conn.sendq,
                        start,
                        tcp.payload_len as u64,
                        true,
                    );
                }
            }
        }
        let offload = self.prepare_tcp_checksum(buffer, &tcp, tso, None);
        self.stage_whole(slot, build, buffer, offload, segments_start);
    }

    fn note_syn(&mut self, tcp: &TcpFrame) {
        if tcp.flags & TCP_SYN == 0 {
            return;
        }
        let flow = tcp.flow();
        match self.flows.get(&flow) {
            Some(&index) => self.conns[index as usize].iss = Some(tcp.seq),
            None => {
                if self.pending_iss.len() > 4096 {
                    self.pending_iss.clear(); // stale half-open flows; bounded memory
                }
                self.pending_iss.insert(flow, tcp.seq);
            }
        }
    }

    /// Stages a frame whose bytes are all in the build buffer.
    fn stage_whole(
        &mut self,
        slot: u32,
        build: BuildBuffer,
        buffer: &[u8],
        offload: TxOffload,
        segments_start: usize,
    ) {
        let iova = match build {
            BuildBuffer::Slot => self.slot_iova(slot),
            BuildBuffer::Jumbo(j) => {
                let (region, _, size) = self.jumbo.as_ref().expect("jumbo buffers exist");
                region.iova() + (j as usize * size) as u64
            }
            BuildBuffer::Scratch => {
                // Only TSO-sized frames land here, and only when every jumbo buffer is busy.
                self.stats.tx_dropped_no_buffer += 1;
                self.abandon_slot(slot, build);
                return;
            }
        };
        self.staged_segments.push(TxSegment {
            iova,
            len: buffer.len() as u32,
        });
        let record = &mut self.records[slot as usize];
        record.conn = NO_CONN;
        record.jumbo = match build {
            BuildBuffer::Jumbo(j) => Some(j),
            _ => None,
        };
        self.stage(slot, segments_start, offload);
    }

    fn stage(&mut self, slot: u32, segments_start: usize, offload: TxOffload) {
        self.budget = self.budget.saturating_sub(1);
        self.staged.push_back(Staged {
            slot,
            segments: segments_start..self.staged_segments.len(),
            offload,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn stage_zero_copy(
        &mut self,
        slot: u32,
        build: BuildBuffer,
        buffer: &mut [u8],
        tcp: &TcpFrame,
        index: u32,
        stream: Range<u64>,
        tso: Option<Tso>,
        segments_start: usize,
    ) {
        self.stats.placeholder_bytes_copied += tcp.payload_len as u64;
        let header_len = tcp.header_len;
        // Header chain entry first; the payload comes from the send queue.
        let header = TxSegment {
            iova: self.slot_iova(slot),
            len: header_len as u32,
        };
        self.staged_segments.push(header);
        let conn = &self.conns[index as usize];
        let segments = &mut self.staged_segments;
        let (sent_max, mut position, mut new_file_bytes) =
            (conn.sendq.sent_max, stream.start, 0u64);
        let mapped = conn
            .sendq
            .for_each_piece(stream.clone(), &self.pool, |piece| {
                let end = position + piece.bytes.len() as u64;
                if piece.is_file {
                    new_file_bytes += end.saturating_sub(position.max(sent_max));
                }
                position = end;
                // Merge pieces contiguous in IOVA space (but never into the header).
                let has_payload = segments.len() > segments_start + 1;
                match segments.last_mut() {
                    Some(last) if has_payload && last.iova + last.len as u64 == piece.iova => {
                        last.len += piece.bytes.len() as u32;
                    }
                    _ => segments.push(TxSegment {
                        iova: piece.iova,
                        len: piece.bytes.len() as u32,
                    }),
                }
            });
        if mapped.is_err() {
            // smoltcp sent bytes we never queued: a bug; never put placeholders on the wire.
            tracing::error!("TX segment {stream:?} is not in the send queue; frame dropped");
            self.stats.tx_unmapped_drops += 1;
            self.staged_segments.truncate(segments_start);
            self.abandon_slot(slot, build);
            return;
        }
        self.stats.file_bytes_sent += new_file_bytes;
        let too_many = self.staged_segments.len() - segments_start > self.caps.max_tx_segments;
        if too_many {
            // Too fragmented for the NIC: linearize into the slot (or jumbo) like
            // skb_linearize. Counted as copied payload.
            self.staged_segments.truncate(segments_start);
            return self.linearize(slot, build, buffer, tcp, index, stream, tso, segments_start);
        }
        let offload = self.prepare_tcp_checksum(buffer, tcp, tso, Some((index, stream.clone())));
        if build != BuildBuffer::Slot {
            // SAFETY: as in finish_frame: the slot is ours and not in flight.
            let slot_bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    self.slots_host.add(slot as usize * SLOT_SIZE),
                    header_len,
                )
            };
            slot_bytes.copy_from_slice(&buffer[..header_len]);
            if let BuildBuffer::Jumbo(j) = build {
                self.free_jumbo.push(j);
            }
        }
        let conn = &mut self.conns[index as usize];
        conn.sendq.add_dma_refs(stream.clone(), 1);
        self.stats.zero_copy_frames += 1;
        account_sent(
            &mut self.stats,
            &mut conn.sendq,
            stream.start,
            stream.end - stream.start,
            false,
        );
        let record = &mut self.records[slot as usize];
        record.conn = index;
        record.generation = conn.generation;
        record.stream = stream;
        record.jumbo = None;
        self.stage(slot, segments_start, offload);
    }

    #[allow(clippy::too_many_arguments)]
    fn linearize(
        &mut self,
        slot: u32,
        build: BuildBuffer,
        buffer: &mut [u8],
        tcp: &TcpFrame,
        index: u32,
        stream: Range<u64>,
        tso: Option<Tso>,
        segments_start: usize,
    ) {
        if build == BuildBuffer::Scratch {
            self.stats.tx_dropped_no_buffer += 1;
            self.abandon_slot(slot, build);
            return;
        }
        let mut at = tcp.header_len;
        let conn = &self.conns[index as usize];
        conn.sendq
            .for_each_piece(stream.clone(), &self.pool, |piece| {
                buffer[at..at + piece.bytes.len()].copy_from_slice(piece.bytes);
                at += piece.bytes.len();
            })
            .expect("mapped just before");
        self.stats.linearized_frames += 1;
        self.stats.payload_bytes_copied += tcp.payload_len as u64;
        let conn = &mut self.conns[index as usize];
        account_sent(
            &mut self.stats,
            &mut conn.sendq,
            stream.start,
            stream.end - stream.start,
            false,
        );
        let offload = self.prepare_tcp_checksum(buffer, tcp, tso, None);
        self.stage_whole(slot, build, buffer, offload, segments_start);
    }

    /// Fills the TCP checksum field: the pseudo-header sum for the NIC to complete, or the
    /// final checksum computed here. `payload_from` names the send-queue range that holds
    /// the payload when it is not in `buffer` (zero-copy).
    fn prepare_tcp_checksum(
        &mut self,
        buffer: &mut [u8],
        tcp: &TcpFrame,
        tso: Option<Tso>,
        payload_from: Option<(u32, Range<u64>)>,
    ) -> TxOffload {
        let field = tcp.checksum_field();
        if self.caps.tcp_checksum {
            // Intel-style TSO (queue API, `TsoHeaders`): the NIC computes the IPv4 header
            // checksum of every segment by summing the header as it is (IPCSO), so the field
            // must be zero, and the pseudo-header sum leaves the length out. virtio-style TSO
            // takes the headers of the large packet at face value, as smoltcp built them.
            let per_segment = tso.is_some() && self.caps.tso_headers == TsoHeaders::PerSegment;
            if per_segment {
                buffer[tcp.ip + 10..tcp.ip + 12].fill(0);
            }
            let length = if per_segment { 0 } else { tcp.tcp_len() as u32 };
            let pseudo = ipv4_pseudo_header(tcp.src, tcp.dst, IP_PROTOCOL_TCP, length);
            buffer[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
            return TxOffload {
                ipv4_header: per_segment.then_some(tcp.ip as u16),
                l4_checksum: Some(L4Checksum {
                    protocol: L4Protocol::Tcp,
                    start: tcp.tcp as u16,
                    field: field as u16,
                }),
                tso,
            };
        }
        // Software checksum. The payload bytes are pinned: they cannot change between this
        // sum and the NIC's DMA.
        buffer[field..field + 2].fill(0);
        let mut sum = Checksum::new();
        sum.add_word(ipv4_pseudo_header(
            tcp.src,
            tcp.dst,
            IP_PROTOCOL_TCP,
            tcp.tcp_len() as u32,
        ));
        sum.add(&buffer[tcp.tcp..tcp.header_len]);
        match payload_from {
            Some((index, stream)) => {
                self.conns[index as usize]
                    .sendq
                    .for_each_piece(stream, &self.pool, |piece| sum.add(piece.bytes))
                    .expect("mapped just before");
            }
            None => sum.add(&buffer[tcp.header_len..]),
        }
        self.stats.software_checksum_bytes += tcp.tcp_len() as u64;
        buffer[field..field + 2].copy_from_slice(&sum.finish().to_be_bytes());
        TxOffload::default()
    }
}

/// First transmissions and retransmissions of `start..start+len`.
fn account_sent(
    stats: &mut StackStats,
    sendq: &mut SendQueue,
    start: u64,
    len: u64,
    _copied: bool,
) {
    let end = start + len;
    if start < sendq.sent_max {
        stats.retransmitted_segments += 1;
        stats.retransmitted_bytes += end.min(sendq.sent_max) - start;
    }
    if end > sendq.sent_max {
        stats.payload_bytes_sent += end - start.max(sendq.sent_max);
        sendq.sent_max = end;
    }
}

/// A [`NetQueue`] plus the transmit path: what smoltcp's `Interface` polls.
pub struct NicDevice<Q: NetQueue> {
    pub nic: Q,
    pub tx: TxPath,
    /// Receive scratch: each received frame is copied here (volatile reads) before smoltcp
    /// sees it, since the RX buffer itself is device-writable memory.
    pub rx_frame: Box<[u8]>,
}

impl<Q: NetQueue> NicDevice<Q> {
    /// Collects TX completions from the NIC.
    pub fn reap(&mut self) -> Result<usize, driver::DriverError> {
        let tx = &mut self.tx;
        self.nic.tx_reap(&mut |token| tx.complete(token))
    }

    /// Sets how many frames smoltcp may build before the next [`NicDevice::submit`].
    pub fn open_tx_window(&mut self) {
        let pending = self.tx.staged.len();
        self.tx.budget = self.nic.tx_capacity(3).saturating_sub(pending);
    }

    /// Hands staged frames to the NIC and rings its doorbell once. Frames the ring cannot
    /// take yet stay staged, in order, for the next poll.
    pub fn submit(&mut self) -> usize {
        let mut submitted = 0;
        while let Some(staged) = self.tx.staged.front() {
            let segments = &self.tx.staged_segments[staged.segments.clone()];
            match self
                .nic
                .tx_enqueue(segments, &staged.offload, staged.slot as u64)
            {
                Ok(()) => {
                    self.tx.staged.pop_front();
                    submitted += 1;
                }
                Err(driver::DriverError::TxRingFull) => break,
                Err(e) => {
                    // Malformed for this NIC: drop it (TCP retransmits) and free its slot.
                    tracing::warn!("NIC refused a frame: {e}");
                    let staged = self.tx.staged.pop_front().unwrap();
                    self.tx.stats.tx_refused += 1;
                    self.tx.complete(staged.slot as u64);
                }
            }
        }
        if self.tx.staged.is_empty() {
            self.tx.staged_segments.clear();
        }
        if submitted > 0 {
            self.nic.tx_flush();
        }
        submitted
    }
}

/// Receives one frame: lends the NIC's RX buffer to smoltcp (no copy).
pub struct NicRxToken<'a, Q: NetQueue> {
    nic: &'a mut Q,
    buffer: RxBuffer,
    /// Where the frame is copied out of device-writable memory for smoltcp to parse.
    frame: &'a mut [u8],
}

impl<Q: NetQueue> phy::RxToken for NicRxToken<'_, Q> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let result = f(self.nic.rx_read(&self.buffer, self.frame));
        self.nic.rx_recycle(self.buffer);
        result
    }
}

/// Builds one frame (see the module docs).
pub struct NicTxToken<'a> {
    tx: &'a mut TxPath,
    tso_mss: Option<u16>,
}

impl phy::TxToken for NicTxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let tx = self.tx;
        let Some(slot) = tx.free_slots.pop() else {
            // Only reachable through the TX token of an RX pair: build and drop.
            tx.stats.tx_dropped_no_buffer += 1;
            let mut scratch = std::mem::take(&mut tx.scratch);
            scratch.resize(scratch.len().max(len), 0);
            let result = f(&mut scratch[..len]);
            tx.scratch = scratch;
            return result;
        };
        let build = if len <= SLOT_SIZE {
            BuildBuffer::Slot
        } else if let Some(j) = tx.free_jumbo.pop() {
            BuildBuffer::Jumbo(j)
        } else {
            BuildBuffer::Scratch
        };
        if build == BuildBuffer::Scratch {
            let mut scratch = std::mem::take(&mut tx.scratch);
            scratch.resize(scratch.len().max(len), 0);
            let result = f(&mut scratch[..len]);
            tx.finish_frame(slot, build, &mut scratch[..len], self.tso_mss);
            tx.scratch = scratch;
            return result;
        }
        // SAFETY: the slot or jumbo buffer is ours: its previous frame's token came back (or
        // it was never used), so neither the device nor any Rust reference accesses it; the
        // memory is owned by a DmaRegion that outlives this call. In bounds: len <= SLOT_SIZE
        // or <= the jumbo size (asserted).
        let buffer: &mut [u8] = unsafe {
            match build {
                BuildBuffer::Jumbo(j) => {
                    let (_, host, size) = tx.jumbo.as_ref().expect("jumbo buffers exist");
                    assert!(len <= *size, "frame larger than the advertised TSO size");
                    std::slice::from_raw_parts_mut(host.add(j as usize * size), len)
                }
                _ => std::slice::from_raw_parts_mut(
                    tx.slots_host.add(slot as usize * SLOT_SIZE),
                    len,
                ),
            }
        };
        let result = f(buffer);
        tx.finish_frame(slot, build, buffer, self.tso_mss);
        result
    }

    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.tso_mss = meta.segmentation_offload_size.map(|s| s.get());
    }
}

impl<Q: NetQueue> phy::Device for NicDevice<Q> {
    type RxToken<'a>
        = NicRxToken<'a, Q>
    where
        Self: 'a;
    type TxToken<'a>
        = NicTxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let buffer = self.nic.rx_next()?;
        self.tx.stats.frames_rx += 1;
        Some((
            NicRxToken {
                nic: &mut self.nic,
                buffer,
                frame: &mut self.rx_frame[..],
            },
            NicTxToken {
                tx: &mut self.tx,
                tso_mss: None,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        if !self.tx.can_build() {
            return None;
        }
        Some(NicTxToken {
            tx: &mut self.tx,
            tso_mss: None,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(&self.tx.caps, self.tx.tso_frame)
    }
}

/// What smoltcp is told about the device. smoltcp never computes TCP checksums on transmit
/// (the boundary does, from the real payload); it verifies them on receive.
pub fn capabilities(caps: &Capabilities, tso_frame: Option<usize>) -> DeviceCapabilities {
    let mut checksum = ChecksumCapabilities::default();
    checksum.ipv4 = SmolChecksum::Both;
    checksum.tcp = SmolChecksum::Rx;
    checksum.udp = SmolChecksum::Both;
    checksum.icmpv4 = SmolChecksum::Both;
    let mut d = DeviceCapabilities::default();
    d.medium = Medium::Ethernet;
    d.max_transmission_unit = caps.mtu + ETHERNET_HEADER_LEN;
    d.max_burst_size = None;
    d.checksum = checksum;
    d.segmentation.tcpv4 = tso_frame.and_then(NonZeroUsize::new);
    d
}
