//! One stack per core: what the cores share, and what links their queues.
//!
//! With `--queues N` (default: one per core the server may run on) the NIC is opened with N
//! queue pairs and receive-side scaling (`driver::multiqueue`): the device hashes every TCP
//! frame's addresses and ports and puts it on one queue, so a connection's frames always
//! arrive at the same queue. Each queue pair gets its own thread, pinned to a core, with its
//! own [`netstack::Stack`], listeners, connections and HTTP state: nothing on the hot path is
//! shared but the page cache (and its pins), which is built for it.
//!
//! What the cores share is here ([`Shared`]): the page cache and its DMA memory, the stop
//! flag, the PUT memory pool, each core's open-connection count (`--max-connections` is for
//! the whole server) and each core's last published counters, from which the metrics page
//! and the stats line add up all cores.
//!
//! Frames the device does not hash (ARP, ICMPv6 neighbour discovery) all arrive at queue 0.
//! Every stack needs them (a stack that never saw the client's ARP request cannot answer
//! its SYN), so queue 0 hands a copy of each to the other cores ([`CoreQueue`]), which take
//! it as if their own queue had received it.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use driver::dma::{DmaAccess, DmaRegion, DmaSpace};
use driver::irq::{Interruptible, IrqMode};
use driver::multiqueue::QueuePair;
use driver::{Capabilities, DeviceStats, MacAddress, NetQueue, RxBuffer, TxFrame, TxToken};
use pagecache::{CacheConfig, FrameArena, PageCache};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::metrics::Metric;

use super::ServeOptions;

/// How often a core publishes its counters for the others' metrics page and stats line.
pub(super) const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);
/// Frames from queue 0 waiting for one other core; beyond it they are dropped (ARP and
/// neighbour discovery retry).
const INBOX_FRAMES: usize = 64;
/// Receive-buffer slot numbers at or above this are frames handed over by queue 0.
const HANDED_OVER: u32 = 1 << 31;

/// What one core last published.
#[derive(Clone, Debug, Default)]
pub(super) struct CoreReport {
    pub summary: Summary,
    pub metrics: Vec<Metric>,
    /// When the core published it (`None`: not yet): a core whose reports stop coming
    /// (stuck, or its thread gone) is named on the stats line.
    pub published: Option<Instant>,
}

/// The figures of the stats line, per core.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Summary {
    pub payload_bytes_sent: u64,
    pub open: u64,
    pub accepted: u64,
    pub tls_accepted: u64,
    pub rejected: u64,
    pub evicted: u64,
    pub requests: u64,
    pub retransmits: u64,
    pub copied: u64,
    pub file_bytes: u64,
    pub frames_rx: u64,
    pub frames_tx: u64,
}

impl Summary {
    pub fn add(&mut self, o: &Summary) {
        self.payload_bytes_sent += o.payload_bytes_sent;
        self.open += o.open;
        self.accepted += o.accepted;
        self.tls_accepted += o.tls_accepted;
        self.rejected += o.rejected;
        self.evicted += o.evicted;
        self.requests += o.requests;
        self.retransmits += o.retransmits;
        self.copied += o.copied;
        self.file_bytes += o.file_bytes;
        self.frames_rx += o.frames_rx;
        self.frames_tx += o.frames_tx;
    }
}

/// What every core's server uses in common. Dropped after the last core's stack (each
/// `Server` holds it as its last field), so the cache's DMA mapping outlives every pin the
/// NICs may still read.
pub(super) struct Shared {
    pub cache: PageCache,
    pub stop_requested: Arc<AtomicBool>,
    /// Bytes reserved by PUT bodies being received, all cores together.
    pub put_memory: Arc<AtomicU64>,
    /// Connections open on each core, for the server-wide `--max-connections`.
    pub open: Vec<AtomicUsize>,
    /// Cores that have their listeners up; the server is announced when all have.
    pub started: AtomicUsize,
    pub reports: Vec<Mutex<CoreReport>>,
    /// When the cores were set up: the age of a core's report before its first.
    created: Instant,
    /// Every connection's TCP send buffer and pin window (`MemoryBudget::send_buffer`).
    pub send_buffer: usize,
    pub pin_window: u64,
    _cache_dma: DmaRegion,
}

