//! The orderly stop (`SIGTERM`/`SIGINT`), proven in the guest with curl on the host side of
//! the TAP network. One guest runs the server three times; the guest's script signals it
//! when a file the test PUTs appears (so the signal comes at a moment the test chose, with a
//! download in flight), then prints the server's exit status and what is on disk:
//!
//! 1. `--shutdown-timeout-secs 60`: an 8 MiB download in progress when the signal comes (its
//!    client reads nothing until then, so the server has bytes unacknowledged) completes
//!    byte-exact (sha256); a PUT acknowledged before the signal is on disk
//!    afterwards (sha256 in the guest); a new connection after the signal is refused; the
//!    server exits 0 and says it synced and released the NIC.
//! 2. `--shutdown-timeout-secs 2` with a download that cannot finish in time: the server
//!    resets it at the deadline and still exits 0 (the client sees a cut-off transfer, never
//!    a complete-looking wrong one).
//! 3. Two signals: the second stops at once (exit status 1) with a download unfinished.
//!
//! Each fails when the guarantee is switched off: without the orderly stop the first signal
//! kills the server (exit 143, the download cut off); without the deadline the second run
//! waits for the slow client; without the second-signal handler the third waits 60 s and
//! exits 0.

use std::io::{BufReader, Read, Write};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hw_tests::content::{random_bytes, sha256_hex};
use hw_tests::netns::GUEST_IP;
use hw_tests::raw_http::{connect, read_head};
use hw_tests::serve_guest::{url, ServerGuest, BIG_LEN, PORT};
use hw_tests::Nic;

/// The file PUT before the first signal.
const PUT_LEN: usize = 3 << 20;

/// The guest's script: three servers, each signalled once `/data/stop-N` exists.
fn script() -> String {
    let serve = format!(
        "zerosend serve --nic auto --root /data --ip {GUEST_IP}/24 --port {PORT} --allow-put \
         --stats-interval 60"
    );
    format!(
        r#"
# stop_after TIMEOUT FILE SIGNALS: serve until FILE appears, then send SIGTERM once or
# twice; $status is the server's exit status.
stop_after() {{
  {serve} --shutdown-timeout-secs $1 &
  pid=$!
  while [ ! -e "$2" ]; do sleep 0.2; done
  kill -TERM $pid
  if [ "$3" = twice ]; then sleep 1; kill -TERM $pid; fi
  status=0; wait $pid || status=$?
}}
stop_after 60 /data/stop-1 once
echo "first-exit $status"
echo "put-sha $(sha256sum /data/put.bin | cut -d' ' -f1)"
stop_after 2 /data/stop-2 once
echo "second-exit $status"
stop_after 60 /data/stop-3 twice
echo "third-exit $status"
echo "shutdown-test-done"
"#
    )
}

/// A download of `/big.bin` whose client reads nothing until released: its receive window
/// fills (the server then has bytes unacknowledged: a response in flight for as long as the
/// test likes), then it reads what comes until the end or `read_timeout`. The thread
/// returns the body bytes received and how the read ended.
struct HeldDownload {
    release: mpsc::Sender<()>,
    thread: JoinHandle<(Vec<u8>, String)>,
}

impl HeldDownload {
    fn start(srv: &ServerGuest, read_timeout: Duration) -> HeldDownload {
        let (release, released) = mpsc::channel::<()>();
        let thread = srv.guest.netns().spawn(move || {
            let mut s = connect(PORT);
            write!(s, "GET /big.bin HTTP/1.1\r\nHost: g\r\n\r\n").unwrap();
            let _ = released.recv();
            s.set_read_timeout(Some(read_timeout)).unwrap();
            let mut r = BufReader::new(s);
            let head = read_head(&mut r);
            let mut body = Vec::new();
            let end = match r.read_to_end(&mut body) {
                Ok(_) => "closed".to_string(),
                Err(e) => format!("{:?}", e.kind()),
            };
            (
                body,
                format!("{} / {end}", head.lines().next().unwrap_or("")),
            )
        });
        // Time for the request to arrive and the window to fill.
        std::thread::sleep(Duration::from_secs(2));
        HeldDownload { release, thread }
    }

