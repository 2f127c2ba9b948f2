//! virtio-net with several queue pairs (VIRTIO 1.2 section 5.1: VIRTIO_NET_F_MQ,
//! VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_RSS; see [`crate::multiqueue`] for the API).
//!
//! # Opening
//! [`open_nic_queues`](crate::multiqueue::open_nic_queues) first looks at the offered features. With one pair asked for, or a device
//! without CTRL_VQ and MQ/RSS, it returns one handle: the single-queue [`VirtioNet`] itself,
//! unchanged (its TX watchdog and device resets included). Otherwise it initialises the
//! device as section 3.1.1 and 5.1.5 say, taking CTRL_VQ, MQ and RSS (when offered) on top of
//! the single-queue driver's features, reads `max_virtqueue_pairs` (section 5.1.4) and uses
//! n = min(`pairs`, `max_virtqueue_pairs`) pairs: pair k is receiveq(k+1) = virtqueue 2k and
//! transmitq(k+1) = virtqueue 2k+1; the control queue is virtqueue 2 * `max_virtqueue_pairs`
//! (section 5.1.2), whatever n is. Queues above n are left disabled. Every pair has its own
//! rings and buffers, sized from [`NicConfig`] as in the single-queue driver, with the same
//! RX and TX code (`super::net::VqPair`).
//!
//! # Receive steering
//! Multi-queue is off until the driver sends a `VIRTIO_NET_CTRL_MQ` command after DRIVER_OK
//! (section 5.1.6.5.5); [`open_nic_queues`](crate::multiqueue::open_nic_queues) sends it before handing out any handle, so no frame
//! is queued on a transmitq above 1 before it (section 5.1.6.5.6.1).
//! - With VIRTIO_NET_F_RSS: `VIRTIO_NET_CTRL_MQ_RSS_CONFIG` (section 5.1.6.5.7.1) with the
//!   key [`RSS_KEY`], hash types TCPv4 and TCPv6 (those of them the device's
//!   `supported_hash_types` has), a [`RSS_TABLE_LEN`]-entry indirection table whose entry i
//!   is receive queue i mod n ([`indirection_table`]), `unclassified_queue` 0 and
//!   `max_tx_vq` n. IPv4/IPv6 (address-only) hashing is deliberately not enabled: with it,
//!   ICMP, UDP and IP fragments would be spread over the queues by address pair, away from
//!   ARP and NDP; without it every frame that is not TCP (or is a TCP fragment or IPv6 with
//!   extension headers) lands on pair 0, as [`crate::multiqueue`] promises, so one
//!   predictable queue owns all non-TCP traffic. A TCP flow lands on
//!   [`rss_queue`]`(toeplitz_hash(RSS_KEY, input), n)`, input as
//!   [`crate::multiqueue::ipv4_tcp_hash_input`] builds it (section 5.1.6.4.3.1).
//! - Without RSS (MQ only): `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` with n (section
//!   5.1.6.5.6). The device then steers automatically: after the driver sent a frame of a
//!   flow on transmitq X, it SHOULD queue that flow's incoming frames on receiveq X; frames of
//!   flows not (yet) transmitted on may land on any of the n receive queues. So a flow's
//!   first packet (a SYN) can arrive anywhere, and answering it on the pair it arrived on
//!   keeps the flow there.
//!
//! A command the device answers with VIRTIO_NET_ERR, or does not answer within
//! [`CONTROL_TIMEOUT`], fails the open with [`DriverError::Device`].
//!
//! # Interrupts
//! With [`NicConfig::interrupts`], MSI-X with n + 1 vectors: vector 0 for configuration
//! changes (link status), vector k + 1 for both queues of pair k (section 4.1.5.1.2); the
//! control queue has none (the driver polls it, only while opening). Each handle's
//! [`Interruptible`] works on its own vector alone, as [`VirtioNet`]'s does on its one:
//! arming clears VIRTQ_AVAIL_F_NO_INTERRUPT on its two rings, disarming sets it and reads its
//! eventfd. Pair 0 also gets the configuration vector's eventfd, so a link change wakes its
//! thread. Without MSI-X, or with fewer vectors than n + 1, the handles poll only
//! (`irq_mode()` is `None`; logged): one INTx line or MSI message cannot be split between
//! threads.
//!
//! # What the handles share
//! Each [`VirtioNetQueue`] owns its pair exclusively (`&mut self`); the device-wide state is
//! one `Arc`: the VFIO device and its DMA space, the mapped transport, the negotiated
//! features, the MAC, the interrupt enablement and the fault flag. After opening the handles
//! use only registers that need no `queue_select`: their own notification addresses, the
//! device status byte and the configuration `status` field, so they never interfere. The
//! device is reset (and its interrupts disabled) when the last handle is dropped; a dropped
//! handle's rings and buffers are kept until then, since the device may still write into them.
//!
//! # Faults: no reset in multi-queue mode
//! The single-queue driver resets and re-initialises the device on a TX hang, on
//! DEVICE_NEEDS_RESET, or when the device returns a used id that is not outstanding. A reset
//! stops every queue, so here it would pull the rings from under the other threads. Instead,
//! the handle that notices such a fault marks the whole device failed, and from then on
//! every handle reports [`DriverError::QueueFault`] (naming the queue that noticed it) from
//! `tx_reap` and `tx_enqueue`, receives nothing, reports the link down and has no TX
//! capacity. Frames in flight then are not handed back (the device may still read them):
//! the caller drops every handle, which resets the device and frees the memory, and opens
//! it again. `QueueFault` is not [`DriverError::is_recovered`]. The TX watchdog is
//! per queue, with [`NicConfig::tx_hang_timeout`] as in the single-queue driver.
//!
//! # A receive queue that ran dry notifies every receive queue
//! The specification lets a driver notify a queue whenever it likes (a notification only
//! says "look at the available ring again", section 2.7.13.4); it asks for one when the
//! device wants it. With more than one pair, when a receive queue's device side asked for a
//! notification (it found the ring without room), the handle refilling it notifies every
//! other receive queue too. Why: a device that steers in software may have been holding a
//! frame for this queue in the backend of another (QEMU's virtio-net, 7.2 at least, parks
//! such a frame on the queue its TAP queue feeds, and looks at it again only when *that*
//! receive queue is notified; the notification of the queue that ran dry does not release
//! it, and that TAP queue's flows stop for good: seen as a two-queue server that stopped
//! answering under `wrk -c256`). It costs one doorbell per other pair, only after a ring ran
//! dry.

