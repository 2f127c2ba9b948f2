//! Device faults in the middle of a transfer, proven in the guest, on every NIC model.
//!
//! - **Driver level** (`zs-guest nic-fault`, QEMU's user network with a capture): a fault
//!   armed with `driver::faults` strikes while frames are in flight; the driver's own
//!   watchdog or status check must notice it, reset, hand back every token exactly once and
//!   in submission order, report one recovered error (`TxHang` for a TX hang, `DeviceReset`
//!   for virtio's DEVICE_NEEDS_RESET) that counts the frames it dropped, and then transmit
//!   normally; every frame it reported complete must be on the wire.
//! - **Server level** (`zerosend serve --inject-tx-hang-after-frames N`, curl on the host
//!   side of a TAP device in a namespace the harness created): an 8 MiB download across a
//!   TX hang arrives byte-exact, the server counts the recovery
//!   (`zerosend_device_resets_total`), holds no page-cache pin afterwards and goes on
//!   serving. Then the link goes down for 3 s in the middle of a download (QMP `set_link`):
//!   the download completes through TCP retransmission, or fails cleanly (a curl error, and
//!   every byte received correct), and the server serves the next request.
//!
//! Each test fails when the guarantee is switched off: without the stack's handling of
//! recovered faults the server exits at the hang and the download fails; without the
//! driver's recovery nothing completes after the hang and curl times out.

use std::time::{Duration, Instant};

use hw_tests::netns::GUEST_IP;
use hw_tests::serve_guest::{url, ServerGuest, ACCESS_FLAGS, BIG_LEN, PORT};
use hw_tests::wire::{pcap_frames, Ipv4Frame, IPPROTO_UDP};
use hw_tests::{Guest, GuestRun, Nic};
/// The server's TX hang strikes after this many frames. Chosen to fall inside the first
/// 8 MiB download (which takes a few hundred frames with TSO, thousands without) and well
/// after the metrics request made before it; the test checks both.
const HANG_AFTER_FRAMES: u64 = 60;
/// `zs-guest nic-fault` source ports (tx-hang, device-error) and frame counts.
const FAULT_PORT: u16 = 44004;
const FAULT_AFTER: u64 = 24;
const FAULT_FRAMES: u64 = 96;
/// The frames `nic-fault` sends after the recovery (see nictest.rs).
const FAULT_EXTRA: u64 = 32;

// ---------------------------------------------------------------------------------------
// Driver level
// ---------------------------------------------------------------------------------------

/// `key=value` from a console line.
fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Frames from the guest with UDP source port `port` in the run's capture.
fn frames_from_port(run: &GuestRun, port: u16) -> u64 {
    let data = std::fs::read(run.pcap_path())
        .unwrap_or_else(|e| run.fail(&format!("reading the pcap: {e}")));
    let frames = pcap_frames(&data).unwrap_or_else(|e| run.fail(&e));
    frames
        .iter()
        .filter_map(|f| Ipv4Frame::parse(f))
        .filter(|f| f.proto == IPPROTO_UDP && f.src_port() == port)
        .count() as u64
}

/// Check the `FAULT_RESULT` of one `nic-fault` run: one recovered error of `error`'s kind,
/// the tokens all back in order, those handed back with the error as many as it says were
/// dropped, and every completed frame on the wire.
fn check_fault_result(run: &GuestRun, kind: &str, error: &str, port: u16) {
    let needle = format!("FAULT_RESULT kind={kind} ");
    let line = run
        .lines
        .iter()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| run.fail(&format!("no {needle:?} line")));
    let get = |key: &str| -> &str {
        kv(line, key).unwrap_or_else(|| run.fail(&format!("no {key}= in {line:?}")))
    };
    let num = |key: &str| -> u64 {
        get(key)
            .parse()
            .unwrap_or_else(|_| run.fail(&format!("{key}= is not a number in {line:?}")))
    };
    run.expect_eq(&format!("{kind}: faults struck"), num("struck"), 1);
    run.expect_eq(&format!("{kind}: recovered errors"), num("errors"), 1);
    run.expect_eq(&format!("{kind}: error kind"), get("error"), error);
    let lost = num("lost");
    if lost == 0 {
        run.fail(&format!(
            "{kind}: the fault dropped no frame in flight: {line}"
        ));
    }
    run.expect_eq(
        &format!("{kind}: tokens handed back with the error"),
        num("returned_with_error"),
        lost,
    );
    let total = FAULT_FRAMES + FAULT_EXTRA;
    run.expect_eq(&format!("{kind}: tokens back"), num("tokens"), total);
    run.expect_eq(&format!("{kind}: tokens in order"), get("in_order"), "yes");
    // Every frame the driver reported complete reached the wire (QEMU sends on completion);
    // none twice.
    let on_wire = frames_from_port(run, port);
    if on_wire < total - lost || on_wire > total {
        run.fail(&format!(
            "{kind}: {on_wire} frames on the wire, expected between {} (completed) and {total}",
            total - lost
        ));
    }
    eprintln!("faults: driver {kind}: {error} dropped {lost} of {total} frames, {on_wire} on the wire, tokens all back in order");
}

