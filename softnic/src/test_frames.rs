//! Frames for the unit tests: Ethernet + IPv4 + TCP from 10.0.0.1 to 10.0.0.2, and checks
//! of what reaches the wire. The checks use `inet-checksum` (tested against its own
//! independent reference) by full recomputation, never the device's incremental updates.

use driver::{L4Checksum, L4Protocol, Tso, TsoHeaders, TxOffload};
use inet_checksum::{checksum, fold, ipv4_pseudo_header, sum_be};

/// Offset of the IPv4 header (after a 14-byte Ethernet header).
pub(crate) const IP: usize = 14;
/// Offset of the TCP header (after a 20-byte IPv4 header).
pub(crate) const TCP: usize = 34;
/// Ethernet + IPv4 + TCP header bytes.
pub(crate) const HEADERS: usize = TCP + 20;

const SRC: [u8; 4] = [10, 0, 0, 1];
const DST: [u8; 4] = [10, 0, 0, 2];

/// Pseudo-header sum (not inverted) for IPv4 10.0.0.1 -> 10.0.0.2.
pub(crate) fn pseudo(protocol: u8, len: u32) -> u16 {
    ipv4_pseudo_header(SRC, DST, protocol, len)
}

/// Ethernet + IPv4 + TCP (20-byte header) + payload; checksums left for the device.
pub(crate) fn tcp_frame(payload: &[u8], flags: u8, seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; HEADERS];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[IP] = 0x45;
    let total = (20 + 20 + payload.len()) as u16;
    f[IP + 2..IP + 4].copy_from_slice(&total.to_be_bytes());
    f[IP + 4..IP + 6].copy_from_slice(&0x1234u16.to_be_bytes());
    f[IP + 8] = 64;
    f[IP + 9] = 6;
    f[IP + 12..IP + 16].copy_from_slice(&SRC);
    f[IP + 16..IP + 20].copy_from_slice(&DST);
    f[TCP..TCP + 2].copy_from_slice(&80u16.to_be_bytes());
    f[TCP + 2..TCP + 4].copy_from_slice(&4000u16.to_be_bytes());
    f[TCP + 4..TCP + 8].copy_from_slice(&seq.to_be_bytes());
    f[TCP + 12] = 5 << 4;
    f[TCP + 13] = flags;
    f[TCP + 14..TCP + 16].copy_from_slice(&0xffffu16.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub(crate) fn ipv4_header_ok(f: &[u8]) -> bool {
    checksum(&f[IP..IP + 20]) == 0
}

pub(crate) fn tcp_checksum_ok(f: &[u8]) -> bool {
    let tcp_len = (f.len() - TCP) as u32;
    fold(sum_be(&f[TCP..]) + pseudo(6, tcp_len) as u64) == 0xffff
}

/// IPv4 header and TCP checksum offload for a [`tcp_frame`].
pub(crate) fn tcp_offload() -> TxOffload {
    TxOffload {
        ipv4_header: Some(IP as u16),
        l4_checksum: Some(L4Checksum {
            protocol: L4Protocol::Tcp,
            start: TCP as u16,
            field: (TCP + 16) as u16,
        }),
        tso: None,
        ipv6_header: None,
    }
}

/// [`tcp_offload`] with TSO at `mss`.
pub(crate) fn tso_offload(mss: u16) -> TxOffload {
    TxOffload {
        tso: Some(Tso {
            mss,
            header_len: HEADERS as u16,
        }),
        ..tcp_offload()
    }
}

/// Prepares the headers of a TSO [`tcp_frame`] as `convention` asks (see
/// [`TsoHeaders`]), and returns the request that goes with them.
pub(crate) fn prepare_tso(frame: &mut [u8], convention: TsoHeaders, mss: u16) -> TxOffload {
    let mut offload = tso_offload(mss);
    match convention {
        TsoHeaders::PerSegment => {
            frame[IP + 2..IP + 4].fill(0); // ignored by the device
            frame[IP + 10..IP + 12].fill(0);
            frame[TCP + 16..TCP + 18].copy_from_slice(&pseudo(6, 0).to_be_bytes());
        }
        TsoHeaders::WholePacket => {
            let total = (frame.len() - IP) as u16;
            frame[IP + 2..IP + 4].copy_from_slice(&total.to_be_bytes());
            frame[IP + 10..IP + 12].fill(0);
            let sum = checksum(&frame[IP..IP + 20]);
            frame[IP + 10..IP + 12].copy_from_slice(&sum.to_be_bytes());
            let tcp_len = (frame.len() - TCP) as u32;
            frame[TCP + 16..TCP + 18].copy_from_slice(&pseudo(6, tcp_len).to_be_bytes());
            offload.ipv4_header = None;
        }
    }
    offload
}

/// Offset of the TCP header after a 40-byte IPv6 header.
pub(crate) const TCP6: usize = IP + 40;
const SRC6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DST6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// Ethernet + IPv6 (fe80::1 -> fe80::2) + TCP (20-byte header) + payload.
pub(crate) fn tcp6_frame(payload: &[u8], flags: u8, seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; TCP6 + 20];
    f[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    f[IP] = 0x60;
    let payload_len = (20 + payload.len()) as u16;
    f[IP + 4..IP + 6].copy_from_slice(&payload_len.to_be_bytes());
    f[IP + 6] = 6;
    f[IP + 7] = 64;
    f[IP + 8..IP + 24].copy_from_slice(&SRC6);
    f[IP + 24..IP + 40].copy_from_slice(&DST6);
    f[TCP6..TCP6 + 2].copy_from_slice(&80u16.to_be_bytes());
    f[TCP6 + 2..TCP6 + 4].copy_from_slice(&4000u16.to_be_bytes());
    f[TCP6 + 4..TCP6 + 8].copy_from_slice(&seq.to_be_bytes());
    f[TCP6 + 12] = 5 << 4;
    f[TCP6 + 13] = flags;
    f.extend_from_slice(payload);
    f
}

/// The TCP checksum of an IPv6 frame verifies, computed with the IPv6 pseudo-header.
pub(crate) fn tcp6_checksum_ok(f: &[u8]) -> bool {
    let tcp_len = (f.len() - TCP6) as u32;
    let pseudo = inet_checksum::ipv6_pseudo_header(SRC6, DST6, 6, tcp_len);
    fold(sum_be(&f[TCP6..]) + pseudo as u64) == 0xffff
}

/// Prepares a TSO [`tcp6_frame`] for `convention` and returns its request.
pub(crate) fn prepare_tso6(frame: &mut [u8], convention: TsoHeaders, mss: u16) -> TxOffload {
    let tcp_len = match convention {
        TsoHeaders::PerSegment => 0,
        TsoHeaders::WholePacket => (frame.len() - TCP6) as u32,
    };
    let pseudo = inet_checksum::ipv6_pseudo_header(SRC6, DST6, 6, tcp_len);
    frame[TCP6 + 16..TCP6 + 18].copy_from_slice(&pseudo.to_be_bytes());
    TxOffload {
        ipv4_header: None,
        ipv6_header: Some(IP as u16),
        l4_checksum: Some(L4Checksum {
            protocol: L4Protocol::Tcp,
            start: TCP6 as u16,
            field: (TCP6 + 16) as u16,
        }),
        tso: Some(Tso {
            mss,
            header_len: (TCP6 + 20) as u16,
        }),
    }
}
