//! Virtio devices over VFIO: the modern PCI transport (VIRTIO 1.2 section 4.1), split
//! virtqueues (section 2.7), packed virtqueues (section 2.8) and, on top of them, the network
//! device (section 5.1).
//!
//! Section numbers in this module refer to "Virtual I/O Device (VIRTIO) Version 1.2",
//! OASIS Committee Specification 01 (2022).

pub mod multiqueue;
pub mod net;
pub mod packed;
pub mod transport;
pub mod virtqueue;

pub use net::VirtioNet;
pub use transport::{DeviceStatus, VirtioPciTransport};

/// Feature bits (VIRTIO 1.2 section 6 for the reserved range, 5.1.3 for the network device).
pub mod features {
    /// Device handles packets with partial checksum (TX checksum offload).
    pub const NET_F_CSUM: u64 = 1 << 0;
    /// Driver handles packets with partial checksum (RX).
    pub const NET_F_GUEST_CSUM: u64 = 1 << 1;
    /// Control channel offloads reconfiguration.
    pub const NET_F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
    /// Device maximum MTU reporting (`mtu` field of the configuration).
    pub const NET_F_MTU: u64 = 1 << 3;
    /// Device has given MAC address.
    pub const NET_F_MAC: u64 = 1 << 5;
    /// Driver can receive TSOv4.
    pub const NET_F_GUEST_TSO4: u64 = 1 << 7;
    /// Driver can receive TSOv6.
    pub const NET_F_GUEST_TSO6: u64 = 1 << 8;
    /// Driver can receive TSO with ECN.
    pub const NET_F_GUEST_ECN: u64 = 1 << 9;
    /// Driver can receive UFO.
    pub const NET_F_GUEST_UFO: u64 = 1 << 10;
    /// Device can receive TSOv4.
    pub const NET_F_HOST_TSO4: u64 = 1 << 11;
    /// Device can receive TSOv6.
    pub const NET_F_HOST_TSO6: u64 = 1 << 12;
    /// Device can receive TSO with ECN.
    pub const NET_F_HOST_ECN: u64 = 1 << 13;
    /// Device can receive UFO.
    pub const NET_F_HOST_UFO: u64 = 1 << 14;
    /// Driver can merge receive buffers.
    pub const NET_F_MRG_RXBUF: u64 = 1 << 15;
    /// Configuration status field is available.
    pub const NET_F_STATUS: u64 = 1 << 16;
    /// Control channel is available.
    pub const NET_F_CTRL_VQ: u64 = 1 << 17;
    /// Control channel RX mode support.
    pub const NET_F_CTRL_RX: u64 = 1 << 18;
    /// Control channel VLAN filtering.
    pub const NET_F_CTRL_VLAN: u64 = 1 << 19;
    /// Extra RX mode control support.
    pub const NET_F_CTRL_RX_EXTRA: u64 = 1 << 20;
    /// Driver can send gratuitous packets.
    pub const NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;
    /// Device supports multiqueue with automatic receive steering.
    pub const NET_F_MQ: u64 = 1 << 22;
    /// Set MAC address through the control channel.
    pub const NET_F_CTRL_MAC_ADDR: u64 = 1 << 23;
    /// Device can report a per-packet hash value and type.
    pub const NET_F_HASH_REPORT: u64 = 1 << 57;
    /// Device supports RSS (Toeplitz hash, configurable key and indirection table) for
    /// receive steering (section 5.1.6.5.7).
    pub const NET_F_RSS: u64 = 1 << 60;
    /// Indirect descriptors (section 2.7.5.3).
    pub const F_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression (section 2.7.7, 2.7.10).
    pub const F_EVENT_IDX: u64 = 1 << 29;
    /// Compliance with VIRTIO 1.x (no legacy interface).
    pub const F_VERSION_1: u64 = 1 << 32;
    /// The device is behind an IOMMU: it uses IOVAs, not physical addresses.
    pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
    /// Packed virtqueue layout.
    pub const F_RING_PACKED: u64 = 1 << 34;
    /// Buffers are used in the order they were made available.
    pub const F_IN_ORDER: u64 = 1 << 35;
    /// Platform-specific memory ordering (weak barriers are not enough).
    pub const F_ORDER_PLATFORM: u64 = 1 << 36;
    /// Single root I/O virtualization.
    pub const F_SR_IOV: u64 = 1 << 37;
    /// Driver passes extra data in notifications.
    pub const F_NOTIFICATION_DATA: u64 = 1 << 38;
    /// Individual virtqueue reset.
    pub const F_RING_RESET: u64 = 1 << 40;
    /// Device reports the link speed and duplex.
    pub const NET_F_SPEED_DUPLEX: u64 = 1 << 63;

    /// Names for logging what was offered and taken; unknown bits as `bitN`.
    pub fn names(bits: u64) -> Vec<String> {
        const ALL: &[(u64, &str)] = &[
            (NET_F_CSUM, "CSUM"),
            (NET_F_GUEST_CSUM, "GUEST_CSUM"),
            (NET_F_CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS"),
            (NET_F_MTU, "MTU"),
            (NET_F_MAC, "MAC"),
            (NET_F_GUEST_TSO4, "GUEST_TSO4"),
            (NET_F_GUEST_TSO6, "GUEST_TSO6"),
            (NET_F_GUEST_ECN, "GUEST_ECN"),
            (NET_F_GUEST_UFO, "GUEST_UFO"),
            (NET_F_HOST_TSO4, "HOST_TSO4"),
            (NET_F_HOST_TSO6, "HOST_TSO6"),
            (NET_F_HOST_ECN, "HOST_ECN"),
            (NET_F_HOST_UFO, "HOST_UFO"),
            (NET_F_MRG_RXBUF, "MRG_RXBUF"),
            (NET_F_STATUS, "STATUS"),
            (NET_F_CTRL_VQ, "CTRL_VQ"),
            (NET_F_CTRL_RX, "CTRL_RX"),
            (NET_F_CTRL_VLAN, "CTRL_VLAN"),
            (NET_F_CTRL_RX_EXTRA, "CTRL_RX_EXTRA"),
            (NET_F_GUEST_ANNOUNCE, "GUEST_ANNOUNCE"),
            (NET_F_MQ, "MQ"),
            (NET_F_CTRL_MAC_ADDR, "CTRL_MAC_ADDR"),
            (NET_F_HASH_REPORT, "HASH_REPORT"),
            (NET_F_RSS, "RSS"),
            (F_INDIRECT_DESC, "INDIRECT_DESC"),
            (F_EVENT_IDX, "EVENT_IDX"),
            (F_VERSION_1, "VERSION_1"),
            (F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
            (F_RING_PACKED, "RING_PACKED"),
            (F_IN_ORDER, "IN_ORDER"),
            (F_ORDER_PLATFORM, "ORDER_PLATFORM"),
            (F_SR_IOV, "SR_IOV"),
            (F_NOTIFICATION_DATA, "NOTIFICATION_DATA"),
            (F_RING_RESET, "RING_RESET"),
            (NET_F_SPEED_DUPLEX, "SPEED_DUPLEX"),
        ];
        (0..64)
            .map(|bit| 1u64 << bit)
            .filter(|b| bits & b != 0)
            .map(|b| match ALL.iter().find(|(f, _)| *f == b) {
                Some((_, n)) => (*n).to_string(),
                None => format!("bit{}", b.trailing_zeros()),
            })
            .collect()
    }
}
