//! What the event loop does when a round found nothing to do: poll again at once, nap
//! briefly (`--interrupts off`, and whenever something only polling can notice is pending),
//! or arm the NIC's interrupts and sleep on them (`--interrupts on`).
//!
//! The loop learns of work from: the NIC (frames received, transmissions completed: the
//! interrupt eventfds), the stack's timers (smoltcp's `poll_delay`: retransmissions, delayed
//! ACKs, DHCP, TLS work queued), SIGTERM/SIGINT (signal-hook writes to a socket pair whose
//! other end is in the epoll set), and the page cache: a parked response or a body piece
//! waiting for a fill or a writer (`Pending::is_ready`, an atomic the loop polls), and the
//! upload thread (a PUT being published, a PUT body waiting for room). Those have no file
//! descriptor to wait on, so while any connection waits for one the loop does not sleep on
//! interrupts but naps as in polling mode (200 us), which bounds that wake-up's delay
//! exactly as before. Everything else the loop does on a clock (timeouts
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
    /// Rounds of the loop.
    pub rounds: u64,
    /// Of those, rounds that found nothing to do.
    pub empty_rounds: u64,
    /// Time the loop spent in rounds that found nothing, sleeps excluded (busy polling:
    /// against the wall time it tells how much of a busy CPU was waiting, not working).
    pub empty_round_time: Duration,
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
    /// When the last round ended (after its sleep, if it slept).
    last_round: Instant,
    /// Interrupts armed; the round after arming found nothing yet to sleep on.
    armed: bool,
    pub counts: LoopCounts,
}

struct Sleeper {
    epoll: Epoll,
    events: [EpollEvent; 8],
    /// Read end of the socket pair signal-hook writes a byte to on SIGTERM/SIGINT.
    signals: UnixStream,
    /// Its write end, kept open: once every write end is closed the read end is readable
    /// (end of file) for good, and every sleep would end at once.
    _signal_writer: UnixStream,
}

impl Idle {
    /// Set up sleeping on `nic`'s interrupts if asked for and available, else polling.
    pub fn new<N: Interruptible>(options: IdleOptions, nic: &N) -> Result<Self> {
        Self::with_signals(options, nic, true)
    }

