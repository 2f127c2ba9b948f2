//! One HTTP/1.1 connection as a state machine over bytes: received bytes go in, response
//! pieces come out as [`Outgoing`] items the server hands to the network stack in order
//! (small heads as copied bytes, file bodies as page-cache pins sent zero-copy), each
//! response closed by an [`Outgoing::End`] that says what it was.
//!
//! Framing: a request's body is framed by its `Content-Length` whatever the method (RFC 9112
//! section 6.3), so a body is never read as a request. A PUT body is collected and applied;
//! any other body is read and thrown away as it arrives, up to a limit (413 and close above
//! it). `Transfer-Encoding` is refused (see [`crate::http::parse_request`]).
//!
//! Keep-alive and pipelining: requests are answered strictly in order; at most
//! [`MAX_QUEUED_RESPONSES`] responses are queued before parsing pauses, so a client that
//! pipelines without reading cannot make the server pin unbounded memory. Parsing resumes
//! as the queue drains, also after the peer has closed its sending half: every request
//! received is answered.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use pagecache::{OpenOptions, PageCache, Pin, WritePolicy};

use crate::http::{
    parse_request, simple_response, HttpError, Limits, Method, Parsed, Request, ResponseHead,
    ALLOWED_METHODS,
};
use crate::respond::{content_type, plan_file_response, FileMeta};
use crate::root::ServeRoot;
use crate::warnings::{WarnKind, Warnings};

/// Responses queued on one connection before it stops parsing further pipelined requests.
pub const MAX_QUEUED_RESPONSES: usize = 16;
/// The reserved path answered with Prometheus metrics.
pub const METRICS_PATH: &str = "/_zerosend/metrics";

/// A piece of response, in order.
pub enum Outgoing {
    /// Bytes the stack copies (response heads, short bodies).
    Bytes(Vec<u8>),
    /// A file body: the stack sends `range` of the pinned snapshot zero-copy and drops the
    /// pin when the bytes are acknowledged.
    File { pin: Pin, range: Range<u64> },
    /// The metrics page; rendered by the server, which can see every counter.
    Metrics { keep_alive: bool, head_only: bool },
    /// The end of one response (sends nothing).
    End(ResponseEnd),
}

/// What the access log records of a response, known when it is queued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseEnd {
    pub status: u16,
    /// `GET /a HTTP/1.1`; `None` when no request line could be read, or when nobody asked
    /// for request lines ([`ServerCore::record_request_lines`]).
    pub request_line: Option<String>,
    /// When the request's first byte arrived.
    pub started: Instant,
}

/// Server-wide state shared by the connections.
pub struct ServerCore {
    pub root: ServeRoot,
    pub cache: PageCache,
    pub policy: WritePolicy,
    pub limits: Limits,
    /// Idle keep-alive connections are closed after this long.
    pub idle_timeout: Duration,
    /// A request head (or body) must arrive within this long of its first byte.
    pub request_timeout: Duration,
    pub counters: HttpCounters,
    pub warnings: Warnings,
    /// Whether [`ResponseEnd`]s carry the request line (the access log is on).
    pub record_request_lines: bool,
    /// When each file was last written through the cache (its on-disk mtime lags behind
    /// until writeback).
    modified: HashMap<PathBuf, SystemTime>,
    /// PUT bodies are collected in memory: bytes reserved for those being received, shared
    /// by every connection and bounded by `put_memory_limit` (a PUT that does not fit gets
    /// 503), so the server's memory stays within its budget whatever clients send.
    put_memory: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub put_memory_limit: u64,
}

/// Bytes of the PUT memory budget held by one body being received; returned on drop
/// (completed, failed or abandoned with its connection).
struct PutReservation {
    bytes: u64,
    pool: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for PutReservation {
    fn drop(&mut self) {
        self.pool
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Request counters for logs and metrics.
#[derive(Clone, Debug, Default)]
pub struct HttpCounters {
    pub requests: u64,
    /// Bytes received from clients (heads and bodies).
    pub request_bytes: u64,
    /// Responses by status code (interim 100s included).
    pub responses: BTreeMap<u16, u64>,
    pub responses_1xx: u64,
    pub responses_2xx: u64,
    pub responses_3xx: u64,
    pub responses_4xx: u64,
    pub responses_5xx: u64,
    pub puts: u64,
    pub put_bytes: u64,
    pub file_body_bytes: u64,
    /// Request bodies read and thrown away (bodies of requests other than PUT).
    pub discarded_body_bytes: u64,
    pub timeouts: u64,
}

impl HttpCounters {
    /// Count one response with this status.
    pub fn count(&mut self, status: u16) {
        *self.responses.entry(status).or_default() += 1;
        match status {
            100..=199 => self.responses_1xx += 1,
            200..=299 => self.responses_2xx += 1,
            300..=399 => self.responses_3xx += 1,
            400..=499 => self.responses_4xx += 1,
            _ => self.responses_5xx += 1,
        }
    }
}

impl ServerCore {
    /// Reserves `bytes` of the PUT memory budget, if they fit.
    fn reserve_put_memory(&self, bytes: u64) -> Option<PutReservation> {
        use std::sync::atomic::Ordering;
        let limit = self.put_memory_limit;
        self.put_memory
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held + bytes <= limit).then_some(held + bytes)
            })
            .ok()?;
        Some(PutReservation {
            bytes,
            pool: std::sync::Arc::clone(&self.put_memory),
        })
    }

