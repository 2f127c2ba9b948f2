//! End-to-end transfers through the software NIC to a stock smoltcp peer.

mod common;

use common::*;
use driver::{Capabilities, TsoHeaders};
use netstack::{Congestion, Event, SendOutcome};
use pagecache::OpenOptions;
use softnic::{DmaTiming, Impairments, SoftNicConfig};

fn lossy_nic(probability: f64) -> SoftNicConfig {
    SoftNicConfig {
        to_peer: Impairments::uniform(probability, 0x1111),
        to_nic: Impairments::uniform(probability, 0x2222),
        ..SoftNicConfig::default()
    }
}

fn wait_for_completion(bed: &mut Bed, events: &mut Vec<Event>) -> Option<SendOutcome> {
    let found = |events: &Vec<Event>| {
        events.iter().find_map(|e| match e {
            Event::SendComplete { outcome, .. } => Some(*outcome),
            _ => None,
        })
    };
    bed.run_until(200_000, |bed| {
        events.extend(bed.stack.poll_events());
        found(events).is_some()
    });
    found(events)
}

/// Asserts the peer received exactly `data`, then waits for the send to be acknowledged;
/// returns every event seen.
fn intact_and_acknowledged(bed: &mut Bed, received: Received, data: &[u8]) -> Vec<Event> {
    assert_eq!(received.bytes, data.len() as u64);
    assert_eq!(received.mismatched_bytes, 0);
    assert_eq!(
        received.sha256,
        sha256(data),
        "sha256 of what the peer received"
    );
    let mut events = received.events;
    assert_eq!(
        wait_for_completion(bed, &mut events),
        Some(SendOutcome::Acknowledged)
    );
    events
}

#[test]
fn transfer_64mib_with_loss_reordering_and_duplication_arrives_intact() {
    const LEN: usize = 64 << 20;
    let data = pattern(LEN, 64);
    let mut config = BedConfig::new(lossy_nic(0.02), LEN + (8 << 20));
    config.capture_stream_len = Some(LEN);
    let mut bed = Bed::new(config);
    let (file, conn) = bed.open_and_connect("big", &data);
    let pin = file.pin(0..LEN as u64).unwrap();
    let send_id = bed.stack.send_file(conn, &pin, 0..LEN as u64).unwrap();
    drop(pin); // the stack holds its own sub-pins
    let started = std::time::Instant::now();
    let received = bed.receive_all(&data, |_, _| {});
    let elapsed = started.elapsed();
    let events = intact_and_acknowledged(&mut bed, received, &data);
    assert!(events.contains(&Event::SendComplete {
        conn,
        send_id,
        outcome: SendOutcome::Acknowledged
    }));

    let stats = bed.stack.stats();
    let nic = bed.stack.nic().counters();
    eprintln!(
        "{:.2?} wall, {} polls, stack {stats:#?}\nnic {nic:#?}",
        elapsed, bed.iterations
    );
    assert_eq!(
        stats.payload_bytes_copied, 0,
        "file payload never copied by the CPU"
    );
    assert_eq!(stats.file_bytes_sent, LEN as u64);
    assert_eq!(
        stats.placeholder_bytes_copied, 0,
        "smoltcp left every placeholder payload unwritten, retransmissions too \
         (PacketMeta::tcp_payload_by_device, third_party/smoltcp)"
    );
    assert_eq!(stats.tx_unmapped_drops, 0);
    assert_eq!(
        stats.pins_held_now, 0,
        "every pin released after ACK and DMA"
    );
    assert!(
        stats.retransmitted_bytes > 0,
        "2% loss must cause retransmissions"
    );
    assert!(
        nic.lost > 0 && nic.duplicated > 0 && nic.reordered > 0,
        "{nic:?}"
    );
    assert!(nic.tso_frames > 0, "TSO was used");
    assert_eq!(nic.dma_faults, 0);

    let capture = bed.capture.as_ref().unwrap().lock().unwrap();
    assert!(capture.compared_bytes > 0, "retransmissions were compared");
    assert_eq!(
        capture.differing_bytes, 0,
        "retransmissions byte-identical to first transmissions"
    );
    eprintln!("retransmitted bytes compared: {}", capture.compared_bytes);
    assert_eq!(bed.cache.stats().pinned_pages_now, 0);
}

