//! The device boundary's frame parser (`netstack::frame::parse_tcp`, which reads every frame
//! smoltcp built and every received frame for the duplicate-SYN check) and its header edits,
//! on arbitrary bytes: no panic, and the offsets it returns lie inside the frame in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netstack::frame::{parse_tcp, ETHERNET_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Some(t) = parse_tcp(data) else { return };
    assert_eq!(t.ip, ETHERNET_HEADER_LEN);
    assert!(t.ip + 20 <= t.tcp && t.tcp + 20 <= t.header_len, "{t:?}");
    assert!(t.header_len + t.payload_len <= data.len(), "{t:?}");
    assert!(t.checksum_field() + 2 <= t.header_len, "{t:?}");
    assert_eq!(t.tcp_len(), t.header_len - t.tcp + t.payload_len);
    let _ = t.flow();
    let mut frame = data.to_vec();
    t.set_tcp_checksum(&mut frame, 0xabcd);
    t.set_ipv4_checksum(&mut frame, 0x1234);
    assert_eq!(
        &frame[t.checksum_field()..t.checksum_field() + 2],
        &[0xab, 0xcd]
    );
    assert_eq!(&frame[t.ip + 10..t.ip + 12], &[0x12, 0x34]);
    // Only the two checksum fields changed.
    let changed = frame.iter().zip(data).filter(|(a, b)| a != b).count();
    assert!(changed <= 4);
    // The edited frame still parses the same (checksums are not part of the layout).
    assert_eq!(parse_tcp(&frame), Some(t));
});
