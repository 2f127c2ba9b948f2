//! IPv6 through the software NIC to a stock smoltcp peer: zero-copy downloads byte-exact
//! on NICs with and without TSO (both TSO header conventions, checksum offload, software
//! checksums; IPv6 itself goes out in MSS frames, see the first test),
//! every TCP segment on the wire checked with the IPv6 pseudo-header by the test itself,
//! neighbour discovery, the link-local address, ICMPv6 echo, received segments with a bad
//! checksum dropped and counted, and (with `--features test-hooks`) a boundary that sums the
//! pseudo-header the IPv4 way caught by the peer.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use common::*;
use driver::{Capabilities, TsoHeaders};
use netstack::{ConnId, Event, Ipv6Config, SendOutcome, StackStats};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpCidr, IpProtocol, Ipv6Address, Ipv6Cidr, Ipv6Packet, Ipv6Repr, TcpPacket, TcpRepr,
    TcpSeqNumber,
};
use softnic::SoftNicConfig;

const STACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const STACK_V6: Ipv6Address = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const PEER_V6: Ipv6Address = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const ICMPV6: u8 = 58;
const NEIGHBOR_ADVERT: u8 = 136;
const ECHO_REPLY: u8 = 129;
const ROUTER_SOLICIT: u8 = 133;

/// What the test sees of the stack's frames on the wire (after the NIC's offloads).
#[derive(Default, Debug)]
struct Wire {
    ipv6_tcp_frames: u64,
    ipv6_data_frames: u64,
    /// IPv6 TCP segments whose checksum does not verify with the IPv6 pseudo-header,
    /// recomputed here over the bytes on the wire.
    bad_checksums: u64,
    ipv4_tcp_frames: u64,
    largest_frame: usize,
    /// Neighbour advertisements for `STACK_V6` or the link-local address.
    neighbor_adverts: u64,
    echo_replies: Vec<Vec<u8>>,
    router_solicits: u64,
    syn_acks_to: Vec<u16>,
}

impl Wire {
    fn frame(&mut self, f: &[u8]) {
        self.largest_frame = self.largest_frame.max(f.len());
        let ipv6 = f.len() >= 54 && f[12..14] == ETHERTYPE_IPV6;
        if ipv6 && f[20] == ICMPV6 && f.len() > 54 {
            match f[54] {
                NEIGHBOR_ADVERT => self.neighbor_adverts += 1,
                ECHO_REPLY => self.echo_replies.push(f.to_vec()),
                ROUTER_SOLICIT => self.router_solicits += 1,
                _ => {}
            }
            return;
        }
        let Some(t) = netstack::frame::parse_tcp(f) else {
            return;
        };
        if !t.is_ipv6() {
            self.ipv4_tcp_frames += 1;
            return;
        }
        self.ipv6_tcp_frames += 1;
        self.ipv6_data_frames += u64::from(t.payload_len > 0);
        if t.syn && t.ack {
            self.syn_acks_to.push(t.dst_port);
        }
        // Recomputed independently of the stack: the whole segment plus the RFC 8200
        // section 8.1 pseudo-header must sum to 0xffff.
        let (IpAddress::Ipv6(src), IpAddress::Ipv6(dst)) = (t.src, t.dst) else {
            unreachable!()
        };
        let segment = &f[t.tcp..t.header_len + t.payload_len];
        let pseudo =
            inet_checksum::ipv6_pseudo_header(src.octets(), dst.octets(), 6, segment.len() as u32);
        let sum = inet_checksum::fold(inet_checksum::sum_be(segment) + pseudo as u64);
        if sum != 0xffff {
            self.bad_checksums += 1;
        }
    }
}

struct Ipv6Bed {
    bed: Bed,
    wire: Arc<Mutex<Wire>>,
}

fn caps(tcp_checksum: bool, tso: Option<TsoHeaders>, tso_ipv6: bool) -> Capabilities {
    Capabilities {
        ipv4_header_checksum: tcp_checksum,
        tcp_checksum,
        udp_checksum: tcp_checksum,
        tso_max_frame: tso.map(|_| 65535),
        tso_headers: tso.unwrap_or(TsoHeaders::PerSegment),
        tso_ipv6,
        max_tx_segments: 64,
        mtu: 1500,
        tls_tx: None,
    }
}

