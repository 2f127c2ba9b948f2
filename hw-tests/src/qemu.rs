//! Boot a QEMU guest (q35, emulated VT-d, TCG) with one NIC, run one command in it, and
//! collect its console, exit status and pcap.
//!
//! Every guest has a QEMU monitor: QMP on a unix socket (`-qmp unix:...,server=on,
//! wait=off`), used through [`RunningGuest::monitor_command`] and [`RunningGuest::set_link`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::initramfs::{build_run_initramfs, GuestFile, EXIT_MARKER};
use crate::netns::{self, NetNs};
use crate::qmp::{json_string, Qmp};
use crate::relay::{Relay, RelayConfig, RelayStats};
use crate::{cache_dir, require_testbed, target_dir};

/// NIC models QEMU emulates for us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nic {
    /// Intel 82540EM, `-device e1000`.
    E1000,
    /// Intel 82574L, `-device e1000e`.
    E1000e,
    /// Intel 82545EM (copper), `-device e1000-82545em`.
    E1000_82545em,
    /// Modern virtio-net, `-device virtio-net-pci,disable-legacy=on,iommu_platform=on`.
    Virtio,
}

impl Nic {
    pub const ALL: [Nic; 3] = [Nic::E1000, Nic::E1000e, Nic::Virtio];

    pub fn pci_ids(self) -> (u16, u16) {
        match self {
            Nic::E1000 => (0x8086, 0x100e),
            Nic::E1000e => (0x8086, 0x10d3),
            Nic::E1000_82545em => (0x8086, 0x100f),
            Nic::Virtio => (0x1af4, 0x1041),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Nic::E1000 => "e1000",
            Nic::E1000e => "e1000e",
            Nic::E1000_82545em => "e1000-82545em",
            Nic::Virtio => "virtio",
        }
    }

    pub fn parse(s: &str) -> Option<Nic> {
        Nic::ALL
            .into_iter()
            .chain([Nic::E1000_82545em])
            .find(|n| n.name() == s)
    }
}

/// How the NIC is connected on the host side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Network {
    /// QEMU's user-mode NAT with `restrict=on` (the guest reaches nothing but forwarded
    /// ports); each listed guest TCP port is forwarded from a free port on 127.0.0.1.
    User { forwards: Vec<(u16, Option<u16>)> },
    /// A TAP device in a network namespace the harness creates: host peers at
    /// [`netns::HOST_IP`], the guest at [`netns::GUEST_IP`].
    Tap,
}

/// A guest to boot: builder.
#[derive(Clone, Debug)]
pub struct Guest {
    name: String,
    nic: Nic,
    mac: String,
    iommu: bool,
    virtio_iommu_platform: bool,
    virtio_packed: bool,
    memory_mb: u32,
    cpus: u32,
    queues: u32,
    append: String,
    network: Network,
    relay: Option<RelayConfig>,
    pcap: bool,
    auto_bind: bool,
    script: String,
    files: Vec<GuestFile>,
    timeout: Duration,
}

impl Guest {
    /// A guest named `name` (its logs go to `target/hw-tests/<name>/`) with one NIC.
    pub fn new(name: &str, nic: Nic) -> Self {
        Guest {
            name: name.to_string(),
            nic,
            mac: "52:54:00:12:34:56".into(),
            iommu: true,
            virtio_iommu_platform: true,
            virtio_packed: false,
            memory_mb: 512,
            cpus: 1,
            queues: 1,
            append: String::new(),
            network: Network::User {
                forwards: Vec::new(),
            },
            relay: None,
            pcap: false,
            auto_bind: true,
            script: String::new(),
            files: Vec::new(),
            timeout: Duration::from_secs(120),
        }
    }

    /// What every setter does: change the builder with `set` and hand it back.
    fn with(mut self, set: impl FnOnce(&mut Self)) -> Self {
        set(&mut self);
        self
    }

