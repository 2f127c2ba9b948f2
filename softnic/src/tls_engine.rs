//! The software NIC's inline TLS engine: what a NIC with kTLS transmit offload does to a
//! frame whose payload holds TLS 1.3 records laid out in plaintext (see the queue API's
//! "Inline TLS transmit" section in `driver::queue`).
//!
//! Per record part of a frame the engine gets the key, the record sequence number and the
//! offset of the part in its record, with every frame: it keeps no stream state, so a
//! retransmission that starts inside a record is encrypted from that offset at once
//! (body byte `o` is AES-CTR with counter block `2 + o / 16` of `nonce || ctr32`). A part
//! that holds tag bytes is sealed whole: from the frame's bytes if the record starts in it,
//! otherwise from the record's earlier bytes the driver points at (`resync`), which the
//! engine reads for the tag and does not send. The key table is keyed by
//! [`driver::TlsKeyId`]; it is bounded (least recently installed goes first).

use std::collections::{HashMap, VecDeque};

use aes::cipher::{InnerIvInit, KeyInit, StreamCipher, StreamCipherCoreWrapper, StreamCipherSeek};
use aes_gcm::aead::AeadInOut;
use driver::{TlsCipher, TlsKeyId, TlsRecordSlice, TxSegment};

/// Record header length, tag length (TLS 1.3 AES-GCM).
const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;

/// Why the engine refused a frame (the frame is dropped, as a NIC drops a bad descriptor).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TlsEngineError {
    #[error("record part {at}+{len} lies outside the {frame}-byte frame")]
    OutOfFrame { at: u32, len: u32, frame: usize },
    #[error("record part at record offset {offset}+{len} lies outside its {record}-byte record")]
    OutOfRecord {
        offset: u32,
        len: u32,
        record: usize,
    },
    #[error("key of {got} bytes for {cipher:?}")]
    KeyLength { cipher: TlsCipher, got: usize },
    #[error("a part holding tag bytes from record offset {offset} came with {got} resync bytes")]
    Resync { offset: u32, got: usize },
    #[error("DMA read of the resync bytes failed")]
    ResyncFault,
}

/// One record part of a pending frame, owned (a copy of the descriptor's
/// [`TlsRecordSlice`], as a NIC copies descriptors into its own memory at enqueue).
#[derive(Clone, Debug)]
pub struct PendingRecord {
    pub key_id: TlsKeyId,
    pub cipher: TlsCipher,
    key: [u8; 32],
    key_len: usize,
    pub iv: [u8; 12],
    pub seq: u64,
    pub inner_len: u32,
    pub frame_offset: u32,
    pub record_offset: u32,
    pub len: u32,
    pub resync: Vec<TxSegment>,
}

impl PendingRecord {
    pub fn from_slice(slice: &TlsRecordSlice<'_>) -> Result<Self, TlsEngineError> {
        let want = match slice.key.cipher {
            TlsCipher::Aes128Gcm => 16,
            TlsCipher::Aes256Gcm => 32,
        };
        if slice.key.key.len() != want {
            return Err(TlsEngineError::KeyLength {
                cipher: slice.key.cipher,
                got: slice.key.key.len(),
            });
        }
        let mut key = [0u8; 32];
        key[..want].copy_from_slice(slice.key.key);
        Ok(Self {
            key_id: slice.key.id,
            cipher: slice.key.cipher,
            key,
            key_len: want,
            iv: *slice.key.iv,
            seq: slice.seq,
            inner_len: slice.inner_len,
            frame_offset: slice.frame_offset,
            record_offset: slice.record_offset,
            len: slice.len,
            resync: slice.resync.to_vec(),
        })
    }

    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

/// What the engine did, cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsEngineCounters {
    /// Record parts encrypted.
    pub parts: u64,
    /// Parts that began inside their record (retransmissions, records split by frames).
    pub parts_mid_record: u64,
    /// Tags computed (records sealed whole).
    pub tags: u64,
    /// Tags computed with the record's start read from `resync` segments, and those bytes.
    pub resyncs: u64,
    pub resync_bytes: u64,
    /// Body bytes encrypted into frames.
    pub bytes_encrypted: u64,
    /// Keys put into the table (first use of a key id, or after eviction).
    pub key_installs: u64,
    pub frames_refused: u64,
}

/// A key in the engine's table.
struct EngineKey {
    key: Vec<u8>,
    aes: AesKey,
    gcm: GcmKey,
}

enum AesKey {
    A128(aes::Aes128),
    A256(aes::Aes256),
}

enum GcmKey {
    A128(Box<aes_gcm::Aes128Gcm>),
    A256(Box<aes_gcm::Aes256Gcm>),
}

