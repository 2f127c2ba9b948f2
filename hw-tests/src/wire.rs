//! Wire-format helpers shared by the guest programs (`zs-guest`) and the guest tests: the
//! Internet checksum, Ethernet/IPv4/UDP/TCP header builders, a classic-pcap reader and an
//! IPv4 frame parser for checking what reached the wire.
//!
//! Deliberately independent of `netstack` and `driver` (their checksum and header code in
//! particular): the tests use this module to judge what the stack and the drivers put on the
//! wire, and a check that shared their code would share their bugs. Written for clarity, not
//! speed, after RFC 791 (IPv4), RFC 768 (UDP), RFC 793 (TCP) and RFC 1071 (the checksum).
//!
//! All offsets assume Ethernet II framing (14-byte header, no VLAN tag).

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;

// ---------------------------------------------------------------------------------------
// The Internet checksum (RFC 1071)
// ---------------------------------------------------------------------------------------

/// Adds `data` to `acc` as big-endian 16-bit words, an odd last byte padded with a zero byte.
/// The sum is not folded: chain calls, then [`fold`]. (A `u64` cannot overflow for any
/// frame, so no carry is lost between calls.)
pub fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    if let [b] = words.remainder() {
        acc += (*b as u64) << 8;
    }
    acc
}

/// Folds the carries of a [`sum16`] back in: the 16-bit one's-complement sum (not inverted).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum to store in a header: the inverted one's-complement sum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// One's-complement sum of the IPv4 pseudo-header (RFC 793 / RFC 768), not inverted: what a
/// TCP/UDP checksum covers besides the segment, and what checksum offload expects in the
/// checksum field.
pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u16 {
    fold(sum16(&src, sum16(&dst, proto as u64 + len as u64)))
}

/// Whether the TCP/UDP checksum stored in `segment` (header and data) verifies over the
/// pseudo-header and the whole segment. A zero UDP checksum ("none sent") is not special
/// here; callers decide what it means.
pub fn l4_checksum_verifies(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> bool {
    let pseudo = sum16(&src, sum16(&dst, proto as u64 + segment.len() as u64));
    fold(sum16(segment, pseudo)) == 0xffff
}

// ---------------------------------------------------------------------------------------
// Header builders
// ---------------------------------------------------------------------------------------

/// An Ethernet II header.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> [u8; 14] {
    let mut e = [0u8; 14];
    e[0..6].copy_from_slice(&dst);
    e[6..12].copy_from_slice(&src);
    e[12..14].copy_from_slice(&ethertype.to_be_bytes());
    e
}

/// A 20-byte IPv4 header (no options, DF set, TTL 64); the header checksum is filled in when
/// `checksum`, else left zero (for the device to fill in, or deliberately absent).
pub fn ipv4_header(
    total_len: u16,
    id: u16,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    checksum: bool,
) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total_len.to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    if checksum {
        let c = self::checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
    }
    h
}

/// An 8-byte UDP header; `len` counts header and data, `checksum` goes in as given.
pub fn udp_header(src_port: u16, dst_port: u16, len: u16, checksum: u16) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[4..6].copy_from_slice(&len.to_be_bytes());
    h[6..8].copy_from_slice(&checksum.to_be_bytes());
    h
}

/// TCP flag PSH.
pub const TCP_PSH: u8 = 0x08;
/// TCP flag ACK.
pub const TCP_ACK: u8 = 0x10;

/// A 20-byte TCP header (no options, window 65535, urgent pointer 0); `checksum` goes in as
/// given (the pseudo-header sum, for checksum offload).
pub fn tcp_header(
    src_port: u16,
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    checksum: u16,
) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h[12] = 5 << 4; // data offset: 5 words
    h[13] = flags;
    h[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    h[16..18].copy_from_slice(&checksum.to_be_bytes());
    h
}

// ---------------------------------------------------------------------------------------
// Reading what reached the wire
// ---------------------------------------------------------------------------------------

