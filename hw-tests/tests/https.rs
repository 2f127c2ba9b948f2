//! HTTPS end to end: `zerosend serve --tls-cert --tls-key` in a guest, with real TLS clients
//! (curl, Python's `ssl`, `openssl s_client`) in the harness's network namespace. The
//! certificate authority and the server certificate are made for each run with openssl on
//! the host; cert and key go into the guest outside the served root.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw_tests::content::{check_stamped, random_bytes, sha256_hex, stamped_version};
use hw_tests::netns::GUEST_IP;
use hw_tests::pki::{Pki, SNI_NAME};
use hw_tests::serve_guest::{metrics_url, url, ServerGuest, ACCESS_FLAGS, BIG_LEN, PORT};
use hw_tests::Nic;

const STAMP_BLOCKS: usize = 64; // 256 KiB version-stamped file
/// A file long enough that a KeyUpdate sent after its first MiB lands mid-transfer.
const HUGE_LEN: usize = 48 << 20;

fn https(path: &str) -> String {
    format!("https://{GUEST_IP}{path}")
}

fn boot(nic: Nic, pki: &Pki) -> ServerGuest {
    let cert = std::fs::read(pki.path("cert.pem")).unwrap();
    let key = std::fs::read(pki.path("key.pem")).unwrap();
    let media_cert = std::fs::read(pki.path("media-cert.pem")).unwrap();
    let media_key = std::fs::read(pki.path("media-key.pem")).unwrap();
    ServerGuest::boot("https", nic, 43, |guest| {
        guest
            .file("/data/versioned.bin", stamped_version(0, STAMP_BLOCKS))
            .file("/data/huge.bin", random_bytes(44, HUGE_LEN))
            .file("/etc/zs/cert.pem", cert)
            .file("/etc/zs/key.pem", key)
            .file("/etc/zs/media-cert.pem", media_cert)
            .file("/etc/zs/media-key.pem", media_key)
            .run(&format!(
                "zerosend serve --nic auto --root /data --ip {GUEST_IP}/24 --port {PORT} {ACCESS_FLAGS} \
                 --tls-cert /etc/zs/cert.pem --tls-key /etc/zs/key.pem --tls-port 443 \
                 --tls-cert /etc/zs/media-cert.pem --tls-key /etc/zs/media-key.pem \
                 --audit --max-connections 100 --write-policy cow"
            ))
    })
}

