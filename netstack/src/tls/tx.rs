//! The transmit side of a TLS connection: how the TCP stream is cut into records, and how
//! any range of it is rebuilt from the pinned plaintext at the device boundary.
//!
//! A connection in TLS mode has two streams. The send queue holds the *plaintext* stream
//! (pins and copy blocks, as without TLS); the TCP stream that smoltcp accounts for is a
//! sequence of units: raw bytes (the handshake flight rustls encoded, sent as they are)
//! and records this module frames. A record keeps only where its plaintext lies, its key
//! epoch, its sequence number and, once computed, its tag: never ciphertext.
//!
//! [`TlsTx::build`] writes the TLS bytes of any TCP range: header bytes from the record's
//! length, body bytes by AES-CTR of the plaintext at their counter (or, the first time a
//! record is touched, the whole record sealed, which yields the tag), tag bytes from the
//! kept tag. A first transmission and a retransmission take the same path, so a
//! retransmitted byte is the same function of the same pinned plaintext as its first
//! transmission.

use std::collections::VecDeque;
use std::ops::Range;

use super::aead::{
    new_aead, AeadError, Algorithm, Backend, Nonce, RecordAead, Tag, TagState, TAG_LEN,
};
use super::record::{self, HEADER_LEN, MAX_PLAINTEXT, OVERHEAD};
use crate::sendq::{PieceBytes, SendQueue, Unmapped};
use crate::StackStats;

/// Plaintext of the records framed while a connection starts: one record fits one
/// 1460-byte segment with TCP timestamps (1448), so the client can decrypt as segments
/// arrive rather than after a whole 16 KiB record.
pub const SMALL_RECORD: usize = 1448 - OVERHEAD;
/// Records framed small at the start of a connection.
pub const SMALL_RECORDS: u64 = 8;
/// Pieces a record's plaintext is passed to the AEAD in, at most, before it is gathered
/// into one buffer instead (a 16 KiB record over 4 KiB pages has five).
const MAX_PIECES: usize = 12;
/// Inline plaintext of control records (alerts, KeyUpdate).
const INLINE: usize = 8;

/// One traffic key (one direction, one epoch).
pub struct TrafficKey {
    pub epoch: u64,
    iv: Nonce,
    aead: Box<dyn RecordAead>,
    /// The key itself, for a NIC that encrypts inline (the queue API's `TlsKey`).
    key: [u8; 32],
    algorithm: Algorithm,
}

impl TrafficKey {
    pub fn new(
        epoch: u64,
        backend: Backend,
        algorithm: Algorithm,
        key: &[u8],
        iv: &[u8],
    ) -> Result<Self, AeadError> {
        let aead = new_aead(backend, algorithm, key)?;
        let mut bytes = [0u8; 32];
        bytes[..key.len()].copy_from_slice(key);
        Ok(Self {
            epoch,
            iv: iv.try_into().map_err(|_| AeadError::KeyLength {
                algorithm,
                got: iv.len(),
            })?,
            aead,
            key: bytes,
            algorithm,
        })
    }

    /// Algorithm, key and static IV, for an inline TLS engine.
    pub fn material(&self) -> (Algorithm, &[u8], &Nonce) {
        (
            self.algorithm,
            &self.key[..self.algorithm.key_len()],
            &self.iv,
        )
    }

    pub fn nonce(&self, seq: u64) -> Nonce {
        record::nonce(&self.iv, seq)
    }

    pub fn aead(&self) -> &dyn RecordAead {
        &*self.aead
    }
}

/// Where a record's plaintext is.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// `plain_start .. plain_start + plain_len` of the send queue.
    Queue,
    /// Bytes the stack wrote itself (alert, KeyUpdate).
    Inline([u8; INLINE]),
}

#[derive(Clone, Copy, Debug)]
struct Record {
    content_type: u8,
    epoch: u64,
    seq: u64,
    tag: Option<Tag>,
    source: Source,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Bytes of the send queue that go to TCP as they are (the handshake rustls encoded).
    Raw,
    Record(Record),
}

/// A run of the TCP stream.
#[derive(Clone, Copy, Debug)]
struct Unit {
    tcp_start: u64,
    plain_start: u64,
    plain_len: u32,
    kind: Kind,
}

impl Unit {
    fn tcp_len(&self) -> u64 {
        match self.kind {
            Kind::Raw => self.plain_len as u64,
            Kind::Record(_) => (self.plain_len as usize + OVERHEAD) as u64,
        }
    }
    fn tcp_end(&self) -> u64 {
        self.tcp_start + self.tcp_len()
    }
}

/// Test-only ways to break the record path, proving the checks that watch it can fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsFault {
    #[default]
    None,
    /// Recompute retransmitted slices one counter block off: what a record path that got
    /// the counter wrong (or re-encrypted changed plaintext) would send.
    #[cfg(feature = "test-hooks")]
    WrongCounter,
    /// Give a NIC that encrypts inline the wrong offset (one block early) for record parts
    /// that start inside their record: a broken re-synchronisation.
    #[cfg(feature = "test-hooks")]
    WrongResync,
}

