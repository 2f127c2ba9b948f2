//! The frame arena: 4 KiB page frames carved out of caller-provided, DMA-able memory.
//!
//! This is the only module of the crate that touches frame memory through raw pointers, so
//! it is the only one with `unsafe` blocks (callers invoke its `unsafe fn`s and state why the
//! frame-ownership rules documented on each function hold at their call site).
//!
//! # Ownership rules for frame bytes
//! The cache guarantees these rules; every `unsafe fn` below relies on them:
//! * A frame whose pin count is non-zero is never written (except by the test-only
//!   `InPlaceUnsafe` policy, which exists precisely to break this rule on purpose).
//! * A frame with pin count zero is only read or written while holding the lock of the file
//!   that owns it (or, for a free frame, by whoever just took it off the free list), so
//!   accesses to it are serialized.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::error::{Error, Result};

/// Size of a page frame and of a file page, in bytes.
pub const PAGE_SIZE: usize = 4096;

/// Index of a frame in the arena.
pub(crate) type FrameId = u32;

/// Host address and device address (IOVA) of one frame.
#[derive(Clone, Copy, Debug)]
struct FrameAddr {
    host: *mut u8,
    iova: u64,
}

/// Memory the cache stores its page frames in.
///
/// The memory is a vm-memory [`GuestMemoryMmap`] whose guest addresses are the device's IOVAs:
/// the driver maps [`FrameArena::memory`] into the IOMMU (read-only for the NIC) and a frame's
/// IOVA is then simply its guest address. The memory must be dedicated to the cache: nothing
/// else may write to it while the cache lives, or the stable-page guarantee is void.
pub struct FrameArena {
    memory: Arc<GuestMemoryMmap>,
    frames: Box<[FrameAddr]>,
}

// SAFETY: the raw host pointers point into mappings owned by `memory` (an `Arc` kept alive as
// long as the arena), which is itself Send + Sync. Concurrent access to the bytes behind the
// pointers is governed by the frame ownership rules in the module docs and is only possible
// through the `unsafe fn`s below, whose callers uphold those rules.
unsafe impl Send for FrameArena {}
// SAFETY: see the `Send` impl above; `&FrameArena` only hands out frame access via `unsafe fn`.
unsafe impl Sync for FrameArena {}

impl std::fmt::Debug for FrameArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameArena")
            .field("frames", &self.frames.len())
            .field("regions", &self.memory.num_regions())
            .finish()
    }
}

impl FrameArena {
    /// Builds an arena over every region of `memory`. Each region's guest address is taken as
    /// its IOVA; regions must start on a 4 KiB boundary (a trailing partial frame is unused).
    pub fn new(memory: GuestMemoryMmap) -> Result<Self> {
        Self::from_shared(Arc::new(memory))
    }

    /// Like [`FrameArena::new`], for memory that is also held elsewhere (e.g. by the driver).
    pub fn from_shared(memory: Arc<GuestMemoryMmap>) -> Result<Self> {
        let mut frames = Vec::new();
        for region in memory.iter() {
            let iova = region.start_addr().0;
            let host = region.as_ptr();
            // Frames must be page aligned both for the IOMMU and for the host mapping.
            let misaligned = (iova | host as u64) & (PAGE_SIZE as u64 - 1) != 0;
            if misaligned {
                return Err(Error::InvalidArena(format!(
                    "region at IOVA {iova:#x} is not 4 KiB aligned"
                )));
            }
            let region_frames = region.len() as usize / PAGE_SIZE;
            for i in 0..region_frames {
                frames.push(FrameAddr {
                    // In bounds of the mapping: i * PAGE_SIZE + PAGE_SIZE <= region.len().
                    host: host.wrapping_add(i * PAGE_SIZE),
                    iova: iova + (i * PAGE_SIZE) as u64,
                });
            }
        }
        if frames.is_empty() {
            return Err(Error::InvalidArena(
                "memory holds no complete 4 KiB frame".into(),
            ));
        }
        // The top bit of a frame's state word is a flag, and ids are u32.
        if frames.len() >= (1 << 31) {
            return Err(Error::InvalidArena("too many frames (max 2^31 - 1)".into()));
        }
        Ok(Self {
            memory,
            frames: frames.into_boxed_slice(),
        })
    }

