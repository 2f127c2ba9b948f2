//! Latency of small GETs while the server is busy with work that used to block its loop
//! (issue 12; run by `scripts/bench-latency`, ignored in the suite): a cold 1 GiB download
//! through a 32 MiB page cache, and a `wait`-policy PUT parked on pages a slow reader holds
//! pinned. Each busy phase is measured beside the same client on the idle server, in
//! alternation, in one guest (virtio, TAP namespace), so machine load hits them alike. Prints
//! p50/p99/max per phase and the pinned and old-version page peaks against their bounds.
//! The guest has one vCPU: the network loop and the cache's I/O threads share it.
//!
//! It checks what makes the figures mean what they say, not how fast anything is: the
//! download really reads from disk (fills during the phase), the PUT really is parked for the
//! whole phase (`zerosend_responses_parked` at its start and end) and is answered once the
//! reader lets go, and the reader's body is exactly the version it started with.
//!
//! Environment: BENCH_SECONDS per phase (default 5), BENCH_ROUNDS (default 2).

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw_tests::content::{stamped_block, stamped_version, STAMP_BLOCK};
use hw_tests::netns::GUEST_IP;
use hw_tests::raw_http::{connect, content_length, put_stamped, read_head};
use hw_tests::serve_guest::{ACCESS_FLAGS, METRICS_PORT};
use hw_tests::{Guest, Network, Nic, RunningGuest};

const PORT: u16 = 80;
const CACHE_MB: u64 = 32;
/// 1 GiB in stamped 4 KiB blocks.
const HUGE_BLOCKS: usize = 1 << 18;
const HUGE_LEN: u64 = (HUGE_BLOCKS * STAMP_BLOCK) as u64;
/// The file the slow reader holds: 8 MiB in stamped blocks.
const HELD_BLOCKS: usize = 2048;
/// The parked PUT rewrites the first 2 MiB of it: whatever the reader's kernel accepted
/// before its window closed (its receive buffer, 128 KiB by default, unread) plus the
/// server's pin window (640 KiB) lies inside, so the PUT always touches pinned pages.
const PARKED_BLOCKS: std::ops::Range<usize> = 0..512;
/// A second PUT rewrites the last 4 MiB, far ahead of what the reader was sent: it needs
/// nothing pinned, so it goes ahead at once, and the old bytes are kept for the reader's
/// snapshot (old-version pages).
const AHEAD_BLOCKS: std::ops::Range<usize> = 1024..2048;
/// Besides the pin window, a connection holds pinned the partly acknowledged 64 KiB item at
/// the front of its send queue (netstack releases items whole) and a page at each end.
const PINNED_SLACK_PAGES: f64 = 16.0 + 2.0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn status_line(head: &str) -> &str {
    head.lines().next().unwrap_or("")
}

/// What one run of small GETs saw.
struct Sample {
    /// Each GET's latency in microseconds.
    latencies: Vec<u64>,
    /// TCP segments retransmitted meanwhile by the host side (every client in the
    /// namespace) and by the server, so a long tail can be told from a lost segment.
    client_retransmits: u64,
    server_retransmits: f64,
}

impl Sample {
    fn retransmits(&self) -> String {
        format!(
            "retransmits host/server {}/{}",
            self.client_retransmits, self.server_retransmits
        )
    }
}

/// TCP segments retransmitted by the calling thread's network namespace (`RetransSegs`).
fn namespace_retransmits() -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RetransSegs")
        .and_then(|(_, value)| value.parse().ok())
        .expect("RetransSegs in /proc/net/snmp")
}

