//! An idle server uses close to no CPU: NIC interrupts through VFIO (MSI-X on e1000e and
//! virtio-net, INTx on e1000) let the event loop sleep when there is no traffic, instead of
//! waking every 200 us to poll. On every NIC model, two boots in one test: `--interrupts
//! off` (the polling loop, the baseline) and `--interrupts on`. Each boot:
//!
//! 1. lets the server idle (10 s; `ZEROSEND_IDLE_SECS=30` for the figures in the report)
//!    and reads the QEMU process's CPU seconds (utime + stime) before and after, and the
//!    loop's sleep counter (`zerosend_loop_sleeps_total`) from the metrics page;
//! 2. after idling, times small requests' first bytes (curl `time_starttransfer`, median
//!    of five, printed only) and downloads the 8 MiB file (sha256 verified) to prove the
//!    wake-up path;
//! 3. downloads a 64 MiB file three times (sha256 verified), printing the median time, so
//!    the busy path can be compared between the two modes.
//!
//! Asserted (no timings): every download byte-exact; with interrupts on, the NIC signalled
//! interrupts (`zerosend_interrupts_total` > 0) and at least one sleep ended by an
//! interrupt; idle sleeps per second are far fewer with interrupts than polling. Switched
//! off (`--interrupts off`), the same counters show no interrupt at all and thousands of
//! naps a second, which the test also checks, so the assertions do tell the modes apart.

use std::time::{Duration, Instant};

use hw_tests::content::{random_bytes, sha256_hex};
use hw_tests::netns::GUEST_IP;
use hw_tests::serve_guest::{metrics_url, url, ServerGuest, METRICS_PORT, PORT};
use hw_tests::Nic;

/// The throughput file: 64 MiB.
const HUGE_LEN: usize = 64 << 20;
/// Longest sleep with interrupts on (`--idle-max-sleep-ms`, the default).
const MAX_SLEEP_MS: u64 = 100;

/// `--idle-poll-us` of the interrupt boot (`ZEROSEND_IDLE_POLL_US`, default the server's 100).
fn idle_poll_us() -> u64 {
    std::env::var("ZEROSEND_IDLE_POLL_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn idle_secs() -> u64 {
    std::env::var("ZEROSEND_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

/// What one boot measured.
#[derive(Debug)]
struct Figures {
    cpu_idle_secs: f64,
    idle_secs: f64,
    sleeps_per_sec: f64,
    interrupts_idle: u64,
    interrupts_total: u64,
    irq_wakeups: u64,
    first_byte_after_idle_ms: f64,
    huge_median_secs: f64,
    huge_range: (f64, f64),
    mode_line: String,
}

fn metrics(srv: &ServerGuest) -> String {
    let out = srv.curl(&[&metrics_url()]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(srv: &ServerGuest, text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse::<f64>().ok().map(|v| v as u64))?
        })
        .unwrap_or_else(|| srv.guest.fail(&format!("metric {name} missing:\n{text}")))
}

fn download_huge(srv: &ServerGuest, huge: &[u8], what: &str) -> f64 {
    let dir = srv.scratch_dir("huge");
    let out = dir.join("huge.bin");
    let started = Instant::now();
    let o = srv.curl(&[
        "-o",
        out.to_str().unwrap(),
        "-w",
        "%{http_code} %{size_download}",
        &url("/huge.bin"),
    ]);
    let secs = started.elapsed().as_secs_f64();
    let got = std::fs::read(&out).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    srv.check(
        String::from_utf8_lossy(&o.stdout) == format!("200 {HUGE_LEN}"),
        &format!(
            "{what}: curl: {} {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    );
    srv.check(
        sha256_hex(&got) == sha256_hex(huge),
        &format!("{what}: sha256 of the 64 MiB download differs"),
    );
    secs
}

fn run_boot(nic: Nic, interrupts: bool, huge: &[u8]) -> Figures {
    let mode = if interrupts { "on" } else { "off" };
    let srv = ServerGuest::boot(&format!("idle-{mode}"), nic, 15, |guest| {
        guest.file("/data/huge.bin", huge.to_vec()).run(&format!(
            "zerosend serve --nic auto --root /data --ip {GUEST_IP}/24 --port {PORT} \
             --metrics-listen {METRICS_PORT} --interrupts {mode} --idle-max-sleep-ms {MAX_SLEEP_MS} --idle-poll-us {} \
             --stats-interval 3600",
            idle_poll_us()
        ))
    });
    let mode_line = srv
        .guest
        .console_lines_with("zerosend: when idle:")
        .first()
        .cloned()
        .unwrap_or_default();
    // Settle: ARP, the first connection, the server's start-up I/O.
    let o = srv.curl(&[&url("/hello.txt")]);
    srv.check(o.stdout == hw_tests::serve_guest::HELLO, "hello.txt");
    std::thread::sleep(Duration::from_secs(2));

    let idle = idle_secs();
    let before = metrics(&srv);
    let cpu0 = srv.guest.qemu_cpu_seconds().expect("QEMU running");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(idle));
    let cpu1 = srv.guest.qemu_cpu_seconds().expect("QEMU running");
    let idle_wall = t0.elapsed().as_secs_f64();
    let after = metrics(&srv);
    let sleeps = metric(&srv, &after, "zerosend_loop_sleeps_total")
        - metric(&srv, &before, "zerosend_loop_sleeps_total");
    let interrupts_idle = metric(&srv, &after, "zerosend_interrupts_total")
        - metric(&srv, &before, "zerosend_interrupts_total");

    // Requests that find the loop asleep (or napping): their first bytes, median of five
    // (printed only), each after half a second of quiet.
    let mut first_bytes: Vec<f64> = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(500));
            let o = srv.curl(&[
                "-o",
                "/dev/null",
                "-w",
                "%{time_starttransfer}",
                &url("/hello.txt"),
            ]);
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .unwrap_or(f64::NAN)
                * 1000.0
        })
        .collect();
    first_bytes.sort_by(f64::total_cmp);
    let first_byte_after_idle_ms = first_bytes[2];
    srv.download_big(&format!(
        "{} interrupts {mode}: 8 MiB after idling",
        nic.name()
    ));

    let mut huge_secs: Vec<f64> = (0..3)
        .map(|i| {
            download_huge(
                &srv,
                huge,
                &format!("{} interrupts {mode}: 64 MiB #{i}", nic.name()),
            )
        })
        .collect();
    huge_secs.sort_by(f64::total_cmp);
    let end = metrics(&srv);
    let figures = Figures {
        cpu_idle_secs: cpu1 - cpu0,
        idle_secs: idle_wall,
        sleeps_per_sec: sleeps as f64 / idle_wall,
        interrupts_idle,
        interrupts_total: metric(&srv, &end, "zerosend_interrupts_total"),
        irq_wakeups: metric(&srv, &end, "zerosend_loop_irq_wakeups_total"),
        first_byte_after_idle_ms,
        huge_median_secs: huge_secs[1],
        huge_range: (huge_secs[0], huge_secs[2]),
        mode_line,
    };
    eprintln!("idle: {} interrupts {mode}: {figures:?}", nic.name());
    srv.guest.stop_server();
    figures
}

