//! The queue API: what every NIC driver offers the network stack.
//!
//! Implemented by the e1000 family driver, the virtio-net driver and the in-process
//! software NIC of the `softnic` crate (for tests). The stack never sees descriptors or
//! registers; it hands the driver *frames as chains of IOVA segments* and gets back *tokens*
//! when the device has finished reading them.
//!
//! # Transmit
//! A frame is a chain of [`TxSegment`]s: typically a small header buffer (Ethernet + IPv4 +
//! TCP headers) followed by one or more payload segments that point straight into page-cache
//! frames. Every segment must lie in memory mapped for the device (see [`crate::dma`]).
//! [`NetQueue::tx_enqueue`] places a frame on the ring without telling the device;
//! [`NetQueue::tx_flush`] rings the doorbell once for the whole burst.
//!
//! [`NetQueue::tx_reap`] returns the caller's [`TxToken`] for every frame the device has
//! completed, in submission order. **Until its token comes back, the device may still read
//! any byte of the frame**: the caller must keep those bytes alive and unchanged. After it
//! comes back the device will never read them again (for that frame).
//!
//! # Offloads
//! [`TxOffload`] asks the device to fill in checksums and to segment. The contract is the one
//! common to Intel's context descriptors (8254x SDM section 3.3.6) and virtio-net's
//! `NEEDS_CSUM`/`GSO_TCPV4`/`GSO_TCPV6` (VIRTIO 1.2 section 5.1.6.2):
//! - L4 checksum: the checksum field already holds the one's-complement sum of the
//!   pseudo-header (*not* inverted); the device adds the sum over `start..end of frame` and
//!   stores the inverted result. This is the same for IPv4 and IPv6 (the devices only see
//!   offsets; the IPv6 pseudo-header of RFC 8200 section 8.1 is the stack's to sum).
//! - IPv4 header checksum: the field must hold **zero**; the device sums the header with the
//!   field as it finds it (Intel's IPCSO; with TSO it recomputes per segment the same way).
//! - TSO: the headers (`header_len` bytes, L2+L3+L4) lie wholly in the first segment; the
//!   device emits segments of at most `mss` payload bytes, fixing IPv4 total length,
//!   identification, IPv4 header checksum, TCP sequence number, flags (FIN/PSH only on the
//!   last) and checksum. How the stack prepares the headers of the large frame differs between
//!   device families and is announced in [`Capabilities::tso_headers`] ([`TsoHeaders`]): the
//!   driver never edits IP or TCP headers itself.
//! - TSO of IPv6 frames ([`TxOffload::ipv6_header`], only where [`Capabilities::tso_ipv6`]):
//!   the device fixes the IPv6 Payload Length of every segment (8254x SDM section 3.5.9,
//!   "Payload Length = MSS + HDRLEN - IPCSS"; 82574 DS section 7.3.6; virtio-net
//!   `GSO_TCPV6`); there is no IPv6 header checksum and no identification to fix.
//!
//! # Inline TLS transmit (TLS 1.3, AES-GCM)
//! The model is the one of NIC kTLS offload (Linux `tls_device`, mlx5/chelsio): the stack
//! frames the records and lays each out in the frame as it would be sent, but with the
//! *plaintext*: the 5-byte record header, the data straight from the page-cache pins, the
//! inner content type byte, and 16 placeholder bytes where the tag goes. Per record part
//! the frame carries the crypto context; the device encrypts the body bytes (AES-CTR at
//! counter `2 + body offset / 16`), writes the tag over the placeholder, then computes
//! checksums and segments as asked.
//!
//! Re-synchronisation: the context is given with *every* frame (record sequence number and
//! the offset of the frame's first byte in the record, as mlx5's driver does), so the
//! device keeps no per-connection stream state and can never fall out of step: a
//! retransmission that starts inside a record is encrypted from that offset. Only a tag
//! needs the record's earlier bytes; a part that holds tag bytes but not the record's
//! start carries them in [`TlsRecordSlice::resync`] (read by the device for the tag, not
//! sent: mlx5's DUMP of the record start).
//!
//! # Receive
//! [`NetQueue::rx_next`] hands out a filled buffer, [`NetQueue::rx_read`] copies its bytes
//! out (with volatile reads: the memory is the device's to write, so no Rust slice of it is
//! ever formed) and [`NetQueue::rx_recycle`] gives it back; [`NetQueue::rx_flush`] publishes recycled buffers
//! to the device with one tail write. [`NetQueue::rx_poll`] wraps the three for simple users.

