//! **An IOMMU.** [`SoftIommu`] is the [`DmaMapper`] of the software NIC's [`DmaSpace`]: a
//! table of `IOVA -> memory` mappings with access rights. Every "DMA" of the device goes
//! through it, exactly like a device behind VT-d: an unmapped IOVA, or a write to a
//! [`DmaAccess::DeviceReads`] mapping, is a [`DmaFault`] (the NIC counts and logs it and
//! drops the frame), never undefined behaviour.
//!
//! A mapping holds the `vm-memory` object that owns its memory (an `Arc`) until it is
//! unmapped, so the memory cannot go away while the device may reach it; device reads and
//! writes are vm-memory's volatile copies on that memory, after the permission checks. No
//! raw pointer is involved.
//!
//! [`DmaSpace`]: driver::dma::DmaSpace

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use driver::dma::{DmaAccess, DmaMapper, DmaMapping};
use driver::{DriverError, Iova, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryResult};

/// The x86 MSI window every IOMMU group reserves; never handed out as IOVA.
const MSI_WINDOW: Range<Iova> = 0xfee0_0000..0xfef0_0000;
/// 39-bit address width, like QEMU 7.2's vIOMMU.
const IOVA_LIMIT: Iova = 1 << 39;

/// Why a device access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaFaultKind {
    /// No mapping covers the address (VT-d: "PTE Read/Write access is not set" for an
    /// absent entry).
    #[error("no mapping")]
    Unmapped,
    /// The mapping exists but is [`DmaAccess::DeviceReads`].
    #[error("write to a read-only mapping")]
    WriteToReadOnly,
}

/// A refused device access: the first byte that could not be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DMA fault at IOVA {iova:#x}: {kind}")]
pub struct DmaFault {
    pub iova: Iova,
    pub kind: DmaFaultKind,
}

#[derive(Clone, Debug)]
struct Mapping {
    /// The memory the mapping reaches (its `GuestAddress` is the IOVA), held until unmap.
    memory: Arc<GuestMemoryMmap>,
    len: usize,
    access: DmaAccess,
}

/// The software NIC's IOMMU: a translation table with access rights.
#[derive(Default)]
pub struct SoftIommu {
    /// Keyed by first IOVA.
    mappings: Mutex<BTreeMap<Iova, Mapping>>,
}

impl std::fmt::Debug for SoftIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftIommu")
            .field("mappings", &self.mapping_count())
            .finish()
    }
}

impl SoftIommu {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Number of live mappings.
    pub fn mapping_count(&self) -> usize {
        self.mappings.lock().unwrap().len()
    }

    /// Device read of `out.len()` bytes at `iova`.
    pub fn dma_read(&self, iova: Iova, out: &mut [u8]) -> std::result::Result<(), DmaFault> {
        self.access(iova, out.len(), false, |memory, at, done, n| {
            memory.read_slice(&mut out[done..done + n], GuestAddress(at))
        })
    }

    /// Device write of `data` at `iova`.
    pub fn dma_write(&self, iova: Iova, data: &[u8]) -> std::result::Result<(), DmaFault> {
        self.access(iova, data.len(), true, |memory, at, done, n| {
            memory.write_slice(&data[done..done + n], GuestAddress(at))
        })
    }

    /// Translates `iova..iova+len` piece by piece (a range may cross adjacent mappings, as
    /// page-granular IOMMU translation allows) and calls `copy(memory, at, done, n)` for each
    /// piece: `n` bytes at IOVA `at` of `memory`, `done` bytes into the access.
    fn access(
        &self,
        iova: Iova,
        len: usize,
        write: bool,
        mut copy: impl FnMut(&GuestMemoryMmap, Iova, usize, usize) -> GuestMemoryResult<()>,
    ) -> std::result::Result<(), DmaFault> {
        let table = self.mappings.lock().unwrap();
        // Pass 1 checks the whole range, so a faulting access has no partial effect;
        // pass 2 (same lock held, same answers) performs it.
        for perform in [false, true] {
            let mut done = 0usize;
            while done < len {
                let at = iova + done as u64;
                let fault = |kind| DmaFault { iova: at, kind };
                let (&start, m) = table
                    .range(..=at)
                    .next_back()
                    .ok_or(fault(DmaFaultKind::Unmapped))?;
                let offset = (at - start) as usize;
                if offset >= m.len {
                    return Err(fault(DmaFaultKind::Unmapped));
                }
                if write && m.access == DmaAccess::DeviceReads {
                    return Err(fault(DmaFaultKind::WriteToReadOnly));
                }
                let n = (m.len - offset).min(len - done);
                if perform {
                    copy(&m.memory, at, done, n)
                        .expect("`map` checked that the mapping lies in its memory");
                }
                done += n;
            }
        }
        Ok(())
    }
}

impl DmaMapper for SoftIommu {
    fn map(&self, mapping: DmaMapping, memory: &Arc<GuestMemoryMmap>) -> Result<()> {
        let DmaMapping { iova, len, access } = mapping;
        if len == 0
            || iova
                .checked_add(len as u64)
                .is_none_or(|end| end > IOVA_LIMIT)
        {
            return Err(DriverError::Dma(format!("bad mapping {iova:#x}+{len:#x}")));
        }
        if !memory.check_range(GuestAddress(iova), len) {
            return Err(DriverError::Dma(format!(
                "mapping {iova:#x}+{len:#x} is not backed by the memory given"
            )));
        }
        let mut table = self.mappings.lock().unwrap();
        let end = iova + len as u64;
        let overlaps_before = table
            .range(..iova)
            .next_back()
            .is_some_and(|(&s, m)| s + m.len as u64 > iova);
        let overlaps_after = table.range(iova..end).next().is_some();
        if overlaps_before || overlaps_after {
            return Err(DriverError::Dma(format!(
                "mapping {iova:#x}+{len:#x} overlaps an existing one"
            )));
        }
        table.insert(
            iova,
            Mapping {
                memory: Arc::clone(memory),
                len,
                access,
            },
        );
        Ok(())
    }

