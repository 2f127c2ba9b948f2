//! zerosend against the guest's own Linux (run by `scripts/bench`; ignored in the suite).
//!
//! For each NIC model, three variants in alternating boots of the same guest (q35, TCG,
//! emulated VT-d with caching mode, 1 vCPU, 1 GiB, TAP device in a network namespace the
//! harness creates):
//! - `zerosend`: `zerosend serve` on the NIC bound to vfio-pci (its own driver and stack);
//! - `linux-strict`: the guest kernel's driver and TCP, `zs-linux-serve` with `sendfile(2)`,
//!   the vIOMMU on with strict invalidation (`iommu.strict=1`: the NIC's group is `DMA`);
//! - `linux-off`: the same with `intel_iommu=off` (the NIC has no IOMMU group).
//!
//! Both servers serve the same files from the initramfs's tmpfs. Per boot, after every file
//! is downloaded once and sha256-checked (HTTP and HTTPS), the workloads run from the
//! namespace: 64 MiB single downloads with curl (HTTP, then HTTPS: zerosend's own TLS
//! against rustls handshake + kernel kTLS, AES-128-GCM both); 4 KiB keep-alive GETs with
//! `wrk`, 64 connections; 1 MiB GETs with `wrk` at 1, 16, 256 and 1024 connections
//! (aggregate bytes, partial responses included). Each sample records QEMU's CPU time
//! (`/proc/<pid>/stat`), the guest's busy CPU time (`/proc/stat` in the guest, sampled
//! every 0.5 s on the console) and the server process's (its `/proc/<pid>/stat`).
//!
//! Samples go to `target/bench/samples.tsv`; `scripts/bench-report` makes the tables and
//! plots. Environment: BENCH_BOOTS (per variant, default 3), BENCH_SECONDS (per wrk run,
//! default 10), BENCH_DOWNLOADS (64 MiB HTTP downloads per boot, default 3),
//! BENCH_TLS_DOWNLOADS (HTTPS, default BENCH_DOWNLOADS),
//! BENCH_NICS (comma-separated, default all), BENCH_VARIANTS (default zerosend, linux-strict,
//! linux-off; also zerosend-smp2-q1 and zerosend-smp2-q2: a 2-vCPU guest with one or two
//! queue pairs, `scripts/bench --cores`), BENCH_CONNS (1 MiB GETs, default 1,16,256,1024),
//! BENCH_SMALL_CONNS (4 KiB GETs, default 64); zerosend-alt takes BENCH_ALT_FLAGS,
//! BENCH_ALT_ENV and BENCH_ALT_BIN (see `Variant::ZerosendAlt`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hw_tests::content::{random_bytes, sha256_hex};
use hw_tests::netns::GUEST_IP;
use hw_tests::pki::Pki;
use hw_tests::{cache_dir, linux_baseline_program, target_dir, Guest, Network, Nic, RunningGuest};

const BIG: usize = 64 << 20;
const MID: usize = 1 << 20;
const SMALL: usize = 4 << 10;
/// How long one client run may take before it counts as hung.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Zerosend,
    /// zerosend with `--audit` (as the demo runs it): the cost of proving pinned pages
    /// stable, against `Zerosend` in the same run.
    ZerosendAudit,
    /// zerosend with the extra flags in `BENCH_ALT_FLAGS` and the environment assignments in
    /// `BENCH_ALT_ENV`: an A/B of a setting against `Zerosend` in one run (e.g.
    /// `BENCH_ALT_FLAGS="--tcp-send-buffer-kb 2048"`, or `BENCH_ALT_ENV="GLIBC_TUNABLES="`
    /// for glibc's default copy thresholds instead of the guest's `/init` ones), or of another
    /// build of the server at `BENCH_ALT_BIN`.
    ZerosendAlt,
    LinuxStrict,
    LinuxOff,
    /// zerosend in a 2-vCPU guest with one queue pair, and with two (a stack per core;
    /// virtio-net gets `mq=on` on a multi-queue TAP, the 82574L always has two).
    ZerosendSmp2Q1,
    ZerosendSmp2Q2,
}

