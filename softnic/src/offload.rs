//! **Offloads, as the device computes them**, per the contract in [`driver::queue`]: IPv4
//! header checksum, TCP/UDP checksum from the pseudo-header sum already in the field, and
//! TSO (segments of at most `mss` payload bytes; IPv4 total length, identification and
//! header checksum, TCP sequence number, FIN/PSH only on the last segment, TCP checksum).
//!
//! TSO headers are prepared the Intel way ([`TsoHeaders::PerSegment`]): per segment the
//! device writes the IPv4 total length, sums the IPv4 header *as it finds it* into its
//! checksum field (so the field must be zero), and adds the segment's TCP length to the
//! length-less pseudo-header sum in the TCP checksum field.
//!
//! The arithmetic is the workspace's `inet-checksum`, the one the stack uses too.

#[cfg(doc)]
use driver::TsoHeaders;
use driver::{L4Checksum, L4Protocol, Tso, TxOffload};
use inet_checksum::{add, checksum, fold, sum_be};

const IPV4_MIN_HEADER_LEN: usize = 20;
const TCP_MIN_HEADER_LEN: usize = 20;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;

/// Why a TSO frame cannot be segmented; the NIC counts it as a bad frame and drops it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TsoError {
    #[error("TSO without a TCP checksum request")]
    NoTcpChecksumRequest,
    #[error("per-segment TSO headers without the IPv4 header checksum request")]
    NoIpv4HeaderRequest,
    #[error("IPv4 and TCP headers do not fit the {0}-byte TSO headers")]
    HeadersTooShort(usize),
}

/// Fills in the checksums `offload` asks for, in a frame the device sends as it is.
pub(crate) fn insert_checksums(frame: &mut [u8], offload: &TxOffload) {
    if let Some(ip) = offload.ipv4_header {
        insert_ipv4_checksum(frame, ip as usize);
    }
    if let Some(l4) = offload.l4_checksum {
        insert_l4_checksum(frame, l4, 0);
    }
}

/// Splits a TSO frame (the `tso.header_len` header bytes, then the payload) into segments,
/// calling `emit` with each. Emits nothing on error.
pub(crate) fn segment(
    frame: &[u8],
    offload: &TxOffload,
    tso: Tso,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), TsoError> {
    let l4 = offload
        .l4_checksum
        .filter(|l4| l4.protocol == L4Protocol::Tcp)
        .ok_or(TsoError::NoTcpChecksumRequest)?;
    let ip = offload.ipv4_header.ok_or(TsoError::NoIpv4HeaderRequest)? as usize;
    let (header_len, mss, tcp) = (tso.header_len as usize, tso.mss as usize, l4.start as usize);
    if ip + IPV4_MIN_HEADER_LEN > header_len || tcp + TCP_MIN_HEADER_LEN > header_len {
        return Err(TsoError::HeadersTooShort(header_len));
    }
    let large = LargePacket::new(frame, ip, tcp);
    let (headers, payload) = frame.split_at(header_len);
    let mut segment = Vec::with_capacity(header_len + mss);
    let count = payload.len().div_ceil(mss);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        segment.clear();
        segment.extend_from_slice(headers);
        segment.extend_from_slice(chunk);
        let total_len = (segment.len() - ip) as u16;
        segment[ip + 2..ip + 4].copy_from_slice(&total_len.to_be_bytes());
        let id = large.id.wrapping_add(i as u16);
        segment[ip + 4..ip + 6].copy_from_slice(&id.to_be_bytes());
        let seq = large.seq.wrapping_add((i * mss) as u32);
        segment[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        let last = i + 1 == count;
        segment[tcp + 13] = if last {
            large.flags
        } else {
            large.flags & !(TCP_FIN | TCP_PSH)
        };
        let tcp_len = (segment.len() - tcp) as u16;
        insert_ipv4_checksum(&mut segment, ip);
        insert_l4_checksum(&mut segment, l4, tcp_len);
        emit(&segment);
    }
    Ok(())
}

