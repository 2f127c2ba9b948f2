//! TLS 1.3 through the software NIC: a rustls client on the smoltcp peer's TCP socket
//! against the stack's record layer.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use common::*;
use netstack::tls::record::AlertDescription;
use netstack::tls::{Algorithm, Backend, TlsError};
use netstack::{ConnId, Event, SendOutcome, StackStats};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sha2::{Digest, Sha256};
use softnic::{Impairments, SoftNicConfig};

const HOST: &str = "zerosend.test";

/// A provider with TLS 1.3 AES-GCM suites only (what the record layer does), `first` the
/// preferred one.
fn provider(first: Algorithm) -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    let suites = match first {
        Algorithm::Aes128Gcm => vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384],
        Algorithm::Aes256Gcm => vec![TLS13_AES_256_GCM_SHA384, TLS13_AES_128_GCM_SHA256],
    };
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: suites,
        ..rustls::crypto::ring::default_provider()
    })
}

/// A self-signed certificate for [`HOST`]: the server's config and a client trusting it.
fn configs(algorithm: Algorithm) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let certified = rcgen::generate_simple_self_signed(vec![HOST.to_string()]).unwrap();
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut server = rustls::ServerConfig::builder_with_provider(provider(algorithm))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider(algorithm))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(server), Arc::new(client))
}

/// A rustls client speaking through the peer's smoltcp socket.
struct Client {
    tls: rustls::ClientConnection,
    outgoing: Vec<u8>,
    /// Plaintext received.
    received: u64,
    hasher: Sha256,
    mismatched: u64,
    /// The client's TLS error, if it failed (e.g. a forged record from the server).
    error: Option<rustls::Error>,
    /// Raw bytes to send instead of (after) what rustls writes: forged records.
    inject: Vec<u8>,
    /// Every TLS byte received (for diagnostics).
    raw: Vec<u8>,
    /// After a TLS error, send nothing more (no alert either) and drop what arrives, so the
    /// server's TCP goes on sending and retransmitting what was lost.
    mute_after_error: bool,
}

impl Client {
    fn new(config: Arc<rustls::ClientConfig>) -> Self {
        let name = ServerName::try_from(HOST).unwrap();
        Self {
            tls: rustls::ClientConnection::new(config, name).unwrap(),
            outgoing: Vec::new(),
            received: 0,
            hasher: Sha256::new(),
            mismatched: 0,
            error: None,
            inject: Vec::new(),
            raw: Vec::new(),
            mute_after_error: false,
        }
    }

    /// Moves bytes between rustls and the socket; plaintext is checked against `expected`
    /// (from offset 0 of what the server sends).
    fn pump(&mut self, bed: &mut Bed, expected: &[u8]) {
        let socket = bed.peer_socket();
        if self.mute_after_error && self.error.is_some() {
            // TCP goes on (the window stays open); the bytes are dropped.
            while socket.recv(|bytes| (bytes.len(), bytes.len())).unwrap_or(0) > 0 {}
            return;
        }
        while self.error.is_none() && socket.can_recv() {
            let tls = &mut self.tls;
            let raw = &mut self.raw;
            let n = socket
                .recv(|bytes| {
                    let n = tls.read_tls(&mut &bytes[..]).unwrap_or(0);
                    raw.extend_from_slice(&bytes[..n]);
                    (n, n)
                })
                .unwrap();
            if let Err(e) = self.tls.process_new_packets() {
                self.error = Some(e);
                if self.mute_after_error {
                    return;
                }
            }
            let mut buf = [0u8; 65536];
            loop {
                match self.tls.reader().read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        let chunk = &buf[..k];
                        self.hasher.update(chunk);
                        let at = self.received as usize;
                        let end = (at + k).min(expected.len());
                        if end > at {
                            self.mismatched += chunk[..end - at]
                                .iter()
                                .zip(&expected[at..end])
                                .filter(|(a, b)| a != b)
                                .count() as u64;
                        }
                        self.received += k as u64;
                    }
                    Err(_) => break,
                }
            }
            if n == 0 {
                break;
            }
        }
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.outgoing).unwrap();
        }
        self.outgoing.append(&mut self.inject);
        if !self.outgoing.is_empty() && socket.can_send() {
            let n = socket.send_slice(&self.outgoing).unwrap_or(0);
            self.outgoing.drain(..n);
        }
    }

    fn write(&mut self, data: &[u8]) {
        self.tls.writer().write_all(data).unwrap();
    }
}

/// A bed whose stack listens for TLS on [`SERVER_PORT`], and a client connected to it.
struct TlsBed {
    bed: Bed,
    client: Client,
    conn: ConnId,
    events: Vec<Event>,
}

