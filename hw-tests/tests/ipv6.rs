//! `zerosend serve` over IPv6 in a guest, on every NIC model, with curl on the host side of
//! the TAP device (the harness's network namespace, given `fd99::1/64`; the kernel gives it
//! its link-local address): a small and a large file over a static address and over the
//! server's link-local address, sha256-verified, the host's neighbour discovery resolving
//! the guest, and IPv4 still served beside it. The capture shows the IPv6 frames: smoltcp
//! 0.14 cannot hand IPv6 TSO packets to the device (see `netstack::device::capabilities`),
//! so the large file goes out in MSS frames with checksum offload where the NIC has it.

use std::time::{Duration, Instant};

use hw_tests::content::sha256_hex;
use hw_tests::netns::{GUEST_IP, TAP_NAME};
use hw_tests::serve_guest::{ServerGuest, BIG_LEN, HELLO, PORT};
use hw_tests::Nic;

const GUEST_V6: &str = "fd99::2";
const HOST_V6: &str = "fd99::1";

/// The server's IPv6 addresses, from its `zerosend: IPv6 on [ADDR]:PORT ...` line.
fn announced_addresses(line: &str) -> Vec<String> {
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix('[')?.split_once("]:"))
        .filter(|(_, port)| port.parse() == Ok(PORT))
        .map(|(addr, _)| addr.to_string())
        .collect()
}