use std::os::fd::{AsRawFd, RawFd};

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

use crate::anynic::NicConfig;
use crate::dma::{DmaAccess, DmaRegion, DmaSpace};
use crate::error::{DriverError, Result};
use crate::irq::{DeviceIrq, Interruptible, IrqMode};
use crate::multiqueue::{QueuePair, RSS_KEY};
use crate::queue::{Capabilities, DeviceStats, MacAddress, NetQueue, RxBuffer, TxFrame, TxToken};
use crate::vfio::VfioPci;

use super::features as f;
use super::net::{
    check_open, fit_queue_size, link_status, negotiate, read_mac, Ring, VirtioNet, VqPair,
};
use super::packed::write_indirect_desc;
use super::transport::{DeviceStatus, VirtioPciTransport, NO_VECTOR};
use super::virtqueue::{write_desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE};

/// `struct virtio_net_config` (section 5.1.4): `u8 mac[6]; le16 status;
/// le16 max_virtqueue_pairs; le16 mtu; le32 speed; u8 duplex; u8 rss_max_key_size;
/// le16 rss_max_indirection_table_length; le32 supported_hash_types;`.
const CONFIG_MAX_VIRTQUEUE_PAIRS: usize = 8;
const CONFIG_RSS_MAX_KEY_SIZE: usize = 17;
const CONFIG_RSS_MAX_INDIRECTION_TABLE_LENGTH: usize = 18;
const CONFIG_SUPPORTED_HASH_TYPES: usize = 20;

/// Section 5.1.4: "Legal values are between 1 and 0x8000" (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX).
const MAX_VIRTQUEUE_PAIRS: u16 = 0x8000;

/// `struct virtio_net_ctrl` class and commands (section 5.1.6.5.5).
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_MQ_RSS_CONFIG: u8 = 1;
/// `ack` values (section 5.1.6.5).
const CTRL_OK: u8 = 0;
/// Written into the ack byte before a command: neither VIRTIO_NET_OK nor VIRTIO_NET_ERR, so an
/// ack the device never wrote is not taken for an answer.
const ACK_POISON: u8 = 0xa5;

/// Hash types (section 5.1.6.4.3.1, "Supported/enabled hash types").
pub const HASH_TYPE_IPV4: u32 = 1 << 0;
pub const HASH_TYPE_TCPV4: u32 = 1 << 1;
pub const HASH_TYPE_IPV6: u32 = 1 << 3;
pub const HASH_TYPE_TCPV6: u32 = 1 << 4;
/// The hash types the driver enables (when supported): TCP over IPv4 and IPv6 only (see the
/// module documentation).
pub const HASH_TYPES: u32 = HASH_TYPE_TCPV4 | HASH_TYPE_TCPV6;

/// Indirection table entries programmed: 128, the least `rss_max_indirection_table_length`
/// a device offering RSS may report (section 5.1.4.1), so every conforming device takes it.
pub const RSS_TABLE_LEN: usize = 128;

/// How long a control command may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Control queue entries (one command is in flight at a time).
const CONTROL_QUEUE_SIZE: u16 = 8;
/// Largest command: class, command and `struct virtio_net_rss_config` with a
/// [`RSS_TABLE_LEN`]-entry table and a 40-byte key.
const CONTROL_BUFFER: usize = 512;

/// How long the device must be idle before a handle reads its status register.
const STATUS_CHECK_INTERVAL: Duration = Duration::from_millis(1);

