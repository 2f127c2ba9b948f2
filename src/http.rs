//! HTTP/1.1 request parsing (with `httparse`) and response heads.
//!
//! This module knows nothing of sockets: the server feeds it received bytes and gets back a
//! parsed [`Request`] or an [`HttpError`] carrying the status to answer with.

use std::fmt::Write as _;
use std::ops::Range;

/// Limits that protect the server from oversized input.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request line plus headers.
    pub max_head_bytes: usize,
    pub max_headers: usize,
    /// Longest request target (414 above).
    pub max_target_bytes: usize,
    /// Largest PUT body accepted (413 above).
    pub max_body_bytes: u64,
    /// Largest body of any other request. Such a body is read and thrown away as it arrives
    /// (never buffered, never parsed as a request); above this, 413 and close, so a client
    /// cannot keep a connection busy with a body nobody uses.
    pub max_discarded_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 16 * 1024,
            max_headers: 64,
            // RFC 9112 section 3 recommends supporting request lines of at least 8000 octets.
            max_target_bytes: 8 * 1024,
            max_body_bytes: 256 << 20,
            max_discarded_body_bytes: 64 * 1024,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Put,
    Options,
    /// Anything else: answered with 405.
    Other,
}

/// The methods the server implements, for `Allow` headers.
pub const ALLOWED_METHODS: &str = "GET, HEAD, PUT, OPTIONS";

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The method token as sent (`DELETE` for [`Method::Other`]).
    pub method_name: String,
    /// The request target as sent: origin-form (`/path?query`), absolute-form
    /// (`http://host/path`) or asterisk-form (`*`, OPTIONS only).
    pub target: String,
    /// Where the path starts in `target` (after `http://host` in absolute-form).
    pub path_start: usize,
    /// HTTP/1.0 (0) or HTTP/1.1 (1).
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
    /// Body length (`Content-Length`), on any method.
    pub content_length: Option<u64>,
    /// The body is `Transfer-Encoding: chunked` (PUT only; see [`ChunkedDecoder`]).
    pub chunked: bool,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

impl Request {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path part of the target (before `?`), still percent-encoded; `*` for
    /// asterisk-form. An absolute-form target without a path names `/`.
    pub fn raw_path(&self) -> &str {
        let path = self.target[self.path_start..]
            .split(['?', '#'])
            .next()
            .unwrap_or("");
        if path.is_empty() {
            "/"
        } else {
            path
        }
    }

    /// The request line as received, for the access log: `GET /a HTTP/1.1`.
    pub fn request_line(&self) -> String {
        format!(
            "{} {} HTTP/1.{}",
            self.method_name, self.target, self.minor_version
        )
    }
}

/// A request that cannot be served, with the status to answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {reason}")]
pub struct HttpError {
    pub status: u16,
    pub reason: &'static str,
}

impl HttpError {
    pub const fn new(status: u16, reason: &'static str) -> Self {
        HttpError { status, reason }
    }
}

/// Result of feeding the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes needed.
    Partial,
    /// A request head of `head_len` bytes.
    Complete { request: Request, head_len: usize },
}

