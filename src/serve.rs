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
use driver::dma::{DmaAccess, DmaRegion};
use driver::pcap::PcapTap;
use driver::pci::{self, PciAddress};
use driver::{NetQueue, NicModel};
use netstack::{ConnId, Event, Ipv4Config, ListenerId, Stack, StackConfig};
use pagecache::{Backpressure, CacheConfig, FrameArena, PageCache, WritePolicy};

use crate::conn::{Connection, Outgoing, ServerCore, MAX_QUEUED_RESPONSES};
use crate::http::{simple_response, Limits};
use crate::metrics::{render_prometheus, Metric};
use crate::root::ServeRoot;

mod snapshot;
use snapshot::stats_snapshot;

/// Received bytes are read from the stack in chunks of this size.
const RECV_CHUNK: usize = 64 * 1024;
/// How often idle and slow connections are looked for.
const TIMEOUT_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Polls with nothing to do before the loop starts napping between polls.
const SPINS_BEFORE_NAP: u32 = 64;
/// The nap of an idle loop: short, so a new request waits at most this long.
const IDLE_NAP: Duration = Duration::from_micros(200);

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
    /// What a request that needs a page-cache frame does when all are pinned.
    pub backpressure: Backpressure,
    /// Idle keep-alive connections are closed after this long.
    pub idle_timeout: Duration,
    /// A request head (or PUT body) must arrive within this long of its first byte.
    pub request_timeout: Duration,
    pub limits: Limits,
    /// Send buffer of each TCP connection, in bytes.
    pub tcp_send_buffer: usize,
    pub audit: bool,
    pub pcap: Option<PathBuf>,
    pub max_connections: usize,
    pub cache_mb: usize,
    pub stats_interval: Duration,
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

/// One accepted connection: its HTTP state and the responses not yet handed to the stack.
struct ConnEntry {
    http: Connection,
    /// Response pieces not yet handed to the stack, and how much of the first was sent.
    out: VecDeque<Outgoing>,
    sent_of_first: usize,
    closed_by_us: bool,
}

impl ConnEntry {
    fn new(now: Instant) -> Self {
        ConnEntry {
            http: Connection::new(now),
            out: VecDeque::new(),
            sent_of_first: 0,
            closed_by_us: false,
        }
    }

    /// Close our sending half once, after everything queued.
    fn close<Q: NetQueue>(&mut self, stack: &mut Stack<Q>, id: ConnId) {
        if !self.closed_by_us {
            let _ = stack.close(id);
            self.closed_by_us = true;
        }
    }
}

/// Connection counts for the stats line and the metrics page.
#[derive(Clone, Copy, Debug, Default)]
struct ConnectionCounts {
    accepted: u64,
    /// Answered 503 over `--max-connections`.
    rejected: u64,
}

/// The server's state between polls.
struct Server<Q: NetQueue> {
    stack: Stack<Q>,
    listener: ListenerId,
    cache: PageCache,
    core: ServerCore,
    conns: HashMap<ConnId, ConnEntry>,
    counts: ConnectionCounts,
    max_connections: usize,
    recv_buf: Vec<u8>,
    /// Reused every poll: the loop allocates nothing per iteration once warmed up.
    ids: Vec<ConnId>,
    /// The page cache's DMA memory. Dropping it removes its IOMMU mapping, so it lives as
    /// long as the server and is dropped last (fields drop in order), after the stack and
    /// the cache whose pins the NIC may still be reading.
    _cache_dma: DmaRegion,
}

fn run<Q: ServerNic>(
    nic: Q,
    options: &ServeOptions,
    address: PciAddress,
    capturing: bool,
) -> Result<()> {
    let mut server = Server::start(nic, options)?;
    let mut announced = false;
    let mut stats = StatsLine::new(options.stats_interval);
    let mut last_timeouts = Instant::now();
    let mut idle = IdleBackoff::default();
    loop {
        let now = Instant::now();
        let mut work = server.stack.poll(netstack::Instant::now())?;
        if !announced {
            announced = server.announce(options, &address, capturing);
        }
        work |= server.dispatch_events(now);
        work |= server.serve_connections(now);
        if now.duration_since(last_timeouts) > TIMEOUT_CHECK_INTERVAL {
            last_timeouts = now;
            server.enforce_timeouts(now);
        }
        stats.print_when_due(now, &mut server);
        idle.after_poll(work);
    }
}

