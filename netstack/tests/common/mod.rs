//! Test bed: a [`Stack`] on a [`SoftNic`], a stock smoltcp interface and TCP socket as the
//! peer, a page cache whose frames live in the NIC's DMA space, and virtual time.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use driver::dma::{DmaAccess, DmaRegion};
use driver::NetQueue;
use netstack::{ConnId, Event, Instant, Ipv4Config, Stack, StackConfig};
use pagecache::{CacheConfig, FrameArena, PageCache};
use sha2::{Digest, Sha256};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};
use softnic::{PeerDevice, SoftNic, SoftNicConfig};

pub const SERVER_PORT: u16 = 80;
pub const STACK_IP: [u8; 4] = [10, 0, 0, 1];
pub const PEER_IP: [u8; 4] = [10, 0, 0, 2];

/// Deterministic file content.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Every frame the NIC put on the wire, reduced to the server's TCP payload by stream
/// offset: the first transmission of each byte is kept, later ones are compared with it.
#[derive(Default)]
pub struct RetransmitCapture {
    iss: Option<u32>,
    first: Vec<u8>,
    seen: Vec<bool>,
    /// Bytes seen again and compared with their first transmission.
    pub compared_bytes: u64,
    /// Of those, bytes that differed.
    pub differing_bytes: u64,
    pub data_frames: u64,
}

impl RetransmitCapture {
    pub fn new(stream_len: usize) -> Self {
        Self {
            first: vec![0; stream_len],
            seen: vec![false; stream_len],
            ..Default::default()
        }
    }

    pub fn frame(&mut self, f: &[u8]) {
        let Some(t) = netstack::frame::parse_tcp(f) else {
            return;
        };
        if t.src_port != SERVER_PORT {
            return;
        }
        if t.syn {
            self.iss = Some(t.seq);
            return;
        }
        let Some(iss) = self.iss else { return };
        if t.payload_len == 0 {
            return;
        }
        self.data_frames += 1;
        let offset = t.seq.wrapping_sub(iss.wrapping_add(1)) as usize;
        for (i, &b) in f[t.header_len..].iter().enumerate() {
            let at = offset + i;
            if at >= self.first.len() {
                break; // keep-alive probes and the like
            }
            if self.seen[at] {
                self.compared_bytes += 1;
                if self.first[at] != b {
                    self.differing_bytes += 1;
                }
            } else {
                self.seen[at] = true;
                self.first[at] = b;
            }
        }
    }
}

/// The stack under test and its peer.
pub struct Bed {
    pub stack: Stack<SoftNic>,
    pub cache: PageCache,
    pub dir: tempfile::TempDir,
    /// The page cache's frames, mapped read-only for the NIC. Kept alive for the cache.
    pub frames: DmaRegion,
    pub peer_iface: Interface,
    pub peer_dev: PeerDevice,
    pub peer_sockets: SocketSet<'static>,
    pub peer_socket: SocketHandle,
    pub now: Instant,
    pub capture: Option<Arc<Mutex<RetransmitCapture>>>,
    pub iterations: u64,
    /// Run the software NIC's DMA after every stack poll (for manual-DMA NICs).
    pub auto_device_step: bool,
    /// Frames on the wire that carried placeholder poison (`netstack::poison`). Every test
    /// checks it stays 0 when its bed is dropped, unless it sets `poison_expected`.
    pub poisoned_frames: Arc<AtomicU64>,
    pub poison_expected: bool,
}

impl Drop for Bed {
    fn drop(&mut self) {
        if !std::thread::panicking() && !self.poison_expected {
            assert_eq!(
                self.poisoned_frames.load(Ordering::Relaxed),
                0,
                "placeholder bytes reached the wire"
            );
        }
    }
}

pub struct BedConfig {
    pub nic: SoftNicConfig,
    pub stack: StackConfig,
    pub cache_bytes: usize,
    pub audit: bool,
    pub peer_rx_buffer: usize,
    pub capture_stream_len: Option<usize>,
}

