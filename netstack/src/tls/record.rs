//! TLS 1.3 record wire format (RFC 8446 section 5): the 5-byte header, the per-record
//! nonce, the inner plaintext's content type, and the two small messages the stack writes
//! itself (alerts, KeyUpdate).

use super::aead::{Nonce, TAG_LEN};

/// Record header length: type, legacy version (2), length (2).
pub const HEADER_LEN: usize = 5;
/// Most plaintext bytes in one record (2^14).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Most ciphertext bytes (the header's length field) a peer may send: 2^14 + 256.
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Bytes a record adds to its plaintext: header, inner content type, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

/// Content types (RFC 8446 appendix B.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ContentType {
    ChangeCipherSpec = 20,
    Alert = 21,
    Handshake = 22,
    ApplicationData = 23,
}

impl ContentType {
    pub fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            20 => ContentType::ChangeCipherSpec,
            21 => ContentType::Alert,
            22 => ContentType::Handshake,
            23 => ContentType::ApplicationData,
            _ => return None,
        })
    }
}

/// Alert descriptions the stack sends or acts on (RFC 8446 section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AlertDescription {
    CloseNotify = 0,
    UnexpectedMessage = 10,
    BadRecordMac = 20,
    RecordOverflow = 22,
    HandshakeFailure = 40,
    IllegalParameter = 47,
    DecodeError = 50,
    InternalError = 80,
}

/// Alert level: every alert but close_notify (and user_canceled) is fatal in TLS 1.3.
pub const ALERT_FATAL: u8 = 2;
pub const ALERT_WARNING: u8 = 1;

/// Handshake message type of KeyUpdate (RFC 8446 section 4.6.3).
pub const HANDSHAKE_KEY_UPDATE: u8 = 24;
/// Handshake message type of NewSessionTicket.
pub const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;

/// The record header of an encrypted record whose inner plaintext is `inner_len` bytes
/// (data plus content type): `17 03 03 len`, with `len` covering the tag. It is also the
/// record's AAD.
pub fn header(inner_len: usize) -> [u8; HEADER_LEN] {
    let len = (inner_len + TAG_LEN) as u16;
    let [hi, lo] = len.to_be_bytes();
    [ContentType::ApplicationData as u8, 3, 3, hi, lo]
}

/// A received record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub content_type: u8,
    /// Length of the encrypted body (inner plaintext plus tag).
    pub len: usize,
}

/// Why a received record header is refused (each maps to the alert TLS wants sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("record of {0} bytes is longer than 2^14 + 256")]
    Oversized(usize),
    #[error("record too short to hold a content type and a tag ({0} bytes)")]
    TooShort(usize),
    #[error("unexpected outer content type {0} after the handshake")]
    UnexpectedType(u8),
}

impl HeaderError {
    pub fn alert(self) -> AlertDescription {
        match self {
            HeaderError::Oversized(_) => AlertDescription::RecordOverflow,
            HeaderError::TooShort(_) => AlertDescription::DecodeError,
            HeaderError::UnexpectedType(_) => AlertDescription::UnexpectedMessage,
        }
    }
}

/// Parses the header at the start of `bytes` (`None`: fewer than 5 bytes so far). After
/// the handshake every record is `application_data` on the outside; a
/// `change_cipher_spec` (middlebox compatibility, RFC 8446 section 5) is returned too and
/// left to the caller to skip.
pub fn parse_header(bytes: &[u8]) -> Option<Result<Header, HeaderError>> {
    let h: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    let content_type = h[0];
    let change_cipher_spec = content_type == ContentType::ChangeCipherSpec as u8;
    let result = if content_type != ContentType::ApplicationData as u8 && !change_cipher_spec {
        Err(HeaderError::UnexpectedType(content_type))
    } else if len > MAX_CIPHERTEXT {
        // Also for change_cipher_spec: the receive buffer never holds more, so the caller
        // would wait forever for the rest of the record.
        Err(HeaderError::Oversized(len))
    } else if change_cipher_spec {
        Ok(Header { content_type, len })
    } else if len < 1 + TAG_LEN {
        Err(HeaderError::TooShort(len))
    } else {
        Ok(Header { content_type, len })
    };
    Some(result)
}

