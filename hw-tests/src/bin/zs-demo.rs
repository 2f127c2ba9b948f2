//! `scripts/demo`: boot a QEMU guest whose NIC sits behind an emulated VT-d IOMMU, run
//! `zerosend serve` in it on a sample directory (or `--root DIR`), download a large file with
//! curl from the host through a forwarded port, verify its sha256, and print the throughput
//! and the server's counters. `--hold` keeps serving on `127.0.0.1:PORT` until interrupted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use hw_tests::content::{random_bytes, sha256_hex};
use hw_tests::{Guest, Nic};

#[derive(Parser)]
#[command(about = "zerosend demo: a zero-copy file server in a QEMU guest")]
struct Args {
    /// NIC model: e1000, e1000e or virtio.
    #[arg(long, default_value = "virtio")]
    nic: String,
    /// Serve this host directory (copied into the guest) instead of the sample.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Keep serving until interrupted, for any host client.
    #[arg(long)]
    hold: bool,
    /// Host port forwarded to the guest's port 80 (127.0.0.1 only).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Size of the sample file in MiB.
    #[arg(long, default_value_t = 32)]
    sample_mb: usize,
}

fn die(msg: &str) -> ! {
    eprintln!("demo: {msg}");
    std::process::exit(1)
}

/// Files of a host directory (recursively), as guest paths under /data.
fn collect(dir: &Path, base: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| die(&format!("reading {}: {e}", dir.display())));
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, base, out);
        } else if p.is_file() {
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            out.push((format!("/data/{rel}"), std::fs::read(&p).unwrap()));
        }
    }
}

fn main() {
    let args = Args::parse();
    let Some(nic) = Nic::parse(&args.nic) else {
        die(&format!(
            "unknown --nic {:?}: use e1000, e1000e or virtio",
            args.nic
        ))
    };
    if let Err(e) = hw_tests::testbed_ready() {
        die(&e);
    }
    if std::net::TcpListener::bind(("127.0.0.1", args.port)).is_err() {
        die(&format!(
            "127.0.0.1:{} is in use; pick another with --port",
            args.port
        ));
    }
    let mut files = Vec::new();
    let (probe_path, expected) = match &args.root {
        Some(dir) => {
            collect(dir, dir, &mut files);
            files.sort_by_key(|(_, d)| std::cmp::Reverse(d.len()));
            let Some((path, data)) = files.first() else {
                die(&format!("{} has no files", dir.display()))
            };
            (path.trim_start_matches("/data").to_string(), data.clone())
        }
        None => {
            let sample = random_bytes(2026, args.sample_mb << 20);
            files.push(("/data/sample.bin".into(), sample.clone()));
            files.push((
                "/data/index.html".into(),
                b"<h1>zerosend</h1><p><a href=\"/sample.bin\">sample.bin</a></p>\n".to_vec(),
            ));
            ("/sample.bin".to_string(), sample)
        }
    };
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    let memory_mb = (1024 + 2 * (total >> 20)).min(8192) as u32;
    let cache_mb = ((total >> 20) + 64).max(128);
    println!("demo: booting a {} guest (QEMU TCG, q35, emulated VT-d IOMMU, user-mode network restrict=on)...", nic.name());
    let mut guest = Guest::new(&format!("demo-{}", nic.name()), nic)
        .mac("52:54:00:5a:e0:01")
        .memory_mb(memory_mb)
        .forward_from(80, Some(args.port))
        .timeout(Duration::from_secs(if args.hold { 365 * 24 * 3600 } else { 900 }))
        .run(&format!("zerosend serve --root /data --dhcp --port 80 --audit --cache-mb {cache_mb} --stats-interval 5"));
    for (path, data) in files {
        guest = guest.file(&path, data);
    }
    let started = Instant::now();
    let guest = guest.start().unwrap_or_else(|e| die(&e));
    let line = guest.wait_for_console("zerosend: serving", Duration::from_secs(300));
    println!(
        "demo: guest up in {:.1?}: {}",
        started.elapsed(),
        line.trim_start_matches("zerosend: ")
    );
    let url = format!("http://127.0.0.1:{}{probe_path}", args.port);

    if args.hold {
        println!("demo: ready: zerosend serves on http://127.0.0.1:{}/ (try: curl -O {url}); Ctrl-C to stop", args.port);
        let mut guest = guest;
        while guest.is_running() {
            std::thread::sleep(Duration::from_millis(500));
        }
        return;
    }

    let out_dir = hw_tests::target_dir()
        .join("hw-tests")
        .join("demo-download");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out_file = out_dir.join("download.bin");
    let t = Instant::now();
    let curl = Command::new("curl")
        .args(["-sS", "--max-time", "600", "-o"])
        .arg(&out_file)
        .args([
            "-w",
            "%{http_code} %{size_download} %{speed_download}",
            &url,
        ])
        .output()
        .unwrap_or_else(|e| die(&format!("running curl: {e}")));
    let secs = t.elapsed().as_secs_f64();
    let got = std::fs::read(&out_file).unwrap_or_default();
    let summary = String::from_utf8_lossy(&curl.stdout).to_string();
    println!(
        "demo: curl {url}: {summary} ({})",
        String::from_utf8_lossy(&curl.stderr).trim()
    );
    let (want, have) = (sha256_hex(&expected), sha256_hex(&got));
    let mbit = got.len() as f64 * 8.0 / secs / 1e6;
    println!(
        "demo: downloaded {} bytes in {secs:.2}s = {mbit:.1} Mbit/s",
        got.len()
    );
    println!("demo: sha256 expected {want}");
    println!(
        "demo: sha256 received {have} {}",
        if want == have {
            "(verified)"
        } else {
            "(MISMATCH)"
        }
    );
    let metrics = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            &format!("http://127.0.0.1:{}/_zerosend/metrics", args.port),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    println!("demo: server counters:");
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        println!("  {line}");
    }
    let run = guest.stop().unwrap_or_else(|e| die(&e));
    println!("demo: guest console log: {}", run.console_path().display());
    if want != have {
        die("FAILED: the download does not match");
    }
    if !metrics.contains("zerosend_audit_violations_total 0") {
        die("FAILED: the page audit reports violations (or metrics were unavailable)");
    }
    println!("demo: OK");
}
