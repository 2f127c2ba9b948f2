//! Counters in Prometheus text format (exposition format 0.0.4) and the one-line summary the
//! server logs every few seconds.

use std::fmt::Write as _;

/// Counter or gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One metric sample.
#[derive(Clone, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub value: f64,
}

impl Metric {
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Self {
        Metric {
            name,
            help,
            kind: Kind::Counter,
            value: value as f64,
        }
    }
    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> Self {
        Metric {
            name,
            help,
            kind: Kind::Gauge,
            value,
        }
    }
}

/// Render samples as Prometheus text.
pub fn render_prometheus(metrics: &[Metric]) -> String {
    let mut out = String::with_capacity(metrics.len() * 96);
    for m in metrics {
        let kind = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        writeln!(out, "# HELP {} {}", m.name, m.help).unwrap();
        writeln!(out, "# TYPE {} {kind}", m.name).unwrap();
        if m.value.fract() == 0.0 && m.value.abs() < 1e15 {
            writeln!(out, "{} {}", m.name, m.value as i64).unwrap();
        } else {
            writeln!(out, "{} {}", m.name, m.value).unwrap();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_format() {
        let text = render_prometheus(&[
            Metric::counter("zerosend_requests_total", "HTTP requests parsed.", 3),
            Metric::gauge("zerosend_pinned_pages", "Pages pinned now.", 1.5),
        ]);
        assert_eq!(
            text,
            "# HELP zerosend_requests_total HTTP requests parsed.\n# TYPE zerosend_requests_total counter\nzerosend_requests_total 3\n\
             # HELP zerosend_pinned_pages Pages pinned now.\n# TYPE zerosend_pinned_pages gauge\nzerosend_pinned_pages 1.5\n"
        );
    }
}