#[test]
fn zero_copy_tso_with_whole_packet_headers_arrives_intact() {
    // The NIC takes TSO headers the virtio-net way: headers of the large packet, valid IPv4
    // checksum, pseudo-header sum over the whole TCP length. Segments whose checksums came
    // out wrong would be dropped by the peer, and the transfer could not complete.
    const LEN: usize = 16 << 20;
    let data = pattern(LEN, 16);
    let mut nic = SoftNicConfig::default();
    nic.capabilities.tso_headers = TsoHeaders::WholePacket;
    let mut bed = Bed::new(BedConfig::new(nic, LEN + (4 << 20)));
    assert!(bed.stack.tso_frame().is_some(), "TSO in use");
    let (file, conn) = bed.open_and_connect("f", &data);
    let pin = file.pin(0..LEN as u64).unwrap();
    bed.stack.send_file(conn, &pin, 0..LEN as u64).unwrap();
    drop(pin);
    let received = bed.receive_all(&data, |_, _| {});
    intact_and_acknowledged(&mut bed, received, &data);
    let stats = bed.stack.stats();
    assert_eq!(
        stats.payload_bytes_copied, 0,
        "file payload never copied by the CPU"
    );
    assert_eq!(stats.software_checksum_bytes, 0, "the NIC checksummed");
    assert_eq!(
        stats.retransmitted_bytes, 0,
        "a perfect wire: no segment was dropped for a bad checksum"
    );
    let nic = bed.stack.nic().counters();
    assert!(nic.tso_frames > 0, "TSO was used");
    assert_eq!((nic.bad_frames, nic.dma_faults), (0, 0));
    assert_eq!(bed.stack.stats().pins_held_now, 0);
}

#[test]
fn software_checksums_and_mss_segmentation_when_the_nic_has_no_offloads() {
    const LEN: usize = 3 << 20;
    let data = pattern(LEN, 3);
    let mut nic = lossy_nic(0.01);
    nic.capabilities = Capabilities {
        ipv4_header_checksum: false,
        tcp_checksum: false,
        udp_checksum: false,
        tso_max_frame: None,
        tso_headers: TsoHeaders::PerSegment,
        ..nic.capabilities
    };
    let mut bed = Bed::new(BedConfig::new(nic, LEN + (4 << 20)));
    assert_eq!(bed.stack.tso_frame(), None);
    let (file, conn) = bed.open_and_connect("f", &data);
    let header = b"HTTP/1.1 200 OK\r\nContent-Length: 3145728\r\n\r\n";
    assert_eq!(bed.stack.send(conn, header).unwrap(), header.len());
    let pin = file.pin(1000..LEN as u64).unwrap();
    bed.stack.send_file(conn, &pin, 1000..LEN as u64).unwrap();
    bed.stack.send(conn, b"trailer").unwrap();
    drop(pin);
    let mut expected = header.to_vec();
    expected.extend_from_slice(&data[1000..]);
    expected.extend_from_slice(b"trailer");
    let received = bed.receive_all(&expected, |_, _| {});
    assert_eq!(received.sha256, sha256(&expected));
    let stats = bed.stack.stats();
    assert_eq!(
        stats.payload_bytes_copied,
        (header.len() + 7) as u64,
        "only the send() bytes"
    );
    assert!(stats.software_checksum_bytes >= expected.len() as u64);
    let nic = bed.stack.nic().counters();
    assert_eq!(nic.tso_frames, 0);
    assert!(nic.lost > 0);
}

