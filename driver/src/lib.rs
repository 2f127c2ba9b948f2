//! zerosend's device layer: VFIO device access, DMA memory and IOVA management and the NIC
//! drivers, all behind one queue API ([`queue::NetQueue`]). (The in-process software NIC
//! that tests and benchmarks use is the separate `softnic` crate, a dev-dependency only.)
//!
//! `unsafe` lives only in the modules that touch MMIO and DMA memory ([`mmio`], [`dma`]) and
//! in the VFIO ioctl wrappers ([`vfio`]; interrupts in [`irq`] go through `vfio-ioctls`' safe API).

pub mod anynic;
pub mod dma;
pub mod e1000;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod irq;
pub mod mmio;
pub mod multiqueue;
pub mod nic;
pub mod pcap;
pub mod pci;
pub mod queue;
pub mod vfio;
pub mod virtio;

pub use error::{DriverError, Result};
pub use nic::NicModel;
pub use queue::{
    Capabilities, DeviceStats, Iova, L4Checksum, L4Protocol, MacAddress, NetQueue, RxBuffer,
    TlsCipher, TlsKey, TlsKeyId, TlsRecordSlice, TlsTxCapability, Tso, TsoHeaders, TxFrame,
    TxOffload, TxSegment, TxToken,
};
