//! NIC tests and the TX benchmark, run inside the guest.
//!
//! Written only against [`NetQueue`] and [`open_nic`], so every subcommand runs unchanged on
//! any NIC model. Results are `KEY value` lines the host-side tests (`hw-tests/tests/nic.rs`)
//! parse and compare with the QEMU pcap or with what the host sent.
//!
//! Addresses: on QEMU's user network the guest is 10.0.2.15 and the gateway 10.0.2.2
//! (52:55:0a:00:02:02); on the TAP network the guest is 10.99.0.2 and the host 10.99.0.1.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use driver::anynic::{open_nic, AnyNic, FaultInjection, NicConfig};
use driver::dma::{DmaAccess, DmaRegion};
use driver::{
    DriverError, L4Protocol, NetQueue, TsoHeaders, TxFrame, TxOffload, TxSegment, TxToken,
};
use hw_tests::wire::{
    self, ethernet, fnv64, fold, ipv4_header, pseudo_sum, sum16, Ipv4Frame, ETHERTYPE_IPV4,
    IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_PSH,
};

use super::{checksum_offload, tso_offload, TsoFields};

#[derive(Subcommand)]
pub enum NicCommand {
    /// Send frames built from many small DMA segments (no offloads).
    #[command(name = "nic-tx-chain")]
    TxChain {
        #[arg(long, default_value_t = 12)]
        frames: u32,
    },
    /// Send UDP and TCP frames with checksum offload, with and without the pseudo-header sum.
    #[command(name = "nic-csum")]
    Csum,
    /// Send one large TCP frame with TCP segmentation offload.
    #[command(name = "nic-tso")]
    Tso {
        #[arg(long, default_value_t = 61440)]
        payload: usize,
        #[arg(long, default_value_t = 1460)]
        mss: u16,
    },
    /// Receive UDP datagrams from the host (TAP network); answers ARP for 10.99.0.2.
    #[command(name = "nic-rx")]
    Rx {
        #[arg(long, default_value_t = 16)]
        count: u32,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Post a TX segment at an unmapped IOVA (the IOMMU refuses the read), then run with a
    /// read-only TX ring (the IOMMU refuses the completion write-back; the watchdog fires).
    #[command(name = "nic-iommu-tx")]
    IommuTx,
    /// Receive into buffers the device may only read; expect every frame to be refused.
    #[command(name = "nic-iommu-rx")]
    IommuRx {
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Arm a run-time fault (`driver::faults`) that strikes after `--after` frames, keep
    /// frames flowing, and check that the driver recovers: every token back exactly once and
    /// in order, one recovered error (`TxHang` or `DeviceReset`) naming the frames it
    /// dropped, then frames completing normally again. Prints one `FAULT_RESULT` line (or
    /// `INJECT_REFUSED` where the device cannot produce the fault).
    #[cfg(feature = "fault-injection")]
    #[command(name = "nic-fault")]
    Fault {
        /// `tx-hang` or `device-error`.
        #[arg(long)]
        fault: String,
        #[arg(long, default_value_t = 24)]
        after: u64,
        #[arg(long, default_value_t = 96)]
        frames: u64,
    },
    /// TX benchmark: `--kind 64`, `1514` or `tso` (64 KiB TCP frames).
    #[command(name = "nic-bench")]
    Bench {
        #[arg(long)]
        kind: String,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 512)]
        ring: u16,
    },
}

pub fn run(cmd: NicCommand) -> Result<()> {
    match cmd {
        NicCommand::TxChain { frames } => tx_chain(frames),
        NicCommand::Csum => csum(),
        NicCommand::Tso { payload, mss } => tso(payload, mss),
        NicCommand::Rx {
            count,
            timeout_secs,
        } => rx(count, Duration::from_secs(timeout_secs)),
        NicCommand::IommuTx => iommu_tx(),
        NicCommand::IommuRx { timeout_secs } => iommu_rx(Duration::from_secs(timeout_secs)),
        #[cfg(feature = "fault-injection")]
        NicCommand::Fault {
            fault,
            after,
            frames,
        } => inject_fault(&fault, after, frames),
        NicCommand::Bench {
            kind,
            seconds,
            ring,
        } => bench(&kind, seconds, ring),
    }
}