/// The receive queue (pair index) the RSS indirection table [`indirection_table`]`(n,
/// RSS_TABLE_LEN)` picks for a hash: entry `hash & (RSS_TABLE_LEN - 1)` (section
/// 5.1.6.5.7.2: the mask applied to the hash indexes the table).
pub fn rss_queue(hash: u32, pairs: usize) -> usize {
    indirection_entry(hash as usize & (RSS_TABLE_LEN - 1), pairs)
}

fn indirection_entry(i: usize, pairs: usize) -> usize {
    i % pairs.max(1)
}

/// An indirection table of `len` entries spreading over `pairs` receive queues round-robin:
/// entry i is receive queue i mod `pairs`, as `struct rss_rq_id` values (section 5.1.6.5.7.1:
/// bits 1 to 16 of the virtqueue index, i.e. the 0-based receive queue number).
pub fn indirection_table(pairs: usize, len: usize) -> Vec<u16> {
    (0..len)
        .map(|i| indirection_entry(i, pairs) as u16)
        .collect()
}

/// `struct virtio_net_rss_config` (section 5.1.6.5.7.1): `le32 hash_types;
/// le16 indirection_table_mask; struct rss_rq_id unclassified_queue;
/// struct rss_rq_id indirection_table[mask + 1]; le16 max_tx_vq; u8 hash_key_length;
/// u8 hash_key_data[hash_key_length];`. `table.len()` must be a power of two.
pub fn rss_config(
    hash_types: u32,
    table: &[u16],
    unclassified: u16,
    max_tx_vq: u16,
    key: &[u8],
) -> Vec<u8> {
    debug_assert!(table.len().is_power_of_two() && key.len() <= u8::MAX as usize);
    let mut out = Vec::with_capacity(4 + 2 + 2 + 2 * table.len() + 2 + 1 + key.len());
    out.extend_from_slice(&hash_types.to_le_bytes());
    out.extend_from_slice(&(table.len() as u16 - 1).to_le_bytes());
    out.extend_from_slice(&unclassified.to_le_bytes());
    for &entry in table {
        out.extend_from_slice(&entry.to_le_bytes());
    }
    out.extend_from_slice(&max_tx_vq.to_le_bytes());
    out.push(key.len() as u8);
    out.extend_from_slice(key);
    out
}

/// How received frames are spread over the pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Steering {
    /// One pair: nothing to program.
    Single,
    /// VIRTIO_NET_CTRL_MQ_RSS_CONFIG with these hash types and this many table entries.
    Rss { hash_types: u32, table_len: usize },
    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: the device's automatic steering (RX follows TX).
    Automatic,
}

/// The control virtqueue (section 5.1.6.5), polled.
struct ControlQueue {
    vq: Ring,
    index: u16,
    notify: usize,
    /// class, command, command-specific data: the device reads it.
    out: DmaRegion,
    /// The ack byte: the device writes it.
    ack: DmaRegion,
    /// With VIRTIO_F_INDIRECT_DESC: the command's two-entry indirect table (packed rings are
    /// used only with it, and then every buffer is one descriptor).
    table: Option<DmaRegion>,
    packed: bool,
}

impl ControlQueue {
    fn new(
        t: &VirtioPciTransport,
        dma: &Arc<DmaSpace>,
        negotiated: u64,
        index: u16,
    ) -> Result<Self> {
        let size = fit_queue_size(t, CONTROL_QUEUE_SIZE, index)?;
        let packed = negotiated & f::F_RING_PACKED != 0;
        if size < 2 && negotiated & f::F_INDIRECT_DESC == 0 {
            return Err(DriverError::Device(format!(
                "virtio-net control queue of {size} entries cannot hold a command"
            )));
        }
        Ok(ControlQueue {
            vq: Ring::new(dma, index, size, packed, DmaAccess::DeviceReadsWrites)?,
            index,
            notify: 0,
            out: dma.allocate(CONTROL_BUFFER, DmaAccess::DeviceReads)?,
            ack: dma.allocate(1, DmaAccess::DeviceReadsWrites)?,
            table: if negotiated & f::F_INDIRECT_DESC != 0 {
                Some(dma.allocate(2 * DESC_SIZE, DmaAccess::DeviceReads)?)
            } else {
                None
            },
            packed,
        })
    }

    fn setup(&mut self, t: &VirtioPciTransport) -> Result<()> {
        self.notify = t.setup_queue(self.index, self.vq.size(), self.vq.areas(), NO_VECTOR)?;
        Ok(())
    }