fn idle_cpu(nic: Nic) {
    hw_tests::require_testbed();
    let huge = random_bytes(64, HUGE_LEN);
    let off = run_boot(nic, false, &huge);
    let on = run_boot(nic, true, &huge);
    let mib = HUGE_LEN as f64 / (1 << 20) as f64;
    eprintln!(
        "idle: {nic}: QEMU CPU over {:.0} idle s: polling {:.2} s ({:.0}% of a core), interrupts {:.2} s ({:.0}%), ratio {:.2}; \
         loop sleeps/s {:.0} vs {:.1}; interrupts while idle {}; first byte after idle {:.1} ms vs {:.1} ms; \
         64 MiB median {:.2} s ({:.1} MiB/s, range {:.2}-{:.2}) vs {:.2} s ({:.1} MiB/s, range {:.2}-{:.2}), on/off throughput {:.2}; {}",
        on.idle_secs,
        off.cpu_idle_secs,
        100.0 * off.cpu_idle_secs / off.idle_secs,
        on.cpu_idle_secs,
        100.0 * on.cpu_idle_secs / on.idle_secs,
        on.cpu_idle_secs / off.cpu_idle_secs,
        off.sleeps_per_sec,
        on.sleeps_per_sec,
        on.interrupts_idle,
        off.first_byte_after_idle_ms,
        on.first_byte_after_idle_ms,
        off.huge_median_secs,
        mib / off.huge_median_secs,
        off.huge_range.0,
        off.huge_range.1,
        on.huge_median_secs,
        mib / on.huge_median_secs,
        on.huge_range.0,
        on.huge_range.1,
        off.huge_median_secs / on.huge_median_secs,
        on.mode_line,
        nic = nic.name(),
    );
    // Polling: no interrupt ever, and the loop naps thousands of times a second.
    assert_eq!(
        off.interrupts_total,
        0,
        "{}: interrupts while polling",
        nic.name()
    );
    assert!(
        off.mode_line.contains("polling"),
        "{}: polling mode line: {}",
        nic.name(),
        off.mode_line
    );
    // Interrupts: the NIC's interrupts reached the loop and woke it.
    assert!(
        on.mode_line.contains("interrupts"),
        "{}: no usable interrupt: {}",
        nic.name(),
        on.mode_line
    );
    assert!(
        on.interrupts_total > 0,
        "{}: no interrupt was signalled",
        nic.name()
    );
    assert!(
        on.irq_wakeups > 0,
        "{}: no sleep was ended by an interrupt",
        nic.name()
    );
    // Idle: sleeps bounded by the longest sleep (about 1000 / MAX_SLEEP_MS a second, plus
    // the timers'), far below the polling loop's naps.
    assert!(
        on.sleeps_per_sec * 10.0 < off.sleeps_per_sec,
        "{}: idle sleeps/s {:.1} with interrupts vs {:.1} polling",
        nic.name(),
        on.sleeps_per_sec,
        off.sleeps_per_sec
    );
}

hw_tests::for_each_nic!(idle_cpu);
