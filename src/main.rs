//! `zerosend`: the command-line program (file server and tools).

// DMA, VFIO and MMIO live in the driver crates: the server itself is safe Rust, but for
// one allocator setting (`process::map_large_allocations_fresh`, allowed there alone).
#![deny(unsafe_code)]

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use driver::pci;
use driver::NicModel;

#[derive(Parser)]
#[command(
    version,
    about = "Zero-copy, stable-page file server over a userspace NIC driver"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the files under --root over HTTP/1.1, with file bodies sent zero-copy from the
    /// stable page cache by a NIC bound to vfio-pci.
    Serve(Box<ServeArgs>),
    /// List PCI network devices, their driver binding and IOMMU group, and whether zerosend
    /// can drive them.
    Probe,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// PCI address of the NIC (bound to vfio-pci), or `auto` for the first one.
    #[arg(long, default_value = "auto")]
    nic: String,
    /// Directory to serve.
    #[arg(long)]
    root: std::path::PathBuf,
    /// Static address with prefix length, e.g. 10.0.2.15/24 (or use --dhcp).
    #[arg(long, conflicts_with = "dhcp")]
    ip: Option<String>,
    /// Default gateway for --ip.
    #[arg(long, requires = "ip")]
    gateway: Option<std::net::Ipv4Addr>,
    /// Get the address from a DHCP server.
    #[arg(long)]
    dhcp: bool,
    /// TCP port to listen on (plain HTTP).
    #[arg(long, default_value_t = 80)]
    port: u16,
    /// Serve HTTPS too: the certificate chain (PEM, end-entity certificate first). TLS 1.3
    /// only, AES-128-GCM and AES-256-GCM, ALPN http/1.1, session tickets; the files are
    /// re-read when they change (new connections get the new pair). Repeat with --tls-key
    /// for more certificates: each goes to clients asking (SNI) for a name it is valid for,
    /// the first to the others.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Vec<std::path::PathBuf>,
    /// The private key of each --tls-cert, in the same order (PEM: PKCS#8, PKCS#1 or SEC1);
    /// one that does not match its certificate is refused at start.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Vec<std::path::PathBuf>,
    /// TCP port for HTTPS.
    #[arg(long, default_value_t = 443)]
    tls_port: u16,
    /// Serve HTTPS only: no plain HTTP listener on --port.
    #[arg(long, requires = "tls_cert")]
    no_plain_http: bool,
    /// Accept PUT (upload or replace files under --root). Off by default: without it a
    /// PUT gets 405 and the server is read-only.
    #[arg(long)]
    allow_put: bool,
    /// With --allow-put: only PUTs that carry `Authorization: Bearer <token>`, the token
    /// being this file's content (surrounding whitespace ignored); 401 without a token,
    /// 403 with another. Keep the file readable by the server's user only.
    #[arg(long, value_name = "PATH", requires = "allow_put")]
    put_token_file: Option<std::path::PathBuf>,
    /// Serve the Prometheus metrics page (`/_zerosend/metrics`) on this port of the
    /// server's address, and nowhere else: `PORT`, or `ADDR:PORT` with ADDR the --ip
    /// address or 0.0.0.0. Off by default (the path is then an ordinary, missing file).
    #[arg(long, value_name = "[ADDR:]PORT")]
    metrics_listen: Option<String>,
    /// On SIGTERM or SIGINT: stop accepting, let responses in flight finish for up to this
    /// many seconds, write back and fsync dirty pages, release the NIC and exit 0. A second
    /// signal stops at once (exit 1).
    #[arg(long, default_value_t = 30)]
    shutdown_timeout_secs: u64,
    /// What a PUT does to pages an in-flight response still uses: wait (bounded) or
    /// copy-on-write.
    #[arg(long, value_enum, default_value = "cow")]
    write_policy: PolicyArg,
    /// How long a `wait` writer waits for in-flight pages, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    wait_timeout_ms: u64,
    /// What a request does when every page-cache frame is pinned: wait (up to
    /// --backpressure-timeout-ms) for pins to be released, or fail at once; either way it
    /// gets a 503 if no frame comes free.
    #[arg(long, value_enum, default_value = "wait")]
    backpressure: BackpressureArg,
    /// Longest wait for a free page-cache frame under `--backpressure wait`, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    backpressure_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this many seconds, and connections
    /// whose client acknowledged nothing of a response for that long are reset.
    #[arg(long, default_value_t = 60)]
    idle_timeout_secs: u64,
    /// A request head must arrive within this many seconds of its first byte, and a request
    /// body must make progress at least this often (408 otherwise); a response waiting for
    /// the page cache (frames, a `wait` write) gets 503 after as long.
    #[arg(long, default_value_t = 20)]
    request_timeout_secs: u64,
    /// How long, in milliseconds, the file a GET's path named is trusted without walking
    /// the path and checking the file on disk again: a file another program changes or
    /// replaces is seen within this long (one replaced through zerosend, by PUT, at once).
    /// 0 checks on every request.
    #[arg(long, default_value_t = 100)]
    file_check_ms: u64,
    /// Largest PUT body accepted, in MiB (413 above).
    #[arg(long, default_value_t = 256)]
    max_put_mb: u64,
    /// Send buffer of each TCP connection in KiB: bytes in flight plus queued at most. In
    /// zero-copy mode only its first 64 KiB are written (the payload stays in the page
    /// cache, see `--pin-window-kb`), so it is sized for one fast flow: 512 KiB capped a
    /// single download in the guest at about 0.7x of 2 MiB (`scripts/bench`, `zerosend-alt`).
    /// Default: 2048, halved (down to 256) until every connection's worst case fits the
    /// memory the machine has available once the page cache is set up.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    tcp_send_buffer_kb: Option<u64>,
    /// Most bytes of a response a connection keeps pinned in the page cache, in KiB: a body
    /// is pinned piece by piece as acknowledgements make room, whatever the file's size.
    /// Default: the TCP send buffer plus 128 KiB.
    #[arg(long, value_parser = clap::value_parser!(u64).range(16..))]
    pin_window_kb: Option<u64>,
    /// Most page-cache memory kept for old versions that open responses still need while
    /// writers change a file, in MiB (default: a quarter of the cache).
    #[arg(long)]
    old_versions_mb: Option<u64>,
    /// At that bound: `wait` parks the writer (its PUT gets 503 after --wait-timeout-ms), or
    /// `reset` lets it go ahead and resets the oldest responses that needed the old bytes
    /// (never a torn body).
    #[arg(long, value_enum, default_value = "wait")]
    old_versions_full: OldVersionsArg,
    /// A client that acknowledges nothing of what is outstanding for this many seconds (a
    /// zero window, or gone without a reset) is reset, and the pins of its response go.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    send_stall_timeout_secs: u64,
    /// Listening sockets kept ready for simultaneous connection attempts (per core); more
    /// SYNs are dropped, so their clients retry (as with a full Linux listen queue).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    listen_backlog: u64,
    /// Memory for PUT bodies being received, all connections together, in MiB: a
    /// Content-Range body is held whole, a whole-file upload streams to a temporary file
    /// through a 1 MiB window (a PUT that does not fit gets 503).
    #[arg(long, default_value_t = 64)]
    put_memory_mb: u64,
    /// Audit mode: prove pinned pages do not change. Each page version's crc32 is recorded
    /// at its first pin and verified at every --audit-verify-every-th release of a pin of it
    /// (while that pin is held) and when the version ends (rewritten, evicted, freed).
    #[arg(long)]
    audit: bool,
    /// HTTPS record encryption: ring's fused AES-GCM (gathers a record's pages, then seals
    /// in place) or the `aes-gcm` crate's parts (encrypts out of place, piece by piece).
    /// Which is faster depends on the CPU (`cargo bench -p netstack --bench tls`).
    #[arg(long, value_enum, default_value_t = TlsAeadArg::Ring)]
    tls_aead: TlsAeadArg,
    /// TCP congestion control: the stack's own window, whose slow start counts the bytes
    /// acknowledged (a client that acknowledges whole TSO frames at once still doubles it
    /// each round trip), or smoltcp's Cubic, which grows one segment per acknowledgement
    /// (kept for comparison).
    #[arg(long, value_enum, default_value_t = CongestionArg::ByteCounting)]
    congestion: CongestionArg,
    /// With --audit: verify a page at every Nth release of a pin of it (1: every release,
    /// the strictest, about 8x the instructions per page of the default; 0: only when the
    /// version ends). A change to a pinned page that persists is always caught, at most N
    /// releases late.
    #[arg(long, default_value_t = pagecache::DEFAULT_AUDIT_VERIFY_EVERY)]
    audit_verify_every: u32,
    /// Write every frame sent and received to this pcap file.
    #[arg(long)]
    pcap: Option<std::path::PathBuf>,
    /// Access log: one line per response (client, request line, status, bytes, seconds) to
    /// this file (appended to), or `-` for stdout. Lines are dropped, never waited for,
    /// when the log cannot keep up.
    #[arg(long, value_name = "PATH")]
    access_log: Option<String>,
    /// Connections beyond this get a 503.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Page-cache size in MiB (DMA memory the NIC can read).
    #[arg(long, default_value_t = 256)]
    cache_mb: usize,
    /// Seconds between stats lines.
    #[arg(long, default_value_t = 5)]
    stats_interval: u64,
    /// NIC interrupts (through VFIO: MSI-X, MSI or INTx): `on` busy-polls while there is
    /// traffic and sleeps on the interrupts when idle; `off` only polls, napping 200 us
    /// between idle polls (about 5,000 wake-ups a second). A NIC without a usable
    /// interrupt is polled either way.
    #[arg(long, value_enum, default_value = "on")]
    interrupts: InterruptsArg,
    /// With interrupts: microseconds of polls finding nothing before the loop arms the
    /// interrupts and sleeps.
    #[arg(long, default_value_t = 100)]
    idle_poll_us: u64,
    /// With interrupts: longest sleep, in milliseconds (timers such as timeouts, the
    /// certificate check and the stats line are looked at at least this often).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    idle_max_sleep_ms: u64,
    /// Test hook: after this many more transmitted frames the NIC stops completing
    /// transmissions (driver::faults::Fault::TxHang); the driver must recover.
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true)]
    inject_tx_hang_after_frames: Option<u64>,
    /// Static IPv6 address with prefix length, e.g. fd00::2/64 (repeatable, at most 4).
    /// IPv6 is always on with the link-local address derived from the MAC; every listener
    /// takes IPv4 and IPv6.
    #[arg(long = "ipv6", value_name = "ADDR/PREFIX")]
    ipv6: Vec<String>,
    /// IPv6 default gateway.
    #[arg(long)]
    ipv6_gateway: Option<std::net::Ipv6Addr>,
    /// Also take addresses from router advertisements (SLAAC, RFC 4862).
    #[arg(long)]
    ipv6_slaac: bool,
    /// NIC queue pairs, each served by its own stack on its own thread and core, flows
    /// spread by the NIC's receive-side scaling (at most what the NIC has: 1 on the e1000,
    /// 2 on the 82574L, virtio-net's max_virtqueue_pairs). Default: one per CPU the server
    /// may run on (its affinity mask), but 1 without --ip or with --pcap.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: Option<u16>,
}

