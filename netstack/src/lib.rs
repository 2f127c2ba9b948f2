//! zerosend's network stack: smoltcp 0.14 for IPv4 and IPv6 (dual stack), ARP, NDP, ICMP
//! and ICMPv6 echo, DHCP, SLAAC and the TCP state machine, over the driver queue API ([`driver::NetQueue`]), with **zero-copy file send**
//! from pinned page-cache pages.
//!
//! # How file data reaches the wire without a CPU copy
//! smoltcp cannot transmit scatter-gather and keeps unacknowledged data in its socket ring.
//! This stack keeps smoltcp's `tcp::Socket` for everything TCP decides (window, RTO,
//! retransmission, congestion control) but fills its send ring with *placeholder* bytes
//! that only account for stream positions. The real payload is described per connection by
//! a send queue of page-cache [`pagecache::Pin`]s (file data) and small copy-pool blocks
//! (`send` data). At the device boundary each TCP segment smoltcp built is parsed, its
//! sequence range mapped to the queue, and the NIC gets a descriptor chain: the headers from
//! a small DMA header slot, then the payload straight from the pinned page frames by IOVA.
//! Retransmissions map to the same pinned pages, so they carry identical bytes. See
//! `docs/architecture.md`, "Zero-copy transmit through smoltcp", for the decision and its
//! measured cost.
//!
//! # Lifetimes
//! A pin is released only when the NIC completed every descriptor reading it **and** TCP
//! acknowledged its bytes; then [`Event::SendComplete`] reports the `send_file`. Reset and
//! abort release everything not under DMA at once, the rest when its DMA completes.
//!
//! # Example (with the software NIC)
//! ```no_run
//! use netstack::{Instant, Ipv4Config, Stack, StackConfig, Event};
//! use softnic::{SoftNic, SoftNicConfig};
//! let (nic, _peer) = SoftNic::new(SoftNicConfig::default()).unwrap();
//! let config = StackConfig::new(Ipv4Config::static_address([10, 0, 0, 1], 24, None));
//! let mut stack = Stack::new(nic, config).unwrap();
//! let listener = stack.listen(80).unwrap();
//! loop {
//!     stack.poll(Instant::now()).unwrap();
//!     while let Some(event) = stack.next_event() {
//!         if let Event::Accepted { conn, .. } = event {
//!             stack.send(conn, b"hello\n").unwrap();
//!             stack.close(conn).unwrap();
//!         }
//!     }
//! #   let _ = listener; break;
//! }
//! ```

#![forbid(unsafe_code)]

pub mod congestion;
mod device;
pub mod dmabuf;
pub mod frame;
pub mod poison;
pub mod sendq;
mod stack;
pub mod tls;

pub use device::{BoundaryFault, TxConfig, SLOT_SIZE};
pub use sendq::{SendMode, SendOutcome};
pub use smoltcp::time::{Duration, Instant};
pub use smoltcp::wire::{IpAddress, Ipv4Address, Ipv4Cidr, Ipv6Address, Ipv6Cidr};
pub use stack::{
    link_local_address, Congestion, ConnState, Ipv4Config, Ipv6Config, Stack, StackConfig,
    MAX_STATIC_IPV6,
};
pub use tls::{TlsConfig, TlsInfo};

/// Names one connection of a [`Stack`]. Stale handles (of reclaimed connections) are
/// refused with [`Error::InvalidConnection`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

/// Names a listening port of a [`Stack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerId(pub(crate) u32);

/// Names one `send_file`; reported back by [`Event::SendComplete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SendId(pub u64);