fn driver_recovers(nic: Nic) {
    let started = Instant::now();
    let command = format!(
        "zs-guest nic-fault --fault tx-hang --after {FAULT_AFTER} --frames {FAULT_FRAMES}; \
         zs-guest nic-fault --fault device-error --after {FAULT_AFTER} --frames {FAULT_FRAMES}"
    );
    let run = Guest::new(&format!("faults-driver-{}", nic.name()), nic)
        .pcap()
        .timeout(Duration::from_secs(420))
        .run(&command)
        .start()
        .unwrap()
        .wait()
        .unwrap();
    run.expect_success();
    check_fault_result(&run, "tx-hang", "TxHang", FAULT_PORT);
    if nic == Nic::Virtio {
        check_fault_result(&run, "device-error", "DeviceReset", FAULT_PORT + 1);
    } else if !run.console_contains("INJECT_REFUSED") {
        run.fail("the e1000 family accepted a DeviceError injection it cannot produce");
    }
    eprintln!(
        "faults: driver test on {} took {:.1?}",
        nic.name(),
        started.elapsed()
    );
}

hw_tests::for_each_nic!(driver_recovers);

// ---------------------------------------------------------------------------------------
// Server level
// ---------------------------------------------------------------------------------------

fn boot(nic: Nic) -> ServerGuest {
    ServerGuest::boot("faults-server", nic, 4242, |guest| {
        guest.run(&format!(
            "zerosend serve --nic auto --root /data --ip {GUEST_IP}/24 --port {PORT} {ACCESS_FLAGS} \
             --inject-tx-hang-after-frames {HANG_AFTER_FRAMES}"
        ))
    })
}

/// Download big.bin and check it byte for byte; returns the seconds taken.
fn download_big(srv: &ServerGuest, what: &str) -> f64 {
    let secs = srv.download_big(what);
    eprintln!(
        "faults: {} {what}: 8 MiB byte-exact in {secs:.2}s",
        srv.nic.name()
    );
    secs
}

/// No page-cache pin outlives the responses: the frames dropped by a reset were handed
/// back (their tokens returned) and released their pins.
fn check_no_pins(srv: &ServerGuest, what: &str) {
    let m = srv.metrics();
    for name in ["zerosend_pins_held", "zerosend_pinned_pages"] {
        let v = srv.metric(&m, name);
        srv.check(v == 0, &format!("{what}: {name} is {v}, not 0"));
    }
}

/// (a) A TX hang strikes in the middle of an 8 MiB download.
fn tx_hang_mid_download(srv: &ServerGuest) {
    let strike = "fault injection: TxHang strikes now";
    let before = srv.metrics();
    let frames_before = srv.metric(&before, "zerosend_frames_tx_total");
    srv.check(
        srv.guest.console_lines_with(strike).is_empty() && frames_before + 10 < HANG_AFTER_FRAMES,
        &format!("the TX hang struck before the download ({frames_before} frames sent)"),
    );
    download_big(srv, "download across a TX hang");
    let after = srv.metrics();
    let frames_after = srv.metric(&after, "zerosend_frames_tx_total");
    srv.check(
        !srv.guest.console_lines_with(strike).is_empty(),
        "the injected TX hang never struck",
    );
    // The download went on for a good while after the hang: it struck mid-transfer.
    srv.check(
        frames_after > HANG_AFTER_FRAMES + 20,
        &format!("only {frames_after} frames sent: the hang did not strike mid-download"),
    );
    // The driver's watchdog found it (not the injection), and the stack went on.
    srv.check(
        srv.guest
            .console_lines_with("TX hang")
            .iter()
            .any(|l| l.contains("driver::e1000") || l.contains("driver::virtio")),
        "the driver's watchdog did not report the hang",
    );
    srv.check(
        !srv.guest
            .console_lines_with("NIC fault, recovered")
            .is_empty(),
        "the stack did not report a recovered NIC fault",
    );
    let resets = srv.metric(&after, "zerosend_device_resets_total");
    srv.check(
        resets == 1,
        &format!("zerosend_device_resets_total is {resets}, expected 1"),
    );
    check_no_pins(srv, "after the TX hang");
    download_big(srv, "second download after the TX hang");
    eprintln!(
        "faults: {} TX hang after frame {HANG_AFTER_FRAMES} of {frames_after}: recovered, counted once, pins 0",
        srv.nic.name()
    );
}