impl ServeArgs {
    /// The server's options, with the flags checked against each other.
    fn options(self) -> Result<serve::ServeOptions> {
        let ip = match (self.ip, self.dhcp) {
            (Some(text), false) => Some(parse_cidr(&text)?),
            (None, true) => None,
            _ => anyhow::bail!("give --ip ADDR/PREFIX or --dhcp"),
        };
        let write_policy = match self.write_policy {
            PolicyArg::Cow => pagecache::WritePolicy::CopyOnWrite,
            PolicyArg::Wait => pagecache::WritePolicy::Wait {
                timeout: Duration::from_millis(self.wait_timeout_ms),
            },
        };
        let backpressure = match self.backpressure {
            BackpressureArg::Wait => pagecache::Backpressure::Wait {
                timeout: Duration::from_millis(self.backpressure_timeout_ms),
            },
            BackpressureArg::Error => pagecache::Backpressure::Error,
        };
        // Read and checked before the NIC is touched: a bad certificate or key is refused at
        // once, naming the file.
        if self.tls_cert.len() != self.tls_key.len() {
            anyhow::bail!(
                "{} --tls-cert and {} --tls-key: give one key per certificate, in the same order",
                self.tls_cert.len(),
                self.tls_key.len()
            );
        }
        let pairs: Vec<_> = self
            .tls_cert
            .iter()
            .cloned()
            .zip(self.tls_key.iter().cloned())
            .collect();
        let tls = match pairs.is_empty() {
            false => Some(tls::TlsOptions::load(&pairs, self.tls_port)?),
            true => None,
        };
        if tls.as_ref().is_some_and(|t| t.port == self.port) && !self.no_plain_http {
            anyhow::bail!(
                "--tls-port {} is also --port: give them different ports",
                self.port
            );
        }
        let put_access = match (&self.put_token_file, self.allow_put) {
            (Some(path), _) => conn::PutAccess::Token(read_put_token(path)?),
            (None, true) => conn::PutAccess::Open,
            (None, false) => conn::PutAccess::Refused,
        };
        let metrics_port = self
            .metrics_listen
            .as_deref()
            .map(|text| parse_metrics_listen(text, ip.map(|(a, _)| a)))
            .transpose()?;
        if let Some(port) = metrics_port {
            let taken = [
                (!self.no_plain_http).then_some(self.port),
                tls.as_ref().map(|t| t.port),
            ];
            if taken.contains(&Some(port)) {
                anyhow::bail!("--metrics-listen port {port} is already served: choose another");
            }
        }
        let limits = http::Limits {
            max_body_bytes: self.max_put_mb << 20,
            ..http::Limits::default()
        };
        Ok(serve::ServeOptions {
            nic: self.nic,
            root: self.root,
            ip,
            gateway: self.gateway,
            port: (!self.no_plain_http).then_some(self.port),
            tls,
            put_access,
            metrics_port,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            write_policy,
            backpressure,
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            file_check: Duration::from_millis(self.file_check_ms),
            limits,
            tcp_send_buffer: self.tcp_send_buffer_kb.map(|kb| (kb as usize) << 10),
            pin_window: self.pin_window_kb.map(|kb| kb << 10),
            old_version_limit_pages: self
                .old_versions_mb
                .map(|mb| (mb << 20) as usize / pagecache::PAGE_SIZE),
            old_version_policy: match self.old_versions_full {
                OldVersionsArg::Wait => pagecache::OldVersionPolicy::WriterWaits {
                    timeout: Duration::from_millis(self.wait_timeout_ms),
                },
                OldVersionsArg::Reset => pagecache::OldVersionPolicy::InvalidateSnapshots,
            },
            send_stall_timeout: Duration::from_secs(self.send_stall_timeout_secs),
            listen_backlog: self.listen_backlog as usize,
            put_memory: self.put_memory_mb << 20,
            audit: self.audit,
            tls_aead: match self.tls_aead {
                TlsAeadArg::Ring => netstack::tls::aead::Backend::Ring,
                TlsAeadArg::AesGcm => netstack::tls::aead::Backend::AesGcm,
            },
            congestion: match self.congestion {
                CongestionArg::ByteCounting => netstack::Congestion::ByteCounting,
                CongestionArg::SmoltcpCubic => netstack::Congestion::SmoltcpCubic,
            },
            audit_verify_every: self.audit_verify_every,
            pcap: self.pcap,
            access_log: self
                .access_log
                .as_deref()
                .map(accesslog::Destination::parse),
            max_connections: self.max_connections,
            cache_mb: self.cache_mb,
            stats_interval: Duration::from_secs(self.stats_interval.max(1)),
            idle: serve::IdleOptions {
                interrupts: matches!(self.interrupts, InterruptsArg::On),
                idle_poll: Duration::from_micros(self.idle_poll_us),
                max_sleep: Duration::from_millis(self.idle_max_sleep_ms),
            },
            #[cfg(feature = "test-hooks")]
            inject_tx_hang_after_frames: self.inject_tx_hang_after_frames,
            ipv6: ipv6::config(&self.ipv6, self.ipv6_gateway, self.ipv6_slaac)?,
            queues: self.queues.map(usize::from),
        })
    }
}

