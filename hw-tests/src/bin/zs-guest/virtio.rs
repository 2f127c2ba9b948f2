//! Guest-side programs for the virtio-net driver tests (hw-tests/tests/virtio.rs).
//!
//! Every frame these programs send is built from deterministic formulas that the host-side
//! tests repeat (`frame_len`, [`pattern`], ...), so the host can check the bytes that
//! arrived without being told what was sent.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Subcommand;
use driver::anynic::NicConfig;
use driver::dma::{DmaAccess, DmaRegion};
use driver::vfio::VfioPci;
use driver::virtio::{features, VirtioNet};
use driver::{L4Protocol, MacAddress, NetQueue, TxFrame, TxOffload, TxSegment};
use hw_tests::wire::{
    self, ethernet, ipv4_header, pseudo_sum, ETHERTYPE_IPV4, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK,
    TCP_PSH,
};

use super::{checksum_offload, tso_offload, TsoFields};

#[derive(Subcommand)]
pub enum VirtioCommand {
    /// Open the virtio-net device with the driver and print what was negotiated.
    #[command(name = "virtio-open")]
    Open {
        #[arg(long)]
        pci: Option<String>,
    },
    /// Send `frames` multi-segment frames (EtherType 0x88b5) and reap every token in order.
    #[command(name = "virtio-tx-multiseg")]
    TxMultiseg {
        #[arg(long)]
        pci: Option<String>,
        #[arg(long, default_value_t = 48)]
        frames: u32,
    },
    /// Wait for a "GO" datagram from the host (learning its MAC), then send UDP and TCP
    /// frames with checksum offload and one TSO frame, to 10.99.1.2 through the host.
    #[command(name = "virtio-offload")]
    Offload {
        #[arg(long)]
        pci: Option<String>,
        /// Payload bytes of the TSO frame.
        #[arg(long, default_value_t = 61440)]
        tso_bytes: u32,
        #[arg(long, default_value_t = 1448)]
        mss: u16,
    },
    /// Receive `count` UDP datagrams on port 9001 and check each one.
    #[command(name = "virtio-rx")]
    Rx {
        #[arg(long)]
        pci: Option<String>,
        #[arg(long, default_value_t = 200)]
        count: u32,
    },
    /// Send a good frame, a frame with a segment at an unmapped IOVA, and another good frame.
    #[command(name = "virtio-iommu-fault")]
    IommuFault {
        #[arg(long)]
        pci: Option<String>,
    },
}

pub fn run(command: VirtioCommand) -> Result<()> {
    match command {
        VirtioCommand::Open { pci } => open_and_report(pci.as_deref()),
        VirtioCommand::TxMultiseg { pci, frames } => tx_multiseg(pci.as_deref(), frames),
        VirtioCommand::Offload {
            pci,
            tso_bytes,
            mss,
        } => offload(pci.as_deref(), tso_bytes, mss),
        VirtioCommand::Rx { pci, count } => rx(pci.as_deref(), count),
        VirtioCommand::IommuFault { pci } => iommu_fault(pci.as_deref()),
    }
}

// ---------------------------------------------------------------------------------------
// Formulas shared with hw-tests/tests/virtio.rs (keep them identical).
// ---------------------------------------------------------------------------------------

/// EtherType of the multi-segment test frames (IEEE local experimental).
pub const TEST_ETHERTYPE: u16 = 0x88b5;
pub const GUEST_IP: [u8; 4] = [10, 99, 0, 2];
/// Behind the host: the host forwards to its second TAP device.
pub const FAR_IP: [u8; 4] = [10, 99, 1, 2];
pub const GO_PORT: u16 = 9000;
pub const RX_PORT: u16 = 9001;
pub const UDP_SRC_PORT: u16 = 5000;
pub const UDP_DST_PORT: u16 = 7000;
pub const TCP_SRC_PORT: u16 = 5001;
pub const TCP_DST_PORT: u16 = 7001;
pub const UDP_FRAMES: u32 = 12;
pub const TCP_FRAMES: u32 = 12;
pub const TSO_SEQ: u32 = 0x1000_0000;

