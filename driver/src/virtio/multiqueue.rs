//! virtio-net with `VIRTIO_NET_F_MQ` and RSS (see [`crate::multiqueue`]).
//!
//! Placeholder until the multi-queue driver lands: opening refuses with a clear error.

use crate::anynic::NicConfig;
use crate::error::{DriverError, Result};
use crate::multiqueue::QueuePair;
use crate::vfio::VfioPci;

/// Opens the device with up to `pairs` queue pairs and RSS.
pub fn open_queues(
    _pci: VfioPci,
    _config: &NicConfig,
    _pairs: usize,
) -> Result<Vec<Box<dyn QueuePair>>> {
    Err(DriverError::MissingFeature("VIRTIO_NET_F_MQ"))
}
