//! The 82574L's two queue pairs with receive-side scaling (see [`crate::multiqueue`]).
//!
//! [`open_nic_queues`](crate::multiqueue::open_nic_queues) gives the 82540EM and 82545EM (one queue each), and the 82574L asked for
//! one pair, today's single-queue [`E1000`] driver as pair 0. An 82574L asked for two or more
//! gets two [`E1000Queue`]s, each with its own receive ring, transmit ring, MSI-X vector and
//! counters, to be driven by one thread each.
//!
//! # Device set-up (82574 DS chapter 7.1.2, registers in chapter 10.2)
//! - **Rings.** Receive queue n at RDBALn..RDTn, transmit queue n at TDBALn..TDTn, TXDCTLn,
//!   TARCn: the queue-0 offsets plus n * 0x100 ([`regs::queue_reg`]). Both transmit queues
//!   get the multi-queue TARC bits of the 82574 transmit-arbitration erratum and
//!   TARCn.ENABLE ([`regs::TARC_82574_MQ`]).
//! - **Descriptors.** RSS needs the extended receive descriptor (RFCTL.EXTEN, 82574 DS 7.1.4)
//!   with RXCSUM.PCSD set, so that the write-back's first quadword carries the RSS type and
//!   hash instead of the packet checksum (82574 DS 7.1.2). The ring code is the one of the
//!   single-queue driver with [`super::desc::RxFormat::Extended`]; the same integrity check (a
//!   destination address the filter would not pass means the data never landed) applies.
//! - **RSS.** RSSRK = [`RSS_KEY`] (key byte 0 in the low byte of RSSRK0), RETA entry i = queue
//!   `i % n` (bit 7 of each byte, the 82574's queue index), MRQC = RSS enabled with the
//!   TcpIPv4 and TcpIPv6 hash functions. The IPv4-only and IPv6-only functions are **left
//!   off**: with them, ICMP, ICMPv6 (neighbour discovery), UDP and IP fragments would be
//!   spread by address pair, so the queue that runs the neighbour cache and answers pings
//!   would change per peer, and the fragments of a TCP segment would land on another queue
//!   than its flow. Without them every frame the TCP hash does not cover (ARP, ICMP, NDP,
//!   UDP, fragments) gets RSS type 0 and goes to queue 0 (82574 DS 7.1.2), as
//!   [`crate::multiqueue`] promises. [`rss_queue`] predicts the queue of a hash.
//! - **Interrupts** (82574 DS 7.4.2 MSI-X, 10.2.4.9 IVAR): MSI-X only, one vector per pair:
//!   RxQn and TxQn to vector n, and Other (link change, receiver overrun) to vector 0, so
//!   pair 0 also wakes for link events. Each pair arms and disarms only its own causes with
//!   IMS/IMC (write-1 registers, so two threads never undo each other's bits) and clears
//!   them in ICR by writing 1s; ICR is never read, because a read clears every cause, the
//!   other pair's included, while IMS is 0 (82574 DS 10.2.4.1). Without MSI-X the pairs poll
//!   (one MSI or INTx line cannot wake two threads separately).
//!
//! # Sharing between the pairs
//! Device-wide state lives in one `Shared` value behind an `Arc`: the mapped BAR, the
//! VFIO device (and with it the DMA space), the interrupt eventfds, the ring memory, the
//! station address and a lock for the transmit-reset sequence. MMIO from two threads goes
//! to different registers (each pair's tails, its IMS/IMC/ICR bits), or only reads (STATUS
//! for the link). No global mutable state. The device is reset, and the ring memory
//! unmapped, only when the last pair is dropped; a pair 1 dropped early first points the
//! whole RETA at queue 0, so its flows are not black-holed (frames already on its ring are
//! lost).
//!
//! # Counters
//! The 82574's statistics registers count the whole device, so each pair counts its own
//! traffic: `tx_frames`/`tx_bytes` are the wire frames (TSO segments) and bytes (without
//! FCS, padded to 60) of the frames the device completed (DD written back, reaped or not), `rx_frames`/`rx_bytes` the good frames it
//! handed out, `rx_errors` the frames its ring dropped, `doorbells` and `watchdog_resets`
//! its own. Pair 0 also carries the device-wide clear-on-read error counters: `rx_missed`
//! (MPC), CRC and receive errors, and the transmit errors.
//!
//! # TX hang in multi-queue mode
//! The watchdog works per pair as in the single-queue driver: a pair whose flushed frames
//! make no progress for [`NicConfig::tx_hang_timeout`] with the link up resets **its own**
//! transmit ring and returns [`DriverError::TxHang`] after handing back every outstanding
//! token. The 82574 has no per-queue transmit enable, and TDH may only be written while
//! TCTL.EN is 0 (SDM 13.4.39), so the reset clears the device-wide TCTL.EN for about 10 ms:
//! the other pair's transmit ring pauses and resumes where it was (its descriptors, head and
//! tail are not touched; its frames complete late, none is lost). The stop-rewind-restart
//! sequence holds a lock, so two pairs that hang together reset one after the other. There
//! is no full device reset in multi-queue mode: a device that stays wedged keeps reporting
//! hangs, and the caller should drop every pair and open the device again.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::desc::RxFormat;
use super::{
    bring_up, capabilities, enable_transmitter, init_rx, init_tx, quiesce, read_device_counters,
    regs, start_receiver, RxRing, TxRing, E1000,
};
use crate::anynic::NicConfig;
use crate::dma::{DmaRegion, DmaSpace};
use crate::error::{DriverError, Result};
use crate::irq::{DeviceIrq, Interruptible, IrqMode};
use crate::mmio::Mmio;
use crate::multiqueue::{QueuePair, RSS_KEY};
use crate::nic::NicModel;
use crate::queue::{Capabilities, DeviceStats, MacAddress, NetQueue, RxBuffer, TxFrame, TxToken};
use crate::vfio::VfioPci;
use vmm_sys_util::eventfd::EventFd;

