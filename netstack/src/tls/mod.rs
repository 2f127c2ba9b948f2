//! TLS 1.3 on the stack's own TCP, with records built at the device boundary from the
//! pinned plaintext.
//!
//! # What happens
//! - **Handshake**: rustls' [`UnbufferedServerConnection`](rustls::server::UnbufferedServerConnection)
//!   runs it over the connection's TCP bytes (the flight it encodes goes out as copied
//!   bytes). When it is complete (client Finished in, session tickets encoded),
//!   [`dangerous_into_kernel_connection`](rustls::server::UnbufferedServerConnection::dangerous_into_kernel_connection)
//!   hands over the traffic secrets and sequence numbers, and the stack owns both
//!   directions. Only then is the connection reported ([`crate::Event::Accepted`]).
//! - **Transmit** ([`tx`]): plaintext queued with `send`/`send_file` is cut into records
//!   (small ones while the connection starts, 16 KiB after). A record keeps only its
//!   position, key epoch, sequence number and tag until TCP acknowledges it. At the device
//!   boundary each frame's TLS bytes are computed from the pinned plaintext: header from
//!   the record length, body by AES-CTR at the right counter (the whole record sealed the
//!   first time it is touched, which gives the tag), tag from the kept one. They are written
//!   into the frame's own DMA buffer (the header slot for small frames, a cipher buffer for
//!   TSO frames), freed at TX completion: no ciphertext is kept until ACK
//!   ([`crate::StackStats::tls_ciphertext_held_now`]). A retransmission recomputes exactly
//!   its bytes, from the same pinned plaintext, so it is byte-identical.
//! - **Receive** ([`session`]): records are decrypted, application data goes to
//!   [`crate::Stack::recv`]; KeyUpdate in both directions (`update_rx_secret`, and our
//!   answer with `update_tx_secret`), close_notify, the peer's alerts. Truncated,
//!   oversized, forged or replayed records end the connection with the matching alert
//!   (decode_error, record_overflow, bad_record_mac), never a panic.
//! - **Key limit**: AES-GCM allows 2^24.5 records per key (RFC 8446 section 5.5); the stack
//!   sends a KeyUpdate after [`TlsConfig::key_update_after`] records (2^24 by default).
//!
//! # API for a server
//! ```ignore
//! let mut config = rustls::ServerConfig::builder_with_provider(provider)
//!     .with_protocol_versions(&[&rustls::version::TLS13])?
//!     .with_no_client_auth()
//!     .with_single_cert(chain, key)?;            // or a ResolvesServerCert for SNI
//! config.alpn_protocols = vec![b"http/1.1".to_vec()];
//! let listener = stack.listen_tls(443, Arc::new(config))?; // secret extraction turned on
//! // Event::Accepted { listener, conn } arrives after the handshake; then, as for plain
//! // TCP: stack.recv(conn, ..), stack.send(conn, head), stack.send_file(conn, &pin, range),
//! // stack.close(conn) (close_notify, then FIN). stack.tls_info(conn) gives the suite
//! // and ALPN; stack.tls_key_update(conn, request_peer) rotates the sending key.
//! ```
//! The config must offer only TLS 1.3 with AES-128-GCM or AES-256-GCM (ring's provider
//! default suites minus ChaCha20-Poly1305 and TLS 1.2); [`crate::Stack::listen_tls`]
//! refuses others. To swap certificates without a restart, give the config a
//! `ResolvesServerCert` whose certificate can be replaced, or call `listen_tls` again with
//! a new config (new connections use it).
//!
//! # Figures
//! `cargo bench -p netstack --bench tls`, on this 2-core machine under load from other
//! work (lower bounds; GB/s of plaintext):
//!
//! | AES-128-GCM | record path | bare seal, same run | CPU bytes written / byte |
//! | --- | --- | --- | --- |
//! | ring, frames of 3 whole records | 2.87 | 3.55 | 3.00 |
//! | ring, 65160-byte TSO frames (records split) | 2.40 | 3.82 | 3.25 |
//! | aes-gcm, 65160-byte TSO frames | 1.14 | 1.39 | 2.00 |
//!
//! A retransmitted 1448-byte slice is rebuilt in about 1.2 us (AES-CTR from the pins).
//! The bytes written: the AEAD's output into the frame being built (ring gathers the
//! plaintext there first: it seals in place only), then one copy into the frame's DMA
//! buffer (29 GB/s). The last copy goes once the driver lends a `&mut [u8]` of an owned
//! device-read DMA buffer: netstack forbids unsafe code and reaches DMA memory only
//! through the driver's volatile accessors.
//!
//! # Record boundaries and frames
//! A record split across two first-transmission frames is sealed aside at its first touch
//! with ring (its fused AES-GCM is faster than CTR and GHASH apart), the part in the frame
//! copied; with aes-gcm its tag is GHASHed as its ciphertext goes out
//! ([`aead::TagState`]), so nothing is written twice. Records are not aligned to TSO
//! frames: smoltcp sizes segments by window and congestion window, which the record
//! framer does not know when it frames.

pub mod aead;
pub mod record;
pub mod session;
pub mod tx;

pub use aead::{Algorithm, Backend};
pub use session::TlsError;
pub use tx::{BuildError, TlsFault};

/// TLS settings of a [`crate::Stack`].
#[derive(Clone, Copy, Debug)]
pub struct TlsConfig {
    /// The AEAD implementation of the record layer.
    pub backend: Backend,
    /// Records sent under one key before the stack updates it (AES-GCM's limit is 2^24.5).
    pub key_update_after: u64,
    /// DMA buffers for the TLS bytes of TSO-sized frames in flight (one per frame).
    pub cipher_buffers: usize,
    /// Normal operation, or a broken record path (tests only).
    pub fault: TlsFault,
    /// Audit retransmissions: each retransmitted record slice is checked against the
    /// record's kept tag first; a mismatch is counted
    /// ([`crate::StackStats::tls_audit_mismatches`]) and resets the connection (a server's
    /// `--audit` turns it on along with the page cache's audit).
    pub audit: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            key_update_after: 1 << 24,
            cipher_buffers: 64,
            fault: TlsFault::None,
            audit: false,
        }
    }
}

/// What a TLS connection negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    pub algorithm: Algorithm,
    /// The ALPN protocol chosen, if any. (rustls 0.23's unbuffered server does not expose
    /// the SNI name; a `ResolvesServerCert` in the config sees it.)
    pub alpn: Option<Vec<u8>>,
}

/// Key epochs (0 = the handshake's traffic keys, +1 per KeyUpdate) and next record
/// sequence numbers of a TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPositions {
    pub tx_epoch: u64,
    pub tx_seq: u64,
    pub rx_epoch: u64,
    pub rx_seq: u64,
}
