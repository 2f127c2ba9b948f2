//! Pins: guards over immutable page versions.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use crate::arena::{FrameId, PAGE_SIZE};
use crate::cache::CacheShared;

const PAGE: u64 = PAGE_SIZE as u64;

/// What pins hold the cache by: a reference-counted handle of its own, so that pins taken on
/// different threads do not all count references on the cache's one `Arc` (a cache line
/// every pin and release would write). Aligned so its count has a line to itself.
#[repr(align(64))]
pub(crate) struct Anchor {
    pub cache: Arc<CacheShared>,
}

impl Anchor {
    /// An anchor of its own (for pins taken off the hot path).
    pub fn new(cache: Arc<CacheShared>) -> Arc<Self> {
        Arc::new(Self { cache })
    }
}

/// Anchors for the pins of one handle, one per thread shard, created on first use.
pub(crate) struct Anchors {
    cache: Arc<CacheShared>,
    slots: [OnceLock<Arc<Anchor>>; ANCHORS],
}

/// Anchors per handle: threads beyond this share them (round-robin, see `stats::shard`).
const ANCHORS: usize = 16;

impl Anchors {
    pub fn new(cache: Arc<CacheShared>) -> Self {
        Self {
            cache,
            slots: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    #[inline]
    pub fn get(&self) -> Arc<Anchor> {
        self.slots[crate::stats::shard() % ANCHORS]
            .get_or_init(|| Anchor::new(self.cache.clone()))
            .clone()
    }
}

/// The frames one pin operation holds; released when the last [`Pin`] sharing them drops.
struct PinnedFrames {
    anchor: Arc<Anchor>,
    version: u64,
    /// File page index of `frames[0]`.
    first_page: u64,
    frames: Box<[FrameId]>,
}

impl Drop for PinnedFrames {
    fn drop(&mut self) {
        for &frame in self.frames.iter() {
            self.anchor.cache.unpin(frame);
        }
    }
}

/// A pinned byte range of a cached file: an immutable snapshot of one version of the file.
///
/// While any `Pin` (or clone, or sub-pin) referring to a page exists, the page's bytes do not
/// change: writers wait or copy on write. The bytes live in the cache's
/// [`crate::FrameArena`], so the NIC can DMA them directly using the IOVAs of
/// [`Pin::spans`]. `Pin` is `Send + Sync`; cloning it is cheap (a reference count).
#[derive(Clone)]
pub struct Pin {
    frames: Arc<PinnedFrames>,
    range: Range<u64>,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin")
            .field("range", &self.range)
            .field("version", &self.frames.version)
            .finish()
    }
}

/// A piece of a pin within one page: contiguous in both file offsets and IOVA space.
#[derive(Debug, Clone, Copy)]
pub struct Span<'a> {
    /// Offset in the file of `bytes[0]`.
    pub file_offset: u64,
    /// Device address of `bytes[0]`.
    pub iova: u64,
    /// The bytes (valid, and unchanging, while the pin lives).
    pub bytes: &'a [u8],
}

impl Pin {
    pub(crate) fn new(
        anchor: Arc<Anchor>,
        range: Range<u64>,
        version: u64,
        first_page: u64,
        frames: Box<[FrameId]>,
    ) -> Self {
        Self {
            frames: Arc::new(PinnedFrames {
                anchor,
                version,
                first_page,
                frames,
            }),
            range,
        }
    }

    /// The pinned byte range (file offsets).
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    /// Number of pinned bytes.
    pub fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    /// Whether the pin covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// Version of the file the pinned bytes belong to. It increases with every change
    /// through the cache and every external change detected by revalidation; combined with
    /// the file identity it can serve as an ETag (it is per cache instance, not persistent).
    pub fn version(&self) -> u64 {
        self.frames.version
    }

    /// Number of pages (frames) this pin holds.
    pub fn page_count(&self) -> usize {
        self.frames.frames.len()
    }

    /// The spans covering `range` (file offsets), split at page boundaries.
    ///
    /// # Panics
    /// If `range` is not inside [`Pin::range`].
    pub fn spans(&self, range: Range<u64>) -> Spans<'_> {
        self.check_inside(&range);
        Spans {
            frames: &self.frames,
            position: range.start,
            end: range.end,
        }
    }

    /// The spans of the whole pin.
    pub fn all_spans(&self) -> Spans<'_> {
        self.spans(self.range())
    }

    /// Copies the pinned bytes into a new vector (for tests and slow paths).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() as usize);
        for span in self.all_spans() {
            out.extend_from_slice(span.bytes);
        }
        out
    }

    /// Pins only the pages covering `range` (file offsets), independently of `self`: drop
    /// `self` and keep sub-pins to release pages progressively as bytes are acknowledged.
    ///
    /// # Panics
    /// If `range` is not inside [`Pin::range`].
    pub fn sub_pin(&self, range: Range<u64>) -> Pin {
        self.check_inside(&range);
        let frames = &self.frames;
        let (first, end) = if range.is_empty() {
            (range.start / PAGE, range.start / PAGE)
        } else {
            (range.start / PAGE, (range.end - 1) / PAGE + 1)
        };
        let from = (first - frames.first_page) as usize;
        let to = (end.max(first) - frames.first_page) as usize;
        let sub: Box<[FrameId]> =
            frames.frames[from.min(frames.frames.len())..to.min(frames.frames.len())].into();
        let cache = &frames.anchor.cache;
        for &frame in sub.iter() {
            cache.pin_again(frame);
        }
        cache.stats.pins.add(1);
        Pin::new(frames.anchor.clone(), range, frames.version, first, sub)
    }

    fn check_inside(&self, range: &Range<u64>) {
        assert!(
            range.start <= range.end
                && range.start >= self.range.start
                && range.end <= self.range.end,
            "range {range:?} is not inside the pinned range {:?}",
            self.range
        );
    }
}

/// Iterator over the [`Span`]s of a pinned range.
pub struct Spans<'a> {
    frames: &'a PinnedFrames,
    position: u64,
    end: u64,
}

impl<'a> Iterator for Spans<'a> {
    type Item = Span<'a>;

    fn next(&mut self) -> Option<Span<'a>> {
        if self.position >= self.end {
            return None;
        }
        let page = self.position / PAGE;
        let frame = self.frames.frames[(page - self.frames.first_page) as usize];
        let in_page = (self.position % PAGE) as usize;
        let n = (PAGE_SIZE - in_page).min((self.end - self.position) as usize);
        let arena = &self.frames.anchor.cache.arena;
        // SAFETY: `frame` is pinned by `self.frames` for at least `'a`, and pinned frames are
        // never written (the test-only InPlaceUnsafe policy excepted, by design).
        let bytes = unsafe { arena.bytes(frame) };
        let span = Span {
            file_offset: self.position,
            iova: arena.iova(frame) + in_page as u64,
            bytes: &bytes[in_page..in_page + n],
        };
        self.position += n as u64;
        Some(span)
    }
}
