//! An in-process software NIC: the `driver::NetQueue` contract implemented in software, for
//! tests and benchmarks of the network stack without hardware.
//!
//! This crate is an emulated device. It is only ever a dev-dependency of the production
//! crates (as openvmm keeps its emulated devices out of what ships). Device memory is reached
//! only through the `vm-memory` objects the IOMMU model holds (safe, volatile copies), never
//! through raw pointers.
//!
//! # What it models
//! - **An IOMMU** ([`iommu`]): [`SoftIommu`] is the `DmaMapper` of the NIC's DMA space, a
//!   translation table with access rights; every device access goes through it, and a
//!   refused one is a [`DmaFault`], never undefined behaviour.
//! - **A NIC with late DMA** ([`nic`]): [`SoftNic`] reads TX frames when the device
//!   processes them (at flush, or when the test says so), not when they are enqueued.
//! - **Offloads** ([`offload`]): checksum insertion and TSO, with either TSO header
//!   convention (`driver::TsoHeaders`).
//! - **Inline TLS** ([`tls_engine`]): a kTLS-offload engine that encrypts TLS 1.3 records
//!   laid out in plaintext as it DMA-reads them, from per-frame record context.
//! - **The wire** ([`wire`]): seeded loss, duplication and reordering in each direction,
//!   the MTU enforced, and a [`SoftPeer`] at the far end.
//! - **A smoltcp peer** ([`smoltcp_peer`]): the far end as a smoltcp `phy::Device`
//!   ([`PeerDevice`]), so a stock smoltcp interface can talk to the stack under test.

#![forbid(unsafe_code)]

pub mod iommu;
pub mod nic;
pub mod offload;
pub mod smoltcp_peer;
#[cfg(test)]
mod test_frames;
pub mod tls_engine;
pub mod wire;

pub use iommu::{DmaFault, DmaFaultKind, SoftIommu};
pub use nic::{DmaTiming, SoftNic, SoftNicConfig, SoftNicCounters, TxTap};
pub use smoltcp_peer::PeerDevice;
pub use wire::{Impairments, SoftPeer, WireCounters};
