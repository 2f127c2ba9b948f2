//! AES-GCM for TLS 1.3 records, behind one small trait ([`RecordAead`]) with two backends.
//!
//! The record path needs more than an AEAD's seal and open: a retransmission re-sends a
//! *slice* of a record, and recomputing that slice must not cost a whole record. In GCM
//! (NIST SP 800-38D) body byte `o` is encrypted with counter block `2 + o / 16` of
//! `nonce || ctr32`, so any slice of a record's ciphertext is AES-CTR of the plaintext from
//! that counter ([`RecordAead::ctr_xor`]); only the tag needs the whole record, and the
//! stack keeps it. [`RecordAead::tag_of`] recomputes a tag from ciphertext (GHASH), for the
//! first transmission of a record split across frames and for audits.
//!
//! Backends ([`Backend`]):
//! - [`Backend::Ring`]: ring's fused AES-GCM (AES-NI/VAES with CLMUL) for sealing whole
//!   records. ring seals in place only, so scattered plaintext is gathered into the output
//!   first. ring has no raw AES-CTR, so slices and tags use the RustCrypto parts below.
//! - [`Backend::AesGcm`]: the `aes-gcm` crate (the design card's), and the parts it is made
//!   of (`aes`, `ctr`, `ghash`): scattered plaintext is encrypted out of place, piece by
//!   piece, straight into the output (one write per byte), then GHASHed.
//!
//! [`Backend::default`] is the faster of the two as `cargo bench -p netstack --bench tls`
//! measures it on this machine (see that bench's output in the module docs of [`crate::tls`]).

use aes::cipher::{
    BlockCipherEncrypt, InnerIvInit, KeyInit, StreamCipher, StreamCipherCoreWrapper,
    StreamCipherSeek,
};
use aes_gcm::aead::AeadInOut;
use ghash::universal_hash::UniversalHash;

/// GCM tag length (TLS 1.3 uses the full 16 bytes).
pub const TAG_LEN: usize = 16;
/// A GCM tag.
pub type Tag = [u8; TAG_LEN];
/// A TLS 1.3 per-record nonce (RFC 8446 section 5.3: `iv XOR seq`).
pub type Nonce = [u8; 12];

/// Which AES-GCM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Aes128Gcm,
    Aes256Gcm,
}

impl Algorithm {
    pub fn key_len(self) -> usize {
        match self {
            Algorithm::Aes128Gcm => 16,
            Algorithm::Aes256Gcm => 32,
        }
    }
}

/// Which implementation does the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Ring,
    AesGcm,
}

impl Default for Backend {
    /// ring: the bench (`benches/tls.rs`) measures its record path at about twice the
    /// `aes-gcm` one on this machine (VAES/AVX2 AES-GCM against unfused AES-NI CTR and
    /// CLMUL GHASH).
    fn default() -> Self {
        Backend::Ring
    }
}

/// AEAD failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AeadError {
    #[error("key is {got} bytes, {algorithm:?} needs {}", algorithm.key_len())]
    KeyLength { algorithm: Algorithm, got: usize },
    /// The tag does not match: forged, corrupted, replayed (wrong sequence) or truncated.
    #[error("record authentication failed")]
    Forged,
}

/// AES-GCM operations of the TLS record path. One instance holds one traffic key.
pub trait RecordAead: Send + Sync {
    fn algorithm(&self) -> Algorithm;

    /// Whether [`RecordAead::seal_pieces`] copies the plaintext into the output before
    /// sealing it there (an in-place-only AEAD): one more CPU write per byte.
    fn gathers(&self) -> bool {
        false
    }

    /// Seals the inner plaintext formed by `pieces` (concatenated; their total length is
    /// `out.len()`) into `out`, out of place; returns the tag.
    fn seal_pieces(&self, nonce: &Nonce, aad: &[u8], pieces: &[&[u8]], out: &mut [u8]) -> Tag;

    /// Seals `buf` in place (the bare AEAD, the bench's reference).
    fn seal_in_place(&self, nonce: &Nonce, aad: &[u8], buf: &mut [u8]) -> Tag;

    /// `out = input XOR keystream`, where `input` starts at body offset `offset` of the
    /// record with this nonce: the ciphertext (or plaintext) of that slice.
    fn ctr_xor(&self, nonce: &Nonce, offset: u64, input: &[u8], out: &mut [u8]);

