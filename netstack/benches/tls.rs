//! TLS record benchmarks: the AEAD backends on 16 KiB records (which one is the default is
//! decided here), and the record path against the bare seal of the same bytes.
//!
//! `cargo bench -p netstack --bench tls`. Prints figures; asserts nothing about time (the
//! machine is shared and loaded: figures are lower bounds).

use std::hint::black_box;
use std::time::{Duration, Instant};

use netstack::tls::aead::{new_aead, Algorithm, Backend, RecordAead};

const RECORD: usize = 16 * 1024;

/// Runs `f` (which processes `bytes` bytes) for about `time`; returns GB/s.
fn rate(bytes: usize, time: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..16 {
        f(); // warm up
    }
    let started = Instant::now();
    let mut rounds = 0u64;
    while started.elapsed() < time {
        for _ in 0..64 {
            f();
        }
        rounds += 64;
    }
    (rounds as f64 * bytes as f64) / started.elapsed().as_secs_f64() / 1e9
}

fn aead_figures(time: Duration) {
    let plaintext: Vec<u8> = (0..RECORD + 1).map(|i| (i * 7) as u8).collect();
    // Four page-sized pieces and the type byte, as a record of pinned pages arrives.
    let pieces: Vec<&[u8]> = plaintext.chunks(4096).collect();
    let aad = [0x17, 3, 3, 0x40, 0x11];
    let nonce = [7u8; 12];
    for algorithm in [Algorithm::Aes128Gcm, Algorithm::Aes256Gcm] {
        for backend in [Backend::Ring, Backend::AesGcm] {
            let aead: Box<dyn RecordAead> =
                new_aead(backend, algorithm, &vec![5; algorithm.key_len()]).unwrap();
            let mut buf = plaintext.clone();
            let in_place = rate(buf.len(), time, || {
                black_box(aead.seal_in_place(&nonce, &aad, black_box(&mut buf)));
            });
            let mut out = vec![0u8; plaintext.len()];
            let scattered = rate(out.len(), time, || {
                black_box(aead.seal_pieces(&nonce, &aad, black_box(&pieces), &mut out));
            });
            let mut slice = vec![0u8; 1448];
            let ctr = rate(slice.len(), time, || {
                aead.ctr_xor(
                    &nonce,
                    9000,
                    &plaintext[9000..9000 + 1448],
                    black_box(&mut slice),
                );
            });
            let ghash = rate(out.len(), time, || {
                black_box(aead.tag_of(&nonce, &aad, black_box(&out)));
            });
            println!(
                "aead {algorithm:?} {backend:?}: seal 16 KiB in place {in_place:.2} GB/s, \
                 seal 4 pages out of place {scattered:.2} GB/s, CTR slice 1448 B at 9000 \
                 {ctr:.2} GB/s, tag (GHASH) {ghash:.2} GB/s"
            );
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this once, briefly.
    let quick = !std::env::args().any(|a| a == "--bench");
    let time = if quick {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(700)
    };
    aead_figures(time);
}
