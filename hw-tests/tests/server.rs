//! End-to-end tests of `zerosend serve` in a guest, on every NIC model, with real clients:
//! curl and Linux TCP sockets on the host side of a TAP device in a network namespace the
//! harness created. One guest boot per NIC model runs every check in turn.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw_tests::content::{check_stamped, random_bytes, sha256_hex, stamped_version};
use hw_tests::netns::GUEST_IP;
use hw_tests::serve_guest::{metrics_url, url, ServerGuest, ACCESS_FLAGS, BIG_LEN, PORT};
use hw_tests::Nic;

const STAMP_BLOCKS: usize = 64; // 256 KiB version-stamped file

fn boot(nic: Nic) -> ServerGuest {
    ServerGuest::boot("server", nic, 42, |guest| {
        guest
            .pcap()
            .file("/data/sub/index.html", b"<h1>index</h1>\n".to_vec())
            .file("/data/versioned.bin", stamped_version(0, STAMP_BLOCKS))
            .file("/secret.txt", b"outside the root\n".to_vec())
            .symlink("/data/escape", "/secret.txt")
            .run(&format!(
                "zerosend serve --nic auto --root /data --ip {GUEST_IP}/24 --port {PORT} {ACCESS_FLAGS} \
                 --audit --pcap /data/capture.pcap --max-connections 100 --write-policy cow \
                 --access-log /data/access.log"
            ))
    })
}

/// A raw TCP connection from inside the namespace; `f` runs there.
fn tcp<T: Send + 'static>(srv: &ServerGuest, f: impl FnOnce(TcpStream) -> T + Send + 'static) -> T {
    srv.guest
        .netns()
        .spawn(move || {
            let s = TcpStream::connect((GUEST_IP, PORT)).expect("connect to the guest");
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            f(s)
        })
        .join()
        .unwrap()
}

/// Read one HTTP response (head + Content-Length body) from a stream.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return (head, body);
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Send `request` on a fresh connection, close our sending half, and return every byte the
/// server sends until it closes (or until a reset or the read timeout: what came first).
fn exchange(srv: &ServerGuest, request: Vec<u8>) -> Vec<u8> {
    tcp(srv, move |mut s| {
        s.write_all(&request).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 65536];
        while let Ok(n) = s.read(&mut chunk) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        got
    })
}

