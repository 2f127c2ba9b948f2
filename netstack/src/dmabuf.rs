//! Fixed-size DMA buffers the device reads (frame header slots, jumbo frames, copy blocks),
//! handed out as owning guards.
//!
//! A [`DmaBuffer`] returns itself to its [`BufferPool`] when dropped, as ixy.rs does for
//! packets: whoever owns the guard owns the bytes, so a buffer can neither leak nor be
//! handed out twice. The transmit path keeps a frame's buffers inside its in-flight record
//! until the NIC returns the frame's token; a send queue keeps copy blocks inside its items
//! until they are acknowledged and no descriptor reads them. Dropping the guard earlier
//! would be a logic error the type cannot catch, so those two owners drop them only there.
//!
//! All access goes through the driver's volatile [`DmaRegion`] accessors: no Rust slice of
//! DMA memory is ever formed here. (TLS ciphertext is written through a slice, into the
//! driver's [`driver::dma::ChunkPool`] chunks, whose types keep a lent chunk away from the
//! device.)

use std::sync::{Arc, Mutex};

use driver::dma::{DmaAccess, DmaRegion, DmaSpace};
use driver::Iova;

struct PoolShared {
    region: DmaRegion,
    buffer_size: usize,
    count: usize,
    /// Indices of free buffers. Pre-sized to `count`, so returning one never allocates.
    free: Mutex<Vec<u32>>,
}

/// A pool of `count` buffers of `buffer_size` bytes in one DMA region the device may read.
/// Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct BufferPool {
    shared: Arc<PoolShared>,
}

impl BufferPool {
    /// Allocates the region in `dma`, mapped read-only for the device.
    pub fn new(dma: &Arc<DmaSpace>, count: usize, buffer_size: usize) -> driver::Result<Self> {
        let count = count.max(1);
        let region = dma.allocate(count * buffer_size, DmaAccess::DeviceReads)?;
        Ok(Self {
            shared: Arc::new(PoolShared {
                region,
                buffer_size,
                count,
                free: Mutex::new((0..count as u32).rev().collect()),
            }),
        })
    }

    /// A free buffer, if any.
    pub fn take(&self) -> Option<DmaBuffer> {
        let index = self.shared.free.lock().expect("buffer pool lock").pop()?;
        Some(DmaBuffer {
            index,
            pool: Arc::clone(&self.shared),
        })
    }

    /// Buffers not handed out now.
    pub fn free_count(&self) -> usize {
        self.shared.free.lock().expect("buffer pool lock").len()
    }

    /// Buffers in the pool.
    pub fn capacity(&self) -> usize {
        self.shared.count
    }

    /// Bytes per buffer.
    pub fn buffer_size(&self) -> usize {
        self.shared.buffer_size
    }
}

/// One buffer of a [`BufferPool`], owned: returned to the pool on drop.
pub struct DmaBuffer {
    index: u32,
    pool: Arc<PoolShared>,
}

impl std::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaBuffer({} at {:#x})", self.index, self.iova(0))
    }
}

impl DmaBuffer {
    /// Index in its pool (stable while owned: usable as a token).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Size of the buffer.
    pub fn len(&self) -> usize {
        self.pool.buffer_size
    }

    pub fn is_empty(&self) -> bool {
        self.pool.buffer_size == 0
    }

    fn base(&self) -> usize {
        self.index as usize * self.pool.buffer_size
    }

    /// Device address of byte `offset`.
    pub fn iova(&self, offset: usize) -> Iova {
        debug_assert!(offset <= self.len());
        self.pool.region.iova() + (self.base() + offset) as u64
    }

    /// Writes `bytes` at `offset`. Needs `&mut`: the owner is the only CPU writer.
    ///
    /// # Panics
    /// If the bytes do not fit the buffer.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len(), "DMA buffer overflow");
        self.pool.region.write_bytes(self.base() + offset, bytes);
    }

    /// Reads `out.len()` bytes at `offset`.
    ///
    /// # Panics
    /// If the range does not fit the buffer.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len(), "DMA buffer overread");
        self.pool.region.read_bytes(self.base() + offset, out);
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // Poisoned only if a holder panicked mid-push; the list itself is still consistent.
        let mut free = match self.pool.free.lock() {
            Ok(free) => free,
            Err(poisoned) => poisoned.into_inner(),
        };
        free.push(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driver::NetQueue;
    use softnic::{SoftNic, SoftNicConfig};

    #[test]
    fn buffers_return_on_drop_and_are_never_handed_out_twice() {
        let (nic, _peer) = SoftNic::new(SoftNicConfig::default()).unwrap();
        let pool = BufferPool::new(nic.dma(), 3, 2048).unwrap();
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        let c = pool.take().unwrap();
        assert!(pool.take().is_none(), "all three are owned");
        let mut indices = [a.index(), b.index(), c.index()];
        indices.sort();
        assert_eq!(indices, [0, 1, 2]);
        assert_eq!(
            b.iova(10) - a.iova(0),
            (b.index() as u64 * 2048 + 10) - a.index() as u64 * 2048
        );
        drop(b);
        assert_eq!(pool.free_count(), 1);
        let again = pool.take().unwrap();
        assert!(pool.take().is_none());
        drop((a, c, again));
        assert_eq!(pool.free_count(), 3);
    }

    #[test]
    fn writes_read_back_and_stay_inside_the_buffer() {
        let (nic, _peer) = SoftNic::new(SoftNicConfig::default()).unwrap();
        let pool = BufferPool::new(nic.dma(), 2, 4096).unwrap();
        let mut a = pool.take().unwrap();
        let mut b = pool.take().unwrap();
        a.write(4000, &[7; 96]);
        b.write(0, &[9; 16]);
        let mut out = [0u8; 96];
        a.read(4000, &mut out);
        assert_eq!(out, [7; 96]);
        let mut first = [0u8; 16];
        b.read(0, &mut first);
        assert_eq!(first, [9; 16], "a's write did not spill into b");
        let overflow =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.write(4090, &[0; 7])));
        assert!(overflow.is_err());
    }
}