    fn unmap(&self, iova: Iova, len: usize) -> Result<()> {
        let mut table = self.mappings.lock().unwrap();
        match table.get(&iova) {
            Some(m) if m.len == len => {
                table.remove(&iova);
                Ok(())
            }
            _ => Err(DriverError::Dma(format!(
                "no mapping {iova:#x}+{len:#x} to unmap"
            ))),
        }
    }

    fn usable_iova_ranges(&self) -> Vec<Range<Iova>> {
        vec![0..MSI_WINDOW.start, MSI_WINDOW.end..IOVA_LIMIT]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(iova: Iova, len: usize, access: DmaAccess) -> DmaMapping {
        DmaMapping { iova, len, access }
    }
    use driver::dma::DmaSpace;

    /// Two pages of memory at IOVA 0x1000, not yet mapped.
    fn two_pages() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x2000)]).unwrap())
    }

    #[test]
    fn device_write_to_read_only_mapping_faults() {
        let iommu = SoftIommu::new();
        let dma = DmaSpace::new(iommu.clone());
        let region = dma.allocate(4096, DmaAccess::DeviceReads).unwrap();
        region.write_bytes(0, &[1, 2, 3]);
        let fault = iommu.dma_write(region.iova(), &[9, 9, 9]).unwrap_err();
        assert_eq!(fault.kind, DmaFaultKind::WriteToReadOnly);
        let mut back = [0u8; 3];
        region.read_bytes(0, &mut back);
        assert_eq!(back, [1, 2, 3], "memory unchanged");
        let rw = dma.allocate(4096, DmaAccess::DeviceReadsWrites).unwrap();
        iommu.dma_write(rw.iova(), &[9, 9, 9]).unwrap();
        rw.read_bytes(0, &mut back);
        assert_eq!(back, [9, 9, 9]);
    }

    #[test]
    fn an_access_may_span_adjacent_mappings_and_a_fault_has_no_partial_effect() {
        let iommu = SoftIommu::new();
        let memory = two_pages();
        iommu
            .map(
                mapping(0x1000, 0x1000, DmaAccess::DeviceReadsWrites),
                &memory,
            )
            .unwrap();
        iommu
            .map(mapping(0x2000, 0x1000, DmaAccess::DeviceReads), &memory)
            .unwrap();
        memory.write_slice(&[7; 32], GuestAddress(0x1ff0)).unwrap();
        let mut out = [0u8; 32];
        iommu.dma_read(0x1ff0, &mut out).unwrap();
        assert_eq!(out, [7; 32], "read across the two mappings");
        let fault = iommu.dma_write(0x1ff0, &[1; 32]).unwrap_err();
        assert_eq!(
            fault,
            DmaFault {
                iova: 0x2000,
                kind: DmaFaultKind::WriteToReadOnly
            }
        );
        memory.read_slice(&mut out, GuestAddress(0x1ff0)).unwrap();
        assert_eq!(out, [7; 32], "not even the writable half was written");
        let fault = iommu.dma_read(0x2ff0, &mut out).unwrap_err();
        assert_eq!(
            fault,
            DmaFault {
                iova: 0x3000,
                kind: DmaFaultKind::Unmapped
            }
        );
    }

    #[test]
    fn map_refuses_overlaps_and_ranges_the_memory_does_not_back() {
        let iommu = SoftIommu::new();
        let memory = two_pages();
        let rw = DmaAccess::DeviceReadsWrites;
        assert!(
            iommu.map(mapping(0x1000, 0x3000, rw), &memory).is_err(),
            "too long"
        );
        assert!(
            iommu.map(mapping(0x0, 0x1000, rw), &memory).is_err(),
            "below it"
        );
        assert!(iommu.map(mapping(0x1000, 0, rw), &memory).is_err(), "empty");
        iommu.map(mapping(0x1000, 0x2000, rw), &memory).unwrap();
        assert!(
            iommu.map(mapping(0x2000, 0x1000, rw), &memory).is_err(),
            "overlap"
        );
        assert!(
            iommu.unmap(0x1000, 0x1000).is_err(),
            "not the mapped length"
        );
        iommu.unmap(0x1000, 0x2000).unwrap();
        assert_eq!(iommu.mapping_count(), 0);
    }

    #[test]
    fn a_mapping_holds_its_memory_until_unmap() {
        let iommu = SoftIommu::new();
        let memory = two_pages();
        iommu
            .map(mapping(0x1000, 0x2000, DmaAccess::DeviceReads), &memory)
            .unwrap();
        let weak = Arc::downgrade(&memory);
        drop(memory);
        let mut out = [1u8; 4];
        iommu.dma_read(0x1000, &mut out).unwrap();
        assert_eq!(out, [0; 4], "still readable: the IOMMU holds it");
        iommu.unmap(0x1000, 0x2000).unwrap();
        assert!(weak.upgrade().is_none(), "released at unmap");
    }

    #[test]
    fn the_msi_window_is_not_usable() {
        let ranges = SoftIommu::new().usable_iova_ranges();
        assert!(ranges
            .iter()
            .all(|r| r.end <= MSI_WINDOW.start || r.start >= MSI_WINDOW.end));
        assert_eq!(ranges.last().unwrap().end, IOVA_LIMIT);
    }
}
