//! Device interrupts through VFIO, delivered to eventfds, for an event loop that busy-polls
//! while there is traffic and sleeps on the eventfds when there is none.
//!
//! VFIO exposes a PCI function's interrupts as three indexes (linux/vfio.h,
//! `VFIO_PCI_{INTX,MSI,MSIX}_IRQ_INDEX`); `VFIO_DEVICE_GET_IRQ_INFO` says how many vectors each
//! has, `VFIO_DEVICE_SET_IRQS` with `ACTION_TRIGGER | DATA_EVENTFD` attaches one eventfd per
//! vector, which the kernel signals from its interrupt handler. INTx is level-triggered: VFIO
//! masks the line on every interrupt (`VFIO_IRQ_INFO_AUTOMASKED`) and the driver must quiet
//! the device, then unmask with `ACTION_UNMASK`. MSI and MSI-X are edge messages (through the
//! IOMMU's interrupt remapping when it is on); nothing needs unmasking.
//!
//! The ioctls are made through `vfio-ioctls` (`VfioDevice::enable_irq`, `unmask_irq`,
//! `disable_irq`), eventfds are `vmm-sys-util`'s: no `unsafe` here.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};
use vfio_ioctls::VfioDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{DriverError, Result};

/// Which kind of interrupt a device delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqMode {
    /// MSI-X (PCI Local Bus 3.0 section 6.8.2): per-vector messages.
    MsiX,
    /// MSI (PCI Local Bus 3.0 section 6.8.1): one message.
    Msi,
    /// The legacy INTx line: level-triggered, unmasked again after each interrupt.
    Intx,
}

impl IrqMode {
    fn vfio_index(self) -> u32 {
        match self {
            IrqMode::MsiX => VFIO_PCI_MSIX_IRQ_INDEX,
            IrqMode::Msi => VFIO_PCI_MSI_IRQ_INDEX,
            IrqMode::Intx => VFIO_PCI_INTX_IRQ_INDEX,
        }
    }
}

impl std::fmt::Display for IrqMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IrqMode::MsiX => "MSI-X",
            IrqMode::Msi => "MSI",
            IrqMode::Intx => "INTx",
        })
    }
}

/// Interrupts of one device, enabled through VFIO onto eventfds. Dropping it disables them.
pub struct DeviceIrq {
    mode: IrqMode,
    fds: Vec<EventFd>,
    device: Arc<VfioDevice>,
    /// Interrupts signalled so far (the eventfd counters, summed as they are read).
    count: u64,
}

impl std::fmt::Debug for DeviceIrq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIrq")
            .field("mode", &self.mode)
            .field("vectors", &self.fds.len())
            .field("count", &self.count)
            .finish()
    }
}

impl DeviceIrq {
    /// Enable the first of `modes` the device has, with up to `vectors` eventfds (one for
    /// INTx and MSI). Each refused mode is noted in the error if none is left.
    pub(crate) fn enable(
        device: &Arc<VfioDevice>,
        modes: &[IrqMode],
        vectors: u32,
    ) -> Result<Self> {
        let mut refused = Vec::new();
        for &mode in modes {
            let index = mode.vfio_index();
            let Some(info) = device.get_irq_info(index).copied() else {
                refused.push(format!("{mode}: not reported by VFIO"));
                continue;
            };
            if info.count == 0 {
                refused.push(format!("{mode}: the device has none"));
                continue;
            }
            if info.flags & VFIO_IRQ_INFO_EVENTFD == 0 {
                refused.push(format!("{mode}: no eventfd signalling"));
                continue;
            }
            let n = match mode {
                IrqMode::MsiX => vectors.clamp(1, info.count),
                IrqMode::Msi | IrqMode::Intx => 1,
            };
            let fds = match (0..n)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<std::io::Result<Vec<_>>>()
            {
                Ok(fds) => fds,
                Err(source) => return Err(DriverError::io("creating interrupt eventfds", source)),
            };
            match device.enable_irq(index, fds.iter().collect()) {
                Ok(()) => {
                    tracing::debug!(%mode, vectors = n, "interrupts enabled through VFIO");
                    return Ok(DeviceIrq {
                        mode,
                        fds,
                        device: Arc::clone(device),
                        count: 0,
                    });
                }
                Err(e) => refused.push(format!("{mode}: VFIO_DEVICE_SET_IRQS failed: {e}")),
            }
        }
        Err(DriverError::NoInterrupt(refused.join("; ")))
    }