/// `Date:` is the only header whose value differs between two answers to one request.
fn without_dates(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split("\r\n")
        .map(|line| {
            if line.starts_with("Date: ") {
                "Date: *"
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// The server's exact error response (a short text body naming the status).
fn error_response(status: u16, reason: &str, keep_alive: bool) -> String {
    let body = format!("{status} {reason}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nServer: zerosend\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: {}\r\n\r\n{body}",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
}

#[track_caller]
fn check_bytes(srv: &ServerGuest, got: &[u8], expected: &str, what: &str) {
    srv.check(
        got == expected.as_bytes(),
        &format!(
            "{what}: got {:?}, expected {expected:?}",
            String::from_utf8_lossy(got)
        ),
    );
}

/// The CL.0 desync of the issue: a body is framed by its Content-Length whatever the method,
/// so a body that is itself a request is never executed.
fn bodies_are_never_requests(srv: &ServerGuest) {
    let smuggled = "GET /hello.txt HTTP/1.1\r\nHost: xy\r\n\r\n";
    assert_eq!(smuggled.len(), 37, "the issue's Content-Length");
    let last = "GET /nope-last HTTP/1.1\r\nConnection: close\r\n\r\n";
    let with_body = |first: &str| {
        format!("{first} HTTP/1.1\r\nHost: guest\r\nContent-Length: 37\r\n\r\n{smuggled}{last}")
            .into_bytes()
    };
    let method_not_allowed = "HTTP/1.1 405 Method Not Allowed\r\nServer: zerosend\r\n\
        Allow: GET, HEAD, PUT, OPTIONS\r\nContent-Type: text/plain; charset=utf-8\r\n\
        Content-Length: 23\r\nConnection: keep-alive\r\n\r\n405 Method Not Allowed\n";
    let last_answer = error_response(404, "Not Found", false);
    check_bytes(
        srv,
        &exchange(srv, with_body("DELETE /hello.txt")),
        &format!("{method_not_allowed}{last_answer}"),
        "DELETE with a request as its body",
    );
    check_bytes(
        srv,
        &exchange(srv, with_body("GET /nope")),
        &format!("{}{last_answer}", error_response(404, "Not Found", true)),
        "404 with a request as its body",
    );
    // A GET of a file gets exactly what the same GET without a body gets.
    let reference = exchange(
        srv,
        format!("GET /hello.txt HTTP/1.1\r\nHost: guest\r\n\r\n{last}").into_bytes(),
    );
    let got = exchange(srv, with_body("GET /hello.txt"));
    srv.check(
        reference.starts_with(b"HTTP/1.1 200 ") && without_dates(&got) == without_dates(&reference),
        &format!(
            "GET with a request as its body: got {:?}, expected {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&reference)
        ),
    );
    // Over the discard limit (64 KiB): refused, and the connection closed.
    check_bytes(
        srv,
        &exchange(
            srv,
            format!("GET /hello.txt HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{last}").into_bytes(),
        ),
        &error_response(413, "Content Too Large", false),
        "GET with a body over the limit",
    );
    // Transfer-Encoding on a GET (RFC 9112 section 6.3): refused, and closed.
    check_bytes(
        srv,
        &exchange(
            srv,
            format!("GET /hello.txt HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{last}")
                .into_bytes(),
        ),
        &error_response(501, "Not Implemented", false),
        "GET with Transfer-Encoding",
    );
    check_bytes(
        srv,
        &exchange(
            srv,
            format!(
                "PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{last}"
            )
            .into_bytes(),
        ),
        &error_response(400, "Bad Request", false),
        "Transfer-Encoding with Content-Length",
    );
}

/// The issue's 40 pipelined requests followed by `shutdown(SHUT_WR)`: every one is answered
/// before the server closes, byte for byte.
fn half_closed_pipeline_of_40(srv: &ServerGuest) {
    let hello = "GET /hello.txt HTTP/1.1\r\nHost: guest\r\n\r\n";
    let missing = "GET /nope HTTP/1.1\r\nHost: guest\r\n\r\n";
    let hello_answer = exchange(srv, hello.as_bytes().to_vec());
    srv.check(
        hello_answer.starts_with(b"HTTP/1.1 200 ")
            && hello_answer.ends_with(b"hello from zerosend\n"),
        "one GET of /hello.txt",
    );
    let mut pipeline = String::new();
    let mut expected = Vec::new();
    for i in 0..40 {
        if i % 2 == 0 {
            pipeline.push_str(hello);
            expected.extend_from_slice(&hello_answer);
        } else {
            pipeline.push_str(missing);
            expected.extend_from_slice(error_response(404, "Not Found", true).as_bytes());
        }
    }
    let got = exchange(srv, pipeline.into_bytes());
    let answered = String::from_utf8_lossy(&got).matches("HTTP/1.1 ").count();
    srv.check(
        without_dates(&got) == without_dates(&expected),
        &format!(
            "40 pipelined requests, then FIN: {answered} answered, {} of {} bytes",
            got.len(),
            expected.len()
        ),
    );
}

/// OPTIONS (also `*`), absolute-form targets, and 414 for a target over 8 KiB.
fn options_and_request_targets(srv: &ServerGuest) {
    let options = |target: &str| {
        exchange(
            srv,
            format!("OPTIONS {target} HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        )
    };
    let allowed = "HTTP/1.1 200 OK\r\nServer: zerosend\r\nAllow: GET, HEAD, PUT, OPTIONS\r\n\
        Content-Length: 0\r\nConnection: close\r\n\r\n";
    check_bytes(srv, &options("*"), allowed, "OPTIONS *");
    check_bytes(srv, &options("/hello.txt"), allowed, "OPTIONS /hello.txt");
    let get = |target: &str| {
        exchange(
            srv,
            format!("GET {target} HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        )
    };
    let origin_form = get("/hello.txt");
    let absolute_form = get(&format!("http://{GUEST_IP}:{PORT}/hello.txt"));
    srv.check(
        origin_form.ends_with(b"\r\n\r\nhello from zerosend\n")
            && without_dates(&absolute_form) == without_dates(&origin_form),
        &format!(
            "absolute-form GET: {:?}",
            String::from_utf8_lossy(&absolute_form)
        ),
    );
    check_bytes(
        srv,
        &get(&format!("/{}", "a".repeat(10_000))),
        &error_response(414, "URI Too Long", false),
        "a 10 000-byte target",
    );
}

fn full_download(srv: &ServerGuest) {
    let secs = srv.download_big("full download");
    eprintln!(
        "e2e: downloaded {} MiB in {secs:.2}s ({:.1} Mbit/s), sha256 {}",
        BIG_LEN >> 20,
        BIG_LEN as f64 * 8.0 / secs / 1e6,
        sha256_hex(&srv.big)
    );
}

fn ranges_head_conditional(srv: &ServerGuest) {
    let o = srv.curl(&["-r", "1000-1999", &url("/big.bin")]);
    srv.check(o.stdout == srv.big[1000..2000], "range 1000-1999 wrong");
    let o = srv.curl(&["-r", "-100", &url("/big.bin")]);
    srv.check(o.stdout == srv.big[BIG_LEN - 100..], "suffix range wrong");
    let o = srv.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-r",
        &format!("{BIG_LEN}-"),
        &url("/big.bin"),
    ]);
    srv.check(o.stdout == b"416", "unsatisfiable range not 416");
    let o = srv.curl(&["-I", &url("/big.bin")]);
    let head = String::from_utf8_lossy(&o.stdout).to_string();
    srv.check(
        head.contains(&format!("Content-Length: {BIG_LEN}")),
        &format!("HEAD: {head}"),
    );
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("ETag: "))
        .map(|s| s.trim().to_string());
    let lm = head
        .lines()
        .find_map(|l| l.strip_prefix("Last-Modified: "))
        .map(|s| s.trim().to_string());
    let (Some(etag), Some(lm)) = (etag, lm) else {
        srv.guest.fail(&format!("no validators: {head}"))
    };
    let code = |extra: &[&str]| {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        args.extend_from_slice(extra);
        let u = url("/big.bin");
        args.push(&u);
        String::from_utf8_lossy(&srv.curl(&args).stdout).to_string()
    };
    srv.check(
        code(&["-H", &format!("If-None-Match: {etag}")]) == "304",
        "If-None-Match not 304",
    );
    srv.check(
        code(&["-H", &format!("If-Modified-Since: {lm}")]) == "304",
        "If-Modified-Since not 304",
    );
    srv.check(
        code(&["-H", "If-None-Match: \"nope\""]) == "200",
        "mismatched ETag not 200",
    );
    srv.check(
        code(&["-r", "0-9", "-H", &format!("If-Range: {etag}")]) == "206",
        "If-Range match not 206",
    );
    srv.check(
        code(&["-r", "0-9", "-H", "If-Range: \"stale\""]) == "200",
        "stale If-Range not 200",
    );
    let o = srv.curl(&[&url("/sub/")]);
    srv.check(o.stdout == b"<h1>index</h1>\n", "directory index");
}

fn keep_alive_200_requests(srv: &ServerGuest) {
    let expected = b"hello from zerosend\n".to_vec();
    let bad = tcp(srv, move |mut s| {
        let mut buf = Vec::new();
        let mut bad = 0;
        for i in 0..200 {
            // Every 20th round pipelines two requests.
            let n = if i % 20 == 0 { 2 } else { 1 };
            for _ in 0..n {
                s.write_all(b"GET /hello.txt HTTP/1.1\r\nHost: guest\r\n\r\n")
                    .unwrap();
            }
            for _ in 0..n {
                let (head, body) = read_response(&mut s, &mut buf);
                if !head.starts_with("HTTP/1.1 200") || body != expected {
                    bad += 1;
                }
            }
        }
        bad
    });
    srv.check(
        bad == 0,
        &format!("{bad} of 200 keep-alive responses wrong"),
    );
}

fn parallel_64(srv: &ServerGuest) {
    let big = Arc::new(srv.big.clone());
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let big = Arc::clone(&big);
            srv.guest.netns().spawn(move || {
                let mut s = TcpStream::connect((GUEST_IP, PORT)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                let start = i * 65536;
                write!(
                    s,
                    "GET /big.bin HTTP/1.1\r\nRange: bytes={start}-{}\r\nConnection: close\r\n\r\n",
                    start + 65535
                )
                .unwrap();
                let (head, body) = read_response(&mut s, &mut Vec::new());
                head.starts_with("HTTP/1.1 206") && body == big[start..start + 65536]
            })
        })
        .collect();
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|&b| b)
        .count();
    srv.check(
        ok == 64,
        &format!("only {ok} of 64 parallel downloads were right"),
    );
}

fn put_then_get(srv: &ServerGuest) {
    let body = random_bytes(7, 300_000);
    let status = srv.put("/upload.bin", &body);
    srv.check(status == "201", &format!("PUT new file: {status}"));
    let o = srv.curl(&[&url("/upload.bin")]);
    srv.check(o.stdout == body, "GET after PUT differs");
    // Partial write with Content-Range.
    let o = srv.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        "-H",
        "Content-Range: bytes 10-14/*",
        "--data-binary",
        "ZZZZZ",
        &url("/upload.bin"),
    ]);
    srv.check(o.stdout == b"204", "partial PUT");
    let mut expected = body.clone();
    expected[10..15].copy_from_slice(b"ZZZZZ");
    srv.check(
        srv.curl(&[&url("/upload.bin")]).stdout == expected,
        "GET after partial PUT differs",
    );
}

/// Writers PUT new versions of a file while readers download it: every body must be exactly
/// one version (the snapshot pinned when its response started).
fn concurrent_writers_and_readers(srv: &ServerGuest) {
    let stop = Arc::new(AtomicBool::new(false));
    let version = Arc::new(AtomicU32::new(1));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, version) = (Arc::clone(&stop), Arc::clone(&version));
            srv.guest.netns().spawn(move || {
                let mut puts = 0;
                while !stop.load(Ordering::Relaxed) {
                    let v = version.fetch_add(1, Ordering::Relaxed);
                    let body = stamped_version(v, STAMP_BLOCKS);
                    let mut s = TcpStream::connect((GUEST_IP, PORT)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    write!(s, "PUT /versioned.bin HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
                    s.write_all(&body).unwrap();
                    let (head, _) = read_response(&mut s, &mut Vec::new());
                    assert!(head.starts_with("HTTP/1.1 204"), "PUT: {head}");
                    puts += 1;
                }
                puts
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            srv.guest.netns().spawn(move || {
                let mut s = TcpStream::connect((GUEST_IP, PORT)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut buf = Vec::new();
                let mut versions = Vec::new();
                for _ in 0..25 {
                    s.write_all(b"GET /versioned.bin HTTP/1.1\r\n\r\n").unwrap();
                    let (head, body) = read_response(&mut s, &mut buf);
                    assert!(head.starts_with("HTTP/1.1 200"), "GET: {head}");
                    versions.push(check_stamped(&body, STAMP_BLOCKS));
                }
                versions
            })
        })
        .collect();
    let mut bodies = 0;
    let mut distinct = std::collections::BTreeSet::new();
    for r in readers {
        for v in r.join().unwrap() {
            match v {
                Ok(v) => {
                    distinct.insert(v);
                }
                Err(e) => srv
                    .guest
                    .fail(&format!("a response body was not one version: {e}")),
            }
            bodies += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let puts: u32 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    eprintln!(
        "e2e: {bodies} bodies during {puts} PUTs, {} distinct versions seen, none torn",
        distinct.len()
    );
    srv.check(
        puts > 0 && distinct.len() > 1,
        "the writers did not overlap the readers",
    );
}

fn bad_requests_and_limits(srv: &ServerGuest) {
    let status = |req: Vec<u8>| -> String {
        tcp(srv, move |mut s| {
            s.write_all(&req).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
    };
    let first = |s: String| s.split(' ').nth(1).unwrap_or("").to_string();
    srv.check(
        first(status(b"BLAH\r\n\r\n".to_vec())) == "400",
        "garbage not 400",
    );
    let huge = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    srv.check(
        first(status(huge.into_bytes())) == "431",
        "huge header not 431",
    );
    srv.check(
        first(status(
            b"PUT /x HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
        )) == "411",
        "PUT without length not 411",
    );
    srv.check(
        first(status(
            b"PUT /x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
        )) == "413",
        "huge PUT not 413",
    );
    srv.check(
        first(status(
            b"DELETE /hello.txt HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
        )) == "405",
        "DELETE not 405",
    );
    srv.check(
        first(status(
            b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
        )) == "404",
        "missing not 404",
    );
    for p in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/sub/%2E%2E/%2e%2e/secret.txt",
        "/escape",
    ] {
        let req = format!("GET {p} HTTP/1.1\r\nConnection: close\r\n\r\n");
        srv.check(
            first(status(req.into_bytes())) == "403",
            &format!("{p} not 403"),
        );
    }
    // Connection limit, --max-connections 100. First 110 idle connections: each new one past
    // the limit takes the place of the connection idle longest (evicted: closed without a
    // response), so at most 100 stay open and the newest 100 are served.
    let evicted_before = Metrics::fetch(srv).value("zerosend_connections_evicted_total");
    let idle = srv.guest.netns().spawn(|| {
        let mut conns: Vec<TcpStream> = (0..110)
            .map(|_| {
                let s = TcpStream::connect((GUEST_IP, PORT)).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                s
            })
            .collect();
        let mut closed = 0;
        for s in conns.iter_mut().take(10) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 64];
            closed += matches!(s.read(&mut b), Ok(0) | Err(_)) as u32;
        }
        // The newest connection is served.
        let last = conns.last_mut().unwrap();
        last.write_all(b"GET /hello.txt HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = last.read_to_end(&mut answer);
        (closed, answer.ends_with(b"hello from zerosend\n"))
    });
    let (closed, newest_served) = idle.join().unwrap();
    let evicted = Metrics::fetch(srv).value("zerosend_connections_evicted_total") - evicted_before;
    srv.check(
        closed == 10 && evicted >= 10 && newest_served,
        &format!("idle connections over the limit: oldest 10 closed {closed}, evicted {evicted}, newest served {newest_served}"),
    );
    // Then 100 busy connections (each in the middle of a PUT body) and 10 more: nothing can
    // be evicted, so the 10 get 503.
    let answers = srv.guest.netns().spawn(|| {
        let mut busy: Vec<TcpStream> = (0..100)
            .map(|_| {
                let mut s = TcpStream::connect((GUEST_IP, PORT)).unwrap();
                s.write_all(b"PUT /busy.bin HTTP/1.1\r\nContent-Length: 1000\r\n\r\npartial")
                    .unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let mut rejected = 0;
        for _ in 0..10 {
            let mut s = TcpStream::connect((GUEST_IP, PORT)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(3000)))
                .unwrap();
            let mut b = [0u8; 64];
            if let Ok(n) = s.read(&mut b) {
                if b[..n].starts_with(b"HTTP/1.1 503") {
                    rejected += 1;
                }
            }
        }
        busy.clear();
        rejected
    });
    let rejected = answers.join().unwrap();
    srv.check(
        rejected >= 10,
        &format!("only {rejected} of 10 connections over a limit of busy ones got 503"),
    );
    // The server still serves (once it has seen the busy clients go).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut o = srv.curl(&[&url("/hello.txt")]);
    while o.stdout != b"hello from zerosend\n" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        o = srv.curl(&[&url("/hello.txt")]);
    }
    srv.check(
        o.stdout == b"hello from zerosend\n",
        "server stopped serving after bad input",
    );
    // Every 503 is counted, by code and in the 5xx total.
    let metrics = Metrics::fetch(srv);
    let code_503 = metrics.value("zerosend_http_responses_total{code=\"503\"}");
    let class_5xx = metrics.value("zerosend_http_responses_5xx_total");
    let over_limit = metrics.value("zerosend_connections_rejected_total");
    srv.check(
        over_limit >= rejected && code_503 >= over_limit && class_5xx >= code_503,
        &format!(
            "{rejected} 503s seen by clients, {over_limit} over the limit, counted \
             {code_503} by code and {class_5xx} as 5xx:\n{}",
            metrics.text
        ),
    );
    // The warnings about them are rate-limited, with the count held back reported.
    srv.guest
        .wait_for_console("not logged", Duration::from_secs(30));
    let lines = srv
        .guest
        .console_lines_with("answered 503 Service Unavailable");
    srv.check(
        !lines.is_empty() && (lines.len() as u64) < rejected,
        &format!("{} warning lines for {rejected} 503s", lines.len()),
    );
}

/// The metrics page, parsed just enough to read samples.
struct Metrics {
    text: String,
}

impl Metrics {
    fn fetch(srv: &ServerGuest) -> Metrics {
        let o = srv.curl(&[&metrics_url()]);
        Metrics {
            text: String::from_utf8_lossy(&o.stdout).into_owned(),
        }
    }

    /// The value of a sample (`name` or `name{label="value"}`); 0 when absent.
    fn value(&self, sample: &str) -> u64 {
        self.text
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }
}

fn metrics_and_pcap(srv: &ServerGuest) {
    let o = srv.curl(&[&metrics_url()]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    for name in [
        "zerosend_http_requests_total",
        "zerosend_pinned_pages",
        "zerosend_cow_copies_total",
        "zerosend_tcp_retransmits_total",
        "zerosend_audit_checks_total",
        "zerosend_connections_open",
        "zerosend_http_responses_total{code=\"200\"}",
    ] {
        srv.check(
            text.contains(name),
            &format!("metric {name} missing:\n{text}"),
        );
    }
    srv.check(
        text.contains("zerosend_audit_violations_total 0\n"),
        "audit violations are not zero",
    );
    srv.check(
        text.contains("zerosend_payload_bytes_copied_total"),
        "copy counter missing",
    );
    let metrics = Metrics { text: text.clone() };
    let rss = metrics.value("zerosend_process_resident_memory_bytes");
    let received = metrics.value("zerosend_http_request_bytes_total");
    let open = metrics.value("zerosend_connections_open");
    srv.check(
        rss > 1 << 20 && received > 300_000 && open >= 1,
        &format!("resident {rss} B, received {received} B, open {open}"),
    );
    // `--pcap` writes a capture of what the server sends and receives. The file grows while
    // it is served (every frame of the download adds to it), and a streaming response of a
    // file changing under it is reset rather than torn: take the start of it (its first
    // piece is read at once), retrying when a flush of the capture got in between.
    let mut records = Vec::new();
    for _ in 0..20 {
        let o = srv.curl(&["-H", "Range: bytes=0-49151", &url("/capture.pcap")]);
        if o.status.success() {
            if let Ok(r) = hw_tests::wire::pcap_records(&o.stdout) {
                records = r;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ours = records
        .iter()
        .filter_map(|(_, f)| hw_tests::wire::Ipv4Frame::parse(f))
        .filter(|ip| ip.proto == 6 && (ip.src_port() == PORT || ip.dst_port() == PORT))
        .count();
    srv.check(
        // The count depends on frame sizes: a window that opens fast (the stack's slow start
        // counts bytes) sends large TSO frames early on, so fewer records fit in 48 KiB.
        records.len() >= 8 && ours > 0,
        &format!(
            "the server's capture: {} records, {ours} of port {PORT}",
            records.len()
        ),
    );
}

/// `--access-log`: one line per response, `<time> <client> c<n> "<request line>" <status>
/// <bytes> <seconds>`.
fn access_log(srv: &ServerGuest) {
    let o = srv.curl(&[&url("/access.log")]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = 0;
    let mut big_downloads = 0;
    for line in text.lines() {
        lines += 1;
        let fields = (|| {
            let (head, rest) = line.split_once(" \"")?;
            let (request, tail) = rest.rsplit_once("\" ")?;
            let mut head = head.split(' ');
            let time: f64 = head.next()?.parse().ok()?;
            let client = head.next()?;
            let conn: u64 = head.next()?.strip_prefix('c')?.parse().ok()?;
            let mut tail = tail.split(' ');
            let status: u16 = tail.next()?.parse().ok()?;
            let bytes: u64 = tail.next()?.parse().ok()?;
            let seconds: f64 = tail.next()?.parse().ok()?;
            let complete = tail.next().is_none() && head.next().is_none();
            Some((
                time, client, conn, request, status, bytes, seconds, complete,
            ))
        })();
        let Some((time, client, conn, request, status, bytes, seconds, true)) = fields else {
            srv.guest
                .fail(&format!("malformed access-log line {line:?}"));
        };
        srv.check(
            time > 1.6e9
                && client.starts_with(&format!("{}:", hw_tests::netns::HOST_IP))
                && conn >= 1
                && (100..600).contains(&status)
                && seconds >= 0.0,
            &format!("access-log line {line:?}"),
        );
        if request == "GET /big.bin HTTP/1.1" && status == 200 && bytes > BIG_LEN as u64 {
            big_downloads += 1;
        }
    }
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    srv.check(
        lines > 300
            && big_downloads >= 1
            && count("\"OPTIONS * HTTP/1.1\" 200 ") >= 1
            && count("\"GET /nope HTTP/1.1\" 404 ") >= 20
            && count("\"-\" 503 ") >= 10
            && count("\"-\" 414 ") >= 1,
        &format!("access log ({lines} lines) lacks expected entries:\n{text}"),
    );
}

fn end_to_end(nic: Nic) {
    let srv = boot(nic);
    full_download(&srv);
    ranges_head_conditional(&srv);
    keep_alive_200_requests(&srv);
    bodies_are_never_requests(&srv);
    half_closed_pipeline_of_40(&srv);
    options_and_request_targets(&srv);
    parallel_64(&srv);
    put_then_get(&srv);
    concurrent_writers_and_readers(&srv);
    bad_requests_and_limits(&srv);
    metrics_and_pcap(&srv);
    access_log(&srv);
    // Nothing the server sent carries placeholder poison (QEMU's capture of the wire).
    let run = srv.guest.stop_server();
    hw_tests::expect_no_poison_on_the_wire(&run);
}

hw_tests::for_each_nic!(end_to_end);
