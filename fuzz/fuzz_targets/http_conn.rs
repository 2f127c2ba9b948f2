//! The HTTP connection state machine (`src/conn.rs` `Connection::on_bytes` and
//! `check_timeouts`, with the request parser, responses, range and conditional logic, PUT
//! uploads and the page cache behind them) driven with arbitrary byte chunks: raw bytes and
//! requests assembled from a small grammar of methods, paths (traversal attempts included),
//! headers and bodies, cut into arbitrary arrivals, with time passing and the response queue
//! filling up. The server's own source files are compiled in with `#[path]` (no library seam
//! in the root package). Checks: no panic; a parked response resolves (never hangs); every
//! response starts with a status line, ends with one end marker, and a file body is exactly
//! as long as its head's Content-Length says.
#![no_main]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pagecache::{Attempt, CacheConfig, FrameArena, PageCache, WritePolicy};

#[allow(dead_code)]
#[path = "../../src/conn.rs"]
mod conn;
#[allow(dead_code)]
#[path = "../../src/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "../../src/respond.rs"]
mod respond;
#[allow(dead_code)]
#[path = "../../src/root.rs"]
mod root;
#[allow(dead_code)]
#[path = "../../src/upload.rs"]
mod upload;
#[allow(dead_code)]
#[path = "../../src/warnings.rs"]
mod warnings;

use conn::{Connection, Outgoing, PutAccess, Role, ServerCore};

const METHODS: &[&str] = &[
    "GET", "HEAD", "PUT", "OPTIONS", "DELETE", "POST", "get", "PRI",
];
const PATHS: &[&str] = &[
    "/hello.txt",
    "/big.bin",
    "/",
    "/new.txt",
    "/sub/",
    "/../etc/passwd",
    "/%2e%2e/x",
    "/hello.txt?x=1#f",
    "*",
    "http://h/hello.txt",
    "/_zerosend/metrics",
    "/.zerosend-upload-x",
    "/big.bin%00",
];
const HEADERS: &[&str] = &[
    "Host: h",
    "Connection: close",
    "Connection: keep-alive",
    "Range: bytes=0-10",
    "Range: bytes=-5",
    "Range: bytes=100-",
    "Range: bytes=5-2",
    "Range: bytes=0-1,3-4",
    "If-None-Match: *",
    "If-Modified-Since: Thu, 01 Jan 2099 00:00:00 GMT",
    "If-Range: \"x\"",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: gzip, chunked",
    "Content-Length: 5",
    "Content-Length: 0",
    "Content-Length: 99999999999999999999",
    "Content-Length: 3, 3",
    "Content-Range: bytes 0-4/5",
    "Content-Range: bytes 2-6/*",
    "Content-Range: bytes 0-4/3",
    "Expect: 100-continue",
];