    /// Send one command and wait for the device's ack (section 5.1.6.5): a device-readable
    /// buffer with `class`, `command` and `data`, then a device-writable one for `ack`.
    fn command(
        &mut self,
        t: &VirtioPciTransport,
        class: u8,
        command: u8,
        data: &[u8],
    ) -> Result<()> {
        let len = 2 + data.len();
        if len > CONTROL_BUFFER {
            return Err(DriverError::InvalidArgument(format!(
                "virtio-net control command of {len} bytes"
            )));
        }
        self.out.write_bytes(0, &[class, command]);
        self.out.write_bytes(2, data);
        self.ack.write_bytes(0, &[ACK_POISON]);
        let out = (self.out.iova(), len as u32);
        let ack = (self.ack.iova(), 1u32);
        if let Some(table) = &self.table {
            if self.packed {
                // Section 2.8.19: consecutive entries, no NEXT.
                write_indirect_desc(table, 0, out.0, out.1, 0);
                write_indirect_desc(table, DESC_SIZE, ack.0, ack.1, DESC_F_WRITE);
            } else {
                // Section 2.7.5.3.
                write_desc(table, 0, out.0, out.1, DESC_F_NEXT, 1);
                write_desc(table, DESC_SIZE, ack.0, ack.1, DESC_F_WRITE, 0);
            }
            self.vq
                .post(0, table.iova(), 2 * DESC_SIZE as u32, DESC_F_INDIRECT);
        } else {
            // Split only (packed rings come with indirect descriptors): descriptors 0 -> 1.
            let q = self.vq.split();
            q.set_desc(0, out.0, out.1, DESC_F_NEXT, 1);
            q.set_desc(1, ack.0, ack.1, DESC_F_WRITE, 0);
            q.push_avail(0);
        }
        self.vq.publish();
        t.notify(self.notify, self.index);
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let (id, _written) = loop {
            if let Some(used) = self.vq.pop_used() {
                break used;
            }
            if t.status() & DeviceStatus::DEVICE_NEEDS_RESET != 0 {
                return Err(DriverError::Device(format!(
                    "virtio-net set DEVICE_NEEDS_RESET on control command {class}/{command}"
                )));
            }
            if Instant::now() > deadline {
                return Err(DriverError::Timeout("virtio-net control command"));
            }
            std::thread::sleep(Duration::from_micros(50));
        };
        if id != 0 {
            return Err(DriverError::Device(format!(
                "virtio-net control queue returned buffer {id}, not the command's"
            )));
        }
        let mut ack = [0u8];
        self.ack.read_bytes(0, &mut ack);
        match ack[0] {
            CTRL_OK => Ok(()),
            other => Err(DriverError::Device(format!(
                "virtio-net refused control command class {class} command {command}: ack {other:#04x}{}",
                if other == ACK_POISON { " (never written)" } else { "" }
            ))),
        }
    }
}

/// The first fault any handle noticed: (queue, what). Set once, never cleared (see the
/// module documentation).
#[derive(Default)]
struct FaultFlag(OnceLock<(usize, String)>);

impl FaultFlag {
    fn is_set(&self) -> bool {
        self.0.get().is_some()
    }

    /// The error every handle reports once the flag is set.
    fn error(&self) -> Option<DriverError> {
        self.0.get().map(|(queue, reason)| DriverError::QueueFault {
            queue: *queue,
            reason: reason.clone(),
        })
    }

    /// Record a fault noticed on `queue` (a later one is only logged) and return the error
    /// to report: the first fault's.
    fn declare(&self, queue: usize, reason: String) -> DriverError {
        if self.0.set((queue, reason.clone())).is_ok() {
            tracing::error!(queue, "virtio-net multi-queue fault, not reset: {reason}");
        } else {
            tracing::debug!(
                queue,
                "virtio-net multi-queue fault after the first: {reason}"
            );
        }
        self.error().expect("set above or before")
    }
}

/// The device-wide part, shared by every handle.
struct Device {
    transport: VirtioPciTransport,
    /// MSI-X, n + 1 vectors, or none. Each handle reads its own vectors' eventfds through
    /// duplicates; this keeps the interrupts enabled until the device is dropped.
    irq: Option<DeviceIrq>,
    pci: VfioPci,
    config: NicConfig,
    offered: u64,
    negotiated: u64,
    mac: MacAddress,
    max_pairs: u16,
    steering: Steering,
    fault: FaultFlag,
    ctrl: Mutex<Option<ControlQueue>>,
    /// Pairs not (or no longer) owned by a handle: while opening, and after a handle is
    /// dropped. Freed only after the reset in `Drop`, as the device may still use them.
    parked: Mutex<Vec<VqPair>>,
    /// Every pair's receive queue notification (offset, queue index), by pair, once open.
    rx_doorbells: Vec<(usize, u16)>,
}

impl Drop for Device {
    fn drop(&mut self) {
        // Stop all DMA before the rings and buffers (fields, dropped after this) are unmapped.
        if let Err(e) = self.transport.reset() {
            tracing::error!("virtio-net: reset on close failed: {e}");
        }
    }
}

