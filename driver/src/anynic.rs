//! One entry point for every NIC model: [`open_nic`] looks at the PCI ids and returns the
//! right driver as an [`AnyNic`], which implements [`NetQueue`] by delegation.
//!
//! ```no_run
//! use driver::anynic::{open_nic, NicConfig};
//! use driver::pci::PciAddress;
//! use driver::NetQueue;
//! let mut nic = open_nic(&PciAddress::parse("0000:00:02.0")?, &NicConfig::default())?;
//! println!("{} link up: {}", nic.mac_address(), nic.link_up());
//! # Ok::<(), driver::DriverError>(())
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::dma::{DmaAccess, DmaSpace};
use crate::e1000::E1000;
use crate::error::{DriverError, Result};
use crate::irq::{Interruptible, IrqMode};
use crate::nic::NicModel;
use crate::pci::PciAddress;
use crate::queue::{Capabilities, DeviceStats, MacAddress, NetQueue, RxBuffer, TxFrame, TxToken};
use crate::vfio::VfioPci;
use crate::virtio::VirtioNet;

/// Which offloads a driver may use. Switching one off makes [`NetQueue::capabilities`]
/// report it absent and [`NetQueue::tx_enqueue`] reject requests for it, so tests and
/// benchmarks can compare offloaded and software paths on the same device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadSwitches {
    /// IPv4 header checksum (Intel devices; virtio-net has none and ignores the switch).
    pub ipv4_header_checksum: bool,
    /// TCP and UDP checksums.
    pub l4_checksum: bool,
    /// TCP segmentation (also needs the L4 checksum offload, and on Intel devices the IPv4
    /// header checksum offload).
    pub tso: bool,
}

impl Default for OffloadSwitches {
    fn default() -> Self {
        OffloadSwitches {
            ipv4_header_checksum: true,
            l4_checksum: true,
            tso: true,
        }
    }
}

/// Deliberate misconfiguration, for tests that prove the IOMMU confines the device. Only
/// with the `fault-injection` feature.
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultInjection {
    /// Normal operation.
    #[default]
    None,
    /// Map the receive buffers read-only for the device: every received frame's data write
    /// is stopped by the IOMMU (the guest kernel logs a `DMAR: [DMA Write]` fault). Drivers
    /// must detect such frames and drop them rather than hand out stale memory.
    RxBuffersReadOnly,
    /// Map the transmit descriptor ring read-only for the device: it can fetch descriptors
    /// and send the frames, but its completion write-back is stopped by the IOMMU, so no
    /// frame ever completes. Exercises the TX-hang watchdog.
    TxRingReadOnly,
}

/// Driver configuration shared by every NIC model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicConfig {
    /// Transmit descriptors (a multiple of 8, 8..=4096). A frame takes one descriptor per
    /// 4 KiB page it touches, plus one for an offload context.
    pub tx_ring_size: u16,
    /// Receive descriptors (a multiple of 8, 8..=4096).
    pub rx_ring_size: u16,
    /// Bytes per receive buffer: 2048, 4096, 8192 or 16384. Every frame fits one buffer.
    pub rx_buffer_size: usize,
    /// Offloads the driver may use.
    pub offloads: OffloadSwitches,
    /// How long `open` waits for the link before returning anyway.
    pub link_wait: Duration,
    /// TX-hang watchdog: frames the device has been told about that make no progress for
    /// this long (with the link up) make `tx_reap` reset the ring and report
    /// [`DriverError::TxHang`].
    pub tx_hang_timeout: Duration,
    #[cfg(feature = "fault-injection")]
    pub fault_injection: FaultInjection,
    /// virtio-net: use indirect descriptor tables for TX when offered (one ring slot per
    /// frame, so 256 frames can be in flight).
    pub virtio_indirect: bool,
    /// virtio-net: use packed virtqueues when offered (with indirect descriptors only).
    pub virtio_packed: bool,
    /// Enable the device's interrupts through VFIO (MSI-X, else MSI, else INTx) for
    /// [`crate::irq::Interruptible`]. Off: the driver only polls and never touches them. A
    /// device without a usable interrupt is logged and polled.
    pub interrupts: bool,
    /// virtio-net with several queue pairs: a receive queue that ran dry notifies every
    /// receive queue when refilled, releasing frames the device may hold for it behind
    /// another queue (`virtio::multiqueue`, "A receive queue that ran dry"). Off only to
    /// show the stall it prevents.
    pub virtio_rx_notify_all: bool,
}

impl Default for NicConfig {
    fn default() -> Self {
        NicConfig {
            tx_ring_size: 256,
            rx_ring_size: 256,
            rx_buffer_size: 2048,
            offloads: OffloadSwitches::default(),
            link_wait: Duration::from_secs(10),
            tx_hang_timeout: Duration::from_secs(1),
            #[cfg(feature = "fault-injection")]
            fault_injection: FaultInjection::None,
            virtio_indirect: true,
            virtio_packed: true,
            interrupts: false,
            virtio_rx_notify_all: true,
        }
    }
}

impl NicConfig {
    /// Check the sizes; drivers call this in `open`.
    pub fn validate(&self) -> Result<()> {
        for (what, n) in [
            ("tx_ring_size", self.tx_ring_size),
            ("rx_ring_size", self.rx_ring_size),
        ] {
            if !(8..=4096).contains(&n) || n % 8 != 0 {
                return Err(DriverError::InvalidArgument(format!(
                    "{what} {n}: must be a multiple of 8 between 8 and 4096"
                )));
            }
        }
        if ![2048, 4096, 8192, 16384].contains(&self.rx_buffer_size) {
            return Err(DriverError::InvalidArgument(format!(
                "rx_buffer_size {}: must be 2048, 4096, 8192 or 16384",
                self.rx_buffer_size
            )));
        }
        if self.tx_hang_timeout.is_zero() {
            return Err(DriverError::InvalidArgument(
                "tx_hang_timeout must be non-zero".into(),
            ));
        }
        Ok(())
    }

