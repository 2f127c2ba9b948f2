//! The HTTP request-head parser (`src/http.rs`: `parse_request`) and the chunked body
//! decoder, on arbitrary bytes with default and tight limits, the input fed whole and in
//! arbitrary pieces: no panic, what they return lies inside the input, a complete head parses
//! the same however the bytes arrived, and the chunked decoder makes progress or waits.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/http.rs"]
mod http;

use http::{parse_request, ChunkStep, ChunkedDecoder, Limits, Parsed};

#[derive(Arbitrary, Debug)]
struct Input {
    tight: bool,
    /// Where the bytes are cut into arrivals (each a prefix length, taken modulo).
    cuts: Vec<u16>,
    max_data: u16,
    bytes: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let limits = if input.tight {
        Limits {
            max_head_bytes: 64,
            max_headers: 3,
            max_target_bytes: 16,
            max_body_bytes: 100,
            max_discarded_body_bytes: 10,
        }
    } else {
        Limits::default()
    };
    let bytes = &input.bytes;
    let whole = parse_request(bytes, &limits);
    if let Ok(Parsed::Complete { request, head_len }) = &whole {
        assert!(*head_len <= bytes.len());
        assert!(request.path_start <= request.target.len());
        let _ = request.raw_path();
        let _ = request.request_line();
        // Any prefix that holds the whole head parses to the same request.
        let again = parse_request(&bytes[..*head_len], &limits);
        assert_eq!(again.as_ref().ok(), whole.as_ref().ok());
        if request.chunked {
            chunked(
                &bytes[*head_len..],
                &input.cuts,
                input.max_data as usize + 1,
            );
        }
    }
    // Arrivals: every prefix a server would see before the whole head.
    for &cut in &input.cuts {
        let n = cut as usize % (bytes.len() + 1);
        if let Ok(Parsed::Complete { head_len, .. }) = parse_request(&bytes[..n], &limits) {
            assert!(head_len <= n);
        }
    }
    chunked(bytes, &input.cuts, input.max_data as usize + 1);
});

/// Feeds `body` to a chunked decoder as it would arrive (buffered up to each cut), consuming
/// what each step names.
fn chunked(body: &[u8], cuts: &[u16], max_data: usize) {
    let mut decoder = ChunkedDecoder::new(64);
    let mut at = 0;
    let mut arrived = 0;
    let mut cuts = cuts
        .iter()
        .map(|&c| c as usize)
        .chain(std::iter::once(body.len()));
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 1_000_000, "chunked decoder loops");
        match decoder.step(&body[at..arrived], max_data) {
            Err(_) => return,
            Ok(ChunkStep::Data(range)) => {
                assert!(range.start == 0 && range.end > 0 && range.end <= arrived - at);
                assert!(range.end <= max_data);
                at += range.end;
            }
            Ok(ChunkStep::Framing(n)) => {
                assert!(
                    n > 0 && n <= arrived - at,
                    "framing {n} of {}",
                    arrived - at
                );
                at += n;
            }
            Ok(ChunkStep::Done(n)) => {
                assert!(n <= arrived - at);
                return;
            }
            Ok(ChunkStep::NeedMore) => {
                let Some(next) = cuts.next() else { return };
                let next = next.min(body.len()).max(arrived);
                if next == arrived && arrived == body.len() {
                    return;
                }
                arrived = next;
            }
        }
    }
}