/// `"52:54:00:12:34:56"` as bytes; panics on anything else (the tests write these).
pub fn mac_bytes(mac: &str) -> [u8; 6] {
    let v: Vec<u8> = mac
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// FNV-1a, 64 bit: a short fingerprint of frame bytes for the guest to print and the host to
/// compare.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The frames of a classic pcap file (what QEMU's `filter-dump` writes), either byte order,
/// micro- or nanosecond timestamps. A record cut off at the end of the file is dropped (QEMU
/// killed mid-write); a record captured shorter than the frame was is an error, since its
/// bytes cannot be checked.
pub fn pcap_frames(data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    pcap_records(data)?
        .into_iter()
        .map(|(orig, frame)| {
            if frame.len() == orig {
                Ok(frame)
            } else {
                Err(format!(
                    "pcap record truncated ({} of {orig} bytes)",
                    frame.len()
                ))
            }
        })
        .collect()
}

/// The records of a classic pcap as (length on the wire, the bytes captured): a record may
/// hold only the first snaplen bytes of a large (TSO) frame.
pub fn pcap_records(data: &[u8]) -> Result<Vec<(usize, Vec<u8>)>, String> {
    if data.len() < 24 {
        return Err("pcap shorter than its header".into());
    }
    let magic = u32::from_le_bytes(data[0..4].try_into().unwrap());
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => return Err(format!("not a pcap file (magic {magic:#x})")),
    };
    let u32_at = |b: &[u8]| {
        let a: [u8; 4] = b.try_into().unwrap();
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let incl = u32_at(&data[at + 8..at + 12]) as usize;
        let orig = u32_at(&data[at + 12..at + 16]) as usize;
        at += 16;
        if at + incl > data.len() {
            break; // QEMU was killed mid-record
        }
        frames.push((orig, data[at..at + incl].to_vec()));
        at += incl;
    }
    Ok(frames)
}

/// An IPv4 frame as it was on the wire. [`Ipv4Frame::parse`] checks only that the lengths
/// hold together; the checksum methods say whether the checksums verify.
#[derive(Debug)]
pub struct Ipv4Frame<'a> {
    /// The whole Ethernet frame.
    pub frame: &'a [u8],
    /// The IPv4 header and payload, to the IPv4 total length (no Ethernet padding).
    pub ip: &'a [u8],
    pub proto: u8,
    /// The L4 header and data (to the IPv4 total length).
    pub l4: &'a [u8],
    pub id: u16,
    /// The flags and fragment offset word.
    pub flags_frag: u16,
}