    pub fn mac(self, mac: &str) -> Self {
        self.with(|g| g.mac = mac.into())
    }
    /// Leave out the emulated IOMMU (to test that zerosend refuses to run without one).
    pub fn without_iommu(self) -> Self {
        self.with(|g| g.iommu = false)
    }
    /// virtio-net without `iommu_platform=on` (to test the refusal).
    pub fn without_virtio_iommu_platform(self) -> Self {
        self.with(|g| g.virtio_iommu_platform = false)
    }
    /// virtio-net with packed virtqueues offered (`packed=on`, VIRTIO_F_RING_PACKED).
    pub fn virtio_packed(self) -> Self {
        self.with(|g| g.virtio_packed = true)
    }
    pub fn memory_mb(self, mb: u32) -> Self {
        self.with(|g| g.memory_mb = mb)
    }
    pub fn cpus(self, n: u32) -> Self {
        self.with(|g| g.cpus = n)
    }
    /// Extra kernel command line.
    /// Queue pairs of a virtio-net device (`mq=on` on a multi-queue TAP, [`Network::Tap`]
    /// only). The e1000e always has its two queues; other models have one.
    pub fn queues(self, n: u32) -> Self {
        self.with(|g| g.queues = n.max(1))
    }
    pub fn append(self, args: &str) -> Self {
        self.with(|g| {
            if !g.append.is_empty() {
                g.append.push(' ');
            }
            g.append.push_str(args)
        })
    }
    pub fn network(self, network: Network) -> Self {
        self.with(|g| g.network = network)
    }
    /// Forward a guest TCP port from 127.0.0.1 (user-mode network).
    pub fn forward(self, guest_port: u16) -> Self {
        self.forward_from(guest_port, None)
    }
    /// Forward a guest TCP port from a given port on 127.0.0.1 (`None`: any free port).
    pub fn forward_from(self, guest_port: u16, host_port: Option<u16>) -> Self {
        self.with(|g| match &mut g.network {
            Network::User { forwards } => forwards.push((guest_port, host_port)),
            Network::Tap => panic!("port forwards need the user-mode network"),
        })
    }
    /// Record every frame on the NIC's netdev (QEMU `filter-dump`).
    /// Put the impairing relay ([`crate::relay`]) between the NIC and the namespace's TAP
    /// (implies [`Network::Tap`]): QEMU's NIC talks to the relay over UDP on the
    /// namespace's loopback, the relay to the host's TAP. Its counters:
    /// [`RunningGuest::relay_stats`].
    pub fn relay(self, config: RelayConfig) -> Self {
        self.with(|g| {
            g.network = Network::Tap;
            g.relay = Some(config);
        })
    }

