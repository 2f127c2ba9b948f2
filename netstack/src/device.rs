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
//! smoltcp builds every frame in ordinary memory; the boundary parses and edits it there
//! (through `smoltcp::wire`, see [`crate::frame`]) and writes only what the NIC must read
//! from DMA memory into the frame's header slot: the headers of a zero-copy segment, or the
//! whole of a small frame. Every frame *owns* its header slot (and a jumbo buffer, if any) as
//! [`DmaBuffer`] guards until the NIC returns its token (the slot index), so a buffer can
//! neither leak nor be reused under DMA. The frame also names the stream range it reads, so
//! the send-queue items stay referenced (`dma_refs`) until the NIC is done with them.
//!
//! TX frames are *staged* during `Interface::poll` and handed to the NIC afterwards with one
//! `tx_flush` per poll (smoltcp holds an RX token and a TX token at the same time, so the
//! TX token cannot reach the NIC itself).

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::ops::Range;

use driver::dma::{ChunkPool, DeviceChunk, DmaSpace};
use driver::{
    Capabilities, Iova, L4Checksum, L4Protocol, NetQueue, RxBuffer, Tso, TsoHeaders, TxFrame,
    TxOffload, TxSegment,
};
use inet_checksum::{ipv4_pseudo_header, ipv6_pseudo_header, Checksum};
use smoltcp::phy::{
    self, Checksum as SmolChecksum, ChecksumCapabilities, DeviceCapabilities, Medium,
};
use smoltcp::time::Instant;
use smoltcp::wire::IpAddress;

use crate::dmabuf::{BufferPool, DmaBuffer};
use crate::frame::{self, FlowKey, TcpFrame, ETHERNET_HEADER_LEN};
use crate::sendq::{copy_pool, CopyPool, SendMode, SendQueue};
use crate::tls::session::TlsConn;
use crate::tls::tx::{LayoutPiece, OffloadLayout};
use crate::tls::{BuildError, TlsError};
use crate::StackStats;

/// Size of a header slot; also holds any whole frame up to an Ethernet MTU of 1500.
pub const SLOT_SIZE: usize = 2048;
/// Largest TSO frame we ask for (IPv4 total length must fit 16 bits).
const MAX_TSO_FRAME: usize = 65535 + ETHERNET_HEADER_LEN - 1;
/// IP protocol number of TCP, for pseudo-header sums (RFC 9293 section 3.1).
const IP_PROTOCOL_TCP: u8 = 6;
/// Ethernet + IPv4 + TCP headers at their longest (both with 40 bytes of options).
const MAX_HEADERS_LEN: usize = ETHERNET_HEADER_LEN + 60 + 60;
/// The MSS software segmentation reserves header slots for: the MTU less this (IPv4 and
/// TCP headers with 20 bytes of options).
const GSO_RESERVED_MSS_SLACK: usize = 60;
/// Bound on ISS entries of flows not yet bound to a connection.
const MAX_PENDING_ISS: usize = 4096;

/// Per-connection state the device boundary needs.
pub struct ConnTx {
    pub generation: u32,
    pub flow: Option<FlowKey>,
    /// Initial send sequence number (from the SYN or SYN-ACK smoltcp sent).
    pub iss: Option<u32>,
    pub sendq: SendQueue,
    /// TLS mode: the TCP stream is records (see [`crate::tls`]); `sendq` holds plaintext.
    pub tls: Option<Box<TlsConn>>,
    /// Set when a segment of this connection went out again (a loss); the stack, which
    /// knows the time, takes it to [`crate::congestion::CongestionWindow`].
    pub retransmitted: bool,
}

impl ConnTx {
    /// TCP stream bytes acknowledged.
    pub(crate) fn acked(&self) -> u64 {
        match &self.tls {
            Some(tls) => tls.tx.acked,
            None => self.sendq.acked,
        }
    }

    /// Highest TCP stream offset transmitted so far.
    pub(crate) fn sent_max(&self) -> u64 {
        match &self.tls {
            Some(tls) => tls.tx.sent_max,
            None => self.sendq.sent_max,
        }
    }

    /// Where a segment starting at `seq` lies in the stream, relative to what is known
    /// acknowledged. `None` if the ISS is unknown.
    fn locate(&self, seq: u32) -> Option<SegmentStart> {
        let iss = self.iss?;
        let acked = self.acked();
        let acked_seq = iss.wrapping_add(1).wrapping_add(acked as u32);
        let delta = seq.wrapping_sub(acked_seq) as i32;
        Some(if delta >= 0 {
            SegmentStart::Stream(acked + delta as u64)
        } else if delta == -1 {
            SegmentStart::KeepAlive
        } else {
            SegmentStart::Stale
        })
    }

    /// Stream offset of a segment starting at `seq`, if it lies at or after the
    /// acknowledged point.
    fn stream_offset(&self, seq: u32) -> Option<u64> {
        match self.locate(seq)? {
            SegmentStart::Stream(offset) => Some(offset),
            _ => None,
        }
    }
}

/// Where a TCP segment's first byte lies (see [`ConnTx::locate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SegmentStart {
    /// At this stream offset, at or after the acknowledged point.
    Stream(u64),
    /// One byte before the acknowledged point: a keep-alive probe (RFC 9293 section
    /// 3.8.4), which smoltcp fills with a zero byte.
    KeepAlive,
    /// Further back: acknowledged bytes, which no segment should carry.
    Stale,
}

/// Test-only ways to break the device boundary, to prove that the checks that watch it
/// (the poison scan of the wire, sha256 of what arrives) can fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BoundaryFault {
    /// Normal operation.
    #[default]
    None,
    /// Send zero-copy segments as smoltcp built them (placeholder payload) instead of
    /// mapping them to the send queue: what a broken mapping would put on the wire.
    #[cfg(feature = "test-hooks")]
    SendPlaceholders,
    /// Sum an IPv6 frame's TCP pseudo-header the IPv4 way (the addresses' last four bytes,
    /// no 32-bit length): what a stack that never learnt IPv6 would write. The peer must
    /// drop every such segment.
    #[cfg(feature = "test-hooks")]
    Ipv6PseudoHeaderAsIpv4,
}

/// A frame between staging and TX completion. It owns its DMA buffers (returned to their
/// pools when it is dropped) and names the stream range whose items it reads.
struct Frame {
    /// The header slot; its index is the frame's TX token.
    slot: DmaBuffer,
    /// A jumbo buffer holding the whole frame (TSO-sized frames built inline). Held only
    /// to keep it from the pool until the NIC is done with it.
    _jumbo: Option<DmaBuffer>,
    /// The DMA chunk holding a TLS frame's payload. Held only to keep it from the pool
    /// until the NIC is done with it.
    _cipher: Option<DeviceChunk>,
    /// TLS bytes this frame's buffers hold (counted in `tls_ciphertext_held_now`).
    tls_held: u32,
    /// `(connection index, generation, stream range)` of the send-queue items it reads.
    reads: Option<(u32, u32, Range<u64>)>,
}

impl Frame {
    fn token(&self) -> u64 {
        self.slot.index() as u64
    }
}

/// A zero-copy segment whose payload lies at `stream` in connection `conn`'s send queue.
struct MappedSegment {
    tcp: TcpFrame,
    conn: u32,
    stream: Range<u64>,
    tso: Option<Tso>,
}

struct Staged {
    frame: Frame,
    segments: Range<usize>,
    offload: TxOffload,
    /// Records the NIC encrypts inline (see [`TxPath::stage_tls_inline`]).
    tls: Option<StagedTls>,
}

/// Most record parts of one inline-TLS frame the stack describes (the queue API's view of
/// them is built on the stack, in an array of this size).
const MAX_INLINE_RECORDS: usize = 16;

/// The inline-TLS descriptor of a staged frame, owned until it is handed to the NIC (then
/// kept for the next frame, so staging does not allocate).
#[derive(Default)]
struct StagedTls {
    parts: Vec<StagedPart>,
    resync: Vec<TxSegment>,
}

struct StagedPart {
    key: driver::TlsKeyId,
    cipher: driver::TlsCipher,
    key_bytes: [u8; 32],
    key_len: usize,
    iv: [u8; 12],
    seq: u64,
    inner_len: u32,
    frame_offset: u32,
    record_offset: u32,
    len: u32,
    resync: Range<usize>,
}

