//! One TLS connection: the handshake through rustls' unbuffered server API, then the record
//! layer in both directions (records out through [`TlsTx`], records in decrypted here),
//! KeyUpdate, alerts and close_notify.

use std::collections::VecDeque;
use std::sync::Arc;

use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion, ServerConfig};

use super::aead::{Algorithm, Backend, TAG_LEN};
use super::record::{self, AlertDescription, ContentType, HEADER_LEN, MAX_CIPHERTEXT};
use super::tx::{TlsTx, TrafficKey};
use super::{TlsConfig, TlsInfo};
use crate::sendq::{CopyPool, SendQueue};
use crate::StackStats;

/// Received TLS bytes buffered at most: one whole record of the largest size.
const RX_BUFFER: usize = HEADER_LEN + MAX_CIPHERTEXT;
/// Decrypted application data buffered for `recv` at most before the stack stops reading
/// the socket (so TCP's window pushes back on the client).
const PLAIN_LIMIT: usize = 64 * 1024;

/// Why a TLS connection ended abnormally.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TlsError {
    #[error("handshake failed: {0}")]
    Handshake(rustls::Error),
    #[error("negotiated {0:?}, the record layer does TLS 1.3 with AES-GCM only")]
    Unsupported(String),
    #[error("received a bad record, sent alert {0:?}")]
    BadRecord(AlertDescription),
    #[error("the peer sent fatal alert {0}")]
    PeerAlert(u8),
    #[error("the connection ended in the middle of a record")]
    Truncated,
    /// Audit: a record's pinned plaintext changed before its retransmission (see
    /// [`crate::tls::BuildError::AuditMismatch`]); the connection is reset.
    #[error("audit: record {seq} (key epoch {epoch}) changed before its retransmission")]
    AuditMismatch { epoch: u64, seq: u64 },
}

enum Phase {
    Handshake(Box<UnbufferedServerConnection>),
    Established(Box<KernelConnection<ServerConnectionData>>),
    /// Failed before or during extraction: nothing more is read or sent.
    Dead,
}

/// What one round of [`TlsConn::process`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The handshake completed in this round.
    pub established: bool,
}

/// The TLS state of one connection.
pub struct TlsConn {
    pub tx: TlsTx,
    phase: Phase,
    backend: Backend,
    algorithm: Algorithm,
    key_update_after: u64,
    rx_key: Option<TrafficKey>,
    rx_seq: u64,
    rx_buf: Vec<u8>,
    /// Decrypted application data for `recv`.
    pub plain: VecDeque<u8>,
    /// Handshake bytes rustls encoded that are not in the send queue yet.
    pending_out: Vec<u8>,
    /// A KeyUpdate to send (`Some(request_peer)`).
    pending_key_update: Option<bool>,
    /// An alert to send, and after it nothing more.
    pending_alert: Option<AlertDescription>,
    /// The application closed: close_notify once every plaintext byte is framed.
    close_requested: bool,
    /// close_notify or a fatal alert framed: no record after it.
    pub tx_closed: bool,
    /// close_notify received: the client sends no more data.
    pub peer_closed: bool,
    pub error: Option<TlsError>,
    info: Option<TlsInfo>,
}