mod accesslog;
mod conn;
mod http;
mod ipv6;
mod metrics;
mod openfiles;
mod process;
mod respond;
mod root;
mod serve;
mod tls;
mod upload;
mod warnings;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum InterruptsArg {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PolicyArg {
    Wait,
    Cow,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum BackpressureArg {
    Wait,
    Error,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum TlsAeadArg {
    Ring,
    AesGcm,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CongestionArg {
    ByteCounting,
    SmoltcpCubic,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OldVersionsArg {
    Wait,
    Reset,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZEROSEND_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe => probe(),
        Command::Serve(args) => args.options().and_then(serve::serve),
    };
    if let Err(e) = result {
        eprintln!("zerosend: error: {e:#}");
        std::process::exit(1);
    }
}

/// The bearer token PUTs must carry: the file's content, trimmed; refused if empty.
fn read_put_token(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--put-token-file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        anyhow::bail!(
            "--put-token-file {}: expected one token (no spaces), e.g. from `openssl rand -hex 32`",
            path.display()
        );
    }
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "--put-token-file {} is readable by other users: chmod 600 it",
                path.display()
            );
        }
    }
    Ok(token.to_string())
}

/// `9464` or `10.0.2.15:9464` / `0.0.0.0:9464`: the metrics page is served by the stack,
/// which has the one address.
fn parse_metrics_listen(text: &str, ip: Option<std::net::Ipv4Addr>) -> Result<u16> {
    let (addr, port) = match text.rsplit_once(':') {
        Some((addr, port)) => (Some(addr), port),
        None => (None, text),
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| anyhow::anyhow!("--metrics-listen {text:?}: bad port"))?;
    if let Some(addr) = addr {
        let addr: std::net::Ipv4Addr = addr
            .parse()
            .map_err(|_| anyhow::anyhow!("--metrics-listen {text:?}: bad IPv4 address"))?;
        if !addr.is_unspecified() && Some(addr) != ip {
            anyhow::bail!(
                "--metrics-listen {text:?}: the metrics page is served by the NIC's stack, on its \
                 address (--ip) or 0.0.0.0; {addr} is not it"
            );
        }
    }
    Ok(port)
}