/// Without TSO the stack cuts smoltcp's 64 KiB segments into MSS-sized frames itself (GSO):
/// byte-exact through 1% loss, every wire frame within the MTU, with the IPv4 and TCP
/// checksums the peer verifies, and far fewer segments for smoltcp to build. Switched off
/// (`TxConfig::gso`), smoltcp builds one segment per MSS: the count assertion fails.
#[test]
fn without_tso_large_segments_are_cut_into_mss_frames_byte_exact() {
    const LEN: usize = 4 << 20;
    let data = pattern(LEN, 21);
    for (gso, software_checksum) in [(true, false), (true, true), (false, false)] {
        let mut nic = lossy_nic(0.01);
        nic.capabilities = Capabilities {
            tcp_checksum: !software_checksum,
            tso_max_frame: None,
            ..nic.capabilities
        };
        let mut config = BedConfig::new(nic, LEN + (4 << 20));
        config.stack.tx.gso = gso;
        config.capture_stream_len = Some(LEN);
        let mut bed = Bed::new(config);
        assert_eq!(bed.stack.tso_frame(), None);
        let conn = bed.connect_and_send_file("f", &data);
        bed.stack.close(conn).unwrap();
        let received = bed.receive_all(&data, |_, _| {});
        intact_and_acknowledged(&mut bed, received, &data);
        let closed = bed.run_until(10_000, |bed| !bed.peer_socket().may_recv());
        assert!(closed, "the FIN arrived on the last piece");
        {
            let capture = bed.capture.as_ref().unwrap().lock().unwrap();
            assert_eq!(capture.differing_bytes, 0, "retransmissions byte-identical");
        }
        let stats = bed.stack.stats();
        let nic = bed.stack.nic().counters();
        eprintln!(
            "gso {gso}, software checksum {software_checksum}: smoltcp built {} frames, {} on the wire, {} GSO segments cut into {} frames",
            stats.frames_tx, nic.wire_frames, stats.gso_segments, stats.gso_frames
        );
        assert_eq!((nic.tso_frames, nic.mtu_drops, nic.bad_frames), (0, 0, 0));
        assert_eq!(stats.payload_bytes_copied, 0, "zero-copy all the same");
        assert_eq!(stats.tx_unmapped_drops, 0);
        let data_frames_at_mss = (LEN / 1460) as u64;
        if gso {
            assert!(stats.gso_frames >= data_frames_at_mss);
            assert!(
                stats.frames_tx < data_frames_at_mss / 4,
                "smoltcp built {} frames for {} MSS-sized ones",
                stats.frames_tx,
                stats.gso_frames
            );
        } else {
            assert_eq!(stats.gso_segments, 0);
            assert!(stats.frames_tx >= data_frames_at_mss);
        }
        assert_eq!(bed.cache.stats().pinned_pages_now, 0);
    }
}

#[test]
fn close_after_send_delivers_everything_then_fin() {
    let data = pattern(200_000, 9);
    let mut bed = Bed::new(BedConfig::new(SoftNicConfig::default(), 1 << 20));
    let conn = bed.connect_and_send_file("f", &data);
    bed.stack.close(conn).unwrap();
    assert!(bed.stack.send(conn, b"x").is_err(), "no sends after close");
    let received = bed.receive_all(&data, |_, _| {});
    assert_eq!(received.sha256, sha256(&data));
    let closed = bed.run_until(10_000, |bed| !bed.peer_socket().may_recv());
    assert!(closed, "the peer saw our FIN");
    bed.peer_socket().close();
    let mut events = received.events;
    let done = bed.run_until(100_000, |bed| {
        events.extend(bed.stack.poll_events());
        events.contains(&Event::Closed { conn })
    });
    assert!(done);
    assert_eq!(bed.stack.stats().pins_held_now, 0);
}