impl Variant {
    const ALL: [Variant; 7] = [
        Variant::Zerosend,
        Variant::ZerosendAudit,
        Variant::ZerosendAlt,
        Variant::LinuxStrict,
        Variant::LinuxOff,
        Variant::ZerosendSmp2Q1,
        Variant::ZerosendSmp2Q2,
    ];
    fn is_zerosend(self) -> bool {
        matches!(
            self,
            Variant::Zerosend
                | Variant::ZerosendAudit
                | Variant::ZerosendAlt
                | Variant::ZerosendSmp2Q1
                | Variant::ZerosendSmp2Q2
        )
    }
    /// The server binary a zerosend variant runs: `zerosend` (the build under test), or for
    /// zerosend-alt the one at `BENCH_ALT_BIN` if set (an A/B of two builds, e.g. another
    /// profile, alternating boot by boot in one run), copied to `/opt/zerosend-alt`.
    fn alt_binary(self) -> Option<PathBuf> {
        match self {
            Variant::ZerosendAlt => std::env::var_os("BENCH_ALT_BIN")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
            _ => None,
        }
    }
    /// Flags a zerosend variant adds to the common `zerosend serve` command.
    fn extra_flags(self) -> String {
        match self {
            Variant::ZerosendAudit => " --audit".into(),
            Variant::ZerosendAlt => {
                format!(" {}", std::env::var("BENCH_ALT_FLAGS").unwrap_or_default())
            }
            _ => String::new(),
        }
    }
    /// Environment assignments put before the `zerosend serve` command.
    fn env_prefix(self) -> String {
        match self {
            Variant::ZerosendAlt => match std::env::var("BENCH_ALT_ENV") {
                Ok(env) if !env.trim().is_empty() => format!("{} ", env.trim()),
                _ => String::new(),
            },
            _ => String::new(),
        }
    }
    /// The send buffer every zerosend variant runs with unless its extra flags set one:
    /// 2 MiB explicitly, because with `--max-connections 1100` the default would be
    /// fitted down to the guest's memory (256 KiB) for the sake of the worst case.
    fn send_buffer_flag(self) -> &'static str {
        if self.extra_flags().contains("--tcp-send-buffer-kb") {
            ""
        } else {
            " --tcp-send-buffer-kb 2048"
        }
    }
    /// vCPUs of the guest and queue pairs of the server.
    fn cpus_and_queues(self) -> (u32, u32) {
        match self {
            Variant::ZerosendSmp2Q1 => (2, 1),
            Variant::ZerosendSmp2Q2 => (2, 2),
            _ => (1, 1),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Variant::Zerosend => "zerosend",
            Variant::ZerosendAudit => "zerosend-audit",
            Variant::ZerosendAlt => "zerosend-alt",
            Variant::ZerosendSmp2Q1 => "zerosend-smp2-q1",
            Variant::ZerosendSmp2Q2 => "zerosend-smp2-q2",
            Variant::LinuxStrict => "linux-strict",
            Variant::LinuxOff => "linux-off",
        }
    }
}

/// CPU counters at one moment: QEMU's, and the guest's from its latest console sample.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    /// QEMU process utime+stime, host clock ticks.
    qemu_ticks: u64,
    /// Of those, the vCPU threads' ("CPU n/TCG"): the guest's own work. The rest is QEMU's
    /// device emulation (main loop and I/O threads), so the two tell which side was busy.
    qemu_vcpu_ticks: u64,
    /// Guest `/proc/stat` busy ticks (all but idle and iowait), USER_HZ.
    guest_busy: u64,
    /// Server process utime+stime in the guest, USER_HZ.
    server: u64,
}

