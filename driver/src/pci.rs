//! PCI devices as Linux shows them in sysfs, and the config-space fields we use.
//!
//! Config-space offsets are from the PCI Local Bus Specification 3.0, section 6.1 (type 0
//! header) and 6.7 (capabilities list).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{DriverError, Result};

/// Command register (PCI 3.0 section 6.2.2).
pub const CONFIG_COMMAND: u64 = 0x04;
/// Command bit 1: respond to memory space accesses (BARs).
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command bit 2: the device may master the bus, i.e. do DMA.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command bit 10: legacy INTx interrupts disabled (we poll).
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register; bit 4 says a capabilities list exists.
pub const CONFIG_STATUS: u64 = 0x06;
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Pointer to the first capability (PCI 3.0 section 6.7).
pub const CONFIG_CAPABILITIES_POINTER: u64 = 0x34;
/// Vendor-specific capability id (used by virtio, VIRTIO 1.2 section 4.1.4).
pub const CAP_ID_VENDOR: u8 = 0x09;

const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// A PCI device as named by Linux: `domain:bus:device.function`, e.g. `0000:00:02.0`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress(String);

impl PciAddress {
    /// Accepts `0000:00:02.0` or the short `00:02.0` (domain 0).
    pub fn parse(s: &str) -> Result<Self> {
        let full = if s.matches(':').count() == 1 {
            format!("0000:{s}")
        } else {
            s.to_string()
        };
        let ok = full.len() == 12
            && full.as_bytes()[4] == b':'
            && full.as_bytes()[7] == b':'
            && full.as_bytes()[10] == b'.'
            && full
                .chars()
                .enumerate()
                .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit());
        if !ok {
            return Err(DriverError::InvalidArgument(format!(
                "bad PCI address {s:?}: expected domain:bus:device.function such as 0000:00:02.0"
            )));
        }
        Ok(PciAddress(full.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `/sys/bus/pci/devices/<address>`
    pub fn sysfs_path(&self) -> PathBuf {
        Path::new(SYSFS_PCI_DEVICES).join(&self.0)
    }

    fn read_hex(&self, file: &str) -> Result<u32> {
        let path = self.sysfs_path().join(file);
        let text = fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DriverError::DeviceNotFound(self.0.clone())
            } else {
                DriverError::io(format!("reading {}", path.display()), e)
            }
        })?;
        u32::from_str_radix(text.trim().trim_start_matches("0x"), 16)
            .map_err(|_| DriverError::Device(format!("unexpected contents of {}", path.display())))
    }

    /// (vendor, device) ids.
    pub fn ids(&self) -> Result<(u16, u16)> {
        Ok((
            self.read_hex("vendor")? as u16,
            self.read_hex("device")? as u16,
        ))
    }

    /// 24-bit class code (0x02xxxx is a network controller).
    pub fn class(&self) -> Result<u32> {
        self.read_hex("class")
    }

    /// Name of the bound kernel driver, if any.
    pub fn driver(&self) -> Option<String> {
        fs::read_link(self.sysfs_path().join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// IOMMU group number; `None` when the device is not behind an IOMMU.
    pub fn iommu_group(&self) -> Option<u32> {
        fs::read_link(self.sysfs_path().join("iommu_group"))
            .ok()
            .and_then(|p| p.file_name().and_then(|n| n.to_str()?.parse().ok()))
    }

    pub fn exists(&self) -> bool {
        self.sysfs_path().exists()
    }
}

impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// All PCI devices, sorted by address.
pub fn all_devices() -> Result<Vec<PciAddress>> {
    addresses_in(SYSFS_PCI_DEVICES)
}

/// The PCI addresses named by the entries of a sysfs directory, sorted.
fn addresses_in(dir: &str) -> Result<Vec<PciAddress>> {
    let entries = fs::read_dir(dir).map_err(|e| DriverError::io(format!("listing {dir}"), e))?;
    let mut out: Vec<PciAddress> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| PciAddress::parse(&e.file_name().to_string_lossy()).ok())
        .collect();
    out.sort();
    Ok(out)
}

/// Devices with the given vendor:device id.
pub fn find_devices(vendor: u16, device: u16) -> Result<Vec<PciAddress>> {
    Ok(all_devices()?
        .into_iter()
        .filter(|a| a.ids().ok() == Some((vendor, device)))
        .collect())
}

/// The other devices in an IOMMU group.
pub fn iommu_group_devices(group: u32) -> Result<Vec<PciAddress>> {
    addresses_in(&format!("/sys/kernel/iommu_groups/{group}/devices"))
}

/// A device in a VFIO group may be bound to vfio-pci, to pci-stub, or to nothing; anything
/// else keeps the group from being viable (Linux `Documentation/driver-api/vfio.rst`).
pub fn driver_allows_vfio_group(driver: Option<&str>) -> bool {
    matches!(
        driver,
        None | Some("vfio-pci") | Some("pci-stub") | Some("pcieport")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pci_addresses() {
        assert_eq!(
            PciAddress::parse("00:02.0").unwrap().as_str(),
            "0000:00:02.0"
        );
        assert_eq!(
            PciAddress::parse("0000:3B:00.1").unwrap().as_str(),
            "0000:3b:00.1"
        );
        assert!(PciAddress::parse("eth0").is_err());
        assert!(PciAddress::parse("0000:00:02").is_err());
        assert!(PciAddress::parse("0000:zz:02.0").is_err());
    }
}
