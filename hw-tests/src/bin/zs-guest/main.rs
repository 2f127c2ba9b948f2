//! The guest-side test program: runs inside the QEMU guest, drives the NIC through VFIO with
//! the `driver` crate, and prints results as `KEY value` lines the host-side tests parse.
//! Errors go to stderr as `zs-guest: error: ...` with exit status 1.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use driver::dma::DmaAccess;
use driver::pci::{self, PciAddress};
use driver::vfio::VfioPci;
use driver::virtio::{features, VirtioPciTransport};
use driver::{Capabilities, L4Checksum, L4Protocol, NicModel, Tso, TsoHeaders, TxOffload};

mod mq;
mod mqirq;
mod nictest;
mod stack;
mod virtio;

#[derive(Parser)]
#[command(about = "zerosend guest-side test program")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open the NIC through VFIO and print what it says about itself.
    Identify {
        /// PCI address; default: the first supported NIC found.
        #[arg(long)]
        pci: Option<String>,
    },
    /// Send a file with the netstack (zero-copy from the page cache) to a TCP peer.
    StackSend(stack::StackSendArgs),
    /// Answer TCP SYNs with RSTs on every queue pair of a multi-queue NIC, one thread each.
    MqSyn(mq::MqSynArgs),
    /// Sleep on each queue pair's own interrupt vector, one thread each.
    MqIrq(mqirq::MqIrqArgs),
    #[command(flatten)]
    Nic(nictest::NicCommand),
    #[command(flatten)]
    Virtio(virtio::VirtioCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Identify { pci } => identify(pci.as_deref()),
        Command::StackSend(a) => stack::run(a),
        Command::MqSyn(a) => mq::run(a),
        Command::MqIrq(a) => mqirq::run(a),
        Command::Nic(c) => nictest::run(c),
        Command::Virtio(c) => virtio::run(c),
    };
    if let Err(e) = result {
        eprintln!("zs-guest: error: {e:#}");
        std::process::exit(1);
    }
}

/// The first PCI device that is a NIC zerosend drives.
fn find_nic(pci: Option<&str>) -> Result<(PciAddress, NicModel)> {
    if let Some(p) = pci {
        let a = PciAddress::parse(p)?;
        let (v, d) = a.ids()?;
        return Ok((a, NicModel::from_ids(v, d)?));
    }
    for a in pci::all_devices()? {
        let Ok((v, d)) = a.ids() else { continue };
        if let Ok(m) = NicModel::from_ids(v, d) {
            return Ok((a, m));
        }
    }
    bail!("no supported NIC found on the PCI bus")
}

fn identify(pci: Option<&str>) -> Result<()> {
    let (address, model) = find_nic(pci)?;
    println!("NIC {address} {model}");
    let dev = VfioPci::open(&address).with_context(|| format!("opening {address}"))?;
    let (vendor, device) = dev.ids();
    println!("PCI_IDS {vendor:04x}:{device:04x}");
    let command = dev.enable_bus_master()?;
    println!("PCI_COMMAND {command:#06x}");
    let ring = dev
        .dma()
        .allocate(64 * 1024, DmaAccess::DeviceReadsWrites)?;
    let payload = dev.dma().allocate(4096, DmaAccess::DeviceReads)?;
    ring.write_volatile(0, 0xfeed_f00d_u32);
    println!(
        "DMA rw_iova={:#x} rw_len={} ro_iova={:#x} ro_len={} readback={:#x}",
        ring.iova(),
        ring.len(),
        payload.iova(),
        payload.len(),
        ring.read_volatile::<u32>(0)
    );
    if model.is_e1000_family() {
        let bar0 = dev.map_bar(0)?;
        let status = bar0.read32(driver::e1000::regs::STATUS);
        println!("E1000_STATUS {status:#010x}");
        let mac = driver::e1000::read_mac_from_receive_address(&bar0)
            .context("RAL0/RAH0 holds no valid address")?;
        println!("MAC {mac}");
    } else {
        let t = VirtioPciTransport::new(&dev)?;
        t.reset()?;
        let offered = t.device_features();
        println!(
            "VIRTIO_FEATURES {offered:#018x} {}",
            features::names(offered).join(",")
        );
        if offered & features::F_ACCESS_PLATFORM == 0 {
            return Err(driver::DriverError::NoAccessPlatform.into());
        }
        println!("ACCESS_PLATFORM yes");
        if offered & features::NET_F_MAC != 0 {
            let mut mac = [0u8; 6];
            t.read_device_config(0, &mut mac)?;
            println!("MAC {}", driver::MacAddress(mac));
        }
    }
    println!("IDENTIFY_OK");
    Ok(())
}

