//! TX benchmark of the NIC drivers (run by `scripts/bench-nic`; ignored in the suite):
//! e1000, e1000e and virtio-net (split with indirect descriptors, split direct, packed)
//! side by side, each in its own guest on a TAP device (virtio-net offers TSO only with a
//! vnet-header backend), without a capture, 1 vCPU. Every guest runs the same loop,
//! `zs-guest nic-bench`, written against the queue API. The host discards the frames (they
//! are addressed to another MAC), so this measures the guest driver and QEMU's device model;
//! TCG makes absolute numbers slow, they are a baseline for ratios.
//!
//! Environment: BENCH_SECONDS per row (default 5), BENCH_ROUNDS (default 1; rounds
//! interleave the configurations so load from elsewhere hits them alike), BENCH_CONFIGS
//! (comma-separated labels, default all).

use std::time::Duration;

use hw_tests::{Guest, Network, Nic};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn value(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[test]
#[ignore = "benchmark: run with scripts/bench-nic"]
fn bench_tx() {
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    let rounds: usize = env_or("BENCH_ROUNDS", 1);
    // (label, NIC, guest environment, packed=on)
    let all = [
        ("e1000", Nic::E1000, "", false),
        ("e1000e", Nic::E1000e, "", false),
        ("virtio", Nic::Virtio, "", false),
        (
            "virtio-direct",
            Nic::Virtio,
            "ZEROSEND_VIRTIO_INDIRECT=0 ",
            false,
        ),
        ("virtio-packed", Nic::Virtio, "", true),
    ];
    let wanted = std::env::var("BENCH_CONFIGS").ok();
    let configs: Vec<_> = all
        .into_iter()
        .filter(|c| {
            wanted
                .as_deref()
                .is_none_or(|w| w.split(',').any(|n| n == c.0))
        })
        .collect();
    let mut rows = Vec::new();
    for (label, nic, env, packed) in (0..rounds).flat_map(|_| configs.clone()) {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load = load.split(' ').next().unwrap_or("?").to_string();
        let script: Vec<String> = ["64", "1514", "tso"]
            .iter()
            .map(|k| format!("{env}zs-guest nic-bench --kind {k} --seconds {seconds}"))
            .collect();
        let guest = Guest::new(&format!("bench-{label}"), nic);
        let guest = if packed { guest.virtio_packed() } else { guest };
        let run = guest
            .mac("52:54:00:ab:00:08")
            .network(Network::Tap)
            .timeout(Duration::from_secs(600))
            .run(&script.join("\n"))
            .start()
            .unwrap()
            .wait()
            .unwrap();
        run.expect_success();
        for line in run.lines.iter().filter_map(|l| l.strip_prefix("BENCH ")) {
            let mut row = vec![format!("{label} (load {load})")];
            for key in [
                "kind",
                "frames",
                "wire_frames",
                "secs",
                "fps",
                "gbps",
                "cpu_us_per_frame",
            ] {
                row.push(value(line, key));
            }
            rows.push(row);
        }
    }
    println!();
    println!("TX benchmark, TAP network, no capture (QEMU TCG, 1 vCPU; {seconds} s per row; TSO = 64 KiB frames)");
    println!(
        "{:<26} {:>5} {:>10} {:>12} {:>7} {:>12} {:>9} {:>14}",
        "nic", "size", "frames", "wire frames", "secs", "frames/s", "Gbit/s", "CPU us/frame"
    );
    for r in &rows {
        println!(
            "{:<26} {:>5} {:>10} {:>12} {:>7} {:>12} {:>9} {:>14}",
            r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]
        );
    }
}