impl BedConfig {
    pub fn new(nic: SoftNicConfig, cache_bytes: usize) -> Self {
        Self {
            nic,
            stack: StackConfig::new(Ipv4Config::static_address(STACK_IP, 24, None)),
            cache_bytes,
            audit: false,
            peer_rx_buffer: 1 << 20,
            capture_stream_len: None,
        }
    }
}

impl Bed {
    pub fn new(config: BedConfig) -> Self {
        let (mut nic, peer) = SoftNic::new(config.nic).unwrap();
        let capture = config
            .capture_stream_len
            .map(|len| Arc::new(Mutex::new(RetransmitCapture::new(len))));
        // Every frame on the wire is scanned for placeholder poison.
        let poisoned_frames = Arc::new(AtomicU64::new(0));
        let (c, poisoned) = (capture.clone(), poisoned_frames.clone());
        nic.set_tx_tap(Some(Box::new(move |f| {
            if netstack::poison::find_poison(f).is_some() {
                poisoned.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(c) = &c {
                c.lock().unwrap().frame(f);
            }
        })));
        // The page cache's frames live in the NIC's DMA space: the IOVA of a page is what
        // the NIC reads.
        let frames = nic
            .dma()
            .allocate(config.cache_bytes, DmaAccess::DeviceReads)
            .unwrap();
        let arena = FrameArena::from_shared(frames.memory().clone()).unwrap();
        let cache = PageCache::new(
            arena,
            CacheConfig {
                audit: config.audit,
                ..CacheConfig::default()
            },
        )
        .unwrap();
        let stack = Stack::new(nic, config.stack).unwrap();

        let mut peer_dev = PeerDevice::new(peer);
        let mut iface_config = IfaceConfig::new(EthernetAddress([2, 0, 0, 0, 0, 2]).into());
        iface_config.random_seed = 7;
        let mut peer_iface = Interface::new(iface_config, &mut peer_dev, Instant::from_millis(0));
        peer_iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(
                IpAddress::from(smoltcp::wire::Ipv4Address::from(PEER_IP)),
                24,
            ))
            .unwrap();
        });
        let mut peer_sockets = SocketSet::new(Vec::new());
        let socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; config.peer_rx_buffer]),
            tcp::SocketBuffer::new(vec![0; 4096]),
        );
        let peer_socket = peer_sockets.add(socket);
        Self {
            stack,
            cache,
            dir: tempfile::tempdir().unwrap(),
            frames,
            peer_iface,
            peer_dev,
            peer_sockets,
            peer_socket,
            now: Instant::from_millis(1),
            capture,
            iterations: 0,
            auto_device_step: false,
            poisoned_frames,
            poison_expected: false,
        }
    }

    pub fn write_file(&self, name: &str, data: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        path
    }

    pub fn peer_socket(&mut self) -> &mut tcp::Socket<'static> {
        self.peer_sockets.get_mut::<tcp::Socket>(self.peer_socket)
    }

    /// Writes `data` as file `name`, opens it in the cache and accepts the peer's
    /// connection.
    pub fn open_and_connect(&mut self, name: &str, data: &[u8]) -> (pagecache::CachedFile, ConnId) {
        let path = self.write_file(name, data);
        let file = self
            .cache
            .open(&path, pagecache::OpenOptions::read_only())
            .unwrap();
        (file, self.connect())
    }

    /// [`Bed::open_and_connect`], then the whole file queued with `send_file` (the pin is
    /// dropped: the stack keeps its own).
    pub fn connect_and_send_file(&mut self, name: &str, data: &[u8]) -> ConnId {
        let (file, conn) = self.open_and_connect(name, data);
        let pin = file.pin(0..data.len() as u64).unwrap();
        self.stack
            .send_file(conn, &pin, 0..data.len() as u64)
            .unwrap();
        conn
    }

    /// Like [`Bed::connect`], for a NIC with manual DMA: the device runs during the
    /// handshake only (the client port is 40000).
    pub fn connect_with_device_running(&mut self) -> ConnId {
        self.stack.listen(SERVER_PORT).unwrap();
        self.peer_connect(40000);
        let mut conn = None;
        self.run_until(1000, |bed| {
            bed.stack.nic_mut().device_step(usize::MAX);
            conn = bed.stack.poll_events().find_map(|e| match e {
                Event::Accepted { conn, .. } => Some(conn),
                _ => None,
            });
            conn.is_some()
        });
        conn.expect("no connection accepted")
    }

    /// The peer's socket connects to the stack's port from `local_port`.
    pub fn peer_connect(&mut self, local_port: u16) {
        let remote = (
            IpAddress::from(smoltcp::wire::Ipv4Address::from(STACK_IP)),
            SERVER_PORT,
        );
        let cx = self.peer_iface.context();
        self.peer_sockets
            .get_mut::<tcp::Socket>(self.peer_socket)
            .connect(cx, remote, local_port)
            .unwrap();
    }

    /// The peer connects to the stack's listener; returns the accepted connection.
    pub fn connect(&mut self) -> ConnId {
        self.stack.listen(SERVER_PORT).unwrap();
        self.peer_connect(49152);
        for _ in 0..100_000 {
            self.step();
            while let Some(e) = self.stack.next_event() {
                if let Event::Accepted { conn, .. } = e {
                    return conn;
                }
            }
        }
        panic!("no connection accepted");
    }

    /// One round of both sides, then time advances: 1 ms when something happened, else
    /// straight to the next timer.
    pub fn step(&mut self) -> bool {
        self.iterations += 1;
        let a = self.stack.poll(self.now).unwrap();
        if self.auto_device_step {
            self.stack.nic_mut().device_step(usize::MAX);
        }
        let b = self
            .peer_iface
            .poll(self.now, &mut self.peer_dev, &mut self.peer_sockets)
            != smoltcp::iface::PollResult::None;
        let busy = a || b || self.peer_dev.peer().has_frames();
        let step = if busy {
            smoltcp::time::Duration::from_millis(1)
        } else {
            let d1 = self.stack.poll_delay(self.now);
            let d2 = self.peer_iface.poll_delay(self.now, &self.peer_sockets);
            [d1, d2]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(smoltcp::time::Duration::from_millis(10))
                .max(smoltcp::time::Duration::from_millis(1))
        };
        self.now += step;
        busy
    }

    /// Runs until the peer received `expected.len()` bytes (checked incrementally against
    /// `expected`) or a limit. Returns the received bytes' sha256 and whether they matched.
    pub fn receive_all(
        &mut self,
        expected: &[u8],
        mut between: impl FnMut(&mut Self, u64),
    ) -> Received {
        let mut hasher = Sha256::new();
        let mut received = 0usize;
        let mut mismatches = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        let mut events = Vec::new();
        let limit = Instant::from_secs(3600);
        while received < expected.len() && self.now < limit {
            self.step();
            events.extend(self.stack.poll_events());
            loop {
                let socket = self.peer_socket();
                if !socket.can_recv() {
                    break;
                }
                let n = socket.recv_slice(&mut buf).unwrap();
                let chunk = &buf[..n];
                hasher.update(chunk);
                // Bytes past `expected` (the test looks at a prefix) are not compared.
                let start = received.min(expected.len());
                let end = (received + n).min(expected.len());
                mismatches += chunk[..end - start]
                    .iter()
                    .zip(&expected[start..end])
                    .filter(|(a, b)| a != b)
                    .count() as u64;
                received += n;
            }
            between(self, received as u64);
        }
        Received {
            bytes: received as u64,
            sha256: hasher.finalize().into(),
            mismatched_bytes: mismatches,
            events,
        }
    }

    /// Polls until `done(self)` or `rounds` rounds.
    pub fn run_until(&mut self, rounds: usize, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        for _ in 0..rounds {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }
}

pub struct Received {
    pub bytes: u64,
    pub sha256: [u8; 32],
    pub mismatched_bytes: u64,
    pub events: Vec<Event>,
}