/// Device-independent transmit state: header slots, frames in flight, connection send
/// queues.
pub struct TxPath {
    caps: Capabilities,
    tso_frame: Option<usize>,
    /// Largest segment smoltcp builds for software segmentation (`TxConfig::gso`).
    gso_frame: Option<usize>,
    /// Header slots a frame smoltcp builds may need: one, or the MSS-sized frames of a
    /// software-segmented one.
    slots_per_frame: usize,
    slots: BufferPool,
    jumbo: Option<BufferPool>,
    /// Frames the NIC holds, by token (= slot index).
    in_flight: Vec<Option<Frame>>,
    staged: VecDeque<Staged>,
    staged_segments: Vec<TxSegment>,
    /// Working memory of a GSO segment's payload spans (kept, so staging does not allocate).
    gso_spans: Vec<GsoSpan>,
    /// Frames smoltcp may still build this poll once every socket has had its turn (see
    /// [`TxPath::may_transmit`]).
    budget: usize,
    /// smoltcp is still in its first pass over the sockets this poll: no flow has built a
    /// second frame yet.
    first_pass: bool,
    /// Flows that built a frame through [`NicDevice::transmit`] this poll.
    egress_flows: std::collections::HashSet<FlowKey, FlowHashBuilder>,
    /// Where the segments of the frame being staged begin in `staged_segments`.
    frame_start: usize,
    /// Where smoltcp builds every frame (ordinary memory); the boundary then writes the
    /// headers (or the whole frame) into the frame's DMA buffer.
    build: Vec<u8>,
    pub pool: CopyPool,
    pub conns: Vec<ConnTx>,
    pub flows: HashMap<FlowKey, u32, FlowHashBuilder>,
    /// ISS of flows whose connection is not bound yet (accepted sockets).
    pub pending_iss: HashMap<FlowKey, u32, FlowHashBuilder>,
    /// Flows whose handshake a listening socket is in the middle of (as of the last poll).
    pub handshaking: std::collections::HashSet<FlowKey, FlowHashBuilder>,
    /// Per listening port, sockets still in LISTEN (as of the last poll, less the new SYNs
    /// let through since). A SYN beyond them would be answered with a RST by smoltcp (no
    /// socket to take it); it is dropped instead, so the client retries it, as Linux does
    /// when a listen queue is full.
    pub listen_room: Vec<(u16, u32)>,
    /// How connections without a send queue entry transmit (the stack's mode).
    default_mode: SendMode,
    /// smoltcp left the payload of the frame being staged unwritten (`FrameMeta`).
    payload_unwritten: bool,
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    fault: BoundaryFault,
    dma: std::sync::Arc<DmaSpace>,
    /// DMA chunks for the TLS bytes of TSO-sized frames (see [`TxPath::enable_tls`]).
    cipher: Option<ChunkPool>,
    /// DMA chunks for the TLS bytes of frames up to [`SLOT_SIZE`], one per header slot.
    cipher_small: Option<ChunkPool>,
    /// Working memory of records sealed in part.
    tls_scratch: Vec<u8>,
    /// Working memory of inline-TLS frame layouts, and descriptors to reuse.
    tls_layout: OffloadLayout,
    spare_tls: Vec<StagedTls>,
    pub stats: StackStats,
}

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
    /// Without TSO, segment in software (GSO): smoltcp is told the device takes 64 KiB
    /// IPv4 segments and builds one where it would build 45 MSS-sized ones, and the
    /// boundary cuts it into MSS-sized frames (`TxPath::stage_gso`). smoltcp's work per
    /// segment (socket dispatch, headers, timers) is then done once per 64 KiB, the
    /// boundary's per frame is a header copy and a few fields.
    pub gso: bool,
    /// Copy blocks one connection may hold at most, so one client cannot take the pool.
    pub copy_blocks_per_conn: usize,
    /// Normal operation, or a deliberately broken boundary (tests only).
    pub fault: BoundaryFault,
}

impl TxPath {
    pub fn new(
        dma: &std::sync::Arc<DmaSpace>,
        caps: Capabilities,
        config: &TxConfig,
        default_mode: SendMode,
    ) -> driver::Result<Self> {
        let slots = BufferPool::new(dma, config.slots, SLOT_SIZE)?;
        // TSO needs the NIC to fix IPv4 and TCP checksums, and room for the header chain.
        let max_by_segments =
            ETHERNET_HEADER_LEN + 60 + 60 + (caps.max_tx_segments.saturating_sub(3)) * 4096;
        let tso_frame = caps
            .tso_max_frame
            .filter(|_| config.tso && caps.tcp_checksum)
            .map(|m| (m as usize).min(MAX_TSO_FRAME).min(max_by_segments))
            .filter(|&m| m > caps.mtu + ETHERNET_HEADER_LEN);
        // GSO pieces of a 64 KiB segment at the smallest MSS the slots are reserved for
        // (a peer's MSS option below it makes pieces beyond the reservation wait for a
        // retransmission, counted in `tx_dropped_no_buffer`).
        // Without room for four such segments in flight, GSO would starve the ring: off.
        let gso_slots = MAX_TSO_FRAME.div_ceil(caps.mtu - GSO_RESERVED_MSS_SLACK);
        let gso_frame = Some(MAX_TSO_FRAME)
            .filter(|_| tso_frame.is_none() && config.gso && 4 * gso_slots <= config.slots);
        let slots_per_frame = if gso_frame.is_some() { gso_slots } else { 1 };
        let jumbo = match tso_frame {
            Some(size) if config.jumbo_buffers > 0 => Some(BufferPool::new(
                dma,
                config.jumbo_buffers,
                size.div_ceil(4096) * 4096,
            )?),
            _ => None,
        };
        Ok(Self {
            caps,
            tso_frame,
            gso_frame,
            slots_per_frame,
            in_flight: (0..slots.capacity()).map(|_| None).collect(),
            slots,
            jumbo,
            staged: VecDeque::with_capacity(config.slots),
            staged_segments: Vec::with_capacity(config.slots * 4),
            gso_spans: Vec::with_capacity(if gso_frame.is_some() { 64 } else { 0 }),
            budget: 0,
            first_pass: true,
            egress_flows: Default::default(),
            frame_start: 0,
            build: vec![0; tso_frame.or(gso_frame).unwrap_or(SLOT_SIZE).max(SLOT_SIZE)],
            pool: copy_pool(dma, config.copy_blocks)?,
            conns: Vec::new(),
            flows: HashMap::default(),
            pending_iss: HashMap::default(),
            handshaking: Default::default(),
            listen_room: Vec::new(),
            default_mode,
            payload_unwritten: false,
            fault: config.fault,
            dma: std::sync::Arc::clone(dma),
            cipher: None,
            cipher_small: None,
            tls_scratch: Vec::new(),
            tls_layout: OffloadLayout::default(),
            spare_tls: Vec::new(),
            stats: StackStats::default(),
        })
    }

    /// Prepares for TLS connections: `buffers` DMA chunks for the TLS bytes of TSO-sized
    /// frames, and one small chunk per header slot for the TLS bytes of the others. The
    /// record layer writes ciphertext straight into them (see [`ChunkPool`]).
    pub fn enable_tls(&mut self, buffers: usize) -> driver::Result<()> {
        if self.cipher_small.is_some() {
            return Ok(());
        }
        if let Some(size) = self.tso_frame {
            self.cipher = Some(ChunkPool::new(
                &self.dma,
                buffers.max(1),
                size.div_ceil(4096) * 4096,
            )?);
        }
        self.cipher_small = Some(ChunkPool::new(&self.dma, self.slots.capacity(), SLOT_SIZE)?);
        Ok(())
    }

    /// Largest frame handed to the NIC with TSO, if TSO is used.
    pub fn tso_frame(&self) -> Option<usize> {
        self.tso_frame
    }

    /// Largest segment smoltcp may build: a TSO frame, or one the boundary segments itself.
    pub fn segment_frame(&self) -> Option<usize> {
        self.tso_frame.or(self.gso_frame)
    }

    /// Frames in flight (header slots in use).
    pub fn frames_in_flight(&self) -> usize {
        self.slots.capacity() - self.slots.free_count()
    }

    /// A frame built now can be staged: a header slot is free (and, with TLS connections,
    /// a cipher buffer: dropping a built frame would cost a retransmission timeout). It
    /// waits in `staged` if the ring is full.
    fn can_stage(&self) -> bool {
        self.slots.free_count() >= self.slots_per_frame
            && self.cipher.as_ref().is_none_or(|c| c.free_count() > 0)
    }

    /// Whether smoltcp's egress gets a TX token now. smoltcp serves sockets in the fixed
    /// order of its socket set, one frame per socket per pass, and ends the poll's egress at
    /// the first socket it gets no token for. Cutting the first pass at the ring's budget
    /// let the sockets ahead in the set take every poll's frames while they had data, and
    /// starved those behind (a listening socket's SYN-ACK for 25 s under connection churn
    /// on an e1000, whose ring takes 36 frames a poll). So the first pass is bounded by the
    /// header slots only, and the ring budget applies from the second pass on.
    fn may_transmit(&self) -> bool {
        self.can_stage() && (self.first_pass || self.budget > 0)
    }

