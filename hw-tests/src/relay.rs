//! An impairing wire between the guest's NIC and the host peers: QEMU sends and receives the
//! NIC's frames as UDP datagrams (`-netdev socket,udp=...`, one Ethernet frame per datagram,
//! loopback of the test's own namespace) and this relay forwards them to and from the TAP
//! device of that namespace, where the host's Linux TCP, curl and openssl are, after applying
//! seeded loss, reordering, duplication, corruption, delay with jitter and a rate cap, each
//! per direction.
//!
//! Why this shape (and not two TAPs bridged): QEMU's side stays a plain frame socket, so the
//! relay sees every frame exactly as the emulated NIC put it on the wire (a TAP with a
//! vnet header would hand over 64 KiB TSO frames before segmentation); the host side stays
//! the same TAP and addresses every other test uses. The cost: without a vnet-header peer
//! QEMU segments TSO frames itself (e1000), virtio-net offers no TSO at all, and QEMU 7.2's
//! e1000e sends a TSO frame as IPv4 fragments of one 64 KiB datagram (its software fallback
//! fragments instead of segmenting; fixed in QEMU 8.0). A real 82574L puts TCP segments on the
//! wire (82574 datasheet 7.3.6, TCP segmentation), and one lost fragment would cost the whole
//! 64 KiB datagram, so the relay does what the hardware does: it reassembles such a datagram
//! and cuts it into MTU-sized TCP segments (sequence numbers, flags and checksums as TSO
//! writes them) before impairing each one (`resegmented_datagrams`).
//!
//! Besides impairing, the relay checks the one promise a bad wire tests: every byte the
//! guest transmits again is identical to its first transmission. It records the TCP payload
//! of each guest-to-host flow as it arrives from QEMU (before any impairment) and compares
//! each retransmitted byte with the first copy ([`DirectionStats`] `retransmitted_bytes`,
//! `differing_bytes`). Corrupted frames get one flipped bit inside the TCP segment, which the
//! receiver's TCP checksum must catch: the tests compare the relay's count with the drops
//! counted by Linux (`InCsumErrors`) and by zerosend (`rx_tcp_checksum_drops`).

use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::{NetNs, TAP_NAME};

/// The UDP ports on the namespace's loopback: QEMU's end and the relay's end.
pub const QEMU_PORT: u16 = 40001;
pub const RELAY_PORT: u16 = 40002;

/// What the wire does to the frames of one direction. Probabilities are per frame, in 0..=1.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Frames dropped.
    pub loss: f64,
    /// Frames held back by [`Impairment::reorder_delay`] so that later frames overtake them.
    pub reorder: f64,
    pub reorder_delay: Duration,
    /// Frames sent twice.
    pub duplicate: f64,
    /// Frames with one bit flipped inside the TCP segment (IPv4 TCP frames and fragments
    /// only, so the receiver's TCP checksum is what must catch it).
    pub corrupt: f64,
    /// Added to every frame; plus a uniformly random 0..jitter (frames keep their order).
    pub delay: Duration,
    pub jitter: Duration,
    /// Bits per second, or unlimited; frames wait in a queue of at most `queue_bytes`.
    pub rate_bits_per_s: Option<u64>,
    pub queue_bytes: usize,
}

impl Impairment {
    /// A perfect wire.
    pub fn none() -> Self {
        Impairment {
            reorder_delay: Duration::from_millis(3),
            queue_bytes: 4 << 20,
            ..Default::default()
        }
    }

    /// The bad network: 2% loss, 1% reordering, 1% duplication, 0.1% corruption.
    pub fn lossy() -> Self {
        Impairment {
            loss: 0.02,
            reorder: 0.01,
            duplicate: 0.01,
            corrupt: 0.001,
            ..Impairment::none()
        }
    }

    pub fn is_none(&self) -> bool {
        self.loss == 0.0
            && self.reorder == 0.0
            && self.duplicate == 0.0
            && self.corrupt == 0.0
            && self.delay.is_zero()
            && self.jitter.is_zero()
            && self.rate_bits_per_s.is_none()
    }
}

/// The relay's configuration: a seed and one impairment per direction.
#[derive(Clone, Debug, PartialEq)]
pub struct RelayConfig {
    pub seed: u64,
    /// Frames the guest sends.
    pub to_host: Impairment,
    /// Frames the host sends.
    pub to_guest: Impairment,
}

impl RelayConfig {
    /// The same impairment both ways.
    pub fn symmetric(seed: u64, impairment: Impairment) -> Self {
        RelayConfig {
            seed,
            to_host: impairment.clone(),
            to_guest: impairment,
        }
    }
}