    /// [`RecordAead::ctr_xor`] in place.
    fn ctr_xor_in_place(&self, nonce: &Nonce, offset: u64, buf: &mut [u8]);

    /// The tag of a record whose whole body ciphertext is `ciphertext`.
    fn tag_of(&self, nonce: &Nonce, aad: &[u8], ciphertext: &[u8]) -> Tag;

    /// Starts a tag computed over ciphertext that arrives in pieces, in order
    /// ([`TagState::update`]): a record whose first transmission is split across frames.
    fn tag_begin(&self, aad: &[u8]) -> TagState;

    /// Finishes a [`RecordAead::tag_begin`] tag.
    fn tag_finish(&self, nonce: &Nonce, state: TagState) -> Tag;

    /// Verifies `tag` and decrypts `buf` in place. On failure `buf` is unspecified.
    fn open_in_place(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        buf: &mut [u8],
        tag: &Tag,
    ) -> Result<(), AeadError>;
}

/// A key for `algorithm` with `backend`.
pub fn new_aead(
    backend: Backend,
    algorithm: Algorithm,
    key: &[u8],
) -> Result<Box<dyn RecordAead>, AeadError> {
    if key.len() != algorithm.key_len() {
        return Err(AeadError::KeyLength {
            algorithm,
            got: key.len(),
        });
    }
    Ok(match backend {
        Backend::Ring => Box::new(RingAead::new(algorithm, key)),
        Backend::AesGcm => Box::new(RustCryptoAead::new(algorithm, key)),
    })
}

/// The AES key schedule, for CTR slices and GHASH (both backends).
enum AesKey {
    A128(aes::Aes128),
    A256(aes::Aes256),
}

/// CTR from a record's first body block (counter 2).
enum Ctr<'a> {
    A128(ctr::Ctr32BE<&'a aes::Aes128>),
    A256(ctr::Ctr32BE<&'a aes::Aes256>),
}

impl Ctr<'_> {
    fn apply(&mut self, buf: &mut [u8]) {
        match self {
            Ctr::A128(c) => c.apply_keystream(buf),
            Ctr::A256(c) => c.apply_keystream(buf),
        }
    }
    fn apply_b2b(&mut self, input: &[u8], out: &mut [u8]) {
        match self {
            Ctr::A128(c) => c.apply_keystream_b2b(input, out),
            Ctr::A256(c) => c.apply_keystream_b2b(input, out),
        }
    }
    fn seek(&mut self, offset: u64) {
        match self {
            Ctr::A128(c) => c.seek(offset),
            Ctr::A256(c) => c.seek(offset),
        }
    }
}

/// `nonce || ctr32` as a 16-byte counter block.
fn counter_block(nonce: &Nonce, counter: u32) -> [u8; 16] {
    let mut block = [0u8; 16];
    block[..12].copy_from_slice(nonce);
    block[12..].copy_from_slice(&counter.to_be_bytes());
    block
}

/// The RustCrypto parts of AES-GCM: AES-CTR at any record offset and GHASH.
struct CtrGhash {
    aes: AesKey,
    /// GHASH key H = AES_K(0^128).
    ghash: ghash::GHash,
}

impl CtrGhash {
    fn new(algorithm: Algorithm, key: &[u8]) -> Self {
        let aes = match algorithm {
            Algorithm::Aes128Gcm => {
                AesKey::A128(aes::Aes128::new_from_slice(key).expect("length checked"))
            }
            Algorithm::Aes256Gcm => {
                AesKey::A256(aes::Aes256::new_from_slice(key).expect("length checked"))
            }
        };
        let mut h = aes::Block::default();
        aes.encrypt(&mut h);
        let ghash = ghash::GHash::new(&h);
        Self { aes, ghash }
    }