    pub fn pcap(self) -> Self {
        self.with(|g| g.pcap = true)
    }
    /// Leave the NIC unbound at boot (tests of `scripts/vfio-bind` and `zerosend probe`).
    pub fn no_auto_bind(self) -> Self {
        self.with(|g| g.auto_bind = false)
    }
    /// The shell command(s) the guest runs (with `set -e`); its exit status is the run's.
    pub fn run(self, script: &str) -> Self {
        self.with(|g| g.script = script.into())
    }
    /// A file placed in the guest at `path` (absolute, e.g. `/data/file.bin`).
    pub fn file(self, path: &str, contents: Vec<u8>) -> Self {
        self.entry(path, contents, 0o100644, 0)
    }
    /// A file with a given modification time (seconds since the epoch) and permission bits.
    pub fn file_with_mtime(
        self,
        path: &str,
        contents: Vec<u8>,
        permissions: u32,
        mtime: u32,
    ) -> Self {
        self.entry(path, contents, 0o100000 | (permissions & 0o7777), mtime)
    }
    /// A symbolic link in the guest at `path` pointing to `target`.
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.entry(path, target.as_bytes().to_vec(), 0o120777, 0)
    }
    /// An empty directory in the guest.
    pub fn dir(self, path: &str) -> Self {
        self.entry(path, Vec::new(), 0o040755, 0)
    }
    fn entry(self, path: &str, data: Vec<u8>, mode: u32, mtime: u32) -> Self {
        self.with(|g| {
            g.files.push(GuestFile {
                path: path.into(),
                data,
                mode,
                mtime,
            })
        })
    }
    pub fn timeout(self, t: Duration) -> Self {
        self.with(|g| g.timeout = t)
    }

    /// Boot the guest and wait for its command to finish; panics if QEMU cannot start.
    pub fn run_to_end(self) -> GuestRun {
        self.start()
            .and_then(RunningGuest::wait)
            .unwrap_or_else(|e| panic!("guest: {e}"))
    }

    /// Boot the guest. Returns once QEMU is running; the command runs in the background.
    pub fn start(self) -> Result<RunningGuest, String> {
        require_testbed();
        let slot = GuestSlot::acquire();
        let dir = target_dir().join("hw-tests").join(&self.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let initrd = dir.join("initrd.cpio");
        let bind: &[(u16, u16)] = if self.auto_bind {
            &[self.nic.pci_ids()]
        } else {
            &[]
        };
        build_run_initramfs(&initrd, bind, &self.script, &self.files);

        let kernel = cache_dir().join("kernel/current/vmlinuz");
        let pcap = self.pcap.then(|| dir.join("nic.pcap"));
        let qmp_path = qmp_socket_path(&dir);
        let _ = std::fs::remove_file(&qmp_path);
        let mut host_ports = HashMap::new();
        let netns = match &self.network {
            Network::Tap => Some(NetNs::create_with_tap_queues(self.queues)?),
            Network::User { .. } => None,
        };
        let relay = match (&netns, &self.relay) {
            (Some(ns), Some(config)) => Some(Relay::start(ns, config.clone())?),
            _ => None,
        };
        let mut cmd = match &netns {
            Some(ns) => ns.command("qemu-system-x86_64"),
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
        // The machine monitor; QEMU does not wait for a client (wait=off).
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp_path.display()),
        ])
        .args([
            "-m",
            &self.memory_mb.to_string(),
            "-smp",
            &self.cpus.to_string(),
        ])
        .args(["-machine", "q35,kernel-irqchip=split"])
        // Named threads ("CPU 0/TCG" for a vCPU): the benchmarks split QEMU's CPU time
        // into the guest's work and the device models' by thread.
        .args(["-name", "zs-guest,debug-threads=on"]);
        if self.iommu {
            // The vIOMMU must exist before the devices it translates for.
            cmd.args(["-device", "intel-iommu,intremap=on,caching-mode=on"]);
        }
        cmd.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd);
        // no_timer_check: on a loaded host a TCG guest can fail (and panic on) the IO-APIC
        // timer check at boot.
        cmd.args([
            "-append",
            &format!(
                "console=ttyS0 intel_iommu=on quiet panic=-1 no_timer_check {}",
                self.append
            ),
        ]);
        match &self.network {
            Network::User { forwards } => {
                let mut netdev = "user,id=n0,restrict=on".to_string();
                for &(guest_port, fixed) in forwards {
                    let host_port = fixed.unwrap_or_else(free_port);
                    host_ports.insert(guest_port, host_port);
                    write!(netdev, ",hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}").unwrap();
                }
                cmd.args(["-netdev", &netdev]);
            }
            Network::Tap if relay.is_some() => {
                cmd.args(["-netdev", &Relay::netdev_arg("n0")]);
            }
            Network::Tap => {
                cmd.args([
                    "-netdev",
                    &format!(
                        "tap,id=n0,ifname={},script=no,downscript=no{}",
                        netns::TAP_NAME,
                        if self.queues > 1 {
                            format!(",queues={}", self.queues)
                        } else {
                            String::new()
                        }
                    ),
                ]);
            }
        }
        let device = match self.nic {
            Nic::E1000 => format!("e1000,netdev=n0,mac={}", self.mac),
            Nic::E1000e => format!("e1000e,netdev=n0,mac={}", self.mac),
            Nic::E1000_82545em => format!("e1000-82545em,netdev=n0,mac={}", self.mac),
            Nic::Virtio => format!(
                "virtio-net-pci,netdev=n0,mac={},disable-legacy=on{}{}{}",
                self.mac,
                if self.queues > 1 {
                    // One MSI-X vector per queue, plus configuration and control.
                    format!(",mq=on,rss=on,vectors={}", 2 * self.queues + 2)
                } else {
                    String::new()
                },
                if self.virtio_iommu_platform {
                    ",iommu_platform=on"
                } else {
                    ""
                },
                if self.virtio_packed { ",packed=on" } else { "" }
            ),
        };
        cmd.args(["-device", &device]);
        if let Some(p) = &pcap {
            cmd.args([
                "-object",
                &format!("filter-dump,id=f0,netdev=n0,file={}", p.display()),
            ]);
        }
        std::fs::write(dir.join("qemu-command.txt"), format!("{cmd:?}\n")).ok();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // QEMU must not outlive whoever started it (a killed test or demo): it gets SIGKILL
        // when the starting thread dies.
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting qemu-system-x86_64: {e}"))?;

        let console = Arc::new(Console::default());
        let log = std::fs::File::create(dir.join("console.log")).map_err(|e| e.to_string())?;
        let log = Arc::new(Mutex::new(log));
        let mut readers = Vec::new();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for (stream, prefix) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, ""),
            (Box::new(stderr) as Box<dyn std::io::Read + Send>, "[qemu] "),
        ] {
            let console = Arc::clone(&console);
            let log = Arc::clone(&log);
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n') {
                    let Ok(line) = line else { break };
                    let text = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string();
                    let _ = writeln!(log.lock().unwrap(), "{prefix}{text}");
                    console.push(format!("{prefix}{text}"), started.elapsed());
                }
            }));
        }
        Ok(RunningGuest {
            name: self.name,
            dir,
            child: Some(child),
            console,
            readers,
            host_ports,
            netns,
            relay,
            pcap,
            qmp_path,
            qmp: Mutex::new(None),
            started,
            deadline: started + self.timeout,
            _slot: slot,
        })
    }
}

