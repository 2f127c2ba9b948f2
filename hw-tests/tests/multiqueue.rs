//! Multi-queue drivers in the guest (`zs-guest mq-syn`): a virtio-net with two queue pairs
//! (`mq=on`, a multi-queue TAP) and the 82574L's two queues, each pair on its own thread in
//! a 2-vCPU guest. Linux in the test namespace makes 256 connection attempts from as many
//! source ports; every one must be refused (the RST came back from the queue its SYN arrived
//! on, with correct checksums, or Linux would have retried until the timeout), both queues
//! must have answered some, and no two SYNs with the same indirection-table index may have
//! landed on different queues (the device steers by the Toeplitz hash under our key).
//! The e1000 (82540EM) has one queue: asking it for two gives one that works.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use hw_tests::netns::GUEST_IP;
use hw_tests::{Guest, GuestRun, Network, Nic};

const PORT: u16 = 7;
const ATTEMPTS: u64 = 256;

/// `key=value` of a console line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn queue_lines(run: &GuestRun) -> Vec<String> {
    run.lines
        .iter()
        .filter_map(|l| l.strip_prefix("MQ_QUEUE ").map(str::to_string))
        .collect()
}

fn syns_are_spread_over_queues(nic: Nic, queues: u32) {
    hw_tests::require_testbed();
    let mut guest = Guest::new(&format!("multiqueue-{}", nic.name()), nic)
        .network(Network::Tap)
        .cpus(2)
        .timeout(Duration::from_secs(300));
    if nic == Nic::Virtio {
        guest = guest.queues(queues);
    }
    let guest = guest
        .run(&format!(
            "zs-guest mq-syn --queues {queues} --ip {GUEST_IP} --port {PORT} --syns {ATTEMPTS} --timeout-secs 200"
        ))
        .start()
        .unwrap();
    guest.wait_for_console("MQ_READY", Duration::from_secs(240));
    let refused = guest
        .netns()
        .spawn(|| {
            let target = SocketAddr::from((GUEST_IP.parse::<std::net::Ipv4Addr>().unwrap(), PORT));
            let mut refused = 0u64;
            let mut other = Vec::new();
            for _ in 0..ATTEMPTS {
                match TcpStream::connect_timeout(&target, Duration::from_secs(20)) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                    Err(e) => other.push(e.to_string()),
                    Ok(_) => other.push("connected".into()),
                }
            }
            (refused, other)
        })
        .join()
        .unwrap();
    let run = guest.wait().unwrap();
    run.expect_success();
    let (refused, other) = refused;
    if !other.is_empty() {
        run.fail(&format!(
            "{} attempts not refused, first: {}",
            other.len(),
            other[0]
        ));
    }
    run.expect_eq("refused attempts", refused, ATTEMPTS);
    let expected_queues = match nic {
        Nic::E1000 | Nic::E1000_82545em => 1,
        _ => queues as usize,
    };
    let lines = queue_lines(&run);
    run.expect_eq("queues opened", lines.len(), expected_queues);
    let mut syns = 0;
    for line in &lines {
        println!("{}: {line}", nic.name());
        let (s, r) = (field(line, "syns"), field(line, "rsts"));
        if expected_queues > 1 && s == 0 {
            run.fail(&format!("a queue got no SYN: {line}"));
        }
        if r > s {
            run.fail(&format!("more RSTs than SYNs: {line}"));
        }
        if field(line, "tx_frames") < r || field(line, "rx_frames") < s {
            run.fail(&format!("the queue's own counters miss frames: {line}"));
        }
        syns += s;
    }
    if syns < ATTEMPTS {
        run.fail(&format!("{syns} SYNs for {ATTEMPTS} attempts"));
    }
    let steering = run.require("MQ_STEERING");
    println!("{}: {steering}", nic.name());
    if expected_queues > 1 && field(steering, "conflicts") != 0 {
        run.fail(&format!(
            "SYNs not steered by the Toeplitz hash: {steering}"
        ));
    }
}

#[test]
fn virtio() {
    syns_are_spread_over_queues(Nic::Virtio, 2)
}

#[test]
fn e1000e() {
    syns_are_spread_over_queues(Nic::E1000e, 2)
}

#[test]
fn e1000_has_one_queue() {
    syns_are_spread_over_queues(Nic::E1000, 2)
}
