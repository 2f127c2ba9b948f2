//! A few lines of HTTP/1.1 over a plain `TcpStream`, for tests that need what curl hides:
//! timing of each request on one keep-alive connection, streaming checks of huge bodies,
//! PUT bodies generated on the fly.

use std::io::BufRead;
use std::net::TcpStream;
use std::time::Duration;

use crate::netns::GUEST_IP;

/// A connection to the guest's `port` (from inside its namespace), with two-minute timeouts.
pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect((GUEST_IP, port)).expect("connect to the guest");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
    s
}

/// The head of a response, through its blank line.
pub fn read_head(r: &mut impl BufRead) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "closed before a head");
        head.push_str(&line);
        if line == "\r\n" {
            return head;
        }
    }
}

/// The `Content-Length` of a head (0 without one).
pub fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

/// PUTs `/path` as version `version` of a stamped file of `blocks` 4 KiB blocks
/// ([`crate::content::stamped_block`]), generated as it is sent (a 1 GiB body is never held
/// whole), on a new connection to `port`; returns the response head.
pub fn put_stamped(port: u16, path: &str, version: u32, blocks: usize) -> String {
    use crate::content::{stamped_block, STAMP_BLOCK};
    use std::io::{BufReader, Write};
    let mut s = connect(port);
    let len = blocks * STAMP_BLOCK;
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: g\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n"
    )
    .unwrap();
    let mut batch = Vec::with_capacity(64 * STAMP_BLOCK);
    for i in 0..blocks {
        batch.extend_from_slice(&stamped_block(version, i));
        if batch.len() == batch.capacity() {
            s.write_all(&batch).unwrap();
            batch.clear();
        }
    }
    s.write_all(&batch).unwrap();
    read_head(&mut BufReader::new(s))
}
