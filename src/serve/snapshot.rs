//! What the server knows about itself: every counter for the metrics page, and the one-line
//! summary it prints every `--stats-interval`.

use driver::NetQueue;
use netstack::Stack;
use pagecache::PageCache;

use crate::conn::ServerCore;
use crate::metrics::Metric;
use crate::warnings::WarnKind;

/// What the event loop counts itself.
#[derive(Clone, Copy, Debug)]
pub(super) struct ServerCounts {
    pub accepted: u64,
    /// Of those, HTTPS (handshake complete).
    pub tls_accepted: u64,
    /// Answered 503 over `--max-connections`.
    pub rejected: u64,
    /// Reset to make room for a new connection at `--max-connections`.
    pub evicted: u64,
    /// Connections open now.
    pub open: u64,
    pub access_log_dropped: u64,
    pub page_size: u64,
    /// Responses parked now (waiting for the page cache or the disk).
    pub parked: u64,
    /// Connections reset mid-response because the rest of a body could not be had.
    pub body_aborts: u64,
    /// `--pin-window-kb`, in bytes.
    pub pin_window: u64,
    /// The event loop's sleeps and the NIC's interrupts.
    pub idle: super::idle::LoopCounts,
    /// This core's queue pair and its counters (the driver's, per queue).
    pub queue: usize,
    pub device: driver::DeviceStats,
}

