//! What the event loop does when a round found nothing to do: poll again at once, nap
//! briefly (`--interrupts off`, and whenever something only polling can notice is pending),
//! or arm the NIC's interrupts and sleep on them (`--interrupts on`).
//!
//! The loop learns of work from: the NIC (frames received, transmissions completed: the
//! interrupt eventfds), the stack's timers (smoltcp's `poll_delay`: retransmissions, delayed
//! ACKs, DHCP, TLS work queued), SIGTERM/SIGINT (signal-hook writes to a socket pair whose
//! other end is in the epoll set), and the page cache: a parked response or a body piece
//! waiting for a fill or a writer (`Pending::is_ready`, an atomic the loop polls). The page
//! cache has no file descriptor to wait on, so while any connection waits for it the loop
//! does not sleep on interrupts but naps as in polling mode (200 us), which bounds that
//! wake-up's delay exactly as before. Everything else the loop does on a clock (timeouts
//! every 500 ms, the certificate check every 2 s, the stats line) is bounded by
//! `--idle-max-sleep-ms`, the longest sleep.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use driver::irq::{Interruptible, IrqMode};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Polls with nothing to do before the polling loop starts napping between polls.
const SPINS_BEFORE_NAP: u32 = 64;
/// The nap of an idle polling loop: short, so a new request waits at most this long.
pub(super) const IDLE_NAP: Duration = Duration::from_micros(200);

/// epoll user data of the two kinds of descriptor.
const TOKEN_IRQ: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;

/// `zerosend serve --interrupts/--idle-poll-us/--idle-max-sleep-ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleOptions {
    /// Sleep on the NIC's interrupts when idle (else nap and poll).
    pub interrupts: bool,
    /// How long polls must have found nothing before the loop arms interrupts and sleeps.
    pub idle_poll: Duration,
    /// Longest sleep.
    pub max_sleep: Duration,
}

impl Default for IdleOptions {
    fn default() -> Self {
        IdleOptions {
            interrupts: true,
            idle_poll: Duration::from_micros(100),
            max_sleep: Duration::from_millis(100),
        }
    }
}

/// The loop's own counters, for the metrics page and the stats line.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct LoopCounts {
    /// Every time the loop gave up the CPU: naps and sleeps on the interrupts.
    pub sleeps: u64,
    /// Sleeps on the interrupts that ended because the NIC interrupted.
    pub irq_wakeups: u64,
    /// Interrupts the NIC signalled (eventfd counts).
    pub interrupts: u64,
    /// The interrupt kind in use, `None` when polling.
    pub mode: Option<IrqMode>,
}

/// What the server tells the idle policy after a round.
pub(super) struct Round {
    /// The round did something.
    pub work: bool,
    /// Something only polling notices is pending (a page-cache wait).
    pub must_poll: bool,
    /// The stack's next timer, from now (`None`: none).
    pub next_timer: Option<Duration>,
}

/// The idle policy of one loop.
pub(super) struct Idle {
    options: IdleOptions,
    /// `None`: polling mode (interrupts off, or the NIC has none).
    sleeper: Option<Sleeper>,
    idle_polls: u32,
    last_work: Instant,
    /// Interrupts armed; the round after arming found nothing yet to sleep on.
    armed: bool,
    pub counts: LoopCounts,
}

struct Sleeper {
    epoll: Epoll,
    events: [EpollEvent; 8],
    /// Read end of the socket pair signal-hook writes a byte to on SIGTERM/SIGINT.
    signals: UnixStream,
}

impl Idle {
    /// Set up sleeping on `nic`'s interrupts if asked for and available, else polling.
    pub fn new<N: Interruptible>(options: IdleOptions, nic: &N) -> Result<Self> {
        let mut counts = LoopCounts::default();
        let sleeper = match (options.interrupts, nic.irq_mode()) {
            (true, Some(mode)) => {
                counts.mode = Some(mode);
                Some(Sleeper::new(&nic.irq_fds())?)
            }
            (true, None) => {
                println!("zerosend: the NIC has no usable interrupt: polling (--interrupts off)");
                None
            }
            (false, _) => None,
        };
        Ok(Idle {
            options,
            sleeper,
            idle_polls: 0,
            last_work: Instant::now(),
            armed: false,
            counts,
        })
    }

