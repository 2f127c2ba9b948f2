//! **The wire.** The software NIC's frames go to a [`SoftPeer`] and the peer's frames come
//! back to the NIC. Each direction has seeded [`Impairments`]: loss, duplication and
//! reordering, reproducible from the seed. Frames longer than the MTU (plus the Ethernet
//! header) are dropped, in both directions.
//!
//! The peer is a plain frame queue; [`crate::smoltcp_peer`] wraps it into a smoltcp
//! `phy::Device` so a stock smoltcp interface can be the other end.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Ethernet header (no VLAN tag) in front of the IP packet.
pub(crate) const ETHERNET_HEADER_LEN: usize = 14;

/// Seeded impairments of one direction of the wire. Probabilities are in `0.0..=1.0`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairments {
    /// Probability that a frame is lost.
    pub loss: f64,
    /// Probability that a frame is delivered twice.
    pub duplicate: f64,
    /// Probability that a frame is held back and delivered after the next one.
    pub reorder: f64,
    /// PRNG seed: the same seed and traffic give the same impairments.
    pub seed: u64,
}

impl Impairments {
    /// A perfect wire.
    pub fn none() -> Self {
        Self::default()
    }

    /// The same probability of loss, duplication and reordering.
    pub fn uniform(probability: f64, seed: u64) -> Self {
        Self {
            loss: probability,
            duplicate: probability,
            reorder: probability,
            seed,
        }
    }
}

/// SplitMix64: small, fast, good enough for fault injection, and reproducible.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < p
    }
}

/// Counters of one direction of the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireCounters {
    /// Frames offered to the wire.
    pub offered: u64,
    /// Frames the wire lost on purpose.
    pub lost: u64,
    /// Extra copies the wire delivered.
    pub duplicated: u64,
    /// Frames delivered after a later frame.
    pub reordered: u64,
    /// Frames dropped for exceeding the MTU.
    pub oversized: u64,
}

/// One direction of the wire.
struct Channel {
    queue: VecDeque<Vec<u8>>,
    impairments: Impairments,
    rng: SplitMix64,
    /// A frame held back to be delivered after the next one.
    held: Option<Vec<u8>>,
    counters: WireCounters,
    max_frame: usize,
}

impl Channel {
    fn new(impairments: Impairments, max_frame: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            rng: SplitMix64(impairments.seed),
            impairments,
            held: None,
            counters: WireCounters::default(),
            max_frame,
        }
    }

    fn push(&mut self, frame: Vec<u8>) {
        self.counters.offered += 1;
        if frame.len() > self.max_frame {
            self.counters.oversized += 1;
            return;
        }
        let i = self.impairments;
        if self.rng.chance(i.loss) {
            self.counters.lost += 1;
            return;
        }
        let duplicate = self.rng.chance(i.duplicate);
        if self.held.is_none() && self.rng.chance(i.reorder) {
            // Deliver it after the next frame.
            self.counters.reordered += 1;
            if duplicate {
                self.counters.duplicated += 1;
                self.queue.push_back(frame.clone());
            }
            self.held = Some(frame);
            return;
        }
        if duplicate {
            self.counters.duplicated += 1;
            self.queue.push_back(frame.clone());
        }
        self.queue.push_back(frame);
        if let Some(held) = self.held.take() {
            self.queue.push_back(held);
        }
    }

    fn pop(&mut self) -> Option<Vec<u8>> {
        // A held frame is only delayed, never lost: release it when nothing overtook it.
        self.queue.pop_front().or_else(|| self.held.take())
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.held.is_none()
    }
}

struct Link {
    to_peer: Channel,
    to_nic: Channel,
}

/// A wire whose IP MTU is `mtu`, and its two ends.
pub(crate) fn wire(to_peer: Impairments, to_nic: Impairments, mtu: usize) -> (NicPort, SoftPeer) {
    let max_frame = mtu + ETHERNET_HEADER_LEN;
    let link = Arc::new(Mutex::new(Link {
        to_peer: Channel::new(to_peer, max_frame),
        to_nic: Channel::new(to_nic, max_frame),
    }));
    (NicPort { link: link.clone() }, SoftPeer { link, mtu })
}

/// The NIC's end of the wire.
pub(crate) struct NicPort {
    link: Arc<Mutex<Link>>,
}

impl NicPort {
    /// Put a frame on the wire towards the peer (impairments apply).
    pub(crate) fn transmit(&self, frame: Vec<u8>) {
        self.link.lock().unwrap().to_peer.push(frame);
    }

    /// The next frame the peer put on the wire (after impairments).
    pub(crate) fn receive(&self) -> Option<Vec<u8>> {
        self.link.lock().unwrap().to_nic.pop()
    }

