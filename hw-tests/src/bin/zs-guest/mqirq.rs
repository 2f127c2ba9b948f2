//! `zs-guest mq-irq`: every queue pair of a multi-queue NIC, each on its own thread, sleeps
//! on its own interrupt eventfds ([`driver::Interruptible`]: arm, poll once more, sleep,
//! disarm) and counts the frames it receives and the wake-ups its interrupts gave it.
//!
//! The host sends TCP SYNs from many source ports (nothing answers them); RSS spreads them
//! over the queues, so with per-queue vectors every queue's thread must be woken by its own
//! interrupt. Prints `MQIRQ_QUEUES n=N mode=M`, `MQIRQ_READY`, then per queue
//! `MQIRQ_QUEUE index=I rx_frames=F irqs=C wakeups=W fds=D`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use driver::anynic::NicConfig;
use driver::multiqueue::{open_nic_queues, QueuePair};

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
}

pub fn run(args: MqIrqArgs) -> Result<()> {
    let (address, model) = super::find_nic(None)?;
    println!("NIC {address} {model}");
    let config = NicConfig {
        interrupts: true,
        virtio_indirect: !args.no_indirect,
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
    let total = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let threads: Vec<_> = queues
        .into_iter()
        .map(|queue| {
            let (total, stop) = (Arc::clone(&total), Arc::clone(&stop));
            std::thread::spawn(move || serve(queue, &total, &stop, deadline))
        })
        .collect();
    println!("MQIRQ_READY");
    let mut reached_at = None;
    while Instant::now() < deadline {
        if total.load(Ordering::Relaxed) >= args.frames {
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
    total: &AtomicU64,
    stop: &AtomicBool,
    deadline: Instant,
) -> String {
    let index = queue.queue_index();
    let fds = queue.irq_fds();
    let mut frames = 0u64;
    let mut wakeups = 0u64;
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
    }
    let stats = queue.stats();
    format!(
        "MQIRQ_QUEUE index={index} rx_frames={} irqs={} wakeups={wakeups} fds={} polled={frames}",
        stats.rx_frames,
        queue.irq_count(),
        fds.len()
    )
}