#[test]
fn abort_releases_pins_and_reports_the_send_aborted() {
    const LEN: usize = 8 << 20;
    let data = pattern(LEN, 5);
    let mut bed = Bed::new(BedConfig::new(SoftNicConfig::default(), LEN + (2 << 20)));
    let (file, conn) = bed.open_and_connect("f", &data);
    let pin = file.pin(0..LEN as u64).unwrap();
    let send_id = bed.stack.send_file(conn, &pin, 0..LEN as u64).unwrap();
    drop(pin);
    // Let a few MiB go, then reset.
    let received = bed.receive_all(&data[..2 << 20], |_, _| {});
    assert!(received.bytes >= 2 << 20);
    assert!(bed.stack.stats().pins_held_now > 0);
    bed.stack.abort(conn).unwrap();
    let mut events = received.events;
    assert_eq!(
        wait_for_completion(&mut bed, &mut events),
        Some(SendOutcome::Aborted)
    );
    assert!(events.contains(&Event::SendComplete {
        conn,
        send_id,
        outcome: SendOutcome::Aborted
    }));
    bed.run_until(1000, |bed| bed.stack.stats().frames_in_flight_now == 0);
    assert_eq!(bed.stack.stats().pins_held_now, 0);
    assert_eq!(
        bed.cache.stats().pinned_pages_now,
        0,
        "the page cache got every page back"
    );
}

/// A bed whose NIC does DMA only when the test steps it, with `data` queued on an accepted
/// connection (the device ran for the handshake only).
fn sending_on_a_stopped_device(data: &[u8], send_stall_timeout: Option<netstack::Duration>) -> Bed {
    let nic = SoftNicConfig {
        dma_timing: DmaTiming::Manual,
        ..SoftNicConfig::default()
    };
    let mut config = BedConfig::new(nic, 2 << 20);
    config.stack.send_stall_timeout = send_stall_timeout;
    let mut bed = Bed::new(config);
    let path = bed.write_file("f", data);
    let file = bed.cache.open(&path, OpenOptions::read_only()).unwrap();
    let conn = bed.connect_with_device_running();
    let pin = file.pin(0..data.len() as u64).unwrap();
    bed.stack
        .send_file(conn, &pin, 0..data.len() as u64)
        .unwrap();
    bed
}

#[test]
fn pins_are_held_until_the_device_has_read_the_frames() {
    let data = pattern(256 * 1024, 11);
    // The device is stopped on purpose for many (simulated) retransmission timeouts.
    let mut bed = sending_on_a_stopped_device(&data, None);
    for _ in 0..20 {
        bed.step(); // the device never runs: nothing is read, nothing acknowledged
    }
    let stats = bed.stack.stats();
    assert!(stats.frames_in_flight_now > 0);
    assert!(bed.stack.nic().pending_dma() > 0);
    assert_eq!(
        stats.pins_held_now, 4,
        "256 KiB = 4 chunks, all still pinned"
    );
    // Now let the device run as things go.
    let received = bed.receive_all(&data, |bed, _| {
        bed.stack.nic_mut().device_step(usize::MAX);
    });
    assert_eq!(received.sha256, sha256(&data));
    let mut events = received.events;
    bed.run_until(100_000, |bed| {
        bed.stack.nic_mut().device_step(usize::MAX);
        events.extend(bed.stack.poll_events());
        events
            .iter()
            .any(|e| matches!(e, Event::SendComplete { .. }))
    });
    assert_eq!(bed.stack.stats().pins_held_now, 0);
}

#[test]
fn a_connection_without_send_progress_is_aborted_and_its_pins_released() {
    let data = pattern(256 * 1024, 11);
    let mut bed = sending_on_a_stopped_device(&data, Some(netstack::Duration::from_secs(30)));
    // The device never runs: nothing is read, nothing acknowledged, and simulated time
    // runs through smoltcp's growing retransmission timeouts past the stall timeout.
    let mut events = Vec::new();
    bed.run_until(10_000, |bed| {
        events.extend(bed.stack.poll_events());
        bed.stack.stats().send_stall_aborts > 0
    });
    assert_eq!(bed.stack.stats().send_stall_aborts, 1);
    assert!(
        bed.stack.stats().pins_held_now < 4,
        "pins no descriptor reads are released at once"
    );
    // The frames the device still holds keep their pins until it has read them.
    assert!(bed.stack.stats().pins_held_now > 0);
    bed.run_until(10_000, |bed| {
        bed.stack.nic_mut().device_step(usize::MAX);
        events.extend(bed.stack.poll_events());
        bed.stack.stats().pins_held_now == 0
    });
    assert!(events.iter().any(|e| matches!(
        e,
        Event::SendComplete {
            outcome: SendOutcome::Aborted,
            ..
        }
    )));
    assert!(events.iter().any(|e| matches!(e, Event::Closed { .. })));
    assert_eq!(bed.cache.stats().pinned_pages_now, 0);
}