struct Bench {
    guest: RunningGuest,
    files: Vec<(&'static str, Vec<u8>)>,
    pki: PathBuf,
    scratch: PathBuf,
    lua: PathBuf,
}

/// One measured row (a line of samples.tsv).
struct Sample {
    workload: String,
    /// Bytes received (wrk: including partial responses), responses completed, seconds.
    bytes: u64,
    requests: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    cpu: (Cpu, Cpu),
    /// The host's 1-minute load average when the sample started (other work on the machine).
    load: String,
    /// The host's busy CPU ticks (all CPUs, all but idle and iowait) during the workload
    /// alone: whether the host itself (QEMU, the TAP device, the client) ran out of cores.
    host_busy_ticks: u64,
}

/// The host's busy ticks so far, from the first line of its /proc/stat (USER_HZ).
fn host_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let first = stat.lines().next().unwrap_or_default();
    parse_cpu_line(&format!("ZS-CPU {first} |")).map_or(0, |(busy, _)| busy)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime+stime of QEMU's vCPU threads (named "CPU n/TCG"), host clock ticks.
fn qemu_vcpu_ticks(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("CPU "))
        })
        .map(|t| stat_ticks(&t.path().join("stat")))
        .sum()
}

fn qemu_ticks(pid: u32) -> u64 {
    stat_ticks(Path::new(&format!("/proc/{pid}/stat")))
}

/// utime+stime of a `/proc/.../stat` file, clock ticks (0 if it cannot be read).
fn stat_ticks(path: &Path) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime and stime are fields 14, 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Parses `ZS-CPU cpu u n s i iow irq sirq steal ... | <pid> (comm) S ... utime stime ...`.
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let body = line.split_once("ZS-CPU ")?.1;
    let (sys, proc_) = body.split_once('|')?;
    let v: Vec<u64> = sys
        .split_whitespace()
        .skip(1)
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let server = proc_
        .rsplit_once(')')
        .map(|(_, r)| {
            let f: Vec<u64> = r
                .split_whitespace()
                .map(|w| w.parse().unwrap_or(0))
                .collect();
            f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
        })
        .unwrap_or(0);
    Some((total - idle, server))
}