/// (b) The link goes down for 3 s in the middle of a download.
fn link_down_mid_download(srv: &ServerGuest) {
    let retransmits_before = srv.metric(&srv.metrics(), "zerosend_tcp_retransmits_total");
    let out = srv.scratch_dir("faults").join("flap.bin");
    let _ = std::fs::remove_file(&out);
    // curl reads at most 1 MiB/s, so the download takes about 8 s and the link goes down
    // in its middle, whatever the speed of the guest. The client's receive buffer is kept
    // small (this namespace's `tcp_rmem`): with the host's default (up to 6 MiB) a sender
    // whose window opens fast has most of the file in that buffer before the outage, and
    // nothing is left to lose.
    let rmem = |value: &str| {
        let o = srv
            .guest
            .netns()
            // The namespace's own /proc/sys (`sh` only: procps may not be installed).
            .command("sh")
            .args([
                "-c",
                &format!("echo '{value}' > /proc/sys/net/ipv4/tcp_rmem"),
            ])
            .output()
            .unwrap();
        srv.check(
            o.status.success(),
            &format!("setting tcp_rmem: {}", String::from_utf8_lossy(&o.stderr)),
        );
    };
    let default_rmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "4096 131072 6291456".into());
    rmem("4096 65536 262144");
    let mut curl = srv
        .guest
        .netns()
        .command("curl")
        .args(["-sS", "--max-time", "120", "--limit-rate", "1M", "-o"])
        .arg(&out)
        .args(["-w", "%{http_code} %{size_download}", &url("/big.bin")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let size = || std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    while size() < 1 << 20 {
        if started.elapsed() > Duration::from_secs(60) || curl.try_wait().unwrap().is_some() {
            let _ = curl.kill();
            srv.guest.fail(&format!(
                "the download did not reach 1 MiB ({} bytes) before the link went down",
                size()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let at = size();
    srv.guest.set_link(false).unwrap();
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    srv.guest.set_link(true).unwrap();
    let down_for = down.elapsed();
    let o = curl.wait_with_output().unwrap();
    let secs = started.elapsed().as_secs_f64();
    rmem(&default_rmem);
    let got = std::fs::read(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    // Either outcome must leave only correct bytes behind.
    srv.check(
        got.len() <= BIG_LEN && got[..] == srv.big[..got.len()],
        "the bytes received across the link outage are not the file's",
    );
    let outcome = if o.status.success() {
        srv.check(
            stdout == format!("200 {BIG_LEN}") && got.len() == BIG_LEN,
            &format!("curl: {stdout} {stderr}"),
        );
        "completed byte-exact (TCP retransmitted)"
    } else {
        // A clean failure is a reset or closed connection, never a hang until curl's own
        // timeout (exit 28).
        let code = o.status.code();
        srv.check(
            matches!(code, Some(18 | 52 | 56)),
            &format!("curl failed uncleanly (exit {code:?}): {stdout} {stderr}"),
        );
        "reset cleanly"
    };
    let retransmits = srv.metric(&srv.metrics(), "zerosend_tcp_retransmits_total");
    srv.check(
        retransmits > retransmits_before,
        "no TCP retransmission: the link outage lost nothing?",
    );
    eprintln!(
        "faults: {} link down for {down_for:.1?} at {} KiB: download {outcome} in {secs:.1}s, {} retransmits",
        srv.nic.name(),
        at >> 10,
        retransmits - retransmits_before
    );
    // The server serves the next request.
    let o = srv.curl(&[&url("/hello.txt")]);
    srv.check(
        o.stdout == b"hello from zerosend\n",
        &format!(
            "no service after the link outage: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
    );
    download_big(srv, "download after the link outage");
    check_no_pins(srv, "after the link outage");
}

fn server_survives_faults(nic: Nic) {
    let started = Instant::now();
    let srv = boot(nic);
    tx_hang_mid_download(&srv);
    link_down_mid_download(&srv);
    let run = srv.guest.stop().unwrap();
    if run.console_contains("panicked") {
        run.fail("the server panicked");
    }
    eprintln!(
        "faults: server test on {} took {:.1?}",
        nic.name(),
        started.elapsed()
    );
}

hw_tests::for_each_nic!(server_survives_faults);