impl TlsFault {
    fn wrong_counter(self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self == TlsFault::WrongCounter;
        #[cfg(not(feature = "test-hooks"))]
        false
    }

    fn wrong_resync(self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self == TlsFault::WrongResync;
        #[cfg(not(feature = "test-hooks"))]
        false
    }
}

/// Where one piece of an inline-TLS frame's payload is ([`TlsTx::describe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutPiece {
    /// Bytes the stack wrote: [`OffloadLayout::bytes`]`[start..start + len]` (record
    /// headers, content type bytes, tag placeholders, the stack's own small records).
    Stack { start: u32, len: u32 },
    /// Bytes already in device-readable memory: pinned pages, copy blocks.
    Dma { iova: driver::Iova, len: u32 },
}

/// One record's part of an inline-TLS frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordPart {
    pub epoch: u64,
    pub seq: u64,
    pub inner_len: u32,
    /// Where the part begins in the frame's TCP payload.
    pub payload_offset: u32,
    /// Which byte of the record that is.
    pub record_offset: u32,
    pub len: u32,
    /// The record's bytes before the part, in [`OffloadLayout::resync`], when the part
    /// holds tag bytes and not the record's start (the NIC needs them for the tag).
    pub resync: Range<usize>,
}

/// A frame's TLS payload laid out in plaintext for a NIC that encrypts inline.
#[derive(Debug, Default)]
pub struct OffloadLayout {
    pub bytes: Vec<u8>,
    /// The payload, in order.
    pub pieces: Vec<LayoutPiece>,
    pub parts: Vec<RecordPart>,
    /// Resync bytes of the parts (not sent).
    pub resync: Vec<LayoutPiece>,
    /// The plaintext-stream range the pieces read (the send queue must keep it while the
    /// NIC may read it).
    pub plain: Option<Range<u64>>,
}

impl OffloadLayout {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.pieces.clear();
        self.parts.clear();
        self.resync.clear();
        self.plain = None;
    }

    fn stack_bytes(bytes: &mut Vec<u8>, out: &mut Vec<LayoutPiece>, new: &[u8]) {
        let start = bytes.len() as u32;
        bytes.extend_from_slice(new);
        let len = new.len() as u32;
        match out.last_mut() {
            Some(LayoutPiece::Stack { start: s, len: l }) if *s + *l == start => *l += len,
            _ => out.push(LayoutPiece::Stack { start, len }),
        }
    }

    fn dma(out: &mut Vec<LayoutPiece>, iova: driver::Iova, len: u32) {
        match out.last_mut() {
            Some(LayoutPiece::Dma { iova: i, len: l }) if *i + *l as u64 == iova => *l += len,
            _ => out.push(LayoutPiece::Dma { iova, len }),
        }
    }

    fn reads(&mut self, plain: Range<u64>) {
        self.plain = Some(match self.plain.take() {
            Some(p) => p.start.min(plain.start)..p.end.max(plain.end),
            None => plain,
        });
    }
}

/// Why [`TlsTx::build`] wrote nothing usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The range is not (or no longer) in the record map or the send queue.
    #[error("TCP range not in the record map or the send queue")]
    Unmapped,
    /// Audit: the tag recomputed over the pinned plaintext of a record being retransmitted
    /// differs from the tag sent with it: its plaintext changed, so the recomputed bytes
    /// would differ from the first transmission.
    #[error("record {seq} of key epoch {epoch}: plaintext changed since its first transmission")]
    AuditMismatch { epoch: u64, seq: u64 },
}

impl From<Unmapped> for BuildError {
    fn from(_: Unmapped) -> Self {
        BuildError::Unmapped
    }
}

/// The record layer's transmit state of one connection (TCP-stream offsets).
pub struct TlsTx {
    units: VecDeque<Unit>,
    /// Keys of records not yet acknowledged, oldest first; the last one is current.
    keys: VecDeque<TrafficKey>,
    /// End of everything framed.
    pub framed_end: u64,
    /// Bytes handed to smoltcp (placeholders).
    pub fed: u64,
    /// Bytes acknowledged.
    pub acked: u64,
    /// Highest TCP offset transmitted so far.
    pub sent_max: u64,
    next_seq: u64,
    data_records: u64,
    /// Last byte of the unit released last (for keep-alive probes).
    last_released: Option<(u64, u8)>,
    /// The tag of the record whose first transmission is split across frames, as far as
    /// its ciphertext went out: `(the record's TCP start, GHASH so far)`. First
    /// transmissions go in stream order, so there is at most one.
    open_tag: Option<(u64, TagState)>,
    fault: TlsFault,
    /// Check every retransmitted record slice against its kept tag (see
    /// [`TlsTx::set_audit`]).
    audit: bool,
}

impl TlsTx {
    pub fn new(fault: TlsFault) -> Self {
        Self {
            units: VecDeque::new(),
            keys: VecDeque::new(),
            framed_end: 0,
            fed: 0,
            acked: 0,
            sent_max: 0,
            next_seq: 0,
            data_records: 0,
            last_released: None,
            open_tag: None,
            fault,
            audit: false,
        }
    }