    /// The NIC finished reading the frame with this token.
    pub fn complete(&mut self, token: u64) {
        match self
            .in_flight
            .get_mut(token as usize)
            .and_then(Option::take)
        {
            Some(frame) => self.retire(frame),
            None => tracing::error!("NIC completed TX token {token}, which it was never given"),
        }
    }

    /// Drops a frame the NIC no longer reads: its items lose a DMA reference, its buffers
    /// go back to their pools.
    fn retire(&mut self, frame: Frame) {
        self.stats.tls_ciphertext_held_now -= frame.tls_held as u64;
        if let Some((index, generation, stream)) = &frame.reads {
            if let Some(conn) = self.conns.get_mut(*index as usize) {
                if conn.generation == *generation {
                    conn.sendq.add_dma_refs(stream.clone(), -1);
                }
            }
        }
    }

    /// smoltcp built a frame in `self.build[..len]` (for its egress, or as the answer to a
    /// received frame); turn it into a staged descriptor chain.
    fn finish_frame(&mut self, len: usize, meta: FrameMeta, egress: bool) {
        self.stats.frames_tx += 1;
        self.payload_unwritten = meta.payload_unwritten;
        let tso_mss = meta.tso_mss;
        let Some(slot) = self.slots.take() else {
            // Not reachable: `receive` and `transmit` hand out tokens only with a slot free.
            self.stats.tx_dropped_no_buffer += 1;
            return;
        };
        let mut build = std::mem::take(&mut self.build);
        self.stage_frame(slot, &mut build[..len], tso_mss, egress);
        self.build = build;
    }

    fn stage_frame(
        &mut self,
        slot: DmaBuffer,
        buffer: &mut [u8],
        tso_mss: Option<u16>,
        egress: bool,
    ) {
        self.frame_start = self.staged_segments.len();
        let Some(tcp) = frame::parse_tcp(buffer) else {
            return self.stage_whole(slot, buffer, TxOffload::default());
        };
        // A flow's second frame of this poll's egress: smoltcp has gone through every
        // socket once (a socket builds one frame per pass).
        if egress && self.first_pass && !self.egress_flows.insert(tcp.flow()) {
            self.first_pass = false;
        }
        self.note_syn(&tcp);
        if let Some(mss) = tso_mss.filter(|_| self.gso_frame.is_some()) {
            if tcp.payload_len > mss as usize && !tcp.is_ipv6() {
                return self.stage_gso(slot, buffer, tcp, mss as usize);
            }
        }
        let conn_index = self.flows.get(&tcp.flow()).copied();
        // smoltcp asks for IPv6 TSO only if told the device has it (see `capabilities`:
        // it is not, for now); checked again here.
        let tso_allowed = self.tso_frame.is_some() && (!tcp.is_ipv6() || self.caps.tso_ipv6);
        let tso = tso_mss.filter(|_| tso_allowed).map(|mss| Tso {
            mss,
            header_len: tcp.header_len as u16,
        });

        // A TLS connection's data segment: records built from the plaintext.
        if let Some(index) = conn_index {
            if tcp.payload_len > 0 && self.conns[index as usize].tls.is_some() {
                return self.stage_tls(slot, buffer, tcp, index, tso);
            }
        }

        // A zero-copy data segment carries placeholders: it goes out only with its payload
        // mapped to the send queue, or not at all.
        if tcp.payload_len > 0 && self.maps_payload(conn_index) {
            let located =
                conn_index.and_then(|i| Some((i, self.conns[i as usize].locate(tcp.seq)?)));
            match located {
                Some((conn, SegmentStart::Stream(start))) => {
                    let segment = MappedSegment {
                        tcp,
                        conn,
                        stream: start..start + tcp.payload_len as u64,
                        tso,
                    };
                    return self.stage_zero_copy(slot, buffer, segment);
                }
                Some((index, SegmentStart::KeepAlive)) if tcp.payload_len == 1 => {
                    // The probe's byte is the last acknowledged one: send the real byte.
                    match self.conns[index as usize].sendq.keepalive_byte() {
                        Some(byte) => {
                            buffer[tcp.header_len] = byte;
                            self.stats.keepalive_probes += 1;
                            let offload = self.prepare_tcp_checksum(buffer, &tcp, None, None);
                            return self.stage_whole(slot, buffer, offload);
                        }
                        None => {
                            return self.drop_unmapped(&tcp, "keep-alive probe before any data")
                        }
                    }
                }
                Some(_) => return self.drop_unmapped(&tcp, "segment of acknowledged bytes"),
                None if conn_index.is_some() => {
                    return self.drop_unmapped(&tcp, "segment of a flow whose ISS is unknown")
                }
                None => return self.drop_unmapped(&tcp, "segment of no known connection"),
            }
        }

        // Everything else goes out as smoltcp built it: copying-mode data, control segments.
        if tcp.payload_len > 0 && self.payload_unwritten {
            // Not reachable: smoltcp leaves the payload unwritten only for connections whose
            // segments are mapped above. What the buffer holds there is stale.
            return self.drop_unmapped(&tcp, "unwritten payload of an unmapped segment");
        }
        if tcp.payload_len > 0 {
            self.stats.payload_bytes_copied += tcp.payload_len as u64; // smoltcp's ring -> frame
            if let Some(index) = conn_index {
                let conn = &mut self.conns[index as usize];
                if let Some(start) = conn.stream_offset(tcp.seq) {
                    let stream = start..start + tcp.payload_len as u64;
                    conn.retransmitted |= account_sent(&mut self.stats, &mut conn.sendq, stream);
                }
            }
        }
        let offload = self.prepare_tcp_checksum(buffer, &tcp, tso, None);
        self.stage_whole(slot, buffer, offload);
    }

    /// Whether data segments of the connection at `conn_index` (`None`: not bound yet) are
    /// zero-copy, their placeholder payload to be mapped to the send queue.
    fn maps_payload(&self, conn_index: Option<u32>) -> bool {
        let mode = match conn_index {
            Some(index) => self.conns[index as usize].sendq.mode,
            None => self.default_mode,
        };
        mode == SendMode::ZeroCopy && !self.sends_placeholders()
    }

    /// Software segmentation (`TxConfig::gso`): stages an IPv4 segment smoltcp built larger
    /// than the MSS as the MSS-sized frames it would otherwise have built: a zero-copy
    /// connection's pieces through [`TxPath::stage_gso_zero_copy`], any other piece through
    /// [`TxPath::stage_frame`]. No payload byte moves: piece `i`'s headers are written just
    /// before its payload in `buffer`, over the end of piece `i - 1`, which is staged
    /// (copied into its slot, or described by IOVA) by then.
    fn stage_gso(&mut self, first_slot: DmaBuffer, buffer: &mut [u8], tcp: TcpFrame, mss: usize) {
        self.stats.gso_segments += 1;
        // A zero-copy connection's data (the common case).
        let conn_index = self.flows.get(&tcp.flow()).copied();
        let zero_copy = conn_index
            .filter(|&index| {
                self.conns[index as usize].tls.is_none() && self.maps_payload(conn_index)
            })
            .and_then(|index| match self.conns[index as usize].locate(tcp.seq)? {
                SegmentStart::Stream(start) => Some((index, start)),
                _ => None,
            });
        if let Some((conn, start)) = zero_copy {
            return self.stage_gso_zero_copy(first_slot, buffer, tcp, mss, conn, start);
        }
        let cutter = GsoCutter::new(buffer, tcp, mss);
        let mut slot = Some(first_slot);
        for index in 0..cutter.pieces {
            let Some(slot) = slot.take().or_else(|| self.slots.take()) else {
                // Only with a peer MSS below the reservation (`slots_per_frame`).
                self.stats.tx_dropped_no_buffer += (cutter.pieces - index) as u64;
                break;
            };
            let (piece, _) = cutter.cut(buffer, index);
            self.stats.gso_frames += 1;
            // Not `egress`: the flow's first frame of the poll was noted for the segment.
            self.stage_frame(slot, piece, None, false);
        }
    }

