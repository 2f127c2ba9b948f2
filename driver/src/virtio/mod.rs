//! Virtio devices over VFIO: the modern PCI transport (VIRTIO 1.2 section 4.1) and, on top of
//! it, the network device (section 5.1).

pub mod transport;

pub use transport::{VirtioPciTransport, DeviceStatus};

/// Feature bits (VIRTIO 1.2 section 6 and 5.1.3).
pub mod features {
    /// Device handles packets with partial checksum (TX checksum offload).
    pub const NET_F_CSUM: u64 = 1 << 0;
    /// Driver handles packets with partial checksum (RX).
    pub const NET_F_GUEST_CSUM: u64 = 1 << 1;
    /// Device has given MAC address.
    pub const NET_F_MAC: u64 = 1 << 5;
    /// Device can receive TSOv4.
    pub const NET_F_HOST_TSO4: u64 = 1 << 11;
    /// Driver can merge receive buffers.
    pub const NET_F_MRG_RXBUF: u64 = 1 << 15;
    /// Configuration status field is available.
    pub const NET_F_STATUS: u64 = 1 << 16;
    /// Compliance with VIRTIO 1.x (no legacy interface).
    pub const F_VERSION_1: u64 = 1 << 32;
    /// The device is behind an IOMMU: it uses IOVAs, not physical addresses.
    pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
    /// Packed virtqueue layout.
    pub const F_RING_PACKED: u64 = 1 << 34;

    /// Names for logging what was offered and taken.
    pub fn names(bits: u64) -> Vec<&'static str> {
        const ALL: &[(u64, &str)] = &[
            (NET_F_CSUM, "CSUM"),
            (NET_F_GUEST_CSUM, "GUEST_CSUM"),
            (NET_F_MAC, "MAC"),
            (NET_F_HOST_TSO4, "HOST_TSO4"),
            (NET_F_MRG_RXBUF, "MRG_RXBUF"),
            (NET_F_STATUS, "STATUS"),
            (F_VERSION_1, "VERSION_1"),
            (F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
            (F_RING_PACKED, "RING_PACKED"),
        ];
        ALL.iter().filter(|(b, _)| bits & b != 0).map(|(_, n)| *n).collect()
    }
}