fn tls_bed(mut config: BedConfig, algorithm: Algorithm) -> TlsBed {
    config.stack.random_seed = 0x7157;
    let mut bed = Bed::new(config);
    let (server, client) = configs(algorithm);
    bed.stack.listen_tls(SERVER_PORT, server).unwrap();
    bed.peer_connect(49152);
    let mut client = Client::new(client);
    let mut events = Vec::new();
    let mut conn = None;
    for _ in 0..20_000 {
        bed.step();
        client.pump(&mut bed, &[]);
        for e in bed.stack.poll_events() {
            if let Event::Accepted { conn: c, .. } = e {
                conn = Some(c);
            }
            events.push(e);
        }
        if conn.is_some() && !client.tls.is_handshaking() {
            break;
        }
    }
    let conn = conn.expect("TLS connection accepted");
    assert!(!client.tls.is_handshaking(), "client handshake complete");
    TlsBed {
        bed,
        client,
        conn,
        events,
    }
}

impl TlsBed {
    /// Runs until `done` or a bound of virtual time.
    fn run(&mut self, expected: &[u8], mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let limit = netstack::Instant::from_secs(3600);
        while self.bed.now < limit {
            if done(self) {
                return true;
            }
            self.bed.step();
            self.client.pump(&mut self.bed, expected);
            self.events.extend(self.bed.stack.poll_events());
        }
        done(self)
    }

    fn send_file(&mut self, name: &str, data: &[u8]) -> netstack::SendId {
        let path = self.bed.write_file(name, data);
        let file = self
            .bed
            .cache
            .open(&path, pagecache::OpenOptions::read_only())
            .unwrap();
        let pin = file.pin(0..data.len() as u64).unwrap();
        self.bed
            .stack
            .send_file(self.conn, &pin, 0..data.len() as u64)
            .unwrap()
    }

    fn completed(&self, id: netstack::SendId) -> Option<SendOutcome> {
        self.events.iter().find_map(|e| match e {
            Event::SendComplete {
                send_id, outcome, ..
            } if *send_id == id => Some(*outcome),
            _ => None,
        })
    }

    /// Downloads `body` (after `head`, sent with `send`) and checks it arrived byte-exact
    /// and was acknowledged; returns the stack's counters.
    fn download(&mut self, head: &[u8], body: &[u8]) -> StackStats {
        let mut expected = head.to_vec();
        expected.extend_from_slice(body);
        assert_eq!(
            self.bed.stack.send(self.conn, head).unwrap(),
            head.len(),
            "head queued"
        );
        let id = self.send_file("body", body);
        let total = expected.len() as u64;
        assert!(self.run(&expected, |t| t.client.received >= total
            && t.completed(id).is_some()
            || t.client.error.is_some()));
        if self.client.error.is_some() {
            let c = self.bed.capture.as_ref().map(|c| {
                let c = c.lock().unwrap();
                (c.compared_bytes, c.differing_bytes)
            });
            let mut at = 0;
            while at + 5 <= self.client.raw.len() {
                let len =
                    u16::from_be_bytes([self.client.raw[at + 3], self.client.raw[at + 4]]) as usize;
                eprintln!(
                    "record at {at}: {:02x?} len {len}",
                    &self.client.raw[at..at + 5]
                );
                at += 5 + len;
            }
            eprintln!(
                "capture (compared, differing): {c:?}; received {}; stats {:#?}",
                self.client.received,
                self.bed.stack.stats()
            );
        }
        assert_eq!(self.client.error, None, "client TLS error");
        assert_eq!(self.client.received, total);
        assert_eq!(self.client.mismatched, 0, "plaintext byte-exact");
        let digest: [u8; 32] = self.client.hasher.clone().finalize().into();
        assert_eq!(digest, sha256(&expected));
        assert_eq!(self.completed(id), Some(SendOutcome::Acknowledged));
        self.bed.stack.stats()
    }
}

#[test]
fn handshake_then_request_and_file_download_byte_exact() {
    for algorithm in [Algorithm::Aes128Gcm, Algorithm::Aes256Gcm] {
        let mut t = tls_bed(BedConfig::new(SoftNicConfig::default(), 8 << 20), algorithm);
        let info = t.bed.stack.tls_info(t.conn).unwrap().unwrap();
        assert_eq!(info.algorithm, algorithm);
        assert_eq!(info.alpn.as_deref(), Some(&b"http/1.1"[..]));
        // The client's request arrives decrypted.
        t.client
            .write(b"GET /f HTTP/1.1\r\nHost: zerosend.test\r\n\r\n");
        let mut request = Vec::new();
        assert!(t.run(&[], |t| {
            let mut buf = [0u8; 256];
            if let Ok(n) = t.bed.stack.recv(t.conn, &mut buf) {
                request.extend_from_slice(&buf[..n]);
            }
            request.ends_with(b"\r\n\r\n")
        }));
        assert!(request.starts_with(b"GET /f HTTP/1.1"));
        assert!(t.events.iter().any(|e| matches!(e, Event::Readable { .. })));
        let body = pattern(3 << 20, 13);
        let stats = t.download(b"HTTP/1.1 200 OK\r\nContent-Length: 3145728\r\n\r\n", &body);
        eprintln!("{algorithm:?}: {stats:#?}");
        assert_eq!(stats.tls_handshakes, 1);
        assert!(stats.tls_records_sealed > 3 << 20 >> 14);
        assert_eq!(
            stats.tls_ciphertext_held_now, 0,
            "no ciphertext held after TX completion"
        );
        assert_eq!(stats.tx_unmapped_drops, 0);
        assert_eq!(stats.pins_held_now, 0);
    }
}