// ---------------------------------------------------------------------------------------
// Frame building (mirrored by the host test's checker)
// ---------------------------------------------------------------------------------------

pub const USER_GUEST_IP: [u8; 4] = [10, 0, 2, 15];
pub const USER_GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];
pub const USER_GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
pub const TAP_GUEST_IP: [u8; 4] = [10, 99, 0, 2];
pub const RX_PORT: u16 = 7777;

/// Payload byte `j` of segment `k` of frame `i` in the chain test (the host has a copy).
pub fn chain_byte(i: u32, k: usize, j: usize) -> u8 {
    (i as usize * 37 + k * 101 + j * 7 + (j >> 8)) as u8
}

/// Byte `j` of the TSO payload (the host has a copy).
pub fn tso_byte(j: usize) -> u8 {
    (j * 7 + (j >> 8) * 3 + 1) as u8
}

/// A frame whose pieces live in separate read-only DMA regions.
struct Chain {
    _regions: Vec<DmaRegion>,
    segments: Vec<TxSegment>,
    bytes: Vec<u8>,
}

impl Chain {
    fn new() -> Self {
        Chain {
            _regions: Vec::new(),
            segments: Vec::new(),
            bytes: Vec::new(),
        }
    }

    /// Put `data` at `offset` of a fresh read-only region of `region_len` bytes.
    fn push(&mut self, nic: &AnyNic, data: &[u8], offset: usize, region_len: usize) -> Result<()> {
        let r = nic
            .dma()
            .allocate(region_len.max(offset + data.len()), DmaAccess::DeviceReads)?;
        r.write_bytes(offset, data);
        self.segments.push(TxSegment {
            iova: r.iova() + offset as u64,
            len: data.len() as u32,
        });
        self.bytes.extend_from_slice(data);
        self._regions.push(r);
        Ok(())
    }
}

fn open(config: &NicConfig) -> Result<AnyNic> {
    let (address, model) = super::find_nic(None)?;
    println!("NIC {address} {model}");
    let config = &super::with_env_switches(config);
    let mut nic = open_nic(&address, config).with_context(|| format!("opening {address}"))?;
    println!("MAC {}", nic.mac_address());
    println!("LINK {}", if nic.link_up() { "up" } else { "down" });
    Ok(nic)
}

/// Recycle whatever arrived (QEMU's user network answers our UDP with ICMP).
fn drain_rx(nic: &mut AnyNic) {
    nic.rx_poll(usize::MAX, &mut |_| {});
}