/// Something that happened, reported by [`Stack::next_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A listener accepted a connection (established).
    Accepted { listener: ListenerId, conn: ConnId },
    /// A connection made with [`Stack::connect`] is established.
    Connected { conn: ConnId },
    /// Data arrived on a connection that had none buffered.
    Readable { conn: ConnId },
    /// The peer closed its sending half (no more data will arrive).
    PeerClosed { conn: ConnId },
    /// A `send_file` finished: every byte acknowledged and every descriptor reading its
    /// pages completed (or the connection went away first, see [`SendOutcome`]). The stack
    /// holds no reference to its pages any more.
    SendComplete {
        conn: ConnId,
        send_id: SendId,
        outcome: SendOutcome,
    },
    /// The connection is closed (or reset). Its handle stays valid for `recv` of what is
    /// left until the stack reclaims it.
    Closed { conn: ConnId },
    /// DHCP (or the static configuration) gave the interface this address.
    AddressConfigured { address: Ipv4Cidr },
}

/// Cumulative counters of a [`Stack`] (`*_now` fields are current values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    /// Frames handed to the NIC (before TSO splitting).
    pub frames_tx: u64,
    /// Frames received from the NIC.
    pub frames_rx: u64,
    /// TCP frames whose payload the NIC reads from the send queue (pins, copy blocks).
    pub zero_copy_frames: u64,
    /// Bytes of real payload the CPU copied: `send` data into the copy pool, and in copying
    /// mode file bytes into smoltcp's ring and smoltcp's ring into the frame; linearized
    /// frames. Zero for file data sent zero-copy.
    pub payload_bytes_copied: u64,
    /// Placeholder bytes smoltcp copied from its ring into frames we then only read the
    /// headers of (zero-copy mode). No file byte is read; this is the approach's CPU cost.
    pub placeholder_bytes_copied: u64,
    /// File bytes transmitted for the first time.
    pub file_bytes_sent: u64,
    /// Stream bytes (file and `send` data) transmitted for the first time.
    pub payload_bytes_sent: u64,
    /// TCP segments (as built by smoltcp, before TSO) that resent stream bytes.
    pub retransmitted_segments: u64,
    pub retransmitted_bytes: u64,
    /// Frames too fragmented for the NIC, copied into one buffer.
    pub linearized_frames: u64,
    /// Segments smoltcp built larger than the MSS for a NIC without TSO, cut into MSS-sized
    /// frames at the boundary (software segmentation, `TxConfig::gso`) ...
    pub gso_segments: u64,
    /// ... and the frames they were cut into.
    pub gso_frames: u64,
    /// Bytes checksummed in software (NIC without TCP checksum offload).
    pub software_checksum_bytes: u64,
    /// Frames dropped for lack of a TX buffer (TCP retransmits them).
    pub tx_dropped_no_buffer: u64,
    /// Zero-copy segments dropped because their payload could not be mapped to the send
    /// queue (placeholders never reach the wire). Must stay 0 in normal operation.
    pub tx_unmapped_drops: u64,
    /// Keep-alive probes sent (each with the real last acknowledged byte).
    pub keepalive_probes: u64,
    /// ISS entries of half-open flows dropped to keep that table bounded.
    pub pending_iss_evicted: u64,
    /// Received SYNs for a 4-tuple that has a live connection, dropped (see the device
    /// boundary's `check_syn`).
    pub rx_duplicate_syns: u64,
    /// New SYNs dropped because every listening socket of their port was taken (the
    /// client retries; see `StackConfig::backlog`).
    pub rx_syns_over_backlog: u64,
    /// Received pure ACKs that the next received frame superseded (a later cumulative ACK
    /// of the same flow), recycled without smoltcp processing them (the device boundary's
    /// `receive`).
    pub rx_acks_superseded: u64,
    /// Device faults the driver recovered from (TX hang, device reset).
    pub device_resets: u64,
    /// Connections aborted for making no send progress within the send-stall timeout.
    pub send_stall_aborts: u64,
    /// Frames the NIC refused as malformed.
    pub tx_refused: u64,
    /// Received TCP segments (IPv4 or IPv6) whose checksum did not verify, dropped before
    /// smoltcp saw them.
    pub rx_tcp_checksum_drops: u64,
    /// Received TCP the boundary cannot verify (IPv4 fragments, IPv6 behind extension
    /// headers): dropped (see `frame::is_unverified_tcp`).
    pub rx_unverified_tcp_drops: u64,
    /// Received frames whose IP header says TCP but whose TCP header does not parse
    /// (damaged): dropped (see `frame::is_malformed_tcp`).
    pub rx_malformed_tcp_drops: u64,
    /// `send_file` calls completed (acknowledged or aborted).
    pub sends_completed: u64,
    /// Page-cache pins the stack holds now (one per queued file chunk).
    pub pins_held_now: u64,
    /// Frames the NIC may still be reading now.
    pub frames_in_flight_now: u64,
    /// TLS handshakes completed (secrets extracted), and failed.
    pub tls_handshakes: u64,
    pub tls_handshake_failures: u64,
    /// Records sealed whole (once each: the first time any byte of one is transmitted),
    /// and the inner plaintext bytes they held.
    pub tls_records_sealed: u64,
    pub tls_bytes_sealed: u64,
    /// Record body bytes recomputed by AES-CTR (retransmissions, and the rest of records
    /// whose first transmission was split across frames).
    pub tls_ctr_bytes: u64,
    /// Bytes the CPU wrote to produce TLS payload: the AEAD's output (straight into the
    /// frame's DMA chunk), gathers (ring seals in place only) and copies of records sealed
    /// aside. 1 per payload byte when every record is sealed out of place into its frame.
    pub tls_cpu_bytes_written: u64,
    /// TLS bytes written into frames' DMA buffers (each frame's payload, once).
    pub tls_dma_bytes_written: u64,
    /// TLS bytes in DMA buffers of frames the NIC has not completed. Nothing encrypted is
    /// kept past TX completion: 0 once the NIC is idle.
    pub tls_ciphertext_held_now: u64,
    /// Audit ([`crate::tls::TlsConfig::audit`]): retransmitted record slices checked (one
    /// record tag recomputed over the pinned plaintext each), the inner plaintext bytes
    /// that cost, and tags that differed (the connection is reset, the slice not sent).
    pub tls_audit_checks: u64,
    pub tls_audit_bytes: u64,
    pub tls_audit_mismatches: u64,
    /// Frames whose records the NIC encrypted inline, and their TLS bytes.
    pub tls_inline_frames: u64,
    pub tls_inline_bytes: u64,
    /// Retransmitted TLS segments, and those of them that start inside a record (they
    /// need a partial record: CTR from the record's offset, or a NIC resync).
    pub tls_retransmissions: u64,
    pub tls_retransmissions_mid_record: u64,
    /// TLS frames carrying new bytes, and those of them that end inside a record (the
    /// record is split across frames: sealed aside, or resynchronised on an inline NIC).
    pub tls_frames_first_sent: u64,
    pub tls_frames_ending_mid_record: u64,
    pub tls_records_received: u64,
    pub tls_key_updates_sent: u64,
    pub tls_key_updates_received: u64,
    pub tls_alerts_sent: u64,
}

/// Errors of the stack's API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such connection (closed and reclaimed, or never existed)")]
    InvalidConnection,
    #[error("no such listener")]
    InvalidListener,
    #[error("the connection cannot send (not established, or closing)")]
    CannotSend,
    #[error("the connection cannot receive: {0}")]
    Recv(#[from] smoltcp::socket::tcp::RecvError),
    #[error("listen failed: {0}")]
    Listen(#[from] smoltcp::socket::tcp::ListenError),
    #[error("connect failed: {0}")]
    Connect(#[from] smoltcp::socket::tcp::ConnectError),
    #[error("range {range:?} is not inside the pinned range {pinned:?}")]
    RangeOutsidePin {
        range: std::ops::Range<u64>,
        pinned: std::ops::Range<u64>,
    },
    #[error("the interface has no IPv4 address yet")]
    NoAddress,
    #[error("{given} static IPv6 addresses given, at most {max} are supported")]
    TooManyAddresses { given: usize, max: usize },
    #[error(transparent)]
    Driver(#[from] driver::DriverError),
    #[error("TLS configuration refused: {0}")]
    TlsConfig(String),
    #[error("not a TLS connection")]
    NotTls,
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
