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
//!   straight into a DMA chunk the frame's payload descriptor points at
//!   ([`driver::dma::ChunkPool`]: lent as `&mut [u8]` while no device has it), freed at TX
//!   completion: no ciphertext is kept until ACK
//!   ([`crate::StackStats::tls_ciphertext_held_now`]). A retransmission recomputes exactly
//!   its bytes, from the same pinned plaintext, so it is byte-identical.
//! - **Inline TLS** (a NIC whose `Capabilities::tls_tx` offers it, e.g. the software NIC
//!   with its engine): the frame carries the records in *plaintext*, laid out by
//!   [`tx::TlsTx::describe`] (record headers, type bytes and tag placeholders in the header
//!   slot, the data by IOVA from the pins) and, per record part, the key, sequence number
//!   and offset in the record; a part holding tag bytes but not the record's start also
//!   points at the record's earlier bytes (resync). The CPU writes no ciphertext at all.
//!   e1000, e1000e and virtio-net say no, and take the path above at the same seam.
//! - **Audit** ([`TlsConfig::audit`]): a retransmitted record slice is rebuilt only after
//!   the record's tag, recomputed over the pinned plaintext, equals the kept one; a
//!   mismatch is counted, the slice is not sent and the connection is reset.
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
//! `cargo bench -p netstack --bench tls` (record path vs the bare seal of the same bytes in
//! the same run, CPU bytes written per payload byte) and the counters of the tests in
//! `tests/tls.rs`; the figures are in `docs/architecture.md` ("TLS transmit").
//!
//! Bytes written per payload byte: aes-gcm encrypts out of place from the pins into the
//! chunk (1); ring seals in place only, so it gathers the plaintext into the chunk and
//! seals there (2). A record split across frames is sealed aside at its first touch with
//! ring (its fused AES-GCM is faster than CTR and GHASH apart) and its parts copied (3);
//! with aes-gcm its tag is GHASHed as its ciphertext goes out ([`aead::TagState`]), so
//! nothing is written twice (1).
//!
//! # Record boundaries and frames
//! Records are not aligned to TSO frames: smoltcp sizes each frame by its congestion
//! window in bytes (not in MSS multiples), so frame boundaries fall anywhere in a record
//! and no record size lines up with them (`StackStats::tls_frames_ending_mid_record`,
//! `tls_retransmissions_mid_record`: about 99.9% and 99.7% under 2% loss).

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
