//! `scripts/vfio-bind` and `zerosend probe`, run for real inside a guest: the NIC starts
//! unbound, probe says how to bind it, vfio-bind binds it, zerosend can then open it, and
//! unbinding releases it. Without an IOMMU both refuse and say why.

use hw_tests::{workspace_root, Guest, GuestRun, Nic};

/// Runs `script` in `guest` with its NIC left unbound at boot and `scripts/vfio-bind` at
/// `/data/vfio-bind`; the script must succeed.
fn run_with_vfio_bind(guest: Guest, script: &str) -> GuestRun {
    let vfio_bind = std::fs::read(workspace_root().join("scripts/vfio-bind")).unwrap();
    let run = guest
        .no_auto_bind()
        .file("/data/vfio-bind", vfio_bind)
        .run(script)
        .run_to_end();
    run.expect_success();
    run
}

#[test]
fn probe_and_vfio_bind_round_trip() {
    let script = r#"
addr=$(zerosend probe | awk '/8086:100e/ {print $1}')
echo "PROBE_BEFORE $(zerosend probe | grep 8086:100e)"
echo "DRY_RUN $(sh /data/vfio-bind --dry-run $addr | tr '\n' '|')"
echo "PROBE_AFTER_DRY_RUN $(zerosend probe | grep 8086:100e)"
sh /data/vfio-bind $addr
echo "PROBE_BOUND $(zerosend probe | grep 8086:100e)"
zs-guest identify --pci $addr
sh /data/vfio-bind --unbind $addr
echo "PROBE_UNBOUND $(zerosend probe | grep 8086:100e)"
"#;
    let run = run_with_vfio_bind(Guest::new("tools-vfio-bind", Nic::E1000), script);
    let before = run.require("PROBE_BEFORE");
    if !before.contains("driver=none") || !before.contains("bind it: scripts/vfio-bind 0000:") {
        run.fail(&format!(
            "probe should say the NIC is unbound and how to bind it: {before}"
        ));
    }
    if !run
        .require("DRY_RUN")
        .contains("would run: echo 'vfio-pci' >")
    {
        run.fail("dry run did not show the binding commands");
    }
    if !run.require("PROBE_AFTER_DRY_RUN").contains("driver=none") {
        run.fail("--dry-run changed the binding");
    }
    if !run.require("PROBE_BOUND").contains("driver=vfio-pci")
        || !run.require("PROBE_BOUND").ends_with("ready")
    {
        run.fail("after vfio-bind, probe should report the NIC ready");
    }
    if !run.console_contains("IDENTIFY_OK") {
        run.fail("zerosend's driver could not open the NIC after vfio-bind");
    }
    if !run.require("PROBE_UNBOUND").contains("driver=none") {
        run.fail("--unbind did not release the NIC");
    }
}

#[test]
fn vfio_bind_refuses_without_iommu() {
    let script = r#"
addr=$(zerosend probe | awk '/8086:100e/ {print $1}')
echo "PROBE $(zerosend probe | grep 8086:100e)"
if sh /data/vfio-bind $addr 2>/tmp/err; then echo BOUND_WITHOUT_IOMMU; fi
echo "REFUSAL $(cat /tmp/err)"
"#;
    let run = run_with_vfio_bind(
        Guest::new("tools-vfio-bind-no-iommu", Nic::E1000).without_iommu(),
        script,
    );
    if run.console_contains("BOUND_WITHOUT_IOMMU") {
        run.fail("vfio-bind bound a device that no IOMMU translates for");
    }
    if !run.require("REFUSAL").contains("no IOMMU translates")
        || !run.require("PROBE").contains("no IOMMU")
    {
        run.fail("the refusal does not say the IOMMU is missing");
    }
}
