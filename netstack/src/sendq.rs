//! A connection's send queue: what each byte of the TCP send stream really is.
//!
//! smoltcp's TCP socket only sees *placeholder* bytes (see `docs/architecture.md`); the real
//! payload of every stream offset is described here, as [`SendItem`]s in stream order:
//! either a page-cache [`Pin`] (file data, never copied) or a block of the [`CopyPool`]
//! (small `send` data, copied once into DMA memory). At the device boundary a segment's
//! sequence range is mapped to [`Piece`]s, which become the frame's payload descriptors.
//!
//! An item is released (its pin dropped, its block freed) only when TCP acknowledged all its
//! bytes **and** no descriptor that reads it is still in flight (`dma_refs == 0`).

use std::collections::VecDeque;
use std::ops::Range;

use driver::dma::DmaSpace;
use driver::Iova;
use pagecache::Pin;

use crate::dmabuf::{BufferPool, DmaBuffer};
use crate::SendId;

/// File sends are split into items of at most this many bytes, at file offsets aligned to
/// it, so pages are released progressively as the peer acknowledges them.
pub const FILE_CHUNK: u64 = 64 * 1024;
/// Size of one block of the copy pool (one page, so a block is one IOMMU page).
pub const COPY_BLOCK: usize = 4096;

/// DMA memory for small copied sends (HTTP headers and the like), in [`COPY_BLOCK`]s.
pub type CopyPool = BufferPool;

/// A pool of `blocks` copy blocks in `dma`.
pub fn copy_pool(dma: &std::sync::Arc<DmaSpace>, blocks: usize) -> driver::Result<CopyPool> {
    BufferPool::new(dma, blocks, COPY_BLOCK)
}

/// What a queued stream range holds.
pub enum Payload {
    /// File bytes `file_offset .. file_offset + len` of a pin.
    File { pin: Pin, file_offset: u64 },
    /// Bytes `0 .. len` of a copy-pool block (owned: back to the pool when the item goes).
    Block { block: DmaBuffer },
}

/// One run of the send stream.
pub struct SendItem {
    /// Stream offset of the first byte (0 = first byte after the SYN).
    pub start: u64,
    pub len: u32,
    pub payload: Payload,
    /// In-flight descriptors that read this item.
    pub dma_refs: u32,
}

impl SendItem {
    pub fn end(&self) -> u64 {
        self.start + self.len as u64
    }

    /// The item's last byte (`len > 0`).
    fn last_byte(&self) -> u8 {
        let mut byte = [0u8];
        match &self.payload {
            Payload::File { pin, file_offset } => {
                let at = file_offset + self.len as u64 - 1;
                if let Some(span) = pin.spans(at..at + 1).next() {
                    byte[0] = span.bytes[0];
                }
            }
            Payload::Block { block } => block.read(self.len as usize - 1, &mut byte),
        }
        byte[0]
    }
}

/// A contiguous piece of a segment's payload: device address and the same bytes for the CPU.
#[derive(Clone, Copy, Debug)]
pub struct Piece<'a> {
    pub iova: Iova,
    pub len: usize,
    pub bytes: PieceBytes<'a>,
}

/// Where the CPU finds a piece's bytes.
#[derive(Clone, Copy, Debug)]
pub enum PieceBytes<'a> {
    /// Pinned page-cache bytes (immutable while pinned).
    File(&'a [u8]),
    /// Bytes of a copy block, from `offset`; DMA memory, so read with volatile copies.
    Block { block: &'a DmaBuffer, offset: usize },
}

impl Piece<'_> {
    /// Whether the piece is file data (from a pin).
    pub fn is_file(&self) -> bool {
        matches!(self.bytes, PieceBytes::File(_))
    }

    /// Calls `f` with the piece's bytes (copy-block bytes are copied out to the stack first:
    /// at most one block, and only on the software-checksum and linearize paths).
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self.bytes {
            PieceBytes::File(bytes) => f(bytes),
            PieceBytes::Block { block, offset } => {
                let mut copy = [0u8; COPY_BLOCK];
                block.read(offset, &mut copy[..self.len]);
                f(&copy[..self.len])
            }
        }
    }
}