    /// [`TxPath::stage_gso`] of a zero-copy connection's segment at stream offset `start`.
    /// What does not depend on the piece is done once for the segment: the send-queue walk
    /// to the payload's IOVA spans (each piece then takes the next `len` bytes of them), the
    /// DMA references (every piece's frame holds one on the whole segment's items), and the
    /// pseudo-header's address sum.
    fn stage_gso_zero_copy(
        &mut self,
        first_slot: DmaBuffer,
        buffer: &mut [u8],
        tcp: TcpFrame,
        mss: usize,
        conn: u32,
        start: u64,
    ) {
        let stream = start..start + tcp.payload_len as u64;
        let mut spans = std::mem::take(&mut self.gso_spans);
        spans.clear();
        let sendq = &self.conns[conn as usize].sendq;
        let sent_max = sendq.sent_max;
        let mapped = sendq.for_each_piece(stream.clone(), |piece| match spans.last_mut() {
            Some(last) if last.file == piece.is_file() && last.iova + last.len == piece.iova => {
                last.len += piece.len as u64;
            }
            _ => spans.push(GsoSpan {
                iova: piece.iova,
                len: piece.len as u64,
                file: piece.is_file(),
            }),
        });
        if mapped.is_err() {
            // smoltcp sent bytes we never queued: a bug; never put placeholders on the wire.
            self.gso_spans = spans;
            return self.drop_unmapped(&tcp, "segment not in the send queue");
        }
        // RFC 9293 section 3.1: addresses and protocol, the same for every piece; a piece
        // adds its own TCP length (one's-complement addition is associative).
        let pseudo_base = match (tcp.src, tcp.dst) {
            (IpAddress::Ipv4(src), IpAddress::Ipv4(dst)) => {
                ipv4_pseudo_header(src.octets(), dst.octets(), IP_PROTOCOL_TCP, 0)
            }
            _ => unreachable!("GSO segments are IPv4 (stage_frame)"),
        };
        let cutter = GsoCutter::new(buffer, tcp, mss);
        let (mut span, mut span_used) = (0usize, 0u64);
        let mut referencing = 0i32;
        let mut slot = Some(first_slot);
        for index in 0..cutter.pieces {
            let Some(slot) = slot.take().or_else(|| self.slots.take()) else {
                // Only with a peer MSS below the reservation (`slots_per_frame`).
                self.stats.tx_dropped_no_buffer += (cutter.pieces - index) as u64;
                break;
            };
            let (piece, piece_tcp) = cutter.cut(buffer, index);
            self.stats.gso_frames += 1;
            if !self.payload_unwritten {
                self.stats.placeholder_bytes_copied += piece_tcp.payload_len as u64;
            }
            let at = start + (index * mss) as u64;
            let piece_stream = at..at + piece_tcp.payload_len as u64;
            // The header chain entry, then the piece's payload from the segment's spans.
            let frame_start = self.staged_segments.len();
            self.frame_start = frame_start;
            self.staged_segments.push(TxSegment {
                iova: slot.iova(0),
                len: piece_tcp.header_len as u32,
            });
            let (mut position, mut left, mut new_file_bytes) =
                (at, piece_tcp.payload_len as u64, 0u64);
            while left > 0 {
                let from = spans[span];
                let take = (from.len - span_used).min(left);
                self.staged_segments.push(TxSegment {
                    iova: from.iova + span_used,
                    len: take as u32,
                });
                if from.file {
                    new_file_bytes += (position + take).saturating_sub(position.max(sent_max));
                }
                (position, left, span_used) = (position + take, left - take, span_used + take);
                if span_used == from.len {
                    (span, span_used) = (span + 1, 0);
                }
            }
            self.stats.file_bytes_sent += new_file_bytes;
            let segment = MappedSegment {
                tcp: piece_tcp,
                conn,
                stream: piece_stream.clone(),
                tso: None,
            };
            if self.too_fragmented(frame_start) {
                self.linearize(slot, piece, segment);
                continue;
            }
            let offload = if self.caps.tcp_checksum {
                let pseudo = inet_checksum::add(pseudo_base, piece_tcp.tcp_len() as u16);
                piece_tcp.set_tcp_checksum(piece, pseudo);
                TxOffload {
                    l4_checksum: Some(tcp_checksum_request(&piece_tcp)),
                    ..TxOffload::default()
                }
            } else {
                let payload = Some((conn, piece_stream.clone()));
                self.prepare_tcp_checksum(piece, &piece_tcp, None, payload)
            };
            // Each piece's frame reads the whole segment's items (one count added below).
            referencing += 1;
            self.stage_mapped(slot, piece, segment, offload, stream.clone());
        }
        if referencing > 0 {
            // One walk for all the pieces; each piece's retirement gives one back.
            self.conns[conn as usize]
                .sendq
                .add_dma_refs(stream, referencing);
        }
        self.gso_spans = spans;
    }

    /// Never put placeholders on the wire: drop a zero-copy segment whose payload cannot
    /// be mapped, and count it. (TCP retransmits it if it was real; a segment that cannot
    /// be mapped at all means the stack lost track of a flow, which the counter exposes.)
    fn drop_unmapped(&mut self, tcp: &TcpFrame, why: &str) {
        self.stats.tx_unmapped_drops += 1;
        tracing::warn!(
            "TX {why} ({} bytes at seq {}, port {} -> {}:{}); frame dropped",
            tcp.payload_len,
            tcp.seq,
            tcp.src_port,
            tcp.dst,
            tcp.dst_port
        );
    }

    /// Whether a received frame is a connection request (SYN without ACK) for a 4-tuple that
    /// has a live connection. Such a SYN is a duplicate (a peer's retransmission that crossed
    /// our SYN-ACK): smoltcp would hand it to the first socket that accepts it, which may be
    /// a listening socket ahead of the connection in its socket set, and that socket would
    /// answer it as a second connection of the same 4-tuple whose replies the peer then
    /// drops. The connection itself has its SYN already; the frame is dropped. A SYN for a
    /// 4-tuple whose connection is closed or closing (`sendq` aborted) is a new incarnation
    /// and goes through. The same holds for a SYN of a 4-tuple whose handshake a listening
    /// socket is in the middle of: that socket retransmits its SYN-ACK on its own.
    ///
    /// A new SYN to a listening port with no socket left in LISTEN is dropped too
    /// ([`TxPath::listen_room`]); one that goes through takes a socket's room.
    fn check_syn(&mut self, tcp: Option<&TcpFrame>) -> SynCheck {
        let Some(tcp) = tcp else {
            return SynCheck::Pass;
        };
        if !tcp.syn || tcp.ack {
            return SynCheck::Pass;
        }
        let flow = FlowKey::new(tcp.dst_port, tcp.src, tcp.src_port);
        let duplicate = self.handshaking.contains(&flow)
            || self
                .flows
                .get(&flow)
                .is_some_and(|&index| !self.conns[index as usize].sendq.is_aborted());
        if duplicate {
            return SynCheck::Duplicate;
        }
        match self
            .listen_room
            .iter_mut()
            .find(|(port, _)| *port == tcp.dst_port)
        {
            Some((_, 0)) => SynCheck::NoRoom,
            Some((_, room)) => {
                *room -= 1;
                SynCheck::Pass
            }
            // Not a listening port: smoltcp answers with a RST, as a closed port should.
            None => SynCheck::Pass,
        }
    }

    /// Learns the ISS of a connection from the SYN (or SYN-ACK) smoltcp sends.
    fn note_syn(&mut self, tcp: &TcpFrame) {
        if !tcp.syn {
            return;
        }
        let flow = tcp.flow();
        if let Some(&index) = self.flows.get(&flow) {
            let conn = &mut self.conns[index as usize];
            match conn.iss {
                // A retransmitted SYN of the connection we know (or its first).
                Some(iss) if iss == tcp.seq => return,
                None => {
                    conn.iss = Some(tcp.seq);
                    return;
                }
                // A new incarnation of the 4-tuple (the old connection is in TIME-WAIT or
                // closed and not reclaimed yet): the old one keeps its ISS but loses the
                // flow, and the new one's ISS waits for its connection to be bound.
                Some(_) => {
                    conn.flow = None;
                    self.flows.remove(&flow);
                }
            }
        }
        if self.pending_iss.len() >= MAX_PENDING_ISS && !self.pending_iss.contains_key(&flow) {
            // More half-open flows than listening sockets could ever hold: stale entries of
            // handshakes that failed. Bounded memory beats keeping them.
            self.stats.pending_iss_evicted += self.pending_iss.len() as u64;
            self.pending_iss.clear();
        }
        self.pending_iss.insert(flow, tcp.seq);
    }

