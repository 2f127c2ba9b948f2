//! Non-blocking results: [`Attempt`], [`Pending`] and the completion tickets behind them.
//!
//! A non-blocking call never sleeps and never reads the disk on the caller's thread. When it
//! cannot finish now it returns [`Attempt::Pending`]; the [`Pending`] says why, until when the
//! caller should keep trying (a deadline the caller enforces) and how to learn that a retry
//! may succeed: poll [`Pending::is_ready`] each loop iteration, or have a token sent to a
//! `std::sync::mpsc` channel with [`Pending::notify`] (one channel for the whole event loop,
//! one token per connection). No async runtime is involved.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::error::Error;

/// The outcome of a non-blocking operation.
#[must_use = "a pending attempt must be retried once its `Pending` is ready"]
#[derive(Debug)]
pub enum Attempt<T> {
    /// Done.
    Ready(T),
    /// Not possible yet; retry when the [`Pending`] is ready (or give up at its deadline).
    Pending(Pending),
}

impl<T> Attempt<T> {
    /// The value, if ready.
    pub fn ready(self) -> Option<T> {
        match self {
            Attempt::Ready(value) => Some(value),
            Attempt::Pending(_) => None,
        }
    }

    /// Whether the attempt is pending.
    pub fn is_pending(&self) -> bool {
        matches!(self, Attempt::Pending(_))
    }

    /// An attempt that found a page it needs being read by the I/O pool (`fill`): the
    /// fill's error if it has already failed, else pending until the fill ends.
    pub(crate) fn after_fill(fill: Ticket) -> Result<Attempt<T>, Error> {
        if let Some(Err(e)) = fill.outcome() {
            return Err(e);
        }
        Ok(Attempt::Pending(Pending::new(
            fill,
            PendingReason::Filling,
            None,
        )))
    }
}

/// Why a non-blocking operation is pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PendingReason {
    /// Pages are being read from disk by the cache's I/O threads.
    Filling,
    /// No frame is free and none can be evicted now; ready when a frame is freed or a pin
    /// released. The deadline comes from [`crate::Backpressure`].
    OutOfFrames {
        /// Frames that were missing.
        needed: usize,
    },
    /// A [`crate::WritePolicy::Wait`] writer found touched pages pinned.
    Pinned {
        /// Touched pages that are pinned.
        pages: usize,
    },
    /// Keeping the old versions open snapshots need would exceed
    /// [`crate::CacheConfig::old_version_limit_pages`] (policy
    /// [`crate::OldVersionPolicy::WriterWaits`]); ready when old versions are let go.
    OldVersionLimit {
        /// Old-version pages the write would have to keep.
        needed: usize,
    },
    /// A background writeback or fsync is running.
    Io,
}

/// A non-blocking operation that could not complete yet. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pending {
    ticket: Ticket,
    reason: PendingReason,
    deadline: Option<Instant>,
}

impl Pending {
    pub(crate) fn new(ticket: Ticket, reason: PendingReason, deadline: Option<Instant>) -> Self {
        Self {
            ticket,
            reason,
            deadline,
        }
    }

    /// Why the operation is pending.
    pub fn reason(&self) -> PendingReason {
        self.reason
    }

    /// When to stop retrying and fail the request (`None`: no limit, e.g. a fill, which ends
    /// by itself). Retrying after the deadline returns the corresponding error.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether a retry may now succeed (one atomic load: fine to poll every loop iteration).
    pub fn is_ready(&self) -> bool {
        self.ticket.is_done()
    }

    /// Sends `token` to `queue` when the operation may be retried (at once if it already may).
    /// Meant for an event loop that owns the receiving end and maps tokens to connections.
    pub fn notify(&self, queue: &Sender<u64>, token: u64) {
        self.ticket.listen(queue, token);
    }

    /// Blocks until ready or `deadline`; returns whether it is ready. For callers that may
    /// block (tests, tools); an event loop uses [`Pending::notify`] instead.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        self.ticket.wait_until(deadline)
    }

    /// For background I/O ([`PendingReason::Io`], [`PendingReason::Filling`]): `None` while it
    /// runs, then whether it succeeded.
    pub fn outcome(&self) -> Option<Result<(), Error>> {
        self.ticket.outcome()
    }
}

/// A copyable description of a failed system call (`io::Error` is not `Clone`), so that every
/// waiter of a failed fill or sync gets the error.
#[derive(Debug, Clone)]
pub(crate) struct IoFailure {
    op: &'static str,
    path: PathBuf,
    raw: Option<i32>,
    kind: io::ErrorKind,
    message: String,
}

impl IoFailure {
    pub fn from_error(error: &Error) -> Self {
        match error {
            Error::Io { op, path, source } => Self {
                op,
                path: path.clone(),
                raw: source.raw_os_error(),
                kind: source.kind(),
                message: source.to_string(),
            },
            other => Self {
                op: "io",
                path: PathBuf::new(),
                raw: None,
                kind: io::ErrorKind::Other,
                message: other.to_string(),
            },
        }
    }

    pub fn to_error(&self) -> Error {
        let source = match self.raw {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.message.clone()),
        };
        Error::io(self.op, &self.path, source)
    }
}

#[derive(Default)]
struct TicketState {
    done: bool,
    failure: Option<IoFailure>,
    listeners: Vec<(Sender<u64>, u64)>,
}

#[derive(Default)]
struct TicketInner {
    done: AtomicBool,
    state: Mutex<TicketState>,
    completed: Condvar,
}

/// A one-shot completion: a fill or a background sync finished, or an event a stalled caller
/// waits for happened.
#[derive(Clone, Default)]
pub(crate) struct Ticket(Arc<TicketInner>);

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("done", &self.is_done())
            .finish()
    }
}

impl Ticket {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn same(&self, other: &Ticket) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub fn is_done(&self) -> bool {
        self.0.done.load(Ordering::Acquire)
    }

    /// Completes the ticket (once; later calls are ignored) and tells every listener.
    pub fn complete(&self, failure: Option<IoFailure>) {
        let listeners = {
            let mut state = self.0.state.lock();
            if state.done {
                return;
            }
            state.done = true;
            state.failure = failure;
            self.0.done.store(true, Ordering::Release);
            self.0.completed.notify_all();
            std::mem::take(&mut state.listeners)
        };
        for (queue, token) in listeners {
            // A listener that went away no longer cares.
            let _ = queue.send(token);
        }
    }

    pub fn listen(&self, queue: &Sender<u64>, token: u64) {
        let mut state = self.0.state.lock();
        if state.done {
            drop(state);
            let _ = queue.send(token);
        } else {
            state.listeners.push((queue.clone(), token));
        }
    }

    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut state = self.0.state.lock();
        while !state.done {
            if self
                .0
                .completed
                .wait_until(&mut state, deadline)
                .timed_out()
            {
                return state.done;
            }
        }
        true
    }

    pub fn outcome(&self) -> Option<Result<(), Error>> {
        let state = self.0.state.lock();
        if !state.done {
            return None;
        }
        Some(match &state.failure {
            None => Ok(()),
            Some(failure) => Err(failure.to_error()),
        })
    }
}
