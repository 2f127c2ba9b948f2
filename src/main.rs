//! `zerosend`: the command-line program (file server and tools).

use anyhow::Result;
use clap::{Parser, Subcommand};
use driver::pci;
use driver::NicModel;

#[derive(Parser)]
#[command(version, about = "Zero-copy, stable-page file server over a userspace NIC driver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List PCI network devices, their driver binding and IOMMU group, and whether zerosend
    /// can drive them.
    Probe,
}

mod conn;
mod http;
mod metrics;
mod respond;
mod root;

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe => probe(),
    };
    if let Err(e) = result {
        eprintln!("zerosend: error: {e:#}");
        std::process::exit(1);
    }
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
        let group = address.iommu_group().map(|g| g.to_string()).unwrap_or_else(|| "none".into());
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
