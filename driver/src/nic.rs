//! Which NIC models zerosend drives, by PCI id.

use crate::error::{DriverError, Result};

/// A supported NIC model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicModel {
    /// Intel 82540EM (QEMU `e1000`), 8254x family.
    I82540EM,
    /// Intel 82545EM copper, 8254x family.
    I82545EM,
    /// Intel 82574L (QEMU `e1000e`).
    I82574L,
    /// Modern (VIRTIO 1.x, non-transitional) virtio-net.
    VirtioNet,
}

impl NicModel {
    pub const ALL: [NicModel; 4] = [
        NicModel::I82540EM,
        NicModel::I82545EM,
        NicModel::I82574L,
        NicModel::VirtioNet,
    ];

    pub fn pci_ids(self) -> (u16, u16) {
        match self {
            NicModel::I82540EM => (0x8086, 0x100e),
            NicModel::I82545EM => (0x8086, 0x100f),
            NicModel::I82574L => (0x8086, 0x10d3),
            NicModel::VirtioNet => (0x1af4, 0x1041),
        }
    }

    pub fn from_ids(vendor: u16, device: u16) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.pci_ids() == (vendor, device))
            .ok_or(DriverError::UnsupportedDevice { vendor, device })
    }

    /// Whether the e1000 family driver handles this model.
    pub fn is_e1000_family(self) -> bool {
        !matches!(self, NicModel::VirtioNet)
    }
}

impl std::fmt::Display for NicModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NicModel::I82540EM => "e1000 (82540EM)",
            NicModel::I82545EM => "e1000 (82545EM)",
            NicModel::I82574L => "e1000e (82574L)",
            NicModel::VirtioNet => "virtio-net (modern)",
        })
    }
}
