//! DMA memory: what the device may read or write, at which I/O virtual address.
//!
//! Memory is described with `vm-memory`: a [`GuestMemoryMmap`] whose `GuestAddress` *is the
//! IOVA*, so the code that fills a buffer and the driver that points a descriptor at it agree
//! on addresses without translation tables. A [`DmaSpace`] couples a [`DmaMapper`] (the VFIO
//! container, i.e. the IOMMU, or the software NIC's table) with an [`IovaAllocator`] that
//! knows which addresses the IOMMU can translate.
//!
//! Access is least-privilege: memory the device only reads (packet headers and payload, the
//! page cache's frames) is mapped [`DmaAccess::DeviceReads`]; only descriptor rings and
//! receive buffers are mapped [`DmaAccess::DeviceReadsWrites`]. A device write to read-only
//! memory is stopped by the IOMMU.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{DriverError, Result};
use crate::queue::Iova;

/// Smallest IOMMU page; all mappings are multiples of it.
pub const PAGE_SIZE: usize = 4096;
/// x86 huge page used for DMA arenas when the host has them reserved.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// What the device may do with a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaAccess {
    /// The device may only read (TX payload, page-cache frames).
    DeviceReads,
    /// The device may read and write (descriptor rings, RX buffers).
    DeviceReadsWrites,
}

/// Makes host memory visible to a device at an IOVA.
///
/// Mapping is safe by ownership: the mapper is handed the `vm-memory` object that owns the
/// memory and keeps a clone of its `Arc` until [`DmaMapper::unmap`], so the memory cannot be
/// freed while the device may reach it.
pub trait DmaMapper: Send + Sync {
    /// Map `iova..iova+len` of `memory` (whose `GuestAddress` is the IOVA) for the device.
    /// The range must lie in `memory`; the mapper holds `memory` until the range is unmapped.
    fn map(
        &self,
        iova: Iova,
        memory: &Arc<GuestMemoryMmap>,
        len: usize,
        access: DmaAccess,
    ) -> Result<()>;
    /// Remove a mapping made by [`DmaMapper::map`] with the same `iova` and `len`, and
    /// release the mapper's reference to its memory. On error the mapping (and the
    /// reference) stays.
    fn unmap(&self, iova: Iova, len: usize) -> Result<()>;
    /// IOVA ranges the device can use (IOMMU aperture minus reserved regions).
    fn usable_iova_ranges(&self) -> Vec<Range<Iova>>;
}

/// First-fit allocator over the usable IOVA ranges. Freed ranges are coalesced.
#[derive(Debug)]
pub struct IovaAllocator {
    free: Vec<Range<Iova>>,
}

impl IovaAllocator {
    /// `usable` are the ranges the IOMMU translates. IOVA 0 is never handed out, so a zero
    /// address in a descriptor is always a bug the IOMMU will catch.
    pub fn new(usable: Vec<Range<Iova>>) -> Self {
        let mut free: Vec<Range<Iova>> = usable
            .into_iter()
            .map(|r| r.start.max(PAGE_SIZE as u64)..r.end)
            .filter(|r| r.start < r.end)
            .collect();
        free.sort_by_key(|r| r.start);
        IovaAllocator { free }
    }

    /// Allocate `len` bytes aligned to `align` (a power of two).
    pub fn allocate(&mut self, len: u64, align: u64) -> Result<Range<Iova>> {
        debug_assert!(align.is_power_of_two());
        for i in 0..self.free.len() {
            let r = self.free[i].clone();
            let start = r.start.div_ceil(align) * align;
            let Some(end) = start.checked_add(len) else {
                continue;
            };
            if end > r.end {
                continue;
            }
            let mut pieces = Vec::with_capacity(2);
            if r.start < start {
                pieces.push(r.start..start);
            }
            if end < r.end {
                pieces.push(end..r.end);
            }
            self.free.splice(i..=i, pieces);
            return Ok(start..end);
        }
        Err(DriverError::IovaExhausted { len, align })
    }

    /// Return a range obtained from [`IovaAllocator::allocate`].
    pub fn free(&mut self, range: Range<Iova>) {
        let pos = self.free.partition_point(|r| r.start < range.start);
        self.free.insert(pos, range);
        // Coalesce neighbours so long-running servers do not fragment the space.
        let mut merged: Vec<Range<Iova>> = Vec::with_capacity(self.free.len());
        for r in self.free.drain(..) {
            match merged.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => merged.push(r),
            }
        }
        self.free = merged;
    }
}

