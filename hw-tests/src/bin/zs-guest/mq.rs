//! `zs-guest mq-syn`: a multi-queue NIC's queue pairs, each on its own thread, answer TCP
//! SYNs to one port with RSTs from the queue the SYN arrived on.
//!
//! This checks a multi-queue driver end to end without a TCP stack: receive-side scaling
//! spreads the host's connection attempts over the queues, every queue's RX and TX work from
//! its own thread, and the host sees each attempt refused. Queue 0 also answers ARP (frames
//! without a hash arrive there). Every SYN's Toeplitz hash under [`RSS_KEY`] is computed in
//! software; the low bits index the device's indirection table, so a device that steers by
//! that hash never puts two SYNs whose hashes share those bits on different queues
//! (`conflicts`, counted over the low 7 bits: both drivers use a table of 128 or fewer
//! entries, a power of two).
//!
//! With `--pause-queue I --pause-ms M` queue I's thread receives nothing for its first M ms,
//! so (with a small `--rx-ring`) its ring runs dry while SYNs for it keep coming: the
//! device must then still deliver every later frame (see `driver::virtio::multiqueue`, "A
//! receive queue that ran dry").
//!
//! Prints `MQ_QUEUES n=N`, `MQ_READY`, then one `MQ_QUEUE index=I syns=S rsts=R arps=A
//! rx_frames=F tx_frames=T` per queue and `MQ_STEERING conflicts=C`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use driver::anynic::NicConfig;
use driver::dma::DmaAccess;
use driver::multiqueue::{ipv4_tcp_hash_input, open_nic_queues, toeplitz_hash, QueuePair, RSS_KEY};
use driver::{TxFrame, TxOffload, TxSegment, TxToken};

#[derive(Args, Debug)]
pub struct MqSynArgs {
    /// Queue pairs to open.
    #[arg(long, default_value_t = 2)]
    queues: usize,
    /// Our IPv4 address.
    #[arg(long)]
    ip: String,
    /// The port whose SYNs are answered.
    #[arg(long, default_value_t = 7)]
    port: u16,
    /// Stop after this many SYNs (over all queues), then wait a second for stragglers.
    #[arg(long)]
    syns: u64,
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Receive descriptors per queue (small: a paused queue runs dry sooner).
    #[arg(long, default_value_t = 256)]
    rx_ring: u16,
    /// This queue's thread receives nothing for the first `--pause-ms` (its ring runs dry).
    #[arg(long)]
    pause_queue: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// Turn off the virtio-net driver's "a ring that ran dry notifies every receive queue"
    /// (`NicConfig::virtio_rx_notify_all`), to show the stall it prevents.
    #[arg(long)]
    no_rx_notify_all: bool,
}

/// What one queue's thread saw.
#[derive(Default)]
struct QueueCounts {
    syns: u64,
    rsts: u64,
    arps: u64,
}

/// Which queue each value of a hash's low 7 bits went to, and disagreements.
struct Steering {
    queue_of: [Option<usize>; 128],
    conflicts: u64,
}