    /// Stages a frame whose bytes are all in `buffer`: written into the slot, or into a
    /// jumbo buffer when larger.
    fn stage_whole(&mut self, mut slot: DmaBuffer, buffer: &[u8], offload: TxOffload) {
        let mut jumbo = None;
        let iova = if buffer.len() <= SLOT_SIZE {
            slot.write(0, buffer);
            slot.iova(0)
        } else {
            // Only TSO-sized frames are this large.
            let Some(mut buffer_for_frame) = self.jumbo.as_ref().and_then(BufferPool::take) else {
                self.stats.tx_dropped_no_buffer += 1;
                return;
            };
            buffer_for_frame.write(0, buffer);
            let iova = buffer_for_frame.iova(0);
            jumbo = Some(buffer_for_frame);
            iova
        };
        self.staged_segments.push(TxSegment {
            iova,
            len: buffer.len() as u32,
        });
        let frame = Frame {
            slot,
            _jumbo: jumbo,
            _cipher: None,
            tls_held: 0,
            reads: None,
        };
        self.stage(frame, offload);
    }

    fn stage(&mut self, frame: Frame, offload: TxOffload) {
        self.stage_with(frame, offload, None);
    }

    fn stage_with(&mut self, frame: Frame, offload: TxOffload, tls: Option<StagedTls>) {
        self.budget = self.budget.saturating_sub(1);
        self.staged.push_back(Staged {
            frame,
            segments: self.frame_start..self.staged_segments.len(),
            offload,
            tls,
        });
    }

    /// Stages a zero-copy segment: headers in the slot, payload by IOVA from the send queue.
    fn stage_zero_copy(&mut self, slot: DmaBuffer, buffer: &mut [u8], seg: MappedSegment) {
        let (tcp, index, start) = (seg.tcp, seg.conn, self.frame_start);
        if !self.payload_unwritten {
            self.stats.placeholder_bytes_copied += tcp.payload_len as u64;
        }
        // Header chain entry first; the payload comes from the send queue.
        self.staged_segments.push(TxSegment {
            iova: slot.iova(0),
            len: tcp.header_len as u32,
        });
        let conn = &self.conns[index as usize];
        let segments = &mut self.staged_segments;
        let (sent_max, mut position, mut new_file_bytes) =
            (conn.sendq.sent_max, seg.stream.start, 0u64);
        let mapped = conn.sendq.for_each_piece(seg.stream.clone(), |piece| {
            let end = position + piece.len as u64;
            if piece.is_file() {
                new_file_bytes += end.saturating_sub(position.max(sent_max));
            }
            position = end;
            // Merge pieces contiguous in IOVA space (but never into the header).
            let has_payload = segments.len() > start + 1;
            match segments.last_mut() {
                Some(last) if has_payload && last.iova + last.len as u64 == piece.iova => {
                    last.len += piece.len as u32;
                }
                _ => segments.push(TxSegment {
                    iova: piece.iova,
                    len: piece.len as u32,
                }),
            }
        });
        if mapped.is_err() {
            // smoltcp sent bytes we never queued: a bug; never put placeholders on the wire.
            self.staged_segments.truncate(start);
            return self.drop_unmapped(&tcp, "segment not in the send queue");
        }
        self.stats.file_bytes_sent += new_file_bytes;
        if self.too_fragmented(start) {
            // Linearize into the slot (or a jumbo buffer) like skb_linearize. Counted as
            // copied payload.
            return self.linearize(slot, buffer, seg);
        }
        let payload = Some((index, seg.stream.clone()));
        let offload = self.prepare_tcp_checksum(buffer, &tcp, seg.tso, payload);
        let reads = seg.stream.clone();
        self.conns[index as usize]
            .sendq
            .add_dma_refs(reads.clone(), 1);
        self.stage_mapped(slot, buffer, seg, offload, reads);
    }

    /// Whether the frame whose segments are staged from `frame_start` on has more than the
    /// NIC takes; if so they are unstaged (the caller linearizes the frame).
    fn too_fragmented(&mut self, frame_start: usize) -> bool {
        let too_many = self.staged_segments.len() - frame_start > self.caps.max_tx_segments;
        if too_many {
            self.staged_segments.truncate(frame_start);
        }
        too_many
    }

    /// The end of a zero-copy frame's staging, its payload segments staged and its checksum
    /// prepared in `buffer`: the headers go into the slot, the bytes count as sent, and the
    /// frame holds the DMA reference on `reads` the caller added until it completes.
    fn stage_mapped(
        &mut self,
        mut slot: DmaBuffer,
        buffer: &[u8],
        seg: MappedSegment,
        offload: TxOffload,
        reads: Range<u64>,
    ) {
        slot.write(0, &buffer[..seg.tcp.header_len]);
        let conn = &mut self.conns[seg.conn as usize];
        self.stats.zero_copy_frames += 1;
        conn.retransmitted |= account_sent(&mut self.stats, &mut conn.sendq, seg.stream);
        let frame = Frame {
            slot,
            _jumbo: None,
            _cipher: None,
            tls_held: 0,
            reads: Some((seg.conn, conn.generation, reads)),
        };
        self.stage(frame, offload);
    }

    /// Stages a data segment of a TLS connection: its TLS bytes (record headers, ciphertext,
    /// tags) are computed from the pinned plaintext straight into a DMA chunk the frame's
    /// payload descriptor points at (a small chunk, or a TSO-sized one), which goes back to
    /// its pool at TX completion. The headers go in the header slot.
    fn stage_tls(
        &mut self,
        mut slot: DmaBuffer,
        buffer: &mut [u8],
        tcp: TcpFrame,
        index: u32,
        tso: Option<Tso>,
    ) {
        let conn = &mut self.conns[index as usize];
        let located = conn.locate(tcp.seq);
        let Some(tls) = conn.tls.as_mut() else {
            return;
        };
        if matches!(tls.error, Some(TlsError::AuditMismatch { .. })) {
            // Being reset: nothing more of it goes out.
            return;
        }
        let start = match located {
            Some(SegmentStart::Stream(start)) => start,
            Some(SegmentStart::KeepAlive) if tcp.payload_len == 1 => {
                match tls.tx.keepalive_byte(&conn.sendq, &mut self.stats) {
                    Some(byte) => {
                        buffer[tcp.header_len] = byte;
                        self.stats.keepalive_probes += 1;
                        let offload = self.prepare_tcp_checksum(buffer, &tcp, None, None);
                        return self.stage_whole(slot, buffer, offload);
                    }
                    None => return self.drop_unmapped(&tcp, "TLS keep-alive probe"),
                }
            }
            Some(_) => return self.drop_unmapped(&tcp, "segment of acknowledged bytes"),
            None => return self.drop_unmapped(&tcp, "segment of a flow whose ISS is unknown"),
        };
        let range = start..start + tcp.payload_len as u64;
        // A NIC that encrypts inline gets the records laid out in plaintext, straight from
        // the pins; what it cannot take (too many pieces or records) is encrypted here.
        if let Some(engine) = self.caps.tls_tx.filter(|_| self.caps.tcp_checksum) {
            let mut layout = std::mem::take(&mut self.tls_layout);
            layout.clear();
            let mut staged = self.spare_tls.pop().unwrap_or_default();
            let described = tls.tx.describe(&conn.sendq, range.clone(), &mut layout);
            let fits = described.is_ok()
                && layout.pieces.len() < self.caps.max_tx_segments
                && tcp.header_len + layout.bytes.len() <= SLOT_SIZE
                && layout.parts.len() <= engine.max_records_per_frame.min(MAX_INLINE_RECORDS)
                && staged_parts(
                    &tls.tx,
                    &layout,
                    (index, conn.generation, tcp.header_len),
                    &engine,
                    &mut staged.parts,
                );
            if fits {
                conn.retransmitted |= tls.tx.account_sent(range, &mut self.stats);
                let generation = conn.generation;
                return self.stage_tls_inline(
                    slot,
                    buffer,
                    (tcp, tso, index, generation),
                    layout,
                    staged,
                );
            }
            self.spare_tls.push(staged);
            self.tls_layout = layout;
        }
        // The chunk the NIC will read the TLS bytes from: the record layer writes them
        // there directly (the one CPU write of ciphertext; see `StackStats`).
        let pool = if tcp.payload_len <= SLOT_SIZE {
            self.cipher_small.as_ref()
        } else {
            self.cipher.as_ref()
        };
        let Some(mut chunk) = pool.and_then(ChunkPool::take) else {
            self.stats.tx_dropped_no_buffer += 1;
            return;
        };
        let payload = &mut chunk.as_mut_slice()[..tcp.payload_len];
        let built = tls.tx.build(
            &conn.sendq,
            range.clone(),
            payload,
            &mut self.tls_scratch,
            &mut self.stats,
        );
        match built {
            Ok(()) => {}
            Err(BuildError::Unmapped) => {
                return self.drop_unmapped(&tcp, "TLS segment not in the record map")
            }
            Err(BuildError::AuditMismatch { epoch, seq }) => {
                // Counted by the record layer. The slice would differ from what the client
                // got the first time: it is not sent, and the connection is reset.
                tracing::error!(
                    "audit: TLS record {seq} (key epoch {epoch}) to {}:{} changed before its \
                     retransmission; resetting the connection",
                    tcp.dst,
                    tcp.dst_port
                );
                tls.audit_failed(epoch, seq);
                return;
            }
        }
        conn.retransmitted |= tls.tx.account_sent(range, &mut self.stats);
        let offload = self.checksum(buffer, &tcp, tso, PayloadAt::Bytes(payload));
        slot.write(0, &buffer[..tcp.header_len]);
        let chunk = chunk.into_device();
        self.staged_segments.push(TxSegment {
            iova: slot.iova(0),
            len: tcp.header_len as u32,
        });
        self.staged_segments.push(TxSegment {
            iova: chunk.iova(0),
            len: tcp.payload_len as u32,
        });
        let tls_bytes = tcp.payload_len as u64;
        self.stats.tls_dma_bytes_written += tls_bytes;
        self.stats.tls_ciphertext_held_now += tls_bytes;
        let frame = Frame {
            slot,
            _jumbo: None,
            _cipher: Some(chunk),
            tls_held: tcp.payload_len as u32,
            reads: None,
        };
        self.stage(frame, offload);
    }

