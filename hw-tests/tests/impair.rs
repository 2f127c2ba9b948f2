//! Downloads through a bad wire: the impairing relay ([`hw_tests::relay`]) sits between each
//! NIC model and the host's Linux TCP in the namespace, with the issue's 2% loss, 1%
//! reordering, 1% duplication and 0.1% corruption in both directions. Mixed downloads (1 KiB
//! to 16 MiB: whole files and byte ranges, a tenth of them over HTTPS) with curl, each
//! sha256-verified; the relay compares every byte the guest sent again with its first
//! transmission; every corrupted frame must be dropped by the receiver's TCP checksum
//! (Linux's `InCsumErrors`, zerosend's `rx_tcp_checksum_drops`); no pin is left at the end.
//!
//! The suite runs a reduced set: 50 downloads per NIC of at most 4 MiB, 4 at a time;
//! `scripts/soak --faults` runs 1000 of up to 16 MiB, 16 at a time (`ZS_IMPAIR_DOWNLOADS`,
//! `ZS_IMPAIR_MAX_LEN`, `ZS_IMPAIR_CONCURRENCY`, `ZS_IMPAIR_SEED`). The sender's loss
//! recovery is smoltcp's: go-back-N after a fast retransmit, and a 1 s minimum RTO when
//! several frames of one window are lost, so a single download under 2% loss crawls; the
//! test prints how much against the clean wire.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hw_tests::content::{random_bytes, sha256_hex};
use hw_tests::netns::GUEST_IP;
use hw_tests::pki::Pki;
use hw_tests::relay::{Impairment, RelayConfig, RelayStats};
use hw_tests::serve_guest::{ServerGuest, ACCESS_FLAGS, PORT};
use hw_tests::Nic;

const LARGE_LEN: usize = 16 << 20;
const SMALL_LEN: usize = 1024;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One download: a whole file or a byte range of the large one, over HTTP or HTTPS.
#[derive(Clone, Debug)]
struct Download {
    path: &'static str,
    range: Option<(usize, usize)>,
    tls: bool,
}

impl Download {
    fn len(&self) -> usize {
        match (self.range, self.path) {
            (Some((a, b)), _) => b - a + 1,
            (None, "/small.bin") => SMALL_LEN,
            (None, _) => LARGE_LEN,
        }
    }
}

/// `n` downloads of mixed sizes from `seed`: about half below 64 KiB, 30% to 1 MiB, 15% to
/// 4 MiB and 5% to 16 MiB (log-uniform within each class), none longer than `max_len`,
/// starting with the whole large file (or its first `max_len` bytes) and the small file;
/// every tenth over HTTPS.
fn plan(n: usize, seed: u64, max_len: usize) -> Vec<Download> {
    let max_len = max_len.clamp(SMALL_LEN, LARGE_LEN);
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let tls = i % 10 == 9;
            match i {
                0 => Download {
                    path: "/large.bin",
                    range: (max_len < LARGE_LEN).then(|| (0, max_len - 1)),
                    tls,
                },
                1 => Download {
                    path: "/small.bin",
                    range: None,
                    tls,
                },
                _ => {
                    let class = next() % 100;
                    let (lo, hi) = match class {
                        0..=49 => (1usize << 10, 64usize << 10),
                        50..=79 => (64 << 10, 1 << 20),
                        80..=94 => (1 << 20, 4 << 20),
                        _ => (4 << 20, LARGE_LEN),
                    };
                    let unit = (next() >> 11) as f64 / (1u64 << 53) as f64;
                    let len = ((lo as f64) * ((hi as f64) / (lo as f64)).powf(unit)) as usize;
                    let len = len.clamp(1, max_len);
                    let start = (next() as usize) % (LARGE_LEN - len + 1);
                    Download {
                        path: "/large.bin",
                        range: Some((start, start + len - 1)),
                        tls,
                    }
                }
            }
        })
        .collect()
}

/// A counter of the namespace's Linux TCP (`/proc/net/snmp`, the `Tcp:` lines).
fn linux_tcp_counter(srv: &ServerGuest, name: &str) -> u64 {
    snmp_counter(srv, "Tcp:", name)
}

/// A counter of `/proc/net/snmp` in the namespace, from the two lines starting `section`.
fn snmp_counter(srv: &ServerGuest, section: &str, name: &str) -> u64 {
    let o = srv
        .guest
        .netns()
        .command("cat")
        .arg("/proc/net/snmp")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with(section));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        panic!("no {section} lines in /proc/net/snmp:\n{text}");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("{name} not in {names}"));
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

struct Outcome {
    seconds: f64,
    bytes: usize,
    failures: Vec<String>,
}

