//! Run-time fault injection, for tests only (cargo feature `fault-injection`).
//!
//! [`AnyNic::inject_fault`] arms a [`Fault`] that strikes after a number of further
//! transmitted frames, in the middle of whatever traffic is running. Each fault is produced
//! *on the device*, the way the datasheet or the specification says such a fault looks, and
//! the driver's ordinary detection and recovery must notice and repair it: nothing here
//! tells the recovery code that a fault was injected, and nothing here reports an error.
//!
//! | fault | e1000 family (8254x, 82574) | virtio-net |
//! |-------|-----------------------------|------------|
//! | [`Fault::TxHang`] | transmitter disabled (TCTL.EN = 0) | notifications withheld |
//! | [`Fault::DeviceError`] | not supported | malformed descriptor -> DEVICE_NEEDS_RESET |
//!
//! - **e1000, TX hang.** Clearing TCTL.EN stops the transmit unit: transmission stops after
//!   the packet in progress (8254x SDM 13.4.33, TCTL.EN; 82574 DS 10.2, TCTL), and the
//!   descriptors between TDH and TDT are no longer fetched (SDM 3.4: the hardware processes
//!   the ring only while transmission is enabled). The driver keeps writing TDT, nothing
//!   completes (no DD, SDM 3.3.3.2), TDH stands still: what a stalled DMA engine or
//!   a wedged transmit unit looks like. The TX-hang watchdog in `tx_reap` must notice the
//!   lack of progress, stop and rewind the ring, give every outstanding token back, report
//!   [`DriverError::TxHang`] and re-enable the transmitter.
//! - **virtio-net, TX hang.** The driver stops sending available buffer notifications for the
//!   transmit queue (VIRTIO 1.2 section 2.7.13.4, 4.1.4.4): buffers are published in the
//!   available ring but the device, idle and waiting for a notification (it clears
//!   VIRTQ_USED_F_NO_NOTIFY when it goes idle, section 2.7.10), never looks at them. That is
//!   a lost doorbell or a device that stopped serving its queue: published buffers, no used
//!   entries. The watchdog must reset the device (section 2.4), hand back the tokens, report
//!   [`DriverError::TxHang`] and re-initialise it; the device
//!   reset ends the fault (the withheld notifications stop with it).
//! - **virtio-net, device error** (split virtqueues with indirect descriptors). The ring
//!   descriptor of the first frame of the striking doorbell points at its indirect table with
//!   a length that is not a whole number of descriptors (section 2.7.5.3: the table is an
//!   array of `len / 16` `struct virtq_desc`). The device cannot use the buffer; QEMU, as
//!   section 2.1.2 provides, sets DEVICE_NEEDS_RESET ("Indicates that the device has
//!   experienced an error from which it can't recover", section 2.1) and stops processing
//!   the queue. The driver's status check must notice, reset and re-initialise the device,
//!   hand back the tokens and report
//!   [`DriverError::DeviceReset`].
//!
//! An e1000-family device has no equivalent of DEVICE_NEEDS_RESET (it reports nothing when
//! it gives up on a descriptor), so [`Fault::DeviceError`] is refused there.

use crate::anynic::AnyNic;
use crate::error::{DriverError, Result};

/// A fault [`AnyNic::inject_fault`] can arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The device stops completing transmitted frames (see the [module docs](self)).
    TxHang,
    /// virtio-net only: the device meets a descriptor it cannot use and sets
    /// DEVICE_NEEDS_RESET (see the [module docs](self)).
    DeviceError,
}

/// One driver's injection state: what is armed, and what has struck.
#[derive(Debug, Default)]
pub(crate) struct FaultInjector {
    /// The armed fault and how many more frames go out before it strikes.
    armed: Option<(Fault, u64)>,
    /// The fault that struck and whose effect lasts until the driver resets the device.
    active: Option<Fault>,
    /// Faults that struck so far.
    struck: u64,
}

impl FaultInjector {
    /// Arm `fault` to strike at the first doorbell after `after_frames` more frames were
    /// handed to the device. Replaces whatever was armed.
    pub(crate) fn arm(&mut self, fault: Fault, after_frames: u64) {
        self.armed = Some((fault, after_frames));
    }

