//! `zs-guest mq-irq`: every queue pair of a multi-queue NIC, each on its own thread, sleeps
//! on its own interrupt eventfds ([`driver::irq::Interruptible`]: arm, poll once more, sleep,
//! disarm) and counts the frames it receives and the wake-ups its interrupts gave it.
//!
//! The host sends TCP SYNs from many source ports (nothing answers them); RSS spreads them
//! over the queues, so with per-queue vectors every queue's thread must be woken by its own
//! interrupt. Prints `MQIRQ_QUEUES n=N mode=M`, `MQIRQ_READY`, then per queue
//! `MQIRQ_QUEUE index=I rx_frames=F irqs=C wakeups=W fds=D polled=P error=E`.
//!
//! With `--tx-fault` the TX used rings are mapped read-only for the device
//! (`FaultInjection::TxRingReadOnly`) and every queue transmits a frame per frame received:
//! no transmission ever completes, and every queue must end up reporting the device's fault
//! (`error=QueueFault`, the text on an `MQIRQ_ERROR` line) instead of the frames counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use driver::anynic::{FaultInjection, NicConfig};
use driver::dma::DmaAccess;
use driver::multiqueue::{open_nic_queues, QueuePair};
use driver::{DriverError, TxFrame, TxOffload, TxSegment};

#[derive(Args, Debug)]
pub struct MqIrqArgs {
    /// Queue pairs to open.
    #[arg(long, default_value_t = 2)]
    queues: usize,
    /// Stop once this many frames arrived (over all queues), a second later.
    #[arg(long)]
    frames: u64,
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// No indirect descriptors (and so split rings): TX chains and the control command in
    /// ring descriptors.
    #[arg(long)]
    no_indirect: bool,
    /// TX completions stopped by the IOMMU; wait for every queue to report the fault.
    #[arg(long)]
    tx_fault: bool,
}

pub fn run(args: MqIrqArgs) -> Result<()> {
    let (address, model) = super::find_nic(None)?;
    println!("NIC {address} {model}");
    let config = NicConfig {
        interrupts: true,
        virtio_indirect: !args.no_indirect,
        fault_injection: if args.tx_fault {
            FaultInjection::TxRingReadOnly
        } else {
            FaultInjection::None
        },
        ..NicConfig::default()
    };
    let queues = open_nic_queues(&address, &config, args.queues)
        .with_context(|| format!("opening {address} with {} queue pairs", args.queues))?;
    let mode = queues[0].irq_mode();
    println!(
        "MQIRQ_QUEUES n={} mode={}",
        queues.len(),
        mode.map_or("none".to_string(), |m| m.to_string())
    );
    if mode.is_none() {
        bail!("no interrupts on the queues");
    }
    let n = queues.len() as u64;
    let total = Arc::new(AtomicU64::new(0));
    let faulted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let threads: Vec<_> = queues
        .into_iter()
        .map(|queue| {
            let (total, faulted, stop) =
                (Arc::clone(&total), Arc::clone(&faulted), Arc::clone(&stop));
            let tx = args.tx_fault;
            std::thread::spawn(move || serve(queue, tx, &total, &faulted, &stop, deadline))
        })
        .collect();
    println!("MQIRQ_READY");
    let mut reached_at = None;
    while Instant::now() < deadline {
        let done = if args.tx_fault {
            faulted.load(Ordering::Relaxed) == n
        } else {
            total.load(Ordering::Relaxed) >= args.frames
        };
        if done {
            let at = *reached_at.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let line = thread.join().expect("queue thread panicked");
        println!("{line}");
    }
    if args.tx_fault {
        let faulted = faulted.load(Ordering::Relaxed);
        if faulted != n {
            bail!("{faulted} of {n} queues reported the TX fault");
        }
        return Ok(());
    }
    if total.load(Ordering::Relaxed) < args.frames {
        bail!(
            "only {} of {} frames arrived before the timeout",
            total.load(Ordering::Relaxed),
            args.frames
        );
    }
    Ok(())
}

fn serve(
    mut queue: Box<dyn QueuePair>,
    transmit: bool,
    total: &AtomicU64,
    faulted: &AtomicU64,
    stop: &AtomicBool,
    deadline: Instant,
) -> String {
    let index = queue.queue_index();
    let fds = queue.irq_fds();
    let mut frames = 0u64;
    let mut wakeups = 0u64;
    let mut error: Option<DriverError> = None;
    // One broadcast frame of an experimental ethertype, sent once per frame received.
    let frame = match queue.dma().allocate(64, DmaAccess::DeviceReads) {
        Ok(region) => {
            let mut bytes = [0u8; 60];
            bytes[..6].copy_from_slice(&[0xff; 6]);
            bytes[6..12].copy_from_slice(&queue.mac_address().0);
            bytes[12..14].copy_from_slice(&[0x88, 0xb5]);
            region.write_bytes(0, &bytes);
            region
        }
        Err(e) => return format!("MQIRQ_QUEUE index={index} error=allocate:{e}"),
    };
    let segment = [TxSegment {
        iova: frame.iova(),
        len: 60,
    }];
    let offload = TxOffload::default();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut got = queue.rx_poll(64, &mut |_| {});
        if got == 0 {
            // The protocol of `Interruptible`: arm, look once more, then sleep.
            queue.irq_arm();
            got = queue.rx_poll(64, &mut |_| {});
            if got == 0 {
                let mut pollfds: Vec<libc::pollfd> = fds
                    .iter()
                    .map(|&fd| libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: `pollfds` is a live, correctly sized array of pollfd for the whole
                // call; the fds belong to `queue`, which outlives it.
                let ready =
                    unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 100) };
                if ready > 0 {
                    wakeups += 1;
                }
            }
            queue.irq_disarm();
        }
        frames += got as u64;
        total.fetch_add(got as u64, Ordering::Relaxed);
        if transmit && error.is_none() {
            // The token is never needed back: the same buffer is sent every time.
            let mut result = Ok(());
            for _ in 0..got.min(queue.tx_capacity(1)) {
                result =
                    result.and_then(|()| queue.tx_enqueue(TxFrame::new(&segment, &offload, 0)));
            }
            queue.tx_flush();
            if let Err(e) = result.and_then(|()| queue.tx_reap(&mut |_| {}).map(|_| ())) {
                println!("MQIRQ_ERROR index={index} {e}");
                faulted.fetch_add(1, Ordering::Relaxed);
                error = Some(e);
            }
        }
    }
    let stats = queue.stats();
    let error = match &error {
        None => "none",
        Some(DriverError::QueueFault { .. }) => "QueueFault",
        Some(_) => "other",
    };
    format!(
        "MQIRQ_QUEUE index={index} rx_frames={} irqs={} wakeups={wakeups} fds={} polled={frames} tx_frames={} error={error}",
        stats.rx_frames,
        queue.irq_count(),
        fds.len(),
        stats.tx_frames
    )
}