/// A bed whose stack has `STACK_V6/64` and its link-local address, and whose peer has
/// `PEER_V6/64` and its own link-local; every frame on the wire goes through [`Wire`] and
/// the poison scan.
fn ipv6_bed(capabilities: Capabilities, cache_bytes: usize) -> Ipv6Bed {
    ipv6_bed_with(capabilities, cache_bytes, |_| {})
}

fn ipv6_bed_with(
    capabilities: Capabilities,
    cache_bytes: usize,
    adjust: impl FnOnce(&mut BedConfig),
) -> Ipv6Bed {
    let nic = SoftNicConfig {
        capabilities,
        ..SoftNicConfig::default()
    };
    let mut config = BedConfig::new(nic, cache_bytes);
    config.stack.ipv6 = Ipv6Config::with_addresses(&[Ipv6Cidr::new(STACK_V6, 64)]).unwrap();
    adjust(&mut config);
    let mut bed = Bed::new(config);
    bed.peer_iface.update_ip_addrs(|a| {
        a.push(IpCidr::Ipv6(Ipv6Cidr::new(PEER_V6, 64))).unwrap();
        a.push(IpCidr::Ipv6(Ipv6Cidr::new(
            netstack::link_local_address(PEER_MAC),
            64,
        )))
        .unwrap();
    });
    let wire = Arc::new(Mutex::new(Wire::default()));
    let (w, poisoned) = (wire.clone(), bed.poisoned_frames.clone());
    bed.stack.nic_mut().set_tx_tap(Some(Box::new(move |f| {
        if netstack::poison::find_poison(f).is_some() {
            poisoned.fetch_add(1, Ordering::Relaxed);
        }
        w.lock().unwrap().frame(f);
    })));
    Ipv6Bed { bed, wire }
}

/// The peer connects to `to`:80 from `local_port`; returns the accepted connection.
fn connect(bed: &mut Bed, to: Ipv6Address, local_port: u16) -> ConnId {
    bed.stack.listen(SERVER_PORT).unwrap();
    let cx = bed.peer_iface.context();
    bed.peer_sockets
        .get_mut::<tcp::Socket>(bed.peer_socket)
        .connect(cx, (IpAddress::Ipv6(to), SERVER_PORT), local_port)
        .unwrap();
    for _ in 0..100_000 {
        bed.step();
        while let Some(e) = bed.stack.next_event() {
            if let Event::Accepted { conn, .. } = e {
                return conn;
            }
        }
    }
    panic!("no IPv6 connection accepted");
}

/// Sends `len` bytes of a file over IPv6 to `to`; asserts they arrive byte-exact and are
/// acknowledged. Returns the stack's counters.
fn download(b: &mut Ipv6Bed, to: Ipv6Address, from: Ipv6Address, len: usize) -> StackStats {
    let data = pattern(len, len as u64);
    let path = b.bed.write_file("file", &data);
    let file = b
        .bed
        .cache
        .open(&path, pagecache::OpenOptions::read_only())
        .unwrap();
    let conn = connect(&mut b.bed, to, 49152);
    let peer = b.bed.stack.remote_endpoint(conn).unwrap().unwrap();
    assert_eq!(peer.0, std::net::IpAddr::V6(from));
    let pin = file.pin(0..len as u64).unwrap();
    b.bed.stack.send_file(conn, &pin, 0..len as u64).unwrap();
    drop(pin);
    let received = b.bed.receive_all(&data, |_, _| {});
    if received.bytes != len as u64 {
        eprintln!(
            "nic {:?}\nstack {:?}\nwire {:?}",
            b.bed.stack.nic().counters(),
            b.bed.stack.stats(),
            b.wire.lock().unwrap()
        );
    }
    assert_eq!(received.bytes, len as u64);
    assert_eq!(received.mismatched_bytes, 0);
    assert_eq!(
        received.sha256,
        sha256(&data),
        "sha256 of what the peer got"
    );
    let mut events = received.events;
    b.bed.run_until(200_000, |bed| {
        events.extend(bed.stack.poll_events());
        events
            .iter()
            .any(|e| matches!(e, Event::SendComplete { .. }))
    });
    assert!(events.iter().any(|e| matches!(
        e,
        Event::SendComplete {
            outcome: SendOutcome::Acknowledged,
            ..
        }
    )));
    let stats = b.bed.stack.stats();
    assert_eq!(stats.payload_bytes_copied, 0, "file bytes never copied");
    assert_eq!(stats.tx_unmapped_drops, 0);
    assert!(stats.zero_copy_frames > 0);
    let wire = b.wire.lock().unwrap();
    assert!(wire.ipv6_data_frames > 0, "{wire:?}");
    assert_eq!(wire.ipv4_tcp_frames, 0, "the download went over IPv6");
    assert_eq!(wire.bad_checksums, 0, "every IPv6 TCP checksum verifies");
    assert!(
        wire.largest_frame <= 1514,
        "the wire carries MTU-sized frames"
    );
    stats
}