    /// Called by the driver just before it tells the device about `frames` new frames.
    /// Returns the fault that strikes now, if its countdown has run out; the driver then
    /// produces it on the device before the doorbell.
    pub(crate) fn before_doorbell(&mut self, frames: usize) -> Option<Fault> {
        let (fault, left) = self.armed?;
        if left > 0 {
            // These frames still go out normally (all of them, even if they overshoot).
            self.armed = Some((fault, left.saturating_sub(frames as u64)));
            return None;
        }
        self.armed = None;
        self.active = Some(fault);
        self.struck += 1;
        tracing::warn!(
            ?fault,
            frames,
            "fault injection: {fault:?} strikes now (test hook)"
        );
        Some(fault)
    }

    /// Whether `fault` has struck and the device has not been reset since.
    pub(crate) fn is_active(&self, fault: Fault) -> bool {
        self.active == Some(fault)
    }

    /// The driver reset the device (or its transmit unit) while recovering: whatever had
    /// struck is over.
    pub(crate) fn on_reset(&mut self) {
        self.active = None;
    }

    pub(crate) fn struck(&self) -> u64 {
        self.struck
    }
}

impl AnyNic {
    /// Arm `fault` to strike at the first transmit doorbell after `after_frames` more frames
    /// were handed to the device (test hook; see the [module docs](crate::faults)). Refused
    /// with [`DriverError::InvalidArgument`] where the device cannot produce the fault.
    pub fn inject_fault(&mut self, fault: Fault, after_frames: u64) -> Result<()> {
        let supported = match (&*self, fault) {
            (_, Fault::TxHang) => true,
            (AnyNic::Virtio(nic), Fault::DeviceError) => nic.can_inject_device_error(),
            (AnyNic::E1000(_), Fault::DeviceError) => false,
        };
        if !supported {
            return Err(DriverError::InvalidArgument(format!(
                "fault injection: {} cannot produce {fault:?} (DeviceError needs virtio-net with indirect descriptors on split virtqueues)",
                self.model()
            )));
        }
        match self {
            AnyNic::E1000(nic) => nic.fault_injector().arm(fault, after_frames),
            AnyNic::Virtio(nic) => nic.fault_injector().arm(fault, after_frames),
        }
        tracing::warn!(
            ?fault,
            after_frames,
            "fault injection: {fault:?} armed (test hook)"
        );
        Ok(())
    }

    /// How many injected faults have struck so far.
    pub fn faults_struck(&mut self) -> u64 {
        match self {
            AnyNic::E1000(nic) => nic.fault_injector().struck(),
            AnyNic::Virtio(nic) => nic.fault_injector().struck(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_strikes_unless_armed() {
        let mut f = FaultInjector::default();
        for _ in 0..100 {
            assert_eq!(f.before_doorbell(7), None);
        }
        assert_eq!(f.struck(), 0);
        assert!(!f.is_active(Fault::TxHang));
    }

    #[test]
    fn strikes_once_at_the_first_doorbell_after_the_countdown() {
        let mut f = FaultInjector::default();
        f.arm(Fault::TxHang, 5);
        assert_eq!(f.before_doorbell(3), None, "3 of 5 frames");
        assert_eq!(f.before_doorbell(3), None, "6 of 5: these still go out");
        assert!(!f.is_active(Fault::TxHang));
        assert_eq!(f.before_doorbell(1), Some(Fault::TxHang));
        assert!(f.is_active(Fault::TxHang));
        assert!(!f.is_active(Fault::DeviceError));
        assert_eq!(f.before_doorbell(1), None, "one-shot");
        assert!(
            f.is_active(Fault::TxHang),
            "lasts until the device is reset"
        );
        f.on_reset();
        assert!(!f.is_active(Fault::TxHang));
        assert_eq!(f.struck(), 1);
    }

    #[test]
    fn zero_frames_strikes_at_the_next_doorbell_and_rearming_replaces() {
        let mut f = FaultInjector::default();
        f.arm(Fault::TxHang, 1000);
        f.arm(Fault::DeviceError, 0);
        assert_eq!(f.before_doorbell(1), Some(Fault::DeviceError));
        assert_eq!(f.before_doorbell(1), None);
        f.arm(Fault::TxHang, 0);
        assert_eq!(f.before_doorbell(4), Some(Fault::TxHang));
        assert_eq!(f.struck(), 2);
    }
}
