//! `DmaSpace` over the software IOMMU: what a driver can read back by IOVA, and that mapped
//! memory is held by the mapper until it is unmapped.
//!
//! (An integration test rather than a unit test: the software IOMMU lives in the `softnic`
//! crate, which implements the `driver` crate's `DmaMapper` as other crates see it.)

use std::sync::Arc;

use driver::dma::{DmaAccess, DmaSpace};
use softnic::SoftIommu;

#[test]
fn read_iova_reads_only_live_regions() {
    let dma = DmaSpace::new(SoftIommu::new());
    let region = dma.allocate(4096, DmaAccess::DeviceReads).unwrap();
    region.write_bytes(100, b"headers");
    let mut out = [0u8; 7];
    dma.read_iova(region.iova() + 100, &mut out).unwrap();
    assert_eq!(&out, b"headers");
    let mut past_end = [0u8; 8];
    assert!(dma.read_iova(region.iova() + 4090, &mut past_end).is_err());
    let iova = region.iova();
    drop(region);
    assert!(dma.read_iova(iova + 100, &mut out).is_err(), "freed region");
}

#[test]
fn the_mapper_holds_the_memory_from_map_to_unmap() {
    let iommu = SoftIommu::new();
    let dma = DmaSpace::new(iommu.clone());
    let region = dma.allocate(4096, DmaAccess::DeviceReadsWrites).unwrap();
    let memory = Arc::downgrade(region.memory());
    assert_eq!(memory.strong_count(), 2, "the region's and the IOMMU's");
    assert_eq!(iommu.mapping_count(), 1);
    drop(region);
    assert_eq!(iommu.mapping_count(), 0);
    assert!(memory.upgrade().is_none(), "freed once unmapped");
}
