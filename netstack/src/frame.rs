//! The frames smoltcp builds, read and edited at the device boundary through `smoltcp::wire`:
//! where the IPv4 and TCP headers are, what the TCP segment says, and the few header fields
//! the boundary rewrites (checksums for offload or software checksumming).

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket,
};

/// Ethernet header length (no VLAN tag: smoltcp emits none).
pub const ETHERNET_HEADER_LEN: usize = 14;

/// An outgoing IPv4/TCP frame, as laid out in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFrame {
    /// Offset of the IPv4 header.
    pub ip: usize,
    /// Offset of the TCP header.
    pub tcp: usize,
    /// Ethernet + IPv4 + TCP header bytes: the payload starts here.
    pub header_len: usize,
    pub payload_len: usize,
    pub src: Ipv4Address,
    pub dst: Ipv4Address,
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
        FlowKey::new(self.src_port, self.dst.octets(), self.dst_port)
    }

    /// Stores `checksum` in the TCP checksum field of `frame` (this frame's buffer).
    pub fn set_tcp_checksum(&self, frame: &mut [u8], checksum: u16) {
        TcpPacket::new_unchecked(&mut frame[self.tcp..self.header_len]).set_checksum(checksum);
    }

    /// Stores `checksum` in the IPv4 header checksum field of `frame`.
    pub fn set_ipv4_checksum(&self, frame: &mut [u8], checksum: u16) {
        Ipv4Packet::new_unchecked(&mut frame[self.ip..self.tcp]).set_checksum(checksum);
    }

    /// Offset of the TCP checksum field in the frame (for the NIC's offload request).
    pub fn checksum_field(&self) -> usize {
        // RFC 9293 section 3.1: the checksum is the 16-bit field at octet 16 of the header.
        self.tcp + 16
    }
}

/// Identifies one of our TCP connections: local port, remote IPv4 address, remote port. (The
/// stack has one IPv4 address, so the local address is implied.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey(u64);

impl FlowKey {
    pub fn new(local_port: u16, remote: [u8; 4], remote_port: u16) -> Self {
        FlowKey(
            (local_port as u64) << 48
                | (u32::from_be_bytes(remote) as u64) << 16
                | remote_port as u64,
        )
    }
}

/// Parses an Ethernet frame that carries IPv4/TCP. `None` for anything else (ARP, ICMP,
/// UDP, fragments, truncated or inconsistent headers).
pub fn parse_tcp(frame: &[u8]) -> Option<TcpFrame> {
    let ethernet = EthernetFrame::new_checked(frame).ok()?;
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return None;
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
        src: ip.src_addr(),
        dst: ip.dst_addr(),
        src_port: tcp.src_port(),
        dst_port: tcp.dst_port(),
        seq: tcp.seq_number().0 as u32,
        syn: tcp.syn(),
        ack: tcp.ack(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smoltcp::wire::{EthernetAddress, TcpSeqNumber};

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
        assert_eq!(t.flow(), FlowKey::new(80, [10, 0, 0, 2], 5555));
        assert_eq!(t.tcp_len(), 132);
        assert!(parse_tcp(&tcp_frame(0, 0, 1, true)).unwrap().syn);
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
}