impl<Q: ServerNic> Server<Q> {
    /// Page cache in DMA memory, the HTTP core, and the stack listening on the port.
    fn start(nic: Q, options: &ServeOptions) -> Result<Self> {
        // The page cache's frames live in DMA memory mapped read-only for the NIC: the device
        // can read file pages but never change them.
        let region = nic
            .dma()
            .allocate(options.cache_mb << 20, DmaAccess::DeviceReads)
            .context("allocating the page cache's DMA memory")?;
        let arena = FrameArena::from_shared(Arc::clone(region.memory()))?;
        let cache_config = CacheConfig {
            audit: options.audit,
            backpressure: options.backpressure,
            ..CacheConfig::default()
        };
        let cache = PageCache::new(arena, cache_config)?;
        let root = ServeRoot::new(&options.root)
            .with_context(|| format!("--root {}", options.root.display()))?;
        let mut core = ServerCore::new(root, cache.clone(), options.write_policy, options.limits);
        core.idle_timeout = options.idle_timeout;
        core.request_timeout = options.request_timeout;

        let ipv4 = match options.ip {
            Some((ip, prefix)) => {
                Ipv4Config::static_address(ip.octets(), prefix, options.gateway.map(|g| g.octets()))
            }
            None => Ipv4Config::Dhcp,
        };
        let mut config = StackConfig::new(ipv4);
        // Room for a burst of simultaneous connection attempts (each beyond the limit still
        // gets its 503 rather than a reset).
        config.backlog = (options.max_connections + 16).min(256);
        config.tcp_tx_buffer = options.tcp_send_buffer;
        let mut stack = Stack::new(nic, config)?;
        let listener = stack.listen(options.port)?;
        Ok(Server {
            stack,
            listener,
            cache,
            core,
            conns: HashMap::new(),
            counts: ConnectionCounts::default(),
            max_connections: options.max_connections,
            recv_buf: vec![0u8; RECV_CHUNK],
            ids: Vec::new(),
            _cache_dma: region,
        })
    }

    /// Print the "serving" line once the interface has an address; returns whether it did.
    fn announce(&self, options: &ServeOptions, address: &PciAddress, capturing: bool) -> bool {
        let Some(addr) = self.stack.ipv4_address() else {
            return false;
        };
        let nic = self.stack.nic();
        println!(
            "zerosend: serving {} on {}:{} (nic {address} {}, mac {}, write policy {:?}, audit {}, pcap {})",
            self.core.root.path().display(),
            addr.address(),
            options.port,
            nic.capabilities().tso_max_frame.map(|_| "TSO").unwrap_or("no TSO"),
            nic.mac_address(),
            options.write_policy,
            if options.audit { "on" } else { "off" },
            if capturing { "on" } else { "off" },
        );
        true
    }

    /// New and closed connections.
    fn dispatch_events(&mut self, now: Instant) -> bool {
        let mut work = false;
        while let Some(event) = self.stack.next_event() {
            work = true;
            match event {
                Event::Accepted { listener, conn } if listener == self.listener => {
                    self.accept(conn, now);
                }
                Event::Closed { conn } => {
                    self.conns.remove(&conn);
                }
                _ => {}
            }
        }
        work
    }

    fn accept(&mut self, conn: ConnId, now: Instant) {
        self.counts.accepted += 1;
        if self.conns.len() >= self.max_connections {
            // Over the limit: answer 503 and close, rather than refusing silently.
            self.counts.rejected += 1;
            let body = "503 Service Unavailable: too many connections\n";
            let _ = self.stack.send(
                conn,
                &simple_response(503, "Service Unavailable", body, false, false),
            );
            let _ = self.stack.close(conn);
            return;
        }
        self.conns.insert(conn, ConnEntry::new(now));
    }

    /// Every connection: read requests, queue responses, hand them to the stack, close
    /// finished connections.
    fn serve_connections(&mut self, now: Instant) -> bool {
        let mut work = false;
        let mut ids = std::mem::take(&mut self.ids);
        ids.clear();
        ids.extend(self.conns.keys().copied());
        for &id in &ids {
            work |= self.serve_connection(id, now);
        }
        self.ids = ids;
        work
    }

