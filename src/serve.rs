//! `zerosend serve`: the HTTP/1.1 file server's event loop, gluing the per-connection HTTP
//! state machines ([`crate::conn`]) to the network stack ([`netstack::Stack`]) over a NIC
//! bound to vfio-pci, with file bodies sent zero-copy from the stable page cache.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use driver::anynic::{open_nic, NicConfig};
use driver::irq::Interruptible;
use driver::multiqueue::open_nic_queues;
use driver::pcap::PcapTap;
use driver::pci::{self, PciAddress};
use driver::{NetQueue, NicModel};
use netstack::{ConnId, Event, Ipv4Config, ListenerId, Stack, StackConfig};
use pagecache::{Attempt, Backpressure, PageCache, Pending, WritePolicy};

use crate::accesslog::{self, AccessLog};
use crate::conn::{
    Connection, FileBody, Outgoing, ResponseEnd, Role, ServerCore, MAX_QUEUED_RESPONSES,
};
use crate::http::{simple_response, Limits};
use crate::metrics::{render_prometheus, Metric};
use crate::openfiles::OpenFiles;
use crate::root::ServeRoot;
use crate::warnings::WarnKind;

mod cores;
mod idle;
mod snapshot;
use cores::{CoreQueue, CoreReport, Publisher, Shared, Summary};
pub use idle::IdleOptions;
use idle::{Idle, LoopCounts, Round};
use snapshot::stats_snapshot;

/// Received bytes are read from the stack in chunks of this size.
const RECV_CHUNK: usize = 64 * 1024;
/// Memory budget allowances: per connection for its entry, HTTP state and queued pieces;
/// for the whole process, allocator slack and bookkeeping (metrics, registry, log queue).
const CONNECTION_STATE: usize = 16 * 1024;
const SLACK: u64 = 16 << 20;
/// The TCP send buffer when memory allows: a single fast flow in the guest needs 2 MiB.
pub const DEFAULT_SEND_BUFFER: usize = 2 << 20;
/// The smallest send buffer `fitted_send_buffer` halves the default down to.
const MIN_FITTED_SEND_BUFFER: usize = 256 << 10;
/// A response's pin window by default: its send buffer and this much more, so that a full
/// ring never waits for the next piece to be pinned.
pub const PIN_WINDOW_BEYOND_SEND_BUFFER: u64 = 128 << 10;
/// A body is pinned in pieces of at least this much room in the pin window (or what is
/// left of it), and at most this much at a time.
const MIN_PIN_BYTES: u64 = 16 * 1024;
const MAX_PIN_BYTES: u64 = 256 * 1024;
/// How often idle and slow connections are looked for.
const TIMEOUT_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Paths each core remembers the file of (`--file-check-ms`): a few hot files are what
/// the cache is for; a scan of many distinct paths gains nothing from it.
const OPEN_FILES_CAPACITY: usize = 256;
/// How often the HTTPS certificate files are looked at for a change (two `stat`s).
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// At an orderly stop, how long the stack keeps running after the last connection: the
/// final FINs and ACKs, and resets of connections cut off at the deadline, go out.
const FINAL_FLUSH: Duration = Duration::from_millis(200);

/// Everything `zerosend serve` is told on the command line.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// PCI address, or `auto` for the first supported NIC bound to vfio-pci.
    pub nic: String,
    pub root: PathBuf,
    /// `None`: DHCP.
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    /// Plain HTTP port (`None`: HTTPS only).
    pub port: Option<u16>,
    /// HTTPS: port, rustls configuration, the certificate being served.
    pub tls: Option<crate::tls::TlsOptions>,
    /// Who may PUT.
    pub put_access: crate::conn::PutAccess,
    /// The port serving only the metrics page (`None`: no metrics page).
    pub metrics_port: Option<u16>,
    /// How long an orderly stop lets responses in flight finish.
    pub shutdown_timeout: Duration,
    pub write_policy: WritePolicy,
    /// What a request that needs a page-cache frame does when all are pinned.
    pub backpressure: Backpressure,
    /// Idle keep-alive connections are closed after this long.
    pub idle_timeout: Duration,
    /// A request head (or PUT body) must arrive within this long of its first byte.
    pub request_timeout: Duration,
    /// How long what a GET's path named is trusted (`--file-check-ms`, [`OpenFiles`]).
    pub file_check: Duration,
    pub limits: Limits,
    /// Send buffer of each TCP connection, in bytes (`None`: the default fitted to the
    /// memory available, `MemoryBudget::send_buffer`).
    pub tcp_send_buffer: Option<usize>,
    /// Most bytes a connection has queued and unacknowledged (what its response body keeps
    /// pinned); bodies are pinned piece by piece within it. `None`: the send buffer plus
    /// [`PIN_WINDOW_BEYOND_SEND_BUFFER`].
    pub pin_window: Option<u64>,
    /// Bound on page-cache frames kept for old versions (`None`: a quarter of the cache).
    pub old_version_limit_pages: Option<usize>,
    /// What a writer does at that bound.
    pub old_version_policy: pagecache::OldVersionPolicy,
    /// A connection whose client acknowledges nothing of what is outstanding for this long
    /// (a zero window, or gone) is reset and its pins released.
    pub send_stall_timeout: Duration,
    /// Listening sockets kept ready: SYNs beyond them are dropped (the client retries).
    pub listen_backlog: usize,
    /// Memory for PUT bodies being received, all connections together.
    pub put_memory: u64,
    pub audit: bool,
    /// Which AES-GCM implementation seals HTTPS records.
    pub tls_aead: netstack::tls::aead::Backend,
    /// TCP congestion control (`netstack::Congestion`).
    pub congestion: netstack::Congestion,
    /// With `audit`: verify at every Nth release (`CacheConfig::audit_verify_every`).
    pub audit_verify_every: u32,
    pub pcap: Option<PathBuf>,
    /// One line per response, to a file or stdout.
    pub access_log: Option<accesslog::Destination>,
    pub max_connections: usize,
    pub cache_mb: usize,
    pub stats_interval: Duration,
    /// Interrupts or polling when idle (`--interrupts`, `--idle-poll-us`,
    /// `--idle-max-sleep-ms`).
    pub idle: IdleOptions,
    /// Test hook: arm a TX hang after this many frames (`driver::faults`).
    #[cfg(feature = "test-hooks")]
    pub inject_tx_hang_after_frames: Option<u64>,
    /// IPv6 beside IPv4 (always on: link-local at least); see `crate::ipv6`.
    pub ipv6: netstack::Ipv6Config,
    /// Queue pairs, each with its own stack on its own core (`None`: one per CPU the
    /// process may use); see `serve::cores`.
    pub queues: Option<usize>,
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
    if !crate::process::map_large_allocations_fresh() {
        tracing::warn!("could not set the allocator's mapping threshold: closed connections' send rings may stay resident");
    }
    let address = choose_nic(&options.nic)?;
    let nic_config = NicConfig {
        interrupts: options.idle.interrupts,
        ..NicConfig::default()
    };
    let wanted = queue_count(&options);
    if wanted > 1 {
        return serve_cores(address, &nic_config, wanted, &options);
    }
    let nic = open_nic(&address, &nic_config).with_context(|| format!("opening NIC {address}"))?;
    tracing::info!(nic = %address, model = ?nic.model(), mac = %nic.mac_address(), "NIC opened");
    #[cfg(feature = "test-hooks")]
    let mut nic = nic;
    #[cfg(feature = "test-hooks")]
    if let Some(frames) = options.inject_tx_hang_after_frames {
        nic.inject_fault(driver::faults::Fault::TxHang, frames)?;
    }
    let shared = Arc::new(Shared::new(nic.dma(), &options, 1)?);
    let synced = match options.pcap.clone() {
        Some(path) => {
            let tap = PcapTap::new(nic, &path)
                .with_context(|| format!("opening pcap {}", path.display()))?;
            run(tap, &options, address, true, shared, 0)?
        }
        None => run(nic, &options, address, false, shared, 0)?,
    };
    println!("zerosend: stopped: {synced} files synced, NIC released");
    Ok(())
}

