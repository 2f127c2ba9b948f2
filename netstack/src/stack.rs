//! The [`Stack`]: interface, sockets, connections, events and the poll loop.

use std::collections::VecDeque;
use std::ops::Range;

use driver::NetQueue;
use pagecache::Pin;
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address, Ipv4Cidr,
    Ipv6Address, Ipv6Cidr,
};

use crate::congestion::CongestionWindow;
use crate::device::{BoundaryFault, ConnTx, NicDevice, TxConfig, TxPath};
use crate::frame::FlowKey;
use crate::sendq::{SendMode, SendQueue};
use crate::tls::session::TlsConn;
use crate::tls::{TlsConfig, TlsInfo};
use crate::{ConnId, Error, Event, ListenerId, Result, SendId, StackStats};

/// How the interface gets its IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv4Config {
    Static {
        address: Ipv4Cidr,
        gateway: Option<Ipv4Address>,
    },
    /// Ask a DHCP server (QEMU's user-mode network has one).
    Dhcp,
}

impl Ipv4Config {
    /// A static address, e.g. `static_address([10, 99, 0, 2], 24, None)`.
    pub fn static_address(address: [u8; 4], prefix: u8, gateway: Option<[u8; 4]>) -> Self {
        Ipv4Config::Static {
            address: Ipv4Cidr::new(Ipv4Address::from(address), prefix),
            gateway: gateway.map(Ipv4Address::from),
        }
    }
}

/// Static IPv6 addresses a stack takes at most (smoltcp's address table holds 8: one IPv4,
/// the link-local, these, and one from SLAAC).
pub const MAX_STATIC_IPV6: usize = 4;

/// IPv6 beside IPv4 (dual stack). When enabled the interface has a link-local address
/// derived from its MAC (fe80::/64 + modified EUI-64, RFC 4291 appendix A and RFC 4862
/// section 5.3), answers neighbour solicitations and ICMPv6 echo (smoltcp's NDP, RFC 4861),
/// and takes the static addresses given; with `slaac`, smoltcp solicits routers and forms
/// an address from each advertised /64 prefix (RFC 4862; smoltcp's `proto-ipv6-slaac`),
/// with a route via the advertising router. Listening sockets accept both families.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv6Config {
    pub enabled: bool,
    pub addresses: [Option<Ipv6Cidr>; MAX_STATIC_IPV6],
    /// Default route for destinations off every on-link prefix.
    pub gateway: Option<Ipv6Address>,
    pub slaac: bool,
}

impl Ipv6Config {
    /// Link-local only.
    pub fn link_local() -> Self {
        Ipv6Config {
            enabled: true,
            ..Default::default()
        }
    }

    /// Link-local plus `addresses` (at most [`MAX_STATIC_IPV6`]; more is an error).
    pub fn with_addresses(addresses: &[Ipv6Cidr]) -> Result<Self> {
        if addresses.len() > MAX_STATIC_IPV6 {
            return Err(Error::TooManyAddresses {
                given: addresses.len(),
                max: MAX_STATIC_IPV6,
            });
        }
        let mut config = Self::link_local();
        for (slot, address) in config.addresses.iter_mut().zip(addresses) {
            *slot = Some(*address);
        }
        Ok(config)
    }
}

/// The link-local address of `mac`: fe80::/64 and the modified EUI-64 interface identifier
/// (RFC 4291 appendix A: ff:fe in the middle, the universal/local bit inverted).
pub fn link_local_address(mac: [u8; 6]) -> Ipv6Address {
    let mut octets = [0u8; 16];
    octets[0] = 0xfe;
    octets[1] = 0x80;
    octets[8..11].copy_from_slice(&[mac[0] ^ 0x02, mac[1], mac[2]]);
    octets[11..13].copy_from_slice(&[0xff, 0xfe]);
    octets[13..16].copy_from_slice(&mac[3..6]);
    Ipv6Address::from(octets)
}

/// Configuration of a [`Stack`].
#[derive(Clone, Copy, Debug)]
pub struct StackConfig {
    pub ipv4: Ipv4Config,
    /// IPv6 (off unless enabled: [`Ipv6Config::link_local`] and friends).
    pub ipv6: Ipv6Config,
    /// Receive buffer of each TCP socket (the advertised window; scaled if above 64 KiB).
    pub tcp_rx_buffer: usize,
    /// Send ring of each TCP socket: bytes in flight plus queued at most. In zero-copy mode
    /// it holds only placeholders, so it costs address space, not copies.
    pub tcp_tx_buffer: usize,
    /// Listening sockets kept ready per listener (SYNs beyond are refused).
    pub backlog: usize,
    pub tx: TxConfig,
    /// Zero-copy (the point of this crate) or smoltcp's own copying path (a baseline).
    pub send_mode: SendMode,
    /// Seed of smoltcp's randomness (initial sequence numbers, ports).
    pub random_seed: u64,
    /// Nagle's algorithm (off: a server sends whole responses anyway).
    pub nagle: bool,
    /// A handshake (SYN received, no ACK) that takes longer is reset, freeing its socket.
    pub handshake_timeout: Duration,
    /// A connection with unacknowledged data and no acknowledgement progress for this long
    /// (zero window, or a peer that stopped answering) is aborted and its pins released.
    /// `None`: never.
    pub send_stall_timeout: Option<Duration>,
    /// A closed connection whose unread data the application never collects is reclaimed
    /// after this long anyway.
    pub closed_linger: Duration,
    /// The TLS record layer of [`Stack::listen_tls`] connections.
    pub tls: TlsConfig,
    /// Who keeps the congestion window (`crate::congestion` says why the stack does).
    pub congestion: Congestion,
}

impl StackConfig {
    /// Memory one connection may use at most, in bytes: its socket buffers and its share of
    /// the copy pool (the application's own buffers come on top). The whole send ring
    /// counts, although zero-copy writes only its poisoned span (`crate::poison`): an upper
    /// bound, whatever the allocator commits.
    pub fn memory_per_connection(&self) -> usize {
        self.tcp_rx_buffer
            + self.tcp_tx_buffer
            + self.tx.copy_blocks_per_conn * crate::sendq::COPY_BLOCK
    }