    /// Stages a TLS segment for a NIC that encrypts inline: headers and the stack's bytes
    /// of the layout (record headers, type bytes, tag placeholders) in the header slot, the
    /// data by IOVA from the pins; the records' context goes with the frame.
    fn stage_tls_inline(
        &mut self,
        mut slot: DmaBuffer,
        buffer: &mut [u8],
        (tcp, tso, index, generation): (TcpFrame, Option<Tso>, u32, u32),
        layout: OffloadLayout,
        mut staged: StagedTls,
    ) {
        let offload = self.prepare_tcp_checksum(buffer, &tcp, tso, None);
        let header_len = tcp.header_len;
        slot.write(0, &buffer[..header_len]);
        slot.write(header_len, &layout.bytes);
        let to_segment = |piece: &LayoutPiece| match *piece {
            LayoutPiece::Stack { start, len } => TxSegment {
                iova: slot.iova(header_len + start as usize),
                len,
            },
            LayoutPiece::Dma { iova, len } => TxSegment { iova, len },
        };
        self.staged_segments.push(TxSegment {
            iova: slot.iova(0),
            len: header_len as u32,
        });
        for piece in &layout.pieces {
            let segment = to_segment(piece);
            match self.staged_segments.last_mut() {
                Some(last) if last.iova + last.len as u64 == segment.iova => {
                    last.len += segment.len
                }
                _ => self.staged_segments.push(segment),
            }
        }
        staged.resync.clear();
        staged.resync.extend(layout.resync.iter().map(to_segment));
        let reads = layout.plain.clone().map(|plain| {
            self.conns[index as usize]
                .sendq
                .add_dma_refs(plain.clone(), 1);
            (index, generation, plain)
        });
        self.stats.tls_inline_frames += 1;
        self.stats.tls_inline_bytes += tcp.payload_len as u64;
        self.tls_layout = layout;
        let frame = Frame {
            slot,
            _jumbo: None,
            _cipher: None,
            tls_held: 0,
            reads,
        };
        self.stage_with(frame, offload, Some(staged));
    }

    /// Copies a mapped segment's payload into the frame and stages it whole.
    fn linearize(&mut self, slot: DmaBuffer, buffer: &mut [u8], seg: MappedSegment) {
        let mut at = seg.tcp.header_len;
        let conn = &mut self.conns[seg.conn as usize];
        conn.sendq
            .for_each_piece(seg.stream.clone(), |piece| {
                piece.with_bytes(|bytes| buffer[at..at + bytes.len()].copy_from_slice(bytes));
                at += piece.len;
            })
            .expect("mapped just before");
        self.stats.linearized_frames += 1;
        self.stats.payload_bytes_copied += seg.tcp.payload_len as u64;
        conn.retransmitted |= account_sent(&mut self.stats, &mut conn.sendq, seg.stream);
        let offload = self.prepare_tcp_checksum(buffer, &seg.tcp, seg.tso, None);
        self.stage_whole(slot, buffer, offload);
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
        let payload = match payload_from {
            Some((index, stream)) => PayloadAt::SendQueue(index, stream),
            None => PayloadAt::Frame,
        };
        self.checksum(buffer, tcp, tso, payload)
    }

    /// [`TxPath::prepare_tcp_checksum`] with the payload anywhere.
    fn checksum(
        &mut self,
        buffer: &mut [u8],
        tcp: &TcpFrame,
        tso: Option<Tso>,
        payload: PayloadAt<'_>,
    ) -> TxOffload {
        if self.caps.tcp_checksum {
            // Intel-style TSO (queue API, `TsoHeaders`): the NIC computes the IPv4 header
            // checksum of every segment by summing the header as it is (IPCSO), so the field
            // must be zero, and the pseudo-header sum leaves the length out (IPv6 alike: the
            // NIC adds each segment's upper-layer length). virtio-style TSO takes the headers
            // of the large packet at face value, as smoltcp built them.
            let ipv6 = tcp.is_ipv6();
            let per_segment = tso.is_some() && self.caps.tso_headers == TsoHeaders::PerSegment;
            if per_segment {
                tcp.set_ipv4_checksum(buffer, 0);
            }
            let length = if per_segment { 0 } else { tcp.tcp_len() as u32 };
            let pseudo = self.pseudo_header(tcp, length);
            tcp.set_tcp_checksum(buffer, pseudo);
            return TxOffload {
                ipv4_header: (per_segment && !ipv6).then_some(tcp.ip as u16),
                ipv6_header: (tso.is_some() && ipv6).then_some(tcp.ip as u16),
                l4_checksum: Some(tcp_checksum_request(tcp)),
                tso,
            };
        }
        // Software checksum. The payload bytes are pinned: they cannot change between this
        // sum and the NIC's DMA.
        tcp.set_tcp_checksum(buffer, 0);
        let mut sum = Checksum::new();
        sum.add_word(self.pseudo_header(tcp, tcp.tcp_len() as u32));
        sum.add(&buffer[tcp.tcp..tcp.header_len]);
        match payload {
            PayloadAt::SendQueue(index, stream) => {
                self.conns[index as usize]
                    .sendq
                    .for_each_piece(stream, |piece| piece.with_bytes(|bytes| sum.add(bytes)))
                    .expect("mapped just before");
            }
            PayloadAt::Bytes(bytes) => sum.add(bytes),
            PayloadAt::Frame => sum.add(&buffer[tcp.header_len..]),
        }
        self.stats.software_checksum_bytes += tcp.tcp_len() as u64;
        tcp.set_tcp_checksum(buffer, sum.finish());
        TxOffload::default()
    }
}

/// Fills `out` with the crypto context of a layout's record parts; false if the NIC's
/// engine does not take every one (keys are named by connection index and generation, and
/// epoch).
fn staged_parts(
    tx: &crate::tls::tx::TlsTx,
    layout: &OffloadLayout,
    (index, generation, header_len): (u32, u32, usize),
    engine: &driver::TlsTxCapability,
    out: &mut Vec<StagedPart>,
) -> bool {
    out.clear();
    for part in &layout.parts {
        let Some(key) = tx.key(part.epoch) else {
            return false;
        };
        let (algorithm, key, iv) = key.material();
        let cipher = match algorithm {
            crate::tls::Algorithm::Aes128Gcm => driver::TlsCipher::Aes128Gcm,
            crate::tls::Algorithm::Aes256Gcm => driver::TlsCipher::Aes256Gcm,
        };
        if !engine.supports(cipher) {
            return false;
        }
        let mut key_bytes = [0u8; 32];
        key_bytes[..key.len()].copy_from_slice(key);
        out.push(StagedPart {
            key: driver::TlsKeyId {
                flow: (index as u64) << 32 | generation as u64,
                epoch: part.epoch,
            },
            cipher,
            key_bytes,
            key_len: key.len(),
            iv: *iv,
            seq: part.seq,
            inner_len: part.inner_len,
            frame_offset: header_len as u32 + part.payload_offset,
            record_offset: part.record_offset,
            len: part.len,
            resync: part.resync.clone(),
        });
    }
    true
}

/// The NIC's TCP checksum request for `tcp`: sum from the TCP header on, into its field.
fn tcp_checksum_request(tcp: &TcpFrame) -> L4Checksum {
    L4Checksum {
        protocol: L4Protocol::Tcp,
        start: tcp.tcp as u16,
        field: tcp.checksum_field() as u16,
    }
}

