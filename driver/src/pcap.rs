//! `PcapTap`: wraps any [`NetQueue`] and records every frame sent and received in a pcap
//! file (readable by tcpdump, tshark, Wireshark), for `zerosend serve --pcap`.
//!
//! TX frames are gathered from their DMA segments (a copy made only for the capture) as the
//! stack handed them to the device, so a TSO frame appears once, larger than the MTU, as in
//! a Linux capture taken above the NIC. Offloaded checksums are still the pseudo-header sums
//! in the capture; the device fills in the real ones.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::DataLink;

use crate::dma::DmaSpace;
use crate::error::{DriverError, Result};
use crate::queue::{Capabilities, DeviceStats, MacAddress, NetQueue, RxBuffer, TxFrame, TxToken};

/// Largest frame recorded (a full TSO frame).
const SNAPLEN: u32 = 65_535 + 14;

/// Records buffered in memory and written to the file only by [`PcapTap::flush`], which the
/// tap calls between records: the file on disk always ends on a whole record, so it can be
/// read (even served over HTTP) while the capture goes on. Shared because the pcap writer
/// owns its writer and offers no way to flush it.
#[derive(Clone)]
struct RecordBuffer(Arc<Mutex<(Vec<u8>, File)>>);

impl Write for RecordBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let mut guard = self.0.lock().unwrap();
        let (buffer, file) = &mut *guard;
        file.write_all(buffer)?;
        buffer.clear();
        Ok(())
    }
}

impl RecordBuffer {
    fn buffered(&self) -> usize {
        self.0.lock().unwrap().0.len()
    }
}

/// Flush once this much is buffered.
const FLUSH_AT: usize = 4 << 20;

pub struct PcapTap<Q> {
    inner: Q,
    file: RecordBuffer,
    writer: PcapWriter<RecordBuffer>,
    scratch: Vec<u8>,
    /// Frames that could not be recorded (write errors); the traffic itself is unaffected.
    pub capture_errors: u64,
}

impl<Q: NetQueue> PcapTap<Q> {
    pub fn new(inner: Q, path: &Path) -> Result<Self> {
        let file = File::create(path)
            .map_err(|e| DriverError::io(format!("creating {}", path.display()), e))?;
        let header = PcapHeader {
            datalink: DataLink::ETHERNET,
            snaplen: SNAPLEN,
            ..Default::default()
        };
        let file = RecordBuffer(Arc::new(Mutex::new((Vec::with_capacity(FLUSH_AT), file))));
        let writer = PcapWriter::with_header(file.clone(), header).map_err(|e| {
            DriverError::Device(format!("writing pcap header to {}: {e}", path.display()))
        })?;
        let mut tap = PcapTap {
            inner,
            file,
            writer,
            scratch: Vec::with_capacity(SNAPLEN as usize),
            capture_errors: 0,
        };
        tap.flush(); // the file header, so the file is a valid (empty) capture from the start
        Ok(tap)
    }

    pub fn inner(&self) -> &Q {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut Q {
        &mut self.inner
    }

    /// Write buffered records to the file (call periodically; always ends on a record).
    pub fn flush(&mut self) {
        if self.file.flush().is_err() {
            self.capture_errors += 1;
        }
    }

    /// Write the frame in `scratch` as one record.
    fn record_scratch(&mut self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let packet = PcapPacket::new(now, self.scratch.len() as u32, &self.scratch);
        if self.writer.write_packet(&packet).is_err() {
            self.capture_errors += 1;
        }
        if self.file.buffered() >= FLUSH_AT {
            self.flush();
        }
    }
}

impl<Q: NetQueue> NetQueue for PcapTap<Q> {
    fn mac_address(&self) -> MacAddress {
        self.inner.mac_address()
    }
    fn dma(&self) -> &Arc<DmaSpace> {
        self.inner.dma()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn link_up(&mut self) -> bool {
        self.inner.link_up()
    }
    fn tx_capacity(&self, segments: usize) -> usize {
        self.inner.tx_capacity(segments)
    }
    fn tx_enqueue(&mut self, frame: TxFrame<'_>) -> Result<()> {
        self.inner.tx_enqueue(frame)?;
        let segments = frame.segments;
        self.scratch.clear();
        let mut ok = true;
        for s in segments {
            let at = self.scratch.len();
            self.scratch.resize(at + s.len as usize, 0);
            ok &= self
                .inner
                .dma()
                .read_iova(s.iova, &mut self.scratch[at..])
                .is_ok();
        }
        if ok {
            self.record_scratch();
        } else {
            self.capture_errors += 1;
        }
        Ok(())
    }
    fn tx_flush(&mut self) {
        self.inner.tx_flush()
    }
    fn tx_reap(&mut self, done: &mut dyn FnMut(TxToken)) -> Result<usize> {
        self.inner.tx_reap(done)
    }
    fn rx_next(&mut self) -> Option<RxBuffer> {
        let buffer = self.inner.rx_next()?;
        self.scratch.resize(crate::queue::MAX_RX_FRAME, 0);
        let len = self.inner.rx_read(&buffer, &mut self.scratch).len();
        self.scratch.truncate(len);
        self.record_scratch();
        Some(buffer)
    }
    fn rx_read<'out>(&self, buffer: &RxBuffer, out: &'out mut [u8]) -> &'out [u8] {
        self.inner.rx_read(buffer, out)
    }
    fn rx_recycle(&mut self, buffer: RxBuffer) {
        self.inner.rx_recycle(buffer)
    }
    fn rx_flush(&mut self) {
        self.inner.rx_flush()
    }
    fn stats(&mut self) -> DeviceStats {
        self.inner.stats()
    }
}

impl<Q> Drop for PcapTap<Q> {
    fn drop(&mut self) {
        let _ = self.file.flush();
    }
}