/// Opens the virtio-net device behind `pci` with up to `pairs` queue pairs and programs the
/// receive steering (see the module documentation). Handles are in pair order. Called by
/// [`crate::multiqueue::open_nic_queues`], which has checked `pairs >= 1`.
pub(crate) fn open_queues(
    pci: VfioPci,
    config: &NicConfig,
    pairs: usize,
) -> Result<Vec<Box<dyn QueuePair>>> {
    check_open(&pci, config)?;
    pci.enable_bus_master()?;
    let offered = {
        // A look at the offered features (section 3.1.1 steps 1-4), then a reset again.
        let t = VirtioPciTransport::new(&pci)?;
        t.reset()?;
        t.add_status(DeviceStatus::ACKNOWLEDGE);
        t.add_status(DeviceStatus::DRIVER);
        let offered = t.device_features();
        t.reset()?;
        offered
    };
    let multi = offered & f::NET_F_CTRL_VQ != 0 && offered & (f::NET_F_MQ | f::NET_F_RSS) != 0;
    if pairs == 1 || !multi {
        if pairs > 1 {
            tracing::info!(
                offered = %f::names(offered).join(","),
                "virtio-net offers no multi-queue (MQ or RSS with CTRL_VQ): one queue pair"
            );
        }
        let nic: Box<dyn QueuePair> = Box::new(VirtioNet::open(pci, config)?);
        return Ok(vec![nic]);
    }
    let transport = VirtioPciTransport::new(&pci)?;
    let mut dev = Device {
        transport,
        irq: None,
        pci,
        config: config.clone(),
        offered,
        negotiated: 0,
        mac: MacAddress([0; 6]),
        max_pairs: 0,
        steering: Steering::Single,
        fault: FaultFlag::default(),
        ctrl: Mutex::new(None),
        parked: Mutex::new(Vec::new()),
        rx_doorbells: Vec::new(),
    };
    if let Err(e) = initialise(&mut dev, pairs) {
        dev.transport.fail();
        // Dropping `dev` resets the device before its rings are freed.
        return Err(e);
    }
    let pairs_taken: Vec<VqPair> =
        std::mem::take(&mut *dev.parked.lock().unwrap_or_else(|p| p.into_inner()));
    let n = pairs_taken.len();
    dev.rx_doorbells = pairs_taken.iter().map(VqPair::rx_doorbell).collect();
    tracing::info!(
        mac = %dev.mac,
        pairs = n,
        max_virtqueue_pairs = dev.max_pairs,
        steering = ?dev.steering,
        interrupts = dev.irq.is_some(),
        "virtio-net multi-queue ready"
    );
    let dev = Arc::new(dev);
    let mut handles: Vec<Box<dyn QueuePair>> = Vec::with_capacity(n);
    for (index, q) in pairs_taken.into_iter().enumerate() {
        let irq = match &dev.irq {
            Some(irq) => {
                let mut all = irq.clone_vectors(n + 1)?;
                // Vector 0 is the configuration's (pair 0 listens to it too), k + 1 pair k's.
                let mine: Vec<EventFd> = if index == 0 {
                    all.drain(..2).collect()
                } else {
                    vec![all.swap_remove(index + 1)]
                };
                Some(QueueIrq {
                    fds: mine,
                    count: 0,
                })
            }
            None => None,
        };
        handles.push(Box::new(VirtioNetQueue {
            q: Some(q),
            index,
            dev: Arc::clone(&dev),
            irq,
            last_status_check: Instant::now(),
        }));
    }
    Ok(handles)
}