impl EngineKey {
    fn new(cipher: TlsCipher, key: &[u8]) -> Self {
        let (aes, gcm) = match cipher {
            TlsCipher::Aes128Gcm => (
                AesKey::A128(aes::Aes128::new_from_slice(key).expect("length checked")),
                GcmKey::A128(Box::new(
                    aes_gcm::Aes128Gcm::new_from_slice(key).expect("length checked"),
                )),
            ),
            TlsCipher::Aes256Gcm => (
                AesKey::A256(aes::Aes256::new_from_slice(key).expect("length checked")),
                GcmKey::A256(Box::new(
                    aes_gcm::Aes256Gcm::new_from_slice(key).expect("length checked"),
                )),
            ),
        };
        Self {
            key: key.to_vec(),
            aes,
            gcm,
        }
    }

    /// XORs the keystream of body offset `offset` onward (record `nonce`) into `buf`.
    fn ctr_at(&self, nonce: &[u8; 12], offset: u64, buf: &mut [u8]) {
        let mut block = [0u8; 16];
        block[..12].copy_from_slice(nonce);
        block[12..].copy_from_slice(&2u32.to_be_bytes());
        match &self.aes {
            AesKey::A128(k) => {
                let mut c: ctr::Ctr32BE<&aes::Aes128> = StreamCipherCoreWrapper::from_core(
                    ctr::CtrCore::inner_iv_init(k, &block.into()),
                );
                c.seek(offset);
                c.apply_keystream(buf);
            }
            AesKey::A256(k) => {
                let mut c: ctr::Ctr32BE<&aes::Aes256> = StreamCipherCoreWrapper::from_core(
                    ctr::CtrCore::inner_iv_init(k, &block.into()),
                );
                c.seek(offset);
                c.apply_keystream(buf);
            }
        }
    }

    /// Seals `body` in place with `aad`; returns the tag.
    fn seal(&self, nonce: &[u8; 12], aad: &[u8], body: &mut [u8]) -> [u8; TAG_LEN] {
        let nonce = aes_gcm::Nonce::from(*nonce);
        match &self.gcm {
            GcmKey::A128(k) => k.encrypt_inout_detached(&nonce, aad, body.into()),
            GcmKey::A256(k) => k.encrypt_inout_detached(&nonce, aad, body.into()),
        }
        .expect("a TLS record is far below GCM's length limit")
        .into()
    }
}

/// The engine: a bounded key table and counters.
pub struct TlsEngine {
    keys: HashMap<TlsKeyId, EngineKey>,
    installed: VecDeque<TlsKeyId>,
    capacity: usize,
    pub counters: TlsEngineCounters,
    /// Working memory for a record sealed whole.
    record: Vec<u8>,
}

impl TlsEngine {
    pub fn new(capacity: usize) -> Self {
        Self {
            keys: HashMap::new(),
            installed: VecDeque::new(),
            capacity: capacity.max(1),
            counters: TlsEngineCounters::default(),
            record: Vec::new(),
        }
    }

    fn key(&mut self, part: &PendingRecord) -> &EngineKey {
        let fresh = self
            .keys
            .get(&part.key_id)
            .is_none_or(|k| k.key != part.key());
        if fresh {
            if !self.keys.contains_key(&part.key_id) {
                while self.installed.len() >= self.capacity {
                    if let Some(old) = self.installed.pop_front() {
                        self.keys.remove(&old);
                    }
                }
                self.installed.push_back(part.key_id);
            }
            self.keys
                .insert(part.key_id, EngineKey::new(part.cipher, part.key()));
            self.counters.key_installs += 1;
        }
        &self.keys[&part.key_id]
    }

    /// Encrypts the record parts of `frame` (the frame's bytes as DMA-read) in place.
    /// `read` DMA-reads a resync segment list into a buffer (appending).
    pub fn apply(
        &mut self,
        frame: &mut [u8],
        parts: &[PendingRecord],
        read: &mut dyn FnMut(&[TxSegment], &mut Vec<u8>) -> bool,
    ) -> Result<(), TlsEngineError> {
        let result = parts
            .iter()
            .try_for_each(|part| self.apply_part(frame, part, read));
        if result.is_err() {
            self.counters.frames_refused += 1;
        }
        result
    }