    /// Keystream positioned at body offset `offset` (counter `2 + offset / 16`).
    fn ctr(&self, nonce: &Nonce, offset: u64) -> Ctr<'_> {
        let iv = counter_block(nonce, 2);
        let mut ctr = match &self.aes {
            AesKey::A128(k) => Ctr::A128(StreamCipherCoreWrapper::from_core(
                ctr::CtrCore::inner_iv_init(k, &iv.into()),
            )),
            AesKey::A256(k) => Ctr::A256(StreamCipherCoreWrapper::from_core(
                ctr::CtrCore::inner_iv_init(k, &iv.into()),
            )),
        };
        if offset > 0 {
            ctr.seek(offset);
        }
        ctr
    }

    fn tag_of(&self, nonce: &Nonce, aad: &[u8], ciphertext: &[u8]) -> Tag {
        let mut ghash = self.ghash.clone();
        ghash.update_padded(aad);
        ghash.update_padded(ciphertext);
        let mut lengths = ghash::Block::default();
        lengths[..8].copy_from_slice(&(aad.len() as u64 * 8).to_be_bytes());
        lengths[8..].copy_from_slice(&(ciphertext.len() as u64 * 8).to_be_bytes());
        ghash.update(&[lengths]);
        let mut tag: Tag = ghash.finalize().into();
        // The tag is masked with the keystream block of J0 = nonce || 1.
        let mut mask: aes::Block = counter_block(nonce, 1).into();
        self.aes.encrypt(&mut mask);
        for (t, m) in tag.iter_mut().zip(mask.iter()) {
            *t ^= m;
        }
        tag
    }
}

/// GHASH over a record's AAD and ciphertext, fed in pieces of any length.
#[derive(Clone)]
pub struct TagState {
    ghash: ghash::GHash,
    /// Bytes of an incomplete block.
    partial: [u8; 16],
    partial_len: usize,
    aad_len: u64,
    /// Ciphertext bytes fed so far.
    len: u64,
}

impl TagState {
    /// Ciphertext bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Feeds the next ciphertext bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if self.partial_len > 0 {
            let n = (16 - self.partial_len).min(bytes.len());
            self.partial[self.partial_len..self.partial_len + n].copy_from_slice(&bytes[..n]);
            self.partial_len += n;
            bytes = &bytes[n..];
            if self.partial_len < 16 {
                return;
            }
            self.ghash.update(&[self.partial.into()]);
            self.partial_len = 0;
        }
        let whole = bytes.len() / 16 * 16;
        if whole > 0 {
            // `update_padded` of a multiple of 16 bytes is plain GHASH of those blocks.
            self.ghash.update_padded(&bytes[..whole]);
        }
        let rest = &bytes[whole..];
        self.partial[..rest.len()].copy_from_slice(rest);
        self.partial_len = rest.len();
    }
}

impl CtrGhash {
    fn tag_begin(&self, aad: &[u8]) -> TagState {
        let mut ghash = self.ghash.clone();
        ghash.update_padded(aad);
        TagState {
            ghash,
            partial: [0; 16],
            partial_len: 0,
            aad_len: aad.len() as u64,
            len: 0,
        }
    }

    fn tag_finish(&self, nonce: &Nonce, state: TagState) -> Tag {
        let TagState {
            mut ghash,
            partial,
            partial_len,
            aad_len,
            len,
        } = state;
        ghash.update_padded(&partial[..partial_len]);
        let mut lengths = ghash::Block::default();
        lengths[..8].copy_from_slice(&(aad_len * 8).to_be_bytes());
        lengths[8..].copy_from_slice(&(len * 8).to_be_bytes());
        ghash.update(&[lengths]);
        let mut tag: Tag = ghash.finalize().into();
        let mut mask: aes::Block = counter_block(nonce, 1).into();
        self.aes.encrypt(&mut mask);
        for (t, m) in tag.iter_mut().zip(mask.iter()) {
            *t ^= m;
        }
        tag
    }
}

impl AesKey {
    fn encrypt(&self, block: &mut aes::Block) {
        match self {
            AesKey::A128(k) => k.encrypt_block(block),
            AesKey::A256(k) => k.encrypt_block(block),
        }
    }
}

/// ring's AES-GCM for whole records; RustCrypto CTR/GHASH for slices and tags.
struct RingAead {
    algorithm: Algorithm,
    key: ring::aead::LessSafeKey,
    parts: CtrGhash,
}