    pub fn new(ipv4: Ipv4Config) -> Self {
        Self {
            ipv4,
            ipv6: Ipv6Config::default(),
            tcp_rx_buffer: 64 * 1024,
            tcp_tx_buffer: 1024 * 1024,
            backlog: 4,
            tx: TxConfig {
                slots: 512,
                jumbo_buffers: 16,
                copy_blocks: 256,
                tso: true,
                gso: true,
                copy_blocks_per_conn: 16,
                fault: BoundaryFault::None,
            },
            send_mode: SendMode::ZeroCopy,
            random_seed: 0x5eed,
            nagle: false,
            handshake_timeout: Duration::from_secs(10),
            send_stall_timeout: Some(Duration::from_secs(60)),
            closed_linger: Duration::from_secs(30),
            tls: TlsConfig::default(),
            congestion: Congestion::ByteCounting,
        }
    }
}

/// Congestion control of the stack's TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// The stack's [`crate::congestion::CongestionWindow`]: slow start counts acknowledged
    /// bytes, so a peer that acknowledges whole TSO frames still doubles the window per
    /// round trip. smoltcp's own controller is off.
    ByteCounting,
    /// smoltcp's Cubic, whose slow start grows one MSS per ACK (the comparison baseline).
    SmoltcpCubic,
}

/// A connection's TCP state (smoltcp's).
pub type ConnState = tcp::State;

struct Conn {
    socket: SocketHandle,
    listener: Option<ListenerId>,
    established_reported: bool,
    readable_reported: bool,
    peer_closed_reported: bool,
    closed_reported: bool,
    /// The application asked to close: FIN goes out once every queued byte is fed.
    close_requested: bool,
    close_issued: bool,
    /// The application is done with the handle (close or abort called).
    released_by_app: bool,
    /// Last time acknowledgements made progress (or nothing was unacknowledged).
    progress_at: Instant,
    /// When the connection was first seen closed.
    closed_at: Option<Instant>,
    /// The application knows the connection (a TLS connection is reported only once its
    /// handshake is complete); no events before.
    announced: bool,
    /// When the connection was accepted (or made).
    accepted_at: Instant,
    /// The congestion window the stack keeps ([`Congestion::ByteCounting`]).
    cwnd: Option<CongestionWindow>,
}

enum ConnSlot {
    Free,
    Used(Conn),
}

struct Listener {
    port: u16,
    sockets: Vec<SocketHandle>,
    /// TLS listener: accepted connections run this handshake first.
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

/// A TCP/IP stack on one NIC. Generic over the NIC's queue type: static dispatch on the hot
/// path. Single-threaded: call [`Stack::poll`] in a loop (each poll does one RX burst, runs
/// smoltcp, and hands the TX burst to the NIC with one doorbell), and handle
/// [`Stack::next_event`]s.
pub struct Stack<Q: NetQueue> {
    config: StackConfig,
    iface: Interface,
    sockets: SocketSet<'static>,
    device: NicDevice<Q>,
    conns: Vec<(u32, ConnSlot)>,
    listeners: Vec<Listener>,
    dhcp: Option<SocketHandle>,
    events: VecDeque<Event>,
    next_send_id: u64,
    /// The time passed to the last [`Stack::poll`].
    now: Instant,
}

/// A socket listening on `port`, with the handshake timeout.
fn listening_socket(config: &StackConfig, port: u16) -> Result<tcp::Socket<'static>> {
    let mut socket = tcp_socket(config);
    socket.set_timeout(Some(config.handshake_timeout));
    socket.listen(port)?;
    Ok(socket)
}

fn tcp_socket(config: &StackConfig) -> tcp::Socket<'static> {
    // Zeroed allocations of this size are fresh anonymous pages when the allocator maps
    // large blocks on their own (the server makes glibc's do so, `process.rs`): they cost
    // no memory until touched, so idle and listening sockets stay cheap. Only the first
    // span of the send ring is poisoned as zero-copy claims it (see `feed_sockets`).
    let rx = tcp::SocketBuffer::new(vec![0; config.tcp_rx_buffer]);
    let tx = tcp::SocketBuffer::new(vec![0; config.tcp_tx_buffer]);
    let mut socket = tcp::Socket::new(rx, tx);
    socket.set_nagle_enabled(config.nagle);
    socket.set_congestion_control(match config.congestion {
        // The stack limits what it feeds the socket instead (`Stack::feed_sockets`).
        Congestion::ByteCounting => tcp::CongestionControl::None,
        Congestion::SmoltcpCubic => tcp::CongestionControl::Cubic,
    });
    socket
}

impl<Q: NetQueue> Stack<Q> {
    /// A stack on `nic`. Allocates its DMA memory (header slots, copy pool) in the NIC's
    /// DMA space.
    pub fn new(nic: Q, config: StackConfig) -> Result<Self> {
        let caps = nic.capabilities();
        let tx = TxPath::new(nic.dma(), caps, &config.tx, config.send_mode)?;
        let mut device = NicDevice {
            nic,
            tx,
            rx_frame: vec![0; driver::queue::MAX_RX_FRAME].into_boxed_slice(),
            rx_ahead: vec![0; driver::queue::MAX_RX_FRAME].into_boxed_slice(),
            held: None,
        };
        let mac = device.nic.mac_address().0;
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        iface_config.random_seed = config.random_seed;
        iface_config.slaac = config.ipv6.enabled && config.ipv6.slaac;
        let mut iface = Interface::new(iface_config, &mut device, Instant::from_millis(0));
        if config.ipv6.enabled {
            let link_local = Ipv6Cidr::new(link_local_address(mac), 64);
            let statics = config.ipv6.addresses.iter().flatten();
            iface.update_ip_addrs(|addrs| {
                for address in std::iter::once(&link_local).chain(statics) {
                    addrs
                        .push(IpCidr::Ipv6(*address))
                        .expect("room for the IPv6 addresses (MAX_STATIC_IPV6)");
                }
            });
            if let Some(gw) = config.ipv6.gateway {
                iface
                    .routes_mut()
                    .add_default_ipv6_route(gw)
                    .expect("room for a route");
            }
        }
        let mut sockets = SocketSet::new(Vec::new());
        let mut events = VecDeque::new();
        let dhcp = match config.ipv4 {
            Ipv4Config::Static { address, gateway } => {
                iface.update_ip_addrs(|addrs| {
                    addrs
                        .push(IpCidr::Ipv4(address))
                        .expect("room for one address");
                });
                if let Some(gw) = gateway {
                    iface
                        .routes_mut()
                        .add_default_ipv4_route(gw)
                        .expect("room for a route");
                }
                events.push_back(Event::AddressConfigured { address });
                None
            }
            Ipv4Config::Dhcp => Some(sockets.add(dhcpv4::Socket::new())),
        };
        Ok(Self {
            config,
            iface,
            sockets,
            device,
            conns: Vec::new(),
            listeners: Vec::new(),
            dhcp,
            events,
            next_send_id: 1,
            now: Instant::from_millis(0),
        })
    }

