//! Quick check while developing: serve a file from a guest and fetch it with curl.
use hw_tests::content::{random_bytes, sha256_hex};
use hw_tests::netns::GUEST_IP;
use hw_tests::{Guest, Network, Nic};
use std::time::Duration;

#[test]
#[ignore]
fn serve_smoke() {
    let nic = Nic::parse(&std::env::var("ZS_NIC").unwrap_or("e1000".into())).unwrap();
    let big = random_bytes(1, 4 << 20);
    let guest = Guest::new("serve-smoke", nic)
        .network(Network::Tap)
        .memory_mb(1024)
        .file("/data/big.bin", big.clone())
        .run(&format!(
            "zerosend serve --root /data --ip {GUEST_IP}/24 --audit --stats-interval 2"
        ))
        .start()
        .unwrap();
    guest.wait_for_console("zerosend: serving", Duration::from_secs(120));
    let t = std::time::Instant::now();
    let out = guest
        .netns()
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "60",
            &format!("http://{GUEST_IP}/big.bin"),
        ])
        .output()
        .unwrap();
    eprintln!(
        "curl: {} bytes in {:?} {}",
        out.stdout.len(),
        t.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_secs(3));
    eprintln!("{}", guest.console_tail(15));
    assert_eq!(sha256_hex(&out.stdout), sha256_hex(&big));
}