    fn apply_part(
        &mut self,
        frame: &mut [u8],
        part: &PendingRecord,
        read: &mut dyn FnMut(&[TxSegment], &mut Vec<u8>) -> bool,
    ) -> Result<(), TlsEngineError> {
        let inner = part.inner_len as usize;
        let record_len = HEADER_LEN + inner + TAG_LEN;
        let (at, len, offset) = (
            part.frame_offset as usize,
            part.len as usize,
            part.record_offset as usize,
        );
        if at + len > frame.len() {
            return Err(TlsEngineError::OutOfFrame {
                at: part.frame_offset,
                len: part.len,
                frame: frame.len(),
            });
        }
        if offset + len > record_len {
            return Err(TlsEngineError::OutOfRecord {
                offset: part.record_offset,
                len: part.len,
                record: record_len,
            });
        }
        let nonce = {
            let mut n = part.iv;
            for (b, s) in n[4..].iter_mut().zip(part.seq.to_be_bytes()) {
                *b ^= s;
            }
            n
        };
        self.counters.parts += 1;
        if offset > 0 {
            self.counters.parts_mid_record += 1;
        }
        let bytes = &mut frame[at..at + len];
        let body = HEADER_LEN..HEADER_LEN + inner;
        let holds_tag = offset + len > body.end;
        if holds_tag {
            // The whole record is needed: its start from the resync bytes (when it is not
            // in this frame), the rest from the frame.
            let mut record = std::mem::take(&mut self.record);
            record.clear();
            if offset > 0 {
                if !read(&part.resync, &mut record) {
                    self.record = record;
                    return Err(TlsEngineError::ResyncFault);
                }
                if record.len() != offset {
                    let got = record.len();
                    self.record = record;
                    return Err(TlsEngineError::Resync {
                        offset: part.record_offset,
                        got,
                    });
                }
                self.counters.resyncs += 1;
                self.counters.resync_bytes += offset as u64;
            }
            record.extend_from_slice(bytes);
            // The part may end inside the tag: room for all of it.
            record.resize(record_len, 0);
            let (head, rest) = record.split_at_mut(HEADER_LEN);
            let key = self.key(part);
            let tag = key.seal(&nonce, head, &mut rest[..inner]);
            rest[inner..inner + TAG_LEN].copy_from_slice(&tag);
            bytes.copy_from_slice(&record[offset..offset + len]);
            self.record = record;
            self.counters.tags += 1;
        } else {
            // Body bytes only (and maybe header bytes, left as they are): CTR at the offset.
            let from = offset.max(body.start);
            let to = (offset + len).min(body.end);
            if from < to {
                let key = self.key(part);
                key.ctr_at(
                    &nonce,
                    (from - body.start) as u64,
                    &mut bytes[from - offset..to - offset],
                );
            }
        }
        let encrypted = (offset + len)
            .min(body.end)
            .saturating_sub(offset.max(body.start));
        self.counters.bytes_encrypted += encrypted as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driver::TlsKey;

    fn record(inner: &[u8]) -> Vec<u8> {
        let len = (inner.len() + TAG_LEN) as u16;
        let mut r = vec![23, 3, 3, (len >> 8) as u8, len as u8];
        r.extend_from_slice(inner);
        r.extend_from_slice(&[0; TAG_LEN]);
        r
    }

    #[test]
    fn any_part_with_or_without_resync_gives_the_sealed_record_bytes() {
        let key = [7u8; 16];
        let iv = [9u8; 12];
        let mut inner: Vec<u8> = (0..3000).map(|i| (i * 31 % 251) as u8).collect();
        inner.push(23);
        let plain = record(&inner);
        // Reference: the whole record sealed.
        let mut engine = TlsEngine::new(4);
        let slice = |offset: u32, len: u32, frame_offset: u32| TlsRecordSlice {
            key: TlsKey {
                id: TlsKeyId { flow: 1, epoch: 0 },
                cipher: TlsCipher::Aes128Gcm,
                key: &key,
                iv: &iv,
            },
            seq: 5,
            inner_len: inner.len() as u32,
            frame_offset,
            record_offset: offset,
            len,
            resync: &[],
        };
        let mut whole = plain.clone();
        let part = PendingRecord::from_slice(&slice(0, plain.len() as u32, 0)).unwrap();
        engine
            .apply(&mut whole, &[part], &mut |_, _| unreachable!())
            .unwrap();
        assert_ne!(whole[5..100], plain[5..100]);
        for (from, to) in [
            (0, 10),
            (3, 1450),
            (17, 3000),
            (1000, plain.len()),
            (3010, plain.len()),
        ] {
            let mut frame = vec![0xee; 7];
            frame.extend_from_slice(&plain[from..to]);
            let part =
                PendingRecord::from_slice(&slice(from as u32, (to - from) as u32, 7)).unwrap();
            let prefix = plain[..from].to_vec();
            engine
                .apply(&mut frame, &[part], &mut |_, out| {
                    out.extend_from_slice(&prefix);
                    true
                })
                .unwrap();
            assert_eq!(frame[7..], whole[from..to], "{from}..{to}");
            assert_eq!(frame[..7], [0xee; 7], "bytes outside the part untouched");
        }
        assert!(engine.counters.resyncs >= 2);
        // A wrong resync (too few bytes) is refused rather than sealed wrong.
        let mut frame = plain[1000..].to_vec();
        let part = PendingRecord::from_slice(&slice(1000, frame.len() as u32, 0)).unwrap();
        assert!(matches!(
            engine.apply(&mut frame, &[part], &mut |_, out| {
                out.extend_from_slice(&[0; 10]);
                true
            }),
            Err(TlsEngineError::Resync { .. })
        ));
    }
}
