//! A guest running `zerosend serve` on the TAP network, for the tests that talk to it with
//! real clients (curl, Linux TCP sockets) from the network namespace the harness created.
//!
//! ```no_run
//! use hw_tests::serve_guest::{url, ServerGuest, PORT};
//! use hw_tests::{netns::GUEST_IP, Nic};
//! let srv = ServerGuest::boot("example", Nic::Virtio, 1, |guest| {
//!     guest.run(&format!("zerosend serve --root /data --ip {GUEST_IP}/24 --port {PORT}"))
//! });
//! let o = srv.curl(&[&url("/hello.txt")]);
//! srv.check(o.stdout == hw_tests::serve_guest::HELLO, "hello.txt");
//! srv.guest.stop_server();
//! ```

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::content::{random_bytes, sha256_hex};
use crate::netns::GUEST_IP;
use crate::{Guest, Network, Nic, RunningGuest};

/// The port the tests' servers listen on.
pub const PORT: u16 = 80;
/// Length of `/data/big.bin`: 8 MiB, large enough for TSO, many windows and evictions.
pub const BIG_LEN: usize = 8 << 20;

/// Kernel argument reserving 2 MiB pages at boot for a server guest: 288 MiB, the default
/// 256 MiB page cache and room for the pools.
pub const HUGE_PAGES_ARG: &str = "hugepages=144";
/// The content of `/data/hello.txt`.
pub const HELLO: &[u8] = b"hello from zerosend\n";
/// How long one curl may take before it counts as hung.
const CURL_MAX_TIME: Duration = Duration::from_secs(120);

/// The port of the metrics page (`--metrics-listen`): the tests' servers pass
/// [`ACCESS_FLAGS`].
pub const METRICS_PORT: u16 = 9464;
/// What the tests' servers allow beyond reads: PUT, and the metrics page on its own port.
pub const ACCESS_FLAGS: &str = "--allow-put --metrics-listen 9464";

/// The URL of the guest server's metrics page.
pub fn metrics_url() -> String {
    format!("http://{GUEST_IP}:{METRICS_PORT}/_zerosend/metrics")
}

/// The URL of `path` on the guest's server.
pub fn url(path: &str) -> String {
    format!("http://{GUEST_IP}:{PORT}{path}")
}

/// A booted guest serving `/data`, and the content of its `/data/big.bin`.
pub struct ServerGuest {
    pub nic: Nic,
    pub guest: RunningGuest,
    pub big: Vec<u8>,
}

impl ServerGuest {
    /// Boots guest `<name>-<nic>` on the TAP network with 1 GiB of memory and 900 s for the
    /// whole test, with the files every server test serves (`/data/big.bin`, [`BIG_LEN`]
    /// random bytes from `seed`, and `/data/hello.txt`) and what `setup` adds: the test's own
    /// files and its `zerosend serve` command. Returns once the server says it is serving.
    pub fn boot(
        name: &str,
        nic: Nic,
        seed: u64,
        setup: impl FnOnce(Guest) -> Guest,
    ) -> ServerGuest {
        let big = random_bytes(seed, BIG_LEN);
        let guest = Guest::new(&format!("{name}-{}", nic.name()), nic)
            .network(Network::Tap)
            .memory_mb(1024)
            // The page cache (256 MiB by default) in 2 MiB pages, as README advises a
            // deployment: fewer descriptors and IOMMU translations per frame.
            .append(HUGE_PAGES_ARG)
            .timeout(Duration::from_secs(900))
            .file("/data/big.bin", big.clone())
            .file("/data/hello.txt", HELLO.to_vec());
        let guest = setup(guest).start().unwrap();
        guest.wait_for_console("zerosend: serving", Duration::from_secs(180));
        ServerGuest { nic, guest, big }
    }

    /// Run curl (`-sS`, at most two minutes) inside the namespace.
    pub fn curl(&self, args: &[&str]) -> Output {
        self.guest.curl(CURL_MAX_TIME, args)
    }

    /// PUTs `body` to `path` with curl (`-T`, from a scratch file); returns the status code
    /// curl saw.
    pub fn put(&self, path: &str, body: &[u8]) -> String {
        let dir = self.scratch_dir("put");
        let file = dir.join("body");
        std::fs::write(&file, body).unwrap();
        let o = self.curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-T",
            file.to_str().unwrap(),
            &url(path),
        ]);
        let _ = std::fs::remove_file(&file);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Panics with the console tail unless `ok`.
    #[track_caller]
    pub fn check(&self, ok: bool, what: &str) {
        self.guest.check(ok, what);
    }

    /// Downloads `/big.bin` with curl to a scratch file and checks that it arrived whole
    /// (status 200, [`BIG_LEN`] bytes) and byte-exact (sha256); `what` names the download in
    /// a failure. Returns the seconds it took.
    pub fn download_big(&self, what: &str) -> f64 {
        let dir = self.scratch_dir("download");
        let out = dir.join("big.bin");
        let started = Instant::now();
        let o = self.curl(&[
            "-o",
            out.to_str().unwrap(),
            "-w",
            "%{http_code} %{size_download}",
            &url("/big.bin"),
        ]);
        let secs = started.elapsed().as_secs_f64();
        let got = std::fs::read(&out).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        self.check(
            String::from_utf8_lossy(&o.stdout) == format!("200 {BIG_LEN}"),
            &format!(
                "{what}: curl: {} {}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        );
        self.check(
            sha256_hex(&got) == sha256_hex(&self.big),
            &format!("{what}: sha256 of the download differs"),
        );
        secs
    }

    /// The server's metrics page; panics with the console tail if it cannot be read.
    pub fn metrics(&self) -> String {
        let o = self.curl(&[&metrics_url()]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        self.check(
            text.contains("zerosend_frames_tx_total"),
            &format!("no metrics: {text} {}", String::from_utf8_lossy(&o.stderr)),
        );
        text
    }

    /// One sample of a metrics page `text`; panics if it is missing.
    pub fn metric(&self, text: &str, name: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| self.guest.fail(&format!("metric {name} missing:\n{text}")))
    }

    /// A host directory of this server's own, `what` for: the NIC models run in parallel in
    /// one test process, so shared paths would mix their downloads.
    pub fn scratch_dir(&self, what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "zs-e2e-{}-{}-{what}",
            std::process::id(),
            self.nic.name()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

impl RunningGuest {
    /// Run curl (`-sS`, giving up after `max_time`) inside the namespace of a
    /// [`Network::Tap`] guest; `args` come after those options (so a later `--max-time`
    /// wins).
    pub fn curl(&self, max_time: Duration, args: &[&str]) -> Output {
        self.netns()
            .command("curl")
            .args(["-sS", "--max-time", &max_time.as_secs().to_string()])
            .args(args)
            .output()
            .unwrap()
    }

    /// Panics with `what` and the console tail unless `ok`.
    #[track_caller]
    pub fn check(&self, ok: bool, what: &str) {
        if !ok {
            self.fail(what);
        }
    }
}
