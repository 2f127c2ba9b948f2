//! Warnings about situations that, under load or attack, can repeat thousands of times a
//! second (408s, 503s, a page cache out of frames): at most one line per second per kind, and
//! the line says how many were held back, so the log stays readable and writing it never
//! becomes the server's bottleneck.

use std::time::{Duration, Instant};

/// How often one kind of warning may be logged.
const WARNING_INTERVAL: Duration = Duration::from_secs(1);

/// What a warning is about; each kind is rate-limited on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarnKind {
    /// A request head or body arrived too slowly: answered 408 and closed.
    RequestTimeout,
    /// Answered 503 (connection limit, page cache full, write timeout).
    ServiceUnavailable,
    /// The page cache had no frame to give: every frame is pinned by responses in flight.
    OutOfFrames,
}

impl WarnKind {
    pub const ALL: [WarnKind; 3] = [
        WarnKind::RequestTimeout,
        WarnKind::ServiceUnavailable,
        WarnKind::OutOfFrames,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The kind's label on the metrics page.
    pub fn name(self) -> &'static str {
        match self {
            WarnKind::RequestTimeout => "request_timeout",
            WarnKind::ServiceUnavailable => "service_unavailable",
            WarnKind::OutOfFrames => "out_of_frames",
        }
    }

    fn summary(self) -> &'static str {
        match self {
            WarnKind::RequestTimeout => "request timed out (408)",
            WarnKind::ServiceUnavailable => "answered 503 Service Unavailable",
            WarnKind::OutOfFrames => "page cache out of frames (every frame pinned)",
        }
    }
}

/// One kind's limiter: lets a warning through at most once per interval and counts the ones
/// it held back.
#[derive(Clone, Copy, Debug, Default)]
struct RateLimiter {
    last_emitted: Option<Instant>,
    /// Held back since `last_emitted`.
    suppressed: u64,
}

impl RateLimiter {
    /// Whether to log this occurrence now; if so, how many were held back before it.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last_emitted {
            Some(last) if now.duration_since(last) < WARNING_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_emitted = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Held-back occurrences to report now that an interval has passed without another
    /// warning of this kind (otherwise a burst's tail would never be reported).
    fn overdue(&mut self, now: Instant) -> Option<u64> {
        let last = self.last_emitted?;
        if self.suppressed == 0 || now.duration_since(last) < WARNING_INTERVAL {
            return None;
        }
        self.last_emitted = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The server's rate-limited warnings.
#[derive(Debug, Default)]
pub struct Warnings {
    limiters: [RateLimiter; WarnKind::ALL.len()],
    /// Occurrences of each kind, logged or not (for tests and the curious).
    seen: [u64; WarnKind::ALL.len()],
}

impl Warnings {
    /// Note an occurrence of `kind`; logs it unless one of its kind was logged less than a
    /// second ago. Returns whether it was logged.
    pub fn warn(&mut self, kind: WarnKind, now: Instant, detail: &str) -> bool {
        self.seen[kind.index()] += 1;
        match self.limiters[kind.index()].admit(now) {
            Some(0) => {
                tracing::warn!("{}: {detail}", kind.summary());
                true
            }
            Some(suppressed) => {
                tracing::warn!(
                    "{}: {detail} ({suppressed} more since the previous line, not logged)",
                    kind.summary()
                );
                true
            }
            None => false,
        }
    }

    /// Report held-back counts whose interval is over; call now and then.
    pub fn flush(&mut self, now: Instant) {
        for kind in WarnKind::ALL {
            if let Some(suppressed) = self.limiters[kind.index()].overdue(now) {
                tracing::warn!(
                    "{}: {suppressed} more since the previous line, not logged",
                    kind.summary()
                );
            }
        }
    }

    /// How many times `kind` happened, logged or not.
    pub fn seen(&self, kind: WarnKind) -> u64 {
        self.seen[kind.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_second_with_the_count_held_back() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut limiter = RateLimiter::default();
        assert_eq!(limiter.admit(ms(0)), Some(0), "the first is logged");
        assert_eq!(limiter.admit(ms(10)), None);
        assert_eq!(limiter.admit(ms(999)), None);
        assert_eq!(limiter.overdue(ms(999)), None, "not a second yet");
        assert_eq!(
            limiter.admit(ms(1000)),
            Some(2),
            "a second later: logged, with the two held back"
        );
        assert_eq!(limiter.admit(ms(1500)), None);
        assert_eq!(
            limiter.overdue(ms(2100)),
            Some(1),
            "a burst's tail is reported"
        );
        assert_eq!(limiter.overdue(ms(5000)), None, "nothing left to report");
        assert_eq!(limiter.admit(ms(5000)), Some(0));
    }

    #[test]
    fn kinds_are_limited_separately() {
        let now = Instant::now();
        let mut w = Warnings::default();
        assert!(w.warn(WarnKind::ServiceUnavailable, now, "x"));
        assert!(!w.warn(WarnKind::ServiceUnavailable, now, "x"));
        assert!(w.warn(WarnKind::OutOfFrames, now, "y"));
        assert!(w.warn(WarnKind::RequestTimeout, now, "z"));
        assert_eq!(w.seen(WarnKind::ServiceUnavailable), 2);
        assert_eq!(w.seen(WarnKind::OutOfFrames), 1);
    }
}