/// Queue pairs to open: `--queues`, else one per CPU the process may run on, but one when
/// more could not work (no `--ip`: DHCP configures one interface; `--pcap` captures one
/// queue), said on the console.
fn queue_count(options: &ServeOptions) -> usize {
    if let Some(n) = options.queues {
        return n;
    }
    let cpus = core_affinity::get_core_ids().map_or(1, |c| c.len().clamp(1, 64));
    if cpus > 1 && (options.ip.is_none() || options.pcap.is_some()) {
        println!(
            "zerosend: one queue pair, not one per CPU ({cpus}): {} (give --queues to choose)",
            if options.pcap.is_some() {
                "--pcap captures a single queue"
            } else {
                "DHCP configures a single queue's stack; give --ip for more"
            }
        );
        return 1;
    }
    cpus
}

/// `--queues N` with N > 1: the NIC with N queue pairs and RSS, a thread per pair pinned to
/// a core, each with its own stack, all sharing the page cache (see `serve::cores`).
fn serve_cores(
    address: PciAddress,
    nic_config: &NicConfig,
    wanted: usize,
    options: &ServeOptions,
) -> Result<()> {
    if options.pcap.is_some() {
        bail!("--pcap captures a single queue: use it with --queues 1");
    }
    if options.ip.is_none() {
        bail!(
            "--queues {wanted}: every core's stack needs the address from the start: give --ip (DHCP needs --queues 1)"
        );
    }
    let queues = open_nic_queues(&address, nic_config, wanted)
        .with_context(|| format!("opening NIC {address} with {wanted} queue pairs"))?;
    let n = queues.len();
    println!("zerosend: {n} queue pairs ({wanted} wanted), one stack per core");
    let shared = Arc::new(Shared::new(queues[0].dma(), options, n)?);
    let mut threads = Vec::new();
    let queues = CoreQueue::link(queues).context("creating the cores' wake-up eventfds")?;
    for queue in queues {
        let shared = Arc::clone(&shared);
        let options = options.clone();
        let index = queue.queue_index();
        let address = address.clone();
        let thread = std::thread::Builder::new()
            .name(format!("zerosend-core{index}"))
            .spawn(move || {
                cores::pin_to_cpu(index);
                let result = run(queue, &options, address, false, Arc::clone(&shared), index);
                if result.is_err() {
                    // The other cores stop in order too.
                    shared.stop_requested.store(true, Ordering::Relaxed);
                }
                result
            })
            .context("starting a core's thread")?;
        threads.push(thread);
    }
    let mut synced = 0;
    let mut failure = None;
    for thread in threads {
        match thread.join() {
            Ok(Ok(files)) => synced += files,
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert(anyhow!("a core's thread panicked"));
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    println!("zerosend: stopped: {synced} files synced, NIC released");
    Ok(())
}

/// What the loop needs from a NIC beyond the queue API: its interrupts, flushing a capture.
trait ServerNic: NetQueue + Interruptible {
    fn flush_capture(&mut self) {}
}
impl ServerNic for driver::anynic::AnyNic {}
impl ServerNic for CoreQueue {}
impl<Q: NetQueue + Interruptible> ServerNic for PcapTap<Q> {
    fn flush_capture(&mut self) {
        self.flush();
    }
}

/// One accepted connection: its HTTP state and the responses not yet handed to the stack.
struct ConnEntry {
    http: Connection,
    /// The connection's number (the first accepted is 1), for the access log.
    serial: u64,
    /// Response pieces not yet handed to the stack, and how much of the first was sent.
    out: VecDeque<Outgoing>,
    sent_of_first: usize,
    /// Responses in `out` (its [`Outgoing::End`]s).
    queued_responses: usize,
    /// The next piece of the body being sent is not ready (being read, or frames short).
    body_wait: Option<Pending>,
    /// Stream bytes handed to the stack so far, and where the response being handed over
    /// started.
    stream_queued: u64,
    response_start: u64,
    /// Stream bytes the client acknowledged, as of the last look.
    stream_acked: u64,
    /// Responses handed over whose access-log lines wait for the client's acknowledgement
    /// (empty when the access log is off).
    unacknowledged: VecDeque<Unacknowledged>,
    closed_by_us: bool,
    /// The client's address, for the access log (read at accept: a closed connection no
    /// longer has one).
    peer: Option<std::net::SocketAddr>,
}

/// A response in the stream, and what its access-log line says.
struct Unacknowledged {
    stream: Range<u64>,
    end: ResponseEnd,
}

impl ConnEntry {
    fn new(serial: u64, role: Role, now: Instant) -> Self {
        ConnEntry {
            http: Connection::with_role(role, now),
            serial,
            out: VecDeque::new(),
            sent_of_first: 0,
            queued_responses: 0,
            body_wait: None,
            stream_queued: 0,
            response_start: 0,
            stream_acked: 0,
            unacknowledged: VecDeque::new(),
            closed_by_us: false,
            peer: None,
        }
    }

    /// Append response pieces the HTTP layer produced.
    fn queue(&mut self, pieces: &mut Vec<Outgoing>) {
        self.queued_responses += pieces
            .iter()
            .filter(|p| matches!(p, Outgoing::End(_)))
            .count();
        self.out.extend(pieces.drain(..));
    }

    /// The stack refuses more (the connection is going away): drop what is queued, keeping
    /// the access-log records of its responses.
    fn abandon_queued(&mut self, logging: bool) {
        let at = self.stream_queued;
        for piece in self.out.drain(..) {
            if let (Outgoing::End(end), true) = (piece, logging) {
                self.unacknowledged.push_back(Unacknowledged {
                    stream: at..at,
                    end,
                });
            }
        }
        self.queued_responses = 0;
        self.sent_of_first = 0;
        self.body_wait = None;
    }

    /// Close our sending half once, after everything queued.
    fn close<Q: NetQueue>(&mut self, stack: &mut Stack<Q>, id: ConnId) {
        if !self.closed_by_us {
            let _ = stack.close(id);
            self.closed_by_us = true;
        }
    }

    /// Log the responses the client has acknowledged in full; when the connection is
    /// `finished`, every response left, with the bytes that did get acknowledged.
    fn log_acknowledged<Q: NetQueue>(
        &mut self,
        stack: &Stack<Q>,
        id: ConnId,
        log: &mut AccessLog,
        now: Instant,
        finished: bool,
    ) {
        if let Ok(unacked) = stack.unacked(id) {
            self.stream_acked = self.stream_queued.saturating_sub(unacked);
        }
        if finished {
            // Responses never handed to the stack: nothing of them reached the client.
            self.abandon_queued(true);
        }
        while let Some(front) = self.unacknowledged.front() {
            if !finished && front.stream.end > self.stream_acked {
                break;
            }
            let Unacknowledged { stream, end } = self.unacknowledged.pop_front().unwrap();
            log.record(&accesslog::Entry {
                at: SystemTime::now(),
                client: self.peer,
                connection: self.serial,
                request_line: end.request_line.as_deref(),
                status: end.status,
                bytes: self.stream_acked.clamp(stream.start, stream.end) - stream.start,
                duration: now.saturating_duration_since(end.started),
            });
        }
    }
}

/// Connection counts for the stats line and the metrics page.
#[derive(Clone, Copy, Debug, Default)]
struct ConnectionCounts {
    accepted: u64,
    /// Of those, over TLS (counted when the handshake is complete).
    tls_accepted: u64,
    /// Answered 503 over `--max-connections`.
    rejected: u64,
    /// Reset to make room for a new connection at `--max-connections`.
    evicted: u64,
    /// Reset mid-response because the rest of a body could not be had (see `send_body`).
    body_aborts: u64,
}

/// The server's state between polls.
struct Server<Q: NetQueue> {
    stack: Stack<Q>,
    /// The plain HTTP and the HTTPS listeners (either may be off, not both).
    listener: Option<ListenerId>,
    tls_listener: Option<ListenerId>,
    /// Serves only the metrics page (`--metrics-listen`).
    metrics_listener: Option<ListenerId>,
    /// An orderly stop is under way, to be over by this instant.
    draining_until: Option<Instant>,
    /// The HTTPS certificate, re-read when its files change.
    tls_certificate: Option<Arc<crate::tls::Certificates>>,
    cache: PageCache,
    core: ServerCore,
    conns: HashMap<ConnId, ConnEntry>,
    counts: ConnectionCounts,
    max_connections: usize,
    recv_buf: Vec<u8>,
    /// Reused every poll: the loop allocates nothing per iteration once warmed up.
    ids: Vec<ConnId>,
    access_log: Option<AccessLog>,
    /// For the resident-memory gauge.
    page_size: u64,
    /// The loop's sleeps and the NIC's interrupts, as of the last round.
    loop_counts: LoopCounts,
    /// Most bytes queued and unacknowledged per connection, hence pinned by its body.
    pin_window: u64,
    /// This server's core (its queue pair) and when it last published its counters.
    core_index: usize,
    publisher: Publisher,
    /// What the cores share: the page cache and its DMA memory, whose IOMMU mapping goes
    /// with the last `Shared`, so it is dropped last (fields drop in order), after the stack
    /// and the cache whose pins the NIC may still be reading.
    shared: Arc<Shared>,
}

/// One core's event loop until the orderly stop; returns the files synced at the end.
fn run<Q: ServerNic>(
    nic: Q,
    options: &ServeOptions,
    address: PciAddress,
    capturing: bool,
    shared: Arc<Shared>,
    core_index: usize,
) -> Result<usize> {
    let mut server = Server::start(nic, options, shared, core_index)?;
    server.shared.started.fetch_add(1, Ordering::Relaxed);
    // Core 0 speaks for the server, once every core listens.
    let mut announced = core_index != 0;
    let mut stats = StatsLine::new(options.stats_interval);
    let mut last_timeouts = Instant::now();
    let mut last_cert_check = Instant::now();
    let mut idle = Idle::new(options.idle, server.stack.nic())?;
    if core_index == 0 {
        println!("zerosend: when idle: {}", idle.describe());
    }
    loop {
        let now = Instant::now();
        let mut work = server.stack.poll(netstack::Instant::now())?;
        if !announced && server.shared.started.load(Ordering::Relaxed) == server.shared.cores() {
            announced = server.announce(options, &address, capturing);
        }
        work |= server.dispatch_events(now);
        work |= server.serve_connections(now);
        if now.duration_since(last_timeouts) > TIMEOUT_CHECK_INTERVAL {
            last_timeouts = now;
            server.enforce_timeouts(now);
        }
        if now.duration_since(last_cert_check) > CERT_CHECK_INTERVAL {
            last_cert_check = now;
            server.reload_certificate();
        }
        server.shared.open[core_index].store(server.conns.len(), Ordering::Relaxed);
        if server.shared.cores() > 1 && server.publisher.due(now) {
            server.publish();
        }
        if core_index == 0 {
            stats.print_when_due(now, &mut server);
        }
        if server.shared.stop_requested.load(Ordering::Relaxed) && server.drained(now, options) {
            break;
        }
        let round = Round {
            work,
            must_poll: !work && server.waits_for_cache(),
            next_timer: if work {
                None
            } else {
                server
                    .stack
                    .poll_delay(netstack::Instant::now())
                    .map(|d| Duration::from_micros(d.total_micros()))
            },
        };
        idle.after_round(server.stack.nic_mut(), round);
        server.loop_counts = idle.counts;
    }
    server.stop()
}

impl<Q: ServerNic> Server<Q> {
    /// Page cache in DMA memory, the HTTP core, and the stack listening on the port.
    fn start(
        nic: Q,
        options: &ServeOptions,
        shared: Arc<Shared>,
        core_index: usize,
    ) -> Result<Self> {
        let cache = shared.cache.clone();
        let root = ServeRoot::new(&options.root)
            .with_context(|| format!("--root {}", options.root.display()))?;
        let mut core = ServerCore::new(root, cache.clone(), options.write_policy, options.limits);
        core.idle_timeout = options.idle_timeout;
        core.request_timeout = options.request_timeout;
        core.open_files = OpenFiles::new(options.file_check, OPEN_FILES_CAPACITY);
        let access_log = match &options.access_log {
            Some(destination) => Some(
                AccessLog::open(destination)
                    .with_context(|| format!("--access-log {destination}"))?,
            ),
            None => None,
        };
        core.record_request_lines = access_log.is_some();
        core.put_memory_limit = options.put_memory;
        core.share_put_memory(Arc::clone(&shared.put_memory));
        core.put_access = options.put_access.clone();

        let ipv4 = match options.ip {
            Some((ip, prefix)) => {
                Ipv4Config::static_address(ip.octets(), prefix, options.gateway.map(|g| g.octets()))
            }
            None => Ipv4Config::Dhcp,
        };
        let mut config = StackConfig::new(ipv4);
        config.ipv6 = options.ipv6;
        // Room for a burst of simultaneous connection attempts (each beyond the limit still
        // gets its 503 rather than a reset). Idle listening sockets cost address space, not
        // memory: their buffers are untouched until used.
        config.backlog = options.listen_backlog.max(1);
        config.tcp_tx_buffer = shared.send_buffer;
        // `--audit` covers HTTPS too: a retransmitted record slice must recompute to the
        // record's kept tag (a changed pinned page would re-encrypt under the same nonce).
        config.tls.audit = options.audit;
        config.tls.backend = options.tls_aead;
        config.congestion = options.congestion;
        config.send_stall_timeout = Some(netstack::Duration::from_micros(
            options.send_stall_timeout.as_micros() as u64,
        ));
        let mut stack = Stack::new(nic, config)?;
        let listener = options.port.map(|port| stack.listen(port)).transpose()?;
        let tls_listener = match &options.tls {
            Some(tls) => Some(
                stack
                    .listen_tls(tls.port, Arc::clone(&tls.config))
                    .with_context(|| format!("HTTPS on port {}", tls.port))?,
            ),
            None => None,
        };
        if listener.is_none() && tls_listener.is_none() {
            bail!("nothing to serve: --no-plain-http needs --tls-cert and --tls-key");
        }
        let metrics_listener = options
            .metrics_port
            .map(|port| stack.listen(port))
            .transpose()
            .context("--metrics-listen")?;
        let page_size = crate::process::page_size();
        if core_index == 0 {
            let resident = crate::process::resident_bytes(page_size)
                .unwrap_or((options.cache_mb as u64) << 20);
            let budget = MemoryBudget::compute(&stack, options, resident, shared.cores());
            println!("zerosend: memory budget: {budget}");
            let beyond_setup = budget.total() - budget.baseline;
            if let Some(available) = crate::process::available_bytes() {
                if available < beyond_setup {
                    println!(
                        "zerosend: warning: under full load the server may need {} MiB more, but this machine has {} MiB available: lower --max-connections or --tcp-send-buffer-kb, or the kernel may kill the server",
                        beyond_setup >> 20,
                        available >> 20
                    );
                }
            }
        }
        Ok(Server {
            stack,
            listener,
            tls_listener,
            metrics_listener,
            draining_until: None,
            tls_certificate: options.tls.as_ref().map(|t| Arc::clone(&t.certificate)),
            cache,
            core,
            conns: HashMap::new(),
            counts: ConnectionCounts::default(),
            max_connections: options.max_connections,
            recv_buf: vec![0u8; RECV_CHUNK],
            ids: Vec::new(),
            access_log,
            page_size: crate::process::page_size(),
            loop_counts: LoopCounts::default(),
            pin_window: shared.pin_window,
            core_index,
            publisher: Publisher::new(),
            shared,
        })
    }

    /// Whether a connection waits for something with no file descriptor, which only
    /// polling notices: the page cache (a parked response, a body piece being read or
    /// short of frames), the upload thread (a PUT publishing, or a PUT body waiting for
    /// room in `--put-memory-mb`: `waiting_since` is `None` while a body is received).
    fn waits_for_cache(&self) -> bool {
        self.conns.values().any(|e| {
            e.body_wait.is_some()
                || e.http.is_parked()
                || (e.http.waiting_since().is_none() && !e.http.closing() && !e.http.held_back())
        })
    }

    /// Print the "serving" line once the interface has an address; returns whether it did.
    fn announce(&self, options: &ServeOptions, address: &PciAddress, capturing: bool) -> bool {
        let Some(addr) = self.stack.ipv4_address() else {
            return false;
        };
        let nic = self.stack.nic();
        // `on ADDR:PORT` for each listener, HTTPS marked: tools read the address from it.
        let ip = addr.address();
        let on = [
            options.port.map(|p| format!("{ip}:{p}")),
            options
                .tls
                .as_ref()
                .map(|t| format!("{ip}:{} (https)", t.port)),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" and ");
        println!(
            "zerosend: serving {} on {on} (nic {address} {}, mac {}, write policy {:?}, audit {}, pcap {})",
            self.core.root.path().display(),
            nic.capabilities().tso_max_frame.map(|_| "TSO").unwrap_or("no TSO"),
            nic.mac_address(),
            options.write_policy,
            if options.audit { "on" } else { "off" },
            if capturing { "on" } else { "off" },
        );
        let ports = [
            options.port.map(|p| (p, false)),
            options.tls.as_ref().map(|t| (t.port, true)),
        ];
        let ports: Vec<_> = ports.into_iter().flatten().collect();
        println!(
            "{}",
            crate::ipv6::announce(&self.stack.ipv6_addresses(), &ports)
        );
        true
    }

    /// The orderly stop after SIGTERM/SIGINT: the first call starts it (idle connections
    /// close, the others finish the request in progress); true once every connection has
    /// closed with its responses acknowledged, or at the deadline (`--shutdown-timeout-secs`),
    /// when those left are reset.
    fn drained(&mut self, now: Instant, options: &ServeOptions) -> bool {
        let deadline = match self.draining_until {
            Some(deadline) => deadline,
            None => {
                let deadline = now + options.shutdown_timeout;
                self.draining_until = Some(deadline);
                println!(
                    "zerosend: stopping: {} connections to finish (up to {} s; a second signal stops at once)",
                    self.conns.len(),
                    options.shutdown_timeout.as_secs()
                );
                for entry in self.conns.values_mut() {
                    entry.http.drain();
                }
                deadline
            }
        };
        let stack = &self.stack;
        let finished = |id: &ConnId, entry: &ConnEntry| {
            entry.closed_by_us && entry.out.is_empty() && stack.unacked(*id).unwrap_or(0) == 0
        };
        if self.conns.iter().all(|(id, e)| finished(id, e)) {
            return true;
        }
        if now < deadline {
            return false;
        }
        let unfinished: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(id, e)| !finished(id, e))
            .map(|(id, _)| *id)
            .collect();
        println!(
            "zerosend: stopping: {} connections still busy after {} s: reset",
            unfinished.len(),
            options.shutdown_timeout.as_secs()
        );
        for id in unfinished {
            let _ = self.stack.abort(id);
        }
        true
    }

    /// After the orderly stop's connections: send what is left (FINs, resets), make the
    /// dirty pages durable, then release the NIC (dropping the stack) and the cache memory.
    fn stop(mut self) -> Result<usize> {
        let until = Instant::now() + FINAL_FLUSH;
        while Instant::now() < until {
            if !self.stack.poll(netstack::Instant::now())? {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.stack.nic_mut().flush_capture();
        if self.shared.cores() > 1 {
            self.publish();
        }
        let synced = self.cache.sync_all();
        let Server { stack, cache, .. } = self;
        drop(stack);
        drop(cache);
        synced.map_err(|e| anyhow::Error::new(e).context("writing back dirty pages at stop"))
    }

    /// This core's counters for the stats line.
    fn summary(&self) -> Summary {
        let s = self.stack.stats();
        Summary {
            payload_bytes_sent: s.payload_bytes_sent,
            open: self.conns.len() as u64,
            accepted: self.counts.accepted,
            tls_accepted: self.counts.tls_accepted,
            rejected: self.counts.rejected,
            evicted: self.counts.evicted,
            requests: self.core.counters.requests,
            retransmits: s.retransmitted_segments,
            copied: s.payload_bytes_copied,
            file_bytes: s.file_bytes_sent,
            frames_rx: s.frames_rx,
            frames_tx: s.frames_tx,
        }
    }

    /// This core's metrics (the page cache's included).
    fn own_metrics(&mut self) -> Vec<Metric> {
        let server = snapshot::ServerCounts {
            accepted: self.counts.accepted,
            tls_accepted: self.counts.tls_accepted,
            rejected: self.counts.rejected,
            evicted: self.counts.evicted,
            open: self.conns.len() as u64,
            access_log_dropped: self.access_log.as_ref().map_or(0, AccessLog::dropped),
            page_size: self.page_size,
            parked: self.conns.values().filter(|e| e.http.is_parked()).count() as u64,
            body_aborts: self.counts.body_aborts,
            pin_window: self.pin_window,
            idle: self.loop_counts,
            queue: self.core_index,
            device: self.stack.nic_mut().stats(),
        };
        stats_snapshot(&self.stack, &self.cache, &self.core, &server)
    }

    /// Hands this core's counters to the others (their metrics page and stats line).
    fn publish(&mut self) {
        let report = CoreReport {
            summary: self.summary(),
            metrics: self.own_metrics(),
            published: Some(Instant::now()),
        };
        self.shared.publish(self.core_index, report);
    }

    /// New and closed connections.
    fn dispatch_events(&mut self, now: Instant) -> bool {
        let mut work = false;
        while let Some(event) = self.stack.next_event() {
            work = true;
            match event {
                // The HTTP layer does not care how the bytes came: after the handshake a TLS
                // connection's recv/send/send_file/close carry plaintext, as for TCP.
                // Stopping: new connections are refused (reset), as a closed port would.
                Event::Accepted { conn, .. } if self.draining_until.is_some() => {
                    let _ = self.stack.abort(conn);
                    let _ = self.stack.release(conn);
                }
                Event::Accepted { listener, conn } if Some(listener) == self.listener => {
                    self.accept(conn, Role::Files, now);
                }
                Event::Accepted { listener, conn } if Some(listener) == self.tls_listener => {
                    self.counts.tls_accepted += 1;
                    self.accept(conn, Role::Files, now);
                }
                Event::Accepted { listener, conn } if Some(listener) == self.metrics_listener => {
                    self.accept(conn, Role::Metrics, now);
                }
                Event::Closed { conn } => {
                    if let Some(mut entry) = self.conns.remove(&conn) {
                        if let Some(log) = &mut self.access_log {
                            entry.log_acknowledged(&self.stack, conn, log, now, true);
                        }
                    }
                    // Done with the handle: its socket and buffers go back at once, unread
                    // data or not.
                    let _ = self.stack.release(conn);
                }
                _ => {}
            }
        }
        work
    }

    fn accept(&mut self, conn: ConnId, role: Role, now: Instant) {
        self.counts.accepted += 1;
        let open = self.conns.len() + self.shared.open_elsewhere(self.core_index);
        if open >= self.max_connections && !self.evict_longest_waiting(now) {
            self.reject(conn, now);
            return;
        }
        let mut entry = ConnEntry::new(self.counts.accepted, role, now);
        entry.peer = self
            .stack
            .remote_endpoint(conn)
            .ok()
            .flatten()
            .map(|(ip, port)| std::net::SocketAddr::from((ip, port)));
        self.conns.insert(conn, entry);
    }

    /// Serve a changed HTTPS certificate to new connections; a bad new pair (say the
    /// certificate replaced and its key not yet) is warned about and the old one kept.
    fn reload_certificate(&mut self) {
        let Some(cert) = &self.tls_certificate else {
            return;
        };
        match cert.reload_if_changed() {
            Ok(true) => tracing::info!("TLS certificate reloaded"),
            Ok(false) => {}
            Err(e) => tracing::warn!("TLS certificate not reloaded, keeping the old one: {e:#}"),
        }
    }

    /// At the connection limit, a new client takes the place of the connection that has
    /// waited longest for a request of its own (idle, or sending its head byte by byte):
    /// slow clients cannot keep others out by holding every slot. Connections with a
    /// response or a body in progress are never evicted. Returns whether one was.
    fn evict_longest_waiting(&mut self, now: Instant) -> bool {
        let stack = &self.stack;
        // Connections we are already closing go first, then the longest waiting.
        let victim = self
            .conns
            .iter()
            .filter_map(|(id, e)| {
                if e.closed_by_us {
                    return Some(((0, now), *id));
                }
                let idle = e.out.is_empty() && stack.unacked(*id).unwrap_or(0) == 0;
                Some(((1, e.http.waiting_since().filter(|_| idle)?), *id))
            })
            .min_by_key(|(key, _)| *key);
        let Some((_, victim)) = victim else {
            return false;
        };
        self.counts.evicted += 1;
        self.core.warnings.warn(
            WarnKind::ServiceUnavailable,
            now,
            "connection limit: evicted the longest-waiting connection",
        );
        let _ = self.stack.release(victim);
        self.conns.remove(&victim);
        true
    }

    /// Over the connection limit: answer 503 and close, rather than refusing silently.
    fn reject(&mut self, conn: ConnId, now: Instant) {
        self.counts.rejected += 1;
        self.core.counters.count(503);
        self.core
            .warnings
            .warn(WarnKind::ServiceUnavailable, now, "too many connections");
        let body = "503 Service Unavailable: too many connections\n";
        let response = simple_response(503, "Service Unavailable", body, false, false);
        let client = self
            .stack
            .remote_endpoint(conn)
            .ok()
            .flatten()
            .map(|(ip, port)| std::net::SocketAddr::from((ip, port)));
        let sent = self.stack.send(conn, &response).unwrap_or(0);
        let _ = self.stack.close(conn);
        if let Some(log) = &mut self.access_log {
            log.record(&accesslog::Entry {
                at: SystemTime::now(),
                client,
                connection: self.counts.accepted,
                request_line: None,
                status: 503,
                bytes: sent as u64,
                duration: Duration::ZERO,
            });
        }
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
        let entry = self.conns.get_mut(&id).expect("ids are taken from conns");
        let mut work = receive_requests(
            &mut self.stack,
            id,
            entry,
            &mut self.recv_buf,
            &mut self.core,
            now,
        );
        // Metrics are rendered only when a metrics response is queued: this core's, and
        // with several cores what the others last published, added up.
        let wants_metrics = entry
            .out
            .iter()
            .any(|o| matches!(o, Outgoing::Metrics { .. }));
        let metrics = if wants_metrics {
            let own = self.own_metrics();
            self.shared.metrics(self.core_index, own)
        } else {
            Vec::new()
        };
        let Server {
            stack,
            conns,
            counts,
            access_log,
            pin_window,
            ..
        } = self;
        let entry = conns.get_mut(&id).expect("ids are taken from conns");
        let how = Pumping {
            metrics: &metrics,
            logging: access_log.is_some(),
            window: *pin_window,
            now,
        };
        work |= pump(stack, id, entry, &how, &mut counts.body_aborts);
        if let Some(log) = access_log {
            entry.log_acknowledged(stack, id, log, now, false);
        }
        // Close once everything received is answered: when HTTP says so, or when the peer
        // has finished sending (a half-closed pipeline is still answered in full).
        let peer_done = stack.peer_closed(id).unwrap_or(true) && !entry.http.held_back();
        if entry.out.is_empty() && (entry.http.closing() || peer_done) {
            entry.close(stack, id);
        }
        work
    }

    /// Close idle connections and clients that stopped taking responses; answer slow
    /// requests with 408.
    fn enforce_timeouts(&mut self, now: Instant) {
        let Server {
            stack, core, conns, ..
        } = self;
        // Replaced files' old versions are not kept alive by the path cache.
        core.open_files.sweep(now);
        let mut pieces = Vec::new();
        // (A client that stops taking what is sent is reset by the stack's send-stall
        // timeout, `--send-stall-timeout-secs`.)
        for (&id, entry) in conns.iter_mut() {
            let unacked = stack.unacked(id).unwrap_or(0);
            if !entry.out.is_empty() || unacked > 0 {
                // A response is still going out: the client is not idle.
                entry.http.touch(now);
                continue;
            }
            let close = entry.http.check_timeouts(now, core, &mut pieces);
            entry.queue(&mut pieces);
            if close && entry.out.is_empty() {
                entry.close(stack, id);
            }
        }
        core.warnings.flush(now);
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
    let mut pieces = Vec::new();
    // Parked responses and held-back requests go on before more is read: what is buffered
    // stays bounded.
    if entry.http.held_back() && entry.queued_responses < MAX_QUEUED_RESPONSES {
        let queued = entry.queued_responses;
        entry.http.on_bytes(&[], now, queued, core, &mut pieces);
        work |= !pieces.is_empty();
        entry.queue(&mut pieces);
    }
    while entry.queued_responses < MAX_QUEUED_RESPONSES && entry.http.wants_input() {
        match stack.recv(id, recv_buf) {
            Ok(0) => break,
            Ok(n) => {
                work = true;
                let queued = entry.queued_responses;
                entry
                    .http
                    .on_bytes(&recv_buf[..n], now, queued, core, &mut pieces);
                entry.queue(&mut pieces);
            }
            Err(_) => break,
        }
    }
    work
}

/// The periodic one-line summary on stdout.
/// A core whose last report (published every 100 ms from its loop) is older than this is
/// named on the stats line: its loop has stopped going round.
const CORE_STALL_WARNING: Duration = Duration::from_secs(2);

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
        // All cores: this one's fresh figures, the others' last published.
        let per_core = server
            .shared
            .per_core(server.core_index, server.summary(), now);
        let mut t = Summary::default();
        for (core, _) in &per_core {
            t.add(core);
        }
        let c = server.cache.stats();
        let tx_mbit =
            t.payload_bytes_sent.saturating_sub(self.last_tx_bytes) as f64 * 8.0 / secs / 1e6;
        self.last_tx_bytes = t.payload_bytes_sent;
        println!(
            "zerosend: stats up {:.0}s tx {tx_mbit:.1} Mbit/s conns {} (accepted {}, tls {}, rejected {}, evicted {}) requests {} pinned {} pages cow {} waits {} retransmits {} audit {}/{} copied {} B file {} B",
            self.started.elapsed().as_secs_f64(),
            t.open,
            t.accepted,
            t.tls_accepted,
            t.rejected,
            t.evicted,
            t.requests,
            c.pinned_pages_now,
            c.cow_copies,
            c.writer_waits,
            t.retransmits,
            c.audit_checks,
            c.audit_violations,
            t.copied,
            t.file_bytes,
        );
        if per_core.len() > 1 {
            let mut line = String::from("zerosend: stats per core:");
            for (i, (s, age)) in per_core.iter().enumerate() {
                line.push_str(&format!(
                    " [{i}] conns {} rx {} tx {} frames",
                    s.open, s.frames_rx, s.frames_tx
                ));
                if *age > CORE_STALL_WARNING {
                    line.push_str(&format!(
                        " NOT RUNNING (last report {:.1} s ago)",
                        age.as_secs_f64()
                    ));
                }
            }
            println!("{line}");
        }
    }
}

/// Why a body stopped.
enum BodyError {
    /// The stack refuses more (the connection is going away).
    Connection,
    /// The page cache cannot give the rest of the snapshot.
    Cache(pagecache::Error),
}

/// Pins and hands over as much of a body as the connection's pin window allows: bytes
/// queued on the connection and not yet acknowledged (what holds pins) stay under `window`.
/// Returns whether the body is all handed over; `false` when the window is full or the next
/// piece is pending (`wait`: retried when ready or past its deadline).
fn send_body<Q: NetQueue>(
    stack: &mut Stack<Q>,
    id: ConnId,
    body: &mut FileBody,
    queued: &mut u64,
    window: u64,
    wait: &mut Option<Pending>,
    now: Instant,
) -> Result<bool, BodyError> {
    if let Some(pending) = wait {
        if !pending.is_ready() && pending.deadline().is_none_or(|d| now < d) {
            return Ok(false);
        }
        *wait = None;
    }
    let hand_over = |stack: &mut Stack<Q>, queued: &mut u64, pin: &pagecache::Pin| {
        stack
            .send_file(id, pin, pin.range())
            .map_err(|_| BodyError::Connection)?;
        *queued += pin.len();
        Ok(())
    };
    if let Some(first) = body.first.take() {
        hand_over(stack, queued, &first)?;
    }
    while body.snapshot.remaining() > 0 {
        let in_flight = stack.unacked(id).map_err(|_| BodyError::Connection)?;
        let room = window.saturating_sub(in_flight);
        // Not in crumbs: wait for a worthwhile piece of room (or the end of the body).
        if room < MIN_PIN_BYTES.min(body.snapshot.remaining()) {
            return Ok(false);
        }
        match body.snapshot.pin_next(room.min(MAX_PIN_BYTES)) {
            Ok(Attempt::Ready(pin)) => hand_over(stack, queued, &pin)?,
            Ok(Attempt::Pending(pending)) => {
                *wait = Some(pending);
                return Ok(false);
            }
            Err(e) => return Err(BodyError::Cache(e)),
        }
    }
    Ok(true)
}

/// What [`pump`] needs to know beside the connection.
struct Pumping<'a> {
    /// Rendered when a metrics response is queued.
    metrics: &'a [Metric],
    /// The access log is on (responses are remembered until acknowledged).
    logging: bool,
    /// `--pin-window-kb`, in bytes.
    window: u64,
    now: Instant,
}

/// Hand queued response pieces to the stack, in order, as far as it takes them; counts
/// connections reset because a body could not be completed in `body_aborts`.
fn pump<Q: NetQueue>(
    stack: &mut Stack<Q>,
    id: ConnId,
    entry: &mut ConnEntry,
    how: &Pumping,
    body_aborts: &mut u64,
) -> bool {
    let Pumping {
        metrics,
        logging,
        window,
        now,
    } = *how;
    let mut work = false;
    while let Some(front) = entry.out.front_mut() {
        match front {
            Outgoing::Bytes(bytes) => {
                match stack.send(id, &bytes[entry.sent_of_first..]) {
                    Ok(n) => {
                        entry.sent_of_first += n;
                        entry.stream_queued += n as u64;
                        work |= n > 0;
                    }
                    Err(_) => {
                        entry.abandon_queued(logging);
                        break;
                    }
                }
                if entry.sent_of_first < bytes.len() {
                    break; // the stack's buffers are full; continue next poll
                }
            }
            Outgoing::File(body) => {
                let before = entry.stream_queued;
                let sent = send_body(
                    stack,
                    id,
                    body,
                    &mut entry.stream_queued,
                    window,
                    &mut entry.body_wait,
                    now,
                );
                work |= entry.stream_queued > before;
                match sent {
                    Ok(true) => {}
                    Ok(false) => break, // the pin window is full, or the next piece is not ready
                    Err(BodyError::Connection) => {
                        entry.abandon_queued(logging);
                        break;
                    }
                    Err(BodyError::Cache(e)) => {
                        // Part of this response is on the wire and the rest cannot be had from
                        // its version (invalidated, or no frame before the deadline): reset, so
                        // the client sees a failed transfer, never wrong or missing bytes.
                        tracing::debug!(error = %e, "aborting a response whose body cannot be completed");
                        *body_aborts += 1;
                        let _ = stack.abort(id);
                        entry.abandon_queued(logging);
                        break;
                    }
                }
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
            Outgoing::End(end) => {
                entry.queued_responses -= 1;
                let stream = entry.response_start..entry.stream_queued;
                entry.response_start = entry.stream_queued;
                if logging {
                    let end = ResponseEnd {
                        request_line: end.request_line.take(),
                        ..*end
                    };
                    entry
                        .unacknowledged
                        .push_back(Unacknowledged { stream, end });
                }
            }
        }
        entry.out.pop_front();
        entry.sent_of_first = 0;
    }
    work
}

/// The default send buffer per connection, halved (down to [`MIN_FITTED_SEND_BUFFER`])
/// until `budget` fits in `available` with that ring added to each connection's
/// `per_connection` (which holds everything but the ring); the default itself when
/// `available` is unknown.
fn fitted_send_buffer(budget: &MemoryBudget, available: Option<u64>) -> usize {
    let Some(available) = available else {
        return DEFAULT_SEND_BUFFER;
    };
    let with_ring = |ring: usize| MemoryBudget {
        per_connection: budget.per_connection + ring as u64,
        ..*budget
    };
    let mut ring = DEFAULT_SEND_BUFFER;
    while ring > MIN_FITTED_SEND_BUFFER && with_ring(ring).total() > available {
        ring /= 2;
    }
    ring
}

/// What the server may use at most, from its flags: the process as it stands once set up
/// (page cache and DMA buffers are allocated and touched up front), plus for every
/// connection its socket buffers, its request buffers and its share of the copy pool,
/// plus the memory PUT bodies may take. Printed at start (`total=` in bytes, for tools).
#[derive(Clone, Copy)]
struct MemoryBudget {
    baseline: u64,
    connections: u64,
    per_connection: u64,
    put_memory: u64,
}

impl MemoryBudget {
    /// `stacks`: one per core, each with its own listen backlog.
    fn compute<Q: NetQueue>(
        stack: &Stack<Q>,
        options: &ServeOptions,
        resident: u64,
        stacks: usize,
    ) -> Self {
        MemoryBudget {
            baseline: resident,
            connections: Self::connections(options, stacks),
            per_connection: stack.memory_per_connection() as u64 + Self::http(options),
            put_memory: options.put_memory,
        }
    }

    /// Connections that may hold buffers at once: the limit, and every core's backlog.
    fn connections(options: &ServeOptions, stacks: usize) -> u64 {
        (options.max_connections + options.listen_backlog * stacks) as u64
    }

    /// Request head, the HTTP state and queued response pieces of a connection.
    fn http(options: &ServeOptions) -> u64 {
        (options.limits.max_head_bytes + CONNECTION_STATE) as u64
    }

    /// The send buffer and pin window of every connection: the flags', or the default
    /// fitted to the memory available now (the page cache is set up by then).
    pub fn send_buffer(options: &ServeOptions, stacks: usize) -> (usize, u64) {
        let send_buffer = options.tcp_send_buffer.unwrap_or_else(|| {
            let mut config = StackConfig::new(Ipv4Config::Dhcp);
            config.tcp_tx_buffer = 0;
            // What the connections may need beyond what is resident now.
            let beyond_setup = MemoryBudget {
                baseline: 0,
                connections: Self::connections(options, stacks),
                per_connection: config.memory_per_connection() as u64 + Self::http(options),
                put_memory: options.put_memory,
            };
            let connections = beyond_setup.connections;
            let available = crate::process::available_bytes();
            let fitted = fitted_send_buffer(&beyond_setup, available);
            if fitted < DEFAULT_SEND_BUFFER {
                println!(
                    "zerosend: TCP send buffer {} KiB per connection: {} KiB would not fit {connections} connections in the {} MiB available (--tcp-send-buffer-kb sets it)",
                    fitted >> 10,
                    DEFAULT_SEND_BUFFER >> 10,
                    available.unwrap_or(0) >> 20
                );
            }
            fitted
        });
        let pin_window = options
            .pin_window
            .unwrap_or(send_buffer as u64 + PIN_WINDOW_BEYOND_SEND_BUFFER);
        (send_buffer, pin_window)
    }

    fn total(&self) -> u64 {
        self.baseline + self.connections * self.per_connection + self.put_memory + SLACK
    }
}

impl std::fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "{:.1} MiB = {:.1} MiB set up (page cache, DMA buffers, program) + {} connections (limit + listen backlog) x {:.0} KiB + {:.1} MiB PUT bodies + {:.0} MiB slack; total={}",
            mib(self.total()),
            mib(self.baseline),
            self.connections,
            self.per_connection as f64 / 1024.0,
            mib(self.put_memory),
            mib(SLACK),
            self.total()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_send_buffer_halves_until_the_connections_fit() {
        const MIB: u64 = 1 << 20;
        // 160 KiB per connection beside the ring, 64 MiB of PUT bodies and the slack:
        // 80 MiB fixed.
        let budget = |connections| MemoryBudget {
            baseline: 0,
            connections,
            per_connection: 160 << 10,
            put_memory: 80 * MIB - SLACK,
        };
        // 320 connections at 2 MiB + 160 KiB need 690 MiB: 1 GiB takes the default.
        assert_eq!(
            fitted_send_buffer(&budget(320), Some(1024 * MIB)),
            DEFAULT_SEND_BUFFER
        );
        // A 1 GiB guest with 288 MiB in 2 MiB pages has about 509 MiB: 1 MiB rings fit.
        assert_eq!(fitted_send_buffer(&budget(320), Some(509 * MIB)), 1 << 20);
        // 1100 connections never fit there: the floor, and the budget line says so.
        assert_eq!(
            fitted_send_buffer(&budget(1100), Some(509 * MIB)),
            MIN_FITTED_SEND_BUFFER
        );
        assert_eq!(fitted_send_buffer(&budget(1100), None), DEFAULT_SEND_BUFFER);
    }
}
