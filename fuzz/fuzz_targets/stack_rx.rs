//! Received frames into a whole `netstack::Stack` (smoltcp included) on the software NIC:
//! arbitrary Ethernet frames, and TCP segments the harness builds with valid checksums (so
//! they get past the checksum check into the TCP state machine) whose flags, sequence and
//! acknowledgement numbers (relative to what the stack sent, or arbitrary), window, options
//! and payload come from the input, interleaved with time passing and the application's
//! calls (send, send_file from pinned page-cache pages, recv, close, abort). Checks: no panic,
//! no `poll` error, every frame the stack sends parses as Ethernet, no placeholder byte on the
//! wire, and once every connection is aborted and time has passed, no page pin is left.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use driver::dma::DmaAccess;
use driver::NetQueue;
use libfuzzer_sys::fuzz_target;
use netstack::{ConnId, Duration, Event, Instant, Ipv4Config, SendMode, Stack, StackConfig};
use pagecache::{CacheConfig, FrameArena, OpenOptions, PageCache};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Address,
    Ipv4Packet, TcpPacket, TcpSeqNumber,
};
use softnic::{SoftNic, SoftNicConfig};

const STACK_IP: [u8; 4] = [10, 0, 0, 1];
const PEER_IP: [u8; 4] = [10, 0, 0, 2];
const STACK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const PORT: u16 = 80;
const FILE_LEN: usize = 40_000;

#[derive(Arbitrary, Debug)]
enum Seq {
    /// What the stack expects next (its last ACK), plus a delta.
    Expected(i16),
    Absolute(u32),
}

#[derive(Arbitrary, Debug)]
enum Ack {
    /// Everything the stack sent so far, minus a delta.
    AllSent(u16),
    /// The stack's highest sequence number sent plus a delta (acknowledges unsent data).
    Beyond(u16),
    Absolute(u32),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Raw(Vec<u8>),
    Tcp {
        /// One of a few client ports (several connections).
        port: u8,
        syn: bool,
        ack_flag: bool,
        fin: bool,
        rst: bool,
        psh: bool,
        urg: bool,
        seq: Seq,
        ack: Ack,
        window: u16,
        urgent: u16,
        options: Vec<u8>,
        payload: Vec<u8>,
        bad_checksum: bool,
    },
    Wait {
        ms: u16,
    },
    Send {
        conn: u8,
        len: u16,
    },
    SendFile {
        conn: u8,
        start: u16,
        len: u16,
    },
    Recv {
        conn: u8,
    },
    Close {
        conn: u8,
    },
    Abort {
        conn: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    copying: bool,
    ops: Vec<Op>,
}

/// What the harness knows of one client port's connection from the frames the stack sent.
#[derive(Clone, Copy, Default)]
struct Flow {
    /// The stack's sequence numbers: highest sent (end of the last segment).
    sent_max: Option<u32>,
    /// What the stack acknowledged last (the next byte it expects).
    expected: Option<u32>,
    /// Our own next sequence number (from the input's choices).
    next_seq: u32,
}

fn file_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("zs-fuzz-stack-{}", std::process::id()));
        let data: Vec<u8> = (0..FILE_LEN).map(|i| (i * 7 + 1) as u8 | 1).collect();
        std::fs::write(&path, data).unwrap();
        path
    })
}