    /// Counters of both directions: `[to the peer, to the NIC]`.
    pub(crate) fn counters(&self) -> [WireCounters; 2] {
        let link = self.link.lock().unwrap();
        [link.to_peer.counters, link.to_nic.counters]
    }
}

/// The far end of the software NIC's wire: receives what the NIC transmits, and sends what
/// the NIC receives. Cheap to clone; all clones share the wire.
#[derive(Clone)]
pub struct SoftPeer {
    link: Arc<Mutex<Link>>,
    mtu: usize,
}

impl std::fmt::Debug for SoftPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftPeer").field("mtu", &self.mtu).finish()
    }
}

impl SoftPeer {
    /// The next frame the NIC put on the wire (after impairments).
    pub fn recv(&self) -> Option<Vec<u8>> {
        self.link.lock().unwrap().to_peer.pop()
    }

    /// Whether a frame is waiting for the peer.
    pub fn has_frames(&self) -> bool {
        !self.link.lock().unwrap().to_peer.is_empty()
    }

    /// Put a frame on the wire towards the NIC (impairments apply).
    pub fn send(&self, frame: Vec<u8>) {
        self.link.lock().unwrap().to_nic.push(frame);
    }

    /// The IP MTU of the wire (the Ethernet frame may be 14 bytes longer).
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// Counters of the NIC-to-peer direction.
    pub fn to_peer_counters(&self) -> WireCounters {
        self.link.lock().unwrap().to_peer.counters
    }

    /// Counters of the peer-to-NIC direction.
    pub fn to_nic_counters(&self) -> WireCounters {
        self.link.lock().unwrap().to_nic.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(i: u32) -> Vec<u8> {
        i.to_be_bytes().to_vec()
    }

    fn drain(mut pop: impl FnMut() -> Option<Vec<u8>>) -> Vec<u32> {
        std::iter::from_fn(|| pop().map(|f| u32::from_be_bytes(f[..4].try_into().unwrap())))
            .collect()
    }

    #[test]
    fn splitmix64_is_the_published_generator() {
        // The first outputs for seed 0 (Vigna's reference splitmix64.c).
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn a_perfect_wire_delivers_in_order_both_ways() {
        let (nic, peer) = wire(Impairments::none(), Impairments::none(), 1500);
        for i in 0..5 {
            nic.transmit(numbered(i));
            peer.send(numbered(10 + i));
        }
        assert!(peer.has_frames());
        assert_eq!(drain(|| peer.recv()), vec![0, 1, 2, 3, 4]);
        assert!(!peer.has_frames());
        assert_eq!(drain(|| nic.receive()), vec![10, 11, 12, 13, 14]);
        let [to_peer, to_nic] = nic.counters();
        assert_eq!((to_peer.offered, to_nic.offered), (5, 5));
        assert_eq!(to_peer, peer.to_peer_counters());
        assert_eq!(to_nic, peer.to_nic_counters());
    }

    #[test]
    fn frames_beyond_the_mtu_are_dropped_and_counted() {
        let (nic, peer) = wire(Impairments::none(), Impairments::none(), 100);
        nic.transmit(vec![0; 114]);
        nic.transmit(vec![0; 115]);
        peer.send(vec![0; 115]);
        assert_eq!(peer.recv().map(|f| f.len()), Some(114));
        assert!(peer.recv().is_none());
        assert!(nic.receive().is_none());
        let [to_peer, to_nic] = nic.counters();
        assert_eq!((to_peer.oversized, to_nic.oversized), (1, 1));
    }

    #[test]
    fn a_reordered_frame_comes_after_the_next_one_and_is_never_lost() {
        let always = Impairments {
            reorder: 1.0,
            ..Impairments::none()
        };
        let (nic, peer) = wire(always, Impairments::none(), 1500);
        nic.transmit(numbered(0)); // held
        nic.transmit(numbered(1)); // overtakes 0 (only one frame is held at a time)
        nic.transmit(numbered(2)); // held
        assert_eq!(
            drain(|| peer.recv()),
            vec![1, 0, 2],
            "2 released at the end"
        );
        assert_eq!(peer.to_peer_counters().reordered, 2);
    }

    #[test]
    fn the_same_seed_gives_the_same_impairments() {
        let run = |seed| {
            let (nic, peer) = wire(Impairments::uniform(0.2, seed), Impairments::none(), 1500);
            for i in 0..500 {
                nic.transmit(numbered(i));
            }
            (drain(|| peer.recv()), peer.to_peer_counters())
        };
        let (a, counters) = run(1);
        assert_eq!((a.clone(), counters), run(1));
        assert_ne!(a, run(2).0);
        assert!(counters.lost > 50 && counters.duplicated > 50 && counters.reordered > 50);
        assert_eq!(a.len() as u64, 500 - counters.lost + counters.duplicated);
    }
}
