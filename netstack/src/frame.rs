//! The frames smoltcp builds, read and edited at the device boundary through `smoltcp::wire`:
//! where the IP (v4 or v6) and TCP headers are, what the TCP segment says, and the few header
//! fields the boundary rewrites (checksums for offload or software checksumming).

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
};

/// Ethernet header length (no VLAN tag: smoltcp emits none).
pub const ETHERNET_HEADER_LEN: usize = 14;

/// IPv6 header length: smoltcp emits TCP right after the fixed header (no extension
/// headers on what it sends).
pub const IPV6_HEADER_LEN: usize = 40;

/// An outgoing IPv4/TCP or IPv6/TCP frame, as laid out in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFrame {
    /// Offset of the IP header.
    pub ip: usize,
    /// Offset of the TCP header.
    pub tcp: usize,
    /// Ethernet + IP + TCP header bytes: the payload starts here.
    pub header_len: usize,
    pub payload_len: usize,
    /// Both of one family: [`IpAddress::Ipv4`] or [`IpAddress::Ipv6`].
    pub src: IpAddress,
    pub dst: IpAddress,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub syn: bool,
    pub ack: bool,
}

impl TcpFrame {
    /// TCP header plus payload length.
    pub fn tcp_len(&self) -> usize {
        self.header_len - self.tcp + self.payload_len
    }

    /// The flow key, seen from our side (local port, remote address and port).
    pub fn flow(&self) -> FlowKey {
        FlowKey::new(self.src_port, self.dst, self.dst_port)
    }

    /// Whether the frame is IPv6.
    pub fn is_ipv6(&self) -> bool {
        matches!(self.src, IpAddress::Ipv6(_))
    }

    /// Stores `checksum` in the TCP checksum field of `frame` (this frame's buffer).
    pub fn set_tcp_checksum(&self, frame: &mut [u8], checksum: u16) {
        TcpPacket::new_unchecked(&mut frame[self.tcp..self.header_len]).set_checksum(checksum);
    }

    /// Stores `checksum` in the IPv4 header checksum field of `frame` (nothing for IPv6,
    /// which has no header checksum).
    pub fn set_ipv4_checksum(&self, frame: &mut [u8], checksum: u16) {
        if !self.is_ipv6() {
            Ipv4Packet::new_unchecked(&mut frame[self.ip..self.tcp]).set_checksum(checksum);
        }
    }

    /// Turns `frame`, a copy of this IPv4 frame's headers followed by `len` payload bytes,
    /// into the headers of piece `index` of its payload, which starts `offset` bytes in:
    /// the IPv4 total length, identification (one more per piece, as a NIC's TSO numbers
    /// them) and
    /// header checksum, the TCP sequence number, and FIN and PSH only on the `last` piece
    /// (RFC 9293 section 3.1 fields; Intel 82574 datasheet section 7.3.6 does the same in
    /// hardware). The TCP checksum is left to the caller.
    pub fn cut_ipv4(
        &self,
        frame: &mut [u8],
        index: usize,
        offset: usize,
        len: usize,
        last: bool,
    ) -> TcpFrame {
        let header_len = self.header_len;
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[self.ip..self.tcp]);
        ip.set_total_len((header_len - self.ip + len) as u16);
        let ident = ip.ident().wrapping_add(index as u16);
        ip.set_ident(ident);
        ip.fill_checksum();
        let mut tcp = TcpPacket::new_unchecked(&mut frame[self.tcp..header_len]);
        let seq = self.seq.wrapping_add(offset as u32);
        tcp.set_seq_number(smoltcp::wire::TcpSeqNumber(seq as i32));
        if !last {
            tcp.set_fin(false);
            tcp.set_psh(false);
        }
        TcpFrame {
            payload_len: len,
            seq,
            ..*self
        }
    }

    /// Offset of the TCP checksum field in the frame (for the NIC's offload request).
    pub fn checksum_field(&self) -> usize {
        // RFC 9293 section 3.1: the checksum is the 16-bit field at octet 16 of the header.
        self.tcp + 16
    }
}