fn tcp_frame(
    src_port: u16,
    seq: u32,
    ack: u32,
    flags: (bool, bool, bool, bool, bool, bool),
    window: u16,
    urgent: u16,
    options: &[u8],
    payload: &[u8],
    bad_checksum: bool,
) -> Vec<u8> {
    let options = &options[..options.len().min(40) / 4 * 4];
    let tcp_len = 20 + options.len() + payload.len();
    let mut f = vec![0u8; 14 + 20 + tcp_len];
    let mut eth = EthernetFrame::new_unchecked(&mut f[..]);
    eth.set_src_addr(EthernetAddress(PEER_MAC));
    eth.set_dst_addr(EthernetAddress(STACK_MAC));
    eth.set_ethertype(EthernetProtocol::Ipv4);
    let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
    ip.set_version(4);
    ip.set_header_len(20);
    ip.set_total_len((20 + tcp_len) as u16);
    ip.set_hop_limit(64);
    ip.set_dont_frag(true);
    ip.set_next_header(IpProtocol::Tcp);
    ip.set_src_addr(Ipv4Address::from(PEER_IP));
    ip.set_dst_addr(Ipv4Address::from(STACK_IP));
    ip.fill_checksum();
    let mut tcp = TcpPacket::new_unchecked(&mut f[34..]);
    tcp.set_src_port(src_port);
    tcp.set_dst_port(PORT);
    tcp.set_seq_number(TcpSeqNumber(seq as i32));
    tcp.set_ack_number(TcpSeqNumber(ack as i32));
    tcp.set_header_len((20 + options.len()) as u8);
    tcp.clear_flags();
    let (syn, ack_flag, fin, rst, psh, urg) = flags;
    tcp.set_syn(syn);
    tcp.set_ack(ack_flag);
    tcp.set_fin(fin);
    tcp.set_rst(rst);
    tcp.set_psh(psh);
    tcp.set_urg(urg);
    tcp.set_window_len(window);
    tcp.set_urgent_at(urgent);
    tcp.options_mut().copy_from_slice(options);
    tcp.payload_mut().copy_from_slice(payload);
    tcp.fill_checksum(
        &IpAddress::from(Ipv4Address::from(PEER_IP)),
        &IpAddress::from(Ipv4Address::from(STACK_IP)),
    );
    if bad_checksum {
        let c = tcp.checksum();
        tcp.set_checksum(c ^ 0x0101);
    }
    f
}

