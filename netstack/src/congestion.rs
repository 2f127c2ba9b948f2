//! Congestion window of one connection, kept by the stack rather than by smoltcp.
//!
//! Why not smoltcp's: its Reno and Cubic grow the window in slow start by at most one MSS
//! per ACK (RFC 5681 §3.1, equation 2). A receiver that coalesces segments (GRO, LRO, or a
//! TAP device handed a whole TSO frame) acknowledges a 64 KiB frame with one ACK, so the
//! window grows by 1460 bytes per 64 KiB sent: linearly, not exponentially. Measured in the
//! guest (e1000e, a Linux client on the host): a 64 MiB download spent its whole life in
//! that ramp, at about half of the rate the same connection reaches once its window is open.
//!
//! This window counts bytes instead (RFC 3465, Appropriate Byte Counting, without the
//! per-ACK limit L, as Linux does with `tcp_slow_start`): in slow start it grows by the bytes
//! each acknowledgement covers, in congestion avoidance by one MSS per window acknowledged
//! (Reno, RFC 5681 §3.1). It starts at RFC 6928's initial window (10 segments, at most
//! 14600 bytes). A loss (the stack saw a segment transmitted again, `device.rs`) halves it
//! once per window of data (NewReno's recovery, RFC 6582: losses before `recovery_end` are
//! the same event); a loss after a second without any acknowledgement is a retransmission
//! timeout and restarts from one segment (RFC 5681 §3.1, loss window).
//!
//! How it limits smoltcp (whose own controller is then off): the stack feeds the socket's
//! send ring only while the ring holds less than the window (`Stack::feed_sockets`). The ring
//! holds exactly the unacknowledged and the unsent bytes, so what is in flight never exceeds
//! the window. What this cannot do: take back bytes already fed. After a timeout smoltcp
//! resends what its ring holds (at most the window before the loss); the smaller window
//! holds from the next feed on.

use core::time::Duration;

/// A retransmission with no acknowledgement progress for this long is a timeout (smoltcp's
/// smallest retransmission timeout is one second).
pub const TIMEOUT_SILENCE: Duration = Duration::from_millis(900);

/// Congestion state of one connection, in TCP stream bytes.
#[derive(Debug, Clone)]
pub struct CongestionWindow {
    mss: u64,
    cwnd: u64,
    ssthresh: u64,
    /// Congestion avoidance: bytes acknowledged since the window last grew by one MSS.
    avoidance_acked: u64,
    /// Stream bytes acknowledged as far as this window has counted.
    acked: u64,
    /// In recovery until this stream offset is acknowledged (`sent_max` at the loss).
    recovery_end: Option<u64>,
    /// Loss events that reduced the window (fast-retransmit kind, timeout kind).
    losses: u64,
    timeouts: u64,
}

impl CongestionWindow {
    /// A fresh connection's window for segments of `mss` bytes (RFC 6928 initial window).
    pub fn new(mss: u64) -> Self {
        let mss = mss.max(1);
        Self {
            mss,
            cwnd: (10 * mss).min((2 * mss).max(14_600)),
            ssthresh: u64::MAX,
            avoidance_acked: 0,
            acked: 0,
            recovery_end: None,
            losses: 0,
            timeouts: 0,
        }
    }

    /// Bytes that may be unacknowledged (in flight or queued to go) at once.
    pub fn window(&self) -> u64 {
        self.cwnd
    }

    /// Slow start threshold (`u64::MAX` until the first loss).
    pub fn ssthresh(&self) -> u64 {
        self.ssthresh
    }

    /// Whether the window is still in slow start.
    pub fn in_slow_start(&self) -> bool {
        self.cwnd < self.ssthresh
    }

    /// The peer has acknowledged the stream up to `acked` (cumulative; smaller values are
    /// ignored).
    pub fn on_acked(&mut self, acked: u64) {
        let newly = acked.saturating_sub(self.acked);
        if newly == 0 {
            return;
        }
        self.acked = acked;
        if let Some(end) = self.recovery_end {
            if acked < end {
                // Partial acknowledgement during recovery: the window stays reduced.
                return;
            }
            self.recovery_end = None;
        }
        if self.cwnd < self.ssthresh {
            // Byte counting: each acknowledged byte opens one more (RFC 3465 §2.1), but not
            // past ssthresh; the rest counts towards congestion avoidance.
            let grow = newly.min(self.ssthresh - self.cwnd);
            self.cwnd += grow;
            self.avoidance(newly - grow);
        } else {
            self.avoidance(newly);
        }
    }

    /// Reno's congestion avoidance: one MSS per window's worth of acknowledged bytes.
    fn avoidance(&mut self, acked: u64) {
        self.avoidance_acked += acked;
        while self.avoidance_acked >= self.cwnd {
            self.avoidance_acked -= self.cwnd;
            self.cwnd = self.cwnd.saturating_add(self.mss);
        }
    }

