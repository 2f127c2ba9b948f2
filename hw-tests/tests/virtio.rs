//! The virtio-net driver in a QEMU guest (`-device virtio-net-pci,disable-legacy=on,
//! iommu_platform=on` behind the emulated VT-d IOMMU), checked from the host:
//!
//! - feature negotiation, and the driver's refusal without `iommu_platform=on`;
//! - multi-segment TX, byte-exact in QEMU's capture of the netdev;
//! - RX of datagrams the host kernel sends;
//! - checksum offload and TSO, judged by a real consumer: the host kernel receives the frames
//!   on the TAP device (with the virtio-net header: partial checksums, one 60 KiB TCP frame),
//!   forwards them to a second TAP device that has no offloads, and so computes the checksums
//!   and cuts the MSS segments in software. This test reads that second TAP device: what it
//!   gets is what a wire would carry. A wrong `csum_start`/`csum_offset`, pseudo-header sum
//!   or GSO header shows up as bad checksums or missing/garbled segments;
//! - the IOMMU fault: a descriptor at an unmapped IOVA is refused by the IOMMU, nothing of
//!   that frame reaches the wire, the driver reports the device's DEVICE_NEEDS_RESET, resets
//!   and carries on.
//!
//! Frame contents come from formulas shared with `zs-guest` (src/bin/zs-guest/virtio.rs).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hw_tests::netns::{GUEST_IP, HOST_IP, TAP_NAME};
use hw_tests::wire::{mac_bytes, Ipv4Frame, TCP_PSH};
use hw_tests::{Guest, GuestRun, NetNs, Network, Nic, RunningGuest};

const TIMEOUT: Duration = Duration::from_secs(400);

// ---------------------------------------------------------------------------------------
// Formulas shared with zs-guest (src/bin/zs-guest/virtio.rs); keep them identical.
// ---------------------------------------------------------------------------------------

const TEST_ETHERTYPE: u16 = 0x88b5;
const GO_PORT: u16 = 9000;
const RX_PORT: u16 = 9001;
const UDP_DST_PORT: u16 = 7000;
const TCP_DST_PORT: u16 = 7001;
const UDP_FRAMES: u32 = 12;
const TCP_FRAMES: u32 = 12;
const TSO_SEQ: u32 = 0x1000_0000;
const TSO_BYTES: usize = 61440;
const MSS: usize = 1448;

fn pattern(seed: u32, i: usize) -> u8 {
    (seed as usize)
        .wrapping_mul(131)
        .wrapping_add(i.wrapping_mul(7))
        .wrapping_add(i >> 8) as u8
}

fn multiseg_len(k: u32) -> usize {
    if k % 8 == 7 {
        1514
    } else {
        60 + (k as usize * 97) % 1455
    }
}

fn udp_payload_len(k: u32) -> usize {
    if k.is_multiple_of(10) {
        1472
    } else {
        8 + (k as usize * 53) % 1464
    }
}