fn lossy(probability: f64) -> SoftNicConfig {
    SoftNicConfig {
        to_peer: Impairments::uniform(probability, 0x7111),
        to_nic: Impairments::uniform(probability, 0x7222),
        ..SoftNicConfig::default()
    }
}

/// A bed for `len` bytes of file with every server frame captured by TCP stream offset.
fn captured(nic: SoftNicConfig, len: usize) -> BedConfig {
    let mut config = BedConfig::new(nic, len + (8 << 20));
    // Records add 22 bytes per 16 KiB, the handshake a few KiB.
    config.capture_stream_len = Some(len + len / 512 + (64 << 10));
    config
}

/// Asserts every retransmitted byte on the wire equals its first transmission; returns how
/// many were compared.
fn retransmissions_identical(bed: &Bed) -> u64 {
    let capture = bed.capture.as_ref().unwrap().lock().unwrap();
    assert_eq!(
        capture.differing_bytes, 0,
        "retransmitted TLS bytes identical to their first transmission"
    );
    capture.compared_bytes
}

#[test]
fn tls_64mib_with_loss_reordering_and_duplication_retransmits_identical_bytes() {
    const LEN: usize = 64 << 20;
    let body = pattern(LEN, 64);
    let mut t = tls_bed(captured(lossy(0.02), LEN), Algorithm::Aes128Gcm);
    let started = std::time::Instant::now();
    let stats = t.download(b"HTTP/1.1 200 OK\r\n\r\n", &body);
    let nic = t.bed.stack.nic().counters();
    eprintln!(
        "{:.2?} wall, stack {stats:#?}\nnic {nic:#?}",
        started.elapsed()
    );
    assert!(nic.lost > 0 && nic.duplicated > 0 && nic.reordered > 0);
    assert!(
        stats.retransmitted_bytes > 0,
        "2% loss must cause retransmissions"
    );
    assert!(stats.tls_ctr_bytes > 0, "retransmissions recomputed by CTR");
    let compared = retransmissions_identical(&t.bed);
    assert!(compared > 0, "retransmissions were compared");
    eprintln!("retransmitted TLS bytes compared with their first transmission: {compared}");
    assert_eq!(
        stats.tls_ciphertext_held_now, 0,
        "no ciphertext held after TX completion"
    );
    assert_eq!(stats.frames_in_flight_now, 0);
    assert_eq!(stats.tx_unmapped_drops, 0);
    assert_eq!(stats.pins_held_now, 0, "every pin released after ACK");
    assert_eq!(
        stats.tls_records_sealed as usize,
        (LEN + 19) / 16384 + 8,
        "each record sealed once (8 small ones first)"
    );
    assert_eq!(t.bed.cache.stats().pinned_pages_now, 0);
}

#[test]
fn ciphertext_is_held_only_while_frames_are_in_flight() {
    // The counter watched above is not constant zero: with the NIC's DMA run by hand,
    // frames stay in flight and their TLS bytes are counted until the NIC completes them.
    let mut config = BedConfig::new(SoftNicConfig::default(), 8 << 20);
    config.nic.dma_timing = softnic::DmaTiming::Manual;
    let mut bed = Bed::new(config);
    let (server, client) = configs(Algorithm::Aes128Gcm);
    bed.stack.listen_tls(SERVER_PORT, server).unwrap();
    bed.peer_connect(49152);
    let mut client = Client::new(client);
    let mut conn = None;
    for _ in 0..20_000 {
        bed.step();
        bed.stack.nic_mut().device_step(usize::MAX);
        client.pump(&mut bed, &[]);
        for e in bed.stack.poll_events() {
            if let Event::Accepted { conn: c, .. } = e {
                conn = Some(c);
            }
        }
        if conn.is_some() && !client.tls.is_handshaking() {
            break;
        }
    }
    let conn = conn.unwrap();
    let body = pattern(1 << 20, 3);
    let path = bed.write_file("f", &body);
    let file = bed
        .cache
        .open(&path, pagecache::OpenOptions::read_only())
        .unwrap();
    let pin = file.pin(0..body.len() as u64).unwrap();
    bed.stack
        .send_file(conn, &pin, 0..body.len() as u64)
        .unwrap();
    drop(pin);
    let mut held_max = 0;
    while client.received < body.len() as u64 && bed.now < netstack::Instant::from_secs(600) {
        bed.step();
        let held = bed.stack.stats().tls_ciphertext_held_now;
        held_max = held_max.max(held);
        assert!(held <= bed.stack.stats().frames_in_flight_now * 65536);
        bed.stack.nic_mut().device_step(usize::MAX);
        bed.stack.poll(bed.now).unwrap();
        client.pump(&mut bed, &body);
    }
    assert_eq!(client.mismatched, 0);
    assert_eq!(client.received, body.len() as u64);
    assert!(held_max > 0, "frames in flight hold their TLS bytes");
    bed.stack.nic_mut().device_step(usize::MAX);
    bed.stack.poll(bed.now).unwrap();
    assert_eq!(bed.stack.stats().tls_ciphertext_held_now, 0);
}