impl RingAead {
    fn new(algorithm: Algorithm, key: &[u8]) -> Self {
        let ring_algorithm = match algorithm {
            Algorithm::Aes128Gcm => &ring::aead::AES_128_GCM,
            Algorithm::Aes256Gcm => &ring::aead::AES_256_GCM,
        };
        let unbound = ring::aead::UnboundKey::new(ring_algorithm, key).expect("length checked");
        Self {
            algorithm,
            key: ring::aead::LessSafeKey::new(unbound),
            parts: CtrGhash::new(algorithm, key),
        }
    }
}

impl RecordAead for RingAead {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    fn gathers(&self) -> bool {
        true
    }

    fn seal_pieces(&self, nonce: &Nonce, aad: &[u8], pieces: &[&[u8]], out: &mut [u8]) -> Tag {
        // ring seals in place: gather first (a second write of each byte, into memory that
        // is hot in cache for the seal right after).
        let mut at = 0;
        for piece in pieces {
            out[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        assert_eq!(at, out.len(), "pieces fill the output");
        self.seal_in_place(nonce, aad, out)
    }

    fn seal_in_place(&self, nonce: &Nonce, aad: &[u8], buf: &mut [u8]) -> Tag {
        let tag = self
            .key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(*nonce),
                ring::aead::Aad::from(aad),
                buf,
            )
            .expect("a TLS record is far below GCM's length limit");
        tag.as_ref().try_into().expect("16-byte tag")
    }

    fn ctr_xor(&self, nonce: &Nonce, offset: u64, input: &[u8], out: &mut [u8]) {
        self.parts.ctr(nonce, offset).apply_b2b(input, out);
    }

    fn ctr_xor_in_place(&self, nonce: &Nonce, offset: u64, buf: &mut [u8]) {
        self.parts.ctr(nonce, offset).apply(buf);
    }

    fn tag_of(&self, nonce: &Nonce, aad: &[u8], ciphertext: &[u8]) -> Tag {
        self.parts.tag_of(nonce, aad, ciphertext)
    }

    fn tag_begin(&self, aad: &[u8]) -> TagState {
        self.parts.tag_begin(aad)
    }

    fn tag_finish(&self, nonce: &Nonce, state: TagState) -> Tag {
        self.parts.tag_finish(nonce, state)
    }

    fn open_in_place(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        buf: &mut [u8],
        tag: &Tag,
    ) -> Result<(), AeadError> {
        self.key
            .open_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(*nonce),
                ring::aead::Aad::from(aad),
                ring::aead::Tag::from(*tag),
                buf,
                0..,
            )
            .map(|_| ())
            .map_err(|_| AeadError::Forged)
    }
}

/// The `aes-gcm` crate's AEAD.
enum AesGcmKey {
    A128(Box<aes_gcm::Aes128Gcm>),
    A256(Box<aes_gcm::Aes256Gcm>),
}

/// `aes-gcm` for whole contiguous records and open; its parts (`ctr`, `ghash`) for
/// scattered plaintext, slices and tags.
struct RustCryptoAead {
    algorithm: Algorithm,
    key: AesGcmKey,
    parts: CtrGhash,
}

impl RustCryptoAead {
    fn new(algorithm: Algorithm, key: &[u8]) -> Self {
        let aead = match algorithm {
            Algorithm::Aes128Gcm => AesGcmKey::A128(Box::new(
                aes_gcm::Aes128Gcm::new_from_slice(key).expect("length checked"),
            )),
            Algorithm::Aes256Gcm => AesGcmKey::A256(Box::new(
                aes_gcm::Aes256Gcm::new_from_slice(key).expect("length checked"),
            )),
        };
        Self {
            algorithm,
            key: aead,
            parts: CtrGhash::new(algorithm, key),
        }
    }

    fn seal_inout(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        buffer: aes_gcm::aead::inout::InOutBuf<'_, '_, u8>,
    ) -> Tag {
        let nonce = aes_gcm::Nonce::from(*nonce);
        let tag = match &self.key {
            AesGcmKey::A128(k) => k.encrypt_inout_detached(&nonce, aad, buffer),
            AesGcmKey::A256(k) => k.encrypt_inout_detached(&nonce, aad, buffer),
        }
        .expect("a TLS record is far below GCM's length limit");
        tag.into()
    }
}