/// How the connection transmits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendMode {
    /// smoltcp's ring holds placeholders; payload comes from [`SendItem`]s at the device
    /// boundary.
    ZeroCopy,
    /// Baseline: bytes are copied into smoltcp's ring (and by smoltcp into the frame), as
    /// with a stock smoltcp socket.
    Copying,
}

/// Why a send finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// The peer acknowledged every byte and the NIC finished reading them.
    Acknowledged,
    /// The connection was reset or aborted first; the stack no longer references the pages.
    Aborted,
}

/// The stream range asked for is not (or no longer) queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmapped;

/// The send queue of one connection. Offsets are stream offsets (u64, never wrap).
pub struct SendQueue {
    pub mode: SendMode,
    items: VecDeque<SendItem>,
    /// End of everything queued.
    pub queued_end: u64,
    /// Bytes handed to smoltcp's socket (placeholders or copies).
    pub fed: u64,
    /// Bytes the peer acknowledged (as far as the stack has seen).
    pub acked: u64,
    /// Highest stream offset transmitted so far (for retransmission accounting).
    pub sent_max: u64,
    /// End and last byte of the item released last (what a keep-alive probe carries once
    /// the items holding the acknowledged bytes are gone).
    last_released: Option<(u64, u8)>,
    /// Copy blocks held now, and the most this queue may hold.
    blocks_held: usize,
    max_blocks: usize,
    /// Pending completions: (stream end of the send, its id).
    completions: VecDeque<(u64, SendId)>,
    aborted: bool,
}

impl SendQueue {
    /// A queue that may hold at most `max_blocks` copy blocks at once.
    pub fn new(mode: SendMode, max_blocks: usize) -> Self {
        Self {
            mode,
            items: VecDeque::new(),
            queued_end: 0,
            fed: 0,
            acked: 0,
            sent_max: 0,
            last_released: None,
            blocks_held: 0,
            max_blocks,
            completions: VecDeque::new(),
            aborted: false,
        }
    }

    /// The last acknowledged stream byte: the one a keep-alive probe carries (RFC 9293
    /// section 3.8.4). `None` before any byte was acknowledged.
    pub fn keepalive_byte(&self) -> Option<u8> {
        let at = self.acked.checked_sub(1)?;
        let mut byte = None;
        if self
            .for_each_piece(at..at + 1, |p| p.with_bytes(|b| byte = b.first().copied()))
            .is_ok()
        {
            return byte;
        }
        match self.last_released {
            Some((end, last)) if end == self.acked => Some(last),
            _ => None,
        }
    }

    /// Copy blocks this queue holds now.
    pub fn blocks_held(&self) -> usize {
        self.blocks_held
    }

    /// Queues `range` (file offsets, inside `pin`) as page-cache items. The caller's pin is
    /// consumed; the queue keeps per-chunk sub-pins.
    pub fn push_file(&mut self, pin: &Pin, range: Range<u64>, id: SendId) {
        let mut at = range.start;
        while at < range.end {
            let chunk_end = ((at / FILE_CHUNK + 1) * FILE_CHUNK).min(range.end);
            let len = (chunk_end - at) as u32;
            self.items.push_back(SendItem {
                start: self.queued_end,
                len,
                payload: Payload::File {
                    pin: pin.sub_pin(at..chunk_end),
                    file_offset: at,
                },
                dma_refs: 0,
            });
            self.queued_end += len as u64;
            at = chunk_end;
        }
        self.completions.push_back((self.queued_end, id));
    }

    /// Copies as much of `data` as the pool (and this queue's share of it) has room for;
    /// returns how many bytes.
    pub fn push_copy(&mut self, data: &[u8], pool: &CopyPool) -> usize {
        let mut done = 0;
        // Fill the tail block first, so many small sends share one block and one descriptor.
        // Appending writes only bytes past everything queued in it, never bytes a descriptor
        // may be reading.
        if let Some(tail) = self.items.back_mut() {
            if let Payload::Block { block } = &mut tail.payload {
                let room = COPY_BLOCK - tail.len as usize;
                let n = room.min(data.len());
                if n > 0 {
                    block.write(tail.len as usize, &data[..n]);
                    tail.len += n as u32;
                    self.queued_end += n as u64;
                    done = n;
                }
            }
        }
        while done < data.len() && self.blocks_held < self.max_blocks {
            let Some(mut block) = pool.take() else { break };
            self.blocks_held += 1;
            let n = COPY_BLOCK.min(data.len() - done);
            block.write(0, &data[done..done + n]);
            self.items.push_back(SendItem {
                start: self.queued_end,
                len: n as u32,
                payload: Payload::Block { block },
                dma_refs: 0,
            });
            self.queued_end += n as u64;
            done += n;
        }
        done
    }

