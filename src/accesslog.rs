//! The access log (`--access-log PATH`, or `-` for stdout): one line per response,
//!
//! ```text
//! 1712345678.123 - c17 "GET /hello.txt HTTP/1.1" 200 217 0.000412
//! ```
//!
//! that is: the Unix time the line was written (when the client had acknowledged the whole
//! response, or the connection ended), the client's address (`-` while the network stack
//! does not report it), the connection's number (`c17`: the 17th accepted), the request line
//! as received (`"-"` when none could be read), the status, the response bytes the client
//! acknowledged, and the seconds from the request's first byte to that acknowledgement.
//!
//! The network loop never writes: it hands lines over a bounded queue to a writer thread.
//! When the writer falls behind (a slow disk, a stdout nobody reads) lines are dropped and
//! counted (`zerosend_access_log_lines_dropped_total`), never waited for.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines queued for the writer at most (a few hundred KiB).
const QUEUED_LINES: usize = 4096;

/// Where the access log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

impl Destination {
    /// `-` is stdout; anything else a file, appended to.
    pub fn parse(arg: &str) -> Self {
        if arg == "-" {
            Destination::Stdout
        } else {
            Destination::File(PathBuf::from(arg))
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Stdout => f.write_str("-"),
            Destination::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// What one line records.
#[derive(Clone, Debug)]
pub struct Entry<'a> {
    pub at: SystemTime,
    pub client: Option<SocketAddr>,
    /// The connection's number, counting accepted connections from 1.
    pub connection: u64,
    pub request_line: Option<&'a str>,
    pub status: u16,
    pub bytes: u64,
    pub duration: Duration,
}

impl Entry<'_> {
    /// The line, without its newline.
    pub fn line(&self) -> String {
        let at = self.at.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut line = String::with_capacity(96);
        write!(line, "{}.{:03} ", at.as_secs(), at.subsec_millis()).unwrap();
        match self.client {
            Some(addr) => write!(line, "{addr}").unwrap(),
            None => line.push('-'),
        }
        write!(line, " c{} \"", self.connection).unwrap();
        escape_into(&mut line, self.request_line.unwrap_or("-"));
        write!(
            line,
            "\" {} {} {:.6}",
            self.status,
            self.bytes,
            self.duration.as_secs_f64()
        )
        .unwrap();
        line
    }
}

/// Copy `text`, escaping what could forge a line or a field: quotes, backslashes, control
/// characters.
fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => write!(out, "\\x{:02x}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
}

/// The log's sending end, owned by the network loop.
pub struct AccessLog {
    lines: Option<SyncSender<String>>,
    writer: Option<JoinHandle<()>>,
    dropped: u64,
}

impl AccessLog {
    /// Open the destination (so a bad path fails at start-up) and start the writer thread.
    pub fn open(destination: &Destination) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match destination {
            Destination::Stdout => Box::new(io::stdout()),
            Destination::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        Ok(Self::with_writer(out))
    }

    fn with_writer(out: Box<dyn Write + Send>) -> Self {
        let (lines, queue) = mpsc::sync_channel(QUEUED_LINES);
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(queue, out))
            .expect("spawning the access-log writer");
        AccessLog {
            lines: Some(lines),
            writer: Some(writer),
            dropped: 0,
        }
    }

    /// Queue one line. Never blocks: a line the writer has no room for is dropped (and
    /// counted).
    pub fn record(&mut self, entry: &Entry<'_>) {
        let Some(lines) = &self.lines else { return };
        match lines.try_send(entry.line()) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped += 1,
        }
    }

    /// Lines dropped because the writer was behind (or gone).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Drop for AccessLog {
    /// Let the writer finish what is queued, so no line of a clean shutdown is lost.
    fn drop(&mut self) {
        self.lines.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread: write lines as they come, one flush per burst.
fn write_lines(queue: Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::new(out);
    let mut failed = false;
    while let Ok(first) = queue.recv() {
        let mut result = writeln!(out, "{first}");
        while let Ok(line) = queue.try_recv() {
            result = result.and_then(|()| writeln!(out, "{line}"));
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            // Keep draining (the loop must not fill up) but say so only once.
            if !failed {
                tracing::warn!("access log: writing failed, lines are being lost: {e}");
                failed = true;
            }
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn entry(request_line: Option<&str>) -> Entry<'_> {
        Entry {
            at: UNIX_EPOCH + Duration::from_millis(1_712_345_678_123),
            client: None,
            connection: 17,
            request_line,
            status: 200,
            bytes: 217,
            duration: Duration::from_micros(412),
        }
    }

    #[test]
    fn line_format() {
        assert_eq!(
            entry(Some("GET /hello.txt HTTP/1.1")).line(),
            "1712345678.123 - c17 \"GET /hello.txt HTTP/1.1\" 200 217 0.000412"
        );
        let with_client = Entry {
            client: Some("10.99.0.1:40000".parse().unwrap()),
            ..entry(None)
        };
        assert_eq!(
            with_client.line(),
            "1712345678.123 10.99.0.1:40000 c17 \"-\" 200 217 0.000412"
        );
        assert_eq!(
            entry(Some("GET /\"a\\b\n HTTP/1.1")).line(),
            "1712345678.123 - c17 \"GET /\\\"a\\\\b\\x0a HTTP/1.1\" 200 217 0.000412",
            "nothing in a request line can end the field or the line"
        );
    }

    /// A writer whose bytes the test can see.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_reach_the_writer_in_order_and_drop_flushes() {
        let shared = Shared::default();
        let mut log = AccessLog::with_writer(Box::new(shared.clone()));
        log.record(&entry(Some("GET /a HTTP/1.1")));
        log.record(&entry(Some("GET /b HTTP/1.1")));
        drop(log);
        let text = String::from_utf8(shared.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("\"GET /a HTTP/1.1\"") && lines[1].contains("\"GET /b "));
    }

    /// A writer that never returns until told to, like a stdout nobody reads.
    struct Stuck(Arc<Mutex<()>>);
    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            drop(self.0.lock().unwrap());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_writer_costs_dropped_lines_not_a_blocked_caller() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let mut log = AccessLog::with_writer(Box::new(Stuck(Arc::clone(&gate))));
        let started = std::time::Instant::now();
        // The writer takes at most a buffer's worth (8 KiB, ~140 lines) before it is stuck.
        for _ in 0..QUEUED_LINES + 1000 {
            log.record(&entry(Some("GET / HTTP/1.1")));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "record() must never wait"
        );
        assert!(
            log.dropped() >= 500,
            "beyond the queue, lines are dropped: {}",
            log.dropped()
        );
        drop(held);
        drop(log);
    }

    #[test]
    fn destinations() {
        assert_eq!(Destination::parse("-"), Destination::Stdout);
        assert_eq!(
            Destination::parse("/var/log/zs.log"),
            Destination::File("/var/log/zs.log".into())
        );
    }
}