/// Parse a request head from the start of `buf`.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Parsed, HttpError> {
    // Before httparse, so that an endless target is refused as soon as it is too long
    // rather than when the head limit is reached.
    if target_len_so_far(buf) > limits.max_target_bytes {
        return Err(HttpError::new(414, "URI Too Long"));
    }
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(431, "Request Header Fields Too Large"))
        }
        Err(_) => return Err(HttpError::new(400, "Bad Request")),
    };
    let head_len = match status {
        httparse::Status::Partial => {
            if buf.len() > limits.max_head_bytes {
                return Err(HttpError::new(431, "Request Header Fields Too Large"));
            }
            return Ok(Parsed::Partial);
        }
        httparse::Status::Complete(n) => n,
    };
    if head_len > limits.max_head_bytes {
        return Err(HttpError::new(431, "Request Header Fields Too Large"));
    }
    let method_name = req.method.unwrap_or("");
    let method = match method_name {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "PUT" => Method::Put,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("").to_string();
    let path_start = path_start(method, &target)?;
    let minor_version = req.version.unwrap_or(1);
    let mut out_headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HttpError::new(400, "Bad Request"))?;
        out_headers.push((h.name.to_string(), value.trim().to_string()));
    }
    let mut request = Request {
        method,
        method_name: method_name.to_string(),
        target,
        path_start,
        minor_version,
        headers: out_headers,
        content_length: None,
        chunked: false,
        keep_alive: minor_version >= 1,
    };
    if let Some(conn) = request.header("Connection").map(str::to_owned) {
        for token in conn.split(',').map(str::trim) {
            if token.eq_ignore_ascii_case("close") {
                request.keep_alive = false;
            } else if token.eq_ignore_ascii_case("keep-alive") {
                request.keep_alive = true;
            }
        }
    }
    request.content_length = content_length(&request)?;
    request.chunked = check_transfer_encoding(&request)?;
    match (request.method, request.content_length) {
        (Method::Put, None) if !request.chunked => {
            return Err(HttpError::new(411, "Length Required"))
        }
        (Method::Put, Some(n)) if n > limits.max_body_bytes => {
            return Err(HttpError::new(413, "Content Too Large"))
        }
        (Method::Put, Some(_)) => {}
        (_, Some(n)) if n > limits.max_discarded_body_bytes => {
            return Err(HttpError::new(413, "Content Too Large"))
        }
        _ => {}
    }
    Ok(Parsed::Complete { request, head_len })
}

/// How long the request target at the start of `buf` is, as far as it has arrived (0 before
/// the method's end).
fn target_len_so_far(buf: &[u8]) -> usize {
    // httparse skips empty lines before a request line; so does this.
    let line_start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let line = &buf[line_start..];
    let method_end = line.iter().position(|&b| matches!(b, b' ' | b'\n'));
    let Some(space) = method_end.filter(|&i| line[i] == b' ') else {
        return 0;
    };
    let rest = &line[space + 1..];
    rest.iter()
        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(rest.len())
}

