//! The netstack in a guest, on the e1000 family through VFIO and the vIOMMU, sends a file
//! zero-copy from its page cache to a real Linux TCP peer on the host side of a TAP device
//! (in a namespace the harness created). The host verifies length and sha256.

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use hw_tests::content::{random_bytes, sha256_hex};
use hw_tests::netns::{GUEST_IP, HOST_IP};
use hw_tests::{Guest, Network, Nic};

const PORT: u16 = 5001;
const LEN: usize = 4 << 20;

/// Accepts one connection and reads it to the end (bounded in time).
fn receive_one(deadline: Duration) -> Result<Vec<u8>, String> {
    let listener = TcpListener::bind((HOST_IP, PORT)).map_err(|e| format!("bind: {e}"))?;
    listener.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let (mut stream, peer) = loop {
        match listener.accept() {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > deadline {
                    return Err("no connection from the guest".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    if peer.ip().to_string() != GUEST_IP {
        return Err(format!("connection from {peer}, not the guest"));
    }
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut body = Vec::with_capacity(LEN);
    stream
        .read_to_end(&mut body)
        .map_err(|e| format!("read after {} bytes: {e}", body.len()))?;
    Ok(body)
}

fn stack_sends_file_to_linux(nic: Nic, extra: &str) {
    hw_tests::require_testbed();
    let data = random_bytes(0x5eed, LEN);
    let guest = Guest::new(&format!("stack-{}{}", nic.name(), extra.replace(' ', "")), nic)
        .network(Network::Tap)
        .memory_mb(1024)
        .pcap()
        .timeout(Duration::from_secs(900))
        .file("/data/send.bin", data.clone())
        .run(&format!(
            "zs-guest stack-send --connect {HOST_IP}:{PORT} --file /data/send.bin --ip {GUEST_IP}/24 --timeout-secs 240 {extra}"
        ))
        .start()
        .unwrap();
    let receiver = guest
        .netns()
        .spawn(|| receive_one(Duration::from_secs(600)));
    let run = guest.wait().unwrap();
    let received = receiver.join().unwrap();
    run.expect_success();
    let received = received.unwrap_or_else(|e| run.fail(&e));
    run.expect_eq("bytes received", received.len(), LEN);
    let sent = run.require("STACK_SENT");
    let expected = format!("sha256={}", sha256_hex(&data));
    if !sent.contains(&expected) {
        run.fail(&format!(
            "the guest pinned other bytes than the file: {sent}"
        ));
    }
    if !sent.contains("outcome=acknowledged") {
        run.fail(&format!("send not completed as acknowledged: {sent}"));
    }
    run.expect_eq(
        "sha256 received by Linux",
        sha256_hex(&received),
        sha256_hex(&data),
    );
    let stats = run.require("STACK_STATS");
    eprintln!("{stats}");
    for must in [
        "payload_bytes_copied=0 ",
        "pins_held_now=0 ",
        "tx_unmapped_drops=0 ",
    ] {
        if !stats.contains(must) {
            run.fail(&format!("expected {must:?} in {stats}"));
        }
    }
    let audit = run.require("STACK_AUDIT");
    if !audit.ends_with("violations=0") {
        run.fail(&format!("audit: {audit}"));
    }
    let pcap = std::fs::read(run.pcap_path()).unwrap_or_else(|e| run.fail(&e.to_string()));
    match hw_tests::poisoned_frames(&pcap) {
        Ok(0) => {}
        Ok(n) => run.fail(&format!("{n} frames on the wire carry placeholder poison")),
        Err(e) => run.fail(&format!("reading the capture: {e}")),
    }
}

fn stack_sends_a_file_to_linux_tcp(nic: Nic) {
    stack_sends_file_to_linux(nic, "");
}

hw_tests::for_each_nic!(stack_sends_a_file_to_linux_tcp);

#[test]
fn e1000_stack_without_tso_sends_a_file_to_linux_tcp() {
    stack_sends_file_to_linux(Nic::E1000, "--no-tso");
}
