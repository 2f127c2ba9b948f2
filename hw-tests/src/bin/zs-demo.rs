//! `scripts/demo`: boot a QEMU guest whose NIC sits behind an emulated VT-d IOMMU, run
//! `zerosend serve` in it on a sample directory (or `--root DIR`), download a large file with
//! curl from the host through a forwarded port, verify its sha256, and print the throughput
//! and the server's counters. `--hold` keeps serving on `127.0.0.1:PORT` until interrupted,
//! showing the server's console lines as they come, and fails if the server dies.
//!
//! `--tap` puts the NIC on a TAP device in a network namespace the demo creates instead of
//! QEMU's user-mode network (whose NAT loses requests under heavy connection churn, see
//! `scripts/soak`): the server takes the static address [`GUEST_IP`], and curl runs inside
//! the namespace (`ip netns exec`). The namespace is deleted when the demo ends, also on
//! an error, Ctrl-C or SIGTERM.
//!
//! `scripts/demo [options] -- <serve flags>` passes the flags after `--` to `zerosend serve`
//! (then the demo does not size `--cache-mb` itself if the flags name it), so any server
//! configuration can be tried with the README's command.
//!
//! `--root DIR` keeps the tree as it is: symbolic links stay symbolic links (the server must
//! refuse those that leave the root), and files keep their modification times and
//! permission bits.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hw_tests::content::{random_bytes, sha256_hex};
use hw_tests::netns::{GUEST_IP, PREFIX_LEN};
use hw_tests::serve_guest::METRICS_PORT;
use hw_tests::{Guest, NetNs, Network, Nic, RunningGuest};

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
    #[arg(long, default_value_t = 8080, conflicts_with = "tap")]
    port: u16,
    /// Attach the NIC to a TAP device in a network namespace of the demo's own (deleted on
    /// exit) instead of the user-mode network; clients run in it with `ip netns exec`.
    #[arg(long)]
    tap: bool,
    /// Serve HTTPS too, with a throwaway certificate authority and certificate made for the
    /// demo (openssl); the download is repeated over HTTPS with `curl --cacert` and verified.
    #[arg(long, conflicts_with = "tls_cert")]
    tls: bool,
    /// Serve HTTPS with your own certificate chain (PEM) and key (copied into the guest
    /// outside the served root).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With --tls-cert: the CA curl trusts to verify the download (default: the certificate
    /// itself, right for a self-signed one).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// With --tls-cert: the name curl asks for (SNI, and what the certificate must name);
    /// it is resolved to the server's address.
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// Host port forwarded to the guest's HTTPS port 443 (127.0.0.1 only).
    #[arg(long, default_value_t = 8443, conflicts_with = "tap")]
    tls_port: u16,
    /// Size of the sample file in MiB.
    #[arg(long, default_value_t = 32)]
    sample_mb: usize,
    /// Flags for `zerosend serve` (after `--`), e.g. `-- --cache-mb 32 --write-policy wait`.
    #[arg(last = true)]
    serve_flags: Vec<String>,
}

/// One entry of the served tree, as it goes into the guest under /data.
enum Entry {
    File {
        path: String,
        data: Vec<u8>,
        permissions: u32,
        mtime: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    Dir {
        path: String,
    },
}

fn die(msg: &str) -> ! {
    // A Ctrl-C also reaches QEMU and curl (same process group), and what fails because of
    // it is no failure of the demo's.
    if STOP_SIGNAL.load(Ordering::SeqCst) != 0 {
        stop_on_signal();
    }
    eprintln!("demo: {msg}");
    NetNs::delete_all_created();
    std::process::exit(1)
}

/// The signal (SIGINT, SIGTERM or SIGHUP) that asked the demo to stop, 0 if none.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_stop_signal(signal: libc::c_int) {
    // Only an atomic store: anything more is not async-signal-safe.
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// The demo's exit on a stop signal: the TAP namespace is deleted (the default action of
/// the signal would leave it behind, as exits run no destructors); QEMU, whose parent-death
/// signal is SIGKILL, ends with the process.
fn stop_on_signal() -> ! {
    let signal = STOP_SIGNAL.load(Ordering::SeqCst);
    NetNs::delete_all_created();
    eprintln!("demo: stopped by signal {signal}");
    std::process::exit(128 + signal)
}

/// Catch the stop signals, and act on them from a thread of their own: the main thread may
/// be blocked in a boot wait or a download for minutes.
fn handle_stop_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic; the action struct is fully
        // initialised (zeroed: empty mask, no flags) before the call.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = note_stop_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    std::thread::spawn(|| loop {
        if STOP_SIGNAL.load(Ordering::SeqCst) != 0 {
            stop_on_signal();
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// A curl command that reaches the server: from the host (user-mode network) or inside the
/// guest's namespace (TAP).
fn curl(guest: &RunningGuest, tap: bool) -> Command {
    if tap {
        guest.netns().command("curl")
    } else {
        Command::new("curl")
    }
}

/// The entries of a host directory (recursively), as guest paths under /data. Symbolic
/// links are kept as links (never followed: a link out of the tree must reach the guest as
/// a link, for the server to refuse), files keep mtime and permissions.
fn collect(dir: &Path, base: &Path, out: &mut Vec<Entry>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| die(&format!("reading {}: {e}", dir.display())));
    for e in entries.flatten() {
        let p = e.path();
        let path = format!("/data/{}", p.strip_prefix(base).unwrap().to_string_lossy());
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target =
                std::fs::read_link(&p).unwrap_or_else(|e| die(&format!("{}: {e}", p.display())));
            out.push(Entry::Symlink {
                path,
                target: target.to_string_lossy().into_owned(),
            });
        } else if meta.is_dir() {
            out.push(Entry::Dir { path });
            collect(&p, base, out);
        } else if meta.is_file() {
            out.push(Entry::File {
                path,
                data: std::fs::read(&p).unwrap_or_else(|e| die(&format!("{}: {e}", p.display()))),
                permissions: meta.permissions().mode() & 0o7777,
                mtime: meta.mtime().clamp(0, u32::MAX as i64) as u32,
            });
        }
    }
}