/// Every counter, for the metrics page.
pub(super) fn stats_snapshot<Q: NetQueue>(
    stack: &Stack<Q>,
    cache: &PageCache,
    core: &ServerCore,
    server: &ServerCounts,
) -> Vec<Metric> {
    let s = stack.stats();
    let c = cache.stats();
    let h = &core.counters;
    let mut metrics = vec![
        Metric::counter(
            "zerosend_http_requests_total",
            "HTTP requests parsed.",
            h.requests,
        ),
        Metric::counter(
            "zerosend_http_request_bytes_total",
            "Bytes received from clients (request heads and bodies).",
            h.request_bytes,
        ),
        Metric::counter(
            "zerosend_http_discarded_body_bytes_total",
            "Request body bytes read and thrown away (bodies of requests other than PUT).",
            h.discarded_body_bytes,
        ),
        Metric::counter(
            "zerosend_http_responses_1xx_total",
            "1xx (interim) responses.",
            h.responses_1xx,
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
            server.accepted,
        ),
        Metric::counter(
            "zerosend_connections_rejected_total",
            "Connections answered 503 over --max-connections.",
            server.rejected,
        ),
        Metric::counter(
            "zerosend_connections_evicted_total",
            "Connections waiting longest for a request, reset to make room at --max-connections.",
            server.evicted,
        ),
        Metric::gauge(
            "zerosend_put_memory_bytes",
            "Memory reserved for PUT bodies being received (bounded by --put-memory-mb).",
            core.put_memory_held() as f64,
        ),
        Metric::gauge(
            "zerosend_connections_open",
            "TCP connections open now.",
            server.open as f64,
        ),
        Metric::counter(
            "zerosend_access_log_lines_dropped_total",
            "Access-log lines dropped because the writer was behind.",
            server.access_log_dropped,
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
            "zerosend_rx_tcp_checksum_drops_total",
            "Received TCP segments (IPv4 or IPv6) whose checksum did not verify: dropped.",
            s.rx_tcp_checksum_drops,
        ),
        Metric::counter(
            "zerosend_rx_unverified_tcp_drops_total",
            "Received TCP that cannot be verified (IP fragments, IPv6 extension headers): dropped.",
            s.rx_unverified_tcp_drops,
        ),
        Metric::counter(
            "zerosend_rx_malformed_tcp_drops_total",
            "Received frames whose IP header says TCP but whose TCP header does not parse: dropped.",
            s.rx_malformed_tcp_drops,
        ),
        Metric::counter(
            "zerosend_rx_syns_over_backlog_total",
            "New connection attempts (SYNs) dropped with every listening socket taken (--listen-backlog): the client retries.",
            s.rx_syns_over_backlog,
        ),
        Metric::counter(
            "zerosend_rx_acks_superseded_total",
            "Received pure ACKs that a later cumulative ACK of the same flow, received right after, made redundant: recycled without a pass through TCP.",
            s.rx_acks_superseded,
        ),
        Metric::counter(
            "zerosend_frames_tx_total",
            "Frames handed to the NIC.",
            s.frames_tx,
        ),
        Metric::counter(
            "zerosend_tx_unmapped_drops_total",
            "Zero-copy segments dropped because their payload could not be mapped (placeholders never reach the wire; must stay 0).",
            s.tx_unmapped_drops,
        ),
        Metric::counter(
            "zerosend_tx_dropped_no_buffer_total",
            "Frames smoltcp built with no TX buffer to put them in (dropped; must stay 0).",
            s.tx_dropped_no_buffer,
        ),
        Metric::counter(
            "zerosend_send_stall_aborts_total",
            "Connections reset for acknowledging nothing within --send-stall-timeout-secs.",
            s.send_stall_aborts,
        ),
        Metric::counter(
            "zerosend_device_resets_total",
            "NIC faults the driver recovered from (TX hang, device reset).",
            s.device_resets,
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
            "zerosend_pinned_pages_peak",
            "Most page-cache pages pinned at once since start (bounded by connections x --pin-window-kb).",
            c.pinned_pages_peak as f64,
        ),
        Metric::gauge(
            "zerosend_pin_window_bytes",
            "Most bytes one connection keeps queued and unacknowledged, hence pinned (--pin-window-kb).",
            server.pin_window as f64,
        ),
        Metric::gauge(
            "zerosend_old_version_pages",
            "Page-cache frames kept for old versions that open responses still need.",
            c.old_version_pages_now as f64,
        ),
        Metric::gauge(
            "zerosend_old_version_pages_peak",
            "Most frames kept for old versions at once since start.",
            c.old_version_pages_peak as f64,
        ),
        Metric::gauge(
            "zerosend_old_version_pages_limit",
            "Bound on frames kept for old versions (--old-versions-mb).",
            cache.old_version_limit() as f64,
        ),
        Metric::counter(
            "zerosend_old_version_waits_total",
            "Writes that found the old-version bound reached.",
            c.old_version_waits,
        ),
        Metric::counter(
            "zerosend_snapshots_invalidated_total",
            "Responses whose old version could not be kept (reset, never torn).",
            c.snapshots_invalidated,
        ),
        Metric::gauge(
            "zerosend_replaced_files_held",
            "Files replaced by a PUT whose old version is still read by responses.",
            c.replaced_files_now as f64,
        ),
        Metric::gauge(
            "zerosend_responses_parked",
            "Responses waiting now for the page cache or the disk (the loop never blocks).",
            server.parked as f64,
        ),
        Metric::counter(
            "zerosend_http_parked_total",
            "Responses that had to wait for the page cache or the disk.",
            h.parked,
        ),
        Metric::counter(
            "zerosend_body_aborts_total",
            "Connections reset mid-response because the rest of the body could not be had from its version.",
            server.body_aborts,
        ),
        Metric::counter(
            "zerosend_loop_sleeps_total",
            "Times the event loop gave up the CPU when idle (naps of the polling loop, sleeps on the NIC's interrupts).",
            server.idle.sleeps,
        ),
        Metric::counter(
            "zerosend_loop_irq_wakeups_total",
            "Sleeps on the NIC's interrupts that an interrupt ended.",
            server.idle.irq_wakeups,
        ),
        Metric::counter(
            "zerosend_loop_rounds_total",
            "Rounds of the event loop (poll the stack, serve the connections).",
            server.idle.rounds,
        ),
        Metric::counter(
            "zerosend_loop_empty_rounds_total",
            "Rounds of the event loop that found nothing to do.",
            server.idle.empty_rounds,
        ),
        Metric::counter_f64(
            "zerosend_loop_empty_round_seconds_total",
            "Seconds the event loop spent in rounds that found nothing to do, sleeps excluded (busy polling that waited rather than worked).",
            server.idle.empty_round_time.as_secs_f64(),
        ),
        Metric::counter(
            "zerosend_interrupts_total",
            "Interrupts the NIC signalled through VFIO (0 when polling).",
            server.idle.interrupts,
        ),
        Metric::counter(
            "zerosend_fills_total",
            "Pages read from disk.",
            c.fills,
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
            "zerosend_audit_records_total",
            "Page versions whose crc32 was recorded at their first pin (audit mode).",
            c.audit_records,
        ),
        Metric::counter(
            "zerosend_audit_checks_total",
            "Pages verified against their recorded crc32 (audit mode: every --audit-verify-every-th release, and when a version ends).",
            c.audit_checks,
        ),
        Metric::counter(
            "zerosend_audit_skipped_total",
            "Releases of audited pins not verified (sampling, --audit-verify-every).",
            c.audit_skipped,
        ),
        Metric::counter(
            "zerosend_audit_violations_total",
            "Pages changed while pinned (must be 0).",
            c.audit_violations,
        ),
    ];
    metrics.extend([
        Metric::counter(
            "zerosend_tls_connections_accepted_total",
            "HTTPS connections accepted (TLS handshake complete).",
            server.tls_accepted,
        ),
        Metric::counter(
            "zerosend_tls_handshakes_total",
            "TLS handshakes completed.",
            s.tls_handshakes,
        ),
        Metric::counter(
            "zerosend_tls_handshake_failures_total",
            "TLS handshakes that failed (the client got an alert or a reset).",
            s.tls_handshake_failures,
        ),
        Metric::counter(
            "zerosend_tls_alerts_sent_total",
            "TLS alerts sent (close_notify included).",
            s.tls_alerts_sent,
        ),
        Metric::counter(
            "zerosend_tls_records_sealed_total",
            "TLS records encrypted (each once, from the pinned plaintext).",
            s.tls_records_sealed,
        ),
        Metric::counter(
            "zerosend_tls_bytes_sealed_total",
            "Inner plaintext bytes of the TLS records encrypted.",
            s.tls_bytes_sealed,
        ),
        Metric::counter(
            "zerosend_tls_ctr_bytes_total",
            "TLS record bytes recomputed by AES-CTR from the pins (retransmissions, records split across frames).",
            s.tls_ctr_bytes,
        ),
        Metric::counter(
            "zerosend_tls_cpu_bytes_written_total",
            "Bytes the CPU wrote to produce TLS payload (AEAD output, gathers, copies into DMA buffers).",
            s.tls_cpu_bytes_written,
        ),
        Metric::counter(
            "zerosend_tls_dma_bytes_written_total",
            "TLS bytes written into frames' DMA buffers.",
            s.tls_dma_bytes_written,
        ),
        Metric::gauge(
            "zerosend_tls_ciphertext_held_now",
            "TLS bytes in DMA buffers of frames the NIC has not completed (nothing encrypted is kept until ACK: 0 when idle).",
            s.tls_ciphertext_held_now as f64,
        ),
        Metric::counter(
            "zerosend_tls_audit_checks_total",
            "Retransmitted TLS record slices audited (--audit): the record's tag recomputed over the pinned plaintext.",
            s.tls_audit_checks,
        ),
        Metric::counter(
            "zerosend_tls_audit_mismatches_total",
            "Audited retransmissions whose plaintext no longer gave the record's tag (not sent; the connection was reset).",
            s.tls_audit_mismatches,
        ),
        Metric::counter(
            "zerosend_tls_retransmissions_total",
            "TLS frames retransmitted (rebuilt from the pins).",
            s.tls_retransmissions,
        ),
        Metric::counter(
            "zerosend_tls_records_received_total",
            "TLS records received and decrypted.",
            s.tls_records_received,
        ),
        Metric::counter(
            "zerosend_tls_key_updates_sent_total",
            "TLS KeyUpdates sent.",
            s.tls_key_updates_sent,
        ),
        Metric::counter(
            "zerosend_tls_key_updates_received_total",
            "TLS KeyUpdates received from clients.",
            s.tls_key_updates_received,
        ),
    ]);
    if let Some(rss) = crate::process::resident_bytes(server.page_size) {
        metrics.push(Metric::gauge(
            "zerosend_process_resident_memory_bytes",
            "Resident memory of the server process (from /proc/self/statm).",
            rss as f64,
        ));
    }
    metrics.extend(h.responses.iter().map(|(&code, &n)| {
        Metric::counter(
            "zerosend_http_responses_total",
            "Responses by status code (every response, 503s of the connection limit included).",
            n,
        )
        .with_label("code", code)
    }));
    let d = &server.device;
    let per_queue: [(&'static str, &'static str, u64); 6] = [
        (
            "zerosend_queue_rx_frames_total",
            "Frames received, per NIC queue pair (the driver's count).",
            d.rx_frames,
        ),
        (
            "zerosend_queue_rx_bytes_total",
            "Bytes received, per NIC queue pair.",
            d.rx_bytes,
        ),
        (
            "zerosend_queue_rx_missed_total",
            "Frames the NIC dropped for want of receive buffers, per queue pair (device-wide counts on queue 0).",
            d.rx_missed,
        ),
        (
            "zerosend_queue_tx_frames_total",
            "Frames sent, per NIC queue pair, as the driver counts them (the 82574L counts a TSO frame's wire segments, virtio-net the frame).",
            d.tx_frames,
        ),
        (
            "zerosend_queue_tx_bytes_total",
            "Bytes sent, per NIC queue pair.",
            d.tx_bytes,
        ),
        (
            "zerosend_queue_doorbells_total",
            "Doorbell writes (TX/RX tail registers, virtio notifications), per NIC queue pair: each is a trip into the device.",
            d.doorbells,
        ),
    ];
    metrics.extend(per_queue.into_iter().map(|(name, help, value)| {
        Metric::counter(name, help, value).with_label("queue", server.queue)
    }));
    metrics.extend(WarnKind::ALL.into_iter().map(|kind| {
        Metric::counter(
            "zerosend_warnings_total",
            "Situations warned about (rate-limited in the log, all counted here).",
            core.warnings.seen(kind),
        )
        .with_label("kind", kind.name())
    }));
    metrics
}