/// Counters of one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    pub frames_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    pub lost: u64,
    pub reordered: u64,
    pub duplicated: u64,
    /// Delivered frames with a flipped bit: whole TCP segments, and IPv4 fragments (whose
    /// datagram the receiver checks only if every fragment arrives).
    pub corrupted_segments: u64,
    pub corrupted_fragments: u64,
    /// Of those, flips in the TCP header's data offset: the header no longer parses, and
    /// receivers drop it as malformed (Linux without counting it as a checksum error).
    pub corrupted_data_offset: u64,
    /// Dropped because the rate-capped queue was full, or the receiving socket refused.
    pub queue_drops: u64,
    pub send_errors: u64,
    /// IPv4-fragmented TCP datagrams (QEMU 7.2's e1000e TSO) cut into segments, and the
    /// segments made of them.
    pub resegmented_datagrams: u64,
    pub segments_made: u64,
}

/// Counters of the retransmission check (guest-to-host TCP payload).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetransmitStats {
    pub flows: u64,
    pub segments: u64,
    pub payload_bytes: u64,
    /// Segments carrying bytes already seen, and those bytes.
    pub retransmitted_segments: u64,
    pub retransmitted_bytes: u64,
    /// Retransmitted bytes that differ from their first transmission (must stay 0).
    pub differing_bytes: u64,
    /// The first difference, described.
    pub first_difference: Option<String>,
    /// Payload of flows whose start (SYN) the relay did not see (or whose record it had to
    /// drop to bound its memory: `evicted_open_flows`), or beyond the tracked size.
    pub untracked_bytes: u64,
    pub untracked_out_of_range_bytes: u64,
    pub evicted_open_flows: u64,
    /// Fragmented datagrams reassembled, and those never completed (a fragment was lost
    /// on the way from QEMU: cannot happen on loopback unless a buffer overflowed).
    pub reassembled: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub to_host: DirectionStats,
    pub to_guest: DirectionStats,
    pub retransmit: RetransmitStats,
}