impl Shared {
    /// Page cache in DMA memory of `dma` (mapped read-only for the NIC: the device can read
    /// file pages but never change them), signal handlers, one slot per core.
    pub fn new(dma: &Arc<DmaSpace>, options: &ServeOptions, cores: usize) -> anyhow::Result<Self> {
        use anyhow::Context;
        let region = dma
            .allocate(options.cache_mb << 20, DmaAccess::DeviceReads)
            .context("allocating the page cache's DMA memory")?;
        if region.page_size() == driver::dma::HUGE_PAGE_SIZE {
            println!(
                "zerosend: page cache: {} MiB in 2 MiB pages",
                options.cache_mb
            );
        } else {
            // Still correct, only dearer: a frame's payload is cut at every 4 KiB for the
            // device, and every 4 KiB is an IOMMU translation of its own.
            println!(
                "zerosend: page cache: {} MiB in 4 KiB pages (too few free 2 MiB pages; \
                 `echo {} > /proc/sys/vm/nr_hugepages` reserves enough, for fewer DMA \
                 descriptors and IOMMU lookups per frame)",
                options.cache_mb,
                options.cache_mb.div_ceil(2) + 8,
            );
        }
        let arena = FrameArena::from_shared(Arc::clone(region.memory()))?;
        let cache_config = CacheConfig {
            audit: options.audit,
            audit_verify_every: options.audit_verify_every,
            backpressure: options.backpressure,
            old_version_limit_pages: options.old_version_limit_pages,
            old_version_policy: options.old_version_policy,
            ..CacheConfig::default()
        };
        let cache = PageCache::new(arena, cache_config)?;
        let stop_requested = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            // The first signal asks for an orderly stop; a second one, with the flag still
            // set, exits at once (status 1).
            signal_hook::flag::register_conditional_shutdown(
                signal,
                1,
                Arc::clone(&stop_requested),
            )
            .context("installing the signal handlers")?;
            signal_hook::flag::register(signal, Arc::clone(&stop_requested))
                .context("installing the signal handlers")?;
        }
        let (send_buffer, pin_window) = super::MemoryBudget::send_buffer(options, cores);
        Ok(Shared {
            send_buffer,
            pin_window,
            cache,
            stop_requested,
            put_memory: Arc::default(),
            open: (0..cores).map(|_| AtomicUsize::new(0)).collect(),
            started: AtomicUsize::new(0),
            reports: (0..cores).map(|_| Mutex::default()).collect(),
            created: Instant::now(),
            _cache_dma: region,
        })
    }

    pub fn cores(&self) -> usize {
        self.open.len()
    }

    /// Connections open on every core but `core`.
    pub fn open_elsewhere(&self, core: usize) -> usize {
        self.open
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != core)
            .map(|(_, n)| n.load(Ordering::Relaxed))
            .sum()
    }

    /// Every core's stats-line figures with the age of each (`own`, fresh, for `core`; the
    /// others' last published and how long ago).
    pub fn per_core(&self, core: usize, own: Summary, now: Instant) -> Vec<(Summary, Duration)> {
        self.reports
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if i == core {
                    return (own, Duration::ZERO);
                }
                let r = r.lock().unwrap();
                let at = r.published.unwrap_or(self.created);
                (r.summary, now.saturating_duration_since(at))
            })
            .collect()
    }

    pub fn publish(&self, core: usize, report: CoreReport) {
        *self.reports[core].lock().unwrap() = report;
    }

    /// The metrics page of the whole server: `own` (fresh) for `core` and the others' last
    /// published ones, merged by [`merge_metrics`].
    pub fn metrics(&self, core: usize, own: Vec<Metric>) -> Vec<Metric> {
        if self.cores() == 1 {
            return own;
        }
        let mut all = vec![own];
        for (i, report) in self.reports.iter().enumerate() {
            if i != core {
                all.push(report.lock().unwrap().metrics.clone());
            }
        }
        merge_metrics(all)
    }
}

