//! TLS record benchmarks: the AEAD backends on 16 KiB records (which one is the default is
//! decided here), and the record path against the bare seal of the same bytes.
//!
//! `cargo bench -p netstack --bench tls`. Prints figures; asserts nothing about time (the
//! machine is shared and loaded: figures are lower bounds).

use std::hint::black_box;
use std::time::{Duration, Instant};

use driver::dma::ChunkPool;
use netstack::dmabuf::BufferPool;
use netstack::sendq::{SendMode, SendQueue};
use netstack::tls::aead::{new_aead, Algorithm, Backend, RecordAead};
use netstack::tls::tx::{TlsFault, TlsTx, TrafficKey};
use netstack::{SendId, StackStats};
use pagecache::{CacheConfig, FrameArena, OpenOptions, PageCache};
use softnic::{SoftNic, SoftNicConfig};

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
                "aead {algorithm:?} {backend:?}: seal 16 KiB in place {in_place:.3} GB/s, \
                 seal 4 pages out of place {scattered:.3} GB/s, CTR slice 1448 B at 9000 \
                 {ctr:.3} GB/s, tag (GHASH) {ghash:.3} GB/s"
            );
        }
    }
}

/// The record path as the device boundary runs it, without TCP: a pinned file framed into
/// records, every frame's TLS bytes built from the pins into a frame buffer and written
/// into a DMA buffer. Against the bare AEAD sealing the same bytes as 16 KiB records from
/// one contiguous buffer, in place, in the same run.
fn record_path_figures(time: Duration) {
    const LEN: usize = 16 << 20;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 13 % 251) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, &data).unwrap();
    let arena = FrameArena::anonymous(0x4000_0000, LEN + (4 << 20)).unwrap();
    let cache = PageCache::new(arena, CacheConfig::default()).unwrap();
    let file = cache.open(&path, OpenOptions::read_only()).unwrap();
    let pin = file.pin(0..LEN as u64).unwrap();
    let (nic, _peer) = SoftNic::new(SoftNicConfig::default()).unwrap();
    let cipher_pool = BufferPool::new(driver::NetQueue::dma(&nic), 1, 64 * 1024).unwrap();
    let mut cipher = cipher_pool.take().unwrap();
    // What the device boundary writes into now: a DMA chunk lent as `&mut [u8]`.
    let chunk_pool = ChunkPool::new(driver::NetQueue::dma(&nic), 1, 64 * 1024).unwrap();
    let mut chunk = chunk_pool.take().unwrap();
    let mut frame = vec![0u8; 64 * 1024];
    let mut scratch = Vec::new();

    for algorithm in [Algorithm::Aes128Gcm, Algorithm::Aes256Gcm] {
        for backend in [Backend::Ring, Backend::AesGcm] {
            let key = vec![3u8; algorithm.key_len()];
            let fresh = || {
                let mut q = SendQueue::new(SendMode::ZeroCopy, usize::MAX);
                q.push_file(&pin, 0..LEN as u64, SendId(1));
                let mut tx = TlsTx::new(TlsFault::None);
                tx.install_key(
                    TrafficKey::new(0, backend, algorithm, &key, &[9; 12]).unwrap(),
                    0,
                );
                while tx.frame_data(&mut q) > 0 {}
                (q, tx)
            };
            // 45 segments of 1448 bytes (what smoltcp builds for a 64 KiB TSO frame):
            // records split across frames; and 3 records per frame (aligned).
            let framings = [("TSO 65160 B", 45 * 1448), ("3 records", 3 * 16406)];
            // `direct`: built straight into the DMA chunk (the device boundary now); else
            // into a frame buffer, then copied into a DMA buffer (before the lend existed).
            for ((label, frame_len), direct) in
                framings.into_iter().flat_map(|f| [(f, false), (f, true)])
            {
                let mut stats = StackStats::default();
                let mut passes = 0u64;
                let started = Instant::now();
                while started.elapsed() < time || passes == 0 {
                    let (q, mut tx) = fresh();
                    let mut at = 0;
                    while at < tx.framed_end {
                        // The first frame holds the small records of the connection start,
                        // so that in the aligned case every later frame holds whole records.
                        let small = netstack::tls::tx::SMALL_RECORDS
                            * (netstack::tls::tx::SMALL_RECORD + 22) as u64;
                        let len = if at == 0 { small } else { frame_len as u64 };
                        let n = len.min(tx.framed_end - at) as usize;
                        let out = if direct {
                            &mut chunk.as_mut_slice()[..n]
                        } else {
                            &mut frame[..n]
                        };
                        tx.build(&q, at..at + n as u64, out, &mut scratch, &mut stats)
                            .unwrap();
                        if !direct {
                            cipher.write(0, &frame[..n]);
                            stats.tls_cpu_bytes_written += n as u64;
                        }
                        at += n as u64;
                    }
                    passes += 1;
                }
                let elapsed = started.elapsed().as_secs_f64();
                let path_rate = (passes * LEN as u64) as f64 / elapsed / 1e9;
                let writes = stats.tls_cpu_bytes_written as f64 / (passes * LEN as u64) as f64;

                // The bare AEAD on the same bytes, same run.
                let aead = new_aead(backend, algorithm, &key).unwrap();
                let mut contiguous = vec![0u8; 16 * 1024 + 1];
                let bare = rate(LEN, time, || {
                    for chunk in data.chunks(16 * 1024) {
                        let buf = &mut contiguous[..chunk.len() + 1];
                        buf[..chunk.len()].copy_from_slice(chunk);
                        buf[chunk.len()] = 23;
                        black_box(aead.seal_in_place(&[1; 12], &[23, 3, 3, 0x40, 0x11], buf));
                    }
                });
                let how = if direct {
                    "into the DMA chunk"
                } else {
                    "frame buffer + DMA copy"
                };
                println!(
                    "record path {algorithm:?} {backend:?} ({label} frames, {how}): \
                     {path_rate:.3} GB/s, bare seal (copy in + seal in place) {bare:.3} GB/s, \
                     ratio {:.2}; CPU bytes written per payload byte {writes:.2}",
                    path_rate / bare
                );
            }

            // The copy of a frame's TLS bytes into DMA memory (volatile writes), alone.
            let dma_copy = rate(64 * 1024, time / 4, || cipher.write(0, black_box(&frame)));
            println!("  of which: copy into the DMA buffer alone {dma_copy:.2} GB/s");

            // Retransmissions: 1448-byte slices recomputed from the pins (tags known).
            let (q, mut tx) = fresh();
            let mut stats = StackStats::default();
            let end = tx.framed_end;
            tx.build(
                &q,
                0..end.min(60_000),
                &mut frame[..60_000],
                &mut scratch,
                &mut stats,
            )
            .unwrap();
            let mut at = 0u64;
            let slice = rate(1448, time, || {
                at = (at + 7919) % 50_000;
                tx.build(
                    &q,
                    at..at + 1448,
                    &mut frame[..1448],
                    &mut scratch,
                    &mut stats,
                )
                .unwrap();
            });
            // The same slices as retransmissions with the audit on: each first recomputes
            // its record's tag over the pinned plaintext (a record seal). First
            // transmissions never pay it.
            tx.account_sent(0..60_000, &mut stats);
            tx.set_audit(true);
            let audited = rate(1448, time, || {
                at = (at + 7919) % 50_000;
                tx.build(
                    &q,
                    at..at + 1448,
                    &mut frame[..1448],
                    &mut scratch,
                    &mut stats,
                )
                .unwrap();
            });
            assert_eq!(stats.tls_audit_mismatches, 0);
            println!(
                "retransmission {algorithm:?} {backend:?}: 1448-byte slices rebuilt at {slice:.2} GB/s \
                 ({:.2} us each); with the audit {audited:.2} GB/s ({:.2} us each, {:.1}x)",
                1448.0 / slice / 1e3,
                1448.0 / audited / 1e3,
                slice / audited
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
    record_path_figures(time);
}