/// The nonce of record `seq` (RFC 8446 section 5.3): the IV XOR the big-endian sequence
/// number, padded on the left.
pub fn nonce(iv: &Nonce, seq: u64) -> Nonce {
    let mut nonce = *iv;
    for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    nonce
}

/// Splits a decrypted inner plaintext into its content and content type: the type is the
/// last non-zero byte (zeros after it are padding). `None` if it is all zeros.
pub fn split_inner(inner: &[u8]) -> Option<(&[u8], u8)> {
    let at = inner.iter().rposition(|&b| b != 0)?;
    Some((&inner[..at], inner[at]))
}

/// A KeyUpdate handshake message; `request` asks the peer to update its keys too.
pub fn key_update(request: bool) -> [u8; 5] {
    [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request as u8]
}

/// An alert message.
pub fn alert(description: AlertDescription) -> [u8; 2] {
    let level = if description == AlertDescription::CloseNotify {
        ALERT_WARNING
    } else {
        ALERT_FATAL
    };
    [level, description as u8]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_the_aad_and_counts_the_tag() {
        assert_eq!(header(16 * 1024 + 1), [0x17, 3, 3, 0x40, 0x11]);
        assert_eq!(
            parse_header(&header(100)).unwrap(),
            Ok(Header {
                content_type: 23,
                len: 116
            })
        );
        assert_eq!(parse_header(&[0x17, 3, 3, 0]), None, "not all there yet");
    }

    #[test]
    fn refuses_oversized_short_and_plaintext_records() {
        assert_eq!(
            parse_header(&[0x17, 3, 3, 0x41, 0x01]).unwrap(),
            Err(HeaderError::Oversized(16 * 1024 + 257))
        );
        assert!(parse_header(&[0x17, 3, 3, 0x41, 0x00]).unwrap().is_ok());
        assert_eq!(
            parse_header(&[0x17, 3, 3, 0, 16]).unwrap(),
            Err(HeaderError::TooShort(16))
        );
        assert_eq!(
            parse_header(&[0x16, 3, 3, 0, 40]).unwrap(),
            Err(HeaderError::UnexpectedType(0x16))
        );
        assert_eq!(
            parse_header(&[0x14, 3, 3, 0, 1])
                .unwrap()
                .unwrap()
                .content_type,
            20
        );
        // Found by the `tls_record` fuzz target: an oversized change_cipher_spec was
        // accepted, and the connection waited for a record its buffer could never hold.
        assert_eq!(
            parse_header(&[0x14, 3, 3, 0xff, 0xff]).unwrap(),
            Err(HeaderError::Oversized(65535))
        );
        assert_eq!(
            HeaderError::Oversized(0).alert(),
            AlertDescription::RecordOverflow
        );
    }

    #[test]
    fn nonce_xors_the_sequence_into_the_low_bytes() {
        let iv = [0xff; 12];
        assert_eq!(nonce(&iv, 0), iv);
        let n = nonce(&iv, 0x0102);
        assert_eq!(&n[..10], &[0xff; 10]);
        assert_eq!(&n[10..], &[0xfe, 0xfd]);
    }

    #[test]
    fn inner_plaintext_type_is_the_last_nonzero_byte() {
        assert_eq!(split_inner(b"abc\x17"), Some((&b"abc"[..], 0x17)));
        assert_eq!(split_inner(b"ab\x15\0\0\0"), Some((&b"ab"[..], 0x15)));
        assert_eq!(split_inner(&[0, 0]), None);
        assert_eq!(split_inner(&[]), None);
    }

    #[test]
    fn control_messages() {
        assert_eq!(key_update(true), [24, 0, 0, 1, 1]);
        assert_eq!(alert(AlertDescription::CloseNotify), [1, 0]);
        assert_eq!(alert(AlertDescription::BadRecordMac), [2, 20]);
    }
}
