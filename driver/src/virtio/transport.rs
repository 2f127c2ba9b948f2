//! The virtio modern PCI transport (VIRTIO 1.2 section 4.1.4): vendor capabilities in config
//! space point into BARs at the common configuration, notification area, ISR status and
//! device-specific configuration.

use crate::error::{DriverError, Result};
use crate::mmio::Mmio;
use crate::pci;
use crate::vfio::VfioPci;

/// `cfg_type` values of `struct virtio_pci_cap` (section 4.1.4).
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;

/// Offsets in `struct virtio_pci_common_cfg` (section 4.1.4.3). Each field must be accessed
/// at its natural width.
pub mod common {
    pub const DEVICE_FEATURE_SELECT: usize = 0x00; // le32
    pub const DEVICE_FEATURE: usize = 0x04; // le32
    pub const DRIVER_FEATURE_SELECT: usize = 0x08; // le32
    pub const DRIVER_FEATURE: usize = 0x0c; // le32
    pub const CONFIG_MSIX_VECTOR: usize = 0x10; // le16
    pub const NUM_QUEUES: usize = 0x12; // le16
    pub const DEVICE_STATUS: usize = 0x14; // u8
    pub const CONFIG_GENERATION: usize = 0x15; // u8
    pub const QUEUE_SELECT: usize = 0x16; // le16
    pub const QUEUE_SIZE: usize = 0x18; // le16
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a; // le16
    pub const QUEUE_ENABLE: usize = 0x1c; // le16
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e; // le16
    pub const QUEUE_DESC: usize = 0x20; // le64
    pub const QUEUE_DRIVER: usize = 0x28; // le64
    pub const QUEUE_DEVICE: usize = 0x30; // le64
}

/// "No MSI-X vector" for config_msix_vector / queue_msix_vector (section 4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

/// Device status bits (section 2.1).
#[derive(Clone, Copy, Debug)]
pub struct DeviceStatus;
impl DeviceStatus {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

/// Where one structure lives: BAR index, offset and length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CapLocation {
    bar: u8,
    offset: u32,
    length: u32,
}

/// The modern transport of one virtio PCI function.
pub struct VirtioPciTransport {
    bars: Vec<(u8, Mmio)>,
    common: CapLocation,
    notify: CapLocation,
    notify_off_multiplier: u32,
    isr: CapLocation,
    device: CapLocation,
}