/// On a NIC with IPv4 and IPv6 TSO the IPv6 download still goes out in MSS frames:
/// smoltcp 0.14 drops IPv6 packets above the MTU even with segmentation offload, so the
/// stack does not ask it for IPv6 TSO (see `netstack::device::capabilities`). Checksums are
/// offloaded under either TSO header convention.
#[test]
fn download_over_ipv6_on_a_tso_nic_is_byte_exact_in_mss_frames() {
    for convention in [TsoHeaders::PerSegment, TsoHeaders::WholePacket] {
        let mut b = ipv6_bed(caps(true, Some(convention), true), 24 << 20);
        assert!(b.bed.stack.tso_frame().is_some(), "IPv4 TSO stays on");
        let stats = download(&mut b, STACK_V6, PEER_V6, 8 << 20);
        let nic = b.bed.stack.nic().counters();
        assert_eq!(nic.tso_frames, 0, "{convention:?}: {nic:?}");
        assert_eq!(nic.bad_frames, 0);
        assert_eq!(stats.software_checksum_bytes, 0, "checksums offloaded");
        let wire = b.wire.lock().unwrap();
        assert!(wire.ipv6_data_frames >= (8 << 20) / 1440);
    }
}

#[test]
fn download_over_ipv6_without_ipv6_tso_segments_in_the_stack() {
    // IPv4 TSO offered, IPv6 TSO not (an 82540EM): MSS frames, checksum offloaded.
    let mut b = ipv6_bed(caps(true, Some(TsoHeaders::PerSegment), false), 12 << 20);
    let stats = download(&mut b, STACK_V6, PEER_V6, 4 << 20);
    let nic = b.bed.stack.nic().counters();
    assert_eq!(nic.tso_frames, 0, "no TSO for IPv6 frames");
    assert_eq!(stats.software_checksum_bytes, 0, "checksums offloaded");
    let wire = b.wire.lock().unwrap();
    assert!(wire.ipv6_data_frames >= (4 << 20) / 1440);
}

#[test]
fn download_over_ipv6_with_software_checksums() {
    let mut b = ipv6_bed(caps(false, None, false), 12 << 20);
    let stats = download(&mut b, STACK_V6, PEER_V6, 4 << 20);
    assert!(stats.software_checksum_bytes >= 4 << 20, "{stats:?}");
    assert_eq!(b.bed.stack.nic().counters().tso_frames, 0);
}

#[test]
fn neighbour_discovery_resolves_and_the_link_local_address_serves() {
    let mut b = ipv6_bed(caps(true, Some(TsoHeaders::PerSegment), true), 8 << 20);
    let link_local = netstack::link_local_address(STACK_MAC);
    // RFC 4291 appendix A: 02:00:00:00:00:01 -> fe80::ff:fe00:1.
    assert_eq!(
        link_local,
        Ipv6Address::new(0xfe80, 0, 0, 0, 0, 0xff, 0xfe00, 1)
    );
    let addresses = b.bed.stack.ipv6_addresses();
    assert_eq!(addresses[0], Ipv6Cidr::new(link_local, 64));
    assert!(addresses.contains(&Ipv6Cidr::new(STACK_V6, 64)));
    // The peer knows no MAC for the link-local address: it must solicit it first.
    download(
        &mut b,
        link_local,
        netstack::link_local_address(PEER_MAC),
        1 << 20,
    );
    let wire = b.wire.lock().unwrap();
    assert!(
        wire.neighbor_adverts >= 1,
        "the stack answered the peer's neighbour solicitation: {wire:?}"
    );
}

