//! Fair transmit when the NIC takes fewer frames per poll than sockets want to send.
//!
//! smoltcp serves sockets in the order of its socket set and stops at the first socket the
//! device has no frame for. With a small per-poll budget (an e1000's 256 descriptors take 36
//! worst-case frames) and more busy sockets than that ahead in the set, the sockets behind
//! them were never reached while the busy ones kept sending: a listening socket that had
//! taken a SYN sent no SYN-ACK (and no retransmission) until the load dropped, so clients
//! retransmitted SYNs for seconds and gave up (the issue-11 soak on e1000). These tests
//! build that order on purpose: bulk senders first in the set, then the socket under test.

mod common;

use common::*;
use pagecache::OpenOptions;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;
use softnic::SoftNicConfig;

/// Bulk connections, more than the 8 frames the NIC below takes per poll.
const BULK: usize = 12;
const FILE: usize = 4 << 20;

/// A peer socket connecting to the stack from `port`. Its 16 KiB window keeps what a bulk
/// connection has in flight to about 11 frames, so the frames of all of them together fit
/// the stack's header slots: the NIC is the bottleneck, not the stack's memory.
fn client(bed: &mut Bed, port: u16) -> SocketHandle {
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 16 * 1024]),
        tcp::SocketBuffer::new(vec![0; 4096]),
    );
    let handle = bed.peer_sockets.add(socket);
    let remote = (
        IpAddress::from(smoltcp::wire::Ipv4Address::from(STACK_IP)),
        SERVER_PORT,
    );
    let cx = bed.peer_iface.context();
    bed.peer_sockets
        .get_mut::<tcp::Socket>(handle)
        .connect(cx, remote, port)
        .unwrap();
    handle
}

/// One step of both sides, the clients reading everything that arrived: bytes each got.
fn step_draining(bed: &mut Bed, clients: &[SocketHandle], received: &mut [u64]) {
    bed.step();
    let mut buf = vec![0u8; 256 * 1024];
    for (handle, got) in clients.iter().zip(received.iter_mut()) {
        let socket = bed.peer_sockets.get_mut::<tcp::Socket>(*handle);
        while socket.can_recv() {
            *got += socket.recv_slice(&mut buf).unwrap() as u64;
        }
    }
}

#[test]
fn every_socket_transmits_while_more_sockets_are_busy_than_a_poll_can_send() {
    // 32 descriptors, 4 per worst-case frame: 8 frames a poll. Without TSO, so the bulk
    // transfers last seconds of virtual time.
    let nic = SoftNicConfig {
        tx_descriptors: 32,
        ..SoftNicConfig::default()
    };
    let mut config = BedConfig::new(nic, FILE + (8 << 20));
    config.stack.tx.tso = false;
    let mut bed = Bed::new(config);
    bed.stack.listen(SERVER_PORT).unwrap();
    let data = pattern(FILE, 11);
    let path = bed.write_file("bulk", &data);
    let file = bed.cache.open(&path, OpenOptions::read_only()).unwrap();

    // The bulk connections, accepted one after the other: they take the first places in
    // the socket set, the listening sockets that replace them come after.
    let mut clients = Vec::new();
    for i in 0..BULK {
        clients.push(client(&mut bed, 50_000 + i as u16));
        let mut conn = None;
        bed.run_until(10_000, |bed| {
            conn = bed.stack.poll_events().find_map(|e| match e {
                netstack::Event::Accepted { conn, .. } => Some(conn),
                _ => None,
            });
            conn.is_some()
        });
        let conn = conn.expect("bulk connection accepted");
        let pin = file.pin(0..FILE as u64).unwrap();
        bed.stack.send_file(conn, &pin, 0..FILE as u64).unwrap();
    }
    let mut received = vec![0u64; BULK];
    let warm_up = bed.now + smoltcp::time::Duration::from_millis(300);
    while bed.now < warm_up {
        step_draining(&mut bed, &clients, &mut received);
    }
    assert!(
        received.iter().all(|&n| n < FILE as u64),
        "the transfers must still run for the test to mean anything: {received:?}"
    );
    assert!(
        received.iter().all(|&n| n > 0),
        "bulk connections starved by those ahead of them in the socket set: bytes received {received:?}"
    );

    // A new client: its SYN lands on a listening socket behind every bulk connection.
    let late = client(&mut bed, 60_000);
    let asked = bed.now;
    let limit = asked + smoltcp::time::Duration::from_secs(30);
    while bed.peer_sockets.get::<tcp::Socket>(late).state() != tcp::State::Established {
        assert!(bed.now < limit, "the late client never got a SYN-ACK");
        step_draining(&mut bed, &clients, &mut received);
    }
    let took = bed.now - asked;
    assert!(
        received.iter().any(|&n| n < FILE as u64),
        "the bulk transfers ended before the handshake: not a test of starvation"
    );
    assert!(
        took < smoltcp::time::Duration::from_millis(100),
        "the handshake took {took} while bulk connections kept every poll's frames busy"
    );
    assert_eq!(bed.stack.stats().tx_dropped_no_buffer, 0);
}