    /// The NIC.
    pub fn nic(&self) -> &Q {
        &self.device.nic
    }

    /// The NIC, mutably (e.g. to drive a software NIC's device steps in tests).
    pub fn nic_mut(&mut self) -> &mut Q {
        &mut self.device.nic
    }

    /// The interface's IPv4 address, once configured.
    pub fn ipv4_address(&self) -> Option<Ipv4Cidr> {
        self.iface.ip_addrs().iter().find_map(|a| match a {
            IpCidr::Ipv4(c) => Some(*c),
            _ => None,
        })
    }

    /// The interface's IPv6 addresses now (link-local first, then static, then SLAAC's).
    pub fn ipv6_addresses(&self) -> Vec<Ipv6Cidr> {
        self.iface
            .ip_addrs()
            .iter()
            .filter_map(|a| match a {
                IpCidr::Ipv6(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    /// Largest frame handed to the NIC with TSO (`None`: smoltcp segments at the MSS).
    pub fn tso_frame(&self) -> Option<usize> {
        self.device.tx.tso_frame()
    }

    /// Listen on `port`; accepted connections are reported by [`Event::Accepted`].
    pub fn listen(&mut self, port: u16) -> Result<ListenerId> {
        let mut sockets = Vec::with_capacity(self.config.backlog);
        for _ in 0..self.config.backlog.max(1) {
            let socket = listening_socket(&self.config, port)?;
            sockets.push(self.sockets.add(socket));
        }
        self.listeners.push(Listener {
            port,
            sockets,
            tls: None,
        });
        Ok(ListenerId(self.listeners.len() as u32 - 1))
    }

    /// Listen on `port` for TLS 1.3 (see [`crate::tls`]). Accepted connections run the
    /// handshake with `config` and are reported by [`Event::Accepted`] once it is complete;
    /// `recv`, `send`, `send_file` and `close` then work on plaintext as for TCP.
    ///
    /// The config must offer TLS 1.3 only and only AES-GCM suites (the record layer's);
    /// secret extraction is turned on in a copy of it.
    pub fn listen_tls(
        &mut self,
        port: u16,
        config: std::sync::Arc<rustls::ServerConfig>,
    ) -> Result<ListenerId> {
        for suite in &config.crypto_provider().cipher_suites {
            let name = suite.suite();
            let ok = matches!(
                name,
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
            );
            if !ok {
                return Err(Error::TlsConfig(format!(
                    "cipher suite {name:?}: the record layer does TLS 1.3 AES-GCM only"
                )));
            }
        }
        let mut config = std::sync::Arc::unwrap_or_clone(config);
        config.enable_secret_extraction = true;
        self.device.tx.enable_tls(self.config.tls.cipher_buffers)?;
        let listener = self.listen(port)?;
        self.listeners[listener.0 as usize].tls = Some(std::sync::Arc::new(config));
        Ok(listener)
    }

    /// What a TLS connection negotiated (`None` for a TCP connection).
    pub fn tls_info(&self, id: ConnId) -> Result<Option<TlsInfo>> {
        self.conn(id)?;
        Ok(self.device.tx.conns[id.index as usize]
            .tls
            .as_ref()
            .and_then(|t| t.info().cloned()))
    }

    /// Sends a KeyUpdate on a TLS connection: records after it use the next sending key;
    /// `request_peer` asks the client to update its sending key too.
    pub fn tls_key_update(&mut self, id: ConnId, request_peer: bool) -> Result<()> {
        self.conn(id)?;
        match self.device.tx.conns[id.index as usize].tls.as_mut() {
            Some(tls) => {
                tls.key_update(request_peer);
                Ok(())
            }
            None => Err(Error::NotTls),
        }
    }

    /// Where a TLS connection's keys are in both directions (`None` before the handshake
    /// is complete), for tests and diagnostics.
    pub fn tls_key_positions(&self, id: ConnId) -> Result<Option<crate::tls::KeyPositions>> {
        self.conn(id)?;
        let Some(tls) = self.device.tx.conns[id.index as usize].tls.as_ref() else {
            return Err(Error::NotTls);
        };
        Ok(match (tls.tx.epoch(), tls.rx_position()) {
            (Some(tx_epoch), Some((rx_epoch, rx_seq))) => Some(crate::tls::KeyPositions {
                tx_epoch,
                tx_seq: tls.tx.next_seq(),
                rx_epoch,
                rx_seq,
            }),
            _ => None,
        })
    }

    /// Why a TLS connection failed, if it did.
    pub fn tls_error(&self, id: ConnId) -> Result<Option<crate::tls::TlsError>> {
        self.conn(id)?;
        Ok(self.device.tx.conns[id.index as usize]
            .tls
            .as_ref()
            .and_then(|t| t.error.clone()))
    }

    /// Connect to `remote` from `local_port`; [`Event::Connected`] reports success.
    pub fn connect(
        &mut self,
        remote: (impl Into<IpAddress>, u16),
        local_port: u16,
    ) -> Result<ConnId> {
        let mut socket = tcp_socket(&self.config);
        let address: IpAddress = remote.0.into();
        let endpoint = IpEndpoint::new(address, remote.1);
        socket.connect(self.iface.context(), endpoint, local_port)?;
        let handle = self.sockets.add(socket);
        let flow = FlowKey::new(local_port, address, remote.1);
        Ok(self.add_conn(handle, None, flow, self.now, None))
    }

    fn add_conn(
        &mut self,
        socket: SocketHandle,
        listener: Option<ListenerId>,
        flow: FlowKey,
        now: Instant,
        tls: Option<Box<TlsConn>>,
    ) -> ConnId {
        let conn = Conn {
            socket,
            listener,
            established_reported: false,
            readable_reported: false,
            peer_closed_reported: false,
            closed_reported: false,
            close_requested: false,
            close_issued: false,
            released_by_app: false,
            progress_at: now,
            closed_at: None,
            announced: true,
            accepted_at: now,
            cwnd: (self.config.congestion == Congestion::ByteCounting).then(|| {
                let ip_and_tcp = if flow.is_ipv6() { 60 } else { 40 };
                let mss = self
                    .device
                    .nic
                    .capabilities()
                    .mtu
                    .saturating_sub(ip_and_tcp);
                CongestionWindow::new(mss as u64)
            }),
        };
        let index = match self
            .conns
            .iter()
            .position(|(_, s)| matches!(s, ConnSlot::Free))
        {
            Some(i) => i,
            None => {
                self.conns.push((0, ConnSlot::Free));
                self.device.tx.conns.push(ConnTx {
                    generation: 0,
                    flow: None,
                    iss: None,
                    sendq: SendQueue::new(self.config.send_mode, 0),
                    tls: None,
                    retransmitted: false,
                });
                self.conns.len() - 1
            }
        };
        let generation = self.conns[index].0.wrapping_add(1);
        self.conns[index] = (generation, ConnSlot::Used(conn));
        let tx = &mut self.device.tx;
        let iss = tx.pending_iss.remove(&flow);
        // A TLS connection's plaintext is never copied into smoltcp's ring: records are
        // built at the device boundary, whatever the stack's mode.
        let mode = if tls.is_some() {
            SendMode::ZeroCopy
        } else {
            self.config.send_mode
        };
        tx.conns[index] = ConnTx {
            generation,
            flow: Some(flow),
            iss,
            sendq: SendQueue::new(mode, self.config.tx.copy_blocks_per_conn),
            tls,
            retransmitted: false,
        };
        if let Some(old) = tx.flows.insert(flow, index as u32) {
            // An older incarnation of the 4-tuple still waiting to be reclaimed: it keeps
            // nothing that could be mapped by flow any more.
            if old as usize != index {
                tx.conns[old as usize].flow = None;
            }
        }
        ConnId {
            index: index as u32,
            generation,
        }
    }

    fn conn(&self, id: ConnId) -> Result<&Conn> {
        match self.conns.get(id.index as usize) {
            Some((generation, ConnSlot::Used(c))) if *generation == id.generation => Ok(c),
            _ => Err(Error::InvalidConnection),
        }
    }

    fn conn_mut(&mut self, id: ConnId) -> Result<&mut Conn> {
        match self.conns.get_mut(id.index as usize) {
            Some((generation, ConnSlot::Used(c))) if *generation == id.generation => Ok(c),
            _ => Err(Error::InvalidConnection),
        }
    }

    fn socket(&self, id: ConnId) -> Result<&tcp::Socket<'static>> {
        let handle = self.conn(id)?.socket;
        Ok(self.sockets.get::<tcp::Socket>(handle))
    }

    /// Receive into `buffer`; returns the bytes read (0: nothing buffered now).
    pub fn recv(&mut self, id: ConnId, buffer: &mut [u8]) -> Result<usize> {
        let conn = self.conn_mut(id)?;
        let handle = conn.socket;
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        if let Some(tls) = self.device.tx.conns[id.index as usize].tls.as_mut() {
            if tls.plain.is_empty() {
                let finished = tls.peer_closed || tls.is_dead() || !socket.may_recv();
                if finished {
                    return Err(Error::Recv(tcp::RecvError::Finished));
                }
                return Ok(0);
            }
            let n = buffer.len().min(tls.plain.len());
            for (out, byte) in buffer.iter_mut().zip(tls.plain.drain(..n)) {
                *out = byte;
            }
            if tls.plain.is_empty() {
                self.conn_mut(id)?.readable_reported = false;
            }
            return Ok(n);
        }
        if !socket.can_recv() {
            if !socket.may_recv() && socket.recv_queue() == 0 {
                return Err(Error::Recv(tcp::RecvError::Finished));
            }
            return Ok(0);
        }
        let n = socket.recv_slice(buffer)?;
        let empty = socket.recv_queue() == 0;
        if empty {
            self.conn_mut(id)?.readable_reported = false;
        }
        Ok(n)
    }

    /// Copy `data` into DMA memory and queue it (for small things: HTTP headers). Returns
    /// how many bytes were queued; fewer than `data.len()` when the copy pool is full.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<usize> {
        self.check_can_queue(id)?;
        let tx = &mut self.device.tx;
        let conn = &mut tx.conns[id.index as usize];
        let n = conn.sendq.push_copy(data, &tx.pool);
        tx.stats.payload_bytes_copied += n as u64;
        Ok(n)
    }

    /// Queue file bytes `range` of `pin` for zero-copy transmission. The stack keeps its own
    /// sub-pins of the range (the caller may drop `pin`), releases them progressively as the
    /// peer acknowledges, and reports [`Event::SendComplete`] with the returned id.
    pub fn send_file(&mut self, id: ConnId, pin: &Pin, range: Range<u64>) -> Result<SendId> {
        let pinned = pin.range();
        if range.start > range.end || range.start < pinned.start || range.end > pinned.end {
            return Err(Error::RangeOutsidePin { range, pinned });
        }
        self.check_can_queue(id)?;
        let send_id = SendId(self.next_send_id);
        self.next_send_id += 1;
        self.device.tx.conns[id.index as usize]
            .sendq
            .push_file(pin, range, send_id);
        Ok(send_id)
    }

    fn check_can_queue(&self, id: ConnId) -> Result<()> {
        let conn = self.conn(id)?;
        let socket = self.sockets.get::<tcp::Socket>(conn.socket);
        let open = matches!(
            socket.state(),
            tcp::State::SynSent
                | tcp::State::SynReceived
                | tcp::State::Established
                | tcp::State::CloseWait
        );
        if conn.close_requested || !open {
            return Err(Error::CannotSend);
        }
        let tls = self.device.tx.conns[id.index as usize].tls.as_ref();
        if tls.is_some_and(|t| t.is_dead() || !t.is_established()) {
            return Err(Error::CannotSend);
        }
        Ok(())
    }

    /// Close the sending half after every queued byte (FIN). The connection stays readable.
    pub fn close(&mut self, id: ConnId) -> Result<()> {
        let conn = self.conn_mut(id)?;
        conn.close_requested = true;
        conn.released_by_app = true;
        if let Some(tls) = self.device.tx.conns[id.index as usize].tls.as_mut() {
            // close_notify after the last plaintext byte, then FIN.
            tls.close();
        }
        Ok(())
    }

    /// Reset the connection now. Queued data is discarded; pins are released as soon as
    /// the NIC no longer reads them ([`crate::SendOutcome::Aborted`]).
    pub fn abort(&mut self, id: ConnId) -> Result<()> {
        let conn = self.conn_mut(id)?;
        conn.released_by_app = true;
        let handle = conn.socket;
        self.sockets.get_mut::<tcp::Socket>(handle).abort();
        self.device.tx.conns[id.index as usize].sendq.abort();
        Ok(())
    }

    /// The application is done with the handle: a connection still open is reset (as
    /// [`Stack::abort`]); a closed one is reclaimed as soon as nothing is under DMA, unread
    /// data or not. After this the handle is invalid.
    pub fn release(&mut self, id: ConnId) -> Result<()> {
        if self.is_open(id)? {
            return self.abort(id);
        }
        self.conn_mut(id)?.released_by_app = true;
        Ok(())
    }

    /// The peer's address (either family) and port.
    pub fn remote_endpoint(&self, id: ConnId) -> Result<Option<(std::net::IpAddr, u16)>> {
        Ok(self
            .socket(id)?
            .remote_endpoint()
            .map(|e| (e.addr.into(), e.port)))
    }

    /// Memory one connection may use at most, in bytes: its socket buffers and its share of
    /// the copy pool (the application's own buffers come on top).
    pub fn memory_per_connection(&self) -> usize {
        self.config.memory_per_connection()
    }

    /// smoltcp's TCP state of the connection.
    pub fn state(&self, id: ConnId) -> Result<ConnState> {
        Ok(self.socket(id)?.state())
    }

    /// The listener that accepted the connection (`None` for [`Stack::connect`]).
    pub fn listener(&self, id: ConnId) -> Result<Option<ListenerId>> {
        Ok(self.conn(id)?.listener)
    }

    /// Whether the connection is open (not closed, not in TIME-WAIT).
    pub fn is_open(&self, id: ConnId) -> Result<bool> {
        Ok(self.socket(id)?.is_open())
    }

    /// Whether the peer closed its sending half.
    pub fn peer_closed(&self, id: ConnId) -> Result<bool> {
        let s = self.socket(id)?;
        Ok(s.is_active() && !s.may_recv() && s.state() != tcp::State::SynSent)
    }

    /// Whether `send`/`send_file` are accepted now.
    pub fn can_send(&self, id: ConnId) -> Result<bool> {
        Ok(self.check_can_queue(id).is_ok())
    }

    /// Bytes queued on the connection and not yet acknowledged (the send backlog).
    pub fn unacked(&self, id: ConnId) -> Result<u64> {
        self.conn(id)?;
        Ok(self.device.tx.conns[id.index as usize].sendq.unacked())
    }

    /// Bytes the peer's window lets us send beyond what is in flight, as smoltcp sees it.
    pub fn send_window(&self, id: ConnId) -> Result<usize> {
        let s = self.socket(id)?;
        Ok(s.send_capacity() - s.send_queue())
    }

    /// Bytes buffered for [`Stack::recv`].
    pub fn recv_queue(&self, id: ConnId) -> Result<usize> {
        let socket = self.socket(id)?;
        Ok(match &self.device.tx.conns[id.index as usize].tls {
            Some(tls) => tls.plain.len(),
            None => socket.recv_queue(),
        })
    }

    /// The next event, if any.
    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// All pending events.
    pub fn poll_events(&mut self) -> impl Iterator<Item = Event> + '_ {
        self.events.drain(..)
    }

    /// Counters.
    pub fn stats(&self) -> StackStats {
        let tx = &self.device.tx;
        let mut s = tx.stats;
        s.pins_held_now = tx.conns.iter().map(|c| c.sendq.pins_held() as u64).sum();
        s.frames_in_flight_now = tx.frames_in_flight() as u64;
        s
    }

    /// When to poll next at the latest (smoltcp's timers), `None` if idle.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        // Queued bytes waiting only for the congestion window wait for an ACK, not a poll.
        let conns = &self.conns;
        let sockets = &self.sockets;
        let busy = self.device.tx.conns.iter().enumerate().any(|(index, c)| {
            let work = match &c.tls {
                Some(tls) => tls.has_tx_work(&c.sendq),
                None => c.sendq.unfed() > 0,
            };
            work && match conns.get(index) {
                Some((_, ConnSlot::Used(conn))) => {
                    window_room(conn.cwnd.as_ref(), sockets.get::<tcp::Socket>(conn.socket)) > 0
                }
                _ => true,
            }
        });
        if busy {
            return Some(Duration::ZERO);
        }
        self.iface.poll_delay(now, &self.sockets)
    }