/// Comparison switches for benchmarks and tests, given to the guest program in its
/// environment: `ZEROSEND_VIRTIO_INDIRECT=0`, `ZEROSEND_VIRTIO_PACKED=0`.
fn with_env_switches(config: &driver::anynic::NicConfig) -> driver::anynic::NicConfig {
    let off = |name: &str| std::env::var_os(name).is_some_and(|v| v == "0");
    let mut config = config.clone();
    if off("ZEROSEND_VIRTIO_INDIRECT") {
        config.virtio_indirect = false;
    }
    if off("ZEROSEND_VIRTIO_PACKED") {
        config.virtio_packed = false;
    }
    config
}

/// Checksum offload for a frame with an option-less IPv4 header (Ethernet 14 + IPv4 20 bytes,
/// so the TCP/UDP header starts at 34): the TCP/UDP checksum, and the IPv4 header checksum
/// too when `ipv4_header`. The guest programs build only such frames.
fn checksum_offload(protocol: L4Protocol, ipv4_header: bool) -> TxOffload {
    let field = match protocol {
        L4Protocol::Tcp => 34 + 16,
        L4Protocol::Udp => 34 + 6,
    };
    TxOffload {
        ipv6_header: None,
        ipv4_header: ipv4_header.then_some(14),
        l4_checksum: Some(L4Checksum {
            protocol,
            start: 34,
            field,
        }),
        tso: None,
    }
}

/// TSO of a TCP frame with 54 bytes of headers (Ethernet, IPv4 and TCP without options), for
/// a device with `caps`: the TCP checksum offloaded as TSO requires, and the IPv4 header
/// checksum too where the device's convention has it compute that per segment
/// ([`TsoHeaders::PerSegment`]). Build the headers with [`TsoFields::new`].
fn tso_offload(caps: &Capabilities, mss: u16) -> TxOffload {
    TxOffload {
        tso: Some(Tso {
            mss,
            header_len: 54,
        }),
        ..checksum_offload(L4Protocol::Tcp, caps.tso_headers == TsoHeaders::PerSegment)
    }
}

/// How the IPv4 and TCP headers of a TSO frame are filled in, per the device's
/// [`TsoHeaders`] convention (see `driver::queue`).
struct TsoFields {
    /// IPv4 total length.
    ip_total: u16,
    /// Whether the IPv4 header checksum is computed here (else left zero for the device).
    ip_checksum: bool,
    /// TCP length in the pseudo-header sum that goes into the TCP checksum field.
    pseudo_len: u16,
}

impl TsoFields {
    /// For a large frame carrying `tcp_len` bytes of TCP (header and payload).
    fn new(convention: TsoHeaders, tcp_len: usize) -> Result<TsoFields> {
        Ok(match convention {
            // Intel: the device writes every segment's total length and header checksum
            // (the field must be zero) and adds each segment's TCP length to the sum.
            TsoHeaders::PerSegment => TsoFields {
                ip_total: (20 + tcp_len).min(65535) as u16,
                ip_checksum: false,
                pseudo_len: 0,
            },
            // virtio: the headers describe the whole large packet.
            TsoHeaders::WholePacket => {
                let ip_total = u16::try_from(20 + tcp_len)
                    .with_context(|| format!("{tcp_len} TCP bytes exceed one IPv4 packet"))?;
                TsoFields {
                    ip_total,
                    ip_checksum: true,
                    pseudo_len: ip_total - 20,
                }
            }
        })
    }
}