/// Enqueue, ring the doorbell and wait for the completion of `token`.
fn send_and_wait(
    nic: &mut AnyNic,
    chain: &Chain,
    offload: &TxOffload,
    token: TxToken,
) -> Result<()> {
    nic.tx_enqueue(TxFrame::new(&chain.segments, offload, token))?;
    nic.tx_flush();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut got = false;
        nic.tx_reap(&mut |t| got |= t == token)?;
        drain_rx(nic);
        if got {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("frame {token} not completed within 60 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn print_stats(nic: &mut AnyNic) {
    let s = nic.stats();
    println!(
        "STATS tx_frames={} tx_bytes={} rx_frames={} rx_bytes={} rx_missed={} rx_errors={} tx_errors={} watchdog_resets={} doorbells={}",
        s.tx_frames, s.tx_bytes, s.rx_frames, s.rx_bytes, s.rx_missed, s.rx_errors, s.tx_errors, s.watchdog_resets, s.doorbells
    );
}

/// Ethernet + IPv4 + UDP header (42 bytes) from the user-network guest to the gateway; both
/// checksums computed here when `full_csum`, else left zero.
fn udp_headers(
    src_mac: [u8; 6],
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
    id: u16,
    full_csum: bool,
) -> Vec<u8> {
    let udp_len = 8 + payload.len() as u16;
    let mut f = ethernet(USER_GATEWAY_MAC, src_mac, ETHERTYPE_IPV4).to_vec();
    f.extend_from_slice(&ipv4_header(
        20 + udp_len,
        id,
        IPPROTO_UDP,
        USER_GUEST_IP,
        USER_GATEWAY_IP,
        full_csum,
    ));
    let csum = if full_csum {
        let ps = pseudo_sum(USER_GUEST_IP, USER_GATEWAY_IP, IPPROTO_UDP, udp_len);
        let header = wire::udp_header(src_port, dst_port, udp_len, 0);
        // A computed 0 goes out as 0xffff: a zero UDP checksum means "none".
        match !fold(sum16(payload, sum16(&header, ps as u64))) {
            0 => 0xffff,
            c => c,
        }
    } else {
        0
    };
    f.extend_from_slice(&wire::udp_header(src_port, dst_port, udp_len, csum));
    f
}

/// Ethernet + IPv4 + TCP header (54 bytes) of a TSO frame carrying `payload_len` bytes, from
/// the user-network guest to the gateway, prepared as the device's TSO convention says
/// ([`TsoFields`]).
fn tso_headers(
    convention: TsoHeaders,
    src_mac: [u8; 6],
    payload_len: usize,
    id: u16,
    tcp_flags: u8,
) -> Result<Vec<u8>> {
    let fields = TsoFields::new(convention, 20 + payload_len)?;
    let mut h = ethernet(USER_GATEWAY_MAC, src_mac, ETHERTYPE_IPV4).to_vec();
    h.extend_from_slice(&ipv4_header(
        fields.ip_total,
        id,
        IPPROTO_TCP,
        USER_GUEST_IP,
        USER_GATEWAY_IP,
        fields.ip_checksum,
    ));
    h.extend_from_slice(&wire::tcp_header(
        TSO_PORT,
        9,
        TSO_SEQ,
        0,
        tcp_flags,
        pseudo_sum(
            USER_GUEST_IP,
            USER_GATEWAY_IP,
            IPPROTO_TCP,
            fields.pseudo_len,
        ),
    ));
    Ok(h)
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

fn tx_chain(frames: u32) -> Result<()> {
    let mut nic = open(&NicConfig::default())?;
    let mac = nic.mac_address().0;
    for i in 0..frames {
        let nsegs = 1 + (i as usize % 6);
        let lens: Vec<usize> = (0..nsegs)
            .map(|k| 50 + (i as usize * 97 + k * 31) % 200)
            .collect();
        let payload: Vec<u8> = lens
            .iter()
            .enumerate()
            .flat_map(|(k, &l)| (0..l).map(move |j| chain_byte(i, k, j)))
            .collect();
        let header = udp_headers(mac, 41000 + i as u16, 9, &payload, i as u16, true);
        let mut chain = Chain::new();
        chain.push(&nic, &header, 3 + i as usize, 4096)?;
        for (k, &l) in lens.iter().enumerate() {
            let data: Vec<u8> = (0..l).map(|j| chain_byte(i, k, j)).collect();
            // Odd offsets; segment 1 straddles a 4 KiB page boundary.
            let offset = if k == 1 {
                4096 - 20
            } else {
                1 + (i as usize * 5 + k * 3) % 64
            };
            chain.push(&nic, &data, offset, 8192)?;
        }
        send_and_wait(&mut nic, &chain, &TxOffload::default(), i as u64)?;
        println!(
            "TX_FRAME {i} segments={} len={} fnv={:016x}",
            chain.segments.len(),
            chain.bytes.len(),
            fnv64(&chain.bytes)
        );
    }
    print_stats(&mut nic);
    println!("TX_CHAIN_OK {frames}");
    Ok(())
}

/// Source ports of the checksum test's frames, so the host can tell them apart.
pub const CSUM_UDP: u16 = 42001;
pub const CSUM_TCP: u16 = 42002;
pub const CSUM_UDP_NO_PSEUDO: u16 = 42003;
pub const CSUM_TCP_NO_PSEUDO: u16 = 42004;
pub const CSUM_SOFTWARE_WRONG: u16 = 42005;

fn csum() -> Result<()> {
    let mut nic = open(&NicConfig::default())?;
    let caps = nic.capabilities();
    println!(
        "CAPS ipv4={} tcp={} udp={} tso={:?}",
        caps.ipv4_header_checksum, caps.tcp_checksum, caps.udp_checksum, caps.tso_max_frame
    );
    let mac = nic.mac_address().0;
    let payload: Vec<u8> = (0..777).map(|j| chain_byte(99, 0, j)).collect();
    for (n, (port, tcp, pseudo)) in [
        (CSUM_UDP, false, true),
        (CSUM_TCP, true, true),
        (CSUM_UDP_NO_PSEUDO, false, false),
        (CSUM_TCP_NO_PSEUDO, true, false),
    ]
    .into_iter()
    .enumerate()
    {
        let (proto, l4_len) = if tcp {
            (IPPROTO_TCP, 20 + payload.len())
        } else {
            (IPPROTO_UDP, 8 + payload.len())
        };
        let mut h = ethernet(USER_GATEWAY_MAC, mac, ETHERTYPE_IPV4).to_vec();
        // The IPv4 checksum field left zero for the device to fill in, where it can.
        h.extend_from_slice(&ipv4_header(
            20 + l4_len as u16,
            100 + n as u16,
            proto,
            USER_GUEST_IP,
            USER_GATEWAY_IP,
            !caps.ipv4_header_checksum,
        ));
        let ps = if pseudo {
            pseudo_sum(USER_GUEST_IP, USER_GATEWAY_IP, proto, l4_len as u16)
        } else {
            0
        };
        if tcp {
            let flags = TCP_PSH | TCP_ACK;
            h.extend_from_slice(&wire::tcp_header(port, 9, 0x1000_0000, 0, flags, ps));
        } else {
            h.extend_from_slice(&wire::udp_header(port, 9, l4_len as u16, ps));
        }
        let protocol = if tcp {
            L4Protocol::Tcp
        } else {
            L4Protocol::Udp
        };
        let offload = checksum_offload(protocol, caps.ipv4_header_checksum);
        let mut chain = Chain::new();
        chain.push(&nic, &h, 0, 4096)?;
        chain.push(&nic, &payload[..300], 5, 4096)?;
        chain.push(&nic, &payload[300..], 4000, 8192)?;
        send_and_wait(&mut nic, &chain, &offload, n as u64)?;
        println!("CSUM_SENT port={port} tcp={tcp} pseudo={pseudo}");
    }
    // A frame without offload whose UDP checksum is deliberately wrong: the host's checker
    // must flag it, which shows the checker can fail.
    let mut f = udp_headers(mac, CSUM_SOFTWARE_WRONG, 9, &payload, 200, true);
    f[40] ^= 0x55;
    let mut chain = Chain::new();
    chain.push(&nic, &f, 0, 4096)?;
    chain.push(&nic, &payload, 0, 4096)?;
    send_and_wait(&mut nic, &chain, &TxOffload::default(), 9)?;
    println!("CSUM_SENT port={CSUM_SOFTWARE_WRONG} software-wrong");
    print_stats(&mut nic);
    println!("CSUM_OK yes");
    Ok(())
}

pub const TSO_PORT: u16 = 43001;
pub const TSO_SEQ: u32 = 0x0102_0304;

fn tso(payload_len: usize, mss: u16) -> Result<()> {
    let mut nic = open(&NicConfig::default())?;
    let Some(max) = nic.capabilities().tso_max_frame else {
        bail!("the NIC offers no TSO");
    };
    if payload_len + 54 > max as usize {
        bail!("{payload_len} bytes do not fit a TSO frame of at most {max}");
    }
    let mac = nic.mac_address().0;
    let caps = nic.capabilities();
    let h = tso_headers(
        caps.tso_headers,
        mac,
        payload_len,
        0x4000,
        TCP_PSH | TCP_ACK,
    )?;
    let payload: Vec<u8> = (0..payload_len).map(tso_byte).collect();
    let mut chain = Chain::new();
    chain.push(&nic, &h, 0, 4096)?;
    // Three payload segments in separate regions, at odd offsets.
    let cuts = [0, payload_len / 3, payload_len * 2 / 3, payload_len];
    for w in cuts.windows(2) {
        chain.push(&nic, &payload[w[0]..w[1]], 17, 4096)?;
    }
    send_and_wait(&mut nic, &chain, &tso_offload(&caps, mss), 1)?;
    println!(
        "TSO_SENT payload={payload_len} mss={mss} fnv={:016x}",
        fnv64(&payload)
    );
    print_stats(&mut nic);
    println!("TSO_OK yes");
    Ok(())
}

/// Parsed IPv4/UDP datagram addressed to the guest: (destination port, payload, whether
/// both checksums verify; a zero UDP checksum, "none", counts as verified).
fn parse_udp(frame: &[u8]) -> Option<(u16, &[u8], bool)> {
    let ip = Ipv4Frame::parse(frame)?;
    // Only option-less headers (what the host sends) with room for a UDP header.
    if frame[14] != 0x45 || ip.proto != IPPROTO_UDP || ip.ip.len() < 28 {
        return None;
    }
    let udp = ip.l4;
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if udp_len < 8 || udp_len > udp.len() {
        return None;
    }
    let udp_ok = udp[6..8] == [0, 0]
        || wire::l4_checksum_verifies(ip.src_ip(), ip.dst_ip(), IPPROTO_UDP, &udp[..udp_len]);
    Some((
        ip.dst_port(),
        &udp[8..udp_len],
        ip.ip_checksum_ok() && udp_ok,
    ))
}

/// An ARP reply for an ARP request asking for `ip`, if `frame` is one.
fn arp_reply(frame: &[u8], mac: [u8; 6], ip: [u8; 4]) -> Option<Vec<u8>> {
    if frame.len() < 42
        || frame[12..14] != [0x08, 0x06]
        || frame[20..22] != [0, 1]
        || frame[38..42] != ip
    {
        return None;
    }
    let mut r = ethernet(frame[22..28].try_into().unwrap(), mac, 0x0806).to_vec();
    r.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    r.extend_from_slice(&mac);
    r.extend_from_slice(&ip);
    r.extend_from_slice(&frame[22..32]); // requester's MAC and IP
    Some(r)
}

fn rx(count: u32, timeout: Duration) -> Result<()> {
    let mut nic = open(&NicConfig::default())?;
    let mac = nic.mac_address().0;
    let arp_buffer = nic.dma().allocate(4096, DmaAccess::DeviceReads)?;
    let mut seen = BTreeSet::new();
    let mut arp_replies = 0u64;
    let mut token = 0u64;
    let mut tx_busy = false;
    let mut frame = [0u8; driver::queue::MAX_RX_FRAME];
    println!("RX_READY");
    let deadline = Instant::now() + timeout;
    while (seen.len() as u32) < count {
        if Instant::now() > deadline {
            bail!(
                "received {} of {count} datagrams before the timeout",
                seen.len()
            );
        }
        let mut reply = None;
        let mut got = 0;
        while let Some(buf) = nic.rx_next() {
            got += 1;
            let data = nic.rx_read(&buf, &mut frame);
            if let Some(r) = arp_reply(data, mac, TAP_GUEST_IP) {
                reply = Some(r);
            } else if let Some((port, payload, csum_ok)) = parse_udp(data) {
                if port == RX_PORT && payload.len() >= 4 {
                    let idx = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    if seen.insert(idx) {
                        println!(
                            "RX_DGRAM {idx} len={} fnv={:016x} csum_ok={csum_ok} frame_len={}",
                            payload.len(),
                            fnv64(payload),
                            data.len()
                        );
                    }
                }
            }
            nic.rx_recycle(buf);
        }
        nic.rx_flush();
        if let Some(r) = reply {
            // One reply buffer: only reuse it once the previous reply completed.
            if !tx_busy {
                arp_buffer.write_bytes(0, &r);
                token += 1;
                let seg = TxSegment {
                    iova: arp_buffer.iova(),
                    len: r.len() as u32,
                };
                nic.tx_enqueue(TxFrame::new(&[seg], &TxOffload::default(), token))?;
                nic.tx_flush();
                tx_busy = true;
                arp_replies += 1;
            }
        }
        nic.tx_reap(&mut |_| tx_busy = false)?;
        if got == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    println!("ARP_REPLIES {arp_replies}");
    print_stats(&mut nic);
    println!("RX_DONE {}", seen.len());
    Ok(())
}

pub const IOMMU_BAD_PORT: u16 = 44001;
pub const IOMMU_RECOVER_PORT: u16 = 44002;
pub const IOMMU_RO_RING_PORT: u16 = 44003;

/// Wait for `token` to complete or for the watchdog to report a hang.
fn completion_or_hang(nic: &mut AnyNic, token: TxToken, what: &str) -> Result<()> {
    let started = Instant::now();
    let mut completed = false;
    loop {
        match nic.tx_reap(&mut |t| completed |= t == token) {
            Ok(_) if completed => {
                println!("{what}_COMPLETED after={:?}", started.elapsed());
                return Ok(());
            }
            Ok(_) => {}
            Err(DriverError::TxHang { ms, lost }) => {
                println!("{what}_HANG ms={ms} lost={lost} token_returned={completed}");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{what}: neither a completion nor a TX hang within 120 s");
        }
        drain_rx(nic);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A checksummed UDP frame to the gateway (port 9): headers and payload in two read-only
/// regions.
fn udp_chain(nic: &AnyNic, mac: [u8; 6], src_port: u16, payload: &[u8], id: u16) -> Result<Chain> {
    let mut chain = Chain::new();
    chain.push(
        nic,
        &udp_headers(mac, src_port, 9, payload, id, true),
        0,
        4096,
    )?;
    chain.push(nic, payload, 0, 4096)?;
    Ok(chain)
}

fn iommu_tx() -> Result<()> {
    // Part 1: a data segment at an IOVA with no IOMMU mapping.
    let mut nic = open(&NicConfig::default())?;
    let mac = nic.mac_address().0;
    let payload: Vec<u8> = (0..100).map(|j| chain_byte(7, 0, j)).collect();
    // Build the recovery frame first so its memory cannot reuse the unmapped IOVA.
    let recover = udp_chain(&nic, mac, IOMMU_RECOVER_PORT, &payload, 2)?;
    // A sentinel region the device may write: its contents must be unchanged at the end.
    let sentinel = nic.dma().allocate(4096, DmaAccess::DeviceReadsWrites)?;
    let pattern: Vec<u8> = (0..4096).map(|j| chain_byte(11, 1, j)).collect();
    sentinel.write_bytes(0, &pattern);

    let mut bad = Chain::new();
    bad.push(
        &nic,
        &udp_headers(mac, IOMMU_BAD_PORT, 9, &payload, 1, true),
        0,
        4096,
    )?;
    let gone = nic.dma().allocate(4096, DmaAccess::DeviceReads)?;
    // What the memory held while mapped: it must never reach the wire.
    gone.write_bytes(0, &payload);
    let unmapped = gone.iova();
    drop(gone); // unmapped from the IOMMU now
    bad.segments.push(TxSegment {
        iova: unmapped,
        len: payload.len() as u32,
    });
    println!("BAD_IOVA {unmapped:#x}");
    nic.tx_enqueue(TxFrame::new(&bad.segments, &TxOffload::default(), 1))?;
    nic.tx_flush();
    completion_or_hang(&mut nic, 1, "TX_UNMAPPED")?;
    send_and_wait(&mut nic, &recover, &TxOffload::default(), 2)?;
    println!("TX_RECOVERED ok");
    let mut back = vec![0u8; 4096];
    sentinel.read_bytes(0, &mut back);
    println!(
        "SENTINEL_INTACT {}",
        if back == pattern { "yes" } else { "no" }
    );
    print_stats(&mut nic);
    drop(recover);
    drop(bad);
    drop(sentinel);
    drop(nic);

    // Part 2: the descriptor ring is read-only for the device, so its completion
    // write-back is refused: nothing ever completes and the watchdog must say so.
    let config = NicConfig {
        fault_injection: FaultInjection::TxRingReadOnly,
        ..NicConfig::default()
    };
    let mut nic = open(&config)?;
    let frame = udp_chain(&nic, mac, IOMMU_RO_RING_PORT, &payload, 3)?;
    nic.tx_enqueue(TxFrame::new(&frame.segments, &TxOffload::default(), 3))?;
    nic.tx_flush();
    completion_or_hang(&mut nic, 3, "TX_RO_RING")?;
    print_stats(&mut nic);
    Ok(())
}

fn iommu_rx(timeout: Duration) -> Result<()> {
    let config = NicConfig {
        fault_injection: FaultInjection::RxBuffersReadOnly,
        ..NicConfig::default()
    };
    let mut nic = open(&config)?;
    println!("RX_READY");
    let deadline = Instant::now() + timeout;
    let mut delivered = 0u64;
    let mut errors = 0;
    while Instant::now() < deadline {
        delivered += nic.rx_poll(usize::MAX, &mut |_| {}) as u64;
        errors = nic.stats().rx_errors;
        if errors >= 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("RX_DELIVERED {delivered}");
    println!("RX_ERRORS {errors}");
    print_stats(&mut nic);
    if errors == 0 {
        bail!("no refused frame was seen");
    }
    Ok(())
}

/// UDP source port of `nic-fault`'s frames (tx-hang; device-error uses the next one).
#[cfg(feature = "fault-injection")]
pub const FAULT_PORT: u16 = 44004;

#[cfg(feature = "fault-injection")]
fn inject_fault(kind: &str, after: u64, frames: u64) -> Result<()> {
    use driver::faults::Fault;
    // Each fault's frames come from a port of their own, for the host's capture check.
    let (fault, port) = match kind {
        "tx-hang" => (Fault::TxHang, FAULT_PORT),
        "device-error" => (Fault::DeviceError, FAULT_PORT + 1),
        other => bail!("unknown fault {other:?} (tx-hang or device-error)"),
    };
    let mut nic = open(&NicConfig::default())?;
    let mac = nic.mac_address().0;
    let payload: Vec<u8> = (0..200).map(|j| chain_byte(9, 0, j)).collect();
    // One frame in read-only memory, sent under every token (the device only reads it).
    let frame = udp_chain(&nic, mac, port, &payload, 9)?;
    if let Err(e) = nic.inject_fault(fault, after) {
        println!("INJECT_REFUSED {e}");
        return Ok(());
    }
    println!("INJECT_ARMED {fault:?} after={after}");

    // Keep at most 16 frames outstanding, four per doorbell, so the fault finds frames in
    // flight whenever it strikes.
    let total = frames + 32;
    let mut returned: Vec<TxToken> = Vec::new();
    let mut errors = Vec::new();
    let mut returned_with_error = 0;
    let mut next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (returned.len() as u64) < total {
        if next == frames && returned.len() as u64 == frames && errors.is_empty() {
            bail!("all {frames} frames completed and no fault was reported");
        }
        // The last 32 frames go out only after the fault was recovered.
        let limit = if errors.is_empty() { frames } else { total };
        let mut queued = 0;
        while next < limit && queued < 4 && next - (returned.len() as u64) < 16 {
            nic.tx_enqueue(TxFrame::new(&frame.segments, &TxOffload::default(), next))?;
            next += 1;
            queued += 1;
        }
        if queued > 0 {
            nic.tx_flush();
        }
        let before = returned.len();
        match nic.tx_reap(&mut |t| returned.push(t)) {
            Ok(_) => {}
            Err(e) if e.is_recovered() => {
                println!("RECOVERED {e}");
                returned_with_error = returned.len() - before;
                errors.push(e);
            }
            Err(e) => return Err(e).context("tx_reap: an unrecovered error"),
        }
        drain_rx(&mut nic);
        if Instant::now() > deadline {
            bail!(
                "only {} of {total} tokens came back within 120 s ({} errors)",
                returned.len(),
                errors.len()
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let in_order = returned.iter().copied().eq(0..total);
    let (error, lost) = match errors.first() {
        Some(DriverError::TxHang { lost, .. }) => ("TxHang", *lost),
        Some(DriverError::DeviceReset { lost, .. }) => ("DeviceReset", *lost),
        _ => ("none", 0),
    };
    println!(
        "FAULT_RESULT kind={kind} struck={} errors={} error={error} lost={lost} returned_with_error={returned_with_error} tokens={} in_order={}",
        nic.faults_struck(),
        errors.len(),
        returned.len(),
        if in_order { "yes" } else { "no" }
    );
    print_stats(&mut nic);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Benchmark
// ---------------------------------------------------------------------------------------

fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a complete rusage into the valid, exclusively owned buffer.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn bench(kind: &str, seconds: f64, ring: u16) -> Result<()> {
    let config = NicConfig {
        tx_ring_size: ring,
        ..NicConfig::default()
    };
    let mut nic = open(&config)?;
    let mac = nic.mac_address().0;
    let caps = nic.capabilities();
    let (frame_len, offload, wire_segments) = match kind {
        "64" => (60usize, TxOffload::default(), 1u64),
        "1514" => (1514, TxOffload::default(), 1),
        "tso" => {
            let payload: usize = 65536 - 54;
            (
                65536,
                tso_offload(&caps, 1460),
                payload.div_ceil(1460) as u64,
            )
        }
        other => bail!("unknown benchmark kind {other:?} (64, 1514 or tso)"),
    };
    // One frame in read-only memory, sent over and over (the device only reads it).
    let mut chain = Chain::new();
    if kind == "tso" {
        let payload: Vec<u8> = (0..frame_len - 54).map(tso_byte).collect();
        let h = tso_headers(caps.tso_headers, mac, payload.len(), 1, TCP_ACK)?;
        chain.push(&nic, &h, 0, 4096)?;
        chain.push(&nic, &payload, 0, payload.len())?;
    } else {
        let payload: Vec<u8> = (0..frame_len - 42).map(|j| chain_byte(1, 0, j)).collect();
        let mut f = udp_headers(mac, 45000, 9, &payload, 1, true);
        f.extend_from_slice(&payload);
        chain.push(&nic, &f, 0, 4096)?;
    }
    let segs = chain.segments.len();
    let run = Duration::from_secs_f64(seconds);
    let cpu0 = cpu_time();
    let start = Instant::now();
    let (mut sent, mut done, mut hangs) = (0u64, 0u64, 0u64);
    while start.elapsed() < run {
        while nic.tx_capacity(segs) > 0 {
            match nic.tx_enqueue(TxFrame::new(&chain.segments, &offload, sent)) {
                Ok(()) => sent += 1,
                Err(DriverError::TxRingFull) => break,
                Err(e) => return Err(e.into()),
            }
        }
        nic.tx_flush();
        match nic.tx_reap(&mut |_| done += 1) {
            Ok(_) => {}
            Err(DriverError::TxHang { .. }) => hangs += 1,
            Err(e) => return Err(e.into()),
        }
        drain_rx(&mut nic);
    }
    // Drain what is still in flight.
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while done < sent && Instant::now() < drain_deadline {
        match nic.tx_reap(&mut |_| done += 1) {
            Ok(_) | Err(DriverError::TxHang { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    let bytes = done * frame_len as u64;
    println!(
        "BENCH kind={kind} frames={done} wire_frames={} bytes={bytes} secs={secs:.3} cpu_secs={cpu:.3} fps={:.0} gbps={:.4} cpu_us_per_frame={:.2} hangs={hangs}",
        done * wire_segments,
        done as f64 / secs,
        bytes as f64 * 8.0 / secs / 1e9,
        cpu * 1e6 / done.max(1) as f64,
    );
    print_stats(&mut nic);
    Ok(())
}
