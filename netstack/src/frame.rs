//! Parsing the frames smoltcp builds, at the device boundary: where the IPv4 and TCP headers
//! are and what the TCP segment says.

/// Ethernet header length (no VLAN tag: smoltcp emits none).
pub const ETHERNET_HEADER_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
pub const IP_PROTOCOL_TCP: u8 = 6;

/// TCP flags.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

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
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub flags: u8,
}

impl TcpFrame {
    /// Offset of the TCP checksum field.
    pub fn checksum_field(&self) -> usize {
        self.tcp + 16
    }

    /// TCP header plus payload length.
    pub fn tcp_len(&self) -> usize {
        self.header_len - self.tcp + self.payload_len
    }

    /// The flow key, seen from our side (local port, remote address and port).
    pub fn flow(&self) -> FlowKey {
        FlowKey::new(self.src_port, self.dst, self.dst_port)
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
/// UDP, fragments, truncated headers). The IPv4 total length may be 0 for TSO-sized frames.
pub fn parse_tcp(frame: &[u8]) -> Option<TcpFrame> {
    let ip = ETHERNET_HEADER_LEN;
    if frame.len() < ip + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4 {
        return None;
    }
    let version_ihl = frame[ip];
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 || frame[ip + 9] != IP_PROTOCOL_TCP {
        return None;
    }
    let fragment = u16::from_be_bytes([frame[ip + 6], frame[ip + 7]]) & 0x3fff;
    if fragment != 0 {
        return None;
    }
    let tcp = ip + ihl;
    if frame.len() < tcp + 20 {
        return None;
    }
    let data_offset = ((frame[tcp + 12] >> 4) as usize) * 4;
    let header_len = tcp + data_offset;
    if data_offset < 20 || frame.len() < header_len {
        return None;
    }
    let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    Some(TcpFrame {
        ip,
        tcp,
        header_len,
        payload_len: frame.len() - header_len,
        src: frame[ip + 12..ip + 16].try_into().unwrap(),
        dst: frame[ip + 16..ip + 20].try_into().unwrap(),
        src_port: be16(tcp),
        dst_port: be16(tcp + 2),
        seq: u32::from_be_bytes(frame[tcp + 4..tcp + 8].try_into().unwrap()),
        flags: frame[tcp + 13],
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal Ethernet/IPv4/TCP frame (with `options` bytes of TCP options).
    pub(crate) fn tcp_frame(payload_len: usize, options: usize, seq: u32, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 54 + options + payload_len];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34..36].copy_from_slice(&80u16.to_be_bytes());
        f[36..38].copy_from_slice(&5555u16.to_be_bytes());
        f[38..42].copy_from_slice(&seq.to_be_bytes());
        f[46] = (((20 + options) / 4) as u8) << 4;
        f[47] = flags;
        f
    }

    #[test]
    fn parses_offsets_and_fields() {
        let f = tcp_frame(100, 12, 0xdead_beef, 0x18);
        let t = parse_tcp(&f).unwrap();
        assert_eq!(
            (t.ip, t.tcp, t.header_len, t.payload_len),
            (14, 34, 66, 100)
        );
        assert_eq!(
            (t.src_port, t.dst_port, t.seq, t.flags),
            (80, 5555, 0xdead_beef, 0x18)
        );
        assert_eq!(t.flow(), FlowKey::new(80, [10, 0, 0, 2], 5555));
        assert_eq!(t.tcp_len(), 132);
    }

    #[test]
    fn rejects_non_tcp_and_truncated() {
        let mut f = tcp_frame(0, 0, 1, 0x10);
        assert!(parse_tcp(&f[..40]).is_none());
        f[23] = 17;
        assert!(parse_tcp(&f).is_none());
        f[23] = 6;
        f[12] = 0x08;
        f[13] = 0x06;
        assert!(parse_tcp(&f).is_none(), "ARP");
    }
}
