//! Typed errors for device access, DMA and the queue API. Each misconfiguration error says
//! what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("PCI device {0} not found in /sys/bus/pci/devices (check the address with `zerosend probe` or `lspci -D`)")]
    DeviceNotFound(String),

    #[error("PCI device {device} is bound to driver {driver:?}, not vfio-pci; bind it with `scripts/vfio-bind {device}`")]
    NotBoundToVfio {
        device: String,
        driver: Option<String>,
    },

    #[error("no IOMMU: {device} has no iommu_group. Enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line; in QEMU add `-device intel-iommu` with `-machine q35,kernel-irqchip=split`); zerosend refuses to DMA without one")]
    NoIommu { device: String },

    #[error("IOMMU group {group} is not viable: device {other} in the same group is bound to {driver:?}; bind every device of the group to vfio-pci (or leave it unbound): `scripts/vfio-bind {other}`")]
    GroupNotViable {
        group: u32,
        other: String,
        driver: Option<String>,
    },

    #[error("VFIO is not available ({path}): load the vfio-pci module (`modprobe vfio-pci`) and run as root or with access to /dev/vfio")]
    VfioUnavailable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("VFIO operation failed: {what}: {detail}")]
    Vfio { what: &'static str, detail: String },

    #[error("{what} failed: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("unsupported device {vendor:04x}:{device:04x}: zerosend drives e1000 (8086:100e, 8086:100f), e1000e (8086:10d3) and modern virtio-net (1af4:1041)")]
    UnsupportedDevice { vendor: u16, device: u16 },

    #[error("virtio device does not offer VIRTIO_F_ACCESS_PLATFORM (feature bit 33): it would DMA to physical addresses and bypass the IOMMU. In QEMU use `-device virtio-net-pci,disable-legacy=on,iommu_platform=on`")]
    NoAccessPlatform,

    #[error("virtio device lacks required feature: {0}")]
    MissingFeature(&'static str),

    #[error("device error: {0}")]
    Device(String),

    #[error("DMA memory: {0}")]
    Dma(String),

    #[error("IOVA space exhausted: no free range of {len} bytes aligned to {align}")]
    IovaExhausted { len: u64, align: u64 },

    #[error("TX ring full")]
    TxRingFull,

    #[error("frame rejected: {0}")]
    BadFrame(String),

    #[error("TX hang: the device made no progress for {ms} ms; the driver reset its transmit path (e1000: the TX ring; virtio-net: the device) and {lost} frames were dropped")]
    TxHang { ms: u64, lost: usize },

    #[error("no usable interrupt through VFIO ({0}); polling instead")]
    NoInterrupt(String),

    #[error("timed out waiting for {0}")]
    Timeout(&'static str),

    #[error(
        "device reset: {reason}; the device was re-initialised and {lost} frames were dropped"
    )]
    DeviceReset { reason: String, lost: usize },

    /// A multi-queue device hit a fault (TX hang, DEVICE_NEEDS_RESET, a bad used-ring
    /// entry) that needs a device reset, which the driver does not do while other threads
    /// drive the other queues. Every queue of the device reports it from then on.
    #[error("multi-queue device fault detected on queue {queue}: {reason}; the device was not reset (other queues are in use): drop every queue handle, which resets it, and open it again")]
    QueueFault { queue: usize, reason: String },
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;

impl DriverError {
    /// Whether the driver already recovered from this fault (the device was reset and works
    /// again; frames in flight were lost and their tokens returned). Callers count and log
    /// it and go on; any other error from the data path means the device is unusable.
    pub fn is_recovered(&self) -> bool {
        matches!(
            self,
            DriverError::TxHang { .. } | DriverError::DeviceReset { .. }
        )
    }

    /// A recovered fault that also dropped `more` frames (two resets reported as one).
    pub(crate) fn with_more_lost(self, more: usize) -> Self {
        match self {
            DriverError::TxHang { ms, lost } => DriverError::TxHang {
                ms,
                lost: lost + more,
            },
            DriverError::DeviceReset { reason, lost } => DriverError::DeviceReset {
                reason,
                lost: lost + more,
            },
            other => other,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        DriverError::Io {
            what: what.into(),
            source,
        }
    }
}