impl VirtioPciTransport {
    /// Find the vendor capabilities and map the BARs they point into.
    pub fn new(pci_dev: &VfioPci) -> Result<Self> {
        let mut common = None;
        let mut notify = None;
        let mut isr = None;
        let mut device = None;
        let mut notify_off_multiplier = 0;
        for (id, at) in pci_dev.capabilities()? {
            if id != pci::CAP_ID_VENDOR {
                continue;
            }
            let at = at as u64;
            // struct virtio_pci_cap (section 4.1.4): cap_vndr, cap_next, cap_len, cfg_type,
            // bar, id, padding[2], offset (le32), length (le32); 16 bytes.
            let cap_len = pci_dev.config_read_u8(at + 2)?;
            let cfg_type = pci_dev.config_read_u8(at + 3)?;
            let loc = CapLocation {
                bar: pci_dev.config_read_u8(at + 4)?,
                offset: pci_dev.config_read_u32(at + 8)?,
                length: pci_dev.config_read_u32(at + 12)?,
            };
            // Section 4.1.4: "The driver MUST ignore any vendor-specific capability structure
            // which has a reserved bar value" (0x6..0xff), and a structure shorter than
            // virtio_pci_cap is not one of ours.
            if loc.bar > 5 || cap_len < 16 {
                continue;
            }
            // The first capability of each type that we can use wins (section 4.1.4.1).
            // VIRTIO_PCI_CAP_PCI_CFG (5), shared memory (8) and vendor data (9) are not used.
            match cfg_type {
                CAP_COMMON_CFG if common.is_none() => common = Some(loc),
                // struct virtio_pci_notify_cap (4.1.4.4) appends notify_off_multiplier (le32).
                CAP_NOTIFY_CFG if notify.is_none() && cap_len >= 20 => {
                    notify = Some(loc);
                    notify_off_multiplier = pci_dev.config_read_u32(at + 16)?;
                }
                CAP_ISR_CFG if isr.is_none() => isr = Some(loc),
                CAP_DEVICE_CFG if device.is_none() => device = Some(loc),
                _ => {}
            }
        }
        let missing = |what: &'static str| {
            DriverError::Device(format!(
                "no virtio {what} capability: not a modern (VIRTIO 1.x) device; in QEMU use disable-legacy=on"
            ))
        };
        let common = common.ok_or_else(|| missing("common configuration"))?;
        let notify = notify.ok_or_else(|| missing("notification"))?;
        let isr = isr.ok_or_else(|| missing("ISR"))?;
        let device = device.ok_or_else(|| missing("device configuration"))?;
        let mut bars: Vec<(u8, Mmio)> = Vec::new();
        for loc in [common, notify, isr, device] {
            if !bars.iter().any(|(b, _)| *b == loc.bar) {
                bars.push((loc.bar, pci_dev.map_bar(loc.bar as u32)?));
            }
        }
        for loc in [common, notify, isr, device] {
            let bar = &bars.iter().find(|(b, _)| *b == loc.bar).unwrap().1;
            if loc.offset as usize + loc.length as usize > bar.len() {
                return Err(DriverError::Device(format!(
                    "virtio capability {loc:?} lies outside BAR{} ({} bytes)",
                    loc.bar,
                    bar.len()
                )));
            }
        }
        // struct virtio_pci_common_cfg is 0x38 bytes up to queue_device (section 4.1.4.3).
        if (common.length as usize) < common::QUEUE_DEVICE + 8 {
            return Err(DriverError::Device(format!(
                "virtio common configuration too short: {common:?}"
            )));
        }
        Ok(VirtioPciTransport {
            bars,
            common,
            notify,
            notify_off_multiplier,
            isr,
            device,
        })
    }

    fn bar(&self, loc: CapLocation) -> &Mmio {
        &self.bars.iter().find(|(b, _)| *b == loc.bar).unwrap().1
    }

    fn common_at(&self, field: usize) -> usize {
        self.common.offset as usize + field
    }

    pub fn common_read8(&self, field: usize) -> u8 {
        self.bar(self.common).read8(self.common_at(field))
    }
    pub fn common_write8(&self, field: usize, v: u8) {
        self.bar(self.common).write8(self.common_at(field), v)
    }
    // The common configuration is little-endian (section 4.1.3: "little-endian").
    pub fn common_read16(&self, field: usize) -> u16 {
        u16::from_le(self.bar(self.common).read16(self.common_at(field)))
    }
    pub fn common_write16(&self, field: usize, v: u16) {
        self.bar(self.common)
            .write16(self.common_at(field), v.to_le())
    }
    pub fn common_read32(&self, field: usize) -> u32 {
        u32::from_le(self.bar(self.common).read32(self.common_at(field)))
    }
    pub fn common_write32(&self, field: usize, v: u32) {
        self.bar(self.common)
            .write32(self.common_at(field), v.to_le())
    }
    pub fn common_write64(&self, field: usize, v: u64) {
        // 64-bit fields are written as two 32-bit halves, low first (section 4.1.3.1).
        self.common_write32(field, v as u32);
        self.common_write32(field + 4, (v >> 32) as u32);
    }

    /// All 64 device feature bits (section 4.1.4.3: select 0 then 1).
    pub fn device_features(&self) -> u64 {
        self.common_write32(common::DEVICE_FEATURE_SELECT, 0);
        let lo = self.common_read32(common::DEVICE_FEATURE) as u64;
        self.common_write32(common::DEVICE_FEATURE_SELECT, 1);
        let hi = self.common_read32(common::DEVICE_FEATURE) as u64;
        lo | hi << 32
    }

    pub fn set_driver_features(&self, features: u64) {
        self.common_write32(common::DRIVER_FEATURE_SELECT, 0);
        self.common_write32(common::DRIVER_FEATURE, features as u32);
        self.common_write32(common::DRIVER_FEATURE_SELECT, 1);
        self.common_write32(common::DRIVER_FEATURE, (features >> 32) as u32);
    }

    pub fn status(&self) -> u8 {
        self.common_read8(common::DEVICE_STATUS)
    }

    pub fn set_status(&self, status: u8) {
        self.common_write8(common::DEVICE_STATUS, status)
    }

    /// Set `bit` in device_status, keeping the bits already set (section 3.1.1: each step of
    /// the initialisation sequence adds one bit).
    pub fn add_status(&self, bit: u8) {
        let status = self.status();
        self.set_status(status | bit);
    }

    /// Tell the device the driver has given up on it (section 2.1: FAILED).
    pub fn fail(&self) {
        self.add_status(DeviceStatus::FAILED);
    }

    /// Reset the device: write 0 and wait until it reads back 0 (section 4.1.4.3.2: "After
    /// writing 0 to device_status, the driver MUST wait for a read of device_status to return
    /// 0 before reinitializing the device"). The device may take its time under emulation, so
    /// the wait is generous.
    pub fn reset(&self) -> Result<()> {
        self.set_status(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.status() != 0 {
            if std::time::Instant::now() > deadline {
                return Err(DriverError::Timeout("virtio device reset"));
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        Ok(())
    }

    fn check_device_config(&self, offset: usize, len: usize) -> Result<()> {
        if offset + len > self.device.length as usize {
            return Err(DriverError::Device(format!(
                "virtio device configuration access {offset}+{len} beyond its {} bytes",
                self.device.length
            )));
        }
        Ok(())
    }

    /// Read `out.len()` bytes of device configuration, retrying until `config_generation` is
    /// stable so multi-field reads are consistent (section 4.1.4.3.1 and 2.5.1). Byte
    /// accesses: only for byte-array fields such as the MAC (section 4.1.3.1, natural width).
    pub fn read_device_config(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check_device_config(offset, out.len())?;
        let bar = self.bar(self.device);
        loop {
            let before = self.common_read8(common::CONFIG_GENERATION);
            for (i, b) in out.iter_mut().enumerate() {
                *b = bar.read8(self.device.offset as usize + offset + i);
            }
            if self.common_read8(common::CONFIG_GENERATION) == before {
                return Ok(());
            }
        }
    }

    /// A le16 field of device configuration, read at its natural width.
    pub fn device_config_read16(&self, offset: usize) -> Result<u16> {
        self.check_device_config(offset, 2)?;
        Ok(u16::from_le(
            self.bar(self.device)
                .read16(self.device.offset as usize + offset),
        ))
    }

    /// A le32 field of device configuration, read at its natural width.
    pub fn device_config_read32(&self, offset: usize) -> Result<u32> {
        self.check_device_config(offset, 4)?;
        Ok(u32::from_le(
            self.bar(self.device)
                .read32(self.device.offset as usize + offset),
        ))
    }

    /// A u8 field of device configuration.
    pub fn device_config_read8(&self, offset: usize) -> Result<u8> {
        self.check_device_config(offset, 1)?;
        Ok(self
            .bar(self.device)
            .read8(self.device.offset as usize + offset))
    }

    /// Route configuration change notifications to MSI-X `vector` (NO_VECTOR: none), checked
    /// by reading it back (section 4.1.5.1.2.1: the device answers NO_VECTOR when it could not
    /// map the vector).
    pub fn set_config_vector(&self, vector: u16) -> Result<()> {
        self.common_write16(common::CONFIG_MSIX_VECTOR, vector);
        let back = self.common_read16(common::CONFIG_MSIX_VECTOR);
        if back != vector {
            return Err(DriverError::Device(format!(
                "configuration MSI-X vector {vector} not accepted (reads back {back:#x})"
            )));
        }
        Ok(())
    }

    /// Offset in the notify BAR for a queue whose `queue_notify_off` is `notify_off`:
    /// `cap.offset + queue_notify_off * notify_off_multiplier` (section 4.1.4.4), checked to
    /// lie inside the notification structure ("cap.length ... at least
    /// queue_notify_off * notify_off_multiplier + 2").
    pub fn notify_offset(&self, notify_off: u16) -> Result<usize> {
        let within = notify_off as usize * self.notify_off_multiplier as usize;
        if within + 2 > self.notify.length as usize {
            return Err(DriverError::Device(format!(
                "virtio queue_notify_off {notify_off} (multiplier {}) lies outside the {}-byte notification area",
                self.notify_off_multiplier, self.notify.length
            )));
        }
        Ok(self.notify.offset as usize + within)
    }

    /// Configure and enable virtqueue `index` (section 4.1.5.1.3): select it, check the
    /// device has it (`queue_size` != 0), write our `size` (a power of two no larger than
    /// the device's maximum), the three area addresses (IOVAs: ACCESS_PLATFORM is
    /// negotiated), the MSI-X vector (`vector`, or NO_VECTOR when we only poll or use
    /// INTx), then `queue_enable = 1`. Returns the queue's offset in the notification BAR.
    pub fn setup_queue(
        &self,
        index: u16,
        size: u16,
        areas: (u64, u64, u64),
        vector: u16,
    ) -> Result<usize> {
        let (desc, driver, device) = areas;
        self.common_write16(common::QUEUE_SELECT, index);
        let max = self.common_read16(common::QUEUE_SIZE);
        if max == 0 {
            return Err(DriverError::Device(format!(
                "virtqueue {index} does not exist (queue_size 0)"
            )));
        }
        if size > max || !size.is_power_of_two() {
            return Err(DriverError::InvalidArgument(format!(
                "virtqueue {index}: size {size} must be a power of two no larger than the device's {max}"
            )));
        }
        if self.common_read16(common::QUEUE_ENABLE) != 0 {
            return Err(DriverError::Device(format!(
                "virtqueue {index} is enabled before set-up (reset failed?)"
            )));
        }
        self.common_write16(common::QUEUE_SIZE, size);
        self.common_write16(common::QUEUE_MSIX_VECTOR, vector);
        // Section 4.1.5.1.2.1: the device answers NO_VECTOR when it could not map the vector.
        let back = self.common_read16(common::QUEUE_MSIX_VECTOR);
        if back != vector {
            return Err(DriverError::Device(format!(
                "virtqueue {index}: MSI-X vector {vector} not accepted (reads back {back:#x})"
            )));
        }
        self.common_write64(common::QUEUE_DESC, desc);
        self.common_write64(common::QUEUE_DRIVER, driver);
        self.common_write64(common::QUEUE_DEVICE, device);
        let notify_off = self.common_read16(common::QUEUE_NOTIFY_OFF);
        let offset = self.notify_offset(notify_off)?;
        self.common_write16(common::QUEUE_ENABLE, 1);
        Ok(offset)
    }

    /// The largest size the device allows for virtqueue `index` (0: no such queue).
    pub fn max_queue_size(&self, index: u16) -> u16 {
        self.common_write16(common::QUEUE_SELECT, index);
        self.common_read16(common::QUEUE_SIZE)
    }

    /// Notify the device that queue `index` has new buffers: without
    /// VIRTIO_F_NOTIFICATION_DATA the driver writes the 16-bit queue index to the queue's
    /// notification address (section 4.1.5.2).
    pub fn notify(&self, notify_offset: usize, index: u16) {
        self.bar(self.notify).write16(notify_offset, index.to_le())
    }

    /// Read (and thereby clear) the ISR status byte.
    pub fn isr_status(&self) -> u8 {
        self.bar(self.isr).read8(self.isr.offset as usize)
    }
}