/// Run `downloads` with `concurrency` curl clients; each body is checked against `large`.
fn run(
    srv: &ServerGuest,
    pki: &Pki,
    large: &[u8],
    small: &[u8],
    downloads: &[Download],
    concurrency: usize,
) -> Outcome {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let started = Instant::now();
    let dir = srv.scratch_dir("impair");
    std::thread::scope(|s| {
        for worker in 0..concurrency {
            let (next, failures, dir) = (&next, &failures, &dir);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(d) = downloads.get(i) else { break };
                let out = dir.join(format!("w{worker}"));
                let _ = std::fs::remove_file(&out);
                let url = if d.tls {
                    format!("https://{GUEST_IP}{}", d.path)
                } else {
                    format!("http://{GUEST_IP}:{PORT}{}", d.path)
                };
                let mut args = vec![
                    "-o".to_string(),
                    out.to_str().unwrap().to_string(),
                    "-w".into(),
                    "%{http_code} %{size_download}".into(),
                ];
                if d.tls {
                    args.extend(["--cacert".into(), pki.ca()]);
                }
                // Under 2% loss one flow can crawl at about 1 Mbit/s: give long downloads
                // time (the later --max-time wins over ServerGuest::curl's 120 s).
                let max_time = (60 + d.len() / 50_000).max(120);
                args.extend(["--max-time".into(), max_time.to_string()]);
                if let Some((a, b)) = d.range {
                    args.extend(["-r".into(), format!("{a}-{b}")]);
                }
                args.push(url);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let o = srv.curl(&args);
                let got = std::fs::read(&out).unwrap_or_default();
                let expected: &[u8] = match (d.range, d.path) {
                    (Some((a, b)), _) => &large[a..=b],
                    (None, "/small.bin") => small,
                    (None, _) => large,
                };
                let status = if d.range.is_some() { "206" } else { "200" };
                let line = String::from_utf8_lossy(&o.stdout).into_owned();
                if line != format!("{status} {}", expected.len()) {
                    failures.lock().unwrap().push(format!(
                        "download {i} {d:?}: curl said {line:?} {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                } else if sha256_hex(&got) != sha256_hex(expected) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("download {i} {d:?}: sha256 differs"));
                }
            });
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    Outcome {
        seconds: started.elapsed().as_secs_f64(),
        bytes: downloads.iter().map(Download::len).sum(),
        failures: failures.into_inner().unwrap(),
    }
}

fn mbit(o: &Outcome) -> f64 {
    o.bytes as f64 * 8.0 / o.seconds / 1e6
}

/// The metrics the test reads, by name.
fn sample(srv: &ServerGuest, names: &[&str]) -> HashMap<String, u64> {
    let text = srv.metrics();
    names
        .iter()
        .map(|n| (n.to_string(), srv.metric(&text, n)))
        .collect()
}

const METRICS: &[&str] = &[
    "zerosend_rx_tcp_checksum_drops_total",
    "zerosend_rx_malformed_tcp_drops_total",
    "zerosend_tcp_retransmits_total",
    "zerosend_frames_tx_total",
];

fn impaired_downloads(nic: Nic) {
    let n: usize = env_or("ZS_IMPAIR_DOWNLOADS", 50);
    let concurrency: usize = env_or("ZS_IMPAIR_CONCURRENCY", 4);
    let max_len: usize = env_or("ZS_IMPAIR_MAX_LEN", 4 << 20);
    let seed: u64 = env_or("ZS_IMPAIR_SEED", 2026);
    let pki = Pki::make(nic);
    let large = random_bytes(seed, LARGE_LEN);
    let small = random_bytes(seed + 1, SMALL_LEN);
    let cert = std::fs::read(pki.path("cert.pem")).unwrap();
    let key = std::fs::read(pki.path("key.pem")).unwrap();
    let clean = RelayConfig::symmetric(seed, Impairment::none());
    let srv = ServerGuest::boot("impair", nic, 61, |guest| {
        guest
            .relay(clean)
            .timeout(Duration::from_secs(900 + 4 * n as u64))
            .file("/data/large.bin", large.clone())
            .file("/data/small.bin", small.clone())
            .file("/etc/zs/cert.pem", cert)
            .file("/etc/zs/key.pem", key)
            .run(&format!(
                "zerosend serve --nic auto --root /data --ip {GUEST_IP}/24 --port {PORT} {ACCESS_FLAGS} \
                 --tls-cert /etc/zs/cert.pem --tls-key /etc/zs/key.pem --tls-port 443 \
                 --audit --max-connections 100"
            ))
    });
    // The same 2 MiB over HTTP and HTTPS, on the clean wire and then the impaired one.
    let like_for_like = [false, true].map(|tls| Download {
        path: "/large.bin",
        range: Some((0, (2 << 20) - 1)),
        tls,
    });
    let clean_run = run(&srv, &pki, &large, &small, &like_for_like, 1);
    srv.check(
        clean_run.failures.is_empty(),
        &format!("clean wire: {:?}", clean_run.failures),
    );

    srv.guest
        .set_relay(RelayConfig::symmetric(seed, Impairment::lossy()));
    let relay_before = srv.guest.relay_stats().unwrap();
    let linux_csum_before = linux_tcp_counter(&srv, "InCsumErrors");
    let linux_retrans_before = linux_tcp_counter(&srv, "RetransSegs");
    let udp_overflows_before = snmp_counter(&srv, "Udp:", "RcvbufErrors");
    let before = sample(&srv, METRICS);
    let downloads = plan(n, seed, max_len);
    let mixed = run(&srv, &pki, &large, &small, &downloads, concurrency);
    let lossy_run = run(&srv, &pki, &large, &small, &like_for_like, 1);
    // The metrics page is fetched over the same wire: on the impaired one its own frames
    // (and frames still queued in the relay) could be corrupted after the counters were
    // read on one side and before the other. So the wire is clean again, and its queue
    // drained, before either side is read.
    srv.guest
        .set_relay(RelayConfig::symmetric(seed, Impairment::none()));
    std::thread::sleep(Duration::from_secs(1));
    let relay = srv.guest.relay_stats().unwrap();
    let after = sample(&srv, METRICS);
    let linux_csum = linux_tcp_counter(&srv, "InCsumErrors") - linux_csum_before;
    let linux_retrans = linux_tcp_counter(&srv, "RetransSegs") - linux_retrans_before;
    let udp_overflows = snmp_counter(&srv, "Udp:", "RcvbufErrors") - udp_overflows_before;
    let delta = |name: &str| after[name] - before[name];
    // A flip in the TCP data offset leaves a header that does not parse: zerosend drops it
    // as malformed rather than for its checksum (Linux drops it uncounted, or as InErrs).
    let zs_drops = delta("zerosend_rx_tcp_checksum_drops_total")
        + delta("zerosend_rx_malformed_tcp_drops_total");

    let ok = n - mixed.failures.len();
    println!(
        "impair {}: {ok}/{n} downloads byte-exact ({:.1} MB, {} concurrent) in {:.1} s, {:.1} Mbit/s; \
         2 MiB HTTP+HTTPS: clean {:.1} Mbit/s, impaired {:.1} Mbit/s ({:.2}x)",
        nic.name(),
        mixed.bytes as f64 / 1e6,
        concurrency,
        mixed.seconds,
        mbit(&mixed),
        mbit(&clean_run),
        mbit(&lossy_run),
        mbit(&lossy_run) / mbit(&clean_run),
    );
    print_relay(nic, &relay_before, &relay);
    println!(
        "impair {}: zerosend retransmits {} (frames sent {}), checksum and malformed-header drops {}; Linux RetransSegs {}, InCsumErrors {}; \
         frames to the guest lost to QEMU's socket buffer {}",
        nic.name(),
        delta("zerosend_tcp_retransmits_total"),
        delta("zerosend_frames_tx_total"),
        zs_drops,
        linux_retrans,
        linux_csum,
        udp_overflows,
    );

    let mut failures = mixed.failures.clone();
    failures.extend(lossy_run.failures.iter().cloned());
    srv.check(
        failures.is_empty(),
        &format!("{} of {n} downloads failed: {failures:#?}", failures.len()),
    );
    let r = &relay.retransmit;
    srv.check(
        r.differing_bytes == 0,
        &format!(
            "{} retransmitted bytes differ from their first transmission: {:?}",
            r.differing_bytes, r.first_difference
        ),
    );
    let impaired = |f: fn(&hw_tests::relay::DirectionStats) -> u64| {
        (
            f(&relay.to_host) - f(&relay_before.to_host),
            f(&relay.to_guest) - f(&relay_before.to_guest),
        )
    };
    let retransmitted = r.retransmitted_bytes - relay_before.retransmit.retransmitted_bytes;
    srv.check(
        retransmitted > 0 && impaired(|d| d.lost).0 > 0 && impaired(|d| d.lost).1 > 0,
        "the wire lost nothing or the guest retransmitted nothing: the check above was vacuous",
    );
    // Every corrupted frame is dropped by the receiver's checksum: on the host each
    // corrupted whole segment, and those fragments whose datagram was reassembled.
    let (seg_h, seg_g) = impaired(|d| d.corrupted_segments);
    let (frag_h, _) = impaired(|d| d.corrupted_fragments);
    let (send_err_h, send_err_g) = impaired(|d| d.send_errors);
    let (offset_flips_h, _) = impaired(|d| d.corrupted_data_offset);
    srv.check(
        seg_h + frag_h > 0 && seg_g > 0,
        &format!("nothing was corrupted ({seg_h}+{frag_h} to host, {seg_g} to guest)"),
    );
    srv.check(
        linux_csum + send_err_h + offset_flips_h >= seg_h && linux_csum <= seg_h + frag_h,
        &format!(
            "Linux dropped {linux_csum} frames for bad TCP checksums; the relay corrupted \
             {seg_h} whole segments and {frag_h} fragments on the way to it"
        ),
    );
    // Frames to the guest can also be lost after the relay: when the NIC's receive ring is
    // full QEMU stops reading its UDP socket, whose buffer then overflows (the namespace's
    // `Udp: RcvbufErrors`); a corrupted frame among them never reaches the checksum.
    srv.check(
        zs_drops + send_err_g + udp_overflows >= seg_g && zs_drops <= seg_g,
        &format!(
            "zerosend dropped {zs_drops} frames for bad TCP checksums or headers; the relay corrupted \
             {seg_g} on the way to it ({udp_overflows} frames overflowed QEMU's socket)"
        ),
    );
    check_no_pins(&srv);
    srv.guest.stop_server();
}

/// Pins fall back to 0 once the connections are gone (they may take a moment to close).
fn check_no_pins(srv: &ServerGuest) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = srv.metrics();
        let held = srv.metric(&m, "zerosend_pins_held");
        if held == 0 {
            return;
        }
        srv.check(
            Instant::now() < deadline,
            &format!("{held} pins still held 30 s after the downloads"),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print_relay(nic: Nic, before: &RelayStats, after: &RelayStats) {
    for (dir, b, a) in [
        ("to host", &before.to_host, &after.to_host),
        ("to guest", &before.to_guest, &after.to_guest),
    ] {
        println!(
            "impair {} relay {dir}: frames {} lost {} reordered {} duplicated {} corrupted {}+{} fragments, \
             queue drops {} send errors {}; TSO datagrams resegmented {} into {} segments",
            nic.name(),
            a.frames_in - b.frames_in,
            a.lost - b.lost,
            a.reordered - b.reordered,
            a.duplicated - b.duplicated,
            a.corrupted_segments - b.corrupted_segments,
            a.corrupted_fragments - b.corrupted_fragments,
            a.queue_drops - b.queue_drops,
            a.send_errors - b.send_errors,
            a.resegmented_datagrams - b.resegmented_datagrams,
            a.segments_made - b.segments_made,
        );
    }
    let (b, a) = (&before.retransmit, &after.retransmit);
    println!(
        "impair {} relay check: {} flows, {} segments, {} retransmitted ({} bytes), {} bytes differing, \
         {} datagrams reassembled, {} bytes untracked ({} out of range, {} open flows evicted)",
        nic.name(),
        a.flows - b.flows,
        a.segments - b.segments,
        a.retransmitted_segments - b.retransmitted_segments,
        a.retransmitted_bytes - b.retransmitted_bytes,
        a.differing_bytes,
        a.reassembled - b.reassembled,
        a.untracked_bytes - b.untracked_bytes,
        a.untracked_out_of_range_bytes - b.untracked_out_of_range_bytes,
        a.evicted_open_flows - b.evicted_open_flows,
    );
}

hw_tests::for_each_nic!(impaired_downloads);

#[test]
fn the_plan_mixes_sizes_from_1_kib_to_16_mib() {
    let p = plan(1000, 2026, LARGE_LEN);
    let lens: Vec<usize> = p.iter().map(Download::len).collect();
    assert_eq!(lens[0], LARGE_LEN);
    assert_eq!(lens[1], SMALL_LEN);
    assert!(lens.iter().all(|&l| (1..=LARGE_LEN).contains(&l)));
    assert!(lens.iter().filter(|&&l| l < 64 << 10).count() > 400);
    assert!(lens.iter().filter(|&&l| l > 4 << 20).count() > 20);
    assert_eq!(p.iter().filter(|d| d.tls).count(), 100);
    let total: usize = lens.iter().sum();
    println!("1000 downloads: {:.0} MB", total as f64 / 1e6);
    let reduced: usize = plan(50, 2026, 4 << 20).iter().map(Download::len).sum();
    assert!(plan(50, 2026, 4 << 20).iter().all(|d| d.len() <= 4 << 20));
    println!(
        "50 downloads of at most 4 MiB: {:.0} MB",
        reduced as f64 / 1e6
    );
}