/// A DMA mapper plus the IOVA allocator for its address space.
pub struct DmaSpace {
    mapper: Arc<dyn DmaMapper>,
    iovas: Mutex<IovaAllocator>,
    /// Live regions allocated here, by first IOVA, so a driver can read device-visible bytes
    /// by IOVA ([`DmaSpace::read_iova`]). Weak: the registry never keeps memory alive.
    regions: Mutex<BTreeMap<Iova, (usize, Weak<GuestMemoryMmap>)>>,
}

impl DmaSpace {
    pub fn new(mapper: Arc<dyn DmaMapper>) -> Arc<Self> {
        let iovas = Mutex::new(IovaAllocator::new(mapper.usable_iova_ranges()));
        Arc::new(DmaSpace {
            mapper,
            iovas,
            regions: Mutex::new(BTreeMap::new()),
        })
    }

    /// Allocate `len` bytes of memory (rounded up to pages), give it an IOVA and map it for
    /// the device with `access`. Uses 2 MiB huge pages when `len` is a multiple of 2 MiB and
    /// the host has huge pages reserved; 4 KiB pages otherwise.
    pub fn allocate(self: &Arc<Self>, len: usize, access: DmaAccess) -> Result<DmaRegion> {
        let len = len.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let (mmap, align) = allocate_host_memory(len)?;
        let iova = self
            .iovas
            .lock()
            .unwrap()
            .allocate(len as u64, align as u64)?;
        let host = mmap.as_ptr();
        let region = GuestRegionMmap::new(mmap, GuestAddress(iova.start))
            .ok_or_else(|| DriverError::Dma("region does not fit the address space".into()))?;
        let memory = Arc::new(
            GuestMemoryMmap::from_regions(vec![region])
                .map_err(|e| DriverError::Dma(format!("building guest memory: {e}")))?,
        );
        if let Err(e) = self.mapper.map(iova.start, &memory, len, access) {
            self.iovas.lock().unwrap().free(iova);
            return Err(e);
        }
        self.regions
            .lock()
            .unwrap()
            .insert(iova.start, (len, Arc::downgrade(&memory)));
        Ok(DmaRegion {
            space: Arc::clone(self),
            memory,
            host,
            iova: iova.start,
            len,
            access,
        })
    }

    /// The mapper behind this space.
    pub fn mapper(&self) -> &Arc<dyn DmaMapper> {
        &self.mapper
    }

    /// Copy `out.len()` bytes at `iova` into `out`, from a live region allocated with
    /// [`DmaSpace::allocate`]. Lets a driver inspect a few bytes the caller placed in DMA
    /// memory (e.g. the headers of a TSO frame) without the caller's `DmaRegion`.
    pub fn read_iova(&self, iova: Iova, out: &mut [u8]) -> Result<()> {
        let not_found = || {
            DriverError::InvalidArgument(format!(
                "IOVA {iova:#x}+{} is not in a live region of this DMA space",
                out.len()
            ))
        };
        let memory = {
            let regions = self.regions.lock().unwrap();
            let (&start, (len, memory)) =
                regions.range(..=iova).next_back().ok_or_else(not_found)?;
            if iova + out.len() as u64 > start + *len as u64 {
                return Err(not_found());
            }
            memory.upgrade().ok_or_else(not_found)?
        };
        memory
            .read_slice(out, GuestAddress(iova))
            .map_err(|e| DriverError::Dma(format!("reading IOVA {iova:#x}: {e}")))
    }
}

fn allocate_host_memory(len: usize) -> Result<(MmapRegion, usize)> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_POPULATE;
    if len.is_multiple_of(HUGE_PAGE_SIZE) {
        if let Ok(r) = MmapRegion::build(None, len, prot, anon | libc::MAP_HUGETLB) {
            return Ok((r, HUGE_PAGE_SIZE));
        }
    }
    let r = MmapRegion::build(None, len, prot, anon)
        .map_err(|e| DriverError::Dma(format!("mmap of {len} bytes: {e}")))?;
    Ok((r, PAGE_SIZE))
}

/// Memory mapped for the device. Unmapped from the device when dropped, before the host
/// memory itself is released.
pub struct DmaRegion {
    space: Arc<DmaSpace>,
    memory: Arc<GuestMemoryMmap>,
    host: *mut u8,
    iova: Iova,
    len: usize,
    access: DmaAccess,
}