/// Byte `i` of test payload `seed`.
pub fn pattern(seed: u32, i: usize) -> u8 {
    (seed as usize)
        .wrapping_mul(131)
        .wrapping_add(i.wrapping_mul(7))
        .wrapping_add(i >> 8) as u8
}

/// Length of multi-segment frame `k` (60..=1514).
pub fn multiseg_len(k: u32) -> usize {
    if k % 8 == 7 {
        1514
    } else {
        60 + (k as usize * 97) % 1455
    }
}

/// UDP payload length of offload frame `k` (also used for received datagram `k`).
pub fn udp_payload_len(k: u32) -> usize {
    if k.is_multiple_of(10) {
        1472
    } else {
        8 + (k as usize * 53) % 1464
    }
}

/// TCP payload length of (non-TSO) offload frame `k`.
pub fn tcp_payload_len(k: u32) -> usize {
    if k.is_multiple_of(6) {
        1460
    } else {
        1 + (k as usize * 211) % 1459
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Test configuration: the defaults, with a TX-hang timeout generous enough for a TCG guest
/// on a loaded machine.
fn config() -> NicConfig {
    NicConfig {
        tx_hang_timeout: Duration::from_secs(20),
        ..NicConfig::default()
    }
}

fn open(pci: Option<&str>, config: &NicConfig) -> Result<VirtioNet> {
    let (address, model) = super::find_nic(pci)?;
    ensure!(
        model == driver::NicModel::VirtioNet,
        "{address} is {model}, not virtio-net"
    );
    println!("NIC {address} {model}");
    let dev = VfioPci::open(&address).with_context(|| format!("opening {address}"))?;
    let config = &super::with_env_switches(config);
    let nic = VirtioNet::open(dev, config).context("initialising virtio-net")?;
    println!(
        "VIRTIO_OFFERED {:#018x} {}",
        nic.offered_features(),
        features::names(nic.offered_features()).join(",")
    );
    println!(
        "VIRTIO_NEGOTIATED {:#018x} {}",
        nic.negotiated_features(),
        features::names(nic.negotiated_features()).join(",")
    );
    println!("MAC {}", nic.mac_address());
    println!("CAPS {:?}", nic.capabilities());
    Ok(nic)
}

/// A bump allocator over one DMA region, placing pieces at odd offsets.
struct Arena {
    region: DmaRegion,
    used: usize,
}

impl Arena {
    fn new(nic: &VirtioNet, len: usize) -> Result<Arena> {
        Ok(Arena {
            region: nic.dma().allocate(len, DmaAccess::DeviceReads)?,
            used: 0,
        })
    }
    /// Copy `bytes` in (at `skew` bytes past the next 8-byte boundary); its segment.
    fn put(&mut self, bytes: &[u8], skew: usize) -> Result<TxSegment> {
        let at = self.used.div_ceil(8) * 8 + skew;
        ensure!(at + bytes.len() <= self.region.len(), "arena full");
        self.region.write_bytes(at, bytes);
        self.used = at + bytes.len();
        Ok(TxSegment {
            iova: self.region.iova() + at as u64,
            len: bytes.len() as u32,
        })
    }
}

/// Flush, then reap until `expected` tokens came back; checks they come in order.
fn reap_all(
    nic: &mut VirtioNet,
    next_expected: &mut u64,
    upto: u64,
    deadline: Instant,
) -> Result<()> {
    nic.tx_flush();
    while *next_expected < upto {
        let mut out_of_order = None;
        nic.tx_reap(&mut |t| {
            if t != *next_expected && out_of_order.is_none() {
                out_of_order = Some((t, *next_expected));
            }
            *next_expected += 1;
        })?;
        if let Some((got, want)) = out_of_order {
            bail!("token {got} came back where {want} was expected");
        }
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for TX completions ({} of {upto})",
                *next_expected
            );
        }
        std::hint::spin_loop();
    }
    Ok(())
}