/// The QMP socket of a guest whose files are in `dir`: in `dir` unless that path is too long
/// for a unix socket address (108 bytes with the terminating NUL), else in the temp dir.
fn qmp_socket_path(dir: &Path) -> PathBuf {
    let path = dir.join("qmp.sock");
    if path.as_os_str().len() < 100 {
        return path;
    }
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "zs-qmp-{}-{}.sock",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Default)]
struct Console {
    lines: Mutex<Vec<String>>,
    first_init_line: Mutex<Option<Duration>>,
    changed: Condvar,
}

impl Console {
    fn push(&self, line: String, at: Duration) {
        if line.starts_with("zs-init:") {
            self.first_init_line.lock().unwrap().get_or_insert(at);
        }
        self.lines.lock().unwrap().push(line);
        self.changed.notify_all();
    }
}

/// A booted guest.
pub struct RunningGuest {
    name: String,
    dir: PathBuf,
    child: Option<Child>,
    console: Arc<Console>,
    readers: Vec<std::thread::JoinHandle<()>>,
    host_ports: HashMap<u16, u16>,
    netns: Option<NetNs>,
    relay: Option<Relay>,
    pcap: Option<PathBuf>,
    qmp_path: PathBuf,
    /// Connected on first use.
    qmp: Mutex<Option<Qmp>>,
    started: Instant,
    deadline: Instant,
    _slot: GuestSlot,
}