    /// Audit mode: before a retransmission recomputes body bytes of a record, the record's
    /// tag is recomputed over its pinned plaintext (a whole-record seal, aside) and must
    /// equal the tag sent the first time; otherwise [`TlsTx::build`] fails with
    /// [`BuildError::AuditMismatch`] and writes nothing the caller may send. Costs one
    /// record seal per retransmitted slice, nothing on first transmissions.
    pub fn set_audit(&mut self, audit: bool) {
        self.audit = audit;
    }

    /// Framed bytes not yet handed to smoltcp.
    pub fn unfed(&self) -> u64 {
        self.framed_end - self.fed
    }

    /// Records (and raw runs) held: framed and not acknowledged.
    pub fn units_held(&self) -> usize {
        self.units.len()
    }

    /// Whether a traffic key is installed (records can be framed).
    pub fn has_key(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Epoch of the current key.
    pub fn epoch(&self) -> Option<u64> {
        self.keys.back().map(|k| k.epoch)
    }

    /// Keys held (the current one and older ones still needed for retransmission).
    pub fn keys_held(&self) -> usize {
        self.keys.len()
    }

    /// From now on records use `key`, starting at sequence `seq`.
    pub fn install_key(&mut self, key: TrafficKey, seq: u64) {
        self.keys.push_back(key);
        self.next_seq = seq;
    }

    fn push(&mut self, plain_start: u64, plain_len: usize, kind: Kind) {
        let unit = Unit {
            tcp_start: self.framed_end,
            plain_start,
            plain_len: plain_len as u32,
            kind,
        };
        self.framed_end = unit.tcp_end();
        self.units.push_back(unit);
    }

    /// Frames every unfed plaintext byte as raw (handshake) bytes.
    pub fn frame_raw(&mut self, sendq: &mut SendQueue) {
        let n = sendq.unfed();
        if n > 0 {
            self.push(sendq.fed, n as usize, Kind::Raw);
            sendq.fed += n;
        }
    }

    fn record(&mut self, content_type: u8, source: Source) -> Kind {
        let key = self.keys.back().expect("records are framed with a key");
        let kind = Kind::Record(Record {
            content_type,
            epoch: key.epoch,
            seq: self.next_seq,
            tag: None,
            source,
        });
        self.next_seq += 1;
        kind
    }

    /// Frames the next application-data record from unfed plaintext: small while the
    /// connection starts, full-sized after. Returns its plaintext length (0: nothing).
    pub fn frame_data(&mut self, sendq: &mut SendQueue) -> usize {
        let size = if self.data_records < SMALL_RECORDS {
            SMALL_RECORD
        } else {
            MAX_PLAINTEXT
        };
        let n = (sendq.unfed() as usize).min(size);
        if n == 0 || !self.has_key() {
            return 0;
        }
        let kind = self.record(record::ContentType::ApplicationData as u8, Source::Queue);
        self.push(sendq.fed, n, kind);
        sendq.fed += n as u64;
        self.data_records += 1;
        n
    }

    /// Frames a record of `content_type` holding `bytes` (at most 8) the stack wrote.
    pub fn frame_inline(&mut self, content_type: record::ContentType, bytes: &[u8]) {
        let mut inline = [0u8; INLINE];
        inline[..bytes.len()].copy_from_slice(bytes);
        let plain_start = self.units.back().map_or(0, |u| u.plain_start);
        let kind = self.record(content_type as u8, Source::Inline(inline));
        self.push(plain_start, bytes.len(), kind);
    }

    /// TCP acknowledged `acked` bytes: releases every unit wholly acknowledged (the send
    /// queue may release their plaintext) and the keys no remaining record needs.
    pub fn ack(&mut self, acked: u64, sendq: &mut SendQueue) {
        self.acked = self.acked.max(acked);
        while let Some(front) = self.units.front() {
            if front.tcp_end() > self.acked {
                break;
            }
            let unit = self.units.pop_front().expect("front exists");
            let last = match unit.kind {
                Kind::Record(Record { tag: Some(tag), .. }) => Some(tag[TAG_LEN - 1]),
                _ => None,
            };
            self.last_released = last.map(|b| (unit.tcp_end(), b));
            let queued = matches!(
                unit.kind,
                Kind::Raw
                    | Kind::Record(Record {
                        source: Source::Queue,
                        ..
                    })
            );
            if queued {
                sendq.acked = sendq.acked.max(unit.plain_start + unit.plain_len as u64);
            }
        }
        let oldest_needed = self.units.iter().find_map(|u| match u.kind {
            Kind::Record(r) => Some(r.epoch),
            Kind::Raw => None,
        });
        while self.keys.len() > 1 && oldest_needed.is_none_or(|e| self.keys[0].epoch < e) {
            self.keys.pop_front();
        }
    }

    /// The byte before the acknowledged point, for a keep-alive probe.
    pub fn keepalive_byte(&mut self, sendq: &SendQueue, stats: &mut StackStats) -> Option<u8> {
        let at = self.acked.checked_sub(1)?;
        if let Some((end, byte)) = self.last_released {
            if end == self.acked {
                return Some(byte);
            }
        }
        let mut scratch = Vec::new();
        let mut byte = [0u8];
        self.build(sendq, at..at + 1, &mut byte, &mut scratch, stats)
            .ok()?;
        Some(byte[0])
    }

    /// Writes the TLS bytes of TCP range `range` into `out` (of the same length), from the
    /// plaintext in `sendq`. `scratch` is working memory for records sealed in part.
    pub fn build(
        &mut self,
        sendq: &SendQueue,
        range: Range<u64>,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
        stats: &mut StackStats,
    ) -> Result<(), BuildError> {
        debug_assert_eq!(out.len() as u64, range.end - range.start);
        if range.is_empty() {
            return Ok(());
        }
        let first = self.units.partition_point(|u| u.tcp_end() <= range.start);
        match self.units.get(first) {
            Some(u) if u.tcp_start <= range.start && range.end <= self.framed_end => {}
            _ => return Err(BuildError::Unmapped),
        }
        let retransmission = range.start < self.sent_max;
        let Self {
            units,
            keys,
            fault,
            open_tag,
            audit,
            sent_max,
            ..
        } = self;
        let mut at = range.start;
        for unit in units.range_mut(first..) {
            if at >= range.end {
                break;
            }
            let local = at - unit.tcp_start..range.end.min(unit.tcp_end()) - unit.tcp_start;
            let dst_start = (at - range.start) as usize;
            let dst = &mut out[dst_start..dst_start + (local.end - local.start) as usize];
            match &mut unit.kind {
                Kind::Raw => {
                    let plain = unit.plain_start + local.start..unit.plain_start + local.end;
                    copy_plain(sendq, plain, dst)?;
                    stats.tls_cpu_bytes_written += dst.len() as u64;
                }
                Kind::Record(rec) => {
                    let key = keys
                        .iter()
                        .find(|k| k.epoch == rec.epoch)
                        .expect("keys of unacknowledged records are kept");
                    let slice = RecordSlice {
                        key,
                        unit: unit.tcp_start,
                        plain_start: unit.plain_start,
                        plain_len: unit.plain_len as usize,
                        local: local.start as usize..local.end as usize,
                        wrong_counter: retransmission && fault.wrong_counter(),
                        audit: *audit && at < *sent_max,
                    };
                    slice.build(rec, sendq, dst, scratch, open_tag, stats)?;
                }
            }
            at = unit.tcp_start + local.end;
        }
        Ok(())
    }

    /// The key of `epoch`, if still held.
    pub fn key(&self, epoch: u64) -> Option<&TrafficKey> {
        self.keys.iter().find(|k| k.epoch == epoch)
    }

    /// Lays out TCP range `range` for a NIC that encrypts inline: every record part as
    /// plaintext (header, pinned data by IOVA, type byte, tag placeholder) with its crypto
    /// context; raw units by IOVA. Nothing is encrypted here and no record state changes.
    pub fn describe(
        &self,
        sendq: &SendQueue,
        range: Range<u64>,
        layout: &mut OffloadLayout,
    ) -> Result<(), BuildError> {
        let first = self.units.partition_point(|u| u.tcp_end() <= range.start);
        match self.units.get(first) {
            Some(u) if u.tcp_start <= range.start && range.end <= self.framed_end => {}
            _ => return Err(BuildError::Unmapped),
        }
        let mut at = range.start;
        for unit in self.units.range(first..) {
            if at >= range.end {
                break;
            }
            let local = (at - unit.tcp_start) as usize
                ..(range.end.min(unit.tcp_end()) - unit.tcp_start) as usize;
            let payload_offset = (at - range.start) as u32;
            match unit.kind {
                Kind::Raw => {
                    let plain =
                        unit.plain_start + local.start as u64..unit.plain_start + local.end as u64;
                    layout.reads(plain.clone());
                    let pieces = &mut layout.pieces;
                    sendq.for_each_piece(plain, |piece| {
                        OffloadLayout::dma(pieces, piece.iova, piece.len as u32)
                    })?;
                }
                Kind::Record(rec) => {
                    let plain_len = unit.plain_len as usize;
                    let inner_len = plain_len + 1;
                    if matches!(rec.source, Source::Queue) {
                        layout.reads(unit.plain_start..unit.plain_start + plain_len as u64);
                    }
                    let OffloadLayout {
                        bytes,
                        pieces,
                        resync,
                        ..
                    } = layout;
                    lay_out_record(&rec, unit, local.clone(), sendq, bytes, pieces)?;
                    let holds_tag = local.end > HEADER_LEN + inner_len;
                    let resync_start = resync.len();
                    if holds_tag && local.start > 0 {
                        lay_out_record(&rec, unit, 0..local.start, sendq, bytes, resync)?;
                    }
                    let resync = resync_start..resync.len();
                    let mut record_offset = local.start as u32;
                    if self.fault.wrong_resync() && !holds_tag && local.start >= HEADER_LEN + 16 {
                        record_offset -= 16;
                    }
                    layout.parts.push(RecordPart {
                        epoch: rec.epoch,
                        seq: rec.seq,
                        inner_len: inner_len as u32,
                        payload_offset,
                        record_offset,
                        len: (local.end - local.start) as u32,
                        resync,
                    });
                }
            }
            at = unit.tcp_start + local.end as u64;
        }
        Ok(())
    }

    /// Notes that `range` was transmitted (first transmissions move `sent_max`). True if
    /// any of it was sent before (a retransmission).
    pub fn account_sent(&mut self, range: Range<u64>, stats: &mut StackStats) -> bool {
        let again = range.start < self.sent_max;
        if again {
            stats.retransmitted_segments += 1;
            stats.retransmitted_bytes += range.end.min(self.sent_max) - range.start;
            // Does the retransmission start at a unit (record) boundary?
            let i = self.units.partition_point(|u| u.tcp_end() <= range.start);
            if let Some(u) = self.units.get(i) {
                stats.tls_retransmissions += 1;
                if u.tcp_start != range.start && matches!(u.kind, Kind::Record(_)) {
                    stats.tls_retransmissions_mid_record += 1;
                }
            }
        }
        if range.end > self.sent_max {
            stats.payload_bytes_sent += range.end - range.start.max(self.sent_max);
            self.sent_max = range.end;
            // Does this first transmission end inside a record (split across frames)?
            let i = self.units.partition_point(|u| u.tcp_end() < range.end);
            if let Some(u) = self.units.get(i) {
                stats.tls_frames_first_sent += 1;
                if u.tcp_end() != range.end && matches!(u.kind, Kind::Record(_)) {
                    stats.tls_frames_ending_mid_record += 1;
                }
            }
        }
        again
    }
}

/// Appends the layout of record bytes `local` (header, data, type byte, tag placeholder)
/// to `out`, with the stack's bytes in `bytes`.
fn lay_out_record(
    rec: &Record,
    unit: &Unit,
    local: Range<usize>,
    sendq: &SendQueue,
    bytes: &mut Vec<u8>,
    out: &mut Vec<LayoutPiece>,
) -> Result<(), Unmapped> {
    let plain_len = unit.plain_len as usize;
    let header = record::header(plain_len + 1);
    if let Some(h) = overlap(&local, 0..HEADER_LEN) {
        OffloadLayout::stack_bytes(bytes, out, &header[h]);
    }
    if let Some(d) = overlap(&local, HEADER_LEN..HEADER_LEN + plain_len) {
        match rec.source {
            Source::Inline(ref inline) => OffloadLayout::stack_bytes(bytes, out, &inline[d]),
            Source::Queue => {
                let plain = unit.plain_start + d.start as u64..unit.plain_start + d.end as u64;
                sendq.for_each_piece(plain, |piece| {
                    OffloadLayout::dma(out, piece.iova, piece.len as u32)
                })?;
            }
        }
    }
    let type_at = HEADER_LEN + plain_len;
    if overlap(&local, type_at..type_at + 1).is_some() {
        OffloadLayout::stack_bytes(bytes, out, &[rec.content_type]);
    }
    if let Some(t) = overlap(&local, type_at + 1..type_at + 1 + TAG_LEN) {
        OffloadLayout::stack_bytes(bytes, out, &[0; TAG_LEN][t]);
    }
    Ok(())
}

/// Copies plaintext stream bytes `plain` of the send queue into `dst`.
fn copy_plain(sendq: &SendQueue, plain: Range<u64>, dst: &mut [u8]) -> Result<(), Unmapped> {
    let mut at = 0;
    sendq.for_each_piece(plain, |piece| {
        piece.with_bytes(|b| dst[at..at + b.len()].copy_from_slice(b));
        at += piece.len;
    })
}

/// One record's part of a frame.
struct RecordSlice<'k> {
    key: &'k TrafficKey,
    /// The record's TCP start (names it).
    unit: u64,
    plain_start: u64,
    plain_len: usize,
    /// Range of the record's TCP bytes (header, body, tag) to write.
    local: Range<usize>,
    wrong_counter: bool,
    /// A retransmission with audit on: check the kept tag before recomputing body bytes.
    audit: bool,
}