/// A run of a GSO segment's payload contiguous in IOVA space, from one kind of item.
#[derive(Clone, Copy)]
struct GsoSpan {
    iova: Iova,
    len: u64,
    /// File bytes (a pin), as opposed to a copy block.
    file: bool,
}

/// Cuts a segment smoltcp built into MSS-sized IPv4 frames in place (see
/// [`TxPath::stage_gso`]): piece `i`'s headers go just before its payload.
struct GsoCutter {
    headers: [u8; MAX_HEADERS_LEN],
    tcp: TcpFrame,
    mss: usize,
    pieces: usize,
}

impl GsoCutter {
    fn new(buffer: &[u8], tcp: TcpFrame, mss: usize) -> Self {
        let mut headers = [0u8; MAX_HEADERS_LEN];
        // `parse_tcp` bounds IPv4 and TCP headers at 60 bytes each.
        headers[..tcp.header_len].copy_from_slice(&buffer[..tcp.header_len]);
        Self {
            headers,
            tcp,
            mss,
            pieces: tcp.payload_len.div_ceil(mss),
        }
    }

    /// Piece `index` of `buffer` (the segment): its bytes, headers written, and its frame.
    fn cut<'b>(&self, buffer: &'b mut [u8], index: usize) -> (&'b mut [u8], TcpFrame) {
        let header_len = self.tcp.header_len;
        let offset = index * self.mss;
        let len = self.mss.min(self.tcp.payload_len - offset);
        let piece = &mut buffer[offset..offset + header_len + len];
        piece[..header_len].copy_from_slice(&self.headers[..header_len]);
        let last = index + 1 == self.pieces;
        let tcp = self.tcp.cut_ipv4(piece, index, offset, len, last);
        (piece, tcp)
    }
}

/// Where a frame's TCP payload is, for a software checksum.
enum PayloadAt<'a> {
    /// After the headers in the frame smoltcp built.
    Frame,
    /// At this stream range of connection `.0`'s send queue (zero-copy).
    SendQueue(u32, Range<u64>),
    /// In these bytes (a TLS frame's DMA chunk).
    Bytes(&'a [u8]),
}

impl TxPath {
    /// Whether the test-only fault [`BoundaryFault::SendPlaceholders`] is armed: placeholder
    /// payloads then go out as smoltcp wrote them (`Stack::feed_sockets` has it write them).
    pub(crate) fn sends_placeholders(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.fault == BoundaryFault::SendPlaceholders;
        #[cfg(not(feature = "test-hooks"))]
        false
    }

    /// The pseudo-header sum of `tcp`'s family with upper-layer length `length`: RFC 9293
    /// section 3.1 for IPv4, RFC 8200 section 8.1 for IPv6. The test-only
    /// `BoundaryFault::Ipv6PseudoHeaderAsIpv4` sums an IPv6 frame's as if it were IPv4's.
    fn pseudo_header(&self, tcp: &TcpFrame, length: u32) -> u16 {
        match (tcp.src, tcp.dst) {
            (IpAddress::Ipv4(src), IpAddress::Ipv4(dst)) => {
                ipv4_pseudo_header(src.octets(), dst.octets(), IP_PROTOCOL_TCP, length)
            }
            (IpAddress::Ipv6(src), IpAddress::Ipv6(dst)) => {
                #[cfg(feature = "test-hooks")]
                if self.fault == BoundaryFault::Ipv6PseudoHeaderAsIpv4 {
                    let (s, d) = (src.octets(), dst.octets());
                    let low = |a: [u8; 16]| [a[12], a[13], a[14], a[15]];
                    return ipv4_pseudo_header(low(s), low(d), IP_PROTOCOL_TCP, length);
                }
                ipv6_pseudo_header(src.octets(), dst.octets(), IP_PROTOCOL_TCP, length)
            }
            // `parse_tcp` reads both addresses from one header.
            _ => unreachable!("addresses of one TCP frame are of one family"),
        }
    }
}

/// First transmissions and retransmissions of `stream`. True if any of it was sent before.
fn account_sent(stats: &mut StackStats, sendq: &mut SendQueue, stream: Range<u64>) -> bool {
    let (start, end) = (stream.start, stream.end);
    let again = start < sendq.sent_max;
    if again {
        stats.retransmitted_segments += 1;
        stats.retransmitted_bytes += end.min(sendq.sent_max) - start;
    }
    if end > sendq.sent_max {
        stats.payload_bytes_sent += end - start.max(sendq.sent_max);
        sendq.sent_max = end;
    }
    again
}

/// A [`NetQueue`] plus the transmit path: what smoltcp's `Interface` polls.
pub struct NicDevice<Q: NetQueue> {
    pub nic: Q,
    pub tx: TxPath,
    /// Receive scratch: each received frame is copied here (volatile reads) before smoltcp
    /// sees it, since the RX buffer itself is device-writable memory.
    pub rx_frame: Box<[u8]>,
    /// The frame after the one in `rx_frame`, read to see whether it supersedes it
    /// ([`frame::PureAck::supersedes`]); it has passed the boundary's checks.
    pub rx_ahead: Box<[u8]>,
    /// The RX buffer and length of the frame in `rx_ahead` (and the frame as a pure ACK),
    /// handed to smoltcp next.
    pub held: Option<(RxBuffer, usize, Option<frame::PureAck>)>,
}

/// A received frame copied out of device memory and checked: handed to smoltcp (with its
/// length, and the frame as a pure ACK if it is one) or dropped.
enum Admitted {
    Frame(RxBuffer, usize, Option<frame::PureAck>),
    Dropped,
}

impl TxPath {
    /// The boundary's checks on a received frame (already copied out to `frame`): the
    /// frames it drops are recycled and counted.
    fn admit<Q: NetQueue>(&mut self, nic: &mut Q, buffer: RxBuffer, frame: &[u8]) -> Admitted {
        // TCP checksums are verified here rather than by smoltcp, to count the drops.
        // Parsed once for both the checksum and the SYN checks.
        // A frame that parses as TCP is neither a fragment, nor behind IPv6 extension
        // headers, nor a damaged TCP header: those checks are for the frames that do not.
        let tcp = frame::parse_tcp(frame);
        let drop = match &tcp {
            Some(tcp) if !frame::tcp_checksum_ok(frame, tcp) => {
                &mut self.stats.rx_tcp_checksum_drops
            }
            None if frame::is_unverified_tcp(frame) => &mut self.stats.rx_unverified_tcp_drops,
            None if frame::is_malformed_tcp(frame) => &mut self.stats.rx_malformed_tcp_drops,
            _ => match self.check_syn(tcp.as_ref()) {
                SynCheck::Pass => {
                    let ack = tcp.and_then(|tcp| frame::pure_ack(frame, &tcp));
                    return Admitted::Frame(buffer, frame.len(), ack);
                }
                SynCheck::Duplicate => &mut self.stats.rx_duplicate_syns,
                SynCheck::NoRoom => &mut self.stats.rx_syns_over_backlog,
            },
        };
        *drop += 1;
        nic.rx_recycle(buffer);
        Admitted::Dropped
    }
}

impl<Q: NetQueue> NicDevice<Q> {
    /// Collects TX completions from the NIC.
    pub fn reap(&mut self) -> Result<usize, driver::DriverError> {
        let tx = &mut self.tx;
        self.nic.tx_reap(&mut |token| tx.complete(token))
    }

    /// Sets how many frames smoltcp may build before the next [`NicDevice::submit`] once
    /// its first pass over the sockets is done (see [`TxPath::may_transmit`]).
    pub fn open_tx_window(&mut self) {
        let pending = self.tx.staged.len();
        self.tx.budget = self.nic.tx_capacity(3).saturating_sub(pending);
        self.tx.first_pass = true;
        self.tx.egress_flows.clear();
    }

