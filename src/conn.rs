//! One HTTP/1.1 connection as a state machine over bytes: received bytes go in, response
//! pieces come out as [`Outgoing`] items the server hands to the network stack in order
//! (small heads as copied bytes, file bodies as page-cache pins sent zero-copy).
//!
//! Keep-alive and pipelining: requests are answered strictly in order; at most
//! [`MAX_QUEUED_RESPONSES`] responses are queued before parsing pauses, so a client that
//! pipelines without reading cannot make the server pin unbounded memory.

use std::collections::HashMap;
use std::fs;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use pagecache::{OpenOptions, PageCache, Pin, WritePolicy};

use crate::http::{parse_request, simple_response, HttpError, Limits, Method, Parsed, Request};
use crate::respond::{content_type, plan_file_response, FileMeta};
use crate::root::ServeRoot;

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
}

/// Server-wide state shared by the connections.
pub struct ServerCore {
    pub root: ServeRoot,
    pub cache: PageCache,
    pub policy: WritePolicy,
    pub limits: Limits,
    /// Idle keep-alive connections are closed after this long.
    pub idle_timeout: Duration,
    /// A request head (or PUT body) must arrive within this long of its first byte.
    pub request_timeout: Duration,
    pub counters: HttpCounters,
    /// When each file was last written through the cache (its on-disk mtime lags behind
    /// until writeback).
    modified: HashMap<PathBuf, SystemTime>,
}

/// Request counters for logs and metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpCounters {
    pub requests: u64,
    pub responses_2xx: u64,
    pub responses_3xx: u64,
    pub responses_4xx: u64,
    pub responses_5xx: u64,
    pub puts: u64,
    pub put_bytes: u64,
    pub file_body_bytes: u64,
    pub timeouts: u64,
}

impl HttpCounters {
    fn count(&mut self, status: u16) {
        match status {
            200..=299 => self.responses_2xx += 1,
            300..=399 => self.responses_3xx += 1,
            400..=499 => self.responses_4xx += 1,
            _ => self.responses_5xx += 1,
        }
    }
}

impl ServerCore {
    pub fn new(root: ServeRoot, cache: PageCache, policy: WritePolicy, limits: Limits) -> Self {
        ServerCore {
            root,
            cache,
            policy,
            limits,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(20),
            counters: HttpCounters::default(),
            modified: HashMap::new(),
        }
    }

    fn error(&mut self, e: &HttpError, keep_alive: bool, head_only: bool) -> Vec<u8> {
        self.counters.count(e.status);
        let body = format!("{} {}\n", e.status, e.reason);
        simple_response(e.status, e.reason, &body, keep_alive, head_only)
    }

    /// Answer a GET or HEAD of a file: pin a snapshot, then describe exactly that snapshot.
    fn get(&mut self, req: &Request, out: &mut Vec<Outgoing>) -> Result<(), HttpError> {
        let path = self.root.resolve(req.raw_path(), false)?;
        let file = self
            .cache
            .open(&path, OpenOptions::read_only())
            .map_err(cache_error)?;
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
                    Err(e) => return Err(cache_error(e)),
                },
                None => None,
            };
            if pin.as_ref().is_some_and(|p| p.version() != version) {
                continue;
            }
            self.counters.count(plan.status);
            out.push(Outgoing::Bytes(plan.head));
            if let (Some(pin), Some(range)) = (pin, plan.body) {
                self.counters.file_body_bytes += range.end - range.start;
                out.push(Outgoing::File { pin, range });
            }
            return Ok(());
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
        let file = self
            .cache
            .open(&path, OpenOptions::read_write(self.policy))
            .map_err(cache_error)?;
        match req.header("Content-Range") {
            Some(cr) => {
                let offset = parse_put_content_range(cr, body.len() as u64)?;
                file.write(offset, body).map_err(cache_error)?;
            }
            None => file.replace_contents(body).map_err(cache_error)?,
        }
        file.fsync().map_err(cache_error)?;
        self.modified.insert(path, SystemTime::now());
        self.counters.puts += 1;
        self.counters.put_bytes += body.len() as u64;
        Ok(if created { 201 } else { 204 })
    }
}