/// Gives the TAP's host end `HOST_V6` and waits until its link-local address has finished
/// duplicate address detection (a tentative address cannot be a source).
fn host_side_ipv6(srv: &ServerGuest) {
    let ns = srv.guest.netns();
    let cidr = format!("{HOST_V6}/64");
    let o = ns
        .command("ip")
        .args(["-6", "addr", "add", &cidr, "dev", TAP_NAME, "nodad"])
        .output()
        .unwrap();
    srv.check(
        o.status.success(),
        &format!("ip addr add: {}", String::from_utf8_lossy(&o.stderr)),
    );
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let o = ns
            .command("ip")
            .args(["-6", "addr", "show", "dev", TAP_NAME])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if text.contains("fe80::") && !text.contains("tentative") {
            return;
        }
        srv.check(
            Instant::now() < until,
            &format!("the TAP's IPv6 addresses never settled:\n{text}"),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `http://[ADDR]:PORT/PATH`, with the TAP as zone of a link-local address (`%25` is `%`).
fn url6(address: &str, path: &str) -> String {
    if address.starts_with("fe80:") {
        format!("http://[{address}%25{TAP_NAME}]:{PORT}{path}")
    } else {
        format!("http://[{address}]:{PORT}{path}")
    }
}

fn hello(srv: &ServerGuest, address: &str) {
    let o = srv.curl(&["-g", &url6(address, "/hello.txt")]);
    srv.check(
        o.stdout == HELLO,
        &format!(
            "hello.txt over [{address}]: {:?} {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    );
}

/// `/big.bin` over `address`, whole and byte-exact; returns the seconds it took.
fn big(srv: &ServerGuest, address: &str) -> f64 {
    let dir = srv.scratch_dir("ipv6");
    let out = dir.join("big.bin");
    let started = Instant::now();
    let o = srv.curl(&[
        "-g",
        "-o",
        out.to_str().unwrap(),
        "-w",
        "%{http_code} %{size_download} %{remote_ip}",
        &url6(address, "/big.bin"),
    ]);
    let secs = started.elapsed().as_secs_f64();
    let got = std::fs::read(&out).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    srv.check(
        stdout == format!("200 {BIG_LEN} {address}"),
        &format!(
            "big.bin over [{address}]: curl: {stdout} {}",
            String::from_utf8_lossy(&o.stderr)
        ),
    );
    srv.check(
        sha256_hex(&got) == sha256_hex(&srv.big),
        &format!("big.bin over [{address}]: sha256 differs"),
    );
    secs
}

/// The guest NIC's MAC (the harness's default).
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// What the capture shows of the IPv6 TCP frames the server sent.
#[derive(Debug, Default)]
struct Captured {
    data_frames: usize,
    payload_bytes: usize,
    largest_frame: usize,
    /// Frames behind a `virtio_net_hdr` (QEMU's capture of a netdev with a vnet-header
    /// backend starts them with it: 12 bytes behind virtio-net, 10 behind e1000e).
    with_net_hdr: usize,
    /// Of those, frames with `VIRTIO_NET_HDR_F_NEEDS_CSUM` and `GSO_NONE` (VIRTIO 1.2
    /// section 5.1.6): the TCP checksum left to the device, the segmenting done by us.
    checksum_offloaded: usize,
}

fn ipv6_frames_from_the_server(pcap: &[u8]) -> Captured {
    // Records, not frames: the IPv4 baseline's TSO frames exceed the capture's snaplen.
    let records = hw_tests::wire::pcap_records(pcap).expect("reading the capture");
    let mut c = Captured::default();
    for (wire_len, record) in records {
        if record.len() != wire_len {
            continue; // a TSO frame of the IPv4 download, cut at the snaplen
        }
        let Some(h) = [0, 10, 12].into_iter().find(|&h| {
            record.len() >= h + 74
                && record[h + 6..h + 12] == GUEST_MAC
                && record[h + 12..h + 14] == [0x86, 0xdd]
        }) else {
            continue;
        };
        let (net_hdr, f) = record.split_at(h);
        if f[20] != 6 || u16::from_be_bytes([f[54], f[55]]) != PORT {
            continue;
        }
        let tcp_header = ((f[66] >> 4) as usize) * 4;
        let payload_len = u16::from_be_bytes([f[18], f[19]]) as usize - tcp_header;
        if payload_len == 0 {
            continue;
        }
        c.data_frames += 1;
        c.payload_bytes += payload_len;
        c.largest_frame = c.largest_frame.max(f.len());
        if h > 0 {
            c.with_net_hdr += 1;
            c.checksum_offloaded += usize::from(net_hdr[0] & 1 == 1 && net_hdr[1] == 0);
        }
    }
    c
}

fn over_ipv6(nic: Nic) {
    let srv = ServerGuest::boot("ipv6", nic, 6, |guest| {
        guest.pcap().run(&format!(
            "zerosend serve --nic auto --root /data --ip {GUEST_IP}/24 --port {PORT} \
             --ipv6 {GUEST_V6}/64"
        ))
    });
    let line = srv
        .guest
        .wait_for_console("zerosend: IPv6 on", Duration::from_secs(10));
    let addresses = announced_addresses(&line);
    let link_local = addresses
        .iter()
        .find(|a| a.starts_with("fe80:"))
        .cloned()
        .unwrap_or_else(|| {
            srv.guest
                .fail(&format!("no link-local address in {line:?}"))
        });
    srv.check(
        addresses.iter().any(|a| a == GUEST_V6),
        &format!("{GUEST_V6} not announced: {line:?}"),
    );
    host_side_ipv6(&srv);

    hello(&srv, GUEST_V6);
    let secs = big(&srv, GUEST_V6);
    eprintln!(
        "{}: {BIG_LEN} bytes over [{GUEST_V6}] in {secs:.2} s ({:.1} MB/s)",
        nic.name(),
        BIG_LEN as f64 / secs / 1e6
    );
    hello(&srv, &link_local);
    let secs = big(&srv, &link_local);
    eprintln!(
        "{}: {BIG_LEN} bytes over [{link_local}] in {secs:.2} s",
        nic.name()
    );
    // The host resolved the guest with neighbour discovery, through the NIC's receive filter.
    let o = srv
        .guest
        .netns()
        .command("ip")
        .args(["-6", "neigh", "show", "dev", TAP_NAME])
        .output()
        .unwrap();
    let neighbours = String::from_utf8_lossy(&o.stdout).into_owned();
    srv.check(
        neighbours.contains(GUEST_V6) && neighbours.contains(&link_local),
        &format!("host neighbour table lacks the guest's addresses:\n{neighbours}"),
    );
    // Dual stack: IPv4 on the same listener. Its download (TSO where the NIC has it) is
    // the baseline the IPv6 one (MSS frames) is compared with, in the same guest.
    let o = srv.curl(&[&hw_tests::serve_guest::url("/hello.txt")]);
    srv.check(o.stdout == HELLO, "hello.txt over IPv4 beside IPv6");
    let v4 = srv.download_big("big.bin over IPv4");
    let v6 = big(&srv, GUEST_V6);
    eprintln!(
        "{}: same guest, 8 MiB: IPv4 {:.1} MB/s, IPv6 {:.1} MB/s, IPv6/IPv4 {:.2}",
        nic.name(),
        BIG_LEN as f64 / v4 / 1e6,
        BIG_LEN as f64 / v6 / 1e6,
        v4 / v6
    );

    let run = srv.guest.stop_server();
    hw_tests::expect_no_poison_on_the_wire(&run);
    let pcap = std::fs::read(run.pcap_path()).unwrap_or_else(|e| run.fail(&e.to_string()));
    let c = ipv6_frames_from_the_server(&pcap);
    eprintln!(
        "{}: capture of the server's IPv6 data frames: {c:?}",
        nic.name()
    );
    if !(c.payload_bytes >= 3 * BIG_LEN
        && c.data_frames >= 3 * BIG_LEN / 1440
        && c.largest_frame <= 1514)
    {
        run.fail(&format!(
            "capture {c:?}: expected three downloads of {BIG_LEN} bytes in MSS frames"
        ));
    }
    if c.checksum_offloaded != c.with_net_hdr {
        run.fail(&format!(
            "capture {c:?}: every frame behind a vnet header must ask for the TCP checksum"
        ));
    }
}

hw_tests::for_each_nic!(over_ipv6);