use std::sync::Arc;

use crate::dma::DmaSpace;
use crate::error::DriverError;

/// Longest frame any queue hands out (the largest receive buffer a driver may use).
pub const MAX_RX_FRAME: usize = 16384;

/// An I/O virtual address: what the device puts on the bus, translated by the IOMMU.
pub type Iova = u64;

/// Opaque value the caller attaches to a frame and gets back on completion.
pub type TxToken = u64;

/// Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddress(pub [u8; 6]);

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::fmt::Debug for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for MacAddress {
    type Err = DriverError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts
                .next()
                .ok_or_else(|| DriverError::InvalidArgument(format!("bad MAC address {s:?}")))?;
            *byte = u8::from_str_radix(part, 16)
                .map_err(|_| DriverError::InvalidArgument(format!("bad MAC address {s:?}")))?;
        }
        if parts.next().is_some() {
            return Err(DriverError::InvalidArgument(format!(
                "bad MAC address {s:?}"
            )));
        }
        Ok(MacAddress(out))
    }
}

/// One piece of a frame in device-visible memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxSegment {
    pub iova: Iova,
    pub len: u32,
}

/// One frame for [`NetQueue::tx_enqueue`]: its pieces in device memory, the offloads asked
/// for, and the token the device hands back when it has read the frame.
#[derive(Clone, Copy, Debug)]
pub struct TxFrame<'a> {
    pub segments: &'a [TxSegment],
    pub offload: &'a TxOffload,
    pub token: TxToken,
    /// TLS records the device encrypts inline (only if [`Capabilities::tls_tx`] offers it).
    pub tls: &'a [TlsRecordSlice<'a>],
}

impl<'a> TxFrame<'a> {
    pub fn new(segments: &'a [TxSegment], offload: &'a TxOffload, token: TxToken) -> Self {
        TxFrame {
            segments,
            offload,
            token,
            tls: &[],
        }
    }

    /// A frame whose payload holds (parts of) TLS records laid out in plaintext, for the
    /// device to encrypt inline.
    pub fn with_tls(mut self, tls: &'a [TlsRecordSlice<'a>]) -> Self {
        self.tls = tls;
        self
    }
}

/// AEAD of an inline TLS engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsCipher {
    Aes128Gcm,
    Aes256Gcm,
}

/// What a device's inline TLS engine offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsTxCapability {
    pub aes_128_gcm: bool,
    pub aes_256_gcm: bool,
    /// Most record parts one frame may carry.
    pub max_records_per_frame: usize,
}

impl TlsTxCapability {
    pub fn supports(&self, cipher: TlsCipher) -> bool {
        match cipher {
            TlsCipher::Aes128Gcm => self.aes_128_gcm,
            TlsCipher::Aes256Gcm => self.aes_256_gcm,
        }
    }
}

/// A traffic key, named by `id` (the device may keep it in its key table under that name;
/// an `id` always names the same key material).
#[derive(Clone, Copy, Debug)]
pub struct TlsKey<'a> {
    pub id: TlsKeyId,
    pub cipher: TlsCipher,
    pub key: &'a [u8],
    /// The static IV; record `seq`'s nonce is `iv XOR seq` (RFC 8446 section 5.3).
    pub iv: &'a [u8; 12],
}

/// Names a traffic key: the connection (`flow`, unique while any frame of it is in flight)
/// and the key epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TlsKeyId {
    pub flow: u64,
    pub epoch: u64,
}