/// Queue pairs of the 82574L (82574 DS 7.1.2: two receive and two transmit queues).
pub const MAX_PAIRS_82574: usize = 2;

/// Opens the device with up to `pairs` queue pairs: one on the 82540EM/82545EM (today's
/// [`E1000`] driver), `min(pairs, 2)` on the 82574L with RSS across them (see the
/// [module documentation](self)). Pair 0 first. Called by
/// [`crate::multiqueue::open_nic_queues`], which has checked `pairs >= 1`.
pub(crate) fn open_queues(
    pci: VfioPci,
    config: &NicConfig,
    pairs: usize,
) -> Result<Vec<Box<dyn QueuePair>>> {
    let (vendor, device) = pci.ids();
    let model = NicModel::from_ids(vendor, device)?;
    let n = if model == NicModel::I82574L {
        pairs.min(MAX_PAIRS_82574)
    } else {
        1
    };
    if n == 1 {
        return Ok(vec![Box::new(E1000::open(pci, config)?)]);
    }
    open_82574(pci, config, n)
}

impl QueuePair for E1000 {
    fn queue_index(&self) -> usize {
        0
    }
}

/// What the pairs of one device share (see "Sharing between the pairs").
struct Shared {
    bar0: Mmio,
    model: NicModel,
    mac: MacAddress,
    config: NicConfig,
    /// Serialises the transmit-reset sequence (TCTL read-modify-write, TDH writes).
    tx_reset: Mutex<()>,
    /// MSI-X vectors, one per pair (their eventfds; each pair reads its own through a
    /// duplicate). Disabled when dropped; held for that.
    _irq: Option<DeviceIrq>,
    /// Every ring and buffer region of every pair, so none is unmapped before the device is
    /// reset (in `Drop`, which runs before the fields drop). Held for that only.
    _memory: Vec<Arc<DmaRegion>>,
    /// Last: the VFIO device (and with it the IOMMU domain) outlives every mapping above.
    pci: VfioPci,
}