/// The fields of the large packet's headers that segmentation changes, as found.
struct LargePacket {
    id: u16,
    seq: u32,
    flags: u8,
}

impl LargePacket {
    fn new(frame: &[u8], ip: usize, tcp: usize) -> Self {
        let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
        Self {
            id: be16(ip + 4),
            seq: u32::from_be_bytes(frame[tcp + 4..tcp + 8].try_into().unwrap()),
            flags: frame[tcp + 13],
        }
    }
}

/// Like Intel's IPCSO insertion: the header is summed as it is, so the stack must leave the
/// field zero (a stale value gives a wrong checksum, as on hardware).
fn insert_ipv4_checksum(frame: &mut [u8], ip: usize) {
    let header_len = ((frame[ip] & 0x0f) as usize) * 4;
    if header_len >= IPV4_MIN_HEADER_LEN && ip + header_len <= frame.len() {
        let sum = checksum(&frame[ip..ip + header_len]);
        frame[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
    }
}

/// Stores the L4 checksum over `l4.start..` (the field holds the pseudo-header sum, so
/// summing over it adds it), after one's-complement adding `correction` to the sum.
fn insert_l4_checksum(frame: &mut [u8], l4: L4Checksum, correction: u16) {
    let (start, field) = (l4.start as usize, l4.field as usize);
    let mut checksum = !add(fold(sum_be(&frame[start..])), correction);
    if checksum == 0 && l4.protocol == L4Protocol::Udp {
        // UDP reserves zero for "no checksum" (RFC 768).
        checksum = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_frames::{
        ipv4_header_ok, prepare_tso, tcp_checksum_ok, tcp_frame, tso_offload, IP, TCP,
    };

    const MSS: usize = 1000;

    #[test]
    fn per_segment_headers_give_valid_segments() {
        for payload_len in [1, MSS, 3 * MSS + 1, 40_000] {
            let payload: Vec<u8> = (0..payload_len).map(|i| (i * 31 % 251) as u8).collect();
            let mut frame = tcp_frame(&payload, 0x19, 7_000); // FIN|PSH|ACK
            let offload = prepare_tso(&mut frame, MSS as u16);
            let mut segments = Vec::new();
            segment(&frame, &offload, offload.tso.unwrap(), |s| {
                segments.push(s.to_vec())
            })
            .unwrap();
            assert_eq!(segments.len(), payload_len.div_ceil(MSS));
            for (i, s) in segments.iter().enumerate() {
                assert!(ipv4_header_ok(s), "IPv4 checksum of segment {i}");
                assert!(tcp_checksum_ok(s), "TCP checksum of segment {i}");
                let total = u16::from_be_bytes([s[IP + 2], s[IP + 3]]) as usize;
                assert_eq!(total, s.len() - IP, "IPv4 total length of segment {i}");
                let seq = u32::from_be_bytes(s[TCP + 4..TCP + 8].try_into().unwrap());
                assert_eq!(seq, 7_000 + (i * MSS) as u32);
            }
        }
    }

    #[test]
    fn malformed_tso_requests_are_errors() {
        let frame = tcp_frame(&[0; 3000], 0x10, 1);
        let mut offload = tso_offload(MSS as u16);
        let tso = offload.tso.unwrap();
        let short = Tso {
            header_len: (TCP + 10) as u16,
            ..tso
        };
        let run = |offload: &TxOffload, tso| segment(&frame, offload, tso, |_| panic!("emitted"));
        assert_eq!(
            run(&offload, short),
            Err(TsoError::HeadersTooShort(TCP + 10))
        );
        offload.ipv4_header = None;
        assert_eq!(run(&offload, tso), Err(TsoError::NoIpv4HeaderRequest));
        offload.l4_checksum = None;
        assert_eq!(run(&offload, tso), Err(TsoError::NoTcpChecksumRequest));
    }
}
