//! VFIO device access: open a PCI device bound to `vfio-pci`, reach its config space and
//! BARs, and map DMA memory through the IOMMU.
//!
//! Built on `vfio-ioctls` (container, group and device set-up). Its region helpers only log
//! failures, so config space is accessed here with checked `pread`/`pwrite` on the device fd,
//! and BARs are `mmap`ed directly. Its DMA map always grants READ|WRITE, so mappings are made
//! here with `VFIO_IOMMU_MAP_DMA` and exactly the access the memory needs.

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_iommu_type1_dma_map, vfio_iommu_type1_info, vfio_iova_range,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_CAPS,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::dma::{DmaAccess, DmaMapper, DmaMapping, DmaSpace};
use crate::error::{DriverError, Result};
use crate::irq::{DeviceIrq, IrqMode};
use crate::mmio::Mmio;
use crate::pci::{self, PciAddress};
use crate::queue::Iova;

// VFIO ioctls are `_IO(VFIO_TYPE, VFIO_BASE + n)` (linux/vfio.h): no size or direction bits.
const VFIO_TYPE: u64 = 59;
const VFIO_BASE: u64 = 100;
const VFIO_IOMMU_GET_INFO: u64 = (VFIO_TYPE << 8) | (VFIO_BASE + 12);
const VFIO_IOMMU_MAP_DMA: u64 = (VFIO_TYPE << 8) | (VFIO_BASE + 13);

/// Address width assumed when the kernel reports no IOVA ranges: the smallest VT-d
/// implementations (and QEMU's default vIOMMU) translate 39 bits.
const FALLBACK_IOVA_BITS: u32 = 39;

/// A PCI device opened through VFIO.
pub struct VfioPci {
    address: PciAddress,
    ids: (u16, u16),
    /// Shared with the DMA mapper: dropping the device takes its group out of the container,
    /// after which the IOMMU refuses every unmap, so it must outlive the last mapping (the
    /// page cache's memory may be dropped after the NIC).
    device: Arc<VfioDevice>,
    dma: Arc<DmaSpace>,
}

impl VfioPci {
    /// Open the device at `address`, checking every precondition with an error that names
    /// its fix: the device exists, an IOMMU translates for it, it is bound to `vfio-pci`, its
    /// IOMMU group is viable, and `/dev/vfio/vfio` is usable.
    pub fn open(address: &PciAddress) -> Result<Self> {
        if !address.exists() {
            return Err(DriverError::DeviceNotFound(address.to_string()));
        }
        let ids = address.ids()?;
        let group = address.iommu_group().ok_or_else(|| DriverError::NoIommu {
            device: address.to_string(),
        })?;
        let driver = address.driver();
        if driver.as_deref() != Some("vfio-pci") {
            return Err(DriverError::NotBoundToVfio {
                device: address.to_string(),
                driver,
            });
        }
        for other in pci::iommu_group_devices(group)? {
            let driver = other.driver();
            if other != *address && !pci::driver_allows_vfio_group(driver.as_deref()) {
                return Err(DriverError::GroupNotViable {
                    group,
                    other: other.to_string(),
                    driver,
                });
            }
        }
        let group_path = format!("/dev/vfio/{group}");
        for path in ["/dev/vfio/vfio", group_path.as_str()] {
            if let Err(source) = std::fs::metadata(path) {
                return Err(DriverError::VfioUnavailable {
                    path: path.into(),
                    source,
                });
            }
        }

        let container = Arc::new(VfioContainer::new(None).map_err(|e| DriverError::Vfio {
            what: "opening the VFIO container",
            detail: e.to_string(),
        })?);
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = Arc::new(
            VfioDevice::new(&address.sysfs_path(), ops, false).map_err(|e| DriverError::Vfio {
                what: "opening the VFIO device",
                detail: e.to_string(),
            })?,
        );
        let usable = usable_iova_ranges(container.as_raw_fd(), group)?;
        tracing::debug!(device = %address, ?usable, "VFIO device opened");
        let dma = DmaSpace::new(Arc::new(VfioDmaMapper {
            _device: Arc::clone(&device),
            container,
            usable,
            mapped: Mutex::new(BTreeMap::new()),
        }));
        Ok(VfioPci {
            address: address.clone(),
            ids,
            device,
            dma,
        })
    }