impl RecordAead for RustCryptoAead {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    fn seal_pieces(&self, nonce: &Nonce, aad: &[u8], pieces: &[&[u8]], out: &mut [u8]) -> Tag {
        if let [whole] = pieces {
            let buffer =
                aes_gcm::aead::inout::InOutBuf::new(whole, out).expect("pieces fill the output");
            return self.seal_inout(nonce, aad, buffer);
        }
        // Scattered: CTR out of place piece by piece (the keystream carries over partial
        // blocks), then GHASH of the output. The same two passes `aes-gcm` makes.
        let mut ctr = self.parts.ctr(nonce, 0);
        let mut at = 0;
        for piece in pieces {
            ctr.apply_b2b(piece, &mut out[at..at + piece.len()]);
            at += piece.len();
        }
        assert_eq!(at, out.len(), "pieces fill the output");
        self.parts.tag_of(nonce, aad, out)
    }

    fn seal_in_place(&self, nonce: &Nonce, aad: &[u8], buf: &mut [u8]) -> Tag {
        self.seal_inout(nonce, aad, buf.into())
    }

    fn ctr_xor(&self, nonce: &Nonce, offset: u64, input: &[u8], out: &mut [u8]) {
        self.parts.ctr(nonce, offset).apply_b2b(input, out);
    }

    fn ctr_xor_in_place(&self, nonce: &Nonce, offset: u64, buf: &mut [u8]) {
        self.parts.ctr(nonce, offset).apply(buf);
    }

    fn tag_of(&self, nonce: &Nonce, aad: &[u8], ciphertext: &[u8]) -> Tag {
        self.parts.tag_of(nonce, aad, ciphertext)
    }

    fn tag_begin(&self, aad: &[u8]) -> TagState {
        self.parts.tag_begin(aad)
    }

    fn tag_finish(&self, nonce: &Nonce, state: TagState) -> Tag {
        self.parts.tag_finish(nonce, state)
    }

