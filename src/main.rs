//! `zerosend`: the command-line program (file server and tools).

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
    Serve {
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
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// What a PUT does to pages an in-flight response still uses: wait (bounded) or
        /// copy-on-write.
        #[arg(long, value_enum, default_value = "cow")]
        write_policy: PolicyArg,
        /// How long a `wait` writer waits for in-flight pages, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        wait_timeout_ms: u64,
        /// Audit mode: checksum every page at pin and verify it at release.
        #[arg(long)]
        audit: bool,
        /// Write every frame sent and received to this pcap file.
        #[arg(long)]
        pcap: Option<std::path::PathBuf>,
        /// Connections beyond this get a 503.
        #[arg(long, default_value_t = 256)]
        max_connections: usize,
        /// Page-cache size in MiB (DMA memory the NIC can read).
        #[arg(long, default_value_t = 256)]
        cache_mb: usize,
        /// Seconds between stats lines.
        #[arg(long, default_value_t = 5)]
        stats_interval: u64,
        /// Test hook: after this many more transmitted frames the NIC stops completing
        /// transmissions (driver::faults::Fault::TxHang); the driver must recover.
        #[cfg(feature = "test-hooks")]
        #[arg(long, hide = true)]
        inject_tx_hang_after_frames: Option<u64>,
    },
    /// List PCI network devices, their driver binding and IOMMU group, and whether zerosend
    /// can drive them.
    Probe,
}

mod conn;
mod http;
mod metrics;
mod respond;
mod root;
mod serve;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PolicyArg {
    Wait,
    Cow,
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
        Command::Serve {
            nic,
            root,
            ip,
            gateway,
            dhcp,
            port,
            write_policy,
            wait_timeout_ms,
            audit,
            pcap,
            max_connections,
            cache_mb,
            stats_interval,
            #[cfg(feature = "test-hooks")]
            inject_tx_hang_after_frames,
        } => (|| {
            let ip = match (ip, dhcp) {
                (Some(text), false) => Some(parse_cidr(&text)?),
                (None, true) => None,
                _ => anyhow::bail!("give --ip ADDR/PREFIX or --dhcp"),
            };
            let write_policy = match write_policy {
                PolicyArg::Cow => pagecache::WritePolicy::CopyOnWrite,
                PolicyArg::Wait => pagecache::WritePolicy::Wait {
                    timeout: std::time::Duration::from_millis(wait_timeout_ms),
                },
            };
            serve::serve(serve::ServeOptions {
                nic,
                root,
                ip,
                gateway,
                port,
                write_policy,
                audit,
                pcap,
                max_connections,
                cache_mb,
                stats_interval: std::time::Duration::from_secs(stats_interval.max(1)),
                #[cfg(feature = "test-hooks")]
                inject_tx_hang_after_frames,
            })
        })(),
    };
    if let Err(e) = result {
        eprintln!("zerosend: error: {e:#}");
        std::process::exit(1);
    }
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