impl TlsConn {
    pub fn new(config: Arc<ServerConfig>, tls: &TlsConfig) -> Result<Self, rustls::Error> {
        Ok(Self {
            tx: {
                let mut tx = TlsTx::new(tls.fault);
                tx.set_audit(tls.audit);
                tx
            },
            phase: Phase::Handshake(Box::new(UnbufferedServerConnection::new(config)?)),
            backend: tls.backend,
            algorithm: Algorithm::Aes128Gcm,
            key_update_after: tls.key_update_after,
            rx_key: None,
            rx_seq: 0,
            rx_buf: Vec::with_capacity(RX_BUFFER),
            plain: VecDeque::new(),
            pending_out: Vec::new(),
            pending_key_update: None,
            pending_alert: None,
            close_requested: false,
            tx_closed: false,
            peer_closed: false,
            error: None,
            info: None,
        })
    }

    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established(_))
    }

    /// Whether the connection is finished for the TLS layer (failed, or an alert queued).
    pub fn is_dead(&self) -> bool {
        matches!(self.phase, Phase::Dead) || self.error.is_some()
    }

    pub fn info(&self) -> Option<&TlsInfo> {
        self.info.as_ref()
    }

    /// Receive epoch and sequence number (for tests and diagnostics).
    pub fn rx_position(&self) -> Option<(u64, u64)> {
        self.rx_key.as_ref().map(|k| (k.epoch, self.rx_seq))
    }

    /// How many received bytes the connection takes now.
    pub fn rx_room(&self) -> usize {
        if self.is_dead() || self.peer_closed || self.plain.len() >= PLAIN_LIMIT {
            return 0;
        }
        RX_BUFFER - self.rx_buf.len()
    }

    /// Takes received TCP bytes (at most [`TlsConn::rx_room`]); returns how many.
    pub fn take_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.rx_room());
        self.rx_buf.extend_from_slice(&bytes[..n]);
        n
    }

    /// Whether [`TlsConn::frame`] has work (so the stack polls again at once).
    pub fn has_tx_work(&self, sendq: &SendQueue) -> bool {
        !self.pending_out.is_empty()
            || self.tx.unfed() > 0
            || (!self.tx_closed
                && self.tx.has_key()
                && (sendq.unfed() > 0
                    || self.pending_key_update.is_some()
                    || self.pending_alert.is_some()
                    || self.close_requested))
    }

    /// Everything there is to send is framed and fed, including the final close_notify or
    /// alert if the connection is closing: the stack may send its FIN.
    pub fn may_send_fin(&self) -> bool {
        (self.tx_closed || matches!(self.phase, Phase::Dead)) && self.tx.unfed() == 0
    }

    /// The application closed its sending half.
    pub fn close(&mut self) {
        self.close_requested = true;
    }

    /// Asks for a KeyUpdate of our sending keys; `request_peer` asks the client to update
    /// its own too.
    pub fn key_update(&mut self, request_peer: bool) {
        let request = self.pending_key_update.unwrap_or(false) || request_peer;
        self.pending_key_update = Some(request);
    }

    /// The audit found a record changed before its retransmission: nothing more is sent
    /// (the stack resets the connection).
    pub fn audit_failed(&mut self, epoch: u64, seq: u64) {
        if self.error.is_none() {
            self.error = Some(TlsError::AuditMismatch { epoch, seq });
        }
        self.phase = Phase::Dead;
        self.rx_buf.clear();
    }

    /// Ends the connection with `alert` (sent if there is a record layer to send it with).
    fn fail(&mut self, alert: AlertDescription, error: TlsError) {
        tracing::debug!("TLS: {error}");
        if self.error.is_none() {
            self.error = Some(error);
            self.pending_alert = Some(alert);
        }
        self.rx_buf.clear();
    }

    /// Handles the bytes received so far: the handshake, or records.
    pub fn process(&mut self, stats: &mut StackStats) -> Progress {
        let mut progress = Progress::default();
        if matches!(self.phase, Phase::Handshake(_)) {
            match self.handshake() {
                Ok(true) => match self.extract(stats) {
                    Ok(()) => progress.established = true,
                    Err(e) => {
                        stats.tls_handshake_failures += 1;
                        self.error = Some(e);
                        self.phase = Phase::Dead;
                    }
                },
                Ok(false) => {}
                Err(e) => {
                    stats.tls_handshake_failures += 1;
                    self.error = Some(TlsError::Handshake(e));
                    self.phase = Phase::Dead;
                }
            }
        }
        if matches!(self.phase, Phase::Established(_)) {
            self.receive_records(stats);
        }
        progress
    }

    /// Drives rustls until it needs more input. `Ok(true)`: the handshake is complete and
    /// every byte rustls had to send (the flight, tickets) is in `pending_out`.
    fn handshake(&mut self) -> Result<bool, rustls::Error> {
        let Phase::Handshake(conn) = &mut self.phase else {
            return Ok(false);
        };
        loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process_tls_records(&mut self.rx_buf);
            let done = match state {
                Err(e) => {
                    // rustls queued an alert for this error: send what it encodes.
                    self.rx_buf.drain(..discard);
                    let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
                    if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
                        let _ = encode_into(&mut encode, &mut self.pending_out);
                    }
                    return Err(e);
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if let Err(e) = encode_into(&mut encode, &mut self.pending_out) {
                        return Err(rustls::Error::General(e.to_string()));
                    }
                    None
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    // The bytes are in `pending_out`, on their way to the send queue.
                    transmit.done();
                    None
                }
                Ok(ConnectionState::ReadTraffic(mut read)) => {
                    // Application data that arrived with the client's Finished.
                    while let Some(record) = read.next_record() {
                        let record = record?;
                        discard += record.discard;
                        self.plain.extend(record.payload);
                    }
                    None
                }
                // Complete, or half-way (0.5-RTT data allowed, the client's Finished not
                // in yet): see below, once `state` no longer borrows the connection.
                Ok(ConnectionState::WriteTraffic(_)) => Some(true),
                Ok(ConnectionState::BlockedHandshake) => Some(false),
                Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                    return Err(rustls::Error::General("closed during the handshake".into()))
                }
                Ok(_) => Some(false),
            };
            self.rx_buf.drain(..discard);
            if let Some(writable) = done {
                return Ok(writable && !conn.is_handshaking());
            }
        }
    }

    /// Takes the traffic secrets from rustls: from here on the records are ours.
    fn extract(&mut self, stats: &mut StackStats) -> Result<(), TlsError> {
        let Phase::Handshake(conn) = std::mem::replace(&mut self.phase, Phase::Dead) else {
            unreachable!("extract runs after the handshake");
        };
        if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
            return Err(TlsError::Unsupported(format!(
                "{:?}",
                conn.protocol_version()
            )));
        }
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let (secrets, kernel) = conn
            .dangerous_into_kernel_connection()
            .map_err(TlsError::Handshake)?;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let (algorithm, tx_key) = self.traffic_key(0, &tx)?;
        let (_, rx_key) = self.traffic_key(0, &rx)?;
        self.algorithm = algorithm;
        self.tx.install_key(tx_key, tx_seq);
        self.rx_key = Some(rx_key);
        self.rx_seq = rx_seq;
        self.info = Some(TlsInfo { algorithm, alpn });
        self.phase = Phase::Established(Box::new(kernel));
        stats.tls_handshakes += 1;
        Ok(())
    }

    fn traffic_key(
        &self,
        epoch: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> Result<(Algorithm, TrafficKey), TlsError> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Algorithm::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Algorithm::Aes256Gcm, key, iv),
            other => {
                let name = match other {
                    ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => "ChaCha20-Poly1305",
                    _ => "an unknown AEAD",
                };
                return Err(TlsError::Unsupported(name.into()));
            }
        };
        let key = TrafficKey::new(epoch, self.backend, algorithm, key.as_ref(), iv.as_ref())
            .map_err(|e| TlsError::Unsupported(e.to_string()))?;
        Ok((algorithm, key))
    }

    /// Decrypts every whole record received.
    fn receive_records(&mut self, stats: &mut StackStats) {
        while self.error.is_none() && !self.peer_closed {
            let header = match record::parse_header(&self.rx_buf) {
                None => return,
                Some(Err(e)) => {
                    return self.fail(e.alert(), TlsError::BadRecord(e.alert()));
                }
                Some(Ok(h)) => h,
            };
            let end = HEADER_LEN + header.len;
            if self.rx_buf.len() < end {
                return;
            }
            if header.content_type == ContentType::ChangeCipherSpec as u8 {
                // Only allowed before the handshake's Finished (RFC 8446 section 5).
                let alert = AlertDescription::UnexpectedMessage;
                return self.fail(alert, TlsError::BadRecord(alert));
            }
            let key = self.rx_key.as_ref().expect("established");
            let nonce = key.nonce(self.rx_seq);
            let (aad, rest) = self.rx_buf.split_at_mut(HEADER_LEN);
            let (body, tag) = rest[..header.len].split_at_mut(header.len - TAG_LEN);
            let tag: [u8; TAG_LEN] = (&*tag).try_into().expect("16 bytes");
            if key.aead().open_in_place(&nonce, aad, body, &tag).is_err() {
                let alert = AlertDescription::BadRecordMac;
                return self.fail(alert, TlsError::BadRecord(alert));
            }
            self.rx_seq += 1;
            stats.tls_records_received += 1;
            let body_len = header.len - TAG_LEN;
            let Some((content, content_type)) =
                record::split_inner(&self.rx_buf[HEADER_LEN..HEADER_LEN + body_len])
            else {
                let alert = AlertDescription::UnexpectedMessage;
                return self.fail(alert, TlsError::BadRecord(alert));
            };
            if content.len() > record::MAX_PLAINTEXT {
                // RFC 8446 section 5.4: at most 2^14 bytes of plaintext, padding aside.
                let alert = AlertDescription::RecordOverflow;
                return self.fail(alert, TlsError::BadRecord(alert));
            }
            let outcome = match ContentType::from_u8(content_type) {
                Some(ContentType::ApplicationData) => {
                    self.plain.extend(content);
                    Ok(())
                }
                Some(ContentType::Alert) => match content {
                    [_, 0] => {
                        self.peer_closed = true;
                        Ok(())
                    }
                    [_, description] => {
                        let description = *description;
                        self.error = Some(TlsError::PeerAlert(description));
                        Ok(())
                    }
                    _ => Err(AlertDescription::DecodeError),
                },
                Some(ContentType::Handshake) => {
                    let content = content.to_vec();
                    self.handshake_messages(&content, stats)
                }
                _ => Err(AlertDescription::UnexpectedMessage),
            };
            self.rx_buf.drain(..end);
            if let Err(alert) = outcome {
                return self.fail(alert, TlsError::BadRecord(alert));
            }
        }
    }

    /// Post-handshake messages from the client: only KeyUpdate is expected.
    fn handshake_messages(
        &mut self,
        mut bytes: &[u8],
        stats: &mut StackStats,
    ) -> Result<(), AlertDescription> {
        while !bytes.is_empty() {
            let [kind, a, b, c, ..] = *bytes else {
                return Err(AlertDescription::DecodeError);
            };
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            let body = bytes.get(4..4 + len).ok_or(AlertDescription::DecodeError)?;
            if kind != record::HANDSHAKE_KEY_UPDATE {
                return Err(AlertDescription::UnexpectedMessage);
            }
            let request = match body {
                [0] => false,
                [1] => true,
                _ => return Err(AlertDescription::IllegalParameter),
            };
            if 4 + len != bytes.len() {
                // A KeyUpdate must end its record: the next record uses the new key.
                return Err(AlertDescription::UnexpectedMessage);
            }
            let Phase::Established(kernel) = &mut self.phase else {
                return Err(AlertDescription::InternalError);
            };
            let (seq, secrets) = kernel
                .update_rx_secret()
                .map_err(|_| AlertDescription::InternalError)?;
            let epoch = self.rx_key.as_ref().map_or(0, |k| k.epoch + 1);
            let (_, key) = self
                .traffic_key(epoch, &secrets)
                .map_err(|_| AlertDescription::InternalError)?;
            self.rx_key = Some(key);
            self.rx_seq = seq;
            stats.tls_key_updates_received += 1;
            if request {
                // Answer with our own update (RFC 8446 section 4.6.3), not requesting one.
                self.pending_key_update.get_or_insert(false);
            }
            bytes = &bytes[4 + len..];
        }
        Ok(())
    }

    /// The TCP stream ended (FIN) with `self.rx_buf` holding part of a record.
    pub fn peer_fin(&mut self) {
        if !self.rx_buf.is_empty() && self.error.is_none() && self.is_established() {
            let alert = AlertDescription::DecodeError;
            self.fail(alert, TlsError::Truncated);
        }
    }

    /// Moves handshake bytes into the send queue and frames records, up to `room` TCP bytes
    /// ahead of what smoltcp has.
    pub fn frame(
        &mut self,
        sendq: &mut SendQueue,
        pool: &CopyPool,
        room: u64,
        stats: &mut StackStats,
    ) {
        if !self.flush_handshake(sendq, pool, stats) || !self.tx.has_key() || self.tx_closed {
            return;
        }
        while self.tx.unfed() < room {
            if let Some(alert) = self.pending_alert.take() {
                self.tx
                    .frame_inline(ContentType::Alert, &record::alert(alert));
                stats.tls_alerts_sent += 1;
                self.tx_closed = true;
                return;
            }
            let at_limit = self.tx.next_seq() >= self.key_update_after;
            if at_limit || self.pending_key_update.is_some() {
                let request = self.pending_key_update.take().unwrap_or(false);
                if let Err(alert) = self.update_tx_key(request, stats) {
                    self.pending_alert = Some(alert);
                    continue;
                }
            }
            if self.tx.frame_data(sendq) > 0 {
                continue;
            }
            if self.close_requested {
                let close_notify = record::alert(AlertDescription::CloseNotify);
                self.tx.frame_inline(ContentType::Alert, &close_notify);
                self.tx_closed = true;
            }
            return;
        }
    }

    /// Moves the handshake bytes rustls encoded into the send queue, framed as raw bytes.
    /// Returns whether all of them are there. The send queue holds nothing else until the
    /// connection is announced (the application cannot send before), so no plaintext of
    /// the application can be framed raw.
    pub fn flush_handshake(
        &mut self,
        sendq: &mut SendQueue,
        pool: &CopyPool,
        stats: &mut StackStats,
    ) -> bool {
        if !self.pending_out.is_empty() {
            let n = sendq.push_copy(&self.pending_out, pool);
            stats.payload_bytes_copied += n as u64;
            self.pending_out.drain(..n);
            self.tx.frame_raw(sendq);
        }
        self.pending_out.is_empty()
    }

    /// Whether the connection may be handed to the application: handshake complete and
    /// every handshake byte (session tickets included) queued ahead of any data.
    pub fn is_ready(&self) -> bool {
        self.is_established() && self.pending_out.is_empty() && self.error.is_none()
    }

    /// Frames a KeyUpdate under the current key, then switches to the next one.
    fn update_tx_key(
        &mut self,
        request: bool,
        stats: &mut StackStats,
    ) -> Result<(), AlertDescription> {
        let Phase::Established(kernel) = &mut self.phase else {
            return Err(AlertDescription::InternalError);
        };
        let (seq, secrets) = kernel
            .update_tx_secret()
            .map_err(|_| AlertDescription::InternalError)?;
        let epoch = self.tx.epoch().map_or(0, |e| e + 1);
        let (_, key) = self
            .traffic_key(epoch, &secrets)
            .map_err(|_| AlertDescription::InternalError)?;
        self.tx
            .frame_inline(ContentType::Handshake, &record::key_update(request));
        self.tx.install_key(key, seq);
        stats.tls_key_updates_sent += 1;
        Ok(())
    }
}

/// Appends what `encode` holds to `out`.
fn encode_into(
    encode: &mut rustls::unbuffered::EncodeTlsData<'_, ServerConnectionData>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let at = out.len();
    out.resize(at + 4096, 0);
    loop {
        match encode.encode(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(need)) => {
                out.resize(at + need.required_size, 0);
            }
            Err(e) => {
                out.truncate(at);
                return Err(e);
            }
        }
    }
}
