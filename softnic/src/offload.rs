//! **Offloads, as the device computes them**, per the contract in [`driver::queue`]: IPv4
//! header checksum, TCP/UDP checksum from the pseudo-header sum already in the field, and
//! TSO (segments of at most `mss` payload bytes; IPv4 total length, identification and
//! header checksum, TCP sequence number, FIN/PSH only on the last segment, TCP checksum).
//!
//! How the headers of a TSO frame are prepared is the device's [`TsoHeaders`] convention;
//! the model implements both, the way the real devices take the headers:
//! - [`TsoHeaders::PerSegment`] (Intel's TCP segmentation context): per segment the device
//!   writes the IPv4 total length, sums the IPv4 header *as it finds it* into its checksum
//!   field (so the field must be zero), and adds the segment's TCP length to the length-less
//!   pseudo-header sum in the TCP checksum field.
//! - [`TsoHeaders::WholePacket`] (virtio-net GSO): the headers are the large packet's, taken
//!   at face value. Per segment the device updates the large packet's IPv4 header checksum
//!   for the segment's total length and identification (RFC 1624), and replaces the large
//!   packet's TCP length in the TCP checksum field's pseudo-header sum with the segment's.
//!   (Linux, the usual device behind QEMU's virtio-net, recomputes the IPv4 checksum instead;
//!   updating it keeps an invalid large-packet header invalid on the wire, where a test sees
//!   it.) The IPv4 header is where [`TxOffload::ipv4_header`] says, or else right after the
//!   Ethernet header, as virtio-net finds it.
//!
//! Either way, headers prepared for the other convention give bad checksums on the wire.
//!
//! An IPv6 frame ([`TxOffload::ipv6_header`]) is segmented the same way under either
//! convention, with the IPv6 header's one field that changes: Payload Length, written per
//! segment (8254x SDM section 3.5.9, 82574 DS section 7.3.6, virtio `GSO_TCPV6`). IPv6 has
//! no header checksum and no identification (RFC 8200 section 3); the TCP checksum's
//! pseudo-header (RFC 8200 section 8.1) is the stack's, as for IPv4.
//!
//! The arithmetic is the workspace's `inet-checksum`, the one the stack uses too.

use driver::{L4Checksum, L4Protocol, Tso, TsoHeaders, TxOffload};
use inet_checksum::{add, checksum, fold, sum_be};

use crate::wire::ETHERNET_HEADER_LEN;

const IPV4_MIN_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const TCP_MIN_HEADER_LEN: usize = 20;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;

/// Why a TSO frame cannot be segmented; the NIC counts it as a bad frame and drops it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TsoError {
    #[error("TSO without a TCP checksum request")]
    NoTcpChecksumRequest,
    #[error("per-segment TSO headers without the IPv4 header checksum request")]
    NoIpv4HeaderRequest,
    #[error("no IPv4 header after the Ethernet header")]
    NotIpv4,
    #[error("TSO with an MSS of zero")]
    NoMss,
    #[error("IPv4 and TCP headers do not fit the {0}-byte TSO headers")]
    HeadersTooShort(usize),
    #[error("a {0}-byte large packet does not fit the IPv4 total length")]
    TooLong(usize),
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

