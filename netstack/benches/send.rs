//! Zero-copy send vs smoltcp's ordinary copying socket, same stack, same data, same run.
//!
//! One thread runs everything: the stack under test, the software NIC and a stock smoltcp
//! peer. The figure that matters is the *sender-side* time: time spent in `Stack::poll`
//! (smoltcp, the device boundary, descriptor building), with the software NIC's DMA and the
//! peer excluded (the NIC is in manual DMA mode and stepped outside the timed region).
//! Wall time of the whole pipeline is printed too.
//!
//! `cargo bench -p netstack --bench send` (env `ZS_BENCH_MIB`, default 256).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant as WallInstant};

use common::*;
use netstack::{Event, SendMode};
use pagecache::OpenOptions;
use softnic::{DmaTiming, SoftNicConfig};

struct Figures {
    bytes: u64,
    sender: Duration,
    wall: Duration,
    copied: u64,
    placeholder: u64,
    frames: u64,
    polls: u64,
}

/// Who cuts the stream into MSS-sized frames.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Segmentation {
    /// The NIC (64 KiB TSO frames).
    Tso,
    /// The stack's boundary, from smoltcp's 64 KiB segments (no TSO).
    Gso,
    /// smoltcp, one segment per MSS (no TSO, no GSO).
    Mss,
}

impl Segmentation {
    fn name(self) -> &'static str {
        match self {
            Segmentation::Tso => "tso",
            Segmentation::Gso => "gso",
            Segmentation::Mss => "mss",
        }
    }
}

fn run(mode: SendMode, segmentation: Segmentation, data: &[u8], repeat: usize) -> Figures {
    let nic = SoftNicConfig {
        dma_timing: DmaTiming::Manual,
        ..SoftNicConfig::default()
    };
    let mut config = BedConfig::new(nic, data.len() + (8 << 20));
    config.stack.send_mode = mode;
    config.stack.tx.tso = segmentation == Segmentation::Tso;
    config.stack.tx.gso = segmentation == Segmentation::Gso;
    config.peer_rx_buffer = 4 << 20;
    let mut bed = Bed::new(config);
    let path = bed.write_file("bench", data);
    let file = bed.cache.open(&path, OpenOptions::read_only()).unwrap();
    bed.auto_device_step = true;
    let conn = bed.connect();
    let pin = file.pin(0..data.len() as u64).unwrap();
    let total = (data.len() * repeat) as u64;
    for _ in 0..repeat {
        bed.stack
            .send_file(conn, &pin, 0..data.len() as u64)
            .unwrap();
    }
    drop(pin);
    let before = bed.stack.stats();
    let mut received = 0u64;
    let mut completed = 0;
    let mut sender = Duration::ZERO;
    let mut buf = vec![0u8; 1 << 20];
    let wall = WallInstant::now();
    let mut polls = 0u64;
    while received < total || completed < repeat {
        polls += 1;
        let t = WallInstant::now();
        bed.stack.poll(bed.now).unwrap();
        sender += t.elapsed();
        bed.stack.nic_mut().device_step(usize::MAX);
        bed.peer_iface
            .poll(bed.now, &mut bed.peer_dev, &mut bed.peer_sockets);
        while bed.peer_socket().can_recv() {
            received += bed.peer_socket().recv_slice(&mut buf).unwrap() as u64;
        }
        completed += bed
            .stack
            .poll_events()
            .filter(|e| matches!(e, Event::SendComplete { .. }))
            .count();
        bed.now += smoltcp::time::Duration::from_micros(100);
    }
    let wall = wall.elapsed();
    let after = bed.stack.stats();
    Figures {
        bytes: total,
        sender,
        wall,
        copied: after.payload_bytes_copied - before.payload_bytes_copied,
        placeholder: after.placeholder_bytes_copied - before.placeholder_bytes_copied,
        frames: after.frames_tx - before.frames_tx,
        polls,
    }
}

fn gbit(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run small then.
    let benching = std::env::args().any(|a| a == "--bench");
    let mib: usize = std::env::var("ZS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 256 } else { 8 });
    let file_mib = mib.min(64);
    let repeat = mib.div_ceil(file_mib);
    let data = pattern(file_mib << 20, 1);
    println!(
        "zero-copy send vs smoltcp copying socket: {} MiB per run ({} x {} MiB file), one core",
        repeat * file_mib,
        repeat,
        file_mib
    );
    println!(
        "{:<6} {:<10} {:>12} {:>14} {:>10} {:>12} {:>16} {:>10} {:>8}",
        "segments",
        "mode",
        "sender s",
        "sender Gbit/s",
        "wall s",
        "wall Gbit/s",
        "copied/byte",
        "frames",
        "polls"
    );
    // Optional filters for profiling: ZS_BENCH_SEGMENTS=tso|gso|mss,
    // ZS_BENCH_MODE=zerocopy|copying.
    let segments_filter = std::env::var("ZS_BENCH_SEGMENTS").ok();
    let mode_filter = std::env::var("ZS_BENCH_MODE")
        .ok()
        .map(|m| m.to_lowercase());
    for segmentation in [Segmentation::Tso, Segmentation::Gso, Segmentation::Mss] {
        if segments_filter
            .as_deref()
            .is_some_and(|f| f != segmentation.name())
        {
            continue;
        }
        let mut results = Vec::new();
        for mode in [SendMode::ZeroCopy, SendMode::Copying] {
            if mode_filter
                .as_deref()
                .is_some_and(|m| m != format!("{mode:?}").to_lowercase())
            {
                continue;
            }
            let f = run(mode, segmentation, &data, repeat);
            println!(
                "{:<6} {:<10} {:>12.3} {:>14.2} {:>10.3} {:>12.2} {:>7.3} (+{:.3} ph) {:>10} {:>8}",
                segmentation.name(),
                format!("{mode:?}"),
                f.sender.as_secs_f64(),
                gbit(f.bytes, f.sender),
                f.wall.as_secs_f64(),
                gbit(f.bytes, f.wall),
                f.copied as f64 / f.bytes as f64,
                f.placeholder as f64 / f.bytes as f64,
                f.frames,
                f.polls
            );
            results.push(f);
        }
        let [z, c] = &results[..] else { continue };
        println!(
            "{}: zero-copy / copying sender throughput ratio {:.2}x (wall {:.2}x); payload bytes copied per byte sent: zero-copy {:.3}, copying {:.3}; placeholder bytes copied per byte (zero-copy) {:.3}",
            segmentation.name(),
            c.sender.as_secs_f64() / z.sender.as_secs_f64(),
            c.wall.as_secs_f64() / z.wall.as_secs_f64(),
            z.copied as f64 / z.bytes as f64,
            c.copied as f64 / c.bytes as f64,
            z.placeholder as f64 / z.bytes as f64,
        );
    }
    // The cost the approach adds: smoltcp copies placeholder bytes ring -> frame. Measure
    // that copy alone (1 MiB ring, 64 KiB frames, like TSO segments).
    let ring = vec![0u8; 1 << 20];
    let mut frame = vec![0u8; 64 << 10];
    let t = WallInstant::now();
    let rounds = (mib << 20) / frame.len();
    for i in 0..rounds {
        let n = frame.len();
        let at = (i * n) % ring.len();
        frame.copy_from_slice(&ring[at..at + n]);
        std::hint::black_box(&mut frame);
    }
    let elapsed = t.elapsed();
    println!(
        "placeholder copy alone: {:.1} GB/s ({:.3} s for {} MiB)",
        (rounds * frame.len()) as f64 / elapsed.as_secs_f64() / 1e9,
        elapsed.as_secs_f64(),
        mib
    );
}