    fn finish(self) -> (Vec<u8>, String) {
        let _ = self.release.send(());
        self.thread.join().unwrap()
    }
}

/// PUTs `body` to `path` and checks it was created.
fn put(srv: &ServerGuest, path: &str, body: &[u8]) {
    let status = srv.put(path, body);
    srv.check(status == "201", &format!("PUT {path}: {status}"));
}

/// Waits for the `n`th console line containing `needle`.
fn wait_nth(srv: &ServerGuest, needle: &str, n: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = srv.guest.console_lines_with(needle).get(n - 1) {
            return line.clone();
        }
        srv.check(
            Instant::now() < deadline,
            &format!("no {n}th {needle:?} on the console"),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn orderly_stop(nic: Nic) {
    let srv = ServerGuest::boot("shutdown", nic, 61, |guest| guest.run(&script()));

    // 1. A download in flight finishes; an acknowledged PUT is on disk.
    let download = HeldDownload::start(&srv, Duration::from_secs(120));
    let put_body = random_bytes(62, PUT_LEN);
    put(&srv, "/put.bin", &put_body);
    put(&srv, "/stop-1", b"1");
    let stopping = wait_nth(&srv, "zerosend: stopping:", 1, Duration::from_secs(60));
    let late = srv.curl(&["-o", "/dev/null", "-w", "%{http_code}", &url("/hello.txt")]);
    srv.check(
        String::from_utf8_lossy(&late.stdout) != "200",
        "a connection made after the signal was served",
    );
    let (body, how) = download.finish();
    srv.check(
        body.len() == BIG_LEN && sha256_hex(&body) == sha256_hex(&srv.big),
        &format!("the download in flight: {} bytes, {how}", body.len()),
    );
    let stopped = wait_nth(&srv, "zerosend: stopped:", 1, Duration::from_secs(60));
    println!("{}: {}; {}", nic.name(), stopping.trim(), stopped.trim());

    // 2. A client that does not finish in time is reset at the deadline.
    wait_nth(&srv, "zerosend: serving", 2, Duration::from_secs(120));
    let download = HeldDownload::start(&srv, Duration::from_secs(120));
    put(&srv, "/stop-2", b"2");
    let reset = wait_nth(
        &srv,
        "still busy after 2 s: reset",
        1,
        Duration::from_secs(60),
    );
    let (body, how) = download.finish();
    srv.check(
        body.len() < BIG_LEN && body == srv.big[..body.len()],
        &format!(
            "the download cut off at the deadline: {} bytes, {how}",
            body.len()
        ),
    );
    println!(
        "{}: {}; the client got {} bytes, {how}",
        nic.name(),
        reset.trim(),
        body.len()
    );

    // 3. A second signal stops at once, the download unfinished.
    wait_nth(&srv, "zerosend: serving", 3, Duration::from_secs(120));
    let download = HeldDownload::start(&srv, Duration::from_secs(5));
    put(&srv, "/stop-3", b"3");
    srv.guest
        .wait_for_console("shutdown-test-done", Duration::from_secs(120));
    // (A process that exits at once sends no reset: the read ends at its timeout.)
    let (body, how) = download.finish();
    srv.check(
        body.len() < BIG_LEN && body == srv.big[..body.len()],
        &format!(
            "the download across two signals: {} bytes, {how}",
            body.len()
        ),
    );
    let run = srv.guest.stop_server();
    run.expect_eq("first exit status", run.require("first-exit"), "0");
    run.expect_eq(
        "sha256 of the PUT file on disk",
        run.require("put-sha"),
        sha256_hex(&put_body).as_str(),
    );
    run.expect_eq("second exit status", run.require("second-exit"), "0");
    run.expect_eq("third exit status", run.require("third-exit"), "1");
}

hw_tests::for_each_nic!(orderly_stop);