pub fn run(args: MqSynArgs) -> Result<()> {
    let ip: std::net::Ipv4Addr = args.ip.parse().context("--ip wants an IPv4 address")?;
    let ip = ip.octets();
    let (address, model) = super::find_nic(None)?;
    println!("NIC {address} {model}");
    let config = NicConfig {
        rx_ring_size: args.rx_ring,
        virtio_rx_notify_all: !args.no_rx_notify_all,
        ..NicConfig::default()
    };
    let queues = open_nic_queues(&address, &config, args.queues)
        .with_context(|| format!("opening {address} with {} queue pairs", args.queues))?;
    println!("MQ_QUEUES n={}", queues.len());
    let total_syns = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let steering = Arc::new(Mutex::new(Steering {
        queue_of: [None; 128],
        conflicts: 0,
    }));
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut threads = Vec::new();
    for queue in queues {
        let total_syns = Arc::clone(&total_syns);
        let stop = Arc::clone(&stop);
        let steering = Arc::clone(&steering);
        let port = args.port;
        let pause_until = (args.pause_queue == Some(queue.queue_index()))
            .then(|| Instant::now() + Duration::from_millis(args.pause_ms));
        threads.push(std::thread::spawn(move || {
            serve_queue(
                queue,
                ip,
                port,
                (&total_syns, &stop, &steering),
                deadline,
                pause_until,
            )
        }));
    }
    println!("MQ_READY");
    let mut reached_at = None;
    while Instant::now() < deadline {
        if total_syns.load(Ordering::Relaxed) >= args.syns {
            let at = *reached_at.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let (index, counts, stats) = thread.join().expect("queue thread panicked")?;
        println!(
            "MQ_QUEUE index={index} syns={} rsts={} arps={} rx_frames={} tx_frames={}",
            counts.syns, counts.rsts, counts.arps, stats.rx_frames, stats.tx_frames
        );
    }
    println!(
        "MQ_STEERING conflicts={}",
        steering.lock().unwrap().conflicts
    );
    if total_syns.load(Ordering::Relaxed) < args.syns {
        bail!(
            "only {} of {} SYNs arrived before the timeout",
            total_syns.load(Ordering::Relaxed),
            args.syns
        );
    }
    Ok(())
}

type QueueResult = Result<(usize, QueueCounts, driver::DeviceStats)>;

fn serve_queue(
    mut queue: Box<dyn QueuePair>,
    ip: [u8; 4],
    port: u16,
    (total_syns, stop, steering): (&AtomicU64, &AtomicBool, &Mutex<Steering>),
    deadline: Instant,
    pause_until: Option<Instant>,
) -> QueueResult {
    let index = queue.queue_index();
    let mac = queue.mac_address().0;
    // One device-readable buffer per TX slot we may have in flight.
    const SLOTS: usize = 64;
    let region = queue.dma().allocate(SLOTS * 128, DmaAccess::DeviceReads)?;
    let mut free: Vec<usize> = (0..SLOTS).collect();
    let mut counts = QueueCounts::default();
    let mut replies: Vec<Vec<u8>> = Vec::new();
    let offload = TxOffload::default();
    if let Some(until) = pause_until {
        println!("MQ_PAUSED index={index}");
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        println!("MQ_RESUMED index={index}");
    }
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        queue.tx_reap(&mut |token| free.push(token as usize))?;
        queue.rx_poll(64, &mut |frame| {
            if let Some(reply) = arp_reply(frame, mac, ip) {
                counts.arps += 1;
                replies.push(reply);
            } else if let Some((reply, hash)) = syn_reset(frame, mac, ip, port) {
                counts.syns += 1;
                total_syns.fetch_add(1, Ordering::Relaxed);
                let mut s = steering.lock().unwrap();
                let slot = (hash & 127) as usize;
                match s.queue_of[slot] {
                    Some(q) if q != index => s.conflicts += 1,
                    Some(_) => {}
                    None => s.queue_of[slot] = Some(index),
                }
                replies.push(reply);
            }
        });
        let mut queued = false;
        while let Some(reply) = replies.pop() {
            let Some(slot) = free.pop() else {
                // Every buffer is in flight: the SYN will be sent again by the host.
                replies.clear();
                break;
            };
            region.write_bytes(slot * 128, &reply);
            let segment = [TxSegment {
                iova: region.iova() + (slot * 128) as u64,
                len: reply.len() as u32,
            }];
            queue.tx_enqueue(TxFrame::new(&segment, &offload, slot as TxToken))?;
            if reply[12..14] == [0x08, 0x00] {
                counts.rsts += 1;
            }
            queued = true;
        }
        if queued {
            queue.tx_flush();
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok((index, counts, queue.stats()))
}

/// An ARP reply if `frame` asks who has `ip`.
fn arp_reply(frame: &[u8], mac: [u8; 6], ip: [u8; 4]) -> Option<Vec<u8>> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x06] || frame[20..22] != [0, 1] {
        return None;
    }
    if frame[38..42] != ip {
        return None;
    }
    let mut r = vec![0u8; 42];
    r[0..6].copy_from_slice(&frame[6..12]);
    r[6..12].copy_from_slice(&mac);
    r[12..14].copy_from_slice(&[0x08, 0x06]);
    r[14..20].copy_from_slice(&[0, 1, 0x08, 0, 6, 4]);
    r[20..22].copy_from_slice(&[0, 2]);
    r[22..28].copy_from_slice(&mac);
    r[28..32].copy_from_slice(&ip);
    r[32..42].copy_from_slice(&frame[22..32]);
    Some(r)
}

/// A RST|ACK answering `frame` if it is a TCP SYN to `ip`:`port` (IPv4, no options in the
/// IP header), with the SYN's Toeplitz hash.
fn syn_reset(frame: &[u8], mac: [u8; 6], ip: [u8; 4], port: u16) -> Option<(Vec<u8>, u32)> {
    if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[14] != 0x45 || frame[23] != 6 {
        return None;
    }
    let src: [u8; 4] = frame[26..30].try_into().ok()?;
    let dst: [u8; 4] = frame[30..34].try_into().ok()?;
    let sport = u16::from_be_bytes([frame[34], frame[35]]);
    let dport = u16::from_be_bytes([frame[36], frame[37]]);
    let flags = frame[47];
    if dst != ip || dport != port || flags & 0x02 == 0 || flags & 0x10 != 0 {
        return None;
    }
    let seq = u32::from_be_bytes(frame[38..42].try_into().ok()?);
    let hash = toeplitz_hash(&RSS_KEY, &ipv4_tcp_hash_input(src, dst, sport, dport));
    let mut r = vec![0u8; 54];
    r[0..6].copy_from_slice(&frame[6..12]);
    r[6..12].copy_from_slice(&mac);
    r[12..14].copy_from_slice(&[0x08, 0x00]);
    // IPv4 header: version 4, IHL 5, total length 40, DF, TTL 64, TCP.
    r[14..24].copy_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6]);
    r[26..30].copy_from_slice(&dst);
    r[30..34].copy_from_slice(&src);
    let ip_sum = inet_checksum::checksum(&r[14..34]);
    r[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    // TCP: our port, theirs, seq 0, ack = their seq + 1, data offset 5, RST|ACK, window 0.
    r[34..36].copy_from_slice(&dport.to_be_bytes());
    r[36..38].copy_from_slice(&sport.to_be_bytes());
    r[42..46].copy_from_slice(&seq.wrapping_add(1).to_be_bytes());
    r[46] = 0x50;
    r[47] = 0x14;
    let pseudo = inet_checksum::ipv4_pseudo_header(dst, src, 6, 20);
    let tcp_sum = !inet_checksum::add(
        pseudo,
        inet_checksum::fold(inet_checksum::sum_be(&r[34..54])),
    );
    r[50..52].copy_from_slice(&tcp_sum.to_be_bytes());
    Some((r, hash))
}