fuzz_target!(|input: Input| {
    let nic_config = SoftNicConfig {
        tx_descriptors: 256,
        rx_buffers: 32,
        ..SoftNicConfig::default()
    };
    let (nic, peer) = SoftNic::new(nic_config).unwrap();
    let frames = nic
        .dma()
        .allocate(64 * 4096, DmaAccess::DeviceReads)
        .unwrap();
    let cache = PageCache::new(
        FrameArena::from_shared(frames.memory().clone()).unwrap(),
        CacheConfig::default(),
    )
    .unwrap();
    let file = cache.open(file_path(), OpenOptions::read_only()).unwrap();
    let mut config = StackConfig::new(Ipv4Config::static_address(STACK_IP, 24, None));
    config.tcp_rx_buffer = 8 * 1024;
    config.tcp_tx_buffer = 64 * 1024;
    config.tx.slots = 64;
    config.tx.jumbo_buffers = 4;
    config.tx.copy_blocks = 32;
    config.tx.copy_blocks_per_conn = 8;
    config.send_mode = if input.copying {
        SendMode::Copying
    } else {
        SendMode::ZeroCopy
    };
    let mut stack = Stack::new(nic, config).unwrap();
    stack.listen(PORT).unwrap();
    let mut now = Instant::from_millis(1);
    let mut flows = [Flow::default(); 4];
    let mut conns: Vec<ConnId> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let data = vec![b'x'; 4096];

    let settle = |stack: &mut Stack<SoftNic>,
                  flows: &mut [Flow; 4],
                  conns: &mut Vec<ConnId>,
                  now: Instant| {
        stack.poll(now).unwrap();
        while let Some(event) = stack.next_event() {
            if let Event::Accepted { conn, .. } = event {
                conns.push(conn);
            }
        }
        while let Some(frame) = peer.recv() {
            let eth = EthernetFrame::new_checked(&frame[..]).expect("stack sent a runt frame");
            assert_eq!(eth.src_addr(), EthernetAddress(STACK_MAC));
            assert!(
                netstack::poison::find_poison(&frame).is_none(),
                "placeholder bytes reached the wire"
            );
            let Some(t) = netstack::frame::parse_tcp(&frame) else {
                continue;
            };
            let Some(flow) = flows
                .iter_mut()
                .enumerate()
                .find_map(|(i, f)| (t.dst_port == 40000 + i as u16).then_some(f))
            else {
                continue;
            };
            let tcp = TcpPacket::new_unchecked(&frame[t.tcp..]);
            let end = t
                .seq
                .wrapping_add(t.payload_len as u32 + t.syn as u32 + tcp.fin() as u32);
            let newer = flow
                .sent_max
                .is_none_or(|m| (end.wrapping_sub(m) as i32) > 0);
            if newer {
                flow.sent_max = Some(end);
            }
            if t.ack {
                flow.expected = Some(tcp.ack_number().0 as u32);
            }
        }
    };

    for op in input.ops.into_iter().take(128) {
        match op {
            Op::Raw(bytes) => peer.send(bytes),
            Op::Tcp {
                port,
                syn,
                ack_flag,
                fin,
                rst,
                psh,
                urg,
                seq,
                ack,
                window,
                urgent,
                options,
                payload,
                bad_checksum,
            } => {
                let i = port as usize % flows.len();
                let flow = &mut flows[i];
                let seq = match seq {
                    Seq::Expected(d) => flow
                        .expected
                        .unwrap_or(flow.next_seq)
                        .wrapping_add(d as i32 as u32),
                    Seq::Absolute(s) => s,
                };
                let ack = match ack {
                    Ack::AllSent(d) => flow.sent_max.unwrap_or(0).wrapping_sub(d as u32),
                    Ack::Beyond(d) => flow.sent_max.unwrap_or(0).wrapping_add(d as u32),
                    Ack::Absolute(a) => a,
                };
                let payload = &payload[..payload.len().min(1400)];
                flow.next_seq = seq.wrapping_add(payload.len() as u32 + syn as u32 + fin as u32);
                let frame = tcp_frame(
                    40000 + i as u16,
                    seq,
                    ack,
                    (syn, ack_flag, fin, rst, psh, urg),
                    window,
                    urgent,
                    &options,
                    payload,
                    bad_checksum,
                );
                peer.send(frame);
            }
            Op::Wait { ms } => now += Duration::from_millis(ms as u64),
            Op::Send { conn, len } => {
                if let Some(&c) = conns.get(conn as usize % conns.len().max(1)) {
                    let _ = stack.send(c, &data[..len as usize % data.len()]);
                }
            }
            Op::SendFile { conn, start, len } => {
                if let Some(&c) = conns.get(conn as usize % conns.len().max(1)) {
                    let start = start as u64 % FILE_LEN as u64;
                    let end = (start + len as u64).min(FILE_LEN as u64);
                    if let Ok(pin) = file.pin(start..end) {
                        let _ = stack.send_file(c, &pin, start..end);
                    }
                }
            }
            Op::Recv { conn } => {
                if let Some(&c) = conns.get(conn as usize % conns.len().max(1)) {
                    let _ = stack.recv(c, &mut buf);
                }
            }
            Op::Close { conn } => {
                if let Some(&c) = conns.get(conn as usize % conns.len().max(1)) {
                    let _ = stack.close(c);
                }
            }
            Op::Abort { conn } => {
                if let Some(&c) = conns.get(conn as usize % conns.len().max(1)) {
                    let _ = stack.abort(c);
                }
            }
        }
        settle(&mut stack, &mut flows, &mut conns, now);
        now += Duration::from_millis(1);
    }
    // Every connection aborted; once the NIC is idle no pin may be left.
    for &c in &conns {
        let _ = stack.abort(c);
    }
    for _ in 0..4 {
        now += Duration::from_secs(1);
        settle(&mut stack, &mut flows, &mut conns, now);
    }
    for &c in &conns {
        let _ = stack.abort(c);
    }
    for _ in 0..4 {
        now += Duration::from_secs(40);
        settle(&mut stack, &mut flows, &mut conns, now);
    }
    let stats = stack.stats();
    assert_eq!(stats.frames_in_flight_now, 0, "{stats:?}");
    assert_eq!(stats.pins_held_now, 0, "{stats:?}");
    assert_eq!(stats.tx_unmapped_drops, 0, "{stats:?}");
    let _ = stack.nic_mut().stats();
});