/// Where the path starts in a request target (RFC 9112 section 3.2): origin-form `/p`,
/// absolute-form `http://host/p` (which a server must accept, section 3.2.2; the host in it
/// is not used, as we serve one root), or `*` for OPTIONS.
fn path_start(method: Method, target: &str) -> Result<usize, HttpError> {
    let bad = HttpError::new(400, "Bad Request");
    if target.starts_with('/') {
        return Ok(0);
    }
    if target == "*" {
        return if method == Method::Options {
            Ok(0)
        } else {
            Err(bad)
        };
    }
    let scheme_len = ["http://", "https://"]
        .iter()
        .find(|scheme| {
            target
                .get(..scheme.len())
                .is_some_and(|t| t.eq_ignore_ascii_case(scheme))
        })
        .map(|scheme| scheme.len())
        .ok_or(bad.clone())?;
    let rest = &target[scheme_len..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    // An http URI needs a host (RFC 9110 section 4.2.1); userinfo in it is a phishing
    // vector we refuse (section 4.2.4).
    if authority.is_empty() || authority.contains('@') {
        return Err(bad);
    }
    Ok(scheme_len + authority_len)
}

/// The body length a `Content-Length` header gives, if any.
fn content_length(request: &Request) -> Result<Option<u64>, HttpError> {
    let bad = HttpError::new(400, "Bad Request");
    let mut lengths = request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
        .map(|(_, v)| v.as_str());
    let Some(first) = lengths.next() else {
        return Ok(None);
    };
    // Differing duplicate Content-Length headers are a request-smuggling vector.
    if lengths.any(|l| l != first) || !first.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    first.parse().map(Some).map_err(|_| bad)
}

/// `Transfer-Encoding` (RFC 9112 section 6): only a PUT body may be chunked (returns `true`);
/// any other request with it is refused, as a body whose framing we do not follow would be
/// read as the next request.
fn check_transfer_encoding(request: &Request) -> Result<bool, HttpError> {
    let codings: Vec<&str> = request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Transfer-Encoding"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .collect();
    let Some(last) = codings.last() else {
        return Ok(false);
    };
    // Both framings at once is how requests are smuggled past a proxy: always refused
    // (section 6.3, rule 3). Without chunked last, the length cannot be known (rule 4).
    if request.content_length.is_some() || !last.eq_ignore_ascii_case("chunked") {
        return Err(HttpError::new(400, "Bad Request"));
    }
    // Other codings under chunked (gzip, ...) would have to be undone to store the body.
    if codings.len() > 1 {
        return Err(HttpError::new(501, "Not Implemented"));
    }
    if request.method == Method::Put {
        Ok(true)
    } else {
        Err(HttpError::new(501, "Not Implemented"))
    }
}

/// A response head being built.
pub struct ResponseHead {
    text: String,
}

impl ResponseHead {
    pub fn new(status: u16, reason: &str) -> Self {
        let mut text = String::with_capacity(256);
        write!(text, "HTTP/1.1 {status} {reason}\r\nServer: zerosend\r\n").unwrap();
        ResponseHead { text }
    }

    pub fn header(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        write!(self.text, "{name}: {value}\r\n").unwrap();
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.text.push_str("\r\n");
        self.text.into_bytes()
    }
}

/// A complete response with a short text body (errors, PUT results, metrics).
pub fn simple_response(
    status: u16,
    reason: &str,
    body: &str,
    keep_alive: bool,
    head_only: bool,
) -> Vec<u8> {
    let mut out = ResponseHead::new(status, reason)
        .header("Content-Type", "text/plain; charset=utf-8")
        .header("Content-Length", body.len())
        .header(
            "Connection",
            if keep_alive { "keep-alive" } else { "close" },
        )
        .finish();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// What [`ChunkedDecoder::step`] found at the start of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkStep {
    /// Body bytes: `input[range]` (then consume `range.end`).
    Data(Range<usize>),
    /// This many framing bytes (a size line, a CRLF, a trailer line), to consume.
    Framing(usize),
    /// The input ends inside a size or trailer line: wait for more.
    NeedMore,
    /// The last chunk and the trailers end after this many bytes (to consume); the body is
    /// complete.
    Done(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data { remaining: u64 },
    DataEnd,
    Trailers,
}

/// Decodes a `Transfer-Encoding: chunked` body (RFC 9112 section 7.1) as it arrives, without
/// copying: the caller feeds what it has buffered and consumes what each step names. Size
/// lines (`httparse::parse_chunk_size`, extensions ignored) and trailer lines are bounded by
/// `max_line`; trailers are read and dropped.
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    max_line: usize,
}

impl ChunkedDecoder {
    pub fn new(max_line: usize) -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            max_line,
        }
    }

    /// The next step over `input` (what is buffered), giving at most `max_data` body bytes.
    pub fn step(&mut self, input: &[u8], max_data: usize) -> Result<ChunkStep, HttpError> {
        let bad = || HttpError::new(400, "Bad Request");
        match self.state {
            ChunkState::Size => match httparse::parse_chunk_size(input) {
                Ok(httparse::Status::Complete((len, 0))) => {
                    self.state = ChunkState::Trailers;
                    Ok(ChunkStep::Framing(len))
                }
                Ok(httparse::Status::Complete((len, size))) => {
                    self.state = ChunkState::Data { remaining: size };
                    Ok(ChunkStep::Framing(len))
                }
                Ok(httparse::Status::Partial) if input.len() <= self.max_line => {
                    Ok(ChunkStep::NeedMore)
                }
                _ => Err(bad()),
            },
            ChunkState::Data { remaining } => {
                let take = remaining.min(input.len() as u64).min(max_data as u64) as usize;
                if take == 0 {
                    return Ok(ChunkStep::NeedMore);
                }
                let remaining = remaining - take as u64;
                self.state = if remaining == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data { remaining }
                };
                Ok(ChunkStep::Data(0..take))
            }
            ChunkState::DataEnd => match input {
                [b'\r', b'\n', ..] => {
                    self.state = ChunkState::Size;
                    Ok(ChunkStep::Framing(2))
                }
                [] | [b'\r'] => Ok(ChunkStep::NeedMore),
                _ => Err(bad()),
            },
            ChunkState::Trailers => {
                let Some(end) = input.windows(2).position(|w| w == b"\r\n") else {
                    return if input.len() <= self.max_line {
                        Ok(ChunkStep::NeedMore)
                    } else {
                        Err(bad())
                    };
                };
                if end > self.max_line {
                    return Err(bad());
                }
                if end == 0 {
                    self.state = ChunkState::Size;
                    Ok(ChunkStep::Done(2))
                } else {
                    Ok(ChunkStep::Framing(end + 2))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Parsed, HttpError> {
        parse_request(s.as_bytes(), &Limits::default())
    }

    fn complete(s: &str) -> (Request, usize) {
        match parse(s).unwrap() {
            Parsed::Complete { request, head_len } => (request, head_len),
            Parsed::Partial => panic!("partial"),
        }
    }

    #[test]
    fn parses_get_with_keep_alive_defaults() {
        let (r, n) = complete("GET /a%20b?x=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /next");
        assert_eq!(n, "GET /a%20b?x=1 HTTP/1.1\r\nHost: x\r\n\r\n".len());
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.raw_path(), "/a%20b");
        assert!(r.keep_alive);
        let (r, _) = complete("GET / HTTP/1.0\r\n\r\n");
        assert!(!r.keep_alive, "HTTP/1.0 closes by default");
        let (r, _) = complete("GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!r.keep_alive);
    }

    #[test]
    fn partial_until_blank_line() {
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap(),
            Parsed::Partial
        );
    }

    #[test]
    fn malformed_and_oversized_requests_get_their_status() {
        assert_eq!(parse("GARBAGE\r\n\r\n").unwrap_err().status, 400);
        assert_eq!(
            parse("GET nopath HTTP/1.1\r\n\r\n").unwrap_err().status,
            400
        );
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n"))
                .unwrap_err()
                .status,
            431
        );
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(20_000));
        assert_eq!(parse(&long).unwrap_err().status, 431);
        assert_eq!(parse("PUT /f HTTP/1.1\r\n\r\n").unwrap_err().status, 411);
        let Parsed::Complete { request, .. } =
            parse("PUT /f HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap()
        else {
            panic!("partial")
        };
        assert!(request.chunked && request.content_length.is_none());
        assert_eq!(
            parse("PUT /f HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n")
                .unwrap_err()
                .status,
            413
        );
        assert_eq!(
            parse("PUT /f HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            parse("PUT /f HTTP/1.1\r\nContent-Length: -1\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn bodies_are_framed_by_content_length_on_every_method() {
        let (r, _) = complete("GET /a HTTP/1.1\r\nContent-Length: 37\r\n\r\n");
        assert_eq!(r.content_length, Some(37));
        let (r, _) = complete("DELETE /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(r.content_length, Some(0));
        let limit = Limits::default().max_discarded_body_bytes;
        let over = format!("GET /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n", limit + 1);
        assert_eq!(parse(&over).unwrap_err().status, 413);
        let at = format!("GET /a HTTP/1.1\r\nContent-Length: {limit}\r\n\r\n");
        assert!(parse(&at).is_ok());
        assert_eq!(
            parse("GET /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
    }

    /// RFC 9112 section 6.3: Transfer-Encoding with Content-Length is always refused;
    /// chunked not last, 400; chunked is taken on a PUT only, else 501.
    #[test]
    fn transfer_encoding_is_refused() {
        let status = |head: &str| parse(&format!("{head}\r\n\r\n")).unwrap_err().status;
        assert_eq!(status("GET / HTTP/1.1\r\nTransfer-Encoding: chunked"), 501);
        assert_eq!(
            status("DELETE / HTTP/1.1\r\ntransfer-encoding: CHUNKED"),
            501
        );
        assert_eq!(
            status("PUT /f HTTP/1.1\r\nTransfer-Encoding: gzip, chunked"),
            501
        );
        assert_eq!(status("GET / HTTP/1.1\r\nTransfer-Encoding: gzip"), 400);
        assert_eq!(
            status("GET / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip"),
            400
        );
        assert_eq!(
            status("GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked"),
            501,
            "the last coding of all the fields counts (and gzip is not undone)"
        );
        for te_and_cl in [
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5",
            "PUT /f HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
            "DELETE / HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: identity",
        ] {
            assert_eq!(status(te_and_cl), 400, "{te_and_cl:?}");
        }
    }

    #[test]
    fn request_target_forms() {
        let (r, _) = complete("GET http://example.com:8080/a%20b?q=1 HTTP/1.1\r\n\r\n");
        assert_eq!(
            (r.raw_path(), r.target.as_str()),
            ("/a%20b", "http://example.com:8080/a%20b?q=1")
        );
        let (r, _) = complete("GET HTTPS://h HTTP/1.1\r\n\r\n");
        assert_eq!(r.raw_path(), "/", "no path: the root");
        let (r, _) = complete("HEAD http://h?x HTTP/1.1\r\n\r\n");
        assert_eq!(r.raw_path(), "/");
        let (r, _) = complete("OPTIONS * HTTP/1.1\r\n\r\n");
        assert_eq!((r.method, r.raw_path()), (Method::Options, "*"));
        assert_eq!(r.request_line(), "OPTIONS * HTTP/1.1");
        for bad in [
            "GET * HTTP/1.1",
            "GET http:///a HTTP/1.1",
            "GET http://user@h/a HTTP/1.1",
            "GET ftp://h/a HTTP/1.1",
            "GET h:80 HTTP/1.1",
        ] {
            assert_eq!(
                parse(&format!("{bad}\r\n\r\n")).unwrap_err().status,
                400,
                "{bad}"
            );
        }
    }

    #[test]
    fn long_targets_get_414_even_before_the_line_ends() {
        let max = Limits::default().max_target_bytes;
        let at = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(max - 1));
        assert!(parse(&at).is_ok());
        let over = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(max));
        assert_eq!(parse(&over).unwrap_err().status, 414);
        let unfinished = format!("GET /{}", "a".repeat(max));
        assert_eq!(parse(&unfinished).unwrap_err().status, 414);
        let absolute = format!("GET http://h/{} HTTP/1.1\r\n\r\n", "a".repeat(max));
        assert_eq!(parse(&absolute).unwrap_err().status, 414);
        // A long header is not a long target.
        let header = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(max + 10));
        assert!(parse(&header).is_ok());
        let no_space_first = format!("GARBAGE\r\nX: {}\r\n\r\n", "a".repeat(max + 10));
        assert_eq!(parse(&no_space_first).unwrap_err().status, 400);
    }

    #[test]
    fn options_is_a_method_of_its_own() {
        let (r, _) = complete("OPTIONS /x HTTP/1.1\r\n\r\n");
        assert_eq!(r.method, Method::Options);
    }

    #[test]
    fn other_methods_are_parsed_for_a_405() {
        let (r, _) = complete("DELETE /x HTTP/1.1\r\n\r\n");
        assert_eq!(r.method, Method::Other);
        assert_eq!(r.request_line(), "DELETE /x HTTP/1.1");
    }

    #[test]
    fn response_head_format() {
        let h = ResponseHead::new(200, "OK")
            .header("Content-Length", 5)
            .finish();
        assert_eq!(
            h,
            b"HTTP/1.1 200 OK\r\nServer: zerosend\r\nContent-Length: 5\r\n\r\n"
        );
    }
    /// Decodes `body` fed in pieces of `piece` bytes, like a connection receiving it.
    fn dechunk(body: &[u8], piece: usize) -> Result<Vec<u8>, HttpError> {
        let mut decoder = ChunkedDecoder::new(64);
        let mut buffered = Vec::new();
        let mut out = Vec::new();
        for part in body.chunks(piece) {
            buffered.extend_from_slice(part);
            loop {
                match decoder.step(&buffered, 5)? {
                    ChunkStep::Data(r) => {
                        out.extend_from_slice(&buffered[r.clone()]);
                        buffered.drain(..r.end);
                    }
                    ChunkStep::Framing(n) => drop(buffered.drain(..n)),
                    ChunkStep::NeedMore => break,
                    ChunkStep::Done(n) => {
                        buffered.drain(..n);
                        assert!(buffered.is_empty(), "bytes after the body");
                        return Ok(out);
                    }
                }
            }
        }
        Err(HttpError::new(0, "incomplete"))
    }

    #[test]
    fn chunked_bodies_decode_however_they_arrive() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\n";
        for piece in [1, 2, 3, 7, body.len()] {
            assert_eq!(
                dechunk(body, piece).unwrap(),
                b"helloabcdefghijklmnopqrstuvwxyz",
                "{piece}"
            );
        }
        assert_eq!(dechunk(b"0\r\n\r\n", 1).unwrap(), b"");
    }

    #[test]
    fn malformed_chunked_bodies_are_400() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"ffffffffffffffffffff\r\n",
            b"5                                                                                 ",
        ] {
            assert_eq!(dechunk(bad, 3).unwrap_err().status, 400, "{bad:?}");
        }
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "a".repeat(100));
        assert_eq!(dechunk(long_trailer.as_bytes(), 4).unwrap_err().status, 400);
    }
}
