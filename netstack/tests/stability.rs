//! Stable pages end to end: writers hammer the file while it is being sent.
//!
//! The same test runs twice. With copy-on-write writers the peer must receive exactly the
//! version pinned at send time and the page cache's audit must count no violation. With the
//! test-only `InPlaceUnsafe` policy (what Linux `sendfile` effectively allows) the same test
//! must detect the corruption: proof that the checks can fail.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use netstack::{Event, SendOutcome};
use pagecache::{OpenOptions, WritePolicy};
use softnic::{Impairments, SoftNicConfig};

const LEN: usize = 16 << 20;

struct Outcome {
    received_matches_pinned_version: bool,
    mismatched_bytes: u64,
    audit_violations: u64,
    audit_checks: u64,
    cow_copies: u64,
    writes: u64,
    retransmits_identical: bool,
}

fn hammered_transfer(policy: WritePolicy) -> Outcome {
    let data = pattern(LEN, 77);
    let nic = SoftNicConfig {
        to_peer: Impairments::uniform(0.01, 0xabc),
        to_nic: Impairments::uniform(0.01, 0xdef),
        ..SoftNicConfig::default()
    };
    let mut config = BedConfig::new(nic, 3 * LEN + (4 << 20));
    config.audit = true;
    config.capture_stream_len = Some(LEN);
    let mut bed = Bed::new(config);
    let (file, conn) = bed.open_and_connect("hot", &data);
    let path = bed.dir.path().join("hot");

    // The version pinned at send time is what the peer must get.
    let pin = file.pin(0..LEN as u64).unwrap();
    let pinned_version = pin.to_vec();
    assert_eq!(pinned_version, data);
    bed.stack.send_file(conn, &pin, 0..LEN as u64).unwrap();
    drop(pin);

    // A writer thread hammers random pages for the whole transfer...
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (cache, path, stop, writes) = (
            bed.cache.clone(),
            path.clone(),
            stop.clone(),
            writes.clone(),
        );
        std::thread::spawn(move || {
            let file = cache.open(&path, OpenOptions::read_write(policy)).unwrap();
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let offset = x % (LEN as u64 - 512);
                file.write(offset, &[0xa5; 512]).unwrap();
                writes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    // ...and the main loop writes just ahead of what the peer has received (pages that are
    // pinned and not yet sent), deterministically.
    let near_writer = bed
        .cache
        .open(&path, OpenOptions::read_write(policy))
        .unwrap();
    let mut round = 0u64;
    let received = bed.receive_all(&pinned_version, |_, received| {
        round += 1;
        if round.is_multiple_of(16) {
            let offset = (received + 256 * 1024).min(LEN as u64 - 64);
            near_writer.write(offset, &[0x5a; 64]).unwrap();
            writes.fetch_add(1, Ordering::Relaxed);
        }
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(received.bytes, LEN as u64);

    let mut events = received.events;
    bed.run_until(200_000, |bed| {
        events.extend(bed.stack.poll_events());
        events
            .iter()
            .any(|e| matches!(e, Event::SendComplete { .. }))
    });
    assert!(events.iter().any(|e| matches!(
        e,
        Event::SendComplete {
            outcome: SendOutcome::Acknowledged,
            ..
        }
    )));
    assert_eq!(bed.stack.stats().pins_held_now, 0);
    // Every pinned page has been released, so the audit has checked each one.
    let cache_stats = bed.cache.stats();
    let capture = bed.capture.as_ref().unwrap().lock().unwrap();
    let outcome = Outcome {
        received_matches_pinned_version: received.sha256 == sha256(&pinned_version),
        mismatched_bytes: received.mismatched_bytes,
        audit_violations: cache_stats.audit_violations,
        audit_checks: cache_stats.audit_checks,
        cow_copies: cache_stats.cow_copies,
        writes: writes.load(Ordering::Relaxed),
        retransmits_identical: capture.differing_bytes == 0,
    };
    eprintln!(
        "{policy:?}: writes {} cow_copies {} audit checks {} violations {} mismatched bytes {} retransmit bytes compared {} differing {}",
        outcome.writes,
        outcome.cow_copies,
        outcome.audit_checks,
        outcome.audit_violations,
        outcome.mismatched_bytes,
        capture.compared_bytes,
        capture.differing_bytes
    );
    outcome
}

#[test]
fn copy_on_write_writers_never_change_what_is_sent() {
    let o = hammered_transfer(WritePolicy::CopyOnWrite);
    assert!(o.writes > 100, "the writers ran during the transfer");
    assert!(
        o.cow_copies > 0,
        "writes hit pinned pages and were redirected"
    );
    assert!(
        o.received_matches_pinned_version,
        "the peer got exactly the pinned version"
    );
    assert_eq!(o.mismatched_bytes, 0);
    assert!(o.audit_checks >= (LEN / 4096) as u64);
    assert_eq!(o.audit_violations, 0);
    assert!(o.retransmits_identical);
}

#[test]
fn in_place_writes_are_detected_as_corruption() {
    let o = hammered_transfer(WritePolicy::InPlaceUnsafe);
    assert!(o.writes > 100);
    assert_eq!(o.cow_copies, 0);
    assert!(
        !o.received_matches_pinned_version || o.audit_violations > 0,
        "the same test must detect the corruption"
    );
    assert!(
        o.mismatched_bytes > 0,
        "the peer received bytes that are not the pinned version"
    );
    assert!(o.audit_violations > 0, "the audit saw pinned pages change");
}