    /// Builds an arena over a single mapped region.
    pub fn from_region(region: GuestRegionMmap) -> Result<Self> {
        let memory = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| Error::InvalidArena(e.to_string()))?;
        Self::new(memory)
    }

    /// Allocates `bytes` of anonymous memory placed at IOVA `iova_base` (for tests, benches
    /// and setups without a device). `bytes` is rounded down to whole frames.
    pub fn anonymous(iova_base: u64, bytes: usize) -> Result<Self> {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(iova_base), bytes)])
            .map_err(|e| Error::InvalidArena(e.to_string()))?;
        Self::new(memory)
    }

    /// The underlying memory, so the driver can map it for the device.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    /// Number of 4 KiB frames in the arena (the cache's hard memory limit).
    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }

    /// Device address of a frame.
    #[inline]
    pub(crate) fn iova(&self, frame: FrameId) -> u64 {
        self.frames[frame as usize].iova
    }

    /// The bytes of a frame.
    ///
    /// # Safety
    /// For as long as the returned slice lives, nobody may write the frame: the caller must
    /// hold a pin on it, or hold the owning file's lock with the frame unpinned.
    #[inline]
    pub(crate) unsafe fn bytes(&self, frame: FrameId) -> &[u8] {
        let addr = self.frames[frame as usize];
        // SAFETY: `addr.host` points to PAGE_SIZE mapped bytes kept alive by `self.memory`;
        // the caller guarantees no concurrent writer for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(addr.host, PAGE_SIZE) }
    }

    /// Copies `data` into a frame at byte `offset`.
    ///
    /// # Safety
    /// The caller must have exclusive access to the frame: it is unpinned and the caller holds
    /// the owning file's lock, or it was just allocated. (The test-only `InPlaceUnsafe` policy
    /// deliberately violates this for pinned frames.)
    pub(crate) unsafe fn write(&self, frame: FrameId, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= PAGE_SIZE, "write past end of frame");
        let addr = self.frames[frame as usize];
        // SAFETY: the destination range is inside the frame (asserted above) and the caller
        // guarantees exclusive access; `data` cannot overlap frame memory we hand out mutably.
        unsafe { std::ptr::copy(data.as_ptr(), addr.host.add(offset), data.len()) }
    }

    /// Zeroes a frame from byte `from` to its end.
    ///
    /// # Safety
    /// As for [`FrameArena::write`].
    pub(crate) unsafe fn zero_from(&self, frame: FrameId, from: usize) {
        assert!(from <= PAGE_SIZE);
        let addr = self.frames[frame as usize];
        // SAFETY: range inside the frame; the caller guarantees exclusive access.
        unsafe { std::ptr::write_bytes(addr.host.add(from), 0, PAGE_SIZE - from) }
    }

    /// Copies a whole frame.
    ///
    /// # Safety
    /// `src` must not be written during the copy (pinned or under the file lock), and the
    /// caller must have exclusive access to `dst` (as for [`FrameArena::write`]).
    pub(crate) unsafe fn copy_frame(&self, src: FrameId, dst: FrameId) {
        assert_ne!(src, dst);
        let s = self.frames[src as usize];
        let d = self.frames[dst as usize];
        // SAFETY: distinct frames never overlap; both are PAGE_SIZE mapped bytes.
        unsafe { std::ptr::copy_nonoverlapping(s.host, d.host, PAGE_SIZE) }
    }

    /// Reads file bytes `offset .. offset + len` into consecutive frames with `preadv`,
    /// retrying short reads, and stops early at end of file. Returns the bytes read.
    ///
    /// # Safety
    /// The caller must have exclusive access to every frame in `frames` (as for
    /// [`FrameArena::write`]), and `len <= frames.len() * PAGE_SIZE`.
    pub(crate) unsafe fn read_from_file(
        &self,
        fd: RawFd,
        frames: &[FrameId],
        offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        // SAFETY: the caller has exclusive access to `frames` (so the kernel may write them)
        // and `len` fits in them.
        unsafe { self.transfer(libc::preadv, fd, frames, offset, len) }
    }

    /// Writes the first `len` bytes of consecutive frames to the file at `offset` with
    /// `pwritev`, retrying short writes.
    ///
    /// # Safety
    /// No frame in `frames` may be written during the call (they are pinned, or the caller
    /// holds the owning file's lock), and `len <= frames.len() * PAGE_SIZE`.
    pub(crate) unsafe fn write_to_file(
        &self,
        fd: RawFd,
        frames: &[FrameId],
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        // SAFETY: nobody writes `frames` during the call (the kernel only reads them) and
        // `len` fits in them.
        let done = unsafe { self.transfer(libc::pwritev, fd, frames, offset, len) }?;
        if done < len {
            return Err(io::ErrorKind::WriteZero.into());
        }
        Ok(())
    }

    /// Moves file bytes `offset .. offset + len` to or from consecutive frames with
    /// `vectored_io` (`preadv` or `pwritev`), retrying interrupted and short transfers,
    /// until all are moved or a call moves nothing (end of file, for a read). Returns the
    /// bytes moved.
    ///
    /// # Safety
    /// `len <= frames.len() * PAGE_SIZE`, and the frames' bytes may be accessed as
    /// `vectored_io` does: for `preadv` the caller has exclusive access to every frame; for
    /// `pwritev` nobody writes them during the call.
    unsafe fn transfer(
        &self,
        vectored_io: unsafe extern "C" fn(
            libc::c_int,
            *const libc::iovec,
            libc::c_int,
            libc::off_t,
        ) -> libc::ssize_t,
        fd: RawFd,
        frames: &[FrameId],
        offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        assert!(len <= frames.len() * PAGE_SIZE);
        let mut done = 0usize;
        while done < len {
            let iov = self.iovecs(frames, done, len);
            // SAFETY: every iovec points into a live frame's PAGE_SIZE bytes, which the
            // caller lets the kernel read or write as `vectored_io` does; the kernel
            // accesses at most the iovec lengths.
            let n = unsafe {
                vectored_io(
                    fd,
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        Ok(done)
    }

    /// I/O vectors covering bytes `from .. to` of the concatenation of `frames`, at most
    /// IOV_MAX (1024) of them.
    fn iovecs(&self, frames: &[FrameId], from: usize, to: usize) -> Vec<libc::iovec> {
        const IOV_MAX: usize = 1024;
        let mut iov = Vec::with_capacity(frames.len().min(IOV_MAX));
        let mut pos = from;
        while pos < to && iov.len() < IOV_MAX {
            let frame = self.frames[frames[pos / PAGE_SIZE] as usize];
            let in_frame = pos % PAGE_SIZE;
            let n = (PAGE_SIZE - in_frame).min(to - pos);
            iov.push(libc::iovec {
                iov_base: frame.host.wrapping_add(in_frame).cast(),
                iov_len: n,
            });
            pos += n;
        }
        iov
    }
}
