//! The placeholder poison scan can fail: with the device boundary deliberately broken (it
//! sends zero-copy segments as smoltcp built them, i.e. placeholder payload), the scan that
//! every SoftNic test runs over the wire (see `common::Bed`) finds the poison in every frame
//! from the poisoned span (`netstack::poison::POISON_SPAN`), and the peer receives wrong bytes. Needs `--features test-hooks` (the workspace test run enables it).

mod common;

use std::sync::atomic::Ordering;

use common::{pattern, sha256, Bed, BedConfig};
use netstack::BoundaryFault;
use softnic::SoftNicConfig;

fn send_file_over(fault: BoundaryFault) -> (Bed, bool, u64) {
    let data = pattern(300_000, 21);
    let mut config = BedConfig::new(SoftNicConfig::default(), 1 << 20);
    config.stack.tx.fault = fault;
    let mut bed = Bed::new(config);
    bed.connect_and_send_file("f", &data);
    let received = bed.receive_all(&data, |_, _| {});
    let intact = received.sha256 == sha256(&data);
    let poisoned = bed.poisoned_frames.load(Ordering::Relaxed);
    (bed, intact, poisoned)
}

#[test]
fn the_wire_scan_finds_no_poison_with_the_boundary_intact() {
    let (bed, intact, poisoned) = send_file_over(BoundaryFault::None);
    assert!(intact);
    assert_eq!(poisoned, 0);
    assert_eq!(bed.stack.stats().tx_unmapped_drops, 0);
}

#[test]
fn the_wire_scan_finds_poison_when_the_mapping_is_broken() {
    let (mut bed, intact, poisoned) = send_file_over(BoundaryFault::SendPlaceholders);
    bed.poison_expected = true;
    assert!(!intact, "the peer got placeholder bytes, not the file");
    // Every frame carrying stream bytes of the poisoned span (the first 64 KiB of the
    // connection) is caught by the scan; past it a leak is zeros, caught by the sha256.
    let mss = 1460;
    let span_frames = netstack::poison::POISON_SPAN / mss;
    assert!(
        poisoned >= span_frames,
        "every data frame of the poisoned span carries poison, and the scan sees it \
         ({poisoned} frames, {span_frames} expected)"
    );
}
