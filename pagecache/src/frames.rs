//! The frame table: per-frame pin state, the free list, frame ownership and the clock hand
//! used for eviction, plus the event channel that wakes waiting writers and allocators.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::arena::FrameId;
use crate::ticket::Ticket;

/// Flag in a frame's state word: the frame no longer belongs to any file page (it was
/// replaced by copy-on-write, truncated away or invalidated) and is freed by whoever drops
/// its last pin.
pub(crate) const ORPHAN: u64 = 1 << 31;
/// Flag in a frame's state word: the frame holds an old version of a page that open
/// snapshots still need (see `snapshot`). A held frame is never written, evicted or freed;
/// when the last snapshot lets go the flag is cleared and the frame is freed with its last pin.
pub(crate) const HELD: u64 = 1 << 30;
/// Mask of the pin count in a frame's state word.
pub(crate) const PIN_MASK: u64 = HELD - 1;
/// The low half of a state word: pin count and flags. The high half is the frame's
/// *incarnation*, moved on whenever the frame stops holding a file page (freed, or claimed
/// by eviction), so a lock-free pinner holding a stale page-table entry (frame, incarnation)
/// cannot pin the frame once it holds something else (see `fast`).
pub(crate) const LOW_MASK: u64 = (1 << 32) - 1;
const INCARNATION_SHIFT: u32 = 32;

/// The incarnation of a state word.
#[inline]
pub(crate) fn incarnation(state: u64) -> u32 {
    (state >> INCARNATION_SHIFT) as u32
}

/// A state word with no pins, no flags and the next incarnation.
#[inline]
fn next_incarnation(state: u64) -> u64 {
    u64::from(incarnation(state).wrapping_add(1)) << INCARNATION_SHIFT
}

/// Lock-free per-frame metadata, one cache line per frame: pinners of different pages on
/// different cores never write the same line (false sharing would cost what the per-file
/// lock cost).
#[derive(Default)]
#[repr(align(64))]
pub(crate) struct FrameMeta {
    /// Pin count (low 30 bits), [`HELD`] and [`ORPHAN`] flags, and the incarnation (high 32
    /// bits). A pin from zero is taken either under the owning file's lock, or lock-free by
    /// a compare-and-swap that checks the incarnation and the absence of flags (`fast`);
    /// decrements happen anywhere (pin release).
    pub state: AtomicU64,
    /// Clock "recently used" bit.
    pub referenced: AtomicBool,
    /// Audit mode: the crc32 of the frame's current version, with a "recorded" bit (see
    /// `audit`).
    pub audit: AtomicU64,
    /// Audit mode: releases of pins of this frame, for the 1-in-N verification.
    pub audit_releases: AtomicU32,
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
        // The top of the stack is its end: reversed, a fresh list (and any run freed in
        // descending order) hands out ascending frames, so consecutive file pages get
        // frames adjacent in IOVA space, which become one DMA descriptor (and, in 2 MiB
        // pages, one IOMMU translation).
        let mut taken = alloc.free.split_off(at);
        taken.reverse();
        taken
    }

    /// Returns frames to the free list. They must have no owner and no pins; their state
    /// word is reset (flags cleared) and their incarnation moved on, so that no stale page-table
    /// entry can pin them (the frame is not mapped, or is an orphan, which lock-free pinners
    /// refuse, so nobody races this store).
    pub fn put_free(&self, frames: &[FrameId]) {
        let mut alloc = self.alloc.lock();
        for &frame in frames {
            let state = &self.meta(frame).state;
            let now = state.load(Ordering::SeqCst);
            debug_assert_eq!(now & (PIN_MASK | HELD), 0, "freeing a pinned or held frame");
            state.store(next_incarnation(now), Ordering::SeqCst);
            debug_assert!(alloc.owners[frame as usize].is_none());
            alloc.free.push(frame);
        }
    }

    /// Claims an unpinned, mapped frame for eviction: moves its incarnation on unless a pin
    /// (possibly a lock-free one) got there first. After success no lock-free pinner can pin
    /// it through the page-table entry it may still hold.
    pub fn claim_for_eviction(&self, frame: FrameId) -> bool {
        let state = &self.meta(frame).state;
        let now = state.load(Ordering::SeqCst);
        now & LOW_MASK == 0
            && state
                .compare_exchange(
                    now,
                    next_incarnation(now),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
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
    /// them a second chance). Candidates must be re-checked under their file's lock and
    /// claimed ([`FrameTable::claim_for_eviction`]).
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
            if meta.state.load(Ordering::Relaxed) & LOW_MASK != 0 {
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

/// Wakes whoever waits for "a pin was released, a frame was freed or an old version was let
/// go": blocking callers (a [`Waiter`] on the condition variable) and non-blocking ones (a
/// parked [`Ticket`], completed so that its holder retries).
///
/// Nobody waiting is the common case, and then an event costs one load of a line that is
/// only written when someone starts or stops waiting: releasing a pin does not write a
/// cache-wide line (a generation counter bumped on every release bounced between every core
/// that unpins). This is safe because a waiter *registers first* ([`Events::waiter`]: the
/// count of waiters goes up) and only then re-checks its condition: either the notifier's
/// load sees the registration (and wakes it), or the re-check sees the notifier's change.
/// Both sides use `SeqCst` (and changes made under a mutex are seen through that mutex).
#[derive(Default)]
pub(crate) struct Events {
    generation: AtomicU64,
    waiters: AtomicUsize,
    parked: Mutex<Vec<Ticket>>,
    changed: Condvar,
}

/// A wait registration (see [`Events::waiter`]): counted among the waiters from its creation,
/// so events after it are never lost. Either wait on it (blocking) or hand it to
/// [`Events::park`] with a ticket (non-blocking).
pub(crate) struct Waiter<'a> {
    events: &'a Events,
    generation: u64,
}

impl Events {
    pub fn notify(&self) {
        if self.waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        let woken = {
            let mut parked = self.parked.lock();
            self.changed.notify_all();
            std::mem::take(&mut *parked)
        };
        self.waiters.fetch_sub(woken.len(), Ordering::SeqCst);
        for ticket in woken {
            ticket.complete(None);
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Registers a waiter; take it *before* re-checking the condition.
    pub fn waiter(&self) -> Waiter<'_> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        Waiter {
            events: self,
            generation: self.generation(),
        }
    }

    /// Parks `ticket` until the next event after `waiter` was registered (its registration
    /// now stands for the ticket); completes it at once if there was one already.
    pub fn park(&self, ticket: &Ticket, waiter: Waiter<'_>) {
        let seen = waiter.generation;
        // The registration's count now belongs to the parked ticket: `notify` (or the
        // check below) takes it back when it completes the ticket.
        std::mem::forget(waiter);
        self.parked.lock().push(ticket.clone());
        if self.generation() != seen {
            let mut parked = self.parked.lock();
            if let Some(at) = parked.iter().position(|t| t.same(ticket)) {
                parked.swap_remove(at);
                drop(parked);
                self.waiters.fetch_sub(1, Ordering::SeqCst);
                ticket.complete(None);
            }
        }
    }
}

impl Waiter<'_> {
    /// Waits until something happened after the waiter was registered. Returns false on
    /// timeout.
    pub fn wait_until(self, deadline: Instant) -> bool {
        let events = self.events;
        let mut parked = events.parked.lock();
        while events.generation() == self.generation {
            if events.changed.wait_until(&mut parked, deadline).timed_out() {
                return events.generation() != self.generation;
            }
        }
        true
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.events.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}
