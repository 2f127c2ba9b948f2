//! `zerosend serve`: the HTTP/1.1 file server's event loop, gluing the per-connection HTTP
//! state machines ([`crate::conn`]) to the network stack ([`netstack::Stack`]) over a NIC
//! bound to vfio-pci, with file bodies sent zero-copy from the stable page cache.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use driver::anynic::{open_nic, NicConfig};
use driver::dma::DmaAccess;
use driver::pcap::PcapTap;
use driver::pci::{self, PciAddress};
use driver::{NetQueue, NicModel};
use netstack::{ConnId, Event, Ipv4Config, Stack, StackConfig};
use pagecache::{Backpressure, CacheConfig, FrameArena, PageCache, WritePolicy};

use crate::conn::{Connection, Outgoing, ServerCore, MAX_QUEUED_RESPONSES};
use crate::http::{simple_response, Limits};
use crate::metrics::{render_prometheus, Metric};
use crate::root::ServeRoot;

/// Everything `zerosend serve` is told on the command line.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// PCI address, or `auto` for the first supported NIC bound to vfio-pci.
    pub nic: String,
    pub root: PathBuf,
    /// `None`: DHCP.
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub port: u16,
    pub write_policy: WritePolicy,
    pub audit: bool,
    pub pcap: Option<PathBuf>,
    pub max_connections: usize,
    pub cache_mb: usize,
    pub stats_interval: Duration,
    /// Test hook: arm a TX hang after this many frames (`driver::faults`).
    #[cfg(feature = "test-hooks")]
    pub inject_tx_hang_after_frames: Option<u64>,
}

/// Find the NIC to drive.
fn choose_nic(spec: &str) -> Result<PciAddress> {
    if spec != "auto" {
        return Ok(PciAddress::parse(spec)?);
    }
    let mut seen = Vec::new();
    for a in pci::all_devices()? {
        let Ok((v, d)) = a.ids() else { continue };
        if NicModel::from_ids(v, d).is_err() {
            continue;
        }
        if a.driver().as_deref() == Some("vfio-pci") {
            return Ok(a);
        }
        seen.push(format!(
            "{a} (driver {})",
            a.driver().unwrap_or_else(|| "none".into())
        ));
    }
    if seen.is_empty() {
        bail!("no supported NIC found (zerosend drives e1000, e1000e and virtio-net); see `zerosend probe`");
    }
    bail!(
        "no supported NIC is bound to vfio-pci: {}; bind one with scripts/vfio-bind <address>",
        seen.join(", ")
    )
}

pub fn serve(options: ServeOptions) -> Result<()> {
    let address = choose_nic(&options.nic)?;
    let nic = open_nic(&address, &NicConfig::default())
        .with_context(|| format!("opening NIC {address}"))?;
    tracing::info!(nic = %address, model = ?nic.model(), mac = %nic.mac_address(), "NIC opened");
    #[cfg(feature = "test-hooks")]
    let mut nic = nic;
    #[cfg(feature = "test-hooks")]
    if let Some(frames) = options.inject_tx_hang_after_frames {
        nic.inject_fault(driver::faults::Fault::TxHang, frames)?;
    }
    match options.pcap.clone() {
        Some(path) => {
            let tap = PcapTap::new(nic, &path)
                .with_context(|| format!("opening pcap {}", path.display()))?;
            run(tap, &options, address, true)
        }
        None => run(nic, &options, address, false),
    }
}

/// What the loop needs from a NIC beyond the queue API: flushing a capture.
trait ServerNic: NetQueue {
    fn flush_capture(&mut self) {}
}
impl ServerNic for driver::anynic::AnyNic {}
impl<Q: NetQueue> ServerNic for PcapTap<Q> {
    fn flush_capture(&mut self) {
        self.flush();
    }
}

struct ConnEntry {
    http: Connection,
    /// Response pieces not yet handed to the stack, and how much of the first was sent.
    out: VecDeque<Outgoing>,
    sent_of_first: usize,
    closed_by_us: bool,
}