/// Receive until `f` returns Some, recycling everything; None at the deadline.
fn receive_until<T>(
    nic: &mut VirtioNet,
    deadline: Instant,
    mut f: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    loop {
        let mut found = None;
        nic.rx_poll(32, &mut |frame| {
            if found.is_none() {
                found = f(frame);
            }
        });
        if found.is_some() {
            return found;
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A UDP datagram in `frame` for `port`: (source MAC, source IP, payload), checksum verified.
fn parse_udp(frame: &[u8], port: u16) -> Option<(MacAddress, [u8; 4], Vec<u8>, bool)> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[14] != 0x45 || frame[23] != 17 {
        return None;
    }
    let total = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let udp = &frame[34..(14 + total).min(frame.len())];
    if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != port {
        return None;
    }
    let src: [u8; 4] = frame[26..30].try_into().unwrap();
    let dst: [u8; 4] = frame[30..34].try_into().unwrap();
    let ulen = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if ulen > udp.len() || ulen < 8 {
        return None;
    }
    let udp = &udp[..ulen];
    let stored = u16::from_be_bytes([udp[6], udp[7]]);
    // A zero UDP checksum means "none sent".
    let ok = stored == 0 || wire::l4_checksum_verifies(src, dst, IPPROTO_UDP, udp);
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[6..12]);
    Some((MacAddress(mac), src, udp[8..].to_vec(), ok))
}

// ---------------------------------------------------------------------------------------
// Programs
// ---------------------------------------------------------------------------------------

fn open_and_report(pci: Option<&str>) -> Result<()> {
    let mut nic = open(pci, &config())?;
    println!("LINK_UP {}", nic.link_up());
    println!("DEVICE_STATUS {:#04x}", nic.device_status());
    println!("VIRTIO_OPEN_OK");
    Ok(())
}

fn tx_multiseg(pci: Option<&str>, frames: u32) -> Result<()> {
    let mut nic = open(pci, &config())?;
    let mac = nic.mac_address();
    let mut headers = Arena::new(&nic, 64 * 1024)?;
    let mut payload_a = Arena::new(&nic, 512 * 1024)?;
    let mut payload_b = Arena::new(&nic, 512 * 1024)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut next_expected = 0u64;
    let mut segments_total = 0;
    for k in 0..frames {
        let len = multiseg_len(k);
        let mut frame = Vec::with_capacity(len);
        frame.extend_from_slice(&ethernet([0xff; 6], mac.0, TEST_ETHERTYPE));
        frame.extend_from_slice(&(k as u16).to_be_bytes());
        while frame.len() < len {
            frame.push(pattern(k, frame.len()));
        }
        // 1 to 6 segments: a header piece, then the rest cut at frame-dependent points,
        // alternating between two regions at odd offsets.
        let pieces = 1 + (k as usize % 6);
        let mut cuts = vec![0, 16.min(len)];
        for p in 1..pieces {
            let at = 16 + (len - 16) * p / pieces + (k as usize % 5);
            if at > *cuts.last().unwrap() && at < len {
                cuts.push(at);
            }
        }
        if *cuts.last().unwrap() != len {
            cuts.push(len);
        }
        let mut segments = Vec::new();
        for (i, w) in cuts.windows(2).enumerate() {
            let bytes = &frame[w[0]..w[1]];
            let seg = match i {
                0 => headers.put(bytes, 1 + k as usize % 7)?,
                i if i % 2 == 1 => payload_a.put(bytes, k as usize % 3)?,
                _ => payload_b.put(bytes, 5)?,
            };
            segments.push(seg);
        }
        segments_total += segments.len();
        while nic.tx_capacity(segments.len()) == 0 {
            let upto = next_expected + 1;
            reap_all(&mut nic, &mut next_expected, upto, deadline)?;
        }
        nic.tx_enqueue(TxFrame::new(&segments, &TxOffload::default(), k as u64))?;
        if k % 8 == 7 {
            nic.tx_flush();
        }
    }
    reap_all(&mut nic, &mut next_expected, frames as u64, deadline)?;
    let stats = nic.stats();
    println!("TX_FRAMES {frames} segments={segments_total}");
    println!("TX_TOKENS_IN_ORDER yes");
    println!("STATS {stats:?}");
    println!("MULTISEG_OK");
    Ok(())
}

fn offload(pci: Option<&str>, tso_bytes: u32, mss: u16) -> Result<()> {
    let mut nic = open(pci, &config())?;
    let caps = nic.capabilities();
    ensure!(
        caps.tcp_checksum && caps.udp_checksum,
        "checksum offload not negotiated: {caps:?}"
    );
    ensure!(caps.tso_max_frame.is_some(), "TSO not negotiated: {caps:?}");
    let mac = nic.mac_address();
    println!("RX_READY");
    // The host sends "GO" to port 9000 until we say we got it; its source MAC is the
    // next hop for everything we send.
    let deadline = Instant::now() + Duration::from_secs(180);
    let (host_mac, go_ok) = receive_until(&mut nic, deadline, |frame| {
        parse_udp(frame, GO_PORT)
            .filter(|(_, _, p, _)| p == b"GO")
            .map(|(m, _, _, ok)| (m, ok))
    })
    .context("no GO datagram from the host")?;
    ensure!(go_ok, "the GO datagram's UDP checksum is wrong");
    println!("GOT_GO host_mac={host_mac}");

    let mut headers = Arena::new(&nic, 64 * 1024)?;
    let mut payloads = Arena::new(&nic, 256 * 1024)?;
    let mut token = 0u64;
    let mut reaped = 0u64;
    let eth = ethernet(host_mac.0, mac.0, ETHERTYPE_IPV4);

    // UDP with L4 checksum offload; the IPv4 header checksum offloaded too where the device
    // offers it (virtio-net does not: then it is computed here).
    let ip_offload = caps.ipv4_header_checksum;
    for k in 0..UDP_FRAMES {
        let plen = udp_payload_len(k);
        let ulen = (8 + plen) as u16;
        let mut h = Vec::new();
        h.extend_from_slice(&eth);
        h.extend_from_slice(&ipv4_header(
            20 + ulen,
            0x100 + k as u16,
            IPPROTO_UDP,
            GUEST_IP,
            FAR_IP,
            !ip_offload,
        ));
        h.extend_from_slice(&wire::udp_header(
            UDP_SRC_PORT,
            UDP_DST_PORT,
            ulen,
            pseudo_sum(GUEST_IP, FAR_IP, IPPROTO_UDP, ulen),
        ));
        let payload: Vec<u8> = (0..plen).map(|i| pattern(1000 + k, i)).collect();
        let mut segs = vec![headers.put(&h, 0)?];
        let cut = plen / 3;
        segs.push(payloads.put(&payload[..cut.max(1)], 3)?);
        if cut.max(1) < plen {
            segs.push(payloads.put(&payload[cut.max(1)..], 0)?);
        }
        let offload = checksum_offload(L4Protocol::Udp, ip_offload);
        nic.tx_enqueue(TxFrame::new(&segs, &offload, token))?;
        token += 1;
    }
    reap_all(&mut nic, &mut reaped, token, deadline)?;
    println!("UDP_SENT {UDP_FRAMES}");

    // TCP with L4 checksum offload; the IPv4 header checksum computed here.
    for k in 0..TCP_FRAMES {
        let plen = tcp_payload_len(k);
        let tcp_len = (20 + plen) as u16;
        let seq = 0x2000_0000u32.wrapping_add(k * 100_000);
        let h = tcp_headers(
            &eth,
            20 + tcp_len,
            0x200 + k as u16,
            seq,
            TCP_PSH | TCP_ACK,
            true,
            pseudo_sum(GUEST_IP, FAR_IP, IPPROTO_TCP, tcp_len),
        );
        let payload: Vec<u8> = (0..plen).map(|i| pattern(2000 + k, i)).collect();
        let segs = [headers.put(&h, 0)?, payloads.put(&payload, 1)?];
        let offload = checksum_offload(L4Protocol::Tcp, false);
        nic.tx_enqueue(TxFrame::new(&segs, &offload, token))?;
        token += 1;
    }
    reap_all(&mut nic, &mut reaped, token, deadline)?;
    println!("TCP_SENT {TCP_FRAMES}");

    // One TSO frame: 54 bytes of headers, payload in page-sized segments (as from a page
    // cache), the headers prepared as the device's TSO convention says (virtio-net:
    // TsoHeaders::WholePacket, headers of the whole large packet).
    let payload: Vec<u8> = (0..tso_bytes as usize).map(|i| pattern(3000, i)).collect();
    let fields = TsoFields::new(caps.tso_headers, 20 + payload.len())?;
    let h = tcp_headers(
        &eth,
        fields.ip_total,
        0x300,
        TSO_SEQ,
        TCP_PSH | TCP_ACK,
        fields.ip_checksum,
        pseudo_sum(GUEST_IP, FAR_IP, IPPROTO_TCP, fields.pseudo_len),
    );
    let pages = nic
        .dma()
        .allocate(payload.len().div_ceil(4096) * 4096, DmaAccess::DeviceReads)?;
    pages.write_bytes(0, &payload);
    let mut segs = vec![headers.put(&h, 0)?];
    for (i, chunk) in payload.chunks(4096).enumerate() {
        segs.push(TxSegment {
            iova: pages.iova() + (i * 4096) as u64,
            len: chunk.len() as u32,
        });
    }
    nic.tx_enqueue(TxFrame::new(&segs, &tso_offload(&caps, mss), token))?;
    token += 1;
    reap_all(&mut nic, &mut reaped, token, deadline)?;
    println!(
        "TSO_SENT bytes={tso_bytes} mss={mss} segments={} headers={:?}",
        segs.len(),
        caps.tso_headers
    );
    println!("STATS {:?}", nic.stats());
    println!("OFFLOAD_OK");
    Ok(())
}

/// Ethernet + IPv4 + 20-byte TCP header with `checksum_field` in the TCP checksum.
fn tcp_headers(
    eth: &[u8; 14],
    ip_total: u16,
    id: u16,
    seq: u32,
    flags: u8,
    ip_csum: bool,
    checksum_field: u16,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(54);
    h.extend_from_slice(eth);
    h.extend_from_slice(&ipv4_header(
        ip_total,
        id,
        IPPROTO_TCP,
        GUEST_IP,
        FAR_IP,
        ip_csum,
    ));
    h.extend_from_slice(&wire::tcp_header(
        TCP_SRC_PORT,
        TCP_DST_PORT,
        seq,
        1,
        flags,
        checksum_field,
    ));
    h
}

fn rx(pci: Option<&str>, count: u32) -> Result<()> {
    let mut nic = open(pci, &config())?;
    println!("RX_READY");
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = vec![false; count as usize];
    let (mut good, mut bad, mut other, mut bytes) = (0u32, 0u32, 0u32, 0u64);
    while good < count && Instant::now() < deadline {
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let n = nic.rx_poll(64, &mut |f| frames.push(f.to_vec()));
        if n == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for frame in frames {
            let Some((_, _, payload, csum_ok)) = parse_udp(&frame, RX_PORT) else {
                other += 1;
                continue;
            };
            let ok = csum_ok && payload.len() >= 4 && {
                let k = u32::from_be_bytes(payload[..4].try_into().unwrap());
                k < count
                    && payload.len() == udp_payload_len(k)
                    && payload[4..]
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == pattern(4000 + k, i + 4))
                    && !std::mem::replace(&mut seen[k as usize], true)
            };
            if ok {
                good += 1;
                bytes += frame.len() as u64;
            } else {
                bad += 1;
            }
        }
    }
    println!("RX_RESULT good={good} bad={bad} other={other} bytes={bytes}");
    println!("STATS {:?}", nic.stats());
    ensure!(good == count, "received {good} of {count} datagrams intact");
    ensure!(bad == 0, "{bad} datagrams were corrupt or duplicated");
    println!("RX_OK {good}");
    Ok(())
}

