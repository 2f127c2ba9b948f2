//! The 82574L's two queue pairs with RSS (see [`crate::multiqueue`]).
//!
//! Placeholder until the two-queue driver lands: opening refuses with a clear error.

use crate::anynic::NicConfig;
use crate::error::{DriverError, Result};
use crate::multiqueue::QueuePair;
use crate::vfio::VfioPci;

/// Opens the device with up to `pairs` queue pairs (at most 2 on the 82574L) and RSS.
pub fn open_queues(
    _pci: VfioPci,
    _config: &NicConfig,
    _pairs: usize,
) -> Result<Vec<Box<dyn QueuePair>>> {
    Err(DriverError::MissingFeature(
        "multi-queue on the e1000 family",
    ))
}