/// Metrics that describe the process, not a core: every core reports the same page cache
/// and process, so the merge takes the largest (freshest) value instead of adding them up.
fn is_process_wide(name: &str) -> bool {
    matches!(
        name,
        "zerosend_audit_checks_total"
            | "zerosend_audit_records_total"
            | "zerosend_audit_skipped_total"
            | "zerosend_audit_violations_total"
            | "zerosend_fills_total"
            | "zerosend_cow_copies_total"
            | "zerosend_old_version_pages"
            | "zerosend_old_version_pages_peak"
            | "zerosend_old_version_waits_total"
            | "zerosend_pinned_pages"
            | "zerosend_pinned_pages_peak"
            | "zerosend_replaced_files_held"
            | "zerosend_resident_pages"
            | "zerosend_snapshots_invalidated_total"
            | "zerosend_write_timeouts_total"
            | "zerosend_writer_wait_seconds_total"
            | "zerosend_writer_waits_total"
            | "zerosend_pin_window_bytes"
            | "zerosend_process_resident_memory_bytes"
    )
}

/// Adds up the cores' metrics sample by sample (name and label); process-wide ones (the
/// page cache, the process) are taken once. Samples of one name stay adjacent.
pub(super) fn merge_metrics(cores: Vec<Vec<Metric>>) -> Vec<Metric> {
    let mut merged: Vec<Metric> = Vec::new();
    for metrics in cores {
        for m in metrics {
            if let Some(have) = merged
                .iter_mut()
                .find(|have| have.name == m.name && have.label == m.label)
            {
                if is_process_wide(m.name) {
                    have.value = have.value.max(m.value);
                } else {
                    have.value += m.value;
                }
            } else {
                let at = merged
                    .iter()
                    .rposition(|have| have.name == m.name)
                    .map_or(merged.len(), |i| i + 1);
                merged.insert(at, m);
            }
        }
    }
    merged
}

/// Frames handed from queue 0 to one other core, and the eventfd that wakes that core if
/// it sleeps on its interrupts.
pub(super) struct Inbox {
    frames: Mutex<VecDeque<Vec<u8>>>,
    /// How many frames wait: the receiving core reads this on every `rx_next` and takes
    /// the lock only when it is non-zero (ARP is rare; the per-frame path stays lock-free).
    waiting: AtomicUsize,
    wake: EventFd,
}

impl Inbox {
    fn new() -> std::io::Result<Self> {
        Ok(Inbox {
            frames: Mutex::default(),
            waiting: AtomicUsize::new(0),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn push(&self, frame: &[u8]) {
        let mut frames = self.frames.lock().unwrap();
        if frames.len() >= INBOX_FRAMES {
            return;
        }
        frames.push_back(frame.to_vec());
        self.waiting.store(frames.len(), Ordering::Release);
        // A failed write only delays the frame to the core's next wake-up.
        let _ = self.wake.write(1);
    }

    fn pop(&self) -> Option<Vec<u8>> {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut frames = self.frames.lock().unwrap();
        let frame = frames.pop_front();
        self.waiting.store(frames.len(), Ordering::Release);
        frame
    }
}

/// Whether every stack needs a copy of this frame: ARP, and ICMPv6 (neighbour discovery,
/// router advertisements), which the device does not hash.
fn for_every_core(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x06]) => true,
        Some([0x86, 0xdd]) => frame.get(20) == Some(&58),
        _ => false,
    }
}