impl Drop for Shared {
    fn drop(&mut self) {
        quiesce(&self.bar0);
    }
}

/// The MMIO offsets of one pair's doorbells and transmit head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct QueueRegs {
    rdt: usize,
    tdh: usize,
    tdt: usize,
}

impl QueueRegs {
    fn of(queue: usize) -> QueueRegs {
        QueueRegs {
            rdt: regs::queue_reg(regs::RDT, queue),
            tdh: regs::queue_reg(regs::TDH, queue),
            tdt: regs::queue_reg(regs::TDT, queue),
        }
    }
}

/// One pair's interrupt vector: its eventfd (a duplicate of the one VFIO signals) and how
/// many interrupts it counted.
struct QueueIrq {
    event: EventFd,
    count: u64,
}

/// One queue pair of a two-queue 82574L. See the [module documentation](self).
pub struct E1000Queue {
    index: usize,
    regs: QueueRegs,
    tx: TxRing,
    rx: RxRing,
    /// Doorbells and watchdog resets; on pair 0 also the device-wide error counters.
    stats: DeviceStats,
    irq: Option<QueueIrq>,
    /// The causes this pair enables in IMS when armed, and clears in ICR when disarmed.
    irq_causes: u32,
    irq_clear: u32,
    dev: Arc<Shared>,
}

impl std::fmt::Debug for E1000Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E1000Queue")
            .field("device", self.dev.pci.address())
            .field("queue", &self.index)
            .finish_non_exhaustive()
    }
}

/// RSSRK0..9 for `key` (82574 DS 7.1.2: key byte 4i + j in bits 8j+7:8j of RSSRK[i]).
fn rss_key_words(key: &[u8; 40]) -> [u32; regs::RSSRK_WORDS] {
    std::array::from_fn(|i| {
        u32::from_le_bytes([key[4 * i], key[4 * i + 1], key[4 * i + 2], key[4 * i + 3]])
    })
}

/// RETA0..31 spreading the 128 entries over `pairs` queues round-robin: entry i = queue
/// `i % pairs`, in bit 7 of byte `i % 4` of RETA[i / 4] (82574 DS 7.1.2).
fn reta_words(pairs: usize) -> [u32; regs::RETA_WORDS] {
    std::array::from_fn(|w| {
        (0..4).fold(0u32, |word, b| {
            let queue = ((4 * w + b) % pairs.max(1)) as u32;
            word | (queue << regs::RETA_QUEUE_SHIFT) << (8 * b)
        })
    })
}

/// The queue the device puts a frame with RSS hash `hash` in when `pairs` queues share the
/// RETA as [`open_nic_queues`](crate::multiqueue::open_nic_queues) programs it: the entry the low 7 bits of the hash index (82574 DS
/// 7.1.2). Frames without a hash (RSS type 0) go to queue 0. For tests: with
/// [`crate::multiqueue::toeplitz_hash`] it predicts where a flow lands.
pub fn rss_queue(hash: u32, pairs: usize) -> usize {
    let entry = hash as usize % regs::RETA_ENTRIES;
    let word = reta_words(pairs)[entry / 4];
    ((word >> (8 * (entry % 4))) >> regs::RETA_QUEUE_SHIFT & 1) as usize
}

/// MRQC: RSS over the two queues, hashing TCP over IPv4 and IPv6 only (why not the
/// address-only functions: see the module documentation).
const MRQC_VALUE: u32 = regs::MRQC_RSS_ENABLE | regs::MRQC_HASH_TCP_IPV4 | regs::MRQC_HASH_TCP_IPV6;

/// IVAR for `pairs` pairs (82574 DS 10.2.4.9): RxQn and TxQn to vector n, Other to vector 0,
/// each entry valid; entries of absent queues stay invalid.
fn ivar_value(pairs: usize) -> u32 {
    let entry = |vector: usize, shift: u32| (vector as u32 | regs::IVAR_VALID) << shift;
    let mut ivar = entry(0, regs::IVAR_RXQ0_SHIFT) | entry(0, regs::IVAR_TXQ0_SHIFT);
    if pairs > 1 {
        ivar |= entry(1, regs::IVAR_RXQ1_SHIFT) | entry(1, regs::IVAR_TXQ1_SHIFT);
    }
    ivar | entry(0, regs::IVAR_OTHER_SHIFT)
}