    /// Bytes queued but not yet handed to smoltcp.
    pub fn unfed(&self) -> u64 {
        self.queued_end - self.fed
    }

    /// Bytes queued and not yet acknowledged.
    pub fn unacked(&self) -> u64 {
        self.queued_end - self.acked
    }

    /// Number of items (pins or blocks) held.
    pub fn item_count(&self) -> usize {
        self.items.len()
    }

    /// Number of page-cache pins held.
    pub fn pins_held(&self) -> usize {
        self.items
            .iter()
            .filter(|i| matches!(i.payload, Payload::File { .. }))
            .count()
    }

    pub fn is_idle(&self) -> bool {
        self.items.is_empty() && self.completions.is_empty()
    }

    /// Index of the first item that ends after `offset`.
    fn first_index(&self, offset: u64) -> usize {
        // Segments almost always lie within the first few items (the unacknowledged
        // window); scan those before falling back to a binary search of the whole queue.
        for (i, item) in self.items.iter().take(8).enumerate() {
            if item.end() > offset {
                return i;
            }
        }
        self.items.partition_point(|i| i.end() <= offset)
    }

    /// Calls `f` for each piece of `range`, in order (at most one page each; the device
    /// boundary merges pieces contiguous in IOVA space). Fails if any byte is not queued.
    pub fn for_each_piece<'a>(
        &'a self,
        range: Range<u64>,
        mut f: impl FnMut(Piece<'a>),
    ) -> Result<(), Unmapped> {
        if range.is_empty() {
            return Ok(());
        }
        let first = self.first_index(range.start);
        let Some(front) = self.items.get(first) else {
            return Err(Unmapped);
        };
        if front.start > range.start || range.end > self.queued_end {
            return Err(Unmapped);
        }
        let mut at = range.start;
        for item in self.items.range(first..) {
            if at >= range.end {
                break;
            }
            let from = (at - item.start) as usize;
            let to = ((range.end.min(item.end())) - item.start) as usize;
            match &item.payload {
                Payload::File { pin, file_offset } => {
                    let file = *file_offset + from as u64..*file_offset + to as u64;
                    for span in pin.spans(file) {
                        f(Piece {
                            iova: span.iova,
                            len: span.bytes.len(),
                            bytes: PieceBytes::File(span.bytes),
                        });
                    }
                }
                Payload::Block { block } => f(Piece {
                    iova: block.iova(from),
                    len: to - from,
                    bytes: PieceBytes::Block {
                        block,
                        offset: from,
                    },
                }),
            }
            at = item.start + to as u64;
        }
        Ok(())
    }

    /// Adds `delta` (+1 / -1) to the DMA reference count of every item overlapping `range`.
    pub fn add_dma_refs(&mut self, range: Range<u64>, delta: i32) {
        if range.is_empty() {
            return;
        }
        let first = self.first_index(range.start);
        for item in self.items.range_mut(first..) {
            if item.start >= range.end {
                break;
            }
            item.dma_refs = item
                .dma_refs
                .checked_add_signed(delta)
                .expect("DMA reference count");
        }
    }