/// Small GETs on one keep-alive connection for `seconds`.
fn small_gets(seconds: f64) -> Sample {
    let server_before = metric(&metrics(), "zerosend_tcp_retransmits_total");
    let client_before = namespace_retransmits();
    let s = connect(PORT);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut latencies = Vec::new();
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < until {
        let t = Instant::now();
        w.write_all(b"GET /small.txt HTTP/1.1\r\nHost: g\r\n\r\n")
            .unwrap();
        let head = read_head(&mut r);
        let mut body = vec![0; content_length(&head)];
        r.read_exact(&mut body).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        latencies.push(t.elapsed().as_micros() as u64);
    }
    Sample {
        latencies,
        client_retransmits: namespace_retransmits() - client_before,
        server_retransmits: metric(&metrics(), "zerosend_tcp_retransmits_total") - server_before,
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn row(phase: &str, latencies: &[u64], note: &str) {
    let mut latencies = latencies.to_vec();
    latencies.sort_unstable();
    println!(
        "{phase:<36} {:>6} {:>9.2} {:>9.2} {:>9.2}  {note}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        *latencies.last().unwrap() as f64 / 1000.0
    );
}

/// Every metric on the metrics page (one request).
fn metrics() -> HashMap<String, f64> {
    let mut s = connect(METRICS_PORT);
    write!(
        s,
        "GET /_zerosend/metrics HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn metric(m: &HashMap<String, f64>, name: &str) -> f64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("no metric {name} on the metrics page"))
}

fn upload_huge() -> String {
    status_line(&put_stamped(PORT, "/huge.bin", 1, HUGE_BLOCKS)).to_string()
}

/// Downloads /huge.bin from `offset` on (a range request, wrapping at the end) until
/// `stop`: bytes read and seconds spent.
fn download_huge(mut offset: u64, stop: Arc<AtomicBool>) -> (u64, f64) {
    let started = Instant::now();
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    while !stop.load(Ordering::Relaxed) {
        let mut s = connect(PORT);
        write!(
            s,
            "GET /huge.bin HTTP/1.1\r\nHost: g\r\nConnection: close\r\nRange: bytes={offset}-\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let head = read_head(&mut r);
        assert!(head.starts_with("HTTP/1.1 206"), "download: {head}");
        loop {
            let n = r.read(&mut buf).unwrap();
            total += n as u64;
            offset += n as u64;
            if n == 0 || stop.load(Ordering::Relaxed) {
                break;
            }
        }
        if offset >= HUGE_LEN {
            offset = 0;
        }
    }
    (total, started.elapsed().as_secs_f64())
}

/// A Content-Range PUT of stamped blocks `blocks` of `version` to /held.bin, sent on a new
/// connection whose answer is read later.
fn send_held_put(version: u32, blocks: std::ops::Range<usize>) -> TcpStream {
    let mut s = connect(PORT);
    let (start, end) = (blocks.start * STAMP_BLOCK, blocks.end * STAMP_BLOCK);
    write!(
        s,
        "PUT /held.bin HTTP/1.1\r\nHost: g\r\nConnection: close\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/*\r\n\r\n",
        end - start,
        end - 1
    )
    .unwrap();
    for i in blocks {
        s.write_all(&stamped_block(version, i)).unwrap();
    }
    s
}

fn answer(s: TcpStream) -> String {
    status_line(&read_head(&mut BufReader::new(s))).to_string()
}

fn apply(content: &mut [u8], version: u32, blocks: std::ops::Range<usize>) {
    for i in blocks {
        content[i * STAMP_BLOCK..(i + 1) * STAMP_BLOCK].copy_from_slice(&stamped_block(version, i));
    }
}

fn boot(seconds: f64) -> RunningGuest {
    // The parked PUT must outlast its phase: the writer's wait and the parked-response
    // timeout (--request-timeout-secs) are set well beyond it.
    let wait_ms = (seconds * 1000.0) as u64 + 15_000;
    let request_timeout = seconds as u64 + 30;
    let guest = Guest::new("bench-latency", Nic::Virtio)
        .network(Network::Tap)
        // The guest's tmpfs (/data) gets half its memory: 1 GiB and the rest must fit.
        .memory_mb(2560)
        .timeout(Duration::from_secs(3600))
        .file("/data/small.txt", b"a small file\n".to_vec())
        .file("/data/held.bin", stamped_version(0, HELD_BLOCKS))
        .run(&format!(
            "zerosend serve --nic auto --root /data --ip {GUEST_IP}/24 --port {PORT} {ACCESS_FLAGS} \
             --cache-mb {CACHE_MB} --max-put-mb 2048 --write-policy wait \
             --wait-timeout-ms {wait_ms} --request-timeout-secs {request_timeout} \
             --stats-interval 30"
        ))
        .start()
        .unwrap();
    guest.wait_for_console("zerosend: serving", Duration::from_secs(300));
    guest
}

/// What one parked-PUT phase saw.
struct Parked {
    latencies: Vec<u64>,
    note: String,
    /// Peaks of pinned and old-version pages read while the reader still held its pages.
    pinned_now: f64,
    old_now: f64,
}

/// The parked-PUT phase: a reader takes the head of /held.bin and stops reading, so its pin
/// window stays pinned; a PUT ahead of it goes in (old version kept for the reader); a PUT
/// over the pinned pages parks; small GETs are timed meanwhile; then the reader reads on to
/// the end (its body must be `before`, exactly) and the parked PUT must go in.
fn parked_phase(seconds: f64, round: u32, before: Vec<u8>) -> (Parked, Vec<u8>) {
    let (ahead_version, parked_version) = (2 * round - 1, 2 * round);
    let mut reader = BufReader::new(connect(PORT));
    reader
        .get_mut()
        .write_all(b"GET /held.bin HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        .unwrap();
    let head = read_head(&mut reader);
    assert!(head.starts_with("HTTP/1.1 200"), "held reader: {head}");
    let mut body = vec![0u8; content_length(&head)];
    reader.read_exact(&mut body[..1024]).unwrap();
    // Until the server has filled the reader's window and its own pin window.
    let mut pinned = 0.0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        pinned = metric(&metrics(), "zerosend_pinned_pages");
        if pinned >= 100.0 {
            break;
        }
    }
    assert!(pinned > 0.0, "the held reader pins nothing");

    let ahead = answer(send_held_put(ahead_version, AHEAD_BLOCKS));
    assert!(
        ahead.starts_with("HTTP/1.1 204"),
        "PUT ahead of the reader: {ahead}"
    );
    let mut after = before.clone();
    apply(&mut after, ahead_version, AHEAD_BLOCKS);

    let m0 = metrics();
    let put_sent = Instant::now();
    let writer = send_held_put(parked_version, PARKED_BLOCKS);
    let mut parked_at_start = 0.0;
    for _ in 0..50 {
        parked_at_start = metric(&metrics(), "zerosend_responses_parked");
        if parked_at_start >= 1.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let sample = small_gets(seconds);
    let m1 = metrics();
    let parked_at_end = metric(&m1, "zerosend_responses_parked");
    let waits =
        metric(&m1, "zerosend_writer_waits_total") - metric(&m0, "zerosend_writer_waits_total");
    let (pinned_now, old_now) = (
        metric(&m1, "zerosend_pinned_pages"),
        metric(&m1, "zerosend_old_version_pages"),
    );

    // The reader reads on: the pins go, the parked PUT goes in after it.
    let resumed = Instant::now();
    reader.read_exact(&mut body[1024..]).unwrap();
    let reader_secs = resumed.elapsed().as_secs_f64();
    drop(reader);
    let status = answer(writer);
    let put_secs = put_sent.elapsed().as_secs_f64();
    let exact = body == before;
    assert!(
        exact,
        "the held reader's body is not exactly the version it started with"
    );
    if status.starts_with("HTTP/1.1 204") {
        apply(&mut after, parked_version, PARKED_BLOCKS);
    }
    let note = format!(
        "{}; parked gauge {parked_at_start}/{parked_at_end} (start/end), {waits} writer stalls on pins; \
         PUT {status:?} after {put_secs:.1} s (reader drained in {reader_secs:.1} s, body exactly its version)",
        sample.retransmits()
    );
    assert!(
        parked_at_start >= 1.0 && parked_at_end >= 1.0,
        "the PUT was not parked throughout: {note}"
    );
    (
        Parked {
            latencies: sample.latencies,
            note,
            pinned_now,
            old_now,
        },
        after,
    )
}

#[test]
#[ignore = "benchmark: run with scripts/bench-latency"]
fn small_get_latency_while_busy() {
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    let rounds: u32 = env_or("BENCH_ROUNDS", 2);
    let guest = boot(seconds);
    let netns = guest.netns();

    let t = Instant::now();
    let uploaded = netns.spawn(upload_huge).join().unwrap();
    assert!(
        uploaded.starts_with("HTTP/1.1 201"),
        "1 GiB PUT: {uploaded}"
    );
    println!(
        "1 GiB uploaded ({uploaded}) in {:.1} s; --cache-mb {CACHE_MB} --write-policy wait",
        t.elapsed().as_secs_f64()
    );

    println!(
        "small GETs (13 bytes, one keep-alive client), milliseconds; {seconds} s per phase, {rounds} rounds alternating"
    );
    println!(
        "{:<36} {:>6} {:>9} {:>9} {:>9}",
        "phase", "n", "p50", "p99", "max"
    );
    let mut all: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut offset = 0u64;
    let mut held = stamped_version(0, HELD_BLOCKS);
    let (mut pinned_during_parked, mut old_during_parked) = (0f64, 0f64);
    let mut download_peak = f64::NAN;
    for round in 1..=rounds {
        let idle = netns.spawn(move || small_gets(seconds)).join().unwrap();
        row(
            &format!("idle (round {round})"),
            &idle.latencies,
            &idle.retransmits(),
        );
        all.entry("idle").or_default().extend(&idle.latencies);

        // A cold download: 1 GiB never fits the 32 MiB cache, and each phase starts 64 MiB
        // past where the last one stopped, beyond anything left resident or read ahead.
        let fills_before = metric(
            &netns.spawn(metrics).join().unwrap(),
            "zerosend_fills_total",
        );
        let stop = Arc::new(AtomicBool::new(false));
        let download = netns.spawn({
            let stop = stop.clone();
            move || download_huge(offset, stop)
        });
        std::thread::sleep(Duration::from_millis(500));
        let busy = netns.spawn(move || small_gets(seconds)).join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let (bytes, secs) = download.join().unwrap();
        let fills = metric(
            &netns.spawn(metrics).join().unwrap(),
            "zerosend_fills_total",
        ) - fills_before;
        assert!(fills > 0.0, "the download read nothing from disk: not cold");
        offset = (offset + bytes + (64 << 20)) % HUGE_LEN;
        row(
            &format!("cold 1 GiB download (round {round})"),
            &busy.latencies,
            &format!(
                "{}; download {:.0} Mbit/s, {} MiB, {:.0} MiB read from disk",
                busy.retransmits(),
                bytes as f64 * 8.0 / secs / 1e6,
                bytes >> 20,
                fills * 4096.0 / (1 << 20) as f64
            ),
        );
        all.entry("download").or_default().extend(&busy.latencies);
        if round == 1 {
            // Nothing but the upload, idle GETs and this download ran so far.
            download_peak = metric(
                &netns.spawn(metrics).join().unwrap(),
                "zerosend_pinned_pages_peak",
            );
        }

        let idle = netns.spawn(move || small_gets(seconds)).join().unwrap();
        row(
            &format!("idle (round {round})"),
            &idle.latencies,
            &idle.retransmits(),
        );
        all.entry("idle").or_default().extend(&idle.latencies);

        let before = std::mem::take(&mut held);
        let (phase, after) = netns
            .spawn(move || parked_phase(seconds, round, before))
            .join()
            .unwrap();
        held = after;
        row(
            &format!("parked wait-policy PUT (round {round})"),
            &phase.latencies,
            &phase.note,
        );
        pinned_during_parked = pinned_during_parked.max(phase.pinned_now);
        old_during_parked = old_during_parked.max(phase.old_now);
        all.entry("parked").or_default().extend(&phase.latencies);
    }
    println!("all rounds:");
    for (key, label) in [
        ("idle", "idle"),
        ("download", "cold 1 GiB download"),
        ("parked", "parked wait-policy PUT"),
    ] {
        row(label, &all[key], "");
    }

    let m = netns.spawn(metrics).join().unwrap();
    let window_pages = metric(&m, "zerosend_pin_window_bytes") / 4096.0;
    // One file body at a time (the download, or later the held reader) plus a small GET's
    // single page; the metrics page pins nothing.
    let responses_bound = window_pages + PINNED_SLACK_PAGES + 1.0;
    // Write-back pins the dirty pages it writes: the range PUT ahead of the reader dirties
    // its 4 MiB and is fsynced (written back) before it is answered.
    let writeback_pages = AHEAD_BLOCKS.len() as f64;
    let pinned_bound = responses_bound + writeback_pages;
    let pinned_peak = metric(&m, "zerosend_pinned_pages_peak");
    let old_peak = metric(&m, "zerosend_old_version_pages_peak");
    let old_limit = metric(&m, "zerosend_old_version_pages_limit");
    println!(
        "peak pinned pages until the first download ended: {download_peak} (bound {responses_bound}: one body's {window_pages}-page pin window + {PINNED_SLACK_PAGES} + a small GET's page; cache {} pages)",
        CACHE_MB * 256
    );
    println!(
        "peak pinned pages overall: {pinned_peak} (bound {pinned_bound}: the same + {writeback_pages} dirty pages of the 4 MiB range PUT, pinned by its write-back); {pinned_during_parked} pinned while the PUT was parked"
    );
    println!(
        "peak old-version pages {old_peak} (limit {old_limit}); {old_during_parked} kept for the held reader while the PUT was parked"
    );
    println!(
        "at the end: pinned {} old-version {} parked {}; audit violations {}, write timeouts {}, frames dropped without a TX buffer {}",
        metric(&m, "zerosend_pinned_pages"),
        metric(&m, "zerosend_old_version_pages"),
        metric(&m, "zerosend_responses_parked"),
        metric(&m, "zerosend_audit_violations_total"),
        metric(&m, "zerosend_write_timeouts_total"),
        metric(&m, "zerosend_tx_dropped_no_buffer_total"),
    );
    assert!(
        download_peak <= responses_bound,
        "pinned pages beyond the bound during the download"
    );
    assert!(pinned_peak <= pinned_bound, "pinned pages beyond the bound");
    assert!(
        old_peak <= old_limit,
        "old-version pages beyond their limit"
    );
    guest.stop_server();
}