    /// A segment was transmitted again: a loss. `sent_max` is the highest stream offset
    /// sent so far, `silent_for` how long nothing was acknowledged.
    pub fn on_retransmission(&mut self, sent_max: u64, silent_for: Duration) {
        let timeout = silent_for >= TIMEOUT_SILENCE;
        if self.recovery_end.is_some_and(|end| self.acked < end) && !timeout {
            // A further retransmission of the same window: one reduction per window.
            return;
        }
        let flight = sent_max.saturating_sub(self.acked);
        // RFC 5681 equation (4): half the flight, at least two segments.
        self.ssthresh = (flight / 2).max(2 * self.mss);
        self.avoidance_acked = 0;
        self.recovery_end = Some(sent_max);
        if timeout {
            self.cwnd = self.mss;
            self.timeouts += 1;
        } else {
            self.cwnd = self.ssthresh;
            self.losses += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: u64 = 1460;
    const FRAME: u64 = 45 * MSS; // one 64 KiB TSO frame's payload

    /// Sends a window's worth in TSO frames, each acknowledged by one ACK (a coalescing
    /// receiver); returns the bytes sent in that round trip.
    fn round_trip(w: &mut CongestionWindow, acked: &mut u64) -> u64 {
        let window = w.window();
        let mut sent = 0;
        while sent < window {
            let frame = FRAME.min(window - sent);
            sent += frame;
        }
        // The ACKs come back one per frame.
        let mut left = sent;
        while left > 0 {
            let frame = FRAME.min(left);
            left -= frame;
            *acked += frame;
            w.on_acked(*acked);
        }
        sent
    }

    #[test]
    fn starts_at_the_rfc_6928_initial_window() {
        assert_eq!(CongestionWindow::new(1460).window(), 14_600);
        assert_eq!(CongestionWindow::new(536).window(), 5360);
        // Large segments: two of them, as RFC 6928 bounds it.
        assert_eq!(CongestionWindow::new(9000).window(), 18_000);
    }

    #[test]
    fn slow_start_doubles_per_round_trip_when_one_ack_covers_a_whole_tso_frame() {
        let mut w = CongestionWindow::new(MSS);
        let mut acked = 0;
        let mut sent_per_rtt = Vec::new();
        for _ in 0..10 {
            sent_per_rtt.push(round_trip(&mut w, &mut acked));
        }
        // 14600 * 2^9 = 7.5 MB after ten round trips; one MSS per ACK (what smoltcp's
        // controllers do) would have reached about 110 KB.
        for pair in sent_per_rtt.windows(2) {
            assert_eq!(pair[1], 2 * pair[0], "{sent_per_rtt:?}");
        }
        assert!(w.window() >= 7_000_000, "{}", w.window());
    }

    #[test]
    fn a_loss_halves_the_flight_once_per_window_then_reno_adds_one_mss_per_window() {
        let mut w = CongestionWindow::new(MSS);
        w.on_acked(1_000_000);
        let sent_max = 1_000_000 + 400_000;
        w.on_retransmission(sent_max, Duration::from_millis(5));
        assert_eq!(w.window(), 200_000);
        assert_eq!(w.ssthresh(), 200_000);
        // The same window's other losses do not cut again.
        w.on_retransmission(sent_max, Duration::from_millis(5));
        w.on_acked(1_100_000); // partial: still recovering
        w.on_retransmission(sent_max, Duration::from_millis(5));
        assert_eq!((w.window(), w.losses), (200_000, 1));
        // Recovery ends; then one MSS per window's worth acknowledged.
        w.on_acked(sent_max);
        assert!(!w.in_slow_start());
        let before = w.window();
        w.on_acked(sent_max + before);
        assert_eq!(w.window(), before + MSS);
        // A loss of new data after recovery cuts again.
        w.on_retransmission(sent_max + 2 * before, Duration::from_millis(5));
        assert_eq!(w.losses, 2);
        assert_eq!(w.window(), (before / 2).max(2 * MSS));
    }

    #[test]
    fn a_retransmission_after_a_silent_second_is_a_timeout_back_to_one_segment() {
        let mut w = CongestionWindow::new(MSS);
        w.on_acked(500_000);
        w.on_retransmission(600_000, Duration::from_millis(1200));
        assert_eq!((w.window(), w.timeouts, w.ssthresh()), (MSS, 1, 50_000));
        // Slow start again (byte counting) up to ssthresh, then avoidance.
        w.on_acked(600_000);
        // 48540 bytes reach ssthresh, the other 51460 count towards avoidance: one MSS.
        assert_eq!(w.window(), 50_000 + MSS);
        assert!(!w.in_slow_start());
    }

    #[test]
    fn old_or_repeated_acknowledgements_change_nothing() {
        let mut w = CongestionWindow::new(MSS);
        w.on_acked(10_000);
        let after = w.window();
        w.on_acked(10_000);
        w.on_acked(5_000);
        assert_eq!(w.window(), after);
    }
}
