//! What the server knows about itself: every counter for the metrics page, and the one-line
//! summary it prints every `--stats-interval`.

use driver::NetQueue;
use netstack::Stack;
use pagecache::PageCache;

use crate::conn::ServerCore;
use crate::metrics::Metric;

/// Every counter, for the metrics page.
pub(super) fn stats_snapshot<Q: NetQueue>(
    stack: &Stack<Q>,
    cache: &PageCache,
    core: &ServerCore,
    accepted: u64,
    rejected: u64,
) -> Vec<Metric> {
    let s = stack.stats();
    let c = cache.stats();
    let h = core.counters;
    vec![
        Metric::counter(
            "zerosend_http_requests_total",
            "HTTP requests parsed.",
            h.requests,
        ),
        Metric::counter(
            "zerosend_http_responses_2xx_total",
            "2xx responses.",
            h.responses_2xx,
        ),
        Metric::counter(
            "zerosend_http_responses_3xx_total",
            "3xx responses.",
            h.responses_3xx,
        ),
        Metric::counter(
            "zerosend_http_responses_4xx_total",
            "4xx responses.",
            h.responses_4xx,
        ),
        Metric::counter(
            "zerosend_http_responses_5xx_total",
            "5xx responses.",
            h.responses_5xx,
        ),
        Metric::counter("zerosend_http_puts_total", "PUT requests applied.", h.puts),
        Metric::counter(
            "zerosend_http_timeouts_total",
            "Connections closed for idleness or slowness.",
            h.timeouts,
        ),
        Metric::counter(
            "zerosend_connections_accepted_total",
            "TCP connections accepted.",
            accepted,
        ),
        Metric::counter(
            "zerosend_connections_rejected_total",
            "Connections answered 503 over --max-connections.",
            rejected,
        ),
        Metric::counter(
            "zerosend_file_bytes_sent_total",
            "File bytes transmitted (first transmission).",
            s.file_bytes_sent,
        ),
        Metric::counter(
            "zerosend_payload_bytes_sent_total",
            "Stream bytes transmitted (first transmission).",
            s.payload_bytes_sent,
        ),
        Metric::counter(
            "zerosend_payload_bytes_copied_total",
            "Payload bytes the CPU copied (zero for file data).",
            s.payload_bytes_copied,
        ),
        Metric::counter(
            "zerosend_tcp_retransmits_total",
            "TCP segments retransmitted.",
            s.retransmitted_segments,
        ),
        Metric::counter(
            "zerosend_frames_tx_total",
            "Frames handed to the NIC.",
            s.frames_tx,
        ),
        Metric::counter("zerosend_frames_rx_total", "Frames received.", s.frames_rx),
        Metric::gauge(
            "zerosend_pins_held",
            "Page-cache pins held by the stack.",
            s.pins_held_now as f64,
        ),
        Metric::gauge(
            "zerosend_pinned_pages",
            "Page-cache pages pinned now.",
            c.pinned_pages_now as f64,
        ),
        Metric::gauge(
            "zerosend_resident_pages",
            "Page-cache pages resident now.",
            c.resident_pages_now as f64,
        ),
        Metric::counter("zerosend_pins_total", "Page-cache pins taken.", c.pins),
        Metric::counter(
            "zerosend_cow_copies_total",
            "Pinned pages copied on write.",
            c.cow_copies,
        ),
        Metric::counter(
            "zerosend_writer_waits_total",
            "Writers that waited for pins.",
            c.writer_waits,
        ),
        Metric::gauge(
            "zerosend_writer_wait_seconds_total",
            "Time writers waited for pins.",
            c.writer_wait_time.as_secs_f64(),
        ),
        Metric::counter(
            "zerosend_write_timeouts_total",
            "Writes that timed out waiting for pins.",
            c.write_timeouts,
        ),
        Metric::counter("zerosend_evictions_total", "Pages evicted.", c.evictions),
        Metric::counter(
            "zerosend_audit_checks_total",
            "Pages verified at last unpin (audit mode).",
            c.audit_checks,
        ),
        Metric::counter(
            "zerosend_audit_violations_total",
            "Pages changed while pinned (must be 0).",
            c.audit_violations,
        ),
    ]
}