/// One record's bytes in a frame (see the module docs, "Inline TLS transmit").
#[derive(Clone, Copy, Debug)]
pub struct TlsRecordSlice<'a> {
    pub key: TlsKey<'a>,
    /// The record's sequence number under its key.
    pub seq: u64,
    /// Inner plaintext length: data plus the content type byte (the record is
    /// `5 + inner_len + 16` bytes).
    pub inner_len: u32,
    /// Where the part begins in the frame (bytes from the frame's first byte).
    pub frame_offset: u32,
    /// Which byte of the record that is (0: the header's first byte).
    pub record_offset: u32,
    /// Bytes of the record in this frame.
    pub len: u32,
    /// The record's bytes `0..record_offset`, laid out as in a frame, when the part holds
    /// tag bytes and `record_offset > 0`; empty otherwise.
    pub resync: &'a [TxSegment],
}

/// Which transport protocol an L4 checksum or TSO request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Protocol {
    Tcp,
    Udp,
}

/// Ask the device to compute an L4 (TCP/UDP) checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4Checksum {
    pub protocol: L4Protocol,
    /// Offset from the frame start where summing begins (the L4 header).
    pub start: u16,
    /// Offset from the frame start of the 16-bit checksum field.
    pub field: u16,
}

/// Ask the device to split a large TCP frame into MSS-sized segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tso {
    /// Maximum TCP payload bytes per emitted segment.
    pub mss: u16,
    /// Length of L2+L3+L4 headers, all in the first segment.
    pub header_len: u16,
}

/// Offloads requested for one frame. `Default` requests none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOffload {
    /// Offset of the IPv4 header whose header checksum the device fills in.
    pub ipv4_header: Option<u16>,
    pub l4_checksum: Option<L4Checksum>,
    /// Requires a TCP `l4_checksum`, and for an IPv4 frame under [`TsoHeaders::PerSegment`]
    /// `ipv4_header`; an IPv6 frame names its header in `ipv6_header`.
    pub tso: Option<Tso>,
    /// Offset of the IPv6 header of a TSO frame: the frame is IPv6 (virtio `GSO_TCPV6`, an
    /// Intel context with TUCMD.IP = 0) and the device writes each segment's Payload Length
    /// there. Never together with `ipv4_header`; without `tso` it is ignored (an IPv6 frame
    /// needs nothing but the L4 checksum).
    pub ipv6_header: Option<u16>,
}

/// How the headers of a TSO frame must be prepared for the device (see [`Tso`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TsoHeaders {
    /// Intel 8254x/8257x TCP segmentation context (8254x SDM section 3.5.3 / 82574 section
    /// 7.3.6): the IPv4 header checksum field is **zero** and IPv4 header checksum insertion
    /// is requested ([`TxOffload::ipv4_header`]); the IPv4 total length is ignored; the TCP
    /// checksum field holds the pseudo-header sum computed with a TCP length of **zero**.
    /// An IPv6 frame: the IPv6 Payload Length is ignored the same way and the IPv6
    /// pseudo-header sum is computed with an upper-layer length of zero.
    PerSegment,
    /// virtio-net GSO (VIRTIO 1.2 section 5.1.6.2; what Linux's virtio_net sends): the headers
    /// describe the large packet as a receiver would see it: IPv4 total length of the whole
    /// packet, a valid IPv4 header checksum (no IPv4 checksum request), and the TCP checksum
    /// field holding the pseudo-header sum over the whole TCP length. An IPv6 frame: the
    /// Payload Length of the whole packet, the pseudo-header sum over the whole TCP length.
    WholePacket,
}