/// A running relay; stops (and closes its sockets) when dropped.
pub struct Relay {
    stats: Arc<Mutex<RelayStats>>,
    /// A new configuration for the forwarder to take up.
    update: Arc<Mutex<Option<RelayConfig>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Open the namespace's TAP and the UDP socket QEMU will talk to, and start forwarding.
    /// Returns once both are open (QEMU may start then).
    pub fn start(netns: &NetNs, config: RelayConfig) -> Result<Relay, String> {
        let stats = Arc::new(Mutex::new(RelayStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let update = Arc::new(Mutex::new(None));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stats = Arc::clone(&stats);
            let stop = Arc::clone(&stop);
            let update = Arc::clone(&update);
            netns.spawn(move || {
                let opened = open_tap(TAP_NAME).and_then(|tap| Ok((tap, open_udp()?)));
                match opened {
                    Ok((tap, udp)) => {
                        let _ = ready_tx.send(Ok(()));
                        Forwarder::new(tap, udp, config, stats).run(&stop, &update);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the relay did not start".to_string())?
            .map_err(|e| format!("starting the relay: {e}"))?;
        Ok(Relay {
            stats,
            update,
            stop,
            thread: Some(thread),
        })
    }

    /// The `-netdev` argument QEMU needs to talk to the relay.
    pub fn netdev_arg(id: &str) -> String {
        format!("socket,id={id},udp=127.0.0.1:{RELAY_PORT},localaddr=127.0.0.1:{QEMU_PORT}")
    }

    /// Change the impairments from now on (frames already queued keep their fate); the
    /// counters go on counting.
    pub fn set_config(&self, config: RelayConfig) {
        *self.update.lock().unwrap() = Some(config);
    }

    pub fn stats(&self) -> RelayStats {
        self.stats.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_tap(name: &str) -> Result<OwnedFd, String> {
    // SAFETY: open(2) with a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!(
            "opening /dev/net/tun: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    let tap = unsafe { OwnedFd::from_raw_fd(fd) };
    /// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (a short) in the union.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may write) a struct ifreq; `req` is one, laid out as the
    // kernel's (16-byte name, then the union, 40 bytes in all), and lives across the call.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(format!(
            "attaching to TAP {name}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(tap)
}

fn open_udp() -> Result<UdpSocket, String> {
    let udp = UdpSocket::bind(("127.0.0.1", RELAY_PORT))
        .map_err(|e| format!("binding UDP 127.0.0.1:{RELAY_PORT}: {e}"))?;
    udp.connect(("127.0.0.1", QEMU_PORT))
        .map_err(|e| format!("connecting UDP to 127.0.0.1:{QEMU_PORT}: {e}"))?;
    udp.set_nonblocking(true).map_err(|e| e.to_string())?;
    // Bursts of a TCG guest's frames must not overflow the receive buffer: that would be
    // loss nobody configured. FORCE: the caller is root, the sysctl limit does not apply.
    let size: libc::c_int = 16 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt with a pointer to a c_int and its size; the socket is open.
        unsafe {
            libc::setsockopt(
                udp.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Ok(udp)
}

/// SplitMix64: seeded, reproducible, good enough for choosing which frames to impair.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    ToHost,
    ToGuest,
}

/// A frame waiting for its release time (ordered by time, then arrival).
struct Pending {
    at: Instant,
    order: u64,
    dir: Dir,
    frame: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: the earliest frame must compare greatest.
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}

struct Lane {
    impairment: Impairment,
    rng: Rng,
    /// When the previous in-order frame leaves (keeps order under jitter) and when the
    /// rate-capped line is free again.
    last_release: Instant,
    line_free: Instant,
    queued_bytes: usize,
}

impl Lane {
    fn reconfigure(&mut self, impairment: Impairment, seed: u64) {
        self.impairment = impairment;
        self.rng = Rng(seed);
    }
}

struct Forwarder {
    tap: OwnedFd,
    udp: UdpSocket,
    lanes: [Lane; 2],
    queue: BinaryHeap<Pending>,
    order: u64,
    stats: Arc<Mutex<RelayStats>>,
    tracker: RetransmitTracker,
    resegmenter: Resegmenter,
}

const MAX_FRAME: usize = 65536;

impl Forwarder {
    fn new(
        tap: OwnedFd,
        udp: UdpSocket,
        config: RelayConfig,
        stats: Arc<Mutex<RelayStats>>,
    ) -> Self {
        let now = Instant::now();
        let lane = |impairment: Impairment, seed: u64| Lane {
            impairment,
            rng: Rng(seed),
            last_release: now,
            line_free: now,
            queued_bytes: 0,
        };
        Forwarder {
            tap,
            udp,
            lanes: [
                lane(config.to_host, config.seed ^ 0x5A5A_0001),
                lane(config.to_guest, config.seed ^ 0xA5A5_0002),
            ],
            queue: BinaryHeap::new(),
            order: 0,
            stats,
            tracker: RetransmitTracker::default(),
            resegmenter: Resegmenter::default(),
        }
    }

    fn run(mut self, stop: &AtomicBool, update: &Mutex<Option<RelayConfig>>) {
        let mut buf = vec![0u8; MAX_FRAME];
        while !stop.load(Ordering::Relaxed) {
            if let Some(config) = update.lock().unwrap().take() {
                self.lanes[Dir::ToHost as usize]
                    .reconfigure(config.to_host, config.seed ^ 0x5A5A_0001);
                self.lanes[Dir::ToGuest as usize]
                    .reconfigure(config.to_guest, config.seed ^ 0xA5A5_0002);
            }
            let now = Instant::now();
            let timeout_ms = match self.queue.peek() {
                Some(p) if p.at <= now => 0,
                Some(p) => (p.at - now).as_millis().clamp(1, 20) as i32,
                None => 20,
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.tap.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.udp.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll on two pollfds of open descriptors, with their count.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            // Drain both sides (bounded per round so one side cannot starve the other).
            for _ in 0..256 {
                let mut any = false;
                if let Some(n) = read_fd(self.tap.as_raw_fd(), &mut buf) {
                    self.ingress(Dir::ToGuest, &buf[..n]);
                    any = true;
                }
                if let Ok(n) = self.udp.recv(&mut buf) {
                    match self.resegmenter.take(&buf[..n]) {
                        Taken::Frame => {
                            self.tracker.observe(&buf[..n], &self.stats);
                            self.ingress(Dir::ToHost, &buf[..n]);
                        }
                        Taken::Held => {}
                        Taken::Segments(segments) => {
                            {
                                let mut stats = self.stats.lock().unwrap();
                                stats.to_host.resegmented_datagrams += 1;
                                stats.to_host.segments_made += segments.len() as u64;
                            }
                            for segment in &segments {
                                self.tracker.observe(segment, &self.stats);
                                self.ingress(Dir::ToHost, segment);
                            }
                        }
                    }
                    any = true;
                }
                if !any {
                    break;
                }
            }
            self.release(Instant::now());
        }
    }

    fn ingress(&mut self, dir: Dir, frame: &[u8]) {
        let now = Instant::now();
        let lane = &mut self.lanes[dir as usize];
        let mut stats = self.stats.lock().unwrap();
        let s = match dir {
            Dir::ToHost => &mut stats.to_host,
            Dir::ToGuest => &mut stats.to_guest,
        };
        s.frames_in += 1;
        s.bytes_in += frame.len() as u64;
        let imp = &lane.impairment;
        if lane.rng.chance(imp.loss) {
            s.lost += 1;
            return;
        }
        let copies = if lane.rng.chance(imp.duplicate) {
            s.duplicated += 1;
            2
        } else {
            1
        };
        for copy in 0..copies {
            if lane.queued_bytes + frame.len() > imp.queue_bytes {
                s.queue_drops += 1;
                continue;
            }
            let mut frame = frame.to_vec();
            // Only one copy of a duplicated frame is corrupted: the other is the test
            // that a good copy still gets through.
            if copy == 0 && lane.rng.chance(imp.corrupt) {
                match flip_tcp_bit(&mut frame, &mut lane.rng) {
                    Some(Flip { fragment: true, .. }) => s.corrupted_fragments += 1,
                    Some(Flip { data_offset, .. }) => {
                        s.corrupted_segments += 1;
                        s.corrupted_data_offset += u64::from(data_offset);
                    }
                    None => {}
                }
            }
            let jitter = if imp.jitter.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_nanos(lane.rng.below(imp.jitter.as_nanos() as u64))
            };
            let mut at = (now + imp.delay + jitter).max(lane.last_release);
            if let Some(rate) = imp.rate_bits_per_s {
                at = at.max(lane.line_free);
                lane.line_free =
                    at + Duration::from_nanos(frame.len() as u64 * 8 * 1_000_000_000 / rate.max(1));
            }
            lane.last_release = at;
            if lane.rng.chance(imp.reorder) {
                s.reordered += 1;
                at += imp.reorder_delay;
            }
            lane.queued_bytes += frame.len();
            self.order += 1;
            self.queue.push(Pending {
                at,
                order: self.order,
                dir,
                frame,
            });
        }
    }

    fn release(&mut self, now: Instant) {
        while self.queue.peek().is_some_and(|p| p.at <= now) {
            let p = self.queue.pop().unwrap();
            self.lanes[p.dir as usize].queued_bytes -= p.frame.len();
            let sent = match p.dir {
                Dir::ToGuest => self.udp.send(&p.frame).map(drop),
                Dir::ToHost => write_fd(self.tap.as_raw_fd(), &p.frame),
            };
            let mut stats = self.stats.lock().unwrap();
            let s = match p.dir {
                Dir::ToHost => &mut stats.to_host,
                Dir::ToGuest => &mut stats.to_guest,
            };
            match sent {
                Ok(()) => {
                    s.frames_out += 1;
                    s.bytes_out += p.frame.len() as u64;
                }
                Err(_) => s.send_errors += 1,
            }
        }
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: read into a live buffer of the given length from an open descriptor.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    (n > 0).then_some(n as usize)
}

fn write_fd(fd: RawFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: write a live buffer of the given length to an open descriptor.
    let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An IPv4 frame's parts: header length, protocol, whether it is a fragment (and which).
struct Ipv4<'a> {
    header: &'a [u8],
    payload: &'a [u8],
    protocol: u8,
    id: u16,
    /// Fragment offset in bytes, and the more-fragments flag.
    frag_offset: usize,
    more: bool,
}

fn parse_ipv4(frame: &[u8]) -> Option<Ipv4<'_>> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    Some(Ipv4 {
        header: &ip[..ihl],
        payload: &ip[ihl..total],
        protocol: ip[9],
        id: u16::from_be_bytes([ip[4], ip[5]]),
        frag_offset: usize::from(frag & 0x1fff) * 8,
        more: frag & 0x2000 != 0,
    })
}

/// Where [`flip_tcp_bit`] flipped a bit.
#[derive(Debug, PartialEq, Eq)]
struct Flip {
    /// In an IPv4 fragment (whose TCP header, if any, the relay does not look at).
    fragment: bool,
    /// In the data-offset field of a whole segment's TCP header.
    data_offset: bool,
}

/// Flip one random bit of the TCP segment (header or payload) in an IPv4 TCP frame or
/// fragment; where, if a bit was flipped.
fn flip_tcp_bit(frame: &mut [u8], rng: &mut Rng) -> Option<Flip> {
    let (start, len, fragment) = {
        let ip = parse_ipv4(frame)?;
        if ip.protocol != 6 || ip.payload.is_empty() {
            return None;
        }
        (
            14 + ip.header.len(),
            ip.payload.len(),
            ip.more || ip.frag_offset != 0,
        )
    };
    let bit = rng.below(len as u64 * 8) as usize;
    frame[start + bit / 8] ^= 1 << (bit % 8);
    Some(Flip {
        fragment,
        // Byte 12 of the TCP header holds the data offset in its high nibble.
        data_offset: !fragment && bit / 8 == 12 && bit % 8 >= 4,
    })
}

/// An IPv4 datagram's identity: source address and IP id.
type DatagramKey = (u32, u16);
/// One fragment: offset in the datagram's payload, its bytes, the more-fragments flag.
type Fragment = (usize, Vec<u8>, bool);

/// What [`Resegmenter::take`] did with a frame from the guest.
enum Taken {
    /// Not a TCP fragment: forward it as it is.
    Frame,
    /// A fragment of a datagram not yet complete.
    Held,
    /// The last missing fragment: the datagram as TCP segments.
    Segments(Vec<Vec<u8>>),
}

/// Turns IPv4-fragmented TCP datagrams back into the TCP segments a TSO engine would send.
#[derive(Default)]
struct Resegmenter {
    /// By (source address, IP id): the first fragment's Ethernet and IP headers once seen,
    /// and the fragments (offset, payload, more-fragments).
    partial: HashMap<DatagramKey, (Option<Vec<u8>>, Vec<Fragment>)>,
}

/// The IP MTU the segments are cut for (the guest's and the TAP's).
const MTU: usize = 1500;

impl Taken {
    #[cfg(test)]
    fn is_frame(&self) -> bool {
        matches!(self, Taken::Frame)
    }
}

impl Resegmenter {
    fn take(&mut self, frame: &[u8]) -> Taken {
        let Some(ip) = parse_ipv4(frame) else {
            return Taken::Frame;
        };
        if ip.protocol != 6 || !(ip.more || ip.frag_offset != 0) {
            return Taken::Frame;
        }
        let src = u32::from_be_bytes(ip.header[12..16].try_into().unwrap());
        let key = (src, ip.id);
        let entry = self.partial.entry(key).or_default();
        if ip.frag_offset == 0 {
            entry.0 = Some(frame[..14 + ip.header.len()].to_vec());
        }
        entry.1.push((ip.frag_offset, ip.payload.to_vec(), ip.more));
        let Some(headers) = entry.0.clone() else {
            return Taken::Held;
        };
        let Some(datagram) = reassemble(&mut entry.1) else {
            return Taken::Held;
        };
        self.partial.remove(&key);
        // Ids wrap; a datagram whose fragments never all came must not pile up.
        if self.partial.len() > 256 {
            self.partial.clear();
        }
        match segment_tcp(&headers, &datagram) {
            Some(segments) => Taken::Segments(segments),
            None => Taken::Held, // not a valid TCP segment: dropped, as a receiver would
        }
    }
}

/// Cut the TCP segment `tcp` (header and payload) whose frame began with `headers`
/// (Ethernet and IPv4) into frames of at most [`MTU`] IP bytes, as TSO does (82574 datasheet
/// 7.3.6.2): each gets the IP header with its total length, the next IP id and a fresh
/// checksum, and the TCP header with its sequence number advanced, FIN and PSH only on the
/// last, and a fresh checksum.
fn segment_tcp(headers: &[u8], tcp: &[u8]) -> Option<Vec<Vec<u8>>> {
    let ihl = headers.len().checked_sub(14)?;
    if tcp.len() < 20 {
        return None;
    }
    let thl = usize::from(tcp[12] >> 4) * 4;
    if thl < 20 || thl > tcp.len() {
        return None;
    }
    let (tcp_header, payload) = tcp.split_at(thl);
    let per_segment = MTU.checked_sub(ihl + thl)?;
    let seq = u32::from_be_bytes(tcp_header[4..8].try_into().unwrap());
    let id = u16::from_be_bytes([headers[18], headers[19]]);
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![payload]
    } else {
        payload.chunks(per_segment).collect()
    };
    let last = chunks.len() - 1;
    let mut offset = 0usize;
    let mut frames = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.into_iter().enumerate() {
        let mut f = Vec::with_capacity(headers.len() + thl + chunk.len());
        f.extend_from_slice(headers);
        f.extend_from_slice(tcp_header);
        f.extend_from_slice(chunk);
        let ip = &mut f[14..];
        ip[2..4].copy_from_slice(&((ihl + thl + chunk.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF, no fragment
        ip[10..12].copy_from_slice(&[0, 0]);
        let sum = inet_checksum::checksum(&ip[..ihl]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let src: [u8; 4] = ip[12..16].try_into().unwrap();
        let dst: [u8; 4] = ip[16..20].try_into().unwrap();
        let t = &mut ip[ihl..];
        t[4..8].copy_from_slice(&seq.wrapping_add(offset as u32).to_be_bytes());
        if i != last {
            t[13] &= !(0x01 | 0x08); // FIN, PSH
        }
        t[16..18].copy_from_slice(&[0, 0]);
        let sum = tcp_checksum(src, dst, t);
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        offset += chunk.len();
        frames.push(f);
    }
    Some(frames)
}

/// The TCP checksum (RFC 9293 3.1) of `segment` between IPv4 `src` and `dst`, with the
/// checksum field counted as it stands (0 to compute it; a valid segment gives 0).
fn tcp_checksum(src: [u8; 4], dst: [u8; 4], segment: &[u8]) -> u16 {
    let pseudo = inet_checksum::ipv4_pseudo_header(src, dst, 6, segment.len() as u32);
    !inet_checksum::fold(inet_checksum::sum_be(segment) + u64::from(pseudo))
}

/// Payload bytes of one guest-to-host TCP flow, by offset from the first sequence number.
struct Flow {
    isn: u32,
    bytes: Vec<u8>,
    seen: Vec<u64>,
    last_active: u64,
    /// A FIN or RST went by: evicted before open flows.
    closed: bool,
}

/// The most payload tracked per flow (the tests' largest download plus headers).
const MAX_TRACKED: usize = 64 << 20;
/// Flows tracked at once; closed ones go first, then the least recently active.
const MAX_FLOWS: usize = 64;

#[derive(Default)]
struct RetransmitTracker {
    flows: HashMap<(u16, u16), Flow>,
    fragments: HashMap<DatagramKey, Vec<Fragment>>,
    tick: u64,
}

impl RetransmitTracker {
    /// Look at a frame the guest sent (before any impairment).
    fn observe(&mut self, frame: &[u8], stats: &Mutex<RelayStats>) {
        let Some(ip) = parse_ipv4(frame) else { return };
        if ip.protocol != 6 {
            return;
        }
        if ip.more || ip.frag_offset != 0 {
            let src = u32::from_be_bytes(ip.header[12..16].try_into().unwrap());
            let parts = self.fragments.entry((src, ip.id)).or_default();
            parts.push((ip.frag_offset, ip.payload.to_vec(), ip.more));
            if let Some(datagram) = reassemble(parts) {
                self.fragments.remove(&(src, ip.id));
                stats.lock().unwrap().retransmit.reassembled += 1;
                self.segment(&datagram, stats);
            }
            // Ids are reused after 65536 datagrams: forget stale partial ones.
            if self.fragments.len() > 1024 {
                self.fragments.clear();
            }
            return;
        }
        let segment = ip.payload.to_vec();
        self.segment(&segment, stats);
    }

    fn segment(&mut self, tcp: &[u8], stats: &Mutex<RelayStats>) {
        if tcp.len() < 20 {
            return;
        }
        let key = (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        );
        let seq = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
        let data_offset = usize::from(tcp[12] >> 4) * 4;
        let syn = tcp[13] & 0x02 != 0;
        let fin_or_rst = tcp[13] & 0x05 != 0;
        if data_offset < 20 || data_offset > tcp.len() {
            return;
        }
        let payload = &tcp[data_offset..];
        self.tick += 1;
        let mut stats = stats.lock().unwrap();
        let r = &mut stats.retransmit;
        if syn {
            let fresh = self
                .flows
                .get(&key)
                .is_none_or(|f| f.isn != seq.wrapping_add(1));
            if fresh {
                if self.flows.len() >= MAX_FLOWS {
                    let (&oldest, flow) = self
                        .flows
                        .iter()
                        .min_by_key(|(_, f)| (!f.closed, f.last_active))
                        .unwrap();
                    if !flow.closed {
                        r.evicted_open_flows += 1;
                    }
                    self.flows.remove(&oldest);
                }
                r.flows += 1;
                self.flows.insert(
                    key,
                    Flow {
                        isn: seq.wrapping_add(1),
                        bytes: Vec::new(),
                        seen: Vec::new(),
                        last_active: self.tick,
                        closed: false,
                    },
                );
            }
        }
        if fin_or_rst {
            if let Some(flow) = self.flows.get_mut(&key) {
                flow.closed = true;
            }
        }
        if payload.is_empty() {
            return;
        }
        r.segments += 1;
        r.payload_bytes += payload.len() as u64;
        let Some(flow) = self.flows.get_mut(&key) else {
            r.untracked_bytes += payload.len() as u64;
            return;
        };
        flow.last_active = self.tick;
        let start = seq.wrapping_sub(flow.isn) as usize;
        let end = start + payload.len();
        if end > MAX_TRACKED {
            r.untracked_bytes += payload.len() as u64;
            r.untracked_out_of_range_bytes += payload.len() as u64;
            return;
        }
        if flow.bytes.len() < end {
            flow.bytes.resize(end, 0);
            flow.seen.resize(end.div_ceil(64), 0);
        }
        let mut retransmitted = 0u64;
        for (i, &b) in payload.iter().enumerate() {
            let at = start + i;
            let (word, bit) = (at / 64, 1u64 << (at % 64));
            if flow.seen[word] & bit != 0 {
                retransmitted += 1;
                if flow.bytes[at] != b {
                    r.differing_bytes += 1;
                    r.first_difference.get_or_insert_with(|| {
                        format!(
                            "flow {}->{}: byte {at} was {:#04x}, retransmitted as {b:#04x}",
                            key.0, key.1, flow.bytes[at]
                        )
                    });
                }
            } else {
                flow.seen[word] |= bit;
                flow.bytes[at] = b;
            }
        }
        if retransmitted > 0 {
            r.retransmitted_segments += 1;
            r.retransmitted_bytes += retransmitted;
        }
    }
}

/// The datagram's payload if `parts` cover it from 0 to the last fragment without gaps.
fn reassemble(parts: &mut [Fragment]) -> Option<Vec<u8>> {
    parts.sort_by_key(|p| p.0);
    let last = parts.iter().find(|p| !p.2)?;
    let total = last.0 + last.1.len();
    let mut covered = 0;
    for (offset, bytes, _) in parts.iter() {
        if *offset > covered {
            return None;
        }
        covered = covered.max(offset + bytes.len());
    }
    if covered < total {
        return None;
    }
    let mut out = vec![0u8; total];
    for (offset, bytes, _) in parts.iter() {
        let end = (offset + bytes.len()).min(total);
        out[*offset..end].copy_from_slice(&bytes[..end - offset]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_frame(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let total = 20 + 20 + payload.len();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 99, 0, 2, 10, 99, 0, 1,
        ];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&80u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f
    }

    fn observe(t: &mut RetransmitTracker, frames: &[Vec<u8>]) -> RetransmitStats {
        let stats = Mutex::new(RelayStats::default());
        for f in frames {
            t.observe(f, &stats);
        }
        stats.into_inner().unwrap().retransmit
    }

    #[test]
    fn identical_retransmissions_are_counted_and_changed_ones_caught() {
        let isn = u32::MAX - 2; // the sequence space wraps inside the flow
        let syn = tcp_frame(isn, 0x12, b"");
        let a = tcp_frame(isn.wrapping_add(1), 0x10, b"hello world");
        let again = tcp_frame(isn.wrapping_add(7), 0x10, b"world!");
        let r = observe(
            &mut RetransmitTracker::default(),
            &[syn.clone(), a.clone(), again],
        );
        assert_eq!((r.flows, r.segments, r.retransmitted_bytes), (1, 2, 5));
        assert_eq!(r.differing_bytes, 0);
        let changed = tcp_frame(isn.wrapping_add(7), 0x10, b"W0rld");
        let r = observe(&mut RetransmitTracker::default(), &[syn, a, changed]);
        assert_eq!(r.differing_bytes, 2, "{r:?}");
        assert!(r.first_difference.unwrap().contains("byte 6"));
    }

    #[test]
    fn fragments_are_reassembled_before_the_check() {
        let syn = tcp_frame(1000, 0x12, b"");
        let whole = tcp_frame(1001, 0x10, &[7u8; 64]);
        // Split the datagram's payload (TCP header + 64 bytes = 84) at 48 bytes.
        let ip_payload = &whole[34..];
        let frag = |offset: usize, part: &[u8], more: bool| {
            let mut f = whole[..34].to_vec();
            f[16..18].copy_from_slice(&((20 + part.len()) as u16).to_be_bytes());
            let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            f[20..22].copy_from_slice(&field.to_be_bytes());
            f.extend_from_slice(part);
            f
        };
        let first = frag(0, &ip_payload[..48], true);
        let second = frag(48, &ip_payload[48..], false);
        let again = tcp_frame(1001, 0x10, &[7u8; 64]);
        let r = observe(
            &mut RetransmitTracker::default(),
            &[syn, second, first, again],
        );
        assert_eq!(r.reassembled, 1);
        assert_eq!(
            (r.segments, r.retransmitted_bytes, r.differing_bytes),
            (2, 64, 0)
        );
    }

    #[test]
    fn a_fragmented_tso_datagram_becomes_tcp_segments() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let mut whole = tcp_frame(1_000_000, 0x18 | 0x01, &payload); // PSH FIN
                                                                     // A valid checksum on the original, as the guest's offload would write.
        let src: [u8; 4] = whole[26..30].try_into().unwrap();
        let dst: [u8; 4] = whole[30..34].try_into().unwrap();
        let sum = tcp_checksum(src, dst, &whole[34..]);
        whole[50..52].copy_from_slice(&sum.to_be_bytes());
        // QEMU 7.2's e1000e: IP fragments of 1480 payload bytes, same id.
        let ip_payload = whole[34..].to_vec();
        let mut resegmenter = Resegmenter::default();
        let mut out = None;
        let parts: Vec<_> = ip_payload.chunks(1480).enumerate().collect();
        for (i, part) in parts.iter().rev() {
            let mut f = whole[..34].to_vec();
            f[16..18].copy_from_slice(&((20 + part.len()) as u16).to_be_bytes());
            let more = *i != parts.len() - 1;
            let field = ((i * 1480) / 8) as u16 | if more { 0x2000 } else { 0 };
            f[20..22].copy_from_slice(&field.to_be_bytes());
            f.extend_from_slice(part);
            match resegmenter.take(&f) {
                Taken::Segments(s) => out = Some(s),
                Taken::Held => {}
                Taken::Frame => panic!("a fragment passed through"),
            }
        }
        let segments = out.expect("the datagram completed");
        assert_eq!(segments.len(), 5000usize.div_ceil(1460));
        let mut joined = Vec::new();
        for (i, f) in segments.iter().enumerate() {
            assert!(f.len() <= 14 + MTU);
            let ip = parse_ipv4(f).unwrap();
            assert!(!ip.more && ip.frag_offset == 0);
            assert_eq!(
                inet_checksum::checksum(ip.header),
                0,
                "IP checksum of segment {i}"
            );
            assert_eq!(tcp_checksum(src, dst, ip.payload), 0, "TCP checksum {i}");
            let seq = u32::from_be_bytes(ip.payload[4..8].try_into().unwrap());
            assert_eq!(seq as usize, 1_000_000 + joined.len());
            let fin_psh = ip.payload[13] & 0x09;
            assert_eq!(fin_psh, if i == segments.len() - 1 { 0x09 } else { 0 });
            joined.extend_from_slice(&ip.payload[20..]);
        }
        assert_eq!(joined, payload);
        assert!(resegmenter.take(&tcp_frame(5, 0x10, b"x")).is_frame());
    }

    #[test]
    fn a_flipped_bit_lands_inside_the_tcp_segment() {
        let mut rng = Rng(7);
        for _ in 0..200 {
            let orig = tcp_frame(5, 0x10, b"payload bytes");
            let mut f = orig.clone();
            let flip = flip_tcp_bit(&mut f, &mut rng).unwrap();
            assert!(!flip.fragment);
            let diff: Vec<usize> = (0..f.len()).filter(|&i| f[i] != orig[i]).collect();
            assert_eq!(diff.len(), 1);
            assert!(diff[0] >= 34, "flipped byte {} outside TCP", diff[0]);
            assert_eq!((f[diff[0]] ^ orig[diff[0]]).count_ones(), 1);
            let in_offset = diff[0] == 34 + 12 && (f[diff[0]] ^ orig[diff[0]]) >= 0x10;
            assert_eq!(flip.data_offset, in_offset);
        }
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(flip_tcp_bit(&mut arp, &mut rng), None);
    }

    #[test]
    fn the_seeded_choices_match_the_probabilities() {
        let mut rng = Rng(42);
        let hits = (0..100_000).filter(|_| rng.chance(0.02)).count();
        assert!((1700..2300).contains(&hits), "{hits}");
        assert!(!Rng(1).chance(0.0));
    }
}
