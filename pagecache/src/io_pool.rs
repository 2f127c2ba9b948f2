//! The cache's I/O threads: disk reads for cold pages (fills, read-ahead), background
//! writeback and fsync, so that non-blocking callers (the network thread) never wait for
//! the disk.
//!
//! # Why a thread pool and not io_uring
//! A handful of threads doing `preadv`/`pwritev`/`fdatasync` needs nothing but `std`, works
//! under every kernel and seccomp profile the server may run under, and keeps the unsafe
//! frame access in the `arena` module exactly as it is for the blocking paths (the same
//! `read_from_file` with the same ownership rules). io_uring would save a context switch
//! per request, but needs a new dependency or raw syscalls, buffer lifetimes the kernel
//! holds across calls (frames owned by a submission queue entry, a second ownership model),
//! and a fallback for kernels where it is disabled. The cost that matters here is the disk,
//! and sequential streaming reads are batched into multi-page `preadv`s, so a few threads
//! keep a disk busy; the pool can be swapped for io_uring later behind the same jobs.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};

use parking_lot::Mutex;

use crate::cache::CacheShared;

/// A unit of background work. It runs with a strong reference to the cache, or not at all
/// if the cache is already gone.
pub(crate) type Job = Box<dyn FnOnce(&Arc<CacheShared>) + Send>;

pub(crate) struct IoPool {
    queue: Mutex<Option<Sender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl IoPool {
    /// Starts `threads` workers (at least one). They hold only a weak reference to the cache,
    /// so that the cache can be dropped while they idle.
    pub fn start(threads: usize, cache: Weak<CacheShared>) -> Self {
        let (queue, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        let workers = (0..threads.max(1))
            .map(|i| {
                let jobs = jobs.clone();
                let cache = cache.clone();
                thread::Builder::new()
                    .name(format!("pagecache-io-{i}"))
                    .spawn(move || worker(&jobs, &cache))
                    .expect("spawning a page-cache I/O thread")
            })
            .collect();
        Self {
            queue: Mutex::new(Some(queue)),
            workers: Mutex::new(workers),
        }
    }

    /// Queues a job; returns false if the pool is shutting down (the job is dropped).
    pub fn submit(&self, job: Job) -> bool {
        match &*self.queue.lock() {
            Some(queue) => queue.send(job).is_ok(),
            None => false,
        }
    }
}

fn worker(jobs: &Mutex<Receiver<Job>>, cache: &Weak<CacheShared>) {
    loop {
        // Hold the receiver's lock only to take one job, not while running it.
        let job = jobs.lock().recv();
        let Ok(job) = job else {
            return; // the pool was dropped
        };
        let Some(cache) = cache.upgrade() else {
            return; // the cache is being dropped; nobody waits for this job
        };
        job(&cache);
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.queue.lock().take();
        let me = thread::current().id();
        for handle in self.workers.lock().drain(..) {
            // The last reference to the cache may be dropped by a worker finishing a job; it
            // cannot join itself, and it exits right after (its receive fails).
            if handle.thread().id() != me {
                let _ = handle.join();
            }
        }
    }
}
