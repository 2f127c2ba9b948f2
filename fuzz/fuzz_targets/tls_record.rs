//! The TLS 1.3 record layer's receive side (`netstack/src/tls/record.rs` header parsing and
//! inner-plaintext splitting, and `session.rs` `TlsConn` decrypting records) after a real
//! handshake: each run completes a handshake between a rustls client and a `TlsConn` in
//! memory, takes the client's traffic key, then feeds the connection records sealed with it
//! (content type, content, padding, outer type, length field, tag and sequence number all
//! chosen by the input, so they reach past the AEAD into the inner-plaintext and handshake-
//! message code), raw bytes, and a FIN, cut into arbitrary arrivals. Checks: no panic; while
//! only well-formed application-data records arrived the connection has no error and has
//! delivered exactly their plaintext, in order; anything else ends it with an error rather
//! than delivering bytes it should not.
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use driver::dma::{DmaMapper, DmaSpace};
use libfuzzer_sys::fuzz_target;
use netstack::sendq::{copy_pool, SendQueue};
use netstack::tls::record::{parse_header, split_inner, HEADER_LEN, MAX_CIPHERTEXT, MAX_PLAINTEXT};
use netstack::tls::session::TlsConn;
use netstack::{SendMode, StackStats, TlsConfig};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::ConnectionTrafficSecrets;
use softnic::SoftIommu;

#[derive(Arbitrary, Debug)]
enum Piece {
    Record {
        /// Inner content type (23 application data, 21 alert, 22 handshake, others).
        content_type: u8,
        content: Vec<u8>,
        padding: u8,
        /// Outer type other than application_data (23).
        outer_type: Option<u8>,
        /// Added to the length field (a lie).
        length_lie: Option<i16>,
        corrupt_tag: bool,
        /// Sealed with this sequence number offset (replays, skips).
        seq_offset: Option<i8>,
    },
    /// A KeyUpdate (the client's own key stays: later records fail, as they must).
    KeyUpdate {
        request: u8,
        extra: Vec<u8>,
    },
    Alert {
        level: u8,
        description: u8,
    },
    Raw(Vec<u8>),
    Fin,
}

#[derive(Arbitrary, Debug)]
struct Input {
    aes256: bool,
    cuts: Vec<u16>,
    pieces: Vec<Piece>,
    /// Also parsed directly as a record header and as an inner plaintext.
    direct: Vec<u8>,
}

struct Configs {
    server: [Arc<rustls::ServerConfig>; 2],
    client: [Arc<rustls::ClientConfig>; 2],
}

fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let certified = rcgen::generate_simple_self_signed(vec!["fuzz.test".to_string()]).unwrap();
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let make = |suite: rustls::SupportedCipherSuite| {
            let provider = Arc::new(rustls::crypto::CryptoProvider {
                cipher_suites: vec![suite],
                ..rustls::crypto::ring::default_provider()
            });
            let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.clone()], key.clone_key())
                .unwrap();
            server.enable_secret_extraction = true;
            server.send_tls13_tickets = 0;
            let mut roots = rustls::RootCertStore::empty();
            roots.add(cert.clone()).unwrap();
            let mut client = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            client.enable_secret_extraction = true;
            (Arc::new(server), Arc::new(client))
        };
        use rustls::crypto::ring::cipher_suite::{
            TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384,
        };
        let (s128, c128) = make(TLS13_AES_128_GCM_SHA256);
        let (s256, c256) = make(TLS13_AES_256_GCM_SHA384);
        Configs {
            server: [s128, s256],
            client: [c128, c256],
        }
    })
}

struct Sealer {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Sealer {
    fn seal(&self, seq: u64, outer: u8, len_lie: i16, inner: &[u8], corrupt: bool) -> Vec<u8> {
        let len = inner.len() + 16;
        let field = (len as i64 + len_lie as i64).clamp(0, u16::MAX as i64) as u16;
        let header = [outer, 3, 3, (field >> 8) as u8, field as u8];
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        let mut body = inner.to_vec();
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut body,
            )
            .unwrap();
        let mut out = header.to_vec();
        out.extend(body);
        out.extend(tag.as_ref());
        if corrupt {
            let last = out.len() - 1;
            out[last] ^= 1;
        }
        out
    }
}

/// Completes a handshake in memory; returns the server side and the client's sealer.
fn handshake(
    aes256: bool,
    sendq: &mut SendQueue,
    pool: &netstack::sendq::CopyPool,
) -> (TlsConn, Sealer) {
    let c = configs();
    let i = aes256 as usize;
    let mut tls = TlsConn::new(c.server[i].clone(), &TlsConfig::default()).unwrap();
    let name = ServerName::try_from("fuzz.test").unwrap();
    let mut client = rustls::ClientConnection::new(c.client[i].clone(), name).unwrap();
    let mut stats = StackStats::default();
    let mut read_to = 0u64;
    for _ in 0..32 {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        let mut at = 0;
        while at < to_server.len() {
            let n = tls.take_input(&to_server[at..]);
            assert!(n > 0, "server takes no handshake bytes");
            at += n;
            tls.process(&mut stats);
        }
        tls.process(&mut stats);
        assert!(tls.error.is_none(), "handshake failed: {:?}", tls.error);
        tls.flush_handshake(sendq, pool, &mut stats);
        let mut to_client = Vec::new();
        sendq
            .for_each_piece(read_to..sendq.fed, |p| {
                p.with_bytes(|b| to_client.extend_from_slice(b))
            })
            .unwrap();
        read_to = sendq.fed;
        let mut slice = &to_client[..];
        while !slice.is_empty() {
            client.read_tls(&mut slice).unwrap();
        }
        client.process_new_packets().unwrap();
        if tls.is_ready() && !client.is_handshaking() && !client.wants_write() {
            break;
        }
    }
    assert!(tls.is_ready(), "handshake did not complete");
    let secrets = client.dangerous_extract_secrets().unwrap();
    let (seq, secret) = secrets.tx;
    let (algorithm, key, iv) = match secret {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
        _ => unreachable!("only AES-GCM suites are offered"),
    };
    let key = LessSafeKey::new(UnboundKey::new(algorithm, key.as_ref()).unwrap());
    let iv: [u8; 12] = iv.as_ref().try_into().unwrap();
    (tls, Sealer { key, iv, seq })
}