fn tcp_payload_len(k: u32) -> usize {
    if k.is_multiple_of(6) {
        1460
    } else {
        1 + (k as usize * 211) % 1459
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Frames of a pcap file (as QEMU's filter-dump writes it); panics if it cannot be read.
fn pcap_frames(path: &std::path::Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    hw_tests::wire::pcap_frames(&data).unwrap_or_else(|e| panic!("pcap {}: {e}", path.display()))
}

/// A TCP or UDP packet in `frame`, long enough to hold its checksum field.
fn parse_ipv4(frame: &[u8]) -> Option<Ipv4Frame<'_>> {
    Ipv4Frame::parse(frame).filter(|p| p.l4_checksum_field().is_some())
}

fn run_guest(guest: Guest) -> GuestRun {
    guest.timeout(TIMEOUT).start().unwrap().wait().unwrap()
}

/// `ip -n <ns> args...`, panicking with stderr on failure.
fn ip_in(ns: &NetNs, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .arg("-n")
        .arg(ns.name())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TAP device the test process itself holds open, without the virtio-net header and
/// without offloads: the kernel hands it finished frames, checksummed and segmented.
struct TapReader {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const FAR_TAP: &str = "zstap1";

impl TapReader {
    /// Create `zstap1` in `ns` at 10.99.1.1/24, with 10.99.1.2 as a static neighbour, and
    /// forward IPv4 in the namespace.
    fn create(ns: &NetNs) -> TapReader {
        let file = ns
            .spawn(|| {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/net/tun")
                    .unwrap();
                // struct ifreq: 16-byte name, then short flags.
                let mut ifr = [0u8; 40];
                ifr[..FAR_TAP.len()].copy_from_slice(FAR_TAP.as_bytes());
                let flags: u16 = 0x0002 | 0x1000; // IFF_TAP | IFF_NO_PI
                ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
                const TUNSETIFF: libc::c_ulong = 0x400454ca;
                // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes), which ifr is.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
                assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
                file
            })
            .join()
            .unwrap();
        ip_in(ns, &["addr", "add", "10.99.1.1/24", "dev", FAR_TAP]);
        ip_in(ns, &["link", "set", FAR_TAP, "up"]);
        ip_in(
            ns,
            &[
                "neigh",
                "replace",
                "10.99.1.2",
                "lladdr",
                "02:00:00:00:01:02",
                "dev",
                FAR_TAP,
                "nud",
                "permanent",
            ],
        );
        let out = ns
            .command("sh")
            .args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "enabling forwarding: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let frames = Arc::clone(&frames);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let fd = file.as_raw_fd();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    let n = unsafe { libc::poll(&mut pfd, 1, 100) };
                    if n <= 0 {
                        continue;
                    }
                    // SAFETY: reads at most buf.len() bytes into buf.
                    let len =
                        unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                    if len > 0 {
                        frames.lock().unwrap().push(buf[..len as usize].to_vec());
                    }
                }
            })
        };
        TapReader {
            frames,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.frames.lock().unwrap())
    }
}