// SAFETY: the raw pointer refers to the mmap owned by `memory` (Send + Sync); all access
// through it goes through volatile reads/writes in this module.
unsafe impl Send for DmaRegion {}
// SAFETY: as above; shared access only performs volatile operations.
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// IOVA of the first byte.
    pub fn iova(&self) -> Iova {
        self.iova
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn access(&self) -> DmaAccess {
        self.access
    }
    /// The memory as `vm-memory` sees it (`GuestAddress` = IOVA); hand this to the page
    /// cache so its frames are DMA-able.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "DMA region access {offset}+{len} out of bounds ({})",
            self.len
        );
    }

    /// Read a `T` at `offset` with a volatile load (the device may change it at any time).
    pub fn read_volatile<T: Copy>(&self, offset: usize) -> T {
        self.check(offset, std::mem::size_of::<T>());
        assert_eq!(offset % std::mem::align_of::<T>(), 0, "unaligned DMA read");
        // SAFETY: in bounds and aligned (checked above); the mapping lives as long as self;
        // a volatile read of plain-old-data is valid whatever the device wrote.
        unsafe { std::ptr::read_volatile(self.host.add(offset) as *const T) }
    }

    /// Write a `T` at `offset` with a volatile store.
    pub fn write_volatile<T: Copy>(&self, offset: usize, value: T) {
        self.check(offset, std::mem::size_of::<T>());
        assert_eq!(offset % std::mem::align_of::<T>(), 0, "unaligned DMA write");
        // SAFETY: in bounds and aligned (checked above); the mapping lives as long as self.
        unsafe { std::ptr::write_volatile(self.host.add(offset) as *mut T, value) }
    }

    /// Copy `bytes` into the region at `offset` (e.g. building a frame header).
    pub fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        self.check(offset, bytes.len());
        // SAFETY: destination in bounds (checked); source is a distinct Rust slice so the
        // ranges cannot overlap; no Rust reference to DMA memory is created.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.host.add(offset), bytes.len()) }
    }

    /// Copy bytes out of the region at `offset`.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        self.check(offset, out.len());
        // SAFETY: source in bounds (checked); `out` is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(self.host.add(offset), out.as_mut_ptr(), out.len()) }
    }

    /// Borrow `len` bytes at `offset` as a slice.
    ///
    /// # Safety
    /// The caller must ensure the device does not write these bytes while the slice lives
    /// (true for read-only mappings, and for RX buffers the device has completed and that are
    /// not yet handed back).
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        self.check(offset, len);
        // SAFETY: in bounds (checked); immutability is the caller's obligation (see above).
        unsafe { std::slice::from_raw_parts(self.host.add(offset), len) }
    }

    /// Fill with zeroes.
    pub fn zero(&self) {
        // SAFETY: the whole region is ours and in bounds.
        unsafe { std::ptr::write_bytes(self.host, 0, self.len) }
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        self.space.regions.lock().unwrap().remove(&self.iova);
        if let Err(e) = self.space.mapper.unmap(self.iova, self.len) {
            // The device may still reach this memory: leak it rather than free it under DMA.
            tracing::error!(
                "DMA unmap of {:#x}+{:#x} failed: {e}; leaking the memory",
                self.iova,
                self.len
            );
            std::mem::forget(Arc::clone(&self.memory));
            return;
        }
        self.space
            .iovas
            .lock()
            .unwrap()
            .free(self.iova..self.iova + self.len as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_respects_ranges_alignment_and_coalesces() {
        let mut a = IovaAllocator::new(vec![0..0x10_0000, 0x20_0000..0x40_0000]);
        let r1 = a.allocate(0x1000, 0x1000).unwrap();
        assert_eq!(r1, 0x1000..0x2000, "IOVA 0 is never handed out");
        let r2 = a.allocate(0x20_0000, 0x20_0000).unwrap();
        assert_eq!(r2, 0x20_0000..0x40_0000, "second range, 2 MiB aligned");
        assert!(
            a.allocate(0x10_0000, 0x1000).is_err(),
            "nothing that large is left"
        );
        a.free(r1);
        a.free(r2);
        assert_eq!(a.allocate(0x20_0000, 0x1000).unwrap(), 0x20_0000..0x40_0000);
        let all = a.allocate(0xff000, 0x1000).unwrap();
        assert_eq!(all, 0x1000..0x10_0000, "freed neighbours were coalesced");
    }
}