    /// As [`Idle::new`]; `signals`: SIGTERM/SIGINT end a sleep (off only in unit tests,
    /// which must not take the test process's signals).
    fn with_signals<N: Interruptible>(
        options: IdleOptions,
        nic: &N,
        signals: bool,
    ) -> Result<Self> {
        let mut counts = LoopCounts::default();
        let sleeper = match (options.interrupts, nic.irq_mode()) {
            (true, Some(mode)) => {
                counts.mode = Some(mode);
                Some(Sleeper::new(&nic.irq_fds(), signals)?)
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
            last_round: Instant::now(),
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
        let spent = now.saturating_duration_since(self.last_round);
        self.last_round = now;
        self.counts.rounds += 1;
        if !round.work {
            self.counts.empty_rounds += 1;
            self.counts.empty_round_time += spent;
        }
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
                self.last_round = Instant::now();
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
            self.last_round = Instant::now();
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
        self.last_round = Instant::now();
        if woke_by_irq {
            self.counts.irq_wakeups += 1;
            // Traffic: poll busily for a while before sleeping again.
            self.last_work = self.last_round;
        }
        self.disarm(nic);
    }

    fn disarm<N: Interruptible>(&mut self, nic: &mut N) {
        self.counts.interrupts += nic.irq_disarm();
        self.armed = false;
    }
}

impl Sleeper {
    fn new(irq_fds: &[std::os::fd::RawFd], signals_wake: bool) -> Result<Self> {
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
        if signals_wake {
            for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::low_level::pipe::register(signal, writer.try_clone()?)
                    .context("installing the signal wake-up")?;
            }
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
            _signal_writer: writer,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::RawFd;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A NIC whose "interrupt" is an eventfd the test writes.
    struct FakeNic {
        fd: EventFd,
        armed: bool,
        arms: u32,
        count: u64,
    }

    impl FakeNic {
        fn new() -> Self {
            FakeNic {
                fd: EventFd::new(EFD_NONBLOCK).unwrap(),
                armed: false,
                arms: 0,
                count: 0,
            }
        }
    }

    impl Interruptible for FakeNic {
        fn irq_mode(&self) -> Option<IrqMode> {
            Some(IrqMode::MsiX)
        }
        fn irq_fds(&self) -> Vec<RawFd> {
            vec![self.fd.as_raw_fd()]
        }
        fn irq_arm(&mut self) {
            self.armed = true;
            self.arms += 1;
        }
        fn irq_disarm(&mut self) -> u64 {
            self.armed = false;
            let n = self.fd.read().unwrap_or(0);
            self.count += n;
            n
        }
        fn irq_count(&self) -> u64 {
            self.count
        }
    }

    fn idle_round() -> Round {
        Round {
            work: false,
            must_poll: false,
            next_timer: None,
        }
    }

    fn options(interrupts: bool, idle_poll: Duration) -> IdleOptions {
        IdleOptions {
            interrupts,
            idle_poll,
            // Long: a sleep that ends is ended by the interrupt, not the clock.
            max_sleep: Duration::from_secs(600),
        }
    }

    /// Interrupts on: the first idle round arms, the next sleeps until the interrupt, which
    /// is counted; the NIC is quiet (disarmed) again after waking.
    #[test]
    fn sleeps_until_the_interrupt() {
        let mut nic = FakeNic::new();
        let mut idle = Idle::with_signals(options(true, Duration::ZERO), &nic, false).unwrap();
        idle.after_round(&mut nic, idle_round());
        assert!(nic.armed, "the first idle round arms the interrupts");
        assert_eq!(idle.counts.sleeps, 0, "and polls once more before sleeping");
        let writer = nic.fd.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            writer.write(1).unwrap();
        });
        idle.after_round(&mut nic, idle_round());
        t.join().unwrap();
        assert_eq!(idle.counts.sleeps, 1);
        assert_eq!(idle.counts.irq_wakeups, 1);
        assert_eq!(idle.counts.interrupts, 1);
        assert!(!nic.armed, "disarmed after waking");
        // The wake-up counts as traffic: with a long idle-poll the loop polls busily again.
        idle.options.idle_poll = Duration::from_secs(3600);
        idle.after_round(&mut nic, idle_round());
        assert!(!nic.armed && idle.counts.sleeps == 1);
    }

    /// Rounds are counted, empty ones apart, and the time of empty rounds leaves out the
    /// sleeps: a loop that sleeps 50 ms on the interrupt spent almost none of it polling.
    #[test]
    fn empty_round_time_counts_polling_not_sleeping() {
        let mut nic = FakeNic::new();
        let mut idle = Idle::with_signals(options(true, Duration::ZERO), &nic, false).unwrap();
        let busy = Round {
            work: true,
            ..idle_round()
        };
        idle.after_round(&mut nic, busy);
        idle.after_round(&mut nic, idle_round()); // arms
        let writer = nic.fd.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            writer.write(1).unwrap();
        });
        idle.after_round(&mut nic, idle_round()); // sleeps until the interrupt
        t.join().unwrap();
        std::thread::sleep(Duration::from_millis(20)); // a round spent polling
        idle.after_round(&mut nic, idle_round());
        assert_eq!((idle.counts.rounds, idle.counts.empty_rounds), (4, 3));
        let polled = idle.counts.empty_round_time;
        assert!(polled >= Duration::from_millis(20), "{polled:?}");
        assert!(
            polled < Duration::from_millis(50),
            "the sleep is not polling: {polled:?}"
        );
    }

    /// The same rounds with interrupts off: the NIC is never armed, the loop naps (64 spins
    /// first) and no interrupt is ever counted; the assertions of the test above fail.
    #[test]
    fn polling_mode_naps_and_never_arms() {
        let mut nic = FakeNic::new();
        let mut idle = Idle::with_signals(options(false, Duration::ZERO), &nic, false).unwrap();
        for _ in 0..(SPINS_BEFORE_NAP + 10) {
            idle.after_round(&mut nic, idle_round());
        }
        nic.fd.write(1).unwrap();
        idle.after_round(&mut nic, idle_round());
        assert_eq!(nic.arms, 0);
        assert_eq!(idle.counts.sleeps, 11);
        assert_eq!(idle.counts.irq_wakeups, 0);
        assert_eq!(idle.counts.interrupts, 0);
    }

    /// Work in the last `idle_poll`: busy-poll, neither arm nor sleep.
    #[test]
    fn busy_polls_while_traffic_is_recent() {
        let mut nic = FakeNic::new();
        let mut idle =
            Idle::with_signals(options(true, Duration::from_secs(3600)), &nic, false).unwrap();
        idle.after_round(
            &mut nic,
            Round {
                work: true,
                ..idle_round()
            },
        );
        for _ in 0..1000 {
            idle.after_round(&mut nic, idle_round());
        }
        assert_eq!(nic.arms, 0);
        assert_eq!(idle.counts.sleeps, 0);
    }

    /// A page-cache wait has no descriptor: the loop naps and polls, never sleeps on the
    /// interrupts (which would delay the fill's completion by up to the longest sleep).
    #[test]
    fn page_cache_waits_are_polled() {
        let mut nic = FakeNic::new();
        let mut idle = Idle::with_signals(options(true, Duration::ZERO), &nic, false).unwrap();
        for _ in 0..5 {
            idle.after_round(
                &mut nic,
                Round {
                    must_poll: true,
                    ..idle_round()
                },
            );
        }
        assert_eq!(nic.arms, 0);
        assert_eq!(idle.counts.sleeps, 5);
        assert_eq!(idle.counts.irq_wakeups, 0);
    }

    /// The stack's next timer bounds the sleep: without an interrupt the sleep ends (the
    /// test would hang on `max_sleep` of 600 s otherwise) and no interrupt wake is counted.
    #[test]
    fn the_next_timer_ends_a_sleep() {
        let mut nic = FakeNic::new();
        let mut idle = Idle::with_signals(options(true, Duration::ZERO), &nic, false).unwrap();
        let round = || Round {
            next_timer: Some(Duration::from_millis(2)),
            ..idle_round()
        };
        idle.after_round(&mut nic, round());
        idle.after_round(&mut nic, round());
        assert_eq!(idle.counts.sleeps, 1);
        assert_eq!(idle.counts.irq_wakeups, 0);
        assert!(!nic.armed);
    }
}