    pub fn address(&self) -> &PciAddress {
        &self.address
    }

    /// (vendor, device) ids.
    pub fn ids(&self) -> (u16, u16) {
        self.ids
    }

    /// The device's DMA address space (IOMMU domain) and IOVA allocator.
    pub fn dma(&self) -> &Arc<DmaSpace> {
        &self.dma
    }

    fn config_offset(&self) -> u64 {
        self.device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX)
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.config_offset() + offset;
        // SAFETY: reads into a valid, exclusively borrowed buffer of the given length.
        let n = unsafe {
            libc::pread(
                self.fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                at as i64,
            )
        };
        if n != buf.len() as isize {
            return Err(DriverError::io(
                format!("config space read at {offset:#x}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn config_write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let at = self.config_offset() + offset;
        // SAFETY: writes from a valid buffer of the given length.
        let n = unsafe {
            libc::pwrite(
                self.fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                at as i64,
            )
        };
        if n != buf.len() as isize {
            return Err(DriverError::io(
                format!("config space write at {offset:#x}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    pub fn config_read_u8(&self, offset: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.config_read(offset, &mut b)?;
        Ok(b[0])
    }

    pub fn config_read_u16(&self, offset: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn config_read_u32(&self, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn config_write_u16(&self, offset: u64, value: u16) -> Result<()> {
        self.config_write(offset, &value.to_le_bytes())
    }

    /// Let the device respond to BAR accesses and do DMA; legacy interrupts off (we poll, or
    /// use MSI/MSI-X; [`VfioPci::enable_interrupts`] turns INTx back on when it is used).
    /// Returns the command register as written.
    pub fn enable_bus_master(&self) -> Result<u16> {
        let cmd = self.config_read_u16(pci::CONFIG_COMMAND)?;
        let new =
            cmd | pci::COMMAND_BUS_MASTER | pci::COMMAND_MEMORY_SPACE | pci::COMMAND_INTX_DISABLE;
        self.config_write_u16(pci::CONFIG_COMMAND, new)?;
        let back = self.config_read_u16(pci::CONFIG_COMMAND)?;
        if back & pci::COMMAND_BUS_MASTER == 0 {
            return Err(DriverError::Device("bus mastering did not stick".into()));
        }
        Ok(back)
    }

    /// Enable the device's interrupts through VFIO onto eventfds: the first of `modes` it
    /// has (see [`crate::irq`]), with up to `vectors` MSI-X vectors. For INTx the command
    /// register's Interrupt Disable bit (PCI Local Bus 3.0 section 6.2.2, bit 10), which
    /// [`VfioPci::enable_bus_master`] sets and vfio-pci honours by masking the line, is
    /// cleared; for MSI and MSI-X it stays set.
    pub fn enable_interrupts(&self, modes: &[IrqMode], vectors: u32) -> Result<DeviceIrq> {
        let irq = DeviceIrq::enable(&self.device, modes, vectors)?;
        if irq.mode() == IrqMode::Intx {
            let cmd = self.config_read_u16(pci::CONFIG_COMMAND)?;
            self.config_write_u16(pci::CONFIG_COMMAND, cmd & !pci::COMMAND_INTX_DISABLE)?;
        }
        Ok(irq)
    }

    /// Walk the PCI capability list: (capability id, config offset) pairs.
    pub fn capabilities(&self) -> Result<Vec<(u8, u8)>> {
        let mut out = Vec::new();
        if self.config_read_u16(pci::CONFIG_STATUS)? & pci::STATUS_CAPABILITIES_LIST == 0 {
            return Ok(out);
        }
        let mut ptr = self.config_read_u8(pci::CONFIG_CAPABILITIES_POINTER)? & 0xfc;
        // A list longer than config space can hold is corrupt; stop instead of looping.
        while ptr != 0 && out.len() < 48 {
            let id = self.config_read_u8(ptr as u64)?;
            out.push((id, ptr));
            ptr = self.config_read_u8(ptr as u64 + 1)? & 0xfc;
        }
        Ok(out)
    }

    /// Reset the function if the device offers a reset (FLR or PM reset via VFIO).
    pub fn function_reset(&self) {
        self.device.reset();
    }

    /// Size of BAR `index` (0 if not implemented).
    pub fn bar_size(&self, index: u32) -> u64 {
        self.device.get_region_size(index)
    }

    /// Map BAR `index` (a memory BAR that VFIO allows to mmap).
    pub fn map_bar(&self, index: u32) -> Result<Mmio> {
        let size = self.device.get_region_size(index);
        if size == 0 {
            return Err(DriverError::Device(format!(
                "BAR{index} is not implemented"
            )));
        }
        if self.device.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(DriverError::Device(format!(
                "BAR{index} cannot be mmapped (an I/O port BAR, or VFIO forbids it)"
            )));
        }
        Mmio::map(
            self.fd(),
            self.device.get_region_offset(index),
            size as usize,
        )
    }

    fn fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }
}

/// DMA through the VFIO container: every mapping is an IOMMU page-table entry.
struct VfioDmaMapper {
    /// Keeps the device's group in the container while mappings exist (see [`VfioPci`]).
    _device: Arc<VfioDevice>,
    container: Arc<VfioContainer>,
    usable: Vec<Range<Iova>>,
    /// The memory behind each live mapping, by first IOVA: held until the mapping is gone,
    /// so the host pages the IOMMU points at cannot be unmapped from this process first.
    mapped: Mutex<BTreeMap<Iova, Arc<GuestMemoryMmap>>>,
}

/// The host address of `iova..iova+len` in `memory`, which must be one region (one
/// contiguous host mapping, as `VFIO_IOMMU_MAP_DMA` takes).
fn host_range(memory: &GuestMemoryMmap, iova: Iova, len: usize) -> Result<*mut u8> {
    let bad = || {
        DriverError::Dma(format!(
            "{iova:#x}+{len:#x} is not one region of the memory"
        ))
    };
    let region = memory.find_region(GuestAddress(iova)).ok_or_else(bad)?;
    let end = iova.checked_add(len as u64).ok_or_else(bad)?;
    if len == 0 || end > region.start_addr().0 + region.len() {
        return Err(bad());
    }
    memory
        .get_host_address(GuestAddress(iova))
        .map_err(|e| DriverError::Dma(format!("host address of IOVA {iova:#x}: {e}")))
}

impl DmaMapper for VfioDmaMapper {
    fn map(&self, mapping: DmaMapping, memory: &Arc<GuestMemoryMmap>) -> Result<()> {
        let DmaMapping { iova, len, access } = mapping;
        let host = host_range(memory, iova, len)?;
        let flags = match access {
            DmaAccess::DeviceReads => VFIO_DMA_MAP_FLAG_READ,
            DmaAccess::DeviceReadsWrites => VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        };
        let request = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr: host as u64,
            iova,
            size: len as u64,
        };
        // Held across the ioctl: orders this map against an unmap of the same IOVA.
        let mut mapped = self.mapped.lock().unwrap();
        // SAFETY: the ioctl reads a fully initialised request. `host..host+len` lies in one
        // mmap of `memory` (checked by `host_range`), and the Arc of `memory` stored in
        // `mapped` below keeps that mmap alive until `unmap` has removed the IOMMU entry, so
        // the device never reaches pages this process has released.
        let rc = unsafe {
            libc::ioctl(
                self.container.as_raw_fd(),
                VFIO_IOMMU_MAP_DMA as _,
                &request,
            )
        };
        if rc != 0 {
            return Err(DriverError::io(
                format!("VFIO_IOMMU_MAP_DMA of {len:#x} bytes at IOVA {iova:#x} ({access:?})"),
                std::io::Error::last_os_error(),
            ));
        }
        mapped.insert(iova, Arc::clone(memory));
        Ok(())
    }

    fn unmap(&self, iova: Iova, len: usize) -> Result<()> {
        let mut mapped = self.mapped.lock().unwrap();
        self.container
            .vfio_dma_unmap(iova, len)
            .map_err(|e| DriverError::Vfio {
                what: "VFIO_IOMMU_UNMAP_DMA",
                detail: e.to_string(),
            })?;
        // The IOMMU entry is gone: the memory may go too.
        mapped.remove(&iova);
        Ok(())
    }

    fn usable_iova_ranges(&self) -> Vec<Range<Iova>> {
        self.usable.clone()
    }
}

/// Usable IOVA ranges from the container's `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE` capability
/// (aperture minus reserved regions such as the MSI window). Older kernels lack the
/// capability; then the group's `reserved_regions` are subtracted from a 39-bit space.
fn usable_iova_ranges(container_fd: RawFd, group: u32) -> Result<Vec<Range<Iova>>> {
    if let Some(ranges) = iova_ranges_from_container(container_fd)? {
        return Ok(ranges);
    }
    let reserved =
        std::fs::read_to_string(format!("/sys/kernel/iommu_groups/{group}/reserved_regions"))
            .unwrap_or_default();
    let whole_space: Range<Iova> = 0..(1u64 << FALLBACK_IOVA_BITS);
    let mut usable = Vec::from([whole_space]);
    for line in reserved.lines() {
        let mut it = line.split_whitespace();
        let (Some(s), Some(e)) = (it.next(), it.next()) else {
            continue;
        };
        let (Ok(s), Ok(e)) = (
            u64::from_str_radix(s.trim_start_matches("0x"), 16),
            u64::from_str_radix(e.trim_start_matches("0x"), 16),
        ) else {
            continue;
        };
        usable = usable
            .into_iter()
            .flat_map(|r| [r.start..s.min(r.end), (e + 1).max(r.start)..r.end])
            .filter(|r| r.start < r.end)
            .collect();
    }
    Ok(usable)
}

fn iova_ranges_from_container(fd: RawFd) -> Result<Option<Vec<Range<Iova>>>> {
    let header = std::mem::size_of::<vfio_iommu_type1_info>();
    let mut buf = vec![0u64; header.div_ceil(8)];
    let mut argsz = header as u32;
    // Two rounds: the kernel reports the size it needs in argsz on the first.
    for _ in 0..2 {
        buf = vec![0u64; (argsz as usize).div_ceil(8)];
        let info = vfio_iommu_type1_info {
            argsz,
            ..Default::default()
        };
        // SAFETY: buf is at least size_of::<vfio_iommu_type1_info>() bytes and 8-aligned.
        unsafe { std::ptr::write(buf.as_mut_ptr() as *mut vfio_iommu_type1_info, info) };
        // SAFETY: the kernel writes at most argsz bytes, which buf holds.
        let rc = unsafe { libc::ioctl(fd, VFIO_IOMMU_GET_INFO as _, buf.as_mut_ptr()) };
        if rc != 0 {
            return Err(DriverError::io(
                "VFIO_IOMMU_GET_INFO",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: buf starts with an initialised vfio_iommu_type1_info.
        let info = unsafe { std::ptr::read(buf.as_ptr() as *const vfio_iommu_type1_info) };
        if info.argsz <= argsz {
            break;
        }
        argsz = info.argsz;
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let read_u32 = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    let read_u64 = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
    };
    let flags = read_u32(4).unwrap_or(0);
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Ok(None);
    }
    let mut cap = read_u32(16).unwrap_or(0) as usize;
    let hdr = std::mem::size_of::<vfio_info_cap_header>();
    let range_size = std::mem::size_of::<vfio_iova_range>();
    while cap != 0 && cap + hdr <= bytes.len() {
        let id = u16::from_ne_bytes([bytes[cap], bytes[cap + 1]]) as u32;
        let next = read_u32(cap + 4).unwrap_or(0) as usize;
        if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let n = read_u32(cap + hdr).unwrap_or(0) as usize;
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let o = cap + hdr + 8 + i * range_size;
                let (Some(start), Some(end)) = (read_u64(o), read_u64(o + 8)) else {
                    break;
                };
                // The kernel's ranges are inclusive.
                out.push(start..end.saturating_add(1));
            }
            return Ok(Some(out));
        }
        cap = next;
    }
    Ok(None)
}

/// True when `path` looks like a VFIO-capable system (for `zerosend probe`).
pub fn vfio_available() -> bool {
    Path::new("/dev/vfio/vfio").exists()
}
