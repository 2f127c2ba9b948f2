//! The frame table: per-frame pin state, the free list, frame ownership and the clock hand
//! used for eviction, plus the event channel that wakes waiting writers and allocators.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::arena::FrameId;

/// Flag in a frame's state word: the frame no longer belongs to any file page (it was
/// replaced by copy-on-write, truncated away or invalidated) and is freed by whoever drops
/// its last pin.
pub(crate) const ORPHAN: u32 = 1 << 31;
/// Mask of the pin count in a frame's state word.
pub(crate) const PIN_MASK: u32 = ORPHAN - 1;

/// Lock-free per-frame metadata.
#[derive(Default)]
pub(crate) struct FrameMeta {
    /// Pin count (low 31 bits) and [`ORPHAN`] flag. Increments from zero happen only under
    /// the owning file's lock; decrements happen anywhere (pin release).
    pub state: AtomicU32,
    /// Clock "recently used" bit.
    pub referenced: AtomicBool,
    /// Audit mode: crc32 of the frame's bytes recorded when it was first pinned.
    pub audit_crc: AtomicU32,
}

/// Which file page a frame holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Owner {
    pub file_id: u32,
    pub page: u64,
}

struct Allocator {
    free: Vec<FrameId>,
    /// `Some` for frames mapped into a file's page table (eviction candidates).
    owners: Vec<Option<Owner>>,
    clock_hand: usize,
}

pub(crate) struct FrameTable {
    pub meta: Box<[FrameMeta]>,
    alloc: Mutex<Allocator>,
}

impl FrameTable {
    pub fn new(frames: usize) -> Self {
        Self {
            meta: (0..frames).map(|_| FrameMeta::default()).collect(),
            alloc: Mutex::new(Allocator {
                // Reversed so that frames are handed out in ascending order (nicer IOVAs).
                free: (0..frames as FrameId).rev().collect(),
                owners: vec![None; frames],
                clock_hand: 0,
            }),
        }
    }

    #[inline]
    pub fn meta(&self, frame: FrameId) -> &FrameMeta {
        &self.meta[frame as usize]
    }

    /// Number of frames not on the free list.
    pub fn resident(&self) -> usize {
        self.meta.len() - self.alloc.lock().free.len()
    }

    pub fn free_count(&self) -> usize {
        self.alloc.lock().free.len()
    }

    /// Takes up to `n` free frames, but only while the number of frames in use stays at most
    /// `max_in_use`.
    pub fn take_free(&self, n: usize, max_in_use: usize) -> Vec<FrameId> {
        let mut alloc = self.alloc.lock();
        let in_use = self.meta.len() - alloc.free.len();
        let n = n
            .min(max_in_use.saturating_sub(in_use))
            .min(alloc.free.len());
        let at = alloc.free.len() - n;
        alloc.free.split_off(at)
    }

    /// Returns frames to the free list. They must have no owner and a zero state word.
    pub fn put_free(&self, frames: &[FrameId]) {
        let mut alloc = self.alloc.lock();
        for &frame in frames {
            debug_assert_eq!(self.meta(frame).state.load(Ordering::Relaxed), 0);
            debug_assert!(alloc.owners[frame as usize].is_none());
            alloc.free.push(frame);
        }
    }

    pub fn set_owner(&self, frame: FrameId, owner: Option<Owner>) {
        self.alloc.lock().owners[frame as usize] = owner;
    }

    /// Records that `frames[i]` now holds page `first_page + i` of file `file_id`.
    pub fn set_owners(&self, frames: &[FrameId], file_id: u32, first_page: u64) {
        let mut alloc = self.alloc.lock();
        for (i, &frame) in frames.iter().enumerate() {
            alloc.owners[frame as usize] = Some(Owner {
                file_id,
                page: first_page + i as u64,
            });
            self.meta[frame as usize]
                .referenced
                .store(true, Ordering::Relaxed);
        }
    }

    /// Advances the clock hand and returns up to `want` eviction candidates: owned, unpinned
    /// frames whose referenced bit was clear (the bit of skipped frames is cleared, giving
    /// them a second chance). Candidates must be re-checked under their file's lock.
    pub fn clock_candidates(&self, want: usize) -> Vec<(FrameId, Owner)> {
        let mut alloc = self.alloc.lock();
        let n = self.meta.len();
        let mut out = Vec::with_capacity(want);
        let mut scanned = 0;
        while out.len() < want && scanned < 2 * n {
            let frame = alloc.clock_hand;
            alloc.clock_hand = (alloc.clock_hand + 1) % n;
            scanned += 1;
            let Some(owner) = alloc.owners[frame] else {
                continue;
            };
            let meta = &self.meta[frame];
            if meta.state.load(Ordering::Relaxed) != 0 {
                continue;
            }
            if meta.referenced.swap(false, Ordering::Relaxed) {
                continue;
            }
            out.push((frame as FrameId, owner));
        }
        out
    }
}

/// Wakes threads waiting for "a pin was released or a frame was freed".
///
/// Waiters register (`ticket`) *before* re-checking their condition under the file lock;
/// notifiers only take the mutex when someone is registered, so releasing a pin stays a
/// couple of atomic operations. Both sides use `SeqCst`, so either the notifier sees the
/// registration or the waiter sees the released pin / freed frame.
#[derive(Default)]
pub(crate) struct Events {
    waiters: AtomicUsize,
    generation: Mutex<u64>,
    changed: Condvar,
}

pub(crate) struct Ticket<'a> {
    events: &'a Events,
    generation: u64,
}

impl Events {
    pub fn notify(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            *self.generation.lock() += 1;
            self.changed.notify_all();
        }
    }

    pub fn ticket(&self) -> Ticket<'_> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let generation = *self.generation.lock();
        Ticket {
            events: self,
            generation,
        }
    }
}

impl Ticket<'_> {
    /// Waits until something happened after the ticket was taken. Returns false on timeout.
    pub fn wait_until(self, deadline: Instant) -> bool {
        let mut generation = self.events.generation.lock();
        while *generation == self.generation {
            if self
                .events
                .changed
                .wait_until(&mut generation, deadline)
                .timed_out()
            {
                return *generation != self.generation;
            }
        }
        true
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.events.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}