impl RunningGuest {
    /// Send one QMP command, written as a JSON object (e.g.
    /// `{"execute": "query-status"}`), to the guest's QEMU and return the response line
    /// (`{"return": ...}`); an `{"error": ...}` response is an `Err` with that line.
    /// `target/hw-tests/<name>/`, where the console log and captures go.
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }

    pub fn monitor_command(&self, command: &str) -> Result<String, String> {
        let mut qmp = self.qmp.lock().unwrap();
        if qmp.is_none() {
            *qmp = Some(Qmp::connect(&self.qmp_path, Duration::from_secs(10))?);
        }
        qmp.as_mut().unwrap().execute(command)
    }

    /// Take the NIC's link down or bring it back up, as pulling and replugging the cable
    /// would: QMP `set_link` on the netdev `n0`, which QEMU applies to the NIC too (its
    /// link-status bit changes for the guest: STATUS.LU on e1000, VIRTIO_NET_S_LINK_UP on
    /// virtio-net), and frames in either direction are dropped while it is down.
    pub fn set_link(&self, up: bool) -> Result<(), String> {
        self.monitor_command(&format!(
            r#"{{"execute": "set_link", "arguments": {{"name": {}, "up": {up}}}}}"#,
            json_string("n0")
        ))
        .map(drop)
    }

    /// The impairing relay's counters, if the guest has one ([`Guest::relay`]).
    pub fn relay_stats(&self) -> Option<RelayStats> {
        self.relay.as_ref().map(Relay::stats)
    }

    /// Change the relay's impairments from now on; panics if the guest has no relay.
    pub fn set_relay(&self, config: RelayConfig) {
        self.relay
            .as_ref()
            .expect("set_relay: the guest has no relay (Guest::relay)")
            .set_config(config);
    }

    /// The 127.0.0.1 port forwarded to `guest_port`.
    pub fn host_port(&self, guest_port: u16) -> u16 {
        *self
            .host_ports
            .get(&guest_port)
            .unwrap_or_else(|| panic!("guest port {guest_port} was not forwarded"))
    }

    /// The namespace of a [`Network::Tap`] guest.
    pub fn netns(&self) -> &NetNs {
        self.netns
            .as_ref()
            .expect("guest has no TAP network namespace")
    }

    /// The last `n` console lines so far.
    pub fn console_tail(&self, n: usize) -> String {
        tail(&self.console.lines.lock().unwrap(), n)
    }

    /// Console lines from index `from` on (for following the console as it grows), and
    /// the index to continue from.
    pub fn console_lines_from(&self, from: usize) -> (Vec<String>, usize) {
        let lines = self.console.lines.lock().unwrap();
        let from = from.min(lines.len());
        (lines[from..].to_vec(), lines.len())
    }

    /// Console lines so far that contain `needle`.
    pub fn console_lines_with(&self, needle: &str) -> Vec<String> {
        self.console
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Panic with `message` and the console tail.
    #[track_caller]
    pub fn fail(&self, message: &str) -> ! {
        fail_with_console_tail(&self.name, &self.dir, message, &self.console_tail(40))
    }

    /// Wait until a console line contains `needle`; returns that line. On timeout or guest
    /// exit, panics with the console tail.
    pub fn wait_for_console(&self, needle: &str, timeout: Duration) -> String {
        let until = (Instant::now() + timeout).min(self.deadline);
        let mut lines = self.console.lines.lock().unwrap();
        let mut seen = 0;
        loop {
            if let Some(l) = lines[seen..].iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            seen = lines.len();
            if lines.iter().any(|l| l.starts_with(EXIT_MARKER)) || Instant::now() > until {
                let tail = tail(&lines, 40);
                drop(lines);
                panic!(
                    "guest {}: {needle:?} did not appear on the console\n--- console tail ---\n{tail}",
                    self.name
                );
            }
            lines = self
                .console
                .changed
                .wait_timeout(lines, Duration::from_millis(200))
                .unwrap()
                .0;
        }
    }

    /// Wait for the guest to finish (or kill it at its timeout) and collect the result.
    pub fn wait(self) -> Result<GuestRun, String> {
        self.finish(false)
    }

    /// Power the guest off now (for guests that serve until stopped) and collect the result.
    pub fn stop(self) -> Result<GuestRun, String> {
        self.finish(true)
    }

    /// [`RunningGuest::stop`] a guest that ran `zerosend serve`, failing (with the console
    /// tail) if the server panicked at any point.
    pub fn stop_server(self) -> GuestRun {
        let run = self
            .stop()
            .unwrap_or_else(|e| panic!("stopping the guest: {e}"));
        if run.console_contains("panicked") {
            run.fail("the server panicked");
        }
        run
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn finish(mut self, kill: bool) -> Result<GuestRun, String> {
        let mut child = self.child.take().unwrap();
        let mut timed_out = false;
        if kill {
            let _ = child.kill();
        }
        loop {
            if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                break;
            }
            if Instant::now() > self.deadline {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let wall = self.started.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let lines = self.console.lines.lock().unwrap().clone();
        let exit_code = lines.iter().rev().find_map(|l| {
            l.strip_prefix(EXIT_MARKER)
                .and_then(|c| c.trim().parse().ok())
        });
        let boot = *self.console.first_init_line.lock().unwrap();
        let run = GuestRun {
            name: self.name.clone(),
            dir: self.dir.clone(),
            lines,
            exit_code,
            timed_out,
            wall,
            boot,
            pcap: self.pcap.clone(),
        };
        eprintln!(
            "hw-tests: guest {} exit={:?} boot-to-init={:?} wall={:.1?}{}",
            run.name,
            run.exit_code,
            run.boot,
            run.wall,
            if timed_out { " TIMED OUT" } else { "" }
        );
        if run.exit_code == Some(0) {
            let _ = std::fs::remove_file(self.dir.join("initrd.cpio"));
        }
        Ok(run)
    }

    /// CPU time the guest's QEMU process has used so far, user plus system, in seconds
    /// (`/proc/PID/stat` fields 14 and 15, in USER_HZ = 100 ticks per second on Linux);
    /// `None` once QEMU has exited.
    pub fn qemu_cpu_seconds(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces: count after it.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state): utime is field 14, stime field 15.
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Panics with `message` about guest `name` (whose files are in `dir`), its console `tail`
/// and where the whole console log is.
#[track_caller]
fn fail_with_console_tail(name: &str, dir: &Path, message: &str, tail: &str) -> ! {
    panic!(
        "guest {name}: {message}\n--- console tail ({}) ---\n{tail}\n--- end ---",
        dir.join("console.log").display(),
    )
}

/// What a finished guest left behind.
#[derive(Debug)]
pub struct GuestRun {
    pub name: String,
    /// `target/hw-tests/<name>/`: console.log, nic.pcap, qemu-command.txt.
    pub dir: PathBuf,
    pub lines: Vec<String>,
    /// The command's exit status, `None` if the guest died or timed out before reporting.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Host wall time from QEMU start to exit.
    pub wall: Duration,
    /// Host wall time from QEMU start until the guest's `/init` printed its first line.
    pub boot: Option<Duration>,
    pub pcap: Option<PathBuf>,
}

impl GuestRun {
    /// The last `n` console lines.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.lines, n)
    }

    /// Panic with `message` and the console tail.
    #[track_caller]
    pub fn fail(&self, message: &str) -> ! {
        fail_with_console_tail(&self.name, &self.dir, message, &self.tail(40))
    }

    /// Panic with the console tail unless the command exited 0.
    #[track_caller]
    pub fn expect_success(&self) -> &Self {
        if self.exit_code != Some(0) {
            self.fail(&format!(
                "command failed: exit {:?}, timed out: {}",
                self.exit_code, self.timed_out
            ));
        }
        self
    }

    /// Panic unless the command ran and exited non-zero.
    #[track_caller]
    pub fn expect_failure(&self) -> &Self {
        match self.exit_code {
            Some(c) if c != 0 => self,
            other => self.fail(&format!("expected the command to fail, exit {other:?}")),
        }
    }

    /// The rest of the first console line that starts with `key` and a space.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').map(str::trim))
    }

    /// Like [`GuestRun::value`], but panics with the console tail when the line is missing.
    #[track_caller]
    pub fn require(&self, key: &str) -> &str {
        match self.value(key) {
            Some(v) => v,
            None => self.fail(&format!("no {key:?} line on the console")),
        }
    }

    /// Panic with the console tail unless `actual == expected`.
    #[track_caller]
    pub fn expect_eq<T: PartialEq + std::fmt::Debug>(&self, what: &str, actual: T, expected: T) {
        if actual != expected {
            self.fail(&format!("{what}: got {actual:?}, expected {expected:?}"));
        }
    }

    /// Whether any console line contains `needle`.
    pub fn console_contains(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.contains(needle))
    }

    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn pcap_path(&self) -> &Path {
        self.pcap
            .as_deref()
            .expect("guest was started without .pcap()")
    }
}

/// Limits how many guests run at once in one test process (TCG guests are CPU-bound; the
/// machines have two cores). `ZEROSEND_MAX_GUESTS` overrides the default of 2.
struct GuestSlot;

static SLOTS: Mutex<usize> = Mutex::new(0);
static SLOT_FREED: Condvar = Condvar::new();

impl GuestSlot {
    fn acquire() -> GuestSlot {
        let max = std::env::var("ZEROSEND_MAX_GUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        let mut used = SLOTS.lock().unwrap();
        while *used >= max {
            used = SLOT_FREED.wait(used).unwrap();
        }
        *used += 1;
        GuestSlot
    }
}

impl Drop for GuestSlot {
    fn drop(&mut self) {
        *SLOTS.lock().unwrap() -= 1;
        SLOT_FREED.notify_one();
    }
}

impl RunningGuest {
    /// The QEMU process's id while it runs (for its CPU time, `/proc/<pid>/stat`; with
    /// [`Network::Tap`] `ip netns exec` has exec'd QEMU, so this is QEMU itself).
    pub fn qemu_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}
