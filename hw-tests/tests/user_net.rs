//! The demo's configuration as a test: QEMU's user-mode network (`restrict=on`), the address
//! from QEMU's DHCP server via the stack's DHCP client, and curl on the host downloading
//! through a port forward on 127.0.0.1; with the defaults, PUT is refused (405) and there is
//! no metrics page.

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
    // The defaults are read-only, with no metrics page: a PUT gets 405 and changes nothing,
    // the metrics path is an ordinary missing file.
    let status = |args: &[&str]| {
        let o = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "60",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let put = status(&[
        "-X",
        "PUT",
        "--data-binary",
        "overwritten",
        &format!("http://127.0.0.1:{port}/file.bin"),
    ]);
    let metrics = status(&[&format!("http://127.0.0.1:{port}/_zerosend/metrics")]);
    let again = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "180"])
        .arg(format!("http://127.0.0.1:{port}/file.bin"))
        .output()
        .unwrap();
    if put != "405" || metrics != "404" || sha256_hex(&again.stdout) != sha256_hex(&body) {
        guest.fail(&format!(
            "defaults: PUT answered {put} (want 405), metrics {metrics} (want 404), file \
             {} after the PUT",
            if sha256_hex(&again.stdout) == sha256_hex(&body) {
                "unchanged"
            } else {
                "CHANGED"
            }
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