impl Ipv4Frame<'_> {
    /// An Ethernet II frame carrying IPv4 (any protocol, fragments too), if `frame` is one.
    pub fn parse(frame: &[u8]) -> Option<Ipv4Frame<'_>> {
        if frame.len() < 34 || frame[12..14] != ETHERTYPE_IPV4.to_be_bytes() || frame[14] >> 4 != 4
        {
            return None;
        }
        let ihl = (frame[14] & 0xf) as usize * 4;
        let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
        if ihl < 20 || total < ihl || frame.len() < 14 + total {
            return None;
        }
        let ip = &frame[14..14 + total];
        Some(Ipv4Frame {
            frame,
            ip,
            proto: ip[9],
            l4: &ip[ihl..],
            id: u16::from_be_bytes([ip[4], ip[5]]),
            flags_frag: u16::from_be_bytes([ip[6], ip[7]]),
        })
    }

    pub fn src_mac(&self) -> &[u8] {
        &self.frame[6..12]
    }

    pub fn ttl(&self) -> u8 {
        self.ip[8]
    }

    pub fn src_ip(&self) -> [u8; 4] {
        self.ip[12..16].try_into().unwrap()
    }

    pub fn dst_ip(&self) -> [u8; 4] {
        self.ip[16..20].try_into().unwrap()
    }

    /// TCP/UDP source port.
    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.l4[0], self.l4[1]])
    }

    /// TCP/UDP destination port.
    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.l4[2], self.l4[3]])
    }

    /// Whether the IPv4 header checksum verifies.
    pub fn ip_checksum_ok(&self) -> bool {
        let ihl = (self.ip[0] & 0xf) as usize * 4;
        fold(sum16(&self.ip[..ihl], 0)) == 0xffff
    }

    /// The stored TCP/UDP checksum; None for other protocols or an L4 part too short to hold
    /// it.
    pub fn l4_checksum_field(&self) -> Option<u16> {
        let at = match self.proto {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            _ => return None,
        };
        let field = self.l4.get(at..at + 2)?;
        Some(u16::from_be_bytes([field[0], field[1]]))
    }

    /// Whether the TCP/UDP checksum verifies over the pseudo-header and the L4 part (a zero
    /// UDP checksum counts as whatever the sum says).
    pub fn l4_checksum_verifies(&self) -> bool {
        l4_checksum_verifies(self.src_ip(), self.dst_ip(), self.proto, self.l4)
    }

    /// Whether a TCP/UDP checksum is present and verifies: a zero UDP checksum ("none") does
    /// not count, nor does a frame of another protocol.
    pub fn l4_checksum_ok(&self) -> bool {
        match self.l4_checksum_field() {
            None => false,
            Some(0) if self.proto == IPPROTO_UDP => false,
            Some(_) => self.l4_checksum_verifies(),
        }
    }

    pub fn tcp_seq(&self) -> u32 {
        u32::from_be_bytes(self.l4[4..8].try_into().unwrap())
    }

    pub fn tcp_flags(&self) -> u8 {
        self.l4[13]
    }

    /// The TCP data, after the header and its options.
    pub fn tcp_payload(&self) -> &[u8] {
        &self.l4[(self.l4[12] >> 4) as usize * 4..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_the_rfc_1071_example() {
        // RFC 1071 section 3: these bytes sum to 0x2ddf0, folded 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum16(&data, 0), 0x2_ddf0);
        assert_eq!(fold(sum16(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
        // An odd last byte is padded on the right.
        assert_eq!(sum16(&[0xab], 0), 0xab00);
        // Summing in pieces (even lengths) is summing the whole.
        assert_eq!(sum16(&data[4..], sum16(&data[..4], 0)), sum16(&data, 0));
    }

    #[test]
    fn ipv4_header_matches_a_known_capture() {
        // A well-known example header (Wikipedia, "Internet checksum"): checksum 0xb861.
        let h = ipv4_header(
            0x73,
            0,
            IPPROTO_UDP,
            [192, 168, 0, 1],
            [192, 168, 0, 199],
            true,
        );
        let want = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(h, want);
        assert_eq!(
            ipv4_header(0x73, 0, 17, [0; 4], [0; 4], false)[10..12],
            [0, 0]
        );
    }

    /// Ethernet + IPv4 + UDP with both checksums right.
    fn udp_frame(payload: &[u8]) -> Vec<u8> {
        let (src, dst) = ([10, 0, 2, 15], [10, 0, 2, 2]);
        let len = 8 + payload.len() as u16;
        let mut f = ethernet([2; 6], [4; 6], ETHERTYPE_IPV4).to_vec();
        f.extend_from_slice(&ipv4_header(20 + len, 7, IPPROTO_UDP, src, dst, true));
        let mut udp = udp_header(1234, 5678, len, 0).to_vec();
        udp.extend_from_slice(payload);
        let c = !fold(sum16(&udp, pseudo_sum(src, dst, IPPROTO_UDP, len) as u64));
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&udp);
        f
    }

    #[test]
    fn udp_frame_round_trips_through_the_parser() {
        let mut f = udp_frame(b"hello, wire");
        f.extend_from_slice(&[0; 7]); // Ethernet padding is not part of the datagram
        let p = Ipv4Frame::parse(&f).unwrap();
        assert_eq!(p.src_mac(), [4; 6]);
        assert_eq!((p.src_ip(), p.dst_ip()), ([10, 0, 2, 15], [10, 0, 2, 2]));
        assert_eq!(
            (p.proto, p.id, p.ttl(), p.flags_frag),
            (IPPROTO_UDP, 7, 64, 0x4000)
        );
        assert_eq!((p.src_port(), p.dst_port()), (1234, 5678));
        assert_eq!(&p.l4[8..], b"hello, wire");
        assert!(p.ip_checksum_ok() && p.l4_checksum_ok() && p.l4_checksum_verifies());

        // The checks can fail: one flipped payload bit, one flipped header bit.
        let mut bad = udp_frame(b"hello, wire");
        bad[45] ^= 1;
        assert!(!Ipv4Frame::parse(&bad).unwrap().l4_checksum_ok());
        let mut bad = udp_frame(b"hello, wire");
        bad[22] ^= 1;
        assert!(!Ipv4Frame::parse(&bad).unwrap().ip_checksum_ok());
        // A zero UDP checksum is "none": present-and-right says no.
        let mut none = udp_frame(b"hello, wire");
        none[40..42].copy_from_slice(&[0, 0]);
        assert!(!Ipv4Frame::parse(&none).unwrap().l4_checksum_ok());
        // Not IPv4, or shorter than its IPv4 total length: not parsed.
        assert!(Ipv4Frame::parse(&f[..40]).is_none());
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(Ipv4Frame::parse(&arp).is_none());
    }

    #[test]
    fn tcp_header_round_trips_through_the_parser() {
        let (src, dst) = ([10, 99, 0, 2], [10, 99, 1, 2]);
        let payload = b"segment data!";
        let tcp_len = 20 + payload.len() as u16;
        let mut f = ethernet([2; 6], [4; 6], ETHERTYPE_IPV4).to_vec();
        f.extend_from_slice(&ipv4_header(20 + tcp_len, 9, IPPROTO_TCP, src, dst, true));
        let mut seg = tcp_header(5001, 7001, 0x0102_0304, 1, TCP_PSH | TCP_ACK, 0).to_vec();
        seg.extend_from_slice(payload);
        let c = !fold(sum16(
            &seg,
            pseudo_sum(src, dst, IPPROTO_TCP, tcp_len) as u64,
        ));
        seg[16..18].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&seg);
        let p = Ipv4Frame::parse(&f).unwrap();
        assert_eq!((p.src_port(), p.dst_port()), (5001, 7001));
        assert_eq!(p.tcp_seq(), 0x0102_0304);
        assert_eq!(p.tcp_flags(), TCP_PSH | TCP_ACK);
        assert_eq!(p.tcp_payload(), payload);
        assert_eq!(p.l4_checksum_field(), Some(c));
        assert!(p.ip_checksum_ok() && p.l4_checksum_ok());
        assert!(l4_checksum_verifies(src, dst, IPPROTO_TCP, &seg));
        seg[25] ^= 0x80;
        assert!(!l4_checksum_verifies(src, dst, IPPROTO_TCP, &seg));
    }

    fn pcap(le: bool, records: &[(&[u8], u32)]) -> Vec<u8> {
        let w = |v: u32| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let mut out = w(0xa1b2_c3d4).to_vec();
        out.extend_from_slice(&[0; 20]); // version, zone, sigfigs, snaplen, link type
        for (data, orig) in records {
            out.extend_from_slice(&[0; 8]); // timestamp
            out.extend_from_slice(&w(data.len() as u32));
            out.extend_from_slice(&w(*orig));
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn pcap_frames_reads_both_byte_orders() {
        for le in [true, false] {
            let file = pcap(le, &[(b"first", 5), (b"second!", 7)]);
            assert_eq!(
                pcap_frames(&file).unwrap(),
                [b"first".to_vec(), b"second!".to_vec()]
            );
            // A record cut off by the end of the file is dropped.
            assert_eq!(pcap_frames(&file[..file.len() - 1]).unwrap().len(), 1);
        }
        assert!(pcap_frames(&pcap(true, &[(b"short", 60)])).is_err());
        assert!(pcap_frames(&[0; 24]).is_err());
        assert!(pcap_frames(&[0xd4, 0xc3, 0xb2, 0xa1]).is_err());
    }

    #[test]
    fn mac_bytes_and_fnv64() {
        assert_eq!(
            mac_bytes("52:54:00:c1:00:0a"),
            [0x52, 0x54, 0x00, 0xc1, 0x00, 0x0a]
        );
        // FNV-1a 64 test vectors.
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
