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
    /// A label (name, value), as in `zerosend_http_responses_total{code="503"}`. Samples
    /// of one name with different labels must be adjacent: they share one HELP and TYPE.
    pub label: Option<(&'static str, String)>,
    pub value: f64,
}

impl Metric {
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Self {
        Metric {
            name,
            help,
            kind: Kind::Counter,
            label: None,
            value: value as f64,
        }
    }
    /// A counter of a quantity that is not whole (seconds).
    pub fn counter_f64(name: &'static str, help: &'static str, value: f64) -> Self {
        Metric {
            kind: Kind::Counter,
            ..Metric::gauge(name, help, value)
        }
    }
    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> Self {
        Metric {
            name,
            help,
            kind: Kind::Gauge,
            label: None,
            value,
        }
    }
    pub fn with_label(mut self, name: &'static str, value: impl std::fmt::Display) -> Self {
        self.label = Some((name, value.to_string()));
        self
    }
}

/// Render samples as Prometheus text.
pub fn render_prometheus(metrics: &[Metric]) -> String {
    let mut out = String::with_capacity(metrics.len() * 96);
    let mut previous_name = None;
    for m in metrics {
        if previous_name != Some(m.name) {
            let kind = match m.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            writeln!(out, "# HELP {} {}", m.name, m.help).unwrap();
            writeln!(out, "# TYPE {} {kind}", m.name).unwrap();
            previous_name = Some(m.name);
        }
        out.push_str(m.name);
        if let Some((label, value)) = &m.label {
            write!(out, "{{{label}=\"{}\"}}", escape_label_value(value)).unwrap();
        }
        if m.value.fract() == 0.0 && m.value.abs() < 1e15 {
            writeln!(out, " {}", m.value as i64).unwrap();
        } else {
            writeln!(out, " {}", m.value).unwrap();
        }
    }
    out
}

/// Label values escape backslash, double quote and newline (exposition format 0.0.4).
fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
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

    #[test]
    fn labelled_samples_share_help_and_type() {
        let text = render_prometheus(&[
            Metric::counter("zerosend_http_responses_total", "Responses.", 7)
                .with_label("code", 200),
            Metric::counter("zerosend_http_responses_total", "Responses.", 2)
                .with_label("code", 503),
            Metric::counter("x_total", "X.", 1).with_label("kind", "a\"b\\c\nd"),
        ]);
        assert_eq!(
            text,
            "# HELP zerosend_http_responses_total Responses.\n# TYPE zerosend_http_responses_total counter\n\
             zerosend_http_responses_total{code=\"200\"} 7\nzerosend_http_responses_total{code=\"503\"} 2\n\
             # HELP x_total X.\n# TYPE x_total counter\nx_total{kind=\"a\\\"b\\\\c\\nd\"} 1\n"
        );
    }
}