    /// Bytes of PUT bodies being received now.
    pub fn put_memory_held(&self) -> u64 {
        self.put_memory.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn new(root: ServeRoot, cache: PageCache, policy: WritePolicy, limits: Limits) -> Self {
        ServerCore {
            root,
            cache,
            policy,
            limits,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(20),
            counters: HttpCounters::default(),
            warnings: Warnings::default(),
            record_request_lines: false,
            modified: HashMap::new(),
            put_memory: Default::default(),
            put_memory_limit: 64 << 20,
        }
    }

    /// Count a response and mark its end in the stream; warn about a 503.
    fn finish(
        &mut self,
        status: u16,
        request: Option<&Request>,
        started: Instant,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        self.counters.count(status);
        if status == 503 {
            self.warnings.warn(
                WarnKind::ServiceUnavailable,
                now,
                "the page cache is full or busy",
            );
        }
        let request_line = request
            .filter(|_| self.record_request_lines)
            .map(Request::request_line);
        out.push(Outgoing::End(ResponseEnd {
            status,
            request_line,
            started,
        }));
    }

    /// Answer `e` as a whole response (bytes, end) on its own.
    fn answer_error(
        &mut self,
        e: &HttpError,
        request: Option<&Request>,
        keep_alive: bool,
        started: Instant,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let head_only = request.is_some_and(|r| r.method == Method::Head);
        out.push(Outgoing::Bytes(error_response(e, keep_alive, head_only)));
        self.finish(e.status, request, started, now, out);
    }

    /// Map a page-cache error to its status, warning when the cache ran out of frames.
    fn cache_error(&mut self, e: pagecache::Error) -> HttpError {
        if matches!(e, pagecache::Error::OutOfFrames { .. }) {
            self.warnings
                .warn(WarnKind::OutOfFrames, Instant::now(), &e.to_string());
        }
        cache_error_status(e)
    }

    /// Answer a GET or HEAD of a file: pin a snapshot, then describe exactly that snapshot.
    /// Returns the status.
    fn get(&mut self, req: &Request, out: &mut Vec<Outgoing>) -> Result<u16, HttpError> {
        let path = self.root.resolve(req.raw_path(), false)?;
        let file = match self.cache.open(&path, OpenOptions::read_only()) {
            Ok(file) => file,
            Err(e) => return Err(self.cache_error(e)),
        };
        let disk = fs::metadata(&path).map_err(|_| HttpError::new(404, "Not Found"))?;
        // Plan against a version, pin, and retry if a writer got in between, so the head
        // (length, ETag, range) always describes the pinned bytes.
        for _ in 0..8 {
            let version = file.version();
            let len = file.len();
            let modified = self
                .modified
                .get(&path)
                .copied()
                .unwrap_or(SystemTime::UNIX_EPOCH)
                .max(disk.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            let meta = FileMeta {
                len,
                etag: FileMeta::etag_for(disk.ino(), version, len),
                modified,
            };
            let plan = plan_file_response(req, &meta, content_type(&path.to_string_lossy()));
            let pin = match &plan.body {
                Some(range) => match file.pin(range.clone()) {
                    Ok(pin) => Some(pin),
                    Err(pagecache::Error::OutOfRange { .. }) => continue,
                    Err(e) => return Err(self.cache_error(e)),
                },
                None => None,
            };
            if pin.as_ref().is_some_and(|p| p.version() != version) {
                continue;
            }
            out.push(Outgoing::Bytes(plan.head));
            if let (Some(pin), Some(range)) = (pin, plan.body) {
                self.counters.file_body_bytes += range.end - range.start;
                out.push(Outgoing::File { pin, range });
            }
            return Ok(plan.status);
        }
        Err(HttpError::new(503, "Service Unavailable"))
    }

    /// Apply a complete PUT body through the page cache, honouring the write policy.
    fn put(&mut self, req: &Request, body: &[u8]) -> Result<u16, HttpError> {
        let path = self.root.resolve(req.raw_path(), true)?;
        let created = !path.exists();
        if created {
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|_| HttpError::new(403, "Forbidden"))?;
        }
        let file = match self.cache.open(&path, OpenOptions::read_write(self.policy)) {
            Ok(file) => file,
            Err(e) => return Err(self.cache_error(e)),
        };
        let written = match req.header("Content-Range") {
            Some(cr) => {
                let offset = parse_put_content_range(cr, body.len() as u64)?;
                file.write(offset, body)
            }
            None => file.replace_contents(body),
        }
        .and_then(|()| file.fsync());
        if let Err(e) = written {
            return Err(self.cache_error(e));
        }
        self.modified.insert(path, SystemTime::now());
        self.counters.puts += 1;
        self.counters.put_bytes += body.len() as u64;
        Ok(if created { 201 } else { 204 })
    }
}

fn cache_error_status(e: pagecache::Error) -> HttpError {
    match e {
        pagecache::Error::WriteTimeout { .. } | pagecache::Error::OutOfFrames { .. } => {
            HttpError::new(503, "Service Unavailable")
        }
        pagecache::Error::Io { ref source, .. }
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            HttpError::new(404, "Not Found")
        }
        pagecache::Error::Io { ref source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            HttpError::new(403, "Forbidden")
        }
        _ => HttpError::new(500, "Internal Server Error"),
    }
}