    /// "interrupts MSI-X" / "polling", for the serving line.
    pub fn describe(&self) -> String {
        match (&self.sleeper, self.counts.mode) {
            (Some(_), Some(mode)) => format!(
                "interrupts {mode}, idle poll {} us, max sleep {} ms",
                self.options.idle_poll.as_micros(),
                self.options.max_sleep.as_millis()
            ),
            _ => "polling".into(),
        }
    }

    /// After a round of the loop: go on at once, nap, or sleep until the NIC interrupts,
    /// a signal comes, the stack's next timer or the longest sleep.
    pub fn after_round<N: Interruptible>(&mut self, nic: &mut N, round: Round) {
        let now = Instant::now();
        if round.work {
            self.idle_polls = 0;
            self.last_work = now;
            if self.armed {
                self.disarm(nic);
            }
            return;
        }
        self.idle_polls += 1;
        let Some(sleeper) = &mut self.sleeper else {
            if self.idle_polls > SPINS_BEFORE_NAP {
                self.counts.sleeps += 1;
                std::thread::sleep(IDLE_NAP);
            }
            return;
        };
        if now.duration_since(self.last_work) < self.options.idle_poll {
            return; // busy-poll: traffic was seen recently
        }
        let timeout = match round.next_timer {
            Some(t) => t.min(self.options.max_sleep),
            None => self.options.max_sleep,
        };
        if round.must_poll || timeout < IDLE_NAP {
            if self.armed {
                self.disarm(nic);
            }
            self.counts.sleeps += 1;
            std::thread::sleep(IDLE_NAP.min(timeout));
            return;
        }
        if !self.armed {
            // Arm, then one more round: what arrived before arming is found by that poll
            // (the device would not interrupt for it on every model).
            nic.irq_arm();
            self.armed = true;
            return;
        }
        self.counts.sleeps += 1;
        // epoll's timeout is in milliseconds: round up, so a timer is never polled early
        // and busy-waited for.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let woke_by_irq = sleeper.wait(ms);
        if woke_by_irq {
            self.counts.irq_wakeups += 1;
            // Traffic: poll busily for a while before sleeping again.
            self.last_work = Instant::now();
        }
        self.disarm(nic);
    }

    fn disarm<N: Interruptible>(&mut self, nic: &mut N) {
        self.counts.interrupts += nic.irq_disarm();
        self.armed = false;
    }
}

impl Sleeper {
    fn new(irq_fds: &[std::os::fd::RawFd]) -> Result<Self> {
        let epoll = Epoll::new().context("epoll_create1")?;
        for &fd in irq_fds {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_IRQ),
                )
                .context("adding an interrupt eventfd to epoll")?;
        }
        let (signals, writer) = UnixStream::pair().context("socketpair for signals")?;
        signals.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::low_level::pipe::register(signal, writer.try_clone()?)
                .context("installing the signal wake-up")?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                signals.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_SIGNAL),
            )
            .context("adding the signal socket to epoll")?;
        Ok(Sleeper {
            epoll,
            events: [EpollEvent::default(); 8],
            signals,
        })
    }

    /// Sleep up to `ms`; returns whether an interrupt ended it. The eventfds are read by
    /// the driver's `irq_disarm`; a signal's bytes are read here.
    fn wait(&mut self, ms: i32) -> bool {
        let n = match self.epoll.wait(ms, &mut self.events) {
            Ok(n) => n,
            // EINTR: a signal arrived; the loop looks at its flag.
            Err(_) => return false,
        };
        let mut irq = false;
        for event in &self.events[..n] {
            match event.data() {
                TOKEN_IRQ => irq = true,
                _ => {
                    let mut buf = [0u8; 16];
                    while matches!(self.signals.read(&mut buf), Ok(n) if n > 0) {}
                }
            }
        }
        irq
    }
}