/// The overlap of `a` and `b`, relative to `b.start`.
fn overlap(a: &Range<usize>, b: Range<usize>) -> Option<Range<usize>> {
    let (s, e) = (a.start.max(b.start), a.end.min(b.end));
    (s < e).then(|| s - b.start..e - b.start)
}

impl RecordSlice<'_> {
    fn build(
        &self,
        rec: &mut Record,
        sendq: &SendQueue,
        dst: &mut [u8],
        scratch: &mut Vec<u8>,
        open_tag: &mut Option<(u64, TagState)>,
        stats: &mut StackStats,
    ) -> Result<(), BuildError> {
        let inner_len = self.plain_len + 1;
        let header = record::header(inner_len);
        let body = HEADER_LEN..HEADER_LEN + inner_len;
        let tag_at = body.end..body.end + TAG_LEN;
        let nonce = self.key.nonce(rec.seq);
        let base = self.local.start;
        // Header bytes: the length is the record's, the rest constant.
        if let Some(h) = overlap(&self.local, 0..HEADER_LEN) {
            dst[h.start - base..h.end - base].copy_from_slice(&header[h.clone()]);
        }
        let body_part = overlap(&self.local, body.clone());
        let tag_needed = body_part.is_some() || overlap(&self.local, tag_at.clone()).is_some();
        if let Some(part) = body_part.clone() {
            let out_at = body.start + part.start - base;
            let out = &mut dst[out_at..out_at + part.len()];
            // How far this record's split first transmission went (its GHASH position).
            let ghash_at = match open_tag {
                Some((unit, state)) if *unit == self.unit => Some(state.len() as usize),
                _ => None,
            };
            // In order: the next bytes of a split first transmission. A backend whose fused
            // seal is much faster than its CTR and GHASH apart (ring) seals the whole record
            // aside at its first touch instead, then sends the rest by CTR: fewer cycles,
            // more bytes written (see the bench).
            let incremental = ghash_at.is_some() || !self.key.aead().gathers();
            let in_order = incremental && part.start <= ghash_at.unwrap_or(0);
            if rec.tag.is_none() && ghash_at.is_none() && part == (0..inner_len) {
                // The whole record in this frame: sealed straight into it.
                rec.tag = Some(self.seal(rec, sendq, &header, Some(out), scratch, stats)?);
            } else if rec.tag.is_none() && in_order {
                // Part of a record, continuing its first transmission in order: CTR into
                // the frame, and GHASH of the new ciphertext; the tag once it is complete.
                self.ctr(rec, sendq, &nonce, part.clone(), out)?;
                stats.tls_ctr_bytes += part.len() as u64;
                stats.tls_cpu_bytes_written += part.len() as u64;
                let aead = self.key.aead();
                if ghash_at.is_none() {
                    *open_tag = Some((self.unit, aead.tag_begin(&header)));
                }
                let (_, state) = open_tag.as_mut().expect("set above");
                let from = ghash_at.unwrap_or(0);
                if part.end > from {
                    state.update(&out[from - part.start..]);
                }
                if state.len() as usize == inner_len {
                    let (_, state) = open_tag.take().expect("just used");
                    stats.tls_records_sealed += 1;
                    stats.tls_bytes_sealed += inner_len as u64;
                    rec.tag = Some(aead.tag_finish(&nonce, state));
                }
            } else if rec.tag.is_none() {
                // Sealing aside (above), or out of order (first transmissions go in stream
                // order, so not for them): seal the whole record aside for its tag.
                rec.tag = Some(self.seal(rec, sendq, &header, None, scratch, stats)?);
                if ghash_at.is_some() {
                    *open_tag = None;
                }
                out.copy_from_slice(&scratch[part.clone()]);
                stats.tls_cpu_bytes_written += part.len() as u64;
            } else {
                if self.audit {
                    self.audit_tag(rec, sendq, &header, scratch, stats)?;
                }
                self.ctr(rec, sendq, &nonce, part.clone(), out)?;
                stats.tls_ctr_bytes += part.len() as u64;
                stats.tls_cpu_bytes_written += part.len() as u64;
            }
        } else if tag_needed && rec.tag.is_none() {
            rec.tag = Some(self.seal(rec, sendq, &header, None, scratch, stats)?);
            if matches!(open_tag, Some((unit, _)) if *unit == self.unit) {
                *open_tag = None;
            }
        }
        if let Some(t) = overlap(&self.local, tag_at.clone()) {
            let tag = rec.tag.expect("sealed above");
            let out_at = tag_at.start + t.start - base;
            dst[out_at..out_at + t.len()].copy_from_slice(&tag[t]);
        }
        Ok(())
    }

    /// Audit of a retransmitted slice: the record's tag recomputed over its pinned plaintext
    /// (gathered into `scratch`, sealed there) must be the kept one.
    fn audit_tag(
        &self,
        rec: &Record,
        sendq: &SendQueue,
        header: &[u8; HEADER_LEN],
        scratch: &mut Vec<u8>,
        stats: &mut StackStats,
    ) -> Result<(), BuildError> {
        let inner_len = self.plain_len + 1;
        scratch.clear();
        scratch.resize(inner_len, 0);
        match rec.source {
            Source::Inline(ref bytes) => {
                scratch[..self.plain_len].copy_from_slice(&bytes[..self.plain_len])
            }
            Source::Queue => copy_plain(
                sendq,
                self.plain_start..self.plain_start + self.plain_len as u64,
                &mut scratch[..self.plain_len],
            )?,
        }
        scratch[self.plain_len] = rec.content_type;
        let tag = self
            .key
            .aead()
            .seal_in_place(&self.key.nonce(rec.seq), header, scratch);
        stats.tls_audit_checks += 1;
        stats.tls_audit_bytes += inner_len as u64;
        if Some(tag) == rec.tag {
            Ok(())
        } else {
            stats.tls_audit_mismatches += 1;
            Err(BuildError::AuditMismatch {
                epoch: self.key.epoch,
                seq: rec.seq,
            })
        }
    }

    /// Seals the whole record: into `direct` (the frame's bytes, when the frame holds the
    /// whole body) or into `scratch`. Returns the tag.
    fn seal(
        &self,
        rec: &Record,
        sendq: &SendQueue,
        header: &[u8; HEADER_LEN],
        direct: Option<&mut [u8]>,
        scratch: &mut Vec<u8>,
        stats: &mut StackStats,
    ) -> Result<Tag, Unmapped> {
        let inner_len = self.plain_len + 1;
        let nonce = self.key.nonce(rec.seq);
        let aead = self.key.aead();
        let type_byte = [rec.content_type];
        stats.tls_records_sealed += 1;
        stats.tls_bytes_sealed += inner_len as u64;
        let gather_writes = if aead.gathers() { inner_len as u64 } else { 0 };
        // The plaintext as slices the AEAD reads in place: pinned page spans, inline bytes.
        let mut pieces: [&[u8]; MAX_PIECES] = [&[]; MAX_PIECES];
        let mut n = 0;
        let mut scattered = true;
        match rec.source {
            Source::Inline(ref bytes) => {
                pieces[0] = &bytes[..self.plain_len];
                n = 1;
            }
            Source::Queue => {
                let plain = self.plain_start..self.plain_start + self.plain_len as u64;
                sendq.for_each_piece(plain, |piece| match piece.bytes {
                    PieceBytes::File(bytes) if n < MAX_PIECES - 1 => {
                        pieces[n] = bytes;
                        n += 1;
                    }
                    _ => scattered = false,
                })?;
            }
        }
        pieces[n] = &type_byte;
        n += 1;
        match direct {
            Some(out) if scattered => {
                stats.tls_cpu_bytes_written += inner_len as u64 + gather_writes;
                Ok(aead.seal_pieces(&nonce, header, &pieces[..n], out))
            }
            direct => {
                // Copy blocks (DMA memory, read with volatile copies) or too many pieces:
                // gather the inner plaintext first.
                scratch.clear();
                scratch.resize(inner_len, 0);
                match rec.source {
                    Source::Inline(ref bytes) => {
                        scratch[..self.plain_len].copy_from_slice(&bytes[..self.plain_len])
                    }
                    Source::Queue => copy_plain(
                        sendq,
                        self.plain_start..self.plain_start + self.plain_len as u64,
                        &mut scratch[..self.plain_len],
                    )?,
                }
                scratch[self.plain_len] = rec.content_type;
                stats.tls_cpu_bytes_written += inner_len as u64;
                match direct {
                    Some(out) => {
                        stats.tls_cpu_bytes_written += inner_len as u64 + gather_writes;
                        Ok(aead.seal_pieces(&nonce, header, &[scratch], out))
                    }
                    None => {
                        stats.tls_cpu_bytes_written += inner_len as u64;
                        Ok(aead.seal_in_place(&nonce, header, scratch))
                    }
                }
            }
        }
    }

    /// Ciphertext of body bytes `part` by AES-CTR of their plaintext.
    fn ctr(
        &self,
        rec: &Record,
        sendq: &SendQueue,
        nonce: &Nonce,
        part: Range<usize>,
        out: &mut [u8],
    ) -> Result<(), Unmapped> {
        let aead = self.key.aead();
        let skew = if self.wrong_counter { 16 } else { 0 };
        let data_end = part.end.min(self.plain_len);
        if part.start < data_end {
            match rec.source {
                Source::Inline(ref bytes) => aead.ctr_xor(
                    nonce,
                    (part.start + skew) as u64,
                    &bytes[part.start..data_end],
                    &mut out[..data_end - part.start],
                ),
                Source::Queue => {
                    let mut at = part.start;
                    let plain =
                        self.plain_start + part.start as u64..self.plain_start + data_end as u64;
                    sendq.for_each_piece(plain, |piece| {
                        let o = at - part.start;
                        let dst = &mut out[o..o + piece.len];
                        piece.with_bytes(|b| aead.ctr_xor(nonce, (at + skew) as u64, b, dst));
                        at += piece.len;
                    })?;
                }
            }
        }
        if part.end > self.plain_len {
            // The inner content type byte, last of the body.
            let o = self.plain_len - part.start;
            aead.ctr_xor(
                nonce,
                (self.plain_len + skew) as u64,
                &[rec.content_type],
                &mut out[o..o + 1],
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sendq::{copy_pool, SendMode};
    use crate::tls::record::{AlertDescription, ContentType};
    use crate::SendId;
    use driver::NetQueue;
    use pagecache::{CacheConfig, FrameArena, OpenOptions, PageCache};
    use softnic::{SoftNic, SoftNicConfig};

    const LEN: usize = 300_000;

    fn key(epoch: u64, backend: Backend) -> TrafficKey {
        let k = [epoch as u8 + 1; 16];
        TrafficKey::new(epoch, backend, Algorithm::Aes128Gcm, &k, &[7; 12]).unwrap()
    }

    /// A queue holding a copied head and a file, framed into records; the key changes
    /// (epoch 1, as after a KeyUpdate) half-way; a close_notify ends it. Returns the
    /// records framed under the first key.
    fn framed(sendq: &mut SendQueue, backend: Backend) -> (TlsTx, u64) {
        let mut tx = TlsTx::new(TlsFault::None);
        tx.install_key(key(0, backend), 5);
        let mut first_epoch = 0;
        while tx.frame_data(sendq) > 0 {
            first_epoch += 1;
            if first_epoch == 12 {
                tx.install_key(key(1, backend), 0);
            }
        }
        let close = record::alert(AlertDescription::CloseNotify);
        tx.frame_inline(ContentType::Alert, &close);
        (tx, 12)
    }

    #[test]
    fn any_split_and_any_retransmission_build_the_same_records_which_decrypt() {
        let (nic, _peer) = SoftNic::new(SoftNicConfig::default()).unwrap();
        let pool = copy_pool(nic.dma(), 8).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..LEN).map(|i| (i * 7 % 253) as u8).collect();
        let path = dir.path().join("f");
        std::fs::write(&path, &data).unwrap();
        let arena = FrameArena::anonymous(0x4000_0000, 512 * 4096).unwrap();
        let cache = PageCache::new(arena, CacheConfig::default()).unwrap();
        let file = cache.open(&path, OpenOptions::read_only()).unwrap();
        let pin = file.pin(0..LEN as u64).unwrap();
        let head = b"HTTP/1.1 200 OK\r\n\r\n";
        let mut plaintext = head.to_vec();
        plaintext.extend_from_slice(&data);

        for backend in [Backend::Ring, Backend::AesGcm] {
            let queue = || {
                let mut q = SendQueue::new(SendMode::ZeroCopy, usize::MAX);
                assert_eq!(q.push_copy(head, &pool), head.len());
                q.push_file(&pin, 0..LEN as u64, SendId(1));
                q
            };
            let mut stats = StackStats::default();
            let mut scratch = Vec::new();
            // Reference: the whole stream in one build (every record sealed whole).
            let mut q_ref = queue();
            let (mut reference_tx, first_epoch) = framed(&mut q_ref, backend);
            let end = reference_tx.framed_end;
            let mut reference = vec![0u8; end as usize];
            reference_tx
                .build(&q_ref, 0..end, &mut reference, &mut scratch, &mut stats)
                .unwrap();

            // The same stream in frames of uneven sizes, each followed by a
            // retransmission of an earlier range; every byte as in the reference.
            let mut q = queue();
            let (mut tx, _) = framed(&mut q, backend);
            let mut x = 0x9e37_79b9_u64;
            let mut at = 0u64;
            let mut out = vec![0u8; 70_000];
            while at < end {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let n = (x % 66_000 + 1).min(end - at);
                tx.build(
                    &q,
                    at..at + n,
                    &mut out[..n as usize],
                    &mut scratch,
                    &mut stats,
                )
                .unwrap();
                assert_eq!(
                    &out[..n as usize],
                    &reference[at as usize..(at + n) as usize]
                );
                tx.account_sent(at..at + n, &mut stats);
                at += n;
                let from = x % at;
                let len = (x >> 20) % 3000 + 1;
                let again = from..(from + len).min(at);
                let k = (again.end - again.start) as usize;
                tx.build(&q, again.clone(), &mut out[..k], &mut scratch, &mut stats)
                    .unwrap();
                assert_eq!(
                    &out[..k],
                    &reference[again.start as usize..again.end as usize],
                    "{backend:?} retransmission {again:?}"
                );
            }
            assert!(tx
                .build(&q, end..end + 1, &mut [0], &mut scratch, &mut stats)
                .is_err());

            // Decrypt the reference record by record, with the epoch's key and sequence.
            let mut got = Vec::new();
            let mut records = 0u64;
            let mut rest = &reference[..];
            let mut last_type = 0;
            while !rest.is_empty() {
                let h = record::parse_header(rest).unwrap().unwrap();
                let (epoch, seq) = if records < first_epoch {
                    (0, 5 + records)
                } else {
                    (1, records - first_epoch)
                };
                let k = key(epoch, backend);
                let mut body = rest[HEADER_LEN..HEADER_LEN + h.len - TAG_LEN].to_vec();
                let tag: Tag = rest[HEADER_LEN + h.len - TAG_LEN..HEADER_LEN + h.len]
                    .try_into()
                    .unwrap();
                k.aead()
                    .open_in_place(&k.nonce(seq), &rest[..HEADER_LEN], &mut body, &tag)
                    .unwrap();
                let (content, content_type) = record::split_inner(&body).unwrap();
                if records < SMALL_RECORDS {
                    assert_eq!(content.len(), SMALL_RECORD, "small records first");
                }
                last_type = content_type;
                if content_type == ContentType::ApplicationData as u8 {
                    got.extend_from_slice(content);
                } else {
                    assert_eq!(content, [1, 0], "close_notify last");
                }
                records += 1;
                rest = &rest[HEADER_LEN + h.len..];
            }
            assert_eq!(last_type, ContentType::Alert as u8);
            assert_eq!(got, plaintext, "{backend:?}");

            // Acknowledging releases records and the old key once none of its records
            // is left; the send queue's plaintext is acknowledged a record at a time.
            assert_eq!(tx.keys_held(), 2);
            tx.ack(end / 2, &mut q);
            assert_eq!(tx.keys_held(), 1, "epoch 0's records are all acknowledged");
            assert!(q.acked > 0 && q.acked < plaintext.len() as u64);
            tx.ack(end, &mut q);
            assert_eq!(tx.units_held(), 0);
            assert_eq!(q.acked, plaintext.len() as u64);
        }
    }
}