/// The interrupt causes pair `queue` enables (IMS) and clears (ICR). Pair 0 owns Other and
/// the causes behind it that the driver cares for (LSC, RXO); it also clears the legacy
/// receive/transmit causes a real part may set besides RxQ0/TxQ0, so they never keep
/// Other asserted.
fn irq_causes(queue: usize) -> (u32, u32) {
    if queue == 0 {
        let ims = regs::ICR_RXQ0 | regs::ICR_TXQ0 | regs::ICR_OTHER | regs::ICR_LSC | regs::ICR_RXO;
        let legacy = regs::ICR_RXT0 | regs::ICR_RXDMT0 | regs::ICR_TXDW;
        (ims, ims | legacy)
    } else {
        let ims = regs::ICR_RXQ1 | regs::ICR_TXQ1;
        (ims, ims)
    }
}

/// RSS and the extended descriptors (before the receiver is enabled): RFCTL.EXTEN,
/// RXCSUM.PCSD, the key, the redirection table, MRQC last (82574 DS 7.1.2: the table must be
/// initialised before multiple receive queues are enabled).
fn program_rss(bar0: &Mmio, pairs: usize) {
    bar0.write32(regs::RFCTL, bar0.read32(regs::RFCTL) | regs::RFCTL_EXTEN);
    bar0.write32(regs::RXCSUM, bar0.read32(regs::RXCSUM) | regs::RXCSUM_PCSD);
    for (i, word) in rss_key_words(&RSS_KEY).into_iter().enumerate() {
        bar0.write32(regs::RSSRK + 4 * i, word);
    }
    program_reta(bar0, pairs);
    bar0.write32(regs::MRQC, MRQC_VALUE);
}

fn program_reta(bar0: &Mmio, pairs: usize) {
    for (i, word) in reta_words(pairs).into_iter().enumerate() {
        bar0.write32(regs::RETA + 4 * i, word);
    }
}

/// MSI-X with one vector per pair, IVAR routed, no auto-clear (EIAC 0), PBA support on
/// (82574 DS 7.4.2, 10.2.4.9, 10.2.2.3). All causes stay masked. `None` (the pairs poll)
/// when MSI-X is missing or has too few vectors.
fn init_msix(pci: &VfioPci, bar0: &Mmio, pairs: usize) -> Option<DeviceIrq> {
    match pci.enable_interrupts(&[IrqMode::MsiX], pairs as u32) {
        Ok(irq) if irq.fds().len() >= pairs => {
            bar0.write32(regs::IVAR, ivar_value(pairs));
            bar0.write32(regs::EIAC, 0);
            let ext = bar0.read32(regs::CTRL_EXT) | regs::CTRL_EXT_PBA_SUPPORT;
            bar0.write32(regs::CTRL_EXT, ext);
            tracing::info!(device = %pci.address(), vectors = pairs, "e1000e MSI-X: one vector per queue pair");
            Some(irq)
        }
        Ok(irq) => {
            tracing::warn!(device = %pci.address(), vectors = irq.fds().len(), "too few MSI-X vectors for {pairs} queue pairs; polling");
            None
        }
        Err(e) => {
            tracing::warn!(device = %pci.address(), "MSI-X unavailable for the queue pairs ({e}); polling");
            None
        }
    }
}

