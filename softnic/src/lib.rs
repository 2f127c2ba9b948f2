//! An in-process software NIC: the `driver::NetQueue` contract implemented in software, for
//! tests and benchmarks of the network stack without hardware.
//!
//! This crate is an emulated device: it is only ever a dev-dependency of the production
//! crates, never part of what ships.
//!
//! - [`nic`]: the NIC ([`SoftNic`]), its IOMMU ([`SoftIommu`]) and the wire ([`SoftPeer`]).
//! - [`smoltcp_peer`]: the far end of the wire as a smoltcp `phy::Device`, so that a stock
//!   smoltcp interface can be the peer of the stack under test.

#![forbid(unsafe_code)]

pub mod nic;
pub mod smoltcp_peer;

pub use nic::{
    DmaFault, DmaFaultKind, DmaTiming, Impairments, SoftIommu, SoftNic, SoftNicConfig,
    SoftNicCounters, SoftPeer, TxTap, WireCounters,
};
pub use smoltcp_peer::PeerDevice;