/// Identifies one of our TCP connections: local port, remote address, remote port. The
/// local address is left out: a remote address talks to one of our addresses per port
/// pair in practice, and the 4-tuple's other half (the family) is in the remote address.
/// An IPv4 address is kept IPv4-mapped (RFC 4291 section 2.5.5.2) beside a family bit, so
/// the two families never collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    remote: u128,
    /// Local port, remote port, and bit 32 set for IPv6.
    ports: u64,
}

impl FlowKey {
    /// Whether the flow is IPv6.
    pub fn is_ipv6(&self) -> bool {
        self.ports & (1 << 32) != 0
    }

    pub fn new(local_port: u16, remote: IpAddress, remote_port: u16) -> Self {
        let (remote, family) = match remote {
            IpAddress::Ipv4(a) => (u128::from(a.to_ipv6_mapped()), 0),
            IpAddress::Ipv6(a) => (u128::from(a), 1u64 << 32),
        };
        FlowKey {
            remote,
            ports: family | (local_port as u64) << 16 | remote_port as u64,
        }
    }
}

impl std::hash::Hash for FlowKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // One word for the table's multiplicative hash: the ports and the address folded.
        let folded = (self.remote as u64) ^ ((self.remote >> 64) as u64).rotate_left(17);
        state.write_u64(folded ^ self.ports << 16);
    }
}