    fn serve_connection(&mut self, id: ConnId, now: Instant) -> bool {
        let Server {
            stack,
            cache,
            core,
            conns,
            counts,
            recv_buf,
            ..
        } = self;
        let entry = conns.get_mut(&id).expect("ids are taken from conns");
        let mut work = receive_requests(stack, id, entry, recv_buf, core, now);
        // Metrics are rendered only when a metrics response is queued.
        let metrics = if entry
            .out
            .iter()
            .any(|o| matches!(o, Outgoing::Metrics { .. }))
        {
            stats_snapshot(stack, cache, core, counts.accepted, counts.rejected)
        } else {
            Vec::new()
        };
        work |= pump(stack, id, entry, &metrics);
        if entry.out.is_empty() && entry.http.closing() {
            entry.close(stack, id);
        }
        if stack.peer_closed(id).unwrap_or(true) && entry.out.is_empty() {
            entry.close(stack, id);
        }
        work
    }

    /// Close idle connections and answer slow requests with 408.
    fn enforce_timeouts(&mut self, now: Instant) {
        for (&id, entry) in self.conns.iter_mut() {
            if !entry.out.is_empty() || self.stack.unacked(id).unwrap_or(0) > 0 {
                // A response is still going out: the client is not idle.
                entry.http.touch(now);
                continue;
            }
            let (response, close) = entry.http.check_timeouts(now, &mut self.core);
            if let Some(bytes) = response {
                entry.out.push_back(Outgoing::Bytes(bytes));
            }
            if close && entry.out.is_empty() {
                entry.close(&mut self.stack, id);
            }
        }
    }
}

/// Receive what is there (bounded by what the HTTP layer will queue) and turn it into
/// responses.
fn receive_requests<Q: NetQueue>(
    stack: &mut Stack<Q>,
    id: ConnId,
    entry: &mut ConnEntry,
    recv_buf: &mut [u8],
    core: &mut ServerCore,
    now: Instant,
) -> bool {
    let mut work = false;
    let mut new_out = Vec::new();
    while entry.out.len() < MAX_QUEUED_RESPONSES && !entry.http.closing() {
        match stack.recv(id, recv_buf) {
            Ok(0) => break,
            Ok(n) => {
                work = true;
                entry
                    .http
                    .on_bytes(&recv_buf[..n], now, entry.out.len(), core, &mut new_out);
                entry.out.extend(new_out.drain(..));
            }
            Err(_) => break,
        }
    }
    if entry.out.is_empty() && !entry.http.closing() {
        // Resume pipelined requests held back while the queue was full.
        entry.http.on_bytes(&[], now, 0, core, &mut new_out);
        entry.out.extend(new_out.drain(..));
    }
    work
}

/// The periodic one-line summary on stdout.
struct StatsLine {
    interval: Duration,
    started: Instant,
    last: Instant,
    last_tx_bytes: u64,
}

impl StatsLine {
    fn new(interval: Duration) -> Self {
        let now = Instant::now();
        StatsLine {
            interval,
            started: now,
            last: now,
            last_tx_bytes: 0,
        }
    }

    fn print_when_due<Q: ServerNic>(&mut self, now: Instant, server: &mut Server<Q>) {
        if now.duration_since(self.last) < self.interval {
            return;
        }
        let secs = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        server.stack.nic_mut().flush_capture();
        let s = server.stack.stats();
        let c = server.cache.stats();
        let tx_mbit = (s.payload_bytes_sent - self.last_tx_bytes) as f64 * 8.0 / secs / 1e6;
        self.last_tx_bytes = s.payload_bytes_sent;
        let ConnectionCounts { accepted, rejected } = server.counts;
        println!(
            "zerosend: stats up {:.0}s tx {tx_mbit:.1} Mbit/s conns {} (accepted {accepted}, rejected {rejected}) requests {} pinned {} pages cow {} waits {} retransmits {} audit {}/{} copied {} B file {} B",
            self.started.elapsed().as_secs_f64(),
            server.conns.len(),
            server.core.counters.requests,
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
}

/// Polling-mode NIC: spin briefly, then nap so an idle server does not burn a core.
#[derive(Default)]
struct IdleBackoff {
    idle_polls: u32,
}

impl IdleBackoff {
    fn after_poll(&mut self, work: bool) {
        if work {
            self.idle_polls = 0;
            return;
        }
        self.idle_polls += 1;
        if self.idle_polls > SPINS_BEFORE_NAP {
            std::thread::sleep(IDLE_NAP);
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