/// The value of a metric sample; 0 when absent.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn metrics_over_https(srv: &ServerGuest, pki: &Pki) -> String {
    let _ = pki; // the metrics page is plain HTTP on its own port
    let o = srv.curl(&[&metrics_url()]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// curl downloads `/big.bin` over HTTPS byte-exact; returns the seconds it took.
fn curl_download(srv: &ServerGuest, pki: &Pki, scheme_url: &str, what: &str) -> f64 {
    let out = srv.scratch_dir("curl").join("big.bin");
    let started = Instant::now();
    let o = srv.curl(&[
        "--cacert",
        &pki.ca(),
        "-o",
        out.to_str().unwrap(),
        "-w",
        "%{http_code} %{size_download} %{http_version}",
        scheme_url,
    ]);
    let secs = started.elapsed().as_secs_f64();
    let got = std::fs::read(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    srv.check(
        String::from_utf8_lossy(&o.stdout) == format!("200 {BIG_LEN} 1.1"),
        &format!(
            "{what}: curl: {} {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    );
    srv.check(
        sha256_hex(&got) == sha256_hex(&srv.big),
        &format!("{what}: sha256 differs"),
    );
    secs
}

/// Python's `ssl`: TLS 1.3, ALPN http/1.1, a byte-exact download, and a second connection
/// that resumes the first one's session from a ticket.
const PYTHON_CLIENT: &str = r#"
import hashlib, socket, ssl, sys
host, ca = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.set_alpn_protocols(["http/1.1"])

def get(path, session=None):
    raw = socket.create_connection((host, 443), timeout=60)
    s = ctx.wrap_socket(raw, server_hostname=host, session=session)
    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: zs\r\nConnection: close\r\n\r\n")
    data = bytearray()
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    info = (s.version(), s.selected_alpn_protocol(), s.cipher()[0], s.session_reused)
    session = s.session
    s.close()
    return head, body, info, session

head, body, info, session = get("/big.bin")
print(head.split(b"\r\n")[0].decode(), len(body), hashlib.sha256(body).hexdigest(), *info[:3])
head, body, info2, _ = get("/hello.txt", session)
print("resumed", info2[3], len(body))
"#;

fn python_download(srv: &ServerGuest, pki: &Pki) {
    let o = srv
        .guest
        .netns()
        .command("python3")
        .args(["-c", PYTHON_CLIENT, GUEST_IP, &pki.ca()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let expected = format!(
        "HTTP/1.1 200 OK {BIG_LEN} {} TLSv1.3 http/1.1 TLS_AES_",
        sha256_hex(&srv.big)
    );
    srv.check(
        o.status.success() && out.starts_with(&expected),
        &format!(
            "python ssl download: {out} {}",
            String::from_utf8_lossy(&o.stderr)
        ),
    );
    srv.check(
        out.contains("\nresumed True 20\n"),
        &format!("python ssl: the session was not resumed from a ticket: {out}"),
    );
}

/// `openssl s_client` downloads `/huge.bin`; after its first MiB the client sends a
/// KeyUpdate asking the server to update too (`K`). The download must stay byte-exact.
fn s_client_key_update(srv: &ServerGuest, pki: &Pki) {
    let huge = random_bytes(44, HUGE_LEN);
    let mut child = srv
        .guest
        .netns()
        .command("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("{GUEST_IP}:443"),
            "-CAfile",
            &pki.ca(),
            "-verify_return_error",
            "-tls1_3",
            "-alpn",
            "http/1.1",
            "-crlf",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let reader = {
        let received = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut chunk = vec![0u8; 1 << 16];
            while let Ok(n) = stdout.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&chunk[..n]);
                received.store(all.len(), Ordering::Relaxed);
            }
            all
        })
    };
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // Lines go out as typed (LF made CRLF by -crlf); `K` alone on a line is a command.
    // s_client ends when stdin does: it stays open until the server closes.
    std::thread::sleep(Duration::from_secs(1));
    stdin
        .write_all(b"GET /huge.bin HTTP/1.1\nHost: zs\nConnection: close\n\n")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < (1 << 20) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let at_key_update = received.load(Ordering::Relaxed);
    stdin.write_all(b"K\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    drop(stdin);
    let _ = child.wait();
    let all = reader.join().unwrap();
    let errors = errors.join().unwrap();
    let start = all
        .windows(17)
        .position(|w| w == b"HTTP/1.1 200 OK\r\n")
        .unwrap_or_else(|| srv.guest.fail(&format!("s_client: no response: {errors}")));
    let head_end = start
        + all[start..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
        + 4;
    let body = &all[head_end..(head_end + HUGE_LEN).min(all.len())];
    eprintln!(
        "https: s_client KeyUpdate after {at_key_update} of {} bytes",
        HUGE_LEN
    );
    srv.check(
        at_key_update < HUGE_LEN / 2,
        "s_client: the KeyUpdate did not go out mid-transfer",
    );
    srv.check(
        errors.contains("KEYUPDATE"),
        &format!("s_client did not send its KeyUpdate: {errors}"),
    );
    srv.check(
        body.len() == HUGE_LEN && sha256_hex(body) == sha256_hex(&huge),
        &format!(
            "s_client download with a KeyUpdate: {} of {HUGE_LEN} bytes, sha256 {}: {errors}",
            body.len(),
            if body.len() == HUGE_LEN {
                "differs"
            } else {
                "-"
            }
        ),
    );
}

/// 32 curls at once, each a different 1 MiB range of `/big.bin`, over HTTPS.
fn parallel_32(srv: &ServerGuest, pki: &Pki) {
    let dir = srv.scratch_dir("parallel");
    let children: Vec<_> = (0..32usize)
        .map(|i| {
            let start = i * 229_376; // overlapping, unaligned to records and pages
            let end = start + (1 << 20) - 1;
            let out = dir.join(format!("part{i}"));
            let child = srv
                .guest
                .netns()
                .command("curl")
                .args(["-sS", "--max-time", "120", "--cacert", &pki.ca(), "-o"])
                .arg(&out)
                .args(["-r", &format!("{start}-{end}"), &https("/big.bin")])
                .spawn()
                .unwrap();
            (child, out, start..end + 1)
        })
        .collect();
    let mut ok = 0;
    for (mut child, out, range) in children {
        let status = child.wait().unwrap();
        let got = std::fs::read(&out).unwrap_or_default();
        if status.success() && got == srv.big[range] {
            ok += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    srv.check(
        ok == 32,
        &format!("only {ok} of 32 parallel HTTPS downloads were right"),
    );
}

/// Read one HTTP response (head + Content-Length body).
fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return String::from_utf8_lossy(&buf[..end]).into_owned();
        }
    }
}

/// Writers PUT stamped versions over plain HTTP while readers download over HTTPS (curl,
/// 20 requests on one kept-alive connection each): every body exactly one version.
fn torn_check_over_https(srv: &ServerGuest, pki: &Pki) {
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
                    let head = read_response(&mut s);
                    assert!(head.starts_with("HTTP/1.1 204"), "PUT: {head}");
                    puts += 1;
                }
                puts
            })
        })
        .collect();
    let dir = srv.scratch_dir("torn");
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let mut c = srv.guest.netns().command("curl");
            c.args(["-sS", "--max-time", "120", "--cacert", &pki.ca()]);
            let outs: Vec<PathBuf> = (0..20).map(|i| dir.join(format!("r{r}-{i}"))).collect();
            for out in &outs {
                c.arg("-o").arg(out).arg(https("/versioned.bin"));
            }
            (c.spawn().unwrap(), outs)
        })
        .collect();
    let mut bodies = 0;
    let mut distinct = std::collections::BTreeSet::new();
    for (mut child, outs) in readers {
        srv.check(child.wait().unwrap().success(), "an HTTPS reader failed");
        for out in outs {
            let body = std::fs::read(&out).unwrap_or_default();
            match check_stamped(&body, STAMP_BLOCKS) {
                Ok(v) => {
                    distinct.insert(v);
                }
                Err(e) => srv
                    .guest
                    .fail(&format!("an HTTPS response body was not one version: {e}")),
            }
            bodies += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let puts: u32 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "https: {bodies} HTTPS bodies during {puts} PUTs, {} distinct versions, 0 torn",
        distinct.len()
    );
    srv.check(
        puts > 0 && distinct.len() > 1,
        "the writers did not overlap the readers",
    );
}