/// Parses an Ethernet frame that carries IPv4/TCP or IPv6/TCP. `None` for anything else
/// (ARP, ICMP, NDP, UDP, fragments, IPv6 extension headers, truncated or inconsistent
/// headers).
pub fn parse_tcp(frame: &[u8]) -> Option<TcpFrame> {
    let ethernet = EthernetFrame::new_checked(frame).ok()?;
    match ethernet.ethertype() {
        EthernetProtocol::Ipv4 => {}
        EthernetProtocol::Ipv6 => return parse_tcp_ipv6(ethernet.payload()),
        _ => return None,
    }
    let ip = Ipv4Packet::new_checked(ethernet.payload()).ok()?;
    if ip.version() != 4
        || ip.next_header() != IpProtocol::Tcp
        || ip.more_frags()
        || ip.frag_offset() != 0
    {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let ip_offset = ETHERNET_HEADER_LEN;
    let tcp_offset = ip_offset + ip.header_len() as usize;
    let header_len = tcp_offset + tcp.header_len() as usize;
    Some(TcpFrame {
        ip: ip_offset,
        tcp: tcp_offset,
        header_len,
        payload_len: tcp.payload().len(),
        src: ip.src_addr().into(),
        dst: ip.dst_addr().into(),
        src_port: tcp.src_port(),
        dst_port: tcp.dst_port(),
        seq: tcp.seq_number().0 as u32,
        syn: tcp.syn(),
        ack: tcp.ack(),
    })
}

/// Whether the TCP checksum of a received frame (parsed as `tcp`) verifies, with the
/// pseudo-header of its family (RFC 9293 section 3.1, RFC 8200 section 8.1). The sum covers
/// the TCP segment as the IP header bounds it (Ethernet padding excluded).
pub fn tcp_checksum_ok(frame: &[u8], tcp: &TcpFrame) -> bool {
    let end = tcp.header_len + tcp.payload_len;
    let Some(segment) = frame.get(tcp.tcp..end) else {
        return false;
    };
    let length = segment.len() as u32;
    let pseudo = match (tcp.src, tcp.dst) {
        (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => {
            inet_checksum::ipv4_pseudo_header(s.octets(), d.octets(), 6, length)
        }
        (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            inet_checksum::ipv6_pseudo_header(s.octets(), d.octets(), 6, length)
        }
        _ => return false,
    };
    let mut sum = inet_checksum::Checksum::new();
    sum.add_word(pseudo);
    sum.add(segment);
    sum.sum() == 0xffff
}

/// Whether `frame` carries TCP that [`parse_tcp`] leaves alone and whose checksum the
/// boundary therefore does not verify: an IPv4 fragment of TCP, or IPv6 TCP behind extension
/// headers (hop-by-hop, routing, fragment, destination options: RFC 8200 section 4). smoltcp
/// is told not to verify TCP checksums and, without its fragmentation features, would take a
/// fragment's payload for the whole segment, so the receive path drops these (smoltcp never
/// emits them; on a LAN they are rare).
pub fn is_unverified_tcp(frame: &[u8]) -> bool {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const DESTINATION_OPTIONS: u8 = 60;
    if let Ok(ethernet) = EthernetFrame::new_checked(frame) {
        if ethernet.ethertype() == EthernetProtocol::Ipv4 {
            return Ipv4Packet::new_checked(ethernet.payload()).is_ok_and(|ip| {
                ip.next_header() == IpProtocol::Tcp && (ip.more_frags() || ip.frag_offset() != 0)
            });
        }
    }
    if frame.len() < ETHERNET_HEADER_LEN + IPV6_HEADER_LEN || frame[12..14] != [0x86, 0xdd] {
        return false;
    }
    let mut next = frame[ETHERNET_HEADER_LEN + 6];
    let mut at = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN;
    let mut walked = 0;
    // Each header starts with Next Header and its length in 8-octet units beyond the first
    // eight (the fragment header's second octet is reserved, zero: 8 octets as well).
    while matches!(next, HOP_BY_HOP | ROUTING | FRAGMENT | DESTINATION_OPTIONS) {
        let Some(header) = frame.get(at..at + 2) else {
            return false;
        };
        next = header[0];
        at += (header[1] as usize + 1) * 8;
        walked += 1;
    }
    walked > 0 && next == IpProtocol::Tcp.into()
}

/// The IPv6 half of [`parse_tcp`]: TCP straight after the fixed header (Next Header 6), the
/// Payload Length within the frame (smoltcp's check; the frame may be padded).
/// Whether `frame`'s IP header says it carries TCP (IPv4 unfragmented, or IPv6 with TCP as
/// the next header) but the TCP header does not parse (a data offset below 5 or beyond the
/// segment, a segment shorter than 20 bytes): a damaged frame, which smoltcp's parser would
/// reject too. Counted apart so that every damaged TCP frame shows in a counter (a bit flip
/// in the data offset makes the checksum unverifiable rather than wrong).
pub fn is_malformed_tcp(frame: &[u8]) -> bool {
    let Ok(ethernet) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    let payload = match ethernet.ethertype() {
        EthernetProtocol::Ipv4 => match Ipv4Packet::new_checked(ethernet.payload()) {
            Ok(ip)
                if ip.next_header() == IpProtocol::Tcp
                    && !ip.more_frags()
                    && ip.frag_offset() == 0 =>
            {
                ip.payload()
            }
            _ => return false,
        },
        EthernetProtocol::Ipv6 => match Ipv6Packet::new_checked(ethernet.payload()) {
            Ok(ip) if ip.next_header() == IpProtocol::Tcp => ip.payload(),
            _ => return false,
        },
        _ => return false,
    };
    TcpPacket::new_checked(payload).is_err()
}

fn parse_tcp_ipv6(packet: &[u8]) -> Option<TcpFrame> {
    let ip = Ipv6Packet::new_checked(packet).ok()?;
    if ip.version() != 6 || ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let ip_offset = ETHERNET_HEADER_LEN;
    let tcp_offset = ip_offset + IPV6_HEADER_LEN;
    let header_len = tcp_offset + tcp.header_len() as usize;
    Some(TcpFrame {
        ip: ip_offset,
        tcp: tcp_offset,
        header_len,
        payload_len: tcp.payload().len(),
        src: ip.src_addr().into(),
        dst: ip.dst_addr().into(),
        src_port: tcp.src_port(),
        dst_port: tcp.dst_port(),
        seq: tcp.seq_number().0 as u32,
        syn: tcp.syn(),
        ack: tcp.ack(),
    })
}

/// A received pure acknowledgement ([`pure_ack`]): no payload, no control flag but ACK (PSH
/// allowed), no option but timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PureAck {
    pub src: IpAddress,
    pub dst: IpAddress,
    pub src_port: u16,
    pub dst_port: u16,
    pub ack_number: u32,
}

/// `frame` as a pure acknowledgement, if it is one: what a later cumulative ACK of the same
/// flow makes redundant. Not one: a segment with payload, SYN, FIN, RST, URG, ECE or CWR
/// (each tells the receiver something of its own), or options other than NOPs and a
/// timestamp (SACK blocks describe what this ACK alone saw).
/// `tcp` is `frame` parsed ([`parse_tcp`]).
pub fn pure_ack(frame: &[u8], tcp: &TcpFrame) -> Option<PureAck> {
    const FLAGS_BUT_PSH: u8 = !0x08;
    const ACK: u8 = 0x10;
    // RFC 7323 appendix A's layout: NOP, NOP, kind 8 length 10.
    const TIMESTAMP_OPTION: [u8; 4] = [1, 1, 8, 10];
    let header = frame.get(tcp.tcp..tcp.header_len)?;
    let plain = match header.len() {
        20 => true,
        32 => header[20..24] == TIMESTAMP_OPTION,
        _ => false,
    };
    (tcp.payload_len == 0 && header[13] & FLAGS_BUT_PSH == ACK && plain).then(|| PureAck {
        src: tcp.src,
        dst: tcp.dst,
        src_port: tcp.src_port,
        dst_port: tcp.dst_port,
        ack_number: u32::from_be_bytes([header[8], header[9], header[10], header[11]]),
    })
}

impl PureAck {
    /// Whether this pure ACK, received right after `earlier`, supersedes it: the same flow,
    /// acknowledging strictly more (sequence space arithmetic, RFC 9293 section 3.4). An
    /// equal acknowledgement number is a duplicate ACK, which counts on its own (fast
    /// retransmit), and is never superseded.
    pub fn supersedes(&self, earlier: &PureAck) -> bool {
        self.src == earlier.src
            && self.dst == earlier.dst
            && self.src_port == earlier.src_port
            && self.dst_port == earlier.dst_port
            && (self.ack_number.wrapping_sub(earlier.ack_number) as i32) > 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smoltcp::wire::{EthernetAddress, Ipv4Address, TcpSeqNumber};

    /// A minimal Ethernet/IPv4/TCP frame (with `options` bytes of TCP options), built with
    /// smoltcp's own emitters.
    pub(crate) fn tcp_frame(payload_len: usize, options: usize, seq: u32, syn: bool) -> Vec<u8> {
        let tcp_len = 20 + options + payload_len;
        let mut f = vec![0u8; ETHERNET_HEADER_LEN + 20 + tcp_len];
        let mut eth = EthernetFrame::new_unchecked(&mut f[..]);
        eth.set_src_addr(EthernetAddress([2, 0, 0, 0, 0, 1]));
        eth.set_dst_addr(EthernetAddress([2, 0, 0, 0, 0, 2]));
        eth.set_ethertype(EthernetProtocol::Ipv4);
        let mut ip = Ipv4Packet::new_unchecked(&mut f[ETHERNET_HEADER_LEN..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len((20 + tcp_len) as u16);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Tcp);
        ip.set_src_addr(Ipv4Address::new(10, 0, 0, 1));
        ip.set_dst_addr(Ipv4Address::new(10, 0, 0, 2));
        ip.fill_checksum();
        let mut tcp = TcpPacket::new_unchecked(&mut f[ETHERNET_HEADER_LEN + 20..]);
        tcp.set_src_port(80);
        tcp.set_dst_port(5555);
        tcp.set_seq_number(TcpSeqNumber(seq as i32));
        tcp.set_header_len((20 + options) as u8);
        tcp.clear_flags();
        tcp.set_ack(true);
        tcp.set_syn(syn);
        f
    }

    #[test]
    fn parses_offsets_and_fields() {
        let f = tcp_frame(100, 12, 0xdead_beef, false);
        let t = parse_tcp(&f).unwrap();
        assert_eq!(
            (t.ip, t.tcp, t.header_len, t.payload_len),
            (14, 34, 66, 100)
        );
        assert_eq!(
            (t.src_port, t.dst_port, t.seq, t.syn),
            (80, 5555, 0xdead_beef, false)
        );
        let remote = IpAddress::v4(10, 0, 0, 2);
        assert_eq!(t.flow(), FlowKey::new(80, remote, 5555));
        assert_eq!(t.tcp_len(), 132);
        assert!(parse_tcp(&tcp_frame(0, 0, 1, true)).unwrap().syn);
    }

    /// An Ethernet/IPv6/TCP frame fe80::1 -> fe80::2 with `payload_len` bytes.
    pub(crate) fn tcp6_frame(payload_len: usize, seq: u32) -> Vec<u8> {
        use smoltcp::wire::Ipv6Address;
        let tcp_len = 20 + payload_len;
        let mut f = vec![0u8; ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + tcp_len];
        let mut eth = EthernetFrame::new_unchecked(&mut f[..]);
        eth.set_src_addr(EthernetAddress([2, 0, 0, 0, 0, 1]));
        eth.set_dst_addr(EthernetAddress([2, 0, 0, 0, 0, 2]));
        eth.set_ethertype(EthernetProtocol::Ipv6);
        let mut ip = Ipv6Packet::new_unchecked(&mut f[ETHERNET_HEADER_LEN..]);
        ip.set_version(6);
        ip.set_payload_len(tcp_len as u16);
        ip.set_next_header(IpProtocol::Tcp);
        ip.set_hop_limit(64);
        ip.set_src_addr(Ipv6Address::new(0xfe80, 0, 0, 0, 0, 0, 0, 1));
        ip.set_dst_addr(Ipv6Address::new(0xfe80, 0, 0, 0, 0, 0, 0, 2));
        let mut tcp = TcpPacket::new_unchecked(&mut f[ETHERNET_HEADER_LEN + IPV6_HEADER_LEN..]);
        tcp.set_src_port(80);
        tcp.set_dst_port(5555);
        tcp.set_seq_number(TcpSeqNumber(seq as i32));
        tcp.set_header_len(20);
        tcp.clear_flags();
        tcp.set_ack(true);
        f
    }

    #[test]
    fn parses_ipv6_and_keeps_the_families_apart() {
        use smoltcp::wire::Ipv6Address;
        let f = tcp6_frame(1000, 77);
        let t = parse_tcp(&f).unwrap();
        assert_eq!(
            (t.ip, t.tcp, t.header_len, t.payload_len),
            (14, 54, 74, 1000)
        );
        assert!(t.is_ipv6());
        assert_eq!((t.src_port, t.dst_port, t.seq), (80, 5555, 77));
        let remote = IpAddress::Ipv6(Ipv6Address::new(0xfe80, 0, 0, 0, 0, 0, 0, 2));
        assert_eq!(t.flow(), FlowKey::new(80, remote, 5555));
        let v4 = IpAddress::v4(10, 0, 0, 2);
        let mapped = IpAddress::Ipv6(Ipv4Address::new(10, 0, 0, 2).to_ipv6_mapped());
        assert_ne!(FlowKey::new(80, v4, 5555), FlowKey::new(80, mapped, 5555));
        // No IPv4 checksum field to write into an IPv6 header.
        let mut edited = f.clone();
        t.set_ipv4_checksum(&mut edited, 0xffff);
        assert_eq!(edited, f);
        let mut icmp = f.clone();
        Ipv6Packet::new_unchecked(&mut icmp[ETHERNET_HEADER_LEN..])
            .set_next_header(IpProtocol::Icmpv6);
        assert!(parse_tcp(&icmp).is_none(), "ICMPv6 / NDP");
        assert!(parse_tcp(&f[..60]).is_none(), "truncated");
    }

    #[test]
    fn tcp_the_boundary_cannot_verify_is_recognised() {
        let plain = tcp6_frame(10, 1);
        assert!(!is_unverified_tcp(&plain));
        // Insert an 8-byte hop-by-hop header (next header TCP) after the fixed header.
        let mut hbh = plain.clone();
        hbh[ETHERNET_HEADER_LEN + 6] = 0;
        let at = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN;
        hbh.splice(at..at, [6, 0, 1, 4, 0, 0, 0, 0]);
        assert!(is_unverified_tcp(&hbh));
        assert!(parse_tcp(&hbh).is_none(), "not parsed as TCP");
        // Hop-by-hop then ICMPv6 (an MLD query): not TCP.
        let mut mld = hbh.clone();
        mld[at] = 58;
        assert!(!is_unverified_tcp(&mld));
        assert!(!is_unverified_tcp(&hbh[..at + 1]), "truncated");
        let mut fragment = tcp_frame(10, 0, 1, false);
        assert!(!is_unverified_tcp(&fragment));
        Ipv4Packet::new_unchecked(&mut fragment[ETHERNET_HEADER_LEN..]).set_more_frags(true);
        assert!(is_unverified_tcp(&fragment), "IPv4 first fragment of TCP");
    }

    #[test]
    fn tcp_headers_that_do_not_parse_are_recognised() {
        for f in [tcp_frame(10, 0, 1, false), tcp6_frame(10, 1)] {
            assert!(!is_malformed_tcp(&f));
            let tcp_at = parse_tcp(&f).unwrap().tcp;
            for offset_words in [0u8, 4, 15] {
                let mut bad = f.clone();
                bad[tcp_at + 12] = (bad[tcp_at + 12] & 0x0f) | (offset_words << 4);
                assert!(parse_tcp(&bad).is_none(), "data offset {offset_words}");
                assert!(is_malformed_tcp(&bad), "data offset {offset_words}");
            }
        }
        let mut udp = tcp_frame(10, 0, 1, false);
        Ipv4Packet::new_unchecked(&mut udp[ETHERNET_HEADER_LEN..]).set_next_header(IpProtocol::Udp);
        assert!(!is_malformed_tcp(&udp));
    }

    #[test]
    fn edits_land_in_the_checksum_fields() {
        let mut f = tcp_frame(10, 0, 1, false);
        let t = parse_tcp(&f).unwrap();
        t.set_tcp_checksum(&mut f, 0xabcd);
        assert_eq!(
            &f[t.checksum_field()..t.checksum_field() + 2],
            &[0xab, 0xcd]
        );
        t.set_ipv4_checksum(&mut f, 0);
        assert_eq!(&f[t.ip + 10..t.ip + 12], &[0, 0], "RFC 791: octets 10-11");
    }

    #[test]
    fn rejects_non_tcp_truncated_and_fragments() {
        let f = tcp_frame(0, 0, 1, false);
        assert!(parse_tcp(&f[..40]).is_none(), "truncated");
        let mut udp = f.clone();
        Ipv4Packet::new_unchecked(&mut udp[ETHERNET_HEADER_LEN..]).set_next_header(IpProtocol::Udp);
        assert!(parse_tcp(&udp).is_none());
        let mut arp = f.clone();
        EthernetFrame::new_unchecked(&mut arp[..]).set_ethertype(EthernetProtocol::Arp);
        assert!(parse_tcp(&arp).is_none(), "ARP");
        let mut fragment = f.clone();
        Ipv4Packet::new_unchecked(&mut fragment[ETHERNET_HEADER_LEN..]).set_more_frags(true);
        assert!(parse_tcp(&fragment).is_none(), "fragment");
        let mut short_total = f.clone();
        Ipv4Packet::new_unchecked(&mut short_total[ETHERNET_HEADER_LEN..]).set_total_len(30);
        assert!(
            parse_tcp(&short_total).is_none(),
            "total length shorter than the headers"
        );
    }

    /// A pure ACK from 10.0.0.1:80 to 10.0.0.2:5555 acknowledging `ack`, with `options`
    /// bytes of TCP options (zeros: end of list) and `payload_len` bytes.
    fn ack_frame(ack: u32, options: usize, payload_len: usize) -> Vec<u8> {
        let mut f = tcp_frame(payload_len, options, 7, false);
        let mut tcp = TcpPacket::new_unchecked(&mut f[ETHERNET_HEADER_LEN + 20..]);
        tcp.set_ack_number(TcpSeqNumber(ack as i32));
        f
    }

    fn pure(frame: &[u8]) -> Option<PureAck> {
        pure_ack(frame, &parse_tcp(frame)?)
    }

    fn supersedes(earlier: &PureAck, next: &[u8]) -> bool {
        pure(next).is_some_and(|next| next.supersedes(earlier))
    }

    #[test]
    fn a_later_pure_ack_of_the_same_flow_supersedes_an_earlier_one() {
        let first = pure(&ack_frame(1000, 0, 0)).expect("a pure ACK");
        assert_eq!(first.ack_number, 1000);
        assert!(supersedes(&first, &ack_frame(2448, 0, 0)));
        // Across the wrap of sequence space.
        let high = pure(&ack_frame(u32::MAX - 10, 0, 0)).unwrap();
        assert!(supersedes(&high, &ack_frame(100, 0, 0)));
        // With the timestamp option (NOP, NOP, kind 8, length 10).
        let mut stamped = ack_frame(3000, 12, 0);
        stamped[ETHERNET_HEADER_LEN + 40..][..4].copy_from_slice(&[1, 1, 8, 10]);
        assert!(supersedes(&first, &stamped));
    }

    #[test]
    fn duplicate_acks_and_segments_that_say_more_are_never_superseded() {
        let first = pure(&ack_frame(1000, 0, 0)).unwrap();
        // A duplicate ACK (fast retransmit counts each) or an older one.
        assert!(!supersedes(&first, &ack_frame(1000, 0, 0)));
        assert!(!supersedes(&first, &ack_frame(999, 0, 0)));
        // Not pure: payload, or options other than a timestamp (SACK blocks).
        assert!(pure(&ack_frame(1000, 0, 1)).is_none());
        assert!(!supersedes(&first, &ack_frame(2000, 0, 1)));
        let mut sack = ack_frame(2000, 12, 0);
        sack[ETHERNET_HEADER_LEN + 40..][..4].copy_from_slice(&[1, 1, 5, 10]);
        assert!(pure(&sack).is_none());
        // Control flags: FIN, RST, SYN, ECE each say something of their own; PSH does not.
        for flag in [0x01u8, 0x02, 0x04, 0x20, 0x40, 0x80] {
            let mut f = ack_frame(2000, 0, 0);
            f[ETHERNET_HEADER_LEN + 20 + 13] |= flag;
            assert!(pure(&f).is_none(), "flag {flag:#x}");
        }
        let mut psh = ack_frame(2000, 0, 0);
        psh[ETHERNET_HEADER_LEN + 20 + 13] |= 0x08;
        assert!(supersedes(&first, &psh));
        // Another flow.
        let mut other = ack_frame(2000, 0, 0);
        TcpPacket::new_unchecked(&mut other[ETHERNET_HEADER_LEN + 20..]).set_src_port(81);
        assert!(!supersedes(&first, &other));
    }
}
