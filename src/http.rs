//! HTTP/1.1 request parsing (with `httparse`) and response heads.
//!
//! This module knows nothing of sockets: the server feeds it received bytes and gets back a
//! parsed [`Request`] or an [`HttpError`] carrying the status to answer with.

use std::fmt::Write as _;

/// Limits that protect the server from oversized input.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request line plus headers.
    pub max_head_bytes: usize,
    pub max_headers: usize,
    /// Largest PUT body accepted (413 above).
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 256 << 20,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Put,
    /// Anything else: answered with 405.
    Other,
}

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The request target as sent (percent-encoded path plus optional query).
    pub target: String,
    /// HTTP/1.0 (0) or HTTP/1.1 (1).
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
    /// Body length for PUT (`Content-Length`).
    pub content_length: Option<u64>,
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

    /// The path part of the target (before `?`), still percent-encoded.
    pub fn raw_path(&self) -> &str {
        self.target.split(['?', '#']).next().unwrap_or("")
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
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "PUT" => Method::Put,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("").to_string();
    if !target.starts_with('/') {
        return Err(HttpError::new(400, "Bad Request"));
    }
    let minor_version = req.version.unwrap_or(1);
    let mut out_headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HttpError::new(400, "Bad Request"))?;
        out_headers.push((h.name.to_string(), value.trim().to_string()));
    }
    let mut request = Request {
        method,
        target,
        minor_version,
        headers: out_headers,
        content_length: None,
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
    let lengths: Vec<&str> = request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
        .map(|(_, v)| v.as_str())
        .collect();
    if let Some(first) = lengths.first() {
        // Differing duplicate Content-Length headers are a request-smuggling vector.
        if lengths.iter().any(|l| l != first) || !first.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::new(400, "Bad Request"));
        }
        request.content_length = Some(
            first
                .parse()
                .map_err(|_| HttpError::new(400, "Bad Request"))?,
        );
    }
    if request.header("Transfer-Encoding").is_some() {
        // Bodies must come with a Content-Length; chunked uploads are not supported.
        return Err(HttpError::new(411, "Length Required"));
    }
    if request.method == Method::Put {
        match request.content_length {
            None => return Err(HttpError::new(411, "Length Required")),
            Some(n) if n > limits.max_body_bytes => {
                return Err(HttpError::new(413, "Content Too Large"))
            }
            _ => {}
        }
    }
    Ok(Parsed::Complete { request, head_len })
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
        assert_eq!(
            parse("PUT /f HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap_err()
                .status,
            411
        );
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
    fn other_methods_are_parsed_for_a_405() {
        let (r, _) = complete("DELETE /x HTTP/1.1\r\n\r\n");
        assert_eq!(r.method, Method::Other);
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
}