/// The two-queue open (see the [module documentation](self)).
fn open_82574(pci: VfioPci, config: &NicConfig, pairs: usize) -> Result<Vec<Box<dyn QueuePair>>> {
    config.validate()?;
    let (model, bar0, mac) = bring_up(&pci)?;
    let dma: Arc<DmaSpace> = Arc::clone(pci.dma());

    let mut rings = Vec::with_capacity(pairs);
    for q in 0..pairs {
        let rx = init_rx(&bar0, &dma, config, q, RxFormat::Extended)?;
        let tx = init_tx(&bar0, &dma, config, model, q)?;
        rings.push((rx, tx));
    }
    // Write descriptors back at once (RDTR/RADV apply to both queues; SDM 13.4.30, 13.4.31).
    bar0.write32(regs::RDTR, 0);
    bar0.write32(regs::RADV, 0);
    program_rss(&bar0, pairs);
    for q in 0..pairs {
        let tarc = regs::queue_reg(regs::TARC0, q);
        bar0.write32(
            tarc,
            bar0.read32(tarc) | regs::TARC_82574_MQ | regs::TARC_ENABLE,
        );
    }
    enable_transmitter(&bar0);
    let irq = if config.interrupts {
        init_msix(&pci, &bar0, pairs)
    } else {
        None
    };
    let events = match &irq {
        Some(irq) => irq.clone_vectors(pairs)?,
        None => Vec::new(),
    };
    let memory = rings
        .iter()
        .flat_map(|(rx, tx)| {
            [
                Arc::clone(&rx.ring),
                Arc::clone(&rx.buffers),
                Arc::clone(&tx.ring),
            ]
        })
        .collect();
    let dev = Arc::new(Shared {
        bar0,
        model,
        mac,
        config: config.clone(),
        tx_reset: Mutex::new(()),
        _irq: irq,
        _memory: memory,
        pci,
    });

    // Receiver on, once, after RSS and both rings are set.
    start_receiver(&dev.bar0, config, dev.pci.address());
    // Discard whatever the clear-on-read counters saw during initialisation.
    read_device_counters(&dev.bar0, &mut DeviceStats::default(), true);
    tracing::info!(device = %dev.pci.address(), model = %model, mac = %mac, pairs, "e1000e ready with RSS");

    let mut events = events.into_iter();
    Ok(rings
        .into_iter()
        .enumerate()
        .map(|(index, (rx, tx))| {
            let (irq_causes, irq_clear) = irq_causes(index);
            Box::new(E1000Queue {
                index,
                regs: QueueRegs::of(index),
                tx,
                rx,
                stats: DeviceStats::default(),
                irq: events.next().map(|event| QueueIrq { event, count: 0 }),
                irq_causes,
                irq_clear,
                dev: Arc::clone(&dev),
            }) as Box<dyn QueuePair>
        })
        .collect())
}

impl E1000Queue {
    /// This pair's index on the device.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Frames dropped because their data never arrived in the buffer (see [`E1000`]);
    /// included in [`DeviceStats::rx_errors`].
    pub fn rx_integrity_drops(&self) -> u64 {
        self.rx.unwritten
    }
}

impl QueuePair for E1000Queue {
    fn queue_index(&self) -> usize {
        self.index
    }
}

impl NetQueue for E1000Queue {
    fn mac_address(&self) -> MacAddress {
        self.dev.mac
    }

    fn dma(&self) -> &Arc<DmaSpace> {
        self.dev.pci.dma()
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(&self.dev.config.offloads, self.dev.model)
    }

    fn link_up(&mut self) -> bool {
        self.dev.bar0.read32(regs::STATUS) & regs::STATUS_LU != 0
    }

    fn tx_capacity(&self, segments: usize) -> usize {
        self.tx.capacity(segments)
    }

    fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> Result<()> {
        self.tx
            .enqueue(frame, &self.dev.config.offloads, self.dev.model)
    }

    fn tx_flush(&mut self) {
        if self.tx.begin_flush() {
            self.tx.ring_doorbell(&self.dev.bar0, self.regs.tdt);
            self.stats.doorbells += 1;
        }
    }

