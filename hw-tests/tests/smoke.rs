//! Smoke tests: for each NIC model, the guest binds the NIC to vfio-pci and `zs-guest
//! identify` (built on the `driver` crate) opens the VFIO container, group and device,
//! switches on bus mastering, maps DMA buffers and reads the device's identity. The values
//! asserted are the ones QEMU was told.

use hw_tests::{Guest, Nic};

fn identify(nic: Nic, mac: &str) -> hw_tests::GuestRun {
    let run = Guest::new(&format!("smoke-{}", nic.name()), nic)
        .mac(mac)
        .run("zs-guest identify")
        .run_to_end();
    run.expect_success();
    let (v, d) = nic.pci_ids();
    run.expect_eq(
        "PCI ids",
        run.require("PCI_IDS"),
        format!("{v:04x}:{d:04x}").as_str(),
    );
    run.expect_eq("MAC address", run.require("MAC"), mac);
    let command =
        u16::from_str_radix(run.require("PCI_COMMAND").trim_start_matches("0x"), 16).unwrap();
    run.expect_eq("bus master bit", command & 0x4, 0x4);
    let dma = run.require("DMA");
    if !dma.contains("readback=0xfeedf00d") {
        run.fail(&format!("DMA buffer readback wrong: {dma}"));
    }
    run
}

#[test]
fn e1000_identity_through_vfio() {
    let run = identify(Nic::E1000, "52:54:00:aa:00:01");
    // STATUS.LU (bit 1): QEMU's user-mode link is up.
    let status =
        u32::from_str_radix(run.require("E1000_STATUS").trim_start_matches("0x"), 16).unwrap();
    run.expect_eq("link up", status & 0x2, 0x2);
}

#[test]
fn e1000_82545em_identity_through_vfio() {
    identify(Nic::E1000_82545em, "52:54:00:aa:00:04");
}

#[test]
fn e1000e_identity_through_vfio() {
    identify(Nic::E1000e, "52:54:00:aa:00:02");
}

#[test]
fn virtio_identity_through_vfio() {
    let run = identify(Nic::Virtio, "52:54:00:aa:00:03");
    run.expect_eq(
        "ACCESS_PLATFORM offered",
        run.require("ACCESS_PLATFORM"),
        "yes",
    );
    let features = run.require("VIRTIO_FEATURES");
    // CSUM/HOST_TSO4 are offered only with a vnet-header backend (TAP), not user-mode.
    for f in ["VERSION_1", "ACCESS_PLATFORM", "MAC"] {
        if !features
            .split(' ')
            .nth(1)
            .unwrap_or("")
            .split(',')
            .any(|x| x == f)
        {
            run.fail(&format!("feature {f} not offered: {features}"));
        }
    }
}

/// `zs-guest identify` in `guest` must fail, and its refusal must name what is missing and
/// the fix: every one of `needles` on the console (`what` otherwise).
fn expect_refusal(guest: Guest, needles: &[&str], what: &str) {
    let run = guest.run("zs-guest identify").run_to_end();
    run.expect_failure();
    if !needles.iter().all(|needle| run.console_contains(needle)) {
        run.fail(what);
    }
}

#[test]
fn virtio_without_iommu_platform_is_refused() {
    expect_refusal(
        Guest::new("smoke-virtio-no-iommu-platform", Nic::Virtio).without_virtio_iommu_platform(),
        &["iommu_platform=on", "ACCESS_PLATFORM"],
        "the refusal does not name ACCESS_PLATFORM and the fix (iommu_platform=on)",
    );
}

#[test]
fn nic_without_viommu_is_refused() {
    expect_refusal(
        Guest::new("smoke-e1000-no-viommu", Nic::E1000).without_iommu(),
        &["no IOMMU", "intel-iommu"],
        "the refusal does not say the IOMMU is missing and how to add it",
    );
}