    fn open_in_place(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        buf: &mut [u8],
        tag: &Tag,
    ) -> Result<(), AeadError> {
        let nonce = aes_gcm::Nonce::from(*nonce);
        let tag = aes_gcm::Tag::from(*tag);
        match &self.key {
            AesGcmKey::A128(k) => k.decrypt_inout_detached(&nonce, aad, buf.into(), &tag),
            AesGcmKey::A256(k) => k.decrypt_inout_detached(&nonce, aad, buf.into(), &tag),
        }
        .map_err(|_| AeadError::Forged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKENDS: [Backend; 2] = [Backend::Ring, Backend::AesGcm];
    const ALGORITHMS: [Algorithm; 2] = [Algorithm::Aes128Gcm, Algorithm::Aes256Gcm];

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn nist_gcm_test_case_4_aes128() {
        // McGrew & Viega, "The Galois/Counter Mode of Operation", test case 4 (AES-128,
        // 60-byte plaintext, 20-byte AAD).
        let key = hex("feffe9928665731c6d6a8f9467308308");
        let iv: Nonce = hex("cafebabefacedbaddecaf888").try_into().unwrap();
        let plaintext = hex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let ciphertext = hex(
            "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e\
             21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
        );
        let tag: Tag = hex("5bc94fbc3221a5db94fae95ae7121a47").try_into().unwrap();
        for backend in BACKENDS {
            let aead = new_aead(backend, Algorithm::Aes128Gcm, &key).unwrap();
            let mut out = vec![0; plaintext.len()];
            assert_eq!(aead.seal_pieces(&iv, &aad, &[&plaintext], &mut out), tag);
            assert_eq!(out, ciphertext, "{backend:?}");
            assert_eq!(aead.tag_of(&iv, &aad, &ciphertext), tag);
            aead.open_in_place(&iv, &aad, &mut out, &tag).unwrap();
            assert_eq!(out, plaintext);
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn backends_agree_and_pieces_equal_whole() {
        let plaintext = bytes(16 * 1024 + 1, 3);
        let aad = [0x17, 3, 3, 0x40, 0x11];
        let nonce = [9u8; 12];
        for algorithm in ALGORITHMS {
            let key = bytes(algorithm.key_len(), 77);
            let mut reference = None;
            for backend in BACKENDS {
                let aead = new_aead(backend, algorithm, &key).unwrap();
                // Pieces cut at odd places, as page spans and copy blocks are.
                let (a, rest) = plaintext.split_at(1000);
                let (b, c) = rest.split_at(4097);
                let mut out = vec![0; plaintext.len()];
                let tag = aead.seal_pieces(&nonce, &aad, &[a, b, c], &mut out);
                let mut whole = plaintext.clone();
                assert_eq!(aead.seal_in_place(&nonce, &aad, &mut whole), tag);
                assert_eq!(whole, out);
                let seen = reference.get_or_insert((out.clone(), tag));
                assert_eq!(
                    seen,
                    &(out, tag),
                    "{backend:?} agrees with the first backend"
                );
            }
        }
    }

    #[test]
    fn any_ciphertext_slice_is_ctr_of_the_plaintext_at_its_offset() {
        let plaintext = bytes(16 * 1024 + 1, 5);
        let nonce = [1u8; 12];
        for backend in BACKENDS {
            for algorithm in ALGORITHMS {
                let aead = new_aead(backend, algorithm, &bytes(algorithm.key_len(), 1)).unwrap();
                let mut sealed = plaintext.clone();
                let tag = aead.seal_in_place(&nonce, b"aad", &mut sealed);
                for (from, len) in [(0, 1448), (1, 15), (17, 1), (4095, 3000), (15000, 1385)] {
                    let mut slice = vec![0; len];
                    aead.ctr_xor(
                        &nonce,
                        from as u64,
                        &plaintext[from..from + len],
                        &mut slice,
                    );
                    assert_eq!(slice, sealed[from..from + len], "{backend:?} {from}+{len}");
                    let mut in_place = plaintext[from..from + len].to_vec();
                    aead.ctr_xor_in_place(&nonce, from as u64, &mut in_place);
                    assert_eq!(in_place, slice);
                }
                assert_eq!(aead.tag_of(&nonce, b"aad", &sealed), tag);
                // Fed in pieces of odd lengths, the incremental tag is the same.
                for cuts in [&[0usize][..], &[1, 17, 4000], &[15, 16, 16 * 1024]] {
                    let mut state = aead.tag_begin(b"aad");
                    let mut at = 0;
                    for &cut in cuts.iter().chain([&sealed.len()]) {
                        state.update(&sealed[at..cut.max(at)]);
                        at = cut.max(at);
                    }
                    assert_eq!(state.len(), sealed.len() as u64);
                    assert_eq!(aead.tag_finish(&nonce, state), tag, "{cuts:?}");
                }
            }
        }
    }

    #[test]
    fn open_rejects_forged_tag_ciphertext_aad_and_nonce() {
        let plaintext = bytes(300, 8);
        for backend in BACKENDS {
            let aead = new_aead(backend, Algorithm::Aes256Gcm, &[4; 32]).unwrap();
            let nonce = [2u8; 12];
            let mut sealed = plaintext.clone();
            let tag = aead.seal_in_place(&nonce, b"hdr", &mut sealed);
            let try_open = |buf: &[u8], aad: &[u8], nonce: &Nonce, tag: &Tag| {
                let mut b = buf.to_vec();
                aead.open_in_place(nonce, aad, &mut b, tag).map(|_| b)
            };
            assert_eq!(try_open(&sealed, b"hdr", &nonce, &tag).unwrap(), plaintext);
            let mut bad_tag = tag;
            bad_tag[15] ^= 1;
            assert_eq!(
                try_open(&sealed, b"hdr", &nonce, &bad_tag),
                Err(AeadError::Forged)
            );
            let mut bad = sealed.clone();
            bad[100] ^= 0x80;
            assert_eq!(try_open(&bad, b"hdr", &nonce, &tag), Err(AeadError::Forged));
            assert_eq!(
                try_open(&sealed, b"hdR", &nonce, &tag),
                Err(AeadError::Forged)
            );
            assert_eq!(
                try_open(&sealed, b"hdr", &[3; 12], &tag),
                Err(AeadError::Forged),
                "another sequence number: a replayed record"
            );
            assert_eq!(
                try_open(&sealed[..299], b"hdr", &nonce, &tag),
                Err(AeadError::Forged),
                "truncated"
            );
        }
    }

    #[test]
    fn wrong_key_length_is_an_error() {
        assert!(matches!(
            new_aead(Backend::Ring, Algorithm::Aes256Gcm, &[0; 16]),
            Err(AeadError::KeyLength { got: 16, .. })
        ));
    }
}