/// The HTTPS side of the demo: the PEM files the server uses, and what curl trusts.
struct DemoTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: PathBuf,
    /// The name curl connects to (resolved to the server).
    name: String,
}

/// A throwaway CA and a server certificate signed by it, for `localhost`, 127.0.0.1 and the
/// TAP address, made with openssl under `dir`.
fn throwaway_pki(dir: &Path) -> DemoTls {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| die(&format!("{}: {e}", dir.display())));
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=DNS:localhost,IP:127.0.0.1,IP:{GUEST_IP}\n"),
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap_or_else(|e| die(&format!("running openssl: {e}")));
        if !o.status.success() {
            die(&format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    };
    // Each command is one line of words (no argument has a space).
    let run = |line: &str| openssl(&line.split_whitespace().collect::<Vec<_>>());
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1";
    run(&format!(
        "req -x509 -nodes -days 7 {ec} -keyout ca.key -out ca.pem -subj /CN=zerosend-demo-CA"
    ));
    run(&format!(
        "req -nodes {ec} -keyout key.pem -out srv.csr -subj /CN=localhost"
    ));
    run(
        "x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 7 \
         -extfile ext.cnf -out cert.pem",
    );
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    DemoTls {
        cert: read("cert.pem"),
        key: read("key.pem"),
        ca: dir.join("ca.pem"),
        name: "localhost".into(),
    }
}