    /// Releases items that are done and reports finished sends through `complete`.
    /// Returns the number of items released.
    pub fn release(&mut self, mut complete: impl FnMut(SendId, SendOutcome)) -> usize {
        let mut released = 0;
        if self.aborted {
            // Nothing will be sent or acknowledged any more: release every item no
            // descriptor reads, wherever it is in the queue.
            self.items.retain(|item| {
                if item.dma_refs > 0 {
                    return true;
                }
                if matches!(item.payload, Payload::Block { .. }) {
                    self.blocks_held -= 1;
                }
                released += 1;
                false
            });
        }
        while let Some(front) = self.items.front() {
            let done = match self.mode {
                SendMode::ZeroCopy => front.end() <= self.acked && front.dma_refs == 0,
                // Copying: the bytes live in smoltcp's ring once fed.
                SendMode::Copying => front.end() <= self.fed,
            };
            if !done {
                break;
            }
            // Dropping the item drops its pin or returns its copy block.
            let item = self.items.pop_front().expect("front exists");
            if item.len > 0 {
                self.last_released = Some((item.end(), item.last_byte()));
            }
            if matches!(item.payload, Payload::Block { .. }) {
                self.blocks_held -= 1;
            }
            released += 1;
        }
        // Everything before the first remaining item is released.
        let floor = match self.mode {
            SendMode::ZeroCopy => self.items.front().map_or(self.queued_end, |i| i.start),
            SendMode::Copying => self.acked,
        };
        while let Some(&(end, id)) = self.completions.front() {
            if self.aborted && self.items.is_empty() {
                let outcome = if end <= self.acked {
                    SendOutcome::Acknowledged
                } else {
                    SendOutcome::Aborted
                };
                complete(id, outcome);
            } else if end <= floor && end <= self.acked {
                complete(id, SendOutcome::Acknowledged);
            } else {
                break;
            }
            self.completions.pop_front();
        }
        released
    }