/// What a device can do; the stack adapts to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub ipv4_header_checksum: bool,
    pub tcp_checksum: bool,
    pub udp_checksum: bool,
    /// Largest frame (headers included) accepted with [`TxOffload::tso`]; `None` if no TSO.
    pub tso_max_frame: Option<u32>,
    /// How TSO frames' headers must be prepared (meaningful when `tso_max_frame` is `Some`).
    pub tso_headers: TsoHeaders,
    /// TSO applies to IPv6/TCP frames too ([`TxOffload::ipv6_header`]). TCP checksum
    /// offload (`tcp_checksum`) always covers both families: it works by offsets.
    pub tso_ipv6: bool,
    /// Most segments one frame may have.
    pub max_tx_segments: usize,
    /// Largest IP packet on the wire (Ethernet MTU), normally 1500.
    pub mtu: usize,
    /// Inline TLS record encryption ([`TxFrame::with_tls`]); `None` for NICs without it
    /// (e1000, e1000e, virtio-net), whose TLS frames the stack encrypts itself.
    pub tls_tx: Option<TlsTxCapability>,
}

/// A filled receive buffer, lent to the caller until [`NetQueue::rx_recycle`].
#[derive(Debug, PartialEq, Eq)]
pub struct RxBuffer {
    /// Driver-private slot number.
    pub slot: u32,
    /// Frame length in bytes (without the Ethernet FCS).
    pub len: u32,
}

/// Device counters, cumulative since the driver started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames the device dropped for lack of receive buffers.
    pub rx_missed: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    /// Times the TX-hang watchdog reset the device.
    pub watchdog_resets: u64,
    /// Doorbell (tail register / notification) writes, TX and RX.
    pub doorbells: u64,
}

/// The API every NIC driver implements.
pub trait NetQueue {
    /// The station address the device uses.
    fn mac_address(&self) -> MacAddress;
    /// The device's DMA address space: allocate header buffers and map page-cache memory
    /// here so the device can read them.
    fn dma(&self) -> &Arc<DmaSpace>;
    /// What offloads the device offers.
    fn capabilities(&self) -> Capabilities;
    /// Whether the link is up now.
    fn link_up(&mut self) -> bool;

    /// How many more frames of `segments` segments fit on the TX ring now.
    fn tx_capacity(&self, segments: usize) -> usize;
    /// Place a frame on the TX ring (no doorbell). On error nothing was queued.
    fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> Result<(), DriverError>;
    /// Tell the device about every frame queued since the last flush (one doorbell).
    fn tx_flush(&mut self);
    /// Report completed frames, oldest first, by calling `done(token)`; returns how many.
    /// Also runs the TX-hang watchdog: a ring that makes no progress for too long is reset
    /// and reported as [`DriverError::TxHang`] (the tokens of lost frames are returned first).
    fn tx_reap(&mut self, done: &mut dyn FnMut(TxToken)) -> Result<usize, DriverError>;

    /// Take the next received frame, if any.
    fn rx_next(&mut self) -> Option<RxBuffer>;
    /// Copies the bytes of a received frame into `out` and returns them (`&out[..n]`, `n` the
    /// smaller of the frame length and `out.len()`). The copy uses volatile reads: the buffer
    /// is memory the device may write, which is never lent out as a Rust slice.
    ///
    /// # Panics
    /// If `buffer` is not a buffer this queue lent out and that is still lent.
    fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8];
    /// Give a buffer back to the driver for reuse.
    fn rx_recycle(&mut self, buffer: RxBuffer);
    /// Publish recycled buffers to the device (one doorbell).
    fn rx_flush(&mut self);

    /// Receive up to `budget` frames, calling `f` on each, then recycle and flush.
    fn rx_poll(&mut self, budget: usize, f: &mut dyn FnMut(&[u8])) -> usize {
        let mut frame = [0u8; MAX_RX_FRAME];
        let mut n = 0;
        while n < budget {
            let Some(buffer) = self.rx_next() else { break };
            f(self.rx_read(&buffer, &mut frame));
            self.rx_recycle(buffer);
            n += 1;
        }
        if n > 0 {
            self.rx_flush();
        }
        n
    }

    /// Cumulative device statistics.
    fn stats(&mut self) -> DeviceStats;
}
