//! The software NIC's far end as a smoltcp `phy::Device`, so that a stock smoltcp
//! `Interface` and `tcp::Socket` can be the peer of a `netstack::Stack` in tests and benches.

use crate::SoftPeer;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// A smoltcp device that sends and receives on a [`SoftPeer`]. Checksums are computed and
/// verified in software, like any ordinary host.
pub struct PeerDevice {
    peer: SoftPeer,
    /// Frames received from the wire.
    pub frames_received: u64,
    /// Frames put on the wire.
    pub frames_sent: u64,
}

impl PeerDevice {
    pub fn new(peer: SoftPeer) -> Self {
        Self {
            peer,
            frames_received: 0,
            frames_sent: 0,
        }
    }

    pub fn peer(&self) -> &SoftPeer {
        &self.peer
    }
}

pub struct PeerRxToken(Vec<u8>);

impl phy::RxToken for PeerRxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub struct PeerTxToken<'a>(&'a mut PeerDevice);

impl phy::TxToken for PeerTxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let result = f(&mut frame);
        self.0.frames_sent += 1;
        self.0.peer.send(frame);
        result
    }
}

impl phy::Device for PeerDevice {
    type RxToken<'a> = PeerRxToken;
    type TxToken<'a> = PeerTxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(PeerRxToken, PeerTxToken<'_>)> {
        let frame = self.peer.recv()?;
        self.frames_received += 1;
        Some((PeerRxToken(frame), PeerTxToken(self)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<PeerTxToken<'_>> {
        Some(PeerTxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.peer.mtu() + 14;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SoftNic, SoftNicConfig};
    use driver::dma::DmaAccess;
    use driver::{NetQueue, TxFrame, TxOffload, TxSegment};
    use phy::{Device, RxToken, TxToken};

    #[test]
    fn frames_cross_between_smoltcp_and_the_nic() {
        let (mut nic, peer) = SoftNic::new(SoftNicConfig::default()).unwrap();
        let mut device = PeerDevice::new(peer);
        let caps = device.capabilities();
        assert_eq!(caps.medium, Medium::Ethernet);
        assert_eq!(caps.max_transmission_unit, 1514);

        let token = device.transmit(Instant::from_millis(0)).unwrap();
        token.consume(60, |frame| frame.fill(0xab));
        let mut received = Vec::new();
        assert_eq!(nic.rx_poll(8, &mut |f| received.push(f.to_vec())), 1);
        assert_eq!(received, vec![vec![0xab; 60]]);

        let region = nic.dma().allocate(60, DmaAccess::DeviceReads).unwrap();
        region.write_bytes(0, &[0xcd; 60]);
        let segment = TxSegment {
            iova: region.iova(),
            len: 60,
        };
        nic.tx_enqueue(TxFrame::new(&[segment], &TxOffload::default(), 1))
            .unwrap();
        nic.tx_flush();
        let (rx, _tx) = device.receive(Instant::from_millis(0)).unwrap();
        assert_eq!(rx.consume(|frame| frame.to_vec()), vec![0xcd; 60]);
        assert!(device.receive(Instant::from_millis(0)).is_none());
        assert_eq!((device.frames_sent, device.frames_received), (1, 1));
    }
}