fn run<Q: ServerNic>(
    nic: Q,
    options: &ServeOptions,
    address: PciAddress,
    capturing: bool,
) -> Result<()> {
    // The page cache's frames live in DMA memory mapped read-only for the NIC: the device can
    // read file pages but never change them.
    let region = nic
        .dma()
        .allocate(options.cache_mb << 20, DmaAccess::DeviceReads)
        .context("allocating the page cache's DMA memory")?;
    let arena = FrameArena::from_shared(Arc::clone(region.memory()))?;
    let cache_config = CacheConfig {
        audit: options.audit,
        backpressure: Backpressure::Wait {
            timeout: Duration::from_secs(2),
        },
        ..CacheConfig::default()
    };
    let cache = PageCache::new(arena, cache_config)?;
    let root = ServeRoot::new(&options.root)
        .with_context(|| format!("--root {}", options.root.display()))?;
    let mut core = ServerCore::new(root, cache.clone(), options.write_policy, Limits::default());

    let ipv4 = match options.ip {
        Some((ip, prefix)) => {
            Ipv4Config::static_address(ip.octets(), prefix, options.gateway.map(|g| g.octets()))
        }
        None => Ipv4Config::Dhcp,
    };
    let mut config = StackConfig::new(ipv4);
    // Room for a burst of simultaneous connection attempts (each beyond the limit still gets
    // its 503 rather than a reset).
    config.backlog = (options.max_connections + 16).min(256);
    config.tcp_tx_buffer = 512 * 1024;
    let mut stack = Stack::new(nic, config)?;
    let listener = stack.listen(options.port)?;
    let started = Instant::now();
    let mut conns: HashMap<ConnId, ConnEntry> = HashMap::new();
    let mut rejected_connections = 0u64;
    let mut accepted_connections = 0u64;
    let mut announced = false;
    let mut last_timeouts = Instant::now();
    let mut last_stats = Instant::now();
    let mut last_tx_bytes = 0u64;
    let mut recv_buf = vec![0u8; 64 * 1024];
    let mut idle_polls = 0u32;
    // Reused every poll: the loop allocates nothing per iteration once warmed up.
    let mut ids: Vec<ConnId> = Vec::new();

    loop {
        let now = Instant::now();
        let mut work = stack.poll(netstack::Instant::now())?;
        if !announced {
            if let Some(addr) = stack.ipv4_address() {
                println!(
                    "zerosend: serving {} on {}:{} (nic {address} {}, mac {}, write policy {:?}, audit {}, pcap {})",
                    core.root.path().display(),
                    addr.address(),
                    options.port,
                    stack.nic().capabilities().tso_max_frame.map(|_| "TSO").unwrap_or("no TSO"),
                    stack.nic().mac_address(),
                    options.write_policy,
                    if options.audit { "on" } else { "off" },
                    if capturing { "on" } else { "off" },
                );
                announced = true;
            }
        }
        while let Some(event) = stack.next_event() {
            work = true;
            match event {
                Event::Accepted { listener: l, conn } if l == listener => {
                    accepted_connections += 1;
                    if conns.len() >= options.max_connections {
                        // Over the limit: answer 503 and close, rather than refusing silently.
                        rejected_connections += 1;
                        let body = "503 Service Unavailable: too many connections\n";
                        let _ = stack.send(
                            conn,
                            &simple_response(503, "Service Unavailable", body, false, false),
                        );
                        let _ = stack.close(conn);
                        continue;
                    }
                    conns.insert(
                        conn,
                        ConnEntry {
                            http: Connection::new(now),
                            out: VecDeque::new(),
                            sent_of_first: 0,
                            closed_by_us: false,
                        },
                    );
                }
                Event::Closed { conn } => {
                    conns.remove(&conn);
                }
                _ => {}
            }
        }

        ids.clear();
        ids.extend(conns.keys().copied());
        for &id in &ids {
            let entry = conns.get_mut(&id).unwrap();
            // Receive what is there (bounded by what the HTTP layer will queue).
            let mut new_out = Vec::new();
            while entry.out.len() < MAX_QUEUED_RESPONSES && !entry.http.closing() {
                match stack.recv(id, &mut recv_buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        work = true;
                        entry.http.on_bytes(
                            &recv_buf[..n],
                            now,
                            entry.out.len(),
                            &mut core,
                            &mut new_out,
                        );
                        entry.out.extend(new_out.drain(..));
                    }
                    Err(_) => break,
                }
            }
            if entry.out.is_empty() && !entry.http.closing() {
                // Resume pipelined requests held back while the queue was full.
                entry.http.on_bytes(&[], now, 0, &mut core, &mut new_out);
                entry.out.extend(new_out.drain(..));
            }
            // Metrics are rendered only when a metrics response is queued.
            let metrics = if entry
                .out
                .iter()
                .any(|o| matches!(o, Outgoing::Metrics { .. }))
            {
                stats_snapshot(
                    &stack,
                    &cache,
                    &core,
                    accepted_connections,
                    rejected_connections,
                )
            } else {
                Vec::new()
            };
            work |= pump(&mut stack, id, entry, &metrics);
            let entry = conns.get_mut(&id).unwrap();
            if entry.out.is_empty() && entry.http.closing() && !entry.closed_by_us {
                let _ = stack.close(id);
                entry.closed_by_us = true;
            }
            if stack.peer_closed(id).unwrap_or(true) && entry.out.is_empty() && !entry.closed_by_us
            {
                let _ = stack.close(id);
                entry.closed_by_us = true;
            }
        }

        if now.duration_since(last_timeouts) > Duration::from_millis(500) {
            last_timeouts = now;
            for (&id, entry) in conns.iter_mut() {
                if !entry.out.is_empty() || stack.unacked(id).unwrap_or(0) > 0 {
                    // A response is still going out: the client is not idle.
                    entry.http.touch(now);
                    continue;
                }
                let (response, close) = entry.http.check_timeouts(now, &mut core);
                if let Some(bytes) = response {
                    entry.out.push_back(Outgoing::Bytes(bytes));
                }
                if close && entry.out.is_empty() && !entry.closed_by_us {
                    let _ = stack.close(id);
                    entry.closed_by_us = true;
                }
            }
        }
        if now.duration_since(last_stats) >= options.stats_interval {
            let secs = now.duration_since(last_stats).as_secs_f64();
            last_stats = now;
            stack.nic_mut().flush_capture();
            let s = stack.stats();
            let c = cache.stats();
            let tx_mbit = (s.payload_bytes_sent - last_tx_bytes) as f64 * 8.0 / secs / 1e6;
            last_tx_bytes = s.payload_bytes_sent;
            println!(
                "zerosend: stats up {:.0}s tx {tx_mbit:.1} Mbit/s conns {} (accepted {accepted_connections}, rejected {rejected_connections}) requests {} pinned {} pages cow {} waits {} retransmits {} audit {}/{} copied {} B file {} B",
                started.elapsed().as_secs_f64(),
                conns.len(),
                core.counters.requests,
                c.pinned_pages_now,
                c.cow_copies,
                c.writer_waits,
                s.retransmitted_segments,
                c.audit_checks,
                c.audit_violations,
                s.payload_bytes_copied,
                s.file_bytes_sent,
            );
        }
        if work {
            idle_polls = 0;
        } else {
            // Polling-mode NIC: spin briefly, then nap so an idle server does not burn a core.
            idle_polls += 1;
            if idle_polls > 64 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// Hand queued response pieces to the stack, in order, as far as it takes them.
fn pump<Q: NetQueue>(
    stack: &mut Stack<Q>,
    id: ConnId,
    entry: &mut ConnEntry,
    metrics: &[Metric],
) -> bool {
    let mut work = false;
    while let Some(front) = entry.out.front_mut() {
        match front {
            Outgoing::Bytes(bytes) => {
                match stack.send(id, &bytes[entry.sent_of_first..]) {
                    Ok(n) => {
                        entry.sent_of_first += n;
                        work |= n > 0;
                    }
                    Err(_) => {
                        entry.out.clear();
                        break;
                    }
                }
                if entry.sent_of_first < bytes.len() {
                    break; // the stack's buffers are full; continue next poll
                }
            }
            Outgoing::File { pin, range } => {
                if stack.send_file(id, pin, range.clone()).is_err() {
                    entry.out.clear();
                    break;
                }
                work = true;
            }
            Outgoing::Metrics {
                keep_alive,
                head_only,
            } => {
                let body = render_prometheus(metrics);
                let mut head = crate::http::ResponseHead::new(200, "OK")
                    .header("Content-Type", "text/plain; version=0.0.4")
                    .header("Content-Length", body.len())
                    .header(
                        "Connection",
                        if *keep_alive { "keep-alive" } else { "close" },
                    )
                    .finish();
                if !*head_only {
                    head.extend_from_slice(body.as_bytes());
                }
                *front = Outgoing::Bytes(head);
                continue;
            }
        }
        entry.out.pop_front();
        entry.sent_of_first = 0;
    }
    work
}

/// Every counter, for the metrics page.
fn stats_snapshot<Q: NetQueue>(
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
        Metric::counter(
            "zerosend_device_resets_total",
            "NIC faults the driver recovered from (TX hang, device reset).",
            s.device_resets,
        ),
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