/// Section 3.1.1 with the multi-queue steps of section 5.1.5: features, queue pairs,
/// interrupts, virtqueues, DRIVER_OK, then the steering command. The device has been reset.
fn initialise(dev: &mut Device, pairs: usize) -> Result<()> {
    let t = &dev.transport;
    let (offered, negotiated) = negotiate(
        t,
        &dev.config,
        None,
        f::NET_F_CTRL_VQ | f::NET_F_MQ | f::NET_F_RSS,
    )?;
    dev.offered = offered;
    dev.negotiated = negotiated;
    let mq = negotiated & f::NET_F_MQ != 0;
    let rss = negotiated & f::NET_F_RSS != 0;
    if !(mq || rss) {
        return Err(DriverError::Device(format!(
            "virtio-net did not take MQ or RSS (negotiated {})",
            f::names(negotiated).join(",")
        )));
    }
    // Section 5.1.4: exists with MQ or RSS; 1 to 0x8000 (section 5.1.4.1).
    let max_pairs = t.device_config_read16(CONFIG_MAX_VIRTQUEUE_PAIRS)?;
    if !(1..=MAX_VIRTQUEUE_PAIRS).contains(&max_pairs) {
        return Err(DriverError::Device(format!(
            "virtio-net max_virtqueue_pairs {max_pairs} is not between 1 and 0x8000"
        )));
    }
    dev.max_pairs = max_pairs;
    let n = pairs.min(max_pairs as usize);
    dev.steering = if n == 1 {
        Steering::Single
    } else if rss {
        let key_max = t.device_config_read8(CONFIG_RSS_MAX_KEY_SIZE)?;
        let table_max = t.device_config_read16(CONFIG_RSS_MAX_INDIRECTION_TABLE_LENGTH)?;
        let supported = t.device_config_read32(CONFIG_SUPPORTED_HASH_TYPES)?;
        // Section 5.1.4.1: at least 40 and at least 128 when RSS is offered; section
        // 5.1.6.5.7.2: no hash type the device does not support.
        let hash_types = HASH_TYPES & supported;
        if (key_max as usize) < RSS_KEY.len() || (table_max as usize) < RSS_TABLE_LEN {
            return Err(DriverError::Device(format!(
                "virtio-net RSS limits too small: rss_max_key_size {key_max} (needs {}), rss_max_indirection_table_length {table_max} (needs {RSS_TABLE_LEN})",
                RSS_KEY.len()
            )));
        }
        if hash_types == 0 {
            if !mq {
                return Err(DriverError::Device(format!(
                    "virtio-net RSS supports none of the TCP hash types (supported_hash_types {supported:#x})"
                )));
            }
            tracing::warn!(
                supported,
                "virtio-net RSS hashes no TCP: automatic steering instead"
            );
            Steering::Automatic
        } else {
            Steering::Rss {
                hash_types,
                table_len: RSS_TABLE_LEN,
            }
        }
    } else {
        Steering::Automatic
    };
    dev.mac = read_mac(t, negotiated)?;

    // Interrupts before the queues: queue_msix_vector is written at set-up (section
    // 4.1.5.1.2). Only MSI-X gives each pair its own.
    if dev.config.interrupts {
        let want = n as u32 + 1;
        match dev.pci.enable_interrupts(&[IrqMode::MsiX], want) {
            Ok(irq) if irq.fds().len() as u32 == want => dev.irq = Some(irq),
            Ok(irq) => tracing::warn!(
                vectors = irq.fds().len(),
                want,
                "virtio-net: too few MSI-X vectors for one per queue pair; polling"
            ),
            Err(e) => {
                tracing::warn!("virtio-net multi-queue needs MSI-X for interrupts ({e}); polling")
            }
        }
    }
    let t = &dev.transport;
    if dev.irq.is_some() {
        t.set_config_vector(0)?;
    }
    let dma = Arc::clone(dev.pci.dma());
    {
        let mut parked = dev.parked.lock().unwrap_or_else(|p| p.into_inner());
        for k in 0..n {
            let mut q = VqPair::new(t, &dma, &dev.config, negotiated, k as u16)?;
            let vector = if dev.irq.is_some() {
                k as u16 + 1
            } else {
                NO_VECTOR
            };
            // Parked first, so an error from here on still frees it only after the reset.
            let setup = q.setup(t, vector);
            parked.push(q);
            setup?;
        }
    }
    let mut ctrl = ControlQueue::new(t, &dma, negotiated, 2 * max_pairs)?;
    let setup = ctrl.setup(t);
    let mut slot = dev.ctrl.lock().unwrap_or_else(|p| p.into_inner());
    let ctrl = slot.insert(ctrl);
    setup?;

    // Section 3.1.1 step 8 (and no notification before it).
    t.add_status(DeviceStatus::DRIVER_OK);
    let status = t.status();
    if status & (DeviceStatus::DEVICE_NEEDS_RESET | DeviceStatus::FAILED) != 0 {
        return Err(DriverError::Device(format!(
            "virtio-net refused DRIVER_OK: status {status:#04x}"
        )));
    }
    for q in dev
        .parked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter_mut()
    {
        q.kick_rx(t);
    }
    match dev.steering {
        Steering::Single => {}
        Steering::Rss {
            hash_types,
            table_len,
        } => {
            let table = indirection_table(n, table_len);
            let data = rss_config(hash_types, &table, 0, n as u16, &RSS_KEY);
            ctrl.command(t, CTRL_MQ, CTRL_MQ_RSS_CONFIG, &data)?;
        }
        Steering::Automatic => {
            ctrl.command(t, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &(n as u16).to_le_bytes())?;
        }
    }
    drop(slot);
    let link_deadline = Instant::now() + dev.config.link_wait;
    while !link_status(t, negotiated) && Instant::now() < link_deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// One handle's interrupt vectors.
struct QueueIrq {
    /// Duplicates of its eventfds (pair 0: the configuration vector's too).
    fds: Vec<EventFd>,
    count: u64,
}

impl QueueIrq {
    /// Read (and so reset) the eventfds; returns the interrupts they counted.
    fn drain(&mut self) -> u64 {
        let mut n = 0;
        for fd in &self.fds {
            // Non-blocking (EFD_NONBLOCK is shared with the original): WouldBlock is no
            // interrupt.
            n += fd.read().unwrap_or(0);
        }
        self.count += n;
        n
    }
}

/// One queue pair of a multi-queue virtio-net device (see the module documentation).
pub struct VirtioNetQueue {
    /// Always `Some` until `Drop` parks it in the device.
    q: Option<VqPair>,
    index: usize,
    dev: Arc<Device>,
    irq: Option<QueueIrq>,
    last_status_check: Instant,
}

impl VirtioNetQueue {
    fn q(&self) -> &VqPair {
        self.q.as_ref().expect("present until drop")
    }
    fn q_mut(&mut self) -> &mut VqPair {
        self.q.as_mut().expect("present until drop")
    }

    /// Feature bits negotiated.
    pub fn negotiated_features(&self) -> u64 {
        self.dev.negotiated
    }

    /// Feature bits the device offered.
    pub fn offered_features(&self) -> u64 {
        self.dev.offered
    }

    /// The steering programmed.
    pub fn steering(&self) -> &Steering {
        &self.dev.steering
    }

    /// The device's `max_virtqueue_pairs`.
    pub fn max_virtqueue_pairs(&self) -> u16 {
        self.dev.max_pairs
    }

    /// Read the device status when idle for a while: DEVICE_NEEDS_RESET (section 2.1.2) or a
    /// lost DRIVER_OK is a fault of the whole device.
    fn check_status(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_status_check) < STATUS_CHECK_INTERVAL
            || self.dev.fault.is_set()
        {
            return;
        }
        self.last_status_check = now;
        let status = self.dev.transport.status();
        if status & DeviceStatus::DEVICE_NEEDS_RESET != 0 {
            self.dev.fault.declare(
                self.index,
                format!("virtio-net set DEVICE_NEEDS_RESET (status {status:#04x})"),
            );
        } else if status & DeviceStatus::DRIVER_OK == 0 {
            self.dev.fault.declare(
                self.index,
                format!("virtio-net lost DRIVER_OK (status {status:#04x})"),
            );
        }
    }
}