#[derive(Arbitrary, Debug)]
enum Piece {
    Raw(Vec<u8>),
    Request {
        method: u8,
        path: u8,
        http10: bool,
        headers: Vec<u8>,
        /// Sent as the body (framed or not by the headers chosen).
        body: Vec<u8>,
    },
    /// A chunked body: each chunk's bytes, then the last chunk.
    Chunked(Vec<Vec<u8>>),
    Wait {
        ms: u16,
    },
    /// Responses the server has not sent yet (the response queue's fill).
    Queued(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    wait_policy: bool,
    /// Where the stream of bytes is cut into arrivals.
    cuts: Vec<u8>,
    pieces: Vec<Piece>,
}

fn base_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Drains a file body as the server does, piece by piece, waiting for fills.
fn drain(body: &mut conn::FileBody) -> u64 {
    let mut n = body.first.take().map_or(0, |p| p.len());
    let deadline = Instant::now() + Duration::from_secs(10);
    while body.snapshot.remaining() > 0 {
        match body.snapshot.pin_next(256 * 1024) {
            Ok(Attempt::Ready(pin)) => n += pin.len(),
            Ok(Attempt::Pending(p)) => assert!(p.wait_until(deadline), "a fill never completed"),
            // The file changed under the snapshot: the server resets such a connection.
            Err(_) => return u64::MAX,
        }
    }
    n
}

/// Checks the responses in `out` (and consumes their bodies).
fn check(out: &mut Vec<Outgoing>) {
    let mut head: Option<String> = None;
    let mut body_len: u64 = 0;
    let mut file = false;
    for o in out.iter_mut() {
        match o {
            Outgoing::Bytes(b) => {
                if head.is_none() {
                    let text = String::from_utf8_lossy(b).into_owned();
                    if text.starts_with("HTTP/1.1 100 Continue\r\n\r\n") {
                        continue; // an interim response (Expect: 100-continue)
                    }
                    assert!(text.starts_with("HTTP/1.1 "), "not a status line: {text:?}");
                    head = Some(text);
                } else {
                    body_len += b.len() as u64;
                }
            }
            Outgoing::File(body) => {
                assert!(head.is_some(), "file body without a head");
                file = true;
                let n = drain(body);
                body_len = body_len.saturating_add(n);
            }
            Outgoing::Metrics { .. } => head = Some("HTTP/1.1 200 metrics".into()),
            Outgoing::End(end) => {
                let h = head.take().expect("end of a response without a head");
                assert!(
                    h.starts_with(&format!("HTTP/1.1 {}", end.status)),
                    "end says {} for {h:?}",
                    end.status
                );
                if file && body_len != u64::MAX {
                    let length = h
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .expect("file response without Content-Length");
                    assert_eq!(length, body_len, "Content-Length and body differ: {h:?}");
                }
                body_len = 0;
                file = false;
            }
        }
    }
    out.clear();
}

fuzz_target!(|input: Input| {
    let dir = tempfile::Builder::new()
        .prefix("zs-fuzz-conn")
        .tempdir_in(base_dir())
        .unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello, world\n").unwrap();
    std::fs::write(dir.path().join("big.bin"), vec![7u8; 50_000]).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let cache = PageCache::new(
        FrameArena::anonymous(0x1000_0000, 1 << 20).unwrap(),
        CacheConfig::default(),
    )
    .unwrap();
    let policy = if input.wait_policy {
        WritePolicy::Wait {
            timeout: Duration::from_millis(5),
        }
    } else {
        WritePolicy::CopyOnWrite
    };
    let limits = http::Limits {
        max_body_bytes: 64 * 1024,
        ..http::Limits::default()
    };
    let mut core = ServerCore::new(
        root::ServeRoot::new(dir.path()).unwrap(),
        cache,
        policy,
        limits,
    );
    core.record_request_lines = true;
    // Writes on, so PUT bodies, uploads and ranged writes are exercised (not only the 405).
    core.put_access = PutAccess::Open;
    let mut offset = Duration::ZERO;
    let now = |offset: Duration| Instant::now() + offset;
    let mut conn = Connection::with_role(Role::Files, now(offset));
    let mut out = Vec::new();
    let mut queued = 0usize;
    let mut cuts = input.cuts.iter().cycle().map(|&c| c as usize + 1);
    let cuts_empty = input.cuts.is_empty();

    let feed = |conn: &mut Connection,
                core: &mut ServerCore,
                bytes: &[u8],
                offset: Duration,
                queued: usize,
                out: &mut Vec<Outgoing>| {
        conn.on_bytes(bytes, now(offset), queued, core, out);
        let deadline = Instant::now() + Duration::from_secs(10);
        while conn.is_parked() {
            assert!(
                Instant::now() < deadline,
                "a parked response never resolved"
            );
            std::thread::sleep(Duration::from_micros(200));
            conn.on_bytes(&[], now(offset), queued, core, out);
        }
    };

    for piece in input.pieces.into_iter().take(32) {
        if conn.closing() {
            break;
        }
        let mut bytes = Vec::new();
        match piece {
            Piece::Raw(b) => bytes = b,
            Piece::Request {
                method,
                path,
                http10,
                headers,
                body,
            } => {
                let m = METHODS[method as usize % METHODS.len()];
                let p = PATHS[path as usize % PATHS.len()];
                let v = if http10 { "1.0" } else { "1.1" };
                bytes.extend(format!("{m} {p} HTTP/{v}\r\n").bytes());
                for h in headers.iter().take(6) {
                    bytes.extend(HEADERS[*h as usize % HEADERS.len()].bytes());
                    bytes.extend(b"\r\n");
                }
                bytes.extend(b"\r\n");
                bytes.extend(body);
            }
            Piece::Chunked(chunks) => {
                for c in chunks.iter().take(8) {
                    bytes.extend(format!("{:x}\r\n", c.len()).bytes());
                    bytes.extend(c);
                    bytes.extend(b"\r\n");
                }
                bytes.extend(b"0\r\n\r\n");
            }
            Piece::Wait { ms } => {
                offset += Duration::from_millis(ms as u64 * 50);
                conn.check_timeouts(now(offset), &mut core, &mut out);
            }
            Piece::Queued(n) => queued = n as usize % (conn::MAX_QUEUED_RESPONSES + 2),
        }
        let mut at = 0;
        let held_deadline = Instant::now() + Duration::from_secs(10);
        while at < bytes.len() && !conn.closing() {
            let n = if cuts_empty {
                bytes.len()
            } else {
                cuts.next().unwrap()
            };
            let end = (at + n).min(bytes.len());
            if conn.wants_input() {
                feed(
                    &mut conn,
                    &mut core,
                    &bytes[at..end],
                    offset,
                    queued,
                    &mut out,
                );
                at = end;
            } else {
                // Held back (queue full, body room): the server stops reading; the queue
                // drains as responses go out.
                assert!(Instant::now() < held_deadline, "input held back forever");
                queued = 0;
                std::thread::sleep(Duration::from_micros(100));
                feed(&mut conn, &mut core, &[], offset, queued, &mut out);
            }
            check(&mut out);
        }
        feed(&mut conn, &mut core, &[], offset, queued, &mut out);
        check(&mut out);
    }
    queued = 0;
    feed(&mut conn, &mut core, &[], offset, queued, &mut out);
    check(&mut out);
    drop(conn);
});