#[test]
fn answers_arp_and_icmp_echo() {
    use smoltcp::socket::icmp;
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress, Ipv4Address};
    let mut bed = Bed::new(BedConfig::new(SoftNicConfig::default(), 1 << 20));
    let rx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 1024]);
    let tx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 1024]);
    let mut socket = icmp::Socket::new(rx, tx);
    socket.bind(icmp::Endpoint::Ident(0x1234)).unwrap();
    let handle = bed.peer_sockets.add(socket);
    let target = IpAddress::from(Ipv4Address::from(STACK_IP));
    let request = Icmpv4Repr::EchoRequest {
        ident: 0x1234,
        seq_no: 1,
        data: b"zerosend ping",
    };
    let mut replied = false;
    let mut sent = false;
    bed.run_until(10_000, |bed| {
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let socket = bed.peer_sockets.get_mut::<icmp::Socket>(handle);
        if !sent && socket.can_send() {
            let buf = socket.send(request.buffer_len(), target).unwrap();
            request.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps);
            sent = true;
        }
        if let Ok((payload, from)) = socket.recv() {
            let packet = Icmpv4Packet::new_checked(payload).unwrap();
            let repr = Icmpv4Repr::parse(&packet, &caps).unwrap();
            replied = from == target
                && repr
                    == Icmpv4Repr::EchoReply {
                        ident: 0x1234,
                        seq_no: 1,
                        data: b"zerosend ping",
                    };
        }
        replied
    });
    assert!(replied, "echo reply from the stack (after ARP resolution)");
}

/// A client that reconnects from the same port right after the server closed (our side
/// went through TIME-WAIT): every connection is a new incarnation of the same 4-tuple. Each
/// must be accepted at once and carry exactly its own bytes (no placeholder, no byte of an
/// older incarnation), and nothing may leak across the 20 rounds.
#[test]
fn reconnecting_from_the_same_port_after_our_close_is_served_byte_exact() {
    let data = pattern(100_000, 17);
    let mut bed = Bed::new(BedConfig::new(SoftNicConfig::default(), 1 << 20));
    let path = bed.write_file("f", &data);
    let file = bed.cache.open(&path, OpenOptions::read_only()).unwrap();
    bed.stack.listen(SERVER_PORT).unwrap();
    for round in 0..20 {
        let started = bed.now;
        bed.peer_connect(40001);
        let mut conn = None;
        bed.run_until(100_000, |bed| {
            conn = conn.or(bed.stack.poll_events().find_map(|e| match e {
                Event::Accepted { conn, .. } => Some(conn),
                _ => None,
            }));
            conn.is_some()
        });
        let conn = conn.unwrap_or_else(|| panic!("round {round}: not accepted"));
        let pin = file.pin(0..data.len() as u64).unwrap();
        bed.stack
            .send_file(conn, &pin, 0..data.len() as u64)
            .unwrap();
        bed.stack.close(conn).unwrap(); // the server closes first: our side ends in TIME-WAIT
        let received = bed.receive_all(&data, |_, _| {});
        assert_eq!(received.sha256, sha256(&data), "round {round}");
        assert!(bed.run_until(10_000, |bed| !bed.peer_socket().may_recv()));
        bed.peer_socket().close();
        assert!(bed.run_until(10_000, |bed| {
            bed.stack.poll_events().count();
            !bed.peer_socket().is_open() && bed.stack.stats().pins_held_now == 0
        }));
        // (The first round includes the peer's ARP resolution, retried after 1 s.)
        assert!(
            round == 0 || bed.now - started < netstack::Duration::from_secs(1),
            "round {round} took {} (simulated)",
            bed.now - started
        );
    }
    let stats = bed.stack.stats();
    assert_eq!(stats.tx_unmapped_drops, 0);
    assert_eq!(stats.pins_held_now, 0);
    assert_eq!(bed.cache.stats().pinned_pages_now, 0);
}