/// An Ethernet frame from the peer to the stack carrying `ip` and `payload`.
fn peer_frame(ip: Ipv6Repr, emit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: EthernetAddress(PEER_MAC),
        dst_addr: EthernetAddress(STACK_MAC),
        ethertype: EthernetProtocol::Ipv6,
    };
    let mut f = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    eth.emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    let mut packet = Ipv6Packet::new_unchecked(&mut f[14..]);
    ip.emit(&mut packet);
    emit(packet.payload_mut());
    f
}

#[test]
fn icmpv6_echo_is_answered() {
    let mut b = ipv6_bed(caps(true, None, false), 4 << 20);
    // A first connection fills both neighbour caches.
    download(&mut b, STACK_V6, PEER_V6, 4096);
    let echo = Icmpv6Repr::EchoRequest {
        ident: 0x1234,
        seq_no: 7,
        data: b"zerosend ping",
    };
    let ip = Ipv6Repr {
        src_addr: PEER_V6,
        dst_addr: STACK_V6,
        next_header: IpProtocol::Icmpv6,
        payload_len: echo.buffer_len(),
        hop_limit: 64,
    };
    let frame = peer_frame(ip, |payload| {
        let mut icmp = Icmpv6Packet::new_unchecked(payload);
        echo.emit(
            &PEER_V6,
            &STACK_V6,
            &mut icmp,
            &smoltcp::phy::ChecksumCapabilities::default(),
        );
    });
    b.bed.peer_dev.peer().send(frame);
    b.bed.run_until(100, |_| false);
    let wire = b.wire.lock().unwrap();
    assert_eq!(wire.echo_replies.len(), 1, "one echo reply");
    let reply = &wire.echo_replies[0];
    assert!(reply.ends_with(b"zerosend ping"));
}

/// A SYN from the peer to port 80 from `port`, its checksum correct or not.
fn syn(port: u16, good_checksum: bool) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: port,
        dst_port: SERVER_PORT,
        control: smoltcp::wire::TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 64240,
        window_scale: None,
        max_seg_size: Some(1440),
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv6Repr {
        src_addr: PEER_V6,
        dst_addr: STACK_V6,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    peer_frame(ip, |payload| {
        let mut packet = TcpPacket::new_unchecked(payload);
        tcp.emit(
            &mut packet,
            &PEER_V6.into(),
            &STACK_V6.into(),
            &smoltcp::phy::ChecksumCapabilities::default(),
        );
        if !good_checksum {
            let c = packet.checksum();
            packet.set_checksum(c ^ 0x0100);
        }
    })
}

#[test]
fn a_received_segment_with_a_bad_ipv6_checksum_is_dropped_and_counted() {
    let mut b = ipv6_bed(caps(true, None, false), 4 << 20);
    download(&mut b, STACK_V6, PEER_V6, 4096);
    let before = b.bed.stack.stats().rx_tcp_checksum_drops;
    b.bed.peer_dev.peer().send(syn(50001, false));
    b.bed.run_until(50, |_| false);
    assert_eq!(b.bed.stack.stats().rx_tcp_checksum_drops, before + 1);
    assert!(
        !b.wire.lock().unwrap().syn_acks_to.contains(&50001),
        "no answer to a corrupt SYN"
    );
    // The same SYN with its checksum intact is answered: the drop was the checksum's.
    b.bed.peer_dev.peer().send(syn(50002, true));
    b.bed.run_until(50, |_| false);
    assert_eq!(b.bed.stack.stats().rx_tcp_checksum_drops, before + 1);
    assert!(b.wire.lock().unwrap().syn_acks_to.contains(&50002));
}