    /// Completions, and the per-pair watchdog (see "TX hang in multi-queue mode").
    fn tx_reap(&mut self, done: &mut dyn FnMut(TxToken)) -> Result<usize> {
        if self.tx.nothing_flushed() {
            return Ok(0);
        }
        let now = Instant::now();
        let n = self.tx.reap(done, now);
        if n > 0 {
            return Ok(n);
        }
        let Some(stalled) = self.tx.stalled(now, self.dev.config.tx_hang_timeout) else {
            return Ok(0);
        };
        if !self.link_up() {
            // No link, no progress expected: start counting again when it returns.
            self.tx.last_progress = now;
            return Ok(0);
        }
        let lost = {
            // A poisoned lock only means another pair panicked mid-reset; the sequence
            // below starts from the registers, not from anything the lock protects.
            let _serialised = self
                .dev
                .tx_reset
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            self.tx
                .reset(&self.dev.bar0, self.regs.tdh, self.regs.tdt, done)
        };
        self.stats.watchdog_resets += 1;
        tracing::error!(device = %self.dev.pci.address(), queue = self.index, lost, "TX hang: no completion for {stalled:?}; this queue's TX ring reset");
        Err(DriverError::TxHang {
            ms: stalled.as_millis() as u64,
            lost,
        })
    }

    fn rx_next(&mut self) -> Option<RxBuffer> {
        self.rx.next(&self.dev.mac, self.dev.pci.address())
    }

    /// Copies a lent buffer's bytes out.
    ///
    /// # Panics
    /// If `buffer` is not a buffer this pair lent out and that is still lent.
    fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        self.rx.read(buffer, out)
    }

    fn rx_recycle(&mut self, buffer: RxBuffer) {
        self.rx.recycle(buffer)
    }

    fn rx_flush(&mut self) {
        if self.rx.flush(&self.dev.bar0, self.regs.rdt) {
            self.stats.doorbells += 1;
        }
    }

    /// This pair's own counters (see "Counters"); pair 0 adds the device-wide error counters.
    fn stats(&mut self) -> DeviceStats {
        if self.index == 0 {
            read_device_counters(&self.dev.bar0, &mut self.stats, false);
        }
        let (tx_frames, tx_bytes) = self.tx.completed();
        DeviceStats {
            tx_frames,
            tx_bytes,
            rx_frames: self.rx.frames,
            rx_bytes: self.rx.bytes,
            rx_errors: self.stats.rx_errors + self.rx.bad + self.rx.unwritten,
            ..self.stats
        }
    }
}

impl Interruptible for E1000Queue {
    fn irq_mode(&self) -> Option<IrqMode> {
        self.irq.as_ref().map(|_| IrqMode::MsiX)
    }

    fn irq_fds(&self) -> Vec<RawFd> {
        self.irq.iter().map(|irq| irq.event.as_raw_fd()).collect()
    }

    fn irq_arm(&mut self) {
        if self.irq.is_some() {
            // A cause already set in ICR interrupts at once when its IMS bit is set (82574
            // DS 10.2.4.1, 10.2.4.4), so nothing since the last disarm is missed.
            self.dev.bar0.write32(regs::IMS, self.irq_causes);
        }
    }

    fn irq_disarm(&mut self) -> u64 {
        let Some(irq) = &mut self.irq else {
            return 0;
        };
        // Only this pair's bits: IMC masks them, writing 1s to ICR clears them (82574 DS
        // 10.2.4.5, 10.2.4.1). No ICR read (it could clear the other pair's causes).
        self.dev.bar0.write32(regs::IMC, self.irq_causes);
        self.dev.bar0.write32(regs::ICR, self.irq_clear);
        // Non-blocking (the eventfd was created with EFD_NONBLOCK): nothing signalled reads
        // as WouldBlock, which is no interrupt.
        let n = irq.event.read().unwrap_or(0);
        irq.count += n;
        n
    }

    fn irq_count(&self) -> u64 {
        self.irq.as_ref().map_or(0, |irq| irq.count)
    }
}