    /// Hands staged frames to the NIC and rings its doorbell once. Frames the ring cannot
    /// take yet stay staged, in order, for the next poll.
    pub fn submit(&mut self) -> usize {
        let mut submitted = 0;
        while let Some(staged) = self.tx.staged.front() {
            let segments = &self.tx.staged_segments[staged.segments.clone()];
            let token = staged.frame.token();
            let mut slices = [NO_RECORD; MAX_INLINE_RECORDS];
            let n = staged
                .tls
                .as_ref()
                .map_or(0, |t| record_slices(t, &mut slices));
            let frame = TxFrame::new(segments, &staged.offload, token).with_tls(&slices[..n]);
            match self.nic.tx_enqueue(frame) {
                Ok(()) => {
                    let staged = self.tx.staged.pop_front().expect("front exists");
                    self.tx.in_flight[token as usize] = Some(staged.frame);
                    self.tx.spare_tls.extend(staged.tls);
                    submitted += 1;
                }
                Err(driver::DriverError::TxRingFull) => break,
                Err(e) => {
                    // Malformed for this NIC: drop it (TCP retransmits) and free its slot.
                    tracing::warn!("NIC refused a frame: {e}");
                    let staged = self.tx.staged.pop_front().expect("front exists");
                    self.tx.stats.tx_refused += 1;
                    self.tx.spare_tls.extend(staged.tls);
                    self.tx.retire(staged.frame);
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

/// Filler of the unused entries of [`record_slices`]' array.
const NO_RECORD: driver::TlsRecordSlice<'static> = driver::TlsRecordSlice {
    key: driver::TlsKey {
        id: driver::TlsKeyId { flow: 0, epoch: 0 },
        cipher: driver::TlsCipher::Aes128Gcm,
        key: &[],
        iv: &[0; 12],
    },
    seq: 0,
    inner_len: 0,
    frame_offset: 0,
    record_offset: 0,
    len: 0,
    resync: &[],
};

/// The queue API's view of a staged frame's inline-TLS records (borrowing it), in `out`;
/// returns how many.
fn record_slices<'a>(tls: &'a StagedTls, out: &mut [driver::TlsRecordSlice<'a>]) -> usize {
    for (slot, p) in out.iter_mut().zip(&tls.parts) {
        *slot = driver::TlsRecordSlice {
            key: driver::TlsKey {
                id: p.key,
                cipher: p.cipher,
                key: &p.key_bytes[..p.key_len],
                iv: &p.iv,
            },
            seq: p.seq,
            inner_len: p.inner_len,
            frame_offset: p.frame_offset,
            record_offset: p.record_offset,
            len: p.len,
            resync: &tls.resync[p.resync.clone()],
        };
    }
    tls.parts.len().min(out.len())
}

/// Receives one frame: lends the NIC's RX buffer to smoltcp (no copy).
pub struct NicRxToken<'a, Q: NetQueue> {
    nic: &'a mut Q,
    buffer: RxBuffer,
    /// The frame, already copied out of device-writable memory for smoltcp to parse.
    frame: &'a [u8],
}

impl<Q: NetQueue> phy::RxToken for NicRxToken<'_, Q> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let result = f(self.frame);
        self.nic.rx_recycle(self.buffer);
        result
    }
}

/// Builds one frame (see the module docs).
pub struct NicTxToken<'a> {
    tx: &'a mut TxPath,
    meta: FrameMeta,
    /// Handed out by [`NicDevice::transmit`] (smoltcp's egress), not paired with a
    /// received frame.
    egress: bool,
}

impl phy::TxToken for NicTxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let tx = self.tx;
        if tx.build.len() < len {
            tx.build.resize(len, 0);
        }
        let result = f(&mut tx.build[..len]);
        tx.finish_frame(len, self.meta, self.egress);
        result
    }

    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.meta = FrameMeta {
            tso_mss: meta.segmentation_offload_size.map(|s| s.get()),
            payload_unwritten: meta.tcp_payload_by_device,
        };
    }
}

/// What smoltcp says of the frame it builds with a [`NicTxToken`] (`phy::PacketMeta`).
#[derive(Clone, Copy, Default)]
struct FrameMeta {
    /// The MSS to cut the frame's TCP payload by (TSO or GSO), if it asks for that.
    tso_mss: Option<u16>,
    /// It wrote the headers only: the payload is a placeholder it was told the boundary
    /// maps (`tcp::Socket::set_payload_by_device`, the patch in `third_party/smoltcp`).
    payload_unwritten: bool,
}

/// What becomes of a received frame that may be a SYN ([`TxPath::check_syn`]).
enum SynCheck {
    Pass,
    /// A retransmitted SYN of a connection or handshake already under way.
    Duplicate,
    /// A new SYN to a listening port whose sockets are all taken.
    NoRoom,
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
        // smoltcp answers a received frame at once through the paired TX token (an ACK, a
        // RST). Without room to stage that answer it would be built and dropped: receive
        // only when it can be staged (the frame waits in the RX ring meanwhile). Room on
        // the ring is not needed: the answer waits in `staged` for it, and requiring it
        // would stop all receiving while the ring is full.
        if !self.tx.can_stage() {
            return None;
        }
        let (mut buffer, mut len, mut pure_ack) = match self.held.take() {
            Some(held) => {
                std::mem::swap(&mut self.rx_frame, &mut self.rx_ahead);
                held
            }
            None => loop {
                let buffer = self.nic.rx_next()?;
                self.tx.stats.frames_rx += 1;
                let len = self.nic.rx_read(&buffer, &mut self.rx_frame).len();
                match self.tx.admit(&mut self.nic, buffer, &self.rx_frame[..len]) {
                    Admitted::Frame(buffer, len, ack) => break (buffer, len, ack),
                    Admitted::Dropped => continue,
                }
            },
        };
        // A pure ACK that the next received frame supersedes (a later cumulative ACK of the
        // same flow, `PureAck::supersedes`) tells smoltcp nothing the next one does not: it
        // is recycled unseen. Each TSO frame a client's kernel receives as MSS segments is
        // acknowledged every two segments, and each ACK costs smoltcp a full pass; only the
        // last of a run the NIC delivered together needs one. Duplicate ACKs are never
        // superseded (fast retransmit counts them).
        while let Some(ack) = pure_ack {
            let Some(next) = self.nic.rx_next() else {
                break;
            };
            self.tx.stats.frames_rx += 1;
            let next_len = self.nic.rx_read(&next, &mut self.rx_ahead).len();
            let Admitted::Frame(next, next_len, next_ack) =
                self.tx
                    .admit(&mut self.nic, next, &self.rx_ahead[..next_len])
            else {
                continue;
            };
            if !next_ack.is_some_and(|next_ack| next_ack.supersedes(&ack)) {
                self.held = Some((next, next_len, next_ack));
                break;
            }
            self.tx.stats.rx_acks_superseded += 1;
            self.nic.rx_recycle(buffer);
            std::mem::swap(&mut self.rx_frame, &mut self.rx_ahead);
            (buffer, len, pure_ack) = (next, next_len, next_ack);
        }
        Some((
            NicRxToken {
                nic: &mut self.nic,
                buffer,
                frame: &self.rx_frame[..len],
            },
            NicTxToken {
                tx: &mut self.tx,
                meta: FrameMeta::default(),
                egress: false,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        if !self.tx.may_transmit() {
            return None;
        }
        Some(NicTxToken {
            tx: &mut self.tx,
            meta: FrameMeta::default(),
            egress: true,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(&self.tx.caps, self.tx.segment_frame())
    }
}

/// What smoltcp is told about the device. smoltcp never computes TCP checksums: on transmit
/// the boundary does, from the real payload; on receive `NicDevice::receive` verifies them
/// (and counts the drops in `rx_tcp_checksum_drops`) before smoltcp sees the frame.
/// `segment_frame`: the largest segment smoltcp may build, for the NIC's TSO or the
/// boundary's own segmentation (GSO).
pub fn capabilities(caps: &Capabilities, segment_frame: Option<usize>) -> DeviceCapabilities {
    let mut checksum = ChecksumCapabilities::default();
    checksum.ipv4 = SmolChecksum::Both;
    checksum.tcp = SmolChecksum::None;
    checksum.udp = SmolChecksum::Both;
    checksum.icmpv4 = SmolChecksum::Both;
    checksum.icmpv6 = SmolChecksum::Both;
    let mut d = DeviceCapabilities::default();
    d.medium = Medium::Ethernet;
    d.max_transmission_unit = caps.mtu + ETHERNET_HEADER_LEN;
    d.max_burst_size = None;
    d.checksum = checksum;
    d.segmentation.tcpv4 = segment_frame.and_then(NonZeroUsize::new);
    // Not `tcpv6`, whatever `caps.tso_ipv6` says: smoltcp 0.14's `dispatch_ip` drops every
    // IPv6 packet longer than the IP MTU ("IPv6 fragmentation support is unimplemented"),
    // segmentation offload or not (its IPv4 arm exempts TSO packets, the IPv6 arm does not;
    // smoltcp PR #1038). Told about IPv6 TSO, smoltcp would build 64 KiB IPv6 segments and
    // drop them all. So IPv6 is segmented by smoltcp at the MSS, checksums still offloaded;
    // the driver contract for IPv6 TSO (`TxOffload::ipv6_header`) waits for a smoltcp that
    // sends such packets.
    d.segmentation.tcpv6 = None;
    d
}
