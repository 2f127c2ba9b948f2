//! TLS 1.3 through the software NIC: a rustls client on the smoltcp peer's TCP socket
//! against the stack's record layer.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use common::*;
use netstack::tls::{Algorithm, Backend};
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
        }
    }

    /// Moves bytes between rustls and the socket; plaintext is checked against `expected`
    /// (from offset 0 of what the server sends).
    fn pump(&mut self, bed: &mut Bed, expected: &[u8]) {
        let socket = bed.peer_socket();
        while self.error.is_none() && socket.can_recv() {
            let tls = &mut self.tls;
            let n = socket
                .recv(|bytes| {
                    let n = tls.read_tls(&mut &bytes[..]).unwrap_or(0);
                    (n, n)
                })
                .unwrap();
            if let Err(e) = self.tls.process_new_packets() {
                self.error = Some(e);
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