    /// One round: reap TX completions, feed queued data to the sockets, receive a burst,
    /// let smoltcp transmit (staged, then one doorbell), and update connections and
    /// events. Returns whether anything happened.
    pub fn poll(&mut self, now: Instant) -> Result<bool> {
        let before = (
            self.device.tx.stats.frames_rx,
            self.device.tx.stats.frames_tx,
            self.events.len(),
        );
        self.now = now;
        self.reap()?;
        self.service_listeners(now);
        self.feed_sockets();
        self.device.open_tx_window();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.device.nic.rx_flush();
        self.device.submit();
        self.reap()?;
        self.service_tls();
        self.service_dhcp();
        self.update_connections(now);
        let after = (
            self.device.tx.stats.frames_rx,
            self.device.tx.stats.frames_tx,
            self.events.len(),
        );
        Ok(before != after)
    }

    /// Collects TX completions. A fault the driver recovered from (a TX hang, a device
    /// reset) is counted and logged, and the stack goes on: the frames lost in it were
    /// returned and TCP retransmits them. Anything else means the device is unusable.
    fn reap(&mut self) -> Result<()> {
        match self.device.reap() {
            Ok(_) => Ok(()),
            Err(e) if e.is_recovered() => {
                self.device.tx.stats.device_resets += 1;
                tracing::warn!("NIC fault, recovered: {e}");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn service_dhcp(&mut self) {
        let Some(handle) = self.dhcp else { return };
        match self.sockets.get_mut::<dhcpv4::Socket>(handle).poll() {
            Some(dhcpv4::Event::Configured(config)) => {
                self.iface.update_ip_addrs(|addrs| {
                    // The IPv6 addresses stay; the IPv4 one is DHCP's.
                    addrs.retain(|a| !matches!(a, IpCidr::Ipv4(_)));
                    addrs
                        .push(IpCidr::Ipv4(config.address))
                        .expect("room for one address");
                });
                match config.router {
                    Some(router) => {
                        self.iface
                            .routes_mut()
                            .add_default_ipv4_route(router)
                            .expect("room for a route");
                    }
                    None => {
                        self.iface.routes_mut().remove_default_ipv4_route();
                    }
                }
                self.events.push_back(Event::AddressConfigured {
                    address: config.address,
                });
            }
            Some(dhcpv4::Event::Deconfigured) => {
                self.iface
                    .update_ip_addrs(|addrs| addrs.retain(|a| !matches!(a, IpCidr::Ipv4(_))));
                self.iface.routes_mut().remove_default_ipv4_route();
            }
            None => {}
        }
    }

    /// Turns listening sockets that completed a handshake into connections.
    fn service_listeners(&mut self, now: Instant) {
        self.device.tx.handshaking.clear();
        self.device.tx.listen_room.clear();
        for li in 0..self.listeners.len() {
            let room = self.listeners[li]
                .sockets
                .iter()
                .filter(|&&h| {
                    matches!(
                        self.sockets.get::<tcp::Socket>(h).state(),
                        tcp::State::Listen | tcp::State::Closed
                    )
                })
                .count();
            // Sockets replaced below (handshakes completed) listen again as fresh ones.
            let completed = self.listeners[li]
                .sockets
                .iter()
                .filter(|&&h| {
                    !matches!(
                        self.sockets.get::<tcp::Socket>(h).state(),
                        tcp::State::Listen | tcp::State::Closed | tcp::State::SynReceived
                    )
                })
                .count();
            let port = self.listeners[li].port;
            self.device
                .tx
                .listen_room
                .push((port, (room + completed) as u32));
            for si in 0..self.listeners[li].sockets.len() {
                let handle = self.listeners[li].sockets[si];
                let socket = self.sockets.get_mut::<tcp::Socket>(handle);
                match socket.state() {
                    tcp::State::Listen => continue,
                    tcp::State::SynReceived => {
                        // Its handshake is under way: a retransmitted SYN of this 4-tuple
                        // must not start a second one on another listening socket.
                        if let (Some(local), Some(remote)) =
                            (socket.local_endpoint(), socket.remote_endpoint())
                        {
                            let flow = FlowKey::new(local.port, remote.addr, remote.port);
                            self.device.tx.handshaking.insert(flow);
                        }
                        continue;
                    }
                    tcp::State::Closed => {
                        // Reset or timed out during the handshake: listen again.
                        let port = self.listeners[li].port;
                        let _ = socket.listen(port);
                        continue;
                    }
                    _ => {}
                }
                let (Some(local), Some(remote)) =
                    (socket.local_endpoint(), socket.remote_endpoint())
                else {
                    continue;
                };
                let flow = FlowKey::new(local.port, remote.addr, remote.port);
                // Established: the handshake timeout no longer applies (the send-stall
                // timeout of `update_connections` does).
                socket.set_timeout(None);
                let fresh = listening_socket(&self.config, self.listeners[li].port)
                    .expect("port was listenable");
                self.listeners[li].sockets[si] = self.sockets.add(fresh);
                let listener = ListenerId(li as u32);
                let tls = match &self.listeners[li].tls {
                    Some(config) => match TlsConn::new(config.clone(), &self.config.tls) {
                        Ok(tls) => Some(Box::new(tls)),
                        Err(e) => {
                            tracing::warn!("TLS connection refused: {e}");
                            self.sockets.get_mut::<tcp::Socket>(handle).abort();
                            self.sockets.remove(handle);
                            continue;
                        }
                    },
                    None => None,
                };
                let is_tls = tls.is_some();
                let conn = self.add_conn(handle, Some(listener), flow, now, tls);
                if let Ok(c) = self.conn_mut(conn) {
                    c.established_reported = true;
                    // A TLS connection is the application's once its handshake is done
                    // (`service_tls`); until then it is reclaimed as soon as it closes.
                    c.announced = !is_tls;
                    c.released_by_app = is_tls;
                }
                if !is_tls {
                    self.events.push_back(Event::Accepted { listener, conn });
                }
            }
        }
    }

    /// TLS connections: received bytes through the handshake or the record layer; a
    /// completed handshake announces the connection.
    fn service_tls(&mut self) {
        for (index, (generation, slot)) in self.conns.iter_mut().enumerate() {
            let ConnSlot::Used(conn) = slot else { continue };
            let ctx = &mut self.device.tx.conns[index];
            let Some(tls) = ctx.tls.as_mut() else {
                continue;
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.socket);
            let stats = &mut self.device.tx.stats;
            for _ in 0..2 {
                // Twice: the ring's data may wrap around.
                let room = tls.rx_room();
                if room == 0 || !socket.can_recv() {
                    break;
                }
                let taken = socket.recv(|bytes| {
                    let n = tls.take_input(&bytes[..bytes.len().min(room)]);
                    (n, n)
                });
                if taken.unwrap_or(0) == 0 {
                    break;
                }
            }
            tls.process(stats);
            if !socket.may_recv() && socket.recv_queue() == 0 {
                tls.peer_fin();
            }
            tls.flush_handshake(&mut ctx.sendq, &self.device.tx.pool, stats);
            let id = ConnId {
                index: index as u32,
                generation: *generation,
            };
            if tls.is_ready() && !conn.announced {
                conn.announced = true;
                conn.released_by_app = false;
                if let Some(listener) = conn.listener {
                    self.events
                        .push_back(Event::Accepted { listener, conn: id });
                }
            }
            // A TLS handshake has the TCP handshake's time limit too, from the accept on,
            // so a client that connects and says nothing cannot hold a connection.
            let handshake_expired =
                !conn.announced && self.now - conn.accepted_at > self.config.handshake_timeout;
            if handshake_expired && socket.is_open() {
                tracing::debug!("connection {id:?}: TLS handshake timed out");
                stats.tls_handshake_failures += 1;
                socket.abort();
                ctx.sendq.abort();
            }
            if tls.is_dead() && !conn.close_requested {
                // A fatal alert goes out (rustls' for a failed handshake, ours after it),
                // then FIN. An alert from the peer ends the connection at once.
                conn.close_requested = true;
                let peer_alert = matches!(
                    tls.error,
                    Some(
                        crate::tls::TlsError::PeerAlert(_)
                            | crate::tls::TlsError::AuditMismatch { .. }
                    )
                );
                if peer_alert {
                    socket.abort();
                    ctx.sendq.abort();
                }
            }
        }
    }

    /// Hands queued bytes to the smoltcp sockets: placeholders (zero-copy) or copies.
    fn feed_sockets(&mut self) {
        let placeholders_unwritten = !self.device.tx.sends_placeholders();
        for (index, (_, slot)) in self.conns.iter_mut().enumerate() {
            let ConnSlot::Used(conn) = slot else { continue };
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.socket);
            let tx = &mut self.device.tx;
            let ctx = &mut tx.conns[index];
            // smoltcp leaves a placeholder payload unwritten in the frame (the patch in
            // third_party/smoltcp): the boundary maps it to the send queue or drops the
            // frame (`TxPath::stage_frame`), so copying it would be all cost. Real bytes in
            // the ring (copying mode) are written as usual.
            socket.set_payload_by_device(
                placeholders_unwritten
                    && (ctx.tls.is_some() || ctx.sendq.mode == SendMode::ZeroCopy),
            );
            if let Some(tls) = ctx.tls.as_mut() {
                if socket.may_send() && !ctx.sendq.is_aborted() {
                    let room = (socket.send_capacity() - socket.send_queue()) as u64;
                    let allowed = window_room(conn.cwnd.as_ref(), socket);
                    tls.frame(&mut ctx.sendq, &tx.pool, room.min(allowed), &mut tx.stats);
                    let end = tls.tx.framed_end.min(tls.tx.fed.saturating_add(allowed));
                    feed_placeholders(socket, &mut tls.tx.fed, end, self.config.tcp_tx_buffer);
                }
                if conn.close_requested && !conn.close_issued && tls.may_send_fin() {
                    socket.close();
                    conn.close_issued = true;
                }
                continue;
            }
            if socket.may_send() && !ctx.sendq.is_aborted() {
                for _ in 0..2 {
                    // Twice: the free space of the ring may wrap around.
                    let allowed = window_room(conn.cwnd.as_ref(), socket);
                    let unfed = ctx.sendq.unfed().min(allowed);
                    if unfed == 0 {
                        break;
                    }
                    let ring_len = self.config.tcp_tx_buffer as u64;
                    let fed_before = ctx.sendq.fed;
                    let fed = match ctx.sendq.mode {
                        SendMode::ZeroCopy => socket
                            .send(|ring| {
                                // Placeholders: claim ring space without writing real data.
                                // Until the ring has wrapped once, the space claimed was
                                // never written: poison it (`crate::poison`), so smoltcp's
                                // copy of it is unmistakable should it ever reach a wire.
                                let n = (ring.len() as u64).min(unfed) as usize;
                                crate::poison::fill_fresh(ring, n, fed_before, ring_len);
                                (n, n)
                            })
                            .unwrap_or(0),
                        SendMode::Copying => {
                            let sendq = &mut ctx.sendq;
                            let n = socket.send(|ring| {
                                let take = ring.len().min(unfed as usize);
                                let n = sendq.copy_unfed(&mut ring[..take]);
                                (n, n)
                            });
                            let n = n.unwrap_or(0);
                            tx.stats.payload_bytes_copied += n as u64;
                            tx.stats.file_bytes_sent += n as u64;
                            // copy_unfed advanced `fed` itself.
                            continue;
                        }
                    };
                    if fed == 0 {
                        break;
                    }
                    ctx.sendq.fed += fed as u64;
                }
            }
            if conn.close_requested && !conn.close_issued && ctx.sendq.unfed() == 0 {
                socket.close();
                conn.close_issued = true;
            }
        }
    }

    /// Acknowledgements, releases, events, and reclaiming finished connections.
    fn update_connections(&mut self, now: Instant) {
        for index in 0..self.conns.len() {
            let (generation, ConnSlot::Used(conn)) = &mut self.conns[index] else {
                continue;
            };
            let id = ConnId {
                index: index as u32,
                generation: *generation,
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.socket);
            let tx = &mut self.device.tx;
            let ctx = &mut tx.conns[index];
            let state = socket.state();

            if !ctx.sendq.is_aborted() {
                // Everything fed and no longer in smoltcp's ring was acknowledged.
                let in_ring = socket.send_queue() as u64;
                // How long nothing was acknowledged, before this poll's progress counts.
                let silent_for =
                    std::time::Duration::from_micros((now - conn.progress_at).total_micros());
                match ctx.tls.as_mut() {
                    Some(tls) => {
                        // TCP acknowledges records; the send queue's plaintext is
                        // acknowledged a whole record at a time.
                        let acked = tls.tx.fed.saturating_sub(in_ring);
                        if acked > tls.tx.acked || tls.tx.framed_end == tls.tx.acked {
                            conn.progress_at = now;
                        }
                        tls.tx.ack(acked, &mut ctx.sendq);
                    }
                    None => {
                        let acked = ctx.sendq.fed.saturating_sub(in_ring);
                        if acked > ctx.sendq.acked || ctx.sendq.unacked() == 0 {
                            conn.progress_at = now;
                        }
                        if acked > ctx.sendq.acked {
                            ctx.sendq.acked = acked;
                        }
                    }
                }
                if let Some(window) = conn.cwnd.as_mut() {
                    window.on_acked(ctx.acked());
                    if std::mem::take(&mut ctx.retransmitted) {
                        window.on_retransmission(ctx.sent_max(), silent_for);
                    }
                }
                let stalled = self
                    .config
                    .send_stall_timeout
                    .is_some_and(|limit| now - conn.progress_at > limit);
                if stalled && socket.is_open() {
                    // Zero window or no acknowledgement for too long: give up, so a client
                    // that stops reading cannot hold pins and buffers forever.
                    tracing::debug!("connection {id:?}: no send progress, aborted");
                    tx.stats.send_stall_aborts += 1;
                    socket.abort();
                    ctx.sendq.abort();
                }
            }
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) && !ctx.sendq.is_aborted()
            {
                if ctx.sendq.unacked() > 0 {
                    tracing::debug!(
                        "connection {id:?} closed with {} bytes unacknowledged",
                        ctx.sendq.unacked()
                    );
                }
                ctx.sendq.abort();
            }
            let events = &mut self.events;
            let stats = &mut tx.stats;
            let announced = conn.announced;
            ctx.sendq.release(|send_id, outcome| {
                stats.sends_completed += 1;
                if announced {
                    events.push_back(Event::SendComplete {
                        conn: id,
                        send_id,
                        outcome,
                    });
                }
            });

            // What the application reads: TLS plaintext, or the socket's bytes.
            let (readable, tls_peer_closed) = match &ctx.tls {
                Some(tls) => (tls.plain.len(), tls.peer_closed),
                None => (socket.recv_queue(), false),
            };
            let closed = matches!(state, tcp::State::Closed | tcp::State::TimeWait);
            if conn.announced {
                if !conn.established_reported && state == tcp::State::Established {
                    conn.established_reported = true;
                    self.events.push_back(Event::Connected { conn: id });
                }
                if !conn.readable_reported && readable > 0 {
                    conn.readable_reported = true;
                    self.events.push_back(Event::Readable { conn: id });
                }
                let peer_done = tls_peer_closed
                    || matches!(
                        state,
                        tcp::State::CloseWait
                            | tcp::State::LastAck
                            | tcp::State::Closing
                            | tcp::State::TimeWait
                    );
                if peer_done && !conn.peer_closed_reported {
                    conn.peer_closed_reported = true;
                    self.events.push_back(Event::PeerClosed { conn: id });
                }
                if closed && !conn.closed_reported {
                    conn.closed_reported = true;
                    self.events.push_back(Event::Closed { conn: id });
                }
            }
            let closed_at = if closed {
                *conn.closed_at.get_or_insert(now)
            } else {
                now
            };
            // Reclaim: closed, nothing under DMA, and nothing left to read (or the app let
            // go, or never came back for it). TIME-WAIT is not kept: we only enter it after
            // our FIN and everything before it was acknowledged, and holding a whole socket
            // (its buffers) per closed connection for 10 s is what let connection churn
            // exhaust memory. A late duplicate FIN then gets a RST, which the peer ignores
            // once closed; a new SYN on the same 4-tuple meets the listener, not a
            // TIME-WAIT socket that would only answer it with an ACK.
            let unread_abandoned = readable == 0
                || conn.released_by_app
                || now - closed_at >= self.config.closed_linger;
            let reclaim = closed && ctx.sendq.is_idle() && unread_abandoned;
            if reclaim {
                let handle = conn.socket;
                if let Some(flow) = ctx.flow.take() {
                    // Only our own entry: a newer incarnation of the 4-tuple may own it now.
                    if tx.flows.get(&flow) == Some(&(index as u32)) {
                        tx.flows.remove(&flow);
                    }
                }
                ctx.generation = ctx.generation.wrapping_add(1);
                ctx.iss = None;
                self.sockets.remove(handle);
                self.conns[index].1 = ConnSlot::Free;
            }
        }
    }
}

/// Bytes the congestion window lets the stack add to `socket`'s ring now: the ring holds
/// the unacknowledged and the unsent bytes, which together stay within the window.
/// Unlimited when smoltcp keeps the window itself.
fn window_room(window: Option<&CongestionWindow>, socket: &tcp::Socket<'static>) -> u64 {
    window.map_or(u64::MAX, |w| {
        w.window().saturating_sub(socket.send_queue() as u64)
    })
}

/// Feeds placeholders for stream bytes `*fed .. end` into smoltcp's ring (as much as it
/// takes), advancing `*fed`. The ring's first pass is poisoned (`crate::poison`).
fn feed_placeholders(socket: &mut tcp::Socket<'static>, fed: &mut u64, end: u64, ring_len: usize) {
    for _ in 0..2 {
        // Twice: the free space of the ring may wrap around.
        let unfed = end - *fed;
        if unfed == 0 {
            break;
        }
        let fed_before = *fed;
        let n = socket
            .send(|ring| {
                let n = (ring.len() as u64).min(unfed) as usize;
                crate::poison::fill_fresh(ring, n, fed_before, ring_len as u64);
                (n, n)
            })
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        *fed += n as u64;
    }
}
