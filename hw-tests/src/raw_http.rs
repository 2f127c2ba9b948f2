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
