//! `zs-linux-serve`: the Linux baseline of `scripts/bench`, run in the same guest as
//! zerosend but on the guest kernel's own NIC driver and TCP stack.
//!
//! HTTP/1.1 GET with keep-alive, one thread per connection, file bodies sent with
//! `sendfile(2)` from the served directory (the initramfs's tmpfs in the benchmark, where
//! zerosend reads the same files). `--tls-port` adds HTTPS the way a kTLS server does it:
//! rustls runs the TLS 1.3 handshake (AES-128-GCM only), the traffic secrets are extracted
//! and handed to the kernel (`TCP_ULP` "tls", `TLS_TX` and `TLS_RX`), and from then on the
//! connection is served exactly like a plain one, `sendfile` included, with the kernel
//! sealing the records. The first kTLS connection prints `/proc/net/tls_stat` so the
//! benchmark can check the kernel really took over.
//!
//! This is a baseline, not a server: no directory listing, ranges or conditional requests.

mod sys;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ConnectionTrafficSecrets, ServerConfig, ServerConnection};

#[derive(Parser)]
#[command(about = "Linux sendfile(2) / kTLS baseline server for scripts/bench")]
struct Args {
    /// Directory to serve.
    #[arg(long)]
    root: PathBuf,
    /// Plain HTTP port.
    #[arg(long, default_value_t = 80)]
    port: u16,
    /// HTTPS (kTLS) port; needs --tls-cert and --tls-key.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_port: Option<u16>,
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

/// The largest request header accepted.
const MAX_HEADER: usize = 8192;
/// Listen backlog (see [`sys::listen`]).
const BACKLOG: i32 = 4096;
/// Thread stack: the handshake is the deepest path; 1024 connections fit in the guest.
const STACK: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
enum KtlsError {
    #[error("TLS handshake: {0}")]
    Handshake(#[from] io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("negotiated a cipher the kernel is not given here (only AES-128-GCM)")]
    Cipher,
    #[error("setting up kTLS (is tls.ko loaded?): {0}")]
    Kernel(io::Error),
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = Arc::new(args.root);
    let plain = sys::listen(args.port, BACKLOG).context("listening on the HTTP port")?;
    let mut threads = Vec::new();
    if let Some(port) = args.tls_port {
        let config = Arc::new(tls_config(
            args.tls_cert.as_deref().unwrap(),
            args.tls_key.as_deref().unwrap(),
        )?);
        let listener = sys::listen(port, BACKLOG).context("listening on the HTTPS port")?;
        let root = Arc::clone(&root);
        threads.push(std::thread::spawn(move || {
            accept_loop(listener, root, Some(config))
        }));
    }
    println!(
        "zs-linux-serve: serving {} on :{}{}",
        root.display(),
        args.port,
        args.tls_port
            .map(|p| format!(" and kTLS on :{p}"))
            .unwrap_or_default()
    );
    accept_loop(plain, root, None);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn tls_config(cert: &Path, key: &Path) -> Result<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut provider = rustls::crypto::ring::default_provider();
    // The one suite handed to the kernel here (`tls12_crypto_info_aes_gcm_128`).
    provider.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.enable_secret_extraction = true;
    // No tickets: a ticket written after the handshake would have to be flushed with the
    // right sequence numbers before the keys go to the kernel.
    config.send_tls13_tickets = 0;
    Ok(config)
}

fn accept_loop(listener: TcpListener, root: Arc<PathBuf>, tls: Option<Arc<ServerConfig>>) {
    let reported = Arc::new(AtomicBool::new(false));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("zs-linux-serve: accept: {e}");
                continue;
            }
        };
        let root = Arc::clone(&root);
        let tls = tls.clone();
        let reported = Arc::clone(&reported);
        let spawned = std::thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut pending = Vec::new();
                if let Some(config) = tls {
                    match start_ktls(&stream, config) {
                        Ok(early) => pending = early,
                        Err(e) => {
                            eprintln!("zs-linux-serve: {e}");
                            return;
                        }
                    }
                    if !reported.swap(true, Ordering::Relaxed) {
                        print_tls_stat();
                    }
                }
                // A client that goes away mid-response is not the server's error.
                let _ = serve(&stream, &root, pending);
            });
        if let Err(e) = spawned {
            eprintln!("zs-linux-serve: spawning a connection thread: {e}");
        }
    }
}