    /// The device's access to the receive buffers: read-only under
    /// `FaultInjection::RxBuffersReadOnly` (the IOMMU then stops its writes), else read-write.
    pub(crate) fn rx_buffer_access(&self) -> DmaAccess {
        #[cfg(feature = "fault-injection")]
        if self.fault_injection == FaultInjection::RxBuffersReadOnly {
            return DmaAccess::DeviceReads;
        }
        DmaAccess::DeviceReadsWrites
    }

    /// The device's access to the transmit ring's memory it writes completions to (e1000:
    /// the descriptor ring; virtio-net: the used ring): read-only under
    /// `FaultInjection::TxRingReadOnly` (the IOMMU then stops its completion writes), else
    /// read-write.
    pub(crate) fn tx_completion_access(&self) -> DmaAccess {
        #[cfg(feature = "fault-injection")]
        if self.fault_injection == FaultInjection::TxRingReadOnly {
            return DmaAccess::DeviceReads;
        }
        DmaAccess::DeviceReadsWrites
    }
}

/// Any supported NIC, behind one [`NetQueue`].
#[derive(Debug)]
pub enum AnyNic {
    /// 82540EM, 82545EM, 82574L.
    E1000(E1000),
    /// Modern virtio-net (1af4:1041).
    Virtio(VirtioNet),
}

impl AnyNic {
    /// The device model.
    pub fn model(&self) -> NicModel {
        match self {
            AnyNic::E1000(n) => n.model(),
            AnyNic::Virtio(_) => NicModel::VirtioNet,
        }
    }

    fn queue(&self) -> &dyn NetQueue {
        match self {
            AnyNic::E1000(n) => n,
            AnyNic::Virtio(n) => n,
        }
    }

    fn queue_mut(&mut self) -> &mut dyn NetQueue {
        match self {
            AnyNic::E1000(n) => n,
            AnyNic::Virtio(n) => n,
        }
    }
}

impl Interruptible for AnyNic {
    fn irq_mode(&self) -> Option<IrqMode> {
        match self {
            AnyNic::E1000(n) => n.irq_mode(),
            AnyNic::Virtio(n) => n.irq_mode(),
        }
    }
    fn irq_fds(&self) -> Vec<std::os::fd::RawFd> {
        match self {
            AnyNic::E1000(n) => n.irq_fds(),
            AnyNic::Virtio(n) => n.irq_fds(),
        }
    }
    fn irq_arm(&mut self) {
        match self {
            AnyNic::E1000(n) => n.irq_arm(),
            AnyNic::Virtio(n) => n.irq_arm(),
        }
    }
    fn irq_disarm(&mut self) -> u64 {
        match self {
            AnyNic::E1000(n) => n.irq_disarm(),
            AnyNic::Virtio(n) => n.irq_disarm(),
        }
    }
    fn irq_count(&self) -> u64 {
        match self {
            AnyNic::E1000(n) => n.irq_count(),
            AnyNic::Virtio(n) => n.irq_count(),
        }
    }
}

/// Open the NIC at `address` through VFIO and start the driver for its model.
pub fn open_nic(address: &PciAddress, config: &NicConfig) -> Result<AnyNic> {
    let pci = VfioPci::open(address)?;
    let (vendor, device) = pci.ids();
    let model = NicModel::from_ids(vendor, device)?;
    match model {
        NicModel::I82540EM | NicModel::I82545EM | NicModel::I82574L => {
            Ok(AnyNic::E1000(E1000::open(pci, config)?))
        }
        NicModel::VirtioNet => Ok(AnyNic::Virtio(VirtioNet::open(pci, config)?)),
    }
}

impl NetQueue for AnyNic {
    fn mac_address(&self) -> MacAddress {
        self.queue().mac_address()
    }
    fn dma(&self) -> &Arc<DmaSpace> {
        self.queue().dma()
    }
    fn capabilities(&self) -> Capabilities {
        self.queue().capabilities()
    }
    fn link_up(&mut self) -> bool {
        self.queue_mut().link_up()
    }
    fn tx_capacity(&self, segments: usize) -> usize {
        self.queue().tx_capacity(segments)
    }
    fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> Result<()> {
        self.queue_mut().tx_enqueue(frame)
    }
    fn tx_flush(&mut self) {
        self.queue_mut().tx_flush()
    }
    fn tx_reap(&mut self, done: &mut dyn FnMut(TxToken)) -> Result<usize> {
        self.queue_mut().tx_reap(done)
    }
    fn rx_next(&mut self) -> Option<RxBuffer> {
        self.queue_mut().rx_next()
    }
    fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        self.queue().rx_read(buffer, out)
    }
    fn rx_recycle(&mut self, buffer: RxBuffer) {
        self.queue_mut().rx_recycle(buffer)
    }
    fn rx_flush(&mut self) {
        self.queue_mut().rx_flush()
    }
    fn rx_poll(&mut self, budget: usize, f: &mut dyn FnMut(&[u8])) -> usize {
        self.queue_mut().rx_poll(budget, f)
    }
    fn stats(&mut self) -> DeviceStats {
        self.queue_mut().stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        assert!(NicConfig::default().validate().is_ok());
        let bad = NicConfig {
            tx_ring_size: 12,
            ..NicConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = NicConfig {
            rx_buffer_size: 1500,
            ..NicConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