/// Downloads `url` with `curl` (its extra arguments first) into `out`; returns whether the
/// bytes match `expected`, printing the figures.
fn download_and_verify(
    mut curl: Command,
    extra: &[String],
    url: &str,
    out: &Path,
    expected: &[u8],
) -> bool {
    let _ = std::fs::remove_file(out);
    let t = Instant::now();
    let download = curl
        .args(extra)
        .args(["-sS", "--max-time", "600", "-o"])
        .arg(out)
        .args(["-w", "%{http_code} %{size_download} %{speed_download}", url])
        .output()
        .unwrap_or_else(|e| die(&format!("running curl: {e}")));
    let secs = t.elapsed().as_secs_f64();
    let got = std::fs::read(out).unwrap_or_default();
    let summary = String::from_utf8_lossy(&download.stdout).to_string();
    println!(
        "demo: curl {url}: {summary} ({})",
        String::from_utf8_lossy(&download.stderr).trim()
    );
    let (want, have) = (sha256_hex(expected), sha256_hex(&got));
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
    want == have
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
    handle_stop_signals();
    if !args.tap && std::net::TcpListener::bind(("127.0.0.1", args.port)).is_err() {
        die(&format!(
            "127.0.0.1:{} is in use; pick another with --port",
            args.port
        ));
    }
    let mut entries = Vec::new();
    match &args.root {
        Some(dir) => collect(dir, dir, &mut entries),
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as u32);
            entries.push(Entry::File {
                path: "/data/sample.bin".into(),
                data: random_bytes(2026, args.sample_mb << 20),
                permissions: 0o644,
                mtime: now,
            });
            entries.push(Entry::File {
                path: "/data/index.html".into(),
                data: b"<h1>zerosend</h1><p><a href=\"/sample.bin\">sample.bin</a></p>\n".to_vec(),
                permissions: 0o644,
                mtime: now,
            });
        }
    }
    // The largest regular file is the one downloaded and verified.
    let (probe_path, expected) = entries
        .iter()
        .filter_map(|e| match e {
            Entry::File { path, data, .. } => Some((path, data)),
            _ => None,
        })
        .max_by_key(|(_, data)| data.len())
        .map(|(path, data)| (path.trim_start_matches("/data").to_string(), data.clone()))
        .unwrap_or_else(|| die("the served tree has no regular files"));
    let total: usize = entries
        .iter()
        .map(|e| match e {
            Entry::File { data, .. } => data.len(),
            _ => 0,
        })
        .sum();
    let memory_mb = (1024 + 2 * (total >> 20)).min(8192) as u32;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &Path| {
                std::fs::read(p).unwrap_or_else(|e| die(&format!("{}: {e}", p.display())))
            };
            Some(DemoTls {
                cert: read(cert),
                key: read(key),
                ca: args.tls_ca.clone().unwrap_or_else(|| cert.clone()),
                name: args.tls_name.clone(),
            })
        }
        _ if args.tls => Some(throwaway_pki(
            &hw_tests::target_dir().join("hw-tests").join("demo-tls"),
        )),
        _ => None,
    };
    let flags_name_cache = args.serve_flags.iter().any(|f| f.starts_with("--cache-mb"));
    // The namespace has no DHCP server: there the guest takes the harness's static address.
    let address = if args.tap {
        format!("--ip {GUEST_IP}/{PREFIX_LEN}")
    } else {
        "--dhcp".to_string()
    };
    let mut serve =
        format!("zerosend serve --root /data {address} --port 80 --metrics-listen {METRICS_PORT} --audit --stats-interval 5");
    if !flags_name_cache {
        let cache_mb = ((total >> 20) + 64).max(128);
        serve.push_str(&format!(" --cache-mb {cache_mb}"));
    }
    if tls.is_some() {
        // Outside /data: the key is never served.
        serve.push_str(" --tls-cert /etc/zs/cert.pem --tls-key /etc/zs/key.pem --tls-port 443");
    }
    for flag in &args.serve_flags {
        serve.push(' ');
        serve.push_str(&shell_quote(flag));
    }
    let network = if args.tap {
        "TAP in a network namespace of its own"
    } else {
        "user-mode network restrict=on"
    };
    println!(
        "demo: booting a {} guest (QEMU TCG, q35, emulated VT-d IOMMU, {network})...",
        nic.name()
    );
    let mut guest = Guest::new(&format!("demo-{}", nic.name()), nic)
        .mac("52:54:00:5a:e0:01")
        .memory_mb(memory_mb)
        .append(hw_tests::serve_guest::HUGE_PAGES_ARG);
    guest = if args.tap {
        guest.network(Network::Tap)
    } else {
        guest
            .forward_from(80, Some(args.port))
            .forward(METRICS_PORT)
    };
    if let Some(tls) = &tls {
        guest = guest
            .file("/etc/zs/cert.pem", tls.cert.clone())
            .file("/etc/zs/key.pem", tls.key.clone());
        if !args.tap {
            guest = guest.forward_from(443, Some(args.tls_port));
        }
    }
    let mut guest = guest
        .timeout(Duration::from_secs(if args.hold {
            365 * 24 * 3600
        } else {
            900
        }))
        .run(&serve);
    for entry in &entries {
        guest = match entry {
            Entry::File {
                path,
                data,
                permissions,
                mtime,
            } => guest.file_with_mtime(path, data.clone(), *permissions, *mtime),
            Entry::Symlink { path, target } => guest.symlink(path, target),
            Entry::Dir { path } => guest.dir(path),
        };
    }
    println!("demo: guest runs: {serve}");
    let started = Instant::now();
    let guest = guest.start().unwrap_or_else(|e| die(&e));
    let line = guest.wait_for_console("zerosend: serving", Duration::from_secs(300));
    println!(
        "demo: guest up in {:.1?}: {}",
        started.elapsed(),
        line.trim_start_matches("zerosend: ")
    );
    let base = if args.tap {
        format!("http://{GUEST_IP}")
    } else {
        format!("http://127.0.0.1:{}", args.port)
    };
    let url = format!("{base}{probe_path}");
    let metrics_url = if args.tap {
        format!("http://{GUEST_IP}:{METRICS_PORT}/_zerosend/metrics")
    } else {
        format!(
            "http://127.0.0.1:{}/_zerosend/metrics",
            guest.host_port(METRICS_PORT)
        )
    };

    if args.hold {
        if let Some(tls) = &tls {
            let (https_url, extra) = https_target(tls, args.tap, args.tls_port, &probe_path);
            println!(
                "demo: HTTPS on {https_url} (try: curl {} {https_url})",
                extra.join(" ")
            );
        }
        if args.tap {
            let ns = guest.netns().name();
            println!("demo: ready: zerosend serves on {base}/ in network namespace {ns} (try: ip netns exec {ns} curl -O {url}; metrics on {metrics_url}); Ctrl-C to stop and delete the namespace");
        } else {
            println!(
                "demo: ready: zerosend serves on {base}/ (try: curl -O {url}; metrics on {metrics_url}); Ctrl-C to stop"
            );
        }
        hold(guest);
    }

    let out_dir = hw_tests::target_dir()
        .join("hw-tests")
        .join("demo-download");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out_file = out_dir.join("download.bin");
    let mut verified = download_and_verify(curl(&guest, args.tap), &[], &url, &out_file, &expected);
    if let Some(tls) = &tls {
        let (https_url, extra) = https_target(tls, args.tap, args.tls_port, &probe_path);
        verified &= download_and_verify(
            curl(&guest, args.tap),
            &extra,
            &https_url,
            &out_file,
            &expected,
        );
    }
    // Links out of the served tree are refused (never followed to the host's files).
    let mut escaped = Vec::new();
    if let Some(root) = &args.root {
        for entry in &entries {
            let Entry::Symlink { path, .. } = entry else {
                continue;
            };
            let host = root.join(path.trim_start_matches("/data/"));
            let inside = std::fs::canonicalize(&host)
                .ok()
                .zip(std::fs::canonicalize(root).ok())
                .is_some_and(|(t, r)| t.starts_with(r));
            if inside {
                continue;
            }
            let o = curl(&guest, args.tap)
                .args([
                    "-sS",
                    "--max-time",
                    "30",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .arg(format!("{base}{}", path.trim_start_matches("/data")))
                .output()
                .unwrap_or_else(|e| die(&format!("running curl: {e}")));
            let status = String::from_utf8_lossy(&o.stdout).to_string();
            println!(
                "demo: link out of the root {} -> {status} (refused: {})",
                path.trim_start_matches("/data"),
                status == "403" || status == "404"
            );
            if status != "403" && status != "404" {
                escaped.push(path.clone());
            }
        }
    }
    let metrics = curl(&guest, args.tap)
        .args(["-sS", "--max-time", "30", &metrics_url])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    println!("demo: server counters:");
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        println!("  {line}");
    }
    if !guest.console_lines_with(hw_tests::EXIT_MARKER).is_empty() {
        die(&format!(
            "FAILED: zerosend exited during the demo\n{}",
            guest.console_tail(30)
        ));
    }
    // Stopping the guest also deletes its namespace (TAP).
    let run = guest.stop().unwrap_or_else(|e| die(&e));
    println!("demo: guest console log: {}", run.console_path().display());
    if !verified {
        die("FAILED: the download does not match");
    }
    if !escaped.is_empty() {
        die(&format!(
            "FAILED: links out of the root were served: {escaped:?}"
        ));
    }
    if !metrics.contains("zerosend_audit_violations_total 0") {
        die("FAILED: the page audit reports violations (or metrics were unavailable)");
    }
    println!("demo: OK");
}