/// One line with the kernel's kTLS counters, e.g. `TlsCurrTxSw 1` once a connection uses
/// software kTLS for sending.
fn print_tls_stat() {
    let stat = std::fs::read_to_string("/proc/net/tls_stat").unwrap_or_default();
    let fields: Vec<String> = stat
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(format!("{}={}", w.next()?, w.next()?))
        })
        .collect();
    println!("zs-linux-serve: ktls {}", fields.join(" "));
}

/// Run the handshake with rustls, then move the connection to kTLS. Returns the request
/// bytes rustls already decrypted (a client sends its request right behind its Finished).
fn start_ktls(stream: &TcpStream, config: Arc<ServerConfig>) -> Result<Vec<u8>, KtlsError> {
    let mut conn = ServerConnection::new(config)?;
    let mut io_stream = stream;
    while conn.is_handshaking() {
        conn.complete_io(&mut io_stream)?;
    }
    // Flush anything still queued (nothing with tickets off, but the sequence numbers the
    // kernel continues from must count every record written).
    while conn.wants_write() {
        conn.write_tls(&mut io_stream)?;
    }
    let mut early = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => early.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    let secrets = conn.dangerous_extract_secrets()?;
    let tx = crypto_info(secrets.tx.0, secrets.tx.1)?;
    let rx = crypto_info(secrets.rx.0, secrets.rx.1)?;
    sys::enable_ktls(stream, &tx, &rx).map_err(KtlsError::Kernel)?;
    Ok(early)
}

fn crypto_info(
    seq: u64,
    secrets: ConnectionTrafficSecrets,
) -> Result<sys::TlsCryptoInfoAesGcm128, KtlsError> {
    let ConnectionTrafficSecrets::Aes128Gcm { key, iv } = secrets else {
        return Err(KtlsError::Cipher);
    };
    let mut info = sys::TlsCryptoInfoAesGcm128 {
        version: sys::TLS_1_3_VERSION,
        cipher_type: sys::TLS_CIPHER_AES_GCM_128,
        rec_seq: seq.to_be_bytes(),
        ..Default::default()
    };
    info.key.copy_from_slice(key.as_ref());
    let iv = iv.as_ref();
    info.salt.copy_from_slice(&iv[..4]);
    info.iv.copy_from_slice(&iv[4..12]);
    Ok(info)
}

/// Serve requests on one connection until the client closes it or asks to.
fn serve(stream: &TcpStream, root: &Path, mut buf: Vec<u8>) -> io::Result<()> {
    let mut reader = stream;
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEADER {
                return respond_status(stream, "431 Request Header Fields Too Large");
            }
            // With kTLS a control record (close_notify) makes read fail (EIO): a close.
            let n = reader.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut lines = head.split("\r\n");
        let mut request = lines.next().unwrap_or("").split(' ');
        let (method, target, version) = (
            request.next().unwrap_or(""),
            request.next().unwrap_or(""),
            request.next().unwrap_or(""),
        );
        let close_asked = lines.any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("connection")
                    && v.trim().eq_ignore_ascii_case("close")
            })
        });
        let keep_alive = version == "HTTP/1.1" && !close_asked;
        if method != "GET" {
            return respond_status(stream, "405 Method Not Allowed");
        }
        let Some(path) = resolve(root, target) else {
            return respond_status(stream, "404 Not Found");
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(_) => return respond_status(stream, "404 Not Found"),
        };
        let len = file.metadata()?.len();
        let header = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\n{}\r\n",
            if keep_alive { "" } else { "Connection: close\r\n" }
        );
        sys::send_more(stream, header.as_bytes())?;
        sys::sendfile_all(stream, &file, len)?;
        if !keep_alive {
            return Ok(());
        }
    }
}

fn respond_status(mut stream: &TcpStream, status: &str) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// The file under `root` that `target` names, if it stays under `root`.
fn resolve(root: &Path, target: &str) -> Option<PathBuf> {
    let rel = Path::new(target.split('?').next()?.strip_prefix('/')?);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_stays_under_root() {
        let root = Path::new("/data");
        assert_eq!(
            resolve(root, "/big.bin"),
            Some(PathBuf::from("/data/big.bin"))
        );
        assert_eq!(resolve(root, "/a/b?x=1"), Some(PathBuf::from("/data/a/b")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "big.bin"), None);
    }
}