impl Drop for E1000Queue {
    fn drop(&mut self) {
        if self.index != 0 && Arc::strong_count(&self.dev) > 1 {
            // The device keeps running for the other pair: send this pair's flows there.
            program_reta(&self.dev.bar0, 1);
        }
        if self.irq.is_some() {
            self.dev.bar0.write32(regs::IMC, self.irq_causes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::DmaAccess;
    use crate::e1000::desc::{self, DESC_LEN};
    use crate::multiqueue::{ipv4_tcp_hash_input, toeplitz_hash};

    #[test]
    fn queue_registers_are_the_82574_offsets() {
        let q1 = QueueRegs::of(1);
        assert_eq!((q1.rdt, q1.tdh, q1.tdt), (0x2918, 0x3910, 0x3918));
        assert_eq!(QueueRegs::of(0).tdt, regs::TDT);
        assert_eq!(regs::queue_reg(regs::RDBAL, 1), 0x2900);
        assert_eq!(regs::queue_reg(regs::TDBAL, 1), 0x3900);
        assert_eq!(regs::queue_reg(regs::TXDCTL, 1), 0x3928);
        assert_eq!(regs::queue_reg(regs::TARC0, 1), 0x3940);
    }

    #[test]
    fn rss_key_is_packed_low_byte_first() {
        let words = rss_key_words(&RSS_KEY);
        assert_eq!(words[0], 0xda56_5a6d);
        assert_eq!(words[9], 0xfa01_acbe);
    }

    #[test]
    fn reta_spreads_entries_over_the_pairs_in_bit_7() {
        let two = reta_words(2);
        assert!(two.iter().all(|&w| w == 0x8000_8000), "{two:08x?}");
        assert!(reta_words(1).iter().all(|&w| w == 0));
        // Every entry's queue: bit 7 of its byte, i % 2.
        for entry in 0..regs::RETA_ENTRIES {
            assert_eq!(rss_queue(entry as u32, 2), entry % 2);
            assert_eq!(rss_queue(entry as u32, 1), 0);
        }
        // Only the low 7 bits index the table.
        assert_eq!(rss_queue(0xffff_ff80, 2), 0);
        assert_eq!(rss_queue(0xffff_ff81, 2), 1);
    }

    #[test]
    fn the_specification_flows_land_on_both_queues() {
        // The RSS specification's IPv4/TCP examples (see crate::multiqueue): their hashes
        // decide the queue through the RETA; with two pairs both queues get some.
        let flows = [
            ([66, 9, 149, 187], 2794, [161, 142, 100, 80], 1766),
            ([199, 92, 111, 2], 14230, [65, 69, 140, 83], 4739),
            ([24, 19, 198, 95], 12898, [12, 22, 207, 184], 38024),
            ([38, 27, 205, 30], 48228, [209, 142, 163, 6], 2217),
            ([153, 39, 163, 191], 44251, [202, 188, 127, 2], 1303),
        ];
        let queues: Vec<usize> = flows
            .iter()
            .map(|&(src, sport, dst, dport)| {
                let hash = toeplitz_hash(&RSS_KEY, &ipv4_tcp_hash_input(src, dst, sport, dport));
                rss_queue(hash, 2)
            })
            .collect();
        // 0x51ccc178, 0xc626b0ea, 0x5c2b394a, 0xafc7327f, 0x10e828a2: low bits 0,0,0,1,0.
        assert_eq!(queues, [0, 0, 0, 1, 0]);
    }

    #[test]
    fn mrqc_hashes_tcp_only() {
        assert_eq!(MRQC_VALUE & 0b11, regs::MRQC_RSS_ENABLE);
        assert_ne!(MRQC_VALUE & regs::MRQC_HASH_TCP_IPV4, 0);
        assert_ne!(MRQC_VALUE & regs::MRQC_HASH_TCP_IPV6, 0);
        assert_eq!(
            MRQC_VALUE & (regs::MRQC_HASH_IPV4 | regs::MRQC_HASH_IPV6),
            0
        );
    }

    #[test]
    fn ivar_routes_each_pair_to_its_vector_and_other_to_vector_0() {
        let ivar = ivar_value(2);
        let field = |shift: u32| (ivar >> shift) & 0xf;
        assert_eq!(field(regs::IVAR_RXQ0_SHIFT), 0b1000);
        assert_eq!(field(regs::IVAR_TXQ0_SHIFT), 0b1000);
        assert_eq!(field(regs::IVAR_RXQ1_SHIFT), 0b1001);
        assert_eq!(field(regs::IVAR_TXQ1_SHIFT), 0b1001);
        assert_eq!(field(regs::IVAR_OTHER_SHIFT), 0b1000);
        assert_eq!(ivar >> 20, 0);
        assert_eq!(ivar_value(1), regs::IVAR_ALL_TO_VECTOR_0);
    }

    #[test]
    fn each_pair_touches_only_its_own_interrupt_causes() {
        let (ims0, clear0) = irq_causes(0);
        let (ims1, clear1) = irq_causes(1);
        assert_eq!(ims0 & ims1, 0);
        assert_eq!(
            clear0 & clear1,
            0,
            "one pair never clears the other's causes"
        );
        assert_eq!(ims1, regs::ICR_RXQ1 | regs::ICR_TXQ1);
        assert_ne!(ims0 & regs::ICR_OTHER, 0, "pair 0 wakes for link events");
    }

    #[test]
    fn tso_frames_count_their_wire_segments() {
        let tso = crate::queue::Tso {
            mss: 1448,
            header_len: 66,
        };
        assert_eq!(
            super::super::wire_size(66 + 4 * 1448, Some(tso)),
            (4, 4 * (1448 + 66))
        );
        assert_eq!(
            super::super::wire_size(66 + 4 * 1448 + 1, Some(tso)),
            (5, 4 * 1448 + 1 + 5 * 66)
        );
        assert_eq!(
            super::super::wire_size(42, None),
            (1, 60),
            "padded (TCTL.PSP)"
        );
        assert_eq!(super::super::wire_size(1514, None), (1, 1514));
    }

    /// The extended ring hands out what the device wrote back and counts it for the pair.
    #[test]
    fn extended_ring_receives_and_counts() {
        let dma = crate::dma::test_space();
        let mac = MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let mut rx = RxRing::new(
            &dma,
            8,
            2048,
            DmaAccess::DeviceReadsWrites,
            RxFormat::Extended,
        )
        .unwrap();
        assert_eq!(rx.next(&mac, &"test"), None);
        // The device: frame into descriptor 0's buffer, write-back with hash and DD|EOP.
        let buffer_iova: u64 = rx.ring.read_volatile(0);
        let offset = (buffer_iova - rx.buffers.iova()) as usize;
        rx.buffers.write_bytes(offset, &mac.0);
        let word0 = 0x5c2b_394a_u64 << 32 | desc::RSS_TYPE_TCP_IPV4 as u64;
        rx.ring.write_volatile(0, word0);
        rx.ring
            .write_volatile(8, desc::RXE_STA_DD | desc::RXE_STA_EOP | 74u64 << 32);
        // Descriptor 1: a CRC error.
        rx.ring.write_volatile(
            DESC_LEN + 8,
            desc::RXE_STA_DD | desc::RXE_STA_EOP | 1 << 24 | 74u64 << 32,
        );
        let got = rx.next(&mac, &"test").expect("frame");
        assert_eq!(got.len, 74);
        let mut out = [0u8; 6];
        assert_eq!(rx.read(&got, &mut out), mac.0);
        assert_eq!(rx.next(&mac, &"test"), None, "the bad frame is dropped");
        assert_eq!((rx.frames, rx.bytes, rx.bad, rx.unwritten), (1, 74, 1, 0));
        rx.recycle(got);
        rx.post_free();
        // Reposting restores a buffer address over the write-back's hash.
        let reposted: u64 = rx
            .ring
            .read_volatile(((rx.tail + 7) % 8) as usize * DESC_LEN);
        assert!(reposted >= rx.buffers.iova() && reposted < rx.buffers.iova() + 8 * 2048);
    }
}