impl Drop for VirtioNetQueue {
    fn drop(&mut self) {
        // The device may still use this pair's rings and buffers: keep them until it is
        // reset (when the last handle goes).
        if let Some(q) = self.q.take() {
            self.dev
                .parked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(q);
        }
    }
}

impl std::fmt::Debug for VirtioNetQueue {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (rx, tx) = self.q().ring_sizes();
        out.debug_struct("VirtioNetQueue")
            .field("pci", &self.dev.pci.address().to_string())
            .field("queue", &self.index)
            .field("rx_queue", &rx)
            .field("tx_queue", &tx)
            .field("in_flight", &self.q().tx_outstanding())
            .field("fault", &self.dev.fault.0.get())
            .finish()
    }
}

impl NetQueue for VirtioNetQueue {
    fn mac_address(&self) -> MacAddress {
        self.dev.mac
    }

    fn dma(&self) -> &Arc<DmaSpace> {
        self.dev.pci.dma()
    }

    fn capabilities(&self) -> Capabilities {
        self.q().caps()
    }

    fn link_up(&mut self) -> bool {
        self.check_status();
        if self.dev.fault.is_set() {
            return false;
        }
        link_status(&self.dev.transport, self.dev.negotiated)
    }

    fn tx_capacity(&self, segments: usize) -> usize {
        if self.dev.fault.is_set() {
            return 0;
        }
        self.q().tx_capacity(segments)
    }

    fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> Result<()> {
        if let Some(e) = self.dev.fault.error() {
            return Err(e);
        }
        self.q_mut().tx_enqueue(frame)
    }

    fn tx_flush(&mut self) {
        if self.dev.fault.is_set() {
            return;
        }
        let dev = Arc::clone(&self.dev);
        self.q_mut().tx_publish(&dev.transport);
    }

    fn tx_reap(&mut self, done: &mut dyn FnMut(TxToken)) -> Result<usize> {
        if let Some(e) = self.dev.fault.error() {
            return Err(e);
        }
        let completed = match self.q_mut().tx_complete(done) {
            Ok(n) => n,
            Err(id) => {
                return Err(self.dev.fault.declare(
                    self.index,
                    format!(
                        "virtio-net returned descriptor {id}, which is not an outstanding TX chain"
                    ),
                ))
            }
        };
        let Some(stalled) = self.q_mut().tx_stalled(completed) else {
            return Ok(completed);
        };
        self.check_status();
        if !self.dev.fault.is_set() && stalled > self.dev.config.tx_hang_timeout {
            let (ms, stuck) = (stalled.as_millis() as u64, self.q().tx_outstanding());
            self.dev.fault.declare(
                self.index,
                format!("TX hang: {stuck} frames made no progress for {ms} ms"),
            );
        }
        match self.dev.fault.error() {
            Some(e) => Err(e),
            None => Ok(completed),
        }
    }

    fn rx_next(&mut self) -> Option<RxBuffer> {
        if self.dev.fault.is_set() {
            return None;
        }
        match self.q_mut().rx_take() {
            Ok(Some(buffer)) => Some(buffer),
            Ok(None) => {
                self.check_status();
                None
            }
            Err(id) => {
                self.dev.fault.declare(
                    self.index,
                    format!("virtio-net returned RX descriptor {id}, which was not posted"),
                );
                None
            }
        }
    }

    fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        self.q().rx_read(buffer, out)
    }

    fn rx_recycle(&mut self, buffer: RxBuffer) {
        self.q_mut().rx_recycle(buffer)
    }

    fn rx_flush(&mut self) {
        if self.dev.fault.is_set() {
            return;
        }
        let dev = Arc::clone(&self.dev);
        if self.q_mut().rx_flush(&dev.transport) && dev.config.virtio_rx_notify_all {
            // This ring ran dry: release what the device may hold for it elsewhere (see
            // the module documentation).
            for (pair, &(offset, queue)) in dev.rx_doorbells.iter().enumerate() {
                if pair != self.index {
                    dev.transport.notify(offset, queue);
                    self.q_mut().stats.doorbells += 1;
                }
            }
        }
    }

    fn stats(&mut self) -> DeviceStats {
        self.q().stats
    }
}

