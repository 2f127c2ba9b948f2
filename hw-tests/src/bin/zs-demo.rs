//! `scripts/demo`: boot a QEMU guest with an emulated NIC behind an emulated VT-d IOMMU and
//! show zerosend driving it through the real Linux `vfio-pci`.

use clap::Parser;
use hw_tests::{Guest, Nic};

#[derive(Parser)]
#[command(about = "zerosend demo in a QEMU guest")]
struct Args {
    /// NIC model: e1000, e1000e or virtio.
    #[arg(long, default_value = "virtio")]
    nic: String,
}

fn main() {
    let args = Args::parse();
    let Some(nic) = Nic::parse(&args.nic) else {
        eprintln!("demo: unknown --nic {:?}: use e1000, e1000e or virtio", args.nic);
        std::process::exit(2);
    };
    if let Err(e) = hw_tests::testbed_ready() {
        eprintln!("demo: {e}");
        std::process::exit(1);
    }
    println!("demo: building guest programs and booting a {} guest (TCG, emulated VT-d)...", nic.name());
    let run = Guest::new(&format!("demo-{}", nic.name()), nic)
        .mac("52:54:00:5a:e0:01")
        .run("zs-guest identify")
        .start()
        .and_then(|g| g.wait())
        .unwrap_or_else(|e| {
            eprintln!("demo: {e}");
            std::process::exit(1)
        });
    println!("demo: what the guest read from the device through VFIO:");
    for line in &run.lines {
        if line.starts_with("zs-init:") || line.starts_with("zs-guest") || line.split(' ').next().is_some_and(|k| k.chars().all(|c| c.is_ascii_uppercase() || c == '_') && k.len() > 2) {
            println!("  {line}");
        }
    }
    println!(
        "demo: guest boot to /init {:.1?}, whole run {:.1?}; console log: {}",
        run.boot.unwrap_or_default(),
        run.wall,
        run.console_path().display()
    );
    if run.exit_code != Some(0) {
        eprintln!("demo: FAILED\n{}", run.tail(30));
        std::process::exit(1);
    }
    println!("demo: OK");
}