#[test]
fn key_updates_both_ways_mid_transfer() {
    let body = pattern(8 << 20, 21);
    let mut t = tls_bed(captured(lossy(0.005), 8 << 20), Algorithm::Aes256Gcm);
    let initial = t.bed.stack.tls_key_positions(t.conn).unwrap().unwrap();
    assert_eq!(
        (initial.tx_epoch, initial.rx_epoch),
        (0, 0),
        "epoch 0 both ways"
    );
    t.bed
        .stack
        .send(t.conn, b"HTTP/1.1 200 OK\r\n\r\n")
        .unwrap();
    let id = t.send_file("body", &body);
    let mut expected = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    expected.extend_from_slice(&body);
    // A third in: the server updates its key and asks the client to update too.
    assert!(t.run(&expected, |t| t.client.received > (3 << 20)));
    t.bed.stack.tls_key_update(t.conn, true).unwrap();
    // Two thirds in: the client updates its key (rustls requests an update back).
    assert!(t.run(&expected, |t| t.client.received > (6 << 20)));
    t.client.tls.refresh_traffic_keys().unwrap();
    let total = expected.len() as u64;
    assert!(t.run(&expected, |t| (t.client.received >= total
        && t.completed(id).is_some())
        || t.client.error.is_some()));
    assert_eq!(t.client.error, None);
    assert_eq!(t.client.mismatched, 0);
    assert_eq!(t.client.received, total);
    // And the connection still works both ways on the new keys.
    t.client.write(b"ping");
    let mut got = Vec::new();
    assert!(t.run(&[], |t| {
        let mut buf = [0u8; 16];
        if let Ok(n) = t.bed.stack.recv(t.conn, &mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        got == b"ping"
    }));
    let positions = t.bed.stack.tls_key_positions(t.conn).unwrap().unwrap();
    let stats = t.bed.stack.stats();
    assert_eq!(
        stats.tls_key_updates_sent, 2,
        "ours, and the answer to the client's"
    );
    assert_eq!(positions.tx_epoch, 2);
    assert!(
        stats.tls_key_updates_received >= 2,
        "the client's answer and its own"
    );
    assert_eq!(positions.rx_epoch, stats.tls_key_updates_received);
    retransmissions_identical(&t.bed);
    assert_eq!(stats.tls_ciphertext_held_now, 0);
}

#[test]
fn record_limit_updates_keys_and_old_epochs_retransmit_identically() {
    // A low limit stands in for AES-GCM's 2^24 records per key: many epochs, with loss, so
    // records of older epochs are retransmitted after the key moved on.
    let len = 6 << 20;
    let body = pattern(len, 5);
    let mut config = captured(lossy(0.02), len);
    config.stack.tls.key_update_after = 40;
    let mut t = tls_bed(config, Algorithm::Aes128Gcm);
    let stats = t.download(b"", &body);
    let records = stats.tls_records_sealed;
    assert!(stats.tls_key_updates_sent >= records / 41, "{stats:#?}");
    let positions = t.bed.stack.tls_key_positions(t.conn).unwrap().unwrap();
    assert_eq!(positions.tx_epoch, stats.tls_key_updates_sent);
    assert!(positions.tx_seq <= 40);
    assert!(stats.retransmitted_bytes > 0);
    assert!(retransmissions_identical(&t.bed) > 0);
    assert_eq!(stats.tls_ciphertext_held_now, 0);
}

/// The client's view of how the server ended the connection.
fn client_alert(t: &TlsBed) -> Option<rustls::AlertDescription> {
    match &t.client.error {
        Some(rustls::Error::AlertReceived(a)) => Some(*a),
        _ => None,
    }
}

/// Sends raw `bytes` on the client's TCP stream (after what rustls sent), optionally then
/// FIN, and runs until the client saw the stack's alert; then until the stack's FIN.
/// Returns the bed and the stack's view of the failure at the time of the alert.
fn bad_input(bytes: &[u8], fin: bool) -> (TlsBed, Option<TlsError>) {
    let mut t = tls_bed(
        BedConfig::new(SoftNicConfig::default(), 4 << 20),
        Algorithm::Aes128Gcm,
    );
    t.client.inject = bytes.to_vec();
    t.client.pump(&mut t.bed, &[]);
    if fin {
        t.run(&[], |t| t.client.outgoing.is_empty());
        t.bed.peer_socket().close();
    }
    assert!(t.run(&[], |t| t.client.error.is_some()));
    let error = t.bed.stack.tls_error(t.conn).unwrap();
    assert!(
        t.run(&[], |t| !t.bed.peer_socket().may_recv()),
        "FIN after the alert"
    );
    (t, error)
}

#[test]
fn forged_record_gets_bad_record_mac_and_close() {
    let mut forged = vec![0x17, 3, 3, 0, 40];
    forged.extend((0..40).map(|i| i as u8));
    let (t, error) = bad_input(&forged, false);
    assert_eq!(
        error,
        Some(TlsError::BadRecord(AlertDescription::BadRecordMac))
    );
    assert_eq!(
        client_alert(&t),
        Some(rustls::AlertDescription::BadRecordMac)
    );
    assert_eq!(t.bed.stack.stats().tls_alerts_sent, 1);
}

#[test]
fn oversized_record_gets_record_overflow() {
    let (t, _) = bad_input(&[0x17, 3, 3, 0x41, 0x01, 0, 0, 0], false);
    assert_eq!(
        client_alert(&t),
        Some(rustls::AlertDescription::RecordOverflow)
    );
}

#[test]
fn truncated_record_at_fin_gets_decode_error() {
    let mut partial = vec![0x17, 3, 3, 0, 100];
    partial.extend([7u8; 50]);
    let (t, error) = bad_input(&partial, true);
    assert_eq!(error, Some(TlsError::Truncated));
    assert_eq!(
        client_alert(&t),
        Some(rustls::AlertDescription::DecodeError)
    );
}

#[test]
fn too_short_and_plaintext_records_are_refused() {
    let (t, _) = bad_input(&[0x17, 3, 3, 0, 5, 1, 2, 3, 4, 5], false);
    assert_eq!(
        client_alert(&t),
        Some(rustls::AlertDescription::DecodeError)
    );
    let (t, _) = bad_input(&[0x16, 3, 3, 0, 4, 1, 2, 3, 4], false);
    assert_eq!(
        client_alert(&t),
        Some(rustls::AlertDescription::UnexpectedMessage)
    );
}

#[test]
fn replayed_record_gets_bad_record_mac() {
    let mut t = tls_bed(
        BedConfig::new(SoftNicConfig::default(), 4 << 20),
        Algorithm::Aes128Gcm,
    );
    t.client.write(b"GET / HTTP/1.1\r\n\r\n");
    let mut record = Vec::new();
    while t.client.tls.wants_write() {
        t.client.tls.write_tls(&mut record).unwrap();
    }
    // The record, then the same record again.
    t.client.inject = [record.clone(), record].concat();
    let conn = t.conn;
    assert!(t.run(&[], |t| t.client.error.is_some()));
    assert_eq!(
        client_alert(&t),
        Some(rustls::AlertDescription::BadRecordMac)
    );
    let mut buf = [0u8; 64];
    let n = t.bed.stack.recv(conn, &mut buf).unwrap();
    assert_eq!(
        &buf[..n],
        b"GET / HTTP/1.1\r\n\r\n",
        "the first copy was accepted"
    );
    assert_eq!(
        t.bed.stack.tls_error(conn).unwrap(),
        Some(TlsError::BadRecord(AlertDescription::BadRecordMac))
    );
}

#[test]
fn close_sends_close_notify_then_fin() {
    let mut t = tls_bed(
        BedConfig::new(SoftNicConfig::default(), 4 << 20),
        Algorithm::Aes128Gcm,
    );
    t.bed.stack.send(t.conn, b"bye").unwrap();
    t.bed.stack.close(t.conn).unwrap();
    let mut closed_cleanly = false;
    assert!(t.run(b"bye", |t| {
        closed_cleanly = t
            .client
            .tls
            .reader()
            .read(&mut [0u8; 8])
            .is_ok_and(|n| n == 0);
        closed_cleanly
    }));
    assert_eq!(t.client.received, 3);
    assert_eq!(t.client.error, None);
    assert!(!t.bed.peer_socket().may_recv(), "FIN after close_notify");
}

#[test]
fn aes_gcm_backend_downloads_byte_exact() {
    let mut config = captured(lossy(0.01), 4 << 20);
    config.stack.tls.backend = Backend::AesGcm;
    let mut t = tls_bed(config, Algorithm::Aes128Gcm);
    let stats = t.download(b"head", &pattern(4 << 20, 9));
    assert!(retransmissions_identical(&t.bed) > 0);
    assert_eq!(stats.tls_ciphertext_held_now, 0);
}

/// The checks above can fail: a record path that recomputes retransmitted slices at the
/// wrong counter puts different bytes on the wire, and the client refuses the records.
#[cfg(feature = "test-hooks")]
#[test]
fn wrong_counter_on_retransmission_is_caught_by_the_capture_and_the_client() {
    let len = 4 << 20;
    let mut config = captured(lossy(0.02), len);
    config.stack.tls.fault = netstack::tls::TlsFault::WrongCounter;
    let mut t = tls_bed(config, Algorithm::Aes128Gcm);
    t.bed
        .stack
        .send_file(
            t.conn,
            &{
                let path = t.bed.write_file("f", &pattern(len, 1));
                let file = t
                    .bed
                    .cache
                    .open(&path, pagecache::OpenOptions::read_only())
                    .unwrap();
                file.pin(0..len as u64).unwrap()
            },
            0..len as u64,
        )
        .unwrap();
    assert!(t.run(&[], |t| t.client.error.is_some()));
    assert_eq!(client_alert(&t), None);
    assert!(
        matches!(t.client.error, Some(rustls::Error::DecryptError)),
        "{:?}",
        t.client.error
    );
    let capture = t.bed.capture.as_ref().unwrap().lock().unwrap();
    assert!(
        capture.differing_bytes > 0,
        "the capture sees the changed retransmission"
    );
}

#[test]
fn handshake_failure_gets_rustls_alert_and_the_listener_goes_on() {
    // A client offering only ChaCha20-Poly1305, which the record layer (and so the
    // server's config) does not do.
    let mut bed = Bed::new(BedConfig::new(SoftNicConfig::default(), 4 << 20));
    let (server, good_client) = configs(Algorithm::Aes128Gcm);
    bed.stack.listen_tls(SERVER_PORT, server).unwrap();
    let chacha = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256],
        ..rustls::crypto::ring::default_provider()
    });
    let chacha_client = rustls::ClientConfig::builder_with_provider(chacha)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    bed.peer_connect(49152);
    let mut client = Client::new(Arc::new(chacha_client));
    let mut events = Vec::new();
    for _ in 0..20_000 {
        if client.error.is_some() && !bed.peer_socket().may_recv() {
            break;
        }
        bed.step();
        client.pump(&mut bed, &[]);
        events.extend(bed.stack.poll_events());
    }
    assert!(
        matches!(
            client.error,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::HandshakeFailure
            ))
        ),
        "{:?}",
        client.error
    );
    assert!(!bed.peer_socket().may_recv(), "FIN after the alert");
    assert!(
        events
            .iter()
            .all(|e| matches!(e, Event::AddressConfigured { .. })),
        "a failed handshake is never announced: {events:?}"
    );
    assert_eq!(bed.stack.stats().tls_handshake_failures, 1);

    // The listener goes on: the next client gets through.
    bed.peer_socket().abort();
    for _ in 0..100 {
        bed.step();
    }
    bed.peer_connect(49153);
    let mut client = Client::new(good_client);
    let mut accepted = false;
    for _ in 0..20_000 {
        bed.step();
        client.pump(&mut bed, &[]);
        accepted |= bed
            .stack
            .poll_events()
            .any(|e| matches!(e, Event::Accepted { .. }));
        if accepted && !client.tls.is_handshaking() {
            break;
        }
    }
    assert!(accepted && client.error.is_none());
}