fn cache_error(e: pagecache::Error) -> HttpError {
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

struct PendingBody {
    request: Request,
    body: Vec<u8>,
    remaining: u64,
}

/// One client connection.
pub struct Connection {
    inbuf: Vec<u8>,
    body: Option<PendingBody>,
    /// No further requests are read; close once the queued responses are sent.
    closing: bool,
    /// When the first byte of the request being read arrived.
    request_started: Option<Instant>,
    last_activity: Instant,
}

impl Connection {
    pub fn new(now: Instant) -> Self {
        Connection {
            inbuf: Vec::new(),
            body: None,
            closing: false,
            request_started: None,
            last_activity: now,
        }
    }

    /// Whether the connection should be closed once everything queued has been sent.
    pub fn closing(&self) -> bool {
        self.closing
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
            self.last_activity = now;
            self.request_started.get_or_insert(now);
            self.inbuf.extend_from_slice(data);
        }
        let mut answered = 0;
        while !self.closing && queued + answered < MAX_QUEUED_RESPONSES {
            if let Some(pending) = &mut self.body {
                let take = (pending.remaining as usize).min(self.inbuf.len());
                pending.body.extend_from_slice(&self.inbuf[..take]);
                pending.remaining -= take as u64;
                self.inbuf.drain(..take);
                if pending.remaining > 0 {
                    return;
                }
                let pending = self.body.take().unwrap();
                let keep = pending.request.keep_alive;
                let response = match core.put(&pending.request, &pending.body) {
                    Ok(status) => {
                        core.counters.count(status);
                        let reason = if status == 201 {
                            "Created"
                        } else {
                            "No Content"
                        };
                        let mut head = crate::http::ResponseHead::new(status, reason)
                            .header("Connection", if keep { "keep-alive" } else { "close" });
                        if status == 201 {
                            head = head.header("Content-Length", 0);
                        }
                        head.finish()
                    }
                    Err(e) => core.error(&e, keep, false),
                };
                out.push(Outgoing::Bytes(response));
                answered += 1;
                self.closing = !keep;
                self.request_started = (!self.inbuf.is_empty()).then_some(now);
                continue;
            }
            if self.inbuf.is_empty() {
                self.request_started = None;
                return;
            }
            match parse_request(&self.inbuf, &core.limits) {
                Ok(Parsed::Partial) => return,
                Err(e) => {
                    // The stream is no longer in sync: answer and close.
                    out.push(Outgoing::Bytes(core.error(&e, false, false)));
                    self.closing = true;
                    return;
                }
                Ok(Parsed::Complete { request, head_len }) => {
                    self.inbuf.drain(..head_len);
                    core.counters.requests += 1;
                    answered += 1;
                    self.handle(request, now, core, out);
                }
            }
        }
    }

    fn handle(
        &mut self,
        request: Request,
        now: Instant,
        core: &mut ServerCore,
        out: &mut Vec<Outgoing>,
    ) {
        let keep = request.keep_alive;
        let head_only = request.method == Method::Head;
        let result = match request.method {
            Method::Get | Method::Head if request.raw_path() == METRICS_PATH => {
                core.counters.count(200);
                out.push(Outgoing::Metrics {
                    keep_alive: keep,
                    head_only,
                });
                Ok(())
            }
            Method::Get | Method::Head => core.get(&request, out),
            Method::Put => {
                let len = request.content_length.unwrap_or(0);
                match core.root.resolve(request.raw_path(), true) {
                    Err(e) => {
                        // The body still follows on the wire; we cannot resync: close.
                        out.push(Outgoing::Bytes(core.error(&e, false, false)));
                        self.closing = true;
                        return;
                    }
                    Ok(_) => {
                        if request
                            .header("Expect")
                            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
                        {
                            out.push(Outgoing::Bytes(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()));
                        }
                        self.request_started = Some(now);
                        self.body = Some(PendingBody {
                            request,
                            body: Vec::with_capacity(len as usize),
                            remaining: len,
                        });
                        return;
                    }
                }
            }
            Method::Other => {
                core.counters.count(405);
                let body = "405 Method Not Allowed\n";
                let head = crate::http::ResponseHead::new(405, "Method Not Allowed")
                    .header("Allow", "GET, HEAD, PUT")
                    .header("Content-Type", "text/plain; charset=utf-8")
                    .header("Content-Length", body.len())
                    .header("Connection", if keep { "keep-alive" } else { "close" })
                    .finish();
                let mut bytes = head;
                bytes.extend_from_slice(body.as_bytes());
                out.push(Outgoing::Bytes(bytes));
                Ok(())
            }
        };
        if let Err(e) = result {
            out.push(Outgoing::Bytes(core.error(&e, keep, head_only)));
        }
        if !keep {
            self.closing = true;
        }
        self.request_started = (!self.inbuf.is_empty()).then_some(now);
    }

    /// Enforce the idle and slow-client timeouts. Returns a 408 to send (then close) when a
    /// request is too slow, or `true` in `.1` when the connection should just be closed.
    pub fn check_timeouts(
        &mut self,
        now: Instant,
        core: &mut ServerCore,
    ) -> (Option<Vec<u8>>, bool) {
        if self.closing {
            return (None, false);
        }
        if let Some(started) = self.request_started {
            if now.duration_since(started) > core.request_timeout {
                core.counters.timeouts += 1;
                self.closing = true;
                let e = HttpError::new(408, "Request Timeout");
                return (Some(core.error(&e, false, false)), true);
            }
        } else if now.duration_since(self.last_activity) > core.idle_timeout {
            core.counters.timeouts += 1;
            self.closing = true;
            return (None, true);
        }
        (None, false)
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
            }
        }
        (heads, bodies)
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
        let (resp, close) = f.conn.check_timeouts(later, &mut f.core);
        assert!(
            close
                && String::from_utf8(resp.unwrap())
                    .unwrap()
                    .starts_with("HTTP/1.1 408 ")
        );
        let mut f = fixture(WritePolicy::CopyOnWrite);
        let (resp, close) = f.conn.check_timeouts(
            f.now + f.core.idle_timeout + Duration::from_secs(1),
            &mut f.core,
        );
        assert!(close && resp.is_none());
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
}