/// `10.0.2.15/24`
fn parse_cidr(text: &str) -> Result<(std::net::Ipv4Addr, u8)> {
    let (addr, prefix) = text.split_once('/').ok_or_else(|| {
        anyhow::anyhow!("--ip {text:?}: expected ADDR/PREFIX such as 10.0.2.15/24")
    })?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| anyhow::anyhow!("--ip {text:?}: bad prefix length"))?;
    Ok((
        addr.parse()
            .map_err(|_| anyhow::anyhow!("--ip {text:?}: bad IPv4 address"))?,
        prefix,
    ))
}

fn probe() -> Result<()> {
    let mut found = false;
    for address in pci::all_devices()? {
        let Ok(class) = address.class() else { continue };
        if class >> 16 != 0x02 {
            continue; // not a network controller
        }
        found = true;
        let (vendor, device) = address.ids()?;
        let driver = address.driver().unwrap_or_else(|| "none".into());
        let group = address
            .iommu_group()
            .map(|g| g.to_string())
            .unwrap_or_else(|| "none".into());
        let model = NicModel::from_ids(vendor, device);
        let verdict = match (&model, address.iommu_group(), driver.as_str()) {
            (Err(_), _, _) => "unsupported model".to_string(),
            (Ok(_), None, _) => "no IOMMU: enable intel_iommu=on / amd_iommu=on".to_string(),
            (Ok(_), Some(_), "vfio-pci") => "ready".to_string(),
            (Ok(_), Some(_), _) => format!("bind it: scripts/vfio-bind {address}"),
        };
        let model = model.map(|m| m.to_string()).unwrap_or_else(|_| "-".into());
        println!(
            "{address}  {vendor:04x}:{device:04x}  {model:<22} driver={driver:<10} iommu_group={group:<5} {verdict}"
        );
    }
    if !found {
        println!("no PCI network devices found");
    }
    Ok(())
}