/// `Content-Range: bytes a-b/*` (or `/total`) on a PUT: write the body at `a`; its length
/// must be `b - a + 1`.
fn parse_put_content_range(value: &str, body_len: u64) -> Result<u64, HttpError> {
    let bad = HttpError::new(400, "Bad Request");
    let spec = value.trim().strip_prefix("bytes ").ok_or(bad.clone())?;
    let (range, _total) = spec.split_once('/').ok_or(bad.clone())?;
    let (a, b) = range.split_once('-').ok_or(bad.clone())?;
    let a: u64 = a.trim().parse().map_err(|_| bad.clone())?;
    let b: u64 = b.trim().parse().map_err(|_| bad.clone())?;
    if b < a || b - a + 1 != body_len {
        return Err(bad);
    }
    Ok(a)
}

/// A short text response naming the error.
fn error_response(e: &HttpError, keep_alive: bool, head_only: bool) -> Vec<u8> {
    let body = format!("{} {}\n", e.status, e.reason);
    simple_response(e.status, e.reason, &body, keep_alive, head_only)
}

fn connection_header(keep_alive: bool) -> &'static str {
    if keep_alive {
        "keep-alive"
    } else {
        "close"
    }
}

/// The answer to a PUT that was applied (201 Created or 204 No Content).
fn put_response(status: u16, keep_alive: bool) -> Vec<u8> {
    let reason = if status == 201 {
        "Created"
    } else {
        "No Content"
    };
    let mut head =
        ResponseHead::new(status, reason).header("Connection", connection_header(keep_alive));
    if status == 201 {
        head = head.header("Content-Length", 0);
    }
    head.finish()
}

/// The answer to OPTIONS (RFC 9110 section 9.3.7): what can be done, and no content.
fn options_response(request: &Request, keep_alive: bool) -> Vec<u8> {
    let allow = if request.raw_path() == METRICS_PATH {
        "GET, HEAD, OPTIONS"
    } else {
        ALLOWED_METHODS
    };
    ResponseHead::new(200, "OK")
        .header("Allow", allow)
        .header("Content-Length", 0)
        .header("Connection", connection_header(keep_alive))
        .finish()
}