fuzz_target!(|input: Input| {
    // The pure parsers, on arbitrary bytes.
    if let Some(Ok(h)) = parse_header(&input.direct) {
        assert!(h.len <= MAX_CIPHERTEXT);
    }
    if let Some((content, kind)) = split_inner(&input.direct) {
        assert!(kind != 0 && content.len() < input.direct.len());
        assert!(input.direct[content.len() + 1..].iter().all(|&b| b == 0));
    }

    let iommu = SoftIommu::new();
    let mapper: Arc<dyn DmaMapper> = iommu;
    let dma = DmaSpace::new(mapper);
    let pool = copy_pool(&dma, 16).unwrap();
    let mut sendq = SendQueue::new(SendMode::ZeroCopy, 16);
    let (mut tls, mut sealer) = handshake(input.aes256, &mut sendq, &pool);
    let mut stats = StackStats::default();

    let mut expected: Vec<u8> = Vec::new();
    // Whether everything fed so far was well-formed application data (then the model holds).
    let mut clean = true;
    let mut cuts = input.cuts.iter().map(|&c| c as usize + 1).cycle();
    let cuts_empty = input.cuts.is_empty();
    let mut delivered = 0usize;

    for piece in input.pieces.into_iter().take(16) {
        let bytes = match piece {
            Piece::Record {
                content_type,
                content,
                padding,
                outer_type,
                length_lie,
                corrupt_tag,
                seq_offset,
            } => {
                let content = &content[..content.len().min(MAX_PLAINTEXT + 64)];
                let mut inner = content.to_vec();
                inner.push(content_type);
                inner.extend(std::iter::repeat_n(0, padding as usize));
                let seq = sealer
                    .seq
                    .wrapping_add(seq_offset.unwrap_or(0) as i64 as u64);
                let outer = outer_type.unwrap_or(23);
                let lie = length_lie.unwrap_or(0);
                let well_formed = content_type == 23
                    && outer == 23
                    && lie == 0
                    && !corrupt_tag
                    && seq == sealer.seq
                    && content.len() <= MAX_PLAINTEXT
                    && inner.len() + 16 <= MAX_CIPHERTEXT;
                if well_formed && clean {
                    expected.extend_from_slice(content);
                } else {
                    clean = false;
                }
                sealer.seq += 1;
                sealer.seal(seq, outer, lie, &inner, corrupt_tag)
            }
            Piece::KeyUpdate { request, extra } => {
                clean = false;
                let mut inner = vec![24, 0, 0, 1, request];
                inner.extend(extra.iter().take(16));
                inner.push(22);
                sealer.seq += 1;
                sealer.seal(sealer.seq - 1, 23, 0, &inner, false)
            }
            Piece::Alert { level, description } => {
                clean = false;
                sealer.seq += 1;
                sealer.seal(sealer.seq - 1, 23, 0, &[level, description, 21], false)
            }
            Piece::Raw(bytes) => {
                clean = false;
                bytes
            }
            Piece::Fin => {
                clean = false;
                tls.peer_fin();
                Vec::new()
            }
        };
        let mut at = 0;
        while at < bytes.len() {
            let want = if cuts_empty {
                bytes.len()
            } else {
                cuts.next().unwrap()
            };
            let end = (at + want).min(bytes.len());
            let n = tls.take_input(&bytes[at..end]);
            at += n;
            tls.process(&mut stats);
            // What `recv` would take.
            delivered += tls.plain.len();
            let got: Vec<u8> = tls.plain.drain(..).collect();
            if clean {
                assert!(
                    tls.error.is_none(),
                    "well-formed records refused: {:?}",
                    tls.error
                );
                let from = delivered - got.len();
                assert_eq!(
                    &expected[from..delivered],
                    &got[..],
                    "delivered other bytes"
                );
            }
            tls.frame(&mut sendq, &pool, 1 << 20, &mut stats);
            if n == 0 {
                break; // the connection takes no more (failed, closed, or full)
            }
        }
    }
    tls.process(&mut stats);
    delivered += tls.plain.len();
    if clean {
        assert!(
            tls.error.is_none(),
            "well-formed records refused: {:?}",
            tls.error
        );
        assert_eq!(
            delivered,
            expected.len(),
            "not every well-formed record was delivered"
        );
    }
    assert!(HEADER_LEN == 5);
});