/// Send `payload` to the guest's `port` every 300 ms from the host end of the TAP until
/// `stop` is set.
fn keep_sending(
    ns: &NetNs,
    port: u16,
    payload: &'static [u8],
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    ns.spawn(move || {
        let sock = std::net::UdpSocket::bind((HOST_IP, 0)).unwrap();
        while !stop.load(Ordering::Relaxed) {
            let _ = sock.send_to(payload, (GUEST_IP, port));
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

/// Start a virtio guest on the TAP network running `command`, and give the host a permanent
/// neighbour entry for it: the guest programs answer no ARP.
fn start_on_tap(name: &str, mac: &str, packed: bool, command: &str) -> RunningGuest {
    let guest = virtio_guest(name, packed)
        .mac(mac)
        .network(Network::Tap)
        .run(command)
        .timeout(TIMEOUT)
        .start()
        .unwrap();
    ip_in(
        guest.netns(),
        &[
            "neigh",
            "replace",
            GUEST_IP,
            "lladdr",
            mac,
            "dev",
            TAP_NAME,
            "nud",
            "permanent",
        ],
    );
    guest
}

#[track_caller]
fn expect_line(run: &GuestRun, line: &str) {
    if !run.lines.iter().any(|l| l.trim() == line) {
        run.fail(&format!("no {line:?} line on the console"));
    }
}

fn features_of<'a>(run: &'a GuestRun, key: &str) -> Vec<&'a str> {
    run.require(key)
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .split(',')
        .collect()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn virtio_driver_negotiates_version_1_and_access_platform() {
    let mac = "52:54:00:ab:00:01";
    let run = run_guest(
        Guest::new("virtio-open", Nic::Virtio)
            .mac(mac)
            .run("zs-guest virtio-open"),
    );
    run.expect_success();
    expect_line(&run, "VIRTIO_OPEN_OK");
    run.expect_eq("MAC", run.require("MAC"), mac);
    let negotiated = features_of(&run, "VIRTIO_NEGOTIATED");
    for f in ["VERSION_1", "ACCESS_PLATFORM", "MAC", "STATUS"] {
        if !negotiated.contains(&f) {
            run.fail(&format!("{f} not negotiated: {negotiated:?}"));
        }
    }
    // User-mode networking has no vnet header: no checksum offload is offered, and the driver
    // must then say so in its capabilities rather than fail.
    if negotiated.contains(&"CSUM") || negotiated.contains(&"RING_PACKED") {
        run.fail(&format!("unexpected features negotiated: {negotiated:?}"));
    }
    let caps = run.require("CAPS");
    if !caps.contains("tcp_checksum: false") || !caps.contains("tso_max_frame: None") {
        run.fail(&format!("capabilities do not match the features: {caps}"));
    }
    run.expect_eq("link up", run.require("LINK_UP"), "true");
    // ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK
    run.expect_eq("device status", run.require("DEVICE_STATUS"), "0x0f");
}

#[test]
fn virtio_driver_refuses_device_without_iommu_platform() {
    let run = run_guest(
        Guest::new("virtio-open-no-iommu-platform", Nic::Virtio)
            .without_virtio_iommu_platform()
            .run("zs-guest virtio-open"),
    );
    run.expect_failure();
    if run.console_contains("VIRTIO_OPEN_OK") {
        run.fail("the driver opened a device that bypasses the IOMMU");
    }
    if !run.console_contains("iommu_platform=on") || !run.console_contains("ACCESS_PLATFORM") {
        run.fail("the refusal does not name ACCESS_PLATFORM and the fix (iommu_platform=on)");
    }
}

#[test]
fn virtio_multisegment_tx_arrives_byte_exact() {
    multisegment_tx("virtio-tx-multiseg", "52:54:00:ab:00:02", "", false);
}

/// The same on packed virtqueues (`packed=on`).
#[test]
fn virtio_packed_multisegment_tx_arrives_byte_exact() {
    multisegment_tx("virtio-tx-multiseg-packed", "52:54:00:ab:00:12", "", true);
}

/// The same with VIRTIO_F_INDIRECT_DESC left out: every segment takes a ring descriptor.
#[test]
fn virtio_multisegment_tx_without_indirect_descriptors() {
    let run = multisegment_tx(
        "virtio-tx-multiseg-direct",
        "52:54:00:ab:00:06",
        "ZEROSEND_VIRTIO_INDIRECT=0 ",
        false,
    );
    if features_of(&run, "VIRTIO_NEGOTIATED").contains(&"INDIRECT_DESC") {
        run.fail("INDIRECT_DESC was negotiated although switched off");
    }
}

/// `Guest::new`, with packed virtqueues offered when `packed`.
fn virtio_guest(name: &str, packed: bool) -> Guest {
    let guest = Guest::new(name, Nic::Virtio);
    if packed {
        guest.virtio_packed()
    } else {
        guest
    }
}

/// Fails the run unless RING_PACKED was negotiated exactly when offered.
fn expect_ring_layout(run: &GuestRun, packed: bool) {
    let negotiated = features_of(run, "VIRTIO_NEGOTIATED").contains(&"RING_PACKED");
    run.expect_eq("RING_PACKED negotiated", negotiated, packed);
}

fn multisegment_tx(name: &str, mac: &str, env: &str, packed: bool) -> GuestRun {
    // More frames than ring entries: the available and used rings wrap around.
    let frames = 300u32;
    let run = run_guest(virtio_guest(name, packed).mac(mac).pcap().run(&format!(
        "{env}zs-guest virtio-tx-multiseg --frames {frames}"
    )));
    run.expect_success();
    expect_ring_layout(&run, packed);
    expect_line(&run, "MULTISEG_OK");
    run.expect_eq("tokens in order", run.require("TX_TOKENS_IN_ORDER"), "yes");
    let src = mac_bytes(mac);
    let seen: Vec<Vec<u8>> = pcap_frames(run.pcap_path())
        .into_iter()
        .filter(|f| f.len() >= 16 && f[6..12] == src && f[12..14] == TEST_ETHERTYPE.to_be_bytes())
        .collect();
    run.expect_eq("frames on the wire", seen.len(), frames as usize);
    for (k, frame) in seen.iter().enumerate() {
        let k = k as u32;
        let mut expected = vec![0xff; 6];
        expected.extend_from_slice(&src);
        expected.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
        expected.extend_from_slice(&(k as u16).to_be_bytes());
        while expected.len() < multiseg_len(k) {
            expected.push(pattern(k, expected.len()));
        }
        if *frame != expected {
            let first_diff = frame.iter().zip(&expected).position(|(a, b)| a != b);
            run.fail(&format!(
                "frame {k}: {} bytes on the wire, {} expected, first difference at {first_diff:?}",
                frame.len(),
                expected.len()
            ));
        }
    }
    run
}

#[test]
fn virtio_rx_of_frames_sent_by_the_host() {
    rx_from_host("virtio-rx", "52:54:00:ab:00:03", false);
}

#[test]
fn virtio_packed_rx_of_frames_sent_by_the_host() {
    rx_from_host("virtio-rx-packed", "52:54:00:ab:00:13", true);
}

fn rx_from_host(name: &str, mac: &str, packed: bool) {
    // More datagrams than receive buffers: the rings wrap and buffers are recycled.
    let count = 600u32;
    let guest = start_on_tap(
        name,
        mac,
        packed,
        &format!("zs-guest virtio-rx --count {count}"),
    );
    let ns = guest.netns();
    guest.wait_for_console("RX_READY", TIMEOUT);
    let sender = ns.spawn(move || {
        let sock = std::net::UdpSocket::bind((HOST_IP, 0)).unwrap();
        for k in 0..count {
            let mut payload = k.to_be_bytes().to_vec();
            while payload.len() < udp_payload_len(k) {
                payload.push(pattern(4000 + k, payload.len()));
            }
            sock.send_to(&payload, (GUEST_IP, RX_PORT)).unwrap();
            if k % 16 == 15 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    sender.join().unwrap();
    let run = guest.wait().unwrap();
    run.expect_success();
    expect_ring_layout(&run, packed);
    run.expect_eq(
        "datagrams received intact",
        run.require("RX_OK"),
        count.to_string().as_str(),
    );
}

#[test]
fn virtio_checksum_offload_and_tso_checked_by_the_host_kernel() {
    offload_through_host("virtio-offload", "52:54:00:ab:00:04", false);
}

#[test]
fn virtio_packed_checksum_offload_and_tso_checked_by_the_host_kernel() {
    offload_through_host("virtio-offload-packed", "52:54:00:ab:00:14", true);
}

fn offload_through_host(name: &str, mac: &str, packed: bool) {
    let guest = start_on_tap(
        name,
        mac,
        packed,
        &format!("zs-guest virtio-offload --tso-bytes {TSO_BYTES} --mss {MSS}"),
    );
    let ns = guest.netns();
    let reader = TapReader::create(ns);
    guest.wait_for_console("RX_READY", TIMEOUT);
    let stop = Arc::new(AtomicBool::new(false));
    let go = keep_sending(ns, GO_PORT, b"GO", Arc::clone(&stop));
    guest.wait_for_console("GOT_GO", TIMEOUT);
    stop.store(true, Ordering::Relaxed);
    go.join().unwrap();
    guest.wait_for_console("OFFLOAD_OK", TIMEOUT);
    // The host forwards asynchronously; give it a moment after the guest's last completion.
    let settle = Instant::now() + Duration::from_secs(30);
    let expected = (UDP_FRAMES + TCP_FRAMES) as usize + TSO_BYTES.div_ceil(MSS);
    while Instant::now() < settle
        && reader
            .frames
            .lock()
            .unwrap()
            .iter()
            .filter(|f| parse_ipv4(f).is_some())
            .count()
            < expected
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let frames = reader.finish();
    let run = guest.wait().unwrap();
    run.expect_success();
    expect_ring_layout(&run, packed);
    let negotiated = features_of(&run, "VIRTIO_NEGOTIATED");
    for f in ["CSUM", "HOST_TSO4", "ACCESS_PLATFORM"] {
        if !negotiated.contains(&f) {
            run.fail(&format!(
                "{f} not negotiated on the TAP backend: {negotiated:?}"
            ));
        }
    }

    let packets: Vec<Ipv4Frame> = frames
        .iter()
        .filter_map(|f| parse_ipv4(f))
        .filter(|p| p.dst_ip() == [10, 99, 1, 2])
        .collect();
    for p in &packets {
        let (ip_ok, l4_ok) = (p.ip_checksum_ok(), p.l4_checksum_verifies());
        if !ip_ok || !l4_ok {
            run.fail(&format!(
                "bad checksum after forwarding (ip ok: {ip_ok}, l4 ok: {l4_ok}): proto {} id {:#x}",
                p.proto, p.id
            ));
        }
        run.expect_eq("TTL after one hop", p.ttl(), 63);
    }

    // UDP: checksum offload; the IPv4 header checksum computed by the guest program
    // (virtio-net has no offload for it).
    for k in 0..UDP_FRAMES {
        let Some(p) = packets
            .iter()
            .find(|p| p.proto == 17 && p.id == 0x100 + k as u16)
        else {
            run.fail(&format!(
                "UDP frame {k} did not arrive; {} IPv4 packets did",
                packets.len()
            ));
        };
        let want: Vec<u8> = (0..udp_payload_len(k))
            .map(|i| pattern(1000 + k, i))
            .collect();
        run.expect_eq("UDP destination port", p.dst_port(), UDP_DST_PORT);
        if p.l4[8..] != want[..] || p.l4_checksum_field() == Some(0) {
            run.fail(&format!(
                "UDP frame {k}: payload differs or checksum left 0"
            ));
        }
    }
    // TCP without TSO.
    for k in 0..TCP_FRAMES {
        let seq = 0x2000_0000u32.wrapping_add(k * 100_000);
        let Some(p) = packets
            .iter()
            .find(|p| p.proto == 6 && p.id == 0x200 + k as u16)
        else {
            run.fail(&format!("TCP frame {k} did not arrive"));
        };
        run.expect_eq("TCP destination port", p.dst_port(), TCP_DST_PORT);
        run.expect_eq("TCP sequence", p.tcp_seq(), seq);
        let want: Vec<u8> = (0..tcp_payload_len(k))
            .map(|i| pattern(2000 + k, i))
            .collect();
        if p.l4[20..] != want[..] {
            run.fail(&format!("TCP frame {k}: payload differs"));
        }
    }
    // TSO: one 60 KiB frame, cut by the host into MSS segments.
    let mut segments: Vec<&Ipv4Frame> = packets
        .iter()
        .filter(|p| p.proto == 6 && p.tcp_seq().wrapping_sub(TSO_SEQ) < TSO_BYTES as u32)
        .collect();
    segments.sort_by_key(|p| p.tcp_seq());
    run.expect_eq("TSO segments", segments.len(), TSO_BYTES.div_ceil(MSS));
    let mut offset = 0usize;
    for (i, p) in segments.iter().enumerate() {
        run.expect_eq(
            "segment sequence number",
            p.tcp_seq(),
            TSO_SEQ + offset as u32,
        );
        let payload = &p.l4[20..];
        let last = i + 1 == segments.len();
        if payload.len() != if last { TSO_BYTES - offset } else { MSS } {
            run.fail(&format!(
                "segment {i} carries {} bytes (MSS {MSS})",
                payload.len()
            ));
        }
        if payload
            .iter()
            .enumerate()
            .any(|(j, &b)| b != pattern(3000, offset + j))
        {
            run.fail(&format!("segment {i}: payload differs"));
        }
        let psh = p.tcp_flags() & TCP_PSH != 0;
        run.expect_eq("PSH only on the last segment", psh, last);
        offset += payload.len();
    }
    let ids: Vec<u16> = segments.iter().map(|p| p.id).collect();
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    run.expect_eq("distinct IPv4 identifications", distinct.len(), ids.len());
    eprintln!(
        "virtio offload: {} UDP, {} TCP and {} TSO segments verified after the host's software path",
        UDP_FRAMES,
        TCP_FRAMES,
        segments.len()
    );
}

#[test]
fn virtio_descriptor_at_unmapped_iova_is_stopped_by_the_iommu() {
    iommu_fault("virtio-iommu-fault", "52:54:00:ab:00:05", false);
}

/// The same on packed virtqueues: the recovery (reset, re-initialisation) included.
#[test]
fn virtio_packed_descriptor_at_unmapped_iova_is_stopped_by_the_iommu() {
    iommu_fault("virtio-iommu-fault-packed", "52:54:00:ab:00:15", true);
}

fn iommu_fault(name: &str, mac: &str, packed: bool) {
    let run = run_guest(
        virtio_guest(name, packed)
            .mac(mac)
            .pcap()
            .run("zs-guest virtio-iommu-fault"),
    );
    run.expect_success();
    expect_ring_layout(&run, packed);
    expect_line(&run, "IOMMU_FAULT_OK");
    let src = mac_bytes(mac);
    let frames: Vec<Vec<u8>> = pcap_frames(run.pcap_path())
        .into_iter()
        .filter(|f| f.len() >= 20 && f[6..12] == src && f[12..14] == TEST_ETHERTYPE.to_be_bytes())
        .collect();
    // What the pages held before they were unmapped never reaches the wire.
    if frames
        .iter()
        .any(|f| f.windows(8).any(|w| w == b"SECRET!!"))
    {
        run.fail("bytes of an unmapped page reached the wire: the IOMMU did not stop the read");
    }
    let on_wire = |marker: &[u8]| frames.iter().filter(|f| &f[14..20] == marker).count();
    run.expect_eq("good frame before the faults", on_wire(b"GOOD-A"), 1);
    run.expect_eq("good frame after the faults", on_wire(b"GOOD-C"), 1);
    for name in ["B1", "B2"] {
        // Kernel messages may land in the middle of our lines: look for the token.
        let key = format!("SENT_{name} unmapped_iova=");
        let unmapped: String = run
            .lines
            .iter()
            .find_map(|l| l.split_once(key.as_str()).map(|(_, rest)| rest.to_string()))
            .unwrap_or_else(|| run.fail(&format!("no {key} line")))
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        // The guest kernel's VT-d driver logs the refused read at the unmapped page.
        let fault = format!("fault addr {unmapped} [fault reason 0x06] PTE Read access is not set");
        if !run
            .lines
            .iter()
            .any(|l| l.contains("DMAR: [DMA Read") && l.contains(&fault))
        {
            run.fail(&format!(
                "no DMAR read fault at {unmapped} (frame {name}) in the guest kernel log"
            ));
        }
        let outcome = run.require(&format!("{name}_OUTCOME"));
        let marker = format!("BAD-{name}");
        if outcome.starts_with("error") {
            // The device reported the failed read: the driver surfaced it, nothing was sent.
            if !outcome.contains("DEVICE_NEEDS_RESET") {
                run.fail(&format!(
                    "{name}: the error does not say what the device reported: {outcome}"
                ));
            }
            run.expect_eq(
                &format!("{name} frames on the wire"),
                on_wire(marker.as_bytes()),
                0,
            );
        } else {
            // QEMU 7.2 maps a descriptor whose translation fails through its single bounce
            // buffer, filled from unassigned memory (zeros), and reports nothing: the frame
            // goes out with zeros where the refused bytes were.
            let sent: Vec<&Vec<u8>> = frames
                .iter()
                .filter(|f| f[14..20] == *marker.as_bytes())
                .collect();
            run.expect_eq(&format!("{name} frames on the wire"), sent.len(), 1);
            if sent[0][30..].iter().any(|&b| b != 0) {
                run.fail(&format!(
                    "{name} carries bytes that are neither its header nor zeros"
                ));
            }
            eprintln!("virtio iommu fault {name}: DMAR fault logged; the device substituted zeros and reported nothing");
        }
    }
    // With two refused segments the second finds QEMU's bounce buffer taken, the device
    // flags DEVICE_NEEDS_RESET, and the driver must surface that as an error and recover.
    if !run.require("B2_OUTCOME").starts_with("error") {
        run.fail("the device's DEVICE_NEEDS_RESET for frame B2 was not surfaced as an error");
    }
}