/// One core's queue pair: the driver's, plus the frames queue 0 hands over.
pub(super) struct CoreQueue {
    inner: Box<dyn QueuePair>,
    /// This core's frames from queue 0 (unused on queue 0).
    inbox: Arc<Inbox>,
    /// On queue 0: the other cores' inboxes.
    others: Vec<Arc<Inbox>>,
    /// Handed-over frames lent to the stack, by slot (below [`HANDED_OVER`]).
    lent: Vec<Option<Vec<u8>>>,
}

impl CoreQueue {
    /// Links the queues: queue 0 hands copies to every other one.
    pub fn link(queues: Vec<Box<dyn QueuePair>>) -> std::io::Result<Vec<CoreQueue>> {
        let inboxes = queues
            .iter()
            .map(|_| Inbox::new().map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(queues
            .into_iter()
            .enumerate()
            .map(|(i, inner)| CoreQueue {
                inner,
                inbox: Arc::clone(&inboxes[i]),
                others: if i == 0 {
                    inboxes[1..].to_vec()
                } else {
                    Vec::new()
                },
                lent: Vec::new(),
            })
            .collect())
    }

    pub fn queue_index(&self) -> usize {
        self.inner.queue_index()
    }
}

impl NetQueue for CoreQueue {
    fn mac_address(&self) -> MacAddress {
        self.inner.mac_address()
    }
    fn dma(&self) -> &Arc<DmaSpace> {
        self.inner.dma()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn link_up(&mut self) -> bool {
        self.inner.link_up()
    }
    fn tx_capacity(&self, segments: usize) -> usize {
        self.inner.tx_capacity(segments)
    }
    fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> driver::Result<()> {
        self.inner.tx_enqueue(frame)
    }
    fn tx_flush(&mut self) {
        self.inner.tx_flush()
    }
    fn tx_reap(&mut self, done: &mut dyn FnMut(TxToken)) -> driver::Result<usize> {
        self.inner.tx_reap(done)
    }
    fn rx_next(&mut self) -> Option<RxBuffer> {
        if let Some(frame) = self.inbox.pop() {
            let len = frame.len() as u32;
            let slot = match self.lent.iter().position(Option::is_none) {
                Some(free) => {
                    self.lent[free] = Some(frame);
                    free
                }
                None => {
                    self.lent.push(Some(frame));
                    self.lent.len() - 1
                }
            };
            return Some(RxBuffer {
                slot: HANDED_OVER | slot as u32,
                len,
            });
        }
        self.inner.rx_next()
    }
    fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        if buffer.slot >= HANDED_OVER {
            let frame = self.lent[(buffer.slot - HANDED_OVER) as usize]
                .as_ref()
                .expect("a handed-over frame is read while lent");
            let n = frame.len().min(out.len());
            out[..n].copy_from_slice(&frame[..n]);
            return &out[..n];
        }
        let frame = self.inner.rx_read(buffer, out);
        if !self.others.is_empty() && for_every_core(frame) {
            for inbox in &self.others {
                inbox.push(frame);
            }
        }
        frame
    }
    fn rx_recycle(&mut self, buffer: RxBuffer) {
        if buffer.slot >= HANDED_OVER {
            self.lent[(buffer.slot - HANDED_OVER) as usize] = None;
            return;
        }
        self.inner.rx_recycle(buffer)
    }
    fn rx_flush(&mut self) {
        self.inner.rx_flush()
    }
    fn stats(&mut self) -> DeviceStats {
        self.inner.stats()
    }
}

impl Interruptible for CoreQueue {
    fn irq_mode(&self) -> Option<IrqMode> {
        self.inner.irq_mode()
    }
    /// The queue's vectors, and on cores other than 0 the eventfd queue 0 signals when it
    /// hands over a frame (polled interrupts-off loops never sleep on it).
    fn irq_fds(&self) -> Vec<RawFd> {
        let mut fds = self.inner.irq_fds();
        if self.inner.queue_index() != 0 && !fds.is_empty() {
            fds.push(self.inbox.wake.as_raw_fd());
        }
        fds
    }
    fn irq_arm(&mut self) {
        self.inner.irq_arm()
    }
    fn irq_disarm(&mut self) -> u64 {
        // Non-blocking: nothing handed over reads as WouldBlock.
        let _ = self.inbox.wake.read();
        self.inner.irq_disarm()
    }
    fn irq_count(&self) -> u64 {
        self.inner.irq_count()
    }
}

/// Runs the calling thread on the `index`-th CPU it is allowed (wrapping), so each core's
/// stack keeps its caches; a failure only costs locality.
pub(super) fn pin_to_cpu(index: usize) {
    if let Some(cpus) = core_affinity::get_core_ids().filter(|c| !c.is_empty()) {
        core_affinity::set_for_current(cpus[index % cpus.len()]);
    }
}

/// When a core last published.
pub(super) struct Publisher {
    last: Instant,
}

impl Publisher {
    pub fn new() -> Self {
        Publisher {
            last: Instant::now() - PUBLISH_INTERVAL,
        }
    }