fn iommu_fault(pci: Option<&str>) -> Result<()> {
    let mut nic = open(pci, &config())?;
    let mac = nic.mac_address();
    let mut arena = Arena::new(&nic, 64 * 1024)?;
    let make = |marker: &[u8]| {
        let mut f = ethernet([0xff; 6], mac.0, TEST_ETHERTYPE).to_vec();
        f.extend_from_slice(marker);
        while f.len() < 200 {
            f.push(pattern(77, f.len()));
        }
        f
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut next = 0u64;

    // A: good.
    let a = make(b"GOOD-A");
    let a_segs = [arena.put(&a[..30], 0)?, arena.put(&a[30..], 0)?];
    nic.tx_enqueue(TxFrame::new(&a_segs, &TxOffload::default(), 0))?;
    reap_all(&mut nic, &mut next, 1, deadline)?;
    println!("SENT_A");

    // B1, B2: header fine, payload at IOVAs that were mapped (holding a secret) and have
    // been unmapped; B1 with one such segment, B2 with two. The device must not be able to
    // read the secret through a stale mapping.
    let secret: Vec<u8> = b"SECRET!!".iter().copied().cycle().take(4096).collect();
    let gone = [
        nic.dma().allocate(4096, DmaAccess::DeviceReads)?,
        nic.dma().allocate(4096, DmaAccess::DeviceReads)?,
    ];
    for g in &gone {
        g.write_bytes(0, &secret);
    }
    let unmapped: Vec<u64> = gone.iter().map(|g| g.iova()).collect();
    drop(gone); // unmapped from the IOMMU now
    let canary: Vec<u64> = (0..arena.used / 8)
        .map(|i| arena.region.read_volatile::<u64>(i * 8))
        .collect();
    let b1 = make(b"BAD-B1");
    let b2 = make(b"BAD-B2");
    let cases: [(&str, Vec<TxSegment>); 2] = [
        (
            "B1",
            vec![
                arena.put(&b1[..30], 0)?,
                TxSegment {
                    iova: unmapped[0] + 0x100,
                    len: 170,
                },
            ],
        ),
        (
            "B2",
            vec![
                arena.put(&b2[..30], 0)?,
                TxSegment {
                    iova: unmapped[1] + 0x100,
                    len: 100,
                },
                TxSegment {
                    iova: unmapped[1] + 0x800,
                    len: 70,
                },
            ],
        ),
    ];
    let canary_len = canary.len();
    for (token, (name, segs)) in (1u64..).zip(cases) {
        nic.tx_enqueue(TxFrame::new(&segs, &TxOffload::default(), token))?;
        nic.tx_flush();
        println!("SENT_{name} unmapped_iova={:#x}", segs[1].iova & !0xfff);
        // A device may report the failed read (DEVICE_NEEDS_RESET: the driver resets it and
        // tx_reap returns the error after handing back the token) or complete the frame with
        // whatever its DMA engine substituted for the refused bytes.
        let mut returned = Vec::new();
        let outcome = loop {
            match nic.tx_reap(&mut |t| returned.push(t)) {
                Err(e) => break format!("error: {e}"),
                Ok(_) if !returned.is_empty() => break "completed".to_string(),
                Ok(_) => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "frame {name} neither completed nor failed (status {:#04x})",
                    nic.device_status()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        println!("{name}_OUTCOME {outcome}");
        ensure!(
            returned == [token],
            "expected token {token} back, got {returned:?}"
        );
        println!("DEVICE_STATUS_AFTER_{name} {:#04x}", nic.device_status());
    }
    let after: Vec<u64> = (0..canary_len)
        .map(|i| arena.region.read_volatile::<u64>(i * 8))
        .collect();
    ensure!(after == canary, "driver-side memory changed");

    // C: good again, after the driver reset the device.
    let c = make(b"GOOD-C");
    let c_segs = [arena.put(&c[..30], 0)?, arena.put(&c[30..], 0)?];
    let mut next = 3u64;
    nic.tx_enqueue(TxFrame::new(&c_segs, &TxOffload::default(), 3))?;
    reap_all(&mut nic, &mut next, 4, deadline)?;
    println!("SENT_C");
    println!("STATS {:?}", nic.stats());
    println!("IOMMU_FAULT_OK");
    Ok(())
}