    pub fn mode(&self) -> IrqMode {
        self.mode
    }

    /// The eventfds, one per vector: readable once the device interrupted.
    pub fn fds(&self) -> Vec<RawFd> {
        self.fds.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Duplicates of the first `n` eventfds, one per vector, for queue pairs that each wait
    /// on and read their own vector.
    pub fn clone_vectors(&self, n: usize) -> Result<Vec<EventFd>> {
        self.fds
            .iter()
            .take(n)
            .map(|fd| {
                fd.try_clone()
                    .map_err(|e| DriverError::io("duplicating an interrupt eventfd", e))
            })
            .collect()
    }

    /// Read (and so reset) every eventfd; returns how many interrupts they counted.
    pub fn drain(&mut self) -> u64 {
        let mut n = 0;
        for fd in &self.fds {
            // EFD_NONBLOCK: EAGAIN when nothing was signalled, which is no interrupt.
            if let Ok(v) = fd.read() {
                n += v;
            }
        }
        self.count += n;
        n
    }

    /// INTx only: let VFIO deliver the line again (`VFIO_IRQ_SET_ACTION_UNMASK`), after the
    /// device's cause has been cleared. MSI and MSI-X: nothing to do.
    pub fn unmask(&self) {
        if self.mode == IrqMode::Intx {
            if let Err(e) = self.device.unmask_irq(VFIO_PCI_INTX_IRQ_INDEX) {
                tracing::warn!("VFIO INTx unmask failed: {e}");
            }
        }
    }

    /// Interrupts counted so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

impl Drop for DeviceIrq {
    fn drop(&mut self) {
        if let Err(e) = self.device.disable_irq(self.mode.vfio_index()) {
            tracing::debug!("disabling {} interrupts: {e}", self.mode);
        }
    }
}

/// Interrupt control of a NIC driver: off (the caller polls), or armed for one wake-up.
///
/// The protocol: while busy the loop polls with the device's interrupts quiet. Going idle it
/// calls [`Interruptible::irq_arm`], polls once more (a frame that arrived before arming
/// raises no interrupt on every device), and if that found nothing sleeps on
/// [`Interruptible::irq_fds`]. On waking (or finding work) it calls
/// [`Interruptible::irq_disarm`] before polling again.
pub trait Interruptible {
    /// The interrupt kind in use, `None` when the driver only polls.
    fn irq_mode(&self) -> Option<IrqMode>;
    /// Eventfds that become readable when the device interrupts (empty when polling only).
    fn irq_fds(&self) -> Vec<RawFd>;
    /// Let the device interrupt on its next receive, transmit completion or link event.
    fn irq_arm(&mut self);
    /// Quiet the device's interrupts again, clear what is pending and (INTx) unmask the
    /// line; returns how many interrupts were signalled since the last call.
    fn irq_disarm(&mut self) -> u64;
    /// Interrupts signalled so far.
    fn irq_count(&self) -> u64;
}

/// A capture passes interrupts through to the NIC it wraps.
impl<Q: Interruptible + crate::queue::NetQueue> Interruptible for crate::pcap::PcapTap<Q> {
    fn irq_mode(&self) -> Option<IrqMode> {
        self.inner().irq_mode()
    }
    fn irq_fds(&self) -> Vec<RawFd> {
        self.inner().irq_fds()
    }
    fn irq_arm(&mut self) {
        self.inner_mut().irq_arm()
    }
    fn irq_disarm(&mut self) -> u64 {
        self.inner_mut().irq_disarm()
    }
    fn irq_count(&self) -> u64 {
        self.inner().irq_count()
    }
}