impl Bench {
    /// The latest guest CPU sample at or after console line `from` (waiting for one to
    /// appear, up to 5 s), with QEMU's counter read now.
    fn cpu_after(&self, from: usize) -> (Cpu, usize) {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let (lines, next) = self.guest.console_lines_from(from);
            if let Some((busy, server)) = lines.iter().rev().find_map(|l| parse_cpu_line(l)) {
                let pid = self.guest.qemu_pid().unwrap();
                let qemu = qemu_ticks(pid);
                return (
                    Cpu {
                        qemu_ticks: qemu,
                        qemu_vcpu_ticks: qemu_vcpu_ticks(pid),
                        guest_busy: busy,
                        server,
                    },
                    next,
                );
            }
            if Instant::now() > until {
                self.guest.fail("no ZS-CPU sample on the console for 5 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn console_len(&self) -> usize {
        self.guest.console_lines_from(usize::MAX).1
    }

    /// CPU counters before a workload: the last sample so far (taken while idle).
    fn cpu_before(&self) -> (Cpu, usize) {
        let len = self.console_len();
        let (cpu, _) = self.cpu_after(len.saturating_sub(20));
        (cpu, len)
    }

    fn run_measured(
        &self,
        workload: &str,
        f: impl FnOnce() -> (u64, u64, f64, f64, f64, u64),
    ) -> Sample {
        // Let the previous workload's connections wind down first.
        std::thread::sleep(Duration::from_millis(1500));
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load = load.split(' ').next().unwrap_or("?").to_string();
        let (before, len) = self.cpu_before();
        let host_before = host_busy_ticks();
        let (bytes, requests, secs, p50_ms, p99_ms, errors) = f();
        let host_busy_ticks = host_busy_ticks().saturating_sub(host_before);
        let (after, _) = self.cpu_after(len);
        Sample {
            workload: workload.into(),
            bytes,
            requests,
            secs,
            p50_ms,
            p99_ms,
            errors,
            cpu: (before, after),
            load,
            host_busy_ticks,
        }
    }

    fn curl(&self, args: &[&str]) -> std::process::Output {
        self.guest.curl(CLIENT_TIMEOUT, args)
    }

    fn tls_args(&self) -> Vec<String> {
        vec![
            "--cacert".into(),
            self.pki.join("ca.pem").display().to_string(),
            "--tls13-ciphers".into(),
            "TLS_AES_128_GCM_SHA256".into(),
        ]
    }

    fn url(&self, https: bool, name: &str) -> String {
        if https {
            format!("https://{GUEST_IP}:443/{name}")
        } else {
            format!("http://{GUEST_IP}:80/{name}")
        }
    }

    /// Every file once over HTTP and the big one over HTTPS, sha256-checked (retrying the
    /// first until the link is up).
    fn verify(&self, with_https: bool) {
        for (i, (name, data)) in self.files.iter().enumerate() {
            for https in [false, true] {
                if https && (i != 0 || !with_https) {
                    continue;
                }
                let out = self.scratch.join("verify.bin");
                let mut args: Vec<String> = Vec::new();
                if https {
                    args.extend(self.tls_args());
                }
                args.extend(
                    [
                        "--retry",
                        "20",
                        "--retry-connrefused",
                        "--retry-delay",
                        "1",
                        "-o",
                        out.to_str().unwrap(),
                        "-w",
                        "%{http_code}",
                    ]
                    .map(String::from),
                );
                args.push(self.url(https, name));
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                let o = self.curl(&refs);
                let got = std::fs::read(&out).unwrap_or_default();
                let _ = std::fs::remove_file(&out);
                self.guest.check(
                    o.stdout == b"200" && sha256_hex(&got) == sha256_hex(data),
                    &format!(
                        "{name} (https {https}): status {} stderr {}, {} bytes, sha256 differs or short",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr),
                        got.len()
                    ),
                );
            }
        }
    }

    /// One 64 MiB download to /dev/null (its bytes were checked by [`Bench::verify`]).
    fn download(&self, https: bool) -> (u64, u64, f64, f64, f64, u64) {
        let mut args: Vec<String> = if https { self.tls_args() } else { Vec::new() };
        args.extend(
            [
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download} %{time_total}",
            ]
            .map(String::from),
        );
        args.push(self.url(https, "big.bin"));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = self.curl(&refs);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let w: Vec<&str> = text.split_whitespace().collect();
        let size: u64 = w.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let secs: f64 = w.get(2).and_then(|s| s.parse().ok()).unwrap_or(0.0);
        self.guest.check(
            w.first() == Some(&"200") && size == BIG as u64,
            &format!(
                "download (https {https}): {text} {}",
                String::from_utf8_lossy(&o.stderr)
            ),
        );
        (size, 1, secs, 0.0, 0.0, 0)
    }