    /// Whether it is time to publish again.
    pub fn due(&mut self, now: Instant) -> bool {
        if now.duration_since(self.last) < PUBLISH_INTERVAL {
            return false;
        }
        self.last = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_add_up_per_sample_and_process_wide_ones_count_once() {
        let core = |requests: u64, code_200: u64, code_404: Option<u64>, pinned: f64| {
            let mut m = vec![
                Metric::counter("zerosend_http_requests_total", "r", requests),
                Metric::gauge("zerosend_pinned_pages", "p", pinned),
                Metric::counter("zerosend_http_responses_total", "c", code_200)
                    .with_label("code", 200),
            ];
            if let Some(n) = code_404 {
                m.push(
                    Metric::counter("zerosend_http_responses_total", "c", n)
                        .with_label("code", 404),
                );
            }
            m.push(
                Metric::counter("zerosend_queue_rx_frames_total", "q", 7)
                    .with_label("queue", requests),
            );
            m
        };
        let merged = merge_metrics(vec![core(3, 2, None, 10.0), core(5, 4, Some(1), 12.0)]);
        let value = |name: &str, label: Option<(&str, &str)>| {
            merged
                .iter()
                .find(|m| {
                    m.name == name && m.label.as_ref().map(|(k, v)| (*k, v.as_str())) == label
                })
                .map(|m| m.value)
        };
        assert_eq!(value("zerosend_http_requests_total", None), Some(8.0));
        assert_eq!(value("zerosend_pinned_pages", None), Some(12.0));
        assert_eq!(
            value("zerosend_http_responses_total", Some(("code", "200"))),
            Some(6.0)
        );
        assert_eq!(
            value("zerosend_http_responses_total", Some(("code", "404"))),
            Some(1.0)
        );
        assert_eq!(
            value("zerosend_queue_rx_frames_total", Some(("queue", "3"))),
            Some(7.0)
        );
        assert_eq!(
            value("zerosend_queue_rx_frames_total", Some(("queue", "5"))),
            Some(7.0)
        );
        // Samples of one name are adjacent (they share one HELP and TYPE).
        let names: Vec<&str> = merged.iter().map(|m| m.name).collect();
        let codes: Vec<usize> = names
            .iter()
            .enumerate()
            .filter(|(_, n)| **n == "zerosend_http_responses_total")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(codes.len(), 2);
        assert_eq!(codes[1], codes[0] + 1);
    }

    #[test]
    fn arp_and_icmpv6_go_to_every_core() {
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(for_every_core(&arp));
        let mut icmpv6 = vec![0u8; 62];
        icmpv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        icmpv6[20] = 58;
        assert!(for_every_core(&icmpv6));
        icmpv6[20] = 6;
        assert!(!for_every_core(&icmpv6));
        let mut tcp4 = vec![0u8; 54];
        tcp4[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(!for_every_core(&tcp4));
    }
}
