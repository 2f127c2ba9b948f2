//! The stable-page userspace page cache of zerosend.
//!
//! # The guarantee
//! **A page that a packet refers to never changes from the moment it is pinned until its
//! last pin is released.** Pins can last arbitrarily long (until the NIC's DMA completed and
//! TCP acknowledged the bytes). Writers are never allowed to change pinned bytes: depending
//! on the handle's [`WritePolicy`] they either wait (bounded, [`WritePolicy::Wait`]) or copy
//! the page to a new frame ([`WritePolicy::CopyOnWrite`]). Linux `sendfile` cannot promise
//! this; this cache can because its page frames are its own memory (a [`FrameArena`]), not
//! the kernel's page cache: another process writing the file on disk cannot touch them, and
//! such external changes only become visible to *later* pins after revalidation.
//!
//! A multi-page pin is an atomic snapshot: every page belongs to the same version of the
//! file, even while writers run. Writes (and fills, evictions, truncations) take a per-file
//! lock, held only for page-table work, never for the lifetime of a pin; a pin of pages that
//! are already cached takes no lock at all: it validates itself against the file's published
//! sequence word and pins each frame with one compare-and-swap, falling back to the lock when
//! anything changed meanwhile (see the `fast` module's documentation for the protocol, what
//! it costs, and what a 64-core machine would still share).
//!
//! # How the netstack uses it
//! 1. `cache.open(path, OpenOptions::read_only())` once per file (cheap if already open).
//! 2. When building a response, [`CachedFile::pin`] the byte range **before** computing the
//!    TCP checksum (or encrypting); [`Pin::version`] can go into the ETag.
//! 3. Compute checksums and build descriptors from [`Pin::spans`]: each [`Span`] gives the
//!    file offset, the IOVA the NIC DMAs from, and the bytes (for the checksum).
//! 4. Keep the pin (or [`Pin::sub_pin`]s of the still-unacknowledged part) until the NIC
//!    reported TX completion **and** the peer acknowledged the bytes (retransmissions must
//!    send identical bytes); then drop it. Dropping releases the pages progressively.
//!
//! ```
//! use pagecache::{CacheConfig, FrameArena, OpenOptions, PageCache, WritePolicy};
//! # let dir = std::env::temp_dir().join(format!("pagecache-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let path = dir.join("index.html");
//! # std::fs::write(&path, b"hello, stable pages").unwrap();
//! let arena = FrameArena::anonymous(0x1000_0000, 1 << 20)?; // 256 frames at IOVA 0x1000_0000
//! let cache = PageCache::new(arena, CacheConfig::default())?;
//! let file = cache.open(&path, OpenOptions::read_write(WritePolicy::CopyOnWrite))?;
//!
//! let pin = file.pin(0..file.len())?; // before computing the checksum
//! file.write(0, b"HELLO")?;           // copy-on-write: the pin keeps its bytes
//! for span in pin.spans(0..5) {
//!     assert_eq!(span.bytes, b"hello"); // DMA from span.iova, checksum span.bytes
//! }
//! drop(pin); // after TX completion and ACK
//! assert_eq!(file.pin(0..5)?.to_vec(), b"HELLO");
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), pagecache::Error>(())
//! ```
//!
//! # Streaming: snapshots and non-blocking calls
//! A response body does not have to be pinned whole. [`CachedFile::snapshot`] fixes one
//! version of a range without pinning or reading anything; [`Snapshot::pin_next`] then pins
//! it a window at a time, and writers keep the old versions an open snapshot still needs
//! (bounded by [`CacheConfig::old_version_limit_pages`], see [`OldVersionPolicy`]). Cold pages
//! are read by the cache's I/O threads: a pin that must wait returns [`Attempt::Pending`],
//! whose [`Pending`] can be polled or can send a token to a `std::sync::mpsc` channel.
//!
//! ```
//! use pagecache::{Attempt, Backpressure, CacheConfig, FrameArena, OpenOptions, PageCache, WritePolicy};
//! # let dir = std::env::temp_dir().join(format!("pagecache-doc-stream-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let path = dir.join("big.bin");
//! # std::fs::write(&path, vec![7u8; 64 * 4096]).unwrap();
//! // Read-ahead fills can hold every frame of so small a cache for a moment: wait for one
//! // (a pin that must wait returns Pending) rather than fail at once.
//! let config = CacheConfig {
//!     backpressure: Backpressure::Wait { timeout: std::time::Duration::from_secs(10) },
//!     ..CacheConfig::default()
//! };
//! let cache = PageCache::new(FrameArena::anonymous(0x1000_0000, 16 * 4096)?, config)?;
//! let file = cache.open(&path, OpenOptions::read_write(WritePolicy::CopyOnWrite))?;
//! let mut snapshot = file.snapshot(0..file.len())?; // 256 KiB through a 64 KiB cache
//! let etag = snapshot.identity().etag();             // the head, before any byte is read
//! let (ready_tx, ready_rx) = std::sync::mpsc::channel();
//! let mut body = Vec::new();
//! while snapshot.remaining() > 0 {
//!     match snapshot.pin_next(8 * 4096)? {
//!         Attempt::Ready(pin) => body.extend(pin.to_vec()), // send; drop after the ACK
//!         Attempt::Pending(pending) => {
//!             pending.notify(&ready_tx, 1);                 // an event loop moves on here
//!             ready_rx.recv().unwrap();
//!         }
//!     }
//!     file.write(60 * 4096, b"later")?; // a writer: the snapshot keeps its version
//! }
//! assert!(body.iter().all(|&b| b == 7));
//! # drop(etag);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), pagecache::Error>(())
//! ```
//!
//! The driver maps [`FrameArena::memory`] (a vm-memory [`vm_memory::GuestMemoryMmap`] whose
//! guest addresses are the IOVAs) read-only into the IOMMU for the NIC.
//!
//! # Memory
//! The arena size is the hard limit on cached pages; [`CacheConfig::soft_limit_frames`] is an
//! optional lower target. A clock algorithm evicts unpinned pages (writing dirty ones back
//! first); pinned pages are never evicted. When nothing can be evicted, the caller gets
//! [`Error::OutOfFrames`] at once or after a bounded wait ([`Backpressure`]).
//!
//! # Auditing
//! With [`CacheConfig::audit`], the crc32 of each frame version is recorded at its first pin,
//! verified at every [`CacheConfig::audit_verify_every`]-th release of a pin of it (1: every
//! release) and when the version ends (rewritten, evicted, freed); mismatches are counted in
//! [`CacheStats::audit_violations`] (the `audit` module says why this design and what it
//! costs). The test-only
//! `WritePolicy::InPlaceUnsafe` (available under `cfg(test)` and the `test-hooks` feature)
//! writes into pinned pages the way Linux would, to prove that such detectors can fire.
//!
//! # Unsafe code
//! All raw accesses to frame memory are `unsafe fn`s in the `arena` module; their callers
//! state with `// SAFETY:` why the frame ownership rules documented there hold.

mod arena;
mod audit;
mod cache;
mod error;
mod fast;
mod file;
mod fill;
mod frames;
mod identity;
mod io_pool;
mod open_files;
mod pin;
mod snapshot;
mod stats;
mod ticket;
mod write;
mod writeback;

pub use arena::{FrameArena, PAGE_SIZE};
pub use audit::DEFAULT_VERIFY_EVERY as DEFAULT_AUDIT_VERIFY_EVERY;
pub use cache::{Backpressure, CacheConfig, OldVersionPolicy, PageCache};
pub use error::{Error, Result};
#[cfg(any(test, feature = "test-hooks"))]
pub use file::set_unsafe_skip_pin_recheck;
pub use file::{CachedFile, OpenOptions, WritePolicy};
pub use identity::FileIdentity;
pub use pin::{Pin, Span, Spans};
pub use snapshot::{InvalidationReason, Snapshot};
pub use stats::CacheStats;
pub use ticket::{Attempt, Pending, PendingReason};

#[cfg(test)]
mod tests;
