//! `zerosend serve` under ordinary load and hostile clients, in a guest, with real Linux
//! clients in the TAP namespace: thousands of short connections (`ab` without keep-alive),
//! 200 reconnects from one fixed client port right after the server closed (our side in
//! TIME-WAIT), 300 slowloris connections while a normal client downloads, and clients that
//! request large files and never read. After each, every body a client got is byte-exact,
//! the server still serves, its memory stays under the budget it printed at start-up, and
//! the placeholder poison never appeared on the wire (the server's own pcap is scanned).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw_tests::content::{random_bytes, sha256_hex};
use hw_tests::netns::GUEST_IP;
use hw_tests::serve_guest::{metrics_url, url, ServerGuest, ACCESS_FLAGS, PORT};
use hw_tests::{Nic, RunningGuest};

const MEDIUM_LEN: usize = 64 << 10;

struct Server {
    guest: RunningGuest,
    medium: Vec<u8>,
    /// Bytes the server said it would stay within.
    budget: u64,
}

impl Server {
    fn boot(nic: Nic) -> Server {
        let medium = random_bytes(7, MEDIUM_LEN);
        let guest = ServerGuest::boot("load", nic, 8, |guest| {
            guest
                .pcap()
                .file("/data/medium.bin", medium.clone())
                .run(&format!(
                    "zerosend serve --nic auto --root /data --ip {GUEST_IP}/24 --port {PORT} {ACCESS_FLAGS} \
                 --cache-mb 96 --request-timeout-secs 8 --idle-timeout-secs 10 \
                 --send-stall-timeout-secs 5"
                ))
        })
        .guest;
        let line = guest.wait_for_console("zerosend: memory budget", Duration::from_secs(5));
        let budget = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("total="))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| guest.fail(&format!("no total= in {line:?}")));
        Server {
            guest,
            medium,
            budget,
        }
    }

    #[track_caller]
    fn check(&self, ok: bool, what: &str) {
        self.guest.check(ok, what);
    }

    fn curl(&self, args: &[&str]) -> std::process::Output {
        self.guest.curl(Duration::from_secs(60), args)
    }

    /// One metric's value from `/_zerosend/metrics`.
    fn metric(&self, name: &str) -> u64 {
        let out = self.curl(&[&metrics_url()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(' ')?;
                (n == name).then(|| v.trim().parse::<f64>().ok().map(|v| v as u64))?
            })
            .unwrap_or_else(|| self.guest.fail(&format!("metric {name} missing:\n{text}")))
    }

    /// The server's resident memory stays within the budget it computed at start.
    fn check_memory(&self, when: &str) -> u64 {
        let rss = self.metric("zerosend_process_resident_memory_bytes");
        eprintln!(
            "load: RSS {when}: {} KiB (budget {} KiB)",
            rss >> 10,
            self.budget >> 10
        );
        self.check(
            rss <= self.budget,
            &format!("RSS {rss} exceeds the budget {} {when}", self.budget),
        );
        rss
    }

    /// A GET of medium.bin that must be byte-exact.
    fn check_serves(&self, when: &str) {
        let out = self.curl(&[&url("/medium.bin")]);
        self.check(
            out.status.success() && out.stdout == self.medium,
            &format!(
                "medium.bin not served byte-exact {when}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        );
    }
}

/// `ab` without keep-alive: a new connection per request.
fn churn(srv: &Server, requests: usize) {
    let out = srv
        .guest
        .netns()
        .command("ab")
        .args(["-q", "-n", &requests.to_string(), "-c", "32", "-s", "30"])
        .arg(url("/hello.txt"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    eprintln!(
        "load: ab -n {requests} -c 32: {} req/s, failed {}, non-2xx {}",
        field("Requests per second:").unwrap_or_default(),
        field("Failed requests:").unwrap_or_default(),
        field("Non-2xx responses:").unwrap_or_else(|| "0".into()),
    );
    srv.check(
        out.status.success()
            && field("Complete requests:").as_deref() == Some(&requests.to_string())
            && field("Failed requests:").as_deref() == Some("0")
            && field("Non-2xx responses:").is_none(),
        &format!(
            "ab failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    );
}

/// The client reconnects from one fixed port right after each response; the server closes
/// first (`Connection: close`), so its side of every previous connection is in TIME-WAIT
/// when the next SYN of the same 4-tuple arrives.
///
/// curl may also close first: it has the whole body (Content-Length) and closes at once, and
/// when its FIN leaves before the server's arrives, the *client's* socket is the one in
/// TIME-WAIT, for 60 s, and curl cannot bind that port again (exit 45, EADDRINUSE; seen once
/// in CI at round 35 of 200). So curl gets a short range and takes the next port only when
/// 40123 is held that way: nearly every round still reuses the 4-tuple the server holds.
fn fixed_port_reconnects(srv: &Server, rounds: usize) {
    let expected = sha256_hex(&srv.medium);
    let mut slowest = Duration::ZERO;
    for round in 0..rounds {
        let started = Instant::now();
        let out = srv.curl(&[
            "--local-port",
            "40123-40130",
            "-H",
            "Connection: close",
            &url("/medium.bin"),
        ]);
        let took = started.elapsed();
        slowest = slowest.max(took);
        srv.check(
            out.status.success() && sha256_hex(&out.stdout) == expected,
            &format!(
                "reconnect {round}: body not byte-exact ({} bytes): {}",
                out.stdout.len(),
                String::from_utf8_lossy(&out.stderr)
            ),
        );
        // The bug this guards against made every second reconnect take 15-18 s (the SYN
        // met a TIME-WAIT socket); a few seconds of slack keep a loaded machine from failing.
        srv.check(
            took < Duration::from_secs(5),
            &format!("reconnect {round} took {took:?}"),
        );
    }
    eprintln!("load: {rounds} fixed-port reconnects byte-exact, slowest {slowest:?}");
}

/// 300 connections that send a request head one byte every 2 s (reconnecting when the
/// server drops them), while a normal client downloads; returns the normal client's
/// success rate.
fn slowloris(srv: &Server, attackers: usize, seconds: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let reconnects = Arc::new(AtomicU64::new(0));
    let head =
        b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut threads = Vec::new();
    for _ in 0..attackers {
        let (stop, reconnects) = (stop.clone(), reconnects.clone());
        threads.push(srv.guest.netns().spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect((GUEST_IP, PORT)) else {
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                };
                reconnects.fetch_add(1, Ordering::Relaxed);
                for byte in head.iter().cycle() {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[*byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(2));
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(3)); // let them connect
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut ok, mut tries, mut slowest) = (0u32, 0u32, Duration::ZERO);
    let expected = sha256_hex(&srv.medium);
    while Instant::now() < deadline {
        tries += 1;
        let started = Instant::now();
        let out = srv.curl(&["--max-time", "10", &url("/medium.bin")]);
        if out.status.success() && sha256_hex(&out.stdout) == expected {
            ok += 1;
            slowest = slowest.max(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let rate = ok as f64 / tries as f64;
    eprintln!(
        "load: {attackers} slowloris connections for {seconds} s ({} connects): normal client {ok}/{tries} byte-exact ({:.0}%), slowest success {slowest:?}",
        reconnects.load(Ordering::Relaxed),
        rate * 100.0
    );
    rate
}

/// Clients that request a large file and never read it: the send-stall timeout aborts them
/// and releases their pins, while other clients are served.
fn non_reading_clients(srv: &Server, clients: usize) {
    let aborts_before = srv.metric("zerosend_send_stall_aborts_total");
    let mut held = Vec::new();
    for _ in 0..clients {
        held.push(srv.guest.netns().spawn(|| {
            let mut s = TcpStream::connect((GUEST_IP, PORT)).unwrap();
            s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            // Never read; keep the socket open until the server gives up on it.
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            std::thread::sleep(Duration::from_secs(20));
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }));
    }
    std::thread::sleep(Duration::from_secs(2));
    srv.check(
        srv.metric("zerosend_pins_held") > 0,
        "the non-reading clients' responses hold pins",
    );
    srv.check_serves("while clients stall");
    let deadline = Instant::now() + Duration::from_secs(30);
    while srv.metric("zerosend_send_stall_aborts_total") < aborts_before + clients as u64 {
        srv.check(
            Instant::now() < deadline,
            "stalled connections were not aborted",
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.metric("zerosend_pins_held") > 0 {
        srv.check(Instant::now() < deadline, "pins not released after abort");
        std::thread::sleep(Duration::from_millis(500));
    }
    for t in held {
        let _ = t.join();
    }
    eprintln!("load: {clients} non-reading clients aborted, pins released");
}

/// No segment the server had to drop for want of a mapping (the wire itself is scanned for
/// placeholder poison once the guest has stopped).
fn check_no_unmapped_segments(srv: &Server) {
    let unmapped = srv.metric("zerosend_tx_unmapped_drops_total");
    srv.check(
        unmapped == 0,
        &format!("{unmapped} segments could not be mapped"),
    );
}

fn load_and_hostile_clients(nic: Nic) {
    let srv = Server::boot(nic);
    srv.check_memory("at start");
    churn(&srv, 1000);
    let after_1k = srv.check_memory("after 1k connections");
    churn(&srv, 3000);
    let after_4k = srv.check_memory("after 4k connections");
    eprintln!(
        "load: RSS after 4k / after 1k connections: {:.3}",
        after_4k as f64 / after_1k as f64
    );
    fixed_port_reconnects(&srv, 200);
    let rate = slowloris(&srv, 300, 30);
    srv.check(
        rate >= 0.9,
        &format!(
            "the normal client was served {:.0}% of the time",
            rate * 100.0
        ),
    );
    srv.check_serves("after the slowloris clients");
    non_reading_clients(&srv, 4);
    srv.check_memory("at the end");
    srv.check_serves("at the end");
    check_no_unmapped_segments(&srv);
    let run = srv.guest.stop_server();
    hw_tests::expect_no_poison_on_the_wire(&run);
}

/// Both NIC families at once (two guests: the harness allows two per process), each its
/// own server and namespace.
#[test]
fn load_and_hostile_clients_on_virtio_and_e1000() {
    std::thread::scope(|scope| {
        let runs =
            [Nic::Virtio, Nic::E1000].map(|nic| scope.spawn(move || load_and_hostile_clients(nic)));
        for run in runs {
            if let Err(panic) = run.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}
