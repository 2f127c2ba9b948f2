//! A minimal client of the QEMU Machine Protocol (QMP; QEMU's `docs/interop/qmp-spec`): one
//! command at a time over the unix socket `-qmp unix:PATH,server=on,wait=off` listens on.
//!
//! The protocol is one JSON object per line. After connecting, QEMU sends a greeting
//! (`{"QMP": {...}}`); the client must send `qmp_capabilities` before any other command.
//! Every command gets exactly one response, `{"return": ...}` or `{"error": {...}}`;
//! asynchronous events (`{"timestamp": ..., "event": ...}`) may arrive in between and are
//! skipped here. Commands are written by the caller as JSON text; no JSON library needed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long one command may take before the monitor is considered stuck.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect to the socket at `path` (retrying while QEMU is still creating it, up to
    /// `timeout`), read the greeting and leave capabilities negotiation mode.
    pub(crate) fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("connecting to QMP at {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(RESPONSE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_line()?;
        if !greeting.starts_with("{\"QMP\"") {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        qmp.execute(r#"{"execute": "qmp_capabilities"}"#)?;
        Ok(qmp)
    }

    /// Send `command` (one JSON object) and return its response line: `Ok` for
    /// `{"return": ...}`, `Err` with the line for `{"error": ...}`.
    pub(crate) fn execute(&mut self, command: &str) -> Result<String, String> {
        writeln!(self.writer, "{}", command.trim()).map_err(|e| format!("sending to QMP: {e}"))?;
        loop {
            let line = self.read_line()?;
            if line.starts_with("{\"return\"") {
                return Ok(line);
            }
            if line.starts_with("{\"error\"") {
                return Err(format!("QMP {command}: {line}"));
            }
            // An event: not the answer.
        }
    }

    fn read_line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed (QEMU exited?)".into()),
            Ok(_) => Ok(line.trim().to_string()),
            Err(e) => Err(format!("reading from QMP: {e}")),
        }
    }
}

/// `s` as a JSON string literal (quotes included).
pub(crate) fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("n0"), "\"n0\"");
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    /// A fake QEMU on a socket pair: greeting, capabilities, an event before the answer.
    #[test]
    fn commands_get_their_response_and_events_are_skipped() {
        let dir = std::env::temp_dir().join(format!("zs-qmp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut got = Vec::new();
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            for answer in [
                r#"{"return": {}}"#,
                r#"{"timestamp": {"seconds": 1}, "event": "NIC_RX_FILTER_CHANGED"}
{"return": {}}"#,
                r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}"#,
            ] {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                got.push(line.trim().to_string());
                writeln!(w, "{answer}").unwrap();
            }
            got
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let up = r#"{"execute": "set_link", "arguments": {"name": "n0", "up": true}}"#;
        assert_eq!(qmp.execute(up).unwrap(), r#"{"return": {}}"#);
        let err = qmp.execute(r#"{"execute": "x"}"#).unwrap_err();
        assert!(err.contains("DeviceNotFound"), "{err}");
        let got = server.join().unwrap();
        assert_eq!(got[0], r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(got[1], up);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