    /// The connection is gone: nothing more will be acknowledged or transmitted. Items are
    /// released as soon as no descriptor reads them.
    pub fn abort(&mut self) {
        self.aborted = true;
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// Copies the next `max` unfed bytes into `out` (copying mode), advancing `fed`.
    /// Returns the number of bytes copied.
    pub fn copy_unfed(&mut self, out: &mut [u8]) -> usize {
        let n = (out.len() as u64).min(self.unfed()) as usize;
        let mut written = 0;
        let range = self.fed..self.fed + n as u64;
        self.for_each_piece(range, |piece| {
            piece.with_bytes(|bytes| out[written..written + bytes.len()].copy_from_slice(bytes));
            written += piece.len;
        })
        .expect("unfed bytes are queued");
        self.fed += n as u64;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driver::NetQueue;
    use pagecache::{CacheConfig, FrameArena, OpenOptions, PageCache};
    use softnic::{SoftNic, SoftNicConfig};

    struct Fixture {
        _dir: tempfile::TempDir,
        _nic: SoftNic,
        pool: CopyPool,
        data: Vec<u8>,
        pin: Pin,
    }

    fn fixture(len: usize) -> Fixture {
        let (nic, _peer) = SoftNic::new(SoftNicConfig::default()).unwrap();
        let pool = copy_pool(nic.dma(), 4).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
        let path = dir.path().join("f");
        std::fs::write(&path, &data).unwrap();
        let arena = FrameArena::anonymous(0x4000_0000, 512 * 4096).unwrap();
        let cache = PageCache::new(arena, CacheConfig::default()).unwrap();
        let file = cache.open(&path, OpenOptions::read_only()).unwrap();
        let pin = file.pin(0..len as u64).unwrap();
        Fixture {
            _dir: dir,
            _nic: nic,
            pool,
            data,
            pin,
        }
    }

    fn collect(q: &SendQueue, range: Range<u64>) -> (Vec<u8>, usize) {
        let mut bytes = Vec::new();
        let mut pieces = 0;
        q.for_each_piece(range, |p| {
            p.with_bytes(|b| bytes.extend_from_slice(b));
            pieces += 1;
        })
        .unwrap();
        (bytes, pieces)
    }

    #[test]
    fn maps_stream_ranges_across_copied_and_file_items() {
        let fx = fixture(200_000);
        let mut q = SendQueue::new(SendMode::ZeroCopy, usize::MAX);
        assert_eq!(q.push_copy(b"HTTP/1.1 200 OK\r\n", &fx.pool), 17);
        assert_eq!(q.push_copy(b"\r\n", &fx.pool), 2);
        q.push_file(&fx.pin, 1000..150_000, SendId(1));
        assert_eq!(q.queued_end, 19 + 149_000);
        assert_eq!(
            q.item_count(),
            1 + 3,
            "headers share a block; file split at 64 KiB"
        );
        let mut expected = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        expected.extend_from_slice(&fx.data[1000..150_000]);
        for range in [0..19u64, 5..300, 19..20, 60_000..130_000, 0..q.queued_end] {
            let (bytes, _) = collect(&q, range.clone());
            assert_eq!(
                bytes,
                &expected[range.start as usize..range.end as usize],
                "{range:?}"
            );
        }
        assert_eq!(q.for_each_piece(0..q.queued_end + 1, |_| {}), Err(Unmapped));
    }

    #[test]
    fn contiguous_pages_are_separate_pieces_split_at_page_boundaries() {
        let fx = fixture(20_000);
        let mut q = SendQueue::new(SendMode::ZeroCopy, usize::MAX);
        q.push_file(&fx.pin, 100..20_000, SendId(1));
        let mut pieces = Vec::new();
        q.for_each_piece(0..10_000, |p| pieces.push((p.iova, p.len)))
            .unwrap();
        // 100..4096 | 4096..8192 | 8192..10100
        assert_eq!(
            pieces.iter().map(|p| p.1).collect::<Vec<_>>(),
            vec![3996, 4096, 1908]
        );
        assert_eq!(pieces[0].0 % 4096, 100);
    }

    #[test]
    fn items_release_only_after_ack_and_dma_completion() {
        let fx = fixture(200_000);
        let mut q = SendQueue::new(SendMode::ZeroCopy, usize::MAX);
        q.push_file(&fx.pin, 0..200_000, SendId(7));
        drop(fx.pin);
        q.fed = q.queued_end;
        q.add_dma_refs(60_000..70_000, 1); // a frame in flight over items 0 and 1
        let mut done = Vec::new();
        q.acked = 100_000;
        assert_eq!(q.release(|id, o| done.push((id, o))), 0, "item 0 in flight");
        q.add_dma_refs(60_000..70_000, -1);
        assert_eq!(q.release(|id, o| done.push((id, o))), 1);
        assert_eq!(q.pins_held(), 3);
        assert!(done.is_empty());
        q.acked = 200_000;
        assert_eq!(q.release(|id, o| done.push((id, o))), 3);
        assert_eq!(done, vec![(SendId(7), SendOutcome::Acknowledged)]);
        assert!(q.is_idle());
    }

    #[test]
    fn abort_releases_everything_not_in_flight() {
        let fx = fixture(100_000);
        let mut q = SendQueue::new(SendMode::ZeroCopy, usize::MAX);
        q.push_copy(&[1; 5000], &fx.pool);
        q.push_file(&fx.pin, 0..100_000, SendId(3));
        assert_eq!(fx.pool.free_count(), 2);
        q.add_dma_refs(70_000..70_001, 1);
        q.abort();
        let mut done = Vec::new();
        q.release(|id, o| done.push((id, o)));
        assert_eq!(fx.pool.free_count(), 4, "blocks back in the pool");
        assert_eq!(q.item_count(), 1, "the item under DMA stays");
        assert!(done.is_empty());
        q.add_dma_refs(70_000..70_001, -1);
        q.release(|id, o| done.push((id, o)));
        assert_eq!(done, vec![(SendId(3), SendOutcome::Aborted)]);
    }

    #[test]
    fn copy_pool_exhaustion_limits_send() {
        let fx = fixture(10);
        let mut q = SendQueue::new(SendMode::ZeroCopy, usize::MAX);
        assert_eq!(q.push_copy(&[0; 20_000], &fx.pool), 4 * COPY_BLOCK);
        assert_eq!(q.push_copy(&[0; 1], &fx.pool), 0);
    }

    #[test]
    fn copying_mode_copies_unfed_bytes() {
        let fx = fixture(10_000);
        let mut q = SendQueue::new(SendMode::Copying, usize::MAX);
        q.push_file(&fx.pin, 0..10_000, SendId(1));
        let mut out = vec![0; 6000];
        assert_eq!(q.copy_unfed(&mut out), 6000);
        assert_eq!(out, &fx.data[..6000]);
        assert_eq!(q.copy_unfed(&mut out), 4000);
        assert_eq!(&out[..4000], &fx.data[6000..]);
        assert_eq!(q.release(|_, _| {}), 1, "fed items are released");
    }
}