/// Splits a TSO frame (the `tso.header_len` header bytes, then the payload) into segments
/// under `convention`, calling `emit` with each. Emits nothing on error.
pub(crate) fn segment(
    frame: &[u8],
    offload: &TxOffload,
    tso: Tso,
    convention: TsoHeaders,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), TsoError> {
    let l4 = offload
        .l4_checksum
        .filter(|l4| l4.protocol == L4Protocol::Tcp)
        .ok_or(TsoError::NoTcpChecksumRequest)?;
    let (ip, ipv6) = match (offload.ipv6_header, offload.ipv4_header, convention) {
        (Some(ip), _, _) => (ip as usize, true),
        (None, Some(ip), _) => (ip as usize, false),
        (None, None, TsoHeaders::WholePacket) => (ipv4_after_ethernet(frame)?, false),
        (None, None, TsoHeaders::PerSegment) => return Err(TsoError::NoIpv4HeaderRequest),
    };
    let (header_len, mss, tcp) = (tso.header_len as usize, tso.mss as usize, l4.start as usize);
    let ip_header_len = if ipv6 {
        IPV6_HEADER_LEN
    } else {
        IPV4_MIN_HEADER_LEN
    };
    if ip + ip_header_len > header_len || tcp + TCP_MIN_HEADER_LEN > header_len {
        return Err(TsoError::HeadersTooShort(header_len));
    }
    if mss == 0 {
        return Err(TsoError::NoMss);
    }
    // The large packet's own length field (IPv4 total length, IPv6 payload length).
    let large_len = frame.len() - ip - if ipv6 { IPV6_HEADER_LEN } else { 0 };
    if convention == TsoHeaders::WholePacket && large_len > u16::MAX as usize {
        return Err(TsoError::TooLong(large_len));
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
        let id = large.id.wrapping_add(i as u16);
        if ipv6 {
            let payload_len = total_len - IPV6_HEADER_LEN as u16;
            segment[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
        } else {
            segment[ip + 2..ip + 4].copy_from_slice(&total_len.to_be_bytes());
            segment[ip + 4..ip + 6].copy_from_slice(&id.to_be_bytes());
        }
        let seq = large.seq.wrapping_add((i * mss) as u32);
        segment[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        let last = i + 1 == count;
        segment[tcp + 13] = if last {
            large.flags
        } else {
            large.flags & !(TCP_FIN | TCP_PSH)
        };
        let tcp_len = (segment.len() - tcp) as u16;
        match convention {
            TsoHeaders::PerSegment => {
                if !ipv6 {
                    insert_ipv4_checksum(&mut segment, ip);
                }
                insert_l4_checksum(&mut segment, l4, tcp_len);
            }
            TsoHeaders::WholePacket if ipv6 => {
                insert_l4_checksum(&mut segment, l4, add(!large.tcp_len, tcp_len));
            }
            TsoHeaders::WholePacket => {
                let sum = replace_word(!large.ip_checksum, large.ip_total_len, total_len);
                let ip_checksum = !replace_word(sum, large.id, id);
                segment[ip + 10..ip + 12].copy_from_slice(&ip_checksum.to_be_bytes());
                // The field's pseudo-header sum counts the large packet's TCP length: take
                // it out, put the segment's in.
                insert_l4_checksum(&mut segment, l4, add(!large.tcp_len, tcp_len));
            }
        }
        emit(&segment);
    }
    Ok(())
}

/// The fields of the large packet's headers that segmentation changes, as found.
struct LargePacket {
    ip_total_len: u16,
    id: u16,
    ip_checksum: u16,
    seq: u32,
    flags: u8,
    /// The large packet's TCP length, from the frame (as Linux's GSO takes it).
    tcp_len: u16,
}

impl LargePacket {
    fn new(frame: &[u8], ip: usize, tcp: usize) -> Self {
        let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
        Self {
            ip_total_len: be16(ip + 2),
            id: be16(ip + 4),
            ip_checksum: be16(ip + 10),
            seq: u32::from_be_bytes(frame[tcp + 4..tcp + 8].try_into().unwrap()),
            flags: frame[tcp + 13],
            tcp_len: (frame.len() - tcp) as u16,
        }
    }
}

/// Where a virtio-net device finds the IPv4 header: right after an Ethernet header (no VLAN
/// tag) whose EtherType is IPv4.
fn ipv4_after_ethernet(frame: &[u8]) -> Result<usize, TsoError> {
    let ip = ETHERNET_HEADER_LEN;
    let is_ipv4 = frame.len() >= ip + IPV4_MIN_HEADER_LEN
        && frame[12..14] == ETHERTYPE_IPV4
        && frame[ip] >> 4 == 4;
    is_ipv4.then_some(ip).ok_or(TsoError::NotIpv4)
}

/// One's-complement `sum - old + new`: `sum` with a 16-bit word it covers replaced
/// (RFC 1624, equation 3, before the final inversion).
fn replace_word(sum: u16, old: u16, new: u16) -> u16 {
    add(add(sum, !old), new)
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

    /// The segments a `device` emits for a TSO frame whose headers were prepared for
    /// `prepared`. With `request_ipv4_checksum`, the request asks for the IPv4 header
    /// checksum whatever the convention (as a stack that prepared headers for the other
    /// convention might).
    fn segments(
        payload_len: usize,
        prepared: TsoHeaders,
        device: TsoHeaders,
        request_ipv4_checksum: bool,
    ) -> Vec<Vec<u8>> {
        let payload: Vec<u8> = (0..payload_len).map(|i| (i * 31 % 251) as u8).collect();
        let mut frame = tcp_frame(&payload, 0x19, 7_000); // FIN|PSH|ACK
        let mut offload = prepare_tso(&mut frame, prepared, MSS as u16);
        if request_ipv4_checksum {
            offload.ipv4_header = Some(IP as u16);
        }
        let mut out = Vec::new();
        segment(&frame, &offload, offload.tso.unwrap(), device, |s| {
            out.push(s.to_vec())
        })
        .unwrap();
        out
    }

    fn assert_valid_segments(segments: &[Vec<u8>], payload_len: usize, convention: TsoHeaders) {
        let case = format!("{convention:?} headers, {payload_len}-byte payload");
        assert_eq!(segments.len(), payload_len.div_ceil(MSS), "{case}");
        for (i, s) in segments.iter().enumerate() {
            assert!(ipv4_header_ok(s), "IPv4 checksum of segment {i}, {case}");
            assert!(tcp_checksum_ok(s), "TCP checksum of segment {i}, {case}");
            let total = u16::from_be_bytes([s[IP + 2], s[IP + 3]]) as usize;
            assert_eq!(
                total,
                s.len() - IP,
                "IPv4 total length of segment {i}, {case}"
            );
            let seq = u32::from_be_bytes(s[TCP + 4..TCP + 8].try_into().unwrap());
            assert_eq!(seq, 7_000 + (i * MSS) as u32, "{case}");
        }
    }

    #[test]
    fn headers_for_the_device_convention_give_valid_segments() {
        for convention in [TsoHeaders::PerSegment, TsoHeaders::WholePacket] {
            for payload_len in [1, MSS, 3 * MSS + 1, 40_000] {
                let s = segments(payload_len, convention, convention, false);
                assert_valid_segments(&s, payload_len, convention);
            }
        }
    }

    #[test]
    fn ipv6_segments_get_their_payload_length_and_valid_checksums() {
        use crate::test_frames::{prepare_tso6, tcp6_checksum_ok, tcp6_frame, TCP6};
        for convention in [TsoHeaders::PerSegment, TsoHeaders::WholePacket] {
            for payload_len in [1, MSS, 3 * MSS + 1, 40_000] {
                let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 % 253) as u8).collect();
                let mut frame = tcp6_frame(&payload, 0x19, 9_000);
                let offload = prepare_tso6(&mut frame, convention, MSS as u16);
                let mut out = Vec::new();
                segment(&frame, &offload, offload.tso.unwrap(), convention, |s| {
                    out.push(s.to_vec())
                })
                .unwrap();
                assert_eq!(out.len(), payload_len.div_ceil(MSS));
                let mut joined = Vec::new();
                for (i, s) in out.iter().enumerate() {
                    let case = format!("{convention:?}, {payload_len} bytes, segment {i}");
                    assert!(tcp6_checksum_ok(s), "TCP checksum, {case}");
                    let payload_len = u16::from_be_bytes([s[IP + 4], s[IP + 5]]) as usize;
                    assert_eq!(payload_len, s.len() - IP - 40, "Payload Length, {case}");
                    let seq = u32::from_be_bytes(s[TCP6 + 4..TCP6 + 8].try_into().unwrap());
                    assert_eq!(seq, 9_000 + (i * MSS) as u32, "{case}");
                    joined.extend_from_slice(&s[TCP6 + 20..]);
                }
                assert_eq!(joined, payload);
                // The IPv4 pseudo-header's prepared sum would not verify: the sum matters.
                let mut wrong = frame.clone();
                let mut offload4 = offload;
                let tcp_len = if convention == TsoHeaders::PerSegment {
                    0
                } else {
                    (wrong.len() - TCP6) as u32
                };
                let v4 = inet_checksum::ipv4_pseudo_header([254, 128, 0, 0], [0; 4], 6, tcp_len);
                wrong[TCP6 + 16..TCP6 + 18].copy_from_slice(&v4.to_be_bytes());
                offload4.ipv4_header = None;
                let mut bad = 0;
                segment(&wrong, &offload4, offload.tso.unwrap(), convention, |s| {
                    bad += usize::from(!tcp6_checksum_ok(s))
                })
                .unwrap();
                assert_eq!(
                    bad,
                    out.len(),
                    "a wrong pseudo-header shows on every segment"
                );
            }
        }
    }

    #[test]
    fn headers_for_the_other_convention_give_bad_checksums_on_the_wire() {
        // (A per-segment device refuses a TSO request without the IPv4 checksum request,
        // which whole-packet headers come with: see `segment`'s errors. Here the request
        // asks for it, so the headers themselves are what is wrong.)
        for (prepared, device) in [
            (TsoHeaders::PerSegment, TsoHeaders::WholePacket),
            (TsoHeaders::WholePacket, TsoHeaders::PerSegment),
        ] {
            let s = segments(4 * MSS, prepared, device, true);
            assert_eq!(s.len(), 4);
            for (i, s) in s.iter().enumerate() {
                let what = format!("segment {i}, {prepared:?} headers on a {device:?} device");
                assert!(!tcp_checksum_ok(s), "TCP checksum of {what}");
                assert!(!ipv4_header_ok(s), "IPv4 checksum of {what}");
            }
        }
    }

    #[test]
    fn whole_packet_finds_the_ipv4_header_after_ethernet() {
        let mut frame = tcp_frame(&[0; 3000], 0x10, 1);
        let mut offload = prepare_tso(&mut frame, TsoHeaders::WholePacket, MSS as u16);
        assert_eq!(offload.ipv4_header, None, "the convention asks for none");
        let tso = offload.tso.unwrap();
        frame[12..14].copy_from_slice(&[0x86, 0xdd]); // IPv6
        let refused = segment(&frame, &offload, tso, TsoHeaders::WholePacket, |_| {
            panic!("nothing may be emitted")
        });
        assert_eq!(refused, Err(TsoError::NotIpv4));
        // An explicit offset needs no EtherType.
        offload.ipv4_header = Some(IP as u16);
        let mut n = 0;
        segment(&frame, &offload, tso, TsoHeaders::WholePacket, |_| n += 1).unwrap();
        assert_eq!(n, 3);
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
        let run = |offload: &TxOffload, tso, convention| {
            segment(&frame, offload, tso, convention, |_| panic!("emitted"))
        };
        assert_eq!(
            run(&offload, short, TsoHeaders::PerSegment),
            Err(TsoError::HeadersTooShort(TCP + 10))
        );
        let no_mss = Tso { mss: 0, ..tso };
        assert_eq!(
            run(&offload, no_mss, TsoHeaders::PerSegment),
            Err(TsoError::NoMss)
        );
        offload.ipv4_header = None;
        assert_eq!(
            run(&offload, tso, TsoHeaders::PerSegment),
            Err(TsoError::NoIpv4HeaderRequest)
        );
        offload.l4_checksum = None;
        assert_eq!(
            run(&offload, tso, TsoHeaders::WholePacket),
            Err(TsoError::NoTcpChecksumRequest)
        );
    }

    #[test]
    fn replacing_a_word_matches_recomputing_the_checksum() {
        let mut header = tcp_frame(&[], 0, 0)[IP..IP + 20].to_vec();
        let sum = checksum(&header);
        header[10..12].copy_from_slice(&sum.to_be_bytes());
        for new_len in [0u16, 1, 40, 1500, 0xffff] {
            let old_len = u16::from_be_bytes([header[2], header[3]]);
            let updated = !replace_word(!sum, old_len, new_len);
            let mut changed = header.clone();
            changed[2..4].copy_from_slice(&new_len.to_be_bytes());
            changed[10..12].fill(0);
            let recomputed = checksum(&changed);
            changed[10..12].copy_from_slice(&updated.to_be_bytes());
            assert_eq!(
                checksum(&changed),
                0,
                "updated checksum verifies ({new_len})"
            );
            // 0x0000 and 0xffff are the same one's-complement number.
            assert!(updated == recomputed || updated ^ recomputed == 0xffff);
        }
    }
}