#[test]
fn silent_client_is_dropped_after_the_handshake_timeout() {
    let mut bed = Bed::new(BedConfig::new(SoftNicConfig::default(), 4 << 20));
    let (server, _) = configs(Algorithm::Aes128Gcm);
    bed.stack.listen_tls(SERVER_PORT, server).unwrap();
    bed.peer_connect(49152);
    // TCP connects; no ClientHello comes for longer than the handshake timeout (10 s).
    let limit = bed.now + netstack::Duration::from_secs(15);
    while bed.now < limit {
        bed.step();
    }
    assert_eq!(
        bed.peer_socket().state(),
        smoltcp::socket::tcp::State::Established
    );
    // The connection is gone on the stack's side: what the client sends now is reset.
    bed.peer_socket().send_slice(b"late hello").unwrap();
    let limit = bed.now + netstack::Duration::from_secs(5);
    while bed.now < limit && bed.peer_socket().is_open() {
        bed.step();
    }
    assert!(
        !bed.peer_socket().is_open(),
        "reset after the handshake timeout"
    );
    assert_eq!(bed.stack.stats().tls_handshake_failures, 1);
    assert!(bed
        .stack
        .poll_events()
        .all(|e| matches!(e, Event::AddressConfigured { .. })));
}

#[test]
fn nic_without_offloads_carries_records_in_small_chunks_with_software_checksums() {
    // No TSO and no checksum offload (e1000 without offloads): every frame's TLS bytes go
    // in a small DMA chunk, and the TCP checksum is computed over the ciphertext there.
    let len = 2 << 20;
    let mut nic = lossy(0.01);
    nic.capabilities.tso_max_frame = None;
    nic.capabilities.tcp_checksum = false;
    let mut t = tls_bed(captured(nic, len), Algorithm::Aes128Gcm);
    assert!(t.bed.stack.tso_frame().is_none());
    let stats = t.download(b"head\r\n\r\n", &pattern(len, 2));
    assert!(stats.software_checksum_bytes > len as u64);
    assert!(retransmissions_identical(&t.bed) > 0);
    assert_eq!(stats.tls_ciphertext_held_now, 0);
}