/// The TLS counters: connections accepted, records sealed, the client's KeyUpdate seen, no
/// audit violation, and no ciphertext held once the NIC is idle.
fn tls_metrics(srv: &ServerGuest, pki: &Pki) {
    let mut text = metrics_over_https(srv, pki);
    // The metrics response itself is in flight while it is rendered: ask until idle.
    for _ in 0..20 {
        if metric(&text, "zerosend_tls_ciphertext_held_now") == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        text = metrics_over_https(srv, pki);
    }
    let accepted = metric(&text, "zerosend_tls_connections_accepted_total");
    let sealed = metric(&text, "zerosend_tls_records_sealed_total");
    let key_updates = metric(&text, "zerosend_tls_key_updates_received_total");
    let held = metric(&text, "zerosend_tls_ciphertext_held_now");
    let audited = metric(&text, "zerosend_tls_audit_checks_total");
    eprintln!("https: {accepted} TLS connections, {sealed} records sealed, {key_updates} client KeyUpdates, {held} B ciphertext held, {audited} retransmitted slices audited");
    srv.check(
        accepted >= 40
            && sealed > (BIG_LEN as u64 >> 14)
            && key_updates >= 1
            && held == 0
            && text.contains("zerosend_audit_violations_total 0\n")
            && text.contains("zerosend_tls_audit_mismatches_total 0\n"),
        &format!("TLS metrics:\n{text}"),
    );
}

/// SNI: a client asking for the second certificate's name gets it (curl checks the name
/// against what it is served, and the default certificate does not name it: without SNI
/// this fails), one asking for the default's name gets the default.
fn sni(srv: &ServerGuest, pki: &Pki) {
    for name in [SNI_NAME, "zerosend.test"] {
        let o = srv.curl(&[
            "--cacert",
            &pki.ca(),
            "--resolve",
            &format!("{name}:443:{GUEST_IP}"),
            &format!("https://{name}/hello.txt"),
        ]);
        srv.check(
            o.status.success() && o.stdout == hw_tests::serve_guest::HELLO,
            &format!("SNI {name}: {}", String::from_utf8_lossy(&o.stderr)),
        );
    }
}

fn https_end_to_end(nic: Nic) {
    let pki = Pki::make(nic);
    let srv = boot(nic, &pki);
    let plain = srv.download_big("plain HTTP");
    let tls = curl_download(&srv, &pki, &https("/big.bin"), "HTTPS curl");
    let mbit = |secs: f64| BIG_LEN as f64 * 8.0 / secs / 1e6;
    eprintln!(
        "https ({}): 8 MiB over plain HTTP {:.0} Mbit/s, over HTTPS {:.0} Mbit/s (curl, one connection, wall time incl. handshake)",
        nic.name(),
        mbit(plain),
        mbit(tls)
    );
    // Plain HTTP still answers beside HTTPS, and a client that does not trust the CA fails.
    srv.check(
        srv.curl(&[&url("/hello.txt")]).stdout == hw_tests::serve_guest::HELLO,
        "plain HTTP beside HTTPS",
    );
    let o = srv.curl(&[&https("/hello.txt")]);
    srv.check(
        !o.status.success(),
        "curl trusted a certificate of no known CA",
    );
    sni(&srv, &pki);
    python_download(&srv, &pki);
    s_client_key_update(&srv, &pki);
    parallel_32(&srv, &pki);
    torn_check_over_https(&srv, &pki);
    tls_metrics(&srv, &pki);
    srv.guest.stop_server();
}

hw_tests::for_each_nic!(https_end_to_end);
