//! The demo's configuration as a test: QEMU's user-mode network (`restrict=on`), the address
//! from QEMU's DHCP server via the stack's DHCP client, and curl on the host downloading
//! through a port forward on 127.0.0.1.

use std::time::Duration;

use hw_tests::content::{random_bytes, sha256_hex};
use hw_tests::{Guest, Nic};

fn dhcp_and_forwarded_download(nic: Nic) {
    let body = random_bytes(99, 3 << 20);
    let guest = Guest::new(&format!("user-net-{}", nic.name()), nic)
        .memory_mb(768)
        .forward(80)
        .file("/data/file.bin", body.clone())
        .run("zerosend serve --root /data --dhcp --audit --stats-interval 2")
        .timeout(Duration::from_secs(600))
        .start()
        .unwrap();
    let line = guest.wait_for_console("zerosend: serving", Duration::from_secs(240));
    if !line.contains(" on 10.0.2.15:80 ") {
        guest.fail(&format!(
            "DHCP did not give the address QEMU hands out: {line}"
        ));
    }
    let port = guest.host_port(80);
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "180",
            &format!("http://127.0.0.1:{port}/file.bin"),
        ])
        .output()
        .unwrap();
    if sha256_hex(&out.stdout) != sha256_hex(&body) {
        guest.fail(&format!(
            "download through the forward differs: {} bytes, curl: {}",
            out.stdout.len(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    guest.stop_server();
}

#[test]
fn dhcp_and_forwarded_download_virtio() {
    dhcp_and_forwarded_download(Nic::Virtio);
}

#[test]
fn dhcp_and_forwarded_download_e1000() {
    dhcp_and_forwarded_download(Nic::E1000);
}