impl Interruptible for VirtioNetQueue {
    fn irq_mode(&self) -> Option<IrqMode> {
        self.irq.as_ref().map(|_| IrqMode::MsiX)
    }

    fn irq_fds(&self) -> Vec<RawFd> {
        self.irq
            .as_ref()
            .map(|irq| irq.fds.iter().map(|f| f.as_raw_fd()).collect())
            .unwrap_or_default()
    }

    fn irq_arm(&mut self) {
        if self.irq.is_some() {
            self.q().set_interrupts(true);
        }
    }

    fn irq_disarm(&mut self) -> u64 {
        if self.irq.is_none() {
            return 0;
        }
        self.q().set_interrupts(false);
        // MSI-X only: edge messages, nothing to unmask.
        self.irq.as_mut().map_or(0, QueueIrq::drain)
    }

    fn irq_count(&self) -> u64 {
        self.irq.as_ref().map_or(0, |irq| irq.count)
    }
}

impl QueuePair for VirtioNetQueue {
    fn queue_index(&self) -> usize {
        self.index
    }
}

/// The single-queue driver is pair 0 of a one-pair device.
impl QueuePair for VirtioNet {
    fn queue_index(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::multiqueue::{ipv4_tcp_hash_input, toeplitz_hash};

    fn is_send<T: Send>() {}

    #[test]
    fn handles_can_move_to_other_threads() {
        is_send::<VirtioNetQueue>();
        is_send::<VirtioNet>();
    }

    #[test]
    fn the_indirection_table_spreads_round_robin_over_the_pairs() {
        let table = indirection_table(3, RSS_TABLE_LEN);
        assert_eq!(table.len(), 128);
        assert_eq!(&table[..7], &[0, 1, 2, 0, 1, 2, 0]);
        for pairs in 1..=8 {
            let table = indirection_table(pairs, RSS_TABLE_LEN);
            for q in 0..pairs as u16 {
                let hits = table.iter().filter(|&&e| e == q).count();
                assert!(
                    hits >= RSS_TABLE_LEN / pairs,
                    "{pairs} pairs: queue {q} has {hits}"
                );
            }
            assert!(table.iter().all(|&e| (e as usize) < pairs));
        }
    }

    #[test]
    fn rss_queue_follows_the_table_entry_the_masked_hash_picks() {
        // The specification's first IPv4/TCP example: hash 0x51ccc178, entry 0x78 = 120.
        let input = ipv4_tcp_hash_input([66, 9, 149, 187], [161, 142, 100, 80], 2794, 1766);
        let hash = toeplitz_hash(&RSS_KEY, &input);
        assert_eq!(hash & 127, 120);
        assert_eq!(rss_queue(hash, 2), 0);
        assert_eq!(rss_queue(hash, 4), 0);
        assert_eq!(rss_queue(hash, 7), 1);
        let table = indirection_table(7, RSS_TABLE_LEN);
        for h in [0u32, 1, 127, 128, 0xdead_beef, u32::MAX] {
            assert_eq!(rss_queue(h, 7), table[h as usize & 127] as usize);
        }
    }

    #[test]
    fn rss_config_has_the_specification_layout() {
        let table = indirection_table(2, 4);
        let key = [0xaa; 40];
        let c = rss_config(HASH_TYPES, &table, 0, 2, &key);
        assert_eq!(c.len(), 4 + 2 + 2 + 2 * 4 + 2 + 1 + 40);
        assert_eq!(&c[..4], &(HASH_TYPE_TCPV4 | HASH_TYPE_TCPV6).to_le_bytes());
        assert_eq!(&c[..4], &[0x12, 0, 0, 0]);
        assert_eq!(&c[4..6], &[3, 0], "indirection_table_mask = entries - 1");
        assert_eq!(&c[6..8], &[0, 0], "unclassified_queue: receiveq1");
        assert_eq!(&c[8..16], &[0, 0, 1, 0, 0, 0, 1, 0]);
        assert_eq!(&c[16..18], &[2, 0], "max_tx_vq");
        assert_eq!(c[18], 40, "hash_key_length");
        assert_eq!(&c[19..], &key[..]);
        // The real command fits the control buffer.
        let full = rss_config(
            HASH_TYPES,
            &indirection_table(8, RSS_TABLE_LEN),
            0,
            8,
            &RSS_KEY,
        );
        assert!(2 + full.len() <= CONTROL_BUFFER);
    }

    #[test]
    fn a_fault_is_reported_by_every_queue_with_the_first_reason() {
        let flag = FaultFlag::default();
        assert!(!flag.is_set() && flag.error().is_none());
        let first = flag.declare(1, "TX hang".into());
        let later = flag.declare(0, "DEVICE_NEEDS_RESET".into());
        for e in [first, later, flag.error().unwrap()] {
            assert!(
                matches!(&e, DriverError::QueueFault { queue: 1, reason } if reason == "TX hang"),
                "{e:?}"
            );
            assert!(!e.is_recovered());
            assert!(e.to_string().contains("queue 1: TX hang"), "{e}");
        }
    }
}