#[test]
fn session_tickets_sent_before_extraction_resume_the_next_connection() {
    let mut bed = Bed::new(BedConfig::new(SoftNicConfig::default(), 4 << 20));
    let (server, client) = configs(Algorithm::Aes128Gcm);
    bed.stack.listen_tls(SERVER_PORT, server).unwrap();
    // One client config (one session store) for both connections.
    let mut kinds = Vec::new();
    for port in [49152, 49153] {
        bed.peer_connect(port);
        let mut c = Client::new(client.clone());
        let mut conn = None;
        for _ in 0..20_000 {
            bed.step();
            c.pump(&mut bed, b"hi");
            let events: Vec<Event> = bed.stack.poll_events().collect();
            for e in events {
                if let Event::Accepted { conn: id, .. } = e {
                    conn = Some(id);
                    bed.stack.send(id, b"hi").unwrap();
                    bed.stack.close(id).unwrap();
                }
            }
            // The tickets came before the data: the client has them once it read "hi".
            if c.received == 2 {
                break;
            }
        }
        assert!(conn.is_some() && c.error.is_none() && c.received == 2);
        kinds.push(c.tls.handshake_kind());
        bed.peer_socket().abort();
        for _ in 0..100 {
            bed.step();
        }
    }
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
}

/// What happened when the file's pinned pages were overwritten (the test-only unsafe write
/// policy) while the download was under way, with 2% loss.
struct ChangedUnderfoot {
    stats: StackStats,
    compared: u64,
    differing: u64,
    client_error: Option<rustls::Error>,
    /// How the file's send ended (`None`: still going at the time limit).
    outcome: Option<SendOutcome>,
}