fn method_not_allowed(keep_alive: bool) -> Vec<u8> {
    let body = "405 Method Not Allowed\n";
    let mut bytes = ResponseHead::new(405, "Method Not Allowed")
        .header("Allow", ALLOWED_METHODS)
        .header("Content-Type", "text/plain; charset=utf-8")
        .header("Content-Length", body.len())
        .header("Connection", connection_header(keep_alive))
        .finish();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// A PUT whose body is being collected.
struct PendingPut {
    request: Request,
    body: Vec<u8>,
    _reservation: PutReservation,
    remaining: u64,
    /// When the request's first byte arrived.
    started: Instant,
}

/// What the next received bytes are.
#[derive(Default)]
enum Body {
    /// The start of a request head.
    #[default]
    None,
    /// The rest of a PUT body.
    Put(PendingPut),
    /// The rest of a body no handler uses (a GET's, say): read and dropped, never parsed.
    Discard { remaining: u64 },
}

/// One client connection.
pub struct Connection {
    /// Received bytes not yet consumed; bounded by what one read adds plus a request head,
    /// as bodies are consumed as they arrive and parsing pauses only with a full queue.
    inbuf: Vec<u8>,
    body: Body,
    /// No further requests are read; close once the queued responses are sent.
    closing: bool,
    /// Received requests wait for room in the response queue.
    held_back: bool,
    /// When the first byte of the request being read arrived.
    request_started: Option<Instant>,
    last_activity: Instant,
}

impl Connection {
    pub fn new(now: Instant) -> Self {
        Connection {
            inbuf: Vec::new(),
            body: Body::None,
            closing: false,
            held_back: false,
            request_started: None,
            last_activity: now,
        }
    }

    /// Whether the connection should be closed once everything queued has been sent.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Whether requests already received wait for room in the response queue: call
    /// [`Connection::on_bytes`] with no bytes once responses went out, and do not close the
    /// connection for the peer's FIN before they are answered.
    pub fn held_back(&self) -> bool {
        self.held_back
    }

    /// Feed received bytes (possibly none, to resume after the send queue drained);
    /// responses are appended to `out`. `queued` is how many responses are still unsent.
    pub fn on_bytes(
        &mut self,
        data: &[u8],
        now: Instant,
        queued: usize,
        core: &mut ServerCore,
        out: &mut Vec<Outgoing>,
    ) {
        if self.closing {
            return;
        }
        if !data.is_empty() {
            core.counters.request_bytes += data.len() as u64;
            self.last_activity = now;
            self.request_started.get_or_insert(now);
            self.inbuf.extend_from_slice(data);
        }
        self.held_back = false;
        let mut answered = 0;
        while !self.closing {
            let queue_full = queued + answered >= MAX_QUEUED_RESPONSES;
            match std::mem::take(&mut self.body) {
                Body::None => {}
                Body::Discard { remaining } => {
                    let take = remaining.min(self.inbuf.len() as u64);
                    self.inbuf.drain(..take as usize);
                    core.counters.discarded_body_bytes += take;
                    if remaining > take {
                        self.body = Body::Discard {
                            remaining: remaining - take,
                        };
                        return;
                    }
                    self.request_started = (!self.inbuf.is_empty()).then_some(now);
                    continue;
                }
                Body::Put(mut put) => {
                    let take = put.remaining.min(self.inbuf.len() as u64);
                    put.body.extend(self.inbuf.drain(..take as usize));
                    put.remaining -= take;
                    if put.remaining > 0 || queue_full {
                        self.held_back = put.remaining == 0;
                        self.body = Body::Put(put);
                        return;
                    }
                    self.complete_put(put, now, core, out);
                    answered += 1;
                    continue;
                }
            }
            if self.inbuf.is_empty() {
                self.request_started = None;
                return;
            }
            if queue_full {
                self.held_back = true;
                return;
            }
            let started = self.request_started.unwrap_or(now);
            match parse_request(&self.inbuf, &core.limits) {
                Ok(Parsed::Partial) => return,
                Err(e) => {
                    // The stream is no longer in sync: answer and close.
                    core.answer_error(&e, None, false, started, now, out);
                    self.closing = true;
                    return;
                }
                Ok(Parsed::Complete { request, head_len }) => {
                    self.inbuf.drain(..head_len);
                    core.counters.requests += 1;
                    answered += 1;
                    self.handle(request, started, now, core, out);
                }
            }
        }
    }

    fn handle(
        &mut self,
        request: Request,
        started: Instant,
        now: Instant,
        core: &mut ServerCore,
        out: &mut Vec<Outgoing>,
    ) {
        let keep = request.keep_alive;
        let status = match request.method {
            Method::Put => return self.start_put(request, started, now, core, out),
            Method::Get | Method::Head if request.raw_path() == METRICS_PATH => {
                out.push(Outgoing::Metrics {
                    keep_alive: keep,
                    head_only: request.method == Method::Head,
                });
                Ok(200)
            }
            Method::Get | Method::Head => core.get(&request, out),
            Method::Options => {
                out.push(Outgoing::Bytes(options_response(&request, keep)));
                Ok(200)
            }
            Method::Other => {
                out.push(Outgoing::Bytes(method_not_allowed(keep)));
                Ok(405)
            }
        };
        match status {
            Ok(status) => core.finish(status, Some(&request), started, now, out),
            Err(e) => core.answer_error(&e, Some(&request), keep, started, now, out),
        }
        if !keep {
            self.closing = true;
            return;
        }
        // The body (the parser bounded it) is nobody's: skip it, so that it cannot be read
        // as the next request.
        if let Some(len) = request.content_length.filter(|&len| len > 0) {
            self.body = Body::Discard { remaining: len };
        }
        let more = !self.inbuf.is_empty() || matches!(self.body, Body::Discard { .. });
        self.request_started = more.then_some(now);
    }

    /// A PUT head: check where it writes, then collect its body.
    fn start_put(
        &mut self,
        request: Request,
        started: Instant,
        now: Instant,
        core: &mut ServerCore,
        out: &mut Vec<Outgoing>,
    ) {
        if let Err(e) = core.root.resolve(request.raw_path(), true) {
            // The body (up to the PUT limit) still follows on the wire: close rather than
            // read it.
            core.answer_error(&e, Some(&request), false, started, now, out);
            self.closing = true;
            return;
        }
        if request
            .header("Expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            core.counters.count(100);
            out.push(Outgoing::Bytes(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()));
        }
        let len = request.content_length.unwrap_or(0);
        let Some(reservation) = core.reserve_put_memory(len) else {
            // Other PUT bodies hold the memory: refuse rather than exceed the budget; the
            // body follows on the wire, so close.
            core.warnings.warn(
                WarnKind::ServiceUnavailable,
                now,
                "PUT bodies fill their memory budget",
            );
            let e = HttpError::new(503, "Service Unavailable");
            core.answer_error(&e, Some(&request), false, started, now, out);
            self.closing = true;
            return;
        };
        self.request_started = Some(now);
        self.body = Body::Put(PendingPut {
            request,
            body: Vec::with_capacity(len as usize),
            _reservation: reservation,
            remaining: len,
            started,
        });
    }

    /// A PUT body is complete: apply it and answer.
    fn complete_put(
        &mut self,
        put: PendingPut,
        now: Instant,
        core: &mut ServerCore,
        out: &mut Vec<Outgoing>,
    ) {
        let keep = put.request.keep_alive;
        match core.put(&put.request, &put.body) {
            Ok(status) => {
                out.push(Outgoing::Bytes(put_response(status, keep)));
                core.finish(status, Some(&put.request), put.started, now, out);
            }
            Err(e) => core.answer_error(&e, Some(&put.request), keep, put.started, now, out),
        }
        self.closing = !keep;
        self.request_started = (!self.inbuf.is_empty()).then_some(now);
    }

    /// Enforce the idle and slow-client timeouts: a request too slow to arrive gets a 408
    /// (appended to `out`). Returns whether the connection should be closed.
    pub fn check_timeouts(
        &mut self,
        now: Instant,
        core: &mut ServerCore,
        out: &mut Vec<Outgoing>,
    ) -> bool {
        if self.closing {
            return false;
        }
        if let Some(started) = self.request_started {
            if now.duration_since(started) > core.request_timeout {
                core.counters.timeouts += 1;
                core.warnings.warn(
                    WarnKind::RequestTimeout,
                    now,
                    "a request head or body arrived too slowly",
                );
                self.closing = true;
                let e = HttpError::new(408, "Request Timeout");
                core.answer_error(&e, None, false, started, now, out);
                return true;
            }
        } else if now.duration_since(self.last_activity) > core.idle_timeout {
            core.counters.timeouts += 1;
            self.closing = true;
            return true;
        }
        false
    }

    /// Since when the connection has been waiting for a request (idle, or receiving a head):
    /// `None` while it receives a body or is closing. The server evicts the longest waiting
    /// one when a new connection would exceed the limit.
    pub fn waiting_since(&self) -> Option<Instant> {
        if self.closing || !matches!(self.body, Body::None) || self.held_back {
            return None;
        }
        Some(self.request_started.unwrap_or(self.last_activity))
    }

    /// Note that the connection sent or received something (resets the idle timer).
    pub fn touch(&mut self, now: Instant) {
        self.last_activity = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagecache::{CacheConfig, FrameArena};

    struct Fixture {
        dir: PathBuf,
        core: ServerCore,
        conn: Connection,
        now: Instant,
    }

    fn fixture(policy: WritePolicy) -> Fixture {
        let dir = std::env::temp_dir().join(format!(
            "zs-conn-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("hello.txt"), b"hello, world\n").unwrap();
        fs::write(dir.join("big.bin"), vec![7u8; 50_000]).unwrap();
        let cache = PageCache::new(
            FrameArena::anonymous(0x1000_0000, 4 << 20).unwrap(),
            CacheConfig::default(),
        )
        .unwrap();
        let core = ServerCore::new(
            ServeRoot::new(&dir).unwrap(),
            cache,
            policy,
            Limits::default(),
        );
        let now = Instant::now();
        Fixture {
            dir,
            core,
            conn: Connection::new(now),
            now,
        }
    }

    impl Fixture {
        fn send(&mut self, req: &str) -> Vec<Outgoing> {
            let mut out = Vec::new();
            self.conn
                .on_bytes(req.as_bytes(), self.now, 0, &mut self.core, &mut out);
            out
        }
    }

    /// Heads as text and bodies as bytes, in order.
    fn render(out: &[Outgoing]) -> (Vec<String>, Vec<Vec<u8>>) {
        let mut heads = Vec::new();
        let mut bodies = Vec::new();
        for o in out {
            match o {
                Outgoing::Bytes(b) => heads.push(String::from_utf8_lossy(b).into_owned()),
                Outgoing::File { pin, range } => {
                    let all = pin.to_vec();
                    let start = (range.start - pin.range().start) as usize;
                    bodies.push(all[start..start + (range.end - range.start) as usize].to_vec());
                }
                Outgoing::Metrics { .. } => heads.push("METRICS".into()),
                Outgoing::End(_) => {}
            }
        }
        (heads, bodies)
    }

    /// The statuses of the responses, from their end markers.
    fn statuses(out: &[Outgoing]) -> Vec<u16> {
        out.iter()
            .filter_map(|o| match o {
                Outgoing::End(end) => Some(end.status),
                _ => None,
            })
            .collect()
    }

    /// Everything a client would receive (metrics excepted), as text.
    fn wire(out: &[Outgoing]) -> String {
        let mut bytes = Vec::new();
        for o in out {
            match o {
                Outgoing::Bytes(b) => bytes.extend_from_slice(b),
                Outgoing::File { .. } => {
                    bytes.extend_from_slice(&render(std::slice::from_ref(o)).1[0])
                }
                Outgoing::Metrics { .. } => bytes.extend_from_slice(b"METRICS"),
                Outgoing::End(_) => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn get_head_and_pipelining() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let out = f.send("GET /hello.txt HTTP/1.1\r\n\r\nHEAD /hello.txt HTTP/1.1\r\n\r\nGET /big.bin HTTP/1.1\r\nRange: bytes=10-19\r\n\r\n");
        let (heads, bodies) = render(&out);
        assert_eq!(heads.len(), 3);
        assert!(
            heads[0].starts_with("HTTP/1.1 200 OK\r\n")
                && heads[0].contains("Content-Length: 13\r\n")
        );
        assert!(
            heads[1].starts_with("HTTP/1.1 200 OK\r\n")
                && heads[1].contains("Content-Length: 13\r\n")
        );
        assert!(heads[2].starts_with("HTTP/1.1 206 "));
        assert_eq!(bodies, vec![b"hello, world\n".to_vec(), vec![7u8; 10]]);
        assert!(!f.conn.closing());
        let _ = fs::remove_dir_all(&f.dir);
    }

    #[test]
    fn errors_have_the_right_status_and_the_connection_survives_or_closes() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let (h, _) = render(&f.send("GET /missing HTTP/1.1\r\n\r\n"));
        assert!(h[0].starts_with("HTTP/1.1 404 "));
        let (h, _) = render(&f.send("GET /../etc/passwd HTTP/1.1\r\n\r\n"));
        assert!(h[0].starts_with("HTTP/1.1 403 "));
        let (h, _) = render(&f.send("DELETE /hello.txt HTTP/1.1\r\n\r\n"));
        assert!(h[0].starts_with("HTTP/1.1 405 ") && h[0].contains("Allow: GET, HEAD, PUT"));
        assert!(
            !f.conn.closing(),
            "4xx on a well-formed request keeps the connection"
        );
        let (h, _) = render(&f.send("BROKEN\r\n\r\n"));
        assert!(h[0].starts_with("HTTP/1.1 400 "));
        assert!(
            f.conn.closing(),
            "a malformed request closes the connection"
        );
    }

    #[test]
    fn put_replaces_and_partial_put_writes_a_range() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let (h, _) = render(&f.send("PUT /new.txt HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde"));
        assert!(h[0].starts_with("HTTP/1.1 201 "), "{h:?}");
        let (h, _) = render(&f.send(
            "PUT /new.txt HTTP/1.1\r\nContent-Length: 2\r\nContent-Range: bytes 1-2/*\r\n\r\nXY",
        ));
        assert!(h[0].starts_with("HTTP/1.1 204 "), "{h:?}");
        let (_, b) = render(&f.send("GET /new.txt HTTP/1.1\r\n\r\n"));
        assert_eq!(b, vec![b"aXYde".to_vec()]);
        assert_eq!(
            fs::read(f.dir.join("new.txt")).unwrap(),
            b"aXYde",
            "PUT is durable on disk"
        );
        let (h, _) = render(&f.send(
            "PUT /new.txt HTTP/1.1\r\nContent-Length: 2\r\nContent-Range: bytes 1-5/*\r\n\r\nXY",
        ));
        assert!(h[0].starts_with("HTTP/1.1 400 "));
        // A body split over several reads.
        let mut out = Vec::new();
        f.conn.on_bytes(
            b"PUT /hello.txt HTTP/1.1\r\nContent-Length: 6\r\n\r\nab",
            f.now,
            0,
            &mut f.core,
            &mut out,
        );
        assert!(out.is_empty());
        f.conn.on_bytes(b"cdef", f.now, 0, &mut f.core, &mut out);
        assert!(render(&out).0[0].starts_with("HTTP/1.1 204 "));
        assert_eq!(
            render(&f.send("GET /hello.txt HTTP/1.1\r\n\r\n")).1,
            vec![b"abcdef".to_vec()]
        );
    }

    #[test]
    fn a_response_keeps_its_snapshot_while_a_put_replaces_the_file() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let out = f.send("GET /hello.txt HTTP/1.1\r\n\r\n");
        f.send("PUT /hello.txt HTTP/1.1\r\nContent-Length: 3\r\n\r\nnew");
        assert_eq!(
            render(&out).1,
            vec![b"hello, world\n".to_vec()],
            "in-flight body changed"
        );
        assert_eq!(
            render(&f.send("GET /hello.txt HTTP/1.1\r\n\r\n")).1,
            vec![b"new".to_vec()]
        );
    }

    #[test]
    fn wait_policy_put_on_pinned_file_answers_503() {
        let mut f = fixture(WritePolicy::Wait {
            timeout: Duration::from_millis(30),
        });
        let in_flight = f.send("GET /hello.txt HTTP/1.1\r\n\r\n");
        let (h, _) = render(&f.send("PUT /hello.txt HTTP/1.1\r\nContent-Length: 3\r\n\r\nnew"));
        assert!(h[0].starts_with("HTTP/1.1 503 "), "{h:?}");
        drop(in_flight);
        let (h, _) = render(&f.send("PUT /hello.txt HTTP/1.1\r\nContent-Length: 3\r\n\r\nnew"));
        assert!(h[0].starts_with("HTTP/1.1 204 "));
    }

    #[test]
    fn pipelining_pauses_when_too_many_responses_are_queued() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let many = "GET /hello.txt HTTP/1.1\r\n\r\n".repeat(40);
        let mut out = Vec::new();
        f.conn
            .on_bytes(many.as_bytes(), f.now, 0, &mut f.core, &mut out);
        assert_eq!(render(&out).0.len(), MAX_QUEUED_RESPONSES);
        out.clear();
        f.conn.on_bytes(&[], f.now, 0, &mut f.core, &mut out);
        assert_eq!(render(&out).0.len(), MAX_QUEUED_RESPONSES);
        out.clear();
        f.conn.on_bytes(&[], f.now, 0, &mut f.core, &mut out);
        assert_eq!(render(&out).0.len(), 40 - 2 * MAX_QUEUED_RESPONSES);
    }

    #[test]
    fn slow_and_idle_clients_time_out() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        f.send("GET /hello.txt HTTP/1.1\r\nHost:");
        let later = f.now + f.core.request_timeout + Duration::from_secs(1);
        let mut out = Vec::new();
        let close = f.conn.check_timeouts(later, &mut f.core, &mut out);
        assert!(close && render(&out).0[0].starts_with("HTTP/1.1 408 "));
        assert_eq!(statuses(&out), [408]);
        assert_eq!(f.core.warnings.seen(WarnKind::RequestTimeout), 1);
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let mut out = Vec::new();
        let close = f.conn.check_timeouts(
            f.now + f.core.idle_timeout + Duration::from_secs(1),
            &mut f.core,
            &mut out,
        );
        assert!(close && out.is_empty());
    }

    #[test]
    fn a_slow_body_being_discarded_times_out_too() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        f.send("GET /hello.txt HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
        let mut out = Vec::new();
        let later = f.now + f.core.request_timeout + Duration::from_secs(1);
        assert!(f.conn.check_timeouts(later, &mut f.core, &mut out));
        assert_eq!(statuses(&out), [408]);
    }

    #[test]
    fn connection_close_and_http10() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let (h, _) = render(&f.send(
            "GET /hello.txt HTTP/1.1\r\nConnection: close\r\n\r\nGET /hello.txt HTTP/1.1\r\n\r\n",
        ));
        assert_eq!(h.len(), 1, "nothing is answered after Connection: close");
        assert!(h[0].contains("Connection: close\r\n"));
        assert!(f.conn.closing());
    }

    /// The CL.0 desync of the issue: a body on a request that does not take one was read as
    /// the next request. It must be skipped whole, however it arrives.
    #[test]
    fn a_body_on_any_method_is_framed_by_its_content_length_and_never_executed() {
        let smuggled = "GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n";
        for (first, status) in [
            ("GET /hello.txt", 200),
            ("HEAD /hello.txt", 200),
            ("DELETE /hello.txt", 405),
            ("GET /missing", 404),
            ("OPTIONS *", 200),
            (&format!("GET {METRICS_PATH}"), 200),
        ] {
            let mut f = fixture(WritePolicy::CopyOnWrite);
            let out = f.send(&format!(
                "{first} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{smuggled}GET /hello.txt HTTP/1.1\r\n\r\n",
                smuggled.len()
            ));
            assert_eq!(statuses(&out), [status, 200], "{first}");
            assert_eq!(f.core.counters.requests, 2, "{first}: the body was run");
            assert_eq!(f.core.counters.discarded_body_bytes, smuggled.len() as u64);
            assert!(!render(&out).1.iter().any(|b| b.len() == 50_000), "{first}");
            assert!(!f.conn.closing());
        }
    }

    #[test]
    fn a_discarded_body_split_over_reads_is_still_skipped_whole() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let body = "GET /big.bin HTTP/1.1\r\n\r\n";
        let mut out = Vec::new();
        let head = format!(
            "DELETE /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        f.conn
            .on_bytes(head.as_bytes(), f.now, 0, &mut f.core, &mut out);
        for byte in body.as_bytes() {
            f.conn
                .on_bytes(std::slice::from_ref(byte), f.now, 0, &mut f.core, &mut out);
        }
        f.conn.on_bytes(
            b"GET /hello.txt HTTP/1.1\r\n\r\n",
            f.now,
            0,
            &mut f.core,
            &mut out,
        );
        assert_eq!(statuses(&out), [405, 200]);
        assert_eq!(render(&out).1, vec![b"hello, world\n".to_vec()]);
    }

    #[test]
    fn a_body_over_the_discard_limit_is_refused_and_closes() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let over = f.core.limits.max_discarded_body_bytes + 1;
        let out = f.send(&format!(
            "GET /hello.txt HTTP/1.1\r\nContent-Length: {over}\r\n\r\nGET /hello.txt HTTP/1.1\r\n\r\n"
        ));
        assert_eq!(statuses(&out), [413]);
        assert!(f.conn.closing());
    }

    #[test]
    fn transfer_encoding_requests_are_refused_and_close() {
        for (req, status) in [
            ("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (
                "DELETE /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
            (
                "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                400,
            ),
            (
                "PUT /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
        ] {
            let mut f = fixture(WritePolicy::CopyOnWrite);
            let out = f.send(&format!("{req}0\r\n\r\nGET /hello.txt HTTP/1.1\r\n\r\n"));
            assert_eq!(statuses(&out), [status], "{req:?}");
            assert!(f.conn.closing(), "{req:?}");
        }
    }

    /// Requests held back while the queue is full are flagged, so the server answers them
    /// even after the peer's FIN (the 40-request half-closed pipeline of the issue).
    #[test]
    fn held_back_requests_are_flagged_until_all_are_answered() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let many = "GET /hello.txt HTTP/1.1\r\n\r\n".repeat(40);
        let mut answered = 0;
        let mut out = Vec::new();
        f.conn
            .on_bytes(many.as_bytes(), f.now, 0, &mut f.core, &mut out);
        loop {
            answered += statuses(&out).len();
            out.clear();
            if !f.conn.held_back() {
                break;
            }
            f.conn.on_bytes(&[], f.now, 0, &mut f.core, &mut out);
        }
        assert_eq!(answered, 40);
        // A queue partly drained resumes partly.
        let mut f = fixture(WritePolicy::CopyOnWrite);
        f.conn
            .on_bytes(many.as_bytes(), f.now, 0, &mut f.core, &mut out);
        out.clear();
        f.conn
            .on_bytes(&[], f.now, MAX_QUEUED_RESPONSES - 3, &mut f.core, &mut out);
        assert_eq!(statuses(&out).len(), 3);
        assert!(f.conn.held_back());
    }

    #[test]
    fn a_complete_put_waits_for_room_in_the_queue() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let mut out = Vec::new();
        f.conn.on_bytes(
            b"PUT /new.txt HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            f.now,
            MAX_QUEUED_RESPONSES,
            &mut f.core,
            &mut out,
        );
        assert!(out.is_empty() && f.conn.held_back());
        f.conn.on_bytes(&[], f.now, 0, &mut f.core, &mut out);
        assert_eq!(statuses(&out), [201]);
        assert!(!f.conn.held_back());
    }

    #[test]
    fn options_absolute_form_and_long_targets() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let out = f.send("OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            wire(&out),
            "HTTP/1.1 200 OK\r\nServer: zerosend\r\nAllow: GET, HEAD, PUT, OPTIONS\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
        );
        let (h, _) = render(&f.send("OPTIONS /hello.txt HTTP/1.1\r\n\r\n"));
        assert!(h[0].contains("Allow: GET, HEAD, PUT, OPTIONS\r\n"));
        let (h, _) = render(&f.send(&format!("OPTIONS {METRICS_PATH} HTTP/1.1\r\n\r\n")));
        assert!(h[0].contains("Allow: GET, HEAD, OPTIONS\r\n"));
        let (h, b) =
            render(&f.send("GET http://guest:80/hello.txt?x=1 HTTP/1.1\r\nHost: other\r\n\r\n"));
        assert!(h[0].starts_with("HTTP/1.1 200 "));
        assert_eq!(b, vec![b"hello, world\n".to_vec()]);
        let out = f.send(&format!("GET HTTP://guest{METRICS_PATH} HTTP/1.1\r\n\r\n"));
        assert_eq!(render(&out).0, ["METRICS"]);
        assert_eq!(statuses(&f.send("GET * HTTP/1.1\r\n\r\n")), [400]);
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
        assert_eq!(statuses(&f.send(&long)), [414]);
        assert!(f.conn.closing());
    }

    #[test]
    fn every_response_is_counted_by_status_and_class() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        f.send("GET /hello.txt HTTP/1.1\r\n\r\n");
        f.send("GET /hello.txt HTTP/1.1\r\n\r\n");
        f.send("GET /missing HTTP/1.1\r\n\r\n");
        f.send("OPTIONS * HTTP/1.1\r\n\r\n");
        f.send("PUT /new.txt HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx");
        f.send("BROKEN\r\n\r\n");
        let c = &f.core.counters;
        let by_code: Vec<(u16, u64)> = c.responses.iter().map(|(&k, &v)| (k, v)).collect();
        assert_eq!(by_code, [(100, 1), (200, 3), (201, 1), (400, 1), (404, 1)]);
        assert_eq!(
            (
                c.responses_1xx,
                c.responses_2xx,
                c.responses_4xx,
                c.responses_5xx
            ),
            (1, 4, 2, 0)
        );
        let sent = "GET /hello.txt HTTP/1.1\r\n\r\n".len() * 2
            + "GET /missing HTTP/1.1\r\n\r\n".len()
            + "OPTIONS * HTTP/1.1\r\n\r\n".len()
            + "PUT /new.txt HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx".len()
            + "BROKEN\r\n\r\n".len();
        assert_eq!(c.request_bytes, sent as u64);
    }

    #[test]
    fn response_ends_carry_the_request_line_when_asked() {
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let out = f.send("GET /hello.txt HTTP/1.1\r\n\r\n");
        let Some(Outgoing::End(end)) = out.last() else {
            panic!("no end marker")
        };
        assert_eq!((end.status, end.request_line.as_deref()), (200, None));
        f.core.record_request_lines = true;
        let out = f.send("GET http://h/hello.txt HTTP/1.0\r\n\r\n");
        let Some(Outgoing::End(end)) = out.last() else {
            panic!("no end marker")
        };
        assert_eq!(
            end.request_line.as_deref(),
            Some("GET http://h/hello.txt HTTP/1.0")
        );
        assert_eq!(end.started, f.now);
    }
}