    /// `wrk` for `seconds` with `conns` connections on `name`.
    fn wrk(&self, name: &str, conns: u32, seconds: u32) -> (u64, u64, f64, f64, f64, u64) {
        let threads = conns.min(2);
        let cmd = format!(
            "ulimit -n 8192; exec wrk -t{threads} -c{conns} -d{seconds}s --timeout 60s -s {} {}",
            self.lua.display(),
            self.url(false, name)
        );
        let o = self
            .guest
            .netns()
            .command("sh")
            .args(["-c", &cmd])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let Some(line) = text.lines().find(|l| l.starts_with("WRK ")) else {
            self.guest.fail(&format!(
                "wrk gave no summary: {text} {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        };
        let get = |k: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0)
        };
        let errors = get("connect") + get("read") + get("write") + get("status") + get("timeout");
        (
            get("bytes"),
            get("requests"),
            get("duration_us") as f64 / 1e6,
            get("p50_us") as f64 / 1e3,
            get("p99_us") as f64 / 1e3,
            errors,
        )
    }
}

/// wrk's summary as one parseable line (latencies in microseconds).
const WRK_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK requests=%d bytes=%d duration_us=%d p50_us=%d p99_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.bytes, summary.duration, latency:percentile(50),
    latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
"#;

/// The guest's CPU sampler: every 0.5 s one console line with the first line of
/// /proc/stat and the server's /proc/<pid>/stat (shell builtins only, so the sampling
/// itself costs little and the same in every variant).
const SAMPLER: &str = r#"zs_sample() { while :; do read -r l < /proc/stat; s=""; read -r s < /proc/$1/stat || true; echo "ZS-CPU $l | $s"; sleep 0.5; done; }"#;

fn boot(nic: Nic, variant: Variant, files: &[(&'static str, Vec<u8>)], pki: &Path) -> RunningGuest {
    let read =
        |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    let mut guest = Guest::new(
        &format!("bench-linux-{}-{}", nic.name(), variant.name()),
        nic,
    )
    .network(Network::Tap)
    .memory_mb(1024)
    .cpus(variant.cpus_and_queues().0)
    .queues(if nic == Nic::Virtio {
        variant.cpus_and_queues().1
    } else {
        1
    })
    .timeout(Duration::from_secs(1800))
    .file("/etc/zs/cert.pem", read(&pki.join("cert.pem")))
    .file("/etc/zs/key.pem", read(&pki.join("key.pem")));
    for (name, data) in files {
        guest = guest.file(&format!("/data/{name}"), data.clone());
    }
    let tls = "--tls-cert /etc/zs/cert.pem --tls-key /etc/zs/key.pem --tls-port 443";
    if variant.is_zerosend() {
        guest = guest.append(hw_tests::serve_guest::HUGE_PAGES_ARG);
    }
    let (server_prefix, server_cmd) = match variant.alt_binary() {
        Some(path) => {
            guest = guest.file("/opt/zerosend-alt", read(&path));
            ("chmod 755 /opt/zerosend-alt\n", "/opt/zerosend-alt")
        }
        None => ("", "zerosend"),
    };
    let script = match variant {
        Variant::Zerosend
        | Variant::ZerosendAudit
        | Variant::ZerosendAlt
        | Variant::ZerosendSmp2Q1
        | Variant::ZerosendSmp2Q2 => format!(
            "{SAMPLER}\n{server_prefix}{}{server_cmd} serve --root /data --ip {GUEST_IP}/24 --port 80 {tls} \
             --max-connections 1100 --queues {} --metrics-listen 9464{}{} &\npid=$!\nzs_sample $pid &\nwait $pid",
            variant.env_prefix(),
            variant.cpus_and_queues().1,
            variant.send_buffer_flag(),
            variant.extra_flags(),
        ),
        Variant::LinuxStrict | Variant::LinuxOff => {
            let mods = cache_dir().join("kernel/current/linux-modules");
            let order = std::fs::read_to_string(mods.join("order"))
                .expect("no linux-modules/order: run scripts/setup");
            for m in order.split_whitespace() {
                guest = guest.file(&format!("/lib/zs-linux/{m}"), read(&mods.join(m)));
            }
            guest = guest.file("/lib/zs-linux/order", order.into_bytes());
            guest = guest
                .no_auto_bind()
                .append(if variant == Variant::LinuxStrict {
                    "iommu.strict=1"
                } else {
                    "intel_iommu=off"
                })
                .file_with_mtime(
                    "/bin/zs-linux-serve",
                    read(linux_baseline_program()),
                    0o755,
                    0,
                );
            // The kernel's e1000e reports carrier a second or more after `ip link set up`
            // (a first connection before it failed): wait for it, at most 10 s.
            format!(
                "{SAMPLER}\nfor m in $(cat /lib/zs-linux/order); do insmod /lib/zs-linux/$m; done\n\
                 dev=$(ls /sys/class/net | grep -v '^lo$' | head -n1)\n\
                 pci=$(readlink -f /sys/class/net/$dev/device); case $pci in */virtio*) pci=$(dirname $pci);; esac\n\
                 grp=none; [ -e $pci/iommu_group ] && grp=$(cat $pci/iommu_group/type)\n\
                 echo \"ZS-IOMMU dev=$dev driver=$(basename $(readlink /sys/class/net/$dev/device/driver)) group_type=$grp\"\n\
                 ip addr add {GUEST_IP}/24 dev $dev\nip link set $dev up\n\
                 i=0; while [ \"$(cat /sys/class/net/$dev/carrier 2>/dev/null)\" != 1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
                 zs-linux-serve --root /data --port 80 {tls} &\npid=$!\nzs_sample $pid &\nwait $pid"
            )
        }
    };
    let guest = guest.run(&script).start().unwrap();
    let ready = if variant.is_zerosend() {
        "zerosend: serving"
    } else {
        "zs-linux-serve: serving"
    };
    let serving = guest.wait_for_console(ready, Duration::from_secs(300));
    if variant.is_zerosend() {
        // The label must be true here too.
        let audit = if variant.extra_flags().contains("--audit") {
            "audit on"
        } else {
            "audit off"
        };
        guest.check(
            serving.contains(audit),
            &format!("expected {audit}: {serving}"),
        );
    }
    if !variant.is_zerosend() {
        // The label must be true: strict means the NIC's DMA goes through the vIOMMU with
        // strict invalidation (group type "DMA", not the lazy "DMA-FQ"); off means no group.
        let line = guest.wait_for_console("ZS-IOMMU", Duration::from_secs(30));
        let want = if variant == Variant::LinuxStrict {
            "group_type=DMA"
        } else {
            "group_type=none"
        };
        guest.check(
            line.split_whitespace().any(|w| w == want),
            &format!("{}: expected {want}: {line}", variant.name()),
        );
    }
    guest
}

#[test]
#[ignore = "benchmark: run with scripts/bench"]
fn bench_linux() {
    let boots: usize = env_or("BENCH_BOOTS", 3);
    let seconds: u32 = env_or("BENCH_SECONDS", 10);
    let downloads: usize = env_or("BENCH_DOWNLOADS", 3);
    let tls_downloads: usize = env_or("BENCH_TLS_DOWNLOADS", downloads);
    let nics: Vec<Nic> = env_list("BENCH_NICS", "virtio,e1000,e1000e")
        .iter()
        .map(|n| Nic::parse(n).unwrap_or_else(|| panic!("unknown NIC {n}")))
        .collect();
    let variants: Vec<Variant> = env_list("BENCH_VARIANTS", "zerosend,linux-strict,linux-off")
        .iter()
        .map(|v| {
            *Variant::ALL
                .iter()
                .find(|x| x.name() == v)
                .unwrap_or_else(|| panic!("unknown variant {v}"))
        })
        .collect();
    let small_conns: Vec<u32> = env_list("BENCH_SMALL_CONNS", "64")
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    let conns: Vec<u32> = env_list("BENCH_CONNS", "1,16,256,1024")
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();

    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let scratch = std::env::temp_dir().join(format!("zs-bench-linux-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    // The shared test PKI (its server certificate names GUEST_IP); deleted at the end.
    let pki_files = Pki::make(Nic::Virtio);
    let pki = pki_files.path("");
    let lua = scratch.join("report.lua");
    std::fs::write(&lua, WRK_LUA).unwrap();
    let files: Vec<(&'static str, Vec<u8>)> = vec![
        ("big.bin", random_bytes(64, BIG)),
        ("1m.bin", random_bytes(65, MID)),
        ("4k.bin", random_bytes(66, SMALL)),
    ];
    // Build the baseline before the first boot so the build is not inside a measurement.
    let _ = linux_baseline_program();

    let tsv = out_dir.join("samples.tsv");
    let _ = std::fs::remove_file(out_dir.join("failed-boots.txt"));
    let mut rows = String::from(
        "nic\tvariant\tboot\tworkload\tbytes\trequests\tsecs\tp50_ms\tp99_ms\terrors\tqemu_cpu_s\tguest_cpu_s\tserver_cpu_s\tload\tqemu_vcpu_s\thost_busy_s\n",
    );
    let host_hz = clock_ticks();
    let started = Instant::now();
    for round in 0..boots {
        for &nic in &nics {
            // Alternate: each round starts with the next variant.
            for k in 0..variants.len() {
                let variant = variants[(k + round) % variants.len()];
                let t0 = Instant::now();
                // One boot's measurements; returns its samples and log directory.
                let measure = || {
                    let guest = boot(nic, variant, &files, &pki);
                    let bench = Bench {
                        guest,
                        files: files.clone(),
                        pki: pki.clone(),
                        scratch: scratch.clone(),
                        lua: lua.clone(),
                    };
                    bench.verify(true);
                    let mut samples = Vec::new();
                    for _ in 0..downloads {
                        samples.push(bench.run_measured("download-64m", || bench.download(false)));
                    }
                    for _ in 0..tls_downloads {
                        samples
                            .push(bench.run_measured("download-64m-tls", || bench.download(true)));
                    }
                    if !variant.is_zerosend() {
                        let line = bench
                            .guest
                            .wait_for_console("zs-linux-serve: ktls", Duration::from_secs(5));
                        let counter = |k: &str| -> u64 {
                            line.split_whitespace()
                                .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
                                .unwrap_or(0)
                        };
                        // Printed while the first kTLS connection is open: the kernel seals its
                        // records in software (no NIC here offloads TLS).
                        bench.guest.check(
                            counter("TlsCurrTxSw") >= 1 && counter("TlsTxSw") >= 1,
                            &format!("kTLS not active: {line}"),
                        );
                    }
                    for &c in &small_conns {
                        samples.push(bench.run_measured(&format!("get-4k-c{c}"), || {
                            bench.wrk("4k.bin", c, seconds)
                        }));
                    }
                    for &c in &conns {
                        samples.push(bench.run_measured(&format!("get-1m-c{c}"), || {
                            bench.wrk("1m.bin", c, seconds)
                        }));
                    }
                    // The server must still serve correct bytes after the load (HTTP: the
                    // HTTPS download is the slowest step of a boot, and was checked above).
                    bench.verify(false);
                    if variant.is_zerosend() {
                        // The server's own counters after the load, for looking into a figure.
                        let o = bench.guest.curl(
                            Duration::from_secs(30),
                            &[&format!("http://{GUEST_IP}:9464/_zerosend/metrics")],
                        );
                        let path = bench.guest.log_dir().join("metrics-after.txt");
                        let _ = std::fs::write(path, &o.stdout);
                    }
                    let run = bench.guest.stop_server();
                    (samples, run.dir)
                };
                // A Linux baseline that fails (seen on virtio-net with intel_iommu=off:
                // virtio_net's transmit queue timed out in the guest, and the host could no
                // longer reach it) is booted once more; failing twice, its boot is recorded in
                // failed-boots.txt (the report lists it) and has no samples. zerosend failing
                // fails the benchmark.
                let attempt = || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(measure)).map_err(|e| {
                        e.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default()
                    })
                };
                let (samples, run_dir) = if variant.is_zerosend() {
                    measure()
                } else {
                    match attempt().or_else(|first| {
                        println!(
                            "bench: {} {} boot {round}: the Linux baseline failed (above); booting it once more",
                            nic.name(),
                            variant.name()
                        );
                        attempt().map_err(|second| (first, second))
                    }) {
                        Ok(done) => done,
                        Err((first, second)) => {
                            let why = |m: &str| m.lines().next().unwrap_or("").to_string();
                            let line = format!(
                                "{}\t{}\t{round}\t{} / then: {}\n",
                                nic.name(),
                                variant.name(),
                                why(&first),
                                why(&second)
                            );
                            print!("bench: failed twice, no samples: {line}");
                            let mut f = std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(out_dir.join("failed-boots.txt"))
                                .unwrap();
                            std::io::Write::write_all(&mut f, line.as_bytes()).unwrap();
                            continue;
                        }
                    }
                };
                for s in &samples {
                    let (b, a) = s.cpu;
                    writeln!(
                        rows,
                        "{}\t{}\t{round}\t{}\t{}\t{}\t{:.4}\t{:.3}\t{:.3}\t{}\t{:.3}\t{:.3}\t{:.3}\t{}\t{:.3}\t{:.3}",
                        nic.name(),
                        variant.name(),
                        s.workload,
                        s.bytes,
                        s.requests,
                        s.secs,
                        s.p50_ms,
                        s.p99_ms,
                        s.errors,
                        a.qemu_ticks.saturating_sub(b.qemu_ticks) as f64 / host_hz,
                        a.guest_busy.saturating_sub(b.guest_busy) as f64 / 100.0,
                        a.server.saturating_sub(b.server) as f64 / 100.0,
                        s.load,
                        a.qemu_vcpu_ticks.saturating_sub(b.qemu_vcpu_ticks) as f64 / host_hz,
                        s.host_busy_ticks as f64 / host_hz,
                    )
                    .unwrap();
                    let rate = if s.workload.starts_with("get-4k") {
                        format!("{:.0} req/s", s.requests as f64 / s.secs)
                    } else {
                        format!("{:.0} Mbit/s", s.bytes as f64 * 8.0 / s.secs / 1e6)
                    };
                    // Busy share of the wall time: QEMU's vCPU threads and its other threads.
                    let busy = |ticks: u64| ticks as f64 / host_hz / s.secs.max(1e-9) * 100.0;
                    let vcpu = busy(a.qemu_vcpu_ticks.saturating_sub(b.qemu_vcpu_ticks));
                    let all = busy(a.qemu_ticks.saturating_sub(b.qemu_ticks));
                    let host = s.host_busy_ticks as f64 / host_hz / s.secs.max(1e-9);
                    println!(
                        "bench: {} {} boot {round} {}: {rate} (errors {}; QEMU vCPU {vcpu:.0}%, other threads {:.0}%; host busy {host:.2} of {} cores)",
                        nic.name(),
                        variant.name(),
                        s.workload,
                        s.errors,
                        (all - vcpu).max(0.0),
                        std::thread::available_parallelism().map_or(0, |n| n.get()),
                    );
                }
                std::fs::write(&tsv, &rows).unwrap();
                println!(
                    "bench: {} {} boot {round} done in {:.0} s (total {:.0} s, {})",
                    nic.name(),
                    variant.name(),
                    t0.elapsed().as_secs_f64(),
                    started.elapsed().as_secs_f64(),
                    run_dir.display()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!("bench: samples in {}", tsv.display());
}

#[test]
fn cpu_sample_lines_parse() {
    // /proc/stat's first line (user nice system idle iowait irq softirq steal guest
    // guest_nice) and a /proc/<pid>/stat (utime 3048, stime 1202 at fields 14 and 15).
    let line = "ZS-CPU cpu  1681 0 1623 640 7 0 48 0 0 0 | 107 (zerosend) R 106 0 0 0 -1 \
                4194560 6396 0 0 0 3048 1202 0 0 20 0 4 0 1805";
    assert_eq!(parse_cpu_line(line), Some((1681 + 1623 + 48, 3048 + 1202)));
    assert_eq!(parse_cpu_line("zerosend: stats up 5s"), None);
}