/// A boundary that sums an IPv6 frame's pseudo-header the IPv4 way: the peer drops every
/// segment, nothing arrives, the wire check sees every checksum bad. Shows that the
/// downloads above verify the pseudo-header (run with `--features test-hooks`).
#[cfg(feature = "test-hooks")]
#[test]
fn a_wrong_pseudo_header_fails_on_the_wire() {
    for capabilities in [
        caps(true, Some(TsoHeaders::PerSegment), true),
        caps(false, None, false),
    ] {
        let mut b = ipv6_bed_with(capabilities, 4 << 20, |c| {
            c.stack.tx.fault = netstack::BoundaryFault::Ipv6PseudoHeaderAsIpv4;
        });
        b.bed.stack.listen(SERVER_PORT).unwrap();
        let cx = b.bed.peer_iface.context();
        b.bed
            .peer_sockets
            .get_mut::<tcp::Socket>(b.bed.peer_socket)
            .connect(cx, (IpAddress::Ipv6(STACK_V6), SERVER_PORT), 49152)
            .unwrap();
        b.bed.run_until(2000, |_| false);
        let accepted = b
            .bed
            .stack
            .poll_events()
            .any(|e| matches!(e, Event::Accepted { .. }));
        assert!(
            !accepted,
            "the peer must drop the SYN-ACK: {capabilities:?}"
        );
        let wire = b.wire.lock().unwrap();
        assert!(wire.ipv6_tcp_frames > 0);
        assert_eq!(wire.bad_checksums, wire.ipv6_tcp_frames, "{wire:?}");
    }
}

/// SLAAC (RFC 4862): the stack solicits routers; a router advertisement for `fd42::/64`
/// (on-link, autonomous) from the peer's link-local address gives the stack
/// `fd42::` + its EUI-64 interface identifier, which then serves a download.
#[test]
fn slaac_forms_an_address_from_a_router_advertisement_and_serves_on_it() {
    use smoltcp::wire::{
        NdiscPrefixInfoFlags, NdiscPrefixInformation, NdiscRepr, NdiscRouterFlags,
        RawHardwareAddress,
    };
    let mut b = ipv6_bed_with(caps(true, None, false), 4 << 20, |c| {
        c.stack.ipv6 = Ipv6Config {
            slaac: true,
            ..Ipv6Config::link_local()
        };
    });
    let wire = b.wire.clone();
    let solicited = b
        .bed
        .run_until(20_000, |_| wire.lock().unwrap().router_solicits > 0);
    assert!(solicited, "the stack sent a router solicitation");
    let prefix = Ipv6Address::new(0xfd42, 0, 0, 0, 0, 0, 0, 0);
    let advert = Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
        hop_limit: 64,
        flags: NdiscRouterFlags::empty(),
        router_lifetime: smoltcp::time::Duration::from_secs(1800),
        reachable_time: smoltcp::time::Duration::from_millis(0),
        retrans_time: smoltcp::time::Duration::from_millis(0),
        lladdr: Some(RawHardwareAddress::from_bytes(&PEER_MAC)),
        mtu: None,
        prefix_info: Some(NdiscPrefixInformation {
            prefix_len: 64,
            flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
            valid_lifetime: smoltcp::time::Duration::from_secs(86400),
            preferred_lifetime: smoltcp::time::Duration::from_secs(14400),
            prefix,
        }),
    });
    let router = netstack::link_local_address(PEER_MAC);
    let all_nodes = Ipv6Address::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let ip = Ipv6Repr {
        src_addr: router,
        dst_addr: all_nodes,
        next_header: IpProtocol::Icmpv6,
        payload_len: advert.buffer_len(),
        hop_limit: 255,
    };
    let mut frame = peer_frame(ip, |payload| {
        advert.emit(
            &router,
            &all_nodes,
            &mut Icmpv6Packet::new_unchecked(payload),
            &smoltcp::phy::ChecksumCapabilities::default(),
        );
    });
    frame[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    b.bed.peer_dev.peer().send(frame);
    let expected = Ipv6Address::new(0xfd42, 0, 0, 0, 0, 0xff, 0xfe00, 1);
    let configured = b.bed.run_until(2_000, |bed| {
        bed.stack
            .ipv6_addresses()
            .contains(&Ipv6Cidr::new(expected, 64))
    });
    assert!(
        configured,
        "SLAAC address: {:?}",
        b.bed.stack.ipv6_addresses()
    );
    b.bed.peer_iface.update_ip_addrs(|a| {
        a.push(IpCidr::Ipv6(Ipv6Cidr::new(
            Ipv6Address::new(0xfd42, 0, 0, 0, 0, 0, 0, 2),
            64,
        )))
        .unwrap();
    });
    let from = Ipv6Address::new(0xfd42, 0, 0, 0, 0, 0, 0, 2);
    download(&mut b, expected, from, 1 << 20);
}