/// The HTTPS URL of `path` and the curl arguments that verify the server's certificate.
fn https_target(tls: &DemoTls, tap: bool, port: u16, path: &str) -> (String, Vec<String>) {
    let (addr, port) = if tap {
        (GUEST_IP.to_string(), 443)
    } else {
        ("127.0.0.1".to_string(), port)
    };
    let name = &tls.name;
    (
        format!("https://{name}:{port}{path}"),
        vec![
            "--cacert".into(),
            tls.ca.to_string_lossy().into_owned(),
            "--resolve".into(),
            format!("{name}:{port}:{addr}"),
        ],
    )
}

/// Follows the guest console (the server's log lines) until the guest ends; the server
/// never ends by itself, so that is a failure.
fn hold(mut guest: RunningGuest) -> ! {
    let mut next = 0;
    loop {
        let (lines, upto) = guest.console_lines_from(next);
        next = upto;
        for line in &lines {
            println!("guest: {line}");
            if let Some(status) = line.strip_prefix(hw_tests::EXIT_MARKER) {
                die(&format!(
                    "zerosend exited with status {}; the guest stops",
                    status.trim()
                ));
            }
        }
        if !guest.is_running() {
            die("the guest (QEMU) stopped");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Quotes a word for the guest's shell.
fn shell_quote(word: &str) -> String {
    if word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_=./:,".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}