fn pages_changed_after_first_transmission(audit: bool) -> ChangedUnderfoot {
    let len = 4 << 20;
    let mut config = captured(lossy(0.02), len);
    config.stack.tls.audit = audit;
    let mut t = tls_bed(config, Algorithm::Aes128Gcm);
    // Records straddling the change fail to decrypt at the client; it then stays silent
    // (its alert would end the connection) while TCP retransmits what was lost.
    t.client.mute_after_error = true;
    let original = pattern(len, 4);
    let path = t.bed.write_file("changing", &original);
    let file = t
        .bed
        .cache
        .open(
            &path,
            pagecache::OpenOptions::read_write(pagecache::WritePolicy::InPlaceUnsafe),
        )
        .unwrap();
    let pin = file.pin(0..len as u64).unwrap();
    let id = t.bed.stack.send_file(t.conn, &pin, 0..len as u64).unwrap();
    // Once part of the file is on its way, every byte of it changes in place, and again
    // after every further 256 KiB sent: what is in flight (and lost) each time was
    // encrypted from other bytes than its retransmission reads.
    assert!(t.run(&original, |t| t.client.received >= 1 << 20));
    let versions = [
        original.iter().map(|b| b ^ 0x5a).collect::<Vec<u8>>(),
        original.clone(),
    ];
    let mut changes = 0;
    let mut next_change = 0;
    let deadline = t.bed.now + netstack::Duration::from_secs(600);
    t.run(&original, |t| {
        let sent = t.bed.stack.stats().payload_bytes_sent;
        if sent >= next_change {
            file.write(0, &versions[changes % 2]).unwrap();
            changes += 1;
            next_change = sent + (256 << 10);
        }
        let differing = t
            .bed
            .capture
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .differing_bytes;
        t.bed.now > deadline || t.completed(id).is_some() || (!audit && differing > 0)
    });
    let outcome = t.completed(id);
    let capture = t.bed.capture.as_ref().unwrap().lock().unwrap();
    ChangedUnderfoot {
        stats: t.bed.stack.stats(),
        compared: capture.compared_bytes,
        differing: capture.differing_bytes,
        client_error: t.client.error.clone(),
        outcome,
    }
}

/// Audit on: a retransmitted slice of a record whose pinned plaintext changed is caught
/// (its recomputed tag differs from the kept one), never sent, and the connection is reset.
#[test]
fn audit_catches_changed_plaintext_before_a_retransmission_and_resets() {
    let o = pages_changed_after_first_transmission(true);
    eprintln!(
        "audit on: checks {} mismatches {} compared {} differing {} client {:?} send {:?}",
        o.stats.tls_audit_checks,
        o.stats.tls_audit_mismatches,
        o.compared,
        o.differing,
        o.client_error,
        o.outcome
    );
    assert!(
        o.stats.tls_audit_mismatches > 0,
        "the changed record is caught"
    );
    assert!(o.stats.tls_audit_checks >= o.stats.tls_audit_mismatches);
    assert_eq!(
        o.differing, 0,
        "no retransmitted byte differs from its first transmission"
    );
    assert_eq!(
        o.outcome,
        Some(SendOutcome::Aborted),
        "the connection is reset"
    );
}

/// The same with the audit off: the retransmissions are recomputed from the changed
/// plaintext and differ on the wire (so the test above can fail).
#[test]
fn without_audit_changed_plaintext_puts_differing_retransmissions_on_the_wire() {
    let o = pages_changed_after_first_transmission(false);
    eprintln!(
        "audit off: compared {} differing {} client {:?}",
        o.compared, o.differing, o.client_error
    );
    assert_eq!(o.stats.tls_audit_checks, 0);
    assert!(o.differing > 0, "retransmitted bytes differ");
}

