//! `zs-guest stack-send`: the netstack on a real (emulated) NIC sends a file, zero-copy from
//! the page cache, to a TCP peer (a Linux socket on the host side of the TAP device).
//!
//! Prints `STACK_CONNECTED`, then `STACK_SENT bytes=N sha256=HEX outcome=...` and a
//! `STACK_STATS key=value ...` line; the host compares the sha256 of what it received.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant as WallInstant};

use anyhow::{bail, Context, Result};
use clap::Args;
use driver::anynic::{open_nic, NicConfig};
use driver::dma::DmaAccess;
use driver::NetQueue;
use netstack::{Event, Instant, Ipv4Address, Ipv4Config, SendOutcome, Stack, StackConfig};
use pagecache::{CacheConfig, FrameArena, OpenOptions, PageCache};
use sha2::{Digest, Sha256};

#[derive(Args, Debug)]
pub struct StackSendArgs {
    /// Peer to send to, IPv4:port.
    #[arg(long)]
    connect: String,
    /// File to send.
    #[arg(long)]
    file: PathBuf,
    /// Our address, a.b.c.d/prefix.
    #[arg(long, default_value = "10.99.0.2/24")]
    ip: String,
    /// PCI address; default: the first supported NIC.
    #[arg(long)]
    pci: Option<String>,
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Switch off TSO (MSS segmentation by the stack).
    #[arg(long)]
    no_tso: bool,
}

fn parse_ipv4(s: &str) -> Result<[u8; 4]> {
    let v: Vec<u8> = s
        .split('.')
        .map(|p| p.parse::<u8>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad IPv4 address {s:?}"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("bad IPv4 address {s:?}"))
}

pub fn run(args: StackSendArgs) -> Result<()> {
    let (peer_ip, peer_port) = args
        .connect
        .split_once(':')
        .context("--connect wants IPv4:port")?;
    let peer_ip = parse_ipv4(peer_ip)?;
    let peer_port: u16 = peer_port.parse().context("bad port")?;
    let (ip, prefix) = args
        .ip
        .split_once('/')
        .context("--ip wants a.b.c.d/prefix")?;
    let ip = parse_ipv4(ip)?;
    let prefix: u8 = prefix.parse().context("bad prefix")?;

    let (address, model) = super::find_nic(args.pci.as_deref())?;
    println!("NIC {address} {model}");
    let nic =
        open_nic(&address, &NicConfig::default()).with_context(|| format!("opening {address}"))?;
    let caps = nic.capabilities();
    println!("CAPS {caps:?}");

    // The page cache's frames: DMA memory the NIC may only read.
    let file_len = std::fs::metadata(&args.file)?.len();
    let cache_bytes = ((file_len as usize).div_ceil(2 << 20) + 4) * (2 << 20);
    let region = nic.dma().allocate(cache_bytes, DmaAccess::DeviceReads)?;
    let arena = FrameArena::from_shared(Arc::clone(region.memory()))?;
    let cache = PageCache::new(
        arena,
        CacheConfig {
            audit: true,
            ..CacheConfig::default()
        },
    )?;
    let file = cache.open(&args.file, OpenOptions::read_only())?;

    let mut config = StackConfig::new(Ipv4Config::static_address(ip, prefix, None));
    config.tx.tso = !args.no_tso;
    let mut stack = Stack::new(nic, config)?;
    println!("TSO_FRAME {:?}", stack.tso_frame());

    let deadline = WallInstant::now() + Duration::from_secs(args.timeout_secs);
    let mut attempt = 0u16;
    let mut conn = stack.connect((Ipv4Address::from(peer_ip), peer_port), 40000)?;
    let mut expected_sha = None;
    let mut outcome = None;
    let mut closed = false;
    let mut last_progress = WallInstant::now();
    while !(outcome.is_some() && closed) {
        if last_progress.elapsed() > Duration::from_secs(5) {
            last_progress = WallInstant::now();
            let s = stack.stats();
            println!(
                "STACK_PROGRESS state={:?} unacked={:?} frames_tx={} frames_rx={} sent={} retransmitted={} in_flight={} dropped_no_buffer={} refused={} nic={:?}",
                stack.state(conn).ok(),
                stack.unacked(conn).ok(),
                s.frames_tx,
                s.frames_rx,
                s.payload_bytes_sent,
                s.retransmitted_bytes,
                s.frames_in_flight_now,
                s.tx_dropped_no_buffer,
                s.tx_refused,
                stack.nic_mut().stats()
            );
        }
        if WallInstant::now() > deadline {
            bail!(
                "timed out (outcome {outcome:?}, closed {closed}, stats {:?})",
                stack.stats()
            );
        }
        let busy = stack.poll(Instant::now())?;
        while let Some(event) = stack.next_event() {
            match event {
                Event::Connected { conn: c } if c == conn => {
                    println!("STACK_CONNECTED");
                    let pin = file.pin(0..file_len)?;
                    let mut h = Sha256::new();
                    for span in pin.all_spans() {
                        h.update(span.bytes);
                    }
                    expected_sha = Some(hex(&h.finalize()));
                    stack.send_file(conn, &pin, 0..file_len)?;
                    stack.close(conn)?;
                }
                Event::SendComplete { outcome: o, .. } => outcome = Some(o),
                Event::Closed { conn: c } if c == conn => {
                    if expected_sha.is_none() {
                        // Refused (the peer was not listening yet): try again.
                        attempt += 1;
                        if attempt > 30 {
                            bail!("connection refused 30 times");
                        }
                        std::thread::sleep(Duration::from_secs(1));
                        conn = stack
                            .connect((Ipv4Address::from(peer_ip), peer_port), 40000 + attempt)?;
                    } else {
                        closed = true;
                    }
                }
                _ => {}
            }
        }
        if !busy {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let s = stack.stats();
    let outcome = outcome.unwrap();
    println!(
        "STACK_SENT bytes={file_len} sha256={} outcome={}",
        expected_sha.unwrap_or_default(),
        if outcome == SendOutcome::Acknowledged {
            "acknowledged"
        } else {
            "aborted"
        }
    );
    println!(
        "STACK_STATS payload_bytes_copied={} placeholder_bytes_copied={} file_bytes_sent={} retransmitted_bytes={} zero_copy_frames={} frames_tx={} pins_held_now={} tx_unmapped_drops={} software_checksum_bytes={}",
        s.payload_bytes_copied,
        s.placeholder_bytes_copied,
        s.file_bytes_sent,
        s.retransmitted_bytes,
        s.zero_copy_frames,
        s.frames_tx,
        s.pins_held_now,
        s.tx_unmapped_drops,
        s.software_checksum_bytes
    );
    drop(file);
    let c = cache.stats();
    println!(
        "STACK_AUDIT checks={} violations={}",
        c.audit_checks, c.audit_violations
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
