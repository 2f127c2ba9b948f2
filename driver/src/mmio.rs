//! Memory-mapped device registers (a BAR mmapped through VFIO).

use crate::error::{DriverError, Result};

/// A BAR mapped into this process. Register accesses are volatile, naturally aligned and
/// bounds-checked, so a bad offset panics instead of touching memory outside the BAR.
pub struct Mmio {
    base: *mut u8,
    len: usize,
}

// SAFETY: MMIO accesses are volatile and the device serialises them; the mapping is owned by
// this value and unmapped only in Drop.
unsafe impl Send for Mmio {}
// SAFETY: as above; no Rust references into the mapping are ever created.
unsafe impl Sync for Mmio {}

impl Mmio {
    /// Map `len` bytes of `fd` at `offset` (a VFIO region offset).
    pub fn map(fd: std::os::fd::RawFd, offset: u64, len: usize) -> Result<Self> {
        // SAFETY: a fresh shared mapping chosen by the kernel (no MAP_FIXED), so no existing
        // memory is affected; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DriverError::io(
                "mmap of a BAR",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Mmio {
            base: ptr as *mut u8,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, width: usize) {
        assert!(
            offset.is_multiple_of(width) && offset + width <= self.len,
            "MMIO access at {offset:#x} (width {width}) outside BAR of {:#x} bytes",
            self.len
        );
    }

    pub fn read32(&self, offset: usize) -> u32 {
        self.check(offset, 4);
        // SAFETY: aligned and inside the mapping (checked above).
        unsafe { std::ptr::read_volatile(self.base.add(offset) as *const u32) }
    }

    pub fn write32(&self, offset: usize, value: u32) {
        self.check(offset, 4);
        // SAFETY: aligned and inside the mapping (checked above).
        unsafe { std::ptr::write_volatile(self.base.add(offset) as *mut u32, value) }
    }

    pub fn read16(&self, offset: usize) -> u16 {
        self.check(offset, 2);
        // SAFETY: aligned and inside the mapping (checked above).
        unsafe { std::ptr::read_volatile(self.base.add(offset) as *const u16) }
    }

    pub fn write16(&self, offset: usize, value: u16) {
        self.check(offset, 2);
        // SAFETY: aligned and inside the mapping (checked above).
        unsafe { std::ptr::write_volatile(self.base.add(offset) as *mut u16, value) }
    }

    pub fn read8(&self, offset: usize) -> u8 {
        self.check(offset, 1);
        // SAFETY: inside the mapping (checked above).
        unsafe { std::ptr::read_volatile(self.base.add(offset)) }
    }

    pub fn write8(&self, offset: usize, value: u8) {
        self.check(offset, 1);
        // SAFETY: inside the mapping (checked above).
        unsafe { std::ptr::write_volatile(self.base.add(offset), value) }
    }

    pub fn read64(&self, offset: usize) -> u64 {
        // Two 32-bit reads: not every device accepts 64-bit MMIO accesses.
        self.read32(offset) as u64 | (self.read32(offset + 4) as u64) << 32
    }

    pub fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

impl Drop for Mmio {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `map`; no references into it exist.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}