/// Six clients connect at once to a listener with two sockets: the SYNs beyond the free
/// listening sockets are dropped (and counted), not reset, so every client gets in when it
/// retries. With the check switched off smoltcp answers them with RSTs and those clients'
/// connections fail.
#[test]
fn syns_beyond_the_backlog_are_dropped_for_a_retry_not_reset() {
    let mut config = BedConfig::new(SoftNicConfig::default(), 1 << 20);
    config.stack.backlog = 2;
    let mut bed = Bed::new(config);
    bed.stack.listen(SERVER_PORT).unwrap();
    let remote = (
        smoltcp::wire::IpAddress::from(smoltcp::wire::Ipv4Address::from(STACK_IP)),
        SERVER_PORT,
    );
    let mut clients = vec![bed.peer_socket];
    for _ in 1..6 {
        let socket = smoltcp::socket::tcp::Socket::new(
            smoltcp::socket::tcp::SocketBuffer::new(vec![0; 4096]),
            smoltcp::socket::tcp::SocketBuffer::new(vec![0; 4096]),
        );
        clients.push(bed.peer_sockets.add(socket));
    }
    for (i, &handle) in clients.iter().enumerate() {
        let cx = bed.peer_iface.context();
        bed.peer_sockets
            .get_mut::<smoltcp::socket::tcp::Socket>(handle)
            .connect(cx, remote, 41000 + i as u16)
            .unwrap();
    }
    let mut accepted = 0;
    let all_in = bed.run_until(200_000, |bed| {
        accepted += bed
            .stack
            .poll_events()
            .filter(|e| matches!(e, Event::Accepted { .. }))
            .count();
        accepted == clients.len()
    });
    let states: Vec<_> = clients
        .iter()
        .map(|&h| {
            bed.peer_sockets
                .get::<smoltcp::socket::tcp::Socket>(h)
                .state()
        })
        .collect();
    assert!(
        all_in,
        "accepted {accepted} of {}; clients: {states:?}",
        clients.len()
    );
    assert!(
        states
            .iter()
            .all(|s| *s == smoltcp::socket::tcp::State::Established),
        "{states:?}"
    );
    assert!(
        bed.stack.stats().rx_syns_over_backlog > 0,
        "the backlog was never full: the test shows nothing"
    );
}

#[test]
fn slow_start_counts_bytes_so_a_peer_acking_whole_tso_frames_still_opens_the_window() {
    // The software NIC hands its peer each TSO frame whole (as a TAP device hands a Linux
    // host one), and the peer acknowledges it with one ACK. Growing the window one MSS per
    // ACK (smoltcp's Cubic) then opens it linearly; counting bytes doubles it per round
    // trip. Simulated time to move 8 MiB, each mode on its own bed.
    const LEN: usize = 8 << 20;
    let data = pattern(LEN, 21);
    let mut millis = Vec::new();
    for congestion in [Congestion::ByteCounting, Congestion::SmoltcpCubic] {
        let mut config = BedConfig::new(SoftNicConfig::default(), LEN + (4 << 20));
        config.stack.congestion = congestion;
        let mut bed = Bed::new(config);
        assert!(bed.stack.tso_frame().is_some(), "TSO in use");
        let (file, conn) = bed.open_and_connect("f", &data);
        let pin = file.pin(0..LEN as u64).unwrap();
        let start = bed.now;
        bed.stack.send_file(conn, &pin, 0..LEN as u64).unwrap();
        drop(pin);
        let received = bed.receive_all(&data, |_, _| {});
        millis.push((bed.now - start).total_millis());
        intact_and_acknowledged(&mut bed, received, &data);
    }
    eprintln!(
        "8 MiB in {} ms (byte counting), {} ms (smoltcp's Cubic)",
        millis[0], millis[1]
    );
    assert!(
        millis[0] * 3 < millis[1],
        "byte counting should take under a third of the time: {millis:?}"
    );
}