/// A NIC that encrypts inline (the software NIC's engine): the stack lays the records out
/// in plaintext straight from the pins and gives each frame its records' context; 2% loss,
/// reordering and duplication; byte-exact, and every retransmitted TLS byte identical to
/// its first transmission (the capture sees what the engine put on the wire).
#[test]
fn inline_tls_engine_64mib_with_loss_reordering_and_duplication() {
    const LEN: usize = 64 << 20;
    let body = pattern(LEN, 65);
    let mut t = tls_bed(
        captured(lossy(0.02).with_inline_tls(), LEN),
        Algorithm::Aes128Gcm,
    );
    let stats = t.download(b"HTTP/1.1 200 OK\r\n\r\n", &body);
    let engine = t.bed.stack.nic().tls_counters();
    let nic = t.bed.stack.nic().counters();
    eprintln!("stack {stats:#?}\nengine {engine:#?}\nnic {nic:#?}");
    assert!(nic.lost > 0 && nic.duplicated > 0 && nic.reordered > 0);
    assert!(stats.tls_inline_frames > 0);
    assert!(
        stats.tls_inline_bytes > LEN as u64,
        "the NIC encrypted every byte"
    );
    assert_eq!(stats.tls_records_sealed, 0, "the CPU sealed nothing");
    assert_eq!(stats.tls_cpu_bytes_written, 0, "nor wrote any ciphertext");
    assert!(
        engine.parts_mid_record > 0,
        "retransmissions started inside records"
    );
    assert!(engine.resyncs > 0, "tags recomputed from the record start");
    assert_eq!(engine.frames_refused, 0);
    assert!(retransmissions_identical(&t.bed) > 0);
    assert_eq!(stats.tx_unmapped_drops, 0);
    assert_eq!(stats.pins_held_now, 0);
    assert_eq!(stats.frames_in_flight_now, 0);
}

/// The check above can fail: parts that start inside a record described to the engine one
/// block early (a wrong re-synchronisation) put other bytes on the wire.
#[cfg(feature = "test-hooks")]
#[test]
fn wrong_resync_of_the_inline_engine_is_caught_by_the_capture_and_the_client() {
    let len = 4 << 20;
    let mut config = captured(lossy(0.02).with_inline_tls(), len);
    config.stack.tls.fault = netstack::tls::TlsFault::WrongResync;
    let mut t = tls_bed(config, Algorithm::Aes128Gcm);
    t.client.mute_after_error = true;
    let path = t.bed.write_file("f", &pattern(len, 1));
    let file = t
        .bed
        .cache
        .open(&path, pagecache::OpenOptions::read_only())
        .unwrap();
    let pin = file.pin(0..len as u64).unwrap();
    let id = t.bed.stack.send_file(t.conn, &pin, 0..len as u64).unwrap();
    assert!(t.run(&[], |t| t.completed(id).is_some()));
    assert!(
        matches!(t.client.error, Some(rustls::Error::DecryptError)),
        "{:?}",
        t.client.error
    );
    let capture = t.bed.capture.as_ref().unwrap().lock().unwrap();
    assert!(
        capture.differing_bytes > 0,
        "the capture sees the wrongly resynchronised retransmission"
    );
}

/// How records and frames line up under 2% loss, measured (issue 13 item 2): smoltcp
/// sizes each TSO frame by its congestion window in bytes (CUBIC), not by MSS multiples
/// or by what the record framer made, so frame boundaries fall anywhere in a record. The
/// counters show it: nearly every first transmission ends inside a record and nearly every
/// retransmission starts inside one, whatever the record size. (Records of 9 segments,
/// cut to stay on a 1448-byte grid, measured 99.9% and 99.7% too, against 99.9% and 99.7%
/// for 16 KiB records: the grid does not exist, so that framing was not kept.)
#[test]
fn frames_and_retransmissions_against_record_boundaries() {
    let len = 16 << 20;
    let body = pattern(len, 66);
    for nic in [lossy(0.02), lossy(0.02).with_inline_tls()] {
        let inline = nic.capabilities.tls_tx.is_some();
        let mut t = tls_bed(captured(nic, len), Algorithm::Aes128Gcm);
        let s = t.download(b"HTTP/1.1 200 OK\r\n\r\n", &body);
        assert!(retransmissions_identical(&t.bed) > 0);
        let engine = t.bed.stack.nic().tls_counters();
        eprintln!(
            "inline {inline}: frames {} ending mid-record {:.1}%; retransmissions {} starting \
             mid-record {:.1}%; CPU bytes written/byte {:.2}; engine resyncs {} ({} bytes)",
            s.tls_frames_first_sent,
            100.0 * s.tls_frames_ending_mid_record as f64 / s.tls_frames_first_sent as f64,
            s.tls_retransmissions,
            100.0 * s.tls_retransmissions_mid_record as f64 / s.tls_retransmissions as f64,
            s.tls_cpu_bytes_written as f64 / len as f64,
            engine.resyncs,
            engine.resync_bytes
        );
        assert_eq!(s.tls_retransmissions, s.retransmitted_segments);
        assert!(s.tls_retransmissions_mid_record > 0);
        assert!(s.tls_retransmissions_mid_record <= s.tls_retransmissions);
        assert!(s.tls_frames_ending_mid_record > 0);
        assert!(s.tls_frames_ending_mid_record < s.tls_frames_first_sent);
        if inline {
            assert!(engine.resyncs > 0 && engine.resyncs <= engine.tags);
        }
    }
}
